"""``LocalVMCluster``: the cloud boot path, on this machine, with no cloud account.

Each "VM" is a process group with its own directory (its root filesystem) and its own
loopback address: all of 127.0.0.0/8 reaches this machine on Linux, so the scheduler
listens on 127.A.B.1:8786 exactly as it would on a cloud VM. Where only 127.0.0.1
exists (macOS), every VM shares it and the scheduler gets a free port instead.

The VMs boot from the very user-data a cloud would receive, through the local
cloud-init runner in :mod:`dask_secure_cloud.vmrunner`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import os
import random
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from dask.system import CPU_COUNT
from distributed.system import MEMORY_LIMIT

from .. import audit
from ..cloudinit import LIMITS, BootPlan
from ..cluster import VMCluster
from ..credentials import Role
from ..driver import VM, ClusterSummary, Driver, VMRequest, summarize
from ..options import ClusterOptions, LocalOptions
from ..plan import BootPlanner
from ..vmrunner import LocalVM, boot, find_vms

__all__ = ["LocalDriver", "LocalVMCluster", "loopback_subnet", "machine_share"]


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def loopback_subnet(ports: tuple[int, ...], attempts: int = 50) -> ipaddress.IPv4Network | None:
    """A random 127.A.B.0/24 whose ``.1`` can bind ``ports``; ``None`` if 127/8 is absent.

    A random subnet per cluster lets several clusters (and the tests) run side by side
    on the scheduler's standard port.
    """
    if not _bindable("127.0.0.2", 0):
        return None
    rng = random.SystemRandom()
    for _ in range(attempts):
        subnet = ipaddress.IPv4Network(f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.0/24")
        if all(_bindable(str(subnet[1]), port) for port in ports):
            return subnet
    return None


class LocalDriver(Driver):
    """VMs as process groups under ``directory/CLUSTER/NAME``, one loopback address each."""

    provider = "local"
    user_data_limit = LIMITS["local"]
    # Listing is a directory scan here: a failed boot is reported within a second.
    watch_interval = 1.0

    def __init__(
        self,
        directory: str | os.PathLike[str],
        subnet: ipaddress.IPv4Network | None,
        extra_path: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.subnet = subnet
        self.extra_path = extra_path
        self._vms: dict[str, LocalVM] = {}
        self._addresses = self._address_iter()

    def _address_iter(self) -> Iterator[str]:
        if self.subnet is None:
            while True:
                yield "127.0.0.1"
        # .1 is the scheduler's; workers take the rest, then the following subnets.
        net = self.subnet
        while True:
            yield from (str(host) for host in net.hosts() if host != net[1])
            net = ipaddress.IPv4Network((int(net.network_address) + 256, 24))

    def _address_for(self, role: Role) -> str:
        if role is Role.SCHEDULER:
            return str(self.subnet[1]) if self.subnet is not None else "127.0.0.1"
        return next(self._addresses)

    def where(self) -> str:
        return "this machine"

    def enrollment_port(self, role: Role, scheduler_port: int) -> int:
        # On one shared address, each worker answers on a port of its own.
        if self.subnet is None and role is Role.WORKER:
            return _free_port()
        return scheduler_port

    async def create(self, request: VMRequest) -> VM:
        address = self._address_for(request.role)
        vm = await asyncio.to_thread(
            boot,
            request.user_data,
            directory=self.directory / request.cluster_id / request.name,
            address=address,
            cluster_id=request.cluster_id,
            name=request.name,
            role=request.role.value,
            extra_path=self.extra_path,
        )
        self._vms[vm.vm_id] = vm
        return self._record(vm)

    @staticmethod
    def _record(vm: LocalVM) -> VM:
        return VM(
            id=vm.vm_id,
            name=vm.name,
            role=Role(vm.role),
            cluster_id=vm.cluster_id,
            private_ip=vm.address,
        )

    def _local(self, vm: VM) -> LocalVM | None:
        found = self._vms.get(vm.id)
        if found is None:
            found = next(
                (v for v in find_vms(self.directory, vm.cluster_id) if v.vm_id == vm.id), None
            )
        return found

    async def destroy(self, vm: VM) -> None:
        local = self._local(vm)
        if local is not None:
            await asyncio.to_thread(local.stop)
            self._vms.pop(vm.id, None)

    async def list(self, cluster_id: str) -> list[VM]:
        vms = await asyncio.to_thread(find_vms, self.directory, cluster_id)
        return [self._record(vm) for vm in vms]

    async def states(self, cluster_id: str) -> dict[str, str]:
        def scan() -> dict[str, str]:
            found = {}
            for local in find_vms(self.directory, cluster_id):
                try:
                    found[self._record(local).id] = (
                        "running" if local.is_running() else "terminated"
                    )
                except OSError:  # /proc could not be read: nothing learnt
                    continue
            return found

        return await asyncio.to_thread(scan)

    async def state(self, vm: VM) -> str:
        local = self._local(vm)
        if local is None:
            return "terminated"  # its directory is gone: deleted
        try:
            running = await asyncio.to_thread(local.is_running)
        except OSError:  # /proc could not be read: nothing learnt
            return "unknown"
        return "running" if running else "terminated"

    async def console_output(self, vm: VM) -> str:
        local = self._local(vm)
        return await asyncio.to_thread(local.console_output) if local else ""

    async def clusters(self) -> list[ClusterSummary]:
        """Every VM directory, with its state: a VM whose processes ended keeps its
        directory (and its key) until it is deleted, so it is listed, as
        ``"terminated"``: it costs nothing."""

        def scan() -> list[tuple[str, datetime.datetime | None, str | None, str]]:
            found = []
            for vm in find_vms(self.directory):
                try:
                    stamp = os.stat(vm.directory).st_mtime
                except OSError:
                    continue
                try:
                    state = "running" if vm.is_running() else "terminated"
                except OSError:  # /proc could not be read: nothing learnt
                    state = "unknown"
                created = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc)
                found.append((vm.cluster_id, created, audit.creator(), state))
            return found

        return summarize(await asyncio.to_thread(scan))

    async def release(self, cluster_id: str) -> None:
        with contextlib.suppress(OSError):
            (self.directory / cluster_id).rmdir()


def machine_share(
    worker_options: Mapping[str, Any],
    workers: int,
    *,
    cores: int | None = None,
    memory: int | None = None,
) -> dict[str, int]:
    """Each worker process's share of this machine when ``workers`` worker VMs share it:
    the ``nthreads`` and ``memory_limit`` that ``worker_options`` leave unset.

    Left to Dask, every worker takes all cores and all memory, as if it had a VM of its
    own: three of them claimed 6 cores and 70 GiB of a 2-core, 24 GiB machine. Cores are
    split as ``LocalCluster`` splits them (at least one thread each), memory evenly, by
    the processes of every VM (``nworkers`` per VM). An ``nworkers`` that is not a
    number ("auto") leaves both to Dask, which sizes its own processes.
    """
    cores = CPU_COUNT if cores is None else cores
    memory = MEMORY_LIMIT if memory is None else memory
    given = {key.replace("-", "_") for key in worker_options}
    per_vm = worker_options.get("nworkers", 1)
    if isinstance(per_vm, bool) or not isinstance(per_vm, int) or per_vm < 1:
        return {}
    processes = max(1, workers) * per_vm
    share = {}
    if "nthreads" not in given:
        share["nthreads"] = max(1, cores // processes)
    if "memory_limit" not in given:
        share["memory_limit"] = max(1, memory // processes)
    return share


class _SharingPlanner(BootPlanner):
    """Tells each worker VM, as it is made, its share of the machine at the cluster's
    size at that moment: a cluster started with no worker (the JupyterLab sidebar's) and
    scaled to three splits the machine as one started with three."""

    def __init__(self, *args: Any, workers: Callable[[], int], **kwargs: Any) -> None:
        self._workers = workers
        super().__init__(*args, **kwargs)

    def plan(self, role: Role, name: str, scheduler_address: str | None) -> BootPlan:
        plan = super().plan(role, name, scheduler_address)
        if role is not Role.WORKER:
            return plan
        share = machine_share(self.options.worker_options, self._workers())
        flags = [word for key, value in share.items() for word in (_flag(key), str(value))]
        return dataclasses.replace(plan, command=(*plan.command, *flags))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def default_directory() -> Path:
    """A directory only this user can enter, for the VMs' root filesystems."""
    path = Path(tempfile.gettempdir()) / f"dask-secure-cloud-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_uid != os.getuid() or path.stat().st_mode & 0o077:
        raise PermissionError(
            f"{path} is not private to this user; pass directory= to LocalVMCluster"
        )
    return path


class LocalVMCluster(VMCluster):
    """A secure Dask cluster of local "VMs", booted exactly as cloud VMs are.

    By default the VMs run the client's own Python (``runtime="native"``) rather than a
    container, and split this machine's cores and memory between the workers: each
    worker VM gets its share of the cluster's size when it is made (``scale`` included),
    unless ``worker_options`` set ``nthreads`` or ``memory_limit``.

    Examples
    --------
    >>> from dask.distributed import Client
    >>> with LocalVMCluster(n_workers=2) as cluster, Client(cluster) as client:
    ...     client.submit(sum, [1, 2]).result()
    3
    """

    provider = "local"
    Options = LocalOptions
    # Every "VM" shares this machine's cores: booting them all at once only adds
    # contention (measured: 6.4 s against 4.6 s to ready on two cores).
    overlap_boot = False

    @classmethod
    def native_python(cls, options: ClusterOptions) -> str:
        # The client's own interpreter, whatever PATH says: a virtualenv used by path
        # (a Jupyter kernel, an IDE) is not on PATH, and its packages are the ones wanted.
        return sys.executable

    def make_planner(self, options: Any) -> BootPlanner:
        return _SharingPlanner(
            options,
            self.cluster_id,
            self.driver,
            native_python=self.native_python(options),
            workers=self._requested_workers,
        )

    def _requested_workers(self) -> int:
        """The cluster's size as asked for now: ``scale(n)`` (the sidebar's, adaptive's)
        writes ``worker_spec`` before it makes the new workers; before the start, the
        ``n_workers`` option."""
        spec = getattr(self, "worker_spec", None)
        return len(spec) if spec is not None else self.options.n_workers

    @classmethod
    def setup(
        cls, options: LocalOptions, driver: Driver | None = None, **extra: Any
    ) -> tuple[LocalOptions, Driver]:
        changes: dict[str, Any] = {}
        subnet = loopback_subnet((options.scheduler_port, options.dashboard_port))
        if subnet is None:
            # One shared address: the scheduler's ports must be free ones.
            changes.update(scheduler_port=_free_port(), dashboard_port=_free_port())
        options = dataclasses.replace(options, **changes)
        directory = options.directory or default_directory()
        return options, driver or LocalDriver(directory, subnet)
