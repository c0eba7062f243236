"""The cluster's VMs as ``SpecCluster`` sees them: each starts and stops itself.

``SpecCluster`` builds one ``ProcessInterface`` per entry of its spec and awaits its
``start``; here that launches a VM through the cluster's fleet and, for the scheduler,
waits until a client can complete a handshake with it. The cluster (``cluster.py``)
decides how many; these decide nothing but their own VM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, ClassVar

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface

from . import imaging
from .credentials import Role
from .driver import VM
from .errors import CloudError, ClusterStartError

if TYPE_CHECKING:
    from .cluster import VMCluster

__all__ = ["SchedulerVM", "WorkerVM"]

logger = logging.getLogger("dask_secure_cloud.cluster")


class _VM(ProcessInterface):
    """One VM of the cluster, as ``SpecCluster`` sees it: it starts and stops itself
    through the cluster's fleet."""

    role: ClassVar[Role]

    def __init__(self, cluster: VMCluster, name: str) -> None:
        super().__init__()
        self.cluster = cluster
        self.name = name
        self.vm: VM | None = None

    async def close(self) -> None:
        if self.vm is not None:
            await self.cluster.fleet.destroy(self.vm)
            self.vm = None
        await super().close()

    def __repr__(self) -> str:
        where = f" at {self.vm.private_ip}" if self.vm else ""
        return f"<{type(self).__name__} {self.name}{where}: status={self.status.name}>"


class SchedulerVM(_VM):
    """The scheduler's VM. Ready once a client can complete a handshake with it."""

    role = Role.SCHEDULER

    def __init__(self, cluster: VMCluster, name: str = "scheduler") -> None:
        super().__init__(cluster, name)

    async def start(self) -> None:
        cluster, fleet = self.cluster, self.cluster.fleet
        await cluster._check_cost()  # before anything is made, the network included
        await fleet.prepare()
        self.vm = vm = await fleet.create(Role.SCHEDULER, self.name, None)
        self.address = cluster.planner.scheduler_address(vm.private_ip)
        if vm.public_ip:
            # Workers use the private address; this client reaches it from outside.
            self.external_address = cluster.planner.scheduler_address(vm.public_ip)
        if cluster.overlap_boot:
            # Its address is known before it has booted: boot the first workers meanwhile.
            fleet.prelaunch(
                [n for n in cluster.worker_spec if n not in cluster.workers], self.address
            )
        started = time.monotonic()
        await fleet.wait_reachable(
            vm,
            self.external_address or self.address,
            cluster.security.get_connection_args("client"),
        )
        cluster._log(f"Scheduler {self.address} reachable after {time.monotonic() - started:.1f}s")
        try:
            # Booted stock: how long it spent installing, and the command that saves it.
            if note := await imaging.note_provisioning(cluster.driver, vm):
                cluster._log(note)
        except CloudError as e:  # a console the cloud cannot show yet: no note, no harm
            logger.info("No provisioning time for %s: %s", self.name, e)
        await super().start()


class WorkerVM(_VM):
    """A worker's VM. Started once the cloud accepts it; the fleet's watcher reports a
    failed boot."""

    role = Role.WORKER

    def __init__(self, scheduler: str, cluster: VMCluster, name: str) -> None:
        super().__init__(cluster, name)
        self.scheduler = scheduler
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cluster = self.cluster
        try:
            self.vm = vm = await cluster.fleet.create(Role.WORKER, self.name, self.scheduler)
        except ClusterStartError as e:
            # A replacement the cloud refused is one more lost worker (replacement.py).
            if not cluster._replacements.launch_failed(self.name, e):
                raise
            await super().start()
            return
        if cluster._worker_enrollment is not None:
            cluster._worker_enrollment.add(vm.name, vm.private_ip)
        self._watchdog = asyncio.create_task(
            cluster.fleet.watch_worker_boot(
                vm,
                # Joined once is joined: one that left since is lost, not a failed boot.
                joined=lambda: (
                    self.name in cluster._workers_seen or cluster._address_of(vm) is not None
                ),
                closing=lambda: cluster.status != Status.running,
                on_failed=lambda state: cluster._replacements.boot_failed(self.name, vm, state),
            )
        )
        await super().start()

    def booting(self) -> bool:
        """Whether this VM's worker has yet to join (its boot watch still runs)."""
        return self._watchdog is not None and not self._watchdog.done()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.cluster._worker_enrollment is not None:
            self.cluster._worker_enrollment.discard(self.name)
        if self.cluster.planner.enrollment is not None:
            self.cluster.planner.enrollment.forget(self.name)
        await super().close()
