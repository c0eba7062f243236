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
import socket
import subprocess
import sys
import time

LINE_LIMIT = 64 * 1024
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
    """Write ``cert`` and the VM's key as ``node.pem`` once the certificate chains to the
    cluster's CA and certifies ``public_key`` (the key's); raise otherwise."""
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
        try:
            ours = certified_key(pem_der(cert, "CERTIFICATE")) == public_key
        except (ValueError, IndexError, binascii.Error):
            raise RuntimeError("it is not a PEM certificate") from None
        if not ours:
            raise RuntimeError("it certifies another key")
    except RuntimeError as e:
        os.unlink(fresh)
        raise RuntimeError(f"refused a certificate: {e}") from None
    os.replace(fresh, os.path.join(tls, "node.pem"))
    os.unlink(key)


def answer(request, ticket, csr, public_key, tls):
    """The reply to one request, and whether enrollment is complete."""
    if isinstance(request.get("nonce"), str):
        nonce = request["nonce"]
        return {
            "name": ticket["name"],
            "csr": csr,
            "proof": proof(ticket["token"], ticket["name"], nonce, csr),
        }, False
    if isinstance(request.get("cert"), str):
        try:
            accept_certificate(tls, request["cert"], public_key)
        except RuntimeError as e:
            return {"error": str(e)}, False
        return {"ok": True}, True
    return {"error": "expected a nonce or a certificate"}, False


def serve(home, address, port, deadline):
    tls = os.path.join(home, "tls")
    ticket_file = os.path.join(tls, "enroll.json")
    with open(ticket_file) as f:
        ticket = json.load(f)
    started = time.monotonic()
    csr, public_key = make_key(tls, ticket["name"])
    say(f"key made in {time.monotonic() - started:.2f}s; waiting on {address}:{port}")
    listener = socket.create_server((address, port), reuse_port=False)
    listener.settimeout(1)
    with listener:
        while time.time() < deadline:
            try:
                conn, peer = listener.accept()
            except socket.timeout:  # noqa: UP041 (not TimeoutError before Python 3.10)
                continue
            with conn:
                conn.settimeout(10)
                try:
                    line = conn.makefile("rb").readline(LINE_LIMIT)
                    reply, done = answer(json.loads(line), ticket, csr, public_key, tls)
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except (OSError, ValueError, AttributeError) as e:
                    say(f"a bad request from {peer[0]}: {e}")
                    continue
                if "error" in reply:
                    say(f"{peer[0]}: {reply['error']}")
            if done:
                break
        else:
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
