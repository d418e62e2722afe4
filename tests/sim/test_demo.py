"""The simulated demo tells the story it promises: join, crash, partition, heal."""

from __future__ import annotations

import math

from meshscale.sim.demo import run_demo


def test_demo_timeline_reports_every_phase() -> None:
    results = run_demo(nodes=60, seed=2)
    assert results["join_converged_s"] < 30
    assert 0 < results["detect_first_s"] <= results["detect_all_s"] < 30
    assert math.isfinite(results["heal_converged_s"])
