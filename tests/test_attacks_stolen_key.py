"""A stolen worker key acts only as its own VM: the attacks of issue 24, items 1 and 2.

The attacker holds worker-1's files, copied from its VM's directory (its CA certificate
and ``node.pem``, its key and certificate), and reaches the scheduler from an address of
its own. Each attack is tried against a real ``LocalVMCluster`` whose scheduler and
workers are separate processes loading the shipped ``peers.py``; each case names what it
tries, and a positive control shows that the same request for worker-1 itself (or the
client's own renewal) still works, so a refusal comes from the check, not a broken test.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from distributed import Client
from distributed.comm import connect, get_address_host
from distributed.security import Security
from test_peer_roles import wait_until

from dask_secure_cloud import LocalVMCluster, preloads
from dask_secure_cloud.cloudinit import VM_HOME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: Where the attacker's own Dask worker listens: no VM of the cluster has this address.
ATTACKER_HOST = "127.0.0.1"


@dataclass
class Stolen:
    """One worker's key files as an attacker copies them from its VM."""

    name: str
    files: Path

    @classmethod
    def from_vm(cls, vm_dir: Path, cluster: LocalVMCluster, name: str, to: Path) -> Stolen:
        tls = vm_dir / cluster.cluster_id / name / "root" / VM_HOME.lstrip("/") / "tls"
        to.mkdir(mode=0o700)
        for file in ("ca.pem", "node.pem"):
            shutil.copy(tls / file, to / file)
        return cls(name, to)

    @property
    def security(self) -> Security:
        """The stolen certificate, presented as a client's."""
        node = str(self.files / "node.pem")
        return Security(
            require_encryption=True,
            tls_ca_file=str(self.files / "ca.pem"),
            tls_client_cert=node,
            tls_client_key=node,
        )

    def run_worker(self, cluster: LocalVMCluster, name: str) -> subprocess.Popen[str]:
        """A real ``dask worker`` named ``name`` on the attacker's address, with the
        stolen files and the shipped preload (which answers the client's renewal)."""
        host, port = cluster.scheduler_address.split("//")[1].rsplit(":", 1)
        preload = self.files / "peers.py"
        preload.write_text(
            preloads.peer_checks(
                {"cluster_id": cluster.cluster_id, "role": "worker", "scheduler": (host, int(port))}
            )
        )
        node = self.files / "node.pem"
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address),
                *("--no-nanny", "--no-dashboard", "--host", ATTACKER_HOST, "--name", name),
                *("--tls-ca-file", self.files / "ca.pem", "--tls-cert", node, "--tls-key", node),
                *("--preload", preload, "--death-timeout", "30"),
                *("--local-directory", self.files / "scratch"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )


def workers_named(cluster: LocalVMCluster, name: str) -> list[str]:
    """The addresses of the connected Dask workers that call themselves ``name``."""
    workers = cluster.scheduler_info.get("workers", {})
    return [address for address, info in workers.items() if str(info.get("name")) == name]


def vm_address(cluster: LocalVMCluster, name: str) -> str:
    return cluster.workers[name].vm.private_ip


async def worker_ends_or_joins(
    cluster: LocalVMCluster, process: subprocess.Popen[str], name: str
) -> None:
    """Wait until the attacker's worker ``name`` has joined, or its process ended."""
    ended_or_joined = await wait_until(
        lambda: (
            process.poll() is not None
            or any(get_address_host(a) == ATTACKER_HOST for a in workers_named(cluster, name))
        ),
        45,
    )
    assert ended_or_joined, "the attacker's worker neither joined nor ended"


def stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.kill()
    return process.communicate()[0]


async def ask(scheduler: str, security: Security, op: str, /, **msg: Any) -> tuple[str, Any]:
    """Call ``op`` on the scheduler: ``("refused", reason)`` or ``("answered", reply)``
    (as ``test_peer_roles.call``, whose own arguments would clash with ``address=``)."""
    comm = await connect(scheduler, timeout=3, **security.get_connection_args("client"))
    try:
        await comm.write({"op": op, "reply": True, **msg})
        answer = await asyncio.wait_for(comm.read(), 10)
    except (OSError, asyncio.TimeoutError) as e:
        return "refused", f"read: {e!r}"
    finally:
        await comm.close()
    if isinstance(answer, dict) and answer.get("status") == "uncaught-error":
        return "refused", str(answer.get("exception_text"))
    return "answered", answer


Attack = Callable[[LocalVMCluster, Client, Stolen], Awaitable[None]]


async def unregister_another_worker(
    cluster: LocalVMCluster, client: Client, stolen: Stolen
) -> None:
    """``unregister`` worker-0, by its address and by its name."""
    worker_0 = workers_named(cluster, "worker-0")[0]
    for target in (worker_0, "worker-0"):
        state, reason = await ask(
            cluster.scheduler_address,
            stolen.security,
            "unregister",
            address=target,
            stimulus_id="attack",
        )
        assert state == "refused", f"unregister {target}: {reason}"
        assert "may not call 'unregister' for worker 'worker-0'" in reason
    await asyncio.sleep(1)
    assert workers_named(cluster, "worker-0") == [worker_0]


async def retire_another_worker(cluster: LocalVMCluster, client: Client, stolen: Stolen) -> None:
    """``retire_workers`` worker-0 by address, by name, or by letting the scheduler pick."""
    worker_0 = workers_named(cluster, "worker-0")[0]
    for how in ({"workers": [worker_0]}, {"names": ["worker-0"]}, {"n": 1}, {}):
        state, reason = await ask(
            cluster.scheduler_address,
            stolen.security,
            "retire_workers",
            close_workers=True,
            stimulus_id="attack",
            **how,
        )
        assert state == "refused", f"retire_workers {how}: {reason}"
        assert "worker certificate for worker-1 may" in reason
    await asyncio.sleep(1)
    assert workers_named(cluster, "worker-0") == [worker_0]
    # The control: a worker may still hand its own tasks on (Worker.close_gracefully).
    worker_1 = workers_named(cluster, "worker-1")[0]
    state, answer = await ask(
        cluster.scheduler_address,
        stolen.security,
        "retire_workers",
        workers=[worker_1],
        close_workers=False,
        remove=False,
        stimulus_id="control",
    )
    assert state == "answered", answer


async def register_under_another_name(
    cluster: LocalVMCluster, client: Client, stolen: Stolen
) -> None:
    """Register a Dask worker named worker-0 once worker-0's own worker has left."""
    worker_0 = workers_named(cluster, "worker-0")[0]
    await client.retire_workers([worker_0], close_workers=True)
    assert await wait_until(lambda: not workers_named(cluster, "worker-0"), 30)
    impostor = stolen.run_worker(cluster, "worker-0")
    try:
        await worker_ends_or_joins(cluster, impostor, "worker-0")
        joined = workers_named(cluster, "worker-0")
    finally:
        output = stop(impostor)
    assert joined == [], output
    assert "may not register a Dask worker named 'worker-0'" in output, output


async def renewal_by_reported_name(cluster: LocalVMCluster, client: Client, stolen: Stolen) -> None:
    """Stand in for worker-1 on the attacker's own address, and wait for the client to
    renew worker-1's certificate for the attacker's key."""
    worker_1 = workers_named(cluster, "worker-1")[0]
    # Its own worker is the one a worker certificate may remove.
    state, answer = await ask(
        cluster.scheduler_address,
        stolen.security,
        "unregister",
        address=worker_1,
        stimulus_id="attack",
    )
    assert state == "answered", answer
    assert await wait_until(lambda: not workers_named(cluster, "worker-1"), 30)
    impostor = stolen.run_worker(cluster, "worker-1")
    stolen_cert = (stolen.files / "node.pem").read_text()
    try:
        # Registering under its certificate's own name is allowed (the control).
        await worker_ends_or_joins(cluster, impostor, "worker-1")
        assert impostor.poll() is None, stop(impostor)
        [impostor_address] = workers_named(cluster, "worker-1")
        assert get_address_host(impostor_address) != vm_address(cluster, "worker-1")

        renewal = cluster._renewal
        renewal.due = lambda now=None: ["worker-1", "worker-0"]  # as at half-life
        renewed = await renewal.tick()
        # The real worker-0 renews at its VM's address; nothing reaches the impostor.
        assert renewed == ["worker-0"]
        assert "worker-1" not in renewal.count
        assert (stolen.files / "node.pem").read_text() == stolen_cert

        # Nor does the scheduler relay worker-0's renewal to a worker-1 certificate.
        with pytest.raises(PermissionError, match="is not worker-0"):
            await cluster.scheduler_comm.secure_cloud_renew_relay(
                address=impostor_address, name="worker-0", step="request"
            )
    finally:
        stop(impostor)


ATTACKS: dict[str, Attack] = {
    "unregister-another-worker": unregister_another_worker,
    "retire-another-worker": retire_another_worker,
    "register-under-another-name": register_under_another_name,
    "renewal-by-reported-name": renewal_by_reported_name,
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_a_stolen_worker_key_acts_only_as_its_own_vm(vm_dir, tmp_path, attack):
    async with LocalVMCluster(n_workers=2, directory=vm_dir, asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=60)
            stolen = Stolen.from_vm(vm_dir, cluster, "worker-1", tmp_path / "stolen")
            await ATTACKS[attack](cluster, client, stolen)
            # The cluster still computes after the attack.
            assert await client.submit(sum, [1, 2], pure=False) == 3


async def test_a_vm_whose_dask_worker_is_gone_is_reported(vm_dir, tmp_path, caplog):
    """A worker removes itself (what its key may do); the cluster says so in its repr
    and its log, while the VM is still there."""
    async with LocalVMCluster(n_workers=2, directory=vm_dir, asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=60)
            assert "gone" not in repr(cluster)
            stolen = Stolen.from_vm(vm_dir, cluster, "worker-1", tmp_path / "stolen")
            worker_1 = workers_named(cluster, "worker-1")[0]
            state, answer = await ask(
                cluster.scheduler_address,
                stolen.security,
                "unregister",
                address=worker_1,
                stimulus_id="test",
            )
            assert state == "answered", answer
            report = "worker-1: VM running, its Dask worker is gone"
            assert await wait_until(lambda: report in repr(cluster), 30), repr(cluster)
            assert report in caplog.text
            assert any(report in line for _, line in cluster._cluster_manager_logs)
            assert "worker-0" not in repr(cluster).split("workers gone=")[1]
