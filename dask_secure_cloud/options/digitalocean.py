"""``DropletCluster``'s options."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, ClassVar

from ..errors import OptionError
from .base import _boolean, _path, _text, _texts, _url, option
from .shared import CloudOptions

_DO_TAG = re.compile(r"[a-zA-Z0-9_\-:]{1,255}")


def _droplet_tags(value: Any, name: str) -> tuple[str, ...]:
    tags = _texts("tags")(value, name)
    for tag in tags:
        if not _DO_TAG.fullmatch(tag):
            raise OptionError(
                f"{name}: {tag!r} is not a DigitalOcean tag (letters, digits, '-', '_', ':')"
            )
        if tag.startswith("dask-secure-cloud"):
            raise OptionError(
                f"{name}: {tag!r}: tags starting with dask-secure-cloud are the cluster's own"
            )
    return tags


def _ssh_keys(value: Any, name: str) -> tuple[str | int, ...]:
    if isinstance(value, str | bytes | bytearray) or not isinstance(value, Sequence):
        raise OptionError(f"{name} must be a list of SSH key ids or fingerprints, got {value!r}")
    for key in value:
        if isinstance(key, bool) or not (
            (isinstance(key, int) and key > 0) or (isinstance(key, str) and key)
        ):
            raise OptionError(
                f"{name} must be a list of SSH key ids (positive numbers) or fingerprints "
                f"(strings), got {value!r}: {key!r} is neither"
            )
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class DropletOptions(CloudOptions):
    provider: ClassVar[str] = "digitalocean"

    token: str | None = option(
        None,
        """
        API token. Default: ``DIGITALOCEAN_TOKEN``. It never reaches a droplet.
        """,
        types=("string", "null"),
        check=_text,
        note="null: DIGITALOCEAN_TOKEN; never sent to a droplet",
    )
    api_url: str | None = option(
        None,
        "Another API base URL (a proxy, a test stand-in).",
        types=("string", "null"),
        check=_url,
        note="null: https://api.digitalocean.com",
    )
    ca_bundle: str | None = option(
        None,
        "A CA bundle to verify the API's TLS certificate with (a TLS-inspecting proxy).",
        types=("string", "null"),
        check=_path,
    )
    region: str = option(
        "nyc3", "Region slug, for example ``'ams3'``.", types="string", check=_text
    )
    scheduler_size: str = option(
        "s-2vcpu-4gb", "Droplet size slug of the scheduler.", types="string", check=_text
    )
    worker_size: str = option(
        "s-4vcpu-8gb", "Droplet size slug of the workers.", types="string", check=_text
    )
    image: str = option(
        "ubuntu-24-04-x64",
        "Image slug or id. Default: Ubuntu 24.04 LTS.",
        types="string",
        check=_text,
    )
    vpc_uuid: str | None = option(
        None,
        "An existing VPC (never deleted). Default: a VPC made for the cluster.",
        types=("string", "null"),
        check=_text,
        note="null: a VPC made for (and deleted with) the cluster",
    )
    tags: tuple[str, ...] = option(
        [], "Extra tags for every droplet.", types="array", check=_droplet_tags
    )
    ssh_keys: tuple[str | int, ...] = option(
        [],
        "SSH key ids or fingerprints. Default: no key, so no login at all.",
        types="array",
        check=_ssh_keys,
        note="empty: no SSH login at all",
    )
    monitoring: bool = option(
        False, "Install DigitalOcean's monitoring agent.", types="boolean", check=_boolean
    )
