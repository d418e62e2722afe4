"""core/tasks.py: the record lifecycle, the owner's decisions, and takeover."""

from __future__ import annotations

import random

import pytest

from meshscale.core.tasks import (
    GROUP_FLUSH_BYTES_PER_S,
    GROUP_FLUSH_MAX_S,
    GROUP_FLUSH_MIN_S,
    TERMINAL,
    TRANSITIONS,
    Ended,
    IllegalTransition,
    LookupAction,
    TaskBook,
    TaskRecord,
    TaskState,
    Verdict,
    adopter,
    group_flush_delay_s,
    lookup,
    move,
    upstream_failure,
)


def rec(tid: str = "t1", owner: str = "a", **kw: object) -> TaskRecord:
    kw.setdefault("args", b"x")
    return TaskRecord(tid, owner, "fn", **kw)  # type: ignore[arg-type]


def test_terminal_states_have_no_way_out() -> None:
    for state in TERMINAL:
        for name in TRANSITIONS:
            r = rec(state=TaskState(state))
            with pytest.raises(IllegalTransition, match=f"cannot {name}"):
                move(r, name)
    r = rec()
    move(r, "bind")
    move(r, "requeue")
    move(r, "bind")
    move(r, "done")
    assert r.state == TaskState.DONE


def test_first_outcome_wins_and_a_second_finish_is_refused() -> None:
    book = TaskBook("a")
    e = book.add(rec(), 0.0)
    assert book.outcome("t1", ok=True) is Verdict.ACCEPTED
    book.finish(e, TaskState.DONE, 1.0, value=b"v")
    assert book.outcome("t1", ok=False, kind="error") is Verdict.DUPLICATE
    with pytest.raises(IllegalTransition):
        book.finish(e, TaskState.FAILED, 2.0)
    assert e.rec.value == b"v" and e.rec.args is None
    assert book.outcome("nope", ok=True) is Verdict.DUPLICATE


def test_an_outcome_from_a_node_the_task_was_stopped_on_is_dropped() -> None:
    book = TaskBook("a")
    e = book.add(rec(), 0.0)
    book.stopped("t1", "b1")  # its class no longer allows b1's region
    assert book.outcome("t1", ok=False, kind="cancelled", node="b1") is Verdict.STOPPED
    assert book.outcome("t1", ok=True, node="b1") is Verdict.STOPPED
    assert e.rec.state not in TERMINAL and book.stats["outcomes_dropped.stopped"] == 2
    assert book.outcome("t1", ok=True, node="c1") is Verdict.ACCEPTED
    book.stopped("gone", "b1")  # not a live task here: nothing to do


def test_worker_crashes_are_retried_up_to_the_records_retries() -> None:
    book = TaskBook("a")
    book.add(rec(retries=2), 0.0)
    for _ in range(2):
        assert book.outcome("t1", ok=False, kind="worker_crashed") is Verdict.RETRY
        assert book.scheduler_finished("t1") == "resubmit"
        assert book.records["t1"].rec.state == TaskState.PENDING
    assert book.outcome("t1", ok=False, kind="worker_crashed") is Verdict.ACCEPTED
    # A result the scheduler took whose outcome never came: lost once retries are spent.
    book.add(rec("t2", retries=0), 0.0)
    assert book.scheduler_finished("t2") == "lost"


def test_ended_tasks_shrink_to_a_bounded_number_of_ended_records() -> None:
    book = TaskBook("a", max_records=3)
    entries = [book.add(rec(f"t{i}", args=b"x" * 1000, labels={"k": "v"}), float(i))
               for i in range(10)]
    # Live tasks are never dropped, however many (the scheduler bounds them).
    assert len(book.records) == 10 and not book.ended
    for i, e in enumerate(entries[:8]):
        full = book.finish(e, TaskState.DONE, 100.0 + i, value=b"%d" % i, node="n2")
        assert full is e.rec and full.state == TaskState.DONE  # the store gets it all
    # Ended: only the newest max_records are kept, and as Ended, not full records.
    assert list(book.ended) == ["t5", "t6", "t7"]
    assert all(isinstance(x, Ended) for x in book.ended.values())
    assert "t0" not in book and "t7" in book and "t8" in book and len(book) == 5
    assert book.stats["ended_evicted"] == 5
    kept = book.find("t7")
    assert isinstance(kept, Ended)
    assert (kept.state, kept.value, kept.node, kept.finished) == (TaskState.DONE, b"7", "n2",
                                                                  107.0)
    # What a listing or a result question reads survives; arguments and rules do not.
    back = book.record("t7")
    assert back is not None and back.args is None and back.labels == {}
    assert back.task_id == "t7" and back.owner == "a" and back.fn_id == "fn"
    # The entry a waiter holds still shows the whole ended record.
    assert entries[7].rec.labels == {"k": "v"}
    # An ended task is not live: outcomes for it are duplicates, it cannot be re-added.
    assert book.get("t7") is None
    assert book.outcome("t7", ok=True) is Verdict.DUPLICATE
    with pytest.raises(ValueError):
        book.add(rec("t7"), 0.0)
    with pytest.raises(ValueError):
        Ended.of(rec("t9"))


def test_ended_records_stay_bounded_over_a_long_run() -> None:
    book = TaskBook("a", max_records=100)
    for i in range(5000):
        e = book.add(rec(f"t{i}", args=b"a" * 100), float(i))
        book.finish(e, TaskState.DONE if i % 3 else TaskState.FAILED, float(i),
                    error="" if i % 3 else "boom")
        assert len(book.ended) <= 100 and not book.records
    assert len(book) == 100 and list(book.ended)[-1] == "t4999"


def test_adoption_moves_ownership_and_counts() -> None:
    book = TaskBook("b")
    stored = rec(owner="a", state=TaskState.RUNNING, node="c", adoptions=1)
    e, why = book.adopt(stored, 5.0)
    assert why is None
    assert (e.rec.owner, e.rec.state, e.rec.node, e.rec.adoptions, e.rec.previous_owner) \
        == ("b", TaskState.PENDING, "", 2, "a")
    assert stored.owner == "a"  # the stored copy is not changed in place
    _, why = TaskBook("c").adopt(rec(owner="a", args=None), 0.0)
    assert why is not None and "no arguments" in why
    with pytest.raises(IllegalTransition):
        TaskBook("d").adopt(rec(state=TaskState.DONE), 0.0)


def test_lookup_decisions() -> None:
    alive = {"a", "b", "c", "d"}
    assert lookup(rec(state=TaskState.DONE), "b", alive).action is LookupAction.ANSWER
    d = lookup(rec(owner="a"), "b", alive)
    assert (d.action, d.node) == (LookupAction.ASK_OWNER, "a")
    # The asker restarted and lost its memory: it takes its own task back.
    assert lookup(rec(owner="b"), "b", alive).action is LookupAction.ADOPT
    # Owner dead: exactly one node adopts, the others forward to it.
    live = {"b", "c", "d"}
    chosen = adopter("t1", live)
    for me in sorted(live):
        d = lookup(rec(owner="a"), me, live)
        if me == chosen:
            assert d.action is LookupAction.ADOPT
        else:
            assert (d.action, d.node) == (LookupAction.FORWARD, chosen)
            # A forwarded question is never forwarded again: no loop when views differ.
            assert lookup(rec(owner="a"), me, live, forwarded=True).action \
                is LookupAction.ADOPT


def test_adopters_spread_and_move_little_when_a_node_leaves() -> None:
    rng = random.Random(4)
    nodes = [f"n{i}" for i in range(10)]
    tids = [f"{rng.getrandbits(64):016x}.{i}" for i in range(2000)]
    before = {t: adopter(t, nodes) for t in tids}
    counts = {n: sum(1 for a in before.values() if a == n) for n in nodes}
    assert min(counts.values()) > 120 and max(counts.values()) < 280, counts
    after = {t: adopter(t, nodes[1:]) for t in tids}
    moved = [t for t in tids if before[t] != after[t]]
    assert all(before[t] == "n0" for t in moved)  # only the leaver's tasks move
    with pytest.raises(ValueError, match="no live node"):
        adopter("t", [])


def test_upstream_failure_names_the_first_upstream_task_that_did_not_end_done() -> None:
    done = ("a", "done", "", "", "", None)
    failed = ("b", "failed", "raised", "ValueError: no", "Traceback ...", b"exc")
    cancelled = ("c", "cancelled", "cancelled", "cancelled", "", None)
    assert upstream_failure([]) is None
    assert upstream_failure([done, done]) is None
    f = upstream_failure([done, failed, cancelled])
    assert f is not None
    assert f.kind == "upstream"
    assert f.error == "upstream task b failed (raised): ValueError: no"
    assert (f.traceback, f.exc) == ("Traceback ...", b"exc")
    f = upstream_failure([cancelled, failed])
    assert f is not None and f.error.startswith("upstream task c was cancelled")
    with pytest.raises(AssertionError, match="has not ended"):
        upstream_failure([("d", "running", "", "", "", None)])


def test_a_task_sets_record_is_rewritten_at_a_bounded_rate() -> None:
    assert group_flush_delay_s(0) == GROUP_FLUSH_MIN_S
    assert group_flush_delay_s(1_000) == GROUP_FLUSH_MIN_S  # a small set: as soon as before
    # A 512-task map set (~130 KB for no-ops): about twice a second, not 20 times.
    d = group_flush_delay_s(130_000)
    assert 130_000 / d <= GROUP_FLUSH_BYTES_PER_S + 1 and d > 8 * GROUP_FLUSH_MIN_S
    # The KV's largest value: still written within GROUP_FLUSH_MAX_S.
    assert group_flush_delay_s(1 << 20) == GROUP_FLUSH_MAX_S <= 1.0
    sizes = [0, 10_000, 50_000, 100_000, 300_000, 900_000]
    delays = [group_flush_delay_s(n) for n in sizes]
    assert delays == sorted(delays)
    with pytest.raises(ValueError):
        group_flush_delay_s(-1)
