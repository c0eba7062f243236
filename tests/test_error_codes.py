"""``docs/api.rst``: each driver raises one of the four shared error kinds where the cloud's
status or error code says which case it is, never from the message text.

Every code the docs list is one case, fed through the driver's own translation (the
code path its API calls take) with a message that names another kind, so a mapping that
read the text would fail. The cleanup and retry logic relies on these kinds: an
"in use" delete is retried, a "not found" one is done, "forbidden" stops with advice.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from azure.core.exceptions import HttpResponseError
from azure.core.pipeline.transport._requests_basic import RequestsTransportResponse
from azure.core.rest import HttpRequest
from botocore.exceptions import ClientError
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1

from dask_secure_cloud import AzureVMCluster, DropletCluster, GCPCluster
from dask_secure_cloud.cluster import preview
from dask_secure_cloud.driver import (
    CloudError,
    ForbiddenError,
    InUseError,
    NotFoundError,
    ThrottledError,
)
from dask_secure_cloud.providers import aws, azure

#: A message that names every kind: the kind must come from the code alone.
MISLEADING = "not found; in use; forbidden; throttled; rate limit exceeded"

KINDS = {
    "not found": NotFoundError,
    "in use": InUseError,
    "forbidden": ForbiddenError,
    "throttled": ThrottledError,
}


def _kind(error: BaseException) -> str:
    """The one shared kind ``error`` is, or ``"other"`` (a plain CloudError)."""
    assert isinstance(error, CloudError), repr(error)
    found = [name for name, cls in KINDS.items() if isinstance(error, cls)]
    assert len(found) <= 1, found
    return found[0] if found else "other"


# -- AWS, by EC2's error code -----------------------------------------------------------

EC2_CODES = {
    # docs: ``*.NotFound`` is not found
    "InvalidInstanceID.NotFound": "not found",
    "InvalidGroup.NotFound": "not found",
    "InvalidSubnetID.NotFound": "not found",
    "InvalidAMIID.NotFound": "not found",
    # ``DependencyViolation``, ``*.InUse`` and ``VolumeInUse`` in use
    "DependencyViolation": "in use",
    "InvalidNetworkInterface.InUse": "in use",
    "InvalidIPAddress.InUse": "in use",
    "VolumeInUse": "in use",
    # the credential codes: forbidden
    "UnauthorizedOperation": "forbidden",
    "AuthFailure": "forbidden",
    "OptInRequired": "forbidden",
    "Blocked": "forbidden",
    "PendingVerification": "forbidden",
    "SignatureDoesNotMatch": "forbidden",
    "InvalidClientTokenId": "forbidden",
    "MissingAuthenticationToken": "forbidden",
    # the throttling codes: throttled
    "RequestLimitExceeded": "throttled",
    "Throttling": "throttled",
    "ThrottlingException": "throttled",
    "RequestThrottled": "throttled",
    "RequestThrottledException": "throttled",
    "TooManyRequestsException": "throttled",
    "EC2ThrottledException": "throttled",
    "BandwidthLimitExceeded": "throttled",
    # anything else is none of the four, whatever its message says
    "InvalidParameterValue": "other",
    "InsufficientInstanceCapacity": "other",
}


@pytest.mark.parametrize("code", sorted(EC2_CODES))
def test_an_ec2_error_code_is_its_kind(code: str) -> None:
    error = ClientError({"Error": {"Code": code, "Message": MISLEADING}}, "DeleteSecurityGroup")
    with pytest.raises(CloudError) as info, aws.errors._translated("DeleteSecurityGroup"):
        raise error
    assert _kind(info.value) == EC2_CODES[code]
    assert info.value.code == code  # docs: the error's ``code`` is EC2's


# -- GCP, by HTTP status and the error's reason -------------------------------------------


def _google_error(status: int, reason: str | None) -> gexc.GoogleAPICallError:
    errors = [{"reason": reason, "message": MISLEADING}] if reason else []
    return gexc.from_http_status(status, MISLEADING, errors=errors)


GCP_ERRORS = {
    "404": (404, None, "not found"),
    "400-resourceInUseByAnotherResource": (400, "resourceInUseByAnotherResource", "in use"),
    "401": (401, None, "forbidden"),
    "403": (403, None, "forbidden"),
    "403-rateLimitExceeded": (403, "rateLimitExceeded", "throttled"),
    "403-userRateLimitExceeded": (403, "userRateLimitExceeded", "throttled"),
    "429": (429, None, "throttled"),
    "403-quotaExceeded": (403, "quotaExceeded", "other"),
    "400": (400, None, "other"),
}


@pytest.fixture
def gcp_driver() -> Any:
    """A GCP driver built as a cluster builds it; no call leaves this process."""
    return preview(GCPCluster, project="demo-project", credentials=AnonymousCredentials()).driver


@pytest.mark.parametrize("case", sorted(GCP_ERRORS))
async def test_a_google_api_error_is_its_kind(case: str, gcp_driver: Any, monkeypatch) -> None:
    status, reason, kind = GCP_ERRORS[case]

    def refuse(**kwargs: Any) -> None:
        raise _google_error(status, reason)

    monkeypatch.setattr(gcp_driver, "_client", lambda service: SimpleNamespace(delete=refuse))
    with pytest.raises(CloudError) as info:
        await gcp_driver._call("FirewallsClient", "delete", "delete rule x", poll=True)
    assert _kind(info.value) == kind


GCP_OPERATION_CODES = {
    "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE": "in use",
    "RESOURCE_NOT_FOUND": "not found",
    "QUOTA_EXCEEDED": "other",
}


@pytest.mark.parametrize("code", sorted(GCP_OPERATION_CODES))
async def test_a_failed_operations_code_is_its_kind(code: str, gcp_driver: Any, monkeypatch):
    """A delete whose operation ends with an error: its code, not its message."""
    done = compute_v1.Operation(
        name="operation-1",
        status=compute_v1.Operation.Status.DONE,
        error=compute_v1.Error(errors=[compute_v1.Errors(code=code, message=MISLEADING)]),
    )

    async def call(*args: Any, **kwargs: Any) -> compute_v1.Operation:
        return done

    monkeypatch.setattr(gcp_driver, "_call", call)
    with pytest.raises(CloudError) as info:
        await gcp_driver._wait(done, "delete rule x", zonal=False)
    assert _kind(info.value) == GCP_OPERATION_CODES[code]


# -- Azure, by HTTP status and ARM's error code -------------------------------------------


def _arm_response(status: int, code: str | None) -> RequestsTransportResponse:
    """An ARM answer as azure-core's transport hands it to the SDK."""
    answer = requests.Response()
    answer.status_code = status
    body = {"error": {"code": code, "message": MISLEADING}} if code else {}
    answer._content = json.dumps(body).encode()
    answer.headers["content-type"] = "application/json"
    return RequestsTransportResponse(HttpRequest("DELETE", "https://arm.invalid/x"), answer)


ARM_ERRORS = {
    "404": (404, "ResourceNotFound", "not found"),
    "400-InUseNetworkSecurityGroupCannotBeDeleted": (
        400,
        "InUseNetworkSecurityGroupCannotBeDeleted",
        "in use",
    ),
    "400-InUseSubnetCannotBeDeleted": (400, "InUseSubnetCannotBeDeleted", "in use"),
    "400-InUseNatGatewayCannotBeDeleted": (400, "InUseNatGatewayCannotBeDeleted", "in use"),
    "400-InUseRouteTableCannotBeDeleted": (400, "InUseRouteTableCannotBeDeleted", "in use"),
    "400-NicInUse": (400, "NicInUse", "in use"),
    "400-NicReservedForAnotherVm": (400, "NicReservedForAnotherVm", "in use"),
    "400-PublicIPAddressCannotBeDeleted": (400, "PublicIPAddressCannotBeDeleted", "in use"),
    "400-PublicIPAddressInUse": (400, "PublicIPAddressInUse", "in use"),
    "401": (401, "InvalidAuthenticationToken", "forbidden"),
    "403": (403, "SomethingForbidden", "forbidden"),
    "400-AuthorizationFailed": (400, "AuthorizationFailed", "forbidden"),
    "400-LinkedAuthorizationFailed": (400, "LinkedAuthorizationFailed", "forbidden"),
    "429": (429, "TooManyRequests", "throttled"),
    "400-QuotaExceeded": (400, "QuotaExceeded", "other"),
}


@pytest.mark.parametrize(
    "case",
    sorted(ARM_ERRORS),
)
def test_an_arm_error_is_its_kind(case: str) -> None:
    status, code, kind = ARM_ERRORS[case]
    error = HttpResponseError(response=_arm_response(status, code))
    assert _kind(azure.errors._arm_error("delete x", error, "dask-rg")) == kind


ARM_GET_ERRORS = {
    "404": (404, "ResourceNotFound", "not found"),
    "404-ResourceGroupNotFound": (404, "ResourceGroupNotFound", "not found"),
    "401": (401, "InvalidAuthenticationToken", "forbidden"),
    "403": (403, "AuthorizationFailed", "forbidden"),
    "429": (429, "TooManyRequests", "throttled"),
    "500": (500, "InternalServerError", "other"),
}


@pytest.mark.parametrize("case", sorted(ARM_GET_ERRORS))
def test_an_arm_read_error_is_its_kind(case: str) -> None:
    """The driver's own reads (outside the SDK's clients) map the same way."""
    status, code, kind = ARM_GET_ERRORS[case]
    driver = preview(AzureVMCluster, resource_group="dask-rg", subscription_id="sub").driver
    answer = SimpleNamespace(
        status_code=status, json=lambda: {"error": {"code": code, "message": MISLEADING}}
    )
    assert _kind(driver._http_error("/subscriptions/sub/providers/x", answer)) == kind


# -- DigitalOcean, by HTTP status ---------------------------------------------------------

DO_STATUSES = {
    "404": (404, frozenset({409}), "not found"),
    "409": (409, frozenset({409}), "in use"),
    "403-vpc-delete": (403, frozenset({403, 409}), "in use"),
    "401": (401, frozenset({409}), "forbidden"),
    "403": (403, frozenset({409}), "forbidden"),
    "429": (429, frozenset({409}), "throttled"),
    "422": (422, frozenset({409}), "other"),
}


@pytest.mark.parametrize("case", sorted(DO_STATUSES))
async def test_a_digitalocean_status_is_its_kind(case: str, monkeypatch) -> None:
    status, in_use, kind = DO_STATUSES[case]
    driver = preview(DropletCluster, token="dop_v1_x").driver

    async def answer(*, cls: Any, **kwargs: Any) -> Any:
        """pydo hands documented error answers back as bodies, with their status."""
        response = SimpleNamespace(http_response=SimpleNamespace(status_code=status))
        return cls(response, {"id": "misleading", "message": MISLEADING}, {})

    monkeypatch.setattr(
        driver, "_api", lambda: SimpleNamespace(vpcs=SimpleNamespace(delete=answer))
    )
    with pytest.raises(CloudError) as info:
        # ``poll``: one attempt, so a 429 is not waited out here.
        await driver._call("delete vpc x", "vpcs", "delete", poll=True, in_use=in_use)
    assert _kind(info.value) == kind


async def test_digitalocean_throttling_is_throttled_only_after_the_drivers_waits(monkeypatch):
    """docs: 429 is throttled "after the driver's own waits": every attempt is made."""
    from dask_secure_cloud.providers.digitalocean import driver as digitalocean

    driver = preview(DropletCluster, token="dop_v1_x").driver
    attempts: list[int] = []
    waits: list[int] = []

    async def answer(*, cls: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        response = SimpleNamespace(http_response=SimpleNamespace(status_code=429))
        return cls(response, {"id": "too_many_requests", "message": MISLEADING}, {})

    def no_delay(headers: Any, attempt: int) -> float:
        """What ``ratelimit-reset`` asks for, recorded and cut to nothing."""
        waits.append(attempt)
        return 0.0

    monkeypatch.setattr(digitalocean, "_reset_delay", no_delay)
    monkeypatch.setattr(
        driver, "_api", lambda: SimpleNamespace(vpcs=SimpleNamespace(delete=answer))
    )
    with pytest.raises(ThrottledError):
        await driver._call("delete vpc x", "vpcs", "delete")
    assert len(attempts) == digitalocean._RETRIES and len(waits) == digitalocean._RETRIES - 1
