"""
Tests for L{smtpgw.mx}: MX ordering and shuffling, the implicit MX, null MX,
permanent and temporary DNS failures, CNAMEs, TTL caching, the host failure
memory, IDNA and address literals. No real DNS: a stub resolver answers.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IResolver
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import (
    DNSNameError,
    DNSQueryRefusedError,
    DNSQueryTimeoutError,
    DNSServerError,
)
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from smtpgw.mx import (
    MAX_CNAME_CHAIN,
    HostFailurePolicy,
    InvalidDomain,
    MailHost,
    MXLookupError,
    MXResolver,
    NoMailHost,
    NoSuchDomain,
    NullMX,
    PermanentMXError,
    TemporaryMXError,
    address_literal,
    to_a_label,
)

T = TypeVar("T")

Answer = Sequence[dns.RRHeader] | BaseException | Deferred[Any]


class StubResolver(ResolverBase):
    """
    Answers from a fixed table keyed by (lower-case name, record type); a
    name missing from the table has no records of that type (NODATA).
    """

    def __init__(self, zone: Mapping[tuple[str, int], Answer] | None = None) -> None:
        super().__init__()
        self.zone: dict[tuple[str, int], Answer] = dict(zone or {})
        self.queries: list[tuple[str, int]] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        key = (name.decode("ascii").lower(), type)
        self.queries.append(key)
        value = self.zone.get(key, [])
        if isinstance(value, BaseException):
            return fail(value)
        if isinstance(value, Deferred):
            return value
        return succeed((list(value), [], []))


def mx(owner: str, preference: int, target: str, ttl: int = 300) -> dns.RRHeader:
    return dns.RRHeader(
        owner, dns.MX, ttl=ttl, payload=dns.Record_MX(preference, target.encode(), ttl=ttl)
    )


def a(owner: str, address: str = "192.0.2.1", ttl: int = 300) -> dns.RRHeader:
    return dns.RRHeader(owner, dns.A, ttl=ttl, payload=dns.Record_A(address, ttl=ttl))


def aaaa(owner: str, address: str = "2001:db8::1", ttl: int = 300) -> dns.RRHeader:
    return dns.RRHeader(owner, dns.AAAA, ttl=ttl, payload=dns.Record_AAAA(address, ttl=ttl))


def cname(owner: str, target: str, ttl: int = 300) -> dns.RRHeader:
    return dns.RRHeader(owner, dns.CNAME, ttl=ttl, payload=dns.Record_CNAME(target, ttl=ttl))


def soa(owner: str, ttl: int, minimum: int) -> dns.RRHeader:
    return dns.RRHeader(
        owner,
        dns.SOA,
        ttl=ttl,
        payload=dns.Record_SOA(mname="ns." + owner, rname="hostmaster." + owner, minimum=minimum),
    )


def nxdomain(authority: Sequence[dns.RRHeader] = ()) -> DNSNameError:
    message = dns.Message(rCode=dns.ENAME)
    message.authority = list(authority)
    return DNSNameError(message)


def result(d: Deferred[T]) -> T:
    """
    The result of a L{Deferred} that has fired; its failure is raised.
    """
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    value: T = outcome[0]
    return value


def names(hosts: list[MailHost]) -> list[str]:
    return [h.name for h in hosts]


def make(
    zone: Mapping[tuple[str, int], Answer] | None = None, **kwargs: Any
) -> tuple[MXResolver, StubResolver, Clock]:
    stub = StubResolver(zone)
    clock = Clock()
    kwargs.setdefault("random", random.Random(0))
    return MXResolver(stub, clock, **kwargs), stub, clock


def test_stub_resolver_provides_iresolver() -> None:
    """
    The stub used by these tests is a complete L{IResolver}.
    """
    assert verifyObject(IResolver, StubResolver())


# -- MX ordering -----------------------------------------------------------


def test_every_mx_host_in_preference_order() -> None:
    """
    Every MX host is returned, lowest preference first, each with its
    preference and port 25.
    """
    resolver, _, _ = make(
        {
            ("example.com", dns.MX): [
                mx("example.com", 20, "mx2.example.com"),
                mx("example.com", 30, "mx3.example.com"),
                mx("example.com", 10, "mx1.example.com"),
            ]
        }
    )
    hosts = result(resolver.hosts_for("example.com"))
    assert hosts == [
        MailHost("mx1.example.com", 25, 10),
        MailHost("mx2.example.com", 25, 20),
        MailHost("mx3.example.com", 25, 30),
    ]


def test_port_is_configurable() -> None:
    """
    The port given to the resolver is on every host (tests relay to a
    loopback server on a high port).
    """
    resolver, _, _ = make(
        {("example.com", dns.MX): [mx("example.com", 10, "mx.example.com")]}, port=2525
    )
    assert result(resolver.hosts_for("example.com")) == [MailHost("mx.example.com", 2525, 10)]


def test_host_listed_twice_kept_once_at_its_best_preference() -> None:
    """
    A host listed under two preferences appears once, at the lower one.
    """
    resolver, _, _ = make(
        {
            ("example.com", dns.MX): [
                mx("example.com", 30, "a.example.com"),
                mx("example.com", 20, "b.example.com"),
                mx("example.com", 10, "A.example.com."),
            ]
        }
    )
    assert result(resolver.hosts_for("example.com")) == [
        MailHost("a.example.com", 25, 10),
        MailHost("b.example.com", 25, 20),
    ]


def test_records_of_other_names_are_ignored() -> None:
    """
    MX records the resolver returns for another owner are not used.
    """
    resolver, _, _ = make(
        {
            ("example.com", dns.MX): [
                mx("other.example", 5, "evil.example"),
                mx("example.com", 10, "mx.example.com"),
            ]
        }
    )
    assert names(result(resolver.hosts_for("example.com"))) == ["mx.example.com"]


def test_equal_preferences_shuffled_with_the_injected_random() -> None:
    """
    Hosts of equal preference are shuffled with the injected random (so
    the order is reproducible), and only among themselves.
    """
    equal = [f"mx{i}.example.com" for i in range(6)]
    records = [mx("example.com", 10, h) for h in equal] + [mx("example.com", 5, "first.example")]
    resolver, _, _ = make({("example.com", dns.MX): records}, random=random.Random(42))
    expected = sorted(equal)
    random.Random(42).shuffle(expected)
    assert names(result(resolver.hosts_for("example.com"))) == ["first.example", *expected]


def test_equal_preferences_spread_the_load() -> None:
    """
    Successive lookups (answered from the cache) give different orders of
    the equal-preference hosts, each time all of them, after the better ones.
    """
    equal = [f"mx{i}.example.com" for i in range(4)]
    records = [mx("example.com", 10, h) for h in equal] + [mx("example.com", 5, "first.example")]
    resolver, stub, _ = make({("example.com", dns.MX): records}, random=random.Random(1))
    orders = set()
    for _ in range(30):
        hosts = names(result(resolver.hosts_for("example.com")))
        assert hosts[0] == "first.example"
        assert sorted(hosts[1:]) == equal
        orders.add(tuple(hosts))
    assert len(orders) > 5
    assert stub.queries == [("example.com", dns.MX)]


# -- implicit MX -----------------------------------------------------------


def test_no_mx_falls_back_to_the_domain_with_an_a_record() -> None:
    """
    With no MX record, the domain itself is the mail host (RFC 5321 5.1),
    after checking it has an address.
    """
    resolver, stub, _ = make({("example.com", dns.A): [a("example.com")]})
    assert result(resolver.hosts_for("example.com")) == [MailHost("example.com", 25, 0)]
    assert ("example.com", dns.A) in stub.queries
    assert ("example.com", dns.AAAA) in stub.queries


def test_no_mx_falls_back_to_the_domain_with_an_aaaa_record_only() -> None:
    """
    An IPv6-only domain without MX is its own mail host.
    """
    resolver, _, _ = make({("example.com", dns.AAAA): [aaaa("example.com")]})
    assert result(resolver.hosts_for("example.com")) == [MailHost("example.com", 25, 0)]


def test_no_mx_and_no_address_is_permanent() -> None:
    """
    A domain with neither MX nor address cannot receive mail.
    """
    resolver, _, _ = make({})
    with pytest.raises(NoMailHost) as caught:
        result(resolver.hosts_for("example.com"))
    assert isinstance(caught.value, PermanentMXError)
    assert caught.value.status == "5.4.4"


def test_no_mx_and_address_lookups_nxdomain_is_permanent() -> None:
    """
    NODATA for MX and NXDOMAIN for the addresses: no mail host.
    """
    resolver, _, _ = make(
        {("example.com", dns.A): nxdomain(), ("example.com", dns.AAAA): nxdomain()}
    )
    with pytest.raises(NoMailHost):
        result(resolver.hosts_for("example.com"))


def test_no_mx_and_address_lookup_servfail_is_temporary() -> None:
    """
    When an address lookup fails temporarily and the other finds nothing,
    the whole lookup is temporary: the address may exist.
    """
    resolver, _, _ = make({("example.com", dns.A): DNSServerError()})
    with pytest.raises(TemporaryMXError):
        result(resolver.hosts_for("example.com"))


def test_no_mx_one_address_lookup_failing_other_found() -> None:
    """
    One address family failing does not matter when the other answers.
    """
    resolver, _, _ = make(
        {
            ("example.com", dns.A): DNSServerError(),
            ("example.com", dns.AAAA): [aaaa("example.com")],
        }
    )
    assert names(result(resolver.hosts_for("example.com"))) == ["example.com"]


# -- null MX, NXDOMAIN, SERVFAIL --------------------------------------------


def test_null_mx_is_permanent_domain_does_not_accept_mail() -> None:
    """
    A single MX "." of preference 0 (RFC 7505): the domain accepts no mail,
    a permanent failure with status 5.1.10; no address lookup is made.
    """
    resolver, stub, _ = make({("example.com", dns.MX): [mx("example.com", 0, ".")]})
    with pytest.raises(NullMX) as caught:
        result(resolver.hosts_for("example.com"))
    assert isinstance(caught.value, PermanentMXError)
    assert "does not accept mail" in str(caught.value)
    assert caught.value.status == "5.1.10"
    assert stub.queries == [("example.com", dns.MX)]


def test_null_mx_with_empty_target() -> None:
    """
    The root target as decoded from the wire (the empty name) is a null MX.
    """
    resolver, _, _ = make({("example.com", dns.MX): [mx("example.com", 0, "")]})
    with pytest.raises(NullMX):
        result(resolver.hosts_for("example.com"))


def test_null_mx_beside_real_hosts_is_ignored() -> None:
    """
    A misconfigured "." among real MX hosts is skipped, not connected to.
    """
    resolver, _, _ = make(
        {("example.com", dns.MX): [mx("example.com", 0, "."), mx("example.com", 10, "mx.example")]}
    )
    assert names(result(resolver.hosts_for("example.com"))) == ["mx.example"]


def test_nxdomain_is_permanent() -> None:
    """
    NXDOMAIN for the MX query: the domain does not exist, a bounce; no
    address lookup is made.
    """
    resolver, stub, _ = make({("nowhere.example", dns.MX): nxdomain()})
    with pytest.raises(NoSuchDomain) as caught:
        result(resolver.hosts_for("nowhere.example"))
    assert isinstance(caught.value, PermanentMXError)
    assert caught.value.domain == "nowhere.example"
    assert stub.queries == [("nowhere.example", dns.MX)]


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (DNSServerError(), "SERVFAIL"),
        (DNSQueryTimeoutError(1), "timed out"),
        (DNSQueryRefusedError(), "refused"),
    ],
)
def test_servfail_timeout_refused_are_temporary(error: Exception, words: str) -> None:
    """
    SERVFAIL, a resolver timeout and REFUSED are temporary failures (retry
    later), never bounces, and are not cached.
    """
    resolver, stub, _ = make({("example.com", dns.MX): error})
    with pytest.raises(TemporaryMXError) as caught:
        result(resolver.hosts_for("example.com"))
    assert not isinstance(caught.value, PermanentMXError)
    assert words in str(caught.value)
    assert caught.value.status.startswith("4.")
    with pytest.raises(TemporaryMXError):
        result(resolver.hosts_for("example.com"))
    assert stub.queries == [("example.com", dns.MX)] * 2


def test_unexpected_resolver_error_is_temporary_and_warned(
    logged_errors: list[dict[str, Any]],
) -> None:
    """
    A resolver that fails with something unexpected gives a temporary
    failure (never a hang, never a bounce).
    """
    resolver, _, _ = make({("example.com", dns.MX): NotImplementedError("no MX here")})
    with pytest.raises(TemporaryMXError):
        result(resolver.hosts_for("example.com"))
    assert logged_errors == []


def test_resolver_that_never_answers_times_out_at_the_limit() -> None:
    """
    A query that never answers fails temporarily at C{lookup_timeout}
    seconds, not one tick before.
    """
    resolver, _, clock = make({("example.com", dns.MX): Deferred()}, lookup_timeout=30.0)
    d = resolver.hosts_for("example.com")
    clock.advance(29.999)
    assert not d.called
    clock.advance(0.001)
    with pytest.raises(TemporaryMXError, match="timed out"):
        result(d)


# -- CNAME -----------------------------------------------------------------


def test_domain_aliased_to_another_with_mx_in_the_answer() -> None:
    """
    When the domain is a CNAME and the resolver returns the chain with the
    target's MX records, those hosts are used, with the smallest TTL.
    """
    resolver, stub, clock = make(
        {
            ("alias.example", dns.MX): [
                cname("alias.example", "real.example", ttl=50),
                mx("real.example", 10, "mx.real.example", ttl=500),
            ]
        }
    )
    assert result(resolver.hosts_for("alias.example")) == [MailHost("mx.real.example", 25, 10)]
    clock.advance(49)
    result(resolver.hosts_for("alias.example"))
    assert len(stub.queries) == 1
    clock.advance(1)
    result(resolver.hosts_for("alias.example"))
    assert len(stub.queries) == 2


def test_alias_answer_without_mx_asks_for_the_target() -> None:
    """
    An answer that stops at an alias is followed by a query for its target.
    """
    resolver, stub, _ = make(
        {
            ("alias.example", dns.MX): [cname("alias.example", "real.example")],
            ("real.example", dns.MX): [mx("real.example", 10, "mx.real.example")],
        }
    )
    assert names(result(resolver.hosts_for("alias.example"))) == ["mx.real.example"]
    assert stub.queries == [("alias.example", dns.MX), ("real.example", dns.MX)]


def test_mx_target_that_is_an_alias_is_kept_as_returned() -> None:
    """
    An MX target that is itself a CNAME (against RFC 5321 5.1, but common)
    is returned as the resolver named it; its address is resolved when
    connecting.
    """
    resolver, _, _ = make(
        {
            ("example.com", dns.MX): [
                mx("example.com", 10, "mail.example.com"),
                cname("mail.example.com", "host.provider.example"),
            ]
        }
    )
    assert names(result(resolver.hosts_for("example.com"))) == ["mail.example.com"]


def test_cname_loop_is_temporary() -> None:
    """
    A CNAME loop is reported as a temporary failure, not followed forever.
    """
    resolver, _, _ = make(
        {
            ("a.example", dns.MX): [
                cname("a.example", "b.example"),
                cname("b.example", "a.example"),
            ]
        }
    )
    with pytest.raises(TemporaryMXError, match="CNAME"):
        result(resolver.hosts_for("a.example"))


def chain_zone(length: int) -> dict[tuple[str, int], Answer]:
    records = [cname(f"n{i}.example", f"n{i + 1}.example") for i in range(length)]
    records.append(mx(f"n{length}.example", 10, "mx.example"))
    return {("n0.example", dns.MX): records}


def test_cname_chain_at_the_limit_is_followed() -> None:
    """
    A chain of L{MAX_CNAME_CHAIN} aliases is followed.
    """
    resolver, _, _ = make(chain_zone(MAX_CNAME_CHAIN))
    assert names(result(resolver.hosts_for("n0.example"))) == ["mx.example"]


def test_cname_chain_one_past_the_limit_is_temporary() -> None:
    """
    One alias more than L{MAX_CNAME_CHAIN} is refused.
    """
    resolver, _, _ = make(chain_zone(MAX_CNAME_CHAIN + 1))
    with pytest.raises(TemporaryMXError, match="CNAME"):
        result(resolver.hosts_for("n0.example"))


def test_requeried_aliases_count_against_the_limit() -> None:
    """
    Aliases answered one query at a time are bounded the same way.
    """
    zone: dict[tuple[str, int], Answer] = {
        (f"n{i}.example", dns.MX): [cname(f"n{i}.example", f"n{i + 1}.example")]
        for i in range(MAX_CNAME_CHAIN + 1)
    }
    resolver, stub, _ = make(zone)
    with pytest.raises(TemporaryMXError, match="CNAME"):
        result(resolver.hosts_for("n0.example"))
    assert len(stub.queries) == MAX_CNAME_CHAIN + 1


# -- caching ---------------------------------------------------------------


def test_answers_cached_for_their_smallest_ttl() -> None:
    """
    An answer is reused until its smallest TTL has passed: at TTL - 1 the
    cache answers, at TTL the resolver is asked again.
    """
    resolver, stub, clock = make(
        {
            ("example.com", dns.MX): [
                mx("example.com", 10, "mx1.example.com", ttl=600),
                mx("example.com", 20, "mx2.example.com", ttl=120),
            ]
        }
    )
    first = result(resolver.hosts_for("example.com"))
    clock.advance(119)
    assert result(resolver.hosts_for("example.com")) == first
    assert len(stub.queries) == 1
    clock.advance(1)
    assert result(resolver.hosts_for("example.com")) == first
    assert len(stub.queries) == 2


def test_ttl_capped_by_max_ttl() -> None:
    """
    A huge TTL is cached for at most C{max_ttl}.
    """
    resolver, stub, clock = make(
        {("example.com", dns.MX): [mx("example.com", 10, "mx.example", ttl=10**6)]},
        max_ttl=100.0,
    )
    result(resolver.hosts_for("example.com"))
    clock.advance(100)
    result(resolver.hosts_for("example.com"))
    assert len(stub.queries) == 2


def test_zero_ttl_is_not_cached() -> None:
    """
    A TTL of 0 means ask every time.
    """
    resolver, stub, _ = make({("example.com", dns.MX): [mx("example.com", 10, "mx", ttl=0)]})
    result(resolver.hosts_for("example.com"))
    result(resolver.hosts_for("example.com"))
    assert len(stub.queries) == 2


def test_implicit_mx_cached_for_the_address_ttl() -> None:
    """
    The implicit MX lives as long as the address record.
    """
    resolver, stub, clock = make({("example.com", dns.A): [a("example.com", ttl=60)]})
    result(resolver.hosts_for("example.com"))
    queries = len(stub.queries)
    clock.advance(59)
    result(resolver.hosts_for("example.com"))
    assert len(stub.queries) == queries
    clock.advance(1)
    result(resolver.hosts_for("example.com"))
    assert len(stub.queries) == 2 * queries


def test_null_mx_cached_for_its_ttl() -> None:
    """
    A null MX is a positive answer, cached for its TTL.
    """
    resolver, stub, clock = make({("example.com", dns.MX): [mx("example.com", 0, ".", ttl=30)]})
    for _ in range(2):
        with pytest.raises(NullMX):
            result(resolver.hosts_for("example.com"))
    assert len(stub.queries) == 1
    clock.advance(30)
    with pytest.raises(NullMX):
        result(resolver.hosts_for("example.com"))
    assert len(stub.queries) == 2


def test_nxdomain_cached_for_the_soa_minimum() -> None:
    """
    NXDOMAIN is cached for min(SOA TTL, SOA minimum) (RFC 2308) when the
    resolver passed the authority section.
    """
    error = nxdomain([soa("example", ttl=3600, minimum=40)])
    resolver, stub, clock = make({("nowhere.example", dns.MX): error})
    with pytest.raises(NoSuchDomain):
        result(resolver.hosts_for("nowhere.example"))
    clock.advance(39)
    with pytest.raises(NoSuchDomain):
        result(resolver.hosts_for("nowhere.example"))
    assert len(stub.queries) == 1
    clock.advance(1)
    with pytest.raises(NoSuchDomain):
        result(resolver.hosts_for("nowhere.example"))
    assert len(stub.queries) == 2


def test_nxdomain_without_soa_cached_for_negative_ttl() -> None:
    """
    Without an SOA, a negative answer is cached for C{negative_ttl}.
    """
    resolver, stub, clock = make({("nowhere.example", dns.MX): nxdomain()}, negative_ttl=10.0)
    with pytest.raises(NoSuchDomain):
        result(resolver.hosts_for("nowhere.example"))
    clock.advance(9)
    with pytest.raises(NoSuchDomain):
        result(resolver.hosts_for("nowhere.example"))
    assert len(stub.queries) == 1
    clock.advance(1)
    with pytest.raises(NoSuchDomain):
        result(resolver.hosts_for("nowhere.example"))
    assert len(stub.queries) == 2


def test_concurrent_lookups_share_one_query() -> None:
    """
    Lookups of one domain while its query is out wait for that query.
    """
    pending: Deferred[Any] = Deferred()
    resolver, stub, _ = make({("example.com", dns.MX): pending})
    first = resolver.hosts_for("example.com")
    second = resolver.hosts_for("EXAMPLE.com.")
    assert not first.called
    assert not second.called
    pending.callback(([mx("example.com", 10, "mx.example.com")], [], []))
    assert names(result(first)) == names(result(second)) == ["mx.example.com"]
    assert stub.queries == [("example.com", dns.MX)]


def test_cancelling_one_waiter_leaves_the_others() -> None:
    """
    A caller that gives up does not disturb others waiting on the query.
    """
    pending: Deferred[Any] = Deferred()
    resolver, _, _ = make({("example.com", dns.MX): pending})
    first = resolver.hosts_for("example.com")
    second = resolver.hosts_for("example.com")
    first.cancel()
    with pytest.raises(CancelledError):
        result(first)
    pending.callback(([mx("example.com", 10, "mx.example.com")], [], []))
    assert names(result(second)) == ["mx.example.com"]


def test_cache_bounded_at_the_limit_and_one_past() -> None:
    """
    The cache holds C{max_cache_entries} domains; one more evicts the
    least recently used.
    """
    zone = {(f"d{i}.example", dns.MX): [mx(f"d{i}.example", 10, "mx.example")] for i in range(3)}
    resolver, stub, _ = make(zone, max_cache_entries=2)
    result(resolver.hosts_for("d0.example"))
    result(resolver.hosts_for("d1.example"))
    result(resolver.hosts_for("d0.example"))  # d0 now most recently used
    assert len(stub.queries) == 2
    result(resolver.hosts_for("d2.example"))  # evicts d1
    result(resolver.hosts_for("d0.example"))
    assert len(stub.queries) == 3
    result(resolver.hosts_for("d1.example"))
    assert len(stub.queries) == 4


# -- host failure memory ---------------------------------------------------


def three_hosts(**kwargs: Any) -> tuple[MXResolver, Clock]:
    resolver, _, clock = make(
        {
            ("example.com", dns.MX): [
                mx("example.com", 10, "mx1.example.com", ttl=86400),
                mx("example.com", 20, "mx2.example.com", ttl=86400),
                mx("example.com", 30, "mx3.example.com", ttl=86400),
            ]
        },
        **kwargs,
    )
    return resolver, clock


def order(resolver: MXResolver) -> list[str]:
    return names(result(resolver.hosts_for("example.com")))


def test_failed_host_goes_last_until_the_time_limit() -> None:
    """
    A failed host goes after every host that is up for C{base} seconds:
    still last one tick before the limit, back in place at the limit.
    """
    resolver, clock = three_hosts()
    resolver.mark_failed(MailHost("mx1.example.com", 25, 10))
    assert order(resolver) == ["mx2.example.com", "mx3.example.com", "mx1.example.com"]
    assert resolver.is_down(MailHost("mx1.example.com"))
    clock.advance(299)
    assert order(resolver) == ["mx2.example.com", "mx3.example.com", "mx1.example.com"]
    clock.advance(1)
    assert order(resolver) == ["mx1.example.com", "mx2.example.com", "mx3.example.com"]
    assert not resolver.is_down(MailHost("mx1.example.com"))


def test_failure_memory_is_per_host_name_and_port_not_preference() -> None:
    """
    A host is the same host whatever preference it has for a domain, and
    its name is compared without case or trailing dot.
    """
    resolver, _ = three_hosts()
    resolver.mark_failed(MailHost("MX2.example.com.", 25, 99))
    assert order(resolver)[-1] == "mx2.example.com"
    resolver.mark_failed(MailHost("mx1.example.com", 2525, 10))
    assert order(resolver)[0] == "mx1.example.com"


def test_mark_ok_clears_the_failure() -> None:
    """
    A host that worked again is back in its place at once.
    """
    resolver, _ = three_hosts()
    resolver.mark_failed(MailHost("mx1.example.com"))
    resolver.mark_ok(MailHost("mx1.example.com"))
    assert order(resolver) == ["mx1.example.com", "mx2.example.com", "mx3.example.com"]


def test_repeated_failures_double_the_period_up_to_one_hour() -> None:
    """
    Each failure after the previous period ended doubles it: 5, 10, 20,
    40 minutes, then 1 hour (the maximum) and 1 hour again; each period
    ends exactly at its limit.
    """
    resolver, clock = three_hosts()
    host = MailHost("mx1.example.com")
    for period in (300, 600, 1200, 2400, 3600, 3600):
        resolver.mark_failed(host)
        clock.advance(period - 1)
        assert resolver.is_down(host), period
        clock.advance(1)
        assert not resolver.is_down(host), period


def test_failures_while_down_count_once() -> None:
    """
    Several deliveries failing on a host that is already down do not
    lengthen its period.
    """
    resolver, clock = three_hosts()
    host = MailHost("mx1.example.com")
    for _ in range(5):
        resolver.mark_failed(host)
        clock.advance(10)
    clock.advance(250)
    assert not resolver.is_down(host)


def test_streak_forgotten_after_a_quiet_hour() -> None:
    """
    A host that has not failed for C{forget_after} seconds after its period
    ended starts again at the base period.
    """
    resolver, clock = three_hosts()
    host = MailHost("mx1.example.com")
    resolver.mark_failed(host)
    clock.advance(300 + 3600)
    resolver.mark_failed(host)
    clock.advance(300)
    assert not resolver.is_down(host)


def test_streak_kept_just_before_it_is_forgotten() -> None:
    """
    One second before C{forget_after} a new failure still doubles.
    """
    resolver, clock = three_hosts()
    host = MailHost("mx1.example.com")
    resolver.mark_failed(host)
    clock.advance(300 + 3599)
    resolver.mark_failed(host)
    clock.advance(300)
    assert resolver.is_down(host)


def test_all_hosts_down_still_returned_soonest_back_first() -> None:
    """
    When every host is down, all are still returned (the caller may try
    them), the one whose period ends first at the front, ties in
    preference order.
    """
    resolver, clock = three_hosts()
    resolver.mark_failed(MailHost("mx3.example.com"))
    clock.advance(100)
    resolver.mark_failed(MailHost("mx2.example.com"))
    resolver.mark_failed(MailHost("mx1.example.com"))
    assert order(resolver) == ["mx3.example.com", "mx1.example.com", "mx2.example.com"]


def test_failure_memory_bounded() -> None:
    """
    At C{max_failed_hosts} entries, one more failure forgets the oldest.
    """
    resolver, _ = three_hosts(max_failed_hosts=2)
    resolver.mark_failed(MailHost("mx1.example.com"))
    resolver.mark_failed(MailHost("mx2.example.com"))
    assert resolver.is_down(MailHost("mx1.example.com"))
    resolver.mark_failed(MailHost("mx3.example.com"))
    assert not resolver.is_down(MailHost("mx1.example.com"))
    assert resolver.is_down(MailHost("mx2.example.com"))
    assert resolver.is_down(MailHost("mx3.example.com"))


def test_policy_periods() -> None:
    """
    L{HostFailurePolicy.period} doubles from C{base} and stops at
    C{maximum}, even after very many failures.
    """
    policy = HostFailurePolicy(base=300, maximum=3600)
    assert [policy.period(n) for n in range(1, 7)] == [300, 600, 1200, 2400, 3600, 3600]
    assert policy.period(10**6) == 3600


def test_policy_validation() -> None:
    """
    A policy whose base is not positive or whose maximum is below its base
    is refused.
    """
    with pytest.raises(ValueError, match="base"):
        HostFailurePolicy(base=0)
    with pytest.raises(ValueError, match="maximum"):
        HostFailurePolicy(base=300, maximum=299)
    assert HostFailurePolicy(base=300, maximum=300).period(5) == 300


# -- IDNA and address literals ----------------------------------------------


def test_idn_domain_looked_up_by_its_a_label() -> None:
    """
    An internationalized domain is queried as its A-label, and the implicit
    MX host is named by the A-label too.
    """
    resolver, stub, _ = make({("xn--bcher-kva.example", dns.A): [a("xn--bcher-kva.example")]})
    hosts = result(resolver.hosts_for("Bücher.example"))
    assert hosts == [MailHost("xn--bcher-kva.example", 25, 0)]
    assert stub.queries[0] == ("xn--bcher-kva.example", dns.MX)


def test_idn_and_its_a_label_share_the_cache() -> None:
    """
    The U-label and A-label forms of a domain are one cache entry.
    """
    resolver, stub, _ = make(
        {("xn--bcher-kva.example", dns.MX): [mx("xn--bcher-kva.example", 1, "mx.example")]}
    )
    result(resolver.hosts_for("bücher.example"))
    result(resolver.hosts_for("XN--BCHER-KVA.example."))
    assert len(stub.queries) == 1


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("straße.de", "xn--strae-oqa.de"),
        ("例え。テスト", "xn--r8jz45g.xn--zckzah"),
        ("_dmarc-ish.example", "_dmarc-ish.example"),
    ],
)
def test_to_a_label(domain: str, expected: str) -> None:
    """
    Domains are lower-cased, lose a trailing dot, and IDN labels become
    A-labels (IDNA 2008: ß stays ß; full-width dots separate labels).
    """
    assert to_a_label(domain) == expected


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".",
        "a..b",
        "-a.example",
        "a-.example",
        "sp ace.example",
        "a@b",
        "x" * 64 + ".com",
        "\u200d.example",
        ("a" * 63 + ".") * 4 + "com",
    ],
)
def test_invalid_domains_are_permanent(domain: str) -> None:
    """
    What cannot be a host name (empty labels, bad characters, a label over
    63 octets, a name over 253, an invalid IDN) fails permanently, without
    any query.
    """
    resolver, stub, _ = make()
    with pytest.raises(InvalidDomain):
        result(resolver.hosts_for(domain))
    assert stub.queries == []


def test_label_length_at_the_limit() -> None:
    """
    A 63-octet label and a 253-octet name are valid.
    """
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(name) == 253
    assert to_a_label(name) == name
    assert to_a_label("x" * 63 + ".com") == "x" * 63 + ".com"


@given(st.text(max_size=80))
def test_to_a_label_either_succeeds_with_ascii_or_raises_invalid(domain: str) -> None:
    """
    Whatever the text, the result is a lower-case ASCII name that is stable
    under a second conversion, or L{InvalidDomain}.
    """
    try:
        label = to_a_label(domain)
    except InvalidDomain:
        return
    assert label.isascii()
    assert label == label.lower()
    assert to_a_label(label) == label


@pytest.mark.parametrize(
    ("domain", "address"),
    [
        ("[127.0.0.1]", "127.0.0.1"),
        ("[192.0.2.10]", "192.0.2.10"),
        ("[IPv6:::1]", "::1"),
        ("[ipv6:2001:DB8:0:0:0:0:0:1]", "2001:db8::1"),
    ],
)
def test_address_literal_is_the_host(domain: str, address: str) -> None:
    """
    A recipient domain that is an address literal is delivered to that
    address directly, with no DNS query.
    """
    resolver, stub, _ = make()
    assert result(resolver.hosts_for(domain)) == [MailHost(address, 25, 0)]
    assert stub.queries == []
    assert address_literal(domain) == address


@pytest.mark.parametrize(
    "domain", ["[127.0.0.1", "[]", "[256.0.0.1]", "[127.0.0.01]", "[::1]", "[IPv6:1.2.3.4]"]
)
def test_invalid_address_literals(domain: str) -> None:
    """
    A bracketed domain that is not an IPv4 or C{IPv6:} literal is invalid.
    """
    with pytest.raises(InvalidDomain):
        address_literal(domain)


def test_address_literals_can_be_refused() -> None:
    """
    With C{address_literals=False}, literals fail permanently.
    """
    resolver, _, _ = make(address_literals=False)
    with pytest.raises(InvalidDomain, match="address literals"):
        result(resolver.hosts_for("[127.0.0.1]"))


def test_plain_domain_is_not_an_address_literal() -> None:
    """
    L{address_literal} is L{None} for a host name.
    """
    assert address_literal("example.com") is None


def test_errors_form_a_hierarchy() -> None:
    """
    Callers can catch L{MXLookupError} and tell bounce from retry by class.
    """
    for permanent in (NullMX, NoSuchDomain, NoMailHost, InvalidDomain):
        assert issubclass(permanent, PermanentMXError)
        assert issubclass(permanent, MXLookupError)
        assert permanent.status.startswith("5.")
    assert issubclass(TemporaryMXError, MXLookupError)
    assert not issubclass(TemporaryMXError, PermanentMXError)
