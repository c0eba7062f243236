"""The ways out of a subnet, read from its route table, and AWS's own remedies for a
role whose VMs would have none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ... import driver
from ...credentials import Role
from ...egress import Exits


def subnet_route_table(tables: Sequence[Mapping[str, Any]], subnet_id: str) -> Mapping[str, Any]:
    """The route table a subnet uses: its explicit association, else the VPC's main one.

    ``tables`` are every route table of the subnet's VPC, as DescribeRouteTables lists
    them. A VPC always has a main route table, so one is found."""
    main: Mapping[str, Any] | None = None
    for table in tables:
        for association in table.get("Associations", []):
            if association.get("SubnetId") == subnet_id:
                return table
            if association.get("Main"):
                main = table
    if main is None:
        raise driver.CloudError(f"subnet {subnet_id}: its VPC reports no main route table")
    return main


def route_exits(table: Mapping[str, Any], place: str) -> Exits:
    """The ways out a route table's default route (0.0.0.0/0) offers a VM.

    A NAT gateway, a NAT instance (an instance or network interface as the target) or a
    transit gateway carry a private VM's traffic: the transit gateway is assumed to lead
    out, as it does in a hub-and-spoke egress VPC. An internet gateway carries only a
    public address's traffic. A route EC2 reports as ``blackhole`` (its NAT gateway
    deleted or failed, its internet gateway detached) leads nowhere."""
    for route in table.get("Routes", []):
        if route.get("DestinationCidrBlock") != "0.0.0.0/0" or route.get("State") != "active":
            continue
        if route.get("NatGatewayId"):
            return Exits(place, private=f"NAT gateway {route['NatGatewayId']}", public=None)
        target = route.get("InstanceId") or route.get("NetworkInterfaceId")
        if target:
            return Exits(place, private=f"NAT instance {target}", public=None)
        if route.get("TransitGatewayId"):
            way = f"transit gateway {route['TransitGatewayId']}"
            return Exits(place, private=way, public=None)
        if str(route.get("GatewayId", "")).startswith("igw-"):
            return Exits(place, private=None, public=f"internet gateway {route['GatewayId']}")
    return Exits(place, private=None, public=None)


def _fixes(role: Role, exits: Exits, table_id: str, vpc_id: str) -> list[str]:
    """AWS's own remedies for a role with no way out, as text the user can paste."""
    fixes = ["subnet_id=<a subnet whose route table sends 0.0.0.0/0 to a NAT gateway>"]
    if exits.public is not None and role is Role.WORKER:
        fixes.append(
            "worker_public_ip=None (the default) or True: workers get a public address "
            "for their outbound traffic, and no inbound connection from outside the cluster"
        )
    if exits.public is None:
        fixes.append(
            "subnet_id=<a subnet whose route table sends 0.0.0.0/0 to an internet gateway>"
        )
        fixes.append(
            f"add a route 0.0.0.0/0 to route table {table_id}: to a NAT gateway, or to an "
            f"internet gateway attached to {vpc_id}"
        )
    return fixes
