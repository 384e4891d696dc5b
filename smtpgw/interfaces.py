"""
The seams of the gateway: each has more than one implementation, or a fake
in the tests, and each implementation is checked with C{verifyObject}.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from attrs import field, frozen
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from smtpgw.model import Envelope, MailList, Priority, SmtpUser


class JournalUnavailable(Exception):
    """
    The journal cannot make a message durable (disk full, unwritable file).
    The session answers C{452 4.3.1} and nothing is lost.
    """


@frozen
class JournalLocation:
    """
    Where a message's accept record lies in the journal.
    """

    segment: int
    offset: int
    length: int


@frozen
class JournaledMessage:
    """
    A message found in the journal at replay, with the state it had.

    @ivar state: one of the L{smtpgw.model.MessageState} values, as its C{value}.
    @ivar attempts: delivery attempts made so far.
    @ivar next_attempt_at: when a deferred message may be tried again.
    @ivar remaining: the recipients still to be tried, once some took the
        message or failed for good; L{None} means every recipient of the
        envelope.
    @ivar bounced: the recipients that failed for good so far (each was
        reported to the sender then).
    """

    envelope: Envelope
    location: JournalLocation
    state: str = "queued"
    attempts: int = 0
    next_attempt_at: float = 0.0
    remaining: tuple[str, ...] | None = None
    bounced: tuple[str, ...] = ()


@frozen
class Alert:
    """
    An event for administrators.

    @ivar type: C{sender_domain}, C{auth_failures}, C{delivery}, C{bounce},
        C{queue_stalled}.
    @ivar list: the list it concerns, when it concerns one.
    """

    type: str
    message: str
    created_at: float
    list: str | None = None
    details: Mapping[str, Any] = field(factory=dict)


@frozen
class DeliveryResult:
    """
    The outcome of one delivery attempt, per recipient.

    @ivar delivered: recipients the next hop accepted.
    @ivar deferred: (recipient, reason) pairs that failed temporarily.
    @ivar bounced: (recipient, reason) pairs that failed permanently.
    """

    delivered: tuple[str, ...] = ()
    deferred: tuple[tuple[str, str], ...] = ()
    bounced: tuple[tuple[str, str], ...] = ()


class IUserStore(Interface):
    """
    Lists and SMTP+ users, as the running gateway reaches them: every method
    returns a L{Deferred} and does its I/O off the reactor thread.
    """

    def get_user(username: str) -> Deferred[SmtpUser | None]:
        """
        The user record named C{username}, or L{None}.
        """

    def record_login(username: str, at: float, ip: str) -> Deferred[None]:
        """
        Remember the time and client address of a successful login.
        """

    def get_list(name: str) -> Deferred[MailList | None]:
        """
        The list named C{name}, or L{None}.
        """


class IAlertSink(Interface):
    """
    Where alerts go; raising one never blocks nor fails the caller.
    """

    def raise_alert(alert: Alert) -> None:
        """
        Store (and later forward) C{alert}.
        """


class IJournal(Interface):
    """
    The durable record of every accepted message and of what became of it.
    """

    def accept(
        envelope: Envelope, body: bytes, *, announced: bool = False
    ) -> Deferred[JournalLocation]:
        """
        Append an accept record; the L{Deferred} fires once it is on disk
        (fsync'd), or fails with L{JournalUnavailable}.

        @param announced: whether the message comes from an SMTP session,
            which was counted among those about to hand over a message (a
            journal that waits for them need not guess for this one).
        """

    def record_state(
        queue_id: str,
        state: str,
        attempts: int = 0,
        next_attempt_at: float = 0.0,
        *,
        remaining: Sequence[str] | None = None,
        bounced: Sequence[str] = (),
        urgent: bool = True,
    ) -> Deferred[None]:
        """
        Append a state change (delivered, deferred, bounced, held, ...)
        for a message; fires once it is durable.

        @param remaining: once some recipients are done, those still to be
            tried: replay gives them as L{JournaledMessage.remaining}, and
            later changes recorded without them keep them.
        @param bounced: with C{remaining}, the recipients that failed for
            good so far (L{JournaledMessage.bounced}).
        @param urgent: L{False} when nothing waits for the change to be
            durable: the journal may make it durable later, together with
            other records, instead of at once.
        """

    def record_queue_state(paused: bool) -> Deferred[None]:
        """
        Append the state of the queue as a whole (whether an admin stopped
        it); fires once it is durable. The latest one is L{queue_paused}
        after a restart.
        """

    queue_paused = Attribute(
        "C{bool}: whether the latest queue state recorded says paused; read"
        " after L{replay}, it is what was journaled before the restart."
    )

    def reprioritize(queue_id: str, priority: Priority) -> Deferred[None]:
        """
        Append a change of a message's effective priority; fires once durable.
        """

    accepting = Attribute("C{bool}: L{False} while the last write failed (disk full, ...).")

    def read(location: JournalLocation) -> Deferred[tuple[Envelope, bytes]]:
        """
        Read an accepted message back, off the reactor thread.
        """

    def replay() -> Iterable[JournaledMessage]:
        """
        Every message that is not in a final state, in acceptance order.
        Called once at start, before L{start}.
        """

    def start() -> None:
        """
        Start taking records (after L{replay}).
        """

    def stop() -> Deferred[None]:
        """
        Make durable what is queued and close; fires once that is done.
        """


class IOutbound(Interface):
    """
    Sends a message on: to a capture directory, a smarthost or MX hosts.
    """

    def deliver(envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        """
        Attempt delivery of C{body} to every recipient of C{envelope}.
        The L{Deferred} never fails: every problem is a per-recipient result.
        """


class IMessageQueue(Interface):
    """
    What the SMTP session hands accepted messages to.
    """

    def submit(envelope: Envelope, body: bytes) -> Deferred[None]:
        """
        Make the message durable and schedule it. Fires once it is safe to
        answer C{250}; fails with L{JournalUnavailable} when it is not.
        """

    accepting = Attribute("C{bool}: L{False} while the journal cannot take mail.")
