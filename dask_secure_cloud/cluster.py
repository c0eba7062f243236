"""``VMCluster``: a ``SpecCluster`` whose scheduler and workers are VMs.

The cluster knows Dask and nothing of any cloud. It is the third of three parts:
``plan.BootPlanner`` decides what each VM is told at boot (no I/O), ``fleet.Fleet`` makes
every driver call (creation, watching, the sweep), and this class is what Dask sees.
Closing the cluster, a failed start and an interrupted start all end the same way, in
``Fleet.sweep``: every VM the driver can find by the cluster id is destroyed, and the
driver is asked again to confirm that none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import html
import inspect
import logging
import math
import textwrap
import time
import uuid
import warnings
from collections.abc import Generator, Mapping
from typing import Any, ClassVar

import dask
import distributed
from dask.utils import parse_bytes
from distributed.comm import connect, get_address_host
from distributed.core import Status
from distributed.deploy.cluster import Cluster, Log, Logs
from distributed.deploy.spec import ProcessInterface, SpecCluster
from distributed.security import Security
from tornado.ioloop import PeriodicCallback

from . import audit, images, liveness, loader, names, owned, pricing
from .cloudinit import DockerRuntime
from .credentials import Role
from .dashboard import DashboardProxy
from .driver import VM, Driver
from .enrollment import RelayedEnrollment
from .errors import ClusterStartError, OptionError, ResourcesLeftError, VMBootError
from .fleet import Fleet, delete_cluster
from .network import NetworkPolicy
from .options import ClusterOptions, docstring_parameters, keyword_signature, resolve
from .plan import BootPlanner, default_docker_image, shippable_config
from .renewal import Renewal, renewal_interval
from .replacement import Replacements

__all__ = [
    "ClusterStartError",
    "Preview",
    "ResourcesLeftError",
    "VMBootError",
    "VMCluster",
    "default_docker_image",
    "delete_cluster",
    "preview",
    "shippable_config",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Preview:
    """What a cluster class would use, built from its options without starting anything:
    the driver (for ``list`` and ``cleanup``) and each role's user-data (``cloud-init``)."""

    provider: str
    cluster_id: str
    driver: Driver
    user_data: Mapping[Role, bytes]
    options: Any = None

    def cost(self) -> pricing.Estimate:
        """The cluster's hourly cost at its ``n_workers``, from the cloud's price list
        (asked here, not when the preview is made: ``list`` and ``cleanup`` need none)."""
        return pricing.estimate(self.options, self.options.n_workers, self.driver)


def preview(cls: type[VMCluster], **options: Any) -> Preview:
    """Resolve ``options`` (keyword > dask config > default) and check them exactly as
    ``cls(**options)`` would, then stop before any VM, thread or event loop starts."""
    name = options.pop("name", None)
    extra = {k: options.pop(k) for k in list(options) if k in cls.extra_keywords}
    resolved, driver = cls.setup(
        resolve(cls.Options, _explicit_none(options), owner=cls.__name__), **extra
    )
    cluster_id = names.check_cluster_id(name) if name else "dsc-preview"
    planner = BootPlanner(resolved, cluster_id, driver, native_python=cls.native_python(resolved))
    user_data = {
        role: planner.user_data(role, "preview", "tls://0.0.0.0:1")
        for role in (Role.SCHEDULER, Role.WORKER)
    }
    return Preview(cls.Options.provider or cls.provider, cluster_id, driver, user_data, resolved)


def _explicit_none(options: dict[str, Any]) -> dict[str, Any]:
    """``idle_timeout=None`` given as a keyword means "never", as in Dask; to
    :func:`resolve` a ``None`` means "not given" (then the config or the default)."""
    if "idle_timeout" in options and options["idle_timeout"] is None:
        return {**options, "idle_timeout": False}
    return options


class _VM(ProcessInterface):
    """One VM of the cluster, as ``SpecCluster`` sees it: it starts and stops itself
    through the cluster's fleet."""

    role: ClassVar[Role]

    def __init__(self, cluster: VMCluster, name: str) -> None:
        super().__init__()
        self.cluster = cluster
        self.name = name
        self.vm: VM | None = None

    async def close(self) -> None:
        if self.vm is not None:
            await self.cluster.fleet.destroy(self.vm)
            self.vm = None
        await super().close()

    def __repr__(self) -> str:
        where = f" at {self.vm.private_ip}" if self.vm else ""
        return f"<{type(self).__name__} {self.name}{where}: status={self.status.name}>"


class SchedulerVM(_VM):
    """The scheduler's VM. Ready once a client can complete a handshake with it."""

    role = Role.SCHEDULER

    def __init__(self, cluster: VMCluster, name: str = "scheduler") -> None:
        super().__init__(cluster, name)

    async def start(self) -> None:
        cluster, fleet = self.cluster, self.cluster.fleet
        await cluster._check_cost()  # before anything is made, the network included
        await fleet.prepare()
        self.vm = vm = await fleet.create(Role.SCHEDULER, self.name, None)
        self.address = cluster.planner.scheduler_address(vm.private_ip)
        if vm.public_ip:
            # Workers use the private address; this client reaches it from outside.
            self.external_address = cluster.planner.scheduler_address(vm.public_ip)
        if cluster.overlap_boot:
            # Its address is known before it has booted: boot the first workers meanwhile.
            fleet.prelaunch(
                [n for n in cluster.worker_spec if n not in cluster.workers], self.address
            )
        started = time.monotonic()
        await fleet.wait_reachable(
            vm,
            self.external_address or self.address,
            cluster.security.get_connection_args("client"),
        )
        cluster._log(f"Scheduler {self.address} reachable after {time.monotonic() - started:.1f}s")
        await super().start()


class WorkerVM(_VM):
    """A worker's VM. Started once the cloud accepts it; the fleet's watcher reports a
    failed boot."""

    role = Role.WORKER

    def __init__(self, scheduler: str, cluster: VMCluster, name: str) -> None:
        super().__init__(cluster, name)
        self.scheduler = scheduler
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cluster = self.cluster
        try:
            self.vm = vm = await cluster.fleet.create(Role.WORKER, self.name, self.scheduler)
        except ClusterStartError as e:
            # A replacement the cloud refused is one more lost worker (replacement.py).
            if not cluster._replacements.launch_failed(self.name, e):
                raise
            await super().start()
            return
        if cluster._worker_enrollment is not None:
            cluster._worker_enrollment.add(vm.name, vm.private_ip)
        self._watchdog = asyncio.create_task(
            cluster.fleet.watch_worker_boot(
                vm,
                # Joined once is joined: one that left since is lost, not a failed boot.
                joined=lambda: (
                    self.name in cluster._workers_seen or cluster._address_of(vm) is not None
                ),
                closing=lambda: cluster.status != Status.running,
                on_failed=lambda state: cluster._replacements.boot_failed(self.name, vm, state),
            )
        )
        await super().start()

    def booting(self) -> bool:
        """Whether this VM's worker has yet to join (its boot watch still runs)."""
        return self._watchdog is not None and not self._watchdog.done()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.cluster._worker_enrollment is not None:
            self.cluster._worker_enrollment.discard(self.name)
        if self.cluster.planner.enrollment is not None:
            self.cluster.planner.enrollment.forget(self.name)
        await super().close()


class _Awaitable:
    def __init__(self, generator: Generator[Any, Any, Any]) -> None:
        self._generator = generator

    def __await__(self) -> Generator[Any, Any, Any]:
        return self._generator


_INTRO = """A Dask cluster whose scheduler and workers each run on a VM of their own.

    Provider classes (``LocalVMCluster``, ``EC2Cluster``, ...) subclass this with a
    driver and their cloud's options; users do not instantiate it directly. Every option
    is read the same way: a keyword beats ``secure-cloud.<provider>.<option>`` in the
    dask config, which beats ``secure-cloud.<option>`` (see "Configuration").
"""


class VMCluster(SpecCluster):
    __doc__ = (
        _INTRO
        + "\n"
        + textwrap.indent(docstring_parameters(ClusterOptions, own_only=False), "    ")
    )

    #: The options this class accepts: their names, types, defaults, docs and checks.
    Options: ClassVar[type[ClusterOptions]] = ClusterOptions
    provider: ClassVar[str] = "vm"
    #: The cloud's driver class, which :meth:`make_driver` builds.
    driver_class: ClassVar[type[Driver] | None] = None
    #: Keywords besides the options that the class's :meth:`make_driver` takes (objects
    #: no config file can hold, such as a credential).
    extra_keywords: ClassVar[tuple[str, ...]] = ()
    #: Boot the first workers while the scheduler boots. Right for VMs of their own;
    #: wrong where the "VMs" share one machine's cores and would slow each other down.
    overlap_boot: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each provider class states its options once; its signature and the
        "Parameters" section of its docstring are written from them."""
        super().__init_subclass__(**kwargs)
        if "Options" not in cls.__dict__:
            return
        extra = [
            inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None)
            for k in cls.extra_keywords
        ]
        common = [
            inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=d)
            for k, d in (("asynchronous", False), ("loop", None), ("name", None))
        ]
        cls.__signature__ = keyword_signature(cls.Options, [*extra, *common])  # type: ignore[attr-defined]
        intro = inspect.cleandoc(cls.__doc__ or "")
        own = docstring_parameters(cls.Options, own_only=True)
        cls.__doc__ = (
            f"{intro}\n\nEvery option of :class:`~dask_secure_cloud.cluster.VMCluster` "
            f"applies (with this cloud's defaults), plus:\n\n{own}\n"
        )

    @classmethod
    def make_driver(cls, options: Any, **extra: Any) -> Driver:
        """The driver for ``options``; it makes nothing until the cluster starts.

        Built from the options, the network policy they imply and the extra keywords a
        user passed; a cloud whose driver needs more (a token, a region check) overrides
        this."""
        if cls.driver_class is None:
            raise TypeError(f"{cls.__name__} needs a driver: pass one as the first argument")
        return cls.driver_class(options, network=NetworkPolicy.from_options(options), **extra)

    @classmethod
    def setup(cls, options: Any, driver: Driver | None = None, **extra: Any) -> tuple[Any, Driver]:
        """The options as this class runs them, and its driver. A class whose driver
        decides an option (``LocalVMCluster``'s ports) overrides this."""
        return options, driver or cls.make_driver(options, **extra)

    @classmethod
    def native_python(cls, options: ClusterOptions) -> str:
        """The VMs' interpreter for ``runtime="native"`` when ``python`` is not set."""
        return "python3"

    def make_planner(self, options: Any) -> BootPlanner:
        """What this cluster's VMs are told at boot. ``LocalVMCluster`` overrides it: its
        workers share one machine, so each one's size depends on the cluster's."""
        return BootPlanner(
            options, self.cluster_id, self.driver, native_python=self.native_python(options)
        )

    def __init__(
        self,
        driver: Driver | None = None,
        *,
        asynchronous: bool = False,
        loop: Any = None,
        name: str | None = None,
        **options: Any,
    ) -> None:
        extra = {k: options.pop(k) for k in list(options) if k in self.extra_keywords}
        resolved = resolve(self.Options, _explicit_none(options), owner=type(self).__name__)
        self.cluster_id = names.check_cluster_id(name) if name else f"dsc-{uuid.uuid4().hex[:10]}"
        resolved, self.driver = self.setup(resolved, driver, **extra)
        self.options = resolved
        self.driver.configure(
            # With TLS the dashboard listens on the scheduler VM's loopback (Dask's HTTP
            # servers speak plain text): the cluster's own CA reaches it through the
            # scheduler's port (dashboard.py), a user's own Security through an SSH
            # tunnel. Only security=False, plain by choice, opens its port.
            ports=(
                (resolved.scheduler_port, resolved.dashboard_port)
                if resolved.security is False
                else (resolved.scheduler_port,)
            ),
            boot_timeout=resolved.boot_timeout.total_seconds(),
            initial_workers=resolved.n_workers,
            offline_image=resolved.offline_image,
            creator=audit.creator(),
        )
        self.planner = self.make_planner(resolved)
        self.protocol = self.planner.protocol
        self._credentials = self.planner.credentials
        self._given_security = self.planner.given_security
        self.fleet = Fleet(self.driver, self.planner, log=self._log)
        self._worker_enrollment: RelayedEnrollment | None = None
        self._renewal: Renewal | None = None
        if self.planner.enrollment is not None:
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
        self._cleanup_error: Exception | None = None
        self._dashboard: DashboardProxy | None = None
        self._expiry_warned = False
        #: Worker VMs whose Dask worker joined at the VM's address, and of those, the
        #: ones whose worker is gone since (see _notice_workers_gone).
        self._workers_seen: set[str] = set()
        self._workers_gone: set[str] = set()
        #: The number of the next new worker's name (see _new_worker_name).
        self._next_worker = resolved.n_workers
        #: Lost workers are replaced (replacement.py).
        self._replacements = Replacements(
            self,
            limit=resolved.max_replacements,
            stable_after=resolved.boot_timeout.total_seconds(),
        )
        self._log(
            f"Cluster {self.cluster_id}: {self.protocol}, "
            + (
                f"CA {self._credentials.ca_fingerprint[:23]}..., certificates valid until "
                f"{self._credentials.not_after:%Y-%m-%d %H:%M} UTC"
                if self._credentials
                else "no cluster CA"
            )
        )
        audit.record(
            "created",
            self.cluster_id,
            provider=self.provider,
            driver=repr(self.driver),
            n_workers=resolved.n_workers,
            tls=self.protocol == "tls",
            ca_fingerprint=self.ca_fingerprint,
            certificates_expire=self.certificates_expire,
            creator=self.driver.creator,
        )
        # Owned until its close confirms nothing is left; at exit, closed (owned.py).
        owned.register(self)
        # Whether this client is alive, for `dask secure-cloud list` (liveness.py).
        liveness.claim(self.cluster_id, self.provider)
        #: The idle period the scheduler last reported (its ``idle_since``), and when this
        #: client first saw it (monotonic): see _check_idle.
        self._idle_seen: tuple[float, float] | None = None
        self._leftover_check: asyncio.Task[None] | None = None
        workers = {
            f"worker-{i}": {"cls": WorkerVM, "options": {"cluster": self}}
            for i in range(resolved.n_workers)
        }
        self._i = resolved.n_workers
        self._started_at = time.monotonic()
        try:
            super().__init__(
                workers=workers,
                scheduler={"cls": SchedulerVM, "options": {"cluster": self}},
                worker={"cls": WorkerVM, "options": {"cluster": self}},
                asynchronous=asynchronous,
                loop=loop,
                security=self.planner.client_security,
                name=self.cluster_id,
            )
        except BaseException:
            # An interrupt (Ctrl-C) during a synchronous start: the loop is still ours.
            if not asynchronous and self.status != Status.closed:
                with contextlib.suppress(Exception):
                    self.sync(self._close)
                # The cancelled start may still be sweeping: the loop stops only after
                # the sweep, or its cloud calls would die with the loop's executor.
                with contextlib.suppress(Exception):
                    self.sync(self.fleet.sweep)
                with contextlib.suppress(Exception):
                    self._loop_runner.stop()
            raise

    def worker_names(self) -> set[str]:
        """The names of the workers connected to the scheduler now."""
        return {w.get("name") for w in self.scheduler_info.get("workers", {}).values()}

    # -- what SpecCluster asks of us ----------------------------------------------------

    def _log(self, log: str) -> None:
        """Record progress for ``get_logs`` and the logger; never print."""
        logger.info(log)
        if hasattr(self, "_cluster_manager_logs"):
            self._cluster_manager_logs.append((datetime.datetime.now(), log))

    def _update_worker_status(self, op: str, msg: Any) -> None:
        """Keep ``scheduler_info`` current, log each worker that joins with the count, and
        notice a worker VM whose Dask worker is gone while the VM is not."""
        super()._update_worker_status(op, msg)
        self._notice_workers_gone()
        if op == "add":
            since = time.monotonic() - self._started_at
            joined = len(self.scheduler_info.get("workers", {}))
            self._log(f"Workers joined: {joined} of {len(self.worker_spec)} after {since:.1f}s")

    def _notice_workers_gone(self) -> None:
        """Report each worker VM whose Dask worker joined and is gone while the VM stays
        (removed from the scheduler, or its process died): in the log at once, and in
        ``repr`` until it is back or replaced. The replacement policy watches it from
        then on (``replacement.py``). A worker the cluster itself retires (``scale``)
        has left ``worker_spec`` first, and is neither reported nor replaced."""
        if self.status != Status.running:
            return
        present = self._worker_addresses()
        for name in list(self._workers_seen | self._workers_gone):
            if name not in self.worker_spec:
                self._workers_seen.discard(name)
                self._workers_gone.discard(name)
        for name in present:
            self._workers_seen.add(name)
            self._replacements.joined(name)
            if name in self._workers_gone:
                self._workers_gone.discard(name)
                self._log(f"{name}: its Dask worker is back")
        for name in sorted(self._workers_seen - set(present) - self._workers_gone):
            self._workers_gone.add(name)
            message = f"{name}: VM running, its Dask worker is gone"
            logger.warning("Cluster %s: %s", self.cluster_id, message)
            if hasattr(self, "_cluster_manager_logs"):
                self._cluster_manager_logs.append((datetime.datetime.now(), message))
            self._replacements.worker_gone(name, getattr(self.workers.get(name), "vm", None))

    def _workers_gone_report(self) -> list[str]:
        """One line per worker VM whose Dask worker is gone, saying where its VM is."""
        lines = []
        for name in sorted(self._workers_gone):
            vm = getattr(self.workers.get(name), "vm", None)
            if vm is None:
                lines.append(f"{name}: its Dask worker left and its VM was deleted")
            elif self.fleet.state(vm) == "stopped":
                lines.append(f"{name}: VM stopped (it still bills), its Dask worker is gone")
            elif self.fleet.state(vm) == "terminated":
                lines.append(f"{name}: VM terminated, its Dask worker is gone")
            else:
                lines.append(f"{name}: VM running, its Dask worker is gone")
        return lines + self._replacements.given_up

    def _new_worker_name(self, worker_number: int) -> str:
        """A worker name this cluster never gave before. ``SpecCluster`` would give the
        number of a worker that left its spec again, but a name is a VM's identity: its
        certificate, its directory, the scheduler's record of its worker."""
        number = max(worker_number, self._next_worker)
        self._next_worker = number + 1
        return f"worker-{number}"

    def __await__(self) -> Generator[Any, Any, VMCluster]:
        async def _() -> VMCluster:
            try:
                await _Awaitable(SpecCluster.__await__(self))
            except BaseException:
                # Cancelled or failed part-way: nothing may be left behind.
                await asyncio.shield(self._abort())
                raise
            return self

        return _().__await__()

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

    async def _start(self) -> None:
        self._add_upkeep()
        self._check_expiry()
        try:
            await self._check_image()
            await super()._start()
            if self._credentials is not None:
                self._dashboard = DashboardProxy(
                    self.scheduler_address, self.security.get_connection_args("client")
                )
                await self._dashboard.start()
                # This user's other processes may connect by address (loader.py).
                loader.offer(self)
            elif self.options.security is False and (port := self._plain_dashboard_port()):
                # Plain HTTP at the scheduler's address, which jupyter-server-proxy (the
                # JupyterLab panes) refuses: relay it on 127.0.0.1 (dashboard.py).
                self._dashboard = DashboardProxy.plain(
                    get_address_host(self.scheduler_address), port
                )
                await self._dashboard.start()
            # Warn of this user's clusters on this cloud whose client is gone: after the
            # start, so it can neither fail nor interleave with it, and waited for a few
            # seconds at most (one listing), so that it is done, its cloud calls with it,
            # when the caller gets the cluster; a slower cloud finishes in the background.
            self._leftover_check = asyncio.ensure_future(
                liveness.warn_leftovers(self.driver, self.provider, self.cluster_id)
            )
            await asyncio.wait({self._leftover_check}, timeout=liveness.LEFTOVER_WAIT)
        except RuntimeError as e:
            message = str(e)
            if self._cleanup_error is not None:
                message += f"; and cleanup could not be confirmed: {self._cleanup_error}"
            await audit.record_async("start_failed", self.cluster_id, error=message)
            cause = e.__cause__
            # The fleet wraps a step's failure in a ClusterStartError naming the step:
            # the user's error is caused by what failed (a NoRouteOutError, say).
            while isinstance(cause, ClusterStartError) and cause.__cause__ is not None:
                cause = cause.__cause__
            raise ClusterStartError(message) from cause
        except BaseException:
            await asyncio.shield(self._abort())
            raise

    async def _check_image(self) -> None:
        """Refuse to launch VMs that would fail to pull their image, before any exists."""
        runtime = self.planner.runtime
        if not isinstance(runtime, DockerRuntime):
            return
        image = runtime.image
        presence = await images.image_presence(image)
        if presence is images.Presence.PRESENT:
            return
        if presence is images.Presence.UNKNOWN:
            self._log(f"Could not ask the registry whether {image} exists; the VMs will try")
            return
        if self.planner.image_is_default:
            raise ClusterStartError(
                f"{image} does not exist: dask-docker does not publish an image for every "
                "dask release and Python version. Set runtime='native' to install dask "
                f"{dask.__version__} and distributed {distributed.__version__} on each VM "
                "at boot, or docker_image= to an image with this client's versions."
            )
        raise ClusterStartError(
            f"docker_image {image!r} does not exist in its registry: check its name and tag"
        )

    # -- cost ---------------------------------------------------------------------------

    async def _check_cost(self) -> None:
        """Price the cluster before anything exists (the log line, the reprs, ``list``)
        and refuse a start above ``max_hourly_cost``. Price lists are read in a thread:
        their clients block."""
        workers = len(self.worker_spec)
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
        cost = getattr(self, "_cost", None)
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
        cost = getattr(self, "_cost", None)
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

    async def _close(self) -> None:
        """Shut down gracefully where possible; then delete every VM, whatever happened.

        A failure of the graceful part (a VM that would not terminate on the first try,
        a scheduler that is gone) is logged, not raised: the sweep that follows deletes
        what is left and confirms it, and only a failed sweep is an error. After a failed
        start the start's own error is what the caller sees, with the sweep's appended.
        """
        failed_start = self.status == Status.failed
        loader.withdraw(self.cluster_id)
        check = getattr(self, "_leftover_check", None)
        if check is not None and not check.done():
            check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await check
        if self._worker_enrollment is not None:
            await self._worker_enrollment.close()
        await self._replacements.close()
        if self._dashboard is not None:
            await self._dashboard.close()
            self._dashboard = None
        try:
            await self._close_gracefully()
        except (OSError, RuntimeError) as e:
            logger.warning(
                "Cluster %s: graceful shutdown failed (%s); deleting VMs", self.cluster_id, e
            )
            if self.status != Status.closed:
                await Cluster._close(self)
        try:
            await self.fleet.sweep()
        except (OSError, RuntimeError) as e:
            if not failed_start:
                raise
            self._cleanup_error = e
            logger.error("Cluster %s: cleanup after the failed start: %s", self.cluster_id, e)
        else:
            owned.release(self.cluster_id)
            liveness.drop(self.cluster_id)

    async def _close_gracefully(self) -> None:
        if self.status == Status.running and not await self._scheduler_reachable():
            # Its lease ran out, or its VM died: skip the graceful shutdown, which
            # would wait on connect timeouts, and go straight to deleting the VMs.
            self._log(f"Cluster {self.cluster_id}: scheduler unreachable, deleting VMs")
            if isinstance(self.scheduler, SchedulerVM):
                self.scheduler.status = Status.closed
            if self.scheduler_comm is not None:
                await self.scheduler_comm.close_rpc()
                self.scheduler_comm = None
        await super()._close()

    async def _scheduler_reachable(self) -> bool:
        address = getattr(self.scheduler, "external_address", None) or getattr(
            self.scheduler, "address", None
        )
        if not address:
            return False
        try:
            comm = await connect(address, timeout=2, **self.security.get_connection_args("client"))
        except OSError:
            return False
        await comm.close()
        return True

    async def _abort(self) -> None:
        self.fleet.closing = True
        if self.status == Status.closed:
            return  # the failed start has already cleaned up
        if self.status not in (Status.closed, Status.closing):
            self.status = Status.failed
        await self._close()

    def _workers_by_host(self) -> dict[str, list[tuple[str, str]]]:
        """The connected Dask workers' ``(address, name)``, by the host they listen on."""
        index: dict[str, list[tuple[str, str]]] = {}
        for address, info in self.scheduler_info.get("workers", {}).items():
            index.setdefault(get_address_host(address), []).append((address, str(info.get("name"))))
        return index

    def _address_of(
        self, vm: VM, by_host: Mapping[str, list[tuple[str, str]]] | None = None
    ) -> str | None:
        """The Dask address of ``vm``'s worker: one listening on the VM's own address, as
        the fleet launched it. A name alone proves nothing (a worker names itself); the
        name only tells apart the processes that share one address (``LocalVMCluster``
        without a subnet; ``nworkers``, whose processes are ``NAME-0``, ``NAME-1``...)."""
        found = None
        if by_host is None:
            by_host = self._workers_by_host()
        for address, name in by_host.get(vm.private_ip, ()):
            if name == vm.name:
                return address
            head, _, tail = name.rpartition("-")
            if found is None and head == vm.name and tail.isdigit():
                found = address
        return found

    def _worker_addresses(self) -> dict[str, str]:
        """Each worker VM's Dask address, by the VM's name, found at the VM's own address
        (see :meth:`_address_of`): what renewal and anything else done for one VM uses."""
        by_host = self._workers_by_host()
        found = {}
        for name, worker in list(getattr(self, "workers", {}).items()):
            vm = getattr(worker, "vm", None)
            if vm is not None and (address := self._address_of(vm, by_host)) is not None:
                found[name] = address
        return found

    async def _relay_enrollment(self, requests: list[list[Any]]) -> list[Any]:
        """Workers' enrollment lines, carried by the scheduler (see ``enrollment.py``)."""
        if self.scheduler_comm is None:
            raise OSError("the scheduler is not reachable yet")
        return await self.scheduler_comm.secure_cloud_enroll_relay(requests=requests)

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
            f"Cluster {self.cluster_id}: idle for {_human(timeout)} (idle_timeout): closing "
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

    # -- certificates ---------------------------------------------------------------------

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

    def _plain_dashboard_port(self) -> int | None:
        """The port of the scheduler's plain-HTTP dashboard, if it serves one."""
        port = self.scheduler_info.get("services", {}).get("dashboard")
        return int(port) if port else None

    @property
    def dashboard_link(self) -> str:
        """The scheduler's dashboard, on this machine: a proxy on ``127.0.0.1`` forwards
        it, over mutual TLS with the cluster's own CA, as plain HTTP with
        ``security=False`` (see ``dashboard.py``)."""
        if self._dashboard is not None:
            return self._dashboard.link
        if self._credentials is None and self.options.security is False:
            return super().dashboard_link
        # A user's own Security: the dashboard is the scheduler VM's alone (its
        # loopback); no link from here would answer.
        return ""

    def portable_security(
        self, name: str, lifetime: datetime.timedelta | str | float | None = None
    ) -> Security:
        """A ``Security`` for another process (a second notebook, a job runner) to
        connect to this cluster's scheduler as a client.

        It carries a client certificate and key of its own, named ``name`` in its
        certificate, so handing it over never hands over this process's key. Nothing
        renews it once handed over: it is valid for ``lifetime`` (``certificate_lifetime``
        unless given, at most until the CA's end). It may be pickled; treat it as a
        password.
        """
        if self._credentials is None:
            raise OptionError(
                "portable_security: this cluster has no CA of its own (security=False or a "
                "given Security); pass your own Security to the other process instead"
            )
        return self._credentials.portable_client_security(name, lifetime)

    @property
    def ca_fingerprint(self) -> str | None:
        """SHA-256 fingerprint of the cluster CA, or ``None`` without generated TLS."""
        return self._credentials.ca_fingerprint if self._credentials else None

    @property
    def certificates_expire(self) -> datetime.datetime | None:
        return self._credentials.not_after if self._credentials else None

    # -- display, logs, pickling ----------------------------------------------------------

    async def _get_logs(
        self, cluster: bool = True, scheduler: bool = True, workers: bool = True
    ) -> Logs:
        logs = await super()._get_logs(cluster, scheduler, workers)
        if cluster:
            for vm_name, text in (await self.fleet.consoles()).items():
                logs[f"{vm_name} console"] = Log(text)
        return logs

    def _summary(self) -> dict[str, str]:
        """What the text and HTML reprs show: where, how many VMs, and the TLS state."""
        workers = len(getattr(self, "workers", {}) or {})
        scheduler = 1 if getattr(self, "scheduler", None) is not None else 0
        summary = {
            "provider": self.provider,
            "location": self.driver.where() or "-",
            "vms": f"{scheduler + workers} ({scheduler} scheduler, {workers} workers)",
            "tls": "off" if self.protocol == "tcp" else "on",
            "idle_timeout": (
                "off" if self.options.idle_timeout is None else _human(self.options.idle_timeout)
            ),
        }
        cost = getattr(self, "_cost", None)
        if cost is not None:
            summary["cost"] = cost.short(len(getattr(self, "worker_spec", {}) or {}))
        if getattr(self, "_replacements", None) and (gone := self._workers_gone_report()):
            summary["workers gone"] = "; ".join(gone)
        if self._credentials is not None:
            summary["ca"] = self._credentials.ca_fingerprint
            summary["expires"] = f"{self._credentials.not_after:%Y-%m-%d %H:%M} UTC"
        elif self._given_security is not None:
            summary["ca"] = "your own"
        return summary

    def __repr__(self) -> str:
        summary = self._summary()
        if "ca" in summary and self._credentials is not None:
            summary["ca"] = summary["ca"][:11] + "..."
        fields = ", ".join(f"{k}={v}" for k, v in summary.items())
        address = getattr(self, "scheduler_address", "<not started>")
        return f"{type(self).__name__}({self.cluster_id}, {address!r}, {fields})"

    def _repr_html_(self, cluster_status: str | None = None) -> str:
        rows = "".join(
            f"<tr><th style='text-align: left'>{html.escape(k)}</th>"
            f"<td style='text-align: left'>{html.escape(v)}</td></tr>"
            for k, v in self._html_summary().items()
        )
        return super()._repr_html_(cluster_status=f"<table>{rows}</table>{cluster_status or ''}")

    def _html_summary(self) -> dict[str, str]:
        """The summary with the cost spelled out: how it adds up, its source and age."""
        summary = self._summary()
        cost = getattr(self, "_cost", None)
        if cost is not None:
            summary["cost"] = cost.describe(len(getattr(self, "worker_spec", {}) or {}))
        return summary

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{type(self).__name__} manages VMs and holds the cluster's CA key; it cannot "
            "be pickled. To let another process connect, pass it "
            "cluster.scheduler_address and cluster.portable_security('<name>') (a client "
            "certificate of its own; cluster.security holds this client's key and does "
            "not travel)."
        )


def idle_poll_interval(idle_timeout: datetime.timedelta) -> float:
    """Seconds between the client's polls of the scheduler's idleness: a tenth of the
    timeout, at least half a second and at most a minute."""
    return min(max(idle_timeout.total_seconds() / 10, 0.5), 60.0)


def _human(delta: datetime.timedelta) -> str:
    """``1h``, ``20m``, ``1h 30m``, ``5s``: a duration as the options write it."""
    seconds = round(delta.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (seconds, "s")) if n]
    return " ".join(parts) or "0s"
