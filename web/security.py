"""
What every response of the admin app carries, and what every request may
send: security headers on each response (pages, API, errors and 404s alike)
and a bound on request bodies, enforced while the body arrives.
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "MAX_BODY_BYTES",
    "MAX_FORM_BYTES",
    "UPLOAD_PATHS",
    "AdminSite",
    "GuardedRequest",
]

MAX_BODY_BYTES: Final = 4 * 1024 * 1024
"""
The largest request body the admin app reads, on the routes that take an
upload (a list's recipients as CSV, a console send's bodies:
L{UPLOAD_PATHS}); one byte more is
answered C{413} and the connection closed.
"""

MAX_FORM_BYTES: Final = 64 * 1024
"""
The largest body anywhere else (forms, JSON): Twisted parses form bodies on
the reactor thread before any handler (or login check) runs, so an
anonymous client must not make it parse megabytes.
"""

UPLOAD_PATHS: Final = re.compile(
    rb"^/(?:api/v1/)?(?:lists/[^/?#]+/recipients(?:/[a-z]+)?|campaigns(?:/new)?)(?:\?|$)"
)

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

_HEADERS: Final = (
    (b"Content-Security-Policy", CONTENT_SECURITY_POLICY.encode()),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"same-origin"),
    (b"Cross-Origin-Opener-Policy", b"same-origin"),
    (b"Cache-Control", b"no-store"),
)


class GuardedRequest(Request):
    """
    A request that sets the security headers before anything is rendered
    and refuses a body over the site's limit without keeping it.
    """

    _log = Logger()
    max_body: int = MAX_BODY_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._body_seen = 0
        self.body_too_large = False

    def gotLength(self, length: int | None) -> None:
        site = getattr(self.channel, "site", None)
        large = getattr(site, "max_body", MAX_BODY_BYTES)
        small = min(getattr(site, "max_form", MAX_FORM_BYTES), large)
        # The request line is parsed, the request not yet: the channel has it.
        path = getattr(self.channel, "_path", b"")
        self.max_body = large if UPLOAD_PATHS.match(path) else small
        if length is not None and length > self.max_body:
            super().gotLength(0)
            self._refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_seen += len(data)
        if self._body_seen > self.max_body:
            self._refuse_body()
            return
        super().handleContentChunk(data)

    def _refuse_body(self) -> None:
        """
        Answer C{413} at once and close, without reading the rest.
        """
        self.body_too_large = True
        message = b'{"error": "request body over the limit of %d bytes"}' % (self.max_body,)
        head = [b"HTTP/1.1 413 Payload Too Large", b"Content-Type: application/json"]
        head += [name + b": " + value for name, value in _HEADERS]
        head += [b"Content-Length: %d" % (len(message),), b"Connection: close"]
        transport = self.channel.transport
        if transport is not None:
            transport.write(b"\r\n".join(head) + b"\r\n\r\n" + message)
            transport.loseConnection()

    def process(self) -> None:
        if self.body_too_large:
            return
        for name, value in _HEADERS:
            self.setHeader(name, value)
        if not self._decodable():
            self.setResponseCode(400)
            self.setHeader(b"Content-Type", b"application/json")
            self.write(b'{"error": "the path and Host must be UTF-8"}')
            self.finish()
            return
        super().process()

    def _decodable(self) -> bool:
        try:
            unquote_to_bytes(self.path).decode("utf-8")
            (self.getHeader(b"host") or b"").decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    def render(self, resrc: IResource) -> None:
        # Twisted's Request.process names its version in Server; say less.
        self.setHeader(b"Server", b"smtpgw")
        super().render(resrc)


class AdminSite(Site):
    """
    The admin app's site: L{GuardedRequest}s, no server version banner.

    @ivar max_body: see L{MAX_BODY_BYTES}.
    @ivar max_form: see L{MAX_FORM_BYTES}.
    """

    requestFactory = GuardedRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        *,
        max_body: int = MAX_BODY_BYTES,
        max_form: int = MAX_FORM_BYTES,
    ) -> None:
        super().__init__(resource)
        self.max_body = max_body
        self.max_form = max_form
