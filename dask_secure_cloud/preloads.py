"""Small Dask preload scripts shipped to VMs as files.

The VM's image needs only Dask, not this package, so these are plain source text that
``cloudinit`` writes next to the boot script and the Dask process loads with
``--preload``. Each is rendered with its settings inlined: nothing is read from the
environment or the command line.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping
from importlib import resources
from typing import Any

__all__ = ["enroll_script", "lease", "peer_checks", "shipped_module", "spot_interruption"]

_LEASE = """\
# The cluster manager renews this lease. When it stops (the client was killed, the
# laptop closed), the scheduler ends, its workers follow after their death timeout,
# and each VM powers itself off.
import asyncio
import logging
import time

from tornado.ioloop import PeriodicCallback

LEASE_SECONDS = {seconds}
logger = logging.getLogger("distributed.scheduler")


def dask_setup(scheduler):
    renewed = [time.monotonic()]

    def secure_cloud_lease():
        renewed[0] = time.monotonic()
        return LEASE_SECONDS

    def check():
        if time.monotonic() - renewed[0] > LEASE_SECONDS:
            logger.warning("lease expired: no cluster manager for %ss, closing", LEASE_SECONDS)
            callback.stop()
            asyncio.ensure_future(scheduler.close())

    scheduler.handlers["secure_cloud_lease"] = secure_cloud_lease
    callback = PeriodicCallback(check, min(10_000, LEASE_SECONDS * 250))
    scheduler.periodic_callbacks["secure-cloud-lease"] = callback
    callback.start()
"""

#: The lease of a cloud that keeps (and bills) a VM that powered off: ``on_expiry``,
#: defined by the text before this one, deletes the VMs the last renewal named, in a
#: thread, before the scheduler closes.
_LEASE_WITH_END = """\
# The cluster manager renews this lease, naming the cluster's VMs. When it stops (the
# client was killed, the laptop closed), on_expiry deletes those VMs, then this one.
import asyncio
import logging
import time

from tornado.ioloop import PeriodicCallback

LEASE_SECONDS = {seconds}
logger = logging.getLogger("distributed.scheduler")


def dask_setup(scheduler):
    renewed = [time.monotonic()]
    held = [[]]

    def secure_cloud_lease(resources=None):
        renewed[0] = time.monotonic()
        if resources is not None:
            held[0] = [str(r) for r in resources]
        return LEASE_SECONDS

    async def end():
        try:
            await asyncio.to_thread(on_expiry, list(held[0]))
        except (OSError, ValueError, KeyError) as e:
            logger.error("lease ended: deleting the cluster's VMs failed: %s", e)
        await scheduler.close()

    def check():
        if time.monotonic() - renewed[0] > LEASE_SECONDS:
            logger.warning("lease expired: no cluster manager for %ss, closing", LEASE_SECONDS)
            callback.stop()
            asyncio.ensure_future(end())

    scheduler.handlers["secure_cloud_lease"] = secure_cloud_lease
    callback = PeriodicCallback(check, min(10_000, LEASE_SECONDS * 250))
    scheduler.periodic_callbacks["secure-cloud-lease"] = callback
    callback.start()
"""

_SPOT = """\
# Retire this worker gracefully when its cloud announces that the spot VM is about to be
# reclaimed, so the scheduler moves its data and tasks elsewhere first.
import asyncio
import logging
import urllib.error
import urllib.request

from tornado.ioloop import PeriodicCallback

NOTICE_URL = {notice_url!r}
NOTICE_HEADERS = {headers!r}
MUST_CONTAIN = {must_contain!r}
TOKEN_URL = {token_url!r}
INTERVAL_MS = {interval_ms}
logger = logging.getLogger("distributed.worker")


def _notice():
    headers = dict(NOTICE_HEADERS)
    if TOKEN_URL:
        request = urllib.request.Request(
            TOKEN_URL, method="PUT", headers={{"X-aws-ec2-metadata-token-ttl-seconds": "60"}}
        )
        with urllib.request.urlopen(request, timeout=2) as response:
            headers["X-aws-ec2-metadata-token"] = response.read().decode()
    request = urllib.request.Request(NOTICE_URL, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            body = response.read().decode(errors="replace")
            return response.status == 200 and MUST_CONTAIN in body
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise


def dask_setup(worker):
    async def check():
        try:
            noticed = await asyncio.to_thread(_notice)
        except OSError as e:
            logger.debug("spot notice check failed: %s", e)
            return
        if noticed:
            logger.warning("spot interruption notice: retiring this worker")
            callback.stop()
            await worker.close_gracefully()

    callback = PeriodicCallback(check, INTERVAL_MS)
    worker.periodic_callbacks["secure-cloud-spot"] = callback
    callback.start()
"""


def lease(seconds: int, on_expiry: str = "") -> str:
    """Scheduler preload: close when no lease renewal came for ``seconds``.

    ``on_expiry`` is source text (standard library only) that defines
    ``on_expiry(resources)``: called in a thread, with the ``resources`` the last renewal
    passed, before the scheduler closes (see ``Driver.lease_end``)."""
    if not on_expiry:
        return _LEASE.format(seconds=int(seconds))
    return on_expiry + "\n" + _LEASE_WITH_END.format(seconds=int(seconds))


def shipped_module(name: str, settings: Mapping[str, Any]) -> str:
    """This package's module ``name`` as text for a VM, its ``SETTINGS`` given."""
    return f"{_shipped(name)}\nSETTINGS = {dict(settings)!r}\n"


def spot_interruption(
    notice_url: str,
    token_url: str | None,
    interval_ms: int = 5000,
    *,
    headers: Mapping[str, str] | None = None,
    must_contain: str = "",
) -> str:
    """Worker preload: retire gracefully once ``notice_url`` answers 200 (with
    ``must_contain`` in its body, for clouds that always answer 200 with a list of events).
    ``token_url`` is EC2's IMDSv2 session-token endpoint, if any."""
    return _SPOT.format(
        notice_url=notice_url,
        token_url=token_url or "",
        interval_ms=interval_ms,
        headers=dict(headers or {}),
        must_contain=must_contain,
    )


def peer_checks(settings: Mapping[str, Any]) -> str:
    """Scheduler, worker and nanny preload: ``peers.py`` itself, with its settings (the
    cluster id, this VM's role, a worker's scheduler host, ``workers_as_clients``)."""
    return f"{_shipped('peers.py')}\nSETTINGS = {dict(settings)!r}\n"


def enroll_script() -> str:
    """``enroll.py``, run by the boot script before Dask starts (not a preload, but
    shipped the same way)."""
    return _shipped("enroll.py")


@functools.cache
def _shipped(name: str) -> str:
    """This package's module ``name`` without docstrings and comments: the same code in
    less user-data (EC2 allows 16 KiB in all). Made once per process: every VM's
    user-data carries it, and parsing it costs tens of milliseconds."""
    source = resources.files(f"{__package__}.vm").joinpath(name).read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return ast.unparse(tree) + "\n"
