"""The stream plane's caches of the membership (issue 23), driven by the real
``core.membership.Membership`` state machine rather than fake members: ``_alive``'s live
view must see every change membership makes to a member (it changes ``state`` and
``meta`` of the same ``Member`` object in place, and replaces ``meta`` on an update), and
``_backup``'s memo must follow the view, the topic's rule and the failed backups.

The plane runs alone with a fake agent; no clock is read by the tests."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import msgspec

from meshscale.core.membership import (
    Alive,
    Dead,
    Membership,
    NodeMeta,
    Suspect,
    encode_envelope,
)
from meshscale.core.placement import Residency
from meshscale.runtime.streams import StreamConfig, StreamPlane


def gossip(m: Membership, msg: Any, now: float) -> None:
    m.handle_datagram("x", encode_envelope([msgspec.msgpack.encode(msg)]), now)


def node(region: str, zone: str = "z") -> NodeMeta:
    return NodeMeta(region=region, zone=zone)


def plane_on(m: Membership) -> StreamPlane:
    agent: Any = SimpleNamespace(name=m.name, meta=m.members[m.name].meta, m=m)
    return StreamPlane(agent, StreamConfig())


def view(p: StreamPlane) -> list[tuple[str, str]]:
    return sorted((c.name, c.region) for c in p._alive())


def test_the_live_view_sees_every_change_real_membership_makes() -> None:
    m = Membership("n0", "n0:1", node("r1"), rng=random.Random(1), now=0.0)
    gossip(m, Alive("n1", 0, "n1:1", node("r1")), 0.1)
    gossip(m, Alive("n2", 0, "n2:1", node("r2")), 0.1)
    p = plane_on(m)
    first = p._alive()
    assert view(p) == [("n0", "r1"), ("n1", "r1"), ("n2", "r2")]
    assert p._alive() is first  # nothing changed: the same view
    gossip(m, Suspect("n1", 0, "x"), 0.2)  # in place: still live
    assert view(p) == [("n0", "r1"), ("n1", "r1"), ("n2", "r2")]
    gossip(m, Dead("n1", 0, "x"), 0.3)  # in place: gone from the view
    assert m.members["n1"].state.name == "DEAD"
    assert view(p) == [("n0", "r1"), ("n2", "r2")]
    # Restarted (a higher incarnation), now in another region: back, with its new meta.
    gossip(m, Alive("n1", 1, "n1:1", node("r3")), 0.4)
    assert view(p) == [("n0", "r1"), ("n1", "r3"), ("n2", "r2")]
    # A live member's meta update (same object, meta replaced): seen.
    gossip(m, Alive("n2", 1, "n2:1", node("r4")), 0.5)
    assert view(p) == [("n0", "r1"), ("n1", "r3"), ("n2", "r4")]
    # This node's own meta update.
    m.update_meta(node("r5"), 0.6)
    assert view(p) == [("n0", "r5"), ("n1", "r3"), ("n2", "r4")]
    # A node that left gracefully.
    gossip(m, Dead("n2", 1, "n2"), 0.7)
    assert view(p) == [("n0", "r5"), ("n1", "r3")]
    again = p._alive()
    assert p._alive() is again


def test_the_backup_memo_follows_the_view_the_rule_and_failed_backups() -> None:
    """Shard (t, n0~0): its backup is the nearest other live node the topic's rule
    allows (``core.streams.backup_for``); ``_backup`` keeps the answer per view, source
    and rule, and must give a new one when any of them changes."""
    m = Membership("n0", "n0:1", node("r1"), rng=random.Random(1), now=0.0)
    gossip(m, Alive("n1", 0, "n1:1", node("r1")), 0.1)  # same region: the backup
    gossip(m, Alive("n2", 0, "n2:1", node("r2")), 0.1)
    p = plane_on(m)
    assert p._backup("t", "n0~0") == "n1"
    assert p._backup("t", "n0~0") == "n1"  # memoized
    # The topic's rule narrows to r2: the memo (made under no rule) must not answer.
    p.topic_residency["t"] = Residency(frozenset({"r2"}))
    assert p._backup("t", "n0~0") == "n2"
    del p.topic_residency["t"]
    assert p._backup("t", "n0~0") == "n1"
    # The backup fails a copy: passed over while bad, then taken again.
    p._bad_backup["n1"] = 1e18  # bad "forever" on the monotonic clock
    assert p._backup("t", "n0~0") == "n2"
    del p._bad_backup["n1"]
    assert p._backup("t", "n0~0") == "n1"
    # The backup dies: the next live node in line.
    gossip(m, Dead("n1", 0, "x"), 0.3)
    assert p._backup("t", "n0~0") == "n2"
    # It comes back (restarted, a new incarnation) in region r1: the backup again.
    gossip(m, Alive("n1", 1, "n1:1", node("r1")), 0.4)
    assert p._backup("t", "n0~0") == "n1"
    # The source's own region changes (its meta): the nearest node changes with it.
    m.update_meta(node("r2"), 0.5)
    assert p._backup("t", "n0~0") == "n2"
