"""Stream pipeline benchmark on a local mesh of real node processes.

    python bench/streams.py [--quick] --json out.json

- throughput_records_s: records published as fast as one producer can through one node,
  through a near-source operator (identity-like, one output per record) until the last
  output reaches a subscriber on another node; records of ~100 bytes;
- latency_p50_ms / latency_p99_ms: end to end (producer timestamp -> subscriber, first
  arrival of each record) at a steady 200 records/s through the same kind of pipeline,
  over every record produced: one that never arrives counts as infinitely late (printed
  ``inf``, ``null`` in the JSON);
- publish_only_records_s: published and acknowledged (two copies) with no operator;
- backlog_max / backlog_bound: the largest backlog any shard of the topic reached on any
  node (each shard log's high-water mark, ``backlog_max`` in ``stream.stats``, read from
  every node once the producer is done: not sampled) while a producer outruns a slow
  operator (10 ms a record), against the configured bound (the producer is held, never
  dropped);
- records_missing: of the records produced into the three operator pipelines (each
  carries its number ``n``, which the operator passes on), those the subscriber never
  received; must be 0. ``records_produced`` and ``records_duplicate`` (the same ``n``
  received again: delivery is at-least-once) follow the table.

The run exits 1 (after printing) when a record is missing or the backlog passed its bound.
No peer is run: none of Ray, Dask or Serf has a leaderless stream pipeline to compare
with on the same terms (Ray's streaming lives in Ray Data / external systems). Prints a
table and writes JSON with these keys, then the two extra counts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from meshscale.client.rpc import request
from meshscale.client.streams import Record
from meshscale.client.tasks import connect
from meshscale.core.api import Empty
from meshscale.core.api.streams import STATS
from meshscale.runtime.launcher import LocalMesh

KEYS = ("throughput_records_s", "latency_p50_ms", "latency_p99_ms", "publish_only_records_s",
        "backlog_max", "backlog_bound", "records_missing")
EXTRA_KEYS = ("records_produced", "records_duplicate")
BACKLOG = 500


def passthrough(rec: Record) -> dict[str, Any]:
    return {"n": rec.value["n"]}


def slow(rec: Record) -> dict[str, Any]:
    time.sleep(0.01)
    return {"n": rec.value["n"]}


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


def ms(x: float) -> float | None:
    """Seconds -> ms, rounded; None (JSON null) for a missing record's infinite latency."""
    return round(x * 1000, 2) if math.isfinite(x) else None


class Tally:
    """Records received by their number ``n``: the first arrival of each, and repeats."""

    def __init__(self, produced: int) -> None:
        self.produced = produced
        self.first: dict[int, Record] = {}
        self.duplicate = 0

    def add(self, records: list[Record]) -> list[Record]:
        """Take a poll's records; returns those seen for the first time."""
        new = []
        for r in records:
            n = int(r.value["n"])
            if n in self.first:
                self.duplicate += 1
            else:
                self.first[n] = r
                new.append(r)
        return new

    @property
    def missing(self) -> int:
        return sum(1 for n in range(self.produced) if n not in self.first)


def wait_warm(mesh: LocalMesh, op: str) -> None:
    """Until the runner on node 0 has loaded the operator into its workers."""
    creds = mesh.credentials()
    end = time.monotonic() + 60
    while time.monotonic() < end:
        st = request(mesh.nodes[0].address, creds, STATS, Empty(), timeout=10)
        if st.operators.get(op, {}).get("runners_warm", 0) >= 1:
            return
        time.sleep(0.1)
    raise RuntimeError(f"operator {op} not warm after 60 s")


def drain(sub: Any, tally: Tally, timeout: float) -> None:
    """Poll until every record produced has arrived or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while tally.missing and time.monotonic() < end:
        tally.add(sub.poll(timeout=0.5, max_records=5000))


def backlog_high_water(mesh: LocalMesh, topic: str) -> int:
    """The largest backlog any shard of ``topic`` ever had, primary or backup, on any node."""
    creds = mesh.credentials()
    most = 0
    for node in mesh.nodes:
        st = request(node.address, creds, STATS, Empty(), timeout=10)
        most = max([most] + [sh.backlog_max for sh in st.shards if sh.topic == topic])
    return most


def run(quick: bool) -> dict[str, Any]:
    n_fast = 5_000 if quick else 30_000
    steady_s = 5.0 if quick else 15.0
    n_slow = 800 if quick else 2_000
    with tempfile.TemporaryDirectory(prefix="meshscale-bench-streams-") as tmp:
        mesh = LocalMesh(Path(tmp), 3, regions=["r1"],
                         node_args=["--stream-max-backlog", str(BACKLOG)])
        mesh.start()
        try:
            mesh.wait_converged(60)
            prod = connect(mesh.nodes[0].address, bundle=mesh.bundle_path)
            cons = connect(mesh.nodes[1].address, bundle=mesh.bundle_path)
            pad = "x" * 80
            out: dict[str, Any] = {}

            # publish only (no operator on the topic): acknowledged at two copies
            s = prod.stream("raw", max_buffer=20_000)
            t0 = time.perf_counter()
            for i in range(n_fast):
                s.publish("k", {"n": i, "pad": pad})
            s.flush(300)
            s.close()
            out["publish_only_records_s"] = round(n_fast / (time.perf_counter() - t0), 1)

            # throughput through an operator, to a subscriber on another node
            prod.operator("fast", passthrough, output="fast-out", name="pass")
            wait_warm(mesh, "pass")
            sub = cons.subscribe("fast-out")
            s = prod.stream("fast", max_buffer=20_000)
            fast = Tally(n_fast)
            t0 = time.perf_counter()
            for i in range(n_fast):
                s.publish(f"k{i % 16}", {"n": i, "pad": pad})
            drain(sub, fast, 300)
            out["throughput_records_s"] = round(len(fast.first) / (time.perf_counter() - t0), 1)
            s.close()

            # latency at a steady rate
            prod.operator("steady", passthrough, output="steady-out", name="steady")
            wait_warm(mesh, "steady")
            sub = cons.subscribe("steady-out")
            steady = Tally(0)  # produced is known once the producer stops
            lat: dict[int, float] = {}
            stop = threading.Event()

            def consume() -> None:
                while not stop.is_set():
                    records = sub.poll(timeout=0.2)
                    now = time.time()
                    for r in steady.add(records):
                        lat[int(r.value["n"])] = now - r.ts

            th = threading.Thread(target=consume)
            th.start()
            s = prod.stream("steady")
            t_end = time.monotonic() + steady_s
            nxt = time.monotonic()
            i = 0
            while time.monotonic() < t_end:
                if time.monotonic() >= nxt:
                    s.publish("k", {"n": i, "pad": pad})
                    i += 1
                    nxt += 1 / 200
                time.sleep(0.0005)
            s.flush(60)
            steady.produced = i
            deadline = time.monotonic() + 30
            while steady.missing and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.set()
            th.join()
            s.close()
            # Every record produced is in the percentiles; a missing one is infinitely late.
            every = [lat.get(n, math.inf) for n in range(i)]
            out["latency_p50_ms"] = ms(pct(every, 50))
            out["latency_p99_ms"] = ms(pct(every, 99))

            # a producer faster than its operator
            prod.operator("slow", slow, output="slow-out", name="slow")
            wait_warm(mesh, "slow")
            s = prod.stream("slow", max_buffer=200)
            for j in range(n_slow):
                s.publish("k", {"n": j})
            s.flush(600)
            s.close()
            out["backlog_max"] = backlog_high_water(mesh, "slow")
            out["backlog_bound"] = BACKLOG
            slow_out = Tally(n_slow)
            drain(cons.subscribe("slow-out"), slow_out, 300)
            tallies = [fast, steady, slow_out]
            out["records_missing"] = sum(t.missing for t in tallies)
            out["records_produced"] = sum(t.produced for t in tallies)
            out["records_duplicate"] = sum(t.duplicate for t in tallies)
            prod.close()
            cons.close()
            return {k: out[k] for k in KEYS + EXTRA_KEYS}
        finally:
            mesh.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (for tests)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    res = run(args.quick)
    print(f"{'metric':<26}{'meshscale':>12}")
    for k in KEYS + EXTRA_KEYS:
        print(f"{k:<26}{'inf' if res[k] is None else format(res[k], ','):>12}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    bad = []
    if res["records_missing"]:
        bad.append(f"{res['records_missing']} of {res['records_produced']} records never arrived")
    if res["backlog_max"] > res["backlog_bound"]:
        bad.append(f"a shard's backlog reached {res['backlog_max']}, over its bound "
                   f"{res['backlog_bound']}")
    for b in bad:
        print(f"FAILED: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
