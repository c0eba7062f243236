"""Azure prices: the Azure Retail Prices API (``https://prices.azure.com/api/retail/prices``,
public, no credentials), queried with its OData ``$filter`` and followed through
``NextPageLink``: pay-as-you-go Linux VM sizes (and their Spot meters), the managed OS
disk's tier, and a Standard static public IPv4 address.

Retail prices are list prices in USD; an agreement's own prices (EA, CSP) differ. Where
the cluster reaches another resource manager (``resource_manager_url``: Azure Stack, a
test stand-in) or the China cloud, the public list does not price it: unknown unless a
price source is given (``secure-cloud.price-sources.azure``).
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .estimate import HOURS_PER_MONTH, Estimate, Item, Part, PriceUnknown, price_source, priced

__all__ = ["estimate", "retail_prices"]

SOURCE = "Azure Retail Prices API"
RETAIL_PRICES_URL = "https://prices.azure.com/api/retail/prices"
API_VERSION = "2023-01-01-preview"
TIMEOUT = 30.0
#: Managed disk tiers: (largest size in GiB, tier name), smallest first, for each
#: storage type the ``disk_type`` option takes, and the product that prices them.
_DISK_TIERS = {
    "Premium_LRS": (
        "Premium SSD Managed Disks",
        "P",
        [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32767],
        [1, 2, 3, 4, 6, 10, 15, 20, 30, 40, 50, 60, 70, 80],
    ),
    "StandardSSD_LRS": (
        "Standard SSD Managed Disks",
        "E",
        [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32767],
        [1, 2, 3, 4, 6, 10, 15, 20, 30, 40, 50, 60, 70, 80],
    ),
    "Standard_LRS": (
        "Standard HDD Managed Disks",
        "S",
        [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32767],
        [4, 6, 10, 15, 20, 30, 40, 50, 60, 70, 80],
    ),
}


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def retail_prices(filters: dict[str, str], ca_bundle: str | None = None) -> list[dict[str, Any]]:
    """Every item the Retail Prices API lists for ``filters`` (each ``field eq value``),
    USD, following ``NextPageLink``."""
    base = price_source("azure") or RETAIL_PRICES_URL
    odata = " and ".join(f"{k} eq {_quote(v)}" for k, v in filters.items())
    url: str | None = (
        f"{base}?{urllib.parse.urlencode({'api-version': API_VERSION, 'currencyCode': 'USD'})}"
        f"&$filter={urllib.parse.quote(odata)}"
    )
    context = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else None
    items: list[dict[str, Any]] = []
    while url:
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as answer:
                page = json.load(answer)
        except urllib.error.HTTPError as e:
            raise PriceUnknown(f"the Azure Retail Prices API answered {e.code} {e.reason}") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise PriceUnknown(f"no answer from the Azure Retail Prices API ({e})") from e
        except ValueError as e:
            raise PriceUnknown(f"the Azure Retail Prices API answered no JSON ({e})") from e
        items += page.get("Items") or []
        url = page.get("NextPageLink")
    return items


def _one(items: list[dict[str, Any]], unit: str, what: str) -> float:
    prices = {float(i["retailPrice"]) for i in items if i.get("unitOfMeasure") == unit}
    if not prices:
        raise PriceUnknown(f"the Azure Retail Prices API lists no price for {what}")
    if len(prices) > 1:
        raise PriceUnknown(f"the Azure Retail Prices API lists {len(prices)} prices for {what}")
    return prices.pop()


def vm_price(location: str, size: str, *, spot: bool, ca_bundle: str | None = None) -> float:
    """Pay-as-you-go (or Spot) Linux price per hour of ``size`` in ``location``."""
    items = retail_prices(
        {
            "serviceName": "Virtual Machines",
            "armRegionName": location,
            "armSkuName": size,
            "priceType": "Consumption",
        },
        ca_bundle,
    )
    linux = [
        i
        for i in items
        if i.get("productName", "").startswith("Virtual Machines")
        and "Windows" not in i.get("productName", "")
        and "Low Priority" not in i.get("skuName", "")
        and i.get("skuName", "").endswith(" Spot") == spot
    ]
    return _one(linux, "1 Hour", f"{size}{' Spot' if spot else ''} (Linux) in {location}")


def disk_tier(disk_type: str, size_gb: int) -> tuple[str, str]:
    """The product and tier (``"P6"``) a managed disk of ``size_gb`` bills as."""
    if disk_type not in _DISK_TIERS:
        raise PriceUnknown(f"no tier table for disk_type {disk_type!r}")
    product, letter, sizes, numbers = _DISK_TIERS[disk_type]
    for limit, number in zip(sizes, numbers, strict=True):
        if size_gb <= limit:
            return product, f"{letter}{number}"
    raise PriceUnknown(f"a {size_gb} GiB disk is larger than any {disk_type} tier")


def disk_price(location: str, disk_type: str, size_gb: int, ca_bundle: str | None = None) -> float:
    """Price per hour of the managed disk tier ``size_gb`` falls in (billed monthly)."""
    product, tier = disk_tier(disk_type, size_gb)
    items = retail_prices(
        {
            "serviceName": "Storage",
            "armRegionName": location,
            "productName": product,
            "skuName": f"{tier} LRS",
            "priceType": "Consumption",
        },
        ca_bundle,
    )
    disks = [i for i in items if i.get("meterName") == f"{tier} LRS Disk"]
    return _one(disks, "1/Month", f"a {tier} LRS disk in {location}") / HOURS_PER_MONTH


def public_ip_price(location: str, ca_bundle: str | None = None) -> float:
    """Price per hour of a Standard static public IPv4 address in ``location``."""
    items = retail_prices(
        {
            "serviceName": "Virtual Network",
            "armRegionName": location,
            "productName": "IP Addresses",
            "skuName": "Standard",
            "priceType": "Consumption",
        },
        ca_bundle,
    )
    static = [i for i in items if i.get("meterName") == "Standard IPv4 Static Public IP"]
    return _one(static, "1 Hour", f"a Standard static public IPv4 address in {location}")


def _why_not(options: Any, location: str | None) -> str | None:
    """Why the retail prices do not price this cluster, or ``None`` when they do."""
    if not location:
        return (
            "location is not set (the resource group's is looked up only at start); "
            "pass location= to price the cluster before it exists"
        )
    if price_source("azure"):
        return None
    if options.resource_manager_url:
        return (
            f"the cluster's resource manager is {options.resource_manager_url}, which Azure's "
            "public retail prices do not price; set secure-cloud.price-sources.azure"
        )
    if options.cloud == "china":
        return "Azure's retail price list does not cover Azure China"
    return None


def estimate(options: Any, workers: int, driver: Any = None) -> Estimate:
    """The hourly cost of an ``AzureVMCluster`` with ``options`` and ``workers`` workers,
    in the option's ``location`` or the resource group's (which the driver looked up)."""
    location = options.location or getattr(driver, "location", None)
    blocked = _why_not(options, location)
    location = location or "?"
    bundle = options.ca_bundle

    def item(key: str, what: str, fetch: Any) -> Item:
        if blocked:
            return Item(what, None, why=blocked)
        return priced("azure", location, key, what, fetch)

    disk = item(
        f"disk:{options.disk_type}:{options.disk_size}",
        f"{options.disk_size} GiB {options.disk_type}",
        lambda: disk_price(location, options.disk_type, options.disk_size, bundle),
    )
    address = item("ip:standard-static", "public IPv4", lambda: public_ip_price(location, bundle))
    scheduler_size, worker_size = options.scheduler_vm_size, options.worker_vm_size
    scheduler = [
        item(
            f"vm:{scheduler_size}",
            scheduler_size,
            lambda: vm_price(location, scheduler_size, spot=False, ca_bundle=bundle),
        ),
        disk,
    ]
    if not options.use_private_ip:
        scheduler.append(address)
    spot = options.worker_spot
    worker = [
        item(
            f"vm:{worker_size}{':spot' if spot else ''}",
            f"{worker_size}{' (spot)' if spot else ''}",
            lambda: vm_price(location, worker_size, spot=spot, ca_bundle=bundle),
        ),
        disk,
    ]
    notes = [
        "not counted: data transfer out of the region, disk transactions, and storage "
        "you make yourself"
    ]
    # The vnet made for the cluster gives its workers default outbound access, so
    # they get no public address unless asked; a given vnet decides at start.
    if options.worker_public_ip or (options.worker_public_ip is None and options.vnet):
        worker.append(address)
        if options.worker_public_ip is None:
            notes.append(
                "public IPv4 counted for each worker: one is given only where the "
                "subnet's sole way out needs it (worker_public_ip=False: never)"
            )
    if spot:
        notes.append("spot: the current Spot retail price, not spot_max_price")
    return Estimate(
        "azure", SOURCE, Part(tuple(scheduler)), Part(tuple(worker)), workers, tuple(notes)
    )
