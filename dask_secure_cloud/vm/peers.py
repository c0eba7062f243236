"""Peers check each other's role, not only each other's CA.

A certificate signed by the cluster's CA proves membership, not what the holder may do.
Without this module any member's key could pose as the scheduler, or act as a client:
run code on every VM, read published datasets and keep the cluster alive by renewing
its lease. Every TLS connection made or accepted here checks the peer's identity (the
SAN URI ``dask-secure-cloud://CLUSTER/ROLE/NAME``) right after the handshake, and every
request a worker certificate makes is checked against what a worker needs.

The rules, by who holds the connection's other end:

- a client talks only to a ``scheduler`` of its own cluster;
- a worker (and its nanny) accepts only the ``scheduler`` at the scheduler's address,
  and only ``worker`` peers elsewhere; it accepts connections from the scheduler and
  from workers;
- the scheduler accepts clients and workers, and connects only to workers;
- a worker certificate may call on the scheduler only what a worker needs
  (registration, heartbeats, data location, P2P shuffles), and on another worker only
  data exchange, unless the cluster lets workers act as clients (``workers_as_clients``,
  which ``get_client()`` inside a task needs); the lease and the identity handlers
  answer the client's certificate alone, always;
- a worker certificate registers a Dask worker only under the name in the certificate
  (always: the client renews each VM's certificate through the worker it finds, and a
  name is how the scheduler and ``SpecCluster`` tell VMs apart), and, unless it may act
  as a client, removes, retires or speaks for no worker but its own;
- the scheduler relays a renewal only to a worker whose certificate bears the name the
  client renews.

This file needs only the standard library and ``distributed``: VMs run it verbatim as a
Dask preload (with a ``SETTINGS`` line appended), and the client uses it in-process.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import os
import ssl
import subprocess
import time
import weakref
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("distributed.secure_cloud.peers")

#: A member's identity is the SAN URI ``dask-secure-cloud://CLUSTER/ROLE/NAME`` of its
#: certificate; defined here, on the VM's side, and imported by the client.
URI_SCHEME = "dask-secure-cloud"
URI_PREFIX = f"{URI_SCHEME}://"


class Role(str, enum.Enum):
    """What a certificate's holder is allowed to be in the cluster."""

    SCHEDULER = "scheduler"
    WORKER = "worker"
    CLIENT = "client"


#: What a worker's own code calls on the scheduler (distributed's worker, nanny and
#: P2P shuffle extension). Anything else is a client's power.
WORKER_OPS_ON_SCHEDULER = frozenset(
    {
        "register-worker",
        "register_nanny",
        "heartbeat_worker",
        "unregister",
        "retire_workers",
        "who_has",
        "add_keys",
        "log_event",
        "get_metadata",
        "set_metadata",
        "shuffle_barrier",
        "shuffle_get",
        "shuffle_get_or_create",
        "shuffle_restrict_task",
        "identity",
        "versions",
    }
)
#: Worker operations on the scheduler that name a worker (by address, or by name): a
#: worker certificate may name only its own worker in them. Each maps to the keyword
#: that names the target(s).
WORKER_TARGETS = {
    "unregister": "address",
    "heartbeat_worker": "address",
    "add_keys": "worker",
    "retire_workers": "workers",
}
#: What one worker asks of another: its data, and P2P shuffle transfers.
WORKER_OPS_ON_WORKER = frozenset(
    {"get_data", "shuffle_receive", "shuffle_inputs_done", "identity", "versions"}
)
#: What a worker process asks of its own nanny.
WORKER_OPS_ON_NANNY = frozenset({"close_gracefully", "identity", "versions"})
#: A worker acting as a client (``workers_as_clients``) also scatters and gathers directly.
CLIENT_OPS_ON_WORKER = frozenset({"update_data", "gather"})
#: Handlers only the client's own certificate may call, whatever the settings.
CLIENT_CERTIFICATE_ONLY = frozenset(
    {
        "secure_cloud_lease",
        "secure_cloud_dashboard",
        "secure_cloud_enroll_relay",
        "secure_cloud_renew_relay",
    }
)
#: Renewing a VM's certificate: the client asks the scheduler, the scheduler a worker.
RENEW = "secure_cloud_renew"
#: The tunnel's end of stream: an empty frame.
END = b""


@dataclass(frozen=True)
class Identity:
    cluster_id: str
    role: str
    name: str


def identity_of(peercert: dict[str, Any] | None) -> Identity | None:
    """The identity in a peer certificate as ``ssl`` decodes it, or ``None``."""
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        if kind == "URI" and value.startswith(URI_PREFIX):
            parts = value[len(URI_PREFIX) :].split("/", 2)
            if len(parts) == 3:
                return Identity(*parts)
    return None


class PeerRefused(ssl.SSLCertVerificationError):
    """The peer's certificate is from this cluster's CA but names the wrong role."""


@dataclass(frozen=True)
class Policy:
    """Who this process (``role`` in ``cluster_id``) may talk to."""

    cluster_id: str
    role: str
    #: A worker's scheduler, ``(host, port)``: where only a scheduler may answer.
    scheduler: tuple[str, int] | None = None
    workers_as_clients: bool = False

    def allowed(self, server_side: bool, peer: tuple[str, int] | None) -> frozenset[str]:
        if self.role == "client":
            return frozenset({"scheduler"})
        if self.role == "dashboard":
            return frozenset({"client"})
        if self.role == "scheduler":
            return frozenset({"client", "worker"} if server_side else {"worker"})
        # a worker or its nanny
        if server_side:
            return frozenset({"scheduler", "worker"})
        if peer is not None and peer == self.scheduler:
            return frozenset({"scheduler"})
        return frozenset({"worker"})

    def check(
        self, peercert: dict[str, Any] | None, server_side: bool, peer: tuple[str, int] | None
    ) -> None:
        identity = identity_of(peercert)
        allowed = self.allowed(server_side, peer)
        if identity is None or identity.cluster_id != self.cluster_id:
            raise PeerRefused(
                ssl.SSL_ERROR_SSL,
                f"peer certificate names no member of cluster {self.cluster_id}",
            )
        if identity.role not in allowed:
            raise PeerRefused(
                ssl.SSL_ERROR_SSL,
                f"a {identity.role} certificate ({identity.name}) may not act as "
                f"{' or '.join(sorted(allowed))} towards this {self.role}",
            )


class _RoleCheckedSocket(ssl.SSLSocket):
    """An ``SSLSocket`` that refuses a peer of the wrong role once the handshake is done.

    Tornado drives the handshake by calling ``do_handshake`` until it stops asking for
    more data; raising here closes the stream like any failed verification would.
    """

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        policy: Policy = self.context.secure_cloud_policy  # type: ignore[attr-defined]
        host, port = self.getpeername()[:2]
        try:
            policy.check(self.getpeercert(), self.server_side, (host, port))
        except PeerRefused as e:
            logger.warning("refused the TLS peer %s:%s: %s", host, port, e.args[-1])
            raise


def _contexts() -> weakref.WeakSet[ssl.SSLContext]:
    """Every context this process guarded: a renewed certificate is loaded into each.

    Kept on ``ssl.SSLContext`` itself, not in this module: Dask imports a preload file
    once per server (a worker's process may hold two copies of this module).
    """
    registry = getattr(ssl.SSLContext, "secure_cloud_contexts", None)
    if registry is None:
        registry = weakref.WeakSet()
        ssl.SSLContext.secure_cloud_contexts = registry  # type: ignore[attr-defined]
    return registry


def guard_context(ctx: ssl.SSLContext, policy: Policy) -> ssl.SSLContext:
    """Make every connection of ``ctx`` check its peer's role (in place: contexts are
    shared by every pool and listener that was handed them)."""
    ctx.secure_cloud_policy = policy  # type: ignore[attr-defined]
    ctx.sslsocket_class = _RoleCheckedSocket
    _contexts().add(ctx)
    return ctx


def _not_after(path: str) -> float:
    """When the certificate in ``path`` expires (epoch seconds), by the ``ssl`` module's
    own decoder: a VM's Python may have nothing else."""
    decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    return float(ssl.cert_time_to_seconds(decoded["notAfter"]))


def _openssl(*args: str) -> str:
    done = subprocess.run(("openssl", *args), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]}: {done.stderr.strip()}")
    return done.stdout


class _Certificate:
    """This VM's certificate and key (one file, ``node.pem``) over the server's life.

    The client renews it well before it expires through ``secure_cloud_renew``: a fresh
    key made here (``request``, which answers a certificate request), then the signed
    certificate (``install``), which replaces ``node.pem`` in one rename and is loaded
    into every live TLS context, so new connections use it and none is dropped. A
    nanny, which shares the file with its worker, reloads it when it changes. When the
    certificate expires unrenewed (the client is gone) the server closes, and the VM
    powers off: a second guard besides the scheduler's lease.
    """

    def __init__(self, server: Any, path: str, name: str) -> None:
        self.server = server
        self.path = path
        self.name = name
        self._pending = path + ".next-key"
        self._stamp = self._mtime()
        self.not_after = _not_after(path)

    def _mtime(self) -> int:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return 0

    async def renew(self, step: str, cert: str | None = None) -> Any:
        import asyncio

        if step == "request":
            return await asyncio.to_thread(self._request)
        if step == "install" and isinstance(cert, str):
            return await asyncio.to_thread(self._install, cert)
        raise ValueError("secure_cloud_renew: step is 'request', or 'install' with a cert")

    def _request(self) -> str:
        old = os.umask(0o077)
        try:
            return _openssl(
                "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-keyout", self._pending, "-subj", f"/CN={self.name}",
            )  # fmt: skip
        finally:
            os.umask(old)

    def _install(self, cert: str) -> float:
        fresh = self.path + ".new"
        old = os.umask(0o077)
        try:
            with open(fresh, "w") as f, open(self._pending) as key:
                f.write(cert.strip() + "\n" + key.read())
        finally:
            os.umask(old)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(fresh)  # matches the key
        except ssl.SSLError as e:
            os.unlink(fresh)
            raise ValueError(f"the certificate does not match this VM's new key: {e}") from None
        os.replace(fresh, self.path)
        os.unlink(self._pending)
        self.reload()
        return self.not_after

    def reload(self) -> None:
        """Load ``node.pem`` into every live context if it changed."""
        stamp = self._mtime()
        if stamp == self._stamp:
            return
        contexts = list(_contexts())
        try:
            for ctx in contexts:
                ctx.load_cert_chain(self.path)
            self.not_after = _not_after(self.path)
        except (OSError, ssl.SSLError) as e:
            logger.warning("could not load the renewed certificate yet: %s", e)
            return
        self._stamp = stamp
        logger.info(
            "certificate renewed: valid until %s, in %d TLS contexts",
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.not_after)),
            len(contexts),
        )

    def check(self) -> None:
        self.reload()
        if time.time() < self.not_after:
            return
        import asyncio

        logger.error(
            "this VM's certificate expired and its cluster manager did not renew it: closing"
        )
        self.server.periodic_callbacks.pop("secure-cloud-identity").stop()
        self.closing = asyncio.ensure_future(self.server.close())


def peer_identity(comm: Any) -> Identity | None:
    """The identity in the certificate at the other end of ``comm``, or ``None``."""
    return identity_of(getattr(comm, "extra_info", {}).get("peercert"))


def peer_role(comm: Any) -> str | None:
    identity = peer_identity(comm)
    return identity.role if identity else None


def may_call(server_kind: str, peer: str | None, op: str, workers_as_clients: bool) -> bool:
    """Whether a peer of role ``peer`` may call handler ``op`` on a ``server_kind``."""
    if op in CLIENT_CERTIFICATE_ONLY:
        return peer == "client"
    if op == RENEW:
        return peer == ("client" if server_kind == "scheduler" else "scheduler")
    if peer in ("client", "scheduler"):
        return True
    if peer != "worker":
        return False
    if server_kind == "scheduler":
        return workers_as_clients or op in WORKER_OPS_ON_SCHEDULER
    if server_kind == "nanny":
        return op in WORKER_OPS_ON_NANNY
    if workers_as_clients and op in CLIENT_OPS_ON_WORKER:
        return True
    return op in WORKER_OPS_ON_WORKER


def names_worker(certificate_name: str, dask_name: Any) -> bool:
    """Whether a Dask worker named ``dask_name`` belongs to the VM whose certificate is
    named ``certificate_name``: the same name, or ``NAME-i`` (``dask worker --name NAME
    --nworkers N`` names its processes so; no VM is named so)."""
    dask_name = str(dask_name)
    if dask_name == certificate_name:
        return True
    head, _, tail = dask_name.rpartition("-")
    return head == certificate_name and tail.isdigit()


def _targeted_worker(scheduler: Any, target: Any, resolve: bool) -> Any:
    """The scheduler's ``WorkerState`` that ``target`` (an address or a name) designates,
    as the handler itself would find it, or ``None`` if it designates none.

    Raises ``PermissionError`` for a target the scheduler could not read: a worker never
    sends one."""
    workers = scheduler.workers
    try:
        if target in workers:
            return workers[target]
        return workers.get(scheduler.coerce_address(target, resolve))
    except (TypeError, ValueError, OSError) as e:
        raise PermissionError(f"not a worker's address: {target!r}") from e


def worker_request_refused(
    scheduler: Any, identity: Identity, op: str, msg: dict[str, Any]
) -> str | None:
    """Why the scheduler refuses ``op`` (with arguments ``msg``) from the worker
    certificate ``identity``, or ``None`` if it may.

    A worker's certificate is its VM's alone: it registers under its own name, and it
    names no other worker in what it asks. The scheduler's state tells whose a worker is,
    because every registration was checked here. A target that designates no worker is
    let through: the handler finds nothing to act on either.
    """
    own = identity.name
    if op == "register-worker":
        name = msg.get("name")
        if not names_worker(own, name):
            return f"a worker certificate for {own} may not register a Dask worker named {name!r}"
        return None
    keyword = WORKER_TARGETS.get(op)
    if keyword is None:
        return None
    if op == "retire_workers":
        names = msg.get("names")
        addresses = msg.get("workers")
        if names is None and addresses is None:
            return (
                f"a worker certificate for {own} may retire only its own worker, named in "
                "workers= or names="
            )
        others = [n for n in names or () if not names_worker(own, n)]
        if others:
            return f"a worker certificate for {own} may not retire {others!r}"
        targets = list(addresses or ())
    else:
        targets = [msg.get(keyword)]
    resolve = bool(msg.get("resolve_address", True))
    for target in targets:
        ws = _targeted_worker(scheduler, target, resolve)
        if ws is not None and not names_worker(own, ws.name):
            return (
                f"a worker certificate for {own} may not call {op!r} for worker "
                f"{ws.name!r} at {ws.address}"
            )
    return None


class _GatedHandlers(dict):
    """A server's handler table whose entries first check who calls them.

    Handlers registered later (by plugins, extensions or other preloads) are gated too,
    because the check happens when a handler is looked up, not when it is added.
    """

    def __init__(
        self,
        handlers: dict[str, Any],
        kind: str,
        workers_as_clients: bool,
        server: Any = None,
    ) -> None:
        super().__init__(handlers)
        self.kind = kind
        self.workers_as_clients = workers_as_clients
        # The scheduler's state says whose each worker is; weak, as the server holds us.
        self.server = weakref.ref(server) if server is not None else None
        # Every message looks its handler up: wrap each handler once, not per message.
        self._gated: dict[str, tuple[Any, Any]] = {}

    def __getitem__(self, op: str) -> Any:
        handler = super().__getitem__(op)
        cached = self._gated.get(op)
        if cached is None or cached[0] is not handler:
            cached = (
                handler,
                _gate(handler, op, self.kind, self.workers_as_clients, self.server),
            )
            self._gated[op] = cached
        return cached[1]


def _gate(
    handler: Any,
    op: str,
    kind: str,
    workers_as_clients: bool,
    server: weakref.ref[Any] | None = None,
) -> Any:
    params = inspect.signature(handler).parameters
    wants_comm = bool(params) and next(iter(params)) == "comm"
    # What a worker asks of the scheduler about workers: always its registration's
    # name; the rest unless workers may act as clients, who may do all of it anyway.
    checks_target = kind == "scheduler" and (
        op == "register-worker" or (op in WORKER_TARGETS and not workers_as_clients)
    )

    @functools.wraps(handler)
    def gated(comm: Any, *args: Any, **kwargs: Any) -> Any:
        identity = peer_identity(comm)
        peer = identity.role if identity else None
        if not may_call(kind, peer, op, workers_as_clients):
            logger.warning("refused %r from a %s certificate at %s", op, peer, comm.peer_address)
            hint = (
                " (tasks that call get_client() need the cluster option workers_as_clients=True)"
                if peer == "worker" and kind == "scheduler" and op not in CLIENT_CERTIFICATE_ONLY
                else ""
            )
            message = (
                f"dask-secure-cloud: a {peer or 'certificate-less'} peer may not call "
                f"{op!r} on the {kind}{hint}"
            )
            if op == "register-client":
                # A client registers without asking for a reply; this is the one answer
                # it reads (distributed raises the "error" it carries).
                return _refuse_client(comm, message)
            raise PermissionError(message)
        scheduler = server() if server is not None else None
        if checks_target and peer == "worker" and identity is not None and scheduler is not None:
            why = worker_request_refused(scheduler, identity, op, kwargs)
            if why is not None:
                logger.warning("refused %r from %s: %s", op, comm.peer_address, why)
                message = f"dask-secure-cloud: {why}"
                if op == "register-worker":
                    return _refuse_worker(comm, message)
                raise PermissionError(message)
        return handler(comm, *args, **kwargs) if wants_comm else handler(*args, **kwargs)

    gated.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("comm", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [p for i, p in enumerate(params.values()) if not (wants_comm and i == 0)]
    )
    return gated


async def _refuse_worker(comm: Any, message: str) -> None:
    """A worker registers without asking for a reply and reads one answer: this one
    makes it stop with ``message``, as a taken name would."""
    await comm.write({"status": "error", "message": message, "time": time.time()})
    await comm.close()


async def _refuse_client(comm: Any, message: str) -> None:
    await comm.write([{"op": "stream-start", "error": message}])
    await comm.close()


def _server_kind(server: Any) -> str:
    from distributed import Nanny, Scheduler

    if isinstance(server, Scheduler):
        return "scheduler"
    if isinstance(server, Nanny):
        return "nanny"
    return "worker"


def _server_contexts(server: Any) -> list[ssl.SSLContext]:
    contexts = [server.connection_args.get("ssl_context")]
    for listener in getattr(server, "listeners", ()):
        # distributed's TLS listener hands its context to a Tornado TCPServer.
        contexts.append(getattr(listener, "server_args", {}).get("ssl_options"))
        tcp_server = getattr(listener, "tcp_server", None)
        contexts.append(getattr(tcp_server, "ssl_options", None))
    return [c for c in contexts if isinstance(c, ssl.SSLContext)]


def _dashboard_over_mutual_tls(scheduler: Any, policy: Policy) -> None:
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


async def _renew_relay(
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


def _renewable(server: Any, kind: str, settings: dict[str, Any]) -> None:
    """Renew this server's certificate in place, and end it when it expires unrenewed.

    Only an enrolled VM's ``node.pem`` (certificate and key in one file) is renewed; a
    user's own certificates are theirs to manage.
    """
    from tornado.ioloop import PeriodicCallback

    own = "scheduler" if kind == "scheduler" else "worker"
    path = getattr(server.security, f"tls_{own}_cert", None)
    if not path or path != getattr(server.security, f"tls_{own}_key", None):
        return
    # The request names this VM as its certificate does (the client refuses any other).
    identity = identity_of(ssl._ssl._test_decode_cert(path))  # type: ignore[attr-defined]
    certificate = _Certificate(server, path, identity.name if identity else own)
    if kind == "nanny":
        # Its worker renews the file they share; the nanny only reloads it.
        callback = PeriodicCallback(certificate.reload, 5000)
    else:
        server.handlers[RENEW] = certificate.renew
        callback = PeriodicCallback(certificate.check, 5000)
    server.periodic_callbacks["secure-cloud-identity"] = callback
    callback.start()


def _policy(settings: dict[str, Any]) -> Policy:
    return Policy(
        cluster_id=settings["cluster_id"],
        role=settings["role"],
        scheduler=tuple(settings["scheduler"]) if settings.get("scheduler") else None,
        workers_as_clients=bool(settings.get("workers_as_clients")),
    )


def guard_process(settings: dict[str, Any]) -> None:
    """Every TLS context this process makes from now on checks its peers' roles."""
    from distributed.security import Security

    original = Security._get_tls_context
    if getattr(original, "secure_cloud_guarded", False):
        return
    policy = _policy(settings)

    def _get_tls_context(self: Security, tls: Any, purpose: Any) -> Any:
        ctx = original(self, tls, purpose)
        return guard_context(ctx, policy) if ctx is not None else ctx

    _get_tls_context.secure_cloud_guarded = True  # type: ignore[attr-defined]
    Security._get_tls_context = _get_tls_context  # type: ignore[method-assign]


def protect(server: Any, settings: dict[str, Any]) -> None:
    """Guard one Dask server: its contexts check peers, its handlers check callers."""
    policy = _policy(settings)
    for ctx in _server_contexts(server):
        guard_context(ctx, policy)
    kind = _server_kind(server)
    server.handlers = _GatedHandlers(server.handlers, kind, policy.workers_as_clients, server)
    _renewable(server, kind, settings)
    if kind == "scheduler":
        server.handlers["secure_cloud_enroll_relay"] = secure_cloud_enroll_relay
        server.handlers["secure_cloud_renew_relay"] = functools.partial(_renew_relay, server)
        if getattr(server, "http_server", None) is not None:
            _dashboard_over_mutual_tls(server, policy)
    if kind == "worker":
        # A task's get_client() connects with the worker's own certificate; whether the
        # scheduler lets it act as a client is the scheduler's decision.
        security = server.security
        security.tls_client_cert = security.tls_worker_cert
        security.tls_client_key = security.tls_worker_key


#: Replaced by the line appended when this file is shipped to a VM as a preload.
SETTINGS: dict[str, Any] = {}


def dask_setup(server: Any) -> None:
    guard_process(SETTINGS)
    protect(server, SETTINGS)


if SETTINGS:
    # Shipped as a preload: guard the contexts the server makes after this import.
    guard_process(SETTINGS)


dask_setup_nanny = dask_setup
