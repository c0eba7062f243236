"""Who a peer is, and which peers a TLS connection accepts.

Every member of a cluster holds a certificate from the cluster's own CA whose SAN URI,
``dask-secure-cloud://CLUSTER/ROLE/NAME``, says which cluster it belongs to, what it is
(``Role``) and which VM it is. A certificate from the right CA proves membership only;
the role is what limits the holder. This module reads that identity and makes a TLS
context refuse, right after the handshake, a peer whose role may not be at the other end
(``Policy``, ``guard_context``).

The identity format and the roles are defined here, on the VM's side, once: the client
imports them. Shipped to VMs inside the peer checks preload (see ``peers.py``), so it
needs only the standard library.
"""

from __future__ import annotations

import enum
import logging
import ssl
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


def guarded_contexts() -> weakref.WeakSet[ssl.SSLContext]:
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
    guarded_contexts().add(ctx)
    return ctx


def peer_identity(comm: Any) -> Identity | None:
    """The identity in the certificate at the other end of ``comm``, or ``None``."""
    return identity_of(getattr(comm, "extra_info", {}).get("peercert"))


def peer_role(comm: Any) -> str | None:
    identity = peer_identity(comm)
    return identity.role if identity else None
