"""Energy benchmark, the simulator half: one compressed diurnal day, spread against
consolidated, on a simulated mesh.

    python bench/energy.py [--quick] [--nodes 1000] [--seeds 50] [--seed 1] --json PATH

Each seed runs the same day twice (``sim/energy.py``): consolidation off (every node
active: spread) and on (``core/capacity.py`` on every node), with the same load curve
(trough 10% of the slots at midnight, peak 80% at noon, 24 modelled hours in 1,440
virtual seconds), the same crashes and the same power model (idle 100 W, peak 200 W,
standby 10 W: an idle node draws half its peak). Energy is the model's, integrated over
the day; latency is a task's submit to its end (queue, any wake and its run); both are
means over seeds of each seed's figure. The consolidated runs are checked by the
simulator's oracles (minimums, starvation, only copies, flapping): ``oracle_problems``
counts what they found.

Keys: ``sim_energy_spread_kwh``, ``sim_energy_consolidated_kwh``, ``sim_saving_pct``,
``sim_p99_spread_ms``, ``sim_p99_consolidated_ms``, ``transitions_per_node_per_h`` (mean
over nodes, per modelled hour) and the extras in KEYS.

The real half (``real_*`` keys, ``wake_s``): a 6-node local mesh of real processes (one
region of ``--real-zones`` zones, default 3: three zones of two nodes; ``--real-zones 2``:
two zones of three, a two-availability-zone site, where one of two full runs collapsed
(see the README); ``--real-cpus`` worker slots each,
default 4 as in the simulator) runs the simulator's load curve (``DiurnalLoad``: trough
10% of the slots at midnight, peak 80% at noon) compressed into ``--real-day-s`` seconds,
after a quarter day of the evening before that is run but not measured (as the
simulator's warm-up), twice: ``--energy-mode off`` (spread) and ``consolidate`` (the
simulator's headroom 0.3 and hysteresis 0.05; the node defaults' minimums, two active
nodes per region and one per zone; dwell ``--real-dwell-s``, default 5 s). A task sleeps
``--real-task-s`` (it holds a slot, not a CPU). The minimums set a ceiling: with two
zones at least two nodes stay awake, with three zones three (one per zone), and a rule
that followed the load exactly (in whole nodes, 30% of the slots free) would sleep 40.0%
or 32.3% of the node-time over this day: ``real_ceiling_pct`` is that rule's saving at
the runs' watts, ``real_standby_share`` the share the consolidated run slept (from the
nodes' logged moves) and ``real_max_standby`` the most nodes asleep at once.
Energy is the sum over the nodes of ``node.energy``'s ``joules_total`` over the day,
**from the power model** (``--power-source model`` with the node's default watts, passed
explicitly: 10 W idle, 65 W peak at the node processes' CPU share, 2 W on standby), not a
meter: nodes sharing one machine cannot each read their own RAPL figure. Not the
simulator's watts (100, 200, 10): the simulator charges a busy slot at its share of peak,
here a task that sleeps uses no CPU, so the real joules are nearly all idle draw and the
same watts would not make the two halves alike. Latency is a task's submit to its end
(the task returns its end time). ``wake_s`` is the longest time any node took from a wake (a task's arrival or
the plan) to its workers up, read from the nodes' ``capacity_awake`` log lines; the task
that woke a node waits exactly that long before it starts. ``--no-real`` skips this half,
``--real-only`` the simulator's.

``--quick``: 150 nodes, 3 seeds (for tests); a 40 s real day. ``--jobs N`` runs seeds in
N processes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from meshscale.core.capacity import PowerModel
from meshscale.sim.energy import EnergyReport, EnergyScenario, run_day

REAL_KEYS = (
    "real_energy_spread_j",
    "real_energy_consolidated_j",
    "real_saving_pct",
    "real_p99_spread_ms",
    "real_p99_consolidated_ms",
    "real_tasks",
    "real_day_s",
    "wake_s",
    "real_wakes",
    "real_transitions",
    "real_zones",
    "real_standby_share",
    "real_max_standby",
    "real_saving_pct_sim_watts",
    "real_ceiling_pct",
)
REAL_NODES = 6
REAL_ZONES = 3
"""Zones of the real mesh's one region (``--real-zones``); see the module docstring."""
REAL_MIN_REGION = 2
"""``energy_min_active_per_region`` of the consolidated run: the node default."""
REAL_MIN_ZONE = 1
"""``energy_min_active_per_zone``: the node default."""
REAL_WARMUP_FRACTION = 0.25
"""Of the real day: the evening before, run and not measured (as the simulator's)."""

KEYS = (
    "nodes",
    "seeds",
    "mean_load",
    "sim_energy_spread_kwh",
    "sim_energy_consolidated_kwh",
    "sim_saving_pct",
    "sim_p99_spread_ms",
    "sim_p99_consolidated_ms",
    "sim_wait_p99_spread_ms",
    "sim_wait_p99_consolidated_ms",
    "transitions_per_node_per_h",
    "max_transitions_in_an_hour",
    "flap_bound_per_h",
    "mean_awake_fraction",
    "oracle_problems",
    "wall_s",
)


def _pair(args: tuple[int, int]) -> tuple[EnergyReport, EnergyReport]:
    nodes, seed = args
    spread = run_day(seed, EnergyScenario(nodes=nodes, consolidate=False))
    cons = run_day(seed, EnergyScenario(nodes=nodes, consolidate=True))
    return spread, cons


def real_power() -> PowerModel:
    """The real runs' power model: the node's default (``runtime/config.py``), passed
    explicitly so the ceiling below is computed with the same watts."""
    from meshscale.runtime.config import PowerConfig

    return PowerConfig().model


def _sleep_task(seconds: float) -> float:
    import time as t

    t.sleep(seconds)
    return t.time()


def _real_run(consolidate: bool, day_s: float, task_s: float, seed: int, cpus: int,
              dwell_s: float, zones: int) -> dict[str, float]:
    """One compressed day on a fresh 6-node mesh; energy (J), p99 (ms), tasks, wakes."""
    import tempfile

    # Kept when the run fails (its node logs say why), removed when it succeeds.
    d = tempfile.mkdtemp(prefix="bench-energy-")
    try:
        out = _real_run_in(Path(d), consolidate, day_s, task_s, seed, cpus, dwell_s, zones)
    except BaseException:
        print(f"the real run failed; its mesh and node logs are kept in {d}",
              file=sys.stderr)
        raise
    shutil.rmtree(d, ignore_errors=True)
    return out


def _real_run_in(d: Path, consolidate: bool, day_s: float, task_s: float, seed: int,
                 cpus: int, dwell_s: float, zones: int) -> dict[str, float]:
    import asyncio
    import random

    import meshscale
    from meshscale.client.rpc import RpcConnection
    from meshscale.runtime.launcher import LocalMesh

    cap = EnergyScenario().capacity  # the simulator's headroom and hysteresis
    energy: dict[str, object] = (
        {"energy_mode": "consolidate", "energy_min_active_per_region": REAL_MIN_REGION,
         "energy_min_active_per_zone": REAL_MIN_ZONE,
         "energy_headroom_fraction": cap.headroom_fraction,
         "energy_hysteresis_fraction": cap.hysteresis_fraction,
         "energy_min_dwell_s": float(dwell_s), "energy_drain_confirm_s": 2.0,
         "energy_interval_s": 0.5} if consolidate else {"energy_mode": "off"})
    curve = replace(EnergyScenario().load, day_s=day_s)  # the simulator's day, compressed
    warm_s = day_s * REAL_WARMUP_FRACTION
    model = real_power()
    node_settings = {"cpus": cpus, "power_source": "model", "idle_watts": model.idle_watts,
                     "peak_watts": model.peak_watts, "standby_watts": model.standby_watts,
                     **energy}
    rng = random.Random(seed)

    async def joules(mesh: LocalMesh) -> float:
        total = 0.0
        for n in mesh.nodes:
            c = RpcConnection(n.address, mesh.credentials(), 10)
            try:
                total += float((await c.call("node.energy"))["joules_total"])
            finally:
                await c.close()
        return total

    with LocalMesh(d, REAL_NODES, regions=["eu-west"], node_settings=node_settings,
                   http=False, zones_per_region=zones) as mesh:
        client = meshscale.connect(mesh.nodes[0].address, bundle=mesh.bundle_path,
                                   timeout=120)
        try:
            # Warm up (functions cached, views settled) at the trough's rate.
            for f in [client.submit(_sleep_task, 0.01) for _ in range(REAL_NODES)]:
                f.result(timeout=120)
            time.sleep(5.0)
            # The evening before (warm_s, not measured), then the day from midnight.
            start = time.time() + warm_s
            j0 = -1.0
            subs: list[tuple[float, object]] = []
            warm: list[object] = []
            owed = 0.0
            tick = 0.25
            while (now := time.time()) < start + day_s:
                if j0 < 0 and now >= start:
                    j0 = asyncio.run(joules(mesh))
                load = curve.at(now - start)
                owed += load * REAL_NODES * cpus / task_s * tick
                n = int(owed)
                if rng.random() < owed - n:
                    n += 1
                owed -= n
                for _ in range(n):
                    fut = client.submit(_sleep_task, task_s)
                    if now >= start:
                        subs.append((time.time(), fut))
                    else:
                        warm.append(fut)
                time.sleep(max(0.0, tick - (time.time() - now)))
            for fut in warm:
                fut.result(timeout=300)  # type: ignore[attr-defined]
            lat = []
            for t_sub, fut in subs:
                end = fut.result(timeout=300)  # type: ignore[attr-defined]
                lat.append((end - t_sub) * 1000.0)
            j1 = asyncio.run(joules(mesh))
            end = time.time()
        finally:
            client.close()
        wakes: list[float] = []
        moves = 0
        # Each node's (time, new state) moves, to measure its standby time over the day.
        moved: dict[str, list[tuple[float, str]]] = {}
        for n in mesh.nodes:
            assert n.log_path is not None
            mine = moved.setdefault(n.name, [])
            for line in n.log_path.read_text(errors="replace").splitlines():
                if '"capacity' not in line:
                    continue
                try:
                    with_fields = json.loads(line)
                except json.JSONDecodeError:
                    # A worker's stderr shares the log: a line of its can cut into
                    # one of the agent's. Not counted (none was in runs that woke well).
                    continue
                if with_fields.get("event") == "capacity_awake":
                    wakes.append(float(with_fields["wake_s"]))
                elif with_fields.get("event") == "capacity":
                    moves += 1
                    mine.append((float(with_fields["ts"]), str(with_fields["new"])))
    standby_s, max_standby = standby_time(moved, start, end)
    lat.sort()
    p99 = lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)]
    return {"joules": j1 - j0, "p99_ms": p99, "tasks": float(len(lat)),
            "wake_s": max(wakes, default=0.0), "wakes": float(len(wakes)),
            "transitions": float(moves),
            "standby_s": standby_s, "node_s": len(moved) * (end - start),
            "standby_share": standby_s / (len(moved) * (end - start)),
            "max_standby": float(max_standby)}


def standby_time(moved: dict[str, list[tuple[float, str]]], start: float, end: float
                 ) -> tuple[float, int]:
    """Node-seconds on standby within [start, end] and the most nodes on standby at once
    then, from each node's (time, new state) moves (every node starts active)."""
    total = 0.0
    edges: list[tuple[float, int]] = []
    for moves in moved.values():
        since: float | None = None
        for ts, new in [*sorted(moves), (math.inf, "end")]:
            if since is not None and new != "standby":
                a, b = max(since, start), min(ts, end)
                if b > a:
                    total += b - a
                    edges += [(a, 1), (b, -1)]
                since = None
            elif new == "standby" and since is None:
                since = ts
    most = now = 0
    for _, step in sorted(edges):  # at a tie, -1 sorts first: no false overlap
        now += step
        most = max(most, now)
    return total, most


def rewatt(joules: float, node_s: float, standby_s: float, model: PowerModel,
           other: PowerModel) -> float:
    """What a run's ``joules`` (under ``model``) would have been under ``other``'s watts:
    the awake node-seconds at idle plus the CPU part (``model``'s joules less its idle and
    standby parts, rescaled by the two models' peak-idle spans) plus the standby
    node-seconds. Derived from the same run, not measured: the meters tick once a second
    at the state they are in then, the moves are logged to the instant."""
    awake_s = node_s - standby_s
    cpu = joules - model.idle_watts * awake_s - model.standby_watts * standby_s
    span = model.peak_watts - model.idle_watts
    scale = (other.peak_watts - other.idle_watts) / span if span > 0 else 0.0
    return other.idle_watts * awake_s + cpu * scale + other.standby_watts * standby_s


def ceiling_pct(day_s: float, cpus: int, zones: int, idle_watts: float,
                standby_watts: float, headroom: float) -> float:
    """The saving of a rule that followed the day's load exactly (``ceiling_share``), all
    nodes at idle draw (tasks that sleep use no CPU; the agents' own CPU is left out)."""
    share = ceiling_share(day_s, cpus, zones, headroom)
    return 100.0 * share * (idle_watts - standby_watts) / idle_watts


def ceiling_share(day_s: float, cpus: int, zones: int, headroom: float) -> float:
    """The share of the node-time a rule that followed the day's load exactly would sleep,
    in whole nodes: at every moment just enough nodes awake for ``headroom`` of the slots
    free (at least the minimums: ``zones`` x one per zone, two per region), the rest on
    standby."""
    curve = replace(EnergyScenario().load, day_s=day_s)
    floor = max(REAL_MIN_REGION, zones * REAL_MIN_ZONE)
    steps = 20000
    asleep = 0.0
    for i in range(steps):
        demand = curve.at(day_s * (i + 0.5) / steps) * REAL_NODES * cpus
        awake = max(floor, math.ceil(demand / (cpus * (1.0 - headroom)) - 1e-9))
        asleep += REAL_NODES - min(REAL_NODES, awake)
    return asleep / (steps * REAL_NODES)


def real_half(day_s: float, task_s: float, seed: int, cpus: int, dwell_s: float,
              zones: int = REAL_ZONES) -> dict[str, float]:
    spread = _real_run(False, day_s, task_s, seed, cpus, dwell_s, zones)
    cons = _real_run(True, day_s, task_s, seed, cpus, dwell_s, zones)
    model = real_power()
    sim = EnergyScenario().power
    at_sim = [rewatt(r["joules"], r["node_s"], r["standby_s"], model, sim)
              for r in (spread, cons)]
    return {
        "real_energy_spread_j": spread["joules"],
        "real_energy_consolidated_j": cons["joules"],
        "real_saving_pct": 100.0 * (1.0 - cons["joules"] / spread["joules"]),
        "real_p99_spread_ms": spread["p99_ms"],
        "real_p99_consolidated_ms": cons["p99_ms"],
        "real_tasks": spread["tasks"] + cons["tasks"],
        "real_day_s": day_s,
        "wake_s": cons["wake_s"],
        "real_wakes": cons["wakes"],
        "real_transitions": cons["transitions"],
        "real_zones": float(zones),
        "real_standby_share": cons["standby_share"],
        "real_max_standby": cons["max_standby"],
        "real_saving_pct_sim_watts": 100.0 * (1.0 - at_sim[1] / at_sim[0]),
        "real_ceiling_pct": ceiling_pct(day_s, cpus, zones, model.idle_watts,
                                        model.standby_watts,
                                        EnergyScenario().capacity.headroom_fraction),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1, help="first seed")
    ap.add_argument("--quick", action="store_true", help="150 nodes, 3 seeds; a 40 s "
                    "real day")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--no-real", action="store_true", help="skip the real 6-node mesh")
    ap.add_argument("--real-only", action="store_true", help="skip the simulator")
    ap.add_argument("--real-day-s", type=float, default=None,
                    help="the real day's length (default 240 s, 40 with --quick)")
    ap.add_argument("--real-task-s", type=float, default=1.0)
    ap.add_argument("--real-cpus", type=int, default=4, help="worker slots per node "
                    "(default 4, the simulator's)")
    ap.add_argument("--real-dwell-s", type=float, default=5.0,
                    help="--energy-min-dwell-s of the consolidated run")
    ap.add_argument("--real-zones", type=int, default=REAL_ZONES,
                    help=f"zones of the real mesh's one region (default {REAL_ZONES}: three "
                         "zones of two nodes, where the one-per-zone minimum keeps three "
                         "awake; 2: two zones of three, two awake at least)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if args.no_real and args.real_only:
        ap.error("--no-real and --real-only leave nothing to run")
    nodes = args.nodes or (150 if args.quick else 1000)
    seeds = args.seeds or (3 if args.quick else 50)
    if nodes < 30:
        ap.error("--nodes must be at least 30")
    day_s = args.real_day_s or (40.0 if args.quick else 240.0)
    if not (10.0 <= day_s <= 86400.0) or not (0.01 <= args.real_task_s <= 60.0):
        ap.error("--real-day-s must be in 10..86400 and --real-task-s in 0.01..60")
    res: dict[str, float | int] = {}
    rows: list[tuple[str, str, str]] = []
    problems: list[str] = []
    keys: list[str] = []
    if not args.real_only:
        sim, rows, problems = sim_half(args.seed, nodes, seeds, args.jobs)
        res.update(sim)
        keys += KEYS
    if not args.no_real:
        t0 = time.perf_counter()
        if not (1 <= args.real_cpus <= 16) or not (0 <= args.real_dwell_s <= 3600):
            ap.error("--real-cpus must be in 1..16 and --real-dwell-s in 0..3600")
        if not 1 <= args.real_zones <= REAL_NODES // REAL_MIN_REGION:
            ap.error(f"--real-zones must be in 1..{REAL_NODES // REAL_MIN_REGION}")
        real = real_half(day_s, args.real_task_s, args.seed, args.real_cpus,
                         args.real_dwell_s, args.real_zones)
        res.update(real)
        keys += REAL_KEYS
        ratio = real["real_p99_consolidated_ms"] / real["real_p99_spread_ms"]
        headroom = EnergyScenario().capacity.headroom_fraction
        rows += [
            ("real_day_s", f"{day_s:.0f}", f"{REAL_NODES} node processes x "
                                           f"{args.real_cpus} slots, dwell "
                                           f"{args.real_dwell_s:g} s, model joules "
                                           "(not a meter)"),
            ("real_zones", f"{args.real_zones}",
             f"one region, {args.real_zones} zone(s) of "
             f"{REAL_NODES // args.real_zones}; at least "
             f"{max(REAL_MIN_REGION, args.real_zones * REAL_MIN_ZONE)} awake"),
            ("real_energy_spread_j", f"{real['real_energy_spread_j']:.0f}",
             "energy_mode off"),
            ("real_energy_consolidated_j", f"{real['real_energy_consolidated_j']:.0f}",
             "energy_mode consolidate"),
            ("real_saving_pct", f"{real['real_saving_pct']:.1f}", "target >= 30"),
            ("real_p99_spread_ms", f"{real['real_p99_spread_ms']:.0f}", "submit -> end"),
            ("real_p99_consolidated_ms", f"{real['real_p99_consolidated_ms']:.0f}",
             f"{ratio:.3f}x spread (target <= 1.1x)"),
            ("real_tasks", f"{real['real_tasks']:.0f}", "both runs"),
            ("wake_s", f"{real['wake_s']:.3f}", "longest wake to workers up (target <= 2)"),
            ("real_wakes", f"{real['real_wakes']:.0f}", "consolidated run"),
            ("real_transitions", f"{real['real_transitions']:.0f}", "consolidated run"),
            ("real_standby_share", f"{real['real_standby_share']:.3f}",
             "of the node-time on standby (nodes' logs); exact rule: "
             f"{ceiling_share(day_s, args.real_cpus, args.real_zones, headroom):.3f}"),
            ("real_max_standby", f"{real['real_max_standby']:.0f}",
             "most nodes on standby at once"),
            ("real_saving_pct_sim_watts", f"{real['real_saving_pct_sim_watts']:.1f}",
             "derived: the same runs at the simulator's 100/200/10 W"),
            ("real_ceiling_pct", f"{real['real_ceiling_pct']:.1f}",
             "saving of a rule following the load exactly (whole nodes, 30% free)"),
            ("real_wall_s", f"{time.perf_counter() - t0:.1f}", ""),
        ]
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  {'value':>12}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")
    for p in problems[:10]:
        print("problem:", p)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({k: res[k] for k in keys}, indent=2) + "\n")
    return 0


def sim_half(first_seed: int, nodes: int, seeds: int, jobs: int
             ) -> tuple[dict[str, float | int], list[tuple[str, str, str]], list[str]]:
    t0 = time.perf_counter()
    work = [(nodes, first_seed + i) for i in range(seeds)]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            pairs = list(pool.map(_pair, work))
    else:
        pairs = [_pair(w) for w in work]
    spread = [p[0] for p in pairs]
    cons = [p[1] for p in pairs]
    e_spread = statistics.mean(r.energy_kwh for r in spread)
    e_cons = statistics.mean(r.energy_kwh for r in cons)
    problems = [f"seed {r.seed}: {p}" for r in cons for p in r.problems]
    res: dict[str, float | int] = {
        "nodes": nodes,
        "seeds": seeds,
        "mean_load": EnergyScenario().load.mean(),
        "sim_energy_spread_kwh": e_spread,
        "sim_energy_consolidated_kwh": e_cons,
        "sim_saving_pct": 100.0 * (1.0 - e_cons / e_spread),
        "sim_p99_spread_ms": statistics.mean(r.p99_ms for r in spread),
        "sim_p99_consolidated_ms": statistics.mean(r.p99_ms for r in cons),
        "sim_wait_p99_spread_ms": statistics.mean(r.wait_p99_ms for r in spread),
        "sim_wait_p99_consolidated_ms": statistics.mean(r.wait_p99_ms for r in cons),
        "transitions_per_node_per_h": statistics.mean(
            r.transitions_per_node_per_h for r in cons),
        "max_transitions_in_an_hour": max(r.max_transitions_in_an_hour for r in cons),
        "flap_bound_per_h": cons[0].flap_bound_per_h,
        "mean_awake_fraction": statistics.mean(r.mean_awake_fraction for r in cons),
        "oracle_problems": len(problems),
        "wall_s": time.perf_counter() - t0,
    }
    assert set(res) == set(KEYS), set(res) ^ set(KEYS)
    ratio = res["sim_p99_consolidated_ms"] / res["sim_p99_spread_ms"]
    rows = [
        ("nodes x seeds", f"{nodes} x {seeds}", f"seeds {first_seed}..{first_seed + seeds - 1}"),
        ("mean_load", f"{res['mean_load']:.3f}", "share of slots over the day (10% .. 80%)"),
        ("sim_energy_spread_kwh", f"{e_spread:.2f}", "per day, every node active"),
        ("sim_energy_consolidated_kwh", f"{e_cons:.2f}", "per day, core/capacity on"),
        ("sim_saving_pct", f"{res['sim_saving_pct']:.1f}", "target >= 30"),
        ("sim_p99_spread_ms", f"{res['sim_p99_spread_ms']:.0f}", "submit -> end"),
        ("sim_p99_consolidated_ms", f"{res['sim_p99_consolidated_ms']:.0f}",
         f"{ratio:.3f}x spread (target <= 1.1x)"),
        ("sim_wait_p99_spread_ms", f"{res['sim_wait_p99_spread_ms']:.0f}", "submit -> start"),
        ("sim_wait_p99_consolidated_ms", f"{res['sim_wait_p99_consolidated_ms']:.0f}",
         "submit -> start (wakes included)"),
        ("transitions_per_node_per_h", f"{res['transitions_per_node_per_h']:.3f}",
         "mean, per modelled hour"),
        ("max_transitions_in_an_hour", f"{res['max_transitions_in_an_hour']}",
         f"any node, any modelled hour (bound {res['flap_bound_per_h']})"),
        ("mean_awake_fraction", f"{res['mean_awake_fraction']:.3f}", "consolidated"),
        ("oracle_problems", f"{len(problems)}", "minimums, starvation, copies, flapping"),
        ("wall_s", f"{res['wall_s']:.1f}", ""),
    ]
    return res, rows, problems

if __name__ == "__main__":
    sys.exit(main())
