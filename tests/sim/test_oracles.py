"""The simulator's checks can fail: each is shown a bug it exists to catch (a mutation of
the code under test), and catches it. A check that agrees with whatever the code does is
worse than none.

- the compute swarm's residency oracle, against a scheduler that ignores residency;
- its locality figure, against a scheduler that ignores where the inputs are;
- the data-plane swarm's residency check, against replica placement that ignores the rule.
"""

from __future__ import annotations

import pytest

from meshscale.core import placement, scheduling
from meshscale.sim.compute import ComputeReport
from meshscale.sim.compute import chaos_run as compute_chaos
from meshscale.sim.dataplane import chaos_run as data_chaos

SEEDS = range(8)


def test_a_scheduler_ignoring_residency_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    clean = [compute_chaos(s) for s in SEEDS]
    assert not any(r.residency_violations for r in clean)
    monkeypatch.setattr(scheduling, "_in_residency", lambda res: lambda node: True)
    broken = [compute_chaos(s) for s in SEEDS]
    caught = [r.seed for r in broken if r.residency_violations]
    assert len(caught) >= len(SEEDS) // 2, caught
    assert "residency" in broken[caught[0]].residency_violations[0]


def test_a_scheduler_ignoring_locality_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def rate(reports: list[ComputeReport]) -> float:
        local = sum(r.locality[0] for r in reports)
        total = sum(r.locality[1] for r in reports)
        return local / total

    clean = rate([compute_chaos(s) for s in SEEDS])
    assert clean >= 0.97
    # Blind to where inputs are: no holders to wait for, no transfer cost to weigh.
    monkeypatch.setattr(scheduling, "local_bytes", lambda task, node: 0)
    monkeypatch.setattr(scheduling, "_holders", lambda task, view: frozenset())
    assert rate([compute_chaos(s) for s in SEEDS]) < 0.9  # the suite's bound is 0.97


def test_placement_outside_the_rule_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original = placement.replica_set

    def anywhere(oid: str, view: list[placement.Candidate], replicas: int,
                 residency: placement.Residency | None = None) -> list[placement.Candidate]:
        return original(oid, view, replicas, None)

    # Every module that placed replicas through the name sees the broken one.
    import meshscale.core.replication as replication
    import meshscale.sim.dataplane as sim_dataplane

    for mod in (placement, replication, sim_dataplane):
        if hasattr(mod, "replica_set"):
            monkeypatch.setattr(mod, "replica_set", anywhere)
    # Caught by the swarm's residency check, or earlier by the invariant the replication
    # code asserts before it hands out a transfer: either way the run cannot pass.
    caught = 0
    for seed in (1, 2, 3):
        try:
            r = data_chaos(seed)
        except AssertionError as e:
            assert "residency" in str(e)
            caught += 1
        else:
            caught += bool(r.residency_violations)
    assert caught == 3
