"""What a cluster class would do, without starting anything.

``preview`` resolves and checks options exactly as the class's constructor does, then
stops before any VM, thread or event loop exists: ``list`` and ``cleanup`` use its
driver, the tests and the docs its user-data, ``preview(...).cost()`` its price.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import names, pricing
from .credentials import Role
from .driver import Driver
from .options import resolve
from .plan import BootPlanner

if TYPE_CHECKING:
    from .cluster import VMCluster

__all__ = ["Preview", "explicit_none", "preview"]


@dataclasses.dataclass(frozen=True)
class Preview:
    """What a cluster class would use, built from its options without starting anything:
    the driver (for ``list`` and ``cleanup``) and each role's user-data (``cloud-init``)."""

    provider: str
    cluster_id: str
    driver: Driver
    user_data: Mapping[Role, bytes]
    options: Any = None

    def cost(self) -> pricing.Estimate:
        """The cluster's hourly cost at its ``n_workers``, from the cloud's price list
        (asked here, not when the preview is made: ``list`` and ``cleanup`` need none)."""
        return pricing.estimate(self.options, self.options.n_workers, self.driver)


def preview(cls: type[VMCluster], **options: Any) -> Preview:
    """Resolve ``options`` (keyword > dask config > default) and check them exactly as
    ``cls(**options)`` would, then stop before any VM, thread or event loop starts."""
    name = options.pop("name", None)
    extra = {k: options.pop(k) for k in list(options) if k in cls.extra_keywords}
    resolved, driver = cls.setup(
        resolve(cls.Options, explicit_none(options), owner=cls.__name__), **extra
    )
    cluster_id = names.check_cluster_id(name) if name else "dsc-preview"
    planner = BootPlanner(resolved, cluster_id, driver, native_python=cls.native_python(resolved))
    user_data = {
        role: planner.user_data(role, "preview", "tls://0.0.0.0:1")
        for role in (Role.SCHEDULER, Role.WORKER)
    }
    return Preview(cls.Options.provider or cls.provider, cluster_id, driver, user_data, resolved)


def explicit_none(options: dict[str, Any]) -> dict[str, Any]:
    """``idle_timeout=None`` given as a keyword means "never", as in Dask; to
    :func:`resolve` a ``None`` means "not given" (then the config or the default)."""
    if "idle_timeout" in options and options["idle_timeout"] is None:
        return {**options, "idle_timeout": False}
    return options
