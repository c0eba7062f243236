"""Azure's zones and Spot, for ``placement.py``: a VM is regional (Azure picks where it
goes) until the region refuses it for capacity; then it is made in each availability
zone the size is offered in (the resource SKUs' ``locationInfo.zones``), one after
another. A refused VM create is undone before the next try: ARM keeps a VM whose
allocation failed (provisioning state ``Failed``), holding the interface and address
made for it.

Azure's quota refusal of a VM create is ``OperationNotAllowed``, whose quota, limit and
usage are only in its message text; the subscription's usages (``usages.list``) carry
them as fields, so the refusal is read from there."""

from __future__ import annotations

import logging
from typing import Any

from azure.mgmt.compute import models as cm

from ... import driver, errors, placement
from ...credentials import Role

logger = logging.getLogger(__name__)


class ZoneSteps(placement.Zonal):
    """The zone, Spot and quota part of :class:`~.driver.AzureDriver`."""

    options: Any
    location: str | None
    vm_sizes: dict[Role, str]
    _size_quota: dict[Role, tuple[int, str | None]]
    _size_zones: dict[str, list[str]] | None = None

    def zone_pinned_by(self) -> str | None:
        """No option names a zone: VMs are regional (Azure places them) until refused."""
        if not self.options.zone_failover:
            return (
                "zone_failover=False keeps every VM where Azure places it in the region: "
                "set it to True to try each availability zone in turn"
            )
        return None

    def spot(self, role: Role) -> bool:
        return role is Role.WORKER and bool(self.options.worker_spot)

    async def region_zones(self, role: Role) -> list[str]:
        """The availability zones of the location that offer ``role``'s VM size, as the
        resource SKUs list them, with no restriction for this subscription."""
        if self._size_zones is None:
            compute, _ = self._clients()  # type: ignore[attr-defined]
            found: dict[str, list[str]] = {}

            async def collect() -> None:
                async for sku in compute.resource_skus.list(
                    filter=f"location eq '{self.location}'"
                ):
                    if sku.resource_type != "virtualMachines":
                        continue
                    restricted = {
                        zone
                        for r in sku.restrictions or []
                        if r.type == "Zone" and r.restriction_info
                        for zone in r.restriction_info.zones or []
                    }
                    zones = [
                        zone
                        for info in sku.location_info or []
                        if (info.location or "").lower() == str(self.location).lower()
                        for zone in sorted(info.zones or [])
                        if zone not in restricted
                    ]
                    found[sku.name.lower()] = zones

            await self._arm(f"listing the zones of {self.location}", collect())  # type: ignore[attr-defined]
            self._size_zones = found
        return list(self._size_zones.get(self.vm_sizes[role].lower(), []))

    async def _quota_refusal(
        self, error: errors.CloudError, role: Role, spot: bool
    ) -> errors.CloudError:
        """``error`` (an ``OperationNotAllowed`` refusal of a VM create) as a
        :class:`QuotaError` naming the quota the VM does not fit, from the subscription's
        usages; as it was when none is full (it was not a quota)."""
        vcpus, family = self._size_quota.get(role, (0, None))
        quotas = ["lowPriorityCores"] if spot else ["cores", *([family] if family else [])]
        compute, _ = self._clients()  # type: ignore[attr-defined]
        usages: dict[str, Any] = {}

        async def collect() -> None:
            async for usage in compute.usage.list(str(self.location)):
                if usage.name and usage.name.value:
                    usages[usage.name.value.lower()] = usage

        try:
            await self._arm("reading the vCPU quotas", collect())  # type: ignore[attr-defined]
        except driver.CloudError as e:
            logger.debug("could not read the usages after a refusal: %s", e)
            return error
        for quota in quotas:
            usage = usages.get(quota.lower())
            if usage is not None and usage.current_value + vcpus > usage.limit:
                return errors.quota_error(
                    str(error),
                    error.code,
                    quota=usage.name.localized_value or usage.name.value,
                    region=self.location,
                    limit=usage.limit,
                    fix=f"{usage.current_value} vCPUs in use, {vcpus} more asked. Ask for "
                    "a quota increase (Azure portal, Quotas), or use fewer or smaller "
                    "workers; this is not retried",
                )
        return error


def zonal(vm: cm.VirtualMachine, zone: str | None) -> cm.VirtualMachine:
    """``vm`` pinned to ``zone`` (an availability zone), or left regional."""
    if zone is not None:
        vm.zones = [zone]
    return vm
