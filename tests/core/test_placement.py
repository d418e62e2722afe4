from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale.core.placement import (
    FULL_TAG,
    MAX_REPLICAS,
    Candidate,
    PlacementError,
    Placer,
    Residency,
    admits_write,
    check_quorum,
    disk_full,
    hrw_score,
    is_full,
    replica_set,
    write_set,
)

REGIONS = ["us-east", "us-west", "eu-west", "eu-central", "ap-south"]
ZONES = ["a", "b", "c"]


def _names(chosen: list[Candidate]) -> list[str]:
    return [c.name for c in chosen]


def _mesh(regions: int, zones: int, per_zone: int) -> list[Candidate]:
    return [
        Candidate(f"{r}-{z}-{i}", r, z)
        for r in REGIONS[:regions]
        for z in ZONES[:zones]
        for i in range(per_zone)
    ]


# A random topology: up to 14 nodes over up to 4 regions of up to 3 zones each, so that
# regions and zones with one node, with many, and shared zone names all come up.
topologies = st.lists(
    st.tuples(st.sampled_from(REGIONS[:4]), st.sampled_from(ZONES)),
    min_size=1,
    max_size=14,
).map(lambda places: [Candidate(f"n{i}", r, z) for i, (r, z) in enumerate(places)])
residencies = st.one_of(
    st.none(),
    st.builds(
        Residency,
        regions=st.frozensets(st.sampled_from(REGIONS), max_size=3),
        data_class=st.sampled_from([None, "pii", "telemetry"]),
    ),
)
object_ids = st.text(min_size=1, max_size=12)
replica_counts = st.integers(min_value=1, max_value=6)


# --- hrw_score ----------------------------------------------------------------------


def test_hrw_score_is_a_pinned_blake2b_value() -> None:
    # Computed once with hashlib; if this changes, every object in every mesh moves.
    assert hrw_score("obj-42", "node-a") == 9600787108647263907
    digest = hashlib.blake2b(b"obj-42\x00node-a", digest_size=8).digest()
    assert hrw_score("obj-42", "node-a") == int.from_bytes(digest, "big")


def test_hrw_score_separates_object_and_node() -> None:
    assert hrw_score("ab", "c") != hrw_score("a", "bc")
    assert 0 <= hrw_score("x", "y") < 2**64


# --- residency ----------------------------------------------------------------------


def test_residency_describe_and_allows() -> None:
    rule = Residency(frozenset({"eu-west", "eu-central"}), "pii")
    assert rule.describe() == "residency regions={eu-central,eu-west} (class pii)"
    assert rule.allows("eu-west")
    assert not rule.allows("us-east")
    assert Residency().describe() == "residency regions=any"
    assert Residency().allows("anything")
    assert not Residency(frozenset()).allows("eu-west")


def test_residency_rejects_a_bare_string() -> None:
    with pytest.raises(TypeError):
        Residency("eu-west")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(object_ids, topologies, replica_counts, residencies)
def test_residency_is_never_violated(
    oid: str, nodes: list[Candidate], r: int, rule: Residency | None
) -> None:
    allowed = [c for c in nodes if rule is None or rule.allows(c.region)]
    if not allowed:
        with pytest.raises(PlacementError) as err:
            replica_set(oid, nodes, r, rule)
        assert err.value.rule == "residency"
        return
    chosen = replica_set(oid, nodes, r, rule)
    assert len(chosen) == min(r, len(allowed))
    assert all(rule is None or rule.allows(c.region) for c in chosen)
    assert len(set(_names(chosen))) == len(chosen)


def test_refusal_names_the_rule_and_where_nodes_are() -> None:
    nodes = [Candidate("u1", "us-east", "a"), Candidate("w1", "eu-west", "a")]
    rule = Residency(frozenset({"eu-central"}), "pii")
    with pytest.raises(PlacementError) as err:
        replica_set("obj", nodes, 3, rule)
    assert err.value.rule == "residency"
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "no live node in regions {eu-central}" in message
    assert "residency regions={eu-central} (class pii)" in message
    assert "live nodes are in {eu-west, us-east}" in message


def test_empty_view_is_refused_under_the_replicas_rule() -> None:
    with pytest.raises(PlacementError) as err:
        replica_set("obj", [], 3)
    assert err.value.rule == "replicas"
    assert "no live node" in str(err.value)


# --- determinism --------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(object_ids, topologies, replica_counts, residencies, st.randoms(use_true_random=False))
def test_same_inputs_in_any_order_give_the_same_list(
    oid: str, nodes: list[Candidate], r: int, rule: Residency | None, rnd: random.Random
) -> None:
    try:
        expected = _names(replica_set(oid, nodes, r, rule))
    except PlacementError:
        return
    shuffled = list(nodes) + list(nodes[: len(nodes) // 2])  # duplicates, too
    rnd.shuffle(shuffled)
    assert _names(replica_set(oid, shuffled, r, rule)) == expected
    assert _names(replica_set(oid, iter(shuffled), r, rule)) == expected


def test_primary_is_the_top_hrw_node() -> None:
    nodes = _mesh(regions=3, zones=3, per_zone=2)
    for i in range(50):
        oid = f"obj-{i}"
        top = min(nodes, key=lambda c: (-hrw_score(oid, c.name), c.name))
        assert replica_set(oid, nodes, 3)[0] == top


def test_conflicting_duplicates_are_refused() -> None:
    nodes = [Candidate("n1", "us-east", "a"), Candidate("n1", "eu-west", "a")]
    with pytest.raises(ValueError, match="two different candidates named 'n1'"):
        replica_set("obj", nodes, 1)


@pytest.mark.parametrize("r", [0, -1, MAX_REPLICAS + 1])
def test_replica_count_is_bounded(r: int) -> None:
    with pytest.raises(ValueError, match="replicas must be between 1 and 16"):
        replica_set("obj", _mesh(1, 1, 1), r)


def test_candidate_validation_and_frozen_labels() -> None:
    with pytest.raises(ValueError):
        Candidate("", "us-east", "a")
    with pytest.raises(ValueError):
        Candidate("a\0b", "us-east", "a")
    labels = {"gpu": "a100"}
    c = Candidate("n1", "us-east", "a", labels)
    labels["gpu"] = "none"
    assert c.labels == {"gpu": "a100"}
    assert c == Candidate("n1", "us-east", "a", {"gpu": "a100"})


# --- spread -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(object_ids, topologies, replica_counts)
def test_with_enough_regions_every_replica_is_in_its_own_region(
    oid: str, nodes: list[Candidate], r: int
) -> None:
    if len({c.region for c in nodes}) < r:
        return
    chosen = replica_set(oid, nodes, r)
    assert len({c.region for c in chosen}) == r


@settings(max_examples=200, deadline=None)
@given(object_ids, st.integers(min_value=1, max_value=3), st.data())
def test_within_one_region_replicas_spread_over_zones(
    oid: str, r: int, data: st.DataObject
) -> None:
    # A residency rule confining data to one region: the spread falls to zones.
    zones = data.draw(st.lists(st.sampled_from(ZONES), min_size=r, max_size=12))
    if len(set(zones)) < r:
        return
    nodes = [Candidate(f"n{i}", "eu-west", z) for i, z in enumerate(zones)]
    nodes += [Candidate("us", "us-east", "a"), Candidate("ap", "ap-south", "b")]
    chosen = replica_set(oid, nodes, r, Residency(frozenset({"eu-west"}), "pii"))
    assert {c.region for c in chosen} == {"eu-west"}
    assert len({c.zone for c in chosen}) == r


@settings(max_examples=300, deadline=None)
@given(object_ids, topologies, replica_counts)
def test_regions_then_zones_are_filled_evenly(oid: str, nodes: list[Candidate], r: int) -> None:
    chosen = replica_set(oid, nodes, r)
    per_region = Counter(c.region for c in chosen)
    available = Counter(c.region for c in nodes)
    # A region holds one more replica than another only if the other has no node left.
    for a, na in per_region.items():
        for b in available:
            if per_region[b] < available[b]:
                assert na <= per_region[b] + 1, (a, b, per_region)
    # Likewise the zones within a region.
    for region in per_region:
        per_zone = Counter(c.zone for c in chosen if c.region == region)
        zone_nodes = Counter(c.zone for c in nodes if c.region == region)
        for za, na in per_zone.items():
            for zb in zone_nodes:
                if per_zone[zb] < zone_nodes[zb]:
                    assert na <= per_zone[zb] + 1, (region, za, zb, per_zone)


def test_two_regions_four_replicas_split_two_and_two() -> None:
    nodes = _mesh(regions=2, zones=3, per_zone=3)
    for i in range(200):
        chosen = replica_set(f"obj-{i}", nodes, 4)
        assert sorted(Counter(c.region for c in chosen).values()) == [2, 2]
        for region in REGIONS[:2]:
            assert len({c.zone for c in chosen if c.region == region}) == 2


# --- fewer nodes than replicas, and quorum ------------------------------------------


def test_fewer_allowed_nodes_than_replicas_returns_them_all() -> None:
    nodes = _mesh(regions=3, zones=1, per_zone=1)
    rule = Residency(frozenset({"us-east", "us-west"}))
    chosen = replica_set("obj", nodes, 3, rule)
    assert {c.region for c in chosen} == {"us-east", "us-west"}
    check_quorum(chosen, 2)
    with pytest.raises(PlacementError) as err:
        check_quorum(chosen, 3)
    assert err.value.rule == "replicas"
    assert "W=3" in str(err.value) and "only 2" in str(err.value)
    with pytest.raises(ValueError):
        check_quorum(chosen, 0)


# --- minimal disruption -------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(object_ids, topologies, replica_counts, residencies, st.data())
def test_removing_a_node_disturbs_only_the_sets_that_held_it(
    oid: str,
    nodes: list[Candidate],
    r: int,
    rule: Residency | None,
    data: st.DataObject,
) -> None:
    try:
        before = replica_set(oid, nodes, r, rule)
    except PlacementError:
        return
    gone = data.draw(st.sampled_from(nodes))
    rest = [c for c in nodes if c.name != gone.name]
    try:
        after = replica_set(oid, rest, r, rule)
    except PlacementError:
        assert _names(before) == [gone.name]  # it was the only allowed node
        return
    if gone not in before:
        # Strict: not even the order changes.
        assert _names(after) == _names(before)
    else:
        # Every other member stays; at most one node takes the place of the one that left.
        survivors = set(_names(before)) - {gone.name}
        assert survivors <= set(_names(after))
        assert len(set(_names(after)) - survivors) <= 1


def test_removing_a_node_moves_only_its_share_of_objects() -> None:
    nodes = _mesh(regions=3, zones=3, per_zone=2)  # 18 nodes
    gone = nodes[7]
    rest = [c for c in nodes if c != gone]
    held, changed = 0, 0
    for i in range(2000):
        before = set(_names(replica_set(f"obj-{i}", nodes, 3)))
        after = set(_names(replica_set(f"obj-{i}", rest, 3)))
        held += gone.name in before
        changed += before != after
        assert len(before - after) <= 1
    assert changed == held
    assert 0.1 < held / 2000 < 0.24  # about R/N = 3/18 of the objects


# --- load balance -------------------------------------------------------------------


def test_primaries_are_balanced_over_nodes() -> None:
    nodes = [Candidate(f"node-{i:02d}", "us-east", ZONES[i % 3]) for i in range(20)]
    primaries = Counter(replica_set(f"obj-{i}", nodes, 1)[0].name for i in range(10_000))
    assert set(primaries) == {c.name for c in nodes}
    for count in primaries.values():
        assert 300 <= count <= 700  # 3% .. 7% of 10,000; the mean is 5%


# --- full nodes -------------------------------------------------------------------------


def _fill(nodes: list[Candidate], full: set[str]) -> list[Candidate]:
    return [Candidate(c.name, c.region, c.zone, c.labels, full=c.name in full) for c in nodes]


@settings(max_examples=200, deadline=None)
@given(object_ids, topologies, replica_counts, residencies, st.data())
def test_a_write_set_never_holds_a_full_node_and_replaces_only_full_members(
    oid: str, nodes: list[Candidate], r: int, residency: Residency | None, data: st.DataObject
) -> None:
    full = data.draw(st.sets(st.sampled_from([c.name for c in nodes])))
    view = _fill(nodes, full)
    try:
        home = _names(replica_set(oid, view, r, residency))
    except PlacementError:
        return
    room = [c for c in view if not c.full]
    try:
        ws = _names(write_set(oid, view, r, residency))
    except PlacementError as e:
        # Refused only when every allowed node is full, and then it says so.
        assert e.rule == "disk_full"
        assert not any(residency is None or residency.allows(c.region) for c in room)
        return
    assert not set(ws) & full
    # The rule set's members with room all stay: only full ones are replaced...
    assert {n for n in home if n not in full} <= set(ws)
    # ...and with no full member in the rule set, the write set is the rule set.
    if not set(home) & full:
        assert ws == home
    assert ws == _names(replica_set(oid, room, r, residency))


def test_a_full_node_leaves_the_write_set_for_the_next_node_and_stays_in_the_rule_set() -> None:
    view = _mesh(3, 2, 1)  # one node per zone: 6 nodes in 3 regions
    oid = next(f"o{i}" for i in range(1000)
               if _names(replica_set(f"o{i}", view, 3))[1] == view[0].name)
    home = _names(replica_set(oid, view, 3))
    full_view = _fill(view, {view[0].name})
    assert _names(replica_set(oid, full_view, 3)) == home  # still where its copies belong
    ws = _names(write_set(oid, full_view, 3))
    assert view[0].name not in ws and len(ws) == 3
    assert set(home) - set(ws) == {view[0].name} and len(set(ws) - set(home)) == 1
    assert is_full({FULL_TAG: "1"}) and not is_full({}) and not is_full({FULL_TAG: "0"})


def test_no_room_anywhere_allowed_is_refused_as_disk_full_after_residency() -> None:
    view = _fill(_mesh(2, 1, 2), {"us-east-a-0", "us-east-a-1"})
    us = Residency(frozenset({"us-east"}))
    with pytest.raises(PlacementError) as e:
        write_set("x", view, 2, us)
    assert e.value.rule == "disk_full" and "full" in str(e.value)
    with pytest.raises(PlacementError) as e:
        write_set("x", view, 2, Residency(frozenset({"mars"})))
    assert e.value.rule == "residency"
    assert {c.region for c in write_set("x", view, 2)} == {"us-west"}
    # Too few nodes with room for W: the refusal names the full disks, not the count.
    with pytest.raises(PlacementError) as e:
        check_quorum(write_set("x", view, 3), 3, full=2)
    assert e.value.rule == "disk_full"
    with pytest.raises(PlacementError) as e:
        check_quorum(write_set("x", view, 3), 3, full=0)
    assert e.value.rule == "replicas"


def test_disk_full_has_hysteresis() -> None:
    reserve, margin = 100, 50
    assert not disk_full(100, reserve, margin, was_full=False)
    assert disk_full(99, reserve, margin, was_full=False)
    # Full stays full until free space is back above reserve + margin.
    assert disk_full(120, reserve, margin, was_full=True)
    assert disk_full(149, reserve, margin, was_full=True)
    assert not disk_full(150, reserve, margin, was_full=True)
    # Walking free space up and down across the reserve flips it twice, not every step.
    state, flips = False, 0
    for free in [110, 99, 101, 98, 120, 140, 149, 150, 140, 101, 100]:
        new = disk_full(free, reserve, margin, state)
        flips += new != state
        state = new
    assert flips == 2 and not state
    with pytest.raises(ValueError):
        disk_full(1, 1, -1, was_full=False)


def test_a_write_refused_for_want_of_room_makes_the_node_full() -> None:
    """Free space above the reserve by less than a write's size refuses that write
    (``admits_write``); the node must then say it is full, or it stays in write sets and
    refuses every copy it is sent for ever (swarm seed 448821714: free 68, reserve 64,
    copies of ~20 bytes)."""
    reserve, margin = 64, 64
    assert admits_write(84, 20, reserve) and not admits_write(68, 20, reserve)
    assert not disk_full(68, reserve, margin, was_full=False)  # by its free space alone
    assert disk_full(68, reserve, margin, was_full=False, refused_bytes=20)
    # Then the hysteresis holds it full until reserve + margin, refusal or not.
    assert disk_full(127, reserve, margin, was_full=True)
    assert not disk_full(128, reserve, margin, was_full=True)
    # A refusal that space freed since then would admit does not make it full.
    assert not disk_full(200, reserve, margin, was_full=False, refused_bytes=20)
    with pytest.raises(ValueError):
        disk_full(68, reserve, margin, was_full=False, refused_bytes=-1)


def _outcome(f: object, *args: object) -> tuple[str, ...] | tuple[str, str, str]:
    """The names a placement returns, or the refusal it raises (type, rule, message)."""
    try:
        got = f(*args)  # type: ignore[operator]
    except PlacementError as e:
        return ("PlacementError", e.rule, str(e))
    except ValueError as e:
        return ("ValueError", "", str(e))
    return tuple(c if isinstance(c, str) else c.name for c in got)


@settings(max_examples=300, deadline=None)
@given(st.lists(object_ids, min_size=1, max_size=5), topologies,
       st.integers(min_value=0, max_value=MAX_REPLICAS + 1), residencies, st.data())
def test_a_placer_answers_as_replica_set_and_write_set(
    oids: list[str], nodes: list[Candidate], r: int, residency: Residency | None,
    data: st.DataObject,
) -> None:
    full = data.draw(st.sets(st.sampled_from([c.name for c in nodes])))
    view = _fill(nodes, full)
    placer = Placer(view)
    assert placer.any_full == bool(full)
    for oid in oids:  # several objects: the per-view work is shared between them
        assert _outcome(placer.replica_set, oid, r, residency) == _outcome(
            replica_set, oid, view, r, residency)
        assert _outcome(placer.write_set, oid, r, residency) == _outcome(
            write_set, oid, view, r, residency)


def test_a_placer_of_an_empty_view_refuses_as_replica_set() -> None:
    with pytest.raises(PlacementError) as e:
        Placer([]).replica_set("x", 3)
    assert e.value.rule == "replicas"


@settings(max_examples=300, deadline=None)
@given(object_ids, topologies, replica_counts, residencies, st.data())
def test_a_placer_tells_whether_joined_nodes_move_a_set(
    oid: str, nodes: list[Candidate], r: int, residency: Residency | None, data: st.DataObject
) -> None:
    names = data.draw(st.sets(st.sampled_from([c.name for c in nodes]), max_size=3))
    joined = [c for c in nodes if c.name in names]
    base = [c for c in nodes if c.name not in names]
    try:
        old = _names(replica_set(oid, base, r, residency))
    except PlacementError:
        old = []
    try:
        new = _names(replica_set(oid, nodes, r, residency))
    except PlacementError:
        new = []
    assert Placer(nodes).unmoved_by(oid, r, residency, old, joined) == (new == old)
