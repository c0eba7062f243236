"""A VM's certificate renewed in place, and the server ended when it expires unrenewed.

An enrolled VM's certificate is short-lived, so that a key stolen from it stops working
soon and a VM whose client is gone stops by itself. The client renews it well before it
expires (``secure_cloud_renew``, which only the client's certificate may call on the
scheduler, and only the scheduler on a worker); this module is the VM's side: a fresh
key made on the VM, the signed certificate swapped in without dropping a connection, and
the server closed once the certificate has expired.

Shipped to VMs inside the peer checks preload (see ``peers.py``), so it needs only the
standard library, ``distributed`` and the ``openssl`` command.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import time
from typing import Any

from .gate import RENEW
from .roles import guarded_contexts, identity_of, logger


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


class Certificate:
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
        contexts = list(guarded_contexts())
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


def renewable(server: Any, kind: str, settings: dict[str, Any]) -> None:
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
    certificate = Certificate(server, path, identity.name if identity else own)
    if kind == "nanny":
        # Its worker renews the file they share; the nanny only reloads it.
        callback = PeriodicCallback(certificate.reload, 5000)
    else:
        server.handlers[RENEW] = certificate.renew
        callback = PeriodicCallback(certificate.check, 5000)
    server.periodic_callbacks["secure-cloud-identity"] = callback
    callback.start()
