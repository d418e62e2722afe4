from __future__ import annotations

import math
import random
import statistics

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale.core.vivaldi import (
    Coordinate,
    VivaldiClient,
    VivaldiConfig,
    estimate_rtt,
    is_valid,
    origin,
)

CONFIG = VivaldiConfig()

# RTT between region centres, seconds (symmetric; roughly geographic).
_REGION_RTT_MS = [
    [0.0, 62.0, 140.0, 110.0, 150.0],  # us-west
    [62.0, 0.0, 78.0, 145.0, 120.0],  # us-east
    [140.0, 78.0, 0.0, 135.0, 148.0],  # eu
    [110.0, 145.0, 135.0, 0.0, 150.0],  # asia
    [150.0, 120.0, 148.0, 150.0, 0.0],  # south-america
]
_INTRA_REGION_MS = 1.0


def _synthetic_topology(
    n_nodes: int, rng: random.Random
) -> tuple[list[str], dict[tuple[str, str], float]]:
    """Nodes spread over 5 regions; true RTT = region RTT + both access latencies."""
    names = [f"n{i}" for i in range(n_nodes)]
    region = {name: i % len(_REGION_RTT_MS) for i, name in enumerate(names)}
    access = {name: rng.uniform(0.5, 3.0) for name in names}
    true_rtt: dict[tuple[str, str], float] = {}
    for a in names:
        for b in names:
            if a == b:
                continue
            core = _REGION_RTT_MS[region[a]][region[b]] or _INTRA_REGION_MS
            true_rtt[a, b] = (core + access[a] + access[b]) / 1000.0
    return names, true_rtt


def _simulate(
    seed: int, rounds: int, n_nodes: int = 100
) -> tuple[dict[str, VivaldiClient], dict[tuple[str, str], float]]:
    rng = random.Random(seed)
    names, true_rtt = _synthetic_topology(n_nodes, rng)
    clients = {name: VivaldiClient(CONFIG, random.Random(rng.random())) for name in names}
    for _ in range(rounds):
        for name in names:
            peer = rng.choice(names)
            while peer == name:
                peer = rng.choice(names)
            sample = true_rtt[name, peer] * rng.uniform(0.98, 1.02)
            clients[name].update(peer, clients[peer].coordinate, sample)
    return clients, true_rtt


def _median_relative_error(
    clients: dict[str, VivaldiClient], true_rtt: dict[tuple[str, str], float]
) -> float:
    errors = [
        abs(estimate_rtt(clients[a].coordinate, clients[b].coordinate) - rtt) / rtt
        for (a, b), rtt in true_rtt.items()
    ]
    return statistics.median(errors)


def test_converges_on_synthetic_topology() -> None:
    clients, true_rtt = _simulate(seed=7, rounds=120)
    error = _median_relative_error(clients, true_rtt)
    print(f"median relative error after 120 rounds: {error:.4f}")
    assert error <= 0.15
    assert all(c.rejected == 0 and c.resets == 0 for c in clients.values())


def test_before_any_sample_the_estimate_is_useless() -> None:
    # Guards the convergence test against passing vacuously.
    clients, true_rtt = _simulate(seed=7, rounds=0)
    assert _median_relative_error(clients, true_rtt) > 0.9


def test_same_seed_same_coordinates() -> None:
    a, _ = _simulate(seed=3, rounds=10, n_nodes=20)
    b, _ = _simulate(seed=3, rounds=10, n_nodes=20)
    c, _ = _simulate(seed=4, rounds=10, n_nodes=20)
    coords_a = {k: v.coordinate for k, v in a.items()}
    assert coords_a == {k: v.coordinate for k, v in b.items()}
    assert coords_a != {k: v.coordinate for k, v in c.items()}


def test_coincident_coordinates_pick_a_random_direction_from_the_rng() -> None:
    first = VivaldiClient(CONFIG, random.Random(1)).update("p", origin(CONFIG), 0.05)
    again = VivaldiClient(CONFIG, random.Random(1)).update("p", origin(CONFIG), 0.05)
    other = VivaldiClient(CONFIG, random.Random(2)).update("p", origin(CONFIG), 0.05)
    assert first == again
    assert first.vec != other.vec
    assert math.hypot(*first.vec) > 0.0


@pytest.mark.parametrize("window", [0, 20])
def test_two_nodes_learn_their_distance(window: int) -> None:
    # Without the adjustment term, only the coordinates themselves can fit the RTT.
    cfg = VivaldiConfig(adjustment_window_size=window)
    a = VivaldiClient(cfg, random.Random(1))
    b = VivaldiClient(cfg, random.Random(2))
    for _ in range(200):
        a.update("b", b.coordinate, 0.040)
        b.update("a", a.coordinate, 0.040)
    assert estimate_rtt(a.coordinate, b.coordinate) == pytest.approx(0.040, rel=0.05)
    assert a.coordinate.error < 0.1 * cfg.error_max


def _nan_vec() -> tuple[float, ...]:
    return (math.nan,) + (0.0,) * (CONFIG.dimensionality - 1)


def _inf_vec() -> tuple[float, ...]:
    return (0.0,) * (CONFIG.dimensionality - 1) + (math.inf,)


GOOD_PEER = Coordinate(vec=(0.01,) + (0.0,) * 7, height=0.001, error=0.5)
BAD_PEERS = [
    Coordinate(vec=_nan_vec(), height=0.001, error=0.5),
    Coordinate(vec=_inf_vec(), height=0.001, error=0.5),
    Coordinate(vec=(0.01,) * 3, height=0.001, error=0.5),
    Coordinate(vec=(0.01,) * 9, height=0.001, error=0.5),
    Coordinate(vec=(), height=0.001, error=0.5),
    Coordinate(vec=GOOD_PEER.vec, height=math.nan, error=0.5),
    Coordinate(vec=GOOD_PEER.vec, height=-0.001, error=0.5),
    Coordinate(vec=GOOD_PEER.vec, height=0.001, error=math.inf),
    Coordinate(vec=GOOD_PEER.vec, height=0.001, error=-1.0),
    Coordinate(vec=GOOD_PEER.vec, height=0.001, error=0.5, adjustment=math.nan),
]
BAD_RTTS = [math.nan, math.inf, -math.inf, -0.01, 0.0, 10.0001, 1e9]


@pytest.mark.parametrize("peer", BAD_PEERS)
def test_invalid_peer_coordinate_is_rejected(peer: Coordinate) -> None:
    assert not is_valid(peer, CONFIG)
    client = VivaldiClient(CONFIG, random.Random(0))
    client.update("good", GOOD_PEER, 0.02)
    before = client.coordinate
    assert client.update("bad", peer, 0.02) == before
    assert client.coordinate == before
    assert client.rejected == 1
    assert is_valid(client.coordinate, CONFIG)


@pytest.mark.parametrize("rtt", BAD_RTTS)
def test_invalid_rtt_is_rejected(rtt: float) -> None:
    client = VivaldiClient(CONFIG, random.Random(0))
    client.update("good", GOOD_PEER, 0.02)
    before = client.coordinate
    assert client.update("good", GOOD_PEER, rtt) == before
    assert client.rejected == 1
    assert is_valid(client.coordinate, CONFIG)


def test_max_rtt_itself_is_accepted() -> None:
    client = VivaldiClient(CONFIG, random.Random(0))
    client.update("good", GOOD_PEER, CONFIG.max_rtt_s)
    assert client.rejected == 0
    assert client.coordinate != origin(CONFIG)


def test_garbage_from_the_wire_is_caught_by_decoding_or_is_valid() -> None:
    wire = msgspec.msgpack.encode(
        {"vec": [1e308] * 8, "height": 1e308, "error": 0.5, "adjustment": -1e308}
    )
    peer = msgspec.msgpack.decode(wire, type=Coordinate)
    client = VivaldiClient(CONFIG, random.Random(0))
    # Finite, so it passes is_valid; the update overflows and the client resets.
    for _ in range(5):
        client.update("huge", peer, 0.05)
    assert is_valid(client.coordinate, CONFIG)
    assert client.resets >= 1
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"vec": "x"}), type=Coordinate)


def test_latency_filter_uses_the_median_of_recent_samples() -> None:
    # A single outlier among three samples must not move the coordinate more than a
    # normal sample would: with the median filter the outlier is ignored.
    def run(samples: list[float]) -> Coordinate:
        client = VivaldiClient(CONFIG, random.Random(5))
        for rtt in samples:
            client.update("p", GOOD_PEER, rtt)
        return client.coordinate

    assert run([0.02, 0.02, 5.0]) == run([0.02, 0.02, 0.02])
    no_filter = VivaldiConfig(latency_filter_size=1)
    a = VivaldiClient(no_filter, random.Random(5))
    b = VivaldiClient(no_filter, random.Random(5))
    for rtt in (0.02, 0.02):
        a.update("p", GOOD_PEER, rtt)
        b.update("p", GOOD_PEER, rtt)
    a.update("p", GOOD_PEER, 5.0)
    b.update("p", GOOD_PEER, 0.02)
    assert a.coordinate != b.coordinate


def test_forget_drops_the_latency_filter() -> None:
    def run(forget: bool) -> Coordinate:
        client = VivaldiClient(CONFIG, random.Random(5))
        client.update("p", GOOD_PEER, 0.5)
        client.update("p", GOOD_PEER, 0.5)
        if forget:
            client.forget("p")
        client.update("p", GOOD_PEER, 0.02)
        return client.coordinate

    # Remembered: median(0.5, 0.5, 0.02) = 0.5; forgotten: median(0.02) = 0.02.
    assert run(forget=True) != run(forget=False)
    VivaldiClient(CONFIG, random.Random(0)).forget("never-seen")  # no error


def test_latency_filters_are_bounded() -> None:
    client = VivaldiClient(VivaldiConfig(max_peers=4), random.Random(0))
    for i in range(50):
        client.update(f"p{i}", GOOD_PEER, 0.02)
    assert len(client._latency_samples) == 4
    assert list(client._latency_samples) == ["p46", "p47", "p48", "p49"]


def test_estimate_rtt_adds_adjustment_only_while_positive() -> None:
    a = Coordinate(vec=(0.0, 0.0), height=0.001, error=1.0, adjustment=0.002)
    b = Coordinate(vec=(0.003, 0.004), height=0.002, error=1.0, adjustment=0.001)
    assert estimate_rtt(a, b) == pytest.approx(0.005 + 0.003 + 0.003)
    neg = msgspec.structs.replace(b, adjustment=-1.0)
    assert estimate_rtt(a, neg) == pytest.approx(0.005 + 0.003)
    with pytest.raises(ValueError):
        estimate_rtt(a, origin(CONFIG))


def test_origin_and_config_validation() -> None:
    o = origin(CONFIG)
    assert o.vec == (0.0,) * 8 and o.height == CONFIG.height_min
    assert o.error == CONFIG.error_max and o.adjustment == 0.0
    assert is_valid(o, CONFIG)
    for bad in (
        {"dimensionality": 0},
        {"ce": 0.0},
        {"cc": 2.0},
        {"max_rtt_s": math.nan},
        {"latency_filter_size": 0},
        {"adjustment_window_size": -1},
    ):
        with pytest.raises(ValueError):
            VivaldiConfig(**bad)


def test_adjustment_can_be_disabled() -> None:
    client = VivaldiClient(VivaldiConfig(adjustment_window_size=0), random.Random(0))
    for _ in range(10):
        client.update("p", GOOD_PEER, 0.05)
    assert client.coordinate.adjustment == 0.0


_finite = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False)
_small_cfg = VivaldiConfig(dimensionality=3)
_peer_coords = st.builds(
    Coordinate,
    vec=st.tuples(_finite, _finite, _finite),
    height=st.floats(min_value=0.0, max_value=1.0),
    error=st.floats(min_value=0.0, max_value=1.5),
    adjustment=st.floats(min_value=-1.0, max_value=1.0),
)
_updates = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),
        _peer_coords,
        st.floats(min_value=1e-9, max_value=_small_cfg.max_rtt_s, exclude_min=False),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(updates=_updates, seed=st.integers(min_value=0, max_value=2**32))
def test_any_valid_updates_keep_the_coordinate_valid(
    updates: list[tuple[str, Coordinate, float]], seed: int
) -> None:
    client = VivaldiClient(_small_cfg, random.Random(seed))
    for peer, coord, rtt in updates:
        mine = client.update(peer, coord, rtt)
        assert mine == client.coordinate
        assert is_valid(mine, _small_cfg)
        assert mine.height >= _small_cfg.height_min
        assert 0.0 <= mine.error <= _small_cfg.error_max
        there = estimate_rtt(mine, coord)
        back = estimate_rtt(coord, mine)
        assert there >= 0.0
        assert there == back
    assert client.rejected == 0


@settings(max_examples=150, deadline=None)
@given(a=_peer_coords, b=_peer_coords)
def test_estimate_is_nonnegative_and_symmetric(a: Coordinate, b: Coordinate) -> None:
    assert estimate_rtt(a, b) >= 0.0
    assert estimate_rtt(a, b) == estimate_rtt(b, a)
    assert estimate_rtt(a, a) >= 0.0
