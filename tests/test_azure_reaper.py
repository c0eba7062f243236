"""The Azure scheduler's own identity, which deletes the cluster when its lease ends, and
the user's identity on every VM (``user_assigned_identity``).

The scheduler's identity is made for the cluster, attached to the scheduler VM alone,
and given Contributor on each of the cluster's VMs, NICs, OS disks and public addresses,
and nowhere else: ARM (the stand-in holds every request to the role assignments of the
token's identity) refuses it anything beyond them. What a killed client leaves with it is
in ``test_killed_client.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from distributed import Client
from helpers import decoded_files, vm_processes

from dask_secure_cloud import AzureVMCluster
from dask_secure_cloud.cluster import ClusterStartError, delete_cluster, preview
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.driver import VMRequest
from dask_secure_cloud.errors import OptionError

from clouds.arm import AzureStandIn
from clouds.naming import RUNS
from standins import SECRET, SUBSCRIPTION

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

GROUP = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/dask-rg"


def vm_bodies(stand_in: AzureStandIn) -> list[dict[str, Any]]:
    """The VM create requests ARM received."""
    return [body for kind, body in stand_in.bodies if kind == "virtualmachines"]


def others_assignments(stand_in: AzureStandIn) -> list[dict[str, Any]]:
    return [
        a
        for a in stand_in.assignments.values()
        if a["properties"]["principalId"] != stand_in.caller
    ]


def arm(
    stand_in: AzureStandIn, method: str, path: str, token: str, body: Any = None
) -> tuple[int, str]:
    """One request to the stand-in's ARM with ``token``: (status, error code or "")."""
    context = ssl.create_default_context(cadata=stand_in.ca.cert_pem.bytes().decode())
    request = urllib.request.Request(
        f"{stand_in.url}{path}{'&' if '?' in path else '?'}api-version=2024-07-01",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, ""
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}").get("error", {}).get("code", "")


def vm_of(stand_in: AzureStandIn, name: str) -> dict[str, Any]:
    (vm,) = [v for v in stand_in.of_kind("virtualmachines") if v["name"] == name]
    return vm


def token_of(stand_in: AzureStandIn, vm_name: str, client_id: str | None, resource: str) -> Any:
    """What the metadata service answers the VM ``vm_name`` asking for a token."""
    query = {"api-version": "2018-02-01", "resource": resource}
    if client_id:
        query["client_id"] = client_id
    return stand_in.identity_token(vm_of(stand_in, vm_name), query)


# -- who may have it --------------------------------------------------------------------


async def test_a_caller_who_may_not_assign_roles_is_refused_before_anything(azure):
    """``delete_on_lease_end=True`` with an identity that lacks
    ``roleAssignments/write`` (Contributor, the usual role): refused, naming the option
    and the fix, and nothing was made."""
    stand_in, options = azure
    stand_in.set_caller_role("Contributor")
    with pytest.raises(ClusterStartError, match="delete_on_lease_end") as raised:
        await AzureVMCluster(n_workers=1, delete_on_lease_end=True, asynchronous=True, **options)
    message = str(raised.value)
    assert "Microsoft.Authorization/roleAssignments/write" in message
    assert "delete_on_lease_end=False" in message and "Nothing was created" in message
    assert isinstance(raised.value.__cause__, OptionError)
    assert not [c for c in stand_in.calls if c.startswith(("PUT", "PATCH", "DELETE"))]
    assert stand_in.resources == {} and stand_in.booter.vms == {}


async def test_by_default_a_caller_who_may_not_assign_roles_is_warned_and_vms_only_stop(
    azure, caplog
):
    """The default (``None``) starts without the scheduler's identity, and says what a
    killed client then leaves and how to have it: no silent difference."""
    stand_in, options = azure
    stand_in.set_caller_role("Contributor")
    with caplog.at_level(logging.WARNING, logger="dask_secure_cloud.providers.azure"):
        async with AzureVMCluster(n_workers=1, asynchronous=True, **options) as cluster:
            cluster_id = cluster.cluster_id
            assert stand_in.of_kind("userassignedidentities") == []
            leases = []
            for body in vm_bodies(stand_in):
                assert "identity" not in body
                user_data = base64.b64decode(body["properties"]["osProfile"]["customData"])
                files = decoded_files(user_data)
                leases += [v for k, v in files.items() if k.endswith("lease.py")]
            # The scheduler's lease only closes it: nothing there could delete a VM.
            (lease,) = leases
            assert b"on_expiry" not in lease and b"oauth2/token" not in lease
    (warning,) = [r.getMessage() for r in caplog.records if "delete_on_lease_end" in r.getMessage()]
    assert "Microsoft.Authorization/roleAssignments/write" in warning
    assert "stop" in warning and "cleanup" in warning and "delete_on_lease_end=False" in warning
    assert not [c for c in stand_in.calls if "roleAssignments" in c]
    assert not stand_in.tagged(cluster_id) and not others_assignments(stand_in)


async def test_the_identity_and_its_roles_are_made_with_the_cluster_and_deleted_with_it(azure):
    """The scheduler VM carries the cluster's identity (workers do not); it holds
    Contributor on exactly the VMs, NICs, disks and addresses the cluster made; and
    close() deletes the identity and every one of its role assignments."""
    stand_in, options = azure
    async with AzureVMCluster(n_workers=2, asynchronous=True, **options) as cluster:
        cluster_id = cluster.cluster_id
        (identity,) = stand_in.of_kind("userassignedidentities")
        assert identity["tags"]["dask-secure-cloud-cluster"] == cluster_id
        carried = {
            body["tags"]["dask-secure-cloud-role"]: list(
                (body.get("identity") or {}).get("userAssignedIdentities") or []
            )
            for body in vm_bodies(stand_in)
        }
        assert carried == {"scheduler": [identity["id"]], "worker": []}
        principal = identity["properties"]["principalId"]
        scopes = sorted(
            a["properties"]["scope"].lower()
            for a in stand_in.assignments.values()
            if a["properties"]["principalId"] == principal
        )
        made = sorted(
            r["id"].lower()
            for r in stand_in.resources.values()
            if r["_kind"] in ("virtualmachines", "networkinterfaces", "disks", "publicipaddresses")
        )
        assert scopes == made and len(made) == 3 * 3 + 1  # 3 VMs, NIC and disk each; 1 IP
        assert {
            a["properties"]["roleDefinitionId"].rsplit("/", 1)[-1]
            for a in stand_in.assignments.values()
            if a["properties"]["principalId"] == principal
        } == {"b24988ac-6180-42a0-ab88-20f7382dd24c"}
        cluster.scale(1)
        await cluster._correct_state()
        # A deleted worker's role assignments go with it.
        assert len(others_assignments(stand_in)) == 4 + 3  # the scheduler, one worker
    assert not stand_in.tagged(cluster_id) and not others_assignments(stand_in)
    assert stand_in.resources == {} and not vm_processes(cluster_id)


# -- what the identity cannot do --------------------------------------------------------


@pytest.fixture
def made(azure) -> Iterator[tuple[AzureStandIn, dict[str, Any]]]:
    """A cluster's scheduler and worker VMs (with the user's identity too), and a VM of
    another cluster in the same resource group; torn down after."""
    stand_in, options = azure
    user = stand_in.add_identity("team-data")
    options = {**options, "user_assigned_identity": user["id"]}

    async def make() -> None:
        for cluster_id, flag in (("dsc-attacked0", None), ("dsc-bystander", False)):
            driver = preview(AzureVMCluster, **options, delete_on_lease_end=flag).driver
            try:
                await driver.prepare(cluster_id)
                for name, role in (("scheduler", Role.SCHEDULER), ("worker-0", Role.WORKER)):
                    await driver.create(VMRequest(cluster_id, name, role, RUNS))
            finally:
                await driver.close()

    async def unmake() -> None:
        driver = preview(AzureVMCluster, **options).driver
        try:
            await driver.clusters()  # as cleanup does: finds the subscription
            for cluster_id in ("dsc-attacked0", "dsc-bystander"):
                await delete_cluster(driver, cluster_id)
        finally:
            await driver.close()

    asyncio.run(make())
    (identity,) = [
        i for i in stand_in.of_kind("userassignedidentities") if i["name"].startswith("dsc-")
    ]
    yield stand_in, {"user": user, "reaper": identity}
    asyncio.run(unmake())
    assert not stand_in.tagged("dsc-attacked0"), stand_in.tagged("dsc-attacked0")
    assert not others_assignments(stand_in)


def schedulers_token(stand_in: AzureStandIn, identities: dict[str, Any]) -> str:
    status, answer = token_of(
        stand_in,
        "dsc-attacked0-scheduler",
        identities["reaper"]["properties"]["clientId"],
        stand_in.url + "/",
    )
    assert status == 200, answer
    return str(answer["access_token"])


def _delete_a_vm_of_another_cluster(stand_in: AzureStandIn, identities: dict) -> tuple[int, str]:
    path = f"{GROUP}/providers/Microsoft.Compute/virtualMachines/dsc-bystander-worker-0"
    return arm(stand_in, "DELETE", path, schedulers_token(stand_in, identities))


def _delete_the_resource_group(stand_in: AzureStandIn, identities: dict) -> tuple[int, str]:
    return arm(stand_in, "DELETE", GROUP, schedulers_token(stand_in, identities))


def _delete_the_clusters_own_network(stand_in: AzureStandIn, identities: dict) -> tuple[int, str]:
    path = f"{GROUP}/providers/Microsoft.Network/virtualNetworks/dsc-attacked0-vnet"
    return arm(stand_in, "DELETE", path, schedulers_token(stand_in, identities))


def _delete_the_users_identity(stand_in: AzureStandIn, identities: dict) -> tuple[int, str]:
    return arm(stand_in, "DELETE", identities["user"]["id"], schedulers_token(stand_in, identities))


def _give_itself_a_role_on_the_group(stand_in: AzureStandIn, identities: dict) -> tuple[int, str]:
    owner = "8e3af657-a8ff-443c-a75c-2fe8c4bcb635"
    body = {
        "properties": {
            "roleDefinitionId": f"/subscriptions/{SUBSCRIPTION}/providers/"
            f"Microsoft.Authorization/roleDefinitions/{owner}",
            "principalId": identities["reaper"]["properties"]["principalId"],
        }
    }
    name = "0b9d2c59-7b8e-4b43-9c67-1c0e0f6a1d11"
    path = f"{GROUP}/providers/Microsoft.Authorization/roleAssignments/{name}"
    return arm(stand_in, "PUT", path, schedulers_token(stand_in, identities), body)


def _attach_its_identity_to_another_vm(stand_in: AzureStandIn, identities: dict) -> tuple[int, str]:
    """Rewrite the other cluster's VM to carry the scheduler's identity."""
    vm = vm_of(stand_in, "dsc-bystander-worker-0")
    body = {
        "location": vm["location"],
        "identity": {
            "type": "UserAssigned",
            "userAssignedIdentities": {identities["reaper"]["id"]: {}},
        },
    }
    return arm(stand_in, "PUT", vm["id"], schedulers_token(stand_in, identities), body)


def _a_worker_asks_for_the_schedulers_identity(
    stand_in: AzureStandIn, identities: dict
) -> tuple[int, str]:
    status, answer = token_of(
        stand_in,
        "dsc-attacked0-worker-0",
        identities["reaper"]["properties"]["clientId"],
        stand_in.url + "/",
    )
    return status, answer.get("error_description", "")


def _a_workers_own_identity_deletes_the_scheduler(
    stand_in: AzureStandIn, identities: dict
) -> tuple[int, str]:
    status, answer = token_of(
        stand_in,
        "dsc-attacked0-worker-0",
        identities["user"]["properties"]["clientId"],
        stand_in.url + "/",
    )
    assert status == 200, answer
    path = f"{GROUP}/providers/Microsoft.Compute/virtualMachines/dsc-attacked0-scheduler"
    return arm(stand_in, "DELETE", path, answer["access_token"])


def _a_storage_token_used_at_resource_manager(
    stand_in: AzureStandIn, identities: dict
) -> tuple[int, str]:
    status, answer = token_of(
        stand_in,
        "dsc-attacked0-scheduler",
        identities["reaper"]["properties"]["clientId"],
        "https://storage.azure.com/",
    )
    assert status == 200, answer
    path = f"{GROUP}/providers/Microsoft.Compute/virtualMachines/dsc-attacked0-worker-0"
    return arm(stand_in, "DELETE", path, answer["access_token"])


ATTACKS: dict[str, tuple[Callable[[AzureStandIn, dict], tuple[int, str]], int, str]] = {
    "delete a VM of another cluster in the same group": (
        _delete_a_vm_of_another_cluster,
        403,
        "AuthorizationFailed",
    ),
    "delete the resource group": (_delete_the_resource_group, 403, "AuthorizationFailed"),
    "delete the cluster's network": (_delete_the_clusters_own_network, 403, "AuthorizationFailed"),
    "delete the user's identity": (_delete_the_users_identity, 403, "AuthorizationFailed"),
    "give itself Owner on the group": (
        _give_itself_a_role_on_the_group,
        403,
        "AuthorizationFailed",
    ),
    "attach its identity to another VM": (
        _attach_its_identity_to_another_vm,
        403,
        "AuthorizationFailed",
    ),
    "a worker asks for the scheduler's identity": (
        _a_worker_asks_for_the_schedulers_identity,
        400,
        "Identity not found",
    ),
    "a worker's own identity deletes the scheduler": (
        _a_workers_own_identity_deletes_the_scheduler,
        403,
        "AuthorizationFailed",
    ),
    "a storage token used at Resource Manager": (
        _a_storage_token_used_at_resource_manager,
        401,
        "InvalidAuthenticationTokenAudience",
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_the_schedulers_identity_cannot_reach_beyond_the_cluster(made, attack):
    stand_in, identities = made
    before = {key: dict(value) for key, value in stand_in.resources.items()}
    assignments = dict(stand_in.assignments)
    run, status, code = ATTACKS[attack]
    assert run(stand_in, identities) == (status, code)
    assert stand_in.resources.keys() == before.keys()
    assert stand_in.assignments == assignments


def test_the_schedulers_identity_deletes_a_worker_and_what_goes_with_it(made):
    """The other side of the attacks above: on what the cluster made, the same token
    works, and the worker's NIC and disk go with its VM (``deleteOption=Delete``)."""
    stand_in, identities = made
    path = f"{GROUP}/providers/Microsoft.Compute/virtualMachines/dsc-attacked0-worker-0"
    assert arm(stand_in, "DELETE", path, schedulers_token(stand_in, identities)) == (202, "")
    left = [r["name"] for r in stand_in.resources.values() if "attacked0-worker-0" in r["name"]]
    assert left == []
    assert not vm_processes("dsc-attacked0/worker-0")


# -- the user's identity ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "team-data",  # a name
        "6f1c9e0a-3b1d-4c1e-9a55-0c4f2f2b9e11",  # a client or principal id
        f"{GROUP}/providers/Microsoft.Storage/storageAccounts/teamdata",
        f"{GROUP}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/",
    ],
)
def test_user_assigned_identity_must_be_an_identitys_resource_id(azure, value):
    _, options = azure
    with pytest.raises(OptionError, match="user_assigned_identity") as raised:
        preview(AzureVMCluster, **options, user_assigned_identity=value)
    assert "az identity show" in str(raised.value)


async def test_a_vm_whose_identity_does_not_exist_is_refused_as_arm_refuses_it(azure):
    stand_in, options = azure
    missing = f"{GROUP}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/gone"
    with pytest.raises(ClusterStartError, match="FailedIdentityOperation"):
        await AzureVMCluster(
            n_workers=1, user_assigned_identity=missing, asynchronous=True, **options
        )
    assert stand_in.resources == {} and stand_in.booter.vms == {}
    assert not others_assignments(stand_in)


async def test_workers_read_storage_as_the_users_identity_with_no_secret_shipped(azure):
    """``user_assigned_identity`` is on every VM; code on a worker gets a token for it
    from the metadata service, with nothing secret in user-data or ``env_vars``. The
    scheduler carries it beside the cluster's own identity, so code there names the one
    it wants (the metadata service refuses to guess, as Azure's does)."""
    stand_in, options = azure
    user = stand_in.add_identity("team-data")
    metadata = stand_in.metadata()

    # Defined here, so that Dask ships it by value to VMs that have no tests module.
    def fetch_token(metadata: str, resource: str, client_id: str | None = None) -> dict[str, Any]:
        """What code on a VM does to read Blob storage as the VM's identity."""
        query = {"api-version": "2018-02-01", "resource": resource}
        if client_id:
            query["client_id"] = client_id
        request = urllib.request.Request(
            f"{metadata}/metadata/identity/oauth2/token?{urllib.parse.urlencode(query)}",
            headers={"Metadata": "true"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as e:
            return {"status": e.code, **json.loads(e.read())}

    storage = "https://storage.azure.com/"
    async with AzureVMCluster(
        n_workers=1,
        user_assigned_identity=user["id"],
        metadata_endpoint=metadata,
        env_vars={"TEAM": "ml"},
        asynchronous=True,
        **options,
    ) as cluster:
        cluster_id = cluster.cluster_id
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=60)
            answers = await client.run(fetch_token, metadata, storage)
            (answer,) = answers.values()
            assert answer["client_id"] == user["properties"]["clientId"], answer
            assert answer["resource"] == storage and answer["access_token"]
            on_scheduler = await client.run_on_scheduler(fetch_token, metadata, storage)
            assert on_scheduler["status"] == 400, on_scheduler  # two identities: name one
            named = await client.run_on_scheduler(
                fetch_token, metadata, storage, user["properties"]["clientId"]
            )
            assert named["client_id"] == user["properties"]["clientId"]
        served = {
            (t["vm"], t["client_id"], t["resource"]) for t in stand_in.identity_tokens.values()
        }
        assert (f"{cluster_id}-worker-0", user["properties"]["clientId"], storage) in served
        (reaper,) = [i for i in stand_in.of_kind("userassignedidentities") if i is not user]
        for body in vm_bodies(stand_in):
            identities = set(body["identity"]["userAssignedIdentities"])
            role = body["tags"]["dask-secure-cloud-role"]
            expected = {user["id"], reaper["id"]} if role == "scheduler" else {user["id"]}
            assert identities == expected, role
            user_data = base64.b64decode(body["properties"]["osProfile"]["customData"])
            for secret in (SECRET, stand_in.token, *stand_in.identity_tokens):
                assert secret.encode() not in user_data
    assert not stand_in.tagged(cluster_id) and not others_assignments(stand_in)
    assert [i["id"] for i in stand_in.of_kind("userassignedidentities")] == [user["id"]]


async def test_an_identity_not_yet_known_to_entra_id_is_waited_for(azure):
    """Right after it is made, an identity may not have replicated: ARM answers
    ``PrincipalNotFound`` to a role assignment for it, and the start waits it out."""
    stand_in, options = azure
    stand_in.fail("PUT roleAssignments", 400, "PrincipalNotFound")
    stand_in.fail("PUT roleAssignments", 400, "PrincipalNotFound", occurrence=2)
    async with AzureVMCluster(n_workers=0, asynchronous=True, **options) as cluster:
        cluster_id = cluster.cluster_id
        assert len(others_assignments(stand_in)) == 4  # the scheduler's VM, NIC, disk, IP
    assert stand_in.calls.count("PUT roleAssignments") == 4 + 2
    assert not stand_in.tagged(cluster_id) and not others_assignments(stand_in)
