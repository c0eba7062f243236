"""The Azure driver: VMs, their NICs, disks and public addresses, found by the cluster's
tags in one resource group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from azure.core import AsyncPipelineClient
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
)
from azure.core.pipeline.policies import AsyncRetryPolicy
from azure.core.rest import HttpRequest
from azure.identity import AzureAuthorityHosts
from azure.identity.aio import DefaultAzureCredential
from azure.mgmt.authorization.aio import AuthorizationManagementClient
from azure.mgmt.compute import models as cm
from azure.mgmt.compute.aio import ComputeManagementClient
from azure.mgmt.core.policies import AsyncARMChallengeAuthenticationPolicy
from azure.mgmt.msi.aio import ManagedServiceIdentityClient
from azure.mgmt.network import models as nm
from azure.mgmt.network.aio import NetworkManagementClient

from ... import driver
from ...cloudinit import LIMITS
from ...credentials import Role
from ...egress import Exits
from ...errors import OptionError
from ...network import NetworkPolicy
from ...options import AzureOptions
from .checks import RequestChecks
from .errors import _arm_error
from .identity import (
    _PEM_CERTIFICATE,
    IdentitySteps,
    throwaway_ssh_key,
)
from .inventory import InventorySteps
from .names import _name
from .network import _PUBLIC_EXIT, NetworkSteps, _check_client_can_reach
from .vms import vm_model
from .zones import ZoneSteps, zonal

logger = logging.getLogger(__name__)


#: Resource-manager endpoint and login authority of each Azure cloud.
CLOUDS: dict[str, tuple[str, str]] = {
    "public": ("https://management.azure.com", AzureAuthorityHosts.AZURE_PUBLIC_CLOUD),
    "usgovernment": (
        "https://management.usgovcloudapi.net",
        AzureAuthorityHosts.AZURE_GOVERNMENT,
    ),
    "china": ("https://management.chinacloudapi.cn", AzureAuthorityHosts.AZURE_CHINA),
}


#: Azure Scheduled Events, under the metadata endpoint: where a Spot VM learns it is
#: about to be evicted.
_SCHEDULED_EVENTS = "/metadata/scheduledevents?api-version=2020-07-01"


T = TypeVar("T")


class AzureDriver(
    ZoneSteps, RequestChecks, InventorySteps, NetworkSteps, IdentitySteps, driver.Driver
):
    """VMs, NICs, public addresses, an NSG and (unless given) a vnet in one resource group,
    each carrying the cluster tag."""

    provider = "azure"
    user_data_limit = LIMITS["azure"]
    max_concurrent_creates = 8

    def __init__(
        self,
        options: AzureOptions,
        *,
        network: NetworkPolicy,
        credential: AsyncTokenCredential | None = None,
        polling_interval: float = 2.0,
    ) -> None:
        if not options.resource_group:
            raise OptionError(
                "resource_group is required: the name of an existing Azure resource group "
                "(set secure-cloud.azure.resource-group in the dask config or pass it)"
            )
        self.options = options
        self._given_credential = credential
        self.resource_manager_url = (
            options.resource_manager_url or CLOUDS[options.cloud][0]
        ).rstrip("/")
        self.subscription_id = options.subscription_id or os.environ.get("AZURE_SUBSCRIPTION_ID")
        self.location = options.location
        self._located = False
        self.vm_sizes = {
            Role.SCHEDULER: options.scheduler_vm_size,
            Role.WORKER: options.worker_vm_size,
        }
        self.tags = dict(options.tags)
        _check_client_can_reach(options, network)
        self.network = network
        self.worker_public_ip = network.worker_public_ip
        self.polling_interval = polling_interval
        self._credential: AsyncTokenCredential | None = credential
        self._compute: ComputeManagementClient | None = None
        self._net: NetworkManagementClient | None = None
        self._gpu_sizes: set[str] = set()
        #: role -> (vCPUs, quota family) of its VM size, read with the sizes.
        self._size_quota: dict[Role, tuple[int, str | None]] = {}
        self._subnet_id: str | None = None
        self._subnet_prefixes: list[str] = []
        #: The NSG each role's NICs carry: the user's one for both, or the cluster's two.
        self._nsg_ids: dict[Role, str] = {}
        #: Whether each role's VMs get a public address, decided in :meth:`prepare`.
        self._public: dict[Role, bool] = {}
        self._login_key: str | None = None
        self._cluster_id: str | None = None
        self._msi: ManagedServiceIdentityClient | None = None
        self._auth: AuthorizationManagementClient | None = None
        #: The scheduler's own identity (resource id, client id, principal id), once
        #: :meth:`prepare` made it; None when the scheduler gets none.
        self._reaper: tuple[str, str, str] | None = None
        #: Whether the scheduler deletes the cluster's VMs when its lease ends: the
        #: option, until :meth:`prepare` decides ``None`` from the caller's permissions.
        self._reaping = options.delete_on_lease_end is not False
        #: Worker VMs this driver made and has not deleted: name -> resource id.
        self._workers: dict[str, str] = {}
        self._ca_pem = ""
        if self._reaping and options.ca_bundle:
            # The scheduler reaches Resource Manager through the same CA (Azure Stack
            # Hub, a stand-in); read now, never inside a coroutine. Certificates only.
            with open(options.ca_bundle, encoding="utf-8", errors="replace") as f:
                self._ca_pem = "".join(_PEM_CERTIFICATE.findall(f.read()))

    def __repr__(self) -> str:
        return f"<AzureDriver {self.options.resource_group} in {self.location or '?'}>"

    # -- the SDK ------------------------------------------------------------------------

    def _transport_options(self) -> dict[str, Any]:
        return {"connection_verify": self.options.ca_bundle} if self.options.ca_bundle else {}

    def _scope(self) -> str:
        return f"{self.resource_manager_url}/.default"

    def _get_credential(self) -> AsyncTokenCredential:
        if self._credential is None:
            self._credential = DefaultAzureCredential(
                authority=os.environ.get("AZURE_AUTHORITY_HOST") or CLOUDS[self.options.cloud][1],
                **self._transport_options(),
            )
        return self._credential

    def _sdk_options(self) -> dict[str, Any]:
        """What every management client of this driver is made with: the cloud's
        endpoint and scope, the polling interval, the transport (CA bundle)."""
        return {
            "base_url": self.resource_manager_url,
            "credential_scopes": [self._scope()],
            "polling_interval": self.polling_interval,
            **self._transport_options(),
        }

    def _clients(self) -> tuple[ComputeManagementClient, NetworkManagementClient]:
        if self._compute is None or self._net is None:
            assert self.subscription_id is not None
            options = self._sdk_options()
            credential = self._get_credential()
            self._compute = ComputeManagementClient(credential, self.subscription_id, **options)
            self._net = NetworkManagementClient(credential, self.subscription_id, **options)
        return self._compute, self._net

    async def _arm(self, what: str, call: Awaitable[T]) -> T:
        """Await one SDK call and turn what Azure answers into a :class:`CloudError`.

        Throttling (429) and transient 5xx answers are already retried by azure-core's
        retry policy, honouring ``Retry-After``.
        """
        try:
            return await call
        except ClientAuthenticationError as e:
            raise driver.ForbiddenError(
                f"{what}: Azure sign-in failed ({e.message}). Sign in through one of "
                "DefaultAzureCredential's sources (AZURE_CLIENT_ID/AZURE_TENANT_ID/"
                "AZURE_CLIENT_SECRET, workload or managed identity, az login) or pass "
                "credential="
            ) from e
        except HttpResponseError as e:
            raise _arm_error(what, e, self.options.resource_group) from e
        except AzureError as e:  # no answer: a network error, a timeout
            raise driver.CloudError(f"{what} failed: {e}") from e

    async def _lro(self, what: str, begin: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Start a long-running operation and wait for its end, as ARM's protocol says."""

        async def run() -> Any:
            poller = await begin(*args)
            return await poller.result()

        try:
            return await asyncio.wait_for(self._arm(what, run()), self.operation_timeout)
        except asyncio.TimeoutError as e:
            raise driver.CloudError(f"{what}: not done within {self.operation_timeout:.0f}s") from e

    async def _gone(self, what: str, begin: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Delete; a resource that is already gone counts as deleted."""
        with contextlib.suppress(driver.NotFoundError):
            await self._lro(what, begin, *args)

    async def _plain_get(self, path: str, api_version: str) -> dict[str, Any]:
        """A GET outside the two management SDKs (subscriptions, resource groups)."""
        client = AsyncPipelineClient(
            base_url=self.resource_manager_url,
            policies=[
                AsyncRetryPolicy(),  # throttling (429) and transient 5xx, as in the SDKs
                AsyncARMChallengeAuthenticationPolicy(self._get_credential(), self._scope()),
            ],
            **self._transport_options(),
        )
        async with client:
            request = HttpRequest(
                "GET", f"{self.resource_manager_url}{path}?api-version={api_version}"
            )
            response = await self._arm(f"GET {path}", client.send_request(request))
            await response.read()
            if response.status_code >= 400:
                raise self._http_error(path, response)
            return response.json()

    def _http_error(self, path: str, response: Any) -> driver.CloudError:
        try:
            error = response.json().get("error") or {}
        except ValueError:
            error = {}
        code, message = error.get("code", response.status_code), error.get("message", "")
        if code == "ResourceGroupNotFound" or (
            response.status_code == 404 and "/resourcegroups/" in path.lower()
        ):
            return driver.NotFoundError(
                f"resource group {self.options.resource_group!r} does not exist in subscription "
                f"{self.subscription_id} ({message}). Create it first (az group create) or "
                "set resource_group to an existing one"
            )
        if response.status_code in (401, 403):
            return driver.ForbiddenError(
                f"Azure refused the request for {path} ({code}: {message}); check the "
                "identity's role on the subscription and resource group"
            )
        if response.status_code == 404:
            return driver.NotFoundError(f"GET {path}: not found ({code}: {message})")
        if response.status_code == 429:
            return driver.ThrottledError(f"GET {path}: throttled ({code}: {message})")
        return driver.CloudError(f"GET {path} failed: {code}: {message}")

    # -- before the first VM ------------------------------------------------------------

    async def _resolve_subscription(self) -> str:
        if self.subscription_id:
            return self.subscription_id
        answer = await self._plain_get("/subscriptions", "2022-12-01")
        enabled = [s for s in answer.get("value", []) if s.get("state") == "Enabled"]
        if len(enabled) != 1:
            names = ", ".join(f"{s['subscriptionId']} ({s.get('displayName')})" for s in enabled)
            raise driver.CloudError(
                "Which Azure subscription? The credential sees "
                f"{len(enabled)} enabled subscriptions{': ' + names if names else ''}. "
                "Set subscription_id (or AZURE_SUBSCRIPTION_ID)"
            )
        self.subscription_id = enabled[0]["subscriptionId"]
        return self.subscription_id

    def _cluster_tags(self, cluster_id: str, role: str | None = None) -> dict[str, str]:
        tags = {**self.tags, driver.CLUSTER_TAG: cluster_id}
        if role:
            tags["dask-secure-cloud-role"] = role
        return tags

    def gpus(self, role: Role) -> bool:
        return self.vm_sizes[role].lower() in self._gpu_sizes

    def interruption_notice(self, role: Role) -> driver.InterruptionNotice | None:
        """A Spot worker polls Scheduled Events for a ``Preempt`` event of its VM."""
        if role is not Role.WORKER or not self.options.worker_spot:
            return None
        return driver.InterruptionNotice(
            self.options.metadata_endpoint.rstrip("/") + _SCHEDULED_EVENTS,
            headers={"Metadata": "true"},
            must_contain='"Preempt"',
        )

    def where(self) -> str:
        return self.location or ""

    async def locate(self) -> None:
        """The subscription, and the resource group's location unless ``location`` is
        set; the group is read once (a missing one is refused here, naming the fix)."""
        if self._located:
            return
        await self._resolve_subscription()
        group = await self._plain_get(
            f"/subscriptions/{self.subscription_id}/resourcegroups/{self.options.resource_group}",
            "2021-04-01",
        )
        self.location = self.location or group["location"]
        self._located = True

    async def check_request(self, cluster_id: str) -> None:
        """The subscription, the resource group (and so the location), each role's VM
        size and the vCPU quota; whether the caller may give the scheduler its identity."""
        self._cluster_id = cluster_id
        await self.locate()
        await self._check_sizes()
        await self._check_quota()
        await self._decide_reaper()

    async def read_exits(self, cluster_id: str) -> Exits:
        """The given vnet's ways out (and the given NSG's rules), or those of the vnet the
        cluster makes: default outbound access, and a Standard public IP where given."""
        if self.options.network_security_group:
            await self._read_given_nsg()
        if self.options.vnet:
            return await self._use_given_network()
        return Exits(
            place=f"the subnet 'dask' of the cluster's vnet {_name(cluster_id, 'vnet')}",
            private="default outbound access",
            public=_PUBLIC_EXIT,
        )

    async def make_network(self, cluster_id: str) -> None:
        """The vnet and the NSGs, unless given; the scheduler's identity, where decided."""
        if not self.options.vnet:
            await self._make_network(cluster_id)
        if not self.options.network_security_group:
            await self._make_nsgs(cluster_id)
        if self._reaping:
            await self._make_reaper(cluster_id)

    # -- the scheduler's identity, which deletes the cluster when the lease ends -------

    # -- VMs ----------------------------------------------------------------------------

    async def create(self, request: driver.VMRequest) -> driver.VM:
        return await self.create_in(request, self.home_zone, self.spot(request.role))

    async def create_in(self, request: driver.VMRequest, zone: str | None, spot: bool) -> driver.VM:
        """One VM (regional, or in ``zone``), its interface and address. A refusal
        deletes what was made for it (ARM keeps a VM whose allocation failed, holding
        them) before it is raised; a quota refusal names the quota."""
        try:
            return await self._create(request, zone, spot)
        except Exception as e:  # a cancelled create is the sweep's to clean up
            with contextlib.suppress(driver.CloudError, OSError):
                await self.destroy(
                    driver.VM("", request.name, request.role, request.cluster_id, "")
                )
            if isinstance(e, driver.CloudError) and e.code == "OperationNotAllowed":
                raise await self._quota_refusal(e, request.role, spot) from e
            raise

    async def _create(self, request: driver.VMRequest, zone: str | None, spot: bool) -> driver.VM:
        compute, net = self._clients()
        assert self._subnet_id is not None
        role = request.role.value
        tags = {**self._cluster_tags(request.cluster_id, role), **request.tags}
        name = _name(request.cluster_id, request.name)
        public = self._public[request.role]
        public_ip = None
        if public:
            public_ip = await self._lro(
                f"creating the public address of {name}",
                net.public_ip_addresses.begin_create_or_update,
                self.options.resource_group,
                f"{name}-ip",
                nm.PublicIPAddress(
                    location=self.location,
                    tags=tags,
                    sku=nm.PublicIPAddressSku(name="Standard"),
                    public_ip_allocation_method="Static",
                    delete_option="Delete",
                ),
            )
        nic = await self._lro(
            f"creating the network interface of {name}",
            net.network_interfaces.begin_create_or_update,
            self.options.resource_group,
            f"{name}-nic",
            nm.NetworkInterface(
                location=self.location,
                tags=tags,
                network_security_group=nm.NetworkSecurityGroup(id=self._nsg_ids[request.role]),
                ip_configurations=[
                    nm.NetworkInterfaceIPConfiguration(
                        name="primary",
                        subnet=nm.Subnet(id=self._subnet_id),
                        private_ip_allocation_method="Dynamic",
                        public_ip_address=nm.PublicIPAddress(id=public_ip.id)
                        if public_ip
                        else None,
                    )
                ],
            ),
        )
        vm = zonal(
            vm_model(
                self.options,
                location=self.location,
                name=name,
                tags=tags,
                size=self.vm_sizes[request.role],
                user_data=request.user_data,
                login=self._login(),
                nic_id=nic.id,
                spot=spot,
                identity=self._identity(request.role),
            ),
            zone,
        )
        made = await self._lro(
            f"creating VM {name}",
            compute.virtual_machines.begin_create_or_update,
            self.options.resource_group,
            name,
            vm,
        )
        # The OS disk does not inherit the VM's tags; tag it so the sweep can find it.
        await self._lro(
            f"tagging the OS disk of {name}",
            compute.disks.begin_update,
            self.options.resource_group,
            f"{name}-osdisk",
            cm.DiskUpdate(tags=tags),
        )
        # The scheduler's identity may delete this VM and what is deleted with it.
        disk = made.storage_profile.os_disk.managed_disk.id if made.storage_profile else None
        scopes = [
            made.id,
            nic.id,
            *([disk] if disk else []),
            *([public_ip.id] if public_ip else []),
        ]
        await self._assign_roles(request.cluster_id, scopes)
        if request.role is Role.WORKER:
            self._workers[request.name] = made.id
        address = public_ip.ip_address if public_ip else None
        if public_ip is not None and not address and self._reachable(request.role):
            address = (
                await self._arm(
                    "reading a public address",
                    net.public_ip_addresses.get(self.options.resource_group, f"{name}-ip"),
                )
            ).ip_address
        return driver.VM(
            id=made.id,
            name=request.name,
            role=request.role,
            cluster_id=request.cluster_id,
            private_ip=nic.ip_configurations[0].private_ip_address,
            public_ip=address if self._reachable(request.role) else None,
        )

    def _reachable(self, role: Role) -> bool:
        """Whether a VM's public address is for reaching it: a public scheduler's is
        (the default). A private scheduler's only carries its traffic out, and the
        client, inside the user's virtual network, must use the private address the NSG
        admits it on."""
        return role is Role.WORKER or not self.network.use_private_ip

    def _login(self) -> str:
        if self._login_key is None:
            self._login_key = self.options.ssh_public_key or throwaway_ssh_key()
        return self._login_key

    async def destroy(self, vm: driver.VM) -> None:
        compute, net = self._clients()
        name = _name(vm.cluster_id, vm.name)
        self._workers.pop(vm.name, None)
        # Its role assignments first, while their scopes exist: each counts against the
        # subscription's limit of role assignments until it is deleted.
        await self._unassign_roles(vm.cluster_id, self._vm_scopes(vm.cluster_id, vm.name))
        await self._gone(
            f"deleting VM {name}",
            compute.virtual_machines.begin_delete,
            self.options.resource_group,
            name,
        )
        # deleteOption=Delete removes these with the VM; make sure of it, by their names,
        # which only this VM of this cluster uses.
        await self._gone(
            f"deleting {name}-nic",
            net.network_interfaces.begin_delete,
            self.options.resource_group,
            f"{name}-nic",
        )
        await self._gone(
            f"deleting {name}-ip",
            net.public_ip_addresses.begin_delete,
            self.options.resource_group,
            f"{name}-ip",
        )
        await self._gone(
            f"deleting {name}-osdisk",
            compute.disks.begin_delete,
            self.options.resource_group,
            f"{name}-osdisk",
        )

    async def console_output(self, vm: driver.VM) -> str:
        """The serial console log, fetched through boot diagnostics' short-lived SAS URI."""
        compute, _ = self._clients()
        try:
            uris = await self._arm(
                "reading boot diagnostics",
                compute.virtual_machines.retrieve_boot_diagnostics_data(
                    self.options.resource_group,
                    _name(vm.cluster_id, vm.name),
                    sas_uri_expiration_time_in_minutes=5,
                ),
            )
        except driver.CloudError as e:
            logger.debug("no boot diagnostics for %s: %s", vm.name, e)
            return ""
        if not uris.serial_console_log_blob_uri:
            return ""
        # A SAS URI carries its own authorisation; no Azure token goes to the blob store.
        client = AsyncPipelineClient(
            base_url=uris.serial_console_log_blob_uri, **self._transport_options()
        )
        async with client:
            try:
                response = await client.send_request(
                    HttpRequest("GET", uris.serial_console_log_blob_uri), stream=True
                )
                await response.read()
            except AzureError as e:
                logger.debug("could not read the console log of %s: %s", vm.name, e)
                return ""
            return response.text() if response.status_code == 200 else ""

    async def release(self, cluster_id: str) -> None:
        """Delete, by the cluster tag, every NIC, public address, disk, NSG and vnet the
        cluster made; a user's own vnet and NSG carry no such tag and stay."""
        if self.subscription_id is None:
            return
        compute, net = self._clients()
        group = self.options.resource_group
        # In this order: a NIC holds its address, NSG and subnet; an NSG or a vnet may
        # still be referenced for a while by a NIC just deleted, hence the retry.
        kinds = (
            ("network interfaces", net.network_interfaces, "list", self._gone),
            ("public addresses", net.public_ip_addresses, "list", self._gone),
            ("disks", compute.disks, "list_by_resource_group", self._gone),
            ("network security groups", net.network_security_groups, "list", self._in_use_retry),
            ("virtual networks", net.virtual_networks, "list", self._in_use_retry),
        )
        for kind, operations, list_method, delete in kinds:
            pager = getattr(operations, list_method)(group)
            for resource in await self._tagged(f"listing {kind}", pager, cluster_id):
                name = resource.name
                await delete(f"deleting {name}", operations.begin_delete, group, name)
        await self._release_identities(cluster_id)

    async def _in_use_retry(
        self, what: str, begin: Callable[..., Awaitable[Any]], *args: Any
    ) -> None:
        """Delete; ARM refuses (an in-use error code, see ``_IN_USE_CODES``) while a
        just-deleted NIC still holds a reference."""
        await self.delete_when_free(
            lambda: self._gone(what, begin, *args), what, interval=self.polling_interval
        )

    async def close(self) -> None:
        for client in (self._compute, self._net, self._msi, self._auth):
            if client is not None:
                await client.close()
        self._compute = self._net = self._msi = self._auth = None
        if self._credential is not None and self._given_credential is None:
            await self._credential.close()  # type: ignore[attr-defined]
        self._credential = self._given_credential
