"""
Per-address bookkeeping against abuse: how many connections an address holds,
and how many logins it failed lately.

Both are shared by every session of one L{smtpgw.session.GatewaySMTPFactory}
(every port), live on the reactor thread, and forget addresses they no longer
need so that a scan from many addresses cannot grow them without bound.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.interfaces import IReactorTime

__all__ = ["AuthFailureTracker", "ConnectionCounter"]


class ConnectionCounter:
    """
    Counts the open connections of each client address.

    @ivar limit: the most connections one address may hold.
    """

    def __init__(self, limit: int) -> None:
        """
        @param limit: the most simultaneous connections per address.
        """
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        """
        Count a new connection from C{address}, unless it already holds
        L{limit} of them.

        @return: whether the connection was counted (and must be released).
        """
        current = self._open.get(address, 0)
        if current >= self.limit:
            return False
        self._open[address] = current + 1
        return True

    def release(self, address: str) -> None:
        """
        Forget one connection counted by L{acquire}.
        """
        current = self._open.get(address, 0)
        if current <= 1:
            self._open.pop(address, None)
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
    window.

    An address with L{limit} failures in the window is I{blocked} until the
    oldest of them leaves the window; failures are not forgotten on a
    successful login, so one valid credential cannot reset the count for a
    brute force on others.
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

    def record_failure(self, address: str) -> int:
        """
        Count one failed login from C{address}.

        @return: the failures of C{address} within the window, this one
            included; the caller raises the alert when this equals L{limit}.
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

    def tracked(self) -> int:
        """
        @return: how many addresses have failures within the window (for
            tests and metrics).
        """
        return len(self._failures)
