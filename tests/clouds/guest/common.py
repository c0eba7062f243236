"""What every part of the guest test bed shares: the cache, the test CA, the addresses.

The guest image, the package mirrors and the container image are expensive to build, so
each is cached outside the clone under a directory named by the hash of its inputs
(``cached``): CI rebuilds one only when what it is made from changes.

The guests reach "the internet" only through services on the test namespace's outside
network (``SERVICES_ADDRESS``) that answer for the real registries' names
(``IMPERSONATED_HOSTS``). They prove their TLS identity with certificates of a test CA
that only the test guest images trust: the product's own boot steps (``apt-get``,
``pip``, ``docker pull``) run unchanged against them.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: The cluster's private network: guests get .10 upwards, this machine's end is .254.
CLUSTER_NETWORK = ipaddress.IPv4Network("10.77.0.0/24")
HOST_ADDRESS = "10.77.0.254"
#: "The internet" as a guest with a route out sees it: the package services live on .1.
OUTSIDE_NETWORK = ipaddress.IPv4Network("10.78.0.0/24")
SERVICES_ADDRESS = "10.78.0.1"
#: Names a test guest resolves (through its image's /etc/hosts) to SERVICES_ADDRESS.
IMPERSONATED_HOSTS = ("deb.debian.org", "pypi.org", "files.pythonhosted.org", "ghcr.io")
#: Debian release of the guest images and of the container image (its python3 is 3.11).
SUITE = "bookworm"
#: What a stock cloud image has (kernel, systemd, cloud-init, python3) and nothing of
#: ours: no Docker, no Dask, no python3-venv (Ubuntu's cloud images lack it too). The
#: guest image builder owns this list; the apt mirror serves everything beyond it.
STOCK_PACKAGES = (
    "apt",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "linux-image-cloud-amd64",
    "cloud-init",
    "python3",
    "ca-certificates",
    "netbase",
    "ifupdown",
    "iproute2",
    "procps",
    "locales",
)


def cache_root() -> Path:
    """``$DSC_TEST_CACHE``, else ``$XDG_CACHE_HOME/dask-secure-cloud-tests``."""
    base = os.environ.get("DSC_TEST_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "dask-secure-cloud-tests"


def digest(inputs: Iterable[bytes | str | os.PathLike[str]]) -> str:
    """A short hash of the inputs: bytes and strings as given, paths by their content."""
    h = hashlib.sha256()
    for item in inputs:
        if isinstance(item, os.PathLike):
            data = Path(item).read_bytes()
        elif isinstance(item, str):
            data = item.encode()
        else:
            data = item
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]


def cached(
    name: str, inputs: Iterable[bytes | str | os.PathLike[str]], build: Callable[[Path], None]
) -> Path:
    """``<cache>/<name>-<hash of inputs>``, built by ``build(tmpdir)`` if absent.

    The build runs in a temporary directory beside the target and is renamed into place
    only when it succeeded, under a lock, so a killed build never leaves a half artifact.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}-{digest(inputs)}"
    if target.exists():
        return target
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            build(work)
            work.rename(target)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return target


def test_ca() -> tuple[Path, Path]:
    """(certificate, key) of the test CA that test guest images trust. Made once, cached."""

    def build(directory: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-secure-cloud test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / "ca.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        os.chmod(directory / "ca.key", 0o600)

    directory = cached("test-ca", ["v1"], build)
    return directory / "ca.pem", directory / "ca.key"


def server_certificate(hosts: Iterable[str], directory: Path) -> tuple[Path, Path]:
    """A certificate of the test CA for ``hosts`` (names or IP addresses), in ``directory``."""
    ca_pem, ca_key_path = test_ca()
    ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        with contextlib.suppress(ValueError):
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test services")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca_pem.read_bytes())
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path
