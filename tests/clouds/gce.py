"""A Compute Engine API stand-in: the compute v1 REST paths GCPCluster uses, on 127.0.0.1.

Request bodies are parsed into the client library's own ``compute_v1`` message types
with unknown fields refused, then checked as Compute Engine checks them (names, labels,
the 256 KiB metadata value limit, machine types of the zone, CIDRs). Answers use GCE's
shapes: zone and global operations that are RUNNING until waited on, errors as
``{"error": {"code", "message", "errors": [{"reason", ...}]}}``, and quota failures
inside the operation, as the real API reports them.

Each inserted instance is booted from its ``user-data`` metadata by the shared VM
booter, on an address of the subnetwork (in 127.0.0.0/8, so this machine's).
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
import time
import uuid
from collections import Counter
from typing import Any

from google.cloud import compute_v1
from google.protobuf import json_format

from .booter import VMBooter
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
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")


class APIError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class GCEStandIn:
    def __init__(self, booter: VMBooter, project: str, zone: str, subnet_cidr: str) -> None:
        self.booter = booter
        self.project = project
        self.zone = zone
        self.region = zone.rsplit("-", 1)[0]
        self.subnet = ipaddress.ip_network(subnet_cidr)
        self.instances: dict[str, dict[str, Any]] = {}
        self.firewalls: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._faults: dict[tuple[str, int], tuple[int, str, str]] = {}
        self._counts: Counter[str] = Counter()
        self._quota: dict[str, str] = {}
        self._hosts = (str(h) for h in self.subnet.hosts() if int(h) & 0xFF >= 2)
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()

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

    # -- helpers ------------------------------------------------------------------------------

    def _operation(
        self, kind: str, target: str, zonal: bool, error: str | None = None
    ) -> dict[str, Any]:
        name = f"operation-{uuid.uuid4().hex}"
        base = f"https://compute.googleapis.com/compute/v1/projects/{self.project}"
        op: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(uuid.uuid4().int % 10**18),
            "name": name,
            "operationType": kind,
            "targetLink": target,
            "status": "RUNNING",
            "progress": 0,
            "selfLink": f"{base}/{'zones/' + self.zone if zonal else 'global'}/operations/{name}",
        }
        if zonal:
            op["zone"] = f"{base}/zones/{self.zone}"
        if error:
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
        self.requests.append(("instances.insert", json.loads(body)))
        error = self._quota.pop("instances.insert", None)
        target = f"projects/{self.project}/zones/{self.zone}/instances/{instance.name}"
        if error:
            return self._operation("insert", target, zonal=True, error=error)
        address = next(self._hosts)
        record = json.loads(compute_v1.Instance.to_json(instance))
        record.update(
            id=str(uuid.uuid4().int % 10**18),
            status="RUNNING",
            selfLink=target,
            zone=self.zone,
            creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()),
        )
        nic = record["networkInterfaces"][0]
        nic["networkIP"] = address
        for config in nic.get("accessConfigs", []):
            config["natIP"] = "203.0.113.7"
        cluster = instance.labels.get("dask-secure-cloud-cluster", "untagged")
        role = instance.labels.get("dask-secure-cloud-role", "worker")
        vm = self.booter.boot(
            user_data.encode() or b"#cloud-config\n{}\n",
            address=address,
            cluster_id=cluster,
            name=instance.name.removeprefix(f"dask-secure-cloud-{cluster}-"),
            role=role,
        )
        record["_vm"] = vm.vm_id
        self.instances[instance.name] = record
        return self._operation("insert", target, zonal=True)

    def delete_instance(self, name: str) -> dict[str, Any]:
        record = self.instances.pop(name, None)
        if record is None:
            raise APIError(
                404,
                "notFound",
                f"The resource 'projects/{self.project}/zones/{self.zone}/instances/{name}' was not found",
            )
        self.booter.stop(record["_vm"])
        return self._operation("delete", name, zonal=True)

    def list_instances(self, query: dict[str, str]) -> dict[str, Any]:
        items = [
            self._public(r) for r in self.instances.values() if _matches(r, query.get("filter", ""))
        ]
        return {"kind": "compute#instanceList", "items": items}

    def _public(self, record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if not k.startswith("_")}

    def insert_firewall(self, body: bytes) -> dict[str, Any]:
        rule = self._parse(compute_v1.Firewall, body)
        _check_new_name(rule.name, self.firewalls)
        for cidr in rule.source_ranges:
            ipaddress.ip_network(cidr)
        if not rule.allowed and not rule.denied:
            raise APIError(400, "invalid", "Firewall must have an allowed or denied rule")
        self.requests.append(("firewalls.insert", json.loads(body)))
        self.firewalls[rule.name] = json.loads(compute_v1.Firewall.to_json(rule))
        return self._operation("insert", rule.name, zonal=False)

    # -- routing ------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: bytes) -> tuple[int, Any]:
        prefix = f"/compute/v1/projects/{self.project}"
        if not path.startswith("/compute/v1/projects/"):
            raise APIError(404, "notFound", f"no such path {path}")
        if not path.startswith(prefix + "/") and "/projects/ubuntu-os-cloud/" not in path:
            raise APIError(403, "forbidden", f"Permission denied on project of {path}")
        rest = path[len(prefix) :]
        zone = f"/zones/{self.zone}"
        routes = [
            ("GET", r"^/zones/([^/]+)$", "zones.get"),
            ("GET", rf"^{zone}/machineTypes/([^/]+)$", "machineTypes.get"),
            ("GET", r"^/global/images/family/([^/]+)$", "images.getFromFamily"),
            ("GET", rf"^/regions/{self.region}/subnetworks$", "subnetworks.list"),
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
            return 200, self._dispatch(call, args, query, body)

    def _dispatch(self, call: str, args: list[str], query: dict[str, str], body: bytes) -> Any:
        if call == "zones.get":
            if args[0] != self.zone:
                raise APIError(
                    404,
                    "notFound",
                    f"The resource 'projects/{self.project}/zones/{args[0]}' was not found",
                )
            return {
                "kind": "compute#zone",
                "name": self.zone,
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
            return {"kind": "compute#machineType", "name": args[0], "guestCpus": 2}
        if call == "images.getFromFamily":
            return {
                "kind": "compute#image",
                "name": f"{args[0]}-v20261101",
                "family": args[0],
                "selfLink": f"https://compute.googleapis.com/compute/v1/projects/ubuntu-os-cloud/global/images/{args[0]}-v20261101",
                "status": "READY",
            }
        if call == "subnetworks.list":
            return {
                "items": [
                    {
                        "name": "default",
                        "ipCidrRange": str(self.subnet),
                        "region": self.region,
                        "network": f"https://compute.googleapis.com/compute/v1/projects/{self.project}/global/networks/default",
                    }
                ]
            }
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
            return self._operation("delete", args[0], zonal=False)
        if call in ("globalOperations.wait", "zoneOperations.wait"):
            return self._finish(args[0])
        if call == "instances.insert":
            return self.insert_instance(body)
        if call == "instances.list":
            return self.list_instances(query)
        if call == "instances.get":
            record = self.instances.get(args[0])
            if record is None:
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
        raise APIError(404, "notFound", call)

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
        return self.url

    def stop(self) -> None:
        self._server.stop()
        self.booter.stop_all()


def _check_new_name(name: str, existing: dict[str, Any]) -> None:
    """GCE resource names: RFC 1035 labels, unique in their collection."""
    if not _NAME.match(name):
        raise APIError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'")
    if name in existing:
        raise APIError(409, "alreadyExists", f"The resource '{name}' already exists")


def _matches(record: dict[str, Any], expression: str) -> bool:
    """GCE list filters of the forms the driver sends: labels.K = "V", labels.K:* and
    name = "regex"."""
    if not expression:
        return True
    match = re.fullmatch(r'\s*labels\.([\w-]+)\s*=\s*"([^"]*)"\s*', expression)
    if match:
        return record.get("labels", {}).get(match[1]) == match[2]
    match = re.fullmatch(r"\s*labels\.([\w-]+)\s*:\s*\*\s*", expression)
    if match:  # the label is present, whatever its value
        return match[1] in record.get("labels", {})
    match = re.fullmatch(r'\s*name\s*=\s*"([^"]*)"\s*', expression)
    if match:
        return re.fullmatch(match[1], record.get("name", "")) is not None
    raise APIError(400, "invalid", f"Invalid list filter expression '{expression}'")
