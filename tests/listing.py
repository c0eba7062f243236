"""One check, run against each cloud's stand-in: ``clusters()`` finds a running cluster and
what a killed start left behind, and ``delete_cluster`` removes the latter."""

from __future__ import annotations

from dask_secure_cloud.cluster import delete_cluster, preview

#: A cluster whose start was killed right after its network was made.
ORPHAN = "dsc-0ddba11000"


async def check_listing(cls: type, options: dict, running_vms: int = 2) -> None:
    async with cls(n_workers=running_vms - 1, asynchronous=True, **options) as cluster:
        driver = preview(cls, **options).driver
        try:
            await driver.prepare(ORPHAN)
            found = {s.cluster_id: s for s in await driver.clusters()}
            running = found[cluster.cluster_id]
            assert running.vms == running_vms and running.created is not None
            assert running.creator
            orphan = found[ORPHAN]
            assert orphan.vms == 0 and orphan.other >= 1
            await delete_cluster(driver, ORPHAN)
            assert ORPHAN not in {s.cluster_id for s in await driver.clusters()}
        finally:
            await driver.close()
