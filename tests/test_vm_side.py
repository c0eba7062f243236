"""The code that runs on a VM: real files, checked as what they are, and needing nothing
of the client.

A VM's image has Dask, not this package. What the package ships to it (``vm/``) may use
only the standard library and Dask's own packages; its shell is POSIX sh that shellcheck
passes, both as the files in ``vm/boot/`` and as every boot script a cloud renders.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials
from helpers import decoded_files

from dask_secure_cloud.cluster import preview
from dask_secure_cloud.preloads import (
    SHIPPED,
    Shipped,
    lease,
    peer_checks,
    shipped_module,
    spot_interruption,
)
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


@pytest.mark.parametrize("part", sorted(p.name for p in (VM / "boot").glob("*.sh")))
def test_each_part_keeps_to_what_shipping_without_comments_can_read(part):
    """User-data carries a part without its comment lines (``bootscript._without_comments``),
    which reads here-documents only as ``<<'WORD'`` or ``<<WORD`` ended by ``WORD`` alone
    on a line, and drops a comment line even after a continued one: each would change
    the code. A part written otherwise fails here, not on a VM."""
    lines = (VM / "boot" / part).read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if "<<" in line and not line.lstrip().startswith("#"):
            found = re.search(r"<<(-?)\s*('?)(\w+)\2(\s|$)", line)
            assert found and not found.group(1), f"{part}:{number}: {line!r}"
            assert found.group(3) in [x for x in lines[number:]], f"{part}:{number}: no end"
        if line.rstrip().endswith("\\") and number < len(lines):
            following = lines[number].lstrip()
            assert not following.startswith("#"), f"{part}:{number + 1}: a comment in a command"


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
    """What ``path`` imports: a top-level package, or ``.name`` for a sibling in vm/."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                roots.add("." * node.level + (node.module or ""))
            elif node.module:
                roots.add(node.module.split(".")[0])
    return roots


VM_MODULES = sorted(str(p.relative_to(VM)) for p in VM.rglob("*.py"))


@pytest.mark.parametrize("module", VM_MODULES)
def test_vm_code_needs_only_the_standard_library_and_dask(module):
    """Relative imports included: a VM module may import a module of ``vm/`` that is
    shipped with it, and nothing of the client's package."""
    roots = _imported_roots(VM / module) - {"__future__"}
    shipped_with = {
        f".{m.removesuffix('.py')}"
        for file in SHIPPED.values()
        if module in file.modules
        for m in file.modules[: file.modules.index(module)]
    }
    foreign = {
        r
        for r in roots
        if r not in sys.stdlib_module_names and r not in ALLOWED and r not in shipped_with
    }
    assert not foreign, f"{module} imports {sorted(foreign)}"


def test_every_vm_module_is_shipped():
    """What runs on a VM is listed in one place, ``preloads.SHIPPED``."""
    shipped = {m for file in SHIPPED.values() for m in file.modules}
    assert shipped == {m for m in VM_MODULES if m != "__init__.py"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_shipped_file_runs_alone_without_the_client(name, tmp_path):
    """A VM has Dask but not this package: each file runs as a module of its own in a
    fresh interpreter, and imports nothing of the client."""
    path = tmp_path / name
    path.write_text(shipped_module(name, {} if SHIPPED[name].settings == "SETTINGS" else 60))
    code = (
        "import runpy, sys\n"
        f"found = runpy.run_path({str(path)!r}, run_name='shipped')\n"
        "client = sorted(m for m in sys.modules if m.startswith('dask_secure_cloud'))\n"
        "assert not client, client\n"
        "print(sorted(n for n in found if n.startswith('dask_setup')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    preload = name not in ("enroll.py", "azure_reaper.py")
    assert ("'dask_setup'" in done.stdout) is preload, done.stdout


def test_shipped_modules_lose_docstrings_and_annotations_but_keep_fields():
    """Less user-data, the same code: a dataclass keeps its fields' annotations."""
    text = peer_checks({"cluster_id": "c", "role": "worker"})
    assert '"""' not in text and "-> None" not in text and "from ." not in text
    assert text.count("from __future__ import annotations") == 1
    assert text.startswith("from __future__ import annotations")
    assert "    cluster_id: str\n" in text


def test_the_lease_ends_with_the_clouds_code_only_when_there_is_some():
    plain = lease(60)
    assert "on_expiry" not in plain and re.search(r"^LEASE_SECONDS = 60$", plain, re.M)
    reaper = shipped_module("azure_reaper.py", {"scheduler": "/vm/s", "patience": 1})
    ending = lease(60, reaper)
    assert ending.startswith(reaper) and ending.endswith("\nLEASE_SECONDS = 60\n")
    found: dict[str, Any] = {}
    exec(compile(ending, "lease.py", "exec"), found)
    # The reaper keeps its settings, and the lease calls it.
    assert found["SETTINGS"]["scheduler"] == "/vm/s"
    assert found["BEFORE_CLOSE"] == [found["on_expiry"]]


class _Sly(str):
    def __repr__(self) -> str:
        return "__import__('os').getcwd()"


@pytest.mark.parametrize(
    "settings", [{"x": object()}, {"x": float("nan")}, [print], {"x": _Sly("a")}]
)
def test_settings_that_are_not_plain_values_are_refused(settings):
    """Settings are appended as a literal: a value that ``repr`` would write as anything
    else could become code on the VM."""
    with pytest.raises(ValueError, match="plain values"):
        shipped_module("spot.py", settings)


def test_settings_stay_data_whatever_they_hold():
    nasty = "'}; import os; os.system('x') #\n\"\"\"\\"
    text = spot_interruption(nasty, nasty, headers={nasty: nasty}, must_contain=nasty)
    found: dict[str, Any] = {}
    exec(compile(text, "spot.py", "exec"), found)
    assert found["SETTINGS"]["notice_url"] == nasty
    assert found["SETTINGS"]["headers"] == {nasty: nasty}


def test_modules_shipped_together_may_not_define_a_name_twice(monkeypatch):
    """They share one namespace on the VM: a name defined twice would be one of them."""
    monkeypatch.setitem(SHIPPED, "twice.py", Shipped(("lease.py", "spot.py")))
    with pytest.raises(ValueError, match="define"):
        shipped_module("twice.py", {})
