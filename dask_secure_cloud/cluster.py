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
import datetime
import inspect
import logging
import textwrap
import time
import uuid
from collections.abc import Generator
from typing import Any, ClassVar

from distributed.comm import connect, get_address_host
from distributed.core import Status
from distributed.deploy.cluster import Cluster
from distributed.deploy.spec import SpecCluster

from . import audit, images, liveness, loader, names, owned
from .access import Access
from .cloudinit import DockerRuntime
from .costcap import CostCap
from .dashboard import DashboardProxy
from .display import Display
from .driver import Driver
from .errors import ClusterStartError, ResourcesLeftError, VMBootError
from .fleet import Fleet, delete_cluster
from .membership import WorkerMembership
from .network import NetworkPolicy
from .options import ClusterOptions, docstring_parameters, keyword_signature, resolve
from .plan import BootPlanner, default_docker_image, shippable_config
from .preview import Preview, explicit_none, preview
from .replacement import Replacements
from .upkeep import Upkeep
from .vms import SchedulerVM, WorkerVM

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


def _driver_settings(options: ClusterOptions) -> dict[str, Any]:
    """What the driver is told of the cluster before it makes anything."""
    return dict(
        # With TLS the dashboard listens on the scheduler VM's loopback (Dask's HTTP
        # servers speak plain text): the cluster's own CA reaches it through the
        # scheduler's port (dashboard.py), a user's own Security through an SSH
        # tunnel. Only security=False, plain by choice, opens its port.
        ports=(
            (options.scheduler_port, options.dashboard_port)
            if options.security is False
            else (options.scheduler_port,)
        ),
        boot_timeout=options.boot_timeout.total_seconds(),
        initial_workers=options.n_workers,
        offline_image=options.offline_image,
        creator=audit.creator(),
    )


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


class VMCluster(CostCap, WorkerMembership, Upkeep, Access, Display, SpecCluster):
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
        resolved = resolve(self.Options, explicit_none(options), owner=type(self).__name__)
        self.cluster_id = names.check_cluster_id(name) if name else f"dsc-{uuid.uuid4().hex[:10]}"
        resolved, self.driver = self.setup(resolved, driver, **extra)
        self.options = resolved
        self.driver.configure(**_driver_settings(resolved))
        self.planner = self.make_planner(resolved)
        self.protocol = self.planner.protocol
        self._credentials = self.planner.credentials
        self._given_security = self.planner.given_security
        self.fleet = Fleet(self.driver, self.planner, log=self._log)
        # The cap check of an on-demand fallback counts the workers wanted now.
        self.fleet.workers_wanted = lambda: len(self.worker_spec)
        self._init_upkeep()
        self._cleanup_error: Exception | None = None
        self._dashboard: DashboardProxy | None = None
        self._init_membership(resolved.n_workers)
        #: Lost workers are replaced (replacement.py).
        self._replacements = Replacements(
            self,
            limit=resolved.max_replacements,
            stable_after=resolved.boot_timeout.total_seconds(),
        )
        self._announce()
        # Owned until its close confirms nothing is left; at exit, closed (owned.py).
        owned.register(self)
        # Whether this client is alive, for `dask secure-cloud list` (liveness.py).
        liveness.claim(self.cluster_id, self.provider)
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

    def _announce(self) -> None:
        """The cluster's first log line and audit record: its id, TLS and CA."""
        credentials = self._credentials
        self._log(
            f"Cluster {self.cluster_id}: {self.protocol}, "
            + (
                f"CA {credentials.ca_fingerprint[:23]}..., certificates valid until "
                f"{credentials.not_after:%Y-%m-%d %H:%M} UTC"
                if credentials
                else "no cluster CA"
            )
        )
        audit.record(
            "created",
            self.cluster_id,
            provider=self.provider,
            driver=repr(self.driver),
            n_workers=self.options.n_workers,
            tls=self.protocol == "tls",
            ca_fingerprint=self.ca_fingerprint,
            certificates_expire=self.certificates_expire,
            creator=self.driver.creator,
        )

    def _log(self, log: str) -> None:
        """Record progress for ``get_logs`` and the logger; never print."""
        logger.info(log)
        if hasattr(self, "_cluster_manager_logs"):
            self._cluster_manager_logs.append((datetime.datetime.now(), log))

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

    async def _start(self) -> None:
        self._add_upkeep()
        self._check_expiry()
        try:
            if isinstance(runtime := self.planner.runtime, DockerRuntime):
                # Refuse VMs that would fail to pull their image, before any exists.
                await images.refuse_missing(runtime.image, self.planner.image_is_default, self._log)
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

    async def _relay_enrollment(self, requests: list[list[Any]]) -> list[Any]:
        """Workers' enrollment lines, carried by the scheduler (see ``enrollment.py``)."""
        if self.scheduler_comm is None:
            raise OSError("the scheduler is not reachable yet")
        return await self.scheduler_comm.secure_cloud_enroll_relay(requests=requests)

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{type(self).__name__} manages VMs and holds the cluster's CA key; it cannot "
            "be pickled. To let another process connect, pass it "
            "cluster.scheduler_address and cluster.portable_security('<name>') (a client "
            "certificate of its own; cluster.security holds this client's key and does "
            "not travel)."
        )
