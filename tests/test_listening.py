"""
Tests for L{smtpgw.listening.MultiPortListener}.

The bookkeeping is tested against a memory reactor; binding, serving and the
speed of binding thousands of ports against the real reactor on 127.0.0.1;
the exit status under C{twistd} with a real process.
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ParamSpec, cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpgw.listening import (
    CONNECTION_HEADROOM,
    MultiPortListener,
    NoPortBound,
    PortFailure,
)
from smtpgw.ports import DEFAULT_PORTS, parse_ports
from tests.twisted_support import async_test, waiting_connections

ROOT = Path(__file__).resolve().parent.parent

P = ParamSpec("P")


def capturing_logger(events: list[dict[str, Any]]) -> Logger:
    """
    @return: a logger whose events go into C{events} only.
    """
    return Logger(observer=cast(ILogObserver, events.append))


class RefusingReactor(MemoryReactorClock):
    """
    A memory reactor on which some ports cannot be bound.

    @ivar refused: port number to the system error raised for it.
    """

    def __init__(self, refused: dict[int, int]) -> None:
        super().__init__()
        self.refused = refused

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        if port in self.refused:
            code = self.refused[port]
            raise CannotListenError(interface, port, OSError(code, os.strerror(code)))
        listening: IListeningPort = super().listenTCP(port, factory, backlog, interface)
        return listening


def make_listener(
    reactor: IReactorTCP,
    ports: list[int],
    events: list[dict[str, Any]],
    **kwargs: Any,
) -> MultiPortListener:
    """
    @return: a listener on C{ports} of 127.0.0.1 with a plain factory, logging
        into C{events} and leaving this process's open-file limit alone.
    """
    kwargs.setdefault("raise_limit", lambda needed: needed)
    return MultiPortListener(
        reactor,
        ports,
        "127.0.0.1",
        ServerFactory.forProtocol(Protocol),
        log=capturing_logger(events),
        **kwargs,
    )


def test_binds_every_port_with_the_same_factory() -> None:
    """
    Each port is listened on with the given factory, backlog and interface,
    and a one-line info summary is logged.
    """
    reactor = MemoryReactorClock()
    events: list[dict[str, Any]] = []
    listener = make_listener(reactor, [587, 25, 26], events, backlog=7)
    listener.startService()
    assert listener.running
    assert listener.bound_ports == (25, 26, 587)
    assert listener.failures == ()
    assert [(port, backlog, iface) for port, _, backlog, iface in reactor.tcpServers] == [
        (25, 7, "127.0.0.1"),
        (26, 7, "127.0.0.1"),
        (587, 7, "127.0.0.1"),
    ]
    assert all(factory is listener.factory for _, factory, _, _ in reactor.tcpServers)
    [summary] = events
    assert summary["log_level"] == LogLevel.info
    assert (summary["bound"], summary["total"]) == (3, 3)


def test_ports_are_sorted_and_deduplicated() -> None:
    """
    A port given twice is bound once rather than failing as busy.
    """
    listener = make_listener(MemoryReactorClock(), [25, 25, 23], [])
    assert listener.ports == (23, 25)


@pytest.mark.parametrize("ports", [[], [0], [65536], [25, -1]])
def test_refuses_impossible_port_lists(ports: list[int]) -> None:
    """
    No ports, port 0 and numbers beyond 1..65535 are refused at construction.
    """
    with pytest.raises(ValueError, match=r"ports to listen on|not a TCP port"):
        make_listener(MemoryReactorClock(), ports, [])


def test_raises_open_file_limit_before_binding() -> None:
    """
    The open-file limit is raised for one descriptor per port plus the
    connection headroom, before the first port is bound.
    """
    reactor = MemoryReactorClock()
    calls: list[tuple[int, int]] = []

    def raise_limit(needed: int) -> int:
        calls.append((needed, len(reactor.tcpServers)))
        return needed

    listener = make_listener(reactor, list(range(1025, 1035)), [], raise_limit=raise_limit)
    listener.startService()
    assert calls == [(10 + CONNECTION_HEADROOM, 0)]


def test_each_failed_port_is_reported_by_number_and_reason() -> None:
    """
    Ports that cannot be bound are recorded and logged one by one with their
    number and the system's reason; the others are served.
    """
    reactor = RefusingReactor({25: errno.EACCES, 587: errno.EADDRINUSE})
    events: list[dict[str, Any]] = []
    listener = make_listener(reactor, [23, 25, 26, 587, 1025], events)
    listener.startService()
    assert listener.running
    assert listener.bound_ports == (23, 26, 1025)
    assert listener.failures == (
        PortFailure(25, os.strerror(errno.EACCES), errno.EACCES),
        PortFailure(587, os.strerror(errno.EADDRINUSE), errno.EADDRINUSE),
    )
    assert str(listener.failures[0]) == "port 25: Permission denied"
    per_port = [e for e in events if "port" in e]
    assert [(e["port"], e["reason"], e["errno"], e["log_level"]) for e in per_port] == [
        (25, "Permission denied", errno.EACCES, LogLevel.warn),
        (587, "Address already in use", errno.EADDRINUSE, LogLevel.warn),
    ]
    [summary] = [e for e in events if "total" in e]
    assert summary["log_level"] == LogLevel.warn
    assert (summary["bound"], summary["failed"], summary["failed_ports"]) == (3, 2, "25,587")


def test_failure_without_system_error_keeps_the_text() -> None:
    """
    A bind error that is not an OSError is reported with its text and no
    error number.
    """

    class OddReactor(MemoryReactorClock):
        def listenTCP(self, port: int, *args: Any, **kwargs: Any) -> IListeningPort:
            raise CannotListenError("127.0.0.1", port, "odd")

    listener = make_listener(OddReactor(), [25], [])
    with pytest.raises(NoPortBound):
        listener.startService()
    assert listener.failures == (PortFailure(25, "odd", None),)


def test_start_fails_when_no_port_can_be_bound() -> None:
    """
    When every port fails, start raises L{NoPortBound} naming the ports and
    reasons, and the service does not count as running.
    """
    reactor = RefusingReactor({25: errno.EACCES, 587: errno.EADDRINUSE})
    listener = make_listener(reactor, [25, 587], [])
    with pytest.raises(NoPortBound) as raised:
        listener.startService()
    assert not listener.running
    assert listener.bound_ports == ()
    assert raised.value.failures == listener.failures
    assert str(raised.value) == (
        "could not listen on any port of 127.0.0.1 (2 tried):"
        " port 25: Permission denied; port 587: Address already in use"
    )


def test_all_fail_message_is_bounded() -> None:
    """
    The error for thousands of failed ports names the first five and counts
    the rest.
    """
    ports = list(range(1025, 1025 + 3000))
    reactor = RefusingReactor(dict.fromkeys(ports, errno.EMFILE))
    listener = make_listener(reactor, ports, [])
    with pytest.raises(NoPortBound, match=r"port 1029: Too many open files; and 2995 more$"):
        listener.privilegedStartService()


def test_privileged_start_binds_and_start_does_not_bind_again() -> None:
    """
    Under twistd the ports are bound in privilegedStartService (as root);
    startService after it keeps those ports.
    """
    reactor = MemoryReactorClock()
    listener = make_listener(reactor, [25, 587], [])
    listener.privilegedStartService()
    assert listener.bound_ports == (25, 587)
    assert not listener.running
    listener.startService()
    assert listener.running
    assert len(reactor.tcpServers) == 2


def test_privileged_start_failure_raises() -> None:
    """
    With nothing bindable, privilegedStartService raises so twistd stops.
    """
    listener = make_listener(RefusingReactor({25: errno.EACCES}), [25], [])
    with pytest.raises(NoPortBound):
        listener.privilegedStartService()


@implementer(IListeningPort)
class SlowClosingPort:
    """
    A listening port whose close completes when the test says so.
    """

    def __init__(self) -> None:
        self.closing: Deferred[None] | None = None

    def startListening(self) -> None:
        pass

    def stopListening(self) -> Deferred[None]:
        self.closing = Deferred()
        return self.closing

    def getHost(self) -> Any:
        return None


class SlowClosingReactor(MemoryReactorClock):
    """
    A memory reactor handing out L{SlowClosingPort}s.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[SlowClosingPort] = []

    def listenTCP(self, port: int, *args: Any, **kwargs: Any) -> IListeningPort:
        self.ports.append(SlowClosingPort())
        return self.ports[-1]


def test_stop_waits_for_every_port_to_close() -> None:
    """
    stopService closes every port and fires only when all have closed.
    """
    reactor = SlowClosingReactor()
    listener = make_listener(reactor, [25, 26, 27], [])
    listener.startService()
    stopped = listener.stopService()
    assert not listener.running
    assert listener.bound_ports == ()
    fired: list[None] = []
    stopped.addCallback(fired.append)
    assert all(port.closing is not None for port in reactor.ports)
    for port in reactor.ports[:-1]:
        assert port.closing is not None
        port.closing.callback(None)
    assert fired == []
    last = reactor.ports[-1].closing
    assert last is not None
    last.callback(None)
    assert fired == [None]


def test_restart_binds_again() -> None:
    """
    After a stop, a start listens again.
    """
    reactor = MemoryReactorClock()
    listener = make_listener(reactor, [25], [])
    listener.startService()
    listener.stopService()
    listener.startService()
    assert listener.bound_ports == (25,)
    assert len(reactor.tcpServers) == 2


# Real sockets on 127.0.0.1.


class Greeter(Protocol):
    """
    Says which port it answered on, then hangs up.
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        port = cast(IPv4Address, self.transport.getHost()).port
        self.transport.write(f"port {port}\r\n".encode())
        self.transport.loseConnection()


class Collector(Protocol):
    """
    Collects what the server says until it hangs up.
    """

    def __init__(self) -> None:
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.received)


async def greeting(reactor: Any, port: int) -> bytes:
    """
    @return: what a server on 127.0.0.1:C{port} says before hanging up.
    """
    collector = Collector()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), collector)
    return await collector.done


@pytest.fixture
def busy_socket() -> Iterator[socket.socket]:
    """
    A socket listening on a free port of 127.0.0.1, held for the test.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


def free_ports(count: int) -> list[int]:
    """
    @return: ports of 127.0.0.1 that were free a moment ago.
    """
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def bind_error(port: int) -> int | None:
    """
    Try to bind C{port} of 127.0.0.1 the way Twisted does.

    @return: the error number, or L{None} if the port was free.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as error:
            return error.errno
    return None


def real_listener(ports: list[int], events: list[dict[str, Any]]) -> MultiPortListener:
    """
    @return: a listener on the real reactor serving L{Greeter}.
    """
    from twisted.internet import reactor

    return MultiPortListener(
        reactor,
        ports,
        "127.0.0.1",
        ServerFactory.forProtocol(Greeter),
        log=capturing_logger(events),
    )


async def check_truthful_report(listener: MultiPortListener, sample: int) -> None:
    """
    Check that every port is either bound or failed; that each failed port is
    really unbindable for the reason given; and that a sample of the bound
    ports answer.
    """
    from twisted.internet import reactor

    bound = set(listener.bound_ports)
    failed = {failure.port: failure for failure in listener.failures}
    assert bound | set(failed) == set(listener.ports)
    assert not bound & set(failed)
    for port, failure in failed.items():
        if failure.errno == errno.EACCES:
            assert os.geteuid() != 0, failure
        else:
            assert failure.errno == errno.EADDRINUSE, failure
            assert bind_error(port) == errno.EADDRINUSE, failure
    chosen = random.sample(sorted(bound), min(sample, len(bound)))
    for port in [*chosen, min(bound), max(bound)]:
        assert await greeting(reactor, port) == f"port {port}\r\n".encode()


@async_test
async def test_real_busy_port_is_reported_others_serve(busy_socket: socket.socket) -> None:
    """
    On the real reactor, a port already taken by another socket is reported
    with its number and "Address already in use", and the other ports accept
    connections; after stop they refuse them.
    """
    from twisted.internet import reactor

    busy = busy_socket.getsockname()[1]
    free = free_ports(3)
    events: list[dict[str, Any]] = []
    listener = real_listener([*free, busy], events)
    listener.startService()
    try:
        assert listener.bound_ports == tuple(sorted(free))
        assert listener.failures == (
            PortFailure(busy, "Address already in use", errno.EADDRINUSE),
        )
        assert [(e["port"], e["reason"]) for e in events if "reason" in e] == [
            (busy, "Address already in use")
        ]
        for port in free:
            assert await greeting(reactor, port) == f"port {port}\r\n".encode()
    finally:
        await listener.stopService()
    for port in free:
        assert bind_error(port) is None


@async_test
async def test_real_two_thousand_ports_bind_and_answer() -> None:
    """
    2,000 consecutive ports (below the ephemeral range, so other tests'
    clients do not collide) are bound on 127.0.0.1; each outcome is reported
    truthfully and a sample of the bound ports answer.
    """
    ports = list(range(20000, 22000))
    events: list[dict[str, Any]] = []
    listener = real_listener(ports, events)
    listener.startService()
    try:
        assert len(listener.bound_ports) > len(ports) // 2, listener.failures[:5]
        await check_truthful_report(listener, sample=100)
    finally:
        await listener.stopService()


@async_test
async def test_real_default_ports_bind_quickly() -> None:
    """
    The 3,980 default ports bind on 127.0.0.1 in well under a few seconds
    (about 0.1 s on epoll); ports this machine already uses, or the
    privileged ones when not root, are reported truthfully.
    """
    events: list[dict[str, Any]] = []
    listener = real_listener(list(parse_ports(DEFAULT_PORTS)), events)
    listener.startService()
    try:
        print(f"bound {len(listener.bound_ports)} ports in {listener.bind_seconds:.3f}s")
        assert listener.bind_seconds < 5
        await check_truthful_report(listener, sample=50)
    finally:
        await listener.stopService()


# The open-file limit and twistd, in child processes.

_LOW_LIMIT_CHILD = """
import json, resource, sys
from twisted.internet import reactor
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from smtpgw.listening import MultiPortListener
raise_it = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 8192))
kwargs = {} if raise_it else {"raise_limit": lambda needed: None}
listener = MultiPortListener(
    reactor, range(23000, 23600), "127.0.0.1", ServerFactory.forProtocol(Protocol),
    log=Logger(observer=lambda event: None), **kwargs,
)
listener.startService()
print(json.dumps({
    "bound": len(listener.bound_ports),
    "reasons": sorted({f.reason for f in listener.failures}),
    "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
}))
"""


def run_low_limit_child(raise_it: bool) -> dict[str, Any]:
    """
    Bind 600 ports in a child whose open-file limit starts at 256.

    @param raise_it: let the listener raise the limit.
    @return: how many were bound, the failure reasons, the final limit.
    """
    completed = subprocess.run(
        [sys.executable, "-c", _LOW_LIMIT_CHILD, json.dumps(raise_it)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(completed.stdout.splitlines()[-1])
    return result


def test_low_open_file_limit_fails_ports_without_raising_it() -> None:
    """
    Control: with a soft limit of 256 and the limit left alone, ports beyond
    it fail with "Too many open files" (and are reported as such).
    """
    outcome = run_low_limit_child(raise_it=False)
    assert outcome["bound"] < 256
    assert "Too many open files" in outcome["reasons"]


def test_listener_raises_open_file_limit_to_fit_its_ports() -> None:
    """
    With the same low start, the listener raises its limit and binds every
    port that is free.
    """
    outcome = run_low_limit_child(raise_it=True)
    assert outcome["soft"] >= 600 + CONNECTION_HEADROOM
    assert "Too many open files" not in outcome["reasons"]
    assert outcome["bound"] + len(outcome["reasons"]) > 500


TAC = """
import os
from twisted.application.service import Application
from twisted.internet import reactor
from twisted.internet.protocol import Protocol, ServerFactory
from smtpgw.listening import MultiPortListener

application = Application("listening-test")
ports = [int(port) for port in os.environ["TEST_PORTS"].split(",")]
MultiPortListener(
    reactor, ports, "127.0.0.1", ServerFactory.forProtocol(Protocol)
).setServiceParent(application)
"""


def test_twistd_exits_non_zero_when_no_port_can_be_bound(
    tmp_path: Path, busy_socket: socket.socket
) -> None:
    """
    Under twistd, a gateway that cannot bind any port exits with a non-zero
    status and says which port failed and why.
    """
    busy = busy_socket.getsockname()[1]
    tac = tmp_path / "listening.tac"
    tac.write_text(textwrap.dedent(TAC))
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "--logfile=-",
            "-y",
            str(tac),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TEST_PORTS": str(busy)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output
    assert f"port {busy}: Address already in use" in output
    assert "NoPortBound" in output


def test_bind_only_listens_without_accepting_and_reports_a_busy_port() -> None:
    """
    bind_only binds and listens (a client's connect completes, queued by
    the kernel) without accepting in this process; a port already bound
    fails with CannotListenError naming it.
    """
    from smtpgw.listening import bind_only

    bound = bind_only(0, None, 5, "127.0.0.1")
    try:
        port = bound.socket.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        with pytest.raises(CannotListenError) as info:
            bind_only(port, None, 5, "127.0.0.1")
        assert info.value.port == port
    finally:
        bound.stopListening()
    assert bound.socket.fileno() == -1


def test_a_sole_acceptor_takes_every_waiting_connection_at_once() -> None:
    """
    With C{alone=True} (one acceptor process) there is no one to take turns
    with: one wake-up accepts every connection waiting, as Twisted's own
    port does.
    """
    from twisted.internet import reactor

    from smtpgw.listening import accept_taking_turns
    from smtpgw.promptwrites import PromptServer

    with waiting_connections(3) as (bound, factory, built):
        port = accept_taking_turns(reactor, bound.fileno(), factory, alone=True)
        try:
            port.doRead()
            assert len(built) == 3
            assert all(isinstance(p.transport, PromptServer) for p in built)
        finally:
            port.stopListening()
        assert bound.socket.fileno() >= 0


def test_a_shared_port_accepts_one_connection_per_wake_up() -> None:
    """
    accept_taking_turns accepts one connection each time the socket is
    readable (Twisted's own port takes a whole burst), so processes sharing
    the socket take turns; the socket given stays open for its owner.
    """
    from twisted.internet import reactor

    from smtpgw.listening import accept_taking_turns
    from smtpgw.promptwrites import PromptServer

    with waiting_connections(3) as (bound, factory, built):
        port = accept_taking_turns(reactor, bound.fileno(), factory)
        try:
            port.doRead()
            assert len(built) == 1
            port.doRead()
            assert len(built) == 2
            assert all(isinstance(p.transport, PromptServer) for p in built)
        finally:
            port.stopListening()
        assert bound.socket.fileno() >= 0
