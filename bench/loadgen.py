"""
A small, fast SMTP load generator.

It speaks just enough SMTP, by hand, on non-blocking sockets and a bare epoll
loop: EHLO, optional STARTTLS (TLS through memory BIOs), C{AUTH PLAIN} with an
initial response (one round trip), then C{MAIL}, C{RCPT} and C{DATA} in one
write when the server advertises C{PIPELINING}, the pre-built dot-stuffed
message, and C{QUIT} in the same write when it is the connection's last. An
asyncio version of the same client used about three times as much CPU per
message (mostly in extra system calls); on a 2-core machine every
microsecond the generator spends is taken from the server it measures.
Its ceiling is measured against Postfix's C{smtp-sink}.

Every run is bounded: a fixed number of messages (or handshakes) and a
wall-clock cap; it only connects to the host it is given (the harness gives
127.0.0.1).

    python -m bench.loadgen --port 2525 --messages 10000 --sessions 20 \\
        --per-session 1 --user U --password P [--starttls] [--workers 2]
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import multiprocessing
import multiprocessing.connection
import select
import socket
import ssl
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

from attrs import evolve, field, frozen

#: A reply's lines, without their CRLF.
Reply = list[bytes]
_Handler = Callable[[Reply], None]

#: The fixed date of every generated message, so that a message depends only
#: on its sequence number.
_DATE = "Thu, 01 Jan 2026 00:00:00 +0000"


@frozen
class LoadSpec:
    """
    What one load run does.

    @ivar port: the server's TCP port.
    @ivar messages: how many messages to send, or how many handshakes to make
        when C{handshake_only}.
    @ivar sessions: how many SMTP sessions run at once.
    @ivar per_session: messages per connection; C{0} keeps each connection
        until no message is left.
    @ivar size: the size of each message in bytes, before dot-stuffing.
    @ivar host: the server's address (loopback only in this project).
    @ivar starttls: upgrade each connection with STARTTLS before AUTH.
    @ivar username: the AUTH PLAIN user, or L{None} to send no AUTH.
    @ivar password: the AUTH PLAIN password.
    @ivar sender: the envelope sender and header C{From:}.
    @ivar recipient: the one envelope recipient and header C{To:}.
    @ivar pipelining: group MAIL, RCPT and DATA in one write when the server
        advertises PIPELINING.
    @ivar handshake_only: connect, EHLO, (STARTTLS, EHLO,) AUTH, QUIT: count
        handshakes, send no mail.
    @ivar time_limit: the wall-clock cap of the run, in seconds; what is not
        done by then counts as failed.
    @ivar first_seq: the sequence number of the first message.
    @ivar tag: a word put in each message's subject and Message-ID.
    """

    port: int
    messages: int
    sessions: int = 20
    per_session: int = 1
    size: int = 5 * 1024
    host: str = "127.0.0.1"
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sender: str = "bench@example.com"
    recipient: str = "sink@example.net"
    pipelining: bool = True
    handshake_only: bool = False
    time_limit: float = 120.0
    first_seq: int = 0
    tag: str = "bench"


@frozen
class LoadResult:
    """
    What a load run measured.

    @ivar accepted: messages the server accepted (C{250} after the final
        dot), or handshakes completed.
    @ivar failed: messages or handshakes not completed (errors, time cap).
    @ivar started: C{time.monotonic()} when the run started (system-wide
        clock, comparable between processes).
    @ivar finished: C{time.monotonic()} when the last unit finished.
    @ivar cpu_seconds: CPU time the generator used (all its workers).
    @ivar connections: connections opened.
    @ivar errors: counts of error descriptions.
    @ivar latencies: seconds from MAIL to the final C{250} per accepted
        message (from connect to AUTH's reply per handshake).
    @ivar timed_out: whether the wall-clock cap ended the run.
    @ivar workers: how many generator processes took part.
    @ivar tls: the TLS version and cipher the first STARTTLS negotiated.
    """

    accepted: int
    failed: int
    started: float
    finished: float
    cpu_seconds: float
    connections: int
    errors: dict[str, int]
    latencies: tuple[float, ...] = field(repr=False)
    timed_out: bool
    workers: int = 1
    tls: str | None = None

    @property
    def elapsed(self) -> float:
        """
        @return: the run's wall-clock duration in seconds.
        """
        return max(self.finished - self.started, 1e-9)

    @property
    def rate(self) -> float:
        """
        @return: accepted units per second over the whole run.
        """
        return self.accepted / self.elapsed

    def percentile(self, fraction: float) -> float | None:
        """
        @param fraction: between 0 and 1, e.g. C{0.99}.
        @return: that latency percentile in seconds, or L{None} without data.
        """
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
        return ordered[index]

    def summary(self) -> dict[str, Any]:
        """
        @return: a JSON-ready summary (no per-message latencies).
        """
        p50 = self.percentile(0.5)
        p99 = self.percentile(0.99)
        return {
            "accepted": self.accepted,
            "failed": self.failed,
            "elapsed_s": round(self.elapsed, 3),
            "rate_per_s": round(self.rate, 1),
            "latency_p50_ms": None if p50 is None else round(p50 * 1000, 2),
            "latency_p99_ms": None if p99 is None else round(p99 * 1000, 2),
            "loadgen_cpu_s": round(self.cpu_seconds, 3),
            "connections": self.connections,
            "errors": dict(self.errors),
            "timed_out": self.timed_out,
            "workers": self.workers,
            "tls": self.tls,
        }


def merge(results: Sequence[LoadResult]) -> LoadResult:
    """
    Combine the results of workers that ran side by side.

    @param results: one result per worker.
    @return: their sum, spanning from the first start to the last finish.
    """
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    for result in results:
        errors.update(result.errors)
        latencies.extend(result.latencies)
    return LoadResult(
        accepted=sum(r.accepted for r in results),
        failed=sum(r.failed for r in results),
        started=min(r.started for r in results),
        finished=max(r.finished for r in results),
        cpu_seconds=sum(r.cpu_seconds for r in results),
        connections=sum(r.connections for r in results),
        errors=dict(errors),
        latencies=tuple(latencies),
        timed_out=any(r.timed_out for r in results),
        workers=sum(r.workers for r in results),
        tls=next((r.tls for r in results if r.tls), None),
    )


def _message_head(seq: int, sender: str, recipient: str, tag: str) -> bytes:
    return (
        f"From: <{sender}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: {tag} message {seq:010d}\r\n"
        f"Message-ID: <{seq:010d}.{tag}@bench.invalid>\r\n"
        f"Date: {_DATE}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")


def _filler(length: int) -> bytes:
    """
    A body of exactly C{length} bytes of CRLF-terminated lines; its second line
    starts with a dot, so that dot-stuffing is always exercised.
    """
    out = bytearray()
    number = 0
    while length - len(out) >= 80:
        if number == 1:
            line = b".a line that starts with a dot, which must arrive with one dot"
        else:
            line = b"line %05d " % number + b"abcdefghijklmnopqrstuvwxyz" * 2
        out += line + b"\r\n"
        number += 1
    left = length - len(out)
    if left >= 2:
        out += b"z" * (left - 2) + b"\r\n"
    return bytes(out)


def build_message(
    seq: int,
    size: int = 5 * 1024,
    sender: str = "bench@example.com",
    recipient: str = "sink@example.net",
    tag: str = "bench",
) -> bytes:
    """
    The message with sequence number C{seq}, as a server should store it.

    @param seq: the sequence number (put in Subject and Message-ID).
    @param size: the wanted size in bytes; never less than the headers.
    @param sender: the header From address.
    @param recipient: the header To address.
    @param tag: a word put in the Subject and Message-ID.
    @return: CRLF-terminated lines, not dot-stuffed.
    """
    head = _message_head(seq, sender, recipient, tag)
    return head + _filler(size - len(head))


def dot_stuff(message: bytes) -> bytes:
    """
    @param message: CRLF-terminated lines.
    @return: the DATA payload: each line starting with a dot gets one more,
        followed by the terminating C{.CRLF}.
    """
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def _client_tls_context() -> ssl.SSLContext:
    # The servers measured use self-signed certificates: encrypt, don't verify.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _Run:
    """
    One worker's run: the units left, the counters, the sessions, and the
    epoll loop that drives them.
    """

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        host = "127.0.0.1" if spec.host == "localhost" else spec.host
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address = (host, spec.port)
        self.poller = select.epoll()
        self.sessions: dict[int, _Session] = {}
        self.remaining = spec.messages
        self.next_seq = spec.first_seq
        self.accepted = 0
        self.failed = 0
        self.connections = 0
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.done = False
        self.filling = False
        self.negotiated: str | None = None
        self.timed_out = False
        self.finished = 0.0
        self.tls = _client_tls_context() if spec.starttls else None
        self.rest = dot_stuff(
            _filler(spec.size - len(_message_head(0, spec.sender, spec.recipient, spec.tag)))
        )
        self.commands = (
            b"MAIL FROM:<%s>\r\n" % spec.sender.encode(),
            b"RCPT TO:<%s>\r\n" % spec.recipient.encode(),
            b"DATA\r\n",
        )
        self.auth: bytes | None = None
        if spec.username is not None:
            token = b"\0%s\0%s" % (spec.username.encode(), (spec.password or "").encode())
            self.auth = b"AUTH PLAIN " + base64.b64encode(token) + b"\r\n"

    def payload(self, seq: int) -> bytes:
        spec = self.spec
        return _message_head(seq, spec.sender, spec.recipient, spec.tag) + self.rest

    def claim(self) -> int | None:
        if self.remaining <= 0 or self.done:
            return None
        self.remaining -= 1
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def fill(self) -> None:
        # A connection refused at once ends inside connect() and asks to
        # fill again: loop here instead of recursing once per message.
        if self.filling:
            return
        self.filling = True
        try:
            while len(self.sessions) < self.spec.sessions and not self.done:
                seq = self.claim()
                if seq is None:
                    break
                self.connections += 1
                _Session(self, seq).connect()
        finally:
            self.filling = False

    def check_done(self) -> None:
        if self.accepted + self.failed >= self.spec.messages and not self.done:
            self.finished = time.monotonic()
            self.done = True

    def run(self) -> None:
        deadline = time.monotonic() + self.spec.time_limit
        poll = self.poller.poll
        sessions = self.sessions
        self.fill()
        self.check_done()
        try:
            while not self.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.time_up()
                    break
                for fd, events in poll(min(left, 1.0)):
                    session = sessions.get(fd)
                    if session is None:
                        continue
                    if events & _WRITABLE:
                        session.flush()
                    if events & _READABLE:
                        session.readable()
        finally:
            for session in list(sessions.values()):
                session.end(None)
            self.poller.close()

    def time_up(self) -> None:
        self.timed_out = True
        self.finished = time.monotonic()
        self.failed = self.spec.messages - self.accepted
        self.done = True


_READABLE = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITABLE = select.EPOLLOUT


class _Session:
    """
    One SMTP client connection on a non-blocking socket, driven by the
    server's replies: each command sent pushes the reply it expects and what
    to do on it. With STARTTLS, TLS runs through memory BIOs on the same
    socket.
    """

    __slots__ = (
        "buffer",
        "expect",
        "extensions",
        "fd",
        "finished",
        "incoming",
        "lines",
        "outgoing",
        "pending",
        "run",
        "sent",
        "seq",
        "sock",
        "spec",
        "started",
        "switched",
        "tls",
        "tls_ready",
    )

    def __init__(self, run: _Run, seq: int) -> None:
        self.run = run
        self.spec = run.spec
        self.sock = socket.socket(run.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.fd = self.sock.fileno()
        self.buffer = b""
        self.lines: Reply = []
        # (the reply code, or its first digits, expected; the stage; what next)
        self.expect: deque[tuple[bytes, str, _Handler | None]] = deque()
        self.extensions: set[bytes] = set()
        self.pending = b""
        self.tls: ssl.SSLObject | None = None
        self.tls_ready = False
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.switched = False
        self.sent = 0
        # The unit this session is working on; it counts as failed if the
        # connection ends before it is done.
        self.seq: int | None = seq
        self.started = time.perf_counter()
        self.finished = False

    # The socket

    def connect(self) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        status = self.sock.connect_ex(self.run.address)
        if status not in (0, errno.EINPROGRESS):
            self.end(f"connect: {errno.errorcode.get(status, status)}")
            return
        self.run.sessions[self.fd] = self
        self.run.poller.register(self.fd, select.EPOLLIN)
        self.expect.append((b"220", "greeting", self.greeted))

    def end(self, error: str | None) -> None:
        """
        Close the connection; count the unit in hand as failed; let another
        session start.
        """
        if self.finished:
            return
        self.finished = True
        run = self.run
        if error is not None:
            run.errors[error] += 1
        run.sessions.pop(self.fd, None)
        self.sock.close()
        if self.seq is not None and not run.done:
            run.failed += 1
            self.seq = None
            run.check_done()
        if not run.done:
            run.fill()

    def lost(self, error: OSError | None) -> None:
        if self.finished:
            return
        stage = self.expect[0][1] if self.expect else "idle"
        if isinstance(error, ConnectionRefusedError) and stage == "greeting":
            self.end("connect: ConnectionRefusedError")
        elif self.seq is not None:
            self.end(f"{stage}: connection lost")
        else:
            self.end(None)

    def send_raw(self, data: bytes) -> None:
        if self.pending:
            self.pending += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self.lost(error)
            return
        if sent < len(data):
            self.pending = data[sent:]
            self.run.poller.modify(self.fd, select.EPOLLIN | select.EPOLLOUT)

    def flush(self) -> None:
        data, self.pending = self.pending, b""
        if not data:
            return
        self.run.poller.modify(self.fd, select.EPOLLIN)
        self.send_raw(data)

    def write(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
            data = self.outgoing.read()
        self.send_raw(data)

    def readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as error:
            self.lost(error)
            return
        if not data:
            self.lost(None)
            return
        if self.tls is not None:
            self.incoming.write(data)
            if not self.tls_ready:
                self.handshake()
                return
            data = self.decrypt()
            if not data:
                return
        self.data_received(data)

    def decrypt(self) -> bytes:
        assert self.tls is not None
        chunks = []
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLError, OSError) as error:
                self.fail("tls", [repr(error).encode()])
                return b""
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def handshake(self) -> None:
        assert self.tls is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.send_raw(self.outgoing.read())
            return
        except (ssl.SSLError, OSError) as error:
            self.fail("tls", [f"handshake failed: {error!r}".encode()])
            return
        self.send_raw(self.outgoing.read())
        self.tls_ready = True
        if self.run.negotiated is None:
            cipher = self.tls.cipher()
            self.run.negotiated = f"{self.tls.version()} {cipher[0] if cipher else ''}".strip()
        self.expect.popleft()  # the handshake's placeholder, for error reports
        self.greeted([])

    # SMTP

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        start = 0
        while not self.finished:
            end = buffer.find(b"\r\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 2
            self.lines.append(line)
            if line[3:4] != b"-":
                lines, self.lines = self.lines, []
                self.reply(lines)
                if self.switched:
                    # Whatever followed the 220 in clear text is not ours to read.
                    self.switched = False
                    self.buffer = b""
                    return
        self.buffer = buffer[start:]

    def reply(self, lines: Reply) -> None:
        if not self.expect:
            self.fail("unexpected", lines)
            return
        want, stage, handler = self.expect.popleft()
        if not lines[-1].startswith(want):
            self.fail(stage, lines)
        elif handler is not None:
            handler(lines)

    def fail(self, stage: str, lines: Reply) -> None:
        text = lines[-1][:60].decode("ascii", "replace") if lines else ""
        self.end(f"{stage}: {text}")

    def greeted(self, lines: Reply) -> None:
        self.write(b"EHLO loadgen.bench.invalid\r\n")
        self.expect.append((b"250", "ehlo", self.ehlo))

    def ehlo(self, lines: Reply) -> None:
        self.extensions = {line[4:].split(b" ", 1)[0].upper() for line in lines[1:]}
        if self.run.tls is not None and self.tls is None:
            if b"STARTTLS" not in self.extensions:
                self.fail("starttls", [b"STARTTLS not offered"])
                return
            self.write(b"STARTTLS\r\n")
            self.expect.append((b"220", "starttls", self.upgrade))
        elif self.run.auth is not None:
            self.write(self.run.auth)
            # 235 by the RFC; smtp-sink answers 250.
            self.expect.append((b"2", "auth", self.authenticated))
        else:
            self.next()

    def upgrade(self, lines: Reply) -> None:
        assert self.run.tls is not None
        self.tls = self.run.tls.wrap_bio(self.incoming, self.outgoing)
        self.switched = True
        # Names the stage if the connection drops during the handshake.
        self.expect.append((b"", "tls", None))
        self.handshake()

    def authenticated(self, lines: Reply) -> None:
        self.next()

    def next(self) -> None:
        run = self.run
        if self.spec.handshake_only:
            if self.seq is not None:
                self.done()
            self.quit()
            return
        if self.seq is None:
            per_session = self.spec.per_session
            if per_session and self.sent >= per_session:
                self.quit()
                return
            self.seq = run.claim()
            if self.seq is None:
                self.quit()
                return
        self.started = time.perf_counter()
        mail, rcpt, data = run.commands
        if self.spec.pipelining and b"PIPELINING" in self.extensions:
            self.write(mail + rcpt + data)
            self.expect.append((b"250", "mail", None))
            self.expect.append((b"250", "rcpt", None))
            self.expect.append((b"354", "data", self.send_message))
        else:
            self.write(mail)
            self.expect.append((b"250", "mail", self.send_rcpt))

    def send_rcpt(self, lines: Reply) -> None:
        self.write(self.run.commands[1])
        self.expect.append((b"250", "rcpt", self.send_data))

    def send_data(self, lines: Reply) -> None:
        self.write(self.run.commands[2])
        self.expect.append((b"354", "data", self.send_message))

    def send_message(self, lines: Reply) -> None:
        assert self.seq is not None
        payload = self.run.payload(self.seq)
        if self.last_message() and b"PIPELINING" in self.extensions and self.spec.pipelining:
            # QUIT may end a pipelined group (RFC 2920): one write and one
            # round trip fewer per connection.
            self.write(payload + b"QUIT\r\n")
            self.expect.append((b"250", "message", self.accepted_last))
            self.expect.append((b"221", "quit", self.close))
        else:
            self.write(payload)
            self.expect.append((b"250", "message", self.accepted))

    def last_message(self) -> bool:
        per_session = self.spec.per_session
        return bool(per_session and self.sent + 1 >= per_session) or self.run.remaining <= 0

    def accepted_last(self, lines: Reply) -> None:
        self.sent += 1
        self.done()

    def accepted(self, lines: Reply) -> None:
        self.sent += 1
        self.done()
        self.next()

    def done(self) -> None:
        run = self.run
        run.latencies.append(time.perf_counter() - self.started)
        run.accepted += 1
        self.seq = None
        run.check_done()

    def quit(self) -> None:
        self.write(b"QUIT\r\n")
        self.expect.append((b"221", "quit", self.close))

    def close(self, lines: Reply) -> None:
        self.end(None)


def run_here(spec: LoadSpec, ready: Callable[[], None] | None = None) -> LoadResult:
    """
    Run the load in this thread, on an epoll loop of its own.

    @param spec: what to send.
    @param ready: called once everything is built, just before the clock
        starts.
    @return: what was measured; its CPU time is this thread's.
    """
    run = _Run(spec)
    if ready is not None:
        ready()
    started = time.monotonic()
    cpu = time.thread_time()
    run.run()
    cpu = time.thread_time() - cpu
    return LoadResult(
        accepted=run.accepted,
        failed=run.failed,
        started=started,
        finished=run.finished or time.monotonic(),
        cpu_seconds=cpu,
        connections=run.connections,
        errors=dict(run.errors),
        latencies=tuple(run.latencies),
        timed_out=run.timed_out,
        tls=run.negotiated,
    )


def split(spec: LoadSpec, workers: int) -> list[LoadSpec]:
    """
    Share a run between workers: messages and sessions split as evenly as
    possible, sequence numbers kept apart.

    @param spec: the whole run.
    @param workers: how many workers.
    @return: one spec per worker (fewer when there are fewer sessions).
    """
    workers = max(1, min(workers, spec.sessions, max(spec.messages, 1)))
    specs = []
    first = spec.first_seq
    for index in range(workers):
        messages = spec.messages // workers + (index < spec.messages % workers)
        sessions = spec.sessions // workers + (index < spec.sessions % workers)
        specs.append(evolve(spec, messages=messages, sessions=sessions, first_seq=first))
        first += messages
    return specs


def _worker(
    spec: LoadSpec,
    barrier: Any,
    results: multiprocessing.connection.Connection,
) -> None:
    result = run_here(spec, ready=barrier.wait)
    results.send(result)
    results.close()


def run_load(
    spec: LoadSpec, workers: int = 1, started: Callable[[], None] | None = None
) -> LoadResult:
    """
    Run the load in C{workers} separate processes that start together.

    @param spec: the whole run.
    @param workers: how many generator processes (each with its own share
        of sessions and messages).
    @param started: called when the workers are ready and start sending
        (after their interpreters started), e.g. to read CPU counters.
    @return: the merged result.
    """
    specs = split(spec, workers)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(specs) + 1, timeout=120)
    pipes = []
    processes = []
    for part in specs:
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_worker, args=(part, barrier, sender), daemon=True)
        process.start()
        sender.close()
        pipes.append(receiver)
        processes.append(process)
    results = []
    try:
        barrier.wait()
        if started is not None:
            started()
        deadline = time.monotonic() + spec.time_limit + 60
        for receiver in pipes:
            if not receiver.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("load generator worker did not report in time")
            results.append(receiver.recv())
    finally:
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
    return merge(results)


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run one load against a server and print the result as JSON.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--per-session", type=int, default=1, help="0: reuse to the end")
    parser.add_argument("--size", type=int, default=5 * 1024)
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--starttls", action="store_true")
    parser.add_argument("--no-pipelining", action="store_true")
    parser.add_argument("--handshakes", action="store_true", help="count AUTH handshakes")
    parser.add_argument("--sender", default="bench@example.com")
    parser.add_argument("--recipient", default="sink@example.net")
    parser.add_argument("--time-limit", type=float, default=120.0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("the load generator only targets loopback")
    spec = LoadSpec(
        host=args.host,
        port=args.port,
        messages=args.messages,
        sessions=args.sessions,
        per_session=args.per_session,
        size=args.size,
        username=args.user,
        password=args.password,
        starttls=args.starttls,
        pipelining=not args.no_pipelining,
        handshake_only=args.handshakes,
        sender=args.sender,
        recipient=args.recipient,
        time_limit=args.time_limit,
    )
    result = run_load(spec, args.workers)
    json.dump(result.summary(), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
