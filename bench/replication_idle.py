"""Idle anti-entropy cost of ``core.replication.ReplicaManager``, driven in process.

    python bench/replication_idle.py --objects 10000,100000 --json out.json [--quick]

N nodes (three by default, one region each) hold ``--objects`` objects at RF 3 (with three
nodes every node holds every object); the managers are driven directly, every message
delivered at once, with nothing changing: no puts, no faults. After two warm-up sync
periods the script times ``--periods`` more sync periods with ``time.process_time`` (every
``on_timer`` and every ``handle_message`` of every node, the whole of the anti-entropy
work) and reports, per node:

- ``cpu_ms_per_round``: CPU milliseconds per periodic sync round (one round digests
  every peer);
- ``idle_cpu_pct_per_node``: that cost as a share of one core at the default
  ``sync_interval_s`` (10 s);
- ``anti_entropy_bytes_per_min``: replication message bytes sent per minute at that
  interval;
- ``setup_s``: wall seconds to add the objects (not part of the idle cost).

It uses only the manager's public driver contract, so the same script measures any
revision: run it with ``PYTHONPATH`` at another checkout's ``src`` to compare. Prints a
table; writes JSON with one row per object count (keys ``KEYS``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from meshscale.core.placement import Candidate, replica_set
from meshscale.core.replication import (
    ObjectPolicy,
    ReplicaManager,
    ReplicationConfig,
    SendMessage,
)

KEYS = ("objects", "nodes", "objects_held_per_node", "cpu_ms_per_round",
        "idle_cpu_pct_per_node", "anti_entropy_bytes_per_min", "rounds", "setup_s")


def _deliver(mgrs: dict[str, ReplicaManager], pending: list[tuple[str, SendMessage]],
             now: float, sent: list[int]) -> None:
    while pending:
        src, msg = pending.pop()
        sent[0] += len(msg.payload)
        dst = mgrs[msg.dst]
        dst.handle_message(src, msg.payload, now)
        pending.extend((msg.dst, o) for o in dst.drain() if isinstance(o, SendMessage))


def _run(mgrs: dict[str, ReplicaManager], until: float, now: float,
         sent: list[int]) -> tuple[float, int]:
    """Drive every manager's timers until ``until``; returns (now, periodic rounds)."""
    rounds = 0
    while True:
        name, at = min(((n, m.next_deadline() or until) for n, m in mgrs.items()),
                       key=lambda x: (x[1], x[0]))
        if at >= until:
            return until, rounds
        now = max(now, at)
        m = mgrs[name]
        m.on_timer(now)
        rounds += 1
        _deliver(mgrs, [(name, o) for o in m.drain() if isinstance(o, SendMessage)], now, sent)


def measure(objects: int, nodes: int, periods: int, seed: int) -> dict[str, float]:
    cfg = ReplicationConfig()
    view = [Candidate(f"n{i}", f"r{i % 3}", f"r{i % 3}a") for i in range(nodes)]
    now = 0.0
    mgrs = {c.name: ReplicaManager(c.name, config=cfg, rng=random.Random(f"{seed}/{c.name}"),
                                   now=now) for c in view}
    for m in mgrs.values():
        m.set_view(view, now)
        m.drain()
    policy = ObjectPolicy(3)
    t0 = time.perf_counter()
    for i in range(objects):
        oid = f"obj-{seed}-{i:09d}"
        for c in replica_set(oid, view, 3, None):
            name = c.name
            mgrs[name].object_added(oid, policy, None, now)
    for m in mgrs.values():
        m.drain()
    setup_s = time.perf_counter() - t0
    sent = [0]
    interval = cfg.sync_interval_s
    now, _ = _run(mgrs, now + 2 * interval, now, sent)  # warm-up: everyone has matched
    sent[0] = 0
    c0 = time.process_time()
    now, rounds = _run(mgrs, now + periods * interval, now, sent)
    cpu = time.process_time() - c0
    per_round = cpu / max(1, rounds)
    held = sum(len(m.inventory()) for m in mgrs.values()) / nodes
    per_node_per_s = cpu / (periods * interval) / nodes
    return {
        "objects": objects,
        "nodes": nodes,
        "objects_held_per_node": round(held),
        "cpu_ms_per_round": round(per_round * 1000, 3),
        "idle_cpu_pct_per_node": round(per_node_per_s * 100, 4),
        "anti_entropy_bytes_per_min": round(sent[0] / nodes / (periods * interval) * 60),
        "rounds": rounds,
        "setup_s": round(setup_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", default="10000,100000",
                    help="comma-separated object counts (default 10000,100000)")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--periods", type=int, default=5, help="sync periods timed")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="1,000 and 5,000 objects, 2 periods")
    args = ap.parse_args(argv)
    try:
        counts = [int(x) for x in args.objects.split(",") if x.strip()]
    except ValueError:
        print(f"--objects: not a list of integers: {args.objects!r}", file=sys.stderr)
        return 2
    if args.quick:
        counts, args.periods = [1000, 5000], 2
    if not counts or min(counts) < 0 or args.nodes < 1 or args.periods < 1:
        print("--objects, --nodes and --periods must be positive", file=sys.stderr)
        return 2
    rows = [measure(n, args.nodes, args.periods, args.seed) for n in counts]
    print(" | ".join(KEYS))
    for r in rows:
        print(" | ".join(f"{r[k]!s:>{len(k)}}" for k in KEYS))
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
