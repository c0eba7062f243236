"""Dask config defaults for dask-secure-cloud, its schema, and the one rule for reading options.

The options classes (``options/``) are the one source of every key, default and meaning;
``secure-cloud.yaml`` and ``secure-cloud-schema.yaml`` are written from them, and the
defaults loaded here come from the same classes. Loading the defaults changes nothing
the user set and writes nothing to their home directory. :func:`check_provider_keys`
refuses a misspelled key or a value of the wrong type in the user's config; resolving a
value (keyword > ``secure-cloud.<provider>`` > ``secure-cloud``) is
``options.resolve``'s job.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dask.config
import yaml

from .errors import ConfigError
from .options.base import _from_config
from .options.files import config_defaults, config_schema

__all__ = [
    "ConfigError",
    "Resolved",
    "check_provider_keys",
    "explain",
    "schema_for",
]

_DEFAULTS: dict[str, Any] = config_defaults()
SCHEMA: dict[str, Any] = config_schema()

dask.config.update_defaults(_DEFAULTS)

# Shared keys any provider may read (the shipped defaults name them all).
_SHARED = {k for k, v in _DEFAULTS["secure-cloud"].items() if not isinstance(v, dict)}


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


@dataclass(frozen=True)
class Resolved:
    """One option's effective value and where it came from."""

    name: str
    value: Any
    source: str


def explain(provider: str, names: Iterable[str]) -> list[Resolved]:
    """The effective value of each option for ``provider``, and its source: an environment
    variable, a config file, ``dask.config.set`` in this process, or the default."""
    env = _env_keys()
    files = _file_keys()
    rows = []
    for name in sorted(names):
        key = _norm(name)
        value = _from_config(provider, name)[0]
        for dotted in (f"secure-cloud.{provider}.{key}", f"secure-cloud.{key}"):
            if dotted in env:
                source = f"environment {env[dotted]}"
                break
            if dotted in files:
                source = f"file {files[dotted]}"
                break
            if _default(dotted) is not _MISSING and dask.config.get(dotted, None) != _default(
                dotted
            ):
                source = f"set in this process ({dotted})"
                break
            if _default(dotted) not in (_MISSING, None):
                source = f"default ({dotted})"
                break
        else:
            source = "default"
        rows.append(Resolved(name, value, source))
    return rows


_MISSING = object()


def _default(dotted: str) -> Any:
    node: Any = _DEFAULTS
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _flatten(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix]
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}.{_norm(str(key))}" if prefix else _norm(str(key))
        keys += _flatten(value, dotted) if isinstance(value, dict) and value else [dotted]
    return keys


def _env_keys() -> dict[str, str]:
    found = {}
    for variable in os.environ:
        if variable.startswith("DASK_SECURE_CLOUD__") or variable.startswith("DASK_SECURE-CLOUD__"):
            parts = variable[len("DASK_") :].lower().split("__")
            found[".".join(_norm(p) for p in parts)] = variable
    return found


def _file_keys() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in dask.config.paths:
        if not os.path.isdir(path):
            continue
        for name in sorted(os.listdir(path)):
            if not name.endswith((".yaml", ".yml")):
                continue
            full = os.path.join(path, name)
            try:
                with open(full) as f:
                    data = yaml.safe_load(f) or {}
            except (OSError, yaml.YAMLError):
                continue
            for dotted in _flatten(data):
                found.setdefault(dotted, full)
    return found
