"""``GCPCluster``: a secure Dask cluster on Google Compute Engine.

What is particular to Google Cloud: the official ``google-cloud-compute`` client on its
REST transport, run in threads (it has no async client); firewall rules per cluster that
target the cluster's own network tags; an external address for a VM only where its
subnetwork has no Cloud NAT (read from the region's routers and the network's routes
before anything is made, see :mod:`dask_secure_cloud.egress`); GPUs as
``guestAccelerators``; spot workers; and a lease (``max_run_duration``) after which
Compute Engine deletes a forgotten VM by itself.

A fresh project's ``default`` network allows SSH, RDP and ICMP from anywhere to every
instance (priority 65534). A worker with an external address would accept them, so the
cluster's own rules deny every ingress from ``0.0.0.0/0`` to its tag at a priority that
beats those and the usual user rules (1000), and allow, at a higher one, only the
cluster's members to each other and the creator's CIDRs to the scheduler's two ports.

Every client the driver builds, including the operations clients it waits with, gets
the ``api_endpoint`` option, so nothing ever reaches another host. The driver never
calls ``ExtendedOperation.result()``: the library builds that operations client itself,
without the caller's endpoint.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .. import config
from ..cloudinit import LIMITS
from ..cluster import VMCluster
from ..credentials import Role
from ..driver import (
    CLUSTER_TAG,
    CREATOR_TAG,
    VM,
    CloudError,
    ClusterSummary,
    Driver,
    VMRequest,
    summarize,
)
from ..egress import Exits, decide_public_addresses
from ..errors import OptionError
from ..network import NetworkPolicy

try:
    import google.auth
    from google.api_core import exceptions as gexc
    from google.api_core import retry
    from google.api_core.client_options import ClientOptions
    from google.cloud import compute_v1
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError("GCPCluster needs the gcp extra: pip install 'dask-secure-cloud[gcp]'") from e

__all__ = ["GCPCluster", "GCPDriver"]

logger = logging.getLogger(__name__)

_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
#: Compute Engine's REST methods have no default retry: back off on rate limits and
#: "try again" answers, as the API asks, for up to two minutes.
_THROTTLED = retry.Retry(
    predicate=retry.if_exception_type(gexc.TooManyRequests, gexc.ServiceUnavailable),
    initial=0.5,
    maximum=10.0,
    timeout=120.0,
)
#: The cluster's allow rules: above its own deny rule (lower number wins).
ALLOW_PRIORITY = 100
#: The cluster's "deny all ingress from 0.0.0.0/0" rule: beats a fresh project's
#: default-allow-* rules (65534) and rules made with the usual default priority (1000).
DENY_PRIORITY = 110
#: Cloud NAT settings that translate every subnetwork's primary range in the region.
_NAT_ALL_SUBNETWORKS = ("ALL_SUBNETWORKS_ALL_IP_RANGES", "ALL_SUBNETWORKS_ALL_PRIMARY_IP_RANGES")
_INTERNET_GATEWAY = "/global/gateways/default-internet-gateway"


def _message(error: Exception) -> str:
    return getattr(error, "message", None) or str(error)


class _NotFoundError(CloudError):
    """The resource does not exist (HTTP 404), told apart by type, not by its text."""


class GCPDriver(Driver):
    """Instances and firewall rules of one cluster, found by its label and name."""

    provider = "gcp"
    user_data_limit = LIMITS["gcp"]

    def __init__(
        self,
        *,
        project: str | None,
        zone: str,
        network: str,
        subnetwork: str | None,
        machine_types: Mapping[Role, str],
        source_image: str,
        disk_size: int,
        disk_type: str,
        gpu_type: str | None,
        gpu_count: int,
        worker_spot: bool,
        labels: Mapping[str, str],
        network_tags: Sequence[str],
        service_account: str | None,
        scopes: Sequence[str],
        network_policy: NetworkPolicy,
        max_run_duration: float | None,
        api_endpoint: str | None,
        credentials: Any,
        worker_public_ip: bool | None = None,
    ) -> None:
        self.project = project
        self.zone = zone
        self.network = network
        self.subnetwork = subnetwork
        self.machine_types = dict(machine_types)
        self.source_image = source_image
        self.disk_size = disk_size
        self.disk_type = disk_type
        self.gpu_type = gpu_type
        self.gpu_count = gpu_count
        self.worker_spot = worker_spot
        self.labels = dict(labels)
        self.network_tags = list(network_tags)
        self.service_account = service_account
        self.scopes = list(scopes)
        self.network_policy = network_policy
        self.max_run_duration = max_run_duration
        self.api_endpoint = api_endpoint
        self.credentials = credentials
        #: True, False, or None to decide from the subnetwork's ways out.
        self.worker_public_ip = worker_public_ip
        self._clients: dict[str, Any] = {}
        self._image_link: str | None = None
        self._subnets: list[Any] | None = None
        #: Whether VMs of each role get an external address: decided in :meth:`prepare`.
        self._public: dict[Role, bool] = {}

    # -- the SDK ------------------------------------------------------------------------

    def _client(self, name: str) -> Any:
        """One client per service, all with the same endpoint and credentials."""
        if name not in self._clients:
            if self.credentials is None:
                try:
                    self.credentials, found_project = google.auth.default(
                        scopes=["https://www.googleapis.com/auth/cloud-platform"]
                    )
                except google.auth.exceptions.DefaultCredentialsError as e:
                    raise CloudError(
                        "No Google Cloud credentials found: run `gcloud auth "
                        "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS to "
                        "a service-account key file, or pass credentials="
                    ) from e
                self.project = self.project or found_project
            if not self.project:
                raise CloudError("project is not set and the credentials name none: pass project=")
            options = ClientOptions(api_endpoint=self.api_endpoint) if self.api_endpoint else None
            cls = getattr(compute_v1, name)
            self._clients[name] = cls(
                credentials=self.credentials, transport="rest", client_options=options
            )
        return self._clients[name]

    async def _call(self, service: str, method: str, what: str, **kwargs: Any) -> Any:
        def call() -> Any:
            return getattr(self._client(service), method)(retry=_THROTTLED, **kwargs)

        try:
            return await asyncio.to_thread(call)
        except gexc.NotFound as e:
            raise _NotFoundError(f"{what} not found: {_message(e)}") from e
        except gexc.Forbidden as e:
            raise CloudError(
                f"{what}: permission denied ({_message(e)}); give these credentials the "
                "roles listed in the docs"
            ) from e
        except gexc.GoogleAPIError as e:
            raise CloudError(f"{what} failed: {_message(e)}") from e

    async def _wait(self, operation: Any, what: str, zonal: bool = True) -> None:
        """Wait on an operation with our own operations client, bounded."""
        name = operation.name
        deadline = time.monotonic() + self.boot_timeout
        while True:
            if zonal:
                current = await self._call(
                    "ZoneOperationsClient",
                    "wait",
                    what,
                    project=self.project,
                    zone=self.zone,
                    operation=name,
                )
            else:
                current = await self._call(
                    "GlobalOperationsClient", "wait", what, project=self.project, operation=name
                )
            if current.status == compute_v1.Operation.Status.DONE:
                if current.error and current.error.errors:
                    first = current.error.errors[0]
                    raise CloudError(f"{what} failed: {first.code}: {first.message}")
                return
            if time.monotonic() > deadline:
                raise CloudError(
                    f"{what}: operation {name} not done after {self.boot_timeout:.0f}s"
                )

    # -- before the first VM ------------------------------------------------------------

    def where(self) -> str:
        return self.zone

    @property
    def region(self) -> str:
        return self.zone.rsplit("-", 1)[0]

    def _network_link(self) -> str:
        return f"projects/{self.project}/global/networks/{self.network}"

    async def prepare(self, cluster_id: str) -> None:
        """Read-only checks first (zone, machine types, image, the ways out), then the
        firewall: a refusal leaves nothing behind."""
        await self._call(
            "ZonesClient", "get", f"zone {self.zone!r}", project=self.project, zone=self.zone
        )
        for role, machine_type in self.machine_types.items():
            await self._call(
                "MachineTypesClient",
                "get",
                f"{role.value}_machine_type {machine_type!r} in zone {self.zone}",
                project=self.project,
                zone=self.zone,
                machine_type=machine_type,
            )
        await self._resolve_image()
        await self._decide_addresses()
        sources = await self.network_policy.scheduler_sources(self._subnet_ranges)
        for rule in self._firewall_rules(cluster_id, sources):
            operation = await self._call(
                "FirewallsClient",
                "insert",
                f"firewall {rule.name}",
                project=self.project,
                firewall_resource=rule,
            )
            await self._wait(operation, f"firewall {rule.name}", zonal=False)

    def _firewall_rules(self, cluster_id: str, sources: Sequence[str]) -> list[Any]:
        """The deny rule first, so no moment exists where only allows are in place.

        Only the scheduler's tag gets the creator's CIDRs: a worker with an external
        address accepts nothing from outside the cluster."""
        tag = _network_tag(cluster_id)
        network = self._network_link()
        return [
            compute_v1.Firewall(
                name=f"{tag}-deny",
                network=network,
                description=(
                    f"dask-secure-cloud {cluster_id}: nothing from outside the cluster, "
                    "whatever the network's other rules allow"
                ),
                direction="INGRESS",
                priority=DENY_PRIORITY,
                source_ranges=["0.0.0.0/0"],
                target_tags=[tag],
                denied=[compute_v1.Denied(I_p_protocol="all")],
            ),
            compute_v1.Firewall(
                name=f"{tag}-client",
                network=network,
                description=f"dask-secure-cloud {cluster_id}: scheduler port and dashboard",
                direction="INGRESS",
                priority=ALLOW_PRIORITY,
                source_ranges=list(sources),
                target_tags=[_scheduler_tag(cluster_id)],
                allowed=[
                    compute_v1.Allowed(I_p_protocol="tcp", ports=[str(p) for p in self.ports])
                ],
            ),
            compute_v1.Firewall(
                name=f"{tag}-internal",
                network=network,
                description=f"dask-secure-cloud {cluster_id}: between the cluster's VMs",
                direction="INGRESS",
                priority=ALLOW_PRIORITY,
                source_tags=[tag],
                target_tags=[tag],
                allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=["0-65535"])],
            ),
        ]

    # -- the ways out -------------------------------------------------------------------

    async def _decide_addresses(self) -> None:
        """Which roles get an external address, from the subnetwork's ways out.

        Refuses (``NoRouteOutError``) before anything is made when a role would have
        none."""
        exits = await self._exits()
        self._public = decide_public_addresses(
            exits,
            use_private_ip=self.network_policy.use_private_ip,
            worker_public_ip=self.worker_public_ip,
            offline_image=self.offline_image,
            fixes=lambda role: self._fixes(role, exits),
            logger=logger,
        )

    def _fixes(self, role: Role, exits: Exits) -> list[str]:
        """Compute Engine's remedies, as options to paste."""
        fixes = [
            f"subnetwork=<a subnetwork of network {self.network} in {self.region} that a "
            "Cloud NAT covers> (gcloud compute routers nats create ... "
            "--nat-all-subnet-ip-ranges, on a router of that network)",
            "network=<a network with a 0.0.0.0/0 route to default-internet-gateway>",
        ]
        if role is Role.WORKER and exits.public is not None:
            fixes.insert(
                0,
                "worker_public_ip=None (the default) or True: workers get an ephemeral "
                f"external address and go out through {exits.public}, while the "
                "cluster's firewall denies every connection from outside the cluster",
            )
        return fixes

    async def _exits(self) -> Exits:
        """The ways out of the VMs' subnetwork: a Cloud NAT covering it, a default
        internet route. Both need that route: Cloud NAT sends through it too."""
        subnet = await self._subnetwork()
        place = f"subnetwork {subnet.name} of network {self.network} in {self.region}"
        routers = await self._call(
            "RoutersClient",
            "list",
            f"routers in {self.region}",
            request=compute_v1.ListRoutersRequest(project=self.project, region=self.region),
        )
        routes = await self._call(
            "RoutesClient",
            "list",
            f"routes of network {self.network!r}",
            request=compute_v1.ListRoutesRequest(
                project=self.project,
                filter=f'network eq ".*/projects/{self.project}/global/networks/{self.network}"',
            ),
        )
        nat = _covering_nat(await asyncio.to_thread(list, routers), self.network, subnet)
        route = _internet_route(
            await asyncio.to_thread(list, routes), self.network, set(self.network_tags)
        )
        if route is None:
            if nat is not None:
                place += (
                    f" ({nat} is there, but it has no 0.0.0.0/0 route to "
                    "default-internet-gateway to send through)"
                )
            return Exits(place, private=None, public=None)
        return Exits(place, private=nat, public=f"the default internet gateway (route {route})")

    async def _network_subnets(self) -> list[Any]:
        """The subnetworks of the cluster's network in the zone's region (read once)."""
        if self._subnets is None:
            pages = await self._call(
                "SubnetworksClient",
                "list",
                f"subnetworks of network {self.network!r}",
                project=self.project,
                region=self.region,
            )
            self._subnets = [
                s
                for s in await asyncio.to_thread(list, pages)
                if s.network.endswith(f"/global/networks/{self.network}")
            ]
        return self._subnets

    async def _subnetwork(self) -> Any:
        """The subnetwork the VMs get their addresses from, as Compute Engine picks it."""
        if self.subnetwork:
            subnet = await self._call(
                "SubnetworksClient",
                "get",
                f"subnetwork {self.subnetwork!r}",
                project=self.project,
                region=self.region,
                subnetwork=self.subnetwork,
            )
            if not subnet.network.endswith(f"/global/networks/{self.network}"):
                raise CloudError(
                    f"subnetwork {self.subnetwork!r} belongs to network "
                    f"{subnet.network.rsplit('/', 1)[-1]!r}, not {self.network!r}: pass "
                    "network= with its network"
                )
            return subnet
        subnets = await self._network_subnets()
        # An auto-mode network's subnetwork in a region carries the network's name.
        chosen = subnets if len(subnets) == 1 else [s for s in subnets if s.name == self.network]
        if not subnets:
            raise CloudError(
                f"network {self.network!r} has no subnetwork in {self.region}: pass subnetwork="
            )
        if len(chosen) != 1:
            names = ", ".join(s.name for s in subnets) or "none"
            raise CloudError(
                f"network {self.network!r} has {len(subnets)} subnetworks in {self.region} "
                f"({names}): pass subnetwork="
            )
        return chosen[0]

    async def _subnet_ranges(self) -> list[str]:
        """The address ranges of the cluster's subnetwork, or of the network's in region."""
        if self.subnetwork:
            return [(await self._subnetwork()).ip_cidr_range]
        ranges = [s.ip_cidr_range for s in await self._network_subnets()]
        if not ranges:
            raise CloudError(
                f"network {self.network!r} has no subnetwork in {self.region}: pass subnetwork="
            )
        return ranges

    async def _resolve_image(self) -> None:
        match = re.fullmatch(r"projects/([^/]+)/global/images/(family/)?([^/]+)", self.source_image)
        if not match:
            raise CloudError(
                f"source_image {self.source_image!r} must look like "
                "'projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64'"
            )
        project, family, name = match.groups()
        if family:
            image = await self._call(
                "ImagesClient",
                "get_from_family",
                f"source_image {self.source_image!r}",
                project=project,
                family=name,
            )
        else:
            image = await self._call(
                "ImagesClient",
                "get",
                f"source_image {self.source_image!r}",
                project=project,
                image=name,
            )
        self._image_link = image.self_link or self.source_image

    def gpus(self, role: Role) -> bool:
        return role is Role.WORKER and bool(self.gpu_type and self.gpu_count)

    # -- VMs ----------------------------------------------------------------------------

    def _instance(self, request: VMRequest) -> compute_v1.Instance:
        worker = request.role is Role.WORKER
        if request.role not in self._public:
            raise CloudError("prepare() decides the VMs' addresses: call it before create()")
        public = self._public[request.role]
        interface = compute_v1.NetworkInterface(
            network=f"projects/{self.project}/global/networks/{self.network}"
        )
        if self.subnetwork:
            region = self.zone.rsplit("-", 1)[0]
            interface.subnetwork = (
                f"projects/{self.project}/regions/{region}/subnetworks/{self.subnetwork}"
            )
        if public:
            interface.access_configs = [
                compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")
            ]
        scheduling = compute_v1.Scheduling(automatic_restart=False)
        if worker and self.worker_spot:
            scheduling.provisioning_model = "SPOT"
            scheduling.instance_termination_action = "DELETE"
        if worker and self.gpus(Role.WORKER):
            scheduling.on_host_maintenance = "TERMINATE"
        if self.max_run_duration:
            scheduling.max_run_duration = compute_v1.Duration(seconds=int(self.max_run_duration))
            scheduling.instance_termination_action = "DELETE"
        instance = compute_v1.Instance(
            name=f"{_network_tag(request.cluster_id)}-{request.name}",
            machine_type=f"zones/{self.zone}/machineTypes/{self.machine_types[request.role]}",
            labels={
                **self.labels,
                CLUSTER_TAG: request.cluster_id,
                "dask-secure-cloud-role": request.role.value,
                CREATOR_TAG: _label_value(self.creator),
            },
            tags=compute_v1.Tags(items=self._tags(request)),
            metadata=compute_v1.Metadata(
                items=[compute_v1.Items(key="user-data", value=request.user_data.decode())]
            ),
            disks=[
                compute_v1.AttachedDisk(
                    boot=True,
                    auto_delete=True,
                    initialize_params=compute_v1.AttachedDiskInitializeParams(
                        source_image=self._image_link,
                        disk_size_gb=self.disk_size,
                        disk_type=f"zones/{self.zone}/diskTypes/{self.disk_type}",
                    ),
                )
            ],
            network_interfaces=[interface],
            scheduling=scheduling,
        )
        if worker and self.gpus(Role.WORKER):
            instance.guest_accelerators = [
                compute_v1.AcceleratorConfig(
                    accelerator_type=f"zones/{self.zone}/acceleratorTypes/{self.gpu_type}",
                    accelerator_count=self.gpu_count,
                )
            ]
        if self.service_account:
            instance.service_accounts = [
                compute_v1.ServiceAccount(email=self.service_account, scopes=self.scopes)
            ]
        return instance

    def _tags(self, request: VMRequest) -> list[str]:
        """The cluster's tag on every VM; the scheduler's tag (the creator's way in) on
        the scheduler alone."""
        tags = [_network_tag(request.cluster_id)]
        if request.role is Role.SCHEDULER:
            tags.append(_scheduler_tag(request.cluster_id))
        return [*tags, *self.network_tags]

    async def create(self, request: VMRequest) -> VM:
        instance = self._instance(request)
        what = f"creating instance {instance.name}"
        operation = await self._call(
            "InstancesClient",
            "insert",
            what,
            project=self.project,
            zone=self.zone,
            instance_resource=instance,
        )
        await self._wait(operation, what)
        return await self._vm(instance.name, request.cluster_id)

    async def _vm(self, name: str, cluster_id: str) -> VM:
        found = await self._call(
            "InstancesClient",
            "get",
            f"instance {name}",
            project=self.project,
            zone=self.zone,
            instance=name,
        )
        return self._record(found, cluster_id)

    def _record(self, instance: Any, cluster_id: str) -> VM:
        interface = instance.network_interfaces[0]
        nat = [c.nat_i_p for c in interface.access_configs if c.nat_i_p]
        name = instance.name.removeprefix(f"{_network_tag(cluster_id)}-")
        role = Role(instance.labels.get("dask-secure-cloud-role", "worker"))
        if role is Role.SCHEDULER and self.network_policy.use_private_ip:
            # Its external address, if any, is only its way out: the client is inside
            # the network and the firewall lets it in on the private address alone.
            nat = []
        return VM(
            id=instance.name,
            name=name,
            role=role,
            cluster_id=cluster_id,
            private_ip=interface.network_i_p,
            public_ip=nat[0] if nat else None,
        )

    async def destroy(self, vm: VM) -> None:
        what = f"deleting instance {vm.id}"
        try:
            operation = await self._call(
                "InstancesClient",
                "delete",
                what,
                project=self.project,
                zone=self.zone,
                instance=vm.id,
            )
        except _NotFoundError:
            return  # already gone (a lease or spot deletion)
        await self._wait(operation, what)

    async def list(self, cluster_id: str) -> list[VM]:
        pages = await self._call(
            "InstancesClient",
            "list",
            "listing instances",
            request=compute_v1.ListInstancesRequest(
                project=self.project,
                zone=self.zone,
                filter=f'labels.{CLUSTER_TAG} = "{cluster_id}"',
            ),
        )
        instances = await asyncio.to_thread(list, pages)
        # A stopped instance still exists (and its disk still costs): list every one.
        return [self._record(i, cluster_id) for i in instances]

    async def clusters(self) -> list[ClusterSummary]:
        pages = await self._call(
            "InstancesClient",
            "list",
            "listing instances",
            request=compute_v1.ListInstancesRequest(
                project=self.project, zone=self.zone, filter=f"labels.{CLUSTER_TAG}:*"
            ),
        )
        instances = await asyncio.to_thread(list, pages)
        rules = await self._call(
            "FirewallsClient",
            "list",
            "listing firewall rules",
            request=compute_v1.ListFirewallsRequest(
                project=self.project, filter='name eq "dask-secure-cloud-dsc-.*"'
            ),
        )
        others = [
            m.group(1)
            for rule in await asyncio.to_thread(list, rules)
            if (m := re.match(r"^dask-secure-cloud-(dsc-[0-9a-f]+)-", rule.name))
        ]
        found = [
            (
                i.labels[CLUSTER_TAG],
                datetime.datetime.fromisoformat(i.creation_timestamp)
                if i.creation_timestamp
                else None,
                i.labels.get(CREATOR_TAG),
            )
            for i in instances
            if CLUSTER_TAG in i.labels
        ]
        return summarize(found, others)

    async def state(self, vm: VM) -> str:
        try:
            found = await self._call(
                "InstancesClient",
                "get",
                f"instance {vm.id}",
                project=self.project,
                zone=self.zone,
                instance=vm.id,
            )
        except CloudError:
            return "terminated"
        return (
            "terminated" if found.status in ("STOPPING", "TERMINATED", "SUSPENDED") else "running"
        )

    async def console_output(self, vm: VM) -> str:
        try:
            output = await self._call(
                "InstancesClient",
                "get_serial_port_output",
                f"console of {vm.id}",
                project=self.project,
                zone=self.zone,
                instance=vm.id,
            )
        except CloudError:
            return ""
        return output.contents

    async def release(self, cluster_id: str) -> None:
        tag = _network_tag(cluster_id)
        pages = await self._call(
            "FirewallsClient",
            "list",
            "listing firewall rules",
            request=compute_v1.ListFirewallsRequest(
                project=self.project, filter=f'name eq "{tag}-.*"'
            ),
        )
        for rule in await asyncio.to_thread(list, pages):
            if not rule.name.startswith(f"{tag}-"):
                continue
            what = f"deleting firewall {rule.name}"
            operation = await self._call(
                "FirewallsClient", "delete", what, project=self.project, firewall=rule.name
            )
            await self._wait(operation, what, zonal=False)

    async def close(self) -> None:
        for client in self._clients.values():
            transport = getattr(client, "transport", None)
            if transport is not None:
                await asyncio.to_thread(transport.close)
        self._clients.clear()


def _network_tag(cluster_id: str) -> str:
    """The network tag (and name prefix) of a cluster's VMs and firewall rules."""
    return f"dask-secure-cloud-{cluster_id}"


def _scheduler_tag(cluster_id: str) -> str:
    """The network tag of the scheduler alone: the creator's CIDRs reach only it."""
    return f"{_network_tag(cluster_id)}-scheduler"


def _covering_nat(routers: Sequence[Any], network: str, subnet: Any) -> str | None:
    """The Cloud NAT (public, for VMs) that translates ``subnet``'s primary range."""
    for router in routers:
        if not router.network.endswith(f"/global/networks/{network}"):
            continue
        for nat in router.nats:
            if nat.type_ == "PRIVATE":
                continue  # NAT between networks, not to the internet
            if nat.endpoint_types and "ENDPOINT_TYPE_VM" not in nat.endpoint_types:
                continue
            mode = nat.source_subnetwork_ip_ranges_to_nat
            covered = mode in _NAT_ALL_SUBNETWORKS or (
                mode == "LIST_OF_SUBNETWORKS"
                and any(
                    _same_subnet(entry.name, subnet)
                    and {"ALL_IP_RANGES", "PRIMARY_IP_RANGE"} & set(entry.source_ip_ranges_to_nat)
                    for entry in nat.subnetworks
                )
            )
            if covered:
                return f"Cloud NAT {nat.name} on router {router.name}"
    return None


def _same_subnet(link: str, subnet: Any) -> bool:
    """Whether a subnetwork URL (full or partial) names ``subnet``."""
    tail = "/".join(link.rstrip("/").split("/")[-4:])
    return (subnet.self_link or "").endswith(tail) or tail == (
        f"regions/{subnet.region.rsplit('/', 1)[-1]}/subnetworks/{subnet.name}"
    )


def _internet_route(routes: Sequence[Any], network: str, tags: set[str]) -> str | None:
    """The name of a 0.0.0.0/0 route to the default internet gateway that applies to the
    cluster's VMs (a route with tags applies only to instances carrying one of them)."""
    for route in routes:
        if (
            route.network.endswith(f"/global/networks/{network}")
            and route.dest_range == "0.0.0.0/0"
            and route.next_hop_gateway.endswith(_INTERNET_GATEWAY)
            and (not route.tags or tags & set(route.tags))
        ):
            return route.name
    return None


def _label_value(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63]


class GCPCluster(VMCluster):
    """A secure Dask cluster on Google Compute Engine.

    Every option of :class:`~dask_secure_cloud.cluster.VMCluster` applies, plus:

    Parameters
    ----------
    project
        Project id. Default: the one of the application default credentials.
    zone
        Zone, for example ``"europe-west4-a"``.
    network, subnetwork
        The VPC network (default ``"default"``) and, separately, a subnetwork of it in
        the zone's region.
    scheduler_machine_type, worker_machine_type
        Machine types, for example ``"e2-standard-4"``.
    source_image
        ``projects/P/global/images/NAME`` or ``projects/P/global/images/family/F``.
        Default: the Ubuntu 24.04 LTS family.
    disk_size, disk_type
        Boot disk size in GB (deleted with the VM) and type.
    gpu_type, gpu_count
        Accelerators for workers, for example ``"nvidia-tesla-t4"`` and 1.
    worker_spot
        Run workers as Spot VMs, deleted when preempted.
    labels, network_tags
        Extra labels and network tags for every VM.
    service_account, scopes
        The identity the VMs run as. Default: none, so a VM holds no Google token.
    use_private_ip
        The client runs inside the network and reaches the scheduler on its internal
        address; the scheduler's port and dashboard are opened to the subnetworks'
        ranges. Default False: the scheduler gets an external address.
    worker_public_ip
        ``None`` (default): workers get an ephemeral external address only where their
        subnetwork has no Cloud NAT, so they can reach a registry, while the cluster's
        firewall denies every connection from outside the cluster. ``False``: never
        (the subnetwork needs Cloud NAT, or ``offline_image=True``). ``True``: always.
    max_run_duration
        Compute Engine deletes each VM after this long, whatever happens to the client.
    allowed_cidrs, open_to_world, allow_insecure_public, public_ip_url
        Who may reach the scheduler, as for ``EC2Cluster``.
    api_endpoint
        Another Compute Engine endpoint; every client the cluster builds uses it.
    credentials
        A ``google.auth`` credentials object, instead of application default credentials.
    """

    provider = "gcp"

    def __init__(
        self,
        *,
        project: str | None = None,
        zone: str | None = None,
        network: str | None = None,
        subnetwork: str | None = None,
        scheduler_machine_type: str | None = None,
        worker_machine_type: str | None = None,
        source_image: str | None = None,
        disk_size: int | None = None,
        disk_type: str | None = None,
        gpu_type: str | None = None,
        gpu_count: int | None = None,
        worker_spot: bool | None = None,
        labels: Mapping[str, str] | None = None,
        network_tags: Sequence[str] | None = None,
        service_account: str | None = None,
        scopes: Sequence[str] | None = None,
        use_private_ip: bool | None = None,
        worker_public_ip: bool | None = None,
        max_run_duration: str | float | None = None,
        allowed_cidrs: Sequence[str] | None = None,
        open_to_world: bool | None = None,
        allow_insecure_public: bool | None = None,
        public_ip_url: str | None = None,
        api_endpoint: str | None = None,
        credentials: Any = None,
        security: Any = None,
        **kwargs: Any,
    ) -> None:
        def opt(name: str, value: Any) -> Any:
            return config.option(self.provider, name, value)

        zone = opt("zone", zone)
        if not isinstance(zone, str) or not re.fullmatch(r"[a-z]+-[a-z]+\d+-[a-z]", zone):
            raise OptionError(f"zone must look like 'us-central1-a', got {zone!r}")
        labels = dict(opt("labels", labels) or {})
        for key, value in labels.items():
            if not _LABEL.match(str(key)) or not re.fullmatch(r"[a-z0-9_-]{0,63}", str(value)):
                raise OptionError(
                    f"labels: {key!r}: {value!r} is not a valid label (lowercase letters, "
                    "digits, '-' and '_', at most 63 characters)"
                )
        if CLUSTER_TAG in labels:
            raise OptionError(f"labels: {CLUSTER_TAG!r} is set by the cluster itself")
        disk_size = opt("disk_size", disk_size)
        if isinstance(disk_size, bool) or not isinstance(disk_size, int) or disk_size < 10:
            raise OptionError(f"disk_size must be a whole number of GB >= 10, got {disk_size!r}")
        gpu_count = int(opt("gpu_count", gpu_count) or 0)
        gpu_type = opt("gpu_type", gpu_type)
        if gpu_count and not gpu_type:
            raise OptionError("gpu_count needs gpu_type, for example gpu_type='nvidia-tesla-t4'")
        network_policy = NetworkPolicy.from_options(
            opt,
            security=security,
            use_private_ip=use_private_ip,
            worker_public_ip=worker_public_ip,
            allowed_cidrs=allowed_cidrs,
            open_to_world=open_to_world,
            allow_insecure_public=allow_insecure_public,
            public_ip_url=public_ip_url,
        )
        machine_types = {
            Role.SCHEDULER: opt("scheduler_machine_type", scheduler_machine_type),
            Role.WORKER: opt("worker_machine_type", worker_machine_type),
        }
        run = opt("max_run_duration", max_run_duration)
        driver = GCPDriver(
            project=opt("project", project),
            zone=zone,
            network=opt("network", network),
            subnetwork=opt("subnetwork", subnetwork),
            machine_types=machine_types,
            source_image=opt("source_image", source_image),
            disk_size=disk_size,
            disk_type=opt("disk_type", disk_type),
            gpu_type=gpu_type,
            gpu_count=gpu_count,
            worker_spot=bool(opt("worker_spot", worker_spot)),
            labels=labels,
            network_tags=list(opt("network_tags", network_tags) or []),
            service_account=opt("service_account", service_account),
            scopes=list(opt("scopes", scopes) or []),
            network_policy=network_policy,
            max_run_duration=(
                config.parse_duration(run, "max_run_duration").total_seconds() if run else None
            ),
            api_endpoint=opt("api_endpoint", api_endpoint),
            credentials=credentials,
            worker_public_ip=network_policy.worker_public_ip,
        )
        super().__init__(
            driver,
            security=security,
            **kwargs,
        )
