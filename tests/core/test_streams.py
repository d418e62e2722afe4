"""Streams without I/O: the bounded shard log (offsets, credit, commits, retention, the
backup's copy), operator placement and the shard's backup (near-source fail-over, central
and regional HRW spread, residency, labels), and the source residency check."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from meshscale.core.placement import Candidate, PlacementError, Residency
from meshscale.core.scheduling import (
    Central,
    InRegions,
    NodeState,
    Resources,
    SchedulingError,
)
from meshscale.core.streams import (
    AckWindow,
    LogEntry,
    OperatorPlacement,
    ShardLog,
    ShardLogConfig,
    ShardSource,
    backup_for,
    candidates_to_states,
    central_region,
    check_source_allowed,
    direct_reads,
    distance_class,
    frozen_copy_targets,
    operator_now,
    place_operator,
    releasable,
    runners_wanted,
    shard_copies,
    shard_holder,
    shard_key,
    shard_refusal,
    shard_runner,
    source_id,
    split_source,
    topic_rule,
)

# --------------------------------------------------------------------------- helpers


def rec(i: int, value: bytes = b"v", key: str = "k") -> tuple[str, bytes, str, float]:
    return (key, value, f"r{i}", float(i))


def recs(start: int, n: int, value: bytes = b"v") -> list[tuple[str, bytes, str, float]]:
    return [rec(i, value) for i in range(start, start + n)]


def offsets(entries: Sequence[LogEntry]) -> list[int]:
    return [e.offset for e in entries]


def check_shape(log: ShardLog) -> None:
    assert offsets(log.entries) == list(range(log.base, log.head))
    assert log.head == log.base + len(log.entries)
    assert log.bytes == sum(e.size for e in log.entries)


def cand(name: str, region: str, zone: str | None = None,
         labels: dict[str, str] | None = None) -> Candidate:
    return Candidate(name, region, zone or f"{region}-a", labels or {})


def state(c: Candidate, cpus: float = 4.0) -> NodeState:
    return NodeState(member=c, capacity=Resources(cpus, 8000, 0))


# eu has two zones (e1, e2 share eu-a; e3 is in eu-b), us has three nodes, ap one.
E1 = cand("e1", "eu", "eu-a")
E2 = cand("e2", "eu", "eu-a")
E3 = cand("e3", "eu", "eu-b")
U1 = cand("u1", "us", "us-a")
U2 = cand("u2", "us", "us-b")
U3 = cand("u3", "us", "us-c")
A1 = cand("a1", "ap", "ap-a")
MESH = [E1, E2, E3, U1, U2, U3, A1]
OP = OperatorPlacement("score")


def states(cands: Sequence[Candidate]) -> list[NodeState]:
    return [state(c) for c in cands]


def without(*gone: Candidate) -> list[Candidate]:
    return [c for c in MESH if c not in gone]


# --------------------------------------------------------------------------- shard log


def test_offsets_are_contiguous_from_zero() -> None:
    log = ShardLog("t", "e1")
    assert (log.base, log.head, log.bytes) == (0, 0, 0)
    first = log.append(recs(0, 3))
    second = log.append(recs(3, 2))
    assert offsets(first) == [0, 1, 2]
    assert offsets(second) == [3, 4]
    assert [e.rid for e in log.entries] == [f"r{i}" for i in range(5)]
    assert log.head == 5 and log.appended == 5
    check_shape(log)


def test_entry_size_counts_key_value_rid_and_overhead() -> None:
    e = LogEntry(0, "key", b"12345", "rid1", 0.0)
    assert e.size == 3 + 5 + 4 + 24


def test_room_shrinks_against_the_slowest_operator() -> None:
    log = ShardLog("t", "e1", ShardLogConfig(max_backlog=5, max_records=10))
    log.register("fast")
    log.register("slow")
    assert log.room() == 5
    log.append(recs(0, 2))
    assert (log.backlog(), log.room()) == (2, 3)
    log.commit("fast", 2)
    assert log.room() == 3, "the slow operator still holds the backlog"
    log.append(recs(2, 3))
    assert (log.backlog(), log.room()) == (5, 0)
    log.commit("slow", 1)
    assert (log.backlog(), log.room()) == (4, 1)
    check_shape(log)


def test_backlog_max_is_the_high_water_mark_of_the_backlog() -> None:
    log = ShardLog("t", "e1", ShardLogConfig(max_backlog=5, max_records=10))
    log.register("op")
    assert log.backlog_max == 0
    log.append(recs(0, log.room()))
    log.commit("op", 4)
    assert (log.backlog(), log.backlog_max) == (1, 5)
    log.append(recs(5, 2))
    assert (log.backlog(), log.backlog_max) == (3, 5), "kept, not overwritten"
    backup = ShardLog("t", "e1", log.config)
    backup.register("op")
    backup.apply(list(log.entries))
    assert backup.backlog_max == 3
    # Entries come with the primary's low water: the backlog is noted after its commit,
    # so a batch that arrives with the commits that made room for it is not counted twice.
    log.commit("op", 7)
    log.append(recs(7, 5))
    assert log.backlog() == 5 and log.backlog_max == 5
    backup.apply(list(log.entries)[-5:], low=7)
    assert backup.committed["op"] == 7 and backup.backlog() == 5 and backup.backlog_max == 5
    # An operator added to a topic that kept records without one starts with them all:
    # the backlog can then exceed max_backlog (room stays 0 until it catches up), and the
    # high-water mark says so.
    late = ShardLog("t", "e1", ShardLogConfig(max_backlog=2, max_records=4))
    late.append(recs(0, 4))
    late.register("op")
    assert late.backlog_max == 4 > late.config.max_backlog and late.room() == 0


def test_commit_frees_room_and_retention_drops_committed_records() -> None:
    log = ShardLog("t", "e1", ShardLogConfig(max_backlog=4, max_records=8))
    log.register("op")
    log.append(recs(0, 4))
    assert log.room() == 0
    full = log.bytes
    log.commit("op", 3)
    assert log.room() == 3
    assert log.base == 3 and offsets(log.entries) == [3]
    assert log.bytes < full and log.bytes == log.entries[0].size
    assert log.evicted == 0, "dropping committed records is not an eviction"
    log.commit("op", 4)
    assert (log.base, log.head, log.bytes, log.room()) == (4, 4, 0, 4)
    check_shape(log)


def test_releasable_is_the_low_water_bounded_by_the_confirmed_copy() -> None:
    assert releasable(None, None) is None
    assert releasable(None, 5) is None  # no operator: retention by size bounds alone
    assert releasable(7, None) == 7  # no copy awaited (a backup's copy, no backup)
    assert releasable(7, 5) == 5
    assert releasable(3, 5) == 3


def test_a_primary_keeps_committed_records_until_its_backup_confirms_them() -> None:
    """An operator may commit records the backup does not hold yet (the primary wakes its
    readers at the append): they stay until the copy is confirmed, so the copy sent next
    still has them."""
    log = ShardLog("t", "e1", ShardLogConfig(max_backlog=4, max_records=8))
    log.copied = 0
    log.register("op")
    log.append(recs(0, 4))
    log.confirm_copy(2)
    log.commit("op", 4)
    assert log.room() == 4, "a commit frees credit at once"
    assert log.base == 2 and offsets(log.read(0, 10)) == [2, 3]
    log.confirm_copy(1)  # a late, smaller confirmation moves nothing back
    assert log.copied == 2 and log.base == 2
    log.confirm_copy(99)  # clamped to the head
    assert (log.copied, log.base, log.bytes) == (4, 4, 0)
    log.append(recs(4, 1))
    log.commit("op", 5)
    assert log.base == 4
    log.confirm_copy(None)  # no backup left: retention by the commits alone
    assert log.copied is None and log.base == 5
    check_shape(log)


def test_records_held_for_their_copy_count_against_the_logs_bounds() -> None:
    log = ShardLog("t", "e1", ShardLogConfig(max_backlog=2, max_records=3))
    log.copied = 0
    log.register("op")
    log.append(recs(0, 2))
    log.commit("op", 2)
    assert log.backlog() == 0 and log.room() == 1, "max_records: 2 held for their copy"
    log.append(recs(2, 1))
    assert log.room() == 0 and len(log.entries) == 3
    log.confirm_copy(2)
    assert log.room() == 1 and offsets(log.entries) == [2]  # the backlog's credit again


def test_commit_never_moves_back_and_is_clamped_to_the_head() -> None:
    log = ShardLog("t", "e1")
    log.register("op")
    log.append(recs(0, 3))
    log.commit("op", 2)
    log.commit("op", 1)
    assert log.committed["op"] == 2
    log.commit("op", 99)
    assert log.committed["op"] == 3
    assert log.backlog() == 0 and log.room() == log.config.max_backlog


def test_commit_of_an_unknown_operator_registers_it() -> None:
    log = ShardLog("t", "e1")
    log.append(recs(0, 3))
    log.commit("late", 1)
    assert log.committed == {"late": 1}
    assert log.base == 1


def test_operatorless_log_never_blocks_and_evicts_the_oldest() -> None:
    cfg = ShardLogConfig(max_backlog=2, max_records=5)
    log = ShardLog("t", "e1", cfg)
    for i in range(12):
        assert log.room() == cfg.max_backlog
        log.append([rec(i)])
    assert len(log.entries) == 5
    assert offsets(log.entries) == list(range(7, 12))
    assert log.evicted == 7 and log.base == 7 and log.appended == 12
    assert log.low_water() is None and log.backlog() == 0
    check_shape(log)


def test_operatorless_log_is_bounded_by_bytes_and_keeps_accepting() -> None:
    # Records of 50 bytes against a 400-byte bound, far below max_records: a consumer-less
    # topic must evict by bytes too, never block forever.
    log = ShardLog("t", "e1", ShardLogConfig(max_backlog=3, max_records=1000, max_bytes=400))
    for i in range(40):
        assert log.room() > 0, f"blocked after {i} records"
        log.append([rec(i, b"x" * 24)])
        assert log.bytes <= 400
    assert log.head == 40 and log.evicted == 40 - len(log.entries) > 0
    assert offsets(log.entries)[-1] == 39
    check_shape(log)


def test_a_log_with_an_operator_never_evicts_uncommitted_records() -> None:
    cfg = ShardLogConfig(max_backlog=3, max_records=3)
    log = ShardLog("t", "e1", cfg)
    log.register("op")
    log.append(recs(0, 3))
    assert log.room() == 0
    log.append(recs(3, 4))  # a caller that ignored room(): still nothing evicted
    assert offsets(log.entries) == list(range(7))
    assert log.evicted == 0 and log.room() == 0
    log.commit("op", 5)
    assert offsets(log.entries) == [5, 6]
    assert log.evicted == 0
    check_shape(log)


def test_registering_an_operator_stops_eviction_from_its_offset() -> None:
    log = ShardLog("t", "e1", ShardLogConfig(max_backlog=2, max_records=4))
    log.append(recs(0, 6))
    assert log.base == 2 and log.evicted == 2
    log.register("op")
    assert log.committed["op"] == 2 and log.backlog() == 4 and log.room() == 0
    log.commit("op", 5)
    assert log.base == 5 and log.room() == 1
    log.append(recs(6, 1))
    assert log.evicted == 2


def test_max_bytes_makes_room_zero_until_a_commit() -> None:
    log = ShardLog("t", "e1", ShardLogConfig(max_backlog=100, max_records=100, max_bytes=100))
    log.register("op")
    log.append([rec(0, b"x" * 40)])  # 1 + 40 + 2 + 24 = 67 bytes
    assert log.bytes == 67 and log.room() == 99
    log.append([rec(1, b"x" * 40)])
    assert log.bytes == 134 and log.backlog() == 2
    assert log.room() == 0
    log.commit("op", 1)
    assert log.bytes == 67 and log.room() == 99
    assert offsets(log.entries) == [1]


def test_read_clamps_to_base_and_respects_limit_and_bytes() -> None:
    log = ShardLog("t", "e1", ShardLogConfig(max_backlog=3, max_records=6))
    log.append([rec(i, b"x" * 10) for i in range(10)])
    assert log.base == 4
    assert offsets(log.read(0, 100)) == [4, 5, 6, 7, 8, 9]
    assert offsets(log.read(6, 2)) == [6, 7]
    assert offsets(log.read(8, 100)) == [8, 9]
    assert log.read(10, 5) == [] and log.read(50, 5) == []
    assert log.read(4, 0) == []
    size = log.entries[0].size  # 1 + 10 + 2 + 24 = 37
    assert offsets(log.read(4, 100, max_bytes=2 * size)) == [4, 5]
    assert offsets(log.read(4, 100, max_bytes=2 * size + 1)) == [4, 5]
    assert offsets(log.read(4, 100, max_bytes=2 * size - 1)) == [4]
    assert offsets(log.read(4, 100, max_bytes=1)) == [4], "at least one entry always"
    assert offsets(log.read(0, 100, max_bytes=0)) == [4]


def test_register_with_and_without_offset() -> None:
    log = ShardLog("t", "e1", ShardLogConfig(max_backlog=10, max_records=10))
    log.append(recs(0, 5))
    log.register("a")
    log.register("b", 3)
    assert log.committed == {"a": 0, "b": 3}
    assert log.low_water() == 0 and log.backlog() == 5
    log.register("a", 4)  # already registered: keeps its position
    assert log.committed["a"] == 0
    log.commit("a", 4)
    assert log.low_water() == 3 and log.base == 3 and log.backlog() == 2


def test_register_past_the_head_is_clamped() -> None:
    log = ShardLog("t", "e1", ShardLogConfig(max_backlog=4, max_records=8))
    log.append(recs(0, 2))
    log.register("op", 50)
    assert log.committed["op"] == 2
    assert log.backlog() == 0 and log.room() == 4
    new = log.append(recs(2, 2))
    assert offsets(log.entries) == offsets(new) == [2, 3], "new records kept for the operator"
    assert log.backlog() == 2 and log.room() == 2


def test_apply_skips_resends_appends_at_same_offsets_and_restarts_at_a_gap() -> None:
    primary = ShardLog("t", "e1", ShardLogConfig(max_backlog=5, max_records=20))
    entries = primary.append(recs(0, 8))
    backup = ShardLog("t", "e1", primary.config)
    assert backup.apply(entries[:3]) == 3
    assert offsets(backup.entries) == [0, 1, 2]
    assert backup.apply(entries[1:5]) == 2  # 1, 2 are resent
    assert list(backup.entries) == entries[:5]
    assert backup.apply(entries[:5]) == 0
    assert backup.apply([]) == 0
    assert backup.appended == 5
    check_shape(backup)
    # the primary's base moved past our head: restart the copy there
    assert backup.apply(entries[6:8]) == 2
    assert (backup.base, backup.head) == (6, 8)
    assert list(backup.entries) == entries[6:8]
    check_shape(backup)
    # an older entry after the gap is a resend now
    assert backup.apply(entries[5:6]) == 0
    assert backup.head == 8


def test_apply_onto_an_empty_backup_starts_at_the_primarys_base() -> None:
    backup = ShardLog("t", "e1")
    e = [LogEntry(o, "k", b"v", f"r{o}", 0.0) for o in range(100, 103)]
    assert backup.apply(e) == 3
    assert (backup.base, backup.head) == (100, 103)
    check_shape(backup)


def test_apply_honours_retention() -> None:
    backup = ShardLog("t", "e1", ShardLogConfig(max_backlog=1, max_records=3))
    e = [LogEntry(o, "k", b"v", f"r{o}", 0.0) for o in range(6)]
    assert backup.apply(e) == 6
    assert offsets(backup.entries) == [3, 4, 5] and backup.evicted == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_backlog": 0}, "max_backlog"),
        ({"max_backlog": -1}, "max_backlog"),
        ({"max_backlog": 11, "max_records": 10}, "max_backlog"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_bytes": -5}, "max_bytes"),
    ],
)
def test_config_validation(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ShardLogConfig(**kwargs)


def test_config_edges_are_valid() -> None:
    ShardLogConfig(max_backlog=1, max_records=1, max_bytes=1)
    ShardLogConfig(max_backlog=10, max_records=10)


# --------------------------------------------------------------------------- log model


class ShardLogMachine(RuleBasedStateMachine):
    """A primary log driven by random appends (only with room), registers and commits,
    and a backup fed random slices of everything the primary ever appended (resends,
    gaps), checked against a model of what must still be held."""

    @initialize(
        backlog=st.integers(1, 6),
        extra=st.integers(0, 6),
        max_bytes=st.integers(60, 500),
        backup_records=st.integers(1, 8),
    )
    def setup(self, backlog: int, extra: int, max_bytes: int, backup_records: int) -> None:
        self.cfg = ShardLogConfig(max_backlog=backlog, max_records=backlog + extra,
                                  max_bytes=max_bytes)
        self.log = ShardLog("t", "src", self.cfg)
        self.log.copied = 0  # a primary with a backup: retention waits for its copy
        self.backup = ShardLog("t", "src", ShardLogConfig(max_backlog=1,
                                                          max_records=backup_records))
        self.history: list[LogEntry] = []
        self.model: dict[str, int] = {}

    def _check_after(self, had_ops: bool, evicted_before: int, base_before: int) -> None:
        if had_ops:
            assert self.log.evicted == evicted_before, "evicted while an operator needs it"
        low = self.log.low_water()
        if low is not None:
            # nothing at or past the slowest operator's position was dropped by this step,
            # nor anything the backup has not confirmed
            assert self.log.base <= max(low, base_before)
            if self.log.copied is not None:
                assert self.log.base <= max(self.log.copied, base_before)

    @rule(n=st.integers(1, 5), size=st.integers(0, 40), key=st.sampled_from(["a", "b"]))
    def append(self, n: int, size: int, key: str) -> None:
        room = self.log.room()
        assert 0 <= room <= self.cfg.max_backlog
        if room == 0:
            return
        had_ops, ev, base = bool(self.log.committed), self.log.evicted, self.log.base
        k = min(n, room)
        i = len(self.history)
        new = self.log.append([(key, bytes(size), f"r{j}", float(j)) for j in range(i, i + k)])
        assert offsets(new) == list(range(i, i + k))
        self.history.extend(new)
        if had_ops:
            # credit: appending only what room() allowed keeps the backlog bounded
            assert self.log.backlog() <= self.cfg.max_backlog
        self._check_after(had_ops, ev, base)

    @rule(op=st.sampled_from(["f", "g", "h"]), data=st.data())
    def commit(self, op: str, data: st.DataObject) -> None:
        offset = data.draw(st.integers(0, self.log.head + 3))
        had_ops, ev, base = bool(self.log.committed), self.log.evicted, self.log.base
        self.log.commit(op, offset)
        prev = self.model.get(op)
        want = min(offset, self.log.head)
        if prev is None or want > prev:
            self.model[op] = want
        assert self.log.committed == self.model
        self._check_after(had_ops, ev, base)

    @rule(op=st.sampled_from(["f", "g", "h"]), data=st.data())
    def register(self, op: str, data: st.DataObject) -> None:
        offset = data.draw(st.none() | st.integers(self.log.base, self.log.head + 3))
        had_ops, ev, base = bool(self.log.committed), self.log.evicted, self.log.base
        self.log.register(op, offset)
        if op not in self.model:
            self.model[op] = self.log.base if offset is None else min(offset, self.log.head)
        assert self.log.committed == self.model
        self._check_after(had_ops, ev, base)

    @rule(data=st.data())
    def confirm_copy(self, data: st.DataObject) -> None:
        """The backup confirmed a copy up to some offset (or no backup is left)."""
        upto = data.draw(st.none() | st.integers(0, self.log.head + 3))
        had_ops, ev, base = bool(self.log.committed), self.log.evicted, self.log.base
        before = self.log.copied
        self.log.confirm_copy(upto)
        want = None if upto is None else min(upto, self.log.head)
        if want is not None and before is not None:
            want = max(before, want)  # a confirmation never moves back
        assert self.log.copied == want
        self._check_after(had_ops, ev, base)

    @precondition(lambda self: bool(self.history))
    @rule(data=st.data())
    def replicate(self, data: st.DataObject) -> None:
        lo = data.draw(st.integers(0, len(self.history) - 1))
        hi = data.draw(st.integers(lo, len(self.history)))
        chunk = self.history[lo:hi]
        head = self.backup.head
        n = self.backup.apply(chunk)
        assert n == sum(1 for e in chunk if e.offset >= head)
        if chunk and chunk[-1].offset >= head:
            assert self.backup.head == chunk[-1].offset + 1
        else:
            assert self.backup.head == head

    @invariant()
    def shapes(self) -> None:
        check_shape(self.log)
        check_shape(self.backup)

    @invariant()
    def same_records_at_same_offsets(self) -> None:
        for e in self.log.entries:
            assert self.history[e.offset] == e
        for e in self.backup.entries:
            assert self.history[e.offset] == e

    @invariant()
    def uncommitted_records_are_held(self) -> None:
        if self.model:
            low = min(self.model.values())
            assert self.log.low_water() == low
            assert low <= self.log.head

    @invariant()
    def bounded(self) -> None:
        assert self.log.head == len(self.history)
        # an operator that joins late may find up to max_records waiting (room() is then 0)
        assert self.log.backlog() <= self.cfg.max_records
        if self.log.backlog() > self.cfg.max_backlog:
            assert self.log.room() == 0
        assert len(self.log.entries) <= self.cfg.max_records
        assert len(self.backup.entries) <= self.backup.config.max_records
        if not self.log.committed:
            assert self.log.bytes <= self.cfg.max_bytes
            assert self.log.room() == self.cfg.max_backlog
        assert self.log.evicted <= self.log.base


TestShardLogMachine = ShardLogMachine.TestCase
TestShardLogMachine.settings = settings(max_examples=150, stateful_step_count=40,
                                        deadline=None)


# --------------------------------------------------------------------------- distance


def test_distance_class_values() -> None:
    assert distance_class(E1, E1) == 0
    assert distance_class(E2, E1) == 1
    assert distance_class(E3, E1) == 2
    assert distance_class(U1, E1) == 3
    # a zone name shared by two regions is not "the same zone"
    assert distance_class(cand("x", "us", "eu-a"), E1) == 3
    # the name decides "itself", not the location
    assert distance_class(cand("e1", "ap", "ap-z"), E1) == 0


def test_shard_key_distinguishes_topic_and_source() -> None:
    assert shard_key("t", "a") != shard_key("t", "b") != shard_key("u", "a")
    assert shard_key("ab", "c") != shard_key("a", "bc")


# --------------------------------------------------------------------------- placement


def test_near_source_runs_on_a_live_feasible_source() -> None:
    for src in MESH:
        assert place_operator(OP, "t", src, states(MESH)) == src.name


def test_near_source_falls_back_zone_then_region_then_elsewhere() -> None:
    assert place_operator(OP, "t", E1, states(without(E1))) == "e2"
    assert place_operator(OP, "t", E1, states(without(E1, E2))) == "e3"
    far = place_operator(OP, "t", E1, states(without(E1, E2, E3)))
    assert far in {"u1", "u2", "u3", "a1"}
    assert place_operator(OP, "t", E1, states([A1])) == "a1"


@pytest.mark.parametrize("gone", [(E1,), (E1, E2), (E1, E2, E3), (E1, E3)])
def test_near_source_fail_over_is_the_backup(gone: tuple[Candidate, ...]) -> None:
    alive = without(*gone)
    for topic in ["t", "orders", "frames", "x" * 30]:
        assert place_operator(OP, topic, E1, states(alive)) == \
            backup_for(topic, E1, [*alive, E1], None)
        assert place_operator(OP, topic, E1, states(alive)) == backup_for(topic, E1, alive, None)


def test_backup_is_where_the_operator_goes_when_the_source_dies() -> None:
    for src in MESH:
        for topic in ["a", "b", "c", "d"]:
            b = backup_for(topic, src, MESH, None)
            assert b is not None and b != src.name
            assert place_operator(OP, topic, src, states([c for c in MESH if c != src])) == b


def test_near_source_respects_feasibility_of_the_source() -> None:
    # the source cannot fit the operator: the nearest node that can runs it
    small = [NodeState(member=E1, capacity=Resources(0.5, 8000, 0)), *states(without(E1))]
    assert place_operator(OP, "t", E1, small) == "e2"
    # labels: only e3 and u2 carry the label
    labelled = [cand(c.name, c.region, c.zone, {"gpu": "yes"} if c.name in {"e3", "u2"}
                     else {}) for c in MESH]
    op = OperatorPlacement("infer", labels={"gpu": "yes"})
    assert place_operator(op, "t", labelled[0], states(labelled)) == "e3"
    assert place_operator(op, "t", labelled[3], states(labelled)) == "u2"
    only_us = [c for c in labelled if c.name != "e3"]
    assert place_operator(op, "t", labelled[0], states(only_us)) == "u2"


def test_labels_no_node_has_them() -> None:
    op = OperatorPlacement("infer", labels={"gpu": "h100"})
    with pytest.raises(SchedulingError) as ei:
        place_operator(op, "t", E1, states(MESH))
    assert ei.value.rule == "labels"


def test_near_source_with_residency_stays_in_allowed_regions() -> None:
    op = OperatorPlacement("score", residency=Residency(frozenset({"us"})))
    # the source is in us: it runs there; the source died: another us node
    assert place_operator(op, "t", U1, states(MESH)) == "u1"
    assert place_operator(op, "t", U1, states(without(U1))) in {"u2", "u3"}
    assert place_operator(op, "t", U1, states(without(U1))) == \
        backup_for("t", U1, MESH, op.residency)


@given(seed=st.integers(0, 2**32 - 1), topic=st.text(min_size=1, max_size=12),
       src_index=st.integers(0, len(MESH) - 1), drop=st.sets(st.integers(0, len(MESH) - 1)))
@settings(max_examples=200)
def test_placement_is_independent_of_view_order(seed: int, topic: str, src_index: int,
                                                drop: set[int]) -> None:
    src = MESH[src_index]
    alive = [c for i, c in enumerate(MESH) if i not in drop]
    if not alive:
        return
    shuffled = list(alive)
    random.Random(seed).shuffle(shuffled)
    for op in [OP, OperatorPlacement("c", mode=Central("us")),
               OperatorPlacement("r", mode=InRegions(frozenset({"eu", "ap"})))]:
        try:
            want = place_operator(op, topic, src, states(alive))
        except SchedulingError:
            with pytest.raises(SchedulingError):
                place_operator(op, topic, src, states(shuffled))
            continue
        assert place_operator(op, topic, src, states(shuffled)) == want
        # a duplicate entry in the view changes nothing
        assert place_operator(op, topic, src, states([*shuffled, *shuffled])) == want
    assert backup_for(topic, src, shuffled, None) == backup_for(topic, src, alive, None)
    if src not in alive:
        assert place_operator(OP, topic, src, states(alive)) == backup_for(topic, src, alive,
                                                                           None)


def test_central_picks_only_in_its_region_and_spreads_over_shards() -> None:
    op = OperatorPlacement("agg", mode=Central("us"))
    chosen = {place_operator(op, "t", cand(f"s{i}", "eu"), states(MESH)) for i in range(40)}
    assert chosen <= {"u1", "u2", "u3"}
    assert len(chosen) > 1
    # the source's own location does not matter: an us source need not run it itself
    by_source = {place_operator(op, "t", c, states(MESH)) for c in (U1, U2, U3)}
    assert by_source <= {"u1", "u2", "u3"}


def test_central_is_the_hrw_winner_and_stable_when_others_die() -> None:
    op = OperatorPlacement("agg", mode=Central("us"))
    for i in range(20):
        src = cand(f"s{i}", "ap")
        winner = place_operator(op, "t", src, states(MESH))
        # removing a non-winner does not move it (rendezvous hashing)
        for c in (U1, U2, U3):
            if c.name != winner:
                assert place_operator(op, "t", src, states(without(c))) == winner


def test_in_regions_picks_only_listed_regions_and_spreads() -> None:
    op = OperatorPlacement("agg", mode=InRegions(frozenset({"eu", "ap"})))
    chosen = {place_operator(op, "t", cand(f"s{i}", "us"), states(MESH)) for i in range(40)}
    assert chosen <= {"e1", "e2", "e3", "a1"}
    assert len(chosen) > 1


def test_residency_no_live_node_meets_raises_naming_the_rule() -> None:
    op = OperatorPlacement("score", residency=Residency(frozenset({"sa"}), "pii"))
    with pytest.raises(SchedulingError) as ei:
        place_operator(op, "t", E1, states(MESH))
    assert ei.value.rule == "residency"
    assert isinstance(ei.value, PlacementError)
    # residency is checked before the mode
    op2 = OperatorPlacement("score", mode=Central("zz"), residency=Residency(frozenset({"sa"})))
    with pytest.raises(PlacementError) as ei2:
        place_operator(op2, "t", E1, states(MESH))
    assert ei2.value.rule == "residency"


def test_central_region_with_no_node_raises_mode() -> None:
    op = OperatorPlacement("agg", mode=Central("sa"))
    with pytest.raises(SchedulingError) as ei:
        place_operator(op, "t", E1, states(MESH))
    assert ei.value.rule == "mode"
    assert "sa" in str(ei.value)
    op2 = OperatorPlacement("agg", mode=InRegions(frozenset({"sa", "af"})))
    with pytest.raises(SchedulingError) as ei2:
        place_operator(op2, "t", E1, states(MESH))
    assert ei2.value.rule == "mode"


def test_empty_view_raises_nodes() -> None:
    with pytest.raises(SchedulingError) as ei:
        place_operator(OP, "t", E1, [])
    assert ei.value.rule == "nodes"


def test_candidates_to_states_feeds_place_operator() -> None:
    view = candidates_to_states(MESH)
    assert [s.name for s in view] == [c.name for c in MESH]
    assert all(s.capacity.cpus == 1.0 for s in view)
    assert place_operator(OP, "t", E3, view) == "e3"
    with pytest.raises(SchedulingError) as ei:
        place_operator(OperatorPlacement("big", cpus=2.0), "t", E3, view)
    assert ei.value.rule == "resources"


# --------------------------------------------------------------------------- backup


def test_backup_is_never_the_source_and_is_nearest() -> None:
    assert backup_for("t", E1, MESH, None) == "e2"
    assert backup_for("t", E1, without(E2), None) == "e3"
    assert backup_for("t", E1, without(E2, E3), None) in {"u1", "u2", "u3", "a1"}
    assert backup_for("t", E3, MESH, None) in {"e1", "e2"}
    assert backup_for("t", A1, MESH, None) != "a1"
    for topic in ["t", "u", "v"]:
        for src in MESH:
            assert backup_for(topic, src, MESH, None) != src.name


def test_backup_ties_are_broken_by_hrw_over_the_shard() -> None:
    # the three us nodes are each the source's region, none its zone: HRW decides, so
    # different shards of one source spread their backups
    src = cand("s", "us", "us-z")
    view = [src, U1, U2, U3]
    chosen = {backup_for(f"topic{i}", src, view, None) for i in range(40)}
    assert chosen == {"u1", "u2", "u3"}


def test_backup_honours_residency() -> None:
    eu_only = Residency(frozenset({"eu"}))
    assert backup_for("t", E1, MESH, eu_only) == "e2"
    assert backup_for("t", E1, [E1, U1, U2, A1], eu_only) is None
    assert backup_for("t", A1, MESH, Residency(frozenset({"ap"}))) is None
    # the nearest node is not allowed: the nearest allowed one is picked
    assert backup_for("t", E1, MESH, Residency(frozenset({"us"}))) in {"u1", "u2", "u3"}
    assert backup_for("t", E1, MESH, Residency(frozenset())) is None


def test_backup_none_in_a_one_node_mesh() -> None:
    assert backup_for("t", E1, [E1], None) is None
    assert backup_for("t", E1, [], None) is None


def test_backup_is_deterministic() -> None:
    rng = random.Random(7)
    for i in range(30):
        view = list(MESH)
        rng.shuffle(view)
        src = MESH[i % len(MESH)]
        assert backup_for(f"t{i}", src, view, None) == backup_for(f"t{i}", src, MESH, None)


# --------------------------------------------------------------------------- source rule


def test_check_source_allowed() -> None:
    check_source_allowed("t", "eu", None)
    check_source_allowed("t", "eu", Residency(frozenset({"eu", "us"})))
    check_source_allowed("t", "eu", Residency())
    with pytest.raises(PlacementError) as ei:
        check_source_allowed("orders", "us", Residency(frozenset({"eu"}), "pii"))
    assert ei.value.rule == "residency"
    assert "'orders'" in str(ei.value) and "'us'" in str(ei.value)
    assert "eu" in str(ei.value) and "pii" in str(ei.value)


# --------------------------------------------------------------------------- shard epochs


def test_source_ids_round_trip() -> None:
    assert split_source(source_id("node-3", "7")) == ("node-3", "7")
    assert split_source(source_id("a~b", "2")) == ("a~b", "2")  # the last ~ separates
    assert split_source("bare") == ("bare", "0")


def test_a_live_epoch_holds_its_shard_a_gone_one_is_held_by_its_backup() -> None:
    assert shard_holder("t", E1, True, MESH, None) == "e1"
    # The node may be alive again (restarted): its old epoch's shard is still the backup's.
    assert shard_holder("t", E1, False, MESH, None) == backup_for("t", E1, MESH, None) == "e2"
    assert shard_holder("t", A1, False, without(A1), Residency(frozenset({"ap"}))) is None


def test_a_source_its_topics_rule_no_longer_allows_hands_its_shard_to_the_backup() -> None:
    eu = Residency(frozenset({"eu"}), "pii")
    us = Residency(frozenset({"us"}), "pii")
    assert shard_holder("t", E1, True, MESH, eu) == "e1"
    assert shard_holder("t", E1, True, MESH, us) == backup_for("t", E1, MESH, us)
    assert shard_holder("t", E1, True, MESH, us) in {"u1", "u2", "u3"}


# --------------------------------------------------------------------------- class changes


def test_a_classed_topic_follows_its_class_current_policy() -> None:
    from meshscale.core.policy import make_policy

    wide = {"pii": make_policy("pii", ["eu", "us", "ap"])}
    narrow = {"pii": make_policy("pii", ["eu", "us"], stream_regions=["eu"])}
    declared = Residency(None, "pii")
    assert topic_rule(declared, wide) == Residency(frozenset({"eu", "us", "ap"}), "pii")
    assert topic_rule(declared, narrow) == Residency(frozenset({"eu"}), "pii")
    # The topic's own regions narrow the class's, never widen them; with nothing left
    # the class's regions win (as for an object's copies).
    own = Residency(frozenset({"us", "ap"}), "pii")
    assert topic_rule(own, wide) == Residency(frozenset({"us", "ap"}), "pii")
    assert topic_rule(own, {"pii": make_policy("pii", ["us", "eu"])}) == \
        Residency(frozenset({"us"}), "pii")
    assert topic_rule(own, narrow) == Residency(frozenset({"eu"}), "pii")
    # No class, or a class without a policy: the declared rule as it is.
    assert topic_rule(None, narrow) is None
    label = Residency(frozenset({"ap"}), "other")
    assert topic_rule(label, narrow) == label
    # Holders the new rule forbids must let go; the others keep their copies.
    assert shard_refusal("eu", declared, narrow) is None
    why = shard_refusal("us", declared, narrow)
    assert why is not None and "pii" in why and "'us'" in why
    assert shard_refusal("ap", own, wide) is None
    assert shard_refusal("ap", own, {"pii": make_policy("pii", ["us", "eu"])}) is not None
    assert shard_refusal("ap", None, narrow) is None


def test_a_gone_epochs_shard_runs_on_its_backup_even_if_its_node_is_back() -> None:
    assert shard_runner(OP, "t", E1, True, states(MESH)) == "e1"
    assert shard_runner(OP, "t", E1, False, states(MESH)) == backup_for("t", E1, MESH, None)
    central = OperatorPlacement("c", Central("us"))
    assert shard_runner(central, "t", E1, False, states(MESH)) == \
        shard_runner(central, "t", E1, True, states(MESH))  # central ignores the source


def test_central_region_is_the_one_with_most_live_nodes() -> None:
    assert central_region(MESH) == "eu"  # 3 eu, 3 us: ties by name
    assert central_region(without(E1)) == "us"
    with pytest.raises(PlacementError) as e:
        central_region([])
    assert e.value.rule == "nodes"


# --------------------------------------------------------------------------- runners


def test_runners_wanted_near_source_live_gone_and_infeasible() -> None:
    """Who runs which (operator, source) runner: the reconcile decision every node makes
    on its own view, the same on each node."""
    near = OperatorPlacement("near")
    mars = OperatorPlacement("mars", residency=Residency(frozenset({"mars"})))
    ops = [(near, "t", True), (mars, "t", True)]
    view = states(MESH)
    live = ShardSource(source_id("u2", "ep1"), U2, True)
    gone = ShardSource(source_id("e1", "ep0"), E1, False)
    backup = backup_for("t", E1, without(E1), None)
    assert backup is not None

    def holds_backup(topic: str, sid: str) -> bool:
        return sid == gone.sid  # this node keeps a copy of the gone source's shard

    wanted = {n: runners_wanted(n, ops, [live, gone], view, holds_backup)
              for n in [c.name for c in MESH]}
    # The live source runs its own shard; the gone source's shard runs where a node keeps it.
    runners = {(op, sid): n for n, w in wanted.items() for op, sid in w}
    assert runners[("near", live.sid)] == "u2"
    assert runners[("near", gone.sid)] != "e1"
    assert not any(op == "mars" for op, _ in runners)  # no node may run it: skipped
    # Exactly one node runs each runner: the nodes agree.
    assert sum(len(w) for w in wanted.values()) == len(runners) == 2
    # A gone source's shard nobody keeps a copy of is not run near-source.
    assert all(("near", gone.sid) not in runners_wanted(n.name, ops, [gone], view,
                                                       lambda t, s: False) for n in MESH)


# --------------------------------------------------------------------------- operator_now


def test_an_operator_is_placed_under_its_class_current_rule() -> None:
    from meshscale.core.policy import make_policy

    op = OperatorPlacement("agg", InRegions(frozenset({"eu", "us", "ap"})),
                           Residency(frozenset({"eu", "us"}), "pii"))
    # The policy it was registered under: unchanged, the very placement.
    wide = {"pii": make_policy("pii", ["eu", "us"])}
    assert operator_now(op, ["pii"], wide) is op
    # Narrowed after registration: placed inside the new rule only, wherever HRW went.
    narrow = {"pii": make_policy("pii", ["us"])}
    now = operator_now(op, ["pii"], narrow)
    assert now is not None and now.residency == Residency(frozenset({"us"}), "pii")
    assert (now.name, now.mode) == (op.name, op.mode)
    for src in MESH:
        assert place_operator(now, "t", src, states(MESH)) in {"u1", "u2", "u3"}
    # Widened: never wider than the rule it was registered under.
    widened = {"pii": make_policy("pii", ["eu", "us", "ap"])}
    assert operator_now(op, ["pii"], widened) is op
    # Moved away from every region it may run in: no node may run it now.
    assert operator_now(op, ["pii"], {"pii": make_policy("pii", ["ap"])}) is None
    # No class, or a class without a known policy: nothing narrows it.
    assert operator_now(op, [], narrow) is op
    assert operator_now(op, ["pii"], {}) is op


# ------------------------------------------------- an operator's class, topic records, mirrors


def test_a_topic_has_one_declared_rule_mesh_wide() -> None:
    from meshscale.core.streams import topic_conflict

    pii = Residency(None, "pii")
    assert topic_conflict("t", None, pii) is None  # no record yet: it may be published
    assert topic_conflict("t", pii, Residency(None, "pii")) is None
    why = topic_conflict("t", pii, Residency(None, "fin"))
    assert why is not None and "pii" in why and "fin" in why and "'t'" in why
    why = topic_conflict("t", pii, None)  # unclassed publish of a classed topic
    assert why is not None and "no rule" in why and "pii" in why
    narrower = Residency(frozenset({"eu"}), "pii")
    assert topic_conflict("t", pii, narrower) is not None


def test_an_operator_takes_its_input_topics_class() -> None:
    from meshscale.core.policy import PolicyError
    from meshscale.core.streams import operator_rule

    # No class on the topic (none recorded): the operator's own rule as it is.
    assert operator_rule("op", "t", None, None) is None
    own = Residency(frozenset({"eu"}), "pii")
    assert operator_rule("op", "t", own, None) is own
    # No class on the operator: the topic's, its own regions kept (resolve narrows them).
    assert operator_rule("op", "t", None, "pii") == Residency(None, "pii")
    assert operator_rule("op", "t", Residency(frozenset({"eu"})), "pii") == own
    # The same class: unchanged. Another class: refused, naming both.
    assert operator_rule("op", "t", own, "pii") is own
    with pytest.raises(PolicyError) as e:
        operator_rule("op", "t", Residency(None, "fin"), "pii")
    assert e.value.rule == "topic_class"
    assert "fin" in str(e.value) and "pii" in str(e.value) and "'t'" in str(e.value)


def test_operator_classes_are_its_own_and_its_topics() -> None:
    from meshscale.core.streams import operator_classes

    assert operator_classes(None, None) == ()
    assert operator_classes(Residency(frozenset({"eu"})), None) == ()
    assert operator_classes(None, "pii") == ("pii",)
    assert operator_classes(Residency(None, "pii"), "pii") == ("pii",)
    assert operator_classes(Residency(None, "pii"), "fin") == ("fin", "pii")


def test_an_unclassed_operator_on_a_classed_topic_runs_only_in_the_class() -> None:
    """Registered without a class, and its topic given one afterwards (by the topic's
    replicated record): every node binds it by the topic's class, so the nodes agree on
    one runner per shard, inside the class's regions; a narrowing of the class moves it."""
    from meshscale.core.policy import make_policy
    from meshscale.core.streams import operator_classes

    anywhere = OperatorPlacement("agg", InRegions(frozenset({"eu", "us", "ap"})))
    srcs = [ShardSource(source_id(c.name, "1"), c, True) for c in MESH]
    view = states(MESH)
    for allowed in (["us"], ["eu", "ap"], ["ap"], ["eu", "us", "ap"]):
        policies = {"pii": make_policy("pii", allowed)}
        placed = operator_now(anywhere, operator_classes(None, "pii"), policies)
        assert placed is not None
        where: dict[str, list[str]] = {}
        for n in MESH:
            for _op, sid in runners_wanted(n.name, [(placed, "t", False)], srcs, view,
                                           lambda t, s: False):
                where.setdefault(sid, []).append(n.region)
        assert sorted(where) == sorted(s.sid for s in srcs)  # every shard runs ...
        assert all(len(r) == 1 and r[0] in allowed for r in where.values()), where  # once, inside
    # Without the topic's class it would run where HRW picks, outside too.
    free = {n.region for n in MESH for _ in runners_wanted(
        n.name, [(anywhere, "t", False)], srcs, view, lambda t, s: False)}
    assert free - {"us"}


@given(st.sets(st.sampled_from(["eu", "us", "ap"]), min_size=1),
       st.sets(st.sampled_from(["eu", "us", "ap"]), min_size=1),
       st.booleans(), st.booleans())
@settings(max_examples=200, deadline=None)
def test_no_runner_outside_the_topics_class(allowed: set[str], own: set[str],
                                            near: bool, own_class: bool) -> None:
    """Whatever the operator declared (its own regions, the topic's class or none), no
    node runs it on a shard outside the topic's class's current regions, nor outside its
    own regions; at most one node runs each runner."""
    from meshscale.core.policy import make_policy
    from meshscale.core.streams import operator_classes

    res = Residency(frozenset(own), "pii" if own_class else None)
    op = OperatorPlacement("op", None if near else InRegions(frozenset({"eu", "us", "ap"})),
                           res)
    policies = {"pii": make_policy("pii", sorted(allowed))}
    placed = operator_now(op, operator_classes(res, "pii"), policies)
    if not allowed & own:
        assert placed is None
        return
    assert placed is not None
    srcs = [ShardSource(source_id(c.name, "1"), c, True) for c in MESH]
    count: dict[str, int] = {}
    for n in MESH:
        for _op, sid in runners_wanted(n.name, [(placed, "t", near)], srcs, states(MESH),
                                       lambda t, s: False):
            assert n.region in allowed and n.region in own
            count[sid] = count.get(sid, 0) + 1
    assert all(v == 1 for v in count.values())


def test_a_holder_refuses_an_operator_runner_outside_the_topics_class() -> None:
    from meshscale.core.policy import make_policy
    from meshscale.core.streams import operator_refusal

    policies = {"pii": make_policy("pii", ["eu"], stream_regions=["eu"])}
    assert operator_refusal("eu", "pii", policies) is None
    why = operator_refusal("us", "pii", policies)
    assert why is not None and "pii" in why and "'us'" in why and "{eu}" in why
    assert operator_refusal("us", None, policies) is None  # an unclassed topic
    assert operator_refusal("us", "fin", policies) is None  # a label only: no policy known
    # Cross-region reads allowed or not: an operator runs only inside the class.
    closed = {"pii": make_policy("pii", ["eu"], cross_region_reads=False)}
    assert operator_refusal("us", "pii", closed) is not None


def test_a_mirror_follows_the_class_read_rule() -> None:
    from meshscale.core.policy import make_policy
    from meshscale.core.streams import mirror_refusal

    open_ = {"pii": make_policy("pii", ["eu"])}
    closed = {"pii": make_policy("pii", ["eu"], cross_region_reads=False)}
    # Cross-region reads allowed: a node outside may read, so may buffer what it reads.
    assert mirror_refusal("us", "pii", open_) is None
    assert mirror_refusal("eu", "pii", closed) is None
    why = mirror_refusal("us", "pii", closed)
    assert why is not None and "cross-region read rule" in why and "'us'" in why
    assert mirror_refusal("us", None, closed) is None
    assert mirror_refusal("us", "fin", closed) is None


def test_clearing_a_log_keeps_its_offsets() -> None:
    log = ShardLog("t", "s", ShardLogConfig(max_backlog=1, max_records=100))
    log.append(recs(0, 5))
    assert log.clear() == 5
    assert (log.base, log.head, log.bytes, log.entries) == (5, 5, 0, deque())
    assert log.read(0, 10) == []
    log.apply([LogEntry(5, "k", b"v", "r5", 5.0)])
    assert offsets(log.read(0, 10)) == [5]
    assert log.clear() == 1 and log.clear() == 0 and log.head == 6


def test_a_publish_without_a_class_takes_its_topics_record() -> None:
    from meshscale.core.policy import PolicyError
    from meshscale.core.streams import publish_rule, topic_conflict

    pii = Residency(None, "pii")
    eu = Residency(frozenset({"eu"}), "pii")
    # No record: the publish's own rule, classed or not.
    assert publish_rule("t", None, None) is None
    assert publish_rule("t", eu, None) is eu
    bare = Residency(frozenset({"eu"}))
    assert publish_rule("t", bare, None) is bare
    # A record and no class named: the record's whole rule (its class, its own regions).
    assert publish_rule("t", None, pii) is pii
    assert publish_rule("t", None, eu) is eu
    assert publish_rule("t", Residency(None), eu) is eu
    # Regions but no class: the regions under the record's class; topic_conflict then
    # holds them to the recorded ones.
    assert publish_rule("t", bare, eu) == eu
    assert topic_conflict("t", eu, publish_rule("t", bare, eu)) is None
    got = publish_rule("t", Residency(frozenset({"us"})), eu)
    assert got == Residency(frozenset({"us"}), "pii")
    assert topic_conflict("t", eu, got) is not None
    # The record's class named: the publish's rule. Another class: refused naming both.
    assert publish_rule("t", eu, pii) is eu
    with pytest.raises(PolicyError) as e:
        publish_rule("t", Residency(None, "fin"), pii)
    assert e.value.rule == "topic_class"
    assert "fin" in str(e.value) and "pii" in str(e.value) and "'t'" in str(e.value)
    # A record without a class (a rule of regions only) binds no class.
    regions_only = Residency(frozenset({"eu"}))
    assert publish_rule("t", None, regions_only) is None


def test_an_unclassed_publish_of_a_classed_topic_resolves_to_the_class() -> None:
    """What the runtime does with publish_rule's answer: resolve it against the class's
    policy (``core.policy.resolve``): the shards' rule is the class's, and a rule that
    widens it is refused (``widens``)."""
    from meshscale.core.policy import PolicyError, Rule, make_policy, resolve
    from meshscale.core.streams import publish_rule

    policies = {"pii": make_policy("pii", ["eu", "eu2"])}
    rule = publish_rule("t", None, Residency(None, "pii"))
    assert rule is not None and rule.data_class == "pii"
    got = resolve(rule.data_class, Rule(stream_regions=rule.regions), policies)
    assert got.stream_residency() == Residency(frozenset({"eu", "eu2"}), "pii")
    wide = publish_rule("t", Residency(frozenset({"eu", "us"})), Residency(None, "pii"))
    assert wide is not None
    with pytest.raises(PolicyError) as e:
        resolve(wide.data_class, Rule(stream_regions=wide.regions), policies)
    assert e.value.rule == "widens" and "pii" in str(e.value)


def test_an_operators_output_takes_its_class() -> None:
    from meshscale.core.policy import PolicyError, make_policy
    from meshscale.core.streams import output_rule

    policies = {"pii": make_policy("pii", ["eu", "eu2"]),
                "strict": make_policy("strict", ["eu"], replicas=2),
                "wide": make_policy("wide", ["eu", "eu2", "us"]),
                "other": make_policy("other", ["us"])}
    # No class on the operator: the output's declared rule as it is (maybe none).
    assert output_rule("op", "o", [], None, policies) is None
    own = Residency(None, "wide")
    assert output_rule("op", "o", [], own, policies) is own
    # A classed operator: its output takes its class when it declares none.
    assert output_rule("op", "o", ["pii"], None, policies) == Residency(None, "pii")
    assert output_rule("op", "o", ["pii"], Residency(frozenset({"eu"})), policies) == \
        Residency(frozenset({"eu"}), "pii")
    # Two classes (its own and its topic's): the strictest.
    assert output_rule("op", "o", ["pii", "strict"], None, policies) == \
        Residency(None, "strict")
    assert output_rule("op", "o", ["wide", "pii"], None, policies) == Residency(None, "pii")
    with pytest.raises(PolicyError) as e:
        output_rule("op", "o", ["pii", "other"], None, policies)
    assert e.value.rule == "result_class"
    # A declared class as strict or stricter: kept.
    same = Residency(None, "pii")
    assert output_rule("op", "o", ["pii"], same, policies) is same
    stricter = Residency(None, "strict")
    assert output_rule("op", "o", ["pii"], stricter, policies) is stricter
    # A declared class that widens (or is incomparable): refused, naming both.
    for cls in ("wide", "other"):
        with pytest.raises(PolicyError) as e:
            output_rule("op", "o", ["pii"], Residency(None, cls), policies)
        assert e.value.rule == "widens"
        assert cls in str(e.value) and "pii" in str(e.value) and "'o'" in str(e.value)
    # Narrower than one of two classes only: refused too.
    with pytest.raises(PolicyError) as e:
        output_rule("op", "o", ["pii", "strict"], Residency(None, "pii"), policies)
    assert e.value.rule == "widens" and "strict" in str(e.value)
    # A declared class with no known policy cannot be shown as strict.
    with pytest.raises(PolicyError) as e:
        output_rule("op", "o", ["pii"], Residency(frozenset({"eu"}), "label"), policies)
    assert e.value.rule == "unknown_class"


# --------------------------------------------------------------------------- copies of a shard


def test_shard_copies_are_the_source_and_its_backup_while_it_serves() -> None:
    assert shard_copies("t", E1, True, MESH, None) == ("e1", "e2")
    assert shard_copies("t", E1, True, [E1], None) == ("e1",)  # a one-node mesh


def test_a_gone_sources_copies_are_the_next_two_in_backup_order() -> None:
    """The holder readers go to first, then the node that becomes the holder when that
    one dies too: a second failure leaves readers at the second copy."""
    for topic in [f"t{i}" for i in range(20)]:
        alive = without(E1)
        copies = shard_copies(topic, E1, False, alive, None)
        assert copies[0] == shard_holder(topic, E1, False, alive, None) == "e2"
        assert copies[1] == "e3"
        rest = [c for c in alive if c.name != copies[0]]
        assert copies[1] == shard_holder(topic, E1, False, rest, None)
        assert shard_copies(topic, E1, False, rest, None)[0] == copies[1]
    # A restarted source (a new epoch, the same name) is no copy of its old shard.
    assert "e1" not in shard_copies("t", E1, False, MESH, None)
    assert shard_copies("t", E1, False, [E1, E2], None) == ("e2",)
    assert shard_copies("t", E1, False, [E1], None) == ()


def test_a_gone_sources_copies_stay_inside_the_topics_rule() -> None:
    eu_only = Residency(frozenset({"eu"}))
    assert shard_copies("t", E1, False, without(E1), eu_only) == ("e2", "e3")
    assert shard_copies("t", E1, False, without(E1, E2), eu_only) == ("e3",)
    # A source whose region the rule no longer allows handed its shard to the backup.
    us_only = Residency(frozenset({"us"}))
    copies = shard_copies("t", E1, True, MESH, us_only)
    assert copies[0] == shard_holder("t", E1, True, MESH, us_only)
    assert set(copies) <= {"u1", "u2", "u3"} and len(copies) == 2


def test_frozen_copy_targets_send_to_the_other_copies_and_drop_outside_them() -> None:
    assert frozen_copy_targets("b", ("b", "c")) == (("c",), True)
    assert frozen_copy_targets("c", ("b", "c")) == (("b",), True)
    assert frozen_copy_targets("d", ("b", "c")) == (("b", "c"), False)
    assert frozen_copy_targets("b", ("b",)) == ((), True)


def test_ack_window_acknowledges_only_what_the_backup_confirmed_oldest_first() -> None:
    w: AckWindow[str] = AckWindow()
    w.appended("A~1", 1, "b0", 1)
    w.appended("A~1", 3, "b1", 2)
    assert w.wanted() == ("A~1", 3) and w.records == 3
    assert w.settle("A~1", 0) == 0
    assert w.settle("A~1", 2) == 1  # b0 is held twice; b1 only in part: it waits
    assert w.wanted() == ("A~1", 3) and w.records == 2
    assert w.settle("B~1", 9) == 0  # another shard's copy acknowledges nothing here
    assert w.settle("A~1", 3) == 2 and w.wanted() is None and len(w) == 0


def test_ack_window_gives_back_every_unacknowledged_batch_in_order() -> None:
    w: AckWindow[str] = AckWindow()
    for i in range(3):
        w.appended("A~1", i + 1, f"b{i}", 1)
    w.settle("A~1", 1)
    assert w.take_all() == ["b1", "b2"]
    assert w.records == 0 and w.wanted() is None


def test_ack_window_is_full_at_its_bound_of_batches() -> None:
    w: AckWindow[str] = AckWindow(max_batches=2, min_records=1)
    w.appended("A~1", 1, "b0", 1)
    assert not w.full()
    w.appended("A~1", 2, "b1", 1)
    assert w.full()
    w.settle("A~1", 1)
    assert not w.full()
    with pytest.raises(ValueError):
        AckWindow(max_batches=0)
    with pytest.raises(ValueError):
        AckWindow(min_records=0)


def test_direct_reads_are_shards_held_by_another_node_of_the_readers_region() -> None:
    """A subscriber reads at the holder what another node of its node's region holds
    (one hop less per record); its node's own shards, shards held across regions (the
    mirror is the bounded buffer of reads that cross) and shards with no holder stay
    with the node; at most ``max_holders`` holders, the first by name."""
    shards = [("a~1", "a", "r1"), ("b~1", "b", "r1"), ("me~1", "me", "r1"),
              ("far~1", "far", "r2"), ("gone~1", None, None), ("b~0", "b", "r1")]
    assert direct_reads("me", "r1", shards) == {"a~1": "a", "b~1": "b", "b~0": "b"}
    assert direct_reads("me", "r1", shards, max_holders=1) == {"a~1": "a"}
    assert direct_reads("me", "r2", shards) == {"far~1": "far"}


def test_ack_window_of_a_few_small_batches_is_not_full() -> None:
    """Small batches because records are few (a backup far away, a modest rate) leave
    the window open until it holds ``min_records`` records: only a flood waits."""
    w: AckWindow[str] = AckWindow(max_batches=2, min_records=3)
    w.appended("A~1", 1, "b0", 1)
    w.appended("A~1", 2, "b1", 1)
    w.appended("A~1", 3, "b2", 1)
    assert len(w) == 3 and w.records == 3 and w.full()
    w.settle("A~1", 1)
    assert not w.full(), "two batches of one record each: not a flood"
    w.appended("A~1", 10, "b3", 7)
    assert w.full()


def test_a_follower_pauses_only_for_a_shard_read_at_its_holder() -> None:
    from meshscale.core.streams import follower_pause_s

    # Never left out of a read here: fetched again at once.
    assert follower_pause_s(None, None, 10.0, 0.05, 2.0) == 0.0
    # Left out recently, not read here since: gathers records for linger_s.
    assert follower_pause_s(9.0, None, 10.0, 0.05, 2.0) == 0.05
    assert follower_pause_s(9.0, 5.0, 10.0, 0.05, 2.0) == 0.05
    # Read here since it was last left out: at once again.
    assert follower_pause_s(9.0, 9.5, 10.0, 0.05, 2.0) == 0.0
    # Left out long ago (the subscriber is gone or reads here): at once.
    assert follower_pause_s(7.0, None, 10.0, 0.05, 2.0) == 0.0
