"""
Tests for L{smtpgw.validation}: what an admin may enter for lists and users.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgw.model import Enforcement, Priority
from smtpgw.validation import (
    MAX_AUTHORIZED_ENTRIES,
    MAX_NOTES_LENGTH,
    ValidationError,
    normalize_domain,
    parse_domains,
    parse_senders,
    validate_active,
    validate_enforcement,
    validate_list_name,
    validate_notes,
    validate_priority,
)


@pytest.mark.parametrize("name", ["a", "news", "news-letter_2.eu", "0list", "a" * 64])
def test_valid_list_names(name: str) -> None:
    """
    List names of 1 to 64 of C{a-z0-9._-}, starting with a letter or digit.
    """
    assert validate_list_name(name) == name


@pytest.mark.parametrize("name", ["", "a" * 65, "News", "-news", ".x", "a b", "a/b", "é"])
def test_invalid_list_names(name: str) -> None:
    """
    Empty, too long (65), upper-case, leading punctuation, spaces and
    slashes are refused, for the field C{name}.
    """
    with pytest.raises(ValidationError) as e:
        validate_list_name(name)
    assert e.value.field == "name"
    assert repr(name) in e.value.message


def test_validation_error_is_a_value_error_naming_the_field() -> None:
    """
    Callers that only know C{ValueError} still catch it; its text names the
    field and the reason.
    """
    error = ValidationError("priority", "bad")
    assert isinstance(error, ValueError)
    assert str(error) == "priority: bad"


def test_domains_are_split_trimmed_lowercased_and_deduplicated() -> None:
    """
    C{;}-separated entries, spaces around them ignored, compared
    case-insensitively, kept in order once each; second and third level
    domains both allowed.
    """
    assert parse_domains(" Example.com ; marketing.example.com;EXAMPLE.COM ") == (
        "example.com",
        "marketing.example.com",
    )


@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_domains_mean_none(blank: str) -> None:
    """
    An empty field authorizes no domain.
    """
    assert parse_domains(blank) == ()


def test_domains_may_be_given_as_a_sequence() -> None:
    """
    The JSON API gives an array; it is checked the same way.
    """
    assert parse_domains(["a.example", "B.example"]) == ("a.example", "b.example")
    with pytest.raises(ValidationError, match=re.escape("'a;b.example'")):
        parse_domains(["a;b.example"])


def test_internationalized_domain_is_stored_as_a_labels() -> None:
    """
    A Unicode domain is accepted and kept in the form it has on the wire.
    """
    assert parse_domains("Bücher.example") == ("xn--bcher-kva.example",)
    assert parse_domains("xn--bcher-kva.example") == ("xn--bcher-kva.example",)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a.com;;b.com", "entry 3 is empty"),
        ("a.com;", "entry 3 is empty"),
        ("a.com; ;b.com", "entry 3 is empty"),
        ("localhost", "'localhost' needs at least two labels"),
        ("a..com", "'a..com' has an empty label"),
        ("-a.com", "label '-a'"),
        ("a-.com", "label 'a-'"),
        ("a_b.com", "label 'a_b'"),
        ("exa mple.com", "label 'exa mple'"),
        ("example.com.", "ends with a dot"),
        ("192.0.2.1", "IP address"),
        ("user@example.com", "label 'user@example'"),
        ("xn--zz.com", "internationalized"),
        ("a" * 64 + ".com", "label longer than 63"),
        (".".join(["a" * 63] * 4), "longer than 253"),
    ],
)
def test_bad_domains_are_refused_naming_the_entry(text: str, reason: str) -> None:
    """
    Each bad entry gets a one-line message that names it and says why.
    """
    with pytest.raises(ValidationError) as e:
        parse_domains("ok.example;" + text)
    assert e.value.field == "authorized_domains"
    assert reason in e.value.message
    assert "\n" not in str(e.value)


def test_domain_limits_at_and_past_the_limit() -> None:
    """
    A 63-character label and a 253-character domain pass; one more fails.
    """
    assert normalize_domain("a" * 63 + ".com") == "a" * 63 + ".com"
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(longest) == 253
    assert normalize_domain(longest) == longest
    with pytest.raises(ValueError, match="253"):
        normalize_domain(longest + "d")


def test_number_of_entries_limit() -> None:
    """
    L{MAX_AUTHORIZED_ENTRIES} entries pass; one more is refused.
    """
    domains = [f"d{i}.example" for i in range(MAX_AUTHORIZED_ENTRIES)]
    assert len(parse_domains(";".join(domains))) == MAX_AUTHORIZED_ENTRIES
    with pytest.raises(ValidationError, match="more than"):
        parse_domains(";".join([*domains, "one.more.example"]))


def test_senders_are_normalized() -> None:
    """
    Addresses are trimmed, lower-cased, deduplicated; their domains follow
    the domain rules.
    """
    assert parse_senders(" App@Example.com;a+tag@mail.example.com;app@example.COM") == (
        "app@example.com",
        "a+tag@mail.example.com",
    )
    assert parse_senders("x@Bücher.example") == ("x@xn--bcher-kva.example",)
    assert parse_senders("") == ()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("example.com", "'example.com' is not an address"),
        ("@example.com", "empty local part"),
        ("a..b@example.com", "local part 'a..b'"),
        (".a@example.com", "local part '.a'"),
        ('"q"@example.com', "local part '\"q\"'"),
        ("a@b@example.com", "local part 'a@b'"),
        ("a@localhost", "domain 'localhost' needs at least two labels"),
        ("a@", "domain ''"),
        ("x@a.com;;y@b.com", "entry 2 is empty"),
        ("a" * 65 + "@example.com", "longer than 64"),
    ],
)
def test_bad_senders_are_refused_naming_the_entry(text: str, reason: str) -> None:
    """
    Each bad address gets a one-line message that names it and says why.
    """
    with pytest.raises(ValidationError) as e:
        parse_senders(text)
    assert e.value.field == "authorized_senders"
    assert reason in e.value.message


def test_local_part_of_64_passes() -> None:
    """
    The longest local part RFC 5321 allows is accepted.
    """
    assert parse_senders("a" * 64 + "@example.com") == ("a" * 64 + "@example.com",)


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@given(st.lists(_label, min_size=1, max_size=4), st.sampled_from(["com", "example", "eu"]))
def test_any_well_formed_domain_round_trips(labels: list[str], tld: str) -> None:
    """
    Every well-formed lower-case domain is accepted unchanged, in any case.
    """
    domain = ".".join([*labels, tld])
    assert parse_domains(domain.upper()) == (domain,)


@given(st.text(max_size=80))
def test_domain_parser_never_crashes(text: str) -> None:
    """
    Any text gives either domains or a L{ValidationError}.
    """
    try:
        result = parse_domains(text)
    except ValidationError as e:
        field = e.field
    else:
        field = "authorized_domains"
        assert all(d.isascii() and d == d.lower() for d in result)
    assert field == "authorized_domains"


@given(st.text(max_size=80))
def test_sender_parser_never_crashes(text: str) -> None:
    """
    Any text gives either addresses or a L{ValidationError}.
    """
    try:
        result = parse_senders(text)
    except ValidationError as e:
        field = e.field
    else:
        field = "authorized_senders"
        assert all("@" in a for a in result)
    assert field == "authorized_senders"


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (5, 5), ("3", 3), (" 2 ", 2)])
def test_priorities_in_range(value: int | str, expected: int) -> None:
    """
    1 to 5, as numbers or text.
    """
    assert validate_priority(value) == Priority(expected)


@pytest.mark.parametrize("value", [0, 6, -1, "x", "", "2.5", True])
def test_priorities_out_of_range(value: int | str) -> None:
    """
    0 and 6 (one past each end), non-numbers and booleans are refused.
    """
    with pytest.raises(ValidationError, match="1 \\(very high\\) to 5"):
        validate_priority(value)


def test_enforcement_modes() -> None:
    """
    C{enforce} and C{monitor}, nothing else.
    """
    assert validate_enforcement("monitor") is Enforcement.MONITOR
    assert validate_enforcement(Enforcement.ENFORCE) is Enforcement.ENFORCE
    with pytest.raises(ValidationError, match="'strict'"):
        validate_enforcement("strict")


def test_notes_limit() -> None:
    """
    Notes of L{MAX_NOTES_LENGTH} characters pass; one more is refused.
    """
    assert validate_notes("n" * MAX_NOTES_LENGTH) == "n" * MAX_NOTES_LENGTH
    with pytest.raises(ValidationError) as e:
        validate_notes("n" * (MAX_NOTES_LENGTH + 1))
    assert e.value.field == "notes"


def test_active_must_be_boolean() -> None:
    """
    The string C{"false"} is not taken for true.
    """
    assert validate_active(False) is False
    with pytest.raises(ValidationError):
        validate_active("false")  # type: ignore[arg-type]
