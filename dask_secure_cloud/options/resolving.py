"""Resolving a cluster's options: keyword > dask config > default, each value checked.

Kept apart from :mod:`.base` (which declares options) because it reads the dask config
through :mod:`.keys`, whose schema is written from every option class: the classes
must exist first.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, TypeVar

from ..errors import OptionError, UnknownOptionError
from .base import _from_config, default, specs
from .keys import check_provider_keys

__all__ = ["resolve"]

_T = TypeVar("_T")


def resolve(cls: type[_T], keywords: Mapping[str, Any], *, owner: str = "") -> _T:
    """The options of ``cls``: each keyword (``None``: not given) beats the dask config,
    which beats the default; each value is then checked, wherever it came from, and an
    error names the keyword or the config key to fix. Unknown keywords and misspelled
    config keys are refused with the closest real name."""
    names = [name for name, _ in specs(cls)]
    owner = owner or cls.__name__
    for given in keywords:
        if given not in names:
            close = difflib.get_close_matches(given, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownOptionError(f"{owner} has no option {given!r}.{hint}")
    check_provider_keys(cls.provider, names)
    values: dict[str, Any] = {}
    for name, spec in specs(cls):
        value, label = keywords.get(name), name
        if value is None:
            value, key = _from_config(cls.provider, name)
            if key is not None:
                label = f"{name} (dask config {key})"
        if value is None:
            value = default(cls, name)
        if value is None:
            if "null" not in spec.types:
                raise OptionError(f"{owner}: {name} is required")
        elif spec.check is not None:
            value = spec.check(value, label)
        values[name] = value
    return cls(**values)
