"""The guest test bed itself: real Linux guests under QEMU boot user-data with cloud-init.

Before product tests trust the bed, it must show what they rely on: a stock guest runs
``write_files`` + ``runcmd`` from its NoCloud seed, has no Dask and no Docker, prints
runcmd's output on its serial console and ends its qemu when it powers off; a guest
without egress has no route to "the internet" while one with egress reaches the services
address; and the test's own namespace reaches guests on the cluster network.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from clouds.guest.booter import GuestBooter
from clouds.guest.common import SERVICES_ADDRESS
from clouds.guest.image import GuestImage, stock_image
from clouds.guest.network import GuestNetwork

pytestmark = [pytest.mark.slow, pytest.mark.guest, pytest.mark.timeout(600)]

#: Under TCG on two shared cores a guest needs 1-2 minutes to finish cloud-init.
BOOT_TIMEOUT = 400.0
LISTENER_PORT = 8081

_PROBE = """\
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print("REACHED", sys.argv[1], s.recv(64).decode().strip())
except OSError as e:
    print("UNREACHABLE", sys.argv[1], type(e).__name__, e)
"""


@pytest.fixture
def bed(guest_network: GuestNetwork) -> tuple[GuestNetwork, GuestImage]:
    return guest_network, stock_image()


def _user_data(runcmd: list[str], write_files: list[dict[str, str]] | None = None) -> bytes:
    document: dict[str, object] = {"runcmd": runcmd}
    if write_files:
        document["write_files"] = write_files
    return b"#cloud-config\n" + yaml.safe_dump(document).encode()


def _probe(host: str, port: int) -> str:
    """A runcmd line: connect to ``host:port`` and say whether that worked."""
    return f"python3 -c {shlex.quote(_PROBE)} {host} {port}"


def test_stock_guest_runs_user_data_and_powers_off(bed, tmp_path):
    network, image = bed
    before = set(network.pids())  # the session's package services, if started
    booter = GuestBooter(tmp_path, network, image)
    user_data = _user_data(
        [
            "echo MARKER-$(hostname)",
            "stat -c 'MODE=%a OWNER=%U' /etc/dsc-test/secret",
            "python3 -c 'import distributed' 2>/dev/null && echo HAS-DASK || echo NO-DASK",
            "command -v docker >/dev/null && echo HAS-DOCKER || echo NO-DOCKER",
            "command -v pip pip3 >/dev/null && echo HAS-PIP || echo NO-PIP",
            "echo DATASOURCE=$(cat /var/lib/cloud/instance/datasource)",
            "poweroff",
        ],
        [{"path": "/etc/dsc-test/secret", "permissions": "0600", "content": "not for others"}],
    )
    vm = booter.boot(user_data, address="10.77.0.10", cluster_id="bed", name="stock", role="x")
    try:
        assert vm.is_running() and vm.processes() == [vm.pid]
        stopped = vm.wait_stopped(BOOT_TIMEOUT)
        console = vm.console_output()
        assert stopped, f"the guest did not power off by itself:\n{console[-3000:]}"
        assert vm.process.returncode == 0
        for expected in ("MARKER-stock", "MODE=600 OWNER=root", "NO-DASK", "NO-DOCKER", "NO-PIP"):
            assert expected in console, console[-3000:]
        assert "DATASOURCE=DataSourceNoCloud: DataSourceNoCloud [seed=/dev/nvme0n2]" in console
        print(
            f"\naccelerator {vm.accelerator}: cloud-init finished "
            f"{vm.boot_to_cloud_init_done()} s after qemu started; "
            f"qemu exited {vm.shutdown_to_exit()} s after the power-off began"
        )
        assert not vm.is_running() and vm.processes() == []
        # A powered-off guest is a terminated instance soon after it asked for it.
        shutdown = vm.shutdown_to_exit()
        assert shutdown is not None and shutdown < 90
    finally:
        booter.stop_all()
    assert booter.vms == {} and not vm.is_running()
    assert not (tmp_path / "bed" / "stock").exists()
    assert set(network.pids()) <= before  # the guests' qemu and the listener gone


def test_egress_and_the_cluster_network(bed, tmp_path):
    network, image = bed
    before = set(network.pids())  # the session's package services, if started
    # "The internet" for guests: one listener on the services address in the namespace.
    listener = subprocess.Popen(
        [
            *network.exec_prefix,
            sys.executable,
            "-c",
            "import socket, sys\n"
            "s = socket.create_server((sys.argv[1], int(sys.argv[2])))\n"
            "while True:\n"
            "    c, _ = s.accept(); c.sendall(b'SERVICES\\n'); c.close()\n",
            SERVICES_ADDRESS,
            str(LISTENER_PORT),
        ],
        stdout=subprocess.DEVNULL,
    )
    booter = GuestBooter(tmp_path, network, image)
    try:
        closed = booter.boot(
            _user_data(
                [
                    "echo DEFAULT-ROUTES=$(ip route | grep -c '^default')",
                    "echo OUTSIDE-ADDRESSES=$(ip -4 -o addr | grep -c ' 10[.]78[.]')",
                    _probe(SERVICES_ADDRESS, LISTENER_PORT),
                    "poweroff",
                ]
            ),
            address="10.77.0.20",
            cluster_id="bed",
            name="closed",
            role="x",
            egress=False,
        )
        open_ = booter.boot(
            _user_data(
                [
                    "mkdir -p /srv/www && echo served-by-guest > /srv/www/hello.txt",
                    "cd /srv/www && nohup python3 -m http.server 8000 --bind 10.77.0.21"
                    " >/dev/null 2>&1 &",
                    _probe(SERVICES_ADDRESS, LISTENER_PORT),
                    # Nothing beyond the namespace: it forwards nothing.
                    _probe("198.51.100.1", 80),
                    "echo OPEN-DONE",
                ]
            ),
            address="10.77.0.21",
            cluster_id="bed",
            name="open",
            role="x",
        )
        assert closed.wait_stopped(BOOT_TIMEOUT), closed.console_output()[-3000:]
        closed_console = closed.console_output()
        assert "DEFAULT-ROUTES=0" in closed_console
        assert "OUTSIDE-ADDRESSES=0" in closed_console
        assert f"UNREACHABLE {SERVICES_ADDRESS} OSError [Errno 101]" in closed_console, (
            closed_console[-3000:]
        )

        assert open_.wait_for_console("OPEN-DONE", BOOT_TIMEOUT), open_.console_output()[-3000:]
        open_console = open_.console_output()
        assert f"REACHED {SERVICES_ADDRESS} SERVICES" in open_console, open_console[-3000:]
        assert "UNREACHABLE 198.51.100.1" in open_console
        # The test's namespace reaches a guest's cluster address, as a Dask client must.
        assert _fetch("http://10.77.0.21:8000/hello.txt", 60) == "served-by-guest\n"
        print(
            f"\ncloud-init finished after {closed.boot_to_cloud_init_done()} s (no egress) "
            f"and {open_.boot_to_cloud_init_done()} s (egress), two guests at once"
        )
    finally:
        booter.stop_all()
        listener.kill()
        listener.wait()
    assert set(network.pids()) <= before  # the guests' qemu and the listener gone


def _fetch(url: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except (TimeoutError, urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
