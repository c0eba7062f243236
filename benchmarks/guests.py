"""Boot figures on real guests (QEMU, systemd, cloud-init). Prints numbers, asserts none.

    python benchmarks/guests.py              # everything (about 20 minutes on 2 cores)
    python benchmarks/guests.py boot         # one guest: boot to cloud-init done, KVM vs TCG
    python benchmarks/guests.py cluster      # 1 scheduler + 2 workers: stock docker, stock
                                             # native, hand-baked, `image build`; ratios
    python benchmarks/guests.py images       # the same, hand-baked and `image build` only

Needs root (a network namespace, taps) and the test bed's apt packages (see ci/test.sh).
The guests share this machine's cores, so the cluster figures are side by side in one
run: compare them with each other, not with a cloud. "What dominates" is read off each
VM's console, where the boot script prints every step with its duration.

The "built" image is made as ``dask secure-cloud image build gcp -o runtime=native`` makes
one, through Compute Engine's stand-in booting the builder as a guest: the image is the
builder guest's disk once it powered off.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dask
import distributed
from distributed import Client

# This checkout's test bed and package, whatever else is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.auth.credentials import AnonymousCredentials

from dask_secure_cloud import GCPCluster
from dask_secure_cloud.imaging.build import build

from clouds.gce import GCEStandIn
from clouds.guest import qemu
from clouds.guest.booter import GuestBooter
from clouds.guest.common import SERVICES_ADDRESS
from clouds.guest.container_image import dask_images
from clouds.guest.driver import GuestCluster, GuestDriver
from clouds.guest.image import GuestImage, baked_image, stock_image
from clouds.guest.internet import Services
from clouds.guest.mirror_apt import apt_repository
from clouds.guest.mirror_pypi import dask_requirements, wheelhouse
from clouds.guest.network import GuestNetwork

_STEP = re.compile(r"dask-secure-cloud: ([\w-]+): done in ([\d.]+)s")
_READY = re.compile(r"ready to start dask (\w+) after ([\d.]+)s")
_POWEROFF = "#cloud-config\nruncmd:\n  - [sh, -c, 'echo benchmark-done; poweroff']\n"


def boot(network: GuestNetwork, directory: Path) -> None:
    """One stock guest: seconds from qemu start to ``Cloud-init ... finished``."""
    image = stock_image()
    accelerators = ["tcg"]
    if qemu.kvm_possible() and qemu.accelerator(image.kernel) == "kvm":
        accelerators.insert(0, "kvm")
    else:
        print("boot          KVM: unavailable here (no VT-x/AMD-V, or stock kernels fail)")
    for accel in accelerators:
        booter = GuestBooter(directory / accel, network, image, accelerator=accel)
        times = []
        for i in range(2):
            vm = booter.boot(
                _POWEROFF.encode(),
                address=f"10.77.0.{200 + i}",
                cluster_id="bench",
                name=f"{accel}-{i}",
                role="worker",
                egress=False,
            )
            vm.wait_stopped(300)
            done = vm.boot_to_cloud_init_done()
            if done is not None:
                times.append(done)
            booter.stop(vm.vm_id)
        shown = ", ".join(f"{t:.1f}" for t in times) or "never"
        print(f"boot          {accel.upper()}: qemu start to cloud-init finished: {shown} s")


async def _cluster(booter: GuestBooter, runtime: str) -> tuple[float, dict[str, str]]:
    driver = GuestDriver(booter)
    started = time.monotonic()
    async with GuestCluster(
        driver, n_workers=2, runtime=runtime, boot_timeout="20m", asynchronous=True
    ) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=1200)
            ready = time.monotonic() - started
            consoles = {vm.name: booter.vms[vm.id].console_output() for vm in driver.created}
    return ready, consoles


def _steps(consoles: dict[str, str]) -> str:
    """Median seconds per boot step over the VMs, largest first: what dominates."""
    seen: dict[str, list[float]] = {}
    for console in consoles.values():
        for step, seconds in _STEP.findall(console):
            seen.setdefault(step, []).append(float(seconds))
        for _, seconds in _READY.findall(console):
            seen.setdefault("boot script to dask", []).append(float(seconds))
    ranked = sorted(seen.items(), key=lambda kv: -statistics.median(kv[1]))
    return ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in ranked)


def built_image(network: GuestNetwork, directory: Path) -> tuple[GuestImage, float]:
    """An image made by ``image build`` (native runtime) on a guest, and its build's
    seconds: Compute Engine's stand-in boots the builder, the image is its disk."""
    booter = GuestBooter(directory, network, stock_image())
    stand_in = GCEStandIn(booter, "dsc-bench", "us-central1-a", "10.77.0.0/25")
    url = stand_in.start()
    options = {
        "project": "dsc-bench",
        "zone": "us-central1-a",
        "api_endpoint": url,
        "credentials": AnonymousCredentials(),
        "use_private_ip": True,
        "boot_timeout": "20m",
        "runtime": "native",
    }
    try:
        started = time.monotonic()
        with dask.config.set({"distributed.comm.timeouts.connect": "180s"}):
            made = asyncio.run(build(GCPCluster, options, poll_interval=5))
        seconds = time.monotonic() - started
        return stand_in.images[made.name]["_held"], seconds
    finally:
        stand_in.stop()


def cluster(network: GuestNetwork, directory: Path, stock: bool = True) -> None:
    """Create to all workers joined, 1 scheduler + 2 workers, per runtime and image,
    side by side in one run; then the ratios the fast start is judged by (``stock``
    False: the hand-baked and the built image alone)."""
    services = Services.start(
        network.exec_prefix,
        SERVICES_ADDRESS,
        apt_repository(),
        wheelhouse(dask_requirements()),
        dask_images(),
        directory / "services",
    )
    try:
        image, build_seconds = built_image(network, directory / "build")
        print(f"image build   native runtime on a stock guest: {build_seconds:6.1f} s")
        cases: list[tuple[str, GuestImage, str]] = [
            ("baked, native", baked_image(dask.__version__, distributed.__version__), "native"),
            ("built, native", image, "native"),
        ]
        if stock:
            cases[:0] = [
                ("stock, docker", stock_image(), "docker"),
                ("stock, native", stock_image(), "native"),
            ]
        joined: dict[str, float] = {}
        for label, image, runtime in cases:
            booter = GuestBooter(directory / label.replace(", ", "-"), network, image)
            ready, consoles = asyncio.run(_cluster(booter, runtime))
            joined[label] = ready
            print(f"cluster       {label:14} create to 2 workers joined: {ready:6.1f} s")
            print(f"              median step seconds: {_steps(consoles)}")
        built = joined["built, native"]
        ratios = [f"built/baked {built / joined['baked, native']:.2f}x (target <= 1.2)"]
        if stock:
            ratios += [
                f"stock docker/built {joined['stock, docker'] / built:.2f}x (target >= 3)",
                f"stock native/built {joined['stock, native'] / built:.2f}x",
            ]
        print(f"ratios        {'; '.join(ratios)}")
    finally:
        services.stop()


def main(argv: list[str]) -> None:
    which = argv or ["boot", "cluster"]
    with GuestNetwork() as network, tempfile.TemporaryDirectory() as tmp:
        for name in which:
            commands = {
                "boot": boot,
                "cluster": cluster,
                "images": lambda net, path: cluster(net, path, stock=False),
            }
            commands[name](network, Path(tmp) / name)


if __name__ == "__main__":
    main(sys.argv[1:])
