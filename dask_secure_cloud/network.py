"""Who may reach the scheduler: the creator's address, or CIDRs the user gives.

Every cloud's firewall opens the scheduler port and dashboard to these CIDRs only; the
Dask ports between the cluster's own VMs are opened by the firewall's self-reference.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import urllib.request
from collections.abc import Sequence

__all__ = ["NetworkPolicyError", "check_public_exposure", "parse_cidrs", "scheduler_sources"]

logger = logging.getLogger(__name__)

_WORLD = {"0.0.0.0/0", "::/0"}


class NetworkPolicyError(ValueError):
    """The requested exposure is refused until the caller opts in explicitly."""


def parse_cidrs(values: Sequence[str] | None, option_name: str = "allowed_cidrs") -> list[str]:
    """Normalise CIDRs, or raise naming the bad one."""
    if values is None:
        return []
    if isinstance(values, str):
        raise NetworkPolicyError(f"{option_name} must be a list of CIDRs, got {values!r}")
    cidrs = []
    for value in values:
        try:
            cidrs.append(str(ipaddress.ip_network(value, strict=False)))
        except ValueError as e:
            raise NetworkPolicyError(
                f"{option_name}: {value!r} is not an address or CIDR such as '203.0.113.7/32'"
            ) from e
    return cidrs


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
    if _WORLD & set(cidrs):
        if not open_to_world:
            raise NetworkPolicyError(
                "allowed_cidrs opens the scheduler to the whole internet; if you really "
                "mean it, also pass open_to_world=True"
            )
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
