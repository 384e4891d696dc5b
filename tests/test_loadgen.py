"""
The benchmark's load generator sends what it claims to: against an in-process
Twisted ESMTP server, every message arrives intact and is counted once, and
failures are counted as failures. Nothing here is timed.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ParamSpec, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread

from bench.loadgen import LoadResult, LoadSpec, build_message, dot_stuff, run_here, run_load, split
from bench.tls import CertFiles, make_self_signed
from bench.twisted_server import build_factory
from tests.twisted_support import async_test

USERS = {"bench": "secret"}
P = ParamSpec("P")


async def _load(port: IListeningPort, spec: LoadSpec, workers: int = 0) -> LoadResult:
    """
    Run the load in a thread (it has its own asyncio loop) while the reactor
    serves, then stop listening.
    """
    try:
        if workers:
            result: LoadResult = await deferToThread(run_load, spec, workers)
        else:
            result = await deferToThread(run_here, spec)
    finally:
        await maybeDeferred(port.stopListening)
    return result


def _listen(store: list[bytes], tls: CertFiles | None = None, pipelining: bool = True) -> Any:
    from twisted.internet import reactor

    factory = build_factory(USERS, store=store, tls=tls, pipelining=pipelining)
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


def _spec(port: IListeningPort, **kwargs: Any) -> LoadSpec:
    options: dict[str, Any] = {
        "port": cast(IPv4Address, port.getHost()).port,
        "messages": 12,
        "sessions": 4,
        "username": "bench",
        "password": "secret",
        "time_limit": 30.0,
    }
    options.update(kwargs)
    return LoadSpec(**options)


def _expected(spec: LoadSpec) -> list[bytes]:
    return sorted(
        build_message(seq, spec.size, spec.sender, spec.recipient, spec.tag)
        for seq in range(spec.first_seq, spec.first_seq + spec.messages)
    )


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_self_signed(tmp_path_factory.mktemp("tls"))


@async_test
async def test_one_message_per_connection_arrives_intact() -> None:
    """
    With one message per connection and PIPELINING, each message arrives
    byte for byte (dot-stuffing undone by the server) and is counted once.
    """
    store: list[bytes] = []
    port = _listen(store)
    spec = _spec(port, per_session=1)
    result = await _load(port, spec)
    assert (result.accepted, result.failed, result.errors) == (12, 0, {})
    assert result.connections == 12
    assert len(result.latencies) == 12
    assert sorted(store) == _expected(spec)


@async_test
async def test_reused_connections_without_pipelining() -> None:
    """
    With C{per_session=0} each session keeps its connection until no message
    is left; without PIPELINING the commands go one at a time.
    """
    store: list[bytes] = []
    port = _listen(store, pipelining=False)
    spec = _spec(port, per_session=0, sessions=3, messages=15)
    result = await _load(port, spec)
    assert (result.accepted, result.failed, result.connections) == (15, 0, 3)
    assert sorted(store) == _expected(spec)


@async_test
async def test_per_session_limit_opens_new_connections() -> None:
    """
    With C{per_session=2}, one session sends ten messages over five
    connections.
    """
    store: list[bytes] = []
    port = _listen(store)
    spec = _spec(port, per_session=2, sessions=1, messages=10)
    result = await _load(port, spec)
    assert (result.accepted, result.connections) == (10, 5)
    assert sorted(store) == _expected(spec)


@async_test
async def test_starttls_then_auth(certificate: CertFiles) -> None:
    """
    Through STARTTLS and AUTH, messages still arrive intact.
    """
    store: list[bytes] = []
    port = _listen(store, tls=certificate)
    spec = _spec(port, starttls=True, messages=6, sessions=3)
    result = await _load(port, spec)
    assert (result.accepted, result.failed, result.errors) == (6, 0, {})
    assert result.tls is not None
    assert result.tls.startswith("TLSv1.")
    assert sorted(store) == _expected(spec)


@async_test
async def test_handshakes_send_no_mail(certificate: CertFiles) -> None:
    """
    In handshake mode each unit is one STARTTLS + AUTH connection, no mail.
    """
    store: list[bytes] = []
    port = _listen(store, tls=certificate)
    spec = _spec(port, starttls=True, handshake_only=True, messages=5, sessions=2)
    result = await _load(port, spec)
    assert (result.accepted, result.failed, result.connections) == (5, 0, 5)
    assert store == []


@async_test
async def test_refused_auth_counts_as_failed() -> None:
    """
    A refused AUTH is a failure with the server's reply recorded, never a
    message counted as sent.
    """
    store: list[bytes] = []
    port = _listen(store)
    spec = _spec(port, password="wrong", messages=4, sessions=2)
    result = await _load(port, spec)
    assert (result.accepted, result.failed) == (0, 4)
    assert sum(result.errors.values()) == 4
    assert all(error.startswith("auth: 535") for error in result.errors)
    assert store == []


@pytest.fixture
def silent_port() -> Iterator[int]:
    """
    A port whose connections complete but never get a greeting.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def test_time_limit_ends_a_stuck_run(silent_port: int) -> None:
    """
    When the server never answers, the wall-clock cap ends the run and every
    message counts as failed.
    """
    spec = LoadSpec(port=silent_port, messages=3, sessions=3, time_limit=0.3)
    result = run_here(spec)
    assert result.timed_out
    assert (result.accepted, result.failed) == (0, 3)


def test_refused_connections_count_as_failed() -> None:
    """
    A server that is not there fails each message once, and the run ends
    (however many messages: refusals are not handled by recursion).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_here(LoadSpec(port=port, messages=3000, sessions=2, time_limit=30))
    assert (result.accepted, result.failed, result.timed_out) == (0, 3000, False)
    assert sum(result.errors.values()) == 3000
    assert all(error.startswith("connect: ") for error in result.errors)


@async_test
async def test_workers_share_the_run() -> None:
    """
    Two worker processes send disjoint sequence numbers: all messages
    arrive, once each.
    """
    store: list[bytes] = []
    port = _listen(store)
    spec = _spec(port, messages=11, sessions=4)
    result = await _load(port, spec, workers=2)
    assert (result.accepted, result.failed, result.workers) == (11, 0, 2)
    assert sorted(store) == _expected(spec)


def test_split_keeps_counts_and_sequences_apart() -> None:
    """
    Splitting a run keeps the totals and gives each worker its own range
    of sequence numbers.
    """
    parts = split(LoadSpec(port=1, messages=11, sessions=5, first_seq=100), 2)
    assert [(p.messages, p.sessions, p.first_seq) for p in parts] == [(6, 3, 100), (5, 2, 106)]
    assert len(split(LoadSpec(port=1, messages=10, sessions=1), 4)) == 1


@pytest.mark.parametrize("size", [1024, 5 * 1024, 5 * 1024 + 1])
def test_build_message_has_the_requested_size(size: int) -> None:
    """
    Messages have exactly the requested size, CRLF lines only, and a line
    that starts with a dot.
    """
    message = build_message(7, size)
    assert len(message) == size
    assert message.endswith(b"\r\n")
    assert b"\r\n." in message
    assert message.replace(b"\r\n", b"").count(b"\r") == 0
    assert message.replace(b"\r\n", b"").count(b"\n") == 0


def _unstuff(payload: bytes) -> bytes:
    lines = payload.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines[:-2])


@given(st.lists(st.binary().map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))))
def test_dot_stuffing_round_trips(lines: list[bytes]) -> None:
    """
    A receiver that removes one leading dot per line gets the message back,
    and the payload ends with the lone-dot line.
    """
    message = b"".join(line + b"\r\n" for line in lines)
    assert _unstuff(dot_stuff(message)) == message


def test_make_self_signed_writes_pem(tmp_path: Path) -> None:
    """
    The benchmark's certificate helper writes a PEM certificate and key.
    """
    files = make_self_signed(tmp_path)
    assert files.cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" in files.key.read_bytes()
