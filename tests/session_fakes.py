"""
In-memory stand-ins and a harness for the SMTP session tests: a queue, a
user store, a user lookup for the real credential checker (alerts go to
smtpgw's own L{MemoryAlertSink}), and
L{Harness}, which builds a L{GatewaySMTPFactory} on a L{Clock} and connects
sessions to L{StringTransport}s.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from attrs import define, field
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from smtpgw.alerts import MemoryAlertSink
from smtpgw.checker import SmtpUserChecker, UserLookup
from smtpgw.interfaces import IMessageQueue, IUserStore, JournalUnavailable
from smtpgw.limits import Limits
from smtpgw.model import Enforcement, Envelope, MailList, Priority, QueueIdGenerator, SmtpUser
from smtpgw.passwords import hash_password
from smtpgw.realm import GatewayRealm
from smtpgw.session import GatewaySMTP, GatewaySMTPFactory

T = TypeVar("T")

PASSWORD = "correct horse battery staple"
HOSTNAME = "gw.example.net"
START = 1_700_000_000.0

#: bcrypt at its cheapest: tests check logic, not cost.
_HASH = hash_password(PASSWORD, rounds=4)


def make_user(
    username: str = "alice",
    *,
    list_name: str = "news",
    domains: tuple[str, ...] = ("example.com",),
    senders: tuple[str, ...] = (),
    enforcement: Enforcement = Enforcement.ENFORCE,
    priority: Priority = Priority.NORMAL,
    active: bool = True,
) -> SmtpUser:
    """
    A user whose password is L{PASSWORD}.
    """
    return SmtpUser(
        username=username,
        list=list_name,
        password_hash=_HASH,
        active=active,
        priority=priority,
        authorized_domains=domains,
        authorized_senders=senders,
        enforcement=enforcement,
    )


@implementer(IMessageQueue)
@define
class FakeQueue:
    """
    Records what is submitted; C{mode} decides how C{submit} answers:
    C{"ok"} at once, C{"pending"} when the test fires C{pending[i]}, or
    C{"unavailable"} with L{JournalUnavailable}.
    """

    mode: str = "ok"
    accepting: bool = True
    submitted: list[tuple[Envelope, bytes]] = field(factory=list)
    pending: list[Deferred[None]] = field(factory=list)

    def submit(self, envelope: Envelope, body: bytes) -> Deferred[None]:
        if self.mode == "unavailable":
            return fail(JournalUnavailable("disk full"))
        self.submitted.append((envelope, body))
        if self.mode == "pending":
            d: Deferred[None] = Deferred()
            self.pending.append(d)
            return d
        return succeed(None)


@implementer(IUserStore)
@define
class FakeUsers:
    """
    A user store over C{users} (the harness shares its dict, so a test
    changes a record by assigning to it) that records logins and lookups;
    C{mode} decides how C{get_user} answers: C{"ok"} at once, C{"pending"}
    when the test fires C{pending[i]}, or C{"broken"} with an error.
    """

    users: dict[str, SmtpUser] = field(factory=dict)
    mode: str = "ok"
    logins: list[tuple[str, float, str]] = field(factory=list)
    lookups: list[str] = field(factory=list)
    pending: list[Deferred[SmtpUser | None]] = field(factory=list)

    def get_user(self, username: str) -> Deferred[SmtpUser | None]:
        self.lookups.append(username)
        if self.mode == "broken":
            return fail(OSError("database is locked"))
        if self.mode == "pending":
            d: Deferred[SmtpUser | None] = Deferred()
            self.pending.append(d)
            d.addCallback(lambda _: self.users.get(username))
            return d
        return succeed(self.users.get(username))

    def record_login(self, username: str, at: float, ip: str) -> Deferred[None]:
        self.logins.append((username, at, ip))
        return succeed(None)

    def get_list(self, name: str) -> Deferred[MailList | None]:
        return succeed(None)


@define
class _Lookup:
    users: dict[str, SmtpUser]

    def get_user(self, username: str) -> SmtpUser | None:
        return self.users.get(username)


@define
class LookupRunner:
    """
    Runs the checker's lookups at once, or, with C{delayed}, when the test
    calls L{release} (an AUTH whose check takes a while).
    """

    users: dict[str, SmtpUser]
    delayed: bool = False
    waiting: list[tuple[Deferred[Any], Callable[[UserLookup], Any]]] = field(factory=list)

    def run(self, f: Callable[[UserLookup], T]) -> Deferred[T]:
        if self.delayed:
            d: Deferred[T] = Deferred()
            self.waiting.append((d, f))
            return d
        try:
            return succeed(f(_Lookup(self.users)))
        except Exception:
            return fail()

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, f in waiting:
            try:
                result = f(_Lookup(self.users))
            except Exception:
                d.errback()
            else:
                d.callback(result)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):  # type: ignore[misc]
    """
    A L{StringTransport} that can start TLS (and records that it did).
    """

    tls_started_with: Any = None

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_started_with = contextFactory


class CongestingTransport(TLSStringTransport):
    """
    A transport with a write buffer of C{bound} octets: past it, it pauses
    its streaming producer, as Twisted's TCP transport does; L{clear} plays
    the client reading everything, and resumes the producer.
    """

    producer_paused = False

    def __init__(self, bound: int) -> None:
        super().__init__()
        self.bound = bound

    def write(self, data: bytes) -> None:
        super().write(data)
        producer = self.producer
        if (
            producer is not None
            and self.streaming
            and not self.producer_paused
            and self.io.tell() > self.bound
        ):
            self.producer_paused = True
            producer.pauseProducing()

    def clear(self) -> None:
        super().clear()
        if self.producer_paused and self.producer is not None:
            self.producer_paused = False
            self.producer.resumeProducing()

    drain = clear


def plain(username: str = "alice", password: str = PASSWORD) -> bytes:
    """
    The AUTH PLAIN initial response for C{username} and C{password}.
    """
    return base64.b64encode(b"\0" + username.encode() + b"\0" + password.encode())


class Client:
    """
    One connection to a session over a L{StringTransport}.
    """

    def __init__(self, session: GatewaySMTP, transport: StringTransport) -> None:
        self.session = session
        self.transport = transport
        self.greeting: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.session.dataReceived(data)

    def replies(self) -> list[bytes]:
        """
        The reply lines written since the last call, without CRLF.
        """
        data = self.transport.value()
        self.transport.clear()
        return data.split(b"\r\n")[:-1] if data else []

    def codes(self) -> list[bytes]:
        """
        The reply codes (with enhanced status where present) written since
        the last call, one per final reply line.
        """
        return [r[:3] for r in self.replies() if r[3:4] != b"-"]

    def command(self, line: bytes) -> list[bytes]:
        self.send(line + b"\r\n")
        return self.replies()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.session.connectionLost(Failure(ConnectionLost()))

    def login(self, username: str = "alice", password: str = PASSWORD) -> list[bytes]:
        self.command(b"EHLO client.example.org")
        return self.command(b"AUTH PLAIN " + plain(username, password))

    def mail_transaction(
        self, body: bytes, *, sender: bytes = b"a@example.com", rcpts: tuple[bytes, ...] = ()
    ) -> list[bytes]:
        """
        MAIL, RCPT(s), DATA and the body (which ends with its own CRLF),
        pipelined; returns every reply.
        """
        rcpts = rcpts or (b"b@dest.example",)
        data = b"MAIL FROM:<" + sender + b">\r\n"
        data += b"".join(b"RCPT TO:<" + r + b">\r\n" for r in rcpts)
        data += b"DATA\r\n"
        self.send(data)
        out = self.replies()
        self.send(body + b".\r\n")
        return out + self.replies()


@define
class Harness:
    """
    A factory on a L{Clock} with fakes for every service.
    """

    limits: Limits = field(factory=Limits)
    users: dict[str, SmtpUser] = field(factory=lambda: {"alice": make_user()})
    delayed_auth: bool = False
    tls: Any = None
    require_tls: bool = False
    hostname: str = HOSTNAME
    clock: Clock = field(factory=Clock)
    queue: FakeQueue = field(factory=FakeQueue)
    alerts: MemoryAlertSink = field(factory=MemoryAlertSink)
    user_store: FakeUsers = field(factory=FakeUsers)
    runner: LookupRunner = field(init=False)
    factory: GatewaySMTPFactory = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.clock.advance(START)
        self.user_store.users = self.users
        self.runner = LookupRunner(self.users, delayed=self.delayed_auth)
        checker = SmtpUserChecker(self.runner, self.clock, rounds=4)
        self.factory = GatewaySMTPFactory(
            portal=Portal(GatewayRealm(), [checker]),
            queue=self.queue,
            alerts=self.alerts,
            users=self.user_store,
            hostname=self.hostname,
            limits=self.limits,
            tls=lambda: self.tls,
            require_tls=self.require_tls,
            clock=self.clock,
            queue_ids=QueueIdGenerator(),
        )

    def connect(
        self,
        ip: str = "192.0.2.1",
        *,
        tls_capable: bool = True,
        transport: StringTransport | None = None,
    ) -> Client:
        """
        A new connection from C{ip}, greeting already read.

        @param transport: the transport to use (its addresses are set here).
        """
        address: IPv4Address | IPv6Address
        address = IPv6Address("TCP", ip, 40000) if ":" in ip else IPv4Address("TCP", ip, 40000)
        session = self.factory.buildProtocol(address)
        if transport is None:
            transport_class = TLSStringTransport if tls_capable else StringTransport
            transport = transport_class()
        transport.peerAddr = address
        transport.hostAddr = IPv4Address("TCP", "198.51.100.1", 25)
        session.makeConnection(transport)
        client = Client(session, transport)
        if self.limits.greet_delay == 0:
            client.greeting = client.replies()
            assert client.greeting[0].startswith((b"220 ", b"421 ")), client.greeting
        return client

    def logged_in(self, ip: str = "192.0.2.1") -> Client:
        client = self.connect(ip)
        assert client.login()[-1].startswith(b"235 ")
        return client


def message(*headers: bytes, body: bytes = b"Hello.\r\n") -> bytes:
    """
    A message (CRLF line ends) with C{headers} (default a From in
    example.com and a Subject) and C{body}.
    """
    headers = headers or (b"From: Alice <a@example.com>", b"Subject: test")
    return b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def lines_of(data: bytes) -> Iterator[bytes]:
    yield from data.split(b"\r\n")
