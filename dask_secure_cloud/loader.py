"""Other processes of the same user connect by address: distributed's security loader.

Why: a cluster's CA key lives only in the process that made it (a script, or the
Jupyter server when the JupyterLab extension made the cluster), so a notebook kernel
beside it, or a second script, has no certificate and ``Client("tls://...")`` fails.
Distributed calls ``distributed.client.security-loader`` (a dotted name in the dask
config) with ``{"address": ...}`` whenever a ``Client`` gets an address and no
``security``; the package installs a dask config file that names
:func:`security_loader` there, so this works with no setting by the user.

How, in two halves:

- The owning process runs an *agent*: a thread serving a Unix socket in a runtime
  directory private to the user (0700, ``$TMPDIR/dask-secure-cloud-UID-run``), plus one
  small index file per scheduler address it offers. It accepts a connection only from a
  process of its own uid (``SO_PEERCRED``; the directory's mode already keeps other users
  out, this is the second lock). It signs a certificate request with the cluster's CA
  key, which never leaves it, for a client certificate named after the requesting
  process (``kernel-<id>-<pid>`` for a Jupyter kernel, ``pid-<pid>`` otherwise), valid
  for ``certificate_lifetime`` and never past the CA, and writes each one to the audit
  log.
- :func:`security_loader`, in the other process, looks the address up in the index (a
  file name is a hash of the address, so an unknown address costs one ``stat``), makes a
  key of its own, sends the request, and returns a ``Security`` whose certificate, key
  and CA are files of mode 0600 in a 0700 directory under the runtime directory. The
  agent deletes that directory when the cluster closes; the process deletes its own at
  exit. For an address no local process offers it returns ``None``, and Dask goes on as
  it would without it.

Nothing is renewed in the other process: a ``Client`` made there connects for the
certificate's lifetime; a new ``Client`` after that asks again.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import ssl
import stat
import struct
import tempfile
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["offer", "runtime_dir", "security_loader", "withdraw"]

logger = logging.getLogger(__name__)

#: Seconds a request to the owning process may take.
REQUEST_TIMEOUT = 20.0
#: The largest request or answer accepted, in bytes (a CSR is well under 1 KiB).
MAX_MESSAGE = 64 * 1024
#: A cached certificate is reused while more than this share of its lifetime is left.
REUSE_WHILE_LEFT = 0.25


#: Peers are checked by ``SO_PEERCRED`` (Linux); elsewhere nothing is offered or asked.
_SUPPORTED = hasattr(socket, "SO_PEERCRED") and hasattr(os, "getuid")


# -- the runtime directory ------------------------------------------------------------


def runtime_dir(create: bool = False) -> Path | None:
    """This user's runtime directory, or ``None`` if it does not exist (and ``create``
    is false) or is not private to the user: then nothing is offered or asked for."""
    path = Path(tempfile.gettempdir()) / f"dask-secure-cloud-{os.getuid()}-run"
    if create:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        logger.warning(
            "%s is not a directory private to this user: local connections by address are off",
            path,
        )
        return None
    return path


def _index_path(run: Path, address: str) -> Path:
    return run / f"addr-{hashlib.sha256(address.encode()).hexdigest()[:32]}.json"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file that only this user can read (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _peer(conn: socket.socket) -> tuple[int, int]:
    """The connecting process's ``(pid, uid)``, from the kernel (``SO_PEERCRED``)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


def _receive(conn: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise ValueError("message too large")
    message = json.loads(data or b"{}")
    if not isinstance(message, dict):
        raise ValueError("message is not an object")
    return message


def _send(conn: socket.socket, message: Mapping[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


# -- the owning process's side -------------------------------------------------------


@dataclasses.dataclass
class _Offer:
    cluster_id: str
    addresses: tuple[str, ...]
    credentials: Any  # ClusterCredentials: signs, and never leaves this process
    lifetime: datetime.timedelta
    security: Callable[[], Any]  # the cluster's own Security, for this very process
    issued: int = 0


def process_name(pid: int) -> str:
    """A certificate name for process ``pid``: its Jupyter kernel id where it is a
    kernel (read from its command line's connection file), else its PID."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
    except OSError:
        cmdline = ""
    kernel = re.search(r"kernel-([0-9a-fA-F-]{8,36})\.json", cmdline)
    return f"kernel-{kernel.group(1)}-{pid}" if kernel else f"pid-{pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(run: Path) -> None:
    """Delete what processes killed outright (SIGKILL) left: their sockets and index
    entries. Their clusters' certificate files go with the clusters' VMs' end."""
    for path in run.glob("agent-*.sock"):
        pid = path.stem.removeprefix("agent-")
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()
    for path in run.glob("addr-*.json"):
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            if not _alive(int(json.loads(path.read_text()).get("pid"))):
                path.unlink()


class _Agent:
    """This process's socket, and the clusters it offers through it."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.socket_path = run / f"agent-{os.getpid()}.sock"
        self.pid = os.getpid()
        self.offers: dict[str, _Offer] = {}
        self.lock = threading.Lock()
        _sweep_stale(run)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # a previous process of this PID
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        self.server.listen(16)
        threading.Thread(target=self._serve, daemon=True, name="dask-secure-cloud-agent").start()

    def _serve(self) -> None:
        from cryptography.exceptions import UnsupportedAlgorithm

        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed
            # One at a time: a request is a signature, well under a millisecond.
            with conn:
                conn.settimeout(REQUEST_TIMEOUT)
                try:
                    self._handle(conn)
                # What a malformed request can raise; nothing of it may end the agent.
                except (OSError, ValueError, TypeError, KeyError, UnsupportedAlgorithm) as e:
                    logger.warning("local security request failed: %s", e)
                    with contextlib.suppress(OSError):
                        _send(conn, {"error": f"the request failed: {e}"})

    def _handle(self, conn: socket.socket) -> None:
        from . import audit

        pid, uid = _peer(conn)
        if uid != os.getuid():
            logger.warning("refused a certificate request from pid %d of uid %d", pid, uid)
            audit.record("local_access_refused", "-", pid=pid, uid=uid)
            _send(conn, {"error": "refused: not this user's process"})
            return
        request = _receive(conn)
        address = request.get("address")
        with self.lock:
            offer = next((o for o in self.offers.values() if address in o.addresses), None)
        if offer is None:
            _send(conn, {"error": "unknown address"})
            return
        certificate, not_after, name = self._sign(offer, str(request.get("csr", "")), pid)
        offer.issued += 1
        fingerprint = certificate.fingerprint(_sha256()).hex(":").upper()
        audit.record(
            "local_client_certificate",
            offer.cluster_id,
            name=name,
            pid=pid,
            uid=uid,
            address=address,
            fingerprint=fingerprint,
            not_after=not_after.isoformat(timespec="seconds"),
        )
        logger.info("Cluster %s: issued a client certificate to %s", offer.cluster_id, name)
        _send(
            conn,
            {
                "cluster_id": offer.cluster_id,
                "name": name,
                "certificate": _pem(certificate),
                "ca": offer.credentials.ca_cert_pem,
                "not_after": not_after.isoformat(),
            },
        )

    def _sign(self, offer: _Offer, csr_pem: str, pid: int) -> tuple[Any, datetime.datetime, str]:
        from cryptography import x509

        from .credentials import Role

        csr = x509.load_pem_x509_csr(csr_pem.encode())
        if not csr.is_signature_valid:
            raise ValueError("the certificate request's signature is not valid")
        name = process_name(pid)
        now = datetime.datetime.now(datetime.timezone.utc)
        not_after = min(now + offer.lifetime, offer.credentials.not_after)
        pem = offer.credentials.certify(Role.CLIENT, name, csr.public_key(), not_after=not_after)
        return x509.load_pem_x509_certificate(pem.encode()), not_after, name

    def add(self, offer: _Offer) -> None:
        with self.lock:
            self.offers[offer.cluster_id] = offer
        (self.run / "clients").mkdir(mode=0o700, exist_ok=True)
        (self.run / "clients" / offer.cluster_id).mkdir(mode=0o700, exist_ok=True)
        for address in offer.addresses:
            index = _index_path(self.run, address)
            staged = index.with_suffix(f".{os.getpid()}.tmp")
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            entry = {"address": address, "cluster_id": offer.cluster_id, "pid": self.pid}
            entry["socket"] = self.socket_path.name
            _write_private(staged, json.dumps(entry).encode())
            os.replace(staged, index)

    def remove(self, cluster_id: str) -> _Offer | None:
        with self.lock:
            offer = self.offers.pop(cluster_id, None)
        if offer is None:
            return None
        for address in offer.addresses:
            index = _index_path(self.run, address)
            with contextlib.suppress(OSError, ValueError):
                if json.loads(index.read_text()).get("pid") == self.pid:
                    index.unlink()
        shutil.rmtree(self.run / "clients" / cluster_id, ignore_errors=True)
        return offer

    def close(self) -> None:
        for cluster_id in list(self.offers):
            self.remove(cluster_id)
        self.server.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


_agent: _Agent | None = None
_agent_lock = threading.Lock()


def _get_agent() -> _Agent | None:
    global _agent
    with _agent_lock:
        if _agent is not None and _agent.pid != os.getpid():
            _agent = None  # a forked child: the parent's socket is not ours
        if _agent is None:
            if not _SUPPORTED:
                logger.info("no SO_PEERCRED here: other processes cannot connect by address")
                return None
            run = runtime_dir(create=True)
            if run is None:
                return None
            _agent = _Agent(run)
        return _agent


def offer(cluster: Any) -> None:
    """Let this user's other processes connect to ``cluster`` by its address (a started
    ``VMCluster`` with its own CA): each gets a client certificate of its own."""
    credentials = getattr(cluster, "_credentials", None)
    if credentials is None:
        return
    addresses = {cluster.scheduler_address}
    external = getattr(getattr(cluster, "scheduler", None), "external_address", None)
    if external:
        addresses.add(external)
    ref = weakref.ref(cluster)
    try:
        agent = _get_agent()
        if agent is None:
            return
        agent.add(
            _Offer(
                cluster_id=cluster.cluster_id,
                addresses=tuple(sorted(a for a in addresses if a)),
                credentials=credentials,
                lifetime=cluster.options.certificate_lifetime,
                security=lambda: getattr(ref(), "security", None),
            )
        )
    except OSError as e:
        # The cluster works without it; only connecting by address from elsewhere does not.
        logger.warning(
            "Cluster %s: other processes cannot connect by address (%s)", cluster.cluster_id, e
        )


def withdraw(cluster_id: str) -> None:
    """Stop offering ``cluster_id`` and delete every certificate file given out for it."""
    agent = _agent
    if agent is None or agent.pid != os.getpid():
        return
    offered = agent.remove(cluster_id)
    if offered is not None and offered.issued:
        from . import audit

        audit.record("local_access_closed", cluster_id, certificates_issued=offered.issued)


# -- the other process's side -----------------------------------------------------------


_cache: dict[str, tuple[Any, datetime.datetime, datetime.datetime, Path]] = {}
_cache_lock = threading.Lock()
_own_files: set[Path] = set()


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _pem(certificate: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _own_offer(address: str) -> Any:
    """This very process's cluster at ``address``: its own ``Security``, no request."""
    agent = _agent
    if agent is None or agent.pid != os.getpid():
        return None
    with agent.lock:
        found = next((o for o in agent.offers.values() if address in o.addresses), None)
    return found.security() if found is not None else None


def _cached(address: str) -> Any:
    with _cache_lock:
        entry = _cache.get(address)
    if entry is None:
        return None
    security, issued, not_after, directory = entry
    now = datetime.datetime.now(datetime.timezone.utc)
    if directory.exists() and (not_after - now) > (not_after - issued) * REUSE_WHILE_LEFT:
        return security
    return None


def security_loader(info: Mapping[str, Any]) -> Any:
    """``distributed.client.security-loader``: a ``Security`` for ``info["address"]``
    when a process of this user owns a cluster there, else ``None``.

    Raises ``PermissionError`` where the owner refuses (it should not, for this user's
    processes), rather than let the ``Client`` fail later with a TLS error that names
    no cause."""
    address = info.get("address")
    if not isinstance(address, str) or not address.startswith("tls://") or not _SUPPORTED:
        return None
    own = _own_offer(address)
    if own is not None:
        return own
    cached = _cached(address)
    if cached is not None:
        return cached
    run = runtime_dir()
    if run is None:
        return None
    index = _index_path(run, address)
    try:
        entry = json.loads(index.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("security loader: unreadable %s: %s", index, e)
        return None
    if entry.get("address") != address or "/" in str(entry.get("socket")):
        return None
    return _request(run, index, entry)


def _request(run: Path, index: Path, entry: Mapping[str, Any]) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from .credentials import ClusterSecurity

    address = entry["address"]
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pid-{os.getpid()}")]))
        .sign(key, _sha256())
    )
    request = {"address": address, "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            conn.connect(str(run / entry["socket"]))
        except (FileNotFoundError, ConnectionRefusedError):
            # Its owner is gone without cleaning up (killed): the cluster went with it.
            with contextlib.suppress(OSError):
                index.unlink()
            return None
        _send(conn, request)
        answer = _receive(conn)
    if "error" in answer:
        if answer["error"] == "unknown address":
            return None
        raise PermissionError(f"the process owning {address} refused: {answer['error']}")
    certificate = x509.load_pem_x509_certificate(answer["certificate"].encode())
    if certificate.public_key() != key.public_key():
        raise PermissionError(f"the process owning {address} answered with another key")
    cluster_id, name = str(answer["cluster_id"]), str(answer["name"])
    if "/" in cluster_id or "/" in name or cluster_id in (".", "..") or name in (".", ".."):
        raise PermissionError(f"the process owning {address} answered with a bad name")
    # The owner made clients/CLUSTER (0700) and deletes it when the cluster closes.
    directory = run / "clients" / cluster_id / f"{name}-{os.urandom(4).hex()}"
    directory.mkdir(mode=0o700)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(directory / "key.pem", key_pem)
    _write_private(directory / "cert.pem", answer["certificate"].encode())
    _write_private(directory / "ca.pem", answer["ca"].encode())
    _own_files.add(directory)
    security = ClusterSecurity(
        cluster_id,
        require_encryption=True,
        tls_ca_file=str(directory / "ca.pem"),
        tls_client_cert=str(directory / "cert.pem"),
        tls_client_key=str(directory / "key.pem"),
        tls_min_version=ssl.TLSVersion.TLSv1_3,
    )
    not_after = datetime.datetime.fromisoformat(answer["not_after"])
    with _cache_lock:
        _cache[address] = (
            security,
            datetime.datetime.now(datetime.timezone.utc),
            not_after,
            directory,
        )
    logger.info("Connected to %s as %s (certificate valid until %s)", address, name, not_after)
    return security


@atexit.register
def cleanup() -> None:
    """Take this process's socket, index entries and certificate files with it: at exit,
    and from ``owned``'s signal handler (a process killed by a signal runs no atexit)."""
    if _agent is not None and _agent.pid == os.getpid():
        _agent.close()
    for directory in _own_files:
        shutil.rmtree(directory, ignore_errors=True)
