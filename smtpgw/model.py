"""
The values that travel between the parts of the gateway.

Everything here is immutable; secrets are kept out of C{repr}.
"""

from __future__ import annotations

import enum
import os
import threading

from attrs import field, frozen


class Enforcement(enum.Enum):
    """
    What happens when an SMTP+ user sends as a sender it is not authorized for.
    """

    ENFORCE = "enforce"
    MONITOR = "monitor"


class Priority(enum.IntEnum):
    """
    Message priority: a lower number is a higher priority.
    """

    VERY_HIGH = 1
    HIGH = 2
    NORMAL = 3
    LOW = 4
    VERY_LOW = 5


class MessageState(enum.Enum):
    """
    The one state a queued message is in (PRODUCT section 3).
    """

    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    HELD = "held"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    CANCELLED = "cancelled"


@frozen
class MailList:
    """
    A mailing list of the platform; SMTP+ users belong to one list.
    """

    name: str
    created_at: float


@frozen
class SmtpUser:
    """
    A credential that may relay through the gateway for one list.

    @ivar password_hash: the bcrypt hash; the password itself is never stored.
    """

    username: str
    list: str
    password_hash: bytes = field(repr=False)
    active: bool = True
    priority: Priority = Priority.NORMAL
    notes: str = ""
    authorized_domains: tuple[str, ...] = ()
    authorized_senders: tuple[str, ...] = ()
    enforcement: Enforcement = Enforcement.ENFORCE
    created_at: float = 0.0
    last_used_at: float | None = None
    last_used_ip: str | None = None


@frozen
class Envelope:
    """
    What the gateway knows about an accepted message besides its bytes.

    @ivar priority: the effective priority, already resolved.
    """

    queue_id: str
    list: str
    username: str
    sender: str
    recipients: tuple[str, ...]
    priority: Priority
    accepted_at: float
    client_ip: str = ""
    size: int = 0


class QueueIdGenerator:
    """
    Makes queue ids: unique, short, safe as file names, and sorted by
    acceptance time.

    An id is 24 upper-case hex digits: 11 of milliseconds since the epoch,
    8 of a random salt drawn once per generator (that is, per process),
    and 5 of a counter within the millisecond.

    Within one generator ids strictly increase: the millisecond part never
    goes back, even when the clock does, and when the counter runs out
    within a millisecond the millisecond part moves one ahead. Ids of two
    generators (two processes, say before and after a restart with the
    clock stepped back) can only be equal when their 32-bit random salts
    are; should that ever happen while the earlier message is still queued,
    the journal refuses the new one rather than lose either.
    """

    #: The length of every id.
    LENGTH = 24
    _COUNTER_MAX = 0xFFFFF

    def __init__(self, salt: int | None = None) -> None:
        """
        @param salt: the 32-bit salt (tests); random when not given.
        """
        if salt is None:
            salt = int.from_bytes(os.urandom(4), "big")
        if not 0 <= salt <= 0xFFFFFFFF:
            raise ValueError(f"salt must fit in 32 bits: {salt}")
        self._lock = threading.Lock()
        self._salt = f"{salt:08X}"
        self._millis = -1
        self._counter = 0

    def next(self, now: float) -> str:
        """
        @param now: the current time, in seconds since the epoch.
        @return: a new queue id.
        """
        millis = max(0, int(now * 1000))
        with self._lock:
            if millis > self._millis:
                self._millis = millis
                self._counter = 0
            elif self._counter < self._COUNTER_MAX:
                self._counter += 1
            else:
                self._millis += 1
                self._counter = 0
            millis, counter = self._millis, self._counter
        return f"{millis:011X}{self._salt}{counter:05X}"
