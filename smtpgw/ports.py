"""
The C{--ports} option: a list of TCP ports and ranges such as
C{"23,25,26,587,1025-5000"}.

Parsing is strict so that a typo in a service file is reported at start with
the piece that is wrong, instead of silently listening somewhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "DEFAULT_PORTS",
    "MAX_PORT",
    "MIN_PORT",
    "PortSpecError",
    "format_ports",
    "parse_ports",
]

DEFAULT_PORTS = "23,25,26,587,1025-5000"
"""The ports the gateway listens on unless told otherwise (3,980 ports)."""

MIN_PORT = 1
MAX_PORT = 65535

# ASCII digits only: int() alone would also take "+5", "1_000" and other
# scripts' digits, none of which belong in a port list.
_DIGITS = re.compile(r"[0-9]+")


class PortSpecError(ValueError):
    """
    A port specification cannot be parsed; the message names the bad piece.
    """


def _port(text: str, item: str) -> int:
    """
    Convert one port number of C{item}.

    @param text: the number, already stripped of whitespace.
    @param item: the whole comma-separated item, for the message.
    @return: the port.
    @raise PortSpecError: when C{text} is not a number in 1..65535.
    """
    if not _DIGITS.fullmatch(text):
        raise PortSpecError(f"{text!r} is not a port number (in {item!r})")
    # Bounding the length first keeps int() away from its huge-number limit.
    significant = text.lstrip("0")
    if len(significant) > len(str(MAX_PORT)) or not MIN_PORT <= int(text) <= MAX_PORT:
        raise PortSpecError(f"port {text} is out of range {MIN_PORT}-{MAX_PORT} (in {item!r})")
    return int(text)


def _item(item: str, position: int, spec: str) -> range:
    """
    Parse one comma-separated item: a port or an inclusive range C{A-B}.

    @param item: the item as written.
    @param position: its 1-based position in C{spec}, for the message.
    @param spec: the whole specification, for the message.
    @return: the ports of the item.
    @raise PortSpecError: when the item is malformed.
    """
    stripped = item.strip()
    if not stripped:
        raise PortSpecError(f"empty item #{position} in port list {spec!r}")
    if "-" not in stripped:
        port = _port(stripped, stripped)
        return range(port, port + 1)
    parts = [part.strip() for part in stripped.split("-")]
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise PortSpecError(f"malformed range {stripped!r}: expected START-END")
    start, end = _port(parts[0], stripped), _port(parts[1], stripped)
    if start > end:
        raise PortSpecError(f"range {stripped!r} is reversed: {start} is above {end}")
    return range(start, end + 1)


def parse_ports(spec: str) -> tuple[int, ...]:
    """
    Parse a port specification.

    @param spec: comma-separated ports and inclusive ranges, e.g.
        C{"23,25,26,587,1025-5000"}; whitespace around items and numbers is
        ignored; overlaps and repeats are allowed.
    @return: the ports, sorted, each once.
    @raise PortSpecError: naming the bad piece when C{spec} is empty or an item
        is empty, not a number, out of 1..65535, or a malformed or reversed
        range.
    """
    if not spec.strip():
        raise PortSpecError("empty port list: give at least one port, e.g. 25 or 1025-5000")
    ports: set[int] = set()
    for position, item in enumerate(spec.split(","), start=1):
        ports.update(_item(item, position, spec))
    return tuple(sorted(ports))


def format_ports(ports: Iterable[int]) -> str:
    """
    Render ports compactly, the inverse of L{parse_ports}.

    @param ports: port numbers in any order, repeats allowed.
    @return: e.g. C{"23,25,26,587,1025-5000"}: runs of three or more
        consecutive ports become a range; C{""} for no ports.
    @raise PortSpecError: when a port is outside 1..65535.
    """
    ordered = sorted(set(ports))
    for port in ordered:
        if not MIN_PORT <= port <= MAX_PORT:
            raise PortSpecError(f"port {port} is out of range {MIN_PORT}-{MAX_PORT}")
    pieces: list[str] = []
    index = 0
    while index < len(ordered):
        end = index
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        if end - index >= 2:
            pieces.append(f"{ordered[index]}-{ordered[end]}")
        else:
            pieces.extend(str(port) for port in ordered[index : end + 1])
        index = end + 1
    return ",".join(pieces)
