"""
L{smtpgw.mxoutbound}: delivery to the recipients' MX hosts, over loopback to
real Twisted ESMTP servers (L{tests.relay_target}), with a stub DNS resolver
behind a real L{MXResolver}. MX host names are mapped to loopback ports by
an endpoint factory that records every host the relay contacts, so a test
sees that nothing but what the resolver named was contacted; the address
literal and implicit-MX tests go through the pool's own endpoints instead.
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ParamSpec

import pytest
from attrs import define, field
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock, deferLater
from twisted.names import client, dns, server
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DNSServerError
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from smtpgw.dsn import RecipientFailure, dsn_status
from smtpgw.interfaces import DeliveryResult, IOutbound
from smtpgw.model import Envelope, Priority
from smtpgw.mx import HostFailurePolicy, MailHost, MXResolver
from smtpgw.mxoutbound import MAX_PER_DOMAIN, MXOutbound, recipient_domain
from smtpgw.smtpclient import ClientSettings
from tests.relay_target import OpenCounter, RelayTarget, Script, make_tls, running_target
from tests.twisted_support import async_test

P = ParamSpec("P")

SETTINGS = ClientSettings(helo_name="gw.test")
BODY = b"From: alice@example.net\r\nSubject: hello\r\n\r\nHello.\r\n"
TLS = make_tls()
HOLD = 300.0

Answer = Sequence[dns.RRHeader] | BaseException | Deferred[Any]


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# -- DNS


class StubResolver(ResolverBase):
    """
    Answers from a table keyed by (lower-case name, record type); a name
    missing from the table has no records of that type (NODATA).
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
            failed: Deferred[Any] = Deferred()
            failed.errback(Failure(value))
            return failed
        if isinstance(value, Deferred):
            return value
        return succeed((list(value), [], []))


def mx(owner: str, *targets: tuple[int, str]) -> dict[tuple[str, int], Answer]:
    records = [
        dns.RRHeader(owner, dns.MX, ttl=300, payload=dns.Record_MX(pref, name.encode(), ttl=300))
        for pref, name in targets
    ]
    return {(owner, dns.MX): records}


def a(owner: str, address: str = "127.0.0.1") -> dict[tuple[str, int], Answer]:
    record = dns.RRHeader(owner, dns.A, ttl=300, payload=dns.Record_A(address, ttl=300))
    return {(owner, dns.A): [record]}


class RecordingResolver(MXResolver):
    """
    A real L{MXResolver} that also records what it was told about hosts.
    """

    marks: list[tuple[str, str]]

    def mark_failed(self, host: MailHost) -> None:
        self.marks.append(("failed", host.name))
        super().mark_failed(host)

    def mark_ok(self, host: MailHost) -> None:
        self.marks.append(("ok", host.name))
        super().mark_ok(host)


# -- the network: MX host names to loopback ports


@define
class Network:
    """
    Maps the host names the resolver gives (port 25) to ports on 127.0.0.1,
    and records each host the pool asks to connect to.
    """

    ports: dict[str, int] = field(factory=dict)
    contacts: list[str] = field(factory=list)

    def endpoint(self, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        self.contacts.append(host)
        assert port == 25, f"{host}:{port} is not a port the resolver named"
        return TCP4ClientEndpoint(reactor(), "127.0.0.1", self.ports[host], timeout=timeout)


def closed_port() -> int:
    """
    A loopback port nothing listens on (connections are refused).
    """
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port: int = unused.getsockname()[1]
    return port


def envelope(*recipients: str, queue_id: str = "0000000000000001") -> Envelope:
    return Envelope(
        queue_id=queue_id,
        list="news",
        username="alice",
        sender="alice@example.net",
        recipients=recipients,
        priority=Priority.NORMAL,
        accepted_at=0.0,
    )


@define
class Relay:
    outbound: MXOutbound
    resolver: RecordingResolver
    dns: StubResolver
    clock: Clock


def make_relay(
    zone: Mapping[tuple[str, int], Answer],
    network: Network | None = None,
    *,
    port: int = 25,
    seed: int = 0,
    **kwargs: Any,
) -> Relay:
    stub = StubResolver(zone)
    clock = Clock()
    resolver = RecordingResolver(
        stub,
        clock,
        random=random.Random(seed),
        port=port,
        failure_policy=HostFailurePolicy(base=HOLD),
    )
    resolver.marks = []
    kwargs.setdefault("settings", SETTINGS)
    if network is not None:
        kwargs["endpoint_factory"] = network.endpoint
    outbound = MXOutbound(reactor(), resolver, **kwargs)
    return Relay(outbound, resolver, stub, clock)


@asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[MXOutbound]:
    relay.outbound.startService()
    try:
        yield relay.outbound
    finally:
        await relay.outbound.stopService()


async def until(condition: Callable[[], bool], turns: int = 1000) -> None:
    """
    Let the reactor turn until C{condition} holds (at most C{turns} times).
    """
    for _ in range(turns):
        if condition():
            return
        await deferLater(reactor(), 0, lambda: None)
    raise AssertionError("the condition never held")


EXAMPLE_MX = mx("example.com", (10, "mx1.example.com"), (20, "mx2.example.com"))


# -- construction


def test_provides_ioutbound() -> None:
    """
    L{MXOutbound} is a complete L{IOutbound}.
    """
    assert verifyObject(IOutbound, make_relay({}).outbound)


@pytest.mark.parametrize("option", ["max_per_domain", "max_hosts"])
def test_limits_are_at_least_one(option: str) -> None:
    """
    A limit of 0 is refused; 1 is taken.
    """
    with pytest.raises(ValueError, match=option):
        make_relay({}, None, **{option: 0})
    make_relay({}, None, **{option: 1})


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ("bob@example.com", "example.com"),
        ('"a@b"@example.com', "example.com"),
        ("bob@[127.0.0.1]", "[127.0.0.1]"),
        ("bob", None),
        ("bob@", None),
        ("@example.com", None),
    ],
)
def test_recipient_domain(address: str, domain: str | None) -> None:
    """
    The domain is what follows the last C{@}; an address without a local
    part or a domain has none.
    """
    assert recipient_domain(address) == domain


@async_test
async def test_not_running_defers_without_a_lookup() -> None:
    """
    Before C{startService} every recipient is deferred and DNS is not asked.
    """
    relay = make_relay(EXAMPLE_MX)
    result = await relay.outbound.deliver(envelope("a@example.com"), BODY)
    assert [r for r, _ in result.deferred] == ["a@example.com"]
    assert "not running" in result.deferred[0][1]
    assert relay.dns.queries == []


# -- MX order and host failures


@async_test
async def test_first_mx_refusing_second_gets_the_mail() -> None:
    """
    The best MX refuses connections: the next one gets the message, the
    first is marked failed (and held back), the second marked working.
    """
    async with running_target() as target:
        network = Network({"mx1.example.com": closed_port(), "mx2.example.com": target.port})
        relay = make_relay(EXAMPLE_MX, network)
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope("a@example.com"), BODY)
    assert result == DeliveryResult(delivered=("a@example.com",))
    assert network.contacts == ["mx1.example.com", "mx2.example.com"]
    assert [(m.recipients, m.data) for m in target.received] == [(["a@example.com"], BODY)]
    assert relay.resolver.marks == [("failed", "mx1.example.com"), ("ok", "mx2.example.com")]
    assert relay.resolver.is_down(MailHost("mx1.example.com", 25, 10))
    assert not relay.resolver.is_down(MailHost("mx2.example.com", 25, 20))


@async_test
async def test_mx_hosts_tried_in_preference_order() -> None:
    """
    The MX with the lowest preference is tried first even when listed last;
    when it works no other host is contacted.
    """
    zone = mx("example.com", (30, "mx3.example.com"), (5, "mx1.example.com"))
    async with running_target() as target:
        network = Network({"mx1.example.com": target.port})
        relay = make_relay(zone, network)
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope("a@example.com"), BODY)
    assert result.delivered == ("a@example.com",)
    assert network.contacts == ["mx1.example.com"]


@async_test
async def test_lost_connection_mid_data_goes_to_the_next_host() -> None:
    """
    The first MX drops the connection in the middle of the message: the
    recipients are retried at once on the second, which delivers.
    """
    async with (
        running_target(Script(drop_after_data_lines=1)) as first,
        running_target() as second,
    ):
        network = Network({"mx1.example.com": first.port, "mx2.example.com": second.port})
        relay = make_relay(EXAMPLE_MX, network)
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope("a@example.com", "b@example.com"), BODY)
    assert result.delivered == ("a@example.com", "b@example.com")
    assert first.received == []
    assert [m.recipients for m in second.received] == [["a@example.com", "b@example.com"]]
    assert relay.resolver.marks == [("failed", "mx1.example.com"), ("ok", "mx2.example.com")]


@async_test
async def test_all_hosts_failing_defers_then_holds_back_then_retries() -> None:
    """
    Every MX fails (one refuses connections, one greets with C{421}): the
    recipient is deferred with the last host's reason and both hosts are
    marked failed. While they are held back the next delivery is deferred
    at once (C{4.4.1}) without a connection; once the hold is over they are
    tried again, and the one that now works is marked working.
    """
    async with running_target(Script(greeting=(421, "4.3.2 busy"))) as target:
        network = Network({"mx1.example.com": closed_port(), "mx2.example.com": target.port})
        relay = make_relay(EXAMPLE_MX, network)
        async with running(relay) as outbound:
            first = await outbound.deliver(envelope("a@example.com"), BODY)
            assert first.delivered == ()
            assert first.bounced == ()
            assert [r for r, _ in first.deferred] == ["a@example.com"]
            assert "421 4.3.2 busy" in first.deferred[0][1]
            assert relay.resolver.marks == [
                ("failed", "mx1.example.com"),
                ("failed", "mx2.example.com"),
            ]

            relay.clock.advance(HOLD - 1)
            held = await outbound.deliver(envelope("a@example.com"), BODY)
            assert held.deferred[0][1].startswith("4.4.1 example.com: every mail host")
            assert network.contacts == ["mx1.example.com", "mx2.example.com"]
            assert target.connections == 1

            target.script.greeting = (220, "target.test ESMTP")
            relay.clock.advance(1)
            later = await outbound.deliver(envelope("a@example.com"), BODY)
    assert later.delivered == ("a@example.com",)
    assert network.contacts == ["mx1.example.com", "mx2.example.com"] * 2
    assert relay.resolver.marks[2:] == [("failed", "mx1.example.com"), ("ok", "mx2.example.com")]
    assert len(target.received) == 1


@async_test
async def test_held_back_host_skipped_while_another_is_up() -> None:
    """
    A host marked failed by an earlier delivery is not tried while it is
    held back: the next delivery goes straight to the other MX.
    """
    async with running_target() as target:
        network = Network({"mx1.example.com": closed_port(), "mx2.example.com": target.port})
        relay = make_relay(EXAMPLE_MX, network)
        relay.resolver.mark_failed(MailHost("mx1.example.com", 25, 10))
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope("a@example.com"), BODY)
    assert result.delivered == ("a@example.com",)
    assert network.contacts == ["mx2.example.com"]


@pytest.mark.parametrize(("max_hosts", "tried"), [(3, 3), (2, 2)])
@async_test
async def test_hosts_tried_per_delivery_are_limited(max_hosts: int, tried: int) -> None:
    """
    Three MX hosts that all refuse: with C{max_hosts} 3 (at the limit) all
    three are tried; with 2 (one host past it) only the first two, and the
    recipient is deferred with the second one's reason.
    """
    zone = mx("example.com", *((n, f"mx{n}.example.com") for n in (1, 2, 3)))
    network = Network({f"mx{n}.example.com": closed_port() for n in (1, 2, 3)})
    relay = make_relay(zone, network, max_hosts=max_hosts)
    async with running(relay) as outbound:
        result = await outbound.deliver(envelope("a@example.com"), BODY)
    names = [f"mx{n}.example.com" for n in range(1, tried + 1)]
    assert network.contacts == names
    assert f"cannot connect to {names[-1]}:25" in result.deferred[0][1]


# -- per-recipient replies are final for the attempt


@async_test
async def test_4xx_for_one_recipient_defers_only_it_and_not_on_the_next_host() -> None:
    """
    The first MX answers one recipient with C{450}: that recipient is
    deferred with the reply, the other delivered; the second MX is not
    contacted, and the first counts as working.
    """
    script = Script(rcpt_replies={"b@example.com": (450, "4.2.1 try later")})
    async with running_target(script) as first, running_target() as second:
        network = Network({"mx1.example.com": first.port, "mx2.example.com": second.port})
        relay = make_relay(EXAMPLE_MX, network)
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope("a@example.com", "b@example.com"), BODY)
    assert result.delivered == ("a@example.com",)
    assert [r for r, _ in result.deferred] == ["b@example.com"]
    assert "450 4.2.1 try later" in result.deferred[0][1]
    assert result.bounced == ()
    assert network.contacts == ["mx1.example.com"]
    assert second.connections == 0
    assert relay.resolver.marks == [("ok", "mx1.example.com")]


@async_test
async def test_5xx_for_one_recipient_bounces_it() -> None:
    """
    A C{550} for one recipient bounces it with the reply; the other is
    delivered; no other host is tried.
    """
    script = Script(rcpt_replies={"b@example.com": (550, "5.1.1 no such user")})
    async with running_target(script) as first, running_target() as second:
        network = Network({"mx1.example.com": first.port, "mx2.example.com": second.port})
        relay = make_relay(EXAMPLE_MX, network)
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope("a@example.com", "b@example.com"), BODY)
    assert result.delivered == ("a@example.com",)
    assert [r for r, _ in result.bounced] == ["b@example.com"]
    assert "550 5.1.1 no such user" in result.bounced[0][1]
    assert second.connections == 0


# -- DNS verdicts


@pytest.mark.parametrize(
    ("zone", "kind", "status"),
    [
        (mx("example.com", (0, "."))[("example.com", dns.MX)], "bounced", "5.1.10"),
        (DNSNameError(dns.Message(rCode=dns.ENAME)), "bounced", "5.1.2"),
        (DNSServerError(dns.Message(rCode=dns.ESERVER)), "deferred", "4.4.3"),
    ],
    ids=["null-mx", "nxdomain", "servfail"],
)
@async_test
async def test_dns_verdicts(zone: Answer, kind: str, status: str) -> None:
    """
    A null MX bounces with C{5.1.10}, NXDOMAIN with C{5.1.2}, SERVFAIL
    defers with C{4.4.3}; the status leads the reason, where a DSN finds
    it. Nothing is contacted.
    """
    network = Network()
    relay = make_relay({("example.com", dns.MX): zone}, network)
    async with running(relay) as outbound:
        result = await outbound.deliver(envelope("a@example.com"), BODY)
    failures = result.bounced if kind == "bounced" else result.deferred
    assert [r for r, _ in failures] == ["a@example.com"]
    assert result.delivered == ()
    assert len(result.deferred) + len(result.bounced) == 1
    reason = failures[0][1]
    assert reason.startswith(f"{status} example.com: ")
    assert dsn_status(RecipientFailure("a@example.com", diagnostic=reason)) == status
    assert network.contacts == []


@async_test
async def test_fallback_to_address_record_without_mx() -> None:
    """
    A domain without MX but with an A record is its own mail host (here
    C{localhost}, connected to by the pool's own endpoint).
    """
    async with running_target() as target:
        relay = make_relay(a("localhost"), port=target.port)
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope("bob@localhost"), BODY)
    assert result.delivered == ("bob@localhost",)
    assert [m.recipients for m in target.received] == [["bob@localhost"]]
    assert ("localhost", dns.A) in relay.dns.queries


@async_test
async def test_address_literal_needs_no_dns() -> None:
    """
    C{bob@[127.0.0.1]} goes to that address (the port the resolver gives);
    DNS is not asked. (Twisted's server, the target here, cannot parse an
    address literal in RCPT and refuses it with C{501}: the reply shows
    that the message reached it.)
    """
    async with running_target() as target:
        port = target.port
        relay = make_relay({}, port=port)
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope("bob@[127.0.0.1]"), BODY)
    assert result.bounced == (
        (
            "bob@[127.0.0.1]",
            f"127.0.0.1:{port} said: 501 Syntax error (in reply to RCPT TO)",
        ),
    )
    assert target.connections == 1
    assert relay.dns.queries == []


@async_test
async def test_recipient_without_domain_bounces() -> None:
    """
    An address without a domain bounces (C{5.1.3}); the others go on.
    """
    async with running_target() as target:
        network = Network({"mx1.example.com": target.port})
        relay = make_relay(mx("example.com", (10, "mx1.example.com")), network)
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope("bob", "a@example.com"), BODY)
    assert result.delivered == ("a@example.com",)
    assert [(r, why[:5]) for r, why in result.bounced] == [("bob", "5.1.3")]


# -- domains


@async_test
async def test_domains_delivered_separately_and_merged() -> None:
    """
    One message to two domains (one written in another case) and a domain
    with a null MX: each domain gets its own transaction with its own
    recipients, and the result has every recipient in envelope order.
    """
    zone = {
        **mx("example.com", (10, "mx.example.com")),
        **mx("example.org", (10, "mx.example.org")),
        **mx("nomail.test", (0, ".")),
    }
    refuse = Script(rcpt_replies={"y@example.org": (550, "5.1.1 unknown")})
    async with running_target() as com, running_target(refuse) as org:
        network = Network({"mx.example.com": com.port, "mx.example.org": org.port})
        relay = make_relay(zone, network)
        recipients = (
            "a@example.com",
            "x@example.org",
            "b@EXAMPLE.com",
            "z@nomail.test",
            "y@example.org",
        )
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope(*recipients), BODY)
    assert result.delivered == ("a@example.com", "x@example.org", "b@EXAMPLE.com")
    assert [r for r, _ in result.bounced] == ["z@nomail.test", "y@example.org"]
    assert result.deferred == ()
    assert [m.recipients for m in com.received] == [["a@example.com", "b@EXAMPLE.com"]]
    assert [m.recipients for m in org.received] == [["x@example.org"]]
    assert sorted(network.contacts) == ["mx.example.com", "mx.example.org"]


@async_test
async def test_domains_delivered_concurrently() -> None:
    """
    A domain whose MX lookup has not answered does not hold up another
    domain of the same message: its mail arrives first.
    """
    pending: Deferred[Any] = Deferred()
    zone: dict[tuple[str, int], Answer] = {
        **mx("example.com", (10, "mx.example.com")),
        ("example.org", dns.MX): pending,
    }
    async with running_target() as com, running_target() as org:
        network = Network({"mx.example.com": com.port, "mx.example.org": org.port})
        relay = make_relay(zone, network)
        async with running(relay) as outbound:
            delivery = outbound.deliver(envelope("a@example.com", "b@example.org"), BODY)
            await until(lambda: len(com.received) == 1)
            assert not delivery.called
            answer = mx("example.org", (10, "mx.example.org"))[("example.org", dns.MX)]
            pending.callback((answer, [], []))
            result = await delivery
    assert result.delivered == ("a@example.com", "b@example.org")
    assert len(org.received) == 1


@async_test
async def test_international_domain_sent_as_a_label() -> None:
    """
    Recipients of C{bücher.example} and C{XN--BCHER-KVA.example} are one
    domain: looked up and sent by the A-label in one transaction (no
    SMTPUTF8 needed), and reported under the addresses the envelope had.
    """
    async with running_target() as target:
        network = Network({"mx.example": target.port})
        relay = make_relay(mx("xn--bcher-kva.example", (10, "mx.example")), network)
        async with running(relay) as outbound:
            result = await outbound.deliver(
                envelope("bob@bücher.example", "carol@XN--BCHER-KVA.example"), BODY
            )
    assert result.delivered == ("bob@bücher.example", "carol@XN--BCHER-KVA.example")
    assert [m.recipients for m in target.received] == [
        ["bob@xn--bcher-kva.example", "carol@XN--BCHER-KVA.example"]
    ]
    assert [q for q in relay.dns.queries if q[1] == dns.MX] == [("xn--bcher-kva.example", dns.MX)]


@async_test
async def test_repeated_recipient_sent_once() -> None:
    """
    A recipient listed twice gets one copy; both entries are reported.
    """
    async with running_target() as target:
        network = Network({"mx.example.com": target.port})
        relay = make_relay(mx("example.com", (10, "mx.example.com")), network)
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope("a@example.com", "a@example.com"), BODY)
    assert result.delivered == ("a@example.com", "a@example.com")
    assert [m.recipients for m in target.received] == [["a@example.com"]]


# -- TLS


@async_test
async def test_opportunistic_tls_with_an_unverifiable_certificate() -> None:
    """
    An MX offering STARTTLS with a self-signed certificate for another name
    gets the message inside TLS (certificates are not checked).
    """
    async with running_target(Script(tls=TLS)) as target:
        network = Network({"mx.example.com": target.port})
        relay = make_relay(mx("example.com", (10, "mx.example.com")), network)
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope("a@example.com"), BODY)
    assert result.delivered == ("a@example.com",)
    assert target.received[0].over_tls


@async_test
async def test_tls_failure_delivers_in_plaintext() -> None:
    """
    An MX whose TLS handshake fails gets the message over a second,
    plaintext connection; the host is not marked failed.
    """
    async with running_target(Script(tls=TLS, starttls="broken")) as target:
        network = Network({"mx.example.com": target.port})
        relay = make_relay(mx("example.com", (10, "mx.example.com")), network)
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope("a@example.com"), BODY)
    assert result.delivered == ("a@example.com",)
    assert [m.over_tls for m in target.received] == [False]
    assert target.connections == 2
    assert relay.resolver.marks == [("ok", "mx.example.com")]


# -- concurrency


@pytest.mark.parametrize("messages", [3, 4])
@async_test
async def test_per_domain_limit_on_one_host(messages: int) -> None:
    """
    With C{max_per_domain} 3, three messages at once open three
    connections (at the limit); a fourth (one past it) waits for a free
    one: never more than three sessions open at the MX, all delivered.
    """
    async with running_target() as target:
        network = Network({"mx.example.com": target.port})
        zone = mx("example.com", (10, "mx.example.com"))
        relay = make_relay(zone, network, max_per_domain=3)
        async with running(relay) as outbound:
            sends = [
                outbound.deliver(envelope("a@example.com", queue_id=f"q{n}"), b"m%d\r\n" % n)
                for n in range(messages)
            ]
            assert outbound.deliveries_to("EXAMPLE.com") == 3
            results = await DeferredList(sends, fireOnOneErrback=True)
            await target.connected(3)
            assert outbound.deliveries_to("example.com") == 0
    assert all(r.delivered == ("a@example.com",) for _, r in results)
    assert target.most_open == 3
    assert target.connections == 3
    assert sorted(m.data for m in target.received) == [b"m%d\r\n" % n for n in range(messages)]


@define
class Tally:
    """
    Transactions under way across several targets.
    """

    targets: list[CountingTarget] = field(factory=list)
    most: int = 0


class CountingTarget(RelayTarget):
    """
    A target that, at each MAIL, counts the transactions under way on it
    and its siblings (every transaction is accepted here, so one is under
    way from its MAIL until its message is recorded).
    """

    tally: Tally
    _mail: int = 0

    @property
    def mail_commands(self) -> int:
        return self._mail

    @mail_commands.setter
    def mail_commands(self, value: int) -> None:
        self._mail = value
        if value:
            under_way = sum(t._mail - len(t.received) for t in self.tally.targets)
            self.tally.most = max(self.tally.most, under_way)


@asynccontextmanager
async def counting_targets(count: int) -> AsyncIterator[tuple[Tally, list[CountingTarget]]]:
    tally = Tally()
    for _ in range(count):
        target = CountingTarget()
        target.tally = tally
        target.listen(reactor())
        tally.targets.append(target)
    try:
        yield tally, tally.targets
    finally:
        for target in tally.targets:
            await target.stop()


@async_test
async def test_per_domain_limit_across_hosts() -> None:
    """
    Twelve messages at once for a domain with two MX hosts of equal
    preference (shuffled per delivery): both hosts get mail, and never
    more than C{max_per_domain} transactions are under way across them.
    """
    zone = mx("example.com", (10, "mx1.example.com"), (10, "mx2.example.com"))
    async with counting_targets(2) as (tally, (first, second)):
        network = Network({"mx1.example.com": first.port, "mx2.example.com": second.port})
        relay = make_relay(zone, network, max_per_domain=3)
        async with running(relay) as outbound:
            sends = [
                outbound.deliver(envelope("a@example.com", queue_id=f"q{n}"), b"m%d\r\n" % n)
                for n in range(12)
            ]
            results = await DeferredList(sends, fireOnOneErrback=True)
    assert all(r.delivered == ("a@example.com",) for _, r in results)
    assert first.received
    assert second.received
    assert len(first.received) + len(second.received) == 12
    assert tally.most == 3


@async_test
async def test_overall_limit_across_domains() -> None:
    """
    With one connection in all (C{--concurrency} 1), a message for two
    domains is sent one domain at a time.
    """
    zone = {
        **mx("example.com", (10, "mx.example.com")),
        **mx("example.org", (10, "mx.example.org")),
    }
    group = OpenCounter()
    async with running_target(group=group) as com, running_target(group=group) as org:
        network = Network({"mx.example.com": com.port, "mx.example.org": org.port})
        relay = make_relay(zone, network, max_connections=1)
        async with running(relay) as outbound:
            result = await outbound.deliver(envelope("a@example.com", "b@example.org"), BODY)
    assert result.delivered == ("a@example.com", "b@example.org")
    assert group.most_open == 1


def test_default_per_domain_limit() -> None:
    """
    The documented default: five deliveries at once per domain.
    """
    assert MAX_PER_DOMAIN == 5


# -- with Twisted's DNS client, as the gateway runs it


class LoopbackResolver(client.Resolver):
    """
    C{twisted.names.client.Resolver}, its query sockets bound to 127.0.0.1
    instead of every interface.
    """

    def _connectedProtocol(self, interface: str = "") -> Any:
        return super()._connectedProtocol(interface="127.0.0.1")


@async_test
async def test_through_a_name_server_on_loopback() -> None:
    """
    With Twisted's own DNS client (as C{--relay mx} uses it) asking a name
    server on 127.0.0.1: an MX answer is delivered to, an NXDOMAIN and a
    null MX bounce with their statuses.
    """
    async with running_target() as target:
        port = target.port
        zone = {
            **mx("example.com", (10, "127.0.0.1")),
            ("gone.test", dns.MX): DNSNameError(),
            **mx("nomail.test", (0, ".")),
        }
        names = server.DNSServerFactory(clients=[StubResolver(zone)])
        listening = reactor().listenUDP(0, dns.DNSDatagramProtocol(names), interface="127.0.0.1")
        try:
            dns_client = LoopbackResolver(
                servers=[("127.0.0.1", listening.getHost().port)], reactor=reactor()
            )
            resolver = MXResolver(dns_client, reactor(), port=port)
            outbound = MXOutbound(reactor(), resolver, settings=SETTINGS)
            outbound.startService()
            try:
                result = await outbound.deliver(
                    envelope("a@example.com", "b@gone.test", "c@nomail.test"), BODY
                )
            finally:
                await outbound.stopService()
        finally:
            await listening.stopListening()
    assert result.delivered == ("a@example.com",)
    assert [(r, why.split()[0]) for r, why in result.bounced] == [
        ("b@gone.test", "5.1.2"),
        ("c@nomail.test", "5.1.10"),
    ]
    assert [m.recipients for m in target.received] == [["a@example.com"]]


# -- stopping


@async_test
async def test_stop_defers_a_pending_lookup_without_marking_hosts() -> None:
    """
    Stopping while an MX lookup is unanswered defers its recipients at
    once; no host is marked, nothing is contacted, and later deliveries
    are deferred.
    """
    network = Network()
    relay = make_relay({("example.com", dns.MX): Deferred()}, network)
    relay.outbound.startService()
    delivery = relay.outbound.deliver(envelope("a@example.com"), BODY)
    assert not delivery.called
    await relay.outbound.stopService()
    result = await delivery
    assert result.deferred == (("a@example.com", "4.3.2 the MX relay is stopping"),)
    late = await relay.outbound.deliver(envelope("a@example.com"), BODY)
    assert [r for r, _ in late.deferred] == ["a@example.com"]
    assert relay.resolver.marks == []
    assert network.contacts == []


@async_test
async def test_stop_while_waiting_for_a_domain_slot() -> None:
    """
    A delivery waiting for a per-domain slot when the relay stops is
    deferred as stopping, and the host is not marked failed.
    """
    async with running_target() as target:
        network = Network({"mx.example.com": target.port})
        relay = make_relay(mx("example.com", (10, "mx.example.com")), network, max_per_domain=1)
        relay.outbound.startService()
        first = relay.outbound.deliver(envelope("a@example.com", queue_id="q1"), BODY)
        second = relay.outbound.deliver(envelope("a@example.com", queue_id="q2"), BODY)
        stopped = relay.outbound.stopService()
        results = [await first, await second]
        await stopped
    assert "stopping" in results[1].deferred[0][1]
    assert ("failed", "mx.example.com") not in relay.resolver.marks
    assert results[0].delivered + tuple(r for r, _ in results[0].deferred) == ("a@example.com",)
