"""The cluster's cloud firewalls: members to members, the creator's address to the
scheduler's port, nothing else in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .tags import cluster_tag, made_name, scheduler_tag


def _firewalls(
    cluster_id: str, sources: Sequence[str], ports: Sequence[int]
) -> list[dict[str, Any]]:
    """The cluster's two cloud firewalls. DigitalOcean applies every firewall whose tag a
    droplet carries, so the scheduler's ports open to ``sources`` go on a firewall of the
    scheduler's own tag: on the cluster's tag they would open them on every worker too."""
    tag = cluster_tag(cluster_id)
    everywhere = {"addresses": ["0.0.0.0/0", "::/0"]}
    return [
        {
            "name": made_name(tag),
            "tags": [tag],
            "inbound_rules": [
                {"protocol": "tcp", "ports": "all", "sources": {"tags": [tag]}},
                {"protocol": "udp", "ports": "all", "sources": {"tags": [tag]}},
            ],
            "outbound_rules": [
                {"protocol": "tcp", "ports": "all", "destinations": everywhere},
                {"protocol": "udp", "ports": "all", "destinations": everywhere},
                {"protocol": "icmp", "destinations": everywhere},
            ],
        },
        {
            "name": made_name(scheduler_tag(cluster_id)),
            "tags": [scheduler_tag(cluster_id)],
            "inbound_rules": [
                {"protocol": "tcp", "ports": str(port), "sources": {"addresses": list(sources)}}
                for port in ports
            ],
        },
    ]
