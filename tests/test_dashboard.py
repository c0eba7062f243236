"""The dashboard only the client can open, and HTTP servers that listen on the VM only."""

import asyncio
import re
import ssl
import urllib.error
import urllib.request

import pytest
from distributed import Client
from distributed.security import Security
from tornado.websocket import websocket_connect

from dask_secure_cloud import LocalVMCluster, cloudinit
from dask_secure_cloud.cluster import preview
from dask_secure_cloud.credentials import ClusterCredentials, Role

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def fetch(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=20, context=context) as response:
        return response.status, response.read()


def tls_context(ca_pem: str, leaf=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.check_hostname = False
    if leaf is not None:
        ctx.load_cert_chain(*leaf)
    return ctx


def leaf_files(tmp_path, leaf) -> tuple[str, str]:
    cert, key = tmp_path / f"{leaf.name}.pem", tmp_path / f"{leaf.name}.key"
    cert.write_text(leaf.cert_pem)
    key.write_text(leaf.key_pem)
    return str(cert), str(key)


async def test_dashboard_is_served_to_this_client_alone(vm_dir, tmp_path):
    async with LocalVMCluster(n_workers=1, directory=vm_dir, asynchronous=True) as cluster:
        link = cluster.dashboard_link
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/status", link)
        # Through the proxy: the page, its data, and its websocket.
        status, page = await asyncio.to_thread(fetch, link)
        assert status == 200 and b"bokeh" in page.lower()
        status, metrics = await asyncio.to_thread(fetch, link.replace("/status", "/metrics"))
        assert status == 200 and b"dask_scheduler_workers" in metrics
        token = re.search(rb'"token":\s*"([^"]+)"', page).group(1).decode()
        ws = await websocket_connect(
            link.replace("http://", "ws://") + "/ws", subprotocols=["bokeh", token]
        )
        try:
            assert '"msgtype": "ACK"' in await asyncio.wait_for(ws.read_message(), 20)
        finally:
            ws.close()

        # The scheduler VM's HTTP server listens on the VM's loopback (this machine's
        # stands in for it), not at the VM's address. There, a browser, with or without
        # the CA, and a worker's certificate are refused; the client's is the control.
        credentials = cluster._credentials
        host = cluster.scheduler_address.split("//")[1].rsplit(":", 1)[0]
        port = cluster.scheduler_info["services"]["dashboard"]
        direct = f"https://127.0.0.1:{port}/status"
        ca = credentials.ca_cert_pem
        worker = leaf_files(tmp_path, credentials.issue(Role.WORKER, "worker-0"))
        client = leaf_files(tmp_path, credentials.issue(Role.CLIENT, "browser"))
        refusals = [
            (f"http://{host}:{port}/status", None),
            (f"https://{host}:{port}/status", tls_context(ca, client)),
            (f"http://127.0.0.1:{port}/status", None),
            (direct, tls_context(ca)),
            (direct, tls_context(ca, worker)),
        ]
        for url, context in refusals:
            with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
                await asyncio.to_thread(fetch, url, context)
        assert (await asyncio.to_thread(fetch, direct, tls_context(ca, client)))[0] == 200

        # The firewall opens only the scheduler's port: the dashboard needs no port.
        assert cluster.driver.ports == (cluster.options.scheduler_port,)
    assert cluster.dashboard_link == ""


async def test_worker_http_servers_listen_on_the_vm_only(vm_dir):
    async with LocalVMCluster(n_workers=1, directory=vm_dir, asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=60)
            ((address, bound),) = (
                await client.run(lambda dask_worker: dask_worker.http_server.address)
            ).items()
        # Loopback, on a process VM as on a cloud VM: never the VM's address.
        assert bound == "127.0.0.1" != address.split("//")[1].rsplit(":", 1)[0]
    files = cloudinit.parse(cluster.planner.user_data_now[Role.WORKER])["write_files"]
    (boot,) = [cloudinit.decode_file(f) for f in files if f["path"].endswith("boot.sh")]
    assert b'--dashboard-address "127.0.0.1:0"' in boot


def _dashboard_address(user_data: bytes) -> str:
    files = cloudinit.parse(user_data)["write_files"]
    (boot,) = [cloudinit.decode_file(f) for f in files if f["path"].endswith("boot.sh")]
    return re.search(rb'--dashboard-address "([^"]*)"', boot).group(1).decode()


def _own_security(tmp_path) -> Security:
    mine = ClusterCredentials("my-own-pki")
    paths = {}
    for leaf in (mine.issue(role, role.value) for role in Role):
        for kind, text in (("cert", leaf.cert_pem), ("key", leaf.key_pem)):
            path = tmp_path / f"{leaf.role.value}.{kind}"
            path.write_text(text)
            paths[f"tls_{leaf.role.value}_{kind}"] = str(path)
    (tmp_path / "ca.pem").write_text(mine.ca_cert_pem)
    return Security(tls_ca_file=str(tmp_path / "ca.pem"), require_encryption=True, **paths)


@pytest.mark.parametrize(
    ("security", "worker_dashboard", "scheduler", "worker"),
    [
        # The cluster's own CA: reached through the scheduler's tunnel, on any free port.
        pytest.param(True, False, "127.0.0.1:0", "127.0.0.1:0", id="own-ca"),
        pytest.param(True, True, "127.0.0.1:0", "127.0.0.1:0", id="own-ca-worker-dashboard"),
        pytest.param("given", True, "127.0.0.1:8787", "127.0.0.1:0", id="users-security"),
        # security=False: plain tcp:// everywhere, on trusted networks only; the
        # dashboards that were asked for are served at the VM's address, as plain.
        pytest.param(False, False, "${DSC_VM_ADDRESS:-}:8787", "127.0.0.1:0", id="no-tls"),
        pytest.param(
            False, True, "${DSC_VM_ADDRESS:-}:8787", "${DSC_VM_ADDRESS:-}:0", id="no-tls-dashboard"
        ),
    ],
)
def test_plain_http_servers_listen_on_loopback_unless_security_is_off(
    security, worker_dashboard, scheduler, worker, tmp_path
):
    """Dask's HTTP servers speak plain HTTP: with TLS (the cluster's CA or a user's own
    ``Security``) they listen on the VM's loopback, whatever ``worker_options`` say."""
    if security == "given":
        security = _own_security(tmp_path)
    found = preview(
        LocalVMCluster,
        security=security,
        worker_options={"dashboard": worker_dashboard},
        scheduler_port=8786,
        dashboard_port=8787,
        directory=str(tmp_path / "vms"),
    )
    assert _dashboard_address(found.user_data[Role.SCHEDULER]) == scheduler
    assert _dashboard_address(found.user_data[Role.WORKER]) == worker
