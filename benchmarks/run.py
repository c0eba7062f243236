"""Measured figures for dask-secure-cloud. Targets, not assertions: this prints numbers.

    python benchmarks/run.py            # all of them
    python benchmarks/run.py startup    # one of: credentials, user-data, startup,
                                        # startup-cold, enrollment, renewal-cpu

Timings on a shared machine are noisy: the start-up figure is a ratio of two clusters
measured side by side, alternating, in the same run.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import timeit

from dask_secure_cloud.cloudinit import LIMITS, BootPlan, DockerRuntime, EnrollmentTicket, render
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
    """Target: well under EC2's 16 KB for a TLS worker, boot script, role checks and
    enrollment included (dask-cloudprovider ships ~14 KB), and smaller than shipping
    the VM's key and certificate."""
    from dask_secure_cloud import preloads

    creds = ClusterCredentials("bench")
    for role, command in (
        (Role.SCHEDULER, ("scheduler", "--port", "8786", "--protocol", "tls")),
        (
            Role.WORKER,
            ("worker", "tls://10.0.0.12:8786", "--name", "worker-17", "--protocol", "tls"),
        ),
    ):
        common = dict(
            cluster_id="dsc-0123456789",
            role=role,
            name=command[0],
            command=command,
            runtime=DockerRuntime(default_docker_image()),
            dashboard_port=8787 if role is Role.SCHEDULER else None,
            preloads={
                "peers.py": preloads.peer_checks(
                    {"cluster_id": "dsc-0123456789", "role": role.value, "scheduler": None}
                )
            },
        )
        enrolled = BootPlan(**common, enroll=EnrollmentTicket(creds.ca_cert_pem, "t" * 32, 8786))
        shipped = BootPlan(**common, tls=creds.issue(role, "worker-17"))
        for limit in (LIMITS["aws"], LIMITS["azure"], LIMITS["digitalocean"]):
            new, old = len(render(enrolled, limit)), len(render(shipped, limit))
            print(
                f"user-data     {role.value:9} {limit.cloud:22}: {new:,} bytes enrolling its "
                f"own key, {old:,} shipping key and certificate "
                f"({new / limit.max_bytes:.1%} of {limit.max_bytes:,})"
            )


def enrollment(rounds: int = 9, n: int = 2) -> None:
    """Target: time to ready with enrollment within 10 % of shipping each VM's key in its
    user-data (the same cluster with a given ``Security``), measured side by side. A
    given ``Security`` also goes without the peers' role checks and renewal, so the
    ratio charges those to enrollment too."""
    from dask_secure_cloud.credentials import ClusterSecurity

    creds = ClusterCredentials("bench-shipped")
    leaves = {role: creds.issue(role, role.value) for role in (Role.SCHEDULER, Role.WORKER)}
    shipped = ClusterSecurity(
        "bench-shipped",
        require_encryption=True,
        tls_ca_file=creds.ca_cert_pem,
        tls_client_cert=creds.client.cert_pem,
        tls_client_key=creds.client.key_pem,
        tls_scheduler_cert=leaves[Role.SCHEDULER].cert_pem,
        tls_scheduler_key=leaves[Role.SCHEDULER].key_pem,
        tls_worker_cert=leaves[Role.WORKER].cert_pem,
        tls_worker_key=leaves[Role.WORKER].key_pem,
    )
    enrolled, given = [], []
    for _ in range(rounds):
        enrolled.append(asyncio.run(_time_local_vm(n)))
        given.append(asyncio.run(_time_local_vm(n, security=shipped)))
    a, b = statistics.median(enrolled), statistics.median(given)
    print(
        f"enrollment    1 scheduler + {n} workers ready, median of {rounds}: keys shipped in "
        f"user-data {b:.2f} s; each VM enrolling its own key {a:.2f} s, ratio {a / b:.2f}"
    )


def renewal_cpu(n: int = 1000) -> None:
    """Target: the client's CPU to sign 1,000 renewals (checking each request) well
    under a second: renewing a large cluster must not starve the client."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from dask_secure_cloud.enrollment import Enrollment

    creds = ClusterCredentials("bench")
    hour = datetime.timedelta(hours=1)
    book = Enrollment(creds, window=hour, lifetime=hour)
    requests = {}
    for i in range(n):
        name = f"worker-{i}"
        book.ticket(Role.WORKER, name, 8786)
        book._tickets[name].done = True  # as after enrollment
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        csr = (
            x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
        )
        requests[name] = csr.public_bytes(serialization.Encoding.PEM).decode()
    started = time.process_time()
    for name, csr in requests.items():
        book.renewal(name, csr)
    spent = time.process_time() - started
    print(
        f"renewal-cpu   client CPU to check and sign {n:,} renewals: {spent:.2f} s "
        f"({spent / n * 1000:.2f} ms each)"
    )


async def _time_local_vm(n: int, nanny: bool = True, security: object = True) -> float:
    from distributed import Client

    from dask_secure_cloud import LocalVMCluster

    started = time.perf_counter()
    options = {"nanny": nanny}
    async with LocalVMCluster(
        n_workers=n, worker_options=options, security=security, asynchronous=True
    ) as cluster:
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
    "enrollment": enrollment,
    "renewal-cpu": renewal_cpu,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(BENCHMARKS):
        BENCHMARKS[name]()
