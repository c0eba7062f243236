"""The client's side of renewal: every VM's certificate, renewed at half its life.

A VM's certificate lives ``certificate_lifetime`` (hours by default). While the client
runs, it asks each enrolled VM for a certificate request for a key the VM makes afresh
(``secure_cloud_renew`` ``request``), signs it with the identity the VM enrolled with,
and hands the certificate back (``install``); the VM loads it into every live TLS
context, so new connections use it and none is dropped (see ``vm/certificate.py``). The
scheduler is asked directly; a worker through the scheduler
(``secure_cloud_renew_relay``), over the same mutual TLS that carries the client's
other calls. Only the client's certificate may ask.

A worker is reached at the address its VM was launched with, never found by the name
a Dask worker gives itself: a key stolen from one VM could otherwise register a worker
under another VM's name (or its own, elsewhere) and be handed that VM's renewed
certificate at every half-life. The scheduler relays the request only to a worker whose
certificate bears the name renewed.

When the client is gone nothing is renewed: each VM's server closes when its
certificate expires, and the VM powers off, a second guard besides the lease.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .credentials import Role
from .enrollment import Enrollment, EnrollmentRefused

__all__ = ["Renewal", "renewal_interval"]

logger = logging.getLogger(__name__)

#: How many VMs renew at once: each costs the VM a key and the client a signature.
_CONCURRENT = 16

Call = Callable[..., Awaitable[Any]]


def renewal_interval(lifetime: datetime.timedelta) -> datetime.timedelta:
    """How often the client looks for certificates past half their life: an eighth of a
    lifetime, between 5 seconds and 5 minutes."""
    eighth = lifetime / 8
    return max(datetime.timedelta(seconds=5), min(eighth, datetime.timedelta(minutes=5)))


class Renewal:
    """Renew each enrolled VM's certificate once less than half its life remains.

    ``call`` calls a handler on the scheduler (the cluster's ``scheduler_comm``);
    ``workers`` maps each worker VM's name to the Dask address of the worker listening
    on that VM's own address, as the fleet launched it (not as a worker names itself).
    ``on_renewed(name, cert)`` records each renewal.
    """

    def __init__(
        self,
        enrollment: Enrollment,
        call: Callable[[], Any],
        workers: Callable[[], Mapping[str, str]],
        *,
        on_renewed: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self.enrollment = enrollment
        self._scheduler = call
        self._workers = workers
        self.on_renewed = on_renewed
        self._running: asyncio.Task[list[str]] | None = None
        #: Renewals done, by VM name: for the cluster's log and for tests.
        self.count: dict[str, int] = {}

    def due(self, now: datetime.datetime | None = None) -> list[str]:
        """The enrolled VMs whose certificate has less than half its life left."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        half = self.enrollment.lifetime / 2
        return [
            name
            for name, ticket in self.enrollment.enrolled().items()
            if ticket.not_after is not None and ticket.not_after - now < half
        ]

    async def tick(self) -> list[str]:
        """Renew what is due; one round at a time (a slow round is not doubled)."""
        if self._running is not None and not self._running.done():
            return []
        self._running = asyncio.ensure_future(self._round())
        return await asyncio.shield(self._running)

    async def _round(self) -> list[str]:
        due = self.due()
        if not due:
            return []
        slots = asyncio.Semaphore(_CONCURRENT)
        workers = self._workers()

        async def one(name: str) -> str | None:
            async with slots:
                try:
                    await self.renew(name, workers)
                except (OSError, EnrollmentRefused, ValueError, KeyError) as e:
                    # Retried next round, well before expiry: say so once per round.
                    logger.warning("Renewing the certificate of %s failed: %s", name, e)
                    return None
                return name

        done = await asyncio.gather(*(one(name) for name in due))
        return [name for name in done if name is not None]

    async def renew(self, name: str, workers: Mapping[str, str]) -> str:
        ticket = self.enrollment.enrolled()[name]
        scheduler = self._scheduler()
        if scheduler is None:
            raise OSError("the scheduler is not reachable")
        if ticket.role is Role.SCHEDULER:
            ask = scheduler.secure_cloud_renew
        else:
            if name not in workers:
                raise KeyError(f"no worker is connected from {name}'s VM address")
            address = workers[name]

            def ask(**line: Any) -> Awaitable[Any]:
                return scheduler.secure_cloud_renew_relay(address=address, name=name, **line)

        request = await ask(step="request")
        cert, not_after = self.enrollment.renewal(name, request)
        await ask(step="install", cert=cert)
        self.enrollment.renewed(name, cert, not_after)
        self.count[name] = self.count.get(name, 0) + 1
        if self.on_renewed is not None:
            await self.on_renewed(name, cert)
        return cert
