"""README: "Every cluster class also works as the JupyterLab Dask extension's
``labextension.factory``", with TLS on. ``test_jupyterlab.py`` drives LocalVMCluster and
AzureVMCluster through the extension's cluster manager; here the other three clouds,
each against its own API stand-in, the same way (start, dashboard panes, compute, scale,
adapt, close), and nothing of the cluster is left afterwards."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import vm_processes
from test_jupyterlab import _drive

from dask_secure_cloud.providers.digitalocean import cluster_tag, scheduler_tag

from standins import start_digitalocean, start_ec2, start_gce, stop_ec2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _factory(cls: str, options: dict[str, Any]) -> dict[str, Any]:
    """The extension's factory config, keys as they are written in YAML config files."""
    return {
        "module": "dask_secure_cloud",
        "class": cls,
        "args": [],
        "kwargs": {k.replace("_", "-"): v for k, v in options.items()},
    }


async def test_lab_manager_drives_an_ec2_cluster(tmp_path, monkeypatch):
    stand_in, client, options = start_ec2(tmp_path, monkeypatch)
    try:
        cluster_id = await _drive(_factory("EC2Cluster", options))
        tag = [{"Name": "tag:dask-secure-cloud-cluster", "Values": [cluster_id]}]
        live = [
            i["InstanceId"]
            for r in client.describe_instances(Filters=tag)["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        ]
        groups = client.describe_security_groups(Filters=tag)["SecurityGroups"]
        assert not live and not groups and not vm_processes(cluster_id)
    finally:
        stop_ec2(stand_in)


async def test_lab_manager_drives_a_gcp_cluster(tmp_path):
    stand_in, options = start_gce(tmp_path)
    try:
        cluster_id = await _drive(_factory("GCPCluster", options))
        labelled = [
            r
            for r in stand_in.instances.values()
            if r["labels"].get("dask-secure-cloud-cluster") == cluster_id
        ]
        rules = [name for name in stand_in.firewalls if cluster_id in name]
        assert not labelled and not rules and not vm_processes(cluster_id)
    finally:
        stand_in.stop()


async def test_lab_manager_drives_a_droplet_cluster(tmp_path, monkeypatch):
    stand_in, options = start_digitalocean(tmp_path, monkeypatch)
    try:
        cluster_id = await _drive(_factory("DropletCluster", options))
        tags = {cluster_tag(cluster_id), scheduler_tag(cluster_id)}
        assert not [d for d in stand_in.droplets.values() if tags & set(d["tags"])]
        assert not [f for f in stand_in.firewalls.values() if tags & set(f.get("tags") or [])]
        assert not tags & stand_in.tags and not vm_processes(cluster_id)
    finally:
        stand_in.stop()
