"""What a gone client leaves is visible and easy to end: ``list`` says whose client is
gone and what still bills, a new cluster's start warns of it once, and ``cleanup
--expired`` ends it, on every cloud's stand-in."""

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import vm_processes
from test_aws import account, aws, stand_in  # noqa: F401 - fixtures
from test_digitalocean import do  # noqa: F401 - a fixture
from test_gcp import gce  # noqa: F401 - a fixture

from dask_secure_cloud import LocalVMCluster, audit, liveness
from dask_secure_cloud.cluster import delete_cluster, preview
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.driver import CREATOR_TAG, ClusterSummary, VMRequest
from dask_secure_cloud.liveness import Client

from clouds.naming import RUNS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WARNING = logging.getLogger("dask_secure_cloud.liveness")


def dead_pid() -> int:
    """The PID of a process that has exited."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def record_killed_client(cluster_id: str, provider: str) -> int:
    """The record a client leaves when it is SIGKILLed: it names a process that is gone."""
    liveness.claim(cluster_id, provider)
    path = liveness.records_dir() / f"{cluster_id}.json"
    record = json.loads(path.read_text())
    record["pid"] = pid = dead_pid()
    path.write_text(json.dumps(record))
    return pid


# -- who is alive ------------------------------------------------------------------------


def test_a_client_is_alive_gone_or_unknown():
    mine = audit.creator()
    liveness.claim("dsc-a11ve00001", "local")
    alive = ClusterSummary("dsc-a11ve00001", 1, None, mine)
    assert liveness.client_of(alive) == (Client.ALIVE, os.getpid())

    pid = record_killed_client("dsc-60ne000001", "local")
    assert liveness.client_of(ClusterSummary("dsc-60ne000001", 1, None, mine)) == (
        Client.GONE,
        pid,
    )
    # The PID reused by another process: its start time differs.
    path = liveness.records_dir() / "dsc-a11ve00001.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "process_started": record["process_started"] - 60}))
    assert liveness.client_of(alive)[0] is Client.GONE

    # No record here, or another creator: made elsewhere, never "gone".
    assert liveness.client_of(ClusterSummary("dsc-e15e000001", 1, None, mine))[0] is Client.UNKNOWN
    other = ClusterSummary("dsc-60ne000001", 1, None, "someone@elsewhere")
    assert liveness.client_of(other)[0] is Client.UNKNOWN
    # Clouds rewrite the creator tag to their label alphabet; it still names this user.
    rewritten = re.sub(r"[^a-z0-9_-]", "_", mine.lower())
    assert liveness.client_of(ClusterSummary("dsc-60ne000001", 1, None, rewritten))[0] is (
        Client.GONE
    )

    liveness.drop("dsc-60ne000001")
    assert liveness.client_of(ClusterSummary("dsc-60ne000001", 1, None, mine))[0] is (
        Client.UNKNOWN
    )


def test_what_bills():
    summary = ClusterSummary(
        "dsc-1", 4, None, None, 5, {"running": 1, "stopped": 1, "terminated": 1},
        {"disk": 2, "address": 1, "firewall": 1, "network": 1},
    )  # fmt: skip
    # The VM the listing says nothing of may be running: it counts.
    assert summary.billing() == {
        "running VM": 1,
        "stopped VM": 1,
        "unknown VM": 1,
        "address": 1,
        "disk": 2,
    }
    assert ClusterSummary("dsc-2", 0, None, None, 2, {}, {"firewall": 2}).billing() == {}


# -- LocalVMCluster: a SIGKILLed client, the start warning, list, cleanup --expired --------

LIVE_CLUSTER = """
import time
from dask_secure_cloud import LocalVMCluster
cluster = LocalVMCluster(n_workers=1)
print(cluster.cluster_id, flush=True)
time.sleep(600)
"""


def start_and_kill(env: dict[str, str]) -> str:
    """Start a cluster in a child process, then SIGKILL the child, as a crash would."""
    child = subprocess.Popen(
        [sys.executable, "-c", LIVE_CLUSTER], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        left = child.stdout.readline().strip()
        assert left.startswith("dsc-"), child.communicate(timeout=5)
    finally:
        child.kill()
        child.wait()
    return left


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dask_secure_cloud", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def _rows(listing: str) -> dict[str, dict[str, str]]:
    lines = listing.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    rows = [dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=True)) for line in lines[1:]]
    return {row["CLUSTER"]: row for row in rows}


async def test_a_killed_clients_cluster_is_warned_of_listed_and_ended(vm_dir, audit_log, caplog):
    env = {
        **os.environ,
        "DASK_SECURE_CLOUD__LOCAL__DIRECTORY": str(vm_dir),
        "DASK_SECURE_CLOUD__AUDIT_LOG": str(audit_log),
    }
    left = await asyncio.to_thread(start_and_kill, env)
    assert vm_processes(left)  # its VMs run on: nothing closed them

    caplog.set_level(logging.WARNING, logger="dask_secure_cloud.liveness")
    started = time.monotonic()
    async with LocalVMCluster(n_workers=0, directory=vm_dir, asynchronous=True) as cluster:
        await asyncio.wait_for(asyncio.shield(cluster._leftover_check), 30)
        warned = [r.getMessage() for r in caplog.records if left in r.getMessage()]
        assert len(warned) == 1, caplog.text
        assert "whose client is gone" in warned[0] and "2 running VM" in warned[0]
        assert "`dask secure-cloud cleanup --expired --provider local`" in warned[0]
        assert cluster.cluster_id not in warned[0]
        # Warned once: a second start says nothing more of it.
        async with LocalVMCluster(n_workers=0, directory=vm_dir, asynchronous=True) as second:
            await asyncio.wait_for(asyncio.shield(second._leftover_check), 30)
        assert len([r for r in caplog.records if left in r.getMessage()]) == 1
        assert time.monotonic() - started < 120

        listed = await asyncio.to_thread(_cli, "list", "--provider", "local", env=env)
        assert listed.returncode == 0, listed.stderr
        rows = _rows(listed.stdout)
        assert rows[left]["CLIENT"] == "gone" and rows[left]["BILLS"] == "2 running VM"
        assert rows[cluster.cluster_id]["CLIENT"] == f"alive (pid {os.getpid()})"

        done = await asyncio.to_thread(
            _cli, "cleanup", "--expired", "--yes", "--provider", "local", env=env
        )
        assert done.returncode == 0, done.stderr
        assert f"{left}  2 VM(s)" in done.stdout and "client gone" in done.stdout
        assert f"{left}: deleted 2 VM(s)" in done.stdout
        assert cluster.cluster_id not in done.stdout  # its client is alive: never chosen
        assert not vm_processes(left) and not (vm_dir / left).exists()
        assert vm_processes(cluster.cluster_id)
        assert not (liveness.records_dir() / f"{left}.json").exists()

        again = await asyncio.to_thread(
            _cli, "cleanup", "--expired", "--yes", "--provider", "local", env=env
        )
        assert again.returncode == 0 and "Nothing to delete." in again.stdout
    # Closed: its record is gone with it.
    assert not (liveness.records_dir() / f"{cluster.cluster_id}.json").exists()


def test_cleanup_takes_one_way_of_choosing():
    result = _cli("cleanup", "--expired", "dsc-1", "--provider", "local", env=dict(os.environ))
    assert result.returncode == 2 and "one of them" in result.stderr


# -- every cloud: a stopped VM still bills, and the gone client's cluster is ended ---------


async def power_off(driver, booter, cluster_id: str, name: str) -> None:
    """The VM's OS powers off: its processes end, and the stand-in sees what its cloud
    would (an instance stopped or terminated). Some stand-ins boot a VM on a later
    request, as a cloud boots it a moment after accepting it."""
    deadline = time.monotonic() + 20
    while True:
        await driver.list(cluster_id)
        found = [
            v for v in list(booter.vms.values()) if (v.cluster_id, v.name) == (cluster_id, name)
        ]
        if found or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert found, [(v.cluster_id, v.name) for v in booter.vms.values()]
    await asyncio.to_thread(found[0].stop)


CLOUDS = {
    # EC2 terminates an instance whose OS shuts down: nothing of it bills.
    "aws": ("EC2Cluster", "aws", {"running VM": 1}),
    "gcp": ("GCPCluster", "gce", {"running VM": 1, "stopped VM": 1}),
    "azure": ("AzureVMCluster", "azure", {"running VM": 1, "stopped VM": 1}),
    "digitalocean": ("DropletCluster", "do", {"running VM": 1, "stopped VM": 1}),
}


@pytest.mark.parametrize("provider", sorted(CLOUDS))
async def test_a_gone_clients_cluster_on_each_cloud(provider, request, caplog):
    import dask_secure_cloud

    name, fixture, bills = CLOUDS[provider]
    cls = getattr(dask_secure_cloud, name)
    given = request.getfixturevalue(fixture)
    cloud, options = given[0], given[-1]
    cluster_id = "dsc-1eft0ver01"
    pid = record_killed_client(cluster_id, provider)
    driver = preview(cls, **options).driver
    driver.configure(ports=(8786, 8787), boot_timeout=60, creator=audit.creator())
    try:
        await driver.prepare(cluster_id)
        for vm_name, role in (("scheduler", Role.SCHEDULER), ("worker-0", Role.WORKER)):
            tags = {CREATOR_TAG: audit.creator()}  # as the fleet tags every VM
            await driver.create(VMRequest(cluster_id, vm_name, role, RUNS, tags=tags))
        await power_off(driver, cloud.booter, cluster_id, "worker-0")

        deadline = time.monotonic() + 20
        while True:
            found = {s.cluster_id: s for s in await driver.clusters()}[cluster_id]
            shown = {k: v for k, v in found.billing().items() if k.endswith("VM")}
            if shown == bills or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert shown == bills, found
        if provider == "azure":  # its VMs' disks, and the scheduler's public address
            assert found.billing()["disk"] == 2 and found.billing()["address"] == 1
            assert "interface" not in found.billing() and found.resources["interface"] == 2
        assert liveness.client_of(found) == (Client.GONE, pid)

        caplog.set_level(logging.WARNING, logger="dask_secure_cloud.liveness")
        await liveness.warn_leftovers(driver, provider, "dsc-new0000001")
        warned = [r.getMessage() for r in caplog.records if cluster_id in r.getMessage()]
        assert len(warned) == 1 and f"cleanup --expired --provider {provider}" in warned[0]
        await liveness.warn_leftovers(driver, provider, "dsc-new0000002")
        assert len([r for r in caplog.records if cluster_id in r.getMessage()]) == 1

        # What `cleanup --expired` runs for each cluster it chose.
        assert cluster_id in {s.cluster_id for s in liveness.leftovers(await driver.clusters())}
        await delete_cluster(driver, cluster_id)
        assert cluster_id not in {s.cluster_id for s in await driver.clusters()}
    finally:
        liveness._warned.clear()
        await driver.close()
