"""
End-to-end: the real gateway with C{--acceptors 2}. The main process binds
the port and never accepts; two child processes accept, run the sessions
and hand each message to the main process, which alone counts connections
and failed logins per address and stores alerts.

To know which child serves a connection, a test stops every other child
(C{SIGSTOP}) while the connection is accepted: a stopped process cannot
accept, so the one left running takes it.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import email
import email.policy
import hashlib
import os
import re
import shutil
import signal
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from smtpgw.acceptors import KILL_AFTER
from smtpgw.tls import ensure_self_signed
from tests.gateway_process import (
    TWISTD,
    Credentials,
    Gateway,
    add_user,
    admin,
    fingerprint_of,
    free_port,
    peer_fingerprint,
    unverified,
    wait_until,
)

pytestmark = pytest.mark.e2e

ACCEPTORS = ("--acceptors", "2")
ACCEPTOR_MODULE = b"smtpgw.acceptor_main"
#: Where the per-process salt sits in a queue id (see QueueIdGenerator).
SALT = slice(11, 19)


# -- the processes ------------------------------------------------------------------


def main_pid(gw: Gateway) -> int:
    assert gw.process is not None, "the gateway is not running"
    return gw.process.pid


def children_of(pid: int) -> set[int]:
    """
    The processes C{pid} started that are still there.
    """
    found: set[int] = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found.update(int(child) for child in children.read_text().split())
    return found


def is_acceptor(pid: int) -> bool:
    """
    Whether C{pid} is a live (not zombie) acceptor process.
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return ACCEPTOR_MODULE in cmdline and state not in ("Z", "X")


def acceptors_of(gw: Gateway) -> set[int]:
    return {pid for pid in children_of(main_pid(gw)) if is_acceptor(pid)}


def logged_acceptors(gw: Gateway) -> dict[int, int]:
    """
    The pid of each acceptor the log says accepts, by pid: index.
    """
    return {
        int(pid): int(index)
        for index, pid in re.findall(
            r"acceptor (\d+) \(pid (\d+)\) accepting on \d+ ports", gw.log_text()
        )
    }


def two_acceptors(gw: Gateway) -> tuple[int, int]:
    """
    Wait until both acceptors run and say they accept; their pids.
    """
    found: list[int] = []

    def both() -> bool:
        running = acceptors_of(gw)
        found[:] = sorted(running)
        return len(running) == 2 and running <= set(logged_acceptors(gw))

    wait_until(both, 15, "two acceptor processes accepting")
    return found[0], found[1]


#: TCP states (as /proc/net/tcp writes them) of a connection its server
#: has not closed yet: ESTABLISHED, CLOSE_WAIT.
_SERVER_OPEN = {"01", "08"}


def server_sessions(gw: Gateway) -> int:
    """
    Connections to the gateway's port that its side has not closed.
    """
    local = f"0100007F:{gw.port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        count += fields[1] == local and fields[3] in _SERVER_OPEN
    return count


def settled(gw: Gateway) -> None:
    """
    Wait until every connection made so far (such as L{Gateway.start}'s
    probe) is closed on the gateway's side, so that it no longer counts
    against the connection limits.
    """
    wait_until(lambda: server_sessions(gw) == 0, 10, "earlier connections to be closed")


@contextlib.contextmanager
def only(serving: int, others: Iterable[int]) -> Iterator[None]:
    """
    While inside, only acceptor C{serving} can accept: the C{others} are
    stopped.
    """
    stopped = [pid for pid in others if pid != serving]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# -- the clients ----------------------------------------------------------------------


def greeting(sock: socket.socket) -> bytes:
    """
    The first reply line the gateway sends on C{sock}.
    """
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        line += chunk
    return line


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(512) == b""
    except ConnectionResetError:
        return True


def open_raw(gw: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=10)


def connect(gw: Gateway, context: ssl.SSLContext | None = None) -> smtplib.SMTP:
    """
    A session past STARTTLS (the constructor returns once a process has
    accepted it and greeted).
    """
    client = smtplib.SMTP("127.0.0.1", gw.port, timeout=30)
    client.ehlo("client.test")
    client.starttls(context=context or gw.tls_context())
    client.ehlo("client.test")
    return client


def send_one(client: smtplib.SMTP, user: Credentials, subject: str) -> str:
    """
    AUTH PLAIN and one message; its queue id from the 250.
    """
    client.ehlo_or_helo_if_needed()
    client.user, client.password = user.username, user.password
    code, reply = client.auth("PLAIN", client.auth_plain)
    assert code == 235, reply
    client.mail("app@example.com")
    client.rcpt("someone@dest.test")
    code, reply = client.data(f"From: app@example.com\r\nSubject: {subject}\r\n\r\nhello\r\n")
    assert code == 250, reply
    return queue_id_of(reply)


def queue_id_of(reply: bytes) -> str:
    text = reply.decode()
    assert "queued as" in text, text
    return text.rsplit("queued as", 1)[1].strip()


def plain(username: str, password: str) -> str:
    return base64.b64encode(f"\0{username}\0{password}".encode()).decode()


def logged_queue_ids(gw: Gateway, user: Credentials) -> set[str]:
    return set(
        re.findall(
            rf"queued ([0-9A-F]{{24}}) from {re.escape(user.username)} at 127\.0\.0\.1",
            gw.log_text(),
        )
    )


def captured_ids(gw: Gateway) -> list[str]:
    return [entry["queue_id"] for entry in gw.index()]


def wait_captured(gw: Gateway, *queue_ids: str) -> None:
    wait_until(
        lambda: set(queue_ids) <= set(captured_ids(gw)),
        30,
        f"{len(queue_ids)} message(s) to be captured",
    )


def stored_alerts(gw: Gateway, kind: str) -> list[str]:
    """
    The message and details of every stored alert of C{kind}.
    """
    with contextlib.closing(sqlite3.connect(gw.data_dir / "smtpgw.db")) as db:
        rows = db.execute(
            "SELECT message || ' ' || COALESCE(details, '') FROM alerts WHERE type = ?",
            (kind,),
        ).fetchall()
    return [row[0] for row in rows]


def new_gateway(tmp_path: Path, *extra: str, admin: bool = False) -> Gateway:
    """
    A gateway started with C{extra} options (and its admin app on a port of
    its own when C{admin}).
    """
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    admin_port = free_port() if admin else None
    gw = Gateway(data_dir, free_port(), extra_args=extra, admin_port=admin_port)
    gw.start()
    return gw


@contextlib.contextmanager
def running(gw: Gateway) -> Iterator[Gateway]:
    """
    Stop the gateway cleanly at the end, and fail if it does not stop so.
    """
    try:
        yield gw
    finally:
        if gw.process is not None:
            assert gw.stop(), gw.log_tail()


# -- shared gateways ------------------------------------------------------------------


#: The module gateway's C{--max-size}, to send a message at the limit
#: through the pipe to the main process.
MAX_SIZE = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def second_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, second_port: int) -> Iterator[Gateway]:
    """
    Two acceptors on two ports (the later C{--ports} wins over the one
    L{Gateway} gives).
    """
    data_dir = tmp_path_factory.mktemp("acceptors") / "data"
    data_dir.mkdir()
    port = free_port()
    gw = Gateway(
        data_dir,
        port,
        extra_args=(
            *ACCEPTORS,
            "--ports",
            f"{port},{second_port}",
            "--max-size",
            str(MAX_SIZE),
        ),
    )
    gw.start()
    with running(gw):
        yield gw


@pytest.fixture(scope="module")
def user(gateway: Gateway) -> Credentials:
    return add_user(gateway.data_dir, "news", "--domains", "example.com")


@pytest.fixture(scope="module")
def main_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """
    The same gateway with C{--acceptors 0}: the main process answers.
    """
    with running(new_gateway(tmp_path_factory.mktemp("no-acceptors"), "--acceptors", "0")) as gw:
        yield gw


# -- the tests ----------------------------------------------------------------------


def test_two_acceptors_serve_starttls_auth_sessions_and_mail_is_captured(
    gateway: Gateway, user: Credentials
) -> None:
    """
    C{--acceptors 2} starts two child processes of the main one; twenty
    STARTTLS + AUTH PLAIN sessions, four at a time, are all acknowledged,
    logged by the main process and captured, and their queue ids carry two
    salts: both children served some.
    """
    first, second = two_acceptors(gateway)
    assert children_of(main_pid(gateway)) == {first, second}
    acknowledged: list[str] = []
    errors: list[BaseException] = []

    def client(number: int) -> None:
        try:
            for sequence in range(5):
                with connect(gateway) as session:
                    acknowledged.append(send_one(session, user, f"m{number}-{sequence}"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(set(acknowledged)) == 20
    wait_captured(gateway, *acknowledged)
    wait_until(
        lambda: set(acknowledged) <= logged_queue_ids(gateway, user), 10, "the queued log lines"
    )
    salts = {qid[SALT] for qid in acknowledged}
    assert len(salts) == 2, f"all 20 sessions were served by one acceptor: {sorted(salts)}"


def test_both_acceptors_accept_on_every_port_and_pass_a_message_at_the_size_limit(
    gateway: Gateway, user: Credentials, second_port: int
) -> None:
    """
    Each acceptor accepts on both ports; a message at C{--max-size} crosses
    the pipe to the main process intact, and one octet more gets 552.
    """
    pids = two_acceptors(gateway)
    assert all(f"(pid {pid}) accepting on 2 ports" in gateway.log_text() for pid in pids), (
        gateway.log_tail()
    )
    head = "From: app@example.com\r\nSubject: big\r\n\r\n"
    # Lines of 66 octets with CRLF, and a last line of 100 to 165 to reach
    # the limit exactly (smtplib ends DATA with a CRLF of its own).
    count = (MAX_SIZE - len(head) - 100) // 66
    lines = [hashlib.sha256(str(n).encode()).hexdigest() for n in range(count)]
    body = "\r\n".join(lines)
    body += "\r\n" + "z" * (MAX_SIZE - len(head) - len(body) - 4)
    assert len(head) + len(body) + 2 == MAX_SIZE
    for port, pid in zip((gateway.port, second_port), pids, strict=True):
        with only(pid, pids):
            client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        with client:
            client.starttls(context=gateway.tls_context())
            client.login(user.username, user.password)
            client.mail("app@example.com")
            client.rcpt("big@dest.test")
            code, reply = client.data(head + body)
            assert code == 250, reply
            qid = queue_id_of(reply)
            client.mail("app@example.com")
            client.rcpt("big@dest.test")
            code, reply = client.data(head + body + "z")
            assert (code, reply[:5]) == (552, b"5.3.4"), reply
        wait_captured(gateway, qid)
        raw = (gateway.captured / f"{qid}.eml").read_bytes()
        assert raw.split(b"\r\n\r\n", 1)[1] == (body + "\r\n").encode()


def test_each_acceptor_applies_the_sender_policy_and_rewrites_headers(
    gateway: Gateway, user: Credentials, main_only: Gateway
) -> None:
    """
    In each acceptor, an unauthorized envelope sender gets the very reply
    the main process gives without acceptors, and the main process stores
    one sender_domain alert for both refusals (the repeat is held back);
    an accepted message has its headers rewritten.
    """
    other = add_user(main_only.data_dir, "news", "--domains", "example.com")
    with connect(main_only) as client:
        client.login(other.username, other.password)
        code, reply = client.mail("app@sub.example.com")
    assert (code, reply[:5]) == (550, b"5.7.1"), reply
    assert b"app@sub.example.com" in reply
    # The reply names the user, who has another name at each gateway.
    expected = (code, reply.replace(other.username.encode(), user.username.encode()))

    pids = two_acceptors(gateway)
    for pid in pids:
        with only(pid, pids):
            client = connect(gateway)
        with client:
            client.login(user.username, user.password)
            assert client.mail("app@sub.example.com") == expected
            client.rset()
            client.mail("app@example.com")
            client.rcpt("alice@dest.test")
            code, reply = client.data(
                'From: App <app@example.com>\r\nX-SMTPAPI: {"Priority": 2}\r\n'
                "Subject: rewritten\r\n\r\nhello\r\n"
            )
        assert code == 250, reply
        qid = queue_id_of(reply)
        wait_captured(gateway, qid)
        parsed = email.message_from_bytes(
            (gateway.captured / f"{qid}.eml").read_bytes(), policy=email.policy.compat32
        )
        assert parsed["X-SMTPAPI"] is None
        assert parsed["X-Priority"] == "2"
        assert parsed["Message-ID"] == f"<{qid}@gateway.test>"
        received = parsed.get_all("Received") or []
        assert len(received) == 1
        assert "ESMTPSA" in received[0]
    # Each acceptor's refusal reached the main process before the message
    # that followed it on the same channel; the main process stored the
    # alert once, holding back the repeat.
    refused = [a for a in stored_alerts(gateway, "sender_domain") if "app@sub.example.com" in a]
    assert len(refused) == 1, refused
    assert user.username in refused[0]


def test_acceptors_0_means_the_main_process_answers(main_only: Gateway) -> None:
    """
    With C{--acceptors 0} the main process starts no child and answers
    itself.
    """
    user = add_user(main_only.data_dir, "solo", "--domains", "example.com")
    with connect(main_only) as client:
        qid = send_one(client, user, "solo")
    assert children_of(main_pid(main_only)) == set()
    wait_captured(main_only, qid)
    assert "accepting on" not in main_only.log_text()
    assert qid in logged_queue_ids(main_only, user)


def test_when_no_acceptor_can_start_the_main_process_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    When the acceptors' Python cannot even be run (here a missing file; in
    production, a virtualenv the gateway's user cannot read), the main
    process accepts SMTP itself after three failed starts in a row, and
    says so: the gateway serves rather than staying silent.
    """
    monkeypatch.setenv("SMTPGW_ACCEPTOR_PYTHON", str(tmp_path / "no-such-python"))
    with running(new_gateway(tmp_path, "--acceptors", "1")) as gw:
        user = add_user(gw.data_dir, "fallback", "--domains", "example.com")
        with connect(gw) as client:
            qid = send_one(client, user, "fallback")
        wait_captured(gw, qid)
        assert acceptors_of(gw) == set()
        assert "the main process accepts SMTP connections itself" in gw.log_text()
        assert "accepting on" not in gw.log_text()


def test_by_default_one_acceptor_per_core_but_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Without C{--acceptors} ('auto'), the gateway starts one acceptor per
    core it may run on but one (the main process's), so none on a single
    core.
    """
    monkeypatch.delenv("SMTPGW_TEST_ACCEPTORS", raising=False)
    cores = len(os.sched_getaffinity(0))
    with running(new_gateway(tmp_path)) as gw:
        expected = cores - 1
        wait_until(
            lambda: len(logged_acceptors(gw)) == expected, 15, f"{expected} acceptors accepting"
        )
        assert len(acceptors_of(gw)) == expected


def test_twistd_help_lists_the_acceptors_option() -> None:
    result = subprocess.run(
        [TWISTD, "smtpgw", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--acceptors=" in result.stdout
    assert "'auto': one per core but one" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("option", "limit", "refusal"),
    [
        ("--max-connections-per-ip", 4, b"Too many connections from your address"),
        ("--max-connections", 3, b"Too many connections, try again later"),
    ],
)
def test_the_connection_limit_holds_across_acceptors(
    tmp_path: Path, option: str, limit: int, refusal: bytes
) -> None:
    """
    Connections held open on both acceptors count together: at the limit,
    the next connection gets 421 4.7.0 and is closed whichever acceptor
    takes it; once one closes, a new connection is greeted.
    """
    with running(new_gateway(tmp_path, *ACCEPTORS, option, str(limit))) as gw:
        pids = two_acceptors(gw)
        settled(gw)
        held: list[socket.socket] = []
        try:
            for n in range(limit):
                with only(pids[n % 2], pids):
                    sock = open_raw(gw)
                    held.append(sock)
                    assert greeting(sock).startswith(b"220 "), n
            assert server_sessions(gw) == limit
            for pid in pids:
                with only(pid, pids), open_raw(gw) as extra:
                    line = greeting(extra)
                    assert line == b"421 4.7.0 gateway.test " + refusal + b"\r\n", line
                    assert closed_by_peer(extra)
            held.pop().close()
            greeted: list[bytes] = []

            def one_more_is_greeted() -> bool:
                with open_raw(gw) as sock:
                    greeted.append(greeting(sock))
                    return greeted[-1].startswith(b"220 ")

            wait_until(one_more_is_greeted, 10, "a connection to be greeted again")
        finally:
            for sock in held:
                sock.close()


def test_failed_logins_count_across_acceptors(tmp_path: Path) -> None:
    """
    Wrong passwords on connections taken by alternate acceptors add up: the
    one that reaches the limit gets 421 and the connection is closed; then
    even the right password gets 421 on either acceptor, and the main
    process stores exactly one auth_failures alert.
    """
    gw = new_gateway(
        tmp_path, *ACCEPTORS, "--auth-failure-limit", "3", "--auth-failure-delay", "0"
    )
    with running(gw):
        good = add_user(gw.data_dir, "burst", "--domains", "example.com")
        pids = two_acceptors(gw)
        codes = []
        for n in range(3):
            with only(pids[n % 2], pids):
                client = connect(gw)
            with client:
                code, _ = client.docmd("AUTH", "PLAIN " + plain(good.username, "wrong"))
                codes.append(code)
                if code == 421:
                    with pytest.raises(smtplib.SMTPServerDisconnected):
                        client.noop()
        assert codes == [535, 535, 421]
        for pid in pids:
            with only(pid, pids):
                client = connect(gw)
            with client:
                code, reply = client.docmd("AUTH", "PLAIN " + plain(good.username, good.password))
                assert (code, reply[:5]) == (421, b"4.7.0"), reply
        wait_until(lambda: bool(stored_alerts(gw, "auth_failures")), 10, "an auth_failures alert")
    alerts = stored_alerts(gw, "auth_failures")
    assert len(alerts) == 1, alerts
    assert "127.0.0.1" in alerts[0]


def test_a_killed_acceptor_is_replaced_while_the_other_keeps_serving(tmp_path: Path) -> None:
    """
    After C{kill -9} of one acceptor, twenty messages sent at once over
    separate connections are all acknowledged and captured; the main process
    logs the end and starts another acceptor, which serves too.
    """
    with running(new_gateway(tmp_path, *ACCEPTORS)) as gw:
        user = add_user(gw.data_dir, "kill", "--domains", "example.com")
        victim, survivor = two_acceptors(gw)
        os.kill(victim, signal.SIGKILL)
        acknowledged = []
        for n in range(20):
            with connect(gw) as client:
                acknowledged.append(send_one(client, user, f"after-kill-{n}"))
        wait_until(
            lambda: re.search(rf"acceptor \d \(pid {victim}\) ended", gw.log_text()) is not None,
            10,
            "the main process to log the end",
        )
        replaced: list[int] = []

        def replacement_accepts() -> bool:
            replaced[:] = sorted(acceptors_of(gw) - {victim, survivor})
            return len(replaced) == 1 and replaced[0] in logged_acceptors(gw)

        wait_until(replacement_accepts, 10, "a new acceptor accepting")
        assert acceptors_of(gw) == {survivor, replaced[0]}
        assert logged_acceptors(gw)[replaced[0]] == logged_acceptors(gw)[victim]
        with only(replaced[0], (survivor, replaced[0])):
            client = connect(gw)
        with client:
            acknowledged.append(send_one(client, user, "from-the-new-one"))
        wait_captured(gw, *acknowledged)
        assert len(set(acknowledged)) == 21
        assert re.search(rf"\(pid {victim}\) ended: .*; starting another in 1 s", gw.log_text())
        # Dying again soon after its start doubles the wait.
        os.kill(replaced[0], signal.SIGKILL)
        wait_until(
            lambda: (
                re.search(
                    rf"\(pid {replaced[0]}\) ended: .*; starting another in 2 s", gw.log_text()
                )
                is not None
            ),
            10,
            "the second end to be logged with a longer wait",
        )
        wait_until(lambda: len(acceptors_of(gw)) == 2, 10, "the second replacement")


def test_the_connections_of_a_killed_acceptor_no_longer_count(tmp_path: Path) -> None:
    """
    With the address at its connection limit on one acceptor, C{kill -9} of
    that acceptor gives its connections back: the other acceptor greets a
    new one.
    """
    with running(new_gateway(tmp_path, *ACCEPTORS, "--max-connections-per-ip", "2")) as gw:
        victim, survivor = two_acceptors(gw)
        settled(gw)
        held = []
        try:
            with only(victim, (victim, survivor)):
                for _ in range(2):
                    held.append(open_raw(gw))
                    assert greeting(held[-1]).startswith(b"220 ")
            with open_raw(gw) as refused:
                assert greeting(refused).startswith(b"421 4.7.0 "), "not at the limit"
            os.kill(victim, signal.SIGKILL)
            for sock in held:
                assert closed_by_peer(sock)
            greeted: list[bytes] = []

            def greeted_again() -> bool:
                with open_raw(gw) as sock:
                    greeted.append(greeting(sock))
                    return greeted[-1].startswith(b"220 ")

            wait_until(greeted_again, 10, "a connection to be greeted after the kill")
        finally:
            for sock in held:
                sock.close()


def metrics_of(gw: Gateway, token: str) -> dict[str, float]:
    """
    The unlabelled series of the admin app's /metrics, by name.
    """
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", gw.admin_port, timeout=5)
    try:
        connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
        answer = connection.getresponse()
        assert answer.status == 200
        text = answer.read().decode()
    finally:
        connection.close()
    series = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            series[name] = float(value)
    return series


def test_a_sole_acceptor_keeps_the_connection_limit_and_reports_its_connections(
    tmp_path: Path,
) -> None:
    """
    With one acceptor, which counts connections itself: at the per-address
    limit the next connection gets 421 4.7.0, one closed makes room again,
    and /metrics counts the connections open and in all (within a
    heartbeat); once the acceptor is killed, its connections count as
    closed.
    """
    gw = new_gateway(tmp_path, "--acceptors", "1", "--max-connections-per-ip", "2", admin=True)
    with running(gw):
        gw.wait_admin()
        token = admin(gw.data_dir, "token", "add", "scraper")["token"]
        [victim] = acceptors_of(gw)
        settled(gw)
        wait_until(
            lambda: metrics_of(gw, token)["smtpgw_connections_open"] == 0,
            10,
            "no connection open",
        )
        before = metrics_of(gw, token)["smtpgw_connections_total"]
        held = [open_raw(gw), open_raw(gw)]
        try:
            for sock in held:
                assert greeting(sock).startswith(b"220 ")
            with open_raw(gw) as refused:
                line = greeting(refused)
                assert line == (
                    b"421 4.7.0 gateway.test Too many connections from your address\r\n"
                ), line
                assert closed_by_peer(refused)
            seen: list[dict[str, float]] = []

            def counted() -> bool:
                seen.append(metrics_of(gw, token))
                return (
                    seen[-1]["smtpgw_connections_open"] == 2
                    and seen[-1]["smtpgw_connections_total"] == before + 3
                )

            # Both from one heartbeat (a heartbeat may come between the
            # held connections and the refused one).
            wait_until(counted, 10, "two open and three more in all in /metrics")
            held.pop().close()
            greeted: list[bytes] = []

            def one_more_is_greeted() -> bool:
                sock = open_raw(gw)
                greeted.append(greeting(sock))
                if greeted[-1].startswith(b"220 "):
                    held.append(sock)
                    return True
                sock.close()
                return False

            wait_until(one_more_is_greeted, 10, "a connection greeted after one closed")
            os.kill(victim, signal.SIGKILL)
            for sock in held:
                assert closed_by_peer(sock)
            wait_until(
                lambda: metrics_of(gw, token)["smtpgw_connections_open"] == 0,
                10,
                "the killed acceptor's connections counted closed",
            )
        finally:
            for sock in held:
                sock.close()


@pytest.mark.parametrize("acceptors", ["1", "2"])
def test_the_acceptors_serve_ipv6(tmp_path: Path, acceptors: str) -> None:
    """
    With C{--interface ::1}, one acceptor or two serve IPv6: STARTTLS,
    AUTH and a message captured with the client's IPv6 address in its
    Received field; and the per-address limit counts ::1 (its /64): at the
    limit the next connection gets 421 4.7.0.
    """
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    limit = ("--max-connections-per-ip", "2")
    gw = Gateway(
        data_dir, free_port(), extra_args=("--acceptors", acceptors, *limit), interface="::1"
    )
    gw.start()
    with running(gw):
        wait_until(
            lambda: len(logged_acceptors(gw)) == int(acceptors), 15, "the acceptors accepting"
        )
        user = add_user(data_dir, "six", "--domains", "example.com")
        client = smtplib.SMTP("::1", gw.port, timeout=30)
        try:
            client.ehlo("client.test")
            client.starttls(context=gw.tls_context())
            client.ehlo("client.test")
            qid = send_one(client, user, "over IPv6")
        finally:
            client.quit()
        wait_captured(gw, qid)
        captured = (gw.captured / f"{qid}.eml").read_bytes()
        assert b"([IPv6:::1])" in captured.split(b"\r\n\r\n", 1)[0]
        held: list[socket.socket] = []

        def two_greeted() -> bool:
            # Earlier connections may still count for a moment.
            for sock in held:
                sock.close()
            held[:] = [socket.create_connection(("::1", gw.port), timeout=10) for _ in range(2)]
            return all(greeting(sock).startswith(b"220 ") for sock in held)

        try:
            wait_until(two_greeted, 10, "two connections over IPv6 greeted")
            with socket.create_connection(("::1", gw.port), timeout=10) as refused:
                line = greeting(refused)
                assert line == (
                    b"421 4.7.0 gateway.test Too many connections from your address\r\n"
                ), line
        finally:
            for sock in held:
                sock.close()


class Sender(threading.Thread):
    """
    Sends one message per connection until told to stop, remembering the
    queue id of every message acknowledged with 250.
    """

    def __init__(self, gw: Gateway, user: Credentials, number: int) -> None:
        super().__init__(daemon=True)
        self.gw, self.user, self.number = gw, user, number
        self.acknowledged: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        sequence = 0
        while not self.stopping.is_set():
            sequence += 1
            try:
                with smtplib.SMTP("127.0.0.1", self.gw.port, timeout=10) as client:
                    self.acknowledged.append(
                        send_one(client, self.user, f"s{self.number}-{sequence}")
                    )
            except (OSError, smtplib.SMTPException, AssertionError):
                self.stopping.wait(0.05)


def acknowledged_by(senders: list[Sender]) -> Callable[[], int]:
    return lambda: sum(len(sender.acknowledged) for sender in senders)


def test_kill_9_of_the_main_process_takes_the_acceptors_and_loses_no_acknowledged_message(
    tmp_path: Path,
) -> None:
    """
    While clients send, C{kill -9} of the main process: both acceptors are
    gone within seconds, so a restart binds the same port and greets, and
    every message acknowledged with 250 is captured after the restart.
    Duplicates are counted and reported.
    """
    gw = new_gateway(tmp_path, *ACCEPTORS)
    with running(gw):
        user = add_user(gw.data_dir, "crash", "--domains", "example.com")
        pids = two_acceptors(gw)
        senders = [Sender(gw, user, n) for n in range(4)]
        for sender in senders:
            sender.start()
        count = acknowledged_by(senders)
        try:
            wait_until(lambda: count() >= 10, 30, "traffic before the kill")
            gw.kill9()
            wait_until(
                lambda: not any(is_acceptor(pid) for pid in pids), 3, "the acceptors to die"
            )
            gw.start()
            assert set(two_acceptors(gw)).isdisjoint(pids)
            after_restart = count()
            wait_until(lambda: count() >= after_restart + 5, 30, "traffic after the restart")
        finally:
            for sender in senders:
                sender.stopping.set()
            for sender in senders:
                sender.join(30)
        acknowledged = [qid for sender in senders for qid in sender.acknowledged]
        wait_captured(gw, *acknowledged)
    delivered = collections.Counter(captured_ids(gw))
    duplicates = {qid: n for qid, n in delivered.items() if n > 1}
    extra = sum(duplicates.values()) - len(duplicates)
    reported = sum(
        int(n) for n in re.findall(r"(\d+) messages were being delivered", gw.log_text())
    )
    print(
        f"acceptors crash: {len(acknowledged)} acknowledged, {len(delivered)} distinct "
        f"captured, {extra} duplicate captures, {reported} reported in flight"
    )
    assert len(acknowledged) == len(set(acknowledged)), "a queue id was acknowledged twice"
    assert extra <= reported


def test_sigterm_stops_the_gateway_and_its_acceptors_cleanly(tmp_path: Path) -> None:
    """
    SIGTERM to the main process, with a logged-in session open on each
    acceptor: it shuts down cleanly and at once (no acceptor had to be
    killed), the sessions are closed, and no acceptor process is left.
    """
    gw = new_gateway(tmp_path, *ACCEPTORS)
    user = add_user(gw.data_dir, "term", "--domains", "example.com")
    pids = two_acceptors(gw)
    sessions = []
    for pid in pids:
        with only(pid, pids):
            sessions.append(connect(gw))
        sessions[-1].login(user.username, user.password)
    started = time.monotonic()
    assert gw.stop(), gw.log_tail()
    assert time.monotonic() - started < KILL_AFTER / 2
    assert [pid for pid in pids if is_acceptor(pid)] == []
    for session in sessions:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            session.noop()
        session.close()
    for pid in pids:
        index = logged_acceptors(gw)[pid]
        assert f"acceptor {index}: Main loop terminated." in gw.log_text()


def written(pid: int) -> int:
    """
    The octets process C{pid} has written so far, to any file or socket.
    """
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no wchar for {pid}")


def pending_signals(pid: int) -> int:
    """
    The signals pending for process C{pid}, as a bit mask.
    """
    mask = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            mask |= int(line.split()[1], 16)
    return mask


def test_a_message_handed_over_just_before_sigterm_gets_its_250(tmp_path: Path) -> None:
    """
    The main process is paused while an acceptor hands it a message, and
    SIGTERM arrives before it reads the message: while stopping, it still
    journals it and the acceptor answers 250 before exiting; the message is
    delivered.
    """
    gw = new_gateway(tmp_path, *ACCEPTORS)
    user = add_user(gw.data_dir, "drain", "--domains", "example.com")
    pids = two_acceptors(gw)
    main = main_pid(gw)
    with only(pids[0], pids):
        client = smtplib.SMTP("127.0.0.1", gw.port, timeout=30)
    body = "From: app@example.com\r\nSubject: last\r\n\r\n" + ("y" * 76 + "\r\n") * 400
    stopper = threading.Thread(target=lambda: results.append(gw.stop()))
    results: list[bool] = []
    with client:
        client.login(user.username, user.password)
        client.mail("app@example.com")
        client.rcpt("last@dest.test")
        assert client.docmd("DATA")[0] == 354
        before = written(pids[0])
        os.kill(main, signal.SIGSTOP)
        try:
            client.send((body + ".\r\n").encode())
            # The acceptor wrote the message into its pipe to the main process.
            wait_until(lambda: written(pids[0]) >= before + len(body), 10, "the hand-over")
            stopper.start()
            wait_until(
                lambda: bool(pending_signals(main) & (1 << (signal.SIGTERM - 1))),
                10,
                "SIGTERM to be pending",
            )
        finally:
            os.kill(main, signal.SIGCONT)
        code, reply = client.getreply()
        stopper.join(30)
    assert code == 250, reply
    assert results == [True], gw.log_tail()
    assert [pid for pid in pids if is_acceptor(pid)] == []
    qid = queue_id_of(reply)
    gw.start()
    with running(gw):
        wait_captured(gw, qid)


def test_sighup_reloads_the_certificate_in_every_acceptor(tmp_path: Path) -> None:
    """
    After the certificate files are replaced and SIGHUP sent to the main
    process, new connections to each acceptor get the new certificate, and
    a session opened before keeps sending. (With C{--require-tls}, which
    each acceptor also applies: AUTH only after STARTTLS.)
    """
    pairs = {}
    for name in ("first", "second"):
        cert, key = ensure_self_signed(str(tmp_path / name), f"{name}.test")
        pairs[name] = (Path(cert.path), Path(key.path))
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(pairs["first"][0], live_cert)
    shutil.copy(pairs["first"][1], live_key)
    gw = new_gateway(
        tmp_path,
        *ACCEPTORS,
        "--tls-cert",
        str(live_cert),
        "--tls-key",
        str(live_key),
        "--require-tls",
    )
    with running(gw):
        user = add_user(gw.data_dir, "tls", "--domains", "example.com")
        pids = two_acceptors(gw)

        def sees(pid: int, fingerprint: str) -> Callable[[], bool]:
            return lambda: seen_by(pid) == fingerprint

        def seen_by(pid: int) -> str:
            with only(pid, pids):
                client = smtplib.SMTP("127.0.0.1", gw.port, timeout=30)
            with client:
                client.ehlo("client.test")
                assert "auth" not in client.esmtp_features
                client.starttls(context=unverified())
                client.ehlo("client.test")
                assert "PLAIN" in client.esmtp_features["auth"].split()
                return peer_fingerprint(client)

        old, new = fingerprint_of(pairs["first"][0]), fingerprint_of(pairs["second"][0])
        assert [seen_by(pid) for pid in pids] == [old, old]
        with connect(gw, unverified()) as before:
            before.login(user.username, user.password)
            shutil.copy(pairs["second"][0], live_cert)
            shutil.copy(pairs["second"][1], live_key)
            os.kill(main_pid(gw), signal.SIGHUP)
            for pid in pids:
                wait_until(sees(pid, new), 15, f"the new certificate at {pid}")
            assert peer_fingerprint(before) == old
            refused = before.sendmail(
                "app@example.com", ["x@dest.test"], "From: app@example.com\r\n\r\nhi\r\n"
            )
            assert refused == {}
        gw.wait_delivered(1)
        for pid in pids:
            index = logged_acceptors(gw)[pid]
            assert f"acceptor {index}: TLS certificate reloaded from {live_cert}" in gw.log_text()


def test_healthz_fails_while_no_acceptor_answers_smtp(tmp_path: Path) -> None:
    """
    /healthz reports C{"smtp": false} (503) while the only acceptor is gone,
    and C{true} (200) again once the main process has started another.
    """
    import http.client
    import json

    gw = new_gateway(tmp_path, "--acceptors", "1", admin=True)
    with running(gw):
        gw.wait_admin()

        def health() -> tuple[int, dict[str, bool]]:
            connection = http.client.HTTPConnection("127.0.0.1", gw.admin_port, timeout=5)
            try:
                connection.request("GET", "/healthz")
                answer = connection.getresponse()
                return answer.status, json.loads(answer.read())["checks"]
            finally:
                connection.close()

        wait_until(
            lambda: health() == (200, {"journal": True, "queue": True, "smtp": True}),
            15,
            "a healthy gateway",
        )
        [victim] = acceptors_of(gw)
        seen: list[tuple[int, dict[str, bool]]] = []

        def failing() -> bool:
            seen.append(health())
            return seen[-1] == (503, {"journal": True, "queue": True, "smtp": False})

        os.kill(victim, signal.SIGKILL)
        wait_until(failing, 10, "/healthz to fail without an acceptor")
        wait_until(lambda: health()[0] == 200, 15, "/healthz to pass with the new acceptor")
        assert acceptors_of(gw)
        assert victim not in acceptors_of(gw)
