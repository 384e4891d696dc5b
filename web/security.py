"""
What every response of the admin app carries, and what every request may
send: security headers on each response (pages, API, errors and 404s alike)
and a bound on request bodies, enforced while the body arrives.
"""

from __future__ import annotations

from typing import Any, Final

from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "MAX_BODY_BYTES",
    "AdminSite",
    "GuardedRequest",
]

MAX_BODY_BYTES: Final = 4 * 1024 * 1024
"""
The largest request body the admin app reads (a recipients CSV is the
largest thing anyone sends); one byte more is answered C{413}.
"""

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
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
        self.max_body = getattr(site, "max_body", MAX_BODY_BYTES)
        if length is not None and length > self.max_body:
            self.body_too_large = True
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_seen += len(data)
        if self._body_seen > self.max_body:
            self.body_too_large = True
        if self.body_too_large:
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        for name, value in _HEADERS:
            self.setHeader(name, value)
        if self.body_too_large:
            self.setResponseCode(413)
            self.setHeader(b"Content-Type", b"application/json")
            self.setHeader(b"Connection", b"close")
            self.write(b'{"error": "request body over the limit of %d bytes"}' % (self.max_body,))
            self.finish()
            return
        super().process()

    def render(self, resrc: IResource) -> None:
        # Twisted's Request.process names its version in Server; say less.
        self.setHeader(b"Server", b"smtpgw")
        super().render(resrc)


class AdminSite(Site):
    """
    The admin app's site: L{GuardedRequest}s, no server version banner.

    @ivar max_body: see L{MAX_BODY_BYTES}.
    """

    requestFactory = GuardedRequest
    displayTracebacks = False

    def __init__(self, resource: IResource, *, max_body: int = MAX_BODY_BYTES) -> None:
        super().__init__(resource)
        self.max_body = max_body
