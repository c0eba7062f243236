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
import datetime
import ipaddress
import os
import random
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import audit, config
from ..cloudinit import LIMITS
from ..cluster import VMCluster
from ..credentials import Role
from ..driver import VM, ClusterSummary, Driver, VMRequest, summarize
from ..vmrunner import LocalVM, boot, find_vms

__all__ = ["LocalDriver", "LocalVMCluster", "loopback_subnet"]


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

    async def state(self, vm: VM) -> str:
        local = self._local(vm)
        if local is None:
            return "terminated"
        return "running" if await asyncio.to_thread(local.is_running) else "terminated"

    async def console_output(self, vm: VM) -> str:
        local = self._local(vm)
        return await asyncio.to_thread(local.console_output) if local else ""

    async def clusters(self) -> list[ClusterSummary]:
        def scan() -> list[tuple[str, datetime.datetime | None, str | None]]:
            found = []
            for vm in find_vms(self.directory):
                try:
                    stamp = os.stat(vm.directory).st_mtime
                except OSError:
                    continue
                created = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc)
                found.append((vm.cluster_id, created, audit.creator()))
            return found

        return summarize(await asyncio.to_thread(scan))

    async def release(self, cluster_id: str) -> None:
        with contextlib.suppress(OSError):
            (self.directory / cluster_id).rmdir()


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

    Every option of :class:`~dask_secure_cloud.cluster.VMCluster` applies; by default
    the VMs run the client's own Python (``runtime="native"``) rather than a container.

    Parameters
    ----------
    directory
        Where the VMs' directories go (default: a private directory in the system's
        temporary directory). Each is deleted when its VM is.

    Examples
    --------
    >>> from dask.distributed import Client
    >>> with LocalVMCluster(n_workers=2) as cluster, Client(cluster) as client:
    ...     client.submit(sum, [1, 2]).result()
    3
    """

    provider = "local"

    def _default_python(self, configured: str | None) -> str:
        # The client's own interpreter, whatever PATH says: a virtualenv used by path
        # (a Jupyter kernel, an IDE) is not on PATH, and its packages are the ones wanted.
        return configured or sys.executable

    # Every "VM" shares this machine's cores: booting them all at once only adds
    # contention (measured: 6.4 s against 4.6 s to ready on two cores).
    overlap_boot = False

    def __init__(
        self,
        *,
        directory: str | os.PathLike[str] | None = None,
        python: str | None = None,
        scheduler_port: int | None = None,
        dashboard_port: int | None = None,
        worker_options: dict[str, Any] | None = None,
        n_workers: int | None = None,
        **kwargs: Any,
    ) -> None:
        directory = config.option(self.provider, "directory", directory) or default_directory()
        scheduler_port = config.port(
            config.option(self.provider, "scheduler_port", scheduler_port), "scheduler_port"
        )
        dashboard_port = config.port(
            config.option(self.provider, "dashboard_port", dashboard_port), "dashboard_port"
        )
        subnet = loopback_subnet((scheduler_port, dashboard_port))
        if subnet is None:
            # One shared address: the scheduler's ports must be free ones.
            scheduler_port, dashboard_port = _free_port(), _free_port()
        n_workers = config.option(self.provider, "n_workers", n_workers)
        worker_options = dict(config.option(self.provider, "worker_options", worker_options) or {})
        if isinstance(n_workers, int) and n_workers > 0:
            # The "VMs" share this machine's cores: split them, as LocalCluster does.
            worker_options.setdefault("nthreads", max(1, (os.cpu_count() or 1) // n_workers))
        super().__init__(
            LocalDriver(directory, subnet),
            python=python,
            scheduler_port=scheduler_port,
            dashboard_port=dashboard_port,
            worker_options=worker_options,
            n_workers=n_workers,
            **kwargs,
        )
