"""The small interface between a cluster and a cloud.

A driver knows its cloud and nothing of Dask or TLS: it makes VMs from user-data bytes,
tags everything with the cluster id, finds what carries that tag, and deletes it. The
cluster (``cluster.py``) does the rest.
"""

from __future__ import annotations

import abc
import asyncio
import datetime
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .credentials import Role
from .egress import Exits
from .errors import (
    CloudError,
    ForbiddenError,
    InUseError,
    NotFoundError,
    ThrottledError,
)
from .names import CLUSTER_TAG, CREATOR_TAG
from .registry import UserDataLimit

__all__ = [
    "CLUSTER_TAG",
    "CREATOR_TAG",
    "VM",
    "CloudError",
    "ClusterSummary",
    "Driver",
    "ForbiddenError",
    "InUseError",
    "InterruptionNotice",
    "NotFoundError",
    "ThrottledError",
    "VMRequest",
    "summarize",
]


@dataclass(frozen=True)
class VMRequest:
    """What the cluster asks of a driver for one VM."""

    cluster_id: str
    name: str
    role: Role
    user_data: bytes = field(repr=False)
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VM:
    """A VM as the cloud reports it."""

    id: str
    name: str
    role: Role
    cluster_id: str
    private_ip: str
    public_ip: str | None = None


@dataclass(frozen=True)
class InterruptionNotice:
    """Where a VM learns that its cloud is about to reclaim it (a spot or preemptible VM),
    so the core can retire the worker gracefully first. The cloud's metadata endpoint and
    headers live in its driver; the core only renders them into the worker's preload."""

    #: Answers 200 (with ``must_contain`` in its body, where given) once notice is given.
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    must_contain: str = ""
    #: EC2's IMDSv2: a session token is fetched here first (PUT), then sent with the poll.
    token_url: str | None = None


#: VM state words (see :meth:`Driver.state`) that bill: powered off is not gone.
#: ``"unknown"`` counts, since a VM whose state was not learnt may well be running.
BILLING_STATES = frozenset({"running", "stopped", "unknown"})
#: Kinds of a cluster's other resources that bill while they exist. Firewalls,
#: security groups, networks and network interfaces cost nothing by themselves.
BILLING_KINDS = frozenset({"disk", "address"})


@dataclass(frozen=True)
class ClusterSummary:
    """A cluster found by its tags, for ``dask secure-cloud list``: what exists, and
    what of it bills."""

    cluster_id: str
    vms: int
    created: datetime.datetime | None
    creator: str | None
    #: Other resources still tagged with the cluster (firewalls, networks, addresses,
    #: disks): after a start killed before its first VM, they are all that is left.
    other: int = 0
    #: Its VMs by state word (:meth:`Driver.state`'s words) where the listing tells; a
    #: VM the listing says nothing of counts as ``"unknown"``.
    vm_states: Mapping[str, int] = field(default_factory=dict)
    #: Its other resources by kind (``"disk"``, ``"address"``, ``"firewall"``,
    #: ``"network"``, ``"interface"``), where the listing tells; ``other`` counts all.
    resources: Mapping[str, int] = field(default_factory=dict)

    def billing(self) -> dict[str, int]:
        """What of the cluster bills now, by what it is (``"running VM"``, ``"stopped
        VM"``, ``"disk"``, ...): VMs in a :data:`BILLING_STATES` word, and resources of a
        :data:`BILLING_KINDS` kind. Empty when nothing bills."""
        states = dict(self.vm_states)
        untold = self.vms - sum(states.values())
        if untold > 0:
            states["unknown"] = states.get("unknown", 0) + untold
        found = {f"{state} VM": n for state, n in sorted(states.items()) if state in BILLING_STATES}
        found |= {kind: n for kind, n in sorted(self.resources.items()) if kind in BILLING_KINDS}
        return {what: n for what, n in found.items() if n > 0}


def summarize(
    found: Iterable[tuple[Any, ...]],
    others: Iterable[str | tuple[str, str]] = (),
) -> list[ClusterSummary]:
    """Group each VM's ``(cluster id, creation time, creator[, state word])`` per
    cluster (its oldest VM dates it), and count its other tagged resources, each given
    as a cluster id or as ``(cluster id, kind)`` (:attr:`ClusterSummary.resources`)."""
    groups: dict[str, list[tuple[datetime.datetime | None, str | None, str | None]]] = {}
    for cluster_id, created, creator, *state in found:
        groups.setdefault(cluster_id, []).append((created, creator, state[0] if state else None))
    counts: dict[str, int] = {}
    kinds: dict[str, dict[str, int]] = {}
    for other in others:
        cluster_id, kind = (other, None) if isinstance(other, str) else other
        counts[cluster_id] = counts.get(cluster_id, 0) + 1
        if kind is not None:
            by_kind = kinds.setdefault(cluster_id, {})
            by_kind[kind] = by_kind.get(kind, 0) + 1
        groups.setdefault(cluster_id, [])
    summaries = []
    for cluster_id, vms in sorted(groups.items()):
        times = [t for t, _, _ in vms if t is not None]
        creators = [c for _, c, _ in vms if c]
        states: dict[str, int] = {}
        for _, _, state in vms:
            if state is not None:
                states[state] = states.get(state, 0) + 1
        summaries.append(
            ClusterSummary(
                cluster_id,
                len(vms),
                min(times) if times else None,
                creators[0] if creators else None,
                counts.get(cluster_id, 0),
                states,
                kinds.get(cluster_id, {}),
            )
        )
    return summaries


class Driver(abc.ABC):
    """Create, list and destroy the VMs (and network) of one cluster on one cloud."""

    #: Short provider name, as used in ``secure-cloud.<provider>`` config.
    provider: ClassVar[str]
    #: Seconds a delete, or a wait on the cloud, may take before it is an error: a VM to
    #: terminate, an operation to finish, a resource to stop being in use, a new VM to
    #: be reported active. Every driver's polling loop is bounded by it (see
    #: :meth:`poll_until` and :meth:`delete_when_free`); the VM's own boot is bounded
    #: by ``boot_timeout`` instead.
    operation_timeout: float = 600.0
    user_data_limit: ClassVar[UserDataLimit]
    #: VM creations in flight at once; the SDK's retries absorb throttling beyond it.
    max_concurrent_creates: ClassVar[int] = 16
    #: Seconds between the cluster watcher's listings of its VMs (:meth:`states`) while
    #: any VM boots: one listing per interval, whatever the number of VMs.
    watch_interval: ClassVar[float] = 5.0
    #: The scheduler's ports the creator may reach: its comm port, and its dashboard
    #: unless that is reached through the comm port. Set by :meth:`configure`.
    ports: tuple[int, ...] = (8786, 8787)
    #: Seconds a VM (or a cloud operation) may take; set by :meth:`configure`.
    boot_timeout: float = 600.0
    #: Workers the cluster starts with, so :meth:`prepare` can check the cloud's quota
    #: before it makes anything; set by :meth:`configure`.
    initial_workers: int = 0
    #: The user says the image holds everything the boot needs, so VMs with no route
    #: out may boot (see ``egress.public_address``); set by :meth:`configure`.
    offline_image: bool = False
    #: Who started the cluster (``audit.creator()``: ``user@host``), recorded in the
    #: creator tag of everything the driver makes; set by :meth:`configure`.
    creator: str = "unknown"
    #: What the VMs provision at boot on the image option's base (``imaging.Software``),
    #: set by the boot planner where the cloud has images: :meth:`prepare` then boots
    #: the newest image built for it (``dask secure-cloud image build``), if any.
    software: Any = None
    #: The built image the VMs boot from (``imaging.BuiltImage``), once prepared.
    built_image: Any = None

    def configure(
        self,
        *,
        ports: tuple[int, ...],
        boot_timeout: float,
        initial_workers: int = 0,
        offline_image: bool = False,
        creator: str = "unknown",
    ) -> None:
        """Receive the options every cloud shares, resolved once by the cluster."""
        self.ports = ports
        self.boot_timeout = boot_timeout
        self.initial_workers = initial_workers
        self.offline_image = offline_image
        self.creator = creator

    async def prepare(self, cluster_id: str) -> None:
        """Make what the cluster's VMs need before the first one, in the same named
        steps on every cloud: the three that only read or decide come first, so a
        refusal leaves nothing behind; :meth:`make_network` is the first that writes.
        A driver fills in the steps, not this order."""
        if self.software is not None:
            from .imaging import choose

            await choose(self)
        await self.check_request(cluster_id)
        exits = await self.read_exits(cluster_id)
        if exits is not None:
            self.decide_public(exits)
        await self.make_network(cluster_id)

    async def check_request(self, cluster_id: str) -> None:
        """Read only: what the VMs ask for exists here and fits (region or zone, machine
        sizes, image, quotas). Refuse, naming the option, before anything is made."""

    async def locate(self) -> None:
        """Read only: learn where the cluster will be when its options do not say (an
        Azure resource group's location), so that it is priced before anything exists.
        Most clouds' options name their region: nothing to do."""

    async def read_exits(self, cluster_id: str) -> Exits | None:
        """Read only: the network the VMs join and the ways out it offers them (a NAT, an
        internet gateway, a public interface). ``None``: VMs need no way out here."""
        return None

    def decide_public(self, exits: Exits) -> None:
        """Decide, per role, whether its VMs get a public address, from ``exits``
        (``egress.decide_public_addresses``), refusing a role with no way out
        (``NoRouteOutError``)."""

    async def make_network(self, cluster_id: str) -> None:
        """The first write: what the cluster's VMs need around them (firewall rules,
        security groups, a network), tagged with ``cluster_id`` so that ``release`` and
        ``cleanup`` find it."""

    @abc.abstractmethod
    async def create(self, request: VMRequest) -> VM:
        """Start one VM from its user-data; return once the cloud has accepted it."""

    @abc.abstractmethod
    async def destroy(self, vm: VM) -> None:
        """Delete one VM and what belongs to it alone (disks, addresses)."""

    @abc.abstractmethod
    async def list(self, cluster_id: str) -> list[VM]:
        """Every VM that carries ``cluster_id`` and is not yet gone."""

    def where(self) -> str:
        """Region, zone or location, for the cluster's repr."""
        return ""

    def gpus(self, role: Role) -> bool:
        """Whether VMs of ``role`` have GPUs to hand to the container. Known after prepare."""
        return False

    def enrollment_port(self, role: Role, scheduler_port: int) -> int:
        """The port a booting VM of ``role`` answers enrollment on (``enroll.py``): the
        scheduler's port, which every VM of a cluster may reach on another member."""
        return scheduler_port

    def interruption_notice(self, role: Role) -> InterruptionNotice | None:
        """Where VMs of ``role`` hear they are about to be reclaimed; ``None`` when they
        are not spot or preemptible VMs."""
        return None

    def lease_end(self) -> str:
        """Source text the scheduler runs when its lease ends, before it closes: it
        defines ``on_expiry(resources)`` (standard library only), given what
        :meth:`lease_arguments` last passed. Empty: the VMs only power off, which is
        enough where the cloud deletes a VM that powers off (EC2)."""
        return ""

    def lease_arguments(self) -> dict[str, Any]:
        """Keyword arguments of each lease renewal: ``resources`` for :meth:`lease_end`.
        Only what the scheduler's lease preload accepts, so empty unless ``lease_end``
        is not."""
        return {}

    async def states(self, cluster_id: str) -> Mapping[str, str]:
        """Each of the cluster's VMs' state by VM id, from one listing: what the cluster's
        watcher polls while VMs boot. A VM missing from it, once listed, has ended.

        The default calls every listed VM running; a driver whose listing tells a VM that
        powered itself off reports it in the words of :meth:`state`: ``"stopped"`` where
        the cloud keeps (and bills) it, ``"terminated"`` where it ended."""
        return {vm.id: "running" for vm in await self.list(cluster_id)}

    async def state(self, vm: VM) -> str:
        """What the cloud says of ``vm`` now, in one of four words.

        ``"running"``: it exists and has not ended. ``"stopped"``: it ended by itself (its
        OS powered off) but the cloud keeps it, and bills for it: an Azure VM "Stopped"
        (compute still billed) or deallocated, a Compute Engine instance TERMINATED (its
        disk billed), a droplet "off" (billed in full). Powered off is not gone: the
        caller treats it as ended for boot failures and deletes it as any VM it owns.
        ``"terminated"``: the cloud says it ended and keeps nothing that bills (an EC2
        instance terminated on shutdown), or that it is gone (a :class:`NotFoundError`
        answer). ``"unknown"``: anything else, above all a poll that failed (throttled,
        a network error, a 5xx): a failed poll says nothing about the VM and is never
        ``"terminated"`` nor ``"stopped"``. The caller polls again, so a poll is not
        retried at length."""
        return "unknown"

    async def console_output(self, vm: VM) -> str:
        """What the VM printed while booting, for error reports. Empty if unknown."""
        return ""

    async def release(self, cluster_id: str) -> None:
        """Delete what :meth:`prepare` made, once no VM of the cluster is left."""

    async def clusters(self) -> list[ClusterSummary]:
        """Every cluster that has a VM on this cloud now, found by the cluster tag."""
        raise NotImplementedError(f"{type(self).__name__} cannot list clusters")

    async def close(self) -> None:
        """Release SDK sessions. The cluster calls this last."""

    # -- shared by the drivers ------------------------------------------------------------

    async def poll_until(
        self,
        done: Callable[[], Awaitable[bool]],
        what: str,
        *,
        interval: float = 2.0,
        timeout: float | None = None,
    ) -> None:
        """Call ``done`` every ``interval`` seconds until it returns True; raise
        :class:`CloudError` naming ``what`` once ``timeout`` (default
        :attr:`operation_timeout`) has passed without."""
        limit = self.operation_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not await done():
            if time.monotonic() >= deadline:
                raise CloudError(f"{what}: not done within {limit:.0f}s")
            await asyncio.sleep(interval)

    async def delete_when_free(
        self, delete: Callable[[], Awaitable[object]], what: str, *, interval: float = 2.0
    ) -> None:
        """Call ``delete`` again while the cloud answers :class:`InUseError`, for at most
        :attr:`operation_timeout`; :class:`NotFoundError` counts as deleted. Still in use
        when time is up: :class:`InUseError`, with the cloud's last answer."""
        deadline = time.monotonic() + self.operation_timeout
        while True:
            try:
                await delete()
                return
            except NotFoundError:
                return
            except InUseError as e:
                if time.monotonic() >= deadline:
                    raise InUseError(
                        f"{what}: still in use after {self.operation_timeout:.0f}s: {e}"
                    ) from e
                await asyncio.sleep(interval)
