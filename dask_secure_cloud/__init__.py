"""Dask clusters on cloud VMs, each with its own short-lived, role-bound TLS credentials.

Cluster classes are imported lazily, so that ``import dask_secure_cloud`` needs no cloud
SDK and each provider needs only its own extra (``pip install dask-secure-cloud[aws]``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import config  # noqa: F401  (registers the dask config defaults)
from .errors import (
    CloudError,
    ClusterStartError,
    ConfigError,
    NetworkPolicyError,
    NoRouteOutError,
    OptionError,
    ResourcesLeftError,
    SecureCloudError,
    UnknownOptionError,
    UserDataTooLarge,
    VMBootError,
)
from .registry import PROVIDERS

__version__ = "0.1.0"

#: Imported when first used: each cluster class (and its cloud's SDK), and the rest.
_LAZY = {
    **{p.cluster_class: p.module for p in PROVIDERS.values()},
    "VMCluster": f"{__name__}.cluster",
    "ClusterCredentials": f"{__name__}.credentials",
}

__all__ = [
    "CloudError",
    "ClusterStartError",
    "ConfigError",
    "NetworkPolicyError",
    "NoRouteOutError",
    "OptionError",
    "ResourcesLeftError",
    "SecureCloudError",
    "UnknownOptionError",
    "UserDataTooLarge",
    "VMBootError",
    "__version__",
    *_LAZY,
]

if TYPE_CHECKING:  # for type checkers and editors, which cannot read _LAZY
    from .cluster import VMCluster as VMCluster
    from .credentials import ClusterCredentials as ClusterCredentials
    from .providers.aws import EC2Cluster as EC2Cluster
    from .providers.azure import AzureVMCluster as AzureVMCluster
    from .providers.digitalocean import DropletCluster as DropletCluster
    from .providers.gcp import GCPCluster as GCPCluster
    from .providers.local import LocalVMCluster as LocalVMCluster


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dask_secure_cloud' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
