"""Batch on the mesh: a parquet group-by with Dask, mesh vs Dask's own local cluster.

    python bench/batch.py [--quick] [--rounds N] --json out.json

Parquet files (``--quick``: about 50 MB in 8 files; full: about 1 GB in 32 files; columns
``key`` (1000 groups), ``value`` (float64), ``qty`` (int64), random) are written to a local
directory and the same bytes put on a 4-node local mesh (``replicas=2``: each file on two
of the four nodes). Then, in one run, the same group-by (sum of value and qty, count, by
key), timed from graph submission to the result in this process. Both clusters are up
together and their runs alternate, ``--rounds`` times (default 2 quick, 3 full: mesh,
local, mesh, local, ...), so both see the same load on a shared machine; each round is
printed, and the two times are the medians of the rounds:

- ``mesh_dask_s``: ``meshscale.dask.cluster`` with 4 workers (1 thread each) as mesh tasks,
  declared ``inputs=["meshscale://bench/"]`` so the mesh places them on holders, and
  ``cluster.read_parts``: one Dask task per file, restricted (loosely) to the workers
  on its holders, each reading through its own node (one verified whole-object get,
  over TLS). The cluster's start is not timed (``mesh_cluster_start_s``, extra). Split
  (extras, medians): ``mesh_dask_setup_s``, ``read_parts`` in this process (names
  listed, holders looked up, the workers' nodes from the mesh's task records, the reads
  submitted), and ``mesh_dask_compute_s``, from there to the result.
- ``local_dask_s``: ``distributed.LocalCluster`` (4 worker processes, 1 thread each)
  running ``dd.read_parquet`` on the local directory.
- ``mesh_bytes_moved_mb``: bytes that crossed between nodes during round 1's mesh run
  (``mesh_bytes_moved_max_mb``, extra: the most of any round), the sum
  of three counts (each also given, extra):
  ``mesh_nonlocal_read_mb``: for every file whose Dask task ran on a worker whose node
  holds no copy (``client.who_has`` of the read tasks, the workers' nodes from the mesh's
  task records, the holders from ``stat``), the bytes served for it, taken as the file's
  size (a parquet read of every column reads nearly all of it; those reads are served by
  another node); ``mesh_node_copy_mb``: the nodes' data-plane ``bytes_sent`` counters
  (``dp.stats``: object copies node to node: puts' forwards, repair), summed, delta over
  the run; ``mesh_dask_transfer_mb``: Dask's own worker-to-worker transfers
  (``Worker.transfer_outgoing_bytes_total``, summed over the workers; the reduction's
  partial results), all counted as crossing nodes.
  Also ``mesh_read_served_mb`` (extra): the nodes' ``read_served_bytes`` counters (bytes a
  node read from its own copies for a reader), summed, delta over the run: every byte
  the reads took, local or not.
- extras: ``mesh_dask_first_s`` and ``local_dask_first_s``: round 1 (the mesh workers'
  connections to their nodes are cold then: it pays a TLS connection per worker and
  node); ``mesh_over_local``: ``mesh_dask_s / local_dask_s`` (the target is 1.2);
  ``rerun_same_result``; ``mesh_read_tasks_s``, ``mesh_tasks_s`` and ``local_tasks_s``
  (round 1): the workers' compute time (Dask's task stream, summed over tasks) in the
  mesh's read tasks (a whole-object get through the node and the parquet decode), in all
  of the mesh run's tasks, and in all of the local run's (there a read and its
  partition's group-by step are one task): where the time went, whatever the wall clock
  did; ``mesh_plain_dask_s`` and ``mesh_plain_read_served_mb``: the same group-by
  with a plain ``dd.read_parquet("meshscale://bench/")`` on the same mesh workers (no
  locality: every read goes through one node, which redirects to a holder);
  ``input_mb``; ``same_result`` (1 when the mesh's and the local run's group sums agree
  to 1e-6 relative and the counts exactly); ``mesh_worker_nodes_changed``: the rounds
  after which ``cluster.worker_nodes()`` (the workers' nodes by the mesh's task
  records, what ``read_parts`` restricts reads by) differed from the start's (0 unless
  the mesh ran a worker task again: before the scheduler's ``Running`` beats, it did so
  for every worker task 60 s after its start, and later rounds read on non-holders).

The machine the numbers come from is usually shared: times are wall-clock under whatever
else runs there. Prints a table and writes JSON with the three keys first.

The comparison is not like for like, and says so: the local run reads files from this
machine's disk (its page cache, after writing them) in the worker's own process; a mesh
read is a node reading its copy and sending it over TLS to the worker (the worker runs as
a mesh task, as another user, and has no path to the node's store), the bytes checked
against the object id on both ends. Both decode the same parquet in the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import distributed
import numpy as np
import pandas as pd

import meshscale.client.fs  # registers meshscale://
from meshscale.client import connect
from meshscale.client.rpc import request
from meshscale.core.api import Empty
from meshscale.core.api.objects import DP_STATS
from meshscale.dask import cluster
from meshscale.runtime.launcher import LocalMesh
from meshscale.trust.bundle import load_bundle, write_client_bundle

KEYS = ("mesh_dask_s", "local_dask_s", "mesh_bytes_moved_mb")
MB = 1e6
WORKERS = 4
GROUPS = 1000


def make_files(local: Path, n_files: int, rows: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_files):
        df = pd.DataFrame({"key": rng.integers(0, GROUPS, rows, dtype=np.int64),
                           "value": rng.random(rows),
                           "qty": rng.integers(1, 100, rows, dtype=np.int64)})
        p = local / f"part-{i:03d}.parquet"
        df.to_parquet(p, index=False)
        out.append(p)
    return out


def group_by(client: distributed.Client, ddf: Any) -> pd.DataFrame:
    # split_out=1: a tree reduction of per-partition partials (Dask would otherwise pick
    # a shuffle for many partitions, moving whole partitions between workers).
    got = client.compute(ddf.groupby("key").agg({"value": "sum", "qty": ["sum", "count"]},
                                                split_out=1)).result()
    got.columns = ["value", "qty", "rows"]
    return got.sort_index()


def counters(m: LocalMesh) -> dict[str, int]:
    creds = m.credentials()
    out = {"read_served_bytes": 0, "bytes_sent": 0}
    for n in m.nodes:
        st = request(n.address, creds, DP_STATS, Empty(), timeout=30).dataplane
        for k in out:
            out[k] += int(st.get(k, 0))
    return out


def worker_opts(m: LocalMesh, d: Path) -> dict[str, Any]:
    """Storage options the mesh's Dask workers can use (a bundle their user can read)."""
    os.chmod(d, 0o711)
    out = d / "dask-client"
    write_client_bundle(load_bundle(m.admin_path), "bench-dask", out)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for p in [out, *out.iterdir()]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    return {"address": m.nodes[0].address, "bundle": str(out)}


def warm() -> None:
    """Imports a worker's first read and group-by pay, paid before the clock starts
    (both clusters)."""
    import dask.dataframe  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    import meshscale.client.fs  # noqa: F401


def transfer_bytes(client: distributed.Client) -> int:
    def sent(dask_worker: Any) -> int:
        return int(getattr(dask_worker, "transfer_outgoing_bytes_total", 0))

    return sum(client.run(sent).values())


def task_seconds(records: list[dict[str, Any]], prefix: str = "") -> float:
    """Seconds the workers spent computing the tasks (whose key starts with ``prefix``)
    of a task stream (Dask's own start/stop records; transfers not counted)."""
    return sum(ss["stop"] - ss["start"] for r in records if str(r["key"]).startswith(prefix)
               for ss in r.get("startstops", ()) if ss.get("action") == "compute")


def mesh_round(c: Any, client: distributed.Client, meta: pd.DataFrame
               ) -> tuple[float, float, pd.DataFrame, list[Any], list[dict[str, Any]]]:
    """One locality run on the mesh: (setup s, compute s, result, the read futures, the
    task stream). Setup is ``read_parts`` in this process (names listed, holders looked
    up, workers' nodes from the mesh's task records, the reads submitted); compute is
    from there to the result here."""
    with distributed.get_task_stream(client=client) as ts:
        t0 = time.monotonic()
        parts = c.read_parts("meshscale://bench/", client=client)
        t1 = time.monotonic()
        got = group_by(client, dd.from_delayed(parts, meta=meta, verify_meta=False))
        t2 = time.monotonic()
    return t1 - t0, t2 - t1, got, parts, list(ts.data)


def local_round(client: distributed.Client, local: Path
                ) -> tuple[float, pd.DataFrame, list[dict[str, Any]]]:
    with distributed.get_task_stream(client=client) as ts:
        t0 = time.monotonic()
        got = group_by(client, dd.read_parquet(str(local)))
        t1 = time.monotonic()
    return t1 - t0, got, list(ts.data)


def run_both(m: LocalMesh, d: Path, local: Path, files: list[Path], rounds: int,
             res: dict[str, float]) -> bool:
    """Both clusters up at once, their runs alternated ``rounds`` times (mesh, local,
    mesh, local, ...), so that both see the same machine load; the times reported are
    the medians of the rounds, every round printed. Returns whether all results agree."""
    opts = {"address": m.nodes[0].address, "bundle": str(m.bundle_path)}
    fs = meshscale.client.fs.MeshFileSystem(**opts, replicas=2, w=2)
    sizes: dict[str, int] = {}
    for p in files:
        name = f"meshscale://bench/{p.name}"
        fs.pipe_file(name, p.read_bytes())
        sizes[name] = p.stat().st_size
    wopts = worker_opts(m, d)
    meta = pd.read_parquet(files[0]).iloc[:0]
    ok = True
    with connect(m.nodes[0].address, bundle=m.bundle_path) as mesh, \
            distributed.LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                                     dashboard_address=None) as lc, \
            distributed.Client(lc, set_as_default=False) as lclient:
        lclient.run(warm)
        t0 = time.monotonic()
        with cluster(mesh, workers=WORKERS, threads=1, inputs=["meshscale://bench/"],
                     storage_options=wopts) as c, \
                distributed.Client(c, set_as_default=False) as client:
            res["mesh_cluster_start_s"] = time.monotonic() - t0
            on = c.worker_nodes()
            res["mesh_worker_nodes"] = float(len(set(on.values())))
            client.run(warm)
            setups, computes, totals, locals_ = [], [], [], []
            first: pd.DataFrame | None = None
            moved_max = 0.0
            res["mesh_worker_nodes_changed"] = 0.0
            for r in range(rounds):
                before, moved0 = counters(m), transfer_bytes(client)
                setup_s, compute_s, got, parts, stream = mesh_round(c, client, meta)
                after, moved1 = counters(m), transfer_bytes(client)
                # The workers as the cluster sees them now (the mesh's task records) and
                # as they were at the start: a difference is a worker the mesh ran again
                # (once every worker task past 60 s, before the scheduler's beats).
                changed = c.worker_nodes() != on
                res["mesh_worker_nodes_changed"] += float(changed)
                who = client.who_has(parts)
                nonlocal_bytes = 0
                for name, part in zip(sorted(sizes), parts, strict=True):
                    holders = set(fs.info(name)["holders"])
                    if not {on.get(w) for w in who[part.key]} & holders:
                        nonlocal_bytes += sizes[name]
                del parts
                moved = {"mesh_nonlocal_read_mb": nonlocal_bytes / MB,
                         "mesh_node_copy_mb": (after["bytes_sent"] - before["bytes_sent"]) / MB,
                         "mesh_dask_transfer_mb": (moved1 - moved0) / MB,
                         "mesh_read_served_mb": (after["read_served_bytes"]
                                                 - before["read_served_bytes"]) / MB}
                total_moved = (moved["mesh_nonlocal_read_mb"] + moved["mesh_node_copy_mb"]
                               + moved["mesh_dask_transfer_mb"])
                moved_max = max(moved_max, total_moved)
                local_s, lgot, lstream = local_round(lclient, local)
                if first is None:
                    first = got
                    res["mesh_read_tasks_s"] = task_seconds(stream, "meshscale-read-")
                    res["mesh_tasks_s"] = task_seconds(stream)
                    res["local_tasks_s"] = task_seconds(lstream)
                    res["mesh_dask_first_s"] = setup_s + compute_s
                    res["local_dask_first_s"] = local_s
                    res.update(moved)
                    res["mesh_bytes_moved_mb"] = total_moved
                    ok = ok and same(got, lgot)
                    res["same_result"] = float(same(got, lgot))
                else:
                    res["rerun_same_result"] = float(same(first, got) and same(first, lgot))
                setups.append(setup_s)
                computes.append(compute_s)
                totals.append(setup_s + compute_s)
                locals_.append(local_s)
                print(f"round {r + 1}: mesh {setup_s + compute_s:.2f} s (setup {setup_s:.2f} "
                      f"+ compute {compute_s:.2f}), local {local_s:.2f} s, mesh moved "
                      f"{total_moved:.2f} MB (nonlocal reads "
                      f"{moved['mesh_nonlocal_read_mb']:.2f}, Dask transfers "
                      f"{moved['mesh_dask_transfer_mb']:.2f}, node copies "
                      f"{moved['mesh_node_copy_mb']:.2f})"
                      + (", workers' records changed" if changed else ""), flush=True)
            res["mesh_dask_s"] = statistics.median(totals)
            res["local_dask_s"] = statistics.median(locals_)
            res["mesh_dask_setup_s"] = statistics.median(setups)
            res["mesh_dask_compute_s"] = statistics.median(computes)
            res["mesh_bytes_moved_max_mb"] = moved_max
            res["mesh_over_local"] = res["mesh_dask_s"] / res["local_dask_s"]
            assert first is not None
            before = counters(m)
            t0 = time.monotonic()
            plain = group_by(client, dd.read_parquet("meshscale://bench/",
                                                     storage_options=wopts))
            res["mesh_plain_dask_s"] = time.monotonic() - t0
            res["mesh_plain_read_served_mb"] = (counters(m)["read_served_bytes"]
                                                - before["read_served_bytes"]) / MB
            res["plain_same_result"] = float(same(first, plain))
    return ok


def same(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return (a.index.equals(b.index) and a["rows"].astype("int64").equals(b["rows"].astype("int64"))
            and a["qty"].astype("int64").equals(b["qty"].astype("int64"))
            and bool(np.allclose(a["value"], b["value"], rtol=1e-6)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="batch (Dask group-by) benchmark")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rounds", type=int, default=None,
                    help="alternated mesh/local runs (default: 2 quick, 3 full)")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if not 2 <= args.rounds <= 20:
        print(f"batch.py: --rounds must be from 2 to 20, not {args.rounds}", file=sys.stderr)
        return 2
    n_files, rows = (8, 560_000) if args.quick else (32, 2_800_000)
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"seed {seed}")
    res: dict[str, float] = {}
    d = Path(tempfile.mkdtemp(prefix="meshscale-bench-batch-"))
    try:
        local = d / "local"
        local.mkdir()
        files = make_files(local, n_files, rows, seed)
        res["input_mb"] = sum(p.stat().st_size for p in files) / MB
        with LocalMesh(d / "mesh", 4) as m:
            run_both(m, d, local, files, args.rounds, res)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    notes = {
        "mesh_dask_s": "Dask on 4 mesh workers, read_parts (locality): median of rounds",
        "local_dask_s": "Dask LocalCluster (4 procs), local dir: median of rounds",
        "mesh_bytes_moved_mb": "nonlocal reads + node copies + Dask transfers (round 1)",
        "mesh_nonlocal_read_mb": "files read by a worker on a non-holder (round 1)",
        "mesh_node_copy_mb": "nodes' data-plane bytes_sent (copies), round 1",
        "mesh_dask_transfer_mb": "Dask worker-to-worker transfers, round 1",
        "mesh_read_served_mb": "nodes' read_served_bytes, round 1 (all reads)",
        "mesh_cluster_start_s": "4 worker tasks placed, started, joined (not timed above)",
        "mesh_worker_nodes": "distinct nodes the 4 workers ran on",
        "mesh_worker_nodes_changed": "rounds after which worker_nodes() differed from start",
        "mesh_dask_first_s": "round 1 on the mesh (workers' node connections cold)",
        "local_dask_first_s": "round 1 locally",
        "same_result": "1: mesh and local totals equal (round 1)",
        "rerun_same_result": "1: every later round's totals equal round 1's",
        "mesh_dask_setup_s": "read_parts in the caller (names, holders, submit): median",
        "mesh_dask_compute_s": "from the reads' submission to the result: median",
        "mesh_bytes_moved_max_mb": "bytes moved, the most of any round",
        "mesh_read_tasks_s": "round 1: workers' compute time in the read tasks, summed",
        "mesh_tasks_s": "round 1: workers' compute time in all tasks (reads, group-by)",
        "local_tasks_s": "round 1: the local workers' compute time in all tasks",
        "mesh_over_local": "mesh_dask_s / local_dask_s (target <= 1.2)",
        "mesh_plain_dask_s": "same workers, plain dd.read_parquet(meshscale://)",
        "mesh_plain_read_served_mb": "nodes' read_served_bytes for the plain run",
        "plain_same_result": "1: plain run's totals equal the locality run's",
        "input_mb": "parquet bytes, on disk and on the mesh (2 copies each)",
    }
    print(f"{'metric':<26}  {'value':>10}  note")
    for k in (*KEYS, *(k for k in res if k not in KEYS)):
        print(f"{k:<26}  {res[k]:>10.2f}  {notes.get(k, '')}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {k: res[k] for k in KEYS} | {k: v for k, v in res.items() if k not in KEYS}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if res.get("same_result") == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
