"""Who may talk to whom in a running cluster: the attack matrix of a member's key.

Each attack is tried against a real ``LocalVMCluster`` (its scheduler and workers are
separate processes loading the shipped ``peers.py`` preload) and each has a positive
control, so a refusal cannot come from a broken test instead of the check.
"""

import asyncio
import datetime
import pickle
import ssl
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from distributed import Client, Scheduler
from distributed.comm import connect
from distributed.security import Security
from helpers import answers_without_certificate

from dask_secure_cloud import LocalVMCluster, preloads
from dask_secure_cloud.credentials import (
    ClusterCredentials,
    ClusterSecurity,
    Role,
    parse_identity,
)
from dask_secure_cloud.errors import OptionError
from dask_secure_cloud.vm import peers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def as_client(leaf, *, max_version=None) -> Security:
    """A Security that presents ``leaf`` (any role) as its client certificate."""
    security = Security(
        require_encryption=True,
        tls_ca_file=leaf.ca_pem,
        tls_client_cert=leaf.cert_pem,
        tls_client_key=leaf.key_pem,
    )
    if max_version is not None:
        security.tls_min_version = ssl.TLSVersion.TLSv1_2
        security.tls_max_version = max_version
    return security


async def call(address: str, security: Security | None, op: str, **msg):
    """Call ``op`` at ``address``: ``("refused", reason)`` or ``("answered", reply)``."""
    args = security.get_connection_args("client") if security else {}
    try:
        comm = await connect(address, timeout=3, **args)
    except OSError as e:
        return "refused", f"connect: {e}"
    try:
        await comm.write({"op": op, "reply": True, **msg})
        answer = await asyncio.wait_for(comm.read(), 5)
    except (OSError, asyncio.TimeoutError) as e:
        return "refused", f"read: {e!r}"
    finally:
        await comm.close()
    if isinstance(answer, dict) and answer.get("status") == "uncaught-error":
        return "refused", str(answer.get("exception"))
    return "answered", answer


@pytest.mark.parametrize("workers_as_clients", [False, True])
async def test_a_member_key_cannot_act_beyond_its_role(vm_dir, workers_as_clients):
    async with LocalVMCluster(
        n_workers=2, directory=vm_dir, asynchronous=True, workers_as_clients=workers_as_clients
    ) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=60)
            await client.publish_dataset(secret=[1, 2, 3])
            workers = sorted(cluster.scheduler_info["workers"])
            credentials: ClusterCredentials = cluster._credentials
            scheduler = cluster.scheduler_address
            worker_key = as_client(credentials.issue(Role.WORKER, "worker-0"))
            scheduler_key = as_client(credentials.issue(Role.SCHEDULER, "scheduler"))
            now = datetime.datetime.now(datetime.timezone.utc)
            expired = as_client(
                credentials.issue(
                    Role.CLIENT,
                    "client",
                    not_before=now - datetime.timedelta(hours=3),
                    not_after=now - datetime.timedelta(hours=1),
                )
            )
            stranger = ClusterCredentials("someone-else").client_security()
            tls12 = as_client(credentials.client, max_version=ssl.TLSVersion.TLSv1_2)

            # Positive controls: the client at the scheduler, the scheduler at a worker.
            assert (await call(scheduler, cluster.security, "identity"))[0] == "answered"
            assert (await call(workers[0], scheduler_key, "identity"))[0] == "answered"

            for address in (scheduler, workers[0]):
                assert not await answers_without_certificate(address, credentials.ca_cert_pem)
                assert (await call(address, stranger, "identity"))[0] == "refused"
                assert (await call(address.replace("tls", "tcp"), None, "identity"))[0] == (
                    "refused"
                )
                assert (await call(address, tls12, "identity"))[0] == "refused"
                assert (await call(address, expired, "identity"))[0] == "refused"

            # A worker's key never renews the lease, nor uses the enrollment relay,
            # whatever the settings.
            state, reason = await call(scheduler, worker_key, "secure_cloud_lease")
            assert state == "refused" and "secure_cloud_lease" in reason
            assert (await call(scheduler, cluster.security, "secure_cloud_lease"))[0] == (
                "answered"
            )
            relay = {"requests": [["127.0.0.1", 9, {"nonce": "00"}]]}
            state, reason = await call(scheduler, worker_key, "secure_cloud_enroll_relay", **relay)
            assert state == "refused" and "secure_cloud_enroll_relay" in reason
            state, answer = await call(
                scheduler, cluster.security, "secure_cloud_enroll_relay", **relay
            )
            assert state == "answered" and "unreachable" in answer[0]

            # A worker's key does not run code on another worker.
            state, _ = await call(workers[1], worker_key, "run", function=b"", args=b"")
            assert state == "refused"

            # A worker's key reads published data only if workers may act as clients.
            state, reason = await call(scheduler, worker_key, "publish_list")
            if workers_as_clients:
                assert state == "answered" and "secret" in reason
            else:
                assert state == "refused" and "workers_as_clients=True" in reason

            def get_client_in_a_task() -> int:
                from distributed import get_client

                return get_client().submit(lambda: 3).result()

            if workers_as_clients:
                assert await client.submit(get_client_in_a_task) == 3
            else:
                with pytest.raises(Exception, match="workers_as_clients=True"):
                    await client.submit(get_client_in_a_task)
            # The cluster still computes after every refusal.
            assert await client.submit(sum, [1, 2]) == 3


async def test_a_worker_key_cannot_pose_as_the_scheduler(vm_dir, tmp_path):
    """A fake scheduler on the scheduler's own host, serving a worker's certificate:
    neither the cluster's client nor a real worker process will talk to it."""
    async with LocalVMCluster(n_workers=1, directory=vm_dir, asynchronous=True) as cluster:
        credentials: ClusterCredentials = cluster._credentials
        host = cluster.scheduler_address.split("//")[1].rsplit(":", 1)[0]
        leaf = credentials.issue(Role.WORKER, "worker-0")
        fake_security = Security(
            require_encryption=True,
            tls_ca_file=leaf.ca_pem,
            tls_scheduler_cert=leaf.cert_pem,
            tls_scheduler_key=leaf.key_pem,
        )
        real_security = as_client(credentials.issue(Role.SCHEDULER, "scheduler"))
        real_security.tls_scheduler_cert = real_security.tls_client_cert
        real_security.tls_scheduler_key = real_security.tls_client_key
        for security, posing in ((fake_security, True), (real_security, False)):
            async with Scheduler(
                security=security, host=host, port=0, dashboard_address=f"{host}:0"
            ) as fake:
                client_state, _ = await call(fake.address, cluster.security, "identity")
                worker = run_worker(cluster, fake.address, tmp_path)
                joined = await wait_until(lambda: len(fake.workers) == 1, 20)
                worker.kill()
                output = worker.communicate()[0]
                if posing:
                    assert client_state == "refused"
                    assert not joined, output
                    assert "may not act as scheduler" in output
                else:  # the control: a true scheduler certificate is accepted by both
                    assert client_state == "answered"
                    assert joined, output


def run_worker(cluster, scheduler_address: str, tmp_path: Path) -> subprocess.Popen:
    """A real ``dask worker`` process with a worker certificate and the shipped preload."""
    leaf = cluster._credentials.issue(Role.WORKER, "worker-9")
    files = {"ca.pem": leaf.ca_pem, "node.pem": leaf.cert_pem, "node.key": leaf.key_pem}
    host, port = scheduler_address.split("//")[1].rsplit(":", 1)
    files["peers.py"] = preloads.peer_checks(
        {"cluster_id": cluster.cluster_id, "role": "worker", "scheduler": (host, int(port))}
    )
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "distributed.cli.dask_worker", scheduler_address),
            *("--no-nanny", "--no-dashboard", "--host", host, "--death-timeout", "30"),
            *("--tls-ca-file", tmp_path / "ca.pem", "--tls-cert", tmp_path / "node.pem"),
            *("--tls-key", tmp_path / "node.key", "--preload", tmp_path / "peers.py"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def wait_until(condition, seconds: float) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.2)
    return condition()


def test_the_clients_security_does_not_travel_but_a_portable_one_does():
    credentials = ClusterCredentials("c1")
    security = credentials.client_security()
    assert isinstance(security, ClusterSecurity)
    with pytest.raises(TypeError, match="portable_security"):
        pickle.dumps(security)
    portable = credentials.portable_client_security("notebook-2")
    copy = pickle.loads(pickle.dumps(portable))
    assert copy.tls_client_key == portable.tls_client_key != security.tls_client_key
    certificate = x509.load_pem_x509_certificate(copy.tls_client_cert.encode())
    assert parse_identity(certificate) == ("c1", Role.CLIENT, "notebook-2")
    with pytest.raises(OptionError, match="own certificate"):
        credentials.portable_client_security("client")


class _Scheduler:
    """What ``peers.worker_request_refused`` reads of a scheduler: its workers, by
    address, and its way of reading an address or a name."""

    def __init__(self, workers: dict[str, str]) -> None:
        self.workers = {
            address: SimpleNamespace(address=address, name=name)
            for address, name in workers.items()
        }
        self.aliases = {name: address for address, name in workers.items()}

    def coerce_address(self, target, resolve: bool = True) -> str:
        if not isinstance(target, str):
            raise TypeError(f"addresses should be strings, got {target!r}")
        return self.aliases.get(target, target)


@pytest.mark.parametrize(
    ("op", "msg", "refused"),
    [
        ("register-worker", {"name": "worker-1"}, False),
        ("register-worker", {"name": "worker-1-3"}, False),  # nworkers: NAME-i
        ("register-worker", {"name": "worker-0"}, True),
        ("register-worker", {"name": "worker-10"}, True),
        ("register-worker", {"name": "worker-1-x"}, True),
        ("unregister", {"address": "tls://10.0.0.3:1"}, False),
        ("unregister", {"address": "tls://10.0.0.2:1"}, True),
        ("unregister", {"address": "worker-0"}, True),  # the scheduler takes names too
        ("unregister", {"address": "tls://10.0.0.9:1"}, False),  # nobody: a no-op
        ("heartbeat_worker", {"address": "tls://10.0.0.2:1"}, True),
        ("add_keys", {"worker": "tls://10.0.0.2:1", "keys": ["x"]}, True),
        ("retire_workers", {"workers": ["tls://10.0.0.3:1"]}, False),
        ("retire_workers", {"workers": ["tls://10.0.0.3:1", "tls://10.0.0.2:1"]}, True),
        ("retire_workers", {"names": ["worker-1"]}, False),
        ("retire_workers", {"names": ["worker-0"]}, True),
        ("retire_workers", {"n": 1}, True),  # the scheduler would pick
        ("retire_workers", {}, True),
        ("who_has", {"keys": ["x"]}, False),
    ],
)
def test_a_worker_certificate_names_only_its_own_worker(op, msg, refused):
    scheduler = _Scheduler({"tls://10.0.0.2:1": "worker-0", "tls://10.0.0.3:1": "worker-1"})
    identity = peers.Identity("c1", "worker", "worker-1")
    why = peers.worker_request_refused(scheduler, identity, op, msg)
    assert (why is not None) == refused, why
    if refused:
        assert "worker certificate for worker-1" in why
    with pytest.raises(PermissionError, match="not a worker's address"):
        peers.worker_request_refused(scheduler, identity, "unregister", {"address": ["x"]})
