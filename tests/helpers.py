"""Helpers the tests share: what runs of a VM, what a user-data carries, whether a TLS
server talks to a client without a certificate. Fixtures are in ``conftest.py``; the
stand-ins' starters in ``standins.py``."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from dask_secure_cloud.cloudinit import decode_file, parse

__all__ = ["answers_without_certificate", "any_vm_processes", "decoded_files", "vm_processes"]


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


async def answers_without_certificate(address: str, ca_pem: str) -> bool:
    """A TLS client with the right CA but no certificate: does the server talk to it?"""
    host, port = address.split("//")[1].rsplit(":", 1)
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.check_hostname = False
    try:
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    except (OSError, ssl.SSLError):
        return False
    try:
        return bool(await asyncio.wait_for(reader.read(1), 3))
    except (OSError, ssl.SSLError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()


def probe_wheel(directory: Path, module: str, text: str) -> Path:
    """A one-module wheel, ``module`` 1.0, whose module's source is ``text``: a package
    on an index, made here so that pip installs it with no network."""
    import base64
    import hashlib
    import zipfile

    directory.mkdir(parents=True, exist_ok=True)
    info = f"{module}-1.0.dist-info"
    wheel = directory / f"{module}-1.0-py3-none-any.whl"
    files = {
        f"{module}.py": text,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n",
        f"{info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, content in files.items():
            data = content.encode()
            archive.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{name},sha256={digest.decode()},{len(data)}")
        record.append(f"{info}/RECORD,,")
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel
