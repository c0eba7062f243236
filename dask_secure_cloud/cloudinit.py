"""Turn a VM's boot plan into ``#cloud-config`` user-data, and check it fits.

Everything a VM needs arrives as files: the CA certificate and the VM's single-use
enrollment token (it makes its own key at boot, see ``enroll.py``), the allow-listed
dask config and a small boot script. ``runcmd`` only starts that script, so nothing
shows on a command line, in an environment variable or in ``ps``. Only a user's own
``Security`` puts a private key in user-data: it was made elsewhere, so it must travel.

The boot script honours two variables that only a local VM runner sets (a real
cloud-init leaves them unset): ``DSC_VM_ROOT``, under which every file was written, and
``DSC_VM_ADDRESS``, the address the VM's process must listen on. When ``DSC_VM_ROOT`` is
set the script never powers the machine off, because it is not running on a VM of its
own.

No user value is ever code in the boot script. Dask's flags (``worker_options``,
``scheduler_options``) are single-quoted words; ``env_vars`` are single-quoted values in
a file (native) or ``docker --env-file`` lines, taken verbatim; ``pip_packages`` are a
file read one argument a line. A value that needs the VM's Dask directory says
:data:`VM_DIR` (``{vm_dir}``): the renderer splits the value there and puts our own
``"$D"`` (the directory as the Dask process sees it) between single-quoted pieces, so
the shell expands only that variable, never anything the user wrote. Only
``extra_bootstrap`` is shell: it is the user's own script, by design.

This module knows neither Dask's API nor any cloud: it renders text and measures it.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import preloads
from .bootscript import render_script
from .credentials import LeafCredentials, Role
from .errors import OptionError, UserDataTooLarge
from .options.shared import check_requirements
from .registry import PROVIDERS, UserDataLimit
from .requirements_file import RequirementsFile

__all__ = [
    "LIMITS",
    "VM_DIR",
    "VM_HOME",
    "BootPlan",
    "DockerRuntime",
    "EnrollmentTicket",
    "NativeRuntime",
    "UserDataLimit",
    "UserDataTooLarge",
    "render",
]

#: Where everything of ours lives on a VM: one directory, 0700.
VM_HOME = "/opt/dask-secure-cloud"
#: Inside a container the VM_HOME directory is mounted at the same path.
_CONTAINER_HOME = VM_HOME
#: Written in a ``worker_options``, ``scheduler_options`` or ``env_vars`` value, stands
#: for the VM's Dask directory as the Dask process sees it (``{vm_dir}/spill``). It is
#: put in by the renderer, never by a shell reading the user's text.
VM_DIR = "{vm_dir}"
#: What VM_DIR becomes for a native Dask process: the boot script's own directory.
_NATIVE_HOME = '"$D"'
#: Environment variable names a shell takes: portable, ASCII.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The boot script's own variables (and the shell's): an ``env_vars`` entry of that name
#: would redirect the script (``PY``, ``D``) once its environment file is read.
_SCRIPT_VARIABLES = frozenset(
    {
        *("D", "PY", "IMAGE", "LOCAL", "DEADLINE", "STEP", "T0", "ENROLL", "HOST_ARGS"),
        *("WANT_DASK", "WANT_DISTRIBUTED", "DASK_CONFIG", "DSC_VM_ROOT", "DSC_VM_ADDRESS"),
        *("IFS", "PS4", "ENV"),
    }
)
_HEADER = "#cloud-config\n"


#: Each provider's user-data limit (see registry.PROVIDERS).
LIMITS: dict[str, UserDataLimit] = {name: p.user_data for name, p in PROVIDERS.items()}


@dataclass(frozen=True)
class DockerRuntime:
    """Run the Dask process in a container image (the default on clouds)."""

    image: str
    gpus: bool = False

    def __post_init__(self) -> None:
        if not self.image or self.image.startswith("-") or not self.image.isprintable():
            raise OptionError(
                f"docker_image must be an image reference such as "
                f"'ghcr.io/dask/dask:2024.8.0-py3.11', got {self.image!r}"
            )
        if any(c.isspace() for c in self.image):
            raise OptionError(f"docker_image must be an image reference, got {self.image!r}")


@dataclass(frozen=True)
class NativeRuntime:
    """Run the Dask process with the image's Python.

    When that interpreter lacks ``dask_version``/``distributed_version`` (empty: any
    version will do), or ``pip_packages`` or a ``requirements_file`` are asked for, the VM
    makes a virtualenv and installs them at boot.
    """

    python: str = "python3"
    dask_version: str = ""
    distributed_version: str = ""
    pip_packages: tuple[str, ...] = ()
    requirements_file: RequirementsFile | None = None

    def __post_init__(self) -> None:
        if not self.python or self.python.startswith("-") or not self.python.isprintable():
            raise OptionError(
                f"python must be an interpreter's name or path such as 'python3' or "
                f"'/usr/bin/python3.12', got {self.python!r}"
            )
        check_requirements(self.pip_packages, "pip_packages")
        if self.pip_packages and self.requirements_file and self.requirements_file.hashed:
            raise OptionError(
                "a requirements_file with hashes installs nothing unhashed: put "
                "pip_packages in it, with their hashes"
            )


@dataclass(frozen=True, repr=False)
class EnrollmentTicket:
    """What a VM needs to get its certificate: the CA's certificate, to check what it is
    given, and its single-use token, to prove who it is (see ``enrollment.py``)."""

    ca_pem: str
    token: str
    #: Where the VM answers the client (the scheduler's port, on every VM).
    port: int

    def __repr__(self) -> str:
        return f"EnrollmentTicket(port={self.port})"


@dataclass(frozen=True)
class BootPlan:
    """Everything one VM needs to start its Dask process.

    ``command`` is the Dask server and its arguments, for example
    ``("worker", "tls://10.0.0.4:8786", "--nthreads", "2")``: the renderer adds how to
    launch it (container or native) and where the TLS files are.
    """

    cluster_id: str
    role: Role
    name: str
    command: tuple[str, ...]
    runtime: DockerRuntime | NativeRuntime
    #: The cluster's own CA: the VM enrols at boot with this ticket.
    enroll: EnrollmentTicket | None = None
    #: A user's own ``Security``: its certificate and key, shipped as given.
    tls: LeafCredentials | None = None
    dask_config: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    extra_bootstrap: tuple[str, ...] = ()
    power_off_on_exit: bool = True
    #: The port of the Dask process's HTTP server (the scheduler's dashboard; a worker's
    #: ``/health`` and ``/metrics``), 0 for any; ``None`` leaves Dask's default.
    dashboard_port: int | None = None
    #: Where that server listens on a VM: ``"127.0.0.1"`` for the VM itself only (the
    #: client reaches the scheduler's through a tunnel), ``""`` for every interface.
    dashboard_host: str = ""
    #: Python files (name -> source) that the Dask process loads with ``--preload``.
    preloads: Mapping[str, str] = field(default_factory=dict)
    #: Of ``preloads``, those a worker's nanny loads too (``--preload-nanny``).
    nanny_preloads: tuple[str, ...] = ()
    #: Seconds the VM may spend provisioning before its retries give up.
    boot_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.role not in (Role.SCHEDULER, Role.WORKER):
            raise OptionError(f"a VM is a scheduler or a worker, not {self.role!r}")
        if self.tls is not None and self.enroll is not None:
            raise OptionError(f"{self.name}: a VM enrols or is given a key, not both")
        if self.tls is not None and self.tls.role != self.role:
            raise OptionError(
                f"{self.name}: a {self.role.value} VM was given a {self.tls.role.value} certificate"
            )
        for key in self.env:
            if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
                raise OptionError(
                    f"env_vars: {key!r} is not a valid variable name: use ASCII letters, "
                    "digits and '_', not starting with a digit"
                )
            if key in _SCRIPT_VARIABLES:
                raise OptionError(
                    f"env_vars: {key!r} is a variable of the VM's boot script itself; "
                    "name it otherwise"
                )
        for name in self.preloads:
            if not name.endswith(".py") or "/" in name:
                raise OptionError(f"preload names are plain .py file names, got {name!r}")
        for name in self.nanny_preloads:
            if name not in self.preloads:
                raise OptionError(f"nanny preload {name!r} is not one of the preloads")


class _Literal(str):
    """A string that YAML renders as a ``|`` block, so user-data stays readable."""


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """libyaml's emitter where PyYAML has it: every VM's user-data is emitted, and the
    pure-Python one takes over 10 ms for each."""


_Dumper.add_representer(
    _Literal, lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:str", str(data), "|")
)


def _file(path: str, content: str, permissions: str, pack: bool = True) -> dict[str, Any]:
    """A ``write_files`` entry, compressed with gz+b64 when ``pack`` is set and that makes
    it smaller."""
    raw = content.encode()
    packed = base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode()
    entry: dict[str, Any] = {"path": path, "permissions": permissions}
    if pack and len(packed) + 16 < len(raw):
        entry.update(encoding="gz+b64", content=packed)
    else:
        entry["content"] = _Literal(content) if "\n" in content else content
    return entry


def _env_file(env: Mapping[str, str], runtime: DockerRuntime | NativeRuntime) -> str:
    """The Dask process's environment file: ``docker --env-file`` lines, taken verbatim
    by Docker, or (native) single-quoted shell assignments the boot script reads."""
    if isinstance(runtime, DockerRuntime):
        for key, value in env.items():
            if "\n" in value or "\r" in value:
                raise OptionError(f"env_vars: {key} holds a newline, which docker cannot pass")
        return "".join(f"{k}={v.replace(VM_DIR, _CONTAINER_HOME)}\n" for k, v in env.items())
    return "".join(f"{k}={_shell_word(v, _NATIVE_HOME)}\n" for k, v in env.items())


def _shell_word(value: str, home: str) -> str:
    """``value`` as one shell word that the shell takes as data: single-quoted, with each
    :data:`VM_DIR` replaced by ``home`` (a word of ours: ``"$D"``, or a quoted path)."""
    return home.join(shlex.quote(part) if part else "" for part in value.split(VM_DIR)) or "''"


def _launch_line(plan: BootPlan) -> str:
    """The shell line that starts the Dask process, TLS paths added."""
    role = plan.role.value
    if isinstance(plan.runtime, DockerRuntime):
        home = _CONTAINER_HOME
        prefix = [
            "docker",
            "run",
            "--rm",
            "--name",
            f"dask-{role}",
            "--network",
            "host",
            "-v",
            f"$D:{home}",
            "-e",
            f"DASK_CONFIG={home}/config",
        ]
        if plan.env:
            prefix += ["--env-file", "$D/env"]
        if plan.runtime.gpus:
            prefix += ["--gpus", "all"]
        prefix += ["$IMAGE", "dask", role]
        vm_dir = shlex.quote(_CONTAINER_HOME)
    else:
        home = "$D"
        vm_dir = _NATIVE_HOME
        # $PY: the interpreter the boot script's python-env step settled on. An enrolling
        # VM starts it early, to import Dask while it waits for its certificate.
        start = ["$D/enroll.py", "--start", "$D", "$DEADLINE"] if plan.enroll else ["-m"]
        prefix = ["$PY", *start, f"distributed.cli.dask_{role}"]
    if plan.command and plan.command[0] != role:
        raise OptionError(f"{plan.name}: command must start with {role!r}: {plan.command!r}")
    # The plan's command (the user's worker_options and scheduler_options among it) is
    # data: each word single-quoted, whatever it holds; only VM_DIR becomes ours.
    user = [_shell_word(word, vm_dir) for word in plan.command[1:]]
    args: list[str] = []
    for name in sorted(plan.preloads):
        args += ["--preload", f"{home}/preload/{name}"]
    if plan.role is Role.WORKER:
        for name in plan.nanny_preloads:
            args += ["--preload-nanny", f"{home}/preload/{name}"]
    if plan.tls is not None or plan.enroll is not None:
        # An enrolled VM's node.pem holds its certificate and key together, so that a
        # renewal replaces both in one rename.
        key = "node.pem" if plan.enroll is not None else "node.key"
        args += [
            "--tls-ca-file",
            f"{home}/tls/ca.pem",
            "--tls-cert",
            f"{home}/tls/node.pem",
            "--tls-key",
            f"{home}/tls/{key}",
        ]

    def ours(word: str) -> str:
        # Our own words: a leading variable of the script ("$D", "$PY") expands, the
        # rest ("/tls/ca.pem") is literal.
        match = re.fullmatch(r"\$([A-Z_]+)(.*)", word, re.DOTALL)
        if match is None:
            return shlex.quote(word)
        rest = match.group(2)
        return f'"${match.group(1)}"' + (shlex.quote(rest) if rest else "")

    words = [ours(w) for w in prefix] + user + [ours(w) for w in args]
    line = " ".join(words) + ' "$@"'
    if plan.dashboard_port is not None:
        # Loopback stays loopback on a process VM too (this machine's stands in for the
        # VM's); only "every interface" becomes a process VM's own address.
        host = plan.dashboard_host or "${DSC_VM_ADDRESS:-}"
        line += f' --dashboard-address "{host}:{plan.dashboard_port}"'
    return line


def _boot_script(plan: BootPlan) -> str:
    prepare = [
        'chmod 700 "$D"' + (' "$D/tls"' if plan.tls or plan.enroll else ""),
        'export DASK_CONFIG="$D/config"',
    ]
    if plan.env and isinstance(plan.runtime, NativeRuntime):
        # Written with the script, read at boot: nothing for shellcheck to follow.
        prepare += ["set -a", "# shellcheck source=/dev/null", '. "$D/env"', "set +a"]
    runtime = plan.runtime
    common = dict(
        home=VM_HOME,
        header=f"dask-secure-cloud: {plan.role.value} {plan.name} of cluster {plan.cluster_id}",
        boot_timeout=plan.boot_timeout,
        launch=_launch_line(plan),
        role=plan.role.value,
        prepare=prepare,
        extra_bootstrap=plan.extra_bootstrap,
        power_off_on_exit=plan.power_off_on_exit,
        enroll_port=plan.enroll.port if plan.enroll else None,
    )
    if isinstance(runtime, DockerRuntime):
        return render_script(runtime="docker", image=runtime.image, gpus=runtime.gpus, **common)
    return render_script(
        runtime="native",
        python=runtime.python,
        want_dask=runtime.dask_version,
        want_distributed=runtime.distributed_version,
        **common,
    )


def _document(plan: BootPlan, pack: bool = True) -> dict[str, Any]:
    files: list[dict[str, Any]] = []
    if plan.tls is not None:
        files += [
            _file(f"{VM_HOME}/tls/ca.pem", plan.tls.ca_pem, "0600", pack),
            _file(f"{VM_HOME}/tls/node.pem", plan.tls.cert_pem, "0600", pack),
            _file(f"{VM_HOME}/tls/node.key", plan.tls.key_pem, "0600", pack),
        ]
    if plan.enroll is not None:
        ticket = json.dumps({"name": plan.name, "token": plan.enroll.token})
        files += [
            _file(f"{VM_HOME}/tls/ca.pem", plan.enroll.ca_pem, "0600", pack),
            _file(f"{VM_HOME}/tls/enroll.json", ticket, "0600", pack),
            _file(f"{VM_HOME}/enroll.py", preloads.enroll_script(), "0600", pack),
        ]
    config_text = yaml.safe_dump(dict(plan.dask_config), sort_keys=True) if plan.dask_config else ""
    files.append(_file(f"{VM_HOME}/config/dask.yaml", config_text or "{}\n", "0600", pack))
    if plan.env:
        files.append(_file(f"{VM_HOME}/env", _env_file(plan.env, plan.runtime), "0600", pack))
    if isinstance(plan.runtime, NativeRuntime) and plan.runtime.pip_packages:
        # One a line, read by the boot script as data: each is one argument of pip.
        requirements = "".join(f"{r}\n" for r in plan.runtime.pip_packages)
        files.append(_file(f"{VM_HOME}/requirements.txt", requirements, "0600", pack))
    if isinstance(plan.runtime, NativeRuntime) and plan.runtime.requirements_file is not None:
        # Read by pip itself (``-r``); with hashes, alone (``--require-hashes``).
        chosen = plan.runtime.requirements_file
        name = _REQUIREMENTS_FILES[1] if chosen.hashed else _REQUIREMENTS_FILES[0]
        files.append(_file(f"{VM_HOME}/{name}", chosen.text, "0600", pack))
    for name, source in sorted(plan.preloads.items()):
        files.append(_file(f"{VM_HOME}/preload/{name}", source, "0600", pack))
    files.append(_file(f"{VM_HOME}/boot.sh", _boot_script(plan), "0700", pack))
    return {
        "write_files": files,
        "runcmd": [f'sh "${{DSC_VM_ROOT:-}}{VM_HOME}/boot.sh"'],
    }


def render(plan: BootPlan, limit: UserDataLimit | None = None) -> bytes:
    """Render ``plan`` as ``#cloud-config`` user-data bytes.

    With ``limit``, raise :class:`UserDataTooLarge` when the result does not fit, naming
    the limit and the largest parts so the caller knows what to trim.
    """
    whole = limit is not None and limit.gzip
    document = _document(plan, pack=not whole)
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=1 << 16)
    user_data = (_HEADER + body).encode()
    if whole:
        user_data = gzip.compress(user_data, compresslevel=9, mtime=0)
    if limit is not None:
        check_size(user_data, limit, document)
    return user_data


def check_size(
    user_data: bytes, limit: UserDataLimit, document: Mapping[str, Any] | None = None
) -> None:
    size = limit.measure(user_data)
    if size <= limit.max_bytes:
        return
    parts = ""
    fix = "Shorten extra_bootstrap or env_vars, or install software in the image instead."
    if document is not None:
        sizes = sorted(
            ((len(str(f["content"])), f["path"]) for f in document.get("write_files", [])),
            reverse=True,
        )
        parts = "; largest parts: " + ", ".join(f"{p} ({n:,} B)" for n, p in sizes[:3])
        if sizes and sizes[0][1].rsplit("/", 1)[-1] in _REQUIREMENTS_FILES:
            # An image build carries the same file in its builder's user-data.
            fix = (
                "The largest is requirements_file's: on this cloud install it into a "
                "docker_image instead, or ship a file without hashes (a lock file holds "
                "a hash of every wheel of every platform, and hashes do not compress)."
            )
    raise UserDataTooLarge(
        f"user-data is {size:,} bytes but {limit.cloud} allows {limit.max_bytes:,}{parts}. {fix}"
    )


#: What ``requirements_file`` becomes on a VM (plain, hash-checked).
_REQUIREMENTS_FILES = ("requirements-file.txt", "requirements.lock")


def parse(user_data: bytes) -> dict[str, Any]:
    """Read ``#cloud-config`` user-data (gzip-compressed or not) back into a dict."""
    if user_data[:2] == b"\x1f\x8b":
        user_data = gzip.decompress(user_data)
    text = user_data.decode()
    if not text.startswith("#cloud-config"):
        raise OptionError("user-data is not a #cloud-config document")
    document = yaml.safe_load(text)
    if not isinstance(document, dict):
        raise OptionError("user-data #cloud-config must be a mapping")
    return document


def decode_file(entry: Mapping[str, Any]) -> bytes:
    """The bytes a ``write_files`` entry stands for, whatever its encoding."""
    content = entry.get("content", "")
    encoding = str(entry.get("encoding", "text")).lower()
    if encoding in ("gz+b64", "gzip+base64", "gz+base64", "gzip+b64"):
        return gzip.decompress(base64.b64decode(content))
    if encoding in ("b64", "base64"):
        return base64.b64decode(content)
    if encoding in ("gz", "gzip"):
        return gzip.decompress(content if isinstance(content, bytes) else content.encode())
    if encoding == "text":
        return content.encode() if isinstance(content, str) else bytes(content)
    raise OptionError(f"write_files: unknown encoding {encoding!r}")


def secrets_in(user_data: bytes) -> Sequence[str]:
    """Paths of written files that hold a private key (for tests and redaction)."""
    return [
        f["path"]
        for f in parse(user_data).get("write_files", [])
        if b"PRIVATE KEY" in decode_file(f)
    ]
