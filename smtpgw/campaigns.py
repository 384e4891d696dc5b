"""
Console sends (campaigns): a message an admin sends to a list's recipients,
now or at a scheduled time (PRODUCT section 4).

Three parts:

  - L{SQLiteCampaignStore} keeps the sends in the database of the data
    directory; the CLI and the pages create, pause, resume and cancel them
    there (L{ThreadedCampaignStore} for the reactor). A send is
    C{scheduled}, C{sending}, C{paused} (by an admin, or by the runner with
    its reason), C{finished} or C{cancelled}.
  - L{render_message} builds one recipient's message: merge fields, the
    unsubscribe link and headers, MIME.
  - L{CampaignRunner} runs in the gateway next to the send queue: it picks
    up due sends from the database, builds each recipient's message only
    when there is room for it in a small window (L{DEFAULT_WINDOW} messages
    of one send in the queue at once, so a million-recipient send never
    holds a million bodies in memory or in the journal), and submits it to
    the queue behind the send's gate (L{campaign_gate}).

Pre-emption
===========

The queue keeps a send's gate closed while messages of a higher priority
wait or are being sent, and for a grace period after the last of them
(L{smtpgw.queue.DEFAULT_PREEMPTION_GRACE}): the send's messages already in
the queue wait too. The runner shows the send as paused with the reason
(C{"priority-1 SMTP+ traffic"}), or C{"queue stopped"} while an admin has
stopped the queue; it goes on by itself.

Nobody gets it twice
====================

Each recipient's message has a queue id made of the send and the
recipient (L{campaign_queue_id}), and the send's C{cursor} in the
database is the last recipient (by id) whose message is durable in the
journal. A batch of messages goes through three steps, in this order:

  1. each message is made durable in the journal
     (L{smtpgw.queue.MessageQueue.accept});
  2. the cursor moves past them, durably (one database transaction);
  3. only then are they scheduled, so none is sent before the cursor says
     it was submitted.

After a crash (even C{kill -9}) at any point:

  - before step 1 ends, some of the batch may be in the journal; the
    cursor is before them, so the runner builds them again: the journal
    refuses the ones it has (L{smtpgw.journal.QueueIdInUse}, the first copy
    is still queued: it was never sent), and they count as submitted;
  - between steps 1 and 2, the same: the messages were never sent;
  - after step 2, the cursor is past them: they are never built again;
    the journal's replay puts them in the queue (behind the gate, which
    stays closed until the runner has caught the cursor up with every
    message it finds there, so that nothing beyond the cursor is sent).

The one window left is the one every queued message has: a message being
delivered at the crash is sent again after the restart, because the
journal cannot know whether the recipient's server took it. Those are
counted per send (C{in_doubt}, from
L{smtpgw.queue.MessageQueue.redelivered_in}).

Unsubscribes and bounces
========================

A recipient who unsubscribes (or is marked bounced) after their message
was queued does not get it: at each poll, before each batch, and before
the gate of a send found in the journal at a start opens, the runner reads
in one query whether the recipients of its sends' messages still waiting
(queued, deferred, behind a closed gate) are subscribed, and cancels (in
the journal) those who are not; L{CampaignRunner.forget_recipient} does it
at once for one recipient. A message already being delivered goes.
Messages held back or replayed past the cursor whose recipients the next
read skips are cancelled before the cursor passes them.

Counts: C{sent} is the messages handed to the queue (exact, moved with
the cursor, up to a window ahead of the deliveries); C{delivered},
C{bounced} (failed for good) and C{deferred} (waiting for a retry) are what
the queue reported, written every L{DEFAULT_POLL_INTERVAL} (a crash can
lose the last second of them). The progress the pages show and the
estimated finish use the messages done (L{Campaign.done}: delivered and
bounced) against C{total}; the rate is that of the attempts that ended
(delivered, bounced or deferred).
A recipient refused for good (C{5xx}) is marked bounced and never sent to
again. No bounce report goes to the send's sender (the queue makes none
for messages behind a gate), and the admins get one C{bounce} alert per
send and window (L{smtpgw.queue.DEFAULT_GATE_BOUNCE_WINDOW}), naming it
C{console send <id>} (L{campaign_label}).
"""

from __future__ import annotations

import binascii
import email.utils
import enum
import functools
import html
import json
import math
import os
import re
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from email.header import Header
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import urlsplit

from attrs import define, evolve, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredLock, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpgw.database import (
    SQLiteStore,
    StoreError,
    ThreadedStore,
    open_database,
    transaction,
)
from smtpgw.interfaces import JournalLocation, JournalUnavailable
from smtpgw.journal import QueueIdInUse
from smtpgw.message import make_message_id
from smtpgw.model import Envelope, MessageState, Priority, SmtpUser
from smtpgw.policy import check_sender
from smtpgw.queue import QUEUE_STOPPED, MessageOutcome, MessageQueue, Preemption
from smtpgw.queueinfo import iso8601
from smtpgw.recipients import (
    Recipient,
    RecipientStatus,
    SQLiteRecipientStore,
    unsubscribe_token,
)
from smtpgw.userstore import NoSuchList
from smtpgw.validation import ValidationError, normalize_address, validate_priority

__all__ = [
    "ADMIN_PAUSE_REASON",
    "BUILD_TURN_BUDGET",
    "CANCELLED_REASON",
    "CATCHING_UP_REASON",
    "DEFAULT_MAX_DEFERRED",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_RETRY_INTERVAL",
    "DEFAULT_WINDOW",
    "MAX_BODY_LENGTH",
    "MAX_BUILD_PER_TURN",
    "MAX_SEND_AT",
    "MAX_SUBJECT_LENGTH",
    "QUEUE_STOPPED_REASON",
    "RATE_WINDOW",
    "Campaign",
    "CampaignBackend",
    "CampaignRunner",
    "CampaignState",
    "CampaignStateError",
    "InlineCampaignStore",
    "NoSuchCampaign",
    "SQLiteCampaignStore",
    "StatusUpdate",
    "ThreadedCampaignStore",
    "campaign_document",
    "campaign_gate",
    "campaign_label",
    "campaign_queue_id",
    "campaign_username",
    "merge",
    "parse_queue_id",
    "parse_send_at",
    "render_message",
    "unsubscribe_url",
]

T = TypeVar("T")

MAX_SUBJECT_LENGTH: Final = 998
"""The longest subject, in characters (a header line's limit)."""

MAX_BODY_LENGTH: Final = 1_000_000
"""The longest text or HTML body, in characters."""

MAX_SEND_AT: Final = 253_402_300_799
"""The latest schedule time: 9999-12-31T23:59:59Z (later ones cannot be
shown in ISO 8601)."""

MAX_BUILD_PER_TURN: Final = 32
"""The most messages the runner builds in one turn of the reactor."""

BUILD_TURN_BUDGET: Final = 0.005
"""Seconds of building messages after which the runner lets the reactor
turn (a megabyte of HTML costs some 10 ms a message)."""

DEFAULT_WINDOW: Final = 256
"""The most messages of one send in the queue (queued or being sent) at
once; the next ones are built as these leave. Enough to keep the rate
between two refills, small enough to cost nothing."""

DEFAULT_POLL_INTERVAL: Final = 1.0
"""Seconds between two looks at the database for new, paused, resumed and
cancelled sends (L{CampaignRunner.poke} looks at once), and between two
writes of the sends' counts."""

DEFAULT_MAX_DEFERRED: Final = 10_000
"""A send with this many messages waiting for a retry (their recipients'
servers answer "try again later") builds no more until some are done, so
that a dead destination cannot fill the journal with a whole list."""

DEFAULT_RETRY_INTERVAL: Final = 5.0
"""Seconds a send waits after the journal or the database failed it."""

RATE_WINDOW: Final = 10.0
"""The current rate of a send is measured over this many seconds."""

ADMIN_PAUSE_REASON: Final = "paused by an admin"
QUEUE_STOPPED_REASON: Final = QUEUE_STOPPED
CATCHING_UP_REASON: Final = "catching up after a restart"
"""Why a send's gate stays closed at a start until the runner has caught
its cursor up with the messages the journal gave back."""
CANCELLED_REASON: Final = "cancelled"

DEFAULT_POOL_SIZE: Final = 2
"""Threads of L{ThreadedCampaignStore}."""

_CATCH_UP_BATCH: Final = 64
# Well under SQLite's limit of bound parameters in one statement.
_IDS_PER_QUERY: Final = 500
# An unsubscribe link must fit in a header line with room to spare.
_MAX_BASE_URL: Final = 500
_QUEUE_ID: Final = re.compile(r"C(\d{1,18})R(\d{1,19})")
_GATE: Final = re.compile(r"campaign-(\d{1,18})")
_MERGE_FIELD: Final = re.compile(r"\{\{\s*([\w.-]+)\s*\}\}")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]+")
_BODY_END: Final = re.compile(r"</body\s*>", re.IGNORECASE)
# RFC 5322 section 2.1.1, without the CRLF.
_MAX_HEADER_LINE: Final = 998


class NoSuchCampaign(StoreError, LookupError):
    """
    No send has that id.
    """


class CampaignStateError(StoreError):
    """
    The send is not in a state that allows this (resuming a finished one).
    """


class CampaignState(enum.Enum):
    """
    Where a console send stands.
    """

    SCHEDULED = "scheduled"
    SENDING = "sending"
    PAUSED = "paused"
    FINISHED = "finished"
    CANCELLED = "cancelled"


_OPEN_STATES: Final = ("scheduled", "sending", "paused")


@frozen
class Campaign:
    """
    A console send as the database holds it.

    @ivar cursor: the last recipient id whose message is durable in the
        journal (0 before the first).
    @ivar last_recipient_id: the list's last recipient id when the send
        started; recipients added later do not get it.
    @ivar total: the subscribed recipients up to C{last_recipient_id} when
        the send started.
    @ivar sent: messages handed to the queue (exact: moved with the
        cursor); up to a window (L{DEFAULT_WINDOW}) ahead of the messages
        done, see L{done}.
    @ivar delivered: recipients that took the message.
    @ivar bounced: recipients that failed for good.
    @ivar deferred: messages waiting for a retry, last time counted.
    @ivar in_doubt: messages that were being delivered when the gateway
        stopped without finishing them, and were sent again (their
        recipient may have it twice).
    @ivar rate: messages a second lately, while sending.
    @ivar bodies: whether C{text} and C{html} were read: listings
        (L{SQLiteCampaignStore.campaigns},
        L{SQLiteCampaignStore.open_campaigns}) leave them out (L{None}), as
        they can be a megabyte each; L{SQLiteCampaignStore.get} reads them.
    """

    id: int
    list: str
    subject: str
    text: str | None = field(repr=False)
    html: str | None = field(repr=False)
    sender: str
    priority: Priority
    send_at: float | None
    created_at: float
    created_by: str | None
    state: CampaignState
    paused_by_admin: bool
    paused_reason: str | None
    cursor: int
    last_recipient_id: int | None
    total: int | None
    sent: int
    delivered: int
    bounced: int
    deferred: int
    in_doubt: int
    rate: float
    started_at: float | None
    finished_at: float | None
    updated_at: float | None
    bodies: bool = field(default=True, repr=False)

    @property
    def done(self) -> int:
        """
        The messages done with: delivered or bounced (deferred ones and
        those still in the queue are not). What the pages' progress bar
        shows against L{total}.
        """
        return self.delivered + self.bounced

    def eta(self, now: float) -> float | None:
        """
        When the send should be done, at its current rate (of attempts
        that ended): the messages not yet done (L{total} less L{done}, so those
        handed to the queue but not delivered yet count too) at that rate;
        L{None} while it is not sending or its rate is not known.
        """
        if self.state is not CampaignState.SENDING or not self.rate > 0 or self.total is None:
            return None
        return now + max(0, self.total - self.done) / self.rate


_COLUMNS: Final = (
    "id, list, subject, text, html, sender, priority, send_at, created_at, created_by, "
    "state, paused_by_admin, paused_reason, cursor, last_recipient_id, total, sent, "
    "delivered, bounced, deferred, in_doubt, rate, started_at, finished_at, updated_at"
)
# The same columns with NULL for the bodies: what listings read.
_METADATA_COLUMNS: Final = _COLUMNS.replace("text, html,", "NULL, NULL,")


def _campaign(row: Sequence[Any], *, bodies: bool = True) -> Campaign:
    return Campaign(
        bodies=bodies,
        id=row[0],
        list=row[1],
        subject=row[2],
        text=row[3],
        html=row[4],
        sender=row[5],
        priority=Priority(row[6]),
        send_at=row[7],
        created_at=row[8],
        created_by=row[9],
        state=CampaignState(row[10]),
        paused_by_admin=bool(row[11]),
        paused_reason=row[12],
        cursor=row[13],
        last_recipient_id=row[14],
        total=row[15],
        sent=row[16],
        delivered=row[17],
        bounced=row[18],
        deferred=row[19],
        in_doubt=row[20],
        rate=row[21],
        started_at=row[22],
        finished_at=row[23],
        updated_at=row[24],
    )


# --- names --------------------------------------------------------------------


def campaign_queue_id(campaign_id: int, recipient_id: int) -> str:
    """
    The queue id of one recipient's message of one send: the same every
    time it is built, so the journal refuses a second copy while the first
    is queued. C{C<send>R<recipient>}, zero-padded so a send's messages sort
    by recipient; never equal to a generated id (those are hexadecimal).
    """
    return f"C{campaign_id:06d}R{recipient_id:010d}"


def parse_queue_id(queue_id: str) -> tuple[int, int] | None:
    """
    The send and recipient ids of a send's queue id, or L{None} for any
    other queue id.
    """
    match = _QUEUE_ID.fullmatch(queue_id)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def campaign_username(campaign_id: int) -> str:
    """
    What a send's messages carry as their user (queue listings, captures):
    C{campaign-<id>}; also the name of the send's gate.
    """
    return f"campaign-{campaign_id}"


def campaign_label(campaign_id: int) -> str:
    """
    A send as "why" and the alerts name it: C{console send <id>}.
    """
    return f"console send {campaign_id}"


def campaign_gate(envelope: Envelope) -> str | None:
    """
    The gate a message is behind, for L{smtpgw.queue.MessageQueue}'s
    C{gate_of}: C{campaign-<id>} for a send's message, L{None} otherwise.
    """
    found = parse_queue_id(envelope.queue_id)
    return None if found is None else campaign_username(found[0])


def _gate_campaign(gate: str) -> int | None:
    match = _GATE.fullmatch(gate)
    return None if match is None else int(match.group(1))


def unsubscribe_url(base_url: str, token: str) -> str:
    """
    C{<base_url>/unsubscribe/<token>}.
    """
    return f"{base_url.rstrip('/')}/unsubscribe/{token}"


def parse_send_at(text: str) -> float:
    """
    Read a schedule time: ISO 8601 (C{2030-01-31T09:00:00Z}, an offset, or
    none for UTC).

    @raise ValidationError: for the field C{send_at}.
    """
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValidationError(
            "send_at", f"{text!r} is not a time: use ISO 8601, as 2030-01-31T09:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# --- messages -----------------------------------------------------------------


def merge(template: str, fields: Mapping[str, str], *, escape: bool = False) -> str:
    """
    Fill the merge fields of a template: C{{{name}}} (spaces allowed inside
    the braces, names compared in lower case) becomes the recipient's
    field, or nothing when they have none.

    @param escape: escape the values for HTML.
    """

    def value(match: re.Match[str]) -> str:
        found = fields.get(match.group(1).lower(), "")
        return html.escape(found, quote=True) if escape else found

    return _MERGE_FIELD.sub(value, template)


def _with_text_footer(text: str, url: str) -> str:
    return f"{text.rstrip()}\n\n--\nTo unsubscribe: {url}\n"


def _with_html_footer(body: str, url: str) -> str:
    link = f'<p><a href="{html.escape(url, quote=True)}">Unsubscribe</a></p>'
    # Searched in the body itself: lower() may change its length ("İ").
    found: re.Match[str] | None = None
    for found in _BODY_END.finditer(body):  # noqa: B007 (the last one)
        pass
    if found is None:
        return body + link
    at = found.start()
    return body[:at] + link + body[at:]


def _qp(text: str) -> bytes:
    """
    A body as quoted-printable UTF-8 with CRLF line ends: lines of at most
    76 characters whatever the text, and never the sequence C{=_} (so a
    boundary starting with it cannot occur inside).
    """
    data = text.replace("\r\n", "\n").replace("\r", "\n")
    if not data.endswith("\n"):
        data += "\n"
    return binascii.b2a_qp(data.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")


def _subject_field(subject: str) -> bytes:
    line = f"Subject: {subject}"
    if line.isascii() and len(line) <= _MAX_HEADER_LINE:
        return line.encode("ascii") + b"\r\n"
    encoded = Header(subject, "utf-8", header_name="Subject").encode(linesep="\r\n")
    return f"Subject: {encoded}\r\n".encode("ascii")


def _part(subtype: str, body: str) -> bytes:
    return (
        f"Content-Type: text/{subtype}; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    ).encode("ascii") + _qp(body)


def render_message(
    campaign: Campaign,
    recipient: Recipient,
    *,
    queue_id: str,
    hostname: str,
    unsubscribe: str,
    now: float,
) -> bytes:
    """
    One recipient's message of a send.

    Merge fields are filled from the recipient's fields, C{email} and
    C{unsubscribe_url} (escaped in the HTML part). Unless the body places
    C{{{unsubscribe_url}}} itself, an unsubscribe link is added at its end.
    Headers: C{From} (the send's sender), C{To}, C{Subject}, C{Date},
    C{Message-ID}, C{List-Unsubscribe} with C{List-Unsubscribe-Post} (RFC
    8058 one-click), C{X-Priority}; C{multipart/alternative} when there are
    both a text and an HTML body, each part quoted-printable UTF-8. Lines
    end with CRLF and none is longer than RFC 5322 allows.

    Built by hand rather than with L{email.message.EmailMessage}, which
    costs some 3 ms a message: a send at a few hundred messages a second
    builds them on the reactor thread.

    @param unsubscribe: the recipient's unsubscribe URL.
    """
    fields = {**recipient.fields, "email": recipient.email, "unsubscribe_url": unsubscribe}
    subject = _CONTROL.sub(" ", merge(campaign.subject, fields)).strip()
    head = (
        f"From: {campaign.sender}\r\n"
        f"To: {recipient.email}\r\n"
        f"Date: {email.utils.format_datetime(datetime.fromtimestamp(now, UTC))}\r\n"
        f"Message-ID: {make_message_id(queue_id, hostname).decode('ascii')}\r\n"
        f"List-Unsubscribe: <{unsubscribe}>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        f"X-Priority: {int(campaign.priority)}\r\n"
        "MIME-Version: 1.0\r\n"
    ).encode("ascii") + _subject_field(subject)
    parts = []
    if campaign.text:
        text = merge(campaign.text, fields)
        if "unsubscribe_url" not in _fields_in(campaign.text):
            text = _with_text_footer(text, unsubscribe)
        parts.append(_part("plain", text))
    if campaign.html:
        body = merge(campaign.html, fields, escape=True)
        if "unsubscribe_url" not in _fields_in(campaign.html):
            body = _with_html_footer(body, unsubscribe)
        parts.append(_part("html", body))
    if len(parts) == 1:
        return head + parts[0]
    boundary = f"=_smtpgw_{queue_id}".encode("ascii")
    out = head + (b'Content-Type: multipart/alternative; boundary="' + boundary + b'"\r\n\r\n')
    for part in parts:
        out += b"--" + boundary + b"\r\n" + part
    return out + b"--" + boundary + b"--\r\n"


@functools.lru_cache(maxsize=16)
def _fields_in(template: str) -> frozenset[str]:
    # Cached: the same bodies come for every message of a send (a str
    # keeps its hash, and the same object compares equal at once).
    return frozenset(name.lower() for name in _MERGE_FIELD.findall(template))


# --- the store ----------------------------------------------------------------


@frozen
class StatusUpdate:
    """
    What the runner writes about one send.

    @ivar state: the state, unless an admin paused the send or it is over
        (then the stored state stays).
    @ivar paused_reason: with C{paused}, why.
    @ivar delivered: recipients that took the message since the last
        update.
    @ivar bounced: recipients that failed for good since the last update.
    @ivar deferred: messages waiting for a retry now.
    @ivar in_doubt: messages sent again after a restart, since the last
        update.
    """

    campaign_id: int
    state: CampaignState
    paused_reason: str | None
    rate: float
    delivered: int = 0
    bounced: int = 0
    deferred: int = 0
    in_doubt: int = 0


def _sender_policy_user(list: str, rows: Iterable[tuple[str, str]]) -> SmtpUser:
    domains: dict[str, None] = {}
    senders: dict[str, None] = {}
    for domains_json, senders_json in rows:
        domains.update(dict.fromkeys(json.loads(domains_json)))
        senders.update(dict.fromkeys(json.loads(senders_json)))
    return SmtpUser(
        username=f"list {list}",
        list=list,
        password_hash=b"",
        authorized_domains=tuple(domains),
        authorized_senders=tuple(senders),
    )


def _text_field(name: str, value: str | None, limit: int) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValidationError(name, "must be text")
    if len(value) > limit:
        raise ValidationError(name, f"{len(value)} characters, more than the {limit} allowed")
    return value


class SQLiteCampaignStore(SQLiteStore):
    """
    The synchronous store of console sends: one SQLite connection, used by
    one thread at a time. Its L{recipients} store shares the connection.
    """

    def __init__(self, connection: sqlite3.Connection, clock: IReactorTime) -> None:
        """
        @param connection: from L{smtpgw.database.open_database}.
        @param clock: gives the times of changes.
        """
        self._connection = connection
        self._clock = clock
        self.recipients = SQLiteRecipientStore(connection, clock)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        clock: IReactorTime,
        *,
        create: bool = True,
        check_same_thread: bool = True,
    ) -> SQLiteCampaignStore:
        """
        Open the database at C{path} (see L{open_database}).
        """
        connection = open_database(path, create=create, check_same_thread=check_same_thread)
        return cls(connection, clock)

    # Admins

    def check_sender(self, list: str, sender: str) -> str:
        """
        Check that C{sender} may send for C{list}: the list's sender policy
        is every domain and address its SMTP+ users are authorized for
        (L{smtpgw.policy.check_sender}, whatever their enforcement mode).

        @return: the address, normalized.
        @raise ValidationError: for the field C{sender}.
        @raise NoSuchList: the list does not exist.
        """
        try:
            address = normalize_address(sender)
        except ValueError as e:
            raise ValidationError("sender", f"{sender.strip()!r} {e}") from None
        if (
            self._connection.execute("SELECT 1 FROM lists WHERE name = ?", (list,)).fetchone()
            is None
        ):
            raise NoSuchList(f"no list named {list!r}")
        rows = self._connection.execute(
            "SELECT authorized_domains, authorized_senders FROM users WHERE list = ?", (list,)
        ).fetchall()
        user = _sender_policy_user(list, rows)
        if check_sender(user, address).allowed:
            return address
        if not user.authorized_domains and not user.authorized_senders:
            why = "no SMTP+ user of the list is authorized for any sender domain or address"
        else:
            domain = address.rpartition("@")[2]
            why = (
                f"neither the domain {domain} nor the address is authorized for an SMTP+ "
                "user of the list"
            )
        raise ValidationError("sender", f"{address} may not send for list {list}: {why}")

    def create(
        self,
        list: str,
        subject: str,
        *,
        sender: str,
        text: str | None = None,
        html: str | None = None,
        priority: int | str | Priority = Priority.NORMAL,
        send_at: float | None = None,
        created_by: str | None = None,
    ) -> Campaign:
        """
        Create a send, C{scheduled}: the runner starts it at C{send_at}
        (at once when L{None} or past).

        @raise ValidationError: for a bad field (C{subject}, C{text},
            C{html}, C{sender}, C{priority}, C{send_at}), before anything
            changes.
        @raise NoSuchList: the list does not exist.
        """
        if not isinstance(subject, str) or not subject.strip():
            raise ValidationError("subject", "a subject is required")
        if len(subject) > MAX_SUBJECT_LENGTH:
            raise ValidationError(
                "subject",
                f"{len(subject)} characters, more than the {MAX_SUBJECT_LENGTH} allowed",
            )
        if "\r" in subject or "\n" in subject:
            raise ValidationError("subject", "must be one line")
        text = _text_field("text", text, MAX_BODY_LENGTH)
        html = _text_field("html", html, MAX_BODY_LENGTH)
        if text is None and html is None:
            raise ValidationError("text", "a text or an HTML body (or both) is required")
        number = validate_priority(priority)
        if send_at is not None and not (
            isinstance(send_at, int | float)
            and math.isfinite(send_at)
            and 0 <= send_at <= MAX_SEND_AT
        ):
            raise ValidationError(
                "send_at", f"{send_at!r} is not a time from 1970 to 9999-12-31T23:59:59Z"
            )
        address = self.check_sender(list, sender)
        now = self._clock.seconds()
        with transaction(self._connection) as db:
            cursor = db.execute(
                "INSERT INTO campaigns (list, subject, text, html, sender, priority, send_at, "
                "created_at, created_by, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    list,
                    subject.strip(),
                    text,
                    html,
                    address,
                    int(number),
                    None if send_at is None else float(send_at),
                    now,
                    created_by,
                    now,
                ),
            )
            campaign_id = cursor.lastrowid
        assert campaign_id is not None
        return self._require(campaign_id)

    def get(self, campaign_id: int) -> Campaign | None:
        """
        The send with this id, or L{None}.
        """
        row = self._connection.execute(
            f"SELECT {_COLUMNS} FROM campaigns WHERE id = ?",  # noqa: S608
            (campaign_id,),
        ).fetchone()
        return None if row is None else _campaign(row)

    def _require(self, campaign_id: int) -> Campaign:
        campaign = self.get(campaign_id)
        if campaign is None:
            raise NoSuchCampaign(f"no console send {campaign_id}")
        return campaign

    def campaigns(
        self,
        list: str | None = None,
        state: CampaignState | None = None,
        limit: int = 100,
        before_id: int | None = None,
        *,
        bodies: bool = True,
    ) -> list[Campaign]:
        """
        The sends, newest first.

        @param before_id: only those with a smaller id (paging).
        @param bodies: whether to read the text and HTML bodies (up to a
            megabyte each); without, they are L{None} (L{Campaign.bodies}).
            Listings should not.
        @raise ValueError: a limit outside 1..1000.
        """
        if not 1 <= limit <= 1000:
            raise ValueError(f"the limit must be 1 to 1000, not {limit}")
        where = []
        parameters: tuple[Any, ...] = ()
        if list is not None:
            where.append("list = ?")
            parameters += (list,)
        if state is not None:
            where.append("state = ?")
            parameters += (state.value,)
        if before_id is not None:
            where.append("id < ?")
            parameters += (before_id,)
        columns = _COLUMNS if bodies else _METADATA_COLUMNS
        query = f"SELECT {columns} FROM campaigns"  # noqa: S608
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY id DESC LIMIT ?"
        return [
            _campaign(row, bodies=bodies)
            for row in self._connection.execute(query, (*parameters, limit))
        ]

    def pause(self, campaign_id: int) -> Campaign:
        """
        Pause a send (scheduled, sending, or paused by the runner) until
        L{resume}; the runner stops handing its messages to the relay.

        @raise NoSuchCampaign: no such send.
        @raise CampaignStateError: it is finished or cancelled.
        """
        return self._change(
            campaign_id,
            "pause",
            "state = 'paused', paused_by_admin = 1, paused_reason = ?",
            (ADMIN_PAUSE_REASON,),
        )

    def resume(self, campaign_id: int) -> Campaign:
        """
        Resume a send an admin paused: it goes on where it stopped (or
        starts at its time, if it had not started).

        @raise NoSuchCampaign: no such send.
        @raise CampaignStateError: it is not paused by an admin.
        """
        with transaction(self._connection):
            campaign = self._require(campaign_id)
            if not campaign.paused_by_admin or campaign.state.value not in _OPEN_STATES:
                raise CampaignStateError(
                    f"cannot resume console send {campaign_id}: it is {campaign.state.value}"
                    + (
                        ""
                        if campaign.state.value not in _OPEN_STATES
                        else ", not paused by an admin"
                    )
                )
            state = "scheduled" if campaign.started_at is None else "sending"
            self._connection.execute(
                "UPDATE campaigns SET state = ?, paused_by_admin = 0, paused_reason = NULL, "
                "updated_at = ? WHERE id = ?",
                (state, self._clock.seconds(), campaign_id),
            )
        return self._require(campaign_id)

    def cancel(self, campaign_id: int) -> Campaign:
        """
        Cancel a send: no further recipient gets it (its messages still in
        the queue are cancelled by the runner; those being delivered
        finish).

        @raise NoSuchCampaign: no such send.
        @raise CampaignStateError: it is finished or cancelled.
        """
        return self._change(
            campaign_id,
            "cancel",
            "state = 'cancelled', finished_at = ?, paused_reason = NULL, rate = 0",
            (self._clock.seconds(),),
        )

    def _change(
        self, campaign_id: int, verb: str, assignments: str, values: tuple[Any, ...]
    ) -> Campaign:
        with transaction(self._connection):
            campaign = self._require(campaign_id)
            if campaign.state.value not in _OPEN_STATES:
                raise CampaignStateError(
                    f"cannot {verb} console send {campaign_id}: it is {campaign.state.value}"
                )
            self._connection.execute(
                f"UPDATE campaigns SET {assignments}, updated_at = ? WHERE id = ?",  # noqa: S608
                (*values, self._clock.seconds(), campaign_id),
            )
        return self._require(campaign_id)

    # The runner

    def open_campaigns(self) -> list[Campaign]:
        """
        The sends that are not over (scheduled, sending, paused), oldest
        first, without their bodies (L{bodies}).
        """
        rows = self._connection.execute(
            f"SELECT {_METADATA_COLUMNS} FROM campaigns "  # noqa: S608
            "WHERE state IN ('scheduled', 'sending', 'paused') ORDER BY id"
        )
        return [_campaign(row, bodies=False) for row in rows]

    def bodies(self, campaign_id: int) -> tuple[str | None, str | None] | None:
        """
        The text and HTML bodies of a send, or L{None} when there is no
        such send.
        """
        row = self._connection.execute(
            "SELECT text, html FROM campaigns WHERE id = ?", (campaign_id,)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def start(self, campaign_id: int) -> Campaign | None:
        """
        Start a scheduled send that no admin paused: it goes to the list's
        subscribed recipients up to its last recipient now.

        @return: the send as started, or L{None} when it is not to start.
        """
        now = self._clock.seconds()
        with transaction(self._connection) as db:
            campaign = self.get(campaign_id)
            if (
                campaign is None
                or campaign.state is not CampaignState.SCHEDULED
                or campaign.paused_by_admin
            ):
                return None
            (last,) = db.execute(
                "SELECT coalesce(max(id), 0) FROM recipients WHERE list = ?", (campaign.list,)
            ).fetchone()
            (total,) = db.execute(
                "SELECT count(*) FROM recipients WHERE list = ? AND id <= ? "
                "AND status = 'subscribed'",
                (campaign.list, last),
            ).fetchone()
            db.execute(
                "UPDATE campaigns SET state = 'sending', started_at = ?, last_recipient_id = ?, "
                "total = ?, cursor = 0, updated_at = ? WHERE id = ?",
                (now, last, total, now, campaign_id),
            )
        return self.get(campaign_id)

    def recipients_after(
        self, list: str, after_id: int, upto_id: int, limit: int
    ) -> list[Recipient]:
        """
        The next subscribed recipients of a send, by id: after C{after_id},
        up to C{upto_id}, at most C{limit}.
        """
        if limit < 1:
            return []
        rows = self._connection.execute(
            "SELECT id, list, email, fields, status, created_at, changed_at FROM recipients "
            "WHERE list = ? AND id > ? AND id <= ? AND status = 'subscribed' "
            "ORDER BY id LIMIT ?",
            (list, after_id, upto_id, limit),
        )
        return [
            Recipient(
                id=row[0],
                list=row[1],
                email=row[2],
                fields=json.loads(row[3]),
                status=RecipientStatus(row[4]),
                created_at=row[5],
                changed_at=row[6],
            )
            for row in rows
        ]

    def record_progress(self, campaign_id: int, cursor: int, sent: int) -> bool:
        """
        Move a send's cursor (never back) and count C{sent} more messages
        handed to the queue, durably, in one transaction; unless an admin
        paused or cancelled the send meanwhile.

        @return: C{False} if the send is paused by an admin or cancelled
            (nothing is recorded: a batch built while the admin acted is
            not handed on, and the count the admin saw then stays).
        """
        with transaction(self._connection) as db:
            updated = db.execute(
                "UPDATE campaigns SET cursor = max(cursor, ?), sent = sent + ?, updated_at = ? "
                "WHERE id = ? AND paused_by_admin = 0 AND state != 'cancelled'",
                (cursor, sent, self._clock.seconds(), campaign_id),
            )
            if updated.rowcount:
                return True
            held = db.execute(
                "SELECT 1 FROM campaigns WHERE id = ? "
                "AND (paused_by_admin = 1 OR state = 'cancelled')",
                (campaign_id,),
            ).fetchone()
            return held is None

    def record_status(self, updates: Iterable[StatusUpdate]) -> None:
        """
        Write what the runner knows of its sends, in one transaction: the
        state and reason (not over an admin's pause, nor on a send that is
        over or has not started), the rate and the counts.
        """
        now = self._clock.seconds()
        keep = "state IN ('finished', 'cancelled') OR paused_by_admin = 1 OR started_at IS NULL"
        with transaction(self._connection) as db:
            db.executemany(
                f"UPDATE campaigns SET "  # noqa: S608
                f"state = CASE WHEN {keep} THEN state ELSE ? END, "
                f"paused_reason = CASE WHEN {keep} THEN paused_reason ELSE ? END, "
                f"rate = CASE WHEN state IN ('finished', 'cancelled') THEN 0 ELSE ? END, "
                "delivered = delivered + ?, bounced = bounced + ?, deferred = ?, "
                "in_doubt = in_doubt + ?, updated_at = ? WHERE id = ?",
                (
                    (
                        u.state.value,
                        u.paused_reason if u.state is CampaignState.PAUSED else None,
                        u.rate,
                        u.delivered,
                        u.bounced,
                        u.deferred,
                        u.in_doubt,
                        now,
                        u.campaign_id,
                    )
                    for u in updates
                ),
            )

    def finish(self, campaign_id: int) -> bool:
        """
        Record that every recipient's message of a send has left the queue
        (or waits for a retry).

        @return: whether it was not over already (cancelled).
        """
        now = self._clock.seconds()
        with transaction(self._connection) as db:
            cursor = db.execute(
                "UPDATE campaigns SET state = 'finished', finished_at = ?, paused_reason = NULL, "
                "paused_by_admin = 0, rate = 0, updated_at = ? "
                "WHERE id = ? AND state IN ('scheduled', 'sending', 'paused')",
                (now, now, campaign_id),
            )
            return cursor.rowcount == 1

    def mark_bounced_ids(self, list: str, recipient_ids: Iterable[int]) -> int:
        """
        See L{SQLiteRecipientStore.mark_bounced_ids}.
        """
        return self.recipients.mark_bounced_ids(list, recipient_ids)

    def not_subscribed(self, recipient_ids: Iterable[int]) -> list[int]:
        """
        Those of C{recipient_ids} that are no longer subscribed (they
        unsubscribed, bounced, or are gone with their list), in one read.
        """
        wanted = sorted(set(recipient_ids))
        subscribed: set[int] = set()
        for at in range(0, len(wanted), _IDS_PER_QUERY):
            chunk = wanted[at : at + _IDS_PER_QUERY]
            marks = ", ".join("?" * len(chunk))
            subscribed.update(
                row[0]
                for row in self._connection.execute(
                    f"SELECT id FROM recipients WHERE status = 'subscribed' "  # noqa: S608
                    f"AND id IN ({marks})",
                    chunk,
                )
            )
        return [i for i in wanted if i not in subscribed]

    def unsubscribe_key(self) -> bytes:
        """
        See L{SQLiteRecipientStore.unsubscribe_key}.
        """
        return self.recipients.unsubscribe_key()


def campaign_document(campaign: Campaign, now: float) -> dict[str, Any]:
    """
    A send as JSON (the API's and the CLI's field names): C{id}, C{list},
    C{subject}, C{text}, C{html}, C{sender}, C{priority}, C{send_at},
    C{state}, C{paused_reason} (only when paused), C{sent}, C{total},
    C{delivered}, C{bounced}, C{deferred}, C{in_doubt}, C{rate}, C{eta},
    C{created_at}, C{created_by}, C{started_at}, C{finished_at}; times in
    ISO 8601 UTC or C{null}.

    C{sent} is the messages handed to the queue (exact); C{eta} is
    reckoned from the messages done (C{delivered} + C{bounced}), which
    trail C{sent} by up to a window (L{Campaign.eta}).
    """
    return {
        "id": campaign.id,
        "list": campaign.list,
        "subject": campaign.subject,
        "text": campaign.text,
        "html": campaign.html,
        "sender": campaign.sender,
        "priority": int(campaign.priority),
        "send_at": iso8601(campaign.send_at),
        "state": campaign.state.value,
        "paused_reason": (
            campaign.paused_reason if campaign.state is CampaignState.PAUSED else None
        ),
        "sent": campaign.sent,
        "total": campaign.total,
        "delivered": campaign.delivered,
        "bounced": campaign.bounced,
        "deferred": campaign.deferred,
        "in_doubt": campaign.in_doubt,
        "rate": round(campaign.rate, 3),
        "eta": iso8601(campaign.eta(now)),
        "created_at": iso8601(campaign.created_at),
        "created_by": campaign.created_by,
        "started_at": iso8601(campaign.started_at),
        "finished_at": iso8601(campaign.finished_at),
    }


# --- the store as the reactor reaches it ---------------------------------------


class CampaignBackend(Protocol):
    """
    What the runner needs of the store, answering with L{Deferred}s:
    L{ThreadedCampaignStore} in the gateway, L{InlineCampaignStore} in
    tests and tools.
    """

    def open_campaigns(self) -> Deferred[list[Campaign]]: ...

    def bodies(self, campaign_id: int) -> Deferred[tuple[str | None, str | None] | None]: ...

    def get(self, campaign_id: int) -> Deferred[Campaign | None]: ...

    def start(self, campaign_id: int) -> Deferred[Campaign | None]: ...

    def recipients_after(
        self, list: str, after_id: int, upto_id: int, limit: int
    ) -> Deferred[list[Recipient]]: ...

    def record_progress(self, campaign_id: int, cursor: int, sent: int) -> Deferred[bool]: ...

    def record_status(self, updates: Iterable[StatusUpdate]) -> Deferred[None]: ...

    def finish(self, campaign_id: int) -> Deferred[bool]: ...

    def mark_bounced_ids(self, list: str, recipient_ids: Iterable[int]) -> Deferred[int]: ...

    def not_subscribed(self, recipient_ids: Iterable[int]) -> Deferred[list[int]]: ...

    def unsubscribe_key(self) -> Deferred[bytes]: ...


class _DeferredStore:
    """
    The store's methods, each answering with a L{Deferred} of what
    C{self.run} gives.
    """

    def run(self, f: Callable[[SQLiteCampaignStore], T]) -> Deferred[T]:
        raise NotImplementedError

    def check_sender(self, list: str, sender: str) -> Deferred[str]:
        return self.run(lambda s: s.check_sender(list, sender))

    def create(self, list: str, subject: str, **fields: Any) -> Deferred[Campaign]:
        return self.run(lambda s: s.create(list, subject, **fields))

    def get(self, campaign_id: int) -> Deferred[Campaign | None]:
        return self.run(lambda s: s.get(campaign_id))

    def campaigns(
        self,
        list: str | None = None,
        state: CampaignState | None = None,
        limit: int = 100,
        before_id: int | None = None,
        *,
        bodies: bool = True,
    ) -> Deferred[list[Campaign]]:
        return self.run(lambda s: s.campaigns(list, state, limit, before_id, bodies=bodies))

    def pause(self, campaign_id: int) -> Deferred[Campaign]:
        return self.run(lambda s: s.pause(campaign_id))

    def resume(self, campaign_id: int) -> Deferred[Campaign]:
        return self.run(lambda s: s.resume(campaign_id))

    def cancel(self, campaign_id: int) -> Deferred[Campaign]:
        return self.run(lambda s: s.cancel(campaign_id))

    def open_campaigns(self) -> Deferred[list[Campaign]]:
        return self.run(lambda s: s.open_campaigns())

    def bodies(self, campaign_id: int) -> Deferred[tuple[str | None, str | None] | None]:
        return self.run(lambda s: s.bodies(campaign_id))

    def start(self, campaign_id: int) -> Deferred[Campaign | None]:
        return self.run(lambda s: s.start(campaign_id))

    def recipients_after(
        self, list: str, after_id: int, upto_id: int, limit: int
    ) -> Deferred[list[Recipient]]:
        return self.run(lambda s: s.recipients_after(list, after_id, upto_id, limit))

    def record_progress(self, campaign_id: int, cursor: int, sent: int) -> Deferred[bool]:
        return self.run(lambda s: s.record_progress(campaign_id, cursor, sent))

    def record_status(self, updates: Iterable[StatusUpdate]) -> Deferred[None]:
        batch = tuple(updates)
        return self.run(lambda s: s.record_status(batch))

    def finish(self, campaign_id: int) -> Deferred[bool]:
        return self.run(lambda s: s.finish(campaign_id))

    def mark_bounced_ids(self, list: str, recipient_ids: Iterable[int]) -> Deferred[int]:
        ids = tuple(recipient_ids)
        return self.run(lambda s: s.mark_bounced_ids(list, ids))

    def not_subscribed(self, recipient_ids: Iterable[int]) -> Deferred[list[int]]:
        ids = tuple(recipient_ids)
        return self.run(lambda s: s.not_subscribed(ids))

    def unsubscribe_key(self) -> Deferred[bytes]:
        return self.run(lambda s: s.unsubscribe_key())


class InlineCampaignStore(_DeferredStore):
    """
    A L{SQLiteCampaignStore} behind L{Deferred}s that have fired already:
    each call runs on the caller's thread (tests, tools; it blocks the
    reactor, so not for the gateway).
    """

    def __init__(self, store: SQLiteCampaignStore) -> None:
        self.store = store

    def run(self, f: Callable[[SQLiteCampaignStore], T]) -> Deferred[T]:
        try:
            return succeed(f(self.store))
        except Exception:
            return fail()


class ThreadedCampaignStore(ThreadedStore[SQLiteCampaignStore], _DeferredStore):
    """
    The store of console sends as the reactor reaches it: each call runs an
    L{SQLiteCampaignStore} on a small pool of threads, each with its own
    connection, and answers with a L{Deferred}. The methods are those of
    L{SQLiteCampaignStore}.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reactor: IReactorFromThreads,
        clock: IReactorTime,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        """
        @param path: the database file; created when missing.
        @param reactor: delivers results from the threads.
        @param clock: gives the times of changes.
        """
        self._clock = clock
        super().__init__(path, reactor=reactor, size=pool_size, name="smtpgw-campaigns")

    def _open_store(self) -> SQLiteCampaignStore:
        return SQLiteCampaignStore.open(self._path, self._clock, check_same_thread=False)


# --- the runner ---------------------------------------------------------------


class _RateMeter:
    """
    Events a second over the last L{RATE_WINDOW} seconds, in one-second
    buckets.
    """

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self._window = window
        self._buckets: deque[list[float]] = deque()
        self._since: float | None = None

    def tick(self, now: float, count: int = 1) -> None:
        if self._since is None:
            self._since = now
        second = math.floor(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([second, count])
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self._window - 1:
            self._buckets.popleft()

    def rate(self, now: float) -> float:
        self._trim(now)
        if self._since is None or not self._buckets:
            return 0.0
        span = min(self._window, now - self._since)
        if span <= 0:
            return 0.0
        start = now - span
        # The oldest bucket counts for the part of its second in the span.
        events = 0.0
        for second, count in self._buckets:
            if second + 1 <= start:
                continue
            share = 1.0 if second >= start else (second + 1 - start)
            events += count * share
        return events / span

    def reset(self) -> None:
        self._buckets.clear()
        self._since = None


@define
class _Send:
    """
    What the runner knows of one send it works on.

    @ivar window: the queue ids of its messages queued or being sent.
    @ivar deferred: those waiting for a retry.
    @ivar catch_up_to: the highest recipient id of a message found in the
        queue at start beyond the cursor: the gate stays closed until the
        cursor passes it.
    @ivar held_back: messages durable in the journal that the cursor does
        not cover yet (a journal or database failure in their batch):
        scheduled once it does.
    @ivar bodies: the send's text and HTML, read once while it runs (the
        polls read the sends without them).
    """

    campaign: Campaign
    gate: str
    cursor: int
    last_id: int
    window: set[str] = field(factory=set)
    deferred: set[str] = field(factory=set)
    catch_up_to: int = 0
    held_back: dict[str, tuple[Envelope, JournalLocation]] = field(factory=dict)
    exhausted: bool = False
    finished: bool = False
    pumping: bool = False
    pump_again: bool = False
    kicked: bool = False
    retry_at: float = 0.0
    preemption: Preemption | None = None
    meter: _RateMeter = field(factory=_RateMeter)
    delivered: int = 0
    bounced: int = 0
    in_doubt: int = 0
    to_mark: list[int] = field(factory=list)
    written: tuple[CampaignState, str | None] | None = None
    bodies: tuple[str | None, str | None] | None = field(default=None, repr=False)

    @property
    def catching_up(self) -> bool:
        return self.catch_up_to > self.cursor


class CampaignRunner(Service):
    """
    Sends the console sends through the queue (see the module's
    description).

    It looks at the database every C{poll_interval} seconds (and at once
    on L{poke}) for sends that are due, paused, resumed or cancelled, so
    the CLI and the pages only write there.

    Start it after the queue (it looks at what the queue replayed) and stop
    it before (it waits for the batch under way, which needs the journal).
    """

    _log = Logger()

    def __init__(
        self,
        store: CampaignBackend,
        queue: MessageQueue,
        clock: IReactorTime,
        *,
        hostname: str,
        base_url: str,
        window: int = DEFAULT_WINDOW,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_deferred: int = DEFAULT_MAX_DEFERRED,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
    ) -> None:
        """
        @param store: the sends and recipients.
        @param queue: the send queue, built with C{gate_of=campaign_gate}.
        @param clock: the time, and the timers of the polls.
        @param hostname: the gateway's host name (Message-IDs).
        @param base_url: where the gateway's pages are reached from the
            outside (C{https://mail.example.com}): unsubscribe links are
            C{<base_url>/unsubscribe/<token>}.
        @param window: see L{DEFAULT_WINDOW}.
        @param poll_interval: see L{DEFAULT_POLL_INTERVAL}.
        @param max_deferred: see L{DEFAULT_MAX_DEFERRED}.
        @param retry_interval: see L{DEFAULT_RETRY_INTERVAL}.
        @raise ValueError: the queue does not put sends behind gates, the
            base URL is not an absolute http(s) URL in ASCII (punycode,
            percent-encoding), or a number is out of range.
        """
        if queue.gate_of is not campaign_gate:
            raise ValueError("the queue must be built with gate_of=campaign_gate")
        parts = urlsplit(base_url)
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or not base_url.isascii()
            or len(base_url) > _MAX_BASE_URL
            or re.search(r"[\s\"'<>]", base_url)
        ):
            raise ValueError(f"base_url must be an absolute http(s) URL, not {base_url!r}")
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        if not poll_interval > 0 or not retry_interval > 0 or max_deferred < 1:
            raise ValueError("poll_interval, retry_interval and max_deferred must be positive")
        self._store = store
        self._queue = queue
        self._clock = clock
        self._hostname = hostname
        self._base_url = base_url.rstrip("/")
        self._window = window
        self._refill_at = max(1, window // 8)
        self._poll_interval = poll_interval
        self._max_deferred = max_deferred
        self._retry_interval = retry_interval
        self._key: bytes | None = None
        self._sends: dict[int, _Send] = {}
        self._by_gate: dict[str, _Send] = {}
        self._adopted_gates = False
        self._timer: IDelayedCall | None = None
        self._poke_call: IDelayedCall | None = None
        self._status_call: IDelayedCall | None = None
        self._ticking = False
        self._tick_again = False
        self._busy = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._doubts_counted: set[str] = set()
        self._status_lock = DeferredLock()
        self._late_write = False

    # Service

    def startService(self) -> None:
        """
        Start watching the queue and the database.
        """
        super().startService()
        self._queue.remove_observer(self)
        self._queue.add_observer(self)
        self._timer = self._clock.callLater(0, self._poll)

    def stopService(self) -> Deferred[None]:
        """
        Stop polling; fires once the batch under way is done and the counts
        are written.

        It keeps watching the queue: the runner stops before it, and the
        deliveries under way when the queue stops end after the runner did.
        Their outcomes are written as they come (hard bounces mark their
        recipients bounced), while the store still runs (it stops after the
        queue). After a C{kill -9}, the outcomes of the last
        L{DEFAULT_POLL_INTERVAL} are lost: the recipients of hard bounces in
        that second are not marked bounced (the queue's journal has the
        messages as bounced, so they are not sent again), and the counts
        miss them.
        """
        super().stopService()
        for call in (self._timer, self._poke_call, self._status_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._poke_call = self._status_call = None

        def write(_: object) -> Deferred[None]:
            return Deferred.fromCoroutine(self._write_status())

        return self._when_idle().addCallback(write)

    def poke(self) -> None:
        """
        Look at the database now (after a send was created, paused,
        resumed or cancelled in this process).
        """
        if self.running and (self._poke_call is None or not self._poke_call.active()):
            self._poke_call = self._clock.callLater(0, self._tick)

    # What the pages show

    def preemption(self, campaign_id: int) -> Preemption | None:
        """
        What keeps a send of this process paused, if traffic of a higher
        priority does.
        """
        send = self._sends.get(campaign_id)
        return None if send is None else send.preemption

    def rate(self, campaign_id: int) -> float:
        """
        Messages a second the send got lately (0 when not running here).
        """
        send = self._sends.get(campaign_id)
        return 0.0 if send is None else send.meter.rate(self._clock.seconds())

    def window_of(self, campaign_id: int) -> int:
        """
        The messages of a send in the queue now, queued or being sent.
        """
        send = self._sends.get(campaign_id)
        return 0 if send is None else len(send.window)

    def forget_recipient(self, list: str, recipient_id: int) -> int:
        """
        A recipient of C{list} unsubscribed or was marked bounced: cancel
        their message of each open send of the list (running, paused or
        pre-empted) that is still in the queue and not being delivered
        (one under way goes). The pages and the API call this after an
        unsubscribe; the runner also finds such recipients by itself, at
        each poll and before each batch (L{DEFAULT_POLL_INTERVAL}).

        @return: how many messages were cancelled.
        """
        cancelled = 0
        for send in tuple(self._sends.values()):
            if (
                send.campaign.list == list
                and self._cancel_unsent(campaign_queue_id(send.campaign.id, recipient_id))
                is not None
            ):
                cancelled += 1
        return cancelled

    # QueueObserver

    def message_settled(self, outcome: MessageOutcome) -> None:
        """
        Count a send's message that was delivered, bounced, deferred or
        cancelled, and make room for the next.
        """
        if outcome.gate is None:
            return
        send = self._by_gate.get(outcome.gate)
        if send is None:
            return
        queue_id = outcome.queue_id
        send.window.discard(queue_id)
        if outcome.state is MessageState.DEFERRED:
            send.deferred.add(queue_id)
        else:
            send.deferred.discard(queue_id)
        if outcome.state is not MessageState.CANCELLED:
            send.meter.tick(self._clock.seconds())
        send.delivered += len(outcome.delivered)
        send.bounced += len(outcome.bounced) + len(outcome.expired)
        if outcome.bounced:
            found = parse_queue_id(queue_id)
            if found is not None:
                send.to_mark.append(found[1])
        if self.running:
            self._kick(send)
        elif outcome.state is not MessageState.CANCELLED and not self._late_write:
            # A delivery that ended after the runner stopped (the queue
            # drains after it): no poll writes its outcome.
            self._late_write = True
            d = Deferred.fromCoroutine(self._write_late())
            d.addErrback(lambda f: self._log.failure("could not write the sends' status", f))

    async def _write_late(self) -> None:
        # Outcomes that come while this write waits for the lock go with it.
        await self._status_lock.acquire()
        try:
            self._late_write = False
            await self._write_status_now()
        finally:
            self._status_lock.release()

    def gate_changed(self, gate: str, preemption: Preemption | None) -> None:
        """
        Show a send as paused, or sending again, at once.
        """
        send = self._by_gate.get(gate)
        if send is None:
            return
        send.preemption = preemption
        if send.catching_up:
            return
        if self.running and (self._status_call is None or not self._status_call.active()):
            self._status_call = self._clock.callLater(0, self._write_status_soon)

    # Internals: the loop

    def _poll(self) -> None:
        self._timer = None
        self._tick()
        if self.running:
            self._timer = self._clock.callLater(self._poll_interval, self._poll)

    def _tick(self) -> None:
        if not self.running:
            return
        if self._ticking:
            self._tick_again = True
            return
        self._ticking = True
        self._busy += 1
        d = Deferred.fromCoroutine(self._sync())
        d.addErrback(lambda f: self._log.failure("the campaign runner's look failed", f))
        d.addBoth(self._ticked)

    def _ticked(self, _: object) -> None:
        self._ticking = False
        self._done()
        if self._tick_again:
            self._tick_again = False
            self._tick()

    def _done(self) -> None:
        self._busy -= 1
        if not self._busy:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _when_idle(self) -> Deferred[None]:
        if not self._busy:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    async def _sync(self) -> None:
        if self._key is None:
            self._key = await self._store.unsubscribe_key()
        campaigns = await self._store.open_campaigns()
        fresh: list[_Send] = []
        if not self._adopted_gates:
            fresh += await self._adopt_leftovers({c.id for c in campaigns})
            self._adopted_gates = True
        now = self._clock.seconds()
        seen = set()
        for campaign in campaigns:
            seen.add(campaign.id)
            send = self._sends.get(campaign.id)
            if send is None:
                if campaign.state is CampaignState.SCHEDULED:
                    if campaign.paused_by_admin or (
                        campaign.send_at is not None and campaign.send_at > now
                    ):
                        continue
                    started = await self._store.start(campaign.id)
                    if started is None:
                        continue
                    self._log.info(
                        "console send {id} to list {list} started: {total} recipients",
                        id=started.id,
                        list=started.list,
                        total=started.total,
                    )
                    campaign = started
                elif campaign.started_at is None:
                    continue
                fresh.append(self._adopt(campaign, apply=False))
                continue
            send.campaign = campaign
            self._apply_gate(send)
        for campaign_id in [i for i in self._sends if i not in seen]:
            await self._over(self._sends[campaign_id])
        # Before a send's gate opens at a start (its messages replayed from
        # the journal), and every poll after: recipients who unsubscribed
        # or bounced since their message was queued do not get it.
        await self._drop_unsubscribed(tuple(self._sends.values()))
        for send in fresh:
            if self._sends.get(send.campaign.id) is send:
                self._apply_gate(send)
        await self._write_status()
        for send in list(self._sends.values()):
            self._kick(send)

    async def _adopt_leftovers(self, open_ids: set[int]) -> list[_Send]:
        """
        At the first look: the queue may hold messages of sends that are
        over (finished, or cancelled while the gateway was down).

        @return: the finished sends adopted, their gates to be opened.
        """
        adopted = []
        for gate in sorted(self._queue.gates()):
            campaign_id = _gate_campaign(gate)
            if campaign_id is None or campaign_id in open_ids:
                continue
            campaign = await self._store.get(campaign_id)
            if campaign is not None and campaign.state is CampaignState.CANCELLED:
                self._cancel_queued(gate)
                continue
            # Finished (deferred messages left), or unknown: the mail was
            # accepted, so it goes.
            if campaign is None:
                self._queue.open_gate(gate, Priority.NORMAL, label=campaign_label(campaign_id))
            else:
                adopted.append(self._adopt(campaign, finished=True, apply=False))
        return adopted

    def _adopt(self, campaign: Campaign, *, finished: bool = False, apply: bool = True) -> _Send:
        gate = campaign_username(campaign.id)
        send = _Send(
            campaign=campaign,
            gate=gate,
            cursor=campaign.cursor,
            last_id=campaign.last_recipient_id or 0,
            finished=finished,
        )
        if campaign.bodies:
            send.bodies = (campaign.text, campaign.html)
        for entry in self._queue.gated(gate):
            if entry.state in (MessageState.QUEUED, MessageState.SENDING):
                send.window.add(entry.queue_id)
            else:
                send.deferred.add(entry.queue_id)
            found = parse_queue_id(entry.queue_id)
            if found is not None and found[1] > send.cursor:
                send.catch_up_to = max(send.catch_up_to, found[1])
        if gate not in self._doubts_counted:
            self._doubts_counted.add(gate)
            send.in_doubt = self._queue.redelivered_in(gate)
        if send.in_doubt:
            self._log.warn(
                "console send {id}: {count} messages were being delivered when the gateway"
                " stopped; they are sent again and may arrive twice",
                id=campaign.id,
                count=send.in_doubt,
            )
        self._sends[campaign.id] = send
        self._by_gate[gate] = send
        if apply:
            self._apply_gate(send)
        return send

    def _apply_gate(self, send: _Send) -> None:
        label = campaign_label(send.campaign.id)
        if send.finished:
            self._queue.open_gate(send.gate, send.campaign.priority, label=label)
        elif send.campaign.paused_by_admin:
            self._queue.close_gate(send.gate, ADMIN_PAUSE_REASON, label=label)
        elif send.catching_up:
            self._queue.close_gate(send.gate, CATCHING_UP_REASON, label=label)
        else:
            self._queue.open_gate(send.gate, send.campaign.priority, label=label)

    async def _over(self, send: _Send) -> None:
        """
        A send that left the open states: cancelled by an admin, or
        finished (here, with messages left waiting for retries).
        """
        campaign = await self._store.get(send.campaign.id)
        if campaign is not None and campaign.state is CampaignState.CANCELLED:
            send.campaign = campaign
            await self._cancelled(send)
            return
        if not send.finished:
            send.finished = True
            self._apply_gate(send)
        if not send.window and not send.deferred:
            await self._write_status()
            self._drop(send)
            self._queue.forget_gate(send.gate)

    async def _cancelled(self, send: _Send) -> None:
        """
        Drop a send an admin cancelled, with its messages still queued
        (those being delivered finish).
        """
        await self._write_status()
        self._drop(send)
        for envelope, location in send.held_back.values():
            self._queue.schedule(envelope, location)
        send.held_back.clear()
        self._cancel_queued(send.gate)
        self._queue.forget_gate(send.gate)
        self._log.info("console send {id} cancelled", id=send.campaign.id)

    def _drop(self, send: _Send) -> None:
        self._sends.pop(send.campaign.id, None)
        self._by_gate.pop(send.gate, None)

    def _cancel_queued(self, gate: str) -> None:
        self._queue.close_gate(gate, CANCELLED_REASON)
        for entry in self._queue.gated(gate):
            if entry.state is not MessageState.SENDING:
                self._queue.cancel(entry.queue_id).addErrback(self._not_cancelled, entry.queue_id)

    def _cancel_unsent(self, queue_id: str) -> Deferred[None] | None:
        """
        Cancel a message unless it is being delivered (or gone).

        @return: the journal's record of it, or L{None} when not cancelled.
        """
        entry = self._queue.get(queue_id)
        if entry is None or entry.state is MessageState.SENDING:
            return None
        d = self._queue.cancel(queue_id)
        d.addErrback(self._not_cancelled, queue_id)
        return d

    async def _drop_unsubscribed(self, sends: Iterable[_Send]) -> None:
        """
        Cancel the messages of C{sends} still waiting in the queue whose
        recipients are no longer subscribed: one read for all of them.
        """
        waiting: dict[int, list[str]] = {}
        for send in sends:
            for entry in self._queue.gated(send.gate):
                found = parse_queue_id(entry.queue_id)
                if found is not None and entry.state is not MessageState.SENDING:
                    waiting.setdefault(found[1], []).append(entry.queue_id)
        if not waiting:
            return
        try:
            gone = await self._store.not_subscribed(waiting)
        except Exception as e:
            self._log.warn(
                "could not check whether {count} queued recipients are still subscribed: {reason}",
                count=len(waiting),
                reason=str(e) or type(e).__name__,
            )
            return
        for recipient_id in gone:
            for queue_id in waiting[recipient_id]:
                self._cancel_unsent(queue_id)

    def _cancel_held(self, send: _Send, queue_ids: Iterable[str]) -> list[Deferred[None]]:
        """
        Journal as cancelled messages held back (durable but never
        scheduled) whose recipients are no longer subscribed, so that no
        restart replays them.
        """
        held = [send.held_back.pop(q) for q in queue_ids if q in send.held_back]
        if not held:
            return []
        # Scheduled only to be cancelled at once: behind the closed gate,
        # none can be handed out in between.
        self._queue.close_gate(send.gate)
        for envelope, location in held:
            self._queue.schedule(envelope, location)
        cancels = [self._cancel_unsent(envelope.queue_id) for envelope, _ in held]
        self._apply_gate(send)
        return [d for d in cancels if d is not None]

    def _not_cancelled(self, failure: Failure, queue_id: str) -> None:
        self._log.warn(
            "could not cancel {queue_id}: {reason}",
            queue_id=queue_id,
            reason=failure.getErrorMessage(),
        )

    # Internals: filling the window

    def _kick(self, send: _Send) -> None:
        if send.kicked or not self.running:
            return
        send.kicked = True

        def go() -> None:
            send.kicked = False
            self._start_pump(send)

        self._clock.callLater(0, go)

    def _start_pump(self, send: _Send) -> None:
        if not self.running or send.campaign.id not in self._sends:
            return
        if send.pumping:
            send.pump_again = True
            return
        send.pumping = True
        self._busy += 1
        d = Deferred.fromCoroutine(self._pump(send))
        d.addErrback(
            lambda f: self._log.failure(
                "console send {id} failed to go on", f, id=send.campaign.id
            )
        )
        d.addBoth(self._pumped, send)

    def _pumped(self, _: object, send: _Send) -> None:
        send.pumping = False
        self._done()
        if send.pump_again:
            send.pump_again = False
            self._start_pump(send)

    def _may_build(self, send: _Send) -> bool:
        return bool(
            self.running
            and not send.finished
            and not send.exhausted
            and not send.campaign.paused_by_admin
            and send.campaign.id in self._sends
            and self._clock.seconds() >= send.retry_at
            and len(send.deferred) < self._max_deferred
        )

    async def _pump(self, send: _Send) -> None:
        while self._may_build(send):
            room = self._window - len(send.window)
            if send.catching_up:
                limit = max(room, _CATCH_UP_BATCH)
            elif room >= self._refill_at or (room > 0 and not send.window):
                limit = room
            else:
                break
            campaign = send.campaign
            if send.bodies is None:
                found = await self._store.bodies(campaign.id)
                if found is None:
                    break
                send.bodies = found
            await self._drop_unsubscribed((send,))
            recipients = await self._store.recipients_after(
                campaign.list, send.cursor, send.last_id, limit
            )
            if not recipients:
                if not await self._skip_to_end(send):
                    self._retry_later(send)
                    break
                send.exhausted = True
                break
            if not await self._submit(send, recipients):
                self._retry_later(send)
                break
        if send.exhausted and not send.window and not send.held_back and not send.finished:
            await self._finish(send)

    def _retry_later(self, send: _Send) -> None:
        # A paused send is kicked when it is resumed: no sooner, no later.
        if not send.campaign.paused_by_admin:
            send.retry_at = self._clock.seconds() + self._retry_interval
            self._clock.callLater(self._retry_interval, self._kick, send)

    def _skipped(self, send: _Send, upto: int, kept: set[int]) -> list[str]:
        """
        The send's messages past its cursor, up to C{upto}, not of the
        recipients C{kept}: those whose recipients the last read skipped
        (no longer subscribed). Held back or replayed, they were never sent.
        """
        found = []
        for queue_id in [*send.held_back, *(e.queue_id for e in self._queue.gated(send.gate))]:
            ids = parse_queue_id(queue_id)
            if ids is not None and send.cursor < ids[1] <= upto and ids[1] not in kept:
                found.append(queue_id)
        return found

    async def _drop_skipped(self, send: _Send, upto: int, kept: set[int]) -> None:
        """
        Cancel, in the journal, what L{_skipped} finds, before the cursor
        passes it: once behind the cursor, a replay would send it.
        """
        skipped = self._skipped(send, upto, kept)
        if not skipped:
            return
        cancels = self._cancel_held(send, [q for q in skipped if q in send.held_back])
        for queue_id in skipped:
            d = self._cancel_unsent(queue_id)
            if d is not None:
                cancels.append(d)
        await DeferredList(cancels, consumeErrors=True)

    async def _skip_to_end(self, send: _Send) -> bool:
        """
        No subscribed recipient is left past the cursor: cancel what was
        queued or held back for those past it, move the cursor to the
        send's last recipient (so that a send catching up after a restart
        is caught up) and open its gate.

        @return: whether the cursor could be recorded.
        """
        await self._drop_skipped(send, send.last_id, set())
        if send.cursor < send.last_id:
            try:
                recorded = await self._store.record_progress(send.campaign.id, send.last_id, 0)
            except Exception as e:
                self._log.warn(
                    "console send {id}: could not record its progress ({reason}); it goes on"
                    " from there later",
                    id=send.campaign.id,
                    reason=str(e) or type(e).__name__,
                )
                return False
            if not recorded:
                self._held_meanwhile(send)
                return False
            send.cursor = max(send.cursor, send.last_id)
        if send.catch_up_to:
            send.catch_up_to = 0
            self._apply_gate(send)
        return True

    async def _submit(self, send: _Send, recipients: list[Recipient]) -> bool:
        """
        Make a batch durable, move the cursor past it, then schedule it.

        @return: whether the whole batch went.
        """
        assert self._key is not None
        assert send.bodies is not None
        campaign = evolve(send.campaign, text=send.bodies[0], html=send.bodies[1], bodies=True)
        now = turn = self._clock.seconds()
        built: list[tuple[int, Envelope, Deferred[JournalLocation]]] = []
        for recipient in recipients:
            if built and (
                len(built) % MAX_BUILD_PER_TURN == 0
                or self._clock.seconds() - turn >= BUILD_TURN_BUDGET
            ):
                # Large bodies cost milliseconds each: let the reactor
                # serve the rest (SMTP, the pages) between two slices.
                await deferLater(self._clock, 0)
                turn = self._clock.seconds()
                if (
                    not self.running
                    or campaign.id not in self._sends
                    or send.campaign.paused_by_admin
                ):
                    break
            queue_id = campaign_queue_id(campaign.id, recipient.id)
            token = unsubscribe_token(self._key, campaign.list, recipient.id)
            body = render_message(
                campaign,
                recipient,
                queue_id=queue_id,
                hostname=self._hostname,
                unsubscribe=unsubscribe_url(self._base_url, token),
                now=now,
            )
            envelope = Envelope(
                queue_id=queue_id,
                list=campaign.list,
                username=campaign_username(campaign.id),
                sender=campaign.sender,
                recipients=(recipient.email,),
                priority=campaign.priority,
                accepted_at=now,
                size=len(body),
            )
            built.append((recipient.id, envelope, self._queue.accept(envelope, body)))
        results: list[tuple[bool, Any]] = await DeferredList(
            [d for _, _, d in built], consumeErrors=True
        )
        accepted: list[tuple[Envelope, JournalLocation | None]] = []
        cursor = send.cursor
        failure: Failure | None = None
        for (recipient_id, envelope, _), (ok, value) in zip(built, results, strict=True):
            location: JournalLocation | None = None
            if ok:
                location = value
            elif value.check(QueueIdInUse):
                # Durable already: held back from an earlier batch, or
                # replayed (and in the queue).
                held = send.held_back.pop(envelope.queue_id, None)
                location = None if held is None else held[1]
            else:
                if failure is None:
                    failure = value
                continue
            if failure is not None:
                if location is not None:
                    send.held_back[envelope.queue_id] = (envelope, location)
                continue
            accepted.append((envelope, location))
            cursor = recipient_id
        if accepted:
            await self._drop_skipped(send, cursor, {r.id for r in recipients})
            try:
                recorded = await self._store.record_progress(campaign.id, cursor, len(accepted))
            except Exception as e:
                self._log.warn(
                    "console send {id}: could not record its progress ({reason}); it goes on"
                    " from there later",
                    id=campaign.id,
                    reason=str(e) or type(e).__name__,
                )
                recorded = None
            dropped = campaign.id not in self._sends
            if not recorded and not dropped:
                # Durable, but behind no cursor: held back until the batch
                # is built again (a replay after a crash finds them too).
                for envelope, location in accepted:
                    if location is not None:
                        send.held_back[envelope.queue_id] = (envelope, location)
                if recorded is False:
                    self._held_meanwhile(send)
                return False
            if recorded:
                send.cursor = cursor
            for envelope, location in accepted:
                if location is not None:
                    # In the window first: the queue may deliver it, and
                    # tell, before schedule() returns.
                    send.window.add(envelope.queue_id)
                    self._queue.schedule(envelope, location)
            if dropped:
                # Cancelled while this batch was on its way: scheduled only
                # to be cancelled in the journal with the rest of the send's.
                self._cancel_queued(send.gate)
                self._queue.forget_gate(send.gate)
                return False
            if not send.catching_up and send.catch_up_to:
                send.catch_up_to = 0
                self._apply_gate(send)
        if failure is not None:
            reason = failure.getErrorMessage()
            if failure.check(JournalUnavailable):
                self._log.warn(
                    "console send {id}: the journal refused a message ({reason}); "
                    "tried again in {delay} s",
                    id=campaign.id,
                    reason=reason,
                    delay=self._retry_interval,
                )
            else:
                self._log.failure("console send {id}: submitting failed", failure, id=campaign.id)
            return False
        return True

    def _held_meanwhile(self, send: _Send) -> None:
        """
        The store refused a send's progress: an admin paused or cancelled
        it while a batch was being built, before this runner's next look.
        Until that look, the runner holds the send as paused (it builds no
        more, and its gate is closed); the look is made now.
        """
        if send.campaign.id not in self._sends:
            return
        send.campaign = evolve(send.campaign, paused_by_admin=True)
        self._apply_gate(send)
        self.poke()

    async def _finish(self, send: _Send) -> None:
        campaign_id = send.campaign.id
        finished = await self._store.finish(campaign_id)
        updated = await self._store.get(campaign_id)
        if updated is not None and updated.state is CampaignState.CANCELLED:
            send.campaign = updated
            await self._cancelled(send)
            return
        send.finished = True
        if updated is not None:
            send.campaign = updated
            if finished:
                self._log.info(
                    "console send {id} finished: {sent} of {total} messages handed to the queue",
                    id=campaign_id,
                    sent=updated.sent,
                    total=updated.total,
                )
        self._apply_gate(send)
        await self._write_status()
        if not send.deferred and not send.window:
            self._drop(send)
            self._queue.forget_gate(send.gate)

    # Internals: what is written

    def _status(self, send: _Send) -> tuple[CampaignState, str | None]:
        if send.finished:
            return CampaignState.FINISHED, None
        if send.campaign.paused_by_admin:
            return CampaignState.PAUSED, ADMIN_PAUSE_REASON
        if self._queue.paused:
            return CampaignState.PAUSED, QUEUE_STOPPED_REASON
        if send.preemption is not None:
            return CampaignState.PAUSED, send.preemption.reason
        if len(send.deferred) >= self._max_deferred:
            return (
                CampaignState.PAUSED,
                f"waiting for {len(send.deferred)} deferred messages to be retried",
            )
        return CampaignState.SENDING, None

    def _write_status_soon(self) -> None:
        self._status_call = None
        if not self.running:
            return
        self._busy += 1
        d = Deferred.fromCoroutine(self._write_status())
        d.addErrback(lambda f: self._log.failure("could not write the sends' status", f))
        d.addBoth(lambda _: self._done())

    async def _write_status(self) -> None:
        # One write at a time: each takes the counts it writes off the
        # sends once written, and two at once would count them twice.
        await self._status_lock.run(lambda: Deferred.fromCoroutine(self._write_status_now()))

    async def _write_status_now(self) -> None:
        now = self._clock.seconds()
        updates = []
        taken = []
        for send in list(self._sends.values()):
            state, reason = self._status(send)
            updates.append(
                StatusUpdate(
                    campaign_id=send.campaign.id,
                    state=state,
                    paused_reason=reason,
                    rate=0.0 if state is not CampaignState.SENDING else send.meter.rate(now),
                    delivered=send.delivered,
                    bounced=send.bounced,
                    deferred=len(send.deferred),
                    in_doubt=send.in_doubt,
                )
            )
            taken.append((send, send.delivered, send.bounced, send.in_doubt, list(send.to_mark)))
            if send.written != (state, reason):
                send.written = (state, reason)
                if state is CampaignState.PAUSED:
                    self._log.info(
                        "console send {id} paused: {reason}", id=send.campaign.id, reason=reason
                    )
        if not updates:
            return
        try:
            await self._store.record_status(updates)
        except Exception as e:
            self._log.warn("could not write the sends' status: {reason}", reason=str(e))
            return
        for send, delivered, bounced, in_doubt, marks in taken:
            send.delivered -= delivered
            send.bounced -= bounced
            send.in_doubt -= in_doubt
            del send.to_mark[: len(marks)]
            if marks:
                try:
                    await self._store.mark_bounced_ids(send.campaign.list, marks)
                except Exception as e:
                    send.to_mark.extend(marks)
                    self._log.warn(
                        "could not mark {count} recipients bounced: {reason}",
                        count=len(marks),
                        reason=str(e),
                    )
