"""Which worker VM is which Dask worker, and which are gone.

A worker names itself, so a name proves nothing: a VM's worker is the one listening on
the address the fleet launched the VM with (``_address_of``). From that the cluster
notices a VM whose Dask worker is gone while the VM stays (and hands it to the
replacement policy), and gives each new worker a name never used before.

Mixed into :class:`~dask_secure_cloud.cluster.VMCluster`.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from typing import Any

from distributed.comm import get_address_host
from distributed.core import Status
from distributed.deploy.spec import SpecCluster

from .driver import VM

__all__ = ["WorkerMembership"]

logger = logging.getLogger("dask_secure_cloud.cluster")


class WorkerMembership(SpecCluster):
    """Worker VMs matched to Dask workers by address, and the gone ones reported."""

    def _init_membership(self, n_workers: int) -> None:
        #: Worker VMs whose Dask worker joined at the VM's address, and of those, the
        #: ones whose worker is gone since (see _notice_workers_gone).
        self._workers_seen: set[str] = set()
        self._workers_gone: set[str] = set()
        #: The number of the next new worker's name (see _new_worker_name).
        self._next_worker = n_workers

    def worker_names(self) -> set[str]:
        """The names of the workers connected to the scheduler now."""
        return {w.get("name") for w in self.scheduler_info.get("workers", {}).values()}

    def _update_worker_status(self, op: str, msg: Any) -> None:
        """Keep ``scheduler_info`` current, log each worker that joins with the count, and
        notice a worker VM whose Dask worker is gone while the VM is not."""
        super()._update_worker_status(op, msg)
        self._notice_workers_gone()
        if op == "add":
            since = time.monotonic() - self._started_at
            joined = len(self.scheduler_info.get("workers", {}))
            self._log(f"Workers joined: {joined} of {len(self.worker_spec)} after {since:.1f}s")

    def _notice_workers_gone(self) -> None:
        """Report each worker VM whose Dask worker joined and is gone while the VM stays
        (removed from the scheduler, or its process died): in the log at once, and in
        ``repr`` until it is back or replaced. The replacement policy watches it from
        then on (``replacement.py``). A worker the cluster itself retires (``scale``)
        has left ``worker_spec`` first, and is neither reported nor replaced."""
        if self.status != Status.running:
            return
        present = self._worker_addresses()
        for name in list(self._workers_seen | self._workers_gone):
            if name not in self.worker_spec:
                self._workers_seen.discard(name)
                self._workers_gone.discard(name)
        for name in present:
            self._workers_seen.add(name)
            self._replacements.joined(name)
            if name in self._workers_gone:
                self._workers_gone.discard(name)
                self._log(f"{name}: its Dask worker is back")
        for name in sorted(self._workers_seen - set(present) - self._workers_gone):
            self._workers_gone.add(name)
            message = f"{name}: VM running, its Dask worker is gone"
            logger.warning("Cluster %s: %s", self.cluster_id, message)
            if hasattr(self, "_cluster_manager_logs"):
                self._cluster_manager_logs.append((datetime.datetime.now(), message))
            self._replacements.worker_gone(name, getattr(self.workers.get(name), "vm", None))

    def _workers_gone_report(self) -> list[str]:
        """One line per worker VM whose Dask worker is gone, saying where its VM is."""
        lines = []
        for name in sorted(self._workers_gone):
            vm = getattr(self.workers.get(name), "vm", None)
            if vm is None:
                lines.append(f"{name}: its Dask worker left and its VM was deleted")
            elif self.fleet.state(vm) == "stopped":
                lines.append(f"{name}: VM stopped (it still bills), its Dask worker is gone")
            elif self.fleet.state(vm) == "terminated":
                lines.append(f"{name}: VM terminated, its Dask worker is gone")
            else:
                lines.append(f"{name}: VM running, its Dask worker is gone")
        return lines + self._replacements.given_up

    def _new_worker_name(self, worker_number: int) -> str:
        """A worker name this cluster never gave before. ``SpecCluster`` would give the
        number of a worker that left its spec again, but a name is a VM's identity: its
        certificate, its directory, the scheduler's record of its worker."""
        number = max(worker_number, self._next_worker)
        self._next_worker = number + 1
        return f"worker-{number}"

    def _workers_by_host(self) -> dict[str, list[tuple[str, str]]]:
        """The connected Dask workers' ``(address, name)``, by the host they listen on."""
        index: dict[str, list[tuple[str, str]]] = {}
        for address, info in self.scheduler_info.get("workers", {}).items():
            index.setdefault(get_address_host(address), []).append((address, str(info.get("name"))))
        return index

    def _address_of(
        self, vm: VM, by_host: Mapping[str, list[tuple[str, str]]] | None = None
    ) -> str | None:
        """The Dask address of ``vm``'s worker: one listening on the VM's own address, as
        the fleet launched it. A name alone proves nothing (a worker names itself); the
        name only tells apart the processes that share one address (``LocalVMCluster``
        without a subnet; ``nworkers``, whose processes are ``NAME-0``, ``NAME-1``...)."""
        found = None
        if by_host is None:
            by_host = self._workers_by_host()
        for address, name in by_host.get(vm.private_ip, ()):
            if name == vm.name:
                return address
            head, _, tail = name.rpartition("-")
            if found is None and head == vm.name and tail.isdigit():
                found = address
        return found

    def _worker_addresses(self) -> dict[str, str]:
        """Each worker VM's Dask address, by the VM's name, found at the VM's own address
        (see :meth:`_address_of`): what renewal and anything else done for one VM uses."""
        by_host = self._workers_by_host()
        found = {}
        for name, worker in list(getattr(self, "workers", {}).items()):
            vm = getattr(worker, "vm", None)
            if vm is not None and (address := self._address_of(vm, by_host)) is not None:
                found[name] = address
        return found
