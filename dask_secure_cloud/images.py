"""Does a container image exist? Asked of its registry before any VM is launched.

``ghcr.io/dask/dask:<dask>-py<python>`` does not exist for every release (dask-docker
skipped some) nor for every Python (new Pythons start later). A VM told to pull a tag
that is missing fails only after it has booted and installed Docker, so the cluster
asks the registry first, the way ``docker pull`` would: the Registry HTTP API v2, with
an anonymous pull token where the registry asks for one.

The answer is one of three: the image exists, it does not (the start is refused, naming
the options that fix it), or the registry could not tell us (no route from here, a
private registry that wants credentials): then the VMs try, and a failed pull is
reported from the VM's console with the step that failed.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import logging
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import dask
import distributed
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from .errors import ClusterStartError, OptionError

__all__ = ["ImageReference", "Presence", "image_presence", "parse_reference", "refuse_missing"]

logger = logging.getLogger(__name__)

_MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
_DOCKER_HUB = "registry-1.docker.io"


class Presence(enum.Enum):
    PRESENT = "present"
    MISSING = "missing"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ImageReference:
    registry: str
    repository: str
    reference: str  # a tag or a digest

    @property
    def insecure_allowed(self) -> bool:
        """Docker itself talks plain HTTP to registries on loopback; so do we, then."""
        host = urllib.parse.urlsplit(f"//{self.registry}").hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_reference(image: str) -> ImageReference:
    """Split ``image`` the way Docker does: the first part is a registry only when it
    has a dot or a port or is ``localhost``; otherwise the image is on Docker Hub."""
    name, _, digest = image.partition("@")
    tag = ""
    if not digest:
        last = name.rsplit("/", 1)[-1]
        if ":" in last:
            name, tag = name.rsplit(":", 1)
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = _DOCKER_HUB, name
        if "/" not in repository:
            repository = f"library/{repository}"
    if not re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", repository):
        raise OptionError(f"docker_image: {image!r} is not a valid image reference")
    return ImageReference(registry, repository, digest or tag or "latest")


async def image_presence(image: str, timeout: float = 10.0) -> Presence:
    """Ask ``image``'s registry whether it has that tag; never raises for network trouble."""
    ref = parse_reference(image)
    schemes = ["https", "http"] if ref.insecure_allowed else ["https"]
    client = AsyncHTTPClient()
    for scheme in schemes:
        base = f"{scheme}://{ref.registry}"
        url = f"{base}/v2/{ref.repository}/manifests/{ref.reference}"
        try:
            response = await _fetch(client, url, {"Accept": _MANIFEST_TYPES}, timeout)
            if response.code == 401:
                token = await _anonymous_token(client, response, ref, timeout)
                if token is None:
                    return Presence.UNKNOWN  # a private registry: credentials needed
                headers = {"Accept": _MANIFEST_TYPES, "Authorization": f"Bearer {token}"}
                response = await _fetch(client, url, headers, timeout)
        except OSError as e:
            logger.debug("image check: %s: %s", url, e)
            continue
        if response.code == 200:
            return Presence.PRESENT
        if response.code == 404:
            return Presence.MISSING
        return Presence.UNKNOWN
    return Presence.UNKNOWN


async def _fetch(
    client: AsyncHTTPClient, url: str, headers: dict[str, str], timeout: float
) -> HTTPResponse:
    request = HTTPRequest(
        url,
        method="HEAD",
        headers=headers,
        connect_timeout=timeout,
        request_timeout=timeout,
        follow_redirects=True,
    )
    try:
        return await client.fetch(request, raise_error=False)
    except HTTPClientError as e:  # a timeout (599) is reported this way
        raise OSError(str(e)) from e


async def _anonymous_token(
    client: AsyncHTTPClient, response: HTTPResponse, ref: ImageReference, timeout: float
) -> str | None:
    """The anonymous pull token a ``WWW-Authenticate: Bearer`` challenge offers."""
    challenge = response.headers.get("WWW-Authenticate", "")
    if not challenge.lower().startswith("bearer "):
        return None
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = params.pop("realm", None)
    if not realm:
        return None
    params.setdefault("scope", f"repository:{ref.repository}:pull")
    url = f"{realm}?{urllib.parse.urlencode(params)}"
    request = HTTPRequest(url, connect_timeout=timeout, request_timeout=timeout)
    try:
        answer = await client.fetch(request, raise_error=False)
    except HTTPClientError as e:
        raise OSError(str(e)) from e
    if answer.code != 200:
        return None
    try:
        body = json.loads(answer.body)
    except ValueError:
        return None
    token = body.get("token") or body.get("access_token")
    return token if isinstance(token, str) else None


async def refuse_missing(image: str, is_default: bool, log: Callable[[str], None]) -> None:
    """Refuse a start whose VMs would fail to pull ``image``, before any VM exists; when
    the registry cannot tell, say so (``log``) and let the VMs try."""
    presence = await image_presence(image)
    if presence is Presence.PRESENT:
        return
    if presence is Presence.UNKNOWN:
        log(f"Could not ask the registry whether {image} exists; the VMs will try")
        return
    if is_default:
        raise ClusterStartError(
            f"{image} does not exist: dask-docker does not publish an image for every "
            "dask release and Python version. Set runtime='native' to install dask "
            f"{dask.__version__} and distributed {distributed.__version__} on each VM "
            "at boot, or docker_image= to an image with this client's versions."
        )
    raise ClusterStartError(
        f"docker_image {image!r} does not exist in its registry: check its name and tag"
    )
