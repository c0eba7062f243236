"""Another process of the same user connects by address alone; another user gets nothing.

The cluster is owned by this test process (its agent thread signs); the other processes
are subprocesses on ``sys.executable`` that do what a notebook kernel does:
``Client("tls://ADDRESS")`` with no security, which calls distributed's
``distributed.client.security-loader``.
"""

from __future__ import annotations

import configparser
import datetime
import json
import os
import pwd
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import dask.config
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from distributed.utils import import_term

from dask_secure_cloud import LocalVMCluster, audit, loader
from dask_secure_cloud.credentials import parse_identity

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).parent.parent

LOADER = "dask_secure_cloud.loader.security_loader"

OTHER_PROCESS = textwrap.dedent(
    """
    import json, os, stat, sys
    from cryptography import x509
    from distributed import Client

    with Client(sys.argv[1], timeout=60) as client:
        result = client.submit(sum, [1, 2]).result(timeout=60)
        security = client.security
        files = {
            what: getattr(security, what)
            for what in ("tls_ca_file", "tls_client_cert", "tls_client_key")
        }
        directory = os.path.dirname(files["tls_client_key"])
        print(json.dumps({
            "result": result,
            "pid": os.getpid(),
            "files": files,
            "modes": {k: stat.S_IMODE(os.stat(v).st_mode) for k, v in files.items()},
            "directory_mode": stat.S_IMODE(os.stat(directory).st_mode),
            "certificate": open(files["tls_client_cert"]).read(),
            "key": open(files["tls_client_key"]).read(),
        }), flush=True)
    sys.stdin.read()  # lives on until the test is done
    """
)


BY_CONFIG = """
from distributed import Client

with Client(timeout=60) as client:
    print(client.submit(sum, [1, 2]).result(timeout=60), flush=True)
"""


def other_process_env(audit_log: Path) -> dict[str, str]:
    """This user's other process: the same dask config a ``pip install .`` gives (an
    editable install has no data files, so the loader is named here where it is not
    installed) and the test's audit log."""
    env = {**os.environ, "DASK_SECURE_CLOUD__AUDIT_LOG": str(audit_log)}
    if dask.config.get("distributed.client.security-loader", None) is None:
        env["DASK_DISTRIBUTED__CLIENT__SECURITY_LOADER"] = LOADER
    return env


@pytest.fixture
def cluster(vm_dir):
    with LocalVMCluster(n_workers=1, directory=vm_dir, certificate_lifetime="2h") as cluster:
        yield cluster


@pytest.mark.slow
def test_another_process_of_the_user_computes_by_address(cluster, audit_log):
    # The extension's other path: ``scheduler-address`` in the dask config, then Client().
    by_config = subprocess.run(
        [sys.executable, "-c", BY_CONFIG],
        capture_output=True,
        text=True,
        timeout=120,
        env={**other_process_env(audit_log), "DASK_SCHEDULER_ADDRESS": cluster.scheduler_address},
    )
    assert by_config.stdout.strip() == "3", by_config.stderr

    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_PROCESS, cluster.scheduler_address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=other_process_env(audit_log),
    )
    try:
        line = other.stdout.readline()
        assert line, other.communicate(timeout=30)
        _check(cluster, audit_log, json.loads(line))
    finally:
        other.kill()
        other.communicate()


def _check(cluster: LocalVMCluster, audit_log: Path, seen: dict) -> None:
    assert seen["result"] == 3

    # A client certificate of its own, named for that process, short, never past the CA.
    certificate = x509.load_pem_x509_certificate(seen["certificate"].encode())
    assert parse_identity(certificate) == (cluster.cluster_id, "client", f"pid-{seen['pid']}")
    issued = certificate.not_valid_before_utc + datetime.timedelta(minutes=5)  # clock skew
    assert certificate.not_valid_after_utc <= cluster.certificates_expire
    assert certificate.not_valid_after_utc - issued <= datetime.timedelta(hours=2, minutes=1)
    own = cluster.security
    assert seen["key"] != own.tls_client_key and seen["certificate"] != own.tls_client_cert
    assert "PRIVATE KEY" in seen["key"]
    # Readable only by this user, and gone when the cluster closes.
    assert set(seen["modes"].values()) == {0o600} and seen["directory_mode"] == 0o700
    assert all(Path(p).exists() for p in seen["files"].values())  # the process lives

    events = [e for e in audit.read(audit_log) if e["event"] == "local_client_certificate"]
    assert [(e["cluster_id"], e["name"], e["pid"]) for e in events][-1] == (
        cluster.cluster_id,
        f"pid-{seen['pid']}",
        seen["pid"],
    )
    assert len(events) == 2  # one each: the config path's process, and this one
    assert events[-1]["fingerprint"] == certificate.fingerprint(hashes.SHA256()).hex(":").upper()
    cluster.close()
    assert not any(Path(p).exists() for p in seen["files"].values())
    assert any(e["event"] == "local_access_closed" for e in audit.read(audit_log))


@pytest.mark.slow
def test_the_loader_knows_only_addresses_offered_here(cluster):
    assert loader.security_loader({"address": "tls://127.0.0.1:1"}) is None
    assert loader.security_loader({"address": "tcp://127.0.0.1:8786"}) is None
    assert loader.security_loader({}) is None
    # The owning process itself gets its cluster's own Security, with no request.
    assert loader.security_loader({"address": cluster.scheduler_address}) is cluster.security


ANOTHER_USER = textwrap.dedent(
    """
    import json, os, socket, sys
    from dask_secure_cloud import loader

    uid = int(sys.argv[3])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    found = {"uid": os.getuid()}
    found["loader"] = repr(loader.security_loader({"address": sys.argv[1]}))
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(sys.argv[2])
            # The owner answers a peer of another uid before reading anything from it
            # (sending first could meet a connection it already closed).
            s.settimeout(20)
            found["socket"] = s.recv(4096).decode()
        except OSError as e:
            found["socket"] = type(e).__name__
    print(json.dumps(found), flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another uid")
def test_another_user_gets_nothing(cluster, audit_log):
    nobody = pwd.getpwnam("nobody").pw_uid
    agent = loader._agent
    assert agent is not None
    socket_path = agent.socket_path

    def as_nobody() -> dict[str, str]:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                ANOTHER_USER,
                cluster.scheduler_address,
                str(socket_path),
                str(nobody),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=other_process_env(audit_log),
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    # Its own runtime directory holds nothing; ours it cannot even enter.
    found = as_nobody()
    assert found == {"uid": nobody, "loader": "None", "socket": "PermissionError"}

    # Were the directory's mode loosened, the agent still refuses a peer of another uid.
    run = socket_path.parent
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (run, socket_path)}
    try:
        run.chmod(0o711)
        socket_path.chmod(0o666)
        found = as_nobody()
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert "refused" in found["socket"] and "certificate" not in found["socket"]
    refused = [e for e in audit.read(audit_log) if e["event"] == "local_access_refused"]
    assert [e["uid"] for e in refused] == [nobody]


READ_CONFIG = """
import dask.config, distributed
print(dask.config.get("distributed.client.security-loader"))
"""


def test_the_installed_config_names_the_loader_and_a_users_own_wins(tmp_path):
    """``pip install .`` puts ``etc/dask/dask-secure-cloud.yaml`` in ``{sys.prefix}/etc/dask``
    (setup.cfg's data_files), read before the user's ``~/.config/dask``: with no setting
    of the user's, every process names the loader; a user's own setting wins."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["options.data_files"]["etc/dask"].split() == ["etc/dask/dask-secure-cloud.yaml"]
    shipped = ROOT / "etc" / "dask" / "dask-secure-cloud.yaml"
    assert yaml.safe_load(shipped.read_text()) == {
        "distributed": {"client": {"security-loader": LOADER}}
    }
    assert callable(import_term(LOADER))
    # {sys.prefix}/etc/dask stands between /etc/dask and ~/.config/dask: the same order
    # holds for a system directory given by DASK_ROOT_CONFIG and a user's by DASK_CONFIG.
    installed, user = tmp_path / "installed", tmp_path / "user"
    installed.mkdir()
    user.mkdir()
    (installed / shipped.name).write_text(shipped.read_text())
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DASK_DISTRIBUTED__CLIENT__SECURITY")
    }
    env.update(DASK_ROOT_CONFIG=str(installed), DASK_CONFIG=str(user), HOME=str(tmp_path))

    def configured() -> str:
        done = subprocess.run(
            [sys.executable, "-c", READ_CONFIG], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert configured() == LOADER
    (user / "mine.yaml").write_text("distributed: {client: {security-loader: my.own.loader}}\n")
    assert configured() == "my.own.loader"
