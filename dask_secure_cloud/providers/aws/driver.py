"""The EC2 driver: instances, volumes and two security groups per cluster, found by
the cluster tag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import botocore.session
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from ... import driver, errors
from ...cloudinit import LIMITS
from ...credentials import Role
from ...egress import Exits, decide_public_addresses
from ...network import NetworkPolicy
from ...options import EC2Options
from .errors import _translated, quota_refusal
from .network import _fixes, route_exits, subnet_route_table
from .states import _LIVE_STATES, _listed_state, _word
from .zones import ZoneSteps, _subnet_order

logger = logging.getLogger(__name__)


#: Canonical's account, which publishes the official Ubuntu AMIs.
UBUNTU_OWNER = "099720109477"
UBUNTU_NAME = "ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-{arch}-server-*"


#: RunInstances tries while EC2 throttles or asks to try again, and those codes.
_LAUNCH_TRIES = 6
_TRY_AGAIN = frozenset({"InternalError", "InternalFailure", "Unavailable", "ServiceUnavailable"})


def known_regions() -> set[str]:
    """Every EC2 region botocore knows of, in every partition (no network needed)."""
    session = botocore.session.get_session()  # reads botocore's bundled endpoint data
    return {
        region
        for partition in session.get_available_partitions()
        for region in session.get_available_regions("ec2", partition_name=partition)
    }


class EC2Driver(ZoneSteps, driver.Driver):
    """Instances, volumes and two security groups per cluster, found by the cluster tag."""

    provider = "aws"
    user_data_limit = LIMITS["aws"]
    #: What a shutdown from the OS does: ends the instance (an image builder's stops).
    shutdown_behavior = "terminate"

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
        self._launch_client: Any = None
        self._root_device = "/dev/sda1"
        self._group_ids: dict[Role, list[str]] = {}
        #: Whether VMs of each role get a public address, decided by :meth:`prepare`.
        self._public: dict[Role, bool] = {}
        self._gpus: dict[Role, bool] = {}
        self._arch: dict[Role, str] = {}
        #: The VPC (its id, its CIDR) and route table the instances use: read_exits.
        self._vpc_id = self._vpc_cidr = self._route_table_id = ""
        #: The VPC's subnets as DescribeSubnets gave them (read_exits).
        self._vpc_subnets: list[dict[str, Any]] = []
        #: Availability zone -> the subnet VMs in it join: the chosen subnet's zone, and
        #: (unless subnet_id pins one) a subnet of each other zone that has the same
        #: route table, so the same ways out.
        self._zone_subnets: dict[str, str] = {}
        self._region_zones: list[str] | None = None

    # -- the SDK ------------------------------------------------------------------------

    async def _ec2(self, poll: bool = False, launch: bool = False) -> Any:
        """The client; ``poll``: one that does not retry, for :meth:`state`, whose caller
        polls again anyway (retrying there would only add calls to a throttled account);
        ``launch``: one that does not retry either, for RunInstances (:meth:`_launch`)."""
        if launch:
            if self._launch_client is None:
                self._launch_client = await self._new_client({"total_max_attempts": 1})
            return self._launch_client
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

    async def _call(
        self, operation: str, poll: bool = False, launch: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        client = await self._ec2(poll, launch)
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

    async def check_request(self, cluster_id: str) -> None:
        await self._check_instance_types()
        await self._resolve_ami()

    async def read_exits(self, cluster_id: str) -> Exits:
        """The VPC and subnet the instances join, and the ways out the subnet's route
        table offers them."""
        self._vpc_id, self._vpc_cidr = await self._resolve_network()
        tables: list[dict[str, Any]] = []
        filters = [{"Name": "vpc-id", "Values": [self._vpc_id]}]
        async for page in self._paginate("describe_route_tables", Filters=filters):
            tables.extend(page["RouteTables"])
        subnet_id = str(self.subnet_id)
        table = subnet_route_table(tables, subnet_id)
        self._route_table_id = table["RouteTableId"]
        self._place_zones(tables, subnet_id)
        return route_exits(table, f"subnet {subnet_id} of {self._vpc_id}")

    def decide_public(self, exits: Exits) -> None:
        vpc_id, table_id = self._vpc_id, self._route_table_id
        self._public = decide_public_addresses(
            exits,
            use_private_ip=self.network.use_private_ip,
            worker_public_ip=self.worker_public_ip,
            offline_image=self.offline_image,
            fixes=lambda role: _fixes(role, exits, table_id, vpc_id),
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

    async def make_network(self, cluster_id: str) -> None:
        """Two security groups: one every member carries, open to the other members
        only; one only the scheduler carries, open to the client's CIDRs on its ports.
        Or the security groups the user gave."""
        vpc_id, vpc_cidr = self._vpc_id, self._vpc_cidr
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

    async def _resolve_network(self) -> tuple[str, str]:
        if self.subnet_id:
            subnet = (await self._call("describe_subnets", SubnetIds=[self.subnet_id]))["Subnets"][
                0
            ]
            self._vpc_subnets = [subnet]
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
            subnets.sort(key=_subnet_order)
            self.subnet_id = subnets[0]["SubnetId"]
            self._vpc_subnets = subnets
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
        return await self.create_in(request, self.home_zone, self.spot(request.role))

    async def create_in(self, request: driver.VMRequest, zone: str | None, spot: bool) -> driver.VM:
        """One instance in ``zone``'s subnet. EC2 makes nothing when it refuses
        RunInstances, so a refusal leaves nothing to clean up."""
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
                    "SubnetId": self._zone_subnets.get(str(zone), self.subnet_id),
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
            "InstanceInitiatedShutdownBehavior": self.shutdown_behavior,
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
        if spot:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        try:
            instance = (await self._launch(params))["Instances"][0]
        except errors.QuotaError as e:
            raise quota_refusal(e, self.options.region) from e
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

    async def _launch(self, params: dict[str, Any]) -> dict[str, Any]:
        """RunInstances, with one ClientToken for all its tries (a retry never makes a
        second instance). EC2 answers a zone out of capacity with a server error (500),
        which botocore's retries would repeat in the same zone: the launch client does
        not retry, and only throttling and EC2's "try again" codes are retried here."""
        params = {**params, "ClientToken": uuid.uuid4().hex}
        for attempt in range(_LAUNCH_TRIES):
            try:
                return await self._call("run_instances", launch=True, **params)
            except errors.CloudError as e:
                again = isinstance(e, errors.ThrottledError) or e.code in _TRY_AGAIN
                if not again or attempt == _LAUNCH_TRIES - 1:
                    raise
            await asyncio.sleep(min(0.5 * 2**attempt, 10.0) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

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
        self._client = self._poll_client = self._launch_client = None
