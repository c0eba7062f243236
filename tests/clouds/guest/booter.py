"""The guest booter: user-data and an address in, a real Linux guest under QEMU out.

:class:`GuestBooter` has the interface of ``clouds.booter.VMBooter``, so a cloud
stand-in can boot the user-data its API received in a real guest instead of as local
processes: real systemd, real cloud-init reading a NoCloud seed, the stock image's
``python3`` and no Docker until the user-data installs it. The VM record adds what only
a guest has: its serial console, whether it is still powered on (a guest that powers
off ends its qemu, ``-no-reboot``: the instance terminated), and boot timings.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

from ..booter import Booter
from . import qemu
from .common import CLUSTER_NETWORK, OUTSIDE_NETWORK, SERVICES_ADDRESS
from .image import GuestImage
from .network import CLUSTER_BRIDGE, OUTSIDE_BRIDGE, GuestNetwork

__all__ = ["GuestBooter", "GuestVM"]

#: Guests' addresses on the outside network start here (.1 is the services).
_FIRST_OUTSIDE_HOST = 10


class _ConsoleClock(threading.Thread):
    """Stamps each console line with when it appeared, relative to qemu's start.

    The serial log has no times of its own; benchmarks want "cloud-init finished N s
    after qemu started" and "qemu exited N s after the guest powered off". It polls the
    log (qemu never blocks on it) and records when the process exited.
    """

    def __init__(self, vm: GuestVM, interval: float = 0.2) -> None:
        super().__init__(name=f"console-clock-{vm.name}", daemon=True)
        self.vm = vm
        self.interval = interval
        self.lines: list[tuple[float, str]] = []
        self.exited_at: float | None = None
        self._halted = threading.Event()

    def run(self) -> None:
        offset, partial = 0, b""
        while True:
            exited = self.vm.process.poll() is not None
            now = time.monotonic() - self.vm.started
            with contextlib.suppress(OSError), open(self.vm.console_path, "rb") as f:
                f.seek(offset)
                data = f.read()
                offset += len(data)
                *complete, partial = (partial + data).split(b"\n")
                for line in complete:
                    self.lines.append((now, line.decode(errors="replace").rstrip("\r")))
            if exited:
                self.exited_at = now
                return
            if self._halted.wait(self.interval):
                return

    def halt(self) -> None:
        self._halted.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)


class GuestVM:
    """One guest: its qemu process, its files (overlay, seed, console) and its NICs."""

    def __init__(
        self,
        *,
        vm_id: str,
        cluster_id: str,
        name: str,
        role: str,
        address: str,
        directory: Path,
        network: GuestNetwork,
        nics: list[qemu.Nic],
        accelerator: str,
        process: subprocess.Popen[bytes],
        started: float,
    ) -> None:
        self.vm_id = vm_id
        self.cluster_id = cluster_id
        self.name = name
        self.role = role
        self.address = address
        self.directory = str(directory)
        self.network = network
        self.nics = nics
        self.accelerator = accelerator
        self.process = process
        self.started = started
        self._clock = _ConsoleClock(self)
        self._clock.start()

    @property
    def console_path(self) -> Path:
        return Path(self.directory) / "console.log"

    @property
    def pid(self) -> int:
        return self.process.pid

    def console_output(self) -> str:
        """The serial console so far: kernel, systemd, and cloud-init's and runcmd's output."""
        try:
            data = self.console_path.read_bytes()
        except OSError:
            return ""
        return data.decode(errors="replace").replace("\r\n", "\n")

    def is_running(self) -> bool:
        """Whether the guest is powered on (its qemu still runs)."""
        return self.process.poll() is None

    def processes(self) -> list[int]:
        """The PIDs of the guest on this machine: its qemu, while it runs."""
        return [self.process.pid] if self.is_running() else []

    def wait_stopped(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the guest to power off; whether it did."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def wait_for_console(self, text: str, timeout: float) -> bool:
        """Wait until ``text`` is on the console (False on timeout or power-off)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.console_output():
                return True
            if not self.is_running():
                return text in self.console_output()
            time.sleep(0.5)
        return False

    def _settled(self) -> _ConsoleClock:
        """The clock, done reading if qemu has exited (it notices within its interval)."""
        if not self.is_running():
            self._clock.join(timeout=5)
        return self._clock

    def timed_lines(self) -> list[tuple[float, str]]:
        """Console lines with the seconds since qemu started at which each was seen."""
        return list(self._settled().lines)

    def boot_to_cloud_init_done(self) -> float | None:
        """Seconds from qemu's start to ``Cloud-init v. ... finished`` on the console."""
        for seconds, line in self.timed_lines():
            if qemu.cloud_init_finished(line):
                return seconds
        return None

    def shutdown_to_exit(self) -> float | None:
        """Seconds from systemd stopping ``graphical.target`` (the start of a power-off)
        to the exit of the guest's qemu, if both were seen."""
        clock = self._settled()
        exited = clock.exited_at
        if exited is None:
            return None
        for seconds, line in clock.lines:
            if "Stopped target" in line and "Graphical Interface" in line:
                return exited - seconds
        return None

    def dask_exit_to_power_off(self) -> float | None:
        """Seconds from the boot script's "dask ... exited" line to the guest's last
        console line, once it has powered off; None if either is missing."""
        lines = self.timed_lines()
        exited = next(
            (t for t, line in lines if "dask-secure-cloud: dask " in line and " exited " in line),
            None,
        )
        if self.is_running() or exited is None or not lines:
            return None
        return lines[-1][0] - exited

    def console_text(self) -> str:
        """The console as read so far, also after :meth:`stop` removed its file."""
        return "\n".join(line for _, line in self.timed_lines())

    def stop(self, grace: float = 5.0) -> None:
        """Kill qemu (SIGTERM, then SIGKILL after ``grace``), remove its taps and files."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._clock.halt()
        for nic in self.nics:
            self.network.remove_tap(nic.tap)
        shutil.rmtree(self.directory, ignore_errors=True)


class GuestBooter(Booter[GuestVM]):
    """Boots guests of ``image`` on ``network`` under ``directory``; mirrors ``VMBooter``.

    ``accelerator`` is ``"kvm"`` or ``"tcg"``; by default :func:`qemu.accelerator`
    probes which works here, once per process. ``apparmor=False`` boots the guests'
    kernel with AppArmor off (see :func:`qemu.qemu_command`).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        network: GuestNetwork,
        image: GuestImage,
        accelerator: str | None = None,
        apparmor: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.network = network
        self.image = image
        self.apparmor = apparmor
        self.accelerator = accelerator or qemu.accelerator(image.kernel)
        self.vms: dict[str, GuestVM] = {}
        self._lock = threading.Lock()
        #: Cluster addresses drivers have handed out for guests still being booted.
        self.reserved_addresses: set[str] = set()
        #: Whether each guest (by name) was given a route out.
        self.egress: dict[str, bool] = {}
        #: The user-data each guest's NoCloud seed carried (by name).
        self.seeds: dict[str, bytes] = {}
        #: The image each guest booted (by VM id).
        self.booted_from: dict[str, GuestImage] = {}

    def _outside_address(self) -> str:
        taken = {nic.address for vm in self.vms.values() for nic in vm.nics}
        for host in list(OUTSIDE_NETWORK.hosts())[_FIRST_OUTSIDE_HOST - 1 :]:
            address = f"{host}/{OUTSIDE_NETWORK.prefixlen}"
            if address not in taken:
                return address
        raise RuntimeError("no address left on the outside network")

    def boot(
        self,
        user_data: bytes,
        *,
        address: str,
        cluster_id: str,
        name: str,
        role: str,
        egress: bool = True,
        apparmor: bool | None = None,
        image: GuestImage | None = None,
    ) -> GuestVM:
        """Start a guest that boots ``user_data`` with ``address`` on the cluster network.

        With ``egress`` it has a second NIC on the outside network and its default route
        via ``SERVICES_ADDRESS``; without, no route beyond the cluster network at all.
        ``apparmor`` and ``image`` override the booter's settings for this guest.
        Returns once qemu runs; the guest boots on (about a minute under TCG).
        """
        if apparmor is None:
            apparmor = self.apparmor
        # Drivers boot from several threads at once: one at a time here, so no two
        # guests ever get the same outside address (it takes well under a second).
        with self._lock:
            return self._boot(
                user_data, address, cluster_id, name, role, egress, apparmor, image or self.image
            )

    def _boot(
        self,
        user_data: bytes,
        address: str,
        cluster_id: str,
        name: str,
        role: str,
        egress: bool,
        apparmor: bool,
        image: GuestImage,
    ) -> GuestVM:
        if ipaddress.ip_address(address) not in CLUSTER_NETWORK:
            raise ValueError(f"{address} is not on the cluster network {CLUSTER_NETWORK}")
        if any(vm.address == address for vm in self.vms.values()):
            raise ValueError(f"{address} is taken by another guest")
        vm_id = f"{cluster_id}/{name}"
        if vm_id in self.vms:
            raise ValueError(f"a VM {vm_id} is already running")
        directory = self.directory / cluster_id / name
        directory.mkdir(parents=True, mode=0o700)
        index = self.network.unique_index()
        nics = [
            qemu.Nic(
                tap=f"g{index}c",
                bridge=CLUSTER_BRIDGE,
                mac=_mac(index, 0),
                address=f"{address}/{CLUSTER_NETWORK.prefixlen}",
            )
        ]
        if egress:
            nics.append(
                qemu.Nic(
                    tap=f"g{index}o",
                    bridge=OUTSIDE_BRIDGE,
                    mac=_mac(index, 1),
                    address=self._outside_address(),
                    gateway=SERVICES_ADDRESS,
                )
            )
        made: list[str] = []
        try:
            for nic in nics:
                made.append(self.network.tap(nic.tap, nic.bridge))
            qemu.make_overlay(directory / "disk.qcow2", image.disk)
            qemu.make_seed(
                directory / "seed.iso",
                user_data,
                instance_id=f"i-{uuid.uuid4().hex[:17]}",
                hostname=name,
                nics=nics,
            )
            command = qemu.qemu_command(
                accel=self.accelerator,
                kernel=image.kernel,
                disk=directory / "disk.qcow2",
                seed=directory / "seed.iso",
                nics=nics,
                console=directory / "console.log",
                name=name,
                apparmor=apparmor,
            )
            with open(directory / "qemu.log", "wb") as log:
                started = time.monotonic()
                # At a lower CPU priority: the process-VM tests that run beside the
                # guests (ci/test.sh) have timeouts of seconds, the guests of minutes.
                process = subprocess.Popen(
                    ["nice", "-n", "10", *self.network.exec_prefix, *command],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except BaseException:
            for tap in made:
                self.network.remove_tap(tap)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        vm = GuestVM(
            vm_id=vm_id,
            cluster_id=cluster_id,
            name=name,
            role=role,
            address=address,
            directory=directory,
            network=self.network,
            nics=nics,
            accelerator=self.accelerator,
            process=process,
            started=started,
        )
        self.vms[vm_id] = vm
        self.egress[name] = egress
        self.seeds[name] = user_data
        self.booted_from[vm_id] = image
        # A wrong option or a tap that cannot be opened ends qemu at once: say why here.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(0.3)
            error = (directory / "qemu.log").read_text(errors="replace")
            self.stop(vm_id)
            raise RuntimeError(f"qemu for {vm_id} exited at once ({process.returncode}): {error}")
        return vm

    def capture(self, vm_id: str) -> GuestImage:
        """An image of the powered-off guest ``vm_id``: its disk as it left it (the
        image's own disk with the guest's writes), and the kernel it booted."""
        vm = self.vms[vm_id]
        if vm.is_running():
            raise RuntimeError(f"{vm_id} still runs: a disk is captured once powered off")
        started = time.monotonic()
        directory = self.directory / "images" / uuid.uuid4().hex[:12]
        directory.mkdir(parents=True)
        overlay, disk = Path(vm.directory) / "disk.qcow2", directory / "disk.raw"
        subprocess.run(
            ["qemu-img", "convert", "-O", "raw", str(overlay), str(disk)],
            check=True,
            capture_output=True,
        )
        os.symlink(self.booted_from[vm_id].kernel, directory / "vmlinuz")
        #: How long the capture took, for the benchmarks.
        self.capture_seconds = time.monotonic() - started
        return GuestImage(f"captured-{vm.name}", directory)


def _mac(index: int, nic: int) -> str:
    """A locally administered MAC unique on this network: guest index and NIC number."""
    return f"52:54:00:{(index >> 8) & 0xFF:02x}:{index & 0xFF:02x}:{nic:02x}"
