from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from dask_secure_cloud.cloudinit import decode_file, parse


def vm_processes(cluster_id: str) -> list[int]:
    """PIDs on this machine that belong to any VM of ``cluster_id``."""
    marker = f"DSC_VM_ID={cluster_id}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if any(v.startswith(marker) for v in (entry / "environ").read_bytes().split(b"\0")):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def any_vm_processes(directory: Path) -> list[int]:
    return [pid for cluster in _clusters(directory) for pid in vm_processes(cluster)]


def _clusters(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir()] if directory.exists() else []


def decoded_files(user_data: bytes) -> dict[str, bytes]:
    return {f["path"]: decode_file(f) for f in parse(user_data).get("write_files", [])}


@pytest.fixture
def vm_dir(tmp_path: Path) -> Path:
    path = tmp_path / "vms"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def recorded_user_data(monkeypatch) -> list[bytes]:
    """Every user-data a LocalVMCluster hands to its driver during the test."""
    from dask_secure_cloud.providers.local import LocalDriver

    seen: list[bytes] = []
    original = LocalDriver.create

    async def create(self, request):
        seen.append(request.user_data)
        return await original(self, request)

    monkeypatch.setattr(LocalDriver, "create", create)
    return seen


@pytest.fixture(autouse=True)
def _no_cloud_credentials(monkeypatch, tmp_path_factory):
    """Tests never read credentials from this machine, nor reach a real cloud."""
    for key in list(os.environ):
        if key.startswith(("AWS_", "AZURE_", "GOOGLE_", "DIGITALOCEAN_", "CLOUDSDK_")):
            monkeypatch.delenv(key)
    nowhere = str(tmp_path_factory.getbasetemp() / "no-such-file")
    monkeypatch.setenv("AWS_CONFIG_FILE", nowhere)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookups
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # google-auth: no metadata-server probe
    monkeypatch.setenv("CLOUDSDK_CONFIG", nowhere)  # no gcloud application default creds


_real_getaddrinfo = socket.getaddrinfo


def _loopback_only(host, *args, **kwargs):
    """Resolve loopback names only: a test that tries to reach any other host fails."""
    name = host.decode() if isinstance(host, bytes) else host
    if name not in (None, "", "localhost", "::1") and not str(name).startswith("127."):
        raise OSError(f"tests may only reach loopback addresses, not {name!r}")
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True)
def audit_log(tmp_path_factory):
    """Each test's audit log goes to its own file, never to the user's data directory."""
    import dask.config

    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with dask.config.set({"secure-cloud.audit-log": str(path)}):
        yield path


@pytest.fixture(autouse=True)
def _no_network_beyond_loopback(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", _loopback_only)
