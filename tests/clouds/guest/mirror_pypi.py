"""A PyPI that answers for ``pypi.org`` and ``files.pythonhosted.org`` to test guests.

A guest's ``pip install dask==X distributed==Y`` goes to ``https://pypi.org/simple/``
unchanged. The test services answer it from a wheelhouse downloaded once (through this
machine's own access to PyPI) for the guest's platform, Debian 12's CPython 3.11 on
x86-64, so the guest's pip finds the same files it would find on PyPI, with the same
links, hashes and ``Requires-Python``, and nothing else.

Besides dask's, every wheelhouse holds ``USER_REQUIREMENTS``: small pure-Python packages
a guest test asks for as ``pip_packages``, written as users write them (a version
specifier, an extra), so the product's own ``pip install`` of them is proven on a guest.
"""

from __future__ import annotations

import hashlib
import html
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from importlib.metadata import version
from pathlib import Path

from clouds.guest.common import cached
from clouds.guest.reply import Reply, bytes_reply, file_reply, not_found, redirect

__all__ = [
    "PLATFORM_OPTIONS",
    "USER_REQUIREMENTS",
    "SimpleIndex",
    "dask_requirements",
    "normalize",
    "release",
    "wheelhouse",
]

#: pip's options for "what a Debian 12 guest's pip accepts": CPython 3.11, glibc 2.36 on
#: x86-64 (every manylinux tag up to 2.36, newest first as its pip prefers them).
PLATFORM_OPTIONS: tuple[str, ...] = (
    "--only-binary=:all:",
    "--python-version=3.11",
    "--implementation=cp",
    *(f"--platform=manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)),
    "--platform=manylinux2014_x86_64",
)
#: What a guest test passes as ``pip_packages``: a specifier with a range (``>=``, ``<``
#: and ``,``, which a shell would mangle) and an extra (``[socks]`` brings ``PySocks``).
#: Small, pure Python, and not in the stock image, so a guest has them only if pip
#: installed them. Every wheelhouse holds them, whoever asks for it.
USER_REQUIREMENTS: tuple[str, ...] = ("iniconfig>=2,<3", "urllib3[socks]")
#: Where the index's links point when asked as pypi.org, as PyPI's do.
FILES_HOST = "files.pythonhosted.org"
SIMPLE_HTML = "text/html; charset=utf-8"


def release(name: str) -> str:
    """This environment's version of ``name`` without a local part (``+g1234``).

    A development build is on no index; the product pins its release on a VM, too.
    """
    return version(name).split("+")[0]


def dask_requirements() -> list[str]:
    """Pins of this environment's dask and distributed: what the product puts on a VM."""
    return [f"dask=={release('dask')}", f"distributed=={release('distributed')}"]


def wheelhouse(requirements: list[str]) -> Path:
    """A directory of wheels for ``requirements``, ``USER_REQUIREMENTS`` and all they
    depend on, resolved together (as a guest's pip resolves them) and built once."""
    wanted = [*requirements, *USER_REQUIREMENTS]
    inputs: list[str | Path] = [*sorted(wanted), "|", *PLATFORM_OPTIONS, Path(__file__)]
    return cached("wheelhouse", inputs, lambda directory: _download(directory, wanted))


def _download(directory: Path, requirements: list[str]) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            *PLATFORM_OPTIONS,
            "--dest",
            str(directory),
            *requirements,
        ],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def normalize(name: str) -> str:
    """PEP 503's normal form of a project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Wheel:
    path: Path
    sha256: str
    requires_python: str | None


class SimpleIndex:
    """PEP 503 pages for a wheelhouse, and its files, routed as PyPI routes them.

    ``/simple/`` lists the projects, ``/simple/<name>/`` a project's files, linked as
    ``https://<files host>/packages/<file>#sha256=<hash>``; ``/packages/<file>`` is the
    file. A project that is not there is a 404, as on PyPI.
    """

    def __init__(self, wheelhouse: Path) -> None:
        self.projects: dict[str, list[Wheel]] = {}
        self.files: dict[str, Wheel] = {}
        for path in sorted(wheelhouse.glob("*.whl")):
            wheel = Wheel(path, _sha256(path), _requires_python(path))
            self.projects.setdefault(normalize(path.name.split("-")[0]), []).append(wheel)
            self.files[path.name] = wheel

    def route(self, path: str, files_base: str) -> Reply:
        """The answer to GET ``path``; links point under ``files_base`` (scheme + host)."""
        if path == "/simple":
            return redirect("/simple/")
        if path == "/simple/":
            return bytes_reply(self._root_page(), SIMPLE_HTML)
        match = re.fullmatch(r"/simple/([^/]+)/?", path)
        if match:
            name = match.group(1)
            if name != normalize(name) or not path.endswith("/"):
                return redirect(f"/simple/{normalize(name)}/")
            if name not in self.projects:
                return not_found()
            return bytes_reply(self._project_page(name, files_base), SIMPLE_HTML)
        match = re.fullmatch(r"/packages/([^/]+)", path)
        if match and match.group(1) in self.files:
            return file_reply(self.files[match.group(1)].path, "application/octet-stream")
        return not_found()

    def _root_page(self) -> bytes:
        links = "".join(f'<a href="/simple/{n}/">{n}</a>\n' for n in sorted(self.projects))
        return _page("Simple index", links)

    def _project_page(self, name: str, files_base: str) -> bytes:
        links = ""
        for wheel in self.projects[name]:
            href = f"{files_base}/packages/{wheel.path.name}#sha256={wheel.sha256}"
            extra = ""
            if wheel.requires_python:
                extra = f' data-requires-python="{html.escape(wheel.requires_python)}"'
            links += f'<a href="{html.escape(href)}"{extra}>{wheel.path.name}</a><br />\n'
        return _page(f"Links for {name}", links, heading=True)


def _page(title: str, links: str, heading: bool = False) -> bytes:
    head = '<meta name="pypi:repository-version" content="1.1">'
    h1 = f"<h1>{title}</h1>\n" if heading else ""
    text = (
        f"<!DOCTYPE html>\n<html>\n<head>{head}<title>{title}</title></head>\n"
        f"<body>\n{h1}{links}</body>\n</html>\n"
    )
    return text.encode()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _requires_python(path: Path) -> str | None:
    """The wheel's ``Requires-Python``, which PyPI shows so pip can skip unusable files."""
    with zipfile.ZipFile(path) as wheel:
        names = [n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if not names:
            return None
        metadata = HeaderParser().parsestr(wheel.read(names[0]).decode("utf-8", "replace"))
    return metadata.get("Requires-Python")


def _main() -> None:
    """``python -m clouds.guest.mirror_pypi``: build (or find) this env's wheelhouse."""
    path = wheelhouse(dask_requirements())
    size = sum(f.stat().st_size for f in path.iterdir())
    print(path, f"{size / 1e6:.1f} MB", f"{len(list(path.glob('*.whl')))} wheels")


if __name__ == "__main__":
    _main()
