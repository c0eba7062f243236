"""DigitalOcean's errors, as the package's: one table from its HTTP statuses to the
kinds of :class:`~dask_secure_cloud.errors.CloudError`, and its rate limit's wait.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from azure.core.exceptions import HttpResponseError

from ... import errors

#: DigitalOcean's HTTP statuses -> the kind of CloudError each is (see
#: errors.cloud_error); the API's error ``id`` is not documented as a stable set.
error_kinds: errors.ErrorKinds = {
    "404": errors.NotFoundError,
    "409": errors.InUseError,
    "401": errors.ForbiddenError,
    "403": errors.ForbiddenError,
    "429": errors.ThrottledError,
}


def _json(error: HttpResponseError) -> dict[str, Any]:
    try:
        body = error.response.json() if error.response is not None else None
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"message": str(error)}


def _reset_delay(headers: Mapping[str, str], attempt: int) -> float:
    """Seconds until ``ratelimit-reset`` (an epoch time), else exponential backoff."""
    reset = (headers or {}).get("ratelimit-reset")
    if reset and reset.isdigit():
        return min(max(int(reset) - time.time(), 0.1), 60.0)
    return min(2.0**attempt, 30.0)
