"""What a SIGKILLed client leaves on each cloud, and that ``cleanup`` ends it.

A client process starts a cluster with a short lease, computes on it, and is killed as
a crash would kill it. Its scheduler ends itself once the lease runs out, its worker
follows, and each VM powers itself off. Powered off is not gone: each test asserts what
the cloud (its stand-in, which keeps what the cloud keeps) still holds, and bills, after
the lease, then that deleting the cluster (what ``dask secure-cloud cleanup CLUSTER_ID
--yes`` runs) leaves nothing. ``docs/security.rst`` has the table these tests stand
behind.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from google.auth.credentials import AnonymousCredentials
from helpers import vm_processes
from test_digitalocean import TOKEN, serve

from dask_secure_cloud import AzureVMCluster, DropletCluster, EC2Cluster, GCPCluster
from dask_secure_cloud.cluster import delete_cluster, preview
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.driver import CloudError, VMRequest
from dask_secure_cloud.errors import OptionError

from clouds.booter import VMBooter
from clouds.ec2 import EC2StandIn, make_network
from clouds.gce import GCEStandIn
from clouds.naming import RUNS
from standins import add_team_vnet, start_azure

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

#: The client: start a cluster with a short lease, compute, say its id, and wait to be
#: killed. Options arrive as JSON; ``SETUP`` adds what JSON cannot carry.
CLIENT = """
import json, sys, time
from distributed import Client
from dask_secure_cloud import {cls}
options = json.loads(sys.argv[1])
{setup}
cluster = {cls}(n_workers=1, lease_timeout="3s", worker_death_timeout="3s", **options)
with Client(cluster) as client:
    assert client.submit(sum, range(10)).result(timeout=60) == 45
print(cluster.cluster_id, flush=True)
time.sleep(600)
"""
#: How long the VMs may take to end by themselves once the client is killed: the lease
#: (3 s), the worker's wait for its lost scheduler (3 s), and the power-off.
ENDS_WITHIN = 45


def kill_a_computing_client(cls: type, options: dict[str, Any], setup: str = "") -> str:
    """Run the client in its own process (this interpreter), let it compute, SIGKILL it;
    the cluster's id."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLIENT.format(cls=cls.__name__, setup=setup),
            json.dumps(options),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        cluster_id = child.stdout.readline().strip()
        assert cluster_id.startswith("dsc-"), child.communicate(timeout=5)
    finally:
        child.kill()  # SIGKILL: nothing of the client runs after this
        child.wait()
    return cluster_id


def wait_until(done: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until ``done()``; fails naming ``what`` after ``within``."""
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < within, what
        time.sleep(0.5)
    return time.monotonic() - started


async def states_then_cleanup(
    cls: type, options: dict[str, Any], cluster_id: str
) -> tuple[dict[str, str], int]:
    """What the cluster's driver says of each VM (``Driver.states``) and how many VMs
    cleanup finds to delete; then the cluster deleted as ``dask secure-cloud cleanup
    CLUSTER_ID --yes`` deletes it: found among the clusters by their tags, every VM
    deleted, then the rest."""
    driver = preview(cls, **options).driver
    try:
        assert cluster_id in {c.cluster_id for c in await driver.clusters()}
        listed = await driver.list(cluster_id)
        states = await driver.states(cluster_id)
        await delete_cluster(driver, cluster_id)
        assert await driver.list(cluster_id) == []
    finally:
        await driver.close()
    return states, len(listed)


# -- EC2: terminate on shutdown --------------------------------------------------------


@pytest.fixture
def ec2(tmp_path, monkeypatch) -> Iterator[tuple[EC2StandIn, Any, dict[str, Any]]]:
    stand_in = EC2StandIn(VMBooter(tmp_path / "vms"), "us-east-1")
    stand_in.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", stand_in.url)
    client = boto3.client("ec2", region_name="us-east-1", endpoint_url=stand_in.url)
    network = make_network(client, f"127.{random.randint(1, 254)}.1.0/24", "internet")
    options = {
        "region": "us-east-1",
        "ami": client.describe_images()["Images"][0]["ImageId"],
        "vpc": network.vpc_id,
        "subnet_id": network.subnet_id,
        "use_private_ip": True,
        "scheduler_instance_type": "t3.medium",
        "worker_instance_type": "t3.large",
        "boot_timeout": "60s",
    }
    yield stand_in, client, options
    stand_in.stop()


def test_ec2_a_killed_client_leaves_terminated_instances_only(ec2):
    """EC2 terminates an instance whose OS shuts down (the cluster launches with
    ``InstanceInitiatedShutdownBehavior=terminate``): nothing bills after the lease;
    only the cluster's security groups (free) wait for cleanup."""
    _stand_in, client, options = ec2
    cluster_id = kill_a_computing_client(EC2Cluster, options)
    tag = [{"Name": "tag:dask-secure-cloud-cluster", "Values": [cluster_id]}]

    def instances() -> dict[str, str]:
        reservations = client.describe_instances(Filters=tag)["Reservations"]
        return {i["InstanceId"]: i["State"]["Name"] for r in reservations for i in r["Instances"]}

    took = wait_until(
        lambda: set(instances().values()) == {"terminated"}, ENDS_WITHIN, "instances terminated"
    )
    print(f"every instance terminated {took:.0f}s after the client was killed")
    assert len(instances()) == 2
    assert not vm_processes(cluster_id)
    volumes = client.describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": list(instances())}]
    )["Volumes"]
    assert volumes == []  # root volumes are deleted on termination
    assert client.describe_security_groups(Filters=tag)["SecurityGroups"]  # free, kept
    states, listed = asyncio.run(states_then_cleanup(EC2Cluster, options, cluster_id))
    assert list(states.values()) == ["terminated", "terminated"] and listed == 0, states
    assert client.describe_security_groups(Filters=tag)["SecurityGroups"] == []


# -- Compute Engine: TERMINATED instances keep their disks -------------------------------


@pytest.fixture
def gce(tmp_path) -> Iterator[tuple[GCEStandIn, dict[str, Any]]]:
    stand_in = GCEStandIn(
        VMBooter(tmp_path / "vms"),
        "dsc-test-project",
        "us-central1-a",
        f"127.{random.randint(1, 254)}.1.0/24",
    )
    url = stand_in.start()
    options = {
        "project": "dsc-test-project",
        "zone": "us-central1-a",
        "api_endpoint": url,
        "use_private_ip": True,
        "scheduler_machine_type": "e2-small",
        "worker_machine_type": "e2-standard-2",
        "boot_timeout": "60s",
    }
    yield stand_in, options
    stand_in.stop()


def instances_of(stand_in: GCEStandIn, cluster_id: str) -> dict[str, dict[str, Any]]:
    return {
        name: record
        for name, record in list(stand_in.instances.items())
        if record["labels"].get("dask-secure-cloud-cluster") == cluster_id
    }


def test_gce_a_killed_client_leaves_terminated_instances_whose_disks_bill(gce):
    """An instance whose OS powered off is TERMINATED: its boot disk bills until it is
    deleted. Its deadline (``terminationTime``, the end of ``max_lifetime``) was set
    while it ran, and Compute Engine clears it when the instance stops: nothing but a
    delete ends the disk's bill."""
    stand_in, options = gce
    cluster_id = kill_a_computing_client(
        GCPCluster,
        options,
        setup="from google.auth.credentials import AnonymousCredentials\n"
        "options['credentials'] = AnonymousCredentials()",
    )
    took = wait_until(
        lambda: (
            {r["status"] for r in instances_of(stand_in, cluster_id).values()} == {"TERMINATED"}
        ),
        ENDS_WITHIN,
        "instances TERMINATED",
    )
    print(f"every instance was TERMINATED {took:.0f}s after the client was killed")
    instances = instances_of(stand_in, cluster_id)
    assert len(instances) == 2
    assert not vm_processes(cluster_id)
    for name, record in instances.items():
        assert record["scheduling"]["instanceTerminationAction"] == "DELETE"
        assert record["scheduling"]["terminationTime"]  # the end of max_lifetime
        assert "resourceStatus" not in record  # cleared on stop: it will not fire
        disk = stand_in.disks[record["_disk"]]  # still there: it bills
        assert disk["users"] == [record["selfLink"]] and int(disk["sizeGb"]) > 0, name
    options = {**options, "credentials": AnonymousCredentials()}
    states, listed = asyncio.run(states_then_cleanup(GCPCluster, options, cluster_id))
    assert list(states.values()) == ["stopped", "stopped"] and listed == 2, states
    assert not instances_of(stand_in, cluster_id) and not stand_in.disks
    assert not [n for n in stand_in.firewalls if cluster_id in n]


async def test_gce_deletes_a_running_vm_at_its_deadline_but_not_a_stopped_one(gce):
    """The cluster's deadline as Compute Engine enforces it: the instance still running
    at its ``terminationTime`` is deleted with its disk; the one whose OS powered off
    before stays TERMINATED, its disk billing, until it is deleted."""
    stand_in, options = gce
    options = {**options, "credentials": AnonymousCredentials()}
    driver = preview(GCPCluster, **options).driver
    cluster_id = "dsc-deadline0"
    # As if the cluster's max_lifetime ended in under a minute.
    driver.deadline = datetime.datetime.now(datetime.timezone.utc).replace(
        microsecond=0
    ) + datetime.timedelta(seconds=48)
    try:
        await driver.prepare(cluster_id)
        running = await driver.create(VMRequest(cluster_id, "worker-0", Role.WORKER, RUNS))
        off = await driver.create(
            VMRequest(cluster_id, "worker-1", Role.WORKER, b"#cloud-config\n{}\n")
        )
        inserted = [body for call, body in stand_in.requests if call == "instances.insert"]
        for body in inserted:
            when = datetime.datetime.fromisoformat(body["scheduling"]["terminationTime"])
            assert when == driver.deadline
            assert body["scheduling"]["instanceTerminationAction"] == "DELETE"
        await asyncio.to_thread(
            wait_until, lambda: stand_in.instances[off.id]["status"] == "TERMINATED", 20, "off"
        )
        assert await driver.state(off) == "stopped"
        assert await driver.state(running) == "running"
        await asyncio.to_thread(
            wait_until, lambda: running.id not in stand_in.instances, 60, "deleted at deadline"
        )
        assert datetime.datetime.now(datetime.timezone.utc) >= driver.deadline
        assert await driver.state(running) == "terminated"
        assert await driver.state(off) == "stopped"  # its deadline was cleared on stop
        assert set(stand_in.disks) == {off.id}  # the deleted one's disk went with it
        await delete_cluster(driver, cluster_id)
    finally:
        await driver.close()
    assert not stand_in.instances and not stand_in.disks


# -- Azure: Stopped VMs stay allocated ---------------------------------------------------


@pytest.fixture
def azure(tmp_path, monkeypatch):
    stand_in, options = start_azure(
        VMBooter(tmp_path / "vms"),
        tmp_path,
        monkeypatch,
        address_prefix=f"127.{random.randint(100, 250)}.0.0/16",
    )
    # The client runs inside the team's network (its own process reaches no NAT of the
    # stand-in's public addresses), as a client in the cloud does.
    add_team_vnet(stand_in, options["address_prefix"])
    yield (
        stand_in,
        {
            **options,
            "vnet": "team-vnet",
            "subnet": "compute",
            "use_private_ip": True,
            # Where the scheduler VM asks for its identity's token (169.254.169.254 on Azure).
            "metadata_endpoint": stand_in.metadata(),
        },
    )
    stand_in.stop()


def of_cluster(stand_in: Any, kind: str, cluster_id: str) -> list[dict[str, Any]]:
    with stand_in._lock:
        return [r for r in stand_in.of_kind(kind) if r["name"].startswith(f"{cluster_id}-")]


def test_azure_a_killed_clients_scheduler_deletes_every_vm_with_its_own_identity(azure):
    """By default (the caller may assign roles), the scheduler carries an identity made
    for the cluster, whose roles reach only the cluster's VMs, NICs, disks and addresses.
    When the lease ends it deletes the worker VMs, then its own: nothing that bills is
    left, only free resources (NSGs, the identity and its role assignments), which
    ``list`` shows billing nothing and cleanup deletes."""
    stand_in, options = azure
    cluster_id = kill_a_computing_client(AzureVMCluster, options)
    (identity,) = of_cluster(stand_in, "userassignedidentities", cluster_id)
    client_id = identity["properties"]["clientId"]
    took = wait_until(
        lambda: not of_cluster(stand_in, "virtualmachines", cluster_id),
        ENDS_WITHIN,
        "VMs deleted",
    )
    print(f"every VM was deleted {took:.0f}s after the client was killed")
    for kind in ("disks", "networkinterfaces", "publicipaddresses"):
        assert of_cluster(stand_in, kind, cluster_id) == [], kind
    assert not vm_processes(cluster_id)
    # The scheduler VM asked for its token itself, from the metadata service.
    assert [t["vm"] for t in stand_in.identity_tokens.values() if t["client_id"] == client_id]
    assert {t["vm"] for t in stand_in.identity_tokens.values()} == {f"{cluster_id}-scheduler"}
    driver = preview(AzureVMCluster, **options).driver

    async def listed() -> Any:
        try:
            return next(c for c in await driver.clusters() if c.cluster_id == cluster_id)
        finally:
            await driver.close()

    summary = asyncio.run(listed())
    assert summary.vms == 0 and summary.billing() == {}, summary
    assert summary.resources.get("identity") == 1, summary
    principal = identity["properties"]["principalId"]
    assert [a for a in stand_in.assignments.values() if a["properties"]["principalId"] == principal]
    states, listed_vms = asyncio.run(states_then_cleanup(AzureVMCluster, options, cluster_id))
    assert states == {} and listed_vms == 0
    assert stand_in.tagged(cluster_id) == []
    assert not [
        a for a in stand_in.assignments.values() if a["properties"]["principalId"] == principal
    ]


def test_azure_a_killed_client_leaves_stopped_allocated_vms(azure):
    """Without the scheduler's identity (``delete_on_lease_end=False``, or a caller
    who may not assign roles), a VM whose OS shut down is "Stopped": still allocated,
    its compute still billed, with its OS disk and NIC, until it is deallocated or
    deleted through the API."""
    stand_in, options = azure
    options = {**options, "delete_on_lease_end": False}
    cluster_id = kill_a_computing_client(AzureVMCluster, options)

    def powers() -> set[str]:
        with stand_in._lock:
            vms = [v for v in stand_in.of_kind("virtualMachines") if cluster_id in v["name"]]
            return {stand_in._instance_view(v)["statuses"][1]["code"] for v in vms}

    took = wait_until(lambda: powers() == {"PowerState/stopped"}, ENDS_WITHIN, "VMs Stopped")
    print(f"every VM was Stopped {took:.0f}s after the client was killed")
    vms = [v for v in stand_in.of_kind("virtualMachines") if cluster_id in v["name"]]
    assert len(vms) == 2
    assert not vm_processes(cluster_id)
    for vm in vms:
        disk = vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"]
        assert stand_in.resources[disk.lower()]["managedBy"] == vm["id"]
        for nic in vm["properties"]["networkProfile"]["networkInterfaces"]:
            assert nic["id"].lower() in stand_in.resources
    states, listed = asyncio.run(states_then_cleanup(AzureVMCluster, options, cluster_id))
    assert list(states.values()) == ["stopped", "stopped"] and listed == 2, states
    assert stand_in.tagged(cluster_id) == []
    assert not [v for v in stand_in.of_kind("virtualMachines") if cluster_id in v["name"]]
    assert not [d for d in stand_in.of_kind("disks") if cluster_id in d["name"]]


# -- DigitalOcean: off droplets bill in full ---------------------------------------------


@pytest.fixture
def do(tmp_path, monkeypatch):
    stand_in, options = serve(tmp_path, VMBooter(tmp_path / "vms"))
    monkeypatch.setenv("DIGITALOCEAN_TOKEN", TOKEN)
    yield stand_in, options
    stand_in.stop()


def test_digitalocean_a_killed_client_leaves_off_droplets_billed_in_full(do):
    """A droplet whose OS powered off is "off", and DigitalOcean bills it in full until
    it is destroyed: only cleanup ends it."""
    stand_in, options = do
    cluster_id = kill_a_computing_client(DropletCluster, options)
    took = wait_until(lambda: not vm_processes(cluster_id), ENDS_WITHIN, "droplets powered off")
    print(f"every droplet powered off {took:.0f}s after the client was killed")
    states, listed = asyncio.run(states_then_cleanup(DropletCluster, options, cluster_id))
    assert list(states.values()) == ["stopped", "stopped"] and listed == 2, states
    assert not stand_in.droplets and not stand_in.firewalls and not stand_in.vpcs


def test_digitalocean_an_off_droplet_is_listed_off_until_destroyed(do):
    """The stand-in, as the API: a powered-off droplet is still there, "off"."""
    stand_in, options = do
    driver = preview(DropletCluster, **options).driver

    async def run() -> None:
        try:
            await driver.prepare("dsc-offdroplet")
            vm = await driver.create(
                VMRequest("dsc-offdroplet", "worker-0", Role.WORKER, b"#cloud-config\n{}\n")
            )
            await asyncio.to_thread(
                wait_until, lambda: not vm_processes("dsc-offdroplet"), 30, "powered off"
            )
            assert await driver.state(vm) == "stopped"
            assert stand_in.droplets[int(vm.id)]["status"] == "off"
            await delete_cluster(driver, "dsc-offdroplet")
        finally:
            await driver.close()

    asyncio.run(run())
    assert not stand_in.droplets


async def test_gce_time_limits_outside_compute_engines_bounds_are_refused(gce):
    """30 seconds to 120 days, as Compute Engine takes them: the option refuses a shorter
    ``max_run_duration``, the driver starts no VM its deadline would delete as it boots,
    and the stand-in refuses what Compute Engine refuses."""
    stand_in, options = gce
    options = {**options, "credentials": AnonymousCredentials()}
    with pytest.raises(OptionError, match="from 30s to 120d"):
        preview(GCPCluster, **{**options, "max_run_duration": "10s"})
    driver = preview(GCPCluster, **options).driver
    request = VMRequest("dsc-limits00", "worker-0", Role.WORKER, RUNS)
    try:
        await driver.prepare("dsc-limits00")
        driver.deadline = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=20
        )
        with pytest.raises(CloudError, match="max_lifetime ends in"):
            await driver.create(request)
        driver.max_run_duration = 10  # past the option's check: the API refuses it
        with pytest.raises(CloudError, match="maxRunDuration"):
            await driver.create(request)
        assert not stand_in.instances and not stand_in.disks
        await delete_cluster(driver, "dsc-limits00")
    finally:
        await driver.close()
