"""
L{smtpgw.promptwrites}: what a server connection writes during a turn goes
out in one send before the reactor next waits, without watching the socket
for writability, except when the socket cannot take it all.

Each test runs its own L{PromptWritesReactor} (not the global reactor),
turned by hand, with real sockets on 127.0.0.1.
"""

from __future__ import annotations

import itertools
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from attrs import define, field
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python.failure import Failure

from smtpgw.promptwrites import MAX_PASSES, PromptServer, PromptWritesReactor

#: How many turns a test gives the reactor to do what it must.
TURNS = 200


class Echo(Protocol):
    """
    Answers each chunk it reads with one reply per line, and remembers how
    its connection ended.
    """

    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        for line in data.splitlines():
            if line == b"close":
                self.transport.write(b"bye\r\n")  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]
            else:
                self.transport.write(b"ok " + line + b"\r\n")  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        assert reason is not None
        self.lost.append(reason)


@define
class Served:
    """
    A reactor listening on 127.0.0.1 with L{PromptServer} connections, and
    the protocols it built.
    """

    reactor: PromptWritesReactor
    port: Any
    built: list[Echo] = field(factory=list)
    added_writers: list[Any] = field(factory=list)

    def turn(self, until: Callable[[], bool]) -> None:
        """
        Turn the reactor (without waiting) until C{until} says so.
        """
        for _ in range(TURNS):
            if until():
                return
            self.reactor.runUntilCurrent()
            self.reactor.doIteration(0)
        raise AssertionError("the reactor did not get there")

    def connect(self) -> tuple[socket.socket, Echo]:
        """
        A client connected and accepted, with its server protocol.
        """
        count = len(self.built)
        client = socket.create_connection(self.port.socket.getsockname(), timeout=5)
        client.setblocking(False)
        self.turn(lambda: len(self.built) > count)
        return client, self.built[-1]


def received(served: Served, client: socket.socket, size: int) -> bytes:
    """
    Turn the reactor while reading C{size} octets on C{client}.
    """
    chunks: list[bytes] = []
    got = [0]

    def enough() -> bool:
        try:
            chunk = client.recv(1 << 20)
        except BlockingIOError:
            return got[0] >= size
        chunks.append(chunk)
        got[0] += len(chunk)
        return got[0] >= size or not chunk

    served.turn(enough)
    return b"".join(chunks)


def one_iteration(served: Served, timeout: float) -> list[Any]:
    """
    One iteration of the reactor asked to wait up to C{timeout} seconds,
    whose poll never waits.

    @return: the timeout each poll was given.
    """
    timeouts: list[Any] = []
    poller = served.reactor._poller

    class Recording:
        def poll(self, timeout: Any, count: int) -> Any:
            timeouts.append(timeout)
            return poller.poll(0, count)

        def __getattr__(self, name: str) -> Any:
            return getattr(poller, name)

    served.reactor._poller = Recording()
    try:
        served.reactor.doIteration(timeout)
    finally:
        served.reactor._poller = poller
    return timeouts


@pytest.fixture
def served() -> Iterator[Served]:
    reactor = PromptWritesReactor()
    built: list[Echo] = []

    class Factory(ServerFactory):
        def buildProtocol(self, addr: Any) -> Echo:
            built.append(Echo())
            built[-1].factory = self
            return built[-1]

    class Port(tcp.Port):
        transport = PromptServer

    port = Port(0, Factory(), interface="127.0.0.1", reactor=reactor)
    port.startListening()
    result = Served(reactor, port, built)
    add_writer = reactor.addWriter

    def recording(writer: Any) -> None:
        result.added_writers.append(writer)
        add_writer(writer)

    reactor.addWriter = recording  # type: ignore[method-assign]
    try:
        yield result
    finally:
        port.stopListening()
        # Closing the port takes a turn.
        reactor.runUntilCurrent()
        for selectable in reactor.removeAll():
            if selectable is not reactor.waker:
                selectable.connectionLost(Failure(Exception("test over")))
        reactor.waker.connectionLost(None)
        reactor._poller.close()


def test_replies_of_one_turn_go_out_in_one_send_without_watching_the_socket(
    served: Served,
) -> None:
    """
    Two replies written while reading one chunk are sent together, in one
    send, and the socket is never watched for writability.
    """
    client, protocol = served.connect()
    transport = protocol.transport
    sends: list[int] = []
    write_some = transport.writeSomeData  # type: ignore[union-attr]

    def counting(data: Any) -> Any:
        sends.append(len(data))
        return write_some(data)

    transport.writeSomeData = counting  # type: ignore[union-attr]
    client.sendall(b"a\r\nb\r\n")
    assert received(served, client, 12) == b"ok a\r\nok b\r\n"
    assert sends == [12]
    assert served.added_writers == []
    assert transport not in served.reactor.getWriters()
    client.close()


def test_a_reply_is_sent_before_the_reactor_next_waits(served: Served) -> None:
    """
    What a turn wrote is sent at the start of the next poll: a poll that
    would wait for an hour returns at once, with the reply already sent.
    """
    client, protocol = served.connect()
    protocol.transport.write(b"hello\r\n")  # type: ignore[union-attr]
    timeouts = one_iteration(served, 3600)
    assert client.recv(100) == b"hello\r\n"
    assert timeouts == [3600]
    client.close()


def test_a_timer_set_while_sending_shortens_the_poll(served: Served) -> None:
    """
    A timer set while the turn's writes are sent (a producer resumed, say)
    is not held back by the poll's timeout, computed before it was set.
    """
    client, protocol = served.connect()
    transport = protocol.transport
    fired: list[bool] = []
    do_write = transport.doWrite  # type: ignore[union-attr]

    def writing_and_timing() -> Any:
        served.reactor.callLater(0.5, fired.append, True)
        return do_write()

    transport.doWrite = writing_and_timing  # type: ignore[union-attr]
    transport.write(b"x\r\n")  # type: ignore[union-attr]
    timeouts = one_iteration(served, 3600)
    [timeout] = timeouts
    assert 0 < timeout <= 0.5
    client.close()


def test_writes_made_while_sending_are_sent_in_the_same_turn(served: Served) -> None:
    """
    A send that makes another connection write (up to MAX_PASSES in a row)
    sends that too before the poll; past that, the poll does not wait.
    """
    clients = [served.connect() for _ in range(MAX_PASSES + 1)]
    transports = [protocol.transport for _, protocol in clients]
    for this, after in itertools.pairwise(transports):
        do_write = this.doWrite  # type: ignore[union-attr]

        def chained(do_write: Any = do_write, after: Any = after) -> Any:
            after.write(b"next\r\n")
            return do_write()

        this.doWrite = chained  # type: ignore[union-attr]
    transports[0].write(b"first\r\n")  # type: ignore[union-attr]
    timeouts = one_iteration(served, 3600)
    got = [client.recv(100) for client, _ in clients[:MAX_PASSES]]
    assert got == [b"first\r\n"] + [b"next\r\n"] * (MAX_PASSES - 1)
    assert timeouts == [0]
    assert received(served, clients[-1][0], 6) == b"next\r\n"
    for client, _ in clients:
        client.close()


def test_what_the_socket_cannot_take_waits_for_writability_in_order(served: Served) -> None:
    """
    A write larger than the socket can take goes out partly, the rest once
    the socket is writable (watched as Twisted does), all in order; once
    drained, the socket is no longer watched.
    """
    client, protocol = served.connect()
    transport = protocol.transport
    data = bytes(range(256)) * (16 * 1024 * 4)
    transport.write(data)  # type: ignore[union-attr]
    transport.write(b"end")  # type: ignore[union-attr]
    served.reactor.doIteration(0)
    assert served.added_writers == [transport]
    assert transport in served.reactor.getWriters()
    assert received(served, client, len(data) + 3) == data + b"end"
    served.turn(lambda: transport not in served.reactor.getWriters())
    # Drained: the next reply goes out before the next wait again.
    transport.write(b"again")  # type: ignore[union-attr]
    served.reactor.doIteration(0)
    assert received(served, client, 5) == b"again"
    assert served.added_writers == [transport]
    client.close()


def test_a_backed_up_connection_is_not_sent_to_before_it_is_writable(served: Served) -> None:
    """
    While the socket is watched for writability (the kernel's buffer was
    full), more writes are left to the reactor, which sends when the socket
    is writable, instead of being sent again at the end of each turn;
    everything goes out in order once the client reads.
    """
    client, protocol = served.connect()
    transport = protocol.transport
    data = bytes(range(256)) * (16 * 1024 * 4)
    transport.write(data)  # type: ignore[union-attr]
    served.reactor.doIteration(0)
    assert transport in served.reactor.getWriters()
    queued: list[Any] = []
    write_soon = served.reactor.write_soon

    def recording(connection: Any) -> None:
        queued.append(connection)
        write_soon(connection)

    served.reactor.write_soon = recording  # type: ignore[method-assign]
    for n in range(3):
        transport.write(b"more %d" % n)  # type: ignore[union-attr]
        served.reactor.runUntilCurrent()
        served.reactor.doIteration(0)
    assert queued == []
    expected = data + b"more 0more 1more 2"
    assert received(served, client, len(expected)) == expected
    client.close()


def test_lose_connection_sends_what_was_written_then_closes(served: Served) -> None:
    """
    A reply then loseConnection, in one turn: the client reads the reply
    then the end of the stream, and the protocol's connection is lost
    cleanly.
    """
    client, protocol = served.connect()
    client.sendall(b"close\r\n")
    assert received(served, client, 5) == b"bye\r\n"
    served.turn(lambda: bool(protocol.lost))
    client.setblocking(True)
    assert client.recv(10) == b""
    [reason] = protocol.lost
    assert reason.check(ConnectionDone)
    client.close()


def test_a_write_to_a_reset_connection_loses_it_without_an_error(served: Served) -> None:
    """
    A client that reset its connection (SO_LINGER 0) before the reply went
    out: the send fails, the connection is lost, and nothing is logged as
    an error (the test fails on a logged error).
    """
    client, protocol = served.connect()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    for _ in range(3):
        protocol.transport.write(b"x" * 65536)  # type: ignore[union-attr]
        served.reactor.runUntilCurrent()
        served.reactor.doIteration(0)
        if protocol.lost:
            break
    served.turn(lambda: bool(protocol.lost))
    [reason] = protocol.lost
    assert reason.check(ConnectionLost, ConnectionDone)


def test_with_another_reactor_a_prompt_server_writes_as_twisted_does() -> None:
    """
    Under Twisted's own reactor a PromptServer is a plain server
    connection: a write watches the socket for writability.
    """
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    added: list[Any] = []
    reactor.addWriter = added.append  # type: ignore[method-assign]
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=5)
    accepted, address = listener.accept()
    try:
        connection = PromptServer(accepted, Protocol(), address, cast(Any, None), 1, reactor)
        connection.write(b"x")
        assert added == [connection]
        assert not connection.queued
    finally:
        accepted.close()
        client.close()
        listener.close()
        reactor.waker.connectionLost(None)
        reactor._poller.close()
