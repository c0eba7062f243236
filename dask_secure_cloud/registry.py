"""Every provider the package knows, in one table.

The package's exports, the CLI's provider choices, the option classes (and so the dask
config schema and defaults) and each cloud's user-data limit are all read from
:data:`PROVIDERS`. Adding a cloud is one row here, its options module
(``options/<name>.py``) and its provider module (``providers/<name>.py``).

Nothing here imports a cloud SDK: a provider's module is imported only when its cluster
class is first used, so ``import dask_secure_cloud`` needs no cloud's extra.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cluster import VMCluster

__all__ = ["PROVIDERS", "Provider", "UserDataLimit", "cluster_class", "options_class"]


@dataclass(frozen=True)
class UserDataLimit:
    """A cloud's ceiling on user-data, and how that cloud measures it.

    ``gzip``: the cloud carries user-data as bytes, so the whole document is gzipped
    (cloud-init inflates it on every datasource) and its files are left as plain text:
    one compression over every file beats one per file by a third. Clouds that carry
    user-data as text get each file gzip+base64 encoded instead, where that is smaller.
    """

    cloud: str
    max_bytes: int
    gzip: bool = False

    def measure(self, user_data: bytes) -> int:
        return len(user_data)


@dataclass(frozen=True)
class Provider:
    """One cloud (or this machine), as the rest of the package names it."""

    #: The name in dask config keys (``secure-cloud.<name>``), the CLI and tags.
    name: str
    #: The cluster class users instantiate, in ``providers/<name>.py``.
    cluster_class: str
    #: Its options class, in ``options/<name>.py``.
    options_class: str
    #: What its VMs' user-data may weigh.
    user_data: UserDataLimit
    #: The ``pip install dask-secure-cloud[<extra>]`` that brings its SDK; None: none.
    extra: str | None

    @property
    def module(self) -> str:
        return f"{__package__}.providers.{self.name}"


#: In the order the docs and the config files list them.
PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("aws", "EC2Cluster", "EC2Options", UserDataLimit("EC2", 16_384, gzip=True), "aws"),
        Provider(
            "gcp", "GCPCluster", "GCPOptions", UserDataLimit("GCE metadata value", 262_144), "gcp"
        ),
        # customData travels as base64 (up to 87,380 characters); the limit is on the bytes.
        Provider(
            "azure",
            "AzureVMCluster",
            "AzureOptions",
            UserDataLimit("Azure customData", 65_535, gzip=True),
            "azure",
        ),
        Provider(
            "digitalocean",
            "DropletCluster",
            "DropletOptions",
            UserDataLimit("DigitalOcean user_data", 65_536),
            "digitalocean",
        ),
        Provider("local", "LocalVMCluster", "LocalOptions", UserDataLimit("LocalVM", 65_536), None),
    )
}


def cluster_class(provider: str) -> type[VMCluster]:
    """The cluster class of ``provider``, its module (and cloud SDK) imported now."""
    entry = PROVIDERS[provider]
    cls: type[VMCluster] = getattr(importlib.import_module(entry.module), entry.cluster_class)
    return cls


def options_class(provider: str) -> Any:
    """The options class of ``provider`` (no cloud SDK needed)."""
    entry = PROVIDERS[provider]
    return getattr(
        importlib.import_module(f"{__package__}.options.{provider}"), entry.options_class
    )
