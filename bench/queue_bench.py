"""
The send queue's benchmarks (issue 3, "Scale"): scheduler memory per
message, dispatch latency of a priority-1 message with 100k waiting, restart
time with 1M journaled messages, and the queue's own delivery throughput.

    python -m bench.queue_bench                    # every part, full size
    python -m bench.queue_bench memory latency     # some parts
    python -m bench.queue_bench --quick            # small sizes, a smoke run
    python -m bench.queue_bench restart --restart-messages 200000

Parts (each runs in a process of its own, stops by itself after its counts
or its wall-clock cap, and works in a temporary directory removed at the
end):

  - C{memory}: tracemalloc's count of what the scheduler allocates for
    C{--count} messages (1M), all queued, all deferred (retries spread over
    an hour), half queued and half deferred, all held; the queue ids are
    counted too (the scheduler owns them in the gateway). Then, on the 1M
    queued, what the admin's queries cost: a "why" and the scheduler side
    of a listing page.
  - C{latency}: a real L{MessageQueue} on the real reactor, with a
    L{FileJournal} holding C{--waiting} (100k) queued priority-3 messages,
    C{--rate} (1000/s) so that they stay waiting, and an instant in-memory
    outbound; C{--samples} (200) priority-1 messages are submitted, one
    every C{--interval}, and each is timed from its C{submit()} Deferred
    firing (the C{250}) to the outbound's C{deliver} being called for it.
  - C{restart}: a L{FileJournal} filled with C{--restart-messages} (1M)
    accepted messages of C{--body-size} (2 KB) bytes, then a fresh process
    times L{FileJournal.replay} and the queue's start (the scheduler
    filled), with its peak RSS.
  - C{throughput}: C{--throughput-messages} (50k) waiting messages handed to
    an instant outbound with C{--concurrency} (20) and no rate, on the file
    journal and on the memory journal: an upper bound for delivery.

Each figure is printed next to its target; a JSON summary follows (and goes
to C{--json-out} when given).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from smtpgw.interfaces import DeliveryResult, IJournal, IOutbound, JournalLocation
from smtpgw.journal import FileJournal
from smtpgw.memjournal import MemoryJournal
from smtpgw.model import Envelope, MessageState, Priority, QueueIdGenerator
from smtpgw.queue import MessageQueue
from smtpgw.queueinfo import Conditions, PageCandidates, ReadyOrder, explain
from smtpgw.scheduler import ScheduledEntry, Scheduler

PARTS = ("memory", "latency", "restart", "throughput")

#: The issue's targets.
MEMORY_TARGET = 200.0
LATENCY_TARGET_MS = 50.0
RESTART_TARGET_S = 10.0

#: The time the synthetic messages were accepted around.
BASE = 1_700_000_000.0
LISTS = tuple(f"list-{n:02d}" for n in range(50))
#: What a journaled message takes on disk besides its body (envelope,
#: headers, checksums), generously.
RECORD_OVERHEAD = 512


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


def _peak_rss_mb() -> float:
    # Linux gives kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _body(size: int) -> bytes:
    head = b"Subject: queue bench\r\nFrom: news@example.com\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    rest = max(0, size - len(head))
    return head + line * (rest // len(line)) + b"y" * (rest % len(line))


def _envelope(queue_id: str, priority: Priority, number: int, size: int) -> Envelope:
    return Envelope(
        queue_id=queue_id,
        list=LISTS[number % len(LISTS)],
        username="u-bench",
        sender="news@example.com",
        recipients=(f"reader{number % 1000}@example.org",),
        priority=priority,
        accepted_at=time.time(),
        client_ip="192.0.2.1",
        size=size,
    )


@implementer(IOutbound)
class _InstantOutbound:
    """
    Delivers everything at once, noting when each priority-1 message came.
    """

    def __init__(self) -> None:
        self.delivered = 0
        self.urgent: dict[str, float] = {}
        self._waiting: dict[str, Deferred[float]] = {}
        self._count_waiters: list[tuple[int, Deferred[None]]] = []

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        self.delivered += 1
        if envelope.priority is Priority.VERY_HIGH:
            now = time.perf_counter()
            self.urgent[envelope.queue_id] = now
            waiter = self._waiting.pop(envelope.queue_id, None)
            if waiter is not None:
                waiter.callback(now)
        if self._count_waiters and self.delivered >= self._count_waiters[0][0]:
            _, done = self._count_waiters.pop(0)
            done.callback(None)
        return succeed(DeliveryResult(delivered=envelope.recipients))

    def delivered_at(self, queue_id: str) -> Deferred[float]:
        """
        Fires with the time C{deliver} is called for this message.
        """
        if queue_id in self.urgent:
            return succeed(self.urgent[queue_id])
        d: Deferred[float] = Deferred()
        self._waiting[queue_id] = d
        return d

    def reached(self, count: int) -> Deferred[None]:
        """
        Fires once C{count} messages were handed over.
        """
        d: Deferred[None] = Deferred()
        if self.delivered >= count:
            d.callback(None)
        else:
            self._count_waiters.append((count, d))
            self._count_waiters.sort(key=lambda waiter: waiter[0])
        return d


async def _submit_many(
    queue: MessageQueue,
    ids: QueueIdGenerator,
    count: int,
    priority: Priority,
    body: bytes,
    deadline: float,
    window: int = 2000,
) -> int:
    """
    Submit C{count} messages, C{window} at a time, until the deadline.

    @return: how many were made durable.
    """
    numbers = iter(range(count))
    done = 0

    async def worker() -> None:
        nonlocal done
        for number in numbers:
            if time.perf_counter() > deadline:
                return
            envelope = _envelope(ids.next(time.time()), priority, number, len(body))
            await queue.submit(envelope, body)
            done += 1

    await defer.gatherResults([Deferred.fromCoroutine(worker()) for _ in range(window)])
    return done


async def _fill_journal(
    journal: FileJournal, count: int, body: bytes, deadline: float, window: int = 4000
) -> int:
    ids = QueueIdGenerator()
    numbers = iter(range(count))
    done = 0

    async def worker() -> None:
        nonlocal done
        for number in numbers:
            if time.perf_counter() > deadline:
                return
            priority = Priority.NORMAL if number % 10 else Priority(1 + number % 5)
            envelope = _envelope(ids.next(time.time()), priority, number, len(body))
            await journal.accept(envelope, body)
            done += 1
            if done % 100_000 == 0:
                _say(f"  journaled {done:,}")

    await defer.gatherResults([Deferred.fromCoroutine(worker()) for _ in range(window)])
    return done


# --- (a) scheduler memory ----------------------------------------------------


def _memory_entries(
    ids: list[str], states: tuple[MessageState, ...], rng: random.Random
) -> Iterator[ScheduledEntry]:
    for n, queue_id in enumerate(ids):
        state = states[n % len(states)]
        deferred = state is MessageState.DEFERRED
        yield ScheduledEntry(
            queue_id=queue_id,
            priority=Priority(1 + n % 5),
            list=LISTS[n % len(LISTS)],
            location=JournalLocation(1 + n // 30_000, (n % 30_000) * 2_300, 2_250),
            state=state,
            attempts=1 + n % 6 if deferred else 0,
            # Retries of the gateway's schedule: 1 minute to 1 hour ahead.
            next_attempt_at=BASE + rng.uniform(60.0, 3660.0) if deferred else 0.0,
        )


MEMORY_STATES: dict[str, tuple[MessageState, ...]] = {
    "queued": (MessageState.QUEUED,),
    "deferred": (MessageState.DEFERRED,),
    "half queued, half deferred": (MessageState.QUEUED, MessageState.DEFERRED),
    "held": (MessageState.HELD,),
}


def _memory(options: argparse.Namespace) -> dict[str, Any]:
    deadline = time.perf_counter() + options.max_seconds
    gc.disable()
    generator = QueueIdGenerator(salt=0x5EED1234)
    # Accepted at 2000 a second: real ids, with their real length.
    ids = [generator.next(BASE + n / 2000) for n in range(options.count)]
    id_bytes = sum(sys.getsizeof(q) for q in ids) / len(ids)
    results: dict[str, Any] = {"count": options.count, "id_bytes": round(id_bytes, 1)}
    states: dict[str, Any] = {}
    for name, wanted in MEMORY_STATES.items():
        entries = list(_memory_entries(ids, wanted, random.Random(7)))
        gc.collect()
        tracemalloc.start()
        scheduler = Scheduler()
        before = tracemalloc.get_traced_memory()[0]
        added = 0
        capped = False
        for entry in entries:
            scheduler.add(entry)
            added += 1
            if not added % 65_536 and time.perf_counter() > deadline:
                capped = True
                break
        # What the dispatcher asks must not add to the cost.
        scheduler.next_wakeup(BASE)
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        per_message = used / added + id_bytes
        states[name] = {
            "messages": added,
            "bytes_per_message": round(per_message, 1),
            "capped": capped,
        }
        _say(f"  {name}: {per_message:.1f} B a message ({added:,} messages)")
        if name == "queued":
            results["queries"] = _queries(scheduler)
        del scheduler, entries
        gc.collect()
    results["states"] = states
    return results


def _queries(scheduler: Scheduler) -> dict[str, Any]:
    """
    What the admin's queries cost on this scheduler: a "why" of the last
    message of a lane, and the scheduler side of the first page of a
    listing (unfiltered, and by list and state), as the control does it.
    """
    now = BASE
    conditions = Conditions(now=now, rate=0.0, concurrency=20, in_flight=0, paused=False)
    lanes = scheduler.ready_lanes(Priority.LOW)
    name, ids = max(lanes, key=lambda lane: len(lane[1]))
    began = time.perf_counter()
    scheduler.has_ready(now)
    entry = scheduler.get(ids[-1])
    assert entry is not None
    why = explain(entry, ReadyOrder.of(scheduler, [entry]), conditions)
    why_ms = (time.perf_counter() - began) * 1000
    listings = {}
    selections: tuple[tuple[str, str | None, MessageState | None], ...] = (
        ("all", None, None),
        ("one list, queued", LISTS[7], MessageState.QUEUED),
    )
    for label, list_name, state in selections:
        began = time.perf_counter()
        snapshot = scheduler.snapshot()
        snapshot_ms = (time.perf_counter() - began) * 1000
        page = PageCandidates(1001)
        longest_slice = 0.0
        for run in snapshot.queue_id_runs(20_000, list=list_name, state=state):
            slice_began = time.perf_counter()
            page.add(run)
            longest_slice = max(longest_slice, time.perf_counter() - slice_began)
        candidates = [e for q in page.queue_ids() if (e := snapshot.get(q)) is not None]
        order = ReadyOrder.of(snapshot, candidates)
        for candidate in candidates:
            explain(candidate, order, conditions)
        elapsed = time.perf_counter() - began
        listings[label] = {
            "ms": round(elapsed * 1000, 1),
            "ns_per_entry": round(elapsed * 1e9 / len(scheduler), 1),
            "snapshot_ms": round(snapshot_ms, 1),
            "rows": len(candidates),
        }
    _say(
        f"  why (position {why.position:,} of {len(scheduler):,}): {why_ms:.1f} ms;"
        f" listing page: {listings['all']['ms']} ms"
    )
    return {"why_ms": round(why_ms, 1), "lane": name, "listing": listings}


# --- (b) dispatch latency ----------------------------------------------------


async def _latency(reactor: Any, options: argparse.Namespace) -> dict[str, Any]:
    deadline = time.perf_counter() + options.max_seconds
    journal = FileJournal(Path(options.workdir) / "latency-journal", reactor)
    outbound = _InstantOutbound()
    queue = MessageQueue(
        journal,
        outbound,
        reactor,
        rate=options.rate,
        concurrency=options.concurrency,
        stop_timeout=5.0,
    )
    queue.startService()
    try:
        await queue.pause()
        ids = QueueIdGenerator()
        body = _body(options.body_size)
        began = time.perf_counter()
        # Enough that --waiting are still waiting at the end: the rate
        # drains them during the second of warm-up and the sampling.
        sampling_seconds = 1.0 + options.samples * (options.interval + 0.01)
        extra = int(options.rate * sampling_seconds * 1.2)
        filled = await _submit_many(
            queue, ids, options.waiting + extra, Priority.NORMAL, body, deadline
        )
        _say(f"  {filled:,} priority-3 messages journaled in {time.perf_counter() - began:.1f} s")
        await queue.resume()
        await task.deferLater(reactor, 1.0)
        waiting_before = queue.scheduler.ready_by_priority()[Priority.NORMAL]
        delivered_before, sampling = outbound.delivered, time.perf_counter()
        acks: list[float] = []
        dispatches: list[float] = []
        for number in range(options.samples):
            if time.perf_counter() > deadline:
                break
            envelope = _envelope(ids.next(time.time()), Priority.VERY_HIGH, number, len(body))
            submitted = time.perf_counter()
            d = queue.submit(envelope, body)
            acked = await d.addCallback(lambda _: time.perf_counter())
            delivered = await outbound.delivered_at(envelope.queue_id)
            acks.append(acked - submitted)
            dispatches.append(delivered - acked)
            await task.deferLater(reactor, options.interval)
        pace = (outbound.delivered - delivered_before) / (time.perf_counter() - sampling)
        waiting_after = queue.scheduler.ready_by_priority()[Priority.NORMAL]
    finally:
        await queue.stopService()

    def ms(values: list[float], share: float) -> float:
        return round(_percentile(values, share) * 1000, 2)

    return {
        "samples": len(dispatches),
        "waiting_before": waiting_before,
        "waiting_after": waiting_after,
        "rate": options.rate,
        "concurrency": options.concurrency,
        "dispatches_per_second_while_sampling": round(pace),
        "dispatch_ms": {
            "p50": ms(dispatches, 0.5),
            "p99": ms(dispatches, 0.99),
            "max": ms(dispatches, 1.0),
        },
        "ack_ms": {"p50": ms(acks, 0.5), "p99": ms(acks, 0.99), "max": ms(acks, 1.0)},
    }


# --- (c) restart ---------------------------------------------------------------


async def _restart_fill(reactor: Any, options: argparse.Namespace) -> dict[str, Any]:
    deadline = time.perf_counter() + options.max_seconds
    journal = FileJournal(Path(options.workdir) / "restart-journal", reactor)
    journal.replay()
    journal.start()
    began = time.perf_counter()
    try:
        written = await _fill_journal(
            journal, options.restart_messages, _body(options.body_size), deadline
        )
    finally:
        await journal.stop()
    stats = journal.stats()
    return {
        "messages": written,
        "body_size": options.body_size,
        "seconds": round(time.perf_counter() - began, 1),
        "disk_bytes": stats.disk_bytes,
        "segments": stats.segments,
    }


@implementer(IOutbound)
class _NeverOutbound:
    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        return Deferred()


async def _restart_replay(reactor: Any, options: argparse.Namespace) -> dict[str, Any]:
    journal = FileJournal(Path(options.workdir) / "restart-journal", reactor)
    queue = MessageQueue(
        journal,
        _NeverOutbound(),
        reactor,
        concurrency=options.concurrency,
        stop_timeout=0.0,
        freeze_after_replay=True,
    )
    # Stopped before it starts, so that the replayed messages stay waiting.
    await queue.pause()
    began = time.perf_counter()
    queue.startService()
    elapsed = time.perf_counter() - began
    scheduled = len(queue.scheduler)
    rss = _peak_rss_mb()
    await queue.stopService()
    return {
        "scheduled": scheduled,
        "replay_and_start_seconds": round(elapsed, 2),
        "peak_rss_mb": round(rss),
    }


# --- (d) throughput ------------------------------------------------------------


async def _throughput(reactor: Any, options: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for kind in ("file journal", "memory journal"):
        deadline = time.perf_counter() + options.max_seconds / 2
        journal: IJournal
        if kind == "file journal":
            journal = FileJournal(Path(options.workdir) / "throughput-journal", reactor)
        else:
            journal = MemoryJournal()
        outbound = _InstantOutbound()
        queue = MessageQueue(
            journal, outbound, reactor, concurrency=options.concurrency, stop_timeout=5.0
        )
        queue.startService()
        try:
            await queue.pause()
            count = await _submit_many(
                queue,
                QueueIdGenerator(),
                options.throughput_messages,
                Priority.NORMAL,
                _body(options.body_size),
                deadline,
            )
            began = time.perf_counter()
            await queue.resume()
            await outbound.reached(count)
            handed = time.perf_counter() - began
            while queue.stats().delivered < count and time.perf_counter() < deadline:
                await task.deferLater(reactor, 0.005)
            settled = time.perf_counter() - began
            results[kind] = {
                "messages": count,
                "handed_over_per_second": round(count / handed),
                "delivered_per_second": round(queue.stats().delivered / settled),
            }
        finally:
            await queue.stopService()
        _say(f"  {kind}: {results[kind]['delivered_per_second']:,} messages/s")
    return {"concurrency": options.concurrency, "journals": results}


# --- running the parts ---------------------------------------------------------


def _print_result(result: dict[str, Any]) -> None:
    result.setdefault("peak_rss_mb", round(_peak_rss_mb()))
    print(json.dumps(result), flush=True)


def _run_child(options: argparse.Namespace) -> None:
    part = options.child
    if part == "memory":
        _print_result(_memory(options))
        return
    coroutines: dict[str, Callable[[Any, argparse.Namespace], Any]] = {
        "latency": _latency,
        "restart-fill": _restart_fill,
        "restart-replay": _restart_replay,
        "throughput": _throughput,
    }

    async def run(reactor: Any) -> None:
        # Printed here: react() exits the process once this is done.
        _print_result(await coroutines[part](reactor, options))

    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


def _child(part: str, options: argparse.Namespace, workdir: str) -> tuple[dict[str, Any], float]:
    """
    Run one part in a fresh process.

    @return: its JSON result and the process's wall time.
    """
    argv = [sys.executable, "-m", "bench.queue_bench", "--child", part, "--workdir", workdir]
    for name in (
        "count",
        "waiting",
        "samples",
        "interval",
        "rate",
        "concurrency",
        "restart_messages",
        "body_size",
        "throughput_messages",
        "max_seconds",
    ):
        argv += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
    began = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = process.communicate(timeout=options.max_seconds + 300)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise RuntimeError(f"{part} did not end within its cap") from None
    wall = time.perf_counter() - began
    if process.returncode:
        raise RuntimeError(f"{part} failed (exit status {process.returncode})")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]), wall


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _report_memory(result: dict[str, Any]) -> None:
    print(f"scheduler memory per message, tracemalloc, {result['count']:,} messages:")
    for name, figures in result["states"].items():
        per = figures["bytes_per_message"]
        note = f" (capped at {figures['messages']:,})" if figures["capped"] else ""
        print(
            f"  {name:<28} {per:7.1f} B{note:<24} target <= {MEMORY_TARGET:.0f} B"
            f"  {_verdict(per <= MEMORY_TARGET)}"
        )
    queries = result.get("queries")
    if queries:
        listing = queries["listing"]
        print(
            f"  admin queries on {result['count']:,} queued: why {queries['why_ms']} ms;"
            f" listing page {listing['all']['ms']} ms ({listing['all']['ns_per_entry']} ns an"
            f" entry), by list and state {listing['one list, queued']['ms']} ms"
        )


def _report_latency(result: dict[str, Any]) -> None:
    dispatch = result["dispatch_ms"]
    print(
        f"priority-1 dispatch latency, 250 to deliver(), {result['samples']} samples,"
        f" {result['waiting_before']:,} to {result['waiting_after']:,} priority-3 waiting"
        f" (--rate {result['rate']:g},"
        f" dispatching {result['dispatches_per_second_while_sampling']}/s):"
    )
    print(
        f"  p50 {dispatch['p50']} ms, p99 {dispatch['p99']} ms, max {dispatch['max']} ms"
        f"{'':8} target p99 <= {LATENCY_TARGET_MS:.0f} ms"
        f"  {_verdict(dispatch['p99'] <= LATENCY_TARGET_MS)}"
    )
    ack = result["ack_ms"]
    print(
        f"  (submit to 250, the journal's group commit: p50 {ack['p50']} ms, p99 {ack['p99']} ms)"
    )


def _report_restart(fill: dict[str, Any], replays: list[dict[str, Any]]) -> None:
    seconds = [r["replay_and_start_seconds"] for r in replays]
    walls = [r["process_seconds"] for r in replays]
    median = statistics.median(seconds)
    print(
        f"restart with {fill['messages']:,} journaled messages of {fill['body_size']} B"
        f" ({fill['disk_bytes'] / 1e9:.2f} GB in {fill['segments']} segments,"
        f" written in {fill['seconds']} s), {len(replays)} fresh processes:"
    )
    print(
        f"  replay + queue start median {median:.2f} s (best {min(seconds):.2f} s,"
        f" {replays[0]['scheduled']:,} scheduled), whole process median"
        f" {statistics.median(walls):.1f} s, peak RSS {replays[0]['peak_rss_mb']:,} MB"
        f"{'':4} target <= {RESTART_TARGET_S:.0f} s  {_verdict(median <= RESTART_TARGET_S)}"
    )


def _report_throughput(result: dict[str, Any]) -> None:
    print(
        f"queue throughput, instant outbound, --concurrency {result['concurrency']}, no rate"
        " (an upper bound for delivery):"
    )
    for kind, figures in result["journals"].items():
        print(
            f"  {kind:<15} {figures['delivered_per_second']:>7,} messages/s delivered"
            f" ({figures['handed_over_per_second']:,}/s handed to the outbound,"
            f" {figures['messages']:,} messages)"
        )


def _orchestrate(options: argparse.Namespace) -> None:
    parts = options.parts or list(PARTS)
    workdir = tempfile.mkdtemp(prefix="queue-bench-", dir=options.tmp)
    summary: dict[str, Any] = {"notes": [], "load_average_before": os.getloadavg()}
    try:
        for part in parts:
            _say(f"{part}...")
            if part == "restart":
                free = shutil.disk_usage(workdir).free
                need = options.restart_messages * (options.body_size + RECORD_OVERHEAD)
                if need * 1.5 > free and options.body_size > 512:
                    note = (
                        f"only {free / 1e9:.1f} GB free in {workdir}: bodies of 512 B"
                        f" instead of {options.body_size} B"
                    )
                    summary["notes"].append(note)
                    _say(f"  {note}")
                    options.body_size = 512
                fill, _ = _child("restart-fill", options, workdir)
                replays = []
                for _ in range(options.restart_repeat):
                    replay, wall = _child("restart-replay", options, workdir)
                    replay["process_seconds"] = round(wall, 2)
                    replays.append(replay)
                summary["restart"] = {"fill": fill, "replays": replays}
                _report_restart(fill, replays)
                shutil.rmtree(Path(workdir) / "restart-journal", ignore_errors=True)
                continue
            result, _ = _child(part, options, workdir)
            summary[part] = result
            {
                "memory": _report_memory,
                "latency": _report_latency,
                "throughput": _report_throughput,
            }[part](result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary["load_average_after"] = os.getloadavg()
    before, after = summary["load_average_before"][0], summary["load_average_after"][0]
    busy = " (other work ran too: the times are high)" if max(before, after) > 1.0 else ""
    print(f"load average before {before:.1f}, after {after:.1f} on {os.cpu_count()} cores{busy}")
    for note in summary["notes"]:
        print(f"note: {note}")
    text = json.dumps(summary, indent=2)
    print(text)
    if options.json_out:
        Path(options.json_out).write_text(text + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"of {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--count", type=int, default=1_000_000, help="messages (memory)")
    parser.add_argument("--waiting", type=int, default=100_000, help="priority 3 (latency)")
    parser.add_argument("--samples", type=int, default=200, help="priority 1 (latency)")
    parser.add_argument("--interval", type=float, default=0.02, help="between samples, s")
    parser.add_argument("--rate", type=float, default=1000.0, help="--rate (latency)")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--restart-messages", type=int, default=1_000_000)
    parser.add_argument(
        "--restart-repeat", type=int, default=3, help="fresh processes timed (median)"
    )
    parser.add_argument("--body-size", type=int, default=2048, help="bytes a message")
    parser.add_argument("--throughput-messages", type=int, default=50_000)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="cap a part")
    parser.add_argument("--tmp", default=None, help="where the temporary directory goes")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    unknown = [part for part in options.parts if part not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}: use {', '.join(PARTS)}")
    if options.quick:
        options.count = min(options.count, 50_000)
        options.waiting = min(options.waiting, 5_000)
        options.samples = min(options.samples, 30)
        options.restart_messages = min(options.restart_messages, 20_000)
        options.throughput_messages = min(options.throughput_messages, 5_000)
        options.restart_repeat = 1
        options.max_seconds = min(options.max_seconds, 120.0)
    if options.child:
        _run_child(options)
    else:
        _orchestrate(options)


if __name__ == "__main__":
    main(sys.argv[1:])
