"""EC2's zones: the cluster's subnet is in one availability zone; a launch its zone
has no capacity for moves to a subnet of the VPC in another zone with the same route
table, unless ``subnet_id`` pins the zone (see ``placement.py``)."""

from __future__ import annotations

from typing import Any

from ... import placement
from ...credentials import Role
from .network import subnet_route_table


class ZoneSteps(placement.Zonal):
    """The zone part of :class:`~.driver.EC2Driver`."""

    options: Any
    _vpc_subnets: list[dict[str, Any]]
    _zone_subnets: dict[str, str]
    _region_zones: list[str] | None
    _route_table_id: str

    async def _call(self, operation: str, poll: bool = False, **kwargs: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _place_zones(self, tables: list[dict[str, Any]], subnet_id: str) -> None:
        """The chosen subnet's zone is the cluster's; another zone may take a VM it has
        no capacity for only through a subnet there with the same route table."""
        subnets = {s["SubnetId"]: s for s in self._vpc_subnets}
        self.home_zone = subnets.get(subnet_id, {}).get("AvailabilityZone")
        self._zone_subnets = {str(self.home_zone): subnet_id}
        if self.options.subnet_id:
            return
        for subnet in sorted(self._vpc_subnets, key=_subnet_order):
            zone = subnet.get("AvailabilityZone")
            same_exits = (
                subnet_route_table(tables, subnet["SubnetId"])["RouteTableId"]
                == self._route_table_id
            )
            if zone and zone not in self._zone_subnets and same_exits:
                self._zone_subnets[zone] = subnet["SubnetId"]

    def zone_pinned_by(self) -> str | None:
        if not self.options.zone_failover:
            return (
                f"zone_failover=False keeps every VM in {self.home_zone}: set it to True "
                "to let the region's other zones take a VM this one has no capacity for"
            )
        if self.options.subnet_id:
            return (
                f"subnet_id={self.options.subnet_id!r} is in one availability zone: pass "
                "a subnet of another zone, or leave subnet_id unset so that the VPC's "
                "subnets in the region's other zones are tried"
            )
        return None

    async def region_zones(self, role: Role) -> list[str]:
        """The region's available zones (DescribeAvailabilityZones) where the VPC has
        a subnet with the same ways out as the chosen one."""
        if self._region_zones is None:
            answer = await self._call(
                "describe_availability_zones",
                Filters=[{"Name": "state", "Values": ["available"]}],
            )
            self._region_zones = [
                z["ZoneName"]
                for z in answer["AvailabilityZones"]
                if z["ZoneName"] in self._zone_subnets
            ]
        return self._region_zones

    def spot(self, role: Role) -> bool:
        return role is Role.WORKER and self.options.worker_spot


def _subnet_order(subnet: dict[str, Any]) -> tuple[bool, str]:
    """A zone's default subnet first, then by id: the same choice on every start."""
    return (not subnet.get("DefaultForAz", False), subnet["SubnetId"])
