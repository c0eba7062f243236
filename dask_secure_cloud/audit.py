"""A local, append-only record of each cluster's life, one JSON object per line.

Why: a cluster costs money and holds data, so its owner should be able to answer, after
the fact, "what did I start, when, with which certificates, and was it all deleted?",
even when the notebook that started it is long gone. The record holds identifiers and
fingerprints only, never key material or cloud credentials.

Where: ``secure-cloud.audit-log`` in the dask config; by default ``audit.jsonl`` in the
user's data directory (``$XDG_DATA_HOME/dask-secure-cloud`` on Linux); ``false`` turns it
off. The file is created private to the user (0600). A write that fails is logged and
never stops a cluster.
"""

from __future__ import annotations

import asyncio
import datetime
import getpass
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import dask.config

__all__ = ["audit_path", "creator", "read", "record", "record_async"]

logger = logging.getLogger(__name__)


def _data_dir() -> Path:
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "dask-secure-cloud"


def audit_path() -> Path | None:
    """Where the audit log goes, or ``None`` when it is turned off."""
    setting = dask.config.get("secure-cloud.audit-log", default=None)
    if setting is False:
        return None
    if setting in (None, True):
        return _data_dir() / "audit.jsonl"
    return Path(os.path.expanduser(str(setting)))


def creator() -> str:
    """Who started the cluster, as ``user@host``: for ``list`` and the audit log."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def record(event: str, cluster_id: str, **fields: Any) -> None:
    """Append one event. Values must be identifiers, counts or fingerprints: never keys."""
    path = audit_path()
    if path is None:
        return
    entry = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "event": event,
        "cluster_id": cluster_id,
        **fields,
    }
    line = json.dumps(entry, default=str, sort_keys=False) + "\n"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(line)
    except OSError as e:
        logger.warning("could not write the audit log %s: %s", path, e)


async def record_async(event: str, cluster_id: str, **fields: Any) -> None:
    """:func:`record` from a coroutine, without blocking the event loop on the file."""
    await asyncio.to_thread(record, event, cluster_id, **fields)


def read(path: Path | None = None) -> list[dict[str, Any]]:
    """Every event in the audit log, oldest first."""
    path = path or audit_path()
    if path is None or not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
