"""An image built by ``dask secure-cloud image build``, on real guests: the proof that a
cluster booted from it skips provisioning.

On Compute Engine's stand-in (its default network, guests booted from the stock-like
image): the build boots one stock guest that provisions the native runtime from a
hash-checked lock file (``requirements_file``, as ``pip-compile --generate-hashes``
writes one: this client's exact dask and distributed, two packages of a user's and all
they need, each with its hash) into a virtualenv, from "PyPI", with ``python3-venv`` from
apt; it checks the result and powers off; the image is that guest's disk. Then a
cluster of that software (a scheduler and a worker) boots from it, computes over TLS,
can import the user's packages, and no guest prints a ``python-env``, ``docker-engine``
or ``pull`` step: each says it was provisioned by the image. The timings go to the
test's output.
"""

from __future__ import annotations

import hashlib
import time

import dask
import distributed
import pytest
from distributed import Client

from dask_secure_cloud import GCPCluster
from dask_secure_cloud.imaging.build import build

from clouds.guest.mirror_pypi import dask_requirements, wheelhouse

pytestmark = [
    pytest.mark.slow,
    pytest.mark.guest,
    pytest.mark.timeout(1800),
    pytest.mark.usefixtures("patient_connections"),
]

STEPS = ("python-env:", "docker-engine:", "pull:")


def _lock_file(directory) -> str:
    """A hash-checked lock of the wheelhouse the test's "PyPI" serves: one pinned,
    hashed line per wheel, as ``pip-compile --generate-hashes`` writes them."""
    lines = ["# a lock file: every package pinned and hashed"]
    for wheel in sorted(wheelhouse(dask_requirements()).glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{digest}")
    path = directory / "requirements.lock"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


async def test_a_cluster_booted_from_a_built_image_provisions_nothing(
    gce_guests, guest_network, guest_services, capsys, tmp_path
):
    stand_in, booter, options = gce_guests
    options = {**options, "runtime": "native", "requirements_file": _lock_file(tmp_path)}

    def users_packages() -> bool:
        # Nested, so that it is pickled by value: the guests cannot import this module.
        import iniconfig  # noqa: F401
        import socks  # noqa: F401

        return True

    started = time.monotonic()
    built = await build(GCPCluster, dict(options), poll_interval=5)
    build_seconds = time.monotonic() - started
    assert list(stand_in.images) == [built.name]
    assert stand_in.instances == {} and stand_in.disks == {}, "the builder is deleted"

    started = time.monotonic()
    async with GCPCluster(n_workers=1, asynchronous=True, **options) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=600)
            joined = time.monotonic() - started
            assert cluster.scheduler_address.startswith("tls://10.77.0.")
            workers = list((await client.scheduler.identity())["workers"])
            assert all(a.startswith("tls://10.77.0.") for a in workers)
            assert await client.submit(sum, range(10), pure=False) == 45
            versions = await client.get_versions(check=True)
            assert versions["scheduler"]["packages"]["dask"] == dask.__version__
            assert versions["scheduler"]["packages"]["distributed"] == distributed.__version__
            users = await client.run(users_packages)
            assert list(users.values()) == [True], users
        inserts = [body for call, body in stand_in.requests if call == "instances.insert"]
        assert all(
            body["disks"][0]["initializeParams"]["sourceImage"].endswith(built.id)
            for body in inserts[-2:]
        )
        guests = [g for g in booter.vms.values() if g.cluster_id == cluster.cluster_id]
        consoles = {g.name: g.console_text() for g in guests}
    assert set(consoles) == {"scheduler", "worker-0"}
    for name, console in consoles.items():
        assert "dask-secure-cloud: provisioned: the image has native dask" in console, (
            name,
            console[-3000:],
        )
        lines = [line for line in console.splitlines() if "dask-secure-cloud:" in line]
        assert not [line for line in lines if any(step in line for step in STEPS)], lines
    capture = getattr(booter, "capture_seconds", 0.0)
    with capsys.disabled():
        print(
            f"\nimage build on a guest: {build_seconds:.0f}s (disk capture {capture:.1f}s); "
            f"a cluster from it: scheduler and worker joined after {joined:.0f}s"
        )
