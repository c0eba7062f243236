"""The options every cluster shares, and those every cloud shares."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .. import requirements_file
from ..errors import OptionError
from ..requirements_file import RequirementsFile
from .base import (
    DURATION,
    _boolean,
    _choice,
    _command_options,
    _environment,
    _number,
    _security,
    _text,
    _texts,
    _tristate,
    _url,
    _whole,
    cidrs,
    duration,
    option,
    port,
    refuse_world,
)

if TYPE_CHECKING:
    from distributed.security import Security


def check_requirements(value: Any, name: str) -> tuple[str, ...]:
    """A list of PEP 508 requirements (``pandas>=2``, ``s3fs[boto3]``): the VM gives each
    to pip as one argument, so a pip option or two requirements in one item are refused
    here, before anything is made, rather than failing a boot minutes later."""
    from packaging.requirements import InvalidRequirement, Requirement

    items = _texts("requirements")(value, name)
    fix = (
        "give one PEP 508 requirement per item, for example "
        "['xarray==2024.6.0', 'pandas>=2', 's3fs[boto3]']; pip's own settings "
        "(an index URL) go in env_vars, e.g. PIP_INDEX_URL"
    )
    for item in items:
        if not item.strip() or not item.isprintable():
            raise OptionError(f"{name}: {item!r} is not a requirement; {fix}")
        try:
            Requirement(item)
        except InvalidRequirement as e:
            why = str(e).splitlines()[0]
            raise OptionError(f"{name}: {item!r} is not a requirement ({why}); {fix}") from e
    return items


def _requirements_file(value: Any, name: str) -> RequirementsFile | None:
    """A pip requirements file, read and checked now (see ``requirements_file.py``)."""
    if value is None or isinstance(value, RequirementsFile):
        return value
    import dask
    import distributed

    return requirements_file.read(
        value, name, dask=dask.__version__, distributed=distributed.__version__
    )


def _idle_timeout(value: Any, name: str) -> datetime.timedelta | None:
    """A duration, or ``False`` for no idle timeout (``None`` means "not given" to
    :func:`resolve`, so the cluster turns an explicit ``idle_timeout=None`` into
    ``False``)."""
    if value is False:
        return None
    return duration(value, name)


def _hourly_cost(value: Any, name: str) -> float | None:
    """A price per hour in USD above 0, or ``False`` for no cap (``None`` means "not
    given" to :func:`resolve`, so a cap set in the config is lifted with ``False``)."""
    if value is False:
        return None
    price = _number(value, name)
    if price <= 0:
        raise OptionError(
            f"{name} must be a price per hour in USD above 0, such as 2.5, or False for no "
            f"cap; got {value!r}"
        )
    return price


@dataclasses.dataclass(frozen=True)
class ClusterOptions:
    """The options every cluster class has, ``LocalVMCluster`` included."""

    #: The dask config section of the provider (``secure-cloud.<provider>``).
    provider: ClassVar[str] = ""
    #: Shared defaults this provider changes (config value form).
    changed_defaults: ClassVar[Mapping[str, Any]] = {}

    n_workers: int = option(
        0,
        "Worker VMs to start with. Scale later with ``scale`` or ``adapt``.",
        types="integer",
        check=_whole(0),
    )
    security: bool | Security = option(
        True,
        """
        ``True`` (default): the cluster makes its own CA and a certificate per VM, and
        the client's key never leaves this process. ``False``: plain ``tcp://`` with no
        certificates, for trusted private networks only. A ``distributed.Security`` with
        scheduler and worker certificates: used as given, and shipped to the VMs.
        """,
        types="boolean",
        check=_security,
        note="false: plain tcp://, only for trusted private networks",
    )
    certificate_lifetime: datetime.timedelta = option(
        "4h",
        """
        How long each VM's certificate lives. While this client runs it renews every
        VM's certificate at half its life, with a key the VM makes afresh; when the
        client is gone nothing is renewed, and each VM ends when its certificate expires.
        """,
        types=DURATION,
        check=duration,
    )
    max_lifetime: datetime.timedelta = option(
        "7d",
        """
        The longest the cluster can run: its CA, and so every certificate, expires then.
        The client warns ``certificate_warning`` before.
        """,
        types=DURATION,
        check=duration,
    )
    certificate_warning: datetime.timedelta = option(
        "1h",
        "Warn this long before the cluster reaches ``max_lifetime``.",
        types=DURATION,
        check=duration,
    )
    workers_as_clients: bool = option(
        False,
        """
        Whether a worker's certificate may act as a Dask client: submit tasks, run
        functions, read published datasets. Tasks that call ``get_client()`` (or use
        ``worker_client``) need ``True``. With ``False`` (default) a worker may only do
        what a worker does, so one compromised worker VM cannot take over the cluster.
        Applies to the cluster's own certificates (``security=True``).
        """,
        types="boolean",
        check=_boolean,
        note="true lets tasks call get_client(), and any worker key act as a client",
    )
    runtime: str = option(
        "docker",
        """
        ``"docker"`` runs Dask in ``docker_image``; Docker is installed at boot when the
        VM's image lacks it. ``"native"`` runs ``python`` on the image, installing this
        client's dask and distributed at boot when it lacks them. See "What a VM does at
        boot" in the docs.
        """,
        types="string",
        check=_choice("docker", "native"),
        enum=("docker", "native"),
        note="docker (image pinned to your dask and Python) or native",
    )
    docker_image: str | None = option(
        None,
        """
        The container image of ``runtime="docker"``. Default: the image of this client's
        dask and Python versions (``ghcr.io/dask/dask:<dask>-py<python>``, never
        ``:latest``); a tag that does not exist is refused before any VM is made.
        """,
        types=("string", "null"),
        check=_text,
        note="null: ghcr.io/dask/dask:<your dask>-py<your python>",
    )
    python: str | None = option(
        None,
        """
        The VMs' interpreter for ``runtime="native"``. Default: ``python3`` on a cloud VM,
        the client's own interpreter on ``LocalVMCluster``.
        """,
        types=("string", "null"),
        check=_text,
        note="runtime native: null = python3 on clouds, the client's on local",
    )
    pip_packages: tuple[str, ...] = option(
        [],
        """
        ``runtime="native"``: requirements installed on each VM at boot, next to this
        client's dask and distributed, one PEP 508 requirement per item
        (``["pandas>=2", "s3fs[boto3]"]``). With ``runtime="docker"``, build them into
        ``docker_image`` instead.
        """,
        types="array",
        check=check_requirements,
        note="runtime native: installed on each VM at boot, with dask",
    )
    requirements_file: RequirementsFile | None = option(
        None,
        """
        ``runtime="native"``: the path of a pip requirements file on this machine
        (``requirements.txt``, or a lock file from ``pip-compile --generate-hashes``),
        installed on each VM at boot with this client's dask and distributed. It is read
        and checked when the cluster is made: another file it names (``-r``, ``-e .``), a
        conda environment, or a dask pin other than the client's is refused then. With
        hashes, pip checks every package: each must be pinned and hashed, dask and
        distributed included. It travels in user-data: keep passwords out (pip fills
        ``${VAR}`` from ``env_vars``).
        """,
        types=("string", "null"),
        check=_requirements_file,
        note="runtime native: path of a pip requirements or lock file; null: none",
    )
    env_vars: dict[str, str] = option(
        {},
        "Environment of the Dask process, written to a 0600 file (not the command line).",
        types="object",
        check=_environment,
    )
    extra_bootstrap: tuple[str, ...] = option(
        [],
        "Shell lines run on each VM before Dask starts.",
        types="array",
        check=_texts("shell lines", empty_items=True),
    )
    worker_options: dict[str, Any] = option(
        {},
        "Options of ``dask worker``, checked against the command before any VM starts.",
        types="object",
        check=_command_options,
    )
    scheduler_options: dict[str, Any] = option(
        {},
        "Options of ``dask scheduler``, checked against the command before any VM starts.",
        types="object",
        check=_command_options,
    )
    scheduler_port: int = option(8786, "The scheduler's TCP port.", types="integer", check=port)
    dashboard_port: int = option(
        8787, "The scheduler dashboard's TCP port.", types="integer", check=port
    )
    boot_timeout: datetime.timedelta = option(
        "10m",
        """
        How long a VM may take to come up before it is reported, with its console output,
        and the start fails.
        """,
        types=DURATION,
        check=duration,
        note="a VM that is not up by then is reported with its console",
    )
    worker_death_timeout: datetime.timedelta = option(
        "10m",
        "A worker that has lost its scheduler this long ends, and its VM powers off.",
        types=DURATION,
        check=duration,
    )
    max_replacements: int = option(
        3,
        """
        How many times in a row a lost worker is replaced. A worker VM reclaimed by its
        cloud (spot), crashed, or not up within ``boot_timeout`` is deleted and a worker
        of a new name starts in its place, so the cluster keeps the size asked of it
        (``n_workers``, ``scale``, ``adapt``); a worker scaled down is never replaced.
        A worker that stayed connected for ``boot_timeout`` starts a new row, so a spot
        worker is replaced each time it is reclaimed, while one that never comes up is
        given up after this many tries. ``0``: never replace.
        """,
        types="integer",
        check=_whole(0),
        note="a lost worker (spot, crash, failed boot) is replaced this many times in a row",
    )
    lease_timeout: datetime.timedelta = option(
        "20m",
        """
        The scheduler ends itself when this client has not renewed its lease for this long
        (the client was killed, the laptop closed); its workers follow after
        ``worker_death_timeout`` and every VM powers itself off.
        """,
        types=DURATION,
        check=duration,
        note="a scheduler whose client is gone this long ends its VM",
    )
    idle_timeout: datetime.timedelta | None = option(
        "1h",
        """
        The cluster closes, deleting every VM, once its scheduler has run no task for this
        long (Dask's own idleness: nothing processing, queued or waiting), even while this
        client lives: the lease keeps a forgotten notebook's cluster alive, this ends it.
        A connected client and data held in memory are not activity. One hour outlasts a
        meeting or a lunch break, so a notebook user comes back to the data they
        persisted; a forgotten cluster bills one idle hour, not a weekend.
        ``idle_timeout=None`` as a keyword, or ``false`` anywhere: never (a ``null`` in
        the dask config means the default, as for every option).
        """,
        types=("string", "number", "boolean", "null"),
        check=_idle_timeout,
        note="false: never; idle this long (no task), the cluster deletes its VMs",
    )
    max_hourly_cost: float | None = option(
        None,
        """
        The most the cluster may cost per hour, in USD, from the cloud's own price list:
        a start, ``scale(n)`` or ``adapt(maximum=...)`` that would cost more is refused
        before anything is made, and adaptive scaling stays within it. Where a price
        cannot be had the cap refuses too (a cap that cannot be checked is not one);
        ``False`` lifts a cap set in the dask config. Data transfer and storage you make
        yourself are not counted (see "Cost and capacity" in the docs).
        """,
        types=("number", "boolean", "null"),
        check=_hourly_cost,
        note="USD per hour; null: no cap; a start, scale or adapt above it is refused",
    )
    ship_config: tuple[str, ...] = option(
        [
            "distributed.scheduler",
            "distributed.worker",
            "distributed.nanny",
            "distributed.comm.timeouts",
            "distributed.comm.retry",
            "distributed.logging",
            "distributed.admin",
            "distributed.p2p",
            "array",
            "dataframe",
            "optimization",
        ],
        """
        Dask config prefixes the VMs receive, where this client's values differ from the
        defaults; nothing else is shipped (tokens and credentials live in the config too).
        """,
        types="array",
        check=_texts("dask config prefixes"),
        note="dask config prefixes a VM receives, nothing else",
    )
    offline_image: bool = option(
        False,
        """
        The VM image already holds everything the boot needs (Docker and the pulled image,
        or this client's dask for ``runtime="native"``), so VMs may boot on a network with
        no route out. By default such a network is refused before anything is made.
        """,
        types="boolean",
        check=_boolean,
        note="true: the image holds all the boot needs; no route out needed",
    )

    def __post_init__(self) -> None:
        if self.certificate_lifetime < MIN_CERTIFICATE_LIFETIME:
            raise OptionError(
                f"certificate_lifetime must be at least "
                f"{MIN_CERTIFICATE_LIFETIME.total_seconds():.0f}s, so that renewal at half "
                f"its life has time to happen, got {self.certificate_lifetime}"
            )
        if self.certificate_lifetime > self.max_lifetime:
            raise OptionError(
                f"certificate_lifetime ({self.certificate_lifetime}) is longer than "
                f"max_lifetime ({self.max_lifetime}); no certificate outlives the cluster's "
                "CA: shorten certificate_lifetime or raise max_lifetime"
            )
        if self.scheduler_port == self.dashboard_port:
            raise OptionError(
                f"scheduler_port and dashboard_port are both {self.scheduler_port}: the "
                "scheduler's comm and its dashboard need a port each; change one of them"
            )
        if self.runtime == "docker" and self.pip_packages:
            raise OptionError(
                "pip_packages applies to runtime='native' (installed on the VM at boot); "
                "with runtime='docker', build them into docker_image instead"
            )
        if self.runtime == "docker" and self.requirements_file is not None:
            raise OptionError(
                "requirements_file applies to runtime='native' (installed on the VM at "
                "boot); with runtime='docker', build it into docker_image instead"
            )
        if self.pip_packages and self.requirements_file and self.requirements_file.hashed:
            raise OptionError(
                f"requirements_file {self.requirements_file.path} checks hashes, so pip "
                f"installs nothing unhashed: move pip_packages "
                f"({', '.join(self.pip_packages)}) into the file, with their hashes"
            )


#: Renewal starts at half a certificate's life and takes seconds.
MIN_CERTIFICATE_LIFETIME = datetime.timedelta(minutes=1)


@dataclasses.dataclass(frozen=True)
class CloudOptions(ClusterOptions):
    """Who may reach a cloud cluster's scheduler, and which VMs are public."""

    use_private_ip: bool = option(
        False,
        """
        The client runs inside the cloud network and connects to the scheduler's private
        address. The scheduler still gets a public address for its outbound traffic only
        where the network's sole way out needs one.
        """,
        types="boolean",
        check=_boolean,
        note="true: the client is inside the cloud network",
    )
    allowed_cidrs: tuple[str, ...] | None = option(
        None,
        """
        Who may reach the scheduler's port. Default: this machine's public address, looked
        up at ``public_ip_url``.
        """,
        types=("array", "null"),
        check=cidrs,
        note="null: this machine's public address",
    )
    open_to_world: bool = option(
        False,
        "Required with ``allowed_cidrs=['0.0.0.0/0']``; logs a warning.",
        types="boolean",
        check=_boolean,
    )
    allow_insecure_public: bool = option(
        False,
        "Required with ``security=False`` and a public scheduler address.",
        types="boolean",
        check=_boolean,
    )
    public_ip_url: str = option(
        "https://checkip.amazonaws.com",
        "Where this machine's public address is looked up, for ``allowed_cidrs``' default.",
        types="string",
        check=_url,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_world(self.allowed_cidrs or (), open_to_world=self.open_to_world)


WORKER_PUBLIC_IP = """
    ``None`` (default): decided from the network's ways out, before anything is made. A
    NAT (or equivalent) as the way out: no public address. Only a way out for public
    addresses (an internet gateway, a default internet route), as on a new account: a
    public address that carries the workers' outbound traffic, while the cluster's
    firewall admits nothing from outside the cluster. No way out: refused, unless
    ``offline_image=True``. ``True``: always a public address. ``False``: never.
"""


@dataclasses.dataclass(frozen=True)
class VPCOptions(CloudOptions):
    """Options of the clouds where a VM may have no public address and a spot VM hears
    that it is about to be reclaimed: EC2, Compute Engine and Azure."""

    worker_spot: bool = option(
        False,
        """
        Run workers as spot VMs, which the cloud may reclaim at any time (they are
        deleted then); a worker retires gracefully on the cloud's notice, so the scheduler
        moves its data elsewhere first.
        """,
        types="boolean",
        check=_boolean,
    )
    spot_fallback: bool = option(
        True,
        """
        A spot worker the cloud refuses for want of spot capacity is launched on-demand
        instead (in the same zone, before another zone is tried), and the move is logged
        and audited. Under ``max_hourly_cost`` only where the cluster at its wanted size,
        every worker on-demand, stays within the cap; otherwise the worker is refused as
        with ``False``. See "Cost and capacity" in the docs.
        """,
        types="boolean",
        check=_boolean,
        note="true: a spot worker refused for capacity runs on-demand, within the cap",
    )
    zone_failover: bool = option(
        True,
        """
        A VM its zone has no capacity for (the cloud says so by its error code) is
        launched in another zone of the region, each zone tried once; the move is
        logged and audited. Workers go first to the scheduler's zone, since traffic
        between zones bills. ``False``: every VM stays in the cluster's zone, and a
        refusal for capacity fails the launch. An option that places VMs in one zone
        (EC2's ``subnet_id``) pins it all the same.
        """,
        types="boolean",
        check=_boolean,
        note="true: a zone without capacity for a VM hands it to another zone of the region",
    )
    worker_public_ip: bool | None = option(
        None,
        WORKER_PUBLIC_IP,
        types=("boolean", "null"),
        check=_tristate,
        note="null: only where the subnet has no other way out (inbound stays closed)",
    )
    metadata_endpoint: str = option(
        "http://169.254.169.254",
        "The instance metadata service spot workers ask whether they are being reclaimed.",
        types="string",
        check=_url,
    )
