"""``EC2Cluster``: a secure Dask cluster on Amazon EC2, through aiobotocore.

What is particular to AWS: two security groups per cluster (one every member carries,
open only to the other members; one only the scheduler carries, opening its port and
dashboard to the creator's address), IMDSv2 with a hop limit of 1, encrypted root
volumes deleted with their instance, shutdown meaning terminate, spot workers that
retire themselves on an interruption notice, and the cluster id as a tag on every
instance, volume and security group.

Whether a VM gets a public address is decided before anything is made, from the route
table of its subnet (``egress.public_address``): a subnet that sends 0.0.0.0/0 to a NAT
gateway (or a NAT instance, or a transit gateway) needs none; one that sends it to an
internet gateway, as a new account's default VPC does, gives the VM a public address
that only carries its outbound traffic, since no security group lets anything in from
outside the cluster; a subnet with neither is refused.

Credentials come from botocore's own chain (environment, profiles, SSO, instance role);
none is ever sent to a VM. ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_EC2`` (or the
``endpoint_url`` option) point the client at LocalStack or a test stand-in.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from .. import driver, errors
from ..cloudinit import LIMITS
from ..cluster import VMCluster
from ..credentials import Role
from ..egress import Exits, decide_public_addresses
from ..errors import OptionError
from ..network import NetworkPolicy
from ..options import EC2Options

try:
    import botocore.session
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    from botocore.parsers import ResponseParserError
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError("EC2Cluster needs the aws extra: pip install 'dask-secure-cloud[aws]'") from e

__all__ = ["EC2Cluster", "EC2Driver"]

logger = logging.getLogger(__name__)

#: Canonical's account, which publishes the official Ubuntu AMIs.
UBUNTU_OWNER = "099720109477"
UBUNTU_NAME = "ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-{arch}-server-*"
_LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]
#: An instance in these states has ended, or is ending: its OS powered off and EC2
#: terminated it (``InstanceInitiatedShutdownBehavior=terminate``): nothing bills.
_ENDED_STATES = frozenset({"shutting-down", "terminated"})
#: An instance in these states still exists, and its EBS volumes bill: someone stopped
#: it through the API or the console (a shutdown from its OS terminates it).
_STOPPED_STATES = frozenset({"stopping", "stopped"})

# EC2 error codes -> what the user should change.
_ADVICE = {
    "InvalidInstanceType": "check scheduler_instance_type / worker_instance_type",
    "InvalidAMIID.NotFound": "check ami: it must exist in this region",
    "InvalidAMIID.Malformed": "check ami: it looks like 'ami-0123456789abcdef0'",
    "InvalidSubnetID.NotFound": "check subnet_id: it must exist in this region",
    "InvalidVpcID.NotFound": "check vpc: it must exist in this region",
    "InstanceLimitExceeded": "ask AWS for a higher instance limit, or use fewer workers",
    "VcpuLimitExceeded": "ask AWS for a higher vCPU quota, or use fewer or smaller instances",
    "InsufficientInstanceCapacity": "try another instance type or availability zone",
    "UnauthorizedOperation": "give these credentials the permissions listed in the docs",
    "AuthFailure": "the AWS credentials were rejected: check the profile or keys in use",
    "InvalidParameterValue": "check the option named in the message",
}


def _word(state: str) -> str:
    """An instance state as ``Driver.state`` words it: ``"stopped"`` where it still
    exists and bills (its volumes), ``"terminated"`` where it ended and nothing bills."""
    if state in _ENDED_STATES:
        return "terminated"
    if state in _STOPPED_STATES:
        return "stopped"
    return "running"


def known_regions() -> set[str]:
    """Every EC2 region botocore knows of, in every partition (no network needed)."""
    session = botocore.session.get_session()  # reads botocore's bundled endpoint data
    return {
        region
        for partition in session.get_available_partitions()
        for region in session.get_available_regions("ec2", partition_name=partition)
    }


#: EC2's error codes -> the kind of CloudError each is (see errors.cloud_error); codes
#: ending in ``.NotFound`` or ``.InUse`` are read by :func:`_kind_by_suffix`.
error_kinds: errors.ErrorKinds = {
    "InvalidInstanceID.NotFound": errors.NotFoundError,
    "InvalidGroup.NotFound": errors.NotFoundError,
    # Still referenced: a security group by the network interface of an instance that
    # is terminating.
    "DependencyViolation": errors.InUseError,
    "VolumeInUse": errors.InUseError,
    # The credentials or the account may not do this.
    **dict.fromkeys(
        (
            "UnauthorizedOperation",
            "AuthFailure",
            "OptInRequired",
            "Blocked",
            "PendingVerification",
            "SignatureDoesNotMatch",
            "InvalidClientTokenId",
            "MissingAuthenticationToken",
        ),
        errors.ForbiddenError,
    ),
    # Throttled, after botocore's own retries.
    **dict.fromkeys(
        (
            "RequestLimitExceeded",
            "Throttling",
            "ThrottlingException",
            "RequestThrottled",
            "RequestThrottledException",
            "TooManyRequestsException",
            "EC2ThrottledException",
            "BandwidthLimitExceeded",
        ),
        errors.ThrottledError,
    ),
}


def _kind_by_suffix(code: str) -> type[errors.CloudError] | None:
    """EC2 builds many codes from the resource's name: ``InvalidSubnetID.NotFound``,
    ``InvalidIPAddress.InUse``."""
    if code.endswith(".InUse"):
        return errors.InUseError
    if code.endswith(".NotFound"):
        return errors.NotFoundError
    return None


def ec2_error(message: str, code: str) -> errors.CloudError:
    """The :class:`~dask_secure_cloud.errors.CloudError` of the kind EC2's ``code`` says."""
    return errors.cloud_error(message, code, error_kinds, _kind_by_suffix)


@contextlib.contextmanager
def _translated(operation: str) -> Iterator[None]:
    """Turn botocore's errors into a :class:`CloudError` that says what to change."""
    try:
        yield
    except NoCredentialsError as e:
        raise driver.CloudError(
            "No AWS credentials found. Configure them as for the AWS CLI: "
            "AWS_PROFILE or ~/.aws/credentials, AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, SSO, or an instance role"
        ) from e
    except ClientError as e:
        error = e.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", str(e))
        advice = next((v for k, v in _ADVICE.items() if code.startswith(k)), None)
        hint = f" ({advice})" if advice else ""
        raise ec2_error(f"EC2 {operation} failed: {code}: {message}{hint}", code) from e
    except BotoCoreError as e:  # no answer: a network error, a timeout
        raise driver.CloudError(f"EC2 {operation} failed: {e}") from e
    except ResponseParserError as e:  # an answer not from EC2 (a proxy's error page)
        raise driver.CloudError(f"EC2 {operation} failed: the answer was not EC2's ({e})") from e


def subnet_route_table(tables: Sequence[Mapping[str, Any]], subnet_id: str) -> Mapping[str, Any]:
    """The route table a subnet uses: its explicit association, else the VPC's main one.

    ``tables`` are every route table of the subnet's VPC, as DescribeRouteTables lists
    them. A VPC always has a main route table, so one is found."""
    main: Mapping[str, Any] | None = None
    for table in tables:
        for association in table.get("Associations", []):
            if association.get("SubnetId") == subnet_id:
                return table
            if association.get("Main"):
                main = table
    if main is None:
        raise driver.CloudError(f"subnet {subnet_id}: its VPC reports no main route table")
    return main


def route_exits(table: Mapping[str, Any], place: str) -> Exits:
    """The ways out a route table's default route (0.0.0.0/0) offers a VM.

    A NAT gateway, a NAT instance (an instance or network interface as the target) or a
    transit gateway carry a private VM's traffic: the transit gateway is assumed to lead
    out, as it does in a hub-and-spoke egress VPC. An internet gateway carries only a
    public address's traffic. A route EC2 reports as ``blackhole`` (its NAT gateway
    deleted or failed, its internet gateway detached) leads nowhere."""
    for route in table.get("Routes", []):
        if route.get("DestinationCidrBlock") != "0.0.0.0/0" or route.get("State") != "active":
            continue
        if route.get("NatGatewayId"):
            return Exits(place, private=f"NAT gateway {route['NatGatewayId']}", public=None)
        target = route.get("InstanceId") or route.get("NetworkInterfaceId")
        if target:
            return Exits(place, private=f"NAT instance {target}", public=None)
        if route.get("TransitGatewayId"):
            way = f"transit gateway {route['TransitGatewayId']}"
            return Exits(place, private=way, public=None)
        if str(route.get("GatewayId", "")).startswith("igw-"):
            return Exits(place, private=None, public=f"internet gateway {route['GatewayId']}")
    return Exits(place, private=None, public=None)


def _fixes(role: Role, exits: Exits, table_id: str, vpc_id: str) -> list[str]:
    """AWS's own remedies for a role with no way out, as text the user can paste."""
    fixes = ["subnet_id=<a subnet whose route table sends 0.0.0.0/0 to a NAT gateway>"]
    if exits.public is not None and role is Role.WORKER:
        fixes.append(
            "worker_public_ip=None (the default) or True: workers get a public address "
            "for their outbound traffic, and no inbound connection from outside the cluster"
        )
    if exits.public is None:
        fixes.append(
            "subnet_id=<a subnet whose route table sends 0.0.0.0/0 to an internet gateway>"
        )
        fixes.append(
            f"add a route 0.0.0.0/0 to route table {table_id}: to a NAT gateway, or to an "
            f"internet gateway attached to {vpc_id}"
        )
    return fixes


class EC2Driver(driver.Driver):
    """Instances, volumes and two security groups per cluster, found by the cluster tag."""

    provider = "aws"
    user_data_limit = LIMITS["aws"]

    def __init__(self, options: EC2Options, *, network: NetworkPolicy) -> None:
        self.options = options
        self.instance_types = {
            Role.SCHEDULER: options.scheduler_instance_type,
            Role.WORKER: options.worker_instance_type,
        }
        self.ami = options.ami
        self.subnet_id = options.subnet_id
        self.security_groups = list(options.security_groups)
        self.tags = dict(options.tags)
        self.network = network
        #: The user's ``worker_public_ip``: True, False, or None to decide from the subnet.
        self.worker_public_ip = network.worker_public_ip
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._poll_client: Any = None
        self._root_device = "/dev/sda1"
        self._group_ids: dict[Role, list[str]] = {}
        #: Whether VMs of each role get a public address, decided by :meth:`prepare`.
        self._public: dict[Role, bool] = {}
        self._gpus: dict[Role, bool] = {}
        self._arch: dict[Role, str] = {}

    # -- the SDK ------------------------------------------------------------------------

    async def _ec2(self, poll: bool = False) -> Any:
        """The client; ``poll``: one that does not retry, for :meth:`state`, whose caller
        polls again anyway (retrying there would only add calls to a throttled account)."""
        if poll:
            if self._poll_client is None:
                # One attempt in all: botocore's "max_attempts" counts the retries alone.
                self._poll_client = await self._new_client({"total_max_attempts": 1})
            return self._poll_client
        if self._client is None:
            # Ten retries, backing off on throttling.
            self._client = await self._new_client({"max_attempts": 10})
        return self._client

    async def _new_client(self, attempts: dict[str, int]) -> Any:
        retries: dict[str, Any] = {**attempts, "mode": "standard"}
        return await self._stack.enter_async_context(
            get_session().create_client(
                "ec2",
                region_name=self.options.region,
                endpoint_url=self.options.endpoint_url,
                config=AioConfig(retries=retries, user_agent_extra="dask-secure-cloud"),
            )
        )

    async def _call(self, operation: str, poll: bool = False, **kwargs: Any) -> dict[str, Any]:
        client = await self._ec2(poll)
        with _translated(operation):
            return await getattr(client, operation)(**kwargs)

    async def _paginate(self, operation: str, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        client = await self._ec2()
        with _translated(operation):
            async for page in client.get_paginator(operation).paginate(**kwargs):
                yield page

    # -- before the first VM ------------------------------------------------------------

    def interruption_notice(self, role: Role) -> driver.InterruptionNotice | None:
        """A spot worker polls its interruption notice (IMDSv2: a session token first)."""
        if role is not Role.WORKER or not self.options.worker_spot:
            return None
        endpoint = self.options.metadata_endpoint.rstrip("/")
        return driver.InterruptionNotice(
            f"{endpoint}/latest/meta-data/spot/instance-action",
            token_url=f"{endpoint}/latest/api/token",
        )

    def where(self) -> str:
        return self.options.region

    async def prepare(self, cluster_id: str) -> None:
        vpc_id, vpc_cidr = await self._resolve_network()
        await self._check_instance_types()
        await self._resolve_ami()
        await self._decide_public_addresses(vpc_id)  # the last read-only check
        if self.security_groups:
            self._group_ids = {role: list(self.security_groups) for role in Role}
            return

        async def inside_the_vpc() -> list[str]:
            return [vpc_cidr]

        sources = await self.network.scheduler_sources(inside_the_vpc)
        members = await self._create_group(
            cluster_id, vpc_id, "", f"dask-secure-cloud cluster {cluster_id}: its members"
        )
        self._group_ids = {Role.WORKER: [members], Role.SCHEDULER: [members]}
        await self._call(
            "authorize_security_group_ingress",
            GroupId=members,
            IpPermissions=[{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": members}]}],
        )
        # The client's way in is a group of its own that only the scheduler carries, so
        # a worker with a public address accepts nothing from outside the cluster.
        # "--" ends the cluster id (no id has two hyphens in a row): this name is never
        # the members' group of a cluster called "<id>-scheduler".
        scheduler = await self._create_group(
            cluster_id,
            vpc_id,
            "--scheduler",
            f"dask-secure-cloud cluster {cluster_id}: the client to the scheduler",
        )
        self._group_ids[Role.SCHEDULER] = [members, scheduler]
        await self._call(
            "authorize_security_group_ingress",
            GroupId=scheduler,
            IpPermissions=[
                {
                    "IpProtocol": "tcp",
                    "FromPort": port,
                    "ToPort": port,
                    "IpRanges": [{"CidrIp": c, "Description": "dask client"} for c in sources],
                }
                for port in self.ports
            ],
        )

    async def _create_group(self, cluster_id: str, vpc_id: str, suffix: str, about: str) -> str:
        """A security group tagged with the cluster, so cleanup finds it even after a crash."""
        group = await self._call(
            "create_security_group",
            GroupName=f"dask-secure-cloud-{cluster_id}{suffix}",
            Description=about,
            VpcId=vpc_id,
            TagSpecifications=[
                {
                    "ResourceType": "security-group",
                    "Tags": self._tags(cluster_id, f"firewall{suffix}"),
                }
            ],
        )
        return group["GroupId"]

    async def _decide_public_addresses(self, vpc_id: str) -> None:
        """Read the subnet's route table and decide, per role, whether its VMs get a
        public address; refuse (before anything is made) a subnet with no way out."""
        tables: list[dict[str, Any]] = []
        filters = [{"Name": "vpc-id", "Values": [vpc_id]}]
        async for page in self._paginate("describe_route_tables", Filters=filters):
            tables.extend(page["RouteTables"])
        subnet_id = str(self.subnet_id)
        table = subnet_route_table(tables, subnet_id)
        exits = route_exits(table, f"subnet {subnet_id} of {vpc_id}")
        self._public = decide_public_addresses(
            exits,
            use_private_ip=self.network.use_private_ip,
            worker_public_ip=self.worker_public_ip,
            offline_image=self.offline_image,
            fixes=lambda role: _fixes(role, exits, table["RouteTableId"], vpc_id),
            logger=logger,
        )
        if not self.network.use_private_ip and exits.public is None:
            # Replies to the client would leave through the NAT, not the address it used.
            logger.warning(
                "%s sends 0.0.0.0/0 to %s, not to an internet gateway: the scheduler's "
                "public address will not answer the client. Use a subnet whose route "
                "table sends 0.0.0.0/0 to an internet gateway, or use_private_ip=True "
                "from inside the VPC",
                exits.place,
                exits.private or "nothing",
            )

    async def _resolve_network(self) -> tuple[str, str]:
        if self.subnet_id:
            subnet = (await self._call("describe_subnets", SubnetIds=[self.subnet_id]))["Subnets"][
                0
            ]
            if self.options.vpc and subnet["VpcId"] != self.options.vpc:
                raise driver.CloudError(
                    f"subnet_id {self.subnet_id} is in {subnet['VpcId']}, not in vpc "
                    f"{self.options.vpc}: pass a subnet of {self.options.vpc}, or drop vpc"
                )
            vpc_id = subnet["VpcId"]
        else:
            if self.options.vpc:
                vpc_id = self.options.vpc
            else:
                vpcs = await self._call(
                    "describe_vpcs", Filters=[{"Name": "isDefault", "Values": ["true"]}]
                )
                if not vpcs["Vpcs"]:
                    raise driver.CloudError(
                        f"region {self.options.region} has no default VPC: pass vpc= and subnet_id="
                    )
                vpc_id = vpcs["Vpcs"][0]["VpcId"]
            subnets = (
                await self._call(
                    "describe_subnets", Filters=[{"Name": "vpc-id", "Values": [vpc_id]}]
                )
            )["Subnets"]
            if not subnets:
                raise driver.CloudError(f"vpc {vpc_id} has no subnet: pass subnet_id=")
            subnets.sort(key=lambda s: (not s.get("DefaultForAz", False), s["SubnetId"]))
            self.subnet_id = subnets[0]["SubnetId"]
        vpc = (await self._call("describe_vpcs", VpcIds=[vpc_id]))["Vpcs"][0]
        return vpc_id, vpc["CidrBlock"]

    async def _check_instance_types(self) -> None:
        for role, instance_type in self.instance_types.items():
            option = f"{role.value}_instance_type"
            try:
                info = await self._call("describe_instance_types", InstanceTypes=[instance_type])
            except driver.CloudError as e:
                raise driver.CloudError(
                    f"{option}={instance_type!r} is not offered here: {e}"
                ) from e
            types = info.get("InstanceTypes") or [{}]
            self._gpus[role] = bool(types[0].get("GpuInfo"))
            archs = types[0].get("ProcessorInfo", {}).get("SupportedArchitectures", [])
            self._arch[role] = "arm64" if archs and "x86_64" not in archs else "amd64"

    async def _resolve_ami(self) -> None:
        if self.ami:
            images = (await self._call("describe_images", ImageIds=[self.ami]))["Images"]
            if not images:
                raise driver.CloudError(f"ami {self.ami} was not found in {self.options.region}")
        else:
            arch = self._arch.get(Role.WORKER, "amd64")
            images = (
                await self._call(
                    "describe_images",
                    Owners=[UBUNTU_OWNER],
                    Filters=[
                        {"Name": "name", "Values": [UBUNTU_NAME.format(arch=arch)]},
                        {"Name": "state", "Values": ["available"]},
                    ],
                )
            )["Images"]
            if not images:
                raise driver.CloudError(
                    f"no Ubuntu 24.04 LTS ({arch}) AMI found in {self.options.region}: pass ami="
                )
            images.sort(key=lambda image: image.get("CreationDate", ""))
            self.ami = images[-1]["ImageId"]
        self._root_device = images[-1].get("RootDeviceName", self._root_device)

    def gpus(self, role: Role) -> bool:
        return self._gpus.get(role, False)

    # -- VMs ----------------------------------------------------------------------------

    def _tags(self, cluster_id: str, name: str) -> list[dict[str, str]]:
        tags = {
            **self.tags,
            "Name": f"dask-secure-cloud-{cluster_id}-{name}",
            driver.CLUSTER_TAG: cluster_id,
            driver.CREATOR_TAG: self.creator,
        }
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    async def create(self, request: driver.VMRequest) -> driver.VM:
        worker = request.role is Role.WORKER
        public = self._public.get(request.role, self.network.public_address(worker))
        # The client connects to the scheduler's public address unless it is inside the
        # VPC; any other public address only carries the VM's own outbound traffic.
        reachable = public and not worker and not self.network.use_private_ip
        tags = self._tags(request.cluster_id, request.name)
        params: dict[str, Any] = {
            "ImageId": self.ami,
            "InstanceType": self.instance_types[request.role],
            "MinCount": 1,
            "MaxCount": 1,
            # gzipped (LIMITS["aws"]); botocore base64-encodes the bytes as they are.
            "UserData": request.user_data,
            "NetworkInterfaces": [
                {
                    "DeviceIndex": 0,
                    "SubnetId": self.subnet_id,
                    "Groups": self._group_ids.get(request.role, []),
                    "AssociatePublicIpAddress": public,
                    "DeleteOnTermination": True,
                }
            ],
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpPutResponseHopLimit": 1,
                "HttpEndpoint": "enabled",
            },
            "BlockDeviceMappings": [
                {
                    "DeviceName": self._root_device,
                    "Ebs": {
                        "VolumeSize": self.options.filesystem_size,
                        "VolumeType": "gp3",
                        "Encrypted": True,
                        "DeleteOnTermination": True,
                    },
                }
            ],
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }
        if self.options.iam_instance_profile:
            key = "Arn" if self.options.iam_instance_profile.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {key: self.options.iam_instance_profile}
        if self.options.key_name:
            params["KeyName"] = self.options.key_name
        if worker and self.options.worker_spot:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        instance = (await self._call("run_instances", **params))["Instances"][0]
        public_ip = None
        if reachable:
            instance = await self._wait_for_public_ip(instance["InstanceId"])
            public_ip = instance.get("PublicIpAddress")
        elif worker:
            public_ip = instance.get("PublicIpAddress")  # for the record, if known yet
        return driver.VM(
            id=instance["InstanceId"],
            name=request.name,
            role=request.role,
            cluster_id=request.cluster_id,
            private_ip=instance["PrivateIpAddress"],
            public_ip=public_ip,
        )

    async def _describe(self, instance_id: str, poll: bool = False) -> dict[str, Any]:
        reservations = (
            await self._call("describe_instances", poll=poll, InstanceIds=[instance_id])
        )["Reservations"]
        if not reservations or not reservations[0]["Instances"]:
            # EC2 forgets a terminated instance after a while.
            raise errors.NotFoundError(
                f"EC2 describe_instances: instance {instance_id} is not listed",
                "InvalidInstanceID.NotFound",
            )
        return reservations[0]["Instances"][0]

    async def _wait_for_public_ip(self, instance_id: str) -> dict[str, Any]:
        """The instance once EC2 reports its public address (within
        :attr:`operation_timeout`)."""
        instance: dict[str, Any] = {}

        async def addressed() -> bool:
            nonlocal instance
            instance = await self._describe(instance_id)
            return bool(instance.get("PublicIpAddress"))

        await self.poll_until(addressed, f"instance {instance_id}: its public address")
        return instance

    async def destroy(self, vm: driver.VM) -> None:
        try:
            await self._call("terminate_instances", InstanceIds=[vm.id])
        except driver.NotFoundError:
            return  # already gone

        async def terminated() -> bool:
            try:
                return (await self._describe(vm.id))["State"]["Name"] == "terminated"
            except driver.NotFoundError:
                return True

        await self.poll_until(terminated, f"terminating instance {vm.id} ({vm.name})")

    async def list(self, cluster_id: str) -> list[driver.VM]:
        found: list[driver.VM] = []
        filters = [
            {"Name": f"tag:{driver.CLUSTER_TAG}", "Values": [cluster_id]},
            {"Name": "instance-state-name", "Values": _LIVE_STATES},
        ]
        prefix = f"dask-secure-cloud-{cluster_id}-"
        async for page in self._paginate("describe_instances", Filters=filters):
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                    name = tags.get("Name", "").removeprefix(prefix)
                    found.append(
                        driver.VM(
                            id=instance["InstanceId"],
                            name=name,
                            role=Role.SCHEDULER if name == "scheduler" else Role.WORKER,
                            cluster_id=cluster_id,
                            private_ip=instance.get("PrivateIpAddress", ""),
                            public_ip=instance.get("PublicIpAddress"),
                        )
                    )
        return found

    async def clusters(self) -> list[driver.ClusterSummary]:
        filters = [
            {"Name": "tag-key", "Values": [driver.CLUSTER_TAG]},
            {"Name": "instance-state-name", "Values": _LIVE_STATES},
        ]
        found = []
        async for page in self._paginate("describe_instances", Filters=filters):
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                    found.append(
                        (
                            tags[driver.CLUSTER_TAG],
                            instance.get("LaunchTime"),
                            tags.get(driver.CREATOR_TAG),
                            _listed_state(instance.get("State", {}).get("Name")),
                        )
                    )
        groups = (
            await self._call(
                "describe_security_groups",
                Filters=[{"Name": "tag-key", "Values": [driver.CLUSTER_TAG]}],
            )
        )["SecurityGroups"]
        others = [
            ({t["Key"]: t["Value"] for t in group.get("Tags", [])}[driver.CLUSTER_TAG], "firewall")
            for group in groups
        ]
        return driver.summarize(found, others)

    async def states(self, cluster_id: str) -> dict[str, str]:
        """One DescribeInstances for the whole cluster: an instance shutting down or
        terminated powered itself off; a stopped one was stopped through the API."""
        found: dict[str, str] = {}
        filters = [{"Name": f"tag:{driver.CLUSTER_TAG}", "Values": [cluster_id]}]
        async for page in self._paginate("describe_instances", Filters=filters):
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    found[instance["InstanceId"]] = _word(instance["State"]["Name"])
        return found

    async def state(self, vm: driver.VM) -> str:
        try:
            name = (await self._describe(vm.id, poll=True))["State"]["Name"]
        except driver.NotFoundError:
            return "terminated"
        except driver.CloudError:  # throttled, refused, unreachable: nothing learnt
            return "unknown"
        return _word(name)

    async def console_output(self, vm: driver.VM) -> str:
        with contextlib.suppress(driver.CloudError):
            return (await self._call("get_console_output", InstanceId=vm.id)).get("Output", "")
        return ""

    async def release(self, cluster_id: str) -> None:
        """Delete the cluster's security groups once its instances are gone."""
        groups = (
            await self._call(
                "describe_security_groups",
                Filters=[{"Name": f"tag:{driver.CLUSTER_TAG}", "Values": [cluster_id]}],
            )
        )["SecurityGroups"]
        for group in groups:
            await self._delete_group(group["GroupId"])

    async def _delete_group(self, group_id: str) -> None:
        # Terminated instances keep their network interface for a while: until it is
        # gone, EC2 answers DependencyViolation.
        await self.delete_when_free(
            lambda: self._call("delete_security_group", GroupId=group_id),
            f"deleting security group {group_id}",
            interval=5,
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = self._poll_client = None


class EC2Cluster(VMCluster):
    """A secure Dask cluster on Amazon EC2.

    By default in the region's default VPC, on the newest official Ubuntu 24.04 LTS AMI,
    with two security groups per cluster: members to members, and the creator's address
    to the scheduler's port only.
    """

    provider = "aws"
    Options = EC2Options
    driver_class = EC2Driver

    @classmethod
    def make_driver(cls, options: EC2Options, **extra: Any) -> EC2Driver:
        regions = known_regions()
        if options.region not in regions:
            close = difflib.get_close_matches(options.region, sorted(regions), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"region {options.region!r} is not an EC2 region.{hint}")
        return super().make_driver(options, **extra)


def _listed_state(name: str | None) -> str:
    """An instance's state in :meth:`Driver.state`'s words, for ``list``. Shutting down
    ends in terminated (the cluster's instances terminate on shutdown) and bills no
    more; a stopped instance is one a person stopped, and its volume still bills."""
    if name in ("pending", "running"):
        return "running"
    if name in ("stopping", "stopped"):
        return "stopped"
    if name in ("shutting-down", "terminated"):
        return "terminated"
    return "unknown"
