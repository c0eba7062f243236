"""The one base class of every error dask-secure-cloud raises on purpose.

``except SecureCloudError`` catches them all, whatever they also are: each keeps the
builtin it has always been (``RuntimeError`` for what went wrong with a cloud or a
cluster, ``ValueError`` for what the caller asked), so code that caught those still does.
"""

from __future__ import annotations

__all__ = [
    "ClusterStartError",
    "OptionError",
    "ResourcesLeftError",
    "SecureCloudError",
    "UnknownOptionError",
    "VMBootError",
]


class SecureCloudError(Exception):
    """Base of every error this package raises on purpose."""


class OptionError(SecureCloudError, ValueError):
    """An option's value is refused before anything is made; the message names the
    option and what to pass instead."""


class UnknownOptionError(OptionError, TypeError):
    """A keyword no option has: a ``TypeError`` as for any function, naming the closest
    real option."""


class ClusterStartError(SecureCloudError, RuntimeError):
    """The cluster could not start; everything it made has been deleted."""


class VMBootError(SecureCloudError, RuntimeError):
    """A VM did not come up in time. The message carries its console output."""


class ResourcesLeftError(SecureCloudError, RuntimeError):
    """Closing did not delete every VM of the cluster. The message lists them."""
