"""
Rendering pages: one layout (C{templates/layout.xml}) around content built
with L{twisted.web.template.tags}, which escapes every text and attribute.
Never build HTML from strings.

Inline C{style} attributes and inline scripts are refused by the
content security policy (L{web.security}): use the stylesheet's classes,
and C{<progress>} or SVG attributes for sizes.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from typing import Any, Final

from twisted.python.filepath import FilePath
from twisted.web.iweb import IRequest
from twisted.web.template import (
    Element,
    Tag,
    XMLFile,
    flattenString,
    renderer,
    tags,
)

from web.auth import Visitor

__all__ = [
    "NAV",
    "Notice",
    "csrf_field",
    "field",
    "format_time",
    "post_button",
    "render_page",
    "table",
]

TEMPLATES: Final = FilePath(__file__).sibling("templates")

NAV: Final = (
    ("lists", "/lists", "Lists"),
    ("campaigns", "/campaigns", "Console sends"),
    ("queue", "/queue", "Queue"),
    ("alerts", "/alerts", "Alerts"),
    ("stats", "/stats", "Statistics"),
    ("tokens", "/tokens", "API tokens"),
)

Notice = tuple[str, str]
"""A notice: its kind (C{info}, C{good} or C{bad}) and its text."""


def csrf_field(visitor: Visitor) -> Tag:
    """
    The hidden field every form of a session carries.
    """
    return tags.input(type="hidden", name="csrf", value=visitor.csrf)


def post_button(
    visitor: Visitor, action: str, label: str, *, css: str = "small secondary", **hidden: str
) -> Tag:
    """
    A one-button form that POSTs to C{action} (with the CSRF token).
    """
    form = tags.form(method="post", action=action, class_="inline")(csrf_field(visitor))
    for name, value in hidden.items():
        form(tags.input(type="hidden", name=name, value=value))
    return form(tags.button(label, type="submit", class_=css))


def field(
    name: str,
    label: str,
    control: Tag | None = None,
    *,
    value: str = "",
    error: str | None = None,
    hint: str | None = None,
    type: str = "text",
    **attributes: str,
) -> Tag:
    """
    A labelled form field, with its error right beside it.

    @param control: the input element; a text input named C{name} when
        L{None}.
    """
    if control is None:
        control = tags.input(type=type, name=name, id=f"f-{name}", value=value, **attributes)
    wrapper = tags.div(class_="field invalid" if error else "field")(
        tags.label(label, for_=f"f-{name}"), control
    )
    if hint:
        wrapper(tags.div(hint, class_="hint"))
    if error:
        wrapper(tags.div(error, class_="error", id=f"error-{name}", role="alert"))
    return wrapper


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, id: str = "") -> Tag:
    """
    A table in a scrolling wrapper; cells may be text or tags.
    """
    body = tags.tbody()
    count = 0
    for row in rows:
        count += 1
        body(tags.tr(*[tags.td(cell) for cell in row]))
    if count == 0:
        body(tags.tr(tags.td("Nothing here yet.", colspan=str(len(headers)), class_="muted")))
    attrs = {"id": id} if id else {}
    return tags.div(class_="table-wrap")(
        tags.table(**attrs)(tags.thead(tags.tr(*[tags.th(h) for h in headers])), body)
    )


def format_time(when: float | None, *, empty: str = "—") -> str:
    """
    A time as the pages show it: UTC, to the second.
    """
    if when is None:
        return empty
    moment = datetime.datetime.fromtimestamp(when, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


class _Layout(Element):
    loader = XMLFile(TEMPLATES.child("layout.xml"))

    def __init__(
        self,
        title: str,
        content: Any,
        visitor: Visitor | None,
        active: str | None,
        notices: Sequence[Notice],
    ) -> None:
        super().__init__()
        self._title = title
        self._content = content
        self._visitor = visitor
        self._active = active
        self._notices = notices

    @renderer
    def nav(self, request: IRequest, tag: Tag) -> Tag:
        if self._visitor is None:
            return tag
        for key, href, label in NAV:
            link = tags.a(label, href=href)
            if key == self._active:
                link(class_="active", **{"aria-current": "page"})
            tag(link)
        return tag

    @renderer
    def account(self, request: IRequest, tag: Tag) -> Tag:
        if self._visitor is None:
            return tag
        return tag(
            tags.span(self._visitor.admin, class_="who"),
            post_button(self._visitor, "/logout", "Log out", css="small"),
        )

    @renderer
    def notices(self, request: IRequest, tag: Tag) -> Tag:
        for kind, text in self._notices:
            tag(tags.div(text, class_=f"notice {kind}", role="status"))
        return tag

    @renderer
    def title(self, request: IRequest, tag: Tag) -> Tag:
        return tag(self._title)

    @renderer
    def content(self, request: IRequest, tag: Tag) -> Any:
        return self._content


async def render_page(
    request: IRequest,
    title: str,
    content: Any,
    *,
    visitor: Visitor | None,
    active: str | None = None,
    notices: Sequence[Notice] = (),
    status: int = 200,
) -> bytes:
    """
    A whole page: the layout around C{content}.
    """
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    layout = _Layout(title, content, visitor, active, notices)
    body: bytes = await flattenString(request, layout)
    return body
