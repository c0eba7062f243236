"""GCPCluster end to end: google-cloud-compute (REST) -> GCE stand-in -> VMs booted here."""

from __future__ import annotations

import random

import pytest
from distributed import Client
from google.auth.credentials import AnonymousCredentials

from dask_secure_cloud import GCPCluster
from dask_secure_cloud.cluster import ClusterStartError

from clouds.booter import VMBooter
from clouds.gce import GCEStandIn
from conftest import decoded_files, vm_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
PROJECT, ZONE = "dsc-test-project", "us-central1-a"


@pytest.fixture
def gce(tmp_path):
    stand_in = GCEStandIn(
        VMBooter(tmp_path / "vms"), PROJECT, ZONE, f"127.{random.randint(1, 254)}.1.0/24"
    )
    url = stand_in.start()
    options = {
        "project": PROJECT,
        "zone": ZONE,
        "api_endpoint": url,
        "credentials": AnonymousCredentials(),
        "use_private_ip": True,
        "scheduler_machine_type": "e2-small",
        "worker_machine_type": "e2-standard-2",
        "boot_timeout": "60s",
    }
    yield stand_in, options
    stand_in.stop()


def nothing_left(stand_in: GCEStandIn, cluster_id: str) -> bool:
    labelled = [
        r
        for r in stand_in.instances.values()
        if r["labels"].get("dask-secure-cloud-cluster") == cluster_id
    ]
    rules = [n for n in stand_in.firewalls if cluster_id in n]
    return not labelled and not rules and not vm_processes(cluster_id)


async def test_gcp_cluster_computes_over_tls_and_leaves_nothing(gce):
    stand_in, options = gce
    async with GCPCluster(
        n_workers=2, max_run_duration="8h", labels={"team": "ml"}, asynchronous=True, **options
    ) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.")
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=60)
            assert await client.submit(sum, range(10)) == 45
        cluster_id = cluster.cluster_id
        inserts = [body for call, body in stand_in.requests if call == "instances.insert"]
        assert len(inserts) == 3
        for body in inserts:
            assert body["labels"]["dask-secure-cloud-cluster"] == cluster_id
            assert body["labels"]["team"] == "ml"
            assert f"dask-secure-cloud-{cluster_id}" in body["tags"]["items"]
            assert body["scheduling"]["maxRunDuration"]["seconds"] == str(8 * 3600)
            assert body["scheduling"]["instanceTerminationAction"] == "DELETE"
            assert "accessConfigs" not in body["networkInterfaces"][0]  # no external address
            assert "serviceAccounts" not in body  # the VMs hold no Google token
            user_data = next(
                i["value"] for i in body["metadata"]["items"] if i["key"] == "user-data"
            )
            assert all(
                b"BEGIN EC PRIVATE" not in f for f in decoded_files(user_data.encode()).values()
            )
            assert not any(
                cluster._credentials.client.key_pem.encode() in f
                for f in decoded_files(user_data.encode()).values()
            )
        rules = {
            body["name"]: body for call, body in stand_in.requests if call == "firewalls.insert"
        }
        client_rule = rules[f"dask-secure-cloud-{cluster_id}-client"]
        assert sorted(client_rule["allowed"][0]["ports"]) == ["8786", "8787"]
        assert client_rule["sourceRanges"] == [str(stand_in.subnet)]  # client inside the VPC
        assert client_rule["targetTags"] == [f"dask-secure-cloud-{cluster_id}"]
        internal = rules[f"dask-secure-cloud-{cluster_id}-internal"]
        assert internal["sourceTags"] == internal["targetTags"]
    assert nothing_left(stand_in, cluster_id)
    # Every call went to the stand-in: the network guard in conftest refuses any other host.
    assert "zoneOperations.wait" in stand_in.calls


async def test_spot_and_gpu_workers(gce):
    stand_in, options = gce
    async with GCPCluster(
        n_workers=1,
        worker_spot=True,
        gpu_type="nvidia-tesla-t4",
        gpu_count=1,
        runtime="native",
        asynchronous=True,
        **options,
    ) as cluster:
        worker = [b for c, b in stand_in.requests if c == "instances.insert"][-1]
        assert worker["scheduling"]["provisioningModel"] == "SPOT"
        assert worker["scheduling"]["onHostMaintenance"] == "TERMINATE"
        assert worker["guestAccelerators"][0]["acceleratorCount"] == 1
        cluster_id = cluster.cluster_id
    assert nothing_left(stand_in, cluster_id)


START_CALLS = [
    "zones.get",
    "machineTypes.get",
    "images.getFromFamily",
    "subnetworks.list",
    "firewalls.insert",
    "globalOperations.wait",
    "instances.insert",
    "zoneOperations.wait",
    "instances.get",
]


@pytest.mark.parametrize("call", START_CALLS)
async def test_failure_at_each_start_call_leaves_nothing(gce, call):
    stand_in, options = gce
    stand_in.fail(call, 403, "forbidden")
    with pytest.raises(ClusterStartError, match=r"permission denied|injected"):
        await GCPCluster(n_workers=1, asynchronous=True, **options)
    assert not stand_in.instances and not stand_in.firewalls
    assert stand_in.booter.vms == {}


@pytest.mark.parametrize(
    "call", ["instances.delete", "instances.list", "firewalls.list", "firewalls.delete"]
)
async def test_failure_at_each_close_call_still_leaves_nothing(gce, call):
    stand_in, options = gce
    cluster = await GCPCluster(n_workers=1, asynchronous=True, **options)
    stand_in.fail(call, 503, "backendError")
    await cluster.close()
    assert nothing_left(stand_in, cluster.cluster_id)
    assert not stand_in.instances and not stand_in.firewalls


async def test_quota_error_surfaces_from_the_operation(gce):
    stand_in, options = gce
    stand_in.quota_exceeded()
    with pytest.raises(ClusterStartError, match="QUOTA_EXCEEDED: Quota 'CPUS' exceeded"):
        await GCPCluster(n_workers=1, asynchronous=True, **options)
    assert not stand_in.instances and not stand_in.firewalls


@pytest.mark.parametrize(
    "change,match",
    [
        ({"zone": "us-central9-z"}, "zone 'us-central9-z' not found"),
        ({"worker_machine_type": "e2-gigantic"}, "worker_machine_type 'e2-gigantic'"),
    ],
)
async def test_unknown_zone_or_machine_type_fails_before_any_resource(gce, change, match):
    stand_in, options = gce
    with pytest.raises(ClusterStartError, match=match):
        await GCPCluster(asynchronous=True, **{**options, **change})
    assert "firewalls.insert" not in stand_in.calls and "instances.insert" not in stand_in.calls


@pytest.mark.parametrize(
    "change,match",
    [
        ({"zone": "Central"}, "zone must look like"),
        ({"labels": {"Team": "x"}}, "not a valid label"),
        ({"disk_size": 5}, "disk_size"),
        ({"gpu_count": 1}, "gpu_count needs gpu_type"),
        ({"security": False, "use_private_ip": False}, "allow_insecure_public"),
    ],
)
def test_bad_input_is_refused_before_any_call(gce, change, match):
    stand_in, options = gce
    with pytest.raises(ValueError, match=match):
        GCPCluster(**{**options, **change})
    assert stand_in.calls == []


def test_stand_in_refuses_unknown_fields(gce):
    stand_in, _ = gce
    from clouds.gce import APIError

    with pytest.raises(APIError, match="Invalid JSON payload"):
        stand_in.insert_instance(b'{"name": "x", "machineTypo": "e2-small"}')


async def test_rate_limits_are_retried(gce):
    stand_in, options = gce
    stand_in.fail("instances.insert", 429, "rateLimitExceeded")
    stand_in.fail("firewalls.insert", 503, "backendError")
    async with GCPCluster(n_workers=1, asynchronous=True, **options) as cluster:
        cluster_id = cluster.cluster_id
        assert len(stand_in.instances) == 2
    assert stand_in.calls.count("instances.insert") == 3  # one refused, then two
    assert nothing_left(stand_in, cluster_id)


async def test_list_finds_clusters_and_what_a_killed_start_left(gce):
    from listing import check_listing

    stand_in, options = gce
    await check_listing(GCPCluster, options)
    assert not stand_in.instances and not stand_in.firewalls
