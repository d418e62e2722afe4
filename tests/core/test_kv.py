from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshscale.core.hlc import HLCTimestamp
from meshscale.core.kv import (
    Consistency,
    KVCoordinator,
    KVRecord,
    kv_placement,
    kv_replicas,
    lww_merge,
    merge_optional,
)
from meshscale.core.placement import Candidate, PlacementError, Residency


def rec(value: bytes | None, wall: int, node: str = "a", logical: int = 0) -> KVRecord:
    return KVRecord("k", value, HLCTimestamp(wall, logical, node))


records = st.builds(
    rec,
    st.one_of(st.none(), st.binary(max_size=4)),
    st.integers(0, 5),
    st.sampled_from(["a", "b", "c"]),
    st.integers(0, 2),
)


def test_higher_timestamp_wins_either_order() -> None:
    old, new = rec(b"old", 1), rec(b"new", 2)
    assert lww_merge(old, new) == new
    assert lww_merge(new, old) == new


def test_tie_of_time_broken_by_node_name() -> None:
    a, b = rec(b"x", 5, "a"), rec(b"y", 5, "b")
    assert lww_merge(a, b) == b == lww_merge(b, a)


def test_tombstone_wins_over_older_write_and_loses_to_newer() -> None:
    assert lww_merge(rec(b"v", 1), rec(None, 2)).value is None
    assert lww_merge(rec(b"v", 3), rec(None, 2)).value == b"v"


def test_merge_optional_none_loses() -> None:
    r = rec(b"v", 1)
    assert merge_optional(None, r) == r == merge_optional(r, None)
    assert merge_optional(None, None) is None


def test_merge_of_different_keys_is_refused() -> None:
    with pytest.raises(ValueError):
        lww_merge(rec(b"v", 1), KVRecord("other", b"v", HLCTimestamp(1, 0, "a")))


@given(records, records, records)
def test_lww_merge_is_a_semilattice(a: KVRecord, b: KVRecord, c: KVRecord) -> None:
    assert lww_merge(a, b) == lww_merge(b, a)
    assert lww_merge(lww_merge(a, b), c) == lww_merge(a, lww_merge(b, c))
    assert lww_merge(a, a) == a


def test_consistency_required() -> None:
    assert [Consistency.ONE.required(n) for n in (1, 3, 5)] == [1, 1, 1]
    assert [Consistency.QUORUM.required(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert [Consistency.ALL.required(n) for n in (1, 3)] == [1, 3]
    with pytest.raises(ValueError):
        Consistency.ONE.required(0)


def test_kv_replicas_uses_placement_and_residency() -> None:
    view = [Candidate(f"n{i}", r, "z") for i, r in enumerate(["eu", "us", "ap", "eu", "us"])]
    reps = kv_replicas("dataset/latest", view)
    assert len(reps) == 3 and len(set(reps)) == 3
    assert reps == kv_replicas("dataset/latest", list(reversed(view)))
    eu = kv_replicas("k", view, residency=Residency(frozenset({"eu"})))
    assert set(eu) == {"n0", "n3"}
    with pytest.raises(PlacementError):
        kv_replicas("k", view, residency=Residency(frozenset({"mars"})))


def test_quorum_get_returns_winner_and_stale_replicas() -> None:
    op = KVCoordinator.for_get("k", ["a", "b", "c"], Consistency.QUORUM)
    op.on_reply("a", rec(b"old", 1))
    assert op.outcome is None
    op.on_reply("b", rec(b"new", 2, "b"))
    assert op.outcome is not None and op.outcome.ok
    assert op.outcome.record == rec(b"new", 2, "b")
    assert op.outcome.stale == ("a",)
    # A late reply still refines the repair list; the outcome stays.
    op.on_reply("c", None)
    assert [n for n, _ in op.read_repair()] == ["a", "c"]


def test_get_of_missing_key_is_ok_and_none() -> None:
    op = KVCoordinator.for_get("k", ["a", "b", "c"], Consistency.ONE)
    op.on_reply("b", None)
    assert op.outcome is not None and op.outcome.ok and op.outcome.record is None


def test_all_fails_as_soon_as_one_replica_fails() -> None:
    op = KVCoordinator.for_get("k", ["a", "b", "c"], Consistency.ALL)
    op.on_reply("a", rec(b"v", 1))
    op.on_failure("c")
    assert op.outcome is not None and not op.outcome.ok
    assert "ALL needs 3" in op.outcome.reason


def test_put_quorum_and_expire() -> None:
    r = rec(b"v", 7)
    op = KVCoordinator.for_put(r, ["a", "b", "c"], Consistency.QUORUM)
    op.on_reply("a", None)
    op.on_failure("b")
    assert op.outcome is None
    op.on_reply("c", None)
    assert op.outcome is not None and op.outcome.ok and op.outcome.record == r
    op2 = KVCoordinator.for_put(r, ["a", "b", "c"], Consistency.QUORUM)
    op2.on_reply("a", None)
    op2.expire()
    assert op2.outcome is not None and not op2.outcome.ok and "timeout" in op2.outcome.reason


def test_replies_from_strangers_and_duplicates_are_ignored() -> None:
    op = KVCoordinator.for_get("k", ["a", "b", "c"], Consistency.QUORUM)
    op.on_reply("x", rec(b"v", 1))
    op.on_reply("a", rec(b"v", 1))
    op.on_reply("a", rec(b"v", 1))
    op.on_failure("a")
    assert op.outcome is None and op.failures == set()
    # A reply about another key counts as a failure of that replica.
    op.on_reply("b", KVRecord("other", b"v", HLCTimestamp(1, 0, "a")))
    assert op.failures == {"b"}


def test_coordinator_rejects_bad_replica_lists() -> None:
    with pytest.raises(ValueError):
        KVCoordinator.for_get("k", [], Consistency.ONE)
    with pytest.raises(ValueError):
        KVCoordinator.for_get("k", ["a", "a"], Consistency.ONE)


def test_a_failed_write_names_what_the_replicas_said() -> None:
    rec = KVRecord("k", b"v", HLCTimestamp(1, 0, "a"))
    c = KVCoordinator.for_put(rec, ("a", "b", "c"), Consistency.QUORUM)
    c.on_failure("a", "disk_full: writing 900000 bytes would leave 0 free")
    c.on_failure("b")
    assert c.outcome is not None and not c.outcome.ok
    assert "2 of 3 replicas failed (a: disk_full: writing 900000" in c.outcome.reason


def test_a_full_node_is_left_out_of_kv_writes_but_asked_on_reads_and_deletes() -> None:
    view = [Candidate(f"n{i}", r, "z") for i, r in enumerate(["eu", "us", "ap", "eu", "us"])]
    home = kv_replicas("k", view)
    full = home[0]
    fview = [Candidate(c.name, c.region, c.zone, full=c.name == full) for c in view]
    where = kv_placement("k", fview)
    assert full not in where.replicas and len(where.replicas) == 3
    assert where.full == (full,)
    assert set(home) - {full} <= set(where.replicas)
    assert kv_placement("k", view).replicas == tuple(home) and kv_placement("k", view).full == ()
    # Every node full: the replica set itself (values will be refused, deletes work).
    allfull = [Candidate(c.name, c.region, c.zone, full=True) for c in view]
    assert kv_placement("k", allfull).replicas == tuple(home)
    # A value is never sent to a full node.
    with pytest.raises(ValueError):
        KVCoordinator.for_put(rec(b"v", 1), where.replicas, Consistency.ALL, where.full)
    # ALL over the write set succeeds although the full node refuses (it is not counted).
    op = KVCoordinator.for_put(rec(None, 2), where.replicas, Consistency.ALL, where.full)
    assert op.asked == (*where.replicas, full)
    op.on_failure(full, "disk_full")
    for n in where.replicas:
        assert op.outcome is None
        op.on_reply(n, None)
    assert op.outcome is not None and op.outcome.ok


def test_a_full_nodes_read_reply_is_merged_not_counted_nor_repaired() -> None:
    op = KVCoordinator.for_get("k", ["a", "b", "c"], Consistency.QUORUM, extra=["f"])
    op.on_reply("f", rec(b"newest", 9, "f"))
    op.on_reply("a", None)
    assert op.outcome is None  # the full node's reply does not count
    op.on_reply("b", rec(b"old", 1))
    assert op.outcome is not None and op.outcome.ok
    assert op.outcome.record == rec(b"newest", 9, "f")
    assert {n for n, _ in op.read_repair()} == {"a", "b"}
    # A full node's failure decides nothing either.
    op = KVCoordinator.for_get("k", ["a"], Consistency.ALL, extra=["f"])
    op.on_failure("f")
    assert op.outcome is None
    op.on_reply("a", None)
    assert op.outcome is not None and op.outcome.ok
