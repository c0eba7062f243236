"""``DropletCluster``: what a user instantiates."""

from __future__ import annotations

import os
from typing import Any

from ...cluster import VMCluster
from ...errors import OptionError
from ...network import NetworkPolicy
from ...options import DropletOptions
from .driver import DropletDriver


class DropletCluster(VMCluster):
    """A secure Dask cluster on DigitalOcean droplets.

    Every droplet has a public address; the cluster's firewalls admit nothing from
    outside the cluster but the creator's address to the scheduler's port.
    """

    provider = "digitalocean"
    Options = DropletOptions

    @classmethod
    def make_driver(cls, options: DropletOptions, **extra: Any) -> DropletDriver:
        token = options.token or os.environ.get("DIGITALOCEAN_TOKEN")
        if not token:
            raise OptionError(
                "No DigitalOcean API token: set DIGITALOCEAN_TOKEN, the dask config key "
                "secure-cloud.digitalocean.token, or pass token="
            )
        # Every droplet has a public address.
        network = NetworkPolicy.from_options(options, always_public=True)
        return DropletDriver(options, token=token, network=network)
