"""Azure managed images built by ``dask secure-cloud image build``: the powered-off
builder VM is deallocated and generalized, then captured (``Microsoft.Compute/images``
from ``sourceVirtualMachine``); found by their tag in the cluster's resource group."""

from __future__ import annotations

import dataclasses

from azure.mgmt.compute import models as cm

from ... import driver as drivers
from ...driver import VM
from ...imaging import IMAGE_TAG, BuiltImage, OptionImageStore, Software, now, parse_name

#: An image has no description: this tag says what it holds.
_HOLDS_TAG = "dask-secure-cloud-holds"


class Images(OptionImageStore):
    """The resource group's managed images that carry :data:`IMAGE_TAG`."""

    option = "image"

    @property
    def _group(self) -> str:
        return str(self.driver.options.resource_group)

    async def list(self) -> list[BuiltImage]:
        await self.driver._resolve_subscription()
        compute, _ = self.driver._clients()
        found = []

        async def collect() -> None:
            async for image in compute.images.list_by_resource_group(self._group):
                found.append(image)

        await self.driver._arm("listing images", collect())
        # An image serves VMs of its own location only.
        where = self.driver.location
        found = [each for each in found if where is None or each.location == where]
        return [image for each in found if (image := _built(each))]

    async def delete(self, image: BuiltImage) -> None:
        await self.driver._resolve_subscription()
        compute, _ = self.driver._clients()
        try:
            await self.driver._lro(
                f"deleting image {image.name}", compute.images.begin_delete, self._group, image.name
            )
        except drivers.NotFoundError:
            return

    async def capture(self, vm: VM, name: str, software: Software) -> BuiltImage:
        driver = self.driver
        compute, _ = driver._clients()
        vm_name = vm.id.rsplit("/", 1)[-1]
        # Capturing takes a generalized VM, and generalizing a deallocated (or stopped) one.
        await driver._lro(
            f"deallocating {vm_name}",
            compute.virtual_machines.begin_deallocate,
            self._group,
            vm_name,
        )
        await driver._arm(
            f"generalizing {vm_name}", compute.virtual_machines.generalize(self._group, vm_name)
        )
        image = cm.Image(
            location=driver.location,
            tags={
                IMAGE_TAG: software.digest,
                _HOLDS_TAG: software.describe()[:256],
                drivers.CREATOR_TAG: driver.creator,
            },
            source_virtual_machine=cm.SubResource(id=vm.id),
        )
        made = BuiltImage(name, "", software.digest, now(), software.describe())
        try:
            answer = await driver._lro(
                f"creating image {name}",
                compute.images.begin_create_or_update,
                self._group,
                name,
                image,
            )
        except BaseException:
            await self.delete(made)
            raise
        return dataclasses.replace(made, id=answer.id)


def _built(image: cm.Image) -> BuiltImage | None:
    parsed = parse_name(image.name or "")
    if parsed is None or (image.tags or {}).get(IMAGE_TAG) != parsed[0]:
        return None
    holds = (image.tags or {}).get(_HOLDS_TAG, "")
    return BuiltImage(str(image.name), str(image.id), parsed[0], parsed[1], holds)
