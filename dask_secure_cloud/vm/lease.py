"""The scheduler's lease: it closes when its cluster manager stops renewing it.

The cluster manager renews the lease (``secure_cloud_lease``, a handler only the
client's certificate may call) while it runs. When the renewals stop (the client was
killed, the laptop closed) for ``LEASE_SECONDS``, the scheduler closes, its workers
follow after their death timeout, and each VM powers itself off. On a cloud that keeps
(and bills) a VM that powered off, ``lease_end.py`` adds what deletes the VMs first.

Shipped to the scheduler VM verbatim as a Dask preload, with the line that sets
``LEASE_SECONDS`` appended. It has no ``from __future__`` import, which must open a
file: a cloud's ``on_expiry`` code may come first in the same file.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from tornado.ioloop import PeriodicCallback

logger = logging.getLogger("distributed.scheduler")

#: The lease's length in seconds; replaced by the line appended when shipped.
LEASE_SECONDS = 0
#: Run in a thread, in order, once the lease expired and before the scheduler closes,
#: each given the resources (VM ids) the last renewal named. When there is any, each
#: renewal may name them (``resources=``); otherwise a renewal takes no argument.
BEFORE_CLOSE: list[Callable[[list[str]], None]] = []


def dask_setup(scheduler: Any) -> None:
    renewed = [time.monotonic()]
    held: list[list[str]] = [[]]
    ending: list[asyncio.Future[None]] = []  # held, so that the task is not collected

    def secure_cloud_lease() -> int:
        renewed[0] = time.monotonic()
        return LEASE_SECONDS

    def secure_cloud_lease_naming(resources: list[Any] | None = None) -> int:
        if resources is not None:
            held[0] = [str(r) for r in resources]
        return secure_cloud_lease()

    async def end() -> None:
        for hook in BEFORE_CLOSE:
            try:
                await asyncio.to_thread(hook, list(held[0]))
            except (OSError, ValueError, KeyError) as e:
                logger.error("lease ended: deleting the cluster's VMs failed: %s", e)
        await scheduler.close()

    def check() -> None:
        if time.monotonic() - renewed[0] > LEASE_SECONDS:
            logger.warning("lease expired: no cluster manager for %ss, closing", LEASE_SECONDS)
            callback.stop()
            ending.append(asyncio.ensure_future(end()))

    renew = secure_cloud_lease_naming if BEFORE_CLOSE else secure_cloud_lease
    scheduler.handlers["secure_cloud_lease"] = renew
    callback = PeriodicCallback(check, min(10_000, LEASE_SECONDS * 250))
    scheduler.periodic_callbacks["secure-cloud-lease"] = callback
    callback.start()
