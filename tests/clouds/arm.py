"""An Azure Resource Manager stand-in over HTTPS (a ``trustme`` CA), for the real async SDKs.

It serves what ``AzureVMCluster`` uses: a Microsoft Entra token endpoint (client
credentials, so ``DefaultAzureCredential``'s environment source signs in here), the
subscription list, resource groups, VM sizes (resource SKUs), and PUT/GET/PATCH/DELETE/list
of virtual networks, network security groups, public addresses, NAT gateways, route
tables, network interfaces, VMs and disks.

What ARM would refuse, it refuses, in ARM's error shape ``{"error": {"code", "message",
"target"}}``:
- every body is checked against the SDK's own models (``azure.mgmt.compute.models``,
  ``azure.mgmt.network.models``): an unknown member, a wrong type, an unknown enum value
  or a read-only member is an error, as are ARM's own rules on names, tags, locations,
  VM sizes, login settings, customData (base64, at most 65,535 bytes) and references to
  resources that do not exist;
- a missing resource group is ``ResourceGroupNotFound``; a VM beyond the regional core
  quota is ``OperationNotAllowed``; deleting what is still in use (an NSG or subnet a NIC
  uses, a NIC a VM uses, a disk attached to a VM) is refused as ARM refuses it.

Writes are long-running operations as ARM runs them: 201/202 with an
``Azure-AsyncOperation`` header, the operation ``InProgress`` on the first poll and
``Succeeded`` (or ``Failed``, with an error) after. A VM boots its ``customData`` with the
booter it is given (process VMs or QEMU guests) at its NIC's private address, the lowest
free one of its subnet past the four Azure keeps (any prefix: tests use 127.x.0.0/16 for
process VMs, a guest test 10.77.0.0/25), and with whether the network gives it a route
out, decided from this stand-in's own model (:meth:`AzureStandIn.egress`): a public
address, unless its subnet's route table drops 0.0.0.0/0; a 0.0.0.0/0 route to a virtual
appliance or gateway (modelled as a firewall that forwards); a NAT gateway with a public
address; or default outbound access, which a subnet has when ``defaultOutboundAccess`` is
true, or unset on a subnet made with an API version before 2025-07-01 (from that version
on, ARM writes ``false`` on a new subnet that does not say).
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import json
import os
import re
import sys
import threading
import time
import types
import typing
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from azure.mgmt.authorization.v2022_04_01 import models as authorization_models
from azure.mgmt.compute import models as compute_models
from azure.mgmt.msi import models as msi_models
from azure.mgmt.network import models as network_models

from . import imaging, reach
from .booter import StandInBooter
from .jsonapi import HTTPSStandIn

CLUSTER_TAG = "dask-secure-cloud-cluster"
CUSTOM_DATA_LIMIT = 65_535
#: VM sizes offered per location: name -> (vCPUs, GPUs, quota family).
SIZES = {
    "westeurope": {
        "Standard_D2s_v5": (2, 0, "standardDSv5Family"),
        "Standard_D4s_v5": (4, 0, "standardDSv5Family"),
        "Standard_NC4as_T4_v3": (4, 1, "standardNCASv3_T4Family"),
    },
    "eastus": {"Standard_D2s_v5": (2, 0, "standardDSv5Family")},
}
#: vCPU quota names as the usage API gives them: value -> localized value.
QUOTA_NAMES = {
    "cores": "Total Regional vCPUs",
    "lowPriorityCores": "Total Regional Spot vCPUs",
    "standardDSv5Family": "Standard DSv5 Family vCPUs",
    "standardNCASv3_T4Family": "Standard NCASv3_T4 Family vCPUs",
}
#: How ARM's quota errors name a quota; a family reads "<family> Cores".
_QUOTA_IN_ERRORS = {"cores": "Total Regional Cores", "lowPriorityCores": "LowPriorityCores"}
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,78}[a-zA-Z0-9_]$|^[a-zA-Z0-9]$")
_VM_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}[a-zA-Z0-9_]$")
_RESOURCE_PATH = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<group>[^/]+)/providers/"
    r"(?P<ns>Microsoft\.\w+)/(?P<kind>\w+)(?:/(?P<name>[^/]+)(?:/(?P<action>\w+))?)?$",
    re.IGNORECASE,
)
MODELS = {
    "virtualnetworks": network_models.VirtualNetwork,
    "networksecuritygroups": network_models.NetworkSecurityGroup,
    "publicipaddresses": network_models.PublicIPAddress,
    "natgateways": network_models.NatGateway,
    "routetables": network_models.RouteTable,
    "networkinterfaces": network_models.NetworkInterface,
    "virtualmachines": compute_models.VirtualMachine,
    "disks": compute_models.Disk,
    "images": compute_models.Image,
    "userassignedidentities": msi_models.Identity,
}
#: Azure's built-in roles this stand-in knows: id -> (name, actions, notActions), as
#: "Azure built-in roles" lists them (Contributor's NotActions shortened to the ones
#: about authorization).
ROLES = {
    "8e3af657-a8ff-443c-a75c-2fe8c4bcb635": ("Owner", ["*"], []),
    "b24988ac-6180-42a0-ab88-20f7382dd24c": (
        "Contributor",
        ["*"],
        [
            "Microsoft.Authorization/*/Delete",
            "Microsoft.Authorization/*/Write",
            "Microsoft.Authorization/elevateAccess/Action",
        ],
    ),
    "acdd72a7-3385-48ef-bd42-f606fba81ae7": ("Reader", ["*/read"], []),
}
ROLE_IDS = {name: role_id for role_id, (name, _, _) in ROLES.items()}
_AUTHORIZATION_PATH = re.compile(
    r"^(?P<scope>/subscriptions/[^/]+(?:/resourceGroups/[^/]+(?:/providers/[^/]+/[^/]+/[^/]+)?)?)"
    r"/providers/Microsoft\.Authorization/(?P<what>roleAssignments|permissions)"
    r"(?:/(?P<name>[^/]+))?$",
    re.IGNORECASE,
)
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


#: From this API version on, a new subnet that does not say is private
#: (``defaultOutboundAccess: false``); before it, the property stays unset and the
#: subnet has default outbound access.
PRIVATE_SUBNETS_FROM = "2025-07-01"
#: Next hops of a 0.0.0.0/0 route that lead to the user's own box (a firewall, a VPN or
#: ExpressRoute gateway), which this stand-in models as forwarding to the internet.
APPLIANCE_HOPS = {"virtualappliance", "virtualapplianceecmp", "virtualnetworkgateway"}
#: Addresses Azure keeps at the start of every subnet (network, gateway, two for DNS).
RESERVED_AT_START = 4


#: Enums the API documents as open: any value is passed on to the service's own checks
#: (the VM size list is deprecated in favour of the sizes a location offers).
OPEN_ENUMS = {"VirtualMachineSizeTypes"}


class ARMError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        target: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.target = status, code, message, target
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error = {"code": self.code, "message": self.message}
        if self.target:
            error["target"] = self.target
        return {"error": error}


# -- request bodies against the SDK's models ---------------------------------------------


def _fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """REST name -> (type hint, rest field) for an SDK model class, the way the SDK
    itself collects them (its models are generated from Azure's API specification)."""
    found: dict[str, tuple[Any, Any]] = {}
    for klass in reversed(cls.__mro__):
        if not hasattr(klass, "_attr_to_rest_field") and klass.__module__.endswith("model_base"):
            continue
        module = sys.modules[klass.__module__]
        package = sys.modules[klass.__module__.rsplit(".", 1)[0]]
        try:
            hints = typing.get_type_hints(klass, {**vars(module), "_models": package})
        except (NameError, TypeError):
            continue
        for attr, field in vars(klass).items():
            if attr.startswith("_") or not hasattr(field, "_type"):
                continue
            found[field._rest_name_input or attr] = (hints.get(attr, Any), field)
    return found


def _is_model(hint: Any) -> bool:
    return isinstance(hint, type) and hint.__module__.endswith("._models")


def check_model(cls: type, body: Any, where: str) -> None:
    """Refuse ``body`` unless it is a valid ``cls`` in a create/update request."""
    if not isinstance(body, dict):
        raise ARMError(400, "InvalidRequestContent", f"{where} must be an object", where)
    fields = _fields(cls)
    for key, value in body.items():
        if key not in fields:
            raise ARMError(
                400,
                "InvalidRequestContent",
                f"Could not find member '{key}' on object of type '{cls.__name__}'. "
                f"Path '{where}.{key}'.",
                f"{where}.{key}",
            )
        hint, field = fields[key]
        if field._visibility == ["read"] and key != "id":
            raise ARMError(
                400, "InvalidRequestContent", f"'{where}.{key}' is read-only", f"{where}.{key}"
            )
        _check_value(hint, value, f"{where}.{key}")


def check_msrest_model(cls: type, body: Any, where: str) -> None:
    """``check_model`` for the SDKs still generated with msrest (managed identities,
    authorization): members from the class's ``_attribute_map`` (``properties.x`` keys
    nest), read-only and required ones from its ``_validation``."""
    if not isinstance(body, dict):
        raise ARMError(400, "InvalidRequestContent", f"{where} must be an object", where)
    validation = getattr(cls, "_validation", {})
    paths = {spec["key"]: attr for attr, spec in cls._attribute_map.items()}
    flat: dict[str, Any] = {}
    for key, value in body.items():
        if key == "properties" and isinstance(value, dict):
            flat |= {f"properties.{k}": v for k, v in value.items()}
        else:
            flat[key] = value
    for key, value in flat.items():
        attr = paths.get(key)
        if attr is None:
            raise ARMError(
                400,
                "InvalidRequestContent",
                f"Could not find member '{key}' on object of type '{cls.__name__}'.",
                f"{where}.{key}",
            )
        if validation.get(attr, {}).get("readonly"):
            raise ARMError(400, "InvalidRequestContent", f"'{where}.{key}' is read-only")
        kind = cls._attribute_map[attr]["type"]
        if kind == "str" and not isinstance(value, str):
            raise ARMError(400, "InvalidRequestContent", f"'{where}.{key}' must be a string")
    for attr, rules in validation.items():
        if rules.get("required") and cls._attribute_map[attr]["key"] not in flat:
            raise ARMError(
                400,
                "InvalidRequestContent",
                f"'{where}.{cls._attribute_map[attr]['key']}' is required",
            )


def _check_value(hint: Any, value: Any, where: str) -> None:
    if value is None or hint is Any:
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        enums = [
            a
            for a in options
            if isinstance(a, type) and issubclass(a, enum.Enum) and a.__name__ not in OPEN_ENUMS
        ]
        if enums and isinstance(value, str):
            allowed = {str(m.value).lower() for e in enums for m in e}
            if value.lower() not in allowed:
                raise ARMError(
                    400,
                    "InvalidParameter",
                    f"The value '{value}' of '{where}' is not one of "
                    f"{sorted(str(m.value) for e in enums for m in e)}.",
                    where,
                )
            return
        errors = []
        for option in options:
            try:
                _check_value(option, value, where)
                return
            except ARMError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            raise ARMError(400, "InvalidParameter", f"'{where}' must be one of {args}", where)
        return
    if origin is list:
        if not isinstance(value, list):
            raise ARMError(400, "InvalidRequestContent", f"'{where}' must be an array", where)
        for i, item in enumerate(value):
            _check_value(args[0], item, f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ARMError(400, "InvalidRequestContent", f"'{where}' must be an object", where)
        for key, item in value.items():
            _check_value(args[1], item, f"{where}.{key}")
        return
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if str(value).lower() not in {str(m.value).lower() for m in hint}:
            raise ARMError(400, "InvalidParameter", f"'{value}' is not valid for '{where}'", where)
        return
    if _is_model(hint):
        check_model(hint, value, where)
        return
    expected = {str: str, bool: bool, int: int, float: (int, float)}.get(hint)
    if expected is not None and (
        (isinstance(value, bool) and hint is not bool) or not isinstance(value, expected)
    ):
        raise ARMError(
            400,
            "InvalidRequestContent",
            f"Error converting value {value!r} to type '{hint.__name__}'. Path '{where}'.",
            where,
        )


# -- the stand-in ------------------------------------------------------------------------


class AzureStandIn(HTTPSStandIn):
    def __init__(
        self,
        booter: StandInBooter,
        *,
        subscription: str,
        tenant: str,
        client_id: str,
        client_secret: str,
        vcpu_quota: int = 64,
    ) -> None:
        super().__init__(booter)
        self.booter: StandInBooter = booter
        self.subscription = subscription
        self.tenant, self.client_id, self.client_secret = tenant, client_id, client_secret
        #: Per location, vCPU quota name (see QUOTA_NAMES) -> limit.
        self.quotas = {location: dict.fromkeys(QUOTA_NAMES, vcpu_quota) for location in SIZES}
        self.token = f"stand-in-token-{uuid.uuid4().hex}"
        self.groups: dict[str, str] = {}  # name (lower) -> location
        self.resources: dict[str, dict[str, Any]] = {}  # resource id (lower) -> resource
        self.operations: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        self.tokens_issued = 0
        #: The signed-in service principal's object id; its roles are role assignments
        #: like any other (Owner on the subscription unless :meth:`set_caller_role`).
        self.caller = str(uuid.uuid4())
        self.assignments: dict[str, dict[str, Any]] = {}  # role assignment id (lower) ->
        #: Tokens the instance metadata service issued: token -> principal, client id,
        #: resource (the audience), and the VM that asked.
        self.identity_tokens: dict[str, dict[str, str]] = {}
        self._metadata: InstanceMetadata | None = None
        self._acting = self.caller
        self._faults: dict[tuple[str, int], tuple[ARMError, bool]] = {}
        #: (VM size, zone or None for a regional VM, Spot or None for both) whose
        #: allocation fails for want of capacity (see refuse_capacity).
        self._no_capacity: list[tuple[str, str | None, bool | None]] = []
        self._counts: Counter[str] = Counter()
        self._lock = threading.RLock()
        self.set_caller_role("Owner")

    # -- test helpers -------------------------------------------------------------------

    def add_group(self, name: str, location: str = "westeurope") -> None:
        self.groups[name.lower()] = location

    def add_identity(self, name: str, group: str = "dask-rg") -> dict[str, Any]:
        """A user-assigned managed identity of the user's, as ``az identity create``
        makes it."""
        identity_id = (
            f"/subscriptions/{self.subscription}/resourceGroups/{group}/providers/"
            f"Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
        resource: dict[str, Any] = {
            "id": identity_id,
            "name": name,
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
            "location": self.groups[group.lower()],
            "tags": {},
            "properties": {},
            "_kind": "userassignedidentities",
        }
        with self._lock:
            self._make_userassignedidentities(resource, resource["properties"])
            self.resources[identity_id.lower()] = resource
        return resource

    def set_caller_role(self, role: str) -> None:
        """Give the signed-in principal ``role`` (a name in :data:`ROLES`) on the
        subscription, instead of what it had: Contributor may do all but assign roles."""
        with self._lock:
            for key, assignment in list(self.assignments.items()):
                if assignment["properties"]["principalId"] == self.caller:
                    del self.assignments[key]
            scope = f"/subscriptions/{self.subscription}"
            self._assign(scope, str(uuid.uuid4()), ROLE_IDS[role], self.caller, "User")

    def metadata(self, address: str = "127.0.0.1") -> str:
        """The URL of this cloud's instance metadata service, started on first use."""
        if self._metadata is None:
            self._metadata = InstanceMetadata(self, address)
        return self._metadata.url

    def stop(self) -> None:
        if self._metadata is not None:
            self._metadata.stop()
        super().stop()

    # -- role-based access control ------------------------------------------------------

    def _assign(
        self, scope: str, name: str, role_id: str, principal: str, principal_type: str
    ) -> dict[str, Any]:
        assignment_id = f"{scope}/providers/Microsoft.Authorization/roleAssignments/{name}"
        assignment = {
            "id": assignment_id,
            "name": name,
            "type": "Microsoft.Authorization/roleAssignments",
            "properties": {
                "scope": scope,
                "roleDefinitionId": f"/subscriptions/{self.subscription}/providers/"
                f"Microsoft.Authorization/roleDefinitions/{role_id}",
                "principalId": principal,
                "principalType": principal_type,
                "createdOn": time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime()),
            },
        }
        self.assignments[assignment_id.lower()] = assignment
        return assignment

    def _roles_at(self, principal: str, scope: str) -> list[tuple[list[str], list[str]]]:
        """(actions, notActions) of each role ``principal`` holds at ``scope`` or above:
        an assignment applies to its scope and everything beneath it."""
        target = scope.lower().rstrip("/")
        found = []
        for assignment in self.assignments.values():
            p = assignment["properties"]
            at = p["scope"].lower().rstrip("/")
            if p["principalId"] == principal and (target == at or target.startswith(at + "/")):
                _, actions, not_actions = ROLES[p["roleDefinitionId"].rsplit("/", 1)[-1]]
                found.append((actions, not_actions))
        return found

    def allowed(self, principal: str, action: str, scope: str) -> bool:
        return any(
            any(_wildcard(a, action) for a in actions)
            and not any(_wildcard(n, action) for n in not_actions)
            for actions, not_actions in self._roles_at(principal, scope)
        )

    def authorize(self, action: str, scope: str, *, linked: bool = False) -> None:
        """Refuse, as ARM does, what the principal of the request being served may not
        do at ``scope``. ``linked``: an action on another resource that the request
        implies (a VM's NIC deleted with it, an identity attached to it)."""
        principal = self._acting
        if self.allowed(principal, action, scope):
            return
        if linked:
            raise ARMError(
                403,
                "LinkedAuthorizationFailed",
                f"The client '{principal}' with object id '{principal}' has permission to "
                f"perform the request but does not have permission to perform action "
                f"'{action}' on the linked scope(s) '{scope}' or the linked scope(s) are "
                "invalid.",
            )
        raise ARMError(
            403,
            "AuthorizationFailed",
            f"The client '{principal}' with object id '{principal}' does not have "
            f"authorization to perform action '{action}' over scope '{scope}' or the scope "
            "is invalid. If access was recently granted, please refresh your credentials.",
        )

    def _principal(self, headers: Any) -> str:
        """Who the bearer token says is asking: the signed-in principal, or a managed
        identity with a token the metadata service gave for this endpoint."""
        header = headers.get("Authorization") or ""
        if header == f"Bearer {self.token}":
            return self.caller
        granted = self.identity_tokens.get(header.removeprefix("Bearer "))
        if granted is not None and granted["resource"].rstrip("/") == self.url:
            return granted["principal"]
        if granted is not None:
            raise ARMError(
                401,
                "InvalidAuthenticationTokenAudience",
                "The access token has been obtained for wrong audience or resource "
                f"'{granted['resource']}'.",
            )
        raise ARMError(
            401,
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing or invalid.",
            headers={
                "WWW-Authenticate": 'Bearer authorization_uri="https://login.example/", '
                'error="invalid_token"'
            },
        )

    def _scope_exists(self, scope: str) -> bool:
        parts = scope.strip("/").split("/")
        if len(parts) == 2:
            return parts[1].lower() == self.subscription.lower()
        if len(parts) == 4:
            return parts[3].lower() in self.groups
        return scope.lower() in self.resources

    def _authorization(
        self, method: str, match: re.Match[str], query: dict[str, str], raw: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        """Role assignments (PUT, GET, DELETE, list) and the caller's permissions, at a
        subscription, resource group or resource scope."""
        scope, what, name = match["scope"], match["what"].lower(), match["name"]
        if not self._scope_exists(scope) and not (method == "DELETE" and what != "permissions"):
            raise ARMError(404, "ResourceNotFound", f"The scope '{scope}' does not exist.")
        if what == "permissions":
            self.authorize("Microsoft.Authorization/permissions/read", scope)
            return (
                200,
                {
                    "value": [
                        {"actions": a, "notActions": n, "dataActions": [], "notDataActions": []}
                        for a, n in self._roles_at(self._acting, scope)
                    ]
                },
                {},
            )
        if name is None:
            self.authorize("Microsoft.Authorization/roleAssignments/read", scope)
            wanted = re.match(r"principalId eq '([^']+)'", query.get("$filter", ""))
            target = scope.lower()
            found = [
                a
                for a in self.assignments.values()
                if (wanted is None or a["properties"]["principalId"] == wanted.group(1))
                and (
                    a["properties"]["scope"].lower().startswith(target)
                    or target.startswith(a["properties"]["scope"].lower())
                )
            ]
            return 200, {"value": found}, {}
        assignment_id = f"{scope}/providers/Microsoft.Authorization/roleAssignments/{name}"
        found = self.assignments.get(assignment_id.lower())
        if method == "GET":
            if found is None:
                raise ARMError(404, "RoleAssignmentNotFound", "The role assignment was not found.")
            return 200, found, {}
        if method == "DELETE":
            self.authorize("Microsoft.Authorization/roleAssignments/delete", scope)
            if found is None:
                return 204, None, {}
            del self.assignments[assignment_id.lower()]
            return 200, found, {}
        if method != "PUT":
            raise ARMError(405, "MethodNotAllowed", method)
        self.authorize("Microsoft.Authorization/roleAssignments/write", scope)
        if not _GUID.match(name):
            raise ARMError(
                400,
                "InvalidRoleAssignmentId",
                f"The role assignment ID '{name}' is not valid. The role assignment ID "
                "must be a GUID.",
            )
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            raise ARMError(400, "InvalidRequestContent", f"invalid JSON: {e}") from e
        self.bodies.append(("roleassignments", body))
        check_msrest_model(authorization_models.RoleAssignmentCreateParameters, body, "parameters")
        properties = body["properties"]
        role_id = properties["roleDefinitionId"].rsplit("/", 1)[-1]
        prefix = (
            f"/subscriptions/{self.subscription}/providers/Microsoft.Authorization/roleDefinitions/"
        )
        if role_id not in ROLES or not properties["roleDefinitionId"].lower().startswith(
            prefix.lower()
        ):
            raise ARMError(
                400,
                "RoleDefinitionDoesNotExist",
                f"The specified role definition with ID '{role_id}' does not exist.",
            )
        principal = properties["principalId"]
        principals = {self.caller} | {
            i["properties"]["principalId"] for i in self.of_kind("userassignedidentities")
        }
        if principal not in principals:
            raise ARMError(
                400,
                "PrincipalNotFound",
                f"Principal {principal} does not exist in the directory {self.tenant}.",
            )
        for other in self.assignments.values():
            p = other["properties"]
            if (
                p["principalId"] == principal
                and p["scope"].lower() == scope.lower()
                and p["roleDefinitionId"].rsplit("/", 1)[-1] == role_id
            ):
                raise ARMError(409, "RoleAssignmentExists", "The role assignment already exists.")
        made = self._assign(
            scope, name, role_id, principal, properties.get("principalType") or "User"
        )
        return 201, made, {}

    # -- the instance metadata service's managed identity tokens -------------------------

    def identity_token(
        self, vm: dict[str, Any] | None, query: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """What the metadata service answers ``vm`` asking for a token, as Azure's
        "How to use managed identities ... to acquire an access token" describes it: of
        the identity ``client_id`` (or ``msi_res_id``) names among the VM's own, or of
        its only one; for ``resource``."""

        def refuse(description: str) -> tuple[int, dict[str, Any]]:
            return 400, {"error": "invalid_request", "error_description": description}

        if "api-version" not in query:
            return 400, {"error": "Bad request", "error_description": "api-version is required"}
        if not query.get("resource"):
            return refuse("Required query variable 'resource' is missing")
        with self._lock:
            attached = ((vm or {}).get("identity") or {}).get("userAssignedIdentities") or {}
            identities = [
                self.resources[i.lower()] for i in attached if i.lower() in self.resources
            ]
            if "client_id" in query:
                identities = [
                    i for i in identities if i["properties"]["clientId"] == query["client_id"]
                ]
            elif "msi_res_id" in query:
                identities = [
                    i for i in identities if i["id"].lower() == query["msi_res_id"].lower()
                ]
            elif len(identities) > 1:
                return refuse(
                    "Multiple user assigned identities exist, please specify the clientId / "
                    "resourceId of the identity in the token request"
                )
            if not identities:
                return refuse("Identity not found")
            identity = identities[0]["properties"]
            token = f"mi-{uuid.uuid4().hex}"
            self.identity_tokens[token] = {
                "principal": identity["principalId"],
                "client_id": identity["clientId"],
                "resource": query["resource"],
                "vm": vm["name"] if vm else "",
            }
        now = int(time.time())
        return 200, {
            "access_token": token,
            "client_id": identity["clientId"],
            "expires_in": "86399",
            "expires_on": str(now + 86399),
            "ext_expires_in": "86399",
            "not_before": str(now),
            "resource": query["resource"],
            "token_type": "Bearer",
        }

    def vm_calling(self, host: str, port: int, server_port: int) -> dict[str, Any] | None:
        """The VM a connection to the metadata service comes from: a guest by its
        address; a process VM, which shares this machine's loopback, by the process
        that holds the connection's other end."""
        with self._lock:
            vms = self.of_kind("virtualmachines")
        for vm in vms:
            if vm.get("_address") == host:
                return vm
        vm_id = _process_vm_id(port, server_port)
        return next((vm for vm in vms if vm.get("_vm") == vm_id), None) if vm_id else None

    def fail(
        self,
        call: str,
        status: int = 400,
        code: str = "InjectedFailure",
        *,
        occurrence: int = 1,
        in_operation: bool = False,
        message: str | None = None,
    ) -> None:
        """Fail the ``occurrence``-th next ``call`` (``"PUT virtualMachines"``), either at
        once or, ``in_operation``, in the long-running operation it starts; ``message``
        as ARM words it (default: ``injected <code>``)."""
        with self._lock:
            self._faults[(call, self._counts[call] + occurrence)] = (
                ARMError(status, code, message or f"injected {code}"),
                in_operation,
            )

    def refuse_capacity(
        self, size: str, zone: str | None = None, *, spot: bool | None = None
    ) -> None:
        """From now on, a VM of ``size`` in ``zone`` (``None``: a regional VM; ``spot``:
        Spot VMs only, or on-demand only with ``False``) fails its allocation as on
        Azure: the PUT is accepted, its operation fails with ``AllocationFailed`` (or
        ``ZonalAllocationFailed``), and the VM stays, provisioning state ``Failed``,
        holding its interface and disk until it is deleted."""
        with self._lock:
            self._no_capacity.append((size, zone, spot))

    def _allocation_refused(self, resource: dict[str, Any], size: str) -> ARMError | None:
        zones = resource.get("zones") or [None]
        spot = resource["properties"].get("priority") == "Spot"
        for refused_size, zone, market in self._no_capacity:
            if (refused_size, zone) == (size, zones[0]) and market in (None, spot):
                where = "zone" if zone else "region"
                return ARMError(
                    200,
                    "ZonalAllocationFailed" if zone else "AllocationFailed",
                    f"Allocation failed. We do not have sufficient capacity for the "
                    f"requested VM size in this {where}. Read more about improving "
                    "likelihood of allocation success at http://aka.ms/allocation-guidance",
                )
        return None

    def throttle(self, call: str, occurrence: int = 1) -> None:
        with self._lock:
            self._faults[(call, self._counts[call] + occurrence)] = (
                ARMError(
                    429,
                    "TooManyRequests",
                    "The request is being throttled.",
                    headers={"Retry-After": "1"},
                ),
                False,
            )

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.resources.values() if r["_kind"] == kind.lower()]

    def tagged(self, cluster_id: str) -> list[str]:
        return [
            r["id"]
            for r in self.resources.values()
            if (r.get("tags") or {}).get(CLUSTER_TAG) == cluster_id
        ]

    # -- routing ------------------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: dict[str, str], raw: bytes, headers: Any
    ) -> tuple[int, Any, dict[str, str]]:
        if re.match(rf"^/{self.tenant}/oauth2/v2.0/token$", path) and method == "POST":
            return self._token(raw)
        if path.startswith("/blobs/"):
            return self._blob(path)
        principal = self._principal(headers)
        if "api-version" not in query:
            raise ARMError(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        if method == "GET" and path == "/subscriptions":
            return self._count("GET subscriptions", lambda: (200, self._subscriptions()))
        if not path.lower().startswith(f"/subscriptions/{self.subscription}"):
            raise ARMError(
                404,
                "SubscriptionNotFound",
                f"The subscription '{path.split('/')[2]}' could not be found.",
            )
        rest = path[len(f"/subscriptions/{self.subscription}") :]
        subscription = f"/subscriptions/{self.subscription}"
        if m := _AUTHORIZATION_PATH.match(path):
            return self._count(
                f"{method} {m['what']}",
                lambda: self._acting_as(
                    principal, lambda: self._authorization(method, m, query, raw)
                ),
            )
        if m := re.match(r"^/resourcegroups/([^/]+)$", rest, re.IGNORECASE):
            read = "Microsoft.Resources/subscriptions/resourceGroups/read"
            if method == "DELETE":
                # Deleting a resource group: this stand-in only ever refuses it.
                return self._count(
                    "DELETE resourceGroups",
                    lambda: self._acting_as(
                        principal,
                        lambda: (
                            self.authorize(
                                "Microsoft.Resources/subscriptions/resourceGroups/delete", path
                            )
                            or (405, {"error": {"code": "NotSupported", "message": "stand-in"}})
                        ),
                    ),
                )
            return self._count(
                "GET resourceGroups",
                lambda: self._acting_as(
                    principal, lambda: self.authorize(read, path) or self._group(m.group(1))
                ),
            )
        if re.match(r"^/providers/Microsoft.Compute/skus$", rest, re.IGNORECASE):
            return self._count(
                "GET skus",
                lambda: self._acting_as(
                    principal,
                    lambda: (
                        self.authorize("Microsoft.Compute/skus/read", subscription)
                        or (200, self._skus(query))
                    ),
                ),
            )
        if m := re.match(r"^/providers/Microsoft.Compute/locations/([^/]+)/usages$", rest):
            return self._count(
                "GET usages",
                lambda: self._acting_as(
                    principal,
                    lambda: (
                        self.authorize("Microsoft.Compute/locations/usages/read", subscription)
                        or (200, self._usages(m.group(1)))
                    ),
                ),
            )
        if m := re.match(r"^/providers/Microsoft\.\w+/locations/[^/]+/operations/([^/]+)$", rest):
            return 200, self._poll(m.group(1)), {}
        match = _RESOURCE_PATH.match(path)
        if not match:
            raise ARMError(404, "NotFound", f"the stand-in has no {method} {path}")
        kind = match["kind"]
        action = match["action"]
        call = f"{method} {kind}{'/' + action if action else ''}"
        if match["group"].lower() not in self.groups:
            raise ARMError(
                404,
                "ResourceGroupNotFound",
                f"Resource group '{match['group']}' could not be found.",
            )
        return self._count(
            call,
            lambda: self._acting_as(
                principal, lambda: self._resource(method, match, query, raw, kind.lower(), action)
            ),
        )

    def _acting_as(self, principal: str, then: Any) -> Any:
        """Serve one request (under the lock) as ``principal``: what :meth:`authorize`
        checks, here and in what the request implies."""
        self._acting = principal
        try:
            return then()
        finally:
            self._acting = self.caller

    def _count(self, call: str, then: Any) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            self.calls.append(call)
            self._counts[call] += 1
            fault = self._faults.pop((call, self._counts[call]), None)
            if fault and not fault[1]:
                raise fault[0]
            answer = then()
            status, payload = answer[0], answer[1]
            headers = answer[2] if len(answer) > 2 else {}
            if fault:  # fail inside the long-running operation it started
                op = headers.get("Azure-AsyncOperation", "").rsplit("/", 1)[-1].split("?")[0]
                if op in self.operations:
                    self.operations[op]["error"] = fault[0]
            return status, payload, headers

    # -- identity and subscriptions -----------------------------------------------------

    def _token(self, raw: bytes) -> tuple[int, Any, dict[str, str]]:
        form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
        if (
            form.get("client_id") != self.client_id
            or form.get("client_secret") != self.client_secret
            or form.get("grant_type") != "client_credentials"
        ):
            return (
                401,
                {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided.",
                },
                {},
            )
        if form.get("scope") != f"{self.url}/.default":
            return 400, {"error": "invalid_scope", "error_description": "AADSTS70011"}, {}
        self.tokens_issued += 1
        return 200, {"token_type": "Bearer", "expires_in": 3599, "access_token": self.token}, {}

    def _subscriptions(self) -> dict[str, Any]:
        return {
            "value": [
                {
                    "id": f"/subscriptions/{self.subscription}",
                    "subscriptionId": self.subscription,
                    "displayName": "stand-in",
                    "state": "Enabled",
                    "tenantId": self.tenant,
                }
            ]
        }

    def _group(self, name: str) -> tuple[int, Any]:
        location = self.groups.get(name.lower())
        if location is None:
            raise ARMError(
                404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found."
            )
        return 200, {
            "id": f"/subscriptions/{self.subscription}/resourceGroups/{name}",
            "name": name,
            "location": location,
            "properties": {"provisioningState": "Succeeded"},
        }

    def _skus(self, query: dict[str, str]) -> dict[str, Any]:
        wanted = re.match(r"location eq '([^']+)'", query.get("$filter", ""))
        skus = []
        for location, sizes in SIZES.items():
            if wanted and wanted.group(1) != location:
                continue
            for name, (cpus, gpus, family) in sizes.items():
                capabilities = [{"name": "vCPUs", "value": str(cpus)}]
                if gpus:
                    capabilities.append({"name": "GPUs", "value": str(gpus)})
                skus.append(
                    {
                        "resourceType": "virtualMachines",
                        "name": name,
                        "tier": "Standard",
                        "size": name.removeprefix("Standard_"),
                        "family": family,
                        "locations": [location],
                        "locationInfo": [{"location": location, "zones": ["1", "2", "3"]}],
                        "capabilities": capabilities,
                        "restrictions": [],
                    }
                )
        return {"value": skus}

    def _vcpus_in_use(self, location: str) -> Counter[str]:
        """vCPUs per quota: Spot VMs count against ``lowPriorityCores`` alone, others
        against the regional total and their size's family."""
        used: Counter[str] = Counter()
        for vm in self.of_kind("virtualmachines"):
            if vm["location"] == location:
                properties = vm["properties"]
                cpus, _, family = SIZES[location][properties["hardwareProfile"]["vmSize"]]
                for quota in _quotas_of(family, properties.get("priority") == "Spot"):
                    used[quota] += cpus
        return used

    def _usages(self, location: str) -> dict[str, Any]:
        if location not in SIZES:
            raise ARMError(
                400,
                "NoRegisteredProviderFound",
                f"No registered resource provider found for location '{location}'.",
            )
        used = self._vcpus_in_use(location)
        usages = [
            {
                "unit": "Count",
                "currentValue": used[quota],
                "limit": limit,
                "name": {"value": quota, "localizedValue": QUOTA_NAMES[quota]},
            }
            for quota, limit in self.quotas[location].items()
        ]
        usages.append(
            {
                "unit": "Count",
                "currentValue": len(self.of_kind("virtualmachines")),
                "limit": 25_000,
                "name": {"value": "virtualMachines", "localizedValue": "Virtual Machines"},
            }
        )
        return {"value": usages}

    # -- long-running operations --------------------------------------------------------

    def _operation(
        self, location: str, namespace: str, done: Any = None, slow: bool = False
    ) -> dict[str, str]:
        """Start an operation; a ``slow`` one (a VM) is still running at the first poll."""
        op = uuid.uuid4().hex
        self.operations[op] = {"polls": 0 if slow else 1, "error": None, "done": done}
        url = (
            f"{self.url}/subscriptions/{self.subscription}/providers/{namespace}/locations/"
            f"{location}/operations/{op}?api-version=2025-01-01"
        )
        return {"Azure-AsyncOperation": url, "Retry-After": "1"}

    def _poll(self, op: str) -> dict[str, Any]:
        with self._lock:
            state = self.operations.get(op)
            if state is None:
                raise ARMError(404, "NotFound", f"operation {op} not found")
            state["polls"] += 1
            if state["polls"] == 1:
                return {"name": op, "status": "InProgress"}
            if state["error"] is not None:
                return {"name": op, "status": "Failed", **state["error"].body()}
            if state["done"] is not None:
                state["done"]()
                state["done"] = None
            return {"name": op, "status": "Succeeded"}

    # -- resources ----------------------------------------------------------------------

    def _id(self, match: re.Match[str]) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{match['group']}/providers/"
            f"{match['ns']}/{match['kind']}/{match['name']}"
        )

    def _get(self, resource_id: str, what: str = "Resource") -> dict[str, Any]:
        found = self.resources.get(resource_id.lower())
        if found is None:
            raise ARMError(
                404,
                "ResourceNotFound",
                f"The Resource '{resource_id.split('/providers/')[-1]}' under resource group "
                f"'{resource_id.split('/')[4]}' was not found.",
            )
        return found

    def _public(self, resource: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in resource.items() if not k.startswith("_")}

    def _instance_view(self, vm: dict[str, Any]) -> dict[str, Any]:
        # A VM whose OS shut itself down is Stopped (still allocated, still billed).
        booted = self.booter.vms.get(vm.get("_vm", ""))
        stopped = booted is not None and not booted.is_running()
        power = {"code": "PowerState/stopped"} if stopped else vm["_power"]
        return {"statuses": [{"code": "ProvisioningState/succeeded"}, power]}

    def _resource(
        self,
        method: str,
        match: re.Match[str],
        query: dict[str, str],
        raw: bytes,
        kind: str,
        action: str | None,
    ) -> tuple[int, Any, dict[str, str]] | tuple[int, Any]:
        namespace_kind = f"{match['ns']}/{match['kind']}"
        if match["name"] is None:
            if method != "GET":
                raise ARMError(405, "MethodNotAllowed", f"{method} on a collection")
            self.authorize(f"{namespace_kind}/read", path_scope(match))
            prefix = self._id(match).rsplit("/", 1)[0].lower() + "/"
            found = [
                r
                for key, r in self.resources.items()
                if key.startswith(prefix) and key.count("/") == prefix.count("/")
            ]
            items = [self._public(r) for r in found]
            if kind == "virtualmachines" and query.get("$expand") == "instanceView":
                # The list's instanceView expansion: each VM's statuses in one answer.
                for item, vm in zip(items, found, strict=True):
                    item.setdefault("properties", {})["instanceView"] = self._instance_view(vm)
            return 200, {"value": items}
        resource_id = self._id(match)
        verb = {"GET": "read", "PUT": "write", "PATCH": "write", "DELETE": "delete"}
        if action is None:
            self.authorize(f"{namespace_kind}/{verb.get(method, 'action')}", resource_id)
        else:
            suffix = "read" if method == "GET" else "action"
            self.authorize(f"{namespace_kind}/{action}/{suffix}", resource_id)
        if action == "instanceView" and method == "GET":
            return 200, self._instance_view(self._get(resource_id))
        if action == "retrieveBootDiagnosticsData" and method == "POST":
            self._get(resource_id)
            return 200, {
                "consoleScreenshotBlobUri": f"{self.url}/blobs/{match['name']}.bmp?sig=x",
                "serialConsoleLogBlobUri": f"{self.url}/blobs/{match['name']}.log?sig=x",
            }
        if kind == "virtualmachines" and action in ("deallocate", "generalize"):
            if method != "POST":
                raise ARMError(405, "MethodNotAllowed", f"{method} {action}")
            return self._capture_step(self._get(resource_id), action)
        if action is not None:
            raise ARMError(404, "NotFound", f"the stand-in has no {method} {action}")
        if method == "GET":
            return 200, self._public(self._get(resource_id))
        if method == "DELETE":
            return self._delete(resource_id, kind)
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            raise ARMError(400, "InvalidRequestContent", f"invalid JSON: {e}") from e
        self.bodies.append((kind, body))
        if method == "PATCH":
            return self._patch(resource_id, kind, body)
        if method == "PUT":
            return self._put(resource_id, match, kind, body, query["api-version"])
        raise ARMError(405, "MethodNotAllowed", method)

    def _check_common(self, match: re.Match[str], kind: str, body: dict[str, Any]) -> str:
        if hasattr(MODELS[kind], "_attribute_map"):
            check_msrest_model(MODELS[kind], body, "parameters")
        else:
            check_model(MODELS[kind], body, "parameters")
        name = match["name"]
        pattern = _VM_NAME if kind == "virtualmachines" else _NAME
        if not pattern.match(name):
            raise ARMError(
                400,
                "InvalidResourceName",
                f"Resource name {name} is invalid. The name can be up to 80 characters long. "
                "It must begin with a word character, and it must end with a word character "
                "or with '_'.",
            )
        location = body.get("location")
        if location is None:
            raise ARMError(400, "LocationRequired", "The location property is required.")
        if location not in SIZES:
            raise ARMError(
                400,
                "LocationNotAvailableForResourceType",
                f"The provided location '{location}' is not available for resource type "
                f"'{match['ns']}/{match['kind']}'.",
            )
        tags = body.get("tags") or {}
        if len(tags) > 50:
            raise ARMError(400, "InvalidTagCount", "The number of tags exceeds the limit of 50.")
        for key, value in tags.items():
            if len(key) > 512 or len(value) > 256 or set("<>%&\\?/") & set(key):
                raise ARMError(400, "InvalidTagNameCharacters", f"The tag name '{key}' is invalid.")
        return location

    def _put(
        self,
        resource_id: str,
        match: re.Match[str],
        kind: str,
        body: dict[str, Any],
        api_version: str,
    ) -> tuple[int, Any, dict[str, str]]:
        location = self._check_common(match, kind, body)
        existed = resource_id.lower() in self.resources
        properties = dict(body.get("properties") or {})
        resource = {
            "id": resource_id,
            "name": match["name"],
            "type": f"{match['ns']}/{match['kind']}",
            "location": location,
            "tags": body.get("tags") or {},
            "properties": properties,
            "_kind": kind,
            "_api_version": api_version,
        }
        if "sku" in body:
            resource["sku"] = body["sku"]
        if "identity" in body:
            resource["identity"] = body["identity"]
        if "zones" in body:
            resource["zones"] = body["zones"]
        getattr(self, f"_make_{kind}")(resource, properties)
        if kind == "userassignedidentities":  # not a long-running operation
            self.resources[resource_id.lower()] = resource
            return (200 if existed else 201), self._public(resource), {}
        properties["provisioningState"] = "Updating" if existed else "Creating"
        self.resources[resource_id.lower()] = resource

        def done() -> None:
            properties["provisioningState"] = "Succeeded"

        headers = self._operation(location, match["ns"], done, slow=kind == "virtualmachines")
        refused = resource.pop("_refused", None)
        if refused is not None:  # its allocation failed: the VM stays, Failed
            properties["provisioningState"] = "Failed"
            op = headers["Azure-AsyncOperation"].rsplit("/", 1)[-1].split("?")[0]
            self.operations[op]["error"] = refused
        return (200 if existed else 201), self._public(resource), headers

    def _patch(
        self, resource_id: str, kind: str, body: dict[str, Any]
    ) -> tuple[int, Any, dict[str, str]]:
        if kind != "disks":
            raise ARMError(405, "MethodNotAllowed", f"PATCH {kind}")
        check_model(compute_models.DiskUpdate, body, "parameters")
        disk = self._get(resource_id)
        if "tags" in body:
            disk["tags"] = body["tags"]
        return 202, None, self._operation(disk["location"], "Microsoft.Compute")

    def _refs(self, kind: str, key: str, target: str) -> list[str]:
        """Resources of ``kind`` whose JSON mentions ``target`` under ``key``."""
        needle = target.lower()
        found = []
        for resource in self.of_kind(kind):
            text = json.dumps(resource["properties"]).lower()
            if f'"{key}": {{"id": "{needle}' in text:
                found.append(resource["id"])
        return found

    def _subnet_users(self, kind: str, resource_id: str) -> list[str]:
        """Subnets that use the NAT gateway or route table ``resource_id``."""
        key = "natGateway" if kind == "natgateways" else "routeTable"
        return [
            subnet["id"]
            for vnet in self.of_kind("virtualnetworks")
            for subnet in vnet["properties"].get("subnets") or []
            if ((subnet.get("properties") or {}).get(key) or {}).get("id", "").lower()
            == resource_id.lower()
        ]

    def _delete(self, resource_id: str, kind: str) -> tuple[int, Any, dict[str, str]]:
        resource = self.resources.get(resource_id.lower())
        if resource is None:
            return 204, None, {}
        if kind == "networksecuritygroups" and (
            users := self._refs("networkinterfaces", "networkSecurityGroup", resource_id)
        ):
            raise ARMError(
                400,
                "InUseNetworkSecurityGroupCannotBeDeleted",
                f"Network security group {resource_id} cannot be deleted because it is in "
                f"use by the following resources: {users}.",
            )
        if kind == "virtualnetworks" and (
            users := self._refs("networkinterfaces", "subnet", resource_id + "/subnets/")
        ):
            raise ARMError(
                400,
                "InUseSubnetCannotBeDeleted",
                f"Subnet of {resource_id} is in use by {users} and cannot be deleted.",
            )
        if kind in ("natgateways", "routetables") and (
            users := self._subnet_users(kind, resource_id)
        ):
            what = "NatGateway" if kind == "natgateways" else "RouteTable"
            raise ARMError(
                400,
                f"InUse{what}CannotBeDeleted",
                f"{what} {resource_id} is in use by {users} and cannot be deleted.",
            )
        if kind == "publicipaddresses" and (
            users := self._refs("networkinterfaces", "publicIPAddress", resource_id)
            + [
                nat["id"]
                for nat in self.of_kind("natgateways")
                if resource_id.lower() in json.dumps(nat["properties"]).lower()
            ]
        ):
            raise ARMError(
                400,
                "PublicIPAddressCannotBeDeleted",
                f"Public IP address {resource_id} can not be deleted since it is still "
                f"allocated to resource {users[0]}.",
            )
        if kind == "networkinterfaces" and resource["properties"].get("virtualMachine"):
            raise ARMError(
                400,
                "NicInUse",
                f"Network Interface {resource_id} is used by existing resource "
                f"{resource['properties']['virtualMachine']['id']}.",
            )
        if kind == "disks" and resource.get("managedBy"):
            raise ARMError(
                409,
                "OperationNotAllowed",
                f"Disk {resource['name']} is attached to VM {resource['managedBy']}.",
            )
        if kind == "virtualmachines":
            self._authorize_cascade(resource)
            self._delete_vm(resource)
        del self.resources[resource_id.lower()]
        if kind == "userassignedidentities":
            return 200, None, {}
        return (
            202,
            None,
            self._operation(
                resource["location"], resource["type"].split("/")[0], slow=kind == "virtualmachines"
            ),
        )

    # -- what each kind does on PUT -----------------------------------------------------

    def _make_virtualnetworks(self, resource: dict[str, Any], properties: dict[str, Any]) -> None:
        space = [
            ipaddress.ip_network(p)
            for p in (properties.get("addressSpace") or {}).get("addressPrefixes", [])
        ]
        if not space:
            raise ARMError(400, "InvalidAddressSpace", "addressSpace.addressPrefixes is empty")
        for subnet in properties.get("subnets") or []:
            prefix = ipaddress.ip_network((subnet.get("properties") or {})["addressPrefix"])
            if not any(prefix.subnet_of(s) for s in space):
                raise ARMError(
                    400,
                    "NetcfgSubnetRangeOutsideVnet",
                    f"Subnet '{subnet['name']}' is not valid because its IP address range "
                    "is outside the IP address range of virtual network.",
                )
            subnet["id"] = f"{resource['id']}/subnets/{subnet['name']}"
            subnet["properties"]["provisioningState"] = "Succeeded"
            self._check_subnet_refs(subnet)
            if (
                "defaultOutboundAccess" not in subnet["properties"]
                and resource["_api_version"] >= PRIVATE_SUBNETS_FROM
            ):
                subnet["properties"]["defaultOutboundAccess"] = False

    def _check_subnet_refs(self, subnet: dict[str, Any]) -> None:
        """What a subnet refers to (NAT gateway, route table, NSG) must exist."""
        properties = subnet["properties"]
        for key in ("natGateway", "routeTable", "networkSecurityGroup"):
            if ref := properties.get(key):
                self._reference(ref.get("id", ""), key)

    def _make_networksecuritygroups(
        self, resource: dict[str, Any], properties: dict[str, Any]
    ) -> None:
        priorities = set()
        for rule in properties.get("securityRules") or []:
            p = rule.get("properties") or {}
            for required in ("priority", "direction", "access", "protocol"):
                if required not in p:
                    raise ARMError(
                        400,
                        "SecurityRuleParameterMissing",
                        f"Security rule {rule.get('name')} is missing {required}.",
                    )
            if not 100 <= p["priority"] <= 4096:
                raise ARMError(
                    400, "SecurityRuleInvalidPriority", f"Priority {p['priority']} is invalid."
                )
            if (p["direction"], p["priority"]) in priorities:
                raise ARMError(
                    400, "SecurityRulesConflictingPriority", f"Priority {p['priority']} twice."
                )
            priorities.add((p["direction"], p["priority"]))
            for side in ("source", "destination"):
                single = p.get(f"{side}AddressPrefix")
                many = p.get(f"{side}AddressPrefixes")
                if bool(single) == bool(many):
                    raise ARMError(
                        400,
                        "SecurityRuleInvalidAddressPrefix",
                        f"Security rule {rule['name']} needs exactly one of {side}AddressPrefix "
                        f"and {side}AddressPrefixes.",
                    )
            rule["id"] = f"{resource['id']}/securityRules/{rule['name']}"

    def _make_publicipaddresses(self, resource: dict[str, Any], properties: dict[str, Any]) -> None:
        sku = (resource.get("sku") or {}).get("name", "Basic")
        if sku == "Standard" and properties.get("publicIPAllocationMethod") != "Static":
            raise ARMError(
                400,
                "StandardSkuPublicIPAddressesMustBeStatic",
                f"Standard sku publicIp {resource['id']} must have AllocationMethod set to Static.",
            )
        properties["ipAddress"] = f"203.0.113.{len(self.of_kind('publicipaddresses')) + 10}"

    def _make_natgateways(self, resource: dict[str, Any], properties: dict[str, Any]) -> None:
        resource.setdefault("sku", {"name": "Standard"})
        for key in ("publicIpAddresses", "publicIpPrefixes"):
            for ref in properties.get(key) or []:
                self._reference(ref.get("id", ""), key)
        for ref in properties.get("publicIpAddresses") or []:
            address = self.resources[ref["id"].lower()]
            if (address.get("sku") or {}).get("name", "Basic") != "Standard":
                raise ARMError(
                    400,
                    "NatGatewayCannotUseBasicSkuPublicIp",
                    f"NAT gateway {resource['id']} cannot use Basic sku public IP {ref['id']}.",
                )
            holders = self._refs("networkinterfaces", "publicIPAddress", ref["id"]) + [
                nat["id"]
                for nat in self.of_kind("natgateways")
                if nat["id"].lower() != resource["id"].lower()
                and ref["id"].lower() in json.dumps(nat["properties"]).lower()
            ]
            if holders:
                raise ARMError(
                    400,
                    "PublicIPAddressInUse",
                    f"Resource {resource['id']} is referencing public IP address {ref['id']} "
                    f"that is already allocated to resource {holders[0]}.",
                )

    def _make_routetables(self, resource: dict[str, Any], properties: dict[str, Any]) -> None:
        for route in properties.get("routes") or []:
            p = route.get("properties") or {}
            if not p.get("addressPrefix") or not p.get("nextHopType"):
                raise ARMError(
                    400,
                    "InvalidRequestFormat",
                    f"Route {route.get('name')} needs addressPrefix and nextHopType.",
                )
            appliance = p["nextHopType"].lower() in ("virtualappliance", "virtualapplianceecmp")
            if appliance != bool(p.get("nextHopIpAddress")):
                raise ARMError(
                    400,
                    "InvalidRequestFormat",
                    f"Route {route.get('name')}: nextHopIpAddress is required with the "
                    "next hop type VirtualAppliance, and allowed with no other.",
                )
            route["id"] = f"{resource['id']}/routes/{route.get('name')}"

    def _make_networkinterfaces(self, resource: dict[str, Any], properties: dict[str, Any]) -> None:
        if nsg := properties.get("networkSecurityGroup"):
            self._reference(nsg["id"], "networkSecurityGroup")
        configs = properties.get("ipConfigurations") or []
        if not configs:
            raise ARMError(400, "InvalidRequestFormat", "A NIC needs an ipConfiguration.")
        for config in configs:
            p = config.setdefault("properties", {})
            subnet_id = (p.get("subnet") or {}).get("id", "")
            vnet_id, _, subnet_name = subnet_id.partition("/subnets/")
            vnet = self._reference(vnet_id, "subnet")
            subnet = next(
                (s for s in vnet["properties"].get("subnets", []) if s["name"] == subnet_name),
                None,
            )
            if subnet is None:
                raise ARMError(
                    400, "InvalidResourceReference", f"Resource {subnet_id} was not found."
                )
            if ip := p.get("publicIPAddress"):
                self._reference(ip["id"], "publicIPAddress")
            p["privateIPAddress"] = self._free_address(subnet)
            config["id"] = f"{resource['id']}/ipConfigurations/{config['name']}"

    def _free_address(self, subnet: dict[str, Any]) -> str:
        """The lowest address of ``subnet`` no NIC holds, past the ones Azure keeps (the
        first four and the last), as Azure's dynamic allocation picks it."""
        network = ipaddress.ip_network(subnet["properties"]["addressPrefix"])
        held = {
            config["properties"].get("privateIPAddress")
            for nic in self.of_kind("networkinterfaces")
            for config in nic["properties"].get("ipConfigurations") or []
            if (config["properties"].get("subnet") or {}).get("id", "").lower()
            == subnet["id"].lower()
        }
        for offset in range(RESERVED_AT_START, network.num_addresses - 1):
            address = str(network.network_address + offset)
            if address not in held:
                return address
        raise ARMError(
            400,
            "SubnetIsFull",
            f"Subnet {subnet['name']} with address prefix {network} does not have enough "
            "capacity for 1 IP addresses.",
        )

    # -- whether a VM has a route out, from this stand-in's model of the network ---------

    def egress(self, nic: dict[str, Any]) -> bool:
        """Whether a VM on ``nic`` reaches the internet, as Azure's routing would have
        it: the subnet's 0.0.0.0/0 route first (to None: nothing; to an appliance: out),
        then a public address on the NIC, a NAT gateway with a public address, default
        outbound access."""
        config = nic["properties"]["ipConfigurations"][0]["properties"]
        subnet = self._subnet(config["subnet"]["id"])["properties"]
        hop = self._default_hop(subnet)
        if hop == "none":
            return False
        if hop in APPLIANCE_HOPS or config.get("publicIPAddress"):
            return True
        if nat := subnet.get("natGateway"):
            gateway = self.resources.get(nat["id"].lower())
            nat_props = (gateway or {}).get("properties") or {}
            return bool(nat_props.get("publicIpAddresses") or nat_props.get("publicIpPrefixes"))
        return subnet.get("defaultOutboundAccess", True) is not False

    # -- who may come in from outside, through a VM's public address (clouds.reach) -------

    def _public_address_of(self, nic: dict[str, Any]) -> str | None:
        config = nic["properties"]["ipConfigurations"][0]["properties"]
        ref = (config.get("publicIPAddress") or {}).get("id", "")
        address = self.resources.get(ref.lower())
        return ((address or {}).get("properties") or {}).get("ipAddress")

    def _admits(self, nic_id: str) -> reach.Admits:
        """The NIC's network security group as it stands when a connection comes in."""

        def admits(source: str, port: int) -> bool:
            with reach.briefly(self._lock):
                nic = self.resources.get(nic_id.lower())
                nsg_id = ((nic or {}).get("properties") or {}).get("networkSecurityGroup") or {}
                nsg = self.resources.get(nsg_id.get("id", "").lower())
                return inbound_allowed(nsg, source, port)

        return admits

    def _subnet(self, subnet_id: str) -> dict[str, Any]:
        vnet_id, _, name = subnet_id.partition("/subnets/")
        vnet = self._reference(vnet_id, "subnet")
        for subnet in vnet["properties"].get("subnets") or []:
            if subnet["name"] == name:
                return subnet
        raise ARMError(400, "InvalidResourceReference", f"Resource {subnet_id} was not found.")

    def _default_hop(self, subnet: dict[str, Any]) -> str | None:
        """The next hop type (lower case) of the subnet's 0.0.0.0/0 route, if it has one."""
        table = self.resources.get(((subnet.get("routeTable") or {}).get("id") or "").lower())
        for route in ((table or {}).get("properties") or {}).get("routes") or []:
            if route["properties"]["addressPrefix"] == "0.0.0.0/0":
                return str(route["properties"]["nextHopType"]).lower()
        return None

    def _reference(self, resource_id: str, what: str) -> dict[str, Any]:
        found = self.resources.get(resource_id.lower())
        if found is None:
            raise ARMError(
                400,
                "InvalidResourceReference",
                f"Resource {resource_id} referenced by {what} was not found.",
            )
        return found

    def _make_virtualmachines(self, resource: dict[str, Any], properties: dict[str, Any]) -> None:
        location = resource["location"]
        size = (properties.get("hardwareProfile") or {}).get("vmSize")
        if size not in SIZES[location]:
            raise ARMError(
                400,
                "InvalidParameter",
                f"The value {size} provided for the VM size is not valid. The valid sizes in "
                f"the current region are: {', '.join(SIZES[location])}.",
                "vmSize",
            )
        cores, _, family = SIZES[location][size]
        used = self._vcpus_in_use(location)
        for quota in _quotas_of(family, properties.get("priority") == "Spot"):
            limit = self.quotas[location][quota]
            if used[quota] + cores > limit:
                raise ARMError(
                    409,
                    "OperationNotAllowed",
                    "Operation could not be completed as it results in exceeding approved "
                    f"{_QUOTA_IN_ERRORS.get(quota, quota + ' Cores')} quota. Additional details - "
                    f"Deployment Model: Resource Manager, Location: {location}, Current Limit: "
                    f"{limit}, Current Usage: {used[quota]}, Additional Required: {cores}, "
                    f"(Minimum) New Limit Required: {used[quota] + cores}.",
                )
        os_profile = properties.get("osProfile") or {}
        if not os_profile.get("adminUsername") or not os_profile.get("computerName"):
            raise ARMError(
                400, "InvalidParameter", "Required parameter 'adminUsername' is missing (null)."
            )
        linux = os_profile.get("linuxConfiguration") or {}
        keys = ((linux.get("ssh") or {}).get("publicKeys")) or []
        if linux.get("disablePasswordAuthentication") and not keys:
            raise ARMError(
                400,
                "InvalidParameter",
                "Authentication using either SSH or by user name and password must be "
                "enabled in Linux profile.",
                "linuxConfiguration",
            )
        for key in keys:
            if not key.get("keyData", "").startswith(("ssh-rsa ", "ssh-ed25519 ")):
                raise ARMError(400, "InvalidParameter", "The SSH public key is not valid.")
        try:
            custom_data = base64.b64decode(os_profile.get("customData", ""), validate=True)
        except binascii.Error as e:
            raise ARMError(
                400, "InvalidParameter", "Custom data in OSProfile must be in Base64 encoding"
            ) from e
        if len(custom_data) > CUSTOM_DATA_LIMIT:
            raise ARMError(
                400,
                "InvalidParameter",
                "Custom data in OSProfile must be in Base64 encoding and with a maximum "
                "length of 87380 characters.",
                "customData",
            )
        if properties.get("priority") == "Spot" and not properties.get("evictionPolicy"):
            raise ARMError(
                400, "InvalidParameter", "evictionPolicy is required for Spot priority VMs."
            )
        identity = resource.get("identity") or {}
        for identity_id, value in (identity.get("userAssignedIdentities") or {}).items():
            found = self.resources.get(identity_id.lower())
            if found is None or found["_kind"] != "userassignedidentities":
                raise ARMError(
                    400,
                    "FailedIdentityOperation",
                    f"Identity operation for resource '{resource['id']}' failed with error "
                    f"'Failed to perform resource identity operation. Status: 'NotFound'. "
                    f"Response: 'Resource '{identity_id}' does not exist.''.",
                )
            self.authorize(
                "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action",
                found["id"],
                linked=True,
            )
            value.update(
                principalId=found["properties"]["principalId"],
                clientId=found["properties"]["clientId"],
            )
        nic_refs = (properties.get("networkProfile") or {}).get("networkInterfaces") or []
        if not nic_refs:
            raise ARMError(400, "InvalidParameter", "A VM needs a network interface.")
        nics = [self._reference(ref["id"], "networkInterfaces") for ref in nic_refs]
        for nic in nics:
            if nic["properties"].get("virtualMachine"):
                raise ARMError(400, "NicInUse", f"NIC {nic['id']} is used by another VM.")
            nic["properties"]["virtualMachine"] = {"id": resource["id"]}
        os_disk = (properties.get("storageProfile") or {}).get("osDisk") or {}
        disk_name = os_disk.get("name") or f"{resource['name']}_OsDisk_1_{uuid.uuid4().hex}"
        disk_id = (
            resource["id"].split("/providers/")[0]
            + f"/providers/Microsoft.Compute/disks/{disk_name}"
        )
        os_disk.setdefault("managedDisk", {})["id"] = disk_id
        # The OS disk is made with the VM and, as on Azure, does not inherit its tags.
        self.resources[disk_id.lower()] = {
            "id": disk_id,
            "name": disk_name,
            "type": "Microsoft.Compute/disks",
            "location": location,
            "tags": {},
            "managedBy": resource["id"],
            "properties": {"diskSizeGB": os_disk.get("diskSizeGB", 30), "diskState": "Attached"},
            "_kind": "disks",
        }
        refused = self._allocation_refused(resource, size)
        if refused is not None:
            resource["_refused"] = refused
            resource["_vm"] = ""
            resource["_power"] = {"code": "PowerState/deallocated"}
            return
        tags = resource["tags"]
        cluster = tags.get(CLUSTER_TAG, "untagged")
        address = nics[0]["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"]
        vm = imaging.boot(
            self.booter,
            self._image_held((properties.get("storageProfile") or {}).get("imageReference")),
            custom_data,
            address=address,
            cluster_id=cluster,
            name=resource["name"].removeprefix(f"{cluster}-"),
            role=tags.get("dask-secure-cloud-role", "worker"),
            egress=self.egress(nics[0]),
        )
        resource["_vm"] = vm.vm_id
        resource["_address"] = address
        public = self._public_address_of(nics[0])
        reach.declare(address, public, self._admits(nics[0]["id"]) if public else None)
        resource["_power"] = {"code": "PowerState/running"}
        properties["vmId"] = str(uuid.uuid4())
        properties["timeCreated"] = time.strftime("%Y-%m-%dT%H:%M:%S.0000000+00:00", time.gmtime())

    def _image_held(self, reference: dict[str, Any] | None) -> Any:
        """What the managed image a VM is made from held (``None``: a Marketplace image)."""
        image_id = (reference or {}).get("id")
        if not image_id:
            return None
        image = self.resources.get(image_id.lower())
        if image is None or image["_kind"] != "images":
            raise ARMError(
                404,
                "ImageNotFound",
                f"The platform image '{image_id}' is not available.",
                "imageReference",
            )
        return image["_held"]

    def _capture_step(self, vm: dict[str, Any], action: str) -> tuple[int, Any, dict[str, str]]:
        """``deallocate`` (the OS disk keeps what the VM wrote; compute is released) and
        ``generalize`` (only of a stopped or deallocated VM): what capturing a VM into a
        managed image takes."""
        power = self._instance_view(vm)["statuses"][1]["code"]
        disk_id = vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"].lower()
        if action == "generalize":
            if power not in ("PowerState/stopped", "PowerState/deallocated"):
                raise ARMError(
                    409,
                    "OperationNotAllowed",
                    "Operation 'generalize' is not allowed on VM since the VM is running. "
                    "Please stop or deallocate the VM and retry the operation.",
                )
            vm["_generalized"] = True
            return 200, None, {}
        if vm.get("_vm") and disk_id in self.resources:
            self.resources[disk_id]["_held"] = imaging.capture(self.booter, vm["_vm"])
            self.booter.stop(vm["_vm"])
        vm["_power"] = {"code": "PowerState/deallocated"}
        return 202, None, self._operation(vm["location"], "Microsoft.Compute")

    def _make_images(self, resource: dict[str, Any], properties: dict[str, Any]) -> None:
        source = (properties.get("sourceVirtualMachine") or {}).get("id")
        if not source:
            raise ARMError(
                400, "InvalidParameter", "stand-in: an image is made from sourceVirtualMachine"
            )
        vm = self._reference(source, "virtualMachines")
        if not vm.get("_generalized"):
            raise ARMError(
                409,
                "OperationNotAllowed",
                f"The operation 'Create Image' is not allowed on VM '{vm['name']}' since the "
                "VM is not generalized.",
            )
        disk_id = vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"]
        disk = self._get(disk_id)
        resource["_held"] = disk.get("_held", {})
        properties["storageProfile"] = {
            "osDisk": {
                "osType": "Linux",
                "osState": "Generalized",
                "diskSizeGB": disk["properties"].get("diskSizeGB", 30),
            }
        }

    def _authorize_cascade(self, vm: dict[str, Any]) -> None:
        """Deleting a VM deletes its NIC, public address and OS disk where their
        ``deleteOption`` says ``Delete``: modelled as actions on each of them, which the
        caller must be allowed (``LinkedAuthorizationFailed`` otherwise)."""
        properties = vm["properties"]
        for ref in properties["networkProfile"]["networkInterfaces"]:
            nic = self.resources.get(ref["id"].lower())
            if nic is None or (ref.get("properties") or {}).get("deleteOption") != "Delete":
                continue
            self.authorize("Microsoft.Network/networkInterfaces/delete", nic["id"], linked=True)
            for config in nic["properties"]["ipConfigurations"]:
                ip = (config["properties"].get("publicIPAddress") or {}).get("id")
                address = self.resources.get((ip or "").lower())
                if address and address["properties"].get("deleteOption") == "Delete":
                    self.authorize(
                        "Microsoft.Network/publicIPAddresses/delete", address["id"], linked=True
                    )
        os_disk = properties["storageProfile"]["osDisk"]
        if os_disk.get("deleteOption") == "Delete" and os_disk["managedDisk"]["id"].lower() in (
            self.resources
        ):
            self.authorize(
                "Microsoft.Compute/disks/delete", os_disk["managedDisk"]["id"], linked=True
            )

    def _make_userassignedidentities(
        self, resource: dict[str, Any], properties: dict[str, Any]
    ) -> None:
        existing = self.resources.get(resource["id"].lower())
        if existing is not None:  # an update keeps the identity's principal
            properties.update(existing["properties"])
            return
        properties.update(
            tenantId=self.tenant, principalId=str(uuid.uuid4()), clientId=str(uuid.uuid4())
        )

    def _delete_vm(self, vm: dict[str, Any]) -> None:
        if vm["_vm"]:  # a VM whose allocation failed never booted
            self.booter.stop(vm["_vm"])
        if address := vm.get("_address"):
            reach.forget(address)
        properties = vm["properties"]
        for ref in properties["networkProfile"]["networkInterfaces"]:
            nic = self.resources.get(ref["id"].lower())
            if nic is None:
                continue
            nic["properties"].pop("virtualMachine", None)
            if (ref.get("properties") or {}).get("deleteOption") == "Delete":
                for config in nic["properties"]["ipConfigurations"]:
                    ip = (config["properties"].get("publicIPAddress") or {}).get("id")
                    address = self.resources.get((ip or "").lower())
                    if address and address["properties"].get("deleteOption") == "Delete":
                        del self.resources[ip.lower()]
                del self.resources[ref["id"].lower()]
        os_disk = properties["storageProfile"]["osDisk"]
        disk_id = os_disk["managedDisk"]["id"].lower()
        if disk_id in self.resources:
            if os_disk.get("deleteOption") == "Delete":
                del self.resources[disk_id]
            else:
                self.resources[disk_id]["managedBy"] = None

    def _blob(self, path: str) -> tuple[int, Any, dict[str, str]]:
        name = path.removeprefix("/blobs/").rsplit(".", 1)[0]
        for vm in self.of_kind("virtualmachines"):
            if vm["name"] == name:
                booted = self.booter.vms.get(vm["_vm"])
                return 200, (booted.console_output() if booted else "").encode(), {}
        return 404, {"error": {"code": "BlobNotFound", "message": path}}, {}

    # -- server ---------------------------------------------------------------------------

    def _answer(
        self, method: str, path: str, query: dict[str, str], body: bytes, headers: Any
    ) -> tuple[int, Any, dict[str, str]]:
        try:
            return self.handle(method, path, query, body, headers)
        except ARMError as e:
            return e.status, e.body(), {"x-ms-request-id": str(uuid.uuid4()), **e.headers}


def inbound_allowed(nsg: dict[str, Any] | None, source: str, port: int) -> bool:
    """Whether an NSG lets ``source`` (an address on the internet) in on TCP ``port``:
    its inbound rules in priority order, the first that matches deciding; none matching,
    Azure's default rules, which admit only the virtual network and the load balancer.
    No NSG at all: a Standard public address is closed to inbound traffic."""
    if nsg is None:
        return False
    address = ipaddress.ip_address(source)

    def matches(prefixes: list[str]) -> bool:
        for prefix in prefixes:
            if prefix in ("*", "Internet"):
                return True
            try:
                if address in ipaddress.ip_network(prefix, strict=False):
                    return True
            except ValueError:  # another service tag: VirtualNetwork, AzureLoadBalancer
                continue
        return False

    def covers(ranges: list[str]) -> bool:
        for entry in ranges:
            low, _, high = entry.partition("-")
            if entry == "*" or (low.isdigit() and int(low) <= port <= int(high or low)):
                return True
        return False

    rules = sorted(
        (r["properties"] for r in nsg["properties"].get("securityRules") or []),
        key=lambda p: p["priority"],
    )
    for p in rules:
        if p["direction"] != "Inbound" or p.get("protocol", "*") not in ("*", "Tcp"):
            continue
        sources = p.get("sourceAddressPrefixes") or [p.get("sourceAddressPrefix", "")]
        ports = p.get("destinationPortRanges") or [p.get("destinationPortRange", "")]
        if matches(sources) and covers(ports):
            return bool(p["access"] == "Allow")
    return False


def _quotas_of(family: str, spot: bool) -> list[str]:
    """The vCPU quotas one VM of ``family`` counts against."""
    return ["lowPriorityCores"] if spot else ["cores", family]


class ScheduledEvents:
    """Just enough of Azure's instance metadata service for a Spot eviction notice:
    ``GET /metadata/scheduledevents`` with the ``Metadata: true`` header, answered with
    no events until :meth:`evict`, then a ``Preempt``. ``address`` is where the VMs reach
    it: 127.0.0.1 for process VMs, the guest bed's host address for guests."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        evicting = self.evicting = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("Metadata") != "true":
                    status = 400
                    body = b'{"error": "Bad request. Required metadata header not specified"}'
                elif evicting.is_set():
                    status = 200
                    body = b'{"DocumentIncarnation": 2, "Events": [{"EventType": "Preempt"}]}'
                else:
                    status, body = 200, b'{"DocumentIncarnation": 1, "Events": []}'
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((address, 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://{address}:{self._server.server_address[1]}"

    def evict(self) -> None:
        self.evicting.set()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def path_scope(match: re.Match[str]) -> str:
    """The resource group of a collection path, the scope a listing is read at."""
    return f"/subscriptions/{match['sub']}/resourceGroups/{match['group']}"


def _wildcard(pattern: str, action: str) -> bool:
    """Whether a role's action pattern (``*`` wildcards, any case) covers ``action``."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, action, re.IGNORECASE) is not None


def _process_vm_id(port: int, server_port: int) -> str | None:
    """The ``DSC_VM_ID`` of the process holding the local end ``port`` of a connection
    to ``server_port`` on this machine's loopback, from /proc."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table, encoding="ascii").read().splitlines()[1:]  # noqa: SIM115
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote = fields[1].rsplit(":", 1)[1], fields[2].rsplit(":", 1)[1]
            if int(local, 16) == port and int(remote, 16) == server_port:
                inode = fields[9]
                break
        if inode:
            break
    if not inode:
        return None
    wanted = f"socket:[{inode}]"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if not any(os.readlink(f"/proc/{entry}/fd/{fd}") == wanted for fd in fds):
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                for item in f.read().split(b"\0"):
                    if item.startswith(b"DSC_VM_ID="):
                        return item.removeprefix(b"DSC_VM_ID=").decode()
        except OSError:
            continue
    return None


class InstanceMetadata:
    """Azure's instance metadata service as a stand-in's VMs see it: managed identity
    tokens at ``/metadata/identity/oauth2/token`` (``Metadata: true`` required), each
    bound to one identity of the calling VM and one ``resource``, which ARM then holds
    to that identity's role assignments."""

    def __init__(self, stand_in: AzureStandIn, address: str = "127.0.0.1") -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path, _, raw_query = self.path.partition("?")
                query = {k: v[0] for k, v in parse_qs(raw_query).items()}
                if self.headers.get("Metadata") != "true":
                    status, body = (
                        400,
                        {
                            "error": "invalid_request",
                            "error_description": "Required metadata header not specified",
                        },
                    )
                elif path != "/metadata/identity/oauth2/token":
                    status, body = 404, {"error": "not_found"}
                else:
                    host, port = self.client_address[:2]
                    vm = stand_in.vm_calling(host, port, self.server.server_address[1])
                    status, body = stand_in.identity_token(vm, query)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((address, 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://{address}:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
