"""Seeded fault swarms in the simulator, over many seeds never tuned on.

    python bench/swarm.py --seeds 1000 --json bench/results/swarm.json [--base N] [--plane data]

Each seed is one chaos run of a plane (``sim/dataplane.chaos_run``: puts, deletes and KV
writes under crashes, restarts, pauses and partitions; ``sim/compute.chaos_run``: tasks of
every placement mode under the same faults; ``sim/services.chaos_run``: calls from three
sites to three services under crashes, pauses and partitions) checked by that plane's
invariants; ``sim/policy_chaos.policy_chaos_run``: classed puts, deletes and policy
changes under crashes, pauses and partitions, classed tasks placed by each owner's
``core.scheduling.Scheduler``, no copy or task of a class outside its rule at any step,
audit chains verified). The base
seed is fresh unless given, and printed, so a failure replays:
``python bench/swarm.py --base N --seeds 1``.

JSON: ``seeds``, ``violations`` (runs that broke an invariant), ``crashes`` (runs that
raised), ``wall_s``, ``base``, and per plane the failing seeds with what they broke; for
the compute plane also ``window``: the counts of the at-least-once window of owner
takeover (``core/tasks.py``), which are not violations; for the data plane ``window``:
KV writes no final replica acknowledged (stand-ins took them; a final read at ALL that
misses one is a violation, ``kv sloppy``, unless every node that acknowledged it went
down for good: ``kv_acks_gone``), the KV hints' hand-offs and those left at the end (for
nodes down for good), and late commits of deleted objects (each must be an old
copy, gone once repair is done: that part is checked); for the services plane ``calls``:
calls answered and failed by stated error, and how many faults the replica-count
recovery bound was checked after.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REBUILD_SLICE_ENTRIES: int | None = None
"""``--rebuild-slice``: the data plane's view changes rebuilt in slices this small."""


def data_problems(seed: int) -> list[str]:
    from meshscale.sim.dataplane import chaos_run

    r = chaos_run(seed, rebuild_slice_entries=REBUILD_SLICE_ENTRIES)
    out = []
    if r.residency_violations:
        out.append(f"residency: {r.residency_violations[0]}")
    if r.lost:
        out.append(f"lost: {r.lost[0]}")
    if r.under_replicated:
        out.append(f"under-replicated: {r.under_replicated[0]}")
    if r.kv_divergent or r.kv_lost:
        out.append(f"kv: {(r.kv_divergent + r.kv_lost)[0]}")
    if r.resurrected:
        out.append(f"resurrected: {r.resurrected[0]}")
    if r.late_commit_problems:
        out.append(f"late commit: {r.late_commit_problems[0]}")
    if r.kv_ack_problems:
        out.append(f"kv ack: {r.kv_ack_problems[0]}")
    if r.kv_sloppy_missed:
        out.append(f"kv sloppy: {r.kv_sloppy_missed[0]}")
    # The suite's other bounds (tests/sim/test_dataplane.py::_check): without them a seed
    # whose deletes went unconfirmed passed here and failed there (seed 1362091350).
    if r.deleted < 4:
        out.append(f"deletes: only {r.deleted} of 8 acknowledged")
    if r.acked < 30:
        out.append(f"puts: only {r.acked} acknowledged")
    if len(r.down_for_good) > 2:
        out.append(f"down for good: {r.down_for_good}")
    for key, v in (("kv_writes_outside_final_set", r.kv_writes_outside_final_set),
                   ("kv_hints_handed_off", r.kv_hint_stats.get("handed_off", 0)),
                   ("kv_hints_left", r.kv_hint_stats.get("left", 0)),
                   ("kv_acks_gone", len(r.kv_acks_gone)),
                   ("late_commits", r.late_commits)):
        DATA_WINDOW[key] = DATA_WINDOW.get(key, 0) + v
    return out


DATA_WINDOW: dict[str, int] = {}
"""Counts inside documented windows (not violations), summed over the data seeds."""


WINDOW: dict[str, int] = {}
"""Counts inside documented windows (not violations), summed over the compute seeds."""


def compute_problems(seed: int) -> list[str]:
    from meshscale.sim.compute import chaos_run

    r = chaos_run(seed)
    for key in ("adopted", "concurrent_adoptions", "double_owners", "conflicting", "reruns"):
        WINDOW[key] = WINDOW.get(key, 0) + int(getattr(r, key))
    out = []
    if r.residency_violations:
        out.append(f"residency: {r.residency_violations[0]}")
    if r.result_problems:
        out.append(f"results: {r.result_problems[0]}")
    if r.finished + r.failed + r.refused + r.unacknowledged != r.submitted:
        out.append("accounting: a task with no outcome")

    return out


SERVICE_CALLS: dict[str, int] = {}
"""Calls of the services seeds by outcome: answered, and failed by stated error (not
violations: a call whose replica was lost fails so when it may not be retried)."""


def services_problems(seed: int) -> list[str]:
    from meshscale.sim.services import chaos_run

    r = chaos_run(seed)
    SERVICE_CALLS["answered"] = SERVICE_CALLS.get("answered", 0) + r.answered
    for code, n in r.errors.items():
        SERVICE_CALLS[code] = SERVICE_CALLS.get(code, 0) + n
    SERVICE_CALLS["recoveries_checked"] = (SERVICE_CALLS.get("recoveries_checked", 0)
                                           + r.recoveries_checked)
    return r.problems()


POLICY_COUNTS: dict[str, int] = {}
"""Of the policy seeds: copies refused by receivers, copy rules rewritten by a migration,
policy changes, oracle scans and commits checked, audit entries verified; classed task runs
placed (by each owner's ``core.scheduling.Scheduler``) and refused, runs stopped by a
narrowing, results taken and tasks failed by their owners, task results stored under their
rule; stream shards and backups made,
refused and dropped on a narrowing, copies of gone sources' shards made and handed over; operator runners started and stopped, subscriber fetches
served and refused."""


def policy_problems(seed: int) -> list[str]:
    from meshscale.sim.policy_chaos import policy_chaos_run

    r = policy_chaos_run(seed)
    for key, v in (("refused", r.refused), ("migrated", r.migrated),
                   ("changes", len(r.changes)), ("scans", r.scans),
                   ("commits_checked", r.commits_checked), ("audit_entries", r.audit_entries),
                   ("tasks_placed", r.tasks_placed), ("tasks_refused", r.tasks_refused),
                   ("tasks_stopped", r.tasks_stopped), ("tasks_done", r.tasks_done),
                   ("tasks_failed", r.tasks_failed),
                   ("results", r.results), ("shards", r.shards), ("backups", r.backups),
                   ("stream_refused", r.stream_refused), ("shard_drops", r.shard_drops),
                   ("frozen_copies", r.frozen_copies),
                   ("frozen_handed_over", r.frozen_handed_over),
                   ("operators_placed", r.operators_placed),
                   ("operators_stopped", r.operators_stopped),
                   ("reads_served", r.reads_served), ("reads_refused", r.reads_refused)):
        POLICY_COUNTS[key] = POLICY_COUNTS.get(key, 0) + v
    out = r.problems()[:1]
    if r.acked < 20:
        out.append(f"puts: only {r.acked} acknowledged")
    return out


PLANES: dict[str, Callable[[int], list[str]]] = {
    "data": data_problems,
    "compute": compute_problems,
    "services": services_problems,
    "policy": policy_problems,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1000, help="seeds per plane")
    ap.add_argument("--base", type=int, default=None, help="first seed (default: fresh)")
    ap.add_argument("--plane", choices=sorted(PLANES), action="append",
                    help="plane(s) to run (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--rebuild-slice", type=int, default=None, metavar="N",
                    help="data plane: rebuild each view change in slices of N entries "
                         "(ReplicationConfig.rebuild_slice_entries; default: at once)")
    args = ap.parse_args()
    global REBUILD_SLICE_ENTRIES
    REBUILD_SLICE_ENTRIES = args.rebuild_slice
    base = args.base if args.base is not None else random.SystemRandom().randrange(2**31)
    planes = args.plane or sorted(PLANES)
    print(f"swarm base seed {base}: seeds {base}..{base + args.seeds - 1} per plane", flush=True)
    t0 = time.monotonic()
    result: dict[str, Any] = {"seeds": 0, "violations": 0, "crashes": 0, "base": base,
                              "planes": {}}
    for plane in planes:
        check = PLANES[plane]
        bad: dict[str, list[str]] = {}
        crashes = 0
        start = time.monotonic()
        for seed in range(base, base + args.seeds):
            try:
                problems = check(seed)
            except Exception as e:
                crashes += 1
                problems = [f"crash: {type(e).__name__}: {e!s:.120}",
                            traceback.format_exc(limit=-3).strip().splitlines()[-3]]
            if problems:
                bad[str(seed)] = problems
                print(f"  {plane} seed {seed}: {problems[0]}", flush=True)
        result["planes"][plane] = {"seeds": args.seeds, "violations": len(bad) - crashes,
                                   "crashes": crashes, "failing": bad,
                                   "wall_s": round(time.monotonic() - start, 1)}
        if plane == "data":
            # KV writes no final replica acknowledged (each must be seen by the final read
            # at ALL: checked above); KV hints handed off, and left at the end (their
            # targets are down for good); KV writes missed because every node that
            # acknowledged them went down for good (two permanent failures: beyond QUORUM);
            # copies of deleted objects committed after the delete (all old and gone once
            # repair is done).
            result["planes"][plane]["window"] = dict(DATA_WINDOW)
            print(f"  data windows: {DATA_WINDOW}", flush=True)
        if plane == "compute":
            # Tasks adopted from dead or restarted owners; of them, adopted while an
            # earlier owner still ran (by a node whose view had it dead), ended by two
            # owners, ended by two owners in different states; tasks run more than once.
            result["planes"][plane]["window"] = dict(WINDOW)
            print(f"  compute takeover: {WINDOW}", flush=True)
        if plane == "services":
            # Calls answered and failed by stated error, and the faults after which the
            # replica counts were held to their recovery bound.
            result["planes"][plane]["calls"] = dict(SERVICE_CALLS)
            print(f"  services calls: {SERVICE_CALLS}", flush=True)
        if plane == "policy":
            result["planes"][plane]["counts"] = dict(POLICY_COUNTS)
            print(f"  policy counts: {POLICY_COUNTS}", flush=True)
        result["seeds"] += args.seeds
        result["violations"] += len(bad) - crashes
        result["crashes"] += crashes
    result["wall_s"] = round(time.monotonic() - t0, 1)
    print(f"{'plane':<8} {'seeds':>6} {'violations':>10} {'crashes':>8} {'wall_s':>7}")
    for plane, row in result["planes"].items():
        print(f"{plane:<8} {row['seeds']:>6} {row['violations']:>10} {row['crashes']:>8} "
              f"{row['wall_s']:>7}")
    print(f"{'all':<8} {result['seeds']:>6} {result['violations']:>10} {result['crashes']:>8} "
          f"{result['wall_s']:>7}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["violations"] or result["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
