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

The package: :mod:`.driver` (VMs), :mod:`.network` (the vnet, its ways out, the network
security groups), :mod:`.identity` (the scheduler's managed identity and the user's),
:mod:`.checks` (sizes and quota), :mod:`.inventory` (what exists, by tag),
:mod:`.errors` (ARM's error codes), :mod:`.cluster` (``AzureVMCluster``).
"""

try:
    import azure.mgmt.compute
    import azure.mgmt.network  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError(
        "AzureVMCluster needs the azure extra: pip install 'dask-secure-cloud[azure]'"
    ) from e

from .cluster import AzureVMCluster
from .driver import CLOUDS, AzureDriver

__all__ = ["CLOUDS", "AzureDriver", "AzureVMCluster"]
