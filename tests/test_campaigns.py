"""
Tests for L{smtpgw.campaigns}: the store of console sends (validation,
states, the runner's records), the messages (merge fields, unsubscribe
link and headers, MIME), and the runner with the real queue on a
L{Clock}, an in-memory journal and a fake relay: every recipient exactly
once, the window of messages in the queue, pre-emption by priority-1 mail
(grace period included), admin pause/resume/cancel, a stopped queue,
restarts after a crash, bounces, and the rate it achieves.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import re
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, ParamSpec, cast

import pytest
from attrs import evolve
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from zope.interface import implementer

from smtpgw.alerts import MemoryAlertSink
from smtpgw.campaigns import (
    ADMIN_PAUSE_REASON,
    DEFAULT_WINDOW,
    MAX_BUILD_PER_TURN,
    MAX_SEND_AT,
    MAX_SUBJECT_LENGTH,
    QUEUE_STOPPED_REASON,
    Campaign,
    CampaignRunner,
    CampaignState,
    CampaignStateError,
    InlineCampaignStore,
    NoSuchCampaign,
    SQLiteCampaignStore,
    StatusUpdate,
    ThreadedCampaignStore,
    campaign_document,
    campaign_gate,
    campaign_queue_id,
    campaign_username,
    merge,
    parse_queue_id,
    parse_send_at,
    render_message,
)
from smtpgw.control import QueueControl
from smtpgw.database import database_path
from smtpgw.interfaces import DeliveryResult, IOutbound
from smtpgw.memjournal import MemoryJournal
from smtpgw.model import Envelope, MessageState, Priority
from smtpgw.queue import DEFAULT_GATE_BOUNCE_WINDOW, GATE_CLOSED, MessageQueue
from smtpgw.queueinfo import Throttle, Why
from smtpgw.recipients import (
    Recipient,
    RecipientStatus,
    parse_recipients_csv,
    read_unsubscribe_token,
)
from smtpgw.userstore import NoSuchList, SQLiteUserStore
from smtpgw.validation import ValidationError
from tests.twisted_support import async_test, global_reactor

T0 = 1_700_000_000.0
BASE_URL = "https://gw.example.net"
HOST = "gw.example.net"
SENDER = "news@example.com"
_ids = itertools.count(1)


# --- fixtures -------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(T0)
    return c


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = database_path(tmp_path)
    with SQLiteUserStore.open(path, Clock(), rounds=4) as users:
        users.create_list("news")
        users.create_list("other")
        users.create_user("news", domains="example.com", senders="boss@corp.example")
        users.create_user("news", domains="second.example")
    return path


@pytest.fixture
def store(db: Path, clock: Clock) -> Iterator[SQLiteCampaignStore]:
    with SQLiteCampaignStore.open(db, clock) as s:
        # Tests make many small commits; durability is not what they check.
        s._connection.execute("PRAGMA synchronous = OFF")
        yield s


def add_recipients(store: SQLiteCampaignStore, count: int, list_name: str = "news") -> list[int]:
    lines = ["email,name"] + [f"r{i}@dest{i % 7}.example,Name {i}" for i in range(count)]
    data = ("\r\n".join(lines) + "\r\n").encode()
    store.recipients.import_recipients(list_name, parse_recipients_csv(data, max_rows=10**6))
    ids: list[int] = []
    after = 0
    while page := store.recipients.recipients(list_name, after_id=after, limit=1000):
        ids += [r.id for r in page]
        after = page[-1].id
    return ids


def create(store: SQLiteCampaignStore, **fields: Any) -> Campaign:
    fields.setdefault("sender", SENDER)
    fields.setdefault("text", "Hello {{name}}")
    return store.create(fields.pop("list", "news"), fields.pop("subject", "News"), **fields)


@implementer(IOutbound)
class FakeRelay:
    """
    The relay target: logs every delivery (queue id, recipient, time) in
    order. While C{hold} is set, deliveries wait for L{release}. Addresses
    in C{plan} answer "4xx" or "5xx".
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.hold = False
        self.plan: dict[str, str] = {}
        self.log: list[tuple[str, str, float]] = []
        self.bodies: dict[str, bytes] = {}
        self.pending: list[tuple[Envelope, bytes, Deferred[DeliveryResult]]] = []

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        if self.hold:
            d: Deferred[DeliveryResult] = Deferred()
            self.pending.append((envelope, body, d))
            return d
        return succeed(self._result(envelope, body))

    def _result(self, envelope: Envelope, body: bytes) -> DeliveryResult:
        delivered, deferred, bounced = [], [], []
        for recipient in envelope.recipients:
            kind = self.plan.get(recipient, "ok")
            if kind == "ok":
                delivered.append(recipient)
                self.log.append((envelope.queue_id, recipient, self.clock.seconds()))
                self.bodies[envelope.queue_id] = body
            elif kind == "4xx":
                deferred.append((recipient, "mx said: 451 4.3.0 later"))
            else:
                bounced.append((recipient, "mx said: 550 5.1.1 no such user"))
        return DeliveryResult(tuple(delivered), tuple(deferred), tuple(bounced))

    def release(self, count: int | None = None) -> int:
        done = 0
        while self.pending and (count is None or done < count):
            envelope, body, d = self.pending.pop(0)
            d.callback(self._result(envelope, body))
            done += 1
        return done

    def campaign_ids(self) -> list[str]:
        return [q for q, _, _ in self.log if parse_queue_id(q) is not None]

    def recipients_of(self, campaign_id: int) -> list[str]:
        return [r for q, r, _ in self.log if (parse_queue_id(q) or (0, 0))[0] == campaign_id]


class Gateway:
    """
    A queue and a runner over one journal and one database, as a gateway
    process has them; L{crash} drops them as C{kill -9} would and
    L{restart} builds new ones over the same journal and database.
    """

    def __init__(
        self,
        clock: Clock,
        store: SQLiteCampaignStore,
        *,
        rate: float = 0.0,
        concurrency: int = 10,
        window: int = 16,
        grace: float = 1.0,
        max_deferred: int = 10_000,
        backend: Any = None,
    ) -> None:
        self.clock = clock
        self.store = store
        self.journal = MemoryJournal()
        self.relay = FakeRelay(clock)
        self.options: dict[str, Any] = {
            "rate": rate,
            "concurrency": concurrency,
            "window": window,
            "grace": grace,
            "max_deferred": max_deferred,
        }
        self.backend = backend or InlineCampaignStore(store)
        self.alerts = MemoryAlertSink()
        self.start()

    def start(self) -> None:
        o = self.options
        self.queue = MessageQueue(
            self.journal,
            self.relay,
            self.clock,
            rate=o["rate"],
            concurrency=o["concurrency"],
            rng=lambda: 0.5,
            hostname=HOST,
            gate_of=campaign_gate,
            preemption_grace=o["grace"],
            alerts=self.alerts,
        )
        self.runner = CampaignRunner(
            self.backend,
            self.queue,
            self.clock,
            hostname=HOST,
            base_url=BASE_URL,
            window=o["window"],
            max_deferred=o["max_deferred"],
        )
        self.queue.startService()
        self.runner.startService()

    def crash(self) -> None:
        for call in list(self.clock.getDelayedCalls()):
            call.cancel()
        self.relay.hold = False
        self.relay.pending.clear()
        self.queue.remove_observer(self.runner)

    def restart(self) -> None:
        self.crash()
        self.start()

    def submit(self, priority: int = 1) -> Envelope:
        envelope = Envelope(
            queue_id=f"{next(_ids):024X}",
            list="news",
            username="app",
            sender="app@example.com",
            recipients=("urgent@dest.example",),
            priority=Priority(priority),
            accepted_at=self.clock.seconds(),
        )
        self.queue.submit(envelope, b"Subject: urgent\r\n\r\nnow\r\n")
        return envelope

    def campaign(self, campaign_id: int) -> Campaign:
        found = self.store.get(campaign_id)
        assert found is not None
        return found


def advance(clock: Clock, seconds: float) -> None:
    """
    Advance the clock by C{seconds}, running each timer at its own time.
    """
    end = clock.seconds() + seconds
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= end]
        if not due:
            break
        clock.advance(max(0.0, min(due) - clock.seconds()))
    clock.advance(max(0.0, end - clock.seconds()))


def run_until(clock: Clock, done: Callable[[], bool], limit: float = 600.0) -> None:
    """
    Run the timers until C{done()} says so, failing after C{limit} seconds.
    """
    end = clock.seconds() + limit
    while not done():
        due = [c.getTime() for c in clock.getDelayedCalls()]
        assert due, "nothing left to run"
        assert clock.seconds() < end, "never done"
        clock.advance(max(0.0, min(due) - clock.seconds()))


def finished(gateway: Gateway, campaign_id: int) -> Callable[[], bool]:
    return lambda: gateway.campaign(campaign_id).state is CampaignState.FINISHED


# --- names ------------------------------------------------------------------------


@given(st.integers(1, 10**12), st.integers(1, 10**15))
def test_queue_ids_name_their_send_and_recipient(campaign_id: int, recipient_id: int) -> None:
    """
    A send's queue id names its send and recipient back, is never a
    generated (hexadecimal) id, and puts the message behind its send's
    gate.
    """
    queue_id = campaign_queue_id(campaign_id, recipient_id)
    assert parse_queue_id(queue_id) == (campaign_id, recipient_id)
    assert not re.fullmatch(r"[0-9A-F]{24}", queue_id)
    envelope = Envelope(queue_id, "news", "x", "s@x.org", ("r@x.org",), Priority(3), 0.0)
    assert campaign_gate(envelope) == campaign_username(campaign_id)
    assert campaign_gate(evolve(envelope, queue_id="0" * 24)) is None


def test_send_at_reads_iso_8601() -> None:
    """
    Schedule times are ISO 8601; without an offset they are UTC.
    """
    assert parse_send_at("2030-01-31T09:00:00Z") == 1896080400.0
    assert parse_send_at("2030-01-31T10:00:00+01:00") == 1896080400.0
    assert parse_send_at("2030-01-31 09:00") == 1896080400.0
    with pytest.raises(ValidationError, match="send_at"):
        parse_send_at("tomorrow")


# --- the store ----------------------------------------------------------------------


def test_create_with_defaults(store: SQLiteCampaignStore, clock: Clock) -> None:
    """
    A new send is scheduled, priority 3, with the sender normalized.
    """
    campaign = create(store, sender="News@Example.COM", html="<p>hi</p>")
    assert campaign.state is CampaignState.SCHEDULED
    assert campaign.priority is Priority.NORMAL
    assert campaign.sender == "news@example.com"
    assert (campaign.text, campaign.html) == ("Hello {{name}}", "<p>hi</p>")
    assert campaign.created_at == T0
    assert store.campaigns() == [campaign]
    assert store.campaigns(bodies=False) == [evolve(campaign, text=None, html=None, bodies=False)]
    document = campaign_document(campaign, T0)
    assert document["state"] == "scheduled"
    assert document["paused_reason"] is None
    assert document["eta"] is None
    assert document["created_at"] == "2023-11-14T22:13:20Z"
    assert (document["sent"], document["total"], document["priority"]) == (0, None, 3)


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"subject": "  "}, "subject", "required"),
        ({"subject": "x" * (MAX_SUBJECT_LENGTH + 1)}, "subject", "more than the 998"),
        ({"subject": "a\r\nBcc: x@y.org"}, "subject", "one line"),
        ({"text": None}, "text", "text or an HTML body"),
        ({"text": ""}, "text", "text or an HTML body"),
        ({"priority": 6}, "priority", "not a priority"),
        ({"priority": 0}, "priority", "not a priority"),
        ({"sender": "not an address"}, "sender", "local@domain"),
        ({"sender": "x@sub.example.com"}, "sender", "neither the domain sub.example.com"),
        ({"send_at": float("nan")}, "send_at", "not a time"),
        ({"send_at": -1}, "send_at", "not a time"),
        ({"send_at": MAX_SEND_AT + 1}, "send_at", "not a time"),
        ({"send_at": MAX_SEND_AT + 0.5}, "send_at", "not a time"),
    ],
)
def test_create_refuses_bad_fields(
    store: SQLiteCampaignStore, fields: dict[str, Any], field: str, message: str
) -> None:
    """
    Each bad field is refused, naming the field, and nothing is created.
    """
    with pytest.raises(ValidationError) as caught:
        create(store, **fields)
    assert caught.value.field == field
    assert message in caught.value.message
    assert store.campaigns() == []


def test_listings_leave_the_bodies_out(store: SQLiteCampaignStore, clock: Clock) -> None:
    """
    Listings that ask so and the runner's polls read no bodies (up to a megabyte
    each); L{SQLiteCampaignStore.get} and L{SQLiteCampaignStore.bodies}
    do, and the runner builds the messages from them.
    """
    add_recipients(store, 3)
    campaign = create(store, text="Plain {{name}}", html="<p>Rich</p>")
    for listed in (store.campaigns(bodies=False)[0], store.open_campaigns()[0]):
        assert (listed.text, listed.html, listed.bodies) == (None, None, False)
    assert (campaign.text, campaign.html, campaign.bodies) == (
        "Plain {{name}}",
        "<p>Rich</p>",
        True,
    )
    assert store.bodies(campaign.id) == ("Plain {{name}}", "<p>Rich</p>")
    assert store.bodies(campaign.id + 1) is None
    gateway = Gateway(clock, store)
    run_until(clock, finished(gateway, campaign.id))
    bodies = [gateway.relay.bodies[q] for q in gateway.relay.campaign_ids()]
    assert len(bodies) == 3
    assert all(b"Plain Name" in body and b"<p>Rich</p>" in body for body in bodies)


def test_send_at_at_the_limit_is_listed(store: SQLiteCampaignStore, clock: Clock) -> None:
    """
    A send scheduled at the latest time (L{MAX_SEND_AT},
    9999-12-31T23:59:59Z) is taken and shows in listings.
    """
    create(store, send_at=MAX_SEND_AT)
    (listed,) = store.campaigns()
    assert campaign_document(listed, clock.seconds())["send_at"] == "9999-12-31T23:59:59Z"


def test_subject_length_at_the_limit(store: SQLiteCampaignStore) -> None:
    """
    A subject of exactly L{MAX_SUBJECT_LENGTH} characters is taken.
    """
    assert len(create(store, subject="x" * MAX_SUBJECT_LENGTH).subject) == MAX_SUBJECT_LENGTH


def test_sender_policy_is_the_union_of_the_lists_users(store: SQLiteCampaignStore) -> None:
    """
    A sender passes when any SMTP+ user of the list is authorized for its
    domain or its address; a list without authorized users lets nobody
    send; an unknown list is refused.
    """
    assert store.check_sender("news", "a@second.example") == "a@second.example"
    assert store.check_sender("news", "Boss@Corp.Example") == "boss@corp.example"
    with pytest.raises(ValidationError, match=r"neither the domain corp\.example"):
        store.check_sender("news", "other@corp.example")
    with pytest.raises(ValidationError, match="no SMTP\\+ user of the list is authorized"):
        store.check_sender("other", "news@example.com")
    with pytest.raises(NoSuchList):
        create(store, list="nope")


def test_admin_pause_resume_cancel(store: SQLiteCampaignStore) -> None:
    """
    Pause, resume and cancel move a send between states; what a state does
    not allow is refused with a reason; an unknown id is refused.
    """
    campaign = create(store)
    paused = store.pause(campaign.id)
    assert (paused.state, paused.paused_by_admin, paused.paused_reason) == (
        CampaignState.PAUSED,
        True,
        ADMIN_PAUSE_REASON,
    )
    assert campaign_document(paused, T0)["paused_reason"] == ADMIN_PAUSE_REASON
    assert store.start(campaign.id) is None
    resumed = store.resume(campaign.id)
    assert (resumed.state, resumed.paused_by_admin) == (CampaignState.SCHEDULED, False)
    with pytest.raises(CampaignStateError, match="not paused by an admin"):
        store.resume(campaign.id)
    started = store.start(campaign.id)
    assert started is not None
    assert started.state is CampaignState.SENDING
    store.pause(campaign.id)
    assert store.resume(campaign.id).state is CampaignState.SENDING
    cancelled = store.cancel(campaign.id)
    assert cancelled.state is CampaignState.CANCELLED
    for change in (store.pause, store.resume, store.cancel):
        with pytest.raises(CampaignStateError, match="it is cancelled"):
            change(campaign.id)
    with pytest.raises(NoSuchCampaign):
        store.pause(999)


def test_start_counts_the_subscribed_recipients(store: SQLiteCampaignStore) -> None:
    """
    Starting takes the list's last recipient and counts the subscribed
    ones up to it; the runner reads them after the cursor, subscribed
    only, up to that last one.
    """
    ids = add_recipients(store, 5)
    store.recipients.unsubscribe("news", "r1@dest1.example")
    campaign = create(store)
    started = store.start(campaign.id)
    assert started is not None
    assert (started.total, started.last_recipient_id, started.cursor) == (4, ids[-1], 0)
    add_recipients(store, 8)
    found = store.recipients_after("news", 0, ids[-1], 10)
    assert [r.id for r in found] == [ids[0], *ids[2:]]
    assert [r.id for r in store.recipients_after("news", ids[2], ids[-1], 1)] == [ids[3]]
    assert store.recipients_after("news", 0, ids[-1], 0) == []


def test_progress_and_status_records(store: SQLiteCampaignStore, clock: Clock) -> None:
    """
    The cursor never moves back; the runner's state never overrides an
    admin's pause nor a send that is over; counts add up.
    """
    campaign = create(store)
    store.start(campaign.id)
    store.record_progress(campaign.id, 10, 10)
    store.record_progress(campaign.id, 5, 2)
    got = store.get(campaign.id)
    assert got is not None
    assert (got.cursor, got.sent) == (10, 12)
    update = StatusUpdate(campaign.id, CampaignState.PAUSED, "priority-1 SMTP+ traffic", 50.0, 3)
    store.record_status([update])
    got = store.get(campaign.id)
    assert got is not None
    assert (got.state, got.paused_reason, got.delivered) == (
        CampaignState.PAUSED,
        "priority-1 SMTP+ traffic",
        3,
    )
    store.pause(campaign.id)
    store.record_status([StatusUpdate(campaign.id, CampaignState.SENDING, None, 50.0, 1)])
    got = store.get(campaign.id)
    assert got is not None
    assert (got.state, got.paused_reason, got.delivered) == (
        CampaignState.PAUSED,
        ADMIN_PAUSE_REASON,
        4,
    )
    store.resume(campaign.id)
    store.record_status([StatusUpdate(campaign.id, CampaignState.SENDING, None, 50.0)])
    got = store.get(campaign.id)
    assert got is not None
    assert got.eta(T0) == T0 + (got.total or 0) / 50.0 - 0 or got.total == 0
    assert store.finish(campaign.id)
    assert not store.finish(campaign.id)
    store.record_status([StatusUpdate(campaign.id, CampaignState.SENDING, None, 50.0, bounced=2)])
    got = store.get(campaign.id)
    assert got is not None
    assert (got.state, got.rate, got.bounced) == (CampaignState.FINISHED, 0.0, 2)


def test_eta_from_rate(store: SQLiteCampaignStore) -> None:
    """
    A sending send's estimated finish is what is not done yet (delivered
    or bounced; the messages handed to the queue but not done count as
    left) at its current rate; a paused one has none. C{sent} stays the
    messages handed to the queue.
    """
    add_recipients(store, 100)
    campaign = create(store)
    store.start(campaign.id)
    store.record_progress(campaign.id, 1, 60)
    store.record_status(
        [StatusUpdate(campaign.id, CampaignState.SENDING, None, 20.0, delivered=30, bounced=10)]
    )
    got = store.get(campaign.id)
    assert got is not None
    assert (got.sent, got.done, got.total) == (60, 40, 100)
    # 60 left at 20 a second (not the 40 not handed to the queue yet).
    assert got.eta(T0) == T0 + 3.0
    document = campaign_document(got, T0)
    assert document["eta"] == "2023-11-14T22:13:23Z"
    assert (document["sent"], document["delivered"], document["bounced"]) == (60, 30, 10)
    assert "done" not in document
    store.record_status([StatusUpdate(campaign.id, CampaignState.PAUSED, "queue stopped", 20.0)])
    paused = store.get(campaign.id)
    assert paused is not None
    assert paused.eta(T0) is None


# --- messages ---------------------------------------------------------------------------


def sample(**fields: Any) -> Campaign:
    values: dict[str, Any] = {
        "id": 7,
        "list": "news",
        "subject": "Hello {{name}}",
        "text": "Dear {{ Name }},\nthe news.",
        "html": "<html><body><p>Dear {{name}}</p></body></html>",
        "sender": SENDER,
        "priority": Priority.NORMAL,
        "send_at": None,
        "created_at": T0,
        "created_by": None,
        "state": CampaignState.SENDING,
        "paused_by_admin": False,
        "paused_reason": None,
        "cursor": 0,
        "last_recipient_id": 10,
        "total": 10,
        "sent": 0,
        "delivered": 0,
        "bounced": 0,
        "deferred": 0,
        "in_doubt": 0,
        "rate": 0.0,
        "started_at": T0,
        "finished_at": None,
        "updated_at": None,
    }
    values.update(fields)
    return Campaign(**values)


def person(name: str = "Ann", email_address: str = "ann@dest.example") -> Recipient:
    return Recipient(3, "news", email_address, {"name": name}, RecipientStatus.SUBSCRIBED, T0)


def render(campaign: Campaign, recipient: Recipient) -> bytes:
    return render_message(
        campaign,
        recipient,
        queue_id=campaign_queue_id(campaign.id, recipient.id),
        hostname=HOST,
        unsubscribe=f"{BASE_URL}/unsubscribe/TOKEN",
        now=T0,
    )


def parsed(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def content(part: object) -> str:
    """
    A part's decoded text, with its line ends as C{\\n}.
    """
    return cast(str, cast(EmailMessage, part).get_content()).replace("\r\n", "\n")


def test_merge_fields() -> None:
    """
    C{{{name}}} takes the field (names in any case, spaces inside the
    braces); a field the recipient lacks becomes nothing; HTML escaping on
    demand.
    """
    fields = {"name": "<Ann & Bob>"}
    assert merge("Hi {{name}}, {{ NAME }}{{missing}}!", fields) == "Hi <Ann & Bob>, <Ann & Bob>!"
    assert merge("<b>{{name}}</b>", fields, escape=True) == "<b>&lt;Ann &amp; Bob&gt;</b>"
    assert merge("{{ not closed", fields) == "{{ not closed"


def test_message_headers_and_parts() -> None:
    """
    A send with text and HTML gives multipart/alternative with the merged
    bodies (escaped in HTML), an unsubscribe link in each, and the
    List-Unsubscribe headers; lines end with CRLF only.
    """
    raw = render(sample(), person("Zoë <b>"))
    message = parsed(raw)
    assert message["From"] == SENDER
    assert message["To"] == "ann@dest.example"
    assert message["Subject"] == "Hello Zoë <b>"
    assert message["Message-ID"] == f"<C000007R0000000003@{HOST}>"
    assert message["List-Unsubscribe"] == f"<{BASE_URL}/unsubscribe/TOKEN>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["X-Priority"] == "3"
    assert message["Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert message.get_content_type() == "multipart/alternative"
    text_part, html_part = message.iter_parts()
    text, page = content(text_part), content(html_part)
    assert text.startswith("Dear Zoë <b>,\nthe news.")
    assert f"To unsubscribe: {BASE_URL}/unsubscribe/TOKEN" in text
    assert "<p>Dear Zoë &lt;b&gt;</p>" in page
    assert page.endswith(
        f'<p><a href="{BASE_URL}/unsubscribe/TOKEN">Unsubscribe</a></p></body></html>'
    )
    assert raw.count(b"\n") == raw.count(b"\r\n")
    assert raw.count(b"\r") == raw.count(b"\r\n")


def test_placed_unsubscribe_link_is_not_added_again() -> None:
    """
    A body that places C{{{unsubscribe_url}}} gets the link there, and no
    footer; a send with only HTML is a single text/html message.
    """
    campaign = sample(text=None, html='<a href="{{unsubscribe_url}}">leave</a>')
    message = parsed(render(campaign, person()))
    assert message.get_content_type() == "text/html"
    assert content(message) == f'<a href="{BASE_URL}/unsubscribe/TOKEN">leave</a>\n'


@pytest.mark.parametrize(
    ("before", "end"),
    [("<p>İİİİ</p>", "</body>"), ("<p>plain</p>", "</BODY >"), ("<p>İ</p>", "</Body\n>")],
)
def test_html_footer_goes_before_the_end_of_the_body(before: str, end: str) -> None:
    """
    The unsubscribe link is added just before the last C{</body>} (any
    case, spaces before C{>}), also when the body has characters whose
    lower case is longer (C{İ}).
    """
    campaign = sample(text=None, html=f"<html><body>{before}{end}</html>")
    got = content(parsed(render(campaign, person())))
    link = f'<p><a href="{BASE_URL}/unsubscribe/TOKEN">Unsubscribe</a></p>'
    assert got == f"<html><body>{before}{link}{end}</html>\n"


_texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=300)


@given(_texts, _texts, st.text(st.characters(codec="utf-8"), max_size=120), _texts)
def test_any_content_gives_a_well_formed_message(
    text: str, html_body: str, subject: str, name: str
) -> None:
    """
    Whatever the bodies, subject and fields: CRLF line ends only, no line
    over 998 octets, the subject a single header without line breaks, and
    the text part reads back as the merged text (line ends aside).
    """
    campaign = sample(text=text or "x", html=html_body or None, subject=subject or "s")
    raw = render(campaign, person(name))
    assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    message = parsed(raw)
    assert "\n" not in message["Subject"]
    parts = list(message.iter_parts()) if message.is_multipart() else [message]
    fields = {
        "name": name,
        "email": "ann@dest.example",
        "unsubscribe_url": f"{BASE_URL}/unsubscribe/TOKEN",
    }
    merged = merge(text or "x", fields).replace("\r\n", "\n").replace("\r", "\n")
    assert content(parts[0]).startswith(merged.rstrip())


# --- the runner ---------------------------------------------------------------------------


def test_every_subscribed_recipient_once_then_finished(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    A send reaches every subscribed recipient exactly once (not the
    unsubscribed nor the bounced), each message carrying a working
    unsubscribe link, and ends finished with sent = total.
    """
    ids = add_recipients(store, 60)
    store.recipients.unsubscribe("news", "r3@dest3.example")
    store.recipients.mark_bounced("news", "r4@dest4.example")
    gateway = Gateway(clock, store, window=8)
    campaign = create(store)
    run_until(clock, finished(gateway, campaign.id))
    got = gateway.relay.recipients_of(campaign.id)
    assert sorted(got) == sorted(f"r{i}@dest{i % 7}.example" for i in range(60) if i not in (3, 4))
    assert len(got) == len(set(got)) == 58
    done = gateway.campaign(campaign.id)
    assert (done.sent, done.total, done.cursor) == (58, 58, ids[-1])
    run_until(clock, lambda: gateway.campaign(campaign.id).delivered == 58, limit=5)
    key = store.unsubscribe_key()
    body = gateway.relay.bodies[campaign_queue_id(campaign.id, ids[0])]
    token = re.search(rb"/unsubscribe/([^>\s]+)>", body)
    assert token is not None
    assert read_unsubscribe_token(key, token.group(1).decode()) == ("news", ids[0])
    assert gateway.queue.gates() == set()


def test_at_most_a_window_of_messages_in_the_queue(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    However many recipients, the queue never holds more than the window of
    one send's messages, and the journal only takes more as they leave.
    """
    add_recipients(store, 200)
    window = 10
    gateway = Gateway(clock, store, window=window, concurrency=3)
    gateway.relay.hold = True
    campaign = create(store)
    most = 0
    for _ in range(400):
        advance(clock, 0.01)
        most = max(most, len(gateway.queue.gated(campaign_username(campaign.id))))
        accepted = len(list(gateway.journal.replay()))
        assert accepted <= window
        gateway.relay.release(1)
        if gateway.campaign(campaign.id).state is CampaignState.FINISHED:
            break
    assert most == window
    run_until(clock, finished(gateway, campaign.id))
    assert len(gateway.relay.campaign_ids()) == 200


def test_priority_1_burst_goes_first_and_the_send_shows_paused(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    Midway through a send, twenty priority-1 messages arriving one after
    another are all delivered before any further message of the send; the
    send is shown paused for priority-1 SMTP+ traffic while they go, then
    resumes by itself and reaches everyone once.
    """
    add_recipients(store, 300)
    gateway = Gateway(clock, store, rate=100, window=32, grace=0.5)
    campaign = create(store)
    run_until(clock, lambda: len(gateway.relay.campaign_ids()) >= 100)
    urgent = []
    seen: set[tuple[CampaignState, str | None]] = set()
    for _ in range(20):
        urgent.append(gateway.submit(priority=1).queue_id)
        advance(clock, 0.2)
        current = gateway.campaign(campaign.id)
        seen.add((current.state, current.paused_reason))
    log = [q for q, _, _ in gateway.relay.log]
    first = log.index(urgent[0])
    after_first = log[first:]
    assert after_first == urgent, "a console message went between the priority-1 messages"
    assert seen == {(CampaignState.PAUSED, "priority-1 SMTP+ traffic")}
    advance(clock, 0.6)
    assert gateway.campaign(campaign.id).state is CampaignState.SENDING
    run_until(clock, finished(gateway, campaign.id))
    got = gateway.relay.recipients_of(campaign.id)
    assert len(got) == len(set(got)) == 300


@pytest.mark.parametrize(("gap", "between"), [(0.999, False), (1.001, True)])
def test_grace_period_at_its_end_and_one_past(
    store: SQLiteCampaignStore, clock: Clock, gap: float, between: bool
) -> None:
    """
    A priority-1 message arriving just within the grace period after the
    previous one was delivered has no console message before it; just past
    the grace period, the send got one in.
    """
    add_recipients(store, 100)
    gateway = Gateway(clock, store, rate=50, window=8, grace=1.0)
    campaign = create(store)
    run_until(clock, lambda: len(gateway.relay.campaign_ids()) >= 10)
    first = gateway.submit(priority=1).queue_id
    run_until(clock, lambda: first in {q for q, _, _ in gateway.relay.log})
    advance(clock, gap)
    second = gateway.submit(priority=1).queue_id
    advance(clock, 0.1)
    log = [q for q, _, _ in gateway.relay.log]
    in_between = log[log.index(first) + 1 : log.index(second)]
    assert bool(in_between) is between
    assert all(parse_queue_id(q) is not None for q in in_between)
    run_until(clock, finished(gateway, campaign.id))


def test_admin_pause_resume_and_cancel_while_sending(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    An admin's pause (a database write the runner picks up) stops the
    send, its queued messages included; resume goes on where it stopped;
    cancel drops what is queued and nobody else gets it.
    """
    add_recipients(store, 200)
    gateway = Gateway(clock, store, rate=20, window=8)
    campaign = create(store)
    run_until(clock, lambda: len(gateway.relay.campaign_ids()) >= 20)
    store.pause(campaign.id)
    advance(clock, 1.0)
    count = len(gateway.relay.campaign_ids())
    advance(clock, 10.0)
    assert len(gateway.relay.campaign_ids()) == count
    paused = gateway.campaign(campaign.id)
    assert (paused.state, paused.paused_reason) == (CampaignState.PAUSED, ADMIN_PAUSE_REASON)
    store.resume(campaign.id)
    gateway.runner.poke()
    advance(clock, 2.0)
    assert len(gateway.relay.campaign_ids()) > count
    assert gateway.campaign(campaign.id).state is CampaignState.SENDING
    store.cancel(campaign.id)
    gateway.runner.poke()
    advance(clock, 0.0)
    count = len(gateway.relay.campaign_ids())
    advance(clock, 30.0)
    assert len(gateway.relay.campaign_ids()) == count < 200
    assert gateway.queue.gated(campaign_username(campaign.id)) == []
    assert gateway.campaign(campaign.id).state is CampaignState.CANCELLED
    got = gateway.relay.recipients_of(campaign.id)
    assert len(got) == len(set(got))


def test_why_a_send_message_waits_names_the_send_and_its_pause(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    "Why" for a queued message of a send says what the send's page says:
    paused by an admin, for priority-1 SMTP+ traffic, or the queue
    stopped, with no position while its gate is closed; and once the send
    goes on, it is in line again.
    """
    add_recipients(store, 50)
    gateway = Gateway(clock, store, rate=10, window=8)
    control = QueueControl(gateway.queue, gateway.journal, clock)
    campaign = create(store)
    run_until(clock, lambda: len(gateway.relay.campaign_ids()) >= 5)
    gate = campaign_username(campaign.id)

    def why_of_queued() -> Why:
        queued = [e for e in gateway.queue.gated(gate) if e.state is MessageState.QUEUED]
        assert queued, "no queued message of the send"
        results: list[Why] = []
        control.why(queued[-1].queue_id).addCallback(results.append)
        return results[0]

    assert why_of_queued().throttle is Throttle.RATE
    store.pause(campaign.id)
    advance(clock, 1.0)
    paused = why_of_queued()
    assert (paused.throttle, paused.reason, paused.position) == (
        Throttle.CONSOLE_SEND_PAUSED,
        f"console send {campaign.id} is paused: {ADMIN_PAUSE_REASON}",
        None,
    )
    assert gateway.campaign(campaign.id).paused_reason == ADMIN_PAUSE_REASON
    store.resume(campaign.id)
    gateway.runner.poke()
    advance(clock, 0.05)
    gateway.submit(priority=1)
    pre_empted = why_of_queued()
    assert pre_empted.reason == f"console send {campaign.id} is paused: priority-1 SMTP+ traffic"
    assert pre_empted.position is None
    advance(clock, 2.0)
    gateway.queue.pause()
    stopped = why_of_queued()
    assert stopped.reason == f"console send {campaign.id} is paused: {QUEUE_STOPPED_REASON}"
    gateway.queue.resume()
    run_until(clock, finished(gateway, campaign.id))


def test_queue_stopped_is_shown_and_the_send_goes_on_after(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    While an admin has stopped the queue, the send is shown paused with
    "queue stopped"; once the queue starts again it goes on by itself.
    """
    add_recipients(store, 50)
    gateway = Gateway(clock, store, rate=10, window=8)
    campaign = create(store)
    run_until(clock, lambda: len(gateway.relay.campaign_ids()) >= 5)
    gateway.queue.pause()
    advance(clock, 2.0)
    stopped = gateway.campaign(campaign.id)
    assert (stopped.state, stopped.paused_reason) == (CampaignState.PAUSED, QUEUE_STOPPED_REASON)
    assert campaign_document(stopped, clock.seconds())["paused_reason"] == QUEUE_STOPPED_REASON
    gateway.queue.resume()
    advance(clock, 2.0)
    assert gateway.campaign(campaign.id).state is CampaignState.SENDING
    run_until(clock, finished(gateway, campaign.id))
    assert len(set(gateway.relay.recipients_of(campaign.id))) == 50


def test_scheduled_send_starts_at_its_time(store: SQLiteCampaignStore, clock: Clock) -> None:
    """
    A send scheduled for later waits, and starts once its time comes.
    """
    add_recipients(store, 5)
    gateway = Gateway(clock, store)
    campaign = create(store, send_at=T0 + 60)
    advance(clock, 59.0)
    assert gateway.campaign(campaign.id).state is CampaignState.SCHEDULED
    assert gateway.relay.log == []
    advance(clock, 2.0)
    assert len(gateway.relay.campaign_ids()) == 5


def test_restart_goes_on_where_it_stopped_counting_messages_in_flight(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    After a crash midway (C{kill -9}: nothing stopped cleanly), the send
    goes on where it stopped; nobody gets it twice except the recipients
    whose message was being delivered at the crash, which are counted
    (in_doubt).
    """
    add_recipients(store, 120)
    gateway = Gateway(clock, store, rate=50, window=16, concurrency=4)
    campaign = create(store)
    run_until(clock, lambda: len(gateway.relay.campaign_ids()) >= 40)
    gateway.relay.hold = True
    advance(clock, 0.2)
    in_flight = [e.queue_id for e, _, _ in gateway.relay.pending]
    assert len(in_flight) == 4
    gateway.restart()
    run_until(clock, finished(gateway, campaign.id))
    run_until(clock, lambda: gateway.campaign(campaign.id).in_doubt == 4, limit=5)
    got = gateway.relay.recipients_of(campaign.id)
    assert sorted(set(got)) == sorted(f"r{i}@dest{i % 7}.example" for i in range(120))
    assert len(got) == 120
    done = gateway.campaign(campaign.id)
    assert (done.sent, done.total, done.in_doubt) == (120, 120, 4)


def test_restart_with_messages_in_flight_counts_duplicates(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    When the relay took messages that were being sent at a crash but the
    gateway never heard, those (and only those) arrive twice, and are
    counted.
    """
    add_recipients(store, 40)
    gateway = Gateway(clock, store, window=8, concurrency=3)
    campaign = create(store)
    gateway.relay.hold = True
    advance(clock, 0.5)
    taken = [e for e, _, _ in gateway.relay.pending]
    assert len(taken) == 3
    for envelope in taken:
        gateway.relay.log.append((envelope.queue_id, envelope.recipients[0], clock.seconds()))
    gateway.restart()
    run_until(clock, finished(gateway, campaign.id))
    run_until(clock, lambda: gateway.campaign(campaign.id).in_doubt == 3, limit=5)
    got = gateway.relay.recipients_of(campaign.id)
    duplicates = sorted(r for r in set(got) if got.count(r) > 1)
    assert duplicates == sorted(e.recipients[0] for e in taken)
    assert len(set(got)) == 40


class FailingProgress(InlineCampaignStore):
    """
    A store whose progress records fail while C{failing} is set (a
    database that cannot be written).
    """

    failing = False

    def record_progress(self, campaign_id: int, cursor: int, sent: int) -> Deferred[bool]:
        if self.failing:
            return fail(OSError("disk I/O error"))
        return super().record_progress(campaign_id, cursor, sent)


def test_crash_between_journal_and_cursor_sends_nothing_twice(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    When a batch is durable in the journal but its cursor could not be
    recorded, then the gateway dies: after the restart the journal refuses
    the second copies, nothing of the batch was sent before the cursor
    covered it, and nobody gets it twice.
    """
    add_recipients(store, 60)
    backend = FailingProgress(store)
    gateway = Gateway(clock, store, rate=20, window=8, backend=backend)
    campaign = create(store)
    run_until(clock, lambda: len(gateway.relay.campaign_ids()) >= 16)
    backend.failing = True
    advance(clock, 0.5)
    held = [
        q for q in (m.envelope.queue_id for m in gateway.journal.replay()) if parse_queue_id(q)
    ]
    sent_before = set(gateway.relay.campaign_ids())
    assert held
    assert not set(held) & sent_before
    gateway.crash()
    backend.failing = False
    gateway.start()
    run_until(clock, finished(gateway, campaign.id))
    got = gateway.relay.recipients_of(campaign.id)
    assert len(got) == len(set(got)) == 60
    assert gateway.campaign(campaign.id).sent == 60
    logs = [e for e in gateway.journal.state_records if e[1] == "sending"]
    assert len({q for q, *_ in logs}) == 60


def test_journal_refusal_is_retried(store: SQLiteCampaignStore, clock: Clock) -> None:
    """
    While the journal refuses (disk full), the send waits and tries again;
    nobody is skipped nor sent twice.
    """
    add_recipients(store, 30)
    gateway = Gateway(clock, store, window=8)
    gateway.journal.available = False
    campaign = create(store)
    advance(clock, 3.0)
    assert gateway.relay.log == []
    gateway.journal.available = True
    run_until(clock, finished(gateway, campaign.id))
    got = gateway.relay.recipients_of(campaign.id)
    assert len(got) == len(set(got)) == 30


def test_hard_bounces_mark_recipients_bounced(store: SQLiteCampaignStore, clock: Clock) -> None:
    """
    A recipient refused for good is marked bounced (never sent to again)
    and counted; one deferred is counted as deferred, not bounced.
    """
    add_recipients(store, 10)
    gateway = Gateway(clock, store)
    gateway.relay.plan = {"r2@dest2.example": "5xx", "r5@dest5.example": "4xx"}
    campaign = create(store)
    run_until(clock, finished(gateway, campaign.id))
    advance(clock, 2.0)
    done = gateway.campaign(campaign.id)
    assert (done.delivered, done.bounced, done.deferred) == (8, 1, 1)
    bounced = store.recipients.get("news", "r2@dest2.example")
    assert bounced is not None
    assert bounced.status is RecipientStatus.BOUNCED
    second = create(store)
    run_until(clock, finished(gateway, second.id))
    assert "r2@dest2.example" not in gateway.relay.recipients_of(second.id)
    assert gateway.campaign(second.id).total == 9


def test_bounces_of_a_send_mail_no_report_and_raise_one_alert(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    The bounces of a send mail no report (DSN) to its sender; they raise
    one alert naming the send at once, and one summing up the others when
    the window ends; its recipients are marked bounced and counted.
    """
    add_recipients(store, 14)
    gateway = Gateway(clock, store)
    bad = [f"r{i}@dest{i % 7}.example" for i in range(0, 14, 7)] + ["r3@dest3.example"]
    gateway.relay.plan = dict.fromkeys(bad, "5xx")
    campaign = create(store)
    run_until(clock, finished(gateway, campaign.id))
    advance(clock, 2.0)
    assert gateway.queue.stats().dsns == 0
    assert SENDER not in [r for _, r, _ in gateway.relay.log]
    assert gateway.campaign(campaign.id).bounced == 3
    for address in bad:
        recipient = store.recipients.get("news", address)
        assert recipient is not None
        assert recipient.status is RecipientStatus.BOUNCED
    [first] = gateway.alerts.of_type("bounce")
    assert first.list == "news"
    assert first.message.startswith(f"console send {campaign.id} (list news): recipient ")
    assert first.details["gate"] == campaign_username(campaign.id)
    advance(clock, DEFAULT_GATE_BOUNCE_WINDOW)
    [_, summary] = gateway.alerts.of_type("bounce")
    assert summary.message == (
        f"console send {campaign.id} (list news): 2 more recipients bounced in the last 10 minutes"
    )
    assert sorted([first.details["recipients"][0], *summary.details["recipients"]]) == sorted(bad)


def test_too_many_deferred_holds_the_send(store: SQLiteCampaignStore, clock: Clock) -> None:
    """
    A send builds its next message while it has one deferred message less
    than its most, not once it has its most: it then says why it waits,
    and goes on once the retries succeed.
    """
    add_recipients(store, 30)
    gateway = Gateway(clock, store, window=1, max_deferred=3)
    gateway.relay.plan = {f"r{i}@dest{i % 7}.example": "4xx" for i in range(30)}
    campaign = create(store)
    advance(clock, 5.0)
    held = gateway.campaign(campaign.id)
    assert (held.sent, held.deferred) == (3, 3)
    assert held.state is CampaignState.PAUSED
    assert held.paused_reason == "waiting for 3 deferred messages to be retried"
    gateway.relay.plan = {}
    run_until(clock, finished(gateway, campaign.id), limit=3600)
    assert len(set(gateway.relay.recipients_of(campaign.id))) == 30


def test_rate_of_a_send_alone_is_within_two_percent(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    Alone in the gateway, a send goes at the queue's --rate, within 2 %.
    """
    rate = 100.0
    add_recipients(store, 1500)
    gateway = Gateway(clock, store, rate=rate, window=DEFAULT_WINDOW // 4)
    campaign = create(store)
    run_until(clock, finished(gateway, campaign.id))
    times = [t for q, _, t in gateway.relay.log if parse_queue_id(q)]
    assert len(times) == 1500
    # After the bucket's first burst, one message per token.
    burst = int(rate / 10)
    achieved = (len(times) - burst) / (times[-1] - times[burst - 1])
    assert abs(achieved - rate) / rate <= 0.02, achieved
    assert gateway.runner.rate(campaign.id) == 0.0


def test_runner_refuses_bad_wiring(store: SQLiteCampaignStore, clock: Clock) -> None:
    """
    The runner needs a queue that puts sends behind gates, and an absolute
    ASCII http(s) base URL.
    """
    backend = InlineCampaignStore(store)
    plain = MessageQueue(MemoryJournal(), FakeRelay(clock), clock)
    with pytest.raises(ValueError, match="gate_of=campaign_gate"):
        CampaignRunner(backend, plain, clock, hostname=HOST, base_url=BASE_URL)
    gated = MessageQueue(MemoryJournal(), FakeRelay(clock), clock, gate_of=campaign_gate)
    long = "https://x.org/" + "a" * 487
    CampaignRunner(backend, gated, clock, hostname=HOST, base_url=long[:-1])
    for bad in ("", "/relative", "ftp://x", "https://exämple.org", 'https://x.org/"', long):
        with pytest.raises(ValueError, match="base_url"):
            CampaignRunner(backend, gated, clock, hostname=HOST, base_url=bad)
    with pytest.raises(ValueError, match="window"):
        CampaignRunner(backend, gated, clock, hostname=HOST, base_url=BASE_URL, window=0)


def test_stop_writes_the_counts(store: SQLiteCampaignStore, clock: Clock) -> None:
    """
    Stopping the runner waits for the work under way and writes the counts.
    """
    add_recipients(store, 10)
    gateway = Gateway(clock, store)
    campaign = create(store)
    run_until(clock, lambda: len(gateway.relay.campaign_ids()) == 10)
    done: list[object] = []
    gateway.runner.stopService().addBoth(done.append)
    assert done == [None]
    assert gateway.campaign(campaign.id).delivered == 10


def test_a_send_cancelled_while_the_gateway_was_down(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    Messages of a send cancelled while the gateway was down are cancelled
    at the restart, not sent.
    """
    add_recipients(store, 40)
    gateway = Gateway(clock, store, window=8, concurrency=2)
    campaign = create(store)
    gateway.relay.hold = True
    advance(clock, 0.5)
    gateway.crash()
    store.cancel(campaign.id)
    gateway.relay.hold = False
    gateway.start()
    advance(clock, 5.0)
    assert gateway.relay.campaign_ids() == []
    assert gateway.queue.gates() == set()
    assert [m for m in gateway.journal.replay() if parse_queue_id(m.envelope.queue_id)] == []


def test_deferred_messages_of_a_finished_send_go_after_a_restart(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    A finished send whose last messages wait for a retry keeps its gate
    open across a restart: they are delivered, once, and counted.
    """
    add_recipients(store, 5)
    gateway = Gateway(clock, store)
    gateway.relay.plan = {"r1@dest1.example": "4xx"}
    campaign = create(store)
    run_until(clock, finished(gateway, campaign.id))
    gateway.restart()
    gateway.relay.plan = {}
    advance(clock, 120.0)
    got = gateway.relay.recipients_of(campaign.id)
    assert sorted(got) == sorted(f"r{i}@dest{i}.example" for i in range(5))
    assert gateway.campaign(campaign.id).delivered == 5
    assert gateway.queue.gates() == set()


def test_poke_looks_at_once(store: SQLiteCampaignStore, clock: Clock) -> None:
    """
    A send created in this process starts at a poke, without waiting for
    the next look at the database.
    """
    add_recipients(store, 3)
    gateway = Gateway(clock, store)
    advance(clock, 0.1)
    campaign = create(store)
    gateway.runner.poke()
    advance(clock, 0.0)
    assert len(gateway.relay.recipients_of(campaign.id)) == 3
    assert gateway.runner.window_of(campaign.id) == 0


def _cancelled_in_journal(gateway: Gateway) -> set[str]:
    return {q for q, state, *_ in gateway.journal.state_records if state == "cancelled"}


@pytest.mark.parametrize("paused", [False, True])
def test_queued_message_of_a_recipient_who_unsubscribes_is_cancelled(
    store: SQLiteCampaignStore, clock: Clock, paused: bool
) -> None:
    """
    A recipient who unsubscribes while their message waits in the queue
    (sending or paused by an admin) does not get it: the runner's next poll
    cancels it in the journal; the others get theirs.
    """
    ids = add_recipients(store, 40)
    gateway = Gateway(clock, store, rate=5, window=16)
    campaign = create(store)
    advance(clock, 1.0)
    queue_id = campaign_queue_id(campaign.id, ids[10])
    assert gateway.queue.get(queue_id) is not None
    if paused:
        store.pause(campaign.id)
        gateway.runner.poke()
        advance(clock, 0.1)
    store.recipients.unsubscribe_id("news", ids[10])
    advance(clock, 1.0)
    assert gateway.queue.get(queue_id) is None
    assert queue_id in _cancelled_in_journal(gateway)
    if paused:
        store.resume(campaign.id)
    run_until(clock, finished(gateway, campaign.id))
    got = gateway.relay.recipients_of(campaign.id)
    assert sorted(got) == sorted(f"r{i}@dest{i % 7}.example" for i in range(40) if i != 10)


def test_replayed_message_of_a_recipient_who_unsubscribed_while_down_is_not_sent(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    A recipient who unsubscribed while the gateway was down does not get
    their message the journal replays: it is cancelled before the send's
    gate opens.
    """
    ids = add_recipients(store, 20)
    gateway = Gateway(clock, store, window=16)
    gateway.relay.hold = True
    campaign = create(store)
    advance(clock, 0.5)
    queue_id = campaign_queue_id(campaign.id, ids[15])
    assert gateway.queue.get(queue_id) is not None
    gateway.crash()
    store.recipients.unsubscribe_id("news", ids[15])
    gateway.start()
    run_until(clock, finished(gateway, campaign.id))
    assert "r15@dest1.example" not in gateway.relay.recipients_of(campaign.id)
    assert queue_id in _cancelled_in_journal(gateway)


def test_forget_recipient_cancels_at_once_but_not_a_delivery_under_way(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    L{CampaignRunner.forget_recipient} (what the pages call after an
    unsubscribe) cancels the recipient's queued message of each open send
    of the list at once; a message being delivered goes; other lists'
    sends are not touched.
    """
    ids = add_recipients(store, 10)
    gateway = Gateway(clock, store, concurrency=1, window=16)
    gateway.relay.hold = True
    campaign = create(store)
    advance(clock, 0.1)
    (sending,) = [e.recipients[0] for e, _, _ in gateway.relay.pending]
    assert sending == "r0@dest0.example"
    assert gateway.runner.forget_recipient("other", ids[3]) == 0
    assert gateway.runner.forget_recipient("news", ids[3]) == 1
    assert gateway.runner.forget_recipient("news", ids[0]) == 0
    assert gateway.queue.get(campaign_queue_id(campaign.id, ids[3])) is None
    assert campaign_queue_id(campaign.id, ids[3]) in _cancelled_in_journal(gateway)
    gateway.relay.hold = False
    gateway.relay.release()
    run_until(clock, finished(gateway, campaign.id))
    got = gateway.relay.recipients_of(campaign.id)
    assert sorted(got) == sorted(f"r{i}@dest{i % 7}.example" for i in range(10) if i != 3)


def test_catching_up_ends_when_the_rest_unsubscribed(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    After a restart, a send whose journal holds messages past its cursor
    catches up; when their recipients unsubscribed meanwhile, it does not
    wait forever: the cursor moves to the last recipient, the messages are
    cancelled, never sent, and the send finishes.
    """
    ids = add_recipients(store, 20)
    backend = FailingProgress(store)
    gateway = Gateway(clock, store, window=8, backend=backend)
    backend.failing = True
    campaign = create(store)
    advance(clock, 0.5)
    assert gateway.campaign(campaign.id).cursor == 0
    replayed = [
        q for q in (m.envelope.queue_id for m in gateway.journal.replay()) if parse_queue_id(q)
    ]
    assert replayed
    gateway.crash()
    backend.failing = False
    for recipient_id in ids:
        store.recipients.unsubscribe_id("news", recipient_id)
    gateway.start()
    run_until(clock, finished(gateway, campaign.id), limit=30)
    assert gateway.relay.log == []
    assert set(replayed) <= _cancelled_in_journal(gateway)
    assert gateway.campaign(campaign.id).cursor == ids[-1]
    assert gateway.queue.gates() == set()


@pytest.mark.parametrize("unsubscribed", ["first", "all"])
def test_held_back_message_of_a_recipient_who_unsubscribes_is_cancelled(
    store: SQLiteCampaignStore, clock: Clock, unsubscribed: str
) -> None:
    """
    A message held back (durable, its cursor not recorded) whose recipient
    unsubscribes before the send goes on is cancelled in the journal when
    the cursor passes it (or the send runs out of recipients): the send
    finishes, and a restart does not send it.
    """
    ids = add_recipients(store, 20 if unsubscribed == "first" else 8)
    backend = FailingProgress(store)
    gateway = Gateway(clock, store, window=8, backend=backend)
    backend.failing = True
    campaign = create(store)
    advance(clock, 0.5)
    held = set(gateway.runner._sends[campaign.id].held_back)
    gone = ids[:1] if unsubscribed == "first" else ids
    assert {campaign_queue_id(campaign.id, i) for i in gone} <= held
    for recipient_id in gone:
        store.recipients.unsubscribe_id("news", recipient_id)
    backend.failing = False
    run_until(clock, finished(gateway, campaign.id), limit=30)
    assert {campaign_queue_id(campaign.id, i) for i in gone} <= _cancelled_in_journal(gateway)
    gateway.restart()
    advance(clock, 30)
    got = gateway.relay.recipients_of(campaign.id)
    expected = [f"r{i}@dest{i % 7}.example" for i, r in enumerate(ids) if r not in gone]
    assert sorted(got) == sorted(expected)


def test_a_batch_is_built_a_slice_per_reactor_turn(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    The runner builds at most L{MAX_BUILD_PER_TURN} messages in one turn
    of the reactor (large bodies cost milliseconds each), then goes on at
    the next turn; the batch still goes whole, each recipient once.
    """
    add_recipients(store, 2 * MAX_BUILD_PER_TURN + 1)
    gateway = Gateway(clock, store, window=256)
    gateway.relay.hold = True
    campaign = create(store)

    def built() -> int:
        return sum(1 for m in gateway.journal.replay() if parse_queue_id(m.envelope.queue_id))

    counts = []
    # One timer at a time (Clock.advance would also run those the timers
    # add for now): each is a turn of the reactor.
    while due := [c for c in clock.calls if c.getTime() <= clock.seconds()]:
        call = min(due, key=lambda c: c.getTime())
        clock.calls.remove(call)
        call.func(*call.args, **call.kw)
        counts.append(built())
    steps = [b - a for a, b in itertools.pairwise([0, *counts])]
    assert max(steps) == MAX_BUILD_PER_TURN
    assert counts[-1] == 2 * MAX_BUILD_PER_TURN + 1
    gateway.relay.hold = False
    gateway.relay.release()
    run_until(clock, finished(gateway, campaign.id))
    got = gateway.relay.recipients_of(campaign.id)
    assert len(got) == len(set(got)) == 2 * MAX_BUILD_PER_TURN + 1


def _one_turn(clock: Clock) -> bool:
    """
    Run the one timer due first, if any is due now (a turn of the reactor:
    C{Clock.advance} would also run those it adds for now).
    """
    due = [c for c in clock.calls if c.getTime() <= clock.seconds()]
    if not due:
        return False
    call = min(due, key=lambda c: c.getTime())
    clock.calls.remove(call)
    call.func(*call.args, **call.kw)
    return True


@pytest.mark.parametrize(("crash", "looked"), [(False, False), (True, False), (False, True)])
def test_a_pause_made_while_a_batch_is_built_hands_none_of_it_on(
    store: SQLiteCampaignStore, clock: Clock, crash: bool, looked: bool
) -> None:
    """
    An admin pauses a send while the runner is between two slices of a
    batch, before the runner looked at the database again (or, with
    C{looked}, as the page does: telling the runner, which stops building
    at the next slice): the count the admin saw at the pause stays,
    nothing of the batch reaches the queue, and after the resume (or a
    crash, then the resume) every recipient gets the message once and the
    count is whole.
    """
    total = 2 * MAX_BUILD_PER_TURN + 1
    add_recipients(store, total)
    gateway = Gateway(clock, store, window=256)
    campaign = create(store)

    def built() -> int:
        return sum(1 for m in gateway.journal.replay() if parse_queue_id(m.envelope.queue_id))

    while built() == 0:
        assert _one_turn(clock), "the batch was never started"
    assert 0 < built() < total
    store.pause(campaign.id)
    if looked:
        gateway.runner.poke()
    at_pause = gateway.campaign(campaign.id).sent
    assert at_pause == 0
    while _one_turn(clock):
        pass
    advance(clock, 10.0)
    # Built, durable and not delivered (delivered ones leave the journal);
    # told of the pause, the runner builds no further slice.
    assert (built() < total) if looked else (built() == total)
    assert gateway.relay.log == []
    paused = gateway.campaign(campaign.id)
    assert (paused.state, paused.sent, paused.cursor) == (CampaignState.PAUSED, at_pause, 0)
    assert gateway.runner.window_of(campaign.id) == 0
    if crash:
        gateway.restart()
        advance(clock, 10.0)
        assert gateway.relay.log == []
    store.resume(campaign.id)
    gateway.runner.poke()
    run_until(clock, finished(gateway, campaign.id))
    got = gateway.relay.recipients_of(campaign.id)
    assert len(got) == len(set(got)) == total
    assert gateway.campaign(campaign.id).sent == total


class RacingProgress(InlineCampaignStore):
    """
    A store where an admin acts (C{actions}, each C{"pause"} or
    C{"cancel"}, with the runner told as the pages tell it) right before
    the next progress record, as if their writes won the race with it.
    With C{slow}, that record answers only C{slow} seconds later (a
    database thread that is busy): the runner's look at the database is
    over by then.
    """

    def __init__(
        self, store: SQLiteCampaignStore, runner: Callable[[], CampaignRunner], clock: Clock
    ) -> None:
        super().__init__(store)
        self.runner = runner
        self.clock = clock
        self.actions: tuple[str, ...] = ()
        self.slow = 0.0
        self.refused = 0

    def record_progress(self, campaign_id: int, cursor: int, sent: int) -> Deferred[bool]:
        actions, self.actions = self.actions, ()
        for action in actions:
            getattr(self.store, action)(campaign_id)
            self.runner().poke()
        d = super().record_progress(campaign_id, cursor, sent)
        if actions:
            d.addCallback(self._count)
            if self.slow:
                d.addCallback(lambda recorded: deferLater(self.clock, self.slow, lambda: recorded))
        return d

    def _count(self, recorded: bool) -> bool:
        self.refused += not recorded
        return recorded


def _live_messages_of(gateway: Gateway) -> set[str]:
    queue_ids = (m.envelope.queue_id for m in gateway.journal.replay())
    return {q for q in queue_ids if parse_queue_id(q)}


def test_a_pause_winning_the_race_with_a_later_batch_keeps_the_count(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    A pause written just before the progress of a batch (with messages
    already counted before it): the count stays what the admin saw, the
    batch is not delivered, and after the resume each recipient gets the
    message once and the count is whole.
    """
    add_recipients(store, 60)
    backend = RacingProgress(store, lambda: gateway.runner, clock)
    gateway = Gateway(clock, store, rate=20, window=8, backend=backend)
    campaign = create(store)
    run_until(clock, lambda: gateway.campaign(campaign.id).sent >= 16)
    backend.actions = ("pause",)
    run_until(clock, lambda: backend.refused == 1, limit=5)
    at_pause = gateway.campaign(campaign.id).sent
    delivered = len(gateway.relay.campaign_ids())
    advance(clock, 10.0)
    paused = gateway.campaign(campaign.id)
    assert (paused.state, paused.sent) == (CampaignState.PAUSED, at_pause)
    assert len(gateway.relay.campaign_ids()) == delivered
    assert delivered <= at_pause
    store.resume(campaign.id)
    gateway.runner.poke()
    run_until(clock, finished(gateway, campaign.id))
    got = gateway.relay.recipients_of(campaign.id)
    assert len(got) == len(set(got)) == 60
    assert gateway.campaign(campaign.id).sent == 60


@pytest.mark.parametrize("slow", [0.0, 0.5])
@pytest.mark.parametrize("paused_first", [False, True])
def test_a_cancel_winning_the_race_with_a_batch_leaves_nothing_of_it(
    store: SQLiteCampaignStore, clock: Clock, paused_first: bool, slow: float
) -> None:
    """
    A cancel (of a running send, or of one paused a moment before) written
    just before the progress of a batch, the runner dropping the send
    after that record (or, C{slow}, before it answers): the count stays,
    nothing more is delivered, every message of the send left in the
    journal is cancelled there, and its gate is gone.
    """
    add_recipients(store, 60)
    backend = RacingProgress(store, lambda: gateway.runner, clock)
    gateway = Gateway(clock, store, rate=20, window=8, backend=backend)
    campaign = create(store)
    run_until(clock, lambda: gateway.campaign(campaign.id).sent >= 16)
    backend.actions = ("pause", "cancel") if paused_first else ("cancel",)
    backend.slow = slow
    run_until(clock, lambda: backend.refused == 1, limit=5)
    at_cancel = gateway.campaign(campaign.id).sent
    delivered = len(gateway.relay.campaign_ids())
    advance(clock, 10.0)
    cancelled = gateway.campaign(campaign.id)
    assert cancelled.state is CampaignState.CANCELLED
    assert cancelled.sent == at_cancel
    assert len(gateway.relay.campaign_ids()) == delivered
    assert _live_messages_of(gateway) == set()
    assert gateway.queue.gates() == set()
    assert gateway.queue.gate_hold(campaign_username(campaign.id)) == GATE_CLOSED
    got = gateway.relay.recipients_of(campaign.id)
    assert len(got) == len(set(got))


def _racing_the_end(
    store: SQLiteCampaignStore, clock: Clock, actions: tuple[str, ...], slow: float = 0.0
) -> tuple[Gateway, Campaign, list[int]]:
    """
    A send to 20 recipients whose first 8 messages are out, the other 12
    recipients unsubscribed; then the admin's C{actions} race the record of
    its cursor moving past them to the end (refused).

    @return: the gateway, the send, and the recipients' ids.
    """
    ids = add_recipients(store, 20)
    backend = RacingProgress(store, lambda: gateway.runner, clock)
    gateway = Gateway(clock, store, window=8, backend=backend)
    gateway.relay.hold = True
    campaign = create(store)
    run_until(clock, lambda: len(gateway.relay.pending) == 8)
    for recipient_id in ids[8:]:
        store.recipients.unsubscribe_id("news", recipient_id)
    backend.actions = actions
    backend.slow = slow
    gateway.relay.hold = False
    gateway.relay.release()
    run_until(clock, lambda: backend.refused == 1, limit=5)
    return gateway, campaign, ids


def test_a_pause_winning_the_race_with_the_cursor_moving_to_the_end_holds(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    The rest of a send's recipients unsubscribed, and a pause is written
    just before the cursor moves past them to the end: the send stays
    paused (it does not finish behind the admin's back), and after the
    resume it finishes, each remaining recipient served once.
    """
    gateway, campaign, ids = _racing_the_end(store, clock, ("pause",))
    advance(clock, 10.0)
    paused = gateway.campaign(campaign.id)
    assert (paused.state, paused.cursor, paused.sent) == (CampaignState.PAUSED, ids[7], 8)
    store.resume(campaign.id)
    gateway.runner.poke()
    run_until(clock, finished(gateway, campaign.id), limit=30)
    done = gateway.campaign(campaign.id)
    assert (done.cursor, done.sent) == (ids[-1], 8)
    got = gateway.relay.recipients_of(campaign.id)
    assert len(got) == len(set(got)) == 8


def test_a_cancel_winning_the_race_with_the_cursor_moving_to_the_end_leaves_no_gate(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    The rest of a send's recipients unsubscribed, and a cancel is written
    just before the cursor moves past them, the runner dropping the send
    before that record answers: the send is cancelled, its gate gone (not
    closed again as paused), nothing more delivered.
    """
    gateway, campaign, _ = _racing_the_end(store, clock, ("cancel",), slow=0.5)
    advance(clock, 10.0)
    cancelled = gateway.campaign(campaign.id)
    assert (cancelled.state, cancelled.sent) == (CampaignState.CANCELLED, 8)
    assert gateway.queue.gates() == set()
    # Forgotten: not closed again, as paused, by a runner that dropped it.
    assert gateway.queue.gate_hold(campaign_username(campaign.id)) == GATE_CLOSED
    assert len(gateway.relay.recipients_of(campaign.id)) == 8


def test_progress_of_a_paused_send_is_refused(store: SQLiteCampaignStore) -> None:
    """
    The store records no progress of a send an admin paused (and says so),
    records it again once resumed, and a send it does not know is no pause.
    """
    add_recipients(store, 3)
    campaign = create(store)
    store.start(campaign.id)
    assert store.record_progress(campaign.id, 1, 1) is True
    store.pause(campaign.id)
    assert store.record_progress(campaign.id, 2, 1) is False
    after = store.get(campaign.id)
    assert after is not None
    assert (after.cursor, after.sent) == (1, 1)
    store.resume(campaign.id)
    assert store.record_progress(campaign.id, 2, 1) is True
    resumed = store.get(campaign.id)
    assert resumed is not None
    assert (resumed.cursor, resumed.sent) == (2, 2)
    assert store.record_progress(campaign.id + 1000, 5, 1) is True


def test_bounces_of_deliveries_ending_after_the_runner_stopped_are_recorded(
    store: SQLiteCampaignStore, clock: Clock
) -> None:
    """
    The runner stops before the queue, which lets the deliveries under way
    finish: their hard bounces still mark the recipients bounced and are
    counted.
    """
    add_recipients(store, 10)
    gateway = Gateway(clock, store, window=8, concurrency=3)
    gateway.relay.plan = {f"r{i}@dest{i % 7}.example": "5xx" for i in range(10)}
    gateway.relay.hold = True
    campaign = create(store)
    advance(clock, 0.5)
    in_flight = [e.recipients[0] for e, _, _ in gateway.relay.pending]
    assert len(in_flight) == 3
    stopped: list[object] = []
    gateway.runner.stopService().addBoth(stopped.append)
    advance(clock, 0.1)
    assert stopped == [None]
    gateway.queue.stopService()
    gateway.relay.release()
    advance(clock, 1)
    for address in in_flight:
        recipient = store.recipients.get("news", address)
        assert recipient is not None
        assert recipient.status is RecipientStatus.BOUNCED
    assert gateway.campaign(campaign.id).bounced == 3


P = ParamSpec("P")


@async_test
async def test_threaded_store_answers_with_deferreds(db: Path) -> None:
    """
    The threaded store runs the store's methods on its threads.
    """
    reactor = global_reactor()
    threaded = ThreadedCampaignStore(db, reactor=reactor, clock=reactor)
    threaded.startService()
    try:
        created = await threaded.create("news", "Hi", sender=SENDER, text="Hello")
        assert created.state is CampaignState.SCHEDULED
        paused = await threaded.pause(created.id)
        assert paused.paused_reason == ADMIN_PAUSE_REASON
        listed = await threaded.campaigns(list="news")
        assert [c.id for c in listed] == [created.id]
        with pytest.raises(ValidationError):
            await threaded.create("news", "", sender=SENDER, text="x")
    finally:
        threaded.stopService()


@async_test
async def test_on_the_reactor_with_the_file_journal_and_threaded_store(db: Path) -> None:
    """
    The runner on the real reactor, with the file journal (group commits
    on its thread) and the threaded store: everyone gets the send once,
    and stopping in order leaves nothing behind.
    """
    from twisted.internet.task import deferLater

    from smtpgw.journal import FileJournal

    reactor = global_reactor()
    with SQLiteCampaignStore.open(db, reactor) as sync_store:
        add_recipients(sync_store, 200)
    threaded = ThreadedCampaignStore(db, reactor=reactor, clock=reactor)
    relay = FakeRelay(cast(Clock, reactor))
    journal_dir = db.parent / "journal"
    queue = MessageQueue(FileJournal(journal_dir, reactor), relay, reactor, gate_of=campaign_gate)
    runner = CampaignRunner(
        threaded, queue, reactor, hostname=HOST, base_url=BASE_URL, window=32, poll_interval=0.1
    )
    threaded.startService()
    queue.startService()
    runner.startService()
    try:
        campaign = await threaded.create("news", "Hi", sender=SENDER, text="Hello {{name}}")
        runner.poke()
        for _ in range(300):
            found = await threaded.get(campaign.id)
            if found is not None and found.state is CampaignState.FINISHED:
                break
            await deferLater(reactor, 0.02, lambda: None)
        got = relay.recipients_of(campaign.id)
        assert len(got) == len(set(got)) == 200
    finally:
        await runner.stopService()
        await queue.stopService()
        threaded.stopService()
    done = FileJournal(journal_dir, reactor)
    try:
        assert [m for m in done.replay() if parse_queue_id(m.envelope.queue_id)] == []
    finally:
        await done.stop()
