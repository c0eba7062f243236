"""A cluster's own certificate authority and the leaf certificates it issues.

Every cluster gets a fresh CA (ECDSA P-256) whose private key exists only as an object
in this process: it is never serialised, logged, pickled or shipped. The CA certifies
the key each VM makes for itself (``enrollment.py``, ``renewal.py``), and makes the
client's own leaf. Each leaf names its
cluster and role in a SAN URI ``dask-secure-cloud://CLUSTER/ROLE/NAME`` so that a peer
can check who it talks to, and its extended key usage binds what it may do: the client's
certificate can only authenticate a client, never serve as a scheduler or worker.

Every leaf lives hours (``certificate_lifetime``), the client's own included, and is
renewed while the client runs; the CA lives as long as the cluster may
(``max_lifetime``). A VM loads its renewed certificate into its live TLS contexts
(``vm/certificate.py``); the client does the same here (:meth:`ClusterCredentials.renew_client`):
a :class:`ClusterSecurity` keeps every context it handed out and reloads each, so pools,
``Client`` objects and the dashboard proxy made from it go on, and new connections use the
new certificate.

``ssl`` loads a certificate and key only from a path, and the client's key must not be
written to disk: :func:`_pem_path` gives it a path to an anonymous in-memory file
(``memfd``) instead, open only while ``load_cert_chain`` reads it. Where there is no
``memfd`` (macOS, Windows) the fallback is what ``distributed`` itself does for an
in-memory key: a file of mode 0600 in a fresh 0700 directory, deleted at once.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import ssl
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from distributed.security import Security

from .errors import OptionError
from .options.base import duration
from .vm import peers
from .vm.peers import URI_SCHEME, Role

__all__ = [
    "DEFAULT_CERTIFICATE_LIFETIME",
    "DEFAULT_LIFETIME",
    "URI_SCHEME",
    "ClusterCredentials",
    "ClusterSecurity",
    "LeafCredentials",
    "Role",
    "parse_identity",
]

logger = logging.getLogger(__name__)

#: The CA's lifetime when none is given (clusters pass their ``max_lifetime``).
DEFAULT_LIFETIME = datetime.timedelta(hours=24)
#: A leaf's lifetime when none is given: ``certificate_lifetime``'s default. The client's
#: own certificate and a portable one live this long, not as long as the CA.
DEFAULT_CERTIFICATE_LIFETIME = datetime.timedelta(hours=4)
#: Certificates start this far in the past so that a VM whose clock lags still accepts
#: them.
CLOCK_SKEW = datetime.timedelta(minutes=5)

# Schedulers and workers both accept and open connections; a client only opens them.
_USAGES = {
    Role.SCHEDULER: [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    Role.WORKER: [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    Role.CLIENT: [ExtendedKeyUsageOID.CLIENT_AUTH],
}


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@contextlib.contextmanager
def _pem_path(pem: str) -> Iterator[str]:
    """A path that reads as ``pem`` inside the block, for ``SSLContext.load_cert_chain``,
    which takes paths only: the client's key must not become a file on disk.

    On Linux the path is an anonymous in-memory file (``memfd_create``), reached through
    ``/proc/self/fd`` and gone when the block ends; only a process that could read this
    one's memory could open it. Elsewhere, a 0600 file in a fresh 0700 directory, removed
    when the block ends: what ``distributed`` does for an in-memory key.
    """
    data = pem.encode()
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("dask-secure-cloud-client", os.MFD_CLOEXEC)
        try:
            _write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="dask-secure-cloud-") as directory:
        path = os.path.join(directory, "client.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        try:
            yield path
        finally:
            os.unlink(path)


def fingerprint(cert_pem: str) -> str:
    """SHA-256 fingerprint of a PEM certificate, as colon-separated hex."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def parse_identity(cert: x509.Certificate) -> tuple[str, Role, str]:
    """Return ``(cluster_id, role, name)`` from a leaf certificate's SAN URI.

    Raises ``ValueError`` when the certificate carries no identity of ours.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as e:
        raise OptionError("certificate has no subjectAltName") from e
    prefix = f"{URI_SCHEME}://"
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(prefix):
            cluster_id, role, name = uri[len(prefix) :].split("/", 2)
            return cluster_id, Role(role), name
    raise OptionError(f"certificate has no {prefix} identity")


@dataclass(frozen=True, repr=False)
class LeafCredentials:
    """One holder's certificate, private key and the cluster CA certificate, as PEM.

    The ``key_pem`` never appears in ``repr``: only the role, name and expiry do.
    """

    role: Role
    name: str
    cert_pem: str
    key_pem: str = field(compare=False)
    ca_pem: str
    not_after: datetime.datetime

    def __repr__(self) -> str:
        return (
            f"LeafCredentials(role={self.role.value!r}, name={self.name!r}, "
            f"not_after={self.not_after.isoformat()})"
        )

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)


class ClusterCredentials:
    """The CA of one cluster, living in memory only, and the leaves it signs.

    >>> creds = ClusterCredentials("abc123")
    >>> worker = creds.issue(Role.WORKER, "worker-0")
    >>> security = creds.client_security()

    ``lifetime`` is the CA's (``max_lifetime``); ``certificate_lifetime`` the client's
    own leaf's and a portable one's, as the VMs' (a cluster passes its option).

    Instances refuse to be pickled or copied so that the CA key cannot travel by
    accident (for example inside a cluster object sent to a worker).
    """

    def __init__(
        self,
        cluster_id: str,
        lifetime: datetime.timedelta = DEFAULT_LIFETIME,
        *,
        certificate_lifetime: datetime.timedelta = DEFAULT_CERTIFICATE_LIFETIME,
        now: datetime.datetime | None = None,
    ) -> None:
        if not isinstance(lifetime, datetime.timedelta) or lifetime <= datetime.timedelta(0):
            raise OptionError(
                f"max_lifetime must be a positive duration such as '7d', got {lifetime!r}"
            )
        self.certificate_lifetime = duration(certificate_lifetime, "certificate_lifetime")
        if not cluster_id or "/" in cluster_id:
            raise OptionError(f"cluster_id must be a non-empty string without '/': {cluster_id!r}")
        self.cluster_id = cluster_id
        self.lifetime = lifetime
        self.not_before = (now or datetime.datetime.now(datetime.timezone.utc)) - CLOCK_SKEW
        self.not_after = self.not_before + CLOCK_SKEW + lifetime
        self.__ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dask-secure-cloud"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"dask-secure-cloud CA {cluster_id}"),
            ]
        )
        ca_public = self.__ca_key.public_key()
        self._ca_name = name
        self._ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_public)
        self._ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(self._ca_ski, critical=False)
            .sign(self.__ca_key, hashes.SHA256())
        )
        self.ca_cert_pem = _pem_cert(self._ca_cert)
        self.ca_fingerprint = self._ca_cert.fingerprint(hashes.SHA256()).hex(":").upper()
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ca_ski)
        self._client: LeafCredentials | None = None
        #: The Securities holding this client's own key: a renewal reaches each.
        self._securities: weakref.WeakSet[ClusterSecurity] = weakref.WeakSet()

    def issue(
        self,
        role: Role | str,
        name: str,
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> LeafCredentials:
        """Make a key here and sign it: for the client itself, for a user's other
        processes, and for a given ``Security``-less test. VMs make their own keys and
        are certified with :meth:`certify`."""
        role = Role(role)
        key = ec.generate_private_key(ec.SECP256R1())
        not_after = min(not_after or self.not_after, self.not_after)
        cert_pem = self.certify(
            role, name, key.public_key(), not_before=not_before, not_after=not_after
        )
        return LeafCredentials(
            role=role,
            name=name,
            cert_pem=cert_pem,
            key_pem=_pem_key(key),
            ca_pem=self.ca_cert_pem,
            not_after=not_after,
        )

    def certify(
        self,
        role: Role | str,
        name: str,
        public_key: Any,
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> str:
        """A PEM certificate binding ``public_key`` to ``role`` and ``name`` in this
        cluster, valid as long as the CA unless ``not_before``/``not_after`` say
        otherwise. The identity comes from the caller, never from the key's holder."""
        role = Role(role)
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise OptionError(f"{name}: only ECDSA P-256 keys are certified")
        if not name or "/" in name:
            raise OptionError(f"certificate name must be non-empty and without '/': {name!r}")
        not_before = not_before or self.not_before
        not_after = min(not_after or self.not_after, self.not_after)
        identity = f"{URI_SCHEME}://{self.cluster_id}/{role.value}/{name}"
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.cluster_id),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                        x509.NameAttribute(NameOID.COMMON_NAME, name),
                    ]
                )
            )
            .issuer_name(self._ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage(_USAGES[role]), critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self.__ca_key, hashes.SHA256())
        )
        return _pem_cert(cert)

    def _client_leaf(
        self, name: str, lifetime: datetime.timedelta, now: datetime.datetime | None = None
    ) -> LeafCredentials:
        """A client leaf living ``lifetime`` from ``now``, within the CA's life."""
        # Never before the CA's start (a CA made with a given ``now`` in the future), and
        # in whole seconds, as a certificate holds it: ``not_after`` is then exact.
        now = max(
            now or datetime.datetime.now(datetime.timezone.utc), self.not_before + CLOCK_SKEW
        ).replace(microsecond=0)
        return self.issue(Role.CLIENT, name, not_before=now - CLOCK_SKEW, not_after=now + lifetime)

    @property
    def client(self) -> LeafCredentials:
        """The client's own leaf: its key stays in this process. It lives
        ``certificate_lifetime``, and :meth:`renew_client` replaces it."""
        if self._client is None:
            self._client = self._client_leaf("client", self.certificate_lifetime)
        return self._client

    def renew_client(self, now: datetime.datetime | None = None) -> LeafCredentials | None:
        """Give the client a fresh key and certificate once less than half its life is
        left, as the VMs get (``renewal.py``), and load them into every TLS context
        made from each :meth:`client_security`: pools, ``Client`` objects and the
        dashboard proxy keep their live connections, and new ones use the new
        certificate. Returns the new leaf, or ``None`` when none was due.

        The cluster calls this periodically while it lives: a client that is gone
        renews nothing, and its certificate expires within ``certificate_lifetime``.
        """
        now = now or datetime.datetime.now(datetime.timezone.utc)
        current = self.client
        if current.not_after >= self.not_after:
            return None  # it ends with the CA: no later certificate can be signed
        if current.not_after - now >= self.certificate_lifetime / 2:
            return None
        leaf = self._client_leaf("client", self.certificate_lifetime, now)
        try:
            contexts = sum(security.install(leaf) for security in list(self._securities))
        except (OSError, ssl.SSLError) as e:
            # Retried at the next call, well before the current one expires.
            logger.warning("Renewing the client's certificate failed: %s", e)
            return None
        self._client = leaf
        logger.info(
            "Cluster %s: the client's certificate was renewed, valid until %s UTC, in %d "
            "TLS contexts",
            self.cluster_id,
            f"{leaf.not_after:%Y-%m-%d %H:%M:%S}",
            contexts,
        )
        return leaf

    def client_security(self) -> Security:
        """A ``distributed.Security`` holding the client's key in memory, renewed in
        place by :meth:`renew_client`.

        Encryption is required and TLS 1.3 is the minimum: both ends are ours, so
        there is no older peer to accommodate.
        """
        client = self.client
        security = ClusterSecurity(
            self.cluster_id,
            require_encryption=True,
            tls_ca_file=client.ca_pem,
            tls_client_cert=client.cert_pem,
            tls_client_key=client.key_pem,
            tls_min_version=ssl.TLSVersion.TLSv1_3,
        )
        self._securities.add(security)
        return security

    def portable_client_security(
        self, name: str, lifetime: datetime.timedelta | str | float | None = None
    ) -> Security:
        """A ``Security`` with a client certificate of its own, made to be handed to
        another process (pickled, or written out): it holds that new key, never this
        client's. Nothing can renew it once handed over, so it lives ``lifetime``
        (``certificate_lifetime`` unless given), and never past the CA's end."""
        if name == "client":
            raise OptionError("name: 'client' is this process's own certificate; choose another")
        lifetime = self.certificate_lifetime if lifetime is None else duration(lifetime, "lifetime")
        leaf = self._client_leaf(name, lifetime)
        return ClusterSecurity(
            self.cluster_id,
            portable=True,
            require_encryption=True,
            tls_ca_file=leaf.ca_pem,
            tls_client_cert=leaf.cert_pem,
            tls_client_key=leaf.key_pem,
            tls_min_version=ssl.TLSVersion.TLSv1_3,
        )

    def remaining(self, now: datetime.datetime | None = None) -> datetime.timedelta:
        """How long the certificates stay valid."""
        return self.not_after - (now or datetime.datetime.now(datetime.timezone.utc))

    def __repr__(self) -> str:
        return (
            f"<ClusterCredentials cluster={self.cluster_id} ca={self.ca_fingerprint[:23]}... "
            f"expires={self.not_after.isoformat(timespec='minutes')}>"
        )

    def __reduce__(self):  # type: ignore[override]
        raise TypeError(
            "ClusterCredentials hold a CA private key and cannot be pickled or copied; "
            "pass the LeafCredentials a VM needs instead"
        )

    def __copy__(self):
        self.__reduce__()

    def __deepcopy__(self, memo):
        self.__reduce__()


class ClusterSecurity(Security):
    """A client's ``distributed.Security`` that talks only to its cluster's scheduler.

    Every TLS context it makes checks, after the handshake, that the peer holds a
    ``scheduler`` certificate of this cluster (a worker's key cannot pose as the
    scheduler). It holds a client private key in memory, so it refuses to be pickled
    unless it was made to travel (``portable``).
    """

    def __init__(self, cluster_id: str, *, portable: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cluster_id = cluster_id
        self.portable = portable
        #: Every context handed out, for :meth:`install`; weak, so a closed ``Client``'s
        #: contexts go with it.
        self._contexts: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()
        # A Client may be made in another thread while the cluster's loop renews: a
        # context is made and registered, or reloaded, one at a time, so none is made
        # from the old certificate and missed by the renewal.
        self._lock = threading.Lock()

    def _get_tls_context(self, tls: Any, purpose: Any) -> Any:
        with self._lock:
            cert, key = tls.get("cert"), tls.get("key")
            if tls.get("ca_file") and cert and key and "\n" in cert and "\n" in key:
                # distributed would write an in-memory key to a temporary file: give it
                # an in-memory path instead (see _pem_path).
                with _pem_path(cert.strip() + "\n" + key) as path:
                    ctx = super()._get_tls_context({**tls, "cert": path, "key": None}, purpose)
            else:
                ctx = super()._get_tls_context(tls, purpose)
            if ctx is not None:
                peers.guard_context(ctx, peers.Policy(self.cluster_id, Role.CLIENT.value))
                self._contexts.add(ctx)
            return ctx

    def install(self, leaf: LeafCredentials) -> int:
        """Use ``leaf`` (a renewed client certificate and key) from now on: in every
        context handed out so far, and in those made later. Returns how many contexts
        were reloaded.

        Connections already open keep the certificate they were made with; the peer
        checked it once, at the handshake, so none is dropped.
        """
        with self._lock:
            contexts = list(self._contexts)
            with _pem_path(leaf.cert_pem.strip() + "\n" + leaf.key_pem) as path:
                for ctx in contexts:
                    ctx.load_cert_chain(path)
            self.tls_client_cert, self.tls_client_key = leaf.cert_pem, leaf.key_pem
            return len(contexts)

    def __reduce__(self) -> Any:
        if not self.portable:
            raise TypeError(
                f"the Security of cluster {self.cluster_id} holds this client's private key "
                "and is not sent to other processes. To let another process connect, give "
                "it cluster.portable_security('<name>'): a Security with a client "
                "certificate of its own"
            )
        fields = {k: getattr(self, k) for k in Security.__slots__}
        return (_portable_security, (self.cluster_id, fields))


def _portable_security(cluster_id: str, fields: dict[str, Any]) -> ClusterSecurity:
    return ClusterSecurity(cluster_id, portable=True, **fields)


def leaf_from_security(security: Security, role: Role) -> LeafCredentials:
    """The ``role`` certificate, key and CA of a user's own ``Security``, as PEM text.

    Used when a caller brings their own PKI: those files are what the VMs receive.
    """
    import os

    def read(value: str | None, what: str) -> str:
        if not value:
            raise OptionError(
                f"security: the given distributed.Security has no {what}; a VM cluster "
                "ships the scheduler's and workers' certificates to their VMs, so set "
                f"{what}, or pass security=True to let the cluster make its own"
            )
        if "\n" in value:
            return value
        with open(os.path.expanduser(value)) as f:
            return f.read()

    cert_pem = read(getattr(security, f"tls_{role.value}_cert"), f"tls_{role.value}_cert")
    key_pem = read(
        getattr(security, f"tls_{role.value}_key", None)
        or getattr(security, f"tls_{role.value}_cert"),
        f"tls_{role.value}_key",
    )
    ca_pem = read(security.tls_ca_file, "tls_ca_file")
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return LeafCredentials(
        role=role,
        name=role.value,
        cert_pem=cert_pem,
        key_pem=key_pem,
        ca_pem=ca_pem,
        not_after=cert.not_valid_after_utc,
    )
