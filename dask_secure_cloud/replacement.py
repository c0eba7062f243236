"""Lost workers are replaced, so a cluster keeps the size it was asked for.

Without this, a worker VM that a cloud reclaims (spot), that crashes or that never boots
leaves the cluster one worker short for good: Dask recomputes what it held, and
``SpecCluster`` deletes the VM after ``distributed.deploy.lost-worker-timeout``, but
nothing makes another one.

What counts as lost, for a worker the cluster still wants (still in its spec, so neither
scaled down, by the user or by ``adapt``, nor closing):

- its Dask worker joined and left, and its VM ended (terminated, or powered off and still
  billed): reclaimed, crashed, powered off;
- its Dask worker joined and stayed away for ``distributed.deploy.lost-worker-timeout``
  (Dask's own grace for a worker that may come back) while its VM still runs;
- it never joined: its VM ended first, or ``boot_timeout`` passed (the fleet's boot
  watch);
- a replacement's VM could not be made: the cloud refused it.

The lost VM is deleted while a worker of a **new name** boots in its place. Not the old
name: certificates are per VM name, and the new VM makes its own key and enrols with a
token of its own; under a new name nothing (the scheduler, ``SpecCluster``'s timer for
the old worker, the audit log, a copy of the old VM's key) can take one for the other.

The bound: a worker is replaced at most ``max_replacements`` times in a row. A worker
whose Dask worker stayed connected for ``boot_timeout`` came up and worked, so its loss
starts a new row: a spot worker reclaimed every day is replaced every day, while one that
never comes up, or dies as soon as it joins, is given up after ``max_replacements``
tries, said in the log, the repr and the audit log.

A replacement goes through the same placement as any VM (``placement.py``): first the
scheduler's zone, then, where that zone has no capacity, another zone of the region, or
on-demand for a spot worker. A replacement the cloud refused anyway (every zone tried)
arrives at :meth:`Replacements.lost` as a :class:`Loss` of cause ``LAUNCH_FAILED``
carrying the cloud's error: a quota refusal is given up at once (retrying cannot help
until the quota is raised); any other is tried again after a pause that doubles with
each refusal in the row (:data:`REFUSED_PAUSE`, at most :data:`REFUSED_PAUSE_MAX`), so a
region out of capacity is not asked again and again at once.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import parse_timedelta
from distributed.core import Status

from . import audit
from .credentials import Role
from .errors import QuotaError
from .fleet import ENDED

if TYPE_CHECKING:
    from .cluster import VMCluster
    from .driver import VM

__all__ = ["Cause", "Loss", "Replacements"]

logger = logging.getLogger(__name__)

#: Give-ups the repr keeps, newest last: enough to see a pattern, never a growing list.
_KEPT_GIVE_UPS = 5
#: Seconds before a refused replacement is tried again, doubled for each refusal in its
#: row, and their bound.
REFUSED_PAUSE = 2.0
REFUSED_PAUSE_MAX = 60.0


class Cause(enum.Enum):
    """Why a worker counts as lost."""

    VM_ENDED = "vm_ended"
    WORKER_GONE = "worker_gone"
    BOOT_FAILED = "boot_failed"
    LAUNCH_FAILED = "launch_failed"


@dataclass(frozen=True)
class Loss:
    """One lost worker: what the log, the audit log and the next launch go by."""

    name: str
    cause: Cause
    #: The words of the log line: what was seen, as a user would check it.
    detail: str
    vm_id: str | None = None
    #: The cloud's refusal of a launch (``LAUNCH_FAILED``), for whoever picks the next
    #: zone or market by its type.
    error: BaseException | None = None


def _quota_refusal(error: BaseException | None) -> QuotaError | None:
    """The quota refusal in ``error``'s chain of causes, if any."""
    while error is not None:
        if isinstance(error, QuotaError):
            return error
        error = error.__cause__
    return None


class Replacements:
    """The replacement policy of one cluster: which loss is replaced, how often, and
    the swap of a lost worker for a new one in the cluster's spec."""

    def __init__(self, cluster: VMCluster, *, limit: int, stable_after: float) -> None:
        self.cluster = cluster
        self.limit = limit
        #: A worker connected this long (seconds) came up and worked: its loss starts a
        #: new row.
        self.stable_after = stable_after
        #: By worker name: how many replacements in a row led to this worker.
        self._row: dict[str, int] = {}
        #: By worker name: when its Dask worker was first seen connected (monotonic).
        self._joined: dict[str, float] = {}
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: One line per worker given up, newest last, for the repr.
        self.given_up: list[str] = []

    # -- what the cluster reports --------------------------------------------------------

    def joined(self, name: str) -> None:
        """``name``'s Dask worker is connected (called on every worker update)."""
        self._joined.setdefault(name, time.monotonic())

    def worker_gone(self, name: str, vm: VM | None) -> None:
        """``name``'s Dask worker left: watch until it is back, no longer wanted, or lost."""
        watch = self._watches.get(name)
        if watch is not None and not watch.done():
            return
        self._watches[name] = self._spawn(self._watch_gone(name, vm))

    def boot_failed(self, name: str, vm: VM, state: str) -> None:
        """The fleet's boot watch reports ``name``, which never joined. A worker seen
        connected meanwhile (the watch looks once a second) left after it joined: the
        watch of a worker gone has it."""
        if name in self._joined:
            return
        detail = (
            f"its VM {state} before its Dask worker joined"
            if state in ENDED
            else f"its Dask worker did not join within {self.stable_after:.0f}s (boot_timeout)"
        )
        self._spawn(self.lost(Loss(name, Cause.BOOT_FAILED, detail, vm.id)))

    def launch_failed(self, name: str, error: BaseException) -> bool:
        """The cloud refused ``name``'s VM. Whether this is handled here: only a
        replacement's is (a refusal at the start or on ``scale`` is the caller's error)."""
        if name not in self._row:
            return False
        self._spawn(
            self.lost(Loss(name, Cause.LAUNCH_FAILED, f"its VM was refused: {error}", None, error))
        )
        return True

    # -- the policy ----------------------------------------------------------------------

    async def lost(self, loss: Loss) -> None:
        """Replace the lost worker, or give it up once it was replaced ``limit`` times in
        a row. Nothing happens to a worker no longer wanted (scaled down, closing).

        A worker whose scheduler does not answer is not replaced: it left with it. The
        last wanted-check and the swap run with no await between them, so a ``scale``
        cannot slip in between; the log and the audit log follow."""
        name = loss.name
        if not self._wanted(name):
            self._forget(name)
            return
        if not await self.cluster._scheduler_reachable():
            # The workers left because their scheduler did (its lease ended, its VM was
            # lost): a new worker would only boot, find no scheduler and bill. The
            # cluster's own checks (the lease, idle_timeout, close) end what is left.
            self._forget(name)
            self._say(
                logging.WARNING,
                f"{name} lost: {loss.detail}. Not replaced: the scheduler does not answer",
            )
            return
        if not self._wanted(name):  # scaled down or closing while the scheduler was asked
            self._forget(name)
            return
        quota = _quota_refusal(loss.error)
        joined = self._joined.pop(name, None)
        stable = joined is not None and time.monotonic() - joined >= self.stable_after
        row = 0 if stable else self._row.get(name, 0)
        self._row.pop(name, None)
        self._watches.pop(name, None)
        spot = " (a spot VM)" if self._spot() else ""
        if row >= self.limit or quota is not None:
            self._swap(name, replace=False)
            wanted = len(self.cluster.worker_spec)
            why = (
                "a quota refused it, which no retry can change"
                if quota is not None
                else f"{row} replacements in a row already (max_replacements={self.limit})"
            )
            message = (
                f"{name} lost{spot}: {loss.detail}. Not replaced: {why}; the cluster now "
                f"asks for {wanted} worker{'' if wanted == 1 else 's'}"
            )
            self.given_up = [*self.given_up, f"{name}: given up after {row} replacements"][
                -_KEPT_GIVE_UPS:
            ]
            self._say(logging.ERROR, message)
            await audit.record_async(
                "replacement_given_up",
                self.cluster.cluster_id,
                name=name,
                vm_id=loss.vm_id,
                cause=loss.cause.value,
                detail=loss.detail,
                replacements=row,
                max_replacements=self.limit,
                workers_wanted=wanted,
            )
            return
        if loss.cause is Cause.LAUNCH_FAILED:
            pause = min(REFUSED_PAUSE * 2 ** max(row - 1, 0), REFUSED_PAUSE_MAX)
            self._say(logging.INFO, f"{name}: its VM was refused; trying again in {pause:.0f}s")
            await asyncio.sleep(pause)
            if not self._wanted(name):  # scaled down or closing meanwhile
                self._forget(name)
                return
        # Where the new worker goes (its zone, spot or on-demand) is the fleet's
        # placement, as for any VM.
        new = self._swap(name, replace=True)
        assert new is not None
        self._row[new] = row + 1
        self._say(
            logging.WARNING,
            f"{name} lost{spot}: {loss.detail}. Its VM is deleted and {new} replaces it "
            f"(replacement {row + 1} in a row, at most {self.limit})",
        )
        await audit.record_async(
            "worker_replaced",
            self.cluster.cluster_id,
            name=name,
            vm_id=loss.vm_id,
            cause=loss.cause.value,
            detail=loss.detail,
            replacement=new,
            attempt=row + 1,
            max_replacements=self.limit,
        )

    async def _watch_gone(self, name: str, vm: VM | None) -> None:
        cluster = self.cluster
        grace = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
        vm_id = vm.id if vm is not None else None
        if vm is None:  # SpecCluster has deleted it already: nothing left to watch
            state: str | None = "terminated"
        else:
            state = await cluster.fleet.watch_lost_worker(
                vm,
                back=lambda: self._connected(name) or not self._wanted(name),
                grace=grace,
            )
        if state is None:
            self._watches.pop(name, None)
            return
        if state in ENDED:
            loss = Loss(name, Cause.VM_ENDED, f"its Dask worker left and its VM {state}", vm_id)
        else:
            loss = Loss(
                name,
                Cause.WORKER_GONE,
                f"its Dask worker stayed away {grace:.0f}s "
                f"(distributed.deploy.lost-worker-timeout), its VM {state}",
                vm_id,
            )
        await self.lost(loss)

    # -- the swap ------------------------------------------------------------------------

    def _swap(self, name: str, *, replace: bool) -> str | None:
        """Take ``name`` out of the cluster's spec and delete its VM now, in the
        background; with ``replace``, put a worker of a new name in its place. The
        spec's size is the cluster's wanted size (``scale``'s, ``adapt``'s), kept as it
        was; ``SpecCluster`` starts the new worker."""
        cluster = self.cluster
        cluster.worker_spec.pop(name, None)
        cluster._workers_seen.discard(name)
        cluster._workers_gone.discard(name)
        new = None
        if replace:
            new = str(cluster._new_worker_name(0))  # a name never given before
            cluster.worker_spec[new] = cluster.new_spec
        old = cluster.workers.pop(name, None)
        if old is not None:
            cluster._futures.add(asyncio.ensure_future(self._delete(name, old)))
        # A worker still starting is not in ``workers`` yet: this correction closes it.
        cluster.loop.add_callback(cluster._correct_state)
        return new

    async def _delete(self, name: str, worker: Any) -> None:
        """Delete a lost worker's VM. A failure is logged, not raised: the close's sweep
        deletes every VM of the cluster and confirms it."""
        try:
            await worker.close()
        except (OSError, RuntimeError) as e:  # what drivers raise; CloudError included
            self._say(
                logging.WARNING,
                f"{name}: deleting its VM failed ({e}); the cluster's close deletes it",
            )

    # -- helpers -------------------------------------------------------------------------

    def _wanted(self, name: str) -> bool:
        cluster = self.cluster
        return (
            cluster.status == Status.running
            and not cluster.fleet.closing
            and name in cluster.worker_spec
        )

    def _connected(self, name: str) -> bool:
        return name in self.cluster._worker_addresses()

    def _spot(self) -> bool:
        return self.cluster.driver.interruption_notice(Role.WORKER) is not None

    def _forget(self, name: str) -> None:
        self._row.pop(name, None)
        self._watches.pop(name, None)

    def _say(self, level: int, message: str) -> None:
        cluster = self.cluster
        logger.log(level, "Cluster %s: %s", cluster.cluster_id, message)
        logs = getattr(cluster, "_cluster_manager_logs", None)
        if logs is not None:
            logs.append((datetime.datetime.now(), message))

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        """Run ``coroutine`` on the cluster's loop, keeping a reference until it ends."""
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "Cluster %s: handling a lost worker failed",
                self.cluster.cluster_id,
                exc_info=task.exception(),
            )

    async def close(self) -> None:
        """Stop watching: the cluster is closing, and nothing is replaced any more."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
