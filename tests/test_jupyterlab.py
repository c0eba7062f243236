"""The JupyterLab Dask extension's cluster manager drives our clusters from factory config."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import dask.config
import pytest
from dask.system import CPU_COUNT
from dask_labextension.manager import DaskClusterManager
from distributed import Client
from distributed.system import MEMORY_LIMIT
from helpers import vm_processes
from test_vmrunner import no_zombie_children, zombie_children
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from dask_secure_cloud import LocalVMCluster, audit
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.options import LocalOptions, resolve
from dask_secure_cloud.providers.local import _SharingPlanner, machine_share

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def _wait(predicate, timeout=90):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.5)


async def _drive(factory: dict) -> str:
    """Start, scale, adapt and close one cluster from the sidebar's calls; compute on it."""
    with dask.config.set({"labextension.factory": factory, "labextension.initial": []}):
        async with DaskClusterManager() as manager:
            model = await manager.start_cluster(configuration={"workers": 1})
            cluster = manager._clusters[model["id"]]
            assert model["scheduler_address"].startswith("tls://")
            assert model["name"].startswith(factory["class"])
            await _dashboard_panes_load(model["dashboard_link"])
            # Client(cluster) picks up the cluster's own TLS credentials.
            async with Client(cluster, asynchronous=True) as client:
                await client.wait_for_workers(1, timeout=90)
                assert await client.submit(lambda x: x + 1, 1) == 2
                model = await manager.scale_cluster(model["id"], 2)
                await client.wait_for_workers(2, timeout=90)
                assert manager.get_cluster(model["id"])["workers"] == 2
                model = manager.adapt_cluster(model["id"], 1, 3)
                assert model["adapt"] == {"minimum": 1, "maximum": 3}
                futures = client.map(lambda i: time.sleep(0.5) or i, range(40), pure=False)
                assert sum(await client.gather(futures)) == sum(range(40))
            cluster_id = cluster.cluster_id
            assert cluster.security is not None and cluster.security.require_encryption
            await manager.close_cluster(model["id"])
            assert manager.list_clusters() == []
    return cluster_id


async def _dashboard_panes_load(link: str) -> None:
    """What the extension's dashboard panes fetch, through the cluster's ``dashboard_link``:
    the list of plots, then one plot's page."""
    assert link.startswith("http://127.0.0.1:") and link.endswith("/status")
    base = link[: -len("/status")]

    def get(path: str) -> bytes:
        with urllib.request.urlopen(base + path, timeout=30) as response:
            assert response.status == 200
            return response.read()

    plots = json.loads(await asyncio.to_thread(get, "/individual-plots.json"))
    assert "/individual-task-stream" in plots.values()
    assert b"bokeh" in (await asyncio.to_thread(get, "/individual-task-stream")).lower()


async def test_lab_manager_drives_a_local_vm_cluster(vm_dir):
    cluster_id = await _drive(
        {
            "module": "dask_secure_cloud",
            "class": "LocalVMCluster",
            "args": [],
            "kwargs": {"directory": str(vm_dir)},
        }
    )
    await _wait(lambda: not vm_processes(cluster_id), timeout=30)


async def test_lab_manager_drives_an_azure_cluster(azure):
    stand_in, options = azure
    cluster_id = await _drive(
        {
            "module": "dask_secure_cloud",
            "class": "AzureVMCluster",
            "args": [],
            # Keys as they are written in YAML config files.
            "kwargs": {k.replace("_", "-"): v for k, v in options.items()},
        }
    )
    assert not stand_in.tagged(cluster_id) and not vm_processes(cluster_id)


# -- a real Jupyter server owning a cluster --------------------------------------------


class JupyterServer:
    """A Jupyter server on 127.0.0.1, as a user starts it, with the Dask extension's
    factory set as ``docs/jupyterlab.rst`` says (see :func:`local_factory`)."""

    def __init__(
        self, tmp_path: Path, factory: dict[str, Any], app: str = "jupyter_server"
    ) -> None:
        config = tmp_path / "dask-config"
        config.mkdir()
        (config / "labextension.yaml").write_text(
            json.dumps({"labextension": {"factory": factory, "initial": []}})
        )
        root = tmp_path / "notebooks"
        root.mkdir()
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "jupyter.log"
        self.audit_log = tmp_path / "audit.jsonl"
        env = {
            **loader_env(),
            "DASK_CONFIG": str(config),
            "DASK_SECURE_CLOUD__AUDIT_LOG": str(self.audit_log),
            "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
        }
        # JupyterLab asks nothing of the network: no news, update or extension checks.
        lab = (
            [
                "--LabApp.news_url=",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                "--LabApp.extension_manager=readonly",
                # A fresh layout and settings: nothing from the user's own JupyterLab.
                f"--LabApp.workspaces_dir={tmp_path / 'lab-workspaces'}",
                f"--LabApp.user_settings_dir={tmp_path / 'lab-settings'}",
            ]
            if app == "jupyterlab"
            else []
        )
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    app,
                    "--no-browser",
                    "--allow-root",
                    "--ip=127.0.0.1",
                    f"--port={self.port}",
                    f"--IdentityProvider.token={self.token}",
                    f"--ServerApp.root_dir={root}",
                    "--ServerApp.disable_check_xsrf=True",
                    *lab,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                self.request("GET", "/api/status")
                break
            except OSError:
                assert time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.5)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read()
        return json.loads(text) if text else None

    def close(self) -> None:
        """End the server however the test ended: SIGTERM first, so that it closes its
        clusters even when the test failed, then SIGKILL if it would not stop."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.stop(signal.SIGTERM)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def loader_env() -> dict[str, str]:
    """The environment for this user's other processes. ``pip install .`` installs the
    dask config that names the security loader (``etc/dask``); an editable install (CI's
    ``pip install -e``) does not install data files, so there the tests name it."""
    env = dict(os.environ)
    if dask.config.get("distributed.client.security-loader", None) is None:
        env["DASK_DISTRIBUTED__CLIENT__SECURITY_LOADER"] = (
            "dask_secure_cloud.loader.security_loader"
        )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


COMPUTE = """
import sys
from distributed import Client

with Client(sys.argv[1], timeout=60) as client:
    print(client.submit(sum, [1, 2]).result(timeout=60), flush=True)
"""


def local_factory(vm_dir: Path) -> dict[str, Any]:
    """``docs/jupyterlab.rst``'s factory, with the test's VM directory."""
    return {
        "module": "dask_secure_cloud",
        "class": "LocalVMCluster",
        "args": [],
        "kwargs": {"directory": str(vm_dir)},
    }


def test_sigterm_to_jupyter_server_closes_its_clusters(tmp_path, vm_dir):
    """The sidebar's "+ NEW" (its REST call) makes a cluster in the Jupyter server, on
    its event loop; a process beside it connects by address; SIGTERM to the server
    leaves no VM."""
    server = JupyterServer(tmp_path, local_factory(vm_dir))
    try:
        model = server.request("PUT", "/dask/clusters")  # what "+ NEW" sends
        address = model["scheduler_address"]
        assert address.startswith("tls://")
        server.request("PATCH", f"/dask/clusters/{model['id']}", {"workers": 1})
        (cluster_id,) = [
            e["cluster_id"] for e in audit.read(server.audit_log) if e["event"] == "created"
        ]
        assert vm_processes(cluster_id)
        # Another process of this user computes on it by address alone.
        done = subprocess.run(
            [sys.executable, "-c", COMPUTE, address],
            capture_output=True,
            text=True,
            timeout=150,
            env=loader_env(),
        )
        assert done.stdout.strip() == "3", done.stderr
        sent = time.monotonic()
        server.stop(signal.SIGTERM)
        while vm_processes(cluster_id):
            assert time.monotonic() - sent < 60, server.log.read_text()
            time.sleep(0.2)
        took = time.monotonic() - sent
    finally:
        server.close()
    log = server.log.read_text()
    assert f"Closed cluster {cluster_id}" in log, log
    print(f"SIGTERM to no VM left: {took:.1f}s")


# -- scaling from zero, as the sidebar does (issue 25, item 4) ----------------------------


def test_machine_share_splits_cores_and_memory_between_worker_processes():
    gib = 1 << 30
    assert machine_share({}, 3, cores=2, memory=24 * gib) == {
        "nthreads": 1,
        "memory_limit": 8 * gib,
    }
    assert machine_share({}, 2, cores=8, memory=8 * gib) == {"nthreads": 4, "memory_limit": 4 * gib}
    # Before any worker is asked for, one worker's share: the whole machine.
    assert machine_share({}, 0, cores=2, memory=gib) == {"nthreads": 2, "memory_limit": gib}
    # nworkers processes per VM share that VM's part.
    assert machine_share({"nworkers": 2}, 2, cores=8, memory=8 * gib) == {
        "nthreads": 2,
        "memory_limit": 2 * gib,
    }
    # What the user set is theirs; "auto" processes are sized by Dask itself.
    assert machine_share({"nthreads": 4, "memory-limit": "2GB"}, 3) == {}
    assert machine_share({"memory_limit": "2GB"}, 2, cores=8) == {"nthreads": 4}
    assert machine_share({"nworkers": "auto"}, 2) == {}


def _worker_flags(planner: Any) -> list[str]:
    command = planner.plan(Role.WORKER, "worker-9", "tls://127.0.0.1:8786").command
    return list(command[2:])  # after "worker" and the scheduler's address


def test_a_worker_vm_gets_its_share_at_the_cluster_size_when_it_is_made(tmp_path):
    """The planner of ``LocalVMCluster`` asks the cluster's size as each worker VM is
    made: started with none and scaled to three, as started with three."""
    options, driver = LocalVMCluster.setup(
        resolve(LocalOptions, {"directory": str(tmp_path)}, owner="test")
    )
    size = [0]
    planner = _SharingPlanner(
        options, "dsc-test", driver, native_python=sys.executable, workers=lambda: size[0]
    )
    size[0] = 3
    share = machine_share({}, 3)
    flags = _worker_flags(planner)
    assert ["--nthreads", str(share["nthreads"])] == flags[flags.index("--nthreads") :][:2]
    assert ["--memory-limit", str(share["memory_limit"])] == (
        flags[flags.index("--memory-limit") :][:2]
    )
    started_with_three = _SharingPlanner(
        dataclasses.replace(options, n_workers=3),
        "dsc-test",
        driver,
        native_python=sys.executable,
        workers=lambda: 3,
    )
    assert _worker_flags(started_with_three) == flags
    # The scheduler is not a worker; and what worker_options set is left alone.
    assert "--nthreads" not in planner.plan(Role.SCHEDULER, "scheduler", None).command
    own = _SharingPlanner(
        dataclasses.replace(options, worker_options={"nthreads": 7, "memory_limit": "1GB"}),
        "dsc-test",
        driver,
        native_python=sys.executable,
        workers=lambda: 3,
    )
    assert _worker_flags(own).count("--nthreads") == 1
    assert "7" in _worker_flags(own) and "1GB" in _worker_flags(own)


async def test_scaled_from_zero_workers_split_the_machine_and_leave_no_zombie(vm_dir):
    """The sidebar's way: no worker at the start, then "scale to 3". Each worker gets a
    third of the memory and its share of the cores (never more cores than the machine
    has, unless there are more workers than cores: one thread each); and no shell of a
    VM's boot is left ``<defunct>`` under this process."""
    before = zombie_children()
    async with LocalVMCluster(n_workers=0, directory=vm_dir, asynchronous=True) as cluster:
        cluster.scale(3)
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(3, timeout=120)
            workers = await client.run_on_scheduler(
                lambda dask_scheduler: [
                    {"nthreads": w.nthreads, "memory_limit": w.memory_limit}
                    for w in dask_scheduler.workers.values()
                ]
            )
        share = machine_share({}, 3)
        assert [w["nthreads"] for w in workers] == [share["nthreads"]] * 3
        assert [w["memory_limit"] for w in workers] == [share["memory_limit"]] * 3
        assert sum(w["nthreads"] for w in workers) <= max(CPU_COUNT, 3)
        assert sum(w["memory_limit"] for w in workers) <= MEMORY_LIMIT
        assert await asyncio.to_thread(no_zombie_children, 5.0, before), zombie_children()
        cluster_id = cluster.cluster_id
    await _wait(lambda: not vm_processes(cluster_id), timeout=30)
    assert await asyncio.to_thread(no_zombie_children, 5.0, before), zombie_children()


# -- the panes with TLS off (issue 25, item 5) ------------------------------------------


def test_dashboard_panes_through_jupyter_with_security_false(tmp_path, vm_dir):
    """With ``security=False`` the dashboard is plain HTTP at the scheduler's address
    (``127.x.y.1``), which jupyter-server-proxy refuses (403): ``dashboard_link`` is the
    cluster's relay on ``127.0.0.1``, and the panes load through the Jupyter server, the
    Bokeh websocket included."""
    factory = local_factory(vm_dir)
    factory["kwargs"]["security"] = False
    server = JupyterServer(tmp_path, factory)
    try:
        model = server.request("PUT", "/dask/clusters")  # what "+ NEW" sends
        assert model["scheduler_address"].startswith("tcp://")
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/status", model["dashboard_link"])
        pane = f"/dask/dashboard/{model['id']}"
        plots = json.loads(_get(server, f"{pane}/individual-plots.json"))
        assert "/individual-task-stream" in plots.values()
        page = _get(server, f"{pane}/individual-task-stream")
        bokeh = re.search(rb'"token":\s*"([^"]+)"', page)[1].decode()

        async def websocket() -> str:
            url = server.url.replace("http://", "ws://") + f"{pane}/individual-task-stream/ws"
            request = HTTPRequest(url, headers={"Authorization": f"token {server.token}"})
            ws = await websocket_connect(request, subprotocols=["bokeh", bokeh])
            try:
                return await asyncio.wait_for(ws.read_message(), 20)
            finally:
                ws.close()

        assert '"msgtype": "ACK"' in asyncio.run(websocket())
        server.request("DELETE", f"/dask/clusters/{model['id']}")  # SHUTDOWN
        assert not [p for p in vm_dir.iterdir() if vm_processes(p.name)]
    finally:
        server.close()


def _get(server: JupyterServer, path: str) -> bytes:
    request = urllib.request.Request(
        server.url + path, headers={"Authorization": f"token {server.token}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        return response.read()
