"""
Tests for L{smtpgw.alerts}: the stored alert table, the non-blocking sink of
the running gateway, and the in-memory sink.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ParamSpec

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from smtpgw.alerts import (
    MAX_QUERY_LIMIT,
    AlertDatabase,
    MemoryAlertSink,
    SQLiteAlertStore,
    StoredAlert,
    alert_document,
)
from smtpgw.database import StoreNotRunning, database_path
from smtpgw.interfaces import Alert, IAlertSink
from smtpgw.validation import ValidationError
from tests.twisted_support import async_test, global_reactor

T0 = 1_700_000_000.0
P = ParamSpec("P")


def alert(n: int = 0, type: str = "sender_domain", list: str | None = "news") -> Alert:
    return Alert(
        type=type,
        message=f"alert {n}",
        created_at=T0 + n,
        list=list,
        details={"n": n, "sender": f"x{n}@example.com"},
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return database_path(tmp_path)


@pytest.fixture
def db(db_path: Path) -> Iterator[AlertDatabase]:
    with AlertDatabase.open(db_path) as d:
        yield d


@pytest.fixture
def sink(db_path: Path) -> Iterator[SQLiteAlertStore]:
    s = SQLiteAlertStore(db_path, reactor=global_reactor())
    s.startService()
    yield s
    if s.running:
        pytest_twisted.blockon(s.stopService())


def _count_adds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    original = AlertDatabase.add

    def counting(self: AlertDatabase, alerts: Any) -> Any:
        sizes.append(len(alerts))
        return original(self, alerts)

    monkeypatch.setattr(AlertDatabase, "add", counting)
    return sizes


# --- the table --------------------------------------------------------------


def test_add_and_query_newest_first(db: AlertDatabase) -> None:
    """
    Stored alerts come back newest first, with their details, unread.
    """
    ids = db.add([alert(1), alert(2)])
    assert ids[1] > ids[0]
    stored = db.alerts()
    assert [s.message for s in stored] == ["alert 2", "alert 1"]
    assert stored[0] == StoredAlert(
        id=ids[1],
        type="sender_domain",
        message="alert 2",
        created_at=T0 + 2,
        list="news",
        details={"n": 2, "sender": "x2@example.com"},
        read=False,
    )
    assert stored[0].alert == alert(2)


def test_filters(db: AlertDatabase) -> None:
    """
    By list, by type, unread only, a page before an id, and combined.
    """
    db.add(
        [
            alert(1, "sender_domain", "news"),
            alert(2, "delivery", "news"),
            alert(3, "sender_domain", "shop"),
            alert(4, "queue_stalled", None),
        ]
    )
    assert [s.message for s in db.alerts(list="news")] == ["alert 2", "alert 1"]
    assert [s.message for s in db.alerts(type="sender_domain")] == ["alert 3", "alert 1"]
    assert [s.message for s in db.alerts(list="news", type="delivery")] == ["alert 2"]
    newest = db.alerts(limit=2)
    assert [s.message for s in newest] == ["alert 4", "alert 3"]
    assert [s.message for s in db.alerts(before=newest[-1].id)] == ["alert 2", "alert 1"]
    db.mark_read([newest[0].id])
    assert [s.message for s in db.alerts(unread_only=True)] == ["alert 3", "alert 2", "alert 1"]


def test_query_limit_at_and_past_the_limit(db: AlertDatabase) -> None:
    """
    A limit of 1 to L{MAX_QUERY_LIMIT} is accepted; 0 and one more are not.
    """
    db.add([alert(n) for n in range(3)])
    assert len(db.alerts(limit=1)) == 1
    assert len(db.alerts(limit=MAX_QUERY_LIMIT)) == 3
    for bad in (0, MAX_QUERY_LIMIT + 1):
        with pytest.raises(ValidationError) as e:
            db.alerts(limit=bad)
        assert e.value.field == "limit"


def test_mark_read_and_unread_count(db: AlertDatabase) -> None:
    """
    Marking counts only alerts that were unread; unread counts per list.
    """
    ids = db.add([alert(1, list="news"), alert(2, list="news"), alert(3, list="shop")])
    assert db.unread_count() == 3
    assert db.unread_count("news") == 2
    assert db.mark_read([ids[0], ids[2], 999]) == 2
    assert db.mark_read([ids[0]]) == 0
    assert db.unread_count() == 1
    assert db.unread_count("shop") == 0
    assert [s.read for s in db.alerts()] == [True, False, True]


def test_details_that_are_not_json_are_kept_readable(db: AlertDatabase) -> None:
    """
    Values JSON cannot hold are stored as text rather than losing the alert.
    """
    db.add([Alert("delivery", "m", T0, details={"when": Path("/x"), "nested": {"a": [1]}})])
    (stored,) = db.alerts()
    assert stored.details == {"when": "/x", "nested": {"a": [1]}}


def test_alert_document(db: AlertDatabase) -> None:
    """
    The JSON shape of an alert for the API.
    """
    (alert_id,) = db.add([alert(0)])
    (stored,) = db.alerts()
    assert alert_document(stored) == {
        "id": alert_id,
        "type": "sender_domain",
        "list": "news",
        "message": "alert 0",
        "details": {"n": 0, "sender": "x0@example.com"},
        "created_at": "2023-11-14T22:13:20Z",
        "read": False,
    }
    json.dumps(alert_document(stored))


# --- the sink of the running gateway ----------------------------------------


def test_sinks_provide_ialertsink(db_path: Path) -> None:
    """
    Both sinks are L{IAlertSink}s.
    """
    assert verifyObject(IAlertSink, SQLiteAlertStore(db_path, reactor=global_reactor()))
    assert verifyObject(IAlertSink, MemoryAlertSink())


@async_test
async def test_raise_alert_returns_before_writing(
    sink: SQLiteAlertStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Raising hands the alert to the writer thread and returns; alerts raised
    while a write is under way go together in the next one.
    """
    sizes = _count_adds(monkeypatch)
    sink.raise_alert(alert(0))
    for n in range(1, 501):
        sink.raise_alert(alert(n))
    assert sink.pending == 500
    await sink.flush()
    assert sizes == [1, 500]
    assert sink.pending == 0
    with AlertDatabase.open(db_path) as reader:
        assert len(reader.alerts(limit=1000)) == 501


@async_test
async def test_queries_see_alerts_raised_before(sink: SQLiteAlertStore) -> None:
    """
    A query made right after raising sees the alert, without a flush.
    """
    sink.raise_alert(alert(1))
    sink.raise_alert(alert(2, type="delivery"))
    stored = await sink.alerts(type="delivery")
    assert [s.message for s in stored] == ["alert 2"]
    assert (await sink.unread_count()) == 2
    assert (await sink.mark_read(s.id for s in stored)) == 1
    assert [s.message for s in await sink.alerts(unread_only=True)] == ["alert 1"]


@async_test
async def test_alerts_raised_before_start_are_stored_at_start(db_path: Path) -> None:
    """
    The sink can be used as soon as it exists; the alerts wait for the writer.
    """
    s = SQLiteAlertStore(db_path, reactor=global_reactor())
    s.raise_alert(alert(1))
    assert s.pending == 1
    s.startService()
    try:
        assert [a.message for a in await s.alerts()] == ["alert 1"]
    finally:
        await s.stopService()


@async_test
async def test_stop_stores_pending_alerts(db_path: Path) -> None:
    """
    Alerts raised just before stopping are stored before the writer stops.
    """
    s = SQLiteAlertStore(db_path, reactor=global_reactor())
    s.startService()
    for n in range(10):
        s.raise_alert(alert(n))
    await s.stopService()
    with AlertDatabase.open(db_path) as reader:
        assert len(reader.alerts()) == 10


def test_pending_alerts_are_bounded(db_path: Path) -> None:
    """
    With the writer not running, alerts are kept up to the bound; past it
    they are dropped and counted, and raising still does not fail.
    """
    s = SQLiteAlertStore(db_path, reactor=global_reactor(), max_pending=3)
    for n in range(3):
        s.raise_alert(alert(n))
    assert (s.pending, s.dropped) == (3, 0)
    s.raise_alert(alert(3))
    s.raise_alert(alert(4))
    assert (s.pending, s.dropped) == (3, 2)


@async_test
async def test_queries_fail_when_not_running(db_path: Path) -> None:
    """
    A query to a stopped store fails rather than hanging.
    """
    s = SQLiteAlertStore(db_path, reactor=global_reactor())
    with pytest.raises(StoreNotRunning):
        await s.alerts()


def test_memory_sink_keeps_alerts_in_order() -> None:
    """
    The in-memory sink keeps every alert, and filters by type.
    """
    memory = MemoryAlertSink()
    memory.raise_alert(alert(1))
    memory.raise_alert(alert(2, type="delivery"))
    assert memory.alerts == [alert(1), alert(2, type="delivery")]
    assert memory.of_type("delivery") == [alert(2, type="delivery")]
