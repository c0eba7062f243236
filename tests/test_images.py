"""Before launch, the cluster asks the image's registry whether the tag exists.

A registry on loopback speaks the Registry HTTP API v2 with an anonymous bearer-token
challenge, as ghcr.io and Docker Hub do.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest
from helpers import any_vm_processes

from dask_secure_cloud import LocalVMCluster, plan
from dask_secure_cloud.cluster import ClusterStartError
from dask_secure_cloud.images import Presence, image_presence, parse_reference

TAGS = {"dask/dask": {"2024.8.0-py3.11"}}


class _Registry(http.server.BaseHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.path.startswith("/token?"):
            self._answer(200, json.dumps({"token": "anonymous"}).encode())
            return
        self._answer(404, b"")

    def do_HEAD(self) -> None:
        self.requests.append(self.path)
        if self.headers.get("Authorization") != "Bearer anonymous":
            realm = f"http://{self.headers['Host']}/token"
            self.send_response(401)
            self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        _, _, repository_and_tag = self.path.partition("/v2/")
        repository, _, tag = repository_and_tag.partition("/manifests/")
        self._answer(200 if tag in TAGS.get(repository, ()) else 404, b"")

    def _answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@pytest.fixture
def registry() -> Iterator[tuple[str, list[str]]]:
    handler = type("Handler", (_Registry,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", handler.requests
    server.shutdown()
    server.server_close()


async def test_the_registry_says_which_tags_exist(registry):
    host, requests = registry
    assert await image_presence(f"{host}/dask/dask:2024.8.0-py3.11") is Presence.PRESENT
    assert await image_presence(f"{host}/dask/dask:2024.10.0-py3.11") is Presence.MISSING
    # The anonymous token was asked for with the repository's pull scope.
    assert any("scope=repository%3Adask%2Fdask%3Apull" in r for r in requests)


async def test_an_unreachable_registry_is_not_an_answer():
    assert await image_presence("127.0.0.1:9/dask/dask:x", timeout=2) is Presence.UNKNOWN
    # Not a loopback registry: the test's network guard refuses to resolve it.
    assert await image_presence("ghcr.io/dask/dask:x", timeout=2) is Presence.UNKNOWN


def test_references_are_read_as_docker_reads_them():
    assert parse_reference("python:3.11").repository == "library/python"
    assert parse_reference("ghcr.io/dask/dask:1-py3.11").registry == "ghcr.io"
    assert parse_reference("localhost:5000/x/y@sha256:ab").reference == "sha256:ab"
    with pytest.raises(ValueError, match="docker_image: 'Not/Valid' is not a valid image"):
        parse_reference("Not/Valid")


def test_a_missing_tag_is_refused_before_any_vm_exists(registry, vm_dir):
    host, _ = registry
    with pytest.raises(ClusterStartError, match="does not exist in its registry"):
        LocalVMCluster(
            n_workers=1, runtime="docker", docker_image=f"{host}/dask/dask:nope", directory=vm_dir
        )
    assert list(vm_dir.iterdir()) == [] and any_vm_processes(vm_dir) == []


def test_a_missing_default_image_names_the_fixes(registry, vm_dir, monkeypatch):
    host, _ = registry
    monkeypatch.setattr(plan, "default_docker_image", lambda: f"{host}/dask/dask:2026.1.0-py3.13")
    with pytest.raises(ClusterStartError) as info:
        LocalVMCluster(n_workers=1, runtime="docker", directory=vm_dir)
    message = str(info.value)
    assert "does not exist" in message
    assert "runtime='native'" in message and "docker_image=" in message
    assert list(vm_dir.iterdir()) == []


def test_a_malformed_image_is_refused_at_once(vm_dir):
    with pytest.raises(ValueError, match="docker_image: 'UPPER/case:1' is not a valid image"):
        LocalVMCluster(runtime="docker", docker_image="UPPER/case:1", directory=vm_dir)
