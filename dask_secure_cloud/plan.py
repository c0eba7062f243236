"""Boot planning: resolved options and the cluster's credentials -> each VM's boot plan
-> its user-data. No I/O, no event loop, no cloud call.

``preview`` (and ``dask secure-cloud cloud-init``) is this module called directly: it
resolves a cluster class's options, builds its driver without calling it, and renders
each role's user-data, exactly as a start would.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import dask
import dask.config
import distributed
from distributed.security import Security

from . import images, imaging, preloads
from .cloudinit import BootPlan, DockerRuntime, EnrollmentTicket, NativeRuntime, render
from .credentials import ClusterCredentials, LeafCredentials, Role, leaf_from_security
from .driver import Driver
from .enrollment import Enrollment
from .errors import OptionError
from .options import ClusterOptions

__all__ = ["BootPlanner", "default_docker_image", "shippable_config"]

#: How long a cloud may take to create a VM after its user-data is made.
_CREATION_MARGIN = datetime.timedelta(minutes=10)
#: The scheduler's own ``--idle-timeout`` is the cluster's ``idle_timeout`` plus this.
#: The client, which polls the scheduler's idleness, closes the cluster first and
#: deletes every VM; the scheduler ending itself is only the backstop for a client that
#: did not (its event loop blocked), and must not race the client's orderly close.
SCHEDULER_IDLE_GRACE = datetime.timedelta(minutes=2)


def default_docker_image() -> str:
    """The Dask image that matches this client's dask and Python, never ``:latest``.

    A scheduler or worker on another Dask version than the client is the most common
    failure of cloud Dask clusters, so the default pins both.
    """
    version = dask.__version__.split("+")[0]
    return f"ghcr.io/dask/dask:{version}-py{sys.version_info.major}.{sys.version_info.minor}"


class BootPlanner:
    """Everything the cluster's VMs are told at boot, decided once from the options.

    The constructor checks what only makes sense together (the Dask command's flags, the
    runtime, the given ``Security``) and renders both roles' user-data once, so an
    oversized ``extra_bootstrap`` fails before any VM or network exists.
    """

    def __init__(
        self,
        options: ClusterOptions,
        cluster_id: str,
        driver: Driver,
        *,
        native_python: str,
    ) -> None:
        self.options = options
        self.cluster_id = cluster_id
        self.driver = driver
        self.runtime = _runtime(options, native_python)
        # Where the cloud has images built for this software, the driver boots one.
        imaging.want(driver, self.runtime)
        #: The image is this client's default one, so a missing tag has a known fix.
        self.image_is_default = options.runtime == "docker" and options.docker_image is None
        # Worker dashboards are off unless asked for: workers have no public address,
        # so nobody outside could reach them, and each costs a second of boot CPU. The
        # scheduler's dashboard shows every worker.
        worker_options = {"dashboard": False, **options.worker_options}
        self._worker_flags = _cli_flags("worker", worker_options, "worker_options")
        self._scheduler_flags = _cli_flags(
            "scheduler", options.scheduler_options, "scheduler_options"
        )
        self.credentials: ClusterCredentials | None = None
        self.enrollment: Enrollment | None = None
        self.given_security: Security | None = None
        self.client_security: Security | None = None
        if options.security is True:
            self.credentials = ClusterCredentials(
                cluster_id,
                options.max_lifetime,
                certificate_lifetime=options.certificate_lifetime,
            )
            self.client_security = self.credentials.client_security()
            # A token is good for its VM's boot, plus the time a cloud takes to make it.
            self.enrollment = Enrollment(
                self.credentials,
                window=options.boot_timeout + _CREATION_MARGIN,
                lifetime=options.certificate_lifetime,
            )
        elif isinstance(options.security, Security):
            self.given_security = self.client_security = options.security
            for role in Role.SCHEDULER, Role.WORKER:
                leaf_from_security(options.security, role)  # fails now if incomplete
        self.protocol = "tcp" if options.security is False else "tls"
        self.user_data_now = {
            role: self.user_data(role, f"{role.value}-size-check", "tls://0.0.0.0:1")
            for role in (Role.SCHEDULER, Role.WORKER)
        }

    def scheduler_address(self, ip: str) -> str:
        return f"{self.protocol}://{ip}:{self.options.scheduler_port}"

    def user_data(self, role: Role, name: str, scheduler_address: str | None) -> bytes:
        """The ``#cloud-config`` bytes of one VM, within its cloud's size limit."""
        return self.render(self.plan(role, name, scheduler_address))

    def render(self, plan: BootPlan) -> bytes:
        """``plan`` as user-data, within the cloud's size limit. Each plan gives its VM a
        token of its own: render the plan that is launched."""
        return render(plan, self.driver.user_data_limit)

    def plan(self, role: Role, name: str, scheduler_address: str | None) -> BootPlan:
        options = self.options
        if role is Role.SCHEDULER:
            command: tuple[str, ...] = (
                "scheduler",
                "--port",
                str(options.scheduler_port),
                "--protocol",
                self.protocol,
                *_idle_flags(options.idle_timeout),
                *self._scheduler_flags,
            )
            # With the cluster's own CA the dashboard is reached only through the
            # scheduler's tunnel, which finds its port: any free one on the VM's loopback
            # (local VMs share this machine's 127.0.0.1; a fixed port would collide).
            dashboard: int | None = 0 if self.credentials is not None else options.dashboard_port
            # Dask's HTTP servers speak plain HTTP unless told otherwise, so with TLS they
            # listen on the VM's loopback only. With the cluster's own CA the dashboard
            # also takes client certificates only and is reached through the scheduler's
            # port (see dashboard.py); with a user's own Security it is the VM's alone
            # (an SSH tunnel reaches it). Only security=False serves it on the network,
            # as plain as everything else there.
            dashboard_host = "127.0.0.1" if self.protocol == "tls" else ""
        else:
            if scheduler_address is None:
                raise ValueError("a worker's boot plan needs the scheduler's address")
            command = (
                "worker",
                scheduler_address,
                "--name",
                name,
                "--protocol",
                self.protocol,
                "--death-timeout",
                f"{options.worker_death_timeout.total_seconds():.0f}s",
                *self._worker_flags,
            )
            # The worker's HTTP server (/health, /metrics, and the worker's dashboard when
            # asked for) is plain HTTP: for the VM itself only, unless security=False
            # (plain text everywhere) and a worker dashboard was asked for.
            dashboard = 0
            public = self.protocol == "tcp" and "--dashboard" in self._worker_flags
            dashboard_host = "" if public else "127.0.0.1"
        runtime = self.runtime
        if isinstance(runtime, DockerRuntime) and self.driver.gpus(role):
            runtime = dataclasses.replace(runtime, gpus=True)
        return BootPlan(
            cluster_id=self.cluster_id,
            role=role,
            name=name,
            command=command,
            runtime=runtime,
            enroll=self.ticket(role, name),
            tls=self.leaf(role),
            dask_config=self.vm_config(),
            env=options.env_vars,
            extra_bootstrap=options.extra_bootstrap,
            dashboard_port=dashboard,
            dashboard_host=dashboard_host,
            preloads=self.preloads(role, scheduler_address),
            nanny_preloads=("peers.py",) if self.credentials is not None else (),
            boot_timeout=options.boot_timeout.total_seconds(),
        )

    def preloads(self, role: Role, scheduler_address: str | None = None) -> dict[str, str]:
        """The peers' role checks (with the cluster's own CA); the scheduler's lease; a
        spot worker's retirement on its cloud's notice."""
        files: dict[str, str] = {}
        if self.credentials is not None:
            files["peers.py"] = preloads.peer_checks(
                {
                    "cluster_id": self.cluster_id,
                    "role": role.value,
                    "scheduler": _host_port(scheduler_address),
                    "workers_as_clients": self.options.workers_as_clients,
                }
            )
        if role is Role.SCHEDULER:
            lease = round(self.options.lease_timeout.total_seconds())
            return {**files, "lease.py": preloads.lease(lease, self.driver.lease_end())}
        notice = self.driver.interruption_notice(role)
        if notice is not None:
            files["spot.py"] = preloads.spot_interruption(
                notice.url,
                notice.token_url,
                headers=notice.headers,
                must_contain=notice.must_contain,
            )
        return files

    def ticket(self, role: Role, name: str) -> EnrollmentTicket | None:
        """With the cluster's own CA: a fresh single-use token for the VM ``name``."""
        if self.enrollment is None or self.credentials is None:
            return None
        port = self.driver.enrollment_port(role, self.options.scheduler_port)
        return EnrollmentTicket(
            ca_pem=self.credentials.ca_cert_pem,
            token=self.enrollment.ticket(role, name, port),
            port=port,
        )

    def leaf(self, role: Role) -> LeafCredentials | None:
        """With a user's own ``Security``: the certificate and key it gives ``role``."""
        if self.given_security is not None:
            return leaf_from_security(self.given_security, role)
        return None

    def vm_config(self) -> dict[str, Any]:
        shipped = shippable_config(self.options.ship_config)
        tls = self.protocol == "tls"
        dask.config.set({"distributed.comm.require-encryption": tls}, config=shipped)  # type: ignore[arg-type]
        if self.credentials is not None:
            dask.config.set({"distributed.comm.tls.min-version": 1.3}, config=shipped)  # type: ignore[arg-type]
        return shipped


def _host_port(address: str | None) -> tuple[str, int] | None:
    """``("10.0.0.4", 8786)`` from ``tls://10.0.0.4:8786`` (``[::1]`` forms too)."""
    if not address:
        return None
    from distributed.comm import parse_address, parse_host_port

    host, port = parse_host_port(parse_address(address)[1])
    return host, int(port)


def _runtime(options: ClusterOptions, native_python: str) -> DockerRuntime | NativeRuntime:
    if options.runtime == "docker":
        if options.docker_image is not None:
            images.parse_reference(options.docker_image)  # a malformed reference fails now
        return DockerRuntime(options.docker_image or default_docker_image())
    return NativeRuntime(
        options.python or native_python,
        dask_version=dask.__version__,
        distributed_version=distributed.__version__,
        pip_packages=options.pip_packages,
        requirements_file=options.requirements_file,
    )


def _idle_flags(idle_timeout: datetime.timedelta | None) -> tuple[str, ...]:
    """The scheduler's backstop idle timeout (see :data:`SCHEDULER_IDLE_GRACE`)."""
    if idle_timeout is None:
        return ()
    return ("--idle-timeout", f"{(idle_timeout + SCHEDULER_IDLE_GRACE).total_seconds():.0f}s")


def _cli_flags(command: str, options: Mapping[str, Any], option_name: str) -> list[str]:
    """Turn ``{"nthreads": 2, "nanny": False}`` into ``dask worker`` flags, checked.

    The flags are checked against the ``dask scheduler``/``dask worker`` command itself,
    so a typo fails here, before any VM exists, with the closest real option named.
    """
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
    if command == "scheduler":
        reserved.add("idle-timeout")  # the cluster's own idle_timeout sets it
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


_SAME = object()
_NO_DEFAULT = object()


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
