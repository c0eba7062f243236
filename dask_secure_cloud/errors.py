"""The one base class of every error dask-secure-cloud raises on purpose.

``except SecureCloudError`` catches them all, whatever they also are: each keeps the
builtin it has always been (``RuntimeError`` for what went wrong with a cloud or a
cluster, ``ValueError`` for what the caller asked), so code that caught those still does.
"""

from __future__ import annotations

__all__ = ["OptionError", "SecureCloudError"]


class SecureCloudError(Exception):
    """Base of every error this package raises on purpose."""


class OptionError(SecureCloudError, ValueError):
    """An option's value is refused before anything is made; the message names the
    option and what to pass instead."""
