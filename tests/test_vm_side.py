"""The code that runs on a VM: real files, checked as what they are, and needing nothing
of the client.

A VM's image has Dask, not this package. What the package ships to it (``vm/``) may use
only the standard library and Dask's own packages; its shell is POSIX sh that shellcheck
passes, both as the files in ``vm/boot/`` and as every boot script a cloud renders.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from helpers import decoded_files

from dask_secure_cloud.cluster import preview
from dask_secure_cloud.registry import PROVIDERS, cluster_class

VM = Path(str(resources.files("dask_secure_cloud.vm")))
#: What a VM has besides the standard library: Dask, and what Dask itself brings.
ALLOWED = {"dask", "distributed", "tornado", "yaml", "cryptography"}
REQUIRED = {
    "local": {},
    "aws": {"region": "eu-west-1"},
    "gcp": {"project": "demo-project", "credentials": AnonymousCredentials()},
    "azure": {"resource_group": "dask-rg", "subscription_id": "sub", "location": "westeurope"},
    "digitalocean": {"token": "dop_v1_x"},
}


def shellcheck(path: Path) -> subprocess.CompletedProcess[str]:
    """Every finding, down to style: the scripts have none."""
    return subprocess.run(
        ["shellcheck", "--shell=sh", "--severity=style", str(path)],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("part", sorted(p.name for p in (VM / "boot").glob("*.sh")))
def test_each_boot_script_part_passes_shellcheck(part):
    result = shellcheck(VM / "boot" / part)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("runtime", ["docker", "native"])
@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_every_rendered_boot_script_passes_shellcheck(provider, runtime, tmp_path):
    shown = preview(cluster_class(provider), runtime=runtime, **REQUIRED[provider])
    for role, user_data in shown.user_data.items():
        path = tmp_path / f"{role.value}.sh"
        path.write_bytes(decoded_files(user_data)["/opt/dask-secure-cloud/boot.sh"])
        result = shellcheck(path)
        assert result.returncode == 0, f"{provider} {role.value}:\n{result.stdout}"


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                roots.add(".")
            elif node.module:
                roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", sorted(str(p.relative_to(VM)) for p in VM.rglob("*.py")))
def test_vm_code_needs_only_the_standard_library_and_dask(module):
    """Relative imports included: a VM module may not reach into the client's package."""
    roots = _imported_roots(VM / module) - {"__future__"}
    foreign = {r for r in roots if r not in sys.stdlib_module_names and r not in ALLOWED}
    assert not foreign, f"{module} imports {sorted(foreign)}"
