"""``LocalVMCluster``'s options."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from .base import _path, option
from .shared import ClusterOptions


@dataclasses.dataclass(frozen=True)
class LocalOptions(ClusterOptions):
    provider: ClassVar[str] = "local"
    changed_defaults: ClassVar[Mapping[str, Any]] = {"runtime": "native", "boot_timeout": "60s"}

    directory: str | None = option(
        None,
        """
        Where the VMs' directories go. Default: a private directory in the system's
        temporary directory. Each is deleted when its VM is.
        """,
        types=("string", "null"),
        check=_path,
        note="null: a private directory under the system temp dir",
    )
