"""Compute Engine prices: Google's Cloud Billing Catalog API
(``services/6F81-5844-456A/skus``, the Compute Engine service), read over REST with
google-auth's authorized session and the cluster's own credentials (the project has no
Billing client library to depend on); machine shapes (vCPUs, memory) from Compute
Engine's ``machineTypes.get`` through google-cloud-compute, as the driver reaches it.

A predefined machine type bills per vCPU hour and per GiB hour of its family's SKUs
(``E2 Instance Core running in Americas``...), Spot VMs by the ``Spot Preemptible``
ones; a persistent disk per GiB month; an external IPv4 address per hour. A shared-core
type (``e2-small``) bills a fraction of a vCPU that the catalog does not state: unknown.
Where the cluster reaches another Compute Engine endpoint (``api_endpoint``) the public
catalog does not price it, unless ``secure-cloud.price-sources.gcp`` is set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import cache
from .estimate import HOURS_PER_MONTH, Estimate, Item, Part, PriceUnknown, price_source, priced

try:
    import google.auth
    import google.auth.exceptions
    import requests
    from google.api_core import exceptions as gexc
    from google.api_core.client_options import ClientOptions
    from google.auth.transport.requests import AuthorizedSession
    from google.cloud import compute_v1
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError(
        "Compute Engine prices need the gcp extra: pip install 'dask-secure-cloud[gcp]'"
    ) from e

__all__ = ["estimate"]

SOURCE = "Cloud Billing Catalog API"
CATALOG_ENDPOINT = "https://cloudbilling.googleapis.com"
COMPUTE_SERVICE = "6F81-5844-456A"
SCOPES = ["https://www.googleapis.com/auth/cloud-billing.readonly"]
TIMEOUT = 60.0
#: Persistent disk types and the description their capacity SKU starts with.
_DISK_SKUS = {
    "pd-balanced": "Balanced PD Capacity",
    "pd-ssd": "SSD backed PD Capacity",
    "pd-standard": "Storage PD Capacity",
}


def _credentials(credentials: Any) -> Any:
    if credentials is not None:
        return credentials
    try:
        found, _ = google.auth.default(scopes=SCOPES)
    except google.auth.exceptions.DefaultCredentialsError as e:
        raise PriceUnknown("no Google Cloud credentials to read the billing catalog with") from e
    return found


def catalog(credentials: Any) -> list[dict[str, Any]]:
    """Every SKU of Compute Engine in the catalog, USD, all pages."""
    base = (price_source("gcp") or CATALOG_ENDPOINT).rstrip("/")
    session = AuthorizedSession(_credentials(credentials))
    url = f"{base}/v1/services/{COMPUTE_SERVICE}/skus"
    params: dict[str, Any] = {"currencyCode": "USD", "pageSize": 5000}
    skus: list[dict[str, Any]] = []
    try:
        while True:
            try:
                answer = session.get(url, params=params, timeout=TIMEOUT)
            except google.auth.exceptions.RefreshError as e:
                raise PriceUnknown(f"the Google credentials could not be refreshed ({e})") from e
            except requests.RequestException as e:
                raise PriceUnknown(f"no answer from the Cloud Billing Catalog API ({e})") from e
            if answer.status_code in (401, 403):
                raise PriceUnknown(
                    f"the Cloud Billing Catalog API refused these credentials "
                    f"({answer.status_code}); enable cloudbilling.googleapis.com for the project"
                )
            if answer.status_code != 200:
                raise PriceUnknown(f"the Cloud Billing Catalog API answered {answer.status_code}")
            try:
                page = answer.json()
            except ValueError as e:
                raise PriceUnknown("the Cloud Billing Catalog API answered no JSON") from e
            skus += page.get("skus") or []
            if not page.get("nextPageToken"):
                return skus
            params["pageToken"] = page["nextPageToken"]
    finally:
        session.close()


def _unit_price(sku: dict[str, Any], unit: str) -> float:
    expression = (sku.get("pricingInfo") or [{}])[0].get("pricingExpression", {})
    if expression.get("usageUnit") != unit or not expression.get("tieredRates"):
        raise PriceUnknown(f"SKU {sku.get('description')!r} is not priced per {unit}")
    rate = expression["tieredRates"][-1]["unitPrice"]
    return int(rate.get("units") or 0) + int(rate.get("nanos") or 0) / 1e9


def _find(
    skus: list[dict[str, Any]], region: str, prefix: str, usage: str, unit: str, what: str
) -> float:
    found = [
        s
        for s in skus
        if s.get("description", "").startswith(prefix)
        and s.get("category", {}).get("usageType") == usage
        and (
            region in (s.get("serviceRegions") or []) or "global" in (s.get("serviceRegions") or [])
        )
    ]
    prices = {_unit_price(s, unit) for s in found}
    if not prices:
        raise PriceUnknown(f"the billing catalog has no {what} SKU for {region}")
    if len(prices) > 1:
        raise PriceUnknown(f"the billing catalog has {len(prices)} {what} prices for {region}")
    return prices.pop()


def machine_shape(options: Any, machine_type: str, credentials: Any) -> tuple[int, float, bool]:
    """``(vCPUs, memory in GiB, shared core)`` of ``machine_type`` in the zone."""
    project = options.project
    creds = credentials
    if creds is None or project is None:
        try:
            found, found_project = google.auth.default()
        except google.auth.exceptions.DefaultCredentialsError as e:
            raise PriceUnknown("no Google Cloud credentials to read the machine type with") from e
        creds, project = creds or found, project or found_project
    if project is None:
        raise PriceUnknown("project is not set and the credentials name none")
    client_options = (
        ClientOptions(api_endpoint=options.api_endpoint) if options.api_endpoint else None
    )
    client = compute_v1.MachineTypesClient(
        credentials=creds, transport="rest", client_options=client_options
    )
    try:
        found_type = client.get(project=project, zone=options.zone, machine_type=machine_type)
    except gexc.NotFound as e:
        raise PriceUnknown(f"machine type {machine_type!r} does not exist in {options.zone}") from e
    except gexc.GoogleAPICallError as e:
        raise PriceUnknown(f"machineTypes.get failed ({e.code})") from e
    except requests.RequestException as e:
        raise PriceUnknown(f"no answer from Compute Engine ({e})") from e
    finally:
        client.transport.close()
    return found_type.guest_cpus, found_type.memory_mb / 1024, bool(found_type.is_shared_cpu)


def estimate(options: Any, workers: int, driver: Any = None) -> Estimate:
    """The hourly cost of a ``GCPCluster`` with ``options`` and ``workers`` workers, read
    with the driver's credentials (``credentials=``) where it has them."""
    credentials = getattr(driver, "credentials", None)
    region = options.zone.rsplit("-", 1)[0]
    blocked = None
    if options.api_endpoint and not price_source("gcp"):
        blocked = (
            f"Compute Engine is reached at {options.api_endpoint}, which Google's public "
            "billing catalog does not price; set secure-cloud.price-sources.gcp"
        )
    skus: list[dict[str, Any]] | None = None

    def the_catalog() -> list[dict[str, Any]]:
        nonlocal skus
        if skus is None:
            skus = catalog(credentials)
        return skus

    def item(key: str, what: str, fetch: Callable[[], float], max_age: float | None = None) -> Item:
        if blocked:
            return Item(what, None, why=blocked)
        return priced("gcp", region, key, what, fetch, max_age)

    def vm_price(machine_type: str, spot: bool) -> float:
        cpus, memory, shared = machine_shape(options, machine_type, credentials)
        if shared:
            raise PriceUnknown(
                f"{machine_type} is a shared-core type, billed as a fraction of a vCPU the "
                "catalog does not state"
            )
        family = machine_type.split("-", 1)[0].upper()
        kind = "Predefined Instance" if family == "N1" else "Instance"
        head = f"Spot Preemptible {family}" if spot else family
        usage = "Preemptible" if spot else "OnDemand"
        core = _find(
            the_catalog(), region, f"{head} {kind} Core running in", usage, "h", f"{head} core"
        )
        ram = _find(
            the_catalog(), region, f"{head} {kind} Ram running in", usage, "GiBy.h", f"{head} RAM"
        )
        return cpus * core + memory * ram

    def disk_price() -> float:
        prefix = _DISK_SKUS.get(options.disk_type)
        if prefix is None:
            raise PriceUnknown(f"no catalog entry known for disk_type {options.disk_type!r}")
        per_month = _find(the_catalog(), region, prefix, "OnDemand", "GiBy.mo", options.disk_type)
        return options.disk_size * per_month / HOURS_PER_MONTH

    def ip_price(spot: bool) -> float:
        kind = "Spot Preemptible VM" if spot else "Standard VM"
        return _find(
            the_catalog(), region, f"External IP Charge on a {kind}", "OnDemand", "h", "external IP"
        )

    disk = item(
        f"disk:{options.disk_type}:{options.disk_size}",
        f"{options.disk_size} GB {options.disk_type}",
        disk_price,
    )
    scheduler_type, worker_type, spot = (
        options.scheduler_machine_type,
        options.worker_machine_type,
        options.worker_spot,
    )
    scheduler = [
        item(f"machine:{scheduler_type}", scheduler_type, lambda: vm_price(scheduler_type, False)),
        disk,
    ]
    if not options.use_private_ip:
        scheduler.append(item("ip:standard", "external IPv4", lambda: ip_price(False)))
    worker = [
        item(
            f"machine:{worker_type}{':spot' if spot else ''}",
            f"{worker_type}{' (spot)' if spot else ''}",
            lambda: vm_price(worker_type, spot),
            cache.SPOT_MAX_AGE if spot else None,
        ),
        disk,
    ]
    if options.gpu_type:
        worker.append(
            Item(
                f"{options.gpu_count} x {options.gpu_type}",
                None,
                why="accelerator prices are not looked up, so the total would be too low",
            )
        )
    notes = ["not counted: network egress, sustained-use discounts, and storage you make yourself"]
    if options.worker_public_ip is not False:
        worker.append(
            item(f"ip:{'spot' if spot else 'standard'}", "external IPv4", lambda: ip_price(spot))
        )
        if options.worker_public_ip is None:
            notes.append(
                "external IPv4 counted for each worker: one is given only where the "
                "network's sole way out needs it (worker_public_ip=False: never)"
            )
    return Estimate(
        "gcp", SOURCE, Part(tuple(scheduler)), Part(tuple(worker)), workers, tuple(notes)
    )
