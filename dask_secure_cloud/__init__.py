"""Dask clusters on cloud VMs, each with its own short-lived, role-bound TLS credentials.

Cluster classes are imported lazily, so that ``import dask_secure_cloud`` needs no cloud
SDK and each provider needs only its own extra (``pip install dask-secure-cloud[aws]``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import config  # noqa: F401  (registers the dask config defaults)
from .errors import (
    ClusterStartError,
    OptionError,
    ResourcesLeftError,
    SecureCloudError,
    UnknownOptionError,
    VMBootError,
)

__version__ = "0.1.0"

_LAZY = {
    "LocalVMCluster": ".providers.local",
    "EC2Cluster": ".providers.aws",
    "GCPCluster": ".providers.gcp",
    "AzureVMCluster": ".providers.azure",
    "DropletCluster": ".providers.digitalocean",
    "VMCluster": ".cluster",
    "ClusterCredentials": ".credentials",
    "CloudError": ".driver",
    "NoRouteOutError": ".egress",
    "ConfigError": ".config",
    "NetworkPolicyError": ".network",
    "UserDataTooLarge": ".cloudinit",
}

__all__ = [
    "AzureVMCluster",
    "CloudError",
    "ClusterCredentials",
    "ClusterStartError",
    "ConfigError",
    "DropletCluster",
    "EC2Cluster",
    "GCPCluster",
    "LocalVMCluster",
    "NetworkPolicyError",
    "NoRouteOutError",
    "OptionError",
    "ResourcesLeftError",
    "SecureCloudError",
    "UnknownOptionError",
    "UserDataTooLarge",
    "VMBootError",
    "VMCluster",
    "__version__",
]

if TYPE_CHECKING:
    from .cloudinit import UserDataTooLarge
    from .cluster import VMCluster
    from .config import ConfigError
    from .credentials import ClusterCredentials
    from .driver import CloudError
    from .egress import NoRouteOutError
    from .network import NetworkPolicyError
    from .providers.aws import EC2Cluster
    from .providers.azure import AzureVMCluster
    from .providers.digitalocean import DropletCluster
    from .providers.gcp import GCPCluster
    from .providers.local import LocalVMCluster


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dask_secure_cloud' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
