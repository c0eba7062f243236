"""The ``ghcr.io/dask/dask:<version>-py3.11`` image a test guest's Docker pulls.

ghcr.io is out of reach here and no Docker engine runs on this machine, so the image is
assembled by hand, the way a registry will hand it out: a Debian minbase root filesystem
with python3 (mmdebstrap), dask and distributed of exactly the requested versions
installed for that python3, and their command-line scripts in ``/usr/local/bin`` so that
``docker run IMAGE dask scheduler ...`` works as with the real image. It is one gzip
layer, a Docker image config and a Docker v2 schema 2 manifest, stored by digest:

    blobs/sha256/<hex>   the layer, the config and the manifest
    index.json           {"manifests": [{"mediaType", "digest", "size"}]}
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from configparser import ConfigParser
from pathlib import Path
from typing import BinaryIO

from clouds.guest.common import SUITE, cached
from clouds.guest.mirror_pypi import PLATFORM_OPTIONS, release, wheelhouse

__all__ = [
    "CONFIG_TYPE",
    "LAYER_TYPE",
    "MANIFEST_TYPE",
    "blob_path",
    "container_image",
    "dask_images",
    "image_tag",
    "manifest_descriptor",
]

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
PYTHON = "3.11"
SITE_PACKAGES = f"usr/local/lib/python{PYTHON}/dist-packages"
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]
#: dpkg leaves these out of the image, as Debian's slim images do.
EXCLUDED = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
#: Left empty in the image: a container gets its own, or has no use for them.
EMPTIED = ("dev", "proc", "sys", "tmp", "var/lib/apt/lists", "var/cache/apt", "var/log")
SCRIPT = """#!/usr/bin/python3
import sys
from {module} import {function}

if __name__ == "__main__":
    sys.exit({function}())
"""


def image_tag(dask_version: str) -> str:
    """``dask/dask:<dask>-py3.11``: the repository and tag the product pulls from ghcr.io."""
    return f"dask/dask:{dask_version}-py{PYTHON}"


def dask_images() -> dict[str, Path]:
    """The image for this environment's dask and distributed, by repository and tag."""
    dask, distributed = release("dask"), release("distributed")
    return {image_tag(dask): container_image(dask, distributed)}


def container_image(dask_version: str, distributed_version: str) -> Path:
    """The image directory for these exact versions, built once."""
    requirements = [f"dask=={dask_version}", f"distributed=={distributed_version}"]
    inputs: list[str | Path] = [SUITE, *requirements, *PLATFORM_OPTIONS, Path(__file__)]
    return cached("container-image", inputs, lambda d: _build(d, requirements))


def manifest_descriptor(image: Path) -> dict[str, object]:
    """``{"mediaType", "digest", "size"}`` of the image's manifest."""
    return json.loads((image / "index.json").read_text())["manifests"][0]


def blob_path(image: Path, digest: str) -> Path | None:
    """The file holding blob ``digest`` (``sha256:<hex>``) of the image, if it has it."""
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64 or not hexdigest.isalnum():
        return None
    path = image / "blobs" / "sha256" / hexdigest
    return path if path.is_file() else None


def _build(directory: Path, requirements: list[str]) -> None:
    wheels = wheelhouse(requirements)
    rootfs = directory / "rootfs"
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    try:
        _debian(rootfs)
        _install(rootfs, wheels, requirements)
        _trim(rootfs)
        layer, diff_id = _layer(rootfs, blobs)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    made_by = f"dask-secure-cloud tests: Debian {SUITE} minbase, python3, " + " ".join(requirements)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {"Env": ENV, "Cmd": ["python3"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": made_by}],
    }
    config_descriptor = _store(blobs, CONFIG_TYPE, json.dumps(config, indent=2).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": config_descriptor,
        "layers": [layer],
    }
    descriptor = _store(blobs, MANIFEST_TYPE, json.dumps(manifest, indent=2).encode())
    index = {"schemaVersion": 2, "manifests": [descriptor]}
    (directory / "index.json").write_text(json.dumps(index, indent=2) + "\n")


def _store(blobs: Path, media_type: str, data: bytes) -> dict[str, object]:
    hexdigest = hashlib.sha256(data).hexdigest()
    (blobs / hexdigest).write_bytes(data)
    return {"mediaType": media_type, "size": len(data), "digest": f"sha256:{hexdigest}"}


def _debian(rootfs: Path) -> None:
    subprocess.run(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            "--architectures=amd64",
            "--include=python3",
            # Merged /usr by symlinks, as Debian's own images: usrmerge would bring perl.
            "--hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr",
            *(f"--dpkgopt=path-exclude={pattern}" for pattern in EXCLUDED),
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            SUITE,
            str(rootfs),
            f"deb http://deb.debian.org/debian {SUITE} main",
        ],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _install(rootfs: Path, wheels: Path, requirements: list[str]) -> None:
    """Install the wheels for the image's python3, and their scripts as pip would.

    This machine's pip unpacks them (the image has no pip); the scripts it would write
    name this machine's interpreter, so they are written anew for ``/usr/bin/python3``.
    """
    target = rootfs / SITE_PACKAGES
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--isolated",
            "--disable-pip-version-check",
            "--no-index",
            "--no-compile",
            # This machine's installed packages are none of the image's business.
            "--no-warn-conflicts",
            "--root-user-action=ignore",
            f"--find-links={wheels}",
            *PLATFORM_OPTIONS,
            f"--target={target}",
            *requirements,
        ],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    shutil.rmtree(target / "bin", ignore_errors=True)
    bin_dir = rootfs / "usr" / "local" / "bin"
    for entry_points in sorted(target.glob("*.dist-info/entry_points.txt")):
        parser = ConfigParser(interpolation=None, delimiters=("=",))
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(entry_points)
        if not parser.has_section("console_scripts"):
            continue
        for name, spec in parser.items("console_scripts"):
            module, _, function = (part.strip() for part in spec.partition(":"))
            script = bin_dir / name
            script.write_text(SCRIPT.format(module=module, function=function))
            script.chmod(0o755)


def _trim(rootfs: Path) -> None:
    """Leave out what a container does not use: caches, logs, devices, compiled bytecode."""
    for relative in EMPTIED:
        for child in (rootfs / relative).glob("*"):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    for cache in sorted(rootfs.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache)
    # mmdebstrap copied this machine's; Docker gives each container its own.
    for name in ("etc/resolv.conf", "etc/hostname"):
        path = rootfs / name
        if path.is_file() and not path.is_symlink():
            path.write_text("")


class _Digesting:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, inner: BinaryIO | gzip.GzipFile) -> None:
        self.inner = inner
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()


def _layer(rootfs: Path, blobs: Path) -> tuple[dict[str, object], str]:
    """The root filesystem as one gzip layer: its descriptor and its ``diff_id``.

    Streamed through both hashes at once, so the tar is never held in memory or on disk
    uncompressed. Owners stay numeric (the image's users are not this machine's).
    """
    partial = blobs / "layer.partial"
    with partial.open("wb") as raw:
        compressed = _Digesting(raw)
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=6, mtime=0) as gz:
            plain = _Digesting(gz)
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for path, arcname in _walk(rootfs):
                    info = tar.gettarinfo(str(path), arcname)
                    if info is None:  # a socket or the like: nothing to ship
                        continue
                    info.uname = info.gname = ""
                    if info.isfile():
                        with path.open("rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
    hexdigest = compressed.sha256.hexdigest()
    partial.rename(blobs / hexdigest)
    descriptor = {"mediaType": LAYER_TYPE, "size": compressed.size, "digest": f"sha256:{hexdigest}"}
    return descriptor, f"sha256:{plain.sha256.hexdigest()}"


def _walk(rootfs: Path) -> list[tuple[Path, str]]:
    """Every entry under ``rootfs`` in sorted order, with its name in the layer."""
    entries: list[tuple[Path, str]] = []
    for top, dirs, files in os.walk(rootfs):
        dirs.sort()
        base = Path(top)
        relative = base.relative_to(rootfs).as_posix()
        prefix = "" if relative == "." else relative + "/"
        if prefix:
            entries.append((base, relative))
        # Symlinks to directories are listed among dirs, and os.walk does not enter them.
        for name in sorted(files + [d for d in dirs if (base / d).is_symlink()]):
            entries.append((base / name, prefix + name))
    return entries


def _main() -> None:
    """``python -m clouds.guest.container_image``: build (or find) this env's image."""
    for tag, path in dask_images().items():
        manifest = blob_path(path, str(manifest_descriptor(path)["digest"]))
        assert manifest is not None
        layer = json.loads(manifest.read_text())["layers"][0]
        print(tag, path, f"layer {layer['size'] / 1e6:.1f} MB")


if __name__ == "__main__":
    _main()
