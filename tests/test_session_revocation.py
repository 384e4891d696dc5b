"""
A login does not outlast what the user store says about the user: the
record is read again at MAIL once it is older than user_recheck_interval;
and sessions end after max_messages_per_session transactions or
max_session_seconds.
"""

from __future__ import annotations

import attrs
import pytest

from smtpgw.limits import Limits
from smtpgw.model import Priority
from smtpgw.passwords import hash_password
from tests.session_fakes import START, FakeQueue, Harness, make_user, message, plain


def _harness(**limits: float) -> Harness:
    return Harness(limits=Limits(**limits))  # type: ignore[arg-type]


# -- the user record is read again ---------------------------------------------


def test_mail_right_after_login_does_not_read_the_store() -> None:
    """
    The checker read the record at login: a message sent at once (one
    message per connection) costs no further lookup.
    """
    harness = _harness(user_recheck_interval=5)
    client = harness.logged_in()
    harness.clock.advance(4.999)
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")
    assert harness.user_store.lookups == []


def test_mail_reads_the_record_again_once_it_is_older_than_the_interval() -> None:
    """
    At user_recheck_interval after the last read, MAIL reads the record
    again (once: the next MAIL within the interval does not).
    """
    harness = _harness(user_recheck_interval=5)
    client = harness.logged_in()
    harness.clock.advance(5)
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")
    assert harness.user_store.lookups == ["alice"]
    harness.clock.advance(4.9)
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")
    assert harness.user_store.lookups == ["alice"]


def test_zero_interval_reads_the_record_at_every_mail() -> None:
    """
    With an interval of 0, every MAIL reads the record.
    """
    harness = _harness(user_recheck_interval=0)
    client = harness.logged_in()
    for _ in range(3):
        assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")
    assert harness.user_store.lookups == ["alice"] * 3


def _revoked(harness: Harness, change: str) -> None:
    user = harness.users["alice"]
    if change == "password":
        harness.users["alice"] = attrs.evolve(
            user, password_hash=hash_password("a new password", rounds=4)
        )
    elif change == "inactive":
        harness.users["alice"] = attrs.evolve(user, active=False)
    elif change == "moved":
        harness.users["alice"] = attrs.evolve(user, list="other-list")
    else:
        del harness.users["alice"]


@pytest.mark.parametrize("change", ["password", "inactive", "deleted", "moved"])
def test_revoked_login_gets_530_and_is_forgotten(change: str) -> None:
    """
    After the password was regenerated, the user made inactive, deleted (or
    found in another list), an open session's next MAIL gets 530 5.7.0: the login is forgotten and
    nothing is sent; the connection stays, so the client can log in again.
    """
    harness = _harness(user_recheck_interval=5)
    client = harness.logged_in()
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")
    _revoked(harness, change)
    harness.clock.advance(5)
    replies = client.mail_transaction(message())
    assert replies[0] == b"530 5.7.0 Authentication required"
    assert len(harness.queue.submitted) == 1
    assert not client.closed
    assert client.session.delivery is None
    assert client.command(b"MAIL FROM:<a@example.com>") == [b"530 5.7.0 Authentication required"]


def test_login_with_the_new_password_works_after_revocation() -> None:
    """
    After the 530, AUTH with the regenerated password logs in again.
    """
    harness = _harness(user_recheck_interval=5)
    client = harness.logged_in()
    _revoked(harness, "password")
    harness.clock.advance(5)
    assert client.command(b"MAIL FROM:<a@example.com>")[0].startswith(b"530 ")
    reply = client.command(b"AUTH PLAIN " + plain(password="a new password"))
    assert reply[0].startswith(b"235 ")
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")


def test_narrowed_domains_apply_to_an_open_session() -> None:
    """
    A sender domain removed from the user applies to the next MAIL after
    the interval: 550 5.7.1 and an alert.
    """
    harness = _harness(user_recheck_interval=5)
    client = harness.logged_in()
    assert client.command(b"MAIL FROM:<a@example.com>")[0].startswith(b"250 ")
    client.command(b"RSET")
    harness.users["alice"] = attrs.evolve(
        harness.users["alice"], authorized_domains=("other.org",)
    )
    harness.clock.advance(5)
    assert client.command(b"MAIL FROM:<a@example.com>")[0].startswith(b"550 5.7.1 ")
    assert len(harness.alerts.of_type("sender_domain")) == 1


def test_changed_priority_applies_to_an_open_session() -> None:
    """
    Other changes to the record (here the default priority) apply too.
    """
    harness = _harness(user_recheck_interval=5)
    client = harness.logged_in()
    harness.users["alice"] = attrs.evolve(harness.users["alice"], priority=Priority.VERY_HIGH)
    harness.clock.advance(5)
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")
    [(envelope, _)] = harness.queue.submitted
    assert envelope.priority is Priority.VERY_HIGH


def test_pipelined_commands_wait_for_the_record() -> None:
    """
    While the record is read, pipelined RCPT and DATA wait; they are
    answered in order once it arrived.
    """
    harness = _harness(user_recheck_interval=5)
    harness.user_store.mode = "pending"
    client = harness.logged_in()
    harness.clock.advance(5)
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\nDATA\r\n")
    assert client.replies() == []
    harness.user_store.pending[0].callback(None)
    assert client.codes() == [b"250", b"250", b"354"]


def test_revocation_seen_while_commands_are_pipelined_refuses_them_all() -> None:
    """
    When the record says the login no longer stands, the pipelined RCPT and
    DATA are refused as out of sequence, and nothing is queued.
    """
    harness = _harness(user_recheck_interval=5)
    harness.user_store.mode = "pending"
    client = harness.logged_in()
    harness.clock.advance(5)
    _revoked(harness, "inactive")
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\nDATA\r\n")
    harness.user_store.pending[0].callback(None)
    assert client.codes() == [b"530", b"503", b"503"]
    assert harness.queue.submitted == []


def test_store_failure_at_mail_is_a_temporary_error() -> None:
    """
    A store that cannot answer gets the client a 451 4.3.0 (try again), not
    a send on an unchecked login.
    """
    harness = _harness(user_recheck_interval=5)
    client = harness.logged_in()
    harness.user_store.mode = "broken"
    harness.clock.advance(5)
    assert client.command(b"MAIL FROM:<a@example.com>") == [b"451 4.3.0 Local error in processing"]
    assert client.session.transaction is None
    harness.user_store.mode = "ok"
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")


def test_connection_lost_while_the_record_is_read_is_harmless() -> None:
    """
    A client that leaves while its record is read causes no error.
    """
    harness = _harness(user_recheck_interval=5)
    harness.user_store.mode = "pending"
    client = harness.logged_in()
    harness.clock.advance(5)
    client.send(b"MAIL FROM:<a@example.com>\r\n")
    client.lose()
    harness.user_store.pending[0].callback(None)
    assert client.replies() == []


# -- messages per session ------------------------------------------------------


def test_messages_per_session_at_the_limit_and_past_it() -> None:
    """
    max_messages_per_session transactions are served; the next MAIL gets
    421 4.7.0 and the connection is closed; the messages sent are queued.
    """
    harness = _harness(max_messages_per_session=3)
    client = harness.logged_in()
    for _ in range(3):
        assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")
    reply = client.command(b"MAIL FROM:<a@example.com>")
    assert reply[0].startswith(b"421 4.7.0 ")
    assert client.closed
    assert len(harness.queue.submitted) == 3


def test_refused_transactions_count_too() -> None:
    """
    A transaction counts from its accepted MAIL, whether or not a message
    comes of it.
    """
    harness = _harness(max_messages_per_session=2)
    client = harness.logged_in()
    client.send(b"MAIL FROM:<a@example.com>\r\nRSET\r\nMAIL FROM:<a@example.com>\r\nRSET\r\n")
    assert client.codes() == [b"250"] * 4
    assert client.command(b"MAIL FROM:<a@example.com>")[0].startswith(b"421 4.7.0 ")


# -- session lifetime -----------------------------------------------------------


def test_session_lifetime_at_the_limit_and_past_it() -> None:
    """
    A session that keeps busy is served until max_session_seconds; then it
    gets 421 4.7.0 and is closed.
    """
    harness = _harness(max_session_seconds=100, idle_timeout=60)
    client = harness.logged_in()
    for _ in range(9):
        harness.clock.advance(11)
        assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")
    harness.clock.advance(0.5)
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]
    harness.clock.advance(0.5)
    [reply] = client.replies()
    assert reply.startswith(b"421 4.7.0 ")
    assert b"session" in reply
    assert client.closed


def test_mail_after_the_session_lifetime_is_421() -> None:
    """
    MAIL itself checks the lifetime: one pipelined behind a message whose
    queueing outlasted the session is answered 421 4.7.0, not served.
    """
    harness = Harness(limits=Limits(max_session_seconds=100), queue=FakeQueue(mode="pending"))
    client = harness.logged_in()
    harness.clock.advance(99)
    client.mail_transaction(message())
    client.send(b"MAIL FROM:<a@example.com>\r\n")
    harness.clock.advance(2)
    assert not client.closed
    harness.queue.pending[0].callback(None)
    replies = client.replies()
    assert replies[0].startswith(b"250 2.0.0 Ok: queued as ")
    assert replies[1].startswith(b"421 4.7.0 ")
    assert client.closed
    assert client.session.transaction is None


def test_message_in_progress_at_the_session_lifetime_is_finished() -> None:
    """
    A transaction under way when the lifetime ends is not cut: its message
    is accepted, then the 421 follows.
    """
    harness = _harness(max_session_seconds=100)
    client = harness.logged_in()
    harness.clock.advance(99)
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\nDATA\r\n")
    assert client.codes() == [b"250", b"250", b"354"]
    harness.clock.advance(2)
    assert not client.closed
    client.send(message() + b".\r\n")
    harness.clock.advance(0)
    replies = client.replies()
    assert replies[0].startswith(b"250 2.0.0 Ok: queued as ")
    assert replies[1].startswith(b"421 4.7.0 ")
    assert client.closed
    assert len(harness.queue.submitted) == 1


def test_session_lifetime_runs_from_the_connection() -> None:
    """
    The lifetime counts from the connection, not from the login.
    """
    harness = _harness(max_session_seconds=100, idle_timeout=300)
    client = harness.connect()
    harness.clock.advance(60)
    assert client.login()[-1].startswith(b"235 ")
    harness.clock.advance(40)
    assert client.replies()[0].startswith(b"421 4.7.0 ")
    assert harness.clock.seconds() == START + 100


def test_user_with_other_fields_unchanged_keeps_its_memo() -> None:
    """
    Reading back an unchanged record keeps the session logged in with the
    same user.
    """
    harness = _harness(user_recheck_interval=0)
    client = harness.logged_in()
    before = client.session.delivery.user
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")
    assert client.session.delivery.user == before == make_user()
