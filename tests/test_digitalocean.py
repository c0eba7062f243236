"""DropletCluster end to end: pydo.aio -> DigitalOcean stand-in (HTTPS) -> VMs booted here."""

from __future__ import annotations

import os

import pytest
from distributed import Client

from dask_secure_cloud import DropletCluster
from dask_secure_cloud.cluster import ClusterStartError
from dask_secure_cloud.network import NetworkPolicyError

from clouds.booter import VMBooter
from clouds.digitalocean import DigitalOceanStandIn
from conftest import decoded_files, vm_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
TOKEN = "dop_v1_test_token_never_on_a_droplet"
OVERSIZED = [f"echo {os.urandom(60).hex()}" for _ in range(900)]


@pytest.fixture
def do(tmp_path, monkeypatch):
    stand_in = DigitalOceanStandIn(VMBooter(tmp_path / "vms"), TOKEN, droplet_limit=4)
    url = stand_in.start()
    bundle = tmp_path / "ca.pem"
    stand_in.ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("DIGITALOCEAN_TOKEN", TOKEN)
    options = {
        "api_url": url,
        "ca_bundle": str(bundle),  # trust the stand-in's test CA
        "region": "nyc3",
        "scheduler_size": "s-1vcpu-1gb",
        "worker_size": "s-2vcpu-4gb",
        "use_private_ip": True,
        "boot_timeout": "60s",
    }
    yield stand_in, options
    stand_in.stop()


def nothing_left(stand_in: DigitalOceanStandIn, cluster_id: str) -> bool:
    tag = f"dask-secure-cloud-{cluster_id}"
    return (
        not [d for d in stand_in.droplets.values() if tag in d["tags"]]
        and not [f for f in stand_in.firewalls.values() if f["name"] == tag]
        and not [v for v in stand_in.vpcs.values() if v["name"] == tag]
        and tag not in stand_in.tags
        and not vm_processes(cluster_id)
    )


async def test_droplet_cluster_computes_over_tls_and_leaves_nothing(do):
    stand_in, options = do
    async with DropletCluster(
        n_workers=2, tags=["team:ml"], asynchronous=True, **options
    ) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.")
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=60)
            assert await client.submit(sum, range(10)) == 45
            workers = list(cluster.scheduler_info["workers"])
        cluster_id = cluster.cluster_id
        tag = f"dask-secure-cloud-{cluster_id}"
        vpc = next(v for v in stand_in.vpcs.values() if v["name"] == tag)
        # Workers reach the scheduler over the VPC's private addresses.
        network = vpc["ip_range"].rsplit(".", 2)[0]
        assert all(w.split("//")[1].startswith(network) for w in workers)
        droplets = [b for kind, b in stand_in.bodies if kind == "droplet"]
        assert len(droplets) == 3
        for body in droplets:
            assert tag in body["tags"] and "team:ml" in body["tags"]
            assert body["vpc_uuid"] == vpc["id"]
            assert len(body["user_data"].encode()) < 8 * 1024
            assert TOKEN not in body["user_data"]
            files = decoded_files(body["user_data"].encode())
            assert not any(TOKEN.encode() in f for f in files.values())
            assert not any(
                b"secure-cloud" in f for p, f in files.items() if p.endswith("dask.yaml")
            )
            assert "ssh_keys" not in body
        firewall = next(f for f in stand_in.firewalls.values() if f["name"] == tag)
        assert firewall["tags"] == [tag]
        ports = {
            r["ports"]: r["sources"] for r in firewall["inbound_rules"] if r["protocol"] == "tcp"
        }
        assert ports["8786"] == {"addresses": [vpc["ip_range"]]}
        assert ports["all"] == {"tags": [tag]}
        assert len(firewall["inbound_rules"]) == 4  # nothing else comes in
    assert nothing_left(stand_in, cluster_id)


async def test_given_vpc_is_used_and_kept(do):
    stand_in, options = do
    stand_in.vpcs["mine"] = {
        "id": "mine",
        "name": "my-vpc",
        "region": "nyc3",
        "ip_range": "127.77.16.0/20",
        "description": "",
        "default": False,
    }
    async with DropletCluster(
        n_workers=1, vpc_uuid="mine", asynchronous=True, **options
    ) as cluster:
        cluster_id = cluster.cluster_id
        assert cluster.scheduler_address.startswith("tls://127.77.")
    assert nothing_left(stand_in, cluster_id)
    assert "mine" in stand_in.vpcs


async def test_rate_limit_is_waited_out(do):
    stand_in, options = do
    stand_in.rate_limit("droplets.create")
    stand_in.rate_limit("firewalls.create")
    async with DropletCluster(n_workers=1, asynchronous=True, **options) as cluster:
        cluster_id = cluster.cluster_id
        assert len(stand_in.droplets) == 2
    assert stand_in.calls.count("droplets.create") == 3
    assert nothing_left(stand_in, cluster_id)


START_CALLS = [
    "regions.list",
    "account.get",
    "droplets.list",
    "tags.create",
    "vpcs.create",
    "vpcs.get",
    "firewalls.create",
    "droplets.create",
    "droplets.get",
]


@pytest.mark.parametrize("call", START_CALLS)
async def test_failure_at_each_start_call_leaves_nothing(do, call):
    stand_in, options = do
    # 5xx answers are retried by pydo itself; a 422 is final.
    stand_in.fail(call, 422, "unprocessable_entity")
    with pytest.raises(ClusterStartError, match="unprocessable_entity"):
        await DropletCluster(n_workers=1, asynchronous=True, **options)
    assert not stand_in.droplets and not stand_in.firewalls and not stand_in.vpcs
    assert not stand_in.tags and stand_in.booter.vms == {}


@pytest.mark.parametrize(
    "call",
    [
        "droplets.destroy",
        "droplets.list",
        "firewalls.list",
        "firewalls.delete",
        "vpcs.delete",
        "tags.delete",
    ],
)
async def test_failure_at_each_close_call_still_leaves_nothing(do, call):
    stand_in, options = do
    cluster = await DropletCluster(n_workers=1, asynchronous=True, **options)
    stand_in.fail(call, 500, "server_error")
    await cluster.close()
    assert nothing_left(stand_in, cluster.cluster_id)
    assert not stand_in.droplets and not stand_in.firewalls and not stand_in.vpcs


async def test_start_beyond_the_droplet_limit_is_refused_before_any_resource(do):
    stand_in, options = do  # droplet limit 4
    with pytest.raises(
        ClusterStartError,
        match=r"needs 5 droplets and the account may start 4 more \(droplet limit 4, 0 in use\)"
        r".*n_workers",
    ):
        await DropletCluster(n_workers=4, asynchronous=True, **options)
    made = {"tags.create", "vpcs.create", "firewalls.create", "droplets.create"}
    assert "account.get" in stand_in.calls and not made & set(stand_in.calls)


async def test_droplet_limit_check_counts_droplets_already_running(do):
    stand_in, options = do
    async with DropletCluster(n_workers=1, asynchronous=True, **options):  # 2 of 4
        with pytest.raises(ClusterStartError, match=r"needs 3 droplets.*2 more.*2 in use"):
            await DropletCluster(n_workers=2, asynchronous=True, **options)
        assert stand_in.calls.count("droplets.create") == 2
    assert not stand_in.droplets and not stand_in.firewalls and not stand_in.vpcs


async def test_droplet_limit_without_account_scope_is_a_clear_error_and_leaves_nothing(do):
    stand_in, options = do
    # A token without account:read: no pre-check, DigitalOcean refuses the fifth droplet.
    stand_in.fail("account.get", 403, "forbidden")
    with pytest.raises(ClusterStartError, match="exceed your droplet limit"):
        await DropletCluster(n_workers=4, asynchronous=True, **options)
    assert stand_in.calls.count("droplets.create") == 5
    assert not stand_in.droplets and not stand_in.firewalls and not stand_in.vpcs


@pytest.mark.parametrize(
    "change,match",
    [
        ({"region": "nyc9"}, "region 'nyc9' is not a DigitalOcean region. Did you mean 'nyc3'"),
        ({"worker_size": "s-64vcpu-1tb"}, "worker_size 's-64vcpu-1tb' is not offered in nyc3"),
    ],
)
async def test_unknown_region_or_size_fails_before_any_resource(do, change, match):
    stand_in, options = do
    with pytest.raises(ClusterStartError, match=match):
        await DropletCluster(asynchronous=True, **{**options, **change})
    made = {"tags.create", "vpcs.create", "firewalls.create", "droplets.create"}
    assert not made & set(stand_in.calls)


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"security": False}, NetworkPolicyError, "allow_insecure_public"),
        ({"tags": ["no spaces"]}, ValueError, "not a DigitalOcean tag"),
        ({"extra_bootstrap": OVERSIZED}, ValueError, "DigitalOcean user_data allows 65,536"),
    ],
)
def test_bad_input_is_refused_before_any_call(do, change, error, match):
    stand_in, options = do
    with pytest.raises(error, match=match):
        DropletCluster(**{**options, **change})
    assert stand_in.calls == []


def test_missing_token_is_named(do, monkeypatch):
    stand_in, options = do
    monkeypatch.delenv("DIGITALOCEAN_TOKEN")
    with pytest.raises(ValueError, match="DIGITALOCEAN_TOKEN"):
        DropletCluster(**options)
    assert stand_in.calls == []


async def test_wrong_token_is_a_clear_error(do, monkeypatch):
    stand_in, options = do
    with pytest.raises(ClusterStartError, match="refused the API token"):
        await DropletCluster(token="dop_v1_wrong", asynchronous=True, **options)
    assert not stand_in.droplets


def test_stand_in_refuses_what_the_spec_refuses(do):
    from clouds.digitalocean import SCHEMAS, APIError, validate

    schema, required = SCHEMAS["droplet"]
    for body, message in (
        ({"name": "a", "size": "s"}, "image is required"),
        ({"name": "a", "size": "s", "image": "x", "user_data": "#" * 70_000}, "too long"),
        ({"name": "a", "size": "s", "image": "x", "monitorin": True}, "not a known attribute"),
        ({"name": "bad name", "size": "s", "image": "x"}, "name is invalid"),
        ({"name": "a", "size": "s", "image": "x", "ipv6": "yes"}, "must be a boolean"),
    ):
        with pytest.raises(APIError, match=message):
            validate(body, schema, required)
