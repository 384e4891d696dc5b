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
    Makes queue ids that are unique across restarts and sort by acceptance time.

    An id is 16 upper-case hex digits of milliseconds since the epoch, a
    per-process random salt and a counter; callers pass in the current time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._salt = int.from_bytes(os.urandom(2), "big")
        self._counter = 0

    def next(self, now: float) -> str:
        with self._lock:
            self._counter = (self._counter + 1) & 0xFFFFF
            counter = self._counter
        return f"{int(now * 1000):011X}{self._salt:04X}{counter:05X}"
