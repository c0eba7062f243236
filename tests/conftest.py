from __future__ import annotations

import ipaddress
import os
import random
import socket
from pathlib import Path

import pytest

from clouds import reach
from clouds.booter import VMBooter
from clouds.guest.common import cache_root
from standins import start_azure

pytest_plugins = ["clouds.guest.fixtures"]

# The guest bed's cache (images, mirrors, its test CA) is fixed for the whole run before
# any test points XDG_CACHE_HOME elsewhere (each test's price cache is its own:
# _price_cache): a test that rebuilt the bed's CA in its own cache would not be trusted by
# the images and services the run already holds.
os.environ.setdefault("DSC_TEST_CACHE", str(cache_root()))


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
