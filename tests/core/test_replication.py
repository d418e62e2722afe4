"""ReplicaManager, hand-driven: no simulator, messages and transfers moved by the test."""

from __future__ import annotations

import random
from typing import TypeVar

import msgspec
import pytest

from meshscale.core.hlc import HLCTimestamp
from meshscale.core.placement import (
    Candidate,
    PlacementError,
    Residency,
    replica_set,
    write_set,
)
from meshscale.core.replication import (
    DigestDrift,
    DigestMsg,
    DigestReply,
    DropLocal,
    ObjectPolicy,
    ObjRef,
    Offer,
    OfferReply,
    PutAcked,
    PutFailed,
    ReplicaManager,
    ReplicationConfig,
    ReplicationOverloaded,
    SendMessage,
    TombstoneDropped,
    Tombstones,
    TombstoneStored,
    Transfer,
    UnderReplicated,
    _Inventory,
    decode_message,
    encode_message,
)
from meshscale.core.wire import WireError

_M = TypeVar("_M")

VIEW = [
    Candidate("eu1", "eu", "eu-a"),
    Candidate("eu2", "eu", "eu-b"),
    Candidate("eu3", "eu", "eu-c"),
    Candidate("us1", "us", "us-a"),
    Candidate("us2", "us", "us-b"),
    Candidate("ap1", "ap", "ap-a"),
    Candidate("ap2", "ap", "ap-b"),
]
REGION = {c.name: c.region for c in VIEW}
EU = ObjectPolicy(3, Residency(frozenset({"eu"}), "pii"))
ANY = ObjectPolicy(3)
# self_check: every sync round of every test compares the incremental pair digests with a
# full recomputation (DigestDrift on a difference).
CFG = ReplicationConfig(sync_interval_s=5.0, view_change_delay_s=0.2, put_timeout_s=4.0,
                        self_check=True)


def manager(name: str, view: list[Candidate] = VIEW, cfg: ReplicationConfig = CFG) -> ReplicaManager:
    m = ReplicaManager(name, config=cfg, rng=random.Random(name), now=0.0)
    m.set_view(view, 0.0)
    m.drain()
    return m


def names(cands: list[Candidate]) -> list[str]:
    return [c.name for c in cands]


def transfers(outs: list[object]) -> list[Transfer]:
    return [o for o in outs if isinstance(o, Transfer)]


# --------------------------------------------------------------------------- writes


def test_put_sends_to_the_replica_set_and_acks_at_w() -> None:
    m = manager("us1")
    m.begin_put(1, "obj", ANY, 2, 0.0)
    ts = transfers(m.drain())
    expected = names(replica_set("obj", VIEW, 3))
    assert [t.dst for t in ts] == expected
    assert all(t.req_id == 1 and t.hint_for is None for t in ts)
    m.transfer_done(1, expected[0], "obj", True, 0.1)
    assert m.drain() == []
    m.transfer_done(1, expected[2], "obj", True, 0.2)
    assert m.drain() == [PutAcked(1, "obj", (expected[0], expected[2]))]
    # A late completion of the acknowledged write changes nothing.
    m.transfer_done(1, expected[1], "obj", False, 0.3)
    assert m.drain() == []


def test_put_refused_synchronously_naming_the_rule() -> None:
    m = manager("us1")
    with pytest.raises(PlacementError) as exc:
        m.begin_put(1, "obj", ObjectPolicy(3, Residency(frozenset({"mars"}))), 1, 0.0)
    assert exc.value.rule == "residency"
    with pytest.raises(PlacementError) as exc:
        m.begin_put(2, "obj", ObjectPolicy(4, Residency(frozenset({"ap"}))), 3, 0.0)
    assert exc.value.rule == "replicas"
    with pytest.raises(ValueError):
        m.begin_put(3, "obj", ANY, 4, 0.0)
    assert m.drain() == []


def test_failed_target_gets_a_hinted_stand_in_inside_the_residency_rule() -> None:
    m = manager("eu1")
    m.begin_put(7, "pii-doc", EU, 3, 0.0)
    targets = [t.dst for t in transfers(m.drain())]
    assert sorted(targets) == ["eu1", "eu2", "eu3"]
    # Every eu node is a target, so a failure has no stand-in: the write fails, and
    # nothing is ever sent outside eu.
    m.transfer_done(7, "eu1", "pii-doc", True, 0.1)
    m.transfer_done(7, "eu2", "pii-doc", False, 0.1)
    outs = m.drain()
    assert not transfers(outs)
    assert len(outs) == 1 and isinstance(outs[0], PutFailed)
    assert "residency regions={eu}" in outs[0].reason
    # With a fourth eu node, the stand-in is that node, never one in another region.
    m = manager("eu1", [*VIEW, Candidate("eu4", "eu", "eu-a")])
    m.begin_put(8, "pii-doc", EU, 3, 0.0)
    first = [t.dst for t in transfers(m.drain())]
    m.transfer_done(8, first[0], "pii-doc", False, 0.1)
    (hint,) = transfers(m.drain())
    assert hint.dst == ({"eu1", "eu2", "eu3", "eu4"} - set(first)).pop()
    assert hint.hint_for == first[0]


def test_hinted_copy_counts_toward_w() -> None:
    m = manager("us1")
    m.begin_put(1, "obj", ObjectPolicy(2), 2, 0.0)
    first = [t.dst for t in transfers(m.drain())]
    m.transfer_done(1, first[0], "obj", True, 0.1)
    m.transfer_done(1, first[1], "obj", False, 0.2)
    (hint,) = transfers(m.drain())
    assert hint.hint_for == first[1] and hint.dst not in first and hint.req_id == 1
    m.transfer_done(1, hint.dst, "obj", True, 0.3)
    assert m.drain() == [PutAcked(1, "obj", (first[0], hint.dst))]


def test_failed_stand_in_is_replaced_by_the_next_for_the_same_target() -> None:
    m = manager("us1")
    m.begin_put(1, "obj", ObjectPolicy(1), 1, 0.0)
    (t,) = transfers(m.drain())
    m.transfer_done(1, t.dst, "obj", False, 0.1)
    (h1,) = transfers(m.drain())
    m.transfer_done(1, h1.dst, "obj", False, 0.2)
    (h2,) = transfers(m.drain())
    assert h2.hint_for == t.dst and h2.dst not in (t.dst, h1.dst)


def test_put_times_out() -> None:
    m = manager("us1")
    m.begin_put(1, "obj", ANY, 2, 0.0)
    m.drain()
    assert m.next_deadline() is not None and m.next_deadline() <= CFG.put_timeout_s
    m.on_timer(CFG.put_timeout_s)
    fails = [o for o in m.drain() if isinstance(o, PutFailed)]
    assert len(fails) == 1 and "timeout" in fails[0].reason


def test_too_many_pending_puts_are_refused() -> None:
    m = manager("us1", cfg=ReplicationConfig(max_pending_puts=2))
    m.begin_put(1, "a", ANY, 1, 0.0)
    m.begin_put(2, "b", ANY, 1, 0.0)
    with pytest.raises(ReplicationOverloaded):
        m.begin_put(3, "c", ANY, 1, 0.0)
    with pytest.raises(ValueError):
        m.begin_put(1, "d", ANY, 1, 0.0)


# --------------------------------------------------------------------------- a tiny mesh


class Mesh:
    """Managers wired together by the test: messages delivered at once (unless a node is
    down), transfers executed at once."""

    def __init__(self, view: list[Candidate] = VIEW, cfg: ReplicationConfig = CFG) -> None:
        self.view = list(view)
        self.m = {c.name: manager(c.name, view, cfg) for c in view}
        self.down: set[str] = set()
        self.now = 0.0
        self.sent_transfers: list[Transfer] = []
        self.drops: list[tuple[str, str]] = []
        self.events: list[object] = []

    def add(self, node: str, oid: str, policy: ObjectPolicy, hint_for: str | None = None) -> None:
        self.m[node].object_added(oid, policy, hint_for, self.now)

    def holders(self, oid: str) -> set[str]:
        return {n for n, m in self.m.items() if m.holds(oid)}

    def set_view(self, view: list[Candidate]) -> None:
        for n, m in self.m.items():
            if n not in self.down:
                m.set_view(view, self.now)

    def run(self, until: float, step: float = 0.1) -> None:
        while self.now < until:
            self.now = round(self.now + step, 6)
            for n in sorted(self.m):
                if n in self.down:
                    continue
                m = self.m[n]
                d = m.next_deadline()
                if d is not None and d <= self.now:
                    m.on_timer(self.now)
            self.flush()

    def flush(self) -> None:
        busy = True
        while busy:
            busy = False
            for n in sorted(self.m):
                if n in self.down:
                    continue
                for out in self.m[n].drain():
                    busy = True
                    self.route(n, out)

    def route(self, src: str, out: object) -> None:
        if isinstance(out, SendMessage):
            if out.dst not in self.down:
                self.m[out.dst].handle_message(src, out.payload, self.now)
        elif isinstance(out, Transfer):
            assert out.policy.allows(REGION.get(out.dst, "eu"))
            self.sent_transfers.append(out)
            ok = out.dst not in self.down
            if ok:
                self.m[out.dst].object_added(out.oid, out.policy, out.hint_for, self.now,
                                             out.written)
            self.m[src].transfer_done(out.req_id, out.dst, out.oid, ok, self.now)
        elif isinstance(out, DropLocal):
            self.drops.append((src, out.oid))
            self.m[src].object_removed(out.oid, self.now)
        else:
            self.events.append(out)


def test_anti_entropy_fills_a_missing_replica() -> None:
    mesh = Mesh()
    rs = names(replica_set("obj", VIEW, 3))
    mesh.add(rs[0], "obj", ANY)
    mesh.run(12.0)
    assert mesh.holders("obj") == set(rs)
    assert all(t.req_id is None for t in mesh.sent_transfers)


def test_re_replication_after_a_death_and_residency_kept() -> None:
    view = [*VIEW, Candidate("eu4", "eu", "eu-a")]
    mesh = Mesh(view)
    rs = names(replica_set("doc", view, 3, EU.residency))
    for n in rs:
        mesh.add(n, "doc", EU)
    mesh.run(6.0)
    victim = rs[0]
    mesh.down.add(victim)
    smaller = [c for c in view if c.name != victim]
    mesh.set_view(smaller)
    mesh.run(mesh.now + 3.0)  # prompt after a view change, well before the period
    new_rs = names(replica_set("doc", smaller, 3, EU.residency))
    assert mesh.holders("doc") - {victim} == set(new_rs)
    assert all(REGION.get(t.dst, "eu") == "eu" for t in mesh.sent_transfers)


def test_hinted_copy_handed_off_when_target_returns_then_dropped() -> None:
    mesh = Mesh()
    rs = names(replica_set("obj", VIEW, 3))
    target = rs[1]
    stand_in = next(n for n in sorted(mesh.m) if n not in rs)
    for n in rs:
        if n != target:
            mesh.add(n, "obj", ANY)
    mesh.add(stand_in, "obj", ANY, hint_for=target)
    mesh.down.add(target)
    mesh.run(12.0)
    # The target is still in the view (not yet declared dead): the hint is kept.
    assert stand_in in mesh.holders("obj") and target not in mesh.holders("obj")
    mesh.down.discard(target)
    mesh.run(mesh.now + 12.0)
    assert mesh.holders("obj") == set(rs)
    assert (stand_in, "obj") in mesh.drops


def test_copy_outside_the_set_is_not_dropped_while_a_member_disagrees() -> None:
    # eu1 holds a copy but is not in the set under its view; one member (eu3) has a
    # different view in which it is not responsible and answers not_mine.
    pol = ObjectPolicy(2, Residency(frozenset({"eu"})))
    m = manager("eu1")
    view = [c for c in VIEW if c.region == "eu"]
    rs = names(replica_set("x", view, 2, pol.residency))
    holder = next(n for n in ["eu1", "eu2", "eu3"] if n not in rs)
    m = manager(holder)
    m.object_added("x", pol, None, 0.0)
    m.on_timer(1.0)
    offers: dict[str, Offer] = {}
    for out in m.drain():
        if isinstance(out, SendMessage):
            msg = decode_message(out.payload, 1 << 20)
            if isinstance(msg, Offer):
                offers[out.dst] = msg
    assert set(offers) == set(rs)
    a, b = rs
    m.handle_message(a, encode_message(OfferReply(offers[a].round, offers[a].page, [], [])), 1.1)
    m.handle_message(b, encode_message(OfferReply(offers[b].round, offers[b].page, [], ["x"])), 1.1)
    assert not any(isinstance(o, DropLocal) for o in m.drain())
    assert m.confirmed_holders("x") == [a]


def test_missing_reply_queues_bounded_repairs_fewest_copies_first() -> None:
    cfg = ReplicationConfig(max_concurrent_transfers=2, sync_interval_s=5.0)
    m = manager("us1", cfg=cfg)
    oids = [f"o{i}" for i in range(10)]
    mine = [o for o in oids if "us1" in names(replica_set(o, VIEW, 7))]
    for o in oids:
        m.object_added(o, ObjectPolicy(7), None, 0.0)
    assert mine == oids  # 7 replicas over 7 nodes: everyone holds everything
    m.on_timer(m.next_deadline() or 0.0)
    digests = {}
    for out in m.drain():
        if isinstance(out, SendMessage):
            msg = decode_message(out.payload, 1 << 20)
            if isinstance(msg, DigestMsg):
                digests[out.dst] = msg
    assert set(digests) == {c.name for c in VIEW} - {"us1"}
    # ap1 says its side differs; us1 offers the ids; ap1 says it misses all of them.
    from meshscale.core.replication import DigestReply

    m.handle_message("ap1", encode_message(DigestReply(digests["ap1"].round, False)), 1.0)
    (offer_out,) = [o for o in m.drain() if isinstance(o, SendMessage)]
    offer = decode_message(offer_out.payload, 1 << 20)
    assert isinstance(offer, Offer) and sorted(r.oid for r in offer.refs) == oids
    m.handle_message("ap1", encode_message(OfferReply(offer.round, offer.page, oids, [])), 1.1)
    ts = transfers(m.drain())
    assert len(ts) == 2 and all(t.dst == "ap1" and t.req_id is None for t in ts)
    m.transfer_done(None, "ap1", ts[0].oid, True, 1.2)
    assert len(transfers(m.drain())) == 1


def test_digest_match_confirms_without_listing_ids() -> None:
    a, b = manager("eu1"), manager("eu2")
    pol = ObjectPolicy(3, Residency(frozenset({"eu"})))
    for m in (a, b):
        m.object_added("d", pol, None, 0.0)
    a.on_timer(a.next_deadline() or 0.0)
    outs = [o for o in a.drain() if isinstance(o, SendMessage) and o.dst == "eu2"]
    (digest,) = outs
    b.handle_message("eu1", digest.payload, 1.0)
    (reply,) = [o for o in b.drain() if isinstance(o, SendMessage)]
    a.handle_message("eu2", reply.payload, 1.1)
    assert a.drain() == []
    assert a.confirmed_holders("d") == ["eu2"]


def test_offer_outside_residency_is_refused_by_the_receiver() -> None:
    m = manager("us1")
    from meshscale.core.replication import ObjRef

    m.handle_message("eu1", encode_message(Offer(1, 0, [ObjRef("p", 3, ["eu"], "pii")])), 0.5)
    (out,) = m.drain()
    assert isinstance(out, SendMessage)
    reply = decode_message(out.payload, 1 << 20)
    assert isinstance(reply, OfferReply) and reply.not_mine == ["p"] and reply.missing == []
    assert m.stats["offers_refused.residency"] == 1


def test_garbage_messages_are_counted_and_dropped() -> None:
    m = manager("us1")
    m.handle_message("eu1", b"\xc1", 0.1)
    m.handle_message("eu1", msgspec.msgpack.encode((99, [1, 1, 0, b""])), 0.1)
    m.handle_message("eu1", b"x" * (CFG.max_message_bytes + 1), 0.1)
    m.handle_message("eu1", msgspec.msgpack.encode((1, [3, 0, 0, [["", 99]]])), 0.1)
    assert m.drain() == []
    assert m.stats["rejected.malformed"] == 2
    assert m.stats["rejected.version"] == 1
    assert m.stats["rejected.oversized"] == 1
    with pytest.raises(WireError):
        decode_message(b"", 10)


def test_under_replicated_reported_once_per_state_change() -> None:
    m = manager("eu1")
    m.object_added("d", EU, None, 0.0)
    assert m.drain() == []
    smaller = [c for c in VIEW if c.name != "eu3"]
    m.set_view(smaller, 1.0)
    unders = [o for o in m.drain() if isinstance(o, UnderReplicated)]
    assert unders == [UnderReplicated("d", 2, 3)]
    m.set_view([c for c in smaller if c.name != "us2"], 2.0)
    assert not [o for o in m.drain() if isinstance(o, UnderReplicated)]


def test_read_sources_self_first_then_known_holders() -> None:
    m = manager("ap2")
    rs = names(replica_set("obj", VIEW, 3))
    assert m.read_sources("obj", ANY, 0.0) == rs
    m.object_added("obj", ANY, None, 0.0)
    srcs = m.read_sources("obj", ANY, 0.0)
    assert srcs[0] == "ap2" and set(srcs[1:]) >= set(rs) - {"ap2"}
    with pytest.raises(PlacementError):
        m.read_sources("obj", ObjectPolicy(1, Residency(frozenset({"mars"}))), 0.0)


def test_same_inputs_same_outputs() -> None:
    def run() -> list[object]:
        mesh = Mesh()
        for i in range(20):
            mesh.add(mesh.view[i % 7].name, f"o{i}", ANY)
        log: list[object] = []
        orig = mesh.route

        def spy(src: str, out: object) -> None:
            log.append((src, out))
            orig(src, out)

        mesh.route = spy  # type: ignore[method-assign]
        mesh.run(15.0)
        return log

    assert run() == run()


# --------------------------------------------------------------------------- deletes

DAY = 86400.0


def ts(sec: float, node: str = "c") -> HLCTimestamp:
    return HLCTimestamp(int(sec * 1e9), 0, node)


class TombMesh(Mesh):
    """Mesh that also records tombstone events and what each node keeps on 'disk'."""

    def __init__(self, view: list[Candidate] = VIEW) -> None:
        super().__init__(view)
        self.kept: dict[str, dict[str, HLCTimestamp]] = {n: {} for n in self.m}
        self.disk: dict[str, dict[str, TombstoneStored]] = {n: {} for n in self.m}
        """What each node's driver last stored per tombstone (``kept`` is its stamp)."""

    def route(self, src: str, out: object) -> None:
        if isinstance(out, TombstoneStored):
            self.kept[src][out.oid] = out.ts
            self.disk[src][out.oid] = out
        elif isinstance(out, TombstoneDropped):
            self.kept[src].pop(out.oid, None)
            self.disk[src].pop(out.oid, None)
        else:
            super().route(src, out)


def test_delete_removes_every_copy_and_a_returning_holder_drops_its_own() -> None:
    mesh = TombMesh()
    rs = names(replica_set("obj", VIEW, 3))
    for n in rs:
        mesh.m[n].object_added("obj", ANY, None, 0.0, ts(100))
    mesh.run(6.0)
    away = rs[2]
    mesh.down.add(away)  # paused: still in everyone's view, misses the delete
    coordinator = next(n for n in sorted(mesh.m) if n not in rs)
    peers = mesh.m[coordinator].delete("obj", ANY, ts(200), mesh.now, 200.0)
    assert set(rs) <= set(peers)
    mesh.flush()
    assert mesh.holders("obj") == {away}
    assert all("obj" in mesh.kept[n] for n in rs if n != away)
    before = len(mesh.sent_transfers)
    mesh.down.discard(away)
    mesh.run(mesh.now + 12.0)
    # It came back with its copy: the copy is dropped, never spread.
    assert mesh.holders("obj") == set()
    assert not [t for t in mesh.sent_transfers[before:] if t.oid == "obj"]
    assert (away, "obj") in mesh.drops
    # The replica set keeps the tombstone; the coordinator (not a member) handed it off.
    assert {n for n, k in mesh.kept.items() if "obj" in k} == set(rs)
    assert mesh.m[away].tombstone("obj") == ts(200)


def test_a_node_that_missed_the_delete_and_has_no_copy_refuses_a_stale_one() -> None:
    mesh = TombMesh()
    rs = names(replica_set("obj", VIEW, 3))
    a, b, c = rs
    for n in (a, b):
        mesh.m[n].object_added("obj", ANY, None, 0.0, ts(100))
    mesh.down.add(a)
    mesh.m[b].delete("obj", ANY, ts(200), mesh.now, 200.0)
    mesh.flush()
    assert mesh.m[c].tombstone("obj") == ts(200)
    assert not mesh.m[c].accepts("obj", ts(100))
    assert mesh.m[c].accepts("obj", ts(300))
    # A stale transfer that arrives anyway is dropped at once.
    mesh.m[c].object_added("obj", ANY, None, mesh.now, ts(100))
    assert DropLocal("obj") in mesh.m[c].drain()
    assert mesh.m[c].stats["resurrections_refused"] == 1
    mesh.down.discard(a)
    mesh.run(12.0)
    assert mesh.holders("obj") == set()


def test_a_hinted_copy_outside_the_set_is_deleted_through_anti_entropy() -> None:
    mesh = TombMesh()
    rs = names(replica_set("obj", VIEW, 3))
    stand_in = next(n for n in sorted(mesh.m) if n not in rs)
    for n in rs[:2]:
        mesh.m[n].object_added("obj", ANY, None, 0.0, ts(100))
    mesh.m[stand_in].object_added("obj", ANY, rs[2], 0.0, ts(100))
    mesh.down.add(rs[2])
    mesh.m[rs[0]].delete("obj", ANY, ts(200), 0.0, 200.0)  # does not know of the hint
    mesh.run(12.0)
    assert mesh.holders("obj") == set()
    assert (stand_in, "obj") in mesh.drops


def test_the_same_bytes_put_after_the_delete_live_again() -> None:
    mesh = TombMesh()
    rs = names(replica_set("obj", VIEW, 3))
    for n in rs:
        mesh.m[n].object_added("obj", ANY, None, 0.0, ts(100))
    mesh.m[rs[0]].delete("obj", ANY, ts(200), 0.0, 200.0)
    mesh.flush()
    assert mesh.holders("obj") == set()
    # A new write (newer than the tombstone) reaches one member; anti-entropy does the rest.
    mesh.m[rs[1]].object_added("obj", ANY, None, mesh.now, ts(300))
    mesh.run(12.0)
    assert mesh.holders("obj") == set(rs)
    assert all("obj" not in k for k in mesh.kept.values())
    assert mesh.m[rs[0]].stats.get("tombstones_superseded", 0) >= 1


def test_tombstones_expire_after_the_grace_period_and_are_bounded() -> None:
    cfg = ReplicationConfig(sync_interval_s=5.0, tombstone_grace_s=DAY, max_tombstones=2)
    m = manager("eu1", cfg=cfg)
    m.object_added("a", ANY, None, 0.0, ts(100))
    m.delete("a", ANY, ts(200), 0.0, 200.0)
    m.delete("b", ANY, ts(201), 0.0, 201.0)
    assert m.tombstones() == ["a", "b"]
    with pytest.raises(ReplicationOverloaded):
        m.delete("c", ANY, ts(202), 0.0, 202.0)
    m.delete("a", ANY, ts(203), 0.0, 203.0)  # a newer delete of a known one is fine
    m.drain()
    assert m.collect_tombstones(200.0 + DAY, 1.0) == 0
    assert m.collect_tombstones(201.0 + DAY, 1.0) == 1
    assert m.drain() == [TombstoneDropped("b")]
    assert m.collect_tombstones(203.0 + DAY, 1.0) == 1 and m.tombstones() == []
    # An expired tombstone received later is not kept and kills nothing.
    m.object_added("d", ANY, None, 0.0, ts(100))
    m.handle_message("eu2", encode_message(Tombstones([ObjRef("d", 3, deleted=ts(150).encode())])),
                     2.0)
    assert m.holds("d") and m.stats["tombstones_ignored.expired"] == 1


def test_tombstone_messages_round_trip_and_bad_stamps_are_ignored() -> None:
    msg = Tombstones([ObjRef("x", 3, ["eu"], "pii", None, ts(5).encode())])
    assert decode_message(encode_message(msg), 1 << 20) == msg
    m = manager("eu1")
    m.object_added("x", EU, None, 0.0, ts(1))
    m.handle_message("eu2", encode_message(Tombstones([ObjRef("x", 3, deleted="nope")])), 0.1)
    assert m.holds("x") and m.stats["rejected.bad_stamp"] == 1


def test_a_delete_is_acknowledged_only_by_a_quorum_of_kept_tombstones() -> None:
    """A delete used to be fire-and-forget: kept only by its coordinator (say, on the
    small side of a partition), it came back when that node died for good."""
    from meshscale.core.replication import DeleteAcked, DeleteFailed, delete_quorum

    assert delete_quorum(ANY) == 2 and delete_quorum(ObjectPolicy(1)) == 1
    mesh = TombMesh()
    rs = names(replica_set("obj", VIEW, 3))
    for n in rs:
        mesh.m[n].object_added("obj", ANY, None, 0.0, ts(100))
    mesh.run(6.0)
    coordinator = next(n for n in sorted(mesh.m) if n not in rs)
    # Every member unreachable: only the coordinator keeps the tombstone, and it is not a
    # member (it hands the tombstone off and forgets it): nothing counts -> not acked.
    mesh.down.update(rs)
    mesh.m[coordinator].delete("obj", ANY, ts(200), mesh.now, 200.0, req_id=7)
    mesh.flush()
    assert not [e for e in mesh.events if isinstance(e, DeleteAcked)]
    mesh.run(mesh.now + CFG.delete_timeout_s + 1)
    failed = [e for e in mesh.events if isinstance(e, DeleteFailed)]
    assert [(e.req_id, e.oid) for e in failed] == [(7, "obj")]
    assert "only 0 of W=2 tombstones durable" in failed[0].reason
    # With the members back, the next delete is acknowledged by members that kept it.
    mesh.down.clear()
    mesh.m[coordinator].delete("obj", ANY, ts(300), mesh.now, 300.0, req_id=8)
    mesh.flush()
    acked = [e for e in mesh.events if isinstance(e, DeleteAcked) and e.req_id == 8]
    assert len(acked) == 1 and len(acked[0].nodes) >= 2
    assert set(acked[0].nodes) <= set(rs)  # members only


@pytest.mark.parametrize("member", [False, True], ids=["outside-the-set", "a-member"])
def test_a_delete_counts_members_that_got_its_tombstone_from_anti_entropy(member: bool) -> None:
    """The members were away for the delete's one push and got the tombstone from
    anti-entropy within the timeout: the coordinator learned it (an offer they kept, a
    digest that matched; an outside coordinator even handed its tombstone off to them)
    yet reported the delete unconfirmed, as only answers to that push counted (swarm seed
    1362091350: five of its eight deletes)."""
    from meshscale.core.replication import DeleteAcked, DeleteFailed

    mesh = TombMesh()
    rs = names(replica_set("obj", VIEW, 3))
    for n in rs:
        mesh.m[n].object_added("obj", ANY, None, 0.0, ts(100))
    mesh.run(6.0)
    coordinator = rs[0] if member else next(n for n in sorted(mesh.m) if n not in rs)
    away = [n for n in rs if n != coordinator]
    mesh.down.update(away)  # paused: still in every view, the push to them is lost
    t0 = mesh.now
    mesh.m[coordinator].delete("obj", ANY, ts(200), t0, 200.0, req_id=5)
    mesh.flush()
    assert not [e for e in mesh.events if isinstance(e, DeleteAcked | DeleteFailed)]
    mesh.down.clear()  # back well within the timeout, and never pushed to again
    mesh.run(t0 + CFG.delete_timeout_s + 1)
    assert all(mesh.m[n].tombstone("obj") == ts(200) for n in rs)
    outcome = [e for e in mesh.events if isinstance(e, DeleteAcked | DeleteFailed)]
    assert len(outcome) == 1 and isinstance(outcome[0], DeleteAcked), outcome
    assert outcome[0].req_id == 5 and len(outcome[0].nodes) >= 2
    assert set(outcome[0].nodes) <= set(rs)  # members only
    assert mesh.m[coordinator].stats.get("deletes_unconfirmed", 0) == 0


def test_a_tombstone_outside_a_short_replica_set_is_kept_until_the_set_is_full() -> None:
    """A delete acknowledged by the only two live members of a three-node set (the third
    was down) was kept by them alone: the coordinator, outside the set, handed its
    tombstone off. Both members then died for good, the third came back with its copy,
    and the deleted object lived again (swarm seed 2115). A non-member now keeps its
    tombstone while the set is short, and gives it to the member that returns."""
    from meshscale.core.replication import DeleteAcked

    mesh = TombMesh()
    eu = ["eu1", "eu2", "eu3"]
    for n in eu:
        mesh.m[n].object_added("obj", EU, None, 0.0, ts(100))
    mesh.run(6.0)
    away, a, b = "eu3", "eu1", "eu2"
    mesh.down.add(away)
    mesh.set_view([c for c in VIEW if c.name != away])  # declared dead
    mesh.run(mesh.now + 1.0)
    mesh.m["us1"].delete("obj", EU, ts(200), mesh.now, 200.0, req_id=1)
    mesh.run(mesh.now + 12.0)
    acked = [e for e in mesh.events if isinstance(e, DeleteAcked)]
    assert [sorted(e.nodes) for e in acked] == [[a, b]]
    assert mesh.m["us1"].tombstone("obj") == ts(200)  # the set is short: kept
    # Both members that acknowledged it die for good; the third returns with its copy.
    mesh.down.update({a, b})
    mesh.down.discard(away)
    mesh.set_view([c for c in VIEW if c.name not in (a, b)])
    mesh.run(mesh.now + 12.0)
    assert mesh.holders("obj") == set()
    assert mesh.m[away].tombstone("obj") == ts(200)
    assert (away, "obj") in mesh.drops
    # With the set full again, the non-member hands its tombstone off as before.
    mesh.down.clear()
    mesh.set_view(VIEW)
    mesh.run(mesh.now + 24.0)
    assert mesh.m["us1"].tombstone("obj") is None
    assert {n for n, k in mesh.kept.items() if "obj" in k} == set(eu)


def test_a_copy_gone_before_the_digest_reply_is_not_offered() -> None:
    """A round lists its ids when it starts; a copy dropped before the peer's mismatch
    reply used to raise KeyError out of the digest-reply path (a swarm seed found it)."""
    from meshscale.core.replication import DigestReply

    rs = names(replica_set("obj", VIEW, 3))
    a, b = rs[0], rs[1]
    m = manager(a)
    m.object_added("obj", ANY, None, 0.0, ts(100))
    m.on_timer(100.0)  # a periodic round with every peer
    digests = [o for o in m.drain() if isinstance(o, SendMessage) and o.dst == b]
    assert digests
    rnd = decode_message(digests[0].payload, 1 << 20)
    assert isinstance(rnd, DigestMsg)
    m.object_removed("obj", 100.5)
    m.drain()
    m.handle_message(b, encode_message(DigestReply(rnd.round, False)), 101.0)  # no KeyError
    offered = [decode_message(o.payload, 1 << 20) for o in m.drain()
               if isinstance(o, SendMessage) and o.dst == b]
    assert all(r.oid != "obj" for o in offered if isinstance(o, Offer) for r in o.refs)


# --------------------------------------------------------------------------- full nodes


class FullMesh(Mesh):
    """A mesh where some nodes' disks are full: the view marks them, and a transfer to
    one is refused as a real full disk would refuse it."""

    def __init__(self, view: list[Candidate] = VIEW) -> None:
        super().__init__(view)
        self.full: set[str] = set()

    def set_full(self, full: set[str]) -> None:
        self.full = set(full)
        self.view = [Candidate(c.name, c.region, c.zone, full=c.name in full)
                     for c in self.view]
        self.set_view(self.view)

    def route(self, src: str, out: object) -> None:
        if isinstance(out, Transfer) and out.dst in self.full:
            self.sent_transfers.append(out)
            self.m[src].transfer_done(out.req_id, out.dst, out.oid, False, self.now)
            return
        super().route(src, out)

    def to(self, node: str) -> list[Transfer]:
        return [t for t in self.sent_transfers if t.dst == node]


def _oids_on(node: str, k: int, view: list[Candidate] = VIEW) -> list[str]:
    """k object ids whose replica set holds ``node``."""
    return [o for o in (f"o{i}" for i in range(2000))
            if node in names(replica_set(o, view, 3))][:k]


def test_a_full_member_keeps_its_copies_and_none_is_copied_elsewhere() -> None:
    mesh = FullMesh()
    oids = _oids_on("eu2", 12)
    for oid in oids:
        for n in names(replica_set(oid, VIEW, 3)):
            mesh.add(n, oid, ANY)
    mesh.run(6.0)
    before = {o: mesh.holders(o) for o in oids}
    mesh.sent_transfers.clear()
    mesh.set_full({"eu2"})
    mesh.run(mesh.now + 20.0)
    # Its copies are still in place, counted, not misplaced: nothing moved, nothing dropped.
    assert {o: mesh.holders(o) for o in oids} == before
    assert mesh.sent_transfers == [] and mesh.drops == []
    assert all("eu2" in mesh.m["eu1"].read_sources(o, ANY, mesh.now) for o in oids)
    # Room again: still nothing to do.
    mesh.set_full(set())
    mesh.run(mesh.now + 20.0)
    assert {o: mesh.holders(o) for o in oids} == before and mesh.sent_transfers == []


def test_a_put_skips_a_full_node_and_its_stand_in_keeps_the_copy_until_it_has_room() -> None:
    mesh = FullMesh()
    (oid,) = _oids_on("eu2", 1)
    home = names(replica_set(oid, VIEW, 3))
    mesh.set_full({"eu2"})
    coord = next(n for n in sorted(mesh.m) if n not in home and n != "eu2")
    mesh.m[coord].begin_put(1, oid, ANY, 3, mesh.now)
    mesh.flush()
    acks = [e for e in mesh.events if isinstance(e, PutAcked)]
    assert len(acks) == 1 and "eu2" not in acks[0].nodes and len(acks[0].nodes) == 3
    ws = set(acks[0].nodes)
    assert mesh.holders(oid) == ws and mesh.to("eu2") == []
    # Many sync rounds later: no transfer to the full node, the stand-in keeps its copy
    # (a member of the rule set still lacks it), no copy is lost or dropped.
    mesh.run(mesh.now + 40.0)
    assert mesh.to("eu2") == [] and mesh.holders(oid) == ws and mesh.drops == []
    # The full node answered "no room" once per holder, and then was left alone.
    declined = mesh.m["eu2"].stats.get("offers_declined.no_room", 0)
    mesh.run(mesh.now + 40.0)
    assert mesh.m["eu2"].stats.get("offers_declined.no_room", 0) == declined
    # It has room again: it takes the copy, and the stand-in drops its own.
    mesh.set_full(set())
    mesh.run(mesh.now + 20.0)
    assert mesh.holders(oid) == set(home)
    (stand_in,) = ws - set(home)
    assert (stand_in, oid) in mesh.drops


def test_a_full_member_that_lost_its_copy_is_stood_in_for_never_pushed_to() -> None:
    mesh = FullMesh()
    oids = _oids_on("eu2", 6)
    for oid in oids:
        for n in names(replica_set(oid, VIEW, 3)):
            mesh.add(n, oid, ANY)
    mesh.run(6.0)
    mesh.set_full({"eu2"})
    lost = oids[0]
    mesh.m["eu2"].object_removed(lost, mesh.now)  # e.g. a corrupt copy, quarantined
    mesh.run(mesh.now + 20.0)
    # Three copies again, the third on the node that replaces eu2 in the write set; the
    # other objects (eu2 still holds them) are not copied anywhere.
    full_view = [Candidate(c.name, c.region, c.zone, full=c.name == "eu2") for c in VIEW]
    ws = set(names(write_set(lost, full_view, 3)))
    assert mesh.holders(lost) == ws and mesh.to("eu2") == []
    assert {t.oid for t in mesh.sent_transfers} == {lost}


def test_a_repair_queued_before_the_node_filled_is_not_sent() -> None:
    m = manager("eu1")
    rs = names(replica_set("obj", VIEW, 3))
    holder = rs[0]
    target = rs[1]
    m = manager(holder)
    m.object_added("obj", ANY, None, 0.0)
    m.on_timer(10.0)
    digests = {o.dst: decode_message(o.payload, 1 << 20) for o in m.drain()
               if isinstance(o, SendMessage)}
    d = digests[target]
    assert isinstance(d, DigestMsg)
    m.handle_message(target, encode_message(DigestReply(d.round, False)), 10.1)
    offer = next(decode_message(o.payload, 1 << 20) for o in m.drain()
                 if isinstance(o, SendMessage) and o.dst == target)
    assert isinstance(offer, Offer)
    # The target fills between asking and the transfer.
    m.set_view([Candidate(c.name, c.region, c.zone, full=c.name == target) for c in VIEW], 10.2)
    m.drain()
    m.handle_message(target, encode_message(OfferReply(offer.round, offer.page, ["obj"], [])),
                     10.3)
    assert not transfers(m.drain())
    assert m.stats.get("repairs_skipped.full") == 1


def test_a_full_node_is_never_a_put_target_nor_a_stand_in() -> None:
    full = {"eu2", "us1"}
    view = [Candidate(c.name, c.region, c.zone, full=c.name in full) for c in VIEW]
    m = manager("ap1", view)
    for i in range(30):
        m.begin_put(i + 1, f"p{i}", ObjectPolicy(2), 1, 0.0)
        for t in transfers(m.drain()):
            assert t.dst not in full
            m.transfer_done(i + 1, t.dst, t.oid, False, 0.1)  # every stand-in fails too
            for h in transfers(m.drain()):
                assert h.dst not in full
    eu_only = [Candidate(c.name, c.region, c.zone, full=c.region == "eu") for c in VIEW]
    m = manager("us2", eu_only)
    with pytest.raises(PlacementError) as e:
        m.begin_put(1, "x", EU, 1, 0.0)
    assert e.value.rule == "disk_full"


# --------------------------------------------------------------------------- idle cost


class _NoWalk(_Inventory):
    """An inventory that may be looked up but not walked."""

    def __init__(self, inv: _Inventory) -> None:
        super().__init__()
        for loc in inv.values():
            self.add(loc)

    def _walked(self, *_: object) -> None:
        raise AssertionError("the inventory was walked")

    __iter__ = keys = values = items = _walked  # type: ignore[assignment]


def test_an_idle_round_does_not_walk_the_inventory_and_still_hands_off() -> None:
    mesh = Mesh(cfg=ReplicationConfig(sync_interval_s=5.0, view_change_delay_s=0.2))
    oids = [f"idle{i}" for i in range(40)]
    for oid in oids:
        for n in names(replica_set(oid, VIEW, 3)):
            mesh.add(n, oid, ANY)
    mesh.run(12.0)
    stray = next(n for n in sorted(mesh.m) if n not in names(replica_set(oids[0], VIEW, 3)))
    for m in mesh.m.values():
        m._inv = _NoWalk(m._inv)  # type: ignore[assignment]
    rounds = {n: m.stats.get("sync_rounds", 0) for n, m in mesh.m.items()}
    mismatches = sum(m.stats.get("digest_mismatches", 0) for m in mesh.m.values())
    # A copy held outside its replica set (a hint) is offered and handed off all the same.
    mesh.add(stray, oids[0], ANY, hint_for="eu1")
    mesh.run(mesh.now + 12.0)
    assert all(m.stats.get("sync_rounds", 0) > rounds[n] for n, m in mesh.m.items())
    assert sum(m.stats.get("digest_mismatches", 0) for m in mesh.m.values()) == mismatches
    assert (stray, oids[0]) in mesh.drops and not mesh.m[stray].holds(oids[0])
    # Matches confirm every id of the pair set without touching it, read when asked.
    for oid in oids:
        rs = names(replica_set(oid, VIEW, 3))
        assert mesh.m[rs[0]].confirmed_holders(oid) == sorted(rs[1:])


def test_the_self_check_trips_on_a_corrupted_digest() -> None:
    mesh = Mesh()
    for oid in (f"sc{i}" for i in range(10)):
        for n in names(replica_set(oid, VIEW, 3)):
            mesh.add(n, oid, ANY)
    mesh.run(6.0)  # rounds ran, every self-check passed
    m = mesh.m["eu1"]
    peer = next(p for p, c in m._dg_count.items() if c)
    m._dg_acc[peer] ^= 1  # one flipped bit in one accumulator
    with pytest.raises(DigestDrift, match=f"pair digest with {peer}"):
        m.on_timer(m.next_deadline() or 0.0)
    m._dg_acc[peer] ^= 1
    # An object whose state changed behind the manager's back (not re-indexed) trips it too.
    oid = next(o for o in m.inventory() if peer in names(replica_set(o, VIEW, 3)))
    m._inv[oid].dropping = True
    with pytest.raises(DigestDrift):
        m.on_timer(m.next_deadline() or 0.0)


class _LateDrops(FullMesh):
    """Drops are carried out later (``apply_drops``), as a real store does them."""

    def __init__(self) -> None:
        super().__init__()
        self.late: list[tuple[str, str]] = []

    def route(self, src: str, out: object) -> None:
        if isinstance(out, DropLocal):
            self.late.append((src, out.oid))
        else:
            super().route(src, out)

    def apply_drops(self) -> None:
        late, self.late = self.late, []
        for src, oid in late:
            super().route(src, DropLocal(oid))


def test_incremental_digests_track_every_kind_of_change() -> None:
    """Random puts, removals, deletes, hints, full disks, departures and returns, drops
    carried out late: after every step each manager's kept digests equal a full
    recomputation, and the mesh converges as before (every self-check in the rounds
    passes)."""
    rng = random.Random(2026)
    mesh = _LateDrops()
    alive = set(mesh.m)
    oids = [f"r{i}" for i in range(30)]
    for step in range(120):
        mesh.now = round(mesh.now + 0.5, 6)
        op = rng.choice(["add", "add", "hint", "remove", "delete", "full", "leave", "run"])
        oid = rng.choice(oids)
        up = sorted(alive - mesh.down)
        node = rng.choice(up)
        if op == "add":
            mesh.m[node].object_added(oid, ANY, None, mesh.now, ts(step + 1, node))
        elif op == "hint":
            mesh.m[node].object_added(oid, ANY, rng.choice(up), mesh.now, ts(step + 1, node))
        elif op == "remove":
            mesh.m[node].object_removed(oid, mesh.now)
        elif op == "delete":
            mesh.m[node].delete(oid, ANY, ts(step + 1, node), mesh.now, float(step + 1))
        elif op == "full":
            mesh.set_full(set(rng.sample(sorted(alive), rng.randint(0, 2))))
        elif op == "leave":
            if len(mesh.down) < 2 and rng.random() < 0.5:
                mesh.down.add(node)
            elif mesh.down:
                mesh.down.discard(sorted(mesh.down)[0])
            mesh.view = [c for c in VIEW if c.name not in mesh.down]
            mesh.view = [Candidate(c.name, c.region, c.zone, full=c.name in mesh.full)
                         for c in mesh.view]
            mesh.set_view(mesh.view)
        mesh.flush()
        if op == "run":
            mesh.run(mesh.now + 4.0)
            mesh.apply_drops()
        for n in alive - mesh.down:
            mesh.m[n]._verify()
    mesh.down.clear()
    mesh.set_full(set())
    mesh.set_view(list(VIEW))
    for _ in range(6):
        mesh.run(mesh.now + 5.0)
        mesh.apply_drops()
    for n in mesh.m:
        mesh.m[n]._verify()
    for oid in oids:
        holders = mesh.holders(oid)
        if holders:
            assert holders == set(names(replica_set(oid, VIEW, 3))), oid


def test_placement_is_the_cached_replica_and_write_set_shared_between_entries() -> None:
    """``placement`` gives what replication keeps for a held copy: the replica set over the
    current view (as ``placement.replica_set`` computes it) and the write set; entries with
    equal sets hold one tuple, not one each."""
    view = [Candidate("eu1", "eu", "eu-a"), Candidate("eu2", "eu", "eu-b"),
            Candidate("us1", "us", "us-a"), Candidate("us2", "us", "us-b")]
    m = manager("eu1", view)
    oids = [f"obj-{i}" for i in range(60)]
    for oid in oids:
        m.object_added(oid, ObjectPolicy(3), None, 1.0)  # a policy object per copy
    seen: dict[tuple[str, ...], tuple[str, ...]] = {}
    for oid in oids:
        got = m.placement(oid, ANY)
        assert got is not None
        rs, ws = got
        assert list(rs) == names(replica_set(oid, view, 3))
        assert ws == rs  # no node is full
        assert seen.setdefault(rs, rs) is rs
    assert len(seen) < len(oids)  # 60 objects, at most 24 orders of 3 of 4 nodes
    assert m.placement("obj-unknown", ANY) is None
    assert m.placement(oids[0], EU) is None  # held under another policy


def _messages(m: ReplicaManager, kind: type[_M]) -> dict[str, list[_M]]:
    """What ``m`` sent of message type ``kind``, by destination."""
    got: dict[str, list[_M]] = {}
    for out in m.drain():
        if isinstance(out, SendMessage):
            msg = decode_message(out.payload, 1 << 20)
            if isinstance(msg, kind):
                got.setdefault(out.dst, []).append(msg)
    return got


def _offer_round(m: ReplicaManager, peers: list[str], now: float) -> dict[str, dict[str, Offer]]:
    """Start a round on ``m`` and have ``peers`` answer its digest with a mismatch: the
    offer pages each sends back for, by peer and then by the one id of the page."""
    m.on_timer(m.next_deadline() or 0.0)
    digests = _messages(m, DigestMsg)
    pages: dict[str, dict[str, Offer]] = {}
    for p in peers:
        m.handle_message(p, encode_message(DigestReply(digests[p][0].round, False)), now)
        pages[p] = {o.refs[0].oid: o for o in _messages(m, Offer)[p]}
    return pages


def _answer(m: ReplicaManager, peer: str, offer: Offer, now: float,
            not_mine: tuple[str, ...] = ()) -> None:
    m.handle_message(peer, encode_message(OfferReply(offer.round, offer.page, [], list(not_mine))), now)


def test_entries_sharing_confirmations_change_them_apart() -> None:
    """Entries confirmed alike share one confirmations dict (``_set_confirmed``): a change
    to one entry's (a new confirmation, or one withdrawn) makes it a new dict and leaves
    the other entries' as they were (a dict changed in place would change them all)."""
    cfg = ReplicationConfig(sync_interval_s=5.0, page_size=1, self_check=True)
    m = manager("us1", cfg=cfg)
    for o in ("o0", "o1", "o2"):
        m.object_added(o, ObjectPolicy(7), None, 0.0)  # 7 of 7 nodes: us1 pairs with all
    pages = _offer_round(m, ["ap1", "eu2"], 1.0)
    for p in ("ap1", "eu2"):
        for o in ("o0", "o1", "o2"):
            _answer(m, p, pages[p][o], 1.1)
    shared = m._inv["o0"].confirmed
    assert shared == {"ap1": 1.1, "eu2": 1.1}
    assert m._inv["o1"].confirmed is shared and m._inv["o2"].confirmed is shared
    # A later round: ap1 withdraws o0 (not_mine), eu2 confirms o1 again, later; o2 is
    # not answered at all.
    pages = _offer_round(m, ["ap1", "eu2"], 2.0)
    _answer(m, "ap1", pages["ap1"]["o0"], 2.1, not_mine=("o0",))
    _answer(m, "eu2", pages["eu2"]["o1"], 2.1)
    assert m.confirmed_holders("o0") == ["eu2"]
    assert m._inv["o0"].confirmed == {"eu2": 1.1}
    assert m._inv["o1"].confirmed == {"ap1": 1.1, "eu2": 2.1}
    assert m._inv["o2"].confirmed == {"ap1": 1.1, "eu2": 1.1}
    assert m._inv["o2"].confirmed is shared
    assert m.confirmed_holders("o2") == ["ap1", "eu2"]


def test_a_digest_match_covers_the_entries_unchanged_since_its_round_started() -> None:
    """An entry (re)indexed after a round started is not confirmed by that round's digest
    match; one unchanged since is (the manager's change epoch advances as a round starts:
    entries changed within one epoch share its int)."""
    m = manager("us1")
    for o in ("o0", "o1", "o2"):
        m.object_added(o, ObjectPolicy(7), None, 0.0)
    m.on_timer(m.next_deadline() or 0.0)
    digest = _messages(m, DigestMsg)["ap1"][0]
    for o in ("o1", "o2"):  # copies lost and made again after the round started: ap1's
        m.object_removed(o, 1.0)  # digest did not cover them
        m.object_added(o, ObjectPolicy(7), None, 1.0)
    m.drain()
    m.handle_message("ap1", encode_message(DigestReply(digest.round, True)), 1.1)
    assert m.confirmed_holders("o0") == ["ap1"]
    assert m.confirmed_holders("o1") == m.confirmed_holders("o2") == []
    assert m._inv["o1"].seq == m._inv["o2"].seq  # changed in one epoch: one int


def test_an_entrys_flags_are_independent_bits() -> None:
    """``under``, ``dropping``, ``moved`` and ``handed`` share one int: setting or clearing
    one leaves the others as they were."""
    from meshscale.core.replication import _Local

    names_ = ("under", "dropping", "moved", "handed")
    loc = _Local("x", ANY)
    for i, name in enumerate(names_):
        for on in (True, False, True):
            setattr(loc, name, on)
            assert getattr(loc, name) is on
            assert [getattr(loc, n) for n in names_] == [j <= i if j != i else on
                                                          for j in range(len(names_))]
    assert loc.flags == 15
    for name in names_:
        setattr(loc, name, False)
    assert loc.flags == 0


# --------------------------------------------------------------- tombstones follow a class


def test_a_tombstone_under_a_stale_rule_is_kept_under_the_class_rule() -> None:
    # The delete's coordinator has not heard that class pii narrowed to {eu}: it sends the
    # tombstone under the old rule {eu,us}. A receiver that has heard keeps it (it is in
    # the old set, which counts it) but under the narrowed rule, so that it is handed off
    # to the class's set, where the copies a migration moved are (swarm seed 1414881169).
    from meshscale.core.policy import make_policy

    wide = ObjectPolicy(3, Residency(frozenset({"eu", "us"}), "pii"))
    oid = "b3-" + "7" * 64
    coord = manager("us1")
    rs = set(names(replica_set(oid, VIEW, 3, wide.residency)))
    receiver = next(n for n in sorted(rs) if REGION[n] == "us" and n != "us1")
    coord.delete(oid, wide, ts(10.0, "us1"), 10.0, 10.0, req_id=1)
    msg = next(o for o in coord.drain()
               if isinstance(o, SendMessage) and o.dst == receiver)
    m = manager(receiver)
    m.class_policies = {"pii": make_policy("pii", ["eu"])}
    m.handle_message("us1", msg.payload, 10.1)
    stored = [o for o in m.drain() if isinstance(o, TombstoneStored)]
    assert stored and stored[0].policy == EU, stored
    # A receiver that knows no narrowing keeps the rule as it came.
    plain = manager(receiver)
    plain.handle_message("us1", msg.payload, 10.1)
    assert [o.policy for o in plain.drain() if isinstance(o, TombstoneStored)] == [wide]


def test_migrate_tombstones_rewrites_the_rule_of_a_class_tombstones() -> None:
    from meshscale.core.policy import make_policy

    wide = ObjectPolicy(3, Residency(frozenset({"eu", "us"}), "pii"))
    other = ObjectPolicy(3, Residency(frozenset({"us"}), "fin"))
    m = manager("us1")
    a, b = "b3-" + "1" * 64, "b3-" + "2" * 64
    m.delete(a, wide, ts(10.0, "us1"), 10.0, 10.0)
    m.delete(b, other, ts(10.0, "us1"), 10.0, 10.0)
    m.drain()
    assert m.migrate_tombstones(make_policy("pii", ["eu"])) == [a]
    assert [(o.oid, o.policy) for o in m.drain() if isinstance(o, TombstoneStored)] == [(a, EU)]
    # Already under the new rule (and another class's untouched): nothing more to do.
    assert m.migrate_tombstones(make_policy("pii", ["eu"])) == []
    assert m.tombstone(a) == ts(10.0, "us1") and m.tombstone(b) == ts(10.0, "us1")


def test_a_holder_keeps_a_tombstone_a_migration_moved_away_from_it() -> None:
    # Policy swarm seed 1144458676: a member of an object's set was down for its delete
    # and for the migration that moved the tombstones to another region; back, it heard
    # only a later policy that still allowed its copy's rule. The copy's set is the old
    # one: the old holders must still keep the tombstone, or the copy spreads again.
    from meshscale.core.policy import make_policy

    old = ObjectPolicy(2, Residency(frozenset({"eu"}), "pii"))
    oid = "b3-" + "5" * 64
    mesh = TombMesh()
    a, b = names(replica_set(oid, VIEW, 2, old.residency))
    for n in (a, b):
        mesh.m[n].object_added(oid, old, None, 0.0, ts(100))
    mesh.run(6.0)
    mesh.down.add(b)  # misses the delete and the migration
    mesh.m[a].delete(oid, old, ts(200, a), mesh.now, 200.0)
    mesh.flush()
    assert mesh.m[a].tombstone(oid) == ts(200, a)
    moved = make_policy("pii", ["us"], replicas=2)
    for n, m in mesh.m.items():
        if n != b:
            m.class_policies = {"pii": moved}
    assert mesh.m[a].migrate_tombstones(moved) == [oid]
    mesh.run(mesh.now + 12.0)
    assert {n for n, k in mesh.kept.items() if oid in k} >= {"us1", "us2"}
    # Handed off to the new set, and still kept here, no longer offered every round.
    assert mesh.m[a].tombstone(oid) == ts(200, a) and oid in mesh.kept[a]
    assert mesh.m[a].stats.get("tombstones_kept.moved", 0) == 1
    # The class widens again (eu and us); b comes back, having heard only that: its
    # copy's rule {eu} fits, so it keeps it, in the old set, which meets a's tombstone.
    wide = make_policy("pii", ["eu", "us"], replicas=2)
    for m in mesh.m.values():
        m.class_policies = {"pii": wide}
    mesh.down.discard(b)
    mesh.run(mesh.now + 12.0)
    assert mesh.holders(oid) == set()
    assert (b, oid) in mesh.drops


def test_a_moved_tombstone_is_still_kept_after_its_holder_restarts() -> None:
    # The same story as above, with a restart of the holder after the hand-off: its
    # driver stored the tombstone as a moved one, and it must come back as one, or it is
    # forgotten once handed off again and b's copy spreads when b returns.
    from meshscale.core.policy import make_policy

    old = ObjectPolicy(2, Residency(frozenset({"eu"}), "pii"))
    oid = "b3-" + "6" * 64
    mesh = TombMesh()
    a, b = names(replica_set(oid, VIEW, 2, old.residency))
    for n in (a, b):
        mesh.m[n].object_added(oid, old, None, 0.0, ts(100))
    mesh.run(6.0)
    mesh.down.add(b)
    mesh.m[a].delete(oid, old, ts(200, a), mesh.now, 200.0)
    mesh.flush()
    moved = make_policy("pii", ["us"], replicas=2)
    for n, m in mesh.m.items():
        if n != b:
            m.class_policies = {"pii": moved}
    assert mesh.m[a].migrate_tombstones(moved) == [oid]
    mesh.run(mesh.now + 12.0)
    assert mesh.disk[a][oid].moved
    # a restarts: a new manager, fed what its driver stored.
    mesh.m[a] = manager(a, VIEW, CFG)
    mesh.m[a].class_policies = {"pii": moved}
    for rec in mesh.disk[a].values():
        mesh.m[a].tombstone_loaded(rec.oid, rec.policy, rec.ts, moved=rec.moved)
    mesh.run(mesh.now + 12.0)
    assert mesh.m[a].tombstone(oid) == ts(200, a) and oid in mesh.kept[a]
    wide = make_policy("pii", ["eu", "us"], replicas=2)
    for m in mesh.m.values():
        m.class_policies = {"pii": wide}
    mesh.down.discard(b)
    mesh.run(mesh.now + 12.0)
    assert mesh.holders(oid) == set()
    assert (b, oid) in mesh.drops
