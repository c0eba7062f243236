"""What the test process (the client) reaches of the stand-in clouds' VMs.

On a real cloud, a client outside the cloud's network reaches a VM only at a public
address: a 1:1 NAT to the VM's private address, through the VM's firewall. Its private
address is reachable only from inside the network. Process VMs all sit on 127.x
addresses, which this machine reaches whatever the cloud allows, so a default that needs
the client inside the network would pass here and fail for every user.

So the stand-ins declare each VM they boot (:func:`declare`): its private address and,
if it has one, its public address with the firewall that guards it. In the test process
(only: the VMs are other processes, inside the cloud), ``socket.socket.connect``
(:func:`install`, from an autouse fixture) then does what the cloud's edge does:

- a connection to a public address goes to the VM's private address (the NAT), if the
  VM's firewall admits :data:`CLIENT_ADDRESS` on that port; otherwise it is refused;
- inside :func:`outside` (the ``outside_the_cloud`` fixture), a connection to any VM's
  private address is refused, as from a laptop on the internet.

asyncio, tornado and distributed all connect through ``socket.socket.connect``, so a
Dask client outside the cloud fails just as it would against the real cloud: refused
at once rather than after a firewall's silent timeout, which keeps tests fast.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

__all__ = [
    "CLIENT_ADDRESS",
    "CheckIP",
    "briefly",
    "checkip_url",
    "declare",
    "forget",
    "install",
    "is_public",
    "outside",
]

#: The test process's address as the clouds see it: what :class:`CheckIP` answers, so
#: the clusters open their scheduler to it, and what the NAT checks firewalls against.
CLIENT_ADDRESS = "198.51.100.7"

#: ``admits(source, port)``: whether the VM's firewall lets ``source`` in on ``port``.
Admits = Callable[[str, int], bool]


@dataclass(frozen=True)
class _Public:
    private: str
    admits: Admits | None


_lock = threading.Lock()
_nat: dict[str, _Public] = {}
_private: set[str] = set()
_outside = False


@contextlib.contextmanager
def briefly(lock: Any) -> Iterator[None]:
    """Hold a stand-in's ``lock`` if it comes at once, else go on without it.

    A firewall check runs inside a client's ``socket.connect``, in its event loop: it
    must never wait for a request the stand-in is serving (a stand-in holds its lock
    while it boots a VM, which on a guest takes a minute, and the client's loop would
    stand still all that time). Its reads look things up whole, which is safe enough
    without the lock."""
    locked = lock.acquire(timeout=0.05)
    try:
        yield
    finally:
        if locked:
            lock.release()


def declare(private: str, public: str | None = None, admits: Admits | None = None) -> None:
    """A stand-in booted a VM at ``private``; ``public`` (if any) is NATed to it, through
    ``admits`` (None: a firewall that admits anyone, as when the model has none)."""
    with _lock:
        _private.add(private)
        if public:
            _nat[public] = _Public(private, admits)


def forget(private: str) -> None:
    """The VM at ``private`` is gone: its addresses lead nowhere any more."""
    with _lock:
        _private.discard(private)
        for public in [p for p, target in _nat.items() if target.private == private]:
            del _nat[public]


def is_public(host: str) -> bool:
    """Whether ``host`` is a VM's public address a stand-in declared."""
    with _lock:
        return host in _nat


@contextlib.contextmanager
def outside() -> Iterator[None]:
    """The test process is outside every stand-in cloud: VMs' private addresses are
    refused, only public ones reached."""
    global _outside
    _outside = True
    try:
        yield
    finally:
        _outside = False


#: A bound socket that never listens: a connection routed to it is refused by the
#: kernel, later and the way a real refusal comes (tornado, for one, reads a refusal
#: raised from ``connect`` itself as a stream that is not idle).
_REFUSER = socket.socket()
_REFUSER.bind(("127.0.0.1", 0))
#: Why each refused connection was refused, newest last: for tests and for debugging.
refusals: list[str] = []


def _refuse(why: str) -> Any:
    with _lock:
        refusals.append(why)
        del refusals[:-100]
    return _REFUSER.getsockname()


def _route(address: Any) -> Any:
    """Where a connection to ``address`` goes, as the cloud's edge decides; what a
    firewall would stop goes to an address that refuses it (see :data:`refusals`)."""
    if not isinstance(address, tuple) or len(address) < 2 or not isinstance(address[0], str):
        return address  # a Unix socket, or a form this model does not cover
    host, port = address[0], address[1]
    with _lock:
        public = _nat.get(host)
        private = host in _private
    if public is not None:
        if public.admits is not None and not public.admits(CLIENT_ADDRESS, int(port)):
            return _refuse(
                f"stand-in cloud: the firewall of {host} does not admit {CLIENT_ADDRESS} "
                f"on port {port}"
            )
        return (public.private, port, *address[2:])
    if private and _outside:
        return _refuse(
            f"stand-in cloud: {host} is a private address, unreachable from outside the "
            "cloud's network (the test runs outside_the_cloud)"
        )
    return address


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _routed_connect(self: socket.socket, address: Any) -> None:
    return _connect(self, _route(address))


def _routed_connect_ex(self: socket.socket, address: Any) -> int:
    return _connect_ex(self, _route(address))


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route this process's connections through the stand-in clouds' edge."""
    monkeypatch.setattr(socket.socket, "connect", _routed_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _routed_connect_ex)


class CheckIP:
    """A stand-in of ``checkip.amazonaws.com`` (``public_ip_url``): answers
    :data:`CLIENT_ADDRESS`, the client's address as the clouds see it."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f"{CLIENT_ADDRESS}\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


_checkip: CheckIP | None = None


def checkip_url() -> str:
    """The ``public_ip_url`` of this process's :class:`CheckIP`, started on first use and
    left running with the process (it holds nothing of any test)."""
    global _checkip
    with _lock:
        if _checkip is None:
            _checkip = CheckIP()
        return _checkip.url
