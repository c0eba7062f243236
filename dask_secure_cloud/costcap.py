"""``max_hourly_cost``: the cluster is priced before anything exists, and no start,
``scale`` or ``adapt`` may take it past the cap.

Mixed into :class:`~dask_secure_cloud.cluster.VMCluster`, whose ``scale`` and ``adapt``
these are; the price itself comes from ``pricing``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from dask.utils import parse_bytes
from distributed.deploy.spec import SpecCluster

from . import audit, pricing

__all__ = ["CostCap"]

logger = logging.getLogger("dask_secure_cloud.cluster")


class CostCap(SpecCluster):
    """The cost half of ``VMCluster``: ``_check_cost`` at the start, then every growth
    checked against ``max_hourly_cost`` before a VM is asked for."""

    _cost: pricing.Estimate | None = None

    def _capped_cost(self) -> pricing.Estimate | None:
        """The price the cap is checked at: the start's estimate, or every worker
        on-demand once a spot worker fell back to on-demand (``spot_fallback``)."""
        return self._shown_cost()[0]

    def _shown_cost(self) -> tuple[pricing.Estimate | None, str]:
        """What the reprs show: the start's estimate; once spot capacity ran out and a
        worker was let run on-demand (``spot_fallback``), every worker priced on-demand,
        which the cap is checked at too, and a note saying so (an upper bound: some may
        still run on spot)."""
        on_demand = getattr(getattr(self, "fleet", None), "on_demand_cost", None)
        if on_demand is not None:
            return on_demand, " (workers priced on-demand: spot capacity ran out)"
        return getattr(self, "_cost", None), ""

    async def _check_cost(self) -> None:
        """Price the cluster before anything exists (the log line, the reprs, ``list``)
        and refuse a start above ``max_hourly_cost``. Price lists are read in a thread:
        their clients block."""
        workers = len(self.worker_spec)
        await self.driver.locate()  # where the options do not say (read only)
        cost = await asyncio.to_thread(pricing.estimate, self.options, workers, self.driver)
        self._cost: pricing.Estimate | None = cost
        self._log(f"Cluster {self.cluster_id}: hourly cost {cost.describe(workers)}")
        await audit.record_async(
            "cost_estimate",
            self.cluster_id,
            scheduler_hourly=cost.scheduler.hourly,
            worker_hourly=cost.worker.hourly,
            workers=workers,
            hourly=cost.hourly(workers),
            currency=cost.currency,
            unknown=cost.unknown() or None,
        )
        error = await asyncio.to_thread(self._cost_refusal, workers, "start")
        if error is not None:
            raise error
        adaptive = getattr(self, "_adaptive", None)  # adapt() called before the start
        limit = self._workers_within_cap()
        if adaptive is not None and limit is not None and adaptive.maximum > limit:
            adaptive.maximum = limit

    def _cost_refusal(self, workers: int, action: str) -> pricing.CostLimitError | None:
        """The error refusing ``action`` at ``workers`` workers, recorded in the audit
        log, or ``None`` when no cap is set or the cost fits it."""
        cap = self.options.max_hourly_cost
        cost = self._capped_cost()
        if cap is None or cost is None:
            return None
        error = pricing.refusal(cost, cap, workers, action)
        if error is None:
            return None
        logger.warning("Cluster %s: %s", self.cluster_id, error)
        fields = {
            "action": action,
            "workers": workers,
            "hourly": cost.hourly(workers),
            "max_hourly_cost": cap,
            "unknown": cost.unknown() or None,
        }
        if self.asynchronous and getattr(self, "loop", None) is not None:
            self.loop.add_callback(audit.record_async, "cost_refused", self.cluster_id, **fields)
        else:
            audit.record("cost_refused", self.cluster_id, **fields)
        return error

    def _workers_within_cap(self) -> int | None:
        """The most workers ``max_hourly_cost`` allows, or ``None`` without a cap (or
        before the cluster is priced)."""
        cap = self.options.max_hourly_cost
        cost = self._capped_cost()
        if cap is None or cost is None:
            return None
        return pricing.workers_within(cost, cap)

    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> Any:
        """``SpecCluster.scale``, refused before any VM is made when the cluster would
        cost more than ``max_hourly_cost``."""
        target = n
        if memory is not None:
            target = max(target, math.ceil(parse_bytes(memory) / self._memory_per_worker()))
        if cores is not None:
            target = max(target, math.ceil(cores / self._threads_per_worker()))
        if target > len(self.worker_spec):  # only growth can break the cap
            error = self._cost_refusal(target, f"scale({target})")
            if error is not None:
                raise error
        return super().scale(n, memory=memory, cores=cores)

    def adapt(
        self, *args: Any, minimum: float = 0, maximum: float = math.inf, **kwargs: Any
    ) -> Any:
        """``SpecCluster.adapt`` within ``max_hourly_cost``: a ``minimum`` or ``maximum``
        above what the cap allows is refused; with no ``maximum`` the cap sets it."""
        limit = self._workers_within_cap()
        if limit is not None:
            for name, value in (("minimum", minimum), ("maximum", maximum)):
                if value != math.inf and value > limit:
                    error = self._cost_refusal(int(value), f"adapt({name}={value})")
                    if error is not None:
                        raise error
            if maximum == math.inf:
                maximum = limit
                self._log(
                    f"Cluster {self.cluster_id}: adapting up to {limit} workers (max_hourly_cost)"
                )
        return super().adapt(*args, minimum=minimum, maximum=maximum, **kwargs)
