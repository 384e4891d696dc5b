"""
Tests for L{smtpgw.policy}: which sender addresses an SMTP+ user may use.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgw.model import SmtpUser
from smtpgw.policy import (
    MAX_CACHED_FROM,
    MAX_SHOWN_ADDRESS,
    SenderDecision,
    _addresses,
    _cached_addresses,
    check_sender,
    header_from_addresses,
    normalize_domain,
)


def make_user(domains: tuple[str, ...] = (), senders: tuple[str, ...] = ()) -> SmtpUser:
    return SmtpUser(
        username="smtp-foo",
        list="news",
        password_hash=b"$2b$04$unused",
        authorized_domains=domains,
        authorized_senders=senders,
    )


def assert_safe_reason(decision: SenderDecision) -> None:
    """
    The reason goes into an SMTP reply: one line of printable ASCII.
    """
    assert decision.reason
    assert decision.reason.isascii()
    assert decision.reason.isprintable()
    assert "\r" not in decision.reason
    assert "\n" not in decision.reason


# Domain labels: lower-case letters, digits and inner hyphens.
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
locals_ = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,15}", fullmatch=True)


def swap_case(text: str, pattern: list[bool]) -> str:
    return "".join(
        c.upper() if pattern[i % len(pattern)] else c.lower() for i, c in enumerate(text)
    )


class TestCheckSenderDomains:
    def test_listed_domain_authorizes_its_addresses(self) -> None:
        """
        An address whose domain is in authorized_domains is allowed, and the
        reason names the domain.
        """
        decision = check_sender(make_user(domains=("example.com",)), "a@example.com")
        assert decision.allowed
        assert decision.reason == "domain example.com is authorized"
        assert decision.domain == "example.com"

    def test_subdomain_is_not_authorized(self) -> None:
        """
        example.com does not authorize a@sub.example.com; the refusal names the
        sender, the user and the domain.
        """
        decision = check_sender(make_user(domains=("example.com",)), "a@sub.example.com")
        assert not decision.allowed
        assert decision.reason == (
            "sender a@sub.example.com is not authorized for user smtp-foo: domain "
            "sub.example.com is not in its authorized domains and the address is not "
            "in its authorized senders"
        )
        assert_safe_reason(decision)

    def test_parent_domain_is_not_authorized_by_subdomain(self) -> None:
        """
        A listed third-level domain does not authorize its parent.
        """
        user = make_user(domains=("marketing.example.com",))
        assert check_sender(user, "a@marketing.example.com").allowed
        assert not check_sender(user, "a@example.com").allowed

    def test_suffix_lookalike_is_not_authorized(self) -> None:
        """
        Matching is on whole domains, not on string suffixes.
        """
        user = make_user(domains=("example.com",))
        assert not check_sender(user, "a@evilexample.com").allowed
        assert not check_sender(user, "a@example.com.evil.org").allowed

    def test_case_insensitive(self) -> None:
        """
        Domain entries and addresses match whatever their case.
        """
        user = make_user(domains=("Example.COM",))
        assert check_sender(user, "Someone@EXAMPLE.com").allowed

    def test_trailing_dot_and_at_sign_in_entries(self) -> None:
        """
        An admin's "@example.com" or "example.com." means the domain
        example.com, and so does a trailing dot in the address.
        """
        assert check_sender(make_user(domains=("@example.com",)), "a@example.com").allowed
        assert check_sender(make_user(domains=("example.com.",)), "a@example.com").allowed
        assert check_sender(make_user(domains=("example.com",)), "a@example.com.").allowed

    def test_internationalized_domain_matches_its_a_label(self) -> None:
        """
        A unicode domain and its IDNA ASCII form are the same domain, in
        either direction and whatever the case.
        """
        user = make_user(domains=("bücher.de",))
        assert check_sender(user, "a@xn--bcher-kva.de").allowed
        assert check_sender(user, "a@BÜCHER.de").allowed
        user = make_user(domains=("xn--bcher-kva.de",))
        decision = check_sender(user, "a@bücher.de")
        assert decision.allowed
        assert decision.domain == "xn--bcher-kva.de"

    def test_idna_2008_sharp_s(self) -> None:
        """
        faß.de is the registered xn--fa-hia.de (IDNA 2008), not fass.de
        (IDNA 2003), so it neither matches fass.de nor misses its own A-label.
        """
        assert normalize_domain("Faß.de") == "xn--fa-hia.de"
        assert check_sender(make_user(domains=("xn--fa-hia.de",)), "a@faß.de").allowed
        assert not check_sender(make_user(domains=("fass.de",)), "a@faß.de").allowed

    def test_unicode_refusal_reason_is_ascii(self) -> None:
        """
        Refusing a unicode address still gives a printable ASCII reason.
        """
        decision = check_sender(make_user(domains=("example.com",)), "jörg@bücher.de")
        assert not decision.allowed
        assert_safe_reason(decision)
        assert "xn--bcher-kva.de" in decision.reason

    def test_domain_idna_refuses_falls_back(self) -> None:
        """
        A domain the IDNA codec refuses (a label over 63 octets) is still
        compared, on its lower-cased text, without raising.
        """
        long_label = "ä" * 70 + ".de"
        assert normalize_domain(long_label.upper()) == long_label
        user = make_user(domains=(long_label,))
        assert check_sender(user, "a@" + long_label.upper()).allowed
        assert not check_sender(make_user(domains=("de",)), "a@" + long_label).allowed


class TestCheckSenderAddresses:
    def test_listed_sender_is_authorized(self) -> None:
        """
        A listed address passes although its domain is not listed.
        """
        user = make_user(domains=("example.com",), senders=("boss@other.org",))
        decision = check_sender(user, "Boss@Other.ORG")
        assert decision.allowed
        assert decision.reason == "address boss@other.org is authorized"

    def test_other_address_of_listed_sender_domain_is_not_authorized(self) -> None:
        """
        Listing one address does not authorize its whole domain.
        """
        user = make_user(senders=("boss@other.org",))
        assert not check_sender(user, "intern@other.org").allowed

    def test_angle_brackets_are_tolerated(self) -> None:
        """
        An address given as <a@example.com> is the address a@example.com.
        """
        assert check_sender(make_user(domains=("example.com",)), "<a@example.com>").allowed

    def test_quoted_local_part_with_at_sign(self) -> None:
        """
        The domain is what follows the last "@", so a quoted local part that
        contains "@" cannot smuggle in an authorized domain.
        """
        user = make_user(domains=("example.com",))
        assert not check_sender(user, '"a@example.com"@evil.org').allowed
        assert check_sender(user, '"x@evil.org"@example.com').allowed


class TestCheckSenderRefusals:
    def test_both_lists_empty_nobody_passes(self) -> None:
        """
        With no authorized domains or senders every address is refused, and
        the reason says the user has none.
        """
        decision = check_sender(make_user(), "a@example.com")
        assert not decision.allowed
        assert decision.reason == (
            "sender a@example.com is not authorized for user smtp-foo: "
            "it has no authorized domains or senders"
        )

    def test_blank_entries_do_not_count(self) -> None:
        """
        Entries that are only whitespace authorize nothing.
        """
        decision = check_sender(make_user(domains=(" ",), senders=("",)), "a@example.com")
        assert not decision.allowed
        assert "has no authorized domains or senders" in decision.reason

    @pytest.mark.parametrize("address", ["", "<>", "  "])
    def test_null_sender_is_refused(self, address: str) -> None:
        """
        The null sender is never authorized, with a reason saying so.
        """
        decision = check_sender(make_user(domains=("example.com",)), address)
        assert not decision.allowed
        assert "null sender" in decision.reason
        assert_safe_reason(decision)

    @pytest.mark.parametrize(
        "address", ["nobody", "@example.com", "a@", "a@.", "<@example.com>", "a@ "]
    )
    def test_malformed_address_is_refused(self, address: str) -> None:
        """
        An address without "@", local part or domain is refused as invalid,
        even when the text contains an authorized domain.
        """
        decision = check_sender(make_user(domains=("example.com",)), address)
        assert not decision.allowed
        assert "not a valid address" in decision.reason
        assert_safe_reason(decision)

    def test_reason_neutralizes_control_characters(self) -> None:
        """
        CR, LF and other control characters in an address cannot reach the
        reply text; an enormous address is cut short.
        """
        decision = check_sender(
            make_user(domains=("example.com",)), "a\r\n250 ok@evil.org\x00" + "x" * 5000
        )
        assert not decision.allowed
        assert_safe_reason(decision)
        assert len(decision.reason) < MAX_SHOWN_ADDRESS * 2 + 200


class TestCheckSenderProperties:
    @given(local=locals_, domain=domains, sub=labels)
    def test_subdomain_never_authorized(self, local: str, domain: str, sub: str) -> None:
        """
        However the domains look, a subdomain of an authorized domain is
        never authorized by it.
        """
        user = make_user(domains=(domain,))
        assert check_sender(user, f"{local}@{domain}").allowed
        assert not check_sender(user, f"{local}@{sub}.{domain}").allowed

    @given(
        local=locals_,
        domain=domains,
        pattern=st.lists(st.booleans(), min_size=1, max_size=7),
        entry_pattern=st.lists(st.booleans(), min_size=1, max_size=7),
    )
    def test_case_variations_always_match(
        self, local: str, domain: str, pattern: list[bool], entry_pattern: list[bool]
    ) -> None:
        """
        Any mix of upper and lower case, in the address or in the list
        entries, matches.
        """
        address = swap_case(f"{local}@{domain}", pattern)
        by_domain = make_user(domains=(swap_case(domain, entry_pattern),))
        by_sender = make_user(senders=(swap_case(f"{local}@{domain}", entry_pattern),))
        assert check_sender(by_domain, address).allowed
        assert check_sender(by_sender, address).allowed

    @given(
        address=st.text(max_size=300),
        domains_=st.lists(st.text(max_size=40), max_size=3),
        senders=st.lists(st.text(max_size=40), max_size=3),
    )
    def test_never_raises(self, address: str, domains_: list[str], senders: list[str]) -> None:
        """
        Arbitrary text as address or list entries gives a decision with a
        reply-safe reason, never an exception.
        """
        decision = check_sender(make_user(tuple(domains_), tuple(senders)), address)
        assert isinstance(decision.allowed, bool)
        assert_safe_reason(decision)


class TestNormalizeDomain:
    @given(st.text(max_size=100))
    def test_never_raises_and_is_idempotent(self, domain: str) -> None:
        """
        Any text normalizes without raising, and normalizing twice changes
        nothing more.
        """
        key = normalize_domain(domain)
        assert normalize_domain(key) == key


class TestHeaderFromAddresses:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("a@example.com", ["a@example.com"]),
            ("Alice <a@example.com>", ["a@example.com"]),
            ('"Doe, John" <j@example.com>', ["j@example.com"]),
            ("a@example.com (Alice)", ["a@example.com"]),
            ("=?utf-8?q?J=C3=B6rg?= <j@example.de>", ["j@example.de"]),
            ("=?utf-8?b?SsO2cmc=?= <j@example.de>", ["j@example.de"]),
            ("a@example.com, Bob <b@example.org>", ["a@example.com", "b@example.org"]),
            ("Team: a@example.com, b@example.org;", ["a@example.com", "b@example.org"]),
            ("Alice\r\n <a@example.com>", ["a@example.com"]),
            ("", []),
            ("   ", []),
            ("<>", []),
            ("undisclosed-recipients:;", []),
        ],
    )
    def test_addresses(self, value: str, expected: list[str]) -> None:
        """
        Display names (also RFC 2047 encoded), comments, groups, folding and
        several mailboxes are understood; empty values give no address.
        """
        assert header_from_addresses(value) == expected

    def test_display_name_that_looks_like_an_address(self) -> None:
        """
        The address is the one in angle brackets, not a display name that
        looks like an authorized address.
        """
        assert header_from_addresses('"boss@example.com" <x@evil.org>') == ["x@evil.org"]

    def test_ambiguous_value_yields_every_candidate(self) -> None:
        """
        A value crafted so that parsers disagree yields every address the
        parser saw, so requiring all of them to be authorized fails closed.
        """
        found = header_from_addresses("boss@example.com)<x@evil.org>")
        assert "x@evil.org" in found
        user = make_user(domains=("example.com",))
        assert not all(check_sender(user, a).allowed for a in found)

    def test_junk_is_not_an_authorized_address(self) -> None:
        """
        Text that is not an address is returned as found and then refused
        by check_sender rather than dropped silently.
        """
        found = header_from_addresses("not an address")
        user = make_user(domains=("example.com",))
        assert found
        assert not any(check_sender(user, a).allowed for a in found)

    def test_a_repeated_value_is_parsed_once_and_answered_alike(self) -> None:
        """
        The addresses of a short value are remembered: the same value again
        gives an equal list (a new one: the caller may change it) without
        parsing again.
        """
        value = "Cache Test <cache-test@example.com>"
        first = header_from_addresses(value)
        hits = _cached_addresses.cache_info().hits
        first.append("changed by the caller")
        assert header_from_addresses(value) == ["cache-test@example.com"]
        assert _cached_addresses.cache_info().hits == hits + 1

    def test_a_long_value_is_not_remembered(self) -> None:
        """
        A value of MAX_CACHED_FROM characters is remembered, one more is
        parsed each time and never kept (header text is attacker input).
        """
        local = "a" * (MAX_CACHED_FROM - len("<@example.com>"))
        at_limit = f"<{local}@example.com>"
        past = f"<{local}a@example.com>"
        assert len(at_limit) == MAX_CACHED_FROM
        assert header_from_addresses(at_limit) == [f"{local}@example.com"]
        size = _cached_addresses.cache_info().currsize
        hits = _cached_addresses.cache_info().hits
        assert header_from_addresses(at_limit) == [f"{local}@example.com"]
        assert _cached_addresses.cache_info().hits == hits + 1
        assert header_from_addresses(past) == [f"{local}a@example.com"]
        assert header_from_addresses(past) == [f"{local}a@example.com"]
        info = _cached_addresses.cache_info()
        assert (info.currsize, info.hits) == (size, hits + 1)

    @given(st.text(max_size=500))
    def test_cached_or_not_the_addresses_are_the_same(self, value: str) -> None:
        """
        Remembering changes no answer: the addresses are those the parser
        gives for the unfolded value.
        """
        unfolded = value.replace("\r", "").replace("\n", "")
        assert header_from_addresses(value) == list(_addresses(unfolded))

    @given(st.text(max_size=500))
    def test_never_raises(self, value: str) -> None:
        """
        Arbitrary header text gives a list of non-empty strings.
        """
        found = header_from_addresses(value)
        assert all(isinstance(a, str) and a.strip() for a in found)
