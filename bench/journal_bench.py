"""
Journal throughput and replay time, through the real reactor.

    python -m bench.journal_bench accept [--messages 20000] [--concurrency 20]
        [--size 5000] [--dir DIR]
    python -m bench.journal_bench replay [--messages 1000000] [--size 200]
        [--delivered-share 0.0] [--dir DIR]

C{accept} keeps C{--concurrency} accepts pending at all times and reports
accepts per second, records per fsync, and how late a 10 ms timer on the
reactor ran (the reactor thread must stay free while the writer fsyncs).
C{replay} fills a journal (through the journal itself, many accepts pending
at once), then times a fresh L{FileJournal.replay}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Generator
from typing import Any

from twisted.internet import defer, task

from smtpgw.journal import FileJournal
from smtpgw.model import Envelope, Priority


def _envelope(number: int, size: int) -> Envelope:
    return Envelope(
        queue_id=f"{number:016X}",
        list="newsletter",
        username="u-bench",
        sender="news@example.com",
        recipients=("reader@example.org",),
        priority=Priority.NORMAL,
        accepted_at=1_700_000_000.0 + number / 1000,
        client_ip="192.0.2.1",
        size=size,
    )


@defer.inlineCallbacks
def _fill(
    journal: FileJournal, messages: int, concurrency: int, size: int
) -> Generator[Any, Any, None]:
    body = (b"x" * 76 + b"\r\n") * (size // 78) + b"y" * (size % 78)
    started = iter(range(messages))

    @defer.inlineCallbacks
    def worker() -> Generator[Any, Any, None]:
        for number in started:
            yield journal.accept(_envelope(number, size), body)

    yield defer.gatherResults([worker() for _ in range(concurrency)])


@defer.inlineCallbacks
def _accept(reactor: Any, options: argparse.Namespace) -> Generator[Any, Any, None]:
    directory = options.dir or tempfile.mkdtemp(prefix="journal-bench-")
    journal = FileJournal(directory, reactor)
    journal.replay()
    journal.start()
    lateness: list[float] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        lateness.append(now - last[0] - 0.010)
        last[0] = now

    timer = task.LoopingCall(tick)
    timer.start(0.010, now=False)
    began = time.perf_counter()
    yield _fill(journal, options.messages, options.concurrency, options.size)
    elapsed = time.perf_counter() - began
    timer.stop()
    stats = journal.stats()
    yield journal.stop()
    if not options.dir:
        shutil.rmtree(directory)
    lateness.sort()
    print(
        json.dumps(
            {
                "messages": options.messages,
                "concurrency": options.concurrency,
                "size": options.size,
                "seconds": round(elapsed, 3),
                "accepts_per_second": round(options.messages / elapsed),
                "fsyncs": stats.fsyncs,
                "records_per_fsync": round(stats.records_per_fsync, 2),
                "last_fsync_ms": round(stats.last_fsync_seconds * 1000, 3),
                "timer_late_ms_p50": round(lateness[len(lateness) // 2] * 1000, 2),
                "timer_late_ms_p99": round(lateness[len(lateness) * 99 // 100] * 1000, 2),
                "timer_late_ms_max": round(lateness[-1] * 1000, 2),
            }
        )
    )


@defer.inlineCallbacks
def _replay(reactor: Any, options: argparse.Namespace) -> Generator[Any, Any, None]:
    directory = options.dir or tempfile.mkdtemp(prefix="journal-bench-")
    journal = FileJournal(directory, reactor)
    journal.replay()
    journal.start()
    began = time.perf_counter()
    yield _fill(journal, options.messages, 2000, options.size)
    delivered = int(options.messages * options.delivered_share)
    if delivered:
        yield defer.gatherResults(
            [journal.record_state(f"{n:016X}", "delivered") for n in range(delivered)]
        )
    filled = time.perf_counter() - began
    stats = journal.stats()
    yield journal.stop()
    again = FileJournal(directory, reactor)
    began = time.perf_counter()
    found = again.replay()
    elapsed = time.perf_counter() - began
    yield again.stop()
    if not options.dir:
        shutil.rmtree(directory)
    print(
        json.dumps(
            {
                "messages": options.messages,
                "size": options.size,
                "live": len(found),
                "fill_seconds": round(filled, 2),
                "disk_bytes": stats.disk_bytes,
                "segments": stats.segments,
                "replay_seconds": round(elapsed, 2),
            }
        )
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["accept", "replay"])
    parser.add_argument("--messages", type=int)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", type=int)
    parser.add_argument("--delivered-share", type=float, default=0.0)
    parser.add_argument("--dir", help="journal directory (kept); a temporary one by default")
    options = parser.parse_args(argv)
    if options.mode == "accept":
        options.messages = options.messages or 20_000
        options.size = options.size or 5_000
        task.react(lambda reactor: _accept(reactor, options))
    else:
        options.messages = options.messages or 1_000_000
        options.size = options.size or 200
        task.react(lambda reactor: _replay(reactor, options))


if __name__ == "__main__":
    main(sys.argv[1:])
