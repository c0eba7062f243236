"""``dask secure-cloud demo``: the main job in one command.

A secure ``LocalVMCluster`` (or a plain one with ``--insecure``, for comparison), a
computation that needs nothing beyond the package's own dependencies, what each side
proved to the other, and the teardown. Kept apart from the CLI's parsing so that it
reads as what a user would write.
"""

from __future__ import annotations

import time
from typing import Any

import click

__all__ = ["run"]

_DARTS = 200_000


def _darts_in_circle(seed: int) -> int:
    """Throw darts at the unit square; count those inside the quarter circle."""
    import random

    rng = random.Random(seed)
    return sum(rng.random() ** 2 + rng.random() ** 2 <= 1 for _ in range(_DARTS))


def _describe_peer(extra: dict[str, Any]) -> str:
    cert = extra.get("peercert") or {}
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    return f"{uris[0] if uris else '(no identity)'}  expires {cert.get('notAfter', '?')}"


async def run(n_workers: int, security: bool) -> None:
    """Start a LocalVMCluster, compute pi on it, show who proved what to whom, close it."""
    import sys

    import cloudpickle
    from distributed import Client
    from distributed.comm import connect

    from .providers.local import LocalVMCluster

    # The tasks travel by value: a worker needs Dask, not this package (as on a cloud VM).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    started = time.perf_counter()
    async with LocalVMCluster(n_workers=n_workers, security=security, asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(n_workers, timeout=120)
            ready = time.perf_counter() - started
            # Pure Python, so the demo needs nothing beyond the package's own dependencies.
            hits = client.map(_darts_in_circle, range(32), pure=False)
            inside = await client.submit(sum, hits)
            estimate = 4 * inside / (32 * _DARTS)
            workers = sorted(
                cluster.scheduler_info["workers"].items(), key=lambda kv: str(kv[1]["name"])
            )
            click.echo(
                f"cluster      {cluster.cluster_id}  ({n_workers} workers ready in {ready:.1f}s)"
            )
            click.echo(f"scheduler    {cluster.scheduler_address}")
            click.echo(f"dashboard    {cluster.dashboard_link}")
            click.echo(f"computation  pi ~ {estimate:.4f} from {32 * _DARTS:,} darts in 32 tasks")
            if not security:
                click.echo("tls          off (security=False): plain tcp://")
                return
            click.echo(f"ca           {cluster.ca_fingerprint}")
            click.echo(f"expires      {cluster.certificates_expire:%Y-%m-%d %H:%M} UTC")
            args = cluster.security.get_connection_args("client")
            address = cluster.scheduler_address
            comm = await connect(address, **args)
            try:
                cipher, version, _bits = comm.extra_info["cipher"]
                peer = _describe_peer(comm.extra_info)
            finally:
                await comm.close()
            click.echo(f"peer         {address}  {version} {cipher}\n             {peer}")
            # This client talks to the scheduler alone; workers prove themselves to it.
            names = ", ".join(str(info["name"]) for _, info in workers)
            click.echo(f"workers      {names}: each its own certificate, checked by its peers")
            client_cert = cluster._credentials.client if cluster._credentials else None
            if client_cert is not None:
                click.echo(
                    f"client       dask-secure-cloud://{cluster.cluster_id}/client/client  "
                    f"expires {client_cert.not_after:%Y-%m-%d %H:%M} UTC"
                )
    click.echo(f"teardown     every VM deleted ({time.perf_counter() - started:.1f}s in all)")
