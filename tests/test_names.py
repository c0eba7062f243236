"""The cluster-id rule, and what each driver builds from an id that passes it."""

from __future__ import annotations

import itertools
import re
import uuid

import pytest

from dask_secure_cloud.driver import CREATOR_TAG
from dask_secure_cloud.errors import OptionError
from dask_secure_cloud.names import MAX_LENGTH, check_cluster_id
from dask_secure_cloud.providers.digitalocean import tags as digitalocean
from dask_secure_cloud.providers.gcp import network as gcp

#: Compute Engine resource names and network tags (RFC 1035), and label values.
GCE_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
GCE_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
#: DigitalOcean tags; firewall and VPC names.
DO_TAG = re.compile(r"[a-zA-Z0-9_:-]{1,255}")
DO_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9.-]{0,254}")
#: An Azure Linux computer name and resource names (VM 64, NIC and disk 80).
AZURE_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}[a-zA-Z0-9_]")

LONGEST = "n" + "-1" * ((MAX_LENGTH - 1) // 2) + "x" * ((MAX_LENGTH - 1) % 2)
#: The largest worker number whose name every cloud still takes with the longest id.
LAST_WORKER = "worker-9999999"
TRICKY = [
    "x",
    "x-scheduler",
    "x-deny",
    "x-worker",
    "scheduler",
    "worker",
    "creator",
    "nightly",
    "nightly-etl",
    "nightly-etl-scheduler",
    "dsc-0a1b2c3d4e",
]


def test_generated_ids_pass():
    assert len(LONGEST) == MAX_LENGTH
    for _ in range(500):
        generated = f"dsc-{uuid.uuid4().hex[:10]}"
        assert check_cluster_id(generated) == generated
    assert check_cluster_id("dsc-0123456789") == "dsc-0123456789"  # hex with no letter


@pytest.mark.parametrize("cluster_id", ["a", "nightly-etl", "team-7-run-2", "n0", LONGEST])
def test_names_every_cloud_takes_pass(cluster_id):
    assert check_cluster_id(cluster_id) == cluster_id


@pytest.mark.parametrize(
    "cluster_id",
    [
        "",
        "Nightly",  # Compute Engine labels and names are lowercase
        "7th-run",  # names start with a letter
        "-x",
        "x-",  # nor end with a hyphen
        "x--scheduler",  # "--" ends the id inside the names the drivers build
        "nightly_etl",  # not in Compute Engine names, nor droplet names
        "nightly.etl",
        "team:ml",
        "nightly etl",
        "x" * (MAX_LENGTH + 1),
    ],
)
def test_names_some_cloud_refuses_are_refused_with_the_rule_and_an_example(cluster_id):
    with pytest.raises(OptionError) as info:
        check_cluster_id(cluster_id)
    message = str(info.value)
    assert f"name={cluster_id!r}" in message
    assert "lowercase letters, digits and single hyphens" in message
    assert f"1 to {MAX_LENGTH} characters" in message
    assert "name='nightly-etl'" in message


def test_what_the_drivers_build_from_the_longest_id_is_valid_on_their_clouds():
    tag = gcp._network_tag(LONGEST)
    for name in (
        f"{tag}-{LAST_WORKER}",  # an instance
        f"{tag}-scheduler",
        gcp._scheduler_tag(LONGEST),
        *(f"{tag}-{rule}" for rule in gcp._RULES),  # firewall rules
    ):
        assert GCE_NAME.fullmatch(name), name
    assert GCE_LABEL_VALUE.fullmatch(LONGEST)
    for tag in (digitalocean.cluster_tag(LONGEST), digitalocean.scheduler_tag(LONGEST)):
        assert DO_TAG.fullmatch(tag), tag
        assert DO_NAME.fullmatch(digitalocean.made_name(tag)), tag
    assert DO_NAME.fullmatch(digitalocean._droplet_name(LONGEST, LAST_WORKER))
    for suffix in ("", "-nic", "-ip", "-osdisk"):
        assert AZURE_NAME.fullmatch(f"{LONGEST}-{LAST_WORKER}{suffix}")


def test_no_two_clusters_share_a_tag_whatever_they_are_called():
    """The scheduler-only tag of ``x`` used to be the tag of every VM of a cluster called
    ``x-scheduler`` (on DigitalOcean and Compute Engine), and a cluster called
    ``worker`` had the tag DigitalOcean's workers all carry."""
    role_tags = {f"dask-secure-cloud-{role}" for role in ("scheduler", "worker")}
    for cloud, made in (
        ("gcp", lambda c: {gcp._network_tag(c), gcp._scheduler_tag(c)}),
        ("do", lambda c: {digitalocean.cluster_tag(c), digitalocean.scheduler_tag(c)}),
    ):
        for one, other in itertools.combinations(TRICKY, 2):
            assert not made(one) & made(other), (cloud, one, other)
        for one in TRICKY:
            assert not (cloud == "do" and made(one) & role_tags), one


def test_each_cluster_id_is_read_back_from_what_carries_it():
    for cluster_id in TRICKY:
        for rule in gcp._RULES:
            name = f"{gcp._network_tag(cluster_id)}-{rule}"
            match = gcp._RULE_NAME.match(name)
            assert match and match["id"] == cluster_id, name
        for tag in (digitalocean.cluster_tag(cluster_id), digitalocean.scheduler_tag(cluster_id)):
            creator = f"{CREATOR_TAG}:someone_host"
            tags = [creator, "dask-secure-cloud-worker", tag, "team:ml"]
            assert digitalocean._cluster_of(tags) == cluster_id
