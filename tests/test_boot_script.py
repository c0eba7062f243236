"""The boot script's own behaviour, run by ``sh`` through the local VM runner.

What a stock image lacks (Docker, Dask) is proven on real guests in ``test_guests_failed_boots.py``;
here: each step and its duration reach the console, a failed step says which and why,
a Dask process that dies leaves its last log lines on the console, and the client's
interpreter is used however it was started.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask
import distributed
import pytest
from helpers import probe_wheel

from dask_secure_cloud.cloudinit import (
    VM_HOME,
    BootPlan,
    DockerRuntime,
    EnrollmentTicket,
    NativeRuntime,
    render,
)
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.vmrunner import boot

from clouds.booter import SHIM_PATH


def _run(tmp_path: Path, plan: BootPlan, *, extra_path: str | None = None, wait: float = 60):
    """Boot ``plan`` as a local VM, wait for every process to end, return the console."""
    return _run_with_log(tmp_path, plan, extra_path=extra_path, wait=wait)[0]


def _run_with_log(
    tmp_path: Path, plan: BootPlan, *, extra_path: str | None = None, wait: float = 60
) -> tuple[str, str]:
    """:func:`_run`, and Dask's log on the VM."""
    vm = boot(
        render(plan),
        directory=tmp_path / plan.cluster_id / plan.name,
        address="127.0.0.1",
        cluster_id=plan.cluster_id,
        name=plan.name,
        role=plan.role.value,
        extra_path=extra_path,
    )
    deadline = time.monotonic() + wait
    while vm.is_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not vm.is_running(), f"the VM still runs after {wait}s"
    console = vm.console_path.read_text()
    dask_log = vm.root / VM_HOME.lstrip("/") / "dask.log"
    log = dask_log.read_text() if dask_log.exists() else ""
    vm.stop()
    return console, log


def _worker(command: tuple[str, ...], runtime, **kwargs) -> BootPlan:
    return BootPlan(
        cluster_id="c",
        role=Role.WORKER,
        name="w",
        command=("worker", *command),
        runtime=runtime,
        power_off_on_exit=True,
        **kwargs,
    )


def _native() -> NativeRuntime:
    return NativeRuntime(sys.executable, dask.__version__, distributed.__version__)


def test_each_step_is_on_the_console_with_its_duration(tmp_path):
    # The scheduler address refuses connections and the death timeout is short: the
    # worker exits by itself, as it does when its scheduler is gone.
    plan = _worker(("tcp://127.0.0.1:9", "--death-timeout", "2s"), _native())
    console = _run(tmp_path, plan)
    assert re.search(r"python-env: done in \d+\.\d+s", console), console
    assert re.search(r"ready to start dask worker after \d+\.\d+s", console), console
    assert re.search(r"dask worker exited with status \d+ after \d+\.\d+s", console), console


def test_a_dask_process_that_fails_leaves_its_last_log_lines_on_the_console(tmp_path):
    plan = _worker(("tcp://127.0.0.1:9", "--no-such-flag"), _native())
    console = _run(tmp_path, plan)
    assert "dask worker exited with status 2" in console
    assert "dask-secure-cloud: | " in console and "--no-such-flag" in console


def test_a_vm_never_certified_fails_at_enroll_and_its_waiting_dask_never_starts(tmp_path):
    """A native Dask process starts before enrollment ends, to import Dask meanwhile:
    when no certificate comes, the boot fails at ``enroll`` and that process ends
    without ever running Dask."""
    ticket = EnrollmentTicket("not needed: nothing is certified", "t" * 32, _free_port())
    plan = _worker(("tls://127.0.0.1:9",), _native(), enroll=ticket, boot_timeout=4)
    console, log = _run_with_log(tmp_path, plan, wait=30)
    assert "boot FAILED at step enroll" in console, console
    assert "ready to start dask" not in console and "dask worker exited" not in console
    assert "this VM was not certified: Dask does not start" in log
    assert "Start worker" not in log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failing_extra_bootstrap_names_the_step(tmp_path):
    plan = _worker(("tcp://127.0.0.1:9",), _native(), extra_bootstrap=("false",))
    console = _run(tmp_path, plan)
    assert "boot FAILED at step extra-bootstrap (exit 1)" in console
    assert "ready to start dask" not in console


def test_gpu_workers_fail_fast_on_an_image_without_the_nvidia_driver(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA driver")
    plan = _worker(
        ("tcp://127.0.0.1:9",), DockerRuntime("ghcr.io/dask/dask:2024.8.0-py3.11", gpus=True)
    )
    started = time.monotonic()
    console = _run(tmp_path, plan, extra_path=SHIM_PATH)
    assert time.monotonic() - started < 20
    assert "gpu-check: FAILED" in console
    assert "no NVIDIA driver" in console and "see the docs page of" in console
    assert "boot FAILED at step gpu-check" in console
    assert "docker-engine" not in console  # nothing else was attempted


def test_a_local_vm_never_installs_system_packages(tmp_path, monkeypatch):
    """A missing runtime on a local VM is an error, not an apt-get on the user's machine."""
    bare = tmp_path / "bin"
    bare.mkdir()
    # Only what the script itself needs: no docker, and an apt-get that must not run.
    for tool in ("sh", "awk", "date", "sed", "tail", "mkdir", "chmod", "cat", "sleep", "grep"):
        (bare / tool).symlink_to(shutil.which(tool))
    (bare / "apt-get").write_text(f"#!/bin/sh\ntouch {tmp_path}/apt-get-ran\n")
    (bare / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", str(bare))
    plan = _worker(("tcp://127.0.0.1:9",), DockerRuntime("ghcr.io/dask/dask:2024.8.0-py3.11"))
    console = _run(tmp_path, plan)
    assert "docker-engine: FAILED" in console
    assert "never installs system packages on this machine" in console
    assert not (tmp_path / "apt-get-ran").exists()


def test_local_vms_use_the_clients_interpreter_whatever_path_says(tmp_path):
    """The interpreter running these tests started by its path, as a virtualenv's python
    is by a Jupyter kernel or an IDE, with a ``PATH`` whose ``python3`` has no Dask: the
    local VMs must still run the client's interpreter. (A virtualenv made here would not
    do: one made from a virtualenv's python sees the base interpreter's packages, not the
    virtualenv's.)"""
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "python3").write_text(
        "#!/bin/sh\necho 'decoy python3: No module named distributed' >&2\nexit 1\n"
    )
    (decoy / "python3").chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "PYENV_VERSION")
    }
    env["PATH"] = os.pathsep.join([str(decoy), "/usr/bin", "/bin"])
    result = subprocess.run(
        [sys.executable, "-m", "dask_secure_cloud", "demo", "--workers", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "decoy" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "runtime",
    [
        DockerRuntime("ghcr.io/dask/dask:2024.8.0-py3.11"),
        DockerRuntime("ghcr.io/dask/dask:2024.8.0-py3.11", gpus=True),
        NativeRuntime(
            "python3", "2024.8.0", "2024.8.0", ("xarray==2024.6.0", "pandas>=2", "s3fs[boto3]")
        ),
    ],
    ids=["docker", "docker-gpu", "native"],
)
def test_rendered_boot_scripts_pass_shellcheck(runtime, tmp_path):
    """POSIX sh as dash and busybox run it: no bashisms, no unquoted surprises."""
    from dask_secure_cloud.cloudinit import decode_file, parse

    plan = _worker(("tls://10.0.0.1:8786",), runtime, env={"A": "b"}, extra_bootstrap=("echo hi",))
    script = next(
        decode_file(f) for f in parse(render(plan))["write_files"] if f["path"].endswith("boot.sh")
    )
    path = tmp_path / "boot.sh"
    path.write_bytes(script)
    result = subprocess.run(
        ["shellcheck", "--shell=sh", "--severity=style", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def _pip_recorder(tmp_path) -> tuple[Path, Path]:
    """An interpreter stand-in that makes the virtualenv and records what its pip is asked
    (the arguments after ``install``), and where it records them."""
    record = tmp_path / "pip-argv.json"
    real = shlex.quote(sys.executable)
    dump = "import json, sys; json.dump(sys.argv[2:], open(sys.argv[1], 'w'))"
    python = tmp_path / "python-standin"
    python.write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2" = "-m venv" ]; then\n'
        '  for last; do :; done; mkdir -p "$last/bin"; cp "$0" "$last/bin/python"; exit 0\n'
        "fi\n"
        # The virtualenv's own interpreter names its own directory, never this test's.
        'case "$0" in */venv/bin/python) if [ "$1" = -c ]; then echo "${0%/bin/python}"; '
        "exit 0; fi ;; esac\n"
        f'if [ "$1 $2 $3" = "-m pip install" ]; then exec {real} -c "{dump}" '
        f'{shlex.quote(str(record))} "$@"; fi\n'
        'case "$2" in pip | distributed.cli.*) exit 0 ;; esac\n'
        f'exec {real} "$@"\n'
    )
    python.chmod(0o755)
    return python, record


def _pip_arguments(record: Path) -> list[str]:
    argv = json.loads(record.read_text())
    return argv[argv.index("install") + 1 :]


_PIP_FLAGS = ["-q", "--disable-pip-version-check", "--retries", "3", "--timeout", "30"]


@pytest.mark.parametrize("hashed", [False, True], ids=["plain", "hash-checked"])
def test_a_requirements_file_reaches_pip_as_a_file_it_reads_itself(tmp_path, hashed):
    """``requirements_file``: pip gets ``-r <the file>``, after the client's dask and
    distributed and ``pip_packages``. A hash-checked file goes alone, with
    ``--require-hashes``: it pins dask and distributed itself, and an unhashed pin beside
    it would make pip refuse the whole install."""
    from dask_secure_cloud import requirements_file

    python, record = _pip_recorder(tmp_path)
    hashes = " --hash=sha256:" + "0" * 64 if hashed else ""
    text = (
        f"dask==2024.8.0{hashes}\ndistributed==2024.8.0{hashes}\n"
        f"pandas==2.2.3 ; python_version >= '3.8'{hashes}\n"
    )
    chosen = requirements_file.parse(
        text, "requirements_file", dask="2024.8.0", distributed="2024.8.0"
    )
    packages = () if hashed else ("zarr>=2",)
    runtime = NativeRuntime(str(python), "2024.8.0", "2024.8.0", packages, chosen)
    console = _run(tmp_path, _worker(("tcp://127.0.0.1:9",), runtime))
    assert "python-env: done" in console, console
    arguments = _pip_arguments(record)
    name = "requirements.lock" if hashed else "requirements-file.txt"
    given = Path(arguments[-1])
    assert given.name == name and given.parent.name == "dask-secure-cloud"
    if hashed:
        assert arguments == [*_PIP_FLAGS, "--require-hashes", "-r", str(given)]
    else:
        pins = ["dask==2024.8.0", "distributed==2024.8.0", "zarr>=2"]
        assert arguments == [*_PIP_FLAGS, *pins, "-r", str(given)]


@pytest.mark.parametrize("substituted", [False, True], ids=["as-locked", "substituted"])
def test_a_hash_checked_file_installs_only_the_wheels_it_locked(tmp_path, substituted):
    """docs/boot.rst: with hashes, a changed or substituted wheel on the index fails the
    boot instead of running. Real pip, from the boot script, against a local index: the
    lock's hash is of the wheel as locked; the index then serves it as locked, or
    another wheel of the same name and version.

    The file is made here rather than read as the option reads it, which would ask for
    dask and distributed in it: those would come from PyPI, and the probe is the point."""
    import hashlib

    from dask_secure_cloud.requirements_file import RequirementsFile

    index = tmp_path / "index"
    locked = probe_wheel(index, "dsc_probe", "LOCKED = True\n")
    digest = hashlib.sha256(locked.read_bytes()).hexdigest()
    if substituted:
        probe_wheel(index, "dsc_probe", "import os\nos.system('echo pwned')\n")
    text = f"--no-index\n--find-links {index}\ndsc-probe==1.0 --hash=sha256:{digest}\n"
    chosen = RequirementsFile("lock", text, hashed=True, names=frozenset({"dsc-probe"}))
    runtime = NativeRuntime(sys.executable, dask.__version__, distributed.__version__)
    runtime = dataclasses.replace(runtime, requirements_file=chosen)
    plan = _worker(("tcp://127.0.0.1:9", "--death-timeout", "2s"), runtime, boot_timeout=5)
    console = _run(tmp_path, plan, wait=120)
    if substituted:
        assert "python-env: FAILED" in console, console
        assert "DO NOT MATCH THE HASHES" in console, console
        assert "boot FAILED at step python-env" in console, console  # Dask never ran
    else:
        assert "python-env: done" in console, console
        assert "HASHES" not in console, console


def test_each_pip_requirement_reaches_pip_as_one_argument_unquoted(tmp_path):
    """``pip_packages=["pandas>=2", "s3fs[boto3]"]`` once reached pip as ``'pandas>=2'``,
    quotes and all. An interpreter stand-in makes the virtualenv and records what its
    pip is asked: each requirement, as written, as one argument."""
    python, record = _pip_recorder(tmp_path)
    wanted = ("pandas>=2", "s3fs[boto3]", 'iniconfig >= 2, < 3; python_version >= "3.8"')
    runtime = NativeRuntime(str(python), "2024.8.0+g123", "2024.8.0", wanted)
    console = _run(tmp_path, _worker(("tcp://127.0.0.1:9",), runtime))
    assert "python-env: done" in console, console
    assert _pip_arguments(record) == [
        *_PIP_FLAGS,
        "dask==2024.8.0",
        "distributed==2024.8.0",
        *wanted,
    ]


def test_what_an_image_records_of_a_requirements_file_is_its_digest(tmp_path):
    """docs/boot.rst: a built image records, and a console shows, only the file's digest
    (``software`` in ``native.sh``), so an index password in the file reaches neither."""
    import hashlib

    from dask_secure_cloud.bootscript import _NATIVE

    text = "--index-url https://user:SECRET@pkgs.example.org/simple\npandas==2.2.3\n"
    (tmp_path / "requirements-file.txt").write_text(text)
    script = f'D="{tmp_path}"\nWANT_DASK=1\nWANT_DISTRIBUTED=1\n{_NATIVE}\nsoftware\n'
    shown = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert "SECRET" not in shown.stdout and "pandas" not in shown.stdout
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    assert shown.stdout.splitlines() == [
        "native dask 1 distributed 1",
        f"requirements-file.txt {digest}",
    ]
