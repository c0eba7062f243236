"""A VM's side of enrollment: make its own key, and get it certified by the client.

The boot script runs this file with any ``python3`` (the one cloud-init itself runs on;
the standard library only, no Dask) before Dask starts, in parallel with provisioning::

    python3 -I -S enroll.py DIR ADDRESS PORT DEADLINE

``DIR/tls/ca.pem`` holds the cluster's CA certificate and ``DIR/tls/enroll.json`` the
VM's name and its single-use enrollment token, both from the user-data. The script makes
an ECDSA P-256 key with ``openssl`` (``DIR/tls/node.key``, never leaving the VM), then
serves one small protocol on ``ADDRESS:PORT`` until the client has certified it or the
boot ``DEADLINE`` (epoch seconds) passes. Each request is a JSON line answered by one:

- ``{"nonce": N}`` -> ``{"name", "csr", "proof"}``: a certificate request for the key and
  ``proof`` = HMAC-SHA256(token, name, N, csr). The token itself never crosses the
  network, and the proof binds it to this VM's name, this request and the client's
  fresh nonce.
- ``{"cert": PEM}`` -> ``{"ok": true}`` once the certificate chains to the CA and
  matches the key; the two are then written to ``DIR/tls/node.pem`` (one file, so that
  a renewal replaces both at once), the token is deleted, and the script exits 0 (on
  the scheduler, freeing the port for Dask).

The port is open to whoever can reach it, so no peer may hold it up: connections are
served together (one thread, ``selectors``: the VM's cores are busy booting), each has
``LINE_DEADLINE`` seconds to send its whole line of at most ``LINE_LIMIT`` bytes, and at
most ``MAX_CONNECTIONS`` are open at once: one more closes the oldest, since the client
sends its line as soon as it connects and a peer that has not is the likelier stall.

Once certified, the ticket file is deleted after the port is closed: that is the sign
for Dask to start. With ``runtime="native"`` the Dask process is started beforehand, so
that it imports Dask while the VM enrols instead of after::

    PY enroll.py --start DIR DEADLINE MODULE ARGS...

imports ``MODULE`` (``distributed.cli.dask_worker``), waits for the sign, then runs it as
``python -m MODULE ARGS...`` would. It gives up when the boot script writes
``DIR/boot-failed`` (or, should the script be gone, a minute after ``DEADLINE``).

The scheduler is asked directly by the client. A worker is asked through the scheduler,
which relays each line (``secure_cloud_enroll_relay``, a handler only the client's
certificate may call): the scheduler sees only public material, so it needs no trust.
Nothing here needs to be secret: an eavesdropper learns a CSR and a certificate, and a
proof it cannot reuse.
"""

import binascii
import hashlib
import hmac
import json
import os
import selectors
import socket
import subprocess
import sys
import time

LINE_LIMIT = 64 * 1024
LINE_DEADLINE = 5.0
MAX_CONNECTIONS = 32
CONTEXT = "dask-secure-cloud enroll"


def proof(token, name, nonce, csr):
    """What the holder of ``token`` answers to ``nonce`` for ``name``'s ``csr``."""
    message = "\0".join((CONTEXT, name, nonce, csr)).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def say(text):
    print(f"enroll: {text}", flush=True)


def openssl(*args):
    try:
        done = subprocess.run(("openssl", *args), capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SystemExit("enroll: this image has no openssl, which makes the VM's key") from None
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]}: {done.stderr.strip()}")
    return done.stdout


def pem_der(text, label):
    """The DER bytes of the first ``label`` block (``CERTIFICATE``...) in PEM ``text``."""
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    start = text.index(begin) + len(begin)
    return binascii.a2b_base64(text[start : text.index(end, start)])


def _element(der, i):
    """Where the DER element at ``i`` ends, and where its contents start."""
    length, start = der[i + 1], i + 2
    if length & 0x80:
        start += length & 0x7F
        length = int.from_bytes(der[i + 2 : start], "big")
    return start + length, start


def certified_key(cert_der):
    """The SubjectPublicKeyInfo (DER) a certificate certifies: the seventh field of its
    ``tbsCertificate``, or the sixth when the optional version is absent."""
    _, tbs = _element(cert_der, 0)
    _, i = _element(cert_der, tbs)
    if cert_der[i] == 0xA0:  # [0] version
        i, _ = _element(cert_der, i)
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        i, _ = _element(cert_der, i)
    return cert_der[i : _element(cert_der, i)[0]]


def make_key(tls, name):
    """The VM's key (0600, made here), a certificate request for it, and its public key
    (DER), with one ``openssl`` call: the VM's cores are busy booting."""
    key = os.path.join(tls, "node.key")
    old = os.umask(0o077)
    try:
        out = openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", key, "-subj", f"/CN={name}", "-pubkey",
        )  # fmt: skip
    finally:
        os.umask(old)
    csr = out[out.index("-----BEGIN CERTIFICATE REQUEST-----") :]
    return csr, pem_der(out, "PUBLIC KEY")


def accept_certificate(tls, cert, public_key):
    """Write ``cert`` and the VM's key as ``node.pem`` once the certificate certifies
    ``public_key`` (the key's) and chains to the cluster's CA; raise otherwise. The key is
    compared first: it costs no ``openssl`` call, so a stranger's garbage costs little."""
    try:
        ours = certified_key(pem_der(cert, "CERTIFICATE")) == public_key
    except (ValueError, IndexError, binascii.Error):
        raise RuntimeError("refused a certificate: it is not a PEM certificate") from None
    if not ours:
        raise RuntimeError("refused a certificate: it certifies another key")
    key = os.path.join(tls, "node.key")
    fresh = os.path.join(tls, "node.pem.new")
    old = os.umask(0o077)
    try:
        with open(fresh, "w") as f, open(key) as k:
            f.write(cert.strip() + "\n" + k.read())
    finally:
        os.umask(old)
    try:
        openssl("verify", "-CAfile", os.path.join(tls, "ca.pem"), fresh)
    except RuntimeError as e:
        os.unlink(fresh)
        raise RuntimeError(f"refused a certificate: {e}") from None
    os.replace(fresh, os.path.join(tls, "node.pem"))
    os.unlink(key)


def answer(request, ticket, csr, public_key, tls):
    """The reply to one request, and whether enrollment is complete. Only ASCII is taken
    (a nonce is hex, a certificate PEM): nothing else reaches a file or the proof."""
    nonce, cert = request.get("nonce"), request.get("cert")
    if isinstance(nonce, str) and nonce.isascii():
        return {
            "name": ticket["name"],
            "csr": csr,
            "proof": proof(ticket["token"], ticket["name"], nonce, csr),
        }, False
    if isinstance(cert, str) and cert.isascii():
        try:
            accept_certificate(tls, cert, public_key)
        except RuntimeError as e:
            return {"error": str(e)}, False
        return {"ok": True}, True
    return {"error": "expected a nonce or a certificate"}, False


class Listener:
    """The enrollment port: every connection served at once, none for long.

    Each connection is ``[deadline, peer, bytes so far]`` until its line is whole, then
    answered and closed. Problems are said a few times each, then only counted: the
    console is what a failed boot shows, and a flood of strangers must not fill it."""

    def __init__(self, address, port, respond):
        self.respond = respond
        self.sock = socket.create_server((address, port), reuse_port=False)
        self.sock.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.sock, selectors.EVENT_READ)
        self.open = {}
        self.problems = {}

    def note(self, kind, text):
        count = self.problems[kind] = self.problems.get(kind, 0) + 1
        if count <= 3:
            say(text + ("; more of these are only counted" if count == 3 else ""))

    def drop(self, conn, kind=None, why=""):
        peer = self.open.pop(conn)[1]
        self.selector.unregister(conn)
        conn.close()
        if kind:
            self.note(kind, f"{peer}: {why}")

    def serve(self, deadline):
        """Serve until a request completes enrollment (True) or ``deadline`` (False)."""
        while time.time() < deadline:
            now = time.monotonic()
            late = [c for c, (due, _, _) in self.open.items() if due <= now]
            for conn in late:
                self.drop(conn, "slow", f"no whole line within {LINE_DEADLINE:.0f}s: closed")
            wait = min([1.0] + [due - now for due, _, _ in self.open.values()])
            for key, _ in self.selector.select(max(wait, 0)):
                if key.fileobj is self.sock:
                    self.accept()
                elif key.fileobj in self.open and self.receive(key.fileobj):
                    return True
        return False

    def accept(self):
        try:
            conn, peer = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # out of file descriptors, say
            self.note("accept", f"could not accept a connection: {e}")
            return
        if len(self.open) >= MAX_CONNECTIONS:
            oldest = next(iter(self.open))
            self.drop(oldest, "full", f"{MAX_CONNECTIONS} connections open: the oldest closed")
        conn.setblocking(False)
        self.open[conn] = [time.monotonic() + LINE_DEADLINE, peer[0], bytearray()]
        self.selector.register(conn, selectors.EVENT_READ)

    def receive(self, conn):
        """Read what ``conn`` sent; answer a whole line. True once enrollment is complete."""
        state = self.open[conn]
        try:
            data = conn.recv(LINE_LIMIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            self.drop(conn, "lost", str(e))
            return False
        if not data:
            self.drop(conn, "lost", "closed before a whole line")
            return False
        line = state[2]
        line += data
        end = line.find(b"\n", len(line) - len(data))
        if end < 0 or end >= LINE_LIMIT:
            if end >= 0 or len(line) >= LINE_LIMIT:
                self.drop(conn, "long", f"a line longer than {LINE_LIMIT} bytes: closed")
            return False
        try:
            request = json.loads(line[:end])
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
            reply, done = self.respond(request)
        # RecursionError: deeply nested JSON; OSError: the VM's own files (node.key)
        except (ValueError, RecursionError, OSError) as e:
            reply, done = {"error": f"a bad request: {type(e).__name__}: {e}"}, False
        if "error" in reply:
            self.note("refused", f"{state[1]}: {reply['error']}")
        try:
            conn.settimeout(1)  # a reply is a few hundred bytes: the socket's buffer takes it
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError as e:  # once a certificate is installed, this VM is certified
            self.note("lost", f"{state[1]}: {e}")
        self.drop(conn)
        return done

    def close(self):
        for conn in list(self.open):
            self.drop(conn)
        self.selector.close()
        self.sock.close()
        if self.problems:
            say("connections refused or closed: " + ", ".join(
                f"{count} {kind}" for kind, count in self.problems.items()))  # fmt: skip


def serve(home, address, port, deadline):
    tls = os.path.join(home, "tls")
    ticket_file = os.path.join(tls, "enroll.json")
    with open(ticket_file) as f:
        ticket = json.load(f)
    started = time.monotonic()
    csr, public_key = make_key(tls, ticket["name"])
    say(f"key made in {time.monotonic() - started:.2f}s; waiting on {address}:{port}")
    listener = Listener(
        address, port, lambda request: answer(request, ticket, csr, public_key, tls)
    )
    try:
        done = listener.serve(deadline)
    finally:
        listener.close()
    if not done:
        say("no certificate from the cluster's client before the boot deadline")
        return 1
    # The port is free now (Dask's, on the scheduler): let Dask start.
    os.unlink(ticket_file)
    say(f"certified after {time.monotonic() - started:.1f}s")
    return 0


def start(home, deadline, module, args):
    """Run Dask's command ``module`` once this VM is certified, importing it meanwhile."""
    import importlib
    import runpy

    importlib.import_module(module)
    while os.path.exists(os.path.join(home, "tls", "enroll.json")):
        # The boot script says when enrollment failed; the deadline is a last resort.
        if os.path.exists(os.path.join(home, "boot-failed")) or time.time() > deadline + 60:
            say("this VM was not certified: Dask does not start")
            return 1
        time.sleep(0.05)
    sys.argv = [module, *args]
    # Run it as ``python -m`` would, as ``__main__`` only: drop the copy imported above
    # (what it imported stays loaded), which runpy would warn about.
    del sys.modules[module]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--start":
        home, deadline, module = sys.argv[2:5]
        sys.exit(start(home, float(deadline), module, sys.argv[5:]))
    home, address, port, deadline = sys.argv[1:5]
    sys.exit(serve(home, address, int(port), float(deadline)))
