"""``EC2Cluster``: a secure Dask cluster on Amazon EC2, through aiobotocore.

What is particular to AWS: two security groups per cluster (one every member carries,
open only to the other members; one only the scheduler carries, opening its port and
dashboard to the creator's address), IMDSv2 with a hop limit of 1, encrypted root
volumes deleted with their instance, shutdown meaning terminate, spot workers that
retire themselves on an interruption notice, and the cluster id as a tag on every
instance, volume and security group.

Whether a VM gets a public address is decided before anything is made, from the route
table of its subnet (``egress.public_address``): a subnet that sends 0.0.0.0/0 to a NAT
gateway (or a NAT instance, or a transit gateway) needs none; one that sends it to an
internet gateway, as a new account's default VPC does, gives the VM a public address
that only carries its outbound traffic, since no security group lets anything in from
outside the cluster; a subnet with neither is refused.

Credentials come from botocore's own chain (environment, profiles, SSO, instance role);
none is ever sent to a VM. ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_EC2`` (or the
``endpoint_url`` option) point the client at LocalStack or a test stand-in.

The package: :mod:`.driver` (instances, volumes, security groups), :mod:`.network` (a
subnet's ways out), :mod:`.errors` (EC2's error codes), :mod:`.cluster` (``EC2Cluster``).
"""

try:
    import aiobotocore  # noqa: F401
    import botocore  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError("EC2Cluster needs the aws extra: pip install 'dask-secure-cloud[aws]'") from e

from .cluster import EC2Cluster
from .driver import EC2Driver

__all__ = ["EC2Cluster", "EC2Driver"]
