"""The gossip replay window (trust/replay.py)."""

from __future__ import annotations

import random

import pytest

from meshscale.trust.replay import FRESHNESS_BYTES, ReplayConfig, ReplayGuard


def test_each_datagram_is_accepted_once() -> None:
    tx, rx = ReplayGuard(b"A" * 8), ReplayGuard(b"B" * 8)
    sent = [tx.stamp(f"m{i}".encode(), 1000.0) for i in range(200)]
    for i, d in enumerate(sent):
        assert rx.check(d, 1000.5) == (f"m{i}".encode(), "")
    for d in sent[-64:]:
        assert rx.check(d, 1001.0) == (None, "replay")
    assert rx.check(sent[0], 1001.0) == (None, "replay")  # far below the window


def test_reordering_within_the_window_passes() -> None:
    tx, rx = ReplayGuard(b"A" * 8), ReplayGuard(b"B" * 8)
    sent = [tx.stamp(b"x", 50.0) for _ in range(64)]
    order = list(range(64))
    random.Random(3).shuffle(order)
    assert all(rx.check(sent[i], 50.0)[0] == b"x" for i in order)
    assert all(rx.check(sent[i], 50.0)[1] == "replay" for i in order)


@pytest.mark.parametrize("skew", [-61.0, 61.0, 10_000.0])
def test_a_datagram_outside_the_time_window_is_stale(skew: float) -> None:
    tx, rx = ReplayGuard(b"A" * 8), ReplayGuard(b"B" * 8, ReplayConfig(window_s=60))
    d = tx.stamp(b"x", 1000.0)
    assert rx.check(d, 1000.0 + skew) == (None, "stale")
    assert rx.check(b"short", 1000.0) == (None, "short")
    assert len(d) == 1 + FRESHNESS_BYTES


def test_eviction_cannot_be_used_to_replay() -> None:
    """With the sender's window forgotten, its old datagram is still refused once older
    than the time window."""
    tx, rx = ReplayGuard(b"A" * 8), ReplayGuard(b"B" * 8, ReplayConfig(max_senders=2))
    old = tx.stamp(b"old", 0.0)
    assert rx.check(old, 0.0)[0] == b"old"
    for i in range(3):  # three other senders push the first one out
        rx.check(ReplayGuard(bytes([i]) * 8).stamp(b"y", 0.0), 0.0)
    assert rx.check(old, 61.0) == (None, "stale")
