import copy
import datetime
import pickle
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from dask_secure_cloud.credentials import ClusterCredentials, Role, parse_identity


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
