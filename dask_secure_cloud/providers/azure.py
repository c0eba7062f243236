"""``AzureVMCluster``: a secure Dask cluster on Azure VMs, through the async management SDKs.

What is particular to Azure: every resource lives in a resource group the user owns, and
a VM is several resources (NIC, OS disk, public address) that each carry the cluster tag
and are deleted with the VM (``deleteOption=Delete``) and, should one survive, by the tag
sweep in :meth:`AzureDriver.release`. The network is private first: before anything is
made, the subnet's ways out (a NAT gateway, a route to a firewall, default outbound
access) are read, and a VM gets a public address only where it needs one to reach a
registry or where ``use_private_ip=False`` (the default: the client is outside Azure)
asks for one for the scheduler (``egress.public_address``). A private scheduler needs
the client inside ``vnet``: on a vnet the cluster makes itself, none can be, and that
combination is refused before anything is made.
Whatever addresses they get, two per-cluster network security groups keep them closed:
the scheduler's admits its port and dashboard from the creator's address only, the
workers' admits nothing from outside the subnet, and both the Dask ports within it.

A VM whose OS powers off is "Stopped" and keeps billing, so unless told otherwise
(``delete_on_lease_end``) the scheduler VM carries a managed identity made for the
cluster, with Contributor on each VM, NIC, OS disk and public address the cluster makes
and nothing else; when its lease ends it deletes the workers and then itself
(``azure_reaper.py``). A caller who may not assign roles gets a warning (or, with
``delete_on_lease_end=True``, an error) before anything is made.

Credentials come from ``azure-identity``'s ``DefaultAzureCredential`` (or the credential
passed in) and never reach a VM; the subscription from the option, the dask config,
``AZURE_SUBSCRIPTION_ID`` or, when the credential sees exactly one, from the credential.
Nothing shells out to ``az``. VMs get no password and, unless ``ssh_public_key`` is
given, an SSH key whose private half is thrown away: no login at all.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import difflib
import ipaddress
import logging
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .. import driver, preloads
from ..cloudinit import LIMITS
from ..cluster import VMCluster
from ..credentials import Role
from ..egress import Exits, NoRouteOutError, decide_public_addresses
from ..errors import OptionError
from ..network import NetworkPolicy
from ..options import AzureOptions

try:
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
    from azure.mgmt.authorization.models import RoleAssignmentCreateParameters
    from azure.mgmt.compute import models as cm
    from azure.mgmt.compute.aio import ComputeManagementClient
    from azure.mgmt.core.policies import AsyncARMChallengeAuthenticationPolicy
    from azure.mgmt.core.tools import is_valid_resource_id, parse_resource_id
    from azure.mgmt.msi.aio import ManagedServiceIdentityClient
    from azure.mgmt.msi.models import Identity
    from azure.mgmt.network import models as nm
    from azure.mgmt.network.aio import NetworkManagementClient
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError(
        "AzureVMCluster needs the azure extra: pip install 'dask-secure-cloud[azure]'"
    ) from e

__all__ = ["CLOUDS", "AzureDriver", "AzureVMCluster"]

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
#: What a VM with a Standard public address goes out through (ARM names no resource
#: for it: the address itself is the way out).
_PUBLIC_EXIT = "a Standard public IP"
#: Next hops of a 0.0.0.0/0 route that send internet traffic to a box of the user's (a
#: firewall, a VPN or ExpressRoute gateway), assumed to lead out: ARM cannot tell.
_APPLIANCES = {
    "virtualappliance": "virtual appliance",
    "virtualapplianceecmp": "virtual appliances",
    "virtualnetworkgateway": "virtual network gateway",
}

T = TypeVar("T")

#: Azure's built-in "Contributor" role: everything on the scope it is assigned at, but no
#: role assignment (its NotActions exclude ``Microsoft.Authorization/*/Write`` and
#: ``/Delete``). Assigned at each VM, NIC, OS disk and public address the cluster makes,
#: and nowhere else, it lets the scheduler's identity delete those alone. Roles exist
#: for narrower sets of actions, but none lets delete a public address (Virtual Machine
#: Contributor has only ``publicIPAddresses/join/action`` and ``read``), and a custom
#: role needs ``roleDefinitions/write`` at a wider scope.
_CONTRIBUTOR = "b24988ac-6180-42a0-ab88-20f7382dd24c"
#: What the caller needs, on the resource group, to give the scheduler that identity:
#: make the identity, attach it to a VM, and assign its roles.
_REAPER_ACTIONS = (
    "Microsoft.ManagedIdentity/userAssignedIdentities/write",
    "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action",
    "Microsoft.Authorization/roleAssignments/write",
)
#: ARM's code for a role assignment to a principal Entra ID has not replicated yet (a
#: managed identity made seconds ago): "Assign Azure roles using the REST API" says to
#: set ``principalType`` for new service principals, and to retry.
_PRINCIPAL_NOT_FOUND = "PrincipalNotFound"
#: ARM's code for a role assignment that exists already (same principal, role, scope).
_ASSIGNMENT_EXISTS = "RoleAssignmentExists"


#: One certificate of a PEM bundle, without the comments bundles carry between them.
_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----\r?\n?"
)


def _grants(permissions: list[Any], action: str) -> bool:
    """Whether any of the caller's permission entries (each: actions less notActions,
    with ``*`` wildcards, case-insensitive, as ``Permissions - List For Resource Group``
    returns them) allows ``action``."""

    def matches(pattern: str) -> bool:
        regex = ".*".join(re.escape(part) for part in pattern.split("*"))
        return re.fullmatch(regex, action, re.IGNORECASE) is not None

    return any(
        any(matches(a) for a in p.actions or [])
        and not any(matches(n) for n in p.not_actions or [])
        for p in permissions
    )


def _assignment_name(cluster_id: str, scope: str) -> str:
    """A role assignment's name (a GUID, as ARM wants), the same for the same cluster and
    scope whoever computes it: ``destroy`` deletes a VM's assignments without a listing."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dask-secure-cloud:{cluster_id}:{scope.lower()}"))


#: ARM error codes of a delete refused because another resource still uses the target
#: (a NIC held by a VM being deleted, an NSG or subnet by such a NIC, an address by a NIC
#: or NAT gateway). Deleting again a little later succeeds.
_IN_USE_CODES = frozenset(
    {
        "InUseNetworkSecurityGroupCannotBeDeleted",
        "InUseSubnetCannotBeDeleted",
        "InUseNatGatewayCannotBeDeleted",
        "InUseRouteTableCannotBeDeleted",
        "NicInUse",
        "NicReservedForAnotherVm",
        "PublicIPAddressCannotBeDeleted",
        "PublicIPAddressInUse",
    }
)
#: ARM's codes for "the identity may not do this".
_FORBIDDEN_CODES = frozenset({"AuthorizationFailed", "LinkedAuthorizationFailed"})
#: ARM's codes for an exhausted quota (a VM create answers ``OperationNotAllowed`` too,
#: which is not always a quota: the advice below says both).
_QUOTA_CODES = frozenset({"QuotaExceeded", "ResourceQuotaExceeded"})


def _error_code(error: HttpResponseError) -> str:
    return getattr(error.error, "code", None) or str(error.status_code or "")


def _explain(what: str, error: HttpResponseError, resource_group: str) -> str:
    """Turn an ARM error into a sentence that names the option to change, from its code
    and target (never its message text, which is only quoted)."""
    code = _error_code(error)
    message = getattr(error.error, "message", None) or str(error.message or error)
    target = getattr(error.error, "target", None)
    if code == "ResourceGroupNotFound":
        return (
            f"{what}: resource group {resource_group!r} does not exist ({message}). "
            "Create it first (az group create) or set resource_group to an existing one"
        )
    if code in _FORBIDDEN_CODES:
        return (
            f"{what}: the Azure identity may not do this ({message}). Give it the role "
            "described in the AzureVMCluster documentation on the resource group"
        )
    if code in _QUOTA_CODES:
        return (
            f"{what}: the subscription's quota is exhausted ({code}: {message}). Ask for a "
            "quota increase, or use fewer workers or a smaller worker_vm_size"
        )
    if code == "OperationNotAllowed":
        return (
            f"{what}: Azure does not allow this ({code}: {message}). Where it names a "
            "quota: ask for a quota increase, or use fewer workers or a smaller "
            "worker_vm_size"
        )
    if code in ("SkuNotAvailable", "InvalidTemplateDeployment") or target == "vmSize":
        return (
            f"{what}: {code}: {message}. Choose another VM size (scheduler_vm_size, worker_vm_size)"
        )
    return f"{what} failed: {code}: {message}"


def _arm_error(what: str, error: HttpResponseError, resource_group: str) -> driver.CloudError:
    """An ARM error as the shared kind its status code or error code says."""
    message = _explain(what, error, resource_group)
    code = _error_code(error)
    if error.status_code == 429:
        return driver.ThrottledError(message)
    if code in _IN_USE_CODES:
        return driver.InUseError(message)
    if error.status_code == 404:
        return driver.NotFoundError(message)
    if error.status_code in (401, 403) or code in _FORBIDDEN_CODES:
        return driver.ForbiddenError(message)
    return driver.CloudError(message)


def _check_client_can_reach(options: AzureOptions, network: NetworkPolicy) -> None:
    """Refuse, before any call, a private scheduler on a vnet the cluster makes itself.

    The client reaches a private scheduler only from inside its virtual network (or one
    peered to it, or over a VPN); a vnet made for the cluster is brand new, nothing is
    inside it or peered to it, so the start could only time out."""
    if network.use_private_ip and not options.vnet:
        raise OptionError(
            "use_private_ip=True with vnet=None cannot work: the cluster would make a new "
            "virtual network, and no client can be inside a network that does not exist "
            "yet, so nothing could reach the scheduler's private address. Either leave "
            "use_private_ip=False (the default: the scheduler gets a public address that "
            "its network security group opens only to this machine's address, or to "
            "allowed_cidrs), or set vnet= (and subnet=) to a virtual network this client "
            "runs in or reaches (peering, VPN, ExpressRoute)"
        )


def _may_admit(nsg: nm.NetworkSecurityGroup, source: str, port: int) -> bool:
    """Whether any inbound allow rule of ``nsg`` could let ``source`` (a CIDR) in on TCP
    ``port``. Deny rules and priorities are not weighed: this only finds an NSG that
    certainly shuts the client out, and never refuses one that might not."""
    network = ipaddress.ip_network(source, strict=False)

    def from_source(prefix: str) -> bool:
        if prefix in ("*", "Internet", "0.0.0.0/0"):
            return True
        try:
            return network.overlaps(ipaddress.ip_network(prefix, strict=False))
        except (ValueError, TypeError):  # another service tag, or IPv6 against IPv4
            return False

    def to_port(entry: str) -> bool:
        low, _, high = entry.partition("-")
        return entry == "*" or (low.isdigit() and int(low) <= port <= int(high or low))

    for rule in nsg.security_rules or []:
        if (rule.direction or "").lower() != "inbound" or (rule.access or "").lower() != "allow":
            continue
        if (rule.protocol or "*").lower() not in ("*", "tcp"):
            continue
        prefixes = rule.source_address_prefixes or [rule.source_address_prefix or ""]
        ports = rule.destination_port_ranges or [rule.destination_port_range or ""]
        if any(from_source(p) for p in prefixes) and any(to_port(p) for p in ports):
            return True
    return False


def _name(cluster_id: str, part: str) -> str:
    return f"{cluster_id}-{part}"


def throwaway_ssh_key() -> str:
    """An Ed25519 public key whose private half is never kept: Azure wants a login
    credential for Linux VMs, and this one opens nothing."""
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


#: Power states of a VM whose OS shut down (or that was deallocated).
#: A VM in these power states ended by itself (its OS shut down) or was deallocated, but
#: still exists: stopped, its compute still bills; either way its disk, NIC and public
#: address do, until the VM and they are deleted.
_STOPPED = frozenset({"PowerState/stopped", "PowerState/deallocated", "PowerState/deallocating"})


class AzureDriver(driver.Driver):
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

    def _clients(self) -> tuple[ComputeManagementClient, NetworkManagementClient]:
        if self._compute is None or self._net is None:
            assert self.subscription_id is not None
            options = {
                "base_url": self.resource_manager_url,
                "credential_scopes": [self._scope()],
                "polling_interval": self.polling_interval,
                **self._transport_options(),
            }
            credential = self._get_credential()
            self._compute = ComputeManagementClient(credential, self.subscription_id, **options)
            self._net = NetworkManagementClient(credential, self.subscription_id, **options)
        return self._compute, self._net

    def _identity_clients(
        self,
    ) -> tuple[ManagedServiceIdentityClient, AuthorizationManagementClient]:
        if self._msi is None or self._auth is None:
            assert self.subscription_id is not None
            options = {
                "base_url": self.resource_manager_url,
                "credential_scopes": [self._scope()],
                "polling_interval": self.polling_interval,
                **self._transport_options(),
            }
            credential = self._get_credential()
            self._msi = ManagedServiceIdentityClient(credential, self.subscription_id, **options)
            self._auth = AuthorizationManagementClient(credential, self.subscription_id, **options)
        return self._msi, self._auth

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

    async def prepare(self, cluster_id: str) -> None:
        self._cluster_id = cluster_id
        await self._resolve_subscription()
        group = await self._plain_get(
            f"/subscriptions/{self.subscription_id}/resourcegroups/{self.options.resource_group}",
            "2021-04-01",
        )
        self.location = self.location or group["location"]
        await self._check_sizes()
        await self._check_quota()
        # Read-only until every check has passed: a refusal leaves nothing behind.
        if self.options.vnet:
            exits = await self._use_given_network()
        else:
            exits = Exits(
                place=f"the subnet 'dask' of the cluster's vnet {_name(cluster_id, 'vnet')}",
                private="default outbound access",
                public=_PUBLIC_EXIT,
            )
        if self.options.network_security_group:
            await self._read_given_nsg()
        self._decide_public(exits)
        await self._decide_reaper()

        if not self.options.vnet:
            await self._make_network(cluster_id)
        if not self.options.network_security_group:
            await self._make_nsgs(cluster_id)
        if self._reaping:
            await self._make_reaper(cluster_id)

    # -- the scheduler's identity, which deletes the cluster when the lease ends -------

    async def _decide_reaper(self) -> None:
        """Whether the caller may give the scheduler its identity (``_REAPER_ACTIONS`` on
        the resource group), read before anything is made: ``delete_on_lease_end=True``
        without them is refused; ``None`` goes on without, and says so."""
        if not self._reaping:
            return
        _, auth = self._identity_clients()
        group = self.options.resource_group

        async def collect() -> list[Any]:
            return [p async for p in auth.permissions.list_for_resource_group(group)]

        try:
            permissions = await self._arm("reading this identity's permissions", collect())
        except driver.ForbiddenError as e:
            logger.info("Could not read this identity's permissions: %s", e)
            missing = ["Microsoft.Authorization/permissions/read"]
        else:
            missing = [a for a in _REAPER_ACTIONS if not _grants(permissions, a)]
        if not missing:
            return
        consequence = (
            "when the lease ends (a killed client), the cluster's VMs would only stop, "
            "and Azure keeps billing a stopped VM's compute, disk and address until "
            "'dask secure-cloud cleanup' deletes them"
        )
        grant = (
            f"give this identity {', '.join(missing)} on resource group {group!r} (Owner "
            "has them all; Contributor lacks roleAssignments/write, which Role Based "
            "Access Control Administrator or User Access Administrator adds)"
        )
        if self.options.delete_on_lease_end:
            raise OptionError(
                f"delete_on_lease_end=True needs an identity that may assign roles: "
                f"without it {consequence}. Nothing was created. Fix: {grant}, or set "
                "delete_on_lease_end=False"
            )
        logger.warning(
            "Not giving the scheduler an identity to delete the cluster's VMs when its "
            "lease ends (delete_on_lease_end=None): this identity lacks %s on resource "
            "group %r, so %s. To have it, %s; to silence this warning, set "
            "delete_on_lease_end=False",
            ", ".join(missing),
            group,
            consequence,
            grant,
        )
        self._reaping = False

    async def _make_reaper(self, cluster_id: str) -> None:
        """The scheduler's identity: made for this cluster, tagged with it, and given a
        role only where :meth:`create` assigns one (each VM, NIC, disk and address)."""
        msi, _ = self._identity_clients()
        made = await self._arm(
            "creating the scheduler's managed identity",
            msi.user_assigned_identities.create_or_update(
                self.options.resource_group,
                _name(cluster_id, "scheduler-identity"),
                Identity(location=self.location, tags=self._cluster_tags(cluster_id)),
            ),
        )
        self._reaper = (made.id, made.client_id, made.principal_id)

    async def _assign_roles(self, cluster_id: str, scopes: list[str]) -> None:
        """Contributor for the scheduler's identity at each of ``scopes``, and nowhere
        else, all at once."""
        if self._reaper is not None:
            await asyncio.gather(*(self._assign_role(cluster_id, scope) for scope in scopes))

    async def _assign_role(self, cluster_id: str, scope: str) -> None:
        """One role assignment, named for the cluster and scope. A brand-new identity may
        not have replicated yet (``PrincipalNotFound``, even with ``principalType`` set):
        waited out, within the operation timeout; one that exists already is done."""
        assert self._reaper is not None
        _, auth = self._identity_clients()
        parameters = RoleAssignmentCreateParameters(
            role_definition_id=(
                f"/subscriptions/{self.subscription_id}/providers/Microsoft.Authorization/"
                f"roleDefinitions/{_CONTRIBUTOR}"
            ),
            principal_id=self._reaper[2],
            principal_type="ServicePrincipal",
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.operation_timeout
        while True:
            try:
                await self._arm(
                    f"assigning the scheduler's identity a role on {scope}",
                    auth.role_assignments.create(
                        scope, _assignment_name(cluster_id, scope), parameters
                    ),
                )
                return
            except driver.CloudError as e:
                cause = e.__cause__
                code = _error_code(cause) if isinstance(cause, HttpResponseError) else ""
                if code == _ASSIGNMENT_EXISTS:
                    return
                if code != _PRINCIPAL_NOT_FOUND or loop.time() > deadline:
                    raise
                await asyncio.sleep(self.polling_interval)

    async def _unassign_roles(self, cluster_id: str, scopes: list[str]) -> None:
        if self._reaper is None:
            return
        _, auth = self._identity_clients()
        for scope in scopes:
            with contextlib.suppress(driver.NotFoundError):
                await self._arm(
                    f"deleting the scheduler's role on {scope}",
                    auth.role_assignments.delete(scope, _assignment_name(cluster_id, scope)),
                )

    def _scheduler_vm_id(self) -> str:
        cluster_id = self._cluster_id or "dsc-00000000"
        subscription = self.subscription_id or "00000000-0000-0000-0000-000000000000"
        return (
            f"/subscriptions/{subscription}/resourceGroups/{self.options.resource_group}"
            f"/providers/Microsoft.Compute/virtualMachines/{_name(cluster_id, 'scheduler')}"
        )

    def lease_end(self) -> str:
        """With the scheduler's identity: ``azure_reaper.py``, which deletes the workers
        the last renewal named, then the scheduler's own VM. Before :meth:`prepare` (the
        user-data size check) with placeholders of the same length."""
        if not self._reaping:
            return ""
        client_id = self._reaper[1] if self._reaper else "00000000-0000-0000-0000-000000000000"
        return preloads.shipped_module(
            "azure_reaper.py",
            {
                "arm": self.resource_manager_url,
                "metadata": self.options.metadata_endpoint,
                "client_id": client_id,
                "scheduler": self._scheduler_vm_id(),
                "ca_pem": self._ca_pem,
                "patience": 600,
            },
        )

    def lease_arguments(self) -> dict[str, Any]:
        """The worker VMs' resource ids, for :meth:`lease_end`, with each renewal."""
        if self._reaper is None:
            return {}
        return {"resources": list(self._workers.values())}

    async def _make_network(self, cluster_id: str) -> None:
        _, net = self._clients()
        vnet = await self._lro(
            "creating the cluster's virtual network",
            net.virtual_networks.begin_create_or_update,
            self.options.resource_group,
            _name(cluster_id, "vnet"),
            nm.VirtualNetwork(
                location=self.location,
                tags=self._cluster_tags(cluster_id),
                address_space=nm.AddressSpace(address_prefixes=[self.options.address_prefix]),
                subnets=[
                    nm.Subnet(
                        name="dask",
                        address_prefix=self.options.address_prefix,
                        # Since API version 2025-07-01 a new subnet is private unless
                        # told otherwise: this one keeps Azure's free way out, so VMs
                        # without public addresses still pull their image. A NAT
                        # gateway is the production answer (see the docs).
                        default_outbound_access=True,
                    )
                ],
            ),
        )
        self._subnet_id = vnet.subnets[0].id
        self._subnet_prefixes = [self.options.address_prefix]

    async def _read_given_nsg(self) -> None:
        _, net = self._clients()
        assert self.options.network_security_group is not None
        nsg_id = self._resource_id(
            "Microsoft.Network/networkSecurityGroups", self.options.network_security_group
        )
        nsg = await self._arm(
            "reading network_security_group",
            net.network_security_groups.get(*self._group_and_name(nsg_id)),
        )
        self._nsg_ids = dict.fromkeys(Role, nsg_id)
        if self.network.use_private_ip:
            return  # the client is inside the vnet: what the NSG admits there is the user's

        async def unused() -> list[str]:
            return []

        port = self.ports[0]
        sources = await self.network.scheduler_sources(unused)
        shut_out = [s for s in sources if not _may_admit(nsg, s, port)]
        if shut_out:
            raise OptionError(
                f"network_security_group {self.options.network_security_group!r} has no "
                f"inbound rule allowing TCP port {port} from {', '.join(shut_out)}: the "
                "client connects to the scheduler's public address through it "
                "(use_private_ip=False) and could only time out. Nothing was created. Fix "
                f"with one of: (1) add such a rule to that NSG; (2) "
                "network_security_group=None (the cluster makes NSGs that admit this "
                "machine's address, or allowed_cidrs); (3) use_private_ip=True if this "
                "client runs inside the vnet"
            )

    def _decide_public(self, exits: Exits) -> None:
        """Whether each role's VMs get a public address, from the subnet's ways out, or
        :class:`~dask_secure_cloud.egress.NoRouteOutError` before anything is made."""
        fixes = self._fixes(exits)
        self._public = decide_public_addresses(
            exits,
            use_private_ip=self.network.use_private_ip,
            worker_public_ip=self.worker_public_ip,
            offline_image=self.offline_image,
            fixes=lambda role: fixes,
            logger=logger,
        )
        if not self.network.use_private_ip and exits.public is None:
            # The scheduler's public address would take the client's connection, but
            # its replies would follow the subnet's route table, which drops them.
            raise NoRouteOutError(
                f"use_private_ip=False and {exits.place}: the scheduler's public address "
                "could not answer this client. Nothing was created. Fix with one of: "
                "(1) subnet=<a subnet without a 0.0.0.0/0 route to None>; (2) "
                "use_private_ip=True if this client runs inside the virtual network (or "
                "reaches it by peering or VPN)"
            )

    def _fixes(self, exits: Exits) -> list[str]:
        """Azure's own remedies for a subnet with no way out, as options to paste."""
        where = f"of vnet {self.options.vnet!r} " if self.options.vnet else ""
        fixes = [
            f"subnet=<a subnet {where}with a NAT gateway (natGateway), or whose route table "
            "sends 0.0.0.0/0 to a firewall>",
            "vnet=None (the cluster makes its own vnet, with default outbound access)",
        ]
        if exits.public is not None:
            fixes.append(
                "worker_public_ip=True (a Standard public IP per worker, about $0.005 per "
                "hour; the cluster's network security group keeps inbound closed)"
            )
        return fixes

    async def _make_nsgs(self, cluster_id: str) -> None:
        """One NSG for the scheduler, one for the workers: only the scheduler's admits
        anyone from outside the subnet (the creator, on the scheduler's two ports), so a
        worker with a public address accepts nothing from outside the cluster's subnet."""
        _, net = self._clients()

        async def inside() -> list[str]:
            return list(self._subnet_prefixes)

        sources = await self.network.scheduler_sources(inside)
        client_rule = nm.SecurityRule(
            name="dask-scheduler-from-client",
            priority=100,
            direction="Inbound",
            access="Allow",
            protocol="Tcp",
            source_address_prefixes=sources,
            source_port_range="*",
            destination_address_prefix="*",
            destination_port_ranges=[str(p) for p in self.ports],
        )
        for role, extra in ((Role.SCHEDULER, [client_rule]), (Role.WORKER, [])):
            nsg = await self._lro(
                f"creating the cluster's network security group for the {role.value}s",
                net.network_security_groups.begin_create_or_update,
                self.options.resource_group,
                _name(cluster_id, f"{role.value}-nsg"),
                nm.NetworkSecurityGroup(
                    location=self.location,
                    tags=self._cluster_tags(cluster_id),
                    security_rules=[*extra, *self._closed_rules()],
                ),
            )
            self._nsg_ids[role] = nsg.id

    def _closed_rules(self) -> list[nm.SecurityRule]:
        """The Dask ports within the subnet, and nothing else inbound."""
        return [
            nm.SecurityRule(
                name="dask-within-subnet",
                priority=110,
                direction="Inbound",
                access="Allow",
                protocol="*",
                source_address_prefixes=self._subnet_prefixes,
                source_port_range="*",
                destination_address_prefixes=self._subnet_prefixes,
                destination_port_range="*",
            ),
            # Azure's defaults let the whole virtual network (and peered ones) and the
            # load balancer's probes in; this cluster admits only what is named above.
            nm.SecurityRule(
                name="deny-everything-else",
                priority=4096,
                direction="Inbound",
                access="Deny",
                protocol="*",
                source_address_prefix="*",
                source_port_range="*",
                destination_address_prefix="*",
                destination_port_range="*",
            ),
        ]

    def _resource_id(self, kind: str, name_or_id: str) -> str:
        if is_valid_resource_id(name_or_id):
            return name_or_id
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.options.resource_group}"
            f"/providers/{kind}/{name_or_id}"
        )

    @staticmethod
    def _group_and_name(resource_id: str) -> tuple[str, str]:
        parts = parse_resource_id(resource_id)
        return parts["resource_group"], parts["name"]

    async def _use_given_network(self) -> Exits:
        """Find the given subnet and read its ways out (GETs only)."""
        _, net = self._clients()
        assert self.options.vnet is not None
        vnet_id = self._resource_id("Microsoft.Network/virtualNetworks", self.options.vnet)
        group, name = self._group_and_name(vnet_id)
        vnet = await self._arm("reading vnet", net.virtual_networks.get(group, name))
        subnets = {s.name: s for s in vnet.subnets or []}
        wanted = self.options.subnet or next(iter(subnets), None)
        if wanted not in subnets:
            close = difflib.get_close_matches(str(wanted), sorted(subnets), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" It has: {sorted(subnets)}"
            raise driver.CloudError(f"subnet {wanted!r} is not a subnet of vnet {name!r}.{hint}")
        subnet = subnets[wanted]
        self._subnet_id = subnet.id
        self._subnet_prefixes = list(subnet.address_prefixes or [subnet.address_prefix])
        return await self._subnet_exits(f"subnet {wanted} of vnet {name}", subnet)

    async def _subnet_exits(self, place: str, subnet: nm.Subnet) -> Exits:
        """The ways out of a user's subnet, in the order Azure uses them: its route
        table's 0.0.0.0/0 route, then its NAT gateway, then default outbound access.

        ``defaultOutboundAccess`` absent counts as true: subnets made before API version
        2025-07-01 have it unset and keep Azure's default outbound access; newer API
        versions write ``false`` on every new subnet. A Standard public IP on a NIC is
        a way out whatever the subnet says, unless the route table drops internet
        traffic (next hop ``None``)."""
        default_route = await self._default_route(subnet)
        if default_route is not None:
            table, hop, address = default_route
            if hop == "none":
                return Exits(f"{place} (route table {table} drops 0.0.0.0/0)", None, None)
            if hop in _APPLIANCES:
                private = (
                    f"route table {table}: 0.0.0.0/0 to {_APPLIANCES[hop]} {address or ''}"
                    " (assumed to lead out)"
                ).replace("  ", " ")
                return Exits(place, private, _PUBLIC_EXIT)
        if subnet.nat_gateway is not None and subnet.nat_gateway.id:
            return Exits(place, await self._nat_exit(subnet.nat_gateway.id), _PUBLIC_EXIT)
        if subnet.default_outbound_access is not False:
            return Exits(place, "default outbound access (being retired by Azure)", _PUBLIC_EXIT)
        return Exits(place, None, _PUBLIC_EXIT)

    async def _default_route(self, subnet: nm.Subnet) -> tuple[str, str, str | None] | None:
        """(route table, next hop type in lower case, next hop address) of the subnet's
        0.0.0.0/0 route, or None when Azure's system route to the internet applies."""
        if subnet.route_table is None or not subnet.route_table.id:
            return None
        _, net = self._clients()
        group, name = self._group_and_name(subnet.route_table.id)
        table = await self._arm(
            f"reading route table {name} of the subnet", net.route_tables.get(group, name)
        )
        for route in table.routes or []:
            if route.address_prefix == "0.0.0.0/0":
                # A str enum: lower() reads its value, where str() would give its name.
                hop = (route.next_hop_type or "").lower()
                return name, hop, route.next_hop_ip_address
        return None

    async def _nat_exit(self, nat_id: str) -> str | None:
        """``"NAT gateway <name>"``, or None for one with no public IPv4 address or
        prefix, which translates nothing."""
        _, net = self._clients()
        group, name = self._group_and_name(nat_id)
        nat = await self._arm(
            f"reading NAT gateway {name} of the subnet", net.nat_gateways.get(group, name)
        )
        if nat.public_ip_addresses or nat.public_ip_prefixes:
            return f"NAT gateway {name}"
        logger.info("NAT gateway %s has no public IPv4 address: not a way out", name)
        return None

    async def _check_sizes(self) -> None:
        compute, _ = self._clients()
        offered: dict[str, Any] = {}

        async def collect() -> None:
            async for sku in compute.resource_skus.list(filter=f"location eq '{self.location}'"):
                if sku.resource_type == "virtualMachines":
                    offered[sku.name.lower()] = sku

        await self._arm(f"listing the VM sizes of {self.location}", collect())
        if not offered:
            raise driver.CloudError(
                f"location {self.location!r} offers no VM sizes to this subscription; "
                "check location (for example 'westeurope')"
            )
        for role, size in self.vm_sizes.items():
            sku = offered.get(size.lower())
            if sku is None:
                names = sorted(s.name for s in offered.values())
                close = difflib.get_close_matches(size, names, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise driver.CloudError(
                    f"{role.value}_vm_size {size!r} is not offered in {self.location}.{hint}"
                )
            if any(r.reason_code == "NotAvailableForSubscription" for r in sku.restrictions or []):
                raise driver.CloudError(
                    f"{role.value}_vm_size {size!r} is restricted for this subscription in "
                    f"{self.location}; choose another size or location"
                )
            capabilities = {c.name: c.value for c in sku.capabilities or []}
            if capabilities.get("GPUs", "0") not in ("0", "", None):
                self._gpu_sizes.add(size.lower())
            vcpus = capabilities.get("vCPUs", "")
            if vcpus and vcpus.isdigit():
                self._size_quota[role] = (int(vcpus), sku.family)

    def _vcpus_needed(self) -> dict[str, int]:
        """vCPUs the scheduler and the initial workers take from each quota: the regional
        total (``cores``) and the size's family, or the regional Spot quota
        (``lowPriorityCores``) for Spot workers."""
        needed: dict[str, int] = {}
        plan = [
            (Role.SCHEDULER, 1, False),
            (Role.WORKER, self.initial_workers, self.options.worker_spot),
        ]
        for role, count, spot in plan:
            if role not in self._size_quota or count == 0:
                continue
            vcpus, family = self._size_quota[role]
            quotas = ["lowPriorityCores"] if spot else ["cores", *([family] if family else [])]
            for quota in quotas:
                needed[quota] = needed.get(quota, 0) + vcpus * count
        return needed

    async def _check_quota(self) -> None:
        """Refuse a start the subscription's vCPU quotas cannot hold, before anything is
        made. An identity without ``Microsoft.Compute/locations/usages/read`` skips the
        check: the VM create then fails with Azure's own quota error, and is cleaned up."""
        needed = self._vcpus_needed()
        if not needed:
            return
        compute, _ = self._clients()
        usages: dict[str, Any] = {}

        async def collect() -> bool:
            try:
                async for usage in compute.usage.list(str(self.location)):
                    if usage.name and usage.name.value:
                        usages[usage.name.value.lower()] = usage
            except HttpResponseError as e:
                if e.status_code != 403:
                    raise
                logger.info("Not checking vCPU quotas: %s", e.message)
                return False
            return True

        if not await self._arm("reading the vCPU quotas", collect()):
            return
        for quota, vcpus in needed.items():
            usage = usages.get(quota.lower())
            if usage is None:
                continue
            free = usage.limit - usage.current_value
            if vcpus > free:
                name = usage.name.localized_value or usage.name.value
                raise driver.CloudError(
                    f"this cluster needs {vcpus} vCPUs of the {name!r} quota in "
                    f"{self.location}, and {max(free, 0)} are free (limit {usage.limit}, "
                    f"{usage.current_value} in use). Ask for a quota increase (Azure portal, "
                    "Quotas), or start fewer workers (n_workers) or smaller ones "
                    "(worker_vm_size)"
                )

    # -- VMs ----------------------------------------------------------------------------

    async def create(self, request: driver.VMRequest) -> driver.VM:
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
        spot = self.options.worker_spot and request.role is Role.WORKER
        vm = cm.VirtualMachine(
            location=self.location,
            tags=tags,
            hardware_profile=cm.HardwareProfile(vm_size=self.vm_sizes[request.role]),
            storage_profile=cm.StorageProfile(
                image_reference=cm.ImageReference(
                    **dict(
                        zip(
                            ("publisher", "offer", "sku", "version"),
                            self.options.image.split(":"),
                            strict=True,
                        )
                    )
                ),
                os_disk=cm.OSDisk(
                    name=f"{name}-osdisk",
                    create_option="FromImage",
                    delete_option="Delete",
                    disk_size_gb=self.options.disk_size,
                    managed_disk=cm.ManagedDiskParameters(
                        storage_account_type=self.options.disk_type
                    ),
                ),
            ),
            os_profile=cm.OSProfile(
                computer_name=name,
                admin_username="dask",
                custom_data=base64.b64encode(request.user_data).decode(),
                linux_configuration=cm.LinuxConfiguration(
                    disable_password_authentication=True,
                    ssh=cm.SshConfiguration(
                        public_keys=[
                            cm.SshPublicKey(
                                path="/home/dask/.ssh/authorized_keys",
                                key_data=self._login(),
                            )
                        ]
                    ),
                ),
            ),
            network_profile=cm.NetworkProfile(
                network_interfaces=[
                    cm.NetworkInterfaceReference(id=nic.id, primary=True, delete_option="Delete")
                ]
            ),
            # Managed boot diagnostics: the serial console log, for reporting a failed boot.
            diagnostics_profile=cm.DiagnosticsProfile(
                boot_diagnostics=cm.BootDiagnostics(enabled=True)
            ),
            **(
                {
                    "priority": "Spot",
                    "eviction_policy": "Delete",
                    "billing_profile": cm.BillingProfile(max_price=self.options.spot_max_price),
                }
                if spot
                else {}
            ),
            **self._identity(request.role),
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

    def _identity(self, role: Role) -> dict[str, Any]:
        """The user's identity on every VM (``user_assigned_identity``), and the cluster's
        own on the scheduler alone: a VM may carry both, and code on it names the one it
        wants a token of by its client id."""
        identities = []
        if self.options.user_assigned_identity:
            identities.append(self.options.user_assigned_identity)
        if role is Role.SCHEDULER and self._reaper is not None:
            identities.append(self._reaper[0])
        if not identities:
            return {}
        return {
            "identity": cm.VirtualMachineIdentity(
                type="UserAssigned",
                user_assigned_identities={i: cm.UserAssignedIdentitiesValue() for i in identities},
            )
        }

    def _vm_scopes(self, cluster_id: str, name: str) -> list[str]:
        """The resource ids :meth:`create` gave the scheduler's identity a role on."""
        group = (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.options.resource_group}"
            "/providers"
        )
        full = _name(cluster_id, name)
        return [
            f"{group}/Microsoft.Compute/virtualMachines/{full}",
            f"{group}/Microsoft.Network/networkInterfaces/{full}-nic",
            f"{group}/Microsoft.Compute/disks/{full}-osdisk",
            f"{group}/Microsoft.Network/publicIPAddresses/{full}-ip",
        ]

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

    async def _tagged(self, what: str, pager: Any, cluster_id: str) -> list[Any]:
        async def collect() -> list[Any]:
            return [r async for r in pager if (r.tags or {}).get(driver.CLUSTER_TAG) == cluster_id]

        return await self._arm(what, collect())

    async def list(self, cluster_id: str) -> list[driver.VM]:
        if self.subscription_id is None:
            return []  # prepare stopped before the subscription was known: nothing made
        compute, net = self._clients()
        vms = await self._tagged(
            "listing VMs", compute.virtual_machines.list(self.options.resource_group), cluster_id
        )
        if not vms:
            return []
        nics = await self._tagged(
            "listing network interfaces",
            net.network_interfaces.list(self.options.resource_group),
            cluster_id,
        )
        addresses = {
            (n.virtual_machine.id or "").lower(): n.ip_configurations[0].private_ip_address
            for n in nics
            if n.virtual_machine is not None and n.ip_configurations
        }
        prefix = f"{cluster_id}-"
        return [
            driver.VM(
                id=v.id,
                name=v.name.removeprefix(prefix),
                role=Role.SCHEDULER
                if v.tags.get("dask-secure-cloud-role") == "scheduler"
                else Role.WORKER,
                cluster_id=cluster_id,
                private_ip=addresses.get(v.id.lower(), "") or "",
            )
            for v in vms
        ]

    async def clusters(self) -> list[driver.ClusterSummary]:
        await self._resolve_subscription()
        compute, _ = self._clients()

        async def collect() -> list[Any]:
            # With their instance views: a VM whose OS shut down is "Stopped", allocated
            # and billing, which only the power state tells.
            return [
                v
                async for v in compute.virtual_machines.list(
                    self.options.resource_group, expand="instanceView"
                )
                if driver.CLUSTER_TAG in (v.tags or {})
            ]

        vms = await self._arm("listing VMs", collect())
        _, net = self._clients()
        group = self.options.resource_group

        async def tagged_others() -> list[tuple[str, str]]:
            found = []
            for kind, pager in (
                ("interface", net.network_interfaces.list(group)),
                ("address", net.public_ip_addresses.list(group)),
                ("disk", compute.disks.list_by_resource_group(group)),
                ("firewall", net.network_security_groups.list(group)),
                ("network", net.virtual_networks.list(group)),
            ):
                found += [
                    (r.tags[driver.CLUSTER_TAG], kind)
                    async for r in pager
                    if driver.CLUSTER_TAG in (r.tags or {})
                ]
            return found

        others = await self._arm("listing the cluster's resources", tagged_others())
        others += [(i.tags[driver.CLUSTER_TAG], "identity") for i in await self._identities()]
        return driver.summarize(
            (
                (
                    v.tags[driver.CLUSTER_TAG],
                    v.time_created,
                    v.tags.get(driver.CREATOR_TAG),
                    _listed_state(v.instance_view),
                )
                for v in vms
            ),
            others,
        )

    async def states(self, cluster_id: str) -> dict[str, str]:
        """One listing of the resource group's VMs with their instance views: a VM whose
        OS shut down is Stopped, still allocated and billed for its compute."""
        if self.subscription_id is None:
            return {}
        compute, _ = self._clients()
        vms = await self._tagged(
            "listing VMs",
            compute.virtual_machines.list(self.options.resource_group, expand="instanceView"),
            cluster_id,
        )
        found = {}
        for vm in vms:
            codes = {s.code for s in (vm.instance_view.statuses if vm.instance_view else [])}
            found[vm.id] = "stopped" if codes & _STOPPED else "running"
        return found

    async def state(self, vm: driver.VM) -> str:
        compute, _ = self._clients()
        try:
            view = await self._arm(
                "reading a VM",
                compute.virtual_machines.instance_view(
                    self.options.resource_group,
                    _name(vm.cluster_id, vm.name),
                    retry_total=0,  # a poll: its caller polls again
                ),
            )
        except driver.NotFoundError:
            return "terminated"  # deleted: evicted as a Spot VM, or by us
        except driver.CloudError:  # throttled, refused, unreachable: nothing learnt
            return "unknown"
        codes = {s.code for s in view.statuses or []}
        if codes & _STOPPED:
            return "stopped"
        return "running"

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

    async def _identities(self) -> list[Any]:
        """The managed identities in the resource group that carry a cluster tag. An
        identity that may not list them (``delete_on_lease_end=False`` needs no such
        permission) could not have made any: none, then."""
        msi, _ = self._identity_clients()

        async def collect() -> list[Any]:
            return [
                i
                async for i in msi.user_assigned_identities.list_by_resource_group(
                    self.options.resource_group
                )
                if driver.CLUSTER_TAG in (i.tags or {})
            ]

        try:
            return await self._arm("listing managed identities", collect())
        except driver.ForbiddenError as e:
            logger.debug("Not listing managed identities: %s", e)
            return []

    async def _release_identities(self, cluster_id: str) -> None:
        """The scheduler's identity, after every role assignment it still holds: Azure
        deletes neither with the other, nor an assignment with the VM it was scoped to."""
        msi, auth = self._identity_clients()
        group = self.options.resource_group
        identities = [
            i for i in await self._identities() if i.tags[driver.CLUSTER_TAG] == cluster_id
        ]
        for identity in identities:

            async def held(principal: str = identity.principal_id) -> list[Any]:
                return [
                    a
                    async for a in auth.role_assignments.list_for_resource_group(
                        group, filter=f"principalId eq '{principal}'"
                    )
                ]

            for assignment in await self._arm("listing the identity's role assignments", held()):
                with contextlib.suppress(driver.NotFoundError):
                    await self._arm(
                        f"deleting role assignment {assignment.name}",
                        auth.role_assignments.delete_by_id(assignment.id),
                    )
            with contextlib.suppress(driver.NotFoundError):
                await self._arm(
                    f"deleting managed identity {identity.name}",
                    msi.user_assigned_identities.delete(group, identity.name),
                )

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


class AzureVMCluster(VMCluster):
    """A secure Dask cluster on Azure virtual machines.

    Every resource is made in an existing resource group (``resource_group`` is
    required). By default the client runs outside Azure: the scheduler gets a Standard
    public address whose network security group admits only this machine's address (or
    ``allowed_cidrs``) on the scheduler's port, and the workers stay private. With
    ``use_private_ip=True`` the client runs inside ``vnet`` (required then) and connects
    to the scheduler's private address. ``credential=`` takes an
    ``azure.core.credentials_async.AsyncTokenCredential``; by default
    ``azure.identity.aio.DefaultAzureCredential`` (environment, workload identity, managed
    identity, Azure CLI sign-in). It never reaches a VM.
    """

    provider = "azure"
    Options = AzureOptions
    driver_class = AzureDriver
    extra_keywords = ("credential",)


def _listed_state(view: Any) -> str:
    """A VM's power state in :meth:`Driver.state`'s words, for ``list``. "Stopped" is
    still allocated and its compute bills; "deallocated" bills no compute (its disk and
    address, listed apart, still do)."""
    codes = {s.code for s in (view.statuses or [])} if view is not None else set()
    if codes & {"PowerState/running", "PowerState/starting"}:
        return "running"
    if codes & {"PowerState/stopped", "PowerState/stopping"}:
        return "stopped"
    if codes & {"PowerState/deallocated", "PowerState/deallocating"}:
        return "deallocated"
    return "unknown"
