"""Attacks on what a cluster serves over HTTP: the client's dashboard proxy, and every
HTTP server on the VMs. One case per attack, each against a real ``LocalVMCluster``.

The proxy on ``127.0.0.1`` must serve only this machine's own pages: a web page that
re-points its own host name at ``127.0.0.1`` (DNS rebinding), or opens a websocket to
the proxy from its own origin, gets a 4xx from the proxy and never a connection to the
scheduler. On the VMs nothing may answer plain HTTP at a VM's address: a worker's
``/metrics``, ``/health`` and (when asked for) its dashboard listen on the VM's
loopback, which on a process VM is this machine's ``127.0.0.1``, while the VM's address
is its own ``127.x.y.z``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
from distributed import Client
from helpers import vm_processes
from tornado.websocket import websocket_connect

from dask_secure_cloud import LocalVMCluster, dashboard

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EVIL = "evil.example"


@dataclass
class Target:
    """A running cluster as a process (or a browser) on this machine sees it."""

    cluster: LocalVMCluster
    #: The dashboard proxy's port on 127.0.0.1.
    proxy_port: int
    #: The worker VM's own address, and the port of its Dask HTTP server.
    worker_host: str
    worker_http_port: int


def _target(cluster: LocalVMCluster) -> Target:
    with Client(cluster) as client:
        client.wait_for_workers(1, timeout=90)
        ((address, http_port),) = client.run(
            lambda dask_worker: dask_worker.http_server.port
        ).items()
    port = int(re.fullmatch(r"http://127\.0\.0\.1:(\d+)/status", cluster.dashboard_link)[1])
    return Target(cluster, port, address.split("//")[1].rsplit(":", 1)[0], http_port)


def _cluster(tmp_path_factory: pytest.TempPathFactory, **options: Any) -> Iterator[Target]:
    directory = tmp_path_factory.mktemp("vms")
    os.chmod(directory, 0o700)
    with LocalVMCluster(n_workers=1, directory=str(directory), **options) as cluster:
        yield _target(cluster)


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Iterator[Target]:
    """The defaults: the cluster's own CA, worker dashboards off."""
    yield from _cluster(tmp_path_factory)


@pytest.fixture(scope="module")
def target_with_worker_dashboard(tmp_path_factory) -> Iterator[Target]:
    yield from _cluster(tmp_path_factory, worker_options={"dashboard": True})


@pytest.fixture
def tunnels(monkeypatch) -> list[str]:
    """Every connection the proxy opens to the scheduler during the test."""
    opened: list[str] = []
    connect = dashboard.connect

    async def counting(address: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(address)
        return await connect(address, *args, **kwargs)

    monkeypatch.setattr(dashboard, "connect", counting)
    return opened


def complete(response: bytes) -> bool:
    """Whether ``response`` holds one whole HTTP response (a kept-alive connection does
    not close after it, and a websocket never goes quiet)."""
    end = response.find(b"\r\n\r\n")
    if end < 0:
        return False
    head_text, body = response[:end].lower(), response[end + 4 :]
    if statuses(response)[:1] in ([101], [204], [304]):
        return True
    if b"transfer-encoding: chunked" in head_text:
        return body.endswith(b"0\r\n\r\n")
    length = re.search(rb"content-length: *(\d+)", head_text)
    return length is not None and len(body) >= int(length[1])


def exchange(host: str, port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request`` and return the answer: up to the end of one whole response, or
    what came before the peer closed or went quiet for ``timeout`` seconds; ``b""`` when
    nothing listens."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return b""
    received = b""
    with sock:
        sock.sendall(request)
        try:
            while not complete(received) and (chunk := sock.recv(65536)):
                received += chunk
        except OSError:  # quiet, or reset
            pass
    return received


def head(path: str, host: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def websocket_upgrade(path: str, host: str, *extra: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return head(
        path,
        host,
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *extra,
    )


def statuses(response: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"(?:^|\r\n)HTTP/1\.1 (\d{3}) ", response)]


def assert_refused_by_proxy(response: bytes, tunnels: list[str]) -> None:
    """The proxy answered with a 4xx itself, and never contacted the scheduler."""
    assert statuses(response)[:1] and 400 <= statuses(response)[0] < 500, response[:300]
    assert b"dashboard proxy" in response, response[:300]
    assert tunnels == [], "the request reached the scheduler"


def assert_no_plain_http(host: str, port: int) -> None:
    for path in ("/metrics", "/health", "/status"):
        response = exchange(host, port, head(path, f"{host}:{port}"), timeout=5)
        assert not response.startswith(b"HTTP/"), f"{host}:{port}{path} answered plain HTTP"


# -- the attacks -------------------------------------------------------------------------------


def dns_rebinding_host(t: Target, tunnels: list[str]) -> None:
    """A page of evil.example re-points its name at 127.0.0.1 and reads the dashboard."""
    response = exchange("127.0.0.1", t.proxy_port, head("/status", f"{EVIL}:{t.proxy_port}"))
    assert_refused_by_proxy(response, tunnels)


def dns_rebinding_metrics(t: Target, tunnels: list[str]) -> None:
    path = "/individual-plots.json"
    response = exchange("127.0.0.1", t.proxy_port, head(path, f"{EVIL}:{t.proxy_port}"))
    assert_refused_by_proxy(response, tunnels)


def dns_rebinding_websocket(t: Target, tunnels: list[str]) -> None:
    """The same page opens Bokeh's websocket, same-origin under its own name."""
    origin = f"Origin: http://{EVIL}:{t.proxy_port}"
    request = websocket_upgrade("/status/ws", f"{EVIL}:{t.proxy_port}", origin)
    assert_refused_by_proxy(exchange("127.0.0.1", t.proxy_port, request), tunnels)


def cross_site_websocket(t: Target, tunnels: list[str]) -> None:
    """Any page may open a websocket to 127.0.0.1 (no same-origin rule for websockets,
    and Bokeh accepts every origin): the proxy refuses a foreign Origin."""
    request = websocket_upgrade(
        "/status/ws",
        f"127.0.0.1:{t.proxy_port}",
        f"Origin: http://{EVIL}",
        "Sec-WebSocket-Protocol: bokeh",
    )
    assert_refused_by_proxy(exchange("127.0.0.1", t.proxy_port, request), tunnels)


def null_origin_request(t: Target, tunnels: list[str]) -> None:
    """A sandboxed iframe or a file:// page sends ``Origin: null``."""
    request = head("/individual-plots.json", f"127.0.0.1:{t.proxy_port}", "Origin: null")
    assert_refused_by_proxy(exchange("127.0.0.1", t.proxy_port, request), tunnels)


def duplicate_host_header(t: Target, tunnels: list[str]) -> None:
    """Two Host headers: which one counts would be the server's guess."""
    request = head("/status", f"127.0.0.1:{t.proxy_port}", f"Host: {EVIL}")
    assert_refused_by_proxy(exchange("127.0.0.1", t.proxy_port, request), tunnels)


def keep_alive_host_switch(t: Target, tunnels: list[str]) -> None:
    """A first request with a good Host, answered; then another Host on the same
    connection."""
    with socket.create_connection(("127.0.0.1", t.proxy_port), timeout=10) as sock:
        sock.sendall(head("/health", f"127.0.0.1:{t.proxy_port}"))
        first = b""
        while not re.search(rb"\r\n\r\n.*ok", first, re.S):
            chunk = sock.recv(65536)
            assert chunk, first
            first += chunk
        assert statuses(first) == [200]
        sock.sendall(head("/health", f"{EVIL}:{t.proxy_port}"))
        rest = b""
        try:
            while chunk := sock.recv(65536):
                rest += chunk
        except OSError:
            pass
    assert not statuses(rest), rest[:300]
    assert len(tunnels) == 1


def worker_metrics_plain_http(t: Target, tunnels: list[str]) -> None:
    """Plain HTTP at the worker VM's address: /metrics tells what runs and how much."""
    response = exchange(t.worker_host, t.worker_http_port, head("/metrics", t.worker_host))
    assert not response.startswith(b"HTTP/"), response[:200]


def worker_health_plain_http(t: Target, tunnels: list[str]) -> None:
    response = exchange(t.worker_host, t.worker_http_port, head("/health", t.worker_host))
    assert not response.startswith(b"HTTP/"), response[:200]


def worker_dashboard_plain_http(t: Target, tunnels: list[str]) -> None:
    """worker_options={"dashboard": True}: the worker's pages, still not on the network."""
    assert_no_plain_http(t.worker_host, t.worker_http_port)


def any_vm_port_plain_http(t: Target, tunnels: list[str]) -> None:
    """Every port any process of any VM listens on, at any address but loopback."""
    listening = set()
    for pid in vm_processes(t.cluster.cluster_id):
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in connections:
            if c.status == psutil.CONN_LISTEN and c.laddr.ip != "127.0.0.1":
                listening.add((c.laddr.ip, c.laddr.port))
    assert len(listening) >= 3, listening  # the scheduler's, the nanny's, the worker's
    for host, port in sorted(listening):
        assert_no_plain_http("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)


ATTACKS: dict[str, tuple[Callable[[Target, list[str]], None], str]] = {
    "dns-rebinding-host": (dns_rebinding_host, "target"),
    "dns-rebinding-metrics": (dns_rebinding_metrics, "target"),
    "dns-rebinding-websocket": (dns_rebinding_websocket, "target"),
    "cross-site-websocket": (cross_site_websocket, "target"),
    "null-origin-request": (null_origin_request, "target"),
    "duplicate-host-header": (duplicate_host_header, "target"),
    "keep-alive-host-switch": (keep_alive_host_switch, "target"),
    "worker-metrics-plain-http": (worker_metrics_plain_http, "target"),
    "worker-health-plain-http": (worker_health_plain_http, "target"),
    "worker-dashboard-plain-http": (worker_dashboard_plain_http, "target_with_worker_dashboard"),
    "any-vm-port-plain-http": (any_vm_port_plain_http, "target"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_is_refused(attack: str, request: pytest.FixtureRequest, tunnels) -> None:
    run, fixture = ATTACKS[attack]
    t = request.getfixturevalue(fixture)
    tunnels.clear()  # starting the cluster is not the attack
    run(t, tunnels)


# -- what must keep working ------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(("Host: 127.0.0.1:{port}",), id="ip"),
        pytest.param(("Host: localhost:{port}",), id="localhost"),
        pytest.param(("Host: LocalHost",), id="localhost-no-port"),
        pytest.param(("Host: [::1]:{port}", "Origin: http://[::1]:{port}"), id="ipv6"),
        # jupyter-server-proxy (the JupyterLab Dask extension's panes) forwards the
        # browser's own headers: Jupyter's Host and Origin, and its context headers.
        pytest.param(
            (
                "Host: localhost:8888",
                "Origin: http://localhost:8888",
                "X-Forwarded-Context: /proxy/{port}",
                "X-ProxyContextPath: /proxy/{port}",
            ),
            id="jupyter-server-proxy",
        ),
    ],
)
def test_loopback_names_are_served(headers, target, tunnels) -> None:
    port = target.proxy_port
    host, *extra = (h.format(port=port) for h in headers)
    plots = exchange("127.0.0.1", port, head("/individual-plots.json", host.split(": ")[1], *extra))
    assert statuses(plots) == [200] and b"/individual-task-stream" in plots
    page = exchange("127.0.0.1", port, head("/status", host.split(": ")[1], *extra))
    token = re.search(rb'"token":\s*"([^"]+)"', page)[1].decode()
    upgrade = websocket_upgrade(
        "/status/ws", host.split(": ")[1], *extra, f"Sec-WebSocket-Protocol: bokeh, {token}"
    )
    assert statuses(exchange("127.0.0.1", port, upgrade, timeout=5))[:1] == [101]


@pytest.fixture
def jupyter_server(tmp_path) -> Iterator[tuple[str, str]]:
    """A real Jupyter server on 127.0.0.1 with jupyter-server-proxy, the way the
    JupyterLab Dask extension reaches dashboards: its base URL and token."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = base64.b32encode(os.urandom(10)).decode()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path), "JUPYTER_CONFIG_DIR": str(tmp_path)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--no-browser",
            "--allow-root",  # a CI container runs as root
            # Only the extensions on the dashboard's path; none that looks anything up.
            "--ServerApp.jpserver_extensions="
            "{'jupyterlab': False, 'jupyter_lsp': False, 'notebook_shim': False}",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={tmp_path}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "no Jupyter"
                time.sleep(0.3)
        yield base, token
    finally:
        server.terminate()
        server.wait(30)


def test_dashboard_through_jupyter_server_proxy(target, jupyter_server) -> None:
    """jupyter-server-proxy forwards the browser's Host (Jupyter's own, a loopback name
    here) and Origin: the panes and Bokeh's websocket work through it."""
    base, token = jupyter_server
    proxied = f"{base}/proxy/{target.proxy_port}"
    auth = {"Authorization": f"token {token}"}

    def get(path: str) -> bytes:
        request = urllib.request.Request(proxied + path, headers=auth)
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
            return response.read()

    assert "/individual-task-stream" in json.loads(get("/individual-plots.json")).values()
    page = get("/status")
    bokeh_token = re.search(rb'"token":\s*"([^"]+)"', page)[1].decode()

    async def websocket() -> str:
        url = proxied.replace("http://", "ws://") + f"/status/ws?token={token}"
        ws = await websocket_connect(url, subprotocols=["bokeh", bokeh_token])
        try:
            return await asyncio.wait_for(ws.read_message(), 20)
        finally:
            ws.close()

    assert '"msgtype": "ACK"' in asyncio.run(websocket())
