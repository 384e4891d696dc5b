"""
The queue: messages, stop and start, hold, release, cancel, re-prioritize, why waiting.
"""

from __future__ import annotations

from web.routes import PageBase

__all__ = ["QueuePages"]


class QueuePages(PageBase):
    """
    The queue: messages, stop and start, hold, release, cancel, re-prioritize, why waiting.

    Handler names start with the area's name: every page class shares one
    route table, where a handler's name is its endpoint.
    """
