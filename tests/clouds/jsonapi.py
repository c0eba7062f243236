"""The HTTP(S) server every JSON cloud stand-in runs on, on 127.0.0.1 only.

A stand-in supplies one function, ``(method, path, query, body, headers) -> (status,
payload, headers)``; this module does the sockets, TLS and JSON. ``payload`` ``None``
sends an empty body (204-style answers); ``bytes`` are sent as they are (a blob).

``HTTPSStandIn`` is the base of the stand-ins served over HTTPS: each has its own test CA
(the SDK under test trusts it through a ``ca_bundle``) and a VM booter to stop at the end.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import trustme

from .booter import StandInBooter

Answer = tuple[int, Any, Mapping[str, str]]
Handle = Callable[[str, str, dict[str, str], bytes, Mapping[str, str]], Answer]


class JSONServer:
    def __init__(self, handle: Handle, tls: ssl.SSLContext | None = None) -> None:
        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, payload, headers = handle(self.command, url.path, query, body, self.headers)
                raw = isinstance(payload, bytes)
                data = b"" if payload is None else payload if raw else json.dumps(payload).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if data:
                    kind = "application/octet-stream" if raw else "application/json"
                    self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        port = self._server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    def stop(self) -> None:
        self._server.shutdown()


class HTTPSStandIn:
    """A cloud API stand-in on ``https://127.0.0.1:<port>`` with a certificate from its
    own test CA. Subclasses answer requests in :meth:`_answer`."""

    def __init__(self, booter: StandInBooter) -> None:
        self.booter = booter
        self.ca = trustme.CA()
        self.url = ""

    def _answer(
        self, method: str, path: str, query: dict[str, str], body: bytes, headers: Any
    ) -> Answer:
        raise NotImplementedError

    def start(self) -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self._server = JSONServer(self._answer, tls=context)
        self.url = self._server.url
        return self.url

    def stop(self) -> None:
        self._server.stop()
        self.booter.stop_all()
