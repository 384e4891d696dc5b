"""
Tests for L{smtpgw.priority}: the priority a message asks for, and the one it
gets.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgw.model import Priority
from smtpgw.priority import (
    effective_priority,
    message_priority,
    mt_priority_to_priority,
    parse_mt_priority_param,
)

P = Priority


class TestMtPriorityMapping:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (9, P.VERY_HIGH),
            (4, P.VERY_HIGH),
            (3, P.HIGH),
            (1, P.HIGH),
            (0, P.NORMAL),
            (-1, P.LOW),
            (-3, P.LOW),
            (-4, P.VERY_LOW),
            (-9, P.VERY_LOW),
        ],
    )
    def test_boundaries(self, value: int, expected: Priority) -> None:
        """
        RFC 6710 values map at the edges of each band: 4..9 -> 1, 1..3 -> 2,
        0 -> 3, -3..-1 -> 4, -9..-4 -> 5.
        """
        assert mt_priority_to_priority(value) is expected

    @pytest.mark.parametrize("value", [10, -10, 100, -100])
    def test_out_of_range(self, value: int) -> None:
        """
        Values past -9..9 are refused.
        """
        with pytest.raises(ValueError, match="outside"):
            mt_priority_to_priority(value)

    @given(st.integers(min_value=-9, max_value=9))
    def test_monotonic(self, value: int) -> None:
        """
        A more urgent MT-PRIORITY never maps to a lower priority.
        """
        if value < 9:
            assert mt_priority_to_priority(value + 1) <= mt_priority_to_priority(value)


class TestParseMtPriorityParam:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("-9", P.VERY_LOW),
            ("-4", P.VERY_LOW),
            ("-3", P.LOW),
            ("-1", P.LOW),
            ("0", P.NORMAL),
            ("+0", P.NORMAL),
            ("1", P.HIGH),
            ("+3", P.HIGH),
            ("3", P.HIGH),
            ("+4", P.VERY_HIGH),
            ("9", P.VERY_HIGH),
        ],
    )
    def test_values(self, text: str, expected: Priority) -> None:
        """
        Signed and unsigned single digits are read and mapped.
        """
        assert parse_mt_priority_param(text) == expected

    @pytest.mark.parametrize(
        "text", ["", "10", "-10", "+10", "09", "1.0", "one", "--1", "+-1", "\u0663", "0x1", "+"]
    )
    def test_bad_syntax(self, text: str) -> None:
        """
        Anything but an optional sign and one ASCII digit is a ValueError
        (the session answers 501); an Arabic-Indic digit is not a digit here.
        """
        with pytest.raises(ValueError, match="MT-PRIORITY"):
            parse_mt_priority_param(text)

    @given(st.text(max_size=10))
    def test_never_raises_anything_but_value_error(self, text: str) -> None:
        """
        Arbitrary text gives a Priority or a ValueError.
        """
        try:
            result = parse_mt_priority_param(text)
        except ValueError:
            return
        assert isinstance(result, Priority)


def smtpapi(value: object) -> tuple[str, str]:
    return ("X-SMTPAPI", json.dumps({"Priority": value}))


class TestMessagePrioritySources:
    def test_none_when_no_source(self) -> None:
        """
        A message without any priority source asks for nothing.
        """
        assert message_priority([("Subject", "hi"), ("From", "a@example.com")], None) is None
        assert message_priority([], None) is None

    @pytest.mark.parametrize(
        ("value", "expected"), [(1, P.VERY_HIGH), (5, P.VERY_LOW), ("2", P.HIGH), (" 4 ", P.LOW)]
    )
    def test_smtpapi(self, value: object, expected: Priority) -> None:
        """
        X-SMTPAPI's Priority is read as an int 1..5 or a numeric string.
        """
        assert message_priority([smtpapi(value)], None) is expected

    def test_smtpapi_key_case(self) -> None:
        """
        The X-SMTPAPI header name and its "Priority" key match in any case.
        """
        assert message_priority([("x-smtpapi", '{"priority": 2}')], None) is P.HIGH

    def test_smtpapi_other_fields_ignored(self) -> None:
        """
        An X-SMTPAPI header without Priority is no source.
        """
        header = ("X-SMTPAPI", '{"category": ["news"], "unique_args": {"Priority": 1}}')
        assert message_priority([header], None) is None

    @pytest.mark.parametrize(
        "raw",
        [
            "not json",
            "{",
            "[1]",
            "null",
            '"Priority"',
            '{"Priority": 0}',
            '{"Priority": 6}',
            '{"Priority": -1}',
            '{"Priority": 2.0}',
            '{"Priority": true}',
            '{"Priority": "high"}',
            '{"Priority": "12"}',
            '{"Priority": null}',
            '{"Priority": [1]}',
            "[" * 100_000,
            '{"Priority": ' + "9" * 5000 + "}",
        ],
    )
    def test_smtpapi_invalid_is_ignored(self, raw: str) -> None:
        """
        Invalid JSON, a wrong type, an out-of-range value, absurd nesting or
        an enormous number make the X-SMTPAPI source count as absent: the next
        source decides.
        """
        headers = [("X-SMTPAPI", raw), ("X-Priority", "5")]
        assert message_priority(headers, None) is P.VERY_LOW
        assert message_priority(headers, P.HIGH) is P.HIGH

    def test_mt_priority_param(self) -> None:
        """
        The MAIL parameter counts when no X-SMTPAPI priority is given.
        """
        assert message_priority([("Subject", "x")], P.VERY_LOW) is P.VERY_LOW

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("4", P.VERY_HIGH),
            ("+4", P.VERY_HIGH),
            (" -3 ", P.LOW),
            ("0 (routine)", P.NORMAL),
            ("-9", P.VERY_LOW),
        ],
    )
    def test_mt_priority_header(self, value: str, expected: Priority) -> None:
        """
        The RFC 6758 MT-Priority header is mapped like the MAIL parameter,
        with whitespace and comments around the value allowed.
        """
        assert message_priority([("MT-Priority", value)], None) is expected

    @pytest.mark.parametrize("value", ["10", "-10", "high", ""])
    def test_mt_priority_header_invalid(self, value: str) -> None:
        """
        An MT-Priority header out of -9..9 or not a number is ignored.
        """
        assert message_priority([("MT-Priority", value), ("X-Priority", "2")], None) is P.HIGH

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("1", P.VERY_HIGH),
            ("1 (Highest)", P.VERY_HIGH),
            ("2 (High)", P.HIGH),
            ("3(Normal)", P.NORMAL),
            (" 4 ", P.LOW),
            ("5 (Lowest)", P.VERY_LOW),
        ],
    )
    def test_x_priority(self, value: str, expected: Priority) -> None:
        """
        X-Priority is a digit 1..5, optionally followed by a label.
        """
        assert message_priority([("X-Priority", value)], None) is expected

    @pytest.mark.parametrize("value", ["0", "6", "12", "1.5", "Highest", "", "-1"])
    def test_x_priority_invalid(self, value: str) -> None:
        """
        X-Priority values that are not one digit 1..5 are ignored.
        """
        assert message_priority([("X-Priority", value)], None) is None

    @pytest.mark.parametrize(
        ("name", "value", "expected"),
        [
            ("Importance", "high", P.HIGH),
            ("Importance", "High", P.HIGH),
            ("Importance", "normal", P.NORMAL),
            ("Importance", "LOW", P.LOW),
            ("Priority", "urgent", P.HIGH),
            ("Priority", "normal", P.NORMAL),
            ("Priority", "non-urgent", P.LOW),
            ("priority", " Urgent ", P.HIGH),
        ],
    )
    def test_importance_and_priority(self, name: str, value: str, expected: Priority) -> None:
        """
        Importance and Priority words: high/urgent -> 2, normal -> 3,
        low/non-urgent -> 4.
        """
        assert message_priority([(name, value)], None) is expected

    @pytest.mark.parametrize("value", ["very high", "1", "", "highest"])
    def test_importance_invalid(self, value: str) -> None:
        """
        Unknown Importance words are ignored.
        """
        assert message_priority([("Importance", value)], None) is None


class TestMessagePriorityOrder:
    ALL = [
        ("Priority", "non-urgent"),
        ("Importance", "low"),
        ("X-Priority", "5"),
        ("MT-Priority", "-1"),
        ("X-SMTPAPI", '{"Priority": 1}'),
    ]

    def test_smtpapi_first(self) -> None:
        """
        X-SMTPAPI wins over every other source, the MAIL parameter included,
        wherever it is among the headers.
        """
        assert message_priority(self.ALL, P.HIGH) is P.VERY_HIGH

    def test_param_before_headers(self) -> None:
        """
        Without X-SMTPAPI, the MAIL parameter wins over the headers.
        """
        assert message_priority(self.ALL[:4], P.HIGH) is P.HIGH

    def test_mt_priority_header_before_x_priority(self) -> None:
        """
        Then MT-Priority, then X-Priority, then Importance, then Priority.
        """
        assert message_priority(self.ALL[:4], None) is P.LOW
        assert message_priority(self.ALL[:3], None) is P.VERY_LOW
        assert message_priority([("Priority", "urgent"), ("Importance", "low")], None) is P.LOW
        assert message_priority(self.ALL[:1], None) is P.LOW

    def test_first_valid_occurrence_of_a_header(self) -> None:
        """
        Within one header source, the first valid occurrence counts; invalid
        ones before it are skipped.
        """
        headers = [("X-Priority", "bogus"), ("X-Priority", "2"), ("X-Priority", "4")]
        assert message_priority(headers, None) is P.HIGH
        headers = [("X-SMTPAPI", "{}"), ("X-SMTPAPI", '{"Priority": 5}')]
        assert message_priority(headers, None) is P.VERY_LOW

    def test_invalid_sources_fall_through(self) -> None:
        """
        When every earlier source is invalid, a later valid one decides.
        """
        headers = [
            ("X-SMTPAPI", "nope"),
            ("MT-Priority", "11"),
            ("X-Priority", "7"),
            ("Importance", "whatever"),
            ("Priority", "non-urgent"),
        ]
        assert message_priority(headers, None) is P.LOW

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(
                    ["X-SMTPAPI", "MT-Priority", "X-Priority", "Importance", "Priority", "Other"]
                ),
                st.text(max_size=40),
            ),
            max_size=8,
        ),
        st.none() | st.sampled_from(list(Priority)),
    )
    def test_never_raises(self, headers: list[tuple[str, str]], param: Priority | None) -> None:
        """
        Arbitrary header values give a Priority or None, never an exception.
        """
        result = message_priority(headers, param)
        assert result is None or isinstance(result, Priority)
        if param is not None and not any(n == "X-SMTPAPI" for n, _ in headers):
            assert result is param


class TestEffectivePriority:
    @pytest.mark.parametrize(
        ("default", "message", "expected"),
        [
            (P.NORMAL, None, P.NORMAL),
            (P.NORMAL, P.VERY_HIGH, P.VERY_HIGH),
            (P.NORMAL, P.VERY_LOW, P.NORMAL),
            (P.HIGH, P.LOW, P.HIGH),
            (P.VERY_LOW, P.VERY_LOW, P.VERY_LOW),
        ],
    )
    def test_higher_of_the_two(
        self, default: Priority, message: Priority | None, expected: Priority
    ) -> None:
        """
        The effective priority is the numerically lower of the user's default
        and the message's; without a message priority, the default.
        """
        assert effective_priority(default, message) is expected
