"""What a cluster costs per hour, before it exists, from each cloud's own price list.

One module per cloud reads its price source through the official client where there is
one (``aws``: botocore's ``pricing`` and ``ec2``; ``gcp``: the Cloud Billing Catalog
over google-auth; ``azure``: the public Retail Prices API; ``digitalocean``: pydo's
sizes). Each takes the resolved options and returns an :class:`Estimate`; prices are
kept on disk with their age (``cache``). Every call here blocks: a coroutine runs
:func:`estimate` in a thread.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..registry import PROVIDERS
from .estimate import (
    CostLimitError,
    Estimate,
    Item,
    Part,
    PriceUnknown,
    money,
    refusal,
    workers_within,
)

__all__ = [
    "CostLimitError",
    "Estimate",
    "Item",
    "Part",
    "PriceUnknown",
    "estimate",
    "money",
    "refusal",
    "workers_within",
]


def estimate(options: Any, workers: int, driver: Any = None) -> Estimate:
    """The hourly cost of a cluster with ``options`` and ``workers`` workers.

    ``driver`` lends what the options cannot hold (Compute Engine's ``credentials=``,
    the location of an Azure resource group).
    ``LocalVMCluster`` costs nothing: its VMs are processes on this machine."""
    provider = getattr(options, "provider", "")
    if provider == "local":
        zero = Part((Item("process on this machine", 0.0),))
        return Estimate(
            "local",
            "",
            zero,
            zero,
            workers,
            ("LocalVMCluster runs on this machine: no cloud bill",),
        )
    if provider not in PROVIDERS:
        why = f"no price source for provider {provider or type(options).__name__!r}"
        part = Part((Item("VM", None, why=why),))
        return Estimate(provider, "", part, part, workers)
    # Each cloud's module is named as the provider and reads its own price list.
    module = importlib.import_module(f".{provider}", __name__)
    return module.estimate(options, workers, driver)
