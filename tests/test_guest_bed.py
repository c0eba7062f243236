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


def test_stock_guests_run_user_data_power_off_and_keep_to_their_network(bed, tmp_path):
    """Two guests at once (one boot costs a minute or more under TCG, so each guest
    proves several things): the closed one runs ``write_files`` and ``runcmd`` from its
    NoCloud seed, has no Dask, Docker or pip, has no way out, and its power-off ends its
    qemu; the open one reaches the services address but nothing beyond the namespace,
    and the test's namespace reaches it on the cluster network."""
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
                    "echo MARKER-$(hostname)",
                    "stat -c 'MODE=%a OWNER=%U' /etc/dsc-test/secret",
                    "python3 -c 'import distributed' 2>/dev/null && echo HAS-DASK || echo NO-DASK",
                    "command -v docker >/dev/null && echo HAS-DOCKER || echo NO-DOCKER",
                    "command -v pip pip3 >/dev/null && echo HAS-PIP || echo NO-PIP",
                    "echo DATASOURCE=$(cat /var/lib/cloud/instance/datasource)",
                    "echo DEFAULT-ROUTES=$(ip route | grep -c '^default')",
                    "echo OUTSIDE-ADDRESSES=$(ip -4 -o addr | grep -c ' 10[.]78[.]')",
                    _probe(SERVICES_ADDRESS, LISTENER_PORT),
                    "poweroff",
                ],
                [
                    {
                        "path": "/etc/dsc-test/secret",
                        "permissions": "0600",
                        "content": "not for others",
                    }
                ],
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
        assert closed.is_running() and closed.processes() == [closed.pid]
        stopped = closed.wait_stopped(BOOT_TIMEOUT)
        closed_console = closed.console_output()
        assert stopped, f"the guest did not power off by itself:\n{closed_console[-3000:]}"
        assert closed.process.returncode == 0
        for expected in ("MARKER-closed", "MODE=600 OWNER=root", "NO-DASK", "NO-DOCKER", "NO-PIP"):
            assert expected in closed_console, closed_console[-3000:]
        assert "DATASOURCE=DataSourceNoCloud: DataSourceNoCloud [seed=/dev/nvme0n2]" in (
            closed_console
        )
        # A powered-off guest is a terminated instance soon after it asked for it.
        assert not closed.is_running() and closed.processes() == []
        shutdown = closed.shutdown_to_exit()
        assert shutdown is not None and shutdown < 90
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
            f"\naccelerator {closed.accelerator}: cloud-init finished after "
            f"{closed.boot_to_cloud_init_done()} s (no egress) and "
            f"{open_.boot_to_cloud_init_done()} s (egress), two guests at once; qemu exited "
            f"{shutdown} s after the power-off began"
        )
    finally:
        booter.stop_all()
        listener.kill()
        listener.wait()
    assert booter.vms == {} and not closed.is_running() and not open_.is_running()
    assert not (tmp_path / "bed" / "closed").exists()
    assert not (tmp_path / "bed" / "open").exists()
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
