"""
Replies sent before the reactor next waits, instead of after it next wakes.

Twisted's TCP transport does not send what a protocol writes at once: it
asks the reactor to watch the socket for writability (an C{epoll_ctl}), and
sends on the next turn, once the reactor has woken to say the socket is
writable, then stops watching it (another C{epoll_ctl}). Everything written
within one turn goes out in one send, which matters (an SMTP server's
replies to pipelined commands come out together), but each reply costs two
more system calls and one more dispatch through the reactor.

L{PromptWritesReactor} keeps the first part and drops the rest: what a
L{PromptServer} connection writes during a turn is sent once, at the end
of the turn, right before the reactor waits for events again, in one send
as before. Only when the socket takes less than everything (its buffer is
full) does the connection wait for writability as Twisted's does, until
it has sent everything (what it saves: docs/benchmarks.md, fifth session).
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.python import log as legacy_log

__all__ = ["MAX_PASSES", "PromptServer", "PromptWritesReactor", "install"]

#: Sending may make more to send (a producer resumed): the reactor sends
#: again up to this many times before it polls without waiting.
MAX_PASSES = 8


class PromptWritesReactor(EPollReactor):
    """
    An epoll reactor that sends what L{PromptServer} connections wrote
    during a turn before it waits for the next events.
    """

    def __init__(self) -> None:
        super().__init__()
        self._prompt: list[PromptServer] = []

    def write_soon(self, connection: PromptServer) -> None:
        """
        Send what C{connection} has buffered before the reactor next waits.
        """
        self._prompt.append(connection)

    def doPoll(self, timeout: float | None) -> None:
        """
        Send what was written since the last poll, then poll.
        """
        if self._prompt:
            for _ in range(MAX_PASSES):
                due, self._prompt = self._prompt, []
                for connection in due:
                    legacy_log.callWithLogger(connection, self._send_now, connection)
                if not self._prompt:
                    break
            if self._prompt:
                # Still more: come back at once rather than sleep on it.
                timeout = 0
            else:
                # Sending may have set timers (a producer resumed): they
                # must not wait for the poll's old timeout.
                due_in = self.timeout()
                if due_in is not None and (timeout is None or due_in < timeout):
                    timeout = due_in
        super().doPoll(timeout)

    doIteration = doPoll

    def _send_now(self, connection: PromptServer) -> None:
        connection.queued = False
        if (
            connection.disconnected
            or connection._aborting
            or connection.watching
            or connection.fileno() == -1
        ):
            # Gone, going (its doWrite does nothing), or the reactor sends
            # when the socket can take more.
            return
        connection.drained = False
        why: Any
        try:
            why = connection.doWrite()
        except BaseException:
            # As the reactor does with an exception from doWrite.
            why = sys.exc_info()[1]
            legacy_log.err()
        if why:
            self._disconnectSelectable(connection, why, False)
        elif not connection.drained:
            # The socket took less than everything: wait until it can take
            # more, as Twisted does.
            connection.watching = True
            tcp.Server.startWriting(connection)


class PromptServer(tcp.Server):
    """
    A server connection whose writes go out before the reactor next waits
    (with a L{PromptWritesReactor}; with any other reactor, as Twisted's).

    @ivar queued: whether the reactor will send for it before it waits.
    @ivar drained: whether the last send emptied its buffer.
    @ivar watching: whether the socket is watched for writability (the
        kernel's buffer was full): the reactor sends when it can.
    """

    queued = False
    drained = False
    watching = False

    def startWriting(self) -> None:
        """
        Send before the reactor next waits, unless the socket is already
        watched for writability (its buffer was full).
        """
        reactor = self.reactor
        if not self.watching and isinstance(reactor, PromptWritesReactor):
            if not self.queued:
                self.queued = True
                reactor.write_soon(self)
            return
        super().startWriting()

    def stopWriting(self) -> None:
        """
        Everything is sent (Twisted calls this when the buffer is empty),
        or the connection is going.
        """
        self.drained = True
        self.watching = False
        super().stopWriting()


def install() -> PromptWritesReactor:
    """
    Install a L{PromptWritesReactor} as the global reactor.
    """
    from twisted.internet.main import installReactor

    reactor = PromptWritesReactor()
    installReactor(reactor)
    return reactor
