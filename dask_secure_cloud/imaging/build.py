"""``dask secure-cloud image build``: one builder VM from the stock image, provisioned by
the boot script exactly as a cluster's VM would be, then the cloud's image from its disk.

The builder's user-data is a scheduler's, rendered by the same :class:`~..plan.BootPlanner`
from the same options, with three differences: no TLS (the builder never runs Dask), the
boot script's ``image_build`` (``vm/boot/image_build.sh``, which no cluster VM
carries) in place of ``extra_bootstrap`` (it runs after the
provisioning steps: it checks what they made as a VM booting from the image will, leaves
no file of this boot behind and powers off), and a file ``image-build`` that keeps a
failed builder on, so that a cloud without console output (DigitalOcean) tells a failed
builder from a finished one. The builder carries a cluster id of its own
(``dsc-image-...``), so ``list`` and ``cleanup`` find it if the build is killed; the
image carries none.

A build that fails at any point deletes the builder, its network and whatever part of the
image exists; what remains is its log (the builder's console).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .. import audit
from ..bootscript import IMAGE_BUILD
from ..cloudinit import VM_HOME, check_size, parse
from ..credentials import Role
from ..driver import VM, CloudError, Driver, VMRequest
from ..errors import OptionError
from . import BuiltImage, ImageStore, Software, image_name, store_of

__all__ = ["BuildError", "build", "builder_user_data", "log_dir"]

logger = logging.getLogger(__name__)

#: The builder's name, inside its build id.
BUILDER = "image-builder"
#: What the boot script prints once the builder is done (``image_build`` in common.sh).
DONE = "dask-secure-cloud: image-build: done"
FAILED = "dask-secure-cloud: boot FAILED"
BOOTING = "dask-secure-cloud: booting "


class BuildError(CloudError):
    """The build failed; nothing of it is left but its log."""


def log_dir() -> Path:
    """Where each build's log (the builder's console) is kept:
    ``$XDG_CACHE_HOME/dask-secure-cloud/image-builds``."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dask-secure-cloud" / "image-builds"


def builder_user_data(user_data: bytes, driver: Driver) -> bytes:
    """A scheduler's user-data, plus the file that marks its VM as an image builder."""
    document = parse(user_data)
    document["write_files"].append(
        {"path": f"{VM_HOME}/image-build", "content": "", "permissions": "0600"}
    )
    data = ("#cloud-config\n" + yaml.safe_dump(document, sort_keys=False, width=1 << 16)).encode()
    if driver.user_data_limit.gzip:
        data = gzip.compress(data, compresslevel=9, mtime=0)
    check_size(data, driver.user_data_limit, document)
    return data


async def build(
    cls: Any,
    options: dict[str, Any],
    *,
    say: Callable[[str], None] = logger.info,
    poll_interval: float = 2.0,
) -> BuiltImage:
    """Build the image for ``cls(**options)``'s software; return it once usable."""
    from ..cluster import preview
    from ..plan import BootPlanner

    shown = preview(cls, **options)
    resolved, driver = shown.options, shown.driver
    store = store_of(driver)
    if store is None:
        await driver.close()
        raise OptionError(f"{shown.provider}: this provider has no cloud images to build")
    build_id = f"dsc-image-{uuid.uuid4().hex[:10]}"
    driver.configure(
        ports=(resolved.scheduler_port,),
        boot_timeout=resolved.boot_timeout.total_seconds(),
        initial_workers=0,
        creator=audit.creator(),
    )
    builder_options = dataclasses.replace(
        resolved,
        security=False,
        extra_bootstrap=(IMAGE_BUILD.rstrip("\n"), "image_build"),
        n_workers=0,
    )
    planner = BootPlanner(
        builder_options, build_id, driver, native_python=cls.native_python(resolved)
    )
    software = Software.of(planner.runtime, store.base())
    driver.software = None  # the builder boots the base image, never a built one
    name = image_name(software.digest)
    user_data = builder_user_data(planner.user_data(Role.SCHEDULER, BUILDER, None), driver)
    log = log_dir() / f"{build_id}.log"
    say(f"building {name} ({software.describe()}) with builder {build_id}")
    started = time.monotonic()
    vm: VM | None = None
    console = ""
    try:
        store.prepare_builder()
        await driver.prepare(build_id)
        vm = await driver.create(
            VMRequest(cluster_id=build_id, name=BUILDER, role=Role.SCHEDULER, user_data=user_data)
        )
        say(f"builder {vm.id} is provisioning")
        console = await _wait(driver, vm, resolved.boot_timeout.total_seconds(), poll_interval)
        say(f"builder provisioned and powered off after {time.monotonic() - started:.0f}s")
        image = await store.capture(vm, name, software)
    except BaseException as e:
        if vm is not None:
            console = await _console(driver, vm) or console
        _keep(log, console)
        await asyncio.shield(_remove(driver, build_id, vm, say))
        await audit.record_async("image_build", build_id, ok=False, error=str(e), image=name)
        if isinstance(e, BuildError | CloudError):
            raise BuildError(f"{e} (the builder's log: {log})") from e
        raise
    _keep(log, console)
    await _remove(driver, build_id, vm, say)
    await audit.record_async("image_build", build_id, ok=True, image=image.name, id=image.id)
    say(f"built {image.name} in {time.monotonic() - started:.0f}s")
    return image


async def _console(driver: Driver, vm: VM) -> str:
    try:
        return await driver.console_output(vm)
    except (CloudError, OSError):
        return ""


def _keep(log: Path, console: str) -> None:
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(console or "(the cloud gave no console output)\n")
    except OSError as e:
        logger.warning("could not keep the build's log in %s: %s", log, e)


async def _wait(driver: Driver, vm: VM, boot_timeout: float, interval: float) -> str:
    """The builder's console once it powered off having built; :class:`BuildError` when
    its boot failed (its console says so, or it is still on at the deadline: a failed
    builder stays on)."""
    # A cloud takes a while to make the VM: up to a minute more.
    deadline = time.monotonic() + boot_timeout + min(60.0, boot_timeout)
    while True:
        state = await driver.state(vm)
        console = await _console(driver, vm)
        if FAILED in console:
            failed = next(line for line in console.splitlines() if FAILED in line)
            raise BuildError(f"the builder's provisioning failed: {failed.strip()}")
        if state == "terminated":
            raise BuildError("the builder ended (terminated) before its image could be made")
        if state == "stopped":
            # A cloud that shows the boot script's lines shows the build's end, too.
            if BOOTING in console and DONE not in console:
                raise BuildError("the builder powered off before it finished provisioning")
            return console
        if time.monotonic() > deadline:
            raise BuildError(
                f"the builder did not finish within boot_timeout ({boot_timeout:.0f}s)"
            )
        await asyncio.sleep(interval)


async def _remove(driver: Driver, build_id: str, vm: VM | None, say: Callable[[str], None]) -> None:
    """Delete the builder and everything it made (network, disks), then the driver's
    sessions; confirmed by listing."""
    try:
        listed = [*([vm] if vm else []), *await driver.list(build_id)]
        for found in {v.id: v for v in listed}.values():
            await driver.destroy(found)
        await driver.release(build_id)
        left = await driver.list(build_id)
        if left:
            raise BuildError(f"builder VMs still listed after deleting them: {left}")
        say(f"deleted the builder {build_id} and its network")
    finally:
        await driver.close()


async def delete(store: ImageStore, name: str) -> BuiltImage:
    """Delete the built image ``name`` (or id); :class:`BuildError` when there is none."""
    for image in await store.list():
        if name in (image.name, image.id):
            await store.delete(image)
            return image
    raise BuildError(f"no image built by dask-secure-cloud is called {name!r} here")
