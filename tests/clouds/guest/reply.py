"""What a test service answers, apart from how it is sent.

The apt mirror, the package index and the registry decide *what* to answer (status,
headers, a body in memory or a file to stream); ``internet`` alone speaks HTTP. Keeping
the answers plain data lets each service stay a small table of routes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Reply:
    """A status, headers, and either ``body`` or the file ``path`` streamed as the body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    path: Path | None = None

    @property
    def length(self) -> int:
        return self.path.stat().st_size if self.path is not None else len(self.body)


def file_reply(path: Path, content_type: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(200, {"Content-Type": content_type, **(headers or {})}, path=path)


def bytes_reply(body: bytes, content_type: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(200, {"Content-Type": content_type, **(headers or {})}, body)


def json_reply(status: int, document: Any, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps(document).encode()
    return Reply(status, {"Content-Type": "application/json", **(headers or {})}, body)


def not_found(text: str = "Not Found") -> Reply:
    return Reply(404, {"Content-Type": "text/plain; charset=utf-8"}, text.encode() + b"\n")


def redirect(location: str) -> Reply:
    """A permanent redirect, as PyPI answers a project name that is not in normal form."""
    return Reply(301, {"Location": location, "Content-Type": "text/plain"}, b"")
