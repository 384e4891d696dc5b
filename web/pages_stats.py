"""
Statistics per list and day, with charts.
"""

from __future__ import annotations

from web.routes import PageBase

__all__ = ["StatsPages"]


class StatsPages(PageBase):
    """
    Statistics per list and day, with charts.

    Handler names start with the area's name: every page class shares one
    route table, where a handler's name is its endpoint.
    """
