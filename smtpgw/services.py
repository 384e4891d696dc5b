"""
Service plumbing the gateway needs beyond Twisted's own.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

__all__ = ["OrderedMultiService"]


class OrderedMultiService(MultiService):
    """
    A L{MultiService} whose children stop one after the other, in the
    reverse of the order they started, each only once the previous one has
    finished stopping.

    L{MultiService} stops every child at once; the gateway needs the
    listeners closed before the queue drains, and the queue drained before
    the journal is flushed and closed.
    """

    _log = Logger()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_reverse())

    async def _stop_in_reverse(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self._log.failure("stopping {service!r} failed", service=child)
