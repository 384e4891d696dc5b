"""
Per-address bookkeeping against abuse: how many connections an address holds,
how many logins it failed lately, and which sender alerts repeat.

Both are shared by every session of one L{smtpgw.session.GatewaySMTPFactory}
(every port), live on the reactor thread, and forget addresses they no longer
need so that a scan from many addresses cannot grow them without bound.

They count per I{address key} (L{address_key}): an IPv6 client is given a
whole /64 and could otherwise open connections and guess passwords from
2**64 addresses.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from smtpgw.alerts import AlertThrottle, ThrottleSummary
from smtpgw.interfaces import Alert, IAlertSink

__all__ = [
    "Admission",
    "AuthFailureTracker",
    "AuthLimiter",
    "ConnectionCounter",
    "ConnectionLimiter",
    "RepeatedAlertFilter",
    "address_key",
]


class Admission(enum.Enum):
    """
    What L{ConnectionCounter.admit} decided about a new connection.
    """

    #: Counted: release it when the connection ends.
    ADMITTED = "admitted"
    #: Refused: all addresses together hold the most connections allowed.
    FULL = "full"
    #: Refused: this address holds the most connections one may.
    ADDRESS_FULL = "address_full"


class ConnectionLimiter(Protocol):
    """
    What a session asks before it greets: L{ConnectionCounter} in one
    process; in an acceptor process, a proxy asking the main process, which
    counts the connections of every acceptor.
    """

    def admit(self, address: str) -> Admission | Deferred[Admission]:
        """
        Count a new connection from C{address}, or refuse it.
        """

    def release(self, address: str) -> None:
        """
        Forget one connection admitted.
        """


class AuthLimiter(Protocol):
    """
    What a session asks around each password check: L{AuthFailureTracker}
    in one process, or a proxy to the main process's tracker.
    """

    def blocked(self, address: str) -> bool:
        """
        Whether C{address} is known to be blocked (a proxy may not know yet:
        L{begin} still refuses it).
        """

    def begin(self, address: str) -> bool | Deferred[bool]:
        """
        Ask for a turn to check a credential (see L{AuthFailureTracker.begin}).
        """

    def end(self, address: str, *, failed: bool) -> object:
        """
        A turn is over; the session uses this only with C{failed=False}.
        """

    def fail(self, address: str) -> tuple[bool, int] | Deferred[tuple[bool, int]]:
        """
        A turn found a wrong credential (see L{AuthFailureTracker.fail}).
        """


def address_key(ip: str) -> str:
    """
    What per-address limits count a client address as.

    @param ip: the client's address, as the transport gives it.
    @return: an IPv4 address as is; an IPv4-mapped IPv6 address
        (C{::ffff:192.0.2.1}, what a dual-stack listener sees) as its IPv4
        address; any other IPv6 address as its /64, in the form
        C{2001:db8:1:2::/64}; anything else (not an IP address) unchanged.
    """
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    mapped = address.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    prefix = ipaddress.IPv6Address(int(address) >> 64 << 64)
    return f"{prefix}/64"


class ConnectionCounter:
    """
    Counts the open connections of each client address, and of all of them.

    @ivar limit: the most connections one address may hold.
    @ivar total_limit: the most connections all addresses together may
        hold, or L{None} for no such limit.
    @ivar total: the connections counted now.
    """

    def __init__(self, limit: int, *, total_limit: int | None = None) -> None:
        """
        @param limit: the most simultaneous connections per address.
        @param total_limit: the most simultaneous connections in all.
        """
        self.limit = limit
        self.total_limit = total_limit
        self.total = 0
        self._open: dict[str, int] = {}

    def full(self) -> bool:
        """
        @return: whether L{total_limit} connections are open.
        """
        return self.total_limit is not None and self.total >= self.total_limit

    def acquire(self, address: str) -> bool:
        """
        Count a new connection from C{address}, unless it already holds
        L{limit} of them or L{total_limit} connections are open.

        @return: whether the connection was counted (and must be released);
            L{full} tells which limit refused it.
        """
        current = self._open.get(address, 0)
        if current >= self.limit or self.full():
            return False
        self._open[address] = current + 1
        self.total += 1
        return True

    def admit(self, address: str) -> Admission:
        """
        L{acquire}, saying which limit refused the connection, if one did.
        """
        if self.acquire(address):
            return Admission.ADMITTED
        return Admission.FULL if self.full() else Admission.ADDRESS_FULL

    def release(self, address: str) -> None:
        """
        Forget one connection counted by L{acquire} or L{admit}.
        """
        current = self._open.get(address, 0)
        if current <= 0:
            return
        self.total -= 1
        if current == 1:
            del self._open[address]
        else:
            self._open[address] = current - 1

    def count(self, address: str) -> int:
        """
        @return: the connections C{address} holds now.
        """
        return self._open.get(address, 0)


class AuthFailureTracker:
    """
    Remembers the failed logins of each client address within a sliding
    window, and the checks of its credentials still running.

    An address with L{limit} failures in the window is I{blocked} until the
    oldest of them leaves the window; failures are not forgotten on a
    successful login, so one valid credential cannot reset the count for a
    brute force on others.

    A check still running may yet fail, so it counts against the limit too:
    an address may have at most L{limit} minus its recent failures checks
    running at once (L{begin} to L{end}); the others wait their turn. Many
    parallel connections therefore cannot get more passwords checked than
    the limit allows, nor raise more than one alert.
    """

    #: Stale addresses are swept after this many recorded failures.
    _SWEEP_EVERY = 1024

    def __init__(self, *, limit: int, window: float, clock: IReactorTime) -> None:
        """
        @param limit: failures within C{window} that block an address.
        @param window: seconds over which failures count.
        @param clock: the time source.
        """
        self.limit = limit
        self.window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._pending: dict[str, int] = {}
        self._waiting: dict[str, deque[Deferred[bool]]] = {}
        self._alerted: dict[str, float] = {}
        self._since_sweep = 0

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        horizon = now - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def failures(self, address: str) -> int:
        """
        @return: the failures of C{address} within the window.
        """
        times = self._recent(address, self._clock.seconds())
        return 0 if times is None else len(times)

    def blocked(self, address: str) -> bool:
        """
        @return: whether C{address} reached the limit within the window.
        """
        return self.failures(address) >= self.limit

    def pending(self, address: str) -> int:
        """
        @return: the checks of C{address} begun and not yet ended.
        """
        return self._pending.get(address, 0)

    def begin(self, address: str) -> bool | Deferred[bool]:
        """
        Ask to check a credential from C{address}.

        @return: C{True} when the check may run now (call L{end} when it is
            over); C{False} when the address is blocked; or a L{Deferred}
            that fires with one of those once earlier checks have ended
            (cancel it to give up the turn).
        """
        waiters = self._waiting.get(address)
        if waiters:
            # Failures may have left the window since the last check ended.
            self._admit_waiters(address)
            waiters = self._waiting.get(address)
        failures = self.failures(address)
        if failures >= self.limit:
            return False
        pending = self._pending.get(address, 0)
        if not waiters and failures + pending < self.limit:
            self._pending[address] = pending + 1
            return True
        waiter: Deferred[bool] = Deferred(lambda d: self._forget_waiter(address, d))
        if waiters is None:
            waiters = self._waiting[address] = deque()
        waiters.append(waiter)
        return waiter

    def end(self, address: str, *, failed: bool) -> bool:
        """
        A check allowed by L{begin} is over; admit the checks waiting for
        it, or refuse them all when this failure blocked the address.

        @param failed: whether the credential was wrong.
        @return: whether to raise the C{auth_failures} alert: this failure
            blocked the address, and no alert was raised for the address
            within the window.
        """
        pending = self._pending.get(address, 0) - 1
        if pending > 0:
            self._pending[address] = pending
        else:
            self._pending.pop(address, None)
        alert = False
        if failed:
            before = self.failures(address)
            if before < self.limit <= self.record_failure(address):
                alert = self._first_alert(address)
        if address in self._waiting:
            self._admit_waiters(address)
        return alert

    def fail(self, address: str) -> tuple[bool, int]:
        """
        A check allowed by L{begin} found a wrong credential: L{end} it as
        failed.

        @return: whether to raise the C{auth_failures} alert (as L{end}
            says), and the failures of C{address} within the window, this
            one included.
        """
        alert = self.end(address, failed=True)
        return alert, self.failures(address)

    def _first_alert(self, address: str) -> bool:
        now = self._clock.seconds()
        last = self._alerted.get(address)
        if last is not None and now - last < self.window:
            return False
        self._alerted[address] = now
        return True

    def _admit_waiters(self, address: str) -> None:
        waiters = self._waiting[address]
        failures = self.failures(address)
        outcomes: list[tuple[Deferred[bool], bool]] = []
        if failures >= self.limit:
            outcomes = [(waiter, False) for waiter in waiters]
            waiters.clear()
        else:
            pending = self._pending.get(address, 0)
            while waiters and failures + pending < self.limit:
                outcomes.append((waiters.popleft(), True))
                pending += 1
            if pending:
                self._pending[address] = pending
        if not waiters:
            del self._waiting[address]
        # Slots are reserved before any waiter runs: a waiter's own check
        # may end (and call back into this tracker) before the next fires.
        for waiter, admitted in outcomes:
            waiter.callback(admitted)

    def _forget_waiter(self, address: str, waiter: Deferred[bool]) -> None:
        waiters = self._waiting.get(address)
        if waiters is None:
            return
        try:
            waiters.remove(waiter)
        except ValueError:
            return
        if not waiters:
            del self._waiting[address]

    def record_failure(self, address: str) -> int:
        """
        Count one failed login from C{address} (L{end} does it for the
        checks it admitted).

        @return: the failures of C{address} within the window, this one
            included.
        """
        now = self._clock.seconds()
        times = self._recent(address, now)
        if times is None:
            times = self._failures[address] = deque(maxlen=self.limit)
        times.append(now)
        self._since_sweep += 1
        if self._since_sweep >= self._SWEEP_EVERY:
            self._sweep(now)
        return len(times)

    def _sweep(self, now: float) -> None:
        self._since_sweep = 0
        for address in list(self._failures):
            self._recent(address, now)
        horizon = now - self.window
        for address, at in list(self._alerted.items()):
            if at <= horizon:
                del self._alerted[address]

    def tracked(self) -> int:
        """
        @return: how many addresses have failures within the window (for
            tests and metrics).
        """
        return len(self._failures)


@implementer(IAlertSink)
class RepeatedAlertFilter:
    """
    Passes alerts on to another sink, but stores a C{sender_domain} alert
    for the same user and sender address once per window: the repeats
    within the window are counted, and when it ends one summary alert
    (with C{repeats}, C{first_at} and C{last_at} in its details) says that
    it went on. Every other alert passes at once.

    A client that keeps using a refused sender (or, in monitor mode, sends
    many messages with one) would otherwise fill the alert center with one
    alert per message. The counting is L{AlertThrottle}'s, as for the
    queue's delivery alerts; this adds the timer that ends the windows.
    """

    #: The (username, sender) pairs watched at most; past it, the oldest
    #: window is summed up early.
    MAX_TRACKED = 10_000

    def __init__(
        self,
        sink: IAlertSink,
        clock: IReactorTime,
        *,
        window: float,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        """
        @param sink: where alerts go.
        @param clock: the time source, and the timer of the summaries.
        @param window: seconds during which repeats are only counted; 0
            passes every alert.
        @param max_tracked: the most pairs watched at once.
        """
        self._sink = sink
        self._clock = clock
        self._window = window
        self._throttle = AlertThrottle(window, max_keys=max_tracked)
        self._timer: IDelayedCall | None = None

    def raise_alert(self, alert: Alert) -> None:
        """
        Pass C{alert} on, unless it repeats a C{sender_domain} alert of this
        window.
        """
        if alert.type != "sender_domain" or self._window <= 0:
            self._sink.raise_alert(alert)
            return
        details = alert.details
        key = (str(details.get("username", "")), str(details.get("sender", "")))
        now = self._clock.seconds()
        self._summarize(self._throttle.ended(now), now)
        admitted = self._throttle.admit(key, now, payload=alert)
        # Admitting may have summed up the oldest window early.
        self._summarize(self._throttle.ended(now), now)
        if not admitted:
            return
        self._sink.raise_alert(alert)
        if self._timer is None:
            self._timer = self._clock.callLater(self._window, self._on_timer)

    def suppressed(self, username: str, sender: str) -> int:
        """
        @return: the alerts held back so far in the current window of this
            user and sender.
        """
        return self._throttle.suppressed((username, sender))

    def tracked(self) -> int:
        """
        @return: how many (username, sender) windows are open.
        """
        return len(self._throttle)

    def flush(self) -> None:
        """
        End every window now (at shutdown): the summaries are raised.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._summarize(self._throttle.flush(), self._clock.seconds())

    def _on_timer(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        self._summarize(self._throttle.ended(now), now)
        next_end = self._throttle.next_end()
        if next_end is not None:
            self._timer = self._clock.callLater(max(0.0, next_end - now), self._on_timer)

    def _summarize(self, summaries: list[ThrottleSummary], now: float) -> None:
        for summary in summaries:
            first = summary.payload
            assert isinstance(first, Alert)
            self._sink.raise_alert(
                Alert(
                    type=first.type,
                    message=(
                        f"{first.message} (and {summary.suppressed} more times within "
                        f"{self._window:g} s)"
                    ),
                    created_at=now,
                    list=first.list,
                    details={
                        **first.details,
                        "repeats": summary.suppressed,
                        "first_at": first.created_at,
                        "last_at": summary.last_at,
                    },
                )
            )
