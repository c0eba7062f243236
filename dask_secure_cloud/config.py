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

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dask.config
import yaml

from .errors import ConfigError
from .options.base import _from_config
from .options.keys import (
    DEFAULTS,
    PROVIDERS,
    SCHEMA,
    _norm,
    check_provider_keys,
    schema_for,
)

__all__ = [
    "PROVIDERS",
    "SCHEMA",
    "ConfigError",
    "Resolved",
    "check_provider_keys",
    "explain",
    "schema_for",
]

# The package's defaults, written from the option classes, join Dask's own.
dask.config.update_defaults(DEFAULTS)


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
    node: Any = DEFAULTS
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
