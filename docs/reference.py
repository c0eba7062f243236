"""Write the configuration and CLI references from the schema and the click commands."""

from __future__ import annotations

import json
import os

import click
import yaml


def _type(spec: dict) -> str:
    kinds = spec.get("type", "any")
    text = " or ".join(kinds) if isinstance(kinds, list) else kinds
    if "enum" in spec:
        text += ": " + ", ".join(f"``{v}``" for v in spec["enum"])
    return text


def _default(defaults: dict, key: str) -> str:
    if key not in defaults:
        return "(shared)"
    return "``" + json.dumps(defaults[key]) + "``"


def config_reference() -> str:
    from dask_secure_cloud import config

    here = os.path.dirname(config.__file__)
    with open(os.path.join(here, "secure-cloud.yaml")) as f:
        defaults = yaml.safe_load(f)["secure-cloud"]
    lines = [
        ".. This file is generated from secure-cloud-schema.yaml when the docs are built.",
        "",
    ]

    def table(title: str, specs: dict, values: dict, prefix: str) -> None:
        lines.extend([title, "-" * len(title), ""])
        lines.extend([".. list-table::", "   :header-rows: 1", "   :widths: 30 20 20 50", ""])
        lines.extend(["   * - Key", "     - Type", "     - Default", "     - Meaning"])
        for key, spec in specs.items():
            lines.append(f"   * - ``{prefix}{key}``")
            lines.append(f"     - {_type(spec)}")
            lines.append(f"     - {_default(values, key)}")
            lines.append(f"     - {spec.get('description', '')}")
        lines.append("")

    table("Shared options", config.schema_for(None), defaults, "secure-cloud.")
    shared = set(config.schema_for(None))
    for provider in config.PROVIDERS:
        own = {k: v for k, v in config.schema_for(provider).items() if k not in shared}
        table(f"{provider}", own, defaults[provider], f"secure-cloud.{provider}.")
    return "\n".join(lines)


def cli_reference() -> str:
    from dask_secure_cloud.cli import main

    lines = [".. This file is generated from the click commands when the docs are built.", ""]
    context = click.Context(main, info_name="dask secure-cloud")
    for name in sorted(main.list_commands(context)):
        command = main.get_command(context, name)
        sub = click.Context(command, info_name=f"dask secure-cloud {name}", parent=None)
        title = f"dask secure-cloud {name}"
        lines.extend([title, "-" * len(title), "", ".. code-block:: text", ""])
        lines.extend("   " + line for line in command.get_help(sub).splitlines())
        lines.append("")
    return "\n".join(lines)


def write_references(srcdir: str) -> None:
    out = os.path.join(srcdir, "_generated")
    os.makedirs(out, exist_ok=True)
    for name, text in (("config-reference.rst", config_reference()), ("cli.rst", cli_reference())):
        path = os.path.join(out, name)
        old = None
        if os.path.exists(path):
            with open(path) as f:
                old = f.read()
        if old != text:  # unchanged files keep Sphinx's incremental build quiet
            with open(path, "w") as f:
                f.write(text)
