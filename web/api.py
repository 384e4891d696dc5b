"""
The JSON API under C{/api/v1}: bearer tokens, JSON in and out, errors as
C{{"error": "..."}} with a fitting 4xx status, described by the OpenAPI
document it serves at C{/api/v1/openapi.json}.
"""

from __future__ import annotations

import json
from typing import Any, Final

from klein import Klein
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from web.auth import Auth, api, json_error
from web.context import WebContext

__all__ = ["ApiApp", "ApiError", "read_json"]

OPENAPI: Final = FilePath(__file__).sibling("openapi.json")
MAX_JSON_BYTES: Final = 1024 * 1024


class ApiError(Exception):
    """
    An error to answer with: its status and its message.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def read_json(request: IRequest) -> dict[str, Any]:
    """
    The request's JSON object body.

    @raise ApiError: not JSON, not an object, or too large.
    """
    raw_type = bytes(request.getHeader(b"content-type") or b"").decode("latin-1")
    content_type = raw_type.split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "send a JSON body (Content-Type: application/json)")
    raw = request.content.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise ApiError(413, f"JSON body over {MAX_JSON_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise ApiError(400, "the body must be a JSON object")
    return document


def dump(request: IRequest, document: Any, status: int = 200) -> bytes:
    """
    Answer with a JSON document.
    """
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(document).encode()


class ApiApp:
    """
    The API's routes; mounted by L{web.app.AdminApp} at C{/api/v1}.
    """

    app = Klein()

    def __init__(self, ctx: WebContext, auth: Auth) -> None:
        self.ctx = ctx
        self.auth = auth

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ApiError)
        return json_error(request, error.status, error.message)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return json_error(request, 404, "no such API route")

    @app.handle_errors(MethodNotAllowed)
    def _not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        return json_error(request, 405, "method not allowed on this route")

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return OPENAPI.getContent()

    @app.route("/lists", methods=["GET"])
    @api
    async def lists(self, request: IRequest, token: Any) -> bytes:
        lists = await self.ctx.users.lists()
        counts = await self.ctx.users.user_counts()
        return dump(
            request,
            {
                "lists": [
                    {
                        "name": item.name,
                        "created_at": item.created_at,
                        "users": counts.get(item.name, 0),
                    }
                    for item in lists
                ]
            },
        )
