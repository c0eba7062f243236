"""A read-only container registry that answers for ``ghcr.io`` to test guests.

Enough of the Docker Registry HTTP API v2 for ``docker pull``: the version check, a
manifest by tag or by digest (``GET`` and ``HEAD``, with ``Docker-Content-Digest``),
blobs by digest, and a repository's tag list. The error bodies are the API's
(``MANIFEST_UNKNOWN``, ``BLOB_UNKNOWN``), so a test can pull a tag that does not exist
and see what Docker does with a real registry's 404. Pulls are anonymous: ``/v2/``
answers 200, not 401.
"""

from __future__ import annotations

import re
from pathlib import Path

from clouds.guest.container_image import MANIFEST_TYPE, blob_path, manifest_descriptor
from clouds.guest.reply import Reply, bytes_reply, file_reply, json_reply

__all__ = ["Registry"]

_API = {"Docker-Distribution-API-Version": "registry/2.0"}
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"(?P<name>{_COMPONENT}(?:/{_COMPONENT})*)"
_ROUTE = re.compile(rf"/v2/{_NAME}/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)")
_TAGS = re.compile(rf"/v2/{_NAME}/tags/list")


def _error(code: str, message: str) -> Reply:
    return json_reply(404, {"errors": [{"code": code, "message": message}]}, _API)


class Registry:
    """Images by ``"<repository>:<tag>"`` (``"dask/dask:2024.1.0-py3.11"``), read-only."""

    def __init__(self, images: dict[str, Path]) -> None:
        self.tags: dict[tuple[str, str], Path] = {}
        for reference, image in images.items():
            name, _, tag = reference.rpartition(":")
            self.tags[name, tag] = image

    def route(self, path: str) -> Reply:
        """The answer to ``GET path``; the server leaves out the body for ``HEAD``."""
        if path in ("/v2", "/v2/"):
            return json_reply(200, {}, _API)
        match = _TAGS.fullmatch(path)
        if match:
            tags = sorted(tag for name, tag in self.tags if name == match.group("name"))
            if not tags:
                return _error("NAME_UNKNOWN", "repository name not known to registry")
            return json_reply(200, {"name": match.group("name"), "tags": tags}, _API)
        match = _ROUTE.fullmatch(path)
        if not match:
            return _error("NOT_FOUND", "not found")
        name, kind, ref = match.group("name", "kind", "ref")
        images = [image for (n, _), image in self.tags.items() if n == name]
        if kind == "manifests":
            return self._manifest(name, ref, images)
        for image in images:
            blob = blob_path(image, ref)
            if blob is not None:
                return file_reply(blob, "application/octet-stream", {**_API, **_digest(ref)})
        return _error("BLOB_UNKNOWN", "blob unknown to registry")

    def _manifest(self, name: str, ref: str, images: list[Path]) -> Reply:
        if ref.startswith("sha256:"):
            candidates = [i for i in images if manifest_descriptor(i)["digest"] == ref]
        else:
            candidates = [self.tags[name, ref]] if (name, ref) in self.tags else []
        if not candidates:
            return _error("MANIFEST_UNKNOWN", "manifest unknown")
        digest = str(manifest_descriptor(candidates[0])["digest"])
        blob = blob_path(candidates[0], digest)
        if blob is None:
            return _error("MANIFEST_UNKNOWN", "manifest unknown")
        return bytes_reply(blob.read_bytes(), MANIFEST_TYPE, {**_API, **_digest(digest)})


def _digest(digest: str) -> dict[str, str]:
    return {"Docker-Content-Digest": digest, "ETag": f'"{digest}"'}
