"""EC2Cluster end to end: aiobotocore -> moto's EC2 server -> user-data booted here."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from distributed import Client
from helpers import decoded_files, vm_processes

from dask_secure_cloud import EC2Cluster
from dask_secure_cloud.cloudinit import secrets_in
from dask_secure_cloud.cluster import ClusterStartError
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.network import NetworkPolicy, NetworkPolicyError

from clouds.booter import VMBooter
from clouds.ec2 import EC2StandIn, Network, make_network
from clouds.naming import check_named_clusters, check_polls
from clouds.reach import CLIENT_ADDRESS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
REGION = "us-east-1"


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    ec2 = EC2StandIn(VMBooter(tmp_path_factory.mktemp("ec2-vms")), REGION)
    ec2.start()
    yield ec2
    ec2.stop()


@pytest.fixture
def account(stand_in, monkeypatch):
    """Test credentials and the endpoint override, on a fresh account."""
    stand_in.reset()
    stand_in.booter.egress.clear()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", stand_in.url)
    yield stand_in, boto3.client("ec2", region_name=REGION, endpoint_url=stand_in.url)
    stand_in.booter.stop_all()


def cluster_options(client, network: Network) -> dict:
    """Options for a cluster on ``network``; the client runs inside the VPC (the VMs
    are processes here, and the addresses the stand-in makes up for public IPs lead
    nowhere)."""
    return {
        "region": REGION,
        "ami": client.describe_images()["Images"][0]["ImageId"],
        "vpc": network.vpc_id,
        "subnet_id": network.subnet_id,
        "use_private_ip": True,
        "scheduler_instance_type": "t3.medium",
        "worker_instance_type": "t3.large",
        "boot_timeout": "60s",
    }


def on_network(account, way_out: str):
    """A VPC in 127/8 whose VM subnet gets out by ``way_out``, and options for it."""
    stand_in, client = account
    network = make_network(client, f"127.{random.randint(1, 254)}.1.0/24", way_out)
    options = cluster_options(client, network)
    stand_in.calls.clear()
    return stand_in, client, options


@pytest.fixture
def aws(account):
    """A VPC in 127/8 like a new account's default one: an internet gateway, no NAT."""
    return on_network(account, "internet")


def leftovers(client, cluster_id: str) -> dict[str, list[str]]:
    tag = [{"Name": "tag:dask-secure-cloud-cluster", "Values": [cluster_id]}]
    instances = [
        i["InstanceId"]
        for r in client.describe_instances(Filters=tag)["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    groups = [g["GroupId"] for g in client.describe_security_groups(Filters=tag)["SecurityGroups"]]
    return {
        "instances": instances,
        "security_groups": groups,
        "processes": vm_processes(cluster_id),
    }


NOTHING = {"instances": [], "security_groups": [], "processes": []}


def all_clusters_gone(client) -> bool:
    instances = [
        i
        for r in client.describe_instances()["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    groups = [
        g
        for g in client.describe_security_groups()["SecurityGroups"]
        if g["GroupName"] != "default"
    ]
    return not instances and not groups


def instances_of(client, cluster_id: str) -> dict[str, dict]:
    """The cluster's live instances by name (``scheduler``, ``worker-0``...)."""
    tag = [{"Name": "tag:dask-secure-cloud-cluster", "Values": [cluster_id]}]
    prefix = f"dask-secure-cloud-{cluster_id}-"
    return {
        {t["Key"]: t["Value"] for t in i["Tags"]}["Name"].removeprefix(prefix): i
        for r in client.describe_instances(Filters=tag)["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    }


def carried_groups(instance: dict) -> list[dict]:
    """The security groups of an instance's network interfaces (moto leaves the
    instance-level list empty for groups given on the interface; EC2 fills both)."""
    return [g for nic in instance["NetworkInterfaces"] for g in nic["Groups"]]


def outside_ways_in(client, instance: dict, members: set[str]) -> list[dict]:
    """Every ingress rule of ``instance``'s security groups that admits anything other
    than instances carrying only the cluster's own groups (``members``)."""
    groups = [g["GroupId"] for g in carried_groups(instance)]
    found = []
    for group in client.describe_security_groups(GroupIds=groups)["SecurityGroups"]:
        for rule in group["IpPermissions"]:
            pairs = {p["GroupId"] for p in rule.get("UserIdGroupPairs", [])}
            if (
                rule.get("IpRanges")
                or rule.get("Ipv6Ranges")
                or rule.get("PrefixListIds")
                or not pairs <= members
            ):
                found.append(rule)
    return found


async def test_defaults_on_a_new_accounts_network_compute_with_workers_closed(
    aws, caplog, outside_the_cloud
):
    """An internet gateway and no NAT, as a new account's default VPC, and the client
    outside AWS (it reaches only public addresses, through security groups): the
    scheduler is reached at its public address, open to the creator's address alone;
    workers get a public address for their way out, the stand-in gives every VM a route
    out, and no rule admits anything from outside the cluster to a worker."""
    stand_in, client, options = aws
    options = {k: v for k, v in options.items() if k != "use_private_ip"}  # the default
    caplog.set_level(logging.INFO, logger="dask_secure_cloud.providers.aws")
    async with EC2Cluster(
        n_workers=2, public_ip_url=outside_the_cloud, asynchronous=True, **options
    ) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(2, timeout=60)
            assert await dask_client.submit(sum, range(10)) == 45
            workers = list(cluster.scheduler_info["workers"])
            assert all(w.startswith("tls://127.") for w in workers)
        cluster_id = cluster.cluster_id

        # Every launch carried the hardening EC2 offers, and asked for a public address
        # itself (not left to the subnet's MapPublicIpOnLaunch).
        assert len(stand_in.launches) == 3
        for launch in stand_in.launches:
            assert launch["MetadataOptions.HttpTokens"] == "required"
            assert launch["MetadataOptions.HttpPutResponseHopLimit"] == "1"
            assert launch["InstanceInitiatedShutdownBehavior"] == "terminate"
            assert launch["BlockDeviceMapping.1.Ebs.Encrypted"] == "true"
            assert launch["BlockDeviceMapping.1.Ebs.DeleteOnTermination"] == "true"
            assert launch["NetworkInterface.1.AssociatePublicIpAddress"] == "true"
            kinds = {launch[f"TagSpecification.{i}.ResourceType"] for i in (1, 2)}
            assert kinds == {"instance", "volume"}
            user_data = base64.b64decode(launch["UserData"])
            # Gzipped whole: at least 3.5 KiB of EC2's 16 KiB (about 10 KiB of shell
            # before gzip) stays for the user's extra_bootstrap and env_vars.
            assert user_data[:2] == b"\x1f\x8b" and len(user_data) < 12.5 * 1024
            assert secrets_in(user_data) == []  # the VM makes its own key
            files = decoded_files(user_data)
            assert not any(
                cluster._credentials.client.key_pem.encode() in f for f in files.values()
            )
            assert b"testing" not in user_data  # no cloud credential

        instances = instances_of(client, cluster_id)
        assert sorted(instances) == ["scheduler", "worker-0", "worker-1"]
        assert all(i.get("PublicIpAddress") for i in instances.values())
        public = instances["scheduler"]["PublicIpAddress"]
        assert cluster.scheduler_address == f"tls://{public}:8786"
        assert stand_in.booter.egress == dict.fromkeys(instances, True)

        # Two groups: one every member carries, open to members only; one only the
        # scheduler carries, its port open to the creator's address; the dashboard is
        # reached through that port.
        groups = client.describe_security_groups(
            Filters=[{"Name": "tag:dask-secure-cloud-cluster", "Values": [cluster_id]}]
        )["SecurityGroups"]
        assert len(groups) == 2
        carried = {name: {g["GroupId"] for g in carried_groups(i)} for name, i in instances.items()}
        members = carried["worker-0"]
        assert carried["worker-1"] == members and len(members) == 1
        assert members < carried["scheduler"]
        for name in ("worker-0", "worker-1"):
            assert outside_ways_in(client, instances[name], members) == []
        client_rules = outside_ways_in(client, instances["scheduler"], members)
        assert {(r["FromPort"], r["ToPort"]) for r in client_rules} == {(8786, 8786)}
        for rule in client_rules:
            assert [c["CidrIp"] for c in rule["IpRanges"]] == [f"{CLIENT_ADDRESS}/32"]
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "worker VMs: a public address (inbound from outside the cluster closed), " in logged
        assert "out through internet gateway igw-" in logged
    assert leftovers(client, cluster_id) == NOTHING


async def test_scale_up_and_down(aws):
    _, client, options = aws
    async with EC2Cluster(n_workers=1, asynchronous=True, **options) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
            cluster.scale(2)
            await dask_client.wait_for_workers(2, timeout=60)
            cluster.scale(1)
            deadline = time.monotonic() + 60
            while len(leftovers(client, cluster.cluster_id)["instances"]) != 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.5)
        cluster_id = cluster.cluster_id
    assert leftovers(client, cluster_id) == NOTHING


async def test_throttled_launch_is_retried(aws):
    stand_in, client, options = aws
    stand_in.throttle("RunInstances")
    stand_in.throttle("DescribeInstances")
    async with EC2Cluster(n_workers=1, asynchronous=True, **options) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
    assert stand_in.calls.count("RunInstances") == 3  # one refused, then two launches
    assert all_clusters_gone(client)


# Every distinct EC2 call of start (with scale-up) and close, failed in turn.
START_CALLS = [
    "DescribeSubnets",
    "DescribeVpcs",
    "DescribeInstanceTypes",
    "DescribeImages",
    "DescribeRouteTables",
    "CreateSecurityGroup",
    "AuthorizeSecurityGroupIngress",
    "RunInstances",
]


@pytest.mark.parametrize("action", START_CALLS)
async def test_failure_at_each_start_call_leaves_nothing(aws, action):
    stand_in, client, options = aws
    stand_in.fail(action, "UnauthorizedOperation")
    with pytest.raises(ClusterStartError, match="UnauthorizedOperation"):
        await EC2Cluster(n_workers=1, asynchronous=True, **options)
    assert all_clusters_gone(client)
    assert stand_in.booter.vms == {}


async def test_failure_of_scale_up_launch_keeps_the_cluster_and_cleans_up(aws):
    stand_in, client, options = aws
    async with EC2Cluster(n_workers=1, asynchronous=True, **options) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
            stand_in.fail("RunInstances", "InsufficientInstanceCapacity")
            cluster.scale(2)
            with pytest.raises(Exception, match="InsufficientInstanceCapacity"):
                await cluster._correct_state()
            # The cluster still works with what it has.
            assert await dask_client.submit(lambda: 7) == 7
    assert all_clusters_gone(client)


@pytest.mark.parametrize(
    "action",
    ["TerminateInstances", "DescribeInstances", "DescribeSecurityGroups", "DeleteSecurityGroup"],
)
async def test_failure_at_each_close_call_still_leaves_nothing(aws, action):
    stand_in, client, options = aws
    cluster = await EC2Cluster(n_workers=1, asynchronous=True, **options)
    stand_in.fail(action, "UnauthorizedOperation")
    # One failed call is absorbed: the sweep after the graceful shutdown deletes what
    # is left and confirms it, so close() succeeds and nothing remains.
    await cluster.close()
    assert action in stand_in.calls
    assert leftovers(client, cluster.cluster_id) == NOTHING
    assert all_clusters_gone(client)


def test_unknown_region_is_refused_before_any_call(aws):
    stand_in, _, options = aws
    with pytest.raises(ValueError, match="Did you mean 'us-east-1'"):
        EC2Cluster(**{**options, "region": "us-east-11"})
    assert stand_in.calls == []


@pytest.mark.parametrize(
    "change,match",
    [
        ({"worker_instance_type": "t3.gigantic"}, "worker_instance_type='t3.gigantic'"),
        ({"ami": "ami-0000000000000dead"}, "ami"),
        ({"ami": None}, "no Ubuntu 24.04 LTS"),
    ],
)
async def test_bad_cloud_input_fails_before_any_resource(aws, change, match):
    stand_in, client, options = aws
    with pytest.raises(ClusterStartError, match=match):
        await EC2Cluster(asynchronous=True, **{**options, **change})
    assert "CreateSecurityGroup" not in stand_in.calls and "RunInstances" not in stand_in.calls
    assert all_clusters_gone(client)


async def test_subnet_outside_the_vpc_is_refused(aws):
    stand_in, client, options = aws
    other = client.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    with pytest.raises(ClusterStartError, match=f"not in vpc {other}"):
        await EC2Cluster(asynchronous=True, **{**options, "vpc": other})
    assert "CreateSecurityGroup" not in stand_in.calls
    assert all_clusters_gone(client)


async def test_missing_credentials_is_a_clear_error(aws, monkeypatch):
    stand_in, _, options = aws
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ClusterStartError, match="No AWS credentials found"):
        await EC2Cluster(asynchronous=True, **options)
    assert stand_in.calls == []


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"security": False, "use_private_ip": False}, NetworkPolicyError, "allow_insecure_public"),
        (
            {"allowed_cidrs": ["0.0.0.0/0"], "use_private_ip": False},
            NetworkPolicyError,
            "open_to_world",
        ),
        ({"allowed_cidrs": ["not-an-ip"]}, NetworkPolicyError, "'not-an-ip' is not an address"),
        ({"filesystem_size": 2}, ValueError, "filesystem_size"),
        ({"worker_public_ip": "yes"}, ValueError, "worker_public_ip must be True, False or None"),
        ({"tags": {"dask-secure-cloud-cluster": "x"}}, ValueError, "set by the cluster"),
        (
            {"extra_bootstrap": [f"echo {os.urandom(40).hex()}" for _ in range(400)]},
            ValueError,
            "EC2 allows 16,384",
        ),
    ],
)
async def test_unsafe_or_invalid_options_are_refused(aws, change, error, match):
    stand_in, client, options = aws
    with pytest.raises(error, match=match):
        await EC2Cluster(asynchronous=True, **{**options, **change})
    assert "CreateSecurityGroup" not in stand_in.calls
    assert all_clusters_gone(client)


def test_stand_in_rejects_what_ec2_rejects(aws):
    _, client, options = aws
    from botocore.exceptions import ClientError

    too_big = "#cloud-config\n" + "#" * 16_400
    nic = {"DeviceIndex": 0, "SubnetId": options["subnet_id"]}
    for kwargs, code in (
        ({"UserData": too_big}, "InvalidParameterValue"),
        ({"InstanceType": "t3.gigantic"}, "InvalidParameterValue"),
        ({"MetadataOptions": {"HttpTokens": "always"}}, "InvalidParameterValue"),
        (
            {"TagSpecifications": [{"ResourceType": "vm", "Tags": [{"Key": "a", "Value": "b"}]}]},
            "InvalidParameterValue",
        ),
        (
            {"NetworkInterfaces": [nic], "SubnetId": options["subnet_id"]},
            "InvalidParameterCombination",
        ),
        (
            {
                "NetworkInterfaces": [
                    {**nic, "AssociatePublicIpAddress": True},
                    {**nic, "DeviceIndex": 1},
                ]
            },
            "InvalidParameterCombination",
        ),
    ):
        with pytest.raises(ClientError, match=code):
            client.run_instances(ImageId=options["ami"], MinCount=1, MaxCount=1, **kwargs)


def test_stand_in_models_the_network_as_ec2_does(account):
    """A new account's default VPC routes 0.0.0.0/0 to its internet gateway; a route to
    another VPC's gateway is refused; a public NAT gateway in a VPC without an internet
    gateway fails; a route to a NAT gateway that is gone is a blackhole."""
    stand_in, client = account
    from botocore.exceptions import ClientError

    default_vpc = client.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])
    default_vpc = default_vpc["Vpcs"][0]["VpcId"]
    main = client.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [default_vpc]}])
    routes = main["RouteTables"][0]["Routes"]
    igw = next(r["GatewayId"] for r in routes if r["DestinationCidrBlock"] == "0.0.0.0/0")
    assert igw.startswith("igw-")
    assert client.describe_nat_gateways()["NatGateways"] == []

    closed = make_network(client, "10.77.0.0/25", "none")
    assert closed.subnet_id.startswith("subnet-")  # any CIDR, not just 127/8
    with pytest.raises(ClientError, match="InvalidParameterValue"):
        client.create_route(
            RouteTableId=closed.route_table_id, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw
        )
    allocation = client.allocate_address(Domain="vpc")["AllocationId"]
    nat = client.create_nat_gateway(SubnetId=closed.subnet_id, AllocationId=allocation)
    nat_id = nat["NatGateway"]["NatGatewayId"]
    described = client.describe_nat_gateways(NatGatewayIds=[nat_id])["NatGateways"][0]
    assert described["State"] == "failed"

    behind_nat = make_network(client, f"127.{random.randint(1, 254)}.1.0/24", "nat")
    table = client.describe_route_tables(RouteTableIds=[behind_nat.route_table_id])
    (route,) = [r for r in table["RouteTables"][0]["Routes"] if r.get("NatGatewayId")]
    assert route["State"] == "active"
    client.delete_nat_gateway(NatGatewayId=route["NatGatewayId"])
    table = client.describe_route_tables(RouteTableIds=[behind_nat.route_table_id])
    (route,) = [r for r in table["RouteTables"][0]["Routes"] if r.get("NatGatewayId")]
    assert route["State"] == "blackhole"

    # A parameter the operation does not have (here the plural of RouteTableId.N) is
    # refused, as EC2 does; the SDK itself never sends one.
    body = urllib.parse.urlencode(
        {"Action": "DescribeRouteTables", "Version": "2016-11-15", "RouteTableIds.1": "rtb-1"}
    ).encode()
    scope = f"Credential=testing/20260101/{REGION}/ec2/aws4_request"
    request = urllib.request.Request(
        stand_in.url,
        data=body,
        headers={"Authorization": f"AWS4-HMAC-SHA256 {scope}, SignedHeaders=host, Signature=0"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert b"<Code>UnknownParameter</Code>" in refused.value.read()


class _MetadataService(BaseHTTPRequestHandler):
    """Just enough of IMDSv2 for a spot interruption notice."""

    interrupted = threading.Event()

    def do_PUT(self):
        self._answer(200, b"token")

    def do_GET(self):
        ok = self.headers.get("X-aws-ec2-metadata-token") == "token"
        if ok and self.interrupted.is_set():
            self._answer(200, b'{"action": "terminate", "time": "2030-01-01T00:00:00Z"}')
        else:
            self._answer(404 if ok else 401, b"")

    def _answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


async def test_spot_worker_retires_on_interruption_notice(aws):
    stand_in, client, options = aws
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MetadataService)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _MetadataService.interrupted.clear()
    try:
        async with EC2Cluster(
            n_workers=1,
            worker_spot=True,
            metadata_endpoint=f"http://127.0.0.1:{server.server_address[1]}",
            asynchronous=True,
            **options,
        ) as cluster:
            launch = stand_in.launches[-1]
            assert launch["InstanceMarketOptions.MarketType"] == "spot"
            async with Client(cluster, asynchronous=True) as dask_client:
                await dask_client.wait_for_workers(1, timeout=60)
                _MetadataService.interrupted.set()
                deadline = time.monotonic() + 30
                while cluster.scheduler_info["workers"]:
                    assert time.monotonic() < deadline, "the worker did not retire"
                    await asyncio.sleep(0.5)
            cluster_id = cluster.cluster_id
    finally:
        server.shutdown()
    assert leftovers(client, cluster_id) == NOTHING


async def test_boot_failure_is_reported_with_the_console_and_removed(aws):
    _, client, options = aws
    with pytest.raises(ClusterStartError, match="ec2-boot-marker") as info:
        await EC2Cluster(
            asynchronous=True,
            **{**options, "boot_timeout": "6s"},
            extra_bootstrap=["echo ec2-boot-marker", "exit 3"],
        )
    # The VM ended when its boot failed: EC2 terminated it and it is reported then.
    assert "scheduler VM scheduler stopped" in str(info.value)
    assert "boot FAILED at step extra-bootstrap" in str(info.value)
    assert all_clusters_gone(client)


async def test_default_vpc_and_tags(aws):
    """Without vpc or subnet the region's default VPC is used; user tags reach the VMs."""
    _, client, options = aws
    from dask_secure_cloud.driver import VMRequest
    from dask_secure_cloud.options import EC2Options, resolve
    from dask_secure_cloud.providers.aws import EC2Driver

    default_vpc = client.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])
    default_vpc = default_vpc["Vpcs"][0]["VpcId"]
    driver_options = resolve(
        EC2Options,
        {
            "region": REGION,
            "scheduler_instance_type": "t3.medium",
            "worker_instance_type": "t3.medium",
            "ami": options["ami"],
            "filesystem_size": 20,
            "tags": {"team": "analytics"},
        },
    )
    driver = EC2Driver(driver_options, network=NetworkPolicy(use_private_ip=True))
    driver.configure(ports=(8786, 8787), boot_timeout=10)
    try:
        await driver.prepare("c-default")
        subnet = client.describe_subnets(SubnetIds=[driver.subnet_id])["Subnets"][0]
        assert subnet["VpcId"] == default_vpc
        groups = driver._group_ids[Role.SCHEDULER]
        for group in client.describe_security_groups(GroupIds=groups)["SecurityGroups"]:
            assert group["VpcId"] == default_vpc
        # A new account's default VPC: an internet gateway, no NAT, so public addresses.
        assert driver._public == {Role.SCHEDULER: True, Role.WORKER: True}
        vm = await driver.create(
            VMRequest(
                cluster_id="c-default",
                name="worker-0",
                role=Role.WORKER,
                # Something that runs: a process VM with nothing to run ends at once, and
                # EC2 terminates an instance whose OS has ended.
                user_data=b"#cloud-config\nruncmd:\n  - [sleep, '300']\n",
            )
        )
        tags = {
            t["Key"]: t["Value"]
            for t in client.describe_tags(Filters=[{"Name": "resource-id", "Values": [vm.id]}])[
                "Tags"
            ]
        }
        assert tags["team"] == "analytics" and tags["dask-secure-cloud-cluster"] == "c-default"
        assert [v.id for v in await driver.list("c-default")] == [vm.id]
        await driver.destroy(vm)
        await driver.release("c-default")
        assert await driver.list("c-default") == []
        assert leftovers(client, "c-default") == NOTHING
    finally:
        await driver.close()


async def test_list_finds_clusters_and_what_a_killed_start_left(aws):
    from listing import check_listing

    _, client, options = aws
    await check_listing(EC2Cluster, options)
    assert all_clusters_gone(client)


# -- the way out, decided before anything is made --------------------------------------


@pytest.mark.parametrize(
    "way_out, change, names",
    [
        # A new account's default VPC with private workers: refused, not booted to fail.
        ("internet", {"worker_public_ip": False}, ["worker_public_ip=None"]),
        ("none", {"worker_public_ip": False}, ["an internet gateway attached to"]),
        ("none", {}, ["an internet gateway attached to"]),
    ],
)
async def test_no_way_out_is_refused_before_any_call_that_makes_something(
    account, way_out, change, names
):
    stand_in, client, options = on_network(account, way_out)
    with pytest.raises(ClusterStartError) as info:
        await EC2Cluster(n_workers=1, asynchronous=True, **{**options, **change})
    assert stand_in.mutations == []  # no security group, no instance, no tag: nothing
    message = str(info.value)
    assert "workers would have no route out" in message
    assert f"subnet {options['subnet_id']} of {options['vpc']}" in message
    assert "subnet_id=<a subnet whose route table sends 0.0.0.0/0 to a NAT gateway>" in message
    assert "offline_image=True" in message
    for name in names:
        assert name in message
    assert all_clusters_gone(client)


async def test_an_offline_image_may_start_where_there_is_no_way_out(account):
    """The user says the image needs nothing from outside: VMs start with no route out
    (process VMs here boot without one, so the cluster even computes)."""
    stand_in, client, options = on_network(account, "none")
    async with EC2Cluster(n_workers=1, offline_image=True, asynchronous=True, **options) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
            assert await dask_client.submit(lambda: 7) == 7
        for launch in stand_in.launches:
            assert launch["NetworkInterface.1.AssociatePublicIpAddress"] == "false"
        assert stand_in.booter.egress == {"scheduler": False, "worker-0": False}
        cluster_id = cluster.cluster_id
    assert leftovers(client, cluster_id) == NOTHING


async def test_private_workers_behind_a_nat_gateway_get_out_without_public_addresses(account):
    stand_in, client, options = on_network(account, "nat")
    async with EC2Cluster(n_workers=2, asynchronous=True, **options) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(2, timeout=60)
            assert await dask_client.submit(sum, range(4)) == 6
        instances = instances_of(client, cluster.cluster_id)
        for launch in stand_in.launches:
            assert launch["NetworkInterface.1.AssociatePublicIpAddress"] == "false"
        assert not any(i.get("PublicIpAddress") for i in instances.values())
        assert stand_in.booter.egress == dict.fromkeys(instances, True)
        cluster_id = cluster.cluster_id
    assert leftovers(client, cluster_id) == NOTHING


async def test_a_deleted_nat_gateway_leaves_no_way_out(account):
    """EC2 reports the route to a deleted NAT gateway as a blackhole: no way out, even
    though the VPC's main route table still leads to an internet gateway."""
    stand_in, client, options = on_network(account, "nat")
    nat = client.describe_nat_gateways()["NatGateways"][0]["NatGatewayId"]
    client.delete_nat_gateway(NatGatewayId=nat)
    stand_in.calls.clear()
    with pytest.raises(ClusterStartError, match="no route out"):
        await EC2Cluster(n_workers=1, asynchronous=True, **options)
    assert stand_in.mutations == []


async def test_workers_may_ask_for_public_addresses_behind_a_nat(account):
    stand_in, client, options = on_network(account, "nat")
    async with EC2Cluster(
        n_workers=1, worker_public_ip=True, asynchronous=True, **options
    ) as cluster:
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(1, timeout=60)
        public = {
            launch_name(launch): launch["NetworkInterface.1.AssociatePublicIpAddress"]
            for launch in stand_in.launches
        }
        assert public == {"scheduler": "false", "worker-0": "true"}
        assert stand_in.booter.egress == {"scheduler": True, "worker-0": True}
        cluster_id = cluster.cluster_id
    assert leftovers(client, cluster_id) == NOTHING


def launch_name(launch: dict) -> str:
    """The VM's name (``scheduler``, ``worker-0``) in a RunInstances request."""
    tags = {
        launch[key]: launch[key.removesuffix(".Key") + ".Value"]
        for key in launch
        if key.startswith("TagSpecification.1.Tag.") and key.endswith(".Key")
    }
    return tags["Name"].removeprefix(f"dask-secure-cloud-{tags['dask-secure-cloud-cluster']}-")


def _table(*routes: dict, subnet: str | None = None, main: bool = False) -> dict:
    associations = [{"Main": True}] if main else [{"Main": False, "SubnetId": subnet}]
    return {"RouteTableId": "rtb-1", "Associations": associations, "Routes": list(routes)}


LOCAL = {"DestinationCidrBlock": "10.0.0.0/16", "GatewayId": "local", "State": "active"}


@pytest.mark.parametrize(
    "route, private, public",
    [
        ({"NatGatewayId": "nat-1"}, "NAT gateway nat-1", None),
        ({"InstanceId": "i-1"}, "NAT instance i-1", None),
        ({"NetworkInterfaceId": "eni-1"}, "NAT instance eni-1", None),
        ({"TransitGatewayId": "tgw-1"}, "transit gateway tgw-1", None),
        ({"GatewayId": "igw-1"}, None, "internet gateway igw-1"),
        ({"GatewayId": "vgw-1"}, None, None),  # a VPN: not assumed to lead out
        ({"NatGatewayId": "nat-1", "State": "blackhole"}, None, None),
        ({"GatewayId": "igw-1", "DestinationCidrBlock": "0.0.0.0/1"}, None, None),
    ],
)
def test_the_default_route_gives_the_ways_out(route, private, public):
    from dask_secure_cloud.providers.aws.network import route_exits

    default = {"DestinationCidrBlock": "0.0.0.0/0", "State": "active", **route}
    exits = route_exits(_table(LOCAL, default, main=True), "subnet s of v")
    assert (exits.private, exits.public) == (private, public)


def test_a_subnet_uses_its_own_route_table_else_the_main_one():
    from dask_secure_cloud.providers.aws.network import subnet_route_table

    main = {**_table(LOCAL, main=True), "RouteTableId": "rtb-main"}
    own = {**_table(LOCAL, subnet="subnet-a"), "RouteTableId": "rtb-a"}
    assert subnet_route_table([main, own], "subnet-a")["RouteTableId"] == "rtb-a"
    assert subnet_route_table([own, main], "subnet-b")["RouteTableId"] == "rtb-main"


# -- the driver contract -------------------------------------------------------------------


async def test_user_named_clusters_are_listed_and_cleaned_up_each_alone(aws):
    """``nightly-etl`` beside ``nightly`` and ``nightly-etl-scheduler``: the latter's
    members' security group used to have the name of the former's scheduler group."""
    _, client, options = aws
    await check_named_clusters(EC2Cluster, options, lambda c: leftovers(client, c) == NOTHING)
    assert all_clusters_gone(client)


async def test_a_throttled_or_failed_poll_is_unknown_never_terminated(aws):
    stand_in, client, options = aws
    await check_polls(
        EC2Cluster,
        options,
        [
            lambda: stand_in.throttle("DescribeInstances"),
            lambda: stand_in.fail("DescribeInstances", "InternalError", status=500),
            lambda: stand_in.fail("DescribeInstances", "Unavailable", status=503),
        ],
        lambda c: leftovers(client, c) == NOTHING,
    )
    assert all_clusters_gone(client)
