"""
Generated credentials for SMTP+ users, and their bcrypt hashes.

Passwords are made by the gateway, shown once, and stored only as bcrypt
hashes. Checking never raises: whatever bcrypt refuses (a password over
L{MAX_PASSWORD_BYTES}, a malformed hash) is simply a wrong password.
"""

from __future__ import annotations

import functools
import re
import secrets
import string
from typing import Final

import bcrypt

__all__ = [
    "DEFAULT_ROUNDS",
    "DUMMY_HASH",
    "MAX_PASSWORD_BYTES",
    "MAX_ROUNDS",
    "MIN_ROUNDS",
    "dummy_hash",
    "generate_password",
    "generate_username",
    "hash_cost",
    "hash_password",
    "verify_password",
]

DEFAULT_ROUNDS: Final = 12
"""bcrypt cost for new hashes: about 0.2 s a check on a current core."""

MIN_ROUNDS: Final = 4
MAX_ROUNDS: Final = 31
"""The range bcrypt accepts; 4 is only for tests."""

MAX_PASSWORD_BYTES: Final = 72
"""bcrypt looks at no more than this; bcrypt 5 refuses longer passwords."""

PASSWORD_ENTROPY_BYTES: Final = 24
"""24 random bytes: 192 bits, 32 url-safe characters."""

USERNAME_SUFFIX_LENGTH: Final = 8
USERNAME_LIST_PART_MAX: Final = 32
_USERNAME_ALPHABET: Final = string.ascii_lowercase + string.digits
_NOT_USERNAME_CHAR: Final = re.compile(r"[^a-z0-9]+")
_BCRYPT_ALPHABET: Final = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_BCRYPT_DIGEST_LENGTH: Final = 31
_HASH_COST: Final = re.compile(rb"\$2[abxy]\$([0-9]{2})\$")

DUMMY_HASH: Final = b"$2b$12$OCDXRrFcobgbpKV7BUZMa.WW0UYyg/DiK/2IzFG0/xlL9kyr/UNT."
"""
A cost-12 hash of a random password nobody knows. Checking a password of an
unknown user against it costs what checking a real user's password costs,
so the time of a failed login tells nothing about whether the user exists.
"""


def generate_password() -> str:
    """
    Make a new password for an SMTP+ user.

    @return: 32 url-safe characters (192 bits from L{secrets}), well under
        L{MAX_PASSWORD_BYTES}, never starting with C{-}: command-line
        clients (swaks among them) take such a value for an option, whatever
        the quoting. (Drawing again costs 1/64 of the space: 0.02 bits.)
    """
    password = secrets.token_urlsafe(PASSWORD_ENTROPY_BYTES)
    while password.startswith("-"):
        password = secrets.token_urlsafe(PASSWORD_ENTROPY_BYTES)
    return password


def generate_username(list_name: str) -> str:
    """
    Make a new, probably unique, username for a user of C{list_name}.

    The store retries on the rare collision.

    @param list_name: the list the user belongs to; reduced to lower-case
        letters, digits and dashes, and shortened.
    @return: C{smtp-<list>-<8 random lower-case letters or digits>}.
    """
    list_part = _NOT_USERNAME_CHAR.sub("-", list_name.lower()).strip("-")
    list_part = list_part[:USERNAME_LIST_PART_MAX].strip("-") or "list"
    suffix = "".join(secrets.choice(_USERNAME_ALPHABET) for _ in range(USERNAME_SUFFIX_LENGTH))
    return f"smtp-{list_part}-{suffix}"


def _password_bytes(password: bytes | str) -> bytes:
    if isinstance(password, str):
        return password.encode("utf-8")
    return password


def hash_password(password: bytes | str, rounds: int = DEFAULT_ROUNDS) -> bytes:
    """
    Hash a password with bcrypt.

    @param password: the password; text is encoded as UTF-8.
    @param rounds: the bcrypt cost, L{MIN_ROUNDS} to L{MAX_ROUNDS}.
    @return: the hash, 60 ASCII bytes.
    @raise ValueError: when the password is over L{MAX_PASSWORD_BYTES} or
        C{rounds} is out of range.
    """
    if not MIN_ROUNDS <= rounds <= MAX_ROUNDS:
        raise ValueError(f"bcrypt rounds must be {MIN_ROUNDS}..{MAX_ROUNDS}, not {rounds}")
    return bcrypt.hashpw(_password_bytes(password), bcrypt.gensalt(rounds))


def verify_password(password: bytes | str, hashed: bytes) -> bool:
    """
    Check a password against a bcrypt hash, never raising.

    @param password: the password offered; text is encoded as UTF-8.
    @param hashed: the stored hash.
    @return: L{True} only when they match; L{False} as well for a password
        bcrypt refuses (over L{MAX_PASSWORD_BYTES}) and a malformed hash.
    """
    try:
        return bcrypt.checkpw(_password_bytes(password), hashed)
    except (ValueError, TypeError):
        return False


def hash_cost(hashed: bytes) -> int | None:
    """
    The cost a bcrypt hash was made with, which it states in its prefix
    (C{$2b$12$...}).

    @return: the cost, or L{None} when C{hashed} is not a bcrypt hash of a
        cost in L{MIN_ROUNDS}..L{MAX_ROUNDS}.
    """
    match = _HASH_COST.match(hashed)
    if match is None:
        return None
    cost = int(match.group(1))
    return cost if MIN_ROUNDS <= cost <= MAX_ROUNDS else None


@functools.lru_cache(maxsize=32)
def dummy_hash(rounds: int = DEFAULT_ROUNDS) -> bytes:
    """
    A hash, of the given cost, that no password is known to match.

    @param rounds: the cost real hashes have, so that checking against the
        dummy takes as long.
    @return: L{DUMMY_HASH} for the default cost, else a real salt of that
        cost followed by a random digest (made once per process and cost):
        checking a password against it costs a full bcrypt run, and making
        it costs none.
    @raise ValueError: when C{rounds} is out of range.
    """
    if rounds == DEFAULT_ROUNDS:
        return DUMMY_HASH
    if not MIN_ROUNDS <= rounds <= MAX_ROUNDS:
        raise ValueError(f"bcrypt rounds must be {MIN_ROUNDS}..{MAX_ROUNDS}, not {rounds}")
    digest = "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(_BCRYPT_DIGEST_LENGTH))
    return bcrypt.gensalt(rounds) + digest.encode("ascii")
