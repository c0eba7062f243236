"""What is written from the options classes: the dask config defaults and schema
(``secure-cloud.yaml``, ``secure-cloud-schema.yaml``) and the cluster classes' docs."""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from ..registry import PROVIDERS, options_class
from .base import _key, _Spec, default, specs
from .shared import CloudOptions, ClusterOptions

#: Each provider's options, in the order the docs and config list them.
OPTION_CLASSES: tuple[type[ClusterOptions], ...] = tuple(options_class(name) for name in PROVIDERS)


# -- what is derived from the classes --------------------------------------------------------

#: Config keys of the shared section that are no cluster's option.
_CONFIG_ONLY = {
    "audit-log": _Spec(
        None,
        "JSON-lines record of each cluster's life; null: audit.jsonl in the user data "
        "directory; false: none.",
        ("string", "boolean", "null"),
        None,
        None,
        "null: audit.jsonl in the user data directory; false: none",
    ),
    "price-sources": _Spec(
        {},
        "Other addresses of the clouds' price lists, by cloud (aws, gcp, azure): a "
        "mirror, a proxy, a test stand-in. Empty: each cloud's public one.",
        ("object",),
        None,
        None,
        "{cloud: URL} of another price list; empty: each cloud's public one",
    ),
}
#: Options of the clouds that one shared config key sets for all of them.
_SHARED_CLOUD_OPTIONS = ("public_ip_url",)


def _shared_specs() -> dict[str, _Spec]:
    found = {_key(name): spec for name, spec in specs(ClusterOptions)}
    cloud = dict(specs(CloudOptions))
    found.update({_key(name): cloud[name] for name in _SHARED_CLOUD_OPTIONS})
    found.update(_CONFIG_ONLY)
    return found


def _own_specs(cls: type[ClusterOptions]) -> dict[str, _Spec]:
    """The keys of a provider's section: its own options (those it declares first, then
    those every cloud has), and the shared defaults it changes."""
    shared = _shared_specs()
    ordered = _declared_first(cls)
    return {
        _key(name): spec
        for name, spec in ordered
        if _key(name) not in shared or default(cls, name) != shared[_key(name)].default
    }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_defaults() -> dict[str, Any]:
    """The ``secure-cloud`` dask config defaults (what ``secure-cloud.yaml`` holds)."""
    section: dict[str, Any] = {k: _plain(s.default) for k, s in _shared_specs().items()}
    for cls in OPTION_CLASSES:
        section[cls.provider] = {
            key: _plain(default(cls, key.replace("-", "_"))) for key in _own_specs(cls)
        }
    return {"secure-cloud": section}


def _schema_of(spec: _Spec) -> dict[str, Any]:
    found: dict[str, Any] = {"type": spec.types[0] if len(spec.types) == 1 else list(spec.types)}
    found["description"] = " ".join(spec.doc.split())
    if spec.enum:
        found["enum"] = list(spec.enum)
    return found


def config_schema() -> dict[str, Any]:
    """The JSON schema of the ``secure-cloud`` dask config (``secure-cloud-schema.yaml``)."""
    properties: dict[str, Any] = {k: _schema_of(s) for k, s in _shared_specs().items()}
    for cls in OPTION_CLASSES:
        properties[cls.provider] = {
            "type": "object",
            "properties": {k: _schema_of(s) for k, s in _own_specs(cls).items()},
        }
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "dask-secure-cloud configuration",
        "type": "object",
        "properties": {
            "secure-cloud": {
                "type": "object",
                "additionalProperties": False,
                "properties": properties,
            }
        },
    }


_DEFAULTS_HEADER = """\
# Defaults for every dask-secure-cloud cluster. Override any of these in a dask config
# file (for example ~/.config/dask/secure-cloud.yaml) or with DASK_SECURE_CLOUD__...
# environment variables. A key under secure-cloud.<provider> beats the same key here.
# Generated from dask_secure_cloud/options.py by `python -m dask_secure_cloud.options`.
"""
_SCHEMA_HEADER = """\
# JSON Schema of the secure-cloud dask config (secure-cloud.yaml holds the defaults).
# Generated from dask_secure_cloud/options.py by `python -m dask_secure_cloud.options`.
"""


def _yaml_scalar(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=200)
    return text.removesuffix("\n...\n").strip()


def _yaml_lines(values: Mapping[str, Any], notes: Mapping[str, _Spec], indent: str) -> list[str]:
    lines = []
    for key, value in values.items():
        if isinstance(value, dict) and key not in notes:  # a provider's section
            lines += ["", f"{indent}{key}:"]
            lines += _yaml_lines(value, _own_specs(_by_provider(key)), indent + "  ")
            continue
        block = isinstance(value, list | dict) and value
        first = f"{key}:" if block else f"{key}: {_yaml_scalar(value)}"
        note = notes[key].note
        if note:
            first = f"{first:<26} # {note}" if len(first) < 26 else f"{first}  # {note}"
        lines.append(indent + first)
        if block:
            lines += [f"{indent}  - {_yaml_scalar(item)}" for item in value]
    return lines


def _by_provider(provider: str) -> type[ClusterOptions]:
    return next(cls for cls in OPTION_CLASSES if cls.provider == provider)


def defaults_yaml() -> str:
    """The text of ``secure-cloud.yaml``."""
    section = config_defaults()["secure-cloud"]
    body = _yaml_lines(section, _shared_specs(), "  ")
    return _DEFAULTS_HEADER + "secure-cloud:\n" + "\n".join(body) + "\n"


def schema_yaml() -> str:
    """The text of ``secure-cloud-schema.yaml``."""
    import yaml

    return _SCHEMA_HEADER + yaml.safe_dump(config_schema(), sort_keys=False, width=100)


# -- what the cluster classes show -----------------------------------------------------------


def _declared_first(cls: type[ClusterOptions]) -> list[tuple[str, _Spec]]:
    """``cls``'s options, those it declares itself first."""
    inherited: set[str] = set()
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            inherited |= {name for name, _ in specs(base)}
    return sorted(specs(cls), key=lambda item: item[0] in inherited)


def docstring_parameters(cls: type[ClusterOptions], *, own_only: bool) -> str:
    """A numpydoc "Parameters" section for ``cls``'s options (with ``own_only``, only those
    every cluster does not share), for the cluster classes' docstrings."""
    shared = {name for name, _ in specs(ClusterOptions)} if own_only else set()
    lines = ["Parameters", "----------"]
    for name, spec in _declared_first(cls):
        if name in shared:
            continue
        lines.append(f"{name} : {keyword_annotation(cls, name)}")
        lines += ["    " + line for line in textwrap.wrap(" ".join(spec.doc.split()), 84)]
    return "\n".join(lines)


_GIVEN_AS = {
    "string": "str",
    "number": "float",
    "integer": "int",
    "boolean": "bool",
    "array": "Sequence",
    "object": "Mapping",
}


def keyword_annotation(cls: type[ClusterOptions], name: str) -> str:
    """What a keyword accepts: the field's type, in the forms a caller may give it (a
    duration as ``"12h"`` or seconds too, a list as any sequence), or ``None`` for the
    dask config's value."""
    field_type = {field.name: str(field.type) for field in dataclasses.fields(cls)}[name]
    field_type = field_type.replace("tuple[", "Sequence[").replace(", ...]", "]")
    field_type = field_type.replace("dict[", "Mapping[")
    kinds = [k.strip() for k in field_type.split("|")]
    for json_type in dict(specs(cls))[name].types:
        given = _GIVEN_AS.get(json_type)
        if given and not any(k == given or k.startswith(given + "[") for k in kinds):
            kinds.insert(0, given)
    if "None" not in kinds:
        kinds.append("None")
    return " | ".join(dict.fromkeys(kinds))


def keyword_signature(
    cls: type[ClusterOptions], extra: Sequence[inspect.Parameter]
) -> inspect.Signature:
    """The signature a cluster class shows (``help``, IDEs, the docs): every option as a
    keyword-only parameter defaulting to ``None`` (meaning: the dask config decides)."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [
        inspect.Parameter(name, keyword, default=None, annotation=keyword_annotation(cls, name))
        for name, _ in _declared_first(cls)
    ]
    return inspect.Signature([*parameters, *extra])


def write_config_files() -> list[str]:
    """Write ``secure-cloud.yaml`` and ``secure-cloud-schema.yaml`` into the package."""
    import os

    # The package's directory, where config.py's neighbours have always been.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    written = []
    for filename, text in (
        ("secure-cloud.yaml", defaults_yaml()),
        ("secure-cloud-schema.yaml", schema_yaml()),
    ):
        with open(os.path.join(here, filename), "w") as f:
            f.write(text)
        written.append(filename)
    return written
