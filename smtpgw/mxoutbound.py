"""
Relaying to the recipients' own mail servers (C{--relay mx}).

L{MXOutbound} splits a message's recipients by domain and delivers to each
domain at once, each on its own:

  1. L{MXResolver.hosts_for} names the domain's mail hosts, best first. A
     L{PermanentMXError} (null MX, no such domain, no mail host, invalid
     domain) bounces the domain's recipients with the error's RFC 3463
     status at the start of the reason (C{"5.1.10 example.com: ..."}), a
     L{TemporaryMXError} (SERVFAIL, timeout) defers them.
  2. The hosts are tried in order, at most C{max_hosts} of them, through the
     shared L{ConnectionPool} with opportunistic STARTTLS and no
     certificate check (RFC 7435: MX servers often have certificates that
     would not verify), falling back to plaintext when the handshake fails.
     The outcome the host gave each recipient is kept; the recipients that
     the host's failure left over (C{SendResult.retryable}) go to the next
     host at once. A recipient a host answered with C{4xx} or C{5xx} is not
     offered to another host.
  3. A host that failed (refused, timed out, TLS, C{421}, lost connection)
     is reported with L{MXResolver.mark_failed}, one that worked with
     L{MXResolver.mark_ok}. A host held back by the resolver after failing
     recently is not tried, so mail for a dead domain is deferred at once
     rather than waiting for a connection timeout each time (as Postfix
     throttles a dead destination); when every host of the domain is held
     back its recipients are deferred with status C{4.4.1}.
  4. When every host tried failed, the recipients still left are deferred
     with the last host's reason.

Only hosts the resolver named are contacted. At most C{max_per_domain}
deliveries to one domain are under way at once (each uses one connection at
a time, whichever of the domain's hosts it goes to); the pool limits the
connections per host and in all (C{--concurrency}). Internationalized
domains are grouped and sent by their A-label (C{bob@bücher.example} goes
out as C{bob@xn--bcher-kva.example}), so no SMTPUTF8 is needed for them; the
result names recipients as the envelope does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from attrs import evolve, frozen
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    ensureDeferred,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from smtpgw.interfaces import DeliveryResult, IOutbound
from smtpgw.model import Envelope
from smtpgw.mx import (
    MailHost,
    MXLookupError,
    MXResolver,
    PermanentMXError,
    TemporaryMXError,
    address_literal,
    to_a_label,
)
from smtpgw.relay import (
    CLOSE_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_MESSAGES_PER_CONNECTION,
    MAX_PER_DESTINATION,
    ConnectionPool,
    EndpointFactory,
)
from smtpgw.smtpclient import (
    ClientSettings,
    SessionPolicy,
    StartTLS,
    TLSFallback,
    TLSPolicy,
)

__all__ = [
    "MAX_HOSTS_PER_DELIVERY",
    "MAX_PER_DOMAIN",
    "MXOutbound",
    "recipient_domain",
]

MAX_PER_DOMAIN = 5
"""Deliveries to one recipient domain under way at once (so connections in
use for it, across its hosts)."""

MAX_HOSTS_PER_DELIVERY = 5
"""Mail hosts of a domain tried in one delivery before its recipients are
deferred (Postfix's C{smtp_mx_address_limit}): a domain with twenty dead MX
hosts must not hold a delivery for twenty connection timeouts."""

_DELIVERED = "delivered"
_DEFERRED = "deferred"
_BOUNCED = "bounced"


@frozen
class _Outcome:
    """
    What became of one recipient (as it went on the wire).

    @ivar kind: C{delivered}, C{deferred} or C{bounced}.
    @ivar reason: why, for the two failures.
    """

    kind: str
    reason: str = ""


@frozen
class _Recipient:
    """
    One envelope recipient: the domain it is routed by, and the address
    that goes in C{RCPT TO}.
    """

    domain: str
    key: str
    wire: str


def recipient_domain(recipient: str) -> str | None:
    """
    @param recipient: an envelope address (C{local@domain}; the local part
        may be quoted and hold an C{@}).
    @return: its domain as written, or L{None} when it has none.
    """
    local, at, domain = recipient.rpartition("@")
    if not at or not local or not domain:
        return None
    return domain


def _domain_key(domain: str) -> tuple[str, bool]:
    """
    @return: the form of C{domain} that recipients are grouped by (its
        A-label, or C{[address]} for an address literal; lower case when
        invalid, the resolver says why), and whether it is an address
        literal.
    """
    try:
        literal = address_literal(domain)
        if literal is not None:
            return f"[{literal}]", True
        return to_a_label(domain), False
    except MXLookupError:
        return domain.lower(), False


def _route(recipient: str) -> _Recipient | None:
    domain = recipient_domain(recipient)
    if domain is None:
        return None
    key, literal = _domain_key(domain)
    local = recipient[: -len(domain) - 1]
    wire = recipient
    if not literal and not domain.isascii() and key.isascii() and local.isascii():
        wire = f"{local}@{key}"
    return _Recipient(domain, key, wire)


def _outcomes(result: DeliveryResult) -> dict[str, _Outcome]:
    outcomes = {recipient: _Outcome(_DELIVERED) for recipient in result.delivered}
    outcomes.update((r, _Outcome(_DEFERRED, why)) for r, why in result.deferred)
    outcomes.update((r, _Outcome(_BOUNCED, why)) for r, why in result.bounced)
    return outcomes


def _every(recipients: Iterable[str], kind: str, reason: str) -> dict[str, _Outcome]:
    return {recipient: _Outcome(kind, reason) for recipient in recipients}


@implementer(IOutbound)
class MXOutbound(Service):
    """
    Delivers each message to the mail hosts of its recipients' domains (see
    the module docstring for the rules).

    It is a service: deliveries are taken between C{startService} and
    C{stopService}; at any other time they are deferred. Stopping cancels
    the MX lookups under way (their recipients are deferred) and closes the
    pool (see L{ConnectionPool.close}); a host is never marked failed
    because the relay was stopping.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        resolver: MXResolver,
        *,
        settings: ClientSettings | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_per_domain: int = MAX_PER_DOMAIN,
        max_per_host: int = MAX_PER_DESTINATION,
        max_hosts: int = MAX_HOSTS_PER_DELIVERY,
        starttls: StartTLS | str = StartTLS.OPPORTUNISTIC,
        tls_fallback: TLSFallback | str = TLSFallback.PLAINTEXT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_messages_per_connection: int = MAX_MESSAGES_PER_CONNECTION,
        close_timeout: float = CLOSE_TIMEOUT,
        endpoint_factory: EndpointFactory | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param reactor: connects and keeps time.
        @param resolver: names the mail hosts of a domain and remembers the
            hosts that failed; the only source of destinations.
        @param settings: HELO name, timeouts, pipelining.
        @param max_connections: connections at once in all (C{--concurrency}).
        @param max_per_domain: see L{MAX_PER_DOMAIN}; at least 1.
        @param max_per_host: connections at once to one host:port.
        @param max_hosts: see L{MAX_HOSTS_PER_DELIVERY}; at least 1.
        @param starttls: C{opportunistic} (the default), C{require} or
            C{never} (or a L{StartTLS}); certificates are never verified.
        @param tls_fallback: with opportunistic STARTTLS, what a failed
            handshake leads to: C{plaintext} (the default: the same host
            again without STARTTLS) or C{defer}.
        @param idle_timeout: see L{smtpgw.relay.IDLE_TIMEOUT}.
        @param max_messages_per_connection: see
            L{smtpgw.relay.MAX_MESSAGES_PER_CONNECTION}.
        @param close_timeout: see L{smtpgw.relay.CLOSE_TIMEOUT}.
        @param endpoint_factory: see L{ConnectionPool}.
        @param clock: see L{ConnectionPool}.
        """
        for name, value in (("max_per_domain", max_per_domain), ("max_hosts", max_hosts)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        self.resolver = resolver
        self.policy = SessionPolicy(
            tls=TLSPolicy(
                starttls=StartTLS(starttls), fallback=TLSFallback(tls_fallback), verify=False
            )
        )
        self.pool = ConnectionPool(
            reactor,
            settings,
            max_connections=max_connections,
            max_per_destination=max_per_host,
            idle_timeout=idle_timeout,
            max_messages_per_connection=max_messages_per_connection,
            endpoint_factory=endpoint_factory,
            clock=clock,
        )
        self._max_per_domain = max_per_domain
        self._max_hosts = max_hosts
        self._close_timeout = close_timeout
        self._slots: dict[str, DeferredSemaphore] = {}
        self._lookups: set[Deferred[list[MailHost]]] = set()
        self._stopping = False

    # -- public

    def deliveries_to(self, domain: str) -> int:
        """
        @param domain: a recipient domain (any case, U-label or A-label).
        @return: deliveries to it under way now (sending, or waiting for a
            connection of the pool).
        """
        semaphore = self._slots.get(_domain_key(domain)[0])
        return 0 if semaphore is None else semaphore.limit - semaphore.tokens

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        """
        Send the message to every recipient domain's mail hosts; never
        fails (see L{IOutbound}).
        """
        if not self.running or self._stopping:
            reason = "4.3.2 the MX relay is not running"
            return succeed(
                DeliveryResult(deferred=tuple((r, reason) for r in envelope.recipients))
            )
        return ensureDeferred(self._deliver(envelope, body))

    def startService(self) -> None:
        self._stopping = False
        super().startService()

    def stopService(self) -> Deferred[None]:
        """
        Defer what waits for DNS or a connection, let messages under way
        finish, close connections.
        """
        self._stopping = True
        super().stopService()
        for lookup in list(self._lookups):
            lookup.cancel()
        return self.pool.close(self._close_timeout)

    # -- one message

    async def _deliver(self, envelope: Envelope, body: bytes) -> DeliveryResult:
        routes: dict[str, _Recipient] = {}
        domains: dict[str, list[_Recipient]] = {}
        outcomes: dict[str, _Outcome] = {}
        for recipient in envelope.recipients:
            if recipient in routes or recipient in outcomes:
                continue
            route = _route(recipient)
            if route is None:
                outcomes[recipient] = _Outcome(_BOUNCED, "5.1.3 the address has no domain")
                continue
            routes[recipient] = route
            domains.setdefault(route.key, []).append(route)
        attempts = [
            ensureDeferred(self._deliver_domain(envelope, body, members))
            for members in domains.values()
        ]
        wire_outcomes = dict(zip(domains, await gatherResults(attempts), strict=True))
        for recipient, route in routes.items():
            outcome = wire_outcomes[route.key].get(route.wire)
            outcomes[recipient] = outcome or _Outcome(_DEFERRED, "no outcome for the recipient")
        return _merge(envelope.recipients, outcomes)

    async def _deliver_domain(
        self, envelope: Envelope, body: bytes, members: Sequence[_Recipient]
    ) -> dict[str, _Outcome]:
        """
        @return: the outcome of every recipient of one domain, by the
            address that went on the wire; never raises.
        """
        domain = members[0].domain
        wire = tuple(dict.fromkeys(member.wire for member in members))
        try:
            return await self._to_domain(envelope, body, domain, members[0].key, wire)
        except Exception:
            self._log.failure(
                "delivery of {queue_id} to {domain} failed",
                queue_id=envelope.queue_id,
                domain=domain,
            )
            return _every(wire, _DEFERRED, "4.3.0 internal error")

    async def _to_domain(
        self, envelope: Envelope, body: bytes, domain: str, key: str, wire: tuple[str, ...]
    ) -> dict[str, _Outcome]:
        try:
            hosts = await self._hosts(domain)
        except PermanentMXError as error:
            return _every(wire, _BOUNCED, f"{error.status} {error}")
        except TemporaryMXError as error:
            return _every(wire, _DEFERRED, f"{error.status} {error}")
        except CancelledError:
            return _every(wire, _DEFERRED, "4.3.2 the MX relay is stopping")
        semaphore = self._slots.get(key)
        if semaphore is None:
            semaphore = self._slots[key] = DeferredSemaphore(self._max_per_domain)
        await semaphore.acquire()
        try:
            return await self._try_hosts(envelope, body, domain, hosts, wire)
        finally:
            semaphore.release()
            if semaphore.tokens == semaphore.limit and not semaphore.waiting:
                self._slots.pop(key, None)

    async def _hosts(self, domain: str) -> list[MailHost]:
        lookup = self.resolver.hosts_for(domain)
        if lookup.called:
            return await lookup
        self._lookups.add(lookup)
        try:
            return await lookup
        finally:
            self._lookups.discard(lookup)

    async def _try_hosts(
        self,
        envelope: Envelope,
        body: bytes,
        domain: str,
        hosts: Sequence[MailHost],
        remaining: tuple[str, ...],
    ) -> dict[str, _Outcome]:
        outcomes: dict[str, _Outcome] = {}
        tried = 0
        for host in hosts:
            if self._stopping or not remaining or tried >= self._max_hosts:
                break
            if self.resolver.is_down(host):
                continue
            tried += 1
            sent = await self.pool.send(
                host.name, host.port, evolve(envelope, recipients=remaining), body, self.policy
            )
            outcomes.update(_outcomes(sent.result))
            if self._stopping:
                break
            if sent.host_failure is None:
                self.resolver.mark_ok(host)
            else:
                self.resolver.mark_failed(host)
            retry = set(sent.retryable)
            remaining = tuple(r for r in remaining if r in retry)
            if remaining and sent.host_failure is not None:
                self._log.info(
                    "{queue_id}: mail host {host} of {domain} failed ({reason});"
                    " {count} recipient(s) left",
                    queue_id=envelope.queue_id,
                    host=host.name,
                    domain=domain,
                    reason=sent.host_failure,
                    count=len(remaining),
                )
        if self._stopping:
            reason = "4.3.2 the MX relay is stopping"
            for recipient in remaining:
                outcomes.setdefault(recipient, _Outcome(_DEFERRED, reason))
        elif tried == 0:
            names = ", ".join(sorted({h.name for h in hosts}))
            reason = f"4.4.1 {domain}: every mail host failed recently and is held back ({names})"
            outcomes.update(_every(remaining, _DEFERRED, reason))
        return outcomes


def _merge(recipients: Sequence[str], outcomes: dict[str, _Outcome]) -> DeliveryResult:
    """
    One result with every envelope recipient, in envelope order.
    """
    delivered: list[str] = []
    deferred: list[tuple[str, str]] = []
    bounced: list[tuple[str, str]] = []
    for recipient in recipients:
        outcome = outcomes[recipient]
        if outcome.kind == _DELIVERED:
            delivered.append(recipient)
        elif outcome.kind == _BOUNCED:
            bounced.append((recipient, outcome.reason))
        else:
            deferred.append((recipient, outcome.reason))
    return DeliveryResult(tuple(delivered), tuple(deferred), tuple(bounced))
