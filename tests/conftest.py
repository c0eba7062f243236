from __future__ import annotations

import ipaddress
import os
import random
import socket
from pathlib import Path
from typing import Any

import pytest

from dask_secure_cloud.cloudinit import decode_file, parse

from clouds import reach
from clouds.arm import AzureStandIn
from clouds.booter import Booter, VMBooter

pytest_plugins = ["clouds.guest.fixtures"]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Three groups for ``pytest -n 3 --dist loadgroup`` (``ci/test.sh``), one per pytest
    worker, each run in turn: the guests (QEMU, CPU-bound; one cluster of guests at a
    time), the process-VM tests (which mostly wait on sockets), and the few long, light
    tests marked ``alongside`` (a cluster computing for ten minutes across certificate
    renewals). The guests run at a lower CPU priority, so the process-VM tests' short
    timeouts hold beside them.

    Guest tests marked ``every_core`` (three guests installing Docker) run last: the
    other guest tests leave a core to the process-VM tests beside them, and by the time
    those are done this one has the machine to itself instead of sharing it."""
    items.sort(key=lambda item: item.get_closest_marker("every_core") is not None)
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue  # placed by its module (the test bed's own tests go with the guests)
        if item.get_closest_marker("guest"):
            group = "guests"
        elif item.get_closest_marker("alongside"):
            group = "alongside"
        else:
            group = "process-vms"
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_finish(session: pytest.Session) -> None:
    """On a pytest-xdist worker with ``--dist loadgroup``, every test must now carry its
    group in its node id (``...@guests``, which pytest-xdist adds once the groups above
    are set): otherwise the groups are silently ignored, and two workers start guest
    networks at once."""
    config = session.config
    if not getattr(config.option, "loadgroup", False) or not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    items = session.items
    ungrouped = [item.nodeid for item in items if "@" not in item.nodeid.rsplit("]", 1)[-1]]
    if ungrouped:
        raise pytest.UsageError(
            f"pytest-xdist did not apply --dist loadgroup to {len(ungrouped)} tests (for "
            f"example {ungrouped[0]}): this pytest and pytest-xdist do not work together; "
            "see the pin in setup.cfg"
        )


# -- the Azure Resource Manager stand-in, for test_azure and test_jupyterlab ---------------

SUBSCRIPTION = "5f1b3c2e-8d6a-4b7e-9c0f-1a2b3c4d5e6f"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "0d6c1a52-3f4e-4b8a-9e7d-6c5b4a3f2e1d"
SECRET = "client-secret-never-on-a-vm"


def start_azure(
    booter: Booter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, address_prefix: str
) -> tuple[AzureStandIn, dict[str, Any]]:
    """The ARM stand-in booting its VMs with ``booter``, its resource group, and the
    options an AzureVMCluster needs to use it (the vnet made in ``address_prefix``)."""
    stand_in = AzureStandIn(
        booter,
        subscription=SUBSCRIPTION,
        tenant=TENANT,
        client_id=CLIENT_ID,
        client_secret=SECRET,
    )
    url = stand_in.start()
    stand_in.add_group("dask-rg", "westeurope")
    bundle = tmp_path / "ca.pem"
    stand_in.ca.cert_pem.write_to_path(str(bundle))
    # DefaultAzureCredential's environment source signs in at the stand-in.
    monkeypatch.setenv("AZURE_TENANT_ID", TENANT)
    monkeypatch.setenv("AZURE_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("AZURE_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", url)
    options = {
        "resource_group": "dask-rg",
        "resource_manager_url": url,
        "ca_bundle": str(bundle),
        "scheduler_vm_size": "Standard_D2s_v5",
        "worker_vm_size": "Standard_D4s_v5",
        "address_prefix": address_prefix,
        "boot_timeout": "60s",
        # Where the cluster learns the client's address, to open the scheduler to it.
        "public_ip_url": reach.checkip_url(),
    }
    return stand_in, options


@pytest.fixture
def azure(tmp_path, monkeypatch):
    stand_in, options = start_azure(
        VMBooter(tmp_path / "vms"),
        tmp_path,
        monkeypatch,
        address_prefix=f"127.{random.randint(100, 250)}.0.0/16",
    )
    yield stand_in, options
    stand_in.stop()


def vm_processes(cluster_id: str) -> list[int]:
    """PIDs on this machine that belong to any VM of ``cluster_id``."""
    marker = f"DSC_VM_ID={cluster_id}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if any(v.startswith(marker) for v in (entry / "environ").read_bytes().split(b"\0")):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def any_vm_processes(directory: Path) -> list[int]:
    return [pid for cluster in _clusters(directory) for pid in vm_processes(cluster)]


def _clusters(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir()] if directory.exists() else []


def decoded_files(user_data: bytes) -> dict[str, bytes]:
    return {f["path"]: decode_file(f) for f in parse(user_data).get("write_files", [])}


@pytest.fixture
def vm_dir(tmp_path: Path) -> Path:
    path = tmp_path / "vms"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def recorded_user_data(monkeypatch) -> list[bytes]:
    """Every user-data a LocalVMCluster hands to its driver during the test."""
    from dask_secure_cloud.providers.local import LocalDriver

    seen: list[bytes] = []
    original = LocalDriver.create

    async def create(self, request):
        seen.append(request.user_data)
        return await original(self, request)

    monkeypatch.setattr(LocalDriver, "create", create)
    return seen


@pytest.fixture(autouse=True)
def _no_cloud_credentials(monkeypatch, tmp_path_factory):
    """Tests never read credentials from this machine, nor reach a real cloud."""
    for key in list(os.environ):
        if key.startswith(("AWS_", "AZURE_", "GOOGLE_", "DIGITALOCEAN_", "CLOUDSDK_")):
            monkeypatch.delenv(key)
    nowhere = str(tmp_path_factory.getbasetemp() / "no-such-file")
    monkeypatch.setenv("AWS_CONFIG_FILE", nowhere)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookups
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # google-auth: no metadata-server probe
    monkeypatch.setenv("CLOUDSDK_CONFIG", nowhere)  # no gcloud application default creds


_real_getaddrinfo = socket.getaddrinfo


def _loopback_only(host, *args, **kwargs):
    """Resolve loopback names only, the addresses of the guests' networks, which live
    in a namespace the tests make themselves, and the stand-ins' public addresses, which
    lead to a VM's own address (``clouds.reach``): a test that tries to reach any other
    host fails."""
    name = host.decode() if isinstance(host, bytes) else host
    loopback = name in (None, "", "localhost", "::1") or str(name).startswith("127.")
    if not loopback and not _in_test_namespace(str(name)) and not reach.is_public(str(name)):
        raise OSError(f"tests may only reach loopback addresses, not {name!r}")
    return _real_getaddrinfo(host, *args, **kwargs)


def _in_test_namespace(name: str) -> bool:
    from clouds.guest.common import CLUSTER_NETWORK, OUTSIDE_NETWORK

    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address in CLUSTER_NETWORK or address in OUTSIDE_NETWORK


@pytest.fixture(autouse=True)
def audit_log(tmp_path_factory):
    """Each test's audit log goes to its own file, never to the user's data directory."""
    import dask.config

    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with dask.config.set({"secure-cloud.audit-log": str(path)}):
        yield path


@pytest.fixture(autouse=True)
def _price_cache(tmp_path_factory, monkeypatch):
    """Each test's price cache is its own (``pricing.cache``), never the user's, and is
    inherited by the processes a test starts."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _no_network_beyond_loopback(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", _loopback_only)
    reach.install(monkeypatch)  # a VM's public address leads to its private one


@pytest.fixture
def outside_the_cloud():
    """The test process is a client outside every stand-in cloud (a laptop): it reaches
    VMs only at their public addresses, through their firewalls (``clouds.reach``).
    Yields the ``public_ip_url`` that tells a cluster the client's address."""
    with reach.outside():
        yield reach.checkip_url()


async def answers_without_certificate(address: str, ca_pem: str) -> bool:
    """A TLS client with the right CA but no certificate: does the server talk to it?"""
    import asyncio
    import ssl

    host, port = address.split("//")[1].rsplit(":", 1)
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.check_hostname = False
    try:
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    except (OSError, ssl.SSLError):
        return False
    try:
        return bool(await asyncio.wait_for(reader.read(1), 3))
    except (OSError, ssl.SSLError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()
