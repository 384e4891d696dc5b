"""
Outbound delivery: the L{IOutbound} implementations.

For now the capture relay (C{--relay capture}): instead of sending, store
what would be sent in the data directory, for trying the gateway out and for
tests (PRODUCT section 3).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpgw.interfaces import DeliveryResult, IOutbound
from smtpgw.model import Envelope

__all__ = [
    "CAPTURE_DIR",
    "CAPTURE_INDEX",
    "CaptureOutbound",
    "DiscardOutbound",
    "all_bounced",
    "all_deferred",
    "default_sync",
]

#: The directory, under the data directory, where captured messages go.
CAPTURE_DIR = "captured"
#: The file, in L{CAPTURE_DIR}, with one JSON line per captured delivery.
CAPTURE_INDEX = "index.jsonl"

# A queue id becomes a file name: nothing that could leave the directory or
# hide the file.
_SAFE_QUEUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def all_deferred(recipients: Iterable[str], reason: str) -> DeliveryResult:
    """
    The result of an attempt that failed temporarily for every recipient.
    """
    return DeliveryResult(deferred=tuple((r, reason) for r in recipients))


def all_bounced(recipients: Iterable[str], reason: str) -> DeliveryResult:
    """
    The result of an attempt that failed permanently for every recipient.
    """
    return DeliveryResult(bounced=tuple((r, reason) for r in recipients))


@define(eq=False)
class _Capture:
    """
    A delivery waiting for the capture thread.
    """

    envelope: Envelope
    body: bytes = field(repr=False)
    delivered_at: float
    deferred: Deferred[DeliveryResult]


def _libc_syncfs() -> Callable[[int], None] | None:
    """
    @return: Linux's C{syncfs(2)}, or L{None} where there is none.
    """
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if function(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    return syncfs


def _sync_everything(fd: int) -> None:
    os.sync()


def default_sync() -> Callable[[int], None]:
    """
    @return: what makes everything written in a directory durable at once,
        given a descriptor of the directory: C{syncfs(2)} of its file system
        (on Linux it returns once everything written there, data, names and
        sizes, is on disk, like an C{fsync} of each file), or C{sync(2)}
        where there is no C{syncfs}.
    """
    return _libc_syncfs() or _sync_everything


@implementer(IOutbound)
class CaptureOutbound(Service):
    """
    Stores each message as C{captured/<queue-id>.eml} (its bytes exactly as
    given) under the data directory and appends one JSON line per delivery
    to C{captured/index.jsonl}, with C{queue_id}, C{list}, C{username},
    C{sender}, C{recipients}, C{priority}, C{accepted_at}, C{delivered_at}
    and C{file} (the absolute path of the C{.eml}).

    A delivery counts as done only once its C{.eml}, its name in the
    directory and its index line are on disk: the queue then journals the
    message as delivered and may forget it, so a capture that a power loss
    could still undo would lose the message.

    One thread of its own does the writing, so the reactor never waits on
    the disk and the index is in delivery order. It takes every delivery
    waiting, writes each C{.eml} under a temporary name, makes them durable
    with one sync of the file system, renames them and appends their index
    lines, and makes that durable with a second sync (group commit: two
    syncs however many messages, where an C{fsync} of each file and of the
    directory would cost milliseconds a message). A partial C{.eml} never
    appears under its final name, even after a crash. A message captured
    just before a crash, before its delivery was journaled, is captured
    again after it (its C{.eml} replaced, its index line repeated).

    It is a service: deliveries are taken between C{startService} and
    C{stopService}; any other time they are deferred (temporary failure).

    @ivar syncs: file system syncs made so far (two per group written).
    """

    _log = Logger()

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        reactor: IReactorFromThreads,
        clock: IReactorTime | None = None,
        sync: Callable[[int], None] | None = None,
    ) -> None:
        """
        @param data_dir: the gateway's data directory.
        @param reactor: delivers the results of the writing thread.
        @param clock: gives C{delivered_at}; the reactor when not given.
        @param sync: makes what was written in the capture directory durable,
            given a descriptor of the directory; L{default_sync} when not
            given (tests count the calls or inject failures).
        """
        self.captured_dir = os.path.join(os.path.abspath(data_dir), CAPTURE_DIR)
        self.index_path = os.path.join(self.captured_dir, CAPTURE_INDEX)
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self._sync = sync if sync is not None else default_sync()
        self._cond = threading.Condition()
        self._waiting: deque[_Capture] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        self.syncs = 0

    def startService(self) -> None:
        """
        Start the writing thread.
        """
        self._stopping = False
        self._stopped = Deferred()
        self._thread = threading.Thread(target=self._run, name="smtpgw-capture", daemon=True)
        self._thread.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        """
        Refuse new deliveries, finish the writes under way, stop the thread.
        """
        super().stopService()
        stopped, self._stopped = self._stopped, None
        if stopped is None:
            return succeed(None)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        return stopped

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        """
        Capture the message; every recipient counts as delivered once the
        C{.eml} and its index line are durable. Disk errors defer every
        recipient.
        """
        if not _SAFE_QUEUE_ID.fullmatch(envelope.queue_id):
            return succeed(
                all_bounced(envelope.recipients, "queue id cannot be used as a file name")
            )
        if not self.running or self._stopped is None:
            return succeed(all_deferred(envelope.recipients, "capture is not running"))
        d: Deferred[DeliveryResult] = Deferred()
        capture = _Capture(envelope, body, self._clock.seconds(), d)
        with self._cond:
            self._waiting.append(capture)
            self._cond.notify()
        return d

    # The writing thread

    def _run(self) -> None:
        stopped = self._stopped
        assert stopped is not None
        try:
            while True:
                with self._cond:
                    while not (self._waiting or self._stopping):
                        self._cond.wait()
                    batch = list(self._waiting)
                    self._waiting.clear()
                if not batch:
                    break
                try:
                    outcomes = self._write_batch(batch)
                except Exception:
                    failure = Failure()
                    outcomes = [failure] * len(batch)
                self._reactor.callFromThread(self._done, batch, outcomes)
        finally:
            self._reactor.callFromThread(stopped.callback, None)

    def _write_batch(self, batch: Sequence[_Capture]) -> list[str | Failure | OSError]:
        """
        Capture C{batch} with two syncs (in the writing thread).

        @return: for each capture, the path of its C{.eml}, or why it failed.
        """
        outcomes: list[str | Failure | OSError] = []
        try:
            os.makedirs(self.captured_dir, exist_ok=True)
        except OSError as error:
            return [error] * len(batch)
        written: list[tuple[int, str, str]] = []
        for position, capture in enumerate(batch):
            try:
                temporary, path = self._write(capture.envelope, capture.body)
            except OSError as error:
                outcomes.append(error)
            else:
                outcomes.append(path)
                written.append((position, temporary, path))
        if not written:
            return outcomes
        directory = os.open(self.captured_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                self._sync_directory(directory)
                lines = []
                for position, temporary, path in written:
                    os.replace(temporary, path)
                    lines.append(_index_line(batch[position], path))
                with open(self.index_path, "a", encoding="utf-8") as index:
                    index.write("".join(lines))
                self._sync_directory(directory)
            except OSError as error:
                for position, temporary, _ in written:
                    outcomes[position] = error
                    with contextlib.suppress(OSError):
                        os.unlink(temporary)
        finally:
            os.close(directory)
        return outcomes

    def _sync_directory(self, directory: int) -> None:
        self._sync(directory)
        self.syncs += 1

    def _write(self, envelope: Envelope, body: bytes) -> tuple[str, str]:
        """
        Write an C{.eml} under its temporary name (in the writing thread).

        @return: the temporary name and the final one.
        """
        name = f"{envelope.queue_id}.eml"
        path = os.path.join(self.captured_dir, name)
        temporary = os.path.join(self.captured_dir, f".{name}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(body)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return temporary, path

    # Back on the reactor thread

    def _done(
        self, batch: Sequence[_Capture], outcomes: Sequence[str | Failure | OSError]
    ) -> None:
        for capture, outcome in zip(batch, outcomes, strict=True):
            recipients = capture.envelope.recipients
            queue_id = capture.envelope.queue_id
            if isinstance(outcome, str):
                # The queue logs the delivery: one line per message is enough.
                capture.deferred.callback(DeliveryResult(delivered=recipients))
            elif isinstance(outcome, OSError):
                reason = f"capture failed: {outcome.strerror or outcome}"
                self._log.warn(
                    "could not capture {queue_id}: {reason}", queue_id=queue_id, reason=reason
                )
                capture.deferred.callback(all_deferred(recipients, reason))
            else:
                self._log.failure("capture of {queue_id} failed", outcome, queue_id=queue_id)
                capture.deferred.callback(
                    all_deferred(recipients, "capture failed: internal error")
                )


def _index_line(capture: _Capture, path: str) -> str:
    envelope = capture.envelope
    fields = {
        "queue_id": envelope.queue_id,
        "list": envelope.list,
        "username": envelope.username,
        "sender": envelope.sender,
        "recipients": list(envelope.recipients),
        "priority": int(envelope.priority),
        "accepted_at": envelope.accepted_at,
        "delivered_at": capture.delivered_at,
        "file": path,
    }
    return json.dumps(fields) + "\n"


@implementer(IOutbound)
class DiscardOutbound(Service):
    """
    C{--relay discard}: every recipient counts as delivered at once, and
    nothing leaves the gateway (Postfix's C{discard} transport).

    The message still goes through all of the queue: journaled, scheduled by
    priority and rate, marked delivered in the journal, then compacted away
    (with no C{sending} record before the attempt: nothing can leave twice).
    For measuring the gateway alone, and for a dry run.
    """

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        """
        Deliver to nobody: every recipient succeeds.
        """
        return succeed(DeliveryResult(delivered=tuple(envelope.recipients)))
