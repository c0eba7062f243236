"""The DigitalOcean driver: droplets, two cloud firewalls and a VPC per cluster,
found by the cluster's tags.
"""

from __future__ import annotations

import asyncio
import datetime
import difflib
import logging
from collections.abc import Mapping
from typing import Any

from azure.core.exceptions import AzureError, HttpResponseError
from pydo.aio import Client

from ... import driver, errors
from ...cloudinit import LIMITS
from ...credentials import Role
from ...egress import Exits, decide_public_addresses
from ...network import NetworkPolicy
from ...options import DropletOptions
from .errors import _json, _reset_delay, error_kinds
from .network import _firewalls
from .tags import (
    _CLUSTER_PREFIX,
    _cluster_of,
    _creator_tag,
    _droplet_name,
    cluster_tag,
    made_name,
    scheduler_tag,
)

logger = logging.getLogger(__name__)

#: Tries of a call DigitalOcean answers 429 (rate limited), waiting as it says.
_RETRIES = 6


class DropletDriver(driver.Driver):
    """Droplets, two cloud firewalls and (unless given) a VPC per cluster, found by its tag."""

    provider = "digitalocean"
    user_data_limit = LIMITS["digitalocean"]

    def __init__(self, options: DropletOptions, *, token: str, network: NetworkPolicy) -> None:
        self.options = options
        self._token = token
        self.sizes = {Role.SCHEDULER: options.scheduler_size, Role.WORKER: options.worker_size}
        self.vpc_uuid = options.vpc_uuid
        self.tags = list(options.tags)
        self.ssh_keys = list(options.ssh_keys)
        self.network = network
        self._client: Client | None = None

    def __repr__(self) -> str:  # never show the token
        return f"<DropletDriver region={self.options.region}>"

    # -- the SDK ------------------------------------------------------------------------

    def _api(self) -> Client:
        if self._client is None:
            kwargs: dict[str, Any] = {}
            if self.options.api_url:
                kwargs["endpoint"] = self.options.api_url
            if self.options.ca_bundle:
                kwargs["connection_verify"] = self.options.ca_bundle
            self._client = Client(token=self._token, **kwargs)
        return self._client

    async def _call(
        self,
        what: str,
        group: str,
        method: str,
        *,
        poll: bool = False,
        in_use: frozenset[int] = frozenset({409}),
        **kwargs: Any,
    ) -> Any:
        """One API call; rate limits are waited out as ``ratelimit-reset`` says. Errors
        are the shared kinds, by status code: 404 not found, 401 and 403 forbidden, 429
        throttled, ``in_use`` (409 by default) in use.

        pydo returns some documented error answers (401, 404, 429, 5xx) as bodies rather
        than raising, so every answer is read with its status code and headers.
        ``poll``: one attempt, not retried by pydo either, for :meth:`state`, whose
        caller polls again anyway.
        """

        def raw(pipeline_response: Any, body: Any, headers: Any) -> tuple[int, Any, Any]:
            return pipeline_response.http_response.status_code, body, headers

        attempts = 1 if poll else _RETRIES
        if poll:
            kwargs["retry_total"] = 0
        for attempt in range(attempts):
            try:
                status, body, headers = await getattr(getattr(self._api(), group), method)(
                    cls=raw, **kwargs
                )
            except HttpResponseError as e:
                status, headers = e.status_code or 0, e.response.headers if e.response else {}
                body = _json(e)
            except AzureError as e:  # no answer: a network error, a timeout
                raise driver.CloudError(f"{what} failed: {e}") from e
            if status < 400:
                return body
            if status == 429 and attempt < attempts - 1:
                await asyncio.sleep(_reset_delay(headers, attempt))
                continue
            detail = f"{body.get('id', status)}: {body.get('message', '')}" if body else str(status)
            # A VPC that still has members answers its delete with 403: in use, there.
            kind = errors.InUseError if status in in_use else error_kinds.get(str(status))
            message = {
                errors.NotFoundError: f"{what}: not found ({detail})",
                errors.InUseError: f"{what}: still in use ({detail})",
                errors.ForbiddenError: (
                    "DigitalOcean refused the API token: check DIGITALOCEAN_TOKEN or the "
                    "token option (it needs read and write scope)"
                    if status == 401
                    else f"{what}: the token's scopes do not allow this ({detail})"
                ),
                errors.ThrottledError: f"{what}: rate limited ({detail})",
            }.get(kind, f"{what} failed: {detail}")
            raise (kind or errors.CloudError)(message, str(status))
        raise AssertionError("unreachable")

    async def _all(self, what: str, group: str, key: str, **kwargs: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            answer = await self._call(what, group, "list", per_page=200, page=page, **kwargs)
            items += answer.get(key) or []
            if not (answer.get("links") or {}).get("pages", {}).get("next"):
                return items
            page += 1

    # -- before the first VM ------------------------------------------------------------

    def where(self) -> str:
        return self.options.region

    async def _droplet_limit(self) -> tuple[int, int] | None:
        """The account's droplet limit and its droplets now, from ``/v2/account`` and
        the droplet listing's total; ``None`` where the token may not read them."""
        try:
            account = await self._call("reading the droplet limit", "account", "get")
        except driver.ForbiddenError as e:
            logger.info("Not checking the droplet limit: %s", e)
            return None
        limit = (account.get("account") or {}).get("droplet_limit")
        if not isinstance(limit, int):
            return None
        # One droplet per page: the answer's total counts the account's droplets.
        page = await self._call("counting droplets", "droplets", "list", per_page=1, page=1)
        return limit, int((page.get("meta") or {}).get("total") or 0)

    def _limit_error(self, message: str, code: str, limit: int) -> errors.QuotaError:
        return errors.quota_error(
            message,
            code,
            quota="droplet limit (account-wide, every region)",
            region=self.options.region,
            limit=limit,
            fix="Ask DigitalOcean to raise the droplet limit, or start fewer workers "
            "(n_workers); this is not retried",
        )

    async def _check_droplet_limit(self) -> None:
        """Refuse a start the account's droplet limit cannot hold, before anything is made.
        A token without ``account:read`` skips the check: the droplet create then fails
        with DigitalOcean's own limit error, and what was made is deleted."""
        found = await self._droplet_limit()
        if found is None:
            return
        limit, in_use = found
        needed = 1 + self.initial_workers
        if needed > limit - in_use:
            raise self._limit_error(
                f"this cluster needs {needed} droplets and the account may start "
                f"{max(limit - in_use, 0)} more (droplet limit {limit}, {in_use} in use)",
                "droplet_limit",
                limit,
            )

    async def _refusal(self, error: driver.CloudError) -> driver.CloudError:
        """A droplet create refused with 422: the droplet limit where the account's
        figures say it is reached (the 422's only other carrier is its message text,
        which is never read), else ``error`` as it is."""
        found = await self._droplet_limit() if error.code == "422" else None
        if found is not None and found[1] >= found[0]:
            return self._limit_error(str(error), error.code, found[0])
        return error

    async def check_request(self, cluster_id: str) -> None:
        """The region exists, offers each role's size, and the account's droplet limit
        leaves room for the cluster."""
        regions = {r["slug"]: r for r in await self._all("listing regions", "regions", "regions")}
        if self.options.region not in regions:
            close = difflib.get_close_matches(self.options.region, sorted(regions), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise driver.CloudError(
                f"region {self.options.region!r} is not a DigitalOcean region.{hint}"
            )
        offered = set(regions[self.options.region].get("sizes") or [])
        for role, size in self.sizes.items():
            if size not in offered:
                close = difflib.get_close_matches(size, sorted(offered), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise driver.CloudError(
                    f"{role.value}_size {size!r} is not offered in {self.options.region}.{hint}"
                )
        await self._check_droplet_limit()

    async def make_network(self, cluster_id: str) -> None:
        """The cluster's tags, its VPC (unless the user gave one) and its two cloud
        firewalls."""
        tag = cluster_tag(cluster_id)
        for name in (tag, scheduler_tag(cluster_id)):
            await self._call(f"creating tag {name}", "tags", "create", body={"name": name})
        if not self.vpc_uuid:
            vpc = await self._call(
                "creating the cluster's VPC",
                "vpcs",
                "create",
                body={
                    "name": made_name(tag),
                    "region": self.options.region,
                    "description": f"dask-secure-cloud cluster {cluster_id}",
                },
            )
            self.vpc_uuid = vpc["vpc"]["id"]

        async def inside_the_vpc() -> list[str]:
            vpc = await self._call("reading the VPC", "vpcs", "get", vpc_id=self.vpc_uuid)
            return [vpc["vpc"]["ip_range"]]

        sources = await self.network.scheduler_sources(inside_the_vpc)
        for body in _firewalls(cluster_id, sources, self.ports):
            await self._call(f"creating firewall {body['name']}", "firewalls", "create", body=body)

    async def read_exits(self, cluster_id: str) -> Exits:
        """Every droplet has a public IPv4 address on its public interface, whatever its
        VPC, and that is its way out: nothing to read, so nothing can be refused."""
        vpc = f"VPC {self.vpc_uuid}" if self.vpc_uuid else "the cluster's own VPC"
        return Exits(
            place=f"{vpc} in region {self.options.region}",
            private=None,
            public="the droplet's public interface",
        )

    def decide_public(self, exits: Exits) -> None:
        """Asked of the shared rule all the same, so that each role's way out is logged
        as on every cloud."""
        decide_public_addresses(
            exits,
            use_private_ip=False,
            worker_public_ip=True,
            offline_image=self.offline_image,
            fixes=lambda role: (),
            logger=logger,
        )

    # -- VMs ----------------------------------------------------------------------------

    async def create(self, request: driver.VMRequest) -> driver.VM:
        tag = cluster_tag(request.cluster_id)
        body: dict[str, Any] = {
            "name": _droplet_name(request.cluster_id, request.name),
            "region": self.options.region,
            "size": self.sizes[request.role],
            # A snapshot (a built image) is named by its numeric id, a public image by slug.
            "image": int(self.options.image)
            if self.options.image.isdigit()
            else self.options.image,
            "user_data": request.user_data.decode(),
            "vpc_uuid": self.vpc_uuid,
            "tags": [
                tag,
                *([scheduler_tag(request.cluster_id)] if request.role is Role.SCHEDULER else []),
                f"dask-secure-cloud-{request.role.value}",
                *_creator_tag(request.tags.get(driver.CREATOR_TAG)),
                *self.tags,
            ],
            "monitoring": self.options.monitoring,
            "ipv6": False,
            "with_droplet_agent": False,
        }
        if self.ssh_keys:
            body["ssh_keys"] = self.ssh_keys
        try:
            answer = await self._call(
                f"creating droplet {body['name']}", "droplets", "create", body=body
            )
        except driver.CloudError as e:
            raise await self._refusal(e) from e
        droplet_id = answer["droplet"]["id"]
        droplet: dict[str, Any] = {}

        async def active() -> bool:
            nonlocal droplet
            droplet = (
                await self._call("reading a droplet", "droplets", "get", droplet_id=droplet_id)
            )["droplet"]
            # Past "new": active, or already "off" when its boot powered it off at once
            # (the watcher reports that as a failed boot; waiting on would never end).
            return droplet["status"] != "new" and bool(_addresses(droplet)[0])

        await self.poll_until(active, f"droplet {body['name']} to be active", interval=1)
        private, public = _addresses(droplet)
        return driver.VM(
            id=str(droplet_id),
            name=request.name,
            role=request.role,
            cluster_id=request.cluster_id,
            private_ip=private or "",  # active() saw one
            public_ip=None if self.network.use_private_ip else public,
        )

    async def destroy(self, vm: driver.VM) -> None:
        try:
            await self._call(
                f"deleting droplet {vm.name}", "droplets", "destroy", droplet_id=int(vm.id)
            )
        except driver.NotFoundError:
            return  # already gone

        async def gone() -> bool:
            try:
                await self._call("reading a droplet", "droplets", "get", droplet_id=int(vm.id))
            except driver.NotFoundError:
                return True
            return False

        await self.poll_until(gone, f"deleting droplet {vm.name} ({vm.id})", interval=1)

    async def list(self, cluster_id: str) -> list[driver.VM]:
        tag = cluster_tag(cluster_id)
        droplets = await self._all("listing droplets", "droplets", "droplets", tag_name=tag)
        found = []
        for droplet in droplets:
            private, public = _addresses(droplet)
            name = droplet["name"].removeprefix(_droplet_name(cluster_id, ""))
            found.append(
                driver.VM(
                    id=str(droplet["id"]),
                    name=name,
                    role=Role.SCHEDULER if name == "scheduler" else Role.WORKER,
                    cluster_id=cluster_id,
                    private_ip=private or "",
                    public_ip=public,
                )
            )
        return found

    async def clusters(self) -> list[driver.ClusterSummary]:
        found = []
        for role in ("scheduler", "worker"):
            for droplet in await self._all(
                "listing droplets", "droplets", "droplets", tag_name=f"dask-secure-cloud-{role}"
            ):
                tags = droplet.get("tags") or []
                cluster = _cluster_of(tags)
                if cluster is None:
                    continue
                creator = next(
                    (t.split(":", 1)[1] for t in tags if t.startswith(f"{driver.CREATOR_TAG}:")),
                    None,
                )
                created = droplet.get("created_at")
                found.append(
                    (
                        cluster,
                        datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
                        if created
                        else None,
                        creator,
                        _listed_state(droplet.get("status")),
                    )
                )
        # A firewall carries the tag it applies to, so its cluster's id verbatim; a VPC
        # has no tags, and its name is the cluster's tag with "." for ":".
        firewalls = await self._all("listing firewalls", "firewalls", "firewalls")
        vpcs = await self._all("listing VPCs", "vpcs", "vpcs")
        vpc_prefix = made_name(_CLUSTER_PREFIX)
        others = [
            (cluster, "firewall")
            for rule in firewalls
            if (cluster := _cluster_of(rule.get("tags") or [])) is not None
        ] + [
            (vpc["name"].removeprefix(vpc_prefix), "network")
            for vpc in vpcs
            if vpc.get("name", "").startswith(vpc_prefix)
        ]
        return driver.summarize(found, others)

    async def states(self, cluster_id: str) -> dict[str, str]:
        """One droplet listing by the cluster's tag: a droplet that powered off is "off",
        and billed in full until it is destroyed."""
        droplets = await self._all(
            "listing droplets", "droplets", "droplets", tag_name=cluster_tag(cluster_id)
        )
        return {str(d["id"]): _word(d["status"]) for d in droplets}

    async def state(self, vm: driver.VM) -> str:
        try:
            droplet = (
                await self._call(
                    "reading a droplet", "droplets", "get", poll=True, droplet_id=int(vm.id)
                )
            )["droplet"]
        except driver.NotFoundError:
            return "terminated"  # deleted
        except driver.CloudError:  # throttled, refused, unreachable: nothing learnt
            return "unknown"
        return _word(droplet["status"])

    async def console_output(self, vm: driver.VM) -> str:
        """DigitalOcean's API has no console output, unlike the other clouds'. What it
        does have goes into the report instead: which droplet it was, where, and the
        state DigitalOcean gives it now, so the user can find it. Its boot lines are in
        its ``/var/log/cloud-init-output.log``, for a login (``ssh_keys``) to read."""
        try:
            droplet = (
                await self._call(
                    "reading a droplet", "droplets", "get", poll=True, droplet_id=int(vm.id)
                )
            )["droplet"]
            status = f"status {droplet.get('status', 'unknown')!r}"
        except driver.NotFoundError:
            status = "already deleted"
        except driver.CloudError as e:
            status = f"status unknown ({e})"
        addresses = ", ".join(
            f"{kind} {ip}"
            for kind, ip in (("public", vm.public_ip), ("private", vm.private_ip))
            if ip
        )
        return (
            f"(DigitalOcean keeps no console output its API can read. The droplet was "
            f"{vm.name}, id {vm.id}, {addresses or 'no address'}, {status}. Its boot "
            "script's lines are in /var/log/cloud-init-output.log on the droplet, which "
            "only a login can read: set ssh_keys to debug a boot there.)"
        )

    async def release(self, cluster_id: str) -> None:
        """Delete the firewalls, the VPC the cluster made, and its tags; droplets first.
        Each is found by its exact name, so nothing of another cluster is touched."""
        tags = (cluster_tag(cluster_id), scheduler_tag(cluster_id))
        names = {made_name(tag) for tag in tags}
        for rule in await self._all("listing firewalls", "firewalls", "firewalls"):
            if rule["name"] in names:
                await self.delete_when_free(
                    lambda rule_id=rule["id"]: self._call(
                        "deleting the firewall", "firewalls", "delete", firewall_id=rule_id
                    ),
                    f"deleting firewall {rule['name']}",
                )
        for vpc in await self._all("listing VPCs", "vpcs", "vpcs"):
            if vpc["name"] == made_name(cluster_tag(cluster_id)):
                # The API refuses while the droplets' addresses are released: 409, or 403
                # as its reference documents for "a VPC that still has members".
                await self.delete_when_free(
                    lambda vpc_id=vpc["id"]: self._call(
                        "deleting the VPC",
                        "vpcs",
                        "delete",
                        in_use=frozenset({403, 409}),
                        vpc_id=vpc_id,
                    ),
                    f"deleting VPC {vpc['name']}",
                )
        for tag in tags:
            await self.delete_when_free(
                lambda tag=tag: self._call(f"deleting tag {tag}", "tags", "delete", tag_id=tag),
                f"deleting tag {tag}",
            )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


#: Droplet statuses of a droplet that powered off: it still exists, and DigitalOcean
#: bills a powered-off droplet in full until it is destroyed.
_STOPPED_STATUSES = frozenset({"off", "archive"})


def _word(status: str) -> str:
    """A droplet's status as ``Driver.state`` words it."""
    return "stopped" if status in _STOPPED_STATUSES else "running"


def _addresses(droplet: Mapping[str, Any]) -> tuple[str | None, str | None]:
    private = public = None
    for net in (droplet.get("networks") or {}).get("v4") or []:
        if net.get("type") == "private":
            private = net["ip_address"]
        elif net.get("type") == "public":
            public = net["ip_address"]
    return private, public


def _listed_state(status: str | None) -> str:
    """A droplet's status in :meth:`Driver.state`'s words, for ``list``: a droplet that
    is "off" still exists and bills in full, until it is destroyed."""
    if status in ("new", "active"):
        return "running"
    if status == "off":
        return "stopped"
    if status == "archive":
        return "terminated"
    return "unknown"
