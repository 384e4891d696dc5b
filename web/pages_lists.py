"""
Lists and their SMTP+ settings, SMTP+ users: add, edit, regenerate the password, delete.
"""

from __future__ import annotations

from web.routes import PageBase

__all__ = ["ListPages"]


class ListPages(PageBase):
    """
    Lists and their SMTP+ settings, SMTP+ users: add, edit, regenerate the password, delete.

    Handler names start with the area's name: every page class shares one
    route table, where a handler's name is its endpoint.
    """
