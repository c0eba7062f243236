"""Measured figures for dask-secure-cloud. Targets, not assertions: this prints numbers.

    python benchmarks/run.py            # all three
    python benchmarks/run.py startup    # one of: credentials, user-data, startup, startup-cold

Timings on a shared machine are noisy: the start-up figure is a ratio of two clusters
measured side by side, alternating, in the same run.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import timeit

from dask_secure_cloud.cloudinit import LIMITS, BootPlan, DockerRuntime, render
from dask_secure_cloud.cluster import default_docker_image
from dask_secure_cloud.credentials import ClusterCredentials, Role


def credentials(n: int = 1000) -> None:
    """Target: CA plus leaves for 1,000 workers in < 0.3 s."""

    def make() -> None:
        creds = ClusterCredentials("bench")
        creds.issue(Role.SCHEDULER, "scheduler")
        for i in range(n):
            creds.issue(Role.WORKER, f"worker-{i}")
        creds.client_security()

    best = min(timeit.repeat(make, number=1, repeat=5))
    print(f"credentials   CA + scheduler + {n} workers + client: {best:.3f} s (best of 5)")


def user_data() -> None:
    """Target: < 6 KB for a TLS worker, boot script included (dask-cloudprovider ships
    ~14 KB)."""
    creds = ClusterCredentials("bench")
    for role, command in (
        (Role.SCHEDULER, ("scheduler", "--port", "8786", "--protocol", "tls")),
        (
            Role.WORKER,
            ("worker", "tls://10.0.0.12:8786", "--name", "worker-17", "--protocol", "tls"),
        ),
    ):
        plan = BootPlan(
            cluster_id="dsc-0123456789",
            role=role,
            name=command[0],
            command=command,
            runtime=DockerRuntime(default_docker_image()),
            tls=creds.issue(role, "worker-17"),
            dashboard_port=8787 if role is Role.SCHEDULER else None,
        )
        size = len(render(plan))
        share = size / LIMITS["aws"].max_bytes
        print(f"user-data     {role.value:9} with TLS: {size:,} bytes ({share:.1%} of EC2's 16 KB)")


async def _time_local_vm(n: int, nanny: bool = True) -> float:
    from distributed import Client

    from dask_secure_cloud import LocalVMCluster

    started = time.perf_counter()
    options = {"nanny": nanny}
    async with LocalVMCluster(n_workers=n, worker_options=options, asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(n, timeout=120)
            elapsed = time.perf_counter() - started
    return elapsed


async def _time_local_cluster(n: int) -> float:
    from distributed import Client, LocalCluster

    started = time.perf_counter()
    async with LocalCluster(
        n_workers=n, processes=True, threads_per_worker=1, asynchronous=True, dashboard_address=":0"
    ) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(n, timeout=120)
            elapsed = time.perf_counter() - started
    return elapsed


def startup(rounds: int = 5, n: int = 2) -> None:
    """Target: LocalVMCluster (TLS) / LocalCluster(processes=True) time to ready < 1.5."""
    ours, bare, theirs = [], [], []
    for _ in range(rounds):
        theirs.append(asyncio.run(_time_local_cluster(n)))
        ours.append(asyncio.run(_time_local_vm(n)))
        bare.append(asyncio.run(_time_local_vm(n, nanny=False)))
    a, c, b = statistics.median(ours), statistics.median(bare), statistics.median(theirs)
    print(
        f"startup       1 scheduler + {n} workers ready, median of {rounds}: "
        f"LocalCluster(processes=True) {b:.2f} s; LocalVMCluster(TLS) {a:.2f} s, "
        f"ratio {a / b:.2f}; LocalVMCluster(TLS, no nanny) {c:.2f} s, ratio {c / b:.2f}"
    )


_COLD = """
import asyncio
from distributed import Client, LocalCluster
from dask_secure_cloud import LocalVMCluster

async def main():
    if {vm!r}:
        cluster = LocalVMCluster(n_workers={n}, asynchronous=True)
    else:
        cluster = LocalCluster(n_workers={n}, processes=True, threads_per_worker=1,
                               asynchronous=True, dashboard_address=":0")
    async with cluster, Client(cluster, asynchronous=True) as client:
        await client.wait_for_workers({n}, timeout=120)

asyncio.run(main())
"""


def startup_cold(rounds: int = 5, n: int = 2) -> None:
    """The same, each cluster in a fresh interpreter: imports count on both sides."""
    import subprocess

    def run(vm: bool) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", _COLD.format(vm=vm, n=n)], check=True)
        return time.perf_counter() - started

    ours, theirs = [], []
    for _ in range(rounds):
        theirs.append(run(False))
        ours.append(run(True))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(
        f"startup-cold  fresh interpreter to {n} workers ready and closed, median of {rounds}: "
        f"LocalCluster(processes=True) {b:.2f} s; LocalVMCluster(TLS) {a:.2f} s, ratio {a / b:.2f}"
    )


BENCHMARKS = {
    "credentials": credentials,
    "user-data": user_data,
    "startup": startup,
    "startup-cold": startup_cold,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(BENCHMARKS):
        BENCHMARKS[name]()
