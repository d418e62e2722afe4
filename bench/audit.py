"""Audit trail benchmark.

    python bench/audit.py [--quick] --json out.json

- audit_entries_per_s: entries appended to one node's trail (``runtime/audit.AuditLog``
  driven directly, default config: 4 MB segments, each batch fsynced) until all are on
  disk: entries / seconds from the first append to the last fsync. The appender keeps the
  queue under half its bound (it waits, it never lets entries drop; drops must be 0);
- verify_mb_per_s: the same trail checked (``AuditLog.verify``: read, decode, canonical
  re-encode, BLAKE3 of every entry, links), MB of segment files / seconds;
- query_ms: one object's history across a LocalMesh of 5 node processes (in 3 regions)
  after some hundred small puts, a read and a delete: ``meshscale audit --object ID
  --all-nodes``'s call (``client/audit.query_mesh``: the 5 nodes asked at once, rows
  merged), median of repeated runs.

Extras: the event loop's cost of one ``append`` (what a put pays; the write is in a
thread), the segments and bytes written, the p90 of query_ms, the rows the query found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from meshscale.client.audit import query_mesh
from meshscale.client.rpc import RpcConnection
from meshscale.core.api.audit import AuditQuery
from meshscale.core.audit import Kind
from meshscale.runtime.audit import AuditLog
from meshscale.runtime.config import AuditConfig
from meshscale.runtime.launcher import LocalMesh

KEYS = ("audit_entries_per_s", "verify_mb_per_s", "query_ms")
MB = 1_000_000


def bench_log(directory: Path, n: int) -> dict[str, float]:
    cfg = AuditConfig()
    log = AuditLog(directory / "audit", "bench-node", cfg)
    log.open()
    half = cfg.max_pending_entries // 2
    oid = "b3-" + "ab" * 32
    append_s = 0.0
    t0 = time.perf_counter()
    for i in range(n):
        if log.pending >= half:
            log.wait_flushed(30)
        t = time.perf_counter()
        log.append(Kind.COPY_MADE, oid, who="node-3", role="node", data_class="pii",
                   from_region="eu-west", to_region="eu-central", detail=f"{i} bytes")
        append_s += time.perf_counter() - t
    assert log.wait_flushed(120), "the writer did not catch up"
    elapsed = time.perf_counter() - t0
    assert log.stats["dropped"] == 0 and log.flushed_seq == n
    size = sum(s.size for s in log.segments())
    t = time.perf_counter()
    out = log.verify()
    verify_s = time.perf_counter() - t
    assert out.broke is None and out.entries == n, out
    segs = len(log.segments())
    log.close()
    return {"audit_entries_per_s": n / elapsed, "verify_mb_per_s": size / MB / verify_s,
            "append_us": append_s / n * 1e6, "trail_mb": size / MB,
            "segments": float(segs)}


async def bench_query(mesh: LocalMesh, puts: int, rounds: int) -> dict[str, float]:
    creds = mesh.credentials()
    c = RpcConnection(mesh.nodes[0].address, creds, 60)
    # The class's policy first (a put naming a class without one is refused): every region.
    regions = sorted({m["region"] for m in await c.call("members", {})})
    await c.call("policy.set", {"name": "pii", "regions": regions})
    oids = []
    for k in range(puts):
        r = await c.call("obj.put_small", {"data": f"row {k} ".encode() * 100, "replicas": 3,
                                           "w": 2, "residency": {"data_class": "pii"}})
        oids.append(r["id"])
    target = oids[puts // 2]
    await c.call("obj.read", {"id": target, "offset": 0, "length": 1 << 20})
    await c.call("obj.delete", {"id": target})
    await c.close()
    addresses = [n.address for n in mesh.nodes]
    q = AuditQuery(subject=target)
    deadline = time.monotonic() + 60
    while True:  # until the tombstone reached the holders and their drops are audited
        got = await query_mesh(addresses, creds, q, timeout=30)
        if sum(r.kind == "copy_dropped" for r in got.rows) >= 3:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the deleted object's drops were not audited: {got.rows}")
        await asyncio.sleep(0.2)
    times = []
    rows = 0
    for _ in range(rounds):
        t = time.perf_counter()
        got = await query_mesh(addresses, creds, q, timeout=30)
        times.append((time.perf_counter() - t) * 1000)
        assert not got.errors, got.errors
        rows = len(got.rows)
    times.sort()
    return {"query_ms": statistics.median(times),
            "query_p90_ms": times[min(len(times) - 1, int(len(times) * 0.9))],
            "query_rows": float(rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="audit trail benchmark")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="meshscale-bench-audit-") as d:
        res.update(bench_log(Path(d), 20_000 if args.quick else 200_000))
    with (tempfile.TemporaryDirectory(prefix="meshscale-bench-audit-") as d,
          LocalMesh(Path(d), 5, regions=["eu-west", "us-east", "ap-south"]) as mesh):
        res.update(asyncio.run(bench_query(mesh, 50 if args.quick else 300,
                                           10 if args.quick else 50)))
    notes = {
        "audit_entries_per_s": "one node's trail, appended until fsynced (4 MB segments)",
        "verify_mb_per_s": "same trail: decode, re-encode, BLAKE3, links",
        "query_ms": "one object's history from 5 node processes at once (median)",
        "append_us": "event-loop cost of one append (the write is in a thread)",
        "trail_mb": "segment files written",
        "segments": "",
        "query_p90_ms": "",
        "query_rows": "entries found for that object (put, copies, read, delete, drops)",
    }
    print(f"{'metric':<22}  {'value':>12}  note")
    for k in (*KEYS, *(k for k in res if k not in KEYS)):
        print(f"{k:<22}  {res[k]:>12.2f}  {notes.get(k, '')}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {k: res[k] for k in KEYS} | {k: v for k, v in res.items() if k not in KEYS}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
