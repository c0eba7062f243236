"""How a cluster shows itself: ``repr``, the notebook's HTML repr, and ``get_logs``
with every VM's console.

Mixed into :class:`~dask_secure_cloud.cluster.VMCluster`.
"""

from __future__ import annotations

import html

from distributed.deploy.cluster import Log, Logs
from distributed.deploy.spec import SpecCluster

from .upkeep import human

__all__ = ["Display"]


class Display(SpecCluster):
    """The text and HTML summaries and the logs."""

    async def _get_logs(
        self, cluster: bool = True, scheduler: bool = True, workers: bool = True
    ) -> Logs:
        logs = await super()._get_logs(cluster, scheduler, workers)
        if cluster:
            for vm_name, text in (await self.fleet.consoles()).items():
                logs[f"{vm_name} console"] = Log(text)
        return logs

    def _summary(self) -> dict[str, str]:
        """What the text and HTML reprs show: where, how many VMs, and the TLS state."""
        workers = len(getattr(self, "workers", {}) or {})
        scheduler = 1 if getattr(self, "scheduler", None) is not None else 0
        summary = {
            "provider": self.provider,
            "location": self.driver.where() or "-",
            "vms": f"{scheduler + workers} ({scheduler} scheduler, {workers} workers)",
            "tls": "off" if self.protocol == "tcp" else "on",
            "idle_timeout": (
                "off" if self.options.idle_timeout is None else human(self.options.idle_timeout)
            ),
        }
        cost, note = self._shown_cost()
        if cost is not None:
            summary["cost"] = cost.short(len(getattr(self, "worker_spec", {}) or {})) + note
        if getattr(self, "_replacements", None) and (gone := self._workers_gone_report()):
            summary["workers gone"] = "; ".join(gone)
        if self._credentials is not None:
            summary["ca"] = self._credentials.ca_fingerprint
            summary["expires"] = f"{self._credentials.not_after:%Y-%m-%d %H:%M} UTC"
        elif self._given_security is not None:
            summary["ca"] = "your own"
        return summary

    def __repr__(self) -> str:
        summary = self._summary()
        if "ca" in summary and self._credentials is not None:
            summary["ca"] = summary["ca"][:11] + "..."
        fields = ", ".join(f"{k}={v}" for k, v in summary.items())
        address = getattr(self, "scheduler_address", "<not started>")
        return f"{type(self).__name__}({self.cluster_id}, {address!r}, {fields})"

    def _repr_html_(self, cluster_status: str | None = None) -> str:
        rows = "".join(
            f"<tr><th style='text-align: left'>{html.escape(k)}</th>"
            f"<td style='text-align: left'>{html.escape(v)}</td></tr>"
            for k, v in self._html_summary().items()
        )
        return super()._repr_html_(cluster_status=f"<table>{rows}</table>{cluster_status or ''}")

    def _html_summary(self) -> dict[str, str]:
        """The summary with the cost spelled out: how it adds up, its source and age."""
        summary = self._summary()
        cost, note = self._shown_cost()
        if cost is not None:
            summary["cost"] = cost.describe(len(getattr(self, "worker_spec", {}) or {})) + note
        return summary
