"""
Tests for L{smtpgw.checker}: SMTP AUTH credentials against the user records,
with bcrypt off the reactor thread and a cache of verified credentials.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pytest
import pytest_twisted
from attrs import define
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.mail.imap4 import PLAINCredentials
from twisted.mail.smtp import LOGINCredentials
from zope.interface.verify import verifyObject

from smtpgw.checker import (
    CACHE_TTL,
    MAX_USERNAME_BYTES,
    BcryptPool,
    PasswordCheckUnavailable,
    SmtpUserChecker,
    TooManyPasswordChecks,
    UserLookup,
    VerifiedCredentialsCache,
)
from smtpgw.model import SmtpUser
from smtpgw.passwords import (
    MAX_PASSWORD_BYTES,
    dummy_hash,
    hash_cost,
    hash_password,
    verify_password,
)
from smtpgw.userstore import (
    SQLiteUserStore,
    StoreNotRunning,
    ThreadedUserStore,
    database_path,
)
from tests.twisted_support import async_test

ROUNDS = 4
T0 = 1_700_000_000.0
P = ParamSpec("P")
T = TypeVar("T")


class CountingVerify:
    """
    L{verify_password} that remembers each call and the thread it ran in.
    """

    def __init__(self) -> None:
        self.hashes: list[bytes] = []
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        with self._lock:
            self.hashes.append(hashed)
            self.threads.append(threading.current_thread())
        return verify_password(password, hashed)

    @property
    def calls(self) -> int:
        return len(self.hashes)


class GatedVerify(CountingVerify):
    """
    L{CountingVerify} that, once L{close} is called, holds every check in
    its thread until L{open}: a slow bcrypt, without a sleep.
    """

    def __init__(self) -> None:
        super().__init__()
        self._gate = threading.Event()
        self._gate.set()
        self._held = 0
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def close(self) -> None:
        self._gate.clear()

    def open(self) -> None:
        self._gate.set()

    def held(self, count: int) -> Deferred[None]:
        """
        Fires once C{count} checks have been held at the gate.
        """
        from twisted.internet import reactor

        d: Deferred[None] = Deferred()
        self._waiting.append((count, d))
        self._fire_waiting()
        # A bound, so that a broken test fails rather than hangs.
        return d.addTimeout(30, reactor)

    def _fire_waiting(self) -> None:
        with self._lock:
            held = self._held
        still = []
        for count, d in self._waiting:
            if held >= count:
                d.callback(None)
            else:
                still.append((count, d))
        self._waiting = still

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        from twisted.internet import reactor

        if not self._gate.is_set():
            with self._lock:
                self._held += 1
            reactor.callFromThread(self._fire_waiting)  # type: ignore[attr-defined]
            assert self._gate.wait(timeout=30)
        return super().__call__(password, hashed)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(T0)
    return c


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return database_path(tmp_path)


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[ThreadedUserStore]:
    from twisted.internet import reactor

    s = ThreadedUserStore(db_path, reactor=reactor, clock=clock, pool_size=2, rounds=ROUNDS)  # type: ignore[arg-type]
    s.startService()
    yield s
    if s.running:
        pytest_twisted.blockon(s.stopService())


@pytest.fixture
def other_connection(
    db_path: Path, clock: Clock, store: ThreadedUserStore
) -> Iterator[SQLiteUserStore]:
    """
    The database as another process (C{smtpgw-admin}) sees it.
    """
    with SQLiteUserStore.open(db_path, clock, rounds=ROUNDS) as s:
        yield s


@pytest.fixture
def verify() -> GatedVerify:
    return GatedVerify()


@pytest.fixture
def bcrypt_pool() -> Iterator[BcryptPool]:
    from twisted.internet import reactor

    pool = BcryptPool(reactor, size=2, max_pending=8)  # type: ignore[arg-type]
    pool.startService()
    yield pool
    pytest_twisted.blockon(pool.stopService())


@pytest.fixture(params=[False, True], ids=["hop-every-login", "records-kept"])
def checker(
    request: pytest.FixtureRequest,
    store: ThreadedUserStore,
    clock: Clock,
    verify: GatedVerify,
    bcrypt_pool: BcryptPool,
) -> SmtpUserChecker:
    """
    The checker, with (as the gateway runs it) and without the store's
    change token: every test of it holds either way. With it, the store
    has a connection open first, so that the token is known from the
    first login on and a test's second login reuses what the first found.
    """
    if request.param:
        pytest_twisted.blockon(store.get_user("nobody"))
        assert store.change_token() is not None
    return SmtpUserChecker(
        store,
        clock,
        bcrypt=bcrypt_pool,
        rounds=ROUNDS,
        verify=verify,
        changes=store.change_token if request.param else None,
    )


@pytest.fixture
def user(other_connection: SQLiteUserStore) -> tuple[SmtpUser, str]:
    other_connection.create_list("news")
    return other_connection.create_user("news")


def creds(username: bytes | str, password: bytes | str) -> UsernamePassword:
    return UsernamePassword(username, password)  # type: ignore[arg-type]


async def login(checker: SmtpUserChecker, username: str, password: bytes | str) -> SmtpUser:
    return await checker.requestAvatarId(creds(username, password))


async def refused(checker: SmtpUserChecker, credentials: Any) -> None:
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(credentials)


def test_provides_icredentialschecker(checker: SmtpUserChecker) -> None:
    """
    It is a cred checker for username and password credentials.
    """
    assert verifyObject(ICredentialsChecker, checker)
    assert [i.__name__ for i in checker.credentialInterfaces] == ["IUsernamePassword"]


@async_test
async def test_right_password_gives_the_user_record(
    checker: SmtpUserChecker, user: tuple[SmtpUser, str], verify: CountingVerify
) -> None:
    """
    The avatar id is the L{SmtpUser} itself, and bcrypt ran in a thread of
    the bcrypt pool, neither the reactor's nor the store's.
    """
    record, password = user
    avatar = await checker.requestAvatarId(creds(record.username.encode(), password.encode()))
    assert avatar == record
    assert verify.calls == 1
    assert verify.threads[0].name.startswith("smtpgw-bcrypt-")


@async_test
async def test_text_credentials_work_too(
    checker: SmtpUserChecker, user: tuple[SmtpUser, str]
) -> None:
    """
    Credentials made with text rather than bytes are checked the same.
    """
    record, password = user
    assert (await checker.requestAvatarId(creds(record.username, password))) == record


@async_test
async def test_smtp_auth_credential_types(
    checker: SmtpUserChecker, user: tuple[SmtpUser, str]
) -> None:
    """
    What the SMTP server's PLAIN and LOGIN challengers produce is accepted.
    """
    record, password = user
    plain = PLAINCredentials()
    plain.setResponse(b"\0" + record.username.encode() + b"\0" + password.encode())
    assert (await checker.requestAvatarId(plain)) == record
    login = LOGINCredentials()
    login.setResponse(record.username.encode())
    login.setResponse(password.encode())
    assert (await checker.requestAvatarId(login)) == record


@async_test
async def test_wrong_unknown_and_inactive_fail_alike(
    checker: SmtpUserChecker,
    user: tuple[SmtpUser, str],
    other_connection: SQLiteUserStore,
    verify: CountingVerify,
) -> None:
    """
    A wrong password, an unknown user and an inactive user with the right
    password each fail with a bare L{UnauthorizedLogin} after exactly one
    bcrypt check; the unknown user's is against the dummy hash of the same
    cost.
    """
    record, password = user
    failures = []
    for credentials in [
        creds(record.username, "wrong"),
        creds("smtp-news-unknown0", password),
    ]:
        with pytest.raises(UnauthorizedLogin) as e:
            await checker.requestAvatarId(credentials)
        failures.append(str(e.value))
    other_connection.update_user(record.username, active=False)
    with pytest.raises(UnauthorizedLogin) as e:
        await checker.requestAvatarId(creds(record.username, password))
    failures.append(str(e.value))
    assert len(set(failures)) == 1
    assert verify.hashes == [record.password_hash, dummy_hash(ROUNDS), record.password_hash]


@async_test
async def test_cache_hit_avoids_bcrypt(
    checker: SmtpUserChecker, user: tuple[SmtpUser, str], verify: CountingVerify
) -> None:
    """
    Once verified, the same credentials log in again without bcrypt.
    """
    record, password = user
    for _ in range(5):
        assert (await checker.requestAvatarId(creds(record.username, password))) == record
    assert verify.calls == 1


@async_test
async def test_failed_logins_are_not_cached(
    checker: SmtpUserChecker, user: tuple[SmtpUser, str], verify: CountingVerify
) -> None:
    """
    A wrong password costs bcrypt every time.
    """
    record, _ = user
    await refused(checker, creds(record.username, "wrong"))
    await refused(checker, creds(record.username, "wrong"))
    assert verify.calls == 2
    assert len(checker.cache) == 0


@async_test
async def test_cache_misses_after_regenerate_password(
    checker: SmtpUserChecker,
    user: tuple[SmtpUser, str],
    store: ThreadedUserStore,
    verify: CountingVerify,
) -> None:
    """
    A cached old password stops working the moment the password is
    regenerated, and the new one is checked with bcrypt.
    """
    record, old = user
    await checker.requestAvatarId(creds(record.username, old))
    new = await store.regenerate_password(record.username)
    await refused(checker, creds(record.username, old))
    assert (await checker.requestAvatarId(creds(record.username, new))).username == record.username
    assert verify.calls == 3


@async_test
async def test_cache_misses_when_another_connection_changes_the_hash(
    checker: SmtpUserChecker,
    user: tuple[SmtpUser, str],
    db_path: Path,
    verify: CountingVerify,
) -> None:
    """
    A hash changed behind the gateway's back (another process, raw SQL, even
    to a hash of the same password) makes the cached credential miss.
    """
    record, password = user
    await checker.requestAvatarId(creds(record.username, password))
    with sqlite3.connect(db_path) as raw:
        raw.execute(
            "UPDATE users SET password_hash = ?",
            (hash_password(password, rounds=ROUNDS),),
        )
    raw.close()
    assert (
        await checker.requestAvatarId(creds(record.username, password))
    ).username == record.username
    assert verify.calls == 2
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE users SET password_hash = ?", (hash_password("other", rounds=ROUNDS),))
    raw.close()
    await refused(checker, creds(record.username, password))
    assert verify.calls == 3


@async_test
async def test_inactive_user_fails_even_when_cached(
    checker: SmtpUserChecker,
    user: tuple[SmtpUser, str],
    other_connection: SQLiteUserStore,
    verify: CountingVerify,
) -> None:
    """
    Deactivating a user ends its logins at once, cached or not, and the
    refusal costs bcrypt like any other.
    """
    record, password = user
    await checker.requestAvatarId(creds(record.username, password))
    other_connection.update_user(record.username, active=False)
    await refused(checker, creds(record.username, password))
    assert verify.calls == 2


@async_test
async def test_deleted_user_fails_even_when_cached(
    checker: SmtpUserChecker, user: tuple[SmtpUser, str], other_connection: SQLiteUserStore
) -> None:
    """
    A deleted user's cached credentials are worthless.
    """
    record, password = user
    await checker.requestAvatarId(creds(record.username, password))
    other_connection.delete_user(record.username)
    await refused(checker, creds(record.username, password))


@async_test
async def test_cache_entries_expire(
    checker: SmtpUserChecker, user: tuple[SmtpUser, str], clock: Clock, verify: CountingVerify
) -> None:
    """
    A verification is trusted for L{CACHE_TTL} seconds, then bcrypt runs again.
    """
    record, password = user
    await checker.requestAvatarId(creds(record.username, password))
    clock.advance(CACHE_TTL - 0.001)
    await checker.requestAvatarId(creds(record.username, password))
    assert verify.calls == 1
    clock.advance(0.001)
    await checker.requestAvatarId(creds(record.username, password))
    assert verify.calls == 2


@async_test
async def test_password_of_72_bytes_is_checked_and_73_refused(
    checker: SmtpUserChecker, user: tuple[SmtpUser, str], db_path: Path, verify: CountingVerify
) -> None:
    """
    A 72-byte password (bcrypt's limit) logs in; 73 bytes whose first 72
    are right are refused without reaching bcrypt or the store.
    """
    record, _ = user
    password = b"p" * MAX_PASSWORD_BYTES
    with sqlite3.connect(db_path) as raw:
        raw.execute(
            "UPDATE users SET password_hash = ?", (hash_password(password, rounds=ROUNDS),)
        )
    raw.close()
    assert (
        await checker.requestAvatarId(creds(record.username, password))
    ).username == record.username
    await refused(checker, creds(record.username, password + b"p"))
    assert verify.calls == 1


@async_test
async def test_malformed_stored_hash_is_a_failed_login(
    checker: SmtpUserChecker, user: tuple[SmtpUser, str], db_path: Path
) -> None:
    """
    A damaged hash in the database refuses the login rather than erroring.
    """
    record, password = user
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE users SET password_hash = x'00ff'")
    raw.close()
    await refused(checker, creds(record.username, password))


@async_test
async def test_empty_password_is_refused(
    checker: SmtpUserChecker, user: tuple[SmtpUser, str]
) -> None:
    """
    An empty password is just a wrong one.
    """
    record, _ = user
    await refused(checker, creds(record.username, b""))


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (b"\xff\xfe-not-utf8", b"pw"),
        (b"", b"pw"),
        (b"u" * (MAX_USERNAME_BYTES + 1), b"pw"),
        (b"smtp-news-x", b"p" * 100_000),
        ("smtp-news-x", "\udcff"),
    ],
)
@async_test
async def test_malformed_credentials_fail_cleanly(
    checker: SmtpUserChecker, verify: CountingVerify, username: bytes, password: bytes
) -> None:
    """
    Non-UTF-8, empty, or oversized usernames and passwords are refused
    without an error, a store lookup or bcrypt.
    """
    await refused(checker, creds(username, password))
    assert verify.calls == 0


@async_test
async def test_longest_username_is_looked_up(
    checker: SmtpUserChecker, verify: CountingVerify
) -> None:
    """
    A username of L{MAX_USERNAME_BYTES} bytes is looked up (and unknown:
    the dummy check runs).
    """
    await refused(checker, creds(b"u" * MAX_USERNAME_BYTES, b"pw"))
    assert verify.hashes == [dummy_hash(ROUNDS)]


@async_test
async def test_store_failure_is_not_a_failed_login(db_path: Path, clock: Clock) -> None:
    """
    When the store cannot answer, the error is reported as such (the SMTP
    server answers 451, not 535).
    """
    from twisted.internet import reactor

    stopped = ThreadedUserStore(db_path, reactor=reactor, clock=clock)  # type: ignore[arg-type]
    checker = SmtpUserChecker(stopped, clock, rounds=ROUNDS)
    with pytest.raises(StoreNotRunning):
        await checker.requestAvatarId(creds("u", "p"))


@async_test
async def test_works_behind_a_portal(checker: SmtpUserChecker, user: tuple[SmtpUser, str]) -> None:
    """
    Through L{Portal.login}, the realm receives the L{SmtpUser}.
    """
    record, password = user
    seen: list[Any] = []

    class Realm:
        def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
            seen.append(avatarId)
            return interfaces[0], object(), lambda: None

    from twisted.mail.smtp import IMessageDelivery

    portal = Portal(Realm(), [checker])  # type: ignore[arg-type]
    await portal.login(creds(record.username, password), None, IMessageDelivery)
    assert seen == [record]


# --- bcrypt in its own, bounded pool ------------------------------------------


@define
class Users:
    """
    A synchronous user store in memory.
    """

    users: dict[str, SmtpUser]
    cost: int | None = None

    def get_user(self, username: str) -> SmtpUser | None:
        return self.users.get(username)

    def typical_hash_cost(self) -> int | None:
        return self.cost


@define
class ImmediateRunner:
    """
    Runs the checker's lookups at once, in the calling thread: a store
    that answers without a hop, so a test knows where every login is.
    """

    users: Users

    def run(self, f: Callable[[UserLookup], T]) -> Deferred[T]:
        try:
            return succeed(f(self.users))
        except Exception:
            return fail()


class Settled:
    """
    Which of the watched L{Deferred}s have a result (C{called} does not say:
    a Deferred waiting on another one counts as called).
    """

    def __init__(self) -> None:
        self.results: list[object] = []

    def watch(self, d: Deferred[T]) -> Deferred[T]:
        def note(result: T) -> T:
            self.results.append(result)
            return result

        return d.addBoth(note)

    def __len__(self) -> int:
        return len(self.results)


def make_user(password: str, rounds: int = ROUNDS, username: str = "alice") -> SmtpUser:
    return SmtpUser(
        username=username, list="news", password_hash=hash_password(password, rounds=rounds)
    )


@pytest.fixture
def single_thread_pool() -> Iterator[BcryptPool]:
    """
    A bcrypt pool of one thread that takes at most three checks.
    """
    from twisted.internet import reactor

    pool = BcryptPool(reactor, size=1, max_pending=3)  # type: ignore[arg-type]
    pool.startService()
    yield pool
    pytest_twisted.blockon(pool.stopService())


@async_test
async def test_cached_login_is_prompt_while_bcrypt_is_saturated(
    checker: SmtpUserChecker,
    user: tuple[SmtpUser, str],
    verify: GatedVerify,
    bcrypt_pool: BcryptPool,
) -> None:
    """
    With both bcrypt threads held by slow checks and more queued behind
    them, a cached login still succeeds at once: its lookup has the store's
    threads to itself and it never waits for bcrypt.
    """
    from twisted.internet import reactor

    record, password = user
    await login(checker, record.username, password)
    verify.close()
    settled = Settled()
    try:
        storm = [
            settled.watch(checker.requestAvatarId(creds(name, wrong)))
            for name, wrong in [(record.username, f"bad{i}") for i in range(3)]
            + [(f"smtp-news-nobody{i}", "bad") for i in range(3)]
        ]
        await verify.held(2)
        cached = checker.requestAvatarId(creds(record.username, password))
        # Bounded so that a login stuck behind bcrypt fails the test.
        assert (await cached.addTimeout(10, reactor)) == record
        assert verify.calls == 1
        assert bcrypt_pool.pending >= 2
        assert len(settled) == 0
    finally:
        verify.open()
    for d in storm:
        with pytest.raises(UnauthorizedLogin):
            await d
    assert bcrypt_pool.pending == 0
    assert verify.calls == 7


async def until(condition: Callable[[], bool], turns: int = 10_000) -> None:
    """
    Let the reactor turn until C{condition} holds (results from the store's
    threads arrive through it); fail after C{turns} turns.
    """
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(turns):
        if condition():
            return
        await deferLater(reactor, 0.001, lambda: None)
    raise AssertionError("the condition never held")


@async_test
async def test_identical_logins_in_parallel_share_one_bcrypt_check(
    checker: SmtpUserChecker,
    user: tuple[SmtpUser, str],
    verify: GatedVerify,
) -> None:
    """
    Twenty connections opened at once with the same credentials (an
    application starting up) cost one bcrypt check, not twenty; the same
    holds for identical attempts at an unknown user, so sharing tells
    nothing about which users exist. Different passwords are not shared.
    """
    record, password = user
    verify.close()
    try:
        good = [checker.requestAvatarId(creds(record.username, password)) for _ in range(20)]
        ghost = [checker.requestAvatarId(creds("smtp-news-ghost", "pw")) for _ in range(5)]
        other = checker.requestAvatarId(creds(record.username, "different"))
        await verify.held(2)
        # Every lookup has come back from the store's threads: 19 logins
        # wait on the first good one's check, 4 on the first ghost's.
        await until(lambda: checker.sharing == 19 + 4)
    finally:
        verify.open()
    for d in good:
        assert (await d) == record
    for d in [*ghost, other]:
        with pytest.raises(UnauthorizedLogin):
            await d
    assert verify.calls == 3
    # Later logins hit the cache.
    assert (await checker.requestAvatarId(creds(record.username, password))) == record
    assert verify.calls == 3


@async_test
async def test_password_checks_at_the_cap_wait_and_one_past_it_fails_fast(
    clock: Clock, verify: GatedVerify, single_thread_pool: BcryptPool
) -> None:
    """
    With bcrypt held, checks are taken up to the cap (three here: they
    wait); one past it fails at once with L{TooManyPasswordChecks}, a
    temporary failure rather than a refused login, for a known user and an
    unknown one alike. A cached login still succeeds, and once the held
    checks finish the pool takes new ones again.
    """
    alice = make_user("right")
    checker = SmtpUserChecker(
        ImmediateRunner(Users({"alice": alice})),
        clock,
        bcrypt=single_thread_pool,
        rounds=ROUNDS,
        verify=verify,
    )
    await login(checker, "alice", "right")
    verify.close()
    settled = Settled()
    try:
        waiting = [
            settled.watch(checker.requestAvatarId(creds(name, password)))
            for name, password in [("alice", "wrong"), ("bob", "x"), ("alice", "wrong again")]
        ]
        assert single_thread_pool.pending == 3
        assert len(settled) == 0
        for over in [creds("alice", "wrong 3"), creds("bob", "y")]:
            refused_now = settled.watch(checker.requestAvatarId(over))
            assert len(settled) == 1
            with pytest.raises(TooManyPasswordChecks):
                await refused_now
            settled.results.clear()
        assert single_thread_pool.pending == 3
        assert (await login(checker, "alice", "right")) == alice
    finally:
        verify.open()
    for d in waiting:
        with pytest.raises(UnauthorizedLogin):
            await d
    assert single_thread_pool.pending == 0
    await refused(checker, creds("alice", "wrong"))
    assert issubclass(TooManyPasswordChecks, PasswordCheckUnavailable)
    assert not issubclass(PasswordCheckUnavailable, UnauthorizedLogin)


@async_test
async def test_bcrypt_pool_runs_checks_only_while_running() -> None:
    """
    Before its start and after its stop the pool fails checks with
    L{PasswordCheckUnavailable} rather than dropping them; it can start again.
    """
    from twisted.internet import reactor

    pool = BcryptPool(reactor, size=2)  # type: ignore[arg-type]
    with pytest.raises(PasswordCheckUnavailable):
        await pool.run(lambda: 1)
    pool.startService()
    assert await gatherResults([pool.run(lambda: 1), pool.run(lambda: 2)]) == [1, 2]
    with pytest.raises(ZeroDivisionError):
        await pool.run(lambda: 1 // 0)
    await pool.stopService()
    with pytest.raises(PasswordCheckUnavailable):
        await pool.run(lambda: 1)
    pool.startService()
    assert await pool.run(lambda: 3) == 3
    await pool.stopService()
    assert pool.pending == 0


@async_test
async def test_stopping_the_bcrypt_pool_fails_queued_checks_and_finishes_running_ones() -> None:
    """
    A stop fails the checks still queued at once, without running them, and
    completes when the check already running has finished.
    """
    from twisted.internet import reactor

    pool = BcryptPool(reactor, size=1)  # type: ignore[arg-type]
    pool.startService()
    gate = threading.Event()
    started: Deferred[None] = Deferred()
    ran: list[str] = []

    def slow() -> str:
        reactor.callFromThread(started.callback, None)  # type: ignore[attr-defined]
        assert gate.wait(timeout=30)
        ran.append("slow")
        return "slow"

    def queued() -> str:
        ran.append("queued")
        return "queued"

    running = pool.run(slow)
    waiting = [pool.run(queued), pool.run(queued)]
    await started
    stopped = pool.stopService()
    for d in waiting:
        assert d.called  # at once: no check ran
        with pytest.raises(PasswordCheckUnavailable):
            await d
    assert pool.pending == 1
    assert not stopped.called
    gate.set()
    assert await running == "slow"
    await stopped
    assert ran == ["slow"]
    assert pool.pending == 0


# --- the dummy hash follows the stored hashes' cost ----------------------------


class CostRecorder:
    """
    A verify that records the cost of each hash it is given, and refuses all.
    """

    def __init__(self) -> None:
        self.costs: list[int | None] = []

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.costs.append(hash_cost(hashed))
        return False


@async_test
async def test_unknown_user_is_checked_at_the_cost_the_store_reports(
    clock: Clock, bcrypt_pool: BcryptPool
) -> None:
    """
    Before any login has shown a stored hash, an unknown user's dummy check
    has the cost the store says its hashes have, not the default 12.
    """
    costs = CostRecorder()
    checker = SmtpUserChecker(
        ImmediateRunner(Users({}, cost=5)), clock, bcrypt=bcrypt_pool, verify=costs
    )
    await refused(checker, creds("nobody", "x"))
    assert costs.costs == [5]


@async_test
async def test_unknown_user_follows_the_cost_of_the_last_stored_hash_checked(
    clock: Clock, bcrypt_pool: BcryptPool
) -> None:
    """
    The dummy check of an unknown user has the cost of the last real hash
    bcrypt checked: a store of cost-4 hashes gives cost-4 dummy checks,
    and a user whose hash is of cost 5 moves them to 5.
    """
    users = Users({"alice": make_user("a", rounds=4), "bob": make_user("b", rounds=5)}, cost=12)
    costs = CostRecorder()
    checker = SmtpUserChecker(ImmediateRunner(users), clock, bcrypt=bcrypt_pool, verify=costs)
    await refused(checker, creds("alice", "wrong"))
    await refused(checker, creds("nobody", "x"))
    await refused(checker, creds("bob", "wrong"))
    await refused(checker, creds("nobody", "x"))
    assert costs.costs == [4, 4, 5, 5]


@async_test
async def test_without_any_stored_hash_the_dummy_has_the_given_cost(
    clock: Clock, bcrypt_pool: BcryptPool
) -> None:
    """
    With no user at all, the dummy has the cost the checker was given
    (the default for new hashes, 12, unless told otherwise).
    """
    costs = CostRecorder()
    default = SmtpUserChecker(ImmediateRunner(Users({})), clock, bcrypt=bcrypt_pool, verify=costs)
    told = SmtpUserChecker(
        ImmediateRunner(Users({})), clock, bcrypt=bcrypt_pool, rounds=6, verify=costs
    )
    await refused(default, creds("nobody", "x"))
    await refused(told, creds("nobody", "x"))
    assert costs.costs == [12, 6]


@async_test
async def test_unknown_user_check_in_the_real_store_has_the_stored_cost(
    store: ThreadedUserStore,
    other_connection: SQLiteUserStore,
    clock: Clock,
    bcrypt_pool: BcryptPool,
) -> None:
    """
    Against the SQLite store, whose users were made with cost 5 (as
    C{SMTPGW_BCRYPT_ROUNDS=5} would), an unknown user's check is of cost 5
    although the checker assumes 12 by default.
    """
    other_connection.create_list("news")
    other_connection.create_user("news", rounds=5)
    costs = CostRecorder()
    checker = SmtpUserChecker(store, clock, bcrypt=bcrypt_pool, verify=costs)
    await refused(checker, creds("smtp-news-nobody00", "x"))
    assert costs.costs == [5]


@async_test
async def test_without_a_bcrypt_pool_the_check_runs_in_the_store_hop(
    store: ThreadedUserStore, user: tuple[SmtpUser, str], clock: Clock, verify: GatedVerify
) -> None:
    """
    A checker given no bcrypt pool checks in the store's threads, behind
    the lookup, with the same answers and the same cache.
    """
    record, password = user
    checker = SmtpUserChecker(store, clock, rounds=ROUNDS, verify=verify)
    assert (await login(checker, record.username, password)) == record
    assert (await login(checker, record.username, password)) == record
    await refused(checker, creds(record.username, "wrong"))
    await refused(checker, creds("smtp-news-nobody00", password))
    assert verify.hashes == [record.password_hash, record.password_hash, dummy_hash(ROUNDS)]
    assert all(t.name.startswith("smtpgw-userstore") for t in verify.threads)


# --- the cache on its own ---------------------------------------------------


def test_cache_key_depends_on_every_part() -> None:
    """
    Changing the username, the hash or the password changes the key, and so
    does the per-process secret; length prefixes keep parts apart.
    """
    clock = Clock()
    cache = VerifiedCredentialsCache(clock, secret=b"k" * 32)
    base = cache.key("user", b"hash", b"pw")
    assert base == cache.key("user", b"hash", b"pw")
    assert base != cache.key("user2", b"hash", b"pw")
    assert base != cache.key("user", b"hash2", b"pw")
    assert base != cache.key("user", b"hash", b"pw2")
    assert cache.key("ab", b"c", b"") != cache.key("a", b"bc", b"")
    assert base != VerifiedCredentialsCache(clock).key("user", b"hash", b"pw")
    assert b"pw" not in base


def test_cache_size_limit_evicts_least_recently_used() -> None:
    """
    At the limit every entry stays; one past it, the least recently used
    goes.
    """
    cache = VerifiedCredentialsCache(Clock(), max_size=3)
    for key in (b"a", b"b", b"c"):
        cache.add(key)
    assert len(cache) == 3
    assert b"a" in cache
    cache.add(b"d")
    assert len(cache) == 3
    assert b"b" not in cache
    assert b"a" in cache
    assert b"d" in cache


def test_cache_ttl_at_and_past_the_limit() -> None:
    """
    An entry is good until just before its TTL is over, and gone at it.
    """
    clock = Clock()
    cache = VerifiedCredentialsCache(clock, ttl=10.0)
    cache.add(b"k")
    clock.advance(9.999)
    assert b"k" in cache
    clock.advance(0.001)
    assert b"k" not in cache
    assert len(cache) == 0


def test_cache_is_thread_safe() -> None:
    """
    Threads adding and checking at once neither fail nor exceed the bound.
    """
    cache = VerifiedCredentialsCache(Clock(), max_size=100)
    errors: list[BaseException] = []

    def hammer(n: int) -> None:
        try:
            for i in range(2000):
                key = f"{n}-{i}".encode()
                cache.add(key)
                _ = key in cache
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(cache) == 100
    cache.clear()
    assert len(cache) == 0


# --- records kept while the database is unchanged -----------------------------


class CountingHops:
    """
    The store, with its hops counted and its change token passed on.
    """

    def __init__(self, store: ThreadedUserStore) -> None:
        self.store = store
        self.hops = 0
        self.after_lookup: Callable[[], object] = lambda: None

    def run(self, f: Callable[[UserLookup], T]) -> Deferred[T]:
        self.hops += 1

        def then(result: T) -> T:
            self.after_lookup()
            return result

        return self.store.run(f).addCallback(then)


@pytest.fixture
def hops(store: ThreadedUserStore) -> CountingHops:
    return CountingHops(store)


@pytest.fixture
def keeping(
    hops: CountingHops, store: ThreadedUserStore, clock: Clock, bcrypt_pool: BcryptPool
) -> Callable[..., SmtpUserChecker]:
    """
    Makes a checker that keeps records, on a store that has a connection
    open (until its first call, the store's token is unknown).
    """
    pytest_twisted.blockon(store.get_user("nobody"))
    assert store.change_token() is not None

    def make(verify: Callable[[bytes, bytes], bool] = verify_password) -> SmtpUserChecker:
        return SmtpUserChecker(
            hops,
            clock,
            bcrypt=bcrypt_pool,
            rounds=ROUNDS,
            verify=verify,
            changes=store.change_token,
        )

    return make


@async_test
async def test_unchanged_database_saves_the_hop(
    keeping: Callable[..., SmtpUserChecker],
    hops: CountingHops,
    user: tuple[SmtpUser, str],
    other_connection: SQLiteUserStore,
) -> None:
    """
    While nothing is committed to the database, a user's logins after the
    first make no hop to the store's threads; any commit, by any
    connection and about anyone, makes the next login look the record up
    again.
    """
    checker = keeping()
    record, password = user
    for _ in range(3):
        assert await login(checker, record.username, password) == record
    assert hops.hops == 1
    other_connection.create_list("other")
    assert await login(checker, record.username, password) == record
    assert await login(checker, record.username, password) == record
    assert hops.hops == 2


@async_test
async def test_a_kept_record_is_checked_like_a_looked_up_one(
    keeping: Callable[..., SmtpUserChecker],
    hops: CountingHops,
    user: tuple[SmtpUser, str],
    verify: CountingVerify,
) -> None:
    """
    A wrong password against a kept record is refused after bcrypt, and
    the right one is still vouched for by the cache: only the hop is saved.
    """
    checker = keeping(verify)
    record, password = user
    assert await login(checker, record.username, password) == record
    await refused(checker, creds(record.username, "wrong"))
    assert await login(checker, record.username, password) == record
    assert (hops.hops, verify.calls) == (1, 2)


@async_test
async def test_a_commit_during_the_lookup_is_not_missed(
    keeping: Callable[..., SmtpUserChecker],
    hops: CountingHops,
    user: tuple[SmtpUser, str],
    other_connection: SQLiteUserStore,
) -> None:
    """
    The record is kept with the token read before the lookup began: a user
    deactivated after the lookup read the record (still active), before
    its answer came back, is refused at the next login, which looks the
    record up again.
    """
    checker = keeping()
    record, password = user
    hops.after_lookup = lambda: other_connection.update_user(record.username, active=False)
    assert await login(checker, record.username, password) == record
    hops.after_lookup = lambda: None
    await refused(checker, creds(record.username, password))
    assert hops.hops == 2


@async_test
async def test_unknown_users_are_kept_too(
    keeping: Callable[..., SmtpUserChecker],
    hops: CountingHops,
    user: tuple[SmtpUser, str],
    db_path: Path,
    verify: CountingVerify,
) -> None:
    """
    That a name has no user is kept as a record is: a name tried again
    costs what a user's name does (bcrypt against the dummy hash, and no
    hop either), until the user is created.
    """
    checker = keeping(verify)
    record, password = user
    for _ in range(2):
        await refused(checker, creds("newcomer", password))
    assert (hops.hops, verify.calls) == (1, 2)
    with sqlite3.connect(db_path) as raw:
        raw.execute(
            "UPDATE users SET username = 'newcomer' WHERE username = ?", (record.username,)
        )
    raw.close()
    assert (await login(checker, "newcomer", password)).username == "newcomer"
    assert hops.hops == 2


@async_test
async def test_kept_records_are_bounded(
    keeping: Callable[..., SmtpUserChecker],
    hops: CountingHops,
    other_connection: SQLiteUserStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    At most L{KEPT_RECORDS} lookups are kept: the one made longest ago
    goes first.
    """
    monkeypatch.setattr("smtpgw.checker.KEPT_RECORDS", 2)
    other_connection.create_list("news")
    users = [other_connection.create_user("news") for _ in range(3)]
    checker = keeping()
    for record, password in users:
        assert await login(checker, record.username, password) == record
    assert hops.hops == 3
    second, third = users[1:]
    assert await login(checker, third[0].username, third[1]) == third[0]
    assert await login(checker, second[0].username, second[1]) == second[0]
    assert hops.hops == 3
    first = users[0]
    assert await login(checker, first[0].username, first[1]) == first[0]
    assert hops.hops == 4


@async_test
async def test_without_a_token_every_login_hops(
    hops: CountingHops,
    clock: Clock,
    bcrypt_pool: BcryptPool,
    user: tuple[SmtpUser, str],
) -> None:
    """
    When the token is unknown (a database not in WAL mode; a header being
    rewritten), nothing is kept or reused.
    """
    checker = SmtpUserChecker(hops, clock, bcrypt=bcrypt_pool, rounds=ROUNDS, changes=lambda: None)
    record, password = user
    for _ in range(3):
        assert await login(checker, record.username, password) == record
    assert hops.hops == 3


@async_test
async def test_a_store_started_again_reuses_nothing_from_before(
    db_path: Path, clock: Clock, bcrypt_pool: BcryptPool
) -> None:
    """
    A store stopped and started again, with the password changed while no
    connection held the database (SQLite then makes its shared memory
    anew, and its header can read as before): the old password is refused.
    """
    with SQLiteUserStore.open(db_path, clock, rounds=ROUNDS) as setup:
        setup.create_list("news")
        record, old = setup.create_user("news")
    from twisted.internet import reactor

    store = ThreadedUserStore(db_path, reactor=reactor, clock=clock, pool_size=1, rounds=ROUNDS)  # type: ignore[arg-type]
    hops = CountingHops(store)
    checker = SmtpUserChecker(
        hops, clock, bcrypt=bcrypt_pool, rounds=ROUNDS, changes=store.change_token
    )
    store.startService()
    try:
        await store.get_user("nobody")
        for _ in range(2):
            assert await login(checker, record.username, old) == record
        assert hops.hops == 1
        await store.stopService()
        assert not Path(f"{db_path}-shm").exists()
        with SQLiteUserStore.open(db_path, clock, rounds=ROUNDS) as admin:
            new = admin.regenerate_password(record.username)
        store.startService()
        await store.get_user("nobody")
        await refused(checker, creds(record.username, old))
        assert (await login(checker, record.username, new)).username == record.username
    finally:
        if store.running:
            await store.stopService()
