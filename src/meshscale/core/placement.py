"""Replica placement: which live nodes hold an object, computed by any node from its view.

Rendezvous hashing after Thaler and Ravishankar, "Using Name-Based Mappings to Increase Hit
Rates", IEEE/ACM Transactions on Networking, 1998 (highest random weight, HRW): every node
scores every (object, node) pair with the same hash and the object lives on the
highest-scoring nodes. No ring, no tokens and no lookup service, so any node derives the
same replica set from the same membership view, and a node that joins or leaves moves only
the objects whose set it enters or leaves. Spreading the replicas over failure domains
follows Cassandra's ``NetworkTopologyStrategy`` (replicas spread over data centres, and
over racks within one), with regions in the role of data centres and zones in the role of
racks. Departures from both:

- Residency first. Nodes in regions the object's residency rule does not allow are never
  candidates; when no live node is allowed the call refuses with ``PlacementError`` naming
  the rule, and never falls back to a node elsewhere.
- No per-region replica counts to configure, unlike Cassandra. Replicas are picked one at
  a time, each the node whose region, then whose zone, holds the fewest replicas chosen so
  far, HRW rank breaking ties (*least-loaded failure domain first*). With at least R
  allowed regions every replica is in its own region; with fewer, the regions are filled
  as evenly as their nodes allow (2 regions and R = 4 give 2 + 2, not 3 + 1, so losing
  either region leaves half the copies) and within a region the zones are used evenly.
  Regions come before zones because a region is the larger failure domain (power, network
  and jurisdiction fail together). When a residency rule confines data to one region every
  candidate has the same region count, the first key never decides, and the rule reduces
  to spreading over that region's zones, which is exactly what such data needs, so there is
  no special case. The cost of region-first is write latency across regions; a policy that
  wants replicas close together says so with a narrower residency rule, and reads go to the
  nearest replica rather than to the primary.
- Fewer allowed nodes than R is not an error here: all of them are returned and the caller
  decides with ``check_quorum`` whether that meets its write quorum W (Dynamo's sloppy
  quorum and hinted handoff are the replication layer's business, not placement's).

Minimal disruption. The first replica, the primary, is always the top HRW node, so primaries
are exactly as balanced and as stable as plain rendezvous hashing. For the whole set two
properties hold, and the tests check both:

1. Removing (or adding) a node that is not in an object's set leaves that set, and its
   order, unchanged. Proof: each pick is the minimum, over the nodes not yet picked, of a
   key that depends only on the node and the replicas picked before it. A node that is
   never the minimum can be taken away without changing any minimum, so by induction every
   pick is the same. Adding a node is the same statement read backwards.
2. Removing a node that is in the set keeps every other member: the set loses that node
   and gains at most one (none when no allowed node is left to take its place), so
   re-replication copies one replica's worth of data. Sketch (the property test checks
   it; this is not a line-by-line proof): within a region the key orders nodes by
   (replicas already in the zone, HRW rank), a round robin over the region's zones that
   does not depend on other regions, and the picks take a prefix of each region's sequence,
   filling regions evenly. Removing a node from region s deletes it from s's sequence and
   moves each later node of its zone up one round but never ahead of the node it follows,
   so s's sequence only gets worse: s never gains a pick at another region's expense, other
   regions keep their prefixes, and s's shorter prefix still holds s's other members.
   The order of the survivors may change (a new primary when the primary left).

Full nodes (etcd's space quota, applied to placement). A node refuses a write that would
leave less than its reserve free (``admits_write``; deletes still work) and says it is full
in its gossiped metadata (``FULL_TAG``, set and cleared with hysteresis by ``disk_full``: full below the
reserve, not full again only at the reserve plus ``margin_bytes``, so a node at the edge
does not flap; and full at once when it refuses a write for want of room, so a node that
says it has room takes what it is sent). Two sets follow for every object:

- The *rule set*, ``replica_set`` over every live node, full ones included: where the
  object's copies belong. Reads, repair, hand-off and drops use it unchanged, so a copy
  on a full node is never misplaced: it is kept, read and counted, and nothing is moved
  off a node because it filled (moving it would fill the others in turn).
- The *write set*, ``write_set``: ``replica_set`` over the nodes with room. New copies
  (a put's targets and stand-ins, a KV write) go only there. By the two properties above
  it is the rule set with each full member replaced by the next node in spread order
  (removing a node not in the set changes nothing; removing a member swaps in at most
  one), so an object whose rule set has no full member has write set == rule set.

What a full member of the rule set does not hold (a put made while it was full, a copy
it lost) is made instead on the node that replaced it in the write set, a *stand-in*,
and only once the full node said it lacks the copy and has no room (replication's
``OfferReply.no_room``); a copy the full node holds counts, so a node filling up never
causes a copy of its data elsewhere. The stand-in's copy is outside the rule set and
behaves like a hinted one: kept while a member of the rule set lacks it, handed to the
full node once that node has room again, then dropped. When no node with room is left
the object waits, under-replicated, until one has room; nothing is lost meanwhile.

Identical inputs in any order give the identical list: candidates are deduplicated by name
and ranked by score, then by name, before anything else looks at them. Scores come from
BLAKE2b, never Python's ``hash()``, which is salted per process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "FULL_TAG",
    "MAX_REPLICAS",
    "Candidate",
    "ObjectPolicy",
    "PlacementError",
    "Placer",
    "Residency",
    "admits_write",
    "check_quorum",
    "disk_full",
    "hrw_score",
    "is_full",
    "replica_set",
    "write_set",
]

MAX_REPLICAS = 16
"""Largest replica count a policy may ask for; placement is O(R * N) and R is small."""

FULL_TAG = "disk_full"
"""The gossiped tag (``NodeMeta.tags``) a node sets to ``"1"`` while its disk is full."""


def is_full(tags: Mapping[str, str]) -> bool:
    """Does a node's gossiped metadata say its disk is full?"""
    return tags.get(FULL_TAG) == "1"


def admits_write(free_bytes: int, need_bytes: int, reserve_bytes: int) -> bool:
    """Does a store with ``free_bytes`` free take a write of ``need_bytes``? Only if the
    write leaves its reserve free (deletes need no room and are always taken)."""
    return free_bytes - need_bytes >= reserve_bytes


def disk_full(
    free_bytes: int, reserve_bytes: int, margin_bytes: int, was_full: bool,
    refused_bytes: int = 0,
) -> bool:
    """Whether a node is full now, with hysteresis: a node that was not full becomes full
    once its free space is below its reserve; a full one is not full again until its free
    space is at least the reserve plus ``margin_bytes``. Every flip spreads by gossip and
    re-plans new writes, so a node whose free space hovers at the reserve must not flip
    on every write and delete.

    ``refused_bytes`` is the largest write the store refused for want of room since the
    last check (0: none). A store admits a write only if it leaves the reserve free
    (``admits_write``), so free space above the reserve by less than a write's size
    refuses that write: such a node is full too, whatever its free space alone says. Left
    "not full" it stays in write sets, answers offers of copies it lacks with ``missing``
    rather than ``no_room`` (so no stand-in is chosen) and refuses every transfer, and
    repair retries it for ever (swarm seed 448821714: a node restarted 4 bytes above its
    reserve). Once full, the hysteresis holds it until reserve + margin, so a margin at
    least the largest write a node takes at once means no flapping; a smaller one costs one
    refused write per flip, never a loop."""
    if margin_bytes < 0 or reserve_bytes < 0 or refused_bytes < 0:
        raise ValueError("the reserve, the margin and a refused write are sizes, never negative")
    if refused_bytes and not admits_write(free_bytes, refused_bytes, reserve_bytes):
        return True
    if was_full:
        return free_bytes < reserve_bytes + margin_bytes
    return free_bytes < reserve_bytes


@dataclass(frozen=True)
class Candidate:
    """A live node as the membership view sees it."""

    name: str
    region: str
    zone: str
    labels: Mapping[str, str] = field(default_factory=dict)
    full: bool = False
    """Its disk is full (``FULL_TAG``): in rule sets still, never in a write set."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a candidate node needs a non-empty name")
        if "\0" in self.name:
            # The score hashes object_id + NUL + name; a NUL in a name could make two
            # different pairs hash the same bytes.
            raise ValueError(f"node name {self.name!r} contains a NUL character")
        # Frozen all the way down: a view entry must not change under a placement.
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))


@dataclass(frozen=True)
class Residency:
    """Where a data object or task may live: the allowed regions, and its data class."""

    regions: frozenset[str] | None = None
    """Allowed regions; ``None`` means anywhere. An empty set allows nowhere."""
    data_class: str | None = None
    """e.g. ``"pii"``; informational, carried into error messages."""

    def __post_init__(self) -> None:
        if isinstance(self.regions, str):
            raise TypeError("Residency.regions takes a set of region names, not one string")
        if self.regions is not None and not isinstance(self.regions, frozenset):
            object.__setattr__(self, "regions", frozenset(self.regions))

    def allows(self, region: str) -> bool:
        return self.regions is None or region in self.regions

    def __repr__(self) -> str:
        # Sorted, so a simulator's trace does not depend on the string hash seed.
        regions = "None" if self.regions is None else (
            "frozenset({" + ", ".join(repr(r) for r in sorted(self.regions)) + "})")
        return f"Residency(regions={regions}, data_class={self.data_class!r})"

    def describe(self) -> str:
        where = "any" if self.regions is None else _braces(self.regions, sep=",")
        cls = f" (class {self.data_class})" if self.data_class else ""
        return f"residency regions={where}{cls}"


def may_hold(region: str, residency: Residency | None) -> bool:
    """May a node in ``region`` hold a copy (even a spare, even for a moment) of an object
    under ``residency``? Every node that would write one asks: the coordinator before it
    keeps a fallback copy, a replica receiver before it accepts one."""
    return residency is None or residency.allows(region)


class PlacementError(ValueError):
    """A placement request that cannot be met; ``rule`` names the rule that refused it."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def hrw_score(object_id: str, node: str) -> int:
    """The rendezvous weight of ``node`` for ``object_id``: a 64-bit unsigned integer.

    BLAKE2b with an 8-byte digest over the UTF-8 of ``object_id + "\\0" + node``, read
    big-endian. Stable across processes, machines and Python versions, because every node
    of the mesh must compute the same number.
    """
    data = f"{object_id}\0{node}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def replica_set(
    object_id: str,
    candidates: Iterable[Candidate],
    replicas: int,
    residency: Residency | None = None,
) -> list[Candidate]:
    """The nodes that hold ``object_id``, in priority order (the first is the primary).

    Returns ``min(replicas, allowed nodes)`` candidates; fewer than ``replicas`` is not an
    error here, see ``check_quorum``. Raises ``ValueError`` if ``replicas`` is outside
    1..``MAX_REPLICAS`` or two candidates share a name but differ, and ``PlacementError``
    when there is no live node at all (rule ``"replicas"``) or none that ``residency``
    allows (rule ``"residency"``).
    """
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be between 1 and {MAX_REPLICAS}, got {replicas}")
    live = _dedupe(candidates)
    if not live:
        raise PlacementError(
            "replicas", f"cannot place {object_id!r}: no live node in the membership view"
        )
    rule = residency if residency is not None else Residency()
    allowed = [c for c in live if rule.allows(c.region)]
    if not allowed:
        assert rule.regions is not None  # "anywhere" allows every live node
        raise PlacementError(
            "residency",
            f"cannot place {object_id!r}: no live node in regions {_braces(rule.regions)} "
            f"allowed by {rule.describe()}; live nodes are in "
            f"{_braces({c.region for c in live})}",
        )
    ranked = sorted(allowed, key=lambda c: (-hrw_score(object_id, c.name), c.name))
    chosen = _spread(ranked, replicas)
    assert len(chosen) == min(replicas, len(allowed))
    assert len({c.name for c in chosen}) == len(chosen)
    assert all(rule.allows(c.region) for c in chosen), "residency rule broken"
    return chosen


def write_set(
    object_id: str,
    candidates: Iterable[Candidate],
    replicas: int,
    residency: Residency | None = None,
) -> list[Candidate]:
    """Where new copies of ``object_id`` go: ``replica_set`` over the candidates that are
    not full, in priority order. Raises as ``replica_set`` does, and ``PlacementError``
    with rule ``"disk_full"`` when nodes are allowed but every one of them is full."""
    live = _dedupe(candidates)
    room = [c for c in live if not c.full]
    if len(room) == len(live):
        return replica_set(object_id, live, replicas, residency)
    rule = residency if residency is not None else Residency()
    if not any(rule.allows(c.region) for c in room):
        # No room anywhere allowed: the residency and "no live node" refusals come first,
        # as replica_set words them; then it is the disks.
        replica_set(object_id, live, replicas, residency)
        full = sorted(c.name for c in live if rule.allows(c.region))
        raise PlacementError(
            "disk_full",
            f"cannot place {object_id!r}: every live node allowed by {rule.describe()} is "
            f"full ({', '.join(full[:8])}{', ...' if len(full) > 8 else ''}): their free "
            "disk space is below their reserve",
        )
    chosen = replica_set(object_id, room, replicas, residency)
    assert not any(c.full for c in chosen), "a full node in a write set"
    return chosen


class Placer:
    """``replica_set`` and ``write_set`` of many objects under one view, as names: the same
    answers (and the same refusals) as the functions, with the per-view work (checking the
    candidates, filtering them by each residency rule, encoding their names) done once
    instead of once per object. A view change re-places every object a node holds, so
    this is the inner loop of a node holding millions. Build one per view."""

    __slots__ = ("_any_full", "_by_name", "_live", "_room", "_rules")

    def __init__(self, candidates: Iterable[Candidate]) -> None:
        self._live = _dedupe(candidates)
        self._by_name = {c.name: c for c in self._live}
        self._room = [c for c in self._live if not c.full]
        self._any_full = len(self._room) != len(self._live)
        # (residency, room only) -> (allowed [(encoded name, candidate)], regions distinct)
        self._rules: dict[tuple[Residency | None, bool],
                          tuple[list[tuple[bytes, Candidate]], bool]] = {}

    @property
    def any_full(self) -> bool:
        """Some candidate is full (then write sets may differ from replica sets)."""
        return self._any_full

    def _allowed(self, residency: Residency | None, room: bool
                 ) -> tuple[list[tuple[bytes, Candidate]], bool]:
        key = (residency, room)
        got = self._rules.get(key)
        if got is None:
            pool = self._room if room else self._live
            allowed = [(c.name.encode(), c) for c in pool
                       if residency is None or residency.allows(c.region)]
            distinct = len({c.region for _, c in allowed}) == len(allowed)
            got = self._rules[key] = (allowed, distinct)
        return got

    def _pick(self, object_id: str, replicas: int, allowed: list[tuple[bytes, Candidate]],
              distinct: bool) -> tuple[str, ...]:
        prefix = object_id.encode() + b"\0"
        blake2b, from_bytes = hashlib.blake2b, int.from_bytes
        # (-score, name) as ``replica_set`` ranks them; names are unique, so the
        # candidates themselves are never compared.
        ranked = sorted([(-from_bytes(blake2b(prefix + b, digest_size=8).digest(), "big"),
                          c.name, c) for b, c in allowed])
        if distinct:
            # Every region holds one node: each pick is the best-ranked node left (its
            # region is fresh), so ``_spread`` reduces to the top of the ranking.
            return tuple([r[1] for r in ranked[:replicas]])
        return tuple([c.name for c in _spread([r[2] for r in ranked], replicas)])

    def replica_set(self, object_id: str, replicas: int,
                    residency: Residency | None = None) -> tuple[str, ...]:
        """The names ``replica_set`` returns, in its order; raises as it does."""
        allowed, distinct = self._allowed(residency, False)
        if not allowed or not 1 <= replicas <= MAX_REPLICAS:
            return tuple(c.name for c in replica_set(object_id, self._live, replicas, residency))
        return self._pick(object_id, replicas, allowed, distinct)

    def unmoved_by(self, object_id: str, replicas: int, residency: Residency | None,
                   chosen: Sequence[str], joined: Sequence[Candidate]) -> bool:
        """Whether ``chosen``, the replica set of ``object_id`` under this view less the
        candidates ``joined`` (so every member of ``chosen`` is in this view), is still its
        replica set here (then in the same order). By property 1 of the module docstring
        that holds exactly when no joined node would be picked, which is decided by
        replaying the picks of ``chosen`` against the joined nodes' keys: one score per
        member and per joined node, instead of one per candidate."""
        new = [j for j in joined if residency is None or residency.allows(j.region)]
        if not new:
            return True  # none of them is a candidate for this object
        if len(chosen) < replicas:
            return False  # every allowed node was picked: a new one is picked too
        prefix = object_id.encode() + b"\0"

        def rank(name: str) -> tuple[int, str]:
            return (-int.from_bytes(hashlib.blake2b(prefix + name.encode(), digest_size=8)
                                    .digest(), "big"), name)

        ranks = [rank(j.name) for j in new]
        in_region: dict[str, int] = {}
        in_zone: dict[tuple[str, str], int] = {}
        for name in chosen:
            c = self._by_name[name]
            key = (in_region.get(c.region, 0), in_zone.get((c.region, c.zone), 0), rank(name))
            for j, r in zip(new, ranks, strict=True):
                if (in_region.get(j.region, 0), in_zone.get((j.region, j.zone), 0), r) < key:
                    return False  # j would be picked here instead of this member
            in_region[c.region] = in_region.get(c.region, 0) + 1
            in_zone[(c.region, c.zone)] = in_zone.get((c.region, c.zone), 0) + 1
        return True

    def write_set(self, object_id: str, replicas: int,
                  residency: Residency | None = None) -> tuple[str, ...]:
        """The names ``write_set`` returns, in its order; raises as it does."""
        if not self._any_full:
            return self.replica_set(object_id, replicas, residency)
        allowed, distinct = self._allowed(residency, True)
        if not allowed or not 1 <= replicas <= MAX_REPLICAS:
            return tuple(c.name for c in write_set(object_id, self._live, replicas, residency))
        return self._pick(object_id, replicas, allowed, distinct)


def check_quorum(chosen: Sequence[Candidate], w: int, full: int = 0) -> None:
    """Refuse a write whose replica set (or write set) cannot reach quorum ``w``: with rule
    ``"replicas"``, or ``"disk_full"`` when the ``full`` allowed live nodes left out of a
    write set for lack of room would have been enough."""
    if w < 1:
        raise ValueError(f"write quorum must be at least 1, got {w}")
    if len(chosen) < w:
        where = _braces({c.region for c in chosen}) if chosen else "{}"
        if len(chosen) + full >= w:
            raise PlacementError(
                "disk_full",
                f"write quorum W={w} cannot be met: only {len(chosen)} allowed live node(s) "
                f"with room (regions {where}); {full} more are full",
            )
        raise PlacementError(
            "replicas",
            f"write quorum W={w} cannot be met: only {len(chosen)} allowed live node(s) "
            f"(regions {where}) to place replicas on",
        )


def _spread(ranked: Sequence[Candidate], replicas: int) -> list[Candidate]:
    """Pick ``replicas`` nodes from ``ranked`` (HRW order), least-loaded failure domain first.

    Each pick minimises (replicas already in the node's region, replicas already in its
    zone, HRW rank). The key depends only on the node and the picks before it, which is
    what keeps property 1 of the module docstring.
    """
    remaining = list(ranked)
    chosen: list[Candidate] = []
    in_region: dict[str, int] = {}
    in_zone: dict[tuple[str, str], int] = {}
    while remaining and len(chosen) < replicas:
        best_i = 0
        best_key: tuple[int, int] | None = None
        for i, c in enumerate(remaining):
            key = (in_region.get(c.region, 0), in_zone.get((c.region, c.zone), 0))
            if best_key is None or key < best_key:
                best_i, best_key = i, key
                if key == (0, 0):
                    break  # nothing beats a fresh region, and later ranks lose ties
        pick = remaining.pop(best_i)
        chosen.append(pick)
        in_region[pick.region] = in_region.get(pick.region, 0) + 1
        zone = (pick.region, pick.zone)
        in_zone[zone] = in_zone.get(zone, 0) + 1
    return chosen


def _dedupe(candidates: Iterable[Candidate]) -> list[Candidate]:
    by_name: dict[str, Candidate] = {}
    for c in candidates:
        seen = by_name.setdefault(c.name, c)
        if seen != c:
            # Choosing one would make the answer depend on input order; a view has one
            # entry per node, so this is the caller's bug.
            raise ValueError(f"two different candidates named {c.name!r}: {seen} and {c}")
    return list(by_name.values())


def _braces(names: Iterable[str], sep: str = ", ") -> str:
    return "{" + sep.join(sorted(names)) + "}"


@dataclass(frozen=True)
class ObjectPolicy:
    """How many copies an object wants and where it may live (kept with the rules that
    place them: ``core.replication`` and ``core.puts`` both use it)."""

    replicas: int = 3
    residency: Residency | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be between 1 and {MAX_REPLICAS}, got {self.replicas}")

    def allows(self, region: str) -> bool:
        return self.residency is None or self.residency.allows(region)

    def __repr__(self) -> str:
        # Sorted, so a trace that prints a policy is the same in every process
        # (frozenset order depends on the per-process string hash seed).
        if self.residency is None:
            return f"ObjectPolicy(replicas={self.replicas})"
        regions = self.residency.regions
        where = "*" if regions is None else ",".join(sorted(regions))
        return f"ObjectPolicy(replicas={self.replicas}, regions={where})"
