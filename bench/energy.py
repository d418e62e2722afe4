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
region, three zones, ``--real-cpus`` worker slots each, default 4 as in the simulator)
runs the simulator's load curve (``DiurnalLoad``: trough 10% of the slots at midnight,
peak 80% at noon) compressed into ``--real-day-s`` seconds, after a quarter day of the
evening before that is run but not measured (as the simulator's warm-up), twice:
``--energy-mode off`` (spread) and ``consolidate`` (the simulator's headroom 0.3 and
hysteresis 0.05, a minimum of two active nodes per region and one per zone, dwell
``--real-dwell-s``, default 5 s). A task sleeps ``--real-task-s`` (it holds a slot, not
a CPU). With three zones of two nodes, at least three nodes stay awake: even a rule that
followed the load perfectly would sleep at most 32% of the node-time over this day.
Energy is the sum over the nodes of ``node.energy``'s ``joules_total`` over the day,
**from the power model** (``--power-source model``: 10 W idle, 65 W peak at the node
processes' CPU share, 2 W on standby), not a meter: nodes sharing one machine cannot each
read their own RAPL figure. Latency is a task's submit to its end (the task returns its
end time). ``wake_s`` is the longest time any node took from a wake (a task's arrival or
the plan) to its workers up, read from the nodes' ``capacity_awake`` log lines; the task
that woke a node waits exactly that long before it starts. ``--no-real`` skips this half,
``--real-only`` the simulator's.

``--quick``: 150 nodes, 3 seeds (for tests); a 40 s real day. ``--jobs N`` runs seeds in
N processes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

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
)
REAL_NODES = 6
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


def _sleep_task(seconds: float) -> float:
    import time as t

    t.sleep(seconds)
    return t.time()


def _real_run(consolidate: bool, day_s: float, task_s: float, seed: int, cpus: int,
              dwell_s: float) -> dict[str, float]:
    """One compressed day on a fresh 6-node mesh; energy (J), p99 (ms), tasks, wakes."""
    import tempfile

    # Kept when the run fails (its node logs say why), removed when it succeeds.
    d = tempfile.mkdtemp(prefix="bench-energy-")
    try:
        out = _real_run_in(Path(d), consolidate, day_s, task_s, seed, cpus, dwell_s)
    except BaseException:
        print(f"the real run failed; its mesh and node logs are kept in {d}",
              file=sys.stderr)
        raise
    shutil.rmtree(d, ignore_errors=True)
    return out


def _real_run_in(d: Path, consolidate: bool, day_s: float, task_s: float, seed: int,
                 cpus: int, dwell_s: float) -> dict[str, float]:
    import asyncio
    import math
    import random

    import meshscale
    from meshscale.client.rpc import RpcConnection
    from meshscale.runtime.launcher import LocalMesh

    cap = EnergyScenario().capacity  # the simulator's headroom and hysteresis
    energy: dict[str, object] = (
        {"energy_mode": "consolidate", "energy_min_active_per_region": 2,
         "energy_headroom_fraction": cap.headroom_fraction,
         "energy_hysteresis_fraction": cap.hysteresis_fraction,
         "energy_min_dwell_s": float(dwell_s), "energy_drain_confirm_s": 2.0,
         "energy_interval_s": 0.5} if consolidate else {"energy_mode": "off"})
    curve = replace(EnergyScenario().load, day_s=day_s)  # the simulator's day, compressed
    warm_s = day_s * REAL_WARMUP_FRACTION
    node_settings = {"cpus": cpus, "power_source": "model", **energy}
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
                   http=False) as mesh:
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
        finally:
            client.close()
        wakes: list[float] = []
        moves = 0
        for n in mesh.nodes:
            assert n.log_path is not None
            for line in n.log_path.read_text(errors="replace").splitlines():
                if '"capacity' not in line:
                    continue
                with_fields = json.loads(line)
                if with_fields.get("event") == "capacity_awake":
                    wakes.append(float(with_fields["wake_s"]))
                elif with_fields.get("event") == "capacity":
                    moves += 1
    lat.sort()
    p99 = lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)]
    return {"joules": j1 - j0, "p99_ms": p99, "tasks": float(len(lat)),
            "wake_s": max(wakes, default=0.0), "wakes": float(len(wakes)),
            "transitions": float(moves)}


def real_half(day_s: float, task_s: float, seed: int, cpus: int, dwell_s: float
              ) -> dict[str, float]:
    spread = _real_run(False, day_s, task_s, seed, cpus, dwell_s)
    cons = _real_run(True, day_s, task_s, seed, cpus, dwell_s)
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
        real = real_half(day_s, args.real_task_s, args.seed, args.real_cpus,
                         args.real_dwell_s)
        res.update(real)
        keys += REAL_KEYS
        ratio = real["real_p99_consolidated_ms"] / real["real_p99_spread_ms"]
        rows += [
            ("real_day_s", f"{day_s:.0f}", f"{REAL_NODES} node processes x "
                                           f"{args.real_cpus} slots, dwell "
                                           f"{args.real_dwell_s:g} s, model joules "
                                           "(not a meter)"),
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
