"""The VM booter shared by every cloud stand-in: user-data and an address in, a VM out.

A stand-in API that "creates" a VM calls :meth:`VMBooter.boot` with the user-data it
received, the address it assigned and whether the cloud would give that VM a route out
(``egress``, from the stand-in's own model of the network); the VM then runs here through the same local
cloud-init runner that ``LocalVMCluster`` uses, with :data:`SHIM_PATH` first on its
``PATH``: a ``docker`` stand-in, so container user-data runs, and a ``python3`` that is
the interpreter running the tests (``sys.executable``), so a VM's ``python3`` has the
packages the tests were installed with, whatever ``python3`` the machine's ``PATH`` finds.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from dask_secure_cloud.vmrunner import LocalVM, boot


def _interpreter_dir() -> str:
    """A directory whose ``python3`` runs this interpreter: a virtualenv used by its path
    (not activated) is not on ``PATH``, and the process VMs must run it, not another
    Python that happens to be there. A wrapper, not a symlink: a symlink to a
    virtualenv's ``python`` loses the virtualenv (Python finds ``pyvenv.cfg`` beside the
    path it was started by)."""
    directory = tempfile.mkdtemp(prefix="dsc-python3-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    wrapper = Path(directory) / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    return directory


#: Put first on a process VM's ``PATH``: this interpreter as ``python3``, and ``docker``.
SHIM_PATH = os.pathsep.join([_interpreter_dir(), str(Path(__file__).parent / "bin")])


class _Stoppable(Protocol):
    def stop(self) -> None: ...


VMT = TypeVar("VMT", bound=_Stoppable)


class BootedVM(Protocol):
    """What a stand-in needs of a booted VM: its id, its console, whether it runs."""

    vm_id: str

    def console_output(self) -> str: ...

    def is_running(self) -> bool: ...


class StandInBooter(Protocol):
    """What a stand-in needs of a booter: :class:`VMBooter` (process VMs) and
    ``clouds.guest.booter.GuestBooter`` (QEMU guests) both have it."""

    @property
    def vms(self) -> Mapping[str, BootedVM]: ...

    def boot(
        self,
        user_data: bytes,
        *,
        address: str,
        cluster_id: str,
        name: str,
        role: str,
        egress: bool = True,
    ) -> BootedVM: ...

    def stop(self, vm_id: str) -> None: ...

    def stop_all(self) -> None: ...


class Booter(Generic[VMT]):
    """What every booter (process VMs, QEMU guests) shares: the VMs it booted, by id,
    and how they end. A stand-in takes either."""

    vms: dict[str, VMT]

    def stop(self, vm_id: str) -> None:
        vm = self.vms.pop(vm_id, None)
        if vm is not None:
            vm.stop()

    def stop_all(self) -> None:
        for vm_id in list(self.vms):
            self.stop(vm_id)


class VMBooter(Booter[LocalVM]):
    """Boots VMs under ``directory`` and stops every one of them on :meth:`stop_all`."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.vms: dict[str, LocalVM] = {}
        #: Whether the stand-in gave each VM (by name) a route out. A process VM
        #: shares this machine's network whatever it says; a guest gets only that.
        self.egress: dict[str, bool] = {}

    def boot(
        self,
        user_data: bytes,
        *,
        address: str,
        cluster_id: str,
        name: str,
        role: str,
        egress: bool = True,
    ) -> LocalVM:
        vm = boot(
            user_data,
            directory=self.directory / cluster_id / name,
            address=address,
            cluster_id=cluster_id,
            name=name,
            role=role,
            extra_path=SHIM_PATH,
        )
        self.vms[vm.vm_id] = vm
        self.egress[name] = egress
        return vm
