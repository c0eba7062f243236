import copy
import datetime
import os
import pickle
import queue
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.x509.oid import ExtendedKeyUsageOID

from dask_secure_cloud.credentials import (
    ClusterCredentials,
    ClusterSecurity,
    Role,
    _pem_path,
    parse_identity,
)


@pytest.fixture(scope="module")
def creds():
    return ClusterCredentials("c0ffee")


def ca_key_pem(creds: ClusterCredentials) -> bytes:
    key = creds._ClusterCredentials__ca_key
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_ca_is_p256_with_critical_basic_constraints(creds):
    ca = x509.load_pem_x509_certificate(creds.ca_cert_pem.encode())
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca


@pytest.mark.parametrize("role", list(Role))
def test_leaf_names_cluster_and_role_and_is_signed_by_the_ca(creds, role):
    leaf = creds.issue(role, f"{role.value}-1")
    cert = x509.load_pem_x509_certificate(leaf.cert_pem.encode())
    ca = x509.load_pem_x509_certificate(creds.ca_cert_pem.encode())
    cert.verify_directly_issued_by(ca)
    assert parse_identity(cert) == ("c0ffee", role, f"{role.value}-1")
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_client_certificate_can_only_be_a_client(creds):
    usages = {
        role: set(
            x509.load_pem_x509_certificate(creds.issue(role, "x").cert_pem.encode())
            .extensions.get_extension_for_class(x509.ExtendedKeyUsage)
            .value
        )
        for role in Role
    }
    assert usages[Role.CLIENT] == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages[Role.SCHEDULER]
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages[Role.WORKER]


def _handshake(server_leaf, client_leaf, ca_pem) -> None:
    """A real TLS handshake with ``server_leaf`` serving and ``client_leaf`` connecting."""
    import os
    import tempfile

    def context(purpose, leaf):
        ctx = ssl.create_default_context(purpose, cadata=ca_pem)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        with tempfile.TemporaryDirectory() as d:
            cert, key = os.path.join(d, "c"), os.path.join(d, "k")
            Path(cert).write_text(leaf.cert_pem)
            Path(key).write_text(leaf.key_pem)
            ctx.load_cert_chain(cert, key)
        return ctx

    server_ctx = context(ssl.Purpose.CLIENT_AUTH, server_leaf)
    client_ctx = context(ssl.Purpose.SERVER_AUTH, client_leaf)
    listener = socket.create_server(("127.0.0.1", 0))
    errors = []

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as e:
            errors.append(e)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname()) as raw:
            with client_ctx.wrap_socket(raw) as tls:
                tls.sendall(b"x")
    finally:
        thread.join(5)
        listener.close()


def test_client_certificate_cannot_serve_as_scheduler(creds):
    scheduler, client = creds.issue(Role.SCHEDULER, "s"), creds.client
    _handshake(scheduler, client, creds.ca_cert_pem)  # the positive control
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(client, creds.issue(Role.WORKER, "w"), creds.ca_cert_pem)


def test_default_lifetime_is_hours_and_configurable():
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    default = ClusterCredentials("a", now=now)
    assert datetime.timedelta(hours=8) <= default.not_after - now <= datetime.timedelta(hours=48)
    short = ClusterCredentials("b", datetime.timedelta(hours=2), now=now)
    leaf = x509.load_pem_x509_certificate(short.issue(Role.WORKER, "w").cert_pem.encode())
    assert leaf.not_valid_after_utc == now + datetime.timedelta(hours=2)
    # Backdated a little, for VMs whose clocks lag.
    assert leaf.not_valid_before_utc < now


@pytest.mark.parametrize("lifetime", [datetime.timedelta(0), datetime.timedelta(hours=-1), "12h"])
def test_non_positive_or_untyped_lifetime_is_refused(lifetime):
    with pytest.raises(ValueError, match="max_lifetime"):
        ClusterCredentials("a", lifetime)


def test_ca_key_cannot_be_pickled_copied_or_printed(creds):
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(creds)
    with pytest.raises(TypeError):
        copy.deepcopy(creds)
    secret = ca_key_pem(creds).decode()
    assert "PRIVATE" not in repr(creds)
    leaf = creds.issue(Role.WORKER, "w")
    assert leaf.key_pem not in repr(leaf) and "PRIVATE" not in repr(leaf)
    assert secret not in leaf.cert_pem + leaf.key_pem + leaf.ca_pem


def test_client_security_requires_encryption_with_the_client_key_in_memory(creds):
    security = creds.client_security()
    assert security.require_encryption
    assert security.tls_client_key == creds.client.key_pem
    assert security.tls_scheduler_key is None and security.tls_worker_key is None
    assert "PRIVATE" not in repr(security)
    assert security.tls_min_version == ssl.TLSVersion.TLSv1_3


# -- the client's own certificate: short-lived, renewed in place ----------------------


def test_a_clusters_client_certificate_lives_certificate_lifetime_not_the_cas(vm_dir):
    """By default a cluster's CA lives 7 days, its client's certificate 4 hours, like a
    VM's; and so does a portable one unless told otherwise, never past the CA's end."""
    from dask_secure_cloud import LocalVMCluster
    from dask_secure_cloud.options import resolve
    from dask_secure_cloud.plan import BootPlanner

    resolved = resolve(LocalVMCluster.Options, {"directory": str(vm_dir)})
    options, driver = LocalVMCluster.setup(resolved)
    planner = BootPlanner(options, "dsc-lifetimes", driver, native_python="python3")
    now = datetime.datetime.now(datetime.timezone.utc)
    credentials, minute = planner.credentials, datetime.timedelta(minutes=1)
    assert options.certificate_lifetime == datetime.timedelta(hours=4)
    assert abs(credentials.not_after - now - datetime.timedelta(days=7)) < minute

    def lifetime(security) -> datetime.timedelta:
        cert = x509.load_pem_x509_certificate(security.tls_client_cert.encode())
        return cert.not_valid_after_utc - now

    assert abs(lifetime(planner.client_security) - datetime.timedelta(hours=4)) < minute
    assert credentials.client.cert_pem == planner.client_security.tls_client_cert
    portable = credentials.portable_client_security("notebook")
    assert abs(lifetime(portable) - datetime.timedelta(hours=4)) < minute
    longer = credentials.portable_client_security("job-runner", lifetime="2d")
    assert abs(lifetime(longer) - datetime.timedelta(days=2)) < minute
    capped = credentials.portable_client_security("forever", lifetime="30d")
    assert lifetime(capped) <= credentials.not_after - now
    with pytest.raises(ValueError, match="lifetime must be positive"):
        credentials.portable_client_security("never", lifetime=0)
    assert not any(vm_dir.iterdir())


class _Server:
    """A TLS server with the scheduler's certificate that records, per connection, the
    client certificate it accepted (its fingerprint) or the error that refused it, and
    echoes what it reads."""

    def __init__(self, creds: ClusterCredentials) -> None:
        leaf = creds.issue(Role.SCHEDULER, "scheduler")
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=creds.ca_cert_pem)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        with _pem_path(leaf.cert_pem + leaf.key_pem) as path:
            self.ctx.load_cert_chain(path)
        self.listener = socket.create_server(("127.0.0.1", 0))
        #: One entry per connection, put by the thread that served it.
        self.seen: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True)
                self.seen.put(x509.load_der_x509_certificate(der).fingerprint(SHA256()).hex())
                while data := tls.recv(64):
                    tls.sendall(data)
        except (ssl.SSLError, OSError) as e:
            self.seen.put(f"refused: {e}")

    def connect(self, ctx: ssl.SSLContext) -> ssl.SSLSocket:
        tls = ctx.wrap_socket(socket.create_connection(self.listener.getsockname(), timeout=5))
        tls.sendall(b"hello")
        assert tls.recv(64) == b"hello"  # TLS 1.3: a refused certificate fails here
        return tls


def _left(leaf) -> float:
    """Seconds until ``leaf`` expires."""
    return (leaf.not_after - datetime.datetime.now(datetime.timezone.utc)).total_seconds()


def _fingerprint(cert_pem: str) -> str:
    return x509.load_pem_x509_certificate(cert_pem.encode()).fingerprint(SHA256()).hex()


def test_the_client_certificate_is_renewed_in_place_in_every_context_handed_out():
    """A client certificate of a few seconds, renewed at half its life: after the first
    would have expired, a context handed out before the renewal (as a Client's or the
    cluster's connection pool holds one) and one made after both connect, with the new
    certificate; a connection opened before the renewal goes on."""
    lifetime = datetime.timedelta(seconds=6)
    creds = ClusterCredentials("c-renew", certificate_lifetime=lifetime)
    security = creds.client_security()
    first = creds.client
    started = datetime.datetime.now(datetime.timezone.utc)
    assert first.not_after - started <= lifetime
    server = _Server(creds)
    try:
        before = security.get_connection_args("client")["ssl_context"]
        live = server.connect(before)
        assert server.seen.get(timeout=5) == _fingerprint(first.cert_pem)
        assert creds.renew_client() is None  # not due before half its life

        time.sleep(
            (first.not_after - datetime.datetime.now(datetime.timezone.utc)).total_seconds() / 2
            + 0.5
        )
        renewed = creds.renew_client()
        assert renewed is not None and creds.client is renewed
        assert renewed.key_pem != first.key_pem and renewed.not_after > first.not_after
        assert security.tls_client_cert == renewed.cert_pem
        assert security.tls_client_key == renewed.key_pem

        # Past the first certificate's end: the server checks expiry (the control).
        time.sleep(
            (first.not_after - datetime.datetime.now(datetime.timezone.utc)).total_seconds() + 1.5
        )
        stale = ClusterSecurity(
            "c-renew",
            require_encryption=True,
            tls_ca_file=first.ca_pem,
            tls_client_cert=first.cert_pem,
            tls_client_key=first.key_pem,
        )
        with pytest.raises((ssl.SSLError, OSError)):
            server.connect(stale.get_connection_args("client")["ssl_context"]).close()
        refused = server.seen.get(timeout=5)
        assert refused.startswith("refused") and "expired" in refused

        after = security.get_connection_args("client")["ssl_context"]
        for ctx in (before, after):
            server.connect(ctx).close()
            assert server.seen.get(timeout=5) == _fingerprint(renewed.cert_pem)
        live.sendall(b"still")  # the connection made with the first certificate
        assert live.recv(64) == b"still"
        live.close()
    finally:
        server.listener.close()


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd: Linux only")
def test_the_client_key_never_becomes_a_file(monkeypatch):
    """``distributed`` writes an in-memory key to a temporary directory to load it; the
    client's Security loads it from memory, at first and on renewal."""
    import distributed.security

    def no_files(*args, **kwargs):
        raise AssertionError("the client's key was about to be written to a file")

    monkeypatch.setattr(distributed.security.tempfile, "TemporaryDirectory", no_files)
    creds = ClusterCredentials("c-memory", certificate_lifetime=datetime.timedelta(seconds=2))
    security = creds.client_security()
    assert security.get_connection_args("client")["ssl_context"] is not None
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1.5)
    assert creds.renew_client(now=later) is not None
