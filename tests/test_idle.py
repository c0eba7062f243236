"""A forgotten cluster ends too: ``idle_timeout`` closes an idle cluster whose client is
alive (the lease alone would keep it running), and nothing of it is left."""

import asyncio
import datetime
import logging
import time

import pytest
from distributed import Client
from helpers import any_vm_processes, decoded_files, vm_processes

from dask_secure_cloud import LocalVMCluster, audit
from dask_secure_cloud.cluster import preview
from dask_secure_cloud.errors import OptionError
from dask_secure_cloud.options import ClusterOptions, resolve
from dask_secure_cloud.plan import SCHEDULER_IDLE_GRACE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_idle_timeout_is_on_by_default_and_none_turns_it_off():
    assert resolve(ClusterOptions, {}).idle_timeout == datetime.timedelta(hours=1)
    assert resolve(ClusterOptions, {"idle_timeout": False}).idle_timeout is None
    assert resolve(ClusterOptions, {"idle_timeout": "20m"}).idle_timeout.total_seconds() == 1200


async def test_an_idle_cluster_with_a_live_client_ends_and_leaves_nothing(
    vm_dir, audit_log, caplog
):
    caplog.set_level(logging.WARNING, logger="dask_secure_cloud.cluster")
    async with LocalVMCluster(
        n_workers=1, directory=vm_dir, idle_timeout="3s", asynchronous=True
    ) as cluster:
        assert "idle_timeout=3s" in repr(cluster)
        cluster_id = cluster.cluster_id
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=60)
            assert await client.submit(sum, [1, 2]) == 3  # activity, then idleness
            started = time.monotonic()
            # The cluster closes itself: nothing to await but its status.
            while cluster.status.name != "closed" and time.monotonic() - started < 60:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
            ended = time.monotonic() - started
        assert cluster.status.name == "closed"
        assert 3 <= ended < 30, ended
        assert vm_processes(cluster_id) == [] and any_vm_processes(vm_dir) == []
        assert list(vm_dir.iterdir()) == []  # nothing left: not even a VM's directory
        assert await cluster.driver.list(cluster_id) == []
    events = [e for e in audit.read(audit_log) if e["cluster_id"] == cluster_id]
    fired = [e for e in events if e["event"] == "idle_timeout"]
    assert len(fired) == 1 and fired[0]["idle_timeout"] == 3.0
    assert any("idle for 3s (idle_timeout)" in r.getMessage() for r in caplog.records)


async def test_a_cluster_waiting_for_its_workers_is_not_idle(vm_dir):
    """Workers asked for and still booting: the scheduler has nothing to run, yet the
    user is waiting, so a boot longer than ``idle_timeout`` must not end the cluster."""
    async with LocalVMCluster(
        n_workers=0,
        directory=vm_dir,
        idle_timeout="2s",
        extra_bootstrap=["sleep 6"],  # every VM boots for longer than idle_timeout
        asynchronous=True,
    ) as cluster:
        cluster.scale(1)
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=90)
            assert cluster.status.name == "running"
            assert await client.submit(sum, [1, 2]) == 3
        deadline = time.monotonic() + 60
        while cluster.status.name != "closed" and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        assert cluster.status.name == "closed"  # and once idle, it still ends


def test_the_scheduler_gets_a_later_backstop_and_users_cannot_set_it_twice():
    shown = preview(LocalVMCluster, idle_timeout="10m")
    scheduler = next(iter(shown.user_data.values()))
    files = b"".join(decoded_files(scheduler).values())
    backstop = 600 + SCHEDULER_IDLE_GRACE.total_seconds()
    assert f"{backstop:.0f}s".encode() in files
    off = preview(LocalVMCluster, idle_timeout=None).user_data[next(iter(shown.user_data))]
    off = b"".join(decoded_files(off).values())
    assert b"--idle-timeout" not in off
    with pytest.raises(OptionError, match="idle_timeout"):
        preview(LocalVMCluster, scheduler_options={"idle_timeout": "5m"})


def test_a_synchronous_cluster_ends_too(vm_dir):
    """A notebook's cluster is synchronous: its loop runs on a thread of its own."""
    with LocalVMCluster(n_workers=1, directory=vm_dir, idle_timeout=2) as cluster:
        cluster_id = cluster.cluster_id
        deadline = time.monotonic() + 60
        while cluster.status.name != "closed" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster.status.name == "closed"
    assert vm_processes(cluster_id) == [] and list(vm_dir.iterdir()) == []
