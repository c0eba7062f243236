"""A lost worker is replaced: the cluster keeps the size asked of it.

A worker VM killed mid-computation (every process of it, as a crash or a reclaimed VM
ends), a spot worker retired on its cloud's notice, a replacement that never boots: the
computation finishes, the lost VM is deleted, and a worker of a new name joins in its
place; a worker that keeps failing is given up after ``max_replacements`` tries in a
row, with nothing left behind; a worker scaled down is never replaced. Every replacement
and give-up is in the audit log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from distributed import Client
from helpers import vm_processes
from test_fleet import CountingDriver, fleet_for, worker

from dask_secure_cloud import (
    AzureVMCluster,
    DropletCluster,
    EC2Cluster,
    GCPCluster,
    LocalVMCluster,
    audit,
    fleet,
)
from dask_secure_cloud.cluster import VMCluster
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.driver import CloudError, VMRequest
from dask_secure_cloud.providers.local import LocalDriver, _SharingPlanner
from dask_secure_cloud.vmrunner import find_vms

from clouds.arm import ScheduledEvents
from clouds.gce import PreemptionNotice
from standins import start_digitalocean, start_ec2, start_gce, stop_ec2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> float:
    """Poll ``condition`` until it holds; the seconds it took. Fails naming ``what``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, f"not within {seconds:.0f}s: {what}"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


def connected(cluster: VMCluster) -> set[str]:
    return {str(w["name"]) for w in cluster.scheduler_info.get("workers", {}).values()}


def events(cluster_id: str, event: str) -> list[dict[str, Any]]:
    return [e for e in audit.read() if e["cluster_id"] == cluster_id and e["event"] == event]


def kill_vm(directory: Path, cluster_id: str, name: str) -> None:
    """SIGKILL every process of one local VM: it ends as a crashed or reclaimed VM does,
    its directory left behind (a VM that ended, not one deleted)."""
    (vm,) = [v for v in find_vms(directory, cluster_id) if v.name == name]
    while pids := vm.processes():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue


def local_names(directory: Path, cluster_id: str) -> set[str]:
    """The local VMs the driver lists, read without the event loop."""
    return {vm.name for vm in find_vms(directory, cluster_id)}


async def driver_names(cluster: VMCluster) -> set[str]:
    return {vm.name for vm in await cluster.driver.list(cluster.cluster_id)}


def slow_square(x: int) -> int:
    """A task that takes a while: some are still to run when a worker is killed."""
    time.sleep(0.3)
    return x * x


# Shipped by value (the workers cannot import this module).
slow_square.__module__ = "__main__"


# -- the fleet's watch of a worker that left (a counting driver, no VM) -----------------


async def test_a_worker_whose_vm_ended_is_lost_after_the_settling_pause(monkeypatch):
    monkeypatch.setattr(fleet, "LOST_SETTLE", 0.3)
    driver = CountingDriver()
    watcher = fleet_for(driver)
    driver.answers = [{"i-1": "running"}, {"i-1": "stopped"}]
    started = time.monotonic()
    state = await asyncio.wait_for(watcher.watch_lost_worker(worker(1), lambda: False, 60), 5)
    # Powered off and still billed is ended: the VM is lost (and will be deleted).
    assert state == "stopped" and time.monotonic() - started >= 0.3


async def test_a_worker_that_comes_back_or_is_scaled_down_is_not_lost(monkeypatch):
    monkeypatch.setattr(fleet, "LOST_SETTLE", 0.1)
    driver = CountingDriver()
    watcher = fleet_for(driver)
    driver.answers = [{"i-1": "running"}]
    back = asyncio.Event()
    watch = asyncio.create_task(watcher.watch_lost_worker(worker(1), back.is_set, 60))
    # Listed running, past the settling pause, several times: still not lost.
    await wait_for(lambda: driver.listings >= 5, 5, "listings")
    assert not watch.done()
    back.set()
    assert await asyncio.wait_for(watch, 5) is None


async def test_a_worker_away_for_the_grace_is_lost_while_its_vm_runs(monkeypatch):
    monkeypatch.setattr(fleet, "LOST_SETTLE", 0.1)
    driver = CountingDriver()
    watcher = fleet_for(driver)
    driver.answers = [{"i-1": "running"}]
    started = time.monotonic()
    state = await asyncio.wait_for(watcher.watch_lost_worker(worker(1), lambda: False, 1.0), 5)
    assert state == "running" and time.monotonic() - started >= 1.0
    assert driver.state_calls == 0  # one listing per interval, never a call per VM


# -- LocalVMCluster ----------------------------------------------------------------------


async def test_a_worker_vm_killed_during_a_computation_is_replaced(vm_dir, caplog):
    async with LocalVMCluster(n_workers=3, directory=vm_dir, asynchronous=True) as cluster:
        cluster_id = cluster.cluster_id
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(3, timeout=90)
            futures = client.map(slow_square, range(40))
            await wait_for(lambda: sum(f.done() for f in futures) >= 4, 60, "tasks done")
            kill_vm(vm_dir, cluster_id, "worker-1")
            killed = time.monotonic()
            assert await client.gather(futures) == [x * x for x in range(40)]

            # Back at its size: a worker of a new name joined in place of worker-1.
            await wait_for(
                lambda: len(connected(cluster)) == 3 and "worker-1" not in connected(cluster),
                120,
                "a replacement joined",
            )
            joined_after = time.monotonic() - killed
            (replaced,) = events(cluster_id, "worker_replaced")
            new = replaced["replacement"]
            assert replaced["name"] == "worker-1" and replaced["cause"] == "vm_ended"
            assert replaced["attempt"] == 1 and replaced["max_replacements"] == 3
            assert new == "worker-3"  # a name the cluster never gave before
            assert connected(cluster) == {"worker-0", "worker-2", new}
            assert set(cluster.worker_spec) == {"worker-0", "worker-2", new}

            # The dead VM is deleted, not only ended; the new one made its own key.
            expected = {"scheduler", "worker-0", "worker-2", new}
            await wait_for(lambda: local_names(vm_dir, cluster_id) == expected, 30, "deleted")
            assert await driver_names(cluster) == expected
            assert any(e["name"] == "worker-1" for e in events(cluster_id, "vm_deleted"))
            assert any(e["name"] == new for e in events(cluster_id, "vm_launched"))
            assert any(e["name"] == new for e in events(cluster_id, "vm_enrolled"))
            assert "workers gone" not in repr(cluster)
            assert "worker-1 lost: its Dask worker left and its VM terminated" in caplog.text
            assert any(f"{new} replaces it" in line for _, line in cluster._cluster_manager_logs)
            print(f"kill to replacement joined: {joined_after:.1f}s")
    # Closing retires every worker: none of that is a loss.
    assert len(events(cluster_id, "worker_replaced")) == 1
    assert not events(cluster_id, "replacement_given_up")
    assert vm_processes(cluster_id) == []


async def test_workers_that_left_with_their_scheduler_are_not_replaced(vm_dir):
    """The lease ends (as when the client dies): the scheduler ends and its workers
    follow. A replacement would only boot, find no scheduler and bill."""
    async with LocalVMCluster(
        n_workers=2,
        lease_timeout="2s",
        worker_death_timeout="2s",
        directory=vm_dir,
        asynchronous=True,
    ) as cluster:
        cluster_id = cluster.cluster_id
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=90)
        cluster.periodic_callbacks["secure-cloud-lease"].stop()  # the lease is not renewed
        await wait_for(lambda: not vm_processes(cluster_id), 60, "every VM ended")
        await asyncio.sleep(17)  # past lost-worker-timeout (15s): a replacement starts by now
        assert not events(cluster_id, "worker_replaced")
        launched = {e["name"] for e in events(cluster_id, "vm_launched")}
        assert launched == {"scheduler", "worker-0", "worker-1"}
        assert vm_processes(cluster_id) == []


@pytest.fixture
def replacements_fail_to_boot(monkeypatch) -> None:
    """Every worker VM made after the start fails its boot (its boot script exits, so
    the VM ends): a replacement that never comes up."""
    original = _SharingPlanner.plan
    first = {"worker-0", "worker-1"}

    def plan(self: _SharingPlanner, role: Role, name: str, scheduler_address: str | None) -> Any:
        made = original(self, role, name, scheduler_address)
        if role is Role.WORKER and name not in first:
            return dataclasses.replace(made, extra_bootstrap=("exit 3",))
        return made

    monkeypatch.setattr(_SharingPlanner, "plan", plan)


async def test_a_worker_that_keeps_failing_is_given_up_after_max_replacements(
    vm_dir, caplog, replacements_fail_to_boot
):
    async with LocalVMCluster(
        n_workers=2, max_replacements=2, directory=vm_dir, asynchronous=True
    ) as cluster:
        cluster_id = cluster.cluster_id
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=90)
            kill_vm(vm_dir, cluster_id, "worker-1")
            await wait_for(lambda: events(cluster_id, "replacement_given_up"), 120, "the give-up")
            replaced = events(cluster_id, "worker_replaced")
            assert [(e["name"], e["replacement"], e["attempt"]) for e in replaced] == [
                ("worker-1", "worker-2", 1),
                ("worker-2", "worker-3", 2),
            ]
            assert [e["cause"] for e in replaced] == ["vm_ended", "boot_failed"]
            (given_up,) = events(cluster_id, "replacement_given_up")
            assert given_up["name"] == "worker-3" and given_up["cause"] == "boot_failed"
            assert given_up["replacements"] == 2 and given_up["max_replacements"] == 2
            assert given_up["workers_wanted"] == 1

            # Nothing of the failed workers is left; the cluster computes on.
            assert set(cluster.worker_spec) == {"worker-0"}
            await wait_for(
                lambda: local_names(vm_dir, cluster_id) == {"scheduler", "worker-0"},
                30,
                "the failed VMs deleted",
            )
            assert await driver_names(cluster) == {"scheduler", "worker-0"}
            assert "worker-3: given up after 2 replacements" in repr(cluster)
            assert "max_replacements=2" in caplog.text
            assert await client.submit(sum, [1, 2], pure=False) == 3
    assert len(events(cluster_id, "worker_replaced")) == 2
    assert vm_processes(cluster_id) == []


async def test_a_replacement_the_cloud_refuses_counts_as_a_try(vm_dir, monkeypatch):
    """The cloud refuses the replacement's VM (capacity, quota): one more lost worker,
    within the same bound, and the cluster runs on."""
    original = LocalDriver.create

    async def create(self: LocalDriver, request: VMRequest) -> Any:
        if request.name not in ("scheduler", "worker-0", "worker-1"):
            raise CloudError("InsufficientInstanceCapacity: no capacity for this size")
        return await original(self, request)

    monkeypatch.setattr(LocalDriver, "create", create)
    async with LocalVMCluster(
        n_workers=2, max_replacements=1, directory=vm_dir, asynchronous=True
    ) as cluster:
        cluster_id = cluster.cluster_id
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=90)
            kill_vm(vm_dir, cluster_id, "worker-1")
            await wait_for(lambda: events(cluster_id, "replacement_given_up"), 60, "give-up")
            (replaced,) = events(cluster_id, "worker_replaced")
            assert (replaced["name"], replaced["replacement"]) == ("worker-1", "worker-2")
            (given_up,) = events(cluster_id, "replacement_given_up")
            assert given_up["name"] == "worker-2" and given_up["cause"] == "launch_failed"
            assert "InsufficientInstanceCapacity" in given_up["detail"]
            assert set(cluster.worker_spec) == {"worker-0"}
            await wait_for(
                lambda: local_names(vm_dir, cluster_id) == {"scheduler", "worker-0"},
                30,
                "the lost VM deleted",
            )
            assert await client.submit(sum, [1, 2], pure=False) == 3
    assert vm_processes(cluster_id) == []


@pytest.mark.parametrize("how", ["scale", "adapt"])
async def test_a_worker_scaled_down_is_not_replaced(vm_dir, how):
    """Scaled down by the user, or by ``adapt`` (which retires the workers through the
    scheduler first): those workers are not lost. A worker killed afterwards is replaced,
    at the smaller size."""
    async with LocalVMCluster(n_workers=3, directory=vm_dir, asynchronous=True) as cluster:
        cluster_id = cluster.cluster_id
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(3, timeout=90)
            if how == "scale":
                cluster.scale(2)
            else:
                cluster.adapt(minimum=2, maximum=3, interval="500ms", wait_count=2)
            await wait_for(
                lambda: len(connected(cluster)) == 2 and len(cluster.worker_spec) == 2,
                60,
                "scaled down",
            )
            kept = set(connected(cluster))
            (left,) = {"worker-0", "worker-1", "worker-2"} - kept
            await wait_for(lambda: left not in local_names(vm_dir, cluster_id), 30, "deleted")
            victim = sorted(kept)[0]
            kill_vm(vm_dir, cluster_id, victim)
            await wait_for(
                lambda: len(connected(cluster)) == 2 and victim not in connected(cluster),
                120,
                "a replacement joined",
            )
            (replaced,) = events(cluster_id, "worker_replaced")
            assert replaced["name"] == victim
            assert len(cluster.worker_spec) == 2
            assert local_names(vm_dir, cluster_id) - {"scheduler"} == set(cluster.worker_spec)
    assert [e["name"] for e in events(cluster_id, "worker_replaced")] == [victim]


# -- on each cloud's stand-in -----------------------------------------------------------


async def wait_for_async(condition: Callable[[], Any], seconds: float, what: str) -> None:
    """:func:`wait_for` for a coroutine condition (one that asks the cloud)."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < seconds, f"not within {seconds:.0f}s: {what}"
        await asyncio.sleep(0.5)


def kill_booted(booter: Any, cluster_id: str, name: str) -> None:
    """SIGKILL every process of the stand-in's VM of worker ``name``: its OS is gone,
    and the stand-in reports the VM as its cloud reports one that powered off."""
    (vm,) = [v for v in booter.vms.values() if v.cluster_id == cluster_id and v.name == name]
    while pids := vm.processes():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue


async def lose_the_worker_and_see_it_replaced(
    cluster: VMCluster, lose: Callable[[str], None], heard: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """Lose the cluster's one worker with ``lose(name)``; ``heard()`` once it left (the
    notice is over: its replacement must not hear it too). The replacement joins, the
    lost VM is deleted, and the cluster computes; the audit record of the replacement."""
    cluster_id = cluster.cluster_id
    async with Client(cluster, asynchronous=True) as client:
        await client.wait_for_workers(1, timeout=90)
        (first,) = connected(cluster)
        lose(first)
        lost = time.monotonic()
        await wait_for(lambda: first not in connected(cluster), 60, "the worker left")
        heard()
        await wait_for(
            lambda: len(connected(cluster)) == 1 and first not in connected(cluster),
            150,
            "a replacement joined",
        )
        joined_after = time.monotonic() - lost
        (replaced,) = events(cluster_id, "worker_replaced")
        new = replaced["replacement"]
        assert replaced["name"] == first and connected(cluster) == {new}

        async def only_live_vms_listed() -> bool:
            return await driver_names(cluster) == {"scheduler", new}

        # Powered off is not gone: the lost VM is deleted, on every cloud.
        await wait_for_async(only_live_vms_listed, 60, "the lost VM deleted")
        assert any(e["name"] == first for e in events(cluster_id, "vm_deleted"))
        assert await client.submit(sum, [1, 2], pure=False) == 3
        print(f"{type(cluster).__name__}: lost to replacement joined: {joined_after:.1f}s")
    return replaced


class _InstanceMetadata(BaseHTTPRequestHandler):
    """Just enough of EC2's IMDSv2 for a spot interruption notice, given while
    ``interrupting`` is set."""

    interrupting: threading.Event

    def do_PUT(self) -> None:
        self._answer(200, b"token")

    def do_GET(self) -> None:
        ok = self.headers.get("X-aws-ec2-metadata-token") == "token"
        if ok and self.interrupting.is_set():
            self._answer(200, b'{"action": "terminate", "time": "2030-01-01T00:00:00Z"}')
        else:
            self._answer(404 if ok else 401, b"")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ec2_notice() -> Any:
    """An IMDS endpoint whose spot interruption notice is given while the event is set."""
    interrupting = threading.Event()
    handler = type("Handler", (_InstanceMetadata,), {"interrupting": interrupting})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", interrupting
    server.shutdown()
    server.server_close()


async def test_ec2_spot_worker_interrupted_is_replaced(tmp_path, monkeypatch, ec2_notice):

    stand_in, client, options = start_ec2(tmp_path, monkeypatch)
    url, interrupting = ec2_notice
    try:
        async with EC2Cluster(
            n_workers=1, worker_spot=True, metadata_endpoint=url, asynchronous=True, **options
        ) as cluster:
            cluster_id = cluster.cluster_id
            replaced = await lose_the_worker_and_see_it_replaced(
                cluster, lambda _: interrupting.set(), interrupting.clear
            )
            assert replaced["cause"] == "vm_ended"
            spot = [launch for launch in stand_in.launches if "spot" in str(launch)]
            assert len(spot) == 2  # the replacement is a spot VM too
        tag = [{"Name": "tag:dask-secure-cloud-cluster", "Values": [cluster_id]}]
        left = [
            i
            for r in client.describe_instances(Filters=tag)["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        ]
        assert left == [] and vm_processes(cluster_id) == []
    finally:
        stop_ec2(stand_in)


async def test_gce_spot_worker_preempted_is_replaced(tmp_path):

    stand_in, options = start_gce(tmp_path)
    notice = PreemptionNotice()
    try:
        async with GCPCluster(
            n_workers=1,
            worker_spot=True,
            metadata_endpoint=notice.url,
            asynchronous=True,
            **options,
        ) as cluster:
            cluster_id = cluster.cluster_id
            replaced = await lose_the_worker_and_see_it_replaced(
                cluster, lambda _: notice.preempt(), notice.preempting.clear
            )
            # A preempted instance is TERMINATED, kept with its disk: deleted all the same.
            assert replaced["cause"] == "vm_ended" and "stopped" in replaced["detail"]
            inserted = [b for c, b in stand_in.requests if c == "instances.insert"]
            assert inserted[-1]["scheduling"]["provisioningModel"] == "SPOT"
        labelled = [
            r
            for r in stand_in.instances.values()
            if r["labels"].get("dask-secure-cloud-cluster") == cluster_id
        ]
        assert labelled == [] and vm_processes(cluster_id) == []
    finally:
        notice.stop()
        stand_in.stop()


async def test_azure_spot_worker_evicted_is_replaced(azure):

    stand_in, options = azure
    events_service = ScheduledEvents()
    try:
        async with AzureVMCluster(
            n_workers=1,
            worker_spot=True,
            metadata_endpoint=events_service.url,
            asynchronous=True,
            **options,
        ) as cluster:
            cluster_id = cluster.cluster_id
            replaced = await lose_the_worker_and_see_it_replaced(
                cluster, lambda _: events_service.evict(), events_service.evicting.clear
            )
            assert replaced["cause"] == "vm_ended"
        assert stand_in.tagged(cluster_id) == [] and vm_processes(cluster_id) == []
    finally:
        events_service.stop()


async def test_droplet_that_crashed_is_replaced(tmp_path, monkeypatch):
    """DigitalOcean has no spot droplets: a droplet whose OS died is "off", and still
    billed in full until it is deleted."""

    stand_in, options = start_digitalocean(tmp_path, monkeypatch)
    try:
        async with DropletCluster(n_workers=1, asynchronous=True, **options) as cluster:
            cluster_id = cluster.cluster_id
            replaced = await lose_the_worker_and_see_it_replaced(
                cluster, lambda name: kill_booted(stand_in.booter, cluster_id, name)
            )
            assert replaced["cause"] == "vm_ended" and "stopped" in replaced["detail"]
        left = [d for d in stand_in.droplets.values() if any(cluster_id in t for t in d["tags"])]
        assert left == [] and vm_processes(cluster_id) == []
    finally:
        stand_in.booter.stop_all()
        stand_in.stop()
