"""The network steps of a Compute Engine cluster: which ways out its subnetwork
offers (Cloud NAT, the default internet gateway), whether each role's VMs get an
external address, and the cluster's firewall rules.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from typing import Any

from google.cloud import compute_v1

from ... import driver
from ...credentials import Role
from ...egress import Exits, decide_public_addresses

logger = logging.getLogger(__name__)


#: The firewall rules of a cluster, by the suffix after its network tag.
_RULES = ("deny", "client", "internal")
_RULE_NAME = re.compile(rf"^dask-secure-cloud-(?P<id>[a-z][a-z0-9-]*)-(?:{'|'.join(_RULES)})$")


#: The cluster's allow rules: above its own deny rule (lower number wins).
ALLOW_PRIORITY = 100


#: The cluster's "deny all ingress from 0.0.0.0/0" rule: beats a fresh project's
#: default-allow-* rules (65534) and rules made with the usual default priority (1000).
DENY_PRIORITY = 110


#: Cloud NAT settings that translate every subnetwork's primary range in the region.
_NAT_ALL_SUBNETWORKS = ("ALL_SUBNETWORKS_ALL_IP_RANGES", "ALL_SUBNETWORKS_ALL_PRIMARY_IP_RANGES")


_INTERNET_GATEWAY = "/global/gateways/default-internet-gateway"


def _network_tag(cluster_id: str) -> str:
    """The network tag (and name prefix) of a cluster's VMs and firewall rules."""
    return f"dask-secure-cloud-{cluster_id}"


def _scheduler_tag(cluster_id: str) -> str:
    """The network tag of the scheduler alone: the creator's CIDRs reach only it.

    ``--`` ends the cluster id (no id has two hyphens in a row, see
    :mod:`dask_secure_cloud.names`): with a single hyphen this would be the tag every VM
    of a cluster called ``<id>-scheduler`` carries, and its rules would reach them."""
    return f"{_network_tag(cluster_id)}--scheduler"


def _covering_nat(routers: Sequence[Any], network: str, subnet: Any) -> str | None:
    """The Cloud NAT (public, for VMs) that translates ``subnet``'s primary range."""
    for router in routers:
        if not router.network.endswith(f"/global/networks/{network}"):
            continue
        for nat in router.nats:
            if nat.type_ == "PRIVATE":
                continue  # NAT between networks, not to the internet
            if nat.endpoint_types and "ENDPOINT_TYPE_VM" not in nat.endpoint_types:
                continue
            mode = nat.source_subnetwork_ip_ranges_to_nat
            covered = mode in _NAT_ALL_SUBNETWORKS or (
                mode == "LIST_OF_SUBNETWORKS"
                and any(
                    _same_subnet(entry.name, subnet)
                    and {"ALL_IP_RANGES", "PRIMARY_IP_RANGE"} & set(entry.source_ip_ranges_to_nat)
                    for entry in nat.subnetworks
                )
            )
            if covered:
                return f"Cloud NAT {nat.name} on router {router.name}"
    return None


def _same_subnet(link: str, subnet: Any) -> bool:
    """Whether a subnetwork URL (full or partial) names ``subnet``."""
    tail = "/".join(link.rstrip("/").split("/")[-4:])
    return (subnet.self_link or "").endswith(tail) or tail == (
        f"regions/{subnet.region.rsplit('/', 1)[-1]}/subnetworks/{subnet.name}"
    )


def _internet_route(routes: Sequence[Any], network: str, tags: set[str]) -> str | None:
    """The name of a 0.0.0.0/0 route to the default internet gateway that applies to the
    cluster's VMs (a route with tags applies only to instances carrying one of them)."""
    for route in routes:
        if (
            route.network.endswith(f"/global/networks/{network}")
            and route.dest_range == "0.0.0.0/0"
            and route.next_hop_gateway.endswith(_INTERNET_GATEWAY)
            and (not route.tags or tags & set(route.tags))
        ):
            return route.name
    return None


class NetworkSteps:
    """The driver's network steps, kept apart from its instances: read the subnetwork's ways
    out, decide each role's external address, and write the cluster's firewall rules.
    Mixed into :class:`~.driver.GCPDriver`, whose clients and options they use."""

    def _network_link(self) -> str:
        return f"projects/{self.project}/global/networks/{self.options.network}"

    def _firewall_rules(self, cluster_id: str, sources: Sequence[str]) -> list[Any]:
        """The deny rule first, so no moment exists where only allows are in place.

        Only the scheduler's tag gets the creator's CIDRs: a worker with an external
        address accepts nothing from outside the cluster."""
        tag = _network_tag(cluster_id)
        network = self._network_link()
        return [
            compute_v1.Firewall(
                name=f"{tag}-deny",
                network=network,
                description=(
                    f"dask-secure-cloud {cluster_id}: nothing from outside the cluster, "
                    "whatever the network's other rules allow"
                ),
                direction="INGRESS",
                priority=DENY_PRIORITY,
                source_ranges=["0.0.0.0/0"],
                target_tags=[tag],
                denied=[compute_v1.Denied(I_p_protocol="all")],
            ),
            compute_v1.Firewall(
                name=f"{tag}-client",
                network=network,
                description=f"dask-secure-cloud {cluster_id}: scheduler port and dashboard",
                direction="INGRESS",
                priority=ALLOW_PRIORITY,
                source_ranges=list(sources),
                target_tags=[_scheduler_tag(cluster_id)],
                allowed=[
                    compute_v1.Allowed(I_p_protocol="tcp", ports=[str(p) for p in self.ports])
                ],
            ),
            compute_v1.Firewall(
                name=f"{tag}-internal",
                network=network,
                description=f"dask-secure-cloud {cluster_id}: between the cluster's VMs",
                direction="INGRESS",
                priority=ALLOW_PRIORITY,
                source_tags=[tag],
                target_tags=[tag],
                allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=["0-65535"])],
            ),
        ]

    async def read_exits(self, cluster_id: str) -> Exits:
        return await self._exits()

    def decide_public(self, exits: Exits) -> None:
        """Which roles get an external address, from the subnetwork's ways out.

        Refuses (``NoRouteOutError``) before anything is made when a role would have
        none."""
        self._public = decide_public_addresses(
            exits,
            use_private_ip=self.network_policy.use_private_ip,
            worker_public_ip=self.worker_public_ip,
            offline_image=self.offline_image,
            fixes=lambda role: self._fixes(role, exits),
            logger=logger,
        )

    def _fixes(self, role: Role, exits: Exits) -> list[str]:
        """Compute Engine's remedies, as options to paste."""
        fixes = [
            f"subnetwork=<a subnetwork of network {self.options.network} in {self.region} that a "
            "Cloud NAT covers> (gcloud compute routers nats create ... "
            "--nat-all-subnet-ip-ranges, on a router of that network)",
            "network=<a network with a 0.0.0.0/0 route to default-internet-gateway>",
        ]
        if role is Role.WORKER and exits.public is not None:
            fixes.insert(
                0,
                "worker_public_ip=None (the default) or True: workers get an ephemeral "
                f"external address and go out through {exits.public}, while the "
                "cluster's firewall denies every connection from outside the cluster",
            )
        return fixes

    async def _exits(self) -> Exits:
        """The ways out of the VMs' subnetwork: a Cloud NAT covering it, a default
        internet route. Both need that route: Cloud NAT sends through it too."""
        subnet = await self._subnetwork()
        place = f"subnetwork {subnet.name} of network {self.options.network} in {self.region}"
        routers = await self._call(
            "RoutersClient",
            "list",
            f"routers in {self.region}",
            request=compute_v1.ListRoutersRequest(project=self.project, region=self.region),
        )
        routes = await self._call(
            "RoutesClient",
            "list",
            f"routes of network {self.options.network!r}",
            request=compute_v1.ListRoutesRequest(
                project=self.project,
                filter=(
                    f'network eq ".*/projects/{self.project}/global/networks/'
                    f'{self.options.network}"'
                ),
            ),
        )
        nat = _covering_nat(await asyncio.to_thread(list, routers), self.options.network, subnet)
        route = _internet_route(
            await asyncio.to_thread(list, routes), self.options.network, set(self.network_tags)
        )
        if route is None:
            if nat is not None:
                place += (
                    f" ({nat} is there, but it has no 0.0.0.0/0 route to "
                    "default-internet-gateway to send through)"
                )
            return Exits(place, private=None, public=None)
        return Exits(place, private=nat, public=f"the default internet gateway (route {route})")

    async def _network_subnets(self) -> list[Any]:
        """The subnetworks of the cluster's network in the zone's region (read once)."""
        if self._subnets is None:
            pages = await self._call(
                "SubnetworksClient",
                "list",
                f"subnetworks of network {self.options.network!r}",
                project=self.project,
                region=self.region,
            )
            self._subnets = [
                s
                for s in await asyncio.to_thread(list, pages)
                if s.network.endswith(f"/global/networks/{self.options.network}")
            ]
        return self._subnets

    async def _subnetwork(self) -> Any:
        """The subnetwork the VMs get their addresses from, as Compute Engine picks it."""
        if self.options.subnetwork:
            subnet = await self._call(
                "SubnetworksClient",
                "get",
                f"subnetwork {self.options.subnetwork!r}",
                project=self.project,
                region=self.region,
                subnetwork=self.options.subnetwork,
            )
            if not subnet.network.endswith(f"/global/networks/{self.options.network}"):
                raise driver.CloudError(
                    f"subnetwork {self.options.subnetwork!r} belongs to network "
                    f"{subnet.network.rsplit('/', 1)[-1]!r}, not {self.options.network!r}: pass "
                    "network= with its network"
                )
            return subnet
        subnets = await self._network_subnets()
        # An auto-mode network's subnetwork in a region carries the network's name.
        chosen = (
            subnets if len(subnets) == 1 else [s for s in subnets if s.name == self.options.network]
        )
        if not subnets:
            raise driver.CloudError(
                f"network {self.options.network!r} has no subnetwork in {self.region}: "
                "pass subnetwork="
            )
        if len(chosen) != 1:
            names = ", ".join(s.name for s in subnets) or "none"
            raise driver.CloudError(
                f"network {self.options.network!r} has {len(subnets)} subnetworks in {self.region} "
                f"({names}): pass subnetwork="
            )
        return chosen[0]

    async def _subnet_ranges(self) -> list[str]:
        """The address ranges of the cluster's subnetwork, or of the network's in region."""
        if self.options.subnetwork:
            return [(await self._subnetwork()).ip_cidr_range]
        ranges = [s.ip_cidr_range for s in await self._network_subnets()]
        if not ranges:
            raise driver.CloudError(
                f"network {self.options.network!r} has no subnetwork in {self.region}: "
                "pass subnetwork="
            )
        return ranges
