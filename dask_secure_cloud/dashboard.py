"""The client's way to the scheduler's dashboard: a proxy on this machine's loopback.

The scheduler's dashboard speaks only TLS 1.3 to a client certificate of its cluster,
and listens on the scheduler VM's loopback: no firewall opens it, nobody else can reach
it. This proxy accepts plain HTTP (and websockets) from the browser on
``127.0.0.1:PORT``; for each connection it opens a Dask comm to the scheduler (mutual
TLS, client certificate), asks for the ``secure_cloud_dashboard`` tunnel, and runs a
second TLS session inside it to the dashboard itself, checking that a scheduler
certificate of the cluster answers. The scheduler only relays bytes it cannot read.

Listening on loopback is not enough: a web page whose host name its owner re-points
at ``127.0.0.1`` (DNS rebinding) is then same-origin with the dashboard, and any page
may open a websocket to it (Bokeh accepts every origin and unsigned session tokens).
So every request's head is read and checked before a byte of it reaches the scheduler:
its ``Host`` must be a loopback name (``127.0.0.1``, ``localhost``, ``[::1]``, any port;
the JupyterLab Dask extension, through jupyter-server-proxy, forwards the browser's
``Host`` of a Jupyter server on this machine), and an ``Origin``, when there is one,
must be a loopback origin. Anything else gets a short 4xx from the proxy itself and no
connection to the scheduler. The heads are split exactly as the dashboard's Tornado
server splits them, so what is checked is what the dashboard reads.

With ``security=False`` the dashboard is plain HTTP at the scheduler's address, and
the same proxy relays to it over plain TCP (:meth:`DashboardProxy.plain`): the
JupyterLab panes go through jupyter-server-proxy, which serves only loopback names, and
the scheduler's address (``127.x.y.1`` for a local VM, an IP on a cloud) is none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import urllib.parse
from typing import Any, Protocol

from distributed.comm import connect
from tornado import httputil

from .vm import peers

logger = logging.getLogger(__name__)

__all__ = ["DashboardProxy"]

_CHUNK = 1 << 16
#: Tornado's own limit on a request head (``HTTP1ConnectionParameters.max_header_size``).
_MAX_HEAD = 1 << 16
#: How long a browser may take to send a request's head, before anything is opened.
_HEAD_TIMEOUT = 60.0
#: Where Tornado ends a request head: a blank line, CRLF or bare LF.
_HEAD_END = re.compile(rb"\r?\n\r?\n")
#: The host names that only this machine's own pages and processes use.
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
_PORT = re.compile(r":[0-9]{1,5}")


class DashboardProxy:
    """Serve ``http://127.0.0.1:PORT/`` as the scheduler's dashboard, for this process's
    browser tabs and the JupyterLab Dask extension.

    Made with the scheduler's address and the cluster's client TLS arguments, it reaches
    the dashboard through the scheduler's port (above). Made with :meth:`plain`, for a
    cluster with ``security=False``, it relays to the dashboard's own plain HTTP port:
    jupyter-server-proxy, which the extension's panes go through, serves only
    ``localhost``/``127.0.0.1`` and refused the scheduler's address with a 403. Either
    way each request is checked as above before a byte of it is sent on.
    """

    def __init__(
        self,
        scheduler_address: str,
        connection_args: dict[str, Any],
        *,
        plain_target: tuple[str, int] | None = None,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.connection_args = connection_args
        #: ``(host, port)`` of a plain-HTTP dashboard to relay to, instead of the tunnel.
        self.plain_target = plain_target
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.port: int | None = None

    @classmethod
    def plain(cls, host: str, port: int) -> DashboardProxy:
        """A relay to the plain-HTTP dashboard at ``host:port`` (``security=False``)."""
        return cls("", {}, plain_target=(host, port))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def link(self) -> str:
        return f"http://127.0.0.1:{self.port}/status" if self.port else ""

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        gate = RequestGate(reader)
        upstream: _Upstream | None = None
        try:
            # The first request is checked before the scheduler is contacted at all.
            first = await asyncio.wait_for(gate.read(), _HEAD_TIMEOUT)
            if not first:
                return
            try:
                upstream = await self._open()
            except OSError as e:
                logger.warning("dashboard proxy: cannot reach the scheduler: %s", e)
                return
            await upstream.send(first)
            await _pump(gate, writer, upstream)
        except Refused as refusal:
            logger.warning("dashboard proxy: refused a request: %s", refusal.reason)
            with contextlib.suppress(OSError):
                if upstream is None:  # nothing of the dashboard's was sent on it yet
                    writer.write(refusal.response())
                    await writer.drain()
        except asyncio.TimeoutError:
            logger.info("dashboard proxy: no request within %.0f s", _HEAD_TIMEOUT)
        except (OSError, ssl.SSLError) as e:
            logger.info("dashboard proxy: connection ended: %s", e)
        except asyncio.CancelledError:
            pass  # close(): the connection ends with the proxy, not as an error
        finally:
            self._connections.discard(task)
            writer.close()
            if upstream is not None:
                await upstream.close()

    async def _open(self) -> _Upstream:
        """A connection to the dashboard for one browser connection."""
        if self.plain_target is not None:
            host, port = self.plain_target
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            return _PlainTCP(reader, writer)
        comm = await connect(self.scheduler_address, timeout=10, **self.connection_args)
        try:
            await comm.write({"op": "secure_cloud_dashboard", "reply": False})
            session = _TunnelTLS(comm, self.connection_args["ssl_context"])
            await session.handshake()
        except BaseException:
            await comm.close()
            raise
        return session


class Refused(Exception):
    """A request the proxy answers itself, with ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def response(self) -> bytes:
        """A complete HTTP/1.1 response that closes the connection."""
        phrase = httputil.responses.get(self.status, "Refused")
        body = f"dask-secure-cloud dashboard proxy: {self.reason}\n".encode()
        head = (
            f"HTTP/1.1 {self.status} {phrase}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode() + body


def _host_name(authority: str) -> str:
    """The lowercased name of ``host[:port]`` (``"[::1]"`` from ``"[::1]:80"``), or ``""``
    when it is not one."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        name, bracket, rest = authority.partition("]")
        name += bracket
    else:
        name, colon, rest = authority.partition(":")
        rest = colon + rest
    if rest and not _PORT.fullmatch(rest):
        return ""
    return name


def check_head(start_line: httputil.RequestStartLine, headers: httputil.HTTPHeaders) -> None:
    """Refuse a request that a page other than this machine's own could have sent.

    ``Host`` tells which name the browser used for this address: a DNS-rebinding page's
    own name, never a loopback one. ``Origin`` tells which page asked: a cross-site
    websocket (or form post) carries the page's origin even when it targets
    ``127.0.0.1``.
    """
    if not start_line.path.startswith("/") and start_line.path != "*":
        raise Refused(400, "the request target must be a path")
    hosts = headers.get_list("Host")
    if len(hosts) != 1:
        raise Refused(400, "a request needs exactly one Host header")
    if _host_name(hosts[0]) not in LOOPBACK_NAMES:
        raise Refused(
            403,
            f"the dashboard answers only at 127.0.0.1, localhost or [::1], not at {hosts[0]!r}",
        )
    origins = headers.get_list("Origin")
    if len(origins) > 1:
        raise Refused(400, "a request may carry one Origin header")
    if origins:
        origin = urllib.parse.urlsplit(origins[0].strip())
        if origin.scheme not in ("http", "https") or _host_name(origin.netloc) not in (
            LOOPBACK_NAMES
        ):
            raise Refused(
                403, f"requests from pages of other sites are refused (Origin {origins[0]!r})"
            )
    if "Transfer-Encoding" in headers:
        raise Refused(411, "send a request body with a Content-Length")


class RequestGate:
    """The browser's side of one connection, released one checked request at a time.

    Each request head is split and parsed as Tornado does (``HTTP1Connection``), checked
    by :func:`check_head`, and released with its ``Content-Length`` body; the next head
    is checked in turn, so a kept-alive connection cannot switch ``Host`` midway. After a
    request that asks to upgrade (a websocket), the rest is frames, passed as they come.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buffer = b""
        self.body_left = 0
        self.upgraded = False

    async def _more(self) -> bool:
        data = await self.reader.read(_CHUNK)
        self.buffer += data
        return bool(data)

    async def read(self) -> bytes:
        """The next bytes that may go to the dashboard; ``b""`` at the end of the stream.
        Raises :class:`Refused` for a request that must not."""
        if self.upgraded or self.body_left:
            if not self.buffer and not await self._more():
                return b""
            if self.upgraded:
                data, self.buffer = self.buffer, b""
                return data
            data, self.buffer = self.buffer[: self.body_left], self.buffer[self.body_left :]
            self.body_left -= len(data)
            return data
        while not (end := _HEAD_END.search(self.buffer)):
            if len(self.buffer) > _MAX_HEAD:
                raise Refused(431, "the request head is too large")
            if not await self._more():
                if self.buffer.strip(b"\r\n"):
                    raise Refused(400, "the connection ended inside a request head")
                return b""
        head, self.buffer = self.buffer[: end.end()], self.buffer[end.end() :]
        if len(head) > _MAX_HEAD:
            raise Refused(431, "the request head is too large")
        text = head.decode("latin1").lstrip("\r\n")
        eol = text.find("\n")
        try:
            start_line = httputil.parse_request_start_line(text[:eol].rstrip("\r"))
            headers = httputil.HTTPHeaders.parse(text[eol:])
        except (httputil.HTTPInputError, ValueError) as e:
            raise Refused(400, f"malformed request head ({e})") from None
        check_head(start_line, headers)
        self.upgraded = "Upgrade" in headers
        self.body_left = _content_length(headers)
        return head


def _content_length(headers: httputil.HTTPHeaders) -> int:
    """The body's length as Tornado reads it: repeated equal values are one value."""
    value = headers.get("Content-Length")
    if value is None:
        return 0
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1 or not re.fullmatch(r"[0-9]+", length := values.pop()):
        raise Refused(400, f"malformed Content-Length {value!r}")
    return int(length)


class _Upstream(Protocol):
    """The dashboard's side of one connection, as :func:`_pump` drives it."""

    async def send(self, data: bytes) -> None: ...

    async def receive(self) -> bool: ...

    def plaintext(self) -> bytes: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


class _PlainTCP:
    """A plain TCP connection to a dashboard served as plain HTTP (``security=False``)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._received = b""

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self) -> bool:
        """Read what the dashboard sent next; False once it closed its side."""
        self._received = await self.reader.read(_CHUNK)
        return bool(self._received)

    def plaintext(self) -> bytes:
        data, self._received = self._received, b""
        return data

    async def flush(self) -> None:
        """Nothing to flush: bytes go out as they are sent."""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class _TunnelTLS:
    """A TLS client session whose records travel as frames of a Dask comm."""

    def __init__(self, comm: Any, ctx: ssl.SSLContext) -> None:
        self.comm = comm
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=False)
        self.policy: peers.Policy = ctx.secure_cloud_policy  # type: ignore[attr-defined]

    async def flush(self) -> None:
        if data := self.outgoing.read():
            await self.comm.write(data)

    async def receive(self) -> bool:
        """Feed the next frame from the tunnel; False once the dashboard's end closed."""
        data = await self.comm.read()
        if data == peers.END:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.flush()
                if not await self.receive():
                    closed = "the dashboard closed during the handshake"
                    raise ConnectionResetError(closed) from None
        await self.flush()
        self.policy.check(self.tls.getpeercert(), False, None)

    async def send(self, data: bytes) -> None:
        self.tls.write(data)
        await self.flush()

    async def close(self) -> None:
        await self.comm.close()

    def plaintext(self) -> bytes:
        """What the dashboard sent that is ready to read."""
        chunks = []
        with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            while chunk := self.tls.read(_CHUNK):
                chunks.append(chunk)
        return b"".join(chunks)


async def _pump(gate: RequestGate, writer: asyncio.StreamWriter, session: _Upstream) -> None:
    async def browser_to_dashboard() -> None:
        # A later request that is refused ends the connection: the dashboard may be
        # answering an earlier one, so the proxy cannot answer in between.
        try:
            while data := await gate.read():
                await session.send(data)
        except Refused as refusal:
            logger.warning("dashboard proxy: refused a request: %s", refusal.reason)

    async def dashboard_to_browser() -> None:
        while True:
            more = await session.receive()
            if data := session.plaintext():
                writer.write(data)
                await writer.drain()
            await session.flush()  # TLS 1.3 may answer a key update or a ticket
            if not more:
                return

    tasks = [
        asyncio.ensure_future(browser_to_dashboard()),
        asyncio.ensure_future(dashboard_to_browser()),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
