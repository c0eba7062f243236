"""The dask config: one resolution rule, a schema, and clear errors, for every provider."""

from __future__ import annotations

import os

import dask.config
import pytest

from dask_secure_cloud import config
from dask_secure_cloud.cluster import preview
from dask_secure_cloud.config import ConfigError
from dask_secure_cloud.errors import OptionError
from dask_secure_cloud.options import OPTION_CLASSES, defaults_yaml, resolve, schema_yaml, specs
from dask_secure_cloud.registry import PROVIDERS
from dask_secure_cloud.registry import cluster_class as _cluster_class

#: Enough for each provider's class to be built offline (a preview starts nothing).
REQUIRED = {
    "local": {},
    "aws": {},
    "gcp": {"project": "demo-project"},
    "azure": {"resource_group": "dask-rg", "subscription_id": "sub"},
    "digitalocean": {"token": "dop_v1_x"},
}
#: provider -> (option, config value, keyword value, how to read it off the driver)
PROBE = {
    "local": ("boot_timeout", "45s", "50s", None),
    "aws": ("worker_instance_type", "c6i.large", "r6i.large", "instance_types"),
    "gcp": ("worker_machine_type", "n2-standard-8", "c3-standard-4", "machine_types"),
    "azure": ("worker_vm_size", "Standard_E4s_v5", "Standard_F4s_v2", "vm_sizes"),
    "digitalocean": ("worker_size", "c-4", "m-2vcpu-16gb", "sizes"),
}


def _options_class(provider):
    return next(c for c in OPTION_CLASSES if c.provider == provider)


def _names(provider):
    return [name for name, _ in specs(_options_class(provider))]


def _resolved(provider, name, keyword=None):
    """An option's value as a cluster of ``provider`` resolves it (given as configured)."""
    value = getattr(resolve(_options_class(provider), {name: keyword} if keyword else {}), name)
    return str(int(value.total_seconds())) + "s" if hasattr(value, "total_seconds") else value


def _worker_setting(provider, shown):
    from dask_secure_cloud.credentials import Role

    _, _, _, attribute = PROBE[provider]
    if attribute is None:  # LocalVMCluster: read it back from the config of the class
        return None
    return getattr(shown.driver, attribute)[Role.WORKER]


@pytest.fixture(autouse=True)
def _offline_gcp(monkeypatch):
    """google-auth finds no credentials here; give the class a fake one so it can be built."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials

    monkeypatch.setattr(
        google.auth, "default", lambda *a, **k: (AnonymousCredentials(), "demo-project")
    )


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_keyword_beats_config_beats_default_for_every_provider(provider, monkeypatch):
    name, from_config, from_keyword, _ = PROBE[provider]
    cls = _cluster_class(provider)
    key = f"secure-cloud.{provider}.{name.replace('_', '-')}"
    default = _resolved(provider, name)
    assert default not in (from_config, from_keyword)
    with dask.config.set({key: from_config}):
        assert _resolved(provider, name) == from_config
        assert _resolved(provider, name, from_keyword) == from_keyword
        if provider != "local":
            assert _worker_setting(provider, preview(cls, **REQUIRED[provider])) == from_config
            shown = preview(cls, **REQUIRED[provider], **{name: from_keyword})
            assert _worker_setting(provider, shown) == from_keyword
    assert _resolved(provider, name) == default


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_environment_variables_override_for_every_provider(provider, monkeypatch):
    name, from_config, _, _ = PROBE[provider]
    variable = f"DASK_SECURE_CLOUD__{provider.upper()}__{name.upper()}"
    monkeypatch.setenv(variable, from_config)
    dask.config.refresh()
    try:
        assert _resolved(provider, name) == from_config
        rows = {r.name: r for r in config.explain(provider, _names(provider))}
        assert rows[name].value == from_config
        assert rows[name].source == f"environment {variable}"
        if provider != "local":
            shown = preview(_cluster_class(provider), **REQUIRED[provider])
            assert _worker_setting(provider, shown) == from_config
    finally:
        monkeypatch.delenv(variable)
        dask.config.refresh()


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_misspelled_key_fails_with_a_suggestion_for_every_provider(provider):
    name = PROBE[provider][0]
    typo = name.replace("_", "-")[:-1] + "x"
    cls = _cluster_class(provider)
    with dask.config.set({f"secure-cloud.{provider}.{typo}": "x"}):
        with pytest.raises(
            ConfigError, match=f"Did you mean secure-cloud.{provider}.{name.replace('_', '-')}"
        ):
            preview(cls, **REQUIRED[provider])


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("secure-cloud.n-workers", "two", "must be integer"),
        ("secure-cloud.aws.worker-spot", "yes", "must be boolean"),
        ("secure-cloud.runtime", "podman", "must be docker or native"),
        ("secure-cloud.azure.tags", ["a"], "must be object"),
    ],
)
def test_wrong_type_names_the_key(key, value, match):
    provider = key.split(".")[1] if key.count(".") == 2 else "local"
    with dask.config.set({key: value}):
        with pytest.raises(ConfigError, match=f"{key}.*{match}"):
            config.check_provider_keys(provider, _names(provider))


def test_the_shipped_config_files_are_the_ones_the_options_classes_write():
    """secure-cloud.yaml and its schema are written from the options classes
    (``python -m dask_secure_cloud.options``); a field added without rewriting them fails
    here, naming the command."""
    here = os.path.dirname(config.__file__)
    for name, text in (
        ("secure-cloud.yaml", defaults_yaml()),
        ("secure-cloud-schema.yaml", schema_yaml()),
    ):
        with open(os.path.join(here, name)) as f:
            assert f.read() == text, f"{name} is stale: run python -m dask_secure_cloud.options"
    # Every default value is valid under its own schema and its own check.
    for provider in config.PROVIDERS:
        config.check_provider_keys(provider, _names(provider))
        resolve(_options_class(provider), {"resource_group": "rg"} if provider == "azure" else {})


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_a_misspelled_keyword_is_refused_with_the_real_name(provider):
    cls = _cluster_class(provider)
    name = PROBE[provider][0]
    with pytest.raises(OptionError, match=f"no option '{name[:-1]}x'. Did you mean '{name}'"):
        preview(cls, **REQUIRED[provider], **{name[:-1] + "x": "x"})


def test_one_check_for_keywords_and_config_naming_where_the_value_came_from():
    cls = _options_class("aws")
    with pytest.raises(OptionError, match=r"^boot_timeout must be a duration"):
        resolve(cls, {"boot_timeout": "soon"})
    with dask.config.set({"secure-cloud.aws.boot-timeout": "soon"}):
        with pytest.raises(
            OptionError, match=r"boot_timeout \(dask config secure-cloud.aws.boot-timeout\)"
        ):
            resolve(cls, {})
    with pytest.raises(OptionError, match="filesystem_size must be a whole number of GiB >= 8"):
        resolve(cls, {"filesystem_size": 4})
    assert resolve(cls, {"boot_timeout": 90}).boot_timeout.total_seconds() == 90


def test_loading_the_package_writes_nothing_to_home(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("HOME", str(tmp_path))
    subprocess.run(
        [sys.executable, "-c", "import dask_secure_cloud, dask; dask.config.get('secure-cloud')"],
        check=True,
    )
    assert list(tmp_path.iterdir()) == []
