"""
Acceptor processes: several processes answer SMTP on the same ports, and the
main process journals and sends what they accept.

The main process binds every port (as root when it must, before dropping
privileges) but never accepts on them; it starts C{--acceptors} child
processes (L{smtpgw.acceptor_main}) that inherit the listening sockets and
accept from them, the kernel handing each new connection to whichever
process asks first. Each child runs the whole ESMTP session (TLS, AUTH with
its own bcrypt threads and credential cache, sender policy, header
rewriting) on its own core, and hands each message to the main process over
its stdin/stdout pipes; the main process journals it (group commit, as
always), schedules it, and only then answers, so the child sends C{250} only
for a durable message. The main process alone keeps the state that must
hold across all acceptors: the alerts, the metrics and the daily counts,
and, when there are several acceptors, the connection counts per address
and in all and the failed logins per address. A sole acceptor keeps those
two itself, as the main process would (no round trip to the main process
before its greeting and each login), and reports its connections to the
main process's metrics with each heartbeat. This is Postfix's shape (many
C{smtpd}, one C{qmgr}).

The channel between them is a stream of frames, each a 4-byte length and a
payload; a payload is one kind byte, then either JSON or, for a message, a
binary header, the envelope as the journal records it
(L{smtpgw.journal_codec.encode_envelope}) and the message's bytes. Nothing
a client sends is interpreted by the main process beyond what the child
already checked.

If a child dies, the main process forgets its connections and login turns
and starts another (after 1 s, doubling to 30 s while it keeps dying). Its
clients lose their connections; a message the main process had already
received is journaled and sent although its client had no C{250} (a client
that sends it again makes a duplicate, as after any connection lost right
after the final dot); the others are not queued. If the main process
dies, the children die with it (C{PR_SET_PDEATHSIG}, and the end of their
stdin).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from attrs import asdict
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IWriteDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpgw.abuse import Admission, AuthFailureTracker, ConnectionCounter
from smtpgw.interfaces import Alert, IAlertSink, IMessageQueue, JournalUnavailable
from smtpgw.journal_codec import JournalRecordError, decode_envelope, encode_envelope
from smtpgw.limits import Limits
from smtpgw.metrics import SessionMetrics
from smtpgw.model import Envelope

__all__ = [
    "AcceptorConfig",
    "AcceptorPool",
    "MainLink",
    "MainProcessAcceptor",
    "PipeWriter",
    "decode_submit",
    "encode_submit",
    "submit_in_data",
]

log = Logger()

# Frame kinds, child to main.
SUBMIT = b"S"
CONNECT = b"C"
DISCONNECT = b"c"
AUTH_BEGIN = b"B"
AUTH_CANCEL = b"b"
AUTH_END = b"E"
AUTH_FAIL = b"F"
ALERT = b"A"
REJECTED = b"R"
READY = b"Y"
PONG = b"P"
# Frame kinds, main to child.
SUBMITTED = b"s"
ADMISSION = b"k"
AUTH_TURN = b"t"
AUTH_COUNTED = b"f"
ACCEPTING = b"a"
TLS = b"T"
PING = b"p"

#: Room for the headers the gateway adds and the framing, beyond the
#: message's C{--max-size} and its envelope (see L{frame_limit}).
FRAME_OVERHEAD = 1024 * 1024

_UINT32_MAX = 0xFFFFFFFF

_SUBMIT_HEADER = struct.Struct(">QII")
"""A C{SUBMIT} frame's sequence number, the sender's other sessions in DATA
(see L{submit_in_data}), and the length of the envelope."""

#: Outcomes of a submitted message, in the C{SUBMITTED} frame.
OK = "ok"
UNAVAILABLE = "unavailable"
ERROR = "error"

#: How long a stopping child waits for the answers to its messages.
STOP_GRACE = 5.0
#: How long the main process waits for a stopping child before killing it.
KILL_AFTER = 10.0
#: First and longest wait before starting a child that died.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
#: A child that ran this long resets the wait to L{RESTART_DELAY}.
HEALTHY_AFTER = 60.0
#: After this many starts in a row of one acceptor that never came to
#: accept (the child could not even be run, say), the main process accepts
#: SMTP itself (unless another acceptor accepts).
FALLBACK_AFTER = 3
#: How often the main process tells the children whether it takes mail,
#: and asks each whether it is still there.
ACCEPTING_POLL = 0.25
#: A child not heard from for this long does not count as serving
#: (stopped, deadlocked): L{AcceptorPool.ready} and so /healthz say so.
HEARTBEAT_TIMEOUT = 3.0
#: The longest stderr line of a child that is logged whole.
MAX_LOG_LINE = 64 * 1024


def frame_limit(limits: Limits) -> int:
    """
    The largest frame either side accepts: a message of C{--max-size} with
    the headers the gateway adds, and its envelope with the most recipients
    of the longest paths, each character escaped by JSON at worst
    (C{\\uXXXX}, 6 octets).
    """
    paths = limits.max_recipients + 2
    return limits.max_size + paths * (6 * limits.max_path_length + 8) + FRAME_OVERHEAD


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def encode_submit(seq: int, envelope: Envelope, body: bytes, in_data: int = 0) -> bytes:
    """
    The payload of a C{SUBMIT} frame: the envelope as the journal records
    it (L{encode_envelope}), then the message.

    @param in_data: the sender's sessions in DATA as it sends the frame.
    @raise ValueError: for an envelope the journal could not record.
    """
    head = encode_envelope(envelope)
    header = _SUBMIT_HEADER.pack(seq, min(max(in_data, 0), _UINT32_MAX), len(head))
    return SUBMIT + header + head + body


def decode_submit(payload: bytes) -> tuple[int, Envelope, bytes]:
    """
    Read the payload of a C{SUBMIT} frame (kind byte included).

    @raise ValueError: when it is not one.
    """
    if payload[:1] != SUBMIT or len(payload) < 1 + _SUBMIT_HEADER.size:
        raise ValueError("not a SUBMIT frame")
    seq, _, length = _SUBMIT_HEADER.unpack_from(payload, 1)
    start = 1 + _SUBMIT_HEADER.size
    if start + length > len(payload):
        raise ValueError("SUBMIT envelope runs past the frame")
    try:
        envelope = decode_envelope(payload[start : start + length])
    except JournalRecordError as error:
        raise ValueError(f"SUBMIT envelope: {error}") from None
    return seq, envelope, payload[start + length :]


def submit_in_data(payload: bytes) -> int:
    """
    @return: how many sessions of the acceptor that sent this C{SUBMIT}
        frame (as L{decode_submit} read it) were in DATA as it did: each is
        about to send another message.
    """
    in_data: int = _SUBMIT_HEADER.unpack_from(payload, 1)[1]
    return in_data


def _alert_to_json(alert: Alert) -> dict[str, Any]:
    return {
        "type": alert.type,
        "message": alert.message,
        "created_at": alert.created_at,
        "list": alert.list,
        "details": dict(alert.details),
    }


def _alert_from_json(data: dict[str, Any]) -> Alert:
    return Alert(
        type=str(data["type"]),
        message=str(data["message"]),
        created_at=float(data["created_at"]),
        list=None if data.get("list") is None else str(data["list"]),
        details=dict(data.get("details") or {}),
    )


# -- the child's side -----------------------------------------------------------


@implementer(IWriteDescriptor)
class PipeWriter:
    """
    Writes to a pipe at once when it has room, and keeps the rest until it
    is writable again, in order.

    Twisted's descriptors write on the reactor's next turn; under load a
    turn takes a while, and each request to the main process (a connection,
    a login turn, a message), and each answer, waited for one before it
    left. This writes it in the turn that made it. Both ends of the channel
    write with it.
    """

    def __init__(
        self, reactor: Any, fd: int, on_broken: Callable[[OSError], object] | None = None
    ) -> None:
        """
        @param reactor: watches the pipe while something waits to be written.
        @param fd: the pipe's write end, made non-blocking; closed with
            L{close}.
        @param on_broken: called once if the pipe breaks (its reader is
            gone); by default a warning is logged.
        """
        os.set_blocking(fd, False)
        self._reactor = reactor
        self._fd = fd
        self._on_broken = on_broken
        self._pending = bytearray()
        self._closed = False
        #: Whether writes are ignored (the pipe broke, or was closed).
        self.broken = False

    def write(self, data: bytes) -> None:
        """
        Write C{data} after whatever waits to be written.
        """
        self.write_sequence([data])

    def write_sequence(self, chunks: Sequence[bytes]) -> None:
        """
        Write C{chunks} one after the other, without joining them first
        when the pipe takes them at once.
        """
        if self.broken:
            return
        if self._pending:
            for chunk in chunks:
                self._pending += chunk
            return
        try:
            written = os.writev(self._fd, chunks)
        except BlockingIOError:
            written = 0
        except OSError as error:
            self._break(error)
            return
        for chunk in chunks:
            if written >= len(chunk):
                written -= len(chunk)
                continue
            self._pending += memoryview(chunk)[written:]
            written = 0
        if self._pending:
            self._reactor.addWriter(self)

    def fileno(self) -> int:
        return self._fd

    def doWrite(self) -> None:
        try:
            written = os.write(self._fd, self._pending)
        except BlockingIOError:
            return
        except OSError as error:
            self._break(error)
            return
        del self._pending[:written]
        if not self._pending:
            self._reactor.removeWriter(self)

    def _break(self, error: OSError) -> None:
        self._stop_writing()
        if self._on_broken is not None:
            self._on_broken(error)
        else:
            # The main process is gone; the end of stdin stops this process.
            log.warn("cannot write to the main process: {error}", error=str(error))

    def _stop_writing(self) -> None:
        # Drop what waits, and ignore later writes.
        self.broken = True
        if self._pending:
            self._pending.clear()
            self._reactor.removeWriter(self)

    def close(self) -> None:
        """
        Stop writing, and close the pipe.
        """
        self._stop_writing()
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def logPrefix(self) -> str:
        return "main-process channel"


@implementer(IMessageQueue, IAlertSink)
class MainLink(Int32StringReceiver):
    """
    The child's end of the channel: it is the sessions' queue, alert sink,
    metrics, connection limiter and auth limiter, each a request to the
    main process (or a notice to it).

    @ivar accepting: whether the main process takes mail, as it last said.
    @ivar on_lost: called once when the main process is gone.
    @ivar on_tls: called with the certificate's and key's PEM bytes and
        file names each time the main process sends them (at start, and
        after each reload).
    """

    def __init__(
        self,
        limits: Limits,
        on_lost: Callable[[], object],
        on_tls: Callable[[bytes, bytes, str, str], object] | None = None,
        out: PipeWriter | None = None,
    ) -> None:
        """
        @param out: where frames to the main process go at once; without it,
            through the transport (on the reactor's next turn).
        """
        self.MAX_LENGTH = frame_limit(limits)
        #: Connections opened and closed since the last heartbeat, for the
        #: main process's metrics (see L{connection_opened}).
        self.opened = 0
        self.closed = 0
        self.out = out
        self.accepting = True
        self.on_lost = on_lost
        self.on_tls = on_tls
        #: Tells how many of this process's sessions are in DATA (sent with
        #: each message: see L{submit_in_data}).
        self.in_data: Callable[[], int] = lambda: 0
        self._seq = 0
        self._waiting: dict[int, Deferred[Any]] = {}
        self._cancelled_turns: dict[int, str] = {}
        self._turn_requests: set[int] = set()
        self._lost = False

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, kind: bytes, value: Any) -> None:
        if not self._lost:
            self.sendString(kind + _json(value))

    def _ask(self, kind: bytes, value: list[Any], seq: int) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if self._lost:
            d.errback(JournalUnavailable("the main process is gone"))
            return d
        self._waiting[seq] = d
        self.sendString(kind + _json(value))
        return d

    # IMessageQueue

    def submit(self, envelope: Envelope, body: bytes) -> Deferred[None]:
        """
        Hand the message to the main process; fires once it is durable.
        """
        seq = self._next()
        d: Deferred[None] = Deferred()
        if self._lost:
            d.errback(JournalUnavailable("the main process is gone"))
            return d
        self._waiting[seq] = d
        head = encode_submit(seq, envelope, b"", self.in_data())
        # The body is written as it is, not copied into one frame string.
        chunks = [struct.pack(">I", len(head) + len(body)), head, body]
        if self.out is not None:
            self.out.write_sequence(chunks)
        else:
            self.transport.writeSequence(chunks)  # type: ignore[union-attr]
        return d

    def sendString(self, string: bytes) -> None:
        if self.out is None:
            super().sendString(string)
        else:
            self.out.write(_frame(string))

    @property
    def in_flight(self) -> int:
        """
        Requests sent and not answered yet.
        """
        return len(self._waiting)

    # IAlertSink

    def raise_alert(self, alert: Alert) -> None:
        """
        Pass the alert to the main process, which stores it.
        """
        self._send(ALERT, _alert_to_json(alert))

    # ConnectionLimiter

    def admit(self, address: str) -> Deferred[Admission]:
        """
        Ask the main process to count a new connection from C{address}.
        """
        seq = self._next()
        return self._ask(CONNECT, [seq, address], seq).addCallback(Admission)

    def release(self, address: str) -> None:
        """
        A connection admitted has ended.
        """
        self._send(DISCONNECT, [address])

    # AuthLimiter

    def blocked(self, address: str) -> bool:
        """
        Not known here: L{begin} answers for a blocked address.
        """
        return False

    def begin(self, address: str) -> Deferred[bool]:
        """
        Ask the main process's tracker for a turn to check a credential.
        """
        seq = self._next()
        d: Deferred[bool] = Deferred(lambda _: self._cancel_turn(seq, address))
        if self._lost:
            d.callback(False)
            return d
        self._waiting[seq] = d
        self._turn_requests.add(seq)
        self.sendString(AUTH_BEGIN + _json([seq, address]))
        return d

    def _cancel_turn(self, seq: int, address: str) -> None:
        self._turn_requests.discard(seq)
        if self._waiting.pop(seq, None) is not None:
            # The answer may already be on its way: a turn given to a
            # cancelled request is given back when it arrives.
            self._cancelled_turns[seq] = address
            self._send(AUTH_CANCEL, [seq])

    def end(self, address: str, *, failed: bool) -> None:
        """
        A turn ended without a wrong credential.
        """
        self._send(AUTH_END, [address])

    def fail(self, address: str) -> Deferred[tuple[bool, int]]:
        """
        A turn found a wrong credential: the main process counts it.

        @return: fires with whether to raise the alert, and the address's
            failures within the window.
        """
        seq = self._next()
        return self._ask(AUTH_FAIL, [seq, address], seq).addCallback(
            lambda answer: (bool(answer[0]), int(answer[1]))
        )

    # SessionMetrics: the main process counts accepted messages (from
    # SUBMIT) itself; connections are told with each heartbeat, in a few
    # numbers instead of a frame each.

    def connection_opened(self) -> None:
        """
        Count a connection for the next heartbeat's answer.
        """
        self.opened += 1

    def connection_closed(self) -> None:
        """
        Count a connection closed for the next heartbeat's answer.
        """
        self.closed += 1

    def accepted(self) -> None:
        """
        Counted by the main process once the message is durable.
        """

    def rejected(self, reason: str) -> None:
        """
        Pass a refusal on to the main process's metrics.
        """
        self._send(REJECTED, [str(reason)])

    def ready(self, ports: int) -> None:
        """
        Tell the main process this child accepts on C{ports} ports.
        """
        self._send(READY, [ports, os.getpid()])

    # the channel

    def stringReceived(self, payload: bytes) -> None:
        kind = payload[:1]
        value = json.loads(payload[1:])
        if kind == ACCEPTING:
            self.accepting = bool(value[0])
            return
        if kind == PING:
            self._send(PONG, [self.opened, self.closed, self.in_data()])
            self.opened = self.closed = 0
            return
        if kind == TLS:
            if self.on_tls is not None:
                cert, key, cert_path, key_path = value
                self.on_tls(
                    cert.encode("latin-1"), key.encode("latin-1"), str(cert_path), str(key_path)
                )
            return
        seq = int(value[0])
        d = self._waiting.pop(seq, None)
        self._turn_requests.discard(seq)
        if d is None:
            address = self._cancelled_turns.pop(seq, None)
            if kind == AUTH_TURN and address is not None and value[1]:
                self._send(AUTH_END, [address])
            return
        if kind == SUBMITTED:
            outcome = value[1]
            # Whether the main process still takes mail, as of this answer
            # (a refused queue id does not make the journal unavailable).
            self.accepting = bool(value[3])
            if outcome == OK:
                d.callback(None)
            elif outcome == UNAVAILABLE:
                d.errback(JournalUnavailable(str(value[2])))
            else:
                d.errback(RuntimeError(f"the main process could not queue it: {value[2]}"))
        elif kind == ADMISSION:
            d.callback(value[1])
        elif kind == AUTH_TURN:
            d.callback(bool(value[1]))
        elif kind == AUTH_COUNTED:
            d.callback((value[1], value[2]))
        else:
            log.error("unknown frame {kind!r} from the main process", kind=kind)

    def lengthLimitExceeded(self, length: int) -> None:
        log.error("frame of {length} bytes from the main process", length=length)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        waiting, self._waiting = self._waiting, {}
        turns, self._turn_requests = self._turn_requests, set()
        for seq, d in waiting.items():
            if seq in turns:
                # No turn will come: the session refuses the login.
                d.callback(False)
            else:
                d.errback(JournalUnavailable("the main process is gone"))
        self.on_lost()


# -- the main process's side ------------------------------------------------------


class _Frames:
    """
    Splits one child's stdout into frames, in time linear in their size.

    (L{Int32StringReceiver} joins what it has buffered with each new read:
    a 25 MB message arriving in 8 KB reads would be copied thousands of
    times, on the main process's reactor.)
    """

    def __init__(
        self, max_length: int, received: Callable[[bytes], None], too_long: Callable[[int], None]
    ) -> None:
        self.max_length = max_length
        self._received = received
        self._too_long = too_long
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._wanted: int | None = None
        self._broken = False

    def dataReceived(self, data: bytes) -> None:
        """
        Take what the child wrote; hand on each complete frame's payload.
        """
        if self._broken:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        while not self._broken:
            if self._wanted is None:
                if self._buffered < 4:
                    return
                self._join()
                (length,) = struct.unpack_from(">I", self._chunks[0])
                if length > self.max_length:
                    self._broken = True
                    self._too_long(length)
                    return
                self._wanted = 4 + length
            if self._buffered < self._wanted:
                return
            whole = self._join()
            payload = whole[4 : self._wanted]
            rest = whole[self._wanted :]
            self._chunks = [rest] if rest else []
            self._buffered = len(rest)
            self._wanted = None
            self._received(payload)

    def _join(self) -> bytes:
        if len(self._chunks) != 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0]


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


class _Child(ProcessProtocol):
    """
    One acceptor process, seen from the main process: its requests are
    answered against the pool's shared state, and what it held is given
    back when it ends.
    """

    def __init__(self, pool: AcceptorPool, index: int, channel: PipeWriter) -> None:
        """
        @param channel: writes to the child's stdin.
        """
        self.pool = pool
        self.index = index
        self.ended = False
        #: Whether it said it accepts (and has not ended since).
        self.ready = False
        #: Whether it ever said so.
        self.was_ready = False
        #: When it last sent anything (a frame, an answer to a ping).
        self.last_heard = pool.clock.seconds()
        self._stderr_chunks: list[bytes] = []
        self._stderr_size = 0
        self.started_at = pool.clock.seconds()
        self.pid: int | None = None
        self._frames = _Frames(frame_limit(pool.limits), self._received, self._frame_too_long)
        self._open: Counter[str] = Counter()
        #: Its connections open, as its heartbeats told the metrics.
        self.connections_open = 0
        #: Its sessions in DATA, as its last message said.
        self.in_data = 0
        self._turns: Counter[str] = Counter()
        self._waiting_turns: dict[int, Deferred[bool]] = {}
        self.ended_deferred: Deferred[None] = Deferred()
        #: Where frames to the child go (its stdin).
        self.channel = channel

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)
        self.send(ACCEPTING + _json([bool(self.pool.queue.accepting)]))
        self.send_tls()

    def send_tls(self) -> None:
        """
        Send the certificate and key in use (the child may not be allowed
        to read their files: the main process read them as root).
        """
        tls = self.pool.tls
        if tls is None:
            # No STARTTLS: the child starts serving without a certificate.
            self.send(TLS + _json(["", "", "", ""]))
            return
        cert, key = tls.pem
        files = [tls.cert_path.path, tls.key_path.path]
        self.send(TLS + _json([cert.decode("latin-1"), key.decode("latin-1"), *files]))

    def send(self, payload: bytes) -> None:
        if not self.ended:
            self.channel.write(_frame(payload))

    def _frame_too_long(self, length: int) -> None:
        log.error("acceptor sent a frame of {length} bytes; stopping it", length=length)
        self.kill()

    def kill(self) -> None:
        if not self.ended and self.transport is not None:
            # ProcessExitedAlready: it is gone.
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess("KILL")

    def signal(self, name: str) -> None:
        if not self.ended and self.transport is not None:
            # ProcessExitedAlready: it is gone.
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess(name)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self.last_heard = self.pool.clock.seconds()
            self._frames.dataReceived(data)
        elif childFD == 2:
            self._stderr_received(data)

    def _stderr_received(self, data: bytes) -> None:
        # In time linear in what arrives, and bounded: a child printing
        # without end of line cannot make the main process hold it all.
        lines = data.split(b"\n")
        for line in lines[:-1]:
            self._stderr_chunks.append(line)
            self._log_line(b"".join(self._stderr_chunks))
            self._stderr_chunks = []
            self._stderr_size = 0
        rest = lines[-1]
        if rest:
            self._stderr_chunks.append(rest)
            self._stderr_size += len(rest)
            if self._stderr_size >= MAX_LOG_LINE:
                self._log_line(b"".join(self._stderr_chunks))
                self._stderr_chunks = []
                self._stderr_size = 0

    def _log_line(self, line: bytes) -> None:
        if not line.strip():
            return
        text = line.decode("utf-8", "replace")
        try:
            event = json.loads(text)
            level = _LEVELS.get(str(event["level"]), LogLevel.info)
            text = str(event["text"])
        except (ValueError, KeyError, TypeError):
            level = LogLevel.warn
        log.emit(level, "acceptor {index}: {text}", index=self.index, text=text)

    # requests

    def _received(self, payload: bytes) -> None:
        kind = payload[:1]
        pool = self.pool
        try:
            if kind == SUBMIT:
                seq, envelope, body = decode_submit(payload)
                self.in_data = submit_in_data(payload)
                pool.submit(envelope, body).addCallbacks(
                    self._submitted,
                    self._not_submitted,
                    callbackArgs=(seq, envelope),
                    errbackArgs=(seq,),
                )
                return
            value = json.loads(payload[1:])
            if kind == CONNECT:
                seq, address = int(value[0]), str(value[1])
                admission = pool.connections.admit(address)
                if admission is Admission.ADMITTED:
                    self._open[address] += 1
                self.send(ADMISSION + _json([seq, admission.value]))
            elif kind == DISCONNECT:
                address = str(value[0])
                if self._open[address] > 0:
                    self._open[address] -= 1
                    if not self._open[address]:
                        del self._open[address]
                    pool.connections.release(address)
            elif kind == AUTH_BEGIN:
                self._auth_begin(int(value[0]), str(value[1]))
            elif kind == AUTH_CANCEL:
                seq = int(value[0])
                waiter = self._waiting_turns.pop(seq, None)
                if waiter is not None:
                    waiter.cancel()
                    # The child keeps the request until it is answered.
                    self.send(AUTH_TURN + _json([seq, False]))
            elif kind == AUTH_END:
                self._end_turn(str(value[0]))
            elif kind == AUTH_FAIL:
                seq, address = int(value[0]), str(value[1])
                if self._turns[address] > 0:
                    self._forget_turn(address)
                    alert, failures = pool.auth.fail(address)
                else:
                    failures = pool.auth.record_failure(address)
                    alert = False
                self.send(AUTH_COUNTED + _json([seq, alert, failures]))
            elif kind == ALERT:
                pool.alerts.raise_alert(_alert_from_json(value))
            elif kind == REJECTED:
                pool.metrics.rejected(str(value[0]))
            elif kind == PONG:
                opened, closed = int(value[0]), int(value[1])
                if opened < 0 or closed < 0:
                    raise ValueError(f"negative connection counts {value!r}")
                metrics = pool.metrics
                for _ in range(opened):
                    metrics.connection_opened()
                for _ in range(closed):
                    metrics.connection_closed()
                self.connections_open += opened - closed
                if len(value) > 2:
                    # Messages said to be coming that never came (sessions
                    # gone in DATA) are forgotten at the next heartbeat.
                    self.in_data = max(int(value[2]), 0)
            elif kind == READY:
                self.ready = True
                self.was_ready = True
                pool.child_ready()
                log.info(
                    "acceptor {index} (pid {pid}) accepting on {ports} ports",
                    index=self.index,
                    pid=value[1],
                    ports=value[0],
                )
            else:
                raise ValueError(f"unknown frame kind {kind!r}")
        except Exception:
            log.failure("acceptor {index} sent a bad frame; stopping it", index=self.index)
            self.kill()

    def _submitted(self, result: object, seq: int, envelope: Envelope) -> None:
        self.pool.metrics.accepted()
        log.info(
            "queued {queue_id} from {username} at {client_ip}",
            queue_id=envelope.queue_id,
            username=envelope.username,
            client_ip=envelope.client_ip,
        )
        self.send(SUBMITTED + _json([seq, OK, "", bool(self.pool.queue.accepting)]))

    def _not_submitted(self, failure: Failure, seq: int) -> None:
        if failure.check(JournalUnavailable):
            accepting = bool(self.pool.queue.accepting)
            self.send(SUBMITTED + _json([seq, UNAVAILABLE, failure.getErrorMessage(), accepting]))
            return
        log.failure("queueing a message from acceptor {index} failed", failure, index=self.index)
        accepting = bool(self.pool.queue.accepting)
        self.send(SUBMITTED + _json([seq, ERROR, failure.getErrorMessage(), accepting]))

    def _auth_begin(self, seq: int, address: str) -> None:
        admission = self.pool.auth.begin(address)
        if isinstance(admission, Deferred):
            self._waiting_turns[seq] = admission
            admission.addCallbacks(
                self._turn_given,
                self._turn_cancelled,
                callbackArgs=(seq, address),
                errbackArgs=(seq,),
            )
            return
        self._turn_given(admission, seq, address)

    def _turn_given(self, admitted: bool, seq: int, address: str) -> None:
        self._waiting_turns.pop(seq, None)
        if admitted:
            self._turns[address] += 1
        if self.ended:
            if admitted:
                self._end_turn(address)
            return
        self.send(AUTH_TURN + _json([seq, admitted]))

    def _turn_cancelled(self, failure: Failure, seq: int) -> None:
        self._waiting_turns.pop(seq, None)
        failure.trap(Exception)

    def _forget_turn(self, address: str) -> None:
        self._turns[address] -= 1
        if self._turns[address] <= 0:
            del self._turns[address]

    def _end_turn(self, address: str) -> None:
        if self._turns[address] > 0:
            self._forget_turn(address)
            self.pool.auth.end(address, failed=False)

    # the end

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.ready = False
        self.channel.close()
        if self._stderr_chunks:
            self._log_line(b"".join(self._stderr_chunks))
            self._stderr_chunks = []
        pool = self.pool
        for address, count in self._open.items():
            for _ in range(count):
                pool.connections.release(address)
        self._open.clear()
        # Its connections ended with it.
        for _ in range(self.connections_open):
            pool.metrics.connection_closed()
        self.connections_open = 0
        for waiter in list(self._waiting_turns.values()):
            waiter.cancel()
        self._waiting_turns.clear()
        for address, count in list(self._turns.items()):
            for _ in range(count):
                pool.auth.end(address, failed=False)
        self._turns.clear()
        pool.child_ended(self, reason)
        self.ended_deferred.callback(None)


class MainProcessAcceptor(Service):
    """
    The main process accepting SMTP connections itself, on the sockets it
    bound for the acceptors: the L{AcceptorPool}'s fallback when no child
    can start. Stop it before the queue (its sessions submit to it).
    """

    def __init__(
        self, reactor: Any, sockets: Callable[[], Sequence[int]], factory: Callable[[], Any]
    ) -> None:
        """
        @param sockets: gives the file descriptors of the listening sockets.
        @param factory: builds the SMTP factory, once, when needed.
        """
        self._reactor = reactor
        self._sockets = sockets
        #: Builds the SMTP factory (called once, when accepting starts).
        self.make_factory = factory
        self._wanted = False
        self.ports: list[Any] = []

    @property
    def serving(self) -> bool:
        """
        Whether this process accepts connections.
        """
        return bool(self.ports)

    def start(self) -> None:
        """
        Accept on every socket (taking turns with any child that comes up
        later): now if the service runs, else once it starts (the pool may
        give up on its children while it starts, before this service).
        """
        self._wanted = True
        if self.running:
            self._listen()

    def startService(self) -> None:
        super().startService()
        if self._wanted:
            self._listen()

    def _listen(self) -> None:
        from smtpgw.listening import accept_taking_turns

        if self.ports:
            return
        factory = self.make_factory()
        try:
            for fd in self._sockets():
                self.ports.append(accept_taking_turns(self._reactor, fd, factory))
        except Exception:
            log.failure("the main process cannot accept SMTP connections")
            for port in self.ports:
                port.stopListening()
            self.ports = []

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        self._wanted = False
        ports, self.ports = self.ports, []
        if not ports:
            return None
        return gatherResults([maybeDeferred(port.stopListening) for port in ports]).addCallback(
            lambda _: None
        )


class AcceptorConfig:
    """
    What a child needs to know to serve like the main process would.
    """

    def __init__(
        self,
        *,
        data_dir: str,
        hostname: str,
        limits: Limits,
        require_tls: bool,
        acceptors: int = 1,
    ) -> None:
        """
        @param acceptors: how many acceptor processes share the sockets.
        """
        self.data_dir = data_dir
        self.hostname = hostname
        self.limits = limits
        self.require_tls = require_tls
        self.acceptors = acceptors

    def to_json(self) -> str:
        """
        The configuration as the child reads it from its argument.
        """
        return json.dumps(
            {
                "data_dir": self.data_dir,
                "hostname": self.hostname,
                "limits": asdict(self.limits),
                "require_tls": self.require_tls,
                "acceptors": self.acceptors,
            }
        )

    @property
    def alone(self) -> bool:
        """
        Whether one acceptor accepts every connection: it keeps the
        connection and login limits itself.
        """
        return self.acceptors == 1

    @classmethod
    def from_json(cls, text: str) -> AcceptorConfig:
        """
        Read what L{to_json} wrote.
        """
        data = json.loads(text)
        return cls(
            data_dir=data["data_dir"],
            hostname=data["hostname"],
            limits=Limits(**data["limits"]),
            require_tls=bool(data["require_tls"]),
            acceptors=int(data.get("acceptors", 1)),
        )


class AcceptorPool(Service):
    """
    Starts, watches and stops the acceptor processes.

    Start it after the queue (messages go to it) and after the listener
    that bound the ports (their sockets are handed down); it stops before
    both.
    """

    def __init__(
        self,
        *,
        reactor: Any,
        count: int,
        config: AcceptorConfig,
        sockets: Callable[[], Sequence[int]],
        queue: IMessageQueue,
        connections: ConnectionCounter,
        auth: AuthFailureTracker,
        alerts: IAlertSink,
        metrics: SessionMetrics,
        tls: Any = None,
        argv: Sequence[str] | None = None,
        fallback: Callable[[], object] | None = None,
    ) -> None:
        """
        @param count: how many acceptor processes.
        @param sockets: gives the file descriptors of the listening sockets.
        @param queue: where the children's messages go.
        @param connections: the connection counts of every child.
        @param auth: the failed logins of every child.
        @param alerts: where the children's alerts go.
        @param metrics: where connections, messages and refusals are counted.
        @param tls: the L{smtpgw.tls.ReloadableTLS} whose certificate and
            key (C{pem}) the children get; none (no STARTTLS) when L{None}.
        @param argv: the child's command line (tests); by default the
            Python named by C{SMTPGW_ACCEPTOR_PYTHON}, or else this one,
            running L{smtpgw.acceptor_main}.
        @param fallback: called once if L{FALLBACK_AFTER} starts in a row
            fail before their child accepts, with none accepting: it makes
            the main process accept SMTP connections itself, so that the
            gateway serves (slower) rather than not at all. The children
            are still started again, with their back-off.
        """
        self.reactor = reactor
        self.clock = reactor
        self.count = count
        self.config = config
        self.limits = config.limits
        self._sockets = sockets
        self.queue = queue
        self.connections = connections
        self.auth = auth
        self.alerts = alerts
        self.metrics = metrics
        self.tls = tls
        python = os.environ.get("SMTPGW_ACCEPTOR_PYTHON") or sys.executable
        default = [python, "-m", "smtpgw.acceptor_main"]
        self._argv = list(argv) if argv is not None else default
        self.children: dict[int, _Child] = {}
        self._fallback = fallback
        #: Whether the fallback was called.
        self.fell_back = False
        # Per acceptor index, its starts in a row that failed.
        self._failed_starts: Counter[int] = Counter()
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._accepting = True
        self._poll: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        self._accepting = bool(self.queue.accepting)
        for index in range(self.count):
            self._spawn(index)
        self._poll = self.clock.callLater(ACCEPTING_POLL, self._check_accepting)

    def submit(self, envelope: Envelope, body: bytes) -> Deferred[None]:
        """
        Queue a child's message.
        """
        return self.queue.submit(envelope, body)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        fds = list(self._sockets())
        env = dict(os.environ)
        env["SMTPGW_ACCEPTOR_PARENT"] = str(os.getpid())
        env["SMTPGW_ACCEPTOR_INDEX"] = str(index)
        env["SMTPGW_ACCEPTOR_FDS"] = str(len(fds))
        stdin: int | None = None
        child: _Child | None = None
        try:
            # The child's stdin is a pipe made here, written with a
            # PipeWriter (answers leave in the turn that made them).
            stdin, channel = os.pipe()
            child = _Child(
                self, index, PipeWriter(self.reactor, channel, on_broken=lambda error: None)
            )
            child_fds: dict[int, int | str] = {0: stdin, 1: "r", 2: "r"}
            for offset, fd in enumerate(fds):
                child_fds[3 + offset] = fd
            self.reactor.spawnProcess(
                child,
                self._argv[0],
                [*self._argv, self.config.to_json()],
                env=env,
                childFDs=child_fds,
            )
        except Exception:
            # Out of processes, memory or file descriptors: try again later.
            log.failure("cannot start acceptor {index}", index=index)
            if child is not None:
                child.channel.close()
            if self.running:
                self._restart_later(index, self.clock.seconds())
                self._start_failed(index)
            return
        finally:
            if stdin is not None:
                os.close(stdin)
        self.children[index] = child

    def child_ended(self, child: _Child, reason: Failure) -> None:
        """
        A child exited: start another unless stopping.
        """
        if self.children.get(child.index) is child:
            del self.children[child.index]
        if not self.running:
            return
        delay = self._restart_later(child.index, child.started_at)
        log.warn(
            "acceptor {index} (pid {pid}) ended: {why}; starting another in {delay:g} s",
            index=child.index,
            pid=child.pid,
            why=reason.getErrorMessage(),
            delay=delay,
        )
        if not child.was_ready:
            self._start_failed(child.index)

    def child_ready(self) -> None:
        """
        A child accepts connections: the starts that failed before it no
        longer count, for any acceptor (what failed them is over).
        """
        self._failed_starts.clear()

    def _start_failed(self, index: int) -> None:
        self._failed_starts[index] += 1
        failed = self._failed_starts[index]
        if self._fallback is None or self.fell_back or failed < FALLBACK_AFTER or self.ready:
            return
        self.fell_back = True
        log.warn(
            "no acceptor process could start (acceptor {index}: {failed} tries in a row,"
            " see above): the main process accepts SMTP connections itself",
            index=index,
            failed=failed,
        )
        try:
            self._fallback()
        except Exception:
            log.failure("the fallback for the acceptors failed")

    def _restart_later(self, index: int, started_at: float) -> float:
        """
        Start acceptor C{index} again after its back-off delay.

        @param started_at: when the one that ended (or failed to) started.
        @return: the delay.
        """
        lived = self.clock.seconds() - started_at
        delay = self._delays.get(index, RESTART_DELAY)
        if lived >= HEALTHY_AFTER:
            delay = RESTART_DELAY
        self._delays[index] = min(delay * 2, RESTART_DELAY_MAX)
        self._restarts[index] = self.clock.callLater(delay, self._spawn, index)
        return delay

    def _check_accepting(self) -> None:
        self._poll = self.clock.callLater(ACCEPTING_POLL, self._check_accepting)
        for child in self.children.values():
            child.send(PING + _json([0]))
        accepting = bool(self.queue.accepting)
        if accepting != self._accepting:
            self._accepting = accepting
            for child in self.children.values():
                child.send(ACCEPTING + _json([accepting]))

    def _flush_alerts(self) -> None:
        # Store the summaries of repeated sender alerts held back.
        flush = getattr(self.alerts, "flush", None)
        if flush is not None:
            flush()

    def in_data(self) -> int:
        """
        How many of the children's sessions are in DATA, each about to send
        a message, as the children's last messages said.
        """
        # Also read on the journal's writer thread: a copy made at once.
        return sum(child.in_data for child in tuple(self.children.values()))

    @property
    def ready(self) -> int:
        """
        How many children accept connections now (for the health check):
        they said they accept, and were heard from lately.
        """
        since = self.clock.seconds() - HEARTBEAT_TIMEOUT
        return sum(
            1 for child in self.children.values() if child.ready and child.last_heard >= since
        )

    def send_tls(self) -> None:
        """
        Send every child the certificate and key now in use (after a
        reload).
        """
        for child in self.children.values():
            child.send_tls()

    def stopService(self) -> Deferred[None]:
        """
        Ask every child to stop (they stop accepting, wait for the answers
        to their messages, then exit); kill those still there after
        L{KILL_AFTER}.
        """
        super().stopService()
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        self._poll = None
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        children = list(self.children.values())
        if not children:
            self._flush_alerts()
            return succeed(None)
        for child in children:
            child.signal("TERM")

        def kill_all() -> None:
            for child in children:
                child.kill()

        killer = self.clock.callLater(KILL_AFTER, kill_all)
        done = DeferredList([child.ended_deferred for child in children])

        def finished(_: object) -> None:
            if killer.active():
                killer.cancel()
            self._flush_alerts()

        return done.addCallback(finished)
