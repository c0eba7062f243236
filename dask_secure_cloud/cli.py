"""``dask secure-cloud ...`` (also installed as ``dask-secure-cloud``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import click

__all__ = ["main"]


@click.group(name="secure-cloud", help="Secure Dask clusters on cloud VMs.")
@click.version_option(package_name="dask-secure-cloud")
def main() -> None:
    pass


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


async def _demo(n_workers: int, security: bool) -> None:
    from distributed import Client
    from distributed.comm import connect

    from .providers.local import LocalVMCluster

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
            for address in [cluster.scheduler_address, *(addr for addr, _ in workers)]:
                comm = await connect(address, **args)
                try:
                    cipher, version, _bits = comm.extra_info["cipher"]
                    peer = _describe_peer(comm.extra_info)
                finally:
                    await comm.close()
                click.echo(f"peer         {address}  {version} {cipher}\n             {peer}")
            client_cert = cluster._credentials.client if cluster._credentials else None
            if client_cert is not None:
                click.echo(
                    f"client       dask-secure-cloud://{cluster.cluster_id}/client/client  "
                    f"expires {client_cert.not_after:%Y-%m-%d %H:%M} UTC"
                )
    click.echo(f"teardown     every VM deleted ({time.perf_counter() - started:.1f}s in all)")


@main.command()
@click.option("--workers", "n_workers", default=2, show_default=True, help="Worker VMs.")
@click.option(
    "--insecure",
    is_flag=True,
    help="Plain tcp:// without certificates (security=False), for comparison.",
)
def demo(n_workers: int, insecure: bool) -> None:
    """Start a TLS LocalVMCluster, compute on it, show its certificates, tear it down."""
    asyncio.run(_demo(n_workers, security=not insecure))
