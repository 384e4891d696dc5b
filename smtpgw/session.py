"""
The ESMTP submission session: framing, commands, AUTH, STARTTLS, limits.

L{GatewaySMTP} subclasses Twisted's L{smtp.ESMTP} for its place in
C{twisted.mail} (portal, challengers, TLS context, L{IMessageDelivery}
avatars) but replaces its input handling, because the stock server:

  - answers plaintext pipelined after C{STARTTLS} inside TLS, and keeps the
    login across it (RFC 3207 section 4.2);
  - goes back to command mode after an over-long DATA line, so the rest of
    the body runs as commands;
  - passes bare CR and LF into messages;
  - answers a pipelined command before a pending asynchronous one;
  - has no per-command or per-DATA deadline (each byte resets its timeout),
    no command length limit below 16 KiB and no abuse limits;
  - writes replies without backpressure, so a client that never reads
    them makes the server buffer without bound.

Input is one buffer, cut into lines with C{bytes.find}: in command mode on
LF (a trailing CR is dropped; any other CR or a NUL refuses the command), in
DATA on CRLF, so a bare CR or LF stays inside a line where the assembler
refuses it. While a reply depends on a L{Deferred} (AUTH, the queue, the
user record), or while the transport's write buffer is full, no further
line is read: pipelined commands wait their turn.

Every limit is a field of L{Limits}: connections in all and per address
(IPv6 per /64), protocol errors and policy refusals, commands that move no
mail, AUTH failures (counting the checks still running), messages and
seconds per session. A login holds only as long as the user record says
so: MAIL reads it again once it is older than C{user_recheck_interval}, and
a regenerated password, a deactivated or deleted user gets
C{530 5.7.0 Authentication required} and the login is forgotten (the
client may log in again).

The modes (greeting, command, AUTH response, DATA, closed) are a small enum
dispatched inline rather than a state-machine library: this is the per-line
hot path of the gateway.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ITLSTransport,
)
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail._cred import PLAINCredentials
from twisted.mail._except import IllegalClientResponse
from twisted.mail.interfaces import IMessageDelivery
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpgw.abuse import (
    Admission,
    AuthFailureTracker,
    AuthLimiter,
    ConnectionCounter,
    ConnectionLimiter,
    RepeatedAlertFilter,
    address_key,
)
from smtpgw.checker import PasswordCheckUnavailable
from smtpgw.interfaces import Alert, IAlertSink, IMessageQueue, IUserStore, JournalUnavailable
from smtpgw.limits import Limits
from smtpgw.message import MessageAssembler, MessageRejected
from smtpgw.metrics import RejectReason, SessionMetrics
from smtpgw.model import Priority, QueueIdGenerator, SmtpUser
from smtpgw.priority import parse_mt_priority_param
from smtpgw.realm import GatewayMessage, GatewayServices, SessionMind, Transaction

__all__ = [
    "CommandRefused",
    "GatewaySMTP",
    "GatewaySMTPFactory",
    "MailParameters",
    "parse_mail_parameters",
    "parse_path",
]

log = Logger()


def _reply(text: str) -> bytes:
    return text.encode("ascii") + b"\r\n"


R_OK = _reply("250 2.0.0 Ok")
R_SENDER_OK = _reply("250 2.1.0 Sender ok")
R_RCPT_OK = _reply("250 2.1.5 Recipient ok")
R_DATA = _reply("354 End data with <CR><LF>.<CR><LF>")
R_BYE = _reply("221 2.0.0 Bye")
R_VRFY = _reply("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")
R_HELP = (
    b"214-2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA\r\n"
    b"214 2.0.0 RSET NOOP VRFY HELP QUIT\r\n"
)
R_AUTH_OK = _reply("235 2.7.0 Authentication successful")
R_AUTH_FAILED = _reply("535 5.7.8 Authentication credentials invalid")
R_AUTH_REQUIRED = _reply("530 5.7.0 Authentication required")
R_TLS_REQUIRED = _reply("530 5.7.0 Must issue a STARTTLS command first")
R_AUTH_TEMPFAIL = _reply("454 4.7.0 Temporary authentication failure")
R_AUTH_CANCELLED = _reply("501 5.0.0 Authentication cancelled")
R_AUTH_MALFORMED = _reply("501 5.5.2 Cannot decode AUTH response")
R_AUTH_MECHANISM = _reply("504 5.5.4 Unrecognized authentication mechanism")
R_AUTH_SYNTAX = _reply("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
R_ALREADY_AUTH = _reply("503 5.5.1 Already authenticated")
R_AUTH_IN_TRANSACTION = _reply("503 5.5.1 AUTH not permitted during a mail transaction")
R_EHLO_FIRST = _reply("503 5.5.1 Send EHLO first")
R_NESTED_MAIL = _reply("503 5.5.1 Sender already given")
R_NEED_MAIL = _reply("503 5.5.1 Need MAIL command")
R_NEED_RCPT = _reply("503 5.5.1 Need RCPT command")
R_UNKNOWN = _reply("500 5.5.2 Command not recognized")
R_LINE_TOO_LONG = _reply("500 5.5.2 Line too long")
R_BAD_CHARACTER = _reply("500 5.5.2 Invalid character in command")
R_NOT_IMPLEMENTED = _reply("502 5.5.1 Command not implemented")
R_MAIL_SYNTAX = _reply("501 5.5.4 Syntax: MAIL FROM:<address>")
R_RCPT_SYNTAX = _reply("501 5.5.4 Syntax: RCPT TO:<address>")
R_BAD_SENDER = _reply("501 5.1.7 Bad sender address syntax")
R_BAD_RECIPIENT = _reply("501 5.1.3 Bad recipient address syntax")
R_PATH_TOO_LONG = _reply("501 5.1.3 Path too long")
R_TOO_MANY_RECIPIENTS = _reply("452 4.5.3 Too many recipients")
R_SIZE_EXCEEDED = _reply("552 5.3.4 Message size exceeds fixed maximum message size")
R_PARAMETER_SYNTAX = _reply("501 5.5.4 Invalid parameter value")
R_PARAMETER_DUPLICATE = _reply("501 5.5.4 Duplicate parameter")
R_PARAMETER_UNKNOWN = _reply("555 5.5.4 Unsupported parameter")
R_HELO_SYNTAX = _reply("501 5.5.4 Syntax: EHLO hostname")
R_NO_PARAMETERS = _reply("501 5.5.4 No parameters allowed")
R_VRFY_SYNTAX = _reply("501 5.5.4 Syntax: VRFY address")
R_TLS_UNAVAILABLE = _reply("454 4.7.0 TLS not available")
R_TLS_ACTIVE = _reply("503 5.5.1 TLS already active")
R_TLS_GO = _reply("220 2.0.0 Ready to start TLS")
R_PIPELINED_STARTTLS = _reply("554 5.5.1 Error: command pipelined after STARTTLS")
R_PREGREET = _reply("554 5.5.1 Error: talking before the greeting")
R_STORAGE = _reply("452 4.3.1 Insufficient system storage, try again later")
R_LOCAL_ERROR = _reply("451 4.3.0 Local error in processing")

#: Verbs that show an HTTP client (a proxy probe, a browser) talking to us.
_HTTP_VERBS = frozenset(
    {b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"DELETE", b"PATCH", b"TRACE"}
)
_HTTP_HEADER = b"HOST:"

#: Unprocessed input kept while a reply is pending, beyond which the
#: transport is paused rather than the buffer grown.
_PAUSED_BUFFER_LIMIT = 64 * 1024

#: A decoded SASL response longer than this is refused as malformed: no
#: generated credential comes near it, and bcrypt only reads 72 bytes.
_MAX_SASL_RESPONSE = 2048

_CHALLENGERS: dict[bytes, Callable[[], Any]] = {
    b"PLAIN": PLAINCredentials,
    b"LOGIN": smtp.LOGINCredentials,
}


# -- metrics hooks ----------------------------------------------------------


class _NoMetrics:
    """
    The L{SessionMetrics} of a gateway without metrics: every event is a
    no-op call, so the session never tests for L{None}.
    """

    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def accepted(self) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass


_NO_METRICS: SessionMetrics = _NoMetrics()


def _reason_of(rejection: MessageRejected) -> RejectReason:
    """
    The metrics reason of a refused message, from its enhanced status.
    """
    status = rejection.status
    if status == "5.3.4":
        return RejectReason.TOO_LARGE
    if status.startswith("5.6."):
        return RejectReason.BAD_LINE
    if status.startswith("5.7."):
        return RejectReason.HEADER_FROM_UNAUTHORIZED
    return RejectReason.OTHER


# -- end of metrics hooks ---------------------------------------------------


class CommandRefused(Exception):
    """
    A command cannot be carried out as given.

    @ivar reply: the complete reply line.
    @ivar protocol_error: whether it counts towards C{max_bad_commands}
        (a syntax error does, a message too big does not).
    """

    def __init__(self, reply: bytes, *, protocol_error: bool = True) -> None:
        super().__init__(reply)
        self.reply = reply
        self.protocol_error = protocol_error


@frozen
class MailParameters:
    """
    The MAIL parameters the gateway understands.

    @ivar size: the C{SIZE=} the client declared (RFC 1870).
    @ivar mt_priority: the C{MT-PRIORITY=} it asked for (RFC 6710).
    """

    size: int | None = None
    mt_priority: Priority | None = None


def parse_path(
    text: bytes, max_length: int, bad: bytes, *, null_allowed: bool
) -> tuple[smtp.Address, bytes]:
    """
    Read the C{<path> [parameters]} after C{MAIL FROM:} or C{RCPT TO:}.

    @param max_length: the longest path, angle brackets included.
    @param bad: the reply for a path that is not an address.
    @param null_allowed: whether C{<>} is acceptable.
    @return: the address and the text after the path.
    @raise CommandRefused: with C{bad}, or C{501 5.1.3} for a long path.
    """
    text = text.lstrip()
    if text[:1] == b"<":
        close = text.find(b">")
        if close < 0:
            raise CommandRefused(bad)
        path, rest = text[: close + 1], text[close + 1 :]
        wire_length = len(path)
    else:
        # Tolerate a path without angle brackets, as many MTAs do.
        path, space, rest = text.partition(b" ")
        rest = space + rest
        wire_length = len(path) + 2
    if wire_length > max_length:
        raise CommandRefused(R_PATH_TOO_LONG)
    if rest[:1] not in (b"", b" "):
        raise CommandRefused(bad)
    if path == b"<>":
        if not null_allowed:
            raise CommandRefused(bad)
        return smtp.Address(path), rest
    if b"@" not in path:
        raise CommandRefused(bad)
    try:
        # An empty default domain: Twisted would complete "<a@>" with this
        # host's name.
        address = smtp.Address(path, b"")
    except smtp.AddressError:
        raise CommandRefused(bad) from None
    if not (address.local and address.domain):
        raise CommandRefused(bad)
    return address, rest


def parse_mail_parameters(text: bytes, max_size: int) -> MailParameters:
    """
    Read the MAIL parameters: C{SIZE}, C{BODY=7BIT|8BITMIME},
    C{MT-PRIORITY} and C{AUTH} (RFC 4954 section 5; accepted and ignored,
    the gateway never relays on behalf of another identity).

    @param max_size: the largest message accepted.
    @raise CommandRefused: C{501 5.5.4} for a bad or repeated value,
        C{555 5.5.4} for an unknown parameter, C{552 5.3.4} for a declared
        size over C{max_size}.
    """
    size: int | None = None
    mt_priority: Priority | None = None
    seen: set[bytes] = set()
    for parameter in text.split():
        keyword, _, value = parameter.partition(b"=")
        keyword = keyword.upper()
        if keyword in seen:
            raise CommandRefused(R_PARAMETER_DUPLICATE)
        seen.add(keyword)
        if keyword == b"SIZE":
            if not value.isdigit() or len(value) > 20:
                raise CommandRefused(R_PARAMETER_SYNTAX)
            size = int(value)
            if size > max_size:
                raise CommandRefused(R_SIZE_EXCEEDED, protocol_error=False)
        elif keyword == b"BODY":
            if value.upper() not in (b"7BIT", b"8BITMIME"):
                raise CommandRefused(R_PARAMETER_SYNTAX)
        elif keyword == b"MT-PRIORITY":
            try:
                mt_priority = parse_mt_priority_param(value.decode("ascii"))
            except ValueError:
                raise CommandRefused(R_PARAMETER_SYNTAX) from None
        elif keyword != b"AUTH":
            raise CommandRefused(R_PARAMETER_UNKNOWN)
    return MailParameters(size=size, mt_priority=mt_priority)


class _Mode(enum.Enum):
    GREETING = "greeting"
    COMMAND = "command"
    AUTH = "auth"
    DATA = "data"
    CLOSED = "closed"


_GREETING = _Mode.GREETING
_COMMAND = _Mode.COMMAND
_AUTH = _Mode.AUTH
_DATA = _Mode.DATA
_CLOSED = _Mode.CLOSED


@implementer(IPushProducer)
class GatewaySMTP(smtp.ESMTP):
    """
    One client connection.

    The session is the streaming producer of its transport's output: when
    the transport's write buffer is full (the client does not read its
    replies) it stops answering and stops reading, until the buffer has
    drained, so no client can make the gateway buffer without bound.

    @ivar factory: the L{GatewaySMTPFactory} that built this session.
    @ivar transaction: the current mail transaction, between a successful
        MAIL and the end of DATA (or RSET); L{None} outside one.
    @ivar delivery: the avatar after a successful AUTH, else L{None}.
    """

    factory: GatewaySMTPFactory
    host: bytes
    delivery: Any
    transaction: Transaction | None

    def __init__(self) -> None:
        super().__init__()
        self.transaction = None
        self._t: Any = None
        self._clock: IReactorTime
        self._limits: Limits
        self._mode = _GREETING
        # Counted in the factory's in_data (see _leave_data).
        self._about_to_submit = False
        self._buffer = b""
        self._paused = False
        self._processing = False
        self._transport_paused = False
        self._congested = False
        self._producing = False
        self._junk_commands = 0
        self._discarding_line = False
        self._client_ip = ""
        self._client_key = ""
        self._counted = False
        self._tls_active = False
        self._bad_commands = 0
        self._transactions = 0
        self._session_ends_at = 0.0
        self._helo_name: str | None = None
        self._sender: smtp.Address | None = None
        self._message_factory: Callable[[], GatewayMessage] | None = None
        self._message: GatewayMessage | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._rejection: MessageRejected | None = None
        self._challenger: Any = None
        self._last_activity = 0.0
        self._line_started_at: float | None = None
        self._data_started_at: float | None = None
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0
        self._delayed: IDelayedCall | None = None
        self._auth_turn: Deferred[bool] | None = None
        self._metrics: SessionMetrics = _NO_METRICS
        self._metered = False

    # -- connection lifecycle -------------------------------------------

    def connectionMade(self) -> None:
        """
        Count the connection against its address, then greet (at once, or
        after the greet delay).
        """
        factory = self.factory
        self._metrics = metrics = factory.metrics
        metrics.connection_opened()
        self._metered = True
        self._t = self.transport
        self._clock = factory.clock
        self._limits = limits = factory.limits
        peer = self._t.getPeer()
        self._client_ip = str(getattr(peer, "host", peer))
        self._helo = (None, self._client_ip.encode("ascii", "replace"))
        self._client_key = address_key(self._client_ip)
        now = self._clock.seconds()
        self._last_activity = now
        self._session_ends_at = now + limits.max_session_seconds
        # Running from the start, so that an admission that never comes
        # (acceptor processes ask the main process) still ends the session.
        self._schedule(min(now + limits.idle_timeout, self._session_ends_at))
        admission = factory.connection_limiter.admit(self._client_key)
        if isinstance(admission, Deferred):
            admission.addCallback(self._admitted)
            admission.addErrback(self._internal_error)
        else:
            self._admitted(admission)

    def _admitted(self, admission: Admission) -> None:
        """
        The connection was counted against its address (or refused): greet
        (at once, or after the greet delay), or answer C{421} and close.
        """
        if self._mode is _CLOSED:
            # The client left while its admission was being decided.
            if admission is Admission.ADMITTED:
                self.factory.connection_limiter.release(self._client_key)
            return
        if admission is not Admission.ADMITTED:
            self._mode = _CLOSED
            if admission is Admission.FULL:
                log.info(
                    "connection limit reached, refusing {client_ip}", client_ip=self._client_ip
                )
                self._t.write(self._421(b"4.7.0", b"Too many connections, try again later"))
            else:
                log.info("too many connections from {client_ip}", client_ip=self._client_ip)
                self._t.write(self._421(b"4.7.0", b"Too many connections from your address"))
            self._t.loseConnection()
            return
        self._counted = True
        self._t.registerProducer(self, True)
        self._producing = True
        self._tls_active = ISSLTransport.providedBy(self._t)
        self.canStartTLS = ITLSTransport.providedBy(self._t) and self.ctx is not None
        limits = self._limits
        if limits.greet_delay > 0:
            self._delayed = self._clock.callLater(limits.greet_delay, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        self._delayed = None
        if self._mode is not _GREETING or self._t.disconnecting:
            return
        self._mode = _COMMAND
        self._t.write(b"220 " + self.host + b" ESMTP smtpgw\r\n")

    def connectionLost(self, reason: Failure | None = None) -> None:
        """
        Abandon any message in progress (nothing of it is queued), log out,
        release the address's connection count and every timer.
        """
        self._leave_data()
        self._mode = _CLOSED
        self._buffer = b""
        if self._message is not None:
            self._message.connectionLost()
            self._message = None
            self._sink = None
        self.transaction = None
        for call in (self._timer, self._delayed):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._delayed = None
        turn, self._auth_turn = self._auth_turn, None
        if turn is not None:
            turn.cancel()
        self._logout()
        if self._counted:
            self._counted = False
            self.factory.connection_limiter.release(self._client_key)
        if self._metered:
            self._metered = False
            self._metrics.connection_closed()

    def _logout(self) -> None:
        logout, self._onLogout = self._onLogout, None
        self.delivery = None
        self.authenticated = False
        if logout is not None:
            logout()

    def _close(self) -> None:
        """
        Close after the replies already written; read nothing more. A client
        that does not read them (the write buffer is full) is not waited
        for; one whose replies stay stuck is aborted by the session timer.
        """
        self._buffer = b""
        self._leave_data()
        transport = self._t
        if self._producing:
            # A transport does not finish closing while it has a producer.
            self._producing = False
            transport.unregisterProducer()
        if self._congested:
            transport.abortConnection()
        else:
            transport.loseConnection()

    # -- output backpressure (IPushProducer, called by the transport) -------

    def pauseProducing(self) -> None:
        """
        The transport's write buffer is full: answer nothing more, and read
        nothing more, until L{resumeProducing}.
        """
        self._congested = True
        self._stop_reading()

    def resumeProducing(self) -> None:
        """
        The write buffer has drained: read and answer again.
        """
        self._congested = False
        if self._mode is _CLOSED or self._t.disconnecting or self._paused:
            return
        self._start_reading()
        if self._buffer:
            self._process()

    def stopProducing(self) -> None:
        """
        The connection is going away; L{connectionLost} follows.
        """

    def _stop_reading(self) -> None:
        if not self._transport_paused and not self._t.disconnecting:
            self._transport_paused = True
            self._t.pauseProducing()

    def _start_reading(self) -> None:
        if self._transport_paused and not self._t.disconnecting:
            self._transport_paused = False
            self._t.resumeProducing()

    def _421(self, status: bytes, text: bytes) -> bytes:
        return b"421 " + status + b" " + self.host + b" " + text + b"\r\n"

    # -- timers -----------------------------------------------------------

    def _schedule(self, at: float) -> None:
        """
        Make the one timer fire no later than C{at}; it recomputes the real
        deadline when it fires, so moving deadlines later costs nothing.
        """
        timer = self._timer
        if timer is not None:
            if self._timer_at <= at:
                return
            timer.cancel()
        self._timer_at = at
        self._timer = self._clock.callLater(max(0.0, at - self._clock.seconds()), self._on_timer)

    def _deadline(self) -> tuple[float, bytes, bytes]:
        """
        @return: when the session must end, with the status and text of its
            C{421}.
        """
        limits = self._limits
        # Waiting on our own Deferred counts too (L{_resume} restarts the
        # idle time), so that a check that never answers cannot hold the
        # connection forever.
        at, why = self._last_activity + limits.idle_timeout, b"Error: timeout exceeded"
        status = b"4.4.2"
        if self._line_started_at is not None:
            line_at = self._line_started_at + limits.command_deadline
            if line_at < at:
                at, why = line_at, b"Error: command took too long"
        if self._data_started_at is not None:
            data_at = self._data_started_at + limits.data_deadline
            if data_at < at:
                at, why = data_at, b"Error: DATA took too long"
        # The session's lifetime ends it between transactions only: a
        # message under way is finished (L{_reset_transaction} and
        # L{_resume} bring the timer back to the lifetime).
        if self.transaction is None and not self._paused and self._session_ends_at < at:
            at, status, why = self._session_ends_at, b"4.7.0", b"Error: session too long"
        return at, status, why

    def _on_timer(self) -> None:
        self._timer = None
        if self._mode is _CLOSED:
            return
        if self._t.disconnecting:
            # Closed, but the client has not read the last replies for a
            # whole deadline: stop waiting for it.
            self._t.abortConnection()
            return
        at, status, why = self._deadline()
        now = self._clock.seconds()
        if at <= now:
            log.info("timeout for {client_ip}: {why}", client_ip=self._client_ip, why=why)
            self._t.write(self._421(status, why))
            self._close()
            if self._mode is not _CLOSED:
                self._schedule(now + self._limits.idle_timeout)
        else:
            self._schedule(at)

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Buffer C{data} and process the complete lines, unless a reply is
        pending.
        """
        mode = self._mode
        if mode is _CLOSED or self._t.disconnecting:
            return
        self._last_activity = self._clock.seconds()
        if mode is _GREETING:
            log.info("pregreet traffic from {client_ip}", client_ip=self._client_ip)
            self._t.write(R_PREGREET)
            self._close()
            return
        self._buffer = self._buffer + data if self._buffer else data
        if self._paused or self._congested:
            if self._congested or len(self._buffer) > _PAUSED_BUFFER_LIMIT:
                self._stop_reading()
            return
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            self._process_lines()
        finally:
            self._processing = False

    def _process_lines(self) -> None:
        buf = self._buffer
        end = len(buf)
        pos = 0
        transport = self._t
        while pos < end and not (self._paused or self._congested):
            if transport.disconnecting:
                self._buffer = b""
                return
            if self._mode is _DATA:
                pos = self._data_lines(buf, pos)
                if self._mode is _DATA:
                    # No complete line left, or the connection is closing.
                    break
                continue
            eol = buf.find(b"\n", pos)
            if eol < 0:
                break
            line = buf[pos:eol]
            length = eol + 1 - pos
            pos = eol + 1
            if self._discarding_line:
                self._discarding_line = False
                self._bad(R_LINE_TOO_LONG)
                continue
            if line[-1:] == b"\r":
                line = line[:-1]
            self._line(line, length, pos < end)
        self._buffer = rest = buf[pos:] if pos else buf
        if pos:
            # A line ended: whatever is left started now.
            self._line_started_at = None
        if rest and not (self._paused or self._congested or transport.disconnecting):
            self._partial_line(len(rest))

    def _data_lines(self, buf: bytes, pos: int) -> int:
        """
        Hand the complete DATA lines of C{buf} from C{pos} on to the message
        sink, un-dot-stuffed, until the final dot.

        @return: where the unconsumed input starts.
        """
        find = buf.find
        sink = self._sink
        message = self._message
        assembler = None if sink is None or message is None else message.assembler
        if assembler is not None:
            pos = self._data_block(buf, pos, assembler)
            if assembler.headers_complete:
                assembler = None
        while True:
            eol = find(b"\r\n", pos)
            if eol < 0:
                return pos
            if buf[pos] == 0x2E:  # "."
                if eol == pos + 1:
                    self._end_of_data()
                    return eol + 2
                line = buf[pos + 1 : eol]
            else:
                line = buf[pos:eol]
            pos = eol + 2
            if sink is not None:
                try:
                    sink(line)
                except MessageRejected as rejection:
                    self._data_rejected(rejection)
                    if self._t.disconnecting:
                        return len(buf)
                    sink = None
                    assembler = None
                    continue
                if assembler is not None and assembler.headers_complete:
                    # The header section just ended: the body's lines go
                    # in one block when they can.
                    assembler = None
                    pos = self._data_block(buf, pos, message.assembler)  # type: ignore[union-attr]

    def _data_block(self, buf: bytes, pos: int, assembler: MessageAssembler) -> int:
        """
        Hand the assembler, in one piece, the complete body lines of C{buf}
        from C{pos} up to the final dot (or the last complete line), when it
        can take them without looking at each: a 5 KB message is some seventy
        lines, and a call per line is most of the cost of DATA.

        @return: where line-by-line handling goes on.
        """
        last = buf.rfind(b"\r\n", pos)
        if last < pos:
            return pos
        stop = last + 2
        if buf.startswith(b".\r\n", pos):
            return pos
        end = buf.find(b"\r\n.\r\n", pos, stop + 3)
        if end >= 0:
            stop = end + 2
        block = buf[pos:stop]
        if block[:1] == b".":
            block = block[1:].replace(b"\r\n.", b"\r\n")
        elif b"\r\n." in block:
            block = block.replace(b"\r\n.", b"\r\n")
        return stop if assembler.body_block(block) else pos

    def _partial_line(self, length: int) -> None:
        """
        Bound a line that has not ended yet, and start its deadline.
        """
        limits = self._limits
        if self._mode is _DATA:
            # The un-stuffing dot and the CR still waiting for its LF.
            if length > limits.max_data_line_length + 2:
                self._data_rejected(
                    MessageRejected(
                        550,
                        "5.6.0",
                        "Message refused: line too long "
                        f"(limit is {limits.max_data_line_length} octets per line)",
                    ),
                    fatal=True,
                )
            return
        if self._discarding_line or length > limits.max_auth_line_length:
            self._discarding_line = True
            self._buffer = b""
        if self._line_started_at is None:
            self._line_started_at = now = self._clock.seconds()
            self._schedule(now + limits.command_deadline)

    def _line(self, line: bytes, length: int, more: bool) -> None:
        """
        Handle one command line (or AUTH response line).

        @param length: its length on the wire, line end included.
        @param more: whether more input follows it in the buffer.
        """
        limits = self._limits
        if length > limits.max_command_length and (
            length > limits.max_auth_line_length
            or not (self._mode is _AUTH or line[:5].upper() == b"AUTH ")
        ):
            self._bad(R_LINE_TOO_LONG)
            return
        if b"\0" in line or b"\r" in line:
            self._bad(R_BAD_CHARACTER)
            return
        if self._mode is _AUTH:
            self._auth_response(line.strip())
            return
        verb, _, argument = line.strip().partition(b" ")
        verb = verb.upper()
        handler = _COMMANDS.get(verb)
        if handler is not None:
            handler(self, argument.strip())
        elif verb == b"STARTTLS":
            self._starttls(argument, more)
        elif verb in _HTTP_VERBS or verb == _HTTP_HEADER:
            log.info("HTTP request from {client_ip}", client_ip=self._client_ip)
            self._close()
        elif verb in (b"EXPN", b"TURN", b"ETRN", b"BDAT"):
            self._bad(R_NOT_IMPLEMENTED)
        else:
            self._bad(R_UNKNOWN)

    def _bad(self, reply: bytes) -> None:
        """
        Answer a protocol error, or disconnect once there were too many.
        An error in an AUTH response line ends the AUTH exchange.
        """
        if self._mode is _AUTH:
            self._mode = _COMMAND
            self._challenger = None
        self._bad_commands += 1
        if self._bad_commands > self._limits.max_bad_commands:
            log.info("too many errors from {client_ip}", client_ip=self._client_ip)
            self._t.write(self._421(b"4.7.0", b"Error: too many errors"))
            self._close()
        else:
            self._t.write(reply)

    def _refuse(self, refused: CommandRefused) -> None:
        if refused.protocol_error:
            self._bad(refused.reply)
        else:
            self._t.write(refused.reply)

    # -- waiting on Deferreds ---------------------------------------------

    def _pause_until(self, d: Deferred[Any]) -> None:
        """
        Read no further line until C{d} (with the reply in its callbacks)
        has fired.
        """
        self._paused = True
        d.addErrback(self._internal_error)
        d.addBoth(self._resume)

    def _resume(self, ignored: object) -> None:
        self._paused = False
        if self._mode is _CLOSED:
            return
        self._last_activity = self._clock.seconds()
        self._schedule(self._session_ends_at)
        if self._congested:
            return
        self._start_reading()
        if self._buffer:
            self._process()

    def _internal_error(self, failure: Failure) -> None:
        log.failure("internal error in SMTP session", failure)
        if self._mode is not _CLOSED:
            self._t.write(R_LOCAL_ERROR)

    # -- commands -----------------------------------------------------------

    def _reset_transaction(self) -> None:
        self.transaction = None
        self._sender = None
        self._message_factory = None
        self._schedule(self._session_ends_at)

    def _hello(self, argument: bytes) -> bool:
        """
        Remember the client's HELO/EHLO name (and start a new transaction).

        @return: whether the argument was acceptable.
        """
        if not argument:
            self._bad(R_HELO_SYNTAX)
            return False
        self._helo_name = argument.decode("ascii", "replace")
        self._helo = (argument, self._client_ip.encode("ascii", "replace"))
        self._reset_transaction()
        return True

    def _junk(self) -> bool:
        """
        Count a command that moves no mail forward.

        @return: whether that was one too many (answered C{421} and closed).
        """
        self._junk_commands += 1
        if self._junk_commands <= self._limits.max_junk_commands:
            return False
        log.info("too many commands without mail from {client_ip}", client_ip=self._client_ip)
        self._t.write(self._421(b"4.7.0", b"Error: too many commands without mail"))
        self._close()
        return True

    def _ehlo(self, argument: bytes) -> None:
        if self._junk():
            return
        if self._hello(argument):
            self._t.write(
                self.factory.ehlo_reply(
                    self.host,
                    starttls=self.canStartTLS and not self._tls_active,
                    auth=self._tls_active or not self.factory.require_tls,
                )
            )

    def _helo_command(self, argument: bytes) -> None:
        if self._junk():
            return
        if self._hello(argument):
            self._t.write(b"250 " + self.host + b"\r\n")

    def _noop(self, argument: bytes) -> None:
        if not self._junk():
            self._t.write(R_OK)

    def _rset(self, argument: bytes) -> None:
        if self._junk():
            return
        self._reset_transaction()
        self._t.write(R_OK)

    def _vrfy(self, argument: bytes) -> None:
        if self._junk():
            return
        if not argument:
            self._bad(R_VRFY_SYNTAX)
            return
        self._t.write(R_VRFY)

    def _help(self, argument: bytes) -> None:
        if not self._junk():
            self._t.write(R_HELP)

    def _quit(self, argument: bytes) -> None:
        self._t.write(R_BYE)
        self._close()

    def _starttls(self, argument: bytes, more: bool) -> None:
        if more:
            # CVE-2011-0411: whatever follows STARTTLS in the same read was
            # sent in plaintext and must never be answered inside TLS.
            log.info("command pipelined after STARTTLS from {ip}", ip=self._client_ip)
            self._t.write(R_PIPELINED_STARTTLS)
            self._close()
            return
        if argument:
            self._bad(R_NO_PARAMETERS)
        elif self._tls_active:
            self._bad(R_TLS_ACTIVE)
        elif not self.canStartTLS:
            if not self._junk():
                self._t.write(R_TLS_UNAVAILABLE)
        else:
            self._t.write(R_TLS_GO)
            self._t.startTLS(self.ctx)
            self.startedTLS = self._tls_active = True
            if self._congested:
                # The transport registers its producer afresh for TLS and
                # will not resume one it did not pause itself.
                self._congested = False
                self._start_reading()
            # RFC 3207 4.2: the client must start over; nothing learned in
            # plaintext survives.
            self._helo_name = None
            self._helo = (None, self._client_ip.encode("ascii", "replace"))
            self._reset_transaction()
            self._logout()

    # -- AUTH -----------------------------------------------------------------

    def _auth(self, argument: bytes) -> None:
        factory = self.factory
        if self._helo_name is None:
            self._bad(R_EHLO_FIRST)
            return
        if self.authenticated:
            self._bad(R_ALREADY_AUTH)
            return
        if self.transaction is not None:
            self._bad(R_AUTH_IN_TRANSACTION)
            return
        if factory.require_tls and not self._tls_active:
            self._metrics.rejected(RejectReason.TLS_REQUIRED)
            self._bad(R_TLS_REQUIRED)
            return
        if factory.auth_limiter.blocked(self._client_key):
            self._auth_blocked()
            return
        mechanism, _, initial = argument.partition(b" ")
        if not mechanism:
            self._bad(R_AUTH_SYNTAX)
            return
        make = self.challengers.get(mechanism.upper())
        if make is None:
            self._bad(R_AUTH_MECHANISM)
            return
        self._challenger = challenger = make()
        initial = initial.strip()
        if initial:
            # The client answered the first challenge unasked.
            challenger.getChallenge()
            self._auth_response(initial)
        else:
            self._mode = _AUTH
            self._t.write(b"334 " + base64.b64encode(challenger.getChallenge()) + b"\r\n")

    def _auth_response(self, response: bytes) -> None:
        self._mode = _COMMAND
        challenger, self._challenger = self._challenger, None
        if response == b"*":
            if not self._junk():
                self._t.write(R_AUTH_CANCELLED)
            return
        try:
            # RFC 4954 section 4: "=" is an empty initial response.
            decoded = b"" if response == b"=" else base64.b64decode(response, validate=True)
            if len(decoded) > _MAX_SASL_RESPONSE:
                raise IllegalClientResponse("response too long")
            challenger.setResponse(decoded)
        except (binascii.Error, ValueError, IllegalClientResponse):
            self._bad(R_AUTH_MALFORMED)
            return
        if challenger.moreChallenges():
            self._challenger = challenger
            self._mode = _AUTH
            self._t.write(b"334 " + base64.b64encode(challenger.getChallenge()) + b"\r\n")
            return
        admission = self.factory.auth_limiter.begin(self._client_key)
        if admission is True:
            self._pause_until(self._check_credentials(challenger))
        elif admission is False:
            self._auth_blocked()
        else:
            # Other checks from this address are running: wait for a turn,
            # reading nothing meanwhile.
            self._auth_turn = admission
            admission.addCallback(self._auth_admitted, challenger)
            admission.addErrback(_left_the_queue)
            self._pause_until(admission)

    def _auth_admitted(self, admitted: bool, challenger: Any) -> Deferred[Any] | None:
        self._auth_turn = None
        if not admitted:
            self._auth_blocked()
            return None
        return self._check_credentials(challenger)

    def _check_credentials(self, challenger: Any) -> Deferred[Any]:
        """
        Check the credentials, within a turn given by the failure tracker;
        the turn ends with the check, whether or not the client stayed.
        """
        mind = SessionMind(self.factory.services, self._client_ip, self._tls_active)
        portal: Portal = self.portal  # type: ignore[assignment]
        d = portal.login(challenger, mind, IMessageDelivery)
        d.addCallbacks(self._auth_succeeded, self._auth_failed)
        return d

    def _auth_succeeded(self, result: tuple[Any, Any, Callable[[], None]]) -> None:
        self.factory.auth_limiter.end(self._client_key, failed=False)
        _interface, avatar, logout = result
        if self._mode is _CLOSED:
            logout()
            return
        self.delivery = avatar
        self._onLogout = logout
        self.authenticated = True
        username = avatar.user.username
        recorded = self.factory.users.record_login(
            username, self._clock.seconds(), self._client_ip
        )
        recorded.addErrback(_login_not_recorded, username)
        self._t.write(R_AUTH_OK)

    def _auth_failed(self, failure: Failure) -> Deferred[None] | None:
        factory = self.factory
        tracker = factory.auth_limiter
        key = self._client_key
        if not failure.check(UnauthorizedLogin):
            tracker.end(key, failed=False)
            if failure.check(PasswordCheckUnavailable):
                # Overload or shutdown, not a fault: the client retries.
                log.info(
                    "AUTH from {client_ip} not checked: {why}",
                    client_ip=self._client_ip,
                    why=failure.getErrorMessage() or "overloaded",
                )
            else:
                log.failure("AUTH could not be checked", failure)
            if self._mode is not _CLOSED:
                self._t.write(R_AUTH_TEMPFAIL)
            return None
        # Counted even when the client has left: hanging up right after
        # AUTH must not make a guess free.
        counted = tracker.fail(key)
        if isinstance(counted, Deferred):
            return counted.addCallback(self._auth_failure_counted)
        return self._auth_failure_counted(counted)

    def _auth_failure_counted(self, counted: tuple[bool, int]) -> Deferred[None] | None:
        factory = self.factory
        key = self._client_key
        alert, failures = counted
        limits = self._limits
        log.info(
            "AUTH failed from {client_ip} ({failures} recently)",
            client_ip=self._client_ip,
            failures=failures,
        )
        if alert:
            factory.alerts.raise_alert(
                Alert(
                    type="auth_failures",
                    message=(
                        f"{failures} failed SMTP logins from {key} within "
                        f"{limits.auth_failure_window:g} s; further AUTH refused"
                    ),
                    created_at=self._clock.seconds(),
                    details={
                        "client_ip": key,
                        "failures": failures,
                        "window": limits.auth_failure_window,
                    },
                )
            )
        if self._mode is _CLOSED:
            return None
        if failures >= limits.auth_failure_limit:
            self._auth_blocked()
            return None
        delay = min(limits.auth_failure_delay * failures, limits.auth_failure_delay_cap)
        if delay <= 0:
            self._metrics.rejected(RejectReason.AUTH_FAILED)
            self._t.write(R_AUTH_FAILED)
            return None
        # The tarpit: the client waits before it may try again.
        tarpit: Deferred[None] = Deferred()
        self._delayed = self._clock.callLater(delay, self._tarpit_done, tarpit)
        return tarpit

    def _tarpit_done(self, tarpit: Deferred[None]) -> None:
        self._delayed = None
        self._metrics.rejected(RejectReason.AUTH_FAILED)
        self._t.write(R_AUTH_FAILED)
        tarpit.callback(None)

    def _auth_blocked(self) -> None:
        self._metrics.rejected(RejectReason.AUTH_THROTTLED)
        self._t.write(self._421(b"4.7.0", b"Error: too many failed logins"))
        self._close()

    # -- the mail transaction -----------------------------------------------

    def _mail(self, argument: bytes) -> None:
        if not self.authenticated:
            self._metrics.rejected(RejectReason.AUTH_REQUIRED)
            self._bad(R_AUTH_REQUIRED)
            return
        if self.transaction is not None:
            self._bad(R_NESTED_MAIL)
            return
        limits = self._limits
        now = self._last_activity
        if self._transactions >= limits.max_messages_per_session or now >= self._session_ends_at:
            log.info("session of {client_ip} at its limits", client_ip=self._client_ip)
            too_many = self._transactions >= limits.max_messages_per_session
            self._t.write(
                self._421(
                    b"4.7.0",
                    b"Error: too many messages in one session"
                    if too_many
                    else b"Error: session too long",
                )
            )
            self._close()
            return
        if argument[:5].upper() != b"FROM:":
            self._bad(R_MAIL_SYNTAX)
            return
        try:
            address, rest = parse_path(
                argument[5:], self._limits.max_path_length, R_BAD_SENDER, null_allowed=True
            )
            parameters = parse_mail_parameters(rest, self._limits.max_size)
        except CommandRefused as refused:
            if refused.reply == R_SIZE_EXCEEDED:
                self._metrics.rejected(RejectReason.TOO_LARGE)
            self._refuse(refused)
            return
        if not self.factory.services.queue.accepting:
            self._metrics.rejected(RejectReason.JOURNAL_UNAVAILABLE)
            if not self._junk():
                self._t.write(R_STORAGE)
            return
        delivery = self.delivery
        if now - delivery.checked_at >= limits.user_recheck_interval:
            # The login may have been revoked since the record was read.
            d = self.factory.users.get_user(delivery.user.username)
            d.addCallbacks(
                self._user_reread,
                self._user_not_reread,
                callbackArgs=(address, parameters),
                errbackArgs=(delivery.user.username,),
            )
            self._pause_until(d)
            return
        pending = self._validate_sender(address, parameters)
        if pending is not None:
            self._pause_until(pending)

    def _user_reread(
        self, user: SmtpUser | None, address: smtp.Address, parameters: MailParameters
    ) -> Deferred[None] | None:
        if self._mode is _CLOSED or self.delivery is None:
            return None
        if not self.delivery.refresh(user):
            # The client may log in again (with its new password, say):
            # answer as to MAIL without AUTH, and forget the login.
            log.info(
                "login of {username} from {client_ip} revoked",
                username=self.delivery.user.username,
                client_ip=self._client_ip,
            )
            self._logout()
            self._metrics.rejected(RejectReason.AUTH_REQUIRED)
            self._t.write(R_AUTH_REQUIRED)
            return None
        return self._validate_sender(address, parameters)

    def _user_not_reread(self, failure: Failure, username: str) -> None:
        log.warn(
            "could not read the record of {username}: {error}",
            username=username,
            error=failure.getErrorMessage(),
        )
        if self._mode is not _CLOSED:
            self._t.write(R_LOCAL_ERROR)

    def _validate_sender(
        self, address: smtp.Address, parameters: MailParameters
    ) -> Deferred[None] | None:
        """
        Ask the avatar about the sender, and start the transaction.

        @return: a L{Deferred} to wait for when the avatar answers later.
        """
        try:
            result = self.delivery.validateFrom(self._helo, address)
        except smtp.SMTPServerError as refusal:
            self._metrics.rejected(RejectReason.SENDER_UNAUTHORIZED)
            self._server_error(refusal)
            return None
        transaction = Transaction(
            helo=self._helo_name or "",
            sender=str(address),
            mt_priority=parameters.mt_priority,
        )
        if isinstance(result, Deferred):
            return result.addCallbacks(
                self._sender_accepted,
                self._validation_failed,
                (transaction,),
                errbackArgs=(RejectReason.SENDER_UNAUTHORIZED,),
            )
        self._sender_accepted(result, transaction)
        return None

    def _sender_accepted(self, address: object, transaction: Transaction) -> None:
        if self._mode is _CLOSED:
            return
        self.transaction = transaction
        self._transactions += 1
        self._sender = address if isinstance(address, smtp.Address) else None
        self._message_factory = None
        self._t.write(R_SENDER_OK)

    def _validation_failed(self, failure: Failure, reason: RejectReason) -> None:
        failure.trap(smtp.SMTPServerError)
        refusal: smtp.SMTPServerError = failure.value  # type: ignore[assignment]
        self._metrics.rejected(reason)
        self._server_error(refusal)

    def _server_error(self, refusal: smtp.SMTPServerError) -> None:
        """
        Answer a sender or recipient the avatar refused; a refusal counts as
        an error, so that a client cannot go on raising alerts.
        """
        resp = refusal.resp
        text = resp if isinstance(resp, bytes) else str(resp).encode("ascii", "replace")
        self._bad(b"%d %s\r\n" % (refusal.code, text))

    def _rcpt(self, argument: bytes) -> None:
        transaction = self.transaction
        if transaction is None:
            self._bad(R_NEED_MAIL)
            return
        if argument[:3].upper() != b"TO:":
            self._bad(R_RCPT_SYNTAX)
            return
        try:
            address, rest = parse_path(
                argument[3:], self._limits.max_path_length, R_BAD_RECIPIENT, null_allowed=False
            )
        except CommandRefused as refused:
            self._refuse(refused)
            return
        if rest.strip():
            # No RCPT parameter is offered (no DSN).
            self._bad(R_PARAMETER_UNKNOWN)
            return
        recipient = str(address)
        if recipient in transaction.recipients:
            if not self._junk():
                self._t.write(R_RCPT_OK)
            return
        if len(transaction.recipients) >= self._limits.max_recipients:
            self._metrics.rejected(RejectReason.TOO_MANY_RECIPIENTS)
            if not self._junk():
                self._t.write(R_TOO_MANY_RECIPIENTS)
            return
        user = smtp.User(address, self._helo, self, self._sender or smtp.Address(b"<>"))
        try:
            result = self.delivery.validateTo(user)
        except smtp.SMTPServerError as refusal:
            self._metrics.rejected(RejectReason.OTHER)
            self._server_error(refusal)
            return
        if isinstance(result, Deferred):
            result.addCallbacks(
                self._recipient_accepted,
                self._validation_failed,
                (transaction, recipient),
                errbackArgs=(RejectReason.OTHER,),
            )
            self._pause_until(result)
        else:
            self._recipient_accepted(result, transaction, recipient)

    def _recipient_accepted(
        self, factory: Callable[[], GatewayMessage], transaction: Transaction, recipient: str
    ) -> None:
        if self._mode is _CLOSED or transaction is not self.transaction:
            return
        transaction.recipients.append(recipient)
        self._message_factory = factory
        self._t.write(R_RCPT_OK)

    def _data(self, argument: bytes) -> None:
        if self.transaction is None:
            self._bad(R_NEED_MAIL)
            return
        if self._message_factory is None:
            self._bad(R_NEED_RCPT)
            return
        if argument:
            self._bad(R_NO_PARAMETERS)
            return
        # Every recipient's factory makes the transaction's one message.
        self._message = message = self._message_factory()
        self._sink = message.lineReceived
        self._rejection = None
        self._mode = _DATA
        self._about_to_submit = True
        self.factory.in_data += 1
        self._data_started_at = now = self._clock.seconds()
        self._schedule(now + self._limits.data_deadline)
        self._t.write(R_DATA)

    def _data_rejected(self, rejection: MessageRejected, fatal: bool = False) -> None:
        """
        The message cannot be accepted. When the refusal leaves the framing
        intact (too big), read on to the final dot; otherwise (bare CR or
        LF, NUL, long line) where the message ends is ambiguous: answer and
        close, so that no byte of it is ever read as a command.
        """
        message, self._message, self._sink = self._message, None, None
        if message is not None:
            message.connectionLost()
        self._leave_data()
        log.info(
            "message refused from {client_ip}: {rejection}",
            client_ip=self._client_ip,
            rejection=str(rejection),
        )
        if fatal or rejection.status != "5.3.4":
            self._metrics.rejected(_reason_of(rejection))
            self._t.write(b"%d %s\r\n" % (rejection.code, rejection.reply_bytes()))
            self._close()
        else:
            self._rejection = rejection

    def _leave_data(self) -> None:
        """
        This session's message will not be handed to the queue after all,
        or it is being handed now: it no longer counts as about to come
        (L{GatewaySMTPFactory.in_data}).
        """
        if self._about_to_submit:
            self._about_to_submit = False
            self.factory.in_data -= 1

    def _end_of_data(self) -> None:
        self._mode = _COMMAND
        self._leave_data()
        self._data_started_at = None
        message, self._message, self._sink = self._message, None, None
        rejection, self._rejection = self._rejection, None
        self._reset_transaction()
        if rejection is not None:
            self._metrics.rejected(_reason_of(rejection))
            self._t.write(b"%d %s\r\n" % (rejection.code, rejection.reply_bytes()))
            return
        if message is None:  # refused and already answered
            return
        d = message.eomReceived()
        d.addCallbacks(self._queued, self._not_queued)
        self._pause_until(d)

    def _queued(self, queue_id: str) -> None:
        # Queued whether or not the client is still there to read the 250.
        self._metrics.accepted()
        self._bad_commands = 0
        self._junk_commands = 0
        # The one log event of an accepted message (and of its login); in
        # an acceptor process the main process logs it.
        if self.factory.log_accepted:
            log.info(
                "queued {queue_id} from {username} at {client_ip}",
                queue_id=queue_id,
                username=self.delivery.user.username if self.delivery else None,
                client_ip=self._client_ip,
            )
        if self._mode is not _CLOSED:
            self._t.write(b"250 2.0.0 Ok: queued as " + queue_id.encode("ascii") + b"\r\n")

    def _not_queued(self, failure: Failure) -> None:
        rejection = failure.check(MessageRejected, JournalUnavailable)
        if rejection is None:
            failure.raiseException()
        if self._mode is _CLOSED:
            return
        if rejection is JournalUnavailable:
            log.warn("journal unavailable: {error}", error=str(failure.value))
            self._metrics.rejected(RejectReason.JOURNAL_UNAVAILABLE)
            self._t.write(R_STORAGE)
        else:
            refused: MessageRejected = failure.value  # type: ignore[assignment]
            self._metrics.rejected(_reason_of(refused))
            reply = b"%d %s\r\n" % (refused.code, refused.reply_bytes())
            if refused.status.startswith("5.7."):
                # A policy refusal (header From:) counts as an error.
                self._bad(reply)
            else:
                self._t.write(reply)


def _left_the_queue(failure: Failure) -> None:
    failure.trap(CancelledError)


def _login_not_recorded(failure: Failure, username: str) -> None:
    log.warn(
        "could not record the login of {username}: {error}",
        username=username,
        error=failure.getErrorMessage(),
    )


_COMMANDS: dict[bytes, Callable[[GatewaySMTP, bytes], None]] = {
    b"EHLO": GatewaySMTP._ehlo,
    b"HELO": GatewaySMTP._helo_command,
    b"AUTH": GatewaySMTP._auth,
    b"MAIL": GatewaySMTP._mail,
    b"RCPT": GatewaySMTP._rcpt,
    b"DATA": GatewaySMTP._data,
    b"RSET": GatewaySMTP._rset,
    b"NOOP": GatewaySMTP._noop,
    b"VRFY": GatewaySMTP._vrfy,
    b"HELP": GatewaySMTP._help,
    b"QUIT": GatewaySMTP._quit,
}


class GatewaySMTPFactory(smtp.SMTPFactory):
    """
    Builds L{GatewaySMTP} sessions; one factory serves every listening port,
    so the per-address limits hold across ports.

    @ivar connections: open connections per client address.
    @ivar auth_failures: recent failed logins per client address.
    @ivar sender_alerts: holds back repeated C{sender_domain} alerts.
    @ivar metrics: what the sessions report connections, accepted messages
        and refusals to (a no-op when the gateway keeps no metrics).
    """

    protocol = GatewaySMTP  # type: ignore[assignment]

    def __init__(
        self,
        *,
        portal: Portal,
        queue: IMessageQueue,
        alerts: IAlertSink,
        users: IUserStore,
        hostname: str,
        limits: Limits,
        tls: Callable[[], Any | None],
        require_tls: bool,
        clock: IReactorTime,
        queue_ids: QueueIdGenerator,
        metrics: SessionMetrics | None = None,
        connection_limiter: ConnectionLimiter | None = None,
        auth_limiter: AuthLimiter | None = None,
        log_accepted: bool = True,
    ) -> None:
        """
        @param portal: checks AUTH credentials; its realm is a
            L{smtpgw.realm.GatewayRealm}.
        @param queue: where accepted messages go.
        @param alerts: where C{sender_domain} and C{auth_failures} alerts go.
        @param users: records each successful login.
        @param hostname: this gateway's name, in greetings and headers.
        @param limits: the session limits.
        @param tls: gives the TLS options (or L{None}: no STARTTLS) for each
            new connection, so reloaded certificates apply to new sessions.
        @param require_tls: offer AUTH only after STARTTLS.
        @param clock: the time source for every timer.
        @param queue_ids: makes the queue id of each accepted message.
        @param metrics: told of connections, accepted messages and
            refusals (see L{smtpgw.metrics.GatewayMetrics}); none kept when
            L{None}.
        @param connection_limiter: counts connections per address instead
            of this factory's own L{connections} (an acceptor process asks
            the main process).
        @param auth_limiter: tracks failed logins instead of this factory's
            own L{auth_failures}.
        @param log_accepted: log each accepted message (an acceptor
            process leaves that to the main process).
        """
        super().__init__(portal)
        try:
            self.domain = hostname.encode("idna")
        except UnicodeError:
            # Not a valid domain name, but the greeting must still be ASCII.
            self.domain = hostname.encode("ascii", "replace")
        self.users = users
        self.alerts = alerts
        self.limits = limits
        self.tls = tls
        self.require_tls = require_tls
        self.clock = clock
        self.metrics: SessionMetrics = metrics if metrics is not None else _NO_METRICS
        self.sender_alerts = RepeatedAlertFilter(alerts, clock, window=limits.sender_alert_window)
        self.services = GatewayServices(
            queue=queue,
            alerts=self.sender_alerts,
            clock=clock,
            hostname=hostname,
            queue_ids=queue_ids,
            limits=limits,
        )
        self.connections = ConnectionCounter(
            limits.max_connections_per_ip, total_limit=limits.max_connections
        )
        self.auth_failures = AuthFailureTracker(
            limit=limits.auth_failure_limit, window=limits.auth_failure_window, clock=clock
        )
        self.connection_limiter: ConnectionLimiter = (
            self.connections if connection_limiter is None else connection_limiter
        )
        self.log_accepted = log_accepted
        # Sessions between DATA's 354 and the final dot, their message not
        # refused: each is about to hand the queue a message (the journal's
        # writer waits a moment for them, see
        # smtpgw.journal.DEFAULT_GATHER_EXPECTED).
        self.in_data = 0
        self.auth_limiter: AuthLimiter = (
            self.auth_failures if auth_limiter is None else auth_limiter
        )
        self._ehlo_replies: dict[tuple[bytes, bool, bool], bytes] = {}

    def stopFactory(self) -> None:
        """
        The last port stopped listening: store the pending summaries of
        repeated sender alerts.
        """
        self.sender_alerts.flush()

    def buildProtocol(self, addr: Any) -> GatewaySMTP:  # type: ignore[override]
        """
        A session with the AUTH mechanisms and the current TLS options.
        """
        session: GatewaySMTP = super().buildProtocol(addr)
        session.challengers = _CHALLENGERS
        session.ctx = self.tls()
        return session

    def ehlo_reply(self, host: bytes, *, starttls: bool, auth: bool) -> bytes:
        """
        The EHLO reply, with the extensions offered in this state.

        @param starttls: offer STARTTLS.
        @param auth: offer AUTH.
        """
        key = (host, starttls, auth)
        reply = self._ehlo_replies.get(key)
        if reply is None:
            lines = [
                host,
                b"PIPELINING",
                b"SIZE %d" % self.limits.max_size,
                b"8BITMIME",
                b"ENHANCEDSTATUSCODES",
                b"MT-PRIORITY",
            ]
            if starttls:
                lines.append(b"STARTTLS")
            if auth:
                lines.append(b"AUTH PLAIN LOGIN")
            lines.append(b"HELP")
            reply = b"".join(b"250-" + line + b"\r\n" for line in lines[:-1])
            reply += b"250 " + lines[-1] + b"\r\n"
            self._ehlo_replies[key] = reply
        return reply
