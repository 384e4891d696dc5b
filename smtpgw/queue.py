"""
The send queue: the journal, the scheduler and an outbound relay tied
together (PRODUCT section 3).

L{MessageQueue.submit} makes a message durable in the journal and schedules
it; the dispatcher hands ready messages to the outbound relay in scheduler
order, within the gateway's rate and concurrency, and records in the journal
what became of each attempt. At start the journal is replayed into the
scheduler, so mail accepted before a crash is sent after it.

Outcomes are kept per recipient: a recipient that took the message is never
sent it again, one that failed temporarily is tried again on the schedule of
L{retry_delay} (with L{RETRY_JITTER}), one that failed for good (a C{5xx},
or still failing once the message is older than C{max_queue_age}) is
reported to the envelope sender in a delivery status notification that the
queue submits to itself, and to the admins in a C{bounce} alert. The
recipients still to be tried are journaled with each change, so a restart
(even after C{kill -9}) tries only those. docs/operations-queue.md describes
all of it for operators.

A message behind a gate (a console send's, see below) is the exception:
no report goes to its sender (a marketing send's From address is not where
bounces are read; the gate's owner hears of them in the outcome and keeps
them), and its bounces raise one C{bounce} alert per gate and
C{gate_bounce_window} (L{DEFAULT_GATE_BOUNCE_WINDOW}): the first at once,
the next ones summed up when the window ends.

The rate is a token bucket on the injected clock: C{rate} tokens a second,
holding at most C{max(1, rate / 10)} (a tenth of a second's worth), so after
an idle spell at most that many messages leave at once and the long-run rate
is never above C{rate}.

Gates and pre-emption
=====================

A queue built with C{gate_of} puts the messages that function names a gate
for behind that gate in the scheduler (the messages of a console send are
behind the gate of the send: L{smtpgw.campaigns.campaign_gate}). A gate is
closed until its owner opens it with L{MessageQueue.open_gate}, giving the
priority it stands for; while open, the queue itself keeps it closed for
as long as messages of a higher priority are waiting or being sent, and for
C{preemption_grace} seconds after the last of them finished
(L{DEFAULT_PREEMPTION_GRACE}), so that a burst of priority-1 messages that
arrive one after another all go before the gate's next message. A closed
gate's messages stay queued; none is handed to the outbound relay. What
keeps an open gate closed is a L{Preemption}; observers
(L{MessageQueue.add_observer}) hear when it changes, and of every message's
outcome. L{MessageQueue.gate_hold} says why a gate's messages wait, for
"why"; the owner names its gate (C{label}) and says why it closed it.

Submitting in two steps (L{MessageQueue.accept}, then
L{MessageQueue.schedule}) lets a caller record that a message is durable
before it can be sent.
"""

from __future__ import annotations

import gc
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

from attrs import define, evolve, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpgw.alerts import AlertThrottle, ThrottleSummary
from smtpgw.dsn import RecipientFailure, build_dsn, should_send_dsn
from smtpgw.interfaces import (
    Alert,
    DeliveryResult,
    IAlertSink,
    IJournal,
    IMessageQueue,
    IOutbound,
    JournalLocation,
    JournalUnavailable,
)
from smtpgw.journal import QueueIdInUse
from smtpgw.model import Envelope, MessageState, Priority, QueueIdGenerator
from smtpgw.outbound import all_deferred
from smtpgw.scheduler import ScheduledEntry, Scheduler

__all__ = [
    "DEFAULT_ALERT_WINDOW",
    "DEFAULT_DELIVERY_ALERT_ATTEMPTS",
    "DEFAULT_GATE_BOUNCE_WINDOW",
    "DEFAULT_MAX_QUEUE_AGE",
    "DEFAULT_PREEMPTION_GRACE",
    "DEFAULT_RECENT_BYTES",
    "DEFAULT_STOP_TIMEOUT",
    "DSN_USERNAME",
    "EXPIRED_STATUS",
    "GATE_CLOSED",
    "MAX_BOUNCE_EXAMPLES",
    "QUEUE_STOPPED",
    "RETRY_BASE",
    "RETRY_JITTER",
    "RETRY_MAX",
    "MessageOutcome",
    "MessageQueue",
    "Preemption",
    "QueueObserver",
    "QueueStats",
    "RecipientOutcomes",
    "RecipientProgress",
    "TokenBucket",
    "jittered",
    "recipient_failure",
    "retry_delay",
    "sort_outcomes",
]

#: The wait before the first retry of a temporary failure, in seconds.
RETRY_BASE = 60.0
#: The longest wait between two attempts, in seconds.
RETRY_MAX = 3600.0
#: Each wait is made up to this share longer or shorter, at random, so that
#: the retries of messages that failed together spread out.
RETRY_JITTER = 0.1
#: How long a message may wait for a recipient that keeps failing
#: temporarily (C{--max-queue-age}), in seconds: 5 days.
DEFAULT_MAX_QUEUE_AGE = 5 * 24 * 3600.0
#: The failed attempt at which a message raises a C{delivery} alert.
DEFAULT_DELIVERY_ALERT_ATTEMPTS = 3
#: One C{delivery} alert per list and destination domain per this many
#: seconds; the others are counted and summed up when it ends.
DEFAULT_ALERT_WINDOW = 3600.0
#: The user name of the bounces the queue submits (their list is that of
#: the message they report on).
DSN_USERNAME = "MAILER-DAEMON"
#: The status of a recipient that still failed when its message expired
#: (RFC 3463: delivery time expired).
EXPIRED_STATUS = "5.4.7"
#: How long stopping waits for deliveries under way, in seconds.
DEFAULT_STOP_TIMEOUT = 30.0


#: Seconds a gate stays closed after the last message of a higher priority
#: than its own finished: longer than the gap between two messages a client
#: on the same network sends one after another, so a burst goes out whole
#: before the gate's next message; short, because the bandwidth sits unused
#: for it (docs/benchmarks.md: 1 s of grace after each of 82 injections cost
#: a send 28 % of its rate, 0.05 s cost it 0.5 %). Raise it for clients far
#: away, whose messages come further apart.
def _kept_size(envelope: Envelope, body: bytes) -> int:
    """
    What keeping a message in memory costs, about: its bytes, its
    recipients and the objects around them.
    """
    return len(body) + sum(len(r) + 64 for r in envelope.recipients) + 512


#: Bytes of recently submitted messages the queue keeps in memory, so that
#: their first attempt does not read them back from the journal (a thread
#: hop, a file read and a checksum per message); the oldest go first.
DEFAULT_RECENT_BYTES = 32 * 1024 * 1024

DEFAULT_PREEMPTION_GRACE = 0.05
#: The bounces of the messages behind one gate (a console send's) raise one
#: C{bounce} alert per this many seconds: the first at once, the others
#: counted and summed up in one alert when the window ends.
DEFAULT_GATE_BOUNCE_WINDOW = 600.0
#: The recipients (with their reasons) a summed-up bounce alert names as
#: examples.
MAX_BOUNCE_EXAMPLES = 5
#: Why the messages behind a gate wait while an admin has stopped the queue.
QUEUE_STOPPED = "queue stopped"
#: Why the messages behind a gate wait when its owner closed it without
#: saying why, or has not opened it yet (at a start).
GATE_CLOSED = "not resumed yet"

# Float sums of clock steps may fall a hair short of a whole token.
_TOKEN_EPSILON = 1e-9

_REPLAYED_STATES = {
    MessageState.QUEUED.value: MessageState.QUEUED,
    # A message being sent at a crash is simply sent again.
    MessageState.SENDING.value: MessageState.QUEUED,
    MessageState.DEFERRED.value: MessageState.DEFERRED,
    MessageState.HELD.value: MessageState.HELD,
}

# What the SMTP client reports of a remote reply: "host:port said: 550 ...
# (in reply to RCPT TO)".
_SAID = re.compile(r"(?P<peer>\S+) said: (?P<reply>.*?)(?: \(in reply to [^()]*\))?", re.DOTALL)
_PORT = re.compile(r":\d+\Z")
_NO_RESULT = "the outbound relay gave no result for this recipient"


def retry_delay(attempts: int) -> float:
    """
    How long to wait after the C{attempts}-th failed attempt, before
    jitter (see L{jittered}): 1 minute after the first, then 2, 4, 8, 16 and
    32 minutes, then every hour (L{RETRY_BASE} doubling up to
    L{RETRY_MAX}). Retrying stops when the message is older than the
    queue's C{max_queue_age} (5 days by default): the recipients still
    failing then bounce.

    @param attempts: the attempts made so far (1 after the first failure).
    """
    if attempts <= 1:
        return RETRY_BASE
    # Past 2**6 the cap applies anyway; the bound keeps the power small.
    return min(RETRY_MAX, RETRY_BASE * 2.0 ** min(attempts - 1, 32))


def jittered(delay: float, draw: float, jitter: float = RETRY_JITTER) -> float:
    """
    C{delay} made up to C{jitter} (a share) shorter or longer.

    @param draw: a number in [0, 1), from a uniform random source: 0 gives
        the shortest wait, 0.5 the delay itself, values near 1 the longest.
    @return: a wait in M{[delay * (1 - jitter), delay * (1 + jitter)]}.
    """
    return delay * (1.0 + jitter * (2.0 * draw - 1.0))


@frozen
class RecipientOutcomes:
    """
    What one attempt did for each recipient it was made for.

    @ivar delivered: recipients that took the message.
    @ivar deferred: (recipient, reason) pairs to try again later.
    @ivar bounced: (recipient, reason) pairs refused for good (C{5xx}).
    @ivar expired: (recipient, last reason) pairs that failed temporarily
        once more after the message had waited longer than allowed: they
        bounce too.
    """

    delivered: tuple[str, ...] = ()
    deferred: tuple[tuple[str, str], ...] = ()
    bounced: tuple[tuple[str, str], ...] = ()
    expired: tuple[tuple[str, str], ...] = ()

    @property
    def failed(self) -> tuple[tuple[str, str], ...]:
        """
        The recipients that failed for good, bounced then expired.
        """
        return self.bounced + self.expired


def sort_outcomes(
    recipients: Sequence[str],
    result: DeliveryResult,
    *,
    age: float,
    max_queue_age: float,
) -> RecipientOutcomes:
    """
    Sort the recipients of an attempt by what became of them, in the order
    of C{recipients}.

    A recipient the result does not mention is deferred (never dropped);
    what the result says of addresses that were not tried is ignored. A
    deferred recipient expires when the message is older than
    C{max_queue_age} (at exactly that age it is still deferred).

    @param recipients: those the attempt was made for.
    @param age: seconds since the message was accepted.
    """
    delivered = set(result.delivered)
    bounced = dict(result.bounced)
    deferred = dict(result.deferred)
    expired = age > max_queue_age
    out_delivered: list[str] = []
    out_deferred: list[tuple[str, str]] = []
    out_bounced: list[tuple[str, str]] = []
    out_expired: list[tuple[str, str]] = []
    for recipient in recipients:
        if recipient in delivered:
            out_delivered.append(recipient)
        elif recipient in bounced:
            out_bounced.append((recipient, bounced[recipient]))
        else:
            reason = deferred.get(recipient, _NO_RESULT)
            (out_expired if expired else out_deferred).append((recipient, reason))
    return RecipientOutcomes(
        tuple(out_delivered), tuple(out_deferred), tuple(out_bounced), tuple(out_expired)
    )


def recipient_failure(
    recipient: str, reason: str, *, expired: bool, last_attempt: float
) -> RecipientFailure:
    """
    How a failed recipient is described in a bounce: a remote reply
    (C{"mx.example.net:25 said: 550 5.1.1 ... (in reply to RCPT TO)"}) gives
    the C{Remote-MTA} and the reply as the diagnostic; any other reason is
    the diagnostic as it is.

    @param expired: the recipient bounced because the message expired: its
        status is L{EXPIRED_STATUS} and the diagnostic is the last reason.
    """
    match = _SAID.fullmatch(reason.strip())
    remote_mta: str | None = None
    diagnostic = reason
    if match is not None:
        remote_mta = _PORT.sub("", match.group("peer")) or None
        diagnostic = match.group("reply")
    return RecipientFailure(
        recipient,
        status=EXPIRED_STATUS if expired else "",
        diagnostic=diagnostic,
        remote_mta=remote_mta,
        last_attempt=last_attempt,
    )


def _bounce_reasons(outcomes: RecipientOutcomes, failed: Sequence[tuple[str, str]]) -> list[str]:
    """
    The reason of each failed recipient as an alert gives it: an expired
    one's says so, with the last reply.
    """
    expired = dict(outcomes.expired)
    return [
        f"{EXPIRED_STATUS} delivery time expired (last reply: {why})" if r in expired else why
        for r, why in failed
    ]


def _duration(seconds: float) -> str:
    """
    A span of time in words: C{"10 minutes"}, C{"45 seconds"}.
    """
    if seconds >= 120:
        minutes = round(seconds / 60)
        return f"{minutes} minutes"
    whole = round(seconds)
    return f"{whole} second{'s' if whole != 1 else ''}"


def _reason(preemption: Preemption | None) -> str | None:
    return None if preemption is None else preemption.reason


def _no_jitter() -> float:
    return 0.5


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


@frozen
class RecipientProgress:
    """
    Where a message stands once some of its recipients are done.

    @ivar remaining: the recipients still to be tried.
    @ivar bounced: the recipients that failed for good (and were reported).
    """

    remaining: tuple[str, ...]
    bounced: tuple[str, ...] = ()


@define
class TokenBucket:
    """
    The gateway-wide rate limit: C{rate} tokens a second, at most
    C{capacity} in store, one token per message. Full at the first use.

    @ivar rate: tokens a second; 0 means no limit.
    """

    rate: float
    capacity: float
    _tokens: float = field(init=False, default=0.0)
    _updated: float | None = field(init=False, default=None)

    @classmethod
    def for_rate(cls, rate: float) -> TokenBucket:
        """
        A bucket for C{rate} messages a second that holds a tenth of a
        second's worth, and at least one.
        """
        if not rate >= 0 or math.isinf(rate):
            raise ValueError(f"rate must be 0 or a positive number, not {rate!r}")
        return cls(rate=rate, capacity=max(1.0, rate / 10.0))

    def _refill(self, now: float) -> None:
        if self._updated is None:
            self._tokens = self.capacity
        else:
            elapsed = max(0.0, now - self._updated)
            self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._updated = now

    def ready(self, now: float) -> bool:
        """
        Whether a token can be taken at C{now}.
        """
        if not self.rate:
            return True
        self._refill(now)
        # At epoch times a float step of the clock is about 2e-7 s: a
        # shortfall worth less than a few of them could never be waited
        # for (the wake-up time would round to now).
        slack = max(_TOKEN_EPSILON, 4.0 * math.ulp(now) * self.rate)
        return self._tokens >= 1.0 - slack

    def take(self, now: float) -> None:
        """
        Take one token (the caller checked L{ready}).
        """
        if self.rate:
            self._refill(now)
            self._tokens -= 1.0

    def next_token_at(self, now: float) -> float:
        """
        When the next whole token will be there.
        """
        if not self.rate:
            return now
        self._refill(now)
        return now + max(0.0, 1.0 - self._tokens) / self.rate


@frozen
class QueueStats:
    """
    The queue's counters, for metrics and the pages.

    @ivar accepted: messages made durable since start (each was answered
        C{250}).
    @ivar unscheduled: accepted messages the scheduler could not take (a
        bug, logged as a failure): they stay journaled as queued and are
        sent after the next restart.
    @ivar refused: submissions the journal refused.
    @ivar delivered: messages that reached every recipient.
    @ivar deferred: attempts after which some recipient was left to retry.
    @ivar bounced: messages done with at least one recipient that failed
        for good.
    @ivar in_flight: deliveries under way.
    @ivar queued_by_priority: messages ready to be sent, per priority.
    @ivar by_state: messages in the scheduler, per state.
    @ivar redelivered: messages found being sent at replay (a crash or a
        stop that did not wait for them): sent again, so possible duplicates.
    @ivar paused: whether dispatching is paused by an admin.
    @ivar dsns: bounces (delivery status notifications) the queue submitted
        to itself.
    @ivar recipients_delivered: recipients that took a message.
    @ivar recipients_bounced: recipients that failed for good, expired
        ones included.
    @ivar recipients_expired: recipients that failed for good because
        their message had waited longer than C{max_queue_age}.
    """

    accepted: int
    unscheduled: int
    refused: int
    delivered: int
    deferred: int
    bounced: int
    redelivered: int
    in_flight: int
    queued_by_priority: Mapping[Priority, int]
    by_state: Mapping[MessageState, int]
    paused: bool
    dsns: int = 0
    recipients_delivered: int = 0
    recipients_bounced: int = 0
    recipients_expired: int = 0


@frozen
class Preemption:
    """
    What keeps an open gate closed: traffic of a higher priority.

    @ivar priority: the highest priority of that traffic.
    @ivar console: whether it is only messages behind gates (another
        console send), rather than SMTP+ mail.
    @ivar until: when it ends by itself, when it is only the grace period
        after the last such message; L{None} while such messages are
        waiting or being sent.
    """

    priority: Priority
    console: bool = False
    until: float | None = None

    @property
    def reason(self) -> str:
        """
        The reason, as the pages show it: C{"priority-1 SMTP+ traffic"}.
        """
        what = "console send" if self.console else "SMTP+ traffic"
        return f"priority-{int(self.priority)} {what}"


@frozen
class MessageOutcome:
    """
    What became of a message after an attempt, or an admin's cancel.

    @ivar state: C{delivered}, C{bounced} (done, some recipient failed for
        good), C{deferred} (some recipients are to be tried again) or
        C{cancelled}.
    @ivar gate: the gate it was behind, or L{None}.
    @ivar delivered: the recipients that took it in this attempt.
    @ivar bounced: the recipients refused for good (C{5xx}) in this attempt.
    @ivar expired: the recipients that failed for good in this attempt
        because the message was too old to try again.
    """

    queue_id: str
    list: str
    state: MessageState
    gate: str | None = None
    delivered: tuple[str, ...] = ()
    bounced: tuple[str, ...] = ()
    expired: tuple[str, ...] = ()


class QueueObserver(Protocol):
    """
    What L{MessageQueue.add_observer} takes. Its methods run on the reactor
    thread, inside the queue's own work: they must return quickly and not
    call back into the queue (schedule such work for later).
    """

    def message_settled(self, outcome: MessageOutcome) -> None:
        """
        A message was delivered, bounced, deferred or cancelled.
        """

    def gate_changed(self, gate: str, preemption: Preemption | None) -> None:
        """
        What keeps an open gate closed changed (L{None}: nothing does).
        """


@define
class _GateControl:
    """
    An owner's wishes for one gate, and the pre-emption seen last.

    @ivar label: what the gate stands for, in words (C{"console send 7"}).
    @ivar closed_because: why the owner closed it, if it said.
    """

    priority: int
    wanted_open: bool
    preemption: Preemption | None = None
    label: str | None = None
    closed_because: str | None = None


@define
class _BounceTally:
    """
    The bounces behind one gate since its last C{bounce} alert.
    """

    label: str
    opened_at: float
    recipients: int = 0
    messages: int = 0
    examples: list[tuple[str, str]] = field(factory=list)
    queue_ids: list[str] = field(factory=list)
    first_at: float | None = None
    last_at: float | None = None

    def add(self, queue_id: str, failed: Sequence[tuple[str, str]], now: float) -> None:
        self.recipients += len(failed)
        self.messages += 1
        room = MAX_BOUNCE_EXAMPLES - len(self.examples)
        if room > 0:
            self.examples.extend(failed[:room])
        if len(self.queue_ids) < MAX_BOUNCE_EXAMPLES:
            self.queue_ids.append(queue_id)
        if self.first_at is None:
            self.first_at = now
        self.last_at = now


@implementer(IMessageQueue)
class MessageQueue(Service):
    """
    The send queue, as a service.

    Starting it replays the journal into the scheduler and starts
    dispatching; stopping it stops dispatching and waits, for at most
    C{stop_timeout} seconds, for the deliveries under way (those not
    finished by then stay journaled and are sent again after a restart).
    L{pause} and L{resume} stop and restart dispatching while mail keeps
    being accepted; both are journaled, so a queue stopped by an admin is
    still stopped after a restart.

    Outcomes are kept per recipient (see the module's description): an
    attempt is made only for the recipients still to be tried, and the
    message is done (C{delivered}, or C{bounced} when any recipient failed
    for good) once none is left.
    """

    _log = Logger()

    def __init__(
        self,
        journal: IJournal,
        outbound: IOutbound,
        clock: IReactorTime,
        rate: float = 0.0,
        concurrency: int = 10,
        *,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        retry: Callable[[int], float] = retry_delay,
        rng: Callable[[], float] | None = None,
        max_queue_age: float = DEFAULT_MAX_QUEUE_AGE,
        alerts: IAlertSink | None = None,
        hostname: str = "localhost",
        queue_ids: QueueIdGenerator | None = None,
        delivery_alert_attempts: int = DEFAULT_DELIVERY_ALERT_ATTEMPTS,
        alert_window: float = DEFAULT_ALERT_WINDOW,
        scheduler: Scheduler | None = None,
        freeze_after_replay: bool = False,
        gate_of: Callable[[Envelope], str | None] | None = None,
        preemption_grace: float = DEFAULT_PREEMPTION_GRACE,
        gate_bounce_window: float = DEFAULT_GATE_BOUNCE_WINDOW,
        recent_bytes: int = DEFAULT_RECENT_BYTES,
        mark_sending: bool = True,
    ) -> None:
        """
        @param journal: where messages are made durable.
        @param outbound: where messages are sent.
        @param clock: the time and the timers of the dispatcher.
        @param rate: messages a second for the whole gateway; 0 is no limit.
        @param concurrency: deliveries under way at once, at least 1.
        @param stop_timeout: seconds stopping waits for deliveries under way.
        @param retry: the wait after the n-th failed attempt, before jitter.
        @param rng: uniform random numbers in [0, 1) for the jitter of
            retries (L{jittered}), such as C{random.random}, which the
            gateway passes; without one, retries are not jittered (exact
            times, for tests and tools).
        @param max_queue_age: seconds after its acceptance past which a
            message's recipients that still fail temporarily bounce
            (C{--max-queue-age}).
        @param alerts: where C{bounce} and C{delivery} alerts go; none are
            raised when L{None}.
        @param hostname: the gateway's host name, the reporting MTA of its
            bounces.
        @param queue_ids: makes the queue ids of the bounces; share the
            generator of the SMTP sessions.
        @param delivery_alert_attempts: the failed attempt at which a message
            raises a C{delivery} alert.
        @param alert_window: see L{DEFAULT_ALERT_WINDOW}.
        @param scheduler: the scheduler to fill; a new one when not given.
        @param freeze_after_replay: call C{gc.freeze()} after the replay (for
            the gateway process; tests keep collecting everything).
        @param gate_of: names the gate a message is behind, if any (see the
            module's description), for submitted and replayed messages.
        @param preemption_grace: see L{DEFAULT_PREEMPTION_GRACE}.
        @param gate_bounce_window: see L{DEFAULT_GATE_BOUNCE_WINDOW}; 0
            raises one alert per bounced message behind a gate.
        @param recent_bytes: see L{DEFAULT_RECENT_BYTES}; 0 keeps none (every
            attempt reads its message from the journal).
        @param mark_sending: journal each attempt as C{sending} before it
            starts, so that after a crash the messages that may have left
            are known and counted as redelivered. L{False} only for an
            outbound from which nothing leaves (C{--relay discard}): there a
            repeated attempt after a crash is no second delivery, and the
            record would be a journal write per message for nothing.
        @raise ValueError: for a concurrency below 1, a C{max_queue_age}
            that is not a positive number, a negative grace or bounce
            window, or a host name that cannot be written in a bounce.
        """
        self._freeze_after_replay = freeze_after_replay
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if not max_queue_age > 0:
            raise ValueError(f"max_queue_age must be a positive number, not {max_queue_age!r}")
        if not 0 <= preemption_grace < math.inf:
            raise ValueError(f"preemption_grace must be 0 or more, not {preemption_grace!r}")
        if not 0 <= gate_bounce_window < math.inf:
            raise ValueError(f"gate_bounce_window must be 0 or more, not {gate_bounce_window!r}")
        _check_hostname(hostname)
        self._journal = journal
        self._outbound = outbound
        self._clock = clock
        self._rate = rate
        self._concurrency = concurrency
        self._bucket = TokenBucket.for_rate(rate)
        self._stop_timeout = stop_timeout
        self._retry = retry
        self._rng = rng if rng is not None else _no_jitter
        self._max_queue_age = max_queue_age
        self._alerts = alerts
        self._hostname = hostname
        self._queue_ids = queue_ids if queue_ids is not None else QueueIdGenerator()
        self._delivery_alert_attempts = delivery_alert_attempts
        self._delivery_alerts = AlertThrottle(alert_window)
        self._gate_bounce_window = gate_bounce_window
        self._gate_bounces = AlertThrottle(gate_bounce_window)
        # The tally of each (list, gate) window open in _gate_bounces.
        self._gate_tallies: dict[tuple[str, str], _BounceTally] = {}
        self._gate_bounce_timer: IDelayedCall | None = None
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        # Only messages some of whose recipients are done have an entry.
        self._progress: dict[str, RecipientProgress] = {}
        self._replayed = False
        self._journal_started = False
        self._paused = False
        # An admin's pause or resume before the journal could record it.
        self._paused_before_start: bool | None = None
        self._in_flight: dict[str, Deferred[None]] = {}
        self._wakeup: IDelayedCall | None = None
        self._dispatching = False
        self._dispatch_again = False
        self._idle_waiters: list[Deferred[None]] = []
        # The messages submitted lately, by queue id, oldest first, as
        # journaled: their first attempt needs no read from the journal.
        self._recent: dict[str, tuple[Envelope, bytes]] = {}
        self._recent_size = 0
        self._recent_bytes = recent_bytes
        self._mark_sending = mark_sending
        self._accepted = 0
        self._unscheduled = 0
        self._refused = 0
        self._delivered = 0
        self._deferred = 0
        self._bounced = 0
        self._redelivered = 0
        self._dsns = 0
        self._recipients_delivered = 0
        self._recipients_bounced = 0
        self._recipients_expired = 0
        self.gate_of = gate_of
        self._grace = preemption_grace
        self._gates: dict[str, _GateControl] = {}
        self._observers: list[QueueObserver] = []
        self._redelivered_by_gate: dict[str, int] = {}
        # Per priority (index 0 unused), for deliveries under way and the
        # time the last one finished: [not behind a gate, behind one].
        self._flying = [[0, 0] for _ in range(6)]
        self._last_done = [[-math.inf, -math.inf] for _ in range(6)]
        self._flight_class: dict[str, tuple[int, int]] = {}

    @property
    def rate(self) -> float:
        """
        Messages a second for the whole gateway; 0 is no limit.
        """
        return self._rate

    @property
    def mark_sending(self) -> bool:
        """
        Whether each attempt is journaled as C{sending} before it starts.
        """
        return self._mark_sending

    @property
    def concurrency(self) -> int:
        """
        Deliveries under way at once, at most.
        """
        return self._concurrency

    @property
    def max_queue_age(self) -> float:
        """
        Seconds a message may wait for recipients that fail temporarily.
        """
        return self._max_queue_age

    def next_token_at(self) -> float | None:
        """
        When the rate limit lets the next message go (now or earlier when a
        token is there), or L{None} when the rate is not limited.
        """
        if not self._rate:
            return None
        return self._bucket.next_token_at(self._clock.seconds())

    # IMessageQueue

    @property
    def accepting(self) -> bool:
        """
        L{False} while the journal says it cannot take mail.
        """
        return bool(self._journal.accepting)

    def accept(self, envelope: Envelope, body: bytes) -> Deferred[JournalLocation]:
        """
        The first half of L{submit}: make the message durable in the
        journal, without scheduling it; L{schedule} does that.

        @return: fires with the message's location once it is durable;
            fails with L{JournalUnavailable}, or with
            L{smtpgw.journal.QueueIdInUse} when a message with its queue id
            is still live in the journal (not counted as refused).
        """

        def refused(failure: Failure) -> Failure:
            if not failure.check(QueueIdInUse):
                self._refused_by_journal(failure)
            return failure

        return self._journal.accept(envelope, body).addErrback(refused)

    def schedule(self, envelope: Envelope, location: JournalLocation) -> None:
        """
        The second half of L{submit}: schedule a message L{accept} made
        durable (behind its gate, if it has one).
        """
        self._accepted_by_journal(location, envelope)

    def submit(self, envelope: Envelope, body: bytes) -> Deferred[None]:
        """
        Journal the message, then schedule it.

        @return: fires once the message is durable (the client may then be
            answered C{250}); fails with L{JournalUnavailable} when the
            journal refuses it. Once the message is durable, nothing fails
            the L{Deferred}: should scheduling fail, that is logged and
            counted (L{QueueStats.unscheduled}), and the message, journaled
            as queued, is sent after the next restart. Failing it would
            make the client send the message again: a duplicate.
        """
        # From a session: announced (see smtpgw.journal.FileJournal.accept).
        return self._journal.accept(envelope, body, announced=True).addCallbacks(
            self._submitted, self._refused_by_journal, callbackArgs=(envelope, body)
        )

    def _submitted(self, location: JournalLocation, envelope: Envelope, body: bytes) -> None:
        self._remember(envelope, body)
        self._accepted_by_journal(location, envelope)

    def _remember(self, envelope: Envelope, body: bytes) -> None:
        """
        Keep a message just made durable for its first attempt, within
        L{DEFAULT_RECENT_BYTES} of body, recipients and bookkeeping
        (forgetting the oldest first). Nothing is kept while the queue is
        paused: no attempt comes soon.
        """
        if self._paused:
            return
        size = _kept_size(envelope, body)
        if size > self._recent_bytes:
            return
        recent = self._recent
        while recent and self._recent_size + size > self._recent_bytes:
            oldest = next(iter(recent))
            self._recent_size -= _kept_size(*recent.pop(oldest))
        recent[envelope.queue_id] = (envelope, body)
        self._recent_size += size

    def _recall(self, queue_id: str) -> tuple[Envelope, bytes] | None:
        kept = self._recent.pop(queue_id, None)
        if kept is not None:
            self._recent_size -= _kept_size(*kept)
        return kept

    def _accepted_by_journal(self, location: JournalLocation, envelope: Envelope) -> None:
        self._accepted += 1
        self._schedule(envelope, location)

    def _schedule(self, envelope: Envelope, location: JournalLocation) -> None:
        try:
            entry = ScheduledEntry(
                queue_id=envelope.queue_id,
                priority=envelope.priority,
                list=envelope.list,
                location=location,
            )
            gate = None if self.gate_of is None else self.gate_of(envelope)
            if gate is None:
                self.scheduler.add(entry)
            else:
                self.scheduler.add(entry, gate)
        except Exception:
            self._unscheduled += 1
            self._log.failure(
                "{queue_id} is durable but could not be scheduled: it stays journaled"
                " and is sent after the next restart",
                queue_id=envelope.queue_id,
            )
            return
        try:
            self._dispatch()
        except Exception:
            self._log.failure(
                "dispatching failed after accepting {queue_id}", queue_id=envelope.queue_id
            )

    def _refused_by_journal(self, failure: Failure) -> Failure:
        if failure.check(JournalUnavailable):
            self._refused += 1
            self._log.warn("journal refused a message: {reason}", reason=failure.getErrorMessage())
        return failure

    # Service

    def startService(self) -> None:
        """
        Replay the journal and start it (at the first start), then start
        dispatching, unless an admin had stopped the queue.
        """
        super().startService()
        if not self._replayed:
            self._replayed = True
            if self._freeze_after_replay:
                # Millions of replayed entries live as long as the process:
                # collecting while they are made only walks them again and
                # again, and afterwards they are kept out of every walk.
                gc.disable()
                try:
                    self._replay()
                finally:
                    gc.enable()
                gc.freeze()
            else:
                self._replay()
            self._journal.start()
            self._journal_started = True
            self._take_up_pause()
        self._dispatch()

    def _take_up_pause(self) -> None:
        journaled = bool(self._journal.queue_paused)
        wanted, self._paused_before_start = self._paused_before_start, None
        if wanted is None:
            self._paused = journaled
            if journaled:
                self._log.info("the queue stays stopped, as an admin left it; mail is kept")
        elif wanted != journaled:
            self._record_pause().addErrback(self._pause_not_recorded)

    def _pause_not_recorded(self, failure: Failure) -> None:
        self._log.warn(
            "could not journal that the queue is {state}: {reason}",
            state="stopped" if self._paused else "running",
            reason=failure.getErrorMessage(),
        )

    def stopService(self) -> Deferred[None]:
        """
        Stop dispatching, let the deliveries under way finish (for at most
        C{stop_timeout} seconds), then flush and close the journal; fires
        once that is done.
        """
        super().stopService()
        self._cancel_wakeup()

        def stop_journal(_: None) -> Deferred[None]:
            self._raise_summaries(self._delivery_alerts.flush())
            self._flush_gate_bounces()
            return self._journal.stop()

        return self._drain().addCallback(stop_journal)

    def _drain(self) -> Deferred[None]:
        if not self._in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)

        def give_up() -> None:
            if d in self._idle_waiters:
                self._idle_waiters.remove(d)
                self._log.warn(
                    "stopped with {count} deliveries still under way; they will be sent again",
                    count=len(self._in_flight),
                )
                d.callback(None)

        timer = self._clock.callLater(self._stop_timeout, give_up)

        def stop_timer(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        return d.addCallback(stop_timer)

    # Admin

    @property
    def paused(self) -> bool:
        """
        Whether an admin stopped dispatching.
        """
        return self._paused

    def pause(self) -> Deferred[None]:
        """
        Stop handing messages to the outbound relay (deliveries under way
        finish); mail is still accepted and kept. The pause is journaled,
        so the queue is still stopped after a restart.

        @return: fires once the pause is durable; fails with
            L{JournalUnavailable} when the journal could not record it (the
            queue is stopped all the same, until a restart).
        """
        if not self._paused:
            self._paused = True
            self._cancel_wakeup()
            self._log.info("queue paused")
        return self._record_pause()

    def resume(self) -> Deferred[None]:
        """
        Start dispatching again after L{pause}, and journal it.

        @return: as for L{pause}.
        """
        was_paused, self._paused = self._paused, False
        d = self._record_pause()
        if was_paused:
            self._log.info("queue resumed")
            self._dispatch()
        return d

    def _record_pause(self) -> Deferred[None]:
        # Recorded even when nothing changed: after a write that failed,
        # saying it again is how an admin makes it durable.
        if not self._journal_started:
            # The journal takes records once started: then the replayed
            # state gives way to this one.
            self._paused_before_start = self._paused
            return succeed(None)
        return self._journal.record_queue_state(self._paused)

    def get(self, queue_id: str) -> ScheduledEntry | None:
        """
        The scheduled message with this queue id, or L{None}.
        """
        return self.scheduler.get(queue_id)

    def progress(self, queue_id: str) -> RecipientProgress | None:
        """
        The recipients a scheduled message still waits for and those that
        bounced, once some are done; L{None} while every recipient of its
        envelope is still to be tried (or for an unknown message).
        """
        return self._progress.get(queue_id)

    def entries(self) -> Iterator[ScheduledEntry]:
        """
        Every scheduled message (for listings).
        """
        return self.scheduler.entries()

    def hold(self, queue_id: str) -> Deferred[None]:
        """
        Keep a waiting message from being sent until released.

        @return: fires once journaled; fails with
            L{smtpgw.scheduler.UnknownMessage} or
            L{smtpgw.scheduler.InvalidTransition}.
        """
        return self._admin(queue_id, self.scheduler.hold)

    def release(self, queue_id: str) -> Deferred[None]:
        """
        Make a held (or deferred) message ready now.
        """
        return self._admin(queue_id, self.scheduler.release)

    def cancel(self, queue_id: str) -> Deferred[None]:
        """
        Drop a message that is not being sent; it is never delivered (to
        the recipients it still waited for).
        """
        entry = self.scheduler.get(queue_id)
        gate = self.scheduler.gate_of(queue_id)
        d = self._admin(queue_id, self.scheduler.cancel, MessageState.CANCELLED)
        if entry is not None and queue_id not in self.scheduler:
            self._progress.pop(queue_id, None)
            self._recall(queue_id)
            self._tell(MessageOutcome(queue_id, entry.list, MessageState.CANCELLED, gate))
        return d

    def reprioritize(self, queue_id: str, priority: Priority | int) -> Deferred[None]:
        """
        Change a message's priority; the change is journaled, so replay
        gives the message its new priority.

        @return: fires once journaled; fails with
            L{smtpgw.scheduler.UnknownMessage}, or L{ValueError} for a
            priority outside 1..5.
        """
        try:
            new = Priority(priority)
            self.scheduler.reprioritize(queue_id, new)
        except (KeyError, ValueError):
            return fail()
        self._log.info(
            "{queue_id} re-prioritized to {priority}", queue_id=queue_id, priority=int(new)
        )
        d: Deferred[None] = self._journal.reprioritize(queue_id, new)
        self._dispatch()
        return d

    def stats(self) -> QueueStats:
        """
        The counters, now.
        """
        return QueueStats(
            accepted=self._accepted,
            unscheduled=self._unscheduled,
            refused=self._refused,
            delivered=self._delivered,
            deferred=self._deferred,
            bounced=self._bounced,
            redelivered=self._redelivered,
            in_flight=len(self._in_flight),
            queued_by_priority=self.scheduler.ready_by_priority(),
            by_state=self.scheduler.counts_by_state(),
            paused=self._paused,
            dsns=self._dsns,
            recipients_delivered=self._recipients_delivered,
            recipients_bounced=self._recipients_bounced,
            recipients_expired=self._recipients_expired,
        )

    def _admin(
        self,
        queue_id: str,
        change: Callable[[str], object],
        final: MessageState | None = None,
    ) -> Deferred[None]:
        try:
            change(queue_id)
        except (KeyError, ValueError):
            return fail()
        entry = self.scheduler.get(queue_id)
        state = final if final is not None else entry.state if entry else MessageState.CANCELLED
        self._log.info("{queue_id} is now {state}", queue_id=queue_id, state=state.value)
        # Journal the change before any dispatch, so that a delivery it
        # allows is recorded after it.
        d = self._journal.record_state(
            queue_id,
            state.value,
            entry.attempts if entry else 0,
            entry.next_attempt_at if entry else 0.0,
        )
        self._dispatch()
        return d

    # Gates and observers

    def add_observer(self, observer: QueueObserver) -> None:
        """
        Tell C{observer} of every message's outcome and of the changes of
        what keeps open gates closed.
        """
        self._observers.append(observer)

    def remove_observer(self, observer: QueueObserver) -> None:
        """
        Stop telling C{observer}.
        """
        if observer in self._observers:
            self._observers.remove(observer)

    def open_gate(self, gate: str, priority: Priority | int, *, label: str | None = None) -> None:
        """
        Let the messages behind C{gate} go, at the turn of C{priority}:
        while messages of a higher priority need the bandwidth (and for the
        grace period after), the queue keeps the gate closed by itself.

        @param label: what the gate stands for, in words (C{"console send
            7"}), for "why" and alerts (see L{gate_label}); L{None} keeps
            the one given before.
        """
        control = self._gates.get(gate)
        number = int(Priority(priority))
        if control is None:
            self._gates[gate] = _GateControl(number, True, label=label)
        else:
            control.priority = number
            control.wanted_open = True
            control.closed_because = None
            if label is not None:
                control.label = label
        self._dispatch()

    def close_gate(
        self, gate: str, reason: str | None = None, *, label: str | None = None
    ) -> None:
        """
        Keep the messages behind C{gate} from being sent (those under way
        finish) until L{open_gate}.

        @param reason: why, in words (C{"paused by an admin"}), for
            L{gate_hold}.
        @param label: as for L{open_gate}.
        """
        control = self._gates.get(gate)
        if control is None:
            self._gates[gate] = _GateControl(
                int(Priority.NORMAL), False, label=label, closed_because=reason
            )
        else:
            control.wanted_open = False
            control.closed_because = reason
            if label is not None:
                control.label = label
            if control.preemption is not None:
                control.preemption = None
                self._tell_gate(gate, None)
        self.scheduler.close_gate(gate)

    def gate_label(self, gate: str) -> str:
        """
        What C{gate} stands for, in words, as its owner named it; the
        gate's name when it did not.
        """
        control = self._gates.get(gate)
        if control is None or control.label is None:
            return gate
        return control.label

    def gate_hold(self, gate: str) -> str | None:
        """
        Why none of the messages behind C{gate} is sent now, in words, or
        L{None} when they go in their turn. The first that applies of: its
        owner closed it (with the reason it gave, or L{GATE_CLOSED}); an
        admin stopped the queue (L{QUEUE_STOPPED}); traffic of a higher
        priority pre-empts it (the L{Preemption}'s reason).
        """
        control = self._gates.get(gate)
        if control is None or not control.wanted_open:
            if control is not None and control.closed_because is not None:
                return control.closed_because
            return GATE_CLOSED
        if self._paused:
            return QUEUE_STOPPED
        preemption = self._preemption(control.priority, self._clock.seconds())
        return None if preemption is None else preemption.reason

    def forget_gate(self, gate: str) -> None:
        """
        Drop what is known of C{gate} (its owner is done with it); it is
        closed, as every gate nobody opened.
        """
        self._gates.pop(gate, None)
        self.scheduler.close_gate(gate)

    def gate_is_open(self, gate: str) -> bool:
        """
        Whether the messages behind C{gate} may be handed out now.
        """
        return self.scheduler.is_open(gate)

    def gated(self, gate: str) -> list[ScheduledEntry]:
        """
        The messages behind C{gate} in the scheduler, in any state.
        """
        entries = (self.scheduler.get(q) for q in self.scheduler.gated(gate))
        return [e for e in entries if e is not None]

    def gates(self) -> set[str]:
        """
        The gates that have messages behind them.
        """
        return self.scheduler.gates()

    def redelivered_in(self, gate: str) -> int:
        """
        How many messages behind C{gate} the replay found being sent (after
        a crash, or a stop that did not wait for them): they are sent
        again, so their recipients may get them twice.
        """
        return self._redelivered_by_gate.get(gate, 0)

    def preemption(self, priority: Priority | int) -> Preemption | None:
        """
        What would keep a gate of this priority closed now, if anything.
        """
        return self._preemption(int(Priority(priority)), self._clock.seconds())

    def _preemption(self, priority: int, now: float) -> Preemption | None:
        scheduler = self.scheduler
        for higher in range(1, priority):
            ready = scheduler.ready_count(higher)
            gated, _ = scheduler.ready_behind_gates(higher)
            plain_flying, gated_flying = self._flying[higher]
            if ready - gated or plain_flying:
                return Preemption(Priority(higher))
            if gated or gated_flying:
                return Preemption(Priority(higher), console=True)
            plain_done, gated_done = self._last_done[higher]
            until = max(plain_done, gated_done) + self._grace
            if now < until:
                return Preemption(Priority(higher), plain_done + self._grace <= now, until)
        return None

    def _update_gates(self, now: float) -> float | None:
        """
        Open or close the gates their owners opened, as the traffic of
        higher priorities says.

        @return: when a gate kept closed only by a grace period may open.
        """
        change_at: float | None = None
        # Higher priorities first: their gates' traffic counts for the others.
        for gate, control in sorted(self._gates.items(), key=lambda item: item[1].priority):
            preemption = None
            if control.wanted_open:
                preemption = self._preemption(control.priority, now)
            if preemption is None and control.wanted_open:
                self.scheduler.open_gate(gate)
            else:
                self.scheduler.close_gate(gate)
            until = None if preemption is None else preemption.until
            if until is not None and (change_at is None or until < change_at):
                change_at = until
            before, control.preemption = control.preemption, preemption
            if _reason(before) != _reason(preemption):
                self._tell_gate(gate, preemption)
        return change_at

    def _tell(self, outcome: MessageOutcome) -> None:
        for observer in list(self._observers):
            try:
                observer.message_settled(outcome)
            except Exception:
                self._log.failure(
                    "an observer failed on the outcome of {queue_id}", queue_id=outcome.queue_id
                )

    def _tell_gate(self, gate: str, preemption: Preemption | None) -> None:
        for observer in list(self._observers):
            try:
                observer.gate_changed(gate, preemption)
            except Exception:
                self._log.failure("an observer failed on a change of gate {gate}", gate=gate)

    # Dispatching

    def _replay(self) -> None:
        counts: dict[str, int] = {}
        for message in self._journal.replay():
            queue_id = message.envelope.queue_id
            state = _REPLAYED_STATES.get(message.state)
            if state is None or queue_id in self.scheduler:
                continue
            gate = None if self.gate_of is None else self.gate_of(message.envelope)
            entry = ScheduledEntry(
                queue_id=queue_id,
                priority=message.envelope.priority,
                list=message.envelope.list,
                location=message.location,
                state=state,
                attempts=message.attempts,
                next_attempt_at=message.next_attempt_at,
            )
            try:
                if gate is None:
                    self.scheduler.add(entry)
                else:
                    self.scheduler.add(entry, gate)
            except ValueError:
                self._log.failure(
                    "cannot schedule journaled message {queue_id}", queue_id=queue_id
                )
                continue
            if message.remaining is not None:
                self._progress[queue_id] = RecipientProgress(message.remaining, message.bounced)
            counts[state.value] = counts.get(state.value, 0) + 1
            if message.state == MessageState.SENDING.value:
                self._redelivered += 1
                if gate is not None:
                    self._redelivered_by_gate[gate] = self._redelivered_by_gate.get(gate, 0) + 1
        self._log.info(
            "replayed {total} journaled messages {counts}",
            total=sum(counts.values()),
            counts=counts,
        )
        if self._redelivered:
            self._log.warn(
                "{count} messages were being delivered when the gateway stopped without "
                "finishing; they are sent again and may arrive twice",
                count=self._redelivered,
            )

    def _dispatch(self) -> None:
        # A delivery that finishes at once calls back in here: loop instead
        # of recursing.
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            self._dispatch_again = True
            while self._dispatch_again:
                self._dispatch_again = False
                self._fill()
        finally:
            self._dispatching = False

    def _fill(self) -> None:
        gates_change_at = self._update_gates(self._clock.seconds()) if self._gates else None
        if not self.running or self._paused:
            return
        while len(self._in_flight) < self._concurrency:
            now = self._clock.seconds()
            if not self.scheduler.has_ready(now):
                due = self.scheduler.next_wakeup(now)
                if gates_change_at is not None and (due is None or gates_change_at < due):
                    due = gates_change_at
                if due is not None:
                    self._wake_at(due)
                return
            if not self._bucket.ready(now):
                self._wake_at(self._bucket.next_token_at(now))
                return
            entry = self.scheduler.pop_ready(now)
            assert entry is not None
            self._bucket.take(now)
            self._start(entry)

    def _wake_at(self, when: float) -> None:
        wakeup = self._wakeup
        if wakeup is not None and wakeup.active():
            if wakeup.getTime() <= when:
                return
            wakeup.cancel()
        delay = max(0.0, when - self._clock.seconds())
        self._wakeup = self._clock.callLater(delay, self._woken)

    def _woken(self) -> None:
        self._wakeup = None
        self._dispatch()

    def _cancel_wakeup(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None and wakeup.active():
            wakeup.cancel()

    def _start(self, entry: ScheduledEntry) -> None:
        queue_id = entry.queue_id
        kind = (int(entry.priority), 0 if self.scheduler.gate_of(queue_id) is None else 1)
        self._flight_class[queue_id] = kind
        self._flying[kind[0]][kind[1]] += 1
        d = ensureDeferred(self._attempt(entry))
        if not d.called:
            self._in_flight[queue_id] = d
        d.addErrback(
            lambda f: self._log.failure("delivery of {queue_id} failed", f, queue_id=queue_id)
        )
        d.addBoth(self._finished, queue_id)

    def _finished(self, _: object, queue_id: str) -> None:
        kind = self._flight_class.pop(queue_id, None)
        if kind is not None:
            self._flying[kind[0]][kind[1]] -= 1
            self._last_done[kind[0]][kind[1]] = self._clock.seconds()
        self._in_flight.pop(queue_id, None)
        if not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        self._dispatch()

    async def _attempt(self, entry: ScheduledEntry) -> None:
        kept = self._recall(entry.queue_id)
        try:
            original, body = kept if kept is not None else await self._journal.read(entry.location)
        except Exception:
            self._log.failure("cannot read {queue_id} from the journal", queue_id=entry.queue_id)
            await self._retry_unread(entry)
            return
        if original.priority != entry.priority:
            original = evolve(original, priority=entry.priority)
        progress = self._progress.get(entry.queue_id)
        envelope = original
        if progress is not None:
            envelope = evolve(original, recipients=progress.remaining)
        # Journaled before the attempt, so that after a crash the messages
        # that may have gone out already are known and counted.
        if self._mark_sending:
            await self._record(entry.queue_id, MessageState.SENDING, entry.attempts)
        result = DeliveryResult()
        if envelope.recipients:
            try:
                result = await self._outbound.deliver(envelope, body)
            except Exception:
                self._log.failure("outbound failed on {queue_id}", queue_id=entry.queue_id)
                result = all_deferred(envelope.recipients, "internal error")
        await self._settle(entry, original, envelope.recipients, body, result)

    async def _retry_unread(self, entry: ScheduledEntry) -> None:
        attempts = entry.attempts + 1
        next_attempt_at = self._next_attempt_at(attempts)
        await self._record(entry.queue_id, MessageState.DEFERRED, attempts, next_attempt_at)
        gate = self.scheduler.gate_of(entry.queue_id)
        self.scheduler.defer(entry.queue_id, next_attempt_at, attempts)
        self._deferred += 1
        self._tell(MessageOutcome(entry.queue_id, entry.list, MessageState.DEFERRED, gate))

    def _next_attempt_at(self, attempts: int) -> float:
        return self._clock.seconds() + jittered(self._retry(attempts), self._rng())

    async def _settle(
        self,
        entry: ScheduledEntry,
        original: Envelope,
        tried: tuple[str, ...],
        body: bytes,
        result: DeliveryResult,
    ) -> None:
        queue_id = entry.queue_id
        now = self._clock.seconds()
        attempts = entry.attempts + 1
        before = self._progress.get(queue_id)
        gate = self.scheduler.gate_of(queue_id)
        outcomes = sort_outcomes(
            tried,
            result,
            age=now - original.accepted_at,
            max_queue_age=self._max_queue_age,
        )
        failed = outcomes.failed
        deferred = outcomes.deferred
        dsn: str | None = None
        # Fires once an unhurried outcome is durable (or could not be).
        durable: Deferred[None] | None = None
        # Behind a gate, the gate's owner hears of the failures (the
        # outcome) and keeps them: a console send marks its recipients
        # bounced, and no report goes to its From address.
        if failed and gate is None:
            reported, dsn = await self._report(original, body, outcomes, now)
            if not reported:
                # Tried again later, so that the bounce is not lost.
                deferred += failed
                failed = ()
        bounced = (before.bounced if before else ()) + tuple(r for r, _ in failed)
        waiting = {r for r, _ in deferred}
        remaining = tuple(r for r in tried if r in waiting)
        fields = {
            "queue_id": queue_id,
            "list": entry.list,
            "priority": int(entry.priority),
            "attempts": attempts,
            "delivered": len(outcomes.delivered),
            "bounced": len(failed),
            "deferred": len(remaining),
        }
        self._recipients_delivered += len(outcomes.delivered)
        self._recipients_bounced += len(failed)
        expired = dict(outcomes.expired)
        self._recipients_expired += sum(1 for r, _ in failed if r in expired)
        if remaining:
            next_attempt_at = self._next_attempt_at(attempts)
            self._log.info(
                "deferred {queue_id} (attempt {attempts}, next at {next_attempt_at}): {reasons}",
                next_attempt_at=next_attempt_at,
                reasons="; ".join(f"{r}: {why}" for r, why in deferred),
                **fields,
            )
            progress = RecipientProgress(remaining, bounced)
            if progress == before or (before is None and remaining == original.recipients):
                await self._record(queue_id, MessageState.DEFERRED, attempts, next_attempt_at)
            else:
                await self._record(
                    queue_id, MessageState.DEFERRED, attempts, next_attempt_at, progress
                )
                self._progress[queue_id] = progress
            self.scheduler.defer(queue_id, next_attempt_at, attempts)
            self._deferred += 1
            self._delivery_alert(original, deferred, attempts, next_attempt_at, now)
            state = MessageState.DEFERRED
        else:
            state = MessageState.BOUNCED if bounced else MessageState.DELIVERED
            self._log.info("{state} {queue_id}", state=state.value, **fields)
            if bounced:
                # Lost in a crash, a bounce would be reported again.
                await self._record(queue_id, state, attempts)
            else:
                # Nothing waits for a delivery to be durable: lost in a
                # crash, it is an attempt made again (counted when
                # "sending" was recorded), so it costs no group commit of
                # its own. Observers hear of it once it is durable.
                durable = self._record_unhurried(queue_id, state, attempts)
            self.scheduler.complete(queue_id)
            self._progress.pop(queue_id, None)
            if bounced:
                self._bounced += 1
            else:
                self._delivered += 1
        if failed and gate is not None:
            self._gate_bounce_alert(original, gate, outcomes, failed, now)
        elif failed:
            self._bounce_alert(original, outcomes, failed, dsn, now)
        failed_now = {r for r, _ in failed}
        outcome = MessageOutcome(
            queue_id,
            entry.list,
            state,
            gate,
            outcomes.delivered,
            tuple(r for r, _ in outcomes.bounced if r in failed_now),
            tuple(r for r, _ in outcomes.expired if r in failed_now),
        )
        if durable is None:
            self._tell(outcome)
        else:
            durable.addCallback(lambda _: self._tell(outcome))

    async def _report(
        self, original: Envelope, body: bytes, outcomes: RecipientOutcomes, now: float
    ) -> tuple[bool, str | None]:
        """
        Submit the bounce about the recipients of C{outcomes} that failed
        for good, when one is due.

        @return: whether the failures may be taken as reported (the bounce
            is durable, or none is due or possible), and the queue id of
            the bounce.
        """
        if not should_send_dsn(original, body):
            return True, None
        expired = dict(outcomes.expired)
        failures = [
            recipient_failure(r, why, expired=r in expired, last_attempt=now)
            for r, why in outcomes.failed
        ]
        queue_id = self._queue_ids.next(now)
        try:
            report = build_dsn(
                envelope=original,
                original=body,
                failures=failures,
                reporting_mta=self._hostname,
                arrival_date=original.accepted_at,
                now=now,
                kind="failed",
                message_id=f"<{queue_id}@{self._hostname}>",
            )
        except ValueError as e:
            self._log.warn(
                "no bounce for {queue_id}: {reason}", queue_id=original.queue_id, reason=str(e)
            )
            return True, None
        envelope = Envelope(
            queue_id=queue_id,
            list=original.list,
            username=DSN_USERNAME,
            sender="",
            recipients=(original.sender,),
            priority=original.priority,
            accepted_at=now,
            size=len(report),
        )
        try:
            location = await self._journal.accept(envelope, report)
        except JournalUnavailable as e:
            self._log.warn(
                "could not queue the bounce for {queue_id} ({reason}): its failed"
                " recipients are tried again later",
                queue_id=original.queue_id,
                reason=str(e),
            )
            return False, None
        self._dsns += 1
        self._log.info(
            "bounce {dsn} queued for {queue_id} to <{sender}>",
            dsn=queue_id,
            queue_id=original.queue_id,
            sender=original.sender,
        )
        self._schedule(envelope, location)
        return True, queue_id

    def _bounce_alert(
        self,
        original: Envelope,
        outcomes: RecipientOutcomes,
        failed: tuple[tuple[str, str], ...],
        dsn: str | None,
        now: float,
    ) -> None:
        expired = dict(outcomes.expired)
        reasons = _bounce_reasons(outcomes, failed)
        count = len(failed)
        self._raise(
            Alert(
                type="bounce",
                message=(
                    f"{count} recipient{'s' if count != 1 else ''} of message"
                    f" {original.queue_id} from <{original.sender}> failed for good:"
                    f" {reasons[0]}"
                ),
                created_at=now,
                list=original.list,
                details={
                    "queue_id": original.queue_id,
                    "username": original.username,
                    "sender": original.sender,
                    "recipients": [r for r, _ in failed],
                    "reasons": reasons,
                    "expired": [r for r, _ in failed if r in expired],
                    "dsn_queue_id": dsn,
                },
            )
        )

    def _gate_bounce_alert(
        self,
        original: Envelope,
        gate: str,
        outcomes: RecipientOutcomes,
        failed: tuple[tuple[str, str], ...],
        now: float,
    ) -> None:
        """
        Count the failures of a message behind C{gate}: the first of a
        window raises a C{bounce} alert at once, the others are summed up
        in one when it ends (see L{DEFAULT_GATE_BOUNCE_WINDOW}).
        """
        self._sum_up_gate_bounces(now)
        failures = tuple(
            zip((r for r, _ in failed), _bounce_reasons(outcomes, failed), strict=True)
        )
        key = (original.list, gate)
        window = _BounceTally(self.gate_label(gate), now)
        if self._gate_bounces.admit(key, now, payload=window):
            self._gate_tallies[key] = window
            first = _BounceTally(window.label, now)
            first.add(original.queue_id, failures, now)
            self._raise(self._first_gate_bounce(original, gate, first, now))
        else:
            tally = self._gate_tallies.get(key)
            if tally is not None:
                tally.add(original.queue_id, failures, now)
        # Admitting may have summed up the oldest window early.
        self._sum_up_gate_bounces(now, reopen=False)

    def _first_gate_bounce(
        self, original: Envelope, gate: str, tally: _BounceTally, now: float
    ) -> Alert:
        recipient, reason = tally.examples[0]
        what = (
            f"recipient {recipient} bounced"
            if tally.recipients == 1
            else f"{tally.recipients} recipients bounced ({recipient})"
        )
        return Alert(
            type="bounce",
            message=(
                f"{tally.label} (list {original.list}): {what}: {reason}"
                + (
                    f"; its next bounces are summed up every {_duration(self._gate_bounce_window)}"
                    if self._gate_bounce_window > 0
                    else ""
                )
            ),
            created_at=now,
            list=original.list,
            details={
                **self._gate_bounce_details(gate, tally),
                "username": original.username,
                "sender": original.sender,
            },
        )

    def _gate_bounce_summary(
        self, list_: str, gate: str, tally: _BounceTally, now: float
    ) -> Alert:
        count = tally.recipients
        return Alert(
            type="bounce",
            message=(
                f"{tally.label} (list {list_}): {count} more recipient"
                f"{'s' if count != 1 else ''} bounced in the last"
                f" {_duration(now - tally.opened_at)}"
            ),
            created_at=now,
            list=list_,
            details=self._gate_bounce_details(gate, tally),
        )

    def _gate_bounce_details(self, gate: str, tally: _BounceTally) -> dict[str, object]:
        return {
            "gate": gate,
            "count": tally.recipients,
            "messages": tally.messages,
            "recipients": [r for r, _ in tally.examples],
            "reasons": [why for _, why in tally.examples],
            "queue_ids": list(tally.queue_ids),
            "first_at": tally.first_at,
            "last_at": tally.last_at,
            "window": self._gate_bounce_window,
        }

    def _sum_up_gate_bounces(self, now: float, *, reopen: bool = True) -> None:
        """
        Raise one C{bounce} alert for each window of gate bounces that
        ended with bounces held back. With C{reopen}, that alert opens the
        gate's next window, so that a steady stream of bounces gives one
        alert per window.
        """
        for summary in self._gate_bounces.ended(now):
            tally = summary.payload
            assert isinstance(tally, _BounceTally)
            if self._gate_tallies.get(summary.key) is tally:
                del self._gate_tallies[summary.key]
            list_, gate = summary.key
            self._raise(self._gate_bounce_summary(list_, gate, tally, now))
            if reopen:
                window = _BounceTally(tally.label, now)
                if self._gate_bounces.admit(summary.key, now, payload=window):
                    self._gate_tallies[summary.key] = window
        # Windows that ended with nothing held back give no summary.
        over = [k for k, t in self._gate_tallies.items() if self._window_over(t, now)]
        for key in over:
            del self._gate_tallies[key]
        self._arm_gate_bounce_timer(now)

    def _window_over(self, tally: _BounceTally, now: float) -> bool:
        return now >= tally.opened_at + self._gate_bounce_window

    def _arm_gate_bounce_timer(self, now: float) -> None:
        next_end = self._gate_bounces.next_end()
        timer = self._gate_bounce_timer
        if timer is not None and timer.active():
            if next_end is not None and timer.getTime() == next_end:
                return
            timer.cancel()
        self._gate_bounce_timer = None
        if next_end is not None:
            self._gate_bounce_timer = self._clock.callLater(
                max(0.0, next_end - now), self._gate_bounce_timer_fired
            )

    def _gate_bounce_timer_fired(self) -> None:
        self._gate_bounce_timer = None
        self._sum_up_gate_bounces(self._clock.seconds())

    def _flush_gate_bounces(self) -> None:
        timer, self._gate_bounce_timer = self._gate_bounce_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        now = self._clock.seconds()
        for summary in self._gate_bounces.flush():
            tally = summary.payload
            assert isinstance(tally, _BounceTally)
            list_, gate = summary.key
            self._raise(self._gate_bounce_summary(list_, gate, tally, now))
        self._gate_tallies.clear()

    def _delivery_alert(
        self,
        original: Envelope,
        deferred: tuple[tuple[str, str], ...],
        attempts: int,
        next_attempt_at: float,
        now: float,
    ) -> None:
        self._raise_summaries(self._delivery_alerts.ended(now))
        if attempts != self._delivery_alert_attempts:
            return
        by_domain: dict[str, list[tuple[str, str]]] = {}
        for recipient, why in deferred:
            by_domain.setdefault(_domain(recipient), []).append((recipient, why))
        for domain, pairs in by_domain.items():
            if not self._delivery_alerts.admit((original.list, domain), now):
                continue
            self._raise(
                Alert(
                    type="delivery",
                    message=(
                        f"message {original.queue_id} to {domain or 'a local address'} was"
                        f" deferred {attempts} times: {pairs[0][1]}"
                    ),
                    created_at=now,
                    list=original.list,
                    details={
                        "queue_id": original.queue_id,
                        "domain": domain,
                        "attempts": attempts,
                        "recipients": [r for r, _ in pairs],
                        "reasons": [why for _, why in pairs],
                        "next_attempt_at": next_attempt_at,
                    },
                )
            )

    def _raise_summaries(self, summaries: list[ThrottleSummary]) -> None:
        for summary in summaries:
            list_, domain = summary.key
            self._raise(
                Alert(
                    type="delivery",
                    message=(
                        f"{summary.suppressed} more message"
                        f"{'s' if summary.suppressed != 1 else ''} of list {list_} to"
                        f" {domain or 'a local address'} were deferred"
                        f" {self._delivery_alert_attempts} times"
                    ),
                    created_at=self._clock.seconds(),
                    list=list_,
                    details={
                        "domain": domain,
                        "attempts": self._delivery_alert_attempts,
                        "suppressed": summary.suppressed,
                        "first_at": summary.first_at,
                        "last_at": summary.last_at,
                    },
                )
            )

    def _raise(self, alert: Alert) -> None:
        if self._alerts is None:
            return
        try:
            self._alerts.raise_alert(alert)
        except Exception:
            self._log.failure("could not raise a {type} alert", type=alert.type)

    async def _record(
        self,
        queue_id: str,
        state: MessageState,
        attempts: int,
        next_attempt_at: float = 0.0,
        progress: RecipientProgress | None = None,
    ) -> None:
        try:
            if progress is None:
                await self._journal.record_state(queue_id, state.value, attempts, next_attempt_at)
            else:
                await self._journal.record_state(
                    queue_id,
                    state.value,
                    attempts,
                    next_attempt_at,
                    remaining=progress.remaining,
                    bounced=progress.bounced,
                )
        except JournalUnavailable as error:
            self._not_journaled(error, queue_id, state)

    def _record_unhurried(
        self, queue_id: str, state: MessageState, attempts: int
    ) -> Deferred[None]:
        """
        Journal a state without waiting for it (C{urgent=False}).

        @return: fires with L{None} once it is durable, or could not be
            journaled (then with a warning, as L{_record}).
        """
        d = self._journal.record_state(queue_id, state.value, attempts, urgent=False)
        return d.addErrback(self._unhurried_failed, queue_id, state)

    def _unhurried_failed(self, failure: Failure, queue_id: str, state: MessageState) -> None:
        if isinstance(failure.value, JournalUnavailable):
            self._not_journaled(failure.value, queue_id, state)
        else:
            self._log.failure(
                "could not journal {queue_id} as {state}",
                failure,
                queue_id=queue_id,
                state=state.value,
            )

    def _not_journaled(self, error: BaseException, queue_id: str, state: MessageState) -> None:
        # The outcome stands in memory; after a restart the journal's
        # older state is what counts (at worst, a second delivery).
        self._log.warn(
            "could not journal {queue_id} as {state}: {reason}",
            queue_id=queue_id,
            state=state.value,
            reason=str(error),
        )


_PROBE = Envelope("PROBE", "", "", "probe@example.invalid", ("r@example.invalid",), Priority(3), 0)


def _check_hostname(hostname: str) -> None:
    """
    @raise ValueError: if a bounce cannot name C{hostname} as its reporting
        MTA.
    """
    try:
        build_dsn(
            envelope=_PROBE,
            original=b"",
            failures=[RecipientFailure("r@example.invalid")],
            reporting_mta=hostname,
            arrival_date=0.0,
            now=0.0,
            kind="failed",
            message_id="<probe@example.invalid>",
        )
    except ValueError as e:
        raise ValueError(
            f"hostname {hostname!r} cannot name the gateway in bounces: {e}"
        ) from None
