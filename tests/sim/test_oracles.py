"""The simulator's checks can fail: each is shown a bug it exists to catch (a mutation of
the code under test), and catches it. A check that agrees with whatever the code does is
worse than none.

- the compute swarm's residency oracle, against a scheduler that ignores residency;
- its locality figure, against a scheduler that ignores where the inputs are;
- the data-plane swarm's residency check, against replica placement that ignores the rule;
- the compute swarm's outcome check, against an owner that drops a task's outcome, and
  against nodes that never take over a dead owner's tasks (the simulator before
  ``core/tasks.py`` called those tasks "orphaned" and did not count them);
- the membership benchmark's false-positive counts, against a node that declares a
  suspected member dead at once (no suspicion timeout, no time to refute) and against
  members that never refute.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import meshscale.sim.compute as sim_compute
from meshscale.core import membership, placement, scheduling, tasks
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
    # And the Placer the replication manager places its copies with.
    placer_rs, placer_ws = placement.Placer.replica_set, placement.Placer.write_set

    def placer_anywhere_rs(self: placement.Placer, oid: str, replicas: int,
                           residency: placement.Residency | None = None) -> tuple[str, ...]:
        return placer_rs(self, oid, replicas, None)

    def placer_anywhere_ws(self: placement.Placer, oid: str, replicas: int,
                           residency: placement.Residency | None = None) -> tuple[str, ...]:
        return placer_ws(self, oid, replicas, None)

    monkeypatch.setattr(placement.Placer, "replica_set", placer_anywhere_rs)
    monkeypatch.setattr(placement.Placer, "write_set", placer_anywhere_ws)
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


def test_an_owner_dropping_a_task_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    clean = [compute_chaos(s) for s in SEEDS]
    assert not any(r.result_problems for r in clean)
    original = tasks.TaskBook.finish

    def drop_some(self: tasks.TaskBook, e: tasks.Entry, state: tasks.TaskState,
                  now: float, **kw: object) -> tasks.TaskRecord:
        if e.rec.task_id.endswith("7"):  # every tenth task's end is dropped by its owner
            return e.rec
        return original(self, e, state, now, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(tasks.TaskBook, "finish", drop_some)
    broken = [compute_chaos(s) for s in SEEDS]
    caught = [r.seed for r in broken if r.result_problems]
    assert caught == list(SEEDS), caught
    assert "no outcome observed" in broken[0].result_problems[0]


def test_no_takeover_of_a_dead_owner_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes that only ever point the client at the task's owner, dead or not."""
    def owner_only(rec: tasks.TaskRecord, me: str, alive: object, *,
                   forwarded: bool = False) -> tasks.Lookup:
        if rec.state in tasks.TERMINAL:
            return tasks.Lookup(tasks.LookupAction.ANSWER)
        return tasks.Lookup(tasks.LookupAction.ASK_OWNER, rec.owner)

    monkeypatch.setattr(sim_compute, "lookup", owner_only)
    broken = [compute_chaos(s) for s in SEEDS]
    caught = [r.seed for r in broken if r.result_problems]
    assert len(caught) >= len(SEEDS) // 2, caught
    assert all(r.adopted == 0 for r in broken)


def test_adopting_from_a_live_owner_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes that take a task over without asking its owner, alive or not."""
    def grab(rec: tasks.TaskRecord, me: str, alive: object, *,
             forwarded: bool = False) -> tasks.Lookup:
        if rec.state in tasks.TERMINAL:
            return tasks.Lookup(tasks.LookupAction.ANSWER)
        return tasks.Lookup(tasks.LookupAction.ADOPT)

    monkeypatch.setattr(sim_compute, "lookup", grab)
    broken = [compute_chaos(s) for s in SEEDS]
    caught = [p for r in broken for p in r.result_problems if "while it saw" in p]
    assert len(caught) >= len(SEEDS), caught[:3]


# ---------------------------------------------------------------- membership: false MemberDown

BENCH = Path(__file__).resolve().parents[2] / "bench" / "membership.py"
FP_KEYS = ("false_positives_loss5", "false_transitions_loss5", "wrong_views_after_loss5",
           "false_positives_slow", "false_transitions_healthy_slow")


def _membership_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_membership", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _false_positives(tmp_path: Path, seed: int) -> dict[str, Any]:
    """The benchmark's --quick run in this process (so a patch applies): 40 nodes, about
    a second. Seeds 2 and 3 raise suspicions in the 5%-loss scenario at this size."""
    out = tmp_path / f"m{seed}.json"
    assert _membership_bench().main(
        ["--nodes", "40", "--seed", str(seed), "--quick", "--skip-slow-off",
         "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    return {k: data[k] for k in FP_KEYS}


@pytest.mark.parametrize("seed", [2, 3])
def test_a_suspect_declared_dead_at_once_is_caught(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, seed: int) -> None:
    assert _false_positives(tmp_path, seed) == dict.fromkeys(FP_KEYS, 0)
    original = membership.Membership._on_suspect

    def hasty(self: membership.Membership, msg: membership.Suspect, now: float) -> None:
        original(self, msg, now)
        m = self.members.get(msg.node)
        if msg.node != self.name and m is not None and m.state == membership.State.SUSPECT:
            self._on_dead(membership.Dead(m.name, m.inc, self.name), now)

    monkeypatch.setattr(membership.Membership, "_on_suspect", hasty)
    broken = _false_positives(tmp_path, seed)
    assert broken["false_positives_loss5"] > 0, broken
    assert broken["false_transitions_loss5"] >= broken["false_positives_loss5"], broken
    assert broken["false_positives_slow"] > 0, broken  # healthy nodes, among slow ones


@pytest.mark.parametrize("seed", [2, 3])
def test_members_that_never_refute_are_caught(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, seed: int) -> None:
    assert _false_positives(tmp_path, seed) == dict.fromkeys(FP_KEYS, 0)
    monkeypatch.setattr(membership.Membership, "_refute",
                        lambda self, inc, now: None)
    broken = _false_positives(tmp_path, seed)
    assert broken["false_positives_loss5"] > 0, broken
    # Nor do the views heal once the loss stops: the dead never come back.
    assert broken["wrong_views_after_loss5"] > 0, broken
    assert broken["false_positives_slow"] > 0, broken
