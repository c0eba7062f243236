"""``DropletCluster``: a secure Dask cluster on DigitalOcean droplets, through ``pydo.aio``.

What is particular to DigitalOcean: every droplet has a public IPv4 address, which is
also its way out (to install Docker and pull the image), so no droplet lacks a route out
and none needs a NAT. The cluster's two cloud firewalls are what keep droplets private:
one, applied by the cluster's tag, lets droplets of the cluster reach each other on every
port and nothing else in; the other, applied by a tag only the scheduler carries, opens
the scheduler port and dashboard to the creator's address. Workers reach the scheduler
over the VPC's private addresses.
A VPC is made per cluster unless one is given. User-data is plain text of at most
64 KiB, so files inside it are gzip+base64 encoded by ``cloudinit``.

The API token comes from the ``token`` option, the dask config or ``DIGITALOCEAN_TOKEN``
and never reaches a droplet: it is neither in user-data nor in the shipped dask config.
"""

from __future__ import annotations

import asyncio
import datetime
import difflib
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .. import config
from ..cloudinit import LIMITS
from ..cluster import VMCluster
from ..credentials import Role
from ..driver import CREATOR_TAG, VM, CloudError, ClusterSummary, Driver, VMRequest, summarize
from ..egress import Exits, decide_public_addresses
from ..errors import OptionError
from ..network import NetworkPolicy

try:
    from azure.core.exceptions import AzureError, HttpResponseError
    from pydo.aio import Client
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError(
        "DropletCluster needs the digitalocean extra: pip install 'dask-secure-cloud[digitalocean]'"
    ) from e

__all__ = ["DropletCluster", "DropletDriver"]

_TAG = re.compile(r"^[a-zA-Z0-9_\-:]{1,255}$")
_RETRIES = 6
logger = logging.getLogger(__name__)


class _Forbidden(CloudError):
    """The token's scopes do not allow the call (403)."""


def cluster_tag(cluster_id: str) -> str:
    return f"dask-secure-cloud-{cluster_id}"


def scheduler_tag(cluster_id: str) -> str:
    """The tag only this cluster's scheduler carries: its firewall opens the scheduler's
    ports to the creator, so those ports are closed on every worker."""
    return f"{cluster_tag(cluster_id)}-scheduler"


class DropletDriver(Driver):
    """Droplets, two cloud firewalls and (unless given) a VPC per cluster, found by its tag."""

    provider = "digitalocean"
    user_data_limit = LIMITS["digitalocean"]

    def __init__(
        self,
        *,
        token: str,
        api_url: str | None,
        ca_bundle: str | None,
        region: str,
        sizes: Mapping[Role, str],
        image: str,
        vpc_uuid: str | None,
        tags: Sequence[str],
        ssh_keys: Sequence[str | int],
        monitoring: bool,
        network: NetworkPolicy,
    ) -> None:
        self._token = token
        self.api_url = api_url
        self.ca_bundle = ca_bundle
        self.region = region
        self.sizes = dict(sizes)
        self.image = image
        self.vpc_uuid = vpc_uuid
        self.tags = list(tags)
        self.ssh_keys = list(ssh_keys)
        self.monitoring = monitoring
        self.network = network
        self._client: Client | None = None

    def __repr__(self) -> str:  # never show the token
        return f"<DropletDriver region={self.region}>"

    # -- the SDK ------------------------------------------------------------------------

    def _api(self) -> Client:
        if self._client is None:
            kwargs: dict[str, Any] = {}
            if self.api_url:
                kwargs["endpoint"] = self.api_url
            if self.ca_bundle:
                kwargs["connection_verify"] = self.ca_bundle
            self._client = Client(token=self._token, **kwargs)
        return self._client

    async def _call(self, what: str, group: str, method: str, **kwargs: Any) -> Any:
        """One API call; rate limits are waited out as ``ratelimit-reset`` says.

        pydo returns some documented error answers (401, 404, 429, 5xx) as bodies rather
        than raising, so every answer is read with its status code and headers.
        """

        def raw(pipeline_response: Any, body: Any, headers: Any) -> tuple[int, Any, Any]:
            return pipeline_response.http_response.status_code, body, headers

        for attempt in range(_RETRIES):
            try:
                status, body, headers = await getattr(getattr(self._api(), group), method)(
                    cls=raw, **kwargs
                )
            except HttpResponseError as e:
                status, headers = e.status_code or 0, e.response.headers if e.response else {}
                body = _json(e)
            except AzureError as e:
                raise CloudError(f"{what} failed: {e}") from e
            if status < 400:
                return body
            if status == 429 and attempt < _RETRIES - 1:
                await asyncio.sleep(_reset_delay(headers, attempt))
                continue
            detail = f"{body.get('id', status)}: {body.get('message', '')}" if body else str(status)
            if status == 404:
                raise CloudError(f"{what}: not found ({detail})")
            if status == 403:
                raise _Forbidden(f"{what}: the token's scopes do not allow this ({detail})")
            if status == 401:
                raise CloudError(
                    "DigitalOcean refused the API token: check DIGITALOCEAN_TOKEN or the "
                    "token option (it needs read and write scope)"
                )
            raise CloudError(f"{what} failed: {detail}")
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
        return self.region

    async def _check_droplet_limit(self) -> None:
        """Refuse a start the account's droplet limit cannot hold, before anything is made.
        A token without ``account:read`` skips the check: the droplet create then fails
        with DigitalOcean's own limit error, and what was made is deleted."""
        try:
            account = await self._call("reading the droplet limit", "account", "get")
        except _Forbidden as e:
            logger.info("Not checking the droplet limit: %s", e)
            return
        limit = (account.get("account") or {}).get("droplet_limit")
        if not isinstance(limit, int):
            return
        # One droplet per page: the answer's total counts the account's droplets.
        page = await self._call("counting droplets", "droplets", "list", per_page=1, page=1)
        in_use = int((page.get("meta") or {}).get("total") or 0)
        needed = 1 + self.initial_workers
        if needed > limit - in_use:
            raise CloudError(
                f"this cluster needs {needed} droplets and the account may start "
                f"{max(limit - in_use, 0)} more (droplet limit {limit}, {in_use} in use). "
                "Ask DigitalOcean to raise the limit, or start fewer workers (n_workers)"
            )

    async def prepare(self, cluster_id: str) -> None:
        regions = {r["slug"]: r for r in await self._all("listing regions", "regions", "regions")}
        if self.region not in regions:
            close = difflib.get_close_matches(self.region, sorted(regions), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise CloudError(f"region {self.region!r} is not a DigitalOcean region.{hint}")
        offered = set(regions[self.region].get("sizes") or [])
        for role, size in self.sizes.items():
            if size not in offered:
                close = difflib.get_close_matches(size, sorted(offered), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise CloudError(
                    f"{role.value}_size {size!r} is not offered in {self.region}.{hint}"
                )
        await self._check_droplet_limit()
        self._check_egress()
        tag = cluster_tag(cluster_id)
        for name in (tag, scheduler_tag(cluster_id)):
            await self._call(f"creating tag {name}", "tags", "create", body={"name": name})
        if not self.vpc_uuid:
            vpc = await self._call(
                "creating the cluster's VPC",
                "vpcs",
                "create",
                body={
                    "name": tag,
                    "region": self.region,
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

    def _check_egress(self) -> None:
        """Every droplet has a public IPv4 address on its public interface, whatever its
        VPC, and that is its way out: asked of the shared rule all the same (nothing to
        read, so nothing can be refused), so each role's way out is logged as on every
        cloud."""
        vpc = f"VPC {self.vpc_uuid}" if self.vpc_uuid else "the cluster's own VPC"
        exits = Exits(
            place=f"{vpc} in region {self.region}",
            private=None,
            public="the droplet's public interface",
        )
        decide_public_addresses(
            exits,
            use_private_ip=False,
            worker_public_ip=True,
            offline_image=self.offline_image,
            fixes=lambda role: (),
            logger=logger,
        )

    # -- VMs ----------------------------------------------------------------------------

    async def create(self, request: VMRequest) -> VM:
        tag = cluster_tag(request.cluster_id)
        body: dict[str, Any] = {
            "name": f"{tag}-{request.name}",
            "region": self.region,
            "size": self.sizes[request.role],
            "image": self.image,
            "user_data": request.user_data.decode(),
            "vpc_uuid": self.vpc_uuid,
            "tags": [
                tag,
                *([scheduler_tag(request.cluster_id)] if request.role is Role.SCHEDULER else []),
                f"dask-secure-cloud-{request.role.value}",
                *_creator_tag(request.tags.get(CREATOR_TAG)),
                *self.tags,
            ],
            "monitoring": self.monitoring,
            "ipv6": False,
            "with_droplet_agent": False,
        }
        if self.ssh_keys:
            body["ssh_keys"] = self.ssh_keys
        answer = await self._call(
            f"creating droplet {body['name']}", "droplets", "create", body=body
        )
        droplet_id = answer["droplet"]["id"]
        deadline = time.monotonic() + self.boot_timeout
        while True:
            droplet = (
                await self._call("reading a droplet", "droplets", "get", droplet_id=droplet_id)
            )["droplet"]
            private, public = _addresses(droplet)
            if droplet["status"] == "active" and private:
                break
            if time.monotonic() > deadline:
                raise CloudError(
                    f"droplet {body['name']} not active after {self.boot_timeout:.0f}s"
                )
            await asyncio.sleep(1)
        return VM(
            id=str(droplet_id),
            name=request.name,
            role=request.role,
            cluster_id=request.cluster_id,
            private_ip=private,
            public_ip=None if self.network.use_private_ip else public,
        )

    async def destroy(self, vm: VM) -> None:
        try:
            await self._call(
                f"deleting droplet {vm.name}", "droplets", "destroy", droplet_id=int(vm.id)
            )
        except CloudError as e:
            if "not found" not in str(e):
                raise
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                await self._call("reading a droplet", "droplets", "get", droplet_id=int(vm.id))
            except CloudError as e:
                if "not found" in str(e):
                    return
                raise
            await asyncio.sleep(1)
        raise CloudError(f"droplet {vm.name} ({vm.id}) still exists after 5 minutes")

    async def list(self, cluster_id: str) -> list[VM]:
        tag = cluster_tag(cluster_id)
        droplets = await self._all("listing droplets", "droplets", "droplets", tag_name=tag)
        found = []
        for droplet in droplets:
            private, public = _addresses(droplet)
            name = droplet["name"].removeprefix(f"{tag}-")
            found.append(
                VM(
                    id=str(droplet["id"]),
                    name=name,
                    role=Role.SCHEDULER if name == "scheduler" else Role.WORKER,
                    cluster_id=cluster_id,
                    private_ip=private or "",
                    public_ip=public,
                )
            )
        return found

    async def clusters(self) -> list[ClusterSummary]:
        found = []
        for role in ("scheduler", "worker"):
            for droplet in await self._all(
                "listing droplets", "droplets", "droplets", tag_name=f"dask-secure-cloud-{role}"
            ):
                tags = droplet.get("tags") or []
                cluster = next(
                    (t.removeprefix("dask-secure-cloud-") for t in tags if _CLUSTER.match(t)),
                    None,
                )
                if cluster is None:
                    continue
                creator = next(
                    (t.split(":", 1)[1] for t in tags if t.startswith(f"{CREATOR_TAG}:")), None
                )
                created = droplet.get("created_at")
                found.append(
                    (
                        cluster,
                        datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
                        if created
                        else None,
                        creator,
                    )
                )
        others = [
            m.group(1)
            for group, key in (("firewalls", "firewalls"), ("vpcs", "vpcs"))
            for item in await self._all(f"listing {group}", group, key)
            if (m := _MADE.match(item.get("name", "")))
        ]
        return summarize(found, others)

    async def state(self, vm: VM) -> str:
        try:
            droplet = (
                await self._call("reading a droplet", "droplets", "get", droplet_id=int(vm.id))
            )["droplet"]
        except CloudError:
            return "terminated"
        return "terminated" if droplet["status"] in ("off", "archive") else "running"

    async def release(self, cluster_id: str) -> None:
        """Delete the firewalls, the VPC the cluster made, and its tags; droplets first."""
        tag = cluster_tag(cluster_id)
        names = {tag, scheduler_tag(cluster_id)}
        for rule in await self._all("listing firewalls", "firewalls", "firewalls"):
            if rule["name"] in names:
                await self._call(
                    "deleting the firewall", "firewalls", "delete", firewall_id=rule["id"]
                )
        for vpc in await self._all("listing VPCs", "vpcs", "vpcs"):
            if vpc["name"] == tag:
                deadline = time.monotonic() + 120
                while True:  # the API refuses while the droplets' addresses are released
                    try:
                        await self._call("deleting the VPC", "vpcs", "delete", vpc_id=vpc["id"])
                        break
                    except CloudError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(2)
        for name in sorted(names):
            try:
                await self._call(f"deleting tag {name}", "tags", "delete", tag_id=name)
            except CloudError as e:
                if "not found" not in str(e):
                    raise

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


_CLUSTER = re.compile(r"^dask-secure-cloud-(dsc-[0-9a-f]+)$")
#: The names of what ``prepare`` makes: the VPC and firewall named by the cluster's tag,
#: and the scheduler's firewall named by the scheduler's tag.
_MADE = re.compile(r"^dask-secure-cloud-(dsc-[0-9a-f]+)(?:-scheduler)?$")


def _firewalls(
    cluster_id: str, sources: Sequence[str], ports: Sequence[int]
) -> list[dict[str, Any]]:
    """The cluster's two cloud firewalls. DigitalOcean applies every firewall whose tag a
    droplet carries, so the scheduler's ports open to ``sources`` go on a firewall of the
    scheduler's own tag: on the cluster's tag they would open them on every worker too."""
    tag = cluster_tag(cluster_id)
    everywhere = {"addresses": ["0.0.0.0/0", "::/0"]}
    return [
        {
            "name": tag,
            "tags": [tag],
            "inbound_rules": [
                {"protocol": "tcp", "ports": "all", "sources": {"tags": [tag]}},
                {"protocol": "udp", "ports": "all", "sources": {"tags": [tag]}},
            ],
            "outbound_rules": [
                {"protocol": "tcp", "ports": "all", "destinations": everywhere},
                {"protocol": "udp", "ports": "all", "destinations": everywhere},
                {"protocol": "icmp", "destinations": everywhere},
            ],
        },
        {
            "name": scheduler_tag(cluster_id),
            "tags": [scheduler_tag(cluster_id)],
            "inbound_rules": [
                {"protocol": "tcp", "ports": str(port), "sources": {"addresses": list(sources)}}
                for port in ports
            ],
        },
    ]


def _creator_tag(creator: str | None) -> list[str]:
    """DigitalOcean tags allow letters, digits, '-', '_' and ':' only."""
    if not creator:
        return []
    return [f"{CREATOR_TAG}:{re.sub(r'[^a-zA-Z0-9_-]', '_', creator)}"[:255]]


def _addresses(droplet: Mapping[str, Any]) -> tuple[str | None, str | None]:
    private = public = None
    for net in (droplet.get("networks") or {}).get("v4") or []:
        if net.get("type") == "private":
            private = net["ip_address"]
        elif net.get("type") == "public":
            public = net["ip_address"]
    return private, public


def _json(error: HttpResponseError) -> dict[str, Any]:
    try:
        body = error.response.json() if error.response is not None else None
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"message": str(error)}


def _reset_delay(headers: Mapping[str, str], attempt: int) -> float:
    """Seconds until ``ratelimit-reset`` (an epoch time), else exponential backoff."""
    reset = (headers or {}).get("ratelimit-reset")
    if reset and reset.isdigit():
        return min(max(int(reset) - time.time(), 0.1), 60.0)
    return min(2.0**attempt, 30.0)


class DropletCluster(VMCluster):
    """A secure Dask cluster on DigitalOcean droplets.

    Every option of :class:`~dask_secure_cloud.cluster.VMCluster` applies, plus:

    Parameters
    ----------
    token
        API token. Default: dask config ``secure-cloud.digitalocean.token``, then
        ``DIGITALOCEAN_TOKEN``. It never reaches a droplet.
    region
        Region slug, for example ``"ams3"``.
    scheduler_size, worker_size
        Droplet size slugs, for example ``"s-2vcpu-4gb"``.
    image
        Image slug or id. Default: Ubuntu 24.04 LTS.
    vpc_uuid
        An existing VPC (never deleted). Default: a VPC made for the cluster.
    tags
        Extra tags for every droplet.
    ssh_keys
        SSH key ids or fingerprints; by default no key is installed.
    monitoring
        Install DigitalOcean's monitoring agent.
    use_private_ip
        The client runs inside the VPC and connects to the private address.
    allowed_cidrs, open_to_world, allow_insecure_public, public_ip_url
        Who may reach the scheduler, as for ``EC2Cluster``.
    api_url
        Another API base URL (a proxy, a test stand-in).
    ca_bundle
        A CA bundle to verify the API's TLS certificate with (a TLS-inspecting proxy).
    """

    provider = "digitalocean"

    def __init__(
        self,
        *,
        token: str | None = None,
        api_url: str | None = None,
        ca_bundle: str | None = None,
        region: str | None = None,
        scheduler_size: str | None = None,
        worker_size: str | None = None,
        image: str | None = None,
        vpc_uuid: str | None = None,
        tags: Sequence[str] | None = None,
        ssh_keys: Sequence[str | int] | None = None,
        monitoring: bool | None = None,
        use_private_ip: bool | None = None,
        allowed_cidrs: Sequence[str] | None = None,
        open_to_world: bool | None = None,
        allow_insecure_public: bool | None = None,
        public_ip_url: str | None = None,
        security: Any = None,
        **kwargs: Any,
    ) -> None:
        def opt(name: str, value: Any) -> Any:
            return config.option(self.provider, name, value)

        token = opt("token", token) or os.environ.get("DIGITALOCEAN_TOKEN")
        if not token:
            raise OptionError(
                "No DigitalOcean API token: set DIGITALOCEAN_TOKEN, the dask config key "
                "secure-cloud.digitalocean.token, or pass token="
            )
        tags = list(opt("tags", tags) or [])
        for tag in tags:
            if not isinstance(tag, str) or not _TAG.match(tag):
                raise OptionError(
                    f"tags: {tag!r} is not a DigitalOcean tag (letters, digits, '-', '_', ':')"
                )
        network = NetworkPolicy.from_options(
            opt,
            security=security,
            use_private_ip=use_private_ip,
            allowed_cidrs=allowed_cidrs,
            open_to_world=open_to_world,
            allow_insecure_public=allow_insecure_public,
            public_ip_url=public_ip_url,
            always_public=True,  # every droplet has a public address
        )
        driver = DropletDriver(
            token=token,
            api_url=opt("api_url", api_url),
            ca_bundle=opt("ca_bundle", ca_bundle),
            region=opt("region", region),
            sizes={
                Role.SCHEDULER: opt("scheduler_size", scheduler_size),
                Role.WORKER: opt("worker_size", worker_size),
            },
            image=opt("image", image),
            vpc_uuid=opt("vpc_uuid", vpc_uuid),
            tags=tags,
            ssh_keys=list(opt("ssh_keys", ssh_keys) or []),
            monitoring=bool(opt("monitoring", monitoring)),
            network=network,
        )
        super().__init__(
            driver,
            security=security,
            **kwargs,
        )
