"""How a cluster's droplets, firewalls and VPC are tagged and named: the only way
DigitalOcean lets us find them again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ... import driver

#: The tags of a cluster carry its id verbatim after a ``:``, which no cluster id and no
#: other tag of ours (``dask-secure-cloud-scheduler``, ``dask-secure-cloud-worker``: a
#: droplet's role) has: whatever a cluster is called, its tags are its own.
_CLUSTER_PREFIX = "dask-secure-cloud:"
_SCHEDULER_PREFIX = "dask-secure-cloud-scheduler:"


def cluster_tag(cluster_id: str) -> str:
    """The tag every droplet of the cluster carries, and its firewalls apply to."""
    return f"{_CLUSTER_PREFIX}{cluster_id}"


def scheduler_tag(cluster_id: str) -> str:
    """The tag only this cluster's scheduler carries: its firewall opens the scheduler's
    ports to the creator, so those ports are closed on every worker."""
    return f"{_SCHEDULER_PREFIX}{cluster_id}"


def made_name(tag: str) -> str:
    """The name of a firewall or VPC made for ``tag``: names allow ``.``, not ``:``."""
    return tag.replace(":", ".")


def _cluster_of(tags: Sequence[str]) -> str | None:
    """The cluster id a droplet's or firewall's tags carry, if any."""
    for tag in tags:
        for prefix in (_CLUSTER_PREFIX, _SCHEDULER_PREFIX):
            if tag.startswith(prefix):
                return tag.removeprefix(prefix)
    return None


def _droplet_name(cluster_id: str, name: str) -> str:
    """A droplet's name (its hostname): letters, digits, ``-`` and ``.`` only."""
    return f"dask-secure-cloud-{cluster_id}-{name}"


def _creator_tag(creator: str | None) -> list[str]:
    """DigitalOcean tags allow letters, digits, '-', '_' and ':' only."""
    if not creator:
        return []
    return [f"{driver.CREATOR_TAG}:{re.sub(r'[^a-zA-Z0-9_-]', '_', creator)}"[:255]]
