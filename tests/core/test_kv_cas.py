"""Conditional KV puts (compare-and-swap) decided in ``core.kv``: the replica rule, the
coordinator's outcome, the strict-quorum refusal, and mutual exclusion of two concurrent
puts over every arrival order and loss pattern."""

from __future__ import annotations

import itertools
import random

import pytest

from meshscale.core.hlc import HLCTimestamp
from meshscale.core.kv import (
    ABSENT,
    Consistency,
    KVCoordinator,
    KVPlacement,
    KVRecord,
    cas_allows,
    cas_refusal,
    strict_replicas,
)


def ts(wall: int, node: str = "a") -> HLCTimestamp:
    return HLCTimestamp(wall, 0, node)


def rec(wall: int, node: str = "a", value: bytes | None = b"v") -> KVRecord:
    return KVRecord("k", value, ts(wall, node))


def test_replica_rule() -> None:
    assert cas_allows(None, [ABSENT])
    assert not cas_allows(None, [ts(1).encode()])
    assert cas_allows(rec(1, value=None), [ABSENT])  # a tombstone is no live value
    assert cas_allows(rec(1, value=None), [ts(1).encode()])
    assert cas_allows(rec(5), [ts(5).encode(), ts(3).encode()])
    assert not cas_allows(rec(5), [ABSENT, ts(4).encode()])
    assert not cas_allows(rec(5, "b"), [ts(5, "a").encode()])


def test_coordinator_succeeds_on_quorum_and_fails_naming_conflict() -> None:
    reps = ("a", "b", "c")
    c = KVCoordinator.for_cas(rec(9), reps, Consistency.QUORUM, [ts(5).encode()])
    c.on_conflict("a", ts(7, "z").encode())
    assert c.outcome is None
    c.on_reply("b", None)
    c.on_reply("c", None)
    assert c.outcome is not None and c.outcome.ok and not c.outcome.conflict
    c = KVCoordinator.for_cas(rec(9), reps, Consistency.QUORUM, [ts(5).encode()])
    c.on_conflict("a", ts(7, "z").encode())
    c.on_failure("b", "timeout")
    assert c.outcome is not None and not c.outcome.ok and c.outcome.conflict
    assert "kv_conflict" in c.outcome.reason and ts(7, "z").encode() in c.outcome.reason
    c = KVCoordinator.for_cas(rec(9), reps, Consistency.QUORUM, [ts(5).encode()])
    c.on_failure("a")
    c.on_failure("b")
    assert c.outcome is not None and not c.outcome.ok and not c.outcome.conflict


def test_conditional_put_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="QUORUM or ALL"):
        KVCoordinator.for_cas(rec(9), ("a",), Consistency.ONE, [ABSENT])
    with pytest.raises(ValueError, match="not above"):
        KVCoordinator.for_cas(rec(5), ("a",), Consistency.QUORUM, [ts(5).encode()])
    with pytest.raises(ValueError, match="versions"):
        KVCoordinator.for_cas(rec(5), ("a",), Consistency.QUORUM, [])
    plain = KVCoordinator.for_put(rec(5), ("a", "b", "c"), Consistency.QUORUM)
    plain.on_conflict("a", None)  # not conditional: ignored
    assert "a" not in plain.failures


def test_strict_quorum_is_the_intended_set() -> None:
    assert cas_refusal(Consistency.QUORUM) is None
    assert "ONE" in (cas_refusal(Consistency.ONE) or "")
    ok = KVPlacement(("a", "b", "c"), ())
    assert strict_replicas(ok) == (("a", "b", "c"), ())
    # c is down: the write set has a stand-in d; the strict set is still a, b, c.
    sloppy = KVPlacement(("a", "b", "d"), (), ("a", "b", "c"))
    assert strict_replicas(sloppy) == (("a", "b", "c"), ("c",))
    full = KVPlacement(("a", "b", "d"), ("c",), ("a", "b", "c"))  # as kv_placement makes it
    assert strict_replicas(full) == (("a", "b", "c"), ("c",))
    # One of three down: QUORUM still reachable; two down: not.
    coord = KVCoordinator.for_cas(rec(9), ("a", "b", "c"), Consistency.QUORUM,
                                  [ts(5).encode()])
    coord.on_failure("c", "down")
    assert coord.outcome is None
    coord.on_failure("b", "down")
    assert coord.outcome is not None and not coord.outcome.ok


def _race(seed: int, n: int, level: Consistency) -> list[bool]:
    """Two conditional puts naming the same version race over ``n`` replicas that hold it;
    messages arrive in a random interleaving and some are lost. Returns who succeeded."""
    rng = random.Random(seed)
    names = [f"r{i}" for i in range(n)]
    held: dict[str, KVRecord | None] = dict.fromkeys(names, rec(1))
    writes = [rec(10 + rng.randrange(5), "x"), rec(10 + rng.randrange(5), "y")]
    coords = [KVCoordinator.for_cas(w, names, level, [ts(1).encode()]) for w in writes]
    deliveries = [(i, r) for i in range(2) for r in names]
    rng.shuffle(deliveries)
    for i, r in deliveries:
        if rng.random() < 0.2:
            coords[i].on_failure(r, "lost")
            continue
        cur = held[r]
        if cas_allows(cur, coords[i].expected or ()):
            held[r] = writes[i]
            coords[i].on_reply(r, None)
        else:
            coords[i].on_conflict(r, None if cur is None else cur.ts.encode())
    return [c.outcome is not None and c.outcome.ok for c in coords]


def test_two_concurrent_conditional_puts_never_both_win() -> None:
    base = random.randrange(1 << 30)
    print(f"base seed {base}")
    wins = 0
    for i, (n, level) in enumerate(itertools.product(
            (1, 2, 3, 4, 5), (Consistency.QUORUM, Consistency.ALL))):
        for s in range(300):
            won = _race(base + 1000 * i + s, n, level)
            assert sum(won) <= 1, (base, n, level, s)
            wins += sum(won)
    assert wins > 0  # the race is not always lost by both


def test_residues_are_the_versions_refusers_hold() -> None:
    c = KVCoordinator.for_cas(rec(9), ("a", "b", "c", "d", "e"), Consistency.QUORUM,
                              [ts(5).encode()])
    c.on_conflict("a", ts(12, "z").encode())  # a loser's residue, newer than the write
    c.on_conflict("b", ts(3, "z").encode())   # a stale replica: the write wins anyway
    c.on_reply("c", None)
    c.on_reply("d", None)
    c.on_reply("e", None)
    assert c.outcome is not None and c.outcome.ok
    # Both: the newer one would win a last-writer-wins read; the older one, repaired to
    # the version this write replaced, would match a later round's loser.
    assert c.residues() == (ts(3, "z").encode(), ts(12, "z").encode())
    again = KVCoordinator.for_cas(rec(13), c.replicas, Consistency.QUORUM,
                                  [ts(9).encode(), *c.residues()])
    assert again.expected == {ts(9).encode(), ts(3, "z").encode(), ts(12, "z").encode()}
    # A replica with no record at all is named as ABSENT.
    d = KVCoordinator.for_cas(rec(9), ("a", "b", "c"), Consistency.QUORUM, [ts(5).encode()])
    d.on_conflict("a", None)
    d.on_reply("b", None)
    d.on_reply("c", None)
    assert d.outcome is not None and d.outcome.ok and d.residues() == (ABSENT,)
