"""The client's side of enrollment: one single-use token per VM, and the checks that
turn a VM's certificate request into its certificate.

A VM's user-data carries the CA certificate and a token, never a private key. The VM
makes its key at boot (``enroll.py``) and proves it holds its token by answering the
client's fresh nonce with an HMAC over its name and its certificate request. The client
signs only when:

- the answer names the VM the client asked (a token presented for another VM fails);
- the proof matches that VM's token, for this nonce (a recorded answer fails);
- the token's boot window is still open (an expired token fails);
- the token has not certified another key before (a replayed token fails; the same key
  asking again, because a reply was lost, gets the same certificate).

The request itself must be for an ECDSA P-256 key, signed by that key, with the VM's
own name as its only subject; a key is recorded on the token only once it is signed.

Whatever answers at a VM's address may be hostile, so every answer is data to check,
never trusted to be well formed: a bad one (not an object, not a request, another key
type, another name, not ASCII where a proof or PEM must be) refuses that VM alone, with
a warning in the log and an ``enrollment_refused`` event in the audit log, and the
others enrol on. A refused VM is asked again next round: its real answer still counts.

The scheduler is asked directly, on its port, before its Dask starts; workers through
the scheduler's ``secure_cloud_enroll_relay`` (see ``vm/relays.py``), in one batch per round.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from . import audit
from .credentials import CLOCK_SKEW, ClusterCredentials, Role
from .errors import EnrollmentRefused
from .vm.enroll import LINE_LIMIT, proof

__all__ = [
    "Enrollment",
    "EnrollmentRefused",
    "RelayedEnrollment",
    "Ticket",
    "ask_directly",
]

logger = logging.getLogger(__name__)

#: A reply lost in transit is asked again within this many seconds.
_ASK_TIMEOUT = 15.0
#: How much of a VM's own words a refusal quotes (its error, its name): enough to tell
#: what went wrong, not enough for a hostile VM to fill the log.
_QUOTE = 200
#: Distinct refusals logged and audited per VM: one refused for ever new reasons (its
#: own error text) stops there.
_AUDITED_REFUSALS = 10


@dataclass
class Ticket:
    """One VM's token and what became of it."""

    role: Role
    token: str
    expires: float  # time.time()
    #: Where the VM answers (``Driver.enrollment_port``).
    port: int
    #: The public key this token certified, and its certificate: the token's one use.
    public_key: bytes | None = None
    cert_pem: str | None = None
    done: bool = False
    #: When the VM's current certificate expires (renewals move it on).
    not_after: datetime.datetime | None = None


class Enrollment:
    """Tokens for the VMs of one cluster, the checks before the CA signs, and each VM's
    current certificate.

    ``window`` is how long after its user-data is made a VM may enrol: the boot
    timeout, plus a margin for the cloud to create the VM. Certificates live
    ``lifetime`` (``certificate_lifetime``), within the CA's own.
    """

    def __init__(
        self,
        credentials: ClusterCredentials,
        window: datetime.timedelta,
        lifetime: datetime.timedelta,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.credentials = credentials
        self.window = window
        self.lifetime = lifetime
        self._clock = clock
        self._tickets: dict[str, Ticket] = {}
        #: Each VM's last refusal, and its distinct ones: logged and audited once each.
        self._last_refusal: dict[str, str] = {}
        self._refusals: dict[str, set[str]] = {}

    def ticket(self, role: Role, name: str, port: int) -> str:
        """A fresh token for the VM ``name`` (its user-data's), which answers on ``port``;
        it replaces any earlier one."""
        token = secrets.token_urlsafe(24)
        expires = self._clock() + self.window.total_seconds()
        self._tickets[name] = Ticket(Role(role), token, expires, port)
        return token

    def port(self, name: str) -> int:
        return self._tickets[name].port

    @staticmethod
    def nonce() -> str:
        return secrets.token_hex(16)

    def certificate_for(self, name: str, nonce: str, answer: Mapping[str, Any]) -> str:
        """Check ``answer`` to ``nonce`` from the VM the client asked as ``name``, and
        sign its request; raise :class:`EnrollmentRefused` naming why not."""
        if not isinstance(answer, Mapping):
            raise EnrollmentRefused(f"{name}: its answer is not a JSON object: {_quoted(answer)}")
        if "error" in answer:
            raise EnrollmentRefused(f"{name}: {_quoted(answer['error'])}")
        if "unreachable" in answer:
            raise EnrollmentRefused(f"{name}: {_quoted(answer['unreachable'])}")
        if "malformed" in answer:  # the scheduler's relay could not pass it on as it was
            raise EnrollmentRefused(f"{name}: a malformed answer: {_quoted(answer['malformed'])}")
        claimed, csr_pem, given = (answer.get(k) for k in ("name", "csr", "proof"))
        if not all(isinstance(v, str) for v in (claimed, csr_pem, given)):
            raise EnrollmentRefused(f"{name}: the answer lacks a name, request or proof")
        assert isinstance(claimed, str) and isinstance(csr_pem, str) and isinstance(given, str)
        if claimed != name:
            raise EnrollmentRefused(
                f"{name}: the VM at its address answered as {claimed!r:.{_QUOTE}}; refused"
            )
        ticket = self._tickets.get(name)
        if ticket is None:
            raise EnrollmentRefused(f"{name}: no enrollment token was issued for this VM")
        # A proof is hex and a request PEM: ASCII, the only strings compare_digest and
        # the proof's UTF-8 encoding take without raising.
        if not (
            given.isascii()
            and csr_pem.isascii()
            and hmac.compare_digest(proof(ticket.token, name, nonce, csr_pem), given)
        ):
            raise EnrollmentRefused(f"{name}: the proof does not match this VM's token")
        if ticket.done:
            raise EnrollmentRefused(f"{name}: its token was used already")
        if self._clock() > ticket.expires:
            raise EnrollmentRefused(f"{name}: its token expired with its boot window")
        public = _requested_key(name, csr_pem)
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if ticket.public_key is not None:
            if ticket.public_key != der:
                raise EnrollmentRefused(f"{name}: its token certified another key already")
            assert ticket.cert_pem is not None
            return ticket.cert_pem  # the same key again: its reply was lost
        # Recorded only once signed: a request refused here leaves the token unspent.
        cert_pem, not_after = self.sign(ticket.role, name, public)
        ticket.public_key, ticket.cert_pem, ticket.not_after = der, cert_pem, not_after
        return cert_pem

    def sign(self, role: Role, name: str, public_key: Any) -> tuple[str, datetime.datetime]:
        """A certificate for ``public_key`` as ``name``, living ``lifetime`` from now."""
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.timezone.utc)
        not_after = min(now + self.lifetime, self.credentials.not_after)
        cert = self.credentials.certify(
            role, name, public_key, not_before=now - CLOCK_SKEW, not_after=not_after
        )
        return cert, not_after

    def renewal(self, name: str, csr_pem: str) -> tuple[str, datetime.datetime]:
        """Sign the request of an enrolled VM, asked over its authenticated channel (its
        key is new, its identity the one it enrolled with). :meth:`renewed` records it
        once the VM has installed it."""
        ticket = self._tickets.get(name)
        if ticket is None or not ticket.done:
            raise EnrollmentRefused(f"{name}: not enrolled, so not renewed")
        # Its subject is not checked: the name certified is the client's anyway, and a
        # VM's renewal request has named its role, not its name, before now.
        return self.sign(ticket.role, name, _requested_key(name, csr_pem, subject=False))

    def renewed(self, name: str, cert_pem: str, not_after: datetime.datetime) -> None:
        ticket = self._tickets.get(name)
        if ticket is not None:
            ticket.cert_pem, ticket.not_after = cert_pem, not_after

    def enrolled(self) -> dict[str, Ticket]:
        """The VMs that hold a certificate, by name."""
        return {name: t for name, t in self._tickets.items() if t.done}

    def forget(self, name: str) -> None:
        """The VM ``name`` is gone: nothing of it is renewed or accepted again."""
        self._tickets.pop(name, None)
        self._refusals.pop(name, None)
        self._last_refusal.pop(name, None)

    def confirm(self, name: str, answer: Mapping[str, Any]) -> None:
        """The VM accepted its certificate: its token is spent for good."""
        if not isinstance(answer, Mapping) or answer.get("ok") is not True:
            why: object = answer
            if isinstance(answer, Mapping):
                said = (answer.get(k) for k in ("error", "unreachable", "malformed"))
                why = next((w for w in said if w), answer)
            raise EnrollmentRefused(f"{name}: did not accept its certificate: {_quoted(why)}")
        self._tickets[name].done = True

    async def refused(self, name: str, why: str) -> bool:
        """Record that an answer for ``name`` was refused, in the audit log; whether it
        is news (the first refusal for that reason), for the caller to log. A VM asked
        every round is recorded once per reason, not once per round."""
        self._last_refusal[name] = why
        seen = self._refusals.setdefault(name, set())
        if why in seen or len(seen) >= _AUDITED_REFUSALS:
            return False
        seen.add(why)
        ticket = self._tickets.get(name)
        await audit.record_async(
            "enrollment_refused",
            self.credentials.cluster_id,
            name=name,
            role=ticket.role.value if ticket is not None else None,
            reason=why,
        )
        return True

    def refusal(self, name: str) -> str | None:
        """Why ``name``'s last refused answer was refused, for its boot-failure report."""
        return self._last_refusal.get(name)

    def certificate(self, name: str) -> str | None:
        """The certificate ``name`` was given, once it accepted it."""
        ticket = self._tickets.get(name)
        return ticket.cert_pem if ticket is not None and ticket.done else None

    async def enroll(
        self, name: str, ask: Callable[[Mapping[str, Any]], Awaitable[Mapping[str, Any]]]
    ) -> str:
        """The whole exchange with one VM over ``ask`` (one line out, one line back)."""
        nonce = self.nonce()
        try:
            cert = self.certificate_for(name, nonce, await ask({"nonce": nonce}))
            self.confirm(name, await ask({"cert": cert}))
        except EnrollmentRefused as e:
            await self.refused(name, str(e))
            raise
        return cert


def _quoted(value: object) -> str:
    """A VM's own words in a refusal: printable (no line of the log forged), and short."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= _QUOTE else text[:_QUOTE] + "..."


def _key_kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    return type(key).__name__


def _requested_key(
    name: str, csr_pem: object, *, subject: bool = True
) -> ec.EllipticCurvePublicKey:
    """The key a VM's certificate request asks to be certified as ``name``: refused
    unless the request is signed by that key, the key is ECDSA P-256 (the only kind the
    CA certifies) and, with ``subject``, the request names ``name`` and nothing else (a
    request for another name is a VM confused or lying about who it is, even though the
    name certified is always the client's)."""
    if not isinstance(csr_pem, str) or not csr_pem.isascii():
        raise EnrollmentRefused(f"{name}: not a certificate request: {_quoted(csr_pem)}")
    try:
        request = x509.load_pem_x509_csr(csr_pem.encode())
        signed = request.is_signature_valid
        key = request.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise EnrollmentRefused(f"{name}: not a certificate request: {_quoted(str(e))}") from None
    if not signed:
        raise EnrollmentRefused(f"{name}: the request is not signed by its key")
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise EnrollmentRefused(
            f"{name}: the request is for an {_key_kind(key)} key; "
            "only ECDSA P-256 keys are certified"
        )
    if subject and [(a.oid, a.value) for a in request.subject] != [(NameOID.COMMON_NAME, name)]:
        raise EnrollmentRefused(
            f"{name}: the request is for {_quoted(request.subject.rfc4514_string())}, "
            f"not CN={name}; refused"
        )
    return key


async def ask_directly(host: str, port: int, line: Mapping[str, Any]) -> Mapping[str, Any]:
    """One request to a VM's enrollment port, straight from this process: its answer,
    or ``{"malformed": why}`` when what came back cannot be one (for
    :meth:`Enrollment.certificate_for` to refuse, as the scheduler's relay does).
    Raises ``OSError`` or ``TimeoutError`` while nothing answers."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, limit=LINE_LIMIT), _ASK_TIMEOUT
    )
    try:
        writer.write(json.dumps(line).encode() + b"\n")
        try:
            raw = await asyncio.wait_for(reader.readline(), _ASK_TIMEOUT)
        except ValueError:  # the stream's limit
            return {"malformed": f"a line longer than {LINE_LIMIT} bytes"}
    finally:
        writer.close()
    if not raw:
        raise ConnectionError(f"{host}:{port} closed the connection without an answer")
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        return {"malformed": f"not JSON: {type(e).__name__}"}
    if not isinstance(answer, dict):
        return {"malformed": f"not a JSON object: {type(answer).__name__}"}
    return answer


Relay = Callable[[list[list[Any]]], Awaitable[Sequence[Mapping[str, Any]]]]


class RelayedEnrollment:
    """Workers enrolled through the scheduler, all booting workers in one relay call
    per round (two calls per round: nonces out, certificates out), however many boot.

    A worker starts answering a fraction of a second after it boots, so rounds come
    quickly at first (``FIRST_PAUSE``, doubling up to ``interval``) and again whenever
    a worker is added or certified: a pause of ``interval`` would be its boot's delay.

    ``relay`` sends ``[[host, port, line], ...]`` through the scheduler and returns the
    answers in order; it raises ``OSError`` while the scheduler cannot be reached.
    """

    #: The pause after a round that certified nothing, doubled each such round.
    FIRST_PAUSE = 0.1

    def __init__(
        self,
        enrollment: Enrollment,
        relay: Relay,
        *,
        interval: float,
        on_enrolled: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self.enrollment = enrollment
        self.relay = relay
        self.interval = interval
        self.on_enrolled = on_enrolled
        self._pending: dict[str, tuple[str, asyncio.Future[str]]] = {}
        self._task: asyncio.Task[None] | None = None
        #: A worker was added or certified since the last pause: pause briefly again.
        self._news = False

    def add(self, name: str, host: str) -> asyncio.Future[str]:
        """Enrol the worker ``name`` booting at ``host``; the future is its certificate."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[name] = (host, future)
        self._news = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
            self._task.add_done_callback(self._stopped)
        return future

    def discard(self, name: str) -> None:
        entry = self._pending.pop(name, None)
        if entry is not None and not entry[1].done():
            entry[1].cancel()

    def refusal(self, name: str) -> str | None:
        """Why ``name``'s last answer was refused, for its boot-failure report."""
        return self.enrollment.refusal(name)

    async def _run(self) -> None:
        pause = self.FIRST_PAUSE
        while self._pending:
            try:
                await self._round()
            except OSError as e:  # the scheduler is not reachable (yet): try again
                logger.debug("enrollment relay failed: %s", e)
            if self._pending:
                news, self._news = self._news, False
                pause = self.FIRST_PAUSE if news else min(pause * 2, self.interval)
                await asyncio.sleep(pause)

    @staticmethod
    def _stopped(task: asyncio.Task[None]) -> None:
        """Never fail in silence: booting workers would wait for ever without a word."""
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "Enrollment of booting workers stopped; they cannot join",
                exc_info=task.exception(),
            )

    async def _relay(self, lines: list[list[Any]]) -> Sequence[Any]:
        """The answers to ``lines``, one each, or ``ConnectionError``. Each answer is
        what a VM said, checked by :meth:`Enrollment.certificate_for`: one VM's garbage
        must cost that VM its round, not everyone's."""
        answers = await self.relay(lines)
        if not isinstance(answers, (list, tuple)) or len(answers) != len(lines):
            # Dask answers None for an operation it has no handler for, and the
            # scheduler's preload adds the relay just after the scheduler listens.
            raise ConnectionError(f"the scheduler's relay is not ready: {answers!r:.100}")
        return answers

    async def _round(self) -> None:
        names = list(self._pending)
        nonces = {name: self.enrollment.nonce() for name in names}
        answers = await self._relay(
            [[self._pending[n][0], self._port(n), {"nonce": nonces[n]}] for n in names]
        )
        certified: dict[str, str] = {}
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, Mapping) and "unreachable" in answer:
                continue  # still booting
            try:
                certified[name] = self.enrollment.certificate_for(name, nonces[name], answer)
            except EnrollmentRefused as e:
                await self._refuse(name, str(e))
        names = [n for n in certified if n in self._pending]
        if not names:
            return
        answers = await self._relay(
            [[self._pending[n][0], self._port(n), {"cert": certified[n]}] for n in names]
        )
        for name, answer in zip(names, answers, strict=True):
            if name not in self._pending:
                continue  # its VM was closed meanwhile, and its token forgotten
            try:
                self.enrollment.confirm(name, answer)
            except EnrollmentRefused as e:
                await self._refuse(name, str(e))
                continue
            _, future = self._pending.pop(name, (None, None))
            self._news = True  # the others are likely about as far along
            if future is not None and not future.done():
                future.set_result(certified[name])
            if self.on_enrolled is not None:
                await self.on_enrolled(name, certified[name])

    def _port(self, name: str) -> int:
        return self.enrollment.port(name)

    async def _refuse(self, name: str, why: str) -> None:
        if await self.enrollment.refused(name, why):
            logger.warning("Enrollment of %s refused: %s", name, why)

    async def close(self) -> None:
        for name in list(self._pending):
            self.discard(name)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
