"""Each cloud's stand-in boots the instances it is asked for as real Linux guests.

The API side is the same as in each cloud's own tests (the real SDK client against the
stand-in, which validates every body); what differs is the VM: a QEMU guest of the
stock-like image (kernel, systemd, cloud-init, python3; no Docker, no Dask) whose real
cloud-init runs the user-data the stand-in received. A guest gets a route out ("the
internet": the test namespace's apt, PyPI and ghcr.io) only where the stand-in's own
model of the network gives its instance one, so the driver's preflight and the guest
must agree, or the boot fails.

The networks are the shape of each cloud's default network on a new account (no NAT:
an internet gateway or default internet route only), laid out on the guest bed's
10.77.0.0/24 so that this machine reaches the guests' private addresses.

Under TCG on two shared cores a guest boots in one to two minutes, and installing
Docker or Dask at boot takes several more, so each cloud proves a different part of the
boot path: EC2 the default runtime (Docker installed, the pinned image pulled) on three
stock guests, Compute Engine the native runtime installing Dask on a stock image, Azure
and DigitalOcean baked images (DigitalOcean a SIGKILLed client's end state, Azure a Spot
eviction). Together with ``test_guests_failed_boots.py`` (failures) every runtime is
proven on a stock image, and every cloud on guests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import dask
import distributed
import pytest
from distributed import Client
from helpers import decoded_files

from dask_secure_cloud import AzureVMCluster, EC2Cluster, GCPCluster, liveness
from dask_secure_cloud.cloudinit import secrets_in
from dask_secure_cloud.cluster import VMCluster, default_docker_image
from dask_secure_cloud.providers.digitalocean import cluster_tag, made_name

from clouds.arm import ScheduledEvents
from clouds.digitalocean import DigitalOceanStandIn
from clouds.ec2 import EC2StandIn, make_network
from clouds.guest.booter import GuestBooter, GuestVM
from clouds.guest.common import HOST_ADDRESS
from clouds.guest.fixtures import APPARMOR, BOOT_TIMEOUT, CONNECT_TIMEOUT, SUBNET
from clouds.guest.image import baked_image, stock_image
from clouds.guest.internet import Services
from clouds.guest.mirror_pypi import USER_REQUIREMENTS
from clouds.guest.network import GuestNetwork
from standins import start_azure

pytestmark = [
    pytest.mark.slow,
    pytest.mark.guest,
    pytest.mark.timeout(1800),
    pytest.mark.usefixtures("patient_connections"),
]

#: Installing Docker and pulling the image on a TCG guest take some twelve minutes.
DOCKER_BOOT_TIMEOUT = "25m"
REGION = "us-east-1"
#: A killed client's cluster ends in a minute or two rather than the default twenty. Not
#: shorter: the scheduler's lease runs from its start, and the client's first renewal
#: comes a quarter lease after it has connected, which on a loaded TCG guest can take
#: tens of seconds. A worker follows its scheduler within seconds (its connection
#: breaks); its death timeout is only the backstop.
LEASE_SECONDS = 60
LEASE = {"lease_timeout": f"{LEASE_SECONDS}s", "worker_death_timeout": f"{LEASE_SECONDS}s"}
#: From the kill to the last power-off: the lease, the scheduler's check of it (every
#: 10 s), each guest's shutdown (10-20 s under TCG), with room for a loaded machine.
ENDS_WITHIN = 480


async def _computes_over_tls(
    cluster: VMCluster, workers: int, scheduler: str = "tls://10.77.0."
) -> None:
    """The scheduler answers at ``scheduler`` (its 10.77.0.x address, or a public one the
    stand-in's edge leads to it) and every worker on its 10.77.0.x address, over TLS, and
    each worker runs a task."""
    assert cluster.scheduler_address.startswith(scheduler)
    async with Client(cluster, asynchronous=True) as client:
        await client.wait_for_workers(workers, timeout=600)
        addresses = list((await client.scheduler.identity())["workers"])
        assert all(a.startswith("tls://10.77.0.") for a in addresses)
        futures = [
            client.submit(sum, range(i, i + 10), workers=[a], pure=False)
            for i, a in enumerate(addresses)
        ]
        assert await client.gather(futures) == [sum(range(i, i + 10)) for i in range(workers)]
        versions = await client.get_versions(check=True)
        assert versions["scheduler"]["packages"]["dask"] == dask.__version__


async def _renewed_on_guests(cluster: VMCluster, names: set[str]) -> None:
    """Wait until every guest named has made a fresh key and installed its renewed
    certificate (each guest's Dask process runs ``openssl`` and reloads its contexts)."""
    deadline = time.monotonic() + 180
    while set(cluster._renewal.count) != names:
        assert time.monotonic() < deadline, f"renewed only {cluster._renewal.count}"
        await asyncio.sleep(1)


def _why_not_off(guests: list[GuestVM], off: dict[str, float | None]) -> str:
    """For a guest that did not power off in time: whether it still runs, and its
    console's last lines."""
    return "\n".join(
        f"--- {g.name} (running: {g.is_running()})\n"
        + "\n".join(g.console_text().splitlines()[-25:])
        for g in guests
        if off.get(g.name) is None
    )


def _enrolled(booter: GuestBooter, guests: list[GuestVM]) -> None:
    """Every guest made its own key and was certified at boot: no seed carried a key."""
    assert set(booter.seeds) == {g.name for g in guests}
    for name, seed in booter.seeds.items():
        assert secrets_in(seed) == [], name
        assert "/opt/dask-secure-cloud/tls/enroll.json" in decoded_files(seed), name
    for guest in guests:
        console = guest.console_text()
        assert "enroll: done in" in console, (guest.name, console[-3000:])


def _no_guest_left(booter: GuestBooter, network: GuestNetwork, services: Services) -> None:
    """Every guest gone: no VM on the booter, no qemu in the namespace."""
    assert booter.vms == {}
    assert set(network.pids()) <= {services.process.pid}


def _fetched(services: Services, since: float) -> list[dict]:
    return [r for r in services.requests() if r.get("time", 0) >= since]


# -- EC2: the default runtime on the stock image, on a default-VPC-shaped network ---------


@pytest.fixture
def ec2_guests(
    guest_network, guest_services, tmp_path, monkeypatch
) -> Iterator[tuple[EC2StandIn, GuestBooter, object, dict]]:
    """moto's EC2 booting guests, and a VPC shaped like a new account's default one: an
    internet gateway as the main route table's default route, no NAT gateway."""
    # AppArmor off in the guests' kernel: see APPARMOR.
    booter = GuestBooter(tmp_path / "vms", guest_network, stock_image(), apparmor=APPARMOR)
    stand_in = EC2StandIn(booter, REGION)
    stand_in.start()
    stand_in.reset()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", stand_in.url)
    client = boto3.client("ec2", region_name=REGION, endpoint_url=stand_in.url)
    network = make_network(client, SUBNET, way_out="internet")
    options = {
        "region": REGION,
        "ami": client.describe_images()["Images"][0]["ImageId"],
        "vpc": network.vpc_id,
        "subnet_id": network.subnet_id,
        "use_private_ip": True,  # the client reaches the guests' private addresses
        "boot_timeout": BOOT_TIMEOUT,
    }
    try:
        yield stand_in, booter, client, options
    finally:
        stand_in.stop()


@pytest.mark.every_core
async def test_ec2_defaults_install_docker_on_stock_guests_and_compute_over_tls(
    ec2_guests, guest_network, guest_services
):
    """``EC2Cluster()``'s defaults (Docker runtime, pinned image, no NAT gateway) on three
    stock guests, a scheduler and two workers: the preflight gives the workers public
    addresses, the stand-in gives them a route out, and the guests install Docker, pull
    the image and compute over TLS. Closing terminates every instance and every guest."""
    _, booter, client, options = ec2_guests
    since = time.time()
    async with EC2Cluster(
        n_workers=2, asynchronous=True, **{**options, "boot_timeout": DOCKER_BOOT_TIMEOUT}
    ) as cluster:
        await _computes_over_tls(cluster, workers=2)
        assert booter.egress == {"scheduler": True, "worker-0": True, "worker-1": True}
        vms = await cluster.driver.list(cluster.cluster_id)
        assert all(vm.public_ip for vm in vms if vm.name != "scheduler")
        guests = list(booter.vms.values())
        cluster_id = cluster.cluster_id
    for guest in guests:
        steps = guest.console_text()
        assert "docker-engine: done in" in steps, (guest.name, steps[-3000:])
        assert "pull: done in" in steps, (guest.name, steps[-3000:])
    fetched = _fetched(guest_services, since)
    image = default_docker_image().split("/", 1)[1].replace(":", "/manifests/")
    assert any(r["host"] == "ghcr.io" and image in r["path"] for r in fetched)
    assert any("/docker.io_" in r["path"] for r in fetched)
    tag = [{"Name": "tag:dask-secure-cloud-cluster", "Values": [cluster_id]}]
    instances = [
        i
        for r in client.describe_instances(Filters=tag)["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    assert instances == []
    assert client.describe_security_groups(Filters=tag)["SecurityGroups"] == []
    _enrolled(booter, guests)
    _no_guest_left(booter, guest_network, guest_services)


# -- GCE: the native runtime installs this client's dask on stock guests ------------------


async def test_gcp_defaults_with_native_runtime_install_dask_on_stock_guests(
    gce_guests, guest_network, guest_services
):
    """``GCPCluster(runtime="native")`` on two stock guests: the worker gets an external
    address (no Cloud NAT), the boot script makes a virtualenv with this client's exact
    dask and distributed from "PyPI", and the cluster computes over TLS.

    With ``pip_packages`` as users write them: a requirement with a version range
    (``iniconfig>=2,<3``) and one with an extra (``urllib3[socks]``, which brings
    PySocks). Each reaches pip as one argument, and the Dask processes can import them."""
    stand_in, booter, options = gce_guests
    since = time.time()

    def installed() -> dict[str, str]:
        # Nested, so that it is pickled by value: the guests cannot import this module.
        from importlib.metadata import version

        import iniconfig  # noqa: F401
        import socks  # noqa: F401

        return {name: version(name) for name in ("iniconfig", "PySocks", "urllib3")}

    async with GCPCluster(
        n_workers=1,
        runtime="native",
        pip_packages=list(USER_REQUIREMENTS),
        asynchronous=True,
        **options,
    ) as cluster:
        await _computes_over_tls(cluster, workers=1)
        async with Client(cluster, asynchronous=True) as client:
            on_workers = await client.run(installed)
            on_scheduler = await client.run_on_scheduler(installed)
        for versions in [*on_workers.values(), on_scheduler]:
            assert versions["iniconfig"].startswith("2."), versions
            assert versions["PySocks"], versions
        assert booter.egress == {"scheduler": True, "worker-0": True}
        guests = list(booter.vms.values())
        cluster_id = cluster.cluster_id
    for guest in guests:
        steps = guest.console_text()
        assert "python-env: done in" in steps, (guest.name, steps[-3000:])
    fetched = _fetched(guest_services, since)
    wheel = f"/dask-{dask.__version__}-"
    assert sum(1 for r in fetched if wheel in r["path"]) == 2  # once per VM
    for extra in ("/iniconfig-2.", "/PySocks-"):  # the specifier's and the extra's
        assert sum(1 for r in fetched if extra in r["path"]) == 2, extra
    assert any("python3-venv" in r["path"] for r in fetched)
    labelled = [
        r
        for r in stand_in.instances.values()
        if r["labels"].get("dask-secure-cloud-cluster") == cluster_id
    ]
    assert labelled == []
    assert not [name for name in stand_in.firewalls if cluster_id in name]
    _enrolled(booter, guests)
    _no_guest_left(booter, guest_network, guest_services)


# -- DigitalOcean: a baked image boots with nothing to install; a killed client ---------

#: A DigitalOcean client in a process of its own (this interpreter), as a user's script or
#: notebook kernel: it starts the cluster, runs a task on every worker over TLS, says what
#: it saw, and waits to be killed. The stand-in's endpoint reaches it through the dask
#: config in its environment, as it reaches ``dask secure-cloud list`` and ``cleanup``;
#: the cluster's own options come as JSON.
_DROPLET_CLIENT = """
import json, sys, time
from distributed import Client
from dask_secure_cloud import DropletCluster

cluster = DropletCluster(**json.loads(sys.argv[1]))
with Client(cluster) as client:
    client.wait_for_workers(1, timeout=600)
    workers = sorted(client.scheduler_info()["workers"])
    futures = [
        client.submit(sum, range(i, i + 10), workers=[a], pure=False)
        for i, a in enumerate(workers)
    ]
    seen = {
        "cluster_id": cluster.cluster_id,
        "scheduler": cluster.scheduler_address,
        "workers": workers,
        "sums": client.gather(futures),
        "dask": client.get_versions(check=True)["scheduler"]["packages"]["dask"],
    }
print(json.dumps(seen), flush=True)
time.sleep(3600)
"""


@pytest.fixture
def do_guests(
    guest_network, tmp_path, monkeypatch
) -> Iterator[tuple[DigitalOceanStandIn, GuestBooter, dict]]:
    """The DigitalOcean stand-in booting guests of an image with this client's dask
    baked in; the VPC the cluster makes gets its range from the guest bed's network."""
    image = baked_image(dask.__version__, distributed.__version__)
    booter = GuestBooter(tmp_path / "vms", guest_network, image, apparmor=APPARMOR)
    token = "dop_v1_guest_test_token"
    stand_in = DigitalOceanStandIn(booter, token, vpc_pool=SUBNET)
    url = stand_in.start()
    bundle = tmp_path / "ca.pem"
    stand_in.ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("DIGITALOCEAN_TOKEN", token)
    options = {
        "api_url": url,
        "ca_bundle": str(bundle),
        "use_private_ip": True,  # the client reaches the guests' private addresses
        "boot_timeout": BOOT_TIMEOUT,
    }
    try:
        yield stand_in, booter, options
    finally:
        stand_in.stop()


def _droplet_config(options: dict[str, Any], audit_log: Path) -> dict[str, str]:
    """The environment of the client's process and of the CLI after it: ``options`` as
    DigitalOcean's dask config; the test's audit log, next to which the client leaves
    its record (whether it lives: ``liveness.py``); and Dask's connections as patient as
    ``patient_connections`` makes them here (the VMs get them with the shipped config)."""
    env = {
        **os.environ,
        "DASK_SECURE_CLOUD__AUDIT_LOG": str(audit_log),
        "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": CONNECT_TIMEOUT,
    }
    for key, value in options.items():
        env[f"DASK_SECURE_CLOUD__DIGITALOCEAN__{key.upper()}"] = str(value)
    return env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``dask secure-cloud ARGS``, as the user runs it after the client died."""
    return subprocess.run(
        [sys.executable, "-m", "dask_secure_cloud", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _listed(listing: str, cluster_id: str) -> dict[str, str]:
    """The row of ``dask secure-cloud list`` for ``cluster_id``, by column name (columns
    are two or more spaces apart)."""
    header, *rows = listing.splitlines()
    names = re.split(r"\s{2,}", header.strip())
    for row in rows:
        cells = re.split(r"\s{2,}", row.strip())
        if cells[1:2] == [cluster_id]:
            return dict(zip(names, cells, strict=True))
    raise AssertionError(f"{cluster_id} is not listed:\n{listing}")


def _seen_at(guest: GuestVM, pattern: str) -> float | None:
    """When (``time.monotonic()``) the first console line matching ``pattern`` was seen."""
    return next(
        (guest.started + t for t, line in guest.timed_lines() if re.search(pattern, line)), None
    )


def test_digitalocean_baked_guests_compute_then_a_killed_client_leaves_off_droplets(
    do_guests, guest_network, guest_services, audit_log, tmp_path
):
    """``DropletCluster(runtime="native")`` on guests of a baked image, started by a
    client in a process of its own: every droplet has its public interface as a way out,
    yet boots without fetching anything, and the cluster computes over TLS.

    Then the client is SIGKILLed, as a crash or a stopped notebook kernel kills it, so
    nothing but the VMs can end the cluster: the scheduler ends itself once the lease
    runs out, its worker follows, and each guest's OS powers itself off (the kernel's
    last words on its console; its qemu exits by itself). Powered off is not gone on
    DigitalOcean: both droplets are "off", still there and billed in full.
    ``dask secure-cloud list`` shows the cluster with its client gone and two stopped
    VMs billing; ``cleanup --expired`` destroys them with the cluster's firewalls and
    VPC, and nothing is left."""
    stand_in, booter, options = do_guests
    env = _droplet_config(options, audit_log)
    since, started = time.time(), time.monotonic()
    log = tmp_path / "client.log"
    with open(log, "w") as stderr:
        cluster_options = {"n_workers": 1, "runtime": "native", **LEASE}
        child = subprocess.Popen(
            [sys.executable, "-c", _DROPLET_CLIENT, json.dumps(cluster_options)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
    try:
        said = child.stdout.readline()
        guests = sorted(booter.vms.values(), key=lambda g: g.name)
        running = {g.name: g.is_running() for g in guests}
    finally:
        child.kill()  # SIGKILL: nothing of the client runs after this
        child.wait()
    killed = time.monotonic()
    assert said.startswith("{"), (child.returncode, log.read_text()[-5000:])
    seen = json.loads(said)
    cluster_id = seen["cluster_id"]
    print(
        f"{cluster_id}: the client computed and was killed {killed - started:.0f}s after it started"
    )
    # It computed over TLS on the guests' 10.77.0.x addresses, with this client's dask.
    assert seen["scheduler"].startswith("tls://10.77.0."), seen
    assert len(seen["workers"]) == 1, seen
    assert all(a.startswith("tls://10.77.0.") for a in seen["workers"]), seen
    assert seen["sums"] == [sum(range(10))] and seen["dask"] == dask.__version__, seen
    assert booter.egress == {"scheduler": True, "worker-0": True}
    assert running == {"scheduler": True, "worker-0": True}  # nothing ended before the kill

    for guest in guests:
        guest.wait_stopped(max(killed + ENDS_WITHIN - time.monotonic(), 1))
    off = {g.name: g.dask_exit_to_power_off() for g in guests}
    print(f"seconds from Dask's end to power-off: {off}")
    assert all(s is not None and s < 120 for s in off.values()), (off, _why_not_off(guests, off))
    ended = {g.name: _seen_at(g, r"dask-secure-cloud: dask \w+ exited ") for g in guests}
    for guest in guests:
        console = guest.console_text()
        print(
            f"{guest.name}: Dask ended {ended[guest.name] - killed:.0f}s and the guest was "
            f"off {guest.started + guest.timed_lines()[-1][0] - killed:.0f}s after the kill"
        )
        # The guest's own OS powered it off: the boot script asked, the kernel did it, and
        # qemu exited by itself (-no-reboot), not on a signal.
        assert "dask-secure-cloud: powering off" in console, (guest.name, console[-3000:])
        assert "reboot: Power down" in console, (guest.name, console[-3000:])
        assert guest.process.returncode == 0, (guest.name, guest.process.returncode)
        qemu_log = (Path(guest.directory) / "qemu.log").read_text(errors="replace")
        assert "terminating on signal" not in qemu_log, (guest.name, qemu_log)
    # The lease ended it: the scheduler outlived the kill by most of a lease (its last
    # renewal came at most a quarter lease, and one slow call, before the kill), and its
    # worker followed; both within the documented lease_timeout + worker_death_timeout
    # of the kill, give or take a loaded machine's minute.
    after_kill = {name: at - killed for name, at in ended.items()}
    assert after_kill["scheduler"] >= LEASE_SECONDS / 2, after_kill
    assert ended["worker-0"] >= ended["scheduler"], after_kill
    assert after_kill["worker-0"] <= 2 * LEASE_SECONDS + 60, after_kill
    # The stand-in stopped no guest: each is still a droplet of the account.
    assert set(booter.vms) == {g.vm_id for g in guests}

    all_off = time.monotonic()
    listed = _cli(env, "list", "--provider", "digitalocean")
    assert listed.returncode == 0, listed.stderr
    row = _listed(listed.stdout, cluster_id)
    assert row["CLIENT"] == "gone" and row["VMS"] == "2", row
    assert row["BILLS"] == "2 stopped VM", row
    tag = cluster_tag(cluster_id)
    droplets = [d for d in stand_in.droplets.values() if tag in d["tags"]]
    assert sorted(d["status"] for d in droplets) == ["off", "off"], droplets

    done = _cli(env, "cleanup", "--expired", "--yes", "--provider", "digitalocean")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert f"{cluster_id}  2 VM(s)" in done.stdout, done.stdout
    assert "client gone" in done.stdout and "bills: 2 stopped VM" in done.stdout, done.stdout
    assert f"{cluster_id}: deleted 2 VM(s)" in done.stdout, done.stdout
    assert not [d for d in stand_in.droplets.values() if tag in d["tags"]]
    assert not [f for f in stand_in.firewalls.values() if cluster_id in f["name"]]
    assert not [v for v in stand_in.vpcs.values() if v["name"] == made_name(tag)]
    assert not (liveness.records_dir() / f"{cluster_id}.json").exists()
    after = _cli(env, "list", "--provider", "digitalocean")
    assert after.returncode == 0 and cluster_id not in after.stdout, after
    print(f"list, cleanup and list again took {time.monotonic() - all_off:.0f}s")

    assert _fetched(guest_services, since) == []
    for guest in guests:
        assert "python-env: done in" in guest.console_text(), guest.name
    _enrolled(booter, guests)
    _no_guest_left(booter, guest_network, guest_services)


# -- Azure: private by default, and a Spot worker evicted -----------------------------------


async def test_azure_defaults_on_baked_guests_and_a_spot_worker_evicted(
    guest_network, guest_services, tmp_path, monkeypatch
):
    """``AzureVMCluster(resource_group=...)`` on guests of a baked image: the vnet made for
    the cluster has default outbound access, so the worker gets no public address yet has
    a way out; the scheduler gets one, open to this client alone, which the stand-in's
    edge leads to its guest (1:1, as Azure's does). Certificates living 150 s are
    renewed on both guests, and the cluster computes with the renewed ones. The Spot
    worker's eviction notice (from the instance metadata service) retires it, and its
    guest powers itself off; Azure then reports the VM stopped."""
    image = baked_image(dask.__version__, distributed.__version__)
    booter = GuestBooter(tmp_path / "vms", guest_network, image, apparmor=APPARMOR)
    stand_in, options = start_azure(booter, tmp_path, monkeypatch, address_prefix=SUBNET)
    events = ScheduledEvents(HOST_ADDRESS)  # reachable from the guests' cluster network
    since = time.time()
    try:
        async with AzureVMCluster(
            n_workers=1,
            runtime="native",
            worker_spot=True,
            metadata_endpoint=events.url,
            # Renewed at half-life, within the test; long enough that a start slowed by
            # a worker guest booting beside it is not cut short by the first expiry.
            certificate_lifetime="150s",
            # The evicted worker's retirement and power-off are what this test is about;
            # its replacement is test_replacement.py's (on the stand-in).
            max_replacements=0,
            asynchronous=True,
            **{**options, "boot_timeout": BOOT_TIMEOUT},
        ) as cluster:
            public = "tls://203.0.113."  # the stand-in's public addresses
            await _computes_over_tls(cluster, workers=1, scheduler=public)
            await _renewed_on_guests(cluster, {"scheduler", "worker-0"})
            # New connections, new certificates.
            await _computes_over_tls(cluster, workers=1, scheduler=public)
            assert booter.egress == {"scheduler": True, "worker-0": True}
            # Only the scheduler's network interface has a public address.
            for nic in stand_in.of_kind("networkinterfaces"):
                config = nic["properties"]["ipConfigurations"][0]["properties"]
                assert ("publicIPAddress" in config) is ("scheduler" in nic["name"])
            guests = list(booter.vms.values())
            (worker,) = [vm for vm in guests if vm.name == "worker-0"]
            events.evict()
            deadline = time.monotonic() + 300
            while cluster.scheduler_info["workers"]:
                assert time.monotonic() < deadline, "the evicted worker did not retire"
                await asyncio.sleep(1)
            assert await asyncio.to_thread(worker.wait_stopped, 300), "it did not power off"
            print(f"seconds from Dask's end to power-off: {worker.dask_exit_to_power_off()}")
            assert "python-env: done in" in worker.console_text()
            cluster_id = cluster.cluster_id
        assert _fetched(guest_services, since) == []  # the image had everything
        assert not stand_in.tagged(cluster_id)
        _enrolled(booter, guests)
        _no_guest_left(booter, guest_network, guest_services)
    finally:
        events.stop()
        stand_in.stop()
