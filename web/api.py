"""
The JSON API under C{/api/v1}: bearer tokens, JSON in and out, errors as
C{{"error": "..."}} with a fitting 4xx status, described by the OpenAPI
document it serves at C{/api/v1/openapi.json}.

Every route but the OpenAPI document needs a bearer token (L{web.auth.api}).
Request bodies are JSON objects (L{read_json}); a field the route does not
know is refused, as is a value of the wrong JSON type, before anything
changes. The documents are those of C{smtpgw-admin --json} (the field names
of the product's section 1), made by the same functions; a password appears
only in the response that generated it, and a password hash never.

The stores' and the queue control's errors become statuses in one place,
L{_STATUS_OF}: a bad value is C{400}, something that does not exist C{404},
a conflict with the current state C{409}, and a store or queue that cannot
answer now C{503}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from typing import Any, Final
from urllib.parse import quote

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from smtpgw.alerts import MAX_QUERY_LIMIT, alert_document
from smtpgw.campaigns import (
    MAX_BODY_LENGTH,
    MAX_SUBJECT_LENGTH,
    CampaignState,
    CampaignStateError,
    NoSuchCampaign,
    campaign_document,
)
from smtpgw.control import BadArgument as ControlBadArgument
from smtpgw.control import ControlError, NoSuchMessage, NotAllowed, NotDurable
from smtpgw.database import StoreError, StoreNotRunning, UnusableDatabase
from smtpgw.queueinfo import (
    MAX_LIST_LIMIT,
    QUEUE_STATES,
    QueueFilter,
    change_document,
    listing_document,
    status_document,
    why_document,
)
from smtpgw.recipients import (
    CsvRefused,
    ImportResult,
    TooManyRecipients,
    import_document,
    parse_recipients_csv,
)
from smtpgw.userstore import (
    ListExists,
    ListNotEmpty,
    NoSuchList,
    NoSuchUser,
    list_document,
    user_document,
)
from smtpgw.validation import (
    ValidationError,
    parse_domains,
    parse_senders,
    validate_list_name,
    validate_priority,
)
from web.auth import Auth, api, json_error
from web.context import WebContext
from web.pages_campaigns import LATEST_SEND_AT
from web.security import MAX_BODY_BYTES

__all__ = [
    "DEFAULT_ALERT_LIMIT",
    "DEFAULT_QUEUE_LIMIT",
    "DOMAIN_PATTERN",
    "LIST_NAME_PATTERN",
    "MAX_JSON_BYTES",
    "MAX_USERNAME_LENGTH",
    "QUEUE_ID_PATTERN",
    "SENDER_PATTERN",
    "SEND_AT_PATTERN",
    "SUBJECT_PATTERN",
    "ApiApp",
    "ApiError",
    "api_error_for",
    "dump",
    "read_json",
]

OPENAPI: Final = FilePath(__file__).sibling("openapi.json")
MAX_JSON_BYTES: Final = 64 * 1024
"""The largest JSON body a route reads; one byte more is answered C{413}
(the site refuses bodies as large on every route but uploads, before they
arrive here; this holds whatever site serves the app)."""

MAX_USERNAME_LENGTH: Final = 128
"""The longest username a queue filter takes (generated ones are far shorter)."""

DEFAULT_ALERT_LIMIT: Final = 100
"""Alerts one page gives when no C{limit} is asked for."""

DEFAULT_QUEUE_LIMIT: Final = 100
"""Messages one queue page gives when no C{limit} is asked for."""

# The patterns of the OpenAPI document (a test checks they are the same),
# checked here too, so that what the document calls valid is accepted and
# anything else refused. They are stricter than the user store, which also
# takes an internationalized name as typed and blanks around an entry: the
# API takes the one exact form its clients send. No lookahead: generators
# of test data (schemathesis) cannot draw from them.
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# No top-level domain starts with a digit; so none is all digits.
_TOP_LABEL: Final = r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN: Final = rf"(?:{_LABEL}\.)+{_TOP_LABEL}"
_ATOM: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
# A dot-atom of at most 64 characters, in a form a pattern without
# lookahead can bound: one atom, or two, or three, each short enough.
_LOCAL: Final = (
    rf"(?:{_ATOM}{{1,64}}"
    rf"|{_ATOM}{{1,31}}\.{_ATOM}{{1,32}}"
    rf"|{_ATOM}{{1,20}}(?:\.{_ATOM}{{1,21}}){{2}})"
)

LIST_NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9._-]{0,63}$"
"""A list name (L{smtpgw.validation.validate_list_name})."""
DOMAIN_PATTERN: Final = rf"^{_DOMAIN}$"
"""An entry of C{authorized_domains}: a host name of at least two labels in
ASCII (A-labels for an internationalized name), at most 253 characters."""
SENDER_PATTERN: Final = rf"^{_LOCAL}@{_DOMAIN}$"
"""An entry of C{authorized_senders}: a dot-atom local part of at most 64
characters and three atoms, and a domain as L{DOMAIN_PATTERN} has it; at
most 254 characters."""
QUEUE_ID_PATTERN: Final = r"^[0-9A-F]{24}$"
"""A queue id (L{smtpgw.model.QueueIdGenerator}): 24 upper-case hex digits."""

# What Python's str.strip() and ECMAScript's \s both call blank, so that a
# subject the pattern takes is never blank to the store, nor the reverse.
_BLANK: Final = "\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
SUBJECT_PATTERN: Final = rf"^[^\r\n]*[^\r\n{_BLANK}][^\r\n]*$"
"""A console send's subject: one line, not blank."""
SEND_AT_PATTERN: Final = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
"""A console send's C{send_at}: an RFC 3339 date-time."""

QUEUE_ID: Final = re.compile(QUEUE_ID_PATTERN)
_SUBJECT: Final = re.compile(SUBJECT_PATTERN)
_SEND_AT: Final = re.compile(SEND_AT_PATTERN)
_MAX_ID: Final = 2**63 - 1
_DOMAIN_ENTRY: Final = re.compile(DOMAIN_PATTERN)
_SENDER_ENTRY: Final = re.compile(SENDER_PATTERN)

_DIGITS: Final = re.compile(r"[0-9]{1,19}")

_log = Logger()

# One table from the stores' and the queue control's errors to statuses.
# Order matters: the first class an error is an instance of wins.
_STATUS_OF: Final[tuple[tuple[type[Exception], int], ...]] = (
    (ValidationError, 400),
    (ControlBadArgument, 400),
    (NoSuchList, 404),
    (NoSuchUser, 404),
    (NoSuchMessage, 404),
    (NoSuchCampaign, 404),
    (ListExists, 409),
    (ListNotEmpty, 409),
    (NotAllowed, 409),
    (CampaignStateError, 409),
    (TooManyRecipients, 409),
    (NotDurable, 503),
    (StoreNotRunning, 503),
    (UnusableDatabase, 503),
    (StoreError, 503),
    (ControlError, 503),
)

_MAPPED: Final = tuple(kind for kind, _ in _STATUS_OF)


class ApiError(Exception):
    """
    An error to answer with: its status and its message.

    @ivar field: the request field it is about, when it is about one.
    """

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def _error_document(message: str, field: str | None) -> dict[str, str]:
    document = {"error": message}
    if field is not None:
        document["field"] = field
    return document


def api_error_for(error: Exception) -> ApiError:
    """
    The answer to an error of a store or of the queue control.

    @param error: an instance of one of the classes of L{_STATUS_OF}.
    """
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ValidationError):
        return ApiError(400, f"{error.field}: {error.message}", error.field)
    for kind, status in _STATUS_OF:
        if isinstance(error, kind):
            return ApiError(status, str(error) or kind.__name__)
    raise TypeError(f"no status for {error!r}")


def _check_text(value: Any, where: str) -> None:
    """
    Refuse strings Python can decode from JSON but not store: lone
    surrogates (C{"\\ud800"}) are no text.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{where}: not valid Unicode text") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, where)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, where)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_json(request: IRequest, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """
    The request's JSON object body.

    @param limit: the largest body, in bytes.
    @raise ApiError: not JSON (C{415} for another content type, C{400} for
        a body that does not parse or is not an object), or over C{limit}
        (C{413}).
    """
    raw_type = bytes(request.getHeader(b"content-type") or b"").decode("latin-1")
    content_type = raw_type.split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "send a JSON body (Content-Type: application/json)")
    raw = request.content.read(limit + 1)
    if len(raw) > limit:
        raise ApiError(413, f"JSON body over {limit} bytes")
    try:
        document = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    if not isinstance(document, dict):
        raise ApiError(400, "the body must be a JSON object")
    _check_text(document, "body")
    return document


def dump(request: IRequest, document: Any, status: int = 200) -> bytes:
    """
    Answer with a JSON document.
    """
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(document).encode()


# --- request fields -----------------------------------------------------------


def _fields(
    document: Mapping[str, Any], allowed: Collection[str], required: Collection[str] = ()
) -> None:
    """
    Refuse fields the route does not know, and missing required ones.
    """
    unknown = sorted(set(document) - set(allowed))
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        known = ", ".join(sorted(allowed)) or "none"
        raise ApiError(400, f"unknown field(s) {names}; this route takes: {known}", unknown[0])
    for name in required:
        if name not in document:
            raise ApiError(400, f"{name}: missing", name)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(
    document: Mapping[str, Any], name: str, check: Callable[[Any], bool], what: str
) -> Any:
    value = document[name]
    if not check(value):
        raise ApiError(400, f"{name}: {json.dumps(value)[:80]} is not {what}", name)
    return value


def _string_array(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


_USER_FIELD_TYPES: Final[Mapping[str, tuple[Callable[[Any], bool], str]]] = {
    "list": (lambda v: isinstance(v, str), "a list name (text)"),
    "priority": (_is_integer, "an integer from 1 (very high) to 5 (very low)"),
    "active": (lambda v: isinstance(v, bool), "true or false"),
    "notes": (lambda v: isinstance(v, str), "text"),
    "authorized_domains": (_string_array, "an array of domain names"),
    "authorized_senders": (_string_array, "an array of sender addresses"),
    "enforcement": (lambda v: isinstance(v, str), "enforce or monitor"),
}

# The JSON field names of section 1 as the user store's keyword arguments.
_STORE_ARGUMENT: Final = {
    "authorized_domains": "domains",
    "authorized_senders": "senders",
}


def _user_fields(document: Mapping[str, Any], allowed: Collection[str]) -> dict[str, Any]:
    """
    The user store's keyword arguments for a user document's fields, each
    of the right JSON type (the store checks the values).
    """
    _fields(document, allowed)
    changes: dict[str, Any] = {}
    for name in allowed:
        if name in document:
            check, what = _USER_FIELD_TYPES[name]
            changes[_STORE_ARGUMENT.get(name, name)] = _expect(document, name, check, what)
    if "list" in changes:
        try:
            validate_list_name(changes["list"])
        except ValidationError as e:
            raise ApiError(400, f"list: {e.message}", "list") from None
    if "domains" in changes:
        _exact_entries(
            "authorized_domains",
            changes["domains"],
            parse_domains,
            _DOMAIN_ENTRY,
            "a domain name in ASCII form (an internationalized name as its xn-- A-labels)",
        )
    if "senders" in changes:
        _exact_entries(
            "authorized_senders",
            changes["senders"],
            parse_senders,
            _SENDER_ENTRY,
            "an address local@domain in ASCII form, without blanks",
        )
    return changes


def _exact_entries(
    name: str,
    entries: list[str],
    parse: Callable[[list[str]], object],
    pattern: re.Pattern[str],
    what: str,
) -> None:
    """
    Check entries as the user store will (its message names the bad one),
    then that each is in the one form the API takes.
    """
    try:
        parse(entries)
    except ValidationError as e:
        raise ApiError(400, f"{name}: {e.message}", name) from None
    for entry in entries:
        if not pattern.fullmatch(entry):
            raise ApiError(400, f"{name}: {entry[:80]!r} is not {what}", name)


def _param(request: IRequest, name: str) -> str | None:
    """
    A query parameter as text, or L{None} when absent.
    """
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        return bytes(values[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"{name}: not UTF-8 text", name) from None


def _int_param(
    request: IRequest, name: str, low: int, high: int, default: int | None
) -> int | None:
    text = _param(request, name)
    if text is None:
        return default
    if not _DIGITS.fullmatch(text) or not low <= int(text) <= high:
        raise ApiError(400, f"{name}: {text[:40]!r} is not a number from {low} to {high}", name)
    return int(text)


def _list_param(request: IRequest, name: str = "list") -> str | None:
    text = _param(request, name)
    if text is not None:
        try:
            validate_list_name(text)
        except ValidationError as e:
            raise ApiError(400, f"{name}: {e.message}", name) from None
    return text


def _queue_id(text: str, name: str = "queue_id") -> str:
    if not QUEUE_ID.fullmatch(text):
        raise ApiError(
            400, f"{name}: {text[:40]!r} is not a queue id (24 upper-case hex digits)", name
        )
    return text


_CAMPAIGN_FIELDS: Final = ("list", "subject", "sender", "text", "html", "priority", "send_at")


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _campaign_fields(document: Mapping[str, Any]) -> dict[str, Any]:
    """
    The campaign store's arguments for a new console send, each of the
    right JSON type and in the form the OpenAPI document gives (the store
    checks the rest, the sender policy included).
    """
    _fields(document, _CAMPAIGN_FIELDS, ("list", "subject", "sender"))
    name = _expect(document, "list", _text, "a list name")
    try:
        validate_list_name(name)
    except ValidationError as e:
        raise ApiError(400, f"list: {e.message}", "list") from None
    subject = _expect(document, "subject", _text, "text")
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise ApiError(
            400,
            f"subject: {len(subject)} characters, more than the {MAX_SUBJECT_LENGTH} allowed",
            "subject",
        )
    if not _SUBJECT.fullmatch(subject):
        raise ApiError(400, "subject: one line, not blank", "subject")
    sender = _expect(document, "sender", _text, "an address")
    _exact_entries(
        "sender",
        [sender],
        parse_senders,
        _SENDER_ENTRY,
        "an address local@domain in ASCII form, without blanks",
    )
    fields: dict[str, Any] = {"list": name, "subject": subject, "sender": sender}
    for body in ("text", "html"):
        if body in document:
            value = _expect(document, body, lambda v: isinstance(v, str) and v != "", "text")
            if len(value) > MAX_BODY_LENGTH:
                raise ApiError(
                    400,
                    f"{body}: {len(value)} characters, more than the {MAX_BODY_LENGTH} allowed",
                    body,
                )
            fields[body] = value
    if "text" not in fields and "html" not in fields:
        raise ApiError(400, "text: a text or an HTML body (or both) is required", "text")
    if "priority" in document:
        fields["priority"] = validate_priority(
            _expect(
                document, "priority", _is_integer, "an integer from 1 (very high) to 5 (very low)"
            )
        )
    if document.get("send_at") is not None:
        fields["send_at"] = _send_at(_expect(document, "send_at", _text, "a time"))
    return fields


def _send_at(text: str) -> float:
    """
    Read C{send_at}; a time before 1970 is as any past time: now.
    """
    if _SEND_AT.fullmatch(text):
        try:
            when = datetime.fromisoformat(text.upper()).timestamp()
        except (ValueError, OverflowError):
            pass
        else:
            if when > LATEST_SEND_AT:
                raise ApiError(
                    400,
                    f"send_at: {text[:40]!r} is later than 9999-12-31T23:59:59Z, "
                    "choose an earlier time",
                    "send_at",
                )
            return max(0.0, when)
    raise ApiError(
        400,
        f"send_at: {text[:40]!r} is not a time: use RFC 3339, as 2030-01-31T09:00:00Z",
        "send_at",
    )


def _campaign_id(text: str) -> int:
    if _DIGITS.fullmatch(text) and 1 <= int(text) <= _MAX_ID:
        return int(text)
    raise ApiError(404, f"no console send {text[:40]!r}")


def _refused_document(refused: CsvRefused) -> dict[str, Any]:
    message = str(refused)
    if refused.line is not None:
        message = message.removeprefix(f"line {refused.line}: ")
    return {
        "imported": 0,
        "added": 0,
        "updated": 0,
        "applied": False,
        "errors": [{"line": refused.line, "error": message}],
    }


def _import(data: bytes, name: str, valid_only: bool) -> Callable[[Any], Any]:
    """
    What runs on the recipients store's thread: reading the file takes a
    while for a large one, so not on the reactor's.
    """

    def run(store: Any) -> ImportResult | CsvRefused:
        try:
            parsed = parse_recipients_csv(data)
        except CsvRefused as e:
            return e
        result: ImportResult = store.import_recipients(name, parsed, valid_only=valid_only)
        return result

    return run


class ApiApp:
    """
    The API's routes; mounted by L{web.app.AdminApp} at C{/api/v1}.
    """

    app = Klein()

    def __init__(self, ctx: WebContext, auth: Auth) -> None:
        self.ctx = ctx
        self.auth = auth

    # --- errors, in one place ---------------------------------------------------

    @app.handle_errors(ApiError, *_MAPPED)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        value = failure.value
        assert isinstance(value, Exception)
        error = api_error_for(value)
        return dump(request, _error_document(error.message, error.field), error.status)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return json_error(request, 404, "no such API route")

    @app.handle_errors(MethodNotAllowed)
    def _not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, MethodNotAllowed)
        allowed = sorted(set(error.valid_methods or ()) - {"OPTIONS"})
        request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        return json_error(request, 405, "method not allowed on this route")

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        _log.failure(
            "API request {method} {uri} failed",
            failure,
            method=bytes(request.method).decode("latin-1"),
            uri=bytes(request.uri).decode("latin-1")[:200],
        )
        return json_error(request, 500, "internal error; the gateway's log says more")

    # --- helpers ----------------------------------------------------------------

    def _control(self) -> Any:
        if self.ctx.control is None:
            raise ApiError(503, "the queue is not available in this process")
        return self.ctx.control

    async def _list_or_404(self, name: str) -> Any:
        found = await self.ctx.users.get_list(name)
        if found is None:
            raise ApiError(404, f"no list named {name!r}")
        return found

    def _campaigns(self) -> Any:
        if self.ctx.campaigns is None:
            raise ApiError(503, "console sends are not available in this process")
        return self.ctx.campaigns

    def _poke_runner(self) -> None:
        if self.ctx.runner is not None:
            self.ctx.runner.poke()

    async def _user_or_404(self, username: str) -> Any:
        found = await self.ctx.users.get_user(username)
        if found is None:
            raise ApiError(404, f"no SMTP+ user named {username!r}")
        return found

    # --- the document -----------------------------------------------------------

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return OPENAPI.getContent()

    # --- lists ------------------------------------------------------------------

    @app.route("/lists", methods=["GET"])
    @api
    async def lists(self, request: IRequest, token: Any) -> bytes:
        lists = await self.ctx.users.lists()
        counts = await self.ctx.users.user_counts()
        return dump(
            request, {"lists": [list_document(item, counts.get(item.name, 0)) for item in lists]}
        )

    @app.route("/lists", methods=["POST"])
    @api
    async def lists_create(self, request: IRequest, token: Any) -> bytes:
        document = read_json(request)
        _fields(document, ("name",), ("name",))
        name = _expect(document, "name", lambda v: isinstance(v, str), "a list name")
        created = await self.ctx.users.create_list(name)
        _log.info("API token {token} created list {name}", token=token.name, name=name)
        request.setHeader(b"Location", f"/api/v1/lists/{quote(name)}".encode())
        return dump(request, list_document(created, 0), 201)

    @app.route("/lists/<name>", methods=["GET"])
    @api
    async def lists_show(self, request: IRequest, token: Any, name: str) -> bytes:
        found = await self._list_or_404(name)
        counts = await self.ctx.users.user_counts()
        return dump(request, list_document(found, counts.get(name, 0)))

    @app.route("/lists/<name>", methods=["PATCH"])
    @api
    async def lists_change(self, request: IRequest, token: Any, name: str) -> bytes:
        document = read_json(request)
        found = await self._list_or_404(name)
        if "name" in document:
            raise ApiError(400, "name: a list's name never changes", "name")
        # A list has no other changeable field yet: only {} is accepted.
        _fields(document, ())
        counts = await self.ctx.users.user_counts()
        return dump(request, list_document(found, counts.get(name, 0)))

    @app.route("/lists/<name>", methods=["DELETE"])
    @api
    async def lists_delete(self, request: IRequest, token: Any, name: str) -> bytes:
        await self.ctx.users.delete_list(name)
        _log.info("API token {token} deleted list {name}", token=token.name, name=name)
        return dump(request, {"name": name, "deleted": True})

    # --- SMTP+ users ------------------------------------------------------------

    @app.route("/lists/<name>/users", methods=["GET"])
    @api
    async def users_of_list(self, request: IRequest, token: Any, name: str) -> bytes:
        users = await self.ctx.users.users(name)
        return dump(request, {"users": [user_document(user) for user in users]})

    @app.route("/lists/<name>/users", methods=["POST"])
    @api
    async def users_create(self, request: IRequest, token: Any, name: str) -> bytes:
        document = read_json(request)
        await self._list_or_404(name)
        fields = _user_fields(document, [f for f in _USER_FIELD_TYPES if f != "list"])
        user, password = await self.ctx.users.create_user(name, **fields)
        _log.info(
            "API token {token} created SMTP+ user {username} of list {name}",
            token=token.name,
            username=user.username,
            name=name,
        )
        request.setHeader(b"Location", f"/api/v1/users/{quote(user.username)}".encode())
        return dump(request, user_document(user, password), 201)

    @app.route("/users/<username>", methods=["GET"])
    @api
    async def users_show(self, request: IRequest, token: Any, username: str) -> bytes:
        return dump(request, user_document(await self._user_or_404(username)))

    @app.route("/users/<username>", methods=["PATCH"])
    @api
    async def users_change(self, request: IRequest, token: Any, username: str) -> bytes:
        document = read_json(request)
        await self._user_or_404(username)
        changes = _user_fields(document, list(_USER_FIELD_TYPES))
        if not changes:
            raise ApiError(400, "nothing to change: give at least one field")
        user = await self.ctx.users.update_user(username, **changes)
        _log.info(
            "API token {token} changed {fields} of SMTP+ user {username}",
            token=token.name,
            fields=sorted(document),
            username=username,
        )
        return dump(request, user_document(user))

    @app.route("/users/<username>", methods=["DELETE"])
    @api
    async def users_delete(self, request: IRequest, token: Any, username: str) -> bytes:
        await self.ctx.users.delete_user(username)
        _log.info(
            "API token {token} deleted SMTP+ user {username}", token=token.name, username=username
        )
        return dump(request, {"username": username, "deleted": True})

    @app.route("/users/<username>/password", methods=["POST"])
    @api
    async def users_password(self, request: IRequest, token: Any, username: str) -> bytes:
        password = await self.ctx.users.regenerate_password(username)
        _log.info(
            "API token {token} regenerated the password of SMTP+ user {username}",
            token=token.name,
            username=username,
        )
        return dump(request, {"username": username, "password": password})

    # --- recipients -------------------------------------------------------------

    @app.route("/lists/<name>/recipients", methods=["POST"])
    @api
    async def recipients_import(self, request: IRequest, token: Any, name: str) -> bytes:
        raw_type = bytes(request.getHeader(b"content-type") or b"").decode("latin-1")
        if raw_type.split(";")[0].strip().lower() != "text/csv":
            raise ApiError(415, "send the recipients as CSV (Content-Type: text/csv)")
        valid_only = _param(request, "valid_only")
        if valid_only not in (None, "true", "false"):
            raise ApiError(
                400, f"valid_only: {valid_only[:40]!r} is not true or false", "valid_only"
            )
        if self.ctx.recipients is None:
            raise ApiError(503, "recipients are not available in this process")
        await self._list_or_404(name)
        data = request.content.read()
        outcome = await self.ctx.recipients.run(_import(data, name, valid_only == "true"))
        if isinstance(outcome, CsvRefused):
            return dump(request, _refused_document(outcome))
        _log.info(
            "API token {token} imported {count} recipients into list {name}",
            token=token.name,
            count=outcome.imported,
            name=name,
        )
        return dump(request, import_document(outcome))

    # --- console sends ----------------------------------------------------------

    @app.route("/campaigns", methods=["GET"])
    @api
    async def campaigns(self, request: IRequest, token: Any) -> bytes:
        list_name = _list_param(request)
        state_text = _param(request, "state")
        states = {state.value: state for state in CampaignState}
        if state_text is not None and state_text not in states:
            names = ", ".join(states)
            raise ApiError(400, f"state: {state_text[:40]!r} is not a state: use {names}", "state")
        limit = _int_param(request, "limit", 1, 1000, 100)
        before = _int_param(request, "before", 1, _MAX_ID, None)
        # A listing leaves the bodies out (up to 1,000 sends of up to 1 MB
        # each); GET /campaigns/{id} has them.
        found = await self._campaigns().campaigns(
            list_name,
            None if state_text is None else states[state_text],
            limit,
            before,
            bodies=False,
        )
        now = self.ctx.clock.seconds()
        return dump(
            request,
            {
                "campaigns": [campaign_document(campaign, now) for campaign in found],
                "next_before": found[-1].id if len(found) == limit else None,
            },
        )

    @app.route("/campaigns", methods=["POST"])
    @api
    async def campaigns_create(self, request: IRequest, token: Any) -> bytes:
        # A send's HTML may be large: its route takes bodies up to the site's
        # upload limit (web.security.UPLOAD_PATHS).
        document = read_json(request, MAX_BODY_BYTES)
        fields = _campaign_fields(document)
        store = self._campaigns()
        name = fields.pop("list")
        await self._list_or_404(name)
        try:
            await store.check_sender(name, fields["sender"])
        except ValidationError as e:
            # Well formed, but not what the list's SMTP+ users may send as now.
            raise ApiError(409, f"sender: {e.message}", "sender") from None
        campaign = await store.create(
            name, fields.pop("subject"), created_by=f"token:{token.name}", **fields
        )
        self._poke_runner()
        _log.info(
            "API token {token} created console send {id} for list {name}",
            token=token.name,
            id=campaign.id,
            name=name,
        )
        request.setHeader(b"Location", f"/api/v1/campaigns/{campaign.id}".encode())
        return dump(request, campaign_document(campaign, self.ctx.clock.seconds()), 201)

    @app.route("/campaigns/<campaign_id>", methods=["GET"])
    @api
    async def campaigns_show(self, request: IRequest, token: Any, campaign_id: str) -> bytes:
        number = _campaign_id(campaign_id)
        campaign = await self._campaigns().get(number)
        if campaign is None:
            raise ApiError(404, f"no console send {number}")
        return dump(request, campaign_document(campaign, self.ctx.clock.seconds()))

    async def _campaign_change(
        self, request: IRequest, token: Any, verb: str, campaign_id: str
    ) -> bytes:
        number = _campaign_id(campaign_id)
        campaign = await getattr(self._campaigns(), verb)(number)
        self._poke_runner()
        _log.info(
            "API token {token}: {verb} console send {id}", token=token.name, verb=verb, id=number
        )
        return dump(request, campaign_document(campaign, self.ctx.clock.seconds()))

    @app.route("/campaigns/<campaign_id>/pause", methods=["POST"])
    @api
    async def campaigns_pause(self, request: IRequest, token: Any, campaign_id: str) -> bytes:
        return await self._campaign_change(request, token, "pause", campaign_id)

    @app.route("/campaigns/<campaign_id>/resume", methods=["POST"])
    @api
    async def campaigns_resume(self, request: IRequest, token: Any, campaign_id: str) -> bytes:
        return await self._campaign_change(request, token, "resume", campaign_id)

    @app.route("/campaigns/<campaign_id>/cancel", methods=["POST"])
    @api
    async def campaigns_cancel(self, request: IRequest, token: Any, campaign_id: str) -> bytes:
        return await self._campaign_change(request, token, "cancel", campaign_id)

    # --- alerts -----------------------------------------------------------------

    @app.route("/alerts", methods=["GET"])
    @api
    async def alerts(self, request: IRequest, token: Any) -> bytes:
        list_name = _list_param(request)
        kind = _param(request, "type")
        if kind is not None and not re.fullmatch(r"[a-z0-9_]{1,64}", kind):
            raise ApiError(400, f"type: {kind[:40]!r} is not an alert type", "type")
        unread = _param(request, "unread")
        if unread not in (None, "true", "false"):
            raise ApiError(400, f"unread: {unread[:40]!r} is not true or false", "unread")
        limit = _int_param(request, "limit", 1, MAX_QUERY_LIMIT, DEFAULT_ALERT_LIMIT)
        before = _int_param(request, "before", 1, _MAX_ID, None)
        found = await self.ctx.alerts.alerts(
            list=list_name, type=kind, unread_only=unread == "true", limit=limit, before=before
        )
        count = await self.ctx.alerts.unread_count(list_name)
        return dump(
            request,
            {
                "alerts": [alert_document(alert) for alert in found],
                "unread": count,
                "next_before": found[-1].id if len(found) == limit else None,
            },
        )

    @app.route("/alerts/read", methods=["POST"])
    @api
    async def alerts_read(self, request: IRequest, token: Any) -> bytes:
        document = read_json(request)
        _fields(document, ("ids",), ("ids",))
        ids = _expect(
            document,
            "ids",
            lambda v: (
                isinstance(v, list)
                and len(v) <= MAX_QUERY_LIMIT
                and all(_is_integer(i) and 1 <= i <= _MAX_ID for i in v)
            ),
            f"an array of at most {MAX_QUERY_LIMIT} alert ids",
        )
        marked = await self.ctx.alerts.mark_read(ids)
        return dump(request, {"marked": marked})

    # --- the queue --------------------------------------------------------------

    @app.route("/queue", methods=["GET"])
    @api
    async def queue(self, request: IRequest, token: Any) -> bytes:
        list_name = _list_param(request)
        username = _param(request, "username")
        if username is not None and not 1 <= len(username) <= MAX_USERNAME_LENGTH:
            raise ApiError(400, f"username: 1 to {MAX_USERNAME_LENGTH} characters", "username")
        priority = _int_param(request, "priority", 1, 5, None)
        state_text = _param(request, "state")
        states = {state.value: state for state in QUEUE_STATES}
        if state_text is not None and state_text not in states:
            names = ", ".join(states)
            raise ApiError(
                400, f"state: {state_text[:40]!r} is not a queue state: use {names}", "state"
            )
        after_text = _param(request, "after")
        after = None if after_text is None else _queue_id(after_text, "after")
        limit = _int_param(request, "limit", 1, MAX_LIST_LIMIT, DEFAULT_QUEUE_LIMIT)
        queue_filter = QueueFilter(
            list=list_name,
            username=username,
            priority=None if priority is None else validate_priority(priority),
            state=None if state_text is None else states[state_text],
        )
        listing = await self._control().listing(queue_filter, after, limit)
        return dump(request, listing_document(listing))

    @app.route("/queue/stop", methods=["POST"])
    @api
    async def queue_stop(self, request: IRequest, token: Any) -> bytes:
        status = await self._control().stop()
        _log.info("API token {token} stopped the queue", token=token.name)
        return dump(request, status_document(status))

    @app.route("/queue/start", methods=["POST"])
    @api
    async def queue_start(self, request: IRequest, token: Any) -> bytes:
        status = await self._control().start()
        _log.info("API token {token} started the queue", token=token.name)
        return dump(request, status_document(status))

    @app.route("/queue/<queue_id>/why", methods=["GET"])
    @api
    async def queue_why(self, request: IRequest, token: Any, queue_id: str) -> bytes:
        control = self._control()
        why = await control.why(_queue_id(queue_id))
        return dump(request, why_document(why))

    async def _change(self, request: IRequest, token: Any, verb: str, queue_id: str) -> bytes:
        control = self._control()
        change = await getattr(control, verb)(_queue_id(queue_id))
        _log.info(
            "API token {token}: {verb} {queue_id}", token=token.name, verb=verb, queue_id=queue_id
        )
        return dump(request, change_document(change))

    @app.route("/queue/<queue_id>/hold", methods=["POST"])
    @api
    async def queue_hold(self, request: IRequest, token: Any, queue_id: str) -> bytes:
        return await self._change(request, token, "hold", queue_id)

    @app.route("/queue/<queue_id>/release", methods=["POST"])
    @api
    async def queue_release(self, request: IRequest, token: Any, queue_id: str) -> bytes:
        return await self._change(request, token, "release", queue_id)

    @app.route("/queue/<queue_id>/cancel", methods=["POST"])
    @api
    async def queue_cancel(self, request: IRequest, token: Any, queue_id: str) -> bytes:
        return await self._change(request, token, "cancel", queue_id)

    @app.route("/queue/<queue_id>/priority", methods=["POST"])
    @api
    async def queue_priority(self, request: IRequest, token: Any, queue_id: str) -> bytes:
        document = read_json(request)
        _fields(document, ("priority",), ("priority",))
        priority = _expect(
            document, "priority", _is_integer, "an integer from 1 (very high) to 5 (very low)"
        )
        new = validate_priority(priority)
        control = self._control()
        change = await control.reprioritize(_queue_id(queue_id), int(new))
        _log.info(
            "API token {token} re-prioritized {queue_id} to {priority}",
            token=token.name,
            queue_id=queue_id,
            priority=int(new),
        )
        return dump(request, change_document(change))

    # --- statistics -------------------------------------------------------------

    @app.route("/stats", methods=["GET"])
    @api
    async def stats(self, request: IRequest, token: Any) -> bytes:
        if self.ctx.stats is None:
            raise ApiError(503, "statistics are not available in this process")
        lists = await self.ctx.users.lists()
        total = await self.ctx.stats.today(None)
        per_list = [await self.ctx.stats.today(item.name) for item in lists]
        return dump(
            request,
            {
                "day": total["day"],
                "total": _counts(total),
                "lists": [{"list": counts["list"], **_counts(counts)} for counts in per_list],
            },
        )


def _counts(today: Mapping[str, Any]) -> dict[str, int]:
    return {name: int(today[name]) for name in ("accepted", "delivered", "deferred", "bounced")}
