"""What a peer's certificate may ask of a Dask server, checked before each handler runs.

A TLS connection from a member of the right role may still ask for too much: a worker's
key, stolen from its VM, could submit tasks, read published datasets or renew the lease
like a client. So each server's handler table is replaced by one that checks the
caller's role first (``GatedHandlers``): a worker certificate may call on the scheduler
only what a worker needs, on another worker only data exchange, and names no worker but
its own. The handlers only the client may call are listed here too.

Shipped to VMs inside the peer checks preload (see ``peers.py``), so it needs only the
standard library and ``distributed``.
"""

from __future__ import annotations

import functools
import inspect
import time
import weakref
from typing import Any

from .roles import Identity, logger, peer_identity

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


class GatedHandlers(dict):
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
