"""The shell script a VM runs at boot: provision its runtime, start Dask, end the VM.

A VM starts from a stock image: cloud-init, systemd and a ``python3``, but no Docker and
no Dask. The script brings what its runtime needs, one *step* at a time, and prints one
line per step with its duration to standard output, which cloud-init sends to the
serial console on every cloud. A failing step prints the last lines of its own log, so
the boot-failure report the client builds from the console says which step failed and
why; then the VM powers itself off 30 seconds later instead of idling on the bill.

Steps, in order:

- ``enroll`` (the cluster's own CA), started first and in the background: the VM makes
  its key and waits for the client to certify it (``enroll.py``), while the steps
  below provision; the step itself is the wait for it, just before Dask starts (a
  native Dask process is started just before the wait, to import Dask meanwhile).

- ``gpu-check`` (docker runtime, GPU workers): the NVIDIA driver and container toolkit
  must already be on the image; installing them at boot is slow and fragile, so a
  missing one fails at once with a message naming the fix.
- ``docker-engine`` (docker runtime): the distribution's engine from apt when ``docker``
  is missing, waiting for the dpkg lock that unattended-upgrades holds on first boot.
- ``pull`` (docker runtime): ``docker pull`` with retries until the boot deadline; a tag
  the registry does not have is not retried.
- ``python-env`` (native runtime): nothing when the interpreter already has the
  client's exact dask and distributed and no ``pip_packages`` are asked for (a baked
  image boots fastest); otherwise a virtualenv (``python3-venv`` from apt if the image
  lacks it) with those versions and the user's ``pip_packages``, read as data from a
  file, each one argument of ``pip install``.
- ``extra-bootstrap``: the user's own lines.
- ``dask``: the Dask process, logged to a file on the VM; when it ends the VM powers
  off (the lease and worker death timeout make it end when the client is gone), and
  when it ends badly its last log lines go to the console first.

On a local VM (``DSC_VM_ROOT`` set by the local runner) the script never installs system
packages and never powers the machine off: it is running on the user's own computer.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from importlib import resources

from .errors import OptionError

__all__ = ["STEP_PREFIX", "render_script"]

#: Every line the script prints starts with this, so a console is easy to search.
STEP_PREFIX = "dask-secure-cloud:"

#: The shell parts of a boot script, in POSIX sh (dash on Debian and Ubuntu, busybox ash
#: elsewhere: no arrays, no ``local``, no ``$SECONDS``), as real files that shellcheck
#: reads (``vm/boot/*.sh``). A script carries only the parts its runtime uses.
_PARTS = resources.files(f"{__package__}.vm").joinpath("boot")


def _part(name: str) -> str:
    """``vm/boot/<name>.sh`` from the line after its header (which ends with the line
    saying so), without its comment lines: they are for whoever reads the source, and
    every byte of user-data is one the user's own options cannot use (EC2 allows 16 KB
    in all). shellcheck's directives and here-documents are kept as they are."""
    text = _PARTS.joinpath(f"{name}.sh").read_text()
    return _without_comments(text.split(" from the next line on.\n", 1)[1])


_HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?")


def _without_comments(text: str) -> str:
    kept: list[str] = []
    ending = None  # the word that ends the here-document being read
    for line in text.splitlines(keepends=True):
        if ending is not None:
            kept.append(line)
            ending = None if line.strip() == ending else ending
            continue
        code = line.strip()
        if code.startswith("#") and not code.startswith("# shellcheck"):
            continue
        kept.append(line)
        if (found := _HEREDOC.search(line)) is not None:
            ending = found.group(1)
    return "".join(kept)


_COMMON, _DOCKER, _GPU, _NATIVE = (_part(n) for n in ("common", "docker", "gpu", "native"))
#: The image builder's last step, which a builder runs as its ``extra_bootstrap``.
IMAGE_BUILD = _part("image_build")


def _assign(name: str, value: str) -> str:
    return f"{name}={shlex.quote(value)}"


def render_script(
    *,
    home: str,
    header: str,
    runtime: str,
    boot_timeout: float,
    launch: str,
    role: str,
    image: str = "",
    gpus: bool = False,
    python: str = "python3",
    want_dask: str = "",
    want_distributed: str = "",
    prepare: Sequence[str] = (),
    extra_bootstrap: Sequence[str] = (),
    power_off_on_exit: bool = True,
    enroll_port: int | None = None,
) -> str:
    """The boot script's text.

    ``launch`` is the shell line that starts Dask (``$PY`` is the interpreter the
    ``python-env`` step settled on, ``$D`` our directory); ``prepare`` are lines that run
    before any step (directory modes, environment files). With ``enroll_port`` the VM
    enrols on that port (``$D/enroll.py``), with the image's ``python3`` for a
    container, or the configured interpreter for a native runtime.

    No user value is ever part of the script's code: ``image`` and ``python`` are
    assigned single-quoted and only ever expanded inside double quotes, ``launch`` comes
    quoted from its renderer, and the user's ``pip_packages`` are not here at all: the
    ``python-env`` step reads them from ``$D/requirements.txt``, one a line, when that
    file exists. Only ``extra_bootstrap`` is shell, by design: it is the user's own.
    """
    if runtime not in ("docker", "native"):
        raise OptionError(f"runtime must be 'docker' or 'native', got {runtime!r}")
    lines = [
        "#!/bin/sh",
        # A comment: a newline in it would end it and start code.
        f"# {' '.join(header.split())}",
        "set -eu",
        'LOCAL="${DSC_VM_ROOT:-}"',
        f'D="${{DSC_VM_ROOT:-}}{home}"',
        *(
            [_assign("IMAGE", image)]
            if runtime == "docker"
            else [
                _assign("PY", python),
                _assign("WANT_DASK", want_dask),
                _assign("WANT_DISTRIBUTED", want_distributed),
            ]
        ),
        f"DEADLINE=$(( $(date +%s) + {max(int(boot_timeout), 1)} ))",
        "STEP=prepare",
        _COMMON.strip("\n"),
        *(
            [_DOCKER.strip("\n")] + ([_GPU.strip("\n")] if gpus else [])
            if runtime == "docker"
            else [_NATIVE.strip("\n")]
        ),
        "T0=$(clock)",
        "trap on_exit EXIT",
        'mkdir -p "$D/log"',
        *prepare,
        f'say "booting {role}: runtime {runtime}"',
    ]
    if enroll_port is not None:
        enroll_python = "python3" if runtime == "docker" else "$PY"
        lines += [
            'say "enroll: making this VM\'s key; the client certifies it meanwhile"',
            # Isolated and without site-packages: the standard library is all it uses,
            # and the VM's cores are busy enough booting.
            f'"{enroll_python}" -I -S "$D/enroll.py" "$D" "${{DSC_VM_ADDRESS:-0.0.0.0}}" '
            f'{int(enroll_port)} "$DEADLINE" >>"$D/log/enroll.log" 2>&1 </dev/null &',
            "ENROLL=$!",
        ]
    if runtime == "docker":
        if gpus:
            lines.append("step gpu-check gpu_check")
        provision = ["step docker-engine docker_engine", "step pull pull"]
    else:
        provision = ["step python-env python_env"]
    # An image built for exactly this (``dask secure-cloud image build``) skips them.
    lines += ["if ! provisioned; then", *(f"  {line}" for line in provision), "fi"]
    if extra_bootstrap:
        lines += ['STEP=extra-bootstrap; say "extra-bootstrap: started"', *extra_bootstrap]
        lines.append('say "extra-bootstrap: done"')
    # A native Dask process starts before the enrollment wait and imports Dask while
    # the VM is certified; it runs once the certificate is in place (``enroll.py
    # --start``). Only the ``dask`` command is sure to be in a container: it starts after.
    early = enroll_port is not None and runtime == "native"
    dask = _dask_process(role, launch, power_off_on_exit, waits_for_certificate=early)
    enrolled = ['step enroll wait "$ENROLL"', 'ENROLL=""'] if enroll_port is not None else []
    ready = ["STEP=dask", f'say "ready to start dask {role} after $(since "$T0")s"']
    lines += [*dask, *enrolled, *ready] if early else [*enrolled, *ready, *dask]
    lines.append("")
    return "\n".join(lines)


def _dask_process(
    role: str, launch: str, power_off_on_exit: bool, *, waits_for_certificate: bool
) -> list[str]:
    """The lines that run Dask in the background, report how it ended, and power off."""
    lines = [
        "(",
        "  set +e",
        # A local VM's own address, as the subshell's arguments: one word each, never
        # split or globbed (``launch`` ends with "$@").
        "  set --",
        '  if [ -n "${DSC_VM_ADDRESS:-}" ]; then set -- --host "$DSC_VM_ADDRESS"; fi',
        "  t=$(clock)",
        f'  {launch} >>"$D/dask.log" 2>&1 </dev/null',
        "  status=$?",
    ]
    if waits_for_certificate:
        # It never ran: the script reports the failed enrollment and powers off.
        lines.append('  if [ -e "$D/boot-failed" ]; then exit 0; fi')
    lines += [
        f'  say "dask {role} exited with status $status after $(since "$t")s"',
        '  if [ "$status" -ne 0 ]; then',
        # A chained traceback puts its cause far above the last lines: show the
        # error lines first.
        '    say "errors in its log ($D/dask.log):"',
        "    grep -E 'Error|Exception|Timed out|timed out' \"$D/dask.log\" | tail -n 15 |",
        "      sed 's/^/dask-secure-cloud: | /'",
        '    say "last lines of its log:"',
        "    tail -n 25 \"$D/dask.log\" | sed 's/^/dask-secure-cloud: | /'",
        "  fi",
    ]
    if power_off_on_exit:
        # The VM ends with its Dask process, so a killed client leaves no bill running.
        lines.append('  if [ -z "$LOCAL" ]; then say "powering off"; power_off now; fi')
    return [*lines, ") &"]
