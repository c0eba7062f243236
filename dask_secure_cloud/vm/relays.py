"""What the scheduler carries for the client, and to whom it may hand it.

The client reaches a cluster through the scheduler's port alone. Three things it needs
go further, so the scheduler relays them, as handlers only the client's certificate may
call (see ``gate.py``): enrollment lines to booting workers (public material, checked by
both ends), a worker's certificate renewal to that worker and no other, and the
dashboard's bytes, tunnelled to the scheduler's HTTP server, which answers only TLS 1.3
with a client certificate of this cluster.

Shipped to VMs inside the peer checks preload (see ``peers.py``), so it needs only the
standard library and ``distributed``.
"""

from __future__ import annotations

import ssl
from typing import Any

from .gate import RENEW
from .roles import Policy, guard_context, logger, peer_identity

#: The tunnel's end of stream: an empty frame.
END = b""


def dashboard_over_mutual_tls(scheduler: Any, policy: Policy) -> None:
    """The scheduler's HTTP server (dashboard, ``/metrics``, ``/info``) speaks only TLS
    1.3 to a ``client`` certificate of this cluster, and the client reaches it through
    the ``secure_cloud_dashboard`` tunnel on the scheduler's own port.

    Tornado reads ``ssl_options`` for each accepted connection, so setting it on the
    listening server takes effect at once.
    """
    security = scheduler.security
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=security.tls_ca_file)
    ctx.load_cert_chain(security.tls_scheduler_cert, security.tls_scheduler_key)
    guard_context(ctx, Policy(policy.cluster_id, "dashboard"))
    http_server = scheduler.http_server
    http_server.ssl_options = ctx
    address = (http_server.address, http_server.port)

    async def secure_cloud_dashboard(comm: Any) -> None:
        """Relay bytes between the client's comm and the dashboard, both ways, until
        either side ends. The TLS inside is between the client and the dashboard."""
        import asyncio

        reader, writer = await asyncio.open_connection(*address)

        async def up() -> None:
            while (data := await comm.read()) != END:
                writer.write(data)
                await writer.drain()

        async def down() -> None:
            while data := await reader.read(1 << 16):
                await comm.write(data)
            await comm.write(END)

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # a closed end is the end
            writer.close()
            await comm.close()

    scheduler.handlers["secure_cloud_dashboard"] = secure_cloud_dashboard


async def secure_cloud_enroll_relay(requests: list[Any]) -> list[Any]:
    """Carry the client's enrollment lines to booting workers (``[host, port, line]``
    each) and bring back their answers, all at once; ``{"unreachable": why}`` for a
    worker that does not answer yet, ``{"malformed": why}`` for one that answered what
    cannot be an answer. The lines hold only public material, checked by
    both ends (see ``enroll.py``), so the scheduler relays without trusting them.

    A worker that refuses the connection is about to listen (its VM is up): it is asked
    again for up to a second, so that it enrols as soon as it can instead of a round
    later."""
    import asyncio
    import json
    import time

    async def connect(host: str, port: int) -> Any:
        patience = time.monotonic() + 1.0
        while True:
            try:
                return await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            except ConnectionRefusedError:
                if time.monotonic() > patience:
                    raise
                await asyncio.sleep(0.05)

    async def one(host: str, port: int, line: Any) -> Any:
        try:
            reader, writer = await connect(host, port)
            try:
                writer.write(json.dumps(line).encode() + b"\n")
                raw = await asyncio.wait_for(reader.readline(), 15)
            finally:
                writer.close()
        except ValueError:  # the stream's limit (64 KiB): the line came, too long
            return {"malformed": "a line longer than 64 KiB"}
        except (OSError, asyncio.TimeoutError) as e:
            return {"unreachable": f"{type(e).__name__}: {e}"}
        if not raw:
            return {"unreachable": "closed without an answer"}
        # Whatever answered is untrusted, and this reply carries every worker's answer:
        # one that msgpack cannot carry (a lone surrogate, a huge integer) would fail it
        # for all. An answer is an object of strings and booleans, checked by the client.
        try:
            answer = json.loads(raw)
            if not isinstance(answer, dict) or not all(
                isinstance(value, (str, bool)) for value in answer.values()
            ):
                raise ValueError("not a JSON object of strings")
            json.dumps(answer, ensure_ascii=False).encode()
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
            return {"malformed": f"{type(e).__name__}: {e}"[:200]}
        return answer

    return list(await asyncio.gather(*(one(*request) for request in requests)))


async def renew_relay(
    scheduler: Any, address: str, step: str, cert: str | None = None, name: str | None = None
) -> Any:
    """The client's renewal of worker ``name``'s certificate, passed to that worker.

    Only a worker whose own certificate bears ``name`` is asked: the address comes from
    the client, and a key stolen from another VM must never be handed a certificate
    renewed under this name.
    """
    from distributed.comm import connect
    from distributed.core import send_recv

    if not name:
        raise PermissionError("secure_cloud_renew_relay: the client names the worker it renews")
    comm = await connect(address, **scheduler.connection_args)
    try:
        identity = peer_identity(comm)
        if identity is None or identity.role != "worker" or identity.name != name:
            found = f"{identity.role} {identity.name}" if identity else "no identity"
            logger.warning("refused to relay %s's renewal to %s: %s", name, address, found)
            raise PermissionError(
                f"dask-secure-cloud: the worker at {address} is not {name} "
                f"(its certificate names {found}): renewal refused"
            )
        return await send_recv(comm, op=RENEW, step=step, cert=cert, reply=True)
    finally:
        await comm.close()
