"""EC2 prices: the AWS Price List API (``pricing`` GetProducts, served from us-east-1)
for on-demand instances, gp3 volumes and public IPv4 addresses; EC2's own
DescribeSpotPriceHistory for spot workers. Both through botocore, the client the EC2
driver's aiobotocore is built on, in the caller's thread.

Where EC2 itself is reached at another endpoint (``endpoint_url``,
``AWS_ENDPOINT_URL_EC2``: LocalStack, a test stand-in), the public price list does not
price what runs there: list prices are then unknown unless a price source is given
(``AWS_ENDPOINT_URL_PRICING``, or ``secure-cloud.price-sources.aws``).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterator
from typing import Any

from . import cache
from .estimate import HOURS_PER_MONTH, Estimate, Item, Part, PriceUnknown, price_source, priced

try:
    import botocore.session
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError("EC2 prices need the aws extra: pip install 'dask-secure-cloud[aws]'") from e

__all__ = ["estimate"]

SOURCE = "AWS Price List API"
#: The Price List API answers in us-east-1 (and two other regions), for every region.
PRICING_REGION = "us-east-1"
#: What the EC2 driver gives each instance: a gp3 root volume (its baseline IOPS and
#: throughput are free).
VOLUME_TYPE = "gp3"
_ACCESS_CODES = frozenset({"AccessDeniedException", "UnauthorizedOperation", "AccessDenied"})


def _reason(what: str, error: Exception) -> PriceUnknown:
    """An SDK error as the reason a price is unknown (by its code, not its text)."""
    if isinstance(error, NoCredentialsError):
        return PriceUnknown(f"no AWS credentials to ask {what}")
    if isinstance(error, ClientError):
        err = error.response.get("Error", {})
        code = err.get("Code", "?")
        if code in _ACCESS_CODES:
            return PriceUnknown(f"these AWS credentials may not call {what} ({code})")
        return PriceUnknown(f"{what} refused: {code}: {err.get('Message', '')}")
    return PriceUnknown(f"no answer from {what} ({error})")


def _client(service: str, region: str, endpoint_url: str | None) -> Any:
    session = botocore.session.get_session()
    return session.create_client(service, region_name=region, endpoint_url=endpoint_url)


def _products(service_code: str, filters: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Each product of ``service_code`` whose attributes match ``filters``."""
    client = _client("pricing", PRICING_REGION, price_source("aws"))
    request: dict[str, Any] = {
        "ServiceCode": service_code,
        "FormatVersion": "aws_v1",
        "Filters": [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in filters.items()],
        "MaxResults": 100,
    }
    try:
        while True:
            try:
                answer = client.get_products(**request)
            except (ClientError, BotoCoreError) as e:
                raise _reason("pricing:GetProducts", e) from e
            for raw in answer.get("PriceList", []):
                yield json.loads(raw) if isinstance(raw, str) else raw
            if not answer.get("NextToken"):
                return
            request["NextToken"] = answer["NextToken"]
    finally:
        client.close()


def _on_demand(products: list[dict[str, Any]], unit: str, what: str) -> float:
    """The one on-demand USD price per ``unit`` of ``products``."""
    prices = {
        float(dim["pricePerUnit"]["USD"])
        for product in products
        for term in product.get("terms", {}).get("OnDemand", {}).values()
        for dim in term.get("priceDimensions", {}).values()
        if dim.get("unit") == unit and "USD" in dim.get("pricePerUnit", {})
    }
    if not prices:
        raise PriceUnknown(f"the AWS price list has no on-demand price for {what}")
    if len(prices) > 1:
        raise PriceUnknown(
            f"the AWS price list has {len(prices)} different on-demand prices for {what}"
        )
    return prices.pop()


def instance_price(region: str, instance_type: str) -> float:
    """On-demand Linux price per hour of ``instance_type`` in ``region``."""
    filters = {
        "instanceType": instance_type,
        "regionCode": region,
        "operatingSystem": "Linux",
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "capacitystatus": "Used",
        "licenseModel": "No License required",
    }
    return _on_demand(list(_products("AmazonEC2", filters)), "Hrs", f"{instance_type} in {region}")


def volume_price(region: str, volume_type: str = VOLUME_TYPE) -> float:
    """Price per GB-month of a ``volume_type`` EBS volume in ``region``."""
    filters = {"productFamily": "Storage", "volumeApiName": volume_type, "regionCode": region}
    return _on_demand(
        list(_products("AmazonEC2", filters)), "GB-Mo", f"{volume_type} volumes in {region}"
    )


def public_ipv4_price(region: str) -> float:
    """Price per hour of an in-use public IPv4 address in ``region``."""
    products = [
        p
        for p in _products("AmazonVPC", {"group": "VPCPublicIPv4Address", "regionCode": region})
        if p.get("product", {})
        .get("attributes", {})
        .get("usagetype", "")
        .endswith("PublicIPv4:InUseAddress")
    ]
    return _on_demand(products, "Hrs", f"in-use public IPv4 addresses in {region}")


def spot_price(region: str, instance_type: str, endpoint_url: str | None) -> float:
    """The highest current Linux spot price of ``instance_type`` across the region's
    zones: the zone is the subnet's, known only once the cluster starts."""
    client = _client("ec2", region, endpoint_url)
    try:
        answer = client.describe_spot_price_history(
            InstanceTypes=[instance_type],
            ProductDescriptions=["Linux/UNIX"],
            StartTime=datetime.datetime.now(datetime.timezone.utc),
        )
    except (ClientError, BotoCoreError) as e:
        raise _reason("ec2:DescribeSpotPriceHistory", e) from e
    finally:
        client.close()
    latest: dict[str, tuple[datetime.datetime, float]] = {}
    for entry in answer.get("SpotPriceHistory", []):
        if not entry.get("ProductDescription", "").startswith("Linux/UNIX"):
            continue
        zone, when = entry["AvailabilityZone"], entry["Timestamp"]
        if zone not in latest or when > latest[zone][0]:
            latest[zone] = (when, float(entry["SpotPrice"]))
    if not latest:
        raise PriceUnknown(f"EC2 reports no spot price for {instance_type} in {region}")
    return max(price for _, price in latest.values())


def _list_prices_reachable(options: Any) -> str | None:
    """Why the public price list does not apply, or ``None`` when it does."""
    ec2 = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_EC2")
    given = (
        price_source("aws")
        or os.environ.get("AWS_ENDPOINT_URL_PRICING")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if ec2 and not given:
        return (
            f"EC2 is reached at {ec2}, which the public AWS price list does not price; "
            "set AWS_ENDPOINT_URL_PRICING or secure-cloud.price-sources.aws"
        )
    return None


def estimate(options: Any, workers: int, driver: Any = None) -> Estimate:
    """The hourly cost of an ``EC2Cluster`` with ``options`` and ``workers`` workers."""
    region = options.region
    blocked = _list_prices_reachable(options)

    def listed(key: str, what: str, fetch: Any) -> Item:
        if blocked:
            return Item(what, None, why=blocked)
        return priced("aws", region, key, what, fetch)

    size = options.filesystem_size
    disk = listed(
        f"volume:{VOLUME_TYPE}:{size}",
        f"{size} GiB {VOLUME_TYPE}",
        lambda: volume_price(region) * size / HOURS_PER_MONTH,
    )
    address = listed("ipv4", "public IPv4", lambda: public_ipv4_price(region))
    scheduler = [
        listed(
            f"instance:{options.scheduler_instance_type}",
            options.scheduler_instance_type,
            lambda: instance_price(region, options.scheduler_instance_type),
        ),
        disk,
    ]
    notes = [
        "not counted: data transfer out of the region or to the internet, and storage "
        "you make yourself"
    ]
    if not options.use_private_ip:
        scheduler.append(address)
    worker_type = options.worker_instance_type
    if options.worker_spot:
        vm = priced(
            "aws",
            region,
            f"spot:{worker_type}",
            f"{worker_type} (spot)",
            lambda: spot_price(region, worker_type, options.endpoint_url),
            cache.SPOT_MAX_AGE,
        )
        notes.append("spot: the highest current price among the region's zones")
    else:
        vm = listed(
            f"instance:{worker_type}", worker_type, lambda: instance_price(region, worker_type)
        )
    worker = [vm, disk]
    if options.worker_public_ip is not False:
        worker.append(address)
        if options.worker_public_ip is None:
            notes.append(
                "public IPv4 counted for each worker: one is given only where the "
                "subnet's sole way out needs it (worker_public_ip=False: never)"
            )
    return Estimate(
        "aws", SOURCE, Part(tuple(scheduler)), Part(tuple(worker)), workers, tuple(notes)
    )
