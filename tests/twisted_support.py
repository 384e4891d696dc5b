"""
What many test modules need to run Twisted code: coroutine tests on the
real reactor, that reactor, the lines logged at a level, and connections
waiting on a listening socket.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, ParamSpec, cast

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher

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


@contextlib.contextmanager
def logged_lines(level: LogLevel) -> Iterator[list[str]]:
    """
    The text of the events of C{level} logged while the block runs.
    """
    found: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") is level:
            found.append(formatEvent(event))

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        yield found
    finally:
        globalLogPublisher.removeObserver(observer)


@contextlib.contextmanager
def waiting_connections(count: int) -> Iterator[tuple[Any, Any, list[Any]]]:
    """
    A listening socket bound on 127.0.0.1 without accepting
    (L{smtpgw.listening.bind_only}) with C{count} clients connected and
    waiting to be accepted, and a factory that records the protocols it
    builds. Everything is closed after the block.

    @return: (the bound port, the factory, the protocols built so far).
    """
    from twisted.internet.protocol import Protocol, ServerFactory

    from smtpgw.listening import bind_only

    built: list[Protocol] = []

    class Recording(ServerFactory):
        def buildProtocol(self, addr: Any) -> Protocol:
            built.append(Protocol())
            return built[-1]

    bound = bind_only(0, None, 5, "127.0.0.1")
    clients: list[socket.socket] = []
    try:
        address = bound.socket.getsockname()
        clients = [socket.create_connection(address, timeout=5) for _ in range(count)]
        yield bound, Recording(), built
    finally:
        for protocol in built:
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
        for client in clients:
            client.close()
        bound.stopListening()
