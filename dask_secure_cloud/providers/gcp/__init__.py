"""``GCPCluster``: a secure Dask cluster on Google Compute Engine.

What is particular to Google Cloud: the official ``google-cloud-compute`` client on its
REST transport, run in threads (it has no async client); firewall rules per cluster that
target the cluster's own network tags; an external address for a VM only where its
subnetwork has no Cloud NAT (read from the region's routers and the network's routes
before anything is made, see :mod:`dask_secure_cloud.egress`); GPUs as
``guestAccelerators``; spot workers; and a deadline after which Compute Engine deletes
a forgotten VM by itself, whatever became of the client: ``scheduling.terminationTime``
at the end of the cluster's ``max_lifetime`` (its CA's end), or ``max_run_duration``
after the VM started where that option is set. Compute Engine applies either only
while the VM runs: it clears the deadline when the VM stops, so a VM whose OS powered
off (its lease or certificate ran out) stays TERMINATED, its boot disk billing, until
it is deleted (``dask secure-cloud cleanup``).

A fresh project's ``default`` network allows SSH, RDP and ICMP from anywhere to every
instance (priority 65534). A worker with an external address would accept them, so the
cluster's own rules deny every ingress from ``0.0.0.0/0`` to its tag at a priority that
beats those and the usual user rules (1000), and allow, at a higher one, only the
cluster's members to each other and the creator's CIDRs to the scheduler's two ports.

Every client the driver builds, including the operations clients it waits with, gets
the ``api_endpoint`` option, so nothing ever reaches another host. The driver never
calls ``ExtendedOperation.result()``: the library builds that operations client itself,
without the caller's endpoint.

The package: :mod:`.driver` (instances), :mod:`.network` (the ways out, external
addresses, firewall rules), :mod:`.errors` (Compute Engine's error codes), :mod:`.cluster`
(``GCPCluster``).
"""

try:
    import google.api_core
    import google.cloud.compute_v1  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError("GCPCluster needs the gcp extra: pip install 'dask-secure-cloud[gcp]'") from e

from .cluster import GCPCluster
from .driver import GCPDriver

__all__ = ["GCPCluster", "GCPDriver"]
