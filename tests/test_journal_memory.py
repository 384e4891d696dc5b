"""
Tests for L{smtpgw.memjournal.MemoryJournal}: like the file journal, it
refuses an accept whose queue id belongs to a live message.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from smtpgw.interfaces import IJournal, JournalUnavailable
from smtpgw.journal import QueueIdInUse
from smtpgw.memjournal import MemoryJournal
from smtpgw.model import Envelope, Priority


def envelope(queue_id: str) -> Envelope:
    return Envelope(queue_id, "news", "u1", "a@example.com", ("b@example.org",), Priority.LOW, 1.0)


def failure_of(d: Any) -> Failure:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    [failure] = failures
    return failure


def test_provides_ijournal() -> None:
    """
    MemoryJournal provides IJournal.
    """
    assert verifyObject(IJournal, MemoryJournal())


@pytest.mark.parametrize("manual", [False, True])
def test_accept_of_a_live_queue_id_is_refused(manual: bool) -> None:
    """
    A second accept with the queue id of a live message, durable or still
    pending, fails with L{QueueIdInUse}; the first message is kept. Once it
    is final, its id may be used again.
    """
    journal = MemoryJournal(manual=manual)
    journal.accept(envelope("Q1"), b"first\r\n")
    assert failure_of(journal.accept(envelope("Q1"), b"second\r\n")).check(QueueIdInUse)
    journal.flush()
    assert failure_of(journal.accept(envelope("Q1"), b"second\r\n")).check(QueueIdInUse)
    [message] = journal.replay()
    assert journal.read(message.location).result == (envelope("Q1"), b"first\r\n")
    journal.record_state("Q1", "delivered")
    journal.flush()
    journal.accept(envelope("Q1"), b"again\r\n")
    journal.flush()
    [message] = journal.replay()
    assert journal.read(message.location).result == (envelope("Q1"), b"again\r\n")


def test_remaining_recipients_are_kept_like_the_file_journal() -> None:
    """
    A state change with the remaining recipients is replayed with them;
    later changes without them keep them; bounced recipients need the
    remaining ones; nothing is durable before a flush in manual mode.
    """
    journal = MemoryJournal(manual=True)
    journal.accept(envelope("Q1"), b"x\r\n")
    journal.record_state("Q1", "deferred", 1, 60.0, remaining=["c@x"], bounced=["b@x"])
    assert list(journal.replay()) == []
    journal.flush()
    journal.record_state("Q1", "sending", 1)
    journal.flush()
    [message] = journal.replay()
    assert (message.state, message.remaining, message.bounced) == ("sending", ("c@x",), ("b@x",))
    assert journal.progress_records == [("Q1", ("c@x",), ("b@x",))]
    assert failure_of(journal.record_state("Q1", "deferred", bounced=["a@x"])).check(ValueError)


def test_queue_state_is_recorded() -> None:
    """
    The queue's paused state is durable once flushed, and refused like any
    write while the journal is unavailable.
    """
    journal = MemoryJournal(manual=True)
    d = journal.record_queue_state(True)
    assert (journal.queue_paused, d.called) == (False, False)
    journal.flush()
    assert (journal.queue_paused, journal.queue_records) == (True, [True])
    journal.available = False
    assert failure_of(journal.record_queue_state(False)).check(JournalUnavailable)
    assert journal.queue_paused is True
