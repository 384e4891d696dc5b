"""
L{smtpgw.session.GatewaySMTPFactory} listening on 127.0.0.1 in the test
process, with real clients: Python's C{smtplib} (in a thread) and raw
sockets, and a real TLS handshake with a throwaway certificate.
"""

from __future__ import annotations

import datetime
import select
import smtplib
import socket
import ssl
from collections.abc import Iterator
from typing import Any, ParamSpec, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.cred.portal import Portal
from twisted.internet.ssl import CertificateOptions
from twisted.internet.threads import deferToThread

from smtpgw.alerts import MemoryAlertSink
from smtpgw.checker import SmtpUserChecker
from smtpgw.limits import Limits
from smtpgw.model import QueueIdGenerator
from smtpgw.realm import GatewayRealm
from smtpgw.session import GatewaySMTP, GatewaySMTPFactory
from tests.session_fakes import (
    PASSWORD,
    FakeQueue,
    FakeUsers,
    LookupRunner,
    make_user,
)
from tests.twisted_support import async_test

P = ParamSpec("P")
T = TypeVar("T")


def _self_signed_options() -> CertificateOptions:
    """
    Server TLS options with a fresh self-signed P-256 certificate for
    127.0.0.1 (fast to generate, unlike RSA).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtpgw test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(certificate),
    )


class Gateway:
    """
    A factory listening on 127.0.0.1, with fakes behind it.
    """

    def __init__(
        self, *, tls: bool = False, require_tls: bool = False, limits: Limits | None = None
    ) -> None:
        from twisted.internet import reactor

        self.queue = FakeQueue()
        self.alerts = MemoryAlertSink()
        self.users = FakeUsers()
        options = _self_signed_options() if tls else None
        checker = SmtpUserChecker(LookupRunner({"alice": make_user()}), reactor, rounds=4)
        self.factory = GatewaySMTPFactory(
            portal=Portal(GatewayRealm(), [checker]),
            queue=self.queue,
            alerts=self.alerts,
            users=self.users,
            hostname="gw.test",
            limits=limits or Limits(auth_failure_delay=0),
            tls=lambda: options,
            require_tls=require_tls,
            clock=reactor,
            queue_ids=QueueIdGenerator(),
        )
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.address = ("127.0.0.1", self.port.getHost().port)  # type: ignore[attr-defined]

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP(*self.address, local_hostname="client.test", timeout=10)


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    made: list[Gateway] = []
    yield made
    for gateway in made:
        gateway.port.stopListening()


def _no_verify() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _submit(gateway: Gateway, body: bytes, *, starttls: bool = False) -> dict[str, Any]:
    with gateway.smtp() as client:
        client.ehlo()
        if starttls:
            client.starttls(context=_no_verify())
            client.ehlo()
        client.login("alice", PASSWORD)
        refused = client.sendmail("a@example.com", ["b@dest.example", "c@dest.example"], body)
    return refused


BODY = (
    b"From: Alice <a@example.com>\r\nTo: b@dest.example\r\nSubject: e2e\r\n\r\n"
    b".leading dot\r\nbody\r\n"
)


@async_test
async def test_smtplib_submission(gateways: list[Gateway]) -> None:
    """
    smtplib logs in with AUTH PLAIN and sends a message, which is queued
    once with both recipients, dot-stuffing undone.
    """
    gateway = Gateway()
    gateways.append(gateway)
    refused = await deferToThread(_submit, gateway, BODY)
    assert refused == {}
    [(envelope, relayed)] = gateway.queue.submitted
    assert envelope.recipients == ("b@dest.example", "c@dest.example")
    assert envelope.client_ip == "127.0.0.1"
    assert relayed.endswith(b"\r\n\r\n.leading dot\r\nbody\r\n")
    assert b"with ESMTPA id" in relayed
    assert gateway.users.logins[0][0] == "alice"


@async_test
async def test_smtplib_submission_over_starttls(gateways: list[Gateway]) -> None:
    """
    A real TLS handshake after STARTTLS, then AUTH and a message; the
    Received header says ESMTPSA.
    """
    gateway = Gateway(tls=True, require_tls=True)
    gateways.append(gateway)
    assert await deferToThread(_submit, gateway, BODY, starttls=True) == {}
    [(_, relayed)] = gateway.queue.submitted
    assert b"with ESMTPSA id" in relayed


def _login_then_starttls(gateway: Gateway) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    with gateway.smtp() as client:
        client.ehlo()
        client.login("alice", PASSWORD)
        client.starttls(context=_no_verify())
        client.ehlo()
        after = client.mail("a@example.com")
        client.login("alice", PASSWORD)
        again = client.mail("a@example.com")
    return after, again


@async_test
async def test_login_is_forgotten_after_a_real_starttls(gateways: list[Gateway]) -> None:
    """
    A login made in plaintext does not survive the TLS handshake: MAIL gets
    530 until the client logs in again inside TLS.
    """
    gateway = Gateway(tls=True)
    gateways.append(gateway)
    after, again = await deferToThread(_login_then_starttls, gateway)
    assert after[0] == 530
    assert again[0] == 250


def _auth_login_and_big_message(gateway: Gateway, body: bytes) -> dict[str, Any]:
    with gateway.smtp() as client:
        client.ehlo()
        client.user, client.password = "alice", PASSWORD
        code, _ = client.auth("LOGIN", client.auth_login)
        assert code == 235
        return client.sendmail("a@example.com", ["b@dest.example"], body)


@async_test
async def test_auth_login_and_a_message_spanning_many_reads(gateways: list[Gateway]) -> None:
    """
    AUTH LOGIN through smtplib, and a 2 MB message that arrives over many
    TCP reads is reassembled line for line.
    """
    gateway = Gateway()
    gateways.append(gateway)
    lines = b"".join(b"%06d %s\r\n" % (i, b"x" * 60) for i in range(30_000))
    body = b"From: a@example.com\r\nSubject: big\r\n\r\n" + lines
    assert await deferToThread(_auth_login_and_big_message, gateway, body) == {}
    [(_, relayed)] = gateway.queue.submitted
    assert relayed.endswith(b"\r\n\r\n" + lines)


def _raw_exchange(address: tuple[str, int], sends: list[bytes]) -> bytes:
    """
    Send each chunk after reading the server's answer to the previous one;
    return everything read after the last chunk, up to the close.
    """
    with socket.create_connection(address, timeout=10) as sock:
        _read_reply(sock)
        for chunk in sends[:-1]:
            sock.sendall(chunk)
            _read_reply(sock)
        sock.sendall(sends[-1])
        received = b""
        while True:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
        return received


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@async_test
async def test_starttls_injection_over_a_real_socket(gateways: list[Gateway]) -> None:
    """
    C{STARTTLS\\r\\nRSET\\r\\n} in one packet over a real connection: RSET is
    never answered and the server closes the connection.
    """
    gateway = Gateway(tls=True)
    gateways.append(gateway)
    received = await deferToThread(
        _raw_exchange, gateway.address, [b"EHLO attacker\r\n", b"STARTTLS\r\nRSET\r\n"]
    )
    assert b"250 2.0.0" not in received
    assert gateway.queue.submitted == []


@async_test
async def test_bare_lf_smuggling_over_a_real_socket(gateways: list[Gateway]) -> None:
    """
    A message ended with C{<LF>.<LF>} and followed by a second transaction,
    over a real connection: one 550 5.6.0, the close, nothing queued.
    """
    gateway = Gateway()
    gateways.append(gateway)
    from tests.session_fakes import plain

    received = await deferToThread(
        _raw_exchange,
        gateway.address,
        [
            b"EHLO c\r\n",
            b"AUTH PLAIN " + plain() + b"\r\n",
            b"MAIL FROM:<a@example.com>\r\n",
            b"RCPT TO:<b@dest.example>\r\n",
            b"DATA\r\n",
            b"From: a@example.com\r\n\r\nhi\n.\nMAIL FROM:<a@example.com>\r\n"
            b"RCPT TO:<v@dest.example>\r\nDATA\r\nsmuggled\r\n.\r\n",
        ],
    )
    assert received.startswith(b"550 5.6.0 ")
    assert received.count(b"\r\n") == 1
    assert gateway.queue.submitted == []


@pytest.mark.parametrize("count", [3])
@async_test
async def test_concurrent_smtplib_clients(gateways: list[Gateway], count: int) -> None:
    """
    Several clients at once are each served.
    """
    from twisted.internet.defer import gatherResults

    gateway = Gateway()
    gateways.append(gateway)
    results = await gatherResults([deferToThread(_submit, gateway, BODY) for _ in range(count)])
    assert results == [{}] * count
    assert len(gateway.queue.submitted) == count


class _SmallSocketBuffers(GatewaySMTP):
    """
    A session whose socket has small kernel buffers, so that what the
    gateway itself buffers shows quickly.
    """

    def connectionMade(self) -> None:
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        super().connectionMade()


def _flood_without_reading(
    address: tuple[str, int], *, tls: bool, attempt: int = 4 * 1024 * 1024
) -> tuple[int, int, bytes]:
    """
    Pipeline NOOPs without reading a reply until the gateway stops taking
    them (no progress for half a second) or C{attempt} octets went out;
    then read the replies, finish what was cut short, QUIT.

    @return: the NOOPs sent before the gateway stopped taking them, the
        NOOP replies read, and the last reply.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.settimeout(10)
    sock.connect(address)
    conn: socket.socket = sock
    try:
        _read_reply(conn)
        conn.sendall(b"EHLO c\r\n")
        _read_reply(conn)
        if tls:
            conn.sendall(b"STARTTLS\r\n")
            _read_reply(conn)
            conn = _no_verify().wrap_socket(sock, server_hostname="gw.test")
        chunk = b"NOOP\r\n" * 64
        conn.setblocking(False)
        sent = 0
        # A TLS write that would block must be retried with the same data
        # (part of its record may be out already); plain sockets send part.
        unfinished = b""
        while sent < attempt:
            _, writable, _ = select.select([], [conn], [], 0.5)
            if not writable:
                break
            try:
                done = conn.send(chunk[sent % len(chunk) :])
            except (BlockingIOError, ssl.SSLWantWriteError):
                unfinished = chunk[sent % len(chunk) :]
                continue
            unfinished = b""
            sent += done
        conn.settimeout(10)
        replies = b""
        while replies.count(b"\r\n") < sent // 6:
            replies += conn.recv(65536)
        if unfinished:
            conn.sendall(unfinished)
            sent += len(unfinished)
        conn.sendall(chunk[sent % len(chunk) :][: -sent % 6] + b"QUIT\r\n")
        while not replies.endswith(b"221 2.0.0 Bye\r\n"):
            data = conn.recv(65536)
            if not data:
                break
            replies += data
    finally:
        # After wrap_socket, the TLS socket owns the file descriptor.
        conn.close()
    lines = replies.split(b"\r\n")[:-1]
    return -(-sent // 6), lines.count(b"250 2.0.0 Ok"), lines[-1]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
@async_test
async def test_client_that_does_not_read_is_not_read_either(
    gateways: list[Gateway], tls: bool
) -> None:
    """
    Over a real connection (and through TLS), a client that pipelines
    commands without reading the replies can only send a bounded amount
    before the gateway stops reading; once it reads, every command is
    answered, in order.
    """
    gateway = Gateway(tls=tls, limits=Limits(max_junk_commands=100_000))
    gateway.factory.protocol = _SmallSocketBuffers
    gateways.append(gateway)
    sent, answered, last = await deferToThread(_flood_without_reading, gateway.address, tls=tls)
    assert sent * 6 < 1024 * 1024
    assert answered == sent
    assert last == b"221 2.0.0 Bye"
