"""``GCPCluster``'s options."""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import OptionError
from .base import (
    _matching,
    _strings_to_strings,
    _text,
    _texts,
    _whole,
    duration,
    option,
)
from .shared import VPCOptions

_GCP_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_GCP_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
_GCP_NETWORK_TAG = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def _gcp_labels(value: Any, name: str) -> dict[str, str]:
    labels = _strings_to_strings(value, name)
    for key, text in labels.items():
        if not _GCP_LABEL_KEY.fullmatch(key) or not _GCP_LABEL_VALUE.fullmatch(text):
            raise OptionError(
                f"{name}: {key!r}: {text!r} is not a valid label (lowercase letters, digits, "
                "'-' and '_', at most 63 characters; keys start with a letter)"
            )
    return labels


def _time_limit(value: Any, name: str) -> datetime.timedelta:
    """A VM time limit within Compute Engine's bounds, so a wrong one fails here and not
    at the first VM."""
    limit = duration(value, name)
    if not datetime.timedelta(seconds=30) <= limit <= datetime.timedelta(days=120):
        raise OptionError(
            f"{name} must be from 30s to 120d, Compute Engine's bounds on a VM's run "
            f"time limit, got {value!r}"
        )
    return limit


def _network_tags(value: Any, name: str) -> tuple[str, ...]:
    tags = _texts("network tags")(value, name)
    for tag in tags:
        if not _GCP_NETWORK_TAG.fullmatch(tag):
            raise OptionError(
                f"{name}: {tag!r} is not a network tag (lowercase letters, digits and '-', "
                "at most 63 characters, starting with a letter)"
            )
    return tags


@dataclasses.dataclass(frozen=True)
class GCPOptions(VPCOptions):
    provider: ClassVar[str] = "gcp"
    changed_defaults: ClassVar[Mapping[str, Any]] = {
        "metadata_endpoint": "http://metadata.google.internal"
    }

    project: str | None = option(
        None,
        "Project id. Default: the project of the application default credentials.",
        types=("string", "null"),
        check=_text,
        note="null: the project of the application default credentials",
    )
    zone: str = option(
        "us-central1-a",
        "Zone, for example ``'europe-west4-a'``.",
        types="string",
        check=_matching(r"[a-z]+-[a-z]+\d+-[a-z]", "us-central1-a"),
    )
    network: str = option("default", "The VPC network.", types="string", check=_text)
    subnetwork: str | None = option(
        None,
        "A subnetwork of ``network`` in the zone's region. Default: the network's one there.",
        types=("string", "null"),
        check=_text,
    )
    scheduler_machine_type: str = option(
        "e2-standard-2", "Machine type of the scheduler.", types="string", check=_text
    )
    worker_machine_type: str = option(
        "e2-standard-4", "Machine type of the workers.", types="string", check=_text
    )
    source_image: str = option(
        "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64",
        """
        ``projects/P/global/images/NAME`` or ``projects/P/global/images/family/F``.
        Default: the Ubuntu 24.04 LTS family.
        """,
        types="string",
        check=_text,
    )
    disk_size: int = option(
        50,
        "Boot disk size in GB, deleted with the VM.",
        types="integer",
        check=_whole(10, " of GB"),
        note="GB, deleted with the VM",
    )
    disk_type: str = option("pd-balanced", "Boot disk type.", types="string", check=_text)
    gpu_type: str | None = option(
        None,
        "Accelerator type for workers, for example ``'nvidia-tesla-t4'``.",
        types=("string", "null"),
        check=_text,
        note="for workers, e.g. nvidia-tesla-t4",
    )
    gpu_count: int = option(0, "Accelerators per worker.", types="integer", check=_whole(0))
    min_cpu_platform: str | None = option(
        None,
        "The oldest CPU platform the VMs may run on, for example ``'Intel Ice Lake'``.",
        types=("string", "null"),
        check=_text,
        note="null: any the machine type offers",
    )
    labels: dict[str, str] = option(
        {}, "Extra labels for every resource.", types="object", check=_gcp_labels
    )
    network_tags: tuple[str, ...] = option(
        [], "Extra network tags for every VM.", types="array", check=_network_tags
    )
    service_account: str | None = option(
        None,
        "The service account the VMs run as. Default: none, so a VM holds no Google token.",
        types=("string", "null"),
        check=_text,
        note="null: the VMs hold no Google credentials at all",
    )
    scopes: tuple[str, ...] = option(
        ["https://www.googleapis.com/auth/cloud-platform"],
        "OAuth scopes of ``service_account``.",
        types="array",
        check=_texts("scope URLs"),
    )
    max_run_duration: datetime.timedelta | None = option(
        None,
        """
        Compute Engine deletes each VM once it has run this long (30s to 120d). Default:
        each VM is deleted at the end of ``max_lifetime`` (its ``terminationTime``),
        whatever happens to the client. Either deadline applies only while the VM runs:
        a VM whose OS powered off stays, its disk billing, until it is deleted.
        """,
        types=("string", "number", "null"),
        check=_time_limit,
        note="e.g. 8h: Compute Engine deletes each VM after running that long",
    )
    api_endpoint: str | None = option(
        None,
        "Another Compute Engine endpoint; every client the cluster builds uses it.",
        types=("string", "null"),
        check=_text,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gpu_count and not self.gpu_type:
            raise OptionError("gpu_count needs gpu_type, for example gpu_type='nvidia-tesla-t4'")
