"""Cloud images the project builds with a cluster's exact software, so its VMs skip
provisioning at boot (``dask secure-cloud image build``).

An image is named and labelled with a hash of what it holds (:class:`Software`: the
runtime, the Docker image or the dask and distributed versions and ``pip_packages``, the
client's Python, the base image as the image option gives it, empty for the cloud's
stock one). A cluster boots the newest image of its account and region whose hash
matches its own software on its own base (:func:`choose`, called by ``Driver.prepare``);
with none it boots its base image as before and says which command would save the
provisioning. A built image named as the image option boots as named.

Each cloud keeps its images in ``providers/<cloud>/images.py`` (an :class:`ImageStore`):
list, delete, and make one from a powered-off builder VM. The build itself is
:mod:`.build`. Nothing here is a cluster resource: images carry no cluster tag, so
``list`` and ``cleanup`` never see nor delete one.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
import hashlib
import importlib
import json
import logging
import re
import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..cloudinit import DockerRuntime, NativeRuntime
    from ..driver import VM, Driver

__all__ = [
    "IMAGE_TAG",
    "NAME_PREFIX",
    "BuiltImage",
    "ImageStore",
    "OptionImageStore",
    "Software",
    "choose",
    "image_name",
    "now",
    "parse_name",
    "provisioning_note",
    "store_of",
    "want",
]

logger = logging.getLogger(__name__)

#: Every built image's name starts with this, then the hash, then its UTC build time.
NAME_PREFIX = "dask-secure-cloud-"
#: The tag (label) key whose value is the image's software hash.
IMAGE_TAG = "dask-secure-cloud-image"
#: Hex digits of the hash in names and labels.
DIGEST_LENGTH = 16
_NAME = re.compile(rf"{NAME_PREFIX}([0-9a-f]{{{DIGEST_LENGTH}}})-(\d{{8}})-(\d{{6}})")


@dataclasses.dataclass(frozen=True)
class Software:
    """What an image holds, as the client would provision it at boot."""

    runtime: str
    #: ``runtime="docker"``: the pinned image reference pulled into the engine.
    docker_image: str = ""
    dask: str = ""
    distributed: str = ""
    pip_packages: tuple[str, ...] = ()
    #: The client's Python (``3.11``): the VMs' Dask must unpickle its functions.
    python: str = ""
    #: The base image as given (the cloud's image option); empty: the cloud's stock one.
    base: str = ""
    #: ``requirements_file``'s lines as the VM gets them (not its path: where a file lies
    #: on one laptop says nothing of what it installs).
    requirements: str = ""

    @classmethod
    def of(cls, runtime: DockerRuntime | NativeRuntime, base: str = "") -> Software:
        from ..cloudinit import DockerRuntime

        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        if isinstance(runtime, DockerRuntime):
            return cls("docker", docker_image=runtime.image, python=python, base=base)
        return cls(
            "native",
            dask=runtime.dask_version,
            distributed=runtime.distributed_version,
            pip_packages=tuple(runtime.pip_packages),
            python=python,
            base=base,
            requirements=runtime.requirements_file.text if runtime.requirements_file else "",
        )

    @property
    def digest(self) -> str:
        held = dataclasses.asdict(self)
        if not held["requirements"]:
            del held["requirements"]  # images built before the option keep their hash
        text = json.dumps(held, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_LENGTH]

    def describe(self) -> str:
        """One line for an image's description and the logs."""
        if self.runtime == "docker":
            held = f"docker {self.docker_image}"
        else:
            held = f"native dask {self.dask} distributed {self.distributed}"
            if self.pip_packages:
                held += " + " + " ".join(self.pip_packages)
            if self.requirements:
                count = len(self.requirements.splitlines())
                held += f" + a requirements file ({count} lines)"
        return f"{held}; python {self.python}; base {self.base or 'stock'}"


@dataclasses.dataclass(frozen=True)
class BuiltImage:
    """One image ``image build`` made, as its cloud lists it."""

    name: str
    #: What the cloud's image option takes to boot it (an AMI id, a self link...).
    id: str
    digest: str
    created: datetime.datetime
    description: str = ""


def image_name(digest: str, now: datetime.datetime | None = None) -> str:
    """``dask-secure-cloud-<hash>-<YYYYmmdd>-<HHMMSS>``: valid on every cloud (a Compute
    Engine image name is the strictest: lowercase, digits, hyphens, 63 characters)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"{NAME_PREFIX}{digest}-{now:%Y%m%d-%H%M%S}"


def parse_name(name: str) -> tuple[str, datetime.datetime] | None:
    """``(hash, build time)`` of a built image's name; ``None`` for any other name."""
    match = _NAME.fullmatch(name)
    if not match:
        return None
    digest, day, time = match.groups()
    created = datetime.datetime.strptime(day + time, "%Y%m%d%H%M%S")
    return digest, created.replace(tzinfo=datetime.timezone.utc)


class ImageStore(abc.ABC):
    """One cloud's built images (``providers/<cloud>/images.py``), through its driver."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    @abc.abstractmethod
    def base(self) -> str:
        """The cloud's image option as the user gave it; empty when it is the default
        (the stock image). Part of the software hash: an image is picked for clusters of
        the base it was built from."""

    @abc.abstractmethod
    def use(self, image: BuiltImage) -> None:
        """Make the driver boot its VMs from ``image``."""

    @abc.abstractmethod
    async def list(self) -> list[BuiltImage]:
        """Every built image of the account (project, resource group) and region."""

    @abc.abstractmethod
    async def delete(self, image: BuiltImage) -> None:
        """Delete ``image`` and what only it uses (snapshots)."""

    @abc.abstractmethod
    async def capture(self, vm: VM, name: str, software: Software) -> BuiltImage:
        """Make the image ``name`` from the powered-off builder ``vm``; wait until the
        cloud says it is usable. A failure deletes what it made of the image."""

    def prepare_builder(self) -> None:
        """Adjust the driver before the builder VM is made (EC2: a shutdown from its OS
        stops it instead of terminating it)."""

    async def find(self, digest: str) -> BuiltImage | None:
        """The newest image whose hash is ``digest``."""
        matching = [image for image in await self.list() if image.digest == digest]
        return max(matching, key=lambda image: image.created) if matching else None


class OptionImageStore(ImageStore):
    """A store whose VMs boot the image named by one option (``option``): the base is
    that option unless it is the default, and a built image is used by setting it."""

    #: The options field that names the image VMs boot.
    option: ClassVar[str]

    def base(self) -> str:
        options = self.driver.options
        default = next(f.default for f in dataclasses.fields(options) if f.name == self.option)
        image = getattr(options, self.option)
        return "" if image == default else image

    def use(self, image: BuiltImage) -> None:
        options = dataclasses.replace(self.driver.options, **{self.option: image.id})
        self.driver.options = options


def now() -> datetime.datetime:
    """When an image is made, as every cloud records it: UTC."""
    return datetime.datetime.now(datetime.timezone.utc)


def store_of(driver: Driver) -> ImageStore | None:
    """The driver's cloud's images (``providers/<provider>/images.py``); ``None`` where
    its cloud has none (``LocalVMCluster``)."""
    module = f"{__package__.rsplit('.', 1)[0]}.providers.{driver.provider}.images"
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            return None
        raise
    store: ImageStore = found.Images(driver)
    return store


def want(driver: Driver, runtime: DockerRuntime | NativeRuntime) -> None:
    """Tell ``driver`` the software its VMs provision on its image option (the base), so
    that :func:`choose` picks an image built from that base for it; nothing where the
    cloud has no images. A built image named as the image option is no image's base:
    it boots as named (its boot skips provisioning all the same)."""
    store = store_of(driver)
    driver.software = None if store is None else Software.of(runtime, store.base())


async def choose(driver: Driver, command: Sequence[str] = ()) -> BuiltImage | None:
    """Boot ``driver``'s VMs from the newest image built for its software, if any; else
    log once that the VMs provision at boot, and the command that would save it."""
    software = driver.software
    store = store_of(driver)
    if software is None or store is None:
        return None
    found = await store.find(software.digest)
    if found is not None:
        store.use(found)
        driver.built_image = found
        logger.info("Booting from %s (%s), built for this software", found.name, found.id)
        return found
    logger.info(
        "No image of this account holds this software (%s, hash %s): the VMs install it "
        "at boot. `%s` makes one; later clusters boot from it.",
        software.describe(),
        software.digest,
        build_command(driver.provider, command),
    )
    return None


def build_command(provider: str, options: Sequence[str] = ()) -> str:
    """The ``dask secure-cloud image build`` command line for ``provider``."""
    words = ["dask", "secure-cloud", "image", "build", provider]
    for option in options:
        words += ["-o", option]
    return " ".join(shlex.quote(w) for w in words)


_STEP_DONE = re.compile(r"dask-secure-cloud: (docker-engine|pull|python-env): done in ([\d.]+)s")


def provisioning_note(console: str, provider: str, options: Sequence[str] = ()) -> str | None:
    """From a VM's console: how long its provisioning steps took, and the command that
    would save it; ``None`` when the VM provisioned nothing (a built image)."""
    steps = [(m.group(1), float(m.group(2))) for m in _STEP_DONE.finditer(console)]
    if not steps:
        return None
    total = sum(seconds for _, seconds in steps)
    each = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in steps)
    return (
        f"The VM spent {total:.1f}s provisioning ({each}); "
        f"`{build_command(provider, options)}` builds an image that skips it."
    )


async def note_provisioning(driver: Driver, vm: VM) -> str | None:
    """:func:`provisioning_note` of ``vm`` (the scheduler, once reachable), which the
    cluster logs once, when it booted the stock image."""
    if driver.software is None or driver.built_image is not None:
        return None
    return provisioning_note(await driver.console_output(vm), driver.provider)
