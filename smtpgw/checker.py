"""
The credential checker for SMTP AUTH: usernames and passwords against the
SMTP+ user records.

A login costs at most one hop to the user store's threads: the record lookup
and the check of the verified-credentials cache. What a lookup found is kept,
and a later login with the same username makes no hop while the database is
unchanged: nothing committed, by any process, since the store's change token
read before that lookup (L{smtpgw.database.WalIndexHeader}), which a login
reads again without waiting. Only a cache miss goes on to bcrypt,
which runs in its own small pool (L{BcryptPool}), so a storm of bogus logins
keeps bcrypt busy but never delays a cached login or any other database
call. The pool takes a bounded number of checks; past it a login fails at
once with L{TooManyPasswordChecks}, which is neither a success nor a refusal
(SMTP answers 454, try again later).

A wrong password, an unknown user and an inactive user fail the same way,
after the same bcrypt work: an unknown user is checked against a dummy hash
of the cost the stored hashes have (learned from them), so the time a
failed login takes does not tell whether the user exists.

A connection-per-message client would otherwise pay a bcrypt check per
message, so credentials that verified recently are remembered: the cache key
is a MAC, under a random per-process key, of the username, the stored hash
and the password. A new password or any change of the stored hash (even by
another process, such as C{smtpgw-admin}) makes the key miss, and a password
never sits in memory longer than its login.
"""

from __future__ import annotations

import hashlib
import queue
import secrets
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeAlias, TypeVar, runtime_checkable

from attrs import field, frozen
from twisted.application.service import Service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpgw.model import SmtpUser
from smtpgw.passwords import (
    DEFAULT_ROUNDS,
    MAX_PASSWORD_BYTES,
    dummy_hash,
    hash_cost,
    verify_password,
)

__all__ = [
    "BCRYPT_THREADS",
    "CACHE_SIZE",
    "CACHE_TTL",
    "KEPT_RECORDS",
    "MAX_PENDING_CHECKS",
    "MAX_USERNAME_BYTES",
    "BcryptPool",
    "HashCostLookup",
    "PasswordCheckUnavailable",
    "SmtpUserChecker",
    "TooManyPasswordChecks",
    "UserLookup",
    "UserLookupRunner",
    "VerifiedCredentialsCache",
]

T = TypeVar("T")

CACHE_SIZE: Final = 10_000
"""Most credentials remembered as verified; the least recently used go first."""

KEPT_RECORDS: Final = 10_000
"""Most lookups' results kept for reuse while the database is unchanged; the
oldest go first."""

CACHE_TTL: Final = 300.0
"""Seconds a verification is trusted before bcrypt checks the password again."""

MAX_USERNAME_BYTES: Final = 256
"""Longer usernames cannot exist (generated ones are under 50 bytes)."""

BCRYPT_THREADS: Final = 2
"""
Threads of L{BcryptPool}: bcrypt releases the GIL, so each keeps a core busy;
more than the cores only makes every check slower.
"""

MAX_PENDING_CHECKS: Final = 64
"""
bcrypt checks waiting or running at once, gateway-wide; one more fails with
L{TooManyPasswordChecks} rather than queueing. At cost 12 on two threads, 64
checks are about 6 s of work: a later client is better told to retry.
"""

_KEY_LENGTHS: Final = struct.Struct(">QQQ")

_Check: TypeAlias = tuple[Deferred[T], Callable[[], T] | None]
"""A check and where its result goes; no check tells a thread to end."""


class PasswordCheckUnavailable(Exception):
    """
    The password could not be checked now: the login is neither accepted
    nor refused, and the client should try again later (SMTP C{454 4.7.0}).
    """


class TooManyPasswordChecks(PasswordCheckUnavailable):
    """
    L{MAX_PENDING_CHECKS} bcrypt checks are already waiting or running.
    """


class UserLookup(Protocol):
    """
    What the checker needs from a synchronous user store, in a thread.
    """

    def get_user(self, username: str) -> SmtpUser | None: ...


@runtime_checkable
class HashCostLookup(Protocol):
    """
    A synchronous user store that can also tell the cost of its password
    hashes, before any login has shown one.
    """

    def typical_hash_cost(self) -> int | None: ...


class UserLookupRunner(Protocol):
    """
    Runs a function with a synchronous user store in a worker thread, as
    L{smtpgw.userstore.ThreadedUserStore.run} does.
    """

    def run(self, f: Callable[[UserLookup], T]) -> Deferred[T]: ...


class VerifiedCredentialsCache:
    """
    Credentials bcrypt accepted recently, bounded in number and age;
    safe to use from several threads.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        max_size: int = CACHE_SIZE,
        ttl: float = CACHE_TTL,
        secret: bytes | None = None,
    ) -> None:
        """
        @param clock: tells the time, from any thread.
        @param max_size: how many entries are kept.
        @param ttl: how long, in seconds, an entry is trusted.
        @param secret: the MAC key, up to 64 bytes; random by default, and
            never stored.
        """
        self._clock = clock
        self._max_size = max_size
        self._ttl = ttl
        self._secret = secrets.token_bytes(32) if secret is None else secret
        self._expiry: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, username: str, password_hash: bytes, password: bytes) -> bytes:
        """
        The cache key of a login: it changes when any of the three does.
        """
        name = username.encode("utf-8")
        # Keyed BLAKE2b is a MAC, and half the cost of HMAC-SHA256 on every
        # login. The lengths up front keep ("ab", "c") and ("a", "bc") apart.
        message = _KEY_LENGTHS.pack(len(name), len(password_hash), len(password))
        return hashlib.blake2b(
            message + name + password_hash + password, key=self._secret, digest_size=32
        ).digest()

    def __contains__(self, key: bytes) -> bool:
        now = self._clock.seconds()
        with self._lock:
            expires = self._expiry.get(key)
            if expires is None:
                return False
            if now >= expires:
                del self._expiry[key]
                return False
            self._expiry.move_to_end(key)
            return True

    def add(self, key: bytes) -> None:
        """
        Remember C{key} as verified for the next L{CACHE_TTL} seconds.
        """
        expires = self._clock.seconds() + self._ttl
        with self._lock:
            self._expiry[key] = expires
            self._expiry.move_to_end(key)
            while len(self._expiry) > self._max_size:
                self._expiry.popitem(last=False)

    def clear(self) -> None:
        """
        Forget everything.
        """
        with self._lock:
            self._expiry.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)


class BcryptPool(Service):
    """
    The threads that run bcrypt checks, apart from every other thread pool,
    with a gateway-wide bound on the checks waiting or running.

    Start it before the checker's first login and stop it after the last
    (as a service of the gateway, added before the listeners).
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        *,
        size: int = BCRYPT_THREADS,
        max_pending: int = MAX_PENDING_CHECKS,
    ) -> None:
        """
        @param reactor: delivers results from the threads.
        @param size: how many threads; about the number of cores.
        @param max_pending: how many checks may wait or run at once.
        """
        self._reactor = reactor
        self._size = size
        self._max_pending = max_pending
        self._work: queue.SimpleQueue[_Check[Any]] | None = None
        self._pending = 0

    @property
    def pending(self) -> int:
        """
        How many checks are waiting or running.
        """
        return self._pending

    def startService(self) -> None:
        """
        Start the threads.
        """
        super().startService()
        work: queue.SimpleQueue[_Check[Any]] = queue.SimpleQueue()
        for i in range(self._size):
            # Daemon threads: a pool nobody stopped (a crash) must not keep
            # the process alive.
            threading.Thread(
                target=self._serve, args=(work,), name=f"smtpgw-bcrypt-{i}", daemon=True
            ).start()
        self._work = work

    def stopService(self) -> Deferred[None]:
        """
        Fail the checks still waiting, at once, and let those running finish.

        @return: fires when every thread has finished its last check.
        """
        super().stopService()
        work, self._work = self._work, None
        if work is None:
            return succeed(None)
        # A stop need not wait for a queue of checks nobody will use.
        while True:
            try:
                done, _ = work.get_nowait()
            except queue.Empty:
                break
            done.errback(PasswordCheckUnavailable("the bcrypt pool stopped"))
        exits = [Deferred[None]() for _ in range(self._size)]
        for exited in exits:
            work.put((exited, None))
        return DeferredList(exits).addCallback(lambda _: None)

    def _serve(self, work: queue.SimpleQueue[_Check[Any]]) -> None:
        call_from_thread = self._reactor.callFromThread
        while True:
            done, check = work.get()
            if check is None:
                call_from_thread(done.callback, None)
                return
            try:
                result = check()
            except BaseException:
                call_from_thread(done.errback, Failure())
            else:
                call_from_thread(done.callback, result)

    def run(self, check: Callable[[], T]) -> Deferred[T]:
        """
        Run C{check} (a bcrypt check) in one of the threads.

        Call it from the reactor thread only: that is what keeps the count
        of pending checks exact without a lock.

        @return: what C{check} returns; or fails at once with
            L{TooManyPasswordChecks} when L{MAX_PENDING_CHECKS} are
            pending, or with L{PasswordCheckUnavailable} when the pool is
            not running or stops before C{check} starts.
        """
        work = self._work
        if work is None:
            return fail(PasswordCheckUnavailable("the bcrypt pool is not running"))
        if self._pending >= self._max_pending:
            return fail(
                TooManyPasswordChecks(f"{self._pending} password checks are already pending")
            )
        self._pending += 1
        done: Deferred[T] = Deferred()
        done.addBoth(self._done)
        work.put((done, check))
        return done

    def _done(self, result: T) -> T:
        self._pending -= 1
        return result


@frozen
class _Miss:
    """
    A login the cache did not vouch for: bcrypt must check it.

    @ivar user: the record, or L{None} for an unknown user.
    @ivar key: the cache key to remember when the check passes.
    @ivar password_hash: what to check the password against (the dummy
        hash for an unknown user).
    """

    user: SmtpUser | None
    key: bytes
    password_hash: bytes = field(repr=False)


def _as_bytes(value: bytes | str) -> bytes | None:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            return None
    return None


def _as_text(value: bytes | str) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


@implementer(ICredentialsChecker)
class SmtpUserChecker:
    """
    Checks L{IUsernamePassword} credentials against the SMTP+ user records.

    The avatar id it produces is the L{SmtpUser} record itself, which the
    realm (L{smtpgw.realm.GatewayRealm}) uses directly.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        store: UserLookupRunner,
        clock: IReactorTime,
        *,
        bcrypt: BcryptPool | None = None,
        rounds: int = DEFAULT_ROUNDS,
        verify: Callable[[bytes, bytes], bool] = verify_password,
        cache: VerifiedCredentialsCache | None = None,
        changes: Callable[[], bytes | None] | None = None,
    ) -> None:
        """
        @param store: runs the lookup and the cache check in its threads.
        @param clock: tells the time, for the cache.
        @param bcrypt: runs bcrypt checks. Without one, they run in the
            store's hop, behind the lookup: only for a store nothing else
            uses (tests), since a burst of checks would hold every store
            thread.
        @param rounds: the bcrypt cost assumed for the stored hashes until
            the store or a login shows their real cost.
        @param verify: checks a password against a hash (tests count calls).
        @param cache: the verified credentials cache; a new one by default.
        @param changes: reads the store's change token
            (L{smtpgw.userstore.ThreadedUserStore.change_token}) without
            waiting: equal tokens mean that nothing was committed to the
            store in between. With it, a record found is reused, without a
            hop to the store's threads, for as long as the token stays the
            one read before the record was. Only with a bcrypt pool.
        """
        self._store = store
        self._bcrypt = bcrypt
        self._verify = verify
        self._dummy_cost = rounds
        self._cost_known = False
        self.cache = VerifiedCredentialsCache(clock) if cache is None else cache
        # Checks under way, by cache key, with the logins waiting on each:
        # an application that opens twenty connections at once with the same
        # credentials costs one bcrypt check, not twenty.
        self._checking: dict[bytes, list[Deferred[SmtpUser]]] = {}
        self._changes = changes
        # What lookups found (a record, or None for no such user), by
        # username, each with the token read before the lookup; the one
        # found longest ago goes first. Forgotten when the token is unknown.
        self._known: dict[str, tuple[bytes, SmtpUser | None]] = {}

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[SmtpUser]:  # type: ignore[override]
        """
        Check a username and password.

        @return: fires with the L{SmtpUser}, or fails with
            L{UnauthorizedLogin} (the same for every reason); fails with
            L{PasswordCheckUnavailable} (L{TooManyPasswordChecks} when
            overloaded) or a store error when the check could not be made.
        """
        username = _as_text(credentials.username)
        password = _as_bytes(credentials.password)
        if (
            username is None
            or password is None
            or not username
            or len(username.encode("utf-8")) > MAX_USERNAME_BYTES
            or len(password) > MAX_PASSWORD_BYTES
        ):
            # Such credentials cannot be right; answering at once only tells
            # the client what it sent.
            return fail(UnauthorizedLogin())
        if self._bcrypt is None:
            return self._store.run(lambda users: self._check_in_one_hop(users, username, password))
        token = None if self._changes is None else self._changes()
        if token is not None:
            known = self._known.get(username)
            if known is not None and known[0] == token:
                # Nothing committed since the token read before the lookup:
                # what the lookup found (a record or none) is what is there.
                return succeed(self._vouch(known[1], username, password)).addCallback(
                    self._check_unless_cached, password
                )
        elif self._known:
            self._known.clear()
        found = self._store.run(lambda users: self._look_up(users, username, password))
        if token is not None:
            found.addCallback(self._remember, username, token)
        return found.addCallback(self._check_unless_cached, password)

    def _remember(self, found: SmtpUser | _Miss, username: str, token: bytes) -> SmtpUser | _Miss:
        # Unknown users are kept too: a name tried again costs what a user's
        # name does (the same bcrypt work, and no hop either).
        self._known.pop(username, None)
        self._known[username] = (token, found.user if isinstance(found, _Miss) else found)
        if len(self._known) > KEPT_RECORDS:
            del self._known[next(iter(self._known))]
        return found

    def _look_up(self, users: UserLookup, username: str, password: bytes) -> SmtpUser | _Miss:
        user = users.get_user(username)
        if user is None and not self._cost_known and isinstance(users, HashCostLookup):
            self._learn_cost(users.typical_hash_cost())
        return self._vouch(user, username, password)

    def _vouch(self, user: SmtpUser | None, username: str, password: bytes) -> SmtpUser | _Miss:
        """
        @param user: the record of C{username}, or L{None} if there is none.
        @return: C{user} when the cache vouches for C{password}, else what
            bcrypt must check.
        """
        if user is None:
            # Keyed too, so that identical attempts in parallel share one
            # check for unknown users just as for known ones (same timing).
            unknown = self.cache.key(username, b"", password)
            return _Miss(None, unknown, dummy_hash(self._dummy_cost))
        key = self.cache.key(user.username, user.password_hash, password)
        # An inactive user always pays bcrypt, so its answer takes as long
        # as any other failure, cached or not.
        if user.active and key in self.cache:
            return user
        # A hit's hash was learned from at its miss, so misses suffice.
        self._learn_cost(hash_cost(user.password_hash))
        return _Miss(user, key, user.password_hash)

    def _learn_cost(self, cost: int | None) -> None:
        if cost is not None:
            self._dummy_cost = cost
            self._cost_known = True

    def _check_unless_cached(
        self, found: SmtpUser | _Miss, password: bytes
    ) -> SmtpUser | Deferred[SmtpUser]:
        if not isinstance(found, _Miss):
            return found
        assert self._bcrypt is not None
        waiting = self._checking.get(found.key)
        if waiting is not None:
            joined: Deferred[SmtpUser] = Deferred()
            waiting.append(joined)
            return joined
        self._checking[found.key] = []
        checked = self._bcrypt.run(lambda: self._verify(password, found.password_hash))
        decided: Deferred[SmtpUser] = checked.addCallback(self._decide, found)
        return decided.addBoth(self._share, found.key)

    @property
    def sharing(self) -> int:
        """
        Logins waiting for the outcome of an identical check under way.
        """
        return sum(len(waiting) for waiting in self._checking.values())

    def _share(self, result: SmtpUser | Failure, key: bytes) -> SmtpUser | Failure:
        """
        Give the outcome of a check to the logins that waited for it.
        """
        for waiting in self._checking.pop(key, []):
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)
        return result

    def _check_in_one_hop(self, users: UserLookup, username: str, password: bytes) -> SmtpUser:
        found = self._look_up(users, username, password)
        if not isinstance(found, _Miss):
            return found
        return self._decide(self._verify(password, found.password_hash), found)

    def _decide(self, matched: bool, miss: _Miss) -> SmtpUser:
        if miss.user is None or not matched or not miss.user.active:
            raise UnauthorizedLogin()
        self.cache.add(miss.key)
        return miss.user
