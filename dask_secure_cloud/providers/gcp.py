"""``GCPCluster``: a secure Dask cluster on Google Compute Engine.

What is particular to Google Cloud: the official ``google-cloud-compute`` client on its
REST transport, run in threads (it has no async client); a firewall rule per cluster
that targets the cluster's own network tag; workers without external addresses; GPUs
as ``guestAccelerators``; spot workers; and a lease (``max_run_duration``) after which
Compute Engine deletes a forgotten VM by itself.

Every client the driver builds, including the operations clients it waits with, gets
the ``api_endpoint`` option, so nothing ever reaches another host. The driver never
calls ``ExtendedOperation.result()``: the library builds that operations client itself,
without the caller's endpoint.
"""

from __future__ import annotations

import asyncio
import datetime
import getpass
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

_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
#: Compute Engine's REST methods have no default retry: back off on rate limits and
#: "try again" answers, as the API asks, for up to two minutes.
_THROTTLED = retry.Retry(
    predicate=retry.if_exception_type(gexc.TooManyRequests, gexc.ServiceUnavailable),
    initial=0.5,
    maximum=10.0,
    timeout=120.0,
)


def _message(error: Exception) -> str:
    return getattr(error, "message", None) or str(error)


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
        self._clients: dict[str, Any] = {}
        self._image_link: str | None = None

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
            raise CloudError(f"{what} not found: {_message(e)}") from e
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

    async def prepare(self, cluster_id: str) -> None:
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
        sources = await self.network_policy.scheduler_sources(self._subnet_ranges)
        tag = _network_tag(cluster_id)
        rules = [
            compute_v1.Firewall(
                name=f"{tag}-client",
                network=f"projects/{self.project}/global/networks/{self.network}",
                description=f"dask-secure-cloud {cluster_id}: scheduler port and dashboard",
                direction="INGRESS",
                source_ranges=sources,
                target_tags=[tag],
                allowed=[
                    compute_v1.Allowed(I_p_protocol="tcp", ports=[str(p) for p in self.ports])
                ],
            ),
            compute_v1.Firewall(
                name=f"{tag}-internal",
                network=f"projects/{self.project}/global/networks/{self.network}",
                description=f"dask-secure-cloud {cluster_id}: between the cluster's VMs",
                direction="INGRESS",
                source_tags=[tag],
                target_tags=[tag],
                allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=["0-65535"])],
            ),
        ]
        for rule in rules:
            operation = await self._call(
                "FirewallsClient",
                "insert",
                f"firewall {rule.name}",
                project=self.project,
                firewall_resource=rule,
            )
            await self._wait(operation, f"firewall {rule.name}", zonal=False)

    async def _subnet_ranges(self) -> list[str]:
        """The address ranges of the cluster's subnetwork, or of the network's in region."""
        region = self.zone.rsplit("-", 1)[0]
        if self.subnetwork:
            subnet = await self._call(
                "SubnetworksClient",
                "get",
                f"subnetwork {self.subnetwork!r}",
                project=self.project,
                region=region,
                subnetwork=self.subnetwork,
            )
            return [subnet.ip_cidr_range]
        pages = await self._call(
            "SubnetworksClient",
            "list",
            f"subnetworks of network {self.network!r}",
            project=self.project,
            region=region,
        )
        ranges = [
            s.ip_cidr_range
            for s in await asyncio.to_thread(list, pages)
            if s.network.endswith(f"/networks/{self.network}")
        ]
        if not ranges:
            raise CloudError(
                f"network {self.network!r} has no subnetwork in {region}: pass subnetwork="
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
        public = self.network_policy.public_address(worker)
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
                CREATOR_TAG: _label_value(getpass.getuser()),
            },
            tags=compute_v1.Tags(items=[_network_tag(request.cluster_id), *self.network_tags]),
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
        return VM(
            id=instance.name,
            name=name,
            role=Role(instance.labels.get("dask-secure-cloud-role", "worker")),
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
        except CloudError as e:
            if "not found" in str(e):
                return  # already gone (a lease or spot deletion)
            raise
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
                project=self.project, filter='name = "dask-secure-cloud-dsc-.*"'
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
                project=self.project, filter=f'name = "{tag}-.*"'
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
    use_private_ip, worker_public_ip
        As for :class:`~dask_secure_cloud.providers.aws.EC2Cluster`.
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
            raise ValueError(f"zone must look like 'us-central1-a', got {zone!r}")
        labels = dict(opt("labels", labels) or {})
        for key, value in labels.items():
            if not _LABEL.match(str(key)) or not re.fullmatch(r"[a-z0-9_-]{0,63}", str(value)):
                raise ValueError(
                    f"labels: {key!r}: {value!r} is not a valid label (lowercase letters, "
                    "digits, '-' and '_', at most 63 characters)"
                )
        if CLUSTER_TAG in labels:
            raise ValueError(f"labels: {CLUSTER_TAG!r} is set by the cluster itself")
        disk_size = opt("disk_size", disk_size)
        if isinstance(disk_size, bool) or not isinstance(disk_size, int) or disk_size < 10:
            raise ValueError(f"disk_size must be a whole number of GB >= 10, got {disk_size!r}")
        gpu_count = int(opt("gpu_count", gpu_count) or 0)
        gpu_type = opt("gpu_type", gpu_type)
        if gpu_count and not gpu_type:
            raise ValueError("gpu_count needs gpu_type, for example gpu_type='nvidia-tesla-t4'")
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
        )
        super().__init__(
            driver,
            security=security,
            **kwargs,
        )
