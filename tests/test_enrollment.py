"""Enrollment: a VM makes its own key and the client certifies it, once, for that VM.

The VM's side is the shipped ``enroll.py`` run as its own process (as the boot script
runs it); the client's side is the cluster's real ``Enrollment``. Each refusal has a
positive control: the same exchange with the right token, name and time succeeds.
"""

import asyncio
import datetime
import json
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from distributed import Client
from helpers import answers_without_certificate, decoded_files

from dask_secure_cloud import LocalVMCluster, preloads
from dask_secure_cloud.cloudinit import secrets_in
from dask_secure_cloud.credentials import ClusterCredentials, Role, parse_identity
from dask_secure_cloud.enrollment import (
    Enrollment,
    EnrollmentRefused,
    RelayedEnrollment,
    ask_directly,
)
from dask_secure_cloud.vm.enroll import LINE_DEADLINE, MAX_CONNECTIONS, proof
from dask_secure_cloud.vm.peers import secure_cloud_enroll_relay

WINDOW = datetime.timedelta(minutes=10)
LIFETIME = datetime.timedelta(hours=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def vm_side(home: Path, ca_pem: str, name: str, token: str, port: int) -> subprocess.Popen:
    """``enroll.py`` as a VM runs it, with what its user-data wrote."""
    (home / "tls").mkdir(parents=True, mode=0o700)
    (home / "tls/ca.pem").write_text(ca_pem)
    (home / "tls/enroll.json").write_text(json.dumps({"name": name, "token": token}))
    (home / "enroll.py").write_text(preloads.enroll_script())
    deadline = time.time() + 60
    return subprocess.Popen(
        [sys.executable, home / "enroll.py", home, "127.0.0.1", str(port), str(deadline)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
        else:
            writer.close()
            return
    raise AssertionError(f"nothing listens on {port}")


def forged_answer(name: str, token: str, nonce: str) -> dict[str, str]:
    """What someone who read ``token`` in a user-data answers, with a key of their own."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    return {"name": name, "csr": csr, "proof": proof(token, name, nonce, csr)}


async def test_a_vm_makes_its_key_and_the_client_certifies_it(tmp_path):
    creds = ClusterCredentials("c-enrol")
    enrollment = Enrollment(creds, WINDOW, LIFETIME)
    port = free_port()
    token = enrollment.ticket(Role.WORKER, "worker-0", port)
    home = tmp_path / "vm"
    process = vm_side(home, creds.ca_cert_pem, "worker-0", token, port)
    try:
        await wait_listening(port)
        # The VM refuses a certificate of another CA, and one for another key ...
        stranger = ClusterCredentials("c-enrol").issue(Role.WORKER, "worker-0")
        ours_other_key = creds.issue(Role.WORKER, "worker-0")
        for cert in (stranger.cert_pem, ours_other_key.cert_pem):
            answer = await ask_directly("127.0.0.1", port, {"cert": cert})
            assert "refused a certificate" in answer["error"]
        assert process.poll() is None
        # ... and takes the one the client signed for its own request.
        cert = await enrollment.enroll(
            "worker-0", lambda line: ask_directly("127.0.0.1", port, line)
        )
        # The ticket goes once the port is free: the sign for Dask to take the port.
        for _ in range(1000):
            if not (home / "tls/enroll.json").exists():
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the ticket is still there 10 s after enrolling")
        with socket.socket() as dask_listener:
            dask_listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            dask_listener.bind(("127.0.0.1", port))
            dask_listener.listen()
        assert process.wait(timeout=10) == 0, process.stdout.read()
    finally:
        process.kill()
    # The certificate and the key made on the VM, in one 0600 file; the token is gone.
    node = home / "tls/node.pem"
    assert stat.S_IMODE(node.stat().st_mode) == 0o600
    assert node.read_text().startswith(cert.strip() + "\n-----BEGIN PRIVATE KEY")
    assert sorted(p.name for p in (home / "tls").iterdir()) == ["ca.pem", "node.pem"]
    key_pem = b"-----BEGIN PRIVATE KEY" + node.read_bytes().split(b"-----BEGIN PRIVATE KEY")[1]
    key = serialization.load_pem_private_key(key_pem, None)
    issued = x509.load_pem_x509_certificate(cert.encode())
    assert issued.public_key() == key.public_key()
    assert parse_identity(issued) == ("c-enrol", Role.WORKER, "worker-0")
    assert enrollment.certificate("worker-0") == cert


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except ConnectionResetError:
        return True
    except asyncio.TimeoutError:
        return False


async def test_the_enrollment_port_serves_everyone_at_once_and_no_one_for_long(tmp_path):
    """Anyone who reaches a booting VM's port may connect: its listener answers the
    client while ``MAX_CONNECTIONS`` strangers are connected, closes the oldest when one
    more comes, and closes any connection without a whole line ``LINE_DEADLINE`` after
    it came, even one sending a byte now and then."""
    creds = ClusterCredentials("c-slow")
    enrollment = Enrollment(creds, WINDOW, LIFETIME)
    port = free_port()
    token = enrollment.ticket(Role.WORKER, "worker-0", port)
    process = vm_side(tmp_path / "vm", creds.ca_cert_pem, "worker-0", token, port)
    try:
        await wait_listening(port)
        started = time.monotonic()
        trickler = await asyncio.open_connection("127.0.0.1", port)
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
        # One more than the bound: the oldest (the trickler) went at once.
        assert await _closed_within(trickler[0], 1)
        # The others are open, and the client is answered meanwhile (ousting one more).
        answer = await ask_directly("127.0.0.1", port, {"nonce": "00"})
        assert answer["name"] == "worker-0"
        assert not await _closed_within(silent[1][0], 0.1)
        for _ in range(3):  # a byte every second: no line
            silent[-1][1].write(b"{")
            await asyncio.sleep(1)
        for reader, _ in silent[1:]:
            assert await _closed_within(reader, LINE_DEADLINE + 3 - (time.monotonic() - started))
        cert = await enrollment.enroll(
            "worker-0", lambda line: ask_directly("127.0.0.1", port, line)
        )
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
    output = process.stdout.read()
    assert f"no whole line within {LINE_DEADLINE:.0f}s" in output, output
    assert "more of these are only counted" in output, output
    assert enrollment.certificate("worker-0") == cert


async def test_a_worker_enrols_through_the_relay_as_soon_as_it_answers(tmp_path):
    """Workers start answering at unknown times: the client's rounds come quickly while
    one boots, so a late worker is certified in about a second, not a round later."""
    creds = ClusterCredentials("c-relay")
    enrollment = Enrollment(creds, WINDOW, LIFETIME)
    port = free_port()
    token = enrollment.ticket(Role.WORKER, "worker-0", port)
    relayed = RelayedEnrollment(enrollment, secure_cloud_enroll_relay, interval=60)
    certified = relayed.add("worker-0", "127.0.0.1")
    await asyncio.sleep(3)  # the VM boots meanwhile: several rounds find nothing
    assert not certified.done()
    started = time.monotonic()
    process = vm_side(tmp_path / "vm", creds.ca_cert_pem, "worker-0", token, port)
    try:
        cert = await asyncio.wait_for(certified, 30)
        waited = time.monotonic() - started
        assert process.wait(timeout=10) == 0, process.stdout.read()
    finally:
        process.kill()
        await relayed.close()
    assert enrollment.certificate("worker-0") == cert
    assert waited < 5, f"certified {waited:.1f}s after it started answering"


async def test_a_scheduler_still_starting_its_relay_only_delays_enrollment(tmp_path, caplog):
    """Dask answers ``None`` for a handler it does not have yet, and the scheduler's
    preload adds the relay just after the scheduler listens: with the boots overlapped,
    the first rounds come in that window. They are retried, not the end of enrollment."""
    creds = ClusterCredentials("c-early")
    enrollment = Enrollment(creds, WINDOW, LIFETIME)
    port = free_port()
    token = enrollment.ticket(Role.WORKER, "worker-0", port)
    calls = []

    async def relay_of_a_starting_scheduler(requests):
        calls.append(requests)
        return None if len(calls) <= 3 else await secure_cloud_enroll_relay(requests)

    process = vm_side(tmp_path / "vm", creds.ca_cert_pem, "worker-0", token, port)
    relayed = RelayedEnrollment(enrollment, relay_of_a_starting_scheduler, interval=0.5)
    try:
        await wait_listening(port)
        cert = await asyncio.wait_for(relayed.add("worker-0", "127.0.0.1"), 30)
        assert process.wait(timeout=10) == 0, process.stdout.read()
    finally:
        process.kill()
        await relayed.close()
    assert len(calls) >= 4 and enrollment.certificate("worker-0") == cert
    assert "Enrollment of booting workers stopped" not in caplog.text


async def test_a_token_is_single_use_bound_to_its_vm_and_its_boot_window():
    creds = ClusterCredentials("c-tokens")
    clock = Clock()
    enrollment = Enrollment(creds, WINDOW, LIFETIME, clock=clock)
    tokens = {name: enrollment.ticket(Role.WORKER, name, 1) for name in ("w-0", "w-1", "w-2")}

    def refused(name: str, answer_for) -> str:
        nonce = enrollment.nonce()
        with pytest.raises(EnrollmentRefused) as info:
            enrollment.certificate_for(name, nonce, answer_for(nonce))
        return str(info.value)

    # Misdirected: w-1's token presented at w-0, under either name.
    assert "does not match" in refused("w-0", lambda n: forged_answer("w-0", tokens["w-1"], n))
    assert "answered as 'w-1'" in refused("w-0", lambda n: forged_answer("w-1", tokens["w-1"], n))
    # A recorded answer (to another nonce) does not pass either.
    old = forged_answer("w-0", tokens["w-0"], enrollment.nonce())
    assert "does not match" in refused("w-0", lambda n: old)
    # A name no token was issued for.
    assert "no enrollment token" in refused("w-9", lambda n: forged_answer("w-9", "x", n))

    # Positive control, then the token is spent: a second key with it is refused.
    nonce = enrollment.nonce()
    answer = forged_answer("w-0", tokens["w-0"], nonce)
    cert = enrollment.certificate_for("w-0", nonce, answer)
    # The same key asking again (its reply was lost) gets the same certificate ...
    nonce = enrollment.nonce()
    again = {**answer, "proof": proof(tokens["w-0"], "w-0", nonce, answer["csr"])}
    assert enrollment.certificate_for("w-0", nonce, again) == cert
    # ... another key does not, and once the VM confirmed, nothing does.
    assert "certified another key" in refused(
        "w-0", lambda n: forged_answer("w-0", tokens["w-0"], n)
    )
    enrollment.confirm("w-0", {"ok": True})
    assert "used already" in refused("w-0", lambda n: forged_answer("w-0", tokens["w-0"], n))

    # Expired: past its boot window, a token is worth nothing.
    clock.now += WINDOW.total_seconds() + 1
    assert "expired" in refused("w-2", lambda n: forged_answer("w-2", tokens["w-2"], n))


@pytest.mark.slow
async def test_user_data_read_back_from_a_running_cluster_is_worth_nothing(
    vm_dir, recorded_user_data
):
    """Everything a VM's user-data holds, read by anyone after boot (an account reader,
    a process on the VM via the metadata service): no key, and a spent token."""
    async with (
        LocalVMCluster(n_workers=2, directory=vm_dir, asynchronous=True) as cluster,
        Client(cluster, asynchronous=True) as client,
    ):
        await client.wait_for_workers(2, timeout=60)
        enrollment = cluster.planner.enrollment
        vm_keys = [
            p.read_bytes() for p in vm_dir.glob("*/*/root/opt/dask-secure-cloud/tls/node.pem")
        ]
        assert len(vm_keys) == 3 and len(recorded_user_data) == 3
        for user_data in recorded_user_data:
            assert secrets_in(user_data) == []
            files = decoded_files(user_data)
            assert not any(
                key.split(b"-----BEGIN PRIVATE KEY-----")[1] in blob
                for key in vm_keys
                for blob in (user_data, *files.values())
            )
            ticket = json.loads(files["/opt/dask-secure-cloud/tls/enroll.json"])
            name, token = ticket["name"], ticket["token"]
            # Whoever answers for that VM with its token and a key of their own is refused,
            # and so is whoever presents it for another VM (the scheduler's for a
            # worker, a worker's for the scheduler).
            with pytest.raises(EnrollmentRefused, match="used already"):
                await enrollment.enroll(name, _answering(name, token))
            other = "worker-0" if name == "scheduler" else "scheduler"
            with pytest.raises(EnrollmentRefused, match="does not match"):
                await enrollment.enroll(other, _answering(other, token))
            # Its CA certificate alone opens nothing.
            ca_pem = files["/opt/dask-secure-cloud/tls/ca.pem"].decode()
            for address in (cluster.scheduler_address, *cluster.scheduler_info["workers"]):
                assert not await answers_without_certificate(address, ca_pem)
        # The cluster still computes: the refusals touched nothing.
        assert await client.submit(sum, [1, 2]) == 3


def _answering(name: str, token: str):
    async def ask(line):
        if "nonce" in line:
            return forged_answer(name, token, line["nonce"])
        return {"ok": True}

    return ask
