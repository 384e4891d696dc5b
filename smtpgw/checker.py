"""
The credential checker for SMTP AUTH: usernames and passwords against the
SMTP+ user records.

Everything slow (the record lookup and bcrypt) happens in one hop to the user
store's threads. A wrong password, an unknown user and an inactive user fail
the same way, after the same bcrypt work.

A connection-per-message client would otherwise pay a bcrypt check per
message, so credentials that verified recently are remembered: the cache key
is an HMAC, under a random per-process key, of the username, the stored hash
and the password. A new password or any change of the stored hash (even by
another process, such as C{smtpgw-admin}) makes the key miss, and a password
never sits in memory longer than its login.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Protocol, TypeVar

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from smtpgw.model import SmtpUser
from smtpgw.passwords import DEFAULT_ROUNDS, MAX_PASSWORD_BYTES, dummy_hash, verify_password

__all__ = [
    "CACHE_SIZE",
    "CACHE_TTL",
    "MAX_USERNAME_BYTES",
    "SmtpUserChecker",
    "UserLookup",
    "UserLookupRunner",
    "VerifiedCredentialsCache",
]

T = TypeVar("T")

CACHE_SIZE: Final = 10_000
"""Most credentials remembered as verified; the least recently used go first."""

CACHE_TTL: Final = 300.0
"""Seconds a verification is trusted before bcrypt checks the password again."""

MAX_USERNAME_BYTES: Final = 256
"""Longer usernames cannot exist (generated ones are under 50 bytes)."""


class UserLookup(Protocol):
    """
    What the checker needs from a synchronous user store, in a thread.
    """

    def get_user(self, username: str) -> SmtpUser | None: ...


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
        @param secret: the HMAC key; random by default, and never stored.
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
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in (username.encode("utf-8"), password_hash, password):
            # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.digest()

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
        rounds: int = DEFAULT_ROUNDS,
        verify: Callable[[bytes, bytes], bool] = verify_password,
        cache: VerifiedCredentialsCache | None = None,
    ) -> None:
        """
        @param store: runs the lookup and the check in its threads.
        @param clock: tells the time, for the cache.
        @param rounds: the bcrypt cost of the stored hashes, so that an
            unknown user costs as much as a known one.
        @param verify: checks a password against a hash (tests count calls).
        @param cache: the verified credentials cache; a new one by default.
        """
        self._store = store
        self._rounds = rounds
        self._verify = verify
        self.cache = VerifiedCredentialsCache(clock) if cache is None else cache

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[SmtpUser]:  # type: ignore[override]
        """
        Check a username and password.

        @return: fires with the L{SmtpUser}, or fails with
            L{UnauthorizedLogin} (the same for every reason); fails with
            another error only when the store itself fails.
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
        return self._store.run(lambda users: self._check(users, username, password))

    def _check(self, users: UserLookup, username: str, password: bytes) -> SmtpUser:
        user = users.get_user(username)
        if user is None:
            self._verify(password, dummy_hash(self._rounds))
            raise UnauthorizedLogin()
        key = self.cache.key(user.username, user.password_hash, password)
        # An inactive user always pays bcrypt, so its answer takes as long
        # as any other failure, cached or not.
        if user.active and key in self.cache:
            return user
        if not self._verify(password, user.password_hash) or not user.active:
            raise UnauthorizedLogin()
        self.cache.add(key)
        return user
