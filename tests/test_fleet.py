"""The fleet's one watcher: what a cluster asks of its cloud while VMs boot.

A driver that only counts calls stands in for a cloud: the point is how many calls the
core makes and what it concludes from their answers, not what a cloud does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from dask_secure_cloud.cloudinit import LIMITS
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.driver import VM, Driver, ThrottledError, VMRequest
from dask_secure_cloud.fleet import Fleet
from dask_secure_cloud.options import ClusterOptions, resolve
from dask_secure_cloud.plan import BootPlanner


class CountingDriver(Driver):
    provider = "counting"
    user_data_limit = LIMITS["local"]
    watch_interval = 0.1

    def __init__(self) -> None:
        self.listings = 0
        self.state_calls = 0
        self.answers: list[Mapping[str, str] | Exception] = []
        self.last: Mapping[str, str] = {}

    async def create(self, request: VMRequest) -> VM:
        raise NotImplementedError

    async def destroy(self, vm: VM) -> None:
        pass

    async def list(self, cluster_id: str) -> list[VM]:
        return []

    async def states(self, cluster_id: str) -> Mapping[str, str]:
        self.listings += 1
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            self.last = answer
        return self.last

    async def state(self, vm: VM) -> str:
        self.state_calls += 1
        return "unknown"

    async def console_output(self, vm: VM) -> str:
        return f"console of {vm.name}: boot FAILED"


def fleet_for(driver: Driver, boot_timeout: str = "30s") -> Fleet:
    options = resolve(ClusterOptions, {"boot_timeout": boot_timeout, "runtime": "native"})
    planner = BootPlanner(options, "dsc-fleettest", driver, native_python="python3")
    return Fleet(driver, planner, log=lambda _: None)


def worker(i: int) -> VM:
    return VM(f"i-{i}", f"worker-{i}", Role.WORKER, "dsc-fleettest", f"10.0.0.{i % 250}")


async def test_two_hundred_booting_workers_cost_one_listing_per_interval():
    driver = CountingDriver()
    fleet = fleet_for(driver)
    driver.last = {f"i-{i}": "running" for i in range(200)}
    started = time.monotonic()
    joined: set[str] = set()
    watches = [
        asyncio.create_task(
            fleet.watch_worker_boot(worker(i), lambda i=i: f"worker-{i}" in joined, lambda: False)
        )
        for i in range(200)
    ]
    await asyncio.sleep(1.05)  # about ten intervals
    joined.update(f"worker-{i}" for i in range(200))
    await asyncio.wait_for(asyncio.gather(*watches), 5)
    intervals = (time.monotonic() - started) / driver.watch_interval
    # One listing per interval for all 200 (one per VM would be 200 per interval).
    assert intervals / 2 <= driver.listings <= intervals + 2, (driver.listings, intervals)
    assert driver.state_calls == 0


async def test_a_throttled_or_failed_listing_does_not_fail_a_booting_worker(caplog):
    driver = CountingDriver()
    fleet = fleet_for(driver)
    vm = worker(1)
    # Listed once, then the cloud throttles and drops calls: nothing is learnt from those.
    driver.answers = [
        {"i-1": "running"},
        ThrottledError("RequestLimitExceeded"),
        OSError("connection reset"),
        ThrottledError("RequestLimitExceeded"),
    ]
    joined = asyncio.Event()
    watch = asyncio.create_task(fleet.watch_worker_boot(vm, joined.is_set, lambda: False))
    await asyncio.sleep(0.6)
    assert fleet.state(vm) == "running"
    joined.set()
    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(watch, 5)
    assert "did not join" not in caplog.text


async def test_a_worker_that_disappears_from_the_listing_is_reported_at_once(caplog):
    driver = CountingDriver()
    fleet = fleet_for(driver, boot_timeout="10m")
    vm = worker(2)
    # Listed, then gone: its OS powered off after a failed boot and the cloud removed it.
    driver.answers = [{"i-2": "running"}, {}]
    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(fleet.watch_worker_boot(vm, lambda: False, lambda: False), 5)
    assert "worker-2 did not join" in caplog.text
    assert "console of worker-2: boot FAILED" in caplog.text


async def test_a_vm_not_yet_listed_is_not_presumed_gone():
    """Clouds list a new VM with a delay: absent from the first listings is not an end."""
    driver = CountingDriver()
    fleet = fleet_for(driver)
    vm = worker(3)
    driver.last = {}
    joined = asyncio.Event()
    watch = asyncio.create_task(fleet.watch_worker_boot(vm, joined.is_set, lambda: False))
    await asyncio.sleep(0.5)
    assert fleet.state(vm) == "unknown" and not watch.done()
    joined.set()
    await asyncio.wait_for(watch, 5)
