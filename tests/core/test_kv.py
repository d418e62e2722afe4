from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshscale.core.hlc import HLCTimestamp
from meshscale.core.kv import (
    WATCH,
    Consistency,
    HintDeleted,
    HintSend,
    HintStored,
    KVCoordinator,
    KVHintConfig,
    KVHints,
    KVPlacement,
    KVPlacer,
    KVRecord,
    kv_placement,
    kv_replicas,
    lww_merge,
    merge_optional,
)
from meshscale.core.placement import Candidate, PlacementError, Residency, replica_set, write_set


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


# --------------------------------------------------------------------------- hinted handoff

VIEW = [Candidate(f"n{i}", r, "z") for i, r in enumerate(["eu", "us", "ap"] * 3)]


def ts(wall: int, node: str = "c") -> HLCTimestamp:
    return HLCTimestamp(wall, 0, node)


def test_placement_with_down_members_names_stand_ins_and_whom_they_stand_in_for() -> None:
    home = kv_replicas("k", VIEW)
    away = home[:2]
    live = [c for c in VIEW if c.name not in away]
    down = [c for c in VIEW if c.name in away]
    where = kv_placement("k", live, down=down)
    assert where.intended == tuple(home)
    assert set(where.hint_for) == set(away)
    assert len(where.replicas) == 3 and not set(where.replicas) & set(away)
    assert set(where.stand_ins) == set(where.replicas) - set(home)
    assert len(where.stand_ins) == 2
    for s in where.stand_ins:
        assert where.hint_targets(s) == where.hint_for
    assert where.hint_targets(home[2]) == ()  # a real replica keeps no hint
    # Without down members the view cannot tell: nothing is hinted (the stand-in's own
    # view may know better: KVHints.plan).
    blind = kv_placement("k", live)
    assert blind.replicas == where.replicas and blind.hint_for == () and blind.stand_ins == ()
    # A full intended replica is hinted for too (a value cannot go to it now).
    fview = [Candidate(c.name, c.region, c.zone, full=c.name == home[0]) for c in VIEW]
    full = kv_placement("k", fview)
    assert full.hint_for == (home[0],) and len(full.stand_ins) == 1


def _book(name: str, **cfg: float) -> KVHints:
    return KVHints(name, KVHintConfig(startup_watch_s=0.0, **cfg))  # type: ignore[arg-type]


def test_hint_lifecycle_named_targets_hand_off_when_back_delete_only_when_acknowledged() -> None:
    home = kv_replicas("k", VIEW)
    a = home[0]
    live = [c for c in VIEW if c.name != a]
    down = [c for c in VIEW if c.name == a]
    stand_in = kv_placement("k", live, down=down).stand_ins[0]
    book = _book(stand_in, retry_s=5.0)
    book.set_view(live)  # it has not heard of a: only the coordinator names it
    assert book.plan("k", [a], 100.0) == (a,)
    book.add("k", ts(1), (a,), 100.0)  # the driver stored the hint with the record first
    assert book.pending("k") == {a: ts(1)} and len(book) == 1
    assert book.drain() == []  # add persists nothing more
    # The target is down: nothing to do but wait (its expiry is the only deadline).
    assert book.due(101.0) == []
    assert book.next_deadline() == 100.0 + KVHintConfig().max_hint_age_s
    # Back in the view: handed off at once; in flight until reported.
    book.set_view(VIEW)
    assert book.next_deadline() == 0.0
    assert book.due(102.0) == [HintSend("k", a, ts(1))]
    assert book.due(102.0) == []
    # A failure waits retry_s (the target is still live).
    book.failed("k", a, 103.0)
    assert book.due(104.0) == [] and book.next_deadline() == 108.0
    assert book.due(108.0) == [HintSend("k", a, ts(1))]
    # A newer write comes in while the older one is in flight: its ack does not clear.
    book.add("k", ts(2), (a,), 108.5)
    book.handed_off("k", a, ts(1))
    assert book.pending("k") == {a: ts(2)} and book.drain() == []
    assert book.due(109.0) == [HintSend("k", a, ts(2))]
    book.handed_off("k", a, ts(2))
    assert book.pending("k") == {} and len(book) == 0
    assert book.drain() == [HintDeleted("k", a, ts(2))]
    assert book.next_deadline() is None
    assert book.stats["handed_off"] == 1 and book.stats["sends"] == 3


def test_a_stand_in_hints_for_the_replicas_its_own_view_holds_down() -> None:
    """The coordinator may not know a member that went down before it started; a
    stand-in that does hints for the key's intended replicas by its own view."""
    home = kv_replicas("k", VIEW)
    live = [c for c in VIEW if c.name not in home[:2]]
    down = [c for c in VIEW if c.name in home[:2]]
    stand_in = kv_placement("k", live, down=down).stand_ins[0]
    book = _book(stand_in)
    book.set_view(live, down)
    assert set(book.plan("k", [], 0.0) or ()) == set(home)
    # A replica of the key (by its view) keeps no hint.
    replica = _book(home[2])
    replica.set_view(live, down)
    assert replica.plan("k", [], 0.0) == ()


def test_a_young_node_watches_its_writes_and_hints_once_its_view_says_it_stands_in() -> None:
    home = kv_replicas("k", VIEW)
    young = [c for c in VIEW if c.name not in home[:2]]  # knows nothing of two replicas
    me = next(n for n in kv_replicas("k", young) if n not in home)
    book = KVHints(me, KVHintConfig(startup_watch_s=60.0), started=1000.0)
    book.set_view(young)
    assert book.plan("k", [], 1001.0) == (WATCH,)
    book.add("k", ts(5), (WATCH,), 1001.0)
    assert book.due(1002.0) == [] and book.next_deadline() == 1001.0 + 3 * 3600.0
    # Its view grows (the two come back): it stands in, and hints for the whole set.
    book.set_view(VIEW)
    assert book.pending("k") == {h: ts(5) for h in home}
    changes = book.drain()
    assert {c.target for c in changes if isinstance(c, HintStored)} == set(home)
    assert changes[-1] == HintDeleted("k", WATCH, ts(5))
    assert {s.target for s in book.due(1003.0)} == set(home)
    # Once settled it watches no more.
    mine = next(f"k{i}" for i in range(100) if me in kv_replicas(f"k{i}", VIEW))
    assert book.plan(mine, [], 1000.0 + 59.0) == (WATCH,)
    assert book.plan(mine, [], 1000.0 + 60.0) == ()


def test_a_restarted_stand_in_hands_a_hint_for_a_target_it_never_heard_of_to_the_replicas() -> None:
    """Swarm seed 1205159859: a stand-in restarted after the member it stands in for
    went down for good never hears of it, and its small view makes it one of the key's
    replicas. Once its view grows and shows it outside the key's set, the key's replicas
    get hints too, with the unknown target's timestamp and age (the write's other copy
    may be gone for good: this node's record is then the only one)."""
    home = kv_replicas("k", VIEW)
    gone = home[0]  # down for good before the stand-in restarted
    small = [c for c in VIEW if c.name not in home]  # it knows none of the key's replicas
    me = kv_replicas("k", small)[0]
    book = _book(me)
    book.set_view(small)
    assert book.plan("k", [gone], 100.0) == (gone,)
    book.add("k", ts(7), (gone,), 100.0)
    assert book.drain() == [] and book.pending("k") == {gone: ts(7)}  # a replica by its view
    # Its view grows: the two live replicas show up, the gone one never does.
    rest = [c for c in VIEW if c.name != gone]
    now_home = kv_replicas("k", rest)
    assert me not in now_home
    book.set_view(rest)
    assert book.pending("k") == {gone: ts(7), **{t: ts(7) for t in now_home}}
    assert book.drain() == [HintStored("k", t, ts(7), 100.0) for t in now_home]
    assert {s.target for s in book.due(101.0)} == set(now_home)
    assert book.stats["orphans_adopted"] == 3
    # Handed off: the hints for the replicas go; the one for the unknown target stays
    # (it ages out) and is not adopted twice.
    for t in now_home:
        book.handed_off("k", t, ts(7))
    book.set_view(rest[:-1])
    assert book.pending("k") == {gone: ts(7)} and book.stats["orphans_adopted"] == 3


def test_a_hint_for_a_reaped_target_goes_to_the_keys_replicas() -> None:
    """A second stand-in holds hints for a key's replicas, two of them down; one is
    reaped (``dead_reap_s``): the key's replicas by the view without it get hints too
    (here the first stand-in, now a replica), since the reaped target never takes one."""
    def case(key: str) -> tuple[list[str], list[Candidate], list[Candidate], str]:
        home = kv_replicas(key, VIEW)
        live = [c for c in VIEW if c.name not in home[:2]]
        down = [c for c in VIEW if c.name in home[:2]]
        return home, live, down, kv_placement(key, live, down=down).stand_ins[1]

    # A key whose second stand-in stays outside the set once home[0] is reaped.
    key = next(k for k in (f"k{i}" for i in range(100))
               if case(k)[3] not in kv_replicas(k, [c for c in VIEW if c.name != case(k)[0][0]]))
    home, live, down, second = case(key)
    book = _book(second)
    book.set_view(live, down)
    assert set(book.plan(key, [home[0]], 50.0) or ()) == set(home)
    book.add(key, ts(3), home, 50.0)
    book.set_view(VIEW)  # they come back and go down again: nothing to adopt
    book.set_view(live, down)
    assert book.drain() == [] and "orphans_adopted" not in book.stats
    reaped = [c for c in live if c.name != home[0]]
    after = kv_replicas(key, reaped + down[1:])
    assert second not in after and set(after) - set(home)
    book.set_view(reaped, down[1:])
    assert book.drain() == [HintStored(key, t, ts(3), 50.0) for t in after if t not in home]
    assert book.pending(key) == {t: ts(3) for t in [*home, *after]}


def test_hints_are_bounded_refused_beyond_max_hints_dropped_beyond_max_age() -> None:
    book = _book("s", max_hints=1, max_hint_age_s=100.0)
    assert book.plan("k1", ["a"], 0.0) == ("a",)
    book.add("k1", ts(1), ("a",), 0.0)
    assert book.plan("k2", ["a"], 1.0) is None  # full: the stand-in refuses the write
    assert book.plan("k1", ["b"], 1.0) == ("b",)  # a key it already holds is fine
    assert book.stats["refused"] == 1
    # Watches are bounded apart (they never crowd out hints) and never refuse a write.
    young = KVHints("s", KVHintConfig(max_hints=1), started=0.0)
    young.add("k1", ts(1), ("a",), 0.0)
    assert young.plan("k2", [], 1.0) == (WATCH,)
    young.add("k2", ts(1), (WATCH,), 1.0)
    assert young.plan("k3", [], 1.0) == ()
    assert young.stats["watch_skipped"] == 1 and young.watched == 1 and len(young) == 1
    book.add("k1", ts(3), ("b",), 50.0)
    book.expire(99.0)
    assert book.drain() == []
    book.expire(100.0)
    assert book.pending("k1") == {"b": ts(3)}
    assert book.drain() == [HintDeleted("k1", "a", ts(1))]
    assert book.stats["expired"] == 1 and book.next_deadline() == 150.0


def test_hand_offs_in_flight_are_bounded_and_an_unreported_one_times_out() -> None:
    book = _book("s", max_in_flight=1, send_timeout_s=10.0, retry_s=1.0)
    book.set_view(VIEW)
    for k in ("k1", "k2"):
        book.add(k, ts(1), ("n0",), 0.0)
    assert book.due(0.0) == [HintSend("k1", "n0", ts(1))]
    assert book.due(1.0) == [] and book.next_deadline() == 10.0
    # Never reported: counted as failed at its deadline, the slot is free for k2.
    assert book.due(10.0) == [HintSend("k2", "n0", ts(1))]
    assert book.stats["send_timeouts"] == 1
    # Full targets are not sent to (a value would be refused); a missing record is
    # abandoned, its hint deleted.
    book.handed_off("k2", "n0", ts(1))
    book.set_view([Candidate(c.name, c.region, c.zone, full=True) for c in VIEW])
    assert book.due(20.0) == []
    book.abandon("k1", "n0")
    assert len(book) == 0 and book.stats["abandoned"] == 1


def _reference_placement(key: str, view: list[Candidate], n: int, rule: Residency | None,
                         down: list[Candidate]) -> KVPlacement:
    """kv_placement as it was written before KVPlacer, from the placement functions."""
    pid = "kv\0" + key
    live = {c.name for c in view}
    away = [c for c in down if c.name not in live]
    home = [c.name for c in replica_set(pid, view, n, rule)]
    intended = [c.name for c in replica_set(pid, view + away, n, rule)] if away else home
    try:
        room = [c.name for c in write_set(pid, view, n, rule)]
    except PlacementError:
        return KVPlacement(tuple(home), (), tuple(intended))
    return KVPlacement(tuple(room), tuple(h for h in home if h not in room), tuple(intended))


_nodes = st.lists(
    st.builds(Candidate, st.sampled_from([f"n{i}" for i in range(8)]),
              st.sampled_from(["eu", "us", "ap"]), st.sampled_from(["z1", "z2"]),
              full=st.booleans()),
    max_size=8, unique_by=lambda c: c.name)


@given(_nodes, st.sets(st.integers(0, 7)), st.integers(1, 4),
       st.sampled_from([None, Residency(frozenset({"eu"})), Residency(frozenset({"eu", "us"})),
                        Residency(frozenset({"mars"}))]),
       st.lists(st.text("abk/", max_size=6), min_size=1, max_size=5))
def test_kv_placer_answers_and_refuses_as_kv_placement_did(
    nodes: list[Candidate], down_at: set[int], n: int, rule: Residency | None,
    keys: list[str],
) -> None:
    view = [c for i, c in enumerate(nodes) if i not in down_at]
    down = [c for i, c in enumerate(nodes) if i in down_at]
    placer = KVPlacer(view, n, down)
    for key in keys + keys:  # the second time from the placer's memo
        try:
            want: KVPlacement | str = _reference_placement(key, view, n, rule, down)
        except PlacementError as e:
            want = f"{e.rule}: {e}"
        for how in ("placer", "function"):
            try:
                got: KVPlacement | str = (placer.place(key, rule) if how == "placer"
                                          else kv_placement(key, view, n, rule, down=down))
            except PlacementError as e:
                got = f"{e.rule}: {e}"
            assert got == want, (how, key)


def test_hints_place_keys_by_the_view_of_the_last_set_view() -> None:
    """KVHints keeps one placement per view: a set_view must replace it, or a node would
    go on deciding by the view it had at its first write."""
    home = kv_replicas("k", VIEW)
    book = _book(home[2])
    book.set_view(VIEW)
    assert book.plan("k", [], 0.0) == ()  # a replica of the key: no hint
    # Two members ranked above it come and go: it is no longer a replica, it stands in.
    young = [c for c in VIEW if c.name not in home[:2]]
    outsider = next(n for n in kv_replicas("k", young) if n not in home)
    other = _book(outsider)
    other.set_view(young)
    assert other.plan("k", [], 0.0) == ()  # a replica in its view (the two are unknown)
    other.set_view(young, [c for c in VIEW if c.name in home[:2]])
    assert set(other.plan("k", [], 0.0) or ()) == set(home)


def test_a_watch_alone_does_not_ask_the_driver_to_look_for_hand_offs() -> None:
    """Every write a young node takes is watched; only a hint for a replica can give
    ``due`` work, so only that asks the driver to wake its hand-off loop."""
    home = kv_replicas("k", VIEW)
    book = KVHints(home[0], KVHintConfig(startup_watch_s=60.0), started=1000.0)
    book.set_view(VIEW)
    assert book.plan("k", [], 1001.0) == (WATCH,)
    assert book.add("k", ts(1), (WATCH,), 1001.0) is False
    assert book.due(1001.0) == []
    assert book.add("k", ts(2), (WATCH,), 1002.0) is False  # renewed: still nothing due
    assert book.add("k", ts(3), (home[1],), 1003.0) is True
    assert book.due(1003.0) == [HintSend("k", home[1], ts(3))]
    assert book.add("k", ts(4), (home[1],), 1004.0) is True  # renewed: sent again at once


def test_kv_placer_memo_is_bounded_and_keyed_by_the_rule() -> None:
    placer = KVPlacer(VIEW)
    eu = Residency(frozenset({"eu"}))
    assert placer.place("k", eu) == kv_placement("k", VIEW, residency=eu)
    assert placer.place("k") == kv_placement("k", VIEW)  # not the eu answer
    for i in range(KVPlacer.MEMO_MAX + 5):
        assert placer.place(f"k{i}") == kv_placement(f"k{i}", VIEW)
    assert len(placer._memo) <= KVPlacer.MEMO_MAX
