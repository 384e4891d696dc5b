"""
The JSON API under C{/api/v1}, in memory (L{tests.web_support}): every
route with a bearer token and without one, the documents and their field
names, validation errors with their messages, passwords shown once and
hashes never, the queue routes on a real L{MessageQueue}, and the OpenAPI
document describing exactly the routes there are.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from zope.interface import implementer

from smtpgw.campaigns import (
    InlineCampaignStore,
    SQLiteCampaignStore,
)
from smtpgw.control import BadArgument as ControlBadArgument
from smtpgw.control import NoSuchMessage, NotAllowed, NotDurable, QueueControl
from smtpgw.database import StoreError, StoreNotRunning, UnusableDatabase
from smtpgw.interfaces import Alert, DeliveryResult, IOutbound
from smtpgw.memjournal import MemoryJournal
from smtpgw.model import Envelope, Priority
from smtpgw.passwords import verify_password
from smtpgw.queue import MessageQueue
from smtpgw.recipients import SQLiteRecipientStore
from smtpgw.userstore import ListExists, ListNotEmpty, NoSuchList, NoSuchUser
from smtpgw.validation import MAX_AUTHORIZED_ENTRIES, MAX_NOTES_LENGTH, ValidationError
from tests.web_support import Browser, Response, WebApp, make_web_app
from web.api import (
    DOMAIN_PATTERN,
    LIST_NAME_PATTERN,
    MAX_JSON_BYTES,
    QUEUE_ID_PATTERN,
    SEND_AT_PATTERN,
    SENDER_PATTERN,
    SUBJECT_PATTERN,
    ApiApp,
    api_error_for,
)
from web.context import WebContext

USER_FIELDS = {
    "username",
    "list",
    "active",
    "priority",
    "notes",
    "authorized_domains",
    "authorized_senders",
    "enforcement",
    "created_at",
    "last_used_at",
    "last_used_ip",
}
HTTP_METHODS = {"GET", "POST", "PATCH", "DELETE", "PUT"}
OPENAPI = json.loads((Path(__file__).parent.parent / "web" / "openapi.json").read_text())


def fields_of(schema: str) -> set[str]:
    """
    The properties the OpenAPI document gives a schema.
    """
    return set(OPENAPI["components"]["schemas"][schema]["properties"])


def api_routes() -> list[tuple[str, str]]:
    """
    Every (method, path) of the API's Klein routes, paths with OpenAPI's
    C{{name}} placeholders.
    """
    routes = []
    for rule in ApiApp.app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) & HTTP_METHODS):
            routes.append((method, path))
    return sorted(routes)


ROUTES = api_routes()
SECURED = [route for route in ROUTES if route[1] != "/openapi.json"]
EXAMPLE_PARAMETERS = {
    "name": "news",
    "username": "smtp-news-abcdefgh",
    "queue_id": "18B2F1C0A00A1B2C3D400001",
    "campaign_id": "1",
}


def concrete(path: str) -> str:
    return re.sub(r"{(\w+)}", lambda m: EXAMPLE_PARAMETERS[m.group(1)], path)


# --- a real queue to control ---------------------------------------------------------


@implementer(IOutbound)
class PendingOutbound:
    """
    Every delivery waits for the test, so messages stay in the queue.
    """

    def __init__(self) -> None:
        self.pending: dict[str, tuple[Envelope, Deferred[DeliveryResult]]] = {}

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        d: Deferred[DeliveryResult] = Deferred()
        self.pending[envelope.queue_id] = (envelope, d)
        return d

    def finish(self) -> None:
        while self.pending:
            envelope, d = self.pending.pop(next(iter(self.pending)))
            d.callback(DeliveryResult(delivered=envelope.recipients))


class Queue:
    """
    A started L{MessageQueue} on the app's clock, one delivery at a time.
    """

    _ids = itertools.count(1)

    def __init__(self, ctx: WebContext) -> None:
        self.clock = ctx.clock
        self.journal = MemoryJournal()
        self.outbound = PendingOutbound()
        self.queue = MessageQueue(self.journal, self.outbound, self.clock, concurrency=1)
        self.queue.startService()
        ctx.control = QueueControl(self.queue, self.journal, self.clock)

    def submit(self, list_name: str = "news", username: str = "u1", priority: int = 3) -> str:
        now = self.clock.seconds()
        queue_id = f"{int(now * 1000):011X}0000ABCD{next(self._ids):05X}"
        envelope = Envelope(
            queue_id=queue_id,
            list=list_name,
            username=username,
            sender=f"app@{list_name}.example",
            recipients=("a@example.org", "b@example.org"),
            priority=Priority(priority),
            accepted_at=now,
        )
        done: list[object] = []
        self.queue.submit(envelope, b"Subject: hi\r\n\r\nhello\r\n").addBoth(done.append)
        assert done == [None]
        return queue_id

    def stop(self) -> None:
        self.outbound.finish()
        self.queue.stopService()


# --- the client ---------------------------------------------------------------------


DEFAULT = "the client's token"


class Api:
    """
    A client of the API with a bearer token; it keeps every response, so
    that a test can look for what must never appear in any.
    """

    def __init__(self, browser: Browser, token: str) -> None:
        self.browser = browser
        self.token = token
        self.responses: list[Response] = []

    def call(
        self,
        method: str,
        path: str,
        document: Any = None,
        *,
        body: bytes | None = None,
        content_type: str | None = "application/json",
        authorization: str | None = DEFAULT,
    ) -> Response:
        headers = {}
        if authorization is DEFAULT:
            authorization = f"Bearer {self.token}"
        if authorization is not None:
            headers["Authorization"] = authorization
        if document is not None:
            body = json.dumps(document).encode()
        if body is not None and content_type is not None:
            headers["Content-Type"] = content_type
        response = self.browser.request(method, "/api/v1" + path, body=body, headers=headers)
        self.responses.append(response)
        return response

    def get(self, path: str, **kw: Any) -> Response:
        return self.call("GET", path, **kw)

    def post(self, path: str, document: Any = None, **kw: Any) -> Response:
        return self.call("POST", path, document, **kw)

    def patch(self, path: str, document: Any = None, **kw: Any) -> Response:
        return self.call("PATCH", path, document, **kw)

    def delete(self, path: str, **kw: Any) -> Response:
        return self.call("DELETE", path, **kw)

    def ok(self, method: str, path: str, document: Any = None, status: int = 200) -> Any:
        response = self.call(method, path, document)
        assert response.code == status, response.text
        assert response.header("content-type") == "application/json"
        return response.json()


def assert_error(response: Response, status: int, message: str, field: str | None = None) -> None:
    """
    The response is a JSON error with this status whose message contains
    C{message}.
    """
    assert response.code == status, response.text
    assert response.header("content-type") == "application/json"
    document = response.json()
    assert set(document) <= {"error", "field"}
    assert message in document["error"], document
    if field is not None:
        assert document.get("field") == field


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebApp]:
    app = make_web_app(tmp_path)
    yield app
    app.close()


@pytest.fixture
def client(web: WebApp) -> Api:
    _, token = web.admins.create_token("t", None)
    return Api(web.browser(), token)


@pytest.fixture
def queue(web: WebApp) -> Iterator[Queue]:
    harness = Queue(web.ctx)
    yield harness
    harness.stop()


# --- the route table and the OpenAPI document -----------------------------------------


def test_every_route_is_in_the_openapi_document_and_nothing_else() -> None:
    """
    The document describes exactly the Klein routes of L{ApiApp}: each
    method of each path, no more, no fewer.
    """
    documented = sorted(
        (method.upper(), path)
        for path, item in OPENAPI["paths"].items()
        for method in item
        if method.upper() in HTTP_METHODS
    )
    assert documented == ROUTES
    assert len(ROUTES) >= 22


def test_the_document_is_openapi_3_with_bearer_security_and_json_errors() -> None:
    """
    Every operation but the document itself needs the bearer token, says
    what it answers without one, and every 4xx and 5xx is the Error
    schema; the fixed-shape schemas refuse unknown properties.
    """
    assert OPENAPI["openapi"] == "3.0.3"
    assert OPENAPI["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API token",
    }
    assert OPENAPI["security"] == [{"bearer": []}]
    responses = OPENAPI["components"]["responses"]
    for path, item in OPENAPI["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            codes = operation["responses"]
            if path == "/openapi.json":
                assert operation["security"] == []
                continue
            assert "security" not in operation
            assert "401" in codes, (method, path)
            for code, response in codes.items():
                if code.startswith(("4", "5")):
                    name = response["$ref"].rsplit("/", 1)[1]
                    schema = responses[name]["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}
            if "{" in path:
                assert "404" in codes, (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "415"} <= set(codes), (method, path)
    for name, schema in OPENAPI["components"]["schemas"].items():
        assert schema["additionalProperties"] is False, name


def test_the_documents_patterns_are_the_ones_the_api_checks() -> None:
    """
    The patterns the document gives for list names, domains, senders and
    queue ids are those the API checks.
    """
    schemas = OPENAPI["components"]["schemas"]
    create = schemas["UserCreate"]["properties"]
    assert create["authorized_domains"]["items"]["pattern"] == DOMAIN_PATTERN
    assert create["authorized_senders"]["items"]["pattern"] == SENDER_PATTERN
    assert schemas["ListCreate"]["properties"]["name"]["pattern"] == LIST_NAME_PATTERN
    assert schemas["UserChange"]["properties"]["list"]["pattern"] == LIST_NAME_PATTERN
    why = OPENAPI["paths"]["/queue/{queue_id}/why"]["parameters"][0]
    assert why["schema"]["pattern"] == QUEUE_ID_PATTERN
    send = schemas["CampaignCreate"]["properties"]
    assert send["subject"]["pattern"] == SUBJECT_PATTERN
    assert send["send_at"]["pattern"] == SEND_AT_PATTERN
    assert send["sender"]["pattern"] == SENDER_PATTERN


def test_subject_and_send_at_patterns() -> None:
    """
    A subject is one line that Python and ECMAScript agree is not blank;
    C{send_at} is an RFC 3339 date-time.
    """
    for subject, ok in [
        ("Spring news", True),
        (" x ", True),
        ("Новости", True),
        ("", False),
        (" \t", False),
        ("\u3000\ufeff", False),
        ("\x1c", False),
        ("a\nb", False),
        ("a\r", False),
    ]:
        assert bool(re.fullmatch(SUBJECT_PATTERN, subject)) is ok, subject
    for send_at, ok in [
        ("2030-01-31T09:00:00Z", True),
        ("2030-01-31t09:00:00.123456789+01:00", True),
        ("2030-01-31T09:00:00", False),
        ("2030-01-31 09:00:00Z", False),
        ("2030-01-31", False),
        ("1900000000", False),
    ]:
        assert bool(re.fullmatch(SEND_AT_PATTERN, send_at)) is ok, send_at


PATTERN_CASES = [
    ("example.com", True, False),
    ("Mail.Example.CO.uk", True, False),
    ("xn--bcher-kva.example", True, False),
    ("a@example.com", False, True),
    ("first.last+tag@mail.example.com", False, True),
    ("a.b.c@example.com", False, True),
    ("x" * 64 + "@example.com", False, True),
    ("x" * 65 + "@example.com", False, False),
    ("a" * 63 + ".com", True, False),
    ("a" * 64 + ".com", False, False),
    ("example", False, False),
    ("example.1a", False, False),
    ("10.0.0.1", False, False),
    ("-a.com", False, False),
    ("a..b@example.com", False, False),
    (" example.com", False, False),
    ("bücher.example", False, False),
    ("example.com\n", False, False),
]


def test_domain_and_sender_patterns() -> None:
    """
    The patterns take the ASCII forms the user store takes, and nothing it
    would refuse.
    """
    for text, domain, sender in PATTERN_CASES:
        assert bool(re.fullmatch(DOMAIN_PATTERN, text)) is domain
        assert bool(re.fullmatch(SENDER_PATTERN, text)) is sender


def test_the_document_is_served_without_a_token(client: Api) -> None:
    """
    GET /api/v1/openapi.json is the document, without a token.
    """
    response = client.get("/openapi.json", authorization=None)
    assert response.code == 200
    assert response.header("content-type") == "application/json"
    assert response.json() == OPENAPI


# --- tokens -----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), SECURED)
def test_every_route_refuses_without_a_valid_token(client: Api, method: str, path: str) -> None:
    """
    Without a token, or with a wrong one, every route answers 401 in JSON
    and changes nothing.
    """
    client.ok("POST", "/lists", {"name": "news"}, 201)
    for authorization in (None, "Bearer smtpgw_not-a-token", "Bearer ", "Basic YWRtaW46YQ=="):
        response = client.call(
            method,
            concrete(path),
            {} if method in ("POST", "PATCH") else None,
            authorization=authorization,
        )
        assert_error(response, 401, "a valid API token is required (Bearer)")
        assert response.header("www-authenticate") == 'Bearer realm="smtpgw"'
    assert [item["name"] for item in client.ok("GET", "/lists")["lists"]] == ["news"]


def test_a_session_cookie_is_no_token(web: WebApp) -> None:
    """
    A logged-in admin's browser gets 401 from the API: only tokens count.
    """
    browser = web.logged_in()
    response = browser.get("/api/v1/lists")
    assert_error(response, 401, "a valid API token is required")


def test_the_token_is_checked_whole(client: Api) -> None:
    """
    A token with a character more or less, or under another scheme, is
    refused.
    """
    for authorization in (
        f"Bearer {client.token}x",
        f"Bearer {client.token[:-1]}",
        f"Token {client.token}",
        client.token,
    ):
        assert_error(client.get("/lists", authorization=authorization), 401, "API token")
    assert client.get("/lists", authorization=f"bearer  {client.token}").code == 200


def test_a_deleted_token_no_longer_works(web: WebApp, client: Api) -> None:
    """
    Once its token is deleted, a client is refused.
    """
    assert client.get("/lists").code == 200
    (token,) = web.admins.tokens()
    web.admins.delete_token(token.id)
    assert_error(client.get("/lists"), 401, "a valid API token is required")


# --- errors that are not the handlers' --------------------------------------------


def test_unknown_routes_and_methods_answer_json(client: Api) -> None:
    """
    An unknown route is 404 and a method a route does not take is 405
    with the methods it takes in Allow, both in JSON.
    """
    assert_error(client.get("/no-such-thing"), 404, "no such API route")
    response = client.call("PUT", "/lists/news", {})
    assert_error(response, 405, "method not allowed on this route")
    assert response.header("allow") == "DELETE, GET, HEAD, PATCH"
    response = client.delete("/lists")
    assert_error(response, 405, "method not allowed")
    assert response.header("allow") == "GET, HEAD, POST"


ERROR_STATUSES = [
    (ValidationError("priority", "bad"), 400),
    (ControlBadArgument("bad"), 400),
    (NoSuchList("no list"), 404),
    (NoSuchUser("no user"), 404),
    (NoSuchMessage("no message"), 404),
    (ListExists("exists"), 409),
    (ListNotEmpty("not empty"), 409),
    (NotAllowed("sending"), 409),
    (NotDurable("not journaled"), 503),
    (StoreNotRunning("stopped"), 503),
    (UnusableDatabase("broken"), 503),
    (StoreError("other"), 503),
]


def test_store_and_queue_errors_map_to_statuses() -> None:
    """
    Each error of the stores and of the queue control has its status; a
    validation error names its field.
    """
    for error, status in ERROR_STATUSES:
        mapped = api_error_for(error)
        assert mapped.status == status
        assert mapped.message
        if isinstance(error, ValidationError):
            assert (mapped.message, mapped.field) == ("priority: bad", "priority")


def test_a_store_that_is_not_running_answers_503(web: WebApp, client: Api) -> None:
    """
    A store error reaches the client as a JSON 503, not a 500.
    """

    class Stopped:
        def lists(self) -> Deferred[Any]:
            return fail(StoreNotRunning("the user store is stopping"))

    web.ctx.users = Stopped()
    assert_error(client.get("/lists"), 503, "the user store is stopping")


def test_an_unexpected_error_is_a_logged_json_500(
    web: WebApp, client: Api, logged_errors: list[dict[str, Any]]
) -> None:
    """
    A bug answers a JSON 500 that tells nothing of it, and is logged.
    """

    class Broken:
        def lists(self) -> Deferred[Any]:
            return fail(ZeroDivisionError("secret detail"))

    web.ctx.users = Broken()
    response = client.get("/lists")
    assert_error(response, 500, "internal error")
    assert "secret" not in response.text
    assert len(logged_errors) == 1
    logged_errors.clear()


# --- bodies -------------------------------------------------------------------------


REFUSED_BODIES = [
    (b'{"name": "news"}', None, 415, "Content-Type: application/json"),
    (b'{"name": "news"}', "text/plain", 415, "send a JSON body"),
    (b"name=news", "application/x-www-form-urlencoded", 415, "send a JSON body"),
    (b"", "application/json", 400, "not valid JSON"),
    (b"{", "application/json", 400, "not valid JSON"),
    (b'["news"]', "application/json", 400, "must be a JSON object"),
    (b'{"name": NaN}', "application/json", 400, "NaN is not a JSON number"),
    (b'{"name": "\\ud800"}', "application/json", 400, "not valid Unicode text"),
    (b"\xff\xfe", "application/json", 400, "not valid JSON"),
    (b"[" * 50_000, "application/json", 400, "not valid JSON"),
    (b'{"name": "news", "extra": 1}', "application/json", 400, "unknown field(s) 'extra'"),
    (b"{}", "application/json", 400, "name: missing"),
    (b'{"name": 7}', "application/json", 400, "name: 7 is not a list name"),
]


def test_bodies_that_are_refused(client: Api) -> None:
    """
    A body that is not a JSON object of the route's fields is refused with
    a status and a reason, and nothing is created.
    """
    for body, content_type, status, message in REFUSED_BODIES:
        assert_error(client.post("/lists", body=body, content_type=content_type), status, message)
        assert client.ok("GET", "/lists") == {"lists": []}


def test_json_charset_parameter_is_accepted(client: Api) -> None:
    """
    C{application/json; charset=utf-8} is JSON.
    """
    response = client.post(
        "/lists", body=b'{"name": "news"}', content_type="application/json; charset=utf-8"
    )
    assert response.code == 201


def test_body_limit(client: Api) -> None:
    """
    A JSON body of exactly L{MAX_JSON_BYTES} is read; one byte more is
    refused with 413 before it is parsed.
    """
    prefix, suffix = b'{"name": "', b'"}'
    filler = MAX_JSON_BYTES - len(prefix) - len(suffix)
    at_limit = prefix + b"a" * filler + suffix
    assert len(at_limit) == MAX_JSON_BYTES
    assert_error(client.post("/lists", body=at_limit), 400, "is not a valid list name")
    over = prefix + b"a" * (filler + 1) + suffix
    assert_error(client.post("/lists", body=over), 413, f"{MAX_JSON_BYTES} bytes")
    assert client.ok("GET", "/lists") == {"lists": []}


# --- lists --------------------------------------------------------------------------


def test_lists_are_created_shown_and_counted(web: WebApp, client: Api) -> None:
    """
    POST /lists creates a list (201, with where it is); GET shows it with
    its number of users, as C{smtpgw-admin list show --json} does.
    """
    response = client.post("/lists", {"name": "news"})
    assert response.code == 201
    assert response.header("location") == "/api/v1/lists/news"
    created = response.json()
    assert created == {"name": "news", "created_at": "2027-01-15T08:00:00Z", "users": 0}
    assert set(created) == fields_of("List")
    client.ok("POST", "/lists", {"name": "alpha"}, 201)
    web.users.create_user("news")
    listed = client.ok("GET", "/lists")["lists"]
    assert [(item["name"], item["users"]) for item in listed] == [("alpha", 0), ("news", 1)]
    assert client.ok("GET", "/lists/news") == {**created, "users": 1}


def test_list_errors(client: Api) -> None:
    """
    A bad name is 400 naming the field; an existing list 409; an unknown
    list 404.
    """
    assert_error(
        client.post("/lists", {"name": "News!"}), 400, "'News!' is not a valid list name", "name"
    )
    assert_error(client.post("/lists", {"name": "x" * 65}), 400, "not a valid list name")
    assert client.post("/lists", {"name": "x" * 64}).code == 201
    client.ok("POST", "/lists", {"name": "news"}, 201)
    assert_error(client.post("/lists", {"name": "news"}), 409, "list 'news' already exists")
    assert_error(client.get("/lists/nope"), 404, "no list named 'nope'")
    assert_error(client.patch("/lists/nope", {}), 404, "no list named 'nope'")
    assert_error(client.delete("/lists/nope"), 404, "no list named 'nope'")
    assert_error(client.get("/lists/nope/users"), 404, "no list named 'nope'")


def test_a_list_has_nothing_to_change_but_patch_answers_it(client: Api) -> None:
    """
    PATCH with C{{}} answers the list; its name never changes, and any
    other field is unknown.
    """
    created = client.ok("POST", "/lists", {"name": "news"}, 201)
    assert client.ok("PATCH", "/lists/news", {}) == created
    assert_error(client.patch("/lists/news", {"name": "other"}), 400, "never changes", "name")
    assert_error(client.patch("/lists/news", {"webhook": "x"}), 400, "unknown field(s)")
    assert_error(client.patch("/lists/news", body=b"{}", content_type=None), 415, "JSON body")
    assert client.ok("GET", "/lists/news")["name"] == "news"


def test_a_list_with_users_is_not_deleted(web: WebApp, client: Api) -> None:
    """
    DELETE refuses a list that has users (409) and deletes it once they
    are gone.
    """
    client.ok("POST", "/lists", {"name": "news"}, 201)
    user = client.ok("POST", "/lists/news/users", {}, 201)
    assert_error(client.delete("/lists/news"), 409, "still has 1 SMTP+ user(s)")
    client.ok("DELETE", f"/users/{user['username']}")
    assert client.ok("DELETE", "/lists/news") == {"name": "news", "deleted": True}
    assert_error(client.get("/lists/news"), 404, "no list named")


# --- users --------------------------------------------------------------------------


FULL_USER = {
    "active": False,
    "priority": 1,
    "notes": "<script>alert(1)</script> billing app",
    "authorized_domains": ["Example.COM", "mail.example.com"],
    "authorized_senders": ["News@Example.com"],
    "enforcement": "monitor",
}


def test_a_user_is_created_with_every_field_and_its_password_shown_once(
    web: WebApp, client: Api
) -> None:
    """
    POST /lists/{name}/users answers 201 with the user's fields (the
    names of section 1, domains and senders as arrays, normalized) and its
    generated password, which logs in; no later response shows it.
    """
    client.ok("POST", "/lists", {"name": "news"}, 201)
    response = client.post("/lists/news/users", FULL_USER)
    assert response.code == 201
    created = response.json()
    assert set(created) == USER_FIELDS | {"password"} == fields_of("NewUser")
    assert response.header("location") == f"/api/v1/users/{created['username']}"
    assert created["username"].startswith("smtp-news-")
    assert {k: created[k] for k in FULL_USER} == {
        **FULL_USER,
        "authorized_domains": ["example.com", "mail.example.com"],
        "authorized_senders": ["news@example.com"],
    }
    assert created["list"] == "news"
    assert (created["last_used_at"], created["last_used_ip"]) == (None, None)
    password = created["password"]
    stored = web.users.get_user(created["username"])
    assert stored is not None
    assert verify_password(password, stored.password_hash)

    shown = client.ok("GET", f"/users/{created['username']}")
    assert shown == {k: v for k, v in created.items() if k != "password"}
    assert set(shown) == USER_FIELDS == fields_of("User")
    assert client.ok("GET", "/lists/news/users") == {"users": [shown]}
    client.ok("PATCH", f"/users/{created['username']}", {"notes": "changed"})
    creating = client.responses.index(response)
    later = client.responses[creating + 1 :]
    assert len(later) == 3
    assert all(password not in r.text for r in later)
    assert all('"password"' not in r.text for r in later)
    assert all("$2b$" not in r.text for r in client.responses)


def test_defaults_of_a_new_user(client: Api) -> None:
    """
    With an empty body the user is active, priority 3, enforce, with no
    authorized sender.
    """
    client.ok("POST", "/lists", {"name": "news"}, 201)
    created = client.ok("POST", "/lists/news/users", {}, 201)
    assert {k: created[k] for k in FULL_USER} == {
        "active": True,
        "priority": 3,
        "notes": "",
        "authorized_domains": [],
        "authorized_senders": [],
        "enforcement": "enforce",
    }


def test_regenerating_a_password_shows_the_new_one_once(web: WebApp, client: Api) -> None:
    """
    POST /users/{username}/password answers the new password, which logs
    in while the old one no longer does.
    """
    client.ok("POST", "/lists", {"name": "news"}, 201)
    created = client.ok("POST", "/lists/news/users", {}, 201)
    username = created["username"]
    renewed = client.ok("POST", f"/users/{username}/password")
    assert set(renewed) == {"username", "password"} == fields_of("NewPassword")
    assert renewed["username"] == username
    assert renewed["password"] != created["password"]
    stored = web.users.get_user(username)
    assert stored is not None
    assert verify_password(renewed["password"], stored.password_hash)
    assert not verify_password(created["password"], stored.password_hash)
    shown = client.get(f"/users/{username}")
    assert renewed["password"] not in shown.text
    assert "$2b$" not in "".join(r.text for r in client.responses)
    assert_error(client.post("/users/nobody/password"), 404, "no SMTP+ user named 'nobody'")


def test_a_user_is_changed_field_by_field(web: WebApp, client: Api) -> None:
    """
    PATCH changes the fields it names and keeps the others; C{list}
    moves the user to another list.
    """
    for name in ("news", "other"):
        client.ok("POST", "/lists", {"name": name}, 201)
    created = client.ok("POST", "/lists/news/users", {"priority": 2, "notes": "keep"}, 201)
    path = f"/users/{created['username']}"
    changed = client.ok("PATCH", path, {"priority": 5, "active": False})
    assert (changed["priority"], changed["active"], changed["notes"]) == (5, False, "keep")
    changed = client.ok(
        "PATCH",
        path,
        {
            "authorized_domains": ["a.example"],
            "authorized_senders": ["x@b.example"],
            "enforcement": "monitor",
            "list": "other",
        },
    )
    assert changed["authorized_domains"] == ["a.example"]
    assert changed["authorized_senders"] == ["x@b.example"]
    assert (changed["enforcement"], changed["list"]) == ("monitor", "other")
    assert changed["username"] == created["username"]
    assert client.ok("GET", "/lists/other/users")["users"] == [changed]
    changed = client.ok("PATCH", path, {"authorized_domains": [], "notes": ""})
    assert (changed["authorized_domains"], changed["notes"]) == ([], "")


def test_user_change_errors(client: Api) -> None:
    """
    An empty change is refused; an unknown user is 404; moving to a list
    that does not exist is 404, to a bad name 400.
    """
    client.ok("POST", "/lists", {"name": "news"}, 201)
    created = client.ok("POST", "/lists/news/users", {}, 201)
    path = f"/users/{created['username']}"
    assert_error(client.patch(path, {}), 400, "nothing to change")
    assert_error(client.patch("/users/nobody", {"priority": 1}), 404, "no SMTP+ user named")
    assert_error(client.patch(path, {"list": "gone"}), 404, "no list named 'gone'")
    assert_error(client.patch(path, {"list": "Bad!"}), 400, "not a valid list name", "list")
    assert_error(client.patch(path, {"password": "mine"}), 400, "unknown field(s) 'password'")
    assert_error(client.patch(path, {"username": "x"}), 400, "unknown field(s) 'username'")
    assert client.ok("GET", path) == {k: v for k, v in created.items() if k != "password"}


BAD_USER_FIELDS: list[tuple[dict[str, Any], str, str]] = [
    ({"priority": 0}, "0 is not a priority: use 1 (very high) to 5 (very low)", "priority"),
    ({"priority": 6}, "6 is not a priority", "priority"),
    ({"priority": "3"}, 'priority: "3" is not an integer from 1', "priority"),
    ({"priority": True}, "priority: true is not an integer", "priority"),
    ({"priority": 2.0}, "priority: 2.0 is not an integer", "priority"),
    ({"active": "false"}, 'active: "false" is not true or false', "active"),
    ({"active": 0}, "active: 0 is not true or false", "active"),
    ({"notes": 5}, "notes: 5 is not text", "notes"),
    ({"notes": "x" * (MAX_NOTES_LENGTH + 1)}, "2001 characters, more than the", "notes"),
    ({"enforcement": "block"}, "'block' is not an enforcement mode", "enforcement"),
    ({"enforcement": None}, "enforcement: null is not enforce or monitor", "enforcement"),
    (
        {"authorized_domains": "example.com"},
        "is not an array of domain names",
        "authorized_domains",
    ),
    (
        {"authorized_domains": ["example.com", 3]},
        "is not an array of domain names",
        "authorized_domains",
    ),
    (
        {"authorized_domains": ["example"]},
        "'example' needs at least two labels, as in example.com",
        "authorized_domains",
    ),
    (
        {"authorized_domains": ["10.0.0.1"]},
        "'10.0.0.1' is an IP address, not a domain name",
        "authorized_domains",
    ),
    ({"authorized_domains": [""]}, "entry 1 is empty", "authorized_domains"),
    (
        {"authorized_domains": ["bücher.example"]},
        "'bücher.example' is not a domain name in ASCII form",
        "authorized_domains",
    ),
    (
        {"authorized_domains": [" example.com"]},
        "' example.com' is not a domain name in ASCII form",
        "authorized_domains",
    ),
    (
        {"authorized_domains": ["xn--zz.example"]},
        "is not a valid internationalized domain name",
        "authorized_domains",
    ),
    (
        {"authorized_domains": ["a.example"] * (MAX_AUTHORIZED_ENTRIES + 1)},
        "1001 entries, more than the 1000 allowed",
        "authorized_domains",
    ),
    (
        {"authorized_senders": ["not-an-address"]},
        "is not an address of the form local@domain",
        "authorized_senders",
    ),
    (
        {"authorized_senders": ["a@example"]},
        "needs at least two labels",
        "authorized_senders",
    ),
    (
        {"authorized_senders": ["a.b.c.d@example.com"]},
        "is not an address local@domain in ASCII form",
        "authorized_senders",
    ),
    ({"list": "news"}, "unknown field(s) 'list'", "list"),
    ({"username": "mine"}, "unknown field(s) 'username'", "username"),
]


def test_user_creation_errors_name_the_field(client: Api) -> None:
    """
    Each bad field is refused with 400, a message naming the bad value,
    and the field; no user is created.
    """
    client.ok("POST", "/lists", {"name": "news"}, 201)
    for fields, message, field in BAD_USER_FIELDS:
        assert_error(client.post("/lists/news/users", dict(fields)), 400, message, field)
        assert client.ok("GET", "/lists/news/users") == {"users": []}


def test_limits_of_user_fields_are_accepted_at_the_limit(client: Api) -> None:
    """
    Notes of L{MAX_NOTES_LENGTH} characters and L{MAX_AUTHORIZED_ENTRIES}
    domains and senders are accepted (one more is refused, above).
    """
    client.ok("POST", "/lists", {"name": "news"}, 201)
    fields = {
        "notes": "é" * MAX_NOTES_LENGTH,
        "authorized_domains": [f"d{n}.example" for n in range(MAX_AUTHORIZED_ENTRIES)],
        "authorized_senders": [f"s{n}@example.com" for n in range(MAX_AUTHORIZED_ENTRIES)],
    }
    created = client.ok("POST", "/lists/news/users", fields, 201)
    assert len(created["authorized_domains"]) == MAX_AUTHORIZED_ENTRIES
    assert len(created["authorized_senders"]) == MAX_AUTHORIZED_ENTRIES
    assert created["notes"] == fields["notes"]


def test_creating_a_user_for_an_unknown_list_is_404(client: Api) -> None:
    """
    The list is looked for before the fields: 404, not 400.
    """
    assert_error(
        client.post("/lists/nope/users", {"authorized_domains": ["bad"], "x": 1}),
        404,
        "no list named 'nope'",
    )


def test_a_deleted_user_is_gone(client: Api) -> None:
    """
    DELETE /users/{username} answers the deletion; the user is then 404.
    """
    client.ok("POST", "/lists", {"name": "news"}, 201)
    username = client.ok("POST", "/lists/news/users", {}, 201)["username"]
    assert client.ok("DELETE", f"/users/{username}") == {"username": username, "deleted": True}
    assert_error(client.get(f"/users/{username}"), 404, "no SMTP+ user named")
    assert_error(client.delete(f"/users/{username}"), 404, "no SMTP+ user named")
    assert client.ok("GET", "/lists/news")["users"] == 0


def test_usernames_with_odd_characters_are_just_unknown(client: Api) -> None:
    """
    A username that could not exist is a 404 like any other.
    """
    for username in ("%00", "..", "a%2Fb", "%E2%98%83", "x" * 300):
        assert_error(client.get(f"/users/{username}"), 404, "no ")


# --- alerts -------------------------------------------------------------------------


def add_alerts(web: WebApp) -> list[int]:
    now = web.clock.seconds()
    return web.alerts.add(
        [
            Alert("sender_domain", "x@evil.example is not authorized", now, "news", {"n": 1}),
            Alert("delivery", "deferred twice", now + 1, "news"),
            Alert("sender_domain", "y@evil.example is not authorized", now + 2, "other"),
            Alert("queue_stalled", "the queue has not moved", now + 3),
        ]
    )


def test_alerts_newest_first_with_filters(web: WebApp, client: Api) -> None:
    """
    GET /alerts lists the alerts newest first, filtered by list and type,
    with the unread count.
    """
    ids = add_alerts(web)
    page = client.ok("GET", "/alerts")
    assert [a["id"] for a in page["alerts"]] == ids[::-1]
    assert (page["unread"], page["next_before"]) == (4, None)
    first = page["alerts"][-1]
    assert set(page) == fields_of("Alerts")
    assert set(first) == fields_of("Alert")
    assert first == {
        "id": ids[0],
        "type": "sender_domain",
        "list": "news",
        "message": "x@evil.example is not authorized",
        "details": {"n": 1},
        "created_at": "2027-01-15T08:00:00Z",
        "read": False,
    }
    news = client.ok("GET", "/alerts?list=news")
    assert [a["id"] for a in news["alerts"]] == [ids[1], ids[0]]
    assert news["unread"] == 2
    sender = client.ok("GET", "/alerts?type=sender_domain")
    assert [a["id"] for a in sender["alerts"]] == [ids[2], ids[0]]
    both = client.ok("GET", "/alerts?type=sender_domain&list=other")
    assert [a["id"] for a in both["alerts"]] == [ids[2]]


def test_alerts_page_with_limit_and_before(web: WebApp, client: Api) -> None:
    """
    A full page says where the next starts; C{before} goes on from there.
    """
    ids = add_alerts(web)
    page = client.ok("GET", "/alerts?limit=3")
    assert [a["id"] for a in page["alerts"]] == ids[:0:-1]
    assert page["next_before"] == ids[1]
    rest = client.ok("GET", f"/alerts?limit=3&before={page['next_before']}")
    assert [a["id"] for a in rest["alerts"]] == [ids[0]]
    assert rest["next_before"] is None


def test_alerts_are_marked_read(web: WebApp, client: Api) -> None:
    """
    POST /alerts/read marks alerts read and says how many were unread;
    C{unread=true} lists only the others.
    """
    ids = add_alerts(web)
    assert client.ok("POST", "/alerts/read", {"ids": ids[:2]}) == {"marked": 2}
    assert client.ok("POST", "/alerts/read", {"ids": [ids[0], 99999]}) == {"marked": 0}
    page = client.ok("GET", "/alerts?unread=true")
    assert [a["id"] for a in page["alerts"]] == [ids[3], ids[2]]
    assert page["unread"] == 2
    assert [a["read"] for a in client.ok("GET", "/alerts")["alerts"]] == [
        False,
        False,
        True,
        True,
    ]
    assert client.ok("POST", "/alerts/read", {"ids": []}) == {"marked": 0}


BAD_ALERT_QUERIES = [
    ("limit=0", "limit: '0' is not a number from 1 to 1000", "limit"),
    ("limit=1001", "is not a number from 1 to 1000", "limit"),
    ("limit=ten", "is not a number", "limit"),
    ("limit=", "is not a number", "limit"),
    ("before=0", "before: '0' is not a number", "before"),
    ("before=-1", "is not a number", "before"),
    ("list=Bad!", "is not a valid list name", "list"),
    ("type=Sender%20Domain", "is not an alert type", "type"),
    ("unread=yes", "unread: 'yes' is not true or false", "unread"),
    ("limit=%FF", "limit: not UTF-8 text", "limit"),
]


def test_alert_query_errors(client: Api) -> None:
    """
    Each bad query parameter is refused with 400, naming it.
    """
    for query, message, field in BAD_ALERT_QUERIES:
        assert_error(client.get(f"/alerts?{query}"), 400, message, field)


def test_alert_limits_are_accepted_at_the_limit(client: Api) -> None:
    assert client.get("/alerts?limit=1000").code == 200
    assert client.get("/alerts?limit=1").code == 200


BAD_READ_BODIES = [
    ({}, "ids: missing"),
    ({"ids": "1"}, "is not an array of at most 1000 alert ids"),
    ({"ids": [0]}, "is not an array"),
    ({"ids": [1.5]}, "is not an array"),
    ({"ids": [True]}, "is not an array"),
    ({"ids": list(range(1, 1002))}, "at most 1000"),
    ({"ids": [1], "all": True}, "unknown field(s) 'all'"),
]


def test_marking_alerts_read_errors(client: Api) -> None:
    """
    A body that is not a list of alert ids is refused.
    """
    for document, message in BAD_READ_BODIES:
        assert_error(client.post("/alerts/read", document), 400, message)


def test_marking_a_thousand_alerts_read_is_allowed(client: Api) -> None:
    assert client.ok("POST", "/alerts/read", {"ids": list(range(1, 1001))}) == {"marked": 0}


# --- the queue ----------------------------------------------------------------------


QUEUE_STATUS_FIELDS = {"paused", "in_flight", "counts", "rate", "concurrency"}
ROW_FIELDS = {
    "subject",
    "queue_id",
    "list",
    "username",
    "sender",
    "recipients",
    "recipient_count",
    "priority",
    "state",
    "attempts",
    "accepted_at",
    "next_attempt_at",
    "estimated_send_at",
}


def test_the_queue_is_listed_as_the_cli_lists_it(client: Api, queue: Queue) -> None:
    """
    GET /queue answers the queue's status and its messages, oldest
    first, with the fields of C{smtpgw-admin queue list --json}.
    """
    sending = queue.submit()
    waiting = queue.submit(list_name="other", username="u2", priority=2)
    listing = client.ok("GET", "/queue")
    assert set(listing) == QUEUE_STATUS_FIELDS | {"messages", "next_after"}
    assert set(listing) == fields_of("QueueListing")
    assert fields_of("QueueMessage") == ROW_FIELDS
    assert listing["counts"] == {"queued": 1, "sending": 1, "deferred": 0, "held": 0}
    assert (listing["paused"], listing["in_flight"], listing["concurrency"]) == (False, 1, 1)
    assert [m["queue_id"] for m in listing["messages"]] == [sending, waiting]
    assert all(set(m) == ROW_FIELDS for m in listing["messages"])
    row = listing["messages"][1]
    assert row["state"] == "queued"
    assert row["priority"] == 2
    assert (row["list"], row["username"], row["sender"]) == ("other", "u2", "app@other.example")
    assert row["subject"] == "hi"
    assert (row["recipients"], row["recipient_count"]) == (
        ["a@example.org", "b@example.org"],
        2,
    )
    assert listing["next_after"] is None


def test_queue_filters_and_pages(client: Api, queue: Queue) -> None:
    """
    The filters of C{queue list}: list, username, priority, state; pages
    with limit and after.
    """
    ids = [
        queue.submit(),
        queue.submit(list_name="other"),
        queue.submit(username="u9", priority=5),
    ]
    only = client.ok("GET", "/queue?list=other")["messages"]
    assert [m["queue_id"] for m in only] == [ids[1]]
    assert [m["queue_id"] for m in client.ok("GET", "/queue?username=u9")["messages"]] == [ids[2]]
    assert [m["queue_id"] for m in client.ok("GET", "/queue?priority=5")["messages"]] == [ids[2]]
    assert [m["queue_id"] for m in client.ok("GET", "/queue?state=sending")["messages"]] == [
        ids[0]
    ]
    page = client.ok("GET", "/queue?limit=2")
    assert [m["queue_id"] for m in page["messages"]] == ids[:2]
    assert page["next_after"] == ids[1]
    rest = client.ok("GET", f"/queue?limit=2&after={page['next_after']}")
    assert [m["queue_id"] for m in rest["messages"]] == ids[2:]
    assert rest["next_after"] is None


BAD_QUEUE_QUERIES = [
    ("state=delivered", "'delivered' is not a queue state: use queued, sending", "state"),
    ("state=QUEUED", "is not a queue state", "state"),
    ("priority=0", "priority: '0' is not a number from 1 to 5", "priority"),
    ("priority=6", "is not a number from 1 to 5", "priority"),
    ("limit=0", "limit: '0' is not a number from 1 to 10000", "limit"),
    ("limit=10001", "is not a number from 1 to 10000", "limit"),
    ("after=nope", "after: 'nope' is not a queue id", "after"),
    ("list=..", "is not a valid list name", "list"),
    ("username=", "username: 1 to 128 characters", "username"),
    ("username=" + "u" * 129, "username: 1 to 128 characters", "username"),
]


def test_queue_query_errors(client: Api, queue: Queue) -> None:
    """
    Each bad query parameter of a listing is refused with 400, naming it.
    """
    for query, message, field in BAD_QUEUE_QUERIES:
        assert_error(client.get(f"/queue?{query}"), 400, message, field)


def test_queue_limits_are_accepted_at_the_limit(client: Api, queue: Queue) -> None:
    for query in ("limit=10000", "limit=1", "username=" + "u" * 128, "priority=1"):
        assert client.get(f"/queue?{query}").code == 200, query


def test_why_a_message_waits(client: Api, queue: Queue) -> None:
    """
    GET /queue/{id}/why says the position, the throttle and the reason.
    """
    queue.submit()
    waiting = queue.submit()
    why = client.ok("GET", f"/queue/{waiting}/why")
    assert set(why) == fields_of("Why")
    assert why == {
        "queue_id": waiting,
        "list": "news",
        "state": "queued",
        "priority": 3,
        "attempts": 0,
        "next_attempt_at": None,
        "position": 0,
        "higher_priority": 0,
        "throttle": "concurrency",
        "reason": "concurrency limit (--concurrency 1 deliveries under way)",
        "estimated_send_at": None,
    }


def test_hold_release_cancel_and_reprioritize(client: Api, queue: Queue) -> None:
    """
    The changes of one message answer what the message is after them.
    """
    queue.submit()
    waiting = queue.submit()
    assert client.ok("POST", f"/queue/{waiting}/hold") == {
        "queue_id": waiting,
        "state": "held",
        "priority": 3,
    }
    assert client.ok("POST", f"/queue/{waiting}/priority", {"priority": 1}) == {
        "queue_id": waiting,
        "state": "held",
        "priority": 1,
    }
    assert client.ok("POST", f"/queue/{waiting}/release")["state"] == "queued"
    assert client.ok("POST", f"/queue/{waiting}/cancel") == {
        "queue_id": waiting,
        "state": "cancelled",
        "priority": 1,
    }
    assert_error(client.get(f"/queue/{waiting}/why"), 404, f"no message {waiting} in the queue")


def test_queue_stop_and_start(client: Api, queue: Queue) -> None:
    """
    Stopping the queue says it is paused; starting it again says it runs.
    """
    stopped = client.ok("POST", "/queue/stop")
    assert set(stopped) == QUEUE_STATUS_FIELDS == fields_of("QueueStatus")
    assert stopped["paused"] is True
    assert client.ok("GET", "/queue")["paused"] is True
    assert client.ok("POST", "/queue/start")["paused"] is False


def test_queue_message_errors(client: Api, queue: Queue) -> None:
    """
    An unknown message is 404; a malformed id 400; changing a message
    being sent 409; a bad priority 400.
    """
    sending = queue.submit()
    unknown = "18B2F1C0A00A1B2C3D400001"
    for verb in ("hold", "release", "cancel"):
        assert_error(client.post(f"/queue/{unknown}/{verb}"), 404, f"no message {unknown}")
        assert_error(client.post(f"/queue/abc/{verb}"), 400, "'abc' is not a queue id")
    assert_error(client.get(f"/queue/{unknown.lower()}/why"), 400, "is not a queue id")
    assert_error(client.post(f"/queue/{sending}/hold"), 409, f"cannot hold {sending}")
    assert_error(client.post(f"/queue/{sending}/cancel"), 409, "it is sending now")
    for priority, message in [
        (0, "0 is not a priority"),
        (6, "6 is not a priority"),
        ("1", 'priority: "1" is not an integer'),
        (None, "priority: null is not an integer"),
    ]:
        assert_error(
            client.post(f"/queue/{sending}/priority", {"priority": priority}), 400, message
        )
    assert_error(client.post(f"/queue/{sending}/priority", {}), 400, "priority: missing")
    assert_error(
        client.post(f"/queue/{sending}/priority", {"priority": 1, "why": "x"}),
        400,
        "unknown field(s) 'why'",
    )
    assert_error(
        client.post(f"/queue/{unknown}/priority", {"priority": 1}), 404, f"no message {unknown}"
    )


def test_a_change_the_journal_could_not_record_is_503(client: Api, queue: Queue) -> None:
    """
    When the journal is down, the change is refused as unavailable (503),
    saying so, never a 500.
    """
    queue.submit()
    waiting = queue.submit()
    queue.journal.available = False
    assert_error(client.post(f"/queue/{waiting}/hold"), 503, "the journal could not record it")


QUEUE_ROUTES = [route for route in SECURED if route[1].startswith("/queue")]


def test_queue_routes_without_a_queue_answer_503(client: Api) -> None:
    """
    In a process without a queue, every queue route says so with 503.
    """
    assert len(QUEUE_ROUTES) == 8
    for method, path in QUEUE_ROUTES:
        document = {"priority": 1} if path.endswith("/priority") else None
        response = client.call(method, concrete(path), document)
        assert_error(response, 503, "the queue is not available in this process")


# --- statistics ---------------------------------------------------------------------


class FakeStats:
    """
    Today's counts per list, as L{smtpgw.stats.DailyStats.today} answers.
    """

    def __init__(self, counts: Mapping[str | None, tuple[int, int, int, int]]) -> None:
        self.counts = counts

    def today(self, list: str | None = None) -> Deferred[dict[str, Any]]:
        accepted, delivered, deferred, bounced = self.counts.get(list, (0, 0, 0, 0))
        return succeed(
            {
                "day": "2027-01-15",
                "list": list,
                "accepted": accepted,
                "delivered": delivered,
                "deferred": deferred,
                "bounced": bounced,
            }
        )


def test_stats_today_per_list(web: WebApp, client: Api) -> None:
    """
    GET /stats answers today's counts in total and for each list.
    """
    web.users.create_list("news")
    web.users.create_list("other")
    web.ctx.stats = FakeStats({None: (5, 4, 1, 0), "news": (5, 4, 1, 0)})
    stats = client.ok("GET", "/stats")
    assert set(stats) == fields_of("Stats")
    assert stats == {
        "day": "2027-01-15",
        "total": {"accepted": 5, "delivered": 4, "deferred": 1, "bounced": 0},
        "lists": [
            {"list": "news", "accepted": 5, "delivered": 4, "deferred": 1, "bounced": 0},
            {"list": "other", "accepted": 0, "delivered": 0, "deferred": 0, "bounced": 0},
        ],
    }


def test_stats_without_statistics_answer_503(client: Api) -> None:
    assert_error(client.get("/stats"), 503, "statistics are not available")


# --- recipients and console sends ----------------------------------------------------


class InlineRecipients:
    """
    A L{SQLiteRecipientStore} as the app reaches the threaded one: C{run}
    calls on the caller's thread and answers a fired L{Deferred}.
    """

    def __init__(self, store: SQLiteRecipientStore) -> None:
        self.store = store

    def run(self, f: Callable[[SQLiteRecipientStore], Any]) -> Deferred[Any]:
        return maybeDeferred(f, self.store)


class Runner:
    """
    Counts the pokes a campaign runner gets.
    """

    pokes = 0

    def poke(self) -> None:
        self.pokes += 1


@pytest.fixture
def sends(web: WebApp, tmp_path: Path) -> Iterator[Runner]:
    """
    The app with recipients, console sends and a runner, and a list
    "news" whose SMTP+ user may send from example.com.
    """
    store = SQLiteCampaignStore.open(tmp_path / "smtpgw.db", web.clock)
    web.ctx.campaigns = InlineCampaignStore(store)
    web.ctx.recipients = InlineRecipients(store.recipients)
    runner = web.ctx.runner = Runner()
    web.users.create_list("news")
    web.users.create_user("news", domains="example.com")
    yield runner
    store.close()


CSV = b"email,Name\r\nann@example.org,Ann\r\nbob@example.org,Bob\r\n"


def import_csv(client: Api, data: bytes, query: str = "") -> Response:
    return client.post(f"/lists/news/recipients{query}", body=data, content_type="text/csv")


def test_recipients_are_imported_from_csv(web: WebApp, client: Api, sends: Runner) -> None:
    """
    POST /lists/{name}/recipients with a CSV body adds the recipients and
    says how many; the same file again updates them.
    """
    response = import_csv(client, CSV)
    assert response.code == 200, response.text
    result = response.json()
    assert set(result) == fields_of("ImportResult")
    assert result == {"imported": 2, "added": 2, "updated": 0, "applied": True, "errors": []}
    again = import_csv(client, CSV.replace(b"Ann", b"Anna")).json()
    assert (again["added"], again["updated"], again["applied"]) == (0, 2, True)
    recipients = web.ctx.recipients.store.recipients("news")
    assert [(r.email, dict(r.fields)) for r in recipients] == [
        ("ann@example.org", {"name": "Anna"}),
        ("bob@example.org", {"name": "Bob"}),
    ]


def test_bad_rows_are_reported_by_line_and_change_nothing_unless_asked(
    web: WebApp, client: Api, sends: Runner
) -> None:
    """
    A file with bad rows imports nothing and lists them by line; with
    C{valid_only=true} the good rows are imported and the bad ones listed.
    """
    data = b"email,name\r\nann@example.org,Ann\r\nnot-an-address,X\r\nann@example.org,Again\r\n"
    result = import_csv(client, data).json()
    assert (result["applied"], result["imported"]) == (False, 0)
    assert [e["line"] for e in result["errors"]] == [3, 4]
    assert "not-an-address" in result["errors"][0]["error"]
    result = import_csv(client, data, "?valid_only=true").json()
    assert (result["applied"], result["imported"], len(result["errors"])) == (True, 1, 2)
    assert import_csv(client, data, "?valid_only=false").json()["applied"] is False


def test_a_file_refused_whole_says_why(client: Api, sends: Runner) -> None:
    """
    A file that cannot be imported at all (no email column, not UTF-8,
    not even CSV) answers the same document, with the reason.
    """
    for data, line, message in [
        (b"name\r\nAnn\r\n", 1, "no 'email' column"),
        (b"email\r\n\xff@example.org\r\n", 2, "not valid UTF-8"),
        (b"", None, "the file is empty"),
        (b"\x00\x01", 1, "no 'email' column"),
    ]:
        result = import_csv(client, data).json()
        assert (result["applied"], result["imported"]) == (False, 0)
        (error,) = result["errors"]
        assert error["line"] == line, result
        assert message in error["error"]
        assert not error["error"].startswith("line")


def test_recipient_import_errors(web: WebApp, client: Api, sends: Runner) -> None:
    """
    Not CSV is 415; a bad C{valid_only} 400; an unknown list 404; without
    a recipients store 503.
    """
    assert_error(
        client.post("/lists/news/recipients", body=CSV, content_type="application/json"),
        415,
        "Content-Type: text/csv",
    )
    assert_error(client.post("/lists/news/recipients", body=CSV, content_type=None), 415, "as CSV")
    assert_error(import_csv(client, CSV, "?valid_only=yes"), 400, "valid_only: 'yes'")
    assert_error(
        client.post("/lists/nope/recipients", body=CSV, content_type="text/csv"),
        404,
        "no list named 'nope'",
    )
    web.ctx.recipients = None
    assert_error(import_csv(client, CSV), 503, "recipients are not available")


def test_a_list_with_console_sends_is_not_deleted(web: WebApp, client: Api, sends: Runner) -> None:
    """
    DELETE of a list that has had a console send answers 409 saying so
    (not a 500), even once its users are gone, and the list stays.
    """
    created = client.ok("POST", "/campaigns", SEND, 201)
    client.ok("POST", f"/campaigns/{created['id']}/cancel")
    for user in web.users.users("news"):
        web.users.delete_user(user.username)
    assert_error(client.delete("/lists/news"), 409, "has 1 console send(s)")
    assert client.ok("GET", "/lists/news")["name"] == "news"


SEND = {
    "list": "news",
    "subject": "Spring news",
    "sender": "News@Example.com",
    "text": "Hello {{name}}",
}


def test_a_console_send_is_created_shown_and_listed(
    web: WebApp, client: Api, sends: Runner
) -> None:
    """
    POST /campaigns creates a scheduled send (201, with where it is) and
    pokes the runner; GET shows it with the fields of section 5.
    """
    response = client.post("/campaigns", {**SEND, "priority": 2, "html": "<p>Hi</p>"})
    assert response.code == 201, response.text
    created = response.json()
    assert set(created) == fields_of("Campaign")
    assert response.header("location") == f"/api/v1/campaigns/{created['id']}"
    assert sends.pokes == 1
    assert {k: created[k] for k in ("list", "subject", "sender", "text", "html", "priority")} == {
        "list": "news",
        "subject": "Spring news",
        "sender": "news@example.com",
        "text": "Hello {{name}}",
        "html": "<p>Hi</p>",
        "priority": 2,
    }
    assert (created["state"], created["paused_reason"], created["sent"]) == ("scheduled", None, 0)
    assert (created["send_at"], created["eta"], created["created_by"]) == (None, None, "token:t")
    assert client.ok("GET", f"/campaigns/{created['id']}") == created
    listing = client.ok("GET", "/campaigns")
    assert set(listing) == fields_of("Campaigns")
    # A listing leaves the (possibly large) bodies out; the send itself has them.
    assert listing == {
        "campaigns": [{**created, "text": None, "html": None}],
        "next_before": None,
    }


def test_console_send_defaults_and_schedule(client: Api, sends: Runner) -> None:
    """
    The priority is 3 unless given; C{send_at} is kept; a time before 1970
    is as any past time.
    """
    created = client.ok(
        "POST", "/campaigns", {**SEND, "send_at": "2030-01-31T09:00:00+01:00"}, 201
    )
    assert (created["priority"], created["send_at"]) == (3, "2030-01-31T08:00:00Z")
    early = client.ok("POST", "/campaigns", {**SEND, "send_at": "1960-01-01T00:00:00Z"}, 201)
    assert early["send_at"] == "1970-01-01T00:00:00Z"
    now = client.ok("POST", "/campaigns", {**SEND, "send_at": None}, 201)
    assert now["send_at"] is None
    precise = {**SEND, "send_at": "2030-01-31t09:00:00.123456789z"}
    assert client.ok("POST", "/campaigns", precise, 201)["send_at"] == "2030-01-31T09:00:00Z"
    last = {**SEND, "send_at": "9999-12-31T23:59:59Z"}
    assert client.ok("POST", "/campaigns", last, 201)["send_at"] == "9999-12-31T23:59:59Z"


def test_console_sends_are_paused_resumed_and_cancelled(client: Api, sends: Runner) -> None:
    """
    Pause, resume and cancel answer the send after the change; a change
    its state does not allow is 409.
    """
    number = client.ok("POST", "/campaigns", SEND, 201)["id"]
    paused = client.ok("POST", f"/campaigns/{number}/pause")
    assert (paused["state"], paused["paused_reason"]) == ("paused", "paused by an admin")
    resumed = client.ok("POST", f"/campaigns/{number}/resume")
    assert (resumed["state"], resumed["paused_reason"]) == ("scheduled", None)
    assert_error(client.post(f"/campaigns/{number}/resume"), 409, "not paused by an admin")
    assert client.ok("POST", f"/campaigns/{number}/cancel")["state"] == "cancelled"
    assert_error(client.post(f"/campaigns/{number}/pause"), 409, "it is cancelled")
    assert_error(client.post(f"/campaigns/{number}/cancel"), 409, "it is cancelled")
    assert sends.pokes == 4


def test_console_send_lookup_errors(web: WebApp, client: Api, sends: Runner) -> None:
    """
    An unknown, malformed or out-of-range id is 404; without a campaign
    store every route is 503.
    """
    for number in ("7", "0", "abc", "-1", "9" * 19, "9" * 30):
        assert_error(client.get(f"/campaigns/{number}"), 404, "no console send")
        assert_error(client.post(f"/campaigns/{number}/cancel"), 404, "no console send")
    web.ctx.campaigns = None
    assert_error(client.get("/campaigns"), 503, "console sends are not available")
    assert_error(client.post("/campaigns", SEND), 503, "console sends are not available")


def test_console_sends_are_filtered_and_paged(web: WebApp, client: Api, sends: Runner) -> None:
    """
    GET /campaigns filters by list and state, newest first, in pages.
    """
    web.users.create_list("other")
    web.users.create_user("other", domains="example.com")
    ids = [
        client.ok("POST", "/campaigns", {**SEND, "list": name}, 201)["id"]
        for name in ("news", "other", "news")
    ]
    client.ok("POST", f"/campaigns/{ids[0]}/cancel")
    assert [c["id"] for c in client.ok("GET", "/campaigns?list=news")["campaigns"]] == [
        ids[2],
        ids[0],
    ]
    cancelled = client.ok("GET", "/campaigns?state=cancelled")["campaigns"]
    assert [c["id"] for c in cancelled] == [ids[0]]
    page = client.ok("GET", "/campaigns?limit=2")
    assert [c["id"] for c in page["campaigns"]] == [ids[2], ids[1]]
    assert page["next_before"] == ids[1]
    rest = client.ok("GET", f"/campaigns?limit=2&before={ids[1]}")
    assert ([c["id"] for c in rest["campaigns"]], rest["next_before"]) == ([ids[0]], None)
    for query, message in [
        ("state=done", "state: 'done' is not a state"),
        ("limit=0", "limit: '0' is not a number from 1 to 1000"),
        ("limit=1001", "is not a number from 1 to 1000"),
        ("before=x", "before: 'x' is not a number"),
        ("list=Bad!", "is not a valid list name"),
    ]:
        assert_error(client.get(f"/campaigns?{query}"), 400, message)


BAD_SENDS: list[tuple[dict[str, Any], int, str, str | None]] = [
    ({"sender": "news@elsewhere.example"}, 409, "may not send for list news", "sender"),
    ({"sender": "news@example"}, 400, "needs at least two labels", "sender"),
    ({"sender": "bücher@example.com"}, 400, "local part 'bücher' is not valid", "sender"),
    ({"sender": "a@bücher.example"}, 400, "is not an address local@domain in ASCII", "sender"),
    ({"subject": ""}, 400, "subject: one line, not blank", "subject"),
    ({"subject": " \t\u3000"}, 400, "subject: one line, not blank", "subject"),
    ({"subject": "two\nlines"}, 400, "subject: one line", "subject"),
    ({"subject": "x" * 999}, 400, "999 characters, more than the 998 allowed", "subject"),
    ({"subject": 5}, 400, "subject: 5 is not text", "subject"),
    ({"text": ""}, 400, 'text: "" is not text', "text"),
    ({"text": None}, 400, "text: null is not text", "text"),
    ({"html": 3}, 400, "html: 3 is not text", "html"),
    ({"priority": 6}, 400, "6 is not a priority", "priority"),
    ({"priority": "1"}, 400, 'priority: "1" is not an integer', "priority"),
    ({"send_at": "tomorrow"}, 400, "send_at: 'tomorrow' is not a time", "send_at"),
    ({"send_at": "2030-13-01T00:00:00Z"}, 400, "is not a time: use RFC 3339", "send_at"),
    ({"send_at": "2030-01-01"}, 400, "is not a time", "send_at"),
    (
        {"send_at": "9999-12-31T23:59:59-23:59"},
        400,
        "send_at: '9999-12-31T23:59:59-23:59' is later than 9999-12-31T23:59:59Z",
        "send_at",
    ),
    ({"send_at": "9999-12-31T23:59:59-00:01"}, 400, "later than 9999-12-31T23:59:59Z", "send_at"),
    ({"send_at": 1900000000}, 400, "send_at: 1900000000 is not a time", "send_at"),
    ({"list": "nope"}, 404, "no list named 'nope'", None),
    ({"list": "Bad!"}, 400, "list: 'Bad!' is not a valid list name", "list"),
    ({"state": "sending"}, 400, "unknown field(s) 'state'", "state"),
]


def test_console_send_creation_errors(client: Api, sends: Runner) -> None:
    """
    Each bad field is refused with its status and a message naming it; a
    sender the list's SMTP+ users are not authorized for is a conflict
    with the list's sender policy (409); nothing is created.
    """
    for change, status, message, field in BAD_SENDS:
        assert_error(client.post("/campaigns", {**SEND, **change}), status, message, field)
    for missing in ("list", "subject", "sender"):
        document = {k: v for k, v in SEND.items() if k != missing}
        assert_error(client.post("/campaigns", document), 400, f"{missing}: missing", missing)
    no_body = {k: v for k, v in SEND.items() if k != "text"}
    assert_error(client.post("/campaigns", no_body), 400, "a text or an HTML body", "text")
    assert client.ok("GET", "/campaigns") == {"campaigns": [], "next_before": None}
    assert sends.pokes == 0


def test_a_console_send_at_the_limits(client: Api, sends: Runner) -> None:
    """
    A subject of 998 characters is taken (999 is refused, above).
    """
    created = client.ok("POST", "/campaigns", {**SEND, "subject": "é" * 998}, 201)
    assert len(created["subject"]) == 998


def test_a_send_with_a_large_html_body_is_taken(web: WebApp, client: Api, sends: Runner) -> None:
    """
    A newsletter's HTML over the 64 KiB form limit (here 200 KiB) is
    accepted on POST /campaigns, whose route takes upload-sized bodies.
    """
    html = "<p>" + "x" * 200_000 + "</p>"
    response = client.post("/campaigns", {**SEND, "html": html})
    assert response.code == 201, response.text
    stored = web.ctx.campaigns.store.get(response.json()["id"])
    assert stored.html == html
