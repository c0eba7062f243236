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

This module is the preload that puts the rules in place on each Dask server; the rules
themselves are in its siblings: who a peer is and which roles a connection accepts
(``roles.py``), what a caller may ask (``gate.py``), the certificate renewed in place
(``certificate.py``) and what the scheduler relays for the client (``relays.py``). They
need only the standard library and ``distributed``. A VM has no ``dask_secure_cloud``
package: it gets them as one file, this module last, their imports of each other dropped
and a ``SETTINGS`` line appended (``preloads.shipped_module``), which Dask loads with
``--preload``. The client imports them as modules.
"""

from __future__ import annotations

import functools
import ssl
from typing import Any

from .certificate import renewable
from .gate import GatedHandlers, worker_request_refused
from .relays import END, dashboard_over_mutual_tls, renew_relay, secure_cloud_enroll_relay
from .roles import URI_SCHEME, Identity, Policy, Role, guard_context

#: What the client and the tests use, wherever it is defined.
__all__ = [
    "END",
    "URI_SCHEME",
    "Identity",
    "Policy",
    "Role",
    "dask_setup",
    "dask_setup_nanny",
    "guard_context",
    "guard_process",
    "protect",
    "secure_cloud_enroll_relay",
    "worker_request_refused",
]


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
    server.handlers = GatedHandlers(server.handlers, kind, policy.workers_as_clients, server)
    renewable(server, kind, settings)
    if kind == "scheduler":
        server.handlers["secure_cloud_enroll_relay"] = secure_cloud_enroll_relay
        server.handlers["secure_cloud_renew_relay"] = functools.partial(renew_relay, server)
        if getattr(server, "http_server", None) is not None:
            dashboard_over_mutual_tls(server, policy)
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
