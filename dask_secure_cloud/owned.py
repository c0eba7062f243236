"""The clusters this process owns, and closing them when it exits.

Why this exists: a cluster's VMs bill until they are deleted, and the design promises
that a process that exits normally, or by SIGTERM or SIGINT, closes the clusters it
owns. ``SpecCluster`` registers an ``atexit`` hook of its own, but it closes a cluster
through the cluster's event loop: an asynchronous cluster's loop (the Jupyter server's,
where the JupyterLab extension makes clusters) has stopped by then, and a stopped loop
cannot run an asynchronous close. A process killed by SIGTERM with the default
disposition runs no ``atexit`` hook at all.

So each cluster is registered here by its driver and id as it starts, and released once
its own close has confirmed that nothing is left. What is still registered when the
process exits is deleted directly through its driver (``fleet.delete_cluster``, the same
call as ``dask secure-cloud cleanup``), in a fresh event loop on a thread of its own,
within :data:`EXIT_TIMEOUT` seconds; each cluster closed is logged (a warning, so it
shows on stderr even where logging is not configured) and written to the audit log.

Signals: SIGTERM and SIGINT get a handler only where the process left them at the
default disposition (``SIG_DFL``), and only from the main thread; that handler closes the
clusters, then restores the default and re-raises the signal, so the process still dies
of it. A handler the host program set is never replaced: Jupyter's SIGTERM handler stops
its loop and the server then exits normally, Python's default SIGINT handler raises
``KeyboardInterrupt`` (which a notebook kernel survives on purpose); both end in ``atexit``
when the process does exit, which is where the clusters are closed then.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import audit
from .driver import Driver
from .fleet import delete_cluster

__all__ = ["EXIT_TIMEOUT", "close_owned", "owned", "register", "release"]

logger = logging.getLogger(__name__)

#: Seconds allowed to delete every owned cluster when the process exits.
EXIT_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class _Owned:
    cluster_id: str
    provider: str
    driver: Driver
    #: The process that made it: a forked child owns nothing of its parent's.
    pid: int
    #: The cluster object, to mark it closed so that ``SpecCluster``'s own ``atexit``
    #: hook does not try again; weak, so that owning it here keeps nothing alive.
    cluster: Callable[[], Any]


_lock = threading.Lock()
_owned: dict[str, _Owned] = {}
_signals_installed = False


def register(cluster: Any) -> None:
    """Own ``cluster`` (a ``VMCluster`` with ``cluster_id``, ``driver`` and ``provider``)
    until :func:`release`: if the process exits first, its VMs are deleted then."""
    entry = _Owned(
        cluster_id=cluster.cluster_id,
        provider=cluster.provider,
        driver=cluster.driver,
        pid=os.getpid(),
        cluster=weakref.ref(cluster),
    )
    with _lock:
        _owned[entry.cluster_id] = entry
    _install_signal_handlers()


def release(cluster_id: str) -> None:
    """Forget ``cluster_id``: its close confirmed that nothing of it is left."""
    with _lock:
        _owned.pop(cluster_id, None)


def owned() -> list[str]:
    """The ids of the clusters this process owns and has not closed."""
    with _lock:
        return [e.cluster_id for e in _owned.values() if e.pid == os.getpid()]


class _ThreadPerCall(concurrent.futures.ThreadPoolExecutor):
    """The executor of whichever loop deletes at exit (drivers run blocking calls
    through it).

    At ``atexit`` time ``concurrent.futures`` refuses new work in any thread pool
    ("cannot schedule new futures after interpreter shutdown"), and a cluster's loop may
    have shut its own pool down, so each call gets a daemon thread of its own, or runs
    inline where no thread may start any more."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - an executor hands on every outcome
                future.set_exception(e)

        try:
            threading.Thread(target=run, daemon=True, name="dask-secure-cloud-exit-call").start()
        except RuntimeError:  # the interpreter is finalizing: no new threads
            run()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None


async def _delete(entries: list[_Owned]) -> dict[str, list[str] | BaseException]:
    # Whichever loop this runs on, its thread pool may already be shut down for exit.
    asyncio.get_running_loop().set_default_executor(_ThreadPerCall(max_workers=1))
    results = await asyncio.gather(
        *(delete_cluster(e.driver, e.cluster_id) for e in entries), return_exceptions=True
    )
    return {e.cluster_id: r for e, r in zip(entries, results, strict=True)}


def close_owned(
    timeout: float = EXIT_TIMEOUT,
    reason: str = "exit",
    skip: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """Delete every cluster this process still owns (but ``skip``), through each driver;
    wait at most ``timeout`` seconds in all. Returns the ids of the clusters confirmed
    closed; each outcome is logged and audited."""
    pid = os.getpid()
    with _lock:
        entries = [e for e in _owned.values() if e.pid == pid and e.cluster_id not in skip]
    if not entries:
        return []
    names = ", ".join(f"{e.cluster_id} ({e.provider})" for e in entries)
    logger.warning("Process %d is exiting (%s): closing its clusters %s", pid, reason, names)
    deadline = time.monotonic() + timeout
    by_loop: dict[asyncio.AbstractEventLoop | None, list[_Owned]] = {}
    for entry in entries:
        by_loop.setdefault(_loop_of(entry), []).append(entry)
    outcome: dict[str, list[str] | BaseException] = {}
    for loop, group in by_loop.items():
        outcome.update(_delete_on(loop, group, max(deadline - time.monotonic(), 1.0)))
    return _report(entries, outcome, reason, timeout)


def _report(
    entries: list[_Owned],
    outcome: dict[str, list[str] | BaseException],
    reason: str,
    timeout: float,
) -> list[str]:
    """Log and audit each cluster's end; release those confirmed closed."""
    closed = []
    for entry in entries:
        result = outcome.get(entry.cluster_id)
        if isinstance(result, list):
            closed.append(entry.cluster_id)
            release(entry.cluster_id)
            _mark_closed(entry)
            logger.warning(
                "Closed cluster %s (%s) at %s: deleted %s",
                entry.cluster_id,
                entry.provider,
                reason,
                ", ".join(result) or "nothing (no VM was left)",
            )
            audit.record("closed_at_exit", entry.cluster_id, reason=reason, deleted=result)
        else:
            error = result if result is not None else f"not done within {timeout:.0f}s"
            logger.error(
                "Could not close cluster %s (%s) at %s: %s. Its VMs may still run: "
                "`dask secure-cloud cleanup %s` deletes them.",
                entry.cluster_id,
                entry.provider,
                reason,
                error,
                entry.cluster_id,
            )
            audit.record("close_at_exit_failed", entry.cluster_id, reason=reason, error=error)
    return closed


def _loop_of(entry: _Owned) -> asyncio.AbstractEventLoop | None:
    """The cluster's own event loop, if it can still run: a driver's SDK sessions (an
    aiobotocore or Azure client) belong to the loop that made them."""
    loop = getattr(getattr(entry.cluster(), "loop", None), "asyncio_loop", None)
    if isinstance(loop, asyncio.AbstractEventLoop) and not loop.is_closed():
        return loop
    return None


def _current_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _delete_on(
    loop: asyncio.AbstractEventLoop | None, group: list[_Owned], timeout: float
) -> dict[str, list[str] | BaseException]:
    """Delete ``group`` on ``loop`` where it can run it, else in a fresh loop.

    - running in another thread (a synchronous cluster's loop): submitted to it;
    - stopped but open (the Jupyter server's loop, after its SIGTERM): run here;
    - running in this very thread (a signal arrived inside it), closed, or gone: a fresh
      loop on a thread of its own, since this thread cannot wait on its own loop.
    """
    here = _current_loop()
    if loop is not None and loop is not here:
        if loop.is_running():
            future = asyncio.run_coroutine_threadsafe(
                asyncio.wait_for(_delete(group), timeout), loop
            )
            try:
                return future.result(timeout + 1)
            except (concurrent.futures.TimeoutError, asyncio.TimeoutError):
                future.cancel()
                return {}
        if here is None:
            try:
                return loop.run_until_complete(asyncio.wait_for(_delete(group), timeout))
            except asyncio.TimeoutError:
                return {}
    return _delete_in_fresh_loop(group, timeout)


def _delete_in_fresh_loop(
    group: list[_Owned], timeout: float
) -> dict[str, list[str] | BaseException]:
    outcome: dict[str, list[str] | BaseException] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        try:
            outcome.update(loop.run_until_complete(asyncio.wait_for(_delete(group), timeout)))
        except asyncio.TimeoutError:
            pass  # reported per cluster by the caller
        finally:
            loop.close()

    try:
        worker = threading.Thread(target=run, daemon=True, name="dask-secure-cloud-exit")
        worker.start()
    except RuntimeError:  # the interpreter is finalizing: no new threads
        run()
    else:
        worker.join(timeout + 5)
    return outcome


def _mark_closed(entry: _Owned) -> None:
    """Tell the cluster object it is closed, so that no later hook closes it again."""
    from distributed.core import Status

    cluster = entry.cluster()
    if cluster is not None:
        cluster.status = Status.closed


@atexit.register
def _at_exit() -> None:
    # Registered after distributed's own hook (this module is imported later), so it
    # runs first: atexit hooks run last-registered first.
    close_owned(reason="exit")


def _on_signal(signum: int, frame: Any) -> None:
    """A signal whose default would kill the process: close the clusters, then die of it
    as the process would have (same signal, same exit status).

    Clusters on a loop this very thread runs (an asynchronous program; the signal
    arrived inside that loop) are closed on that loop, whose SDK sessions they use: the
    handler cannot wait for the loop it interrupted, so it hands the close to the loop
    and returns, and a watchdog ends the process if that takes longer than the bound."""
    name = signal.Signals(signum).name
    here = _current_loop()
    with _lock:
        on_here = [e for e in _owned.values() if e.pid == os.getpid() and _loop_of(e) is here]
    if here is None or not on_here:
        close_owned(reason=name)
        _die(signum)
        return
    close_owned(reason=name, skip={e.cluster_id for e in on_here})

    async def close_then_die() -> None:
        outcome: dict[str, list[str] | BaseException] = {}
        try:
            outcome = await asyncio.wait_for(_delete(on_here), EXIT_TIMEOUT)
        except asyncio.TimeoutError:
            pass
        finally:
            _report(on_here, outcome, name, EXIT_TIMEOUT)
            _die(signum)

    names = ", ".join(e.cluster_id for e in on_here)
    logger.warning("Process %d received %s: closing its clusters %s", os.getpid(), name, names)
    _close_task.append(here.create_task(close_then_die()))
    watchdog = threading.Timer(EXIT_TIMEOUT + 5, _die, (signum,))
    watchdog.daemon = True
    watchdog.start()


#: The close a signal handed to the interrupted loop (kept referenced until it ends).
_close_task: list[asyncio.Task[None]] = []


def _die(signum: int) -> None:
    """End the process by ``signum`` with its default disposition, as it would have."""
    from . import loader

    loader.cleanup()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_signal_handlers() -> None:
    """Handle SIGTERM and SIGINT where they are at their default disposition (see the
    module's docstring for why a handler the host set is left alone)."""
    global _signals_installed
    if _signals_installed or threading.current_thread() is not threading.main_thread():
        return
    _signals_installed = True
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _on_signal)
