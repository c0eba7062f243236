"""AzureVMCluster end to end: the async management SDKs -> ARM stand-in (HTTPS) -> VMs booted here."""

from __future__ import annotations

import random

import pytest
from distributed import Client

from dask_secure_cloud import AzureVMCluster
from dask_secure_cloud.cluster import ClusterStartError

from clouds.arm import AzureStandIn
from clouds.booter import VMBooter
from conftest import decoded_files, vm_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SUBSCRIPTION = "5f1b3c2e-8d6a-4b7e-9c0f-1a2b3c4d5e6f"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "0d6c1a52-3f4e-4b8a-9e7d-6c5b4a3f2e1d"
SECRET = "client-secret-never-on-a-vm"


@pytest.fixture
def azure(tmp_path, monkeypatch):
    stand_in = AzureStandIn(
        VMBooter(tmp_path / "vms"),
        subscription=SUBSCRIPTION,
        tenant=TENANT,
        client_id=CLIENT_ID,
        client_secret=SECRET,
    )
    url = stand_in.start()
    stand_in.add_group("dask-rg", "westeurope")
    bundle = tmp_path / "ca.pem"
    stand_in.ca.cert_pem.write_to_path(str(bundle))
    # DefaultAzureCredential's environment source signs in at the stand-in.
    monkeypatch.setenv("AZURE_TENANT_ID", TENANT)
    monkeypatch.setenv("AZURE_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("AZURE_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", url)
    options = {
        "resource_group": "dask-rg",
        "resource_manager_url": url,
        "ca_bundle": str(bundle),
        "scheduler_vm_size": "Standard_D2s_v5",
        "worker_vm_size": "Standard_D4s_v5",
        "address_prefix": f"127.{random.randint(100, 250)}.0.0/16",
        "boot_timeout": "60s",
    }
    yield stand_in, options
    stand_in.stop()


def nothing_left(stand_in: AzureStandIn, cluster_id: str) -> bool:
    return not stand_in.tagged(cluster_id) and not vm_processes(cluster_id)


async def test_azure_cluster_computes_over_tls_and_leaves_nothing(azure):
    stand_in, options = azure
    async with AzureVMCluster(
        n_workers=2, tags={"team": "ml"}, asynchronous=True, **options
    ) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.")
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=60)
            assert await client.submit(sum, range(10)) == 45
        cluster_id = cluster.cluster_id
        kinds = {r["_kind"] for r in stand_in.resources.values()}
        assert {"virtualmachines", "networkinterfaces", "disks", "networksecuritygroups"} <= kinds
        assert not stand_in.of_kind("publicipaddresses")  # private first
    assert nothing_left(stand_in, cluster_id)
    assert stand_in.resources == {}
