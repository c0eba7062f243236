"""GCPCluster end to end: google-cloud-compute (REST) -> GCE stand-in -> VMs booted here."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

import pytest
from distributed import Client
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1
from helpers import decoded_files, vm_processes

from dask_secure_cloud import GCPCluster
from dask_secure_cloud.cloudinit import secrets_in
from dask_secure_cloud.cluster import ClusterStartError, delete_cluster, preview
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.driver import VMRequest

from clouds.booter import VMBooter
from clouds.gce import GCEStandIn, PreemptionNotice
from clouds.naming import check_named_clusters, check_polls
from clouds.reach import CLIENT_ADDRESS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
PROJECT, ZONE = "dsc-test-project", "us-central1-a"
REGION = "us-central1"
#: The firewall rules of a fresh project's default network.
DEFAULT_RULES = {
    "default-allow-internal",
    "default-allow-ssh",
    "default-allow-rdp",
    "default-allow-icmp",
}
#: An address outside the project, such as anyone on the internet.
OUTSIDE = "198.51.100.7"


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
    names = {f"dask-secure-cloud-{cluster_id}-{rule}" for rule in ("deny", "client", "internal")}
    rules = names & set(stand_in.firewalls)
    return not labelled and not rules and not vm_processes(cluster_id)


def project_as_fresh(stand_in: GCEStandIn) -> bool:
    """No instance, and only the default network's own firewall rules."""
    return not stand_in.instances and set(stand_in.firewalls) == DEFAULT_RULES


def client(stand_in: GCEStandIn, name: str):
    """A real compute_v1 client of the stand-in, to change the network as a user would."""
    return getattr(compute_v1, name)(
        credentials=AnonymousCredentials(),
        transport="rest",
        client_options=ClientOptions(api_endpoint=stand_in.url),
    )


def add_cloud_nat(stand_in: GCEStandIn, mode: str, subnetworks: Sequence[str] = ()) -> None:
    """A Cloud Router with a Cloud NAT, made through the real client."""
    nat = compute_v1.RouterNat(
        name="nat-1",
        nat_ip_allocate_option="AUTO_ONLY",
        source_subnetwork_ip_ranges_to_nat=mode,
        subnetworks=[
            compute_v1.RouterNatSubnetworkToNat(
                name=f"projects/{PROJECT}/regions/{REGION}/subnetworks/{name}",
                source_ip_ranges_to_nat=["ALL_IP_RANGES"],
            )
            for name in subnetworks
        ],
    )
    client(stand_in, "RoutersClient").insert(
        project=PROJECT,
        region=REGION,
        router_resource=compute_v1.Router(
            name="router-1",
            network=f"projects/{PROJECT}/global/networks/default",
            nats=[nat],
        ),
    )


def delete_default_route(stand_in: GCEStandIn) -> None:
    """Take the network's way out away, through the real client."""
    (name,) = [n for n, r in stand_in.routes.items() if r["destRange"] == "0.0.0.0/0"]
    client(stand_in, "RoutesClient").delete(project=PROJECT, route=name)


def reachable_from(stand_in: GCEStandIn, instance: str, source: str) -> list[str]:
    """What ``source`` may reach on ``instance``: SSH, RDP, the Dask ports, any port, ICMP."""
    probes = [("tcp", 22), ("tcp", 3389), ("tcp", 8786), ("tcp", 8787), ("tcp", 40123)]
    probes += [("udp", 53), ("icmp", None)]
    return [
        f"{protocol}/{port}"
        for protocol, port in probes
        if stand_in.ingress_allowed(instance, source, protocol, port)
    ]


async def test_defaults_on_a_fresh_default_network_compute_with_closed_public_workers(
    gce, caplog, outside_the_cloud
):
    """No network option, a fresh project, the client outside Google Cloud (it reaches
    only external addresses, through the firewall): no Cloud NAT, so workers get
    external addresses to reach a registry, and nothing from outside the cluster reaches
    them; the scheduler is reached at its external address, by the creator alone."""
    stand_in, options = gce
    options = {k: v for k, v in options.items() if k != "use_private_ip"}  # the default
    caplog.set_level(logging.INFO, logger="dask_secure_cloud.providers.gcp")
    async with GCPCluster(
        n_workers=2,
        max_run_duration="8h",
        labels={"team": "ml"},
        public_ip_url=outside_the_cloud,
        asynchronous=True,
        **options,
    ) as cluster:
        (scheduler_record,) = [
            r
            for r in stand_in.instances.values()
            if r["labels"]["dask-secure-cloud-role"] == "scheduler"
        ]
        external = scheduler_record["networkInterfaces"][0]["accessConfigs"][0]["natIP"]
        assert cluster.scheduler_address == f"tls://{external}:8786"
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(2, timeout=60)
            assert await dask_client.submit(sum, range(10)) == 45
        cluster_id = cluster.cluster_id
        tag = f"dask-secure-cloud-{cluster_id}"
        inserts = [body for call, body in stand_in.requests if call == "instances.insert"]
        assert len(inserts) == 3
        for body in inserts:
            assert body["labels"]["dask-secure-cloud-cluster"] == cluster_id
            assert body["labels"]["team"] == "ml"
            assert tag in body["tags"]["items"]
            assert body["scheduling"]["maxRunDuration"]["seconds"] == str(8 * 3600)
            assert body["scheduling"]["instanceTerminationAction"] == "DELETE"
            # An ephemeral external address: the only way out of a network without NAT.
            assert body["networkInterfaces"][0]["accessConfigs"] == [
                {"name": "External NAT", "type": "ONE_TO_ONE_NAT"}
            ]
            assert "serviceAccounts" not in body  # the VMs hold no Google token
            user_data = next(
                i["value"] for i in body["metadata"]["items"] if i["key"] == "user-data"
            )
            assert secrets_in(user_data.encode()) == []  # the VM makes its own key
            assert not any(
                cluster._credentials.client.key_pem.encode() in f
                for f in decoded_files(user_data.encode()).values()
            )
        # The stand-in, from its own model, gave every VM a route out.
        assert len(stand_in.booter.egress) == 3 and all(stand_in.booter.egress.values())
        rules = {
            body["name"]: body for call, body in stand_in.requests if call == "firewalls.insert"
        }
        client_rule = rules[f"{tag}-client"]
        assert client_rule["allowed"][0]["ports"] == ["8786"]  # the dashboard goes through it
        assert client_rule["sourceRanges"] == [f"{CLIENT_ADDRESS}/32"]  # the creator alone
        assert client_rule["targetTags"] == [f"{tag}--scheduler"]  # the scheduler alone
        internal = rules[f"{tag}-internal"]
        assert internal["sourceTags"] == internal["targetTags"] == [tag]
        deny = rules[f"{tag}-deny"]
        assert deny["sourceRanges"] == ["0.0.0.0/0"] and deny["targetTags"] == [tag]
        assert client_rule["priority"] < deny["priority"] < 1000

        # Who may come in, as Compute Engine evaluates the rules (the default network's
        # default-allow-ssh/rdp/icmp/internal included).
        names = {r["labels"]["dask-secure-cloud-role"]: n for n, r in stand_in.instances.items()}
        scheduler = names["scheduler"]
        workers = [n for n, r in stand_in.instances.items() if n != scheduler]
        neighbour = str(stand_in.subnet.network_address + 250)  # in the subnet, not a member
        address = {n: r["networkInterfaces"][0]["networkIP"] for n, r in stand_in.instances.items()}
        for worker in workers:
            assert reachable_from(stand_in, worker, OUTSIDE) == []
            assert reachable_from(stand_in, worker, neighbour) == []
            assert stand_in.ingress_allowed(worker, address[scheduler], "tcp", 40123)
        assert reachable_from(stand_in, scheduler, CLIENT_ADDRESS) == ["tcp/8786"]
        assert reachable_from(stand_in, scheduler, "192.0.2.99") == []  # anyone else
        assert reachable_from(stand_in, scheduler, neighbour) == []
        assert stand_in.ingress_allowed(scheduler, address[workers[0]], "tcp", 8786)
    assert nothing_left(stand_in, cluster_id)
    assert project_as_fresh(stand_in)
    logged = caplog.text
    assert "worker VMs: a public address (inbound from outside the cluster closed), out " in logged
    assert "out through the default internet gateway" in logged
    # Every call went to the stand-in: the network guard in conftest refuses any other host.
    assert "zoneOperations.wait" in stand_in.calls


async def test_spot_gpu_workers_retire_on_the_preemption_notice(gce):
    """A Spot worker asks the metadata server whether it is being preempted; once it
    answers TRUE (Compute Engine's 30-second notice) the worker retires gracefully, so
    the scheduler moves its data elsewhere before the VM is gone."""
    stand_in, options = gce
    notice = PreemptionNotice()
    try:
        async with GCPCluster(
            n_workers=1,
            worker_spot=True,
            gpu_type="nvidia-tesla-t4",
            gpu_count=1,
            runtime="native",
            metadata_endpoint=notice.url,
            min_cpu_platform="Intel Ice Lake",
            asynchronous=True,
            **options,
        ) as cluster:
            worker = [b for c, b in stand_in.requests if c == "instances.insert"][-1]
            assert worker["minCpuPlatform"] == "Intel Ice Lake"
            assert worker["scheduling"]["provisioningModel"] == "SPOT"
            assert worker["scheduling"]["onHostMaintenance"] == "TERMINATE"
            assert worker["guestAccelerators"][0]["acceleratorCount"] == 1
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(1, timeout=60)
                notice.preempt()
                deadline = asyncio.get_running_loop().time() + 30
                while cluster.scheduler_info["workers"]:
                    assert asyncio.get_running_loop().time() < deadline, "it did not retire"
                    await asyncio.sleep(0.5)
            cluster_id = cluster.cluster_id
    finally:
        notice.stop()
    assert nothing_left(stand_in, cluster_id)


START_CALLS = [
    "zones.get",
    "machineTypes.get",
    "images.getFromFamily",
    "subnetworks.list",
    "routers.list",
    "routes.list",
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
    assert project_as_fresh(stand_in)
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
    assert project_as_fresh(stand_in)


async def test_quota_error_surfaces_from_the_operation(gce):
    stand_in, options = gce
    stand_in.quota_exceeded()
    with pytest.raises(ClusterStartError, match="QUOTA_EXCEEDED: Quota 'CPUS' exceeded"):
        await GCPCluster(n_workers=1, asynchronous=True, **options)
    assert project_as_fresh(stand_in)


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
        ({"worker_public_ip": "yes"}, "worker_public_ip must be True, False or None"),
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
    # Compute Engine answers its per-project rate limits with 403: waited out too.
    stand_in.fail("zones.get", 403, "rateLimitExceeded")
    async with GCPCluster(n_workers=1, asynchronous=True, **options) as cluster:
        cluster_id = cluster.cluster_id
        assert len(stand_in.instances) == 2
    assert stand_in.calls.count("instances.insert") == 3  # one refused, then two
    assert stand_in.calls.count("zones.get") == 2
    assert nothing_left(stand_in, cluster_id)


async def test_list_finds_clusters_and_what_a_killed_start_left(gce):
    from listing import check_listing

    stand_in, options = gce
    await check_listing(GCPCluster, options)
    assert project_as_fresh(stand_in)


# -- the ways out ------------------------------------------------------------------------


def refusal_made_nothing(stand_in: GCEStandIn, since: int, message: str) -> None:
    """Refused before anything was made: no insert or delete of any kind."""
    assert stand_in.mutating_calls(since) == []
    assert project_as_fresh(stand_in) and stand_in.booter.vms == {}
    assert "subnetwork default of network default in us-central1" in message
    assert "offline_image=True" in message
    assert "Nothing was created" in message


async def test_private_workers_without_cloud_nat_are_refused_before_anything_is_made(gce):
    stand_in, options = gce
    since = len(stand_in.calls)
    with pytest.raises(ClusterStartError) as info:
        await GCPCluster(n_workers=1, worker_public_ip=False, asynchronous=True, **options)
    message = str(info.value)
    refusal_made_nothing(stand_in, since, message)
    assert "worker_public_ip=False" in message and "no NAT" in message
    assert "worker_public_ip=None (the default) or True" in message
    assert "subnetwork=<a subnetwork of network default in us-central1" in message
    assert {"routers.list", "routes.list"} <= set(stand_in.calls[since:])


@pytest.mark.parametrize("change", [{}, {"worker_public_ip": True}])
async def test_a_network_with_no_way_out_is_refused_before_anything_is_made(gce, change):
    stand_in, options = gce
    await asyncio.to_thread(delete_default_route, stand_in)
    since = len(stand_in.calls)
    with pytest.raises(ClusterStartError) as info:
        await GCPCluster(n_workers=1, asynchronous=True, **options, **change)
    message = str(info.value)
    refusal_made_nothing(stand_in, since, message)
    assert "network=<a network with a 0.0.0.0/0 route to default-internet-gateway>" in message


async def test_a_cloud_nat_without_the_internet_route_is_no_way_out(gce):
    """Cloud NAT sends through the default internet gateway's route: without it, none."""
    stand_in, options = gce
    await asyncio.to_thread(add_cloud_nat, stand_in, "ALL_SUBNETWORKS_ALL_IP_RANGES")
    await asyncio.to_thread(delete_default_route, stand_in)
    since = len(stand_in.calls)
    with pytest.raises(ClusterStartError, match="Cloud NAT nat-1 on router router-1 is there"):
        await GCPCluster(n_workers=1, asynchronous=True, **options)
    assert stand_in.mutating_calls(since) == []


async def test_an_offline_image_may_start_where_there_is_no_way_out(gce):
    stand_in, options = gce
    await asyncio.to_thread(delete_default_route, stand_in)
    async with GCPCluster(n_workers=1, offline_image=True, asynchronous=True, **options) as c:
        inserts = [body for call, body in stand_in.requests if call == "instances.insert"]
        assert [b["networkInterfaces"][0].get("accessConfigs") for b in inserts] == [None, None]
        assert list(stand_in.booter.egress.values()) == [False, False]
        async with Client(c, asynchronous=True) as dask_client:  # process VMs need nothing
            await dask_client.wait_for_workers(1, timeout=60)
            assert await dask_client.submit(sum, range(4)) == 6
        cluster_id = c.cluster_id
    assert nothing_left(stand_in, cluster_id)


@pytest.mark.parametrize(
    "worker_public_ip, mode",
    [(None, "ALL_SUBNETWORKS_ALL_IP_RANGES"), (False, "LIST_OF_SUBNETWORKS")],
)
async def test_private_workers_behind_cloud_nat_compute(gce, caplog, worker_public_ip, mode):
    stand_in, options = gce
    caplog.set_level(logging.INFO, logger="dask_secure_cloud.providers.gcp")
    listed = ["default"] if mode == "LIST_OF_SUBNETWORKS" else []
    await asyncio.to_thread(add_cloud_nat, stand_in, mode, listed)
    async with GCPCluster(
        n_workers=2, worker_public_ip=worker_public_ip, asynchronous=True, **options
    ) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(2, timeout=60)
            assert await dask_client.submit(sum, range(10)) == 45
        inserts = [body for call, body in stand_in.requests if call == "instances.insert"]
        assert len(inserts) == 3
        # With a way out that needs none, no VM gets an external address.
        assert all("accessConfigs" not in b["networkInterfaces"][0] for b in inserts)
        assert len(stand_in.booter.egress) == 3 and all(stand_in.booter.egress.values())
        cluster_id = cluster.cluster_id
    assert nothing_left(stand_in, cluster_id)
    assert "worker VMs: no public address, out through Cloud NAT nat-1 on router router-1" in (
        caplog.text
    )


async def test_a_cloud_nat_of_another_subnetwork_is_no_way_out(gce):
    stand_in, options = gce
    stand_in.add_subnetwork("other", "10.200.0.0/24")
    await asyncio.to_thread(add_cloud_nat, stand_in, "LIST_OF_SUBNETWORKS", ["other"])
    since = len(stand_in.calls)
    with pytest.raises(ClusterStartError, match="no NAT"):
        await GCPCluster(
            n_workers=1, subnetwork="default", worker_public_ip=False, asynchronous=True, **options
        )
    assert stand_in.mutating_calls(since) == []


async def test_only_the_scheduler_takes_the_creators_cidrs(gce):
    """With external addresses and the creator outside the network: the creator reaches
    the scheduler's ports and nothing else; nobody else reaches anything."""
    stand_in, options = gce
    creator = "192.0.2.0/24"
    driver = preview(
        GCPCluster, **{**options, "use_private_ip": False, "allowed_cidrs": [creator]}
    ).driver
    cluster_id = "dsc-0c1a55ed00"
    try:
        await driver.prepare(cluster_id)
        made = {}
        for role, name in ((Role.SCHEDULER, "scheduler"), (Role.WORKER, "worker-0")):
            request = VMRequest(cluster_id, name, role, b"#cloud-config\n{}\n")
            made[role] = await driver.create(request)
        assert made[Role.SCHEDULER].public_ip and made[Role.WORKER].public_ip
        scheduler, worker = made[Role.SCHEDULER].id, made[Role.WORKER].id
        # The driver's default ports (a cluster with its own CA configures only 8786).
        assert reachable_from(stand_in, scheduler, "192.0.2.9") == ["tcp/8786", "tcp/8787"]
        assert reachable_from(stand_in, worker, "192.0.2.9") == []
        assert reachable_from(stand_in, scheduler, OUTSIDE) == []
        assert reachable_from(stand_in, worker, OUTSIDE) == []
    finally:
        await delete_cluster(driver, cluster_id)
        await driver.close()
    assert project_as_fresh(stand_in)


def test_stand_in_rejects_what_compute_engine_rejects(gce):
    stand_in, _ = gce
    routers, routes = client(stand_in, "RoutersClient"), client(stand_in, "RoutesClient")
    network = f"projects/{PROJECT}/global/networks/default"

    def router(**nat: object) -> compute_v1.Router:
        fields = {"name": "nat-1", "nat_ip_allocate_option": "AUTO_ONLY", **nat}
        return compute_v1.Router(
            name="router-1", network=network, nats=[compute_v1.RouterNat(**fields)]
        )

    bad_routers = [
        router(),  # no sourceSubnetworkIpRangesToNat
        router(source_subnetwork_ip_ranges_to_nat="SOME_SUBNETWORKS"),
        router(source_subnetwork_ip_ranges_to_nat="LIST_OF_SUBNETWORKS"),  # none listed
        router(
            source_subnetwork_ip_ranges_to_nat="LIST_OF_SUBNETWORKS",
            subnetworks=[
                compute_v1.RouterNatSubnetworkToNat(
                    name=f"projects/{PROJECT}/regions/{REGION}/subnetworks/missing",
                    source_ip_ranges_to_nat=["ALL_IP_RANGES"],
                )
            ],
        ),
        router(
            source_subnetwork_ip_ranges_to_nat="ALL_SUBNETWORKS_ALL_IP_RANGES",
            nat_ip_allocate_option="MANUAL_ONLY",  # without natIps
        ),
        compute_v1.Router(name="router-1"),  # no network
    ]
    for body in bad_routers:
        with pytest.raises((gexc.BadRequest, gexc.NotFound)):
            routers.insert(project=PROJECT, region=REGION, router_resource=body)
    assert stand_in.routers == {}
    add_cloud_nat(stand_in, "ALL_SUBNETWORKS_ALL_IP_RANGES")
    second = router(source_subnetwork_ip_ranges_to_nat="ALL_SUBNETWORKS_ALL_IP_RANGES")
    second.name = "router-2"
    with pytest.raises(gexc.BadRequest, match="one Cloud NAT gateway only"):
        routers.insert(project=PROJECT, region=REGION, router_resource=second)

    def route(**fields: object) -> compute_v1.Route:
        return compute_v1.Route(name="r-1", network=network, dest_range="0.0.0.0/0", **fields)

    gateway = f"projects/{PROJECT}/global/gateways/default-internet-gateway"
    for body in [
        route(),  # no next hop
        route(next_hop_gateway=gateway, next_hop_ip="10.0.0.9"),  # two
        route(next_hop_gateway=f"projects/{PROJECT}/global/gateways/elsewhere"),
        compute_v1.Route(name="r-1", network=network, dest_range="10.0.0.1/8"),
    ]:
        with pytest.raises(gexc.BadRequest):
            routes.insert(project=PROJECT, route_resource=body)
    subnet_route = next(n for n, r in stand_in.routes.items() if r.get("routeType") == "SUBNET")
    with pytest.raises(gexc.BadRequest):
        routes.delete(project=PROJECT, route=subnet_route)
    routes.insert(project=PROJECT, route_resource=route(next_hop_gateway=gateway))
    assert stand_in.routes["r-1"]["priority"] == 1000
    from clouds.gce import APIError

    with pytest.raises(APIError, match="Invalid JSON payload"):
        stand_in.insert_route(b'{"name": "r-2", "nextHopGatway": "x"}')


# -- the driver contract -------------------------------------------------------------------


async def test_user_named_clusters_are_listed_and_cleaned_up_each_alone(gce):
    """Firewall rules carry no labels: their cluster is read from their names, which
    used to be recognised for ``dsc-`` ids only; and cleaning up ``nightly`` used to
    delete every rule named ``dask-secure-cloud-nightly-*``, ``nightly-etl``'s too."""
    stand_in, options = gce
    await check_named_clusters(GCPCluster, options, lambda c: nothing_left(stand_in, c))
    assert project_as_fresh(stand_in)


async def test_a_throttled_or_failed_poll_is_unknown_never_terminated(gce):
    stand_in, options = gce
    await check_polls(
        GCPCluster,
        options,
        [
            lambda: stand_in.fail("instances.get", 429, "rateLimitExceeded"),
            # Compute Engine answers its per-project rate limits with 403.
            lambda: stand_in.fail("instances.get", 403, "rateLimitExceeded"),
            lambda: stand_in.fail("instances.get", 503, "backendError"),
            lambda: stand_in.fail("instances.get", 500, "backendError"),
        ],
        lambda c: nothing_left(stand_in, c),
    )
    assert project_as_fresh(stand_in)
