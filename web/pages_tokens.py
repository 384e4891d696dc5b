"""
API tokens: made once, listed, revoked.
"""

from __future__ import annotations

from web.routes import PageBase

__all__ = ["TokenPages"]


class TokenPages(PageBase):
    """
    API tokens: made once, listed, revoked.

    Handler names start with the area's name: every page class shares one
    route table, where a handler's name is its endpoint.
    """
