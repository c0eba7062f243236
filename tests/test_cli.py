import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_a_tls_cluster_and_reports_every_peer(tmp_path):
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
    assert out.count("TLSv1.3") == 3  # the scheduler and both workers
    assert "/scheduler/scheduler" in out and "/worker/worker-0" in out and "/worker/worker-1" in out
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
