from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale.core.placement import (
    MAX_REPLICAS,
    Candidate,
    PlacementError,
    Residency,
    check_quorum,
    hrw_score,
    replica_set,
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
