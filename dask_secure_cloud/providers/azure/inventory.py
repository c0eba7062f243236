"""What of a cluster exists in the resource group, and in what state: its VMs and the
rest of what it made, found by the cluster's tags (``list``, ``clusters``, ``states``)."""

from __future__ import annotations

import logging
from typing import Any

from ... import driver
from ...credentials import Role
from .names import _name

logger = logging.getLogger(__name__)

#: Power states of a VM whose OS shut down (or that was deallocated).
#: A VM in these power states ended by itself (its OS shut down) or was deallocated, but
#: still exists: stopped, its compute still bills; either way its disk, NIC and public
#: address do, until the VM and they are deleted.
_STOPPED = frozenset({"PowerState/stopped", "PowerState/deallocated", "PowerState/deallocating"})


class InventorySteps:
    """The driver's listings, kept apart from making and deleting: every VM and resource
    of a cluster by its tags, with the state each is in. Mixed into
    :class:`~.driver.AzureDriver`."""

    async def _tagged(self, what: str, pager: Any, cluster_id: str) -> list[Any]:
        async def collect() -> list[Any]:
            return [r async for r in pager if (r.tags or {}).get(driver.CLUSTER_TAG) == cluster_id]

        return await self._arm(what, collect())

    async def list(self, cluster_id: str) -> list[driver.VM]:
        if self.subscription_id is None:
            return []  # prepare stopped before the subscription was known: nothing made
        compute, net = self._clients()
        vms = await self._tagged(
            "listing VMs", compute.virtual_machines.list(self.options.resource_group), cluster_id
        )
        if not vms:
            return []
        nics = await self._tagged(
            "listing network interfaces",
            net.network_interfaces.list(self.options.resource_group),
            cluster_id,
        )
        addresses = {
            (n.virtual_machine.id or "").lower(): n.ip_configurations[0].private_ip_address
            for n in nics
            if n.virtual_machine is not None and n.ip_configurations
        }
        prefix = f"{cluster_id}-"
        return [
            driver.VM(
                id=v.id,
                name=v.name.removeprefix(prefix),
                role=Role.SCHEDULER
                if v.tags.get("dask-secure-cloud-role") == "scheduler"
                else Role.WORKER,
                cluster_id=cluster_id,
                private_ip=addresses.get(v.id.lower(), "") or "",
            )
            for v in vms
        ]

    async def clusters(self) -> list[driver.ClusterSummary]:
        await self._resolve_subscription()
        compute, _ = self._clients()

        async def collect() -> list[Any]:
            # With their instance views: a VM whose OS shut down is "Stopped", allocated
            # and billing, which only the power state tells.
            return [
                v
                async for v in compute.virtual_machines.list(
                    self.options.resource_group, expand="instanceView"
                )
                if driver.CLUSTER_TAG in (v.tags or {})
            ]

        vms = await self._arm("listing VMs", collect())
        _, net = self._clients()
        group = self.options.resource_group

        async def tagged_others() -> list[tuple[str, str]]:
            found = []
            for kind, pager in (
                ("interface", net.network_interfaces.list(group)),
                ("address", net.public_ip_addresses.list(group)),
                ("disk", compute.disks.list_by_resource_group(group)),
                ("firewall", net.network_security_groups.list(group)),
                ("network", net.virtual_networks.list(group)),
            ):
                found += [
                    (r.tags[driver.CLUSTER_TAG], kind)
                    async for r in pager
                    if driver.CLUSTER_TAG in (r.tags or {})
                ]
            return found

        others = await self._arm("listing the cluster's resources", tagged_others())
        others += [(i.tags[driver.CLUSTER_TAG], "identity") for i in await self._identities()]
        return driver.summarize(
            (
                (
                    v.tags[driver.CLUSTER_TAG],
                    v.time_created,
                    v.tags.get(driver.CREATOR_TAG),
                    _listed_state(v.instance_view),
                )
                for v in vms
            ),
            others,
        )

    async def states(self, cluster_id: str) -> dict[str, str]:
        """One listing of the resource group's VMs with their instance views: a VM whose
        OS shut down is Stopped, still allocated and billed for its compute."""
        if self.subscription_id is None:
            return {}
        compute, _ = self._clients()
        vms = await self._tagged(
            "listing VMs",
            compute.virtual_machines.list(self.options.resource_group, expand="instanceView"),
            cluster_id,
        )
        found = {}
        for vm in vms:
            codes = {s.code for s in (vm.instance_view.statuses if vm.instance_view else [])}
            found[vm.id] = "stopped" if codes & _STOPPED else "running"
        return found

    async def state(self, vm: driver.VM) -> str:
        compute, _ = self._clients()
        try:
            view = await self._arm(
                "reading a VM",
                compute.virtual_machines.instance_view(
                    self.options.resource_group,
                    _name(vm.cluster_id, vm.name),
                    retry_total=0,  # a poll: its caller polls again
                ),
            )
        except driver.NotFoundError:
            return "terminated"  # deleted: evicted as a Spot VM, or by us
        except driver.CloudError:  # throttled, refused, unreachable: nothing learnt
            return "unknown"
        codes = {s.code for s in view.statuses or []}
        if codes & _STOPPED:
            return "stopped"
        return "running"


def _listed_state(view: Any) -> str:
    """A VM's power state in :meth:`Driver.state`'s words, for ``list``. "Stopped" is
    still allocated and its compute bills; "deallocated" bills no compute (its disk and
    address, listed apart, still do)."""
    codes = {s.code for s in (view.statuses or [])} if view is not None else set()
    if codes & {"PowerState/running", "PowerState/starting"}:
        return "running"
    if codes & {"PowerState/stopped", "PowerState/stopping"}:
        return "stopped"
    if codes & {"PowerState/deallocated", "PowerState/deallocating"}:
        return "deallocated"
    return "unknown"
