"""A zone with no capacity, spot with no capacity, a quota used up: on each stand-in.

Zone A refuses the worker's size: the cluster starts with the worker in zone B, and says
so in its log and the audit log. Spot refused: the worker runs on-demand when
``spot_fallback`` allows it, and the start is refused naming the option when it does
not. A quota refusal names the quota, its region and its limit, and is never retried. A
zone pinned by an option is never left: its refusal names the option. Nothing is left
behind in any of them.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
from distributed import Client
from helpers import vm_processes
from test_aws import all_clusters_gone
from test_azure import nothing_left
from test_cost import (
    _serve_aws,
    prices,  # noqa: F401 (a fixture)
)
from test_digitalocean import do  # noqa: F401 (a fixture)
from test_gcp import gce  # noqa: F401 (a fixture)
from test_gcp import nothing_left as gce_nothing_left

from dask_secure_cloud import audit, pricing
from dask_secure_cloud.errors import CapacityError, ClusterStartError, QuotaError
from dask_secure_cloud.options import EC2Options, resolve
from dask_secure_cloud.providers.aws import EC2Cluster
from dask_secure_cloud.providers.azure import AzureVMCluster
from dask_secure_cloud.providers.digitalocean import DropletCluster
from dask_secure_cloud.providers.gcp import GCPCluster

from standins import start_ec2, stop_ec2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def price_lists(request):
    """The price lists' stand-in (``test_cost``'s fixture)."""
    return request.getfixturevalue("prices")


@pytest.fixture
def gcp(request):
    """The Compute Engine stand-in and options (``test_gcp``'s fixture)."""
    return request.getfixturevalue("gce")


@pytest.fixture
def droplets(request):
    """The DigitalOcean stand-in, droplet limit 4 (``test_digitalocean``'s fixture)."""
    return request.getfixturevalue("do")


def events(cluster_id: str, event: str) -> list[dict[str, Any]]:
    return [e for e in audit.read() if e["cluster_id"] == cluster_id and e["event"] == event]


def all_events(event: str) -> list[dict[str, Any]]:
    return [e for e in audit.read() if e["event"] == event]


def cause(error: BaseException, kind: type) -> BaseException | None:
    """The first error of ``kind`` in ``error``'s chain of causes."""
    while error is not None:
        if isinstance(error, kind):
            return error
        error = error.__cause__  # type: ignore[assignment]
    return None


# -- EC2 --------------------------------------------------------------------------------


@pytest.fixture
def ec2(tmp_path, monkeypatch):
    """The EC2 stand-in with a VPC of two subnets, in us-east-1a and us-east-1b, both
    out through an internet gateway: the options name the VPC, not a subnet."""
    stand_in, client, options = start_ec2(tmp_path, monkeypatch)
    second = random.randint(1, 254)
    vpc = client.create_vpc(CidrBlock=f"127.{second}.0.0/16")["Vpc"]["VpcId"]
    subnets = {
        zone: client.create_subnet(
            VpcId=vpc, CidrBlock=f"127.{second}.{i}.0/24", AvailabilityZone=zone
        )["Subnet"]["SubnetId"]
        for i, zone in enumerate(("us-east-1a", "us-east-1b"), 1)
    }
    gateway = client.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    client.attach_internet_gateway(InternetGatewayId=gateway, VpcId=vpc)
    (main,) = client.describe_route_tables(
        Filters=[
            {"Name": "vpc-id", "Values": [vpc]},
            {"Name": "association.main", "Values": ["true"]},
        ]
    )["RouteTables"]
    client.create_route(
        RouteTableId=main["RouteTableId"], DestinationCidrBlock="0.0.0.0/0", GatewayId=gateway
    )
    options = {**options, "vpc": vpc, "subnet_id": None}
    # The cluster's zone is its first subnet's (by id, none being a zone's default).
    home = min(subnets, key=subnets.__getitem__)
    other = next(zone for zone in subnets if zone != home)
    try:
        yield stand_in, client, options, subnets, home, other
    finally:
        stop_ec2(stand_in)


def ec2_zones(client, cluster_id: str) -> dict[str, str]:
    """Each of the cluster's live instances' name -> its availability zone."""
    found = {}
    tag = [{"Name": "tag:dask-secure-cloud-cluster", "Values": [cluster_id]}]
    for reservation in client.describe_instances(Filters=tag)["Reservations"]:
        for instance in reservation["Instances"]:
            if instance["State"]["Name"] == "terminated":
                continue
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            name = tags["Name"].removeprefix(f"dask-secure-cloud-{cluster_id}-")
            found[name] = instance["Placement"]["AvailabilityZone"]
    return found


def ec2_markets(stand_in) -> list[str]:
    """The market of each RunInstances request the stand-in received, in order."""
    return [p.get("InstanceMarketOptions.MarketType", "on-demand") for p in stand_in.launches]


async def test_ec2_worker_moves_to_another_zone_and_says_so(ec2):
    stand_in, client, options, _, A, B = ec2
    stand_in.refuse_capacity(A, options["worker_instance_type"])
    started = time.monotonic()
    async with EC2Cluster(n_workers=1, asynchronous=True, **options) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
            assert await dask_client.submit(lambda: 6 * 7) == 42
        took = time.monotonic() - started
        zones = ec2_zones(client, cluster.cluster_id)
        # The scheduler stays in the cluster's zone; only the refused worker moved.
        assert zones == {"scheduler": A, "worker-0": B}
        logs = "\n".join(str(line) for line in cluster._cluster_manager_logs)
        assert f"worker VM worker-0 launched in zone {B} instead of zone {A}" in logs
        assert "InsufficientInstanceCapacity" in logs
        (moved,) = events(cluster.cluster_id, "vm_moved")
        assert moved["from_zone"] == A and moved["to_zone"] == B
        assert "InsufficientInstanceCapacity" in moved["reasons"][0]
        launched = {e["name"]: e["zone"] for e in events(cluster.cluster_id, "vm_launched")}
        assert launched == {"scheduler": A, "worker-0": B}
        cluster_id = cluster.cluster_id
    print(f"EC2 start with a zone failover: {took:.1f}s")
    assert stand_in.calls.count("RunInstances") == 3  # scheduler, refused worker, worker
    assert all_clusters_gone(client) and ec2_zones(client, cluster_id) == {}


async def test_ec2_scheduler_moves_the_cluster_before_any_worker(ec2):
    stand_in, client, options, _, A, B = ec2
    stand_in.refuse_capacity(A, options["scheduler_instance_type"])
    async with EC2Cluster(n_workers=1, asynchronous=True, **options) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
        # Workers follow the scheduler: the worker was never tried in the first zone.
        assert ec2_zones(client, cluster.cluster_id) == {"scheduler": B, "worker-0": B}
        (moved,) = events(cluster.cluster_id, "vm_moved")
        assert moved["role"] == "scheduler"
    assert stand_in.calls.count("RunInstances") == 3
    assert all_clusters_gone(client)


async def test_ec2_spot_refused_runs_on_demand_where_allowed(price_lists, ec2):
    stand_in, client, options, _, A, _ = ec2
    _serve_aws(price_lists)
    stand_in.refuse_capacity(A, options["worker_instance_type"], spot=True)
    spot = pricing.estimate(resolve(EC2Options, {**options, "worker_spot": True}), 1).hourly(1)
    on_demand = pricing.estimate(resolve(EC2Options, options), 1).hourly(1)
    async with EC2Cluster(n_workers=1, asynchronous=True, worker_spot=True, **options) as cluster:
        # With no cap too, the reprs price the workers on-demand from now on.
        assert f"cost={pricing.money(on_demand)}/h (workers priced on-demand" in repr(cluster)
        assert pricing.money(spot) not in repr(cluster)
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
        # On-demand in the same zone, before another zone.
        assert ec2_zones(client, cluster.cluster_id)["worker-0"] == A
        (moved,) = events(cluster.cluster_id, "vm_moved")
        assert moved["spot_asked"] and not moved["spot"]
        logs = "\n".join(str(line) for line in cluster._cluster_manager_logs)
        assert "on-demand instead of spot" in logs
    assert ec2_markets(stand_in) == ["on-demand", "spot", "on-demand"]
    assert all_clusters_gone(client)


async def test_ec2_spot_refused_everywhere_is_refused_without_fallback(ec2):
    stand_in, client, options, _, A, B = ec2
    for zone in (A, B):
        stand_in.refuse_capacity(zone, options["worker_instance_type"], spot=True)
    with pytest.raises(ClusterStartError, match="spot_fallback=False") as refused:
        await EC2Cluster(
            n_workers=1, asynchronous=True, worker_spot=True, spot_fallback=False, **options
        )
    assert cause(refused.value, CapacityError) is not None
    # Spot was tried once in each zone, never on-demand.
    assert ec2_markets(stand_in) == ["on-demand", "spot", "spot"]
    assert all_clusters_gone(client)
    assert stand_in.booter.vms == {}


@pytest.mark.parametrize("fits", [True, False])
async def test_ec2_on_demand_fallback_stays_within_the_cost_cap(price_lists, ec2, fits):
    """The fallback is taken only where the cluster, every worker on-demand, stays
    within max_hourly_cost: priced from the price list and EC2's spot history."""
    stand_in, client, options, _, A, B = ec2
    _serve_aws(price_lists)
    spot = pricing.estimate(resolve(EC2Options, {**options, "worker_spot": True}), 1).hourly(1)
    on_demand = pricing.estimate(resolve(EC2Options, options), 1).hourly(1)
    assert spot is not None and on_demand is not None and spot < on_demand
    cap = on_demand if fits else (spot + on_demand) / 2
    for zone in (A, B):
        stand_in.refuse_capacity(zone, options["worker_instance_type"], spot=True)
    spot_options = {**options, "worker_spot": True, "max_hourly_cost": cap}
    if fits:
        async with EC2Cluster(n_workers=1, asynchronous=True, **spot_options) as cluster:
            (moved,) = events(cluster.cluster_id, "vm_moved")
            assert moved["spot_asked"] and not moved["spot"] and moved["to_zone"] == A
            # From now on the cap prices workers on-demand, which it holds one of, and
            # the reprs show that price.
            assert cluster._workers_within_cap() == 1
            shown = f"cost={pricing.money(on_demand)}/h (workers priced on-demand: spot capacity"
            assert shown in repr(cluster)
            assert "priced on-demand: spot capacity ran out" in cluster._repr_html_()
            with pytest.raises(pricing.CostLimitError, match="above max_hourly_cost"):
                cluster.scale(2)
        assert ec2_markets(stand_in) == ["on-demand", "spot", "on-demand"]
    else:
        with pytest.raises(ClusterStartError, match="above max_hourly_cost") as refused:
            await EC2Cluster(n_workers=1, asynchronous=True, **spot_options)
        assert pricing.money(cap) in str(refused.value)
        # Spot in each zone, never on-demand.
        assert ec2_markets(stand_in) == ["on-demand", "spot", "spot"]
    assert all_clusters_gone(client)


async def test_ec2_quota_is_reported_and_not_retried(ec2):
    stand_in, client, options, *_ = ec2
    stand_in.refuse_quota("VcpuLimitExceeded", limit=32)
    with pytest.raises(ClusterStartError, match="VcpuLimitExceeded") as refused:
        await EC2Cluster(n_workers=1, asynchronous=True, **options)
    quota = cause(refused.value, QuotaError)
    assert isinstance(quota, QuotaError)
    assert quota.region == "us-east-1" and quota.limit == 32 and "vCPU" in str(quota.quota)
    assert "current limit 32" in str(refused.value) and "region us-east-1" in str(refused.value)
    # One RunInstances, in one zone: a quota is the account's, not the zone's.
    assert stand_in.calls.count("RunInstances") == 1
    assert all_clusters_gone(client)


async def test_ec2_pinned_subnet_is_never_left(ec2):
    stand_in, client, options, subnets, A, _ = ec2
    stand_in.refuse_capacity(A, options["worker_instance_type"])
    pinned = {**options, "subnet_id": subnets[A]}
    with pytest.raises(ClusterStartError, match="subnet_id") as refused:
        await EC2Cluster(n_workers=1, asynchronous=True, **pinned)
    assert "Not tried in another zone" in str(refused.value)
    assert cause(refused.value, CapacityError) is not None
    assert stand_in.calls.count("RunInstances") == 2  # the scheduler, the worker once
    assert all_clusters_gone(client)
    assert stand_in.booter.vms == {}


# -- Azure ------------------------------------------------------------------------------


def azure_vms(stand_in, cluster_id: str) -> dict[str, list[str] | None]:
    """Each of the cluster's VMs' name -> its zones (``None``: regional)."""
    return {
        vm["name"].removeprefix(f"{cluster_id}-"): vm.get("zones")
        for vm in stand_in.of_kind("virtualmachines")
        if vm["tags"].get("dask-secure-cloud-cluster") == cluster_id
    }


def azure_vm_puts(stand_in) -> list[tuple[str, str | None, bool]]:
    """Each VM create the stand-in received: (name, zone, spot)."""
    return [
        (
            body["properties"]["osProfile"]["computerName"],
            (body.get("zones") or [None])[0],
            body["properties"].get("priority") == "Spot",
        )
        for kind, body in stand_in.bodies
        if kind == "virtualmachines" and "osProfile" in (body.get("properties") or {})
    ]


async def test_azure_worker_moves_to_a_zone_and_says_so(azure):
    stand_in, options = azure
    # The region (Azure's choice of zone) has no capacity for the workers' size.
    stand_in.refuse_capacity(options["worker_vm_size"], None)
    stand_in.refuse_capacity(options["worker_vm_size"], "1")
    started = time.monotonic()
    async with AzureVMCluster(n_workers=1, asynchronous=True, **options) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
            assert await dask_client.submit(lambda: 6 * 7) == 42
        took = time.monotonic() - started
        assert azure_vms(stand_in, cluster.cluster_id) == {"scheduler": None, "worker-0": ["2"]}
        (moved,) = events(cluster.cluster_id, "vm_moved")
        assert moved["from_zone"] is None and moved["to_zone"] == "2"
        assert "AllocationFailed" in moved["reasons"][0]
        assert "ZonalAllocationFailed" in moved["reasons"][1]
        logs = "\n".join(str(line) for line in cluster._cluster_manager_logs)
        assert "worker VM worker-0 launched in zone 2" in logs
        cluster_id = cluster.cluster_id
    print(f"Azure start with a zone failover: {took:.1f}s")
    # Tried regional, then zone 1, then zone 2: each refused VM was deleted with its
    # interface and disk before the next try.
    workers = [put for put in azure_vm_puts(stand_in) if put[0].endswith("worker-0")]
    assert [zone for _, zone, _ in workers] == [None, "1", "2"]
    assert nothing_left(stand_in, cluster_id)


async def test_azure_spot_refused_runs_on_demand_where_allowed(azure):
    stand_in, options = azure
    stand_in.refuse_capacity(options["worker_vm_size"], None, spot=True)
    async with AzureVMCluster(
        n_workers=1, asynchronous=True, worker_spot=True, **options
    ) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
        (moved,) = events(cluster.cluster_id, "vm_moved")
        assert moved["spot_asked"] and not moved["spot"] and moved["to_zone"] is None
        cluster_id = cluster.cluster_id
    workers = [put for put in azure_vm_puts(stand_in) if put[0].endswith("worker-0")]
    assert [(zone, spot) for _, zone, spot in workers] == [(None, True), (None, False)]
    assert nothing_left(stand_in, cluster_id)


async def test_azure_spot_refused_without_fallback_is_refused(azure):
    stand_in, options = azure
    for zone in (None, "1", "2", "3"):
        stand_in.refuse_capacity(options["worker_vm_size"], zone, spot=True)
    with pytest.raises(ClusterStartError, match="spot_fallback=False") as refused:
        await AzureVMCluster(
            n_workers=1, asynchronous=True, worker_spot=True, spot_fallback=False, **options
        )
    assert cause(refused.value, CapacityError) is not None
    workers = [put for put in azure_vm_puts(stand_in) if put[0].endswith("worker-0")]
    assert [(zone, spot) for _, zone, spot in workers] == [
        (None, True),
        ("1", True),
        ("2", True),
        ("3", True),
    ]
    assert not stand_in.tagged(stand_in_cluster(stand_in, refused.value))


def stand_in_cluster(stand_in, error: BaseException) -> str:
    """The cluster id an error names."""
    import re

    found = re.search(r"dsc-[0-9a-f]{10}", str(error))
    assert found, str(error)
    return found.group(0)


async def test_azure_quota_is_reported_and_not_retried(azure):
    """A scale-up past the family's vCPU quota (the start's own check passed): ARM
    answers OperationNotAllowed, and the quota is read from the subscription's usages."""
    stand_in, options = azure
    async with AzureVMCluster(n_workers=1, asynchronous=True, **options) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
        family = "standardDSv5Family"
        stand_in.quotas["westeurope"][family] = 6  # 2 + 4 in use
        puts = len(azure_vm_puts(stand_in))
        cluster.scale(2)
        with pytest.raises(ClusterStartError) as refused:
            await cluster._correct_state()
        quota = cause(refused.value, QuotaError)
        assert isinstance(quota, QuotaError)
        assert quota.region == "westeurope" and quota.limit == 6
        assert quota.quota and "DSv5" in quota.quota
        assert "current limit 6" in str(quota) and "not retried" in str(quota)
        assert len(azure_vm_puts(stand_in)) == puts + 1  # one try, in one place
        cluster_id = cluster.cluster_id
    assert nothing_left(stand_in, cluster_id)


# -- Compute Engine ---------------------------------------------------------------------


def gce_zones(stand_in, cluster_id: str) -> dict[str, str]:
    """Each of the cluster's instances' name -> its zone."""
    return {
        record["name"].removeprefix(f"dask-secure-cloud-{cluster_id}-"): record["zone"].rsplit(
            "/", 1
        )[-1]
        for record in stand_in.instances.values()
        if record["labels"].get("dask-secure-cloud-cluster") == cluster_id
    }


def gce_inserts(stand_in) -> list[tuple[str, str]]:
    """Each instances.insert: (machine type, provisioning model)."""
    return [
        (
            body["machineType"].rsplit("/", 1)[-1],
            body.get("scheduling", {}).get("provisioningModel", "STANDARD"),
        )
        for call, body in stand_in.requests
        if call == "instances.insert"
    ]


async def test_gce_worker_moves_to_another_zone_and_says_so(gcp):
    stand_in, options = gcp
    home = options["zone"]
    stand_in.refuse_capacity(home, options["worker_machine_type"])
    started = time.monotonic()
    async with GCPCluster(n_workers=1, asynchronous=True, **options) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
            assert await dask_client.submit(lambda: 6 * 7) == 42
        took = time.monotonic() - started
        zones = gce_zones(stand_in, cluster.cluster_id)
        other = sorted(z for z in stand_in.zones if z != home)[0]
        assert zones == {"scheduler": home, "worker-0": other}
        (moved,) = events(cluster.cluster_id, "vm_moved")
        assert (moved["from_zone"], moved["to_zone"]) == (home, other)
        assert "ZONE_RESOURCE_POOL_EXHAUSTED" in moved["reasons"][0]
        logs = "\n".join(str(line) for line in cluster._cluster_manager_logs)
        assert f"worker VM worker-0 launched in zone {other} instead of zone {home}" in logs
        cluster_id = cluster.cluster_id
    print(f"Compute Engine start with a zone failover: {took:.1f}s")
    assert stand_in.calls.count("instances.insert") == 3
    assert gce_nothing_left(stand_in, cluster_id)


async def test_gce_spot_refused_runs_standard_where_allowed(gcp):
    stand_in, options = gcp
    stand_in.refuse_capacity(options["zone"], options["worker_machine_type"], spot=True)
    async with GCPCluster(n_workers=1, asynchronous=True, worker_spot=True, **options) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
        assert gce_zones(stand_in, cluster.cluster_id)["worker-0"] == options["zone"]
        (moved,) = events(cluster.cluster_id, "vm_moved")
        assert moved["spot_asked"] and not moved["spot"]
        cluster_id = cluster.cluster_id
    worker = options["worker_machine_type"]
    assert gce_inserts(stand_in)[1:] == [(worker, "SPOT"), (worker, "STANDARD")]
    assert gce_nothing_left(stand_in, cluster_id)


async def test_gce_spot_refused_without_fallback_is_refused(gcp):
    stand_in, options = gcp
    for zone in stand_in.zones:
        stand_in.refuse_capacity(zone, options["worker_machine_type"], spot=True)
    with pytest.raises(ClusterStartError, match="spot_fallback=False") as refused:
        await GCPCluster(
            n_workers=1, asynchronous=True, worker_spot=True, spot_fallback=False, **options
        )
    assert cause(refused.value, CapacityError) is not None
    # SPOT once in each zone of the region, never STANDARD.
    assert [model for _, model in gce_inserts(stand_in)[1:]] == ["SPOT"] * len(stand_in.zones)
    assert not stand_in.instances


async def test_gce_quota_is_reported_and_not_retried(gcp):
    stand_in, options = gcp
    stand_in.refuse_quota("CPUS", 8.0)
    with pytest.raises(ClusterStartError, match="QUOTA_EXCEEDED") as refused:
        await GCPCluster(n_workers=1, asynchronous=True, **options)
    quota = cause(refused.value, QuotaError)
    assert isinstance(quota, QuotaError)
    assert quota.quota == "CPUS-per-project-region" and quota.limit == 8.0
    assert quota.region == "us-central1"
    assert stand_in.calls.count("instances.insert") == 1
    assert not stand_in.instances


async def test_gce_pinned_zone_is_never_left(gcp):
    stand_in, options = gcp
    stand_in.refuse_capacity(options["zone"], options["worker_machine_type"])
    with pytest.raises(ClusterStartError, match="zone_failover=False") as refused:
        await GCPCluster(n_workers=1, asynchronous=True, zone_failover=False, **options)
    assert "Not tried in another zone" in str(refused.value)
    assert stand_in.calls.count("instances.insert") == 2  # the scheduler, the worker once
    assert not stand_in.instances


# -- DigitalOcean: regions, no zones; the droplet limit only ------------------------------


async def test_digitalocean_droplet_limit_is_reported_and_not_retried(droplets):
    stand_in, options = droplets  # droplet limit 4
    with pytest.raises(ClusterStartError, match="droplet limit") as refused:
        await DropletCluster(n_workers=4, asynchronous=True, **options)
    quota = cause(refused.value, QuotaError)
    assert isinstance(quota, QuotaError) and quota.limit == 4 and quota.region == "nyc3"
    assert "droplets.create" not in stand_in.calls  # refused before anything is made
    # Past the pre-check (a scale-up): DigitalOcean's 422, read as the limit from the
    # account's figures, tried once.
    async with DropletCluster(n_workers=2, asynchronous=True, **options) as cluster:
        cluster.scale(4)
        with pytest.raises(ClusterStartError, match="droplet limit") as refused:
            await cluster._correct_state()
        quota = cause(refused.value, QuotaError)
        assert isinstance(quota, QuotaError) and quota.limit == 4
        assert "current limit 4" in str(quota)
        assert stand_in.calls.count("droplets.create") == 5  # 4 made, 1 refused
        cluster_id = cluster.cluster_id
    assert not stand_in.droplets and not stand_in.firewalls and not stand_in.vpcs
    assert not vm_processes(cluster_id)


# -- replacements go through the same placement -------------------------------------------


async def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds:.0f}s: {what}"
        await asyncio.sleep(0.2)


def ec2_instance_id(client, cluster_id: str, name: str) -> str:
    tag = [{"Name": "tag:Name", "Values": [f"dask-secure-cloud-{cluster_id}-{name}"]}]
    (reservation,) = client.describe_instances(Filters=tag)["Reservations"]
    return reservation["Instances"][0]["InstanceId"]


async def test_ec2_a_replacement_moves_zone_and_a_quota_stops_it(ec2):
    stand_in, client, options, _, A, B = ec2
    async with EC2Cluster(n_workers=1, asynchronous=True, **options) as cluster:
        cluster_id = cluster.cluster_id
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
            # The cluster's zone runs out of the workers' type; worker-0 is reclaimed.
            stand_in.refuse_capacity(A, options["worker_instance_type"])
            client.terminate_instances(
                InstanceIds=[ec2_instance_id(client, cluster_id, "worker-0")]
            )
            await wait_until(lambda: events(cluster_id, "worker_replaced"), 60, "replaced")
            await dask_client.wait_for_workers(1, timeout=60)
            assert ec2_zones(client, cluster_id) == {"scheduler": A, "worker-1": B}
            (moved,) = events(cluster_id, "vm_moved")
            assert moved["name"] == "worker-1" and moved["to_zone"] == B
            # Then the account's quota is used up: the next replacement is refused once
            # and given up at once, not tried again.
            stand_in.refuse_quota("VcpuLimitExceeded", limit=8)
            launches = stand_in.calls.count("RunInstances")
            client.terminate_instances(
                InstanceIds=[ec2_instance_id(client, cluster_id, "worker-1")]
            )
            await wait_until(lambda: events(cluster_id, "replacement_given_up"), 60, "given up")
            (given_up,) = events(cluster_id, "replacement_given_up")
            assert given_up["name"] == "worker-2" and "VcpuLimitExceeded" in given_up["detail"]
            assert stand_in.calls.count("RunInstances") == launches + 1
    assert all_clusters_gone(client) and ec2_zones(client, cluster_id) == {}
