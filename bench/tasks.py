"""Compute plane benchmark: meshscale vs Ray vs Dask, four workloads, one run.

    python bench/tasks.py [--quick] [--only meshscale,ray,dask] --json out.json

Each system gets a 4-node cluster on 127.0.0.1, built the way a user would build it with
the system's defaults:

- meshscale: ``LocalMesh`` of 4 node processes (3 regions, no latency emulation);
- Ray: ``ray.cluster_utils.Cluster``, a head and 3 more nodes, 1 CPU each, pinned to
  127.0.0.1, dashboard and usage stats off;
- Dask: ``LocalCluster(n_workers=4, threads_per_worker=1, processes=True)``.

Workloads (``--quick`` sizes in brackets):

- ``noop_tasks_per_s``: 10,000 [1,000] no-op tasks from one client through each system's
  batch API (``mesh.map``, a list of ``f.remote``, ``client.map``), until all results are in;
- ``noop_latency_p50_ms`` / ``_p99_ms``: sequential submit -> result of one no-op, 500 [200]
  times after 20 warm-up calls;
- ``locality_bytes_moved_mb``: 40 [8] objects of 20 MB [2 MB] spread over the four nodes,
  then 200 [40] tasks that each read one of them (hash the bytes, then 50 ms of simulated
  work) with the object passed as the argument. Bytes moved = the input size for every task
  that ran on a node holding no copy of its input at the time (a node that fetched a copy
  keeps it in Ray and Dask, so a second read there is local);
- ``kill_one_node_makespan_s``: the same tasks again, with one node (never the one the
  client talks to) killed hard once a third of them have succeeded; the clock runs from the
  first submit to the last *successful* result. A task that fails is not finished: it is
  counted in ``kill_failed_tasks`` and not timed (``kill_all_results_s`` runs to the last
  result, failed or not; ``kill_at_s`` in the JSON says when the kill came, so the
  makespan less it is the recovery). Ray and Dask rebuild a lost input from its
  lineage; meshscale keeps 3 copies, made before the clock starts, and has no lineage;
- ``*_1_replica`` (meshscale only): the locality run, and the kill run on a fresh 4-node
  mesh (warmed up the same way), with one copy of each input, as Ray and Dask keep: an
  input whose one copy was on the killed node is lost, and its tasks fail;
- ``idle_rss_mb``: the resident memory of the idle 4-node cluster, summed over its processes.

``--map-size N`` runs something else, meshscale alone: one ``mesh.imap`` of N no-ops
through the first node of a 3-node ``LocalMesh`` (one task slot per node), every result
taken in order as it comes, and reports ``map_tasks_per_s`` (N over first submit -> last
result), ``owner_rss_mb_after`` (the RSS of the node that owned the tasks, its worker
processes not counted, ``MAP_SETTLE_S`` after the last result; ``owner_rss_mb_idle`` is
the same before the map), ``client_rss_mb_peak`` (this process, sampled every 50 ms
during the map; ``client_rss_mb_before`` before it) and the owner's task records in
memory after (``owner_task_records``).

Each system runs in its own try/except and always tears its cluster down: a system that
fails (or, for meshscale, lacks the task API) is reported as ``null`` with a reason under
``errors``, and the others still run. Prints one table (metrics x systems) and writes JSON:
``{"meshscale": {...} | null, "ray": ..., "dask": ..., "errors": {...}, "config": ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
# Pin Ray to loopback. `node_ip_address="127.0.0.1"` alone is not enough: ray.init turns a
# loopback address into the machine's interface address (services.resolve_ip_for_localhost)
# and then waits forever for a GCS there. With this, Ray's own address lookup answers
# 127.0.0.1 (it is what Ray does by default on macOS and Windows).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

HOST = "127.0.0.1"
NODES = 4
MB = 1_000_000
SYSTEMS = ("meshscale", "ray", "dask")
KEYS = (
    "noop_tasks_per_s",
    "noop_latency_p50_ms",
    "noop_latency_p99_ms",
    "locality_bytes_moved_mb",
    "kill_one_node_makespan_s",
    "kill_failed_tasks",
    "kill_all_results_s",
    "idle_rss_mb",
)
# meshscale only, on inputs with one copy each: Ray and Dask keep one copy of an object
# by default, so their rows above already are the one-copy figures.
ONE_REPLICA_KEYS = (
    "locality_bytes_moved_mb_1_replica",
    "kill_one_node_makespan_s_1_replica",
    "kill_failed_tasks_1_replica",
    "kill_all_results_s_1_replica",
)
TASK_TIMEOUT_S = 300.0
# Ray's per-node object store. cluster_utils defaults to 150 MiB (a test setting that
# would spill this workload to disk); `ray start` gives 30% of RAM per node, which on one
# machine with four nodes would overcommit it. 1 GiB holds the workload without spilling.
RAY_OBJECT_STORE_BYTES = 1 << 30


@dataclass(frozen=True)
class Params:
    noops: int
    latency_samples: int
    objects: int
    object_bytes: int
    tasks: int
    work_s: float = 0.05
    warmup: int = 20


FULL = Params(noops=10_000, latency_samples=500, objects=40, object_bytes=20 * MB, tasks=200)
QUICK = Params(noops=1_000, latency_samples=200, objects=8, object_bytes=2 * MB, tasks=40)


class Unavailable(Exception):
    """The system cannot be benchmarked here (missing package or API)."""


# ---------------------------------------------------------------- task bodies (all systems)


def noop(i: int) -> int:
    return i


def make_blob(i: int, size: int) -> bytes:
    # Distinct content per object (content addressing must not dedupe them).
    head = hashlib.blake2b(str(i).encode()).digest()
    return (head * (size // len(head) + 1))[:size]


def digest_and_work(blob: Any, work_s: float) -> int:
    data = blob if isinstance(blob, bytes | bytearray | memoryview) else None
    if data is None:
        return -1
    hashlib.blake2b(data).digest()
    time.sleep(work_s)
    return len(data)


def meshscale_node_name() -> str:
    """The meshscale node this worker runs under: ``MESHSCALE_NODE`` if the runtime sets it,
    otherwise the ``--name`` of the nearest ``meshscale node start`` ancestor process, or
    for the nearest ``agent_main --config DIR/NAME.toml`` one (how LocalMesh starts its
    nodes: the file is named after the node, and a worker may not be allowed to read it)
    its NAME."""
    name = os.environ.get("MESHSCALE_NODE")
    if name:
        return name
    pid = os.getppid()
    for _ in range(8):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--name" in argv:
                return argv[argv.index(b"--name") + 1].decode()
            if b"meshscale.runtime.agent_main" in argv and b"--config" in argv:
                return Path(argv[argv.index(b"--config") + 1].decode()).stem
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        if pid <= 1:
            break
    return "?"


def ms_read(blob: Any, work_s: float) -> tuple[str, int]:
    return meshscale_node_name(), digest_and_work(blob, work_s)


def ray_read(blob: Any, work_s: float) -> tuple[str, int]:
    import ray

    return ray.get_runtime_context().get_node_id(), digest_and_work(blob, work_s)


def ray_make(i: int, size: int) -> tuple[bytes, str]:
    import ray

    return make_blob(i, size), ray.get_runtime_context().get_node_id()


def dask_read(blob: Any, work_s: float) -> tuple[str, int]:
    from distributed import get_worker

    return get_worker().address, digest_and_work(blob, work_s)


# ---------------------------------------------------------------- measurement helpers


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def tree_rss_mb(root_pids: Iterable[int], exclude: set[int] | None = None
                ) -> tuple[float, int]:
    """RSS (MB) summed over the given processes and all their descendants, and their count."""
    import psutil

    seen: set[int] = set(exclude or ())
    total, count = 0, 0
    for pid in root_pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
                count += 1
    return total / MB, count


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / MB


def own_children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


_tracked: dict[int, float] = {}


def track() -> None:
    """Remember every process below this one, to check after teardown that none is left."""
    import psutil

    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "multiprocessing.resource_tracker" in " ".join(p.cmdline()):
                continue  # this interpreter's helper; it exits with us
            _tracked.setdefault(p.pid, p.create_time())


def bytes_moved(runs: list[tuple[int, str]], holders: dict[int, set[str]], size: int,
                caches: bool) -> int:
    """``runs``: (object index, node it ran on) in completion order; ``holders``: nodes that
    held each object beforehand. A read on a node without a copy moves ``size`` bytes; if
    the system keeps fetched copies (``caches``), that node holds one afterwards."""
    copies = {k: set(v) for k, v in holders.items()}
    moved = 0
    for obj, node in runs:
        if node not in copies[obj]:
            moved += size
            if caches:
                copies[obj].add(node)
    return moved


def settle(seconds: float = 3.0) -> None:
    time.sleep(seconds)  # let lazily started processes (worker pools) come up before RSS


MAP_NODES = 3
MAP_SETTLE_S = 5.0
MAP_PROGRESS_LINES = 20
"""A long map prints how far it got on stderr about this many times."""
MAP_PROGRESS_MIN = 10_000
"""Fewest results between two of those lines (a short map prints none)."""
MAP_KEYS = ("map_tasks", "map_tasks_per_s", "map_s", "owner_rss_mb_idle",
            "owner_rss_mb_after", "owner_task_records", "client_rss_mb_before",
            "client_rss_mb_peak")


class _PeakRss:
    """This process's peak RSS (MB), sampled every ``period_s`` on a thread."""

    def __init__(self, period_s: float = 0.05) -> None:
        import threading

        self.peak = rss_mb(os.getpid())
        self._stop = threading.Event()
        self._period_s = period_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self.peak = max(self.peak, rss_mb(os.getpid()))

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(os.getpid()))


def run_map(n: int, out: dict[str, Any]) -> None:
    """One ``imap`` of ``n`` no-ops on a 3-node mesh (see the module docstring)."""
    meshscale, _, _ = _ms_api()
    from meshscale.core.api import Empty
    from meshscale.core.api.tasks import TASK_STATS
    from meshscale.runtime.launcher import LocalMesh, temporary_mesh_dir

    with temporary_mesh_dir("bench-map-") as tmp:
        lm = LocalMesh(Path(tmp), MAP_NODES, http=False, node_settings={"cpus": 1})
        try:
            lm.start()
            lm.wait_converged(60)
            with meshscale.connect(lm.nodes[0].address, bundle=lm.bundle_path) as mesh:
                owner = lm.processes()[0].pid
                assert sum(1 for _ in mesh.imap(noop, range(100))) == 100  # warm up
                settle()
                out["owner_rss_mb_idle"] = round(rss_mb(owner), 1)
                out["client_rss_mb_before"] = round(rss_mb(os.getpid()), 1)
                got = 0
                step = max(MAP_PROGRESS_MIN, n // MAP_PROGRESS_LINES)
                t0 = time.perf_counter()
                with _PeakRss() as peak:
                    for i, v in enumerate(mesh.imap(noop, range(n))):
                        if v != i:
                            raise AssertionError(f"result {i} is {v!r}: out of order")
                        got += 1
                        if got % step == 0 and got < n:
                            # On stderr: how far a long map got, if it is cut short.
                            t = time.perf_counter() - t0
                            print(f"map: {got} of {n} results in {t:.1f} s "
                                  f"({got / t:.1f}/s)", file=sys.stderr, flush=True)
                took = time.perf_counter() - t0
                if got != n:
                    raise AssertionError(f"{got} results of {n}")
                out["map_tasks"] = n
                out["map_s"] = round(took, 2)
                out["map_tasks_per_s"] = round(n / took, 1)
                out["client_rss_mb_peak"] = round(peak.peak, 1)
                time.sleep(MAP_SETTLE_S)
                out["owner_rss_mb_after"] = round(rss_mb(owner), 1)
                st = mesh._run(mesh._inner._request(TASK_STATS, Empty()))
                out["owner_task_records"] = st.records
        finally:
            track()
            lm.stop()


def map_table(out: dict[str, Any]) -> str:
    rows = [("metric", "meshscale")] + [(k, fmt(out.get(k))) for k in MAP_KEYS]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{r[0].ljust(w0)}  {r[1].rjust(w1)}" for r in rows]
    lines.insert(1, f"{'-' * w0}  {'-' * w1}")
    return "\n".join(lines)


class KillRun:
    """The clock and the tally of a kill run. ``start()`` just before the first submit;
    ``done(ok)`` for each result as it arrives. ``kill`` is called once a third of the
    tasks have *succeeded*. The makespan runs from the first submit to the last successful
    result: a failed task is not a finished one, and is counted apart."""

    def __init__(self, total: int, kill: Callable[[], None]) -> None:
        self.total = total
        self.kill = kill
        self.fired = False
        self.ok = 0
        self.failed = 0
        self.t0 = 0.0
        self.last_ok = 0.0
        self.last_any = 0.0
        self.kill_at = 0.0
        self.ends: list[float] = []
        """When each result came (seconds from ``start``), failed or not."""

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def done(self, ok: bool) -> None:
        now = time.perf_counter() - self.t0
        self.last_any = now
        self.ends.append(now)
        if ok:
            self.ok += 1
            self.last_ok = now
        else:
            self.failed += 1
        if not self.fired and self.ok >= self.total // 3:
            self.fired = True
            self.kill_at = now
            self.kill()

    def report(self, out: dict[str, Any], suffix: str = "") -> None:
        out[f"kill_one_node_makespan_s{suffix}"] = round(self.last_ok, 2) if self.ok else None
        out[f"kill_failed_tasks{suffix}"] = self.failed
        out[f"kill_all_results_s{suffix}"] = round(self.last_any, 2)
        # Results per second of the run (where a recovery stalls, or only slows).
        per_s = [0] * (int(self.last_any) + 1)
        for t in self.ends:
            per_s[int(t)] += 1
        out[f"kill_results_per_s{suffix}"] = per_s
        if self.fired:
            # When the kill came: the makespan less this is the run's recovery.
            out[f"kill_at_s{suffix}"] = round(self.kill_at, 2)
        else:
            out[f"kill_not_fired{suffix}"] = True


def input_copies(holders: dict[int, set[str]], victim: str, out: dict[str, Any],
                 suffix: str = "") -> None:
    """Copies of the kill run's inputs when its clock starts: the mean per object, and the
    objects whose every copy is on the node that will be killed (rebuilt, or lost)."""
    out[f"kill_input_copies_mean{suffix}"] = round(
        statistics.mean(len(h) for h in holders.values()), 2)
    out[f"kill_inputs_only_on_victim{suffix}"] = sum(
        1 for h in holders.values() if h and h <= {victim})


# ---------------------------------------------------------------- Ray


def run_ray(p: Params, out: dict[str, Any]) -> None:
    try:
        import ray
        from ray.cluster_utils import Cluster
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    except ImportError as e:
        raise Unavailable(f"ray not installed ({e}); make bench-peers") from None

    before = own_children()
    t0 = time.perf_counter()
    node_args = {
        "num_cpus": 1,
        "node_ip_address": HOST,
        "object_store_memory": RAY_OBJECT_STORE_BYTES,
    }
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node_args, "include_dashboard": False},
    )
    try:
        workers = [cluster.add_node(**node_args) for _ in range(NODES - 1)]
        ray.init(address=cluster.address, _node_ip_address=HOST, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
        cluster.wait_for_nodes()
        out["startup_s"] = round(time.perf_counter() - t0, 2)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == NODES, f"{len(nodes)} Ray nodes alive, expected {NODES}"
        addrs = {n["NodeManagerAddress"] for n in ray.nodes()}
        assert addrs == {HOST}, f"Ray nodes not on loopback: {addrs}"
        settle()
        rss, out["idle_processes"] = tree_rss_mb([os.getpid()], exclude=before | {os.getpid()})
        out["idle_rss_mb"] = round(rss, 1)

        r_noop = ray.remote(noop)
        r_make = ray.remote(num_returns=2)(ray_make)
        r_read = ray.remote(ray_read)

        ray.get([r_noop.remote(i) for i in range(p.warmup)], timeout=TASK_TIMEOUT_S)
        t = time.perf_counter()
        ray.get([r_noop.remote(i) for i in range(p.noops)], timeout=TASK_TIMEOUT_S)
        out["noop_tasks_per_s"] = round(p.noops / (time.perf_counter() - t), 1)

        lat = []
        for i in range(p.latency_samples):
            t = time.perf_counter()
            ray.get(r_noop.remote(i), timeout=TASK_TIMEOUT_S)
            lat.append((time.perf_counter() - t) * 1000)
        out["noop_latency_p50_ms"] = round(percentile(lat, 50), 3)
        out["noop_latency_p99_ms"] = round(percentile(lat, 99), 3)

        # Objects are made by tasks pinned (softly, so lineage can rebuild them elsewhere
        # after a node dies) to each node in turn: their primary copy lives there.
        blobs, where = [], []
        for i in range(p.objects):
            strategy = NodeAffinitySchedulingStrategy(nodes[i % NODES], soft=True)
            b, w = r_make.options(scheduling_strategy=strategy).remote(i, p.object_bytes)
            blobs.append(b)
            where.append(w)
        holders = {i: {n} for i, n in enumerate(ray.get(where, timeout=TASK_TIMEOUT_S))}
        ray.wait(blobs, num_returns=len(blobs), timeout=TASK_TIMEOUT_S, fetch_local=False)

        inputs = [i % p.objects for i in range(p.tasks)]
        refs = [r_read.remote(blobs[k], p.work_s) for k in inputs]
        index = {r: k for r, k in zip(refs, inputs, strict=True)}
        runs, pending = [], list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=TASK_TIMEOUT_S)
            if not ready:
                raise TimeoutError("locality tasks did not finish")
            node, n = ray.get(ready[0])
            assert n == p.object_bytes, f"task read {n} bytes"
            runs.append((index[ready[0]], node))
        moved = bytes_moved(runs, holders, p.object_bytes, caches=True)
        out["locality_bytes_moved_mb"] = round(moved / MB, 1)
        out["locality_remote_reads"] = moved // p.object_bytes

        # Kill: a worker node (the driver is attached to the head), processes SIGKILLed.
        victim = workers[0]
        victim_id = getattr(victim, "node_id", victim.unique_id)
        from ray.experimental import get_object_locations

        locs = get_object_locations(blobs, timeout_ms=10_000)
        input_copies({i: set(locs[b]["node_ids"]) if b in locs else set()
                      for i, b in enumerate(blobs)}, victim_id, out)

        def kill() -> None:
            track()
            cluster.remove_node(victim, allow_graceful=False)
            out["killed_node"] = victim_id

        run = KillRun(p.tasks, kill)
        run.start()
        pending = [r_read.remote(blobs[k], p.work_s) for k in inputs]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=TASK_TIMEOUT_S)
            if not ready:
                raise TimeoutError("kill-run tasks did not finish")
            try:
                ok = ray.get(ready[0])[1] == p.object_bytes
            except Exception:
                ok = False
            run.done(ok)
        run.report(out)
    finally:
        track()
        with contextlib.suppress(Exception):
            ray.shutdown()
        with contextlib.suppress(Exception):
            cluster.shutdown()


# ---------------------------------------------------------------- Dask


def run_dask(p: Params, out: dict[str, Any]) -> None:
    try:
        from distributed import Client, LocalCluster, as_completed, wait
    except ImportError as e:
        raise Unavailable(f"dask[distributed] not installed ({e}); make bench-peers") \
            from None

    before = own_children()
    driver_before = rss_mb(os.getpid())
    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=NODES, threads_per_worker=1, processes=True, host=HOST,
                           dashboard_address=None)
    client = None
    try:
        client = Client(cluster)
        client.wait_for_workers(NODES, timeout=60)
        out["startup_s"] = round(time.perf_counter() - t0, 2)
        settle()
        # The scheduler and the nannies live in this (driver) process: count its growth.
        workers_rss, n = tree_rss_mb([os.getpid()], exclude=before | {os.getpid()})
        out["idle_processes"] = n + 1
        out["idle_rss_mb"] = round(workers_rss + rss_mb(os.getpid()) - driver_before, 1)

        addrs = sorted(client.scheduler_info()["workers"])
        assert all(a.startswith(f"tcp://{HOST}:") for a in addrs), addrs

        client.gather(client.map(noop, range(p.warmup), pure=False))
        t = time.perf_counter()
        client.gather(client.map(noop, range(p.noops), pure=False))
        out["noop_tasks_per_s"] = round(p.noops / (time.perf_counter() - t), 1)

        lat = []
        for i in range(p.latency_samples):
            t = time.perf_counter()
            client.submit(noop, i, pure=False).result(timeout=TASK_TIMEOUT_S)
            lat.append((time.perf_counter() - t) * 1000)
        out["noop_latency_p50_ms"] = round(percentile(lat, 50), 3)
        out["noop_latency_p99_ms"] = round(percentile(lat, 99), 3)

        # Objects made by tasks on each worker in turn (allow_other_workers so the scheduler
        # can recompute them elsewhere after a worker dies; scattered data could not be).
        blobs = [
            client.submit(make_blob, i, p.object_bytes, workers=[addrs[i % NODES]],
                          allow_other_workers=True, pure=False)
            for i in range(p.objects)
        ]
        wait(blobs, timeout=TASK_TIMEOUT_S)
        who = client.who_has(blobs)
        holders = {i: set(who[b.key]) for i, b in enumerate(blobs)}
        sent0 = sum(client.run(_dask_bytes_sent).values())

        inputs = [i % p.objects for i in range(p.tasks)]
        futs = [client.submit(dask_read, blobs[k], p.work_s, pure=False) for k in inputs]
        index = {f.key: k for f, k in zip(futs, inputs, strict=True)}
        runs = []
        for f in as_completed(futs, timeout=TASK_TIMEOUT_S):
            node, n = f.result()
            assert n == p.object_bytes, f"task read {n} bytes"
            runs.append((index[f.key], node))
        moved = bytes_moved(runs, holders, p.object_bytes, caches=True)
        out["locality_bytes_moved_mb"] = round(moved / MB, 1)
        out["locality_remote_reads"] = moved // p.object_bytes
        out["locality_bytes_sent_counter_mb"] = round(
            (sum(client.run(_dask_bytes_sent).values()) - sent0) / MB, 1)
        del futs

        # Kill: SIGKILL one worker process and keep its nanny from restarting it, which is
        # what losing the machine looks like (a nanny would otherwise bring it back).
        victim = addrs[1]
        nanny = next(n for n in cluster.workers.values() if n.worker_address == victim)
        pid = nanny.process.pid
        who = client.who_has(blobs)
        input_copies({i: set(who[b.key]) for i, b in enumerate(blobs)}, victim, out)

        def kill() -> None:
            track()
            nanny.restart = _no_restart  # type: ignore[method-assign]
            nanny.instantiate = _no_instantiate  # type: ignore[method-assign]
            os.kill(pid, signal.SIGKILL)
            out["killed_node"] = victim

        run = KillRun(p.tasks, kill)
        run.start()
        futs = [client.submit(dask_read, blobs[k], p.work_s, pure=False) for k in inputs]
        for f in as_completed(futs, timeout=TASK_TIMEOUT_S):
            try:
                ok = f.result()[1] == p.object_bytes
            except Exception:
                ok = False
            run.done(ok)
        run.report(out)
        out["workers_after_kill"] = len(client.scheduler_info()["workers"])
    finally:
        track()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=10)
        with contextlib.suppress(Exception):
            cluster.close(timeout=20)


def _dask_bytes_sent(dask_worker: Any) -> int:
    return int(dask_worker.transfer_outgoing_bytes_total)


async def _no_restart(*args: Any, **kwargs: Any) -> str:
    return "OK"


async def _no_instantiate(*args: Any, **kwargs: Any) -> Any:
    from distributed.core import Status

    return Status.closed


# ---------------------------------------------------------------- meshscale


def _ms_api() -> tuple[Any, Callable[..., Any], Callable[..., Any]]:
    """meshscale's task API, or ``Unavailable`` saying what is missing."""
    try:
        import meshscale

        return meshscale, meshscale.task, meshscale.as_completed
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"meshscale task API not available: {e}") from None


def _ms_submit(mesh: Any, f: Any, *args: Any) -> Any:
    # mesh.submit, not f.submit: f.submit goes to the *last* connect(), and this run holds
    # one connection per node.
    return mesh.submit(f, *args)


def _ms_result(fut: Any) -> Any:
    return fut.result(timeout=TASK_TIMEOUT_S)


def _ms_gather(mesh: Any, futs: list[Any]) -> list[Any]:
    """All results, waiting for the batch at once (one poll per round, not per future)."""
    _, pending = mesh.wait(futs, timeout=TASK_TIMEOUT_S)
    if pending:
        raise TimeoutError(f"{len(pending)} meshscale tasks not finished")
    return [_ms_result(f) for f in futs]


@contextlib.contextmanager
def _ms_cluster() -> Iterator[tuple[Any, list[Any]]]:
    """A fresh 4-node ``LocalMesh`` and one client connection per node."""
    meshscale, _, _ = _ms_api()
    from meshscale.runtime.launcher import LocalMesh, temporary_mesh_dir

    # Traversable by the worker user, as a node's data dir on a host is (/var/lib): a
    # node run as root links local input objects for its workers. Below a 0700 temp dir
    # every input went to the worker by value (its bytes read by the node, pickled and
    # piped: 20 MB per task in the full mode), which Ray's and Dask's workers, reading
    # their own store or memory, never pay (runtime/launcher.mesh_temp_dir).
    with temporary_mesh_dir("bench-tasks-") as tmp:
        # HTTP (API + dashboard) off, as Ray's and Dask's dashboards are here.
        lm = LocalMesh(Path(tmp), NODES, regions=["eu-west", "us-east", "ap-south"],
                       http=False)
        meshes: list[Any] = []
        try:
            # One task slot per node, as Ray (num_cpus=1) and Dask (threads_per_worker=1)
            # get here; a node's default is the machine's CPU count.
            old = os.environ.get("MESHSCALE_CPUS")
            os.environ["MESHSCALE_CPUS"] = "1"
            try:
                lm.start()
            finally:
                if old is None:
                    os.environ.pop("MESHSCALE_CPUS", None)
                else:
                    os.environ["MESHSCALE_CPUS"] = old
            lm.wait_converged(60)
            meshes = [meshscale.connect(n.address, bundle=lm.bundle_path) for n in lm.nodes]
            yield lm, meshes
        finally:
            track()
            for m in meshes:
                with contextlib.suppress(Exception):
                    m.close()
            lm.stop()


def _ms_put_inputs(meshes: list[Any], p: Params, replicas: int, first: int = 0
                   ) -> tuple[list[Any], dict[int, set[str]], float]:
    """``p.objects`` objects put through each node in turn with ``replicas`` copies (placed
    by rendezvous hashing): their refs, their holders, and the seconds the puts took."""
    t = time.perf_counter()
    kw = {} if replicas == 3 else {"replicas": replicas, "w": min(replicas, 2)}
    refs = [meshes[i % NODES].put(make_blob(first + i, p.object_bytes), **kw)
            for i in range(p.objects)]
    took = round(time.perf_counter() - t, 2)
    holders = {i: set(meshes[0].stat(r).holders) for i, r in enumerate(refs)}
    return refs, holders, took


def _ms_kill_run(lm: Any, mesh: Any, t_read: Any, refs: list[Any],
                 holders: dict[int, set[str]], p: Params, out: dict[str, Any],
                 suffix: str = "") -> None:
    """The read tasks again, one node (never the one ``mesh`` talks to) SIGKILLed once a
    third have succeeded. A task whose input lost its last copy fails (meshscale keeps no
    lineage to rebuild an object from): it is counted, not timed."""
    _, _, as_completed = _ms_api()
    victim = lm.nodes[1]
    input_copies(holders, victim.name, out, suffix)

    def kill() -> None:
        track()
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        out[f"killed_node{suffix}"] = victim.name

    run = KillRun(p.tasks, kill)
    inputs = [i % p.objects for i in range(p.tasks)]
    run.start()
    futs = [_ms_submit(mesh, t_read, refs[k], p.work_s) for k in inputs]
    errors: dict[str, int] = {}
    for f in as_completed(futs, timeout=TASK_TIMEOUT_S):
        try:
            ok = _ms_result(f)[1] == p.object_bytes
        except Exception as e:
            ok = False
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        run.done(ok)
    run.report(out, suffix)
    if errors:
        out[f"kill_errors{suffix}"] = errors


def run_meshscale(p: Params, out: dict[str, Any]) -> None:
    _, task, as_completed = _ms_api()
    t_noop, t_read = task(noop), task(ms_read)
    t0 = time.perf_counter()
    with _ms_cluster() as (lm, meshes):
        mesh = meshes[0]
        for name in ("submit", "map"):
            if not hasattr(mesh, name):
                raise Unavailable(f"meshscale task API not available (no Mesh.{name})")
        out["startup_s"] = round(time.perf_counter() - t0, 2)
        settle()
        rss, out["idle_processes"] = tree_rss_mb([pr.pid for pr in lm.processes()])
        out["idle_rss_mb"] = round(rss, 1)

        _ms_gather(mesh, mesh.map(t_noop, range(p.warmup)))
        t = time.perf_counter()
        results = _ms_gather(mesh, mesh.map(t_noop, range(p.noops)))
        out["noop_tasks_per_s"] = round(p.noops / (time.perf_counter() - t), 1)
        assert results == list(range(p.noops)), "mesh.map returned wrong results"

        lat = []
        for i in range(p.latency_samples):
            t = time.perf_counter()
            _ms_result(_ms_submit(mesh, t_noop, i))
            lat.append((time.perf_counter() - t) * 1000)
        out["noop_latency_p50_ms"] = round(percentile(lat, 50), 3)
        out["noop_latency_p99_ms"] = round(percentile(lat, 99), 3)

        # Objects put through each node in turn, with meshscale's default policy
        # (3 replicas of 4 nodes, placed by rendezvous hashing).
        refs, holders, out["inputs_put_s"] = _ms_put_inputs(meshes, p, 3)
        out["object_replicas"] = statistics.mean(len(h) for h in holders.values())
        stats0 = _ms_dp_stats(meshes)

        inputs = [i % p.objects for i in range(p.tasks)]
        futs = [_ms_submit(mesh, t_read, refs[k], p.work_s) for k in inputs]
        index = {id(f): k for f, k in zip(futs, inputs, strict=True)}
        runs, mismatched = [], 0
        for f in as_completed(futs, timeout=TASK_TIMEOUT_S):
            node, n = _ms_result(f)
            assert n == p.object_bytes, f"task read {n} bytes (argument not resolved?)"
            mismatched += f.node is not None and f.node != node
            runs.append((index[id(f)], f.node or node))
        out["task_node_mismatches"] = mismatched
        after = {i: set(mesh.stat(r).holders) for i, r in enumerate(refs)}
        caches = any(after[i] - holders[i] for i in holders)
        moved = bytes_moved(runs, holders, p.object_bytes, caches=caches)
        out["locality_bytes_moved_mb"] = round(moved / MB, 1)
        out["locality_remote_reads"] = moved // p.object_bytes
        stats1 = _ms_dp_stats(meshes)
        if stats0 is not None and stats1 is not None:
            out["locality_dp_stats_delta"] = {
                k: stats1.get(k, 0) - stats0.get(k, 0)
                for k in sorted(set(stats0) | set(stats1)) if "bytes" in k
            }

        # The same read workload on objects with one copy each (like Ray's and Dask's):
        # this isolates placement from meshscale's default replication.
        refs1, holders1, _ = _ms_put_inputs(meshes, p, 1, first=10_000)
        futs = [_ms_submit(mesh, t_read, refs1[k], p.work_s) for k in inputs]
        index = {id(f): k for f, k in zip(futs, inputs, strict=True)}
        runs = []
        for f in as_completed(futs, timeout=TASK_TIMEOUT_S):
            node, n = _ms_result(f)
            runs.append((index[id(f)], f.node or node))
        moved = bytes_moved(runs, holders1, p.object_bytes, caches=caches)
        out["locality_bytes_moved_mb_1_replica"] = round(moved / MB, 1)

        # Kill, with the default 3 copies of each input made before the clock starts.
        _ms_kill_run(lm, mesh, t_read, refs, holders, p, out)

    # Kill again on a fresh 4-node mesh whose inputs have one copy each, as Ray's and
    # Dask's do: what the third copy buys (and what meshscale, without lineage, loses).
    # Warmed up as the first mesh was before its kill run: the no-ops, then one untimed
    # pass of the read tasks over the same inputs (the first mesh's locality run).
    with _ms_cluster() as (lm, meshes):
        mesh = meshes[0]
        _ms_gather(mesh, mesh.map(t_noop, range(p.warmup)))
        refs1, _, out["inputs_put_s_1_replica"] = _ms_put_inputs(meshes, p, 1, first=20_000)
        _ms_gather(mesh, [_ms_submit(mesh, t_read, refs1[k], p.work_s) for k in inputs])
        holders1 = {i: set(mesh.stat(r).holders) for i, r in enumerate(refs1)}
        _ms_kill_run(lm, mesh, t_read, refs1, holders1, p, out, "_1_replica")


def _ms_dp_stats(meshes: list[Any]) -> dict[str, int] | None:
    """Data-plane counters summed over the live nodes (None if the RPC is unavailable)."""
    total: dict[str, int] = {}
    try:
        for m in meshes:
            with contextlib.suppress(Exception):
                st = m._run(m._inner._call("dp.stats", {}))
                for k, v in st.get("dataplane", {}).items():
                    total[k] = total.get(k, 0) + int(v)
    except Exception:
        return None
    return total


# ---------------------------------------------------------------- driver

RUNNERS: dict[str, Callable[[Params, dict[str, Any]], None]] = {
    "meshscale": run_meshscale,
    "ray": run_ray,
    "dask": run_dask,
}


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for pkg in ("meshscale", "ray", "dask", "distributed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def leftovers() -> list[str]:
    """Processes this run started (see ``track``) that are still alive after teardown."""
    import psutil

    found = []
    for pid, created in sorted(_tracked.items()):
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
    return found


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def table(results: dict[str, dict[str, Any] | None]) -> str:
    cols = list(SYSTEMS)
    rows = [("metric", *cols)]
    for key in (*KEYS, *ONE_REPLICA_KEYS, "startup_s"):
        rows.append((key, *(fmt((results.get(c) or {}).get(key)) for c in cols)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(r)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("kill_one_node_makespan_s: first submit -> last *successful* result; failed "
                 "tasks are counted in kill_failed_tasks, not timed; kill_all_results_s: "
                 "first submit -> last result, failed or not.")
    lines.append("*_1_replica: meshscale with one copy of each input (its default is 3); Ray and "
                 "Dask keep one copy where an object is made (plus copies fetched by a read: "
                 "kill_input_copies_mean in the JSON), so their rows above are the one-copy "
                 "figures.")
    return "\n".join(lines)


NOTES = (
    "Every system gets one task slot per node (Ray num_cpus=1, Dask threads_per_worker=1, "
    "meshscale MESHSCALE_CPUS=1; a meshscale node defaults to the machine's CPU count) and "
    "otherwise its defaults: Ray's hybrid scheduler with locality-aware placement by argument "
    "size, lineage reconstruction and max_retries=3; Dask's scheduler with work stealing and "
    "a nanny per worker (its restart is disabled for the killed worker, as for a lost "
    "machine). A tuned peer would differ: Ray notices a dead node through GCS health checks "
    "(health_check_period_ms x health_check_failure_threshold, about 15 s by default), which "
    "can be lowered; Dask's latency falls with a shorter scheduler/worker batched-send "
    "interval and its throughput rises with more threads per worker; both would move fewer "
    "bytes with explicit placement on the read tasks (Ray NodeAffinity, Dask workers=). "
    "Ray's object store is 1 GiB per node (cluster_utils' 150 MiB test default would spill; "
    "`ray start` gives 30% of RAM per node). meshscale stores objects with its default 3 "
    "replicas on 4 nodes while Ray and Dask keep one copy where it was made (and cache "
    "fetched copies), so locality_bytes_moved_mb compares defaults; "
    "locality_bytes_moved_mb_1_replica is meshscale with one copy per object, the placement "
    "comparison. Dask's idle RSS includes the driver's growth when LocalCluster starts (its "
    "scheduler and nannies run in the driver process). All clusters share one machine."
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    ap.add_argument("--json", type=Path, required=True, help="where to write the results")
    ap.add_argument("--only", default=",".join(SYSTEMS),
                    help="comma-separated subset of " + ",".join(SYSTEMS))
    ap.add_argument("--map-size", type=int, metavar="N",
                    help="instead: one imap of N no-ops on a 3-node meshscale mesh")
    args = ap.parse_args(argv)
    if args.map_size is not None:
        if args.map_size < 1:
            ap.error(f"--map-size must be >= 1, not {args.map_size}")
        return map_main(args.map_size, args.json)
    p = QUICK if args.quick else FULL
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems: {sorted(unknown)}")

    results: dict[str, dict[str, Any] | None] = {s: None for s in SYSTEMS}
    errors: dict[str, str] = {}
    for name in chosen:
        out: dict[str, Any] = {}
        t = time.perf_counter()
        print(f"[{name}] running ...", file=sys.stderr, flush=True)
        try:
            # Peers print their own logs (Ray's raylet-death notices); keep stdout the table.
            with contextlib.redirect_stdout(sys.stderr):
                RUNNERS[name](p, out)
        except Unavailable as e:
            errors[name] = str(e)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        if name not in errors:
            results[name] = {k: out.get(k) for k in KEYS} | {
                k: v for k, v in out.items() if k not in KEYS
            }
        print(f"[{name}] {'failed: ' + errors[name] if name in errors else 'done'} "
              f"in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)

    left = leftovers()
    deadline = time.monotonic() + 15
    while left and time.monotonic() < deadline:  # give orphans a moment to notice
        time.sleep(0.5)
        left = leftovers()
    for s in SYSTEMS:
        if s not in chosen:
            errors.setdefault(s, "not run (--only)")
    doc = {
        **results,
        "errors": errors,
        "config": asdict(p) | {"nodes": NODES, "quick": args.quick, "host": HOST},
        "versions": versions(),
        "leftover_processes": left,
        "note": NOTES,
    }
    print(table(results))
    for s, e in errors.items():
        print(f"{s}: null ({e})")
    if left:
        print("WARNING: processes left behind:\n  " + "\n  ".join(left))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def map_main(n: int, json_path: Path) -> int:
    out: dict[str, Any] = {}
    error = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            run_map(n, out)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    left = leftovers()
    deadline = time.monotonic() + 15
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = leftovers()
    doc = {"meshscale": None if error else {k: out.get(k) for k in MAP_KEYS},
           "errors": {"meshscale": error} if error else {},
           "config": {"map_size": n, "nodes": MAP_NODES, "slots_per_node": 1,
                      "settle_s": MAP_SETTLE_S, "host": HOST},
           "versions": versions(), "leftover_processes": left}
    print(map_table(out))
    if error:
        print(f"meshscale: null ({error})")
    if left:
        print("WARNING: processes left behind:\n  " + "\n  ".join(left))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
