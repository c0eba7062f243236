"""One table names every provider; everything that lists providers reads it."""

from __future__ import annotations

import ast
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
