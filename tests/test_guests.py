"""The boot path on real Linux guests: the proof that what a cloud receives works on a VM.

Each VM is a QEMU guest of a stock-like Debian image (kernel, systemd, cloud-init,
python3; no Docker, no Dask) whose real cloud-init runs the cluster's user-data from a
NoCloud seed. "The internet" is the test namespace's package services answering as
deb.debian.org, pypi.org and ghcr.io: the boot script's own apt-get, pip and docker pull
run unchanged against them. A guest without a route out cannot reach them at all.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import dask
import distributed
import pytest
from distributed import Client

from dask_secure_cloud.cluster import ClusterStartError, VMBootError, default_docker_image
from dask_secure_cloud.credentials import Role

from clouds.guest.booter import GuestBooter
from clouds.guest.driver import GuestCluster, GuestDriver
from clouds.guest.image import GuestImage, baked_image, stock_image
from clouds.guest.internet import Services
from clouds.guest.network import GuestNetwork

pytestmark = [
    pytest.mark.slow,
    pytest.mark.guest,
    pytest.mark.timeout(1800),
    pytest.mark.usefixtures("patient_connections"),
]

#: Under TCG on two shared cores, three guests installing Docker take minutes.
BOOT_TIMEOUT = "15m"


def _booter(network: GuestNetwork, image: GuestImage, directory: Path) -> GuestBooter:
    return GuestBooter(directory, network, image)


def _fetched(services: Services, since: float) -> list[dict]:
    return [r for r in services.requests() if r.get("time", 0) >= since]


def _no_guest_left(booter: GuestBooter, network: GuestNetwork, services: Services) -> None:
    """Every VM deleted and no process left in the test namespace but the services."""
    assert booter.vms == {}
    assert set(network.pids()) <= {services.process.pid}


async def _compute_and_power_off(
    booter: GuestBooter, driver: GuestDriver, **options
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Start 1 scheduler + 2 workers, compute over TLS on both workers, then stop
    renewing the lease, as a killed client would.

    Returns, per VM, the seconds from its Dask process's end to its power-off (None: it
    did not power itself off), and each VM's console."""
    async with GuestCluster(
        driver,
        n_workers=2,
        boot_timeout=BOOT_TIMEOUT,
        lease_timeout="90s",
        worker_death_timeout="90s",
        asynchronous=True,
        **options,
    ) as cluster:
        assert cluster.scheduler_address.startswith("tls://10.77.0.")
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=600)
            workers = list((await client.scheduler.identity())["workers"])
            assert all(w.startswith("tls://10.77.0.") for w in workers)
            futures = [
                client.submit(sum, range(i, i + 100), workers=[w], pure=False)
                for i, w in enumerate(workers)
            ]
            assert await client.gather(futures) == [sum(range(100)), sum(range(1, 101))]
            versions = await client.get_versions(check=True)
            assert versions["scheduler"]["packages"]["dask"] == dask.__version__
        guests = [booter.vms[vm.id] for vm in driver.created]
        # The lease path: no renewal, so the scheduler ends itself, its workers follow,
        # and every VM powers itself off. Deleting a VM first waits for that.
        driver.wait_for_power_off = 300
        cluster.periodic_callbacks["secure-cloud-lease"].stop()
        deadline = time.monotonic() + 400
        for guest in guests:
            await asyncio.to_thread(guest.wait_stopped, max(deadline - time.monotonic(), 1))
    consoles = driver.consoles  # as each VM was deleted
    assert all(not g.is_running() for g in guests)
    off = driver.powered_off
    assert set(off) == {g.name for g in guests}, off
    assert all(seconds is not None for seconds in off.values()), (off, consoles)
    print(f"seconds from Dask's end to power-off: {off}")
    return off, consoles


def _console_steps(guest_console: str) -> list[str]:
    return [line for line in guest_console.splitlines() if "dask-secure-cloud:" in line]


def _assert_step_done(consoles: dict[str, str], step: str) -> None:
    """Each VM's console shows ``step`` finished, with its duration."""
    for name, console in consoles.items():
        steps = "\n".join(_console_steps(console))
        assert re.search(rf"{step}: done in \d+\.\d+s", steps), (name, steps or console[-3000:])


async def test_default_docker_runtime_on_a_stock_image(guest_network, guest_services, tmp_path):
    """Docker installed at boot from apt, the pinned image pulled from "ghcr.io", TLS."""
    booter = _booter(guest_network, stock_image(), tmp_path)
    driver = GuestDriver(booter)
    since = time.time()
    off, consoles = await _compute_and_power_off(booter, driver, runtime="docker")
    _no_guest_left(booter, guest_network, guest_services)
    assert max(s for s in off.values() if s is not None) < 120
    _assert_step_done(consoles, "docker-engine")
    _assert_step_done(consoles, "pull")
    fetched = _fetched(guest_services, since)
    image = default_docker_image().split("/", 1)[1].replace(":", "/manifests/")
    assert any(r["host"] == "ghcr.io" and image in r["path"] for r in fetched)
    assert any(r["path"].endswith(".deb") and "/docker.io_" in r["path"] for r in fetched)


async def test_native_runtime_on_a_stock_image_installs_this_clients_dask(
    guest_network, guest_services, tmp_path
):
    booter = _booter(guest_network, stock_image(), tmp_path)
    driver = GuestDriver(booter)
    since = time.time()
    _, consoles = await _compute_and_power_off(booter, driver, runtime="native")
    _no_guest_left(booter, guest_network, guest_services)
    _assert_step_done(consoles, "python-env")
    fetched = _fetched(guest_services, since)
    wheel = f"/dask-{dask.__version__}-"
    assert sum(1 for r in fetched if wheel in r["path"]) == 3  # once per VM
    assert any("python3-venv" in r["path"] for r in fetched)


async def test_native_runtime_on_a_baked_image_installs_nothing(
    guest_network, guest_services, tmp_path
):
    image = baked_image(dask.__version__, distributed.__version__)
    booter = _booter(guest_network, image, tmp_path)
    driver = GuestDriver(booter)
    since = time.time()
    _, consoles = await _compute_and_power_off(booter, driver, runtime="native")
    _no_guest_left(booter, guest_network, guest_services)
    assert _fetched(guest_services, since) == []
    _assert_step_done(consoles, "python-env")


async def test_a_failing_boot_step_is_reported_from_the_console_and_nothing_is_left(
    guest_network, guest_services, tmp_path
):
    """A tag the registry lacks, and a VM with no route out: both starts fail within the
    boot timeout with the failing step and its output in the error."""
    booter = _booter(guest_network, stock_image(), tmp_path)
    missing_tag = GuestDriver(booter)
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
    assert "docker-engine: FAILED" in route_error
    assert "boot FAILED at step docker-engine" in route_error
    assert "unreachable" in route_error.lower() or "failed to fetch" in route_error.lower()
    assert tag_time < 12 * 60 and route_time < 12 * 60
    _no_guest_left(booter, guest_network, guest_services)
