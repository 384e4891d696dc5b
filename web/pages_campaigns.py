"""
Console sends and recipients of lists.
"""

from __future__ import annotations

from web.routes import PageBase

__all__ = ["CampaignPages"]


class CampaignPages(PageBase):
    """
    Console sends and recipients of lists.

    Handler names start with the area's name: every page class shares one
    route table, where a handler's name is its endpoint.
    """
