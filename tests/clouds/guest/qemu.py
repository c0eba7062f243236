"""How one guest is started: the accelerator, the NoCloud seed and the qemu command line.

On the machines this suite runs on, ``/dev/kvm`` may exist without working (a PVM device:
a stock kernel dies with "KVM internal error"), so :func:`accelerator` decides at run
time: KVM only when the CPU advertises VT-x/AMD-V *and* a short probe boot of the
image's kernel under KVM reaches its own code; TCG otherwise.

Guests boot the image's kernel directly (no bootloader, no initrd: the cloud kernel has
NVMe and ext4 built in). Root is namespace 1 of an NVMe controller and the NoCloud seed
namespace 2 of the same controller, so the names (``nvme0n1``, ``nvme0n2``) never
depend on probe order. Every NIC is a tap on a bridge of the test namespace; there is no
user-mode networking, so a guest reaches nothing the namespace does not hold.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Nic",
    "accelerator",
    "accelerator_args",
    "kvm_possible",
    "make_seed",
    "network_config",
    "qemu_command",
]

QEMU = "qemu-system-x86_64"
MEMORY_MB = 640  # Docker's engine wants a little more than the 512 MB a bare boot needs
KERNEL_ARGS = "console=ttyS0 root=/dev/nvme0n1 rw panic=-1"
_PROBE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Nic:
    """One guest NIC: the tap it is plugged into and the address the guest gives it."""

    tap: str
    bridge: str
    mac: str
    address: str  # with prefix length, e.g. "10.77.0.10/24"
    gateway: str | None = None


def kvm_possible() -> bool:
    """``/dev/kvm`` is usable by us and the CPU says it has hardware virtualisation."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"vmx", "svm"})


def accelerator_args(accel: str) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    # The measured fastest TCG setting on these machines (qemu64 is no faster).
    return ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max"]


def _kvm_boots(kernel: Path) -> bool:
    """Boot ``kernel`` under KVM with no root disk: reaching its own "unable to mount
    root" panic proves the CPU emulation runs a stock kernel; a KVM internal error
    stops the guest silently instead, so the probe times out."""
    with tempfile.TemporaryDirectory(prefix="kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        args = [
            QEMU,
            *("-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none"),
            "-no-reboot",
            *accelerator_args("kvm"),
            *("-m", "256", "-kernel", str(kernel)),
            *("-append", "console=ttyS0 panic=-1"),
            *("-serial", f"file:{console}"),
        ]
        try:
            result = subprocess.run(args, capture_output=True, timeout=_PROBE_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            return False
        text = console.read_text(errors="replace") if console.exists() else ""
        return result.returncode == 0 and "Kernel panic" in text


_chosen: dict[Path, str] = {}


def accelerator(kernel: Path) -> str:
    """``"kvm"`` or ``"tcg"`` for guests of this kernel, probed once per process."""
    if kernel not in _chosen:
        _chosen[kernel] = "kvm" if kvm_possible() and _kvm_boots(kernel) else "tcg"
    return _chosen[kernel]


def network_config(nics: list[Nic]) -> dict[str, object]:
    """network-config v2: static addresses matched by MAC; a route only where given."""
    ethernets: dict[str, object] = {}
    for index, nic in enumerate(nics):
        entry: dict[str, object] = {
            "match": {"macaddress": nic.mac},
            "set-name": f"eth{index}",
            "addresses": [nic.address],
        }
        if nic.gateway:
            entry["gateway4"] = nic.gateway
        ethernets[f"eth{index}"] = entry
    return {"version": 2, "ethernets": ethernets}


def make_seed(
    path: Path, user_data: bytes, *, instance_id: str, hostname: str, nics: list[Nic]
) -> None:
    """The NoCloud ``cidata`` ISO: user-data verbatim, meta-data, network-config."""
    with tempfile.TemporaryDirectory(prefix="cidata-", dir=path.parent) as tmp:
        files = Path(tmp)
        (files / "user-data").write_bytes(user_data)
        # JSON is YAML: values are quoted whatever the names hold.
        meta = f"instance-id: {json.dumps(instance_id)}\nlocal-hostname: {json.dumps(hostname)}\n"
        (files / "meta-data").write_text(meta)
        (files / "network-config").write_text(json.dumps(network_config(nics), indent=1))
        result = subprocess.run(
            [
                "genisoimage",
                "-quiet",
                *("-output", str(path)),
                *("-volid", "cidata"),
                "-joliet",
                "-rock",
                *(str(files / name) for name in ("user-data", "meta-data", "network-config")),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"genisoimage failed: {result.stderr}")


def make_overlay(path: Path, base: Path) -> None:
    """A qcow2 overlay on the image's raw disk: the guest writes there, never to the image."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(path)],
        check=True,
        capture_output=True,
    )


def qemu_command(
    *,
    accel: str,
    kernel: Path,
    disk: Path,
    seed: Path,
    nics: list[Nic],
    console: Path,
    name: str,
    apparmor: bool = True,
) -> list[str]:
    """The qemu command line of one guest (1 vCPU, ``MEMORY_MB``, no display).

    ``apparmor=False`` boots the kernel with AppArmor off, as on images whose kernel does
    not enforce it: Docker then needs no profile, and the guest skips the minutes TCG
    spends compiling AppArmor profiles when the apparmor package is installed."""
    kernel_args = KERNEL_ARGS if apparmor else f"{KERNEL_ARGS} apparmor=0"
    args = [
        QEMU,
        *("-name", name),
        *("-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none"),
        "-no-reboot",
        *accelerator_args(accel),
        *("-smp", "1", "-m", str(MEMORY_MB)),
        *("-kernel", str(kernel), "-append", kernel_args),
        # The overlay is thrown away with the guest: flushes need not reach this
        # machine's disk (dpkg and containerd flush after every file they write).
        *("-drive", f"file={disk},format=qcow2,if=none,id=root,discard=unmap,cache=unsafe"),
        *("-drive", f"file={seed},format=raw,if=none,id=seed,read-only=on"),
        *("-device", "nvme,id=nvme0,serial=guest"),
        *("-device", "nvme-ns,drive=root,bus=nvme0,nsid=1"),
        *("-device", "nvme-ns,drive=seed,bus=nvme0,nsid=2"),
        *("-serial", f"file:{console}"),
    ]
    for index, nic in enumerate(nics):
        args += [
            *("-netdev", f"tap,id=net{index},ifname={nic.tap},script=no,downscript=no"),
            *("-device", f"virtio-net-pci,netdev=net{index},mac={nic.mac}"),
        ]
    return args


_FINISHED = re.compile(r"Cloud-init v\. \S+ finished at")


def cloud_init_finished(line: str) -> bool:
    """Whether ``line`` is cloud-init's final message on the console."""
    return bool(_FINISHED.search(line))
