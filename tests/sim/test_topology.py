from __future__ import annotations

import itertools

import pytest

from meshscale.sim import Placement, Topology


def test_three_regions_rtts() -> None:
    topo = Topology.three_regions()
    assert list(topo.regions) == ["eu-west", "us-east", "ap-south"]
    assert all(len(zones) == 3 for zones in topo.regions.values())
    eu = Placement("eu-west", "eu-west-a")
    us = Placement("us-east", "us-east-b")
    ap = Placement("ap-south", "ap-south-c")
    assert topo.base_rtt(eu, us) == pytest.approx(0.080)
    assert topo.base_rtt(eu, ap) == pytest.approx(0.140)
    assert topo.base_rtt(us, ap) == pytest.approx(0.190)
    assert topo.base_rtt(ap, us) == topo.base_rtt(us, ap)


def test_intra_region_and_intra_zone() -> None:
    topo = Topology.three_regions()
    a = Placement("eu-west", "eu-west-a")
    b = Placement("eu-west", "eu-west-b")
    a2 = Placement("eu-west", "eu-west-a")
    assert topo.base_rtt(a, b) == topo.intra_region_rtt_s
    assert topo.base_rtt(a, a2) == topo.intra_zone_rtt_s
    assert topo.intra_zone_rtt_s < topo.intra_region_rtt_s < topo.region_rtt("eu-west", "us-east")


def test_access_latency_added_to_both_ends() -> None:
    topo = Topology.three_regions()
    a = Placement("eu-west", "eu-west-a", access_s=0.002)
    b = Placement("us-east", "us-east-a", access_s=0.003)
    assert topo.base_rtt(a, b) == pytest.approx(0.080 + 0.005)
    assert topo.core_rtt(a, b) == pytest.approx(0.080)


def test_five_regions_matrix_complete_and_symmetric() -> None:
    topo = Topology.five_regions()
    names = list(topo.regions)
    assert names == ["eu-west", "eu-central", "us-east", "us-west", "ap-south"]
    for a, b in itertools.combinations(names, 2):
        assert (a, b) in topo.region_rtt_s or (b, a) in topo.region_rtt_s
        assert topo.region_rtt(a, b) == topo.region_rtt(b, a)
        assert 0.01 < topo.region_rtt(a, b) < 0.3
    # Plausibility: neighbours are close, antipodes far.
    assert topo.region_rtt("eu-west", "eu-central") < topo.region_rtt("eu-west", "us-east")
    assert topo.region_rtt("us-west", "ap-south") == max(
        topo.region_rtt(a, b) for a, b in itertools.combinations(names, 2)
    )


def test_missing_pair_falls_back_to_default() -> None:
    topo = Topology(
        regions={"x": ("x1",), "y": ("y1",), "z": ("z1",)},
        region_rtt_s={("x", "y"): 0.05},
        default_inter_region_rtt_s=0.123,
    )
    assert topo.region_rtt("y", "x") == 0.05
    assert topo.region_rtt("x", "z") == 0.123
    assert topo.base_rtt(Placement("z", "z1"), Placement("y", "y1")) == 0.123
    # A region the topology does not list still gets the default.
    assert topo.region_rtt("x", "elsewhere") == 0.123


def test_place_round_robin_over_regions_then_zones() -> None:
    topo = Topology.three_regions()
    placed = topo.place(18)
    regions = list(topo.regions)
    for i, p in enumerate(placed):
        assert p.region == regions[i % 3]
        assert p.zone == topo.regions[p.region][(i // 3) % 3]
    # Every (region, zone) gets exactly two of 18 nodes.
    counts: dict[tuple[str, str], int] = {}
    for p in placed:
        counts[(p.region, p.zone)] = counts.get((p.region, p.zone), 0) + 1
    assert len(counts) == 9
    assert set(counts.values()) == {2}


def test_place_access_latency_small_deterministic_and_varied() -> None:
    topo = Topology.five_regions()
    placed = topo.place(200, max_access_s=0.002)
    assert placed == topo.place(200, max_access_s=0.002)
    access = [p.access_s for p in placed]
    assert all(0.0 <= a < 0.002 for a in access)
    assert len(set(access)) == 200
    assert 0.0008 < sum(access) / len(access) < 0.0012  # spread evenly over [0, max)
    assert all(p.access_s == 0.0 for p in topo.place(10, max_access_s=0.0))
    assert topo.place(0) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"regions": {}},
        {"regions": {"x": ()}},
        {"regions": {"x": ("a", "a")}},
        {"regions": {"x": ("a",)}, "jitter": 1.0},
        {"regions": {"x": ("a",)}, "jitter": -0.1},
        {"regions": {"x": ("a",)}, "intra_zone_rtt_s": -1.0},
        {"regions": {"x": ("a",)}, "intra_region_rtt_s": float("nan")},
        {"regions": {"x": ("a",), "y": ("b",)}, "region_rtt_s": {("x", "y"): 0.1, ("y", "x"): 0.2}},
        {"regions": {"x": ("a",)}, "region_rtt_s": {("x", "x"): 0.1}},
    ],
)
def test_invalid_topologies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Topology(**kwargs)  # type: ignore[arg-type]


def test_invalid_placement_and_place_arguments() -> None:
    with pytest.raises(ValueError):
        Placement("x", "a", access_s=-0.001)
    with pytest.raises(ValueError):
        Topology.three_regions().place(-1)
