"""Whether a VM will have a route out, decided before anything is made.

A VM gets Docker, the Dask image or Dask itself from the internet at boot. On a new
account's default network a VM without a public address often has no way out: EC2's
default VPC has an internet gateway but no NAT gateway, GCE's ``default`` network has no
Cloud NAT. A cluster whose workers cannot reach a registry would boot VMs that fail after
minutes, and bill for them. So each driver reads its network (route tables, routers,
subnet settings: read-only calls) into an :class:`Exits` per role, and
:func:`public_address` decides from it, the same way on every cloud:

- a way out without a public address (a NAT gateway, Cloud NAT, default outbound
  access) is used as it is: no public address;
- otherwise, unless told not to, the VM gets a public address while its firewall keeps
  every inbound connection from outside the cluster closed (what Coiled does: no NAT
  gateway to pay for, nothing reachable from outside);
- a VM that can have no way out at all is refused with :class:`NoRouteOutError`, naming
  the subnet or network and the options that fix it, unless the user says the image
  needs nothing from outside (``offline_image=True``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .credentials import Role
from .errors import NoRouteOutError

__all__ = ["Exits", "NoRouteOutError", "decide_public_addresses", "public_address", "way_out"]


@dataclass(frozen=True)
class Exits:
    """The ways out a network offers a VM, as its cloud reports them."""

    #: The subnet or network, as the user names it: ``"subnet subnet-0abc of vpc-1"``.
    place: str
    #: The way out a VM without a public address has (``"NAT gateway nat-0abc"``,
    #: ``"Cloud NAT nat-1 on router r-1"``, ``"default outbound access"``), or None.
    private: str | None
    #: What carries a public address's traffic out (``"internet gateway igw-1"``), or
    #: None when a public address would not help (a VPC with no internet gateway).
    public: str | None


def public_address(
    role: Role,
    wanted: bool | None,
    exits: Exits,
    *,
    option: str,
    offline_image: bool,
    fixes: Sequence[str],
) -> bool:
    """Whether VMs of ``role`` get a public address.

    ``wanted`` is the user's ``option`` (``worker_public_ip`` and the like): True or
    False as given, None to decide from ``exits``. ``fixes`` are the cloud's own remedies
    (``"subnet_id=<a subnet whose route table sends 0.0.0.0/0 to a NAT gateway>"``),
    listed in the refusal before the options every cloud shares.
    """
    if wanted is None:
        if exits.private is not None:
            return False
        if exits.public is not None:
            return True
    elif wanted:
        if exits.public is not None or exits.private is not None:
            return True
    elif exits.private is not None:
        return False
    if offline_image:
        return bool(wanted)
    raise _refusal(role, wanted, exits, option, fixes)


def decide_public_addresses(
    exits: Exits,
    *,
    use_private_ip: bool,
    worker_public_ip: bool | None,
    offline_image: bool,
    fixes: Callable[[Role], Sequence[str]],
    logger: logging.Logger,
) -> dict[Role, bool]:
    """Per role, whether its VMs get a public address (:func:`public_address`), logged.

    Workers ask with ``worker_public_ip``. The scheduler asks for one when the client
    reaches it from outside (``use_private_ip=False``); otherwise it gets one only to get
    out, and the driver reports it as private-only. Workers are decided first: they are
    the role a network most often refuses."""
    wanted = {Role.WORKER: worker_public_ip, Role.SCHEDULER: None if use_private_ip else True}
    options = {Role.WORKER: "worker_public_ip", Role.SCHEDULER: "use_private_ip"}
    decided: dict[Role, bool] = {}
    for role in (Role.WORKER, Role.SCHEDULER):
        decided[role] = public_address(
            role,
            wanted[role],
            exits,
            option=options[role],
            offline_image=offline_image,
            fixes=fixes(role),
        )
        logger.info("%s VMs: %s", role.value, way_out(decided[role], exits))
    return decided


def way_out(public: bool, exits: Exits) -> str:
    """How a VM with or without a public address gets out of ``exits.place``."""
    if public:
        way = exits.public or exits.private
        address = "a public address (inbound from outside the cluster closed)"
    else:
        way = exits.private
        address = "no public address"
    out = f"out through {way}" if way else "no way out (offline_image=True)"
    return f"{address}, {out}, in {exits.place}"


def _refusal(
    role: Role, wanted: bool | None, exits: Exits, option: str, fixes: Sequence[str]
) -> NoRouteOutError:
    vms = "the scheduler" if role is Role.SCHEDULER else "workers"
    if wanted and exits.public is None:
        why = f"{exits.place} has no way out, not even for a public address"
    elif exits.public is not None:
        why = (
            f"{option}=False and {exits.place} has no way out for a VM without a public "
            "address (no NAT)"
        )
    else:
        why = f"{exits.place} has no way out (no NAT, and no route for public addresses)"
    remedies = [
        *fixes,
        "offline_image=True if the image already holds everything the boot needs "
        "(Docker and the pulled image, or this client's dask for runtime='native')",
    ]
    listed = "; ".join(f"({i}) {fix}" for i, fix in enumerate(remedies, 1))
    return NoRouteOutError(
        f"{vms} would have no route out: {why}. They could not install Docker, pull the "
        f"Dask image or install Dask, and would fail their boot. Nothing was created. "
        f"Fix with one of: {listed}"
    )
