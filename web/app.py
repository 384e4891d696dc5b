"""
The admin app as a whole: every page class, the API mounted at
C{/api/v1}, and the site that serves them with the security headers.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from smtpgw.database import StoreError
from web.api import ApiApp
from web.auth import json_error
from web.context import WebContext
from web.pages_alerts import AlertPages
from web.pages_campaigns import CampaignPages
from web.pages_core import CorePages
from web.pages_lists import ListPages
from web.pages_queue import QueuePages
from web.pages_stats import StatsPages
from web.pages_tokens import TokenPages
from web.routes import pages
from web.security import MAX_BODY_BYTES, AdminSite

__all__ = ["AdminApp", "admin_site"]

_log = Logger()

# Werkzeug would redirect "/a//b" and "/a/" with a Location built from the
# request's Host header: answer such paths as they are instead.
for _map in (pages.url_map, ApiApp.app.url_map):
    _map.strict_slashes = False
    _map.merge_slashes = False


class AdminApp(
    ListPages, CampaignPages, QueuePages, AlertPages, StatsPages, TokenPages, CorePages
):
    """
    Every page of the admin app, and the API.
    """

    app = pages

    def __init__(self, ctx: WebContext) -> None:
        super().__init__(ctx)
        self.api = ApiApp(ctx, self.auth)

    @pages.route("/api/v1/", branch=True)
    def api_branch(self, request: IRequest) -> IResource:
        return self.api.app.resource()

    @pages.handle_errors(NotFound)
    async def _not_found(self, request: IRequest, failure: Any) -> bytes:
        # A path the API's branch did not take (a segment with a newline).
        if bytes(request.path).startswith(b"/api/"):
            return json_error(request, 404, "no such API route")
        visitor = await self.auth.visitor(request)
        return await self.refuse(request, visitor, 404, "There is no such page.")

    @pages.handle_errors(MethodNotAllowed)
    def _not_allowed(self, request: IRequest, failure: Any) -> bytes:
        return json_error(request, 405, "method not allowed")

    @pages.handle_errors(StoreError)
    async def _store_failed(self, request: IRequest, failure: Any) -> bytes:
        _log.warn(
            "admin page {path} could not use the database: {error}",
            path=request.path,
            error=failure.getErrorMessage(),
        )
        return await self.refuse(
            request,
            None,
            503,
            "The gateway's database cannot be used right now: try again in a moment.",
        )

    @pages.handle_errors(Exception)
    async def _failed(self, request: IRequest, failure: Any) -> bytes:
        _log.failure("admin page {path} failed", failure, path=request.path)
        return await self.refuse(
            request, None, 500, "Something went wrong; the gateway's log says what."
        )

    def resource(self) -> IResource:
        """
        The root resource of the app.
        """
        return self.app.resource()


def admin_site(ctx: WebContext, *, max_body: int = MAX_BODY_BYTES) -> AdminSite:
    """
    The site to listen with on C{--admin}.
    """
    return AdminSite(AdminApp(ctx).resource(), max_body=max_body)
