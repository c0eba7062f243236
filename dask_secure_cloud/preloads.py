"""What a VM is given of ``vm/``: each file, made of which modules, with which settings.

The VM's image needs only Dask, not this package, so the code that runs there is shipped
as source files that ``cloudinit`` writes next to the boot script: Dask loads the
preloads with ``--preload``, the boot script runs ``enroll.py``. A file is one or more
``vm/`` modules (``SHIPPED``): modules that import each other travel as one file, since
a VM has nothing to import them from. Settings are appended as one literal (a plain
value, mostly a ``dict``, written with ``repr`` and refused unless it reads back the
same): data, never code; nothing is read from the environment or the command line.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping
from importlib import resources
from typing import Any, NamedTuple

__all__ = [
    "SHIPPED",
    "Shipped",
    "enroll_script",
    "lease",
    "peer_checks",
    "shipped_module",
    "spot_interruption",
]


class Shipped(NamedTuple):
    """One file a VM gets."""

    #: The ``vm/`` modules the file is made of, each after the modules it imports.
    modules: tuple[str, ...]
    #: The name the settings are bound to, which the modules read.
    settings: str = "SETTINGS"


#: Every file shipped to VMs, by name: what of ``vm/`` each VM may run is here alone.
SHIPPED: dict[str, Shipped] = {
    "peers.py": Shipped(("roles.py", "gate.py", "certificate.py", "relays.py", "peers.py")),
    "enroll.py": Shipped(("enroll.py",)),
    "lease.py": Shipped(("lease.py",), settings="LEASE_SECONDS"),
    # After the cloud's on_expiry code, which has its own SETTINGS (Driver.lease_end).
    "lease_end.py": Shipped(("lease.py", "lease_end.py"), settings="LEASE_SECONDS"),
    "spot.py": Shipped(("spot.py",)),
    "azure_reaper.py": Shipped(("azure_reaper.py",)),
}


def shipped_module(name: str, settings: Any = None) -> str:
    """The file ``name`` of ``SHIPPED`` as text for a VM, its settings appended.

    Settings are a plain value (strings, numbers, booleans, ``None``, and tuples, lists
    and dicts of them): ``repr`` of those is a literal, so whatever a value holds stays
    a value. Anything else is refused."""
    text = _source(name)
    if settings is None:
        return text
    if isinstance(settings, Mapping):
        settings = dict(settings)
    literal = repr(settings)
    try:
        same = ast.literal_eval(literal) == settings
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        same = False
    if not same:
        raise ValueError(f"{name}: settings must be plain values, not {literal[:200]}")
    return f"{text}\n{SHIPPED[name].settings} = {literal}\n"


def peer_checks(settings: Mapping[str, Any]) -> str:
    """Scheduler, worker and nanny preload: the peer checks, with their settings (the
    cluster id, this VM's role, a worker's scheduler host, ``workers_as_clients``)."""
    return shipped_module("peers.py", settings)


def enroll_script() -> str:
    """``enroll.py``, run by the boot script before Dask starts (not a preload, but
    shipped the same way)."""
    return shipped_module("enroll.py")


def lease(seconds: int, on_expiry: str = "") -> str:
    """Scheduler preload: close when no lease renewal came for ``seconds``.

    ``on_expiry`` is the cloud's own shipped code (``Driver.lease_end``, standard
    library only) that defines ``on_expiry(resources)``: called in a thread, with the
    ``resources`` the last renewal passed, before the scheduler closes. It comes first
    in the file (its ``from __future__`` import must), then ``lease_end.py``."""
    if not on_expiry:
        return shipped_module("lease.py", int(seconds))
    return f"{on_expiry}\n{shipped_module('lease_end.py', int(seconds))}"


def spot_interruption(
    notice_url: str,
    token_url: str | None,
    interval_ms: int = 5000,
    *,
    headers: Mapping[str, str] | None = None,
    must_contain: str = "",
) -> str:
    """Worker preload: retire gracefully once ``notice_url`` answers 200 (with
    ``must_contain`` in its body, for clouds that always answer 200 with a list of events).
    ``token_url`` is EC2's IMDSv2 session-token endpoint, if any."""
    settings = {
        "notice_url": notice_url,
        "token_url": token_url or "",
        "interval_ms": interval_ms,
        "headers": dict(headers or {}),
        "must_contain": must_contain,
    }
    return shipped_module("spot.py", settings)


@functools.cache
def _source(name: str) -> str:
    """The modules of file ``name``, in order, as one module without docstrings and
    comments (the same code in less user-data: EC2 allows 16 KiB in all). Their imports
    of each other are dropped, as each is defined above by then, and a name may be
    defined by one of them only. Made once per process: every VM's user-data carries it,
    and parsing it costs tens of milliseconds."""
    modules = SHIPPED[name].modules
    head: list[ast.stmt] = []
    body: list[ast.stmt] = []
    seen: set[str] = set()
    defined: dict[str, str] = {}
    for index, module in enumerate(modules):
        tree = ast.parse(resources.files(f"{__package__}.vm").joinpath(module).read_text())
        _drop_docstrings(tree)
        _drop_annotations(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level and node not in tree.body:
                raise ValueError(f"vm/{module}: a relative import inside a block")
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1 or f"{node.module}.py" not in modules[:index]:
                    raise ValueError(
                        f"vm/{module} imports .{node.module or ''}, which {name} does not "
                        "ship before it"
                    )
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                key = ast.dump(node)
                if key not in seen:
                    seen.add(key)
                    is_future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
                    (head if is_future else body).append(node)
                continue
            for bound in _bound(node):
                if defined.setdefault(bound, module) != module:
                    raise ValueError(f"{name}: vm/{module} and vm/{defined[bound]} define {bound}")
            body.append(node)
    return ast.unparse(ast.Module(body=head + body, type_ignores=[])) + "\n"


def _drop_docstrings(tree: ast.Module) -> None:
    for node in ast.walk(tree):
        block = getattr(node, "body", None)
        if (
            isinstance(block, list)
            and block
            and isinstance(block[0], ast.Expr)
            and isinstance(block[0].value, ast.Constant)
            and isinstance(block[0].value.value, str)
        ):
            node.body = block[1:] or [ast.Pass()]  # type: ignore[attr-defined]


def _drop_annotations(tree: ast.Module) -> None:
    """Functions' annotations, which nothing on a VM reads; a class's fields keep theirs
    (a dataclass's are its fields), and so does a bare ``name: type`` (it makes a name
    local)."""
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    fields = {id(s) for c in classes for s in c.body if isinstance(s, ast.AnnAssign)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
            arguments = node.args
            for arg in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs):
                arg.annotation = None
            for arg in (arguments.vararg, arguments.kwarg):
                if arg is not None:
                    arg.annotation = None
        for _field, block in ast.iter_fields(node):
            if not isinstance(block, list):
                continue
            for i, stmt in enumerate(block):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and stmt.value is not None
                    and stmt.simple
                    and id(stmt) not in fields
                ):
                    block[i] = ast.Assign(targets=[stmt.target], value=stmt.value, lineno=0)


def _bound(node: ast.stmt) -> list[str]:
    """The module-level names a statement defines."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else []
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
