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

from .common import SERVICES_ADDRESS
from .container_image import dask_images
from .internet import Services
from .mirror_apt import apt_repository
from .mirror_pypi import dask_requirements, wheelhouse
from .network import GuestNetwork, NetworkUnavailable

__all__ = ["guest_network", "guest_services", "patient_connections"]

#: TCG guests on two shared cores run Python some twenty times slower than a cloud VM.
CONNECT_TIMEOUT = "180s"


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
