"""The dashboard only the client can open, and HTTP servers that listen on the VM only."""

import asyncio
import re
import ssl
import urllib.error
import urllib.request

import pytest
from distributed import Client
from tornado.websocket import websocket_connect

from dask_secure_cloud import LocalVMCluster, cloudinit
from dask_secure_cloud.credentials import Role

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

        # At the scheduler VM's own HTTP port: a browser, with or without the CA, and a
        # worker's certificate are refused; the client's certificate is the control.
        credentials = cluster._credentials
        host = cluster.scheduler_address.split("//")[1].rsplit(":", 1)[0]
        port = cluster.scheduler_info["services"]["dashboard"]
        direct = f"https://{host}:{port}/status"
        ca = credentials.ca_cert_pem
        worker = leaf_files(tmp_path, credentials.issue(Role.WORKER, "worker-0"))
        client = leaf_files(tmp_path, credentials.issue(Role.CLIENT, "browser"))
        refusals = [
            (f"http://{host}:{port}/status", None),
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
        # A process VM's own address (on a cloud VM, 127.0.0.1), never every interface.
        assert bound == address.split("//")[1].rsplit(":", 1)[0] != "0.0.0.0"
    # On a cloud VM the same line binds the VM's loopback.
    files = cloudinit.parse(cluster.planner.user_data_now[Role.WORKER])["write_files"]
    (boot,) = [cloudinit.decode_file(f) for f in files if f["path"].endswith("boot.sh")]
    assert b'--dashboard-address "${DSC_VM_ADDRESS:-127.0.0.1}:0"' in boot
