"""Fixtures every guest test shares, loaded by ``tests/conftest.py``.

There is one guest network per machine (its host end has a fixed address), so the
network and the services on it live for the whole test session, and every guest test
module takes them from here rather than making its own. Where the machine cannot make
the network (no root, no ``ip netns``) the guest tests are skipped, unless
``DSC_REQUIRE_GUESTS=1`` says this run exists to prove the boot path (CI sets it): then
they fail, so a skipped proof is never counted as a passing one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import dask
import pytest
from google.auth.credentials import AnonymousCredentials

from ..gce import GCEStandIn
from .booter import GuestBooter
from .common import SERVICES_ADDRESS
from .container_image import dask_images
from .image import stock_image
from .internet import Services
from .mirror_apt import apt_repository
from .mirror_pypi import dask_requirements, wheelhouse
from .network import GuestNetwork, NetworkUnavailable

__all__ = ["gce_guests", "guest_network", "guest_services", "patient_connections"]

#: TCG guests on two shared cores run Python some twenty times slower than a cloud VM.
CONNECT_TIMEOUT = "180s"
#: Where the stand-ins put their VMs' private addresses: the guest bed's cluster network
#: (10.77.0.0/24; its upper half holds this machine's end of the bridge).
SUBNET = "10.77.0.0/25"
#: A guest boots in one to two minutes under TCG, and installing Dask takes minutes more.
BOOT_TIMEOUT = "15m"
#: Guests boot with AppArmor off (``apparmor=0``): installing the apparmor package on a
#: TCG guest compiles every profile it ships, for minutes. Ubuntu's images (the clouds'
#: default) have AppArmor and its profiles already; a Debian kernel that enforces it
#: without the package is the boot script's special case, proven in
#: ``test_guests_failed_boots.py``.
APPARMOR = False


@pytest.fixture(scope="session")
def guest_network() -> Iterator[GuestNetwork]:
    network = GuestNetwork()
    try:
        network.start()
    except NetworkUnavailable as e:
        if os.environ.get("DSC_REQUIRE_GUESTS") == "1":
            pytest.fail(f"DSC_REQUIRE_GUESTS=1 but no guest network here: {e}")
        pytest.skip(f"no guest network here: {e}")
    try:
        yield network
    finally:
        network.close()
    assert not network.exists(), "the namespace or its veth outlived the guest tests"


@pytest.fixture(scope="session")
def guest_services(guest_network, tmp_path_factory) -> Iterator[Services]:
    """ "The internet" for guests: apt, PyPI and ghcr.io on the outside network."""
    started = Services.start(
        guest_network.exec_prefix,
        SERVICES_ADDRESS,
        apt_repository(),
        wheelhouse(dask_requirements()),
        dask_images(),
        tmp_path_factory.mktemp("services"),
    )
    yield started
    started.stop()


@pytest.fixture
def patient_connections() -> Iterator[None]:
    """Give Dask's connections (the client's and, shipped with the config, the VMs')
    the time a TLS handshake takes on a TCG guest."""
    with dask.config.set({"distributed.comm.timeouts.connect": CONNECT_TIMEOUT}):
        yield


@pytest.fixture
def gce_guests(guest_network, tmp_path) -> Iterator[tuple[GCEStandIn, GuestBooter, dict]]:
    """The GCE stand-in booting guests; its ``default`` network as on a new project: the
    default internet route, no Cloud NAT, the default allow rules."""
    booter = GuestBooter(tmp_path / "vms", guest_network, stock_image(), apparmor=APPARMOR)
    stand_in = GCEStandIn(booter, "dsc-guest-project", "us-central1-a", SUBNET)
    url = stand_in.start()
    options = {
        "project": "dsc-guest-project",
        "zone": "us-central1-a",
        "api_endpoint": url,
        "credentials": AnonymousCredentials(),
        "use_private_ip": True,  # the client reaches the guests' private addresses
        "boot_timeout": BOOT_TIMEOUT,
    }
    try:
        yield stand_in, booter, options
    finally:
        stand_in.stop()
