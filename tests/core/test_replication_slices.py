"""A view change's rebuild in slices (issue #24): each call on the driver's loop re-places
and re-indexes at most ``rebuild_slice_entries`` entries, no digest round starts on a
half-rebuilt index, and once the last slice is done the digests, handoff set, counts and
confirmations are those of a rebuild done at once, whatever happened in between (adds,
removals, deletes, reads, digest matches pending from before, a second view change)."""

from __future__ import annotations

import random

import pytest

from meshscale.core.hlc import HLCTimestamp
from meshscale.core.placement import Candidate, Residency
from meshscale.core.replication import (
    DigestMsg,
    DigestReply,
    ObjectPolicy,
    ReplicaManager,
    ReplicationConfig,
    SendMessage,
    decode_message,
    encode_message,
)

NODES = [Candidate(f"{r}{i}", r, f"{r}-{z}") for r in ("eu", "us", "ap")
         for i, z in enumerate("abcab")]
POLICIES = [ObjectPolicy(3), ObjectPolicy(2), ObjectPolicy(1),
            ObjectPolicy(3, Residency(frozenset({"eu"}), "pii")),
            ObjectPolicy(3, Residency(frozenset({"ap"}))),
            ObjectPolicy(2, Residency(frozenset({"us", "ap"})))]
WRITTEN = HLCTimestamp(1, 0, "x")
SLICE = 7
# No round on a timer: rounds are started by hand, the same on both managers.
QUIET = dict(sync_interval_s=1e9, view_change_delay_s=1e9, self_check=True)


def _state(rm: ReplicaManager) -> tuple[object, ...]:
    peers = sorted(c.name for c in NODES)
    return ([rm._pair_digest(p) for p in peers], sorted(rm._handoff),
            rm.under_replicated_count(), sorted(rm._inv),
            {o: rm.confirmed_holders(o) for o in sorted(rm._inv)})


def _match_round(rms: list[ReplicaManager], now: float) -> None:
    """A digest round with every peer, each answered ``match``: pending matches (settled
    into the entries lazily) that a view change must not lose or misapply."""
    for rm in rms:
        assert rm._rebuilding is None
        rm._sync(list(rm._peers), now)
        for out in rm.drain():
            if isinstance(out, SendMessage):
                msg = decode_message(out.payload, 1 << 20)
                if isinstance(msg, DigestMsg):
                    rm.handle_message(out.dst, encode_message(DigestReply(msg.round, True)),
                                      now)
        rm.drain()


def _set_view_at_once(rm: ReplicaManager, view: list[Candidate], now: float) -> None:
    """The reference: what ``set_view`` did before slicing, its settling and departures
    done here on every entry before the view moves (so the rebuild has none left)."""
    names = {c.name for c in view}
    removed = {n for n in rm._view if n not in names}
    for loc in rm._inv.values():
        rm._settle(loc)
        if removed:
            rm._set_confirmed(loc, {p: t for p, t in loc.confirmed.items() if p not in removed})
            for r in removed:
                loc.no_room.pop(r, None)
    rm._matched.clear()
    rm.set_view(view, now)
    assert rm._rebuilding is None


def _new_view(rng: random.Random, view: list[Candidate]) -> list[Candidate]:
    names = {c.name for c in view}
    others = [c for c in NODES[1:] if c.name not in names]
    kind = rng.choice(["join", "leave", "both", "fill", "leave"])
    if kind in ("join", "both") and others:
        view = view + rng.sample(others, rng.randint(1, min(2, len(others))))
    if kind in ("leave", "both") and len(view) > 2:
        gone = set(rng.sample([c.name for c in view[1:]], rng.randint(1, 2)))
        view = [c for c in view if c.name not in gone]
    if kind == "fill" and len(view) > 1:
        k = rng.randrange(1, len(view))
        c = view[k]
        view = [*view[:k], Candidate(c.name, c.region, c.zone, full=not c.full), *view[k + 1:]]
    return view


@pytest.mark.parametrize("seed", range(8))
def test_a_sliced_rebuild_ends_as_a_rebuild_done_at_once(seed: int) -> None:
    rng = random.Random(seed)
    me = NODES[0].name
    sliced = ReplicaManager(me, config=ReplicationConfig(rebuild_slice_entries=SLICE, **QUIET),
                            rng=random.Random(1), now=0.0)
    whole = ReplicaManager(me, config=ReplicationConfig(**QUIET), rng=random.Random(1), now=0.0)
    both = [sliced, whole]
    view = [NODES[0], *rng.sample(NODES[1:], 7)]
    for rm in both:
        rm.set_view(view, 0.0)
    n = 0

    def add(now: float) -> None:
        nonlocal n
        oid, pol = f"obj-{seed}-{n}", rng.choice(POLICIES)
        n += 1
        for rm in both:
            rm.object_added(oid, pol, None, now, WRITTEN)

    for _ in range(200):
        add(0.0)
    now = 1.0
    slices = restarts = 0
    for _ in range(20):
        if rng.random() < 0.7:
            _match_round(both, now)
        view = _new_view(rng, view)
        sliced.set_view(view, now)
        _set_view_at_once(whole, view, now)
        again = True  # one view change more during the rebuild (more could go on for ever)
        # Whatever the driver does while the rebuild is under way, on both managers.
        while sliced._rebuilding is not None:
            now += 0.25
            for _ in range(rng.randint(0, 3)):
                op = rng.random()
                oids = sorted(whole._inv)
                oid = rng.choice(oids) if oids else None
                if op < 0.3:
                    add(now)
                elif op < 0.45 and oid is not None:
                    for rm in both:
                        rm.object_removed(oid, now)
                elif op < 0.55 and oid is not None:
                    pol = whole._inv[oid].policy
                    for rm in both:
                        rm.delete(oid, pol, HLCTimestamp(2, 0, "x"), now, 0.0)
                elif op < 0.75 and oid is not None:
                    # Reads place entries under the current view before their slice does.
                    for o in rng.sample(oids, min(len(oids), 20)):
                        pol = whole._inv[o].policy
                        assert sliced.placement(o, pol) == whole.placement(o, pol)
                        assert sliced.confirmed_holders(o) == whole.confirmed_holders(o)
                elif op < 0.8 and again:
                    again = False
                    restarts += 1
                    view = _new_view(rng, view)
                    sliced.set_view(view, now)
                    _set_view_at_once(whole, view, now)
            if sliced._rebuilding is None:
                break
            # No digest round on a half-rebuilt index; the next slice is due now.
            assert sliced.next_deadline() == sliced._rebuilding.at <= now
            rounds = sliced.stats.get("sync_rounds", 0)
            sliced.on_timer(now)
            assert sliced.stats.get("sync_rounds", 0) == rounds
            slices += 1
        # The last slice checked the digests against a recomputation (self_check), and
        # the state is that of the manager that rebuilt at once.
        sliced._verify()
        assert _state(sliced) == _state(whole)
        for rm in both:
            rm.drain()
    assert slices > 20 and restarts > 0  # the sliced path did run, and was restarted


def test_each_call_rebuilds_at_most_a_slice_and_rounds_wait_for_the_last() -> None:
    me = NODES[0].name
    rm = ReplicaManager(me, config=ReplicationConfig(rebuild_slice_entries=SLICE,
                                                     sync_interval_s=1e9, self_check=True),
                        rng=random.Random(3), now=0.0)
    rm.set_view(NODES[:6], 0.0)
    for i in range(100):
        rm.object_added(f"o{i}", ObjectPolicy(3), None, 0.0, WRITTEN)
    rm.on_timer(1.0)  # the round the adds asked for
    rm.drain()
    rounds = rm.stats.get("sync_rounds", 0)
    indexed = 0
    real = rm._index

    def counting(loc: object, **kw: object) -> None:
        nonlocal indexed
        indexed += 1
        real(loc, **kw)  # type: ignore[arg-type]

    rm._index = counting  # type: ignore[assignment,method-assign]
    rm.set_view(NODES[:5], 10.0)  # a node leaves: every set it was in moves
    assert indexed <= SLICE
    peer = NODES[1].name
    calls = 0
    now = 10.0
    while rm._rebuilding is not None:
        # A digest from a peer is not compared with a half-rebuilt side.
        rm.handle_message(peer, encode_message(DigestMsg(1, 3, b"\0" * 16)), now)
        assert not rm.drain()
        indexed = 0
        assert rm.next_deadline() == rm._rebuilding.at <= now  # the next slice, at once
        # Later than the round the view change asked for (10.5 s): it waits.
        now += 0.2
        rm.on_timer(now)
        assert indexed <= SLICE
        if rm._rebuilding is not None:
            assert not [o for o in rm.drain() if isinstance(o, SendMessage)]
            assert rm.stats.get("sync_rounds", 0) == rounds
        calls += 1
    assert now > 10.5 and calls >= 100 // SLICE
    assert rm.stats["digests_unanswered.rebuilding"] == calls
    # Done: the round set at the view change went out with the last slice.
    sent = [decode_message(o.payload, 1 << 20) for o in rm.drain() if isinstance(o, SendMessage)]
    assert any(isinstance(m, DigestMsg) for m in sent)


def test_a_small_inventory_is_rebuilt_in_set_view() -> None:
    rm = ReplicaManager(NODES[0].name, config=ReplicationConfig(rebuild_slice_entries=SLICE),
                        rng=random.Random(3), now=0.0)
    rm.set_view(NODES[:6], 0.0)
    for i in range(SLICE):
        rm.object_added(f"o{i}", ObjectPolicy(3), None, 0.0, WRITTEN)
    rm.set_view(NODES[:5], 1.0)
    assert rm._rebuilding is None and "rebuilds_sliced" not in rm.stats
    with pytest.raises(ValueError):
        ReplicationConfig(rebuild_slice_entries=0)


def test_entries_not_reached_when_the_view_changes_again_are_placed_and_checked() -> None:
    """A view change during a rebuild: entries the rebuild had not reached may have been
    placed under the last view by a read (their cache looks current), but were never
    checked under it; they are placed and checked again, not taken as unmoved."""
    eu, us, ap = ([c for c in NODES if c.region == r] for r in ("eu", "us", "ap"))
    me = eu[0]
    rm = ReplicaManager(me.name, config=ReplicationConfig(rebuild_slice_entries=SLICE,
                                                          **QUIET),
                        rng=random.Random(5), now=0.0)
    rm.set_view([me, *ap[:3], us[0]], 0.0)
    only_ap = ObjectPolicy(3, Residency(frozenset({"ap"})))
    for i in range(5 * SLICE):
        rm.object_added(f"o{i}", only_ap, None, 0.0, WRITTEN)
    assert rm.under_replicated_count() == 0
    rm.set_view([me, *ap[:2], us[0]], 1.0)  # an ap node leaves: every set is short
    assert rm._rebuilding is not None
    for i in range(5 * SLICE):  # reads place them all under the new view
        assert len(rm.placement(f"o{i}", only_ap) or ()) == 2
    rm.set_view([me, *ap[:2], *us[:2]], 2.0)  # a us node joins: no ap set moves
    while rm._rebuilding is not None:
        rm.on_timer(2.0)
    assert rm.under_replicated_count() == 5 * SLICE
    rm._verify()
