"""The JupyterLab Dask extension's cluster manager drives our clusters from factory config."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import dask.config
import pytest
from dask_labextension.manager import DaskClusterManager
from distributed import Client

from conftest import vm_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def _wait(predicate, timeout=90):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.5)


async def _drive(factory: dict) -> str:
    """Start, scale, adapt and close one cluster from the sidebar's calls; compute on it."""
    with dask.config.set({"labextension.factory": factory, "labextension.initial": []}):
        async with DaskClusterManager() as manager:
            model = await manager.start_cluster(configuration={"workers": 1})
            cluster = manager._clusters[model["id"]]
            assert model["scheduler_address"].startswith("tls://")
            assert model["name"].startswith(factory["class"])
            await _dashboard_panes_load(model["dashboard_link"])
            # Client(cluster) picks up the cluster's own TLS credentials.
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(1, timeout=90)
                assert await client.submit(lambda x: x + 1, 1) == 2
                model = await manager.scale_cluster(model["id"], 2)
                await client.wait_for_workers(2, timeout=90)
                assert manager.get_cluster(model["id"])["workers"] == 2
                model = manager.adapt_cluster(model["id"], 1, 3)
                assert model["adapt"] == {"minimum": 1, "maximum": 3}
                futures = client.map(lambda i: time.sleep(0.5) or i, range(40), pure=False)
                assert sum(await client.gather(futures)) == sum(range(40))
            cluster_id = cluster.cluster_id
            assert cluster.security is not None and cluster.security.require_encryption
            await manager.close_cluster(model["id"])
            assert manager.list_clusters() == []
    return cluster_id


async def _dashboard_panes_load(link: str) -> None:
    """What the extension's dashboard panes fetch, through the cluster's ``dashboard_link``:
    the list of plots, then one plot's page."""
    assert link.startswith("http://127.0.0.1:") and link.endswith("/status")
    base = link[: -len("/status")]

    def get(path: str) -> bytes:
        with urllib.request.urlopen(base + path, timeout=30) as response:
            assert response.status == 200
            return response.read()

    plots = json.loads(await asyncio.to_thread(get, "/individual-plots.json"))
    assert "/individual-task-stream" in plots.values()
    assert b"bokeh" in (await asyncio.to_thread(get, "/individual-task-stream")).lower()


async def test_lab_manager_drives_a_local_vm_cluster(vm_dir):
    cluster_id = await _drive(
        {
            "module": "dask_secure_cloud",
            "class": "LocalVMCluster",
            "args": [],
            "kwargs": {"directory": str(vm_dir)},
        }
    )
    await _wait(lambda: not vm_processes(cluster_id), timeout=30)


async def test_lab_manager_drives_an_azure_cluster(azure):
    stand_in, options = azure
    cluster_id = await _drive(
        {
            "module": "dask_secure_cloud",
            "class": "AzureVMCluster",
            "args": [],
            # Keys as they are written in YAML config files.
            "kwargs": {k.replace("_", "-"): v for k, v in options.items()},
        }
    )
    assert not stand_in.tagged(cluster_id) and not vm_processes(cluster_id)
