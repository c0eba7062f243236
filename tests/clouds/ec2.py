"""An EC2 API stand-in: moto's server on 127.0.0.1, plus what moto does not check.

The real aiobotocore client talks to it over HTTP. A WSGI layer in front of moto:

- checks every request against botocore's own model of the operation's input: a
  parameter the operation does not have is refused (``UnknownParameter``), a value
  outside an enum (instance types, tag resource types, metadata options...) or a
  malformed boolean or integer is refused (``InvalidParameterValue``), as EC2 does;
- rejects what the real EC2 rejects and moto accepts: user-data over 16,384 bytes, a
  network interface given together with an instance-level subnet or security group, a
  public address asked for on more than one network interface, a route to an internet
  gateway that is not attached to the route table's VPC;
- models the network as EC2 does where moto does not: a new account's default VPC has
  an internet gateway and a route 0.0.0.0/0 to it; a public NAT gateway made in a VPC
  without an internet gateway fails; a route whose target is gone (a deleted or failed
  NAT gateway, a detached internet gateway, a stopped NAT instance) is reported as
  ``blackhole``;
- answers ``GetConsoleOutput`` with what the booted VM really printed;
- injects faults on request (an error code for the Nth call of an action), in EC2's own
  XML error shape, so every step of start, scale-up and close can be failed in turn;
- records every action called, in order.

A watcher boots each instance moto records, from its user-data, on the private address
moto gave it from its subnet (the tests choose the CIDR: 127.0.0.0/8 for VMs that are
processes on this machine, another range for guests), and stops it when the instance is
terminated. It tells the booter whether the instance has a route out, decided from the
stand-in's own model of the network (never from what the driver asked for): the route
table of the instance's subnet sends 0.0.0.0/0 to an attached internet gateway and the
instance has a public address, or to a NAT gateway (NAT instance) that itself gets out,
or to a transit gateway (assumed to lead out).
"""

from __future__ import annotations

import base64
import io
import ipaddress
import re
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

import botocore.session
from botocore.model import ListShape, Shape, StringShape, StructureShape
from moto.backends import get_backend
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models.internet_gateways import InternetGateway
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

from . import imaging, reach
from .booter import StandInBooter

ACCOUNT = "123456789012"
USER_DATA_LIMIT = 16_384
_MODEL = botocore.session.get_session().get_service_model("ec2")
_NS = "http://ec2.amazonaws.com/doc/2016-11-15"
ET.register_namespace("", _NS)  # route tables are written back in EC2's own namespace
#: Every request carries these besides the operation's own input.
_PROTOCOL_PARAMS = {"Action", "Version"}
#: Actions that only read: everything else makes, changes or deletes something.
_READS = ("Describe", "Get", "List")


def _error(code: str, message: str, status: int = 400) -> tuple[int, bytes]:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        f"<Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"</Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
    )
    return status, body.encode()


def _serialized_name(member: Shape, default: str) -> str:
    """The name EC2's query protocol gives a member (as botocore's EC2Serializer does)."""
    if "queryName" in member.serialization:
        return member.serialization["queryName"]
    name = member.serialization.get("name")
    return name[0].upper() + name[1:] if name else default


def _check_value(key: str, value: str, shape: Shape) -> tuple[int, bytes] | None:
    if isinstance(shape, StringShape) and shape.enum and value not in shape.enum:
        return _error("InvalidParameterValue", f"Invalid value '{value}' for {key}.")
    if shape.type_name == "boolean" and value not in ("true", "false"):
        return _error("InvalidParameterValue", f"Invalid value '{value}' for {key}: a boolean")
    if shape.type_name in ("integer", "long") and not re.fullmatch(r"-?\d+", value):
        return _error("InvalidParameterValue", f"Invalid value '{value}' for {key}: an integer")
    return None


def _check_param(key: str, value: str, shape: Shape) -> tuple[int, bytes] | None:
    """Walk ``key`` (``NetworkInterface.1.Groups.2``) down the operation's input shape."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(shape, StructureShape):
            names = {_serialized_name(m, n): m for n, m in shape.members.items()}
            if part not in names:
                return _error("UnknownParameter", f"The parameter {key} is not recognized")
            shape = names[part]
        elif isinstance(shape, ListShape):
            if not part.isdigit() or int(part) < 1:
                return _error("InvalidParameterValue", f"Invalid list index in {key}")
            shape = shape.member
        else:
            return _error("UnknownParameter", f"The parameter {'.'.join(parts[:i])} is a value")
    if isinstance(shape, (StructureShape, ListShape)) and value:
        return _error("InvalidParameterValue", f"The parameter {key} needs members")
    return _check_value(key, value, shape)


def check_input(action: str, params: Mapping[str, str]) -> tuple[int, bytes] | None:
    """Refuse what botocore's own model of the operation says EC2 refuses."""
    if action not in _MODEL.operation_names:
        return _error("InvalidAction", f"The action {action} is not valid for this web service.")
    shape = _MODEL.operation_model(action).input_shape
    if shape is None:
        return None
    for key, value in params.items():
        if key not in _PROTOCOL_PARAMS:
            answer = _check_param(key, value, shape)
            if answer is not None:
                return answer
    return None


def _check_run_instances(params: Mapping[str, str]) -> tuple[int, bytes] | None:
    """What the real RunInstances refuses and moto lets through."""
    user_data = params.get("UserData")
    if user_data is not None:
        raw = base64.b64decode(user_data)
        if len(raw) > USER_DATA_LIMIT:
            return _error(
                "InvalidParameterValue",
                f"User data is limited to {USER_DATA_LIMIT} bytes (got {len(raw)})",
            )
    hop = params.get("MetadataOptions.HttpPutResponseHopLimit")
    if hop is not None and not 1 <= int(hop) <= 64:
        return _error("InvalidParameterValue", "HttpPutResponseHopLimit must be 1 to 64")
    return _check_interfaces(params)


def _check_interfaces(params: Mapping[str, str]) -> tuple[int, bytes] | None:
    """EC2's rules for RunInstances' NetworkInterfaces, which moto does not enforce."""
    interfaces = {k.split(".")[1] for k in params if k.startswith("NetworkInterface.")}
    if not interfaces:
        return None
    if "SubnetId" in params:
        return _error(
            "InvalidParameterCombination",
            "Network interfaces and an instance-level subnet ID may not be specified on "
            "the same request",
        )
    if any(k.startswith(("SecurityGroupId.", "SecurityGroup.")) for k in params):
        return _error(
            "InvalidParameterCombination",
            "Network interfaces and an instance-level security groups may not be "
            "specified on the same request",
        )
    public = [i for i in interfaces if f"NetworkInterface.{i}.AssociatePublicIpAddress" in params]
    if public and len(interfaces) > 1:
        return _error(
            "InvalidParameterCombination",
            "The associatePublicIPAddress parameter cannot be specified when launching "
            "with multiple network interfaces.",
        )
    for i in public:
        if f"NetworkInterface.{i}.NetworkInterfaceId" in params:
            return _error(
                "InvalidParameterCombination",
                "The associatePublicIPAddress parameter cannot be specified for an "
                "existing network interface.",
            )
    return None


@dataclass(frozen=True)
class Network:
    """A VPC made for a test: the VMs' subnet, and how that subnet gets out."""

    vpc_id: str
    subnet_id: str
    route_table_id: str
    #: The subnet's way out: ``"internet"`` (an internet gateway only, as a new
    #: account's default VPC), ``"nat"`` (a NAT gateway in a public subnet beside it) or
    #: ``"none"``.
    way_out: str


def make_network(client: Any, subnet_cidr: str, way_out: str = "internet") -> Network:
    """Make, through the API, a VPC whose subnet ``subnet_cidr`` holds the VMs.

    The VMs' private addresses come from ``subnet_cidr`` (127.x for process VMs, a
    guest network's range for guests). The VPC is twice its size: the other half holds
    the NAT gateway's public subnet when ``way_out="nat"``."""
    subnet_net = ipaddress.ip_network(subnet_cidr)
    vpc_net = subnet_net.supernet()
    other = next(n for n in vpc_net.subnets(new_prefix=subnet_net.prefixlen) if n != subnet_net)
    vpc = client.create_vpc(CidrBlock=str(vpc_net))["Vpc"]["VpcId"]
    subnet = client.create_subnet(VpcId=vpc, CidrBlock=str(subnet_net))["Subnet"]["SubnetId"]
    main = client.describe_route_tables(
        Filters=[
            {"Name": "vpc-id", "Values": [vpc]},
            {"Name": "association.main", "Values": ["true"]},
        ]
    )["RouteTables"][0]["RouteTableId"]
    table = main
    if way_out in ("internet", "nat"):
        igw = client.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
        client.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
        client.create_route(RouteTableId=main, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
    if way_out == "nat":
        public = client.create_subnet(VpcId=vpc, CidrBlock=str(other))["Subnet"]["SubnetId"]
        allocation = client.allocate_address(Domain="vpc")["AllocationId"]
        nat = client.create_nat_gateway(SubnetId=public, AllocationId=allocation)
        nat_id = nat["NatGateway"]["NatGatewayId"]
        table = client.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
        client.create_route(
            RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nat_id
        )
        client.associate_route_table(RouteTableId=table, SubnetId=subnet)
    elif way_out not in ("internet", "none"):
        raise ValueError(f"way_out must be 'internet', 'nat' or 'none', got {way_out!r}")
    return Network(vpc, subnet, table, way_out)


class EC2StandIn:
    """moto's EC2 behind the checks above, booting what it launches."""

    def __init__(self, booter: StandInBooter, region: str = "us-east-1") -> None:
        self.booter = booter
        self.region = region
        self.calls: list[str] = []
        #: The parameters of every RunInstances request, as the API received them.
        self.launches: list[dict[str, str]] = []
        self._faults: dict[tuple[str, int], tuple[str, int]] = {}
        #: (zone, instance type, spot or None for both) that RunInstances refuses for
        #: capacity; and the quota refusal RunInstances answers, if any.
        self._no_capacity: list[tuple[str, str, bool | None]] = []
        self._quota: tuple[str, int] | None = None
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._booted: dict[str, str] = {}  # instance id -> booter vm id
        self._addresses: dict[str, str] = {}  # instance id -> private address, while booted
        # Held while a VM boots or stops: the watcher (which boots new instances and
        # ends those whose VM powered itself off) and a TerminateInstances call may act
        # on one instance at once, and the call must not answer before that VM is gone,
        # nor the watcher boot an instance terminated meanwhile.
        self._ending = threading.Lock()
        self._ended: set[str] = set()
        #: The console of each instance that ended: EC2 keeps it readable after that.
        self._last_console: dict[str, str] = {}
        #: What each AMI made by CreateImage holds (``clouds.imaging``), by image id.
        self.images: dict[str, Any] = {}
        self._stop = threading.Event()

    # -- faults ---------------------------------------------------------------------------

    def fail(
        self, action: str, code: str = "InternalFailure", *, occurrence: int = 1, status: int = 400
    ) -> None:
        """Answer the ``occurrence``-th call of ``action`` from now on with ``code``."""
        with self._lock:
            self._faults[(action, self._counts[action] + occurrence)] = (code, status)

    def refuse_capacity(self, zone: str, instance_type: str, *, spot: bool | None = None) -> None:
        """From now on, RunInstances of ``instance_type`` in ``zone`` (spot only with
        ``spot=True``, on-demand only with ``False``) is refused as EC2 refuses a zone
        out of capacity: a server error, ``InsufficientInstanceCapacity``, nothing made."""
        with self._lock:
            self._no_capacity.append((zone, instance_type, spot))

    def refuse_quota(self, code: str = "VcpuLimitExceeded", limit: int = 32) -> None:
        """From now on, every RunInstances is refused as over the account's quota."""
        with self._lock:
            self._quota = (code, limit)

    def _refusal(self, params: Mapping[str, str]) -> tuple[int, bytes] | None:
        """EC2's answer to a launch the test made it refuse; EC2 makes nothing then."""
        instance_type = params.get("InstanceType", "")
        spot = params.get("InstanceMarketOptions.MarketType") == "spot"
        if self._quota is not None:
            code, limit = self._quota
            quota = {
                "VcpuLimitExceeded": f"You have requested more vCPU capacity than your current "
                f"vCPU limit of {limit} allows for the instance bucket that the specified "
                "instance type belongs to. Please visit http://aws.amazon.com/contact-us/"
                "ec2-request to request an adjustment to this limit.",
                "InstanceLimitExceeded": "Your quota allows for 0 more running instance(s). "
                f"You requested at least 1. (current limit of {limit})",
            }
            return _error(code, quota.get(code, f"limit of {limit}"))
        subnet_id = params.get("NetworkInterface.1.SubnetId") or params.get("SubnetId", "")
        zone = self._backend().get_subnet(subnet_id).availability_zone if subnet_id else ""
        for refused_zone, refused_type, market in self._no_capacity:
            if (refused_zone, refused_type) == (zone, instance_type) and market in (None, spot):
                message = (
                    "There is no Spot capacity available that matches your request."
                    if spot
                    else f"We currently do not have sufficient {instance_type} capacity in "
                    f"the Availability Zone you requested ({zone}). Our system will be "
                    f"working on provisioning additional capacity. You can currently get "
                    f"{instance_type} capacity by not specifying an Availability Zone in "
                    "your request or choosing another zone."
                )
                return _error("InsufficientInstanceCapacity", message, 500)
        return None

    def throttle(self, action: str, occurrence: int = 1) -> None:
        self.fail(action, "RequestLimitExceeded", occurrence=occurrence, status=503)

    @property
    def mutations(self) -> list[str]:
        """The actions called so far that make, change or delete something."""
        return [action for action in self.calls if not action.startswith(_READS)]

    # -- the WSGI layer -------------------------------------------------------------------

    def _wrap(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        def middleware(
            environ: dict[str, Any], start_response: Callable[..., Any]
        ) -> Iterable[bytes]:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            params = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            action = params.get("Action", "")
            with self._lock:
                self.calls.append(action)
                self._counts[action] += 1
                fault = self._faults.pop((action, self._counts[action]), None)
            answer = None
            if fault is not None:
                code, status = fault
                answer = _error(code, f"injected fault for {action}", status)
            else:
                answer = check_input(action, params) or self._answer(action, params)
            if answer is not None:
                status, payload = answer
                reason = {
                    200: "OK",
                    400: "Bad Request",
                    500: "Internal Server Error",
                    503: "Service Unavailable",
                }[status]
                start_response(
                    f"{status} {reason}",
                    [("Content-Type", "text/xml"), ("Content-Length", str(len(payload)))],
                )
                return [payload]
            environ["wsgi.input"] = io.BytesIO(body)
            nat_gateways = set(self._backend().nat_gateways)
            if action == "DescribeRouteTables":
                return self._with_route_states(app, environ, start_response)
            response = list(app(environ, start_response))
            if action == "CreateNatGateway":
                self._fail_nat_gateways_without_internet(nat_gateways)
            if action == "CreateImage":
                self._keep_image(params.get("InstanceId", ""), b"".join(response))
            if action == "TerminateInstances":
                # A terminated instance's VM is gone before EC2 reports it terminated.
                for key, value in params.items():
                    if key.startswith("InstanceId."):
                        self._end(value)
            return response

        return middleware

    def _answer(self, action: str, params: dict[str, str]) -> tuple[int, bytes] | None:
        """Refuse what EC2 refuses and moto does not, or answer what moto cannot."""
        if action == "RunInstances":
            self.launches.append(params)
            return _check_run_instances(params) or self._refusal(params)
        if action in ("CreateRoute", "ReplaceRoute"):
            return self._check_route(params)
        if action == "GetConsoleOutput":
            return self._console_output(params.get("InstanceId", ""))
        return None

    # -- the network, as EC2 has it ------------------------------------------------------

    def _check_route(self, params: Mapping[str, str]) -> tuple[int, bytes] | None:
        """EC2 refuses a route to an internet gateway of another VPC (or of none)."""
        gateway_id = params.get("GatewayId", "")
        backend = self._backend()
        table = backend.route_tables.get(params.get("RouteTableId", ""))
        gateway = backend.internet_gateways.get(gateway_id)
        if table is None or gateway is None:
            return None  # moto answers unknown ids with EC2's NotFound errors
        if gateway.vpc is None or gateway.vpc.id != table.vpc_id:
            return _error(
                "InvalidParameterValue",
                f"route table {table.id} and network gateway {gateway_id} belong to "
                "different networks",
            )
        return None

    def _fail_nat_gateways_without_internet(self, before: set[str]) -> None:
        """A public NAT gateway made in a VPC with no internet gateway fails, as on EC2
        ("Network vpc-... has no Internet gateway attached")."""
        backend = self._backend()
        for nat_id, nat in list(backend.nat_gateways.items()):
            public = (nat.connectivity_type or "public") == "public"
            if nat_id not in before and public and self._internet_gateway(nat.vpc_id) is None:
                nat.state = "failed"

    def _internet_gateway(self, vpc_id: str) -> InternetGateway | None:
        for gateway in self._backend().internet_gateways.values():
            if gateway.vpc is not None and gateway.vpc.id == vpc_id:
                return gateway
        return None

    def _route_table(self, subnet_id: str, vpc_id: str) -> Any:
        """The subnet's explicit route table, else its VPC's main one."""
        main = None
        for table in self._backend().route_tables.values():
            if subnet_id in table._associations.values():
                return table
            if table.vpc_id == vpc_id and table.main_association_id is not None:
                main = table
        return main

    def _route_active(self, route: Any) -> bool:
        """Whether a route's target is there to take the traffic (else: blackhole)."""
        vpc_id = route.route_table.vpc_id
        if isinstance(route.gateway, InternetGateway):
            return route.gateway.vpc is not None and route.gateway.vpc.id == vpc_id
        if route.nat_gateway is not None:
            return route.nat_gateway.state == "available"
        target = route.instance or (route.interface.instance if route.interface else None)
        if route.instance is not None or route.interface is not None:
            return target is not None and target._state.name == "running"
        return True

    def _gets_out(self, subnet_id: str, public: bool, hops: int = 3) -> bool:
        """Whether a VM in ``subnet_id`` (with a public address or not) reaches the
        internet, from this stand-in's own model of the network."""
        backend = self._backend()
        subnet = backend.get_subnet(subnet_id)
        table = self._route_table(subnet_id, subnet.vpc_id)
        routes = [
            r for r in (table.routes if table else []) if r.destination_cidr_block == "0.0.0.0/0"
        ]
        if not routes or not self._route_active(routes[0]) or hops == 0:
            return False
        route = routes[0]
        if isinstance(route.gateway, InternetGateway):
            return public
        if route.nat_gateway is not None:
            nat = route.nat_gateway
            public_nat = (nat.connectivity_type or "public") == "public"
            return public_nat and self._gets_out(nat.subnet_id, True, hops - 1)
        target = route.instance or (route.interface.instance if route.interface else None)
        if target is not None:  # a NAT instance gets out as any instance does
            return self._gets_out(target.subnet_id, target.public_ip is not None, hops - 1)
        return route.transit_gateway is not None  # assumed to lead out

    def egress(self, instance: Any) -> bool:
        """Whether moto's ``instance`` has a route out of its network."""
        if not instance.subnet_id:
            return False
        return self._gets_out(instance.subnet_id, instance.public_ip is not None)

    def _with_route_states(
        self,
        app: Callable[..., Iterable[bytes]],
        environ: dict[str, Any],
        start_response: Callable[..., Any],
    ) -> Iterable[bytes]:
        """DescribeRouteTables with EC2's ``blackhole`` for routes whose target is gone
        (moto reports every route ``active``)."""
        answered: dict[str, Any] = {}

        def keep(status: str, headers: list[tuple[str, str]], *args: Any) -> None:
            answered.update(status=status, headers=headers)

        body = b"".join(app(environ, keep))
        if answered["status"].startswith("200"):
            body = self._mark_blackholes(body)
        headers = [(k, v) for k, v in answered["headers"] if k.lower() != "content-length"]
        start_response(answered["status"], [*headers, ("Content-Length", str(len(body)))])
        return [body]

    def _mark_blackholes(self, body: bytes) -> bytes:
        root = ET.fromstring(body)
        tables = self._backend().route_tables
        for item in root.iterfind(f"{{{_NS}}}routeTableSet/{{{_NS}}}item"):
            table = tables.get(item.findtext(f"{{{_NS}}}routeTableId", ""))
            if table is None:
                continue
            by_destination = {r.destination_cidr_block: r for r in table.routes}
            for route in item.iterfind(f"{{{_NS}}}routeSet/{{{_NS}}}item"):
                found = by_destination.get(route.findtext(f"{{{_NS}}}destinationCidrBlock"))
                state = route.find(f"{{{_NS}}}state")
                if found is not None and state is not None and not self._route_active(found):
                    state.text = "blackhole"
        return ET.tostring(root, encoding="utf-8", xml_declaration=True)

    def _console_output(self, instance_id: str) -> tuple[int, bytes]:
        vm = self.booter.vms.get(self._booted.get(instance_id, ""))
        text = vm.console_output() if vm else self._last_console.get(instance_id, "")
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<GetConsoleOutputResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
            f"<requestId>{uuid.uuid4()}</requestId><instanceId>{escape(instance_id)}</instanceId>"
            f"<timestamp>{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime())}</timestamp>"
            f"<output>{base64.b64encode(text.encode()).decode()}</output>"
            "</GetConsoleOutputResponse>"
        )
        return 200, body.encode()

    def _keep_image(self, instance_id: str, answer: bytes) -> None:
        """An AMI made from an instance holds what its VM had provisioned."""
        image_id = re.search(rb"<imageId>([^<]+)</imageId>", answer)
        vm_id = self._booted.get(instance_id)
        if image_id and vm_id in self.booter.vms:
            self.images[image_id.group(1).decode()] = imaging.capture(self.booter, vm_id)

    # -- booting what moto launches --------------------------------------------------------

    def _backend(self) -> Any:
        return get_backend("ec2")[ACCOUNT][self.region]

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self._sync_vms()
            except RuntimeError:  # moto's dicts changed under us: look again
                continue
            except EC2ClientError:
                # The client terminated the instance while its VM powered itself off
                # (moto then finds its network interface gone): look again.
                continue

    def _sync_vms(self) -> None:
        for reservation in list(self._backend().reservations.values()):
            for instance in list(reservation.instances):
                state = instance._state.name
                if state in ("pending", "running") and instance.id not in self._booted:
                    self._boot(instance)
                elif state in ("shutting-down", "terminated") and instance.id in self._booted:
                    self._end(instance.id)
                elif state == "running" and instance.id in self._booted:
                    self._shut_down_if_off(instance)

    def _boot(self, instance: Any) -> None:
        """Boot the VM of an instance EC2 has made, unless it was terminated meanwhile."""
        with self._ending:
            if instance.id in self._booted or instance.id in self._ended:
                return
            tags = self._backend().tags.get(instance.id, {})
            cluster = tags.get("dask-secure-cloud-cluster", "untagged")
            name = tags.get("Name", instance.id).removeprefix(f"dask-secure-cloud-{cluster}-")
            user_data = instance.user_data
            if isinstance(user_data, list):
                user_data = user_data[0]
            raw = base64.b64decode(str(user_data)) if user_data else b"#cloud-config\n{}\n"
            vm = imaging.boot(
                self.booter,
                self.images.get(instance.image_id),
                raw,
                address=instance.private_ip,
                cluster_id=cluster,
                name=name,
                role="scheduler" if name == "scheduler" else "worker",
                egress=self.egress(instance),
            )
            self._booted[instance.id] = vm.vm_id
            self._addresses[instance.id] = instance.private_ip
            reach.declare(instance.private_ip, instance.public_ip, self._admits(instance.id))

    def _admits(self, instance_id: str) -> reach.Admits:
        """The instance's security groups as they stand when a connection comes in from
        outside (``clouds.reach``): an ingress rule whose CIDR holds the source and whose
        ports hold the port; none, and EC2 drops it."""

        def admits(source: str, port: int) -> bool:
            address = ipaddress.ip_address(source)
            try:
                instance = self._backend().get_instance(instance_id)
            except EC2ClientError:
                return False
            for group in list(instance.nics[0].group_set):
                for rule in list(group.ingress_rules):
                    if rule.ip_protocol not in ("tcp", "-1"):
                        continue
                    if rule.ip_protocol == "tcp" and not rule.from_port <= port <= rule.to_port:
                        continue
                    cidr = rule.ip_range.get("CidrIp")
                    if cidr and address in ipaddress.ip_network(cidr):
                        return True
            return False

        return admits

    def _end(self, instance_id: str) -> None:
        """Stop the instance's VM, keeping its console readable as EC2 does; returns when
        it is gone, whoever started stopping it."""
        with self._ending:
            self._ended.add(instance_id)
            vm_id = self._booted.pop(instance_id, None)
            if instance_id in self._addresses:
                reach.forget(self._addresses.pop(instance_id))
            if vm_id is None:
                return  # never booted, or already ended
            vm = self.booter.vms.get(vm_id)
            if vm is not None:
                self._last_console[instance_id] = vm.console_output()
            self.booter.stop(vm_id)

    def _shut_down_if_off(self, instance: Any) -> None:
        """A VM whose OS powered itself off: EC2 stops the instance, or terminates it
        when it was launched with ``InstanceInitiatedShutdownBehavior=terminate``."""
        vm = self.booter.vms.get(self._booted.get(instance.id, ""))
        if vm is None or vm.is_running():
            return
        if instance.instance_initiated_shutdown_behavior == "terminate":
            self._backend().terminate_instances([instance.id])
        else:
            self._backend().stop_instances([instance.id])

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> str:
        app = self._wrap(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self._serve = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._serve.start()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        self._fresh_account()
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def reset(self) -> None:
        """Forget every resource and call, as a fresh account would have none."""
        self.booter.stop_all()
        self._booted.clear()
        for address in self._addresses.values():
            reach.forget(address)
        self._addresses.clear()
        self._last_console.clear()
        get_backend("ec2").reset()
        self._fresh_account()
        self.calls.clear()
        self.launches.clear()
        self._faults.clear()
        self._counts.clear()
        self._no_capacity.clear()
        self._quota = None

    def _fresh_account(self) -> None:
        """Give moto's default VPC what a new account's has: an internet gateway, and a
        route 0.0.0.0/0 to it in its main route table. No NAT gateway."""
        backend = self._backend()
        vpc = backend.get_default_vpc()
        if vpc is None or self._internet_gateway(vpc.id) is not None:
            return
        gateway = backend.create_internet_gateway()
        backend.attach_internet_gateway(gateway.id, vpc.id)
        main = self._route_table("", vpc.id)
        backend.create_route(main.id, "0.0.0.0/0", gateway_id=gateway.id)

    def stop(self) -> None:
        self._stop.set()
        self._watcher.join(5)
        self._server.shutdown()
        self._serve.join(5)
        self.booter.stop_all()
