"""bench/energy.py's real-half arithmetic, without a mesh: the standby node-time read
from the nodes' moves, and the ceiling a rule that followed the load exactly would reach
(whole nodes, the topology's minimum awake)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import energy


def test_standby_time_counts_only_the_day_and_the_most_asleep_at_once() -> None:
    moved = {
        # Asleep 5..15 (clipped to the day 10..100: 5 s), then 40..60 (20 s).
        "a": [(2.0, "draining"), (5.0, "standby"), (15.0, "waking"), (16.0, "active"),
              (30.0, "draining"), (40.0, "standby"), (60.0, "waking"), (61.0, "active")],
        # Asleep from 50 to past the day's end: 50 s counted.
        "b": [(45.0, "draining"), (50.0, "standby")],
        # Never asleep.
        "c": [(20.0, "draining"), (25.0, "active")],
        # Asleep 60..70, starting as a leaves: never two at once with a at 60.
        "d": [(55.0, "draining"), (60.0, "standby"), (70.0, "waking")],
    }
    total, most = energy.standby_time(moved, 10.0, 100.0)
    assert total == pytest.approx(5.0 + 20.0 + 50.0 + 10.0)
    assert most == 2  # a and b over 50..60, b and d over 60..70


def test_the_ceiling_follows_the_topology_minimum() -> None:
    # Two zones of three: two nodes awake at least; three zones of two: three.
    two = energy.ceiling_pct(240.0, 4, 2, 10.0, 2.0, 0.3)
    three = energy.ceiling_pct(240.0, 4, 3, 10.0, 2.0, 0.3)
    assert three == pytest.approx(25.9, abs=0.1)  # the 32.3% asleep of the README
    assert two == pytest.approx(32.0, abs=0.1)
    # The standby draw is what sleeping saves against: at 0 W standby a sleeping node
    # saves all of its idle draw.
    assert energy.ceiling_pct(240.0, 4, 2, 10.0, 0.0, 0.3) == pytest.approx(two / 0.8)


def test_rewatt_moves_a_run_to_other_watts() -> None:
    node = energy.PowerModel(idle_watts=10.0, peak_watts=65.0, standby_watts=2.0)
    sim = energy.PowerModel(idle_watts=100.0, peak_watts=200.0, standby_watts=10.0)
    # 100 node-s awake with 1 CPU-second-equivalent at full span (55 J), 50 s on standby.
    joules = 10.0 * 100 + 55.0 + 2.0 * 50
    assert energy.rewatt(joules, 150.0, 50.0, node, node) == pytest.approx(joules)
    assert energy.rewatt(joules, 150.0, 50.0, node, sim) == pytest.approx(
        100.0 * 100 + 100.0 + 10.0 * 50)
