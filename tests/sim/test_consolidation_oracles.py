"""The consolidation swarm's checks can fail: each is shown the bug it exists to catch (a
mutation of ``core/capacity.py`` or of what the simulator feeds it), and catches it.

- the minimum-active check, against a rule that forgets the region minimum;
- the only-copy check, against a data plane whose sole-copy count never reaches the rule;
- the pin check, against a rule that ignores ``--no-standby``;
- the starvation check, against standby nodes that never wake;
- the flapping bound, against a rule with no dwell time and no hysteresis.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshscale.core import capacity
from meshscale.sim import energy
from meshscale.sim.energy import EnergyReport, EnergyScenario, run_day

SEEDS = (1, 2)
SMALL = EnergyScenario(nodes=90)


def _problems(reports: list[EnergyReport], word: str) -> list[str]:
    return [p for r in reports for p in r.problems if word in p]


def test_a_rule_forgetting_the_region_minimum_is_caught(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sc = replace(SMALL, min_active_region_fraction=0.4, min_active_zone_fraction=0.05)
    clean = [run_day(s, sc) for s in SEEDS]
    assert not any(r.problems for r in clean), [r.problems[:2] for r in clean]
    monkeypatch.setattr(capacity.CapacityConfig, "min_region", lambda self, region: 1)
    caught = _problems([run_day(s, sc) for s in SEEDS], "awake, minimum")
    assert len(caught) >= len(SEEDS), caught[:3]


def test_a_sole_copy_count_that_never_arrives_is_caught(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sc = replace(SMALL, crashes_per_node_per_day=0.5)
    clean = [run_day(s, sc) for s in SEEDS]
    assert not any(r.problems for r in clean), [r.problems[:2] for r in clean]
    monkeypatch.setattr(energy.EnergySim, "_sole_counts", lambda self: {})
    caught = _problems([run_day(s, sc) for s in SEEDS], "only live copy")
    assert caught, "a node slept holding the only live copy and nobody noticed"


def test_a_rule_ignoring_pins_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    sc = replace(SMALL, pinned_fraction=0.2)
    clean = [run_day(s, sc) for s in SEEDS]
    assert not any(r.problems for r in clean), [r.problems[:2] for r in clean]
    original = capacity._not_eligible
    monkeypatch.setattr(capacity, "_not_eligible",
                        lambda p, now, cfg: original(replace(p, pinned=False), now, cfg))
    monkeypatch.setattr(capacity.CapacityController, "pinned", property(
        lambda self: False, lambda self, v: None), raising=False)
    caught = _problems([run_day(s, sc) for s in SEEDS], "pinned")
    assert caught


def test_standby_nodes_that_never_wake_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original = capacity.CapacityController._move

    def no_wake(self: capacity.CapacityController, new: capacity.PowerState, reason: str,
                now: float) -> None:
        if new is not capacity.PowerState.WAKING:
            original(self, new, reason, now)

    monkeypatch.setattr(capacity.CapacityController, "_move", no_wake)
    caught = _problems([run_day(s, SMALL) for s in SEEDS], "starve_bound_s")
    assert len(caught) >= len(SEEDS), caught


def test_a_rule_without_dwell_or_hysteresis_is_caught(
        monkeypatch: pytest.MonkeyPatch) -> None:
    original = capacity._not_eligible
    monkeypatch.setattr(capacity, "_not_eligible",
                        lambda p, now, cfg: original(replace(p, since_s=-1e9), now, cfg))
    sc = replace(SMALL, capacity=replace(SMALL.capacity, hysteresis_fraction=0.0,
                                         min_dwell_s=0.0))
    reports = [run_day(s, sc) for s in SEEDS]
    assert all(r.max_transitions_in_an_hour > r.flap_bound_per_h for r in reports)
    assert _problems(reports, "transitions in a modelled hour")
