import gzip
import os
import shlex
import shutil
import subprocess
import sys

import dask
import pytest
from cryptography.hazmat.primitives import serialization
from helpers import decoded_files

from dask_secure_cloud.cloudinit import (
    LIMITS,
    BootPlan,
    DockerRuntime,
    NativeRuntime,
    UserDataTooLarge,
    parse,
    render,
)
from dask_secure_cloud.cluster import default_docker_image, shippable_config
from dask_secure_cloud.credentials import ClusterCredentials, Role

CREDS = ClusterCredentials("c1")
RUNTIMES = {"docker": DockerRuntime(default_docker_image()), "native": NativeRuntime()}


def plan(role=Role.WORKER, tls=True, runtime="docker", **kwargs):
    command = (
        ("worker", "tls://10.0.0.1:8786", "--name", "w-0")
        if role is Role.WORKER
        else ("scheduler", "--port", "8786")
    )
    return BootPlan(
        cluster_id="c1",
        role=role,
        name="w-0" if role is Role.WORKER else "scheduler",
        command=command,
        runtime=RUNTIMES[runtime],
        tls=CREDS.issue(role, "w-0") if tls else None,
        dashboard_port=8787 if role is Role.SCHEDULER else None,
        **kwargs,
    )


VARIANTS = [
    pytest.param(
        role,
        tls,
        runtime,
        env,
        id=f"{role.value}-{'tls' if tls else 'tcp'}-{runtime}-{'env' if env else 'noenv'}",
    )
    for role in (Role.SCHEDULER, Role.WORKER)
    for tls in (True, False)
    for runtime in ("docker", "native")
    for env in (True, False)
]


@pytest.fixture(scope="session")
def cloud_init():
    path = shutil.which("cloud-init")
    if path is None:
        pytest.fail("cloud-init is not installed: run the test command from README.md")
    return path


@pytest.mark.parametrize("role,tls,runtime,env", VARIANTS)
def test_every_variant_passes_cloud_init_schema(tmp_path, cloud_init, role, tls, runtime, env):
    user_data = render(
        plan(
            role,
            tls,
            runtime,
            env={"A": "x y", "B": "1"} if env else {},
            extra_bootstrap=("echo hello",),
            dask_config={"distributed": {"scheduler": {"idle-timeout": "1h"}}},
        ),
        LIMITS["aws"],
    )
    # EC2 gets it gzipped; cloud-init inflates user-data before it reads it (its
    # ``schema`` command does not, so inflate it here as cloud-init would).
    assert user_data[:2] == b"\x1f\x8b"
    path = tmp_path / "user-data"
    path.write_bytes(gzip.decompress(user_data))
    result = subprocess.run(
        [cloud_init, "schema", "--config-file", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_cloud_init_schema_rejects_what_it_should(tmp_path, cloud_init):
    """The positive test above only means something if the validator can say no."""
    path = tmp_path / "user-data"
    path.write_text("#cloud-config\nwrite_files:\n- content: x\n  permissions: 384\n")
    result = subprocess.run([cloud_init, "schema", "--config-file", str(path)], capture_output=True)
    assert result.returncode != 0


def test_keys_go_to_0600_files_and_never_to_a_command_line():
    user_data = render(plan(env={"TOKEN": "s3cr3t"}))
    document = parse(user_data)
    files = decoded_files(user_data)
    key_files = [p for p, data in files.items() if b"PRIVATE KEY" in data]
    assert key_files == ["/opt/dask-secure-cloud/tls/node.key"]
    modes = {f["path"]: f["permissions"] for f in document["write_files"]}
    assert all(mode == "0600" for path, mode in modes.items() if not path.endswith("boot.sh"))
    assert all(path.startswith("/opt/dask-secure-cloud/") for path in modes)
    runcmd = " ".join(map(str, document["runcmd"]))
    boot = files["/opt/dask-secure-cloud/boot.sh"].decode()
    for text in (runcmd, boot):
        assert "PRIVATE KEY" not in text and "s3cr3t" not in text
    assert b"TOKEN=s3cr3t" in files["/opt/dask-secure-cloud/env"]


def test_no_ca_key_and_no_client_key_in_user_data():
    user_data = render(plan())
    ca_key = CREDS._ClusterCredentials__ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    blobs = [user_data, *decoded_files(user_data).values()]
    assert not any(ca_key in blob for blob in blobs)
    assert not any(CREDS.client.key_pem.encode() in blob for blob in blobs)


def test_security_false_ships_no_certificate():
    user_data = render(plan(tls=False))
    files = decoded_files(user_data)
    assert not any(b"-----BEGIN" in data for data in files.values())
    assert b"--tls" not in files["/opt/dask-secure-cloud/boot.sh"]


def test_worker_user_data_fits_far_below_ec2_limit():
    for role in (Role.SCHEDULER, Role.WORKER):
        size = len(render(plan(role), LIMITS["aws"]))
        # Certificates and the provisioning script; half the limit stays for the user.
        assert size < LIMITS["aws"].max_bytes / 2, size


def test_oversized_user_data_names_the_limit_and_the_largest_part():
    big = tuple(f"echo {os.urandom(35).hex()}" for i in range(600))
    with pytest.raises(UserDataTooLarge) as info:
        render(plan(extra_bootstrap=big), LIMITS["aws"])
    message = str(info.value)
    assert "EC2 allows 16,384" in message and "boot.sh" in message
    # GCE allows far more.
    render(plan(extra_bootstrap=big), LIMITS["gcp"])


def test_default_image_is_pinned_to_this_dask_and_python():
    image = default_docker_image()
    assert not image.endswith(":latest")
    assert dask.__version__.split("+")[0] in image
    assert f"py{sys.version_info.major}.{sys.version_info.minor}" in image


def test_only_allow_listed_changed_config_is_shipped():
    with dask.config.set(
        {
            "distributed.worker.memory.target": 0.42,
            "distributed.comm.tls.client.key": "/home/me/client.key",
            "coiled.token": "secret-token",
            "distributed.scheduler.allowed-failures": dask.config.get(
                "distributed.scheduler.allowed-failures"
            ),
        }
    ):
        shipped = shippable_config(
            ["distributed.worker", "distributed.scheduler", "distributed.comm.timeouts"]
        )
    assert shipped == {"distributed": {"worker": {"memory": {"target": 0.42}}}}


def test_env_with_newline_is_refused_for_docker():
    with pytest.raises(ValueError, match="env_vars: A"):
        render(plan(env={"A": "x\ny"}))


def test_scheduler_cannot_get_a_worker_certificate():
    with pytest.raises(ValueError, match="worker certificate"):
        BootPlan(
            cluster_id="c1",
            role=Role.SCHEDULER,
            name="s",
            command=("scheduler",),
            runtime=NativeRuntime(),
            tls=CREDS.issue(Role.WORKER, "w"),
        )


def _boot_sh(user_data: bytes) -> str:
    return decoded_files(user_data)["/opt/dask-secure-cloud/boot.sh"].decode()


@pytest.mark.parametrize("runtime", ["docker", "native"])
def test_the_boot_script_ships_its_code_and_not_its_comments(runtime):
    """Comments stay in the package's ``vm/boot/*.sh``; user-data carries code, shellcheck's
    directives and here-documents whole (the Python they hold still runs: the boot tests
    pass through it)."""
    boot = _boot_sh(render(plan(runtime=runtime)))
    comments = [line.strip() for line in boot.splitlines() if line.strip().startswith("#")]
    assert comments[:2] == ["#!/bin/sh", "# dask-secure-cloud: worker w-0 of cluster c1"]
    assert all(c.startswith("# shellcheck") for c in comments[2:]), comments
    if runtime == "native":
        assert "import sys\nfrom importlib.metadata import" in boot  # a here-document


def test_pip_packages_travel_as_a_file_one_requirement_a_line_never_in_the_script():
    """Each requirement is data: a line of a 0600 file the boot script reads, one pip
    argument each, never a word of the script itself."""
    wanted = ("pandas>=2", "s3fs[boto3]", 'iniconfig; python_version >= "3.8"')
    user_data = render(
        BootPlan(
            cluster_id="c1",
            role=Role.WORKER,
            name="w-0",
            command=("worker", "tls://10.0.0.1:8786"),
            runtime=NativeRuntime(pip_packages=wanted),
        )
    )
    files = decoded_files(user_data)
    assert files["/opt/dask-secure-cloud/requirements.txt"].decode().splitlines() == list(wanted)
    modes = {f["path"]: f["permissions"] for f in parse(user_data)["write_files"]}
    assert modes["/opt/dask-secure-cloud/requirements.txt"] == "0600"
    boot = _boot_sh(user_data)
    assert not any(w in boot for w in ("pandas", "s3fs", "iniconfig"))
    # Without pip_packages there is no file, and a baked image installs nothing.
    assert "/opt/dask-secure-cloud/requirements.txt" not in decoded_files(render(plan()))


@pytest.mark.parametrize(
    "requirement",
    ["pandas>>2", "-e .", "--index-url=https://example.org/simple", "a b", "x\ny", "s3fs[boto3"],
)
def test_pip_packages_that_are_not_pep_508_requirements_are_refused_naming_the_option(
    requirement,
):
    from dask_secure_cloud.errors import OptionError
    from dask_secure_cloud.options import LocalOptions, resolve

    with pytest.raises(OptionError, match=r"pip_packages: .* one PEP 508 requirement per item"):
        resolve(LocalOptions, {"pip_packages": [requirement]})
    with pytest.raises(OptionError, match="pip_packages"):
        NativeRuntime(pip_packages=(requirement,))


def test_pip_packages_with_specifiers_extras_and_markers_are_accepted():
    from dask_secure_cloud.options import LocalOptions, resolve

    wanted = ["pandas>=2", "s3fs[boto3]", "zarr >= 2, < 3", 'x; python_version >= "3.8"']
    assert resolve(LocalOptions, {"pip_packages": wanted}).pip_packages == tuple(wanted)


@pytest.mark.parametrize("runtime", ["docker", "native"])
def test_option_values_are_single_quoted_words_and_vm_dir_is_the_only_expansion(runtime):
    """A value that starts like one of the script's variables is still a literal word;
    ``{vm_dir}`` is replaced by the renderer, the rest of the value stays quoted."""
    hostile = "$D$(id -un > /tmp/x)`id`\"'; id"
    command = (
        "worker",
        "tls://10.0.0.1:8786",
        "--local-directory",
        hostile,
        "--name",
        "{vm_dir}/a b",
    )
    boot = _boot_sh(
        render(
            BootPlan(
                cluster_id="c1",
                role=Role.WORKER,
                name="w-0",
                command=command,
                runtime=RUNTIMES[runtime],
            )
        )
    )
    assert shlex.quote(hostile) in boot
    home = '"$D"' if runtime == "native" else "/opt/dask-secure-cloud"
    assert f"{home}'/a b'" in boot


@pytest.mark.parametrize("name", ["PY", "D", "IFS", "DEADLINE", "1A", "A-B", "é"])
def test_env_var_names_the_boot_script_cannot_take_are_refused(name):
    with pytest.raises(ValueError, match=f"env_vars: {name!r}"):
        plan(env={name: "x"})
