"""Every error dask-secure-cloud raises on purpose, in one tree.

``except SecureCloudError`` catches them all, whatever they also are: each keeps the
builtin it has always been (``RuntimeError`` for what went wrong with a cloud or a
cluster, ``ValueError`` for what the caller asked), so code that caught those still does.

A cloud's own errors reach users only as a :class:`CloudError` of the kind the cloud's
error *code* says (never its message text): each provider has one table from its codes
to these kinds (``error_kinds`` in its module), read by :func:`cloud_error`.

::

    SecureCloudError
    ├── OptionError (ValueError)          an option refused before anything is made
    │   ├── UnknownOptionError (TypeError)
    │   └── NetworkPolicyError            an exposure refused until opted into
    ├── ConfigError (ValueError)          a dask config key or value under secure-cloud
    ├── UserDataTooLarge (ValueError)     over the cloud's user-data limit
    ├── UnsupportedUserData (ValueError)  a local VM cannot run this user-data faithfully
    ├── EnrollmentRefused                 a VM's enrolment answer was not accepted
    ├── ClusterStartError (RuntimeError)  the cluster could not start; nothing is left
    ├── VMBootError (RuntimeError)        a VM did not come up in time
    ├── ResourcesLeftError (RuntimeError) closing left resources, listed
    └── CloudError (RuntimeError)         the cloud refused a request
        ├── NotFoundError                 gone (for a delete: done)
        ├── InUseError                    still referenced: retry a little later
        ├── ForbiddenError                the credentials may not: never retried
        ├── ThrottledError                slow down: the same call may succeed later
        ├── NoRouteOutError               VMs would have no route out: refused first
        ├── CapacityError                 the zone has no capacity for the size now
        └── QuotaError                    a quota of the account is used up: never retried
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

__all__ = [
    "CapacityError",
    "CloudError",
    "ClusterStartError",
    "ConfigError",
    "EnrollmentRefused",
    "ForbiddenError",
    "InUseError",
    "NetworkPolicyError",
    "NoRouteOutError",
    "NotFoundError",
    "OptionError",
    "QuotaError",
    "ResourcesLeftError",
    "SecureCloudError",
    "ThrottledError",
    "UnknownOptionError",
    "UnsupportedUserData",
    "UserDataTooLarge",
    "VMBootError",
    "cloud_error",
    "quota_error",
]


class SecureCloudError(Exception):
    """Base of every error this package raises on purpose."""


class OptionError(SecureCloudError, ValueError):
    """An option's value is refused before anything is made; the message names the
    option and what to pass instead."""


class UnknownOptionError(OptionError, TypeError):
    """A keyword no option has: a ``TypeError`` as for any function, naming the closest
    real option."""


class NetworkPolicyError(OptionError):
    """The requested exposure is refused until the caller opts in explicitly."""


class ConfigError(SecureCloudError, ValueError):
    """A dask config key or value under ``secure-cloud`` is wrong."""


class UserDataTooLarge(SecureCloudError, ValueError):
    """Rendered user-data exceeds the cloud's limit. The message names the biggest parts."""


class UnsupportedUserData(SecureCloudError, ValueError):
    """The user-data asks for something this runner cannot do faithfully."""


class EnrollmentRefused(SecureCloudError):
    """A VM's answer was not accepted: wrong name, wrong proof, used or expired token."""


class ClusterStartError(SecureCloudError, RuntimeError):
    """The cluster could not start; everything it made has been deleted."""


class VMBootError(SecureCloudError, RuntimeError):
    """A VM did not come up in time. The message carries its console output."""


class ResourcesLeftError(SecureCloudError, RuntimeError):
    """Closing did not delete every VM of the cluster. The message lists them."""


class CloudError(SecureCloudError, RuntimeError):
    """The cloud refused a request. The message names the option to change, if any;
    ``code`` is the cloud's own error code, where it gave one.

    Drivers raise one of the subclasses below where the cloud's answer says which case it
    is (by status or error code, never by message text), so the core can act on it: skip
    what is already gone, wait out what is in use or throttled, stop on what is forbidden.
    """

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class NotFoundError(CloudError):
    """The resource does not exist (any more): for a delete, the work is done."""


class InUseError(CloudError):
    """The resource is still referenced by another (a NIC by a VM being deleted, a network
    by its last VMs): deleting it again a little later succeeds."""


class ForbiddenError(CloudError):
    """The credentials may not do this: retrying cannot help; the message says which
    permission or scope is missing."""


class ThrottledError(CloudError):
    """The cloud asked us to slow down, after the SDK's own retries: nothing is known
    about the resource, and the same call may succeed later."""


class NoRouteOutError(CloudError):
    """VMs of a role would have no route out of their network: refused before any is made."""


class CapacityError(CloudError):
    """The zone has no capacity for this size (or this market: spot) right now: the
    same request may succeed in another zone of the region, on demand, or later. The
    fleet moves the launch where the options allow it (``placement.py``)."""


class QuotaError(CloudError):
    """A quota or limit of the account is used up: retrying cannot help until it is
    raised. ``quota`` names it, ``region`` says where it applies and ``limit`` is its
    current value, each where the cloud's answer gives it (``None`` otherwise)."""

    def __init__(
        self,
        message: str,
        code: str = "",
        *,
        quota: str | None = None,
        region: str | None = None,
        limit: float | None = None,
    ) -> None:
        super().__init__(message, code)
        self.quota = quota
        self.region = region
        self.limit = limit


def quota_error(
    message: str,
    code: str,
    *,
    quota: str | None,
    region: str | None,
    limit: float | None,
    fix: str,
) -> QuotaError:
    """A :class:`QuotaError` whose message says the quota's name, region and limit (or
    that the cloud did not say them), and ``fix``."""
    facts = [
        f"quota {quota}" if quota else "quota (not named by the cloud)",
        f"region {region}" if region else None,
        f"current limit {limit:g}" if limit is not None else "current limit not given",
    ]
    said = ", ".join(f for f in facts if f)
    return QuotaError(f"{message} [{said}]. {fix}", code, quota=quota, region=region, limit=limit)


#: A provider's table: its error code -> the kind of CloudError it is.
ErrorKinds = Mapping[str, type[CloudError]]


def cloud_error(
    message: str,
    code: str,
    kinds: ErrorKinds,
    by_suffix: Callable[[str], type[CloudError] | None] | None = None,
) -> CloudError:
    """The :class:`CloudError` of the kind ``code`` has in a provider's table ``kinds``
    (or, for codes a cloud builds from parts such as EC2's ``*.NotFound``, that
    ``by_suffix`` names); a plain :class:`CloudError` for any other code."""
    kind = kinds.get(code) or (by_suffix(code) if by_suffix else None) or CloudError
    return kind(message, code)
