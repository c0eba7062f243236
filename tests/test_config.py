"""The dask config: one resolution rule, a schema, and clear errors, for every provider."""

from __future__ import annotations

import os

import dask.config
import pytest
import yaml

from dask_secure_cloud import config
from dask_secure_cloud.cli import CLUSTER_CLASSES, _cluster_class
from dask_secure_cloud.cluster import option_names, preview
from dask_secure_cloud.config import ConfigError

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


@pytest.mark.parametrize("provider", sorted(CLUSTER_CLASSES))
def test_keyword_beats_config_beats_default_for_every_provider(provider, monkeypatch):
    name, from_config, from_keyword, _ = PROBE[provider]
    cls = _cluster_class(provider)
    key = f"secure-cloud.{provider}.{name.replace('_', '-')}"
    default = config.option(provider, name)
    assert default not in (from_config, from_keyword)
    with dask.config.set({key: from_config}):
        assert config.option(provider, name) == from_config
        assert config.option(provider, name, from_keyword) == from_keyword
        if provider != "local":
            assert _worker_setting(provider, preview(cls, **REQUIRED[provider])) == from_config
            shown = preview(cls, **REQUIRED[provider], **{name: from_keyword})
            assert _worker_setting(provider, shown) == from_keyword
    assert config.option(provider, name) == default


@pytest.mark.parametrize("provider", sorted(CLUSTER_CLASSES))
def test_environment_variables_override_for_every_provider(provider, monkeypatch):
    name, from_config, _, _ = PROBE[provider]
    variable = f"DASK_SECURE_CLOUD__{provider.upper()}__{name.upper()}"
    monkeypatch.setenv(variable, from_config)
    dask.config.refresh()
    try:
        assert config.option(provider, name) == from_config
        rows = {r.name: r for r in config.explain(provider, option_names(_cluster_class(provider)))}
        assert rows[name].value == from_config
        assert rows[name].source == f"environment {variable}"
        if provider != "local":
            shown = preview(_cluster_class(provider), **REQUIRED[provider])
            assert _worker_setting(provider, shown) == from_config
    finally:
        monkeypatch.delenv(variable)
        dask.config.refresh()


@pytest.mark.parametrize("provider", sorted(CLUSTER_CLASSES))
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
            config.check_provider_keys(provider, option_names(_cluster_class(provider)))


def test_schema_covers_every_default_and_every_option():
    """The defaults, the schema and the cluster classes' signatures agree, key for key."""
    with open(os.path.join(os.path.dirname(config.__file__), "secure-cloud.yaml")) as f:
        defaults = yaml.safe_load(f)["secure-cloud"]
    shared = config.schema_for(None)
    assert {k for k, v in defaults.items() if k not in config.PROVIDERS} == set(shared)
    for provider in config.PROVIDERS:
        own = set(config.schema_for(provider)) - set(shared)
        assert set(defaults[provider]) - set(shared) == own, provider
        options = {n.replace("_", "-") for n in option_names(_cluster_class(provider))}
        assert options <= set(config.schema_for(provider)), options - set(
            config.schema_for(provider)
        )
    # Every default value is valid under its own schema.
    for provider in config.PROVIDERS:
        config.check_provider_keys(provider, option_names(_cluster_class(provider)))


def test_loading_the_package_writes_nothing_to_home(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("HOME", str(tmp_path))
    subprocess.run(
        [sys.executable, "-c", "import dask_secure_cloud, dask; dask.config.get('secure-cloud')"],
        check=True,
    )
    assert list(tmp_path.iterdir()) == []
