"""Who may reach the scheduler: the creator's address, or CIDRs the user gives.

Every cloud's firewall opens the scheduler port and dashboard to these CIDRs only; the
Dask ports between the cluster's own VMs are opened by the firewall's self-reference.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import NetworkPolicyError
from .options.base import WORLD, refuse_world
from .options.base import cidrs as checked_cidrs

if TYPE_CHECKING:
    from .options import CloudOptions

__all__ = [
    "NetworkPolicy",
    "NetworkPolicyError",
    "check_public_exposure",
    "parse_cidrs",
    "scheduler_sources",
]

logger = logging.getLogger(__name__)


def parse_cidrs(values: Sequence[str] | None, option_name: str = "allowed_cidrs") -> list[str]:
    """Normalise CIDRs, or raise naming the bad one (the options' own check)."""
    return [] if values is None else list(checked_cidrs(values, option_name))


def _lookup_public_ip(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode().strip()


async def scheduler_sources(
    allowed_cidrs: Sequence[str] | None,
    *,
    open_to_world: bool,
    public_ip_url: str,
) -> list[str]:
    """The CIDRs allowed to reach the scheduler's port and dashboard.

    With no ``allowed_cidrs``, the creator's public address is looked up at
    ``public_ip_url`` and allowed as a /32.
    """
    if allowed_cidrs:
        cidrs = parse_cidrs(allowed_cidrs)
    else:
        try:
            address = await asyncio.to_thread(_lookup_public_ip, public_ip_url)
            cidrs = [str(ipaddress.ip_network(address))]
        except (OSError, ValueError) as e:
            raise NetworkPolicyError(
                f"could not find this machine's public address at {public_ip_url} ({e}); "
                "pass allowed_cidrs=['203.0.113.7/32'] with the address the scheduler "
                "should accept connections from"
            ) from e
    refuse_world(cidrs, open_to_world=open_to_world)
    if WORLD & set(cidrs):
        logger.warning("The scheduler's port and dashboard are open to the whole internet")
    return cidrs


def check_public_exposure(*, security: bool, public: bool, allow_insecure_public: bool) -> None:
    """Refuse plain-TCP clusters with public addresses unless explicitly allowed."""
    if public and not security and not allow_insecure_public:
        raise NetworkPolicyError(
            "security=False with a public address would let anyone who can reach the "
            "scheduler run code on your VMs. Use a private address (use_private_ip=True), "
            "keep security=True, or pass allow_insecure_public=True if you accept that"
        )


@dataclass(frozen=True)
class NetworkPolicy:
    """Who may reach the scheduler, and which VMs get public addresses: one cloud-neutral
    answer that every driver turns into its own firewall rules."""

    use_private_ip: bool = False
    #: True or False as asked; None: decided from the network's ways out (``egress``).
    worker_public_ip: bool | None = None
    allowed_cidrs: tuple[str, ...] = ()
    open_to_world: bool = False
    public_ip_url: str = "https://checkip.amazonaws.com"

    @classmethod
    def from_options(cls, options: CloudOptions, *, always_public: bool = False) -> NetworkPolicy:
        """The policy of a cloud's resolved options; an unsafe combination is refused
        before anything is made.

        ``always_public`` is for clouds where every VM has a public address regardless.
        """
        worker_public_ip: bool | None = getattr(options, "worker_public_ip", None)
        policy = cls(
            use_private_ip=options.use_private_ip,
            worker_public_ip=worker_public_ip,
            allowed_cidrs=options.allowed_cidrs or (),
            open_to_world=options.open_to_world,
            public_ip_url=options.public_ip_url,
        )
        check_public_exposure(
            security=options.security is not False,
            public=always_public or not policy.use_private_ip or bool(policy.worker_public_ip),
            allow_insecure_public=options.allow_insecure_public,
        )
        return policy

    def public_address(self, worker: bool) -> bool:
        """Whether a VM of this role gets a public address."""
        return bool(self.worker_public_ip) if worker else not self.use_private_ip

    async def scheduler_sources(self, internal: Callable[[], Awaitable[list[str]]]) -> list[str]:
        """CIDRs for the scheduler's port and dashboard; ``internal`` gives the network's
        own ranges, used when the client runs inside it."""
        if self.use_private_ip and not self.allowed_cidrs:
            return await internal()
        return await scheduler_sources(
            self.allowed_cidrs, open_to_world=self.open_to_world, public_ip_url=self.public_ip_url
        )
