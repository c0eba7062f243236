"""The ``secure-cloud`` section of the dask config, checked against the options.

The schema and the shipped defaults are written from the option classes themselves
(:mod:`.files`), so a key is known exactly when an option of that name exists; a
misspelled key or a value of the wrong type is refused, naming the key and the close
match. :func:`.resolving.resolve` runs this before reading any option.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import dask.config

from ..errors import ConfigError
from .files import config_defaults, config_schema

__all__ = ["DEFAULTS", "PROVIDERS", "SCHEMA", "check_provider_keys", "schema_for"]

DEFAULTS: dict[str, Any] = config_defaults()
SCHEMA: dict[str, Any] = config_schema()

# Shared keys any provider may read (the shipped defaults name them all).
_SHARED = {k for k, v in DEFAULTS["secure-cloud"].items() if not isinstance(v, dict)}


def _norm(key: str) -> str:
    return key.replace("_", "-")


_ROOT = SCHEMA["properties"]["secure-cloud"]["properties"]
PROVIDERS = tuple(k for k, v in _ROOT.items() if v.get("type") == "object" and "properties" in v)


def schema_for(provider: str | None) -> dict[str, dict[str, Any]]:
    """Schema of each key a provider's section accepts (the shared ones included), or of
    the shared section itself when ``provider`` is ``None``."""
    shared = {k: v for k, v in _ROOT.items() if k not in PROVIDERS}
    if provider is None:
        return shared
    return {**shared, **(_ROOT.get(provider) or {}).get("properties", {})}


def check_provider_keys(provider: str, known: Iterable[str]) -> None:
    """Refuse a misspelled key, or a value of the wrong type, under ``secure-cloud`` or
    ``secure-cloud.<provider>``, naming the key and the close match."""
    known = {_norm(k) for k in known}
    section = dask.config.get("secure-cloud", default={}) or {}
    if not isinstance(section, dict):
        raise ConfigError("secure-cloud must be a mapping of options")
    providers = {p for p, v in section.items() if isinstance(v, dict)} | set(PROVIDERS)
    _check(section, known | _SHARED | providers, "secure-cloud", schema_for(None))
    provider_section = section.get(provider) or {}
    if not isinstance(provider_section, dict):
        raise ConfigError(f"secure-cloud.{provider} must be a mapping of options")
    _check(provider_section, known, f"secure-cloud.{provider}", schema_for(provider))


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list, tuple),
    "object": (dict,),
    "null": (type(None),),
}


def _type_ok(value: Any, spec: dict[str, Any]) -> bool:
    types = spec.get("type")
    if types is None:
        return True
    for name in [types] if isinstance(types, str) else types:
        if isinstance(value, bool) and name in ("integer", "number"):
            continue
        if isinstance(value, _TYPES[name]):
            return "enum" not in spec or value in spec["enum"]
    return False


def _check(
    section: dict[str, Any], known: set[str], where: str, specs: dict[str, dict[str, Any]]
) -> None:
    for key, value in section.items():
        if _norm(key) not in known:
            close = difflib.get_close_matches(_norm(key), sorted(known), n=1)
            hint = f" Did you mean {where}.{close[0]}?" if close else ""
            raise ConfigError(f"Unknown dask config key {where}.{key}.{hint}")
        spec = specs.get(_norm(key))
        # None means "not set here": a provider's key then inherits the shared value.
        if spec is not None and value is not None and not _type_ok(value, spec):
            wanted = spec.get("enum") or spec["type"]
            raise ConfigError(
                f"dask config key {where}.{key} must be {_describe(wanted)}, got "
                f"{value!r}. ({spec.get('description', '')})"
            )


def _describe(wanted: Any) -> str:
    if isinstance(wanted, list) and wanted and all(isinstance(w, str) for w in wanted):
        return " or ".join(wanted)
    return str(wanted)
