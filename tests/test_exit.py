"""A process that exits (normally, by SIGTERM, by SIGINT) closes the clusters it owns."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import vm_processes

from dask_secure_cloud.fleet import delete_cluster
from dask_secure_cloud.providers.local import LocalDriver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

#: The bound: from the signal (or the script's end) to no VM process left.
BOUND = 30.0

OWNER = textwrap.dedent(
    """
    import asyncio, sys, time
    from dask_secure_cloud import LocalVMCluster

    async def asynchronous():
        # As the JupyterLab extension does: on the loop of the program's main thread.
        cluster = await LocalVMCluster(n_workers=1, directory=sys.argv[1], asynchronous=True)
        print(cluster.cluster_id, flush=True)
        await asyncio.sleep(600)

    if sys.argv[2] == "async":
        asyncio.run(asynchronous())
    cluster = LocalVMCluster(n_workers=1, directory=sys.argv[1])
    print(cluster.cluster_id, flush=True)
    if sys.argv[2] == "wait":
        time.sleep(600)
    """
)


def _start(
    vm_dir: Path, mode: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(vm_dir), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert owner.stdout is not None
    cluster_id = owner.stdout.readline().strip()
    assert cluster_id.startswith("dsc-"), owner.communicate(timeout=60)
    return owner, cluster_id


def _kill(owner: subprocess.Popen[str], vm_dir: Path, cluster_id: str) -> None:
    """However the test ended: the owner is gone, and so are its VMs (through the driver,
    as ``dask secure-cloud cleanup`` would), so that a failure leaks nothing."""
    owner.kill()
    owner.wait()
    asyncio.run(delete_cluster(LocalDriver(vm_dir, None), cluster_id))


def _ended(owner: subprocess.Popen[str], cluster_id: str, since: float) -> str:
    """Wait for the owner to end and its VMs to be gone, within the bound; its stderr."""
    _, stderr = owner.communicate(timeout=BOUND)
    while vm_processes(cluster_id):
        assert time.monotonic() - since < BOUND, f"VMs left: {stderr}"
        time.sleep(0.2)
    return stderr


@pytest.mark.parametrize(
    ("sig", "mode"),
    [(signal.SIGTERM, "wait"), (signal.SIGINT, "wait"), (signal.SIGTERM, "async")],
)
def test_signal_closes_owned_clusters(vm_dir, sig, mode):
    owner, cluster_id = _start(vm_dir, mode)
    try:
        assert vm_processes(cluster_id)
        sent = time.monotonic()
        owner.send_signal(sig)
        stderr = _ended(owner, cluster_id, sent)
        took = time.monotonic() - sent
        assert not list((vm_dir / cluster_id).glob("*")), "VM directories left"
    finally:
        _kill(owner, vm_dir, cluster_id)
    assert f"Closed cluster {cluster_id}" in stderr, stderr
    if mode == "async":  # closed on the loop the signal interrupted, that the SDKs use
        assert f"received {sig.name}: closing its clusters {cluster_id}" in stderr, stderr
    # The process still dies of the signal (SIGINT: Python re-raises it after the
    # KeyboardInterrupt, with the clusters closed in between by atexit).
    assert owner.returncode == -sig, stderr
    print(f"{sig.name} ({mode}): closed in {took:.1f}s")


def test_normal_exit_closes_owned_clusters(vm_dir):
    owner, cluster_id = _start(vm_dir, "exit")
    try:
        stderr = _ended(owner, cluster_id, time.monotonic())
    finally:
        _kill(owner, vm_dir, cluster_id)
    assert owner.returncode == 0, stderr
    assert f"Closed cluster {cluster_id}" in stderr, stderr


def test_a_handler_the_program_set_is_kept(vm_dir):
    """A program's own SIGTERM handler is not replaced: it runs, and the exit it makes
    closes the clusters (through ``atexit``)."""
    script = textwrap.dedent(
        """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: (print("own handler", flush=True), sys.exit(3)))
        from dask_secure_cloud import LocalVMCluster

        cluster = LocalVMCluster(n_workers=0, directory=sys.argv[1])
        print(cluster.cluster_id, flush=True)
        time.sleep(600)
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(vm_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    cluster_id = owner.stdout.readline().strip()
    try:
        assert vm_processes(cluster_id)
        sent = time.monotonic()
        owner.send_signal(signal.SIGTERM)
        stderr = _ended(owner, cluster_id, sent)
    finally:
        _kill(owner, vm_dir, cluster_id)
    assert owner.returncode == 3, stderr
    assert f"Closed cluster {cluster_id}" in stderr, stderr
