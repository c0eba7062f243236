"""AzureVMCluster end to end: async management SDKs -> ARM stand-in (HTTPS) -> VMs booted here."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import time

import pytest
from azure.core.exceptions import HttpResponseError
from azure.identity.aio import ClientSecretCredential
from azure.mgmt.compute.models import VirtualMachine
from azure.mgmt.network import models as nm
from azure.mgmt.network.aio import NetworkManagementClient
from azure.mgmt.network.models import NatGateway
from distributed import Client
from helpers import decoded_files, vm_processes

from dask_secure_cloud import AzureVMCluster, audit
from dask_secure_cloud.cloudinit import secrets_in
from dask_secure_cloud.cluster import ClusterStartError
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.driver import VMRequest
from dask_secure_cloud.errors import QuotaError
from dask_secure_cloud.network import NetworkPolicyError
from dask_secure_cloud.providers.azure.network import _may_admit

from clouds.arm import ARMError, AzureStandIn, ScheduledEvents, check_model, inbound_allowed
from clouds.naming import check_named_clusters, check_polls
from clouds.reach import CLIENT_ADDRESS
from standins import CLIENT_ID, SECRET, SUBSCRIPTION, TENANT, add_team_vnet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def nothing_left(stand_in: AzureStandIn, cluster_id: str) -> bool:
    """No resource tagged with the cluster, no VM process, and no role assignment on
    any of the cluster's resources (an assignment carries no tag: its scope names it)."""
    return (
        not stand_in.tagged(cluster_id)
        and not vm_processes(cluster_id)
        and not assignments_of(stand_in, cluster_id)
    )


def assignments_of(stand_in: AzureStandIn, cluster_id: str) -> list[dict]:
    """Role assignments scoped to one of the cluster's VMs, NICs, disks or addresses."""
    own = re.compile(rf"{re.escape(cluster_id)}-(scheduler|worker-\d+)(-nic|-osdisk|-ip)?")
    return [
        a
        for a in stand_in.assignments.values()
        if own.fullmatch(a["properties"]["scope"].rsplit("/", 1)[-1])
    ]


def nsg_of(stand_in: AzureStandIn, role: str) -> dict:
    """The cluster's NSG for ``role`` ("scheduler" or "worker")."""
    (nsg,) = [
        r for r in stand_in.of_kind("networksecuritygroups") if r["name"].endswith(f"-{role}-nsg")
    ]
    return nsg


def admits_from_outside(nsg: dict, inside: list[str]) -> list[str]:
    """The inbound rules of ``nsg`` that let in an address outside ``inside``, in the
    order Azure applies them, up to a deny-all; without one, Azure's own defaults
    (AllowVnetInBound, AllowAzureLoadBalancerInBound) would let more in."""
    networks = [ipaddress.ip_network(p) for p in inside]

    def outside(source: str) -> bool:
        try:
            return not any(ipaddress.ip_network(source).subnet_of(n) for n in networks)
        except ValueError:  # "*", or a service tag such as Internet or VirtualNetwork
            return True

    rules = sorted(
        (
            r
            for r in nsg["properties"]["securityRules"]
            if r["properties"]["direction"] == "Inbound"
        ),
        key=lambda r: r["properties"]["priority"],
    )
    found = []
    for rule in rules:
        p = rule["properties"]
        sources = p.get("sourceAddressPrefixes") or [p.get("sourceAddressPrefix")]
        if p["access"] == "Deny" and sources == ["*"] and p.get("destinationPortRange") == "*":
            return found
        if p["access"] == "Allow" and any(outside(s) for s in sources):
            found.append(rule["name"])
    return [*found, "(no deny-all: Azure's default rules apply)"]


async def test_defaults_from_outside_azure_compute_with_only_the_scheduler_public(
    azure, audit_log, outside_the_cloud
):
    """No network option, started from outside Azure (the test process reaches only
    public addresses, through their network security groups): the scheduler gets a
    Standard public address open to the creator's address on its port alone; the workers
    stay private, out through the made vnet's default outbound access."""
    stand_in, options = azure
    async with AzureVMCluster(
        n_workers=2, tags={"team": "ml"}, asynchronous=True, **options
    ) as cluster:
        (address,) = stand_in.of_kind("publicipaddresses")
        public = address["properties"]["ipAddress"]
        assert cluster.scheduler_address == f"tls://{public}:8786"
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=60)
            assert await client.submit(sum, range(10)) == 45
        cluster_id = cluster.cluster_id
        kinds = {r["_kind"] for r in stand_in.resources.values()}
        assert {"virtualmachines", "networkinterfaces", "disks", "networksecuritygroups"} <= kinds
        # The vnet made for the cluster keeps default outbound access, explicitly: the
        # workers go out through it, with no public address at all.
        (vnet,) = stand_in.of_kind("virtualnetworks")
        assert vnet["properties"]["subnets"][0]["properties"]["defaultOutboundAccess"] is True
        assert public_nics(stand_in, cluster_id) == {
            "scheduler": True,
            "worker-0": False,
            "worker-1": False,
        }
        assert address["sku"] == {"name": "Standard"}
        assert stand_in.booter.egress == dict.fromkeys(["scheduler", "worker-0", "worker-1"], True)
        # Only the creator's address, only the scheduler's port; nothing else from outside.
        rules = {
            r["name"]: r["properties"]
            for r in nsg_of(stand_in, "scheduler")["properties"]["securityRules"]
        }
        assert rules["dask-scheduler-from-client"]["sourceAddressPrefixes"] == [
            f"{CLIENT_ADDRESS}/32"
        ]
        assert rules["dask-scheduler-from-client"]["destinationPortRanges"] == ["8786"]
        scheduler_nsg = nsg_of(stand_in, "scheduler")
        assert inbound_allowed(scheduler_nsg, CLIENT_ADDRESS, 8786)
        assert not inbound_allowed(scheduler_nsg, "203.0.113.99", 8786)
        assert not inbound_allowed(scheduler_nsg, CLIENT_ADDRESS, 22)
        assert admits_from_outside(nsg_of(stand_in, "worker"), [options["address_prefix"]]) == []
        # From outside, the workers' private addresses cannot be reached at all.
        worker = next(
            nic["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"]
            for nic in stand_in.of_kind("networkinterfaces")
            if nic["name"].endswith("worker-0-nic")
        )
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(worker, 8786)
        # Nor any port of the scheduler's public address but the scheduler's own.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(public, 8787)
    assert nothing_left(stand_in, cluster_id)
    assert stand_in.resources == {}
    # The audit log holds the cluster's whole life, and no key, token or secret.
    text = audit_log.read_text()
    events = [e for e in audit.read(audit_log) if e["cluster_id"] == cluster_id]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "created" and kinds[-1] == "closed" and kinds.count("vm_launched") == 3
    created = events[0]
    assert created["provider"] == "azure" and created["tls"] is True
    assert created["ca_fingerprint"] == cluster.ca_fingerprint
    # Each VM enrolled a key of its own: one certificate per VM, each recorded.
    enrolled = {
        e["name"]: e["certificate_fingerprint"] for e in events if e["event"] == "vm_enrolled"
    }
    assert sorted(enrolled) == ["scheduler", "worker-0", "worker-1"]
    assert len(set(enrolled.values())) == 3 and None not in enrolled.values()
    deleted = [e["name"] for e in events if e["event"] == "vm_deleted"] + events[-1]["swept"]
    assert sorted(deleted) == ["scheduler", "worker-0", "worker-1"]
    assert events[-1]["confirmed_none_left"] is True
    for secret in ("PRIVATE KEY", SECRET, stand_in.token, "BEGIN CERTIFICATE"):
        assert secret not in text


async def test_requests_are_hardened_and_carry_no_secret(azure):
    stand_in, options = azure
    async with AzureVMCluster(n_workers=1, asynchronous=True, **options) as cluster:
        cluster_id = cluster.cluster_id
        vms = [b for kind, b in stand_in.bodies if kind == "virtualmachines"]
        assert len(vms) == 2
        for body in vms:
            props = body["properties"]
            assert body["tags"]["dask-secure-cloud-cluster"] == cluster_id
            assert props["storageProfile"]["osDisk"]["deleteOption"] == "Delete"
            assert props["networkProfile"]["networkInterfaces"][0]["properties"] == {
                "primary": True,
                "deleteOption": "Delete",
            }
            assert props["diagnosticsProfile"]["bootDiagnostics"]["enabled"] is True
            os_profile = props["osProfile"]
            assert "adminPassword" not in os_profile
            assert os_profile["linuxConfiguration"]["disablePasswordAuthentication"] is True
            user_data = base64.b64decode(os_profile["customData"])
            assert SECRET.encode() not in user_data and stand_in.token.encode() not in user_data
            files = decoded_files(user_data)
            assert "/opt/dask-secure-cloud/tls/ca.pem" in files
            assert secrets_in(user_data) == []  # the VM makes its own key
        # Every NIC of the cluster carries its role's own NSG; only the scheduler's has a
        # public address (the client is outside Azure by default).
        subnet = options["address_prefix"]
        for nic in stand_in.of_kind("networkinterfaces"):
            config = nic["properties"]["ipConfigurations"][0]["properties"]
            role = "scheduler" if "scheduler" in nic["name"] else "worker"
            assert ("publicIPAddress" in config) is (role == "scheduler")
            assert nic["properties"]["networkSecurityGroup"]["id"] == nsg_of(stand_in, role)["id"]
        assert admits_from_outside(nsg_of(stand_in, "worker"), [subnet]) == []
        scheduler_rules = nsg_of(stand_in, "scheduler")["properties"]["securityRules"]
        rules = {r["name"]: r["properties"] for r in scheduler_rules}
        # The scheduler port is open to the creator's address only.
        assert admits_from_outside(nsg_of(stand_in, "scheduler"), [subnet]) == [
            "dask-scheduler-from-client"
        ]
        assert rules["dask-scheduler-from-client"]["sourceAddressPrefixes"] == [
            f"{CLIENT_ADDRESS}/32"
        ]
        assert rules["dask-scheduler-from-client"]["destinationPortRanges"] == ["8786"]
        assert rules["deny-everything-else"]["access"] == "Deny"
        # The OS disks are tagged, so a sweep finds them.
        assert all(
            d["tags"].get("dask-secure-cloud-cluster") == cluster_id
            for d in stand_in.of_kind("disks")
        )
    assert nothing_left(stand_in, cluster_id)


async def test_public_scheduler_only_when_asked_and_only_for_the_given_cidrs(azure, monkeypatch):
    stand_in, options = azure
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION)
    cluster = AzureVMCluster(
        use_private_ip=False, allowed_cidrs=["198.51.100.7/32"], asynchronous=True, **options
    )
    driver = cluster.driver
    try:
        await driver.prepare("dsc-public")
        scheduler = await driver.create(
            VMRequest("dsc-public", "scheduler", Role.SCHEDULER, b"#cloud-config\n{}\n")
        )
        worker = await driver.create(
            VMRequest("dsc-public", "worker-0", Role.WORKER, b"#cloud-config\n{}\n")
        )
        assert scheduler.public_ip and not worker.public_ip
        (address,) = stand_in.of_kind("publicipaddresses")
        assert address["sku"] == {"name": "Standard"}
        assert address["properties"]["deleteOption"] == "Delete"
        rule = nsg_of(stand_in, "scheduler")["properties"]["securityRules"][0]["properties"]
        assert rule["sourceAddressPrefixes"] == ["198.51.100.7/32"]
        # Only the scheduler admits the creator; the workers admit nothing from outside.
        assert admits_from_outside(nsg_of(stand_in, "worker"), [options["address_prefix"]]) == []
        assert "GET subscriptions" not in stand_in.calls  # AZURE_SUBSCRIPTION_ID was used
        for vm in (scheduler, worker):
            await driver.destroy(vm)
        await driver.release("dsc-public")
    finally:
        await driver.close()
        await cluster._close() if cluster.status.name != "closed" else None
    assert stand_in.resources == {}


async def test_given_vnet_and_nsg_are_used_and_kept(azure):
    stand_in, options = azure
    add_team_vnet(stand_in, options["address_prefix"])
    nsg_id = (
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/dask-rg/providers/"
        "Microsoft.Network/networkSecurityGroups/team-nsg"
    )
    stand_in.resources[nsg_id.lower()] = {
        "id": nsg_id,
        "name": "team-nsg",
        "type": "Microsoft.Network/networkSecurityGroups",
        "location": "westeurope",
        "tags": {},
        "_kind": "networksecuritygroups",
        "properties": {"securityRules": []},
    }
    before = {k: json.dumps(v, sort_keys=True) for k, v in stand_in.resources.items()}
    # From outside, team-nsg (no rules) would shut the client out: refused, nothing made.
    calls = len(stand_in.calls)
    with pytest.raises(ClusterStartError) as info:
        await AzureVMCluster(
            vnet="team-vnet", network_security_group=nsg_id, asynchronous=True, **options
        )
    message = str(info.value)
    assert f"has no inbound rule allowing TCP port 8786 from {CLIENT_ADDRESS}/32" in message
    assert "network_security_group=None" in message and "use_private_ip=True" in message
    assert mutations(stand_in.calls[calls:]) == []
    async with AzureVMCluster(
        n_workers=1,
        vnet="team-vnet",
        subnet="compute",
        network_security_group=nsg_id,
        use_private_ip=True,  # the client is inside team-vnet; team-nsg admits nobody else
        asynchronous=True,
        **options,
    ) as cluster:
        cluster_id = cluster.cluster_id
        assert not any(k == "PUT virtualNetworks" for k in stand_in.calls)
        assert not any(k == "PUT networkSecurityGroups" for k in stand_in.calls)
    assert nothing_left(stand_in, cluster_id)
    assert {k: json.dumps(v, sort_keys=True) for k, v in stand_in.resources.items()} == before


@pytest.mark.parametrize(
    "rule,admits",
    [
        ({"source_address_prefix": "Internet", "destination_port_range": "8786"}, True),
        ({"source_address_prefixes": ["198.51.100.0/24"], "destination_port_range": "*"}, True),
        ({"source_address_prefix": "*", "destination_port_ranges": ["8000-9000"]}, True),
        ({"source_address_prefix": "VirtualNetwork", "destination_port_range": "8786"}, False),
        ({"source_address_prefix": "10.0.0.0/8", "destination_port_range": "8786"}, False),
        ({"source_address_prefix": "*", "destination_port_range": "22"}, False),
        ({"source_address_prefix": "*", "destination_port_range": "*", "access": "Deny"}, False),
        ({"source_address_prefix": "*", "destination_port_range": "*", "protocol": "Udp"}, False),
    ],
)
def test_a_given_nsg_that_certainly_shuts_the_client_out_is_found(rule, admits):
    nsg = nm.NetworkSecurityGroup(
        security_rules=[
            nm.SecurityRule(
                **{"priority": 100, "direction": "Inbound", "access": "Allow", "protocol": "Tcp"}
                | rule
            )
        ]
    )
    assert _may_admit(nsg, "198.51.100.7/32", 8786) is admits


async def test_throttling_is_waited_out(azure):
    stand_in, options = azure
    stand_in.throttle("PUT virtualMachines")
    stand_in.throttle("GET resourceGroups")
    async with AzureVMCluster(n_workers=1, asynchronous=True, **options) as cluster:
        cluster_id = cluster.cluster_id
        assert len(stand_in.of_kind("virtualmachines")) == 2
    assert stand_in.calls.count("PUT virtualMachines") == 3
    assert stand_in.calls.count("GET resourceGroups") == 2
    assert nothing_left(stand_in, cluster_id)


START_CALLS = [
    ("GET subscriptions", False),
    ("GET resourceGroups", False),
    ("GET skus", False),
    ("PUT virtualNetworks", False),
    ("PUT virtualNetworks", True),
    ("PUT networkSecurityGroups", False),
    ("PUT networkInterfaces", False),
    ("PUT virtualMachines", False),
    ("PUT virtualMachines", True),
    ("PATCH disks", False),
    ("GET permissions", False),
    ("PUT userAssignedIdentities", False),
    ("PUT roleAssignments", False),
]


@pytest.mark.parametrize("call,in_operation", START_CALLS)
async def test_failure_at_each_start_call_leaves_nothing(azure, call, in_operation):
    stand_in, options = azure
    stand_in.fail(call, 400, "InjectedFailure", in_operation=in_operation)
    with pytest.raises(ClusterStartError, match="InjectedFailure"):
        await AzureVMCluster(n_workers=1, asynchronous=True, **options)
    assert call in stand_in.calls
    assert stand_in.resources == {} and stand_in.booter.vms == {}
    # No role assignment is left either, on whatever scope (the caller's own is on the
    # subscription).
    assert [a for a in stand_in.assignments.values() if "/resourceGroups/" in a["id"]] == []


async def test_failure_of_scale_up_keeps_the_cluster_and_cleans_up(azure):
    stand_in, options = azure
    # zone_failover=False: the allocation refused is not tried in a zone (test_capacity).
    async with AzureVMCluster(
        n_workers=1, asynchronous=True, zone_failover=False, **options
    ) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=60)
            stand_in.fail("PUT virtualMachines", 409, "AllocationFailed", in_operation=True)
            cluster.scale(2)
            with pytest.raises(Exception, match="AllocationFailed"):
                await cluster._correct_state()
            assert await client.submit(lambda: 7) == 7
        cluster_id = cluster.cluster_id
    assert nothing_left(stand_in, cluster_id)
    assert stand_in.resources == {}


@pytest.mark.parametrize(
    "call,in_operation",
    [
        ("DELETE virtualMachines", False),
        ("DELETE virtualMachines", True),
        ("GET virtualMachines", False),
        ("GET networkInterfaces", False),
        ("GET disks", False),
        ("DELETE networkSecurityGroups", False),
        ("DELETE virtualNetworks", False),
        ("DELETE roleAssignments", False),
        ("GET roleAssignments", False),
        ("DELETE userAssignedIdentities", False),
    ],
)
async def test_failure_at_each_close_call_still_leaves_nothing(azure, call, in_operation):
    stand_in, options = azure
    cluster = await AzureVMCluster(n_workers=1, asynchronous=True, **options)
    stand_in.fail(call, 400, "InjectedFailure", in_operation=in_operation)
    await cluster.close()
    assert call in stand_in.calls
    assert nothing_left(stand_in, cluster.cluster_id)
    assert stand_in.of_kind("userassignedidentities") == []
    assert stand_in.resources == {}


async def test_missing_resource_group_is_named_before_any_resource(azure):
    stand_in, options = azure
    with pytest.raises(ClusterStartError, match="resource group 'nope' does not exist"):
        await AzureVMCluster(asynchronous=True, **{**options, "resource_group": "nope"})
    assert not [c for c in stand_in.calls if c.startswith(("PUT", "PATCH"))]


async def test_unknown_vm_size_is_named_before_any_resource(azure):
    stand_in, options = azure
    with pytest.raises(
        ClusterStartError,
        match=r"worker_vm_size 'Standard_D4s_v4' is not offered in westeurope\. "
        r"Did you mean 'Standard_D4s_v5'",
    ):
        await AzureVMCluster(asynchronous=True, **{**options, "worker_vm_size": "Standard_D4s_v4"})
    assert not [c for c in stand_in.calls if c.startswith(("PUT", "PATCH"))]


@pytest.mark.parametrize(
    "quota,limit,changes,match",
    [
        # The scheduler (2 vCPUs) and two D4s_v5 workers (4 each) need 10.
        (
            "cores",
            8,
            {},
            r"needs 10 vCPUs of the 'Total Regional vCPUs' quota and 8 are free \(0 in use\) "
            r"\[quota Total Regional vCPUs, region westeurope, current limit 8\]",
        ),
        ("standardDSv5Family", 9, {}, r"needs 10 vCPUs of the 'Standard DSv5 Family vCPUs'"),
        # Spot workers count against the Spot quota alone.
        (
            "lowPriorityCores",
            7,
            {"worker_spot": True},
            r"needs 8 vCPUs of the 'Total Regional "
            r"Spot vCPUs' quota",
        ),
    ],
)
async def test_start_beyond_a_vcpu_quota_is_refused_before_any_resource(
    azure, quota, limit, changes, match
):
    stand_in, options = azure
    stand_in.quotas["westeurope"][quota] = limit
    with pytest.raises(ClusterStartError, match=match + r".*quota increase.*n_workers") as info:
        await AzureVMCluster(n_workers=2, asynchronous=True, **options, **changes)
    refusal = info.value.__cause__
    assert isinstance(refusal, QuotaError)
    assert (refusal.region, refusal.limit) == ("westeurope", limit)
    assert "GET usages" in stand_in.calls
    assert not [c for c in stand_in.calls if c.startswith(("PUT", "PATCH"))]


async def test_quota_check_fits_what_is_already_running(azure):
    stand_in, options = azure
    stand_in.quotas["westeurope"]["cores"] = 15
    async with AzureVMCluster(n_workers=1, asynchronous=True, **options):  # 6 vCPUs in use
        with pytest.raises(
            ClusterStartError, match=r"needs 10 vCPUs.*9 are free \(6 in use\).*current limit 15\]"
        ):
            await AzureVMCluster(n_workers=2, asynchronous=True, **options)
    assert stand_in.resources == {} and stand_in.booter.vms == {}


async def test_exhausted_quota_without_usage_permission_is_a_clear_error_and_leaves_nothing(
    azure,
):
    stand_in, options = azure
    # A role without locations/usages/read: no pre-check, Azure refuses the second worker.
    stand_in.fail("GET usages", 403, "AuthorizationFailed")
    stand_in.quotas["westeurope"]["cores"] = 8
    quota = r"OperationNotAllowed: .*Total Regional Cores quota.*quota increase"
    with pytest.raises(ClusterStartError, match=quota):
        await AzureVMCluster(n_workers=2, asynchronous=True, **options)
    assert "PUT virtualMachines" in stand_in.calls
    assert stand_in.resources == {} and stand_in.booter.vms == {}


async def test_spot_gpu_workers_retire_on_eviction_notice(azure):
    stand_in, options = azure
    events = ScheduledEvents()
    try:
        async with AzureVMCluster(
            n_workers=1,
            worker_spot=True,
            worker_vm_size="Standard_NC4as_T4_v3",
            runtime="native",
            metadata_endpoint=events.url,
            asynchronous=True,
            **{k: v for k, v in options.items() if k != "worker_vm_size"},
        ) as cluster:
            worker = [b for kind, b in stand_in.bodies if kind == "virtualmachines"][-1]
            props = worker["properties"]
            assert props["priority"] == "Spot" and props["evictionPolicy"] == "Delete"
            assert props["billingProfile"] == {"maxPrice": -1.0}
            assert cluster.driver.gpus(Role.WORKER) and not cluster.driver.gpus(Role.SCHEDULER)
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(1, timeout=60)
                events.evict()
                deadline = time.monotonic() + 30
                while cluster.scheduler_info["workers"]:
                    assert time.monotonic() < deadline, "the worker did not retire"
                    await asyncio.sleep(0.5)
            cluster_id = cluster.cluster_id
    finally:
        events.stop()
    assert nothing_left(stand_in, cluster_id)


async def test_boot_failure_is_reported_with_the_serial_console(azure):
    stand_in, options = azure
    with pytest.raises(ClusterStartError, match="azure-boot-marker") as info:
        await AzureVMCluster(
            asynchronous=True,
            **{**options, "boot_timeout": "6s"},
            extra_bootstrap=["echo azure-boot-marker", "exit 3"],
        )
    # The VM stopped when its boot failed: reported then, not at the boot timeout.
    assert "scheduler VM scheduler stopped" in str(info.value)
    assert "boot FAILED at step extra-bootstrap" in str(info.value)
    assert "POST virtualMachines/retrieveBootDiagnosticsData" in stand_in.calls
    assert stand_in.resources == {}


async def test_missing_credentials_are_a_clear_error(azure, monkeypatch, tmp_path):
    stand_in, options = azure
    for name in ("AZURE_CLIENT_SECRET", "AZURE_CLIENT_ID", "AZURE_TENANT_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no sign-in caches of this machine
    with pytest.raises(ClusterStartError, match="credential=") as info:
        await AzureVMCluster(asynchronous=True, **options)
    assert "Azure sign-in failed" in str(info.value)
    assert stand_in.tokens_issued == 0 and stand_in.resources == {}


OVERSIZED = [f"echo {os.urandom(60).hex()}" for _ in range(900)]


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"resource_group": None}, ValueError, "resource_group is required"),
        ({"image": "ubuntu"}, ValueError, "publisher:offer:sku:version"),
        ({"cloud": "usgovernement"}, ValueError, "Did you mean 'usgovernment'"),
        ({"tags": {"a/b": "c"}}, ValueError, "not an Azure tag"),
        ({"worker_vm_size": "D4s_v5"}, ValueError, "Standard_D4s_v5"),
        ({"address_prefix": "10.0.0.0/33"}, ValueError, "address_prefix"),
        ({"disk_size": 10}, ValueError, "disk_size"),
        ({"security": False}, NetworkPolicyError, "allow_insecure_public"),
        # Nothing can be inside a vnet the cluster makes: its scheduler must be public.
        ({"use_private_ip": True}, ValueError, r"use_private_ip=True with vnet=None cannot work"),
        ({"extra_bootstrap": OVERSIZED}, ValueError, "Azure customData allows 65,535"),
    ],
)
def test_bad_input_is_refused_before_any_call(azure, change, error, match):
    stand_in, options = azure
    with pytest.raises(error, match=match):
        AzureVMCluster(**{**options, **change})
    assert stand_in.calls == []


def test_stand_in_refuses_what_arm_refuses():
    body = {
        "location": "westeurope",
        "properties": {"hardwareProfile": {"vmSize": "Standard_D2s_v5"}},
    }
    check_model(VirtualMachine, body, "parameters")
    for change, message in (
        ({"prority": "Spot"}, "Could not find member 'prority'"),
        ({"priority": "Spott"}, "is not one of"),
        ({"provisioningState": "Succeeded"}, "read-only"),
        ({"hardwareProfile": {"vmSize": 4}}, "Error converting value"),
    ):
        bad = {**body, "properties": {**body["properties"], **change}}
        with pytest.raises(ARMError, match=message):
            check_model(VirtualMachine, bad, "parameters")


async def test_list_finds_clusters_and_what_a_killed_start_left(azure):
    from listing import check_listing

    stand_in, options = azure
    await check_listing(AzureVMCluster, options)
    assert stand_in.resources == {}


# -- ways out: the network decides whether a VM gets a public address ---------------------

GROUP_ID = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/dask-rg/providers/Microsoft.Network"


def mutations(calls: list[str]) -> list[str]:
    """The stand-in calls that would make, change or delete something."""
    return [c for c in calls if c.split()[0] in ("PUT", "PATCH", "DELETE", "POST")]


@contextlib.asynccontextmanager
async def network_client(stand_in: AzureStandIn, options: dict):
    """The real async network SDK, signed in at the stand-in, to make a user's network."""
    bundle = options["ca_bundle"]
    credential = ClientSecretCredential(
        TENANT, CLIENT_ID, SECRET, authority=stand_in.url, connection_verify=bundle
    )
    client = NetworkManagementClient(
        credential,
        SUBSCRIPTION,
        base_url=stand_in.url,
        credential_scopes=[f"{stand_in.url}/.default"],
        connection_verify=bundle,
        polling_interval=0.1,
    )
    async with credential, client:
        yield client


async def make_network(
    net: NetworkManagementClient,
    prefix: str,
    *,
    default_outbound_access: bool | None = None,
    nat: bool = False,
    nat_address: bool = True,
    default_route: tuple[str, str | None] | None = None,
) -> None:
    """vnet ``team-vnet`` with subnet ``compute``, as a user makes it with the SDK: with a
    NAT gateway ``team-nat`` (with a Standard public address unless ``nat_address`` is
    False), a route table ``team-rt`` whose 0.0.0.0/0 route goes to ``default_route``
    (next hop type, next hop address), and ``defaultOutboundAccess`` as given (left out:
    this API version makes the subnet private)."""
    subnet = nm.Subnet(name="compute", address_prefix=prefix)
    if default_outbound_access is not None:
        subnet.default_outbound_access = default_outbound_access
    if nat:
        addresses = []
        if nat_address:
            await (
                await net.public_ip_addresses.begin_create_or_update(
                    "dask-rg",
                    "team-nat-ip",
                    nm.PublicIPAddress(
                        location="westeurope",
                        sku=nm.PublicIPAddressSku(name="Standard"),
                        public_ip_allocation_method="Static",
                    ),
                )
            ).result()
            addresses = [nm.SubResource(id=f"{GROUP_ID}/publicIPAddresses/team-nat-ip")]
        gateway = await (
            await net.nat_gateways.begin_create_or_update(
                "dask-rg",
                "team-nat",
                nm.NatGateway(
                    location="westeurope",
                    sku=nm.NatGatewaySku(name="Standard"),
                    public_ip_addresses=addresses,
                ),
            )
        ).result()
        subnet.nat_gateway = nm.SubResource(id=gateway.id)
    if default_route is not None:
        hop, address = default_route
        table = await (
            await net.route_tables.begin_create_or_update(
                "dask-rg",
                "team-rt",
                nm.RouteTable(
                    location="westeurope",
                    routes=[
                        nm.Route(
                            name="default",
                            address_prefix="0.0.0.0/0",
                            next_hop_type=hop,
                            next_hop_ip_address=address,
                        )
                    ],
                ),
            )
        ).result()
        subnet.route_table = nm.RouteTable(id=table.id)
    await (
        await net.virtual_networks.begin_create_or_update(
            "dask-rg",
            "team-vnet",
            nm.VirtualNetwork(
                location="westeurope",
                address_space=nm.AddressSpace(address_prefixes=[prefix]),
                subnets=[subnet],
            ),
        )
    ).result()


def public_nics(stand_in: AzureStandIn, cluster_id: str) -> dict[str, bool]:
    """NIC name (without the cluster id) -> whether it carries a public address."""
    return {
        nic["name"].removeprefix(f"{cluster_id}-").removesuffix("-nic"): bool(
            nic["properties"]["ipConfigurations"][0]["properties"].get("publicIPAddress")
        )
        for nic in stand_in.of_kind("networkinterfaces")
        if nic["tags"].get("dask-secure-cloud-cluster") == cluster_id
    }


async def test_defaults_on_a_private_subnet_give_vms_public_addresses_closed_to_outside(
    azure, caplog, outside_the_cloud
):
    stand_in, options = azure
    prefix = options["address_prefix"]
    async with network_client(stand_in, options) as net:
        await make_network(net, prefix)  # a new subnet: private, no NAT gateway
    (vnet,) = stand_in.of_kind("virtualnetworks")
    assert vnet["properties"]["subnets"][0]["properties"]["defaultOutboundAccess"] is False
    caplog.set_level(logging.INFO, logger="dask_secure_cloud.providers.azure")
    async with AzureVMCluster(
        n_workers=2, vnet="team-vnet", subnet="compute", asynchronous=True, **options
    ) as cluster:
        cluster_id = cluster.cluster_id
        # The client is outside Azure: it reaches the scheduler at its public address.
        scheduler_ip = stand_in.resources[
            next(
                nic["properties"]["ipConfigurations"][0]["properties"]["publicIPAddress"]["id"]
                for nic in stand_in.of_kind("networkinterfaces")
                if nic["name"].endswith("-scheduler-nic")
            ).lower()
        ]["properties"]["ipAddress"]
        assert cluster.scheduler_address == f"tls://{scheduler_ip}:8786"
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=60)
            assert await client.submit(sum, range(10)) == 45
        assert public_nics(stand_in, cluster_id) == dict.fromkeys(
            ["scheduler", "worker-0", "worker-1"], True
        )
        for address in stand_in.of_kind("publicipaddresses"):
            assert address["sku"] == {"name": "Standard"}
        assert stand_in.booter.egress == dict.fromkeys(["scheduler", "worker-0", "worker-1"], True)
        # Nothing from outside the cluster's subnet reaches a worker; the scheduler
        # admits the creator's address alone, on its port.
        assert admits_from_outside(nsg_of(stand_in, "worker"), [prefix]) == []
        assert admits_from_outside(nsg_of(stand_in, "scheduler"), [prefix]) == [
            "dask-scheduler-from-client"
        ]
        assert not inbound_allowed(nsg_of(stand_in, "scheduler"), "203.0.113.99", 8786)
        assert "worker VMs: a public address (inbound from outside the cluster closed), " in (
            caplog.text
        )
        assert "out through a Standard public IP, in subnet compute of vnet team-vnet" in (
            caplog.text
        )
    assert nothing_left(stand_in, cluster_id)


async def test_private_workers_on_a_subnet_with_no_way_out_are_refused_before_anything(azure):
    stand_in, options = azure
    async with network_client(stand_in, options) as net:
        await make_network(net, options["address_prefix"], default_outbound_access=False)
    before = len(stand_in.calls)
    with pytest.raises(ClusterStartError) as info:
        await AzureVMCluster(worker_public_ip=False, vnet="team-vnet", asynchronous=True, **options)
    message = str(info.value)
    assert "workers would have no route out" in message
    assert "worker_public_ip=False and subnet compute of vnet team-vnet" in message
    for fix in ("subnet=<a subnet of vnet 'team-vnet' with a NAT gateway", "worker_public_ip=True"):
        assert fix in message
    assert "offline_image=True" in message
    assert "GET virtualNetworks" in stand_in.calls[before:]
    assert mutations(stand_in.calls[before:]) == []
    assert stand_in.booter.vms == {}


async def test_a_subnet_that_drops_internet_traffic_is_refused_unless_the_image_is_offline(
    azure,
):
    stand_in, options = azure
    async with network_client(stand_in, options) as net:
        await make_network(net, options["address_prefix"], default_route=("None", None))
    before = len(stand_in.calls)
    with pytest.raises(ClusterStartError) as info:
        await AzureVMCluster(vnet="team-vnet", asynchronous=True, **options)
    message = str(info.value)
    assert "subnet compute of vnet team-vnet (route table team-rt drops 0.0.0.0/0)" in message
    assert "has no way out" in message and "offline_image=True" in message
    assert "worker_public_ip=True" not in message  # a public address would not help
    assert "GET routeTables" in stand_in.calls[before:]
    assert mutations(stand_in.calls[before:]) == []

    # Even an image that needs nothing: a public scheduler could not answer the client.
    before = len(stand_in.calls)
    with pytest.raises(ClusterStartError) as info:
        await AzureVMCluster(vnet="team-vnet", offline_image=True, asynchronous=True, **options)
    message = str(info.value)
    assert "use_private_ip=False and subnet compute of vnet team-vnet" in message
    assert "use_private_ip=True if this client runs inside the virtual network" in message
    assert mutations(stand_in.calls[before:]) == []

    # The image holds what the boot needs: the VMs may start with no way out.
    async with AzureVMCluster(
        n_workers=1,
        vnet="team-vnet",
        offline_image=True,
        use_private_ip=True,  # a public scheduler could not answer: its replies are dropped
        asynchronous=True,
        **options,
    ) as cluster:
        cluster_id = cluster.cluster_id
        assert public_nics(stand_in, cluster_id) == {"scheduler": False, "worker-0": False}
        assert stand_in.booter.egress == {"scheduler": False, "worker-0": False}
        async with Client(cluster, asynchronous=True) as client:  # process VMs need none
            await client.wait_for_workers(1, timeout=60)
            assert await client.submit(lambda: 7) == 7
    assert nothing_left(stand_in, cluster_id)


async def test_private_workers_behind_a_nat_gateway_compute(azure, caplog):
    stand_in, options = azure
    async with network_client(stand_in, options) as net:
        await make_network(net, options["address_prefix"], nat=True)
    caplog.set_level(logging.INFO, logger="dask_secure_cloud.providers.azure")
    async with AzureVMCluster(
        n_workers=1, vnet="team-vnet", use_private_ip=True, asynchronous=True, **options
    ) as cluster:
        cluster_id = cluster.cluster_id
        assert public_nics(stand_in, cluster_id) == {"scheduler": False, "worker-0": False}
        assert [a["name"] for a in stand_in.of_kind("publicipaddresses")] == ["team-nat-ip"]
        assert stand_in.booter.egress == {"scheduler": True, "worker-0": True}
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=60)
            assert await client.submit(sum, range(4)) == 6
        assert "worker VMs: no public address, out through NAT gateway " in caplog.text
        assert "in subnet compute of vnet team-vnet" in caplog.text
    assert nothing_left(stand_in, cluster_id)


@pytest.mark.parametrize(
    "network,worker_public,way_out",
    [
        ({"default_outbound_access": True}, False, "default outbound access (being retired"),
        (
            {"default_route": ("VirtualAppliance", "10.0.0.4")},
            False,
            "route table team-rt: 0.0.0.0/0 to virtual appliance 10.0.0.4 (assumed to lead out)",
        ),
        # A NAT gateway with no public address translates nothing.
        ({"nat": True, "nat_address": False}, True, "a Standard public IP"),
        # Azure routes 0.0.0.0/0 to the internet anyway: only the subnet's exits count.
        ({"default_route": ("Internet", None)}, True, "a Standard public IP"),
    ],
)
async def test_each_way_out_of_a_users_subnet_is_read_before_anything(
    azure, caplog, network, worker_public, way_out
):
    stand_in, options = azure
    async with network_client(stand_in, options) as net:
        await make_network(net, options["address_prefix"], **network)
    caplog.set_level(logging.INFO, logger="dask_secure_cloud.providers.azure")
    # The client inside team-vnet: the scheduler gets a public address only where the
    # subnet's sole way out needs one, as the workers do.
    cluster = AzureVMCluster(vnet="team-vnet", use_private_ip=True, asynchronous=True, **options)
    driver = cluster.driver
    before = len(stand_in.calls)
    try:
        await driver.prepare("dsc-exits")
        assert driver._public == {Role.WORKER: worker_public, Role.SCHEDULER: worker_public}
        address = "a public address" if worker_public else "no public address"
        assert f"worker VMs: {address}" in caplog.text
        assert f"out through {way_out}" in caplog.text
        assert "in subnet compute of vnet team-vnet" in caplog.text
        # The ways out were read before the first thing was made.
        reads = stand_in.calls[before : stand_in.calls.index("PUT networkSecurityGroups")]
        assert "GET virtualNetworks" in reads and not mutations(reads)
        await driver.release("dsc-exits")
    finally:
        await driver.close()
    assert not stand_in.tagged("dsc-exits")


async def test_an_old_subnet_without_the_property_has_default_outbound_access(azure):
    stand_in, options = azure
    async with network_client(stand_in, options) as net:
        await make_network(net, options["address_prefix"])
    # As a subnet made before API version 2025-07-01 reads: the property unset.
    (vnet,) = stand_in.of_kind("virtualnetworks")
    del vnet["properties"]["subnets"][0]["properties"]["defaultOutboundAccess"]
    async with AzureVMCluster(
        n_workers=1,
        vnet="team-vnet",
        worker_public_ip=False,
        use_private_ip=True,
        asynchronous=True,
        **options,
    ) as cluster:
        assert public_nics(stand_in, cluster.cluster_id) == {
            "scheduler": False,
            "worker-0": False,
        }
        assert stand_in.booter.egress == {"scheduler": True, "worker-0": True}
        cluster_id = cluster.cluster_id
    assert nothing_left(stand_in, cluster_id)


class RecordingBooter:
    """A booter that boots nothing: the stand-in takes any booter with this interface."""

    @dataclasses.dataclass
    class VM:
        vm_id: str
        address: str

        def console_output(self) -> str:
            return ""

        def stop(self) -> None:
            pass

    def __init__(self) -> None:
        self.vms: dict[str, RecordingBooter.VM] = {}
        self.egress: dict[str, bool] = {}

    def boot(self, user_data, *, address, cluster_id, name, role, egress):
        vm = self.VM(f"{cluster_id}/{name}", address)
        self.vms[vm.vm_id] = vm
        self.egress[name] = egress
        return vm

    def stop(self, vm_id: str) -> None:
        self.vms.pop(vm_id, None)

    def stop_all(self) -> None:
        self.vms.clear()


async def test_vms_take_their_addresses_from_the_given_prefix_with_any_booter(azure):
    stand_in, options = azure
    stand_in.booter = booter = RecordingBooter()
    cluster = AzureVMCluster(asynchronous=True, **{**options, "address_prefix": "10.77.0.0/25"})
    driver = cluster.driver
    try:
        await driver.prepare("dsc-guests")
        (vnet,) = stand_in.of_kind("virtualnetworks")
        assert vnet["properties"]["addressSpace"]["addressPrefixes"] == ["10.77.0.0/25"]
        vms = [
            await driver.create(VMRequest("dsc-guests", name, role, b"#cloud-config\n{}\n"))
            for name, role in (
                ("scheduler", Role.SCHEDULER),
                ("worker-0", Role.WORKER),
                ("worker-1", Role.WORKER),
            )
        ]
        assert [vm.private_ip for vm in vms] == ["10.77.0.4", "10.77.0.5", "10.77.0.6"]
        assert [v.address for v in booter.vms.values()] == ["10.77.0.4", "10.77.0.5", "10.77.0.6"]
        assert booter.egress == dict.fromkeys(["scheduler", "worker-0", "worker-1"], True)
        await driver.destroy(vms[1])
        # A freed address is handed out again, the lowest first, as Azure does.
        again = await driver.create(
            VMRequest("dsc-guests", "worker-2", Role.WORKER, b"#cloud-config\n{}\n")
        )
        assert again.private_ip == "10.77.0.5"
        for vm in (vms[0], vms[2], again):
            await driver.destroy(vm)
        await driver.release("dsc-guests")
    finally:
        await driver.close()
    assert stand_in.resources == {} and booter.vms == {}


async def test_stand_in_refuses_what_arm_refuses_on_the_network(azure):
    stand_in, options = azure
    prefix = options["address_prefix"]
    with pytest.raises(ARMError, match="Could not find member 'publicIPAddresses'"):
        check_model(
            NatGateway,
            {"location": "westeurope", "properties": {"publicIPAddresses": []}},
            "parameters",
        )
    async with network_client(stand_in, options) as net:
        missing = nm.Subnet(
            name="compute",
            address_prefix=prefix,
            nat_gateway=nm.SubResource(id=f"{GROUP_ID}/natGateways/nope"),
        )
        with pytest.raises(HttpResponseError) as info:
            await net.virtual_networks.begin_create_or_update(
                "dask-rg",
                "team-vnet",
                nm.VirtualNetwork(
                    location="westeurope",
                    address_space=nm.AddressSpace(address_prefixes=[prefix]),
                    subnets=[missing],
                ),
            )
        assert info.value.error.code == "InvalidResourceReference"
        with pytest.raises(HttpResponseError) as info:
            await net.public_ip_addresses.begin_create_or_update(
                "dask-rg",
                "dynamic",
                nm.PublicIPAddress(
                    location="westeurope",
                    sku=nm.PublicIPAddressSku(name="Standard"),
                    public_ip_allocation_method="Dynamic",
                ),
            )
        assert info.value.error.code == "StandardSkuPublicIPAddressesMustBeStatic"
        with pytest.raises(HttpResponseError) as info:
            await make_network(net, prefix, default_route=("VirtualAppliance", None))
        assert info.value.error.code == "InvalidRequestFormat"

        await make_network(net, prefix, nat=True)
        with pytest.raises(HttpResponseError) as info:
            await net.nat_gateways.begin_delete("dask-rg", "team-nat")
        assert info.value.error.code == "InUseNatGatewayCannotBeDeleted"
        with pytest.raises(HttpResponseError) as info:
            await net.public_ip_addresses.begin_delete("dask-rg", "team-nat-ip")
        assert info.value.error.code == "PublicIPAddressCannotBeDeleted"
        with pytest.raises(HttpResponseError) as info:  # one address, one NAT gateway
            await net.nat_gateways.begin_create_or_update(
                "dask-rg",
                "second-nat",
                nm.NatGateway(
                    location="westeurope",
                    sku=nm.NatGatewaySku(name="Standard"),
                    public_ip_addresses=[
                        nm.SubResource(id=f"{GROUP_ID}/publicIPAddresses/team-nat-ip")
                    ],
                ),
            )
        assert info.value.error.code == "PublicIPAddressInUse"
        # Taken apart in order, everything goes.
        await (await net.virtual_networks.begin_delete("dask-rg", "team-vnet")).result()
        await (await net.nat_gateways.begin_delete("dask-rg", "team-nat")).result()
        await (await net.public_ip_addresses.begin_delete("dask-rg", "team-nat-ip")).result()
    assert stand_in.resources == {}


# -- the driver contract -------------------------------------------------------------------


async def test_user_named_clusters_are_listed_and_cleaned_up_each_alone(azure):
    stand_in, options = azure
    await check_named_clusters(AzureVMCluster, options, lambda c: nothing_left(stand_in, c))
    assert stand_in.resources == {}


async def test_a_throttled_or_failed_poll_is_unknown_never_terminated(azure):
    """A failed poll used to raise out of ``state``, and so out of the boot watch."""
    stand_in, options = azure
    call = "GET virtualMachines/instanceView"
    await check_polls(
        AzureVMCluster,
        options,
        [
            lambda: stand_in.throttle(call),
            lambda: stand_in.fail(call, 500, "InternalServerError"),
            lambda: stand_in.fail(call, 503, "ServiceUnavailable"),
        ],
        lambda c: nothing_left(stand_in, c),
    )
    assert stand_in.resources == {}


async def test_deletes_refused_as_in_use_are_retried_by_their_error_code(azure):
    """ARM refuses to delete an NSG or a vnet while a NIC of a VM being deleted still
    holds it: its error code says so (the message, in ARM's words, is only quoted)."""
    stand_in, options = azure
    cluster = await AzureVMCluster(n_workers=1, asynchronous=True, **options)
    stand_in.fail(
        "DELETE networkSecurityGroups",
        400,
        "InUseNetworkSecurityGroupCannotBeDeleted",
        message="Network security group cannot be deleted because it is in use by the "
        "following resources: [nic-1].",
    )
    stand_in.fail(
        "DELETE virtualNetworks",
        400,
        "InUseSubnetCannotBeDeleted",
        message="Subnet dask is in use by nic-1 and cannot be deleted.",
    )
    await cluster.close()
    # Two NSGs and a vnet, each of the first two refused once and deleted again.
    assert stand_in.calls.count("DELETE networkSecurityGroups") == 3
    assert stand_in.calls.count("DELETE virtualNetworks") == 2
    assert nothing_left(stand_in, cluster.cluster_id)
    assert stand_in.resources == {}
