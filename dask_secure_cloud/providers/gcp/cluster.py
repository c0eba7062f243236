"""``GCPCluster``: what a user instantiates."""

from __future__ import annotations

import logging

from ...cluster import VMCluster
from ...options import GCPOptions
from .driver import GCPDriver

logger = logging.getLogger(__name__)


class GCPCluster(VMCluster):
    """A secure Dask cluster on Google Compute Engine.

    By default on the project's ``default`` network, on the Ubuntu 24.04 LTS image
    family, with VMs that hold no Google credentials. ``credentials=`` takes a
    ``google.auth`` credentials object instead of the application default credentials.
    """

    provider = "gcp"
    Options = GCPOptions
    driver_class = GCPDriver
    extra_keywords = ("credentials",)
