"""EC2's errors, as the package's: one table from EC2's error codes to the kinds of
:class:`~dask_secure_cloud.errors.CloudError`, and the advice each code deserves.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.parsers import ResponseParserError

from ... import driver, errors

# EC2 error codes -> what the user should change.
_ADVICE = {
    "InvalidInstanceType": "check scheduler_instance_type / worker_instance_type",
    "InvalidAMIID.NotFound": "check ami: it must exist in this region",
    "InvalidAMIID.Malformed": "check ami: it looks like 'ami-0123456789abcdef0'",
    "InvalidSubnetID.NotFound": "check subnet_id: it must exist in this region",
    "InvalidVpcID.NotFound": "check vpc: it must exist in this region",
    "InstanceLimitExceeded": "ask AWS for a higher instance limit, or use fewer workers",
    "VcpuLimitExceeded": "ask AWS for a higher vCPU quota, or use fewer or smaller instances",
    "InsufficientInstanceCapacity": "try another instance type, or leave subnet_id unset "
    "so that another availability zone is tried",
    "MaxSpotInstanceCountExceeded": "ask AWS for a higher spot instance quota",
    "UnauthorizedOperation": "give these credentials the permissions listed in the docs",
    "AuthFailure": "the AWS credentials were rejected: check the profile or keys in use",
    "InvalidParameterValue": "check the option named in the message",
}


#: EC2's error codes -> the kind of CloudError each is (see errors.cloud_error); codes
#: ending in ``.NotFound`` or ``.InUse`` are read by :func:`_kind_by_suffix`.
error_kinds: errors.ErrorKinds = {
    "InvalidInstanceID.NotFound": errors.NotFoundError,
    "InvalidGroup.NotFound": errors.NotFoundError,
    # Still referenced: a security group by the network interface of an instance that
    # is terminating.
    "DependencyViolation": errors.InUseError,
    "VolumeInUse": errors.InUseError,
    # The credentials or the account may not do this.
    **dict.fromkeys(
        (
            "UnauthorizedOperation",
            "AuthFailure",
            "OptInRequired",
            "Blocked",
            "PendingVerification",
            "SignatureDoesNotMatch",
            "InvalidClientTokenId",
            "MissingAuthenticationToken",
        ),
        errors.ForbiddenError,
    ),
    # The zone has no capacity for the type now (for spot: at the spot price asked):
    # another zone, on-demand, or later may have it.
    **dict.fromkeys(
        (
            "InsufficientInstanceCapacity",
            "InsufficientHostCapacity",
            "InsufficientCapacityOnHost",
            "SpotMaxPriceTooLow",
        ),
        errors.CapacityError,
    ),
    # A quota of the account is used up: not retried.
    **dict.fromkeys(
        ("VcpuLimitExceeded", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded"),
        errors.QuotaError,
    ),
    # Throttled, after botocore's own retries.
    **dict.fromkeys(
        (
            "RequestLimitExceeded",
            "Throttling",
            "ThrottlingException",
            "RequestThrottled",
            "RequestThrottledException",
            "TooManyRequestsException",
            "EC2ThrottledException",
            "BandwidthLimitExceeded",
        ),
        errors.ThrottledError,
    ),
}


#: Each quota code -> the quota's name, as the Service Quotas console shows it.
QUOTAS = {
    "VcpuLimitExceeded": "vCPUs of running On-Demand instances of the type's family",
    "InstanceLimitExceeded": "running On-Demand instances",
    "MaxSpotInstanceCountExceeded": "vCPUs of Spot Instance requests",
}
#: EC2's quota refusals carry the current limit in their message alone ("...than your
#: current vCPU limit of 32 allows..."): no field of the answer holds it, so it is read
#: from there, and the message is quoted as it came.
_LIMIT_IN_MESSAGE = re.compile(r"limit of (\d+)")


def quota_refusal(error: errors.CloudError, region: str) -> errors.QuotaError:
    """``error`` (a quota code) as a :class:`QuotaError` naming the quota, the region
    and the current limit where EC2 said it."""
    found = _LIMIT_IN_MESSAGE.search(str(error))
    return errors.quota_error(
        str(error),
        error.code,
        quota=QUOTAS.get(error.code, error.code),
        region=region,
        limit=float(found.group(1)) if found else None,
        fix="Ask AWS for a higher limit (Service Quotas, service EC2), or use fewer or "
        "smaller instances; this is not retried",
    )


def _kind_by_suffix(code: str) -> type[errors.CloudError] | None:
    """EC2 builds many codes from the resource's name: ``InvalidSubnetID.NotFound``,
    ``InvalidIPAddress.InUse``."""
    if code.endswith(".InUse"):
        return errors.InUseError
    if code.endswith(".NotFound"):
        return errors.NotFoundError
    return None


def ec2_error(message: str, code: str) -> errors.CloudError:
    """The :class:`~dask_secure_cloud.errors.CloudError` of the kind EC2's ``code`` says."""
    return errors.cloud_error(message, code, error_kinds, _kind_by_suffix)


@contextlib.contextmanager
def _translated(operation: str) -> Iterator[None]:
    """Turn botocore's errors into a :class:`CloudError` that says what to change."""
    try:
        yield
    except NoCredentialsError as e:
        raise driver.CloudError(
            "No AWS credentials found. Configure them as for the AWS CLI: "
            "AWS_PROFILE or ~/.aws/credentials, AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, SSO, or an instance role"
        ) from e
    except ClientError as e:
        error = e.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", str(e))
        advice = next((v for k, v in _ADVICE.items() if code.startswith(k)), None)
        hint = f" ({advice})" if advice else ""
        raise ec2_error(f"EC2 {operation} failed: {code}: {message}{hint}", code) from e
    except BotoCoreError as e:  # no answer: a network error, a timeout
        raise driver.CloudError(f"EC2 {operation} failed: {e}") from e
    except ResponseParserError as e:  # an answer not from EC2 (a proxy's error page)
        raise driver.CloudError(f"EC2 {operation} failed: the answer was not EC2's ({e})") from e
