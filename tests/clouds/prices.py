"""The clouds' price lists on 127.0.0.1, each in its API's own shape and checked as the
API checks a request.

- AWS Price List API (JSON 1.1, ``AWSPriceListService.GetProducts``): the request is
  validated with botocore's own model of the ``pricing`` service; products are matched
  on their attributes by ``TERM_MATCH`` filters and answered as JSON strings, paged.
- Azure Retail Prices (``GET /api/retail/prices``): an ``api-version``, and an OData
  ``$filter`` of ``field eq 'value'`` terms joined by ``and`` (anything else is a 400);
  values are case-sensitive as in ``2023-01-01-preview``; paged by ``NextPageLink``.
- Cloud Billing Catalog (``GET /v1/services/SERVICE/skus``): ``currencyCode``,
  ``pageSize`` (at most 5000) and ``pageToken``; SKUs with ``pricingInfo`` as the API
  returns them.

``calls`` counts the requests each API received, so a test can tell a cached price from
a fetched one; ``deny`` makes one API refuse as it refuses a caller without permission.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from typing import Any

import botocore.session
from botocore.validate import ParamValidator

from .jsonapi import JSONServer

_AZURE_TERM = re.compile(r"\s*(\w+) eq '((?:[^']|'')*)'\s*")


def aws_product(
    service_code: str, attributes: Mapping[str, str], usd: str, unit: str
) -> dict[str, Any]:
    """A Price List product with one on-demand price, as GetProducts lists it."""
    sku = f"SKU{abs(hash(tuple(sorted(attributes.items())))) % 10**10:010d}"
    return {
        "product": {
            "productFamily": attributes.get("productFamily", "Compute Instance"),
            "attributes": {"servicecode": service_code, **attributes},
            "sku": sku,
        },
        "serviceCode": service_code,
        "terms": {
            "OnDemand": {
                f"{sku}.JRTCKXETXF": {
                    "priceDimensions": {
                        f"{sku}.JRTCKXETXF.6YS6EN2CT7": {
                            "unit": unit,
                            "endRange": "Inf",
                            "description": f"{usd} USD per {unit}",
                            "appliesTo": [],
                            "rateCode": f"{sku}.JRTCKXETXF.6YS6EN2CT7",
                            "beginRange": "0",
                            "pricePerUnit": {"USD": usd},
                        }
                    },
                    "sku": sku,
                    "effectiveDate": "2026-11-01T00:00:00Z",
                    "offerTermCode": "JRTCKXETXF",
                    "termAttributes": {},
                }
            }
        },
        "version": "20261101000000",
        "publicationDate": "2026-11-01T00:00:00Z",
    }


def gcp_sku(
    description: str, usage: str, regions: list[str], unit: str, units: int, nanos: int
) -> dict[str, Any]:
    """A Compute Engine SKU as services.skus.list returns it."""
    sku_id = f"{abs(hash(description + ''.join(regions))) % 16**12:012X}"
    return {
        "name": f"services/6F81-5844-456A/skus/{sku_id}",
        "skuId": sku_id,
        "description": description,
        "category": {
            "serviceDisplayName": "Compute Engine",
            "resourceFamily": "Compute",
            "resourceGroup": "CPU",
            "usageType": usage,
        },
        "serviceRegions": regions,
        "pricingInfo": [
            {
                "summary": "",
                "pricingExpression": {
                    "usageUnit": unit,
                    "displayQuantity": 1,
                    "tieredRates": [
                        {
                            "startUsageAmount": 0,
                            "unitPrice": {
                                "currencyCode": "USD",
                                "units": str(units),
                                "nanos": nanos,
                            },
                        }
                    ],
                    "usageUnitDescription": unit,
                    "baseUnit": unit,
                    "baseUnitDescription": unit,
                    "baseUnitConversionFactor": 1,
                },
                "currencyConversionRate": 1,
                "effectiveTime": "2026-11-01T00:00:00Z",
            }
        ],
        "serviceProviderName": "Google",
    }


class PriceStandIn:
    """The three price lists on one plain-HTTP server; each test adds what it serves."""

    def __init__(self, page_size: int = 2) -> None:
        self.aws_products: list[dict[str, Any]] = []
        self.azure_items: list[dict[str, Any]] = []
        self.gcp_skus: list[dict[str, Any]] = []
        self.calls: Counter[str] = Counter()
        self.deny: set[str] = set()
        self.page_size = page_size
        self._lock = threading.Lock()
        model = botocore.session.get_session().get_service_model("pricing")
        self._get_products = model.operation_model("GetProducts").input_shape
        self.url = ""

    def start(self) -> str:
        self._server = JSONServer(self._answer)
        self.url = self._server.url
        return self.url

    def stop(self) -> None:
        self._server.stop()

    # -- dispatch -----------------------------------------------------------------------

    def _answer(
        self, method: str, path: str, query: dict[str, str], body: bytes, headers: Any
    ) -> tuple[int, Any, Mapping[str, str]]:
        target = headers.get("X-Amz-Target", "")
        if method == "POST" and path == "/" and target.startswith("AWSPriceListService."):
            return self._aws(target.split(".", 1)[1], body)
        if method == "GET" and path == "/api/retail/prices":
            return self._azure(query)
        match = re.fullmatch(r"/v1/services/([^/]+)/skus", path)
        if method == "GET" and match:
            return self._gcp(match.group(1), query)
        return 404, {"error": f"stand-in has no {method} {path}"}, {}

    def _count(self, api: str) -> None:
        with self._lock:
            self.calls[api] += 1

    # -- AWS ----------------------------------------------------------------------------

    def _aws(self, action: str, body: bytes) -> tuple[int, Any, Mapping[str, str]]:
        kind = {"Content-Type": "application/x-amz-json-1.1"}
        self._count("aws")
        if action != "GetProducts":
            return 400, {"__type": "InvalidParameterException", "message": action}, kind
        if "aws" in self.deny:
            return 400, {"__type": "AccessDeniedException", "Message": "not authorized"}, kind
        request = json.loads(body or b"{}")
        report = ParamValidator().validate(request, self._get_products)
        if report.has_errors():
            return 400, {"__type": "ValidationException", "message": report.generate_report()}, kind
        wanted = {f["Field"]: f["Value"] for f in request.get("Filters", [])}
        if any(f["Type"] != "TERM_MATCH" for f in request.get("Filters", [])):
            return 400, {"__type": "InvalidParameterException", "message": "filter type"}, kind
        found = [
            p
            for p in self.aws_products
            if p["serviceCode"] == request["ServiceCode"]
            and all(
                p["product"]["attributes"].get(k) == v or p["product"].get(k) == v
                for k, v in wanted.items()
            )
        ]
        start = int(request.get("NextToken") or 0)
        size = min(int(request.get("MaxResults", 100)), self.page_size)
        page = found[start : start + size]
        answer: dict[str, Any] = {
            "FormatVersion": "aws_v1",
            "PriceList": [json.dumps(p) for p in page],
        }
        if start + size < len(found):
            answer["NextToken"] = str(start + size)
        return 200, answer, kind

    # -- Azure --------------------------------------------------------------------------

    def _azure(self, query: dict[str, str]) -> tuple[int, Any, Mapping[str, str]]:
        self._count("azure")
        if query.get("api-version") not in (None, "2023-01-01-preview", "2021-10-01-preview"):
            return 400, {"Error": {"Code": "InvalidApiVersion"}}, {}
        terms: dict[str, str] = {}
        for part in filter(None, re.split(r"\band\b", query.get("$filter", ""))):
            match = _AZURE_TERM.fullmatch(part)
            if not match:
                return 400, {"Error": {"Code": "BadRequest", "Message": part}}, {}
            terms[match.group(1)] = match.group(2).replace("''", "'")
        fields = {"priceType": "type"}
        found = [
            i
            for i in self.azure_items
            if all(i.get(fields.get(k, k)) == v for k, v in terms.items())
        ]
        skip = int(query.get("$skip", 0))
        page = found[skip : skip + self.page_size]
        next_link = None
        if skip + self.page_size < len(found):
            rest = {**query, "$skip": str(skip + self.page_size)}
            next_link = f"{self.url}/api/retail/prices?{urllib.parse.urlencode(rest)}"
        return (
            200,
            {
                "BillingCurrency": "USD",
                "CustomerEntityId": "Default",
                "CustomerEntityType": "Retail",
                "Items": page,
                "NextPageLink": next_link,
                "Count": len(page),
            },
            {},
        )

    # -- Google -------------------------------------------------------------------------

    def _gcp(self, service: str, query: dict[str, str]) -> tuple[int, Any, Mapping[str, str]]:
        self._count("gcp")
        if "gcp" in self.deny:
            error = {"code": 403, "message": "denied", "status": "PERMISSION_DENIED"}
            return 403, {"error": error}, {}
        size = int(query.get("pageSize", 5000))
        if not 0 < size <= 5000 or query.get("currencyCode", "USD") != "USD":
            error = {"code": 400, "message": "bad page", "status": "INVALID_ARGUMENT"}
            return 400, {"error": error}, {}
        skus = self.gcp_skus if service == "6F81-5844-456A" else []
        start = int(query.get("pageToken") or 0)
        size = min(size, self.page_size)
        answer: dict[str, Any] = {"skus": skus[start : start + size]}
        if start + size < len(skus):
            answer["nextPageToken"] = str(start + size)
        return 200, answer, {}
