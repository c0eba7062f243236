"""The client's way to the scheduler's dashboard: a proxy on this machine's loopback.

The scheduler's dashboard speaks only TLS 1.3 to a client certificate of its cluster,
and listens on the scheduler VM's loopback: no firewall opens it, nobody else can reach
it. This proxy accepts plain HTTP (and websockets) from the browser on
``127.0.0.1:PORT``; for each connection it opens a Dask comm to the scheduler (mutual
TLS, client certificate), asks for the ``secure_cloud_dashboard`` tunnel, and runs a
second TLS session inside it to the dashboard itself, checking that a scheduler
certificate of the cluster answers. The scheduler only relays bytes it cannot read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

from distributed.comm import connect

from . import peers

logger = logging.getLogger(__name__)

__all__ = ["DashboardProxy"]

_CHUNK = 1 << 16


class DashboardProxy:
    """Serve ``http://127.0.0.1:PORT/`` as the scheduler's dashboard, for this process's
    browser tabs and the JupyterLab Dask extension."""

    def __init__(self, scheduler_address: str, connection_args: dict[str, Any]) -> None:
        self.scheduler_address = scheduler_address
        self.connection_args = connection_args
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.port: int | None = None

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
        try:
            comm = await connect(self.scheduler_address, timeout=10, **self.connection_args)
        except OSError as e:
            logger.warning("dashboard proxy: cannot reach the scheduler: %s", e)
            writer.close()
            self._connections.discard(task)
            return
        try:
            await comm.write({"op": "secure_cloud_dashboard", "reply": False})
            session = _TunnelTLS(comm, self.connection_args["ssl_context"])
            await session.handshake()
            await _pump(reader, writer, session)
        except (OSError, ssl.SSLError) as e:
            logger.info("dashboard proxy: connection ended: %s", e)
        except asyncio.CancelledError:
            pass  # close(): the connection ends with the proxy, not as an error
        finally:
            self._connections.discard(task)
            writer.close()
            await comm.close()


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

    def plaintext(self) -> bytes:
        """What the dashboard sent that is ready to read."""
        chunks = []
        with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            while chunk := self.tls.read(_CHUNK):
                chunks.append(chunk)
        return b"".join(chunks)


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: _TunnelTLS
) -> None:
    async def browser_to_dashboard() -> None:
        while data := await reader.read(_CHUNK):
            await session.send(data)

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
