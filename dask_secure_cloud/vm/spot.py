"""A spot worker retires gracefully when its cloud announces the VM's reclaim.

Each cloud's metadata service tells a spot (preemptible) VM shortly before it is
reclaimed. This worker preload polls for that notice and, once it comes, closes the
worker gracefully, so that the scheduler moves its data and tasks elsewhere first.

Shipped to spot worker VMs verbatim as a Dask preload with its settings appended as
``SETTINGS``: ``notice_url`` (answers 200 when notice is given, 404 or an answer
without ``must_contain`` when not), ``headers`` sent with it, ``must_contain`` (for
clouds that always answer 200 with a list of events), ``token_url`` (EC2's IMDSv2
session-token endpoint, or "") and ``interval_ms`` between polls. It needs only the
standard library and ``distributed``.
"""

import asyncio
import logging
import urllib.error
import urllib.request
from typing import Any

from tornado.ioloop import PeriodicCallback

logger = logging.getLogger("distributed.worker")

#: Replaced by the settings appended when shipped (see above).
SETTINGS: dict[str, Any] = {}


def _notice() -> bool:
    headers = dict(SETTINGS["headers"])
    if SETTINGS["token_url"]:
        request = urllib.request.Request(
            SETTINGS["token_url"],
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
        )
        with urllib.request.urlopen(request, timeout=2) as response:
            headers["X-aws-ec2-metadata-token"] = response.read().decode()
    request = urllib.request.Request(SETTINGS["notice_url"], headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            body = response.read().decode(errors="replace")
            return response.status == 200 and SETTINGS["must_contain"] in body
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise


def dask_setup(worker: Any) -> None:
    async def check() -> None:
        try:
            noticed = await asyncio.to_thread(_notice)
        except OSError as e:
            logger.debug("spot notice check failed: %s", e)
            return
        if noticed:
            logger.warning("spot interruption notice: retiring this worker")
            callback.stop()
            await worker.close_gracefully()

    callback = PeriodicCallback(check, SETTINGS["interval_ms"])
    worker.periodic_callbacks["secure-cloud-spot"] = callback
    callback.start()
