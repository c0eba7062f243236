"""Whether a cluster's client is alive, and the leftovers of clients that are gone.

Why this exists: ``dask secure-cloud list`` finds clusters by their cloud tags, which say
who made a cluster (``user@host``) but not whether the process that owns it still runs.
A cluster whose notebook was killed keeps billing until its lease ends it, and a VM
that powered itself off may bill for good (a stopped Azure VM, a TERMINATED Compute
Engine instance's disk, a powered-off droplet): its owner must be able to see that, and
end it in one command.

How "alive" is known: each cluster object writes a small record, ``<cluster id>.json``
with its process's PID and that process's start time, in ``clusters/`` next to the audit
log (the user's data directory, 0700). It is written as the cluster object is made,
before anything exists in the cloud, and deleted once its close has confirmed that
nothing is left. A process killed outright leaves its record behind, naming a PID that
is dead, or that now belongs to another process (the start time tells them apart).

- ``alive``: a record, and its process runs.
- ``gone``: a record, and its process does not run: nothing renews the cluster's lease
  and nothing will close it. ``dask secure-cloud cleanup --expired`` ends these.
- ``unknown``: no record here: the cluster was made on another machine or by another
  user (its creator tag says so), or before this record existed. Never deleted by
  ``--expired``.

The record lives in the data directory rather than the runtime directory under the
temporary directory (``loader.py``'s), because the commonest way to lose a client is a
laptop that crashed or rebooted, and a reboot may empty the temporary directory. A
lease time stamped into a cloud tag was the alternative; it needs a tag write on every
resource every few minutes on every cloud (DigitalOcean's tags are names that cannot
carry a changing value), and a client cut off from the cloud's API would look dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import audit
from .driver import ClusterSummary, Driver

__all__ = [
    "Client",
    "claim",
    "client_of",
    "drop",
    "leftovers",
    "records_dir",
    "warn_leftovers",
]

logger = logging.getLogger(__name__)

#: A record whose process is gone is deleted this long after it was written: by then its
#: cluster's CA has expired (``max_lifetime``), and the record only clutters.
STALE_RECORD = datetime.timedelta(days=30)
#: Seconds the start-time check for leftovers may take in all; it never fails a start.
LEFTOVER_CHECK_TIMEOUT = 20.0
#: Seconds a start waits for that check (one listing) before leaving it to finish in the
#: background: a start takes minutes on a cloud, this adds at most a few seconds.
LEFTOVER_WAIT = 5.0
#: Process start times, in seconds, that count as the same process (clock rounding).
_SAME_START = 2.0


class Client(str, enum.Enum):
    """What is known of a cluster's client process."""

    ALIVE = "alive"
    GONE = "gone"
    UNKNOWN = "unknown"


def records_dir() -> Path:
    """Where this user's records are: ``clusters/`` next to the audit log, or in the
    user's data directory when the audit log is off."""
    path = audit.audit_path()
    return (path.parent if path is not None else audit._data_dir()) / "clusters"


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch); ``None`` if it runs not."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0  # it runs, as another user: it is not this user's client


def claim(cluster_id: str, provider: str) -> None:
    """Record that this process owns ``cluster_id``. A failure is logged, never raised:
    a record only informs ``list``."""
    directory = records_dir()
    record = {
        "cluster_id": cluster_id,
        "provider": provider,
        "pid": os.getpid(),
        "process_started": _process_start(os.getpid()),
        "creator": audit.creator(),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = directory / f"{cluster_id}.json"
    temporary = directory / f".{cluster_id}.{os.getpid()}.tmp"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(temporary, path)
    except OSError as e:
        logger.warning("could not record cluster %s's client in %s: %s", cluster_id, path, e)
        return
    _prune(directory)


def drop(cluster_id: str) -> None:
    """Forget ``cluster_id``'s record: it is closed and nothing of it is left."""
    path = records_dir() / f"{cluster_id}.json"
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not delete %s: %s", path, e)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _prune(directory: Path) -> None:
    """Delete records of processes long gone (see :data:`STALE_RECORD`)."""
    cutoff = time.time() - STALE_RECORD.total_seconds()
    with contextlib.suppress(OSError):
        for path in directory.glob("*.json"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff and _state(_read(path)) is not Client.ALIVE:
                    path.unlink()


def _state(record: dict[str, Any] | None) -> Client:
    if record is None or not isinstance(record.get("pid"), int):
        return Client.UNKNOWN
    started = _process_start(record["pid"])
    if started is None:
        return Client.GONE
    recorded = record.get("process_started")
    if isinstance(recorded, int | float) and abs(started - recorded) > _SAME_START:
        return Client.GONE  # the PID now belongs to another process
    return Client.ALIVE


def _same_creator(tag: str | None, mine: str) -> bool:
    """Whether a creator tag names ``mine``: clouds rewrite it to their label alphabet
    (Compute Engine lowercases, DigitalOcean replaces ``@``), so compare what survives."""
    if not tag:
        return True  # the tag says nothing: the record alone decides

    def letters(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    return letters(tag) == letters(mine) or letters(mine).startswith(letters(tag))


def client_of(summary: ClusterSummary) -> tuple[Client, int | None]:
    """Whether ``summary``'s client is alive here, with its PID where a record names one."""
    if not _same_creator(summary.creator, audit.creator()):
        return Client.UNKNOWN, None
    record = _read(records_dir() / f"{summary.cluster_id}.json")
    state = _state(record)
    pid = record.get("pid") if record is not None else None
    return state, pid if isinstance(pid, int) else None


def leftovers(summaries: Iterable[ClusterSummary], skip: str = "") -> list[ClusterSummary]:
    """The clusters among ``summaries`` whose client is gone (made here, by this user)."""
    return [s for s in summaries if s.cluster_id != skip and client_of(s)[0] is Client.GONE]


def describe(summary: ClusterSummary) -> str:
    """``dsc-1 (2 running VM, 1 disk)``: a cluster and what of it bills."""
    bills = summary.billing()
    what = ", ".join(f"{n} {kind}" for kind, n in bills.items()) or "nothing that bills"
    return f"{summary.cluster_id} ({what})"


#: Leftovers already warned about in this process: each is warned about once.
_warned: set[tuple[str, str]] = set()


async def warn_leftovers(driver: Driver, provider: str, cluster_id: str) -> None:
    """Log one warning naming this user's clusters on ``provider`` whose client is gone,
    and the command that ends them. Bounded by :data:`LEFTOVER_CHECK_TIMEOUT`; a
    failure is logged at debug level: this check must never fail or slow a start."""
    try:
        found = await asyncio.wait_for(driver.clusters(), LEFTOVER_CHECK_TIMEOUT)
        left = await asyncio.to_thread(leftovers, found, cluster_id)
    except (OSError, RuntimeError, ValueError, asyncio.TimeoutError) as e:
        # RuntimeError covers CloudError and a driver that cannot list (NotImplemented).
        logger.debug("Could not look for leftover clusters on %s: %s", provider, e)
        return
    new = [s for s in left if (provider, s.cluster_id) not in _warned]
    if not new:
        return
    _warned.update((provider, s.cluster_id) for s in new)
    logger.warning(
        "%d cluster(s) of yours on %s whose client is gone still exist: %s. "
        "`dask secure-cloud cleanup --expired --provider %s` deletes them.",
        len(left),
        provider,
        "; ".join(describe(s) for s in left),
        provider,
    )
