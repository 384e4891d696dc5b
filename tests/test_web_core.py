"""
The admin app's frame, in memory: logging in and out, sessions, the CSRF
check on every form, security headers, the request body limit, static
files and the probes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpgw.admins import SESSION_IDLE_SECONDS
from tests.web_support import Browser, Inline, WebApp, make_web_app
from web.auth import Visitor
from web.security import CONTENT_SECURITY_POLICY, AdminSite


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebApp]:
    app = make_web_app(tmp_path)
    yield app
    app.close()


def test_pages_send_a_visitor_without_session_to_the_login_page(web: WebApp) -> None:
    """
    A GET of a page without a session is redirected to the login page,
    which will come back to it.
    """
    response = web.browser().get("/?x=1")
    assert response.code == 302
    assert response.header("location") == "/login?next=%2F%3Fx%3D1"


def test_login_with_the_right_password_starts_a_session(web: WebApp) -> None:
    """
    The admin's password opens a session (an HttpOnly, SameSite=Strict
    cookie) and goes where the login was asked for.
    """
    browser = web.browser()
    response = browser.login("admin", web.admin_password, next="/?from=login")
    assert response.code == 303
    assert response.header("location") == "/?from=login"
    cookie = response.header("set-cookie")
    assert cookie is not None
    assert cookie.startswith("smtpgw_session=")
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    home = browser.get("/")
    assert home.code == 200
    assert "Overview" in home.text


@pytest.mark.parametrize(
    ("name", "password"),
    [("admin", "wrong"), ("nobody", "x"), ("admin", ""), ("", ""), ("admin", "x" * 2000)],
)
def test_wrong_credentials_are_refused_without_saying_which(
    web: WebApp, name: str, password: str
) -> None:
    """
    Wrong passwords, unknown names and oversized input all get the same
    answer and no session.
    """
    browser = web.browser()
    response = browser.login(name, password)
    assert response.code == 401
    assert "Wrong admin name or password." in response.text
    assert "smtpgw_session" not in (response.header("set-cookie") or "")
    assert browser.get("/").code == 302


def test_login_form_without_its_token_is_refused(web: WebApp) -> None:
    """
    A login posted from elsewhere (no login token matching the cookie) is
    refused even with the right password.
    """
    response = web.browser().post(
        "/login", {"name": "admin", "password": web.admin_password, "login_token": "forged"}
    )
    assert response.code == 401
    assert "expired" in response.text


def test_login_redirect_never_leaves_the_site(web: WebApp) -> None:
    """
    A C{next} naming another site (or a protocol-relative URL) goes home.
    """
    for target in ("https://evil.test/", "//evil.test/x", "/\\evil.test"):
        browser = web.browser()
        response = browser.login("admin", web.admin_password, next=target)
        assert response.header("location") == "/"


def test_repeated_failed_logins_are_slowed(web: WebApp) -> None:
    """
    After the free failures, the next attempt is answered only once the
    throttle's delay has passed on the clock.
    """
    browser = web.browser()
    for _ in range(3):
        assert browser.login("admin", "wrong").code == 401
    form = browser.get("/login")
    token = form.text.split('name="login_token" value="')[1].split('"')[0]
    d = browser.stub.request(
        "POST",
        "http://admin.test/login",
        data=f"login_token={token}&name=admin&password=wrong".encode(),
        headers={"Content-Type": ["application/x-www-form-urlencoded"]},
    )
    answered: list[int] = []
    d.addCallback(lambda response: answered.append(response.code))
    browser.stub.flush()
    assert answered == [], "the fourth failure was answered at once"
    delay = web.ctx.throttle.delay("127.0.0.1", "admin", web.clock.seconds())
    assert delay > 0
    web.clock.advance(delay)
    browser.stub.flush()
    assert answered == [401]


def test_logout_ends_the_session(web: WebApp) -> None:
    """
    Logging out deletes the session: the old cookie opens nothing.
    """
    browser = web.logged_in()
    response = browser.submit("/logout", {}, form_page="/")
    assert response.code == 303
    assert browser.get("/").code == 302


def test_a_post_without_the_csrf_token_is_refused(web: WebApp) -> None:
    """
    A form posted with a live session but without (or with a wrong) CSRF
    token is refused and does nothing.
    """
    browser = web.logged_in()
    assert browser.post("/logout", {}).code == 403
    assert browser.post("/logout", {"csrf": "wrong"}).code == 403
    assert browser.get("/").code == 200, "the refused logout ended the session"


def test_a_post_without_a_session_is_refused_not_redirected(web: WebApp) -> None:
    """
    A form posted without a session is refused (no 500, as Klein's own
    sessions would give).
    """
    response = web.browser().post("/logout", {"csrf": "x"})
    assert response.code == 403
    assert "session has ended" in response.text


def test_an_idle_session_ends(web: WebApp) -> None:
    """
    A session unused for the idle limit still works at the limit and not
    one second past it.
    """
    browser = web.logged_in()
    web.clock.advance(SESSION_IDLE_SECONDS)
    assert browser.get("/").code == 200
    web.clock.advance(SESSION_IDLE_SECONDS + 1)
    assert browser.get("/").code == 302


def test_every_response_carries_the_security_headers(web: WebApp) -> None:
    """
    Pages, the login page, 404s and API errors all carry the CSP (with
    frame-ancestors), nosniff and no-store.
    """
    browser = web.logged_in()
    for path in ("/", "/login", "/no-such-page", "/api/v1/lists", "/static/style.css"):
        response = browser.get(path)
        assert response.header("content-security-policy") == CONTENT_SECURITY_POLICY, path
        assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
        assert response.header("x-content-type-options") == "nosniff", path
        assert response.header("x-frame-options") == "DENY", path
        assert response.header("server") == "smtpgw", path


def test_unknown_pages_get_a_404_page(web: WebApp) -> None:
    browser = web.logged_in()
    response = browser.get("/no-such-page")
    assert response.code == 404
    assert "There is no such page." in response.text


def test_static_files_are_served_and_nothing_else(web: WebApp) -> None:
    """
    The stylesheet and script are served without a session; other names
    (and paths out of the folder) are not.
    """
    browser = web.browser()
    css = browser.get("/static/style.css")
    assert css.code == 200
    assert b"--accent" in css.body
    assert browser.get("/static/app.js").code == 200
    assert browser.get("/static/../app.py").code == 404
    assert browser.get("/static/missing.css").code == 404


def test_request_bodies_over_the_limit_are_refused(tmp_path: Path) -> None:
    """
    A body of exactly the limit is read; one byte more is answered 413.
    """
    web = make_web_app(tmp_path)
    try:
        browser = Browser(AdminSite(web.app.resource(), max_body=100))
        at_limit = browser.request(
            "POST",
            "/login",
            body=b"n" * 100,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert at_limit.code == 401
        over = browser.request(
            "POST",
            "/login",
            body=b"n" * 101,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert over.code == 413
        assert "over the limit" in over.json()["error"]
    finally:
        web.close()


def test_healthz_answers_without_a_session(tmp_path: Path) -> None:
    """
    The health probe needs no login and says which check fails.
    """
    checks = {"journal": True, "queue": True}
    web = make_web_app(tmp_path, health=lambda: checks)
    try:
        response = web.browser().get("/healthz")
        assert response.code == 200
        assert response.json() == {"status": "ok", "checks": checks}
        checks["journal"] = False
        failing = web.browser().get("/healthz")
        assert failing.code == 503
        assert failing.json()["status"] == "failing"
    finally:
        web.close()


def test_metrics_need_a_token_or_a_session(web: WebApp) -> None:
    """
    /metrics refuses an anonymous scrape.
    """
    response = web.browser().get("/metrics")
    assert response.code == 401
    assert response.header("www-authenticate") == 'Bearer realm="smtpgw"'


def test_api_refuses_without_a_token(web: WebApp) -> None:
    """
    The API answers 401 in JSON without a bearer token, with a wrong one,
    and with a session cookie alone.
    """
    browser = web.logged_in()
    assert browser.get("/api/v1/lists").code == 401
    response = browser.get("/api/v1/lists", headers={"Authorization": "Bearer smtpgw_nope"})
    assert response.code == 401
    assert response.json() == {"error": "a valid API token is required (Bearer)"}


def test_api_answers_with_a_token(web: WebApp) -> None:
    _, token = web.admins.create_token("test", None)
    web.users.create_list("news")
    response = web.browser().get("/api/v1/lists", headers={"Authorization": f"Bearer {token}"})
    assert response.code == 200
    assert [item["name"] for item in response.json()["lists"]] == ["news"]


def test_only_upload_routes_take_large_bodies(tmp_path: Path) -> None:
    """
    Forms and JSON are bounded by the small limit (at it: read; one past:
    413); the recipients upload routes by the large one.
    """
    web = make_web_app(tmp_path)
    try:
        browser = Browser(AdminSite(web.app.resource(), max_body=1000, max_form=100))
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert browser.request("POST", "/login", body=b"n" * 100, headers=form).code == 401
        assert browser.request("POST", "/login", body=b"n" * 101, headers=form).code == 413
        upload = {"Content-Type": "text/csv"}
        for path in (
            "/api/v1/lists/news/recipients",
            "/lists/news/recipients/import",
            "/campaigns/new",
            "/api/v1/campaigns",
        ):
            at_limit = browser.request("POST", path, body=b"e" * 1000, headers=upload)
            assert at_limit.code != 413, path
            over = browser.request("POST", path, body=b"e" * 1001, headers=upload)
            assert over.code == 413, path
    finally:
        web.close()


def test_a_path_that_is_not_utf8_is_a_400_not_a_logged_error(web: WebApp) -> None:
    """
    Klein would log a traceback for an undecodable path; the app answers
    400 first, without a session.
    """
    response = web.browser().get("/lists/%FF%FE")
    assert response.code == 400
    assert "UTF-8" in response.json()["error"]


def test_slash_variants_are_not_redirected_to_the_host_header(web: WebApp) -> None:
    """
    Doubled and trailing slashes are never redirected to an absolute URL
    built from the client's Host header.
    """
    browser = web.logged_in()
    for path in ("/api/v1//lists", "//lists", "/lists/"):
        response = browser.get(path, headers={"Host": "evil.example"})
        assert "evil.example" not in (response.header("location") or ""), path


def test_parallel_logins_each_count_and_are_bounded(web: WebApp) -> None:
    """
    Guesses sent at once each count as failures before their check (so
    they do not all share one delay), and past the waiting bound the rest
    are refused at once with 429 instead of queueing password checks.
    """
    browser = web.browser()
    form = browser.get("/login")
    token = form.text.split('name="login_token" value="')[1].split('"')[0]
    codes: list[int] = []
    for _ in range(40):
        d = browser.stub.request(
            "POST",
            "http://admin.test/login",
            data=f"login_token={token}&name=admin&password=wrong".encode(),
            headers={"Content-Type": ["application/x-www-form-urlencoded"]},
        )
        d.addCallback(lambda response: codes.append(response.code))
    browser.stub.flush()
    assert 429 in codes, codes
    assert web.ctx.throttle.delay("127.0.0.1", "admin", web.clock.seconds()) > 0
    for _ in range(200):
        web.clock.advance(30)
        browser.stub.flush()
    assert len(codes) == 40
    assert codes.count(401) <= 12, codes


def test_a_head_request_does_not_use_up_what_is_shown_once(web: WebApp) -> None:
    """
    A HEAD of the page that shows a notice (or a new token) leaves it for
    the next GET.
    """
    browser = web.logged_in()
    response = browser.submit("/tokens", {"name": "ci"})
    assert response.code == 303
    assert browser.request("HEAD", "/tokens").code == 200
    page = browser.get("/tokens")
    assert 'id="new-token"' in page.text


def test_a_database_failure_is_a_503_page(web: WebApp) -> None:
    """
    A store that cannot answer gives a 503 page, not a 500 with a traceback.
    """
    from smtpgw.database import StoreNotRunning

    browser = web.logged_in()

    class Broken:
        def lists(self) -> None:
            raise StoreNotRunning("the user store is not running")

    web.ctx.users = Inline(Broken())
    response = browser.get("/lists")
    assert response.code == 503
    assert "database cannot be used" in response.text


def test_an_unexpected_error_is_a_500_page_and_logged(
    web: WebApp, logged_errors: list[dict[str, object]]
) -> None:
    """
    A bug in a handler gives the layout's 500 page (no traceback in it) and
    a logged failure.
    """
    browser = web.logged_in()

    class Broken:
        def lists(self) -> None:
            raise RuntimeError("a bug")

    web.ctx.users = Inline(Broken())
    response = browser.get("/lists")
    assert response.code == 500
    assert "a bug" not in response.text
    assert "Traceback" not in response.text
    assert any("admin page" in str(event.get("log_format")) for event in logged_errors)
    logged_errors.clear()


def test_logging_in_again_ends_the_previous_session(web: WebApp) -> None:
    """
    A login replaces the session the browser came with (no fixation).
    """
    from twisted.internet.defer import Deferred
    from twisted.web.test.requesthelper import DummyRequest

    old_id, _ = web.admins.create_session("admin")

    class CookieRequest(DummyRequest):
        def getCookie(self, name: bytes) -> bytes | None:
            return old_id.encode() if name == b"smtpgw_session" else None

        def addCookie(self, *args: object, **kwargs: object) -> None:
            pass

        def isSecure(self) -> bool:
            return False

    request = CookieRequest([b"login"])
    done = Deferred.fromCoroutine(
        web.app.auth.login(request, "admin", web.admin_password)  # type: ignore[arg-type]
    )
    visitor = done.result
    assert isinstance(visitor, Visitor)
    assert visitor.session_id != old_id
    assert web.admins.get_session(old_id) is None
    assert web.admins.get_session(visitor.session_id) is not None


def test_cookies_are_secure_behind_an_https_public_url(tmp_path: Path) -> None:
    """
    With an https public URL (a TLS proxy in front), cookies are Secure
    even though the request reached the app over plain HTTP.
    """
    from web.context import GatewaySettings

    web = make_web_app(
        tmp_path,
        settings=GatewaySettings("mail.example.test", "25", base_url="https://admin.example"),
    )
    try:
        response = web.browser().get("/login")
        assert "Secure" in (response.header("set-cookie") or "")
    finally:
        web.close()


PUBLIC_PAGES = {
    "/login": "the login form",
    "/static/<string:name>": "the stylesheet and script the login page needs",
    "/healthz": "the health probe (says only ok or failing)",
    "/unsubscribe/<string:token>": "recipients' unsubscribe links (the signed token authorizes)",
}
"""The page routes open to anyone, and why. The API's routes (under
/api/v1/) check their bearer token: tests/test_web_api.py covers each."""


def _example_path(rule: str) -> str:
    path = rule
    for variable, value in (
        ("<string:name>", "style.css"),
        ("<int:alert_id>", "1"),
        ("<int:token_id>", "1"),
        ("<int:campaign_id>", "1"),
    ):
        path = path.replace(variable, value)
    while "<" in path:
        start = path.index("<")
        path = path[:start] + "x1" + path[path.index(">") + 1 :]
    return path


def test_every_page_route_refuses_without_a_session(web: WebApp) -> None:
    """
    Every route of the pages' table, with every method it takes, refuses a
    visitor without a session (a GET goes to the login page, anything else
    is 403), except the few public ones named in PUBLIC_PAGES; /metrics
    asks for a token.
    """
    from web.routes import pages

    browser = web.browser()
    checked = 0
    for rule in pages.url_map.iter_rules():
        if rule.rule in PUBLIC_PAGES or rule.rule.startswith("/api/v1/"):
            continue
        path = _example_path(rule.rule)
        for method in sorted(rule.methods or ()):
            if method == "OPTIONS":
                continue
            response = browser.request(
                method,
                path,
                body=b"csrf=x" if method == "POST" else None,
                headers={"Content-Type": "application/x-www-form-urlencoded"}
                if method == "POST"
                else None,
            )
            if rule.rule == "/metrics":
                assert response.code == 401, (method, path)
            elif method in ("GET", "HEAD"):
                assert response.code == 302, (method, path, response.code)
                assert (response.header("location") or "").startswith("/login?next="), path
            else:
                assert response.code == 403, (method, path, response.code)
            checked += 1
    assert checked >= 40, f"only {checked} routes checked: is the table empty?"


def test_the_public_pages_are_only_those_named(web: WebApp) -> None:
    """
    The exemptions above are exactly the routes that exist: a new public
    route must be added there on purpose.
    """
    from web.routes import pages

    rules = {rule.rule for rule in pages.url_map.iter_rules()}
    assert set(PUBLIC_PAGES) <= rules
