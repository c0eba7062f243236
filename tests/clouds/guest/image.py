"""Guest disk images: a stock-like Debian cloud image, and one with Dask baked in.

The end-to-end guest tests must boot the product's user-data on what a cloud gives a new
VM: a kernel, systemd, cloud-init and a ``python3``, and nothing of ours. ``stock_image``
builds that with ``mmdebstrap`` (Debian ``SUITE``, minbase, ``STOCK_PACKAGES``) and turns
the directory into an ext4 disk with ``mke2fs -d``: no loop device and no mount, so it
builds wherever root can run ``mmdebstrap``. ``baked_image`` adds Dask to the system
``python3`` for tests that must not spend a guest's boot on ``pip``; it starts from the
cached stock root filesystem, so it costs seconds.

Everything is cached by ``common.cached`` under a hash of what goes into it: the package
list, the customisation below (files, masked units, chroot commands), the test CA
certificate, the build options and, for baked images, the Dask versions.

Test-only configuration (a real cloud image has none of this; each item exists only so
that the test bed's stand-in "internet" works, or so that a boot under TCG is bearable):

- The test CA (``common.test_ca()``) is in the system trust store
  (``/usr/local/share/ca-certificates`` + ``update-ca-certificates``): the package
  services on ``SERVICES_ADDRESS`` prove the real registries' names with it.
- ``/etc/hosts`` maps every name in ``IMPERSONATED_HOSTS`` to ``SERVICES_ADDRESS``;
  ``/etc/resolv.conf`` is blank (no DNS server exists for a guest), and cloud-init is told
  not to rewrite ``/etc/hosts`` (``manage_etc_hosts: false``).
- ``/etc/pip.conf`` points pip at the system bundle: pip inside a venv trusts only
  certifi's bundle otherwise, which does not hold the test CA.
- ``/etc/apt/sources.list`` is the one Debian mirror line, ``[trusted=yes]`` because the
  mirror served to guests is not signed; the image holds no apt lists, as a cloud image
  whose first ``apt-get update`` has not run yet. cloud-init keeps that list
  (``apt: preserve_sources_list: true``) instead of writing its own template.
- cloud-init reads only NoCloud (``datasource_list: [NoCloud, None]``): it does not probe
  EC2/GCE/Azure metadata addresses that do not exist here.
- cloud-init runs only the modules a cloud image needs for ``write_files`` + ``runcmd``
  user-data (``_CLOUD_CFG``); the slow ones a test never uses (ssh host keys, growpart,
  resizefs, package and configuration-manager modules...) are off. Its output still
  goes to the serial console, where the product prints its boot steps.
- The apt-daily, e2scrub and fstrim timers are masked: under TCG they compete with the
  boot for the CPU.
- Documentation and manual pages are not installed (``--dpkgopt path-exclude``), as in
  minimal cloud images: smaller and faster, nothing reads them.

The kernel is booted directly by qemu (``vmlinuz`` beside ``disk.raw``): the cloud
kernel has NVMe and ext4 built in, so the root disk needs no initrd.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .common import (
    IMPERSONATED_HOSTS,
    SERVICES_ADDRESS,
    STOCK_PACKAGES,
    SUITE,
    cached,
    test_ca,
)
from .mirror_apt import apt_repository

__all__ = ["GuestImage", "baked_image", "docker_image", "stock_image"]

#: Bump when the build procedure changes in a way the data below does not show.
BUILD_VERSION = "1"
DISK_SIZE = "3G"
#: The system python3 of SUITE looks here for packages pip installs outside Debian.
GUEST_PYTHON = "3.11"
GUEST_SITE_PACKAGES = f"usr/local/lib/python{GUEST_PYTHON}/dist-packages"
MIRROR = "http://deb.debian.org/debian"

_MMDEBSTRAP_OPTIONS = (
    "--variant=minbase",
    "--aptopt=Acquire::Check-Valid-Until false",
    "--aptopt=Acquire::Languages none",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
)

_CLOUD_CFG = """\
# Test bed (see tests/clouds/guest/image.py): NoCloud only, and the modules a cloud image
# runs for write_files + runcmd user-data.
datasource_list: [NoCloud, None]
manage_etc_hosts: false
apt:
  preserve_sources_list: true
cloud_init_modules:
  - seed_random
  - bootcmd
  - write-files
  - set_hostname
  - update_hostname
  - users-groups
cloud_config_modules:
  - locale
  - apt-configure
  - runcmd
cloud_final_modules:
  - package-update-upgrade-install
  - write-files-deferred
  - scripts-vendor
  - scripts-per-once
  - scripts-per-boot
  - scripts-per-instance
  - scripts-user
  - final-message
  - power-state-change
"""

_MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
)

_CHROOT_COMMANDS = (("update-ca-certificates", "--fresh"),)


@dataclass(frozen=True)
class GuestImage:
    """A built image: ``disk.raw`` (ext4, the whole disk is the root filesystem) and the
    kernel to boot it with."""

    name: str
    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.raw"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def info(self) -> dict[str, object]:
        """What the build recorded: packages, versions, how long it took."""
        return json.loads((self.directory / "image.json").read_text())


def _stock_files() -> dict[str, bytes]:
    """Files written over the bootstrapped root, by path inside the guest."""
    ca_pem, _ = test_ca()
    hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    hosts += "".join(f"{SERVICES_ADDRESS}\t{name}\n" for name in IMPERSONATED_HOSTS)
    return {
        "/usr/local/share/ca-certificates/dask-secure-cloud-test-ca.crt": ca_pem.read_bytes(),
        "/etc/hosts": hosts.encode(),
        "/etc/resolv.conf": b"",
        "/etc/hostname": b"debian\n",
        # What cloud-init's locale module would otherwise try (and fail) to generate.
        "/etc/default/locale": b"LANG=C.UTF-8\n",
        "/etc/pip.conf": b"[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n",
        "/etc/apt/sources.list": f"deb [trusted=yes] {MIRROR} {SUITE} main\n".encode(),
        "/etc/cloud/cloud.cfg.d/90-test-bed.cfg": _CLOUD_CFG.encode(),
        # The console is the serial port qemu logs: no VT gettys to start.
        "/etc/systemd/logind.conf.d/test-bed.conf": b"[Login]\nNAutoVTs=0\nReserveVT=0\n",
    }


def _bootstrap_inputs(packages: tuple[str, ...]) -> list[bytes | str]:
    return [
        BUILD_VERSION,
        SUITE,
        apt_repository().name,
        ",".join(packages),
        "\0".join(_MMDEBSTRAP_OPTIONS),
    ]


def _customisation_inputs() -> list[bytes | str]:
    files = _stock_files()
    return [
        json.dumps({path: data.decode() for path, data in sorted(files.items())}),
        ",".join(_MASKED_UNITS),
        repr(_CHROOT_COMMANDS),
    ]


def _run(args: list[str], log: Path) -> None:
    """Run ``args`` with output appended to ``log``; on failure, raise with its tail."""
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(args)}\n".encode())
        out.flush()
        result = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{args[0]} failed (rc {result.returncode}):\n{tail}")


def _bootstrap(directory: Path, packages: tuple[str, ...]) -> None:
    """``mmdebstrap`` the packages into ``directory/rootfs``: the slow step, cached alone
    so that changing the customisation below costs seconds."""
    started = time.monotonic()
    _run(
        [
            "mmdebstrap",
            "--mode=root",
            *_MMDEBSTRAP_OPTIONS,
            f"--include={','.join(packages)}",
            SUITE,
            str(directory / "rootfs"),
            # From the very repository the guests' apt-get reads later: a package they
            # install (python3.11-venv) then always matches the image's (python3.11),
            # whatever Debian released between the two builds.
            f"deb [trusted=yes] copy://{apt_repository()} {SUITE} main",
        ],
        directory / "build.log",
    )
    _report(f"root filesystem: {', '.join(packages)} (mmdebstrap)", time.monotonic() - started)


def _customise(root: Path, log: Path) -> None:
    """Write the test-only configuration of the module docstring into ``root``."""
    for path, data in _stock_files().items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        target.write_bytes(data)
        target.chmod(0o644)
    for unit in _MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for command in _CHROOT_COMMANDS:
        _run(["chroot", str(root), *command], log)
    # No apt lists, as a cloud image before its first ``apt-get update``.
    for leftover in (root / "var/lib/apt/lists").glob("*"):
        if leftover.is_file():
            leftover.unlink()


def _kernel(root: Path) -> Path:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in the image, found {kernels}")
    return kernels[0]


def _make_disk(root: Path, directory: Path, label: str, info: dict[str, object]) -> None:
    """``directory/disk.raw`` from the tree ``root``, and the kernel beside it."""
    log = directory / "build.log"
    _run(
        [
            "mke2fs",
            "-q",
            "-t",
            "ext4",
            "-L",
            label,
            "-d",
            str(root),
            str(directory / "disk.raw"),
            DISK_SIZE,
        ],
        log,
    )
    kernel = _kernel(root)
    shutil.copyfile(kernel, directory / "vmlinuz")
    info = {**info, "kernel": kernel.name}
    (directory / "image.json").write_text(json.dumps(info, indent=1))


def _report(what: str, seconds: float) -> None:
    print(f"guest image: built {what} in {seconds:.1f} s", file=sys.stderr, flush=True)


def _image_directory(label: str, packages: tuple[str, ...]) -> Path:
    """A cached image of ``packages`` with the test bed's customisation: its customised
    ``rootfs/`` tree, ``disk.raw`` and ``vmlinuz``."""
    bootstrap = cached(
        "guest-bootstrap",
        _bootstrap_inputs(packages),
        lambda directory: _bootstrap(directory, packages),
    )

    def build(directory: Path) -> None:
        started = time.monotonic()
        log = directory / "build.log"
        root = directory / "rootfs"
        # A real copy, not hard links: the customisation rewrites files in place.
        _run(["cp", "-a", "--reflink=auto", str(bootstrap / "rootfs"), str(root)], log)
        _customise(root, log)
        info = {"image": label, "bootstrap": bootstrap.name, "packages": list(packages)}
        _make_disk(root, directory, label, info)
        _report(f"{label} image (customise + disk)", time.monotonic() - started)

    inputs = [bootstrap.name, *_customisation_inputs(), DISK_SIZE]
    return cached(f"guest-{label}", inputs, build)


def _stock_directory() -> Path:
    """The cached stock image (see :func:`_image_directory`)."""
    return _image_directory("stock", STOCK_PACKAGES)


def stock_image() -> GuestImage:
    """The stock-like image: kernel, systemd, cloud-init (NoCloud), python3; nothing of ours.

    Cold, ``mmdebstrap`` takes a minute or two; later calls return the cache at once.
    """
    return GuestImage("stock", _stock_directory())


def docker_image() -> GuestImage:
    """Stock plus the distribution's Docker engine, as on an image a user made with Docker
    on it: the boot script's ``docker-engine`` step finds it and installs nothing.

    A bootstrap of its own (a minute or two, cold): Docker's packages set up users,
    groups and units that a copy of the stock tree would miss."""
    return GuestImage("docker", _image_directory("docker", (*STOCK_PACKAGES, "docker.io")))


def baked_image(dask_version: str, distributed_version: str) -> GuestImage:
    """Stock plus ``dask`` and ``distributed`` of exactly these versions, importable by the
    system ``python3``.

    This machine's pip installs them (and their dependencies, as wheels for the guest's
    Python and platform) into the guest's ``/usr/local`` site directory, over a
    hard-linked copy of the stock tree: seconds, not another bootstrap.
    """
    stock = _stock_directory()
    requirements = [f"dask=={dask_version}", f"distributed=={distributed_version}"]
    pip_options = [
        f"--python-version={GUEST_PYTHON}",
        "--implementation=cp",
        "--platform=manylinux2014_x86_64",
        "--platform=manylinux_2_28_x86_64",
        "--platform=manylinux_2_34_x86_64",
        "--only-binary=:all:",
        "--no-compile",
    ]

    def build(directory: Path) -> None:
        started = time.monotonic()
        log = directory / "build.log"
        staging = directory / "site"
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(staging)]
        _run([*pip, *pip_options, *requirements], log)
        tree = directory / "rootfs"
        # Hard links are safe here: nothing below writes to a file of the stock tree.
        _run(["cp", "-al", str(stock / "rootfs"), str(tree)], log)
        site = tree / GUEST_SITE_PACKAGES
        if site.exists():
            site.rmdir()  # empty in the stock tree
        staging.rename(site)
        guest_site = f"/{GUEST_SITE_PACKAGES}"
        _run(["chroot", str(tree), "python3", "-m", "compileall", "-q", "-j0", guest_site], log)
        versions = "import dask, distributed; print(dask.__version__, distributed.__version__)"
        # psutil (imported by dask) needs /proc: a private one, in a mount namespace that
        # ends with the check, so nothing stays mounted in the tree.
        check = subprocess.run(
            [
                *("unshare", "--fork", "--pid", f"--mount-proc={tree / 'proc'}"),
                *("chroot", str(tree), "python3", "-c", versions),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.stdout.split() != [dask_version, distributed_version]:
            raise RuntimeError(f"the baked image imports another Dask: {check}")
        info = {
            "image": "baked",
            "stock": stock.name,
            "dask": dask_version,
            "distributed": distributed_version,
        }
        _make_disk(tree, directory, "baked", info)
        shutil.rmtree(tree)
        _report(f"baked image (dask {dask_version})", time.monotonic() - started)

    inputs = [stock.name, DISK_SIZE, *requirements, *pip_options]
    return GuestImage(f"baked-{dask_version}", cached("guest-baked", inputs, build))
