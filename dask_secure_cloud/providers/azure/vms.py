"""An Azure VM's model, as the driver asks ARM for it."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from azure.mgmt.compute import models as cm

from ...options import AzureOptions


def vm_model(
    options: AzureOptions,
    *,
    location: str | None,
    name: str,
    tags: Mapping[str, str],
    size: str,
    user_data: bytes,
    login: str,
    nic_id: str,
    spot: bool,
    identity: Mapping[str, Any],
) -> cm.VirtualMachine:
    """The VM ``name`` of ``size`` from ``options``' image, booting ``user_data``, on the
    interface ``nic_id``; a Spot VM (deleted when evicted) with ``spot``."""
    return cm.VirtualMachine(
        location=location,
        tags=tags,
        hardware_profile=cm.HardwareProfile(vm_size=size),
        storage_profile=cm.StorageProfile(
            # A managed image (a built one) by its id; a Marketplace one by its URN.
            image_reference=cm.ImageReference(id=options.image)
            if options.image.startswith("/subscriptions/")
            else cm.ImageReference(
                **dict(
                    zip(
                        ("publisher", "offer", "sku", "version"),
                        options.image.split(":"),
                        strict=True,
                    )
                )
            ),
            os_disk=cm.OSDisk(
                name=f"{name}-osdisk",
                create_option="FromImage",
                delete_option="Delete",
                disk_size_gb=options.disk_size,
                managed_disk=cm.ManagedDiskParameters(storage_account_type=options.disk_type),
            ),
        ),
        os_profile=cm.OSProfile(
            computer_name=name,
            admin_username="dask",
            custom_data=base64.b64encode(user_data).decode(),
            linux_configuration=cm.LinuxConfiguration(
                disable_password_authentication=True,
                ssh=cm.SshConfiguration(
                    public_keys=[
                        cm.SshPublicKey(
                            path="/home/dask/.ssh/authorized_keys",
                            key_data=login,
                        )
                    ]
                ),
            ),
        ),
        network_profile=cm.NetworkProfile(
            network_interfaces=[
                cm.NetworkInterfaceReference(id=nic_id, primary=True, delete_option="Delete")
            ]
        ),
        # Managed boot diagnostics: the serial console log, for reporting a failed boot.
        diagnostics_profile=cm.DiagnosticsProfile(
            boot_diagnostics=cm.BootDiagnostics(enabled=True)
        ),
        **(
            {
                "priority": "Spot",
                "eviction_policy": "Delete",
                "billing_profile": cm.BillingProfile(max_price=options.spot_max_price),
            }
            if spot
            else {}
        ),
        **identity,
    )
