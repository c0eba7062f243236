"""The internet as a test guest sees it: Debian's mirror, PyPI and ghcr.io in one process.

A test guest resolves the real registries' names to ``SERVICES_ADDRESS`` and trusts the
test CA, so the product's own boot steps run unchanged against one server there:

* ``http://<address>:80`` is ``deb.debian.org``: ``/debian/...`` is the apt repository
  (whatever the Host header says: it is the only plain-HTTP service);
* ``https://<address>:443`` answers by Host header: ``pypi.org`` and
  ``files.pythonhosted.org`` are the package index, ``ghcr.io`` is the registry. Asked
  by any other name or an address (a test on this machine, without the guest's
  ``/etc/hosts``), it routes by path (``/v2/`` is the registry, the rest the index) and
  the index links its files under the same name, so nothing leaves for the real PyPI.

Every request is logged as one JSON line to ``requests.log`` in the service's directory
(``Services.requests()``), so a test can assert what a guest fetched. ``Services.start``
runs the server as a child process, optionally inside a network namespace through a
command prefix (``ip netns exec NAME``), and returns once it listens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from clouds.guest.common import IMPERSONATED_HOSTS, server_certificate
from clouds.guest.mirror_pypi import FILES_HOST, SimpleIndex
from clouds.guest.registry import Registry
from clouds.guest.reply import Reply, file_reply, not_found

__all__ = ["Services", "Site"]

#: The tests directory: ``clouds`` imports from here in the child process.
_IMPORT_ROOT = Path(__file__).resolve().parents[2]
_CHUNK = 1 << 20


class Site:
    """Which service answers a request, by scheme, Host header and path."""

    def __init__(self, apt_repo: Path, wheelhouse: Path, images: dict[str, Path]) -> None:
        self.apt_repo = apt_repo.resolve()
        self.index = SimpleIndex(wheelhouse)
        self.registry = Registry(images)

    def route(self, scheme: str, host_header: str, path: str) -> Reply:
        if scheme == "http":
            return self._apt(path)
        host = host_header.rsplit(":", 1)[0].lower() if host_header else ""
        if host == "pypi.org":
            return self.index.route(path, f"https://{FILES_HOST}")
        if host == FILES_HOST:
            return self.index.route(path, "") if path.startswith("/packages/") else not_found()
        if host == "ghcr.io" or path == "/v2" or path.startswith("/v2/"):
            return self.registry.route(path)
        return self.index.route(path, f"https://{host_header}")

    def _apt(self, path: str) -> Reply:
        if not path.startswith("/debian/"):
            return not_found()
        target = (self.apt_repo / path.removeprefix("/debian/")).resolve()
        if not target.is_relative_to(self.apt_repo) or not target.is_file():
            return not_found()
        return file_reply(target, "application/octet-stream")


class _Log:
    """Requests as JSON lines, written whole under a lock so threads never interleave."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", buffering=1)
        self.lock = threading.Lock()

    def write(self, **entry: Any) -> None:
        # Seconds since the epoch: a test compares them with its own ``time.time()``.
        entry = {"time": time.time(), **entry}
        with self.lock:
            self.file.write(json.dumps(entry) + "\n")


def _handler(site: Site, log: _Log, scheme: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 with a Content-Length on every answer: apt, pip and Docker keep
        # their connections open, and apt pipelines requests on them.
        protocol_version = "HTTP/1.1"
        server_version = "dsc-test-internet"
        timeout = 120

        def do_GET(self) -> None:
            self._answer(head=False)

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def _refuse(self) -> None:
            self.close_connection = True
            self._send(Reply(405, {"Content-Type": "text/plain"}, b"read-only\n"), head=False)

        do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

        def _answer(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            reply = site.route(scheme, self.headers.get("Host", ""), path)
            self._send(reply, head)

        def _send(self, reply: Reply, head: bool) -> None:
            sent = 0
            try:
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(reply.length))
                self.end_headers()
                if head:
                    return
                if reply.path is None:
                    self.wfile.write(reply.body)
                    sent = reply.length
                    return
                with reply.path.open("rb") as f:
                    for chunk in iter(lambda: f.read(_CHUNK), b""):
                        self.wfile.write(chunk)
                        sent += len(chunk)
            finally:
                # Logged even when the client hangs up midway: ``bytes`` tells how far.
                log.write(
                    client=self.client_address[0],
                    scheme=scheme,
                    method=self.command,
                    host=self.headers.get("Host", ""),
                    path=self.path,
                    status=reply.status,
                    bytes=sent,
                    complete=head or sent == reply.length,
                )

        def log_message(self, format: str, *args: Any) -> None:
            """Silenced: ``requests.log`` has every request, in a form tests can read."""

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up or fails the TLS handshake is no server error."""
        error = sys.exc_info()[1]
        print(f"{client_address[0]}: {type(error).__name__}: {error}", file=sys.stderr)


class _TLSServer(_Server):
    def __init__(
        self,
        address: tuple[str, int],
        handler: Callable[..., BaseHTTPRequestHandler],
        context: ssl.SSLContext,
    ) -> None:
        self.context = context
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        # The handshake happens on the first read, in the connection's own thread, so
        # one slow or broken client cannot hold up accepting the others.
        sock, address = super().get_request()
        return self.context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), address


def serve(config: dict[str, Any]) -> None:
    """Run the services until standard input closes (the parent stopped or died)."""
    site = Site(
        Path(config["apt_repo"]),
        Path(config["wheelhouse"]),
        {tag: Path(path) for tag, path in config["images"].items()},
    )
    log = _Log(Path(config["log"]))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config["cert"], config["key"])
    servers = [
        _Server((config["address"], config["http_port"]), _handler(site, log, "http")),
        _TLSServer(
            (config["address"], config["https_port"]), _handler(site, log, "https"), context
        ),
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    while sys.stdin.buffer.read(4096):
        pass
    for server in servers:
        server.shutdown()


class Services:
    """The child process serving ``Site`` on ``address``; ``stop()`` ends it."""

    def __init__(self, process: subprocess.Popen[bytes], address: str, directory: Path) -> None:
        self.process = process
        self.address = address
        self.directory = directory
        self.log_path = directory / "requests.log"

    @classmethod
    def start(
        cls,
        netns_exec_prefix: list[str] | None,
        address: str,
        apt_repo: Path,
        wheelhouse: Path,
        images: dict[str, Path],
        directory: Path,
        *,
        http_port: int = 80,
        https_port: int = 443,
        timeout: float = 60.0,
    ) -> Services:
        """Start serving on ``address`` (inside the namespace the prefix enters, if any).

        Returns once the child says both sockets listen: the parent may have no route
        into the namespace, so the child's word is the readiness check; without a
        namespace a TCP connect confirms it.
        """
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = server_certificate([*IMPERSONATED_HOSTS, address], directory)
        config = {
            "address": address,
            "http_port": http_port,
            "https_port": https_port,
            "apt_repo": str(apt_repo),
            "wheelhouse": str(wheelhouse),
            "images": {tag: str(path) for tag, path in images.items()},
            "cert": str(cert),
            "key": str(key),
            "log": str(directory / "requests.log"),
        }
        config_path = directory / "services.json"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        path = os.pathsep.join(p for p in (str(_IMPORT_ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path}
        command = [sys.executable, "-m", "clouds.guest.internet", str(config_path)]
        with (directory / "server.log").open("ab") as stderr:
            process = subprocess.Popen(
                [*(netns_exec_prefix or []), *command],
                cwd=_IMPORT_ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        services = cls(process, address, directory)
        try:
            services._wait_ready(timeout, probe=netns_exec_prefix is None, port=https_port)
        except BaseException:
            services.stop()
            raise
        return services

    def _wait_ready(self, timeout: float, probe: bool, port: int) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if readable else b""
        if line.strip() != b"ready":
            log = (self.directory / "server.log").read_text(errors="replace")
            raise RuntimeError(f"test services did not start on {self.address}:\n{log}")
        while probe:
            try:
                socket.create_connection((self.address, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def requests(self) -> list[dict[str, Any]]:
        """Every request served so far, oldest first.

        Each is ``{"time": <epoch seconds>, "client", "scheme", "method", "host", "path",
        "status", "bytes", "complete"}``; ``path`` is as the client sent it (URL-quoted).
        """
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line]

    def stop(self) -> None:
        """End the server: closing its stdin asks it to; a TERM, then a KILL, make sure."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the test guests' internet.")
    parser.add_argument("config", type=Path, help="services.json written by Services.start")
    args = parser.parse_args(argv)
    serve(json.loads(args.config.read_text()))


if __name__ == "__main__":
    main()
