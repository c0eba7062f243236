"""``requirements_file``: a pip requirements or lock file for ``runtime="native"`` VMs.

What would only fail on a VM minutes into its boot is refused when the cluster is made,
with an ``OptionError`` naming the option, the file's line and the fix (one case per
mistake). A file that is taken travels to the VM as data, pip reads it (the boot
script's side is in ``test_boot_script.py``, a real guest's hash-checked install in
``test_guests_images.py``), and it is part of what a built image's hash names.
"""

from __future__ import annotations

import os

import dask
import distributed
import pytest
from helpers import decoded_files

from dask_secure_cloud import EC2Cluster, imaging, requirements_file
from dask_secure_cloud.cloudinit import BootPlan, NativeRuntime, render
from dask_secure_cloud.credentials import Role
from dask_secure_cloud.errors import OptionError, UserDataTooLarge
from dask_secure_cloud.options import LocalOptions, resolve

DASK = dask.__version__.split("+")[0]
DISTRIBUTED = distributed.__version__.split("+")[0]
HASH = "--hash=sha256:" + "ab" * 32
#: The client's dask and distributed, hashed: what a hash-checked file must hold.
PINS = f"dask=={DASK} {HASH}\ndistributed=={DISTRIBUTED} {HASH}\n"

#: (file's text, what the refusal must say): one case per mistake a user makes.
REFUSED = {
    "another-file": ("-r base.txt\npandas\n", "line 1: '-r base.txt' names another"),
    "constraints": ("pandas\n--constraint c.txt\n", "line 2: '--constraint c.txt' names a"),
    "editable-project": ("-e .\n", "names an editable source tree"),
    "local-directory": ("./src/mypkg\n", "a file on this machine is not on the VMs"),
    "local-wheel": ("dist/mypkg-1.0-py3-none-any.whl\n", "a file on this machine"),
    "file-url": ("mypkg @ file:///home/me/mypkg\n", "is a file on this machine"),
    "conda-environment": (
        "name: analysis\nchannels:\n  - conda-forge\ndependencies:\n  - numpy\n",
        "is a conda environment file",
    ),
    "other-dask": ("dask==2023.1.0\n", f"pin dask=={DASK} or leave dask out"),
    "other-distributed": ("distributed<2020\n", f"pin distributed=={DISTRIBUTED}"),
    "dask-from-a-url": ("dask @ https://example.org/dask.whl\n", "does not admit"),
    "hashes-without-dask": (f"pandas==2.2.0 {HASH}\n", "add both, with their hashes"),
    "require-hashes-without-dask": ("--require-hashes\npandas==2.2.0\n", "add both"),
    "not-a-requirement": ("pandas>>2\n", "line 1: 'pandas>>2' is not a requirement"),
    "unknown-pip-option": ("--user\npandas\n", "pip option '--user' is not one"),
    "option-missing-its-value": ("--index-url\npandas\n", "--index-url takes one value"),
    "flag-given-a-value": ("--pre yes\npandas\n", "'yes' follows --pre, which takes no value"),
    "unknown-requirement-option": ("pandas --install-option=x\n", "is not an option a"),
    "unclosed-quote": ("pandas ; python_version == '3.11\n", "is not a requirement"),
    "unclosed-quote-in-options": ("pandas --hash='sha256:ab\n", "cannot be read"),
    "only-comments": ("# nothing yet\n\n", "names no requirement"),
    "control-character": ("pandas\x1b[2J\n", "holds a control character"),
    "local-find-links": ("--find-links ./wheels\npandas\n", "cannot reach a path or a file:"),
    "file-index": ("--index-url file:///srv/simple\npandas\n", "set PIP_FIND_LINKS in env_vars"),
    "editable-checkout": (
        "-e git+https://github.com/o/r@v1#egg=pkg\n",
        "name the project as 'pkg @ git+https://github.com/o/r@v1'",
    ),
    "url-without-name": ("https://example.org/pkg-1.0-py3-none-any.whl\n", "name the project"),
    "hashed-range": (f"{PINS}pandas>=2 {HASH}\n", "pinned to one release (==)"),
    "hashed-wildcard": (f"{PINS}pandas==2.* {HASH}\n", "pinned to one release (==)"),
    "hashed-beside-unhashed": (f"{PINS}pandas==2.2.3\n", "'pandas==2.2.3' has no --hash"),
    "hashed-checkout": (f"{PINS}pkg @ git+https://github.com/o/r@v1\n", "version-control"),
    "hashed-url-without-hash": (f"{PINS}pkg @ https://example.org/p.whl\n", "has no hash"),
    "weak-hash": ("pandas==2.2.3 --hash=md5:0123\n", "sha256, sha384, sha512 hashes only"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_file_the_vms_could_not_install_is_refused_naming_line_and_fix(case, tmp_path):
    text, said = REFUSED[case]
    path = tmp_path / "requirements.txt"
    path.write_text(text)
    with pytest.raises(OptionError, match="requirements_file") as refused:
        resolve(LocalOptions, {"requirements_file": str(path)})
    assert said in str(refused.value), str(refused.value)
    assert str(path) in str(refused.value)


#: (file's text, the lines shipped): files pip reads that users write.
ACCEPTED = {
    # pip never continues a comment line: the next line is a requirement of its own.
    "comment-ending-in-backslash": ("# see C:\\\npandas==2.2.3\nnumpy\n", "pandas==2.2.3\nnumpy\n"),
    # pip joins continued lines with nothing in between.
    "name-split-over-lines": ("pan\\\ndas==2.2.3\n", "pandas==2.2.3\n"),
    "options-sharing-a-line": (
        "--index-url https://pypi.example.org/simple --trusted-host pypi.example.org\npandas\n",
        "--index-url https://pypi.example.org/simple --trusted-host pypi.example.org\npandas\n",
    ),
    "index-from-the-vms-environment": (
        "--extra-index-url https://${PIP_TOKEN}@pkgs.example.org/simple\npandas\n",
        "--extra-index-url 'https://${PIP_TOKEN}@pkgs.example.org/simple'\npandas\n",
    ),
    # Its marker is pip's to read: the words are not shell words (no quote to close).
    "url-with-an-apostrophe": (
        "pkg @ https://example.org/it's/pkg-1.0-py3-none-any.whl\n",
        "pkg @ https://example.org/it's/pkg-1.0-py3-none-any.whl\n",
    ),
    # A marker the VMs may not match: the client cannot tell, so it leaves it to pip.
    "dask-behind-a-marker": (
        'dask==2023.1.0 ; python_version < "3.8"\npandas\n',
        'dask==2023.1.0 ; python_version < "3.8"\npandas\n',
    ),
    "hashed-url": (
        f"{PINS}pkg @ https://example.org/p.whl#sha256={'cd' * 32}\n",
        f"{PINS}pkg @ https://example.org/p.whl#sha256={'cd' * 32}\n",
    ),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_a_file_pip_reads_is_taken_as_pip_reads_it(case, tmp_path):
    text, shipped = ACCEPTED[case]
    path = tmp_path / "requirements.txt"
    path.write_text(text)
    chosen = resolve(LocalOptions, {"requirements_file": str(path)}).requirements_file
    assert chosen.text == shipped


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_a_file_with_a_byte_order_mark_is_read_as_pip_reads_it(encoding, tmp_path):
    """``pip freeze > requirements.txt`` in Windows PowerShell 5 writes UTF-16."""
    path = tmp_path / "requirements.txt"
    path.write_bytes("pandas==2.2.3\r\nnumpy\r\n".encode(encoding))
    chosen = resolve(LocalOptions, {"requirements_file": str(path)}).requirements_file
    assert chosen.text == "pandas==2.2.3\nnumpy\n"


def test_a_missing_file_names_where_relative_paths_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OptionError, match=r"requirements_file: there is no file 'req.txt'") as e:
        resolve(LocalOptions, {"requirements_file": "req.txt"})
    assert str(tmp_path) in str(e.value)


def test_a_file_too_large_for_user_data_says_to_bake_an_image(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("pandas\n" + "# padding\n" * 40_000)
    with pytest.raises(OptionError, match="more than any cloud's user-data holds"):
        resolve(LocalOptions, {"requirements_file": path})


def _pip_compile_output() -> str:
    """What ``pip-compile --generate-hashes`` writes: continuations, ``# via`` comments."""
    return (
        "#\n# This file is autogenerated by pip-compile with Python 3.11\n#\n"
        "--index-url https://pypi.org/simple\n\n"
        f"dask=={DASK} \\\n    {HASH} \\\n    --hash=sha256:{'cd' * 32}\n    # via -r in.txt\n"
        f"distributed=={DISTRIBUTED} \\\n    {HASH}\n    # via -r in.txt\n"
        f'pandas==2.2.3 ; python_version >= "3.9" \\\n    {HASH}\n'
    )


def test_a_lock_file_is_read_as_pip_reads_it_and_shipped_without_its_comments(tmp_path):
    path = tmp_path / "requirements.lock"
    path.write_text(_pip_compile_output())
    chosen = resolve(LocalOptions, {"requirements_file": path}).requirements_file
    assert chosen.hashed and chosen.names == {"dask", "distributed", "pandas"}
    lines = chosen.text.splitlines()
    assert lines[0] == "--index-url https://pypi.org/simple"
    assert lines[1].split()[0] == f"dask=={DASK}" and lines[1].count("--hash=") == 2
    assert lines[3].startswith('pandas==2.2.3 ; python_version >= "3.9"')
    assert len(lines) == 4 and "#" not in chosen.text
    assert repr(chosen) == f"RequirementsFile({str(path)!r})"


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"runtime": "docker"}, "build it into docker_image instead"),
        ({"pip_packages": ["zarr"]}, "move pip_packages (zarr) into the file"),
    ],
    ids=["docker-runtime", "pip-packages-beside-hashes"],
)
def test_a_requirements_file_that_cannot_apply_is_refused(options, said, tmp_path):
    path = tmp_path / "requirements.lock"
    path.write_text(_pip_compile_output())
    with pytest.raises(OptionError, match="requirements_file") as refused:
        resolve(LocalOptions, {"requirements_file": str(path), **options})
    assert said in str(refused.value)


@pytest.mark.parametrize("hashed", [False, True], ids=["plain", "hash-checked"])
def test_the_file_travels_as_data_never_in_the_script(hashed):
    text = f"dask=={DASK} {HASH}\ndistributed=={DISTRIBUTED} {HASH}\n" if hashed else ""
    text += f"xarray==2024.6.0 {HASH}\n" if hashed else "xarray==2024.6.0\n"
    chosen = requirements_file.parse(text, "requirements_file", dask=DASK, distributed=DISTRIBUTED)
    plan = BootPlan(
        cluster_id="c1",
        role=Role.WORKER,
        name="w-0",
        command=("worker", "tls://10.0.0.1:8786"),
        runtime=NativeRuntime(requirements_file=chosen),
    )
    files = decoded_files(render(plan))
    name = "requirements.lock" if hashed else "requirements-file.txt"
    assert files[f"/opt/dask-secure-cloud/{name}"].decode() == text
    assert "xarray" not in files["/opt/dask-secure-cloud/boot.sh"].decode()
    assert "/opt/dask-secure-cloud/requirements.txt" not in files  # pip_packages' file


def test_an_image_hash_names_the_files_lines_not_where_it_lies():
    def software(text: str, path: str) -> imaging.Software:
        chosen = requirements_file.parse(text, "r", path=path, dask="1", distributed="1")
        runtime = NativeRuntime(dask_version="1", distributed_version="1", requirements_file=chosen)
        return imaging.Software.of(runtime)

    here = software("pandas==2.2.3\n", "/a/requirements.txt")
    assert here.digest == software("pandas==2.2.3  # pinned\n", "/b/r.txt").digest
    assert here.digest != software("pandas==2.2.2\n", "/a/requirements.txt").digest
    assert "a requirements file (1 lines)" in here.describe()
    # Without a file, the hash is what it was before the option existed (this digest was
    # printed by that version): images built then still match.
    before = imaging.Software("native", dask="2024.8.0", distributed="2024.8.0", python="3.11")
    assert before.digest == "f4c93c8749766544"


def test_on_ec2_a_lock_of_every_wheel_is_refused_before_anything_saying_what_to_do(tmp_path):
    """EC2 allows 16 KB of user-data in all, gzipped, and hashes do not compress: a lock of
    dask and distributed alone, as ``uv pip compile --generate-hashes`` writes it (413
    hashes), is 17 KB gzipped. Here 400 hashes: refused when the cluster is made, no call
    made (the endpoint is a closed port)."""
    lines = [PINS] + [
        f"pkg{i}==1.0 --hash=sha256:{os.urandom(32).hex()} --hash=sha256:{os.urandom(32).hex()}\n"
        for i in range(200)
    ]
    path = tmp_path / "requirements.lock"
    path.write_text("".join(lines))
    nowhere = "http://127.0.0.1:9"
    with pytest.raises(UserDataTooLarge, match="EC2 allows 16,384") as refused:
        EC2Cluster(
            runtime="native",
            requirements_file=str(path),
            region="us-east-1",
            endpoint_url=nowhere,
            public_ip_url=nowhere,
        )
    assert "largest parts: /opt/dask-secure-cloud/requirements.lock" in str(refused.value)
    assert "install it into a docker_image" in str(refused.value)
