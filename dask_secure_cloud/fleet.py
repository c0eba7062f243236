"""The fleet: every driver call a cluster makes, in one place.

Bounded creation (at most ``driver.max_concurrent_creates`` in flight), workers launched
while the scheduler still boots, the scheduler's enrollment and handshake, one watcher
for the whole cluster, and the sweep that ends every start and every close.

The watcher lists the cluster's VMs once every ``driver.watch_interval`` seconds while any VM
is booting, however many there are: 200 booting workers cost one listing per interval,
not 200 state calls a second. A VM that the listing showed and no longer shows, or that
it reports ended (``"terminated"``, or ``"stopped"``: powered off but still kept, and
billed, by its cloud), has ended by itself: a failed boot. A listing that
fails or is throttled teaches nothing, and a VM never listed yet is not presumed gone
(clouds list new VMs with a delay). The same listing serves the watch of a worker whose
Dask worker left (:meth:`Fleet.watch_lost_worker`): whether its VM ended too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from distributed.comm import parse_address, parse_host_port
from distributed.comm.registry import get_backend

from . import audit, placement
from .bootscript import STEP_PREFIX
from .credentials import Role, fingerprint
from .driver import CLUSTER_TAG, CREATOR_TAG, VM, CloudError, Driver, VMRequest
from .enrollment import EnrollmentRefused, ask_directly
from .errors import ClusterStartError, ResourcesLeftError, VMBootError
from .plan import BootPlanner

__all__ = ["ENDED", "Fleet", "delete_cluster"]

logger = logging.getLogger(__name__)

#: The states (``Driver.state``'s words) of a VM that ended by itself: gone, or powered
#: off and still kept (and billed) by its cloud, which the sweep deletes all the same.
ENDED = frozenset({"terminated", "stopped"})
#: The pause between attempts to reach a booting scheduler. An attempt that finds
#: nothing listening costs a refused connection, so they can be frequent: the cluster
#: is ready as soon as the scheduler listens, not a retry pause later.
REACH_PAUSE = 0.05
#: How long one attempt may take: a TCP connection, a TLS handshake and Dask's, from
#: across the internet to a VM whose scheduler is still starting up.
REACH_TIMEOUT = 2.0
#: Seconds a worker that left is given before its VM's state is looked at. ``adapt``
#: retires a worker through the scheduler first and takes it out of the cluster's spec
#: a moment later: meanwhile the worker has left and is still wanted, and is not lost.
LOST_SETTLE = 2.0
#: Seconds between looks at a worker that left (the listing itself comes once per
#: ``watch_interval``).
LOST_POLL = 0.5


def cancel_requested() -> bool:
    """Whether the running task was asked to stop. Before Python 3.12, ``wait_for``
    returns its inner call's outcome when a cancellation lands just as that call ends
    (CPython gh-86296): a retry loop that catches the attempt's ``OSError`` would then
    retry on, and a cancelled start would finish. The request stays counted, so loops
    ask here."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(cancelling is not None and cancelling())


async def answers(
    address: str, connection_args: Mapping[str, Any], timeout: float = REACH_TIMEOUT
) -> bool:
    """Whether a Dask server at ``address`` completes a (TLS) handshake now: one attempt.

    ``distributed.comm.connect`` retries with pauses that grow to half its timeout,
    which would notice a scheduler that just started listening only a pause later; and
    an attempt cut short mid-handshake makes the server log a failed handshake. So this
    makes one connection with a timeout no healthy handshake reaches, and completes
    Dask's handshake before closing, as ``connect`` does, so that the server logs
    nothing. An attempt that fails is aborted, never closed gracefully: a graceful close
    waits for a peer that has not answered, and could wait for ever.
    """
    scheme, location = parse_address(address)
    connector = get_backend(scheme).get_connector()
    try:
        comm = await asyncio.wait_for(
            connector.connect(location, deserialize=False, **connection_args), timeout
        )
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        await asyncio.wait_for(comm.write(comm.handshake_info()), timeout)
        await asyncio.wait_for(comm.read(), timeout)
    except (OSError, asyncio.TimeoutError):
        comm.abort()
        return False
    try:
        await asyncio.wait_for(comm.close(), timeout)
    except (OSError, asyncio.TimeoutError):
        comm.abort()
    return True


async def delete_cluster(driver: Driver, cluster_id: str) -> list[str]:
    """Delete every VM that carries ``cluster_id``, confirm none is left, then release the
    cluster's network. Returns the names of the VMs deleted. Used by ``close()`` and by
    ``dask secure-cloud cleanup`` alike."""
    left = await driver.list(cluster_id)
    deleted = [vm.name for vm in left]
    if left:
        await asyncio.gather(*(driver.destroy(vm) for vm in left))
        left = await driver.list(cluster_id)
    if left:
        raise ResourcesLeftError(
            f"cluster {cluster_id}: could not delete "
            + ", ".join(f"{vm.name} ({vm.id})" for vm in left)
        )
    await driver.release(cluster_id)
    return deleted


class Fleet:
    """The VMs of one cluster, as the cloud sees them."""

    def __init__(
        self,
        driver: Driver,
        planner: BootPlanner,
        *,
        log: Callable[[str], None],
    ) -> None:
        self.driver = driver
        self.planner = planner
        self.cluster_id = planner.cluster_id
        self.boot_timeout = planner.options.boot_timeout.total_seconds()
        self._log = log
        self.watch_interval = driver.watch_interval
        #: Set by the sweep: nothing new is made once the cluster is going away.
        self.closing = False
        self._inflight: set[asyncio.Future[VM]] = set()
        self._prelaunched: dict[str, asyncio.Future[VM]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._sweep_task: asyncio.Future[None] | None = None
        # The watcher: each VM's last known state by id, and which ids a listing showed.
        self._states: dict[str, str] = {}
        self._seen: set[str] = set()
        #: How many VMs are watched now (booting, or whose worker left): the watcher
        #: lists the cluster's VMs while any is.
        self._watched = 0
        self._watcher: asyncio.Task[None] | None = None
        #: The number of workers the cluster wants now (its spec's size), for the cap
        #: check of an on-demand fallback; set by the cluster.
        self.workers_wanted: Callable[[], int] | None = None
        #: The cluster priced with every worker on-demand, once a spot worker fell back
        #: under ``max_hourly_cost``: from then on the cap is checked at that price.
        self.on_demand_cost: Any = None

    # -- making VMs ---------------------------------------------------------------------

    async def prepare(self) -> None:
        started = time.monotonic()
        try:
            await self.driver.prepare(self.cluster_id)
        except (OSError, RuntimeError, ValueError) as e:  # cloud, network, policy
            raise ClusterStartError(f"preparing the network failed: {e}") from e
        self._log(f"Network ready in {time.monotonic() - started:.1f}s")

    async def create(self, role: Role, name: str, scheduler_address: str | None) -> VM:
        """Make one VM (or adopt the one :meth:`prelaunch` made for ``name``)."""
        early = self._prelaunched.pop(name, None)
        if early is not None:
            return await early
        return await self._make(role, name, scheduler_address)

    async def _make(self, role: Role, name: str, scheduler_address: str | None) -> VM:
        if self.closing:
            raise ClusterStartError(f"not creating {name}: the cluster is closing")
        plan = self.planner.plan(role, name, scheduler_address)
        request = VMRequest(
            cluster_id=self.cluster_id,
            name=name,
            role=role,
            user_data=self.planner.render(plan),
            tags={CLUSTER_TAG: self.cluster_id, CREATOR_TAG: self.driver.creator},
        )
        started = time.monotonic()
        placed: placement.Placed | None = None

        async def create() -> VM:
            nonlocal placed
            if not isinstance(self.driver, placement.Zonal):
                return await self.driver.create(request)
            placed = await placement.launch(
                self.driver, request, on_demand_refusal=self._on_demand_refusal, moved=self._moved
            )
            return placed.vm

        task = asyncio.ensure_future(self._bounded(create()))
        self._inflight.add(task)
        try:
            vm = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The cloud may still be making it: wait, so the sweep can find and delete it.
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
            raise
        except (OSError, RuntimeError, ValueError) as e:  # what drivers raise
            raise ClusterStartError(f"creating {role.value} VM {name} failed: {e}") from e
        finally:
            self._inflight.discard(task)
        elapsed = time.monotonic() - started
        self._log(f"{role.value} VM {name} created at {vm.private_ip} in {elapsed:.1f}s")
        await audit.record_async(
            "vm_launched",
            self.cluster_id,
            name=name,
            role=role.value,
            vm_id=vm.id,
            private_ip=vm.private_ip,
            public_ip=vm.public_ip,
            certificate_fingerprint=plan.tls.fingerprint if plan.tls else None,
            **({"zone": placed.zone, "spot": placed.spot} if placed is not None else {}),
        )
        return vm

    async def _moved(self, move: placement.Move) -> None:
        """A VM launched in another zone, or on-demand instead of spot: said in the log
        and the audit log, with the refusals that moved it."""
        message = f"Cluster {self.cluster_id}: {move.describe()}"
        logger.warning(message)
        self._log(message)
        await audit.record_async(
            "vm_moved",
            self.cluster_id,
            name=move.name,
            role=move.role.value,
            from_zone=move.from_zone,
            to_zone=move.to_zone,
            spot_asked=move.spot_asked,
            spot=move.spot,
            reasons=list(move.reasons),
        )

    async def _on_demand_refusal(self) -> str | None:
        """Why a spot worker refused for capacity may not run on-demand instead, or
        ``None`` when it may: ``spot_fallback`` allows it and, under ``max_hourly_cost``,
        the cluster at its wanted size with every worker on-demand fits the cap."""
        options = self.planner.options
        if not getattr(options, "spot_fallback", False):
            return "spot_fallback=False"
        from . import pricing  # the price lists' clients load only on a fallback

        workers = self.workers_wanted() if self.workers_wanted else self.driver.initial_workers
        on_demand = dataclasses.replace(options, worker_spot=False)
        # A price list that cannot answer makes the price unknown, never an error.
        cost = await asyncio.to_thread(pricing.estimate, on_demand, workers, self.driver)
        cap = options.max_hourly_cost
        if cap is None:
            self.on_demand_cost = cost  # what the reprs show from now on
            return None
        hourly = cost.hourly(workers)
        if hourly is None:
            why = "; ".join(cost.unknown())
            return f"the on-demand price is unknown ({why}) and max_hourly_cost is set"
        if hourly > cap:
            return (
                f"with {workers} on-demand workers the cluster would cost "
                f"{pricing.money(hourly)}/h, above max_hourly_cost={pricing.money(cap)}/h"
            )
        self.on_demand_cost = cost
        return None

    async def enrolled(self, name: str, cert_pem: str) -> None:
        """Record that the VM ``name`` made its key and got its certificate."""
        self._log(f"{name} enrolled: its key was made on its VM")
        await audit.record_async(
            "vm_enrolled", self.cluster_id, name=name, certificate_fingerprint=fingerprint(cert_pem)
        )

    async def _bounded(self, creation: Awaitable[VM]) -> VM:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.driver.max_concurrent_creates)
        async with self._slots:
            return await creation

    def prelaunch(self, names: list[str], scheduler_address: str) -> None:
        """Create workers' VMs while the scheduler's VM is still booting.

        A worker keeps trying to reach its scheduler, so the two boots overlap instead
        of adding up; on a cloud that saves a whole VM boot. :meth:`create` adopts the VM
        made here; a failure surfaces there, and the sweep finds any VM made.
        """
        for name in names:
            if name not in self._prelaunched:
                self._prelaunched[name] = asyncio.ensure_future(
                    self._make(Role.WORKER, name, scheduler_address)
                )

    async def destroy(self, vm: VM) -> None:
        await self.driver.destroy(vm)
        await audit.record_async("vm_deleted", self.cluster_id, name=vm.name, vm_id=vm.id)

    # -- watching boots -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _watching(self) -> AsyncIterator[None]:
        self._watched += 1
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())
        try:
            yield
        finally:
            self._watched -= 1

    async def _watch(self) -> None:
        """One listing per interval while anything is watched; nothing when nothing is."""
        while self._watched > 0 and not self.closing:
            try:
                states = await self.driver.states(self.cluster_id)
            except (CloudError, OSError) as e:  # throttled or failed: nothing learnt
                logger.debug("Cluster %s: listing its VMs failed: %s", self.cluster_id, e)
            else:
                gone = self._seen - set(states)
                self._seen |= set(states)
                self._states = {**dict(states), **dict.fromkeys(gone, "terminated")}
            await asyncio.sleep(self.watch_interval)

    def state(self, vm: VM) -> str:
        """What the watcher last learnt of ``vm``: ``"running"``, ``"stopped"``,
        ``"terminated"`` or ``"unknown"`` (see ``Driver.state``)."""
        return self._states.get(vm.id, "unknown")

    async def renewed(self, name: str, cert_pem: str) -> None:
        """Record that the VM ``name`` got a renewed certificate for a fresh key."""
        logger.debug("Cluster %s: %s renewed its certificate", self.cluster_id, name)
        await audit.record_async(
            "certificate_renewed",
            self.cluster_id,
            name=name,
            certificate_fingerprint=fingerprint(cert_pem),
        )

    async def wait_reachable(
        self, vm: VM, address: str, connection_args: Mapping[str, Any]
    ) -> None:
        """Wait until the scheduler completes a (TLS) handshake, or report its console.

        With the cluster's own CA the scheduler first enrols on the same port: the
        client certifies the key it made, then its Dask starts there."""
        deadline = time.monotonic() + self.boot_timeout
        enrollment = self.planner.enrollment
        host, port = parse_host_port(parse_address(address)[1])
        refused: list[str] = []
        reach_timeout = REACH_TIMEOUT

        async def enrol() -> None:
            assert enrollment is not None
            try:
                cert = await enrollment.enroll(
                    vm.name, lambda line: ask_directly(host, int(port), line)
                )
            except (OSError, asyncio.TimeoutError, ValueError):
                return  # not listening yet
            except EnrollmentRefused as e:
                if str(e) not in refused:
                    logger.warning("Enrollment of %s refused: %s", vm.name, e)
                    refused.append(str(e))
                return
            await self.enrolled(vm.name, cert)

        async with self._watching():
            while True:
                if self.closing:
                    raise ClusterStartError("start interrupted")
                if cancel_requested():
                    raise asyncio.CancelledError  # one an attempt's wait_for swallowed
                pause = REACH_PAUSE
                if enrollment is not None and enrollment.certificate(vm.name) is None:
                    await enrol()
                    # Its Dask starts only once certified: no hurry before then.
                    pause = 0.2 if enrollment.certificate(vm.name) is None else 0.0
                else:
                    started = time.monotonic()
                    if await answers(address, connection_args, reach_timeout):
                        return
                    if time.monotonic() - started >= reach_timeout:
                        # It listens but answers slowly (a busy VM): a handshake cut
                        # short at the same point every time would never complete.
                        reach_timeout = min(2 * reach_timeout, 30.0)
                state = self.state(vm)
                if state in ENDED or time.monotonic() > deadline:
                    why = (
                        "stopped"
                        if state in ENDED
                        else f"was not reachable at {address} within "
                        f"{self.boot_timeout:.0f}s (boot_timeout)"
                    )
                    if refused:
                        why += f"; its enrollment was refused: {refused[-1]}"
                    console = await self.console_output(vm)
                    raise VMBootError(
                        f"scheduler VM {vm.name} {why}. Console output:\n{tail(console)}"
                    )
                await asyncio.sleep(pause)

    async def watch_worker_boot(
        self,
        vm: VM,
        joined: Callable[[], bool],
        closing: Callable[[], bool],
        on_failed: Callable[[str], None] | None = None,
    ) -> None:
        """Report a worker VM that has not joined within ``boot_timeout``, or whose VM
        ended before it joined; then ``on_failed`` with the VM's state word, so the
        cluster can replace it."""
        deadline = time.monotonic() + self.boot_timeout
        async with self._watching():
            while time.monotonic() < deadline:
                if joined():
                    return
                if self.state(vm) in ENDED:
                    break
                await asyncio.sleep(1)
        if closing() or self.closing:
            return  # closing: the VM ended because we asked it to
        state = self.state(vm)
        console = await self.console_output(vm)
        logger.error(
            "Worker VM %s did not join the scheduler %s. Console output:\n%s",
            vm.name,
            f"(its VM {state})"
            if state in ENDED
            else f"within {self.boot_timeout:.0f}s (boot_timeout)",
            tail(console),
        )
        if on_failed is not None and not (closing() or self.closing):
            on_failed(state)

    async def watch_lost_worker(self, vm: VM, back: Callable[[], bool], grace: float) -> str | None:
        """Wait until the worker VM ``vm``, whose Dask worker left, counts as lost: its
        VM ended, or its worker stayed away ``grace`` seconds (a worker may come back:
        a nanny restarts a crashed one, a network heals). Returns the VM's state word
        then; ``None`` once ``back()`` (its worker returned, or the cluster no longer
        wants it) or the cluster closes.

        Nothing is decided within :data:`LOST_SETTLE` of the worker leaving."""
        started = time.monotonic()
        async with self._watching():
            await asyncio.sleep(LOST_SETTLE)
            while not self.closing and not back():
                state = self.state(vm)
                if state in ENDED or time.monotonic() - started >= grace:
                    return state
                await asyncio.sleep(LOST_POLL)
        return None

    async def console_output(self, vm: VM) -> str:
        try:
            return await self.driver.console_output(vm)
        except (CloudError, OSError) as e:
            return f"(the console could not be read: {e})"

    async def consoles(self) -> dict[str, str]:
        """Each VM's console, for ``get_logs``."""
        found = {}
        for vm in await self.driver.list(self.cluster_id):
            text = await self.console_output(vm)
            if text:
                found[vm.name] = text
        return found

    # -- the sweep ----------------------------------------------------------------------

    async def sweep(self) -> None:
        """Destroy every VM carrying the cluster id, then confirm none is left.

        Runs once; a second caller (an interrupted start and the close that follows it)
        waits for the same sweep instead of returning before it is done.
        """
        if self._sweep_task is None:
            self._sweep_task = asyncio.ensure_future(self._sweep_with_retries())
        await asyncio.shield(self._sweep_task)

    async def _sweep_with_retries(self, attempts: int = 3) -> None:
        """Clouds fail now and then (eventual consistency, a dropped call): try again."""
        try:
            for attempt in range(1, attempts + 1):
                try:
                    await self._sweep_once()
                    return
                except (OSError, RuntimeError) as e:
                    if attempt == attempts:
                        await audit.record_async("cleanup_failed", self.cluster_id, error=str(e))
                        raise ResourcesLeftError(
                            f"cluster {self.cluster_id}: cleanup failed ({e}); its resources "
                            f"carry the tag {CLUSTER_TAG}={self.cluster_id}: delete them, or "
                            "close() again"
                        ) from e
                    logger.warning(
                        "Cluster %s: cleanup attempt %d failed (%s); trying again",
                        self.cluster_id,
                        attempt,
                        e,
                    )
                    await asyncio.sleep(attempt)
        except BaseException:
            self._sweep_task = None  # a later close() tries again
            raise
        finally:
            await self.driver.close()

    async def _sweep_once(self) -> None:
        self.closing = True
        pending = [*self._inflight, *self._prelaunched.values()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._prelaunched.clear()
        deleted = await delete_cluster(self.driver, self.cluster_id)
        self._log(f"Cluster {self.cluster_id}: every VM deleted")
        await audit.record_async("closed", self.cluster_id, swept=deleted, confirmed_none_left=True)


def tail(text: str, lines: int = 60) -> str:
    """What a failed VM's console says: the boot script's own lines (each step, how long
    it took, why it failed), then the console's last lines. Shutdown noise after a
    failure would otherwise push the failing step out of the report."""
    console = text.splitlines()
    steps = [line[line.index(STEP_PREFIX) :] for line in console if STEP_PREFIX in line]
    kept = console[-(lines // 3 if steps else lines) :]
    if not kept:
        return "(no console output)"
    if not steps:
        return "\n".join(kept)
    return "\n".join(["Boot script:", *steps[-lines:], "Last console lines:", *kept])
