"""The client's periodic duties while a cluster runs: renew the scheduler's lease, renew
certificates, warn before the CA expires, and close a cluster idle for ``idle_timeout``.

Mixed into :class:`~dask_secure_cloud.cluster.VMCluster`; each duty is a
``PeriodicCallback`` that ``Cluster._start`` starts with the others.
"""

from __future__ import annotations

import datetime
import logging
import time
import warnings

from distributed.core import Status
from distributed.deploy.spec import SpecCluster
from tornado.ioloop import PeriodicCallback

from . import audit
from .enrollment import RelayedEnrollment
from .renewal import Renewal, renewal_interval
from .vms import WorkerVM

__all__ = ["Upkeep", "human", "idle_poll_interval"]

logger = logging.getLogger("dask_secure_cloud.cluster")


class Upkeep(SpecCluster):
    """The lease, certificate renewal, the expiry warning and the idle timeout."""

    def _init_upkeep(self) -> None:
        """The duties' state, made before the start: the worker enrollment relayed by
        the scheduler and certificate renewal (with the cluster's own CA only)."""
        self._worker_enrollment: RelayedEnrollment | None = None
        self._renewal: Renewal | None = None
        self._expiry_warned = False
        #: The idle period the scheduler last reported (its ``idle_since``), and when this
        #: client first saw it (monotonic): see _check_idle.
        self._idle_seen: tuple[float, float] | None = None
        if self.planner.enrollment is None:
            return
        self._worker_enrollment = RelayedEnrollment(
            self.planner.enrollment,
            self._relay_enrollment,
            interval=min(self.driver.watch_interval, 2.0),
            on_enrolled=self.fleet.enrolled,
        )
        self._renewal = Renewal(
            self.planner.enrollment,
            lambda: self.scheduler_comm,
            self._worker_addresses,
            on_renewed=self.fleet.renewed,
        )

    def _add_upkeep(self) -> None:
        """The client's periodic duties: the lease, renewal, the expiry warning.

        Added as the start begins, so ``Cluster._start`` starts them whether the cluster
        starts in ``__init__`` (synchronous) or when awaited.
        """
        lease = self.options.lease_timeout.total_seconds()
        self.periodic_callbacks["secure-cloud-lease"] = PeriodicCallback(
            self._renew_lease, lease * 1000 / 4
        )
        if self._credentials is not None:
            self.periodic_callbacks["certificate-expiry"] = PeriodicCallback(
                self._check_expiry, 60_000
            )
            # The client's own certificate is as short-lived as the VMs', and renewed in
            # place in every TLS context made from self.security (credentials.py).
            every = renewal_interval(self.options.certificate_lifetime).total_seconds()
            self.periodic_callbacks["client-certificate-renewal"] = PeriodicCallback(
                self._credentials.renew_client, every * 1000
            )
        if self._renewal is not None:
            interval = renewal_interval(self.options.certificate_lifetime)
            self.periodic_callbacks["certificate-renewal"] = PeriodicCallback(
                self._renewal.tick, interval.total_seconds() * 1000
            )
        if self.options.idle_timeout is not None:
            self.periodic_callbacks["secure-cloud-idle"] = PeriodicCallback(
                self._check_idle, idle_poll_interval(self.options.idle_timeout) * 1000
            )

    async def _renew_lease(self) -> None:
        """Tell the scheduler its cluster manager is alive (see ``lease_timeout``), and
        what the driver wants it to end when the lease does (``Driver.lease_arguments``)."""
        if self.scheduler_comm is None or self.status != Status.running:
            return
        try:
            await self.scheduler_comm.secure_cloud_lease(**self.driver.lease_arguments())
        except OSError as e:
            logger.warning(
                "Cluster %s: could not renew the scheduler's lease: %s", self.cluster_id, e
            )

    def _workers_booting(self) -> bool:
        """Whether a worker VM asked for has not joined yet (nor failed to within
        ``boot_timeout``): the scheduler has nothing to run then, but the user is waiting
        for workers, so the idle clock must not run."""
        if any(name not in self.workers for name in self.worker_spec):
            return True
        return any(isinstance(vm, WorkerVM) and vm.booting() for vm in self.workers.values())

    async def _check_idle(self) -> None:
        """Close the cluster, deleting every VM, once its scheduler has been idle for
        ``idle_timeout``: the lease keeps a live but forgotten client's cluster running.

        Idleness is Dask's own (the scheduler's ``check_idle``: no task processing,
        queued or unrunnable). It is timed on this client's clock from when this client
        first saw the idle period, so a VM's clock skew cannot end a cluster early; the
        cluster ends within one poll after ``idle_timeout``. A scheduler unreachable after
        that long idle (it ended itself: plan.SCHEDULER_IDLE_GRACE) is closed too."""
        timeout = self.options.idle_timeout
        if timeout is None or self.status != Status.running or self.scheduler_comm is None:
            return
        now = time.monotonic()
        if self._workers_booting():
            self._idle_seen = None  # a cluster waiting for its workers is not idle
            return
        try:
            idle_since = await self.scheduler_comm.check_idle()
        except OSError:
            if self._idle_seen is None:
                return  # unreachable, and not known idle: the lease warns of it
        else:
            if idle_since is None:
                self._idle_seen = None
                return
            if self._idle_seen is None or self._idle_seen[0] != idle_since:
                self._idle_seen = (idle_since, now)
        if self._idle_seen is None:
            return
        idle_for = now - self._idle_seen[1]
        if idle_for < timeout.total_seconds() or self.status != Status.running:
            return
        message = (
            f"Cluster {self.cluster_id}: idle for {human(timeout)} (idle_timeout): closing "
            "it and deleting its VMs"
        )
        logger.warning(message)
        self._cluster_manager_logs.append((datetime.datetime.now(), message))
        await audit.record_async(
            "idle_timeout",
            self.cluster_id,
            idle_seconds=round(idle_for),
            idle_timeout=timeout.total_seconds(),
        )
        await self._close()

    def _check_expiry(self) -> None:
        if self._credentials is None or self._expiry_warned:
            return
        remaining = self._credentials.remaining()
        if remaining < self.options.certificate_warning:
            self._expiry_warned = True
            message = (
                f"Cluster {self.cluster_id}: its CA and so every certificate expire in "
                f"{max(remaining.total_seconds(), 0) / 60:.0f} minutes (max_lifetime), "
                "after which no connection is accepted and the VMs end. Start a new "
                "cluster, or set max_lifetime longer for long-running clusters."
            )
            logger.warning(message)
            warnings.warn(message, stacklevel=2)


def idle_poll_interval(idle_timeout: datetime.timedelta) -> float:
    """Seconds between the client's polls of the scheduler's idleness: a tenth of the
    timeout, at least half a second and at most a minute."""
    return min(max(idle_timeout.total_seconds() / 10, 0.5), 60.0)


def human(delta: datetime.timedelta) -> str:
    """``1h``, ``20m``, ``1h 30m``, ``5s``: a duration as the options write it."""
    seconds = round(delta.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (seconds, "s")) if n]
    return " ".join(parts) or "0s"
