"""Each cloud's API stand-in, started as its own test module starts it, for tests that
drive a cluster of that cloud from somewhere else (the JupyterLab extension, the error
checks of every cloud).

Imported by the test modules that use it, not from ``conftest``: a test names the stand-in
it runs against. Each ``start_*`` returns the stand-in and the keyword options that make a
cluster use it, with the client inside the cloud network (``use_private_ip``), as the
cloud's own end-to-end tests do; the caller stops the stand-in.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import boto3
import pytest
from google.auth.credentials import AnonymousCredentials

from clouds import reach
from clouds.arm import AzureStandIn
from clouds.booter import Booter, VMBooter
from clouds.digitalocean import DigitalOceanStandIn
from clouds.ec2 import EC2StandIn, make_network
from clouds.gce import GCEStandIn

EC2_REGION = "us-east-1"
GCP_PROJECT, GCP_ZONE = "dsc-test-project", "us-central1-a"
DO_TOKEN = "dop_v1_test_token_never_on_a_droplet"


def start_ec2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way_out: str = "internet"
) -> tuple[EC2StandIn, Any, dict[str, Any]]:
    """moto's EC2 server with a VPC in 127/8 whose subnet gets out by ``way_out`` (an
    internet gateway by default, like a new account's default VPC); returns the stand-in,
    a boto3 client of it, and an ``EC2Cluster``'s options."""
    stand_in = EC2StandIn(VMBooter(tmp_path / "ec2-vms"), EC2_REGION)
    stand_in.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", stand_in.url)
    client = boto3.client("ec2", region_name=EC2_REGION, endpoint_url=stand_in.url)
    network = make_network(client, f"127.{random.randint(1, 254)}.1.0/24", way_out)
    options = {
        "region": EC2_REGION,
        "ami": client.describe_images()["Images"][0]["ImageId"],
        "vpc": network.vpc_id,
        "subnet_id": network.subnet_id,
        "use_private_ip": True,
        "scheduler_instance_type": "t3.medium",
        "worker_instance_type": "t3.large",
        "boot_timeout": "60s",
    }
    return stand_in, client, options


def stop_ec2(stand_in: EC2StandIn) -> None:
    stand_in.booter.stop_all()
    stand_in.stop()


def start_gce(tmp_path: Path) -> tuple[GCEStandIn, dict[str, Any]]:
    """The GCE stand-in (a fresh project's default network) and a ``GCPCluster``'s
    options."""
    stand_in = GCEStandIn(
        VMBooter(tmp_path / "gce-vms"),
        GCP_PROJECT,
        GCP_ZONE,
        f"127.{random.randint(1, 254)}.1.0/24",
    )
    url = stand_in.start()
    options = {
        "project": GCP_PROJECT,
        "zone": GCP_ZONE,
        "api_endpoint": url,
        "credentials": AnonymousCredentials(),
        "use_private_ip": True,
        "scheduler_machine_type": "e2-small",
        "worker_machine_type": "e2-standard-2",
        "boot_timeout": "60s",
    }
    return stand_in, options


def start_digitalocean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[DigitalOceanStandIn, dict[str, Any]]:
    """The HTTPS DigitalOcean stand-in and a ``DropletCluster``'s options (the token in
    ``DIGITALOCEAN_TOKEN``, as a user sets it)."""
    stand_in = DigitalOceanStandIn(VMBooter(tmp_path / "do-vms"), DO_TOKEN, droplet_limit=10)
    url = stand_in.start()
    bundle = tmp_path / "do-ca.pem"
    stand_in.ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("DIGITALOCEAN_TOKEN", DO_TOKEN)
    options = {
        "api_url": url,
        "ca_bundle": str(bundle),
        "region": "nyc3",
        "scheduler_size": "s-1vcpu-1gb",
        "worker_size": "s-2vcpu-4gb",
        "use_private_ip": True,
        "boot_timeout": "60s",
    }
    return stand_in, options


# -- Azure Resource Manager ----------------------------------------------------------

SUBSCRIPTION = "5f1b3c2e-8d6a-4b7e-9c0f-1a2b3c4d5e6f"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "0d6c1a52-3f4e-4b8a-9e7d-6c5b4a3f2e1d"
SECRET = "client-secret-never-on-a-vm"


def start_azure(
    booter: Booter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, address_prefix: str
) -> tuple[AzureStandIn, dict[str, Any]]:
    """The ARM stand-in booting its VMs with ``booter``, its resource group, and the
    options an AzureVMCluster needs to use it (the vnet made in ``address_prefix``)."""
    stand_in = AzureStandIn(
        booter,
        subscription=SUBSCRIPTION,
        tenant=TENANT,
        client_id=CLIENT_ID,
        client_secret=SECRET,
    )
    url = stand_in.start()
    stand_in.add_group("dask-rg", "westeurope")
    bundle = tmp_path / "ca.pem"
    stand_in.ca.cert_pem.write_to_path(str(bundle))
    # DefaultAzureCredential's environment source signs in at the stand-in.
    monkeypatch.setenv("AZURE_TENANT_ID", TENANT)
    monkeypatch.setenv("AZURE_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("AZURE_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", url)
    options = {
        "resource_group": "dask-rg",
        "resource_manager_url": url,
        "ca_bundle": str(bundle),
        "scheduler_vm_size": "Standard_D2s_v5",
        "worker_vm_size": "Standard_D4s_v5",
        "address_prefix": address_prefix,
        "boot_timeout": "60s",
        # Where the cluster learns the client's address, to open the scheduler to it.
        "public_ip_url": reach.checkip_url(),
    }
    return stand_in, options


def add_team_vnet(stand_in: AzureStandIn, prefix: str) -> str:
    """A vnet the user's team made before (``team-vnet`` in ``dask-rg``, one subnet
    ``compute`` over all of ``prefix``), as a cluster given ``vnet=`` finds it; its id."""
    vnet_id = (
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/dask-rg/providers/"
        "Microsoft.Network/virtualNetworks/team-vnet"
    )
    stand_in.resources[vnet_id.lower()] = {
        "id": vnet_id,
        "name": "team-vnet",
        "type": "Microsoft.Network/virtualNetworks",
        "location": "westeurope",
        "tags": {},
        "_kind": "virtualnetworks",
        "properties": {
            "addressSpace": {"addressPrefixes": [prefix]},
            "subnets": [
                {
                    "id": f"{vnet_id}/subnets/compute",
                    "name": "compute",
                    "properties": {"addressPrefix": prefix},
                }
            ],
        },
    }
    return vnet_id
