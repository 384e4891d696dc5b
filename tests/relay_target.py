"""
A real Twisted ESMTP server on 127.0.0.1, used as the next hop in the relay
tests, and scriptable per role: accepting, deferring or refusing at MAIL,
RCPT, DATA or the final dot, dropping the connection in the middle of the
message, offering STARTTLS with a given certificate (or answering it in a
hostile or broken way), requiring AUTH, advertising PIPELINING.

It counts what a test needs to check from the server's side: connections,
the most open at once, MAIL commands, and each message received, byte for
byte as the server's C{IMessage} got it.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.ssl import Certificate, CertificateOptions
from twisted.mail import smtp
from twisted.mail._cred import PLAINCredentials
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "OpenCounter",
    "Received",
    "RelayTarget",
    "Script",
    "TargetTLS",
    "make_tls",
    "running_target",
]


@define
class OpenCounter:
    """
    Sessions open at once across several targets.
    """

    open: int = 0
    most_open: int = 0


@define
class TargetTLS:
    """
    A self-signed certificate for C{localhost} and C{127.0.0.1}: the server
    options, and the certificate for a client that trusts it.
    """

    options: CertificateOptions
    certificate: Certificate


def make_tls(names: tuple[str, ...] = ("localhost",)) -> TargetTLS:
    """
    A fresh self-signed P-256 certificate (fast to make, unlike RSA) that
    is its own authority, so a client can verify against it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    alternatives: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    openssl_certificate = crypto.X509.from_cryptography(certificate)
    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key), certificate=openssl_certificate
    )
    return TargetTLS(options, Certificate(openssl_certificate))


@define
class Script:
    """
    How the target behaves. A reply is C{(code, text)}.

    @ivar greeting: the greeting's reply; L{None} sends none at all.
    @ivar mail_reply: refuse every MAIL with this.
    @ivar rcpt_replies: refuse these recipients with these.
    @ivar data_reply: answer DATA with this instead of C{354}.
    @ivar eom_reply: answer the final dot with this instead of C{250}.
    @ivar drop_after_data_lines: abort the connection after this many
        lines of message data.
    @ivar tls: offer STARTTLS with this certificate.
    @ivar starttls: C{normal}; C{hostile} (C{220} and a fake C{250} in one
        write, then TLS); C{broken} (C{220}, then plaintext, then close).
    @ivar users: require AUTH for MAIL, with these passwords.
    @ivar mechanisms: the AUTH mechanisms offered.
    @ivar pipelining: advertise PIPELINING.
    """

    greeting: tuple[int, str] | None = (220, "target.test ESMTP")
    mail_reply: tuple[int, str] | None = None
    rcpt_replies: dict[str, tuple[int, str]] = field(factory=dict)
    data_reply: tuple[int, str] | None = None
    eom_reply: tuple[int, str] | None = None
    drop_after_data_lines: int | None = None
    tls: TargetTLS | None = None
    starttls: str = "normal"
    users: dict[str, str] | None = None
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    pipelining: bool = False


@define
class Received:
    """
    One message the target took, and the session it came in.
    """

    sender: str
    recipients: list[str] = field(factory=list)
    data: bytes = b""
    over_tls: bool = False
    authenticated_as: str | None = None


@implementer(smtp.IMessage)
class _Recorder:
    """
    The message of one transaction (given to its first recipient only, so
    that each line is recorded once).
    """

    def __init__(self, target: RelayTarget, transaction: Received) -> None:
        self._target = target
        self._transaction = transaction
        self._lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)

    def eomReceived(self) -> Deferred[None]:
        self._transaction.data = b"".join(line + b"\r\n" for line in self._lines)
        self._target.received.append(self._transaction)
        return succeed(None)

    def connectionLost(self) -> None:
        self._lines = []


@implementer(smtp.IMessage)
class _Discard:
    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> Deferred[None]:
        return succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(IRealm)
class _Realm:
    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        return smtp.IMessageDelivery, object(), lambda: None


class _TargetESMTP(smtp.ESMTP):
    """
    Twisted's own ESMTP server, with the script's replies.
    """

    target: RelayTarget
    script: Script
    portal: Any

    @property
    def wire(self) -> Any:
        """
        The transport, untyped (TCP, then TLS).
        """
        return self.transport

    def connectionMade(self) -> None:
        self.target._connected(self)
        greeting = self.script.greeting
        if greeting is None:
            return
        code, text = greeting
        if code == 220:
            super().connectionMade()
            return
        # The stock server always greets with 220.
        self._helo = (None, self.wire.getPeer().host)
        self.sendCode(code, text.encode())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.target._disconnected(self)
        super().connectionLost(reason)

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        # The message arrives as it was sent: nothing added.
        return None

    def extensions(self) -> dict[bytes, Any]:
        extensions: dict[bytes, Any] = super().extensions()
        if self.script.pipelining:
            extensions[b"PIPELINING"] = None
        if self.script.users is None:
            extensions.pop(b"AUTH", None)
        return extensions

    def ext_STARTTLS(self, rest: bytes) -> None:
        mode = self.script.starttls
        if mode == "normal" or self.startedTLS or self.ctx is None:
            super().ext_STARTTLS(rest)
        elif mode == "hostile":
            self.wire.write(b"220 ready\r\n250 fake\r\n")
            self.wire.startTLS(self.ctx)
            self.startedTLS = True
        else:
            self.sendCode(220, b"Begin TLS negotiation now")
            self.wire.write(b"this is not a TLS handshake\r\n")
            self.wire.loseConnection()

    def _cbAuthenticated(self, loginInfo: Any) -> Any:
        challenger: Any = self.challenger
        self.authenticated_as = challenger.username.decode()
        return super()._cbAuthenticated(loginInfo)

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        self.target.mail_commands += 1
        if self.script.users is not None and not self.authenticated:
            raise smtp.SMTPServerError(530, "5.7.0 Authentication required")
        if self.script.mail_reply is not None:
            raise smtp.SMTPServerError(*self.script.mail_reply)
        self.transaction = Received(
            sender=str(origin),
            over_tls=self.startedTLS,
            authenticated_as=getattr(self, "authenticated_as", None),
        )
        return origin

    def validateTo(self, user: smtp.User) -> Any:
        address = str(user.dest)
        if address in self.script.rcpt_replies:
            raise smtp.SMTPServerError(*self.script.rcpt_replies[address])
        transaction = self.transaction
        first = not transaction.recipients
        transaction.recipients.append(address)
        if first:
            return lambda: _Recorder(self.target, transaction)
        return _Discard

    def do_DATA(self, rest: bytes) -> None:
        if self.script.data_reply is not None and self._from is not None and self._to:
            self._from, self._to = None, []
            code, text = self.script.data_reply
            self.sendCode(code, text.encode())
            return
        super().do_DATA(rest)
        self.data_lines = 0
        # The stock server puts an empty line before a first line that has
        # no colon (a message without headers); the tests want the message
        # exactly as sent.
        self._SMTP__inheader = 1

    def dataLineReceived(self, line: bytes) -> None:
        limit = self.script.drop_after_data_lines
        self.data_lines += 1
        if limit is not None and self.data_lines > limit:
            self.wire.abortConnection()
            return
        super().dataLineReceived(line)

    state_DATA = dataLineReceived

    def _messageHandled(self, resultList: Any) -> None:
        if self.script.eom_reply is not None:
            self.target.received.pop()
            code, text = self.script.eom_reply
            self.sendCode(code, text.encode())
            return
        super()._messageHandled(resultList)


class RelayTarget(ServerFactory):
    """
    Listens on 127.0.0.1 and serves L{_TargetESMTP} sessions with a
    L{Script}.

    @ivar connections: sessions accepted so far.
    @ivar open: sessions open now.
    @ivar most_open: the most sessions open at once.
    @ivar mail_commands: MAIL commands received.
    @ivar received: the messages taken (final dot answered C{250}).
    @ivar sessions: the sessions open now.
    """

    def __init__(self, script: Script | None = None, group: OpenCounter | None = None) -> None:
        self.script = script or Script()
        self.group = group or OpenCounter()
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.mail_commands = 0
        self.received: list[Received] = []
        self.sessions: list[_TargetESMTP] = []
        self._listening: IListeningPort | None = None
        self._idle: list[Deferred[None]] = []
        self._counted: list[tuple[int, Deferred[None]]] = []

    @property
    def port(self) -> int:
        """
        The port it listens on.
        """
        assert self._listening is not None
        address: Any = self._listening.getHost()
        port: int = address.port
        return port

    def buildProtocol(self, addr: Any) -> _TargetESMTP:
        challengers: dict[bytes, Any] = {}
        if self.script.users is not None:
            known = {"PLAIN": PLAINCredentials, "LOGIN": smtp.LOGINCredentials}
            challengers = {name.encode(): known[name] for name in self.script.mechanisms}
        protocol = _TargetESMTP(
            chal=challengers,
            contextFactory=self.script.tls.options if self.script.tls else None,
        )
        protocol.host = b"target.test"
        protocol.noisy = False
        protocol.target = self
        protocol.script = self.script
        if self.script.users is not None:
            checker = InMemoryUsernamePasswordDatabaseDontUse()
            for user, password in self.script.users.items():
                checker.addUser(user.encode(), password.encode())
            protocol.portal = Portal(_Realm(), [checker])
        return protocol

    def _connected(self, session: _TargetESMTP) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self.group.open += 1
        self.group.most_open = max(self.group.most_open, self.group.open)
        self.sessions.append(session)
        reached = [d for count, d in self._counted if count <= self.connections]
        self._counted = [(c, d) for c, d in self._counted if c > self.connections]
        for waiting in reached:
            waiting.callback(None)

    def _disconnected(self, session: _TargetESMTP) -> None:
        self.open -= 1
        self.group.open -= 1
        self.sessions.remove(session)
        if not self.open:
            idle, self._idle = self._idle, []
            for waiting in idle:
                waiting.callback(None)

    def all_closed(self) -> Deferred[None]:
        """
        Fires once no session is open.
        """
        if not self.open:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._idle.append(waiting)
        return waiting

    def connected(self, count: int) -> Deferred[None]:
        """
        Fires once C{count} sessions have been accepted in all.
        """
        if self.connections >= count:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._counted.append((count, waiting))
        return waiting

    def listen(self, reactor: Any) -> None:
        """
        Start listening on a free port of 127.0.0.1.
        """
        self._listening = reactor.listenTCP(0, self, interface="127.0.0.1")

    async def stop(self) -> None:
        """
        Stop listening and drop the sessions still open.
        """
        if self._listening is not None:
            stopping: Any = self._listening.stopListening()
            await stopping
        for session in list(self.sessions):
            session.wire.abortConnection()
        await self.all_closed()


@asynccontextmanager
async def running_target(
    script: Script | None = None, group: OpenCounter | None = None
) -> AsyncIterator[RelayTarget]:
    """
    A L{RelayTarget} listening for the duration of the block.
    """
    from twisted.internet import reactor

    target = RelayTarget(script, group)
    target.listen(reactor)
    try:
        yield target
    finally:
        await target.stop()
