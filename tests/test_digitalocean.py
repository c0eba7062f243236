"""DropletCluster end to end: pydo.aio -> DigitalOcean stand-in (HTTPS) -> VMs booted here."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from distributed import Client
from helpers import decoded_files, vm_processes

from dask_secure_cloud import DropletCluster, cloudinit
from dask_secure_cloud.cluster import ClusterStartError
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.driver import VMRequest
from dask_secure_cloud.network import NetworkPolicy, NetworkPolicyError
from dask_secure_cloud.options import DropletOptions, resolve
from dask_secure_cloud.providers.digitalocean import (
    DropletDriver,
    cluster_tag,
    made_name,
    scheduler_tag,
)

from clouds.booter import VMBooter
from clouds.digitalocean import DigitalOceanStandIn
from clouds.naming import check_named_clusters, check_polls
from clouds.reach import CLIENT_ADDRESS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
TOKEN = "dop_v1_test_token_never_on_a_droplet"
OVERSIZED = [f"echo {os.urandom(60).hex()}" for _ in range(900)]


#: The calls that make something: none may come before the preflight checks.
MAKING = {"tags.create", "vpcs.create", "firewalls.create", "droplets.create"}


def serve(tmp_path, booter, **kwargs: Any) -> tuple[DigitalOceanStandIn, dict[str, Any]]:
    """A started stand-in booting with ``booter``, and the options that reach it."""
    stand_in = DigitalOceanStandIn(booter, TOKEN, **kwargs)
    url = stand_in.start()
    bundle = tmp_path / "ca.pem"
    stand_in.ca.cert_pem.write_to_path(str(bundle))
    options = {
        "api_url": url,
        "ca_bundle": str(bundle),  # trust the stand-in's test CA
        "region": "nyc3",
        "scheduler_size": "s-1vcpu-1gb",
        "worker_size": "s-2vcpu-4gb",
        # The stand-in's public addresses are documentation ones, not routed here.
        "use_private_ip": True,
        "boot_timeout": "60s",
    }
    return stand_in, options


@pytest.fixture
def do(tmp_path, monkeypatch):
    stand_in, options = serve(tmp_path, VMBooter(tmp_path / "vms"), droplet_limit=4)
    monkeypatch.setenv("DIGITALOCEAN_TOKEN", TOKEN)
    yield stand_in, options
    stand_in.stop()


def driver_for(options: Mapping[str, Any]) -> DropletDriver:
    """The cluster's driver on its own, for checks that need no Dask on the droplets."""
    keys = ("api_url", "ca_bundle", "region", "scheduler_size", "worker_size")
    driver_options = resolve(DropletOptions, {key: options[key] for key in keys})
    driver = DropletDriver(driver_options, token=TOKEN, network=NetworkPolicy(use_private_ip=True))
    driver.configure(ports=(8786, 8787), boot_timeout=60)
    return driver


class RecordingBooter:
    """Any booter with the shared interface (as the guest booter has it): records what
    it is asked to boot and runs nothing, so addresses off this machine can be given."""

    def __init__(self) -> None:
        self.vms: dict[str, SimpleNamespace] = {}
        self.booted: dict[str, tuple[str, bool]] = {}

    def boot(
        self,
        user_data: bytes,
        *,
        address: str,
        cluster_id: str,
        name: str,
        role: str,
        egress: bool = True,
    ) -> SimpleNamespace:
        vm = SimpleNamespace(vm_id=f"{cluster_id}/{name}")
        self.vms[vm.vm_id] = vm
        self.booted[name] = (address, egress)
        return vm

    def stop(self, vm_id: str) -> None:
        self.vms.pop(vm_id, None)

    def stop_all(self) -> None:
        self.vms.clear()


def nothing_left(stand_in: DigitalOceanStandIn, cluster_id: str) -> bool:
    tags = {cluster_tag(cluster_id), scheduler_tag(cluster_id)}
    names = {made_name(tag) for tag in tags}
    return (
        not [d for d in stand_in.droplets.values() if tags & set(d["tags"])]
        and not [f for f in stand_in.firewalls.values() if tags & set(f.get("tags") or [])]
        and not [f for f in stand_in.firewalls.values() if f["name"] in names]
        and not [v for v in stand_in.vpcs.values() if v["name"] in names]
        and not tags & stand_in.tags
        and not vm_processes(cluster_id)
    )


def open_to_outside(
    firewalls: Iterable[Mapping[str, Any]],
    droplets: Iterable[Mapping[str, Any]],
    cluster_id: str,
) -> list[tuple[str, dict[str, Any]]]:
    """The inbound rules (by firewall name) of every firewall that applies to a worker of
    the cluster, by tag or droplet id, whose sources reach beyond the cluster's own
    droplets: any address range, load balancer or Kubernetes cluster, another droplet, or
    a tag other than the cluster's own."""
    tag = cluster_tag(cluster_id)
    inside_tags = {tag, scheduler_tag(cluster_id)}
    cluster = [d for d in droplets if tag in d["tags"]]
    ids = {d["id"] for d in cluster}
    workers = [d for d in cluster if "dask-secure-cloud-worker" in d["tags"]]
    assert workers, "no worker to check"
    found = []
    for firewall in firewalls:
        applies = any(
            set(firewall.get("tags") or []) & set(w["tags"])
            or w["id"] in (firewall.get("droplet_ids") or [])
            for w in workers
        )
        for rule in firewall.get("inbound_rules") or [] if applies else []:
            sources = rule["sources"]
            if (
                sources.get("addresses")
                or sources.get("load_balancer_uids")
                or sources.get("kubernetes_ids")
                or set(sources.get("droplet_ids") or []) - ids
                or set(sources.get("tags") or []) - inside_tags
            ):
                found.append((firewall["name"], rule))
    return found


async def test_droplet_cluster_computes_over_tls_and_leaves_nothing(do, outside_the_cloud):
    """The defaults on DigitalOcean's network, the client outside it (it reaches only
    public addresses, through the cloud firewalls): every droplet has a public address,
    which is its way out; the scheduler is reached at its own, by the creator alone, and
    no firewall lets anything from outside the cluster reach a worker."""
    stand_in, options = do
    options = {k: v for k, v in options.items() if k != "use_private_ip"}  # the default
    async with DropletCluster(
        n_workers=2,
        tags=["team:ml"],
        public_ip_url=outside_the_cloud,
        asynchronous=True,
        **options,
    ) as cluster:
        cluster_id = cluster.cluster_id
        tag = cluster_tag(cluster_id)
        vpc = next(v for v in stand_in.vpcs.values() if v["name"] == made_name(tag))
        network = ipaddress.ip_network(vpc["ip_range"])
        (scheduler,) = [d for d in stand_in.droplets.values() if d["name"].endswith("-scheduler")]
        (public,) = [n["ip_address"] for n in scheduler["_networks"] if n["type"] == "public"]
        assert cluster.scheduler_address == f"tls://{public}:8786"
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=60)
            assert await client.submit(sum, range(10)) == 45
            workers = list(cluster.scheduler_info["workers"])
        # Workers reach the scheduler over the VPC's private addresses.
        assert all(
            ipaddress.ip_address(w.split("//")[1].rsplit(":", 1)[0]) in network for w in workers
        )
        droplets = [b for kind, b in stand_in.bodies if kind == "droplet"]
        assert len(droplets) == 3
        for body in droplets:
            assert tag in body["tags"] and "team:ml" in body["tags"]
            assert body["vpc_uuid"] == vpc["id"]
            # DigitalOcean carries text (no whole-document gzip): 44 of its 64 KiB stay
            # for the user's extra_bootstrap and env_vars.
            assert len(body["user_data"].encode()) < 20 * 1024
            assert cloudinit.secrets_in(body["user_data"].encode()) == []
            assert TOKEN not in body["user_data"]
            files = decoded_files(body["user_data"].encode())
            assert not any(TOKEN.encode() in f for f in files.values())
            assert not any(
                b"secure-cloud" in f for p, f in files.items() if p.endswith("dask.yaml")
            )
            assert "ssh_keys" not in body
        # Every droplet, workers too, has a public address and, from it, a route out.
        for droplet in stand_in.droplets.values():
            assert {n["type"] for n in droplet["networks"]["v4"]} == {"private", "public"}
        assert len(stand_in.booter.egress) == 3 and all(stand_in.booter.egress.values())
        # Nothing from outside the cluster reaches a worker, through any firewall.
        assert (
            open_to_outside(stand_in.firewalls.values(), stand_in.droplets.values(), cluster_id)
            == []
        )
        # Only the scheduler carries the tag its port-opening firewall applies to.
        scheduler_only = scheduler_tag(cluster_id)
        carriers = [d["name"] for d in stand_in.droplets.values() if scheduler_only in d["tags"]]
        assert carriers == [f"dask-secure-cloud-{cluster_id}-scheduler"]
        firewalls = {f["tags"][0]: f for f in stand_in.firewalls.values()}
        assert set(firewalls) == {tag, scheduler_only}
        names = {f["name"] for f in firewalls.values()}
        assert names == {made_name(tag), made_name(scheduler_only)}
        assert firewalls[tag]["tags"] == [tag]
        assert firewalls[tag]["inbound_rules"] == [
            {"protocol": p, "ports": "all", "sources": {"tags": [tag]}} for p in ("tcp", "udp")
        ]
        assert firewalls[scheduler_only]["tags"] == [scheduler_only]
        assert firewalls[scheduler_only]["inbound_rules"] == [
            {"protocol": "tcp", "ports": port, "sources": {"addresses": [f"{CLIENT_ADDRESS}/32"]}}
            for port in ("8786",)  # the dashboard is reached through the scheduler port
        ]
    assert nothing_left(stand_in, cluster_id)


def test_the_outside_check_finds_scheduler_ports_open_on_every_droplet():
    """The check above fails on the firewall this cluster used to make: the scheduler's
    ports open to the creator on the cluster's tag, so on every worker."""
    tag, scheduler_only = cluster_tag("dsc-0a1b"), scheduler_tag("dsc-0a1b")
    droplets = [
        {"id": 1, "tags": [tag, scheduler_only, "dask-secure-cloud-scheduler"]},
        {"id": 2, "tags": [tag, "dask-secure-cloud-worker"]},
        {"id": 3, "tags": ["someone-else"]},
    ]
    inside = {"protocol": "tcp", "ports": "all", "sources": {"tags": [tag]}}
    creator = {"protocol": "tcp", "ports": "8786", "sources": {"addresses": ["198.51.100.7/32"]}}
    cases = {
        "one firewall on the cluster's tag": ({"tags": [tag]}, creator, True),
        "the creator on the scheduler's tag": ({"tags": [scheduler_only]}, creator, False),
        "the worker by id": ({"droplet_ids": [2]}, creator, True),
        "another droplet": ({"tags": [tag]}, {**inside, "sources": {"droplet_ids": [3]}}, True),
        "another tag": ({"tags": [tag]}, {**inside, "sources": {"tags": ["someone-else"]}}, True),
        "the cluster's droplets": ({"tags": [tag]}, inside, False),
    }
    for case, (applied, rule, flagged) in cases.items():
        firewall = {"name": "fw", **applied, "inbound_rules": [rule]}
        assert bool(open_to_outside([firewall], droplets, "dsc-0a1b")) is flagged, case


async def test_each_roles_way_out_is_known_and_logged_before_anything_is_made(do):
    stand_in, options = do

    class Snapshot(logging.Handler):
        """The stand-in's calls so far, at each log line."""

        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.seen: list[tuple[str, list[str]]] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.seen.append((record.getMessage(), list(stand_in.calls)))

    handler = Snapshot()
    logger = logging.getLogger("dask_secure_cloud.providers.digitalocean")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    driver = driver_for(options)
    try:
        await driver.prepare("dsc-0a1b2c")
        await driver.release("dsc-0a1b2c")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        await driver.close()
    ways_out = [(m, calls) for m, calls in handler.seen if " VMs: " in m]
    assert sorted(m.split()[0] for m, _ in ways_out) == ["scheduler", "worker"]
    for message, calls in ways_out:
        assert "the droplet's public interface" in message
        assert "the cluster's own VPC in region nyc3" in message
        assert "account.get" in calls and not MAKING & set(calls)
    assert set(stand_in.calls) >= MAKING - {"droplets.create"}
    assert not stand_in.firewalls and not stand_in.vpcs and not stand_in.tags


async def test_droplets_get_addresses_of_the_chosen_pool_and_a_route_out_from_any_booter(
    tmp_path,
):
    """What a guest test needs: the cluster's own VPC in 10.77.0.0/25, not 127.0.0.0/8,
    and a booter other than the process booter, told each droplet has a route out."""
    booter = RecordingBooter()
    stand_in, options = serve(tmp_path, booter, vpc_pool="10.77.0.0/25")
    driver = driver_for(options)
    try:
        await driver.prepare("dsc-0a1b2c")
        vms = [
            await driver.create(VMRequest("dsc-0a1b2c", name, role, b"#cloud-config\n{}\n"))
            for name, role in (("scheduler", Role.SCHEDULER), ("worker-0", Role.WORKER))
        ]
        (vpc,) = stand_in.vpcs.values()
        assert vpc["ip_range"] == "10.77.0.0/25"
        pool = ipaddress.ip_network("10.77.0.0/25")
        assert all(ipaddress.ip_address(vm.private_ip) in pool for vm in vms)
        assert booter.booted == {vm.name: (vm.private_ip, True) for vm in vms}
        assert len({vm.private_ip for vm in vms}) == 2
        for vm in vms:
            await driver.destroy(vm)
        await driver.release("dsc-0a1b2c")
    finally:
        await driver.close()
        stand_in.stop()
    assert not stand_in.droplets and not stand_in.firewalls and not stand_in.vpcs
    assert not stand_in.tags and booter.vms == {}


@pytest.mark.parametrize(
    "ip_range,message",
    [
        ("203.0.113.0/24", "RFC 1918"),
        ("10.20.0.0/15", "larger than /16"),
        ("10.20.0.0/29", "smaller than /28"),
        ("10.20.0.1/24", "ip_range is invalid"),
        ("10.77.0.0/24", "overlaps another VPC"),
    ],
)
def test_stand_in_refuses_vpc_ranges_the_api_refuses(ip_range, message):
    from clouds.digitalocean import APIError

    stand_in = DigitalOceanStandIn(RecordingBooter(), TOKEN, vpc_pool="10.77.0.0/25")

    def create(**extra: str) -> Any:
        body = json.dumps({"name": "v", "region": "nyc3", **extra}).encode()
        return stand_in.handle("POST", "/v2/vpcs", {}, body, f"Bearer {TOKEN}")

    create()  # takes 10.77.0.0/25
    with pytest.raises(APIError, match=message):
        create(ip_range=ip_range)
    create(ip_range="10.20.0.0/16")  # the sizes the API allows, at both ends
    create(ip_range="192.168.7.0/28")
    with pytest.raises(APIError, match="no free VPC range"):
        create()  # the pool is used up


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


#: Each call of a start, with the occurrence to fail when a start makes it twice.
START_CALLS = [
    ("regions.list", 1),
    ("account.get", 1),
    ("droplets.list", 1),
    ("tags.create", 1),  # the cluster's tag
    ("tags.create", 2),  # the scheduler's
    ("vpcs.create", 1),
    ("vpcs.get", 1),
    ("firewalls.create", 1),  # between the cluster's droplets
    ("firewalls.create", 2),  # the scheduler's ports
    ("droplets.create", 1),
    ("droplets.get", 1),
]


@pytest.mark.parametrize("call,occurrence", START_CALLS)
async def test_failure_at_each_start_call_leaves_nothing(do, call, occurrence):
    stand_in, options = do
    # 5xx answers are retried by pydo itself; a 422 is final.
    stand_in.fail(call, 422, "unprocessable_entity", occurrence=occurrence)
    with pytest.raises(ClusterStartError, match="unprocessable_entity"):
        await DropletCluster(n_workers=1, asynchronous=True, **options)
    assert stand_in.calls.count(call) >= occurrence
    assert not stand_in.droplets and not stand_in.firewalls and not stand_in.vpcs
    assert not stand_in.tags and stand_in.booter.vms == {}


@pytest.mark.parametrize(
    "call,occurrence",
    [
        ("droplets.destroy", 1),
        ("droplets.list", 1),
        ("firewalls.list", 1),
        ("firewalls.delete", 1),
        ("firewalls.delete", 2),
        ("vpcs.delete", 1),
        ("tags.delete", 1),
        ("tags.delete", 2),
    ],
)
async def test_failure_at_each_close_call_still_leaves_nothing(do, call, occurrence):
    stand_in, options = do
    cluster = await DropletCluster(n_workers=1, asynchronous=True, **options)
    # A final error: pydo retries a 500 on these GETs and DELETEs by itself, so the
    # close path would never see one.
    stand_in.fail(call, 422, "unprocessable_entity", occurrence=occurrence)
    made = stand_in.calls.count(call)
    await cluster.close()
    assert stand_in.calls.count(call) >= made + occurrence  # the failure was met
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


# -- the driver contract -------------------------------------------------------------------


async def test_user_named_clusters_are_listed_and_cleaned_up_each_alone(do):
    """``nightly-etl`` beside ``nightly`` and ``nightly-etl-scheduler``: the latter's tag
    used to be the former's scheduler-only tag, and ``dsc-`` ids alone were listed."""
    stand_in, options = do
    await check_named_clusters(DropletCluster, options, lambda c: nothing_left(stand_in, c))
    assert not stand_in.droplets and not stand_in.firewalls and not stand_in.vpcs
    assert not stand_in.tags


async def test_a_throttled_or_failed_poll_is_unknown_never_terminated(do):
    stand_in, options = do
    await check_polls(
        DropletCluster,
        options,
        [
            lambda: stand_in.rate_limit("droplets.get"),
            lambda: stand_in.fail("droplets.get", 500, "server_error"),
            lambda: stand_in.fail("droplets.get", 503, "service_unavailable"),
        ],
        lambda c: nothing_left(stand_in, c),
    )


async def test_a_failed_droplet_is_reported_by_name_id_address_and_state(do):
    """DigitalOcean's API keeps no console output: the error says so and names the
    droplet (name, id, address, status) so that it can be found in the control panel."""
    stand_in, options = do
    with pytest.raises(ClusterStartError) as info:
        await DropletCluster(
            asynchronous=True,
            **{**options, "boot_timeout": "6s"},
            extra_bootstrap=["exit 3"],
        )
    report = str(info.value)
    assert "DigitalOcean keeps no console output" in report
    droplet_id = re.search(r"id (\d+), ", report)
    assert droplet_id is not None, report
    assert re.search(r"private 127\.\d+\.\d+\.\d+", report), report
    # The droplet powered off when its boot failed: "off", as DigitalOcean reports it.
    assert "status 'off'" in report or "already deleted" in report, report
    assert not stand_in.droplets
