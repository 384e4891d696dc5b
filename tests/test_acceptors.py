"""
L{smtpgw.acceptors} in memory: the SUBMIT codec, a child's L{MainLink} joined
to the main process's L{_Child} by passing the frames each writes to the
other, and L{AcceptorPool} starting, restarting and stopping children on a
fake reactor. No process is started.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import attrs
import pytest
from attrs import define, field
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from smtpgw.abuse import Admission, AuthFailureTracker, ConnectionCounter
from smtpgw.acceptors import (
    FALLBACK_AFTER,
    READY,
    RESTART_DELAY,
    RESTART_DELAY_MAX,
    SUBMIT,
    AcceptorConfig,
    AcceptorPool,
    MainLink,
    MainProcessAcceptor,
    PipeWriter,
    _Child,
    _Frames,
    decode_submit,
    encode_submit,
    frame_limit,
    submit_in_data,
)
from smtpgw.interfaces import Alert, IAlertSink, IMessageQueue, JournalUnavailable
from smtpgw.journal import QueueIdInUse
from smtpgw.limits import Limits
from smtpgw.model import Envelope, Priority
from tests.twisted_support import async_test, waiting_connections

T = TypeVar("T")

ARGV = ["/usr/bin/python3", "-m", "smtpgw.acceptor_main"]
SOCKETS = [7, 9]
#: The smallest message size Limits allows: frames stay small.
MAX_SIZE = 1024
IP = "192.0.2.1"
# The timings the pool promises, written out rather than imported so that a
# changed constant fails here.
ACCEPTING_POLL = 0.25
KILL_AFTER = 10.0
HEALTHY_AFTER = 60.0
OTHER_IP = "192.0.2.2"


# -- fakes --------------------------------------------------------------------


@implementer(IMessageQueue)
@define
class FakeQueue:
    """
    The main process's queue: each C{submit} answers when the test fires
    its L{Deferred}.
    """

    accepting: bool = True
    submitted: list[tuple[Envelope, bytes, Deferred[None]]] = field(factory=list)

    def submit(self, envelope: Envelope, body: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.submitted.append((envelope, body, d))
        return d


@implementer(IAlertSink)
@define
class FlushingSink:
    """
    The main process's alert sink, with the C{flush} the pool calls when
    it has stopped.
    """

    alerts: list[Alert] = field(factory=list)
    flushes: int = 0

    def raise_alert(self, alert: Alert) -> None:
        self.alerts.append(alert)

    def flush(self) -> None:
        self.flushes += 1


@define
class FakeMetrics:
    """
    The main process's L{smtpgw.metrics.SessionMetrics}, counting calls.
    """

    opened: int = 0
    closed: int = 0
    accepted_count: int = 0
    rejections: list[str] = field(factory=list)

    def connection_opened(self) -> None:
        self.opened += 1

    def connection_closed(self) -> None:
        self.closed += 1

    def accepted(self) -> None:
        self.accepted_count += 1

    def rejected(self, reason: str) -> None:
        self.rejections.append(reason)


#: The stdin pipes of the fake children, closed after each test.
_STDINS: list[int] = []


@pytest.fixture(autouse=True)
def _close_fake_stdins() -> Iterator[None]:
    yield
    while _STDINS:
        os.close(_STDINS.pop())


class FakeProcess:
    """
    The process transport of one spawned child: holds the read end of its
    stdin (as the child would), and records the signals it is sent.
    """

    def __init__(self, pid: int, stdin: int | str) -> None:
        self.pid = pid
        self.stdin: int | None = None
        if isinstance(stdin, int):
            self.stdin = os.dup(stdin)
            os.set_blocking(self.stdin, False)
            _STDINS.append(self.stdin)
        self.signals: list[str] = []
        self.exited = False

    def write(self, data: bytes) -> None:
        raise AssertionError("the main process writes to the child's stdin pipe")

    def take(self) -> bytes:
        """
        What the main process wrote to the child's stdin since last taken.
        """
        assert self.stdin is not None
        return drain(self.stdin)

    def signalProcess(self, name: str) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)


@define
class Spawned:
    """
    One call of L{FakeReactor.spawnProcess}.
    """

    protocol: _Child
    executable: str
    args: list[str]
    env: dict[str, str]
    child_fds: dict[int, int | str]
    process: FakeProcess


class FakeReactor(Clock):
    """
    A clock whose C{spawnProcess} records the call and connects the
    protocol to a L{FakeProcess}, as Twisted's does to the real process.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Spawned] = []

    def spawnProcess(
        self,
        protocol: _Child,
        executable: str,
        args: list[str],
        env: dict[str, str],
        childFDs: dict[int, int | str],
    ) -> FakeProcess:
        process = FakeProcess(pid=1000 + len(self.spawned), stdin=childFDs[0])
        self.spawned.append(Spawned(protocol, executable, args, env, childFDs, process))
        protocol.makeConnection(cast(Any, process))
        return process


class Wire:
    """
    A child's L{MainLink} (over a L{StringTransport}) joined to the
    L{_Child} that stands for it in the main process; frames move only
    when the test moves them, so races can be staged.
    """

    def __init__(self, child: _Child) -> None:
        self.child = child
        self.process = cast(FakeProcess, child.transport)
        self.lost = 0
        self.link = MainLink(child.pool.limits, self._on_lost)
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)

    def _on_lost(self) -> None:
        self.lost += 1

    def to_main(self) -> bool:
        """
        Deliver what the child wrote so far to the main process.
        """
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.child.childDataReceived(1, data)
        return bool(data)

    def to_child(self) -> bool:
        """
        Deliver what the main process wrote so far to the child.
        """
        data = self.process.take()
        if data:
            self.link.dataReceived(data)
        return bool(data)

    def end(self, reason: Failure | None = None) -> None:
        """
        The child process exits.
        """
        self.process.exited = True
        self.child.processEnded(reason or Failure(ProcessTerminated(exitCode=1)))


@define
class Gateway:
    """
    A started L{AcceptorPool} on a L{FakeReactor}, its shared state, and a
    L{Wire} to each child.
    """

    reactor: FakeReactor
    pool: AcceptorPool
    queue: FakeQueue
    connections: ConnectionCounter
    auth: AuthFailureTracker
    alerts: FlushingSink
    metrics: FakeMetrics
    wires: dict[int, Wire] = field(factory=dict)

    def wire(self, index: int) -> Wire:
        """
        Join a link to the current child C{index} (again, after a restart).
        """
        child = self.pool.children[index]
        if index not in self.wires or self.wires[index].child is not child:
            self.wires[index] = Wire(child)
        return self.wires[index]

    def pump(self) -> None:
        """
        Move frames both ways on every wire until none is left.
        """
        moved = True
        while moved:
            moved = False
            for wire in list(self.wires.values()):
                if wire.process.exited:
                    continue
                moved |= wire.to_main()
                moved |= wire.to_child()


def make_gateway(
    *,
    count: int = 2,
    per_ip: int = 2,
    total: int = 100,
    auth_limit: int = 3,
    accepting: bool = True,
    fallback: Callable[[], object] | None = None,
) -> Gateway:
    """
    Start a pool of C{count} children on a fake reactor, with a link joined
    to each and the first frames (C{ACCEPTING}) delivered.
    """
    reactor = FakeReactor()
    limits = Limits(
        max_size=MAX_SIZE,
        max_connections=total,
        max_connections_per_ip=per_ip,
        auth_failure_limit=auth_limit,
    )
    queue = FakeQueue(accepting=accepting)
    connections = ConnectionCounter(per_ip, total_limit=total)
    auth = AuthFailureTracker(limit=auth_limit, window=300.0, clock=reactor)
    alerts = FlushingSink()
    metrics = FakeMetrics()
    pool = AcceptorPool(
        reactor=reactor,
        count=count,
        config=config(limits),
        sockets=lambda: SOCKETS,
        queue=queue,
        connections=connections,
        auth=auth,
        alerts=alerts,
        metrics=metrics,
        argv=ARGV,
        fallback=fallback,
    )
    pool.startService()
    gateway = Gateway(reactor, pool, queue, connections, auth, alerts, metrics)
    for index in range(count):
        gateway.wire(index)
    gateway.pump()
    return gateway


def config(limits: Limits) -> AcceptorConfig:
    return AcceptorConfig(
        data_dir="/var/lib/smtpgw",
        hostname="gw.example.net",
        limits=limits,
        require_tls=True,
        acceptors=3,
    )


def envelope(queue_id: str = "0001") -> Envelope:
    return Envelope(
        queue_id=queue_id,
        list="news",
        username="alice",
        sender="news@example.com",
        recipients=("bob@example.org", "carol@example.org"),
        priority=Priority.HIGH,
        accepted_at=1_700_000_000.25,
        client_ip=IP,
        size=42,
    )


def result_of(d: Deferred[T]) -> T:
    """
    The result C{d} has already fired with; raise the exception it failed
    with (the failure is consumed either way).
    """
    box: list[object] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    [value] = box
    if isinstance(value, Failure):
        value.raiseException()
    return cast(T, value)


def take_errors(logged_errors: list[dict[str, Any]]) -> list[tuple[str, type[BaseException]]]:
    """
    The errors logged so far, as (text, exception type), removed from the
    list C{tests/conftest.py} fails the test on (they were expected).
    """
    taken = []
    for event in logged_errors:
        failure = event.get("log_failure")
        kind = type(failure.value) if failure is not None else BaseException
        taken.append((formatEvent(event), kind))
    logged_errors.clear()
    return taken


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """
    Every event logged during the test.
    """
    seen: list[dict[str, Any]] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observer)


# -- the SUBMIT codec -----------------------------------------------------------

envelopes = st.builds(
    Envelope,
    # What the journal records: 1 to 255 ASCII characters.
    queue_id=st.text(st.characters(max_codepoint=127), min_size=1, max_size=255),
    list=st.text(),
    username=st.text(),
    sender=st.text(),
    recipients=st.lists(st.text(), max_size=5).map(tuple),
    priority=st.sampled_from(Priority),
    accepted_at=st.floats(allow_nan=False, allow_infinity=False),
    client_ip=st.text(),
    size=st.integers(min_value=0, max_value=2**63),
)
sequences = st.integers(min_value=0, max_value=2**64 - 1)


@given(seq=sequences, env=envelopes, body=st.binary())
def test_submit_round_trip(seq: int, env: Envelope, body: bytes) -> None:
    """
    decode_submit gives back the sequence number, envelope (any text,
    non-ASCII included, every priority) and body (any bytes, NUL, CR and LF
    included) encode_submit was given.
    """
    payload = encode_submit(seq, env, body)
    assert decode_submit(payload) == (seq, env, body)


@pytest.mark.parametrize("queue_id", ["", "é" * 3, "Q" * 256])
def test_an_envelope_the_journal_cannot_record_is_not_sent(queue_id: str) -> None:
    """
    The envelope goes in the journal's own form, so a queue id the journal
    would refuse (empty, not ASCII, over 255 octets) is refused before it
    is sent.
    """
    with pytest.raises(ValueError, match="queue id"):
        encode_submit(1, attrs.evolve(envelope(), queue_id=queue_id), b"")


def test_submit_round_trip_of_awkward_bytes() -> None:
    """
    A body of NUL, bare CR and LF, and an envelope of non-ASCII text, survive.
    """
    env = attrs.evolve(envelope(), username="jürgen", recipients=("ü@例え.jp",))
    body = b"\x00\r\n\r.\r\n\n\xff"
    assert decode_submit(encode_submit(7, env, body)) == (7, env, body)


@pytest.mark.parametrize(
    "payload",
    [b"", b"S", b"S" + b"\x00" * 11, b'C[1,"192.0.2.1"]', b"s" + b"\x00" * 12 + b"[]"],
)
def test_decode_refuses_what_is_not_a_submit_frame(payload: bytes) -> None:
    """
    A payload of another kind, or too short for the SUBMIT header, is refused.
    """
    with pytest.raises(ValueError, match="not a SUBMIT frame"):
        decode_submit(payload)


@given(seq=sequences, env=envelopes, body=st.binary(max_size=50), data=st.data())
def test_decode_refuses_an_envelope_cut_short(
    seq: int, env: Envelope, body: bytes, data: st.DataObject
) -> None:
    """
    A SUBMIT frame cut anywhere before the end of its envelope is refused.
    """
    payload = encode_submit(seq, env, body)
    head_end = len(payload) - len(body)
    cut = data.draw(st.integers(min_value=0, max_value=head_end - 1))
    with pytest.raises(ValueError, match="SUBMIT"):
        decode_submit(payload[:cut])


def test_decode_refuses_an_envelope_length_past_the_frame() -> None:
    """
    An envelope length one past the end of the frame is refused; at the
    end of the frame it is read (with an empty body).
    """
    payload = encode_submit(3, envelope(), b"")
    # The kind, then the sequence number, the sessions in DATA, the length.
    head = payload[1 + struct.calcsize(">QII") :]
    at_end = b"S" + struct.pack(">QII", 3, 0, len(head)) + head
    assert decode_submit(at_end) == (3, envelope(), b"")
    past = b"S" + struct.pack(">QII", 3, 0, len(head) + 1) + head
    with pytest.raises(ValueError, match="runs past the frame"):
        decode_submit(past)


# -- messages -------------------------------------------------------------------


def test_submit_fires_once_the_main_queue_has_it(events: list[dict[str, Any]]) -> None:
    """
    The child's submit fires only after the main queue's Deferred fired,
    with the envelope and body the child sent; main counts and logs it then.
    """
    g = make_gateway(count=1)
    wire = g.wires[0]
    body = b"Subject: hi\r\n\r\n\x00 body\r\n"
    d = wire.link.submit(envelope(), body)
    assert wire.link.in_flight == 1
    g.pump()
    [(env, got, queued)] = g.queue.submitted
    assert (env, got) == (envelope(), body)
    assert not d.called
    assert g.metrics.accepted_count == 0
    queued.callback(None)
    assert not d.called, "answered before the answer frame arrived"
    g.pump()
    assert result_of(d) is None
    assert wire.link.in_flight == 0
    assert wire.link.accepting
    assert g.metrics.accepted_count == 1
    assert any(e.get("queue_id") == "0001" and "queued" in e["log_format"] for e in events)


@pytest.mark.parametrize(
    ("told", "read"), [(0, 0), (3, 3), (-1, 0), (2**32 - 1, 2**32 - 1), (2**32, 2**32 - 1)]
)
def test_submit_tells_the_sessions_in_data(told: int, read: int) -> None:
    """
    A SUBMIT frame says how many other sessions of its acceptor are in
    DATA, from none to the largest 32-bit count (more is said as that);
    the rest of the frame reads as without it.
    """
    payload = encode_submit(5, envelope(), b"body", told)
    assert submit_in_data(payload) == read
    assert decode_submit(payload) == (5, envelope(), b"body")


def test_main_learns_each_childs_sessions_in_data_from_its_messages() -> None:
    """
    Each message a child sends, and each answer to a heartbeat, says how
    many of its sessions are in DATA; the pool adds up what its children
    last said (for the journal's writer, which waits for those messages).
    """
    g = make_gateway(count=2)
    counts = [3, 1]

    def telling(index: int) -> Callable[[], int]:
        return lambda: counts[index]

    for index in range(2):
        g.wires[index].link.in_data = telling(index)
    assert g.pool.in_data() == 0
    g.wires[0].link.submit(envelope("A"), b"a")
    g.pump()
    assert g.pool.in_data() == 3
    g.wires[1].link.submit(envelope("B"), b"b")
    g.pump()
    assert g.pool.in_data() == 4
    counts[0] = 2
    g.wires[0].link.submit(envelope("C"), b"c")
    g.pump()
    assert g.pool.in_data() == 3
    # Sessions that left DATA without a message are forgotten at the next
    # heartbeat.
    counts[:] = [0, 0]
    g.reactor.advance(ACCEPTING_POLL)
    g.pump()
    assert g.pool.in_data() == 0


def test_answers_out_of_order_reach_their_messages() -> None:
    """
    Two messages under way are answered each by its own outcome, whatever
    the order the main queue answers in.
    """
    g = make_gateway(count=1)
    link = g.wires[0].link
    first = link.submit(envelope("A"), b"a")
    second = link.submit(envelope("B"), b"b")
    g.pump()
    (_, _, queued_a), (_, _, queued_b) = g.queue.submitted
    queued_b.errback(JournalUnavailable("disk full"))
    g.pump()
    assert not first.called
    with pytest.raises(JournalUnavailable):
        result_of(second)
    queued_a.callback(None)
    g.pump()
    assert result_of(first) is None


def test_submit_fails_with_journal_unavailable_when_main_does() -> None:
    """
    When the main queue refuses the message with JournalUnavailable (its
    journal no longer accepting), the child's submit fails with it (its
    text kept), the child stops accepting at once, and nothing is counted
    as accepted.
    """
    g = make_gateway(count=1)
    link = g.wires[0].link
    d = link.submit(envelope(), b"body")
    g.pump()
    g.queue.accepting = False
    g.queue.submitted[0][2].errback(JournalUnavailable("disk full"))
    g.pump()
    with pytest.raises(JournalUnavailable, match="disk full"):
        result_of(d)
    assert link.accepting is False
    assert g.metrics.accepted_count == 0


def test_child_accepts_again_after_a_refusal_while_main_still_accepts() -> None:
    """
    A refusal that leaves the main queue accepting (a queue id still live
    in the journal) does not leave the child refusing all mail: within a
    poll it is told that the main process takes mail.
    """
    g = make_gateway(count=1)
    link = g.wires[0].link
    d = link.submit(envelope(), b"body")
    g.pump()
    g.queue.submitted[0][2].errback(QueueIdInUse("0001 is still live"))
    g.pump()
    with pytest.raises(JournalUnavailable):
        result_of(d)
    assert g.queue.accepting
    for _ in range(4):
        g.reactor.advance(ACCEPTING_POLL)
        g.pump()
    assert link.accepting


def test_other_failure_in_main_is_a_runtime_error_in_the_child(
    logged_errors: list[dict[str, Any]],
) -> None:
    """
    Any other failure of the main queue fails the child's submit with a
    RuntimeError naming it, leaves the child accepting, and is logged in
    the main process.
    """
    g = make_gateway(count=1)
    link = g.wires[0].link
    d = link.submit(envelope(), b"body")
    g.pump()
    g.queue.submitted[0][2].errback(ZeroDivisionError("boom"))
    g.pump()
    with pytest.raises(RuntimeError, match="boom"):
        result_of(d)
    assert link.accepting
    [(text, kind)] = take_errors(logged_errors)
    assert kind is ZeroDivisionError
    assert "acceptor 0" in text


def test_a_frame_at_the_length_limit_is_read() -> None:
    """
    A SUBMIT frame of exactly the frame limit is read; a message of
    C{max_size} octets fits in it with room to spare.
    """
    g = make_gateway(count=1)
    wire = g.wires[0]
    limit = frame_limit(g.pool.limits)
    body = b"x" * (limit - len(encode_submit(1, envelope(), b"")))
    payload = encode_submit(1, envelope(), body)
    assert len(payload) == limit
    wire.child.childDataReceived(1, struct.pack(">I", len(payload)) + payload)
    assert [b for _, b, _ in g.queue.submitted] == [body]
    assert wire.process.signals == []
    d = wire.link.submit(envelope("big"), b"y" * MAX_SIZE)
    g.pump()
    assert g.queue.submitted[-1][1] == b"y" * MAX_SIZE
    g.queue.submitted[-1][2].callback(None)
    g.pump()
    assert result_of(d) is None


def test_a_frame_past_the_length_limit_kills_the_child(
    logged_errors: list[dict[str, Any]],
) -> None:
    """
    A frame one octet past the limit makes the main process kill the child
    and log it.
    """
    g = make_gateway(count=1)
    wire = g.wires[0]
    wire.child.childDataReceived(1, struct.pack(">I", frame_limit(g.pool.limits) + 1))
    assert wire.process.signals == ["KILL"]
    assert g.queue.submitted == []
    [(text, _)] = take_errors(logged_errors)
    assert "stopping it" in text


def test_a_frame_from_main_past_the_length_limit_drops_the_channel(
    logged_errors: list[dict[str, Any]],
) -> None:
    """
    The child reads a frame from the main process up to the frame limit;
    one octet more makes it drop the channel and log it.
    """
    g = make_gateway(count=1)
    wire = g.wires[0]
    limit = frame_limit(g.pool.limits)
    frame = b"a[false]".ljust(limit, b" ")
    wire.link.dataReceived(struct.pack(">I", len(frame)) + frame)
    assert wire.link.accepting is False
    assert not wire.transport.disconnecting
    wire.link.dataReceived(struct.pack(">I", limit + 1))
    assert wire.transport.disconnecting
    [(text, _)] = take_errors(logged_errors)
    assert str(limit + 1) in text


# -- connections ------------------------------------------------------------------


def test_per_address_limit_holds_across_children() -> None:
    """
    With a limit of N per address, N connections are admitted across two
    children, the N+1-th is refused with ADDRESS_FULL, and another address
    is still admitted.
    """
    g = make_gateway(per_ip=3)
    a, b = g.wires[0].link, g.wires[1].link
    answers = [a.admit(IP), b.admit(IP), a.admit(IP)]
    g.pump()
    assert [result_of(d) for d in answers] == [Admission.ADMITTED] * 3
    refused = b.admit(IP)
    other = b.admit(OTHER_IP)
    g.pump()
    assert result_of(refused) is Admission.ADDRESS_FULL
    assert result_of(other) is Admission.ADMITTED
    assert g.connections.count(IP) == 3


def test_total_limit_holds_across_children() -> None:
    """
    With a total limit of N, N connections from different addresses are
    admitted across two children and the next one is refused with FULL.
    """
    g = make_gateway(per_ip=5, total=2)
    a, b = g.wires[0].link, g.wires[1].link
    first, second = a.admit("192.0.2.10"), b.admit("192.0.2.11")
    g.pump()
    assert (result_of(first), result_of(second)) == (Admission.ADMITTED, Admission.ADMITTED)
    refused = a.admit("192.0.2.12")
    g.pump()
    assert result_of(refused) is Admission.FULL
    assert g.connections.total == 2


def test_release_frees_a_slot_for_any_child() -> None:
    """
    A connection released by the child that admitted it frees its slot,
    which another child's connection then takes.
    """
    g = make_gateway(per_ip=1)
    a, b = g.wires[0].link, g.wires[1].link
    held = a.admit(IP)
    g.pump()
    assert result_of(held) is Admission.ADMITTED
    refused = b.admit(IP)
    g.pump()
    assert result_of(refused) is Admission.ADDRESS_FULL
    a.release(IP)
    again = b.admit(IP)
    g.pump()
    assert result_of(again) is Admission.ADMITTED
    assert g.connections.count(IP) == 1


def test_a_child_cannot_release_another_childs_connection() -> None:
    """
    A release from a child that holds no connection of the address frees
    nothing: the slot is the other child's until it releases it.
    """
    g = make_gateway(per_ip=1)
    a, b = g.wires[0].link, g.wires[1].link
    held = a.admit(IP)
    g.pump()
    assert result_of(held) is Admission.ADMITTED
    b.release(IP)
    g.pump()
    assert g.connections.count(IP) == 1
    refused = b.admit(IP)
    g.pump()
    assert result_of(refused) is Admission.ADDRESS_FULL


def test_a_child_that_ends_releases_its_connections() -> None:
    """
    When a child's process ends, its admitted connections are released,
    the other child's stay counted.
    """
    g = make_gateway(per_ip=3)
    a, b = g.wires[0].link, g.wires[1].link
    answers = [a.admit(IP), a.admit(IP), a.admit(OTHER_IP), b.admit(IP)]
    g.pump()
    assert [result_of(d) for d in answers] == [Admission.ADMITTED] * 4
    g.wires[0].end()
    assert g.connections.count(IP) == 1
    assert g.connections.count(OTHER_IP) == 0
    assert g.connections.total == 1


def open_and_close(link: MainLink, opened: int, closed: int) -> None:
    """
    What the sessions of a child tell its link's metrics.
    """
    for _ in range(opened):
        link.connection_opened()
    for _ in range(closed):
        link.connection_closed()


def test_connections_reach_the_main_metrics_with_each_heartbeat() -> None:
    """
    A child's connections opened and closed are counted in the main
    process's metrics when it answers the next heartbeat, each once, and
    added up across children; no frame is sent for each connection.
    """
    g = make_gateway(count=2)
    a, b = g.wires[0].link, g.wires[1].link
    open_and_close(a, 3, 1)
    open_and_close(b, 2, 2)
    assert g.wires[0].transport.value() == b""
    g.pump()
    assert (g.metrics.opened, g.metrics.closed) == (0, 0)
    g.reactor.advance(ACCEPTING_POLL)
    g.pump()
    assert (g.metrics.opened, g.metrics.closed) == (5, 3)
    g.reactor.advance(ACCEPTING_POLL)
    g.pump()
    assert (g.metrics.opened, g.metrics.closed) == (5, 3)
    open_and_close(a, 1, 0)
    g.reactor.advance(ACCEPTING_POLL)
    g.pump()
    assert (g.metrics.opened, g.metrics.closed) == (6, 3)
    assert [child.connections_open for child in g.pool.children.values()] == [3, 0]


def test_the_connections_of_a_child_that_ends_are_counted_closed() -> None:
    """
    When a child ends, the connections its heartbeats counted open are
    counted closed (they ended with it); the other child's stay open.
    """
    g = make_gateway(count=2)
    open_and_close(g.wires[0].link, 4, 1)
    open_and_close(g.wires[1].link, 2, 0)
    g.reactor.advance(ACCEPTING_POLL)
    g.pump()
    assert (g.metrics.opened, g.metrics.closed) == (6, 1)
    g.wires[0].end()
    assert (g.metrics.opened, g.metrics.closed) == (6, 4)


def test_only_a_sole_acceptor_keeps_the_limits_itself() -> None:
    """
    The configuration says a child keeps the connection and login limits
    itself only when it is the only acceptor, and says so across its JSON.
    """
    limits = Limits(max_size=MAX_SIZE)
    alone = AcceptorConfig(
        data_dir="/d", hostname="h", limits=limits, require_tls=False, acceptors=1
    )
    shared = AcceptorConfig(
        data_dir="/d", hostname="h", limits=limits, require_tls=False, acceptors=2
    )
    assert AcceptorConfig.from_json(alone.to_json()).alone
    assert not AcceptorConfig.from_json(shared.to_json()).alone


# -- auth turns -----------------------------------------------------------------------


def test_auth_turns_are_shared_across_children() -> None:
    """
    With a limit of L, L turns are given across two children and the next
    one waits; a turn ended (without a failure) gives it its turn.
    """
    g = make_gateway(auth_limit=2)
    a, b = g.wires[0].link, g.wires[1].link
    assert a.blocked(IP) is False
    first, second = a.begin(IP), b.begin(IP)
    g.pump()
    assert (result_of(first), result_of(second)) == (True, True)
    waiting = b.begin(IP)
    g.pump()
    assert not waiting.called
    assert g.auth.pending(IP) == 2
    a.end(IP, failed=False)
    g.pump()
    assert result_of(waiting) is True
    assert g.auth.pending(IP) == 2
    b.end(IP, failed=False)
    b.end(IP, failed=False)
    g.pump()
    assert g.auth.pending(IP) == 0
    assert g.auth.failures(IP) == 0


def test_failures_reach_the_limit_once_across_children() -> None:
    """
    L failures across two children block the address: the L-th fail()
    alone says to raise the alert, with the count; begin then answers
    False on both children, and a later failure raises no alert.
    """
    g = make_gateway(auth_limit=3)
    a, b = g.wires[0].link, g.wires[1].link
    turns = [a.begin(IP), b.begin(IP), a.begin(IP)]
    g.pump()
    assert [result_of(d) for d in turns] == [True, True, True]
    first = b.fail(IP)
    g.pump()
    second = a.fail(IP)
    g.pump()
    assert (result_of(first), result_of(second)) == ((False, 1), (False, 2))
    still = b.begin(IP)
    g.pump()
    assert not still.called, "a third check runs while one may still fail"
    last = a.fail(IP)
    g.pump()
    assert result_of(last) == (True, 3)
    assert result_of(still) is False
    refused = [a.begin(IP), b.begin(IP)]
    g.pump()
    assert [result_of(d) for d in refused] == [False, False]
    again = b.fail(IP)
    g.pump()
    assert result_of(again) == (False, 3)
    assert g.auth.pending(IP) == 0


def test_one_failure_short_of_the_limit_is_not_blocked() -> None:
    """
    L-1 failures leave the address a turn, and raise no alert.
    """
    g = make_gateway(auth_limit=2)
    a, b = g.wires[0].link, g.wires[1].link
    turn = a.begin(IP)
    g.pump()
    assert result_of(turn) is True
    counted = a.fail(IP)
    g.pump()
    assert result_of(counted) == (False, 1)
    next_turn = b.begin(IP)
    g.pump()
    assert result_of(next_turn) is True


def one_turn_held(g: Gateway) -> tuple[Wire, Wire, Deferred[bool]]:
    """
    With a limit of one check at a time: the first child holds the turn,
    the second child's begin waits (delivered to main, not answered).

    @return: the two wires and the waiting begin.
    """
    a, b = g.wires[0], g.wires[1]
    held = a.link.begin(IP)
    g.pump()
    assert result_of(held) is True
    wanted = b.link.begin(IP)
    g.pump()
    assert not wanted.called
    return a, b, wanted


def test_a_cancelled_begin_given_its_turn_gives_it_back() -> None:
    """
    A begin cancelled in the child while the main process was already
    giving it the turn (the frames cross) hands the turn back: the main
    tracker ends up with no check pending.
    """
    g = make_gateway(auth_limit=1)
    a, b, wanted = one_turn_held(g)
    # The turn is given in main, its answer not yet in the child...
    a.link.end(IP, failed=False)
    a.to_main()
    assert g.auth.pending(IP) == 1
    # ... when the child gives up waiting.
    wanted.cancel()
    with pytest.raises(CancelledError):
        result_of(wanted)
    b.to_main()
    b.to_child()
    b.to_main()
    assert g.auth.pending(IP) == 0
    later = a.link.begin(IP)
    g.pump()
    assert result_of(later) is True


def test_a_begin_cancelled_while_waiting_is_forgotten() -> None:
    """
    A begin cancelled before its turn comes leaves the main tracker's
    queue: the next turn ended gives no turn to it.
    """
    g = make_gateway(auth_limit=1)
    a_wire, b_wire, wanted = one_turn_held(g)
    a, b = a_wire.link, b_wire.link
    wanted.cancel()
    with pytest.raises(CancelledError):
        result_of(wanted)
    g.pump()
    a.end(IP, failed=False)
    g.pump()
    assert g.auth.pending(IP) == 0
    again = b.begin(IP)
    g.pump()
    assert result_of(again) is True


def test_a_begin_cancelled_while_waiting_leaves_nothing_in_the_child() -> None:
    """
    Once the main process has dropped a cancelled begin, the child keeps
    nothing of it (each AUTH given up while waiting would otherwise cost
    memory for the life of the child).
    """
    g = make_gateway(auth_limit=1)
    a_wire, b_wire, wanted = one_turn_held(g)
    a, b = a_wire.link, b_wire.link
    wanted.cancel()
    with pytest.raises(CancelledError):
        result_of(wanted)
    g.pump()
    a.end(IP, failed=False)
    g.pump()
    assert b._cancelled_turns == {}


def test_a_child_that_ends_gives_back_its_turns() -> None:
    """
    A child that ends holding turns gives them back, and the turn another
    child waits for is given.
    """
    g = make_gateway(auth_limit=2)
    a, b = g.wires[0].link, g.wires[1].link
    turns = [a.begin(IP), a.begin(IP)]
    g.pump()
    assert [result_of(d) for d in turns] == [True, True]
    waiting = b.begin(IP)
    g.pump()
    assert not waiting.called
    g.wires[0].end()
    g.pump()
    assert result_of(waiting) is True
    assert g.auth.pending(IP) == 1
    b.end(IP, failed=False)
    g.pump()
    assert g.auth.pending(IP) == 0
    assert g.auth.failures(IP) == 0


def test_a_child_that_ends_while_waiting_leaves_the_queue() -> None:
    """
    A child that ends while waiting for a turn is taken out of the queue:
    the turn it waited for is not given to it (and so not lost).
    """
    g = make_gateway(auth_limit=1)
    a_wire, _, waiting = one_turn_held(g)
    a = a_wire.link
    waiting.addErrback(lambda f: f.trap(CancelledError))
    g.wires[1].end()
    a.end(IP, failed=False)
    g.pump()
    assert g.auth.pending(IP) == 0
    again = a.begin(IP)
    g.pump()
    assert result_of(again) is True


# -- notices --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alert",
    [
        Alert(
            type="auth_failures",
            message="5 failed logins from 192.0.2.1 — blocked",
            created_at=1_700_000_123.5,
        ),
        Alert(
            type="sender_domain",
            message="alice sent as news@evil.example",
            created_at=1_700_000_000.0,
            list="news",
            details={"username": "alice", "sender": "news@evil.example", "n": [1, {"x": None}]},
        ),
    ],
)
def test_alerts_reach_the_main_sink_unchanged(alert: Alert) -> None:
    """
    An alert raised in a child reaches the pool's alert sink with its type,
    message, time, list and details.
    """
    g = make_gateway()
    g.wires[1].link.raise_alert(alert)
    g.pump()
    assert g.alerts.alerts == [alert]


def test_refusals_reach_the_main_metrics() -> None:
    """
    A refusal counted in a child is counted in the main process's metrics,
    with its reason.
    """
    g = make_gateway()
    g.wires[0].link.rejected("too_large")
    g.wires[1].link.rejected("auth_failed")
    g.pump()
    assert g.metrics.rejections == ["too_large", "auth_failed"]


def test_child_log_lines_are_logged_at_their_level(events: list[dict[str, Any]]) -> None:
    """
    Lines the child writes to stderr are logged by the main process at the
    level they name (a line that is not JSON as a warning), a partial line
    once it is complete or the child has ended.
    """
    g = make_gateway(count=1)
    child = g.wires[0].child
    child.childDataReceived(2, b'{"level": "warn", "text": "slow disk"}\nnot js')
    child.childDataReceived(2, b'on\n{"level": "info", "text": "tail"}')
    mine = [e for e in events if e.get("index") == 0 and "text" in e]
    assert [(e["log_level"], e["text"]) for e in mine] == [
        (LogLevel.warn, "slow disk"),
        (LogLevel.warn, "not json"),
    ]
    g.wires[0].end(Failure(ProcessDone(0)))
    mine = [e for e in events if e.get("index") == 0 and "text" in e]
    assert (mine[-1]["log_level"], mine[-1]["text"]) == (LogLevel.info, "tail")


# -- losing the main process ----------------------------------------------------------


def test_losing_main_fails_every_request_and_calls_on_lost_once() -> None:
    """
    When the channel to the main process is lost, every request under way
    fails with JournalUnavailable (a login waiting for its turn is refused
    instead, as the session expects), on_lost is called once, and requests
    made later fail at once (a turn is refused) without writing anything.
    """
    g = make_gateway(count=1)
    wire = g.wires[0]
    link = wire.link
    pending: list[Deferred[Any]] = [
        link.submit(envelope(), b"body"),
        link.admit(IP),
        link.begin(IP),
        link.fail(IP),
    ]
    assert link.in_flight == 4
    link.connectionLost(Failure(ConnectionError("gone")))
    turn = pending.pop(2)
    assert result_of(turn) is False
    for d in pending:
        with pytest.raises(JournalUnavailable):
            result_of(d)
    assert wire.lost == 1
    assert link.in_flight == 0
    wire.transport.clear()
    with pytest.raises(JournalUnavailable):
        result_of(link.submit(envelope(), b"later"))
    with pytest.raises(JournalUnavailable):
        result_of(link.admit(IP))
    with pytest.raises(JournalUnavailable):
        result_of(link.fail(IP))
    assert result_of(link.begin(IP)) is False
    link.release(IP)
    link.raise_alert(Alert(type="t", message="m", created_at=0.0))
    assert wire.transport.value() == b""
    assert wire.lost == 1


# -- bad frames -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"Z[]",
        b"C{not json",
        b"C[1]",
        b"A{}",
        b"S" + b"\x00" * 8 + b"\x00\x00\x01\x00" + b"[]",
        b"P[0]",
        b"P[-1,0]",
        b"P[0,-1]",
    ],
    ids=[
        "unknown kind",
        "bad JSON",
        "missing field",
        "bad alert",
        "bad SUBMIT",
        "heartbeat without counts",
        "negative opened",
        "negative closed",
    ],
)
def test_a_bad_frame_kills_the_child(logged_errors: list[dict[str, Any]], payload: bytes) -> None:
    """
    A frame the main process cannot read makes it kill that child (only
    that one) and log it.
    """
    g = make_gateway()
    bad, good = g.wires[0], g.wires[1]
    bad.child.childDataReceived(1, struct.pack(">I", len(payload)) + payload)
    assert bad.process.signals == ["KILL"]
    assert good.process.signals == []
    assert (g.metrics.opened, g.metrics.closed) == (0, 0)
    [(text, _)] = take_errors(logged_errors)
    assert "acceptor 0 sent a bad frame" in text


# -- the pool -------------------------------------------------------------------------


def test_start_spawns_each_child_with_the_sockets() -> None:
    """
    startService spawns C{count} children, each with its stdin written,
    stdout and stderr read, the listening sockets from fd 3 on, and their
    number (and its index, and the parent's pid) in its environment; the
    configuration is its last argument.
    """
    g = make_gateway(count=3)
    assert len(g.reactor.spawned) == 3
    for index, spawned in enumerate(g.reactor.spawned):
        assert spawned.executable == ARGV[0]
        assert spawned.args[:-1] == ARGV
        assert AcceptorConfig.from_json(spawned.args[-1]).limits == g.pool.limits
        stdin = spawned.child_fds.pop(0)
        assert isinstance(stdin, int)
        assert spawned.child_fds == {1: "r", 2: "r", 3: 7, 4: 9}
        assert spawned.env["SMTPGW_ACCEPTOR_FDS"] == "2"
        assert spawned.env["SMTPGW_ACCEPTOR_INDEX"] == str(index)
        assert spawned.env["SMTPGW_ACCEPTOR_PARENT"] == str(os.getpid())
        assert g.pool.children[index] is spawned.protocol
        assert spawned.protocol.pid == spawned.process.pid


def _end_and_wait(g: Gateway, index: int, delay: float) -> None:
    """
    End child C{index} at once and check it is restarted after exactly
    C{delay} seconds (not half a second sooner).
    """
    before = len(g.reactor.spawned)
    g.wires[index].end()
    assert index not in g.pool.children
    g.reactor.advance(delay - 0.5)
    assert len(g.reactor.spawned) == before, f"restarted before {delay} s"
    g.reactor.advance(0.5)
    assert len(g.reactor.spawned) == before + 1, f"not restarted after {delay} s"
    g.wire(index)


def test_a_child_that_keeps_dying_is_restarted_ever_later() -> None:
    """
    A child that ends while the pool runs is restarted after 1 s, then 2,
    4, 8, 16, and then 30 s (the cap), each time.
    """
    g = make_gateway(count=2)
    for delay in [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]:
        _end_and_wait(g, 0, delay)
    # The other child's waits are its own.
    _end_and_wait(g, 1, 1.0)


def test_a_child_that_lived_a_minute_is_restarted_after_1_s() -> None:
    """
    A child that lived 60 s resets the wait to 1 s; one that lived half a
    second less does not.
    """
    g = make_gateway(count=1)
    _end_and_wait(g, 0, 1.0)
    _end_and_wait(g, 0, 2.0)
    g.reactor.advance(HEALTHY_AFTER - 0.5)
    _end_and_wait(g, 0, 4.0)
    g.reactor.advance(HEALTHY_AFTER)
    _end_and_wait(g, 0, 1.0)
    _end_and_wait(g, 0, 2.0)


def test_the_restarted_child_is_served_like_the_first() -> None:
    """
    A restarted child is told whether main takes mail and its requests are
    answered.
    """
    g = make_gateway(count=1)
    _end_and_wait(g, 0, 1.0)
    g.pump()
    link = g.wires[0].link
    d = link.admit(IP)
    g.pump()
    assert result_of(d) is Admission.ADMITTED


def test_stop_terms_then_kills_the_children_left_after_10_s() -> None:
    """
    stopService sends TERM to every child, KILLs those still there after
    10 s (not before), fires once all have ended, and restarts none.
    """
    g = make_gateway(count=2)
    a, b = g.wires[0], g.wires[1]
    stopped = g.pool.stopService()
    assert a.process.signals == ["TERM"]
    assert b.process.signals == ["TERM"]
    g.reactor.advance(KILL_AFTER - 0.5)
    a.end(Failure(ProcessDone(0)))
    assert not stopped.called
    assert a.process.signals == ["TERM"]
    assert b.process.signals == ["TERM"]
    g.reactor.advance(0.5)
    assert b.process.signals == ["TERM", "KILL"]
    assert a.process.signals == ["TERM"]
    assert not stopped.called
    b.end(Failure(ProcessTerminated(signal=9)))
    assert result_of(stopped) is None
    assert g.alerts.flushes == 1
    g.reactor.advance(HEALTHY_AFTER)
    assert len(g.reactor.spawned) == 2
    assert g.pool.children == {}
    assert g.reactor.getDelayedCalls() == []


def test_stop_fires_when_the_children_end_in_time() -> None:
    """
    Children that end before the 10 s are not killed, and stopService
    fires at once.
    """
    g = make_gateway(count=2)
    stopped = g.pool.stopService()
    g.wires[0].end(Failure(ProcessDone(0)))
    g.wires[1].end(Failure(ProcessDone(0)))
    assert result_of(stopped) is None
    g.reactor.advance(KILL_AFTER)
    assert g.wires[0].process.signals == ["TERM"]
    assert g.wires[1].process.signals == ["TERM"]
    assert g.reactor.getDelayedCalls() == []


def test_stop_cancels_a_pending_restart() -> None:
    """
    A child waiting to be restarted when the pool stops is not restarted.
    """
    g = make_gateway(count=2)
    g.wires[0].end()
    stopped = g.pool.stopService()
    g.wires[1].end(Failure(ProcessDone(0)))
    assert result_of(stopped) is None
    g.reactor.advance(60.0)
    assert len(g.reactor.spawned) == 2


def test_stop_with_no_child_left_fires_at_once() -> None:
    """
    A pool whose children all await a restart stops at once.
    """
    g = make_gateway(count=1)
    g.wires[0].end()
    stopped = g.pool.stopService()
    assert result_of(stopped) is None
    assert g.alerts.flushes == 1
    g.reactor.advance(60.0)
    assert len(g.reactor.spawned) == 1


def frame_kinds(stream: bytes) -> list[bytes]:
    """
    The kind byte of each frame in C{stream}.
    """
    kinds = []
    while stream:
        (length,) = struct.unpack_from(">I", stream)
        kinds.append(stream[4:5])
        stream = stream[4 + length :]
    return kinds


def test_children_learn_when_main_stops_and_resumes_taking_mail() -> None:
    """
    A change of the main queue's accepting reaches every child within a
    poll (0.25 s); no ACCEPTING frame is sent while it does not change (only
    the poll's PING).
    """
    g = make_gateway(count=2)
    links = [g.wires[0].link, g.wires[1].link]
    assert [link.accepting for link in links] == [True, True]
    g.queue.accepting = False
    g.reactor.advance(ACCEPTING_POLL)
    g.pump()
    assert [link.accepting for link in links] == [False, False]
    g.reactor.advance(ACCEPTING_POLL)
    for wire in (g.wires[0], g.wires[1]):
        assert frame_kinds(wire.process.take()) == [b"p"]
    g.queue.accepting = True
    g.reactor.advance(ACCEPTING_POLL / 2)
    g.pump()
    assert [link.accepting for link in links] == [False, False]
    g.reactor.advance(ACCEPTING_POLL / 2)
    g.pump()
    assert [link.accepting for link in links] == [True, True]


def test_a_child_started_while_main_refuses_mail_is_told_at_once() -> None:
    """
    A child is told at its start whether the main process takes mail.
    """
    g = make_gateway(count=1, accepting=False)
    assert g.wires[0].link.accepting is False


def test_stop_signals_every_child_even_one_that_just_exited() -> None:
    """
    Stopping sends TERM to each running child; one that has just exited
    (its end not yet seen) does not make it fail.
    """
    g = make_gateway(count=3)
    g.wires[2].process.exited = True
    g.pool.stopService()
    assert g.wires[0].process.signals == ["TERM"]
    assert g.wires[1].process.signals == ["TERM"]
    assert g.wires[2].process.signals == []


# -- the configuration ----------------------------------------------------------------


def test_config_round_trip_keeps_every_limit() -> None:
    """
    AcceptorConfig.from_json(to_json()) gives back every field, every
    Limits field among them (each set away from its default, with its type).
    """
    changed: dict[str, Any] = {}
    for attribute in attrs.fields(Limits):
        default: Any = attribute.default
        changed[attribute.name] = default + 1 if isinstance(default, int) else default + 0.5
    limits = Limits(**changed)
    original = config(limits)
    copy = AcceptorConfig.from_json(original.to_json())
    assert copy.limits == limits
    for attribute in attrs.fields(Limits):
        value = getattr(copy.limits, attribute.name)
        assert value != attribute.default
        assert type(value) is type(attribute.default)
    assert (copy.data_dir, copy.hostname, copy.require_tls, copy.acceptors) == (
        "/var/lib/smtpgw",
        "gw.example.net",
        True,
        3,
    )


# -- review fixes: frames, limits, TLS, failed starts ------------------------------


@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    st.lists(st.integers(min_value=1, max_value=2000), max_size=20),
)
def test_frames_come_out_whole_however_the_stream_is_cut(
    payloads: list[bytes], cuts: list[int]
) -> None:
    """
    The main process's frame reader gives back each payload once and
    whole, in order, however the child's writes are cut into reads (a
    length prefix cut in two, several frames in one read).
    """
    stream = b"".join(struct.pack(">I", len(p)) + p for p in payloads)
    points = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    received: list[bytes] = []
    frames = _Frames(10_000, received.append, lambda length: pytest.fail("too long"))
    for start, end in itertools.pairwise(points):
        frames.dataReceived(stream[start:end])
    assert received == payloads


def test_a_large_frame_is_joined_once() -> None:
    """
    A frame arriving in many small reads is joined once when complete, not
    at each read (a 25 MB message in 8 KB reads would otherwise be copied
    thousands of times on the main process's reactor).
    """
    joins: list[int] = []

    class Counting(_Frames):
        def _join(self) -> bytes:
            if len(self._chunks) != 1:
                joins.append(len(self._chunks))
            return super()._join()

    payload = b"m" * (2 * 1024 * 1024)
    stream = struct.pack(">I", len(payload)) + payload
    received: list[bytes] = []
    frames = Counting(len(payload), received.append, lambda length: None)
    for start in range(0, len(stream), 8192):
        frames.dataReceived(stream[start : start + 8192])
    assert received == [payload]
    assert len(joins) <= 2


@given(
    st.integers(min_value=1, max_value=200),
    st.integers(min_value=256, max_value=1024),
    st.sampled_from(["a", "\u00e9", "\u4e2d", "\U0001f600", '"', "\\", "\x01"]),
)
def test_the_largest_envelope_fits_in_a_frame(
    recipients: int, path_length: int, character: str
) -> None:
    """
    A message of C{--max-size} with the most recipients, each of the
    longest path of the character JSON escapes worst, and a header section
    grown by the gateway, still fits in a frame: the main process never
    kills an acceptor for a message the session accepted.
    """
    limits = Limits(max_size=1024, max_recipients=recipients, max_path_length=path_length)
    # The session bounds a path in octets; a character may take up to four.
    path = character * (path_length // len(character.encode("utf-8")))
    big = Envelope(
        queue_id="Q" * 24,
        list=path,
        username=path,
        sender=path,
        recipients=(path,) * recipients,
        priority=Priority(1),
        accepted_at=1e12,
        client_ip="ffff:" * 8,
        size=2**62,
    )
    header_growth = 64 * 1024
    payload = encode_submit(2**63, big, b"x" * (limits.max_size + header_growth))
    assert len(payload) <= frame_limit(limits)


def test_each_child_gets_the_certificate_the_main_process_read() -> None:
    """
    A child is sent the certificate and key the main process loaded (it
    may not be allowed to read the files), when it starts and after each
    reload; without TLS they are told there is none.
    """

    class Loaded:
        cert_path = FilePath("/etc/smtpgw/cert.pem")
        key_path = FilePath("/etc/smtpgw/key.pem")
        pem = (b"-----BEGIN CERTIFICATE-----\n", b"-----BEGIN PRIVATE KEY-----\n")

    g = make_gateway(count=2)
    got: list[tuple[bytes, bytes, str, str]] = []
    g.pool.tls = Loaded()
    for wire in g.wires.values():
        wire.link.on_tls = lambda *args: got.append(args)
    g.pool.send_tls()
    g.pump()
    expected = (Loaded.pem[0], Loaded.pem[1], "/etc/smtpgw/cert.pem", "/etc/smtpgw/key.pem")
    assert got == [expected, expected]
    g.pool.tls = None
    g.pool.send_tls()
    g.pump()
    # Without TLS the children are told so, and serve without STARTTLS.
    assert got[2:] == [(b"", b"", "", "")] * 2


def test_a_child_that_cannot_be_started_is_tried_again_and_stop_still_ends(
    logged_errors: list[dict[str, Any]],
) -> None:
    """
    When starting a child fails (no processes, memory or descriptors left),
    the failure is logged, the start is tried again after the back-off, and
    stopping the pool still finishes.
    """
    g = make_gateway(count=1)
    reactor = g.reactor
    original = reactor.spawnProcess
    failures = [OSError(24, "Too many open files")]

    def failing(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return original(*args, **kwargs)

    reactor.spawnProcess = failing  # type: ignore[method-assign]
    g.wires[0].end()
    reactor.advance(1.0)
    assert g.pool.children == {}
    [(text, kind)] = take_errors(logged_errors)
    assert "cannot start acceptor 0" in text
    assert kind is OSError
    reactor.advance(1.9)
    assert g.pool.children == {}
    reactor.advance(0.1)
    assert list(g.pool.children) == [0]
    child = g.pool.children[0]
    stopped = g.pool.stopService()
    child.processEnded(Failure(ProcessDone(0)))
    assert result_of(stopped) is None


def test_the_pool_counts_the_children_that_accept() -> None:
    """
    A child counts as ready from its READY frame until it ends (the health
    check's C{smtp}).
    """
    g = make_gateway(count=2)
    assert g.pool.ready == 0
    for wire in g.wires.values():
        wire.link.ready(3)
    g.pump()
    assert g.pool.ready == 2
    g.wires[0].end()
    assert g.pool.ready == 1


def test_a_child_not_heard_from_does_not_count_as_ready() -> None:
    """
    The main process asks each child every poll whether it is there; one
    that has not answered anything for 3 s (stopped, deadlocked) stops
    counting as ready, and counts again once it answers.
    """
    g = make_gateway(count=1)
    wire = g.wires[0]
    wire.link.ready(1)
    g.pump()
    assert g.pool.ready == 1
    for _ in range(11):
        g.reactor.advance(ACCEPTING_POLL)
        g.pump()
    assert g.pool.ready == 1
    for _ in range(12):
        g.reactor.advance(ACCEPTING_POLL)
        wire.process.take()
    assert g.pool.ready == 1
    g.reactor.advance(ACCEPTING_POLL)
    assert g.pool.ready == 0
    g.pump()
    assert g.pool.ready == 1


def test_a_childs_stderr_is_logged_by_line_and_bounded(
    logged_errors: list[dict[str, Any]],
) -> None:
    """
    A child's stderr is logged a line at a time however it is cut into
    reads, and a line without end is logged in 64 KiB pieces rather than
    held.
    """
    from twisted.logger import globalLogPublisher

    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_format") == "acceptor {index}: {text}":
            seen.append(event["text"])

    globalLogPublisher.addObserver(cast(ILogObserver, observer))
    try:
        g = make_gateway(count=1)
        child = g.wires[0].child
        for piece in (b"first li", b"ne\nsecond line\nthi", b"rd\n"):
            child.childDataReceived(2, piece)
        assert seen == ["first line", "second line", "third"]
        seen.clear()
        for _ in range(9):
            child.childDataReceived(2, b"x" * 8192)
        assert seen == ["x" * (8 * 8192)]
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, observer))


# -- the child's pipe writer ----------------------------------------------------------


class WatchingReactor:
    """
    Records which descriptors the writer asks the reactor to watch.
    """

    def __init__(self) -> None:
        self.writers: list[Any] = []
        self.added = 0

    def addWriter(self, writer: Any) -> None:
        self.added += 1
        self.writers.append(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.remove(writer)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """
    A pipe: its read end (non-blocking; closed after the test) and its
    write end, for a L{PipeWriter} to own.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    yield read_end, write_end
    os.close(read_end)


def drain(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_pipe_writer_writes_at_once_when_the_pipe_has_room(pipe: tuple[int, int]) -> None:
    """
    What fits in the pipe is written within the call, without waiting for
    the reactor (which is asked to watch nothing).
    """
    read_end, write_end = pipe
    reactor = WatchingReactor()
    writer = PipeWriter(reactor, write_end)
    writer.write(b"one")
    writer.write_sequence([b"two", b"", b"three"])
    assert drain(read_end) == b"onetwothree"
    assert reactor.added == 0
    writer.close()


def test_pipe_writer_keeps_the_rest_in_order_until_writable(pipe: tuple[int, int]) -> None:
    """
    When the pipe is full, the rest waits (the reactor watching the pipe)
    with whatever is written after it, and goes out in order as the pipe
    drains; then the reactor stops watching.
    """
    read_end, write_end = pipe
    reactor = WatchingReactor()
    writer = PipeWriter(reactor, write_end)
    big = bytes(range(256)) * 4096  # 1 MiB: more than a pipe holds
    writer.write_sequence([b"head", big, b"tail"])
    writer.write(b"after")
    assert reactor.writers == [writer]
    received = drain(read_end)
    while reactor.writers:
        writer.doWrite()
        received += drain(read_end)
    assert received == b"head" + big + b"tail" + b"after"
    assert reactor.added == 1
    writer.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(write_end)


def test_pipe_writer_stops_quietly_when_the_main_process_is_gone(
    events: list[dict[str, Any]],
) -> None:
    """
    Once the pipe's reader is gone, the writer logs a warning, drops what
    it held and ignores later writes (the end of stdin stops the process).
    """
    read_end, write_end = os.pipe()
    reactor = WatchingReactor()
    writer = PipeWriter(reactor, write_end)
    writer.write(b"x" * (1 << 20))
    assert reactor.writers == [writer]
    os.close(read_end)
    writer.doWrite()
    writer.write(b"more")
    assert writer.broken
    assert reactor.writers == []
    warned = [formatEvent(e) for e in events if e.get("log_level") is LogLevel.warn]
    assert [w for w in warned if "cannot write to the main process" in w]
    writer.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(write_end)


def test_main_link_sends_its_frames_through_the_pipe_writer(pipe: tuple[int, int]) -> None:
    """
    With a pipe writer, the link's frames (a notice, and a message with its
    body) reach the pipe within the call, each a length and a payload.
    """
    read_end, write_end = pipe
    writer = PipeWriter(WatchingReactor(), write_end)
    link = MainLink(Limits(), lambda: None, out=writer)
    link.makeConnection(StringTransport())
    link.ready(2)
    link.submit(envelope("0042"), b"Subject: x\r\n\r\nbody\r\n")
    data = drain(read_end)
    frames = []
    while data:
        (length,) = struct.unpack_from(">I", data)
        frames.append(data[4 : 4 + length])
        data = data[4 + length :]
    assert [frame[:1] for frame in frames] == [READY, SUBMIT]
    _seq, sent, body = decode_submit(frames[1])
    assert sent == envelope("0042")
    assert body == b"Subject: x\r\n\r\nbody\r\n"
    assert cast(StringTransport, link.transport).value() == b""
    writer.close()


def test_answers_reach_the_child_at_once_and_its_stdin_closes_when_it_ends() -> None:
    """
    The main process writes to each child's stdin pipe within the call
    that answers (no reactor turn runs here), and closes the pipe once the
    child has ended.
    """
    g = make_gateway(count=1)
    wire = g.wire(0)
    wire.link.admit("192.0.2.1")
    wire.to_main()
    assert frame_kinds(wire.process.take())[-1:] == [b"k"]
    stdin = wire.process.stdin
    assert stdin is not None
    wire.end()
    assert os.read(stdin, 1) == b""


# -- the fallback: the main process accepts when no child can start ------------------


def fail_starts(g: Gateway, index: int, times: int, alive: Wire | None = None) -> None:
    """
    The child C{index} ends C{times} times in a row before it accepts, each
    started again after its back-off; the child of C{alive} answers the
    pings meanwhile.
    """
    for _ in range(times):
        child = g.pool.children[index]
        child.processEnded(Failure(ProcessTerminated(exitCode=1)))
        for _ in range(int(RESTART_DELAY_MAX / ACCEPTING_POLL)):
            g.reactor.advance(ACCEPTING_POLL)
            if alive is not None:
                alive.to_child()
                alive.to_main()


def test_the_main_process_accepts_after_starts_fail_in_a_row(
    events: list[dict[str, Any]],
) -> None:
    """
    When L{FALLBACK_AFTER} starts in a row end before their child accepts,
    the fallback runs, once, with a warning; children are still started.
    """
    calls: list[None] = []
    g = make_gateway(count=1, fallback=lambda: calls.append(None))
    fail_starts(g, 0, FALLBACK_AFTER - 1)
    assert calls == []
    fail_starts(g, 0, 1)
    assert calls == [None]
    assert g.pool.fell_back
    warned = [formatEvent(e) for e in events if e.get("log_level") is LogLevel.warn]
    assert [w for w in warned if "the main process accepts SMTP connections itself" in w]
    fail_starts(g, 0, FALLBACK_AFTER)
    assert calls == [None]
    assert list(g.pool.children) == [0]


def test_a_child_that_accepted_resets_the_count_of_failed_starts() -> None:
    """
    A child that once said it accepts is no failed start when it ends, and
    the failed starts before it no longer count.
    """
    calls: list[None] = []
    g = make_gateway(count=1, fallback=lambda: calls.append(None))
    fail_starts(g, 0, FALLBACK_AFTER - 1)
    wire = g.wire(0)
    wire.link.ready(1)
    wire.to_main()
    wire.end()
    g.reactor.advance(RESTART_DELAY_MAX)
    fail_starts(g, 0, FALLBACK_AFTER - 1)
    assert calls == []
    fail_starts(g, 0, 1)
    assert calls == [None]


def test_no_fallback_while_another_child_accepts() -> None:
    """
    With one child accepting, another that cannot start does not make the
    main process accept.
    """
    calls: list[None] = []
    g = make_gateway(count=2, fallback=lambda: calls.append(None))
    wire = g.wire(0)
    wire.link.ready(1)
    wire.to_main()
    fail_starts(g, 1, FALLBACK_AFTER + 1, alive=wire)
    assert g.pool.ready == 1
    assert calls == []


def test_spawn_failures_count_as_failed_starts(logged_errors: list[dict[str, Any]]) -> None:
    """
    A start whose spawn raises counts like a child that ended at once.
    """
    calls: list[None] = []
    g = make_gateway(count=1, fallback=lambda: calls.append(None))
    reactor = g.reactor

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise OSError(11, "Resource temporarily unavailable")

    reactor.spawnProcess = failing  # type: ignore[method-assign]
    g.wires[0].end()
    for _ in range(FALLBACK_AFTER):
        reactor.advance(RESTART_DELAY_MAX)
    assert calls == [None]
    assert len(take_errors(logged_errors)) == FALLBACK_AFTER - 1 + 1


@async_test
async def test_the_main_process_acceptor_serves_until_stopped() -> None:
    """
    L{MainProcessAcceptor.start} accepts on the sockets given once its
    service runs (asked before, it waits for the start), and stopping
    closes its ports but not the sockets.
    """
    from twisted.internet import reactor

    with waiting_connections(1) as (bound, factory, built):
        here = MainProcessAcceptor(reactor, lambda: [bound.fileno()], lambda: factory)
        here.start()
        assert not here.serving
        here.startService()
        assert here.serving
        [port] = here.ports
        port.doRead()
        assert len(built) == 1
        stopped = here.stopService()
        assert not here.serving
        assert stopped is not None
        await stopped
        assert bound.socket.fileno() >= 0


@async_test
async def test_failed_starts_count_per_acceptor_and_the_fallback_then_serves(
    logged_errors: list[dict[str, Any]],
) -> None:
    """
    Several acceptors failing to start together at boot (a transient
    shortage, say) is not enough: the fallback comes when one acceptor has
    failed L{FALLBACK_AFTER} starts in a row, and the main process then
    accepts.
    """
    from twisted.internet import reactor as real
    from twisted.internet.protocol import Protocol, ServerFactory

    from smtpgw.listening import bind_only
    from smtpgw.services import OrderedMultiService

    fake = FakeReactor()

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory")

    fake.spawnProcess = failing  # type: ignore[method-assign]
    bound = bind_only(0, None, 5, "127.0.0.1")
    here = MainProcessAcceptor(
        real, lambda: [bound.fileno()], lambda: ServerFactory.forProtocol(Protocol)
    )
    limits = Limits(max_size=MAX_SIZE)
    pool = AcceptorPool(
        reactor=fake,
        count=3,
        config=config(limits),
        sockets=lambda: SOCKETS,
        queue=FakeQueue(),
        connections=ConnectionCounter(10, total_limit=100),
        auth=AuthFailureTracker(limit=3, window=300.0, clock=fake),
        alerts=FlushingSink(),
        metrics=FakeMetrics(),
        argv=ARGV,
        fallback=here.start,
    )
    top = OrderedMultiService()
    pool.setServiceParent(top)
    here.setServiceParent(top)
    top.startService()
    try:
        assert not pool.fell_back
        fake.advance(RESTART_DELAY)
        assert not pool.fell_back
        fake.advance(RESTART_DELAY * 2)
        assert pool.fell_back
        assert here.serving
    finally:
        await top.stopService()
        bound.stopListening()
    assert not here.serving
    errors = take_errors(logged_errors)
    assert [kind for _, kind in errors] == [FileNotFoundError] * (FALLBACK_AFTER * 3)
