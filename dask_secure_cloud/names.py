"""The one rule for a cluster id, valid on every cloud at once.

The cluster id is the user's ``name=`` (or a generated ``dsc-`` + 10 hex digits). Every
driver carries it verbatim in a tag or label and builds resource names from it, so it
must be valid wherever it goes:

* a Compute Engine label value, and inside resource names and network tags
  (RFC 1035: lowercase letters, digits and ``-``, at most 63 characters). The longest
  names built from it are ``dask-secure-cloud-<id>-worker-<n>`` (an instance) and
  ``dask-secure-cloud-<id>--scheduler`` (a network tag): with an id of at most
  :data:`MAX_LENGTH` characters an instance name stays within 63 characters up to
  ``worker-9999999``;
* a tag value on EC2 (256 characters) and Azure (256), and the start of Azure resource
  names (``<id>-worker-<n>-osdisk``, a Linux computer name ``<id>-worker-<n>``);
* inside a DigitalOcean tag (``[a-zA-Z0-9_:-]``, 255 characters) and in firewall, VPC and
  droplet names (letters, digits, ``-`` and ``.``).

A double hyphen never occurs in an id, so the drivers can use ``--`` (and ``:`` or
``.`` on DigitalOcean) to end the id inside a longer name or tag: the scheduler-only tag
of cluster ``x`` can never be the tag of another cluster, whatever it is called.
"""

from __future__ import annotations

import re

from .errors import OptionError

__all__ = ["CLUSTER_TAG", "CREATOR_TAG", "MAX_LENGTH", "check_cluster_id"]

#: The tag (or label) key every resource of a cluster carries, the id its value.
CLUSTER_TAG = "dask-secure-cloud-cluster"
#: Who started the cluster (``user@host``), where the cloud's tags can carry it.
CREATOR_TAG = "dask-secure-cloud-creator"

#: Longest cluster id: ``dask-secure-cloud-`` (18) + id (30) + ``-worker-9999999`` (15)
#: is 63, Compute Engine's limit for a name.
MAX_LENGTH = 30
#: A lowercase letter, then letters, digits and single hyphens, not ending with one.
_ID = re.compile(r"[a-z](?:-?[a-z0-9])*")
_RULE = (
    f"1 to {MAX_LENGTH} characters: lowercase letters, digits and single hyphens, starting "
    "with a letter and not ending with a hyphen"
)


def check_cluster_id(cluster_id: str) -> str:
    """Return ``cluster_id`` if every cloud accepts it as a cluster id; else raise
    :class:`~dask_secure_cloud.errors.OptionError` naming ``name=``, the rule and an
    example."""
    if (
        not isinstance(cluster_id, str)
        or len(cluster_id) > MAX_LENGTH
        or not _ID.fullmatch(cluster_id)
    ):
        raise OptionError(
            f"name={cluster_id!r} cannot be a cluster id on every cloud: use {_RULE}, "
            "for example name='nightly-etl'"
        )
    return cluster_id
