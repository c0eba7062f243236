"""One table names every provider; everything that lists providers reads it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from click.testing import CliRunner

import dask_secure_cloud
from dask_secure_cloud import registry
from dask_secure_cloud.cli import main
from dask_secure_cloud.cloudinit import LIMITS
from dask_secure_cloud.options import OPTION_CLASSES
from dask_secure_cloud.options.keys import PROVIDERS as CONFIG_SECTIONS


@pytest.mark.parametrize("provider", sorted(registry.PROVIDERS))
def test_each_provider_is_exported_named_and_limited_from_the_table(provider):
    entry = registry.PROVIDERS[provider]
    cls = registry.cluster_class(provider)
    assert getattr(dask_secure_cloud, entry.cluster_class) is cls
    assert entry.cluster_class in dask_secure_cloud.__all__
    assert (cls.Options.provider or cls.provider) == provider
    assert registry.options_class(provider) is cls.Options
    assert cls.Options in OPTION_CLASSES
    assert LIMITS[provider] is entry.user_data
    assert provider in CONFIG_SECTIONS  # its dask config section exists


def test_nothing_lists_a_provider_the_table_does_not():
    assert [c.provider for c in OPTION_CLASSES] == list(registry.PROVIDERS)
    assert set(LIMITS) == set(registry.PROVIDERS)
    assert set(CONFIG_SECTIONS) == set(registry.PROVIDERS)
    shown = CliRunner().invoke(main, ["config", "--help"]).output
    for provider in registry.PROVIDERS:
        assert provider in shown


def test_type_checkers_see_every_cluster_class():
    """``__init__`` imports the cluster classes for type checkers only (they are imported
    lazily at run time): those imports must name exactly the table's classes."""
    tree = ast.parse(Path(dask_secure_cloud.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If))
    named = {a.name for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}
    expected = {p.cluster_class for p in registry.PROVIDERS.values()}
    assert named - {"VMCluster", "ClusterCredentials"} == expected


#: The clouds whose driver prepares a cluster through the contract's template.
ON_THE_TEMPLATE = ["aws", "azure", "digitalocean", "gcp"]
STEPS = ("check_request", "read_exits", "decide_public", "make_network")


@pytest.mark.parametrize("provider", ON_THE_TEMPLATE)
def test_every_cloud_prepares_in_the_same_named_steps(provider):
    """One sequence, one shape: a driver fills in the steps, never the order (the
    read-only ones first, so a refusal leaves nothing behind)."""
    from dask_secure_cloud.driver import Driver

    package = importlib.import_module(registry.PROVIDERS[provider].module)
    (driver_class,) = [getattr(package, n) for n in package.__all__ if n.endswith("Driver")]
    assert driver_class.prepare is Driver.prepare
    for step in STEPS:
        assert getattr(driver_class, step) is not getattr(Driver, step), step
