"""The fleet's one watcher: what a cluster asks of its cloud while VMs boot.

A driver that only counts calls stands in for a cloud: the point is how many calls the
core makes and what it concludes from their answers, not what a cloud does.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Mapping

from distributed import Scheduler
from distributed.security import Security

from dask_secure_cloud import fleet
from dask_secure_cloud.cloudinit import LIMITS
from dask_secure_cloud.credentials import ClusterCredentials, Role
from dask_secure_cloud.driver import VM, Driver, ThrottledError, VMRequest
from dask_secure_cloud.fleet import Fleet, answers
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


async def test_reaching_a_scheduler_is_one_quiet_attempt(monkeypatch):
    """The readiness check answers at once, whatever the scheduler's state, and the
    scheduler it reaches logs no aborted or failed handshake."""
    creds = ClusterCredentials("c-reach")
    leaf = creds.issue(Role.SCHEDULER, "scheduler")
    server_security = Security(
        require_encryption=True,
        tls_ca_file=leaf.ca_pem,
        tls_scheduler_cert=leaf.cert_pem,
        tls_scheduler_key=leaf.key_pem,
    )
    client_args = creds.client_security().get_connection_args("client")
    logged: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("distributed").addHandler(handler)
    try:
        async with Scheduler(
            security=server_security, host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0"
        ) as scheduler:
            assert await answers(scheduler.address, client_args)
            # A client of another cluster's CA does not count as reaching it.
            stranger = ClusterCredentials("c-reach").client_security()
            assert not await answers(scheduler.address, stranger.get_connection_args("client"))
    finally:
        logging.getLogger("distributed").removeHandler(handler)
    assert not [line for line in logged if "closed before handshake" in line]
    assert len([line for line in logged if "TLS handshake failed" in line]) == 1  # the stranger's

    # Nothing listening: refused, so no answer, and no waiting.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"tls://127.0.0.1:{s.getsockname()[1]}"
    assert not await answers(closed, client_args)

    # Something listening that never answers: given up after the attempt's timeout.
    monkeypatch.setattr(fleet, "REACH_TIMEOUT", 0.2)
    with socket.create_server(("127.0.0.1", 0)) as mute:
        assert not await answers(f"tls://127.0.0.1:{mute.getsockname()[1]}", client_args)
