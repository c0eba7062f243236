"""The network steps of an Azure cluster: the vnet and subnet its VMs join, their ways
out, whether each role gets a public address, and the network security groups.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging

from azure.mgmt.core.tools import is_valid_resource_id, parse_resource_id
from azure.mgmt.network import models as nm

from ... import driver
from ...credentials import Role
from ...egress import Exits, NoRouteOutError, decide_public_addresses
from ...errors import OptionError
from ...network import NetworkPolicy
from ...options import AzureOptions
from .names import _name

logger = logging.getLogger(__name__)


#: What a VM with a Standard public address goes out through (ARM names no resource
#: for it: the address itself is the way out).
_PUBLIC_EXIT = "a Standard public IP"


#: Next hops of a 0.0.0.0/0 route that send internet traffic to a box of the user's (a
#: firewall, a VPN or ExpressRoute gateway), assumed to lead out: ARM cannot tell.
_APPLIANCES = {
    "virtualappliance": "virtual appliance",
    "virtualapplianceecmp": "virtual appliances",
    "virtualnetworkgateway": "virtual network gateway",
}


def _check_client_can_reach(options: AzureOptions, network: NetworkPolicy) -> None:
    """Refuse, before any call, a private scheduler on a vnet the cluster makes itself.

    The client reaches a private scheduler only from inside its virtual network (or one
    peered to it, or over a VPN); a vnet made for the cluster is brand new, nothing is
    inside it or peered to it, so the start could only time out."""
    if network.use_private_ip and not options.vnet:
        raise OptionError(
            "use_private_ip=True with vnet=None cannot work: the cluster would make a new "
            "virtual network, and no client can be inside a network that does not exist "
            "yet, so nothing could reach the scheduler's private address. Either leave "
            "use_private_ip=False (the default: the scheduler gets a public address that "
            "its network security group opens only to this machine's address, or to "
            "allowed_cidrs), or set vnet= (and subnet=) to a virtual network this client "
            "runs in or reaches (peering, VPN, ExpressRoute)"
        )


def _may_admit(nsg: nm.NetworkSecurityGroup, source: str, port: int) -> bool:
    """Whether any inbound allow rule of ``nsg`` could let ``source`` (a CIDR) in on TCP
    ``port``. Deny rules and priorities are not weighed: this only finds an NSG that
    certainly shuts the client out, and never refuses one that might not."""
    network = ipaddress.ip_network(source, strict=False)

    def from_source(prefix: str) -> bool:
        if prefix in ("*", "Internet", "0.0.0.0/0"):
            return True
        try:
            return network.overlaps(ipaddress.ip_network(prefix, strict=False))
        except (ValueError, TypeError):  # another service tag, or IPv6 against IPv4
            return False

    def to_port(entry: str) -> bool:
        low, _, high = entry.partition("-")
        return entry == "*" or (low.isdigit() and int(low) <= port <= int(high or low))

    for rule in nsg.security_rules or []:
        if (rule.direction or "").lower() != "inbound" or (rule.access or "").lower() != "allow":
            continue
        if (rule.protocol or "*").lower() not in ("*", "tcp"):
            continue
        prefixes = rule.source_address_prefixes or [rule.source_address_prefix or ""]
        ports = rule.destination_port_ranges or [rule.destination_port_range or ""]
        if any(from_source(p) for p in prefixes) and any(to_port(p) for p in ports):
            return True
    return False


class NetworkSteps:
    """The driver's network steps, kept apart from its VMs: read the vnet's ways out,
    decide each role's public address, make the vnet and the network security groups.
    Mixed into :class:`~.driver.AzureDriver`, whose clients and options they use."""

    async def _make_network(self, cluster_id: str) -> None:
        _, net = self._clients()
        vnet = await self._lro(
            "creating the cluster's virtual network",
            net.virtual_networks.begin_create_or_update,
            self.options.resource_group,
            _name(cluster_id, "vnet"),
            nm.VirtualNetwork(
                location=self.location,
                tags=self._cluster_tags(cluster_id),
                address_space=nm.AddressSpace(address_prefixes=[self.options.address_prefix]),
                subnets=[
                    nm.Subnet(
                        name="dask",
                        address_prefix=self.options.address_prefix,
                        # Since API version 2025-07-01 a new subnet is private unless
                        # told otherwise: this one keeps Azure's free way out, so VMs
                        # without public addresses still pull their image. A NAT
                        # gateway is the production answer (see the docs).
                        default_outbound_access=True,
                    )
                ],
            ),
        )
        self._subnet_id = vnet.subnets[0].id
        self._subnet_prefixes = [self.options.address_prefix]

    async def _read_given_nsg(self) -> None:
        _, net = self._clients()
        assert self.options.network_security_group is not None
        nsg_id = self._resource_id(
            "Microsoft.Network/networkSecurityGroups", self.options.network_security_group
        )
        nsg = await self._arm(
            "reading network_security_group",
            net.network_security_groups.get(*self._group_and_name(nsg_id)),
        )
        self._nsg_ids = dict.fromkeys(Role, nsg_id)
        if self.network.use_private_ip:
            return  # the client is inside the vnet: what the NSG admits there is the user's

        async def unused() -> list[str]:
            return []

        port = self.ports[0]
        sources = await self.network.scheduler_sources(unused)
        shut_out = [s for s in sources if not _may_admit(nsg, s, port)]
        if shut_out:
            raise OptionError(
                f"network_security_group {self.options.network_security_group!r} has no "
                f"inbound rule allowing TCP port {port} from {', '.join(shut_out)}: the "
                "client connects to the scheduler's public address through it "
                "(use_private_ip=False) and could only time out. Nothing was created. Fix "
                f"with one of: (1) add such a rule to that NSG; (2) "
                "network_security_group=None (the cluster makes NSGs that admit this "
                "machine's address, or allowed_cidrs); (3) use_private_ip=True if this "
                "client runs inside the vnet"
            )

    def decide_public(self, exits: Exits) -> None:
        """Whether each role's VMs get a public address, from the subnet's ways out, or
        :class:`~dask_secure_cloud.egress.NoRouteOutError` before anything is made."""
        fixes = self._fixes(exits)
        self._public = decide_public_addresses(
            exits,
            use_private_ip=self.network.use_private_ip,
            worker_public_ip=self.worker_public_ip,
            offline_image=self.offline_image,
            fixes=lambda role: fixes,
            logger=logger,
        )
        if not self.network.use_private_ip and exits.public is None:
            # The scheduler's public address would take the client's connection, but
            # its replies would follow the subnet's route table, which drops them.
            raise NoRouteOutError(
                f"use_private_ip=False and {exits.place}: the scheduler's public address "
                "could not answer this client. Nothing was created. Fix with one of: "
                "(1) subnet=<a subnet without a 0.0.0.0/0 route to None>; (2) "
                "use_private_ip=True if this client runs inside the virtual network (or "
                "reaches it by peering or VPN)"
            )

    def _fixes(self, exits: Exits) -> list[str]:
        """Azure's own remedies for a subnet with no way out, as options to paste."""
        where = f"of vnet {self.options.vnet!r} " if self.options.vnet else ""
        fixes = [
            f"subnet=<a subnet {where}with a NAT gateway (natGateway), or whose route table "
            "sends 0.0.0.0/0 to a firewall>",
            "vnet=None (the cluster makes its own vnet, with default outbound access)",
        ]
        if exits.public is not None:
            fixes.append(
                "worker_public_ip=True (a Standard public IP per worker, about $0.005 per "
                "hour; the cluster's network security group keeps inbound closed)"
            )
        return fixes

    async def _make_nsgs(self, cluster_id: str) -> None:
        """One NSG for the scheduler, one for the workers: only the scheduler's admits
        anyone from outside the subnet (the creator, on the scheduler's two ports), so a
        worker with a public address accepts nothing from outside the cluster's subnet."""
        _, net = self._clients()

        async def inside() -> list[str]:
            return list(self._subnet_prefixes)

        sources = await self.network.scheduler_sources(inside)
        client_rule = nm.SecurityRule(
            name="dask-scheduler-from-client",
            priority=100,
            direction="Inbound",
            access="Allow",
            protocol="Tcp",
            source_address_prefixes=sources,
            source_port_range="*",
            destination_address_prefix="*",
            destination_port_ranges=[str(p) for p in self.ports],
        )
        for role, extra in ((Role.SCHEDULER, [client_rule]), (Role.WORKER, [])):
            nsg = await self._lro(
                f"creating the cluster's network security group for the {role.value}s",
                net.network_security_groups.begin_create_or_update,
                self.options.resource_group,
                _name(cluster_id, f"{role.value}-nsg"),
                nm.NetworkSecurityGroup(
                    location=self.location,
                    tags=self._cluster_tags(cluster_id),
                    security_rules=[*extra, *self._closed_rules()],
                ),
            )
            self._nsg_ids[role] = nsg.id

    def _closed_rules(self) -> list[nm.SecurityRule]:
        """The Dask ports within the subnet, and nothing else inbound."""
        return [
            nm.SecurityRule(
                name="dask-within-subnet",
                priority=110,
                direction="Inbound",
                access="Allow",
                protocol="*",
                source_address_prefixes=self._subnet_prefixes,
                source_port_range="*",
                destination_address_prefixes=self._subnet_prefixes,
                destination_port_range="*",
            ),
            # Azure's defaults let the whole virtual network (and peered ones) and the
            # load balancer's probes in; this cluster admits only what is named above.
            nm.SecurityRule(
                name="deny-everything-else",
                priority=4096,
                direction="Inbound",
                access="Deny",
                protocol="*",
                source_address_prefix="*",
                source_port_range="*",
                destination_address_prefix="*",
                destination_port_range="*",
            ),
        ]

    def _resource_id(self, kind: str, name_or_id: str) -> str:
        if is_valid_resource_id(name_or_id):
            return name_or_id
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.options.resource_group}"
            f"/providers/{kind}/{name_or_id}"
        )

    @staticmethod
    def _group_and_name(resource_id: str) -> tuple[str, str]:
        parts = parse_resource_id(resource_id)
        return parts["resource_group"], parts["name"]

    async def _use_given_network(self) -> Exits:
        """Find the given subnet and read its ways out (GETs only)."""
        _, net = self._clients()
        assert self.options.vnet is not None
        vnet_id = self._resource_id("Microsoft.Network/virtualNetworks", self.options.vnet)
        group, name = self._group_and_name(vnet_id)
        vnet = await self._arm("reading vnet", net.virtual_networks.get(group, name))
        subnets = {s.name: s for s in vnet.subnets or []}
        wanted = self.options.subnet or next(iter(subnets), None)
        if wanted not in subnets:
            close = difflib.get_close_matches(str(wanted), sorted(subnets), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" It has: {sorted(subnets)}"
            raise driver.CloudError(f"subnet {wanted!r} is not a subnet of vnet {name!r}.{hint}")
        subnet = subnets[wanted]
        self._subnet_id = subnet.id
        self._subnet_prefixes = list(subnet.address_prefixes or [subnet.address_prefix])
        return await self._subnet_exits(f"subnet {wanted} of vnet {name}", subnet)

    async def _subnet_exits(self, place: str, subnet: nm.Subnet) -> Exits:
        """The ways out of a user's subnet, in the order Azure uses them: its route
        table's 0.0.0.0/0 route, then its NAT gateway, then default outbound access.

        ``defaultOutboundAccess`` absent counts as true: subnets made before API version
        2025-07-01 have it unset and keep Azure's default outbound access; newer API
        versions write ``false`` on every new subnet. A Standard public IP on a NIC is
        a way out whatever the subnet says, unless the route table drops internet
        traffic (next hop ``None``)."""
        default_route = await self._default_route(subnet)
        if default_route is not None:
            table, hop, address = default_route
            if hop == "none":
                return Exits(f"{place} (route table {table} drops 0.0.0.0/0)", None, None)
            if hop in _APPLIANCES:
                private = (
                    f"route table {table}: 0.0.0.0/0 to {_APPLIANCES[hop]} {address or ''}"
                    " (assumed to lead out)"
                ).replace("  ", " ")
                return Exits(place, private, _PUBLIC_EXIT)
        if subnet.nat_gateway is not None and subnet.nat_gateway.id:
            return Exits(place, await self._nat_exit(subnet.nat_gateway.id), _PUBLIC_EXIT)
        if subnet.default_outbound_access is not False:
            return Exits(place, "default outbound access (being retired by Azure)", _PUBLIC_EXIT)
        return Exits(place, None, _PUBLIC_EXIT)

    async def _default_route(self, subnet: nm.Subnet) -> tuple[str, str, str | None] | None:
        """(route table, next hop type in lower case, next hop address) of the subnet's
        0.0.0.0/0 route, or None when Azure's system route to the internet applies."""
        if subnet.route_table is None or not subnet.route_table.id:
            return None
        _, net = self._clients()
        group, name = self._group_and_name(subnet.route_table.id)
        table = await self._arm(
            f"reading route table {name} of the subnet", net.route_tables.get(group, name)
        )
        for route in table.routes or []:
            if route.address_prefix == "0.0.0.0/0":
                # A str enum: lower() reads its value, where str() would give its name.
                hop = (route.next_hop_type or "").lower()
                return name, hop, route.next_hop_ip_address
        return None

    async def _nat_exit(self, nat_id: str) -> str | None:
        """``"NAT gateway <name>"``, or None for one with no public IPv4 address or
        prefix, which translates nothing."""
        _, net = self._clients()
        group, name = self._group_and_name(nat_id)
        nat = await self._arm(
            f"reading NAT gateway {name} of the subnet", net.nat_gateways.get(group, name)
        )
        if nat.public_ip_addresses or nat.public_ip_prefixes:
            return f"NAT gateway {name}"
        logger.info("NAT gateway %s has no public IPv4 address: not a way out", name)
        return None
