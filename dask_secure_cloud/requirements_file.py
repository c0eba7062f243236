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
- hash-checking (any ``--hash``) with a requirement pip cannot check (not pinned with
  ``==``, without a hash, a version-control checkout) or without dask and distributed:
  pip then installs nothing unhashed, so the boot script cannot add the client's two.

The file is read as pip reads it (its ``join_lines`` and ``break_args_options``), so a
file pip takes is taken here too, and what is shipped is what was checked.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import re
import shlex
import urllib.parse
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
#: The largest file read: the largest user-data of any cloud (Compute Engine's 256 KB).
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
                f"{name}: {value} is {size} bytes, more than any cloud's user-data holds: "
                f"use a docker_image built from it"
            )
        raw = _decode(path.read_bytes())
    except FileNotFoundError:
        raise OptionError(
            f"{name}: there is no file {value!r} (relative paths are from "
            f"{Path.cwd()}); give the path of a pip requirements file"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"{name}: cannot read {value!r} as text ({e})") from None
    return parse(raw, f"{name} ({value})", path=str(path), dask=dask, distributed=distributed)


#: Byte-order marks, as pip tells a file's encoding by them (UTF-32's before UTF-16's,
#: whose mark begins UTF-32LE's): ``pip freeze > requirements.txt`` in Windows
#: PowerShell 5 writes UTF-16.
_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _decode(data: bytes) -> str:
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    return data.decode(encoding)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One requirement line: where it is, what it asks for, its hashes' algorithms."""

    number: int
    text: str
    requirement: Requirement
    algorithms: tuple[str, ...]


def parse(raw: str, where: str, *, path: str = "", dask: str, distributed: str) -> RequirementsFile:
    """Check ``raw`` line by line; ``where`` names the option and file in errors."""
    raw = raw.removeprefix("\ufeff")  # a byte-order mark that was decoded as text
    if _looks_like_conda(raw):
        raise OptionError(
            f"{where} is a conda environment file; VMs install with pip, not conda. Give a "
            f"pip requirements file (its 'pip:' part, or 'pip list --format=freeze' in the "
            f"environment), or use runtime='docker' with a docker_image built from it"
        )
    kept: list[str] = []
    entries: list[_Entry] = []
    require_hashes = False
    for number, line in _logical_lines(raw, where):
        args, options = _break(line)
        try:
            words = shlex.split(options)
        except ValueError as e:
            raise OptionError(f"{where}, line {number}: {line!r} cannot be read ({e})") from None
        if not args:
            require_hashes |= _check_options_line(words, where, number, line)
            kept.append(" ".join(shlex.quote(w) for w in words))
            continue
        requirement = _check_requirement(args, where, number)
        algorithms = _check_requirement_options(words, where, number)
        _check_pin(requirement, where, number, {"dask": dask, "distributed": distributed})
        entries.append(_Entry(number, args, requirement, algorithms))
        kept.append(" ".join([args, *(shlex.quote(w) for w in words)]))
    if not entries:
        raise OptionError(f"{where} names no requirement; give at least one, such as 'pandas>=2'")
    hashed = require_hashes or any(e.algorithms for e in entries)
    names = frozenset(canonicalize_name(e.requirement.name) for e in entries)
    if hashed:
        _check_hash_checked(entries, names, where, dask=dask, distributed=distributed)
    return RequirementsFile(path, "".join(f"{line}\n" for line in kept), hashed, names)


def _looks_like_conda(raw: str) -> bool:
    """``dependencies:`` (or ``channels:``) at the start of a line: an environment.yml."""
    return any(re.match(r"(dependencies|channels)\s*:", line) for line in raw.splitlines())


def _logical_lines(raw: str, where: str) -> list[tuple[int, str]]:
    """Lines as pip reads them (its ``join_lines``): a line ending in a backslash is
    joined to the next, with the backslash dropped and nothing added, unless it is a
    comment; then comments are dropped."""
    lines: list[tuple[int, str]] = []
    joined: list[str] = []
    first = 0
    for number, line in enumerate(raw.splitlines(), start=1):
        comment = _COMMENT.match(line) is not None
        if line.endswith("\\") and not comment:
            if not joined:
                first = number
            joined.append(line.strip("\\"))
            continue
        if joined:
            _keep(lines, first, "".join(joined) + (" " + line if comment else line), where)
            joined = []
        else:
            _keep(lines, number, line, where)
    if joined:
        _keep(lines, first, "".join(joined), where)
    return lines


def _keep(lines: list[tuple[int, str]], number: int, line: str, where: str) -> None:
    text = _COMMENT.sub("", line.replace("\t", " ")).strip()
    if not text:
        return
    if not text.isprintable():
        raise OptionError(f"{where}, line {number}: {text!r} holds a control character")
    lines.append((number, text))


def _break(line: str) -> tuple[str, str]:
    """A line's requirement and its options, split where pip splits them: at the first
    space-separated word that starts with ``-`` (a requirement's markers are not read as
    shell words, which would mangle them)."""
    words = line.split(" ")
    for index, word in enumerate(words):
        if word.startswith("-"):
            return " ".join(words[:index]).strip(), " ".join(words[index:])
    return line.strip(), ""


def _check_options_line(words: list[str], where: str, number: int, line: str) -> bool:
    """A line of pip options; True when it asks for hash-checking."""
    at = 0
    require_hashes = False
    while at < len(words):
        word = words[at]
        if not word.startswith("-"):
            raise OptionError(
                f"{where}, line {number}: {line!r}: {word!r} follows {words[at - 1]}, which "
                f"takes no value"
            )
        option, equals, attached = word.partition("=") if word.startswith("--") else (word, "", "")
        if option in _OTHER_FILES:
            target = attached or (words[at + 1] if at + 1 < len(words) else "")
            raise OptionError(_other_file(option, target, where, number, line))
        if option not in _GLOBAL_OPTIONS:
            raise OptionError(
                f"{where}, line {number}: pip option {option!r} is not one a requirements file "
                f"for the VMs may hold ({', '.join(sorted(_GLOBAL_OPTIONS))}); set others "
                f"through env_vars (PIP_...)"
            )
        if not _GLOBAL_OPTIONS[option]:
            if equals:
                raise OptionError(f"{where}, line {number}: {line!r}: {option} takes no value")
            require_hashes |= option == "--require-hashes"
            at += 1
            continue
        if equals:
            value, at = attached, at + 1
        elif at + 1 < len(words) and not words[at + 1].startswith("-"):
            value, at = words[at + 1], at + 2
        else:
            raise OptionError(f"{where}, line {number}: {line!r}: {option} takes one value")
        if option in _INDEXES:
            _check_index(option, value, where, number)
    return require_hashes


#: Options naming where packages come from: an index or a page of links, on the network.
_INDEXES = ("-i", "--index-url", "--extra-index-url", "-f", "--find-links")


def _check_index(option: str, value: str, where: str, number: int) -> None:
    """An index must be reachable from the VMs: an http(s) URL (``${VAR}`` in it is the
    VM's environment, as pip expands it), never a path on this machine."""
    scheme = urllib.parse.urlsplit(value).scheme
    if scheme in ("http", "https") or value.startswith("${"):
        return
    raise OptionError(
        f"{where}, line {number}: {option} {value}: the VMs cannot reach a path or a file: "
        f"URL of this machine; give an http(s) index, or set PIP_FIND_LINKS in env_vars for "
        f"a directory that is on the VMs"
    )


def _other_file(option: str, target: str, where: str, number: int, line: str) -> str:
    if option in ("-e", "--editable") and "://" in target:
        return (
            f"{where}, line {number}: {line!r} is an editable checkout, made for a source tree "
            f"you edit: on the VMs name the project as 'pkg @ {target.split('#')[0]}'"
        )
    return (
        f"{where}, line {number}: {line!r} names {_OTHER_FILES[option]}, which is on this "
        f"machine, not on the VMs: put its requirements in this file (a project of your own: "
        f"publish it, or name it as 'pkg @ git+https://...'; uv export: --no-emit-project)"
    )


def _check_requirement(text: str, where: str, number: int) -> Requirement:
    """The requirement part of a line, as PEP 508 reads it; nothing on this machine."""
    try:
        requirement = Requirement(text)
    except InvalidRequirement as e:
        why = str(e).splitlines()[0]
        local = "://" not in text and text.endswith((".whl", ".tar.gz", ".zip"))
        if local or text.startswith((".", "/", "~", "file:")):
            fix = "a file on this machine is not on the VMs: publish it, or name it as 'pkg @ https://...'"
        elif "://" in text:
            fix = "name the project before its URL: 'pkg @ " + text.split("#")[0] + "'"
        else:
            fix = "write a PEP 508 requirement such as 'pandas>=2' or 'pkg @ https://...'"
        raise OptionError(
            f"{where}, line {number}: {text!r} is not a requirement ({why}); {fix}"
        ) from None
    if requirement.url and requirement.url.startswith("file:"):
        raise OptionError(
            f"{where}, line {number}: {text!r} is a file on this machine, not on the VMs: "
            f"publish it, or name it as 'pkg @ https://...'"
        )
    return requirement


#: The hashes pip checks (``--hash=<algorithm>:<hex>``).
_ALGORITHMS = ("sha256", "sha384", "sha512")


def _check_requirement_options(words: list[str], where: str, number: int) -> tuple[str, ...]:
    """A requirement's own options; the algorithms of its hashes."""
    algorithms: list[str] = []
    at = 0
    while at < len(words):
        option, equals, value = words[at].partition("=")
        at += 1
        if not equals and at < len(words) and not words[at].startswith("-"):
            value, at = words[at], at + 1  # --hash sha256:ab
        if option not in _REQUIREMENT_OPTIONS or not value:
            raise OptionError(
                f"{where}, line {number}: {words[at - 1]!r} is not an option a requirement may "
                f"carry here (--hash=sha256:..., --config-settings=key=value)"
            )
        if option == "--hash":
            algorithm = value.partition(":")[0]
            if algorithm not in _ALGORITHMS:
                raise OptionError(
                    f"{where}, line {number}: --hash={value}: pip checks {', '.join(_ALGORITHMS)} "
                    f"hashes only"
                )
            algorithms.append(algorithm)
    return tuple(algorithms)


def _check_hash_checked(
    entries: list[_Entry], names: frozenset[str], where: str, *, dask: str, distributed: str
) -> None:
    """With hashes pip installs nothing it cannot check: every requirement pinned to one
    release and hashed, no version-control checkout; dask and distributed among them."""
    if not {"dask", "distributed"} <= names:
        raise OptionError(
            f"{where} checks hashes, so pip will install nothing unhashed, and the VMs need "
            f"this client's dask=={dask} and distributed=={distributed}: add both, with "
            f"their hashes, to the file (pip-compile or uv pip compile with "
            f"--generate-hashes, listing dask=={dask} and distributed=={distributed})"
        )
    for entry in entries:
        at = f"{where}, line {entry.number}: {entry.text!r}"
        url = entry.requirement.url
        if url:
            if "+" in url.partition(":")[0]:
                raise OptionError(
                    f"{at} is a version-control checkout, which pip cannot check against a "
                    f"hash: pin a release with its hash, or use a file without hashes"
                )
            fragment = urllib.parse.urlsplit(url).fragment
            if not entry.algorithms and not fragment.startswith(_ALGORITHMS):
                raise OptionError(f"{at} has no hash (--hash=sha256:..., or #sha256= in its URL)")
            continue
        specifiers = list(entry.requirement.specifier)
        pinned = (
            len(specifiers) == 1
            and specifiers[0].operator in ("==", "===")
            and not specifiers[0].version.endswith(".*")
        )
        if not pinned:
            raise OptionError(
                f"{at}: with hashes, pip needs every requirement pinned to one release (==)"
            )
        if not entry.algorithms:
            raise OptionError(
                f"{at} has no --hash, and with hashes pip installs nothing unhashed: "
                f"add its hashes (pip-compile or uv pip compile with --generate-hashes)"
            )


def _check_pin(requirement: Requirement, where: str, number: int, wanted: dict[str, str]) -> None:
    """dask and distributed, if named, must admit the client's own versions (a line with
    a marker may not apply on the VMs, whose Python the client does not know)."""
    name = canonicalize_name(requirement.name)
    version = wanted.get(name, "")
    if not version or requirement.marker is not None:
        return
    release = version.split("+")[0]
    if requirement.url or not requirement.specifier.contains(release, prereleases=True):
        raise OptionError(
            f"{where}, line {number}: {str(requirement)!r} does not admit this client's "
            f"{name} {release}; the VMs run the client's version (its tasks are unpickled "
            f"there): pin {name}=={release} or leave {name} out"
        )
