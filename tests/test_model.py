"""
Tests for L{smtpgw.model.QueueIdGenerator}: queue ids are short, safe as
file names, unique and sorted by acceptance time, even when the clock steps
back.
"""

from __future__ import annotations

import itertools
import re
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgw.model import QueueIdGenerator

T0 = 1_700_000_000.0
ID = re.compile(r"[0-9A-F]{24}")


def test_id_is_24_hex_digits_of_time_salt_and_counter() -> None:
    """
    An id is 11 hex digits of milliseconds, 8 of the salt, 5 of the
    counter: upper-case hex only, safe as a file name and as the last word
    of the 250 reply.
    """
    ids = QueueIdGenerator(salt=0xDEADBEEF)
    first = ids.next(T0 + 0.0125)
    assert ID.fullmatch(first)
    assert len(first) == QueueIdGenerator.LENGTH == 24
    assert first == f"{int(T0 * 1000) + 12:011X}DEADBEEF00000"
    assert ids.next(T0 + 0.0125) == f"{int(T0 * 1000) + 12:011X}DEADBEEF00001"
    assert ids.next(T0 + 0.0135) == f"{int(T0 * 1000) + 13:011X}DEADBEEF00000"


def test_salt_is_random_per_generator() -> None:
    """
    Without a salt, each generator draws 32 random bits: generators made
    at the same moment give different ids.
    """
    salts = {QueueIdGenerator().next(T0)[11:19] for _ in range(50)}
    assert len(salts) > 45


@pytest.mark.parametrize("salt", [-1, 1 << 32])
def test_salt_must_fit_in_32_bits(salt: int) -> None:
    """
    A salt outside 32 bits is refused (0 and 2**32 - 1 are the limits).
    """
    assert QueueIdGenerator(salt=0).next(T0)[11:19] == "00000000"
    assert QueueIdGenerator(salt=(1 << 32) - 1).next(T0)[11:19] == "FFFFFFFF"
    with pytest.raises(ValueError, match="32 bits"):
        QueueIdGenerator(salt=salt)


def test_clock_stepping_back_never_repeats_nor_reorders() -> None:
    """
    When the clock steps back, ids keep the latest millisecond and go on
    counting: they still increase, so none repeats an earlier one.
    """
    ids = QueueIdGenerator(salt=1)
    made = [ids.next(T0 + 10), ids.next(T0 + 10)]
    made += [ids.next(T0) for _ in range(5)]
    made.append(ids.next(T0 + 20))
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    assert made[-2][:11] == made[0][:11]


def test_counter_running_out_moves_to_the_next_millisecond() -> None:
    """
    The counter holds 2**20 ids a millisecond: the last one has counter
    FFFFF, and the one after it takes the next millisecond with counter 0.
    """
    ids = QueueIdGenerator(salt=7)
    millis = int(T0 * 1000)
    ids.next(T0)
    # As if 2**20 - 2 more ids had been made in this millisecond.
    ids._counter = 0xFFFFE
    last = ids.next(T0)
    assert last == f"{millis:011X}00000007FFFFF"
    assert ids.next(T0) == f"{millis + 1:011X}0000000700000"


@given(st.lists(st.floats(T0 - 1e6, T0 + 1e6), min_size=1, max_size=200))
def test_ids_always_increase_whatever_the_clock_does(times: list[float]) -> None:
    """
    For any sequence of clock readings, one generator's ids strictly
    increase.
    """
    ids = QueueIdGenerator(salt=3)
    made = [ids.next(now) for now in times]
    assert all(a < b for a, b in itertools.pairwise(made))


def test_ids_sort_by_acceptance_time_across_generators() -> None:
    """
    Ids of different generators (different processes) sort by their
    millisecond first.
    """
    early = QueueIdGenerator(salt=0xFFFFFFFF).next(T0)
    late = QueueIdGenerator(salt=0).next(T0 + 0.001)
    assert early < late


def test_unique_across_threads() -> None:
    """
    Ids made from several threads at once are all different.
    """
    ids = QueueIdGenerator()
    made: list[list[str]] = [[] for _ in range(4)]

    def make(into: list[str]) -> None:
        into.extend(ids.next(T0) for _ in range(5000))

    threads = [threading.Thread(target=make, args=(into,)) for into in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({i for batch in made for i in batch}) == 20000


def test_time_before_the_epoch_gives_millisecond_zero() -> None:
    """
    A clock before the epoch (a broken one) still gives a well-formed id.
    """
    assert QueueIdGenerator(salt=5).next(-3.0) == "00000000000" + "00000005" + "00000"
