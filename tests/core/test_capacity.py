"""core/capacity.py: the power model, energy accounting, config checks and the
consolidation rule (hysteresis, dwell, minimums, only copies, pins, same plan everywhere)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from meshscale.core.capacity import (
    CapacityConfig,
    CapacityConfigError,
    CapacityController,
    EnergyMeter,
    PeerCapacity,
    PowerModel,
    PowerState,
    TaskEnergy,
    Verdict,
    check_minimums,
    plan,
    rank_key,
    task_share_joules,
)

A, D, S, W = PowerState.ACTIVE, PowerState.DRAINING, PowerState.STANDBY, PowerState.WAKING
CFG = CapacityConfig(headroom_fraction=0.3, hysteresis_fraction=0.1, min_active_per_region=2,
                     min_active_per_zone=1, min_dwell_s=60.0, drain_confirm_s=5.0,
                     drain_step_fraction=1.0)
NOW = 1000.0


def peer(i: int, busy: float = 0.0, state: PowerState = A, *, zone: str = "",
         since: float = 0.0, **kw: object) -> PeerCapacity:
    return PeerCapacity(f"n{i}", "r", zone or f"z{i % 2}", state, since, 4.0, busy,
                        **kw)  # type: ignore[arg-type]


def mesh(busy: list[float], **kw: object) -> list[PeerCapacity]:
    return [peer(i, b, **kw) for i, b in enumerate(busy)]  # type: ignore[arg-type]


def drains(view: list[PeerCapacity], cfg: CapacityConfig = CFG, now: float = NOW) -> set[str]:
    p = plan(view, now, cfg)
    return {n for n, (v, _) in p.verdicts.items() if v is Verdict.DRAIN}


def wakes(view: list[PeerCapacity], cfg: CapacityConfig = CFG) -> list[str]:
    p = plan(view, NOW, cfg)
    return sorted(n for n, (v, _) in p.verdicts.items()
                  if v is Verdict.WAKE or (v is Verdict.SERVE and
                                           any(q.name == n and q.state is D for q in view)))


# ------------------------------------------------------------------ power and energy


def test_power_model_draw() -> None:
    m = PowerModel(idle_watts=100, peak_watts=200, standby_watts=10)
    assert m.draw_watts(A, 0.0) == 100 and m.draw_watts(A, 0.5) == 150
    assert m.draw_watts(D, 1.0) == 200 and m.draw_watts(A, 7.0) == 200
    assert m.draw_watts(S, 0.9) == 10


@pytest.mark.parametrize(("kw", "key"), [
    ({"idle_watts": 300.0, "peak_watts": 200.0}, "energy.idle_watts"),
    ({"idle_watts": -1.0}, "energy.idle_watts"),
    ({"standby_watts": -5.0}, "energy.standby_watts"),
    ({"peak_watts": float("nan")}, "energy.peak_watts"),
    ({"standby_watts": 150.0}, "energy.standby_watts"),
])
def test_bad_power_model_is_refused_naming_the_key(kw: dict[str, float], key: str) -> None:
    with pytest.raises(CapacityConfigError) as e:
        PowerModel(**kw)
    assert e.value.key == key and str(e.value).startswith(key)


def test_energy_meter_integrates_piecewise() -> None:
    m = EnergyMeter(PowerModel(100, 200, 10), started_s=0.0)
    m.advance(10.0, A, 0.5)       # 0..10 s at the initial idle draw: 1000 J
    m.advance(20.0, S, 0.0)       # 10..20 at 150 W: 1500 J
    m.advance(30.0, None, 0.0)    # 20..30 standby: 100 J; then off
    m.advance(40.0, A, 0.0)       # off: 0 J
    assert m.joules == pytest.approx(2600.0)
    assert m.by_state == pytest.approx({"active": 2500.0, "standby": 100.0, "off": 0.0})
    assert m.watts() == 100.0


def test_task_share() -> None:
    m = PowerModel(100, 200, 10)
    # Two slots of four busy: 150 W; a one-slot task holds half the busy slots.
    assert task_share_joules(m, 0.5, 1.0, 2.0, 10.0) == pytest.approx(750.0)
    assert task_share_joules(m, 0.25, 1.0, 1.0, 10.0) == pytest.approx(1250.0)
    assert task_share_joules(m, 0.5, 1.0, 0.0, 10.0) == 0.0


@pytest.mark.parametrize(("kw", "key"), [
    ({"mode": "turbo"}, "energy.mode"),
    ({"headroom_fraction": 1.5}, "energy.headroom_fraction"),
    ({"headroom_fraction": 0.6, "hysteresis_fraction": 0.5}, "energy.hysteresis_fraction"),
    ({"min_active_per_region": 0}, "energy.min_active_per_region"),
    ({"min_active_per_zone": 0}, "energy.min_active_per_zone"),
    ({"min_dwell_s": -1.0}, "energy.min_dwell_s"),
    ({"min_active_by_region": {"eu": 0}}, "energy.min_active_by_region.eu"),
    ({"drain_step_fraction": 0.0}, "energy.drain_step_fraction"),
])
def test_bad_config_is_refused_naming_the_key(kw: dict[str, object], key: str) -> None:
    with pytest.raises(CapacityConfigError) as e:
        CapacityConfig(**kw)  # type: ignore[arg-type]
    assert e.value.key == key


def test_minimum_larger_than_the_region_is_refused() -> None:
    zones = {"eu": {"eu-a": 2, "eu-b": 1}, "us": {"us-a": 5}}
    check_minimums(CapacityConfig(min_active_per_region=3), zones)
    with pytest.raises(CapacityConfigError) as e:
        check_minimums(CapacityConfig(min_active_per_region=4), zones)
    assert e.value.key == "energy.min_active_per_region" and "'eu'" in str(e.value)
    with pytest.raises(CapacityConfigError) as e:
        check_minimums(CapacityConfig(min_active_per_zone=2), zones)
    assert e.value.key == "energy.min_active_per_zone" and "eu-b" in str(e.value)
    with pytest.raises(CapacityConfigError) as e:
        check_minimums(CapacityConfig(min_active_by_region={"us": 6}), zones)
    assert e.value.key == "energy.min_active_by_region.us"
    with pytest.raises(CapacityConfigError) as e:
        check_minimums(CapacityConfig(min_active_by_region={"mars": 1}), zones)
    assert e.value.key == "energy.min_active_by_region.mars"


# ------------------------------------------------------------------ the plan


def test_idle_region_drains_lowest_ranked_down_to_headroom() -> None:
    view = mesh([1.0] * 10)  # 10 of 40 slots busy
    chosen = drains(view)
    order = [p.name for p in sorted(view, key=rank_key)]
    # The rest must keep 40% free (headroom + hysteresis): 10 / 0.6 -> 17 slots: 5 nodes.
    assert len(chosen) == 5
    assert chosen == set(order[:5])  # the ranking, not the load, picks


def test_the_emptiest_nodes_drain_first() -> None:
    """Among equally efficient nodes the ones holding the least work drain first (they
    finish their drain soonest); the fixed hash only breaks ties. Here the hash would
    pick the busiest nodes."""
    order = sorted(mesh([0.0] * 10), key=rank_key)
    busy = {p.name: (3.0 if k < 5 else 0.0) for k, p in enumerate(order)}
    busy[order[5].name] = 1.0  # 16 busy of 40 slots
    view = [peer(int(p.name[1:]), busy[p.name]) for p in order]
    chosen = drains(view)
    # The rest must keep 40% free: 16 / 0.6 -> 27 slots: 7 nodes stay, 3 drain, and
    # they are idle ones (the hash's first five are the busiest).
    assert len(chosen) == 3
    assert all(busy[n] == 0.0 for n in chosen), chosen
    # A drain under way keeps its place ahead of an emptier active node.
    view = [replace(p, state=D, since_s=NOW - 1) if p.name == order[0].name else p
            for p in view]
    chosen = drains(view)
    assert order[0].name in chosen and len(chosen) == 3


def test_hysteresis_band_neither_drains_nor_wakes() -> None:
    # 8 active nodes, 20 busy of 32 slots: 37.5% free. Draining one leaves 28 slots,
    # 29% free < 40%: no drain. 37.5% >= 30%: nothing to wake either.
    view = mesh([2.5] * 8) + [peer(8 + i, 0.0, S) for i in range(4)]
    assert drains(view) == set() and wakes(view) == []
    # Below the headroom (25% free): the highest-ranked standby wakes first, enough to
    # reach the middle of the band.
    view = mesh([3.0] * 8) + [peer(8 + i, 0.0, S) for i in range(4)]
    woken = wakes(view)
    standby = sorted((p for p in view if p.state is S), key=rank_key)
    assert woken and set(woken) == {p.name for p in standby[-len(woken):]}
    assert drains(view) == set()


def test_draining_nodes_return_before_standby_nodes_wake() -> None:
    view = [*mesh([3.5] * 6), peer(6, 0.0, D, since=NOW - 1), peer(7, 0.0, S)]
    p = plan(view, NOW, CFG)
    assert p.of("n6")[0] is Verdict.SERVE and "headroom" in p.of("n6")[1]


def test_dwell_time_blocks_a_fresh_active_node() -> None:
    view = mesh([0.0] * 6, since=NOW - 30)  # active for 30 s of 60
    assert drains(view) == set()
    assert "min_dwell_s" in plan(view, NOW, CFG).of("n0")[1]
    assert drains(mesh([0.0] * 6, since=NOW - 60))


def test_minimums_per_region_and_zone() -> None:
    cfg = CapacityConfig(min_active_per_region=3, min_active_per_zone=1, min_dwell_s=0,
                         drain_step_fraction=1.0)
    view = mesh([0.0] * 6)  # zones z0, z1; no load: only the minimums hold nodes
    assert len(drains(view, cfg)) == 3
    cfg = CapacityConfig(min_active_per_region=1, min_active_per_zone=2, min_dwell_s=0,
                         drain_step_fraction=1.0)
    kept = {p.name for p in view} - drains(view, cfg)
    assert sorted(p.zone for p in view if p.name in kept) == ["z0", "z0", "z1", "z1"]
    # A zone below its minimum (its active node crashed, left the view) wakes one there.
    view = [peer(0, 0.0, S, zone="z0"), peer(1, 0.0, S, zone="z0"), peer(2, zone="z1"),
            peer(3, zone="z1")]
    woken = wakes(view, CapacityConfig(min_active_per_zone=1))
    assert len(woken) == 1 and woken[0] in ("n0", "n1")


def test_only_copy_and_pinned_nodes_never_drain() -> None:
    view = mesh([0.0] * 6)
    everyone = drains(view, CapacityConfig(min_active_per_region=1, min_dwell_s=0,
                                           drain_step_fraction=1.0))
    victim = sorted(everyone)[0]
    i = int(victim[1:])
    for kw, word in (({"sole_copies": 2}, "only live copy"), ({"pinned": True}, "pinned")):
        v2 = [peer(j, 0.0, **(kw if j == i else {})) for j in range(6)]  # type: ignore[arg-type]
        p = plan(v2, NOW, CapacityConfig(min_active_per_region=1, min_dwell_s=0,
                                         drain_step_fraction=1.0))
        assert p.of(victim)[0] is Verdict.SERVE and word in p.of(victim)[1]
    # A standby node that must keep a copy wakes.
    v3 = [*mesh([0.0] * 3), peer(3, 0.0, S, sole_copies=1)]
    assert plan(v3, NOW, CFG).of("n3")[0] is Verdict.WAKE


def test_drain_step_bounds_new_drains_per_decision() -> None:
    cfg = CapacityConfig(min_dwell_s=0, drain_step_fraction=0.1, min_active_per_region=1)
    view = [PeerCapacity(f"n{i}", "r", f"z{i % 3}", A, 0.0, 4.0) for i in range(50)]
    assert len(drains(view, cfg)) == 5


def test_mode_off_wakes_everyone() -> None:
    view = [*mesh([0.0] * 3), peer(3, 0.0, S), peer(4, 0.0, D)]
    p = plan(view, NOW, CapacityConfig(mode="off"))
    assert p.of("n3")[0] is Verdict.WAKE and p.of("n4")[0] is Verdict.SERVE
    assert not drains(view, CapacityConfig(mode="off"))


def test_every_node_computes_the_same_plan_from_the_same_view() -> None:
    rng = random.Random(4)
    view = [PeerCapacity(f"n{i}", f"r{i % 3}", f"z{i % 7}", rng.choice((A, A, A, D, S)),
                         rng.uniform(0, 900), 4.0, rng.choice((0.0, 1.0, 3.0)),
                         pinned=rng.random() < 0.1, sole_copies=int(rng.random() < 0.1),
                         idle_watts=rng.choice((80.0, 100.0)))
            for i in range(90)]
    base = plan(view, NOW, CFG).verdicts
    for _ in range(5):
        shuffled = list(view)
        rng.shuffle(shuffled)
        assert plan(shuffled, NOW, CFG).verdicts == base
    # Controllers on every node, each fed the same view, move exactly as the plan says.
    moved = set()
    for p in view:
        if p.state is not A:
            continue
        c = CapacityController(p.name, p.region, p.zone, slots=p.slots, config=CFG,
                               now=p.since_s, pinned=p.pinned, idle_watts=p.idle_watts)
        c.local(p.busy, p.queued, p.sole_copies, NOW)
        c.update(view, NOW)
        if c.state is D:
            moved.add(p.name)
    assert moved == {n for n, (v, _) in base.items()
                     if v is Verdict.DRAIN and any(q.name == n and q.state is A for q in view)}
    assert moved


# ------------------------------------------------------------------ one node


def controller(name: str = "n0", **kw: object) -> CapacityController:
    cfg = CapacityConfig(min_dwell_s=60, drain_confirm_s=5, min_active_per_region=2,
                         min_active_per_zone=1, drain_step_fraction=1.0)
    return CapacityController(name, "r", "z0", slots=4.0, config=cfg, now=0.0,
                              **kw)  # type: ignore[arg-type]


def others(n: int = 4, state: PowerState = A, busy: float = 0.0) -> list[PeerCapacity]:
    return [PeerCapacity(f"m{i}", "r", "z0", state, 0.0, 4.0, busy) for i in range(n)]


def test_full_cycle_with_reasons() -> None:
    c = controller("n0")
    view = others()
    c.update(view, 10.0)
    assert c.state is A  # dwell
    t = 100.0
    # The least efficient node at idle ranks first to drain.
    c = controller("n0", idle_watts=500.0)
    c.update(view, t)
    assert c.state is D
    c.local(1.0, 0, 0, t + 1)
    c.update(view, t + 10)
    assert c.state is D  # still running a task
    c.local(0.0, 0, 0, t + 11)
    c.update(view, t + 12)
    assert c.state is S
    c.demand(t + 20)
    assert c.state is W
    c.ready(t + 22)
    assert c.state is A
    events = c.drain()
    assert [(e.old, e.new) for e in events] == [(A, D), (D, S), (S, W), (W, A)]
    assert all(e.reason for e in events) and events[0].at_s == t
    assert c.transitions == 4


def test_standby_waits_for_others_active_in_the_latest_view() -> None:
    c = controller("n0", idle_watts=500.0)
    view = others(2)
    c.update(view, 100.0)
    assert c.state is D
    # The only other active nodes are now draining too (seen in the next view): n0 stays
    # draining rather than leave the region below its minimum of two active.
    c.update([*others(1), PeerCapacity("m1", "r", "z0", D, 101.0, 4.0)], 110.0)
    assert c.state is not S


def test_pinned_and_sole_copy_controller() -> None:
    c = controller("n0", idle_watts=500.0, pinned=True)
    c.update(others(), 100.0)
    assert c.state is A
    c = controller("n0", idle_watts=500.0)
    c.update(others(), 100.0)
    assert c.state is D
    c.local(0.0, 0, 3, 101.0)
    assert c.state is A and "only live copy" in c.drain()[-1].reason
    c.local(0.0, 0, 0, 102.0)
    c.update(others(), 103.0)
    assert c.state is A  # back under the dwell: no flapping


def test_draining_node_returns_when_load_rises() -> None:
    c = controller("n0", idle_watts=500.0)
    c.update(others(3), 100.0)
    assert c.state is D
    c.update(others(3, busy=3.5), 101.0)
    assert c.state is A and "no longer chosen" in c.drain()[-1].reason


def test_operator_hold_sleeps_past_the_plan_and_release_wakes() -> None:
    # A node the plan would keep (low rank, dwell not over) sleeps when an operator asks,
    # once drained, and the plan does not wake it for headroom while held.
    c = controller("n0")
    assert c.hold(10.0) is None and c.state is D
    c.update(others(3), 12.0)
    assert c.state is D  # drain_confirm_s not over
    c.update(others(3), 20.0)
    assert c.state is S and "operator" in c.drain()[-1].reason
    c.update(others(3, busy=3.9), 30.0)  # the rest is short of headroom: still held
    assert c.state is S
    c.release(31.0)
    assert c.state is W
    c.ready(32.0)
    assert c.state is A and not c.held


def test_operator_hold_keeps_the_region_minimum_and_refuses_pins_and_copies() -> None:
    c = controller("n0")
    assert c.hold(10.0) is None
    c.update(others(1), 20.0)  # one other active node: below the minimum of two
    assert c.state is A and not c.held and "region minimum" in c.drain()[-1].reason
    pinned = controller("n0", pinned=True)
    assert pinned.hold(10.0) == "pinned no-standby" and pinned.state is A
    keeper = controller("n0")
    keeper.local(0.0, 0, 2, 5.0)
    assert "only live copy" in (keeper.hold(10.0) or "") and keeper.state is A


def test_demand_on_a_held_node_wakes_it_and_ends_the_hold() -> None:
    c = controller("n0")
    c.hold(10.0)
    c.update(others(3), 20.0)
    assert c.state is S
    c.demand(21.0)
    assert c.state is W and not c.held


def test_a_hold_while_waking_drains_once_awake() -> None:
    c = controller("n0")
    c.hold(10.0)
    c.update(others(3), 20.0)
    c.release(21.0)
    assert c.state is W
    assert c.hold(22.0) is None and c.state is W
    c.ready(23.0)
    c.update(others(3), 24.0)
    assert c.state is D and c.held


def test_task_energy_splits_the_draw_by_slots_over_run_time() -> None:
    e = TaskEnergy(watts=100.0, now=0.0)
    e.start("a", 1.0, 0.0)
    e.start("b", 3.0, 2.0)      # a alone for 2 s: 200 J
    e.set_watts(40.0, 4.0)      # 2 s at 100 W split 1:3: a 50 J, b 150 J
    assert e.end("a", 6.0) == pytest.approx(200 + 50 + 2 * 40 / 4)  # then 2 s at 40 W
    assert e.end("b", 8.0) == pytest.approx(150 + 2 * 40 * 3 / 4 + 2 * 40)
    assert e.end("b", 9.0) == 0.0 and len(e) == 0  # an unknown key
    # Nothing runs: nothing is charged; a task started later pays from its start.
    e.set_watts(10.0, 20.0)
    e.start("c", 2.0, 30.0)
    assert e.end("c", 31.5) == pytest.approx(15.0)
    # A bad reading counts as no draw rather than poisoning the sums.
    e.start("d", 1.0, 40.0)
    e.set_watts(float("nan"), 41.0)
    assert e.end("d", 50.0) == pytest.approx(10.0)
