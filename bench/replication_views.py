"""Cost of a membership view change to ``core.replication.ReplicaManager``, in process.

    python bench/replication_views.py --objects 100000 --json out.json [--quick]

One manager holds ``--objects`` copies (RF 3, no residency rule). Its view then changes
as a node's does around a restart, in a 3-node mesh (one region each: every set holds
every node, so every view change moves every set) and in a 12-node mesh of three regions
(a change moves only the sets the departed or new node was or becomes a member of). Per
scenario, one row:

- ``seconds``: wall time of the ``set_view`` call (the event loop is blocked that long);
- ``cpu_s``: its CPU time (``time.process_time``: steadier than wall time on a busy
  machine);
- ``replaced``: entries placed again (their replica set computed anew) by it;
- ``moved``: entries whose replica set it changed.

And once: ``load_s``, wall time to add the copies under a 1-node view, and
``core_bytes_per_copy``, Python memory the manager holds per copy (``tracemalloc``, the
id strings excluded: the driver owns them). It uses only the manager's driver contract
(and counts placements by wrapping its ``_rs``), so run it with ``PYTHONPATH`` at another
checkout's ``src`` to compare revisions. Prints a table; writes JSON (keys ``KEYS``).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import random
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from meshscale.core.hlc import HLCTimestamp
from meshscale.core.placement import Candidate
from meshscale.core.replication import ObjectPolicy, ReplicaManager

KEYS = ("scenario", "objects", "nodes", "seconds", "cpu_s", "replaced", "moved")
REGIONS = ("eu-west", "us-east", "ap-south")


def _mesh(n: int) -> list[Candidate]:
    return [Candidate(f"node-{i:02d}", REGIONS[i % 3], f"{REGIONS[i % 3]}-{i // 3 % 2}")
            for i in range(n)]


def _oids(n: int) -> list[str]:
    return [hashlib.sha256(b"%d" % i).hexdigest() for i in range(n)]


def _loaded(oids: list[str], me: Candidate) -> tuple[ReplicaManager, float]:
    rm = ReplicaManager(me.name, rng=random.Random(1), now=0.0)
    rm.set_view([me], 0.0)
    t0 = time.perf_counter()
    for i, o in enumerate(oids):  # one write stamp per copy, as a store's copies carry
        rm.object_added(o, ObjectPolicy(3), None, 0.0,
                        HLCTimestamp(1_700_000_000_000_000_000 + i, 0, "bench"))
    rm.drain()
    return rm, time.perf_counter() - t0


def _change(rm: ReplicaManager, name: str, view: list[Candidate], now: float,
            rows: list[dict[str, Any]]) -> None:
    before = {oid: rm.placement(oid, ObjectPolicy(3)) for oid in rm.inventory()}
    calls = [0]
    real = rm._rs

    def counting(oid: str, policy: ObjectPolicy) -> tuple[str, ...]:
        calls[0] += 1
        return real(oid, policy)

    rm._rs = counting  # type: ignore[method-assign]
    t0, c0 = time.perf_counter(), time.process_time()
    rm.set_view(view, now)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    rm._rs = real  # type: ignore[method-assign]
    rm.drain()
    moved = sum(1 for oid, p in before.items() if rm.placement(oid, ObjectPolicy(3)) != p)
    rows.append({"scenario": name, "objects": len(before), "nodes": len(view),
                 "seconds": round(seconds, 3), "cpu_s": round(cpu_s, 3), "replaced": calls[0], "moved": moved})


def measure(n: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    oids = _oids(n)
    rows: list[dict[str, Any]] = []
    three = _mesh(3)
    rm, load_s = _loaded(oids, three[0])
    _change(rm, "3 nodes: a second joins", three[:2], 1.0, rows)
    _change(rm, "3 nodes: the third joins", three, 2.0, rows)
    _change(rm, "3 nodes: one leaves", three[:2], 3.0, rows)
    _change(rm, "3 nodes: it comes back", three, 4.0, rows)
    twelve = _mesh(12)
    rm12 = ReplicaManager(twelve[0].name, rng=random.Random(1), now=0.0)
    rm12.set_view(twelve, 0.0)
    for o in oids:  # every copy held here, as a node holding strays and hints would
        rm12.object_added(o, ObjectPolicy(3), None, 0.0)
    rm12.drain()
    _change(rm12, "12 nodes: one leaves", twelve[:-1], 1.0, rows)
    _change(rm12, "12 nodes: it comes back", twelve, 2.0, rows)
    del rm, rm12
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    held, _ = _loaded(oids, three[0])
    held.set_view(three, 1.0)
    held.drain()
    gc.collect()
    per_copy = (tracemalloc.get_traced_memory()[0] - base) / max(1, n)
    tracemalloc.stop()
    return rows, {"load_s": round(load_s, 3), "core_bytes_per_copy": round(per_copy, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="2,000 objects")
    args = ap.parse_args(argv)
    if args.quick:
        args.objects = 2000
    if args.objects < 1:
        print("--objects must be positive", file=sys.stderr)
        return 2
    rows, once = measure(args.objects)
    widths = {"scenario": 26}
    print(" | ".join(f"{k:<{widths.get(k, len(k))}}" for k in KEYS))
    for r in rows:
        print(" | ".join(f"{r[k]!s:<{widths.get(k, len(k))}}" for k in KEYS))
    for k, v in once.items():
        print(f"{k}: {v}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, **once}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
