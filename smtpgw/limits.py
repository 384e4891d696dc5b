"""
The limits the SMTP session enforces: sizes, counts, timeouts and the abuse
thresholds, each named, documented, defaulted and range-checked.

RFC 5321 section 4.5.3.1 gives the minimums an SMTP server must accept; the
validators refuse settings below them, so a configuration mistake cannot make
the gateway refuse mail that every client is entitled to send.
"""

from __future__ import annotations

from typing import Any

from attrs import Attribute, frozen
from attrs import field as _field

__all__ = ["MIB", "Limits"]

MIB = 1024 * 1024

#: RFC 5321 4.5.3.1.4: a command line is at least 512 octets, CRLF included.
_MIN_COMMAND_LENGTH = 512
#: RFC 5321 4.5.3.1.3: a path is at least 256 octets, angle brackets included.
_MIN_PATH_LENGTH = 256
#: RFC 5322 2.1.1: a line of a message is at most 998 octets without CRLF.
_MIN_DATA_LINE_LENGTH = 998
#: RFC 4954 section 4: AUTH lines may be up to 12288 octets.
_AUTH_LINE_LENGTH = 12288


def _between(low: float, high: float) -> Any:
    """
    An attrs validator: the value lies in C{[low, high]}.
    """

    def check(instance: object, attribute: Attribute[Any], value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{attribute.name} must be a number, not {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{attribute.name} must be between {low} and {high}, not {value!r}")

    return check


def _int(default: int, low: int, high: int) -> Any:
    return _field(default=default, validator=_between(low, high))


def _seconds(default: float, low: float, high: float) -> Any:
    return _field(default=default, validator=_between(low, high))


@frozen
class Limits:
    """
    What one SMTP session may do before it is refused or disconnected.

    @ivar max_size: the largest message accepted, in octets as the SIZE
        extension counts them (RFC 1870); advertised as C{SIZE <max_size>}.
        A larger C{SIZE=} at MAIL gets C{552 5.3.4} at once, a larger body
        gets it at the end of DATA.
    @ivar max_recipients: recipients per transaction; the next one gets
        C{452 4.5.3} (RFC 5321 4.5.3.1.8 wants at least 100 accepted).
    @ivar max_command_length: the longest command line, in octets with its
        CRLF (RFC 5321 4.5.3.1.4); a longer one gets C{500 5.5.2}.
    @ivar max_auth_line_length: the longest AUTH command or AUTH response
        line, in octets with its CRLF (RFC 4954 section 4 allows 12288).
    @ivar max_path_length: the longest reverse- or forward-path, in octets
        with its angle brackets (RFC 5321 4.5.3.1.3); a longer one gets
        C{501 5.1.3}.
    @ivar max_data_line_length: the longest message line, in octets without
        its CRLF (RFC 5322 2.1.1); a longer one refuses the message and
        closes the connection.
    @ivar idle_timeout: seconds a client may stay silent while the gateway
        waits for it; then C{421 4.4.2} and disconnect.
    @ivar command_deadline: seconds one command line may take from its first
        octet to its end, however the octets trickle in; then C{421 4.4.2}.
    @ivar data_deadline: seconds the whole DATA section may take, from the
        C{354} to the final dot; then C{421 4.4.2}.
    @ivar max_connections: simultaneous connections in all, from every
        address and on every port; the next one gets C{421 4.7.0} instead of
        the greeting and is closed.
    @ivar max_connections_per_ip: simultaneous connections from one address
        (an IPv6 client: from one /64; see L{smtpgw.abuse.address_key});
        the next one gets C{421 4.7.0} and is closed.
    @ivar max_bad_commands: protocol errors (unknown commands, syntax errors,
        commands out of sequence) and policy refusals (a sender or header
        C{From:} refused with C{550 5.7.1}) a session may make since its last
        accepted message; the next one gets C{421 4.7.0} and the connection
        is closed.
    @ivar max_junk_commands: commands that move no mail forward (NOOP, HELP,
        VRFY, RSET, EHLO, HELO, a cancelled AUTH, STARTTLS where it is not
        available, a repeated or surplus recipient, MAIL while the queue
        refuses mail) a session may send since its last accepted message (as
        Postfix's C{smtpd_junk_command_limit}); the next one gets
        C{421 4.7.0} and the connection is closed.
    @ivar auth_failure_limit: failed logins from one address (an IPv6
        client: from one /64) within L{auth_failure_window} before that
        address gets C{421 4.7.0} to every AUTH. A check still running counts
        as a possible failure: at most this many, minus the recent failures,
        are checked at once, and further AUTHs from the address wait their
        turn, so parallel connections cannot get more guesses checked. The
        C{auth_failures} alert is raised when the address becomes blocked,
        at most once per L{auth_failure_window}.
    @ivar auth_failure_window: seconds over which failed logins are counted.
    @ivar auth_failure_delay: the tarpit step: the reply to the n-th failed
        login from an address within the window is delayed by n times this
        many seconds.
    @ivar auth_failure_delay_cap: the longest tarpit delay, in seconds.
    @ivar max_messages_per_session: mail transactions (accepted MAIL
        commands) one session may begin; the next MAIL gets C{421 4.7.0}
        and the connection is closed.
    @ivar max_session_seconds: how long a session may last from its
        connection; then, at the first moment no transaction is under way
        (a message being received is finished), it gets C{421 4.7.0} and is
        closed.
    @ivar user_recheck_interval: seconds a user record read at login (or
        since) is trusted; the first MAIL after that reads it again, so that
        a regenerated password, a deactivated or deleted user ends the
        login of sessions already open (their MAIL gets
        C{530 5.7.0 Authentication required}: the client may log in again)
        and changed domains, senders or priority apply to them. Zero reads
        it at every MAIL.
    @ivar sender_alert_window: seconds during which a C{sender_domain}
        alert for the same user and sender address is stored once: the
        repeats are counted and one summary alert with their number is
        stored when the window ends. Zero stores every one.
    @ivar greet_delay: seconds to wait before the greeting; a client that
        talks before it gets C{554 5.5.1} and is closed (spam bots do not
        wait). Zero greets at once.
    """

    max_size: int = _int(25 * MIB, 1024, 2**31 - 1)
    max_recipients: int = _int(100, 1, 100_000)
    max_command_length: int = _int(_MIN_COMMAND_LENGTH, _MIN_COMMAND_LENGTH, _AUTH_LINE_LENGTH)
    max_auth_line_length: int = _int(_AUTH_LINE_LENGTH, _MIN_COMMAND_LENGTH, 65536)
    max_path_length: int = _int(_MIN_PATH_LENGTH, _MIN_PATH_LENGTH, 4096)
    max_data_line_length: int = _int(_MIN_DATA_LINE_LENGTH, _MIN_DATA_LINE_LENGTH, 65536)
    idle_timeout: float = _seconds(300.0, 1.0, 3600.0)
    command_deadline: float = _seconds(60.0, 1.0, 3600.0)
    data_deadline: float = _seconds(600.0, 1.0, 86400.0)
    max_connections: int = _int(1000, 1, 1_000_000)
    max_connections_per_ip: int = _int(50, 1, 100_000)
    max_bad_commands: int = _int(10, 1, 1000)
    max_junk_commands: int = _int(100, 1, 100_000)
    auth_failure_limit: int = _int(5, 1, 1000)
    auth_failure_window: float = _seconds(300.0, 1.0, 86400.0)
    auth_failure_delay: float = _seconds(1.0, 0.0, 60.0)
    auth_failure_delay_cap: float = _seconds(10.0, 0.0, 300.0)
    greet_delay: float = _seconds(0.0, 0.0, 60.0)
    sender_alert_window: float = _seconds(600.0, 0.0, 86400.0)
    max_messages_per_session: int = _int(1000, 1, 1_000_000)
    max_session_seconds: float = _seconds(3600.0, 1.0, 86400.0)
    user_recheck_interval: float = _seconds(1.0, 0.0, 3600.0)

    def __attrs_post_init__(self) -> None:
        if self.max_auth_line_length < self.max_command_length:
            raise ValueError("max_auth_line_length must be at least max_command_length")
        if self.greet_delay >= self.idle_timeout:
            raise ValueError("greet_delay must be shorter than idle_timeout")
        if self.greet_delay >= self.max_session_seconds:
            raise ValueError("greet_delay must be shorter than max_session_seconds")
