"""
Listening on every port of C{--ports} with one factory.

C{strports.service()} per port would abort the whole start on the first busy
port; this service binds what it can, reports every port it could not bind by
number and reason, and refuses to start only when nothing could be bound.

Binding happens in C{privilegedStartService}, which C{twistd} runs as root
before it drops to C{--uid/--gid}, so ports below 1024 work for an
unprivileged gateway.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from smtpgw.ports import MAX_PORT, MIN_PORT, format_ports
from smtpgw.promptwrites import PromptServer
from smtpgw.rlimits import raise_open_file_limit

__all__ = [
    "CONNECTION_HEADROOM",
    "DEFAULT_BACKLOG",
    "BoundSocket",
    "MultiPortListener",
    "NoPortBound",
    "PortFailure",
    "accept_taking_turns",
    "bind_only",
]

DEFAULT_BACKLOG = 50
"""Pending connections the kernel queues per port (Twisted's default)."""

CONNECTION_HEADROOM = 4096
"""File descriptors reserved for client connections on top of one per port."""

_SHOWN_IN_ERROR = 5

_log = Logger()


@frozen
class PortFailure:
    """
    A port that could not be bound.

    @ivar port: the port number.
    @ivar reason: what the system said, e.g. C{"Address already in use"}.
    @ivar errno: the system error number, when there is one.
    """

    port: int
    reason: str
    errno: int | None = None

    def __str__(self) -> str:
        return f"port {self.port}: {self.reason}"


class NoPortBound(Exception):
    """
    None of the ports could be bound, so the gateway cannot serve.

    @ivar failures: why each port failed.
    """

    def __init__(self, interface: str, failures: Sequence[PortFailure]) -> None:
        self.failures = tuple(failures)
        shown = "; ".join(str(failure) for failure in self.failures[:_SHOWN_IN_ERROR])
        more = len(self.failures) - _SHOWN_IN_ERROR
        if more > 0:
            shown += f"; and {more} more"
        super().__init__(
            f"could not listen on any port of {interface or 'any interface'}"
            f" ({len(self.failures)} tried): {shown}"
        )


def _failure(port: int, error: CannotListenError) -> PortFailure:
    """
    @return: C{error} as a L{PortFailure} with the system's wording.
    """
    cause = error.socketError
    if isinstance(cause, OSError) and cause.strerror:
        return PortFailure(port, cause.strerror, cause.errno)
    return PortFailure(port, str(cause))


def _sorted_unique(ports: Iterable[int]) -> tuple[int, ...]:
    """
    @return: C{ports} in order, each once.
    """
    return tuple(sorted(set(ports)))


def _check_ports(instance: object, attribute: object, ports: tuple[int, ...]) -> None:
    """
    Refuse an empty port list or a number that is not a port.

    Port 0 (any free port) is refused too: reports name ports by number.
    """
    if not ports:
        raise ValueError("no ports to listen on")
    for port in ports:
        if not MIN_PORT <= port <= MAX_PORT:
            raise ValueError(f"{port} is not a TCP port number")


class BoundSocket:
    """
    A port bound and listening, whose connections this process does not
    accept: the acceptor processes it is handed to do
    (L{smtpgw.acceptors}).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def fileno(self) -> int:
        """
        The listening socket's file descriptor.
        """
        return self.socket.fileno()

    def stopListening(self) -> None:
        """
        Close the socket (in this process).
        """
        self.socket.close()


def bind_only(port: int, factory: object, backlog: int, interface: str) -> BoundSocket:
    """
    Bind and listen on C{port} of C{interface} like C{listenTCP}, without
    accepting.

    @raise CannotListenError: when the port cannot be bound.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise CannotListenError(interface, port, error) from None
    return BoundSocket(sock)


class _Accept(tcp.Port):
    """
    A port whose connections send before the reactor next waits (see
    L{smtpgw.promptwrites}).
    """

    transport = PromptServer


class _TakeTurns(_Accept):
    """
    A port that accepts one connection each time it is readable.
    """

    def doRead(self) -> None:
        self.numberAccepts = 1
        super().doRead()


def accept_taking_turns(reactor: Any, fd: int, factory: Any, *, alone: bool = False) -> Any:
    """
    Start accepting connections on the listening socket C{fd} (bound by
    L{bind_only}, perhaps in another process), one connection each time it
    is readable, so that the processes sharing it take turns rather than one
    taking a whole burst (Twisted's port accepts up to hundreds at once).
    The socket is duplicated: C{fd} stays the caller's.

    The connections are L{smtpgw.promptwrites.PromptServer}s: with a
    L{smtpgw.promptwrites.PromptWritesReactor} (the acceptor processes'),
    what they write goes out before the reactor next waits.

    @param alone: this process is the only one accepting on the socket:
        with no one to take turns with, it takes whatever is waiting at each
        wake-up, as Twisted's port does (under load, a connection left in
        the queue would wait a whole turn of the reactor for its greeting).
    @return: the listening port.
    """
    kind = _Accept if alone else _TakeTurns
    probe = socket.socket(fileno=os.dup(fd))
    try:
        family = probe.family
    finally:
        probe.close()
    port = kind._fromListeningDescriptor(reactor, fd, family, factory)
    port.startListening()
    return port


@define(eq=False)
class MultiPortListener(Service):
    """
    A service listening with one factory on many TCP ports of one interface.

    @ivar reactor: provides L{IReactorTCP} and L{IReactorTime}.
    @ivar ports: the ports to listen on (kept sorted, each once).
    @ivar interface: the address to bind, C{""} for all IPv4 addresses,
        C{"::"} for all addresses.
    @ivar factory: builds the protocol of each accepted connection.
    @ivar backlog: the listen queue length of each port.
    @ivar connection_headroom: file descriptors wanted for connections, on
        top of one per port, when the open-file limit is raised.
    @ivar raise_limit: raises the open-file limit to fit its argument.
    @ivar log: where per-port failures and the summary go.
    @ivar listen: binds one port (C{port, factory, backlog, interface});
        the reactor's C{listenTCP} unless given (L{bind_only}: bind for
        acceptor processes).
    """

    reactor: IReactorTCP
    ports: tuple[int, ...] = field(converter=_sorted_unique, validator=_check_ports)
    interface: str
    factory: IProtocolFactory
    backlog: int = DEFAULT_BACKLOG
    connection_headroom: int = CONNECTION_HEADROOM
    raise_limit: Callable[[int], object] = field(default=raise_open_file_limit, repr=False)
    log: Logger = field(default=_log, repr=False)
    listen: Callable[[int, Any, int, str], Any] | None = field(default=None, repr=False)
    _listening: dict[int, IListeningPort] = field(factory=dict, init=False, repr=False)
    _failures: tuple[PortFailure, ...] = field(default=(), init=False, repr=False)
    _bind_seconds: float = field(default=0.0, init=False, repr=False)

    @property
    def bound_ports(self) -> tuple[int, ...]:
        """
        The ports being listened on, in order; empty before start and after
        stop.
        """
        return tuple(sorted(self._listening))

    def file_descriptors(self) -> list[int]:
        """
        The listening sockets' file descriptors, in port order.
        """
        return [self._listening[port].fileno() for port in sorted(self._listening)]  # type: ignore[attr-defined]

    @property
    def failures(self) -> tuple[PortFailure, ...]:
        """
        The ports the last start could not bind, in order, with reasons.
        """
        return self._failures

    @property
    def bind_seconds(self) -> float:
        """
        How long the last start took to bind all ports.
        """
        return self._bind_seconds

    def privilegedStartService(self) -> None:
        """
        Bind every port while still privileged.

        @raise NoPortBound: when no port at all could be bound.
        """
        self._bind()
        super().privilegedStartService()

    def startService(self) -> None:
        """
        Bind every port unless L{privilegedStartService} already did.

        @raise NoPortBound: when no port at all could be bound.
        """
        if not self._listening:
            self._bind()
        super().startService()

    def stopService(self) -> Deferred[None]:
        """
        Stop listening on every port; accepted connections are left alone.

        @return: fires when all ports are closed.
        """
        super().stopService()
        listening, self._listening = self._listening, {}
        closing = gatherResults([maybeDeferred(port.stopListening) for port in listening.values()])
        return closing.addCallback(lambda _: None)

    def _bind(self) -> None:
        """
        Listen on each port, recording and logging each one that fails.

        @raise NoPortBound: when every port failed; nothing is left open.
        """
        self.raise_limit(len(self.ports) + self.connection_headroom)
        clock = IReactorTime(self.reactor)
        started = clock.seconds()
        # IReactorTCP annotates a ServerFactory; any IProtocolFactory works.
        factory = cast(ServerFactory, self.factory)
        listening: dict[int, IListeningPort] = {}
        failures: list[PortFailure] = []
        for port in self.ports:
            try:
                if self.listen is not None:
                    listening[port] = self.listen(port, factory, self.backlog, self.interface)
                else:
                    listening[port] = self.reactor.listenTCP(
                        port, factory, backlog=self.backlog, interface=self.interface
                    )
            except CannotListenError as error:
                failure = _failure(port, error)
                failures.append(failure)
                self.log.warn(
                    "cannot listen on port {port} of {interface}: {reason}",
                    port=failure.port,
                    reason=failure.reason,
                    errno=failure.errno,
                    interface=self.interface or "*",
                )
        self._bind_seconds = clock.seconds() - started
        self._listening = listening
        self._failures = tuple(failures)
        self._log_summary()
        if not listening:
            raise NoPortBound(self.interface, failures)

    def _log_summary(self) -> None:
        """
        Log one line about the last bind: how many ports, how fast, which
        failed (compressed to ranges, as thousands can fail together).
        """
        fields = {
            "bound": len(self._listening),
            "total": len(self.ports),
            "interface": self.interface or "*",
            "seconds": self._bind_seconds,
        }
        if not self._failures:
            self.log.info(
                "listening on {bound} of {total} ports of {interface} in {seconds:.3f}s",
                **fields,
            )
            return
        self.log.warn(
            "listening on {bound} of {total} ports of {interface} in {seconds:.3f}s;"
            " {failed} failed: {failed_ports}",
            failed=len(self._failures),
            failed_ports=format_ports(failure.port for failure in self._failures),
            **fields,
        )
