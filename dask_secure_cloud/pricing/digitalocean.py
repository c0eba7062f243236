"""Droplet prices: each size's ``price_hourly`` from DigitalOcean's own ``/v2/sizes``,
through pydo, at the same API (``api_url``) and with the same token the driver uses.

A droplet's price covers its disk, its public IPv4 address and its transfer allowance;
the cluster's VPC and cloud firewall cost nothing, so the droplets are the whole bill.
"""

from __future__ import annotations

import os
from typing import Any

from .estimate import Estimate, Part, PriceUnknown, priced

try:
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
    )
    from pydo import Client
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError(
        "DigitalOcean prices need the digitalocean extra: "
        "pip install 'dask-secure-cloud[digitalocean]'"
    ) from e

__all__ = ["estimate", "size_prices"]

SOURCE = "DigitalOcean /v2/sizes"


def size_prices(options: Any) -> dict[str, float]:
    """``price_hourly`` of every size the API lists."""
    token = options.token or os.environ.get("DIGITALOCEAN_TOKEN")
    if not token:
        raise PriceUnknown("no DigitalOcean API token to read the sizes' prices with")
    kwargs: dict[str, Any] = {}
    if options.api_url:
        kwargs["endpoint"] = options.api_url
    if options.ca_bundle:
        kwargs["connection_verify"] = options.ca_bundle
    client = Client(token=token, **kwargs)
    prices: dict[str, float] = {}
    try:
        page = 1
        while True:
            answer = client.sizes.list(per_page=200, page=page)
            if not isinstance(answer, dict) or "sizes" not in answer:
                # pydo hands some documented error answers back as bodies.
                message = answer.get("message") if isinstance(answer, dict) else answer
                raise PriceUnknown(f"DigitalOcean refused to list sizes: {message}")
            for size in answer["sizes"]:
                if size.get("price_hourly") is not None:
                    prices[size["slug"]] = float(size["price_hourly"])
            if not (answer.get("links") or {}).get("pages", {}).get("next"):
                return prices
            page += 1
    except ClientAuthenticationError as e:
        raise PriceUnknown(f"DigitalOcean refused the API token ({e.status_code})") from e
    except HttpResponseError as e:
        raise PriceUnknown(f"DigitalOcean answered {e.status_code} listing sizes") from e
    except ServiceRequestError as e:
        raise PriceUnknown(f"no answer from the DigitalOcean API ({e})") from e
    finally:
        client.close()


def estimate(options: Any, workers: int, driver: Any = None) -> Estimate:
    """The hourly cost of a ``DropletCluster`` with ``options`` and ``workers`` workers."""
    listed: dict[str, float] | None = None

    def price_of(slug: str) -> float:
        nonlocal listed
        if listed is None:
            listed = size_prices(options)
        if slug not in listed:
            raise PriceUnknown(f"DigitalOcean lists no size {slug!r}")
        return listed[slug]

    region = options.region

    def item(slug: str) -> Any:
        return priced("digitalocean", region, f"size:{slug}", slug, lambda: price_of(slug))

    notes = (
        "each droplet's price includes its disk, public IPv4 and transfer allowance; "
        "not counted: transfer beyond the allowance, and volumes or snapshots you make",
    )
    return Estimate(
        "digitalocean",
        SOURCE,
        Part((item(options.scheduler_size),)),
        Part((item(options.worker_size),)),
        workers,
        notes,
    )
