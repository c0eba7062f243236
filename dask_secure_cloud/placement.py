"""Where a VM lands when its zone has no capacity: another zone of the region, or
on-demand instead of spot.

A driver of a cloud with zones (EC2, Compute Engine, Azure) is a :class:`Zonal`: it
makes a VM in a zone it is told, in the market it is told, and cleans up what it made
for that VM when the cloud refuses it. The fleet calls :func:`launch`, which decides:

- every VM goes first to the cluster's zone (:attr:`Zonal.home_zone`): the scheduler's,
  so that workers and scheduler talk within one zone (traffic between zones bills);
- a zone that refuses capacity (a :class:`~dask_secure_cloud.errors.CapacityError`,
  told by the cloud's error code) moves this one VM to the next zone of the region,
  each zone tried at most once per market for one launch; the scheduler's move, made
  before any worker exists, moves the cluster's zone with it;
- a spot VM refused for capacity is tried on-demand in the same zone before another zone
  is tried, where ``spot_fallback`` allows it and the cluster stays within
  ``max_hourly_cost`` with every worker on-demand (the fleet's ``on_demand_refusal``);
- a zone pinned by an option (EC2's ``subnet_id``, Compute Engine's ``zone``) is never
  left: its refusal names the option;
- a :class:`~dask_secure_cloud.errors.QuotaError` is never retried anywhere.

Each move is reported to ``moved`` (the fleet logs it and writes it to the audit log).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .credentials import Role
from .driver import VM, VMRequest
from .errors import CapacityError

__all__ = ["Move", "Placed", "Zonal", "launch"]


class Zonal(abc.ABC):
    """What a driver of a cloud with zones adds to :class:`~dask_secure_cloud.driver.Driver`."""

    #: Where the next VM goes first: the scheduler's zone once it is made. ``None``
    #: where the cloud picks (a regional Azure VM).
    home_zone: str | None = None

    @abc.abstractmethod
    def zone_pinned_by(self) -> str | None:
        """The option that pins the VMs to one zone (its name and how to unpin it), or
        ``None`` when the cluster may move to another zone of its region."""

    @abc.abstractmethod
    async def region_zones(self, role: Role) -> list[str]:
        """The zones of the region a VM of ``role`` may go to, from the cloud."""

    @abc.abstractmethod
    def spot(self, role: Role) -> bool:
        """Whether VMs of ``role`` are asked for as spot VMs."""

    @abc.abstractmethod
    async def create_in(self, request: VMRequest, zone: str | None, spot: bool) -> VM:
        """Make one VM in ``zone``, spot or not. A refusal deletes first whatever was
        made for this VM (an address, an interface), so that nothing is left when the
        launch moves on."""


@dataclass(frozen=True)
class Move:
    """One VM launched elsewhere than first asked, and why."""

    name: str
    role: Role
    from_zone: str | None
    to_zone: str | None
    spot_asked: bool
    spot: bool
    #: Each refusal on the way, as "zone (market): the cloud's error".
    reasons: tuple[str, ...]

    def describe(self) -> str:
        where = []
        if self.from_zone != self.to_zone:
            where.append(f"in {_zone(self.to_zone)} instead of {_zone(self.from_zone)}")
        if self.spot_asked and not self.spot:
            where.append("on-demand instead of spot")
        return f"{self.role.value} VM {self.name} launched {' and '.join(where)}: " + "; ".join(
            self.reasons
        )


@dataclass(frozen=True)
class Placed:
    vm: VM
    zone: str | None
    spot: bool


def _zone(zone: str | None) -> str:
    return f"zone {zone}" if zone else "a zone of the cloud's choice"


def _market(spot: bool) -> str:
    return "spot" if spot else "on-demand"


async def launch(
    driver: Zonal,
    request: VMRequest,
    *,
    on_demand_refusal: Callable[[], Awaitable[str | None]],
    moved: Callable[[Move], Awaitable[None]],
) -> Placed:
    """Make ``request``'s VM where :mod:`placement`'s rules say (see the module)."""
    home = driver.home_zone
    pinned = driver.zone_pinned_by()
    zones: list[str | None] = [home]
    if pinned is None:
        zones += [z for z in await driver.region_zones(request.role) if z != home]
    spot_asked = driver.spot(request.role)
    refusals: list[str] = []
    fallback_refused: str | None = None
    for zone in zones:
        markets = [True, False] if spot_asked else [False]
        for spot in markets:
            if spot_asked and not spot:
                if fallback_refused is None:
                    fallback_refused = await on_demand_refusal() or ""
                if fallback_refused:
                    break
            try:
                vm = await driver.create_in(request, zone, spot)
            except CapacityError as e:
                refusals.append(f"{zone or 'the region'} ({_market(spot)}): {e}")
                continue
            if zone != home or spot != spot_asked:
                await moved(
                    Move(request.name, request.role, home, zone, spot_asked, spot, tuple(refusals))
                )
            if request.role is Role.SCHEDULER:
                driver.home_zone = zone  # the workers follow the scheduler
            return Placed(vm, zone, spot)
    why = [f"no capacity for {request.role.value} VM {request.name}: " + "; ".join(refusals)]
    if pinned is not None:
        why.append(f"Not tried in another zone: {pinned}")
    else:
        tried = ", ".join(zone or "regional" for zone in zones)
        why.append(f"Every zone of the region was tried ({tried})")
    if fallback_refused:
        why.append(f"Not tried on-demand: {fallback_refused}")
    raise CapacityError(". ".join(why), "capacity")
