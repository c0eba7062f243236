"""Images built with a cluster's software (``dask secure-cloud image build``), per cloud on
its stand-in: a build leaves an image and nothing else; a cluster of that software boots
it (its launch names the image) and skips provisioning; with no image it boots the stock
one and says which command would save it; a build failing part-way (the builder's
provisioning, the image API) leaves nothing at all; ``list``/``cleanup`` leave images
alone; ``image delete`` removes one with its snapshots.

The VMs are process VMs (``clouds.booter``): an image of one holds what its boot script
recorded as provisioned (``clouds.imaging``). The boot of a real image is proven on
guests (``test_guests_images.py``).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from distributed import Client

from dask_secure_cloud import imaging
from dask_secure_cloud.cluster import preview
from dask_secure_cloud.imaging.build import BuildError, build
from dask_secure_cloud.registry import cluster_class

from clouds.booter import VMBooter
from clouds.ec2 import EC2StandIn, make_network

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = ("docker-engine:", "pull:", "python-env:")


@dataclass
class Cloud:
    """One cloud's stand-in, seen the same way by every test."""

    provider: str
    options: dict[str, Any]
    #: The built images' names the cloud lists now.
    images: Callable[[], list[str]]
    #: Every resource left that is not an image (VMs, disks, networks, firewalls).
    resources: Callable[[], list[str]]
    #: Snapshots or other pieces of images.
    snapshots: Callable[[], list[str]]
    #: The image the last VM launch asked for.
    launched: Callable[[], str]
    #: Fail the next call of the cloud's image-making API.
    fail_image: Callable[[], None]
    booter: VMBooter
    env: dict[str, str] = field(default_factory=dict)

    @property
    def cls(self) -> Any:
        return cluster_class(self.provider)

    def consoles(self, cluster_id: str) -> dict[str, str]:
        return {
            vm.name: vm.console_output()
            for vm in list(self.booter.vms.values())
            if vm.cluster_id == cluster_id
        }

    def cli_options(self) -> list[str]:
        words = []
        for key, value in self.options.items():
            words += ["-o", f"{key}={value}"]
        return words


# -- EC2 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ec2_stand_in(tmp_path_factory):
    stand_in = EC2StandIn(VMBooter(tmp_path_factory.mktemp("ec2-vms")), "us-east-1")
    stand_in.start()
    yield stand_in
    stand_in.stop()


def _ec2(stand_in: EC2StandIn, monkeypatch: pytest.MonkeyPatch) -> Cloud:
    stand_in.reset()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", stand_in.url)
    client = boto3.client("ec2", region_name="us-east-1", endpoint_url=stand_in.url)
    network = make_network(client, f"127.{random.randint(1, 254)}.1.0/24")
    options = {
        "region": "us-east-1",
        "ami": client.describe_images()["Images"][0]["ImageId"],
        "vpc": network.vpc_id,
        "subnet_id": network.subnet_id,
        "use_private_ip": True,
        "boot_timeout": "60s",
    }

    def images() -> list[str]:
        return [i["Name"] for i in client.describe_images(Owners=["self"])["Images"]]

    def resources() -> list[str]:
        instances = [
            f"instance {i['InstanceId']}"
            for r in client.describe_instances()["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        ]
        groups = [
            f"security group {g['GroupName']}"
            for g in client.describe_security_groups()["SecurityGroups"]
            if g["GroupName"] != "default"
        ]
        return instances + groups

    def all_snapshots() -> set[str]:
        return {s["SnapshotId"] for s in client.describe_snapshots(OwnerIds=["self"])["Snapshots"]}

    stock = all_snapshots()  # moto's own AMIs have theirs

    def snapshots() -> list[str]:
        return sorted(all_snapshots() - stock)

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL_EC2": stand_in.url,
    }
    return Cloud(
        "aws",
        options,
        images,
        resources,
        snapshots,
        lambda: stand_in.launches[-1]["ImageId"],
        lambda: stand_in.fail("CreateImage", "InvalidParameterValue"),
        stand_in.booter,
        env,
    )


# -- Compute Engine --------------------------------------------------------------------


def _gce(tmp_path: Path) -> tuple[Cloud, Callable[[], None]]:
    from standins import start_gce

    stand_in, options = start_gce(tmp_path)

    def resources() -> list[str]:
        return [
            *(f"instance {name}" for name in stand_in.instances),
            *(f"disk {name}" for name in stand_in.disks),
            *(f"firewall {name}" for name in stand_in.firewalls if "dask" in name),
        ]

    def launched() -> str:
        inserts = [body for call, body in stand_in.requests if call == "instances.insert"]
        return inserts[-1]["disks"][0]["initializeParams"]["sourceImage"]

    cloud = Cloud(
        "gcp",
        options,
        lambda: sorted(stand_in.images),
        resources,
        lambda: [],
        launched,
        lambda: stand_in.fail("images.insert", 400, "invalid"),
        stand_in.booter,
    )
    return cloud, stand_in.stop


# -- DigitalOcean ----------------------------------------------------------------------


def _digitalocean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Cloud, Any]:
    from standins import DO_TOKEN, start_digitalocean

    stand_in, options = start_digitalocean(tmp_path, monkeypatch)

    def resources() -> list[str]:
        return [
            *(f"droplet {d['name']}" for d in stand_in.droplets.values()),
            *(f"firewall {f['name']}" for f in stand_in.firewalls.values()),
            *(f"vpc {v['name']}" for v in stand_in.vpcs.values()),
            *(f"tag {tag}" for tag in stand_in.tags),
        ]

    def launched() -> str:
        return str([body for kind, body in stand_in.bodies if kind == "droplet"][-1]["image"])

    cloud = Cloud(
        "digitalocean",
        options,
        lambda: sorted(s["name"] for s in stand_in.snapshots.values()),
        resources,
        lambda: [],
        launched,
        lambda: stand_in.fail("droplet_actions.post", 422, "unprocessable_entity"),
        stand_in.booter,
        {"DIGITALOCEAN_TOKEN": DO_TOKEN},
    )
    return cloud, stand_in.stop


# -- Azure -----------------------------------------------------------------------------


def _azure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Cloud, Any]:
    from standins import start_azure

    booter = VMBooter(tmp_path / "azure-vms")
    prefix = f"127.{random.randint(100, 250)}.0.0/16"
    stand_in, options = start_azure(booter, tmp_path, monkeypatch, address_prefix=prefix)

    def of_kind(images: bool) -> list[str]:
        return sorted(
            f"{r['_kind']} {r['name']}" if not images else r["name"]
            for r in list(stand_in.resources.values())
            if (r["_kind"] == "images") == images
        )

    def launched() -> str:
        vms = [body for kind, body in stand_in.bodies if kind == "virtualmachines"]
        reference = vms[-1]["properties"]["storageProfile"]["imageReference"]
        return reference.get("id") or ":".join(
            reference[k] for k in ("publisher", "offer", "sku", "version")
        )

    env = {k: os.environ[k] for k in os.environ if k.startswith("AZURE_")}
    cloud = Cloud(
        "azure",
        options,
        lambda: of_kind(True),
        lambda: of_kind(False),
        lambda: [],
        launched,
        # Accepted, then failed in its operation: the image exists, half made.
        lambda: stand_in.fail("PUT images", 500, "InternalError", in_operation=True),
        booter,
        env,
    )
    return cloud, stand_in.stop


CLOUDS = ["aws", "gcp", "digitalocean", "azure"]
#: Clouds whose credentials a CLI subprocess finds in its environment (the Compute Engine
#: stand-in's are an object, which no command line can pass).
CLI_CLOUDS = ["aws", "digitalocean", "azure"]


@pytest.fixture(params=CLOUDS)
def cloud(request, monkeypatch, tmp_path) -> Iterator[Cloud]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def stop() -> None:
        return None

    if request.param == "aws":
        found = _ec2(request.getfixturevalue("ec2_stand_in"), monkeypatch)
    elif request.param == "gcp":
        found, stop = _gce(tmp_path)
    elif request.param == "digitalocean":
        found, stop = _digitalocean(tmp_path, monkeypatch)
    elif request.param == "azure":
        found, stop = _azure(tmp_path, monkeypatch)
    else:  # pragma: no cover
        raise AssertionError(request.param)
    found.env = {**os.environ, **found.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    yield found
    found.booter.stop_all()
    stop()


NATIVE = {"runtime": "native"}


def _cli(cloud: Cloud, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dask_secure_cloud", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=cloud.env,
        input=stdin,
    )


def _build_logs() -> list[Path]:
    return sorted(imaging.build.log_dir().glob("*.log"))


async def test_build_then_a_cluster_boots_the_image_and_skips_provisioning(cloud, caplog):
    options = {**cloud.options, **NATIVE}
    built = await build(cloud.cls, options, poll_interval=0.5)
    assert built.name.startswith("dask-secure-cloud-") and built.digest in built.name
    assert cloud.images() == [built.name]
    assert cloud.resources() == [], "the builder and its network are deleted"
    (log,) = _build_logs()
    if cloud.provider != "digitalocean":  # the only API without console output
        assert "image-build: done" in log.read_text()
        assert "python-env: done" in log.read_text(), "the builder provisioned"

    caplog.set_level(logging.INFO, logger="dask_secure_cloud.imaging")
    async with cloud.cls(asynchronous=True, n_workers=1, **options) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=60)
            assert await client.submit(sum, [1, 2, 3]) == 6
        assert cloud.launched().endswith(built.id), "the cluster's VMs boot the built image"
        consoles = cloud.consoles(cluster.cluster_id)
        logs = [line for _, line in cluster._cluster_manager_logs]
    assert not [line for line in logs if "provisioning (" in line], "nothing to save"
    assert set(consoles) >= {"scheduler"} and len(consoles) == 2
    for name, console in consoles.items():
        assert "dask-secure-cloud: provisioned: the image has native dask" in console, name
        assert not [line for line in console.splitlines() if any(s in line for s in STEPS)]
    assert f"Booting from {built.name}" in caplog.text
    assert cloud.images() == [built.name] and cloud.resources() == []


async def test_no_matching_image_boots_stock_and_says_how_to_save_it(cloud, caplog):
    caplog.set_level(logging.INFO, logger="dask_secure_cloud.imaging")
    other = await build(cloud.cls, {**cloud.options, "runtime": "docker"}, poll_interval=0.5)
    shown = preview(cloud.cls, **cloud.options, **NATIVE)
    try:
        await shown.driver.prepare("dsc-fallback")
        assert shown.driver.built_image is None, f"{other.name} holds other software"
    finally:
        await shown.driver.release("dsc-fallback")
        await shown.driver.close()
    (line,) = [r.getMessage() for r in caplog.records if "No image" in r.getMessage()]
    assert f"dask secure-cloud image build {cloud.provider}" in line
    assert "native dask" in line and "install it at boot" in line

    note = imaging.provisioning_note(
        "dask-secure-cloud: python-env: done in 61.5s\n", cloud.provider, ["runtime=native"]
    )
    assert note is not None and "61.5s" in note
    assert f"image build {cloud.provider} -o runtime=native" in note


async def test_builder_provisioning_failure_leaves_nothing_but_its_log(cloud):
    options = {**cloud.options, **NATIVE, "python": "/nonexistent/python3"}
    # DigitalOcean's API has no console: a failed builder stays on until the deadline.
    consoles = cloud.provider != "digitalocean"
    if not consoles:
        options["boot_timeout"] = "8s"
    expected = "provisioning failed.*python-env" if consoles else "did not finish"
    with pytest.raises(BuildError, match=expected) as failed:
        await build(cloud.cls, options, poll_interval=0.5)
    (log,) = _build_logs()
    assert str(log) in str(failed.value)
    if consoles:
        assert "python-env: FAILED" in log.read_text()
    assert cloud.images() == [] and cloud.resources() == [] and cloud.snapshots() == []


async def test_image_api_refusal_leaves_nothing(cloud):
    cloud.fail_image()
    with pytest.raises(BuildError):
        await build(cloud.cls, {**cloud.options, **NATIVE}, poll_interval=0.5)
    assert cloud.images() == [] and cloud.resources() == [] and cloud.snapshots() == []


@pytest.mark.parametrize("cloud", CLI_CLOUDS, indirect=True)
def test_cli_build_list_cleanup_delete(cloud, tmp_path):
    options = cloud.cli_options()
    # The runtime from a dask config file, as a cluster would read it.
    config = tmp_path / "cluster.yaml"
    config.write_text(f"secure-cloud:\n  {cloud.provider}:\n    runtime: native\n")
    built = _cli(cloud, "image", "build", cloud.provider, *options, "--config", str(config))
    assert built.returncode == 0, built.stderr
    name = built.stdout.strip()
    assert cloud.images() == [name]
    assert cloud.snapshots() != [] or cloud.provider != "aws", "an AMI has its snapshot"

    listed = _cli(cloud, "image", "list", cloud.provider, *cloud.cli_options())
    assert listed.returncode == 0, listed.stderr
    assert name in listed.stdout
    # A DigitalOcean snapshot has no description: its name alone says what it holds.
    assert "native dask" in listed.stdout or cloud.provider == "digitalocean"

    # A cluster left behind: cleanup deletes it, never an image.
    shown = preview(cloud.cls, **cloud.options)
    asyncio.run(_prepare_only(shown.driver, "dsc-left-behind"))
    assert cloud.resources()
    clusters = _cli(cloud, "list", "--provider", cloud.provider, *cloud.cli_options())
    assert clusters.returncode == 0 and "dsc-left-behind" in clusters.stdout
    assert name not in clusters.stdout
    cleaned = _cli(
        cloud,
        "cleanup",
        "dsc-left-behind",
        "--yes",
        "--provider",
        cloud.provider,
        *cloud.cli_options(),
    )
    assert cleaned.returncode == 0, cleaned.stderr
    assert cloud.resources() == [] and cloud.images() == [name]

    refused = _cli(cloud, "image", "delete", cloud.provider, name, *options, stdin="n\n")
    assert refused.returncode == 1 and cloud.images() == [name]
    deleted = _cli(cloud, "image", "delete", cloud.provider, name, "--yes", *cloud.cli_options())
    assert deleted.returncode == 0, deleted.stderr
    assert cloud.images() == [] and cloud.snapshots() == []


async def _prepare_only(driver: Any, cluster_id: str) -> None:
    try:
        await driver.prepare(cluster_id)
    finally:
        await driver.close()


def test_the_hash_names_what_the_image_holds():
    from dask_secure_cloud.cloudinit import DockerRuntime, NativeRuntime

    native = imaging.Software.of(NativeRuntime(dask_version="1", distributed_version="1"))
    assert native == imaging.Software.of(NativeRuntime(dask_version="1", distributed_version="1"))
    others = [
        imaging.Software.of(NativeRuntime(dask_version="2", distributed_version="1")),
        imaging.Software.of(
            NativeRuntime(dask_version="1", distributed_version="1", pip_packages=("zarr",))
        ),
        imaging.Software.of(NativeRuntime(dask_version="1", distributed_version="1"), "ami-1"),
        imaging.Software.of(DockerRuntime("ghcr.io/dask/dask:1-py3.11")),
    ]
    assert len({native.digest, *(o.digest for o in others)}) == 5
    name = imaging.image_name(native.digest)
    assert imaging.parse_name(name)[0] == native.digest
    assert imaging.parse_name("ubuntu-24.04") is None


@pytest.mark.parametrize("cloud", ["aws"], indirect=True)
async def test_an_image_of_other_software_named_explicitly_provisions_as_usual(cloud):
    """A built image named as the image option boots as named; its record says it holds
    other software than the cluster's, so the VMs provision at boot as on a stock image.
    On EC2 alone: the boot script's check of the image's record is the same everywhere."""
    built = await build(cloud.cls, {**cloud.options, **NATIVE}, poll_interval=0.5)
    options = {**cloud.options, "ami": built.id, "runtime": "docker"}
    async with cloud.cls(asynchronous=True, n_workers=1, **options) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=60)
        assert cloud.launched() == built.id
        consoles = cloud.consoles(cluster.cluster_id)
        logs = [line for _, line in cluster._cluster_manager_logs]
    (note,) = [line for line in logs if "provisioning (" in line]
    assert "pull" in note and "dask secure-cloud image build aws" in note
    for name, console in consoles.items():
        assert "dask-secure-cloud: pull: done" in console, name
        assert "provisioned:" not in console, name


async def test_a_stock_boot_is_timed_once_with_the_command_that_saves_it(caplog):
    """What the cluster logs once its scheduler is up on a stock image: the provisioning
    steps' time (read off its console) and the build command; nothing on a built one."""
    from types import SimpleNamespace

    from dask_secure_cloud.cloudinit import NativeRuntime

    console = (
        "dask-secure-cloud: python-env: started\n"
        "dask-secure-cloud: python-env: done in 301.2s\n"
        "dask-secure-cloud: ready to start dask scheduler after 302.0s\n"
    )

    async def console_output(vm):
        return console

    driver = SimpleNamespace(
        provider="gcp",
        software=imaging.Software.of(NativeRuntime(dask_version="1", distributed_version="1")),
        built_image=None,
        console_output=console_output,
    )
    note = await imaging.note_provisioning(driver, None)
    assert note is not None and "301.2s provisioning (python-env 301.2s)" in note
    assert "`dask secure-cloud image build gcp`" in note
    driver.built_image = imaging.BuiltImage("x", "x", "x", datetime.datetime.now())
    assert await imaging.note_provisioning(driver, None) is None
