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
over nodes, per modelled hour) and the extras in KEYS. The real-mesh keys of issue 16
(``real_energy_spread_j``, ``real_energy_consolidated_j``, ``real_saving_pct``,
``real_p99_spread_ms``, ``real_p99_consolidated_ms``, ``wake_s``) are absent: the
real-process half is not built yet, and a key that was not measured is not written.

``--quick``: 150 nodes, 3 seeds (for tests). ``--jobs N`` runs seeds in N processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from meshscale.sim.energy import EnergyReport, EnergyScenario, run_day

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1, help="first seed")
    ap.add_argument("--quick", action="store_true", help="150 nodes, 3 seeds")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    nodes = args.nodes or (150 if args.quick else 1000)
    seeds = args.seeds or (3 if args.quick else 50)
    if nodes < 30:
        ap.error("--nodes must be at least 30")
    t0 = time.perf_counter()
    work = [(nodes, args.seed + i) for i in range(seeds)]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
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
        ("nodes x seeds", f"{nodes} x {seeds}", f"seeds {args.seed}..{args.seed + seeds - 1}"),
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
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  {'value':>12}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")
    for p in problems[:10]:
        print("problem:", p)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({k: res[k] for k in KEYS}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
