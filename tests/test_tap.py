"""
Tests for L{smtpgw.tap}: option parsing, the hand-over of the data directory
to the user twistd drops to, and C{gateway.tac}.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.python import usage
from twisted.python.filepath import FilePath

from smtpgw.limits import Limits
from smtpgw.tap import DEFAULT_MAX_SIZE, LIMIT_OPTIONS, Options, _hand_over, _Reload
from smtpgw.tls import TLSConfigError, ensure_self_signed

ROOT = Path(__file__).resolve().parent.parent


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(["--relay", "capture", "--hostname", "gw.test", *argv])
    return options


def parse_public(*argv: str) -> Options:
    """
    L{parse}, with the unsubscribe links' base URL given.
    """
    return parse("--public-url", "http://gw.test", *argv)


def test_defaults_follow_the_product() -> None:
    options = parse()
    assert len(options["ports"]) == 3980
    assert options["ports"][:4] == (23, 25, 26, 587)
    assert options["limits"].max_size == DEFAULT_MAX_SIZE
    assert options["limits"].max_recipients == Limits().max_recipients
    assert options["rate"] == 0.0
    assert options["concurrency"] == 20


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ports", "25,,26"], "--ports"),
        (["--ports", "5000-1025"], "--ports"),
        (["--ports", "70000"], "--ports"),
        (["--rate", "fast"], "--rate"),
        (["--rate", "-1"], "--rate"),
        (["--concurrency", "0"], "--concurrency"),
        (["--max-size", "lots"], "--max-size"),
        (["--max-recipients", "x"], "--max-recipients"),
        (["--max-command-length", "511"], "max-command-length"),
        (["--idle-timeout", "soon"], "--idle-timeout"),
        (["--tls-cert", "a.pem"], "--tls-cert"),
        (["--acceptors", "-1"], "--acceptors must be at least 0"),
        (["--acceptors", "two"], "--acceptors must be a whole number"),
        (["--acceptors", "65"], "--acceptors must be at most 64"),
    ],
)
def test_bad_options_are_refused_with_a_clear_reason(argv: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


@pytest.mark.parametrize(
    ("admin", "url"),
    [
        ("tcp:8080:interface=127.0.0.1", "http://gw.test:8080"),
        ("tcp:port=8081:interface=127.0.0.1", "http://gw.test:8081"),
        ("tcp:80", "http://gw.test"),
        ("ssl:8443:privateKey=k.pem:certKey=c.pem", "https://gw.test:8443"),
        ("ssl:port=443:privateKey=k.pem", "https://gw.test"),
    ],
)
def test_the_public_url_follows_the_admin_port(admin: str, url: str) -> None:
    """
    Without --public-url, unsubscribe links point at the admin app's own
    TCP or TLS port on the gateway's name.
    """
    assert parse("--admin", admin)["public-url"] == url


@pytest.mark.parametrize("admin", ["none", "unix:/run/smtpgw/admin.sock"])
def test_without_an_admin_port_the_public_url_must_be_given(admin: str) -> None:
    """
    With no admin port to guess from, --public-url is required (and taken
    as given).
    """
    with pytest.raises(usage.UsageError, match="--public-url is needed"):
        parse("--admin", admin)
    given = parse("--admin", admin, "--public-url", "https://mail.example.com")
    assert given["public-url"] == "https://mail.example.com"


@pytest.mark.parametrize(
    ("text", "cores", "expected"),
    [
        ("auto", 2, 1),
        ("auto", 8, 7),
        ("auto", 1, 0),
        ("auto", 96, 64),
        ("0", 8, 0),
        ("64", 2, 64),
        ("3", 1, 3),
    ],
)
def test_acceptors_default_to_one_per_core_but_one(
    monkeypatch: pytest.MonkeyPatch, text: str, cores: int, expected: int
) -> None:
    """
    --acceptors auto (the default) starts one acceptor process per core the
    gateway may run on but one, which the main process keeps busy (none on
    a single core, where the main process answers; at most 64); a number is
    taken as given, up to 64.
    """
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert Options()["acceptors"] == "auto"
    assert parse("--acceptors", text)["acceptors"] == expected


def test_acceptors_or_the_main_process_listen(tmp_path: Path) -> None:
    """
    With acceptors the main process binds the ports without accepting and
    an acceptor pool is wired to the queue; without, the main process's
    own SMTP factory listens.
    """
    from twisted.internet.testing import MemoryReactorClock

    from smtpgw.acceptors import AcceptorPool
    from smtpgw.listening import MultiPortListener, bind_only
    from smtpgw.session import GatewaySMTPFactory
    from smtpgw.tap import makeService

    def children(acceptors: str) -> list[object]:
        data = str(tmp_path / acceptors)
        options = parse_public("--acceptors", acceptors, "--data-dir", data, "--admin", "none")
        return list(makeService(options, MemoryReactorClock()))  # type: ignore[call-overload, no-any-return]

    with_pool = children("2")
    [listener] = [c for c in with_pool if isinstance(c, MultiPortListener)]
    [pool] = [c for c in with_pool if isinstance(c, AcceptorPool)]
    assert listener.listen is bind_only
    assert pool.count == 2
    assert with_pool.index(listener) < with_pool.index(pool)
    without = children("0")
    assert not [c for c in without if isinstance(c, AcceptorPool)]
    [listener] = [c for c in without if isinstance(c, MultiPortListener)]
    assert listener.listen is None
    assert isinstance(listener.factory, GatewaySMTPFactory)


class _SaysInData:
    """
    An acceptor child as the pool sees it: what its last message said.
    """

    in_data = 0


def test_the_journal_is_told_of_every_session_in_data(tmp_path: Path) -> None:
    """
    The journal's writer learns how many messages are about to come: the
    sessions in DATA of the acceptors (as they last said) and of the main
    process's own sessions, when it accepts beside them or alone.
    """
    from twisted.internet.testing import MemoryReactorClock

    from smtpgw.acceptors import AcceptorPool, MainProcessAcceptor
    from smtpgw.journal import FileJournal
    from smtpgw.listening import MultiPortListener
    from smtpgw.queue import MessageQueue
    from smtpgw.session import GatewaySMTPFactory
    from smtpgw.tap import makeService

    def built(acceptors: str) -> tuple[list[object], FileJournal]:
        data = str(tmp_path / acceptors)
        options = parse_public("--acceptors", acceptors, "--data-dir", data, "--admin", "none")
        services = list(makeService(options, MemoryReactorClock()))  # type: ignore[call-overload]
        [queue] = [c for c in services if isinstance(c, MessageQueue)]
        journal = queue._journal
        assert isinstance(journal, FileJournal)
        return services, journal

    services, journal = built("2")
    [pool] = [c for c in services if isinstance(c, AcceptorPool)]
    [here] = [c for c in services if isinstance(c, MainProcessAcceptor)]
    assert journal.expected_soon is not None
    assert journal.expected_soon() == 0
    child = _SaysInData()
    child.in_data = 3
    pool.children[0] = child  # type: ignore[assignment]
    assert journal.expected_soon() == 3
    factory = here.make_factory()
    factory.in_data = 2
    assert journal.expected_soon() == 5
    services, journal = built("0")
    [listener] = [c for c in services if isinstance(c, MultiPortListener)]
    assert isinstance(listener.factory, GatewaySMTPFactory)
    listener.factory.in_data = 4
    assert journal.expected_soon is not None
    assert journal.expected_soon() == 4


def test_each_relay_builds_its_outbound(tmp_path: Path) -> None:
    """
    --relay mx (the default) delivers to MX hosts, smtp:// to a smarthost,
    capture into the data directory, discard nowhere.
    """
    from twisted.internet.testing import MemoryReactorClock

    from smtpgw.mxoutbound import MXOutbound
    from smtpgw.outbound import CaptureOutbound, DiscardOutbound
    from smtpgw.relay import SmarthostOutbound
    from smtpgw.tap import _outbound

    expected = {
        "mx": MXOutbound,
        "smtp://127.0.0.1:2525": SmarthostOutbound,
        "capture": CaptureOutbound,
        "discard": DiscardOutbound,
    }
    for relay, kind in expected.items():
        options = Options()
        options.parseOptions(["--relay", relay, "--hostname", "gw.test"])
        outbound = _outbound(options, FilePath(str(tmp_path)), MemoryReactorClock())
        assert isinstance(outbound, kind), relay
    assert Options()["relay"] == "mx"


def test_the_main_process_fallback_shares_the_acceptors_limits_and_alert_filter(
    tmp_path: Path,
) -> None:
    """
    Should the main process accept beside (or instead of) the acceptors,
    its sessions count connections and failed logins in the pool's own
    counters and hold back repeated sender alerts in the pool's filter, so
    every limit and summary is the same across all of them.
    """
    from twisted.internet.testing import MemoryReactorClock

    from smtpgw.acceptors import AcceptorPool, MainProcessAcceptor
    from smtpgw.tap import makeService

    options = parse_public("--acceptors", "2", "--data-dir", str(tmp_path), "--admin", "none")
    services = list(makeService(options, MemoryReactorClock()))  # type: ignore[call-overload]
    [pool] = [c for c in services if isinstance(c, AcceptorPool)]
    [here] = [c for c in services if isinstance(c, MainProcessAcceptor)]
    assert services.index(pool) < services.index(here)
    factory = here.make_factory()
    assert factory.connection_limiter is pool.connections
    assert factory.auth_limiter is pool.auth
    assert factory.alerts is pool.alerts
    assert factory.limits.sender_alert_window == 0.0
    assert pool.limits.sender_alert_window > 0.0


def test_only_discard_skips_the_sending_record(tmp_path: Path) -> None:
    """
    The queue journals each attempt as "sending" first for every relay from
    which mail leaves; with --relay discard, from which nothing leaves, it
    does not.
    """
    from twisted.internet.testing import MemoryReactorClock

    from smtpgw.queue import MessageQueue
    from smtpgw.tap import makeService

    def queue_for(relay: str) -> MessageQueue:
        data = str(tmp_path / relay.replace("/", "_").replace(":", "_"))
        options = parse_public("--relay", relay, "--data-dir", data, "--admin", "none")
        service = makeService(options, MemoryReactorClock())
        [queue] = [c for c in service if isinstance(c, MessageQueue)]  # type: ignore[attr-defined]
        return queue

    assert not queue_for("discard").mark_sending
    for relay in ("mx", "capture", "smtp://127.0.0.1:2525"):
        assert queue_for(relay).mark_sending, relay


def test_a_smarthost_url_is_parsed_and_a_bad_one_refused_without_its_password() -> None:
    options = Options()
    options.parseOptions(["--relay", "smtp://user:s3cret@relay.example:2525?starttls=require"])
    url = options["relay-url"]
    assert (url.host, url.port, url.username) == ("relay.example", 2525, "user")
    assert "s3cret" not in repr(url)
    with pytest.raises(usage.UsageError) as info:
        Options().parseOptions(["--relay", "smtp://user:s3cret@relay.example:99999"])
    assert "s3cret" not in str(info.value)
    assert "--relay" in str(info.value)


def test_limits_are_options_with_suffixes() -> None:
    options = parse("--max-size", "10M", "--max-recipients", "7", "--greet-delay", "0.5")
    limits = options["limits"]
    assert limits.max_size == 10 * 1024 * 1024
    assert limits.max_recipients == 7
    assert limits.greet_delay == 0.5


def test_hand_over_gives_the_state_to_the_service_user(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("chown to another user needs root")
    data = tmp_path / "data"
    (data / "journal").mkdir(parents=True)
    (data / "journal" / "000000000001.seg").write_bytes(b"")
    (data / "captured").mkdir()
    (data / "captured" / "index.jsonl").write_text("")
    (data / "smtpgw.db").write_bytes(b"")
    ensure_self_signed(str(data), "gw.test")
    _hand_over(FilePath(str(data)), (65534, 65534))
    for path in (
        data,
        data / "journal" / "000000000001.seg",
        data / "captured" / "index.jsonl",
        data / "smtpgw.db",
        data / "tls" / "selfsigned.key",
    ):
        assert path.stat().st_uid == 65534, path


def test_hand_over_never_follows_a_planted_link(tmp_path: Path) -> None:
    """
    The service user owns the data directory; links it plants there must not
    make root give away their targets.
    """
    if os.getuid() != 0:
        pytest.skip("chown to another user needs root")
    data = tmp_path / "data"
    (data / "journal").mkdir(parents=True)
    victims = tmp_path / "victims"
    victims.mkdir()
    for name in ("a", "b", "c", "d"):
        (victims / name).write_text("root's")
    (victims / "dir").mkdir()
    (victims / "dir" / "inner").write_text("root's")
    (data / "journal" / "x.seg").symlink_to(victims / "a")
    (data / "smtpgw.db").symlink_to(victims / "b")
    (data / "smtpgw.db-wal").symlink_to(victims / "c")
    (data / "captured").symlink_to(victims / "dir")
    (data / "tls").symlink_to(victims / "dir")
    _hand_over(FilePath(str(data)), (65534, 65534))
    for victim in (*(victims / n for n in "abcd"), victims / "dir", victims / "dir" / "inner"):
        assert victim.stat().st_uid == 0, victim


def test_a_linked_tls_directory_or_key_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    elsewhere.chmod(0o755)
    (data / "tls").symlink_to(elsewhere)
    with pytest.raises(TLSConfigError, match="must be a directory"):
        ensure_self_signed(str(data), "gw.test")
    assert elsewhere.stat().st_mode & 0o777 == 0o755
    assert list(elsewhere.iterdir()) == []
    (data / "tls").unlink()
    (data / "tls").mkdir()
    (data / "tls" / "selfsigned.key").symlink_to(elsewhere / "secret")
    with pytest.raises(TLSConfigError, match="symbolic link"):
        ensure_self_signed(str(data), "gw.test")


def test_gateway_tac_builds_the_same_service(tmp_path: Path) -> None:
    """
    gateway.tac loads (it is not linted, so it is at least run) and builds
    the gateway from SMTPGW_OPTIONS.
    """
    script = (
        "import sys\n"
        "from twisted.application.service import IService, IServiceCollection\n"
        "namespace = {'__file__': sys.argv[1]}\n"
        "exec(compile(open(sys.argv[1]).read(), sys.argv[1], 'exec'), namespace)\n"
        "top = IService(namespace['application'])\n"
        "[gateway] = list(IServiceCollection(top))\n"
        "print(type(gateway).__name__)\n"
        "print(' '.join(sorted(type(s).__name__ for s in gateway)))\n"
    )
    env = dict(
        os.environ,
        SMTPGW_OPTIONS=f"--data-dir {tmp_path / 'data'} --ports 2525 --relay capture",
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "gateway.tac")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    top, children = result.stdout.splitlines()
    assert top == "OrderedMultiService"
    assert set(children.split()) >= {
        "ThreadedUserStore",
        "SQLiteAlertStore",
        "CaptureOutbound",
        "MessageQueue",
        "MultiPortListener",
    }


def test_twistd_finds_the_plugin_and_lists_every_option() -> None:
    """
    After the README's install (editable, compat mode), C{twistd smtpgw
    --help} finds the plugin and lists the options of PRODUCT sections 2, 3
    and 7 and every session limit.
    """
    twistd = str(Path(sys.executable).parent / "twistd")
    result = subprocess.run(
        [twistd, "smtpgw", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    for option in (
        "--data-dir",
        "--ports",
        "--interface",
        "--hostname",
        "--tls-cert",
        "--tls-key",
        "--require-tls",
        "--relay",
        "--rate",
        "--concurrency",
        "--max-size",
        "--max-recipients",
        "--max-queue-age",
        "--acceptors",
        *(f"--{name.replace('_', '-')}=" for name in LIMIT_OPTIONS),
    ):
        assert option in result.stdout, option


class _FakeTLS:
    """
    What L{_Reload} uses of L{smtpgw.tls.ReloadableTLS}: a reload that
    gives C{result}.
    """

    def __init__(self, result: bool) -> None:
        self.result = result
        self.reactors: list[object] = []

    def reload_in_thread(self, reactor: object) -> Deferred[bool]:
        self.reactors.append(reactor)
        return succeed(self.result)


class _FakePool:
    def __init__(self, error: Exception | None = None) -> None:
        self.sent = 0
        self.error = error

    def send_tls(self) -> None:
        self.sent += 1
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("reloaded", [True, False])
def test_a_sighup_reload_reads_in_a_thread_and_tells_the_acceptors(reloaded: bool) -> None:
    """
    A SIGHUP's reload goes through the certificate's reload in a thread,
    with the gateway's reactor; the acceptors get the certificate only
    when it was reloaded; with no acceptors nothing is sent.
    """
    reactor = object()
    tls, pool = _FakeTLS(reloaded), _FakePool()
    results: list[bool] = []
    _Reload(tls, pool, reactor).reload().addCallback(results.append)
    assert (results, tls.reactors, pool.sent) == ([reloaded], [reactor], int(reloaded))
    alone: list[bool] = []
    _Reload(_FakeTLS(reloaded), None, reactor).reload().addCallback(alone.append)
    assert alone == [reloaded]


def test_a_failure_to_tell_the_acceptors_is_logged_not_left_unhandled(
    logged_errors: list[dict[str, Any]],
) -> None:
    """
    Nobody waits on a SIGHUP's reload: when sending the certificate to the
    acceptors fails, that is logged, and the reload's result is False.
    """
    results: list[bool] = []
    pool = _FakePool(RuntimeError("pipe gone"))
    _Reload(_FakeTLS(True), pool, object()).reload().addCallback(results.append)
    assert results == [False]
    [event] = logged_errors
    assert event["log_failure"].check(RuntimeError)
    assert "acceptors failed" in event["log_format"]
    logged_errors.clear()
