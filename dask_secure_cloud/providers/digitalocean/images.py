"""DigitalOcean snapshots built by ``dask secure-cloud image build``: the droplet action
``snapshot`` on the powered-off builder, found by name in ``/v2/snapshots``.

A snapshot carries no labels: its name (``dask-secure-cloud-<hash>-<time>``) is its
software hash. DigitalOcean's API has no console output, so a builder that failed is
told from a finished one by staying on (``vm/boot/common.sh``).
"""

from __future__ import annotations

from typing import Any

from ... import driver as drivers
from ...driver import VM
from ...imaging import BuiltImage, OptionImageStore, Software, parse_name


class Images(OptionImageStore):
    """The account's droplet snapshots named as built images."""

    option = "image"

    async def list(self) -> list[BuiltImage]:
        found = await self.driver._all(
            "listing snapshots", "snapshots", "snapshots", resource_type="droplet"
        )
        return [image for snapshot in found if (image := _built(snapshot))]

    async def delete(self, image: BuiltImage) -> None:
        try:
            await self.driver._call(
                f"deleting snapshot {image.name}", "snapshots", "delete", snapshot_id=image.id
            )
        except drivers.NotFoundError:
            return

    async def capture(self, vm: VM, name: str, software: Software) -> BuiltImage:
        driver = self.driver
        try:
            answer = await driver._call(
                f"snapshotting droplet {vm.id}",
                "droplet_actions",
                "post",
                droplet_id=int(vm.id),
                body={"type": "snapshot", "name": name},
            )
            action_id = answer["action"]["id"]

            async def completed() -> bool:
                action = (
                    await driver._call(
                        "reading the snapshot action", "actions", "get", action_id=action_id
                    )
                )["action"]
                if action["status"] == "errored":
                    raise drivers.CloudError(f"the snapshot action {action_id} errored")
                return bool(action["status"] == "completed")

            await driver.poll_until(completed, f"snapshot {name}", interval=5)
            made = [image for image in await self.list() if image.name == name]
            if not made:
                raise drivers.CloudError(f"the snapshot {name} is not listed once completed")
        except BaseException:
            for image in await self.list():
                if image.name == name:
                    await self.delete(image)
            raise
        return made[0]


def _built(snapshot: dict[str, Any]) -> BuiltImage | None:
    parsed = parse_name(snapshot.get("name", ""))
    if parsed is None:
        return None
    return BuiltImage(snapshot["name"], str(snapshot["id"]), parsed[0], parsed[1], "")
