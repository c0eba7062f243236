"""The services that play the internet for test guests, checked with the guests' clients.

A guest's boot runs ``apt-get``, ``pip`` and ``docker pull`` against deb.debian.org,
pypi.org and ghcr.io, which a test guest resolves to these services. Here the same
clients (a registry client written to the API, for Docker, which does not run here)
ask the services on a loopback address, so a guest test that fails tells something
about the guest, not about its internet. The first run builds the mirrors and the image
(a few minutes); later runs find them in the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import random
import shutil
import ssl
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from clouds.guest import common
from clouds.guest.container_image import MANIFEST_TYPE, dask_images, image_tag
from clouds.guest.internet import Services
from clouds.guest.mirror_apt import GUEST_INSTALLS, STOCK_STATUS, apt_repository
from clouds.guest.mirror_pypi import dask_requirements, release, wheelhouse

pytestmark = [
    pytest.mark.slow,
    # Builds the guests' cached mirrors and images: with the guests (tests/conftest.py).
    pytest.mark.xdist_group("guests"),
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("mmdebstrap", "apt-ftparchive")),
        reason="needs root (ports 80 and 443, mmdebstrap), mmdebstrap and apt-utils",
    ),
]

DASK = release("dask")
#: Variables through which this machine's own trust or pip settings would reach a client.
_CLIENT_SETTINGS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    address = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 254)}"
    started = Services.start(
        None,
        address,
        apt_repository(),
        wheelhouse(dask_requirements()),
        dask_images(),
        tmp_path_factory.mktemp("internet"),
    )
    yield started
    started.stop()


def _clean_env() -> dict[str, str]:
    """This environment without its CA bundle and pip settings: the client gets only ours."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _CLIENT_SETTINGS and not k.startswith("PIP_")
    }


def _https(services: Services) -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=str(common.test_ca()[0]))
    return http.client.HTTPSConnection(services.address, 443, context=context, timeout=30)


def _get(
    services: Services, host: str, path: str, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    connection = _https(services)
    try:
        connection.request(method, path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


# -- PyPI --------------------------------------------------------------------------------


def test_pip_downloads_dask_through_the_index(services: Services, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--isolated",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--index-url",
            f"https://{services.address}/simple",
            "--cert",
            str(common.test_ca()[0]),
            "--dest",
            str(tmp_path),
            f"dask=={DASK}",
        ],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (downloaded,) = tmp_path.glob("dask-*.whl")
    served = wheelhouse(dask_requirements()) / downloaded.name
    assert downloaded.read_bytes() == served.read_bytes()
    fetched = [(r["path"], r["status"]) for r in services.requests()]
    assert ("/simple/dask/", 200) in fetched
    assert (f"/packages/{downloaded.name}", 200) in fetched


def test_index_answers_as_pypi_for_the_guest_names(services: Services) -> None:
    status, headers, body = _get(services, "pypi.org", "/simple/distributed/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    wheel = f"distributed-{release('distributed')}-py3-none-any.whl"
    assert f'href="https://files.pythonhosted.org/packages/{wheel}#sha256=' in page
    expected = hashlib.sha256((wheelhouse(dask_requirements()) / wheel).read_bytes()).hexdigest()
    assert f"#sha256={expected}" in page

    status, headers, body = _get(services, "files.pythonhosted.org", f"/packages/{wheel}")
    assert status == 200 and hashlib.sha256(body).hexdigest() == expected
    assert int(headers["Content-Length"]) == len(body)

    assert _get(services, "pypi.org", "/simple/no-such-project-here/")[0] == 404
    status, headers, _ = _get(services, "pypi.org", "/simple/Distributed")
    assert status == 301 and headers["Location"] == "/simple/distributed/"
    status, _, body = _get(services, "pypi.org", "/simple/")
    assert status == 200 and b'href="/simple/dask/"' in body


# -- apt ---------------------------------------------------------------------------------


def _apt(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """apt-get with a configuration of its own under ``root``: nothing of this machine's
    sources, state or settings is read, and nothing is installed."""
    env = {**_clean_env(), "APT_CONFIG": str(root / "apt.conf"), "LC_ALL": "C"}
    return subprocess.run(
        ["apt-get", *args], env=env, capture_output=True, text=True, timeout=120, cwd=root
    )


@pytest.fixture
def apt_root(services: Services, tmp_path: Path) -> Path:
    """A throwaway apt setup that sees the stock guest's dpkg status and the mirror."""
    for directory in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "state/lists/partial"):
        (tmp_path / directory).mkdir(parents=True)
    (tmp_path / "cache/archives/partial").mkdir(parents=True)
    shutil.copy(apt_repository() / STOCK_STATUS, tmp_path / "status")
    # The guest's line, with the services' address for the name its /etc/hosts maps.
    (tmp_path / "etc/apt/sources.list").write_text(
        f"deb [trusted=yes] http://{services.address}/debian bookworm main\n"
    )
    (tmp_path / "apt.conf").write_text(
        f'Dir "{tmp_path}/";\n'
        f'Dir::State "{tmp_path}/state/";\n'
        f'Dir::State::status "{tmp_path}/status";\n'
        f'Dir::Cache "{tmp_path}/cache/";\n'
        'APT::Architecture "amd64";\n'
        'APT::Architectures { "amd64"; };\n'
        'APT::Sandbox::User "root";\n'
        'Debug::NoLocking "true";\n'
    )
    return tmp_path


def test_apt_on_a_stock_guest_finds_docker_and_venv(services: Services, apt_root: Path) -> None:
    # The product's boot script makes any error of the update fatal.
    update = _apt(apt_root, "-o", "APT::Update::Error-Mode=any", "update")
    assert update.returncode == 0 and "W:" not in update.stdout + update.stderr, update.stderr
    for package, recommends in GUEST_INSTALLS.items():
        # As the boot script installs (no Recommends), and with them where the mirror has them.
        variants = (
            [["--no-install-recommends"], []] if recommends else [["--no-install-recommends"]]
        )
        for flags in variants:
            plan = _apt(apt_root, "-s", "install", *flags, package)
            assert plan.returncode == 0, plan.stdout + plan.stderr
            assert f"Inst {package} " in plan.stdout
    # The download itself, as the guest's install makes it.
    fetch = _apt(
        apt_root, "-y", "--download-only", "--no-install-recommends", "install", "docker.io"
    )
    assert fetch.returncode == 0, fetch.stdout + fetch.stderr
    assert list((apt_root / "cache/archives").glob("docker.io_*.deb"))
    # A file name with an epoch ("2%3a...") travels URL-quoted, as from the real mirror.
    assert _apt(apt_root, "download", "dmsetup").returncode == 0
    paths = [r["path"] for r in services.requests() if r["scheme"] == "http"]
    assert "/debian/dists/bookworm/Release" in paths
    assert any(p.startswith("/debian/pool/main/docker.io_") for p in paths)


# -- the registry ------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_registry_serves_the_dask_image(services: Services, tmp_path: Path) -> None:
    repository, _, tag = image_tag(DASK).partition(":")
    status, headers, _ = _get(services, "ghcr.io", "/v2/")
    assert status == 200 and headers["Docker-Distribution-API-Version"] == "registry/2.0"

    status, head, body = _get(services, "ghcr.io", f"/v2/{repository}/manifests/{tag}", "HEAD")
    assert status == 200 and body == b"" and head["Content-Type"] == MANIFEST_TYPE
    status, headers, body = _get(services, "ghcr.io", f"/v2/{repository}/manifests/{tag}")
    digest = headers["Docker-Content-Digest"]
    assert status == 200 and _sha256(body) == digest == head["Docker-Content-Digest"]
    assert int(head["Content-Length"]) == len(body)
    manifest = json.loads(body)
    assert manifest["mediaType"] == MANIFEST_TYPE and manifest["schemaVersion"] == 2
    assert _get(services, "ghcr.io", f"/v2/{repository}/manifests/{digest}")[2] == body

    status, _, body = _get(
        services, "ghcr.io", f"/v2/{repository}/blobs/{manifest['config']['digest']}"
    )
    assert status == 200 and _sha256(body) == manifest["config"]["digest"]
    assert len(body) == manifest["config"]["size"]
    config = json.loads(body)
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert any(e.startswith("PATH=") for e in config["config"]["Env"])

    (layer,) = manifest["layers"]
    layer_file = tmp_path / "layer.tar.gz"
    connection = _https(services)
    connection.request(
        "GET", f"/v2/{repository}/blobs/{layer['digest']}", headers={"Host": "ghcr.io"}
    )
    response = connection.getresponse()
    assert response.status == 200
    with layer_file.open("wb") as out:
        shutil.copyfileobj(response, out)
    connection.close()
    assert layer_file.stat().st_size == layer["size"]
    assert _sha256(layer_file.read_bytes()) == layer["digest"]
    diff_id = hashlib.sha256()
    with gzip.open(layer_file) as plain:
        for chunk in iter(lambda: plain.read(1 << 20), b""):
            diff_id.update(chunk)
    assert config["rootfs"] == {"type": "layers", "diff_ids": [f"sha256:{diff_id.hexdigest()}"]}

    with tarfile.open(layer_file) as tar:
        names = set(tar.getnames())
        script = tar.extractfile("usr/local/bin/dask")
        assert script is not None and script.read().startswith(b"#!/usr/bin/python3\n")
    site = "usr/local/lib/python3.11/dist-packages"
    for package in ("dask", "distributed"):
        assert f"{site}/{package}/__init__.py" in names
    assert f"{site}/dask-{DASK}.dist-info/METADATA" in names
    assert "usr/bin/python3" in names

    # What `docker run IMAGE dask scheduler ...` runs, run here in the unpacked layer.
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    try:
        subprocess.run(["tar", "-xzf", str(layer_file), "-C", str(rootfs)], check=True)
        for role in ("scheduler", "worker"):
            inside = ["env", "-i", *config["config"]["Env"], "dask", role, "--help"]
            isolated = ["unshare", "--fork", "--pid", f"--mount-proc={rootfs}/proc"]
            result = subprocess.run(
                [*isolated, "chroot", str(rootfs), *inside],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 0, result.stderr
            assert f"Usage: dask {role}" in result.stdout
    finally:
        shutil.rmtree(rootfs)


def test_registry_answers_unknown_as_a_registry_does(services: Services) -> None:
    repository = image_tag(DASK).partition(":")[0]
    status, headers, body = _get(services, "ghcr.io", f"/v2/{repository}/manifests/0.0.0-py3.11")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]
    }
    status, _, body = _get(services, "ghcr.io", f"/v2/{repository}/blobs/sha256:{'0' * 64}")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert _get(services, "ghcr.io", f"/v2/{repository}/manifests/{DASK}-py3.12", "HEAD")[0] == 404
    status, _, body = _get(services, "ghcr.io", f"/v2/{repository}/tags/list")
    assert status == 200 and json.loads(body)["tags"] == [image_tag(DASK).partition(":")[2]]
