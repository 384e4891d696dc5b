"""
The rules for what an admin may type into a list or an SMTP+ user record.

Pure functions: text in, a normalized value out, or a L{ValidationError}
that names the field (with the JSON field names of the product's section 1)
and the offending entry, so that a page can show it beside the field and the
CLI on one line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import idna

from smtpgw.model import Enforcement, Priority

__all__ = [
    "MAX_AUTHORIZED_ENTRIES",
    "MAX_NOTES_LENGTH",
    "ValidationError",
    "normalize_address",
    "normalize_domain",
    "parse_domains",
    "parse_senders",
    "validate_active",
    "validate_enforcement",
    "validate_list_name",
    "validate_notes",
    "validate_priority",
]

MAX_AUTHORIZED_ENTRIES: Final = 1000
"""Most entries in C{authorized_domains}, and in C{authorized_senders}."""

MAX_NOTES_LENGTH: Final = 2000
"""Longest admin memo, in characters."""

MAX_DOMAIN_LENGTH: Final = 253
MAX_LABEL_LENGTH: Final = 63
MAX_LOCAL_PART_LENGTH: Final = 64
MAX_ADDRESS_LENGTH: Final = 254

_LIST_NAME: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
# RFC 5322 dot-atom; quoted local parts are legal but never needed by the
# applications the gateway serves, and are where parsers disagree.
_DOT_ATOM: Final = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
)


class ValidationError(ValueError):
    """
    A value an admin entered is not acceptable.

    @ivar field: the field it was entered in (C{name}, C{priority},
        C{authorized_domains}, ...).
    @ivar message: why, in one line, naming the bad entry.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def validate_list_name(name: str) -> str:
    """
    Check a list name: 1 to 64 of C{a-z 0-9 . _ -}, starting with a letter
    or digit.

    @return: C{name}, unchanged.
    @raise ValidationError: for the field C{name}.
    """
    if not isinstance(name, str) or not _LIST_NAME.fullmatch(name):
        raise ValidationError(
            "name",
            f"{name!r} is not a valid list name: use 1 to 64 lower-case letters, "
            "digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def _domain_problem(domain: str) -> str | None:
    if len(domain) > MAX_DOMAIN_LENGTH:
        return f"longer than {MAX_DOMAIN_LENGTH} characters"
    if domain.endswith("."):
        return "ends with a dot"
    labels = domain.split(".")
    if len(labels) < 2:
        return "needs at least two labels, as in example.com"
    for label in labels:
        if not label:
            return "has an empty label"
        if len(label) > MAX_LABEL_LENGTH:
            return f"has a label longer than {MAX_LABEL_LENGTH} characters"
        if not _LABEL.fullmatch(label):
            return f"label {label!r} may only have letters, digits and inner dashes"
    if labels[-1].isdigit():
        return "is an IP address, not a domain name"
    if any(label.startswith("xn--") for label in labels):
        try:
            idna.decode(domain)
        except UnicodeError:
            return "is not a valid internationalized domain name"
    return None


def normalize_domain(text: str) -> str:
    """
    Turn a domain as typed into the form senders are compared with.

    @param text: a host name; internationalized names are accepted.
    @return: the lower-cased ASCII form (IDNA A-labels, C{xn--...}).
    @raise ValueError: saying why C{text} is no host name.
    """
    domain = text.strip()
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except UnicodeError:
            raise ValueError("is not a valid internationalized domain name") from None
    domain = domain.lower()
    problem = _domain_problem(domain)
    if problem is not None:
        raise ValueError(problem)
    return domain


def normalize_address(text: str) -> str:
    """
    Turn a sender address as typed into the form senders are compared with.

    @param text: C{local@domain}, with a dot-atom local part.
    @return: the address lower-cased, its domain in ASCII form; addresses
        are compared case-insensitively, as their domains are.
    @raise ValueError: saying why C{text} is no address.
    """
    address = text.strip()
    local, at, domain = address.rpartition("@")
    if not at:
        raise ValueError("is not an address of the form local@domain")
    if not local:
        raise ValueError("has an empty local part")
    if len(local) > MAX_LOCAL_PART_LENGTH:
        raise ValueError(f"has a local part longer than {MAX_LOCAL_PART_LENGTH} characters")
    if not _DOT_ATOM.fullmatch(local):
        raise ValueError(f"local part {local!r} is not valid")
    try:
        domain = normalize_domain(domain)
    except ValueError as e:
        raise ValueError(f"domain {domain!r} {e}") from None
    normalized = f"{local.lower()}@{domain}"
    if len(normalized) > MAX_ADDRESS_LENGTH:
        raise ValueError(f"is longer than {MAX_ADDRESS_LENGTH} characters")
    return normalized


def _entries(field: str, value: str | Iterable[str]) -> list[str]:
    if isinstance(value, str):
        if not value.strip():
            return []
        entries = value.split(";")
    else:
        entries = list(value)
    if len(entries) > MAX_AUTHORIZED_ENTRIES:
        raise ValidationError(
            field, f"{len(entries)} entries, more than the {MAX_AUTHORIZED_ENTRIES} allowed"
        )
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, str):
            raise ValidationError(field, f"entry {position} is not text")
        if not entry.strip():
            raise ValidationError(
                field, f"entry {position} is empty (entries are separated by ';')"
            )
    return entries


def _dedupe(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def parse_domains(value: str | Iterable[str]) -> tuple[str, ...]:
    """
    Read C{authorized_domains}.

    @param value: C{;}-separated text (C{"example.com;mail.example.com"}), or
        the entries themselves; blank text means none.
    @return: the normalized domains (see L{normalize_domain}), in the order
        given, without repeats.
    @raise ValidationError: for the field C{authorized_domains}, naming the
        first bad entry.
    """
    field = "authorized_domains"
    normalized = []
    for entry in _entries(field, value):
        try:
            normalized.append(normalize_domain(entry))
        except ValueError as e:
            raise ValidationError(field, f"{entry.strip()!r} {e}") from None
    return _dedupe(normalized)


def parse_senders(value: str | Iterable[str]) -> tuple[str, ...]:
    """
    Read C{authorized_senders}.

    @param value: C{;}-separated addresses, or the addresses themselves;
        blank text means none.
    @return: the normalized addresses (see L{normalize_address}), in the
        order given, without repeats.
    @raise ValidationError: for the field C{authorized_senders}, naming the
        first bad entry.
    """
    field = "authorized_senders"
    normalized = []
    for entry in _entries(field, value):
        try:
            normalized.append(normalize_address(entry))
        except ValueError as e:
            raise ValidationError(field, f"{entry.strip()!r} {e}") from None
    return _dedupe(normalized)


def validate_priority(value: int | str | Priority) -> Priority:
    """
    Read a priority: 1 (very high) to 5 (very low).

    @raise ValidationError: for the field C{priority}.
    """
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = int(value)
    elif isinstance(value, str) and value.strip().isdecimal():
        number = int(value.strip())
    if number is None or not Priority.VERY_HIGH <= number <= Priority.VERY_LOW:
        raise ValidationError(
            "priority", f"{value!r} is not a priority: use 1 (very high) to 5 (very low)"
        )
    return Priority(number)


def validate_enforcement(value: Enforcement | str) -> Enforcement:
    """
    Read an enforcement mode: C{enforce} or C{monitor}.

    @raise ValidationError: for the field C{enforcement}.
    """
    if isinstance(value, Enforcement):
        return value
    try:
        return Enforcement(value)
    except ValueError:
        raise ValidationError(
            "enforcement", f"{value!r} is not an enforcement mode: use enforce or monitor"
        ) from None


def validate_notes(value: str) -> str:
    """
    Check the admins' memo: any text up to L{MAX_NOTES_LENGTH} characters.

    @raise ValidationError: for the field C{notes}.
    """
    if not isinstance(value, str):
        raise ValidationError("notes", "must be text")
    if len(value) > MAX_NOTES_LENGTH:
        raise ValidationError(
            "notes", f"{len(value)} characters, more than the {MAX_NOTES_LENGTH} allowed"
        )
    return value


def validate_active(value: bool) -> bool:
    """
    Check the C{active} flag is a real boolean (not C{"false"}, which is true).

    @raise ValidationError: for the field C{active}.
    """
    if not isinstance(value, bool):
        raise ValidationError("active", f"{value!r} is not true or false")
    return value
