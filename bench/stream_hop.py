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

    .venv/bin/python bench/stream_hop.py [--quick] --json out.json
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


def measure(duration_s: float = 10.0, rate: float = 20.0,
            follower: bool = True) -> dict[str, Any]:
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
            c0, t0 = _mesh_cpu_s(lm), time.monotonic()
            time.sleep(IDLE_S)
            idle_per_s = (_mesh_cpu_s(lm) - c0) / (time.monotonic() - t0)
            c1, t1 = _mesh_cpu_s(lm), time.monotonic()
            producer = meshscale.connect(entry.address, bundle=lm.bundle_path)
            s = producer.stream("hop-in")
            n = publish_paced(rate, duration_s, lambda i: s.publish("k", i))
            s.flush(timeout=60)
            deadline = time.monotonic() + 30
            while (len(got) < n or (follower and len(got_far) < n)) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            busy = _mesh_cpu_s(lm) - c1 - idle_per_s * (time.monotonic() - t1)
            batches = _batches_applied(lm, "hop-op")
            stop.set()
            for th in threads:
                th.join(timeout=5)
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
            "idle_cpu_cores": round(idle_per_s, 4),
            "batches": batches, "cpu_hops": round(cpu_messages(len(ms), batches)
                                                  / max(1, len(ms)), 3),
            "hop_cpu_ms": round(max(0.0, busy) / max(1, cpu_messages(len(ms), batches))
                                * 1000, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 s instead of 15 s")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    r = measure(6.0 if args.quick else 15.0)
    for k, v in r.items():
        print(f"{k:<18} {v}")
    args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
