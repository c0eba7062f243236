"""A cluster's hourly cost, as figures with their sources and ages, and the cap on it.

Why here and not in a driver: a price is read from the cloud's public price list, not
from the account, and must be known before anything is made; the per-cloud modules read
the resolved options and nothing else of the cluster. A figure that cannot be had is
"unknown" with the reason, never a guess, and the cap refuses to run on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import OptionError

__all__ = [
    "HOURS_PER_MONTH",
    "CostLimitError",
    "Estimate",
    "Item",
    "Part",
    "PriceUnknown",
    "money",
    "workers_within",
]

#: Hours in a billing month, as AWS, Google and Azure convert monthly disk prices.
HOURS_PER_MONTH = 730.0


class PriceUnknown(LookupError):
    """No price could be had for one item; the message says why (no permission, no
    answer, a size the price list does not have)."""


class CostLimitError(OptionError):
    """A start, ``scale`` or ``adapt`` refused by ``max_hourly_cost``, before anything
    was made for it."""


def money(value: float) -> str:
    """``$0.1234``: four decimals, more for figures smaller than that (a spot price)."""
    if value == 0 or abs(value) >= 0.0001:
        return f"${value:,.4f}"
    return f"${value:.2g}"


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


@dataclass(frozen=True)
class Item:
    """One thing that bills by the hour: a VM size, a disk, a public address."""

    what: str
    hourly: float | None
    #: Seconds since the price was fetched (``None``: not from a price list).
    age: float | None = None
    #: Why there is no price, when ``hourly`` is ``None``.
    why: str | None = None

    def describe(self) -> str:
        if self.hourly is None:
            return f"{self.what} unknown"
        return f"{self.what} {money(self.hourly)}"


@dataclass(frozen=True)
class Part:
    """What the scheduler, or one worker, costs: its VM and what comes with it."""

    items: tuple[Item, ...]

    @property
    def hourly(self) -> float | None:
        prices = [i.hourly for i in self.items]
        return None if any(p is None for p in prices) else sum(p or 0.0 for p in prices)

    def unknown(self) -> list[str]:
        return [f"{i.what}: {i.why}" for i in self.items if i.hourly is None]

    def missing(self) -> list[Item]:
        return [i for i in self.items if i.hourly is None]

    def describe(self) -> str:
        return ", ".join(i.describe() for i in self.items)


@dataclass(frozen=True)
class Estimate:
    """The hourly cost of a cluster with a scheduler and some number of workers."""

    provider: str
    #: Where the prices come from (``"AWS Price List API"``); "" where nothing bills.
    source: str
    scheduler: Part
    worker: Part
    #: The worker count asked for when the estimate was made.
    workers: int
    #: What the figure leaves out or assumes, for the user to read (one line each).
    notes: tuple[str, ...] = field(default=())
    currency: str = "USD"

    def hourly(self, workers: int | None = None) -> float | None:
        """The cost per hour with ``workers`` workers (default: the count asked for);
        ``None`` when a price is unknown."""
        n = self.workers if workers is None else workers
        scheduler, worker = self.scheduler.hourly, self.worker.hourly
        if scheduler is None or (worker is None and n > 0):
            return None
        return scheduler + n * (worker or 0.0)

    def unknown(self) -> list[str]:
        """Why the figure is unknown: one reason per unpriced item (none when known)."""
        by_reason: dict[str, list[str]] = {}
        for item in self.scheduler.missing() + self.worker.missing():
            whats = by_reason.setdefault(item.why or "no price", [])
            if item.what not in whats:
                whats.append(item.what)
        return [f"{', '.join(whats)}: {why}" for why, whats in by_reason.items()]

    @property
    def age(self) -> float | None:
        """Seconds since the oldest price in the estimate was fetched."""
        ages = [i.age for p in (self.scheduler, self.worker) for i in p.items if i.age is not None]
        return max(ages) if ages else None

    def short(self, workers: int | None = None) -> str:
        """``$0.3420/h``, or ``unknown``: what a ``repr`` shows."""
        total = self.hourly(workers)
        return "unknown" if total is None else f"{money(total)}/h"

    def describe(self, workers: int | None = None) -> str:
        """One line: the total, how it adds up, where the prices come from and their
        age; or ``unknown`` and why."""
        n = self.workers if workers is None else workers
        total = self.hourly(n)
        if total is None:
            return "unknown: " + "; ".join(self.unknown())
        if not self.source:
            return f"{money(total)}/h" + (f" ({self.notes[0]})" if self.notes else "")
        worker = self.worker.hourly or 0.0
        age = self.age
        fetched = f", {_age(age)} old" if age is not None else ""
        return (
            f"{money(total)}/h ({self.currency}: scheduler {money(self.scheduler.hourly or 0)}"
            f" + {n} worker{'s' if n != 1 else ''} x {money(worker)}; {self.source}{fetched})"
        )

    def __str__(self) -> str:
        lines = [f"Hourly cost: {self.describe()}"]
        lines.append(f"  scheduler: {self.scheduler.describe()}")
        lines.append(f"  each worker: {self.worker.describe()}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def workers_within(estimate: Estimate, cap: float) -> int | None:
    """The most workers whose cluster costs no more than ``cap`` per hour: ``-1`` when
    even the scheduler alone costs more, ``None`` when the figure is unknown."""
    scheduler, worker = estimate.scheduler.hourly, estimate.worker.hourly
    if scheduler is None or worker is None:
        return None
    if scheduler > cap:
        return -1
    if worker <= 0:
        return 2**31
    # A hair of tolerance so that a cap equal to the sum is not refused by rounding.
    return math.floor((cap - scheduler) / worker + 1e-9)


def refusal(
    estimate: Estimate, cap: float, workers: int, action: str, fixes: Sequence[str] = ()
) -> CostLimitError | None:
    """The error refusing ``action`` with ``workers`` workers under ``cap``, or ``None``
    when it fits. Unknown prices are refused: a cap that cannot be checked is not one."""
    total = estimate.hourly(workers)
    if total is None:
        return CostLimitError(
            f"{action}: max_hourly_cost is {money(cap)}/h but the cluster's hourly cost is "
            f"unknown ({'; '.join(estimate.unknown())}), and a cap that cannot be checked "
            "is not a cap. Make the price source reachable (see the reason), or pass "
            "max_hourly_cost=False to go ahead without a cap"
        )
    if total <= cap + 1e-12:
        return None
    fit = workers_within(estimate, cap)
    if fit is not None and fit < 0:
        room = "even the scheduler alone costs more"
    else:
        room = f"at most {fit} worker{'s' if fit != 1 else ''} fit"
    more = "; ".join(fixes) if fixes else "ask for fewer or smaller workers"
    return CostLimitError(
        f"{action}: the cluster would cost {estimate.describe(workers)}, above "
        f"max_hourly_cost={money(cap)}/h ({room}). Raise max_hourly_cost, or {more}"
    )


def price_source(cloud: str) -> str | None:
    """Another address for ``cloud``'s price list (``secure-cloud.price-sources.<cloud>``
    in the dask config): a mirror, a proxy, a test stand-in."""
    import dask.config

    sources = dask.config.get("secure-cloud.price-sources", default=None) or {}
    found = sources.get(cloud) if isinstance(sources, dict) else None
    return str(found) if found else None


def priced(
    cloud: str,
    region: str,
    key: str,
    what: str,
    fetch: Callable[[], float],
    max_age: float | None = None,
) -> Item:
    """An :class:`Item` priced from the disk cache or ``fetch``; unknown, with the
    reason, when ``fetch`` raises :class:`PriceUnknown`."""
    from . import cache

    try:
        found = cache.cached(cloud, region, key, fetch, max_age or cache.MAX_AGE)
    except PriceUnknown as e:
        return Item(what, None, why=str(e))
    return Item(what, found.hourly, age=found.age)


def unknown_part(what: str, why: str) -> Part:
    return Part((Item(what, None, why=why),))
