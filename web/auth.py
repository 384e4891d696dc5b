"""
Who is asking: admin sessions (a cookie naming a stored session), the CSRF
token every form carries, API bearer tokens, slowed logins, and the
one-time things a session may be shown (a new password, a new token, a
notice after a redirect).

A page handler is wrapped in L{page}: no session, and a GET is sent to the
login page while anything else is refused; a POST whose C{csrf} field does
not match the session's token is refused. An API handler is wrapped in
L{api}: no valid bearer token, and the answer is a JSON C{401}.
"""

from __future__ import annotations

import functools
import hmac
import json
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlsplit

from attrs import field as attrs_field
from attrs import frozen
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from smtpgw.admins import SESSION_MAX_SECONDS

__all__ = [
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "Auth",
    "OneTimeBox",
    "TooManyLogins",
    "Visitor",
    "api",
    "arg",
    "json_error",
    "page",
    "safe_next",
]

SESSION_COOKIE: Final = b"smtpgw_session"
LOGIN_COOKIE: Final = b"smtpgw_login"
"""A random value also put in the login form, so a login cannot be forged
from another site (there is no session, hence no session token, yet)."""

MAX_CREDENTIAL_LENGTH: Final = 1024
ONE_TIME_SECONDS: Final = 300.0
"""How long a one-time secret waits to be shown before it is forgotten."""
MAX_ONE_TIME: Final = 1000
MAX_WAITING_LOGINS: Final = 8
"""Logins waiting for their password check beyond which more are refused."""


class TooManyLogins(Exception):
    """
    Too many logins are waiting for a password check: try again later.
    """


_log = Logger()

T = TypeVar("T")


@frozen
class Visitor:
    """
    An admin with a live session.

    @ivar session_id: the cookie's value; the store keeps only its hash.
    @ivar csrf: the token every form of this session carries.
    """

    admin: str
    session_id: str = attrs_field(repr=False)
    csrf: str = attrs_field(repr=False)


def arg(request: IRequest, name: str, default: str = "") -> str:
    """
    A form or query field, decoded as UTF-8 (undecodable bytes replaced).
    """
    values = request.args.get(name.encode())
    if not values:
        return default
    return bytes(values[0]).decode("utf-8", "replace")


def safe_next(target: str) -> str:
    """
    Where to go after logging in: a local path only, never another site.
    """
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    if "\\" in target or any(ord(c) < 0x20 for c in target):
        return "/"
    return target


def json_error(request: IRequest, code: int, message: str) -> bytes:
    """
    Answer with C{{"error": message}} and a status.
    """
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps({"error": message}).encode()


def _add_cookie(request: Any, name: bytes, value: bytes, **attributes: Any) -> None:
    # IRequest does not declare the httpOnly/sameSite that Request takes.
    request.addCookie(name, value, **attributes)


def _is_secure(request: IRequest) -> bool:
    return bool(request.isSecure())


def _cookie(request: IRequest, name: bytes) -> str | None:
    value = request.getCookie(name)
    if not value or len(value) > 256:
        return None
    try:
        return bytes(value).decode("ascii")
    except UnicodeDecodeError:
        return None


class OneTimeBox:
    """
    Things a session is shown once: put under the session, taken (and so
    gone) by the next page that shows them. Kept in memory only, bounded,
    and forgotten after L{ONE_TIME_SECONDS}: a password waits for the
    redirect that follows the form that made it, nothing more.
    """

    def __init__(self, clock: IReactorTime, *, ttl: float = ONE_TIME_SECONDS) -> None:
        self._clock = clock
        self._ttl = ttl
        self._items: OrderedDict[tuple[str, str], tuple[float, Any]] = OrderedDict()

    def put(self, session_id: str, kind: str, value: Any) -> None:
        """
        Keep C{value} for the session's next L{take} of C{kind}.
        """
        self._expire()
        key = (session_id, kind)
        self._items.pop(key, None)
        self._items[key] = (self._clock.seconds() + self._ttl, value)
        while len(self._items) > MAX_ONE_TIME:
            self._items.popitem(last=False)

    def take(self, session_id: str, kind: str) -> Any:
        """
        The value kept for the session, or L{None}; either way it is gone.
        """
        self._expire()
        item = self._items.pop((session_id, kind), None)
        return None if item is None else item[1]

    def forget(self, session_id: str) -> None:
        """
        Drop everything kept for a session (at logout).
        """
        for key in [k for k in self._items if k[0] == session_id]:
            del self._items[key]

    def _expire(self) -> None:
        now = self._clock.seconds()
        while self._items:
            key, (until, _) = next(iter(self._items.items()))
            if until > now:
                break
            del self._items[key]


class Auth:
    """
    Sessions and tokens over an admin store (L{smtpgw.admins.ThreadedAdminStore}).
    """

    def __init__(
        self,
        admins: Any,
        clock: IReactorTime,
        throttle: Any,
        *,
        secure_cookies: bool = False,
        max_waiting_logins: int = MAX_WAITING_LOGINS,
    ) -> None:
        """
        @param secure_cookies: mark cookies C{Secure} even on plain HTTP
            requests (the app is behind a TLS-terminating proxy).
        @param max_waiting_logins: logins allowed to wait at once (for
            their delay or their password check); more are answered "try
            later" at once.
        """
        self._admins = admins
        self._clock = clock
        self._throttle = throttle
        self._secure_cookies = secure_cookies
        self._max_waiting = max_waiting_logins
        # One password check at a time: the admin store's other thread keeps
        # serving the session and token lookups of every page and API call.
        self._checks = DeferredSemaphore(1)
        self._pending = 0
        self.once = OneTimeBox(clock)

    def _secure(self, request: IRequest) -> bool:
        return self._secure_cookies or _is_secure(request)

    async def visitor(self, request: IRequest) -> Visitor | None:
        """
        The admin whose session cookie came with the request, if it is live.
        """
        session_id = _cookie(request, SESSION_COOKIE)
        if session_id is None:
            return None
        session = await self._admins.get_session(session_id)
        if session is None:
            return None
        return Visitor(session.admin, session_id, session.csrf)

    def login_token(self, request: IRequest) -> str:
        """
        The login form's anti-forgery value: the one in the cookie, or a
        new one set now.
        """
        token = _cookie(request, LOGIN_COOKIE)
        if token is None or len(token) < 32:
            token = secrets.token_urlsafe(32)
            _add_cookie(
                request,
                LOGIN_COOKIE,
                token.encode(),
                path=b"/login",
                httpOnly=True,
                secure=self._secure(request),
                sameSite="strict",
            )
        return token

    async def login(self, request: IRequest, name: str, password: str) -> Visitor | None:
        """
        Check a login form's credentials, slowed down after failures from
        the same address or for the same name; start a session on success.

        Each attempt counts as a failure from the moment it arrives (and is
        taken back if it succeeds), so parallel guesses each see the delay
        the ones before them earned; password checks run one at a time; and
        at most L{MAX_WAITING_LOGINS} logins wait at once.

        @raise TooManyLogins: when too many are waiting already.
        """
        ip = _client_ip(request)
        now = self._clock.seconds()
        if self._pending >= self._max_waiting:
            raise TooManyLogins()
        delay = self._throttle.delay(ip, name, now)
        self._throttle.failed(ip, name, now)
        self._pending += 1
        try:
            if delay > 0:
                await deferLater(self._clock, delay, lambda: None)
            if not name or not password or len(name) > 64 or len(password) > MAX_CREDENTIAL_LENGTH:
                ok = False
            else:
                ok = await self._checks.run(self._admins.check_admin, name, password)
        finally:
            self._pending -= 1
        if not ok:
            _log.info("admin login failed for {name!r} from {ip}", name=name[:64], ip=ip)
            return None
        self._throttle.succeeded(ip, name, self._clock.seconds())
        previous = _cookie(request, SESSION_COOKIE)
        if previous is not None:
            await self._admins.delete_session(previous)
        session_id, session = await self._admins.create_session(name)
        _add_cookie(
            request,
            SESSION_COOKIE,
            session_id.encode(),
            path=b"/",
            httpOnly=True,
            secure=self._secure(request),
            sameSite="strict",
            max_age=str(int(SESSION_MAX_SECONDS)),
        )
        _log.info("admin {name!r} logged in from {ip}", name=name, ip=ip)
        return Visitor(session.admin, session_id, session.csrf)

    async def logout(self, request: IRequest, visitor: Visitor) -> None:
        """
        End the session: in the store, in the browser, and what it was
        still to be shown.
        """
        await self._admins.delete_session(visitor.session_id)
        self.once.forget(visitor.session_id)
        _add_cookie(
            request,
            SESSION_COOKIE,
            b"",
            path=b"/",
            httpOnly=True,
            secure=self._secure(request),
            sameSite="strict",
            max_age="0",
        )

    async def token(self, request: IRequest) -> Any:
        """
        The API token the request's C{Authorization: Bearer} header names,
        or L{None}.
        """
        raw = request.getHeader(b"authorization")
        if raw is None:
            return None
        scheme, _, value = bytes(raw).decode("latin-1").partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value or len(value) > 256:
            return None
        return await self._admins.check_token(value)


def _client_ip(request: IRequest) -> str:
    peer = request.getClientAddress()
    return str(getattr(peer, "host", "unknown"))


def csrf_ok(request: IRequest, visitor: Visitor) -> bool:
    """
    Whether a form's C{csrf} field is the session's token.
    """
    sent = arg(request, "csrf")
    return bool(sent) and hmac.compare_digest(sent.encode(), visitor.csrf.encode())


Handler = Callable[..., Awaitable[Any] | Any]


async def _result(value: Any) -> Any:
    if isinstance(value, Deferred):
        return await value
    if hasattr(value, "__await__"):
        return await value
    return value


def page(f: Handler) -> Callable[..., Deferred[Any]]:
    """
    Wrap a page handler C{f(self, request, visitor, **kw)}: only for a live
    session, and every POST only with the session's CSRF token. C{self}
    must have an C{auth} attribute (an L{Auth}) and a C{refuse} method
    rendering an error page.
    """

    @functools.wraps(f)
    def wrapper(self: Any, request: IRequest, **kw: Any) -> Deferred[Any]:
        async def run() -> Any:
            visitor = await self.auth.visitor(request)
            if visitor is None:
                if request.method in (b"GET", b"HEAD"):
                    target = safe_next(bytes(request.uri).decode("utf-8", "replace"))
                    request.redirect(b"/login?next=" + quote(target, safe="").encode())
                    return b""
                return await _result(
                    self.refuse(request, None, 403, "Your session has ended: log in again.")
                )
            if request.method not in (b"GET", b"HEAD") and not csrf_ok(request, visitor):
                return await _result(
                    self.refuse(
                        request,
                        visitor,
                        403,
                        "This form has expired or did not come from this site: "
                        "reload the page and try again.",
                    )
                )
            return await _result(f(self, request, visitor, **kw))

        return Deferred.fromCoroutine(run())

    return wrapper


def api(f: Handler) -> Callable[..., Deferred[Any]]:
    """
    Wrap an API handler C{f(self, request, token, **kw)}: only with a valid
    bearer token; otherwise a JSON C{401}.
    """

    @functools.wraps(f)
    def wrapper(self: Any, request: IRequest, **kw: Any) -> Deferred[Any]:
        async def run() -> Any:
            request.setHeader(b"Content-Type", b"application/json")
            token = await self.auth.token(request)
            if token is None:
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="smtpgw"')
                return json_error(request, 401, "a valid API token is required (Bearer)")
            return await _result(f(self, request, token, **kw))

        return Deferred.fromCoroutine(run())

    return wrapper
