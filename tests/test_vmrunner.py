import os
import stat
import sys
import time
from collections.abc import Collection
from pathlib import Path

import pytest
from helpers import vm_processes

from dask_secure_cloud.cloudinit import BootPlan, NativeRuntime, render
from dask_secure_cloud.credentials import ClusterCredentials, Role
from dask_secure_cloud.vmrunner import UnsupportedUserData, boot, find_vms


def _boot(tmp_path, text: str, name="vm", **kwargs):
    return boot(
        text.encode(),
        directory=tmp_path / "c" / name,
        address="127.0.0.1",
        cluster_id="c",
        name=name,
        role="worker",
        **kwargs,
    )


def test_write_files_honours_encoding_and_permissions(tmp_path):
    creds = ClusterCredentials("c")
    user_data = render(
        BootPlan(
            cluster_id="c",
            role=Role.WORKER,
            name="w",
            command=("worker", "tcp://127.0.0.1:9"),
            runtime=NativeRuntime(sys.executable),
            tls=creds.issue(Role.WORKER, "w"),
            extra_bootstrap=("exit 0",),
        )
    )
    vm = boot(
        user_data,
        directory=tmp_path / "c" / "w",
        address="127.0.0.1",
        cluster_id="c",
        name="w",
        role="worker",
    )
    home = vm.root / "opt/dask-secure-cloud"
    assert (home / "tls/node.key").read_text().startswith("-----BEGIN PRIVATE KEY")
    assert stat.S_IMODE((home / "tls/node.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "boot.sh").stat().st_mode) == 0o700
    deadline = time.monotonic() + 5
    while vm.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    # boot.sh tightened the directories it owns.
    assert stat.S_IMODE((home / "tls").stat().st_mode) == 0o700
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    vm.stop()


def test_runcmd_runs_in_a_clean_environment_on_the_vm_address(tmp_path, monkeypatch):
    """No client variable leaks in, and the VM has a temporary directory of its own:
    Dask copies its preloads there, and VMs sharing one overwrote each other's."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-client")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "client-tmp"))
    vm = _boot(
        tmp_path,
        '#cloud-config\nruncmd:\n- env > "$DSC_VM_ROOT/env.txt"\n- [sh, -c, "echo list form"]\n',
    )
    deadline = time.monotonic() + 5
    while vm.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    env = (vm.root / "env.txt").read_text()
    assert "DSC_VM_ADDRESS=127.0.0.1" in env
    assert "from-the-client" not in env
    assert f"TMPDIR={vm.root / 'tmp'}\n" in env
    assert (vm.root / "tmp").is_dir()
    assert "list form" in vm.console_output()
    vm.stop()


def test_stop_ends_every_process_and_deletes_the_vm(tmp_path):
    vm = _boot(tmp_path, "#cloud-config\nruncmd:\n- (sleep 300 & sleep 300) &\n- sleep 300 &\n")
    try:
        # boot() returns once the VM's first process runs; the rest start right after.
        deadline = time.monotonic() + 10
        while len(vm.processes()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(vm.processes()) >= 3
        assert find_vms(tmp_path, "c") == [vm]
    finally:
        vm.stop()
    assert vm_processes("c") == []
    assert not os.path.exists(vm.directory)
    assert find_vms(tmp_path, "c") == []


def test_stop_kills_what_ignores_sigterm(tmp_path):
    vm = _boot(tmp_path, "#cloud-config\nruncmd:\n- sh -c 'trap \"\" TERM; sleep 300' &\n")
    deadline = time.monotonic() + 10
    while not any(b"sleep" in _cmdline(pid) for pid in vm.processes()):
        assert time.monotonic() < deadline, "the process that ignores SIGTERM never started"
        time.sleep(0.05)
    vm.stop(grace=0.5)
    assert vm_processes("c") == []


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize(
    "text,match",
    [
        ("#cloud-config\npackages: [htop]\n", "packages"),
        ("#cloud-config\nwrite_files:\n- path: /../../etc/x\n  content: x\n", "escapes"),
        ("#!/bin/sh\necho not cloud-config\n", "cloud-config"),
    ],
)
def test_refuses_what_it_cannot_do_faithfully(tmp_path, text, match):
    with pytest.raises((UnsupportedUserData, ValueError), match=match):
        _boot(tmp_path, text)
    assert not (tmp_path / "c" / "vm").exists()


def zombie_children(pid: int | str = "self") -> list[int]:
    """The children of process ``pid`` (this one by default) that ended and were never
    waited for (``<defunct>``)."""
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children |= {int(pid) for pid in (task / "children").read_text().split()}
        except OSError:  # the thread ended meanwhile
            continue
    found = []
    for child in sorted(children):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z":
            found.append(child)
    return found


def no_zombie_children(timeout: float = 5.0, besides: Collection[int] = ()) -> bool:
    """True once no child of this process is a zombie, but those in ``besides`` (what
    earlier tests in this process may have left): a shell that ends is reaped at once,
    so one left after ``timeout`` was never going to be."""
    deadline = time.monotonic() + timeout
    while set(zombie_children()) - set(besides):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_runcmd_shell_is_reaped_when_it_ends(tmp_path):
    """runcmd's shell ends once it has put the VM's processes in the background, as the
    boot script does; it must not stay ``<defunct>`` under the process that booted it."""
    before = zombie_children()
    vms = [
        _boot(tmp_path, "#cloud-config\nruncmd:\n- sleep 300 &\n- sleep 0.3\n", name=f"vm{i}")
        for i in range(3)
    ]
    try:
        for vm in vms:
            shell = vm.pgid
            deadline = time.monotonic() + 5
            while Path(f"/proc/{shell}").exists() and shell not in zombie_children():
                assert time.monotonic() < deadline, "runcmd's shell did not end"
                time.sleep(0.02)
            assert vm.is_running()  # its sleep goes on, in the VM's process group
        assert no_zombie_children(besides=before), zombie_children()
    finally:
        for vm in vms:
            vm.stop()
    assert no_zombie_children(besides=before), zombie_children()
