"""A pip requirements file for ``runtime="native"`` VMs, read and checked on the client.

A team's environment is often one file (``requirements.txt``, or a lock file that
``pip-compile --generate-hashes`` or ``uv pip compile --generate-hashes`` wrote), not a
list typed into a cluster's options. The file travels in the VM's user-data and the VM
hands it to ``pip install -r``: pip reads it as data, no shell ever does.

Everything that would only fail on the VM, minutes into a boot, is refused here, before
anything is made, by the line that causes it:

- another file (``-r``, ``-c``, ``-e ./src``, ``./wheels/x.whl``): it is not on the VM;
- a conda environment file: the VM has pip, not conda;
- a pin of dask or distributed that is not this client's version: the VMs must run the
  client's (its functions are unpickled there), so pip would refuse the pair at boot;
- hash-checking (any ``--hash``) without dask and distributed pinned in the file: pip then
  wants every package hashed, and the boot script would have to add the client's two
  unhashed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from .errors import OptionError

#: pip's options a requirements file may hold, by whether they take a value.
_GLOBAL_OPTIONS = {
    "-i": True,
    "--index-url": True,
    "--extra-index-url": True,
    "--no-index": False,
    "-f": True,
    "--find-links": True,
    "--trusted-host": True,
    "--pre": False,
    "--prefer-binary": False,
    "--only-binary": True,
    "--no-binary": True,
    "--require-hashes": False,
}
#: Options of one requirement's line.
_REQUIREMENT_OPTIONS = ("--hash", "--config-settings")
#: Options naming another file, which is on the client, not on the VM.
_OTHER_FILES = {
    "-r": "another requirements file",
    "--requirement": "another requirements file",
    "-c": "a constraints file",
    "--constraint": "a constraints file",
    "-e": "an editable source tree",
    "--editable": "an editable source tree",
}
#: A comment: ``#`` at the start of a line or after white space (pip's own rule).
_COMMENT = re.compile(r"(^|\s+)#.*$")
#: The largest file read: user-data holds at most 16 KB on EC2, 64 KB elsewhere.
MAX_BYTES = 256 * 1024


@dataclasses.dataclass(frozen=True)
class RequirementsFile:
    """A requirements file as read once on the client: where it was, and its lines.

    ``text`` is what the VM gets: the file's logical lines, continuations joined and
    comments dropped, so the user-data carries requirements and not prose.
    """

    path: str
    text: str
    #: pip checks a hash of every package it installs (any ``--hash`` asks for that).
    hashed: bool
    #: The project names the file asks for, canonical (``typing-extensions``).
    names: frozenset[str]

    def __repr__(self) -> str:
        return f"RequirementsFile({self.path!r})"


def read(value: object, name: str, *, dask: str, distributed: str) -> RequirementsFile:
    """Read and check the file at ``value`` for VMs running ``dask`` and ``distributed``."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"{name} must be the path of a pip requirements file, got {value!r}")
    path = Path(value).expanduser()
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise OptionError(
                f"{name}: {value} is {size} bytes; a VM's user-data holds a few KB, so bake "
                f"large environments into an image (dask secure-cloud image build) or a "
                f"docker_image"
            )
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OptionError(
            f"{name}: there is no file {value!r} (relative paths are from "
            f"{Path.cwd()}); give the path of a pip requirements file"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"{name}: cannot read {value!r} as UTF-8 text ({e})") from None
    return parse(raw, f"{name} ({value})", path=str(path), dask=dask, distributed=distributed)


def parse(raw: str, where: str, *, path: str = "", dask: str, distributed: str) -> RequirementsFile:
    """Check ``raw`` line by line; ``where`` names the option and file in errors."""
    if _looks_like_conda(raw):
        raise OptionError(
            f"{where} is a conda environment file; VMs install with pip, not conda. Give a "
            f"pip requirements file (pip freeze, or the 'pip:' part of the environment), "
            f"or use runtime='docker' with a docker_image built from the environment"
        )
    kept: list[str] = []
    names: set[str] = set()
    hashed = False
    for number, line in _logical_lines(raw, where):
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise OptionError(f"{where}, line {number}: {line!r} cannot be read ({e})") from None
        if words[0].startswith("-"):
            hashed |= _check_global(words, where, number, line)
        else:
            requirement, hashes = _check_requirement(line, where, number)
            hashed |= hashes
            names.add(canonicalize_name(requirement.name))
            _check_pin(requirement, where, number, {"dask": dask, "distributed": distributed})
        kept.append(line)
    if not names:
        raise OptionError(f"{where} names no requirement; give at least one, such as 'pandas>=2'")
    if hashed and not {"dask", "distributed"} <= names:
        raise OptionError(
            f"{where} checks hashes, so pip will install nothing unhashed, and the VMs need "
            f"this client's dask=={dask} and distributed=={distributed}: add both, with "
            f"their hashes, to the file (pip-compile or uv pip compile with "
            f"--generate-hashes, listing dask=={dask} and distributed=={distributed})"
        )
    return RequirementsFile(path, "".join(f"{line}\n" for line in kept), hashed, frozenset(names))


def _looks_like_conda(raw: str) -> bool:
    """``dependencies:`` (or ``channels:``) at the start of a line: an environment.yml."""
    return any(re.match(r"(dependencies|channels)\s*:", line) for line in raw.splitlines())


def _logical_lines(raw: str, where: str) -> list[tuple[int, str]]:
    """Lines as pip reads them: a trailing backslash joins the next; comments dropped."""
    lines: list[tuple[int, str]] = []
    pending, first = "", 0
    for number, line in enumerate(raw.splitlines(), start=1):
        if pending:
            line = line.lstrip()
        else:
            first = number
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        _keep(lines, first, pending + line, where)
        pending = ""
    _keep(lines, first, pending, where)
    return lines


def _keep(lines: list[tuple[int, str]], number: int, line: str, where: str) -> None:
    text = _COMMENT.sub("", line.replace("\t", " ")).strip()
    if not text:
        return
    if not text.isprintable():
        raise OptionError(f"{where}, line {number}: {text!r} holds a control character")
    lines.append((number, text))


def _check_global(words: list[str], where: str, number: int, line: str) -> bool:
    """A line of pip options; True when it asks for hash-checking."""
    option, _, attached = words[0].partition("=")
    if option in _OTHER_FILES:
        raise OptionError(
            f"{where}, line {number}: {line!r} names {_OTHER_FILES[option]}, which is on this "
            f"machine, not on the VMs: put its requirements in this file (an editable project: "
            f"publish it, or name it as 'pkg @ git+https://...')"
        )
    if option not in _GLOBAL_OPTIONS:
        raise OptionError(
            f"{where}, line {number}: pip option {option!r} is not one a requirements file for "
            f"the VMs may hold ({', '.join(sorted(_GLOBAL_OPTIONS))}); set others through "
            f"env_vars (PIP_...)"
        )
    takes_value = _GLOBAL_OPTIONS[option]
    given = 1 if attached else len(words) - 1
    if (takes_value and given != 1) or (not takes_value and (attached or len(words) > 1)):
        raise OptionError(
            f"{where}, line {number}: {line!r}: {option} takes "
            f"{'one value' if takes_value else 'no value'}"
        )
    return option == "--require-hashes"


def _check_requirement(line: str, where: str, number: int) -> tuple[Requirement, bool]:
    """A requirement and its own options; True when it carries a hash."""
    text, options = _split_options(line)
    try:
        requirement = Requirement(text)
    except InvalidRequirement as e:
        why = str(e).splitlines()[0]
        local = text.startswith((".", "/", "~", "file:")) or text.endswith((".whl", ".tar.gz"))
        fix = (
            "a file on this machine is not on the VMs: publish it or name it as 'pkg @ https://...'"
            if local
            else "write a PEP 508 requirement such as 'pandas>=2' or 'pkg @ https://...'"
        )
        raise OptionError(
            f"{where}, line {number}: {text!r} is not a requirement ({why}); {fix}"
        ) from None
    if requirement.url and requirement.url.startswith("file:"):
        raise OptionError(
            f"{where}, line {number}: {text!r} is a file on this machine, not on the VMs: "
            f"publish it or name it as 'pkg @ https://...'"
        )
    hashed = False
    for option in options:
        name, equals, value = option.partition("=")
        if name not in _REQUIREMENT_OPTIONS or not equals or not value:
            raise OptionError(
                f"{where}, line {number}: {option!r} is not an option a requirement may carry "
                f"here (--hash=sha256:..., --config-settings=key=value)"
            )
        hashed |= name == "--hash"
    return requirement, hashed


def _split_options(line: str) -> tuple[str, list[str]]:
    """``pkg==1 --hash=sha256:ab`` -> (``pkg==1``, [``--hash=sha256:ab``])."""
    match = re.search(r"\s--?[A-Za-z]", line)
    if match is None:
        return line, []
    words = shlex.split(line[match.start() :])
    joined: list[str] = []
    for word in words:  # --hash sha256:ab -> --hash=sha256:ab
        if joined and "=" not in joined[-1] and not word.startswith("-"):
            joined[-1] += "=" + word
        else:
            joined.append(word)
    return line[: match.start()].strip(), joined


def _check_pin(requirement: Requirement, where: str, number: int, wanted: dict[str, str]) -> None:
    """dask and distributed, if named, must admit the client's own versions."""
    name = canonicalize_name(requirement.name)
    version = wanted.get(name, "")
    if not version:
        return
    release = version.split("+")[0]
    if requirement.url or not requirement.specifier.contains(release, prereleases=True):
        raise OptionError(
            f"{where}, line {number}: {str(requirement)!r} does not admit this client's "
            f"{name} {release}; the VMs run the client's version (its tasks are unpickled "
            f"there): pin {name}=={release} or leave {name} out"
        )
