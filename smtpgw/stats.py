"""
Daily statistics per list: messages accepted, delivered, deferred and
bounced each UTC day, for the admin pages' charts and the queue page's
"sent today".

L{DailyStats} counts in memory (a dictionary update per event) and adds
the counts to the C{daily_stats} table of the database in one transaction
every few seconds and when the gateway stops, on a thread of its own. Its
readers see what is written and what is still pending.

It is fed by two decorators, so that neither the SMTP session nor the
queue knows about it:

  - L{CountingQueue} wraps the L{IMessageQueue} the sessions hand messages
    to and counts C{accepted} once a submission is durable;
  - L{CountingOutbound} wraps the L{IOutbound} the queue delivers through
    and counts each attempt's outcome (and feeds
    L{smtpgw.metrics.GatewayMetrics}).

Both provide their interface only: give the wrapped object, not the
decorator, to whatever needs more (C{setServiceParent}, the queue control).
"""

from __future__ import annotations

import datetime
import os
import sqlite3
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpgw.database import PerThreadPool, open_database, transaction
from smtpgw.interfaces import DeliveryResult, IMessageQueue, IOutbound
from smtpgw.model import Envelope

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "MAX_DAYS",
    "CountingOutbound",
    "CountingQueue",
    "DailyStats",
    "DayCounts",
    "StatsCounter",
    "utc_day",
]

#: Seconds between two writes of the pending counts: what a crash can lose.
DEFAULT_FLUSH_INTERVAL: Final = 5.0

#: The most days one L{DailyStats.days} call answers (ten years).
MAX_DAYS: Final = 3660

_SECONDS_PER_DAY: Final = 86400

#: The user name of the bounces (DSNs) the queue sends itself: not mail of
#: the list, so not counted (see L{smtpgw.queue.DSN_USERNAME}).
_DSN_USERNAME: Final = "MAILER-DAEMON"

#: The counted columns, in the order of a pending entry.
_COLUMNS: Final = ("accepted", "delivered", "deferred", "bounced")


def utc_day(seconds: float) -> str:
    """
    The UTC day of a POSIX time, as C{YYYY-MM-DD}.
    """
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).date().isoformat()


@frozen
class DayCounts:
    """
    One day's counts (of one list, or of all).

    @ivar day: the UTC day, C{YYYY-MM-DD}.
    @ivar accepted: messages accepted (answered C{250}).
    @ivar delivered: delivery attempts after which every recipient had the
        message.
    @ivar deferred: attempts that left some recipient to retry.
    @ivar bounced: attempts in which some recipient failed for good.
    """

    day: str
    accepted: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0

    def as_dict(self) -> dict[str, Any]:
        """
        The counts as JSON-ready fields: C{day}, C{accepted}, C{delivered},
        C{deferred}, C{bounced}.
        """
        return {
            "day": self.day,
            "accepted": self.accepted,
            "delivered": self.delivered,
            "deferred": self.deferred,
            "bounced": self.bounced,
        }


class StatsCounter(Protocol):
    """
    What the counting decorators count into; L{DailyStats} is one.
    """

    def count(
        self,
        list: str,
        *,
        accepted: int = 0,
        delivered: int = 0,
        deferred: int = 0,
        bounced: int = 0,
    ) -> None:
        """
        Add to today's counts of C{list}.
        """


class DeliveryObserver(Protocol):
    """
    What L{CountingOutbound} tells of each attempt besides the counts;
    L{smtpgw.metrics.GatewayMetrics} is one.
    """

    def delivery_attempted(self, result: DeliveryResult) -> None:
        """
        One delivery attempt ended with C{result}.
        """


_Key = tuple[str, str]  # (day, list)

K = TypeVar("K", bound=Hashable)


def _merge(into: dict[K, list[int]], counts: Iterable[tuple[K, list[int]]]) -> None:
    for key, values in counts:
        entry = into.get(key)
        if entry is None:
            into[key] = list(values)
        else:
            for i, v in enumerate(values):
                entry[i] += v


def _four(values: list[int]) -> tuple[int, int, int, int]:
    accepted, delivered, deferred, bounced = values
    return accepted, delivered, deferred, bounced


def _add_rows(
    connection: sqlite3.Connection, rows: list[tuple[str, str, int, int, int, int]]
) -> None:
    with transaction(connection):
        connection.executemany(
            """
            INSERT INTO daily_stats (day, list, accepted, delivered, deferred, bounced)
            VALUES (?, ?, ?, ?, ?, ?)
            ON CONFLICT (day, list) DO UPDATE SET
                accepted = accepted + excluded.accepted,
                delivered = delivered + excluded.delivered,
                deferred = deferred + excluded.deferred,
                bounced = bounced + excluded.bounced
            """,
            rows,
        )


def _read_days(
    connection: sqlite3.Connection, first: str, last: str, list_name: str | None
) -> dict[str, list[int]]:
    query = (
        "SELECT day, SUM(accepted), SUM(delivered), SUM(deferred), SUM(bounced)"
        " FROM daily_stats WHERE day BETWEEN ? AND ?"
    )
    parameters: tuple[str, ...] = (first, last)
    if list_name is not None:
        query += " AND list = ?"
        parameters += (list_name,)
    query += " GROUP BY day"
    return {row[0]: [int(v) for v in row[1:]] for row in connection.execute(query, parameters)}


class DailyStats(Service):
    """
    Per-list daily counts, kept in memory and added to the database's
    C{daily_stats} table every C{flush_interval} seconds and when the
    service stops.

    Counts are filed under the UTC day of the clock when they are counted,
    so a count made just before midnight belongs to that day even when it
    is written after it.

    One database thread does the writes and the reads, in the order they
    were asked for: a read asked after a write sees it, and the pending
    counts a read adds are exactly those no write asked before it holds.
    """

    _log = Logger()

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reactor: IReactorFromThreads,
        clock: IReactorTime,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        """
        @param path: the database file (see L{smtpgw.database.database_path}).
        @param reactor: delivers results from the database thread.
        @param clock: gives the time (hence the day) and schedules writes.
        @param flush_interval: seconds between writes of the pending counts.
        @raise ValueError: for a C{flush_interval} that is not positive.
        """
        if not flush_interval > 0:
            raise ValueError(f"flush_interval must be positive, not {flush_interval!r}")
        self._path = Path(path)
        self._clock = clock
        self._flush_interval = flush_interval
        self._thread = PerThreadPool(reactor, self._connect, size=1, name="smtpgw-stats")
        self._pending: dict[_Key, list[int]] = {}
        self._timer: IDelayedCall | None = None
        self._day = ""
        self._day_start = 0.0
        self._day_end = 0.0

    def _connect(self) -> sqlite3.Connection:
        return open_database(self._path, create=True, check_same_thread=False)

    # Service

    def startService(self) -> None:
        """
        Open the database (a bad one stops the start with a clear error)
        and start the database thread.
        """
        open_database(self._path, create=True).close()
        self._thread.start()
        super().startService()
        if self._pending:
            self._schedule()

    def stopService(self) -> Deferred[None]:
        """
        Write the pending counts, then stop the thread.
        """
        super().stopService()
        self._cancel_timer()
        return self._flush_now().addBoth(lambda _: self._thread.stop())

    # Counting

    def _today(self) -> str:
        now = self._clock.seconds()
        if not self._day_start <= now < self._day_end:
            self._day_start = now - now % _SECONDS_PER_DAY
            self._day_end = self._day_start + _SECONDS_PER_DAY
            self._day = utc_day(now)
        return self._day

    def count(
        self,
        list: str,
        *,
        accepted: int = 0,
        delivered: int = 0,
        deferred: int = 0,
        bounced: int = 0,
    ) -> None:
        """
        Add to today's counts of C{list}; written within C{flush_interval}
        seconds.

        @raise ValueError: for a negative count.
        """
        if min(accepted, delivered, deferred, bounced) < 0:
            raise ValueError("counts cannot be negative")
        key = (self._today(), list)
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = [accepted, delivered, deferred, bounced]
        else:
            entry[0] += accepted
            entry[1] += delivered
            entry[2] += deferred
            entry[3] += bounced
        if self.running and self._timer is None:
            self._schedule()

    @property
    def pending(self) -> int:
        """
        How many (day, list) entries wait to be written.
        """
        return len(self._pending)

    # Writing

    def _schedule(self) -> None:
        self._timer = self._clock.callLater(self._flush_interval, self._flush_from_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _flush_from_timer(self) -> None:
        self._timer = None
        self._flush_now()

    def flush(self) -> Deferred[None]:
        """
        Write the pending counts now.

        @return: fires once they are written (or, when writing failed,
            put back to be tried again).
        """
        self._cancel_timer()
        return self._flush_now()

    def _flush_now(self) -> Deferred[None]:
        if not self._pending or not self._thread.running:
            return succeed(None)
        batch, self._pending = self._pending, {}
        rows = [(day, name, *_four(values)) for (day, name), values in batch.items()]
        d = self._thread.run(lambda connection: _add_rows(connection, rows))
        d.addErrback(self._not_written, batch)
        return d

    def idle(self) -> Deferred[None]:
        """
        @return: fires once every write asked for so far is done (the
            database thread runs its work in order).
        """
        if not self._thread.running:
            return succeed(None)
        return self._thread.run(_nothing)

    def _not_written(self, failure: Failure, batch: dict[_Key, list[int]]) -> None:
        self._log.warn(
            "could not write the daily statistics ({entries} entries kept for the"
            " next try): {error}",
            entries=len(batch),
            error=failure.getErrorMessage(),
        )
        _merge(self._pending, batch.items())
        if self.running and self._timer is None:
            self._schedule()

    # Reading

    def days(self, list: str | None, count: int) -> Deferred[list[DayCounts]]:
        """
        The counts of the last C{count} UTC days, today included, oldest
        first; a day without any count is there with zeros.

        @param list: one list's counts, or every list's summed when L{None}.
        @raise ValueError: for a C{count} below 1 or above L{MAX_DAYS}.
        """
        if not 1 <= count <= MAX_DAYS:
            raise ValueError(f"count must be from 1 to {MAX_DAYS}, not {count!r}")
        return self._days(list, count)

    def _days(self, list_name: str | None, count: int) -> Deferred[list[DayCounts]]:
        today = datetime.date.fromisoformat(self._today())
        names = [
            (today - datetime.timedelta(days=n)).isoformat() for n in range(count - 1, -1, -1)
        ]
        first, last = names[0], names[-1]
        # Taken now: whatever left the pending counts before is in a write
        # the thread runs before this read.
        pending = [
            (day, values[:])
            for (day, name), values in self._pending.items()
            if first <= day <= last and (list_name is None or name == list_name)
        ]
        d = self._thread.run(lambda connection: _read_days(connection, first, last, list_name))

        def combine(stored: dict[str, list[int]]) -> list[DayCounts]:
            _merge(stored, pending)
            return [DayCounts(day, *stored.get(day, (0, 0, 0, 0))) for day in names]

        return d.addCallback(combine)

    def today(self, list: str | None = None) -> Deferred[dict[str, Any]]:
        """
        Today's counts, pending ones included: C{day}, C{list} (as given),
        C{accepted}, C{delivered}, C{deferred}, C{bounced}.

        @param list: one list's counts, or every list's summed when L{None}.
        """
        return self._days(list, 1).addCallback(_today_fields, list)


def _nothing(connection: sqlite3.Connection) -> None:
    pass


def _today_fields(days: list[DayCounts], list_name: str | None) -> dict[str, Any]:
    return {**days[0].as_dict(), "list": list_name}


# The decorators


@implementer(IMessageQueue)
class CountingQueue:
    """
    An L{IMessageQueue} that counts each message the wrapped queue made
    durable as C{accepted} for its list.

    It provides L{IMessageQueue} only: give it to the SMTP sessions, and
    the queue itself to everything else (the service tree, the queue
    control, the admin pages).
    """

    def __init__(self, queue: IMessageQueue, stats: StatsCounter) -> None:
        self._queue = queue
        self._stats = stats

    @property
    def accepting(self) -> bool:
        """
        Whether the wrapped queue takes mail.
        """
        return bool(self._queue.accepting)

    def submit(self, envelope: Envelope, body: bytes) -> Deferred[None]:
        """
        Submit to the wrapped queue; count once it is durable.
        """
        d: Deferred[None] = self._queue.submit(envelope, body)
        return d.addCallback(self._accepted, envelope.list)

    def _accepted(self, result: None, list_name: str) -> None:
        self._stats.count(list_name, accepted=1)
        return result


def _outcome(envelope: Envelope, result: DeliveryResult) -> tuple[int, int, int]:
    """
    The (delivered, deferred, bounced) counts of one attempt: delivered
    when every recipient tried took the message, deferred when one is left
    to retry (a recipient without an outcome is, for the queue too),
    bounced when one failed for good.
    """
    delivered = set(result.delivered)
    done = delivered.union(recipient for recipient, _ in result.bounced)
    all_delivered = all(recipient in delivered for recipient in envelope.recipients)
    some_left = bool(result.deferred) or any(r not in done for r in envelope.recipients)
    return int(all_delivered), int(some_left), int(bool(result.bounced))


@implementer(IOutbound)
class CountingOutbound:
    """
    An L{IOutbound} that counts the outcome of each attempt of the wrapped
    one per list (see L{DayCounts}) and tells C{metrics} of it; the result
    passes through unchanged. The queue's own bounces (DSNs) are not
    counted for the list.

    It provides L{IOutbound} only: give it to the queue, and the outbound
    itself to the service tree (C{setServiceParent}).
    """

    def __init__(
        self,
        outbound: IOutbound,
        stats: StatsCounter,
        metrics: DeliveryObserver | None = None,
    ) -> None:
        self._outbound = outbound
        self._stats = stats
        self._metrics = metrics

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        """
        Deliver through the wrapped outbound, and count what came of it.
        """
        d: Deferred[DeliveryResult] = self._outbound.deliver(envelope, body)
        return d.addCallbacks(
            self._delivered,
            self._failed,
            callbackArgs=(envelope,),
            errbackArgs=(envelope,),
        )

    def _delivered(self, result: DeliveryResult, envelope: Envelope) -> DeliveryResult:
        if self._metrics is not None:
            self._metrics.delivery_attempted(result)
        if envelope.username != _DSN_USERNAME:
            delivered, deferred, bounced = _outcome(envelope, result)
            self._stats.count(
                envelope.list, delivered=delivered, deferred=deferred, bounced=bounced
            )
        return result

    def _failed(self, failure: Failure, envelope: Envelope) -> Failure:
        # Against the interface, but the queue then defers every recipient.
        if envelope.username != _DSN_USERNAME:
            self._stats.count(envelope.list, deferred=1)
        return failure
