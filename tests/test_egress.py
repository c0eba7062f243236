"""The one rule every cloud uses to decide a VM's public address from its network's exits."""

from __future__ import annotations

import pytest

from dask_secure_cloud.credentials import Role
from dask_secure_cloud.egress import Exits, NoRouteOutError, public_address

NAT = Exits(
    "subnet subnet-1 of vpc-1", private="NAT gateway nat-1", public="internet gateway igw-1"
)
IGW_ONLY = Exits("subnet subnet-2 of vpc-1", private=None, public="internet gateway igw-1")
CLOSED = Exits("subnet subnet-3 of vpc-2", private=None, public=None)
FIXES = ["subnet_id=<a subnet whose route table sends 0.0.0.0/0 to a NAT gateway>"]


def decide(wanted: bool | None, exits: Exits, offline: bool = False) -> bool:
    return public_address(
        Role.WORKER,
        wanted,
        exits,
        option="worker_public_ip",
        offline_image=offline,
        fixes=FIXES,
    )


@pytest.mark.parametrize(
    "wanted, exits, expected",
    [
        (None, NAT, False),  # NAT is there: no address to pay for, nothing reachable
        (None, IGW_ONLY, True),  # a new account's default network: public, inbound closed
        (False, NAT, False),
        (True, NAT, True),
        (True, IGW_ONLY, True),
    ],
)
def test_the_way_out_decides_the_public_address(wanted, exits, expected):
    assert decide(wanted, exits) is expected


@pytest.mark.parametrize("wanted, exits", [(False, IGW_ONLY), (None, CLOSED), (True, CLOSED)])
def test_no_way_out_is_refused_naming_the_place_and_every_fix(wanted, exits):
    with pytest.raises(NoRouteOutError) as info:
        decide(wanted, exits)
    message = str(info.value)
    assert exits.place in message
    assert FIXES[0] in message
    assert "offline_image=True" in message
    assert "Nothing was created" in message
    if wanted is False:
        assert "worker_public_ip=False" in message


@pytest.mark.parametrize("wanted, exits", [(False, IGW_ONLY), (None, CLOSED), (True, CLOSED)])
def test_an_offline_image_boots_where_there_is_no_way_out(wanted, exits):
    assert decide(wanted, exits, offline=True) is bool(wanted)
