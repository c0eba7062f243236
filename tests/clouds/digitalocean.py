"""A DigitalOcean API v2 stand-in over HTTPS (a ``trustme`` CA), for the real ``pydo.aio``.

It serves the paths ``DropletCluster`` uses (account, regions, sizes, tags, VPCs,
firewalls, droplets) and checks request bodies against the fields and types that
DigitalOcean's published OpenAPI specification gives for them (``droplet_single_create``,
``firewall``, ``vpc``, ``tag``): required fields, types, patterns, enums, the 64 KiB
``user_data`` limit; a field the specification does not list is refused, so a typo in our
requests cannot pass unnoticed. Errors come in DigitalOcean's shape,
``{"id": ..., "message": ...}``; rate limits as 429 with ``ratelimit-reset``; the account's
droplet limit as 422. A bearer token is required.

Droplets boot their ``user_data`` with the booter given (process VMs or guests) on an
address of their VPC. A VPC made without ``ip_range`` gets a /20 of ``vpc_pool``, as
DigitalOcean gives one of its 10.0.0.0/8 ranges; the pool is 127.0.0.0/8 by default, so
process VMs' addresses are this machine's, and a guest test passes its own network
(``vpc_pool="10.77.0.0/25"``, smaller than a /20, is given whole). Like a real droplet,
every droplet has a public IPv4 network besides its private one, and its default route
goes out through it: the booter is told so (``egress``) from the droplet's networks.

A droplet whose OS powered off is ``"off"``, and stays, with its addresses, until it is
destroyed: DigitalOcean bills a powered-off droplet in full ("Droplets that are powered
off are still billable. To stop incurring charges on a Droplet, destroy it.").
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import random
import re
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from typing import Any

from . import imaging, reach
from .booter import StandInBooter
from .jsonapi import HTTPSStandIn

#: Each size's ``price_hourly`` as /v2/sizes lists it (USD).
SIZE_PRICES = {"s-1vcpu-1gb": 0.00893, "s-2vcpu-4gb": 0.03571, "s-4vcpu-8gb": 0.07143}
REGIONS = {
    "nyc3": ["s-1vcpu-1gb", "s-2vcpu-4gb", "s-4vcpu-8gb"],
    "ams3": ["s-1vcpu-1gb", "s-2vcpu-4gb"],
}
USER_DATA_LIMIT = 64 * 1024
_NAME = r"^[a-zA-Z0-9]?[a-z0-9A-Z.\-]*[a-z0-9A-Z]$"
_TAG = r"^[a-zA-Z0-9_\-\:]+$"


class APIError(Exception):
    def __init__(
        self, status: int, error_id: str, message: str, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.id, self.message, self.headers = status, error_id, message, headers or {}


def _string(
    pattern: str | None = None, max_length: int | None = None, enum: set[str] | None = None
):
    def check(field: str, value: Any) -> None:
        if not isinstance(value, str):
            raise APIError(422, "unprocessable_entity", f"{field} must be a string")
        if pattern and not re.match(pattern, value):
            raise APIError(422, "unprocessable_entity", f"{field} is invalid")
        if max_length is not None and len(value.encode()) > max_length:
            raise APIError(
                422, "unprocessable_entity", f"{field} is too long (maximum is {max_length} bytes)"
            )
        if enum and value not in enum:
            raise APIError(422, "unprocessable_entity", f"{field} must be one of {sorted(enum)}")

    return check


def _boolean(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise APIError(422, "unprocessable_entity", f"{field} must be a boolean")


def _array(item):
    def check(field: str, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, list):
            raise APIError(422, "unprocessable_entity", f"{field} must be an array")
        for i, element in enumerate(value):
            item(f"{field}[{i}]", element)

    return check


def _string_or_int(field: str, value: Any) -> None:
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise APIError(422, "unprocessable_entity", f"{field} must be a string or an integer")


def _object(schema: dict[str, Any], required: tuple[str, ...] = ()):
    def check(field: str, value: Any) -> None:
        validate(value, schema, required, prefix=f"{field}.")

    return check


def validate(
    body: Any, schema: dict[str, Any], required: tuple[str, ...], prefix: str = ""
) -> None:
    if not isinstance(body, dict):
        raise APIError(400, "bad_request", f"{prefix or 'body'} must be a JSON object")
    for key in required:
        if key not in body:
            raise APIError(422, "unprocessable_entity", f"{prefix}{key} is required")
    for key, value in body.items():
        if key not in schema:
            raise APIError(422, "unprocessable_entity", f"{prefix}{key} is not a known attribute")
        schema[key](prefix + key, value)


_SOURCES = {
    "addresses": _array(_string()),
    "droplet_ids": _array(
        lambda f, v: (
            None
            if isinstance(v, int)
            else (_ for _ in ()).throw(
                APIError(422, "unprocessable_entity", f"{f} must be an integer")
            )
        )
    ),
    "load_balancer_uids": _array(_string()),
    "kubernetes_ids": _array(_string()),
    "tags": _array(_string(_TAG)),
}
_RULE = {"protocol": _string(enum={"tcp", "udp", "icmp"}), "ports": _string(r"^(all|\d+(-\d+)?)$")}
SCHEMAS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    # droplet_single_create
    "droplet": (
        {
            "name": _string(_NAME),
            "region": _string(),
            "size": _string(),
            "image": _string_or_int,
            "ssh_keys": _array(_string_or_int),
            "backups": _boolean,
            "backup_policy": _object(
                {"plan": _string(), "weekday": _string(), "hour": lambda f, v: None}
            ),
            "ipv6": _boolean,
            "monitoring": _boolean,
            "tags": _array(_string(_TAG)),
            "user_data": _string(max_length=USER_DATA_LIMIT),
            "private_networking": _boolean,
            "volumes": _array(_string()),
            "vpc_uuid": _string(),
            "with_droplet_agent": _boolean,
        },
        ("name", "size", "image"),
    ),
    "firewall": (
        {
            "name": _string(r"^[a-zA-Z0-9][a-zA-Z0-9\.-]+$"),
            "droplet_ids": _SOURCES["droplet_ids"],
            "tags": _array(_string(_TAG)),
            "inbound_rules": _array(
                _object({**_RULE, "sources": _object(_SOURCES)}, ("protocol", "sources"))
            ),
            "outbound_rules": _array(
                _object({**_RULE, "destinations": _object(_SOURCES)}, ("protocol", "destinations"))
            ),
        },
        ("name",),
    ),
    "vpc": (
        {
            "name": _string(r"^[a-zA-Z0-9\-\.]+$"),
            "description": _string(max_length=255),
            "region": _string(),
            "ip_range": _string(),
            "default": _boolean,
        },
        ("name", "region"),
    ),
    "tag": ({"name": _string(_TAG, max_length=255)}, ("name",)),
    # droplet_actions_post: the snapshot action (droplet_action_snapshot)
    "droplet_action": (
        {
            "type": _string(
                enum={
                    "enable_backups",
                    "disable_backups",
                    "reboot",
                    "power_cycle",
                    "shutdown",
                    "power_off",
                    "power_on",
                    "restore",
                    "password_reset",
                    "resize",
                    "rebuild",
                    "rename",
                    "change_kernel",
                    "enable_ipv6",
                    "snapshot",
                }
            ),
            "name": _string(),
        },
        ("type",),
    ),
}


#: What DigitalOcean gives a VPC made without ``ip_range``: a /20 of its pool.
_GIVEN_PREFIX = 20
#: The sizes of ``ip_range`` the API accepts, and where it must lie (RFC 1918).
_RANGE_PREFIXES = range(16, 29)
_RFC1918 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))


class DigitalOceanStandIn(HTTPSStandIn):
    def __init__(
        self,
        booter: StandInBooter,
        token: str,
        droplet_limit: int = 10,
        vpc_pool: str = "127.0.0.0/8",
    ) -> None:
        super().__init__(booter)
        self.booter: StandInBooter = booter
        self.token = token
        self.droplet_limit = droplet_limit
        self.vpc_pool = ipaddress.ip_network(vpc_pool)
        self.droplets: dict[int, dict[str, Any]] = {}
        self.firewalls: dict[str, dict[str, Any]] = {}
        self.vpcs: dict[str, dict[str, Any]] = {}
        self.tags: set[str] = set()
        #: Droplet snapshots by id (``_held``: what the droplet's disk held, ``clouds.imaging``).
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.actions: dict[int, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        self._faults: dict[tuple[str, int], APIError] = {}
        self._counts: Counter[str] = Counter()
        self._ids = itertools.count(3_000_001)
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()

    # -- faults ---------------------------------------------------------------------------

    def fail(
        self, call: str, status: int = 500, error_id: str = "server_error", occurrence: int = 1
    ) -> None:
        with self._lock:
            self._faults[(call, self._counts[call] + occurrence)] = APIError(
                status, error_id, f"injected {error_id}"
            )

    def rate_limit(self, call: str, occurrence: int = 1) -> None:
        with self._lock:
            self._faults[(call, self._counts[call] + occurrence)] = APIError(
                429,
                "too_many_requests",
                "API Rate limit exceeded.",
                {
                    "ratelimit-limit": "5000",
                    "ratelimit-remaining": "0",
                    "ratelimit-reset": str(int(time.time()) + 1),
                },
            )

    # -- resources ------------------------------------------------------------------------

    def _body(self, kind: str, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            raise APIError(400, "bad_request", f"invalid JSON: {e}") from e
        schema, required = SCHEMAS[kind]
        validate(body, schema, required)
        self.bodies.append((kind, body))
        return body

    def create_droplet(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        body = self._body("droplet", raw)
        region = body.get("region", "nyc3")
        if region not in REGIONS:
            raise APIError(422, "unprocessable_entity", "Region is not available")
        if body["size"] not in REGIONS[region]:
            raise APIError(422, "unprocessable_entity", "Size is not available in this region.")
        if len(self.droplets) >= self.droplet_limit:
            raise APIError(
                422,
                "unprocessable_entity",
                "creating this/these droplet(s) will exceed your droplet limit",
            )
        vpc = self.vpcs.get(body.get("vpc_uuid") or "")
        if vpc is None:
            raise APIError(422, "unprocessable_entity", "vpc_uuid is not a VPC of this account")
        network = ipaddress.ip_network(vpc["ip_range"])
        used = {d["_private"] for d in self.droplets.values()}
        private = next(
            (str(h) for h in network.hosts() if int(h) & 0xFF >= 2 and str(h) not in used), None
        )
        if private is None:
            raise APIError(422, "unprocessable_entity", "the VPC has no free address left")
        taken = {n["ip_address"] for d in self.droplets.values() for n in d["_networks"]}
        public = random.choice([a for a in _PUBLIC_POOL if a not in taken])
        networks = [
            {"ip_address": private, "type": "private", "netmask": str(network.netmask)},
            # Every droplet has a public IPv4 address, and its default gateway is there.
            {
                "ip_address": public,
                "type": "public",
                "netmask": "255.255.240.0",
                "gateway": "203.0.113.1",
            },
        ]
        droplet_id = next(self._ids)
        tags = [t for t in body.get("tags") or []]
        # The cluster's tag carries its id verbatim: "dask-secure-cloud:<id>".
        cluster = next(
            (
                t.removeprefix("dask-secure-cloud:")
                for t in tags
                if t.startswith("dask-secure-cloud:")
            ),
            "untagged",
        )
        snapshot = self.snapshots.get(str(body["image"]))
        if isinstance(body["image"], str) and body["image"].isdigit():
            raise APIError(422, "unprocessable_entity", "image: an id is an integer")
        vm = imaging.boot(
            self.booter,
            snapshot["_held"] if snapshot else None,
            body.get("user_data", "#cloud-config\n{}\n").encode(),
            address=private,
            cluster_id=cluster,
            name=body["name"].removeprefix(f"dask-secure-cloud-{cluster}-"),
            role="scheduler" if "dask-secure-cloud-scheduler" in tags else "worker",
            egress=_route_out(networks),
        )
        self.droplets[droplet_id] = {
            "id": droplet_id,
            "name": body["name"],
            "status": "new",
            "tags": tags,
            "region": {"slug": region},
            "size_slug": body["size"],
            "vpc_uuid": vpc["id"],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "networks": {"v4": [], "v6": []},
            "_private": private,
            "_vm": vm.vm_id,
            "_networks": networks,
        }
        reach.declare(private, public, self._admits(droplet_id))
        return 202, {"droplet": self._public(self.droplets[droplet_id]), "links": {"actions": []}}

    def _overlaps(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
        return any(
            network.overlaps(ipaddress.ip_network(v["ip_range"])) for v in self.vpcs.values()
        )

    def _asked_range(self, ip_range: str) -> str:
        """An ``ip_range`` the request names: RFC 1918, /16 to /28, overlapping none of the
        account's VPCs, as the API documents it."""
        try:
            network = ipaddress.ip_network(ip_range)
        except ValueError as e:
            raise APIError(422, "unprocessable_entity", f"ip_range is invalid: {e}") from e
        if not any(network.subnet_of(n) for n in _RFC1918 if n.version == network.version):
            raise APIError(422, "unprocessable_entity", "ip_range must be an RFC 1918 range")
        if network.prefixlen not in _RANGE_PREFIXES:
            raise APIError(
                422,
                "unprocessable_entity",
                "ip_range may not be smaller than /28 nor larger than /16",
            )
        if self._overlaps(network):
            raise APIError(422, "unprocessable_entity", "ip_range overlaps another VPC network")
        return str(network)

    def _given_range(self) -> str:
        """A range of ``vpc_pool`` no VPC of the account overlaps: a /20 of it, as the API
        generates one, or the whole pool when it is smaller."""
        prefix = max(_GIVEN_PREFIX, self.vpc_pool.prefixlen)
        free = [
            n
            for n in itertools.islice(self.vpc_pool.subnets(new_prefix=prefix), 4096)
            if not self._overlaps(n)
        ]
        if not free:
            raise APIError(422, "unprocessable_entity", "no free VPC range left in the pool")
        return str(random.choice(free))

    def _public(self, droplet: dict[str, Any]) -> dict[str, Any]:
        # A droplet is "new" until the first time it is looked at again, then active.
        return {k: v for k, v in droplet.items() if not k.startswith("_")}

    def _get_droplet(self, droplet_id: int) -> dict[str, Any]:
        droplet = self.droplets.get(droplet_id)
        if droplet is None:
            raise APIError(404, "not_found", "The resource you were accessing could not be found.")
        if droplet["status"] == "new":
            droplet["status"] = "active"
            droplet["networks"]["v4"] = list(droplet["_networks"])
        self._power(droplet)
        return droplet

    def _power(self, droplet: dict[str, Any]) -> None:
        """An active droplet whose OS powered off is "off": still there, still billed.
        A booter that runs nothing (one that only records what it was asked to boot)
        gives no power state to read: its droplets stay as they are."""
        vm = self.booter.vms.get(droplet["_vm"])
        running = getattr(vm, "is_running", None)
        if droplet["status"] == "active" and running is not None and not running():
            droplet["status"] = "off"

    def _delete_droplet(self, droplet_id: int) -> None:
        droplet = self.droplets.pop(droplet_id, None)
        if droplet is None:
            raise APIError(404, "not_found", "The resource you were accessing could not be found.")
        self.booter.stop(droplet["_vm"])
        reach.forget(droplet["_private"])

    def _admits(self, droplet_id: int) -> reach.Admits:
        """The cloud firewalls of the droplet as they stand when a connection comes in
        from outside (``clouds.reach``). A droplet no firewall applies to takes anything,
        as on DigitalOcean; one with firewalls, only what an inbound rule allows."""

        def admits(source: str, port: int) -> bool:
            address = ipaddress.ip_address(source)
            with reach.briefly(self._state_lock):
                droplet = self.droplets.get(droplet_id)
                if droplet is None:
                    return False
                applying = [
                    f
                    for f in self.firewalls.values()
                    if droplet_id in (f.get("droplet_ids") or [])
                    or set(droplet["tags"]) & set(f.get("tags") or [])
                ]
            if not applying:
                return True
            for firewall in applying:
                for rule in firewall.get("inbound_rules") or []:
                    if rule["protocol"] != "tcp" or not _port_in(rule.get("ports", ""), port):
                        continue
                    cidrs = (rule.get("sources") or {}).get("addresses") or []
                    if any(address in ipaddress.ip_network(c, strict=False) for c in cidrs):
                        return True
            return False

        return admits

    # -- routing --------------------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: dict[str, str], raw: bytes, auth: str | None
    ) -> tuple[int, Any, dict[str, str]]:
        if auth != f"Bearer {self.token}":
            raise APIError(401, "unauthorized", "Unable to authenticate you")
        routes = [
            ("GET", r"^/v2/account$", "account.get"),
            ("GET", r"^/v2/regions$", "regions.list"),
            ("GET", r"^/v2/sizes$", "sizes.list"),
            ("POST", r"^/v2/tags$", "tags.create"),
            ("DELETE", r"^/v2/tags/([^/]+)$", "tags.delete"),
            ("POST", r"^/v2/vpcs$", "vpcs.create"),
            ("GET", r"^/v2/vpcs$", "vpcs.list"),
            ("GET", r"^/v2/vpcs/([^/]+)$", "vpcs.get"),
            ("DELETE", r"^/v2/vpcs/([^/]+)$", "vpcs.delete"),
            ("POST", r"^/v2/firewalls$", "firewalls.create"),
            ("GET", r"^/v2/firewalls$", "firewalls.list"),
            ("DELETE", r"^/v2/firewalls/([^/]+)$", "firewalls.delete"),
            ("POST", r"^/v2/droplets$", "droplets.create"),
            ("GET", r"^/v2/droplets$", "droplets.list"),
            ("GET", r"^/v2/droplets/(\d+)$", "droplets.get"),
            ("DELETE", r"^/v2/droplets/(\d+)$", "droplets.destroy"),
            ("POST", r"^/v2/droplets/(\d+)/actions$", "droplet_actions.post"),
            ("GET", r"^/v2/actions/(\d+)$", "actions.get"),
            ("GET", r"^/v2/snapshots$", "snapshots.list"),
            ("GET", r"^/v2/snapshots/(\d+)$", "snapshots.get"),
            ("DELETE", r"^/v2/snapshots/(\d+)$", "snapshots.delete"),
        ]
        for verb, pattern, name in routes:
            match = re.match(pattern, path)
            if verb == method and match:
                # A path segment arrives percent-encoded (a tag's ":" as "%3A").
                call, args = name, [urllib.parse.unquote(g) for g in match.groups()]
                break
        else:
            raise APIError(404, "not_found", f"stand-in has no {method} {path}")
        with self._lock:
            self.calls.append(call)
            self._counts[call] += 1
            fault = self._faults.pop((call, self._counts[call]), None)
        if fault:
            raise fault
        with self._state_lock:  # one request at a time changes the account, as in a database
            status, payload = self._dispatch(call, args, query, raw)
        return status, payload, {}

    def _dispatch(
        self, call: str, args: list[str], query: dict[str, str], raw: bytes
    ) -> tuple[int, Any]:
        if call == "account.get":
            return 200, {
                "account": {
                    "droplet_limit": self.droplet_limit,
                    "floating_ip_limit": 3,
                    "volume_limit": 10,
                    "email": "dask@example.com",
                    "uuid": "acct",
                    "email_verified": True,
                    "status": "active",
                    "status_message": "",
                }
            }
        if call == "regions.list":
            regions = [
                {"slug": s, "name": s, "sizes": z, "available": True, "features": []}
                for s, z in REGIONS.items()
            ]
            return 200, _paged("regions", regions, query)
        if call == "sizes.list":
            sizes = [
                {"slug": s, "price_hourly": SIZE_PRICES[s], "price_monthly": SIZE_PRICES[s] * 672}
                for s in sorted({z for zs in REGIONS.values() for z in zs})
            ]
            return 200, _paged("sizes", sizes, query)
        if call == "tags.create":
            body = self._body("tag", raw)
            self.tags.add(body["name"])
            return 201, {"tag": {"name": body["name"], "resources": {"count": 0}}}
        if call == "tags.delete":
            if args[0] not in self.tags:
                raise APIError(
                    404, "not_found", "The resource you were accessing could not be found."
                )
            self.tags.discard(args[0])
            return 204, None
        if call == "vpcs.create":
            body = self._body("vpc", raw)
            if body["region"] not in REGIONS:
                raise APIError(422, "unprocessable_entity", "region is invalid")
            vpc_id = str(uuid.uuid4())
            if "ip_range" in body:
                ip_range = self._asked_range(body["ip_range"])
            else:
                ip_range = self._given_range()
            self.vpcs[vpc_id] = {
                "id": vpc_id,
                "name": body["name"],
                "region": body["region"],
                "ip_range": ip_range,
                "description": body.get("description", ""),
                "default": False,
            }
            return 201, {"vpc": self.vpcs[vpc_id]}
        if call == "vpcs.list":
            return 200, _paged("vpcs", list(self.vpcs.values()), query)
        if call == "vpcs.get":
            if args[0] not in self.vpcs:
                raise APIError(
                    404, "not_found", "The resource you were accessing could not be found."
                )
            return 200, {"vpc": self.vpcs[args[0]]}
        if call == "vpcs.delete":
            if args[0] not in self.vpcs:
                raise APIError(
                    404, "not_found", "The resource you were accessing could not be found."
                )
            if any(d["vpc_uuid"] == args[0] for d in self.droplets.values()):
                raise APIError(403, "forbidden", "Can not delete VPC with members")
            del self.vpcs[args[0]]
            return 204, None
        if call == "firewalls.create":
            body = self._body("firewall", raw)
            firewall_id = str(uuid.uuid4())
            self.firewalls[firewall_id] = {**body, "id": firewall_id, "status": "succeeded"}
            return 202, {"firewall": self.firewalls[firewall_id]}
        if call == "firewalls.list":
            return 200, _paged("firewalls", list(self.firewalls.values()), query)
        if call == "firewalls.delete":
            if self.firewalls.pop(args[0], None) is None:
                raise APIError(
                    404, "not_found", "The resource you were accessing could not be found."
                )
            return 204, None
        if call == "droplets.create":
            return self.create_droplet(raw)
        if call == "droplets.list":
            tag = query.get("tag_name")
            for droplet in self.droplets.values():
                self._power(droplet)
            found = [
                self._public(d) for d in self.droplets.values() if tag is None or tag in d["tags"]
            ]
            return 200, _paged("droplets", found, query)
        if call == "droplets.get":
            return 200, {"droplet": self._public(self._get_droplet(int(args[0])))}
        if call == "droplets.destroy":
            self._delete_droplet(int(args[0]))
            return 204, None
        if call.startswith(("droplet_actions.", "actions.", "snapshots.")):
            return self._snapshot_call(call, args, query, raw)
        raise APIError(404, "not_found", call)

    def _snapshot_call(
        self, call: str, args: list[str], query: dict[str, str], raw: bytes
    ) -> tuple[int, Any]:
        """A droplet's snapshot action (an action to poll, completed once looked at), and
        the account's snapshots (``/v2/snapshots``): listed, read, deleted."""
        missing = APIError(404, "not_found", "The resource you were accessing could not be found.")
        if call == "droplet_actions.post":
            body = self._body("droplet_action", raw)
            droplet = self._get_droplet(int(args[0]))
            if body["type"] != "snapshot":
                raise APIError(422, "unprocessable_entity", "stand-in: only snapshot actions")
            if "name" not in body:
                raise APIError(422, "unprocessable_entity", "name is required for a snapshot")
            action_id = next(self._ids)
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            snapshot_id = str(next(self._ids))
            self.snapshots[snapshot_id] = {
                "id": snapshot_id,
                "name": body["name"],
                "created_at": now,
                "regions": [droplet["region"]["slug"]],
                "resource_id": str(droplet["id"]),
                "resource_type": "droplet",
                "min_disk_size": 25,
                "size_gigabytes": 2.36,
                "tags": [],
                "_held": imaging.capture(self.booter, droplet["_vm"]),
            }
            self.actions[action_id] = {
                "id": action_id,
                "status": "in-progress",
                "type": "snapshot",
                "started_at": now,
                "completed_at": None,
                "resource_id": droplet["id"],
                "resource_type": "droplet",
                "region_slug": droplet["region"]["slug"],
            }
            return 201, {"action": self.actions[action_id]}
        if call == "actions.get":
            action = self.actions.get(int(args[0]))
            if action is None:
                raise missing
            action.update(status="completed", completed_at=action["started_at"])
            return 200, {"action": action}
        if call == "snapshots.list":
            kind = query.get("resource_type")
            found = [
                self._public(s)
                for s in self.snapshots.values()
                if kind is None or s["resource_type"] == kind
            ]
            return 200, _paged("snapshots", found, query)
        snapshot = self.snapshots.get(args[0])
        if snapshot is None:
            raise missing
        if call == "snapshots.get":
            return 200, {"snapshot": self._public(snapshot)}
        del self.snapshots[args[0]]
        return 204, None

    # -- server ---------------------------------------------------------------------------

    def _answer(
        self, method: str, path: str, query: dict[str, str], body: bytes, headers: Any
    ) -> tuple[int, Any, dict[str, str]]:
        try:
            return self.handle(method, path, query, body, headers.get("Authorization"))
        except APIError as e:
            payload = {"id": e.id, "message": e.message, "request_id": str(uuid.uuid4())}
            return e.status, payload, e.headers


#: The droplets' public addresses (documentation ones): each droplet its own.
_PUBLIC_POOL = [f"203.0.113.{i}" for i in range(2, 251)]


def _port_in(ports: str, port: int) -> bool:
    """Whether a firewall rule's ``ports`` (``"8786"``, ``"8000-9000"``, ``"all"`` or
    ``"0"``) holds ``port``."""
    if ports in ("all", "0", ""):
        return True
    low, _, high = ports.partition("-")
    return int(low) <= port <= int(high or low)


def _route_out(networks: list[dict[str, Any]]) -> bool:
    """Whether a droplet with these IPv4 networks has a route out: its public interface
    carries its default gateway (its VPC interface has none). Every droplet has one, so
    every droplet does; a droplet without one (not something the API makes) would not."""
    return any(n["type"] == "public" and n.get("gateway") for n in networks)


def _paged(key: str, items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    """One page of a list, as the API pages it: ``per_page`` (20 by default, 200 at most)
    from ``page``, the total in ``meta``, and a ``next`` link while more remain."""
    per_page = min(int(query.get("per_page", 20)), 200)
    page = int(query.get("page", 1))
    if per_page < 1 or page < 1:
        raise APIError(400, "bad_request", "page and per_page must be positive")
    chunk = items[(page - 1) * per_page : page * per_page]
    links: dict[str, Any] = {}
    if page * per_page < len(items):
        links["pages"] = {"next": f"https://api.digitalocean.com/v2/{key}?page={page + 1}"}
    return {key: chunk, "links": links, "meta": {"total": len(items)}}
