"""A guard rail for moving code: the user-data every provider renders for every role and
runtime is stored and compared byte for byte.

What a VM receives is the boot path's whole contract; a refactor that changes one
byte of it changes behaviour, and must say so by updating the stored copy on purpose
(``DSC_RENDERED_UPDATE=1 python -m pytest tests/test_rendered_user_data.py``).

The stored copy is the decoded document: every file of ``write_files`` in clear, the
rest of the cloud-config as rendered. What differs from run to run or from machine to
machine is replaced by a fixed name first: the cluster's certificate (a new CA each
time), each VM's one-time enrolment token, and this client's interpreter and Dask
versions (which pick the VM's runtime). Nothing else is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import dask
import distributed
import pytest
import yaml
from google.auth.credentials import AnonymousCredentials

from dask_secure_cloud.cloudinit import decode_file, parse
from dask_secure_cloud.cluster import preview
from dask_secure_cloud.plan import default_docker_image
from dask_secure_cloud.registry import PROVIDERS
from dask_secure_cloud.registry import cluster_class as _cluster_class

STORED = Path(__file__).parent / "rendered"
SHARED = STORED / "shared"
SHARED_OVER = 2048

#: What each provider needs to render at all; no credential of this machine is read.
REQUIRED = {
    "local": {},
    "aws": {"region": "eu-west-1"},
    "gcp": {"project": "demo-project", "credentials": AnonymousCredentials()},
    "azure": {"resource_group": "dask-rg", "subscription_id": "sub", "location": "westeurope"},
    "digitalocean": {"token": "dop_v1_x"},
}
RUNTIMES = {"docker": {"runtime": "docker"}, "native": {"runtime": "native"}}
#: One more variant that changes the most lines: no TLS at all.
VARIANTS = {"tls": {}, "no-tls": {"security": False}}
#: Plain TCP only on a private network: what each cloud needs to be told for that.
PRIVATE = {
    "local": {},
    "aws": {"use_private_ip": True},
    "gcp": {"use_private_ip": True},
    "azure": {"use_private_ip": True, "vnet": "dask-vnet"},
    "digitalocean": {"allow_insecure_public": True},  # every droplet is public
}

_PEM = re.compile(rb"-----BEGIN ([A-Z ]+)-----\n[A-Za-z0-9+/=\n]+-----END \1-----\n?", re.MULTILINE)


def _fixed(text: bytes) -> bytes:
    """``text`` with what varies between runs and machines replaced by fixed names."""
    text = _PEM.sub(lambda m: b"<" + m.group(1).replace(b" ", b"-") + b">\n", text)
    for value, name in (
        (default_docker_image(), "<DOCKER-IMAGE>"),
        (sys.executable, "<CLIENT-PYTHON>"),
        (distributed.__version__, "<DISTRIBUTED-VERSION>"),
        (dask.__version__, "<DASK-VERSION>"),
    ):
        text = text.replace(value.encode(), name.encode())
    return text


def _token_free(content: bytes, path: str) -> bytes:
    if path.endswith("enroll.json"):
        document = json.loads(content)
        document["token"] = "<ENROLMENT-TOKEN>"
        return json.dumps(document, sort_keys=True).encode() + b"\n"
    return content


def canonical(user_data: bytes) -> bytes:
    """The user-data as a VM sees it once cloud-init has written its files."""
    document = parse(user_data)
    files = document.pop("write_files", [])
    out = [b"# cloud-config without write_files:\n"]
    out.append(yaml.safe_dump(document, sort_keys=True).encode())
    for entry in files:
        content = _token_free(decode_file(entry), entry["path"])
        header = {k: v for k, v in entry.items() if k not in ("content", "encoding")}
        out.append(f"\n# ---- file {json.dumps(header, sort_keys=True)}\n".encode())
        out.append(_fixed(content if content.endswith(b"\n") else content + b"\n"))
    return _fixed(b"".join(out[:2])) + b"".join(out[2:])


def _shared(rendered: bytes) -> tuple[bytes, dict[str, bytes]]:
    """Large files (the modules shipped verbatim) stored once under their hash, so that
    forty copies of the same module are one. Not the boot script: it differs per case,
    and its diff is what a reviewer reads."""
    parts = re.split(rb"(\n# ---- file [^\n]*\n)", rendered)
    kept, shared = [parts[0]], {}
    for header, content in zip(parts[1::2], parts[2::2], strict=True):
        # The boot script stays in each copy, where a change to it shows as a diff.
        if len(content) > SHARED_OVER and b"/boot.sh" not in header:
            digest = hashlib.sha256(content).hexdigest()[:20]
            shared[digest] = content
            content = f"<stored in shared/{digest}>\n".encode()
        kept += [header, content]
    return b"".join(kept), shared


CASES = [
    (provider, role, runtime, variant)
    for provider in sorted(PROVIDERS)
    for role in ("scheduler", "worker")
    for runtime in RUNTIMES
    for variant in VARIANTS
]


@pytest.mark.parametrize(("provider", "role", "runtime", "variant"), CASES)
def test_rendered_user_data_is_unchanged(provider, role, runtime, variant):
    options = {**REQUIRED[provider], **RUNTIMES[runtime], **VARIANTS[variant]}
    if variant == "no-tls":
        options.update(PRIVATE[provider])
    shown = preview(_cluster_class(provider), name="dsc-rendered0", **options)
    rendered = canonical(next(v for k, v in shown.user_data.items() if k.value == role))
    rendered, shared = _shared(rendered)
    stored = STORED / f"{provider}-{role}-{runtime}-{variant}.txt"
    if os.environ.get("DSC_RENDERED_UPDATE"):
        SHARED.mkdir(parents=True, exist_ok=True)
        stored.write_bytes(rendered)
        for digest, content in shared.items():
            (SHARED / digest).write_bytes(content)
    assert stored.exists(), f"no stored copy: run with DSC_RENDERED_UPDATE=1 once ({stored.name})"
    for digest, content in shared.items():
        assert (SHARED / digest).exists(), f"{stored.name}: a shipped file changed ({digest})"
        assert (SHARED / digest).read_bytes() == content
    assert rendered == stored.read_bytes(), (
        f"{stored.name}: the user-data changed; if on purpose, store it again with "
        "DSC_RENDERED_UPDATE=1 and say why in the commit"
    )


def test_every_stored_copy_is_still_rendered():
    """A stored copy nobody renders any more guards nothing: it must go."""
    expected = {f"{p}-{r}-{rt}-{v}.txt" for p, r, rt, v in CASES}
    assert {p.name for p in STORED.glob("*.txt")} == expected
    referenced = {
        match.decode()
        for path in STORED.glob("*.txt")
        for match in re.findall(rb"<stored in shared/([0-9a-f]+)>", path.read_bytes())
    }
    assert {p.name for p in SHARED.iterdir()} == referenced
