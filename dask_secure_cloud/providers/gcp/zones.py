"""Compute Engine's zones, for ``placement.py``: the cluster starts in ``zone``; a VM that
zone has no capacity for (``ZONE_RESOURCE_POOL_EXHAUSTED``) may go to another zone of
the region (``regions.get``), unless ``zone_failover=False``. The driver remembers each
VM's zone; a driver that made no VM (``cleanup``, ``list``) looks in every zone of the
region."""

from __future__ import annotations

from typing import Any

from ... import driver, placement
from ...credentials import Role


class ZoneSteps(placement.Zonal):
    """The zone part of :class:`~.driver.GCPDriver`."""

    options: Any
    project: str | None
    home_zone: str | None
    #: Each instance's zone, by name, for the instances this driver made or listed.
    _vm_zones: dict[str, str]
    _zone_names: list[str] | None

    async def _call(self, service: str, method: str, what: str, **kwargs: Any) -> Any:
        raise NotImplementedError

    @property
    def region(self) -> str:
        return str(self.options.zone).rsplit("-", 1)[0]

    def zone_pinned_by(self) -> str | None:
        if not self.options.zone_failover:
            return (
                f"zone_failover=False keeps every VM in zone {self.home_zone}: set it to "
                f"True to let the other zones of {self.region} take a VM this one has no "
                "capacity for, or choose another zone"
            )
        return None

    def spot(self, role: Role) -> bool:
        return role is Role.WORKER and bool(self.options.worker_spot)

    async def region_zones(self, role: Role) -> list[str]:
        """The zones of the cluster's region, as ``regions.get`` lists them."""
        if self._zone_names is None:
            region = await self._call(
                "RegionsClient",
                "get",
                f"region {self.region}",
                project=self.project,
                region=self.region,
            )
            self._zone_names = sorted(link.rsplit("/", 1)[-1] for link in region.zones)
        return list(self._zone_names)

    def _zone_of(self, name: str) -> str:
        """Where the instance ``name`` is: where it was made or listed, else the
        cluster's zone."""
        return self._vm_zones.get(name) or str(self.home_zone)

    async def _listing_zones(self) -> list[str]:
        """The zones to list a cluster's instances in: the cluster's, and each zone
        this driver made an instance in; every zone of the region for a driver that
        made none (a cleanup, a listing) where instances may have moved."""
        if self._vm_zones or self.zone_pinned_by() is not None:
            return sorted({str(self.home_zone), *self._vm_zones.values()})
        try:
            return await self.region_zones(Role.WORKER)
        except driver.NotFoundError:  # no such region: the zone is all there is to ask
            return [str(self.home_zone)]
