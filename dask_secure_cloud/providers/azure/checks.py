"""The read-only checks before anything is made: each role's VM size is offered in the
location, and the subscription's vCPU quota leaves room for the cluster."""

from __future__ import annotations

import difflib
import logging
from typing import Any

from azure.core.exceptions import (
    HttpResponseError,
)

from ... import driver, errors
from ...credentials import Role

logger = logging.getLogger(__name__)


class RequestChecks:
    """The driver's read-only checks of what the cluster asks for. Mixed into
    :class:`~.driver.AzureDriver`."""

    async def _check_sizes(self) -> None:
        compute, _ = self._clients()
        offered: dict[str, Any] = {}

        async def collect() -> None:
            async for sku in compute.resource_skus.list(filter=f"location eq '{self.location}'"):
                if sku.resource_type == "virtualMachines":
                    offered[sku.name.lower()] = sku

        await self._arm(f"listing the VM sizes of {self.location}", collect())
        if not offered:
            raise driver.CloudError(
                f"location {self.location!r} offers no VM sizes to this subscription; "
                "check location (for example 'westeurope')"
            )
        for role, size in self.vm_sizes.items():
            sku = offered.get(size.lower())
            if sku is None:
                names = sorted(s.name for s in offered.values())
                close = difflib.get_close_matches(size, names, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise driver.CloudError(
                    f"{role.value}_vm_size {size!r} is not offered in {self.location}.{hint}"
                )
            if any(r.reason_code == "NotAvailableForSubscription" for r in sku.restrictions or []):
                raise driver.CloudError(
                    f"{role.value}_vm_size {size!r} is restricted for this subscription in "
                    f"{self.location}; choose another size or location"
                )
            capabilities = {c.name: c.value for c in sku.capabilities or []}
            if capabilities.get("GPUs", "0") not in ("0", "", None):
                self._gpu_sizes.add(size.lower())
            vcpus = capabilities.get("vCPUs", "")
            if vcpus and vcpus.isdigit():
                self._size_quota[role] = (int(vcpus), sku.family)

    def _vcpus_needed(self) -> dict[str, int]:
        """vCPUs the scheduler and the initial workers take from each quota: the regional
        total (``cores``) and the size's family, or the regional Spot quota
        (``lowPriorityCores``) for Spot workers."""
        needed: dict[str, int] = {}
        plan = [
            (Role.SCHEDULER, 1, False),
            (Role.WORKER, self.initial_workers, self.options.worker_spot),
        ]
        for role, count, spot in plan:
            if role not in self._size_quota or count == 0:
                continue
            vcpus, family = self._size_quota[role]
            quotas = ["lowPriorityCores"] if spot else ["cores", *([family] if family else [])]
            for quota in quotas:
                needed[quota] = needed.get(quota, 0) + vcpus * count
        return needed

    async def _check_quota(self) -> None:
        """Refuse a start the subscription's vCPU quotas cannot hold, before anything is
        made. An identity without ``Microsoft.Compute/locations/usages/read`` skips the
        check: the VM create then fails with Azure's own quota error, and is cleaned up."""
        needed = self._vcpus_needed()
        if not needed:
            return
        compute, _ = self._clients()
        usages: dict[str, Any] = {}

        async def collect() -> bool:
            try:
                async for usage in compute.usage.list(str(self.location)):
                    if usage.name and usage.name.value:
                        usages[usage.name.value.lower()] = usage
            except HttpResponseError as e:
                if e.status_code != 403:
                    raise
                logger.info("Not checking vCPU quotas: %s", e.message)
                return False
            return True

        if not await self._arm("reading the vCPU quotas", collect()):
            return
        for quota, vcpus in needed.items():
            usage = usages.get(quota.lower())
            if usage is None:
                continue
            free = usage.limit - usage.current_value
            if vcpus > free:
                name = usage.name.localized_value or usage.name.value
                raise errors.quota_error(
                    f"this cluster needs {vcpus} vCPUs of the {name!r} quota and "
                    f"{max(free, 0)} are free ({usage.current_value} in use)",
                    "QuotaExceeded",
                    quota=name,
                    region=self.location,
                    limit=usage.limit,
                    fix="Ask for a quota increase (Azure portal, Quotas), or start fewer "
                    "workers (n_workers) or smaller ones (worker_vm_size)",
                )
