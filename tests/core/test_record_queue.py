"""``core.tasks.RecordQueue``: when an owner's task records go to the KV, and with which
(issue #19: a record write was the largest CPU cost of a lone task)."""

from __future__ import annotations

import pytest

from meshscale.core.tasks import RecordQueue, Unrecorded


def test_an_urgent_record_is_due_at_once_and_takes_every_record_waiting() -> None:
    q = RecordQueue(0.05)
    q.put("task/a", b"a-done", 0.0)  # an end: nothing waits for it
    q.put("task/b", b"b-done", 0.001)
    assert not q.due(0.01)
    q.put("task/c", b"c-pending", 0.02, urgent=True)  # a submit waits for it
    assert q.due(0.02)
    assert q.take() == [("task/a", b"a-done"), ("task/b", b"b-done"),
                        ("task/c", b"c-pending")]
    assert len(q) == 0 and q.in_flight == 1


def test_records_nothing_waits_for_wait_at_most_the_window_for_company() -> None:
    q = RecordQueue(0.05)
    q.put("task/a", b"1", 10.0)
    assert q.deadline() == pytest.approx(10.05)
    q.put("task/b", b"2", 10.04)
    assert q.deadline() == pytest.approx(10.05)  # the oldest decides
    assert not q.due(10.049)
    assert q.due(10.05)
    assert q.take() == [("task/a", b"1"), ("task/b", b"2")]
    q.written()
    assert q.deadline() is None and not q.due(99.0)


def test_a_key_put_again_before_it_is_written_is_written_once_with_its_last_value() -> None:
    q = RecordQueue(0.05)
    q.put("task/a", b"pending", 0.0, urgent=True)
    q.put("task/a", b"done", 0.0)  # ended before its submit record went out
    assert len(q) == 1
    assert q.take() == [("task/a", b"done")]
    assert q.stats["records_replaced"] == 1
    # Put again while its batch is in flight: a new write of its own.
    q.put("task/a", b"done-again", 1.0)
    assert len(q) == 1


def test_a_batch_is_bounded_by_items_and_bytes_beyond_its_first() -> None:
    q = RecordQueue(10.0, max_items=3, max_bytes=10)
    for i in range(3):
        q.put(f"k{i}", b"x", 0.0)
    assert q.due(0.0)  # full: no need to wait for the window
    assert [k for k, _ in q.take()] == ["k0", "k1", "k2"]
    q.written()
    q.put("big", b"y" * 50, 0.0)  # alone larger than a batch: goes, alone
    q.put("small", b"z", 0.0)
    assert q.due(0.0)
    assert q.take() == [("big", b"y" * 50)]
    assert not q.due(0.0)  # one record waiting, inside its window
    assert q.deadline() == pytest.approx(10.0)


def test_batches_in_flight_are_bounded_and_the_rest_wait_their_turn() -> None:
    q = RecordQueue(0.0, max_in_flight=2)
    for i in range(2):
        q.put(f"k{i}", b"v", 0.0, urgent=True)
        assert q.due(0.0)
        q.take()
    assert q.in_flight == 2
    q.put("k2", b"v", 0.0, urgent=True)
    assert not q.due(0.0) and q.deadline() is None
    q.written()
    assert q.due(0.0)
    with pytest.raises(ValueError, match="in flight"):
        RecordQueue().written()


def test_hurry_makes_every_waiting_record_due() -> None:
    q = RecordQueue(60.0)
    q.put("task/a", b"1", 0.0)
    assert not q.due(1.0)
    q.hurry()
    assert q.due(1.0)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        RecordQueue(-1.0)
    with pytest.raises(ValueError):
        RecordQueue(max_items=0)


def test_a_missing_record_is_not_yet_unknown_within_the_grace() -> None:
    u = Unrecorded(2.05)
    assert not u.missing("t", 10.0)  # first miss: the wait starts
    assert not u.missing("t", 12.0)
    assert u.missing("t", 12.05)  # missing for the whole grace: unknown
    assert len(u) == 0
    assert not u.missing("t", 13.0)  # asked again: a new wait


def test_a_record_found_ends_its_wait_and_a_clock_gone_back_restarts_it() -> None:
    u = Unrecorded(1.0)
    assert not u.missing("a", 5.0)
    u.found("a")
    assert not u.missing("a", 5.9)  # its wait started again at 5.9
    assert not u.missing("a", 6.5)
    assert not u.missing("a", 3.0)  # the clock went back: from 3.0 now
    assert not u.missing("a", 3.9)
    assert u.missing("a", 4.0)
    u.found("never-missed")  # nothing to forget: no error


def test_unrecorded_ids_are_bounded_oldest_first() -> None:
    u = Unrecorded(1.0, max_ids=2)
    for tid, t in (("a", 0.0), ("b", 0.1), ("c", 0.2)):
        assert not u.missing(tid, t)
    assert len(u) == 2
    assert not u.missing("a", 1.5)  # dropped: its wait starts again (later, never wrong)
    assert u.missing("c", 1.5)
    with pytest.raises(ValueError):
        Unrecorded(-1.0)
    with pytest.raises(ValueError):
        Unrecorded(1.0, max_ids=0)
