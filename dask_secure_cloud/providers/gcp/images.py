"""Compute Engine images built by ``dask secure-cloud image build``: ``images.insert``
from the stopped (TERMINATED) builder's boot disk, labelled with their software hash."""

from __future__ import annotations

import asyncio
from typing import Any

from google.cloud import compute_v1

from ... import driver as drivers
from ...driver import VM
from ...imaging import IMAGE_TAG, BuiltImage, OptionImageStore, Software, now, parse_name


class Images(OptionImageStore):
    """The project's global images labelled :data:`IMAGE_TAG`."""

    option = "source_image"

    def _link(self, name: str) -> str:
        return f"projects/{self.driver.project}/global/images/{name}"

    async def list(self) -> list[BuiltImage]:
        driver = self.driver
        pager = await driver._call(
            "ImagesClient",
            "list",
            "listing built images",
            request=compute_v1.ListImagesRequest(
                project=driver.project, filter=f"labels.{IMAGE_TAG}:*"
            ),
        )
        # Further pages are fetched while iterating: not on the event loop.
        every = await asyncio.to_thread(list, pager)
        return [image for found in every if (image := self._built(found))]

    def _built(self, found: Any) -> BuiltImage | None:
        parsed = parse_name(found.name)
        if parsed is None or found.labels.get(IMAGE_TAG) != parsed[0]:
            return None
        return BuiltImage(
            found.name, self._link(found.name), parsed[0], parsed[1], found.description
        )

    async def delete(self, image: BuiltImage) -> None:
        name = image.name
        try:
            operation = await self.driver._call(
                "ImagesClient",
                "delete",
                f"deleting image {name}",
                project=self.driver.project,
                image=name,
            )
            await self.driver._wait(operation, f"deleting image {name}", zonal=False)
        except drivers.NotFoundError:
            return

    async def capture(self, vm: VM, name: str, software: Software) -> BuiltImage:
        driver = self.driver
        instance = await driver._call(
            "InstancesClient",
            "get",
            f"instance {vm.id}",
            project=driver.project,
            zone=driver.options.zone,
            instance=vm.id,
        )
        image = compute_v1.Image(
            name=name,
            source_disk=instance.disks[0].source,
            description=f"dask-secure-cloud: {software.describe()}",
            labels={IMAGE_TAG: software.digest},
        )
        what = f"creating image {name}"
        made = BuiltImage(name, self._link(name), software.digest, now(), software.describe())
        try:
            operation = await driver._call(
                "ImagesClient", "insert", what, project=driver.project, image_resource=image
            )
            await driver._wait(operation, what, zonal=False)
        except BaseException:
            await self.delete(made)
            raise
        return made
