"""Actor decisions (``core.actors``): rendezvous ownership, checkpoint records, the load
rule, and fencing: a seeded model of owners that claim, serve and checkpoint one key over
three KV replicas through ``core.kv``'s conditional puts, with lost messages, stale owners
and rival claims, checked against an oracle: an owner's checkpoint succeeds only right after its
own last successful put (never two owners checkpointing at once), and every acknowledged call is in the state a loader picks."""

from __future__ import annotations

import random

import pytest

from meshscale.core.actors import (
    ActorCheckpoint,
    ActorConfig,
    actor_kv_key,
    actor_owner,
    after_call,
    claim,
    decode_checkpoint,
    encode_checkpoint,
    pick_checkpoint,
)
from meshscale.core.hlc import HLCTimestamp
from meshscale.core.kv import ABSENT, Consistency, KVCoordinator, KVRecord, cas_allows
from meshscale.core.placement import Candidate
from meshscale.core.scheduling import NodeState, Resources
from meshscale.core.services import ServiceSpec, Unplaceable


def node(name: str, region: str = "eu", labels: dict[str, str] | None = None) -> NodeState:
    return NodeState(Candidate(name, region, "z", labels or {}), Resources(4, 8000, 0))


def test_owner_is_the_same_in_any_order_and_moves_only_when_its_node_leaves() -> None:
    spec = ServiceSpec("counter")
    view = [node(f"n{i}") for i in range(6)]
    owners = {k: actor_owner(spec, k, view) for k in (f"k{i}" for i in range(200))}
    assert owners == {k: actor_owner(spec, k, list(reversed(view))) for k in owners}
    assert len(set(owners.values())) == 6  # keys spread over the nodes
    gone = "n2"
    after = {k: actor_owner(spec, k, [n for n in view if n.name != gone]) for k in owners}
    for k in owners:
        assert (after[k] == owners[k]) == (owners[k] != gone)
    assert after == {k: actor_owner(spec, k, view, exclude=[gone]) for k in owners}


def test_owner_respects_the_service_rules() -> None:
    view = [node("a", "eu"), node("b", "us"), node("c", "us")]
    spec = ServiceSpec("c", placement=frozenset({"us"}))
    assert {actor_owner(spec, f"k{i}", view) for i in range(50)} == {"b", "c"}
    refused = actor_owner(ServiceSpec("c", placement=frozenset({"ap"})), "k", view)
    assert isinstance(refused, Unplaceable) and refused.rule == "mode"
    assert "actor 'c'" in refused.message


def test_checkpoint_records_and_bounds() -> None:
    ck = ActorCheckpoint(3, 2, "n1", b"state")
    assert decode_checkpoint(encode_checkpoint(ck)) == ck
    assert decode_checkpoint(b"not a checkpoint") is None
    assert claim(None, "n2") == ActorCheckpoint(0, 1, "n2", None)
    assert claim(ck, "n2") == ActorCheckpoint(3, 3, "n2", b"state")
    cfg = ActorConfig(max_state_bytes=10)
    assert after_call(ck, "n1", b"s2", cfg) == ActorCheckpoint(4, 2, "n1", b"s2")
    with pytest.raises(ValueError, match="max_state_bytes"):
        after_call(ck, "n1", b"x" * 11, cfg)
    with pytest.raises(ValueError, match="holds"):
        after_call(ck, "n9", b"s", cfg)
    with pytest.raises(ValueError, match="MAX_ACTOR_KEY_CHARS"):
        actor_kv_key("svc", "k" * 300)
    assert actor_kv_key("svc", "door-7") == "actor/svc/door-7"


def test_pick_takes_the_highest_by_sequence_then_epoch_and_names_every_version() -> None:
    a = ActorCheckpoint(5, 1, "x", b"a")
    residue_claim = ActorCheckpoint(4, 9, "y", b"old")  # a rival's claim from an old base
    got = pick_checkpoint([("t1", encode_checkpoint(a)),
                           ("t2", encode_checkpoint(residue_claim)), (None, None)])
    assert got.checkpoint == a
    assert set(got.expected) == {"t1", "t2", ABSENT}
    assert pick_checkpoint([]).checkpoint is None


# ----------------------------------------------------------------- the fencing model

REPLICAS = ("r0", "r1", "r2")


class Model:
    """Three KV replicas and owners that go through ``core.kv`` and ``core.actors`` the
    way the runtime does; each message is lost with probability ``loss``."""

    def __init__(self, rng: random.Random, loss: float) -> None:
        self.rng = rng
        self.loss = loss
        self.store: dict[str, KVRecord | None] = dict.fromkeys(REPLICAS)
        self.clock = 0
        self.acked = 0
        """Calls acknowledged (each adds one to the counter in the state)."""
        self.last = ABSENT
        """The version the last successful put made (the oracle: a checkpoint after a
        call succeeds only right after its owner's own last successful put, so two
        owners never both checkpoint: the one that did not claim last is fenced)."""

    def stamp(self, node: str) -> HLCTimestamp:
        self.clock += 1 + self.rng.randrange(3)
        return HLCTimestamp(self.clock, 0, node)

    def read(self) -> list[tuple[str | None, bytes | None]] | None:
        got = []
        for r in REPLICAS:
            if self.rng.random() < self.loss:
                continue
            rec = self.store[r]
            got.append((None, None) if rec is None else (rec.ts.encode(), rec.value))
        return got if len(got) >= 2 else None

    def cas(self, node: str, value: bytes, expected: tuple[str, ...],
            checkpoint: bool = False) -> str | None:
        """A conditional put; the new version, or None (refused or failed)."""
        rec = KVRecord("k", value, self.stamp(node))
        coord = KVCoordinator.for_cas(rec, REPLICAS, Consistency.QUORUM, expected)
        order = list(REPLICAS)
        self.rng.shuffle(order)
        for r in order:
            if self.rng.random() < self.loss:
                coord.on_failure(r, "lost")
            elif cas_allows(self.store[r], expected):
                self.store[r] = rec
                coord.on_reply(r, None)
            else:
                cur = self.store[r]
                coord.on_conflict(r, None if cur is None else cur.ts.encode())
        if coord.outcome is None or not coord.outcome.ok:
            return None
        if checkpoint:
            assert expected == (self.last,), f"{node} checkpointed over {self.last}"
        self.last = rec.ts.encode()
        return self.last


class Owner:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ck: ActorCheckpoint | None = None
        self.version = ""

    def call(self, m: Model, cfg: ActorConfig) -> bool:
        """One increment; True when acknowledged."""
        if self.ck is None:
            read = m.read()
            if read is None:
                return False
            loaded = pick_checkpoint(read)
            mine = claim(loaded.checkpoint, self.name)
            v = m.cas(self.name, encode_checkpoint(mine), loaded.expected)
            if v is None:
                return False
            self.ck, self.version = mine, v
        count = 0 if self.ck.state is None else int(self.ck.state)
        nxt = after_call(self.ck, self.name, str(count + 1).encode(), cfg)
        v = m.cas(self.name, encode_checkpoint(nxt), (self.version,), checkpoint=True)
        if v is None:
            self.ck = None  # fenced (or unsure): drop the key, reload on the next call
            return False
        self.ck, self.version = nxt, v
        return True


def test_fenced_owners_never_lose_an_acknowledged_call() -> None:
    base = random.randrange(1 << 30)
    print(f"base seed {base}")
    cfg = ActorConfig()
    total_acked = 0
    for s in range(300):
        rng = random.Random(base + s)
        m = Model(rng, loss=rng.choice([0.0, 0.1, 0.3]))
        owners = [Owner(f"n{i}") for i in range(rng.randrange(2, 5))]
        for _ in range(40):
            o = rng.choice(owners)  # views disagree: any owner may take the next call
            if o.call(m, cfg):
                m.acked += 1
            read = [(None if r is None else r.ts.encode(), None if r is None else r.value)
                    for r in m.store.values()]
            # Any majority a loader may reach picks a state with every acknowledged call.
            for skip in REPLICAS:
                part = [x for r, x in zip(REPLICAS, read, strict=True) if r != skip]
                ck = pick_checkpoint(part).checkpoint
                have = 0 if ck is None or ck.state is None else int(ck.state)
                assert have >= m.acked, (base + s, have, m.acked)
        total_acked += m.acked
    assert total_acked > 1000  # the model makes progress


def test_a_lost_owner_retries_only_an_idempotent_method_with_retries_left() -> None:
    from meshscale.core.actors import actor_lost
    from meshscale.core.services import ServiceConfig

    spec = ServiceSpec("counter", idempotent=frozenset({"get"}))
    cfg = ServiceConfig(max_retries=1)
    assert actor_lost(spec, "k", "get", "n1", 0, cfg) is None  # again, at the next owner
    spent = actor_lost(spec, "k", "get", "n1", 1, cfg)
    assert spent is not None and spent.code == "retries-exhausted"
    lost = actor_lost(spec, "k", "incr", "n1", 0, cfg)
    assert lost is not None and lost.code == "replica-lost"
    assert "n1" in lost.message and "may or may not count" in lost.message
