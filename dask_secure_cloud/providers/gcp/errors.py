"""Compute Engine's errors, as the package's: one table from its reasons, operation
error codes and HTTP statuses to the kinds of
:class:`~dask_secure_cloud.errors.CloudError`, and the retry on rate limits.
"""

from __future__ import annotations

import logging
from typing import Any

from google.api_core import exceptions as gexc
from google.api_core import retry

from ... import errors

logger = logging.getLogger(__name__)


#: Compute Engine's error codes -> the kind of CloudError each is (see
#: errors.cloud_error). A ``reason`` of ``error.errors[]`` (or an operation's error code)
#: says what happened whatever the HTTP status, and is read first: Compute Engine
#: answers its per-project rate limits with 403 ``rateLimitExceeded``, a delete of a
#: resource another one still uses with 400 ``resourceInUseByAnotherResource``, and an
#: exhausted quota with 403 ``quotaExceeded`` (not a permission to ask for). Then the
#: HTTP status, as text.
error_kinds: errors.ErrorKinds = {
    "rateLimitExceeded": errors.ThrottledError,
    "userRateLimitExceeded": errors.ThrottledError,
    "resourceInUseByAnotherResource": errors.InUseError,
    "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE": errors.InUseError,
    "RESOURCE_NOT_FOUND": errors.NotFoundError,
    "quotaExceeded": errors.QuotaError,
    "limitExceeded": errors.QuotaError,
    "QUOTA_EXCEEDED": errors.QuotaError,
    # A zone out of capacity for the machine type (a stockout), for SPOT VMs too:
    # another zone of the region, STANDARD provisioning, or later may have it.
    "ZONE_RESOURCE_POOL_EXHAUSTED": errors.CapacityError,
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS": errors.CapacityError,
    "429": errors.ThrottledError,
    "404": errors.NotFoundError,
    "401": errors.ForbiddenError,
    "403": errors.ForbiddenError,
}


_QUOTA = frozenset({"quotaExceeded", "limitExceeded"})


def _reasons(error: BaseException) -> set[str]:
    """The machine-readable reasons of a Google API error (never its message text)."""
    if not isinstance(error, gexc.GoogleAPICallError):
        return set()
    found = {str(e.get("reason")) for e in error.errors or () if isinstance(e, dict)}
    if error.reason:
        found.add(error.reason)
    return found


def operation_error(what: str, error: Any, region: str) -> errors.CloudError:
    """The first error of a failed operation (``Operation.error.errors[0]``) as the kind
    its code says; a quota refusal names its quota, region and limit from the error's
    ``errorDetails[].quotaInfo``, never from its message."""
    message = f"{what} failed: {error.code}: {error.message}"
    kind = error_kinds.get(error.code)
    if kind is not errors.QuotaError:
        return errors.cloud_error(message, error.code, error_kinds)
    info = next((d.quota_info for d in error.error_details if d.quota_info), None)
    named = bool(info and (info.limit_name or info.metric_name))
    return errors.quota_error(
        message,
        error.code,
        quota=(info.limit_name or info.metric_name) if info and named else None,
        region=(dict(info.dimensions).get("region") if info else None) or region,
        limit=info.limit if info and named else None,
        fix="Ask for a higher quota (IAM & Admin, Quotas), or use fewer or smaller "
        "instances; this is not retried",
    )


def _retryable(error: BaseException) -> bool:
    """Rate limits and "try again" answers, as the API asks to back off on them."""
    return isinstance(error, (gexc.TooManyRequests, gexc.ServiceUnavailable)) or any(
        error_kinds.get(reason) is errors.ThrottledError for reason in _reasons(error)
    )


#: Compute Engine's REST methods have no default retry: back off on rate limits and
#: "try again" answers, as the API asks, for up to two minutes.
_THROTTLED = retry.Retry(predicate=_retryable, initial=0.5, maximum=10.0, timeout=120.0)


def _message(error: BaseException) -> str:
    return getattr(error, "message", None) or str(error)


def _code(error: BaseException) -> str:
    """The code of ``error`` that :data:`error_kinds` knows: a reason first, else the
    HTTP status."""
    reasons = sorted(_reasons(error))
    known = [r for r in reasons if r in error_kinds]
    if known:
        return known[0]
    status = getattr(error, "code", None)
    return str(int(status)) if isinstance(status, int) else (reasons[0] if reasons else "")


def _translate(what: str, error: BaseException) -> errors.CloudError:
    """A Google API error as the kind its reason or HTTP status says."""
    code, text = _code(error), _message(error)
    if code in _QUOTA:
        message = f"{what}: a quota is exhausted ({text})"
    else:
        message = {
            errors.ThrottledError: f"{what}: Compute Engine's rate limit was hit ({text})",
            errors.NotFoundError: f"{what} not found: {text}",
            errors.InUseError: f"{what}: still in use ({text})",
            errors.ForbiddenError: f"{what}: permission denied ({text}); give these "
            "credentials the roles listed in the docs",
        }.get(error_kinds.get(code, errors.CloudError), f"{what} failed: {text}")
    return errors.cloud_error(message, code, error_kinds)
