"""``DropletCluster``: a secure Dask cluster on DigitalOcean droplets, through ``pydo.aio``.

What is particular to DigitalOcean: every droplet has a public IPv4 address, which is
also its way out (to install Docker and pull the image), so no droplet lacks a route out
and none needs a NAT. The cluster's two cloud firewalls are what keep droplets private:
one, applied by the cluster's tag, lets droplets of the cluster reach each other on every
port and nothing else in; the other, applied by a tag only the scheduler carries, opens
the scheduler port and dashboard to the creator's address. Workers reach the scheduler
over the VPC's private addresses.
A VPC is made per cluster unless one is given. User-data is plain text of at most
64 KiB, so files inside it are gzip+base64 encoded by ``cloudinit``.

The API token comes from the ``token`` option, the dask config or ``DIGITALOCEAN_TOKEN``
and never reaches a droplet: it is neither in user-data nor in the shipped dask config.

The package: :mod:`.driver` (droplets), :mod:`.network` (cloud firewalls), :mod:`.tags`
(how everything of a cluster is found again), :mod:`.errors` (the API's statuses),
:mod:`.cluster` (``DropletCluster``).
"""

try:
    import pydo  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError(
        "DropletCluster needs the digitalocean extra: pip install 'dask-secure-cloud[digitalocean]'"
    ) from e

from .cluster import DropletCluster
from .driver import DropletDriver
from .tags import cluster_tag, made_name, scheduler_tag

__all__ = ["DropletCluster", "DropletDriver", "cluster_tag", "made_name", "scheduler_tag"]
