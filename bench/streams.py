"""Stream pipeline benchmark on a local mesh of real node processes.

    python bench/streams.py [--quick] --json out.json

- throughput_records_s: records published as fast as one producer can through one node,
  through a near-source operator (identity-like, one output per record) until the last
  output reaches a subscriber on another node; records of ~100 bytes;
- latency_p50_ms / latency_p99_ms: end to end (producer timestamp -> subscriber) at a
  steady 200 records/s through the same kind of pipeline;
- publish_only_records_s: published and acknowledged (two copies) with no operator;
- backlog_max / backlog_bound: the largest shard backlog seen while a producer outruns a
  slow operator (10 ms a record), against the configured bound (the producer is held,
  never dropped); records_lost must be 0.

No peer is run: none of Ray, Dask or Serf has a leaderless stream pipeline to compare
with on the same terms (Ray's streaming lives in Ray Data / external systems). Prints a
table and writes JSON with exactly these keys.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from meshscale.client.rpc import call
from meshscale.client.streams import Record
from meshscale.client.tasks import connect
from meshscale.runtime.launcher import LocalMesh

KEYS = ("throughput_records_s", "latency_p50_ms", "latency_p99_ms", "publish_only_records_s",
        "backlog_max", "backlog_bound", "records_lost")
BACKLOG = 500


def passthrough(rec: Record) -> dict[str, Any]:
    return {"n": rec.value["n"]}


def slow(rec: Record) -> dict[str, Any]:
    time.sleep(0.01)
    return {"n": rec.value["n"]}


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


def wait_warm(mesh: LocalMesh, op: str) -> None:
    """Until the runner on node 0 has loaded the operator into its workers."""
    creds = mesh.credentials()
    end = time.monotonic() + 60
    while time.monotonic() < end:
        st = call(mesh.nodes[0].address, creds, "stream.stats", {}, timeout=10)
        if st["operators"].get(op, {}).get("runners_warm", 0) >= 1:
            return
        time.sleep(0.1)
    raise RuntimeError(f"operator {op} not warm after 60 s")


def drain(sub: Any, want: int, timeout: float) -> dict[str, Record]:
    got: dict[str, Record] = {}
    end = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < end:
        for r in sub.poll(timeout=0.5, max_records=5000):
            got[r.id] = r
    return got


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
            t0 = time.perf_counter()
            for i in range(n_fast):
                s.publish(f"k{i % 16}", {"n": i, "pad": pad})
            got = drain(sub, n_fast, 300)
            out["throughput_records_s"] = round(len(got) / (time.perf_counter() - t0), 1)
            s.close()

            # latency at a steady rate
            prod.operator("steady", passthrough, output="steady-out", name="steady")
            wait_warm(mesh, "steady")
            sub = cons.subscribe("steady-out")
            lat: list[float] = []
            stop = threading.Event()

            def consume() -> None:
                while not stop.is_set():
                    records = sub.poll(timeout=0.2)
                    now = time.time()
                    lat.extend(now - r.ts for r in records)

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
            deadline = time.monotonic() + 30
            while len(lat) < i and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.set()
            th.join()
            s.close()
            out["latency_p50_ms"] = round(pct(lat, 50) * 1000, 2)
            out["latency_p99_ms"] = round(pct(lat, 99) * 1000, 2)

            # a producer faster than its operator
            prod.operator("slow", slow, output="slow-out", name="slow")
            wait_warm(mesh, "slow")
            s = prod.stream("slow", max_buffer=200)
            backlogs: list[int] = []
            done = threading.Event()

            def produce() -> None:
                for j in range(n_slow):
                    s.publish("k", {"n": j})
                s.flush(600)
                done.set()

            tp = threading.Thread(target=produce)
            tp.start()
            creds = mesh.credentials()
            while not done.is_set():
                st = call(mesh.nodes[0].address, creds, "stream.stats", {}, timeout=10)
                backlogs += [sh["backlog"] for sh in st["shards"]
                             if sh["topic"] == "slow" and sh["role"] == "primary"]
                time.sleep(0.1)
            tp.join()
            s.close()
            got = drain(cons.subscribe("slow-out"), n_slow, 300)
            out["backlog_max"] = max(backlogs) if backlogs else 0
            out["backlog_bound"] = BACKLOG
            out["records_lost"] = n_slow - len(got)
            prod.close()
            cons.close()
            return {k: out[k] for k in KEYS}
        finally:
            mesh.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (for tests)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    res = run(args.quick)
    print(f"{'metric':<26}{'meshscale':>12}")
    for k in KEYS:
        print(f"{k:<26}{res[k]:>12,}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
