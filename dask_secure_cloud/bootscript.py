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

import shlex
from collections.abc import Sequence

from .errors import OptionError

__all__ = ["STEP_PREFIX", "render_script"]

#: Every line the script prints starts with this, so a console is easy to search.
STEP_PREFIX = "dask-secure-cloud:"

# Shell functions, in POSIX sh (dash on Debian and Ubuntu, busybox ash elsewhere: no
# arrays, no ``local``, no ``$SECONDS``). A script carries only the parts its runtime uses.
_COMMON = r"""
say() { echo "dask-secure-cloud: $*"; }
clock() {
  if [ -r /proc/uptime ]; then read -r up _ </proc/uptime; echo "$up"; else date +%s; fi
}
since() { awk -v a="$1" -v b="$(clock)" 'BEGIN { printf "%.1f", b - a }'; }
past_deadline() { [ "$(date +%s)" -ge "$DEADLINE" ]; }
power_off() {
  [ -n "$LOCAL" ] && return 0
  shutdown -h "$1" >/dev/null 2>&1 || poweroff
}
on_exit() {
  rc=$?
  [ "$rc" -eq 0 ] && return
  # A failed boot ends the enrollment still waiting (it may have ended already), and
  # the Dask process waiting for it.
  if [ -n "${ENROLL:-}" ]; then kill "$ENROLL" 2>/dev/null || true; fi
  { : >"$D/boot-failed"; } 2>/dev/null || true
  say "boot FAILED at step $STEP (exit $rc) after $(since "$T0")s"
  # A short grace keeps the console readable for whoever is attached to it.
  if [ -z "$LOCAL" ]; then say "powering off in 30s"; (sleep 30; power_off now) & fi
}
# step NAME COMMAND...: run one step with its output in $D/log/NAME.log; the step may
# print a progress line on the console (this script's output) through file descriptor 3.
step() {
  STEP=$1; shift
  t=$(clock)
  say "$STEP: started"
  if "$@" 3>&1 >>"$D/log/$STEP.log" 2>&1; then
    say "$STEP: done in $(since "$t")s"
  else
    rc=$?
    say "$STEP: FAILED in $(since "$t")s (exit $rc); last lines of its log:"
    tail -n 30 "$D/log/$STEP.log" | sed 's/^/dask-secure-cloud: | /'
    exit "$rc"
  fi
}
# retry COMMAND...: 4 attempts with growing pauses (30 s in all), within the deadline:
# enough for a mirror's hiccup, short enough that no route out fails the boot fast.
retry() {
  n=1
  until "$@"; do
    if [ "$n" -ge 4 ]; then echo "giving up after $n attempts"; return 1; fi
    if past_deadline; then echo "giving up after $n attempts: boot deadline reached"; return 1; fi
    echo "attempt $n failed; retrying in $((n * 5))s"
    sleep $((n * 5)); n=$((n + 1))
  done
}
apt_install() {
  if [ -n "$LOCAL" ]; then
    echo "would need $*, but never installs system packages on this machine (a local VM)"
    return 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "needs $*, but this image has no apt-get: use an image that has them"
    return 1
  fi
  say "$STEP: installing from the distribution's packages: $*" >&3
  export DEBIAN_FRONTEND=noninteractive
  # The dpkg lock is held by unattended-upgrades on a cloud VM's first boot: wait for it.
  retry apt-get -q -o DPkg::Lock::Timeout=300 -o APT::Update::Error-Mode=any update &&
    retry apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends "$@"
}
"""
_DOCKER = r"""
docker_engine() {
  if command -v docker >/dev/null 2>&1; then
    echo "already installed: $(docker --version)"
  else
    # With AppArmor on in the kernel, docker refuses to run a container unless it can
    # load its profile, and apparmor is only a Recommends of docker.io.
    set -- docker.io
    if [ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" = Y ] &&
      ! command -v apparmor_parser >/dev/null 2>&1; then
      set -- "$@" apparmor
    fi
    apt_install "$@" || return 1
  fi
  if [ -z "$LOCAL" ] && command -v systemctl >/dev/null 2>&1; then
    systemctl start docker || return 1
  fi
  n=0
  until docker info >/dev/null 2>&1; do
    n=$((n + 1))
    if [ "$n" -gt 60 ]; then docker info; return 1; fi
    sleep 1
  done
}
pull() {
  n=1
  until docker pull -q "$IMAGE" >"$D/log/pull.out" 2>&1; do
    cat "$D/log/pull.out"
    # A tag the registry does not have will not appear by retrying.
    if grep -qiE 'manifest unknown|not found|does not exist' "$D/log/pull.out"; then
      echo "the image $IMAGE does not exist: set docker_image to an image that does,"
      echo "or runtime='native' to install this client's dask on the VM"
      return 1
    fi
    if [ "$n" -ge 6 ]; then echo "giving up after $n attempts"; return 1; fi
    if past_deadline; then echo "giving up after $n attempts: boot deadline reached"; return 1; fi
    echo "attempt $n failed; retrying in $((n * 5))s"
    sleep $((n * 5)); n=$((n + 1))
  done
  cat "$D/log/pull.out"
}
"""
_GPU = r"""
gpu_check() {
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "this VM asks for GPUs but its image has no NVIDIA driver (no nvidia-smi): use a"
    echo "GPU image with the driver and the NVIDIA container toolkit (see the docs page of"
    echo "your cloud for one), or a worker type without GPUs"
    return 1
  fi
  nvidia-smi -L || return 1
  for tool in nvidia-ctk nvidia-container-runtime nvidia-container-toolkit; do
    command -v "$tool" >/dev/null 2>&1 && return 0
  done
  echo "the image has the NVIDIA driver but not the NVIDIA container toolkit, which"
  echo "docker --gpus needs: use a GPU image that has it (see the docs page of your cloud)"
  return 1
}
"""
_NATIVE = r"""
has_wanted_dask() {
  "$1" - "$WANT_DASK" "$WANT_DISTRIBUTED" <<'PY' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    have = (version("dask"), version("distributed"))
except PackageNotFoundError:
    sys.exit(1)
want = tuple(sys.argv[1:3])
sys.exit(0 if all(w in ("", h) for w, h in zip(want, have)) else 1)
PY
}
python_env() {
  if [ ! -e "$D/requirements.txt" ] && has_wanted_dask "$PY"; then
    echo "$PY already has dask ${WANT_DASK:-(any)} and distributed ${WANT_DISTRIBUTED:-(any)}"
    return 0
  fi
  if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # Ubuntu's and Debian's cloud images ship python3 without venv.
    apt_install python3-venv || return 1
  fi
  if [ ! -x "$D/venv/bin/python" ]; then
    # System site-packages stay visible: whatever the image has baked in is kept.
    "$PY" -m venv --system-site-packages "$D/venv" || return 1
  fi
  # A development build's local version (+g1234) is not on an index: pin its release.
  set -- "dask${WANT_DASK:+==${WANT_DASK%%+*}}" \
    "distributed${WANT_DISTRIBUTED:+==${WANT_DISTRIBUTED%%+*}}"
  # pip_packages, one requirement a line: each line is one argument, never split,
  # expanded or parsed by this shell (nor by pip's requirements-file syntax).
  if [ -e "$D/requirements.txt" ]; then
    while IFS= read -r req || [ -n "$req" ]; do set -- "$@" "$req"; done <"$D/requirements.txt"
  fi
  retry "$D/venv/bin/python" -m pip install -q --disable-pip-version-check \
    --retries 3 --timeout 30 "$@" || return 1
  "$D/venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null |
    grep -iE '^(dask|distributed) '
  PY="$D/venv/bin/python"
}
"""


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
        lines += ["step docker-engine docker_engine", "step pull pull"]
    else:
        lines.append("step python-env python_env")
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
        'HOST_ARGS=""',
        'if [ -n "${DSC_VM_ADDRESS:-}" ]; then HOST_ARGS="--host $DSC_VM_ADDRESS"; fi',
        "(",
        "  set +e",
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
