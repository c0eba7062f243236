"""A Compute Engine API stand-in: the compute v1 REST paths GCPCluster uses, on 127.0.0.1.

Request bodies are parsed into the client library's own ``compute_v1`` message types
with unknown fields refused, then checked as Compute Engine checks them (names, labels,
the 256 KiB metadata value limit, machine types of the zone, CIDRs, networks and
subnetworks that exist, one next hop per route, Cloud NAT settings). Answers use GCE's
shapes: zone, region and global operations that are RUNNING until waited on, errors as
``{"error": {"code", "message", "errors": [{"reason", ...}]}}``, and quota failures
inside the operation, as the real API reports them.

The project starts as a fresh one does: an auto-mode ``default`` network whose
``default`` subnetwork in the region has the range the test chooses (``subnet_cidr``),
the default route to the internet gateway, no Cloud Router and so no Cloud NAT, and the
default-allow-{internal,ssh,rdp,icmp} firewall rules.

Each inserted instance is booted from its ``user-data`` metadata by the booter it was
given (process VMs, or QEMU guests), on an address of its subnetwork.

The stand-in keeps what Compute Engine keeps. An instance whose OS powered off is
TERMINATED, not gone: it is still listed, with its boot disk (in :attr:`disks`, which
bills), until it is deleted. A time limit (``scheduling.terminationTime`` or
``maxRunDuration``, 30 seconds to 120 days, not both) is enforced as Compute Engine
documents it: the instance's ``resourceStatus.scheduling.terminationTimestamp`` is set
while it runs and its ``instanceTerminationAction`` (DELETE: the instance and its
auto-delete disk; STOP) is taken at that time; the timestamp is cleared when the
instance stops, so a TERMINATED instance is never deleted by its time limit. Whether the VM has
a route out comes from this model of the network alone: an external address and a
0.0.0.0/0 route to the default internet gateway, or a Cloud NAT covering its subnetwork
(which sends through that same route). :meth:`GCEStandIn.ingress_allowed` evaluates the
firewall rules as Compute Engine does, so tests can ask who may reach a VM.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

from google.cloud import compute_v1
from google.protobuf import json_format

from . import imaging, reach
from .booter import StandInBooter
from .jsonapi import JSONServer

METADATA_VALUE_LIMIT = 256 * 1024
MACHINE_TYPES = {
    "e2-micro",
    "e2-small",
    "e2-medium",
    "e2-standard-2",
    "e2-standard-4",
    "n2-standard-8",
}
#: (vCPUs, memory in MB) of each, as machineTypes.get reports them.
MACHINE_SHAPES = {
    "e2-micro": (2, 1024),
    "e2-small": (2, 2048),
    "e2-medium": (2, 4096),
    "e2-standard-2": (2, 8192),
    "e2-standard-4": (4, 16384),
    "n2-standard-8": (8, 32768),
}
BASE = "https://www.googleapis.com/compute/v1"
INTERNET_GATEWAY = "global/gateways/default-internet-gateway"
#: The calls that change the project; the rest only read.
MUTATING = ("insert", "delete", "patch", "update")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_PROTOCOLS = {"tcp", "udp", "icmp", "esp", "ah", "sctp", "ipip", "all"}
_NAT_ALL = {"ALL_SUBNETWORKS_ALL_IP_RANGES", "ALL_SUBNETWORKS_ALL_PRIMARY_IP_RANGES"}
_NEXT_HOPS = (
    "nextHopGateway",
    "nextHopInstance",
    "nextHopIp",
    "nextHopVpnTunnel",
    "nextHopIlb",
)


def _enum(enum: Any) -> set[str]:
    """The values a compute_v1 string enum allows (its UNDEFINED_* placeholder aside)."""
    return {name for name in enum.__members__ if not name.startswith("UNDEFINED_")}


_NAT_MODES = _enum(compute_v1.RouterNat.SourceSubnetworkIpRangesToNat)
_NAT_ALLOCATION = _enum(compute_v1.RouterNat.NatIpAllocateOption)
_NAT_TYPES = _enum(compute_v1.RouterNat.Type)
_NAT_ENDPOINTS = _enum(compute_v1.RouterNat.EndpointTypes)
_NAT_RANGES = _enum(compute_v1.RouterNatSubnetworkToNat.SourceIpRangesToNat)


class APIError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def _invalid(field: str, value: Any, why: str = "") -> APIError:
    return APIError(400, "invalid", f"Invalid value for field '{field}': '{value}'. {why}".strip())


class GCEStandIn:
    def __init__(self, booter: StandInBooter, project: str, zone: str, subnet_cidr: str) -> None:
        self.booter = booter
        self.project = project
        self.zone = zone
        self.region = zone.rsplit("-", 1)[0]
        #: The region's zones, as regions.get lists them: ``zone`` and its siblings.
        self.zones = sorted({zone, *(f"{self.region}-{c}" for c in "abcf")})
        #: (zone, machine type, SPOT or None for both) an insert finds no capacity for;
        #: and the quota an insert exceeds, if any (see refuse_capacity, refuse_quota).
        self._no_capacity: list[tuple[str, str, bool | None]] = []
        self._quota_info: dict[str, Any] | None = None
        #: The zone the request being answered names (one at a time: the state lock).
        self._here = zone
        self.subnet = ipaddress.ip_network(subnet_cidr)
        self.instances: dict[str, dict[str, Any]] = {}
        #: Zonal persistent disks by name: each instance's boot disk, made with it.
        self.disks: dict[str, dict[str, Any]] = {}
        #: The project's own images by name (``_held``: what its disk held, ``clouds.imaging``).
        self.images: dict[str, dict[str, Any]] = {}
        self.networks: dict[str, dict[str, Any]] = {}
        self.subnetworks: dict[str, dict[str, Any]] = {}
        self.routes: dict[str, dict[str, Any]] = {}
        self.routers: dict[str, dict[str, Any]] = {}
        self.firewalls: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._faults: dict[tuple[str, int], tuple[int, str, str]] = {}
        self._counts: Counter[str] = Counter()
        self._quota: dict[str, str] = {}
        self._hosts: dict[str, Iterator[str]] = {}
        self._external = (f"203.0.113.{i}" for i in range(2, 255))
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._stopping = threading.Event()
        self._fresh_project()

    # -- the project as a new one is ------------------------------------------------------

    def _link(self, path: str) -> str:
        return f"{BASE}/projects/{self.project}/{path}"

    def _fresh_project(self) -> None:
        """An auto-mode ``default`` network, its subnetwork here, its default route and
        default firewall rules, and no router."""
        self.networks["default"] = {
            "kind": "compute#network",
            "name": "default",
            "autoCreateSubnetworks": True,
            "selfLink": self._link("global/networks/default"),
        }
        self.add_subnetwork("default", str(self.subnet))
        self._add_route(
            {
                "name": f"default-route-{uuid.uuid4().hex[:16]}",
                "description": "Default route to the Internet.",
                "network": self._link("global/networks/default"),
                "destRange": "0.0.0.0/0",
                "priority": 1000,
                "nextHopGateway": self._link(INTERNET_GATEWAY),
            }
        )
        internal = {"IPProtocol": "tcp", "ports": ["0-65535"]}
        defaults = {
            # The real rule allows 10.128.0.0/9, the auto-mode ranges: here, the subnet's.
            "default-allow-internal": (
                [str(self.subnet)],
                [internal, {**internal, "IPProtocol": "udp"}, {"IPProtocol": "icmp"}],
            ),
            "default-allow-ssh": (["0.0.0.0/0"], [{"IPProtocol": "tcp", "ports": ["22"]}]),
            "default-allow-rdp": (["0.0.0.0/0"], [{"IPProtocol": "tcp", "ports": ["3389"]}]),
            "default-allow-icmp": (["0.0.0.0/0"], [{"IPProtocol": "icmp"}]),
        }
        for name, (sources, allowed) in defaults.items():
            self.firewalls[name] = {
                "kind": "compute#firewall",
                "name": name,
                "network": self._link("global/networks/default"),
                "direction": "INGRESS",
                "priority": 65534,
                "sourceRanges": sources,
                "allowed": allowed,
                "selfLink": self._link(f"global/firewalls/{name}"),
            }

    def add_subnetwork(self, name: str, cidr: str, network: str = "default") -> None:
        """A subnetwork of ``network`` in the region; its VMs get addresses from ``cidr``
        (the gateway's .1 and the network address skipped, as Compute Engine does)."""
        subnet = ipaddress.ip_network(cidr)
        self.subnetworks[name] = {
            "kind": "compute#subnetwork",
            "name": name,
            "ipCidrRange": str(subnet),
            "gatewayAddress": str(subnet.network_address + 1),
            "region": self._link(f"regions/{self.region}"),
            "network": self._link(f"global/networks/{network}"),
            "selfLink": self._link(f"regions/{self.region}/subnetworks/{name}"),
        }
        first = int(subnet.network_address) + 2
        self._hosts[name] = (str(h) for h in subnet.hosts() if int(h) >= first)
        self._add_route(
            {
                "name": f"default-route-{uuid.uuid4().hex[:16]}",
                "description": f"Default local route to the subnetwork {cidr}.",
                "network": self._link(f"global/networks/{network}"),
                "destRange": str(subnet),
                "priority": 0,
                "nextHopNetwork": self._link(f"global/networks/{network}"),
                "routeType": "SUBNET",
            }
        )

    def _add_route(self, route: dict[str, Any]) -> None:
        route.setdefault("kind", "compute#route")
        route.setdefault("selfLink", self._link(f"global/routes/{route['name']}"))
        self.routes[route["name"]] = route

    # -- faults ---------------------------------------------------------------------------

    def fail(
        self, call: str, code: int = 500, reason: str = "backendError", occurrence: int = 1
    ) -> None:
        """Answer the ``occurrence``-th ``call`` from now ("instances.insert", ...) with an error."""
        with self._lock:
            self._faults[(call, self._counts[call] + occurrence)] = (
                code,
                reason,
                f"injected {reason}",
            )

    def quota_exceeded(self) -> None:
        """The next instance insert fails inside its operation, as a real quota error does."""
        self._quota["instances.insert"] = (
            "Quota 'CPUS' exceeded.  Limit: 8.0 in region us-central1."
        )

    def refuse_capacity(self, zone: str, machine_type: str, *, spot: bool | None = None) -> None:
        """From now on, an insert of ``machine_type`` in ``zone`` (SPOT only with
        ``spot=True``, STANDARD only with ``False``) fails inside its operation with
        ``ZONE_RESOURCE_POOL_EXHAUSTED``, as a stockout does; nothing is made."""
        with self._lock:
            self._no_capacity.append((zone, machine_type, spot))

    def refuse_quota(self, metric: str = "CPUS", limit: float = 8.0) -> None:
        """From now on, every instance insert fails inside its operation with
        ``QUOTA_EXCEEDED`` and the quota in its ``errorDetails`` (``quotaInfo``)."""
        with self._lock:
            self._quota_info = {
                "metricName": f"compute.googleapis.com/{metric.lower()}",
                "limitName": f"{metric}-per-project-region",
                "dimensions": {"region": self.region},
                "limit": limit,
            }

    def _insert_refusal(self, instance: Any, zone: str) -> dict[str, Any] | None:
        """The operation error of an insert the test made fail; nothing is made."""
        if self._quota_info is not None:
            info = self._quota_info
            metric = info["limitName"].split("-", 1)[0]
            return {
                "code": "QUOTA_EXCEEDED",
                "message": f"Quota '{metric}' exceeded.  Limit: {info['limit']} in region "
                f"{self.region}.",
                "errorDetails": [{"quotaInfo": info}],
            }
        machine = instance.machine_type.rsplit("/", 1)[-1]
        spot = instance.scheduling.provisioning_model == "SPOT"
        for refused_zone, refused_type, market in self._no_capacity:
            if (refused_zone, refused_type) == (zone, machine) and market in (None, spot):
                return {
                    "code": "ZONE_RESOURCE_POOL_EXHAUSTED",
                    "message": f"The zone 'projects/{self.project}/zones/{zone}' does not "
                    "have enough resources available to fulfill the request.  Try a "
                    "different zone, or try again later.",
                }
        return None

    def mutating_calls(self, since: int = 0) -> list[str]:
        """The calls from ``self.calls[since:]`` that changed something."""
        return [c for c in self.calls[since:] if c.rsplit(".", 1)[-1] in MUTATING]

    # -- helpers ------------------------------------------------------------------------------

    def _operation(
        self, kind: str, target: str, scope: str, error: str | dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """An operation of ``scope`` "zone", "region" or "global", RUNNING until waited on;
        ``error``: its error, as a quota message or a whole ``errors[]`` entry."""
        name = f"operation-{uuid.uuid4().hex}"
        where = {"zone": f"zones/{self._here}", "region": f"regions/{self.region}"}
        op: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(uuid.uuid4().int % 10**18),
            "name": name,
            "operationType": kind,
            "targetLink": target,
            "status": "RUNNING",
            "progress": 0,
            "selfLink": self._link(f"{where.get(scope, 'global')}/operations/{name}"),
        }
        if scope in where:
            op[scope] = self._link(where[scope])
        if isinstance(error, dict):
            op["_error"] = {"errors": [error]}
        elif error:
            op["_error"] = {"errors": [{"code": "QUOTA_EXCEEDED", "message": error}]}
        self.operations[name] = op
        return op

    def _finish(self, name: str) -> dict[str, Any]:
        op = self.operations.get(name)
        if op is None:
            raise APIError(404, "notFound", f"The resource 'operations/{name}' was not found")
        op["status"], op["progress"] = "DONE", 100
        if "_error" in op:
            op["error"] = op["_error"]
        return {k: v for k, v in op.items() if not k.startswith("_")}

    def _parse(self, message: type, body: bytes) -> Any:
        try:
            return message.from_json(body.decode() or "{}", ignore_unknown_fields=False)
        except (json_format.Error, ValueError, TypeError) as e:
            raise APIError(400, "invalid", f"Invalid JSON payload received. {e}") from e

    def _network(self, link: str, field: str) -> str:
        """The name of the network ``link`` (full URL, partial path or name) points at."""
        match = re.fullmatch(r"(?:.*/)?(?:projects/([^/]+)/)?global/networks/([^/]+)|([^/]+)", link)
        if not match or (match[1] and match[1] != self.project):
            raise _invalid(field, link)
        name = match[2] or match[3]
        if name not in self.networks:
            raise APIError(
                404,
                "notFound",
                f"The resource 'projects/{self.project}/global/networks/{name}' was not found",
            )
        return name

    def _subnetwork(self, link: str, field: str) -> str:
        match = re.fullmatch(
            r"(?:.*/)?(?:projects/([^/]+)/)?regions/([^/]+)/subnetworks/([^/]+)|([^/]+)", link
        )
        if (
            not match
            or (match[1] and match[1] != self.project)
            or (match[2] and match[2] != self.region)
        ):
            raise _invalid(field, link)
        name = match[3] or match[4]
        if name not in self.subnetworks:
            raise APIError(
                404,
                "notFound",
                f"The resource 'projects/{self.project}/regions/{self.region}/subnetworks/"
                f"{name}' was not found",
            )
        return name

    def _network_of(self, subnetwork: str) -> str:
        return self.subnetworks[subnetwork]["network"].rsplit("/", 1)[-1]

    def _placement(self, nic: Any) -> tuple[str, str]:
        """The network and subnetwork of an instance's interface, as Compute Engine
        fills them in: the ``default`` network, an auto-mode network's own subnetwork."""
        if nic.subnetwork:
            subnetwork = self._subnetwork(
                nic.subnetwork, "resource.networkInterfaces[0].subnetwork"
            )
            network = self._network_of(subnetwork)
            if nic.network and self._network(nic.network, "network") != network:
                raise APIError(
                    400,
                    "invalid",
                    f"Subnetwork '{subnetwork}' does not belong to network '{nic.network}'.",
                )
            return network, subnetwork
        network = self._network(
            nic.network or "global/networks/default", "resource.networkInterfaces[0].network"
        )
        if not self.networks[network].get("autoCreateSubnetworks"):
            raise APIError(
                400, "invalid", "Subnetwork should be specified for custom subnetmode network"
            )
        if network not in self.subnetworks or self._network_of(network) != network:
            raise APIError(
                400, "invalid", f"Network '{network}' has no subnetwork in region {self.region}"
            )
        return network, network

    # -- the way out, from this model alone --------------------------------------------------

    def _internet_route(self, network: str, tags: set[str]) -> bool:
        """A 0.0.0.0/0 route to the default internet gateway that applies to the VM."""
        return any(
            route["network"].endswith(f"/global/networks/{network}")
            and route["destRange"] == "0.0.0.0/0"
            and route.get("nextHopGateway", "").endswith(INTERNET_GATEWAY)
            and (not route.get("tags") or tags & set(route["tags"]))
            for route in self.routes.values()
        )

    def _nat_covers(self, network: str, subnetwork: str) -> bool:
        """A public Cloud NAT for VMs translates the subnetwork's primary range."""
        for router in self.routers.values():
            if not router["network"].endswith(f"/global/networks/{network}"):
                continue
            for nat in router.get("nats", []):
                if nat.get("type", "PUBLIC") != "PUBLIC":
                    continue
                if "ENDPOINT_TYPE_VM" not in (nat.get("endpointTypes") or ["ENDPOINT_TYPE_VM"]):
                    continue
                covered = _nat_subnetworks(nat, primary=True)
                if subnetwork in covered or "*" in covered:
                    return True
        return False

    def egress(self, network: str, subnetwork: str, tags: set[str], external: bool) -> bool:
        """Whether a VM so placed reaches the internet: Cloud NAT and external
        addresses alike send through the default internet gateway's route."""
        if not self._internet_route(network, tags):
            return False
        return external or self._nat_covers(network, subnetwork)

    # -- who may come in ------------------------------------------------------------------------

    def _admits(self, instance: str) -> reach.Admits:
        """The firewall as it stands when a connection comes in from outside through the
        instance's external address (``clouds.reach``)."""

        def admits(source: str, port: int) -> bool:
            with reach.briefly(self._state_lock):
                if instance not in self.instances:
                    return False
                return self.ingress_allowed(instance, source, "tcp", port)

        return admits

    def ingress_allowed(self, instance: str, source: str, protocol: str, port: int | None) -> bool:
        """Whether the firewall lets ``source`` (an address) reach ``instance`` on
        ``protocol``/``port``: the matching rule of the highest priority (lowest
        number) decides, a deny beating an allow of the same priority; none matching,
        the implied deny-all-ingress."""
        record = self.instances[instance]
        nic = record["networkInterfaces"][0]
        network = nic["network"].rsplit("/", 1)[-1]
        targets = set(record.get("tags", {}).get("items", []))
        sender = next(
            (
                r
                for r in self.instances.values()
                if r["networkInterfaces"][0]["networkIP"] == source
                and r["networkInterfaces"][0]["network"] == nic["network"]
            ),
            None,
        )
        sender_tags = set(sender.get("tags", {}).get("items", [])) if sender else set()
        address = ipaddress.ip_address(source)
        matches = []
        for rule in self.firewalls.values():
            if rule.get("disabled") or rule.get("direction", "INGRESS") != "INGRESS":
                continue
            if not rule["network"].endswith(f"/global/networks/{network}"):
                continue
            if rule.get("targetTags") and not targets & set(rule["targetTags"]):
                continue
            from_range = any(
                address in ipaddress.ip_network(c) for c in rule.get("sourceRanges", [])
            )
            if not from_range and not sender_tags & set(rule.get("sourceTags", [])):
                continue
            denied = bool(rule.get("denied"))
            entries = rule["denied"] if denied else rule.get("allowed", [])
            if any(_covers(entry, protocol, port) for entry in entries):
                matches.append((rule.get("priority", 1000), not denied))
        return bool(matches) and min(matches)[1]

    # -- resources ------------------------------------------------------------------------------

    def insert_instance(self, body: bytes) -> dict[str, Any]:
        instance = self._parse(compute_v1.Instance, body)
        _check_new_name(instance.name, self.instances)
        machine = instance.machine_type.rsplit("/", 1)[-1]
        if machine not in MACHINE_TYPES:
            raise APIError(
                400,
                "invalid",
                f"Invalid value for field 'resource.machineType': '{instance.machine_type}'. Machine type with name '{machine}' does not exist in zone '{self.zone}'.",
            )
        for key, value in instance.labels.items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise APIError(
                    400, "invalid", f"Invalid value for field 'resource.labels': '{key}'"
                )
        user_data = ""
        for item in instance.metadata.items:
            if len(item.value.encode()) > METADATA_VALUE_LIMIT:
                raise APIError(
                    400,
                    "invalid",
                    f"Value for metadata '{item.key}' exceeds {METADATA_VALUE_LIMIT} bytes",
                )
            if item.key == "user-data":
                user_data = item.value
        if not instance.disks or not instance.disks[0].auto_delete:
            raise APIError(400, "invalid", "test stand-in: boot disk must be auto-deleted")
        if len(instance.network_interfaces) != 1:
            raise APIError(400, "invalid", "test stand-in: one network interface per instance")
        limit = _time_limit(instance.scheduling)
        disk_name = instance.disks[0].initialize_params.disk_name or instance.name
        if disk_name in self.disks:
            raise APIError(409, "alreadyExists", f"The resource 'disks/{disk_name}' already exists")
        nic = instance.network_interfaces[0]
        network, subnetwork = self._placement(nic)
        for config in nic.access_configs:
            if config.type_ and config.type_ != "ONE_TO_ONE_NAT":
                raise _invalid("resource.networkInterfaces[0].accessConfigs[0].type", config.type_)
        if len(nic.access_configs) > 1:
            raise APIError(400, "invalid", "At most one access config per network interface")
        self.requests.append(("instances.insert", json.loads(body)))
        error = self._quota.pop("instances.insert", None)
        target = self._link(f"zones/{self._here}/instances/{instance.name}")
        if error:
            return self._operation("insert", target, "zone", error=error)
        refused = self._insert_refusal(instance, self._here)
        if refused is not None:
            return self._operation("insert", target, "zone", error=refused)
        address = next(self._hosts[subnetwork])
        record = json.loads(compute_v1.Instance.to_json(instance))
        record.update(
            id=str(uuid.uuid4().int % 10**18),
            status="RUNNING",
            selfLink=target,
            zone=self._link(f"zones/{self._here}"),
            creationTimestamp=_timestamp(time.time()),
            lastStartTimestamp=_timestamp(time.time()),
        )
        params = instance.disks[0].initialize_params
        self.disks[disk_name] = {
            "kind": "compute#disk",
            "name": disk_name,
            "sizeGb": str(params.disk_size_gb or 10),
            "type": params.disk_type or "pd-standard",
            "status": "READY",
            "users": [target],
            "selfLink": self._link(f"zones/{self._here}/disks/{disk_name}"),
        }
        record["disks"][0].update(
            source=self.disks[disk_name]["selfLink"], deviceName=disk_name, autoDelete=True
        )
        record["_disk"] = disk_name
        if limit is not None:
            deadline = limit if isinstance(limit, float) else time.time() + limit.total_seconds()
            record["_deadline"] = deadline
            record["resourceStatus"] = {
                "scheduling": {"terminationTimestamp": _timestamp(deadline)}
            }
        record_nic = record["networkInterfaces"][0]
        record_nic.update(
            network=self._link(f"global/networks/{network}"),
            subnetwork=self._link(f"regions/{self.region}/subnetworks/{subnetwork}"),
            networkIP=address,
        )
        for config in record_nic.get("accessConfigs", []):
            config["natIP"] = next(self._external)
        cluster = instance.labels.get("dask-secure-cloud-cluster", "untagged")
        role = instance.labels.get("dask-secure-cloud-role", "worker")
        image = self.images.get(params.source_image.rsplit("/", 1)[-1], {})
        if params.source_image.startswith(self._link("global/images/")) and not image:
            raise APIError(404, "notFound", f"The resource '{params.source_image}' was not found")
        self.disks[disk_name]["sourceImage"] = params.source_image
        vm = imaging.boot(
            self.booter,
            image.get("_held"),
            user_data.encode() or b"#cloud-config\n{}\n",
            address=address,
            cluster_id=cluster,
            name=instance.name.removeprefix(f"dask-secure-cloud-{cluster}-"),
            role=role,
            egress=self.egress(
                network, subnetwork, set(instance.tags.items), bool(nic.access_configs)
            ),
        )
        record["_vm"] = vm.vm_id
        self.instances[instance.name] = record
        external = [c["natIP"] for c in record_nic.get("accessConfigs", [])]
        reach.declare(address, external[0] if external else None, self._admits(instance.name))
        return self._operation("insert", target, "zone")

    def delete_instance(self, name: str) -> dict[str, Any]:
        if not self._in_zone_here(self.instances.get(name)):
            raise APIError(
                404,
                "notFound",
                f"The resource 'projects/{self.project}/zones/{self.zone}/instances/{name}' was not found",
            )
        self._remove(name)
        return self._operation("delete", name, "zone")

    def _remove(self, name: str) -> None:
        """Delete an instance, its VM and its auto-delete boot disk."""
        record = self.instances.pop(name)
        self.booter.stop(record["_vm"])
        reach.forget(record["networkInterfaces"][0]["networkIP"])
        if record["disks"][0].get("autoDelete"):
            self.disks.pop(record["_disk"], None)
        else:
            self.disks[record["_disk"]]["users"] = []

    # -- what happens without a request ---------------------------------------------------

    def _stop_instance(self, record: dict[str, Any]) -> None:
        """The instance is TERMINATED: it and its disk stay; its time limit is cleared."""
        record["status"] = "TERMINATED"
        record["lastStopTimestamp"] = _timestamp(time.time())
        record.pop("resourceStatus", None)
        record.pop("_deadline", None)

    def advance(self) -> None:
        """Bring every instance up to now: one whose OS powered off is TERMINATED; one
        still running past its time limit is deleted (or stopped) as its
        ``instanceTerminationAction`` says. Called before each request and every quarter
        of a second."""
        now = time.time()
        for name, record in list(self.instances.items()):
            if record["status"] != "RUNNING":
                continue
            vm = self.booter.vms.get(record["_vm"])
            if vm is not None and not vm.is_running():
                self._stop_instance(record)
            elif record.get("_deadline") is not None and now >= record["_deadline"]:
                action = record.get("scheduling", {}).get("instanceTerminationAction")
                if action == "DELETE":
                    self._remove(name)
                else:
                    self._stop_instance(record)
                    self.booter.stop(record["_vm"])

    def _watch(self) -> None:
        while not self._stopping.wait(0.25):
            with self._state_lock:
                self.advance()

    def list_instances(self, query: dict[str, str]) -> dict[str, Any]:
        items = [
            self._public(r)
            for r in self.instances.values()
            if _matches(r, query.get("filter", "")) and self._in_zone_here(r)
        ]
        return {"kind": "compute#instanceList", "items": items}

    def _public(self, record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if not k.startswith("_")}

    def _in_zone_here(self, record: dict[str, Any] | None) -> bool:
        """Whether an instance is in the zone the request names."""
        return record is not None and record["zone"].rsplit("/", 1)[-1] == self._here

    def insert_firewall(self, body: bytes) -> dict[str, Any]:
        rule = self._parse(compute_v1.Firewall, body)
        _check_new_name(rule.name, self.firewalls)
        network = self._network(rule.network or "global/networks/default", "resource.network")
        for cidr in rule.source_ranges:
            try:
                ipaddress.ip_network(cidr)
            except ValueError as e:
                raise _invalid("resource.sourceRanges", cidr) from e
        if bool(rule.allowed) == bool(rule.denied):
            raise APIError(400, "invalid", "Exactly one of 'allowed' or 'denied' must be set")
        for entry in [*rule.allowed, *rule.denied]:
            protocol = entry.I_p_protocol
            if protocol not in _PROTOCOLS and not (protocol.isdigit() and int(protocol) < 256):
                raise _invalid("resource.allowed[0].IPProtocol", protocol)
            if entry.ports and protocol not in ("tcp", "udp", "sctp"):
                raise APIError(400, "invalid", "Ports may only be given for tcp, udp and sctp")
        if "priority" in rule and not 0 <= rule.priority <= 65535:
            raise _invalid("resource.priority", rule.priority)
        if rule.direction and rule.direction not in ("INGRESS", "EGRESS"):
            raise _invalid("resource.direction", rule.direction)
        self.requests.append(("firewalls.insert", json.loads(body)))
        record = json.loads(compute_v1.Firewall.to_json(rule))
        record.update(
            kind="compute#firewall",
            network=self._link(f"global/networks/{network}"),
            direction=rule.direction or "INGRESS",
            priority=rule.priority if "priority" in rule else 1000,
            selfLink=self._link(f"global/firewalls/{rule.name}"),
        )
        if record["direction"] == "INGRESS" and not (
            rule.source_ranges or rule.source_tags or rule.source_service_accounts
        ):
            record["sourceRanges"] = ["0.0.0.0/0"]  # Compute Engine's default source
        self.firewalls[rule.name] = record
        return self._operation("insert", record["selfLink"], "global")

    def insert_route(self, body: bytes) -> dict[str, Any]:
        route = self._parse(compute_v1.Route, body)
        _check_new_name(route.name, self.routes)
        if not route.network:
            raise APIError(400, "required", "Required field 'resource.network' not specified")
        network = self._network(route.network, "resource.network")
        try:
            ipaddress.ip_network(route.dest_range)
        except ValueError as e:
            raise _invalid("resource.destRange", route.dest_range) from e
        record = json.loads(compute_v1.Route.to_json(route))
        hops = [hop for hop in _NEXT_HOPS if record.get(hop)]
        if len(hops) != 1:
            raise APIError(400, "invalid", "Exactly one next hop must be specified for a route")
        gateway = record.get("nextHopGateway")
        if gateway and not re.fullmatch(
            rf"(?:.*/)?(?:projects/{re.escape(self.project)}/)?{INTERNET_GATEWAY}", gateway
        ):
            raise _invalid("resource.nextHopGateway", gateway)
        if "priority" in route and not 0 <= route.priority <= 65535:
            raise _invalid("resource.priority", route.priority)
        self.requests.append(("routes.insert", json.loads(body)))
        record.update(
            network=self._link(f"global/networks/{network}"),
            priority=route.priority if "priority" in route else 1000,
        )
        if gateway:
            record["nextHopGateway"] = self._link(INTERNET_GATEWAY)
        self._add_route(record)
        return self._operation("insert", record["selfLink"], "global")

    def delete_route(self, name: str) -> dict[str, Any]:
        route = self.routes.get(name)
        if route is None:
            raise APIError(404, "notFound", f"The resource 'routes/{name}' was not found")
        if route.get("routeType") == "SUBNET":
            raise APIError(
                400, "invalid", f"The local route '{name}' of a subnetwork cannot be deleted."
            )
        del self.routes[name]
        return self._operation("delete", route["selfLink"], "global")

    def insert_router(self, body: bytes) -> dict[str, Any]:
        router = self._parse(compute_v1.Router, body)
        _check_new_name(router.name, self.routers)
        if not router.network:
            raise APIError(400, "required", "Required field 'resource.network' not specified")
        network = self._network(router.network, "resource.network")
        if router.region and router.region.rsplit("/", 1)[-1] != self.region:
            raise _invalid("resource.region", router.region)
        record = json.loads(compute_v1.Router.to_json(router))
        names = [nat.get("name", "") for nat in record.get("nats", [])]
        if len(set(names)) != len(names):
            raise APIError(400, "invalid", "NAT names must be unique within a router")
        for index, nat in enumerate(record.get("nats", [])):
            self._check_nat(nat, index, network)
        self.requests.append(("routers.insert", json.loads(body)))
        record.update(
            kind="compute#router",
            network=self._link(f"global/networks/{network}"),
            region=self._link(f"regions/{self.region}"),
            selfLink=self._link(f"regions/{self.region}/routers/{router.name}"),
        )
        self.routers[router.name] = record
        return self._operation("insert", record["selfLink"], "region")

    def _check_nat(self, nat: dict[str, Any], index: int, network: str) -> None:
        """What Compute Engine checks of a Cloud NAT gateway, with its fields' enums."""
        field = f"resource.nats[{index}]"
        if not _NAME.match(nat.get("name", "")):
            raise _invalid(f"{field}.name", nat.get("name", ""))
        allocation = nat.get("natIpAllocateOption")
        if allocation not in _NAT_ALLOCATION:
            raise _invalid(f"{field}.natIpAllocateOption", allocation)
        if (allocation == "MANUAL_ONLY") != bool(nat.get("natIps")):
            raise APIError(400, "invalid", f"{field}: natIps are given with MANUAL_ONLY only")
        if nat.get("type", "PUBLIC") not in _NAT_TYPES:
            raise _invalid(f"{field}.type", nat.get("type"))
        for endpoint in nat.get("endpointTypes", []):
            if endpoint not in _NAT_ENDPOINTS:
                raise _invalid(f"{field}.endpointTypes", endpoint)
        mode = nat.get("sourceSubnetworkIpRangesToNat")
        if mode not in _NAT_MODES:
            raise _invalid(f"{field}.sourceSubnetworkIpRangesToNat", mode)
        listed = nat.get("subnetworks", [])
        if (mode == "LIST_OF_SUBNETWORKS") != bool(listed):
            raise APIError(
                400,
                "invalid",
                f"{field}: subnetworks are listed with LIST_OF_SUBNETWORKS, and only then",
            )
        for entry in listed:
            name = self._subnetwork(entry.get("name", ""), f"{field}.subnetworks.name")
            if self._network_of(name) != network:
                raise APIError(
                    400, "invalid", f"Subnetwork '{name}' is not in the router's network"
                )
            ranges = entry.get("sourceIpRangesToNat", [])
            if not ranges or any(r not in _NAT_RANGES for r in ranges):
                raise _invalid(f"{field}.subnetworks.sourceIpRangesToNat", ranges)
        if nat.get("type", "PUBLIC") != "PUBLIC":
            return
        mine = _nat_subnetworks(nat, primary=True)
        for router in self.routers.values():
            if not router["network"].endswith(f"/global/networks/{network}"):
                continue
            for other in router.get("nats", []):
                theirs = _nat_subnetworks(other, primary=True)
                if other.get("type", "PUBLIC") == "PUBLIC" and (
                    "*" in mine or "*" in theirs or mine & theirs
                ):
                    raise APIError(
                        400,
                        "invalid",
                        f"A subnetwork's primary range may be in one Cloud NAT gateway only: "
                        f"it is already in '{other['name']}' on router '{router['name']}'",
                    )

    # -- routing ------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: bytes) -> tuple[int, Any]:
        prefix = f"/compute/v1/projects/{self.project}"
        if not path.startswith("/compute/v1/projects/"):
            raise APIError(404, "notFound", f"no such path {path}")
        if not path.startswith(prefix + "/") and "/projects/ubuntu-os-cloud/" not in path:
            raise APIError(403, "forbidden", f"Permission denied on project of {path}")
        rest = path[len(prefix) :]
        here = self.zone
        if (m := re.match(r"^/zones/([^/]+)(/.+)$", rest)) and m.group(1) in self.zones:
            # Any zone of the region: answered as this zone's paths, for that zone.
            here, rest = m.group(1), f"/zones/{self.zone}{m.group(2)}"
        zone = f"/zones/{self.zone}"
        region = rf"/regions/{self.region}"
        routes = [
            ("GET", r"^/zones/([^/]+)$", "zones.get"),
            ("GET", rf"^{region}$", "regions.get"),
            ("GET", rf"^{zone}/machineTypes/([^/]+)$", "machineTypes.get"),
            ("GET", r"^/global/images/family/([^/]+)$", "images.getFromFamily"),
            ("GET", r"^/global/images$", "images.list"),
            ("POST", r"^/global/images$", "images.insert"),
            ("GET", r"^/global/images/([^/]+)$", "images.get"),
            ("DELETE", r"^/global/images/([^/]+)$", "images.delete"),
            ("GET", rf"^{region}/subnetworks$", "subnetworks.list"),
            ("GET", rf"^{region}/subnetworks/([^/]+)$", "subnetworks.get"),
            ("GET", rf"^{region}/routers$", "routers.list"),
            ("POST", rf"^{region}/routers$", "routers.insert"),
            ("GET", rf"^{region}/routers/([^/]+)$", "routers.get"),
            ("DELETE", rf"^{region}/routers/([^/]+)$", "routers.delete"),
            ("POST", rf"^{region}/operations/([^/]+)/wait$", "regionOperations.wait"),
            ("GET", r"^/global/routes$", "routes.list"),
            ("POST", r"^/global/routes$", "routes.insert"),
            ("GET", r"^/global/routes/([^/]+)$", "routes.get"),
            ("DELETE", r"^/global/routes/([^/]+)$", "routes.delete"),
            ("POST", r"^/global/firewalls$", "firewalls.insert"),
            ("GET", r"^/global/firewalls$", "firewalls.list"),
            ("DELETE", r"^/global/firewalls/([^/]+)$", "firewalls.delete"),
            ("POST", r"^/global/operations/([^/]+)/wait$", "globalOperations.wait"),
            ("POST", rf"^{zone}/instances$", "instances.insert"),
            ("GET", rf"^{zone}/instances$", "instances.list"),
            ("GET", rf"^{zone}/instances/([^/]+)/serialPort$", "instances.getSerialPortOutput"),
            ("GET", rf"^{zone}/instances/([^/]+)$", "instances.get"),
            ("DELETE", rf"^{zone}/instances/([^/]+)$", "instances.delete"),
            ("POST", rf"^{zone}/operations/([^/]+)/wait$", "zoneOperations.wait"),
            ("GET", rf"^{zone}/disks$", "disks.list"),
            ("GET", rf"^{zone}/disks/([^/]+)$", "disks.get"),
        ]
        if "/projects/ubuntu-os-cloud/global/images/family/" in path:
            rest, call, args = path, "images.getFromFamily", [path.rsplit("/", 1)[1]]
        else:
            for verb, pattern, name in routes:
                match = re.match(pattern, rest)
                if verb == method and match:
                    call, args = name, list(match.groups())
                    break
            else:
                raise APIError(404, "notFound", f"stand-in has no {method} {path}")
        with self._lock:
            self.calls.append(call)
            self._counts[call] += 1
            fault = self._faults.pop((call, self._counts[call]), None)
        if fault:
            raise APIError(*fault)
        with self._state_lock:  # one request at a time changes the project
            self.advance()
            self._here = here
            return 200, self._dispatch(call, args, query, body)

    def _dispatch(self, call: str, args: list[str], query: dict[str, str], body: bytes) -> Any:
        kind, verb = call.split(".")
        if kind in ("subnetworks", "routes", "routers"):
            return self._network_call(kind, verb, args, query, body)
        if call == "regions.get":
            return {
                "kind": "compute#region",
                "name": self.region,
                "status": "UP",
                "zones": [self._link(f"zones/{zone}") for zone in self.zones],
            }
        if call == "zones.get":
            if args[0] not in self.zones:
                raise APIError(
                    404,
                    "notFound",
                    f"The resource 'projects/{self.project}/zones/{args[0]}' was not found",
                )
            return {
                "kind": "compute#zone",
                "name": args[0],
                "status": "UP",
                "region": self.region,
            }
        if call == "machineTypes.get":
            if args[0] not in MACHINE_TYPES:
                raise APIError(
                    404,
                    "notFound",
                    f"The resource 'projects/{self.project}/zones/{self.zone}/machineTypes/{args[0]}' was not found",
                )
            cpus, memory = MACHINE_SHAPES[args[0]]
            return {
                "kind": "compute#machineType",
                "name": args[0],
                "guestCpus": cpus,
                "memoryMb": memory,
                "isSharedCpu": args[0] in ("e2-micro", "e2-small", "e2-medium"),
            }
        if call == "images.getFromFamily":
            return {
                "kind": "compute#image",
                "name": f"{args[0]}-v20261101",
                "family": args[0],
                "selfLink": f"{BASE}/projects/ubuntu-os-cloud/global/images/{args[0]}-v20261101",
                "status": "READY",
            }
        if kind == "images" and verb != "getFromFamily":
            return self._image_call(verb, args, query, body)
        if call == "firewalls.insert":
            return self.insert_firewall(body)
        if call == "firewalls.list":
            return {
                "items": [
                    r for r in self.firewalls.values() if _matches(r, query.get("filter", ""))
                ]
            }
        if call == "firewalls.delete":
            if self.firewalls.pop(args[0], None) is None:
                raise APIError(404, "notFound", f"The resource 'firewalls/{args[0]}' was not found")
            return self._operation("delete", args[0], "global")
        if kind.endswith("Operations"):
            return self._finish(args[0])
        if call == "instances.insert":
            return self.insert_instance(body)
        if call == "instances.list":
            return self.list_instances(query)
        if call == "instances.get":
            record = self.instances.get(args[0])
            if not self._in_zone_here(record):
                raise APIError(404, "notFound", f"The resource 'instances/{args[0]}' was not found")
            return self._public(record)
        if call == "instances.getSerialPortOutput":
            record = self.instances.get(args[0])
            vm = self.booter.vms.get(record["_vm"]) if record else None
            return {
                "kind": "compute#serialPortOutput",
                "contents": vm.console_output() if vm else "",
                "start": "0",
                "next": "0",
            }
        if call == "instances.delete":
            return self.delete_instance(args[0])
        if call == "disks.list":
            items = [d for d in self.disks.values() if _matches(d, query.get("filter", ""))]
            return {"kind": "compute#diskList", "items": items}
        if call == "disks.get":
            if args[0] not in self.disks:
                raise APIError(404, "notFound", f"The resource 'disks/{args[0]}' was not found")
            return self.disks[args[0]]
        raise APIError(404, "notFound", call)

    def _image_call(self, verb: str, args: list[str], query: dict[str, str], body: bytes) -> Any:
        """The project's images: made from a disk whose instance is stopped (or with
        ``forceCreate``), listed, read, deleted."""
        if verb == "list":
            items = [
                self._public(r)
                for r in self.images.values()
                if _matches(r, query.get("filter", ""))
            ]
            return {"kind": "compute#imageList", "items": items}
        if verb in ("get", "delete"):
            if args[0] not in self.images:
                raise APIError(404, "notFound", f"The resource 'images/{args[0]}' was not found")
            if verb == "get":
                return self._public(self.images[args[0]])
            record = self.images.pop(args[0])
            return self._operation("delete", record["selfLink"], "global")
        image = self._parse(compute_v1.Image, body)
        _check_new_name(image.name, self.images)
        for key, value in image.labels.items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise APIError(
                    400, "invalid", f"Invalid value for field 'resource.labels': '{key}'"
                )
        disk = self.disks.get(image.source_disk.rsplit("/", 1)[-1]) if image.source_disk else None
        if disk is None:
            raise _invalid("resource.sourceDisk", image.source_disk, "no such disk")
        users = [self.instances.get(u.rsplit("/", 1)[-1]) for u in disk.get("users", [])]
        running = [u for u in users if u is not None and u["status"] == "RUNNING"]
        if running and query.get("forceCreate") != "true":
            raise APIError(
                400,
                "resourceInUseByAnotherResource",
                f"The disk resource '{disk['selfLink']}' is already being used by "
                f"'{running[0]['selfLink']}'",
            )
        self.requests.append(("images.insert", json.loads(body)))
        record = json.loads(compute_v1.Image.to_json(image))
        link = self._link(f"global/images/{image.name}")
        record.update(
            kind="compute#image",
            id=str(uuid.uuid4().int % 10**18),
            selfLink=link,
            status="READY",
            creationTimestamp=_timestamp(time.time()),
            sourceDisk=disk["selfLink"],
            _held=imaging.capture(self.booter, users[0]["_vm"]) if users and users[0] else {},
        )
        self.images[image.name] = record
        return self._operation("insert", link, "global")

    def _network_call(
        self, kind: str, verb: str, args: list[str], query: dict[str, str], body: bytes
    ) -> Any:
        """Subnetworks (read), routes and routers (read, insert, delete)."""
        collection = {
            "subnetworks": self.subnetworks,
            "routes": self.routes,
            "routers": self.routers,
        }[kind]
        if verb == "list":
            items = [r for r in collection.values() if _matches(r, query.get("filter", ""))]
            return {"kind": f"compute#{kind[:-1]}List", "items": items}
        if verb == "insert":
            return self.insert_route(body) if kind == "routes" else self.insert_router(body)
        if verb == "delete" and kind == "routes":
            return self.delete_route(args[0])
        record = collection.get(args[0])
        if record is None:
            raise APIError(404, "notFound", f"The resource '{kind}/{args[0]}' was not found")
        if verb == "delete":
            del collection[args[0]]
            return self._operation("delete", record["selfLink"], "region")
        return record

    # -- server ------------------------------------------------------------------------------------

    def _answer(
        self, method: str, path: str, query: dict[str, str], body: bytes, headers: Any
    ) -> tuple[int, Any, dict[str, str]]:
        try:
            status, payload = self.handle(method, path, query, body)
        except APIError as e:
            detail = {"message": e.message, "domain": "global", "reason": e.reason}
            return e.code, {"error": {"code": e.code, "message": e.message, "errors": [detail]}}, {}
        return status, payload, {}

    def start(self) -> str:
        self._server = JSONServer(self._answer)
        self.url = self._server.url
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        return self.url

    def stop(self) -> None:
        self._stopping.set()
        self._watcher.join(5)
        self._server.stop()
        self.booter.stop_all()


def _nat_subnetworks(nat: dict[str, Any], primary: bool) -> set[str]:
    """The subnetworks a NAT translates (their primary ranges): names, or ``{"*"}``."""
    mode = nat.get("sourceSubnetworkIpRangesToNat")
    if mode in _NAT_ALL:
        return {"*"}
    return {
        entry["name"].rsplit("/", 1)[-1]
        for entry in nat.get("subnetworks", [])
        if not primary
        or {"ALL_IP_RANGES", "PRIMARY_IP_RANGE"} & set(entry.get("sourceIpRangesToNat", []))
    }


#: Compute Engine's bounds on a VM's time limit, in seconds.
MIN_TIME_LIMIT, MAX_TIME_LIMIT = 30, 120 * 24 * 3600


def _timestamp(when: float) -> str:
    """An RFC 3339 timestamp as Compute Engine writes them."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime(when))


def _time_limit(scheduling: Any) -> float | datetime.timedelta | None:
    """The instance's time limit, checked as Compute Engine checks it: ``terminationTime``
    (an RFC 3339 time, as an epoch) or ``maxRunDuration`` (counted from when it runs),
    one of them at most, from 30 seconds to 120 days away."""
    when = scheduling.termination_time
    run = scheduling.max_run_duration if "max_run_duration" in scheduling else None
    if when and run is not None:
        raise APIError(
            400, "invalid", "Only one of terminationTime and maxRunDuration may be specified."
        )
    if when:
        try:
            deadline = datetime.datetime.fromisoformat(when)
        except ValueError as e:
            raise _invalid("resource.scheduling.terminationTime", when) from e
        if deadline.tzinfo is None:
            raise _invalid("resource.scheduling.terminationTime", when, "No time zone given.")
        left = deadline.timestamp() - time.time()
        if not MIN_TIME_LIMIT <= left <= MAX_TIME_LIMIT:
            raise _invalid(
                "resource.scheduling.terminationTime",
                when,
                "It must be from 30 seconds to 120 days in the future.",
            )
        return deadline.timestamp()
    if run is not None:
        seconds = run.seconds + run.nanos / 1e9
        if not MIN_TIME_LIMIT <= seconds <= MAX_TIME_LIMIT:
            raise _invalid(
                "resource.scheduling.maxRunDuration.seconds",
                run.seconds,
                "It must be from 30 seconds to 120 days.",
            )
        return datetime.timedelta(seconds=seconds)
    return None


def _covers(entry: dict[str, Any], protocol: str, port: int | None) -> bool:
    """Whether a firewall rule's allowed/denied entry covers ``protocol``/``port``."""
    if entry["IPProtocol"] not in ("all", protocol):
        return False
    if not entry.get("ports") or port is None:
        return True
    for spec in entry["ports"]:
        low, _, high = spec.partition("-")
        if int(low) <= port <= int(high or low):
            return True
    return False


def _check_new_name(name: str, existing: dict[str, Any]) -> None:
    """GCE resource names: RFC 1035 labels, unique in their collection."""
    if not _NAME.match(name):
        raise APIError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'")
    if name in existing:
        raise APIError(409, "alreadyExists", f"The resource '{name}' already exists")


def _matches(record: dict[str, Any], expression: str) -> bool:
    """GCE list filters of the forms the driver sends: AIP-160 ``labels.K = "V"``,
    ``labels.K:*`` and ``FIELD = "literal"``, and the regular-expression form
    ``FIELD eq "RE2"`` (the whole field must match)."""
    if not expression:
        return True
    match = re.fullmatch(r'\s*labels\.([\w-]+)\s*=\s*"([^"]*)"\s*', expression)
    if match:
        return record.get("labels", {}).get(match[1]) == match[2]
    match = re.fullmatch(r"\s*labels\.([\w-]+)\s*:\s*\*\s*", expression)
    if match:  # the label is present, whatever its value
        return match[1] in record.get("labels", {})
    match = re.fullmatch(r'\s*(\w+)\s*=\s*"([^"]*)"\s*', expression)
    if match:
        return record.get(match[1]) == match[2]
    match = re.fullmatch(r'\s*(\w+)\s+eq\s+"([^"]*)"\s*', expression)
    if match:
        return re.fullmatch(match[2], str(record.get(match[1], ""))) is not None
    raise APIError(400, "invalid", f"Invalid list filter expression '{expression}'")


class PreemptionNotice:
    """Just enough of Compute Engine's metadata server for a Spot VM's preemption notice:
    ``GET /computeMetadata/v1/instance/preempted`` answers ``FALSE`` until :meth:`preempt`,
    then ``TRUE``, and refuses a request without ``Metadata-Flavor: Google`` (403), as the
    real server does. ``address`` is where the VMs reach it."""

    PATH = "/computeMetadata/v1/instance/preempted"

    def __init__(self, address: str = "127.0.0.1") -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        preempting = self.preempting = threading.Event()
        path = self.PATH

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("Metadata-Flavor") != "Google":
                    status, body = 403, b"Missing Metadata-Flavor:Google header.\n"
                elif self.path.split("?")[0] != path:
                    status, body = 404, b"Not found\n"
                else:
                    status, body = 200, b"TRUE" if preempting.is_set() else b"FALSE"
                self.send_response(status)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((address, 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://{address}:{self._server.server_address[1]}"

    def preempt(self) -> None:
        self.preempting.set()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
