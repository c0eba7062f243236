"""The identities a VM carries: the scheduler's managed identity, which deletes the
cluster's VMs when the lease ends (``delete_on_lease_end``), the user's on every VM
(``user_assigned_identity``), and a login no one holds (a thrown-away SSH key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from typing import Any

from azure.core.exceptions import (
    HttpResponseError,
)
from azure.mgmt.authorization.aio import AuthorizationManagementClient
from azure.mgmt.authorization.models import RoleAssignmentCreateParameters
from azure.mgmt.compute import models as cm
from azure.mgmt.msi.aio import ManagedServiceIdentityClient
from azure.mgmt.msi.models import Identity
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ... import driver, preloads
from ...credentials import Role
from ...errors import OptionError
from .errors import _error_code
from .names import _name

logger = logging.getLogger(__name__)


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


def throwaway_ssh_key() -> str:
    """An Ed25519 public key whose private half is never kept: Azure wants a login
    credential for Linux VMs, and this one opens nothing."""
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


class IdentitySteps:
    """The driver's identity steps, kept apart from its VMs: the scheduler's managed
    identity (made, given its roles on each VM's resources, deleted) and the identities
    each VM carries. Mixed into :class:`~.driver.AzureDriver`, whose clients and options
    they use."""

    def _identity_clients(
        self,
    ) -> tuple[ManagedServiceIdentityClient, AuthorizationManagementClient]:
        if self._msi is None or self._auth is None:
            assert self.subscription_id is not None
            options = self._sdk_options()
            credential = self._get_credential()
            self._msi = ManagedServiceIdentityClient(credential, self.subscription_id, **options)
            self._auth = AuthorizationManagementClient(credential, self.subscription_id, **options)
        return self._msi, self._auth

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
