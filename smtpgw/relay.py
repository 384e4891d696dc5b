"""
Relaying to other SMTP servers: the connection pool and the smarthost.

L{ConnectionPool} keeps SMTP sessions open per destination (host, port and
session policy) and feeds them messages in turn, so that mail for the same
destination goes over one connection while there is more of it. It limits
connections per host:port and overall, closes idle connections after
L{IDLE_TIMEOUT} seconds and replaces a connection after
L{MAX_MESSAGES_PER_CONNECTION} messages. The MX relay and L{SmarthostOutbound}
both send through it.

L{parse_relay_url} reads C{--relay smtp://[user:password@]host:port[?...]}.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from attrs import define, evolve, field, frozen
from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from smtpgw.interfaces import DeliveryResult, IOutbound
from smtpgw.model import Envelope
from smtpgw.smtpclient import (
    ClientSettings,
    Credentials,
    SendResult,
    SessionFailed,
    SessionPolicy,
    SMTPClientFactory,
    SMTPClientProtocol,
    SMTPConnection,
    StaleConnection,
    StartTLS,
    TLSFailed,
    TLSFallback,
    TLSPolicy,
    peer_name,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "DEFAULT_PORT",
    "IDLE_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_MESSAGES_PER_CONNECTION",
    "MAX_PER_DESTINATION",
    "TLS_FAILURE_MEMORY",
    "ConnectionPool",
    "RelayURL",
    "RelayURLError",
    "Route",
    "SmarthostOutbound",
    "parse_relay_url",
]

IDLE_TIMEOUT = 5.0
"""Seconds an idle connection stays open waiting for more mail."""

MAX_MESSAGES_PER_CONNECTION = 100
"""Messages sent over one connection before it is replaced."""

MAX_CONNECTIONS = 20
"""Connections open at once, overall (the gateway passes C{--concurrency})."""

MAX_PER_DESTINATION = 10
"""Connections open at once to one host:port."""

TLS_FAILURE_MEMORY = 3600.0
"""Seconds a host whose TLS handshake failed is sent to without STARTTLS
(opportunistic TLS with the plaintext fallback only)."""

CLOSE_TIMEOUT = 30.0
"""Seconds closing the pool lets messages under way finish before aborting
their connections (their recipients are then deferred)."""

DEFAULT_PORT = 25
"""The port of a smarthost URL without one."""

EndpointFactory = Callable[[str, int, float], IStreamClientEndpoint]
"""(host, port, connect timeout) to the endpoint that connects there."""


@frozen
class Route:
    """
    Where a pooled connection goes and how it talks: connections are shared
    by the messages of one route only.
    """

    host: str
    port: int
    policy: SessionPolicy


class _State(enum.Enum):
    CONNECTING = "connecting"
    IDLE = "idle"
    BUSY = "busy"
    CLOSING = "closing"


@define(eq=False)
class _Job:
    envelope: Envelope
    body: bytes
    result: Deferred[SendResult]
    requeued: bool = False


@define(eq=False)
class _Conn:
    route: Route
    state: _State = _State.CONNECTING
    connecting: Deferred[Any] | None = None
    connection: SMTPConnection | None = None
    wake: Deferred[_Job | None] | None = None
    idle_timer: IDelayedCall | None = None
    messages: int = 0
    freeing: bool = False


@define(eq=False)
class _RouteState:
    route: Route
    queue: deque[_Job] = field(factory=deque)
    conns: set[_Conn] = field(factory=set)
    idle: list[_Conn] = field(factory=list)

    def connecting(self) -> int:
        return sum(1 for conn in self.conns if conn.state is _State.CONNECTING)

    def live(self) -> bool:
        return any(conn.state in (_State.IDLE, _State.BUSY) for conn in self.conns)


def _all_deferred(envelope: Envelope, reason: str) -> SendResult:
    return SendResult(
        DeliveryResult(deferred=tuple((r, reason) for r in envelope.recipients)),
        host_failure=reason,
        retryable=envelope.recipients,
    )


def _when(deferred: Deferred[Any]) -> Deferred[None]:
    """
    A new L{Deferred} that fires when C{deferred} does, leaving its result
    alone.
    """
    fired: Deferred[None] = Deferred()

    def relay(result: object) -> object:
        fired.callback(None)
        return result

    deferred.addBoth(relay)
    return fired


class ConnectionPool:
    """
    SMTP connections kept per route and reused while there is mail for it.

    A message handed to L{send} waits in its route's queue; an idle
    connection of the route takes it at once, otherwise a new connection is
    opened when the limits allow (one per waiting message, at most
    C{max_per_destination} per host:port and C{max_connections} in all; at
    the overall limit, an idle connection of another route is closed to
    make room). A connection sends the messages of its route one after the
    other, waits C{idle_timeout} seconds for more, and is replaced after
    C{max_messages_per_connection} messages.

    A connection that cannot be opened (refused, timeout, greeting or AUTH
    refused, TLS) fails the messages waiting for its route with a
    L{SendResult} whose C{host_failure} says why, unless another connection
    of the route is working. A TLS handshake failure under
    L{TLSFallback.PLAINTEXT} instead moves them to the same host without
    STARTTLS, and sends there without STARTTLS for C{tls_failure_memory}
    seconds. A message whose reused connection was found gone before the
    server saw it is sent again on another connection, once.

    Every L{Deferred} that L{send} returns fires with a L{SendResult}, never
    with a failure.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        settings: ClientSettings | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_per_destination: int = MAX_PER_DESTINATION,
        idle_timeout: float = IDLE_TIMEOUT,
        max_messages_per_connection: int = MAX_MESSAGES_PER_CONNECTION,
        tls_failure_memory: float = TLS_FAILURE_MEMORY,
        endpoint_factory: EndpointFactory | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param reactor: connects (unless C{endpoint_factory} is given) and
            keeps time (an C{IReactorTime}) unless C{clock} is given.
        @param settings: HELO name, timeouts, pipelining.
        @param max_connections: connections at once, in all; at least 1.
        @param max_per_destination: connections at once to one host:port;
            at least 1.
        @param idle_timeout: seconds an idle connection is kept.
        @param max_messages_per_connection: messages before a connection is
            replaced; at least 1.
        @param tls_failure_memory: see L{TLS_FAILURE_MEMORY}.
        @param endpoint_factory: makes the endpoint for a host and port; by
            default a TCP endpoint for an IP address, a L{HostnameEndpoint}
            for a name.
        @param clock: for every timeout and deadline; the reactor by default.
        """
        for name, value in (
            ("max_connections", max_connections),
            ("max_per_destination", max_per_destination),
            ("max_messages_per_connection", max_messages_per_connection),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self.settings = settings if settings is not None else ClientSettings()
        self._max_connections = max_connections
        self._max_per_destination = max_per_destination
        self._idle_timeout = idle_timeout
        self._max_messages = max_messages_per_connection
        self._tls_failure_memory = tls_failure_memory
        self._endpoint_factory = endpoint_factory or self._hostname_endpoint
        self._routes: dict[Route, _RouteState] = {}
        self._wanting: dict[Route, _RouteState] = {}
        self._per_host: dict[tuple[str, int], int] = {}
        self._total = 0
        self._freeing = 0
        self._tls_broken: dict[Route, float] = {}
        self._closing = False
        self._closed_waiters: list[Deferred[None]] = []
        self._pumping = False
        self._pump_again = False

    # -- public

    @property
    def connections(self) -> int:
        """
        Connections open (or opening, or closing) now.
        """
        return self._total

    def connections_to(self, host: str, port: int) -> int:
        """
        Connections open (or opening, or closing) to C{host:port} now.
        """
        return self._per_host.get((host.lower(), port), 0)

    def send(
        self,
        host: str,
        port: int,
        envelope: Envelope,
        body: bytes,
        policy: SessionPolicy | None = None,
    ) -> Deferred[SendResult]:
        """
        Send one message through C{host:port}.

        @param host: a host name or IP address.
        @param port: the TCP port.
        @param envelope: the sender and the recipients to send to there
            (all of them; an MX relay passes the recipients of one domain).
        @param body: the message, CRLF line ends, not dot-stuffed.
        @param policy: TLS and AUTH; opportunistic STARTTLS without AUTH by
            default.
        @return: fires with the outcome per recipient, never fails.
        """
        if not envelope.recipients:
            return succeed(SendResult(DeliveryResult()))
        if self._closing:
            return succeed(_all_deferred(envelope, "the relay is stopping"))
        route = self._effective(Route(host.lower(), port, policy or SessionPolicy()))
        job = _Job(envelope, body, Deferred())
        state = self._state(route)
        state.queue.append(job)
        self._wanting.setdefault(route, state)
        self._pump(state)
        return job.result

    def close(self, timeout: float = CLOSE_TIMEOUT) -> Deferred[None]:
        """
        Stop: messages not yet started are deferred, idle connections quit,
        messages under way finish (or, after C{timeout} seconds, their
        connections are aborted and they are deferred).

        @return: fires once every connection is closed.
        """
        self._closing = True
        for state in list(self._routes.values()):
            self._fail_queue(state, "the relay is stopping")
            for conn in list(state.conns):
                if conn.state is _State.IDLE:
                    self._wake(conn, None)
                elif conn.state is _State.CONNECTING:
                    self._stop_opening(conn)
        if self._total == 0:
            return succeed(None)
        closed: Deferred[None] = Deferred()
        self._closed_waiters.append(closed)
        timer = self._clock.callLater(timeout, self._abort_all, "the relay is stopping")

        def stop_timer(result: None) -> None:
            if timer.active():
                timer.cancel()

        return closed.addCallback(stop_timer)

    # -- routes and the queue

    def _effective(self, route: Route) -> Route:
        until = self._tls_broken.get(route)
        if until is None:
            return route
        if self._clock.seconds() >= until:
            del self._tls_broken[route]
            return route
        return self._plaintext(route)

    @staticmethod
    def _plaintext(route: Route) -> Route:
        return evolve(route, policy=evolve(route.policy, tls=route.policy.tls.without_tls()))

    def _state(self, route: Route) -> _RouteState:
        state = self._routes.get(route)
        if state is None:
            state = self._routes[route] = _RouteState(route)
        return state

    def _fail_queue(self, state: _RouteState, reason: str) -> None:
        jobs = list(state.queue)
        state.queue.clear()
        self._wanting.pop(state.route, None)
        for job in jobs:
            job.result.callback(_all_deferred(job.envelope, reason))

    def _pump(self, state: _RouteState | None = None) -> None:
        """
        Give waiting messages to idle connections, open the connections the
        limits allow, and close idle connections whose slots waiting routes
        need.

        @param state: serve only this route (it has a new message: were a
            slot free, no other route would be waiting for it).
        """
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            only = state
            while self._pump_again:
                self._pump_again = False
                states = [only] if only is not None else list(self._wanting.values())
                only = None
                blocked = sum(self._serve(state) for state in states)
                self._free_slots(blocked - self._freeing)
        finally:
            self._pumping = False

    def _serve(self, state: _RouteState) -> int:
        """
        @return: how many more connections the route could use were the
            overall limit not reached.
        """
        while state.queue and state.idle:
            self._wake(state.idle[-1], state.queue.popleft())
        spare = len(state.queue) - state.connecting()
        while spare > 0 and self._may_open(state.route):
            self._open(state)
            spare -= 1
        if not state.queue:
            self._wanting.pop(state.route, None)
        if spare <= 0 or self._closing:
            return 0
        route = state.route
        room = self._max_per_destination - self._per_host.get((route.host, route.port), 0)
        return max(0, min(spare, room))

    def _may_open(self, route: Route) -> bool:
        return (
            not self._closing
            and self._total < self._max_connections
            and self._per_host.get((route.host, route.port), 0) < self._max_per_destination
        )

    def _free_slots(self, wanted: int) -> None:
        """
        Close up to C{wanted} idle connections (of routes with nothing to
        send: the others have none idle).
        """
        if wanted <= 0:
            return
        idle = [conn for state in self._routes.values() for conn in state.idle]
        for conn in idle[:wanted]:
            conn.freeing = True
            self._freeing += 1
            self._wake(conn, None)

    # -- connections

    def _hostname_endpoint(self, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        # An address needs no name resolution (a round trip to a thread).
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, port, timeout=timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, port, timeout=timeout)
        return HostnameEndpoint(self._reactor, host, port, timeout=timeout)

    def _open(self, state: _RouteState) -> None:
        route = state.route
        conn = _Conn(route)
        state.conns.add(conn)
        key = (route.host, route.port)
        self._per_host[key] = self._per_host.get(key, 0) + 1
        self._total += 1
        ensureDeferred(self._run(state, conn)).addErrback(
            lambda failure: self._log.failure(
                "connection to {peer} failed", failure, peer=peer_name(route.host, route.port)
            )
        )

    async def _run(self, state: _RouteState, conn: _Conn) -> None:
        try:
            await self._work(state, conn)
        finally:
            conn.state = _State.CLOSING
            if conn.connection is not None:
                await self._shutdown(conn.connection)
            self._release(state, conn)

    async def _work(self, state: _RouteState, conn: _Conn) -> None:
        try:
            connection = await self._connect(conn)
        except SessionFailed as failure:
            self._opening_failed(state, failure)
            return
        except Exception:
            # Failing what waits stops a bug from reconnecting forever.
            self._log.failure(
                "opening a session with {peer} failed",
                peer=peer_name(conn.route.host, conn.route.port),
            )
            self._fail_queue(state, "internal error")
            return
        job: _Job | None = None
        finished: tuple[_Job, SendResult] | None = None
        try:
            while True:
                # Take the next message (or become idle) before reporting
                # the last one, so that mail its caller sends at once comes
                # to this connection instead of opening another.
                waiting: Deferred[_Job | None] | None = None
                if self._keep(conn, connection):
                    if state.queue:
                        job = state.queue.popleft()
                    else:
                        waiting = self._idle(state, conn)
                if finished is not None:
                    (done, outcome), finished = finished, None
                    done.result.callback(outcome)
                if job is None:
                    if waiting is None:
                        return
                    job = await waiting
                    if job is None:
                        return
                conn.state = _State.BUSY
                try:
                    outcome = await connection.send(job.envelope, job.body)
                except StaleConnection as stale:
                    self._requeue(state, job, stale.reason)
                    job = None
                    return
                finished, job = (job, outcome), None
                conn.messages += 1
        except Exception:
            self._log.failure("sending through {peer} failed", peer=connection.name)
            if finished is not None and not finished[0].result.called:
                finished[0].result.callback(finished[1])
            if job is not None and not job.result.called:
                job.result.callback(_all_deferred(job.envelope, "internal error"))

    def _keep(self, conn: _Conn, connection: SMTPConnection) -> bool:
        return (
            not self._closing
            and not conn.freeing
            and connection.usable
            and conn.messages < self._max_messages
        )

    async def _connect(self, conn: _Conn) -> SMTPConnection:
        route = conn.route
        name = peer_name(route.host, route.port)
        timeouts = self.settings.timeouts
        endpoint = self._endpoint_factory(route.host, route.port, timeouts.connect)
        connecting = endpoint.connect(SMTPClientFactory(self._clock, timeouts.greeting))
        connecting.addTimeout(timeouts.connect, self._clock)
        conn.connecting = connecting
        try:
            protocol = await connecting
        except CancelledError:
            raise SessionFailed("the relay is stopping") from None
        except (DeferredTimeout, ConnectTimeout):
            raise SessionFailed(
                f"timed out after {timeouts.connect:g} s connecting to {name}"
            ) from None
        except Exception as error:
            raise SessionFailed(f"cannot connect to {name}: {error}") from None
        finally:
            conn.connecting = None
        assert isinstance(protocol, SMTPClientProtocol)
        connection = SMTPConnection(protocol, route.host, route.port, route.policy, self.settings)
        conn.connection = connection
        connection.closed.addCallback(lambda _: self._wake(conn, None))
        if self._closing:
            connection.abort("the relay is stopping")
        await connection.open()
        return connection

    def _stop_opening(self, conn: _Conn) -> None:
        if conn.connecting is not None:
            conn.connecting.cancel()
        elif conn.connection is not None:
            conn.connection.abort("the relay is stopping")

    def _opening_failed(self, state: _RouteState, failure: SessionFailed) -> None:
        route = state.route
        name = peer_name(route.host, route.port)
        tls = route.policy.tls
        if state.live():
            # A working connection of the route takes what waits.
            self._log.info(
                "could not open another session with {peer}: {reason}",
                peer=name,
                reason=failure.reason,
            )
            return
        if (
            isinstance(failure, TLSFailed)
            and tls.starttls is StartTLS.OPPORTUNISTIC
            and tls.fallback is TLSFallback.PLAINTEXT
            and not self._closing
        ):
            self._log.warn(
                "{reason}; sending to {peer} without TLS for the next {seconds:g} s",
                reason=failure.reason,
                peer=name,
                seconds=self._tls_failure_memory,
            )
            self._tls_broken[route] = self._clock.seconds() + self._tls_failure_memory
            plain = self._state(self._plaintext(route))
            plain.queue.extend(state.queue)
            state.queue.clear()
            self._wanting.pop(route, None)
            if plain.queue:
                self._wanting.setdefault(plain.route, plain)
            return
        self._log.info(
            "could not open a session with {peer}: {reason}", peer=name, reason=failure.reason
        )
        self._fail_queue(state, failure.reason)

    def _requeue(self, state: _RouteState, job: _Job, reason: str) -> None:
        if job.requeued or self._closing:
            job.result.callback(_all_deferred(job.envelope, reason))
            return
        job.requeued = True
        state.queue.appendleft(job)
        self._wanting.setdefault(state.route, state)

    def _idle(self, state: _RouteState, conn: _Conn) -> Deferred[_Job | None]:
        conn.state = _State.IDLE
        wake: Deferred[_Job | None] = Deferred()
        conn.wake = wake
        conn.idle_timer = self._clock.callLater(self._idle_timeout, self._wake, conn, None)
        state.idle.append(conn)
        if self._wanting:
            # Another route may be waiting for this connection's slot.
            self._pump()
        return wake

    def _wake(self, conn: _Conn, job: _Job | None) -> None:
        wake, conn.wake = conn.wake, None
        if wake is None:
            return
        if conn.idle_timer is not None and conn.idle_timer.active():
            conn.idle_timer.cancel()
        conn.idle_timer = None
        state = self._routes.get(conn.route)
        if state is not None and conn in state.idle:
            state.idle.remove(conn)
        if job is not None:
            conn.state = _State.BUSY
        wake.callback(job)

    async def _shutdown(self, connection: SMTPConnection) -> None:
        await connection.quit()
        if connection.closed.called:
            return
        closed = _when(connection.closed)
        timer = self._clock.callLater(
            self.settings.timeouts.quit, connection.abort, "closing timed out"
        )
        await closed
        if timer.active():
            timer.cancel()

    def _release(self, state: _RouteState, conn: _Conn) -> None:
        route = state.route
        state.conns.discard(conn)
        if conn in state.idle:
            state.idle.remove(conn)
        key = (route.host, route.port)
        self._per_host[key] -= 1
        if not self._per_host[key]:
            del self._per_host[key]
        self._total -= 1
        if conn.freeing:
            self._freeing -= 1
        if not state.conns and not state.queue:
            self._routes.pop(route, None)
        if self._closing:
            if self._total == 0:
                waiters, self._closed_waiters = self._closed_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return
        self._pump()

    def _abort_all(self, reason: str) -> None:
        for state in list(self._routes.values()):
            for conn in list(state.conns):
                if conn.connection is not None:
                    conn.connection.abort(reason)
                else:
                    self._stop_opening(conn)


# -- the smarthost


class RelayURLError(ValueError):
    """
    A C{--relay smtp://...} URL that cannot be used; the message says why
    and never contains the password.
    """


@frozen
class RelayURL:
    """
    A parsed C{smtp://[user:password@]host[:port][?option=value&...]}.

    @ivar starttls: C{opportunistic} (the default) or C{require}.
    @ivar tls_verify: from C{verify=yes|no}; L{None} when not given
        (verify when TLS is required).
    @ivar auth_in_clear: from C{auth_in_clear=yes|no}: send the credentials
        even without TLS.
    """

    host: str
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: StartTLS = StartTLS.OPPORTUNISTIC
    tls_verify: bool | None = None
    auth_in_clear: bool = False


_HOST_NAME = re.compile(
    r"(?=.{1,253}\.?$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?",
)
_YES_NO = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}
_STARTTLS_VALUES = {"opportunistic": StartTLS.OPPORTUNISTIC, "require": StartTLS.REQUIRE}


def parse_relay_url(url: str) -> RelayURL:
    """
    Read a smarthost URL: C{smtp://[user:password@]host[:port][?options]}.

    The user name and password are percent-decoded (write C{%40} for C{@},
    C{%3A} for C{:}, C{%2F} for C{/}, C{%3F} for C{?}, C{%23} for C{#},
    C{%25} for C{%}); an IPv6 address is written in brackets
    (C{smtp://[2001:db8::1]:587}); the port is 25 when not given. Options:
    C{starttls=opportunistic|require}, C{verify=yes|no},
    C{auth_in_clear=yes|no}.

    @raise RelayURLError: for anything else, with a message that names the
        problem and never repeats the password.
    """
    text = url.strip()
    scheme, separator, rest = text.partition("://")
    if not separator or scheme.lower() != "smtp":
        raise RelayURLError("a smarthost URL starts with smtp:// (smtp://host:port)")
    try:
        parts = urlsplit("smtp://" + rest)
    except ValueError:
        # Not the error's text: it can quote the credentials.
        raise RelayURLError(
            "the host part of the smarthost URL is malformed (an IPv6 address is written"
            " in brackets: smtp://[2001:db8::1]:25)"
        ) from None
    if parts.path not in ("", "/") or parts.fragment or "#" in rest:
        raise RelayURLError(
            "a smarthost URL has no path or fragment (write a '/', '?' or '#' in the"
            " user name or password as %2F, %3F or %23)"
        )
    userinfo, at, hostport = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo) if at else (None, None)
    host = _host(hostport)
    port = _port(hostport)
    options = _options(parts.query)
    return RelayURL(host=host, port=port, username=username, password=password, **options)


def _credentials(userinfo: str) -> tuple[str, str]:
    user, colon, password = userinfo.partition(":")
    if not colon or not user or not password:
        raise RelayURLError(
            "credentials in a smarthost URL need a user name and a password"
            " (smtp://user:password@host:port)"
        )
    return unquote(user, errors="strict"), unquote(password, errors="strict")


def _host(hostport: str) -> str:
    if hostport.startswith("["):
        literal, bracket, _ = hostport[1:].partition("]")
        try:
            if not bracket:
                raise ValueError
            return str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise RelayURLError(
                f"{hostport!r} is not an IPv6 address in brackets ([2001:db8::1])"
            ) from None
    host = hostport.rpartition(":")[0] if ":" in hostport else hostport
    if not host:
        raise RelayURLError("a smarthost URL needs a host (smtp://host:port)")
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise RelayURLError(f"{host!r} is not a valid host name") from None
    if not _HOST_NAME.fullmatch(ascii_host):
        raise RelayURLError(f"{host!r} is not a valid host name or IPv4 address")
    return ascii_host


def _port(hostport: str) -> int:
    after = hostport.rpartition("]")[2] if hostport.startswith("[") else hostport
    if ":" not in after:
        if after and hostport.startswith("["):
            raise RelayURLError(f"unexpected {after!r} after the IPv6 address")
        return DEFAULT_PORT
    text = after.rpartition(":")[2]
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise RelayURLError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def _options(query: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise RelayURLError("the options of a smarthost URL are name=value pairs") from None
    seen: set[str] = set()
    for name, value in pairs:
        if name in seen:
            raise RelayURLError(f"the option {name!r} is given twice")
        seen.add(name)
        if name == "starttls":
            if value.lower() not in _STARTTLS_VALUES:
                raise RelayURLError(f"starttls must be opportunistic or require, not {value!r}")
            options["starttls"] = _STARTTLS_VALUES[value.lower()]
        elif name in ("verify", "auth_in_clear"):
            if value.lower() not in _YES_NO:
                raise RelayURLError(f"{name} must be yes or no, not {value!r}")
            options["tls_verify" if name == "verify" else name] = _YES_NO[value.lower()]
        else:
            raise RelayURLError(
                f"unknown option {name!r} (known: starttls, verify, auth_in_clear)"
            )
    return options


@implementer(IOutbound)
class SmarthostOutbound(Service):
    """
    Sends every message to one SMTP server (a smarthost), with STARTTLS and
    AUTH PLAIN/LOGIN, over pooled connections.

    It is a service: deliveries are taken between C{startService} and
    C{stopService}; any other time they are deferred (temporary failure).
    Stopping closes the pool (see L{ConnectionPool.close}).
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        username: str | None = None,
        password: str | None = None,
        starttls: StartTLS | str = StartTLS.OPPORTUNISTIC,
        tls_verify: bool | None = None,
        tls_hostname: str | None = None,
        tls_trust_root: Any = None,
        tls_fallback: TLSFallback | str = TLSFallback.PLAINTEXT,
        allow_auth_in_clear: bool = False,
        settings: ClientSettings | None = None,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        max_messages_per_connection: int = MAX_MESSAGES_PER_CONNECTION,
        close_timeout: float = CLOSE_TIMEOUT,
        endpoint_factory: EndpointFactory | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param reactor: connects and keeps time.
        @param host: the smarthost's name or address.
        @param port: its port.
        @param username: for AUTH; with C{password}, or neither.
        @param password: for AUTH; never logged.
        @param starttls: C{opportunistic} or C{require} (or a L{StartTLS}).
        @param tls_verify: check the smarthost's certificate; by default
            only when TLS is required.
        @param tls_hostname: the name its certificate must carry; C{host}
            by default.
        @param tls_trust_root: the authorities trusted; the platform's by
            default.
        @param tls_fallback: with opportunistic STARTTLS, what a failed
            handshake leads to (see L{TLSFallback}).
        @param allow_auth_in_clear: send the credentials without TLS.
        @param settings: HELO name, timeouts, pipelining.
        @param max_connections: connections at once (C{--concurrency}).
        @param idle_timeout: see L{IDLE_TIMEOUT}.
        @param max_messages_per_connection: see L{MAX_MESSAGES_PER_CONNECTION}.
        @param close_timeout: see L{CLOSE_TIMEOUT}.
        @param endpoint_factory: see L{ConnectionPool}.
        @param clock: see L{ConnectionPool}.
        """
        if (username is None) != (password is None):
            raise ValueError("give both a user name and a password, or neither")
        starttls = StartTLS(starttls)
        if starttls is StartTLS.NEVER:
            raise ValueError("starttls must be opportunistic or require")
        verify = starttls is StartTLS.REQUIRE if tls_verify is None else tls_verify
        self.host = host
        self.port = port
        self.policy = SessionPolicy(
            tls=TLSPolicy(
                starttls=starttls,
                fallback=TLSFallback(tls_fallback),
                verify=verify,
                hostname=tls_hostname,
                trust_root=tls_trust_root,
            ),
            credentials=(
                Credentials(username, password)
                if username is not None and password is not None
                else None
            ),
            allow_auth_in_clear=allow_auth_in_clear,
        )
        self._close_timeout = close_timeout
        self.pool = ConnectionPool(
            reactor,
            settings,
            max_connections=max_connections,
            max_per_destination=max_connections,
            idle_timeout=idle_timeout,
            max_messages_per_connection=max_messages_per_connection,
            endpoint_factory=endpoint_factory,
            clock=clock,
        )

    @classmethod
    def from_url(cls, reactor: Any, url: str | RelayURL, **kwargs: Any) -> SmarthostOutbound:
        """
        @param url: C{smtp://...}, see L{parse_relay_url}.
        @param kwargs: the other arguments of the constructor.
        @raise RelayURLError: when C{url} cannot be used.
        """
        parsed = url if isinstance(url, RelayURL) else parse_relay_url(url)
        return cls(
            reactor,
            parsed.host,
            parsed.port,
            username=parsed.username,
            password=parsed.password,
            starttls=parsed.starttls,
            tls_verify=parsed.tls_verify,
            allow_auth_in_clear=parsed.auth_in_clear,
            **kwargs,
        )

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        """
        Send the message to the smarthost; never fails (see L{IOutbound}).
        """
        if not self.running:
            return succeed(_all_deferred(envelope, "the smarthost relay is not running").result)
        sent = self.pool.send(self.host, self.port, envelope, body, self.policy)
        return sent.addCallback(lambda outcome: outcome.result)

    def stopService(self) -> Deferred[None]:
        """
        Defer what waits, let messages under way finish, close connections.
        """
        super().stopService()
        return self.pool.close(self._close_timeout)
