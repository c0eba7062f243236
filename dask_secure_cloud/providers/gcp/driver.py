"""The Compute Engine driver: instances and firewall rules of one cluster, found by
its label and name.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
from typing import Any

import google.auth
import google.auth.exceptions
import requests
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.cloud import compute_v1

from ... import driver
from ...cloudinit import LIMITS
from ...credentials import Role
from ...network import NetworkPolicy
from ...options import GCPOptions
from .errors import _THROTTLED, _translate, operation_error
from .network import (
    _RULE_NAME,
    _RULES,
    NetworkSteps,
    _network_tag,
    _scheduler_tag,
)
from .zones import ZoneSteps

logger = logging.getLogger(__name__)


#: An instance in these states has stopped (its OS powered off, or it was preempted)
#: but still exists: its boot disk bills until the instance is deleted.
_STOPPED_STATUSES = frozenset({"STOPPING", "TERMINATED", "SUSPENDING", "SUSPENDED"})


#: Compute Engine's bounds on a VM's time limit (``terminationTime``,
#: ``maxRunDuration``): at least 30 seconds, at most 120 days.
MIN_TIME_LIMIT = datetime.timedelta(seconds=30)
MAX_TIME_LIMIT = datetime.timedelta(days=120)


#: A VM is not made with less than this left before the cluster's deadline: Compute
#: Engine's shortest limit, and time for the request to reach it.
_MIN_TIME_LEFT = MIN_TIME_LIMIT + datetime.timedelta(seconds=10)


class GCPDriver(ZoneSteps, NetworkSteps, driver.Driver):
    """Instances and firewall rules of one cluster, found by its label and name."""

    provider = "gcp"
    user_data_limit = LIMITS["gcp"]

    def __init__(
        self, options: GCPOptions, *, network: NetworkPolicy, credentials: Any = None
    ) -> None:
        self.options = options
        self.project = options.project
        self.machine_types = {
            Role.SCHEDULER: options.scheduler_machine_type,
            Role.WORKER: options.worker_machine_type,
        }
        self.labels = dict(options.labels)
        self.network_tags = list(options.network_tags)
        self.scopes = list(options.scopes)
        self.network_policy = network
        run = options.max_run_duration
        self.max_run_duration = run.total_seconds() if run is not None else None
        #: When Compute Engine deletes every VM of the cluster (``terminationTime``),
        #: unless ``max_run_duration`` is set: the end of ``max_lifetime`` from now. The
        #: driver is made before the cluster's CA, so this is never after the CA's end.
        self.deadline = (
            datetime.datetime.now(datetime.timezone.utc) + options.max_lifetime
        ).replace(microsecond=0)
        self.credentials = credentials
        #: True, False, or None to decide from the subnetwork's ways out.
        self.worker_public_ip = network.worker_public_ip
        self._clients: dict[str, Any] = {}
        #: The cluster's zone: where each VM goes first (the scheduler's, once made).
        self.home_zone = options.zone
        self._vm_zones: dict[str, str] = {}
        self._zone_names: list[str] | None = None
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
                    raise driver.CloudError(
                        "No Google Cloud credentials found: run `gcloud auth "
                        "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS to "
                        "a service-account key file, or pass credentials="
                    ) from e
                self.project = self.project or found_project
            if not self.project:
                raise driver.CloudError(
                    "project is not set and the credentials name none: pass project="
                )
            options = (
                ClientOptions(api_endpoint=self.options.api_endpoint)
                if self.options.api_endpoint
                else None
            )
            cls = getattr(compute_v1, name)
            self._clients[name] = cls(
                credentials=self.credentials, transport="rest", client_options=options
            )
        return self._clients[name]

    async def _call(
        self, service: str, method: str, what: str, *, poll: bool = False, **kwargs: Any
    ) -> Any:
        """One API call, its errors as the shared kinds. ``poll``: not retried, for
        :meth:`state`, whose caller polls again anyway."""

        def call() -> Any:
            policy = None if poll else _THROTTLED
            return getattr(self._client(service), method)(retry=policy, **kwargs)

        try:
            return await asyncio.to_thread(call)
        except gexc.RetryError as e:  # the retries' time ran out: the last answer tells
            cause = e.cause if isinstance(e.cause, gexc.GoogleAPIError) else e
            raise _translate(what, cause) from e
        except gexc.GoogleAPIError as e:
            raise _translate(what, e) from e
        except (requests.RequestException, google.auth.exceptions.TransportError) as e:
            raise driver.CloudError(f"{what} failed: {e}") from e

    async def _wait(self, operation: Any, what: str, zonal: bool = True) -> None:
        """Wait on an operation with our own operations client, for at most
        :attr:`operation_timeout`. Each ``wait`` call returns when the operation is done
        or after about two minutes, so it is called again at once."""
        name = operation.name
        current: Any = None

        # A zonal operation names its zone.
        zone = (operation.zone or "").rsplit("/", 1)[-1] or self.home_zone

        async def done() -> bool:
            nonlocal current
            if zonal:
                current = await self._call(
                    "ZoneOperationsClient",
                    "wait",
                    what,
                    project=self.project,
                    zone=zone,
                    operation=name,
                )
            else:
                current = await self._call(
                    "GlobalOperationsClient", "wait", what, project=self.project, operation=name
                )
            return bool(current.status == compute_v1.Operation.Status.DONE)

        await self.poll_until(done, f"{what}: operation {name}", interval=0)
        if current.error and current.error.errors:
            raise operation_error(what, current.error.errors[0], self.region)

    # -- before the first VM ------------------------------------------------------------

    def interruption_notice(self, role: Role) -> driver.InterruptionNotice | None:
        """A Spot worker asks the metadata server whether its VM is being preempted: it
        answers ``TRUE`` from the moment Compute Engine gives the 30-second notice."""
        if role is not Role.WORKER or not self.options.worker_spot:
            return None
        endpoint = self.options.metadata_endpoint.rstrip("/")
        return driver.InterruptionNotice(
            f"{endpoint}/computeMetadata/v1/instance/preempted",
            headers={"Metadata-Flavor": "Google"},
            must_contain="TRUE",
        )

    def where(self) -> str:
        return str(self.home_zone)

    async def check_request(self, cluster_id: str) -> None:
        """The zone, each role's machine type in it, and the image exist."""
        await self._call(
            "ZonesClient",
            "get",
            f"zone {self.options.zone!r}",
            project=self.project,
            zone=self.options.zone,
        )
        for role, machine_type in self.machine_types.items():
            await self._call(
                "MachineTypesClient",
                "get",
                f"{role.value}_machine_type {machine_type!r} in zone {self.options.zone}",
                project=self.project,
                zone=self.options.zone,
                machine_type=machine_type,
            )
        await self._resolve_image()

    async def make_network(self, cluster_id: str) -> None:
        """The cluster's firewall rules: deny all from outside, the client to the
        scheduler's ports, members to members."""
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

    # -- the ways out -------------------------------------------------------------------

    async def _resolve_image(self) -> None:
        match = re.fullmatch(
            r"projects/([^/]+)/global/images/(family/)?([^/]+)", self.options.source_image
        )
        if not match:
            raise driver.CloudError(
                f"source_image {self.options.source_image!r} must look like "
                "'projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64'"
            )
        project, family, name = match.groups()
        if family:
            image = await self._call(
                "ImagesClient",
                "get_from_family",
                f"source_image {self.options.source_image!r}",
                project=project,
                family=name,
            )
        else:
            image = await self._call(
                "ImagesClient",
                "get",
                f"source_image {self.options.source_image!r}",
                project=project,
                image=name,
            )
        self._image_link = image.self_link or self.options.source_image

    def gpus(self, role: Role) -> bool:
        return role is Role.WORKER and bool(self.options.gpu_type and self.options.gpu_count)

    # -- VMs ----------------------------------------------------------------------------

    def _instance(self, request: driver.VMRequest, zone: str, spot: bool) -> compute_v1.Instance:
        worker = request.role is Role.WORKER
        if request.role not in self._public:
            raise driver.CloudError("prepare() decides the VMs' addresses: call it before create()")
        public = self._public[request.role]
        interface = compute_v1.NetworkInterface(
            network=f"projects/{self.project}/global/networks/{self.options.network}"
        )
        if self.options.subnetwork:
            region = self.options.zone.rsplit("-", 1)[0]
            interface.subnetwork = (
                f"projects/{self.project}/regions/{region}/subnetworks/{self.options.subnetwork}"
            )
        if public:
            interface.access_configs = [
                compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")
            ]
        scheduling = compute_v1.Scheduling(automatic_restart=False)
        if spot:
            scheduling.provisioning_model = "SPOT"
            scheduling.instance_termination_action = "DELETE"
        if worker and self.gpus(Role.WORKER):
            scheduling.on_host_maintenance = "TERMINATE"
        if self.max_run_duration:
            scheduling.max_run_duration = compute_v1.Duration(seconds=int(self.max_run_duration))
        else:
            scheduling.termination_time = self._termination_time()
        scheduling.instance_termination_action = "DELETE"
        instance = compute_v1.Instance(
            name=f"{_network_tag(request.cluster_id)}-{request.name}",
            machine_type=f"zones/{zone}/machineTypes/{self.machine_types[request.role]}",
            labels={
                **self.labels,
                driver.CLUSTER_TAG: request.cluster_id,
                "dask-secure-cloud-role": request.role.value,
                driver.CREATOR_TAG: _label_value(self.creator),
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
                        disk_size_gb=self.options.disk_size,
                        disk_type=f"zones/{zone}/diskTypes/{self.options.disk_type}",
                    ),
                )
            ],
            network_interfaces=[interface],
            scheduling=scheduling,
            min_cpu_platform=self.options.min_cpu_platform,
        )
        if worker and self.gpus(Role.WORKER):
            instance.guest_accelerators = [
                compute_v1.AcceleratorConfig(
                    accelerator_type=f"zones/{zone}/acceleratorTypes/{self.options.gpu_type}",
                    accelerator_count=self.options.gpu_count,
                )
            ]
        if self.options.service_account:
            instance.service_accounts = [
                compute_v1.ServiceAccount(email=self.options.service_account, scopes=self.scopes)
            ]
        return instance

    def _termination_time(self) -> str:
        """The VM's ``terminationTime`` (RFC 3339): the cluster's deadline, or 120 days
        from now where that is sooner (Compute Engine's longest time limit)."""
        now = datetime.datetime.now(datetime.timezone.utc)
        left = self.deadline - now
        if left < _MIN_TIME_LEFT:
            raise driver.CloudError(
                f"the cluster's max_lifetime ends in {max(left.total_seconds(), 0):.0f}s, "
                "when Compute Engine deletes its VMs: no new VM is started; start a new "
                "cluster, with a longer max_lifetime for long-running work"
            )
        deadline = min(self.deadline, (now + MAX_TIME_LIMIT).replace(microsecond=0))
        return deadline.strftime("%Y-%m-%dT%H:%M:%SZ")

    def _tags(self, request: driver.VMRequest) -> list[str]:
        """The cluster's tag on every VM; the scheduler's tag (the creator's way in) on
        the scheduler alone."""
        tags = [_network_tag(request.cluster_id)]
        if request.role is Role.SCHEDULER:
            tags.append(_scheduler_tag(request.cluster_id))
        return [*tags, *self.network_tags]

    async def create(self, request: driver.VMRequest) -> driver.VM:
        return await self.create_in(request, self.home_zone, self.spot(request.role))

    async def create_in(self, request: driver.VMRequest, zone: str | None, spot: bool) -> driver.VM:
        """One instance in ``zone``. An insert refused for capacity or quota fails in
        its operation, and Compute Engine makes nothing: nothing to clean up."""
        where = str(zone or self.home_zone)
        instance = self._instance(request, where, spot)
        what = f"creating instance {instance.name} in {where}"
        operation = await self._call(
            "InstancesClient",
            "insert",
            what,
            project=self.project,
            zone=where,
            instance_resource=instance,
        )
        self._vm_zones[instance.name] = where  # the sweep looks there, made or not
        await self._wait(operation, what)
        return await self._vm(instance.name, request.cluster_id)

    async def _vm(self, name: str, cluster_id: str) -> driver.VM:
        found = await self._call(
            "InstancesClient",
            "get",
            f"instance {name}",
            project=self.project,
            zone=self._zone_of(name),
            instance=name,
        )
        return self._record(found, cluster_id)

    def _record(self, instance: Any, cluster_id: str) -> driver.VM:
        interface = instance.network_interfaces[0]
        nat = [c.nat_i_p for c in interface.access_configs if c.nat_i_p]
        name = instance.name.removeprefix(f"{_network_tag(cluster_id)}-")
        role = Role(instance.labels.get("dask-secure-cloud-role", "worker"))
        if role is Role.SCHEDULER and self.network_policy.use_private_ip:
            # Its external address, if any, is only its way out: the client is inside
            # the network and the firewall lets it in on the private address alone.
            nat = []
        return driver.VM(
            id=instance.name,
            name=name,
            role=role,
            cluster_id=cluster_id,
            private_ip=interface.network_i_p,
            public_ip=nat[0] if nat else None,
        )

    async def destroy(self, vm: driver.VM) -> None:
        what = f"deleting instance {vm.id}"
        try:
            operation = await self._call(
                "InstancesClient",
                "delete",
                what,
                project=self.project,
                zone=self._zone_of(vm.id),
                instance=vm.id,
            )
        except driver.NotFoundError:
            return  # already gone (a lease or spot deletion)
        try:
            await self._wait(operation, what)
        except driver.NotFoundError:
            return  # deleted meanwhile by its lease, or as a spot VM

    async def _instances(
        self, label_filter: str, poll: bool = False, zones: list[str] | None = None
    ) -> list[compute_v1.Instance]:
        """Every instance that matches ``label_filter`` in the zones the cluster's VMs
        may be in (:meth:`_listing_zones`), all pages read."""
        found = []
        for zone in zones or await self._listing_zones():
            pages = await self._call(
                "InstancesClient",
                "list",
                "listing instances",
                poll=poll,
                request=compute_v1.ListInstancesRequest(
                    project=self.project, zone=zone, filter=label_filter
                ),
            )
            for instance in await asyncio.to_thread(list, pages):
                self._vm_zones.setdefault(instance.name, zone)
                found.append(instance)
        return found

    async def list(self, cluster_id: str) -> list[driver.VM]:
        instances = await self._instances(f'labels.{driver.CLUSTER_TAG} = "{cluster_id}"')
        # A stopped instance still exists (and its disk still costs): list every one.
        return [self._record(i, cluster_id) for i in instances]

    async def clusters(self) -> list[driver.ClusterSummary]:
        zones = (
            [str(self.home_zone)]
            if self.zone_pinned_by() is not None
            else await self.region_zones(Role.WORKER)
        )
        instances = await self._instances(f"labels.{driver.CLUSTER_TAG}:*", zones=zones)
        # Firewall rules carry no labels: the cluster id is read from their names,
        # ``dask-secure-cloud-<id>-<deny|client|internal>``, whatever the id is.
        rules = await self._call(
            "FirewallsClient",
            "list",
            "listing firewall rules",
            request=compute_v1.ListFirewallsRequest(
                project=self.project, filter='name eq "dask-secure-cloud-.*"'
            ),
        )
        others = [
            m.group("id")
            for rule in await asyncio.to_thread(list, rules)
            if (m := _RULE_NAME.match(rule.name))
        ]
        found = [
            (
                i.labels[driver.CLUSTER_TAG],
                datetime.datetime.fromisoformat(i.creation_timestamp)
                if i.creation_timestamp
                else None,
                i.labels.get(driver.CREATOR_TAG),
                _listed_state(i.status),
            )
            for i in instances
            if driver.CLUSTER_TAG in i.labels
        ]
        return driver.summarize(found, [(cluster_id, "firewall") for cluster_id in others])

    async def states(self, cluster_id: str) -> dict[str, str]:
        """One instances.list for the whole cluster: a stopped (TERMINATED) instance
        still exists, and its boot disk bills, until it is deleted."""
        instances = await self._instances(
            f'labels.{driver.CLUSTER_TAG} = "{cluster_id}"', poll=True
        )
        return {
            i.name: "stopped" if i.status in _STOPPED_STATUSES else "running" for i in instances
        }

    async def state(self, vm: driver.VM) -> str:
        try:
            found = await self._call(
                "InstancesClient",
                "get",
                f"instance {vm.id}",
                poll=True,
                project=self.project,
                zone=self._zone_of(vm.id),
                instance=vm.id,
            )
        except driver.NotFoundError:
            return "terminated"  # deleted: by its lease, as a spot VM, or by us
        except driver.CloudError:  # throttled, refused, unreachable: nothing learnt
            return "unknown"
        return "stopped" if found.status in _STOPPED_STATUSES else "running"

    async def console_output(self, vm: driver.VM) -> str:
        try:
            output = await self._call(
                "InstancesClient",
                "get_serial_port_output",
                f"console of {vm.id}",
                project=self.project,
                zone=self._zone_of(vm.id),
                instance=vm.id,
            )
        except driver.CloudError:
            return ""
        return output.contents

    async def release(self, cluster_id: str) -> None:
        """Delete the cluster's firewall rules: exactly its own names, so the rules of a
        cluster whose id merely starts with this one (``nightly`` and ``nightly-etl``)
        stay."""
        tag = _network_tag(cluster_id)
        names = {f"{tag}-{rule}" for rule in _RULES}
        pages = await self._call(
            "FirewallsClient",
            "list",
            "listing firewall rules",
            request=compute_v1.ListFirewallsRequest(
                project=self.project, filter=f'name eq "{tag}-.*"'
            ),
        )
        for rule in await asyncio.to_thread(list, pages):
            if rule.name not in names:
                continue
            what = f"deleting firewall {rule.name}"

            async def delete(name: str = rule.name, what: str = what) -> None:
                operation = await self._call(
                    "FirewallsClient", "delete", what, project=self.project, firewall=name
                )
                await self._wait(operation, what, zonal=False)

            await self.delete_when_free(delete, what)

    async def close(self) -> None:
        for client in self._clients.values():
            transport = getattr(client, "transport", None)
            if transport is not None:
                await asyncio.to_thread(transport.close)
        self._clients.clear()


def _label_value(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63]


def _listed_state(status: str | None) -> str:
    """An instance's status in :meth:`Driver.state`'s words, for ``list``: a TERMINATED
    (or suspended) instance still exists, and its disk bills until it is deleted."""
    if status in ("PROVISIONING", "STAGING", "RUNNING", "REPAIRING"):
        return "running"
    if status in ("STOPPING", "TERMINATED", "SUSPENDING", "SUSPENDED"):
        return "stopped"
    return "unknown"
