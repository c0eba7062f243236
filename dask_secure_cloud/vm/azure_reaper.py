"""What an Azure scheduler VM does when its lease ends: delete the cluster's VMs.

Shipped as text at the head of the scheduler's lease preload (``preloads.lease``), with
its settings appended as ``SETTINGS``; ``lease_end.py`` hands its ``on_expiry`` to the
lease. It runs on the VM, so it uses the standard library only. On Azure a VM whose OS
powers off is "Stopped": still allocated, its compute still billed, with its OS disk and
public address. Only a delete through Azure Resource Manager ends that, so the
scheduler asks the instance metadata service for a token of the managed identity the
cluster made for it, and deletes each worker VM it was told of with the lease renewals,
then its own VM. Every VM was made with ``deleteOption=Delete`` on its NIC, OS disk and
public address, so Azure deletes those with it.

The identity's roles reach only the cluster's own VMs, NICs, disks and addresses (see
``AzureDriver``): whatever this code is told, Azure refuses anything else with 403.
A role assignment can take minutes to take effect ("Troubleshoot Azure RBAC": up to 10
minutes), so a refusal, like a throttled or failed request, is retried for a bounded time.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

#: Replaced by the settings the driver appends: ``arm`` (resource-manager URL),
#: ``metadata`` (instance metadata service), ``client_id`` (the identity's),
#: ``scheduler`` (this VM's resource id), ``ca_pem`` (a CA for ``arm``, or ""),
#: ``patience`` (seconds to keep retrying one VM).
SETTINGS: dict[str, Any] = {}

#: The documented api-version of the metadata service's token endpoint.
TOKEN_API = "2018-02-01"
#: Compute's api-version for ``Virtual Machines - Delete``.
COMPUTE_API = "2024-07-01"
#: Answers after which trying again may succeed: throttled, conflict (an operation on the
#: VM in progress), the service's own failures, and 401/403 while a role assignment
#: propagates. 404 is done (already gone).
RETRY = frozenset({401, 403, 409, 429, 500, 502, 503, 504})
logger = logging.getLogger("distributed.scheduler")


def _context() -> ssl.SSLContext | None:
    pem = SETTINGS.get("ca_pem") or ""
    return ssl.create_default_context(cadata=pem) if pem else None


def _token() -> str:
    """A token for Resource Manager, of the cluster's identity, from the metadata
    service (``Metadata: true``; never through a proxy, as Azure's docs ask)."""
    query = urllib.parse.urlencode(
        {
            "api-version": TOKEN_API,
            "resource": SETTINGS["arm"].rstrip("/") + "/",
            "client_id": SETTINGS["client_id"],
        }
    )
    url = SETTINGS["metadata"].rstrip("/") + "/metadata/identity/oauth2/token?" + query
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Metadata": "true"})
    with opener.open(request, timeout=10) as response:
        return str(json.loads(response.read())["access_token"])


def _delete(resource_id: str, token: str) -> int:
    """DELETE one resource; the HTTP status ARM answered."""
    url = f"{SETTINGS['arm'].rstrip('/')}{resource_id}?api-version={COMPUTE_API}"
    request = urllib.request.Request(
        url, method="DELETE", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30, context=_context()) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        body = e.read()[:500].decode(errors="replace")
        logger.warning("deleting %s: HTTP %s %s", resource_id, e.code, body)
        return int(e.code)


def delete_vm(resource_id: str) -> bool:
    """Delete one VM, retrying what may succeed later, for ``patience`` seconds at most.
    Whether Azure accepted the delete (or the VM was already gone)."""
    deadline = time.monotonic() + float(SETTINGS.get("patience", 600))
    pause = 2.0
    while True:
        try:
            status = _delete(resource_id, _token())
        except (OSError, ValueError, KeyError) as e:  # no metadata service or ARM, yet
            logger.warning("deleting %s: %s", resource_id, e)
            status = 0
        if status in (200, 202, 204, 404):
            logger.warning("lease ended: deleting VM %s (HTTP %s)", resource_id, status)
            return True
        if (status and status not in RETRY) or time.monotonic() + pause > deadline:
            logger.error("lease ended: could not delete VM %s (HTTP %s)", resource_id, status)
            return False
        time.sleep(pause)
        pause = min(pause * 2, 30.0)


def on_expiry(resources: list[str]) -> None:
    """Delete the worker VMs named by the last lease renewal, then this VM: the last
    delete ends this process, so nothing may come after it."""
    own = SETTINGS["scheduler"]
    workers = [r for r in dict.fromkeys(resources) if r.lower() != own.lower()]
    for resource_id in workers:
        delete_vm(resource_id)
    delete_vm(own)
