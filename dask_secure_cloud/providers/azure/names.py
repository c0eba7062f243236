"""How the cluster's Azure resources are named: from the cluster id, one name each."""

from __future__ import annotations


def _name(cluster_id: str, part: str) -> str:
    return f"{cluster_id}-{part}"
