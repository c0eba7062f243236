"""A driver whose VMs are QEMU guests: ``LocalVMCluster``'s boot path on real Linux.

The cluster hands it user-data exactly as it hands it to a cloud; each VM is a guest of
the stock (or baked) image on the test namespace's cluster network, reached by the
client through the host's end of that network. A guest that powers off is a terminated
instance; deleting a VM kills its qemu. Whether a role gets a route out ("egress") is
the test's choice, as the network would be the cloud's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar

from dask_secure_cloud.cloudinit import LIMITS
from dask_secure_cloud.cluster import VMCluster
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.driver import VM, Driver, VMRequest

from .booter import GuestBooter, GuestVM
from .common import CLUSTER_NETWORK
from .image import GuestImage

__all__ = ["GuestCluster", "GuestDriver"]

#: Guests take cluster-network addresses from .10 on.
_FIRST_HOST = 10


class GuestDriver(Driver):
    provider = "guest"
    user_data_limit = LIMITS["aws"]  # the strictest cloud's budget
    # Guests share two cores: booting them one after another is no slower under TCG, but
    # the cluster still overlaps worker boots with the scheduler's, as on a cloud.
    max_concurrent_creates = 4

    def __init__(
        self,
        booter: GuestBooter,
        egress: Mapping[Role, bool] | None = None,
        apparmor: bool | None = None,
        image: GuestImage | None = None,
    ) -> None:
        self.booter = booter
        self.egress = dict(egress or {Role.SCHEDULER: True, Role.WORKER: True})
        #: Whether the guests' kernel enforces AppArmor; None: the booter's setting.
        self.apparmor = apparmor
        #: The guests' image; None: the booter's.
        self.image = image
        self.created: list[VM] = []
        #: Seconds a deletion first waits for the guest to power itself off, as a VM whose
        #: Dask process ended does; 0: delete at once, as a cloud does.
        self.wait_for_power_off = 0.0
        #: Per VM name: seconds from "dask ... exited" on its console to its qemu's exit
        #: (the guest powered itself off), or None (it was still running when deleted).
        self.powered_off: dict[str, float | None] = {}
        #: Per VM name: its console when it was deleted (deletion removes its files).
        self.consoles: dict[str, str] = {}

    def _reserve_address(self) -> str:
        """A free address, taken at once: creations run concurrently in threads, and two
        guests with one address would each see half a network."""
        # Reservations live on the booter: several clusters may share its network.
        reserved = self.booter.reserved_addresses
        taken = {vm.address for vm in self.booter.vms.values()} | reserved
        for host in list(CLUSTER_NETWORK.hosts())[_FIRST_HOST - 1 : 250]:
            if str(host) not in taken:
                reserved.add(str(host))
                return str(host)
        raise RuntimeError("no address left on the cluster network")

    def where(self) -> str:
        return f"guests on {CLUSTER_NETWORK}"

    async def create(self, request: VMRequest) -> VM:
        address = self._reserve_address()
        guest = await asyncio.to_thread(
            self.booter.boot,
            request.user_data,
            address=address,
            cluster_id=request.cluster_id,
            name=request.name,
            role=request.role.value,
            egress=self.egress.get(request.role, True),
            apparmor=self.apparmor,
            image=self.image,
        )
        vm = self._record(guest)
        self.created.append(vm)
        return vm

    @staticmethod
    def _record(guest: GuestVM) -> VM:
        return VM(
            id=guest.vm_id,
            name=guest.name,
            role=Role(guest.role),
            cluster_id=guest.cluster_id,
            private_ip=guest.address,
        )

    async def destroy(self, vm: VM) -> None:
        guest = self.booter.vms.get(vm.id)
        if guest is not None and self.wait_for_power_off:
            self.powered_off[vm.name] = await asyncio.to_thread(
                _power_off_after_dask, guest, self.wait_for_power_off
            )
        if guest is not None:
            self.consoles[vm.name] = guest.console_output()
        await asyncio.to_thread(self.booter.stop, vm.id)
        self.booter.reserved_addresses.discard(vm.private_ip)

    async def list(self, cluster_id: str) -> list[VM]:
        return [self._record(g) for g in self.booter.vms.values() if g.cluster_id == cluster_id]

    async def states(self, cluster_id: str) -> dict[str, str]:
        return {
            g.vm_id: "running" if g.is_running() else "terminated"
            for g in list(self.booter.vms.values())
            if g.cluster_id == cluster_id
        }

    async def state(self, vm: VM) -> str:
        guest = self.booter.vms.get(vm.id)
        return "running" if guest is not None and guest.is_running() else "terminated"

    async def console_output(self, vm: VM) -> str:
        guest = self.booter.vms.get(vm.id)
        return guest.console_output() if guest is not None else ""


def _power_off_after_dask(guest: GuestVM, timeout: float) -> float | None:
    if not guest.wait_stopped(timeout):
        return None
    return guest.dask_exit_to_power_off()


class GuestCluster(VMCluster):
    """A ``VMCluster`` on guests: the clouds' boot path, the cloud's API left out."""

    provider: ClassVar[str] = "guest"

    def __init__(self, driver: GuestDriver, **options: Any) -> None:
        super().__init__(driver, **options)
