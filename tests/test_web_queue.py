"""
The queue pages, in memory: a real L{MessageQueue} on a memory journal
with a relay whose deliveries wait for the test, its L{QueueControl}, and
the admin app on the same L{task.Clock}; today's figures from a fake of
the daily statistics.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from smtpgw.control import MAX_QUEUE_ID_LENGTH, QueueControl
from smtpgw.interfaces import DeliveryResult, IOutbound
from smtpgw.memjournal import MemoryJournal
from smtpgw.model import Envelope, MessageState, Priority
from smtpgw.queue import MessageQueue
from tests.web_support import Browser, make_web_app
from web.app import AdminApp
from web.context import WebContext
from web.pages_queue import QUEUE_PAGE_SIZE, QueuePages, read_queue_filter

_serial = itertools.count(1)


@implementer(IOutbound)
class PendingOutbound:
    """
    Each delivery waits until the test ends it.
    """

    def __init__(self) -> None:
        self.pending: dict[str, tuple[Envelope, Deferred[DeliveryResult]]] = {}

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        d: Deferred[DeliveryResult] = Deferred()
        self.pending[envelope.queue_id] = (envelope, d)
        return d


class FakeStats:
    """
    Today's counts, as L{smtpgw.stats.DailyStats.today} gives them.
    """

    def __init__(self, delivered: int, accepted: int) -> None:
        self.delivered = delivered
        self.accepted = accepted

    def today(self, list: str | None = None) -> Deferred[dict[str, Any]]:
        return succeed(
            {
                "day": "2027-01-15",
                "list": list,
                "accepted": self.accepted,
                "delivered": self.delivered,
                "deferred": 0,
                "bounced": 0,
            }
        )


class QueueWeb:
    """
    The admin app with a started queue (one delivery at a time).
    """

    def __init__(self, tmp_path: Path, **queue_options: Any) -> None:
        self.journal = MemoryJournal()
        self.outbound = PendingOutbound()
        self.queue: MessageQueue | None = None

        def attach(ctx: WebContext) -> None:
            self.queue = MessageQueue(
                self.journal, self.outbound, ctx.clock, concurrency=1, **queue_options
            )
            ctx.control = QueueControl(self.queue, self.journal, ctx.clock)

        self.web = make_web_app(tmp_path, extra=attach, stats=FakeStats(7, 11))
        assert self.queue is not None
        self.q: MessageQueue = self.queue
        self.q.startService()
        self.browser: Browser = self.web.logged_in()

    def submit(
        self,
        list_name: str = "news",
        priority: int = 3,
        recipients: int = 2,
        subject: str = "Hello",
    ) -> str:
        now = self.web.clock.seconds()
        queue_id = f"{int(now * 1000):011X}0000{next(_serial):05X}"
        envelope = Envelope(
            queue_id=queue_id,
            list=list_name,
            username=f"u-{list_name}",
            sender=f"app@{list_name}.example",
            recipients=tuple(f"r{n}@example.org" for n in range(recipients)),
            priority=Priority(priority),
            accepted_at=now,
        )
        body = f"Subject: {subject}\r\n\r\nhello\r\n".encode()
        done: list[object] = []
        self.q.submit(envelope, body).addCallback(done.append)
        assert done, "the memory journal did not make the message durable at once"
        return queue_id

    def state(self, queue_id: str) -> MessageState | None:
        entry = self.q.get(queue_id)
        return None if entry is None else entry.state

    def post(self, path: str, data: dict[str, str] | None = None) -> Any:
        return self.browser.submit(path, data or {}, form_page="/queue")


@pytest.fixture
def qw(tmp_path: Path) -> Iterator[QueueWeb]:
    harness = QueueWeb(tmp_path)
    yield harness
    harness.web.close()


def row_ids(html: str) -> list[str]:
    return re.findall(r'<tr id="msg-([^"]+)"', html)


def row_html(html: str, queue_id: str) -> str:
    match = re.search(rf'<tr id="msg-{queue_id}".*?</tr>', html, re.S)
    assert match, f"no row for {queue_id}"
    return match.group(0)


# --- the overview ----------------------------------------------------------


def test_queue_page_needs_a_session(qw: QueueWeb) -> None:
    """
    Without a session the queue page sends to the login page, and its forms
    are refused.
    """
    stranger = qw.web.browser()
    assert stranger.get("/queue").code == 302
    assert stranger.post("/queue/stop", {"csrf": "x"}).code == 403
    assert not qw.q.stats().paused


def test_figures_show_sent_today_and_queued_now_by_state(qw: QueueWeb) -> None:
    """
    The page shows today's delivered count from the statistics, and how
    many messages wait in each state, with the queue running.
    """
    qw.submit()
    held = qw.submit()
    qw.submit()
    qw.post(f"/queue/{held}/hold")
    page = qw.browser.get("/queue")
    assert page.code == 200
    assert '<div class="figure" id="queue-sent-today">7</div>' in page.text
    assert "accepted today: 11" in page.text
    assert '<div class="figure" id="queue-waiting">3</div>' in page.text
    for state, count in (("queued", 1), ("sending", 1), ("deferred", 0), ("held", 1)):
        assert f'<strong data-state="{state}">{count}</strong>' in page.text
    assert 'id="queue-state">running<' in page.text
    assert 'id="queue-stop"' in page.text


def test_stop_and_restart_the_queue(qw: QueueWeb) -> None:
    """
    Stop stops dispatching (a new message stays queued) and the page says
    so with a Restart button; Restart sends it.
    """
    response = qw.post("/queue/stop")
    assert response.code == 303
    assert response.header("location") == "/queue"
    assert qw.q.stats().paused
    waiting = qw.submit()
    assert qw.state(waiting) is MessageState.QUEUED
    page = qw.browser.get("/queue")
    assert "The queue is stopped" in page.text
    assert 'id="queue-state">stopped<' in page.text
    assert 'id="queue-start"' in page.text
    assert 'id="queue-stop"' not in page.text
    assert "when the queue restarts" in row_html(page.text, waiting)

    response = qw.post("/queue/start")
    assert response.code == 303
    assert not qw.q.stats().paused
    assert qw.state(waiting) is MessageState.SENDING
    page = qw.browser.get("/queue")
    assert "The queue is running again." in page.text
    assert 'id="queue-state">running<' in page.text


def test_stop_that_the_journal_cannot_record_says_so(qw: QueueWeb) -> None:
    """
    A stop the journal could not record takes effect, and the page says a
    restart may undo it.
    """
    qw.journal.available = False
    response = qw.post("/queue/stop")
    assert response.code == 303
    assert qw.q.stats().paused
    page = qw.browser.get("/queue")
    assert "notice bad" in page.text
    assert "a restart may undo it" in page.text


# --- the listing -----------------------------------------------------------


def test_table_shows_each_message(qw: QueueWeb) -> None:
    """
    A row has the list, the subject and message id (linking to why it
    waits), the sender, the first recipients and how many in all, the
    state, the priority, when it was accepted and its estimated send time.
    """
    sending = qw.submit(list_name="news", recipients=1, subject="Sending now")
    waiting = qw.submit(list_name="offers", priority=2, recipients=5, subject="Big sale")
    page = qw.browser.get("/queue")
    assert '<table id="queue"' in page.text
    assert row_ids(page.text) == [sending, waiting]
    row = row_html(page.text, waiting)
    assert "<td>offers</td>" in row
    assert f'href="/queue/{waiting}"' in row
    assert '<div class="subject">Big sale</div>' in row
    assert "r0@example.org, r1@example.org, r2@example.org" in row
    assert "r3@example.org" not in row
    assert "+2 more (5 in all)" in row
    assert "app@offers.example" in row
    assert ">queued</span>" in row
    assert "2 · high" in row
    assert "accepted" in row
    assert "UTC" in row
    assert f'action="/queue/{waiting}/hold"' in row
    sending_row = row_html(page.text, sending)
    assert "being sent" in sending_row
    assert "/hold" not in sending_row
    assert "/cancel" not in sending_row
    assert f'action="/queue/{sending}/priority"' in sending_row


def test_subject_with_markup_is_escaped(qw: QueueWeb) -> None:
    """
    A subject (sender-controlled) is shown as text, never as markup.
    """
    queue_id = qw.submit(subject="<script>alert(1)</script>")
    row = row_html(qw.browser.get("/queue").text, queue_id)
    assert "<script>" not in row
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in row


def test_filters_by_list_state_and_priority(qw: QueueWeb) -> None:
    """
    The filter form narrows the table to one list, state or priority, and
    keeps its choices.
    """
    a = qw.submit(list_name="a")
    b = qw.submit(list_name="b", priority=2)
    b_held = qw.submit(list_name="b")
    qw.post(f"/queue/{b_held}/hold")
    assert row_ids(qw.browser.get("/queue").text) == [a, b, b_held]
    by_list = qw.browser.get("/queue?list=b")
    assert row_ids(by_list.text) == [b, b_held]
    assert '<option value="b" selected="selected">b</option>' in by_list.text
    assert row_ids(qw.browser.get("/queue?state=held").text) == [b_held]
    assert row_ids(qw.browser.get("/queue?priority=2").text) == [b]
    assert row_ids(qw.browser.get("/queue?list=b&state=queued").text) == [b]
    assert row_ids(qw.browser.get("/queue?list=nope").text) == []


@pytest.mark.parametrize(
    ("query", "field"),
    [("state=delivered", "state"), ("state=nonsense", "state"), ("priority=6", "priority")],
)
def test_bad_filter_is_shown_beside_its_field(qw: QueueWeb, query: str, field: str) -> None:
    """
    A filter value that means nothing is refused beside its field (400),
    and the listing goes on without it.
    """
    queue_id = qw.submit()
    page = qw.browser.get(f"/queue?{query}")
    assert page.code == 400
    assert f'id="error-{field}"' in page.text
    assert row_ids(page.text) == [queue_id]


def test_filter_reading_is_pure() -> None:
    """
    Empty fields filter nothing; each field is read on its own.
    """
    form = read_queue_filter(" b ", "HELD", "1")
    assert form.errors == {}
    assert form.queue_filter.list == "b"
    assert form.queue_filter.state is MessageState.HELD
    assert form.queue_filter.priority is Priority.VERY_HIGH
    empty = read_queue_filter("", "", "")
    assert (empty.queue_filter.list, empty.queue_filter.state) == (None, None)
    assert set(read_queue_filter("x" * 201, "", "0").errors) == {"list", "priority"}
    assert read_queue_filter("x" * 200, "", "").errors == {}


def test_pages_of_the_listing(qw: QueueWeb) -> None:
    """
    A page holds at most L{QUEUE_PAGE_SIZE} messages (at the size no next
    page; one past it a next page with the one left).
    """
    ids = [qw.submit() for _ in range(QUEUE_PAGE_SIZE)]
    full = qw.browser.get("/queue")
    assert row_ids(full.text) == ids
    assert 'id="queue-next"' not in full.text
    extra = qw.submit()
    first = qw.browser.get("/queue")
    assert row_ids(first.text) == ids
    match = re.search(r'href="([^"]+)" class="button secondary" id="queue-next"', first.text)
    assert match
    second = qw.browser.get(match.group(1).replace("&amp;", "&"))
    assert row_ids(second.text) == [extra]
    assert 'id="queue-next"' not in second.text
    assert "First page" in second.text


def test_bad_page_position_is_refused(qw: QueueWeb) -> None:
    """
    An C{after} that is no queue id gives a 400 page, not a server error.
    """
    page = qw.browser.get("/queue?after=" + "x" * (MAX_QUEUE_ID_LENGTH + 1))
    assert page.code == 400
    assert "is not a queue id" in page.text


# --- changes to one message ------------------------------------------------


def test_hold_and_release_through_the_page(qw: QueueWeb) -> None:
    """
    Hold keeps a waiting message from being sent; Release makes it wait in
    line again; both go back to the page they were asked from.
    """
    qw.submit()
    queue_id = qw.submit()
    response = qw.post(f"/queue/{queue_id}/hold", {"back": "/queue?list=news"})
    assert response.code == 303
    assert response.header("location") == "/queue?list=news"
    assert qw.state(queue_id) is MessageState.HELD
    page = qw.browser.get("/queue?list=news")
    assert f"{queue_id} is held." in page.text
    row = row_html(page.text, queue_id)
    assert "held: not until released" in row
    assert "/release" in row
    assert "/hold" not in row

    response = qw.post(f"/queue/{queue_id}/release")
    assert response.code == 303
    assert response.header("location") == "/queue"
    assert qw.state(queue_id) is MessageState.QUEUED


def test_back_never_leaves_the_queue_pages(qw: QueueWeb) -> None:
    """
    A form's C{back} naming another site or another page goes to the queue.
    """
    queue_id = qw.submit()
    qw.submit()
    for back in ("https://evil.test/", "//evil.test/", "/lists", "/queueing"):
        response = qw.post(f"/queue/{queue_id}/priority", {"priority": "2", "back": back})
        assert response.code == 303
        assert response.header("location") == "/queue", back


def test_reprioritize_through_the_page(qw: QueueWeb) -> None:
    """
    The priority form gives a message another priority, 1 to 5; anything
    else is refused with a 400 and changes nothing.
    """
    qw.submit()
    queue_id = qw.submit()
    response = qw.post(f"/queue/{queue_id}/priority", {"priority": "1"})
    assert response.code == 303
    entry = qw.q.get(queue_id)
    assert entry is not None
    assert entry.priority is Priority.VERY_HIGH
    assert "1 · very high" in qw.browser.get("/queue").text
    for bad in ("0", "6", "x", ""):
        refused = qw.post(f"/queue/{queue_id}/priority", {"priority": bad})
        assert refused.code == 400, bad
        assert "is not a priority" in refused.text
    entry = qw.q.get(queue_id)
    assert entry is not None
    assert entry.priority is Priority.VERY_HIGH
    qw.post(f"/queue/{queue_id}/priority", {"priority": "5"})
    entry = qw.q.get(queue_id)
    assert entry is not None
    assert entry.priority is Priority.VERY_LOW


def test_cancel_asks_first_then_cancels(qw: QueueWeb) -> None:
    """
    Cancel shows a confirmation page (which changes nothing); confirming
    cancels the message, which leaves the listing.
    """
    qw.submit()
    queue_id = qw.submit(list_name="offers")
    confirm = qw.browser.get(f"/queue/{queue_id}/cancel?back=/queue%3Flist%3Doffers")
    assert confirm.code == 200
    assert 'id="cancel-confirm"' in confirm.text
    assert "offers" in confirm.text
    assert 'name="back" value="/queue?list=offers"' in confirm.text
    assert qw.state(queue_id) is MessageState.QUEUED
    response = qw.browser.submit(
        f"/queue/{queue_id}/cancel",
        {"back": "/queue?list=offers"},
        form_page=f"/queue/{queue_id}/cancel",
    )
    assert response.code == 303
    assert response.header("location") == "/queue?list=offers"
    assert qw.state(queue_id) is None
    page = qw.browser.get("/queue")
    assert f"{queue_id} is cancelled" in page.text
    assert queue_id not in row_ids(page.text)


def test_cancel_from_the_why_page_goes_back_to_the_listing(qw: QueueWeb) -> None:
    """
    Cancelling from a message's own page returns to the listing, not to
    the page of a message that is gone.
    """
    qw.submit()
    queue_id = qw.submit()
    response = qw.post(f"/queue/{queue_id}/cancel", {"back": f"/queue/{queue_id}"})
    assert response.code == 303
    assert response.header("location") == "/queue"


def test_changes_the_journal_cannot_record_say_so(qw: QueueWeb) -> None:
    """
    A hold the journal could not record is done, and the page warns that a
    restart may undo it.
    """
    qw.submit()
    queue_id = qw.submit()
    qw.journal.available = False
    response = qw.post(f"/queue/{queue_id}/hold")
    assert response.code == 303
    assert qw.state(queue_id) is MessageState.HELD
    qw.journal.available = True
    page = qw.browser.get("/queue")
    assert "notice bad" in page.text
    assert "a restart may undo it" in page.text


# --- why it waits ------------------------------------------------------------


def test_why_page_explains_the_wait(qw: QueueWeb) -> None:
    """
    A message's page shows its position, the higher-priority messages
    ahead, the throttle, the reason and an estimate.
    """
    qw.submit()
    qw.submit(priority=1)
    queue_id = qw.submit(priority=4)
    page = qw.browser.get(f"/queue/{queue_id}")
    assert page.code == 200
    assert '<dl class="settings" id="why">' in page.text
    assert '<dd id="why-position">1</dd>' in page.text
    assert '<dd id="why-higher">1</dd>' in page.text
    assert '<dd id="why-throttle">higher priority</dd>' in page.text
    assert "waiting for higher-priority messages (1)" in page.text
    assert '<dd id="why-priority">4 · low</dd>' in page.text
    assert f'action="/queue/{queue_id}/hold"' in page.text


def test_why_page_of_a_message_being_sent(qw: QueueWeb) -> None:
    """
    The message being sent is not in line and offers no changes.
    """
    sending = qw.submit()
    page = qw.browser.get(f"/queue/{sending}")
    assert '<dd id="why-position">not in line</dd>' in page.text
    assert "being sent now" in page.text
    assert f"/queue/{sending}/hold" not in page.text


def test_why_page_of_a_held_message(qw: QueueWeb) -> None:
    """
    A held message has no estimate and offers Release.
    """
    qw.submit()
    queue_id = qw.submit()
    qw.post(f"/queue/{queue_id}/hold")
    page = qw.browser.get(f"/queue/{queue_id}")
    assert '<dd id="why-throttle">held</dd>' in page.text
    assert "held: not until released" in page.text
    assert f'action="/queue/{queue_id}/release"' in page.text


# --- errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", ""),
        ("GET", "/cancel"),
        ("POST", "/hold"),
        ("POST", "/release"),
        ("POST", "/cancel"),
    ],
)
def test_unknown_message_is_a_404_page(qw: QueueWeb, method: str, suffix: str) -> None:
    """
    A message that is not (or no longer) in the queue gets a 404 page that
    says so, whatever was asked of it.
    """
    path = "/queue/0000000000000000NOPE" + suffix
    response = qw.browser.get(path) if method == "GET" else qw.post(path)
    assert response.code == 404
    assert "no message 0000000000000000NOPE in the queue" in response.text
    assert 'id="queue-error"' in response.text


def test_unknown_message_reprioritized_is_a_404_page(qw: QueueWeb) -> None:
    response = qw.post("/queue/0000000000000000NOPE/priority", {"priority": "2"})
    assert response.code == 404


@pytest.mark.parametrize("verb", ["hold", "cancel", "release"])
def test_change_the_state_does_not_allow_is_a_409_page(qw: QueueWeb, verb: str) -> None:
    """
    Holding, releasing or cancelling the message being sent is refused
    with a 409 page that says why.
    """
    sending = qw.submit()
    queued = qw.submit()
    response = qw.post(f"/queue/{sending}/{verb}")
    assert response.code == 409
    assert f"cannot {verb} {sending}: it is sending now" in response.text
    assert qw.state(sending) is MessageState.SENDING
    assert qw.state(queued) is MessageState.QUEUED


def test_what_is_not_a_queue_id_is_a_400_page(qw: QueueWeb) -> None:
    """
    A queue id one past the longest is refused as a bad argument; at the
    longest it is only unknown.
    """
    assert qw.browser.get("/queue/" + "A" * (MAX_QUEUE_ID_LENGTH + 1)).code == 400
    assert qw.browser.get("/queue/" + "A" * MAX_QUEUE_ID_LENGTH).code == 404


@pytest.mark.parametrize(
    ("path", "data"),
    [
        ("/queue/stop", {}),
        ("/queue/start", {}),
        ("/queue/{id}/hold", {}),
        ("/queue/{id}/release", {}),
        ("/queue/{id}/cancel", {}),
        ("/queue/{id}/priority", {"priority": "1"}),
    ],
)
def test_forms_without_the_csrf_token_are_refused(
    qw: QueueWeb, path: str, data: dict[str, str]
) -> None:
    """
    Every queue form posted without (or with a wrong) CSRF token is refused
    and changes nothing.
    """
    qw.submit()
    queue_id = qw.submit()
    if "release" in path:
        qw.post(f"/queue/{queue_id}/hold")
    before = qw.q.get(queue_id)
    target = path.format(id=queue_id)
    for csrf in ({}, {"csrf": "wrong"}):
        response = qw.browser.post(target, {**data, **csrf})
        assert response.code == 403
    assert qw.q.get(queue_id) == before
    assert not qw.q.stats().paused


def test_without_a_queue_the_pages_say_it_is_not_available(tmp_path: Path) -> None:
    """
    An admin app running without the gateway's queue says so on every
    queue page and form, with no server error.
    """
    web = make_web_app(tmp_path)
    try:
        browser: Browser = web.logged_in()
        for path in ("/queue", "/queue/0000000000000000NOPE", "/queue/X/cancel"):
            page = browser.get(path)
            assert page.code == 503, path
            assert "The queue is not available" in page.text
        for path in ("/queue/stop", "/queue/start", "/queue/X/hold", "/queue/X/cancel"):
            response = browser.submit(path, {"priority": "1"}, form_page="/queue")
            assert response.code == 503, path
    finally:
        web.close()


def test_no_other_page_class_shadows_a_queue_method() -> None:
    """
    Every page class is mixed into one app: each name the queue pages
    define is the queue pages' own in the app (handlers and helpers alike).
    """
    for name, value in vars(QueuePages).items():
        if callable(value) and not name.startswith("__"):
            assert getattr(AdminApp, name) is value, name


def test_without_statistics_sent_today_is_unknown(tmp_path: Path) -> None:
    """
    A queue without daily statistics still shows its page; "sent today"
    says it is not known rather than 0.
    """
    journal = MemoryJournal()

    def attach(ctx: WebContext) -> None:
        queue = MessageQueue(journal, PendingOutbound(), ctx.clock)
        ctx.control = QueueControl(queue, journal, ctx.clock)

    web = make_web_app(tmp_path, extra=attach)
    try:
        page = web.logged_in().get("/queue")
        assert page.code == 200
        assert '<div class="figure" id="queue-sent-today">—</div>' in page.text
    finally:
        web.close()


def test_why_page_of_a_message_of_a_paused_console_send(tmp_path: Path) -> None:
    """
    A console send's message waits for its send: the page names the send
    and why it is paused, and says it goes when the send goes on.
    """
    from smtpgw.campaigns import (
        ADMIN_PAUSE_REASON,
        campaign_gate,
        campaign_label,
        campaign_queue_id,
        campaign_username,
    )

    harness = QueueWeb(tmp_path, gate_of=campaign_gate)
    try:
        gate = campaign_username(7)
        harness.q.open_gate(gate, Priority.NORMAL, label=campaign_label(7))
        harness.q.close_gate(gate, ADMIN_PAUSE_REASON)
        queue_id = campaign_queue_id(7, 1)
        envelope = Envelope(
            queue_id=queue_id,
            list="news",
            username=gate,
            sender="news@news.example",
            recipients=("r@example.org",),
            priority=Priority.NORMAL,
            accepted_at=harness.web.clock.seconds(),
        )
        done: list[object] = []
        harness.q.submit(envelope, b"Subject: news\r\n\r\nhello\r\n").addCallback(done.append)
        assert done
        page = harness.browser.get(f"/queue/{queue_id}")
        assert page.code == 200
        assert "console send 7 is paused: paused by an admin" in page.text
        assert "when its console send goes on" in page.text
    finally:
        harness.web.close()
