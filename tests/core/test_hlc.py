from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale.core.hlc import (
    LOGICAL_MAX,
    WALL_NS_MAX,
    ClockSkewError,
    HLCTimestamp,
    HybridLogicalClock,
)

MAX_OFFSET_S = 0.5
MAX_OFFSET_NS = 500_000_000
T0 = 1_700_000_000.0  # a realistic epoch time, seconds


def _ns(wall_s: float) -> int:
    return round(wall_s * 1e9)


def test_physical_time_moving_forward_resets_the_counter() -> None:
    clock = HybridLogicalClock("a")
    t1 = clock.now(T0)
    assert (t1.wall_ns, t1.logical, t1.node) == (_ns(T0), 0, "a")
    t2 = clock.now(T0)
    assert (t2.wall_ns, t2.logical) == (_ns(T0), 1)
    t3 = clock.now(T0 - 5.0)  # the wall clock stepped back
    assert (t3.wall_ns, t3.logical) == (_ns(T0), 2)
    t4 = clock.now(T0 + 1.0)
    assert (t4.wall_ns, t4.logical) == (_ns(T0 + 1.0), 0)
    assert t1 < t2 < t3 < t4
    assert clock.last == t4


def test_receive_takes_the_larger_of_local_and_remote() -> None:
    clock = HybridLogicalClock("b")
    clock.now(T0)
    remote = HLCTimestamp(_ns(T0) + 100_000_000, 7, "a")
    got = clock.update(remote, T0)
    assert (got.wall_ns, got.logical, got.node) == (remote.wall_ns, 8, "b")
    # Same wall part on both sides: counter is one more than the larger.
    got2 = clock.update(HLCTimestamp(remote.wall_ns, 3, "c"), T0)
    assert (got2.wall_ns, got2.logical) == (remote.wall_ns, 9)
    got3 = clock.update(HLCTimestamp(remote.wall_ns, 20, "c"), T0)
    assert (got3.wall_ns, got3.logical) == (remote.wall_ns, 21)
    # Remote behind us: local counter ticks.
    got4 = clock.update(HLCTimestamp(1, 999, "c"), T0)
    assert (got4.wall_ns, got4.logical) == (remote.wall_ns, 22)
    # Physical clock ahead of both: counter resets.
    got5 = clock.update(HLCTimestamp(remote.wall_ns, 5, "c"), T0 + 1.0)
    assert (got5.wall_ns, got5.logical) == (_ns(T0 + 1.0), 0)


def test_remote_too_far_ahead_is_refused_and_clock_unchanged() -> None:
    clock = HybridLogicalClock("b", max_offset_s=MAX_OFFSET_S)
    before = clock.now(T0)
    ahead = HLCTimestamp(_ns(T0) + MAX_OFFSET_NS + 1, 0, "a")
    with pytest.raises(ClockSkewError):
        clock.update(ahead, T0)
    assert clock.last == before
    assert isinstance(ClockSkewError("x"), ValueError)
    # Exactly at the bound is accepted.
    edge = HLCTimestamp(_ns(T0) + MAX_OFFSET_NS, 0, "a")
    assert clock.update(edge, T0) > edge


def test_bad_wall_clock_is_refused() -> None:
    clock = HybridLogicalClock("a")
    for bad in (math.nan, math.inf, -1.0, 1e12):
        with pytest.raises(ValueError):
            clock.now(bad)
        with pytest.raises(ValueError):
            clock.update(HLCTimestamp(0, 0, "x"), bad)
    assert clock.last == HLCTimestamp(0, 0, "a")
    with pytest.raises(ValueError):
        HybridLogicalClock("a", max_offset_s=-1.0)


def test_logical_overflow_bumps_the_physical_part() -> None:
    clock = HybridLogicalClock("b")
    remote = HLCTimestamp(_ns(T0), LOGICAL_MAX, "a")
    got = clock.update(remote, T0)
    assert got > remote
    assert (got.wall_ns, got.logical) == (_ns(T0) + 1, 0)
    assert clock.logical_overflows == 1


def test_timestamp_ranges_are_checked_also_on_decode_from_the_wire() -> None:
    for wall, logical in ((-1, 0), (WALL_NS_MAX + 1, 0), (0, -1), (0, LOGICAL_MAX + 1)):
        with pytest.raises(ValueError):
            HLCTimestamp(wall, logical)
        if wall > WALL_NS_MAX:
            continue  # MessagePack cannot carry it at all
        wire = msgspec.msgpack.encode({"wall_ns": wall, "logical": logical, "node": "x"})
        with pytest.raises(msgspec.ValidationError):
            msgspec.msgpack.decode(wire, type=HLCTimestamp)
    ts = HLCTimestamp(_ns(T0), 3, "n1")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(ts), type=HLCTimestamp) == ts


def test_order_is_wall_then_logical_then_node() -> None:
    assert HLCTimestamp(1, 9, "z") < HLCTimestamp(2, 0, "a")
    assert HLCTimestamp(2, 0, "z") < HLCTimestamp(2, 1, "a")
    assert HLCTimestamp(2, 1, "a") < HLCTimestamp(2, 1, "b")
    assert HLCTimestamp(2, 1) < HLCTimestamp(2, 1, "a")


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "xyz",
        "0000018bcfe56800-00000001",  # no node separator
        "0000018BCFE56800-00000001-a",  # upper case would not sort with lower case
        "000018bcfe56800-00000001-a",  # short wall
        "0000018bcfe56800-0000001-a",  # short logical
        "0000018bcfe56800_00000001-a",
        " 000018bcfe56800-00000001-a",
        "+000018bcfe56800-00000001-a",
        "0000018bcfe56800-0000_001-a",
        b"0000018bcfe56800-00000001-a",
        None,
    ],
)
def test_decode_rejects_garbage(garbage: object) -> None:
    with pytest.raises(ValueError):
        HLCTimestamp.decode(garbage)  # type: ignore[arg-type]


_timestamps = st.builds(
    HLCTimestamp,
    wall_ns=st.integers(min_value=0, max_value=WALL_NS_MAX),
    logical=st.integers(min_value=0, max_value=LOGICAL_MAX),
    node=st.text(max_size=8),
)
# Few distinct values, so that ties on wall and logical are common.
_close_timestamps = st.builds(
    HLCTimestamp,
    wall_ns=st.integers(min_value=0, max_value=3),
    logical=st.integers(min_value=0, max_value=3),
    node=st.sampled_from(["", "a", "a\x00", "ab", "b", "é", "\U0001f600"]),
)


@settings(max_examples=300)
@given(ts=st.one_of(_timestamps, _close_timestamps))
def test_encode_decode_round_trip(ts: HLCTimestamp) -> None:
    assert HLCTimestamp.decode(ts.encode()) == ts


@settings(max_examples=300)
@given(
    a=st.one_of(_timestamps, _close_timestamps),
    b=st.one_of(_timestamps, _close_timestamps),
)
def test_encode_order_is_timestamp_order(a: HLCTimestamp, b: HLCTimestamp) -> None:
    ea, eb = a.encode(), b.encode()
    assert (ea < eb) == (a < b)
    assert (ea == eb) == (a == b)
    assert (ea.encode() < eb.encode()) == (a < b)  # UTF-8 byte order as well


# One step of a random interleaving: ("now", wall_s) or ("update", wall_s, remote).
_wall = st.floats(min_value=T0 - 2.0, max_value=T0 + 2.0)
_remote_logical = st.integers(min_value=0, max_value=1000)
_events = st.lists(
    st.one_of(
        st.tuples(st.just("now"), _wall, st.just(0), st.just(0)),
        st.tuples(
            st.just("update"),
            _wall,
            st.integers(min_value=-1_500_000_000, max_value=1_500_000_000),
            _remote_logical,
        ),
    ),
    max_size=60,
)


@settings(max_examples=200)
@given(events=_events)
def test_invariants_over_random_interleavings(events: list[tuple[str, float, int, int]]) -> None:
    clock = HybridLogicalClock("me", max_offset_s=MAX_OFFSET_S)
    prev = clock.last
    max_wall_seen = 0
    max_remote_logical = 0
    accepted = 0
    for kind, wall_s, remote_delta_ns, remote_logical in events:
        pt = _ns(wall_s)
        if kind == "now":
            got = clock.now(wall_s)
        else:
            # Remote wall time relative to ours; sometimes ahead beyond the offset.
            remote = HLCTimestamp(pt + remote_delta_ns, remote_logical, "peer")
            if remote_delta_ns > MAX_OFFSET_NS:
                with pytest.raises(ClockSkewError):
                    clock.update(remote, wall_s)
                assert clock.last == prev
                continue
            got = clock.update(remote, wall_s)
            assert got > remote
            assert (got.wall_ns, got.logical) > (remote.wall_ns, remote.logical)
            max_remote_logical = max(max_remote_logical, remote_logical)
        accepted += 1
        max_wall_seen = max(max_wall_seen, pt)
        assert got == clock.last
        assert got.node == "me"
        assert got > prev  # strictly increasing
        assert (got.wall_ns, got.logical) > (prev.wall_ns, prev.logical)
        assert pt <= got.wall_ns <= max_wall_seen + MAX_OFFSET_NS
        # The counter grows by at most one per event beyond what a remote handed us.
        assert got.logical <= max_remote_logical + accepted
        if kind == "now" and pt > prev.wall_ns:
            assert got.logical == 0  # physical time moved on: the counter resets
        if kind == "update" and pt > max(prev.wall_ns, remote.wall_ns):
            assert got.logical == 0
        prev = got
    assert clock.logical_overflows == 0


@dataclass
class _Node:
    clock: HybridLogicalClock
    skew_s: float


@settings(max_examples=100)
@given(
    skews=st.lists(st.floats(min_value=-0.15, max_value=0.15), min_size=2, max_size=4),
    steps=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=3),  # acting node
            st.sampled_from(["local", "send", "deliver"]),
            st.floats(min_value=-0.05, max_value=0.05),  # per-event wall clock wobble
            st.floats(min_value=0.0, max_value=0.01),  # true time advance
        ),
        max_size=80,
    ),
)
def test_causality_across_nodes(
    skews: list[float], steps: list[tuple[int, str, float, float]]
) -> None:
    """Happened-before implies timestamp order, with skewed, wobbling wall clocks."""
    nodes = [_Node(HybridLogicalClock(f"n{i}"), s) for i, s in enumerate(skews)]
    in_flight: list[tuple[int, HLCTimestamp]] = []  # (destination, send timestamp)
    true_time = T0
    for actor, kind, wobble, advance in steps:
        true_time += advance
        node = nodes[actor % len(nodes)]
        wall_s = true_time + node.skew_s + wobble
        before = node.clock.last
        if kind == "local":
            got = node.clock.now(wall_s)
        elif kind == "send":
            got = node.clock.now(wall_s)
            in_flight.append(((actor + 1) % len(nodes), got))
        else:
            mine = [m for m in in_flight if m[0] == actor % len(nodes)]
            if not mine:
                continue
            in_flight.remove(mine[0])
            got = node.clock.update(mine[0][1], wall_s)
            assert got > mine[0][1]
        assert got > before
        # Skew (<= 0.2 s) stays inside the default 0.5 s offset, so no message is
        # refused, and no timestamp runs ahead of the fastest wall clock.
        assert got.wall_ns <= _ns(true_time + 0.2) + 1


def test_decoded_timestamps_share_their_node_name() -> None:
    a = HLCTimestamp(5, 1, "node-" + "7").encode()
    b = HLCTimestamp(6, 0, "node-" + "7").encode()
    da, db = HLCTimestamp.decode(a), HLCTimestamp.decode(b)
    assert da.node == db.node == "node-7"
    assert da.node is db.node
    assert (da.wall_ns, da.logical, db.wall_ns, db.logical) == (5, 1, 6, 0)


def test_timestamp_carries_no_gc_header() -> None:
    """A node keeps one stamp per copy it holds (issue #24): an ``HLCTimestamp`` holds only
    ints and a string, so it is built without the cycle collector's 16-byte header."""
    import sys

    t = HLCTimestamp(1_796_602_450_123_456_789, 3, "node-1")
    assert sys.getsizeof(t) <= 40
    assert HLCTimestamp.__struct_config__.gc is False
