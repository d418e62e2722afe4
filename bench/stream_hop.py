"""The software time of one hop of the stream plane, measured on this machine.

`meshscale plan` charges ``hop_overhead_ms`` for every hop a record makes between a
client and a node or to a worker, and ``fetch_hop_ms`` for every fetch one node answers
another (``sim/flows.py``). This script measures both, independently of any plan: three
real node processes, node-0 and node-2 in one region and node-1 in another (no emulated
delay: loopback), an operator that does nothing (``lambda rs: rs``'s like, no model),
near-source; a producer publishes to node-0 at a low rate (no queueing) and two
consumers read the same results, one through node-2 and one through node-1. As the
runtime's subscription does (``core.streams.direct_reads``, issue 23), the first reads
node-0's output shard at node-0 itself (its node's region holds it), the second
through node-1's follower (another region's holder). The first's time from ``publish``
is software only, over the hops the flow model charges on that path (``HOPS``):

1. the producer's publish to node-0 (client -> node RPC);
2. the runner's hand-off of the batch to a worker process and back (the fetch itself
   is an in-process call: the runner runs on node-0, near-source);
3. node-0's answer to the consumer's read (node -> client RPC).

``hop_ms`` = that consumer's median time / ``HOPS``. The second's path has one fetch
more: node-1's follower's, answered by node-0, before node-1 answers its consumer.
``fetch_hop_ms`` = the median over records of the second's time less the first's (the
same record, the same run: the load weighs on both alike). Loopback network time (tens
of microseconds) is left in, so the figures are, if anything, a little high.

Until issue 17's third calibration a single consumer read through node-1, in node-0's
region, and ``hop_ms`` was its time over 4 hops, counting a follower's fetch and a
read at node-1 that the runtime had stopped making (it reads at node-0: 159 of 160
records in a probe): each hop came out a quarter too short, and the flow model charged
every read two such hops. A first probe put a follower's fetch at 0.1 to 0.5 ms; this
bench, measuring it per record beside the direct read, has found 0.79 to 1.92 ms
(median per run, 14 runs under load), with a wide spread between records.

``hop_cpu_ms`` is the CPU the same path costs: the CPU time of the node processes, their
workers and this process (the producer and the consumers) while the records flow, less
what they use idle (measured over ``IDLE_S`` before), per message the flow model charges
a hop of CPU for on these paths (``cpu_messages``): each record's publish, and per batch
the hand-off to a worker, the outputs' copy to their backup, node-0's answer to the
direct read, node-0's answer to node-1's fetch and node-1's answer to its consumer's
read (a batch's results are appended at once, so each reader takes them in one read,
as the model charges them). It is what a shared host loses to moving records
(``host_cores`` in a plan).

``hop_quantiles_ms`` is a hop's time as a distribution (issue 17: on a loaded machine
most hops take about the median and a few wait tens of ms for a core, which makes the
p99 of a path and which a constant ``hop_ms`` leaves out), as ``[level, ms]`` points for
a plan's ``hop_quantiles_ms``, from the direct reader's times (those of the records
published after ``SETTLE_S``) by ``hop_quantiles``: the
lower half is the path's over ``HOPS``; above it a path's excess over its median is
one hop's (a stall hits one hop of a record, not all of them), so each of the ``HOPS``
hops takes it ``HOPS`` times less often, and ``HOPS`` hops drawn alike add up to the
measured path again at the tail (``hop_p50_p90_p99_ms`` gives the path over ``HOPS``
for comparison: drawn three times, its tail comes out far too short).
``fetch_hop_quantiles_ms`` is the same for a node's fetch answer: the quantiles of the
per-record difference between the two readers (which holds the difference of the two
readers' own last hops too).

``--producer-process`` runs the producer in a process of its own rather than a thread
of this one beside the consumers (issue 17: does the GIL this process's threads share
slow the pipeline? The live demo runs its producers and its consumer as threads of one
process too). Eight alternating pairs at load average 2 to 10 (issue 17): p50 3.85,
3.72, 3.72, 3.42, 3.96, 3.32, 5.31, 6.37 ms (threads) against 3.57, 3.62, 3.40, 4.26,
4.09, 3.79, 3.66, 13.31 (process): no difference the load's swings do not swamp.

    .venv/bin/python bench/stream_hop.py [--quick] [--producer-process] --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOPS = 3
"""Hops ``sim/flows.py`` charges on the direct reader's path (see the module docstring)."""
CPU_HOPS = 6
"""Messages ``sim/flows.py`` charges ``hop_cpu_s`` for on the measured paths for a record
alone: its ``_AT_SHARD``, a local ``_BATCH``, ``_APPLIED``'s copy, a direct read's
``_RESULTS_BACK`` (one) and a follower's (two)."""
IDLE_S = 3.0
SETTLE_S = 1.0
"""Records published in the first ``SETTLE_S`` are left out of ``hop_quantiles_ms``: the
pipeline's first records wait for connections and the first rounds (45 to 61 ms for the
first four in a probe, the steady state's p99 under 10): over 1% of a ``--quick`` run's
records, they made its whole tail, and the plan's latency is the steady state's."""
LEVELS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999, 1.0)
"""Quantile levels of ``hop_quantiles_ms`` (a plan takes at most 64 points)."""


def _cpu_s(pids: set[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far."""
    import os

    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _mesh_cpu_s(lm: Any) -> float:
    from meshscale.runtime.launcher import children_of

    pids = {p.pid for p in lm.processes()}
    return _cpu_s(pids | children_of(pids)) + time.process_time()


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def hop_quantiles(path_ms: list[float], hops: int = HOPS,
                  levels: tuple[float, ...] = LEVELS) -> list[list[float]]:
    """One hop's time as ``[level, ms]`` points, from times of a path of ``hops`` hops
    (module docstring): at a level up to 1/2 the path's quantile over ``hops``; above it
    the path's median over ``hops`` plus the path's excess over its median at level
    ``1 - hops * (1 - level)`` (at least 1/2): a path exceeds its median by ``d`` when one
    of its hops does, ``hops`` times as often as a single hop (the tail of a sum of
    independent hops with a heavy tail is its largest hop's)."""
    if not path_ms:
        return []
    med = _pct(path_ms, 50)
    out: list[list[float]] = []
    for u in levels:
        if u <= 0.5:
            v = _pct(path_ms, 100 * u) / hops
        else:
            w = max(0.5, 1.0 - hops * (1.0 - u))
            v = med / hops + _pct(path_ms, 100 * w) - med
        out.append([u, round(max(0.0, v), 3)])
    for i in range(1, len(out)):  # not decreasing (rounding)
        out[i][1] = max(out[i][1], out[i - 1][1])
    return out


def _nothing(records: list[Any]) -> list[Any]:
    return [r.value for r in records]


def _wait_warm(lm: Any, op: str, timeout_s: float = 60.0) -> bool:
    from meshscale.client.rpc import RpcError, request
    from meshscale.core.api import Empty
    from meshscale.core.api.streams import STATS

    creds = lm.credentials()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        warm = 0
        for n in lm.nodes:
            with contextlib.suppress(RpcError, OSError):
                st = request(n.address, creds, STATS, Empty(), timeout=5)
                warm += st.operators.get(op, {}).get("runners_warm", 0)
        if warm >= 1:
            return True
        time.sleep(0.25)
    return False


def _batches_applied(lm: Any, op: str) -> int:
    """Batches the runners of ``op`` ran so far, over the mesh's nodes (0: unreadable)."""
    from meshscale.client.rpc import RpcError, request
    from meshscale.core.api import Empty
    from meshscale.core.api.streams import STATS

    creds = lm.credentials()
    n = 0
    for node in lm.nodes:
        with contextlib.suppress(RpcError, OSError):
            st = request(node.address, creds, STATS, Empty(), timeout=5)
            n += st.operators.get(op, {}).get("batches_applied", 0)
    return n


def cpu_messages(records: int, batches: int) -> int:
    """Messages ``sim/flows.py`` charges a hop of CPU for on the measured paths: each
    record's publish, and for each batch its hand-off to a worker, its outputs' copy,
    node-0's answer to the direct read, its answer to node-1's fetch and node-1's answer
    to its consumer (a batch's results are appended at once, so each reader takes them
    in one read). ``CPU_HOPS`` a record when each record is its own batch; fewer when
    the runner takes several at once (a loaded machine), as the model charges them.
    ``batches`` 0 (unread): every record its own batch."""
    if batches <= 0 or batches > records:
        batches = records
    return records + (CPU_HOPS - 1) * batches


def publish_paced(rate: float, duration_s: float, publish: Callable[[int], object]) -> int:
    """Call ``publish(i)`` for i = 0, 1, ... at ``rate`` a second for ``duration_s``
    (paced on the monotonic clock, no burst to catch up); how many were published."""
    n = 0
    nxt = time.monotonic()
    end = nxt + duration_s
    while (now := time.monotonic()) < end:
        if now < nxt:
            time.sleep(min(nxt - now, 0.01))
            continue
        nxt += 1.0 / rate
        publish(n)
        n += 1
    return n


def _consume(sub: Any, got: dict[int, float], direct: list[int],
             stop: threading.Event) -> None:
    """Each record's time from its publish, by its value (the record's number)."""
    while not stop.is_set():
        for r in sub.poll(timeout=0.5):
            got.setdefault(r.value, time.time() - r.ts)
        direct[0] = sub.received_direct


def _produce(address: str, bundle: Path, rate: float, duration_s: float, ready: Any,
             go: Any, out: Any) -> None:
    """The producer in a process of its own (``--producer-process``): connect, say so,
    wait for ``go``, publish as ``measure``'s thread does, put the count in ``out``."""
    import meshscale

    producer = meshscale.connect(address, bundle=bundle)
    s = producer.stream("hop-in")
    ready.set()
    go.wait(120)
    n = publish_paced(rate, duration_s, lambda i: s.publish("k", i))
    s.flush(timeout=60)
    s.close()
    producer.close()
    out.put(n)


def measure(duration_s: float = 10.0, rate: float = 20.0,
            follower: bool = True, producer_process: bool = False) -> dict[str, Any]:
    """Run the three-node pipeline; returns the figures (see the module docstring)."""
    import statistics

    import meshscale
    from meshscale.runtime.launcher import LocalMesh

    with tempfile.TemporaryDirectory(prefix="stream-hop-") as tmp:
        lm = LocalMesh(Path(tmp) / "mesh", 3, regions=["lan", "lan-2"])
        lm.start()
        try:
            lm.wait_converged(60)
            entry = lm.nodes[0]
            near = next(n for n in lm.nodes[1:] if n.region == entry.region)
            far = next(n for n in lm.nodes if n.region != entry.region)
            consumer = meshscale.connect(near.address, bundle=lm.bundle_path)
            consumer.operator("hop-in", _nothing, placement="near-source", output="hop-out",
                              name="hop-op", batch=True, batch_size=128)
            warm = _wait_warm(lm, "hop-op")
            far_consumer = meshscale.connect(far.address, bundle=lm.bundle_path)
            got: dict[int, float] = {}
            got_far: dict[int, float] = {}
            direct, direct_far = [0], [0]
            stop = threading.Event()
            threads = [threading.Thread(target=_consume, args=(
                mesh.subscribe("hop-out"), into, d, stop), daemon=True) for mesh, into, d in (
                    (consumer, got, direct), (far_consumer, got_far, direct_far))
                    if follower or into is got]
            for th in threads:
                th.start()
            child: Any = None
            if producer_process:
                import multiprocessing

                ctx = multiprocessing.get_context("spawn")
                ready, go, count = ctx.Event(), ctx.Event(), ctx.Queue()
                child = ctx.Process(target=_produce, args=(
                    entry.address, lm.bundle_path, rate, duration_s, ready, go, count))
                child.start()
                ready.wait(120)

            def cpu_now() -> float:
                return _mesh_cpu_s(lm) + (_cpu_s({child.pid}) if child is not None else 0.0)

            c0, t0 = cpu_now(), time.monotonic()
            time.sleep(IDLE_S)
            idle_per_s = (cpu_now() - c0) / (time.monotonic() - t0)
            c1, t1 = cpu_now(), time.monotonic()
            s: Any = None
            producer: Any = None
            if child is not None:
                go.set()
                n = int(count.get(timeout=duration_s + 120))
            else:
                producer = meshscale.connect(entry.address, bundle=lm.bundle_path)
                s = producer.stream("hop-in")
                n = publish_paced(rate, duration_s, lambda i: s.publish("k", i))
                s.flush(timeout=60)
            deadline = time.monotonic() + 30
            while (len(got) < n or (follower and len(got_far) < n)) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            busy = cpu_now() - c1 - idle_per_s * (time.monotonic() - t1)
            batches = _batches_applied(lm, "hop-op")
            stop.set()
            for th in threads:
                th.join(timeout=5)
            if child is not None:
                child.join(timeout=30)
            else:
                s.close()
                producer.close()
            consumer.close()
            far_consumer.close()
        finally:
            lm.stop()
    ms = [x * 1000 for x in got.values()]
    far_ms = [x * 1000 for x in got_far.values()]
    both = sorted(set(got) & set(got_far))
    extra = [(got_far[i] - got[i]) * 1000 for i in both]
    p50 = _pct(ms, 50)
    settled = round(rate * SETTLE_S)
    steady = [got[i] * 1000 for i in sorted(got) if i >= settled]
    fetch_ms = max(0.0, statistics.median(extra)) if extra else math.nan
    return {"records": n, "received": len(ms), "received_direct": direct[0],
            "received_through_follower": len(far_ms),
            "received_direct_far": direct_far[0], "warm": warm, "rate_per_s": rate,
            "pipeline_p50_ms": round(p50, 2), "pipeline_p99_ms": round(_pct(ms, 99), 2),
            "follower_pipeline_p50_ms": round(_pct(far_ms, 50), 2),
            "follower_pipeline_p99_ms": round(_pct(far_ms, 99), 2),
            "hops": HOPS, "hop_ms": round(p50 / HOPS, 3),
            "fetch_hop_ms": round(fetch_ms, 3),
            "fetch_hop_p25_p75_ms": [round(_pct(extra, 25), 3), round(_pct(extra, 75), 3)],
            "hop_quantiles_ms": hop_quantiles(steady),
            "hop_p50_p90_p99_ms": [round(_pct(ms, p) / HOPS, 3) for p in (50, 90, 99)],
            "fetch_hop_quantiles_ms": hop_quantiles(
                [max(0.0, (got_far[i] - got[i]) * 1000) for i in both if i >= settled], 1),
            "settled_records": len(steady),
            "producer_process": producer_process,
            "path_ms": [round(got[i] * 1000, 3) for i in sorted(got)],
            "idle_cpu_cores": round(idle_per_s, 4),
            "batches": batches, "cpu_hops": round(cpu_messages(len(ms), batches)
                                                  / max(1, len(ms)), 3),
            "hop_cpu_ms": round(max(0.0, busy) / max(1, cpu_messages(len(ms), batches))
                                * 1000, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 s instead of 15 s")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--producer-process", action="store_true",
                    help="the producer in a process of its own, not a thread of this one")
    ap.add_argument("--rate", type=float, default=20.0, help="records a second (20)")
    args = ap.parse_args()
    r = measure(6.0 if args.quick else 15.0, args.rate,
                producer_process=args.producer_process)
    for k, v in r.items():
        if k != "path_ms":  # each record's, in the JSON
            print(f"{k:<18} {v}")
    args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
