"""A view change re-places only the entries whose replica set it moves: the same state,
digests and outputs as placing every entry again, over random joins, leaves and fills."""

from __future__ import annotations

import random
from typing import Any

import pytest

from meshscale.core.hlc import HLCTimestamp
from meshscale.core.placement import Candidate, PlacementError, Residency, replica_set, write_set
from meshscale.core.replication import ObjectPolicy, ReplicaManager, ReplicationConfig

NODES = [Candidate(f"{r}{i}", r, f"{r}-{z}") for r in ("eu", "us", "ap")
         for i, z in enumerate("abcab")]
POLICIES = [ObjectPolicy(3), ObjectPolicy(2), ObjectPolicy(1),
            ObjectPolicy(3, Residency(frozenset({"eu"}), "pii")),
            ObjectPolicy(2, Residency(frozenset({"us", "ap"})))]
CFG = ReplicationConfig(self_check=True)


def _names(f: object, *args: object) -> tuple[str, ...]:
    try:
        return tuple(c.name for c in f(*args))  # type: ignore[operator]
    except PlacementError:
        return ()


def _state(rm: ReplicaManager) -> tuple[object, ...]:
    peers = sorted(c.name for c in NODES)
    return ([rm._pair_digest(p) for p in peers], sorted(rm._handoff),
            rm.under_replicated_count())


@pytest.mark.parametrize("seed", range(6))
def test_a_view_change_keeps_unmoved_sets_and_matches_a_full_rebuild(seed: int) -> None:
    rng = random.Random(seed)
    me = NODES[0].name
    fast = ReplicaManager(me, config=CFG, rng=random.Random(1), now=0.0)
    full = ReplicaManager(me, config=CFG, rng=random.Random(1), now=0.0)
    full._unmoved = lambda *a: None  # type: ignore[method-assign]  # the reference: all
    view = [NODES[0], *rng.sample(NODES[1:], 6)]
    for rm in (fast, full):
        rm.set_view(view, 0.0)
    for i in range(300):
        oid, pol = f"obj-{seed}-{i}", rng.choice(POLICIES)
        for rm in (fast, full):
            rm.object_added(oid, pol, None, 0.0, HLCTimestamp(1, 0, "x"))
    placed = 0
    for step in range(1, 25):
        others = [c for c in NODES[1:] if c.name not in {v.name for v in view}]
        kind = rng.choice(["join", "leave", "both", "fill", "join", "leave"])
        if kind in ("join", "both") and others:
            view = view + rng.sample(others, rng.randint(1, min(2, len(others))))
        if kind in ("leave", "both") and len(view) > 2:
            gone = set(rng.sample([c.name for c in view[1:]], rng.randint(1, 2)))
            view = [c for c in view if c.name not in gone]
        if kind == "fill":
            k = rng.randrange(len(view))
            c = view[k]
            view = [*view[:k], Candidate(c.name, c.region, c.zone, full=not c.full),
                    *view[k + 1:]]
        before = {o: loc.rs for o, loc in fast._inv.items()}
        was_full = any(c.full for c in fast._view.values())
        calls = 0
        real = fast._rs

        def counting(oid: str, policy: ObjectPolicy, real: Any = real) -> tuple[str, ...]:
            nonlocal calls
            calls += 1
            return real(oid, policy)  # type: ignore[no-any-return]

        fast._rs = counting  # type: ignore[method-assign]
        for rm in (fast, full):
            rm.set_view(view, float(step))
        fast._rs = real  # type: ignore[method-assign]
        placed += calls
        assert fast.drain() == full.drain()
        assert _state(fast) == _state(full)
        fast._verify()  # the kept digests and handoff set against a recomputation
        moved = 0
        for oid, loc in fast._inv.items():
            rs = _names(replica_set, oid, view, loc.policy.replicas, loc.policy.residency)
            ws = _names(write_set, oid, view, loc.policy.replicas, loc.policy.residency)
            assert fast._rs_of_local(loc) == rs
            assert loc.ws == (ws if rs else ())
            assert full._rs_of_local(full._inv[oid]) == rs
            moved += rs != before[oid]
        # Placed again: every moved entry and, with no node full and none filling, no
        # other entry that had a set (a fill re-places all).
        assert calls >= moved
        if kind != "fill" and not was_full and not any(c.full for c in view):
            assert calls <= moved + sum(1 for rs in before.values() if not rs)
    assert placed < 24 * 300  # some view changes left sets alone without placing them
