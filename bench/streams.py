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
Prints a table and writes JSON with these keys, then the two extra counts. ``--runs N``
repeats the whole run and prints the median and range of each key and every run's
throughput (the JSON keeps the medians at the top and each run under ``runs``).
``--peers`` adds the brokers a stream user would otherwise run, on the same records and
operator: mosquitto (MQTT QoS 1) and NATS (core and JetStream), from
``bench/stream_peers.py``, alternating with meshscale's runs; their rows go under
``peers`` in the JSON.
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
                         node_settings={"stream_max_backlog": BACKLOG})
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


def median(xs: list[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def summarize(runs: list[dict[str, Any]], key: str) -> tuple[Any, Any, Any]:
    """(median, min, max) of ``key`` over runs; a missing record's latency (None: infinite)
    makes the median infinite only if it is the median."""
    vals = [math.inf if r.get(key) is None else float(r[key]) for r in runs]
    med = median(vals)
    return (None if not math.isfinite(med) else round(med, 2), min(vals), max(vals))


def fmt(x: Any) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        x = int(x)
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "inf"
    if isinstance(x, float) and x >= 100:
        return format(round(x), ",")
    return format(x, ",") if isinstance(x, int | float) else str(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (for tests)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--runs", type=int, default=1,
                    help="repeat the whole run N times (peers alternating with meshscale); "
                         "print the median and range of each key and every run's throughput")
    ap.add_argument("--peers", action="store_true",
                    help="add mosquitto (MQTT QoS 1) and NATS (core, JetStream) rows, same "
                         "records and operator (bench/stream_peers.py)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    runs: list[dict[str, Any]] = []
    peer_runs: list[dict[str, dict[str, Any]]] = []
    for i in range(args.runs):
        runs.append(run(args.quick))
        if args.peers:
            from stream_peers import run_peers

            peer_runs.append(run_peers(args.quick))
        if args.runs > 1:
            print(f"run {i + 1}/{args.runs}: throughput_records_s "
                  f"{fmt(runs[-1]['throughput_records_s'])}, latency_p50_ms "
                  f"{fmt(runs[-1]['latency_p50_ms'])}", file=sys.stderr)
    if args.runs == 1:
        res = runs[0]
    else:
        res = {k: summarize(runs, k)[0] for k in KEYS + EXTRA_KEYS}
        res["records_missing"] = sum(r["records_missing"] for r in runs)
        res["records_produced"] = sum(r["records_produced"] for r in runs)
        res["records_duplicate"] = sum(r["records_duplicate"] for r in runs)
    columns = ["meshscale"]
    peers: dict[str, dict[str, Any]] = {}
    if peer_runs:
        for name in peer_runs[0]:
            rows = [p[name] for p in peer_runs]
            if any("unavailable" in r for r in rows):
                peers[name] = {"unavailable": next(r["unavailable"] for r in rows
                                                   if "unavailable" in r)}
                continue
            peers[name] = {k: summarize(rows, k)[0] for k in rows[0]}
            peers[name]["records_missing"] = sum(r["records_missing"] for r in rows)
            columns.append(name)
    label = "meshscale" if args.runs == 1 else f"meshscale (median of {args.runs})"
    print(f"{'metric':<26}{label:>26}" + "".join(f"{c:>18}" for c in columns[1:]))
    for k in KEYS + EXTRA_KEYS:
        cell = fmt(res[k])
        if args.runs > 1 and k in KEYS:
            _, lo, hi = summarize(runs, k)
            cell = f"{cell} [{fmt(lo)}-{fmt(hi)}]"
        line = f"{k:<26}{cell:>26}"
        for c in columns[1:]:
            line += f"{fmt(peers[c].get(k, '-')):>18}"
        print(line)
    for name, p in peers.items():
        if "unavailable" in p:
            print(f"{name}: not run: {p['unavailable']}")
    if args.runs > 1:
        tps = [float(r["throughput_records_s"]) for r in runs]
        med = median(tps)
        print("throughput per run: " + ", ".join(fmt(t) for t in tps))
        print(f"slowest run / median: {min(tps) / med:.2f} (median / slowest: "
              f"{med / min(tps):.2f}x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = dict(res)
        if args.runs > 1:
            doc["runs"] = runs
        if args.peers:
            doc["peers"] = peers
            doc["peer_runs"] = peer_runs
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    bad = []
    if res["records_missing"]:
        bad.append(f"{res['records_missing']} of {res['records_produced']} records never arrived")
    if any(r["backlog_max"] > r["backlog_bound"] for r in runs):
        worst = max(r["backlog_max"] for r in runs)
        bad.append(f"a shard's backlog reached {worst}, over its bound {BACKLOG}")
    for b in bad:
        print(f"FAILED: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
