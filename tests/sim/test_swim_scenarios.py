"""SWIM + Lifeguard scenarios in the deterministic simulator (issue: Foundations)."""

from __future__ import annotations

import gc
import statistics
import weakref

import pytest

from meshscale.core.membership import MembershipConfig, State, suspicion_min_timeout
from meshscale.sim.scenarios import SwimMesh
from meshscale.sim.topology import Topology


def test_100_nodes_join_through_one_seed_reach_identical_full_view() -> None:
    mesh = SwimMesh(100, seed=3, converged=False)
    ok = mesh.sim.run_until_true(mesh.converged_alive, 60.0, 0.5)
    assert ok, f"not converged by t={mesh.sim.now}"
    views = {n: mesh.view(n) for n in mesh.names}
    first = views["n0"]
    assert len(first) == 100
    assert all(v == first for v in views.values())
    assert not mesh.false_downs()


@pytest.mark.slow
def test_crash_in_1000_node_mesh_is_marked_dead_by_every_live_node() -> None:
    mesh = SwimMesh(1000, seed=5)
    mesh.sim.run_until(5.0)
    first, all_s = mesh.detect("n123", timeout=30.0)
    assert all_s < 30.0
    for n in mesh.live():
        assert mesh.node(n).state_of("n123") == State.DEAD, n
    assert first <= all_s
    assert not mesh.false_downs()


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_no_false_positive_at_5pct_loss_200_nodes_300s(seed: int) -> None:
    mesh = SwimMesh(200, seed=100 + seed, loss=0.05)
    mesh.sim.run_until(300.0)
    assert mesh.false_downs() == []
    # The loss is real: probes did fail and suspicions were raised and refuted.
    assert mesh.seen.suspects, "5% loss should cause (refuted) suspicions"
    assert all(
        mesh.node(n).state_of(x) in (State.ALIVE, State.SUSPECT) for n in mesh.names for x in mesh.names
    )
    mesh.sim.set_loss(0.0)
    assert mesh.sim.run_until_true(mesh.converged_alive, 330.0, 0.5)


def _slow_healthy_false_positives(lifeguard: bool) -> int:
    mesh = SwimMesh(100, seed=11, config=MembershipConfig(lifeguard=lifeguard))
    slow = set(mesh.names[:5])
    for n in slow:
        mesh.sim.set_slow(n, 2.0)
    mesh.sim.run_until(120.0)
    # Healthy nodes marked dead anywhere; the slow ones are failing their probes for real.
    return len({s for _, _, s in mesh.false_downs() if s not in slow})


@pytest.mark.slow
def test_lifeguard_gives_far_fewer_false_positives_with_slow_nodes() -> None:
    on_nodes = _slow_healthy_false_positives(True)
    off_nodes = _slow_healthy_false_positives(False)
    assert off_nodes >= 10, "the scenario must hurt plain SWIM, or it shows nothing"
    assert on_nodes * 5 <= off_nodes, (on_nodes, off_nodes)


def test_short_pause_refutes_and_is_never_marked_dead() -> None:
    mesh = SwimMesh(30, seed=7)
    mesh.sim.run_until(5.0)
    t_min = suspicion_min_timeout(mesh.config, 30)
    mesh.sim.pause("n4", t_min * 0.5)
    mesh.sim.run_until(40.0)
    assert not [d for d in mesh.seen.downs if d[2] == "n4"]
    assert mesh.converged_alive()


def test_long_pause_is_marked_dead_then_alive_with_higher_incarnation() -> None:
    mesh = SwimMesh(30, seed=8)
    mesh.sim.run_until(5.0)
    inc_before = mesh.node("n4").incarnation
    mesh.sim.pause("n4", 20.0)
    ok = mesh.sim.run_until_true(lambda: mesh.all_see_dead("n4"), 24.0, 0.1)
    assert ok, "a node paused for 20 s must be declared dead"
    ok = mesh.sim.run_until_true(mesh.converged_alive, 60.0, 0.2)
    assert ok, "the node must come back alive everywhere after it resumes"
    assert mesh.node("n4").incarnation > inc_before
    for n in mesh.live():
        assert mesh.node(n).members["n4"].inc == mesh.node("n4").incarnation


def test_restart_comes_back_with_same_name_and_higher_incarnation() -> None:
    mesh = SwimMesh(20, seed=9)
    mesh.sim.run_until(3.0)
    mesh.crash("n6")
    assert mesh.sim.run_until_true(lambda: mesh.all_see_dead("n6"), 30.0)
    mesh.restart("n6")
    assert mesh.sim.run_until_true(mesh.converged_alive, mesh.sim.now + 30.0, 0.2)
    inc = mesh.node("n6").incarnation
    assert inc >= 1
    assert all(mesh.node(n).members["n6"].inc == inc for n in mesh.live())


def test_partition_of_two_regions_for_30s_heals_to_one_all_alive_view() -> None:
    mesh = SwimMesh(60, seed=10)
    mesh.sim.run_until(5.0)
    side_a = [n for n in mesh.names if mesh.placements[n].region == "eu-west"]
    side_b = [n for n in mesh.names if n not in side_a]
    mesh.sim.partition(side_a, side_b)
    mesh.sim.run_until(35.0)
    # During the partition each side declared the other dead.
    assert mesh.node(side_a[0]).state_of(side_b[0]) == State.DEAD
    assert mesh.node(side_b[0]).state_of(side_a[0]) == State.DEAD
    mesh.sim.heal()
    ok = mesh.sim.run_until_true(mesh.converged_alive, 95.0, 0.5)
    assert ok, f"not healed by t={mesh.sim.now}"
    views = [mesh.view(n) for n in mesh.names]
    assert all(v == views[0] for v in views)


def _trace(seed: int) -> str:
    mesh = SwimMesh(40, seed=seed, loss=0.02)
    mesh.sim.run_until(5.0)
    mesh.crash("n3")
    mesh.sim.pause("n9", 3.0)
    mesh.sim.run_until(20.0)
    return mesh.sim.trace_hash()


def test_same_seed_same_trace_different_seed_different_trace() -> None:
    assert _trace(1) == _trace(1)
    assert _trace(1) != _trace(2)


def test_vivaldi_median_relative_error_on_five_regions() -> None:
    mesh = SwimMesh(100, seed=12, topology=Topology.five_regions())
    mesh.sim.run_until(120.0)
    err = statistics.median(mesh.vivaldi_errors())
    assert err <= 0.15, err


def test_metadata_update_reaches_every_node() -> None:
    mesh = SwimMesh(200, seed=13)
    mesh.sim.run_until(3.0)
    took = mesh.disseminate("n17")
    assert took < 10.0


def test_a_removal_reaches_every_node_and_the_removed_one_stops() -> None:
    """200 nodes, 1% loss: an operator's removal through one node is final everywhere
    within a few seconds, and the removed node, told directly, takes no further part."""
    mesh = SwimMesh(200, seed=21, loss=0.01)
    mesh.sim.run_until(5.0)
    t0 = mesh.sim.now
    mesh.remove("n42", via="n0")
    assert mesh.sim.run_until_true(lambda: mesh.all_see_removed("n42"), t0 + 10.0, 0.1)
    spread = mesh.sim.now - t0
    assert spread < 5.0, spread
    assert mesh.node("n42").removed
    mesh.sim.run_until(mesh.sim.now + 30.0)
    # Nobody was falsely declared dead meanwhile, and the removal held.
    assert not [d for d in mesh.false_downs() if d[2] != "n42"]
    assert mesh.all_see_removed("n42")


def test_a_removal_made_during_a_partition_crosses_the_heal() -> None:
    mesh = SwimMesh(60, seed=22)
    mesh.sim.run_until(5.0)
    side_a, side_b = mesh.names[:30], mesh.names[30:]
    mesh.sim.partition(side_a, side_b)
    mesh.sim.run_until(mesh.sim.now + 2.0)
    mesh.remove("n45", via="n1")  # the removed node is on the other side
    mesh.sim.run_until(mesh.sim.now + 10.0)
    assert all(mesh.node(n).state_of("n45") == State.REMOVED for n in side_a)
    assert not any(mesh.node(n).state_of("n45") == State.REMOVED for n in side_b if n != "n45")
    mesh.sim.heal()
    assert mesh.sim.run_until_true(lambda: mesh.all_see_removed("n45"), mesh.sim.now + 60, 0.5)
    assert mesh.node("n45").removed


def test_a_large_mesh_built_after_another_lets_the_first_go() -> None:
    # A mesh of 500 nodes or more freezes its objects out of the cyclic GC's sight; the
    # next mesh built, of any size, must unfreeze them before it builds anything, or
    # the first mesh (its nodes hold cycles) is never freed: a 10,000-node benchmark
    # held both of its meshes, over 6 GB.
    for size in (5, 500):
        first = SwimMesh(500, seed=1)
        gone = weakref.ref(first.sim)
        del first
        second = SwimMesh(size, seed=2, converged=size > 5)
        try:
            assert gone() is None, size
            assert second.sim.is_up("n0")
        finally:
            del second
            gc.unfreeze()
