"""AMIs built by ``dask secure-cloud image build``: CreateImage from the stopped builder
instance, found by their tag, deregistered together with their snapshots."""

from __future__ import annotations

from typing import Any

from ... import driver as drivers
from ...driver import VM
from ...imaging import IMAGE_TAG, BuiltImage, ImageStore, Software, now, parse_name


class Images(ImageStore):
    """The account's AMIs in the driver's region that carry :data:`IMAGE_TAG`."""

    def base(self) -> str:
        return self.driver.options.ami or ""

    def use(self, image: BuiltImage) -> None:
        self.driver.ami = image.id

    def prepare_builder(self) -> None:
        # The builder powers itself off when done: its instance must stop, not terminate.
        self.driver.shutdown_behavior = "stop"

    async def list(self) -> list[BuiltImage]:
        answer = await self.driver._call(
            "describe_images",
            Owners=["self"],
            Filters=[{"Name": "tag-key", "Values": [IMAGE_TAG]}],
        )
        return [image for found in answer["Images"] if (image := _built(found))]

    async def delete(self, image: BuiltImage) -> None:
        found = (await self.driver._call("describe_images", ImageIds=[image.id]))["Images"]
        snapshots = [
            mapping["Ebs"]["SnapshotId"]
            for entry in found
            for mapping in entry.get("BlockDeviceMappings", [])
            if mapping.get("Ebs", {}).get("SnapshotId")
        ]
        await self.driver._call("deregister_image", ImageId=image.id)
        for snapshot in snapshots:
            try:
                await self.driver._call("delete_snapshot", SnapshotId=snapshot)
            except drivers.NotFoundError:
                continue

    async def capture(self, vm: VM, name: str, software: Software) -> BuiltImage:
        answer = await self.driver._call(
            "create_image",
            InstanceId=vm.id,
            Name=name,
            Description=f"dask-secure-cloud: {software.describe()}"[:255],
            NoReboot=True,  # it is stopped already: its OS powered off cleanly
            TagSpecifications=[
                {
                    "ResourceType": "image",
                    "Tags": [
                        {"Key": IMAGE_TAG, "Value": software.digest},
                        {"Key": "Name", "Value": name},
                        {"Key": drivers.CREATOR_TAG, "Value": self.driver.creator},
                    ],
                }
            ],
        )
        image_id = answer["ImageId"]
        made = BuiltImage(name, image_id, software.digest, now(), software.describe())
        try:
            state = ""

            async def available() -> bool:
                nonlocal state
                images = (await self.driver._call("describe_images", ImageIds=[image_id]))["Images"]
                state = images[0]["State"] if images else "gone"
                if state in ("failed", "invalid", "error", "deregistered", "gone"):
                    raise drivers.CloudError(f"CreateImage made {image_id}, which is {state}")
                return state == "available"

            await self.driver.poll_until(available, f"AMI {image_id} to become available")
        except BaseException:
            await self.delete(made)
            raise
        return made


def _built(found: dict[str, Any]) -> BuiltImage | None:
    tags = {t["Key"]: t["Value"] for t in found.get("Tags", [])}
    parsed = parse_name(found.get("Name", ""))
    if parsed is None or tags.get(IMAGE_TAG) != parsed[0]:
        return None
    description = found.get("Description", "")
    return BuiltImage(found["Name"], found["ImageId"], parsed[0], parsed[1], description)
