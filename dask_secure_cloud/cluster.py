"""``VMCluster``: a ``SpecCluster`` whose scheduler and workers are VMs.

The cluster knows Dask and nothing of any cloud. For each VM it builds a boot plan
(role, name, that VM's own certificate, the Dask command), renders it to user-data, and
hands the bytes to its driver. Closing the cluster, a failed start and an interrupted
start all end the same way: every VM the driver can find by the cluster id is destroyed,
and the driver is asked again to confirm that none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import datetime
import html
import inspect
import logging
import sys
import time
import uuid
import warnings
from collections.abc import Awaitable, Generator, Mapping, Sequence
from typing import Any, ClassVar

import dask
import dask.config
import distributed
from distributed.comm import connect
from distributed.core import Status
from distributed.deploy.cluster import Cluster, Log, Logs
from distributed.deploy.spec import ProcessInterface, SpecCluster
from distributed.security import Security
from tornado.ioloop import PeriodicCallback

from . import audit, config, images, preloads
from .bootscript import STEP_PREFIX
from .cloudinit import BootPlan, DockerRuntime, NativeRuntime, render
from .credentials import ClusterCredentials, LeafCredentials, Role, leaf_from_security
from .driver import CLUSTER_TAG, CREATOR_TAG, VM, Driver, VMRequest
from .errors import OptionError, SecureCloudError

__all__ = ["ClusterStartError", "VMBootError", "VMCluster", "default_docker_image"]

logger = logging.getLogger(__name__)

#: Keywords of a cluster's ``__init__`` that are not options (nothing to configure).
_NOT_OPTIONS = frozenset({"asynchronous", "loop", "name", "credential", "credentials"})


def option_names(cls: type) -> frozenset[str]:
    """The options a cluster class accepts: the keyword-only parameters of its
    ``__init__`` and of every base's, so the list is never written twice."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is SpecCluster:
            continue
        names |= {
            p.name
            for p in inspect.signature(init).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        if klass is VMCluster:
            break
    return frozenset(names - _NOT_OPTIONS)


_PREVIEW: contextvars.ContextVar[bool] = contextvars.ContextVar("preview", default=False)


@dataclasses.dataclass(frozen=True)
class Preview:
    """What a cluster class would use, built from its options without starting anything:
    the driver (for ``list`` and ``cleanup``) and each role's user-data (``cloud-init``)."""

    provider: str
    cluster_id: str
    driver: Driver
    user_data: Mapping[Role, bytes]


class _Previewed(Exception):  # a control-flow signal, not an error
    def __init__(self, preview: Preview) -> None:
        super().__init__("preview")
        self.preview = preview


def preview(cls: type[VMCluster], **options: Any) -> Preview:
    """Resolve ``options`` (keyword > dask config > default) and check them exactly as
    ``cls(**options)`` would, then stop before any VM, thread or event loop starts."""
    token = _PREVIEW.set(True)
    try:
        cls(**options)
    except _Previewed as done:
        return done.preview
    finally:
        _PREVIEW.reset(token)
    raise AssertionError(f"{cls.__name__} did not reach VMCluster.__init__")


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


class ClusterStartError(SecureCloudError, RuntimeError):
    """The cluster could not start; everything it made has been deleted."""


class VMBootError(SecureCloudError, RuntimeError):
    """A VM did not come up in time. The message carries its console output."""


class ResourcesLeftError(SecureCloudError, RuntimeError):
    """Closing did not delete every VM of the cluster. The message lists them."""


def default_docker_image() -> str:
    """The Dask image that matches this client's dask and Python, never ``:latest``.

    A scheduler or worker on another Dask version than the client is the most common
    failure of cloud Dask clusters, so the default pins both.
    """
    version = dask.__version__.split("+")[0]
    return f"ghcr.io/dask/dask:{version}-py{sys.version_info.major}.{sys.version_info.minor}"


def _cli_flags(command: str, options: Mapping[str, Any], option_name: str) -> list[str]:
    """Turn ``{"nthreads": 2, "nanny": False}`` into ``dask worker`` flags, checked.

    The flags are checked against the ``dask scheduler``/``dask worker`` command itself,
    so a typo fails here, before any VM exists, with the closest real option named.
    """
    import difflib

    if command == "worker":
        from distributed.cli.dask_worker import main as cli
    else:
        from distributed.cli.dask_scheduler import main as cli
    known: dict[str, Any] = {}
    for param in cli.params:
        for flag in (*param.opts, *param.secondary_opts):
            if flag.startswith("--"):
                known[flag[2:]] = param
    reserved = {"tls-ca-file", "tls-cert", "tls-key", "host", "protocol", "name", "port"}
    reserved |= {"dashboard-address", "scheduler-file", "death-timeout"}
    flags: list[str] = []
    for key, value in options.items():
        flag = key.replace("_", "-")
        if flag in reserved:
            raise OptionError(
                f"{option_name}: {key!r} is set by the cluster itself; "
                "use the cluster's own option for it instead"
            )
        param = known.get(flag)
        if param is None:
            close = difflib.get_close_matches(flag, sorted(known), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"{option_name}: 'dask {command}' has no option {key!r}.{hint}")
        if getattr(param, "is_flag", False) or getattr(param, "is_bool_flag", False):
            if not isinstance(value, bool):
                raise OptionError(f"{option_name}: {key!r} takes True or False, got {value!r}")
            if value:
                flags.append(f"--{flag}")
            elif f"--no-{flag}" in param.secondary_opts:
                flags.append(f"--no-{flag}")
            continue
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            flags += [f"--{flag}", str(item)]
    return flags


def _changed(current: Any, default: Any) -> Any:
    """The part of ``current`` that differs from ``default`` (nested dicts)."""
    if isinstance(current, dict) and isinstance(default, dict):
        out = {}
        for key, value in current.items():
            diff = _changed(value, default.get(key, _NO_DEFAULT))
            if diff is not _SAME:
                out[key] = diff
        return out or _SAME
    return _SAME if current == default else current


_SAME = object()
_NO_DEFAULT = object()


def shippable_config(prefixes: Sequence[str]) -> dict[str, Any]:
    """The caller's dask config under ``prefixes``, only where it differs from defaults.

    An allow-list, never the whole config: tokens and credentials live there.
    """
    defaults: dict[str, Any] = {}
    for d in dask.config.defaults:
        dask.config.update(defaults, d)
    shipped: dict[str, Any] = {}
    for prefix in prefixes:
        current = dask.config.get(prefix, default=_NO_DEFAULT)
        if current is _NO_DEFAULT:
            continue
        default = _get_path(defaults, prefix)
        diff = _changed(current, default)
        if diff is not _SAME:
            dask.config.set({prefix: diff}, config=shipped)  # type: ignore[arg-type]
    return shipped


def _get_path(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return _NO_DEFAULT
        node = node.get(part, node.get(part.replace("-", "_"), _NO_DEFAULT))
        if node is _NO_DEFAULT:
            return node
    return node


class _VM(ProcessInterface):
    """One VM of the cluster, as ``SpecCluster`` sees it."""

    role: ClassVar[Role]

    def __init__(self, cluster: VMCluster, name: str) -> None:
        super().__init__()
        self.cluster = cluster
        self.name = name
        self.vm: VM | None = None

    async def _create(self, scheduler_address: str | None) -> VM:
        early = self.cluster._prelaunched.pop(self.name, None)
        if early is not None:
            self.vm = await early
        else:
            self.vm = await self.cluster._create_vm(self.role, self.name, scheduler_address)
        return self.vm

    async def close(self) -> None:
        if self.vm is not None:
            await self.cluster._destroy_vm(self.vm)
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
        cluster = self.cluster
        started = time.monotonic()
        try:
            await cluster.driver.prepare(cluster.cluster_id)
        except (OSError, RuntimeError, ValueError) as e:  # cloud, network, policy
            raise ClusterStartError(f"preparing the network failed: {e}") from e
        cluster._log(f"Network ready in {time.monotonic() - started:.1f}s")
        vm = await self._create(None)
        self.address = cluster._scheduler_address(vm.private_ip)
        if vm.public_ip:
            # Workers use the private address; this client reaches it from outside.
            self.external_address = cluster._scheduler_address(vm.public_ip)
        if cluster.overlap_boot:
            # Its address is known before it has booted: boot the first workers meanwhile.
            cluster._prelaunch_workers(self.address)
        started = time.monotonic()
        await cluster._wait_reachable(vm, self.external_address or self.address)
        cluster._log(f"Scheduler {self.address} reachable after {time.monotonic() - started:.1f}s")
        await super().start()


class WorkerVM(_VM):
    """A worker's VM. Started once the cloud accepts it; a watchdog reports a failed boot."""

    role = Role.WORKER

    def __init__(self, scheduler: str, cluster: VMCluster, name: str) -> None:
        super().__init__(cluster, name)
        self.scheduler = scheduler
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        vm = await self._create(self.scheduler)
        self._watchdog = asyncio.create_task(self.cluster._watch_worker_boot(vm))
        await super().start()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        await super().close()


class _Awaitable:
    def __init__(self, generator: Generator[Any, Any, Any]) -> None:
        self._generator = generator

    def __await__(self) -> Generator[Any, Any, Any]:
        return self._generator


class VMCluster(SpecCluster):
    """A Dask cluster whose scheduler and workers each run on a VM of their own.

    Provider classes (``LocalVMCluster``, ``EC2Cluster``, ...) subclass this with a
    driver and their cloud's options; users do not instantiate it directly.

    Parameters
    ----------
    n_workers
        Worker VMs to start with. Scale later with ``scale`` or ``adapt``.
    security
        ``True`` (default): the cluster makes its own CA and a certificate per VM, and
        the client's key never leaves this process. ``False``: plain ``tcp://`` with no
        certificates, for trusted private networks only. A ``distributed.Security``
        with scheduler and worker certificates: used as given, and shipped to the VMs.
    certificate_lifetime
        How long the certificates stay valid, for example ``"12h"``. The cluster warns
        ``certificate_warning`` before they expire.
    runtime
        ``"docker"`` runs Dask in ``docker_image`` (default: the image matching this
        client's dask and Python versions; Docker is installed at boot when the VM's
        image lacks it, and a tag that does not exist is refused before any VM is made);
        ``"native"`` runs ``python`` on the image, installing this client's dask and
        distributed at boot when it lacks them. See "What a VM does at boot" in the docs.
    python, pip_packages
        ``runtime="native"``: the VMs' interpreter (default ``python3``; the client's
        own on ``LocalVMCluster``), and requirements installed next to dask at boot.
    env_vars, extra_bootstrap
        Environment for the Dask process (written to a 0600 file, not the command line),
        and shell lines run before it starts.
    worker_options, scheduler_options
        Options of ``dask worker`` / ``dask scheduler``, checked before any VM starts.
    lease_timeout
        The scheduler ends itself when this client has not renewed its lease for this
        long (the client was killed, the laptop closed); its workers follow after
        ``worker_death_timeout`` and every VM powers itself off.
    boot_timeout
        How long a VM may take to come up before it is reported, with its console
        output, and the start fails.
    offline_image
        The VM image already holds everything the boot needs (Docker and the pulled
        image, or this client's dask for ``runtime="native"``), so VMs may boot on a
        network with no route out. By default such a network is refused before anything
        is made (see "Networking" in the docs).
    """

    provider: ClassVar[str] = "vm"
    #: Boot the first workers while the scheduler boots. Right for VMs of their own;
    #: wrong where the "VMs" share one machine's cores and would slow each other down.
    overlap_boot: ClassVar[bool] = True

    def __init__(
        self,
        driver: Driver,
        *,
        n_workers: int | None = None,
        security: bool | Security | None = None,
        certificate_lifetime: str | float | datetime.timedelta | None = None,
        certificate_warning: str | float | datetime.timedelta | None = None,
        runtime: str | None = None,
        docker_image: str | None = None,
        python: str | None = None,
        pip_packages: Sequence[str] | None = None,
        env_vars: Mapping[str, str] | None = None,
        extra_bootstrap: Sequence[str] | None = None,
        worker_options: Mapping[str, Any] | None = None,
        scheduler_options: Mapping[str, Any] | None = None,
        scheduler_port: int | None = None,
        dashboard_port: int | None = None,
        boot_timeout: str | float | None = None,
        worker_death_timeout: str | float | None = None,
        lease_timeout: str | float | None = None,
        ship_config: Sequence[str] | None = None,
        offline_image: bool | None = None,
        asynchronous: bool = False,
        loop: Any = None,
        name: str | None = None,
    ) -> None:
        provider = self.provider
        config.check_provider_keys(provider, option_names(type(self)))

        def opt(key: str, value: Any) -> Any:
            return config.option(provider, key, value)

        self.driver = driver
        self.cluster_id = name or f"dsc-{uuid.uuid4().hex[:10]}"
        n_workers = opt("n_workers", n_workers)
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 0:
            raise OptionError(f"n_workers must be a whole number >= 0, got {n_workers!r}")

        security = opt("security", security)
        self._lifetime = config.parse_duration(
            opt("certificate_lifetime", certificate_lifetime), "certificate_lifetime"
        )
        self._warning = config.parse_duration(
            opt("certificate_warning", certificate_warning), "certificate_warning"
        )
        self._boot_timeout = config.parse_duration(
            opt("boot_timeout", boot_timeout), "boot_timeout"
        ).total_seconds()
        self._death_timeout = config.parse_duration(
            opt("worker_death_timeout", worker_death_timeout), "worker_death_timeout"
        ).total_seconds()
        self._lease = config.parse_duration(
            opt("lease_timeout", lease_timeout), "lease_timeout"
        ).total_seconds()
        self._ports = {
            "scheduler_port": config.port(opt("scheduler_port", scheduler_port), "scheduler_port"),
            "dashboard_port": config.port(opt("dashboard_port", dashboard_port), "dashboard_port"),
        }
        offline_image = opt("offline_image", offline_image)
        if not isinstance(offline_image, bool):
            raise OptionError(f"offline_image must be True or False, got {offline_image!r}")
        driver.configure(
            ports=(self._ports["scheduler_port"], self._ports["dashboard_port"]),
            boot_timeout=self._boot_timeout,
            initial_workers=n_workers,
            offline_image=offline_image,
            creator=audit.creator(),
        )

        runtime = opt("runtime", runtime)
        packages = opt("pip_packages", pip_packages) or ()
        if isinstance(packages, str) or not all(isinstance(p, str) for p in packages):
            raise OptionError(
                f"pip_packages must be a list of requirements, got {packages!r}; "
                "wrap a single package in a list"
            )
        if runtime == "docker":
            if packages:
                raise OptionError(
                    "pip_packages applies to runtime='native' (installed on the VM at boot); "
                    "with runtime='docker', build them into docker_image instead"
                )
            image = opt("docker_image", docker_image)
            self._image_is_default = not image
            if image:
                images.parse_reference(image)  # a malformed reference fails now
            self._runtime: DockerRuntime | NativeRuntime = DockerRuntime(
                image or default_docker_image()
            )
        elif runtime == "native":
            self._image_is_default = False
            self._runtime = NativeRuntime(
                self._default_python(opt("python", python)),
                dask_version=dask.__version__,
                distributed_version=distributed.__version__,
                pip_packages=tuple(packages),
            )
        else:
            raise OptionError(f"runtime must be 'docker' or 'native', got {runtime!r}")

        self._env = dict(opt("env_vars", env_vars) or {})
        lines = opt("extra_bootstrap", extra_bootstrap) or ()
        if isinstance(lines, str) or not all(isinstance(line, str) for line in lines):
            raise OptionError(
                f"extra_bootstrap must be a list of shell lines, got {lines!r}; "
                "wrap a single command in a list"
            )
        self._extra_bootstrap = tuple(lines)
        # Worker dashboards are off unless asked for: workers have no public address,
        # so nobody outside could reach them, and each costs a second of boot CPU. The
        # scheduler's dashboard shows every worker.
        worker_opts = {"dashboard": False, **(opt("worker_options", worker_options) or {})}
        self._worker_flags = _cli_flags("worker", worker_opts, "worker_options")
        self._scheduler_flags = _cli_flags(
            "scheduler", opt("scheduler_options", scheduler_options) or {}, "scheduler_options"
        )
        self._ship_config = tuple(opt("ship_config", ship_config) or ())

        self._credentials: ClusterCredentials | None = None
        self._given_security: Security | None = None
        if security is True:
            self._credentials = ClusterCredentials(self.cluster_id, self._lifetime)
            client_security: Security | None = self._credentials.client_security()
            self.protocol = "tls"
        elif security is False:
            client_security = None
            self.protocol = "tcp"
        elif isinstance(security, Security):
            self._given_security = security
            for role in (Role.SCHEDULER, Role.WORKER):
                leaf_from_security(security, role)  # fails now if incomplete
            client_security = security
            self.protocol = "tls"
        else:
            raise OptionError(
                "security must be True (generate credentials), False (plain tcp, trusted "
                f"networks only) or a distributed.Security; got {security!r}"
            )

        # Render both roles' user-data now: an oversized extra_bootstrap or env_vars
        # fails here, before any VM or network exists.
        rendered = {
            role: render(
                self._boot_plan(
                    role, "preview" if _PREVIEW.get() else "size-check", "tls://0.0.0.0:1"
                ),
                self.driver.user_data_limit,
            )
            for role in (Role.SCHEDULER, Role.WORKER)
        }
        if _PREVIEW.get():
            raise _Previewed(Preview(self.provider, self.cluster_id, driver, rendered))

        self._inflight: set[asyncio.Future[Any]] = set()
        self._prelaunched: dict[str, asyncio.Future[VM]] = {}
        self._create_slots: asyncio.Semaphore | None = None
        self._cleanup_error: Exception | None = None
        self._aborting = False
        self._sweep_task: asyncio.Future[None] | None = None
        self._expiry_warned = False
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
            n_workers=n_workers,
            tls=self.protocol == "tls",
            ca_fingerprint=self.ca_fingerprint,
            certificates_expire=self.certificates_expire,
            creator=driver.creator,
        )
        workers = {
            f"worker-{i}": {"cls": WorkerVM, "options": {"cluster": self}} for i in range(n_workers)
        }
        self._i = n_workers
        self._started_at = time.monotonic()
        try:
            super().__init__(
                workers=workers,
                scheduler={"cls": SchedulerVM, "options": {"cluster": self}},
                worker={"cls": WorkerVM, "options": {"cluster": self}},
                asynchronous=asynchronous,
                loop=loop,
                security=client_security,
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
                    self.sync(self._sweep)
                with contextlib.suppress(Exception):
                    self._loop_runner.stop()
            raise
        self.periodic_callbacks["secure-cloud-lease"] = PeriodicCallback(
            self._renew_lease, self._lease * 1000 / 4
        )
        if self._credentials is not None:
            self.periodic_callbacks["certificate-expiry"] = PeriodicCallback(
                self._check_expiry, 60_000
            )

    def _default_python(self, configured: str | None) -> str:
        """The VMs' interpreter for ``runtime="native"`` when none is configured."""
        return configured or "python3"

    # -- what SpecCluster asks of us ----------------------------------------------------

    def _log(self, log: str) -> None:
        """Record progress for ``get_logs`` and the logger; never print."""
        logger.info(log)
        if hasattr(self, "_cluster_manager_logs"):
            self._cluster_manager_logs.append((datetime.datetime.now(), log))

    def _update_worker_status(self, op: str, msg: Any) -> None:
        """Keep ``scheduler_info`` current, and log each worker that joins with the count."""
        super()._update_worker_status(op, msg)
        if op == "add":
            since = time.monotonic() - self._started_at
            joined = len(self.scheduler_info.get("workers", {}))
            self._log(f"Workers joined: {joined} of {len(self.worker_spec)} after {since:.1f}s")

    def _new_worker_name(self, worker_number: int) -> str:
        return f"worker-{worker_number}"

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
        self._check_expiry()
        try:
            await self._check_image()
            await super()._start()
        except RuntimeError as e:
            message = str(e)
            if self._cleanup_error is not None:
                message += f"; and cleanup could not be confirmed: {self._cleanup_error}"
            await audit.record_async("start_failed", self.cluster_id, error=message)
            raise ClusterStartError(message) from e.__cause__
        except BaseException:
            await asyncio.shield(self._abort())
            raise

    async def _check_image(self) -> None:
        """Refuse to launch VMs that would fail to pull their image, before any exists."""
        if not isinstance(self._runtime, DockerRuntime):
            return
        image = self._runtime.image
        presence = await images.image_presence(image)
        if presence is images.Presence.PRESENT:
            return
        if presence is images.Presence.UNKNOWN:
            self._log(f"Could not ask the registry whether {image} exists; the VMs will try")
            return
        if self._image_is_default:
            raise ClusterStartError(
                f"{image} does not exist: dask-docker does not publish an image for every "
                "dask release and Python version. Set runtime='native' to install dask "
                f"{dask.__version__} and distributed {distributed.__version__} on each VM "
                "at boot, or docker_image= to an image with this client's versions."
            )
        raise ClusterStartError(
            f"docker_image {image!r} does not exist in its registry: check its name and tag"
        )

    async def _close(self) -> None:
        """Shut down gracefully where possible; then delete every VM, whatever happened.

        A failure of the graceful part (a VM that would not terminate on the first try,
        a scheduler that is gone) is logged, not raised: the sweep that follows deletes
        what is left and confirms it, and only a failed sweep is an error. After a failed
        start the start's own error is what the caller sees, with the sweep's appended.
        """
        failed_start = self.status == Status.failed
        try:
            await self._close_gracefully()
        except (OSError, RuntimeError) as e:
            logger.warning(
                "Cluster %s: graceful shutdown failed (%s); deleting VMs", self.cluster_id, e
            )
            if self.status != Status.closed:
                await Cluster._close(self)
        try:
            await self._sweep()
        except (OSError, RuntimeError) as e:
            if not failed_start:
                raise
            self._cleanup_error = e
            logger.error("Cluster %s: cleanup after the failed start: %s", self.cluster_id, e)

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
        self._aborting = True
        if self.status == Status.closed:
            return  # the failed start has already cleaned up
        if self.status not in (Status.closed, Status.closing):
            self.status = Status.failed
        await self._close()

    # -- VMs ------------------------------------------------------------------------------

    def _boot_plan(self, role: Role, name: str, scheduler_address: str | None) -> BootPlan:
        if role is Role.SCHEDULER:
            command = (
                "scheduler",
                "--port",
                str(self._ports["scheduler_port"]),
                "--protocol",
                self.protocol,
                *self._scheduler_flags,
            )
            dashboard = self._ports["dashboard_port"]
        else:
            assert scheduler_address is not None
            command = (
                "worker",
                scheduler_address,
                "--name",
                name,
                "--protocol",
                self.protocol,
                "--death-timeout",
                f"{self._death_timeout:.0f}s",
                *self._worker_flags,
            )
            dashboard = None
        return BootPlan(
            cluster_id=self.cluster_id,
            role=role,
            name=name,
            command=command,
            runtime=(
                dataclasses.replace(self._runtime, gpus=True)
                if isinstance(self._runtime, DockerRuntime) and self.driver.gpus(role)
                else self._runtime
            ),
            tls=self._leaf(role, name),
            dask_config=self._vm_config(),
            env=self._env,
            extra_bootstrap=self._extra_bootstrap,
            dashboard_port=dashboard,
            preloads=self._preloads(role),
            boot_timeout=self._boot_timeout,
        )

    def _preloads(self, role: Role) -> dict[str, str]:
        """Preload scripts for a VM of ``role``; providers add their own."""
        if role is Role.SCHEDULER:
            return {"lease.py": preloads.lease(round(self._lease))}
        return {}

    def _leaf(self, role: Role, name: str) -> LeafCredentials | None:
        if self._credentials is not None:
            return self._credentials.issue(role, name)
        if self._given_security is not None:
            return leaf_from_security(self._given_security, role)
        return None

    def _vm_config(self) -> dict[str, Any]:
        shipped = shippable_config(self._ship_config)
        tls = self.protocol == "tls"
        dask.config.set({"distributed.comm.require-encryption": tls}, config=shipped)  # type: ignore[arg-type]
        if self._credentials is not None:
            dask.config.set({"distributed.comm.tls.min-version": 1.3}, config=shipped)  # type: ignore[arg-type]
        return shipped

    def _scheduler_address(self, ip: str) -> str:
        return f"{self.protocol}://{ip}:{self._ports['scheduler_port']}"

    async def _create_vm(self, role: Role, name: str, scheduler_address: str | None) -> VM:
        if self._aborting or self.status in (Status.closing, Status.closed):
            raise ClusterStartError(f"not creating {name}: the cluster is closing")
        plan = self._boot_plan(role, name, scheduler_address)
        user_data = render(plan, self.driver.user_data_limit)
        request = VMRequest(
            cluster_id=self.cluster_id,
            name=name,
            role=role,
            user_data=user_data,
            tags={CLUSTER_TAG: self.cluster_id, CREATOR_TAG: self.driver.creator},
        )
        started = time.monotonic()
        task = asyncio.ensure_future(self._bounded(self.driver.create(request)))
        self._inflight.add(task)
        try:
            vm = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The cloud may still be making it: wait, so close() can find and delete it.
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
        )
        return vm

    async def _bounded(self, creation: Awaitable[VM]) -> VM:
        """At most ``driver.max_concurrent_creates`` creations in flight at once."""
        if self._create_slots is None:
            self._create_slots = asyncio.Semaphore(self.driver.max_concurrent_creates)
        async with self._create_slots:
            return await creation

    def _prelaunch_workers(self, scheduler_address: str) -> None:
        """Create the initial workers' VMs while the scheduler's VM is still booting.

        A worker keeps trying to reach its scheduler, so the two boots overlap instead
        of adding up; on a cloud that saves a whole VM boot. ``WorkerVM.start`` adopts
        the VM made here; a failure surfaces there, and the sweep finds any VM made.
        """
        for name in self.worker_spec:
            if name not in self.workers and name not in self._prelaunched:
                self._prelaunched[name] = asyncio.ensure_future(
                    self._create_vm(Role.WORKER, name, scheduler_address)
                )

    async def _destroy_vm(self, vm: VM) -> None:
        await self.driver.destroy(vm)
        await audit.record_async("vm_deleted", self.cluster_id, name=vm.name, vm_id=vm.id)

    async def _wait_reachable(self, vm: VM, address: str) -> None:
        """Wait until the scheduler completes a (TLS) handshake, or report its console."""
        deadline = time.monotonic() + self._boot_timeout
        args = self.security.get_connection_args("client")
        while True:
            if self._aborting:
                raise ClusterStartError("start interrupted")
            try:
                comm = await connect(address, timeout=1, **args)
            except OSError:
                pass
            else:
                await comm.close()
                return
            state = await self.driver.state(vm)
            if state == "terminated" or time.monotonic() > deadline:
                console = await self.driver.console_output(vm)
                why = (
                    "stopped"
                    if state == "terminated"
                    else (
                        f"was not reachable at {address} within {self._boot_timeout:.0f}s "
                        "(boot_timeout)"
                    )
                )
                raise VMBootError(
                    f"scheduler VM {vm.name} {why}. Console output:\n{_tail(console)}"
                )
            await asyncio.sleep(0.2)

    async def _watch_worker_boot(self, vm: VM) -> None:
        """Report a worker VM that has not joined within ``boot_timeout``."""
        deadline = time.monotonic() + self._boot_timeout
        while time.monotonic() < deadline:
            names = {w.get("name") for w in self.scheduler_info.get("workers", {}).values()}
            if vm.name in names:
                return
            if await self.driver.state(vm) == "terminated":
                break
            await asyncio.sleep(1)
        if self.status != Status.running or self._aborting:
            return  # closing: the VM ended because we asked it to
        console = await self.driver.console_output(vm)
        logger.error(
            "Worker VM %s did not join the scheduler within %.0fs (boot_timeout). "
            "Console output:\n%s",
            vm.name,
            self._boot_timeout,
            _tail(console),
        )

    async def _sweep(self) -> None:
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
        self._aborting = True
        pending = [*self._inflight, *self._prelaunched.values()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._prelaunched.clear()
        deleted = await delete_cluster(self.driver, self.cluster_id)
        self._log(f"Cluster {self.cluster_id}: every VM deleted")
        await audit.record_async("closed", self.cluster_id, swept=deleted, confirmed_none_left=True)

    async def _renew_lease(self) -> None:
        """Tell the scheduler its cluster manager is alive (see ``lease_timeout``)."""
        if self.scheduler_comm is None or self.status != Status.running:
            return
        try:
            await self.scheduler_comm.secure_cloud_lease()
        except OSError as e:
            logger.warning(
                "Cluster %s: could not renew the scheduler's lease: %s", self.cluster_id, e
            )

    # -- certificates ---------------------------------------------------------------------

    def _check_expiry(self) -> None:
        if self._credentials is None or self._expiry_warned:
            return
        remaining = self._credentials.remaining()
        if remaining < self._warning:
            self._expiry_warned = True
            message = (
                f"Cluster {self.cluster_id}: its TLS certificates expire in "
                f"{max(remaining.total_seconds(), 0) / 60:.0f} minutes, after which no "
                "new connection is accepted. Start a new cluster, or set "
                "certificate_lifetime longer for long-running clusters."
            )
            logger.warning(message)
            warnings.warn(message, stacklevel=2)

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
            for vm in await self.driver.list(self.cluster_id):
                text = await self.driver.console_output(vm)
                if text:
                    logs[f"{vm.name} console"] = Log(text)
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
        }
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
            for k, v in self._summary().items()
        )
        return super()._repr_html_(cluster_status=f"<table>{rows}</table>{cluster_status or ''}")

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{type(self).__name__} manages VMs and holds the cluster's CA key; it cannot "
            "be pickled. Pass cluster.scheduler_address and cluster.security instead."
        )


def _tail(text: str, lines: int = 60) -> str:
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
