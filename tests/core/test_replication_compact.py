"""The inventory's compact forms (issue #24): a content id kept as the int of its digest,
an entry's stamp packed in one int, the inventory looked up and walked by id. Each must
give back exactly what went in, for every input, or copies would be confused or lost."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshscale.core import replication
from meshscale.core.hlc import LOGICAL_MAX, WALL_NS_MAX, HLCTimestamp
from meshscale.core.objects import OBJECT_ID_PREFIX, object_id
from meshscale.core.placement import Candidate, ObjectPolicy
from meshscale.core.replication import (
    _DROPPING,
    _HANDED,
    _NO_ROOM,
    _NODE_BITS,
    _TOMB,
    _UNDER,
    ZERO_TS,
    DigestMsg,
    DigestReply,
    Offer,
    ReplicaManager,
    ReplicationConfig,
    SendMessage,
    _Inventory,
    _key,
    _new_local,
    _oid,
    decode_message,
    encode_message,
)

HEX = "0123456789abcdef"
ANY = ObjectPolicy(3)

canonical = st.text(HEX, min_size=64, max_size=64).map(lambda h: OBJECT_ID_PREFIX + h)
# Strings that look like content ids but are not spelled canonically: int() takes them
# (upper case, underscores, a sign, white space) but packing them would change them.
near = st.one_of(
    canonical.map(str.upper),
    canonical.map(lambda s: s[:-1] + "F"),
    canonical.map(lambda s: s[:3] + "+" + s[4:]),
    canonical.map(lambda s: s[:3] + " " + s[4:]),
    canonical.map(lambda s: s[:10] + "_" + s[11:]),
    canonical.map(lambda s: s[:-1]),
    canonical.map(lambda s: s + "0"),
    canonical.map(lambda s: "b4-" + s[3:]),
    st.text(HEX, min_size=67, max_size=67),
)
any_id = st.one_of(canonical, near, st.text(max_size=80))


@given(canonical)
def test_a_content_id_is_kept_as_an_int_and_given_back(oid: str) -> None:
    k = _key(oid)
    assert isinstance(k, int)
    assert _oid(k) == oid
    assert _key(k) is k  # a key already made is kept as it is


@given(near)
def test_an_id_spelled_otherwise_is_kept_as_its_string(oid: str) -> None:
    assert _key(oid) == oid and _oid(_key(oid)) == oid


@given(st.lists(any_id, unique=True, max_size=30))
def test_distinct_ids_have_distinct_keys(oids: list[str]) -> None:
    keys = [_key(o) for o in oids]
    assert len(set(keys)) == len(oids)
    assert [_oid(k) for k in keys] == oids


stamps = st.builds(HLCTimestamp, st.integers(0, WALL_NS_MAX), st.integers(0, LOGICAL_MAX),
                   st.sampled_from(["", "a", "node-1", "n\x00\u00e9"]))


@given(stamps, st.integers(0, _UNDER | _DROPPING | _HANDED))
def test_an_entrys_stamp_is_given_back_as_a_write_or_a_tombstone(
        ts: HLCTimestamp, flags: int) -> None:
    copy = _new_local("o", ANY, None, written=ts, flags=flags)
    assert copy.written == ts and copy.tomb is None and copy.flags == flags
    tomb = _new_local("o", ANY, None, tomb=ts, flags=flags)
    assert tomb.tomb == ts and tomb.written == ZERO_TS and tomb.flags == flags | _TOMB
    assert _new_local("o", ANY, None).written is ZERO_TS


@given(stamps, stamps)
def test_a_newer_stamp_replaces_the_old_one(a: HLCTimestamp, b: HLCTimestamp) -> None:
    loc = _new_local("o", ANY, None, written=a)
    loc.written = b
    assert loc.written == b and loc.tomb is None
    loc = _new_local("o", ANY, None, tomb=a)
    loc.tomb = b
    assert loc.tomb == b and loc.written == ZERO_TS
    loc.under = True
    assert loc.tomb == b


def test_the_inventory_is_looked_up_and_walked_by_id_in_insertion_order() -> None:
    oids = [object_id(os.urandom(8)) for _ in range(20)] + ["o1", "B3-X", "o2"]
    inv = _Inventory()
    for oid in oids:
        loc = _new_local(oid, ANY, None)
        inv.add(loc)
        assert inv[oid] is loc and inv.get(oid) is loc and oid in inv
    # The keys a view change walks (packed: 32 bytes each, not an int per entry), in
    # order, and their tail after a position, as a rebuild restarted takes them.
    keys = inv.keys()
    assert list(keys) == [_key(o) for o in oids] and len(keys) == len(oids)
    assert list(keys.tail(15)) == [_key(o) for o in oids[15:]]
    assert list(keys.tail(21) + keys) == [_key(o) for o in oids[21:] + oids]
    assert list(inv) == oids
    assert [o for o, _ in inv.items()] == oids
    assert [loc.oid for loc in inv.values()] == oids
    assert len(inv) == len(oids)
    for oid in oids[::2]:
        del inv[oid]
    assert list(inv) == oids[1::2]
    assert list(inv.keys()) == [_key(o) for o in oids[1::2]]  # gone ones left out
    assert all(inv.get(o) is None and o not in inv for o in oids[::2])
    assert oids[0].upper() not in inv and 3 not in inv


def test_a_mismatch_offers_the_unconfirmed_first_in_id_order_up_to_the_round_budget() -> None:
    """A digest mismatch lists only the ids the round may offer (``max_ids_per_round``),
    chosen as before: the pair set's unconfirmed entries first, each part in id order
    (content ids, kept as ints, and other ids ordered together as strings)."""
    cfg = ReplicationConfig(sync_interval_s=5.0, view_change_delay_s=0.1,
                            max_ids_per_round=10, page_size=4)
    m = ReplicaManager("a", config=cfg, rng=random.Random(1), now=0.0)
    m.set_view([Candidate("a", "eu", "eu-a"), Candidate("b", "us", "us-a")], 0.0)
    oids = [object_id(bytes([i])) for i in range(15)] + [f"o{i}" for i in range(15)]
    for oid in oids:
        m.object_added(oid, ObjectPolicy(2), None, 0.0)
    confirmed = set(oids[::3])
    for oid in confirmed:
        m._set_confirmed(m._inv[oid], {"b": 0.5})
    m.drain()
    digest: DigestMsg | None = None
    now = 0.0
    while digest is None:
        now = m.next_deadline() or now + 1.0
        m.on_timer(now)
        for out in m.drain():
            if isinstance(out, SendMessage) and out.dst == "b":
                msg = decode_message(out.payload, 1 << 20)
                if isinstance(msg, DigestMsg):
                    digest = msg
    assert digest.count == len(oids)
    m.handle_message("b", encode_message(DigestReply(digest.round, False)), now)
    offered = []
    for out in m.drain():
        if isinstance(out, SendMessage):
            msg = decode_message(out.payload, 1 << 20)
            if isinstance(msg, Offer):
                offered += [ref.oid for ref in msg.refs]
    assert offered == sorted(oids, key=lambda o: (o in confirmed, o))[:10]


def test_the_unconfirmed_count_is_the_copies_no_peer_confirmed() -> None:
    """``unconfirmed_count`` (the capacity controller's sole copies) counts what listing
    the inventory and asking ``confirmed_holders`` of each id counted, tombstones aside."""
    cfg = ReplicationConfig(sync_interval_s=5.0, view_change_delay_s=0.1)
    m = ReplicaManager("a", config=cfg, rng=random.Random(2), now=0.0)
    m.set_view([Candidate("a", "eu", "eu-a"), Candidate("b", "us", "us-a")], 0.0)
    oids = [object_id(bytes([i])) for i in range(12)] + [f"o{i}" for i in range(6)]
    for oid in oids:
        m.object_added(oid, ObjectPolicy(2), None, 0.0)
    for oid in oids[::4]:
        m._set_confirmed(m._inv[oid], {"b": 0.5})
    m.delete(oids[1], ObjectPolicy(2), HLCTimestamp(5, 0, "a"), 1.0, 1.0)
    m._matched["b"] = (2.0, -1)  # a match older than every entry: covers none
    want = sum(1 for o in m.inventory() if not m.confirmed_holders(o))
    assert want == len(oids) - 1 - len(oids[::4])
    assert m.unconfirmed_count() == want
    m._matched["b"] = (3.0, m._seq)  # a digest match covering every entry of the pair
    assert m.unconfirmed_count() == 0


fields = st.fixed_dictionaries({
    "hint_for": st.sampled_from([None, "eu1", "us2"]),
    "failed_at": st.sampled_from([float("-inf"), 1.5, 7.0]),
    "no_room": st.sampled_from([None, {"ap1": 2.0}]),
    "ws": st.sampled_from([("a", "b"), ("a", "d")]),
})


@given(st.lists(st.tuples(st.integers(0, 3), fields), max_size=12))
def test_an_entrys_rare_fields_are_independent_and_never_shared_when_changed(
        steps: list[tuple[int, dict[str, Any]]]) -> None:
    """``hint_for``, ``failed_at``, ``no_room`` and ``ws`` share one slot (``_Local.rare``),
    a value shared between entries: setting one on an entry leaves its others, and every
    other entry's, as they were; a ``no_room`` dict is the entry's own; a write set equal
    to the replica set is not kept apart."""
    locs = [_new_local(f"o{i}", ANY, None) for i in range(4)]
    for loc in locs:
        loc.rs = ("a", "b")
    want = [{"hint_for": None, "failed_at": float("-inf"), "no_room": {}, "ws": ("a", "b")}
            for _ in locs]
    for i, f in steps:
        for name, value in f.items():
            if name == "no_room":
                # As _set_no_room does: a new dict of the entry's own, or back to none.
                value = _NO_ROOM if value is None else dict(value)
            setattr(locs[i], name, value)
            want[i][name] = dict(value) if name == "no_room" else value
        if locs[i].no_room is not _NO_ROOM:
            locs[i].no_room["x"] = 9.0  # changed in place, as _set_no_room does
            want[i]["no_room"]["x"] = 9.0
        for loc, w in zip(locs, want, strict=True):
            assert {"hint_for": loc.hint_for, "failed_at": loc.failed_at,
                    "no_room": dict(loc.no_room), "ws": loc.ws} == w
            assert loc.rs == ("a", "b")
            if loc.ws == loc.rs:
                assert loc.rare.ws is None
    assert _NO_ROOM == {}
    same = [_new_local(f"p{i}", ANY, None) for i in range(3)]
    for loc in same:
        loc.failed_at = 4.25
    assert same[0].rare is same[1].rare is same[2].rare  # one value for all of them
    loc = same[0]
    loc.rs, loc.ws = ("x", "y"), ("x", "z")  # as _rs_of_local sets them: rs, then ws
    assert loc.ws == ("x", "z")
    loc.rs, loc.ws = ("p",), ("p",)
    assert loc.ws == ("p",) and loc.rare is same[1].rare


def test_stamps_of_more_nodes_than_the_table_names_are_kept_as_they_are(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A packed stamp names its node by its number in a table of ``2 ** _NODE_BITS``; the
    stamp of a node beyond it is kept whole, and every stamp reads back as it was."""
    monkeypatch.setattr(replication, "_STAMP_NODES", [""])
    monkeypatch.setattr(replication, "_STAMP_NODE_NUMBERS", {"": 0})
    n = (1 << _NODE_BITS) + 50
    stamps = [HLCTimestamp(WALL_NS_MAX - i, LOGICAL_MAX - i, f"node{i}") for i in range(n)]
    locs = [_new_local("o", ANY, None, written=ts) for ts in stamps]
    assert [loc.written for loc in locs] == stamps
    assert sum(type(loc.stamp) is int for loc in locs) == (1 << _NODE_BITS) - 1
    tomb = _new_local("o", ANY, None, tomb=stamps[-1])
    assert tomb.tomb == stamps[-1] and tomb.written == ZERO_TS
