import os
import re
import subprocess
import sys

import pytest

from dask_secure_cloud import audit

pytestmark = pytest.mark.slow


def test_demo_runs_a_tls_cluster_and_reports_its_peers(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dask_secure_cloud", "demo", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "scheduler    tls://127." in out
    assert "pi ~ 3.1" in out
    assert out.count("TLSv1.3") == 1  # this client talks to the scheduler alone
    assert "/scheduler/scheduler" in out
    assert "workers      worker-0, worker-1: each its own certificate" in out
    assert "/client/client" in out
    assert "teardown     every VM deleted" in out
    assert "PRIVATE KEY" not in out + result.stderr


def test_demo_without_tls():
    result = subprocess.run(
        [sys.executable, "-m", "dask_secure_cloud", "demo", "--workers", "1", "--insecure"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "tcp://" in result.stdout and "tls          off" in result.stdout


# -- list, cleanup, cloud-init, config ---------------------------------------------------

LIVE_CLUSTER = """
import sys, time
from dask_secure_cloud import {cls}
cluster = {cls}(n_workers=1, {args})
print(cluster.cluster_id, flush=True)
time.sleep(600)
"""


def _start_and_kill(cls: str, args: str, env: dict[str, str], prefix: str = "dsc-") -> str:
    """Start a cluster in a child process, then kill the child as a crash would."""
    child = subprocess.Popen(
        [sys.executable, "-c", LIVE_CLUSTER.format(cls=cls, args=args)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        cluster_id = child.stdout.readline().strip()
        assert cluster_id.startswith(prefix), child.communicate(timeout=5)
    finally:
        child.kill()
        child.wait()
    return cluster_id


def _cli(*args: str, env: dict[str, str], stdin: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "dask_secure_cloud", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        input=stdin,
    )


def _row(listing: str, cluster_id: str) -> dict[str, str]:
    """``list``'s row of ``cluster_id``, by column: cells are two or more spaces apart."""
    lines = listing.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    row = next(line for line in lines if cluster_id in line)
    return dict(zip(header, re.split(r"\s{2,}", row.strip()), strict=True))


def test_list_and_cleanup_a_local_cluster_whose_client_was_killed(tmp_path, audit_log):
    from helpers import vm_processes

    env = {
        **os.environ,
        "DASK_SECURE_CLOUD__LOCAL__DIRECTORY": str(tmp_path / "vms"),
        "DASK_SECURE_CLOUD__AUDIT_LOG": str(audit_log),
    }
    cluster_id = _start_and_kill("LocalVMCluster", "", env)
    assert vm_processes(cluster_id)  # the orphan is still running

    listed = _cli("list", "--provider", "local", env=env)
    assert listed.returncode == 0, listed.stderr
    row = _row(listed.stdout, cluster_id)
    assert row["PROVIDER"] == "local" and row["VMS"] == "2"  # scheduler + 1 worker
    assert row["CLIENT"] == "gone"  # killed: nothing renews its lease
    assert row["BILLS"] == "2 running VM"  # its processes run on, until the lease ends
    assert "@" in row["CREATOR"]

    refused = _cli("cleanup", cluster_id, "--provider", "local", env=env, stdin="n\n")
    assert refused.returncode == 1 and "Nothing deleted" in refused.stdout
    assert vm_processes(cluster_id)

    done = _cli("cleanup", cluster_id, "--provider", "local", "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert "deleted 2 VM(s)" in done.stdout
    assert not vm_processes(cluster_id)
    assert cluster_id not in _cli("list", "--provider", "local", env=env).stdout
    events = [e for e in audit.read(audit_log) if e["cluster_id"] == cluster_id]
    assert events[0]["event"] == "created"
    assert events[-1]["event"] == "cleanup" and events[-1]["ok"] is True


@pytest.mark.parametrize("name", [None, "nightly-etl"])
def test_list_and_cleanup_on_digitalocean_after_the_client_was_killed(tmp_path, name):
    """A generated id, and one the user chose (only ``dsc-`` ids used to be listed)."""
    from clouds.booter import VMBooter
    from clouds.digitalocean import DigitalOceanStandIn

    token = "dop_v1_cli_test_token"
    stand_in = DigitalOceanStandIn(VMBooter(tmp_path / "vms"), token)
    url = stand_in.start()
    bundle = tmp_path / "ca.pem"
    stand_in.ca.cert_pem.write_to_path(str(bundle))
    env = {
        **os.environ,
        "DIGITALOCEAN_TOKEN": token,
        "DASK_SECURE_CLOUD__DIGITALOCEAN__API_URL": url,
        "DASK_SECURE_CLOUD__DIGITALOCEAN__CA_BUNDLE": str(bundle),
        "DASK_SECURE_CLOUD__DIGITALOCEAN__USE_PRIVATE_IP": "true",
        "DASK_SECURE_CLOUD__DIGITALOCEAN__BOOT_TIMEOUT": "60s",
        "DASK_SECURE_CLOUD__AUDIT_LOG": str(tmp_path / "audit.jsonl"),
    }
    try:
        if name is None:
            cluster_id = _start_and_kill("DropletCluster", "", env)
        else:
            cluster_id = _start_and_kill("DropletCluster", f"name={name!r}", env, prefix=name)
        assert len(stand_in.droplets) == 2

        listed = _cli("list", "--provider", "digitalocean", env=env)
        assert listed.returncode == 0, listed.stderr
        row = _row(listed.stdout, cluster_id)
        assert row["PROVIDER"] == "digitalocean" and row["VMS"] == "2"
        assert row["OTHER"].split()[0] == "3"  # its two firewalls and its VPC
        assert row["CLIENT"] == "gone" and row["BILLS"] == "2 running VM"

        refused = _cli("cleanup", cluster_id, "--provider", "digitalocean", env=env, stdin="n\n")
        assert refused.returncode == 1
        expired = _cli("cleanup", "--expired", "--provider", "digitalocean", env=env, stdin="n\n")
        assert expired.returncode == 1 and cluster_id in expired.stdout
        assert "client gone" in expired.stdout and "bills: 2 running VM" in expired.stdout
        assert len(stand_in.droplets) == 2 and stand_in.firewalls and stand_in.vpcs

        done = _cli("cleanup", "--older-than", "1s", "--provider", "digitalocean", "--yes", env=env)
        assert done.returncode == 0, done.stderr
        assert cluster_id in done.stdout
        assert not stand_in.droplets and not stand_in.firewalls and not stand_in.vpcs
        assert not stand_in.tags
    finally:
        stand_in.stop()


def test_cloud_init_prints_user_data_without_tokens_or_keys():
    """The cluster's own CA: no key in the user-data at all, and the token redacted."""
    result = _cli("cloud-init", "--role", "worker", env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("#cloud-config")
    assert "BEGIN CERTIFICATE" in result.stdout  # readable, decoded files (the CA's)
    assert "PRIVATE KEY" not in result.stdout
    assert '"token": "REDACTED"' in result.stdout
    assert "dask worker" in result.stdout or "distributed.cli.dask_worker" in result.stdout
    # EC2 gets it gzipped: shown inflated, just as readable.
    ec2 = _cli(
        "cloud-init", "--provider", "aws", "-o", "region=us-east-1", "-o", "ami=ami-12345678",
        env=dict(os.environ),
    )  # fmt: skip
    assert ec2.returncode == 0, ec2.stderr
    assert ec2.stdout.startswith("#cloud-config") and '"token": "REDACTED"' in ec2.stdout


def test_cloud_init_redacts_the_key_of_a_users_own_security(tmp_path):
    from dask_secure_cloud.cli import redact
    from dask_secure_cloud.cloudinit import BootPlan, NativeRuntime, render
    from dask_secure_cloud.credentials import ClusterCredentials, Role

    leaf = ClusterCredentials("mine").issue(Role.WORKER, "w")
    plan = BootPlan("mine", Role.WORKER, "w", ("worker", "tls://10.0.0.1:8786"),
                    NativeRuntime(), tls=leaf)  # fmt: skip
    shown = redact(render(plan))
    assert "REDACTED PRIVATE KEY" in shown and leaf.key_pem.splitlines()[1] not in shown


def test_cloud_init_refuses_a_bad_option_by_name():
    result = _cli("cloud-init", "-o", "n_workers=-1", env=dict(os.environ))
    assert result.returncode != 0 and "n_workers" in result.stderr


def test_config_shows_each_value_and_its_source(tmp_path):
    (tmp_path / "mine.yaml").write_text("secure-cloud:\n  aws:\n    region: eu-west-1\n")
    env = {
        **os.environ,
        "DASK_CONFIG": str(tmp_path),
        "DASK_SECURE_CLOUD__AWS__WORKER_SPOT": "true",
        "DIGITALOCEAN_TOKEN": "dop_v1_secret_value",
    }
    result = _cli("config", "aws", env=env)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "eu-west-1" in rows["region"] and str(tmp_path / "mine.yaml") in rows["region"]
    assert "environment DASK_SECURE_CLOUD__AWS__WORKER_SPOT" in rows["worker_spot"]
    assert "default" in rows["scheduler_port"]
    hidden = _cli(
        "config", "digitalocean", env={**env, "DASK_SECURE_CLOUD__DIGITALOCEAN__TOKEN": "abc123"}
    )
    assert "abc123" not in hidden.stdout and "(set, hidden)" in hidden.stdout


def test_config_refuses_a_misspelled_key(tmp_path):
    env = {**os.environ, "DASK_SECURE_CLOUD__AWS__REGOIN": "eu-west-1"}
    result = _cli("config", "aws", env=env)
    assert result.returncode != 0 and "Did you mean secure-cloud.aws.region" in result.stderr


def test_dask_cli_has_the_secure_cloud_group():
    result = subprocess.run(
        [sys.executable, "-m", "dask", "secure-cloud", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for command in ("demo", "list", "cleanup", "cloud-init", "config"):
        assert command in result.stdout
