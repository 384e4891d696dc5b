"""
A log observer for C{twistd --logger smtpgw.logs.observer}: the same lines
as twistd's own text log, written with one C{write} per reactor turn instead
of one per event.

A busy gateway logs two events per message ("queued", "delivered"); twistd's
observer formats each with L{string.Formatter} and writes and flushes it on
its own, which costs about a third of the main process's time under load.
This one formats the common case (fields named in the format string) with
C{str.format_map}, keeps the timestamp of the current second, and collects
the lines of one reactor turn into one write. Anything it cannot format that
way (a traceback, Twisted's C{{callable()}} syntax) goes through Twisted's
own formatting, unchanged.

A line is written at the end of the reactor turn that logged it (or at once
when the reactor is not running, or once 64 KiB are waiting), so a
C{kill -9} can lose the lines of the turn under way: at most a few
milliseconds of log, never mail.
"""

from __future__ import annotations

import sys
import threading
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    eventAsText,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

__all__ = ["BufferedTextObserver", "observer"]

#: Flush at once when this many characters wait.
FLUSH_AT = 64 * 1024

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


@implementer(ILogObserver)
class BufferedTextObserver:
    """
    Writes events as twistd's text log does (C{TIME [SYSTEM] TEXT}), one
    C{write} per reactor turn.
    """

    def __init__(self, stream: IO[str], reactor: Any = None) -> None:
        """
        @param stream: where the lines go.
        @param reactor: whose turns the lines wait for, while it runs (the
            global reactor when L{None}, looked up at the first line: twistd
            makes the observer before it installs the reactor).
        """
        self._stream = stream
        self._reactor = reactor
        self._watching = False
        self._stopping = False
        # Events may come from other threads (warnings, errors in thread
        # pools): the buffer and the writes are shared.
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._size = 0
        self._scheduled = False
        self._second = -1
        self._stamp = ""

    def __call__(self, event: LogEvent) -> None:
        try:
            line = self._line(event)
        except Exception:
            # What twistd itself writes for an event it cannot format.
            line = formatEventAsClassicLogText(event)
        if not line:
            return
        with self._lock:
            self._lines.append(line)
            self._size += len(line)
            full = self._size >= FLUSH_AT
        reactor = self._the_reactor()
        if full or self._stopping or not getattr(reactor, "running", False) or not isInIOThread():
            # Off the reactor thread, or no turn will end: write now.
            self.flush()
            return
        if not self._scheduled:
            self._scheduled = True
            reactor.callLater(0, self._flush_scheduled)

    def _line(self, event: LogEvent) -> str | None:
        text = self._text(event)
        if not text:
            return None
        stamp = self._timestamp(event.get("log_time"))
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')}"
        return f"{stamp} [{system}] {text}\n"

    def _text(self, event: LogEvent) -> str | None:
        log_format = event.get("log_format")
        if not isinstance(log_format, str) or "log_failure" in event:
            text = eventAsText(event, includeTimestamp=False, includeSystem=False)
            return text.replace("\n", "\n\t") if text else None
        try:
            text = log_format.format_map(event)
        except Exception:
            text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        return text.replace("\n", "\n\t") if text else None

    def _timestamp(self, when: Any) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = formatTime(when, _TIME_FORMAT)
        return self._stamp

    def _the_reactor(self) -> Any:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as installed

            reactor = self._reactor = installed
        if not self._watching and hasattr(reactor, "addSystemEventTrigger"):
            self._watching = True
            reactor.addSystemEventTrigger("during", "shutdown", self._shutting_down)
        return reactor

    def _shutting_down(self) -> None:
        # From here on no turn may end: each line is written as it comes.
        self._stopping = True
        self.flush()

    def _flush_scheduled(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """
        Write every waiting line now.
        """
        with self._lock:
            if not self._lines:
                return
            text = "".join(self._lines)
            self._lines.clear()
            self._size = 0
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):
                # Nowhere to log to (a closed stdout, a full disk): logging
                # must not take the gateway down.
                pass


def observer() -> BufferedTextObserver:
    """
    The observer for C{twistd --logger smtpgw.logs.observer}: standard
    output (where C{twistd -n} logs by default); written out at exit too.
    """
    import atexit

    made = BufferedTextObserver(sys.stdout)
    atexit.register(made.flush)
    return made
