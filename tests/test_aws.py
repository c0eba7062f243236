"""EC2Cluster end to end: aiobotocore -> moto's EC2 server -> user-data booted here."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from distributed import Client

from dask_secure_cloud import EC2Cluster
from dask_secure_cloud.cluster import ClusterStartError
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.network import NetworkPolicy, NetworkPolicyError

from clouds.booter import VMBooter
from clouds.ec2 import EC2StandIn
from conftest import decoded_files, vm_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
REGION = "us-east-1"


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    ec2 = EC2StandIn(VMBooter(tmp_path_factory.mktemp("ec2-vms")), REGION)
    ec2.start()
    yield ec2
    ec2.stop()


@pytest.fixture
def aws(stand_in, monkeypatch):
    """Test credentials and the endpoint override, a fresh account, a VPC in 127/8."""
    stand_in.reset()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", stand_in.url)
    client = boto3.client("ec2", region_name=REGION, endpoint_url=stand_in.url)
    second = random.randint(1, 254)
    vpc = client.create_vpc(CidrBlock=f"127.{second}.0.0/16")["Vpc"]["VpcId"]
    subnet = client.create_subnet(VpcId=vpc, CidrBlock=f"127.{second}.1.0/24")["Subnet"]
    ami = client.describe_images()["Images"][0]["ImageId"]
    stand_in.calls.clear()
    options = {
        "region": REGION,
        "ami": ami,
        "vpc": vpc,
        "subnet_id": subnet["SubnetId"],
        "use_private_ip": True,
        "scheduler_instance_type": "t3.medium",
        "worker_instance_type": "t3.large",
        "boot_timeout": "60s",
    }
    yield stand_in, client, options
    stand_in.booter.stop_all()


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


async def test_ec2_cluster_computes_over_tls_and_leaves_nothing(aws):
    stand_in, client, options = aws
    async with EC2Cluster(n_workers=2, asynchronous=True, **options) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.")
        async with Client(cluster, asynchronous=True) as dask_client:
            await dask_client.wait_for_workers(2, timeout=60)
            assert await dask_client.submit(sum, range(10)) == 45
            workers = list(cluster.scheduler_info["workers"])
            assert all(w.startswith("tls://127.") for w in workers)
        cluster_id = cluster.cluster_id

        # Every launch carried the hardening EC2 offers.
        assert len(stand_in.launches) == 3
        for launch in stand_in.launches:
            assert launch["MetadataOptions.HttpTokens"] == "required"
            assert launch["MetadataOptions.HttpPutResponseHopLimit"] == "1"
            assert launch["InstanceInitiatedShutdownBehavior"] == "terminate"
            assert launch["BlockDeviceMapping.1.Ebs.Encrypted"] == "true"
            assert launch["BlockDeviceMapping.1.Ebs.DeleteOnTermination"] == "true"
            assert launch["NetworkInterface.1.AssociatePublicIpAddress"] == "false"
            kinds = {launch[f"TagSpecification.{i}.ResourceType"] for i in (1, 2)}
            assert kinds == {"instance", "volume"}
            user_data = base64.b64decode(launch["UserData"])
            assert len(user_data) < 8192  # half of EC2's 16 KB stays for the user
            files = decoded_files(user_data)
            assert not any(
                cluster._credentials.client.key_pem.encode() in f for f in files.values()
            )
            assert b"testing" not in user_data  # no cloud credential

        # The security group: scheduler port and dashboard from the VPC only (client
        # inside it), everything between members.
        group = client.describe_security_groups(
            Filters=[{"Name": "tag:dask-secure-cloud-cluster", "Values": [cluster_id]}]
        )["SecurityGroups"][0]
        rules = group["IpPermissions"]
        ports = {r.get("FromPort") for r in rules if r.get("IpRanges")}
        assert ports == {8786, 8787}
        for rule in rules:
            for cidr in rule.get("IpRanges", []):
                assert cidr["CidrIp"].startswith("127.") and cidr["CidrIp"].endswith("/16")
        assert any(p.get("UserIdGroupPairs") for p in rules)
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
            ClusterStartError,
            "open_to_world",
        ),
        ({"allowed_cidrs": ["not-an-ip"]}, NetworkPolicyError, "'not-an-ip' is not an address"),
        ({"filesystem_size": 2}, ValueError, "filesystem_size"),
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
    for kwargs, code in (
        ({"UserData": too_big}, "InvalidParameterValue"),
        ({"InstanceType": "t3.gigantic"}, "InvalidParameterValue"),
    ):
        with pytest.raises(ClientError, match=code):
            client.run_instances(ImageId=options["ami"], MinCount=1, MaxCount=1, **kwargs)


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
    assert "6s (boot_timeout)" in str(info.value)
    assert all_clusters_gone(client)


async def test_default_vpc_and_tags(aws):
    """Without vpc or subnet the region's default VPC is used; user tags reach the VMs."""
    _, client, options = aws
    from dask_secure_cloud.driver import VMRequest
    from dask_secure_cloud.providers.aws import EC2Driver

    default_vpc = client.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])
    default_vpc = default_vpc["Vpcs"][0]["VpcId"]
    driver = EC2Driver(
        region=REGION,
        endpoint_url=None,
        instance_types={Role.SCHEDULER: "t3.medium", Role.WORKER: "t3.medium"},
        ami=options["ami"],
        vpc=None,
        subnet_id=None,
        security_groups=[],
        iam_instance_profile=None,
        key_name=None,
        filesystem_size=20,
        worker_spot=False,
        tags={"team": "analytics"},
        network=NetworkPolicy(use_private_ip=True),
    )
    driver.configure(ports=(8786, 8787), boot_timeout=10)
    try:
        await driver.prepare("c-default")
        subnet = client.describe_subnets(SubnetIds=[driver.subnet_id])["Subnets"][0]
        assert subnet["VpcId"] == default_vpc
        group = client.describe_security_groups(GroupIds=driver._group_ids)["SecurityGroups"][0]
        assert group["VpcId"] == default_vpc
        vm = await driver.create(
            VMRequest(
                cluster_id="c-default",
                name="worker-0",
                role=Role.WORKER,
                user_data=b"#cloud-config\n{}\n",
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
