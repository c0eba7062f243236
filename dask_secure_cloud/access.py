"""How the user and their other processes reach a running cluster: the dashboard's link
on this machine, a ``Security`` for another process, and the cluster CA's fingerprint
and end.

Mixed into :class:`~dask_secure_cloud.cluster.VMCluster`.
"""

from __future__ import annotations

import datetime

from distributed.deploy.spec import SpecCluster
from distributed.security import Security

from .errors import OptionError

__all__ = ["Access"]


class Access(SpecCluster):
    """The dashboard link, ``portable_security`` and the CA's identity."""

    def _plain_dashboard_port(self) -> int | None:
        """The port of the scheduler's plain-HTTP dashboard, if it serves one."""
        port = self.scheduler_info.get("services", {}).get("dashboard")
        return int(port) if port else None

    @property
    def dashboard_link(self) -> str:
        """The scheduler's dashboard, on this machine: a proxy on ``127.0.0.1`` forwards
        it, over mutual TLS with the cluster's own CA, as plain HTTP with
        ``security=False`` (see ``dashboard.py``)."""
        if self._dashboard is not None:
            return self._dashboard.link
        if self._credentials is None and self.options.security is False:
            return super().dashboard_link
        # A user's own Security: the dashboard is the scheduler VM's alone (its
        # loopback); no link from here would answer.
        return ""

    def portable_security(
        self, name: str, lifetime: datetime.timedelta | str | float | None = None
    ) -> Security:
        """A ``Security`` for another process (a second notebook, a job runner) to
        connect to this cluster's scheduler as a client.

        It carries a client certificate and key of its own, named ``name`` in its
        certificate, so handing it over never hands over this process's key. Nothing
        renews it once handed over: it is valid for ``lifetime`` (``certificate_lifetime``
        unless given, at most until the CA's end). It may be pickled; treat it as a
        password.
        """
        if self._credentials is None:
            raise OptionError(
                "portable_security: this cluster has no CA of its own (security=False or a "
                "given Security); pass your own Security to the other process instead"
            )
        return self._credentials.portable_client_security(name, lifetime)

    @property
    def ca_fingerprint(self) -> str | None:
        """SHA-256 fingerprint of the cluster CA, or ``None`` without generated TLS."""
        return self._credentials.ca_fingerprint if self._credentials else None

    @property
    def certificates_expire(self) -> datetime.datetime | None:
        return self._credentials.not_after if self._credentials else None
