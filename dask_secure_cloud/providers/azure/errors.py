"""Azure Resource Manager's errors, as the package's: one table from its error codes and
HTTP statuses to the kinds of :class:`~dask_secure_cloud.errors.CloudError`, and a
sentence for each that names the option to change.
"""

from __future__ import annotations

import logging

from azure.core.exceptions import (
    HttpResponseError,
)

from ... import errors

logger = logging.getLogger(__name__)


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


#: ARM's codes for a zone or region with no capacity for the size (or for Spot VMs of
#: it) now: another zone, on-demand, or later may have it.
_CAPACITY_CODES = frozenset(
    {
        "AllocationFailed",
        "ZonalAllocationFailed",
        "SkuNotAvailable",
        "OverconstrainedAllocationRequest",
        "OverconstrainedZonalAllocationRequest",
    }
)


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
    if code in _CAPACITY_CODES:
        return (
            f"{what}: {code}: {message}. Azure has no capacity for this size here now: "
            "another zone, another VM size (scheduler_vm_size, worker_vm_size) or later"
        )
    if code == "InvalidTemplateDeployment" or target == "vmSize":
        return (
            f"{what}: {code}: {message}. Choose another VM size (scheduler_vm_size, worker_vm_size)"
        )
    return f"{what} failed: {code}: {message}"


#: ARM's error codes and HTTP statuses -> the kind of CloudError each is (see
#: errors.cloud_error). A throttled answer (429) is read first, then ARM's own code,
#: then the status.
error_kinds: errors.ErrorKinds = {
    "429": errors.ThrottledError,
    **dict.fromkeys(_IN_USE_CODES, errors.InUseError),
    **dict.fromkeys(_FORBIDDEN_CODES, errors.ForbiddenError),
    **dict.fromkeys(_CAPACITY_CODES, errors.CapacityError),
    **dict.fromkeys(_QUOTA_CODES, errors.QuotaError),
    "404": errors.NotFoundError,
    "401": errors.ForbiddenError,
    "403": errors.ForbiddenError,
}


def _arm_error(what: str, error: HttpResponseError, resource_group: str) -> errors.CloudError:
    """An ARM error as the kind its status or error code says (:data:`error_kinds`)."""
    message = _explain(what, error, resource_group)
    code, status = _error_code(error), str(error.status_code or "")
    keys = ([status] if status == "429" else []) + [code, status]
    kind = next((error_kinds[k] for k in keys if k in error_kinds), errors.CloudError)
    return kind(message, code)
