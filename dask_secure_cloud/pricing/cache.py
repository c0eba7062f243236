"""Prices kept on disk with the time they were fetched.

Why: a price list answer takes seconds (the Compute Engine catalog is thousands of
SKUs) and prices change rarely, so every start and ``preview`` should not ask again;
but a price is only worth showing with its age, so the age travels with it. A price
that could not be had is never stored: the next estimate asks again.

Where: ``$XDG_CACHE_HOME/dask-secure-cloud/prices`` (``~/.cache/...`` by default), one
JSON file per cloud and region, each entry keyed by what was priced (a size, a disk
type). Files are private to the user; a cache that cannot be read or written is
skipped, never an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Cached", "cache_dir", "cached"]

logger = logging.getLogger(__name__)

#: How long a price is used before it is fetched again. Spot prices move within hours;
#: list prices change a few times a year.
MAX_AGE = 24 * 3600.0
SPOT_MAX_AGE = 3600.0


def cache_dir() -> Path:
    """The user's cache directory for prices."""
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dask-secure-cloud" / "prices"


@dataclass(frozen=True)
class Cached:
    """One hourly price and when it was fetched (seconds since the epoch)."""

    hourly: float
    fetched: float

    @property
    def age(self) -> float:
        return max(time.time() - self.fetched, 0.0)


def _file(cloud: str, region: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{cloud}-{region}")
    return cache_dir() / f"{safe}.json"


def _read(path: Path) -> dict[str, dict[str, float]]:
    try:
        with open(path) as f:
            found = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.info("price cache %s unreadable (%s); fetching afresh", path, e)
        return {}
    return found if isinstance(found, dict) else {}


def _write(path: Path, entries: dict[str, dict[str, float]]) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".prices-")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        logger.info("could not write the price cache %s: %s", path, e)


def cached(
    cloud: str, region: str, key: str, fetch: Callable[[], float], max_age: float = MAX_AGE
) -> Cached:
    """The hourly price of ``key`` from the cache if younger than ``max_age``, else
    ``fetch()``'s (stored with the time). ``fetch`` raises ``PriceUnknown`` when there
    is no price; that propagates and nothing is stored."""
    path = _file(cloud, region)
    entry = _read(path).get(key)
    if isinstance(entry, dict):
        try:
            hit = Cached(float(entry["hourly"]), float(entry["fetched"]))
        except (KeyError, TypeError, ValueError):
            pass
        else:
            if hit.age < max_age:
                return hit
    fresh = Cached(float(fetch()), time.time())
    entries = _read(path)  # again: another process may have added to it meanwhile
    entries[key] = {"hourly": fresh.hourly, "fetched": fresh.fetched}
    _write(path, entries)
    return fresh
