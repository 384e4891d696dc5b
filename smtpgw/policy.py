"""
Sender authorization: may this SMTP+ user send as this address?

The rule (PRODUCT section 1): an address passes when it is listed in the
user's C{authorized_senders} or its domain is listed in C{authorized_domains}.
Matching is exact and case-insensitive; a listed domain does not authorize its
subdomains. With both lists empty nobody passes.

This module only decides; whether a refusal is enforced or merely alerted on
(C{Enforcement}) is the session's business.
"""

from __future__ import annotations

import email.utils
import functools
import re

import idna
from attrs import frozen

from smtpgw.model import SmtpUser

__all__ = [
    "MAX_SHOWN_ADDRESS",
    "SenderDecision",
    "check_sender",
    "header_from_addresses",
    "normalize_address",
    "normalize_domain",
]

#: Addresses quoted in a reason are cut to this many characters, so a hostile
#: address cannot make an SMTP reply or an alert arbitrarily long.
MAX_SHOWN_ADDRESS = 200

_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")
_TRAILING = re.compile(r"[\s.]+\Z")


def _trimmed(domain: str) -> str:
    return _TRAILING.sub("", domain.lstrip()).lower()


@frozen
class SenderDecision:
    """
    The verdict on one sender address for one SMTP+ user.

    @ivar allowed: whether the address may be used.
    @ivar reason: a short sentence, printable ASCII without CR/LF, fit for an
        SMTP reply text and for an alert.
    @ivar address: the address as checked, normalized (lower case, IDNA
        domain) when it could be parsed, otherwise as given.
    @ivar domain: the normalized domain of the address, or C{""} when it has
        none (null sender, malformed address).
    """

    allowed: bool
    reason: str
    address: str = ""
    domain: str = ""


def normalize_domain(domain: str) -> str:
    """
    The form in which domains are compared: lower case, IDNA ASCII ("A-label")
    when the domain is internationalized, without a trailing dot.

    Internationalized domains are converted with UTS 46 / IDNA 2008 (so
    C{faß.de} is C{xn--fa-hia.de}, as registries see it), else with the
    stdlib's IDNA 2003 codec; a domain both refuse (labels over 63 octets,
    ...) is compared on its lower-cased text: it can still match an
    identical listed entry, and nothing raises.

    @param domain: a domain as typed by an admin or found in an address.
    @return: the comparison key.
    """
    text = _trimmed(domain)
    if text.isascii():
        return text
    try:
        return _trimmed(idna.encode(text, uts46=True).decode("ascii"))
    except (idna.IDNAError, UnicodeError, ValueError):
        pass
    try:
        return _trimmed(text.encode("idna").decode("ascii"))
    except UnicodeError:
        return text


def normalize_address(address: str) -> tuple[str, str] | None:
    """
    Split an address into the comparison forms of its local part and domain.

    @param address: an addr-spec, optionally inside angle brackets.
    @return: C{(local, domain)} lower-cased with the domain normalized by
        L{normalize_domain}, or C{None} when the address has no C{@}, an empty
        local part or an empty domain.
    """
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    # The last "@" separates the domain: a quoted local part may contain "@".
    local, at, domain = text.rpartition("@")
    if not at or not local:
        return None
    key = normalize_domain(domain)
    if not key:
        return None
    return local.lower(), key


def _shown(text: str) -> str:
    """
    Make C{text} safe to quote in an SMTP reply or an alert: printable ASCII,
    no spaces or line breaks, bounded length.
    """
    ascii_text = text.encode("ascii", "backslashreplace").decode("ascii")
    cleaned = _UNPRINTABLE.sub("?", ascii_text)
    if len(cleaned) > MAX_SHOWN_ADDRESS:
        cleaned = cleaned[:MAX_SHOWN_ADDRESS] + "..."
    return cleaned


def _authorized_domains(user: SmtpUser) -> set[str]:
    keys = set()
    for entry in user.authorized_domains:
        # Admins sometimes type "@example.com" for "the domain example.com".
        key = normalize_domain(entry.strip().lstrip("@"))
        if key:
            keys.add(key)
    return keys


def _authorized_senders(user: SmtpUser) -> set[tuple[str, str]]:
    keys = set()
    for entry in user.authorized_senders:
        key = normalize_address(entry)
        if key is not None:
            keys.add(key)
    return keys


def check_sender(user: SmtpUser, address: str) -> SenderDecision:
    """
    Decide whether C{user} may send as C{address}.

    @param user: the authenticated SMTP+ user.
    @param address: the envelope sender or a header C{From:} address, an
        addr-spec without display name (angle brackets are tolerated); C{""}
        is the null sender.
    @return: the decision with a reason naming the sender, the user and why.
    """
    who = f"user {_shown(user.username)}"
    if not address.strip() or address.strip() == "<>":
        return SenderDecision(
            allowed=False,
            reason=f"the null sender <> is not authorized for {who}: a sender address is required",
        )
    parts = normalize_address(address)
    if parts is None:
        return SenderDecision(
            allowed=False,
            reason=(
                f"sender {_shown(address)} is not authorized for {who}: "
                "it is not a valid address (local-part@domain)"
            ),
            address=address,
        )
    local, domain = parts
    normalized = f"{local}@{domain}"
    shown_sender = _shown(normalized)
    shown_domain = _shown(domain)
    domains = _authorized_domains(user)
    senders = _authorized_senders(user)
    if parts in senders:
        return SenderDecision(
            allowed=True,
            reason=f"address {shown_sender} is authorized",
            address=normalized,
            domain=domain,
        )
    if domain in domains:
        return SenderDecision(
            allowed=True,
            reason=f"domain {shown_domain} is authorized",
            address=normalized,
            domain=domain,
        )
    if not domains and not senders:
        why = "it has no authorized domains or senders"
    else:
        why = (
            f"domain {shown_domain} is not in its authorized domains "
            "and the address is not in its authorized senders"
        )
    return SenderDecision(
        allowed=False,
        reason=f"sender {shown_sender} is not authorized for {who}: {why}",
        address=normalized,
        domain=domain,
    )


def header_from_addresses(value: str) -> list[str]:
    """
    The addresses in a C{From:} header value.

    Display names, comments, groups and several mailboxes are understood
    (RFC 5322 section 3.6.2 allows a list). Whatever the parser could not read
    as a mailbox but left text for is returned as is, so that a caller who
    requires every address to be authorized fails closed on junk.

    @param value: the header value, folded or unfolded.
    @return: the addr-specs in order, without empty ones; C{[]} when none.
    """
    unfolded = value.replace("\r", "").replace("\n", "")
    if len(unfolded) <= MAX_CACHED_FROM:
        return list(_cached_addresses(unfolded))
    return list(_addresses(unfolded))


#: The longest C{From:} value whose addresses are remembered: an
#: application sends the same one in every message, and parsing it is a
#: good part of checking a message; longer ones (rare, and attacker input)
#: are parsed each time, so the cache holds at most 4096 short strings.
MAX_CACHED_FROM = 256


def _addresses(unfolded: str) -> tuple[str, ...]:
    try:
        pairs = email.utils.getaddresses([unfolded])
    except Exception:
        # The stdlib parser is not documented to raise, but a header is
        # attacker input: an unreadable one has no usable address.
        return ()
    return tuple(addr for _name, addr in pairs if addr.strip())


_cached_addresses = functools.lru_cache(maxsize=4096)(_addresses)
