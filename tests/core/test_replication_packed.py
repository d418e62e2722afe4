"""The inventory's packed records (issue #24): an entry of a content id is kept as 32 bytes
of id and three words (its stamp and the number of its shared *shape*), and made a
``_Local`` again when read. What comes back must be exactly what went in, field by field,
whatever state the entry was in, and a ``_Local`` a caller still holds must never be
packed behind its back (its later changes would be lost)."""

from __future__ import annotations

import gc
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale.core.hlc import LOGICAL_MAX, WALL_NS_MAX, HLCTimestamp
from meshscale.core.objects import object_id
from meshscale.core.placement import ObjectPolicy, Residency
from meshscale.core.replication import (
    _AS_OBJECT,
    _COMMON,
    _FLUSH_AT,
    _NODE_BITS,
    _NONE_CONFIRMED,
    _STAMP_NODES,
    _WORDS,
    _Inventory,
    _key,
    _Local,
    _rare,
)

POLICIES = [ObjectPolicy(3), ObjectPolicy(2), ObjectPolicy(1, Residency(frozenset({"eu"})))]
SETS = [(), ("a",), ("a", "b", "c"), ("b", "c", "a"), ("c", "b")]
RARES = [_COMMON, _rare("b", float("-inf"), {}, None), _rare(None, 4.5, {}, ("a", "c")),
         _rare("x", 1.0, {"c": 2.0}, None)]
CONFIRMED = [_NONE_CONFIRMED, {"b": 1.5}, {"b": 1.5, "c": 2.5}]

stamps = st.one_of(
    st.just(0),
    st.builds(lambda w, lg, n: ((w << 32 | lg) << _NODE_BITS) | n,
              st.integers(0, WALL_NS_MAX), st.integers(0, LOGICAL_MAX),
              st.integers(0, len(_STAMP_NODES) - 1)),
    st.integers(0, (1 << 128) - 1),
    st.builds(HLCTimestamp, st.integers(0, WALL_NS_MAX), st.integers(0, LOGICAL_MAX),
              st.just("a node beyond the table")),
)

fields = st.fixed_dictionaries({
    "policy": st.sampled_from(POLICIES),
    "rare": st.sampled_from(RARES),
    "confirmed": st.sampled_from(CONFIRMED),
    "rs": st.sampled_from(SETS),
    "rs_version": st.integers(-1, 1 << 40),
    "stamp": stamps,
    "dg": st.one_of(st.just("rs"), st.sampled_from(SETS)),
    "seq": st.integers(0, 1 << 62),
    "flags": st.integers(0, 31),
})


def _entry(oid: str, f: dict[str, object]) -> _Local:
    loc = _Local(_key(oid), POLICIES[0])
    for name, value in f.items():
        if name != "dg":
            setattr(loc, name, value)
    loc.dg = loc.rs if f["dg"] == "rs" else f["dg"]  # type: ignore[assignment]
    return loc


def _fields(loc: _Local) -> tuple[object, ...]:
    return (loc.key, loc.policy, loc.rare, loc.confirmed, loc.rs, loc.rs_version, loc.stamp,
            loc.dg, loc.seq, loc.flags, loc.dg is loc.rs)


def _packed(inv: _Inventory, oid: str) -> bool:
    p = inv._position(oid)
    assert p >= 0
    return inv._words[p * _WORDS + 2] != _AS_OBJECT


@settings(max_examples=200)
@given(st.lists(fields, min_size=1, max_size=12))
def test_every_field_comes_back_from_the_packed_record(entries: list[dict[str, object]]
                                                       ) -> None:
    inv = _Inventory()
    oids = [object_id(os.urandom(8)) for _ in entries]
    want = {}
    for oid, f in zip(oids, entries, strict=True):
        loc = _entry(oid, f)
        want[oid] = _fields(loc)
        inv.add(loc)
    del loc
    inv.pack()
    for oid, f in zip(oids, entries, strict=True):
        # Packed unless its stamp is kept whole (an HLCTimestamp: not an int).
        assert _packed(inv, oid) == (type(f["stamp"]) is int)
    for oid in oids:
        got = inv[oid]
        assert _fields(got) == want[oid]
        # Values shared between entries stay the same objects (they are compared by
        # identity: a confirmed dict, a rare slot, a policy).
        assert got.policy is want[oid][1] and got.rare is want[oid][2]
        assert got.confirmed is want[oid][3]
    assert list(inv) == oids and len(inv) == len(oids)


def test_an_entry_leaves_the_packed_form_when_read_and_comes_back_to_it() -> None:
    inv = _Inventory()
    oids = [object_id(os.urandom(8)) for _ in range(3)]
    for i, oid in enumerate(oids):
        loc = _Local(_key(oid), POLICIES[0], stamp=(i + 1) << 50)
        inv.add(loc)
    del loc
    inv.pack()
    assert all(_packed(inv, o) for o in oids)
    held = inv[oids[1]]
    assert not _packed(inv, oids[1])
    # Off the common state: a peer's no_room, a tombstone stamp kept whole, flags.
    held.rare = _rare(None, float("-inf"), {"c": 3.0}, None)
    held.stamp = HLCTimestamp(5, 6, "a node beyond the table")
    held.flags = 3
    inv.pack()
    assert not _packed(inv, oids[1])  # held by this test: never packed behind it
    assert inv[oids[1]] is held
    del held
    inv.pack()
    assert not _packed(inv, oids[1])  # its stamp cannot be packed
    back = inv[oids[1]]
    assert back.no_room == {"c": 3.0} and back.flags == 3
    assert back.stamp == HLCTimestamp(5, 6, "a node beyond the table")
    back.stamp = 7 << 50  # back in a packable state
    back.rare = _COMMON
    back.flags = 0
    del back
    inv.pack()
    assert _packed(inv, oids[1])
    again = inv[oids[1]]
    assert again.rare is _COMMON and again.stamp == 7 << 50 and again.flags == 0
    assert list(inv) == oids


def test_a_held_entry_keeps_its_changes_across_many_reads_of_others() -> None:
    """Reads of other entries pack what waits (every ``_FLUSH_AT``); the entry a caller
    holds is skipped, and its changes are what the inventory gives back later."""
    inv = _Inventory()
    oids = [object_id(os.urandom(8)) for _ in range(3 * _FLUSH_AT)]
    for oid in oids:
        inv.add(_Local(_key(oid), POLICIES[0], stamp=1 << 60))
    inv.pack()
    held = inv[oids[0]]
    for oid in oids[1:]:
        inv.get(oid)
        held.seq += 1
    assert not _packed(inv, oids[0]) and _packed(inv, oids[1])
    del held
    gc.collect()
    inv.pack()
    assert _packed(inv, oids[0])
    assert inv[oids[0]].seq == len(oids) - 1


def test_shapes_are_shared_and_forgotten_when_no_entry_has_them() -> None:
    inv = _Inventory()
    oids = [object_id(os.urandom(8)) for _ in range(100)]
    for i, oid in enumerate(oids):
        inv.add(_Local(_key(oid), POLICIES[0], rs=("a", "b", "c"), seq=i % 2, stamp=i))
    inv.pack()
    assert len(inv._shape_of) == 2
    for oid in oids:
        if oids.index(oid) % 2:
            del inv[oid]
    assert len(inv._shape_of) == 1
    assert sum(1 for s in inv._shapes if s is not None) == 1


@settings(max_examples=100)
@given(st.lists(st.tuples(st.sampled_from(["add", "del", "read"]), st.integers(0, 40),
                          st.integers(0, 3)), max_size=300))
def test_the_inventory_behaves_as_a_dict_in_insertion_order(
        ops: list[tuple[str, int, int]]) -> None:
    """Against a dict: adds (a replaced entry keeps its place), removals (beyond 1,024
    gone positions, a compaction), reads, content ids and other ids mixed."""
    ids = [object_id(bytes([i])) if i % 5 else f"o{i}" for i in range(41)]
    inv = _Inventory()
    model: dict[str, int] = {}
    rng = random.Random(len(ops))
    for op, i, seq in ops:
        oid = ids[i]
        if op == "add":
            inv.add(_Local(_key(oid), POLICIES[seq % 3], seq=seq, stamp=rng.randrange(1 << 100)))
            model[oid] = seq
        elif op == "del" and oid in model:
            del inv[oid]
            del model[oid]
        elif op == "read":
            got = inv.get(oid)
            assert (got is None) == (oid not in model)
            if got is not None:
                assert got.seq == model[oid]
        if rng.random() < 0.1:
            inv.pack()
    assert list(inv) == list(model)
    assert [loc.seq for loc in inv.values()] == list(model.values())
    assert len(inv) == len(model)
    assert all((o in inv) == (o in model) for o in ids)


def test_removals_are_compacted_and_lookups_still_find_every_entry() -> None:
    inv = _Inventory()
    # Content ids, and every 100th an id kept as a _Local (not a content id).
    oids = [object_id(i.to_bytes(4, "big")) if i % 100 else f"o{i}" for i in range(5000)]
    for i, oid in enumerate(oids):
        inv.add(_Local(_key(oid), POLICIES[0], stamp=7, seq=i))
    held = inv[oids[4321]]  # a _Local held across the compaction
    for oid in oids[:4000]:
        del inv[oid]
    assert inv._compactions >= 1
    assert len(inv._words) // _WORDS < 5000
    assert list(inv) == oids[4000:]
    assert all(o in inv for o in oids[4000:]) and not any(o in inv for o in oids[:4000])
    assert [loc.seq for loc in inv.values()] == list(range(4000, 5000))
    assert inv[oids[4321]] is held and inv[oids[4500]].key == "o4500"
    inv.add(_Local(_key(oids[0]), POLICIES[0], stamp=8))
    assert list(inv)[-1] == oids[0] and inv[oids[0]].stamp == 8
    for gone in (oids[1], oids[100]):  # as a dict: removing what is not there
        with pytest.raises(KeyError):
            del inv[gone]


def test_the_data_sims_chaos_run_is_the_same_with_every_entry_packed_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The data plane's chaos run (its golden trace, ``tests/sim/test_golden_traces.py``)
    with every entry packed again as soon as no caller holds it (``_FLUSH_AT`` 1, where
    the sim's small inventories would otherwise stay ``_Local``s): the same run, byte for
    byte, and entries did go through the packed form."""
    from meshscale.core import replication
    from meshscale.sim import dataplane

    monkeypatch.setattr(replication, "_FLUSH_AT", 1)
    stored = [0]
    real = _Inventory._store

    def counting(self: _Inventory, p: int, loc: _Local) -> bool:
        ok = real(self, p, loc)
        stored[0] += ok
        return ok

    monkeypatch.setattr(_Inventory, "_store", counting)
    assert dataplane.chaos_run(7).trace_hash == (
        "0496fa53d2ff12bcfebdaac5991321ade3c820ab7588687d1e28816467ba2f88")
    assert stored[0] > 1000


def test_the_unconfirmed_count_of_packed_entries_is_counted_by_shape() -> None:
    """``unconfirmed_count`` settles each shape of packed entries once and counts it for
    all of them: the same count as asking ``confirmed_holders`` of every id, whether a
    match covers every entry, none, or only those unchanged since its round started."""
    from meshscale.core.placement import Candidate
    from meshscale.core.replication import ReplicaManager, ReplicationConfig

    cfg = ReplicationConfig(sync_interval_s=5.0, view_change_delay_s=0.1)
    m = ReplicaManager("a", config=cfg, rng=random.Random(2), now=0.0)
    m.set_view([Candidate("a", "eu", "eu-a"), Candidate("b", "us", "us-a")], 0.0)
    oids = [object_id(i.to_bytes(2, "big")) for i in range(400)] + ["o1", "o2"]
    for oid in oids[:200]:
        m.object_added(oid, ObjectPolicy(2), None, 0.0)
    m._seq += 1  # a round starts: entries changed from now on are not covered by it
    for oid in oids[200:]:
        m.object_added(oid, ObjectPolicy(2), None, 0.0)
    for oid in oids[::7]:
        m._set_confirmed(m._inv[oid], {"b": 0.5})
    m.delete(oids[3], ObjectPolicy(2), HLCTimestamp(5, 0, "a"), 1.0, 1.0)

    def count() -> tuple[int, int]:
        m._inv.pack()
        assert sum(_packed(m._inv, o) for o in oids if o[0] != "o") > 390
        got = m.unconfirmed_count()
        return got, sum(1 for o in m.inventory() if not m.confirmed_holders(o))

    got, want = count()
    assert got == want == len(oids) - 1 - len([o for o in oids[::7] if o != oids[3]])
    m._matched["b"] = (2.0, m._seq - 1)  # covers the entries added before the round
    got, want = count()
    assert got == want and 0 < want < 200
    m._matched["b"] = (3.0, m._seq)  # covers every entry of the pair set
    got, want = count()
    assert got == want == 0


def test_placement_reads_a_packed_entrys_sets_from_its_shape_and_matches_the_entry() -> None:
    """``placement`` (a listing page asks it of a thousand ids) gives a packed entry's
    replica and write sets from its shape without making it a ``_Local`` while the view
    is the one they were computed under, and exactly what the entry itself gives: for
    copies, a tombstone, another policy, a write set unlike the replica set, and after
    a view change (when the sets must be computed again)."""
    from meshscale.core.placement import Candidate
    from meshscale.core.replication import ReplicaManager, ReplicationConfig

    cfg = ReplicationConfig(sync_interval_s=5.0, view_change_delay_s=0.1,
                            rebuild_slice_entries=100)  # a view change leaves most stale
    m = ReplicaManager("a", config=cfg, rng=random.Random(3), now=0.0)
    nodes = [Candidate("a", "eu", "eu-a"), Candidate("b", "us", "us-a"),
             Candidate("c", "ap", "ap-a"), Candidate("d", "eu", "eu-b")]
    m.set_view(nodes, 0.0)
    pol = ObjectPolicy(2)
    oids = [object_id(i.to_bytes(2, "big")) for i in range(300)] + ["o1"]
    for oid in oids:
        m.object_added(oid, pol, None, 0.0)
    m.delete(oids[5], pol, HLCTimestamp(5, 0, "a"), 1.0, 1.0)
    odd = m._inv[oids[7]]
    odd.ws = ("b", "d")  # a write set unlike its replica set (a member full)
    del odd

    def want(oid: str, policy: ObjectPolicy) -> object:
        loc = m._inv.get(oid)
        if loc is None or loc.tomb is not None or loc.policy != policy:
            return None
        return m._rs_of_local(loc), loc.ws

    for oid in oids:
        m.placement(oid, pol)  # computes the sets under this view
    first: dict[str, object] = {}
    for view in (None, nodes[:3]):
        if view is not None:
            m.set_view(view, 2.0)  # the sets of entries past the first slice are stale
        m._inv.pack()
        packed = [o for o in oids if o[0] != "o" and _packed(m._inv, o)]
        assert len(packed) > 290
        got = {o: m.placement(o, pol) for o in oids}
        first = first if view is not None else got
        other = {o: m.placement(o, ObjectPolicy(3)) for o in oids}
        if view is None:
            assert all(_packed(m._inv, o) for o in packed), "placement unpacked an entry"
            assert got[oids[7]] is not None and got[oids[7]][1] == ("b", "d")
        assert got == {o: want(o, pol) for o in oids}
        assert other == {o: None for o in oids}
        assert got[oids[5]] is None and got[oids[7]] is not None
    assert got != first  # the view change moved some sets
