"""Compute-plane scenarios in the simulator: locality, residency under faults, owner
takeover, herd avoidance against a naive least-loaded baseline, one outcome per task,
determinism. The fault swarm runs 50 fresh seeds every run (the base is printed with any
failure; ``MESHSCALE_SWARM_SEED=N`` replays); ``bench/swarm.py --plane compute`` runs more."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest

from meshscale.core.placement import Residency
from meshscale.core.scheduling import (
    GetTask,
    Load,
    Result,
    TaskFailed,
    TaskSpec,
    decode_message,
)
from meshscale.sim.compute import (
    ComputeMesh,
    ComputeReport,
    chaos_run,
    herd_run,
    naive_herd,
    stale_view,
)

SWARM_BASE = int(os.environ.get("MESHSCALE_SWARM_SEED")
                 or random.SystemRandom().randrange(2**31))
SEEDS = range(SWARM_BASE, SWARM_BASE + 50)


@pytest.fixture(scope="module")
def reports() -> list[ComputeReport]:
    print(f"compute swarm: seeds {SWARM_BASE}..{SWARM_BASE + 49} "
          f"(MESHSCALE_SWARM_SEED={SWARM_BASE} replays)")
    return [chaos_run(seed) for seed in SEEDS]


def _replay(r: ComputeReport) -> str:
    return f"seed {r.seed} (MESHSCALE_SWARM_SEED={r.seed} replays it)"


def test_residency_never_broken_over_50_seeds_with_faults(reports: list[ComputeReport]) -> None:
    for r in reports:
        assert not r.residency_violations, (_replay(r), r.residency_violations[:3], r.faults)
    # The runs did exercise faults, refusals and re-placements.
    assert sum(len(r.faults) for r in reports) > 300
    assert sum(r.refused for r in reports) > 0
    assert sum(r.stats.get("replaced", 0) for r in reports) > 0


def test_every_task_gets_exactly_one_result(reports: list[ComputeReport]) -> None:
    """Whatever happens to its owner: every acknowledged task's client observes one
    outcome (a dead or restarted owner's tasks are adopted: core/tasks.py)."""
    for r in reports:
        assert not r.result_problems, (_replay(r), r.result_problems[:5], r.faults)
        assert r.finished + r.failed + r.refused + r.unacknowledged == r.submitted, \
            (_replay(r), r)
    # Two owners at once only inside the window (a node whose stale view had the other
    # owner dead; one that saw it alive is a result problem above), and rarely: 2 and 10
    # in two runs of 1,000 seeds of bench/swarm.py, about 0.5 expected in 50.
    assert sum(r.concurrent_adoptions for r in reports) <= 5
    # Failures only when no allowed node was left (the GPU nodes down: the scheduler
    # found no node, or an adopter's resubmit was refused), never a lost result or a
    # crashed worker past its retries; and rare (11 of 6,000 on an unlucky base).
    kinds: dict[str, int] = {}
    for r in reports:
        for kind, n in r.failed_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + n
    assert set(kinds) <= {"unschedulable", "refused"}, kinds
    assert sum(kinds.values()) == sum(r.failed for r in reports)
    assert sum(r.failed for r in reports) <= sum(r.submitted for r in reports) // 100
    # Some tasks ran twice (a node thought dead finished) yet kept one result, and dead
    # or restarted owners' tasks were taken over.
    assert sum(r.reruns for r in reports) > 0
    assert sum(r.adopted for r in reports) > 0


def test_locality_rate_under_faults(reports: list[ComputeReport]) -> None:
    local = sum(r.locality[0] for r in reports)
    total = sum(r.locality[1] for r in reports)
    assert total > 1000
    # Misses only where an owner restarted or its holders died after the submit.
    assert local / total >= 0.97, (local, total)


def test_locality_without_faults_is_total() -> None:
    objects = {f"o{k}": (50_000_000, None) for k in range(12)}
    mesh = ComputeMesh(12, seed=7, objects=objects)
    sim = mesh.sim
    sim.run_until(1.5)
    for i in range(60):
        inp = mesh.objects[f"o{i % 12}"]
        sim.at(2.0 + i * 0.1, lambda i=i, inp=inp: mesh.submit(
            mesh.names[i % 12], [TaskSpec(f"t{i}", inputs=(inp,))], [0.5]))
    assert sim.run_until_true(
        lambda: len(mesh.specs) == 60 and mesh.all_done(), 60.0, 0.5)
    local, total = mesh.locality()
    assert total >= 50 and local == total
    assert all(b[0].local for b in mesh.bindings.values())


def test_refusal_at_submit_names_the_rule() -> None:
    mesh = ComputeMesh(6, seed=3)
    mesh.sim.run_until(1.0)
    why = mesh.submit("n0", [TaskSpec("t", residency=Residency(frozenset({"mars"})))])
    assert why is not None and why.startswith("residency:")
    why = mesh.submit("n0", [TaskSpec("g", labels={"gpu": "yes"})])
    assert why is not None and why.startswith("labels:")
    assert mesh.submit("n0", [TaskSpec("ok")]) is None


def test_herd_burst_from_every_node_stays_within_twice_the_fair_share() -> None:
    worst = 0.0
    for seed in range(20):
        r = herd_run(seed)
        assert r.finished == r.tasks == 96
        worst = max(worst, r.max_over_fair)
    assert worst <= 2.0, worst
    # The naive baseline on the same stale view sends everything to the cold node.
    mesh = ComputeMesh(12, seed=0)
    view = stale_view(mesh, "n5", Load(4, 4, 0.0))
    per = naive_herd(view, mesh.names, 8)
    naive = max(per.values()) / (96 / 12)
    assert naive >= 6.0 and per["n5"] == max(per.values()), per


def test_crashed_worker_tasks_are_replaced() -> None:
    mesh = ComputeMesh(6, seed=11)
    sim = mesh.sim
    sim.run_until(1.5)
    assert mesh.submit("n0", [TaskSpec(f"t{i}") for i in range(12)], [5.0] * 12) is None
    sim.run_until(2.5)
    victims = sorted({b[0].node for b in mesh.bindings.values()} - {"n0"})
    mesh.crash(victims[0], for_good=True)
    assert sim.run_until_true(mesh.all_done, 60.0, 0.5)
    assert not mesh.result_problems() and not mesh.violations
    assert not any(isinstance(e, TaskFailed) for evs in mesh.results.values() for e in evs)
    assert any(len(b) > 1 for b in mesh.bindings.values())


def test_a_runner_restarted_at_once_loses_its_tasks_at_its_next_load_exchange() -> None:
    # Restarted with no gap (a supervisor restarting the agent on the same address): no
    # check is refused and membership never sees it gone. Its new boot, in the next load
    # exchange, re-places what it ran; without that the tasks wait for run_timeout_s.
    mesh = ComputeMesh(6, seed=11)
    sim = mesh.sim
    sim.run_until(1.5)
    assert mesh.submit("n0", [TaskSpec(f"t{i}") for i in range(12)], [5.0] * 12) is None
    sim.run_until(2.5)
    victim = sorted({b[0].node for b in mesh.bindings.values()} - {"n0"})[0]
    lost = sorted(t for t, b in mesh.bindings.items() if b[-1].node == victim)
    assert lost
    mesh.restart(victim)
    timeout = mesh.config.run_timeout_s
    assert sim.run_until_true(mesh.all_done, 2.5 + timeout, 0.1), "waited for run_timeout_s"
    assert not mesh.result_problems() and not mesh.violations
    assert all(len(mesh.bindings[t]) == 2 for t in lost)
    assert mesh.node("n0").sched.stats["runners_restarted"] == 1


def test_same_seed_same_trace() -> None:
    a, b, c = chaos_run(5), chaos_run(5), chaos_run(6)
    assert a.trace_hash == b.trace_hash and a.faults == b.faults
    assert a.trace_hash != c.trace_hash
    assert herd_run(3).trace_hash == herd_run(3).trace_hash


def test_a_busy_slots_next_ask_leaves_before_the_result_as_in_the_runtime() -> None:
    # runtime/compute.py frees a run's slot (Scheduler.run_ended) as soon as the run ends,
    # so the next GetTask travels while the outcome goes to the owner; the Result follows
    # (task_finished). The simulator drives the scheduler in the same order: at the end
    # of a run on a full node with reservations queued, its GetTask is sent before the
    # Result (with task_finished alone it went after).
    mesh = ComputeMesh(3, seed=4, cpus=1.0)
    sim = mesh.sim
    sent: list[tuple[float, str, type]] = []
    for name in mesh.names:
        host = mesh.node(name).host

        def send(dst: str, payload: bytes, name: str = name,
                 inner: Callable[[str, bytes], None] = host.send) -> None:
            msg = decode_message(payload[1:], 1 << 20)  # after the sender's boot byte
            sent.append((sim.now, name, type(msg)))
            inner(dst, payload)

        host.send = send
    sim.run_until(1.5)
    assert mesh.submit("n0", [TaskSpec(f"t{i}") for i in range(12)], [1.0] * 12) is None
    assert sim.run_until_true(mesh.all_done, 60.0, 0.5)
    assert not mesh.result_problems() and not mesh.violations
    # Each (time, node) at which a node sent both a Result and a GetTask: the order.
    moments: dict[tuple[float, str], list[type]] = {}
    for t, name, kind in sent:
        if kind in (GetTask, Result):
            moments.setdefault((t, name), []).append(kind)
    both = [kinds for kinds in moments.values() if GetTask in kinds and Result in kinds]
    assert len(both) >= 3, moments
    assert all(kinds.index(GetTask) < kinds.index(Result) for kinds in both), both
