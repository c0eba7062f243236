"""``AzureVMCluster``'s options."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

from ..errors import OptionError
from .base import (
    _choice,
    _matching,
    _network,
    _number,
    _path,
    _strings_to_strings,
    _text,
    _url,
    _whole,
    option,
)
from .shared import VPCOptions

_AZURE_TAG_FORBIDDEN = set("<>%&\\?/")


def _azure_tags(value: Any, name: str) -> dict[str, str]:
    tags = _strings_to_strings(value, name)
    for key, text in tags.items():
        if len(key) > 512 or len(text) > 256 or _AZURE_TAG_FORBIDDEN & set(key):
            raise OptionError(
                f"{name}: {key!r} is not an Azure tag (names up to 512 characters without "
                "< > % & \\ ? /, values up to 256)"
            )
    if len(tags) > 48:
        raise OptionError(f"{name}: Azure allows 50 tags per resource, the cluster uses 2")
    return tags


def _vm_size(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.startswith(("Standard_", "Basic_")):
        raise OptionError(
            f"{name} must be an Azure VM size such as 'Standard_D4s_v5', got {value!r}"
        )
    return value


#: An ARM resource id of a user-assigned managed identity (names: 3 to 128 characters,
#: letters, digits, hyphens and underscores, starting with a letter or digit).
_IDENTITY_ID = re.compile(
    r"/subscriptions/[0-9a-fA-F-]{36}/resourceGroups/[-\w._()]{1,90}/providers/"
    r"Microsoft\.ManagedIdentity/userAssignedIdentities/[a-zA-Z0-9][-\w]{2,127}",
    re.IGNORECASE,
)


def _identity_id(value: Any, name: str) -> str:
    """The full resource id ARM wants in a VM's ``identity.userAssignedIdentities``: a
    name alone, a client id or a principal id (GUIDs) is refused here, before anything
    is made, rather than by ARM after the network exists."""
    if not isinstance(value, str) or not _IDENTITY_ID.fullmatch(value):
        raise OptionError(
            f"{name} must be the resource id of a user-assigned managed identity, "
            "'/subscriptions/<subscription id>/resourceGroups/<group>/providers/"
            f"Microsoft.ManagedIdentity/userAssignedIdentities/<name>', got {value!r}. "
            "Find it with: az identity show -g <group> -n <name> --query id -o tsv"
        )
    return value


def _optional_boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise OptionError(
            f"{name} must be True, False or None (None: on when this identity may assign "
            f"roles), got {value!r}"
        )
    return value


def _spot_price(value: Any, name: str) -> float:
    price = _number(value, name)
    if price != -1 and price <= 0:
        raise OptionError(
            f"{name} must be -1 (up to the on-demand price) or a price above 0, got {value!r}"
        )
    return price


@dataclasses.dataclass(frozen=True)
class AzureOptions(VPCOptions):
    provider: ClassVar[str] = "azure"

    resource_group: str | None = option(
        None,
        "An existing resource group; every resource of the cluster is made in it. Required.",
        types=("string", "null"),
        check=_text,
        note="required: an existing resource group",
    )
    location: str | None = option(
        None,
        "Region, for example ``'westeurope'``. Default: the resource group's.",
        types=("string", "null"),
        check=_matching(r"[a-z0-9]+", "westeurope"),
        note="null: the resource group's location",
    )
    subscription_id: str | None = option(
        None,
        """
        Default: ``AZURE_SUBSCRIPTION_ID``, then the one subscription the credential sees.
        """,
        types=("string", "null"),
        check=_text,
        note="null: AZURE_SUBSCRIPTION_ID, then the credential's only one",
    )
    cloud: str = option(
        "public",
        """
        ``"public"``, ``"usgovernment"`` or ``"china"``: picks the resource-manager
        endpoint and sign-in authority.
        """,
        types="string",
        check=_choice("public", "usgovernment", "china"),
        enum=("public", "usgovernment", "china"),
    )
    resource_manager_url: str | None = option(
        None,
        "Another resource-manager endpoint (Azure Stack, a test stand-in).",
        types=("string", "null"),
        check=_url,
        note="null: the cloud's endpoint",
    )
    ca_bundle: str | None = option(
        None,
        "A CA bundle to verify the endpoint's TLS certificate with (a TLS-inspecting proxy).",
        types=("string", "null"),
        check=_path,
    )
    scheduler_vm_size: str = option(
        "Standard_D2s_v5", "VM size of the scheduler.", types="string", check=_vm_size
    )
    worker_vm_size: str = option(
        "Standard_D4s_v5",
        "VM size of the workers; a GPU size gives the workers' containers its GPUs.",
        types="string",
        check=_vm_size,
    )
    image: str = option(
        "Canonical:ubuntu-24_04-lts:server:latest",
        "``publisher:offer:sku:version``. Default: Ubuntu 24.04 LTS.",
        types="string",
        check=_matching(
            r"[^:\s]+:[^:\s]+:[^:\s]+:[^:\s]+",
            "Canonical:ubuntu-24_04-lts:server:latest",
            "'publisher:offer:sku:version'",
        ),
    )
    disk_size: int = option(
        64,
        "OS disk size in GiB, deleted with the VM.",
        types="integer",
        check=_whole(30, " of GiB"),
        note="GiB, deleted with the VM",
    )
    disk_type: str = option("Premium_LRS", "OS disk storage type.", types="string", check=_text)
    spot_max_price: float = option(
        -1,
        "Highest hourly price for Spot workers; ``-1`` pays up to the on-demand price.",
        types="number",
        check=_spot_price,
        note="-1: up to the on-demand price",
    )
    tags: dict[str, str] = option(
        {}, "Extra tags for every resource.", types="object", check=_azure_tags
    )
    vnet: str | None = option(
        None,
        """
        An existing virtual network (name in the resource group, or resource id); never
        modified or deleted. Default: a vnet made for (and deleted with) the cluster.
        Required with ``use_private_ip=True``: the vnet the client runs in or reaches.
        """,
        types=("string", "null"),
        check=_text,
        note="null: a vnet made for (and deleted with) the cluster",
    )
    subnet: str | None = option(
        None,
        "A subnet of ``vnet``. Default: its first.",
        types=("string", "null"),
        check=_text,
    )
    network_security_group: str | None = option(
        None,
        """
        An existing NSG (name or id) to attach instead of the per-cluster ones; used as it
        is, never modified or deleted.
        """,
        types=("string", "null"),
        check=_text,
        note="null: NSGs made for (and deleted with) the cluster",
    )
    address_prefix: str = option(
        "10.77.0.0/16",
        "Address range of the vnet made for the cluster.",
        types="string",
        check=_network,
    )
    ssh_public_key: str | None = option(
        None,
        "An OpenSSH public key for the ``dask`` user. Default: no login at all.",
        types=("string", "null"),
        check=_text,
        note="null: no login at all",
    )
    user_assigned_identity: str | None = option(
        None,
        """
        Resource id of a user-assigned managed identity every VM runs as, so that code on
        the workers reads Blob storage (or anything Entra ID guards) with a token from
        the instance metadata service: no secret in user-data or ``env_vars``.
        """,
        types=("string", "null"),
        check=_identity_id,
        note="null: the VMs run as no identity of yours",
    )
    delete_on_lease_end: bool | None = option(
        None,
        """
        When the lease ends (the client was killed), the scheduler deletes every VM of
        the cluster, and then its own, with a managed identity made for the cluster whose
        roles reach only the cluster's VMs, NICs, disks and addresses. Without it those
        VMs stop and stay allocated, billing until ``cleanup``. Needs
        ``Microsoft.Authorization/roleAssignments/write`` on the resource group. ``None``:
        on when the caller has it, else a warning and the VMs stop; ``True``: refuse to
        start without it.
        """,
        types=("boolean", "null"),
        check=_optional_boolean,
        note="null: on when the caller may assign roles, else a warning",
    )
