"""
The alert center: filtered by list and type, marked read.
"""

from __future__ import annotations

from web.routes import PageBase

__all__ = ["AlertPages"]


class AlertPages(PageBase):
    """
    The alert center: filtered by list and type, marked read.

    Handler names start with the area's name: every page class shares one
    route table, where a handler's name is its endpoint.
    """
