"""A cluster's hourly cost before it exists, from each cloud's price list as the
stand-ins serve it, and ``max_hourly_cost`` refusing a start, a scale-up and an adapt
before anything is made.

Each expected figure is computed here by hand from what the stand-in serves."""

from __future__ import annotations

import json
import math
import os
import re
import time
from types import SimpleNamespace
from typing import Any

import dask.config
import pytest
from click.testing import CliRunner
from distributed import Client

from dask_secure_cloud import AzureVMCluster, audit, cli, pricing
from dask_secure_cloud.cluster import ClusterStartError, preview
from dask_secure_cloud.options import (
    AzureOptions,
    DropletOptions,
    EC2Options,
    GCPOptions,
    LocalOptions,
    resolve,
)
from dask_secure_cloud.pricing import cache
from dask_secure_cloud.providers.digitalocean import DropletCluster
from dask_secure_cloud.providers.local import LocalVMCluster

from clouds.digitalocean import SIZE_PRICES
from clouds.prices import PriceStandIn, aws_product, gcp_sku
from standins import start_digitalocean, start_ec2, start_gce, stop_ec2

HOURS = 730.0


@pytest.fixture
def prices(tmp_path, monkeypatch):
    """The price lists' stand-in, named as every cloud's price source, and a price
    cache of the test's own."""
    stand_in = PriceStandIn()
    url = stand_in.start()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL_EC2", raising=False)
    sources = {"aws": url, "gcp": url, "azure": f"{url}/api/retail/prices"}
    with dask.config.set({"secure-cloud.price-sources": sources}):
        yield stand_in
    stand_in.stop()


def _events(path: Any, event: str) -> list[dict[str, Any]]:
    return [e for e in audit.read(path) if e["event"] == event]


# -- AWS ------------------------------------------------------------------------------------


def _serve_aws(stand_in: PriceStandIn) -> None:
    linux = {
        "regionCode": "us-east-1",
        "operatingSystem": "Linux",
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "capacitystatus": "Used",
        "licenseModel": "No License required",
    }
    stand_in.aws_products += [
        aws_product("AmazonEC2", {**linux, "instanceType": "t3.medium"}, "0.0416000000", "Hrs"),
        aws_product("AmazonEC2", {**linux, "instanceType": "t3.large"}, "0.0832000000", "Hrs"),
        # What the filters must leave out: Windows, another region, a reserved capacity.
        aws_product(
            "AmazonEC2",
            {**linux, "instanceType": "t3.large", "operatingSystem": "Windows"},
            "0.1108000000",
            "Hrs",
        ),
        aws_product(
            "AmazonEC2",
            {**linux, "instanceType": "t3.large", "regionCode": "eu-west-1"},
            "0.0912000000",
            "Hrs",
        ),
        aws_product(
            "AmazonEC2",
            {**linux, "instanceType": "t3.large", "capacitystatus": "UnusedCapacityReservation"},
            "0.0832000000",
            "Hrs",
        ),
        aws_product(
            "AmazonEC2",
            {"productFamily": "Storage", "volumeApiName": "gp3", "regionCode": "us-east-1"},
            "0.0800000000",
            "GB-Mo",
        ),
        aws_product(
            "AmazonVPC",
            {
                "group": "VPCPublicIPv4Address",
                "regionCode": "us-east-1",
                "usagetype": "USE1-PublicIPv4:InUseAddress",
            },
            "0.0050000000",
            "Hrs",
        ),
        aws_product(
            "AmazonVPC",
            {
                "group": "VPCPublicIPv4Address",
                "regionCode": "us-east-1",
                "usagetype": "USE1-PublicIPv4:IdleAddress",
            },
            "0.0050000000",
            "Hrs",
        ),
    ]


def test_ec2_estimate_is_the_price_list_s_figures(prices):
    _serve_aws(prices)
    options = resolve(
        EC2Options,
        {
            "scheduler_instance_type": "t3.medium",
            "worker_instance_type": "t3.large",
            "filesystem_size": 40,
            "worker_public_ip": False,
        },
    )
    cost = pricing.estimate(options, 3)
    disk = 40 * 0.08 / HOURS
    scheduler = 0.0416 + disk + 0.005  # the scheduler has a public address
    worker = 0.0832 + disk  # worker_public_ip=False: none
    assert cost.hourly() == pytest.approx(scheduler + 3 * worker)
    assert cost.hourly(5) == pytest.approx(scheduler + 5 * worker)
    assert "AWS Price List API" in cost.describe() and not cost.unknown()


def test_ec2_spot_workers_are_priced_from_ec2_s_spot_history(prices, tmp_path, monkeypatch):
    _serve_aws(prices)
    ec2, client, options = start_ec2(tmp_path, monkeypatch)
    made = list(ec2.mutations)  # the network the test account starts with
    try:
        history = client.describe_spot_price_history(InstanceTypes=["t3.large"])
        highest = max(float(e["SpotPrice"]) for e in history["SpotPriceHistory"])
        resolved = resolve(
            EC2Options,
            {**options, "worker_spot": True, "worker_public_ip": False, "filesystem_size": 40},
        )
        cost = pricing.estimate(resolved, 2)
        disk = 40 * 0.08 / HOURS
        # use_private_ip: the scheduler has no public address to pay for.
        assert cost.hourly() == pytest.approx(0.0416 + disk + 2 * (highest + disk))
        assert ec2.mutations == made  # pricing made nothing
    finally:
        stop_ec2(ec2)


def test_an_ec2_price_list_that_refuses_is_unknown_and_a_cap_refuses_on_it(prices):
    prices.deny.add("aws")
    options = resolve(EC2Options, {"max_hourly_cost": 10})
    cost = pricing.estimate(options, 1)
    assert cost.hourly() is None
    assert "may not call pricing:GetProducts (AccessDeniedException)" in cost.describe()
    error = pricing.refusal(cost, options.max_hourly_cost, 1, "start")
    assert error is not None
    assert "unknown" in str(error) and "$10.0000/h" in str(error)
    assert "max_hourly_cost=False" in str(error)


def test_an_overridden_ec2_endpoint_is_not_priced_from_the_public_list(prices, monkeypatch):
    with dask.config.set({"secure-cloud.price-sources": {}}):
        monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:9")
        monkeypatch.delenv("AWS_ENDPOINT_URL_PRICING", raising=False)
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        cost = pricing.estimate(resolve(EC2Options, {"worker_public_ip": False}), 1)
    assert cost.hourly() is None and "AWS_ENDPOINT_URL_PRICING" in cost.describe()
    assert prices.calls["aws"] == 0


# -- Azure ----------------------------------------------------------------------------------


def _azure_item(**fields: Any) -> dict[str, Any]:
    base = {
        "currencyCode": "USD",
        "tierMinimumUnits": 0.0,
        "armRegionName": "westeurope",
        "location": "EU West",
        "effectiveStartDate": "2026-01-01T00:00:00Z",
        "meterId": "00000000-0000-0000-0000-000000000000",
        "productId": "DZH318Z0BQ4L",
        "skuId": "DZH318Z0BQ4L/00TG",
        "availabilityId": None,
        "isPrimaryMeterRegion": True,
        "type": "Consumption",
    }
    fields["unitPrice"] = fields["retailPrice"]
    return {**base, **fields}


def _serve_azure(stand_in: PriceStandIn) -> None:
    vm = {"serviceName": "Virtual Machines", "serviceFamily": "Compute", "unitOfMeasure": "1 Hour"}
    stand_in.azure_items += [
        _azure_item(
            **vm,
            armSkuName="Standard_D2s_v5",
            skuName="D2s v5",
            productName="Virtual Machines Dsv5 Series",
            meterName="D2s v5",
            retailPrice=0.115,
        ),
        _azure_item(
            **vm,
            armSkuName="Standard_D2s_v5",
            skuName="D2s v5",
            productName="Virtual Machines Dsv5 Series Windows",
            meterName="D2s v5",
            retailPrice=0.207,
        ),
        _azure_item(
            **vm,
            armSkuName="Standard_D4s_v5",
            skuName="D4s v5",
            productName="Virtual Machines Dsv5 Series",
            meterName="D4s v5",
            retailPrice=0.23,
        ),
        _azure_item(
            **vm,
            armSkuName="Standard_D4s_v5",
            skuName="D4s v5 Spot",
            productName="Virtual Machines Dsv5 Series",
            meterName="D4s v5 Spot",
            retailPrice=0.0299,
        ),
        _azure_item(
            **vm,
            armSkuName="Standard_D4s_v5",
            skuName="D4s v5 Low Priority",
            productName="Virtual Machines Dsv5 Series",
            meterName="D4s v5 Low Priority",
            retailPrice=0.046,
        ),
        _azure_item(
            serviceName="Storage",
            serviceFamily="Storage",
            armSkuName="Premium_SSD_Managed_Disk_P6",
            productName="Premium SSD Managed Disks",
            skuName="P6 LRS",
            meterName="P6 LRS Disk",
            unitOfMeasure="1/Month",
            retailPrice=10.21,
        ),
        _azure_item(
            serviceName="Virtual Network",
            serviceFamily="Networking",
            armSkuName="",
            productName="IP Addresses",
            skuName="Standard",
            meterName="Standard IPv4 Static Public IP",
            unitOfMeasure="1 Hour",
            retailPrice=0.005,
        ),
    ]


def test_azure_estimate_is_the_retail_prices_figures(prices):
    _serve_azure(prices)
    options = resolve(
        AzureOptions, {"resource_group": "rg", "location": "westeurope", "disk_size": 64}
    )
    cost = pricing.estimate(options, 2)
    disk = 10.21 / HOURS  # 64 GiB of Premium_LRS bills as a P6
    # The cluster's own vnet: workers get out without a public address.
    assert cost.hourly() == pytest.approx(0.115 + disk + 0.005 + 2 * (0.23 + disk))
    spot = pricing.estimate(resolve(AzureOptions, {**options.__dict__, "worker_spot": True}), 2)
    assert spot.hourly() == pytest.approx(0.115 + disk + 0.005 + 2 * (0.0299 + disk))


def test_prices_are_cached_on_disk_with_their_age(prices, tmp_path):
    _serve_azure(prices)
    options = resolve(AzureOptions, {"resource_group": "rg", "location": "westeurope"})
    first = pricing.estimate(options, 1)
    asked = prices.calls["azure"]
    assert asked > 0
    again = pricing.estimate(options, 1)
    assert prices.calls["azure"] == asked  # every figure came from the cache
    assert again.hourly() == first.hourly()
    path = tmp_path / "cache" / "dask-secure-cloud" / "prices" / "azure-westeurope.json"
    assert path.exists() and (os.stat(path).st_mode & 0o077) == 0
    entries = json.loads(path.read_text())
    for entry in entries.values():
        entry["fetched"] = time.time() - 3 * 3600
    path.write_text(json.dumps(entries))
    old = pricing.estimate(options, 1)
    assert "3h old" in old.describe() and prices.calls["azure"] == asked
    for entry in entries.values():
        entry["fetched"] = time.time() - cache.MAX_AGE - 60
    path.write_text(json.dumps(entries))
    pricing.estimate(options, 1)
    assert prices.calls["azure"] > asked  # too old: fetched again


def test_azure_without_a_location_is_unknown_and_says_how_to_price_it(prices):
    cost = pricing.estimate(resolve(AzureOptions, {"resource_group": "rg"}), 1)
    assert cost.hourly() is None and "pass location=" in cost.describe()
    assert prices.calls["azure"] == 0


@pytest.mark.slow
async def test_an_azure_cluster_without_a_location_is_priced_where_its_group_is(
    azure, prices, audit_log
):
    """No ``location=``: the start reads the resource group's (westeurope in the ARM
    stand-in) before anything exists, and prices the cluster there."""
    _serve_azure(prices)
    stand_in, options = azure
    assert "location" not in options
    async with AzureVMCluster(n_workers=1, disk_size=64, asynchronous=True, **options) as cluster:
        (event,) = _events(audit_log, "cost_estimate")
        disk = 10.21 / HOURS
        assert event["hourly"] == pytest.approx(0.115 + disk + 0.005 + (0.23 + disk))
        assert "unknown" not in repr(cluster)
    assert stand_in.calls.count("GET resourceGroups") == 1  # read once, for price and checks


# -- Compute Engine -------------------------------------------------------------------------


def test_compute_engine_estimate_is_the_billing_catalog_s_figures(prices, tmp_path):
    core, ram, pd = 0.021811, 0.002923, 0.1
    prices.gcp_skus += [
        gcp_sku(
            "E2 Instance Core running in Americas", "OnDemand", ["us-central1"], "h", 0, 21811000
        ),
        gcp_sku(
            "E2 Instance Ram running in Americas", "OnDemand", ["us-central1"], "GiBy.h", 0, 2923000
        ),
        gcp_sku(
            "Spot Preemptible E2 Instance Core running in Americas",
            "Preemptible",
            ["us-central1"],
            "h",
            0,
            6543000,
        ),
        gcp_sku(
            "E2 Instance Core running in Belgium", "OnDemand", ["europe-west1"], "h", 0, 24000000
        ),
        gcp_sku("Balanced PD Capacity", "OnDemand", ["us-central1"], "GiBy.mo", 0, 100000000),
        gcp_sku(
            "Regional Balanced PD Capacity", "OnDemand", ["us-central1"], "GiBy.mo", 0, 200000000
        ),
    ]
    gce, options = start_gce(tmp_path)
    try:
        credentials = options.pop("credentials")
        resolved = resolve(
            GCPOptions,
            {
                **options,
                "scheduler_machine_type": "e2-standard-2",
                "worker_machine_type": "e2-standard-4",
                "disk_size": 50,
                "worker_public_ip": False,
            },
        )
        cost = pricing.estimate(resolved, 3, SimpleNamespace(credentials=credentials))
        disk = 50 * pd / HOURS
        scheduler = 2 * core + 8 * ram + disk
        worker = 4 * core + 16 * ram + disk
        assert cost.hourly() == pytest.approx(scheduler + 3 * worker)
        shared = resolve(GCPOptions, {**resolved.__dict__, "scheduler_machine_type": "e2-small"})
        unknown = pricing.estimate(shared, 1, SimpleNamespace(credentials=credentials))
        assert unknown.hourly() is None and "shared-core" in unknown.describe()
    finally:
        gce.stop()


# -- DigitalOcean: the whole cluster --------------------------------------------------------


@pytest.fixture
def do(tmp_path, monkeypatch):
    stand_in, options = start_digitalocean(tmp_path, monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield stand_in, options
    stand_in.stop()


def test_droplet_preview_prices_the_cluster_from_the_sizes_api(do):
    stand_in, options = do
    shown = preview(DropletCluster, n_workers=4, **options)
    assert stand_in.calls.count("sizes.list") == 0  # a preview asks only when asked
    cost = shown.cost()
    expected = SIZE_PRICES["s-1vcpu-1gb"] + 4 * SIZE_PRICES["s-2vcpu-4gb"]
    assert cost.hourly() == pytest.approx(expected)
    assert cost.short() == f"${expected:.4f}/h"


def test_a_start_above_the_cap_is_refused_before_anything_exists(do, audit_log):
    stand_in, options = do
    cap = 0.05
    expected = SIZE_PRICES["s-1vcpu-1gb"] + 3 * SIZE_PRICES["s-2vcpu-4gb"]
    with pytest.raises(ClusterStartError) as refused:
        DropletCluster(n_workers=3, max_hourly_cost=cap, **options)
    # A start error, as every refused start is, caused by the cap's refusal.
    assert isinstance(refused.value.__cause__, pricing.CostLimitError)
    message = str(refused.value.__cause__)
    assert f"${expected:.4f}/h" in message and "max_hourly_cost=$0.0500/h" in message
    assert "at most 1 worker fit" in message
    assert not stand_in.droplets and not stand_in.vpcs and not stand_in.firewalls
    (event,) = _events(audit_log, "cost_refused")
    assert event["action"] == "start" and event["max_hourly_cost"] == cap
    assert event["hourly"] == pytest.approx(expected)


def test_an_unknown_price_with_a_cap_refuses_the_start(do):
    stand_in, options = do
    with pytest.raises(ClusterStartError) as refused:
        DropletCluster(n_workers=1, max_hourly_cost=5, **{**options, "worker_size": "s-8vcpu-99gb"})
    assert isinstance(refused.value.__cause__, pricing.CostLimitError)
    assert "a cap that cannot be checked is not a cap" in str(refused.value.__cause__)
    assert "DigitalOcean lists no size 's-8vcpu-99gb'" in str(refused.value.__cause__)
    assert not stand_in.droplets and not stand_in.vpcs


def test_scale_and_adapt_stay_within_the_cap(do, audit_log):
    stand_in, options = do
    scheduler, worker = SIZE_PRICES["s-1vcpu-1gb"], SIZE_PRICES["s-2vcpu-4gb"]
    cap = scheduler + 2 * worker + 0.001  # room for two workers
    with DropletCluster(n_workers=0, max_hourly_cost=cap, **options) as cluster:
        assert f"cost=${scheduler:.4f}/h" in repr(cluster)
        assert "DigitalOcean /v2/sizes" in cluster._repr_html_()
        assert any("hourly cost $" in line for _, line in cluster._cluster_manager_logs)
        made = len(stand_in.droplets)
        with pytest.raises(pricing.CostLimitError, match=r"scale\(3\)") as refused:
            cluster.scale(3)
        assert f"${scheduler + 3 * worker:.4f}/h" in str(refused.value)
        assert f"max_hourly_cost=${cap:.4f}/h" in str(refused.value)
        assert len(stand_in.droplets) == made and len(cluster.worker_spec) == 0
        with pytest.raises(pricing.CostLimitError, match="adapt"):
            cluster.adapt(minimum=0, maximum=5)
        refused_events = _events(audit_log, "cost_refused")
        assert [e["action"] for e in refused_events] == ["scale(3)", "adapt(maximum=5)"]
        assert all(e["max_hourly_cost"] == pytest.approx(cap) for e in refused_events)
        # With no maximum the cap sets it: work for many workers gets two.
        adaptive = cluster.adapt(minimum=0, interval="200ms", wait_count=1)
        assert adaptive.maximum == 2
        seen = 0
        with Client(cluster) as client:
            futures = client.map(time.sleep, [0.5] * 40, pure=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(f.done() for f in futures):
                seen = max(seen, len(cluster.worker_spec), len(stand_in.droplets) - 1)
                time.sleep(0.1)
            client.gather(futures)
        adaptive.stop()
        assert seen == 2  # it scaled up, and no further than the cap


def test_list_shows_what_a_running_cluster_costs_per_hour(do):
    _, options = do
    expected = SIZE_PRICES["s-1vcpu-1gb"] + SIZE_PRICES["s-2vcpu-4gb"]
    with DropletCluster(n_workers=1, **options) as cluster:
        listed = CliRunner().invoke(
            cli.main,
            [
                "list",
                "--provider",
                "digitalocean",
                "-o",
                f"api_url={options['api_url']}",
                "-o",
                f"ca_bundle={options['ca_bundle']}",
            ],
        )
        assert listed.exit_code == 0, listed.output
        lines = listed.output.splitlines()
        header = re.split(r"\s{2,}", lines[0].strip())
        row = next(line for line in lines if cluster.cluster_id in line)
        cells = dict(zip(header, re.split(r"\s{2,}", row.strip()), strict=True))
        assert cells["COST/H"] == f"${expected:.4f}/h"


# -- LocalVMCluster -------------------------------------------------------------------------


def test_a_local_cluster_costs_nothing_and_says_so(vm_dir, audit_log):
    cost = preview(LocalVMCluster, n_workers=3).cost()
    assert cost.hourly() == 0 and "no cloud bill" in cost.describe()
    assert pricing.refusal(cost, 0.01, 1000, "start") is None
    with LocalVMCluster(n_workers=0, directory=vm_dir, max_hourly_cost=0.01) as cluster:
        assert "cost=$0.0000/h" in repr(cluster)
        assert "no cloud bill" in cluster._repr_html_()
    (event,) = _events(audit_log, "cost_estimate")
    assert event["hourly"] == 0 and event["cluster_id"] == cluster.cluster_id


def test_the_cap_option_is_checked_and_false_lifts_it():
    with dask.config.set({"secure-cloud.max-hourly-cost": 3}):
        assert resolve(DropletOptions, {}).max_hourly_cost == 3
        assert resolve(DropletOptions, {"max_hourly_cost": False}).max_hourly_cost is None
    assert resolve(LocalOptions, {}).max_hourly_cost is None
    assert math.isclose(resolve(LocalOptions, {"max_hourly_cost": 1}).max_hourly_cost, 1.0)
