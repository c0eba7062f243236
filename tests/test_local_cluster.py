"""LocalVMCluster end to end: the whole boot path, TLS, refusals, secrets, teardown."""

import asyncio
import logging
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dask
import pytest
from cryptography.hazmat.primitives import serialization
from distributed import Client
from distributed.comm import connect
from distributed.security import Security
from helpers import (
    answers_without_certificate,
    any_vm_processes,
    decoded_files,
    probe_wheel,
    vm_processes,
)

from dask_secure_cloud import LocalVMCluster
from dask_secure_cloud.cloudinit import UserDataTooLarge
from dask_secure_cloud.cluster import ClusterStartError, VMBootError
from dask_secure_cloud.config import ConfigError
from dask_secure_cloud.credentials import ClusterCredentials, Role

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def assert_nothing_left(directory: Path, cluster_id: str | None = None) -> None:
    if cluster_id:
        assert vm_processes(cluster_id) == []
    assert any_vm_processes(directory) == []
    assert list(directory.iterdir()) == []


def ca_key(cluster) -> bytes:
    return cluster._credentials._ClusterCredentials__ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


async def compute(cluster, n_workers: int) -> int:
    async with Client(cluster, asynchronous=True) as client:
        await client.wait_for_workers(n_workers, timeout=60)
        futures = client.map(lambda x: x * x, range(20))
        total = await client.submit(sum, futures)
        addresses = list(cluster.scheduler_info["workers"])
        return total, addresses


async def test_tls_cluster_computes_and_leaves_nothing(vm_dir, recorded_user_data, caplog):
    caplog.set_level(logging.DEBUG)
    async with LocalVMCluster(n_workers=2, directory=vm_dir, asynchronous=True) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.")
        total, workers = await compute(cluster, 2)
        assert total == sum(x * x for x in range(20))
        assert len(workers) == 2 and all(w.startswith("tls://127.") for w in workers)
        # Each VM has its own loopback address, the scheduler the standard port.
        hosts = {w.split("//")[1].rsplit(":", 1)[0] for w in workers}
        assert len(hosts) == 2 and cluster.scheduler_address.endswith(":8786")

        # Key files (made on each VM: certificate and key in one) are 0600 under one
        # 0700 directory, on every VM.
        keys = list(vm_dir.glob("*/*/root/opt/dask-secure-cloud/tls/node.pem"))
        assert len(keys) == 3
        for key in keys:
            assert stat.S_IMODE(key.stat().st_mode) == 0o600
            assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700

        # Neither the CA key nor the client's key is anywhere a VM or a log can see.
        secrets = [ca_key(cluster), cluster._credentials.client.key_pem.encode()]
        blobs = [data for ud in recorded_user_data for data in (ud, *decoded_files(ud).values())]
        blobs += [p.read_bytes() for p in vm_dir.rglob("*") if p.is_file()]
        logs = await cluster.get_logs()
        blobs += [str(v).encode() for v in logs.values()]
        # Each VM's Dask copies its own preloads into its own /tmp, none of another VM's.
        assert "File name collision" not in str(logs)
        # Dask started early (importing while its VM enrols) warns of nothing.
        for dask_log in vm_dir.glob("*/*/root/opt/dask-secure-cloud/dask.log"):
            assert "Warning" not in dask_log.read_text()
        blobs += [repr(cluster).encode(), cluster._repr_html_().encode(), caplog.text.encode()]
        assert len(recorded_user_data) == 3
        for secret in secrets:
            for blob in blobs:
                assert secret not in blob
                assert secret.split(b"\n")[1] not in blob  # not even one line of it
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(cluster)
        cluster_id = cluster.cluster_id
    assert_nothing_left(vm_dir, cluster_id)


async def test_security_false_is_plain_tcp_with_no_certificate_anywhere(vm_dir, recorded_user_data):
    async with LocalVMCluster(
        n_workers=1, security=False, directory=vm_dir, asynchronous=True
    ) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        total, workers = await compute(cluster, 1)
        assert total == 2470 and workers[0].startswith("tcp://")
        files = [p.read_bytes() for p in vm_dir.rglob("*") if p.is_file()]
        assert files
        for blob in files + [d for ud in recorded_user_data for d in decoded_files(ud).values()]:
            assert b"BEGIN CERTIFICATE" not in blob and b"PRIVATE KEY" not in blob
        assert cluster.ca_fingerprint is None and "tls=off" in repr(cluster)
    assert_nothing_left(vm_dir)


async def _refused(address: str, security: Security | None) -> bool:
    """True unless an ``identity`` call to ``address`` gets an answer."""
    args = security.get_connection_args("client") if security else {}
    try:
        comm = await connect(address, timeout=2, **args)
    except OSError:
        return True
    try:
        await comm.write({"op": "identity", "reply": True})
        answer = await asyncio.wait_for(comm.read(), 5)
    except (OSError, asyncio.TimeoutError):
        return True
    finally:
        await comm.close()
    return not isinstance(answer, dict) or "type" not in answer


async def test_scheduler_and_workers_refuse_strangers(vm_dir):
    async with LocalVMCluster(n_workers=1, directory=vm_dir, asynchronous=True) as cluster:
        _, workers = await compute(cluster, 1)
        other = ClusterCredentials("someone-else").client_security()
        ca_pem = cluster._credentials.ca_cert_pem
        scheduler = cluster._credentials.issue(Role.SCHEDULER, "scheduler")
        as_scheduler = Security(
            tls_ca_file=ca_pem,
            tls_client_cert=scheduler.cert_pem,
            tls_client_key=scheduler.key_pem,
            require_encryption=True,
        )
        # The positive controls: our client is served by the scheduler, and a scheduler
        # certificate by a worker (this client talks to the scheduler alone).
        assert not await _refused(cluster.scheduler_address, cluster.security)
        assert not await _refused(workers[0], as_scheduler)
        for address in (cluster.scheduler_address, workers[0]):
            assert (
                await answers_without_certificate(address, ca_pem) is False
            )  # no client certificate
            assert await _refused(address, other)  # another cluster's CA
            assert await _refused(address.replace("tls://", "tcp://"), None)  # plain tcp
            # A client key from another cluster is refused even with our CA trusted.
            stranger = ClusterCredentials("x").client
            mixed = Security(
                tls_ca_file=ca_pem,
                tls_client_cert=stranger.cert_pem,
                tls_client_key=stranger.key_pem,
                require_encryption=True,
            )
            assert await _refused(address, mixed)
    assert_nothing_left(vm_dir)


def test_sync_api_scale_and_logs(vm_dir):
    with LocalVMCluster(n_workers=1, directory=vm_dir) as cluster, Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
        cluster.scale(3)
        client.wait_for_workers(3, timeout=60)
        assert len(list(vm_dir.glob("*/*/vm.json"))) == 4
        cluster.scale(1)
        deadline = time.monotonic() + 30
        while len(list(vm_dir.glob("*/*/vm.json"))) != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(list(vm_dir.glob("*/*/vm.json"))) == 2
        logs = cluster.get_logs()
        assert "scheduler console" in logs and "Scheduler" in logs
        assert "exited" not in str(logs["scheduler console"])
    assert_nothing_left(vm_dir)


async def test_adapt_starts_workers_for_work(vm_dir):
    async with LocalVMCluster(directory=vm_dir, asynchronous=True) as cluster:
        cluster.adapt(minimum=0, maximum=2, interval="200ms", wait_count=2)
        async with Client(cluster, asynchronous=True) as client:
            assert await client.submit(lambda: 41 + 1) == 42
            assert len(cluster.workers) >= 1
    assert_nothing_left(vm_dir)


async def test_users_own_security_is_used_as_given(vm_dir, tmp_path):
    mine = ClusterCredentials("my-own-pki")
    scheduler, worker, client = (mine.issue(r, r.value) for r in Role)
    paths = {}
    for leaf in (scheduler, worker, client):
        for kind, text in (("cert", leaf.cert_pem), ("key", leaf.key_pem)):
            path = tmp_path / f"{leaf.role.value}.{kind}"
            path.write_text(text)
            paths[f"tls_{leaf.role.value}_{kind}"] = str(path)
    (tmp_path / "ca.pem").write_text(mine.ca_cert_pem)
    security = Security(tls_ca_file=str(tmp_path / "ca.pem"), require_encryption=True, **paths)
    async with LocalVMCluster(
        n_workers=1, security=security, directory=vm_dir, asynchronous=True
    ) as cluster:
        assert cluster.security is security and cluster.ca_fingerprint is None
        total, workers = await compute(cluster, 1)
        assert total == 2470 and workers[0].startswith("tls://")
    with pytest.raises(ValueError, match="no tls_scheduler_cert"):
        LocalVMCluster(security=Security(tls_ca_file=str(tmp_path / "ca.pem")), directory=vm_dir)
    assert_nothing_left(vm_dir)


async def test_docker_user_data_passes_image_env_and_tls_to_the_container(vm_dir, monkeypatch):
    """The container command line the docker runtime renders: pinned image, env file, TLS
    paths. The docker stand-in runs it with this machine's Python, so this proves the
    user-data's shape only; the real engine on a stock image is test_guests_failed_boots.py's."""
    from clouds.booter import SHIM_PATH

    monkeypatch.setenv("PATH", SHIM_PATH + os.pathsep + os.environ["PATH"])
    async with (
        LocalVMCluster(
            n_workers=1,
            runtime="docker",
            env_vars={"GREETING": "hi there"},
            directory=vm_dir,
            asynchronous=True,
        ) as cluster,
        Client(cluster, asynchronous=True) as client,
    ):
        await client.wait_for_workers(1, timeout=60)
        assert await client.submit(lambda: os.environ["GREETING"]) == "hi there"
    assert_nothing_left(vm_dir)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_workers": -1}, "n_workers must be a whole number"),
        ({"n_workers": 1.5}, "n_workers must be a whole number"),
        ({"certificate_lifetime": 0}, "certificate_lifetime must be positive"),
        ({"certificate_lifetime": "-2h"}, "certificate_lifetime must be"),
        ({"certificate_lifetime": "soon"}, "certificate_lifetime must be a duration"),
        ({"runtime": "podman"}, "runtime must be one of docker, native"),
        ({"security": "yes"}, "security must be True"),
        ({"worker_options": {"nthread": 2}}, "Did you mean 'nthreads'"),
        ({"worker_options": {"tls_key": "/x"}}, "set by the cluster itself"),
        ({"extra_bootstrap": "echo one string"}, "extra_bootstrap must be a list"),
        ({"scheduler_port": 70000}, "scheduler_port must be a TCP port"),
        (
            {"extra_bootstrap": [f"echo {os.urandom(40).hex()}" for _ in range(1500)]},
            "LocalVM allows",
        ),
    ],
)
def test_bad_input_fails_before_any_vm(vm_dir, kwargs, match):
    with pytest.raises((ValueError, UserDataTooLarge), match=match):
        LocalVMCluster(directory=vm_dir, **kwargs)
    assert list(vm_dir.iterdir()) == []


def test_unknown_option_is_named(vm_dir):
    with pytest.raises(TypeError, match="n_wrokers"):
        LocalVMCluster(directory=vm_dir, n_wrokers=2)
    assert list(vm_dir.iterdir()) == []


def test_misspelled_config_key_is_refused_with_a_suggestion(vm_dir):
    with dask.config.set({"secure-cloud.local.n-wokers": 2}):
        with pytest.raises(ConfigError, match=r"Did you mean secure-cloud\.local\.n-workers"):
            LocalVMCluster(directory=vm_dir)
    assert list(vm_dir.iterdir()) == []


def test_config_and_keyword_precedence(vm_dir, monkeypatch):
    monkeypatch.setenv("DASK_SECURE_CLOUD__LOCAL__CERTIFICATE_LIFETIME", "3h")
    dask.config.refresh()
    try:
        from dask_secure_cloud.options import EC2Options, LocalOptions, resolve

        def hours(cls, **keywords):
            return resolve(cls, keywords).certificate_lifetime.total_seconds() / 3600

        with dask.config.set({"secure-cloud.local.certificate-lifetime": "5h"}):
            assert hours(LocalOptions) == 5  # set() beats env
        with dask.config.set({"secure-cloud.certificate-lifetime": "7h"}):
            # The provider's own key beats the shared one.
            assert hours(LocalOptions) == 3
            assert hours(EC2Options) == 7
        assert hours(LocalOptions) == 3  # env beats default
        assert hours(LocalOptions, certificate_lifetime="1h") == 1  # keyword beats all
        assert hours(EC2Options) == 4  # other providers: the default (4h)
    finally:
        monkeypatch.delenv("DASK_SECURE_CLOUD__LOCAL__CERTIFICATE_LIFETIME")
        dask.config.refresh()


async def test_scheduler_that_fails_to_boot_is_reported_and_removed(vm_dir):
    with pytest.raises(ClusterStartError, match="boot-marker-42"):
        await LocalVMCluster(
            n_workers=1,
            extra_bootstrap=["echo boot-marker-42", "exit 3"],
            directory=vm_dir,
            asynchronous=True,
        )
    assert_nothing_left(vm_dir)


async def test_failure_part_way_destroys_what_was_made(vm_dir, monkeypatch):
    from dask_secure_cloud.providers.local import LocalDriver

    original = LocalDriver.create

    async def create(self, request):
        if request.name == "worker-1":
            raise RuntimeError("quota exceeded for worker-1")
        return await original(self, request)

    monkeypatch.setattr(LocalDriver, "create", create)
    with pytest.raises(ClusterStartError, match="creating worker VM worker-1 failed: quota"):
        async with LocalVMCluster(n_workers=2, directory=vm_dir, asynchronous=True):
            pass
    assert_nothing_left(vm_dir)


async def test_cancelled_start_leaves_nothing(vm_dir):
    task = asyncio.ensure_future(
        LocalVMCluster(n_workers=2, directory=vm_dir, asynchronous=True).__aenter__()
    )
    deadline = time.monotonic() + 30
    # Polling the file system: there is no event to wait on.
    while not list(vm_dir.glob("*/scheduler")) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    assert_nothing_left(vm_dir)


def test_ctrl_c_during_start_leaves_nothing(vm_dir):
    script = textwrap.dedent(
        f"""
        from dask_secure_cloud import LocalVMCluster
        try:
            LocalVMCluster(n_workers=2, directory={str(vm_dir)!r})
        except KeyboardInterrupt:
            print("interrupted")
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(vm_dir.glob("*/scheduler/vm.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    assert "interrupted" in out
    assert_nothing_left(vm_dir)


def test_boot_timeout_reports_console(vm_dir):
    with pytest.raises(ClusterStartError, match="within 1s") as info:
        LocalVMCluster(
            extra_bootstrap=["echo still-installing", "sleep 30"],
            boot_timeout="1s",
            directory=vm_dir,
        )
    assert isinstance(info.value.__cause__, VMBootError) or "still-installing" in str(info.value)
    assert "still-installing" in str(info.value)
    assert_nothing_left(vm_dir)


async def test_certificate_expiry_warns_well_before(vm_dir):
    with pytest.warns(UserWarning, match="every certificate expire in 30 minutes"):
        async with LocalVMCluster(
            max_lifetime="30m",
            certificate_lifetime="10m",
            certificate_warning="1h",
            directory=vm_dir,
            asynchronous=True,
        ):
            pass
    assert_nothing_left(vm_dir)


async def wait_all_terminated(cluster, within: float) -> dict[str, str]:
    """Wait until every VM of ``cluster`` has ended on its own; each one's console."""
    vms = await cluster.driver.list(cluster.cluster_id)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        states = {vm.name: await cluster.driver.state(vm) for vm in vms}
        if set(states.values()) == {"terminated"}:
            break
        await asyncio.sleep(0.5)
    assert set(states.values()) == {"terminated"}, states
    return {vm.name: await cluster.driver.console_output(vm) for vm in vms}


async def test_scheduler_ends_itself_when_the_client_is_gone(vm_dir):
    """A killed client stops renewing the lease: the scheduler VM ends on its own."""
    async with LocalVMCluster(
        n_workers=1,
        lease_timeout="2s",
        worker_death_timeout="2s",
        directory=vm_dir,
        asynchronous=True,
    ) as cluster:
        await asyncio.sleep(3)  # renewed meanwhile: still up
        assert not await _refused(cluster.scheduler_address, cluster.security)
        cluster.periodic_callbacks["secure-cloud-lease"].stop()  # as if the client died
        consoles = await wait_all_terminated(cluster, within=30)
        assert "lease expired" in consoles["scheduler"]
    assert_nothing_left(vm_dir)


def test_a_synchronous_cluster_keeps_its_lease_and_renews(vm_dir):
    """Started in ``__init__`` (no ``await``), as most users start it: the client's lease
    and renewal callbacks run, so the scheduler outlives several lease timeouts."""
    with LocalVMCluster(n_workers=1, lease_timeout="3s", directory=vm_dir) as cluster:
        assert {"secure-cloud-lease", "certificate-renewal"} <= set(cluster.periodic_callbacks)
        assert all(pc.is_running() for pc in cluster.periodic_callbacks.values())
        time.sleep(9)
        with Client(cluster) as client:
            assert client.submit(sum, range(10)).result(timeout=30) == 45
    assert_nothing_left(vm_dir)


class OverlappingLocalVMCluster(LocalVMCluster):
    """Boots workers while the scheduler boots, as the cloud clusters do."""

    overlap_boot = True


async def test_overlapped_boot_computes_and_cleans_up_a_failed_early_worker(vm_dir, monkeypatch):
    async with OverlappingLocalVMCluster(
        n_workers=2, directory=vm_dir, asynchronous=True
    ) as cluster:
        total, workers = await compute(cluster, 2)
        assert total == 2470 and len(workers) == 2
    assert_nothing_left(vm_dir)

    from dask_secure_cloud.providers.local import LocalDriver

    original = LocalDriver.create

    async def create(self, request):
        if request.name == "worker-1":
            await asyncio.sleep(0.5)  # fail after the scheduler and worker-0 exist
            raise RuntimeError("InsufficientInstanceCapacity for worker-1")
        return await original(self, request)

    monkeypatch.setattr(LocalDriver, "create", create)
    with pytest.raises(ClusterStartError, match="worker-1 failed: InsufficientInstanceCapacity"):
        await OverlappingLocalVMCluster(n_workers=2, directory=vm_dir, asynchronous=True)
    assert_nothing_left(vm_dir)


async def test_shared_loopback_falls_back_to_free_ports(vm_dir, monkeypatch):
    """Where only 127.0.0.1 exists (macOS), every VM shares it on its own ports."""
    from dask_secure_cloud.providers import local

    monkeypatch.setattr(local, "loopback_subnet", lambda ports: None)
    async with LocalVMCluster(n_workers=2, directory=vm_dir, asynchronous=True) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert not cluster.scheduler_address.endswith(":8786")
        total, workers = await compute(cluster, 2)
        assert total == 2470 and all(w.startswith("tls://127.0.0.1:") for w in workers)
    assert_nothing_left(vm_dir)


def test_global_dask_config_is_left_as_it_was(vm_dir):
    before = dask.config.config.copy()
    snapshot = repr(before)
    with LocalVMCluster(n_workers=1, directory=vm_dir) as cluster, Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
    assert repr(dask.config.config) == snapshot


async def test_display_and_progress_log(vm_dir, caplog):
    caplog.set_level(logging.INFO, logger="dask_secure_cloud.cluster")
    async with LocalVMCluster(n_workers=1, directory=vm_dir, asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=60)
        text = repr(cluster)
        for part in (
            "provider=local",
            "location=this machine",
            "vms=2 (1 scheduler, 1 workers)",
            "tls=on",
            f"ca={cluster.ca_fingerprint[:11]}",
            f"expires={cluster.certificates_expire:%Y-%m-%d %H:%M} UTC",
        ):
            assert part in text
        page = cluster._repr_html_()
        assert cluster.ca_fingerprint in page and "LocalVMCluster" in page and ">tls<" in page
        log = caplog.text
        for step in (
            "Network ready in",
            "VM scheduler created",
            "reachable after",
            "joined: 1 of 1",
        ):
            assert step in log, step


def _environment_of_a_user(directory: Path, index: Path) -> Path:
    """A virtualenv as a user's: its own packages (``dsc_users``, from ``index``) beside
    what this test run has (dask; put on its path by a ``.pth`` file, as an editable
    install does). Its base interpreter has neither of its own packages."""
    subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True)
    python = directory / "bin" / "python"
    ask = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = Path(subprocess.check_output([python, "-c", ask], text=True).strip())
    ours = [p for p in sys.path if p.endswith("-packages") and Path(p).is_dir()]
    (purelib / "this-test-run.pth").write_text("".join(f"{p}\n" for p in ours))
    pip = [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(index)]
    subprocess.run([*pip, "dsc_users"], check=True)
    return python


async def test_pip_packages_and_a_requirements_file_install_on_local_vms(vm_dir, tmp_path):
    """``runtime="native"`` with ``pip_packages`` and ``requirements_file`` on process VMs
    whose interpreter is a user's virtualenv's: each VM's virtualenv gets both packages
    from the index named in ``env_vars`` (a local one and no other), and keeps seeing the
    packages of the environment it was made from (``--system-site-packages`` alone
    would show only its base interpreter's, where a user's own packages are not)."""
    index = tmp_path / "index"
    probe_wheel(index, "dsc_listed", "LISTED = 'pip_packages'\n")
    probe_wheel(index, "dsc_locked", "LOCKED = 'requirements_file'\n")
    probe_wheel(index, "dsc_users", "USERS = 'the environment'\n")
    python = _environment_of_a_user(tmp_path / "users-venv", index)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# the team's environment\ndsc_locked==1.0\n")

    def imported() -> tuple[str, str, str]:
        import dsc_listed
        import dsc_locked
        import dsc_users

        return dsc_listed.LISTED, dsc_locked.LOCKED, dsc_users.USERS

    wanted = ("pip_packages", "requirements_file", "the environment")
    async with LocalVMCluster(
        n_workers=1,
        directory=vm_dir,
        python=str(python),
        pip_packages=["dsc_listed>=1"],
        requirements_file=str(requirements),
        env_vars={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index)},
        asynchronous=True,
    ) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=60)
            on_workers = await client.run(imported)
            on_scheduler = await client.run_on_scheduler(imported)
        consoles = await cluster.fleet.consoles()
    assert list(on_workers.values()) == [wanted]
    assert on_scheduler == wanted
    for name, console in consoles.items():
        assert "python-env: done" in console, (name, console)
    assert_nothing_left(vm_dir)
