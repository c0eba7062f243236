"""Hostile option values never run as code on a VM (issue 24, item 3).

Every option that reaches the boot script is fed shell syntax (command substitution,
backticks, both quotes breaking out, a newline, ``;``, and the ``{vm_dir}`` placeholder
next to a command substitution). The rendered user-data is booted as a local VM (the
local cloud-init runner, real ``sh``), and each payload tries to create a marker file:
it must never exist. Where the value is accepted, it must also reach the Dask process
(or ``docker run``) as one argument, unchanged: data, not code. Where it is refused,
it is refused with :class:`OptionError` before anything exists.

To keep each case fast, the VM's interpreter and ``docker`` are small stand-ins that
record the command line and environment the boot script gives the Dask process, and
pass everything else (the ``python-env`` step's checks, ``venv``) to this Python.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dask
import distributed
import pytest

from dask_secure_cloud import requirements_file
from dask_secure_cloud.cloudinit import (
    VM_DIR,
    VM_HOME,
    BootPlan,
    DockerRuntime,
    NativeRuntime,
    render,
)
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.errors import OptionError
from dask_secure_cloud.plan import _cli_flags
from dask_secure_cloud.vmrunner import boot

#: Each payload creates ``@MARKER@`` if any of it runs as shell. ``$D`` is the boot
#: script's own directory variable: the attack of the issue started values with it.
PAYLOADS = {
    "command-substitution": "$D$(touch @MARKER@)",
    "backticks": "$D`touch @MARKER@`",
    "double-quote-breakout": '$D"; touch @MARKER@; echo "',
    "single-quote-breakout": "'; touch @MARKER@; echo '",
    "newline": "x\ntouch @MARKER@\n",
    "semicolon": "x; touch @MARKER@",
    "vm-dir-placeholder": VM_DIR + "$(touch @MARKER@)",
}

#: The stand-ins' record: what the Dask process (or ``docker run``) was given.
_RECORD = (
    "import json, os, sys; "
    'json.dump({"argv": sys.argv[2:], "env": dict(os.environ)}, open(sys.argv[1], "w"))'
)
_ADDRESS = "tcp://127.0.0.1:9"


class Bed:
    """One case's directory: the marker, the stand-ins, and where they record."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.marker = tmp_path / "PWNED"
        self.record = tmp_path / "record.json"
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        real = shlex.quote(sys.executable)
        record = f"{real} -c {shlex.quote(_RECORD)} {shlex.quote(str(self.record))}"
        self.python = self.bin / "python-standin"
        self.python.write_text(
            "#!/bin/sh\n"
            'case "${2:-}" in distributed.cli.*) exec ' + record + ' "$@";; esac\n'
            f'exec {real} "$@"\n'
        )
        (self.bin / "docker").write_text(
            "#!/bin/sh\n"
            'case "$1" in\n'
            "  --version) echo 'Docker version 0.0.0 (stand-in)' ;;\n"
            "  info | pull) ;;\n"
            f'  run) exec {record} "$@" ;;\n'
            "  *) exit 1 ;;\n"
            "esac\n"
        )
        for tool in self.bin.iterdir():
            tool.chmod(0o755)

    def payload(self, name: str) -> str:
        return PAYLOADS[name].replace("@MARKER@", str(self.marker))

    def native(self, **kwargs) -> NativeRuntime:
        return NativeRuntime(str(self.python), dask.__version__, distributed.__version__, **kwargs)


def _plan(runtime, command: tuple[str, ...] = (), **kwargs) -> BootPlan:
    role = kwargs.pop("role", Role.WORKER)
    if role is Role.WORKER:
        command = ("worker", _ADDRESS, "--death-timeout", "2s", *command)
    else:
        command = ("scheduler", "--port", "0", "--idle-timeout", "2s", *command)
    return BootPlan(
        **{
            "cluster_id": "c",
            "role": role,
            "name": "w",
            "command": command,
            "runtime": runtime,
            **kwargs,
        }
    )


# Each builder makes the boot plan of one option set to ``value``, and says what the
# Dask process must receive: ``("argv", text)``, ``("env", text)``, or ``None`` where
# only "nothing ran" is checked (the value cannot run, e.g. an interpreter's name).
Expect = tuple[str, str] | None
Builder = Callable[[Bed, str], tuple[BootPlan, Expect]]


def _worker_options(bed: Bed, value: str) -> tuple[BootPlan, Expect]:
    flags = _cli_flags("worker", {"local_directory": value}, "worker_options")
    return _plan(bed.native(), tuple(flags)), ("argv", value)


def _worker_options_docker(bed: Bed, value: str) -> tuple[BootPlan, Expect]:
    flags = _cli_flags("worker", {"local_directory": value}, "worker_options")
    runtime = DockerRuntime("ghcr.io/dask/dask:2024.8.0-py3.11")
    return _plan(runtime, tuple(flags)), ("argv", value)


def _scheduler_options(bed: Bed, value: str) -> tuple[BootPlan, Expect]:
    flags = _cli_flags("scheduler", {"dashboard_prefix": value}, "scheduler_options")
    return _plan(bed.native(), tuple(flags), role=Role.SCHEDULER, name="s"), ("argv", value)


def _env_vars(bed: Bed, value: str) -> tuple[BootPlan, Expect]:
    return _plan(bed.native(), env={"DSC_ATTACK": value}), ("env", value)


def _vm_name(bed: Bed, value: str) -> tuple[BootPlan, Expect]:
    # The name is in the script's header comment and in ``--name``.
    return _plan(bed.native(), ("--name", value), name=value), ("argv", value)


def _cluster_id(bed: Bed, value: str) -> tuple[BootPlan, Expect]:
    return _plan(bed.native(), cluster_id=value), None


def _python(bed: Bed, value: str) -> tuple[BootPlan, Expect]:
    runtime = NativeRuntime(value, dask.__version__, distributed.__version__)
    return _plan(runtime), None


def _pip_packages(bed: Bed, value: str) -> tuple[BootPlan, Expect]:
    # A valid requirement carries the payload in its marker's string, which is false:
    # pip skips it without an index, and the shell must never see it as code.
    quote = "'" if '"' in value else '"'
    requirement = f"iniconfig; python_version == {quote}{value}{quote}"
    return _plan(bed.native(pip_packages=(requirement,))), None


def _requirements_file(bed: Bed, value: str) -> tuple[BootPlan, Expect]:
    # The same false marker, in a file pip reads itself (``-r``), after a comment that
    # carries the payload too. The client reads the file as the option does.
    quote = "'" if '"' in value else '"'
    text = f"# {value}\niniconfig; python_version == {quote}{value}{quote}\n"
    chosen = requirements_file.parse(
        text, "requirements_file", dask=dask.__version__, distributed=distributed.__version__
    )
    return _plan(bed.native(requirements_file=chosen)), None


def _docker_image(bed: Bed, value: str) -> tuple[BootPlan, Expect]:
    return _plan(DockerRuntime(value)), None


OPTIONS: dict[str, Builder] = {
    "worker_options": _worker_options,
    "worker_options-docker": _worker_options_docker,
    "scheduler_options": _scheduler_options,
    "env_vars": _env_vars,
    "vm-name": _vm_name,
    "cluster-id": _cluster_id,
    "python": _python,
    "pip_packages": _pip_packages,
    "requirements_file": _requirements_file,
    "docker_image": _docker_image,
}


def _boot(bed: Bed, plan: BootPlan, wait: float = 120) -> tuple[str, Path]:
    """Boot ``plan`` as a local VM with the stand-ins first on ``PATH``, wait for all its
    processes; return its console and its Dask directory."""
    vm = boot(
        render(plan),
        directory=bed.tmp_path / "vm",
        address="127.0.0.1",
        cluster_id="c",
        name="vm",
        role=plan.role.value,
        extra_path=str(bed.bin),
    )
    deadline = time.monotonic() + wait
    while vm.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    running = vm.is_running()
    console = vm.console_path.read_text()
    vm.stop()
    assert not running, f"the VM still runs after {wait}s:\n{console}"
    return console, vm.root / VM_HOME.lstrip("/")


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_a_hostile_value_never_runs_on_the_vm(option, payload, tmp_path):
    bed = Bed(tmp_path)
    value = bed.payload(payload)
    try:
        plan, expect = OPTIONS[option](bed, value)
    except OptionError:
        # Refused before anything exists: only where the value cannot be one.
        assert expect_refusal(option, value), f"{option}={value!r} was refused"
        assert not bed.marker.exists()
        return
    console, home = _boot(bed, plan)
    assert not bed.marker.exists(), f"{option}={value!r} ran on the VM:\n{console}"
    if expect is None:
        return
    assert bed.record.exists(), f"the Dask process did not start:\n{console}"
    record = json.loads(bed.record.read_text())
    where, sent = expect
    vm_dir = VM_HOME if option.endswith("-docker") else str(home)
    wanted = sent.replace(VM_DIR, vm_dir)
    if where == "env":
        assert record["env"]["DSC_ATTACK"] == wanted
    else:
        assert wanted in record["argv"], (wanted, record["argv"])


def expect_refusal(option: str, value: str) -> bool:
    """Whether ``option`` may refuse ``value`` outright: an interpreter, an image
    reference and a requirement have a form a payload may break. Every other value must
    be taken, and reach the VM unchanged."""
    if option in ("python", "docker_image"):
        return True
    if option in ("pip_packages", "requirements_file"):
        return "\n" in value
    return False


def test_the_vm_dir_placeholder_names_the_vms_dask_directory(tmp_path):
    """``{vm_dir}`` is the documented way to name the VM's Dask directory in an option
    value: the Dask process gets the directory itself, the rest of the value as given."""
    bed = Bed(tmp_path)
    flags = _cli_flags("worker", {"local_directory": "{vm_dir}/spill $x"}, "worker_options")
    plan = _plan(bed.native(), tuple(flags), env={"SCRATCH": "{vm_dir}/scratch"})
    _, home = _boot(bed, plan)
    record = json.loads(bed.record.read_text())
    assert f"{home}/spill $x" in record["argv"]
    assert record["env"]["SCRATCH"] == f"{home}/scratch"
