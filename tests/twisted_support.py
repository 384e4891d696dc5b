"""
What many test modules need to run Twisted code: coroutine tests on the
real reactor, and that reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec

import pytest_twisted
from twisted.internet.defer import Deferred

P = ParamSpec("P")


def async_test(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, Deferred[None]]:
    """
    L{pytest_twisted.ensureDeferred}, typed.
    """
    wrapped: Callable[P, Deferred[None]] = pytest_twisted.ensureDeferred(test)
    return wrapped


def global_reactor() -> Any:
    """
    The reactor pytest-twisted runs (imported when asked for, not at import).
    """
    from twisted.internet import reactor

    return reactor
