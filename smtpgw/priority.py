"""
Priority resolution: which priority does a submitted message ask for?

PRODUCT section 2 fixes the sources and their order: the C{X-SMTPAPI} JSON
header's C{Priority}; the C{MT-PRIORITY=} MAIL parameter (RFC 6710); the
C{MT-Priority:} header (RFC 6758); C{X-Priority:}; C{Importance:} then
C{Priority:} (RFC 2156 vocabulary). The first source with a valid value wins;
invalid values are ignored so that a sloppy header never costs a message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence

from smtpgw.model import Priority

__all__ = [
    "MT_PRIORITY_MAX",
    "MT_PRIORITY_MIN",
    "effective_priority",
    "message_priority",
    "mt_priority_to_priority",
    "parse_mt_priority_param",
]

MT_PRIORITY_MIN = -9
MT_PRIORITY_MAX = 9

# RFC 6710 values are one digit with an optional sign; "+0"/"-0" are read
# as 0 rather than refused.
_MT_PRIORITY = re.compile(r"[+-]?[0-9]")
# "1", "1 (Highest)", "2(High)", "3 Normal": a single digit 1..5 on its own.
_X_PRIORITY = re.compile(r"\s*([1-5])(?:[\s(].*)?", re.DOTALL)
_WORDS = {
    "high": Priority.HIGH,
    "urgent": Priority.HIGH,
    "normal": Priority.NORMAL,
    "low": Priority.LOW,
    "non-urgent": Priority.LOW,
}


def mt_priority_to_priority(value: int) -> Priority:
    """
    Map an RFC 6710 priority (-9..9, higher is more urgent) to ours.

    @param value: the MT-PRIORITY value.
    @return: 4..9 -> 1, 1..3 -> 2, 0 -> 3, -3..-1 -> 4, -9..-4 -> 5.
    @raise ValueError: outside -9..9.
    """
    if not MT_PRIORITY_MIN <= value <= MT_PRIORITY_MAX:
        raise ValueError(f"MT-PRIORITY {value} is outside -9..9")
    if value >= 4:
        return Priority.VERY_HIGH
    if value >= 1:
        return Priority.HIGH
    if value == 0:
        return Priority.NORMAL
    if value >= -3:
        return Priority.LOW
    return Priority.VERY_LOW


def _mt_priority_value(text: str) -> int:
    stripped = text.strip()
    if not _MT_PRIORITY.fullmatch(stripped):
        raise ValueError(f"MT-PRIORITY value {text[:20]!r} is not an integer in -9..9")
    return int(stripped)


def parse_mt_priority_param(text: str) -> Priority:
    """
    Read the value of the C{MT-PRIORITY=} MAIL parameter.

    @param text: the value, e.g. C{"-3"}, C{"+4"}, C{"0"}.
    @return: the mapped priority.
    @raise ValueError: when it is not a signed single digit (the session
        answers 501).
    """
    return mt_priority_to_priority(_mt_priority_value(text))


def _headers_named(headers: Sequence[tuple[str, str]], name: str) -> Iterator[str]:
    for header_name, value in headers:
        if header_name.strip().lower() == name:
            yield value


def _from_smtpapi(value: str) -> Priority | None:
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    raw = data.get("Priority")
    if raw is None:
        raw = next((v for k, v in data.items() if k.lower() == "priority"), None)
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        text = raw.strip()
        if not (len(text) == 1 and text in "12345"):
            return None
        raw = int(text)
    if isinstance(raw, int) and 1 <= raw <= 5:
        return Priority(raw)
    return None


def _from_mt_priority_header(value: str) -> Priority | None:
    # RFC 6758 allows CFWS around the value.
    text = re.sub(r"\([^()]*\)", " ", value)
    try:
        return mt_priority_to_priority(_mt_priority_value(text))
    except ValueError:
        return None


def _from_x_priority(value: str) -> Priority | None:
    match = _X_PRIORITY.fullmatch(value)
    return Priority(int(match.group(1))) if match else None


def _from_word(value: str) -> Priority | None:
    text = re.sub(r"\([^()]*\)", " ", value).strip().lower()
    return _WORDS.get(text)


def message_priority(
    headers: Sequence[tuple[str, str]], mt_priority_param: Priority | None
) -> Priority | None:
    """
    The priority a message asks for, from the first source that gives a valid
    one, in the order of PRODUCT section 2.

    Within one header source, the first occurrence with a valid value counts.

    @param headers: the message's unfolded header fields as C{(name, value)};
        names are matched case-insensitively.
    @param mt_priority_param: the already parsed C{MT-PRIORITY=} MAIL
        parameter, or C{None} when the client sent none.
    @return: the requested priority, or C{None} when the message names none.
    """
    # Most messages carry none of these fields: look at each name once.
    present = {name.strip().lower() for name, _value in headers}
    if "x-smtpapi" in present:
        for value in _headers_named(headers, "x-smtpapi"):
            found = _from_smtpapi(value)
            if found is not None:
                return found
    if mt_priority_param is not None:
        return mt_priority_param
    for name, parse in _SOURCES:
        if name in present:
            for value in _headers_named(headers, name):
                found = parse(value)
                if found is not None:
                    return found
    return None


#: The header fields that name a priority, after X-SMTPAPI and the MAIL
#: parameter, in the order of PRODUCT section 2, with their readers.
_SOURCES: tuple[tuple[str, Callable[[str], Priority | None]], ...] = (
    ("mt-priority", _from_mt_priority_header),
    ("x-priority", _from_x_priority),
    ("importance", _from_word),
    ("priority", _from_word),
)


def effective_priority(user_default: Priority, message: Priority | None) -> Priority:
    """
    The priority a message is queued and relayed with: the higher (numerically
    lower) of the user's default and the message's own.

    @param user_default: the SMTP+ user's C{priority}.
    @param message: what L{message_priority} found, if anything.
    @return: the effective priority.
    """
    if message is None:
        return Priority(user_default)
    return Priority(min(user_default, message))
