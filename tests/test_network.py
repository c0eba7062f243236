import asyncio
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dask_secure_cloud.errors import OptionError
from dask_secure_cloud.network import (
    NetworkPolicy,
    NetworkPolicyError,
    check_public_exposure,
    parse_cidrs,
    scheduler_sources,
)
from dask_secure_cloud.options import DropletOptions, EC2Options, resolve

from clouds import reach


async def test_creator_address_is_looked_up_when_no_cidrs_are_given():
    """The scheduler is opened to this machine's public address, found at public_ip_url."""

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"198.51.100.23\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert await scheduler_sources(None, open_to_world=False, public_ip_url=url) == [
            "198.51.100.23/32"
        ]
    finally:
        server.shutdown()


async def test_world_needs_an_explicit_opt_in(caplog):
    with pytest.raises(NetworkPolicyError, match="open_to_world=True"):
        await scheduler_sources(["0.0.0.0/0"], open_to_world=False, public_ip_url="unused")
    assert await scheduler_sources(["0.0.0.0/0"], open_to_world=True, public_ip_url="x") == [
        "0.0.0.0/0"
    ]
    assert "whole internet" in caplog.text


async def test_failed_lookup_says_what_to_pass():
    with pytest.raises(NetworkPolicyError, match="pass allowed_cidrs"):
        await scheduler_sources(None, open_to_world=False, public_ip_url="http://127.0.0.1:9/")


def test_cidrs_are_normalised_or_named():
    assert parse_cidrs(["10.0.0.7", "10.1.0.0/16"]) == ["10.0.0.7/32", "10.1.0.0/16"]
    with pytest.raises(OptionError, match="must be a list"):  # as the option says
        parse_cidrs("10.0.0.0/8")
    with pytest.raises(NetworkPolicyError, match="not an address or CIDR"):
        parse_cidrs(["10.0.0.300"])


def test_plain_tcp_on_a_public_address_needs_an_explicit_opt_in():
    with pytest.raises(NetworkPolicyError, match="allow_insecure_public=True"):
        check_public_exposure(security=False, public=True, allow_insecure_public=False)
    check_public_exposure(security=False, public=True, allow_insecure_public=True)
    check_public_exposure(security=False, public=False, allow_insecure_public=False)


def test_policy_from_options_resolves_and_refuses():
    options = resolve(EC2Options, {"allowed_cidrs": ["10.1.2.3"]})
    policy = NetworkPolicy.from_options(options)
    assert policy.allowed_cidrs == ("10.1.2.3/32",)
    assert policy.public_address(worker=False) and not policy.public_address(worker=True)
    insecure = resolve(DropletOptions, {"security": False, "use_private_ip": True})
    with pytest.raises(NetworkPolicyError, match="allow_insecure_public"):
        NetworkPolicy.from_options(insecure, always_public=True)


async def test_policy_uses_the_network_ranges_for_a_client_inside_it():
    async def inside():
        return ["10.0.0.0/16"]

    assert await NetworkPolicy(use_private_ip=True).scheduler_sources(inside) == ["10.0.0.0/16"]
    explicit = NetworkPolicy(use_private_ip=True, allowed_cidrs=("192.0.2.1/32",))
    assert await explicit.scheduler_sources(inside) == ["192.0.2.1/32"]


# -- the stand-ins' model of what a client outside the cloud reaches (clouds.reach) --------


async def test_outside_the_cloud_reaches_public_addresses_only_through_their_firewall(
    outside_the_cloud,
):
    """The fixture every cloud's defaults test runs in: a VM's private address is refused,
    its public one leads to it (1:1 NAT) on the ports its firewall opens to the client."""
    server = socket.create_server(("127.77.0.5", 0))
    port = server.getsockname()[1]
    server.setblocking(False)
    reach.declare("127.77.0.5", "203.0.113.250", lambda source, p: p == port)
    try:
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.77.0.5", port)
        assert "127.77.0.5 is a private address" in reach.refusals[-1]
        _, writer = await asyncio.open_connection("203.0.113.250", port)
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("203.0.113.250", port + 1)
        assert "does not admit 198.51.100.7" in reach.refusals[-1]
        # The address the clusters open the scheduler to is the one the firewall sees.
        assert await scheduler_sources(
            None, open_to_world=False, public_ip_url=outside_the_cloud
        ) == [f"{reach.CLIENT_ADDRESS}/32"]
    finally:
        reach.forget("127.77.0.5")
        server.close()
    assert not reach.is_public("203.0.113.250")
