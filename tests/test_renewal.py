"""Renewal: short-lived certificates renewed in place while a cluster computes, and a
cluster whose client is gone ends when its certificates expire.

The cluster is a real ``LocalVMCluster``: its scheduler, workers and nannies are
separate processes running the shipped ``peers.py``, which makes each new key with
``openssl`` and loads each renewed certificate into its live TLS contexts.
"""

import asyncio
import datetime
import operator
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import pytest
from cryptography import x509
from distributed import Client
from distributed.comm import connect
from test_dashboard import fetch
from test_local_cluster import assert_nothing_left, wait_all_terminated

from dask_secure_cloud import LocalVMCluster
from dask_secure_cloud.credentials import parse_identity
from dask_secure_cloud.errors import OptionError
from dask_secure_cloud.renewal import renewal_interval
from dask_secure_cloud.vmrunner import find_vms

#: How long the cluster computes across renewals (the issue asks for 10 minutes).
COMPUTE_FOR = float(os.environ.get("DSC_RENEWAL_TEST_SECONDS", 600))


def served_certificate(address: str, cluster) -> x509.Certificate:
    """The certificate the scheduler presents to a new connection now."""
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    client = cluster._credentials.client
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=client.ca_pem)
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
        f.write(client.cert_pem + client.key_pem)
        f.flush()
        ctx.load_cert_chain(f.name)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


@pytest.mark.slow
@pytest.mark.alongside
@pytest.mark.timeout(COMPUTE_FOR + 400)
async def test_two_minute_certificates_renew_while_computing_and_end_a_clientless_cluster(
    vm_dir,
):
    async with LocalVMCluster(
        n_workers=2,
        certificate_lifetime="2m",
        lease_timeout="1h",  # only certificate expiry can end this cluster
        directory=vm_dir,
        asynchronous=True,
    ) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=60)
            first = served_certificate(cluster.scheduler_address, cluster)
            started, rounds, failed = time.monotonic(), 0, []
            while time.monotonic() - started < COMPUTE_FOR:
                # Results move between the two workers (new worker-to-worker
                # connections) and a fresh client connects now and then: each new
                # connection must succeed with whatever certificate is current.
                keys = [f"inc-{rounds}-{i}" for i in range(40)]
                futures = client.map(operator.add, range(40), [1] * 40, key=keys)
                where = sorted(cluster.scheduler_info["workers"])[rounds % 2]
                total = client.submit(sum, futures, workers=[where])
                try:
                    assert await total == sum(range(1, 41))
                except Exception as e:  # noqa: BLE001 - every failure is collected and reported
                    failed.append(f"round {rounds}: {e!r}")
                if rounds % 20 == 0:
                    async with Client(cluster, asynchronous=True) as fresh:
                        assert await fresh.submit(operator.add, 1, 1) == 2
                rounds += 1
                await asyncio.sleep(1)
            renewals = dict(cluster._renewal.count)
            now = served_certificate(cluster.scheduler_address, cluster)
        print(f"{rounds} rounds in {COMPUTE_FOR:.0f}s; renewals per VM: {renewals}")
        assert failed == []
        # One renewal every 60 to 75 s: at half of 2 minutes, looked for every 15 s.
        minimum = int(COMPUTE_FOR // 90)
        assert set(renewals) == {"scheduler", "worker-0", "worker-1"}
        assert min(renewals.values()) >= minimum, renewals
        # New connections get a renewed certificate: same identity, later expiry.
        assert parse_identity(now) == parse_identity(first)
        assert now.not_valid_after_utc > first.not_valid_after_utc
        assert now.public_key() != first.public_key()  # a fresh key, made on the VM

        # The client "dies": nothing renews any more, and every VM ends by itself
        # within one certificate lifetime, though the lease would keep it for an hour.
        for callback in cluster.periodic_callbacks.values():
            callback.stop()
        consoles = await wait_all_terminated(cluster, within=150)
        assert "did not renew it: closing" in consoles["scheduler"]
    assert_nothing_left(vm_dir)


#: A client that renews once, then says how many renewals it made, then waits to be killed.
RENEWING_CLIENT = """
import sys, time
from dask_secure_cloud import LocalVMCluster
cluster = LocalVMCluster(
    n_workers=1, certificate_lifetime="1m", lease_timeout="1h", directory=sys.argv[1]
)
deadline = time.monotonic() + 120
while min(cluster._renewal.count.values(), default=0) < 1 or len(cluster._renewal.count) < 2:
    assert time.monotonic() < deadline, cluster._renewal.count
    time.sleep(0.5)
print(cluster.cluster_id, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.alongside
@pytest.mark.timeout(400)
def test_a_killed_client_renews_nothing_and_its_vms_end_when_their_certificates_expire(vm_dir):
    """A client process killed as a crash would: the lease would keep the VMs for an
    hour, but their certificates, renewed once while the client lived, expire unrenewed
    and every VM ends by itself within one certificate lifetime."""
    child = subprocess.Popen(
        [sys.executable, "-c", RENEWING_CLIENT, str(vm_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        cluster_id = child.stdout.readline().strip()
        assert cluster_id.startswith("dsc-"), child.communicate(timeout=5)
    finally:
        child.kill()
        child.wait()
    killed = time.monotonic()
    vms = find_vms(vm_dir, cluster_id)
    assert sorted(vm.name for vm in vms) == ["scheduler", "worker-0"]
    while any(vm.is_running() for vm in vms) and time.monotonic() - killed < 150:
        time.sleep(1)
    ended_after = time.monotonic() - killed
    print(f"the VMs ended {ended_after:.0f}s after their client was killed")
    assert not any(vm.is_running() for vm in vms), "a VM outlived its certificate"
    # Ended by expiry, a minute at most after the last renewal (not by the lease); the
    # worker's certificate expires as its scheduler goes, so it may end either way.
    scheduler = next(vm for vm in vms if vm.name == "scheduler")
    assert "did not renew it: closing" in scheduler.console_output()
    for vm in vms:
        vm.stop()  # removes what the orphaned VMs left on disk, as cleanup would


@pytest.mark.slow
@pytest.mark.alongside
@pytest.mark.timeout(300)
async def test_the_clients_own_certificate_is_short_lived_and_renewed_in_place(vm_dir):
    """The client's certificate lives ``certificate_lifetime`` (a minute here), not as
    long as the CA, and is renewed at half its life in the TLS contexts already in use:
    after the first one would have expired, a Client made before the renewal (over its
    live stream and over new connections), one made after it from ``cluster.security``,
    and the dashboard proxy all still reach the scheduler, which refuses expired
    certificates."""
    lifetime = datetime.timedelta(minutes=1)
    async with LocalVMCluster(
        n_workers=1,
        certificate_lifetime="1m",
        lease_timeout="1h",
        directory=vm_dir,
        asynchronous=True,
    ) as cluster:
        credentials = cluster._credentials
        first = credentials.client
        cert = x509.load_pem_x509_certificate(cluster.security.tls_client_cert.encode())
        now = datetime.datetime.now(datetime.timezone.utc)
        assert cert.not_valid_after_utc - now <= lifetime  # not the CA's 7 days
        assert cluster.certificates_expire - cert.not_valid_after_utc > datetime.timedelta(days=6)
        assert cert.not_valid_after_utc == first.not_after

        def left(leaf) -> float:
            return (leaf.not_after - datetime.datetime.now(datetime.timezone.utc)).total_seconds()

        async with Client(cluster, asynchronous=True) as before:
            assert await before.submit(operator.add, 1, 1) == 2
            stream = before.scheduler_comm.comm
            # Renewed at half its life, looked for every 7.5 s: well before it expires.
            for _ in range(150):
                if credentials.client is not first or left(first) <= 0:
                    break
                await asyncio.sleep(0.5)
            renewed = credentials.client
            assert renewed is not first, "the client's certificate was not renewed"
            assert left(first) > 5, "renewed too late"
            assert renewed.not_after > first.not_after
            assert renewed.key_pem != first.key_pem
            assert cluster.security.tls_client_cert == renewed.cert_pem

            async with Client(
                cluster.scheduler_address, security=cluster.security, asynchronous=True
            ) as after:
                await asyncio.sleep(left(first) + 2)  # the first certificate has expired
                # The old client's idle pooled connections go: its next call connects anew.
                before.rpc.remove(cluster.scheduler_address)
                assert (await before.scheduler.identity())["type"] == "Scheduler"
                assert await before.submit(operator.add, 2, 2) == 4
                assert before.scheduler_comm.comm is stream and not stream.closed()
                assert await after.submit(operator.add, 3, 3) == 6
                status, _ = await asyncio.to_thread(fetch, cluster.dashboard_link)
                assert status == 200
                # The context of the cluster's own pool (the VMs' renewals, the lease)
                # connects anew too.
                comm = await connect(
                    cluster.scheduler_address, **cluster.scheduler_comm.connection_args
                )
                await comm.close()
                # Renewals go on at each half-life while the cluster lives.
                assert credentials.client.not_after >= renewed.not_after


def test_renewal_interval_and_lifetime_bounds(vm_dir):
    assert renewal_interval(datetime.timedelta(minutes=2)) == datetime.timedelta(seconds=15)
    assert renewal_interval(datetime.timedelta(hours=4)) == datetime.timedelta(minutes=5)
    with pytest.raises(OptionError, match="certificate_lifetime must be at least 60s"):
        LocalVMCluster(certificate_lifetime="30s", directory=vm_dir)
    with pytest.raises(OptionError, match="longer than max_lifetime"):
        LocalVMCluster(certificate_lifetime="2d", max_lifetime="1d", directory=vm_dir)
    assert not any(vm_dir.iterdir())
