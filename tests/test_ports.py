"""
Tests for L{smtpgw.ports}: the C{--ports} specification.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgw.ports import (
    DEFAULT_PORTS,
    MAX_PORT,
    PortSpecError,
    format_ports,
    parse_ports,
)


def test_default_spec_has_3980_ports() -> None:
    """
    The default specification is the four low ports plus 1025..5000.
    """
    ports = parse_ports(DEFAULT_PORTS)
    assert len(ports) == 3980
    assert ports[:5] == (23, 25, 26, 587, 1025)
    assert ports[-1] == 5000


def test_sorted_and_deduplicated() -> None:
    """
    Overlapping ranges and repeats give each port once, in order.
    """
    assert parse_ports("30,10-12,11,12-13,10") == (10, 11, 12, 13, 30)


def test_whitespace_is_tolerated() -> None:
    """
    Spaces and tabs around items, numbers and the range dash are ignored.
    """
    assert parse_ports(" 25 ,\t587 , 1025 - 1027 ") == (25, 587, 1025, 1026, 1027)


def test_single_port_range() -> None:
    """
    A range whose ends are equal is that one port.
    """
    assert parse_ports("25-25") == (25,)


def test_limits_of_the_port_range() -> None:
    """
    1 and 65535 are ports; 0 and 65536 are not, and the message names them.
    """
    assert parse_ports("1,65535") == (1, 65535)
    with pytest.raises(PortSpecError, match="port 0 is out of range"):
        parse_ports("0")
    with pytest.raises(PortSpecError, match="port 65536 is out of range"):
        parse_ports("25,65536")
    with pytest.raises(PortSpecError, match="port 70000 is out of range"):
        parse_ports("1-70000")


def test_every_port_is_allowed() -> None:
    """
    There is no limit on the count beyond the 65,535 ports that exist.
    """
    assert len(parse_ports("1-65535")) == MAX_PORT


def test_leading_zeros_are_the_same_port() -> None:
    """
    C{025} is port 25; a long run of zeros does not make a huge number.
    """
    assert parse_ports("025,0000000000000000587") == (25, 587)


def test_huge_number_is_out_of_range_not_a_crash() -> None:
    """
    A number too long for int() to parse by default is reported as a
    PortSpecError.
    """
    with pytest.raises(PortSpecError, match="out of range"):
        parse_ports("9" * 5000)


@pytest.mark.parametrize("spec", ["", "   ", "\t\n"])
def test_empty_spec(spec: str) -> None:
    """
    An empty or blank specification is refused.
    """
    with pytest.raises(PortSpecError, match="empty port list"):
        parse_ports(spec)


@pytest.mark.parametrize(
    ("spec", "position"),
    [("23,,25", 2), (",25", 1), ("25,", 2), ("25, ,26", 2)],
)
def test_empty_item(spec: str, position: int) -> None:
    """
    An empty item is refused and its position given.
    """
    with pytest.raises(PortSpecError, match=f"empty item #{position} in port list"):
        parse_ports(spec)


@pytest.mark.parametrize("text", ["smtp", "25a", "+25", "1_000", "2.5", "\u0662\u0665", "0x19"])
def test_non_numeric(text: str) -> None:
    """
    Only ASCII digits make a port number; the bad text is named.
    """
    with pytest.raises(PortSpecError, match="is not a port number") as raised:
        parse_ports(f"587,{text}")
    assert repr(text) in str(raised.value)


def test_reversed_range() -> None:
    """
    A range written high to low is refused, not silently swapped or emptied.
    """
    with pytest.raises(PortSpecError, match="range '5000-1025' is reversed"):
        parse_ports("25,5000-1025")


@pytest.mark.parametrize("item", ["1-2-3", "-5", "5-", "-", "1--2"])
def test_malformed_range(item: str) -> None:
    """
    A range needs exactly a start and an end.
    """
    with pytest.raises(PortSpecError, match=f"malformed range {item!r}"):
        parse_ports(f"25,{item}")


def test_bad_number_inside_range_names_the_range() -> None:
    """
    A bad end of a range is reported together with the range it is in.
    """
    with pytest.raises(PortSpecError, match="'x' is not a port number \\(in '1-x'\\)"):
        parse_ports("1-x")


def test_port_spec_error_is_a_value_error() -> None:
    """
    Callers that handle ValueError (usage.Options coercers) handle it.
    """
    assert issubclass(PortSpecError, ValueError)


def test_format_compresses_runs() -> None:
    """
    Runs of three or more become ranges; pairs stay as two ports.
    """
    assert format_ports(parse_ports(DEFAULT_PORTS)) == DEFAULT_PORTS
    assert format_ports([5, 1, 2, 3, 9, 10, 2]) == "1-3,5,9,10"
    assert format_ports([]) == ""


def test_format_refuses_impossible_ports() -> None:
    """
    Formatting a port outside 1..65535 is an error rather than a spec that
    would not parse back.
    """
    with pytest.raises(PortSpecError):
        format_ports([0, 25])
    with pytest.raises(PortSpecError):
        format_ports([65536])


port_sets = st.sets(st.integers(min_value=1, max_value=MAX_PORT), min_size=1, max_size=200)


@given(port_sets)
def test_format_then_parse_round_trips(ports: set[int]) -> None:
    """
    Any set of ports survives formatting and parsing.
    """
    assert parse_ports(format_ports(ports)) == tuple(sorted(ports))


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=MAX_PORT),
            st.integers(min_value=0, max_value=50),
            st.sampled_from(["", " ", "\t"]),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_hand_written_specs_parse_to_their_ports(
    items: list[tuple[int, int, str]],
) -> None:
    """
    A specification written as a person would (ranges, single ports,
    whitespace, overlaps) gives exactly the ports it names.
    """
    expected: set[int] = set()
    written: list[str] = []
    for start, width, space in items:
        end = min(start + width, MAX_PORT)
        expected.update(range(start, end + 1))
        written.append(f"{space}{start}{space}-{space}{end}" if width else f"{start}{space}")
    assert parse_ports(",".join(written)) == tuple(sorted(expected))


@given(st.text())
def test_arbitrary_text_only_raises_port_spec_error(text: str) -> None:
    """
    Whatever the input, the parser returns valid ports or raises
    PortSpecError, never another exception.
    """
    try:
        ports = parse_ports(text)
    except PortSpecError:
        return
    assert ports
    assert all(1 <= port <= MAX_PORT for port in ports)
    assert list(ports) == sorted(set(ports))


@given(st.text(alphabet="0123456789,- \t", max_size=40))
def test_spec_like_text_only_raises_port_spec_error(text: str) -> None:
    """
    Text made only of the characters of a specification hits the interesting
    error paths; still only PortSpecError.
    """
    try:
        ports = parse_ports(text)
    except PortSpecError:
        return
    assert all(1 <= port <= MAX_PORT for port in ports)
