"""Two checks of the driver contract, run against each cloud's stand-in.

``check_named_clusters``: clusters whose ids the user chose (``name=``), not generated
``dsc-...`` ones, are listed by ``clusters()`` and deleted by ``delete_cluster`` (what
``dask secure-cloud cleanup`` runs), and deleting one never touches another whose id
starts like it (``nightly``, ``nightly-etl``) or ends where its scheduler-only names
would (``nightly-etl-scheduler``).

``check_polls``: ``Driver.state`` says ``"unknown"`` for a poll the cloud throttled or
failed, never ``"terminated"``; ``"terminated"`` once the VM is gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dask_secure_cloud.cluster import delete_cluster, preview
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.driver import ClusterSummary, VMRequest

#: The user's name for a running cluster, and two killed starts named around it.
NAMED = "nightly-etl"
PREFIX = "nightly"
SUFFIXED = "nightly-etl-scheduler"
#: User-data of a process VM that keeps running (one with nothing to run ends at once,
#: and some stand-ins then end the instance, as a cloud does when its OS powers off).
RUNS = b"#cloud-config\nruncmd:\n  - [sleep, '300']\n"


async def _found(driver: Any) -> dict[str, ClusterSummary]:
    return {s.cluster_id: s for s in await driver.clusters()}


async def _gone(nothing_left: Callable[[str], bool], cluster_id: str) -> bool:
    """``nothing_left(cluster_id)`` within a few seconds: a stand-in ends a deleted VM's
    processes a moment after the cloud reports it deleted."""
    deadline = time.monotonic() + 15
    while not nothing_left(cluster_id):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def check_named_clusters(
    cls: type, options: Mapping[str, Any], nothing_left: Callable[[str], bool]
) -> None:
    """Start ``cls(name=NAMED)``; beside it, what killed starts named ``PREFIX`` and
    ``SUFFIXED`` left (their network). List them all, clean them up one by one, and
    check each cleanup took its own cluster's resources and nothing else."""
    driver = preview(cls, **options).driver
    try:
        async with cls(name=NAMED, n_workers=1, asynchronous=True, **options) as cluster:
            assert cluster.cluster_id == NAMED
            for orphan in (PREFIX, SUFFIXED):
                await driver.prepare(orphan)
            found = await _found(driver)
            assert found[NAMED].vms == 2 and found[NAMED].other >= 1, found
            for orphan in (PREFIX, SUFFIXED):
                assert found[orphan].vms == 0 and found[orphan].other >= 1, found

            await delete_cluster(driver, PREFIX)
            assert await _gone(nothing_left, PREFIX)
            after = await _found(driver)
            assert PREFIX not in after
            assert after[NAMED] == found[NAMED] and after[SUFFIXED] == found[SUFFIXED]

            # `dask secure-cloud cleanup nightly-etl`, as after a killed client.
            assert sorted(await delete_cluster(driver, NAMED)) == ["scheduler", "worker-0"]
            assert await _gone(nothing_left, NAMED)
            after = await _found(driver)
            assert NAMED not in after and after[SUFFIXED] == found[SUFFIXED]

            await delete_cluster(driver, SUFFIXED)
            assert await _gone(nothing_left, SUFFIXED)
            assert SUFFIXED not in await _found(driver)
    finally:
        await driver.close()
    assert await _gone(nothing_left, NAMED)  # closing the cluster found nothing more


async def check_polls(
    cls: type,
    options: Mapping[str, Any],
    faults: Sequence[Callable[[], None]],
    nothing_left: Callable[[str], bool],
) -> None:
    """A VM made by the driver alone: ``state`` is ``"running"``; ``"unknown"`` for each
    poll that one of ``faults`` (each arranges the next poll's answer) spoils; then
    ``"running"`` again, and ``"terminated"`` once the VM is deleted."""
    cluster_id = "poll-test"
    driver = preview(cls, **options).driver
    try:
        await driver.prepare(cluster_id)
        vm = await driver.create(VMRequest(cluster_id, "worker-0", Role.WORKER, RUNS))
        assert await driver.state(vm) == "running"
        for fault in faults:
            fault()
            assert await driver.state(vm) == "unknown", fault
        assert await driver.state(vm) == "running"
        await driver.destroy(vm)
        assert await driver.state(vm) == "terminated"
        await driver.release(cluster_id)
    finally:
        await driver.close()
    assert await _gone(nothing_left, cluster_id)
