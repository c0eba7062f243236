"""Failed boots on real Linux guests, reported from the console, with nothing left.

The runtimes that work are proven per cloud in ``test_guests_per_cloud.py``; here the
cluster's own ``GuestDriver`` (the clouds' boot path, no cloud API) shows the two
failures a user meets first, on a kernel that enforces AppArmor. Each VM is a QEMU
guest of a stock-like Debian image (kernel, systemd, cloud-init, python3; no Docker, no
Dask) whose real cloud-init runs the cluster's user-data from a NoCloud seed. "The
internet" is the test namespace's package services answering as deb.debian.org,
pypi.org and ghcr.io. A guest without a route out cannot reach them at all.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from dask_secure_cloud.cluster import ClusterStartError, VMBootError
from dask_secure_cloud.credentials import Role

from clouds.guest.booter import GuestBooter
from clouds.guest.driver import GuestCluster, GuestDriver
from clouds.guest.image import GuestImage, docker_image, stock_image
from clouds.guest.internet import Services
from clouds.guest.network import GuestNetwork

pytestmark = [
    pytest.mark.slow,
    pytest.mark.guest,
    pytest.mark.timeout(1800),
    pytest.mark.usefixtures("patient_connections"),
]


def _booter(network: GuestNetwork, image: GuestImage, directory: Path) -> GuestBooter:
    return GuestBooter(directory, network, image)


def _no_guest_left(booter: GuestBooter, network: GuestNetwork, services: Services) -> None:
    """Every VM deleted and no process left in the test namespace but the services."""
    assert booter.vms == {}
    assert set(network.pids()) <= {services.process.pid}


async def test_a_failing_boot_step_is_reported_from_the_console_and_nothing_is_left(
    guest_network, guest_services, tmp_path
):
    """A tag the registry lacks, and a VM with no route out: both starts fail within the
    boot timeout with the failing step and its output in the error.

    The missing tag on an image that has Docker already (installing it is proven on
    every guest of the EC2 test, and would only add minutes here); no route out on the
    stock image, whose kernel enforces AppArmor: the boot script asks apt for Docker and
    for AppArmor's parser, which docker.io only recommends, and cannot fetch them."""
    booter = _booter(guest_network, stock_image(), tmp_path)
    missing_tag = GuestDriver(booter, apparmor=False, image=docker_image())
    no_route = GuestDriver(booter, egress={Role.SCHEDULER: False, Role.WORKER: False})
    missing = f"ghcr.io/dask/dask:2024.10.0-py3.11-{time.monotonic_ns()}"

    async def start(driver: GuestDriver, **options) -> tuple[str, float]:
        started = time.monotonic()
        with pytest.raises((ClusterStartError, VMBootError)) as info:
            async with GuestCluster(
                driver, n_workers=0, boot_timeout="12m", asynchronous=True, **options
            ):
                pass
        return str(info.value), time.monotonic() - started

    (tag_error, tag_time), (route_error, route_time) = await asyncio.gather(
        start(missing_tag, runtime="docker", docker_image=missing),
        start(no_route, runtime="docker"),
    )
    print(f"missing tag reported after {tag_time:.0f}s, no route after {route_time:.0f}s")
    assert "pull: FAILED" in tag_error and "manifest unknown" in tag_error
    assert "boot FAILED at step pull" in tag_error
    assert "docker-engine: done" in tag_error
    assert "docker-engine: installing" not in tag_error
    assert "docker-engine: installing from the distribution's packages: docker.io apparmor" in (
        route_error
    )
    assert "docker-engine: FAILED" in route_error
    assert "boot FAILED at step docker-engine" in route_error
    assert "unreachable" in route_error.lower() or "failed to fetch" in route_error.lower()
    assert tag_time < 12 * 60 and route_time < 12 * 60
    _no_guest_left(booter, guest_network, guest_services)
