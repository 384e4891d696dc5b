"""
The outbound SMTP client: one connection to one server, several messages.

Built on a protocol of its own rather than on L{twisted.mail.smtp.ESMTPClient},
whose client side cannot be made safe by overriding a few methods: it
dot-stuffs per 16 KiB chunk (a C{.} line at a chunk boundary goes out
unescaped), keeps reading buffered plaintext as replies after C{STARTTLS},
hears of a failed TLS handshake only in C{connectionLost}, has one idle
timeout for every phase, logs the AUTH lines into the texts of its errors,
and does not pipeline.

Three layers:
  - L{encode_data}: the message as it goes on the wire (pure).
  - L{SMTPClientProtocol}: replies in, commands out, one deadline per
    awaited reply; a lost connection, a timeout or a failed TLS handshake
    fails every awaited reply with L{SessionFailed}, so nothing hangs.
  - L{SMTPConnection}: the conversation (greeting, EHLO, STARTTLS, AUTH,
    then one transaction per message) and the outcome of each message per
    recipient, as a L{SendResult}.

The connection pool (L{smtpgw.relay}) opens connections and feeds them.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import functools
import re
import socket
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, TLSVersion, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpgw.interfaces import DeliveryResult
from smtpgw.model import Envelope

__all__ = [
    "COMMAND_TIMEOUT",
    "CONNECT_TIMEOUT",
    "DATA_DONE_TIMEOUT",
    "DATA_INIT_TIMEOUT",
    "GREETING_TIMEOUT",
    "MAX_REASON_TEXT",
    "MAX_REPLY_LINE",
    "MAX_REPLY_LINES",
    "QUIT_TIMEOUT",
    "TLS_HANDSHAKE_TIMEOUT",
    "ClientSettings",
    "ClientTimeouts",
    "Credentials",
    "Reply",
    "SMTPClientFactory",
    "SMTPClientProtocol",
    "SMTPConnection",
    "SendResult",
    "SessionFailed",
    "SessionPolicy",
    "StaleConnection",
    "StartTLS",
    "TLSFailed",
    "TLSFallback",
    "TLSPolicy",
    "encode_data",
    "peer_name",
]

MAX_REPLY_LINE = 4096
"""Longest reply line accepted, in bytes (RFC 5321 allows 512; some servers
send more). A longer line is a protocol error and ends the connection."""

MAX_REPLY_LINES = 100
"""Most lines in one multi-line reply; more is a protocol error."""

MAX_REASON_TEXT = 1000
"""Characters of a server's reply kept in a recipient's reason (the rest
is cut): reasons go into the journal and into delivery reports."""

CONNECT_TIMEOUT = 30.0
"""Seconds to establish the TCP connection."""

GREETING_TIMEOUT = 300.0
"""Seconds to wait for the greeting (RFC 5321 section 4.5.3.2.1)."""

COMMAND_TIMEOUT = 300.0
"""Seconds to wait for the reply to EHLO, HELO, STARTTLS, AUTH, MAIL, RCPT
and RSET (RFC 5321 sections 4.5.3.2.2 and 4.5.3.2.3)."""

TLS_HANDSHAKE_TIMEOUT = 60.0
"""Seconds the TLS handshake after STARTTLS may take."""

DATA_INIT_TIMEOUT = 120.0
"""Seconds to wait for the C{354} reply to DATA (RFC 5321 section 4.5.3.2.4)."""

DATA_DONE_TIMEOUT = 600.0
"""Seconds from sending a message to the reply to its final dot (RFC 5321
sections 4.5.3.2.5 and 4.5.3.2.6, the message being written at once)."""

QUIT_TIMEOUT = 10.0
"""Seconds to wait for the reply to QUIT before closing anyway."""

_MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2

_LINE_END = re.compile(rb"\r\n|\r|\n")
# Characters that would let an address end the command line or the path.
_UNSAFE_IN_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")
_PRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]")


@frozen
class ClientTimeouts:
    """
    How long each phase of a session may take, in seconds (the defaults are
    the module's C{*_TIMEOUT} constants: the minimums RFC 5321 section
    4.5.3.2 asks clients to wait, except connect, TLS handshake and QUIT,
    which it does not name).

    @ivar connect: to establish the TCP connection.
    @ivar greeting: for the server's C{220} after connecting.
    @ivar command: for the reply to EHLO, HELO, STARTTLS, AUTH, MAIL, RCPT
        and RSET.
    @ivar tls_handshake: for the TLS handshake after C{220} to STARTTLS.
    @ivar data_init: for the C{354} reply to DATA.
    @ivar data_done: from sending the message to the reply to its final dot
        (the message itself is written at once).
    @ivar quit: for the reply to QUIT, after which the connection is closed
        anyway.
    """

    connect: float = CONNECT_TIMEOUT
    greeting: float = GREETING_TIMEOUT
    command: float = COMMAND_TIMEOUT
    tls_handshake: float = TLS_HANDSHAKE_TIMEOUT
    data_init: float = DATA_INIT_TIMEOUT
    data_done: float = DATA_DONE_TIMEOUT
    quit: float = QUIT_TIMEOUT


class StartTLS(enum.Enum):
    """
    Whether a session upgrades to TLS with STARTTLS.
    """

    #: Never send STARTTLS (the plaintext retry after a failed handshake).
    NEVER = "never"
    #: Use TLS when the server offers it; send in clear otherwise.
    OPPORTUNISTIC = "opportunistic"
    #: Never send a message in clear: no STARTTLS, or a failed one, defers.
    REQUIRE = "require"


class TLSFallback(enum.Enum):
    """
    What an opportunistic session does when the TLS handshake fails.
    """

    #: Every message of the connection is deferred.
    DEFER = "defer"
    #: The pool connects to the same host once more without STARTTLS (and
    #: remembers the host for a while, see L{smtpgw.relay.ConnectionPool}).
    PLAINTEXT = "plaintext"


@frozen
class TLSPolicy:
    """
    How a session uses TLS.

    @ivar starttls: see L{StartTLS}.
    @ivar fallback: see L{TLSFallback}; only for L{StartTLS.OPPORTUNISTIC}
        (with L{StartTLS.REQUIRE}, a failed handshake always defers).
    @ivar verify: check the server's certificate chain and name; without
        it any certificate is accepted (opportunistic encryption, RFC 7435).
    @ivar hostname: the name the certificate must carry; the host connected
        to when L{None}.
    @ivar trust_root: the authorities trusted when verifying (an
        C{IOpenSSLTrustRoot}, such as L{twisted.internet.ssl.trustRootFromCertificates}
        makes); the platform's when L{None}.
    """

    starttls: StartTLS = StartTLS.OPPORTUNISTIC
    fallback: TLSFallback = TLSFallback.DEFER
    verify: bool = False
    hostname: str | None = None
    trust_root: Any = field(default=None, repr=False)

    def without_tls(self) -> TLSPolicy:
        """
        @return: this policy with STARTTLS turned off.
        """
        return TLSPolicy(starttls=StartTLS.NEVER)

    def client_creator(self, host: str) -> Any:
        """
        @param host: the host connected to.
        @return: what C{ITLSTransport.startTLS} takes, for this policy; the
            same object for the same policy and host (it serves any number
            of connections, and building one costs an SSL context).
        """
        return _client_creator(self, host)

    def _build_creator(self, host: str) -> Any:
        if self.verify:
            return optionsForClientTLS(
                self.hostname or host,
                trustRoot=self.trust_root,
                extraCertificateOptions={"raiseMinimumTo": _MINIMUM_TLS_VERSION},
            )
        return CertificateOptions(verify=False, raiseMinimumTo=_MINIMUM_TLS_VERSION)


@functools.lru_cache(maxsize=256)
def _client_creator(policy: TLSPolicy, host: str) -> Any:
    return policy._build_creator(host)


@frozen
class Credentials:
    """
    The user name and password for AUTH PLAIN or LOGIN to a smarthost.
    """

    username: str
    password: str = field(repr=False)


@frozen
class SessionPolicy:
    """
    How to talk to one destination: TLS and authentication.

    @ivar allow_auth_in_clear: send the credentials on a connection without
        TLS; off, such a session fails (deferring its messages) rather than
        giving the password away.
    """

    tls: TLSPolicy = TLSPolicy()
    credentials: Credentials | None = None
    allow_auth_in_clear: bool = False


@frozen
class ClientSettings:
    """
    What every session of the gateway shares.

    @ivar helo_name: the name given in EHLO/HELO.
    @ivar timeouts: see L{ClientTimeouts}.
    @ivar pipelining: send MAIL, RCPT and DATA in one write when the server
        offers PIPELINING (RFC 2920).
    """

    helo_name: str = field(factory=socket.gethostname)

    @helo_name.validator
    def _check_helo_name(self, attribute: object, value: str) -> None:
        try:
            encoded = value.encode("idna")
        except UnicodeError:
            raise ValueError(f"{value!r} cannot be said in EHLO") from None
        if not encoded or any(c in encoded for c in b" \r\n\0"):
            raise ValueError(f"{value!r} cannot be said in EHLO")

    timeouts: ClientTimeouts = ClientTimeouts()
    pipelining: bool = True


@frozen
class Reply:
    """
    One complete (possibly multi-line) server reply.

    @ivar lines: the text of each line, after the code.
    """

    code: int
    lines: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """
        The lines of the text, joined by spaces.
        """
        return " ".join(line for line in self.lines if line)

    @property
    def positive(self) -> bool:
        """
        A C{2xx} reply.
        """
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


@frozen
class SendResult:
    """
    What became of one message sent through one host.

    @ivar result: the outcome for every recipient.
    @ivar host_failure: when set, the session with the host failed (could
        not connect, TLS, timeout, lost connection, C{421}, a refused
        greeting or AUTH) before every recipient had its reply; L{None}
        when each outcome is the host's own reply about that recipient.
    @ivar retryable: the recipients deferred because of C{host_failure}:
        another host for the same domain may be tried for them at once.
    """

    result: DeliveryResult
    host_failure: str | None = None
    retryable: tuple[str, ...] = ()


class SessionFailed(Exception):
    """
    The session with a server cannot go on (connection, protocol, timeout,
    refusal before any transaction).

    @ivar reason: a sentence for logs and delivery reports; never holds a
        credential.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TLSFailed(SessionFailed):
    """
    The TLS handshake after STARTTLS failed.
    """


class StaleConnection(SessionFailed):
    """
    A reused connection was gone before the server answered anything of a
    new transaction: the message was not seen by the server and can go on
    another connection without counting as an attempt.
    """


def peer_name(host: str, port: int) -> str:
    """
    @return: C{host:port}, with an IPv6 address in brackets.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def encode_data(body: bytes) -> bytes:
    """
    The message as sent after C{354}: every line end made CRLF (a bare CR or
    LF becomes CRLF), a last line end added when missing, every line that
    starts with C{.} given another C{.} (RFC 5321 section 4.5.2), then the
    final C{.CRLF}.

    The whole message is transformed at once, so the result does not depend
    on how it is later cut into writes.

    @param body: the message, normally with CRLF line ends already.
    @return: the bytes to write after C{354}.
    """
    if body.count(b"\n") != body.count(b"\r\n") or body.count(b"\r") != body.count(b"\r\n"):
        body = _LINE_END.sub(b"\r\n", body)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def _printable(text: str) -> str:
    return _PRINTABLE.sub("?", text)


@define
class _Waiter:
    deferred: Deferred[Any]
    what: str
    timer: IDelayedCall | None = None


@implementer(IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """
    The client end of one SMTP connection, below the conversation: it
    parses replies, writes commands and gives each command's reply to whoever
    awaits it, in order.

    Every awaited reply has a deadline; when it passes, or the connection is
    lost, or a reply is malformed or unsolicited, every awaited reply fails
    with L{SessionFailed} (L{TLSFailed} while a TLS handshake is under way)
    and the connection is aborted.

    The bytes a server sends after its C{220} to STARTTLS, in the same read,
    are plaintext that must not be read as replies inside TLS: they are
    discarded (and counted in L{discarded_after_starttls}).

    @ivar closed: fires once the connection is closed.
    @ivar tls_active: the TLS handshake has completed.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, greeting_timeout: float) -> None:
        """
        @param clock: for the deadlines.
        @param greeting_timeout: how long to wait for the greeting, from
            C{connectionMade}.
        """
        self._clock = clock
        self._greeting_timeout = greeting_timeout
        self._buffer = b""
        self._reply_lines: list[str] = []
        self._waiters: deque[_Waiter] = deque()
        self._greeting: Deferred[Reply] | None = None
        self._tls_creator: Any = None
        self._handshake: _Waiter | None = None
        self._handshake_reply = Reply(220)
        self._failure: SessionFailed | None = None
        self.tls_started = False
        self.tls_active = False
        self.discarded_after_starttls = 0
        self.closed: Deferred[None] = Deferred()

    # -- what the conversation calls

    @property
    def failed(self) -> bool:
        """
        The session cannot go on (lost, timed out, protocol error).
        """
        return self._failure is not None

    def greeting(self) -> Deferred[Reply]:
        """
        @return: the server's greeting, once (from C{connectionMade}).
        """
        if self._greeting is None:
            return fail(SessionFailed("not connected"))
        greeting, self._greeting = self._greeting, None
        return greeting

    def command(self, line: bytes, what: str, timeout: float) -> Deferred[Reply]:
        """
        Send one command line.

        @param line: the command, without CRLF.
        @param what: names the command in reasons (never the line itself,
            which may hold a credential).
        @param timeout: seconds to wait for its reply.
        @return: its reply.
        """
        return self.commands([(line, what, timeout)])[0]

    def commands(self, commands: Sequence[tuple[bytes, str, float]]) -> list[Deferred[Reply]]:
        """
        Send several command lines in one write (pipelining).

        @param commands: (line, what, timeout) for each, as for L{command}.
        @return: their replies, in order.
        """
        waiting = [self._expect(what, timeout) for _, what, timeout in commands]
        if self._failure is None:
            assert self.transport is not None
            self.transport.writeSequence([line + b"\r\n" for line, _, _ in commands])
        return waiting

    def data(self, payload: bytes, timeout: float) -> Deferred[Reply]:
        """
        Send the message after C{354}.

        @param payload: from L{encode_data}, ending with the final dot.
        @param timeout: seconds to wait for the reply to the final dot.
        @return: that reply.
        """
        waiting = self._expect("end of data", timeout)
        if self._failure is None:
            assert self.transport is not None
            self.transport.write(payload)
        return waiting

    def starttls(self, creator: Any, timeout: float, handshake_timeout: float) -> Deferred[Reply]:
        """
        Send STARTTLS; on C{220}, discard whatever else the server sent and
        start TLS.

        @param creator: the TLS client options.
        @param timeout: seconds to wait for the reply.
        @param handshake_timeout: seconds the handshake may take.
        @return: the reply; a C{220} only once the handshake has completed
            (L{TLSFailed} when it fails).
        """
        if self._waiters:
            return fail(SessionFailed("STARTTLS must not be pipelined"))
        reply = self.command(b"STARTTLS", "STARTTLS", timeout)
        self._tls_creator = (creator, handshake_timeout)
        return reply

    def close(self) -> None:
        """
        Close the connection after what was written is sent.
        """
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self, reason: str) -> None:
        """
        Fail every awaited reply with C{reason} and drop the connection.
        """
        self._fail(SessionFailed(reason))
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- Protocol

    def connectionMade(self) -> None:
        self._greeting = self._expect("greeting", self._greeting_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._failure is not None:
            return
        self._buffer += data
        while self._failure is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    self._protocol_error(f"a reply line is longer than {MAX_REPLY_LINE} bytes")
                return
            line = self._buffer[:end]
            self._buffer = self._buffer[end + 1 :]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > MAX_REPLY_LINE:
                self._protocol_error(f"a reply line is longer than {MAX_REPLY_LINE} bytes")
                return
            reply = self._reply_line(line)
            if reply is None:
                continue
            if self._tls_creator is not None:
                self._starttls_replied(reply)
                return
            self._dispatch(reply)

    def handshakeCompleted(self) -> None:
        self.tls_active = True
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            self._settle(handshake).callback(self._handshake_reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        description = reason.getErrorMessage()
        if self.tls_started and not self.tls_active:
            self._fail(TLSFailed(f"TLS handshake failed: {_printable(description)}"))
        elif reason.check(ConnectionDone):
            self._fail(SessionFailed("the server closed the connection"))
        else:
            self._fail(SessionFailed(f"connection lost: {_printable(description)}"))
        self.closed.callback(None)

    # -- internals

    def _expect(self, what: str, timeout: float) -> Deferred[Reply]:
        if self._failure is not None:
            return fail(self._failure)
        waiter = _Waiter(Deferred(), what)
        waiter.timer = self._clock.callLater(timeout, self._timed_out, waiter, timeout)
        self._waiters.append(waiter)
        return waiter.deferred

    def _timed_out(self, waiter: _Waiter, timeout: float) -> None:
        waiter.timer = None
        self.abort(f"timed out after {timeout:g} s waiting for the reply to {waiter.what}")

    def _settle(self, waiter: _Waiter) -> Deferred[Any]:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
        return waiter.deferred

    def _fail(self, error: SessionFailed) -> None:
        if self._failure is not None:
            return
        self._failure = error
        self._buffer = b""
        waiters = list(self._waiters)
        self._waiters.clear()
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            waiters.insert(0, handshake)
        for waiter in waiters:
            self._settle(waiter).errback(error)

    def _protocol_error(self, problem: str) -> None:
        self.abort(f"protocol error: {problem}")

    def _reply_line(self, line: bytes) -> Reply | None:
        separator = line[3:4]
        if not (line[:3].isdigit() and separator in (b"", b" ", b"-")):
            self._protocol_error(f"malformed reply line {line[:40]!r}")
            return None
        code = int(line[:3])
        if not 200 <= code < 600:
            self._protocol_error(f"unexpected reply code {code}")
            return None
        self._reply_lines.append(_printable(line[4:].decode("utf-8", "replace")))
        if len(self._reply_lines) > MAX_REPLY_LINES:
            self._protocol_error(f"a reply of more than {MAX_REPLY_LINES} lines")
            return None
        if separator == b"-":
            return None
        reply = Reply(code, tuple(self._reply_lines))
        self._reply_lines = []
        return reply

    def _dispatch(self, reply: Reply) -> None:
        if not self._waiters:
            if reply.code == 421:
                self._fail(SessionFailed(f"the server closed the session: {reply}"))
                self.close()
            else:
                self._protocol_error(f"unsolicited reply {reply}")
            return
        self._settle(self._waiters.popleft()).callback(reply)

    def _starttls_replied(self, reply: Reply) -> None:
        (creator, handshake_timeout), self._tls_creator = self._tls_creator, None
        if reply.code != 220 or not self._waiters:
            self._dispatch(reply)
            return
        # RFC 3207 section 4.2: nothing read before the handshake counts.
        self.discarded_after_starttls = len(self._buffer)
        self._buffer = b""
        if self.discarded_after_starttls:
            self._log.warn(
                "discarded {count} bytes sent after the 220 reply to STARTTLS",
                count=self.discarded_after_starttls,
            )
        # The STARTTLS reply is given once the handshake is done: whoever
        # awaits it learns of a failed handshake instead.
        waiter = self._waiters.popleft()
        self._settle(waiter)
        waiter.what = "TLS handshake"
        waiter.timer = self._clock.callLater(
            handshake_timeout, self._handshake_timed_out, handshake_timeout
        )
        self._handshake = waiter
        self._handshake_reply = reply
        self.tls_started = True
        try:
            self.transport.startTLS(creator)  # type: ignore[union-attr]
        except Exception as error:
            self._fail(TLSFailed(f"TLS could not start: {_printable(str(error))}"))
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _handshake_timed_out(self, timeout: float) -> None:
        if self._handshake is not None:
            self._handshake.timer = None
        self._fail(TLSFailed(f"TLS handshake timed out after {timeout:g} s"))
        self.transport.abortConnection()  # type: ignore[union-attr]


class SMTPClientFactory(Factory):
    """
    Builds L{SMTPClientProtocol}s.
    """

    noisy = False

    def __init__(self, clock: IReactorTime, greeting_timeout: float) -> None:
        self._clock = clock
        self._greeting_timeout = greeting_timeout

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        return SMTPClientProtocol(self._clock, self._greeting_timeout)


class _Box:
    """
    A failed reply kept as a value, so that pipelined replies nobody awaits
    any more never become unhandled errors.
    """

    def __init__(self, failure: Failure) -> None:
        self.failure = failure


async def _reply(waiting: Deferred[Any]) -> Reply:
    result = await waiting
    if isinstance(result, _Box):
        result.failure.raiseException()
    assert isinstance(result, Reply)
    return result


class _Outcomes:
    """
    The outcome of each recipient of one transaction, as it is learnt.
    """

    def __init__(self, recipients: Sequence[str]) -> None:
        self.recipients = tuple(recipients)
        self._outcomes: list[tuple[str, str] | None] = [None] * len(recipients)

    def settle(self, index: int, kind: str, reason: str = "") -> None:
        if self._outcomes[index] is None:
            self._outcomes[index] = (kind, reason)

    def settle_reply(self, index: int, reply: Reply, reason: str) -> None:
        if reply.positive:
            self.settle(index, "delivered")
        elif 500 <= reply.code < 600:
            self.settle(index, "bounced", reason)
        else:
            self.settle(index, "deferred", reason)

    def unsettled(self) -> list[int]:
        return [i for i, outcome in enumerate(self._outcomes) if outcome is None]

    def result(self) -> DeliveryResult:
        delivered: list[str] = []
        deferred: list[tuple[str, str]] = []
        bounced: list[tuple[str, str]] = []
        for recipient, outcome in zip(self.recipients, self._outcomes, strict=True):
            kind, reason = outcome or ("deferred", "no reply")
            if kind == "delivered":
                delivered.append(recipient)
            elif kind == "bounced":
                bounced.append((recipient, reason))
            else:
                deferred.append((recipient, reason))
        return DeliveryResult(tuple(delivered), tuple(deferred), tuple(bounced))


class SMTPConnection:
    """
    An SMTP session with one server, for any number of messages in turn.

    Call L{open} once, then L{send} for each message (never two at once),
    then L{quit}.

    @ivar name: C{host:port}, as reasons name the server.
    @ivar extensions: the EHLO keywords (upper case) and their parameters.
    @ivar messages_sent: transactions attempted on this connection.
    """

    def __init__(
        self,
        protocol: SMTPClientProtocol,
        host: str,
        port: int,
        policy: SessionPolicy,
        settings: ClientSettings,
    ) -> None:
        """
        @param protocol: connected, its greeting not yet read.
        @param host: the host connected to (names the certificate to check).
        @param port: the port connected to.
        @param policy: TLS and AUTH for this destination.
        @param settings: HELO name, timeouts, pipelining.
        """
        self._protocol = protocol
        self._host = host
        self._policy = policy
        self._settings = settings
        self._timeouts = settings.timeouts
        self._broken = False
        self._quitting = False
        self.name = peer_name(host, port)
        self.extensions: Mapping[str, str] = {}
        self.messages_sent = 0

    @property
    def closed(self) -> Deferred[None]:
        """
        Fires once the connection is closed.
        """
        return self._protocol.closed

    @property
    def tls_active(self) -> bool:
        """
        The session runs over TLS.
        """
        return self._protocol.tls_active

    @property
    def discarded_after_starttls(self) -> int:
        """
        Bytes the server sent after its C{220} to STARTTLS, thrown away.
        """
        return self._protocol.discarded_after_starttls

    @property
    def usable(self) -> bool:
        """
        Another message may be sent on this connection.
        """
        return not (self._broken or self._protocol.failed)

    def abort(self, reason: str) -> None:
        """
        Drop the connection; whatever is awaited fails with C{reason}.
        """
        self._protocol.abort(reason)

    # -- opening

    async def open(self) -> None:
        """
        Read the greeting, say EHLO, start TLS and authenticate as the
        policy asks.

        @raise SessionFailed: the session cannot carry mail (L{TLSFailed}
            when the TLS handshake failed); the connection is then closed.
        """
        try:
            await self._open()
        except SessionFailed:
            await self.quit()
            raise

    async def _open(self) -> None:
        greeting = await _reply(self._protocol.greeting())
        if greeting.code != 220:
            raise SessionFailed(self._said(greeting, "the greeting"))
        await self._hello()
        tls = self._policy.tls
        if tls.starttls is not StartTLS.NEVER:
            if "STARTTLS" in self.extensions:
                reply = await _reply(
                    self._protocol.starttls(
                        tls.client_creator(self._host),
                        self._timeouts.command,
                        self._timeouts.tls_handshake,
                    )
                )
                if reply.code == 220:
                    await self._hello()
                elif tls.starttls is StartTLS.REQUIRE:
                    raise SessionFailed(f"TLS is required, and {self._said(reply, 'STARTTLS')}")
            elif tls.starttls is StartTLS.REQUIRE:
                raise SessionFailed(f"TLS is required, and {self.name} does not offer STARTTLS")
        if self._policy.credentials is not None:
            await self._authenticate(self._policy.credentials)

    async def _hello(self) -> None:
        helo = self._settings.helo_name.encode("idna")
        what = "EHLO"
        reply = await self._command(b"EHLO " + helo, what)
        if 500 <= reply.code < 600:
            # An old server: plain SMTP has no extensions, so no STARTTLS or
            # AUTH, which the policy then refuses if it needs them.
            what = "HELO"
            reply = await self._command(b"HELO " + helo, what)
        if not reply.positive:
            raise SessionFailed(self._said(reply, what))
        self.extensions = _parse_extensions(reply) if what == "EHLO" else {}

    async def _authenticate(self, credentials: Credentials) -> None:
        if not (self.tls_active or self._policy.allow_auth_in_clear):
            raise SessionFailed(
                f"refusing to send the credentials to {self.name} over a connection without TLS"
            )
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user = credentials.username.encode("utf-8")
        password = credentials.password.encode("utf-8")
        if "PLAIN" in mechanisms:
            response = base64.b64encode(b"\0" + user + b"\0" + password)
            reply = await self._command(b"AUTH PLAIN " + response, "AUTH")
            if reply.code == 334:
                reply = await self._command(response, "AUTH")
        elif "LOGIN" in mechanisms:
            reply = await self._command(b"AUTH LOGIN", "AUTH")
            for answer in (user, password):
                if reply.code != 334:
                    break
                reply = await self._command(base64.b64encode(answer), "AUTH")
        else:
            raise SessionFailed(f"{self.name} offers no AUTH PLAIN or LOGIN")
        if reply.code != 235:
            raise SessionFailed(f"authentication failed: {self._said(reply, 'AUTH')}")

    # -- transactions

    async def send(self, envelope: Envelope, body: bytes) -> SendResult:
        """
        Send one message to the recipients of C{envelope}.

        @param envelope: its sender and recipients (all of them are sent to).
        @param body: the message, as accepted.
        @return: the outcome per recipient; never fails otherwise.
        @raise StaleConnection: this reused connection was gone before the
            server saw the message; nothing was settled.
        """
        outcomes = _Outcomes(envelope.recipients)
        sent_any = False

        def mark_sent(reply: Reply) -> Reply:
            nonlocal sent_any
            sent_any = True
            return reply

        try:
            await self._transaction(envelope, body, outcomes, mark_sent)
        except SessionFailed as failure:
            if not sent_any and self.messages_sent > 0:
                raise StaleConnection(failure.reason) from failure
            self._broken = True
            retryable = outcomes.unsettled()
            for index in retryable:
                outcomes.settle(index, "deferred", failure.reason)
            self.messages_sent += 1
            return SendResult(
                outcomes.result(),
                host_failure=failure.reason,
                retryable=tuple(envelope.recipients[i] for i in retryable),
            )
        self.messages_sent += 1
        return SendResult(outcomes.result())

    async def _transaction(
        self, envelope: Envelope, body: bytes, outcomes: _Outcomes, mark_sent: Any
    ) -> None:
        mail, rcpts = self._envelope_lines(envelope, body, outcomes)
        if mail is None:
            return
        if not rcpts:
            return
        payload = encode_data(body)
        pipelined = self._settings.pipelining and "PIPELINING" in self.extensions
        command, data_init = self._timeouts.command, self._timeouts.data_init
        pending: list[Deferred[Any]] = []
        if pipelined:
            lines = [(mail, "MAIL FROM", command)]
            lines += [(line, "RCPT TO", command) for _, line in rcpts]
            lines.append((b"DATA", "DATA", data_init))
            pending = [d.addErrback(_Box) for d in self._protocol.commands(lines)]
            mail_reply = await _reply(pending[0])
        else:
            mail_reply = await self._command(mail, "MAIL FROM")
        mark_sent(mail_reply)
        self._check_closing(mail_reply)
        if not mail_reply.positive:
            for index in range(len(outcomes.recipients)):
                outcomes.settle_reply(index, mail_reply, self._said(mail_reply, "MAIL FROM"))
            await self._abandon(pending[-1] if pipelined else None)
            return
        accepted: list[int] = []
        for position, (index, line) in enumerate(rcpts):
            if pipelined:
                reply = await _reply(pending[1 + position])
            else:
                reply = await self._command(line, "RCPT TO")
            self._check_closing(reply)
            reason = self._said(reply, "RCPT TO")
            if reply.positive:
                accepted.append(index)
            elif reply.code < 400:
                outcomes.settle(index, "deferred", f"unexpected reply: {reason}")
            else:
                outcomes.settle_reply(index, reply, reason)
        if not accepted:
            await self._abandon(pending[-1] if pipelined else None)
            return
        if pipelined:
            data_reply = await _reply(pending[-1])
        else:
            data_reply = await self._command(b"DATA", "DATA", data_init)
        self._check_closing(data_reply)
        if data_reply.code != 354:
            reason = self._said(data_reply, "DATA")
            for index in accepted:
                if data_reply.positive:
                    outcomes.settle(index, "deferred", f"unexpected reply: {reason}")
                else:
                    outcomes.settle_reply(index, data_reply, reason)
            await self._rset()
            return
        final = await _reply(self._protocol.data(payload, self._timeouts.data_done))
        self._check_closing(final)
        reason = self._said(final, "end of data")
        for index in accepted:
            if final.code < 400 and not final.positive:
                outcomes.settle(index, "deferred", f"unexpected reply: {reason}")
            else:
                outcomes.settle_reply(index, final, reason)

    def _envelope_lines(
        self, envelope: Envelope, body: bytes, outcomes: _Outcomes
    ) -> tuple[bytes | None, list[tuple[int, bytes]]]:
        """
        The MAIL line and the RCPT lines of the recipients that can be sent
        to; those that cannot (and all, when the sender cannot) are settled.
        """
        everyone = range(len(envelope.recipients))
        if _UNSAFE_IN_ADDRESS.search(envelope.sender):
            for index in everyone:
                outcomes.settle(index, "bounced", "invalid sender address")
            return None, []
        utf8 = "SMTPUTF8" in self.extensions
        if not envelope.sender.isascii() and not utf8:
            for index in everyone:
                outcomes.settle(
                    index, "bounced", f"SMTPUTF8 is required, and {self.name} does not offer it"
                )
            return None, []
        limit = _size_limit(self.extensions)
        if limit is not None and len(body) > limit:
            for index in everyone:
                outcomes.settle(
                    index,
                    "bounced",
                    f"the message ({len(body)} bytes) is larger than {self.name} accepts"
                    f" ({limit} bytes)",
                )
            return None, []
        rcpts: list[tuple[int, bytes]] = []
        for index, recipient in enumerate(envelope.recipients):
            if not recipient or _UNSAFE_IN_ADDRESS.search(recipient):
                outcomes.settle(index, "bounced", "invalid recipient address")
            elif not recipient.isascii() and not utf8:
                outcomes.settle(
                    index, "bounced", f"SMTPUTF8 is required, and {self.name} does not offer it"
                )
            else:
                rcpts.append((index, b"RCPT TO:<" + recipient.encode("utf-8") + b">"))
        mail = b"MAIL FROM:<" + envelope.sender.encode("utf-8") + b">"
        if "SIZE" in self.extensions:
            mail += b" SIZE=%d" % len(body)
        if "8BITMIME" in self.extensions and not body.isascii():
            mail += b" BODY=8BITMIME"
        needs_utf8 = not envelope.sender.isascii() or any(
            not r.isascii() for r in envelope.recipients
        )
        if utf8 and needs_utf8:
            mail += b" SMTPUTF8"
        return mail, rcpts

    async def _abandon(self, data: Deferred[Any] | None) -> None:
        """
        End a transaction that will send no message: answer a pipelined
        DATA that was accepted anyway with an empty message, then RSET.
        """
        if data is not None:
            data_reply = await _reply(data)
            if data_reply.code == 354:
                await _reply(self._protocol.data(b".\r\n", self._timeouts.data_done))
        await self._rset()

    async def _rset(self) -> None:
        if not self.usable:
            return
        try:
            reply = await self._command(b"RSET", "RSET")
        except SessionFailed:
            reply = None
        if reply is None or not reply.positive:
            self._broken = True

    async def quit(self) -> None:
        """
        Say QUIT (when the session still works) and close; never fails.
        """
        if self._quitting:
            return
        self._quitting = self._broken = True
        if not self._protocol.failed:
            with contextlib.suppress(SessionFailed):
                await self._command(b"QUIT", "QUIT", self._timeouts.quit)
        self._protocol.close()

    # -- helpers

    async def _command(self, line: bytes, what: str, timeout: float | None = None) -> Reply:
        return await _reply(
            self._protocol.command(
                line, what, self._timeouts.command if timeout is None else timeout
            )
        )

    def _check_closing(self, reply: Reply) -> None:
        """
        After a C{421} the server closes the connection (RFC 5321 section
        3.8): a host failure for every recipient not settled yet, the one
        the reply was about included.
        """
        if reply.code == 421:
            self._broken = True
            raise SessionFailed(self._said(reply, "the transaction"))

    def _said(self, reply: Reply, what: str) -> str:
        text = str(reply)
        if len(text) > MAX_REASON_TEXT:
            text = text[:MAX_REASON_TEXT] + "..."
        return f"{self.name} said: {text} (in reply to {what})"


def _parse_extensions(reply: Reply) -> dict[str, str]:
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, parameters = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = parameters.strip()
    return extensions


def _size_limit(extensions: Mapping[str, str]) -> int | None:
    value = extensions.get("SIZE", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return None
