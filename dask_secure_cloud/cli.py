"""``dask secure-cloud ...`` (also installed as ``dask-secure-cloud``).

``demo`` runs a TLS cluster here; ``list`` and ``cleanup`` find clusters on the clouds by
their tags, so a cluster whose notebook died is never out of reach; ``cloud-init`` shows
what a VM would receive (keys redacted); ``config`` shows each option and its source.
Cloud options come from the dask config, exactly as for ``Cluster(...)``.
"""

from __future__ import annotations

import asyncio
import datetime
import re
from collections.abc import Mapping, Sequence
from typing import Any

import click
import yaml

from . import audit, config
from .cloudinit import decode_file, parse
from .credentials import Role
from .options.base import duration
from .pricing import money
from .registry import PROVIDERS, cluster_class, options_class

__all__ = ["main"]

_SECRET_OPTIONS = {"token"}
_PEM_PRIVATE = re.compile(
    r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.DOTALL
)


@click.group(name="secure-cloud", help="Secure Dask clusters on cloud VMs.")
@click.version_option(package_name="dask-secure-cloud")
def main() -> None:
    pass


@main.command()
@click.option("--workers", "n_workers", default=2, show_default=True, help="Worker VMs.")
@click.option(
    "--insecure",
    is_flag=True,
    help="Plain tcp:// without certificates (security=False), for comparison.",
)
def demo(n_workers: int, insecure: bool) -> None:
    """Start a TLS LocalVMCluster, compute on it, show its certificates, tear it down."""
    from .demo import run

    asyncio.run(run(n_workers, security=not insecure))


# -- shared helpers ----------------------------------------------------------------------


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    """``-o key=value`` pairs; values are read as YAML, so ``-o n_workers=2`` is an int."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="-o/--option")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


def _preview(provider: str, options: dict[str, Any]) -> Any:
    from .cluster import preview

    try:
        return preview(cluster_class(provider), **options)
    except ImportError as e:
        raise click.ClickException(str(e)) from e
    except (ValueError, TypeError) as e:  # an option the cluster class refuses
        raise click.ClickException(f"{provider}: {e}") from e


def _age(created: datetime.datetime | None) -> str:
    if created is None:
        return "?"
    if created.tzinfo is None:
        created = created.replace(tzinfo=datetime.timezone.utc)
    seconds = int((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds())
    hours, rest = divmod(max(seconds, 0), 3600)
    return f"{hours // 24}d {hours % 24}h" if hours >= 24 else f"{hours}h {rest // 60}m"


async def _found(providers: Sequence[str], options: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(provider, summary, driver)`` for every cluster on ``providers``. A provider
    that is not set up (no SDK, no credentials) is reported and skipped."""
    from .driver import CloudError

    found = []
    for provider in providers:
        try:
            driver = _preview(provider, dict(options)).driver
        except click.ClickException as e:
            click.echo(f"{provider}: skipped ({e.message})", err=True)
            continue
        try:
            found += [(provider, summary, driver) for summary in await driver.clusters()]
        except (CloudError, OSError, RuntimeError, ValueError) as e:
            click.echo(f"{provider}: could not list clusters ({e})", err=True)
            await driver.close()
    return found


_PROVIDER_OPTION = click.option(
    "--provider",
    "providers",
    multiple=True,
    type=click.Choice(sorted(PROVIDERS)),
    help="Look only here (repeatable). Default: every provider.",
)
_OPTION_OPTION = click.option(
    "-o",
    "--option",
    "pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="A cluster option, as for Cluster(...): -o region=eu-west-1 (repeatable).",
)


# -- list --------------------------------------------------------------------------------


def _client(summary: Any) -> str:
    """``alive (pid 4242)``, ``gone`` or ``unknown``: see ``liveness.py``."""
    from .liveness import Client, client_of

    state, pid = client_of(summary)
    return f"alive (pid {pid})" if state is Client.ALIVE and pid else state.value


def _counted(counts: Any) -> str:
    """``2 running VM, 1 disk``; ``-`` when there is nothing."""
    return ", ".join(f"{n} {what}" for what, n in counts.items()) or "-"


def _other(summary: Any) -> str:
    """The non-VM resources: ``3 (2 firewall, 1 network)`` where the kinds are known."""
    if not summary.resources:
        return str(summary.other)
    return f"{summary.other} ({_counted(dict(sorted(summary.resources.items())))})"


def _estimates() -> dict[str, dict[str, Any]]:
    """Each cluster's last hourly estimate in this machine's audit log (made at its
    start, from the cloud's price list), by cluster id."""
    return {e["cluster_id"]: e for e in audit.read() if e.get("event") == "cost_estimate"}


def _cost(summary: Any, estimates: Mapping[str, Mapping[str, Any]]) -> str:
    """What the cluster's running VMs cost per hour, from its estimate at start: ``-``
    for a cluster started elsewhere (no estimate here), ``unknown`` where it had none."""
    found = estimates.get(summary.cluster_id)
    if found is None:
        return "-"
    scheduler, worker = found.get("scheduler_hourly"), found.get("worker_hourly")
    if scheduler is None or worker is None:
        return "unknown"
    running = dict(summary.vm_states).get("running", 0) if summary.vm_states else summary.vms
    if running == 0:
        return "-"
    return f"{money(scheduler + worker * max(running - 1, 0))}/h"


@main.command(name="list")
@_PROVIDER_OPTION
@_OPTION_OPTION
def list_clusters(providers: Sequence[str], pairs: Sequence[str]) -> None:
    """Clusters that exist now, found by their tags: provider, id, age, whether its
    client is alive (gone: `cleanup --expired` ends it), its VMs, its other resources
    (firewalls, networks, disks, addresses), what of all that bills, and its creator.

    A cluster whose start was killed before its first VM shows 0 VMs and what it had
    made. A VM powered off may still bill (a stopped Azure VM, a TERMINATED Compute
    Engine instance's disk, a droplet that is off): BILLS says so. COST/H is what its
    running VMs cost per hour, from the estimate made at its start on this machine.
    """
    estimates = _estimates()

    async def run() -> None:
        found = await _found(providers or sorted(PROVIDERS), _options(pairs))
        try:
            header = (
                "PROVIDER",
                "CLUSTER",
                "AGE",
                "CLIENT",
                "VMS",
                "OTHER",
                "BILLS",
                "COST/H",
                "CREATOR",
            )
            rows = [header]
            for provider, summary, _ in found:
                rows.append(
                    (
                        provider,
                        summary.cluster_id,
                        _age(summary.created),
                        _client(summary),
                        str(summary.vms),
                        _other(summary),
                        _counted(summary.billing()),
                        _cost(summary, estimates),
                        summary.creator or "?",
                    )
                )
            widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
            for row in rows:
                click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        finally:
            for driver in {id(d): d for _, _, d in found}.values():
                await driver.close()

    asyncio.run(run())


# -- cleanup -----------------------------------------------------------------------------


@main.command()
@click.argument("cluster_ids", nargs=-1)
@click.option(
    "--older-than",
    default=None,
    metavar="DURATION",
    help="Every cluster older than this, e.g. 12h (instead of naming clusters).",
)
@click.option(
    "--expired",
    is_flag=True,
    help="Every cluster of yours, made on this machine, whose client process is gone "
    "(CLIENT gone in `list`): nothing renews its lease or will close it.",
)
@click.option("--yes", is_flag=True, help="Delete without asking.")
@_PROVIDER_OPTION
@_OPTION_OPTION
def cleanup(
    cluster_ids: Sequence[str],
    older_than: str | None,
    expired: bool,
    yes: bool,
    providers: Sequence[str],
    pairs: Sequence[str],
) -> None:
    """Delete every resource of the named clusters, of all clusters older than an age,
    or of every cluster of yours whose client is gone (--expired).

    Shows what it will delete and asks first, unless --yes.
    """
    from .cluster import ResourcesLeftError, delete_cluster
    from .driver import CloudError
    from .liveness import Client, client_of, drop

    if sum((bool(cluster_ids), bool(older_than), expired)) != 1:
        raise click.UsageError("name cluster ids, or give --older-than or --expired: one of them")
    cutoff = None
    if older_than:
        try:
            age = duration(older_than, "--older-than")
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--older-than") from e
        cutoff = datetime.datetime.now(datetime.timezone.utc) - age

    def chosen(summary: Any) -> bool:
        if cluster_ids:
            return summary.cluster_id in cluster_ids
        if expired:
            return client_of(summary)[0] is Client.GONE
        created = summary.created
        if created is not None and created.tzinfo is None:
            created = created.replace(tzinfo=datetime.timezone.utc)
        return created is not None and cutoff is not None and created < cutoff

    async def run() -> int:
        found = await _found(providers or sorted(PROVIDERS), _options(pairs))
        failures = 0
        try:
            doomed = [(p, s, d) for p, s, d in found if chosen(s)]
            missing = set(cluster_ids) - {s.cluster_id for _, s, _ in doomed}
            for cluster_id in sorted(missing):
                click.echo(f"{cluster_id}: not found", err=True)
            if not doomed:
                click.echo("Nothing to delete.")
                return 1 if missing else 0
            click.echo("Will delete every resource of:")
            for provider, summary, _ in doomed:
                click.echo(
                    f"  {provider}  {summary.cluster_id}  {summary.vms} VM(s) and "
                    f"{summary.other} other resource(s), age {_age(summary.created)}, "
                    f"client {_client(summary)}, creator {summary.creator or '?'}; "
                    f"bills: {_counted(summary.billing())}"
                )
            if not yes and not click.confirm("Delete them?", default=False):
                click.echo("Nothing deleted.")
                return 1
            for provider, summary, driver in doomed:
                try:
                    deleted = await delete_cluster(driver, summary.cluster_id)
                except (CloudError, ResourcesLeftError, OSError) as e:
                    failures += 1
                    click.echo(f"{summary.cluster_id}: cleanup failed: {e}", err=True)
                    await audit.record_async(
                        "cleanup", summary.cluster_id, provider=provider, ok=False, error=str(e)
                    )
                    continue
                drop(summary.cluster_id)
                click.echo(f"{summary.cluster_id}: deleted {len(deleted)} VM(s) and its network")
                await audit.record_async(
                    "cleanup", summary.cluster_id, provider=provider, ok=True, vms_deleted=deleted
                )
        finally:
            for driver in {id(d): d for _, _, d in found}.values():
                await driver.close()
        return 1 if failures else 0

    code = asyncio.run(run())
    if code:
        raise SystemExit(code)


# -- cloud-init --------------------------------------------------------------------------


_TOKEN = re.compile(r'"token": "[^"]*"')


def redact(user_data: bytes) -> str:
    """The user-data as readable YAML: every file decoded, every private key (a user's
    own ``Security``) and every enrollment token replaced."""
    document = parse(user_data)
    for entry in document.get("write_files", []):
        content = decode_file(entry).decode(errors="replace")
        content = _PEM_PRIVATE.sub(lambda m: f"-----REDACTED {m.group(1)}PRIVATE KEY-----", content)
        if entry["path"].endswith("/enroll.json"):
            content = _TOKEN.sub('"token": "REDACTED"', content)
        entry["content"] = content
        entry.pop("encoding", None)
    return "#cloud-config\n" + yaml.safe_dump(document, sort_keys=False, width=100)


@main.command(name="cloud-init")
@click.option(
    "--provider",
    type=click.Choice(sorted(PROVIDERS)),
    default="local",
    show_default=True,
    help="Whose limits and defaults to use.",
)
@click.option(
    "--role",
    type=click.Choice([r.value for r in (Role.SCHEDULER, Role.WORKER)]),
    default="worker",
    show_default=True,
)
@_OPTION_OPTION
def cloud_init(provider: str, role: str, pairs: Sequence[str]) -> None:
    """Print the user-data a VM would receive, tokens and private keys redacted.

    For image builders and debugging: the certificates shown are a throwaway cluster's.
    """
    shown = _preview(provider, _options(pairs))
    click.echo(redact(shown.user_data[Role(role)]), nl=False)


# -- config ------------------------------------------------------------------------------


@main.command(name="config")
@click.argument("provider", type=click.Choice(sorted(PROVIDERS)))
def show_config(provider: str) -> None:
    """The effective options of PROVIDER's cluster class and where each comes from."""
    from .options import specs

    # The options classes need no cloud SDK: this works without the provider's extra.
    names = [name for name, _ in specs(options_class(provider))]
    try:
        config.check_provider_keys(provider, names)
    except config.ConfigError as e:
        raise click.ClickException(str(e)) from e
    rows = [("OPTION", "VALUE", "SOURCE")]
    for resolved in config.explain(provider, names):
        value = resolved.value
        if resolved.name in _SECRET_OPTIONS and value:
            value = "(set, hidden)"
        rows.append(
            (
                resolved.name,
                yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n..."),
                resolved.source,
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(2)]
    for name, value, source in rows:
        click.echo(f"{name.ljust(widths[0])}  {str(value).ljust(widths[1])}  {source}")


# -- image -------------------------------------------------------------------------------

_CLOUDS = sorted(p for p in PROVIDERS if p != "local")


@main.group(name="image")
def image() -> None:
    """Cloud images with a cluster's exact software: its VMs then boot in seconds.

    A cluster boots the newest image of its account and region built for its software
    (runtime, Docker image or dask, distributed, pip_packages and requirements_file,
    Python, base image)
    unless its image option is given. `list` and `cleanup` never delete an image.
    """


def _config_file(path: str | None) -> None:
    """Read a dask config file (YAML) on top of the usual ones."""
    if not path:
        return
    import dask.config

    with open(path) as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise click.BadParameter(f"{path} is not a YAML mapping", param_hint="--config")
    dask.config.update(dask.config.config, loaded, priority="new")


_CONFIG_OPTION = click.option(
    "--config",
    "config_file",
    default=None,
    metavar="FILE",
    help="A dask config file (YAML) read on top of the usual ones, as a cluster would be.",
)


@image.command(name="build")
@click.argument("provider", type=click.Choice(_CLOUDS))
@_OPTION_OPTION
@_CONFIG_OPTION
def image_build(provider: str, pairs: Sequence[str], config_file: str | None) -> None:
    """Build PROVIDER's image for the cluster these options describe; print its name.

    One VM boots the stock image, provisions the runtime as a cluster's VM would (the
    Docker engine and the pinned image; or the exact dask, distributed, pip_packages and
    requirements_file),
    checks it, powers off; the image is made from its disk, and the VM and everything it
    made are deleted. A failed build leaves nothing but its log.
    """
    from .driver import CloudError
    from .imaging.build import BuildError, build

    _config_file(config_file)
    try:
        built = asyncio.run(
            build(cluster_class(provider), _options(pairs), say=lambda m: click.echo(m, err=True))
        )
    except (BuildError, CloudError, ImportError, ValueError, TypeError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(built.name)


async def _store(provider: str, options: dict[str, Any]) -> Any:
    from .imaging import store_of

    store = store_of(_preview(provider, options).driver)
    if store is None:
        raise click.ClickException(f"{provider} has no cloud images")
    return store


@image.command(name="list")
@click.argument("provider", type=click.Choice(_CLOUDS))
@_OPTION_OPTION
@_CONFIG_OPTION
def image_list(provider: str, pairs: Sequence[str], config_file: str | None) -> None:
    """The images built here (account, region), newest first: name, id, software hash,
    age, and what they hold."""
    from .driver import CloudError

    _config_file(config_file)

    async def run() -> list[Any]:
        store = await _store(provider, _options(pairs))
        try:
            return await store.list()
        finally:
            await store.driver.close()

    try:
        found = asyncio.run(run())
    except CloudError as e:
        raise click.ClickException(str(e)) from e
    rows = [("NAME", "ID", "HASH", "AGE", "HOLDS")]
    for built in sorted(found, key=lambda i: i.created, reverse=True):
        rows.append((built.name, built.id, built.digest, _age(built.created), built.description))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[4]]).rstrip())


@image.command(name="delete")
@click.argument("provider", type=click.Choice(_CLOUDS))
@click.argument("names", nargs=-1, required=True)
@click.option("--yes", is_flag=True, help="Delete without asking.")
@_OPTION_OPTION
@_CONFIG_OPTION
def image_delete(
    provider: str, names: Sequence[str], yes: bool, pairs: Sequence[str], config_file: str | None
) -> None:
    """Delete the built images NAMES (names or ids) and their snapshots."""
    from .driver import CloudError
    from .imaging.build import BuildError, delete

    _config_file(config_file)
    if not yes and not click.confirm(f"Delete {', '.join(names)}?", default=False):
        click.echo("Nothing deleted.")
        raise SystemExit(1)

    async def run() -> None:
        store = await _store(provider, _options(pairs))
        try:
            for name in names:
                deleted = await delete(store, name)
                click.echo(f"deleted {deleted.name} ({deleted.id})")
        finally:
            await store.driver.close()

    try:
        asyncio.run(run())
    except (BuildError, CloudError) as e:
        raise click.ClickException(str(e)) from e
