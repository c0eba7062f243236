"""Every bad option value is refused with ``OptionError``, naming the option and the fix,
before anything exists: no driver, no VM, no cloud call.

One case per provider x option x bad value. The bad values are derived from each
option's declared JSON types (an int where a string goes, a string where a list goes, a
mapping with a non-string key or value, a negative number, ...) plus the values that
once slipped through (``env_vars={"A": 1}`` raised ``TypeError``).
"""

from __future__ import annotations

import math
import socket
from typing import Any

import dask.config
import pytest
from helpers import any_vm_processes

from dask_secure_cloud import AzureVMCluster, DropletCluster, EC2Cluster, GCPCluster, LocalVMCluster
from dask_secure_cloud.cluster import VMCluster
from dask_secure_cloud.errors import OptionError
from dask_secure_cloud.options import OPTION_CLASSES, specs

#: Loopback ports where nothing listens: were a value to slip through, no request could
#: leave this machine.
_NOWHERE = "http://127.0.0.1:9"

CLUSTERS: dict[str, tuple[type[VMCluster], dict[str, Any]]] = {
    "aws": (EC2Cluster, {"endpoint_url": _NOWHERE, "public_ip_url": _NOWHERE}),
    "gcp": (GCPCluster, {"project": "p", "api_endpoint": _NOWHERE, "public_ip_url": _NOWHERE}),
    "azure": (
        AzureVMCluster,
        {"resource_group": "rg", "resource_manager_url": _NOWHERE, "public_ip_url": _NOWHERE},
    ),
    "digitalocean": (
        DropletCluster,
        {"token": "t", "api_url": _NOWHERE, "public_ip_url": _NOWHERE},
    ),
    "local": (LocalVMCluster, {}),
}

#: Wrong values for an option of each declared JSON type (``None`` means "not given").
_BY_TYPE: dict[tuple[str, ...], list[tuple[str, Any]]] = {
    ("integer",): [("string", "2"), ("fraction", 1.5), ("negative", -1), ("bool", True)],
    ("number",): [("string", "1"), ("nan", math.nan), ("bool", True)],
    ("boolean",): [("string", "yes"), ("int", 1)],
    ("string",): [("int", 1), ("empty", ""), ("list", ["x"])],
    ("string", "null"): [("int", 1), ("empty", ""), ("list", ["x"])],
    ("string", "number"): [
        ("empty", ""),
        ("words", "soon"),
        ("negative", -5),
        ("zero", 0),
        ("bool", True),
        ("list", []),
        ("infinite", math.inf),
    ],
    ("array",): [("string", "x"), ("int-item", [1]), ("empty-item", [""]), ("dict", {"a": "b"})],
    ("array", "null"): [("string", "x"), ("int-item", [1]), ("dict", {"a": "b"})],
    ("object",): [
        ("list", ["a"]),
        ("int-key", {1: "a"}),
        ("none-value", {"a": None}),
        ("string", "a=b"),
    ],
}
_BY_TYPE[("string", "number", "null")] = _BY_TYPE[("string", "number")]
_BY_TYPE[("boolean", "null")] = _BY_TYPE[("boolean",)]
#: A duration that false turns off (idle_timeout): True is no duration.
_BY_TYPE[("string", "number", "boolean", "null")] = _BY_TYPE[("string", "number")]
#: A price that false turns off (max_hourly_cost): True is no price.
_BY_TYPE[("number", "boolean", "null")] = _BY_TYPE[("number",)]

#: Values a type's list would get wrong for one option (it accepts them), and values
#: only some options refuse.
_NOT_BAD = {
    ("ssh_keys", "int-item"),  # DigitalOcean key ids are numbers
    ("extra_bootstrap", "empty-item"),  # an empty shell line is a shell line
}
_SPECIFIC: dict[str, list[tuple[str, Any]]] = {
    "env_vars": [
        ("int-value", {"A": 1}),
        ("float-value", {"A": 1.5}),
        ("bad-name", {"A-B": "x"}),
        ("digit-name", {"1A": "x"}),
        ("nul-value", {"A": "x\0y"}),
    ],
    "worker_options": [("none-flag", {"nthreads": None}), ("dict-value", {"memory_limit": {}})],
    "scheduler_options": [
        ("list-of-dicts", {"preload": [{}]}),
        ("nan", {"idle_timeout": math.nan}),
    ],
    "scheduler_port": [("zero", 0), ("too-big", 65536)],
    "dashboard_port": [("zero", 0), ("too-big", 70000), ("same-as-scheduler", 8786)],
    "runtime": [("misspelt", "dockerr")],
    "ssh_keys": [("zero-id", [0]), ("bool-id", [True]), ("bytes", b"ab")],
    "region": [("not-a-region", "Frankfurt")],
    "tags": [("int-value", {"team": 1})],
    "address_prefix": [("not-a-network", "10.0.0.0/40")],
    "spot_max_price": [("negative", -2), ("zero", 0), ("infinite", math.inf)],
    "network_tags": [("uppercase", ["Bad Tag"])],
    "public_ip_url": [("no-scheme", "checkip.amazonaws.com")],
    "metadata_endpoint": [("no-scheme", "169.254.169.254")],
    "endpoint_url": [("no-scheme", "127.0.0.1:9")],
    "resource_manager_url": [("ftp", "ftp://127.0.0.1/")],
    "api_url": [("no-host", "https://")],
    "allowed_cidrs": [("not-a-cidr", ["10.0.0.0/33"])],
    "disk_size": [("too-small", 1)],
    "filesystem_size": [("too-small", 1)],
    "max_hourly_cost": [("zero", 0), ("negative", -1.5), ("text", "2 USD")],
    "requirements_file": [("missing", "/nonexistent/requirements.txt")],
}


def _cases() -> list[Any]:
    cases = []
    for options_class in OPTION_CLASSES:
        provider = options_class.provider
        for name, spec in specs(options_class):
            values = [v for v in _BY_TYPE[spec.types] if (name, v[0]) not in _NOT_BAD]
            values += _SPECIFIC.get(name, [])
            if spec.enum:
                values.append(("not-a-choice", "nope"))
            for label, value in values:
                # A provider-specific check may apply to another provider's same name.
                if name == "tags" and provider == "digitalocean" and label == "int-value":
                    value = [1]
                if name == "region" and provider != "aws" and label == "not-a-region":
                    continue
                cases.append(pytest.param(provider, name, value, id=f"{provider}-{name}-{label}"))
    return cases


@pytest.fixture
def nothing_is_made(monkeypatch):
    """Fail the test if a driver is made, a cluster starts, or a socket reaches past
    loopback: a refused value must be refused before any of that."""
    made: list[str] = []

    def no_driver(cls: type, *args: Any, **kwargs: Any) -> Any:
        made.append(f"{cls.__name__}.make_driver")
        raise AssertionError("a driver was made: the bad value got past the options")

    async def no_start(self: VMCluster) -> None:
        made.append("start")
        raise AssertionError("the cluster started: the bad value got past the options")

    for cluster_class, _ in CLUSTERS.values():
        if cluster_class is not LocalVMCluster:
            monkeypatch.setattr(cluster_class, "make_driver", classmethod(no_driver))
    monkeypatch.setattr(VMCluster, "_start", no_start)

    connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else ""
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not (
            host.startswith("127.") or host == "::1"
        ):
            made.append(f"connect {address}")
            raise AssertionError(f"a connection to {address} was attempted")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    return made


@pytest.mark.parametrize(("provider", "name", "value"), _cases())
def test_bad_value_is_an_option_error(provider, name, value, nothing_is_made, vm_dir):
    cluster_class, base = CLUSTERS[provider]
    keywords = {**base, name: value}
    if provider == "local" and name != "directory":
        keywords["directory"] = str(vm_dir)
    with pytest.raises(OptionError) as info:
        cluster_class(**keywords)
    assert name in str(info.value), f"the error does not name {name}: {info.value}"
    assert not isinstance(info.value, TypeError) or "has no option" in str(info.value)
    assert nothing_is_made == []
    if provider == "local":
        assert list(vm_dir.iterdir()) == [] and any_vm_processes(vm_dir) == []


def test_env_vars_number_names_the_fix(nothing_is_made, vm_dir):
    """The value from the issue: the message says what to write instead."""
    with pytest.raises(OptionError, match=r"env_vars: A must be a string.*\{'A': '1'\}"):
        LocalVMCluster(env_vars={"A": 1}, directory=str(vm_dir))
    assert list(vm_dir.iterdir()) == []


def test_bad_value_from_dask_config_names_the_key(nothing_is_made, vm_dir):
    """A value from the dask config is checked as a keyword is, and the error names the
    config key to fix."""
    with dask.config.set({"secure-cloud.env-vars": {"A": 1}}):
        with pytest.raises(OptionError, match=r"env_vars \(dask config secure-cloud\.env-vars\)"):
            LocalVMCluster(directory=str(vm_dir))
    assert list(vm_dir.iterdir()) == []


def test_every_option_has_cases():
    """A new option gets bad values here by its declared type, so none goes untested."""
    covered = {(p.values[0], p.values[1]) for p in _cases()}
    for options_class in OPTION_CLASSES:
        for name, _ in specs(options_class):
            assert (options_class.provider, name) in covered, name
