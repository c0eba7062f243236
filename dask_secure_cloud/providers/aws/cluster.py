"""``EC2Cluster``: what a user instantiates."""

from __future__ import annotations

import difflib
from typing import Any

from ...cluster import VMCluster
from ...errors import OptionError
from ...options import EC2Options
from .driver import EC2Driver, known_regions


class EC2Cluster(VMCluster):
    """A secure Dask cluster on Amazon EC2.

    By default in the region's default VPC, on the newest official Ubuntu 24.04 LTS AMI,
    with two security groups per cluster: members to members, and the creator's address
    to the scheduler's port only.
    """

    provider = "aws"
    Options = EC2Options
    driver_class = EC2Driver

    @classmethod
    def make_driver(cls, options: EC2Options, **extra: Any) -> EC2Driver:
        regions = known_regions()
        if options.region not in regions:
            close = difflib.get_close_matches(options.region, sorted(regions), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"region {options.region!r} is not an EC2 region.{hint}")
        return super().make_driver(options, **extra)
