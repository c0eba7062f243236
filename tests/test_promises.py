"""Promises of README.md and docs/ that no other test held to: each case fails if the
promise breaks.

- The defaults the docs state: ``certificate_lifetime`` 4 hours, ``max_lifetime`` 7 days,
  ``certificate_warning`` 1 hour, ``lease_timeout`` 20 minutes, read from what a cluster
  of each provider would actually make, and Ubuntu 24.04 as every cloud's image.
- ``docs/api.rst``'s example: ``EC2Cluster(worker_public_ip=False)`` on a subnet whose
  only way out is an internet gateway is a ``ClusterStartError`` caused by a
  ``NoRouteOutError``, before anything is made.
- Azure's "no login": no password, and an SSH key whose private half nobody keeps.
- ``docs/boot.rst``'s boot script: a failed step powers the VM off 30 s later; Docker is
  installed waiting for the package lock; the pull is retried within limits, a missing
  tag is not; a baked native image's ``python-env`` step takes well under a second.

The boot script runs here under ``sh`` in a sandbox: its directory is under the test's
``tmp_path``, and ``shutdown``, ``poweroff``, ``systemctl``, ``apt-get``, ``docker`` and
``sleep`` are shims first on ``PATH`` that record their calls, so the script behaves as on
a cloud VM (``DSC_VM_ROOT`` unset) without touching this machine.
"""

from __future__ import annotations

import datetime
import gc
import json
import re
import shutil
import stat
import subprocess
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from helpers import decoded_files

from dask_secure_cloud import (
    AzureVMCluster,
    DropletCluster,
    EC2Cluster,
    GCPCluster,
    LocalVMCluster,
    SecureCloudError,
)
from dask_secure_cloud.bootscript import render_script
from dask_secure_cloud.cluster import ClusterStartError, VMCluster, preview
from dask_secure_cloud.credentials import CLOCK_SKEW, Role
from dask_secure_cloud.egress import NoRouteOutError
from dask_secure_cloud.options import resolve
from dask_secure_cloud.plan import BootPlanner
from dask_secure_cloud.providers.azure import identity as azure_provider

from standins import start_ec2, stop_ec2

pytestmark = pytest.mark.timeout(300)
HOUR = datetime.timedelta(hours=1)

#: Enough for each class to be built offline (nothing is called).
CLASSES: dict[str, tuple[type, dict[str, Any]]] = {
    "local": (LocalVMCluster, {}),
    "aws": (EC2Cluster, {}),
    "gcp": (GCPCluster, {"project": "demo-project"}),
    "azure": (AzureVMCluster, {"resource_group": "dask-rg", "subscription_id": "sub"}),
    "digitalocean": (DropletCluster, {"token": "dop_v1_x"}),
}


@pytest.fixture(autouse=True)
def _offline_gcp(monkeypatch: pytest.MonkeyPatch) -> None:
    """google-auth finds no credentials here; give GCPCluster an anonymous one."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials

    monkeypatch.setattr(
        google.auth, "default", lambda *a, **k: (AnonymousCredentials(), "demo-project")
    )


def _planner(provider: str) -> BootPlanner:
    """What a cluster of ``provider`` decides from its defaults, as ``preview`` and a
    start build it: resolved options (dask config included), driver, credentials."""
    cls, required = CLASSES[provider]
    options, driver = cls.setup(resolve(cls.Options, dict(required), owner=cls.__name__))
    return BootPlanner(options, "dsc-defaults", driver, native_python=cls.native_python(options))


def _lifetime(cert_pem: str | bytes) -> datetime.timedelta:
    from cryptography import x509

    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    cert = x509.load_pem_x509_certificate(data)
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def _near(value: datetime.timedelta, expected: datetime.timedelta) -> bool:
    """``expected``, plus the clock skew a certificate's start is back-dated by, to the
    second a certificate holds."""
    return abs(value - (expected + CLOCK_SKEW)) <= datetime.timedelta(seconds=2)


# -- the documented defaults ------------------------------------------------------------


@pytest.mark.parametrize("provider", sorted(CLASSES))
def test_a_vms_certificate_lives_4_hours_by_default(provider: str) -> None:
    """README and security.rst: ``certificate_lifetime`` default 4 hours, the life of
    what the client signs for a booting VM."""
    planner = _planner(provider)
    assert planner.options.certificate_lifetime == 4 * HOUR
    assert planner.enrollment is not None
    key = ec.generate_private_key(ec.SECP256R1())  # any VM's key: only dates are read
    cert_pem, _ = planner.enrollment.sign(Role.WORKER, "worker-0", key.public_key())
    assert _near(_lifetime(cert_pem), 4 * HOUR)
    # The client's own certificate lives as long.
    assert _near(_lifetime(planner.credentials.client.cert_pem), 4 * HOUR)


@pytest.mark.parametrize("provider", sorted(CLASSES))
def test_the_ca_lives_7_days_and_the_client_warns_1_hour_before(provider: str) -> None:
    """README and security.rst: ``max_lifetime`` default 7 days (the CA's life, so the
    cluster's), ``certificate_warning`` default 1 hour."""
    planner = _planner(provider)
    assert planner.options.max_lifetime == 7 * 24 * HOUR
    assert planner.options.certificate_warning == HOUR
    assert _near(_lifetime(planner.credentials.ca_cert_pem), 7 * 24 * HOUR)
    # The cluster's expiry check with these options: silent at 61 minutes, warns at 59.
    for left, warns in ((61, False), (59, True)):
        cluster = SimpleNamespace(
            _credentials=SimpleNamespace(remaining=lambda left=left: left * HOUR / 60),
            _expiry_warned=False,
            options=planner.options,
            cluster_id="dsc-defaults",
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            VMCluster._check_expiry(cluster)
        assert bool(caught) is warns, (left, caught)


@pytest.mark.parametrize("provider", sorted(CLASSES))
def test_the_schedulers_lease_is_20_minutes_by_default(provider: str) -> None:
    """security.rst: with nobody renewing it for ``lease_timeout`` (default 20 minutes)
    the scheduler ends: read from the lease preload its user-data ships."""
    planner = _planner(provider)
    assert planner.options.lease_timeout == datetime.timedelta(minutes=20)
    files = decoded_files(planner.user_data_now[Role.SCHEDULER])
    (lease,) = [body for path, body in files.items() if path.endswith("/lease.py")]
    assert re.search(rb"^LEASE_SECONDS = 1200$", lease, re.MULTILINE), lease[:400]
    worker_files = decoded_files(planner.user_data_now[Role.WORKER])
    assert not [path for path in worker_files if path.endswith("/lease.py")]


#: provider -> the option naming its image, and Ubuntu 24.04 LTS as that cloud names it.
UBUNTU_2404 = {
    "gcp": ("source_image", "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64"),
    "azure": ("image", "Canonical:ubuntu-24_04-lts:server:latest"),
    "digitalocean": ("image", "ubuntu-24-04-x64"),
}


@pytest.mark.parametrize("provider", sorted(UBUNTU_2404))
def test_the_default_image_is_ubuntu_24_04(provider: str) -> None:
    """boot.rst: every VM starts from Ubuntu 24.04 by default."""
    option, expected = UBUNTU_2404[provider]
    assert getattr(_planner(provider).options, option) == expected


async def test_ec2s_default_image_is_the_newest_official_ubuntu_24_04() -> None:
    """boot.rst, and aws.rst: with no ``ami``, the newest official (Canonical's) Ubuntu
    24.04 LTS AMI of the region, for the workers' architecture."""
    driver = preview(EC2Cluster).driver
    assert driver.ami is None
    asked: list[dict[str, Any]] = []

    async def describe_images(operation: str, **kwargs: Any) -> dict[str, Any]:
        asked.append({"operation": operation, **kwargs})
        return {
            "Images": [
                {"ImageId": "ami-new", "CreationDate": "2026-11-01T00:00:00.000Z"},
                {"ImageId": "ami-old", "CreationDate": "2024-05-01T00:00:00.000Z"},
            ]
        }

    driver._call = describe_images
    await driver._resolve_ami()
    assert driver.ami == "ami-new"
    (call,) = asked
    assert call["Owners"] == ["099720109477"]  # Canonical
    names = [f["Values"] for f in call["Filters"] if f["Name"] == "name"]
    assert names == [["ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-amd64-server-*"]]


# -- the documented error of a network with no way out ------------------------------------


def _refused_for_no_route_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BaseException:
    """api.rst's example against the EC2 stand-in: ``EC2Cluster(worker_public_ip=False)``
    on a subnet whose only way out is an internet gateway. Nothing may be made."""
    stand_in, _, options = start_ec2(tmp_path, monkeypatch, way_out="internet")
    try:
        stand_in.calls.clear()
        with pytest.raises(SecureCloudError) as info:
            EC2Cluster(n_workers=1, worker_public_ip=False, **options)
        assert stand_in.mutations == []
    finally:
        stop_ec2(stand_in)
    assert isinstance(info.value, ClusterStartError)
    return info.value


def _causes(error: BaseException) -> list[BaseException]:
    chain = []
    while error.__cause__ is not None:
        error = error.__cause__
        chain.append(error)
    return chain


def test_no_route_out_is_a_start_error_caused_by_no_route_out_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """api.rst: a ``ClusterStartError`` (a ``SecureCloudError``) with nothing created,
    caused by the ``NoRouteOutError`` that names the subnet."""
    error = _refused_for_no_route_out(tmp_path, monkeypatch)
    (cause,) = [e for e in _causes(error) if isinstance(e, NoRouteOutError)]
    assert "subnet subnet-" in str(cause)


def test_the_start_errors_direct_cause_is_the_no_route_out_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """api.rst's example reads ``e.__cause__`` as the NoRouteOutError itself."""
    error = _refused_for_no_route_out(tmp_path, monkeypatch)
    assert isinstance(error.__cause__, NoRouteOutError), repr(error.__cause__)


# -- Azure: no login ----------------------------------------------------------------------


@pytest.mark.slow
async def test_azure_vms_have_no_password_and_nobody_keeps_the_ssh_keys_private_half(
    azure, monkeypatch, tmp_path
) -> None:
    """README and azure.rst: "no login": no password, and an SSH key whose private half
    was never stored. The one key generated is watched: the VMs carry its public half
    only, and after the start nothing but this test holds the private key object, and its
    bytes are in no request, user-data, audit entry or file."""
    stand_in, options = azure
    generated: list[ed25519.Ed25519PrivateKey] = []
    real = ed25519.Ed25519PrivateKey.generate

    def generate() -> ed25519.Ed25519PrivateKey:
        key = real()
        generated.append(key)
        return key

    watched = SimpleNamespace(
        Ed25519PrivateKey=SimpleNamespace(generate=generate),
        Ed25519PublicKey=ed25519.Ed25519PublicKey,
    )
    monkeypatch.setattr(azure_provider, "ed25519", watched)
    async with AzureVMCluster(n_workers=1, asynchronous=True, **options) as cluster:
        vms = [b for kind, b in stand_in.bodies if kind == "virtualmachines"]
        assert len(vms) == 2
        assert len(generated) == 1
        public = (
            generated[0]
            .public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        for body in vms:
            os_profile = body["properties"]["osProfile"]
            assert "adminPassword" not in os_profile
            linux = os_profile["linuxConfiguration"]
            assert linux["disablePasswordAuthentication"] is True
            assert [k["keyData"] for k in linux["ssh"]["publicKeys"]] == [public]
        # Nothing in the client keeps the private key: only this test's list refers to it.
        gc.collect()
        assert gc.get_referrers(generated[0]) == [generated], "the private key is kept"
        cluster_id = cluster.cluster_id
    private = [
        generated[0]
        .private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        .hex(),
        generated[0]
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        .decode()
        .splitlines()[1],
    ]
    sent = json.dumps(stand_in.bodies)
    stored = [p.read_bytes().decode(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    for secret in private:
        assert secret not in sent
        assert not [text for text in stored if secret in text]
    assert not stand_in.tagged(cluster_id)


# -- the boot script, sandboxed -----------------------------------------------------------

#: Each shim appends ``NAME ARGS...`` to ``$SHIM_LOG``.
_RECORD = 'printf "%s\\n" "$(basename "$0") $*" >>"$SHIM_LOG"\n'
SHIMS = {
    # A power-off records and returns: this machine stays up.
    "shutdown": _RECORD,
    "poweroff": _RECORD,
    "halt": _RECORD,
    "reboot": _RECORD,
    "systemctl": _RECORD,
    # Records its pause, then waits $SHIM_SLEEP seconds (0 unless a test needs time to
    # pass for the boot deadline).
    "sleep": _RECORD + 'exec /bin/sleep "${SHIM_SLEEP:-0}"\n',
    # apt-get "installs" Docker by putting the docker shim in place.
    "apt-get": _RECORD
    + 'case " $* " in *" install "*) cp "$SHIM_DIR/docker.pending" "$SHIM_DIR/docker";; esac\n',
}
#: docker: ``info`` and ``--version`` answer; ``pull`` fails ``$PULL_FAILS`` times with
#: ``$PULL_ERROR``, then succeeds.
DOCKER = (
    _RECORD
    + """case "$1" in
  pull)
    n=$(cat "$SHIM_DIR/pulls" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" >"$SHIM_DIR/pulls"
    if [ "$n" -le "${PULL_FAILS:-0}" ]; then echo "$PULL_ERROR" >&2; exit 1; fi
    echo "sha256:0123";;
  --version) echo "Docker version 27.0.0";;
esac
exit 0
"""
)


class Sandbox:
    """A directory where a boot script runs as on a cloud VM, with recording shims."""

    def __init__(self, tmp_path: Path, *, docker_installed: bool) -> None:
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.home = tmp_path / "opt" / "dask-secure-cloud"
        self.log = tmp_path / "shim-calls.log"
        self.log.touch()
        for name, body in {**SHIMS, "docker.pending": DOCKER}.items():
            path = self.bin / name
            path.write_text("#!/bin/sh\n" + body)
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        if docker_installed:
            shutil.copy(self.bin / "docker.pending", self.bin / "docker")
        # No /usr/sbin (the real shutdown) and no /usr/local/bin (a real docker).
        self.path = f"{self.bin}:/usr/bin:/bin"
        for name in ("shutdown", "poweroff", "systemctl", "apt-get", "sleep"):
            found = shutil.which(name, path=self.path)
            assert found == str(self.bin / name), f"{name} would not be the shim: {found}"
        if not docker_installed:
            assert shutil.which("docker", path=self.path) is None

    def run(self, script: str, timeout: float = 30, **env: str) -> str:
        """Run ``script``, wait for what it left in the background; its console."""
        (self.bin.parent / "boot.sh").write_text(script)
        console = self.bin.parent / "console.log"
        environment = {
            "PATH": self.path,
            "HOME": str(self.bin.parent),
            "SHIM_LOG": str(self.log),
            "SHIM_DIR": str(self.bin),
            **env,
        }
        assert "DSC_VM_ROOT" not in environment
        with open(console, "w") as out:
            subprocess.run(
                ["sh", str(self.bin.parent / "boot.sh")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=environment,
                timeout=timeout,
                check=False,
            )
        return console.read_text()

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def wait_for_call(self, prefix: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not any(c.startswith(prefix) for c in self.calls()):
            assert time.monotonic() < deadline, f"no {prefix!r} in {self.calls()}"
            time.sleep(0.05)

    def step_log(self, step: str) -> str:
        return (self.home / "log" / f"{step}.log").read_text()


def _docker_script(sandbox: Sandbox, boot_timeout: float = 300, **kwargs: Any) -> str:
    return render_script(
        home=str(sandbox.home),
        header="a test VM",
        runtime="docker",
        boot_timeout=boot_timeout,
        launch="true",
        role="worker",
        image="ghcr.io/dask/dask:2099.1.0-py3.12",
        **kwargs,
    )


#: step that fails -> how to make it fail.
FAILING_STEPS: dict[str, dict[str, Any]] = {
    "pull": {"env": {"PULL_FAILS": "9", "PULL_ERROR": "manifest unknown"}},
    "docker-engine": {"docker_installed": False},
    "extra-bootstrap": {"script": {"extra_bootstrap": ["false"]}},
}


@pytest.mark.parametrize("step", sorted(FAILING_STEPS))
def test_a_failed_step_powers_the_vm_off_30_seconds_later(tmp_path: Path, step: str) -> None:
    """boot.rst: "When a step fails ... the VM powers itself off 30 seconds later"."""
    case = FAILING_STEPS[step]
    sandbox = Sandbox(tmp_path, docker_installed=case.get("docker_installed", True))
    if step == "docker-engine":  # apt-get fails: no Docker for this image
        (sandbox.bin / "apt-get").write_text("#!/bin/sh\n" + _RECORD + "exit 100\n")
    console = sandbox.run(_docker_script(sandbox, **case.get("script", {})), **case.get("env", {}))
    assert f"boot FAILED at step {step}" in console, console
    assert "dask-secure-cloud: powering off in 30s" in console, console
    sandbox.wait_for_call("shutdown")
    calls = sandbox.calls()
    power = calls.index("shutdown -h now")
    assert "sleep 30" in calls[:power], calls  # 30 s, then off
    assert (sandbox.home / "boot-failed").exists()


def test_docker_is_installed_waiting_for_the_package_lock(tmp_path: Path) -> None:
    """boot.rst: Docker from the distribution (``docker.io``) when the image lacks it,
    waiting for the dpkg lock that unattended upgrades hold on a first boot."""
    sandbox = Sandbox(tmp_path, docker_installed=False)
    console = sandbox.run(_docker_script(sandbox))
    assert "docker-engine: done" in console, console
    apt = [c for c in sandbox.calls() if c.startswith("apt-get ")]
    assert [c.split()[-1] for c in apt if " update" in c] == ["update"]
    (install,) = [c for c in apt if " install " in c]
    assert "docker.io" in install.split()
    for call in apt:  # every apt-get waits up to 5 minutes for the lock
        assert "DPkg::Lock::Timeout=300" in call, call
    assert "systemctl start docker" in sandbox.calls()


#: case -> (pull failures, error text, seconds each pause really takes, boot_timeout,
#: what the pull step's log says, how many pulls are made: None where the deadline
#: decides).
PULLS = {
    "retried-until-it-succeeds": (2, "connection reset by peer", "0", 300, "sha256:0123", 3),
    "gives-up-after-6-attempts": (99, "connection reset by peer", "0", 300, "after 6 attempts", 6),
    "gives-up-at-the-boot-deadline": (
        99,
        "connection reset by peer",
        "1",
        2,
        "boot deadline reached",
        None,
    ),
    "missing-tag-not-retried": (99, "manifest unknown", "0", 300, "does not exist", 1),
}


@pytest.mark.parametrize("case", sorted(PULLS))
def test_the_pull_is_retried_within_its_limits(tmp_path: Path, case: str) -> None:
    """boot.rst: the image is pulled with up to 6 attempts (pauses of 5, 10, 15, 20 and
    25 s) within ``boot_timeout``; a tag the registry does not have is not retried."""
    fails, error, pause, boot_timeout, says, pulls = PULLS[case]
    sandbox = Sandbox(tmp_path, docker_installed=True)
    sandbox.run(
        _docker_script(sandbox, boot_timeout=boot_timeout),
        PULL_FAILS=str(fails),
        PULL_ERROR=error,
        SHIM_SLEEP=pause,
    )
    log = sandbox.step_log("pull")
    assert says in log, log
    made = int((sandbox.bin / "pulls").read_text())
    if pulls is not None:
        assert made == pulls, log
    else:  # the deadline, not the count, ended it
        assert 2 <= made < 6, log
    # A pause after each failed attempt but the last (the power-off's 30 s aside).
    pauses = [c for c in sandbox.calls() if c.startswith("sleep ") and c != "sleep 30"]
    assert pauses == [f"sleep {5 * n}" for n in range(1, made)], log


def test_a_baked_native_image_skips_python_env_in_well_under_a_second(tmp_path: Path) -> None:
    """boot.rst: on an image whose ``python3`` has this client's exact dask and
    distributed, ``python-env`` prints ``already has dask X`` and takes well under a
    second. This interpreter is such an image."""
    sandbox = Sandbox(tmp_path, docker_installed=False)
    script = render_script(
        home=str(sandbox.home),
        header="a baked image",
        runtime="native",
        boot_timeout=60,
        launch="true",
        role="worker",
        python=sys.executable,
        want_dask=version("dask"),
        want_distributed=version("distributed"),
        power_off_on_exit=False,
    )
    console = sandbox.run(script)
    took = re.search(r"python-env: done in ([0-9.]+)s", console)
    assert took, console
    assert f"already has dask {version('dask')}" in sandbox.step_log("python-env")
    print(f"python-env on a baked image: {took.group(1)}s")
    assert float(took.group(1)) < 1.0, console
    assert not [c for c in sandbox.calls() if c.startswith("apt-get")]
    assert not (sandbox.home / "venv").exists()


# -- aws.rst's minimal permissions --------------------------------------------------------


def _documented_ec2_actions() -> set[str]:
    """The ``ec2:`` actions of the policy in ``docs/aws.rst``'s "Minimal permissions"."""
    text = (Path(__file__).parents[1] / "docs" / "aws.rst").read_text()
    section = text[text.index("Minimal permissions") :]
    block = section[section.index(".. code-block:: json") :]
    policy = json.loads(block[block.index("{") : block.index("\n\n", block.index("    }\n"))])
    actions: set[str] = set()
    for statement in policy["Statement"]:
        listed = statement["Action"]
        actions.update([listed] if isinstance(listed, str) else listed)
    return {a.removeprefix("ec2:") for a in actions if a.startswith("ec2:")}


@pytest.mark.slow
async def test_every_ec2_action_a_cluster_calls_is_in_the_documented_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aws.rst's policy lists every EC2 action a start, a scale-up and a close call (the
    stand-in enforces no IAM, so whether the policy suffices on AWS is not tested)."""
    stand_in, _, options = start_ec2(tmp_path, monkeypatch)
    try:
        stand_in.calls.clear()
        async with EC2Cluster(n_workers=1, asynchronous=True, **options) as cluster:
            cluster.scale(2)
            await cluster
        called = set(stand_in.calls)
    finally:
        stop_ec2(stand_in)
    assert {"RunInstances", "TerminateInstances", "CreateSecurityGroup"} <= called
    assert called - _documented_ec2_actions() == set()
