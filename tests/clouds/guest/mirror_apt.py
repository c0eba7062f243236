"""A Debian repository that answers for ``http://deb.debian.org/debian`` to test guests.

A test guest has exactly the stock packages (``common.STOCK_PACKAGES``) and installs the
rest with the product's own ``apt-get`` lines. It has no route to Debian, so the test
services serve it this repository instead: every package a minbase system with the stock
packages needs, plus whatever ``apt-get install`` of the packages in ``GUEST_INSTALLS``
downloads on top of that system.

The download is made by apt itself, in a chroot that holds exactly the stock system, so
the repository holds what the guest's apt will ask for (its resolution, its choice
among alternatives), not a guess. That chroot's dpkg status is kept beside the
repository (``STOCK_STATUS``) for tests that simulate a guest's ``apt-get install``
from the host.
"""

from __future__ import annotations

import gzip
import shlex
import subprocess
from pathlib import Path

from clouds.guest.common import STOCK_PACKAGES, SUITE, cached

__all__ = ["GUEST_INSTALLS", "STOCK_STATUS", "apt_repository"]

#: What the product's boot script installs, and whether with Recommends, as it does.
GUEST_INSTALLS: dict[str, bool] = {"apparmor": False, "docker.io": False, "python3-venv": True}
#: The dpkg status file of the stock system, inside the repository directory.
STOCK_STATUS = "stock-status"
#: The mirror the packages come from. The guest sees the repository under this URL too.
UPSTREAM = "http://deb.debian.org/debian"
COMPONENT = "main"
ARCHITECTURE = "amd64"


def apt_repository() -> Path:
    """The repository directory (``dists/``, ``pool/``), built once per package list.

    Serve it as ``http://deb.debian.org/debian/``; guests use it with
    ``deb [trusted=yes] http://deb.debian.org/debian bookworm main``.
    """
    inputs: list[str | Path] = [SUITE, *STOCK_PACKAGES, "|"]
    inputs += [f"{name}={recommends}" for name, recommends in sorted(GUEST_INSTALLS.items())]
    inputs.append(Path(__file__))
    return cached("apt-repo", inputs, _build)


def _build(directory: Path) -> None:
    pool = directory / "pool" / COMPONENT
    pool.mkdir(parents=True)
    downloads = directory / ".archives"
    status = directory / STOCK_STATUS
    # Hooks run outside the chroot ($1 is its root); MMDEBSTRAP_APT_CONFIG is the apt
    # configuration that mmdebstrap itself used, pointed at the chroot's state.
    apt = 'APT_CONFIG="$MMDEBSTRAP_APT_CONFIG" apt-get --yes --download-only'
    hooks = [f'cp "$1/var/lib/dpkg/status" {shlex.quote(str(status))}']
    for name, recommends in sorted(GUEST_INSTALLS.items()):
        flag = "-o APT::Install-Recommends=" + ("true" if recommends else "false")
        hooks.append(f"{apt} {flag} install {shlex.quote(name)}")
    hooks.append(
        f"mkdir -p {shlex.quote(str(downloads))} && "
        f'cp "$1"/var/cache/apt/archives/*.deb {shlex.quote(str(downloads))}/'
    )
    subprocess.run(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            f"--architectures={ARCHITECTURE}",
            f"--include={','.join(STOCK_PACKAGES)}",
            # Keep the .debs of the stock system, the essential ones included: they belong
            # in the repository too (the guest image is bootstrapped from it).
            "--skip=download/empty",
            "--skip=essential/unlink",
            # The kernel's initramfs is of no use here and is the slowest step.
            "--essential-hook=" + _no_initramfs(),
            *(f"--customize-hook={hook}" for hook in hooks),
            SUITE,
            "/dev/null",
            f"deb {UPSTREAM} {SUITE} {COMPONENT}",
        ],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    for deb in sorted(downloads.iterdir()):
        deb.rename(pool / deb.name)
    downloads.rmdir()
    index_repository(directory)


def _no_initramfs() -> str:
    """A hook that makes ``update-initramfs`` a no-op inside the throwaway chroot.

    Building the kernel's initramfs is the slowest step of installing the stock
    packages, and nothing here boots that kernel: a dpkg diversion keeps the real
    program aside while ``true`` stands in for it.
    """
    return (
        'chroot "$1" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs'
        ' && ln -s /bin/true "$1/usr/sbin/update-initramfs"'
    )


def index_repository(directory: Path) -> None:
    """Write ``dists/<suite>/...`` for the ``.deb`` files under ``directory/pool``.

    ``Packages`` names files relative to ``directory`` (``pool/main/x.deb``), which is
    what apt appends to the mirror URL; ``Release`` lists the indexes' hashes, which
    apt checks even for a ``[trusted=yes]`` source.
    """
    dist = directory / "dists" / SUITE
    binary = dist / COMPONENT / f"binary-{ARCHITECTURE}"
    binary.mkdir(parents=True, exist_ok=True)
    packages = subprocess.run(
        ["apt-ftparchive", "packages", "pool"],
        cwd=directory,
        check=True,
        capture_output=True,
    ).stdout
    (binary / "Packages").write_bytes(packages)
    with gzip.GzipFile(binary / "Packages.gz", "wb", compresslevel=9, mtime=0) as out:
        out.write(packages)
    settings = {
        "Origin": "Debian",
        "Label": "Debian",
        "Suite": SUITE,
        "Codename": SUITE,
        "Architectures": ARCHITECTURE,
        "Components": COMPONENT,
        "Description": "Test mirror for dask-secure-cloud guests",
    }
    options = [f"-oAPT::FTPArchive::Release::{key}={value}" for key, value in settings.items()]
    release = subprocess.run(
        ["apt-ftparchive", *options, "release", f"dists/{SUITE}"],
        cwd=directory,
        check=True,
        capture_output=True,
    ).stdout
    (dist / "Release").write_bytes(release)


def _main() -> None:
    """``python -m clouds.guest.mirror_apt``: build (or find) the repository, print it."""
    path = apt_repository()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(path, f"{size / 1e6:.0f} MB", f"{len(list((path / 'pool').rglob('*.deb')))} debs")


if __name__ == "__main__":
    _main()
