"""``AzureVMCluster``: what a user instantiates."""

from __future__ import annotations

import logging

from ...cluster import VMCluster
from ...options import AzureOptions
from .driver import AzureDriver

logger = logging.getLogger(__name__)


class AzureVMCluster(VMCluster):
    """A secure Dask cluster on Azure virtual machines.

    Every resource is made in an existing resource group (``resource_group`` is
    required). By default the client runs outside Azure: the scheduler gets a Standard
    public address whose network security group admits only this machine's address (or
    ``allowed_cidrs``) on the scheduler's port, and the workers stay private. With
    ``use_private_ip=True`` the client runs inside ``vnet`` (required then) and connects
    to the scheduler's private address. ``credential=`` takes an
    ``azure.core.credentials_async.AsyncTokenCredential``; by default
    ``azure.identity.aio.DefaultAzureCredential`` (environment, workload identity, managed
    identity, Azure CLI sign-in). It never reaches a VM.
    """

    provider = "azure"
    Options = AzureOptions
    driver_class = AzureDriver
    extra_keywords = ("credential",)
