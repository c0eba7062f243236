"""Boot ``#cloud-config`` user-data on this machine, as a VM of its own would.

This is a deliberately small cloud-init: it performs ``write_files`` (every encoding
cloud-init accepts, with the given permissions) under the VM's root directory, then runs
``runcmd`` as one shell script, in a session of its own so that the whole VM is one
process group. It refuses any other cloud-config module rather than silently skip it.

``LocalVMCluster`` boots its VMs with it, and the cloud stand-ins in the test suite boot
the user-data their APIs receive with it: user-data and an address in, a running VM out.

The VM gets a clean environment, as a fresh VM would: the client's own variables (which
may hold cloud tokens) do not leak into it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .cloudinit import decode_file, parse
from .errors import UnsupportedUserData

__all__ = ["LocalVM", "UnsupportedUserData", "boot", "find_vms"]

_SUPPORTED = {"write_files", "runcmd"}
# Variables a new VM would have, and the ones Python needs to find its packages here.
_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "TZ")
_RECORD = "vm.json"


@dataclass(frozen=True)
class LocalVM:
    """A booted VM: a directory and the process group running in it."""

    vm_id: str
    cluster_id: str
    name: str
    role: str
    address: str
    directory: str
    pgid: int

    @property
    def root(self) -> Path:
        """Where the VM's filesystem starts: ``/opt/x`` in user-data is ``root/opt/x``."""
        return Path(self.directory) / "root"

    @property
    def console_path(self) -> Path:
        return Path(self.directory) / "console.log"

    def console_output(self) -> str:
        """runcmd's output followed by the VM's Dask log, as a serial console would show."""
        text = ""
        for path in (self.console_path, *sorted(self.root.glob("opt/*/dask.log"))):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return text

    def processes(self) -> list[int]:
        """PIDs still running in this VM.

        A scan of ``/proc`` can miss a child forked just after the listing while its
        parent exits, so an empty answer is only trusted when a second scan agrees.
        """
        found = _members(self.pgid, self.vm_id)
        if not found:
            time.sleep(0.02)
            found = _members(self.pgid, self.vm_id)
        return found

    def is_running(self) -> bool:
        return bool(self.processes())

    def stop(self, grace: float = 5.0) -> None:
        """End every process of the VM (TERM, then KILL after ``grace``), delete its files."""
        _signal_all(self, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        while self.processes():
            _signal_all(self, signal.SIGKILL)
            time.sleep(0.05)
        shutil.rmtree(self.directory, ignore_errors=True)


def _signal_all(vm: LocalVM, sig: int) -> None:
    for pid in vm.processes():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _members(pgid: int, vm_id: str) -> list[int]:
    """PIDs in process group ``pgid`` that belong to ``vm_id``.

    On Linux each candidate's environment is checked for the VM's id, so a recycled
    process-group number can never make us signal somebody else's processes.
    """
    proc = Path("/proc")
    if not proc.is_dir():  # pragma: no cover - not Linux
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [-pgid]
    marker = f"DSC_VM_ID={vm_id}".encode()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # Fields after the parenthesised command: state ppid pgrp ...
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _within(root: Path, path: str) -> Path:
    if not path.startswith("/"):
        raise UnsupportedUserData(f"write_files path must be absolute: {path!r}")
    target = (root / path.lstrip("/")).resolve()
    if not target.is_relative_to(root.resolve()):
        raise UnsupportedUserData(f"write_files path escapes the VM: {path!r}")
    return target


def _write_files(root: Path, entries: list[Mapping[str, Any]]) -> None:
    for entry in entries:
        target = _within(root, entry["path"])
        target.parent.mkdir(parents=True, exist_ok=True)
        data = decode_file(entry)
        mode = int(str(entry.get("permissions", "0644")), 8)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if entry.get("append") else os.O_TRUNC)
        # Create with the final mode so a key is never readable by others, not even briefly.
        fd = os.open(target, flags, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(target, mode)


def _runcmd_script(items: list[Any]) -> str:
    lines = ["#!/bin/sh"]
    for item in items:
        if isinstance(item, str):
            lines.append(item)
        elif isinstance(item, list):
            lines.append(" ".join(shlex.quote(str(word)) for word in item))
        else:
            raise UnsupportedUserData(f"runcmd entries are strings or lists: {item!r}")
    return "\n".join(lines) + "\n"


def boot(
    user_data: bytes,
    *,
    directory: str | os.PathLike[str],
    address: str,
    cluster_id: str,
    name: str,
    role: str,
    extra_path: str | None = None,
) -> LocalVM:
    """Boot ``user_data`` as a VM living in ``directory`` and listening on ``address``.

    Returns once ``runcmd`` has been started; the VM's processes go on in their own
    process group. ``extra_path`` is put first on the VM's ``PATH`` (the test suite uses
    it for a ``docker`` stand-in).
    """
    document = parse(user_data)
    unsupported = set(document) - _SUPPORTED
    if unsupported:
        raise UnsupportedUserData(
            f"the local VM runner performs only {sorted(_SUPPORTED)}; "
            f"user-data also asks for {sorted(unsupported)}"
        )
    vm_dir = Path(directory)
    vm_dir.mkdir(parents=True, mode=0o700)
    root = vm_dir / "root"
    script = vm_dir / "runcmd.sh"
    try:
        root.mkdir(mode=0o755)
        (root / "tmp").mkdir(mode=0o700)
        _write_files(root, document.get("write_files") or [])
        script.write_text(_runcmd_script(document.get("runcmd") or []))
    except BaseException:
        shutil.rmtree(vm_dir, ignore_errors=True)
        raise

    vm_id = f"{cluster_id}/{name}"
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    if extra_path:
        env["PATH"] = extra_path + os.pathsep + env.get("PATH", os.defpath)
    # The interpreter that runs us is the VM's python3 too, when no other one is on PATH.
    env["PATH"] = env.get("PATH", os.defpath) + os.pathsep + os.path.dirname(sys.executable)
    env.update(DSC_VM_ROOT=str(root), DSC_VM_ADDRESS=address, DSC_VM_ID=vm_id)
    # A /tmp of its own, as a VM has: Dask keeps its scratch space and copies of its
    # preloads there, and VMs sharing one would overwrite each other's copies.
    env["TMPDIR"] = str(root / "tmp")
    with open(vm_dir / "console.log", "wb") as console:
        process = subprocess.Popen(
            ["sh", str(script)],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        vm = LocalVM(
            vm_id=vm_id,
            cluster_id=cluster_id,
            name=name,
            role=role,
            address=address,
            directory=str(vm_dir),
            pgid=process.pid,
        )
        (vm_dir / _RECORD).write_text(json.dumps(asdict(vm)))
        # The child calls setsid() as it starts: until then it is not yet in its own group.
        deadline = time.monotonic() + 2
        while not vm.processes() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        # After the loop: its poll() would not see the shell end while a waiter holds it.
        _reap_when_done(process, vm_id)
    return vm


def _reap_when_done(process: subprocess.Popen[bytes], vm_id: str) -> None:
    """Collect runcmd's shell when it ends, so it never lingers as a zombie.

    The shell usually ends right after the boot script has put Dask in the background,
    but it may also live as long as the VM: a thread of its own waits for it, so neither
    the caller (often an event loop's executor) nor anybody else ever blocks on it. A
    Popen dropped unwaited is only collected at some later Popen, and the last VMs'
    shells stayed ``<defunct>`` under the owning process.
    """
    threading.Thread(target=process.wait, name=f"reap runcmd of {vm_id}", daemon=True).start()


def find_vms(base: str | os.PathLike[str], cluster_id: str | None = None) -> list[LocalVM]:
    """The VMs recorded under ``base`` (``base/CLUSTER/NAME``), optionally of one cluster."""
    found = []
    for record in sorted(Path(base).glob(f"{cluster_id or '*'}/*/{_RECORD}")):
        with contextlib.suppress(OSError, ValueError, TypeError):
            found.append(LocalVM(**json.loads(record.read_text())))
    return found
