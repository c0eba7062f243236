"""Attacks on enrollment, one parametrized case each, named after what it tries.

Slow peers (issue 24, item 5): whoever reaches a booting VM's enrollment port, with no
credential at all, trickles bytes, holds connections open or fills every slot; the VMs
of a ``LocalVMCluster`` enrol and compute all the same, in their usual time.

Bad answers (item 6): whatever answers at a VM's enrollment address sends a request
the CA must not sign (with that VM's valid token: the token is no obstacle) or an answer
that is no answer (no token needed); that VM alone is refused (logged and audited), the
others enrol meanwhile, and its real key is certified afterwards: nothing was recorded
for the bad one.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from distributed import Client, Scheduler, rpc
from test_enrollment import LIFETIME, WINDOW, free_port, vm_side, wait_listening

from dask_secure_cloud import LocalVMCluster, audit
from dask_secure_cloud.credentials import ClusterCredentials, Role
from dask_secure_cloud.enrollment import (
    Enrollment,
    EnrollmentRefused,
    RelayedEnrollment,
    ask_directly,
)
from dask_secure_cloud.providers import local
from dask_secure_cloud.vm.enroll import LINE_LIMIT, MAX_CONNECTIONS, proof
from dask_secure_cloud.vm.peers import secure_cloud_enroll_relay

# -- slow peers at the enrollment ports of a cluster's workers ----------------------------


def _connect(address: tuple[str, int], stop: threading.Event) -> socket.socket | None:
    """A connection to ``address`` as soon as something listens there."""
    while not stop.is_set():
        try:
            return socket.create_connection(address, timeout=1)
        except OSError:
            stop.wait(0.05)
    return None


def _closed(sock: socket.socket, wait: float) -> bool:
    """Whether the listener closed ``sock`` within ``wait`` seconds."""
    sock.settimeout(wait)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def trickle(address: tuple[str, int], stop: threading.Event) -> None:
    """Slowloris: the start of a line, then a byte a second, never its end."""
    while (sock := _connect(address, stop)) is not None:
        with sock:
            try:
                sock.sendall(b'{"nonce": "')
                while not stop.is_set() and not _closed(sock, 1.0):
                    sock.sendall(b"0")
            except OSError:
                pass
        stop.wait(0.2)


def hold_silently(address: tuple[str, int], stop: threading.Event) -> None:
    """Connect, say nothing, and connect again whenever closed."""
    while (sock := _connect(address, stop)) is not None:
        with sock:
            while not stop.is_set() and not _closed(sock, 0.5):
                pass
        stop.wait(0.2)


def nested_request(address: tuple[str, int], stop: threading.Event) -> None:
    """A line of JSON nested deeper than any parser recurses."""
    while (sock := _connect(address, stop)) is not None:
        with sock:
            try:
                sock.sendall(b"[" * 60_000 + b"\n")
                _closed(sock, 1.0)
            except OSError:
                pass
        stop.wait(0.5)


Peer = Callable[[tuple[str, int], threading.Event], None]


@dataclass(frozen=True)
class SlowPeers:
    id: str
    #: Each worker's port gets one of each.
    peers: tuple[Peer, ...]


SLOW_PEERS = [
    SlowPeers("slow-peers-trickle-bytes", (trickle,) * 3),
    SlowPeers("silent-peers-hold-connections", (hold_silently,) * 3),
    SlowPeers("trickling-and-silent-peers-together", (trickle,) * 3 + (hold_silently,)),
    SlowPeers("silent-peers-fill-every-slot", (hold_silently,) * (MAX_CONNECTIONS + 8)),
    SlowPeers("peer-sends-deeply-nested-json", (nested_request,)),
]


@pytest.fixture
def attack_workers(monkeypatch) -> Iterator[Callable[[SlowPeers], None]]:
    """Aim slow peers at each worker VM's enrollment port (its address is known just
    before it boots), from threads of this process: they are connected before the VM's
    enrollment listens, and reconnect whenever closed, until the test ends."""
    ports: dict[str, int] = {}
    stop = threading.Event()
    threads: list[threading.Thread] = []
    chosen: list[SlowPeers] = []
    ticket, boot = Enrollment.ticket, local.boot

    def recording_ticket(self: Enrollment, role: Role, name: str, port: int) -> str:
        ports[name] = port
        return ticket(self, role, name, port)

    def attacked_boot(*args: Any, address: str, name: str, role: str, **kwargs: Any) -> Any:
        if role == Role.WORKER.value:
            for peer in chosen[0].peers:
                thread = threading.Thread(
                    target=peer, args=((address, ports[name]), stop), daemon=True
                )
                thread.start()
                threads.append(thread)
        return boot(*args, address=address, name=name, role=role, **kwargs)

    monkeypatch.setattr(Enrollment, "ticket", recording_ticket)
    monkeypatch.setattr(local, "boot", attacked_boot)
    yield chosen.append
    stop.set()
    for thread in threads:
        thread.join(timeout=5)


@pytest.mark.slow
@pytest.mark.parametrize("attack", SLOW_PEERS, ids=lambda a: a.id)
async def test_slow_peers_do_not_stall_enrollment(attack, attack_workers, vm_dir):
    """Without a credential, peers at both workers' enrollment ports: the cluster is
    ready and computes within its usual time (about ten seconds here; a line's
    deadline is five), not at its boot timeout."""
    attack_workers(attack)
    started = time.monotonic()
    async with (
        LocalVMCluster(n_workers=2, directory=vm_dir, asynchronous=True) as cluster,
        Client(cluster, asynchronous=True) as client,
    ):
        await client.wait_for_workers(2, timeout=40)
        assert await client.submit(sum, [1, 2]) == 3
        ready = time.monotonic() - started
        assert len(cluster.planner.enrollment.enrolled()) == 3
    print(f"{attack.id}: ready and computing after {ready:.1f}s")
    assert ready < 30, f"ready after {ready:.0f}s"


# -- bad answers at a VM's enrollment address ------------------------------------------------


def _request(key: Any, name: str) -> str:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )


def _another(name: str) -> str:
    """Another VM's name: the scheduler's for a worker, a worker's for the scheduler."""
    return "worker-1" if name == "scheduler" else "scheduler"


def _proven(name: str, token: str, nonce: str, csr: str) -> bytes:
    """An answer with a valid proof: the VM's token is no obstacle to these attacks."""
    line = {"name": name, "csr": csr, "proof": proof(token, name, nonce, csr)}
    return json.dumps(line).encode() + b"\n"


@dataclass(frozen=True)
class BadAnswer:
    id: str
    #: The line answered to the client's nonce, from (name, token, nonce).
    answer: Callable[[str, str, str], bytes]
    #: What the refusal says (a regex): through the relay, or straight from the client.
    reason: str


BAD_ANSWERS = [
    BadAnswer(
        "rsa-request",
        lambda n, t, nonce: _proven(
            n, t, nonce, _request(rsa.generate_private_key(65537, 2048), n)
        ),
        "RSA-2048 key; only ECDSA P-256",
    ),
    BadAnswer(
        "p384-request",
        lambda n, t, nonce: _proven(
            n, t, nonce, _request(ec.generate_private_key(ec.SECP384R1()), n)
        ),
        "secp384r1 key; only ECDSA P-256",
    ),
    BadAnswer(
        "request-for-another-name",
        lambda n, t, nonce: _proven(
            n, t, nonce, _request(ec.generate_private_key(ec.SECP256R1()), _another(n))
        ),
        "the request is for CN=(scheduler|worker-1), not CN=",
    ),
    BadAnswer(
        "not-a-request",
        lambda n, t, nonce: _proven(
            n, t, nonce, "-----BEGIN CERTIFICATE REQUEST-----\nbm9wZQ==\n-----END CERTIF"
        ),
        "not a certificate request",
    ),
    BadAnswer("garbage-answer", lambda n, t, nonce: b"\x00\xffnot JSON\n", "malformed answer"),
    BadAnswer("answer-not-an-object", lambda n, t, nonce: b"[]\n", "malformed answer"),
    BadAnswer(
        "huge-answer", lambda n, t, nonce: b"x" * (LINE_LIMIT * 16) + b"\n", "malformed answer"
    ),
    BadAnswer(
        "deeply-nested-answer", lambda n, t, nonce: b"[" * 60_000 + b"\n", "malformed answer"
    ),
    BadAnswer(
        "non-ascii-proof",
        lambda n, t, nonce: (
            json.dumps({"name": n, "csr": "x", "proof": "\u00e9" * 64}, ensure_ascii=False).encode()
            + b"\n"
        ),
        "the proof does not match",
    ),
    BadAnswer(
        "lone-surrogate-in-answer",
        lambda n, t, nonce: b'{"name": "\\ud800", "csr": "x", "proof": "x"}\n',
        "malformed answer|answered as '\\\\ud800'",
    ),
    BadAnswer(
        "integer-too-big-to-relay",
        lambda n, t, nonce: b'{"name": ' + b"9" * 30 + b"}\n",
        "malformed answer|lacks a name",
    ),
]


class HostileVM:
    """Answers at a VM's enrollment port: ``attack`` to the first nonce, then honestly
    with a P-256 key of its own (as the VM's real ``enroll.py`` would), so the test can
    show that key is still certified after the bad one was refused."""

    def __init__(self, name: str, token: str, attack: BadAnswer) -> None:
        self.name, self.token, self.attack = name, token, attack
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.attacked = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = json.loads(await reader.readline())
            if "nonce" in line and not self.attacked:
                self.attacked = True
                writer.write(self.attack.answer(self.name, self.token, line["nonce"]))
            elif "nonce" in line:
                csr = _request(self.key, self.name)
                writer.write(_proven(self.name, self.token, line["nonce"], csr))
            else:
                writer.write(b'{"ok": true}\n')
            await writer.drain()
        except (OSError, ValueError):
            pass  # the asker gave up on a huge answer
        finally:
            writer.close()


@pytest.fixture
async def scheduler_relay() -> Any:
    """The relay as the client calls it: a Dask scheduler's handler over a real comm, so
    an answer the scheduler cannot send back fails here as it would in a cluster."""
    async with Scheduler(
        host="127.0.0.1", port=0, dashboard=False, dashboard_address="127.0.0.1:0"
    ) as scheduler:
        scheduler.handlers["secure_cloud_enroll_relay"] = secure_cloud_enroll_relay
        async with rpc(scheduler.address) as comm:

            async def relay(requests: list[list[Any]]) -> Any:
                return await comm.secure_cloud_enroll_relay(requests=requests)

            yield relay


def refusals(audit_log: Any) -> list[dict[str, Any]]:
    return [e for e in audit.read(audit_log) if e["event"] == "enrollment_refused"]


@pytest.mark.parametrize("attack", BAD_ANSWERS, ids=lambda a: a.id)
async def test_a_bad_answer_refuses_that_worker_alone(
    attack, tmp_path, scheduler_relay, audit_log, caplog
):
    """worker-0 answers badly once, worker-1 is a real VM: worker-1 enrols meanwhile,
    worker-0 is refused (logged, audited), then its real key is certified."""
    creds = ClusterCredentials("c-attack")
    enrollment = Enrollment(creds, WINDOW, LIFETIME)
    hostile_port, honest_port = free_port(), free_port()
    hostile = HostileVM(
        "worker-0", enrollment.ticket(Role.WORKER, "worker-0", hostile_port), attack
    )
    token = enrollment.ticket(Role.WORKER, "worker-1", honest_port)
    server = await asyncio.start_server(hostile.handle, "127.0.0.1", hostile_port)
    process = vm_side(tmp_path / "vm", creds.ca_cert_pem, "worker-1", token, honest_port)
    relayed = RelayedEnrollment(enrollment, scheduler_relay, interval=0.5)
    try:
        await wait_listening(honest_port)
        futures = [relayed.add(name, "127.0.0.1") for name in ("worker-0", "worker-1")]
        certs = await asyncio.wait_for(asyncio.gather(*futures), 20)
        assert process.wait(timeout=10) == 0, process.stdout.read()
    finally:
        process.kill()
        server.close()
        await relayed.close()
    assert hostile.attacked and certs == [enrollment.certificate(f"worker-{i}") for i in (0, 1)]
    issued = x509.load_pem_x509_certificate(certs[0].encode())
    assert issued.public_key() == hostile.key.public_key()
    why = relayed.refusal("worker-0")
    assert why is not None and re.search(attack.reason, why), why
    assert f"Enrollment of worker-0 refused: {why}" in caplog.text
    assert [(e["name"], e["reason"]) for e in refusals(audit_log)] == [("worker-0", why)]
    assert relayed.refusal("worker-1") is None


@pytest.mark.parametrize("attack", BAD_ANSWERS, ids=lambda a: a.id)
async def test_a_bad_answer_on_the_schedulers_port_is_refused(attack, audit_log):
    """The scheduler is asked straight from the client: the same answers are refused
    there (as ``EnrollmentRefused``, which the fleet logs and retries), audited, and
    its real key is certified next."""
    creds = ClusterCredentials("c-attack")
    enrollment = Enrollment(creds, WINDOW, LIFETIME)
    port = free_port()
    hostile = HostileVM("scheduler", enrollment.ticket(Role.SCHEDULER, "scheduler", port), attack)
    server = await asyncio.start_server(hostile.handle, "127.0.0.1", port)

    async def ask(line: Any) -> Any:
        return await ask_directly("127.0.0.1", port, line)

    try:
        with pytest.raises(EnrollmentRefused, match=attack.reason) as refused:
            await enrollment.enroll("scheduler", ask)
        cert = await enrollment.enroll("scheduler", ask)
    finally:
        server.close()
    issued = x509.load_pem_x509_certificate(cert.encode())
    assert issued.public_key() == hostile.key.public_key()
    assert [(e["name"], e["reason"]) for e in refusals(audit_log)] == [
        ("scheduler", str(refused.value))
    ]
