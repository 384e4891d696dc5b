"""
Where mail for a domain goes: MX resolution with C{twisted.names}.

L{MXResolver.hosts_for} answers with I{every} mail host of a domain, best
first, or fails with an L{MXLookupError} that says whether the caller should
bounce (L{PermanentMXError}) or retry later (L{TemporaryMXError}):

  - MX records, in preference order; hosts of equal preference are shuffled
    (with an injectable random) so that the load spreads over them;
  - no MX record (NODATA): the domain itself, when it has an A or AAAA record
    (the "implicit MX" of RFC 5321 section 5.1);
  - a null MX (RFC 7505: a single MX whose target is the root ".") means the
    domain accepts no mail: L{NullMX};
  - NXDOMAIN: L{NoSuchDomain}; neither MX nor address: L{NoMailHost};
  - SERVFAIL, REFUSED, a timeout or any other resolver trouble:
    L{TemporaryMXError};
  - an address literal (C{[192.0.2.1]}, C{[IPv6:2001:db8::1]}) is that host.

Internationalized domains are looked up by their A-label (IDNA 2008 with the
UTS 46 mapping). Only the injected L{IResolver} is ever asked anything.

Answers are cached for their TTL (negative answers for the SOA minimum, at
most C{negative_ttl}) in a bounded LRU cache, and concurrent lookups of one
domain share one query.

Host failure memory (see L{HostFailurePolicy}): a host that the caller
reports with L{MXResolver.mark_failed} is I{down} for a while, and
L{MXResolver.hosts_for} puts down hosts after every host that is up (still
returning them, so that a delivery with nowhere else to go can try them).
L{MXResolver.mark_ok} clears the record.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import random as _random
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, cast

import idna
from attrs import field, frozen
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSQueryRefusedError, DNSServerError
from twisted.python.failure import Failure

__all__ = [
    "DEFAULT_DNS_TIMEOUTS",
    "MAX_CNAME_CHAIN",
    "HostFailurePolicy",
    "InvalidDomain",
    "MXLookupError",
    "MXResolver",
    "MailHost",
    "NoMailHost",
    "NoSuchDomain",
    "NullMX",
    "PermanentMXError",
    "TemporaryMXError",
    "address_literal",
    "to_a_label",
]

#: Retransmission timeouts handed to the resolver for each query (seconds).
DEFAULT_DNS_TIMEOUTS: tuple[int, ...] = (2, 5, 10)
#: Aliases followed from a domain to the name that holds its MX records.
MAX_CNAME_CHAIN = 8
#: RFC 1035 2.3.4: a name is at most 255 octets on the wire, 253 as text.
_MAX_NAME_LENGTH = 253
# One label of a host name, lower-cased. Underscores are tolerated: they are
# not valid in host names, but refusing them here would bounce mail that a
# lenient next hop would take.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


class MXLookupError(Exception):
    """
    Mail for a domain cannot be routed now.

    @ivar domain: the domain as the caller gave it.
    @ivar reason: what went wrong, in words fit for a bounce or a log line.
    @ivar status: the RFC 3463 enhanced status code for a DSN.
    """

    status = "4.4.3"

    def __init__(self, domain: str, reason: str) -> None:
        super().__init__(domain, reason)
        self.domain = domain
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.domain}: {self.reason}"


class TemporaryMXError(MXLookupError):
    """
    The lookup failed for now (SERVFAIL, timeout, ...): retry later.
    """

    status = "4.4.3"


class PermanentMXError(MXLookupError):
    """
    The domain cannot receive mail: bounce.
    """

    status = "5.1.2"


class NullMX(PermanentMXError):
    """
    The domain publishes a null MX (RFC 7505): it does not accept mail.
    """

    status = "5.1.10"


class NoSuchDomain(PermanentMXError):
    """
    The domain does not exist (NXDOMAIN).
    """

    status = "5.1.2"


class NoMailHost(PermanentMXError):
    """
    The domain exists but has neither an MX nor an address record.
    """

    status = "5.4.4"


class InvalidDomain(PermanentMXError):
    """
    The domain is not a valid host name, address literal or IDN.
    """

    status = "5.1.2"


@frozen
class MailHost:
    """
    One host to try for a domain's mail.

    @ivar name: an A-label host name, or an IP address for an address literal.
    @ivar port: the SMTP port.
    @ivar preference: its MX preference (0 for an implicit MX or a literal).
    """

    name: str
    port: int = 25
    preference: int = 0


@frozen
class HostFailurePolicy:
    """
    How long a host that failed is held back.

    The first failure makes a host I{down} for C{base} seconds; each further
    failure after that period ended doubles the period, up to C{maximum}.
    Failures reported while the host is already down change nothing, so a
    burst of deliveries failing together counts once. A host is down while
    C{now < failed_at + period}: at exactly the end it is up again. The
    streak is forgotten C{forget_after} seconds after the last period ended
    without a new failure, or at once by L{MXResolver.mark_ok}.
    """

    base: float = field(default=300.0)
    maximum: float = field(default=3600.0)
    forget_after: float = field(default=3600.0)

    @base.validator
    def _check_base(self, attribute: object, value: float) -> None:
        if not value > 0:
            raise ValueError(f"base must be positive, not {value!r}")

    @maximum.validator
    def _check_maximum(self, attribute: object, value: float) -> None:
        if value < self.base:
            raise ValueError(f"maximum must be at least base ({self.base}), not {value!r}")

    def period(self, strikes: int) -> float:
        """
        @param strikes: how many failures in a row, at least 1.
        @return: how long the host stays down after its latest failure.
        """
        doublings = min(max(strikes, 1) - 1, 64)
        return min(self.base * 2.0**doublings, self.maximum)


@frozen
class _Strikes:
    count: int
    until: float


@frozen
class _Route:
    """
    A cached answer: the exchanges sorted by preference, or a permanent error.
    """

    exchanges: tuple[tuple[int, str], ...]
    error: PermanentMXError | None
    expires: float


def address_literal(domain: str) -> str | None:
    """
    The IP address of an RFC 5321 address literal.

    @param domain: the domain part of an address.
    @return: the address (C{"192.0.2.1"}, C{"2001:db8::1"}), or L{None} when
        C{domain} is not bracketed.
    @raise InvalidDomain: for a bracketed domain that is not a valid IPv4
        or C{IPv6:} literal.
    """
    if not domain.startswith("["):
        return None
    inner = domain[1:-1] if domain.endswith("]") else ""
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        raise InvalidDomain(domain, "invalid address literal") from None


def to_a_label(domain: str) -> str:
    """
    The form of C{domain} to look up: lower-case ASCII, IDN labels as
    A-labels (IDNA 2008, UTS 46 mapping), no trailing dot.

    @raise InvalidDomain: when C{domain} is not a valid host name.
    """
    text = domain
    if not text.isascii():
        try:
            text = idna.uts46_remap(text, std3_rules=False, transitional=False)
        except (idna.IDNAError, UnicodeError) as e:
            raise InvalidDomain(domain, f"invalid international domain name ({e})") from None
    if text.endswith("."):
        text = text[:-1]
    labels = []
    for label in text.split("."):
        if not label.isascii():
            try:
                label = idna.alabel(label).decode("ascii")
            except (idna.IDNAError, UnicodeError) as e:
                raise InvalidDomain(domain, f"invalid international domain name ({e})") from None
        label = label.lower()
        if not _LABEL.fullmatch(label):
            raise InvalidDomain(domain, "not a valid domain name")
        labels.append(label)
    result = ".".join(labels)
    if len(result) > _MAX_NAME_LENGTH:
        raise InvalidDomain(domain, "domain name too long")
    return result


def _name(value: Any) -> str:
    raw = getattr(value, "name", value)
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    return str(raw).rstrip(".").lower()


def _negative_ttl(exception: BaseException, default: float) -> float:
    """
    RFC 2308 section 5: a negative answer lives min(SOA TTL, SOA minimum),
    from the authority section of the response when the resolver passed it.
    """
    message = exception.args[0] if exception.args else None
    for rr in getattr(message, "authority", None) or ():
        if getattr(rr, "type", None) == dns.SOA:
            return float(min(rr.ttl, rr.payload.minimum, default))
    return default


_Lookup = Callable[[str, Sequence[int]], "Deferred[Any]"]
_Answers = tuple[Sequence[Any], Sequence[Any], Sequence[Any]]


class MXResolver:
    """
    Finds the mail hosts of domains through an L{IResolver}; remembers which
    hosts failed. See the module docstring for the rules.
    """

    _log = Logger()

    def __init__(
        self,
        resolver: IResolver,
        clock: IReactorTime,
        *,
        random: _random.Random | None = None,
        port: int = 25,
        failure_policy: HostFailurePolicy | None = None,
        lookup_timeout: float = 60.0,
        dns_timeouts: Sequence[int] = DEFAULT_DNS_TIMEOUTS,
        max_ttl: float = 86400.0,
        negative_ttl: float = 300.0,
        max_cache_entries: int = 10_000,
        max_failed_hosts: int = 10_000,
        address_literals: bool = True,
    ) -> None:
        """
        @param resolver: the only source of DNS answers.
        @param clock: for TTLs, the lookup timeout and the failure memory.
        @param random: shuffles hosts of equal preference.
        @param port: the port of every host returned (25 but in tests).
        @param failure_policy: how long failed hosts are held back.
        @param lookup_timeout: seconds after which a query that has not
            answered fails with L{TemporaryMXError}.
        @param dns_timeouts: the retransmission timeouts given to the resolver.
        @param max_ttl: the longest time an answer is cached.
        @param negative_ttl: the longest time NXDOMAIN, NODATA-without-address
            and invalid answers are cached.
        @param max_cache_entries: domains kept in the cache (least recently
            used go first).
        @param max_failed_hosts: hosts kept in the failure memory (oldest go
            first).
        @param address_literals: whether C{[192.0.2.1]} domains are routed;
            when L{False} they fail with L{InvalidDomain}.
        """
        if max_cache_entries < 1 or max_failed_hosts < 1:
            raise ValueError("cache sizes must be at least 1")
        self._resolver = resolver
        self._clock = clock
        self._random = random if random is not None else _random.Random()
        self._port = port
        self._policy = failure_policy if failure_policy is not None else HostFailurePolicy()
        self._lookup_timeout = lookup_timeout
        self._dns_timeouts = tuple(dns_timeouts)
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl
        self._max_cache_entries = max_cache_entries
        self._max_failed_hosts = max_failed_hosts
        self._address_literals = address_literals
        self._cache: OrderedDict[str, _Route] = OrderedDict()
        self._pending: dict[str, list[Deferred[list[MailHost]]]] = {}
        self._failures: dict[tuple[str, int], _Strikes] = {}

    # -- lookups ---------------------------------------------------------

    def hosts_for(self, domain: str) -> Deferred[list[MailHost]]:
        """
        Every host to try for mail to C{domain}, in order.

        @param domain: the domain part of a recipient address (a host name,
            an IDN, or an address literal).
        @return: a L{Deferred} firing with a non-empty list of L{MailHost},
            or failing with a L{PermanentMXError} (bounce) or a
            L{TemporaryMXError} (retry later).
        """
        try:
            literal = address_literal(domain)
            if literal is not None:
                if not self._address_literals:
                    raise InvalidDomain(domain, "address literals are not accepted")
                return succeed([MailHost(literal, self._port, 0)])
            name = to_a_label(domain)
        except MXLookupError as e:
            return fail(e)
        route = self._cached(name)
        if route is not None:
            return self._answer(route)
        waiters = self._pending.get(name)
        waiter: Deferred[list[MailHost]] = Deferred(lambda d: self._forget_waiter(name, d))
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._pending[name] = [waiter]
        lookup = ensureDeferred(self._route(name))
        lookup.addBoth(self._finished, name)
        return waiter

    def _forget_waiter(self, name: str, waiter: Deferred[list[MailHost]]) -> None:
        waiters = self._pending.get(name, [])
        if waiter in waiters:
            waiters.remove(waiter)

    def _finished(self, result: _Route | Failure, name: str) -> None:
        waiters = self._pending.pop(name, [])
        if isinstance(result, Failure):
            error = result.value
            if not isinstance(error, MXLookupError):
                self._log.warn(
                    "MX lookup for {domain} failed unexpectedly: {error!r}",
                    domain=name,
                    error=error,
                )
                error = TemporaryMXError(name, f"DNS lookup failed ({error!r})")
            for waiter in waiters:
                if not waiter.called:
                    waiter.errback(error)
            return
        self._store(name, result)
        for waiter in waiters:
            if not waiter.called:
                self._answer(result).chainDeferred(waiter)

    def _answer(self, route: _Route) -> Deferred[list[MailHost]]:
        if route.error is not None:
            return fail(route.error)
        return succeed(self._order(route.exchanges))

    def _query(self, lookup: _Lookup, name: str) -> Deferred[_Answers]:
        d = lookup(name, self._dns_timeouts)
        d.addTimeout(self._lookup_timeout, self._clock)
        return cast("Deferred[_Answers]", d)

    async def _route(self, domain: str) -> _Route:
        """
        Ask the resolver; permanent answers become routes with an error (so
        they are cached), temporary ones raise L{TemporaryMXError}.
        """
        query_name = domain
        ttl = math.inf
        seen = {domain}
        while True:
            try:
                answers, _, _ = await self._query(self._resolver.lookupMailExchange, query_name)
            except Exception as e:
                return self._failed_route(domain, e)
            owner = query_name
            for rr in _cname_chain(answers, owner):
                ttl = min(ttl, rr.ttl)
                owner = _name(rr.payload.name)
                if owner in seen or len(seen) > MAX_CNAME_CHAIN:
                    raise TemporaryMXError(domain, "CNAME loop or chain too long")
                seen.add(owner)
            records = [rr for rr in answers if rr.type == dns.MX and _name(rr.name) == owner]
            if records:
                return self._mx_route(domain, records, ttl)
            if owner == query_name:
                break
            # The answer stopped at an alias: ask for the alias's target.
            query_name = owner
        return await self._implicit_route(domain)

    def _failed_route(self, domain: str, error: Exception) -> _Route:
        if isinstance(error, DNSNameError):
            negative = _negative_ttl(error, self._negative_ttl)
            expires = self._clock.seconds() + negative
            return _Route((), NoSuchDomain(domain, "no such domain"), expires)
        raise TemporaryMXError(domain, _describe(error)) from error

    def _mx_route(self, domain: str, records: Sequence[Any], ttl: float) -> _Route:
        best: dict[str, int] = {}
        for rr in records:
            ttl = min(ttl, rr.ttl)
            host = _name(rr.payload.name)
            preference = int(rr.payload.preference)
            if host not in best or preference < best[host]:
                best[host] = preference
        expires = self._clock.seconds() + min(ttl, self._max_ttl)
        # RFC 7505 3: a null MX is alone; a "." beside real hosts is ignored.
        best.pop("", None)
        if not best:
            return _Route((), NullMX(domain, "domain does not accept mail (null MX)"), expires)
        exchanges = tuple(sorted((preference, host) for host, preference in best.items()))
        return _Route(exchanges, None, expires)

    async def _implicit_route(self, domain: str) -> _Route:
        """
        No MX: the domain is its own mail host if it has an address.
        """
        results = await DeferredList(
            [
                self._query(self._resolver.lookupAddress, domain),
                self._query(self._resolver.lookupIPV6Address, domain),
            ],
            consumeErrors=True,
        )
        ttls: list[float] = []
        temporary: list[BaseException] = []
        for _, result in results:
            if isinstance(result, Failure):
                if not result.check(DNSNameError):
                    temporary.append(result.value)
            else:
                ttls.extend(rr.ttl for rr in result[0] if rr.type in (dns.A, dns.AAAA))
        now = self._clock.seconds()
        if ttls:
            expires = now + min(min(ttls), self._max_ttl)
            return _Route(((0, domain),), None, expires)
        if temporary:
            raise TemporaryMXError(domain, _describe(temporary[0]))
        return _Route(
            (), NoMailHost(domain, "no MX and no address record"), now + self._negative_ttl
        )

    # -- cache -----------------------------------------------------------

    def _cached(self, name: str) -> _Route | None:
        route = self._cache.get(name)
        if route is None:
            return None
        if self._clock.seconds() >= route.expires:
            del self._cache[name]
            return None
        self._cache.move_to_end(name)
        return route

    def _store(self, name: str, route: _Route) -> None:
        if route.expires <= self._clock.seconds():
            return
        self._cache[name] = route
        self._cache.move_to_end(name)
        while len(self._cache) > self._max_cache_entries:
            self._cache.popitem(last=False)

    # -- host failure memory --------------------------------------------

    def _order(self, exchanges: Sequence[tuple[int, str]]) -> list[MailHost]:
        shuffled: list[MailHost] = []
        for preference, group in itertools.groupby(exchanges, key=lambda e: e[0]):
            names = [host for _, host in group]
            self._random.shuffle(names)
            shuffled.extend(MailHost(host, self._port, preference) for host in names)
        now = self._clock.seconds()
        up = [host for host in shuffled if self._down_until(host, now) is None]
        down = [host for host in shuffled if self._down_until(host, now) is not None]
        # Of the hosts held back, the one that comes back soonest goes first.
        down.sort(key=lambda host: self._down_until(host, now) or 0.0)
        return up + down

    @staticmethod
    def _key(host: MailHost) -> tuple[str, int]:
        return (host.name.rstrip(".").lower(), host.port)

    def _strikes(self, key: tuple[str, int], now: float) -> _Strikes | None:
        strikes = self._failures.get(key)
        if strikes is not None and now >= strikes.until + self._policy.forget_after:
            del self._failures[key]
            return None
        return strikes

    def _down_until(self, host: MailHost, now: float) -> float | None:
        strikes = self._strikes(self._key(host), now)
        if strikes is None or now >= strikes.until:
            return None
        return strikes.until

    def is_down(self, host: MailHost) -> bool:
        """
        @return: whether C{host} failed recently and is being held back.
        """
        return self._down_until(host, self._clock.seconds()) is not None

    def mark_failed(self, host: MailHost) -> None:
        """
        Record that C{host} could not be reached or refused service, so that
        L{hosts_for} puts it after the hosts that are up for a while (see
        L{HostFailurePolicy}).
        """
        now = self._clock.seconds()
        key = self._key(host)
        strikes = self._strikes(key, now)
        if strikes is not None and now < strikes.until:
            return
        count = 1 if strikes is None else strikes.count + 1
        self._failures.pop(key, None)
        if len(self._failures) >= self._max_failed_hosts:
            del self._failures[next(iter(self._failures))]
        self._failures[key] = _Strikes(count, now + self._policy.period(count))
        self._log.info(
            "Mail host {host}:{port} marked down for {period} s (failure {count} in a row)",
            host=key[0],
            port=key[1],
            period=self._policy.period(count),
            count=count,
        )

    def mark_ok(self, host: MailHost) -> None:
        """
        Record that C{host} works: forget its failures.
        """
        self._failures.pop(self._key(host), None)


def _cname_chain(answers: Sequence[Any], start: str) -> list[Any]:
    """
    The CNAME records leading from C{start} through C{answers}, in order,
    stopping at a name seen twice (the caller reports the loop).
    """
    chain: list[Any] = []
    owner = start
    visited = {start}
    while True:
        alias = next(
            (rr for rr in answers if rr.type == dns.CNAME and _name(rr.name) == owner), None
        )
        if alias is None:
            return chain
        chain.append(alias)
        owner = _name(alias.payload.name)
        if owner in visited:
            return chain
        visited.add(owner)


def _describe(error: BaseException) -> str:
    if isinstance(error, defer.TimeoutError | TimeoutError):
        return "DNS lookup timed out"
    if isinstance(error, DNSServerError):
        return "DNS server failure (SERVFAIL)"
    if isinstance(error, DNSQueryRefusedError):
        return "DNS query refused"
    return f"DNS lookup failed ({type(error).__name__})"
