"""
The admin app in memory, for route tests: the real synchronous stores on a
temporary SQLite file behind an inline adapter (each call answers with a
fired Deferred), a L{task.Clock}, and a small browser over
L{treq.testing.StubTreq} that keeps cookies and reads CSRF tokens from
pages.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from smtpgw.admins import LoginThrottle, SQLiteAdminStore
from smtpgw.alerts import AlertDatabase
from smtpgw.userstore import SQLiteUserStore
from web.app import AdminApp
from web.context import GatewaySettings, WebContext
from web.security import AdminSite, GuardedRequest

ROUNDS = 4
BASE = "http://admin.test"


class Inline:
    """
    A synchronous store as the app expects the threaded ones: every method
    answers with a Deferred that has already fired (or failed).
    """

    def __init__(self, store: Any) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.store, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Deferred[Any]:
            return maybeDeferred(attribute, *args, **kwargs)

        return call


@attrs.define
class Response:
    """
    What a request got back.
    """

    code: int
    headers: Mapping[str, list[str]]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def error_beside(response: Response, name: str) -> str:
    """
    The error shown beside a form field (in the same C{.field} block).
    """
    match = re.search(
        r'<div class="field invalid">(?:(?!<div class="field).)*?'
        rf'name="{name}"(?:(?!<div class="field).)*?'
        rf'<div class="error" id="error-{name}" role="alert">([^<]*)</div>',
        response.text,
        re.DOTALL,
    )
    assert match, f"no error beside the field {name!r}:\n{response.text}"
    return html.unescape(match.group(1))


_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_LOGIN_TOKEN = re.compile(r'name="login_token" value="([^"]+)"')


class Browser:
    """
    A client of the in-memory app that keeps its cookies.
    """

    def __init__(self, site: AdminSite) -> None:
        self.stub: Any = StubTreq(site.resource)
        # StubTreq serves with a plain Site: give it the admin site's requests.
        server: Any = self.stub._agent._serverFactory
        server.requestFactory = GuardedRequest
        server.max_body = site.max_body
        server.max_form = site.max_form
        server.displayTracebacks = False

    def request(
        self,
        method: str,
        path: str,
        *,
        data: Mapping[str, str] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        sent_headers = {k: [v] for k, v in (headers or {}).items()}
        payload: bytes | None = body
        if data is not None:
            payload = urlencode(data).encode()
            sent_headers.setdefault("Content-Type", ["application/x-www-form-urlencoded"])
        d = self.stub.request(
            method,
            BASE + path,
            data=payload,
            headers=sent_headers,
            allow_redirects=False,
        )
        got: list[Response] = []
        failures: list[Any] = []

        def read(response: Any) -> Deferred[None]:
            def keep(content: bytes) -> None:
                raw = {
                    k.decode().lower(): [v.decode() for v in vs]
                    for k, vs in response.headers.getAllRawHeaders()
                }
                got.append(Response(response.code, raw, content))

            content: Deferred[bytes] = self.stub.content(response)
            return content.addCallback(keep)

        d.addCallback(read).addErrback(failures.append)
        self.stub.flush()
        if failures:
            failures[0].raiseException()
        assert got, f"no response to {method} {path}"
        return got[0]

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, data: Mapping[str, str] | None = None, **kw: Any) -> Response:
        return self.request("POST", path, data=data if data is not None else {}, **kw)

    def csrf(self, path: str = "/") -> str:
        """
        The session's CSRF token, read from a page's form.
        """
        page = self.get(path)
        match = _CSRF.search(page.text)
        assert match, f"no CSRF field on {path}: {page.code}"
        return html.unescape(match.group(1))

    def login(self, name: str, password: str, *, next: str = "/") -> Response:
        form = self.get("/login")
        match = _LOGIN_TOKEN.search(form.text)
        assert match, "no login token on the login page"
        return self.post(
            "/login",
            {
                "login_token": html.unescape(match.group(1)),
                "name": name,
                "password": password,
                "next": next,
            },
        )

    def submit(
        self, path: str, data: Mapping[str, str], *, form_page: str | None = None
    ) -> Response:
        """
        POST a form with the session's CSRF token, as the page would.
        """
        fields = dict(data)
        fields["csrf"] = self.csrf(form_page or path)
        return self.post(path, fields)


@attrs.define
class WebApp:
    """
    An admin app in memory with its stores.
    """

    ctx: WebContext
    app: AdminApp
    site: AdminSite
    clock: Clock
    users: SQLiteUserStore
    admins: SQLiteAdminStore
    alerts: AlertDatabase
    admin_password: str

    def browser(self) -> Browser:
        return Browser(self.site)

    def logged_in(self) -> Browser:
        browser = self.browser()
        response = browser.login("admin", self.admin_password)
        assert response.code == 303, response.text
        return browser

    def close(self) -> None:
        self.users.close()
        self.admins.close()
        self.alerts.close()


def make_web_app(
    tmp_path: Path,
    *,
    settings: GatewaySettings | None = None,
    extra: Callable[[WebContext], None] | None = None,
    **context: Any,
) -> WebApp:
    """
    An admin app over fresh stores in C{tmp_path}, with an admin "admin".
    """
    clock = Clock()
    clock.advance(1_800_000_000)
    db = tmp_path / "smtpgw.db"
    users = SQLiteUserStore.open(db, clock, rounds=ROUNDS)
    admins = SQLiteAdminStore.open(db, clock, rounds=ROUNDS)
    alerts = AlertDatabase.open(db)
    password = admins.create_admin("admin")
    ctx = WebContext(
        users=Inline(users),
        admins=Inline(admins),
        alerts=Inline(alerts),
        clock=clock,
        settings=settings or GatewaySettings("mail.example.test", "23,25,26,587,1025-5000"),
        throttle=LoginThrottle(),
        **context,
    )
    if extra is not None:
        extra(ctx)
    app = AdminApp(ctx)
    site = AdminSite(app.resource())
    return WebApp(ctx, app, site, clock, users, admins, alerts, password)
