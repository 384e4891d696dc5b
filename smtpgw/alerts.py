"""
Where alerts go: stored in the C{alerts} table of the data directory's
database, for the alert center, the API and the CLI.

Raising an alert never blocks nor fails the caller: alerts wait in memory
(at most L{MAX_PENDING_ALERTS}) and one writer thread stores whatever has
gathered in one transaction. Queries run on the same thread after the
writes queued before them, so they see every alert raised before them.
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from attrs import Factory, define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from zope.interface import implementer

from smtpgw.database import PerThreadPool, open_database, transaction
from smtpgw.interfaces import Alert, IAlertSink
from smtpgw.validation import ValidationError

__all__ = [
    "MAX_ALERT_KEYS",
    "MAX_PENDING_ALERTS",
    "MAX_QUERY_LIMIT",
    "AlertDatabase",
    "AlertThrottle",
    "MemoryAlertSink",
    "SQLiteAlertStore",
    "StoredAlert",
    "ThrottleSummary",
    "alert_document",
]

MAX_PENDING_ALERTS: Final = 10_000
"""Alerts kept in memory while the writer is behind; beyond, new ones are dropped."""

MAX_QUERY_LIMIT: Final = 1000
"""Most alerts one query returns."""

DEFAULT_QUERY_LIMIT: Final = 100

MAX_ALERT_KEYS = 10_000


@frozen
class ThrottleSummary:
    """
    The alerts L{AlertThrottle} held back for one key during one window.
    """

    key: tuple[str, str]
    suppressed: int
    first_at: float
    last_at: float
    payload: object = None


@define
class _Window:
    opened_at: float
    payload: object = None
    suppressed: int = 0
    first_at: float = 0.0
    last_at: float = 0.0


class AlertThrottle:
    """
    Lets one alert per key through per C{window} seconds and counts the
    others; a window that ends with alerts held back gives a
    L{ThrottleSummary}. Pure: the caller passes the time.
    """

    def __init__(self, window: float, max_keys: int = MAX_ALERT_KEYS) -> None:
        """
        @param window: seconds after an alert during which alerts with its
            key are only counted; 0 lets every alert through.
        @param max_keys: the most keys watched at once.
        """
        self._window = window
        self._max_keys = max_keys
        # Insertion order is the order in which windows end.
        self._windows: dict[tuple[str, str], _Window] = {}
        self._due: list[ThrottleSummary] = []

    def admit(self, key: tuple[str, str], now: float, payload: object = None) -> bool:
        """
        @param payload: kept with the window an admitted alert opens, and
            given back in its summary (e.g. the alert itself).
        @return: whether an alert with C{key} should be raised at C{now};
            when not, it is counted.
        """
        if self._window <= 0:
            return True
        window = self._windows.get(key)
        if window is not None and now < window.opened_at + self._window:
            if not window.suppressed:
                window.first_at = now
            window.suppressed += 1
            window.last_at = now
            return False
        if window is not None:
            self._close(key)
        elif len(self._windows) >= self._max_keys:
            self._close(next(iter(self._windows)))
        self._windows[key] = _Window(now, payload)
        return True

    def suppressed(self, key: tuple[str, str]) -> int:
        """
        @return: the alerts with C{key} held back in its current window.
        """
        window = self._windows.get(key)
        return 0 if window is None else window.suppressed

    def __len__(self) -> int:
        """
        @return: the windows open.
        """
        return len(self._windows)

    def next_end(self) -> float | None:
        """
        @return: when the first open window ends, or L{None}.
        """
        for window in self._windows.values():
            return window.opened_at + self._window
        return None

    def ended(self, now: float) -> list[ThrottleSummary]:
        """
        @return: the summaries of the windows that ended by C{now} with
            alerts held back (or were closed early), each given once.
        """
        windows = self._windows
        while windows:
            key = next(iter(windows))
            if now < windows[key].opened_at + self._window:
                break
            self._close(key)
        due, self._due = self._due, []
        return due

    def flush(self) -> list[ThrottleSummary]:
        """
        End every window now (at shutdown).

        @return: the summaries of the windows with alerts held back.
        """
        for key in list(self._windows):
            self._close(key)
        due, self._due = self._due, []
        return due

    def _close(self, key: tuple[str, str]) -> None:
        window = self._windows.pop(key)
        if window.suppressed:
            self._due.append(
                ThrottleSummary(
                    key, window.suppressed, window.first_at, window.last_at, window.payload
                )
            )


@frozen
class StoredAlert:
    """
    An alert as stored, with its id and whether an admin has read it.
    """

    id: int
    type: str
    message: str
    created_at: float
    list: str | None = None
    details: Mapping[str, Any] = field(factory=dict)
    read: bool = False

    @property
    def alert(self) -> Alert:
        """
        The alert as it was raised.
        """
        return Alert(
            type=self.type,
            message=self.message,
            created_at=self.created_at,
            list=self.list,
            details=self.details,
        )


def alert_document(stored: StoredAlert) -> dict[str, Any]:
    """
    An alert as JSON: C{id}, C{type}, C{list}, C{message}, C{details},
    C{created_at} (ISO 8601 UTC) and C{read}.
    """
    created = datetime.fromtimestamp(stored.created_at, UTC)
    return {
        "id": stored.id,
        "type": stored.type,
        "list": stored.list,
        "message": stored.message,
        "details": dict(stored.details),
        "created_at": created.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "read": stored.read,
    }


def _details_json(details: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(details), default=str, sort_keys=True)
    except (TypeError, ValueError):
        # An alert is worth more than its details: keep a readable trace.
        return json.dumps({"unserializable": repr(details)})


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_QUERY_LIMIT:
        raise ValidationError("limit", f"{limit!r} is not a number from 1 to {MAX_QUERY_LIMIT}")
    return limit


@define
class AlertDatabase:
    """
    The C{alerts} table, synchronously: one SQLite connection, used by one
    thread at a time (the CLI, or the writer thread of L{SQLiteAlertStore}).
    """

    _connection: sqlite3.Connection

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        check_same_thread: bool = True,
    ) -> AlertDatabase:
        """
        Open the database at C{path} (see L{smtpgw.database.open_database}).
        """
        return cls(open_database(path, create=create, check_same_thread=check_same_thread))

    def close(self) -> None:
        """
        Close the connection.
        """
        self._connection.close()

    def __enter__(self) -> AlertDatabase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add(self, alerts: Sequence[Alert]) -> builtins.list[int]:
        """
        Store alerts, in one transaction.

        @return: their ids, in order.
        """
        ids = []
        with transaction(self._connection) as db:
            for alert in alerts:
                cursor = db.execute(
                    "INSERT INTO alerts (type, list, message, details, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        alert.type,
                        alert.list,
                        alert.message,
                        _details_json(alert.details),
                        alert.created_at,
                    ),
                )
                assert cursor.lastrowid is not None
                ids.append(cursor.lastrowid)
        return ids

    def alerts(
        self,
        list: str | None = None,
        type: str | None = None,
        unread_only: bool = False,
        limit: int = DEFAULT_QUERY_LIMIT,
        before: int | None = None,
    ) -> builtins.list[StoredAlert]:
        """
        Stored alerts, newest first.

        @param list: only those of this list.
        @param type: only those of this type (C{sender_domain}, ...).
        @param unread_only: only those no admin has marked read.
        @param limit: at most this many, 1 to L{MAX_QUERY_LIMIT}.
        @param before: only those with a smaller id (the next page).
        @raise ValidationError: for a bad C{limit}.
        """
        conditions = []
        parameters: builtins.list[object] = []
        if list is not None:
            conditions.append("list = ?")
            parameters.append(list)
        if type is not None:
            conditions.append("type = ?")
            parameters.append(type)
        if unread_only:
            conditions.append("read = 0")
        if before is not None:
            conditions.append("id < ?")
            parameters.append(before)
        where = f"WHERE {' AND '.join(conditions)} " if conditions else ""
        parameters.append(_check_limit(limit))
        # Only fixed condition texts are joined; values are parameters.
        rows = self._connection.execute(
            "SELECT id, type, message, created_at, list, details, read FROM alerts "  # noqa: S608
            f"{where}ORDER BY id DESC LIMIT ?",
            parameters,
        )
        return [
            StoredAlert(
                id=row[0],
                type=row[1],
                message=row[2],
                created_at=row[3],
                list=row[4],
                details=json.loads(row[5]),
                read=bool(row[6]),
            )
            for row in rows
        ]

    def mark_read(self, ids: Iterable[int]) -> int:
        """
        Mark alerts as read.

        @return: how many were unread and now are read.
        """
        with transaction(self._connection) as db:
            cursor = db.executemany(
                "UPDATE alerts SET read = 1 WHERE id = ? AND read = 0", [(i,) for i in ids]
            )
            return cursor.rowcount

    def unread_count(self, list: str | None = None) -> int:
        """
        How many alerts are unread, of one list or of all.
        """
        if list is None:
            row = self._connection.execute("SELECT count(*) FROM alerts WHERE read = 0")
        else:
            row = self._connection.execute(
                "SELECT count(*) FROM alerts WHERE read = 0 AND list = ?", (list,)
            )
        return int(row.fetchone()[0])


@implementer(IAlertSink)
class SQLiteAlertStore(Service):
    """
    The alert sink of the running gateway, and the alert queries of the web
    pages, over one writer thread.
    """

    _log = Logger()

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reactor: IReactorFromThreads,
        max_pending: int = MAX_PENDING_ALERTS,
    ) -> None:
        """
        @param path: the database file; created when missing.
        @param reactor: delivers results from the writer thread.
        @param max_pending: alerts held in memory before new ones are dropped.
        """
        self._path = Path(path)
        self._max_pending = max_pending
        # One thread: writes and queries run in the order they were asked for.
        self._thread = PerThreadPool(reactor, self._open, size=1, name="smtpgw-alerts")
        self._pending: list[Alert] = []
        self._writes_in_flight = 0
        self._idle_waiters: list[Deferred[None]] = []
        self.dropped = 0

    def _open(self) -> AlertDatabase:
        return AlertDatabase.open(self._path, check_same_thread=False)

    def startService(self) -> None:
        """
        Open the database (a bad one stops the start with a clear error),
        start the writer, and store the alerts raised before.
        """
        open_database(self._path, create=True).close()
        self._thread.start()
        super().startService()
        self._write_pending()

    def stopService(self) -> Deferred[None]:
        """
        Store the pending alerts, then stop the writer.
        """
        super().stopService()
        self._write_pending()
        return self._when_idle().addCallback(lambda _: self._thread.stop())

    @property
    def pending(self) -> int:
        """
        How many alerts wait to be written.
        """
        return len(self._pending)

    def raise_alert(self, alert: Alert) -> None:
        """
        Queue C{alert} for storing; call from the reactor thread.

        Never blocks, never raises: when L{MAX_PENDING_ALERTS} alerts already
        wait, this one is dropped, counted in C{dropped}, and a warning logged.
        """
        try:
            if len(self._pending) >= self._max_pending:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    self._log.warn(
                        "Alert store is behind: dropped {dropped} alerts so far "
                        "(last: {alert_type} on {alert_list})",
                        dropped=self.dropped,
                        alert_type=alert.type,
                        alert_list=alert.list,
                    )
                return
            self._pending.append(alert)
            if self._writes_in_flight == 0:
                self._write_pending()
        except Exception:
            self._log.failure("Could not queue an alert")

    def _write_pending(self) -> None:
        if not self._pending or not self._thread.running:
            return
        batch, self._pending = self._pending, []
        self._writes_in_flight += 1
        d = self._thread.run(lambda db: db.add(batch))
        d.addErrback(
            lambda f: self._log.failure("Could not store {count} alerts", f, count=len(batch))
        )
        d.addBoth(self._write_done)

    def _write_done(self, _: object) -> None:
        self._writes_in_flight -= 1
        if self._writes_in_flight:
            return
        if self._pending:
            # What gathered during the write goes in the next batch.
            self._write_pending()
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _when_idle(self) -> Deferred[None]:
        if self._writes_in_flight == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def flush(self) -> Deferred[None]:
        """
        Store the pending alerts now.

        @return: fires once every alert raised so far is stored.
        """
        self._write_pending()
        return self._when_idle()

    def alerts(
        self,
        list: str | None = None,
        type: str | None = None,
        unread_only: bool = False,
        limit: int = DEFAULT_QUERY_LIMIT,
        before: int | None = None,
    ) -> Deferred[builtins.list[StoredAlert]]:
        """
        See L{AlertDatabase.alerts}; includes every alert raised before.
        """
        self._write_pending()
        return self._thread.run(lambda db: db.alerts(list, type, unread_only, limit, before))

    def mark_read(self, ids: Iterable[int]) -> Deferred[int]:
        """
        See L{AlertDatabase.mark_read}.
        """
        wanted = [*ids]
        self._write_pending()
        return self._thread.run(lambda db: db.mark_read(wanted))

    def unread_count(self, list: str | None = None) -> Deferred[int]:
        """
        See L{AlertDatabase.unread_count}.
        """
        self._write_pending()
        return self._thread.run(lambda db: db.unread_count(list))


@implementer(IAlertSink)
@define
class MemoryAlertSink:
    """
    An alert sink that keeps alerts in a list, for tests of the parts that
    raise them and for running without a database.

    @ivar alerts: every alert raised, in order.
    """

    alerts: list[Alert] = Factory(list)

    def raise_alert(self, alert: Alert) -> None:
        self.alerts.append(alert)

    def of_type(self, type: str) -> list[Alert]:
        """
        The alerts of one type, in order.
        """
        return [alert for alert in self.alerts if alert.type == type]
