"""
Console sends under pre-emption (issue 5): a 100k-recipient send at a fixed
C{--rate} while priority-1 SMTP+ messages are injected.

    python -m bench.campaign_bench                    # 100,000 recipients at 500/s
    python -m bench.campaign_bench --scale 0.05       # a smoke run (5,000)
    python -m bench.campaign_bench --rate 200 --recipients 20000
    python -m bench.campaign_bench --gateway-arg=--preemption-grace --gateway-arg=0.2

The real gateway runs under C{twistd} with C{--rate R --relay
smtp://127.0.0.1:SINK}; the sink (L{SinkProtocol}, in a process of its own)
takes every message and writes, for each, the C{CLOCK_MONOTONIC} time of its
final dot, which is the delivery time. The recipients are imported with
C{smtpgw-admin recipients import}, the send is created with C{smtpgw-admin
campaign add}, and, once its messages arrive, priority-1 messages are sent
over SMTP (AUTH as a priority-1 SMTP+ user): every C{--cycle} seconds a burst
of C{--burst} messages over one connection, one after another, and
C{--singles} messages spaced out in the cycle, each over a connection of its
own. Each carries an C{X-Bench-Id} header; the client notes the monotonic
time of the C{250} after its final dot, the sink that of its arrival.

It prints the percentiles of C{250} to delivery of the priority-1 messages
against the target (50 ms plus one rate slot, C{1 / rate}), and the send's
throughput against C{--rate}, measured two ways:

  - over the whole send, from its first message's arrival to its last, pauses
    included;
  - over the time the send was not pre-empted: the same span without the
    union of the intervals from each priority-1 message's C{250} to its
    arrival plus the gateway's C{--preemption-grace} (the queue's own rule
    for keeping the send's gate closed, from observed times).

The pauses as the gateway itself recorded them (the send's C{state} and
C{paused_reason} in the database, read every C{POLL_STATE} seconds) are
printed beside them. Also: the gateway's CPU, the sink's, the rest of the
machine's, the journal's fsync times from C{/metrics}, exactly-once checks,
and whether the targets are met. A JSON summary goes to
C{bench/out/campaign.json}. See docs/benchmarks.md.

Everything runs on 127.0.0.1, in a temporary directory removed at the end;
the run stops after its counts, its wall-clock cap or a stall.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import json
import math
import os
import re
import shutil
import signal
import smtplib
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

from attrs import define, field, frozen
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import ServerFactory
from twisted.protocols.basic import LineOnlyReceiver

from bench.procstat import MachineCpu, cpu_count, tree_cpu_seconds
from bench.servers import (
    LOOPBACK,
    ServerError,
    free_port,
    log_problems,
    wait_for_port,
)
from smtpgw.queue import TokenBucket

#: The issue's target for priority-1 mail: p99 of C{250} to delivery at most
#: this, plus one rate slot (C{1 / rate}).
TARGET_P99_MS = 50.0
#: The issue's target for the send: its throughput within this share of
#: C{--rate}.
TARGET_RATE_SHARE = 0.02

#: How often the send's state is read from the database.
POLL_STATE = 0.05
#: How often the sink writes what it received to its file.
SINK_FLUSH = 0.1
#: The most rows one C{recipients import} takes
#: (L{smtpgw.recipients.MAX_IMPORT_ROWS}).
IMPORT_CHUNK = 100_000
#: The reason the send shows while priority-1 mail goes out.
PAUSED_REASON = "priority-1 SMTP+ traffic"
#: The default pre-emption grace of the gateway (C{--preemption-grace}).
DEFAULT_GRACE = 0.05

OUT = Path(__file__).resolve().parent / "out"

_BENCH_ID = b"x-bench-id:"


# --- the sink ---------------------------------------------------------------


@frozen
class Arrival:
    """
    One message as the sink took it.

    @ivar at: C{time.monotonic()} at its final dot.
    @ivar bench_id: its C{X-Bench-Id} (a priority-1 message), or L{None} (a
        message of the console send).
    @ivar recipients: its envelope recipients.
    @ivar mail_at: C{time.monotonic()} at its C{MAIL} command: what comes
        before is the gateway's own work, what comes after is the SMTP
        transaction.
    """

    at: float
    bench_id: str | None
    recipients: tuple[str, ...]
    mail_at: float = 0.0

    def line(self) -> str:
        """
        @return: how the sink writes it: time, time of MAIL, id (C{-}:
            none), recipients.
        """
        return (
            f"{self.at:.6f} {self.mail_at:.6f} {self.bench_id or '-'} "
            f"{','.join(self.recipients)}\n"
        )

    @classmethod
    def parse(cls, line: str) -> Arrival:
        """
        Read back a line written by L{line}.
        """
        at, mail_at, bench_id, recipients = line.rstrip("\n").split(" ", 3)
        return cls(
            float(at),
            None if bench_id == "-" else bench_id,
            tuple(r for r in recipients.split(",") if r),
            float(mail_at),
        )


class SinkProtocol(LineOnlyReceiver):
    """
    A minimal SMTP server that takes every message (with PIPELINING) and
    hands an L{Arrival} for each to C{record}. It answers as soon as a
    command arrives, so it adds no wait of its own.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, record: Any, clock: Any = time.monotonic) -> None:
        """
        @param record: called with each L{Arrival}.
        @param clock: the time of an arrival (monotonic seconds).
        """
        self._record = record
        self._clock = clock
        self._in_data = False
        self._in_headers = False
        self._bench_id: str | None = None
        self._recipients: list[str] = []
        self._mail_at = 0.0

    def connectionMade(self) -> None:
        self.sendLine(b"220 sink.bench.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self._in_data:
            self._data_line(line)
            return
        assert self.transport is not None
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.transport.write(
                b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n"
            )
        elif verb == b"HELO" or verb == b"NOOP":
            self.sendLine(b"250 2.0.0 Ok")
        elif verb == b"MAIL":
            self._mail_at = self._clock()
            self._recipients = []
            self.sendLine(b"250 2.1.0 Ok")
        elif verb == b"RCPT":
            address = line[8:].strip().split(b" ", 1)[0].strip(b"<>")
            self._recipients.append(address.decode("ascii", "replace"))
            self.sendLine(b"250 2.1.5 Ok")
        elif verb == b"DATA":
            self._in_data = self._in_headers = True
            self._bench_id = None
            self.sendLine(b"354 End data with <CR><LF>.<CR><LF>")
        elif verb == b"RSET":
            self._recipients = []
            self.sendLine(b"250 2.0.0 Ok")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 Error: command not recognized")

    def _data_line(self, line: bytes) -> None:
        if line == b".":
            at = self._clock()
            self._in_data = False
            self._record(Arrival(at, self._bench_id, tuple(self._recipients), self._mail_at))
            self._recipients = []
            self.sendLine(b"250 2.0.0 Ok: queued")
        elif self._in_headers:
            if not line:
                self._in_headers = False
            elif line[: len(_BENCH_ID)].lower() == _BENCH_ID:
                self._bench_id = line[len(_BENCH_ID) :].strip().decode("ascii", "replace")


def serve_sink(port: int, out: Path) -> int:
    """
    Run the sink on 127.0.0.1:C{port} until SIGTERM, appending each arrival
    to C{out} (flushed every L{SINK_FLUSH} seconds and at the end).

    @return: the exit status.
    """
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    tcp: IReactorTCP = reactor
    with out.open("w", buffering=1 << 16) as output:

        def record(arrival: Arrival) -> None:
            output.write(arrival.line())

        factory = ServerFactory.forProtocol(lambda: SinkProtocol(record))
        tcp.listenTCP(port, cast(ServerFactory, factory), backlog=1024, interface=LOOPBACK)
        flusher = LoopingCall(output.flush)
        flusher.start(SINK_FLUSH)
        reactor.run()
        output.flush()
    return 0


# --- what the figures are made of -------------------------------------------


def percentile(values: Sequence[float], share: float) -> float:
    """
    The nearest-rank percentile: the smallest value with at least C{share}
    of the values at or below it.

    @raise ValueError: for no values.
    """
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def merge_intervals(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """
    The union of intervals, as sorted disjoint intervals (touching ones
    merged; empty ones dropped).
    """
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def covered(intervals: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """
    How much of [C{start}, C{end}] disjoint C{intervals} cover, in seconds.
    """
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)


@frozen
class Injected:
    """
    One priority-1 message the client sent.

    @ivar bench_id: its C{X-Bench-Id}.
    @ivar sent_at: when the client started its transaction (MAIL).
    @ivar accepted_at: when the client read the C{250} after its final dot.
    @ivar burst: whether it was part of a burst (else a single).
    @ivar group: the connection it was sent over (the burst), numbered from 0.
    """

    bench_id: str
    sent_at: float
    accepted_at: float
    burst: bool
    group: int = 0


def inside_bursts(
    injected: Sequence[Injected], arrivals: dict[str, float], console: Sequence[float]
) -> list[list[float]]:
    """
    For each burst, the console messages that reached the sink between its
    first and its last message's arrival, each as milliseconds after the
    burst's first C{250}. The issue wants none sent after the burst came
    ("all 20 delivered before any further console message"); one already
    being sent when it came may still land among them.

    @param console: the sorted arrival times of the send's messages.
    """
    bursts: dict[int, list[Injected]] = {}
    for message in injected:
        if message.burst and message.bench_id in arrivals:
            bursts.setdefault(message.group, []).append(message)
    found = []
    for _, messages in sorted(bursts.items()):
        if len(messages) < 2:
            continue
        came = min(m.accepted_at for m in messages)
        times = [arrivals[m.bench_id] for m in messages]
        low = bisect.bisect_right(console, min(times))
        high = bisect.bisect_left(console, max(times))
        found.append([1000 * (at - came) for at in console[low:high]])
    return found


def preempted_intervals(
    injected: Sequence[Injected], arrivals: dict[str, float], grace: float, end: float
) -> list[tuple[float, float]]:
    """
    When the send's gate was closed by the queue's rule, from observed
    times: from each priority-1 message's C{250} to its arrival plus
    C{grace}, merged. A message that never arrived counts until C{end}.
    """
    return merge_intervals(
        (i.accepted_at, arrivals.get(i.bench_id, end) + grace) for i in injected
    )


@frozen
class StateSample:
    """
    The send as the gateway's database showed it at one moment.

    @ivar at: C{time.monotonic()} of the read.
    @ivar state: its C{state}.
    @ivar reason: its C{paused_reason}.
    @ivar sent: its C{sent}: messages handed to the queue (durable in the
        journal, the cursor moved past them).
    """

    at: float
    state: str
    reason: str | None
    sent: int = 0


def state_intervals(
    samples: Sequence[StateSample], reason: str, end: float
) -> list[tuple[float, float]]:
    """
    The intervals the polled state of the send was C{paused} for C{reason},
    each from the first sample that showed it to the first that did not.
    """
    intervals = []
    since: float | None = None
    for sample in samples:
        paused = sample.state == "paused" and sample.reason == reason
        if paused and since is None:
            since = sample.at
        elif not paused and since is not None:
            intervals.append((since, sample.at))
            since = None
    if since is not None:
        intervals.append((since, end))
    return intervals


def overtaken(console: Sequence[float], start: float, end: float) -> int:
    """
    How many of the sorted console arrival times fall in (C{start}, C{end}).
    """
    return max(0, bisect.bisect_left(console, end) - bisect.bisect_right(console, start))


def throughput_figures(
    console: Sequence[float],
    preempted: Sequence[tuple[float, float]],
    rate: float,
    created_at: float | None = None,
) -> dict[str, Any]:
    """
    The send's throughput over its whole span (first arrival to last) and
    over the part of it not C{preempted}, each with its ratio to C{rate}.

    @param console: the sorted arrival times of the send's messages.
    @param created_at: when the send was created, for the rate from then.
    """
    if len(console) < 2:
        return {"messages": len(console)}
    first, last = console[0], console[-1]
    span = last - first
    paused = covered(preempted, first, last)
    running = span - paused
    whole = (len(console) - 1) / span if span > 0 else math.nan
    unpaused = (len(console) - 1) / running if running > 0 else math.nan
    figures: dict[str, Any] = {
        "messages": len(console),
        "span_s": round(span, 3),
        "preempted_s": round(paused, 3),
        "not_preempted_s": round(running, 3),
        "whole_per_s": round(whole, 2),
        "whole_ratio": round(whole / rate, 4),
        "not_preempted_per_s": round(unpaused, 2),
        "not_preempted_ratio": round(unpaused / rate, 4),
    }
    if created_at is not None and last > created_at:
        since = len(console) / (last - created_at)
        figures["from_creation_s"] = round(last - created_at, 3)
        figures["from_creation_per_s"] = round(since, 2)
        figures["from_creation_ratio"] = round(since / rate, 4)
    return figures


#: The width of the bins of the send's timeline, in seconds.
BIN = 0.25
#: A bin of the send below this share of the rate, while not pre-empted, is
#: a slow bin.
SLOW_SHARE = 0.9


def slow_bins(
    console: Sequence[float],
    preempted: Sequence[tuple[float, float]],
    samples: Sequence[StateSample],
    rate: float,
) -> dict[str, Any]:
    """
    Where the send ran below the rate while nothing pre-empted it: the
    L{BIN}-second bins wholly outside C{preempted} with fewer than
    L{SLOW_SHARE} of the rate's messages, and, for each, whether the queue
    had a bin's worth of the send's messages waiting at its start (C{sent}
    as polled minus arrivals so far). Without them the runner was late
    filling its window ("starved"); with them the queue, the relay or the
    sink was slow.
    """
    if len(console) < 2:
        return {}
    times = [sample.at for sample in samples]
    first, last = console[0], console[-1]
    running = slow = starved = 0
    slowest: list[float] = []
    start = first
    while start + BIN <= last:
        end = start + BIN
        if covered(preempted, start, end) == 0:
            running += 1
            count = bisect.bisect_left(console, end) - bisect.bisect_left(console, start)
            if count < SLOW_SHARE * rate * BIN:
                slow += 1
                slowest.append(count / BIN)
                found = bisect.bisect_right(times, start) - 1
                waiting = None
                if found >= 0:
                    waiting = samples[found].sent - bisect.bisect_left(console, start)
                if waiting is not None and waiting < rate * BIN:
                    starved += 1
        start = end
    return {
        "bin_s": BIN,
        "running_bins": running,
        "slow_bins": slow,
        "slow_bins_starved": starved,
        "slowest_per_s": sorted(slowest)[:5],
    }


def per_second(times: Sequence[float], origin: float) -> list[int]:
    """
    How many of the sorted C{times} fall in each second from C{origin}.
    """
    if not times:
        return []
    counts = [0] * (int(times[-1] - origin) + 1)
    for at in times:
        counts[max(0, int(at - origin))] += 1
    return counts


def within(ratio: float, share: float = TARGET_RATE_SHARE) -> bool:
    """
    Whether a throughput C{ratio} to the rate is within C{share} of 1.
    """
    # 0.98 - 1 is a hair past -0.02 in binary floating point.
    return abs(ratio - 1.0) <= share + 1e-12


# --- the gateway and its helpers ---------------------------------------------


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _admin(data_dir: Path, *args: str, timeout: float = 300) -> dict[str, Any]:
    argv = [_tool("smtpgw-admin"), "--data-dir", str(data_dir), "--json", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise ServerError(f"smtpgw-admin {' '.join(args[:3])}: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip() else {}
    return result


def _terminate(process: subprocess.Popen[bytes] | None, grace: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def write_recipients(path: Path, first: int, count: int) -> None:
    """
    A CSV of C{count} recipients (email, name) numbered from C{first}.
    """
    with path.open("w") as out:
        out.write("email,name\n")
        for number in range(first, first + count):
            out.write(f"reader{number:07d}@example.org,Reader {number}\n")


@define
class SinkFile:
    """
    Follows the sink's file while it grows: counts the console messages.
    """

    path: Path
    console: int = 0
    priority: int = 0
    _offset: int = 0
    _partial: str = ""

    def read(self) -> None:
        """
        Count what was appended since the last call.
        """
        try:
            with self.path.open() as source:
                source.seek(self._offset)
                text = source.read()
                self._offset = source.tell()
        except OSError:
            return
        text = self._partial + text
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            if " - " in line:
                self.console += 1
            elif line:
                self.priority += 1


@define
class StatePoller:
    """
    Reads the send's C{state} and C{paused_reason} from the gateway's
    database every L{POLL_STATE} seconds, on a thread, keeping each change.
    """

    database: Path
    campaign_id: int
    samples: list[StateSample] = field(factory=list)
    polls: int = 0
    errors: int = 0
    _stop: threading.Event = field(factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """
        Start polling.
        """
        self._thread = threading.Thread(target=self._run, name="state-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """
        Stop polling and note the last state.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        connection = sqlite3.connect(self.database, timeout=1.0)
        try:
            last: tuple[str, str | None, int] | None = None
            while not self._stop.is_set():
                try:
                    row = connection.execute(
                        "SELECT state, paused_reason, sent FROM campaigns WHERE id = ?",
                        (self.campaign_id,),
                    ).fetchone()
                except sqlite3.Error:
                    self.errors += 1
                    row = None
                at = time.monotonic()
                self.polls += 1
                if row is not None and (row[0], row[1], row[2]) != last:
                    last = (row[0], row[1], row[2])
                    self.samples.append(StateSample(at, row[0], row[1], row[2]))
                self._stop.wait(POLL_STATE)
        finally:
            connection.close()


def _message(bench_id: str, number: int) -> bytes:
    return (
        "From: alerts@example.com\r\n"
        f"To: urgent{number}@example.org\r\n"
        f"Subject: priority-1 {bench_id}\r\n"
        f"Message-ID: <{bench_id}@bench.test>\r\n"
        f"X-Bench-Id: {bench_id}\r\n"
        "\r\n"
        f"An urgent message, number {number}.\r\n"
    ).encode("ascii")


@define
class Injector:
    """
    Sends the priority-1 messages over SMTP with AUTH, noting the time of
    each C{250}.
    """

    port: int
    username: str
    password: str = field(repr=False)
    sent: list[Injected] = field(factory=list)
    failures: list[str] = field(factory=list)
    connections: int = 0

    def send(self, count: int, *, burst: bool) -> None:
        """
        Send C{count} messages one after another over one connection.
        """
        group = self.connections
        self.connections += 1
        try:
            with smtplib.SMTP(LOOPBACK, self.port, local_hostname="bench.test", timeout=30) as c:
                c.login(self.username, self.password)
                for _ in range(count):
                    number = len(self.sent) + len(self.failures)
                    bench_id = f"p1-{number:06d}"
                    began = time.monotonic()
                    c.sendmail(
                        "alerts@example.com",
                        [f"urgent{number}@example.org"],
                        _message(bench_id, number),
                    )
                    accepted = time.monotonic()
                    self.sent.append(Injected(bench_id, began, accepted, burst, group))
        except (smtplib.SMTPException, OSError) as error:
            self.failures.append(f"{type(error).__name__}: {error}")


@frozen
class Settings:
    """
    What one run does.

    @ivar recipients: the send's recipients.
    @ivar rate: the gateway's C{--rate}.
    @ivar burst: priority-1 messages in each burst.
    @ivar singles: single priority-1 messages in each cycle, spaced out.
    @ivar cycle: seconds between two bursts.
    @ivar max_priority: the most priority-1 messages sent.
    @ivar warmup: seconds of the send before the first injection.
    @ivar time_limit: the wall-clock cap of the send, seconds.
    @ivar stall: give up after this long without a console message.
    @ivar concurrency: the gateway's C{--concurrency}.
    @ivar grace: the gateway's C{--preemption-grace}.
    @ivar gateway_args: more options for the gateway.
    @ivar twistd_args: more options for C{twistd} (e.g. a profiler).
    """

    recipients: int
    rate: float
    burst: int
    singles: int
    cycle: float
    max_priority: int
    warmup: float
    time_limit: float
    stall: float
    concurrency: int
    grace: float
    gateway_args: tuple[str, ...] = ()
    twistd_args: tuple[str, ...] = ()

    def schedule(self) -> list[tuple[float, int, bool]]:
        """
        One cycle's injections: (seconds into the cycle, messages, burst).
        """
        plan = [(0.0, self.burst, True)] if self.burst else []
        step = self.cycle / (self.singles + 1)
        plan += [(step * (n + 1), 1, False) for n in range(self.singles)]
        return plan


def _metrics(port: int, token: str) -> dict[str, Any]:
    """
    The journal's fsync histogram from the gateway's C{/metrics}.
    """
    request = urllib.request.Request(
        f"http://{LOOPBACK}:{port}/metrics", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 (http on loopback)
            text = reply.read().decode()
    except OSError as error:
        return {"error": str(error)}
    buckets: list[tuple[float, float]] = []
    total = count = 0.0
    for line in text.splitlines():
        found = re.match(r'smtpgw_journal_fsync_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
        if found:
            buckets.append((float(found.group(1)), float(found.group(2))))
        elif line.startswith("smtpgw_journal_fsync_seconds_sum "):
            total = float(line.split()[1])
        elif line.startswith("smtpgw_journal_fsync_seconds_count "):
            count = float(line.split()[1])
    result: dict[str, Any] = {"fsyncs": int(count)}
    if count:
        result["fsync_mean_ms"] = round(1000 * total / count, 3)
        for share in (0.5, 0.99):
            bound = next((le for le, n in buckets if n >= share * count), math.inf)
            result[f"fsync_p{int(share * 100)}_le_ms"] = (
                None if math.isinf(bound) else round(1000 * bound, 3)
            )
        result["fsync_buckets"] = {
            ("+Inf" if math.isinf(le) else f"{1000 * le:g}ms"): int(n) for le, n in buckets
        }
    return result


def run(settings: Settings, workdir: Path, say: Any) -> dict[str, Any]:
    """
    Start the sink and the gateway, run the send with the injections, stop
    both, and work out the figures.
    """
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True)
    sink_out = workdir / "sink.txt"
    sink_log = workdir / "sink.log"
    gateway_log = workdir / "gateway.log"
    sink: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    poller: StatePoller | None = None
    result: dict[str, Any] = {}
    try:
        sink_port = free_port()
        with sink_log.open("ab") as output:
            sink = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.campaign_bench",
                    "--serve-sink",
                    str(sink_port),
                    "--sink-out",
                    str(sink_out),
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )
        wait_for_port(sink_port, sink, sink_log, 30)

        began = time.monotonic()
        _admin(data_dir, "list", "add", "bench")
        user = _admin(
            data_dir,
            "user",
            "add",
            "--list",
            "bench",
            "--priority",
            "1",
            "--domains",
            "example.com",
        )
        token = str(_admin(data_dir, "token", "add", "bench")["token"])
        for first in range(1, settings.recipients + 1, IMPORT_CHUNK):
            count = min(IMPORT_CHUNK, settings.recipients + 1 - first)
            csv = workdir / f"recipients-{first}.csv"
            write_recipients(csv, first, count)
            imported = _admin(data_dir, "recipients", "import", "--list", "bench", str(csv))
            if imported.get("imported") != count:
                raise ServerError(f"imported {imported.get('imported')} of {count} recipients")
            csv.unlink()
        import_s = time.monotonic() - began
        say(f"imported {settings.recipients} recipients in {import_s:.1f} s")

        port, admin_port = free_port(), free_port()
        argv = [_tool("twistd"), "-n", "--pidfile=", *settings.twistd_args, "smtpgw"]
        argv += ["--data-dir", str(data_dir), "--ports", str(port), "--interface", LOOPBACK]
        argv += ["--hostname", "bench.test", "--relay", f"smtp://{LOOPBACK}:{sink_port}"]
        argv += ["--rate", f"{settings.rate:g}", "--concurrency", str(settings.concurrency)]
        argv += ["--preemption-grace", f"{settings.grace:g}"]
        argv += ["--admin", f"tcp:{admin_port}:interface={LOOPBACK}", *settings.gateway_args]
        with gateway_log.open("ab") as output:
            gateway = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, cwd=workdir)
        wait_for_port(port, gateway, gateway_log, 60)
        say(f"gateway up: {' '.join(argv[3:])}")

        text = (
            "Hello {{name}},\r\n\r\n"
            + "This is the newsletter of the benchmark, a paragraph of ordinary text. " * 12
            + "\r\n"
        )
        machine_before = MachineCpu.now()
        gateway_before = tree_cpu_seconds(gateway.pid)
        sink_before = tree_cpu_seconds(sink.pid)
        own_before = sum(os.times()[:2])
        created_at = time.monotonic()
        campaign = _admin(
            data_dir,
            "campaign",
            "add",
            "--list",
            "bench",
            "--subject",
            "News for {{name}}",
            "--sender",
            "news@example.com",
            "--text",
            text,
        )
        poller = StatePoller(data_dir / "smtpgw.db", int(campaign["id"]))
        if not poller.database.exists():
            raise ServerError(f"no database at {poller.database}")
        poller.start()

        follow = SinkFile(sink_out)
        injector = Injector(port, str(user["username"]), str(user["password"]))
        deadline = created_at + settings.time_limit
        stopped: str | None = None
        # Injections stop when less than two seconds of the send are left,
        # so that each one meets the send running.
        stop_injecting_at = settings.recipients - max(1, int(2 * settings.rate))
        last_progress = time.monotonic()
        seen = 0
        inject_from: float | None = None
        plan = settings.schedule()
        cycle_start = 0.0
        step = 0
        while True:
            now = time.monotonic()
            follow.read()
            if follow.console > seen:
                seen, last_progress = follow.console, now
                if inject_from is None:
                    inject_from = now + settings.warmup
                    cycle_start = inject_from
                    say(f"first console message {now - created_at:.2f} s after `campaign add`")
            if follow.console >= settings.recipients:
                break
            if now > deadline:
                stopped = f"wall-clock cap of {settings.time_limit:.0f} s"
                break
            if now - last_progress > settings.stall:
                stopped = f"no console message for {settings.stall:.0f} s"
                break
            if (
                inject_from is not None
                and plan
                and now >= cycle_start + plan[step][0]
                and len(injector.sent) + len(injector.failures) < settings.max_priority
                and follow.console < stop_injecting_at
            ):
                _, count, burst = plan[step]
                count = min(count, settings.max_priority - len(injector.sent))
                injector.send(count, burst=burst)
                step += 1
                if step == len(plan):
                    step = 0
                    cycle_start += settings.cycle
                continue
            time.sleep(0.01)
        send_over = time.monotonic()
        gateway_cpu = tree_cpu_seconds(gateway.pid) - gateway_before
        sink_cpu = tree_cpu_seconds(sink.pid) - sink_before
        own_cpu = sum(os.times()[:2]) - own_before
        machine_after = MachineCpu.now()
        say(
            f"send over after {send_over - created_at:.1f} s: {follow.console} console and "
            f"{follow.priority} priority-1 messages at the sink"
            + (f" (stopped: {stopped})" if stopped else "")
        )
        # The last priority-1 messages may still be on their way.
        wait_until = time.monotonic() + 10
        while follow.priority < len(injector.sent) and time.monotonic() < wait_until:
            time.sleep(0.05)
            follow.read()
        time.sleep(2 * POLL_STATE)
        poller.stop()
        metrics = _metrics(admin_port, token)
        shown = _admin(data_dir, "campaign", "show", str(campaign["id"]))
        _terminate(gateway, 30)
        _terminate(sink, 10)

        arrivals = [Arrival.parse(line) for line in sink_out.read_text().splitlines() if line]
        result = analyse(
            settings,
            arrivals,
            injector,
            poller.samples,
            created_at=created_at,
            end=send_over,
        )
        elapsed = send_over - created_at
        busy = machine_after.busy - machine_before.busy
        result.update(
            {
                "stopped": stopped,
                "import_s": round(import_s, 2),
                "cpu": {
                    "gateway_s": round(gateway_cpu, 2),
                    "gateway_cores": round(gateway_cpu / elapsed, 3),
                    "gateway_ms_per_message": round(1000 * gateway_cpu / max(1, len(arrivals)), 3),
                    "sink_cores": round(sink_cpu / elapsed, 3),
                    "bench_cores": round(own_cpu / elapsed, 3),
                    "other_cores": round(
                        max(0.0, busy - gateway_cpu - sink_cpu - own_cpu) / elapsed, 3
                    ),
                    "steal_cores": round(
                        (machine_after.steal - machine_before.steal) / elapsed, 3
                    ),
                },
                "journal": metrics,
                "campaign_shown": {
                    k: shown.get(k)
                    for k in ("state", "sent", "total", "delivered", "bounced", "in_doubt")
                },
                "state_polls": poller.polls,
                "state_poll_errors": poller.errors,
                "injection_failures": injector.failures[:5],
                "gateway_log_problems": log_problems(gateway_log),
                "sink_log_problems": log_problems(sink_log),
            }
        )
    finally:
        if poller is not None:
            poller.stop()
        _terminate(gateway, 30)
        _terminate(sink, 10)
    return result


def analyse(
    settings: Settings,
    arrivals: Sequence[Arrival],
    injector: Injector,
    samples: Sequence[StateSample],
    *,
    created_at: float,
    end: float,
) -> dict[str, Any]:
    """
    The figures of a run, from what the sink, the client and the poller saw.
    """
    console = sorted(a.at for a in arrivals if a.bench_id is None)
    recipients: dict[str, int] = {}
    for a in arrivals:
        if a.bench_id is None:
            for r in a.recipients:
                recipients[r] = recipients.get(r, 0) + 1
    delivered = {a.bench_id: a.at for a in arrivals if a.bench_id is not None}
    slot_ms = 1000.0 / settings.rate if settings.rate else 0.0
    target_ms = TARGET_P99_MS + slot_ms
    latencies = [
        1000 * (delivered[i.bench_id] - i.accepted_at)
        for i in injector.sent
        if i.bench_id in delivered
    ]
    latency: dict[str, Any] = {
        "sent": len(injector.sent),
        "delivered": len(latencies),
        "bursts_of": settings.burst,
        "target_p99_ms": round(target_ms, 3),
    }
    if latencies:
        latency.update(
            {
                f"p{round(share * 100)}_ms": round(percentile(latencies, share), 3)
                for share in (0.5, 0.95, 0.99)
            }
        )
        latency["max_ms"] = round(max(latencies), 3)
        latency["min_ms"] = round(min(latencies), 3)
        latency["met"] = latency["p99_ms"] <= target_ms and len(latencies) == len(injector.sent)
        for burst in (True, False):
            part = [
                1000 * (delivered[i.bench_id] - i.accepted_at)
                for i in injector.sent
                if i.burst is burst and i.bench_id in delivered
            ]
            if part:
                latency["burst" if burst else "single"] = {
                    "n": len(part),
                    "p50_ms": round(percentile(part, 0.5), 3),
                    "p99_ms": round(percentile(part, 0.99), 3),
                    "max_ms": round(max(part), 3),
                }
        mail_at = {a.bench_id: a.mail_at for a in arrivals if a.bench_id is not None}
        inside = [
            1000 * (mail_at[i.bench_id] - i.accepted_at)
            for i in injector.sent
            if i.bench_id in mail_at
        ]
        transaction = [1000 * (a.at - a.mail_at) for a in arrivals if a.bench_id is not None]
        for name, part in (("to_mail", inside), ("mail_to_dot", transaction)):
            latency[f"{name}_p50_ms"] = round(percentile(part, 0.5), 3)
            latency[f"{name}_p99_ms"] = round(percentile(part, 0.99), 3)
            latency[f"{name}_max_ms"] = round(max(part), 3)
        acceptance = [1000 * (i.accepted_at - i.sent_at) for i in injector.sent]
        latency["client_mail_to_250_p50_ms"] = round(percentile(acceptance, 0.5), 3)
        latency["client_mail_to_250_p99_ms"] = round(percentile(acceptance, 0.99), 3)
        passed = [
            overtaken(console, i.accepted_at, delivered[i.bench_id])
            for i in injector.sent
            if i.bench_id in delivered
        ]
        latency["console_arrivals_between_250_and_delivery"] = {
            "total": sum(passed),
            "max": max(passed),
            "messages_with_any": sum(1 for n in passed if n),
        }
        within_bursts = inside_bursts(injector.sent, delivered, console)
        offsets = [offset for burst in within_bursts for offset in burst]
        latency["console_arrivals_inside_bursts"] = {
            "bursts": len(within_bursts),
            "total": len(offsets),
            "max": max((len(burst) for burst in within_bursts), default=0),
            "bursts_with_any": sum(1 for burst in within_bursts if burst),
            "latest_after_first_250_ms": round(max(offsets), 3) if offsets else None,
        }
        latency["each"] = [
            [i.group, round(1000 * (delivered[i.bench_id] - i.accepted_at), 3)]
            for i in injector.sent
            if i.bench_id in delivered
        ]
    last = console[-1] if console else end
    preempted = preempted_intervals(injector.sent, delivered, settings.grace, end)
    shown = state_intervals(samples, PAUSED_REASON, end)
    send = throughput_figures(console, preempted, settings.rate, created_at)
    if len(console) >= 2:
        spells = [p for p in preempted if p[1] > console[0] and p[0] < last]
        send["preemptions"] = len(spells)
        # Each spell ends with the grace; the rest of it is the priority-1
        # mail being accepted and sent.
        send["preempted_grace_s"] = round(sum(min(settings.grace, b - a) for a, b in spells), 3)
        send["expected_whole_ratio"] = round(send["not_preempted_s"] / send["span_s"], 4)
        # The rate bucket is full at the start and again after each spell:
        # that many messages leave at once on top of the rate.
        capacity = TokenBucket.for_rate(settings.rate).capacity
        refills = capacity + sum(min(capacity, settings.rate * (b - a)) for a, b in spells)
        send["bucket_capacity"] = capacity
        send["bucket_refills"] = round(refills, 1)
        if send["not_preempted_s"] > 0:
            less = (len(console) - 1 - refills) / send["not_preempted_s"]
            send["not_preempted_less_refills_per_s"] = round(less, 2)
            send["not_preempted_less_refills_ratio"] = round(less / settings.rate, 4)
        send["paused_as_recorded_s"] = round(covered(shown, console[0], last), 3)
        send["pauses_as_recorded"] = len(shown)
        send["whole_met"] = within(send["whole_ratio"])
        send["not_preempted_met"] = within(send["not_preempted_ratio"])
    everything = sorted(a.at for a in arrivals)
    if len(everything) >= 2:
        span = everything[-1] - everything[0]
        send["gateway_wide_per_s"] = round((len(everything) - 1) / span, 2)
        send["gateway_wide_ratio"] = round((len(everything) - 1) / span / settings.rate, 4)
    duplicates = sum(n - 1 for n in recipients.values() if n > 1)
    origin = console[0] if console else created_at
    return {
        "priority_1": latency,
        "send": send,
        "slow_bins": slow_bins(console, preempted, samples, settings.rate),
        "timeline": {
            "console_per_s": per_second(console, origin),
            "priority_1_per_s": per_second(sorted(delivered.values()), origin),
        },
        "exactly_once": {
            "recipients": settings.recipients,
            "distinct_delivered": len(recipients),
            "missing": settings.recipients - len(recipients),
            "duplicates": duplicates,
        },
        "duration_s": round(end - created_at, 3),
    }


def report(summary: dict[str, Any], say: Any) -> None:
    """
    Print the figures of a run against the targets.
    """
    settings = summary["settings"]
    latency = summary["priority_1"]
    send = summary["send"]
    once = summary["exactly_once"]
    cpu = summary["cpu"]
    say("")
    say(
        f"priority-1, 250 -> delivery at the sink ({latency['delivered']} of "
        f"{latency['sent']} delivered):"
    )
    if "p99_ms" in latency:
        say(
            f"  p50 {latency['p50_ms']:.2f} ms  p95 {latency['p95_ms']:.2f} ms  "
            f"p99 {latency['p99_ms']:.2f} ms  max {latency['max_ms']:.2f} ms  "
            f"(min {latency['min_ms']:.2f} ms)"
        )
        for part in ("burst", "single"):
            if part in latency:
                figures = latency[part]
                say(
                    f"  {part + 's':<7} n={figures['n']:<4} p50 {figures['p50_ms']:.2f} ms  "
                    f"p99 {figures['p99_ms']:.2f} ms  max {figures['max_ms']:.2f} ms"
                )
        say(
            f"  of which 250 -> MAIL at the sink (the gateway: dispatch, journal, connection): "
            f"p50 {latency['to_mail_p50_ms']:.2f} ms, p99 {latency['to_mail_p99_ms']:.2f} ms, "
            f"max {latency['to_mail_max_ms']:.2f} ms; MAIL -> final dot (the SMTP "
            f"transaction): p50 {latency['mail_to_dot_p50_ms']:.2f} ms, p99 "
            f"{latency['mail_to_dot_p99_ms']:.2f} ms, max {latency['mail_to_dot_max_ms']:.2f} ms"
        )
        overtakes = latency["console_arrivals_between_250_and_delivery"]
        say(
            f"  console messages that reached the sink between a priority-1 250 and its "
            f"delivery: {overtakes['total']} in all, at most {overtakes['max']} for one"
        )
        inside = latency["console_arrivals_inside_bursts"]
        latest = inside["latest_after_first_250_ms"]
        say(
            f"  console messages that reached the sink inside a burst (between its first and "
            f"last arrival): {inside['total']} in {inside['bursts_with_any']} of "
            f"{inside['bursts']} bursts"
            + ("" if latest is None else f", the latest {latest:.1f} ms after its first 250")
        )
        verdict = "met" if latency["met"] else "NOT met"
        say(f"  target p99 <= {latency['target_p99_ms']:.1f} ms (50 ms + 1/rate): {verdict}")
    rate = settings["rate"]
    say(f"\nconsole send at --rate {rate:g}/s ({send.get('messages', 0)} messages delivered):")
    if "whole_per_s" in send:
        say(
            f"  whole send, pauses included: {send['whole_per_s']:.1f}/s over "
            f"{send['span_s']:.1f} s = {send['whole_ratio']:.3f} x rate "
            f"({'within' if send['whole_met'] else 'NOT within'} 2 %)"
        )
        say(
            f"  not pre-empted: {send['not_preempted_per_s']:.1f}/s over "
            f"{send['not_preempted_s']:.1f} s = {send['not_preempted_ratio']:.3f} x rate "
            f"({'within' if send['not_preempted_met'] else 'NOT within'} 2 %)"
        )
        say(
            f"  pre-empted {send['preempted_s']:.1f} s in {send['preemptions']} spells "
            f"(250 -> delivery + {settings['grace']:g} s grace, {send['preempted_grace_s']:.1f} s "
            f"of it grace); the gateway recorded {send['paused_as_recorded_s']:.1f} s paused in "
            f"{send['pauses_as_recorded']}; at exactly the rate when not pre-empted the whole "
            f"send would be {send['expected_whole_ratio']:.3f} x rate"
        )
        if "not_preempted_less_refills_per_s" in send:
            say(
                f"  not pre-empted, less the {send['bucket_refills']:g} messages the rate "
                f"bucket (capacity {send['bucket_capacity']:g}) let out at once at the start and "
                f"after each spell: {send['not_preempted_less_refills_per_s']:.1f}/s = "
                f"{send['not_preempted_less_refills_ratio']:.3f} x rate"
            )
        if "from_creation_per_s" in send:
            say(
                f"  from `campaign add`: {send['from_creation_per_s']:.1f}/s over "
                f"{send['from_creation_s']:.1f} s = {send['from_creation_ratio']:.3f} x rate"
            )
        say(
            f"  gateway-wide (console + priority-1): {send['gateway_wide_per_s']:.1f}/s "
            f"= {send['gateway_wide_ratio']:.3f} x rate"
        )
    slow = summary["slow_bins"]
    if slow:
        say(
            f"  {slow['slow_bins']} of {slow['running_bins']} {slow['bin_s']:g}-s bins while "
            f"not pre-empted were below {SLOW_SHARE:.0%} of the rate; in "
            f"{slow['slow_bins_starved']} of them the queue held less than a bin's worth of "
            f"the send (the runner was late)"
        )
    say(
        f"  exactly once: {once['distinct_delivered']} of {once['recipients']} recipients, "
        f"{once['missing']} missing, {once['duplicates']} duplicates"
    )
    say(
        f"\nduration {summary['duration_s']:.1f} s; gateway {cpu['gateway_cores']:.2f} cores "
        f"({cpu['gateway_ms_per_message']:.2f} ms CPU a message), sink {cpu['sink_cores']:.2f}, "
        f"bench {cpu['bench_cores']:.2f}, other {cpu['other_cores']:.2f} cores; load average "
        f"{' '.join(str(v) for v in summary['loadavg_before'])} -> "
        f"{' '.join(str(v) for v in summary['loadavg_after'])}"
    )
    journal = summary["journal"]
    if "fsync_mean_ms" in journal:
        say(
            f"journal: {journal['fsyncs']} fsyncs, mean {journal['fsync_mean_ms']:.2f} ms, "
            f"p50 <= {journal['fsync_p50_le_ms']} ms, p99 <= {journal['fsync_p99_le_ms']} ms"
        )
    if summary.get("stopped"):
        say(f"INCOMPLETE: {summary['stopped']}")
    for name in ("gateway_log_problems", "sink_log_problems"):
        if summary[name]["count"]:
            say(f"{name}: {summary[name]['count']}: {summary[name]['first']}")
    if summary["injection_failures"]:
        say(f"injection failures: {summary['injection_failures']}")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """
    The command line.
    """
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0].strip())
    parser.add_argument("--recipients", type=int, default=100_000, help="(100000)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply --recipients (1.0)")
    parser.add_argument("--rate", type=float, default=500.0, help="the gateway's --rate (500)")
    parser.add_argument("--burst", type=int, default=20, help="priority-1 messages a burst (20)")
    parser.add_argument(
        "--singles", type=int, default=2, help="single priority-1 messages a cycle (2)"
    )
    parser.add_argument("--cycle", type=float, default=10.0, help="seconds between bursts (10)")
    parser.add_argument(
        "--priority-messages", type=int, default=2000, help="the most priority-1 messages (2000)"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of the send before injecting (2)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=900.0, help="cap on the send, seconds (900)"
    )
    parser.add_argument(
        "--stall", type=float, default=30.0, help="give up after this long without progress"
    )
    parser.add_argument("--concurrency", type=int, default=20, help="the gateway's (20)")
    parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        help="the gateway's --preemption-grace (0.05, its default)",
    )
    parser.add_argument(
        "--gateway-arg", action="append", default=[], help="another gateway option (repeatable)"
    )
    parser.add_argument(
        "--twistd-arg", action="append", default=[], help="another twistd option (repeatable)"
    )
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json-out", type=Path, default=OUT / "campaign.json")
    parser.add_argument("--serve-sink", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--sink-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_sink is None:
        recipients = round(args.recipients * args.scale)
        if not 10 <= recipients <= 10_000_000:
            parser.error("--recipients x --scale must be between 10 and 10,000,000")
        if not args.rate > 0:
            parser.error("--rate must be above 0: the target is a share of it")
        args.recipients = recipients
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the benchmark (or, with C{--serve-sink}, the sink).

    @return: the exit status: 1 when the run could not be made.
    """
    args = parse(argv)
    if args.serve_sink is not None:
        return serve_sink(args.serve_sink, args.sink_out)
    settings = Settings(
        recipients=args.recipients,
        rate=args.rate,
        burst=args.burst,
        singles=args.singles,
        cycle=args.cycle,
        max_priority=args.priority_messages,
        warmup=args.warmup,
        time_limit=args.time_limit,
        stall=args.stall,
        concurrency=args.concurrency,
        grace=args.grace,
        gateway_args=tuple(args.gateway_arg),
        twistd_args=tuple(args.twistd_arg),
    )

    def say(text: str) -> None:
        print(text, flush=True)

    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    say(
        f"campaign benchmark {when}: {settings.recipients} recipients at --rate "
        f"{settings.rate:g}, bursts of {settings.burst} every {settings.cycle:g} s and "
        f"{settings.singles} singles between, {cpu_count()} CPUs, load average "
        f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="smtpgw-campaign-", dir=args.workdir))
    try:
        result = run(settings, workdir, say)
    except (ServerError, OSError, subprocess.SubprocessError) as error:
        say(f"ERROR: {error}")
        return 1
    finally:
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    summary = {
        "when": when,
        "cpus": cpu_count(),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in load_after],
        "settings": {
            "recipients": settings.recipients,
            "rate": settings.rate,
            "burst": settings.burst,
            "singles": settings.singles,
            "cycle_s": settings.cycle,
            "max_priority_messages": settings.max_priority,
            "warmup_s": settings.warmup,
            "time_limit_s": settings.time_limit,
            "concurrency": settings.concurrency,
            "grace": settings.grace,
            "gateway_args": list(settings.gateway_args),
            "twistd_args": list(settings.twistd_args),
        },
        **result,
    }
    report(summary, say)
    text = json.dumps(summary, indent=2)
    say("\nJSON summary:")
    say(text)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(text + "\n")
    say(f"(written to {args.json_out})")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
