"""
Tests for L{smtpgw.passwords}: generated credentials and bcrypt checks that
never raise.
"""

from __future__ import annotations

import re

import bcrypt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgw.passwords import (
    DEFAULT_ROUNDS,
    DUMMY_HASH,
    MAX_PASSWORD_BYTES,
    MAX_ROUNDS,
    MIN_ROUNDS,
    dummy_hash,
    generate_password,
    generate_username,
    hash_cost,
    hash_password,
    verify_password,
)

ROUNDS = 4


def test_generated_password_is_long_url_safe_and_fresh() -> None:
    """
    A generated password is 32 url-safe characters, fits bcrypt, and two
    are never the same.
    """
    passwords = {generate_password() for _ in range(50)}
    assert len(passwords) == 50
    for password in passwords:
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", password)
        assert len(password.encode()) <= MAX_PASSWORD_BYTES


def test_a_generated_password_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A password drawn with a leading C{-} (which swaks, say, would take for
    an option) is drawn again.
    """
    import secrets

    draws = iter(["-" + "a" * 31, "-" + "b" * 31, "c" * 32])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(draws))
    assert generate_password() == "c" * 32


def test_generated_username_names_the_list_and_has_random_suffix() -> None:
    """
    A username is C{smtp-<list>-<8 lower-case alphanumerics>}.
    """
    names = {generate_username("newsletter") for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert re.fullmatch(r"smtp-newsletter-[a-z0-9]{8}", name)


@given(st.text(max_size=200))
def test_generated_username_is_sanitized_for_any_list_name(list_name: str) -> None:
    """
    Whatever the list name, the username has only lower-case letters,
    digits and single dashes between parts, and a bounded length.
    """
    name = generate_username(list_name)
    assert re.fullmatch(r"smtp-[a-z0-9]+(-[a-z0-9]+)*-[a-z0-9]{8}", name)
    assert len(name) <= len("smtp-") + 32 + 1 + 8


def test_hash_then_verify() -> None:
    """
    A password verifies against its own hash and not against another's;
    text and UTF-8 bytes are the same password.
    """
    hashed = hash_password("s3cret-é", rounds=ROUNDS)
    assert hashed.startswith(b"$2b$04$")
    assert verify_password("s3cret-é", hashed)
    assert verify_password("s3cret-é".encode(), hashed)
    assert not verify_password("s3cret-e", hashed)


def test_password_of_72_bytes_verifies() -> None:
    """
    A password of exactly L{MAX_PASSWORD_BYTES} bytes is hashed and checked.
    """
    password = b"p" * MAX_PASSWORD_BYTES
    hashed = hash_password(password, rounds=ROUNDS)
    assert verify_password(password, hashed)
    assert not verify_password(b"p" * (MAX_PASSWORD_BYTES - 1) + b"q", hashed)


def test_password_of_73_bytes_is_wrong_not_an_error() -> None:
    """
    bcrypt 5 raises for a password one byte over the limit; checking it is
    a plain failure, even when its first 72 bytes are the right password.
    """
    right = b"p" * MAX_PASSWORD_BYTES
    hashed = hash_password(right, rounds=ROUNDS)
    with pytest.raises(ValueError, match="72"):
        bcrypt.checkpw(right + b"p", hashed)
    assert verify_password(right + b"p", hashed) is False


def test_hashing_73_bytes_is_refused() -> None:
    """
    The gateway never stores a hash of a truncated password.
    """
    with pytest.raises(ValueError, match="72"):
        hash_password(b"p" * (MAX_PASSWORD_BYTES + 1), rounds=ROUNDS)


@pytest.mark.parametrize(
    "hashed",
    [b"", b"garbage", b"$2b$04$short", b"$2b$99$" + b"a" * 53, "not-bytes"],
)
def test_malformed_hash_is_a_failure_not_an_error(hashed: bytes) -> None:
    """
    A malformed stored hash makes every password wrong, without raising.
    """
    assert verify_password("anything", hashed) is False


def test_empty_password() -> None:
    """
    An empty password matches only a hash of the empty password.
    """
    hashed = hash_password("", rounds=ROUNDS)
    assert verify_password("", hashed)
    assert not verify_password("", hash_password("x", rounds=ROUNDS))


@pytest.mark.parametrize("rounds", [3, 32])
def test_rounds_out_of_range_refused(rounds: int) -> None:
    """
    bcrypt costs outside 4..31 are refused with a clear message.
    """
    with pytest.raises(ValueError, match="rounds"):
        hash_password("x", rounds=rounds)


def test_dummy_hash_has_the_cost_of_real_hashes() -> None:
    """
    The dummy hash for unknown users has the cost asked for, is a valid
    bcrypt hash, and matches none of the usual guesses.
    """
    assert dummy_hash(DEFAULT_ROUNDS) == DUMMY_HASH
    assert DUMMY_HASH.startswith(b"$2b$12$")
    assert len(DUMMY_HASH) == 60
    cheap = dummy_hash(ROUNDS)
    assert cheap.startswith(b"$2b$04$")
    assert dummy_hash(ROUNDS) is cheap
    for guess in ["", "password", "dummy"]:
        assert not verify_password(guess, cheap)


@pytest.mark.parametrize("rounds", [4, 5, 6])
def test_dummy_hash_of_any_cost_is_checked_like_a_real_hash(rounds: int) -> None:
    """
    For another cost than the default, the dummy is a well-formed hash of
    that cost: bcrypt checks passwords against it (rather than refusing it
    as malformed, which would take no time) and none matches.
    """
    dummy = dummy_hash(rounds)
    real = hash_password("x", rounds=rounds)
    assert len(dummy) == len(real) == 60
    assert hash_cost(dummy) == rounds
    assert bcrypt.checkpw(b"x", dummy) is False
    assert not verify_password("x", dummy)
    assert dummy_hash(rounds) is dummy


@pytest.mark.parametrize("rounds", [MIN_ROUNDS - 1, MAX_ROUNDS + 1])
def test_dummy_hash_cost_out_of_range_refused(rounds: int) -> None:
    """
    A dummy of a cost bcrypt does not have is refused, like a real hash.
    """
    with pytest.raises(ValueError, match="rounds"):
        dummy_hash(rounds)


@pytest.mark.parametrize(
    ("hashed", "cost"),
    [
        (b"$2b$12$OCDXRrFcobgbpKV7BUZMa.WW0UYyg/DiK/2IzFG0/xlL9kyr/UNT.", 12),
        (b"$2a$04$" + b"a" * 53, 4),
        (b"$2y$31$" + b"a" * 53, 31),
        (b"$2x$10$", 10),
        (b"$2b$03$" + b"a" * 53, None),
        (b"$2b$32$" + b"a" * 53, None),
        (b"$2b$4$" + b"a" * 53, None),
        (b"$2c$12$" + b"a" * 53, None),
        (b"$1$12$abc", None),
        (b"\x00\xff", None),
        (b"", None),
    ],
)
def test_hash_cost_reads_the_prefix(hashed: bytes, cost: int | None) -> None:
    """
    The cost is the two digits after a bcrypt prefix, within 4..31; anything
    else has none.
    """
    assert hash_cost(hashed) == cost


@given(st.binary(max_size=80))
def test_hash_cost_never_raises(hashed: bytes) -> None:
    """
    Whatever is stored, the cost is L{None} or a cost bcrypt accepts.
    """
    cost = hash_cost(hashed)
    assert cost is None or MIN_ROUNDS <= cost <= MAX_ROUNDS


@given(st.integers(MIN_ROUNDS, MAX_ROUNDS), st.sampled_from([b"2a", b"2b", b"2y"]))
def test_hash_cost_of_every_valid_prefix(rounds: int, variant: bytes) -> None:
    """
    Every bcrypt variant and cost is read back.
    """
    assert hash_cost(b"$" + variant + b"$" + b"%02d" % rounds + b"$" + b"a" * 53) == rounds
