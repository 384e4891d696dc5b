"""
Outbound delivery: the L{IOutbound} implementations.

For now the capture relay (C{--relay capture}): instead of sending, store
what would be sent in the data directory, for trying the gateway out and for
tests (PRODUCT section 3).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from smtpgw.interfaces import DeliveryResult, IOutbound
from smtpgw.model import Envelope

__all__ = ["CAPTURE_DIR", "CAPTURE_INDEX", "CaptureOutbound", "all_bounced", "all_deferred"]

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


@implementer(IOutbound)
class CaptureOutbound(Service):
    """
    Stores each message as C{captured/<queue-id>.eml} (its bytes exactly as
    given) under the data directory and appends one JSON line per delivery
    to C{captured/index.jsonl}, with C{queue_id}, C{list}, C{username},
    C{sender}, C{recipients}, C{priority}, C{accepted_at}, C{delivered_at}
    and C{file} (the absolute path of the C{.eml}).

    The files are written by one thread of its own, so the reactor never
    waits on the disk and the lines of the index are in delivery order. An
    C{.eml} is written to a temporary name and renamed, so a partial file
    never appears under the final name. Nothing is fsync'd: the journal,
    not the capture, is what makes mail durable, and a message captured
    just before a crash is captured again after it (and indexed twice).

    It is a service: deliveries are taken between C{startService} and
    C{stopService}; any other time they are deferred (temporary failure).
    """

    _log = Logger()

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        reactor: IReactorFromThreads,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param data_dir: the gateway's data directory.
        @param reactor: delivers the results of the writing thread.
        @param clock: gives C{delivered_at}; the reactor when not given.
        """
        self.captured_dir = os.path.join(os.path.abspath(data_dir), CAPTURE_DIR)
        self.index_path = os.path.join(self.captured_dir, CAPTURE_INDEX)
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self._pool: ThreadPool | None = None
        self._in_flight: set[Deferred[DeliveryResult]] = set()

    def startService(self) -> None:
        """
        Start the writing thread.
        """
        # One thread: its work queue is what keeps the index in order.
        self._pool = ThreadPool(1, 1, name="smtpgw-capture")
        self._pool.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        """
        Refuse new deliveries, finish the writes under way, stop the thread.
        """
        super().stopService()
        pool, self._pool = self._pool, None
        waiting = DeferredList(list(self._in_flight))

        def stop(_: object) -> None:
            if pool is not None:
                pool.stop()

        return waiting.addCallback(stop)

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        """
        Capture the message; every recipient counts as delivered once both
        files are written. Disk errors defer every recipient.
        """
        if not _SAFE_QUEUE_ID.fullmatch(envelope.queue_id):
            return succeed(
                all_bounced(envelope.recipients, "queue id cannot be used as a file name")
            )
        pool = self._pool
        if pool is None:
            return succeed(all_deferred(envelope.recipients, "capture is not running"))
        delivered_at = self._clock.seconds()
        d = ensureDeferred(self._capture(pool, envelope, body, delivered_at))
        self._in_flight.add(d)

        def done(result: DeliveryResult) -> DeliveryResult:
            self._in_flight.discard(d)
            return result

        return d.addCallback(done)

    async def _capture(
        self, pool: ThreadPool, envelope: Envelope, body: bytes, delivered_at: float
    ) -> DeliveryResult:
        try:
            await deferToThreadPool(self._reactor, pool, self._write, envelope, body, delivered_at)
        except OSError as error:
            reason = f"capture failed: {error.strerror or error}"
            self._log.warn(
                "could not capture {queue_id}: {reason}", queue_id=envelope.queue_id, reason=reason
            )
            return all_deferred(envelope.recipients, reason)
        except Exception:
            self._log.failure("capture of {queue_id} failed", queue_id=envelope.queue_id)
            return all_deferred(envelope.recipients, "capture failed: internal error")
        # The queue logs the delivery: one line per message is enough.
        return DeliveryResult(delivered=envelope.recipients)

    def _write(self, envelope: Envelope, body: bytes, delivered_at: float) -> str:
        """
        Write the C{.eml} and its index line (in the writing thread).

        @return: the path of the C{.eml}.
        """
        os.makedirs(self.captured_dir, exist_ok=True)
        name = f"{envelope.queue_id}.eml"
        path = os.path.join(self.captured_dir, name)
        temporary = os.path.join(self.captured_dir, f".{name}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(body)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        line = json.dumps(
            {
                "queue_id": envelope.queue_id,
                "list": envelope.list,
                "username": envelope.username,
                "sender": envelope.sender,
                "recipients": list(envelope.recipients),
                "priority": int(envelope.priority),
                "accepted_at": envelope.accepted_at,
                "delivered_at": delivered_at,
                "file": path,
            }
        )
        with open(self.index_path, "a", encoding="utf-8") as index:
            index.write(line + "\n")
        return path
