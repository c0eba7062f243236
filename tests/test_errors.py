"""Every error the package raises on purpose can be caught as one type, and keeps the
builtin type it always had."""

from __future__ import annotations

import pytest

import dask_secure_cloud as dsc
from dask_secure_cloud.cluster import delete_cluster
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.driver import VM, Driver, VMRequest


def test_every_exported_error_is_a_secure_cloud_error():
    errors = {name: getattr(dsc, name) for name in dsc.__all__ if name.endswith("Error")}
    assert {"ResourcesLeftError", "ClusterStartError", "OptionError", "CloudError"} <= set(errors)
    assert all(issubclass(e, dsc.SecureCloudError) for e in errors.values())
    assert issubclass(dsc.OptionError, ValueError)
    assert issubclass(dsc.ClusterStartError, RuntimeError)


def test_a_refused_option_names_itself_and_is_a_secure_cloud_error():
    with pytest.raises(dsc.SecureCloudError, match="n_workers must be a whole number") as info:
        dsc.LocalVMCluster(n_workers=-1)
    assert isinstance(info.value, ValueError)  # what callers caught before


class _Undeletable(Driver):
    """A cloud that accepts every delete and deletes nothing."""

    provider = "test"
    vm = VM("i-1", "worker-0", Role.WORKER, "dsc-left", "10.0.0.5")

    async def create(self, request: VMRequest) -> VM:
        raise NotImplementedError

    async def destroy(self, vm: VM) -> None:
        pass

    async def list(self, cluster_id: str) -> list[VM]:
        return [self.vm]


async def test_what_close_could_not_delete_is_a_resources_left_error_naming_it():
    with pytest.raises(dsc.ResourcesLeftError, match="worker-0") as info:
        await delete_cluster(_Undeletable(), "dsc-left")
    assert isinstance(info.value, dsc.SecureCloudError)
