"""Dask config defaults for dask-secure-cloud, and the one rule for reading options.

Every option is resolved the same way, in one place: an explicit keyword beats the dask
config (files and ``DASK_SECURE_CLOUD__...`` variables) under ``secure-cloud.<provider>``,
which beats the shared ``secure-cloud`` key, whose built-in default ships in
``secure-cloud.yaml``. Loading the defaults changes nothing the user set and writes
nothing to their home directory.
"""

from __future__ import annotations

import datetime
import difflib
import os
from collections.abc import Iterable
from typing import Any

import dask.config
import yaml

__all__ = ["ConfigError", "check_provider_keys", "option", "parse_duration", "port"]

_DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "secure-cloud.yaml")

with open(_DEFAULTS_FILE) as _f:
    _DEFAULTS: dict[str, Any] = yaml.safe_load(_f)

dask.config.update_defaults(_DEFAULTS)

# Shared keys any provider may read (the shipped defaults name them all).
_SHARED = {k for k, v in _DEFAULTS["secure-cloud"].items() if not isinstance(v, dict)}


class ConfigError(ValueError):
    """A dask config key or value under ``secure-cloud`` is wrong."""


def _norm(key: str) -> str:
    return key.replace("_", "-")


def option(provider: str, name: str, value: Any = None) -> Any:
    """Resolve one option: keyword > ``secure-cloud.<provider>.<name>`` > ``secure-cloud.<name>``.

    A ``None`` keyword means "not given". A ``None`` value in the provider's section
    means "inherit the shared value".
    """
    if value is not None:
        return value
    key = _norm(name)
    found = dask.config.get(f"secure-cloud.{provider}.{key}", default=None)
    if found is not None:
        return found
    return dask.config.get(f"secure-cloud.{key}", default=None)


def check_provider_keys(provider: str, known: Iterable[str]) -> None:
    """Refuse a misspelled key under ``secure-cloud`` or ``secure-cloud.<provider>``."""
    known = {_norm(k) for k in known}
    section = dask.config.get("secure-cloud", default={}) or {}
    providers = {p for p, v in section.items() if isinstance(v, dict)}
    _check(section, known | _SHARED | providers, "secure-cloud")
    provider_section = section.get(provider) or {}
    if not isinstance(provider_section, dict):
        raise ConfigError(f"secure-cloud.{provider} must be a mapping of options")
    _check(provider_section, known, f"secure-cloud.{provider}")


def _check(section: dict[str, Any], known: set[str], where: str) -> None:
    for key in section:
        if _norm(key) in known:
            continue
        close = difflib.get_close_matches(_norm(key), sorted(known), n=1)
        hint = f" Did you mean {where}.{close[0]}?" if close else ""
        raise ConfigError(f"Unknown dask config key {where}.{key}.{hint}")


def parse_duration(value: Any, option_name: str) -> datetime.timedelta:
    """Turn ``'12h'``, ``3600`` or a ``timedelta`` into a positive ``timedelta``."""
    if isinstance(value, datetime.timedelta):
        delta = value
    else:
        try:
            delta = datetime.timedelta(seconds=dask.utils.parse_timedelta(value, default="s"))
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(
                f"{option_name} must be a duration such as '12h' or '30m', got {value!r}"
            ) from e
    if delta <= datetime.timedelta(0):
        raise ValueError(f"{option_name} must be positive, got {value!r}")
    return delta


def port(value: Any, option_name: str) -> int:
    """A TCP port number, or a ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{option_name} must be a TCP port from 1 to 65535, got {value!r}")
    return value
