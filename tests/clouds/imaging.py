"""What a stand-in's image of a VM holds, and booting a VM from one.

A cloud makes an image from a stopped VM's disk. A process VM (``clouds.booter``) has no
disk: what it provisioned is the record the boot script keeps of it (the file that
``dask secure-cloud image build`` leaves on the builder, see ``vm/boot/common.sh``), so
its "image" is that file, and a VM booted from it gets the file back (written before its
user-data runs, as a disk would have it). A QEMU guest's image is its disk itself
(``clouds.guest.booter``: ``capture`` and ``boot(..., image=)``).
"""

from __future__ import annotations

import base64
import gzip
from typing import Any

import yaml

from dask_secure_cloud.cloudinit import parse

#: The file an image built by ``image build`` keeps (under the VM's root).
PROVISIONED = "/var/lib/dask-secure-cloud/provisioned"


def capture(booter: Any, vm_id: str) -> Any:
    """The image of the booted VM ``vm_id`` (powered off): a guest's disk, or a process
    VM's provisioning record (an empty one when it provisioned nothing)."""
    if hasattr(booter, "capture"):
        return booter.capture(vm_id)
    vm = booter.vms[vm_id]
    marker = vm.root / PROVISIONED.lstrip("/")
    return {PROVISIONED: marker.read_bytes()} if marker.exists() else {}


def boot(booter: Any, image: Any, user_data: bytes, **kwargs: Any) -> Any:
    """Boot ``user_data`` on ``image`` (``None``: the stock image)."""
    if image is None:
        return booter.boot(user_data, **kwargs)
    if isinstance(image, dict):
        return booter.boot(with_files(user_data, image), **kwargs)
    return booter.boot(user_data, image=image, **kwargs)


def with_files(user_data: bytes, files: dict[str, bytes]) -> bytes:
    """``user_data`` that first writes ``files``, as a disk would already hold them."""
    if not files:
        return user_data
    zipped = user_data[:2] == b"\x1f\x8b"
    document = parse(user_data)
    entries = [
        {"path": path, "encoding": "b64", "content": base64.b64encode(data).decode()}
        for path, data in files.items()
    ]
    document["write_files"] = entries + list(document.get("write_files") or [])
    out = ("#cloud-config\n" + yaml.safe_dump(document, sort_keys=False)).encode()
    return gzip.compress(out) if zipped else out
