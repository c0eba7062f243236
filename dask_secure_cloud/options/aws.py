"""``EC2Cluster``'s options."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ..errors import OptionError
from .base import _matching, _strings_to_strings, _text, _texts, _url, _whole, option
from .shared import VPCOptions


def _ec2_tags(value: Any, name: str) -> dict[str, str]:
    """EC2's own limits on tags, so a bad tag fails before anything is made."""
    tags = _strings_to_strings(value, name)
    for key, text in tags.items():
        if len(key) > 128 or len(text) > 256 or key.lower().startswith("aws:"):
            raise OptionError(
                f"{name}: {key!r}: {text!r} is not an EC2 tag (keys up to 128 characters, "
                "not starting with 'aws:'; values up to 256)"
            )
    if len(tags) > 48:
        raise OptionError(f"{name}: EC2 allows 50 tags per resource, the cluster uses 2")
    return tags


@dataclasses.dataclass(frozen=True)
class EC2Options(VPCOptions):
    provider: ClassVar[str] = "aws"

    region: str = option(
        "us-east-1",
        "AWS region, for example ``'eu-west-1'``.",
        types="string",
        check=_matching(r"[a-z]{2}(-[a-z]+)+-[0-9]+", "eu-west-1", "an AWS region"),
    )
    endpoint_url: str | None = option(
        None,
        "Another EC2 endpoint (LocalStack, a test stand-in). ``AWS_ENDPOINT_URL_EC2`` works too.",
        types=("string", "null"),
        check=_url,
        note="null: botocore's (AWS_ENDPOINT_URL_EC2 works too)",
    )
    scheduler_instance_type: str = option(
        "t3.medium",
        "Instance type of the scheduler.",
        types="string",
        check=_matching(r"[a-z0-9-]+\.[a-z0-9-]+", "m6i.large"),
    )
    worker_instance_type: str = option(
        "m6i.large",
        "Instance type of the workers; a GPU type gives the workers' containers its GPUs.",
        types="string",
        check=_matching(r"[a-z0-9-]+\.[a-z0-9-]+", "m6i.large"),
    )
    ami: str | None = option(
        None,
        "AMI id. Default: the newest official Ubuntu 24.04 LTS image of the region.",
        types=("string", "null"),
        check=_text,
        note="null: newest official Ubuntu 24.04 LTS of the region",
    )
    vpc: str | None = option(
        None,
        "VPC id. Default: the region's default VPC.",
        types=("string", "null"),
        check=_text,
        note="null: the region's default VPC",
    )
    subnet_id: str | None = option(
        None,
        "Subnet id. Default: a subnet of the VPC.",
        types=("string", "null"),
        check=_text,
    )
    security_groups: tuple[str, ...] = option(
        [],
        """
        Existing security groups to use instead of the per-cluster ones (never deleted);
        every VM, workers included, then carries all of them.
        """,
        types="array",
        check=_texts("security group ids"),
        note="existing groups instead of the per-cluster ones",
    )
    iam_instance_profile: str | None = option(
        None,
        "Name or ARN of the instance profile the VMs run as.",
        types=("string", "null"),
        check=_text,
    )
    key_name: str | None = option(
        None,
        "An EC2 key pair for SSH. Default: no login at all.",
        types=("string", "null"),
        check=_text,
        note="null: no SSH login at all",
    )
    filesystem_size: int = option(
        40,
        "Root volume size in GiB (encrypted, deleted with the instance).",
        types="integer",
        check=_whole(8, " of GiB"),
        note="GiB, encrypted, deleted with the instance",
    )
    tags: dict[str, str] = option(
        {}, "Extra tags for every resource.", types="object", check=_ec2_tags
    )
