"""Ray Serve beside meshscale's services (issue #22): the same figures as bench/services.py,
measured on a Ray cluster of 4 local nodes with Serve's defaults.

Run by ``bench/services.py --peers`` in the peers' virtual environment (``make bench-peers``:
Ray never goes in .venv). Setup, kept as close to the meshscale half as Ray allows:

- ``ray.cluster_utils.Cluster``: a head and 3 more nodes on 127.0.0.1, 1 CPU each; Serve's
  controller and proxy run on the head (Serve's default), replicas wherever Ray puts them;
- calls go through a ``DeploymentHandle`` from the driver (Serve's Python path, the
  counterpart of a meshscale client's ``h.ping(x)``), ``.remote(x).result()``;
- failover: two replicas of the no-op; the node of the replica that answered the caller's
  last call is removed (its raylet and workers killed; if that is the head, which holds
  the controller, the other replica's node is used instead and it is said in the row's
  note); the gap runs from the kill until a call is answered again, each try with a
  2-second timeout;
- idle RSS: what each no-op replica process reports of itself (psutil), mean over replicas.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
# Loopback only (see bench/tasks.py for why this variable is needed as well).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

HOST = "127.0.0.1"
NODES = 4
OBJECT_STORE_BYTES = 256 << 20
CALL_TIMEOUT_S = 60.0
FAILOVER_TRY_S = 2.0
FAILOVER_GIVE_UP_S = 60.0


class Unavailable(RuntimeError):
    """Ray Serve cannot run here (not installed): the row is left out, with the reason."""


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def run(seq_n: int, conc_s: float, callers: int, images: list[list[float]],
        model_cls: type) -> dict[str, Any]:
    """The Ray Serve row: the keys of bench/services.py plus ``note``."""
    try:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster
    except ImportError as e:
        raise Unavailable(f"ray[serve] not installed ({e}); make bench-peers") from None

    @serve.deployment(num_replicas=2)
    class Noop:
        def ping(self, x: Any = None) -> Any:
            return x

        def where(self) -> tuple[str, int, float]:
            import psutil

            node = ray.get_runtime_context().get_node_id()
            return node, os.getpid(), psutil.Process().memory_info().rss / 1e6

    # The same classifier class as the meshscale half (bench/services.py), one replica.
    Digits = serve.deployment(num_replicas=1)(model_cls)

    out: dict[str, Any] = {}
    node_args = {"num_cpus": 1, "node_ip_address": HOST, "object_store_memory": OBJECT_STORE_BYTES}
    cluster = Cluster(initialize_head=True,
                      head_node_args={**node_args, "include_dashboard": False})
    try:
        workers = [cluster.add_node(**node_args) for _ in range(NODES - 1)]
        ray.init(address=cluster.address, _node_ip_address=HOST, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
        cluster.wait_for_nodes()
        h = serve.run(Noop.bind(), name="noop", route_prefix=None)
        for _ in range(50):
            h.ping.remote(0).result(timeout_s=CALL_TIMEOUT_S)
        lat = []
        for i in range(seq_n):
            t0 = time.perf_counter()
            h.ping.remote(i).result(timeout_s=CALL_TIMEOUT_S)
            lat.append((time.perf_counter() - t0) * 1000)
        out["noop_call_p50_ms"] = round(pct(lat, 0.5), 3)
        out["noop_call_p99_ms"] = round(pct(lat, 0.99), 3)

        counts = [0] * callers
        stop = time.monotonic() + conc_s

        def caller(k: int) -> None:
            while time.monotonic() < stop:
                h.ping.remote(k).result(timeout_s=CALL_TIMEOUT_S)
                counts[k] += 1

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["noop_calls_per_s"] = round(sum(counts) / (time.monotonic() - t0), 1)

        d = serve.run(Digits.bind(), name="digits", route_prefix=None)
        d.predict.remote(images[0]).result(timeout_s=180)
        mlat = []
        for img in images:
            t1 = time.perf_counter()
            d.predict.remote(img).result(timeout_s=CALL_TIMEOUT_S)
            mlat.append((time.perf_counter() - t1) * 1000)
        out["model_call_p50_ms"] = round(statistics.median(mlat), 3)

        # Both replicas' own reports: calls are spread by Serve's router, so ask until two
        # replica processes answered (a bounded number of tries).
        seen: dict[int, tuple[str, float]] = {}
        for _ in range(200):
            node, pid, rss = h.where.remote().result(timeout_s=CALL_TIMEOUT_S)
            seen[pid] = (node, rss)
            if len(seen) >= 2:
                break
        out["idle_rss_mb"] = round(statistics.mean(r for _, r in seen.values()), 1)

        last_node, _, _ = h.where.remote().result(timeout_s=CALL_TIMEOUT_S)
        by_id = {w.node_id: w for w in workers}
        note = ""
        victim = by_id.get(last_node)
        if victim is None:  # the head answered: kill the other replica's node instead
            others = [n for n, _ in seen.values() if n in by_id]
            victim = by_id[others[0]] if others else workers[0]
            note = "the last answer came from the head (which holds Serve's controller): " \
                   "the other replica's node was killed"
        cluster.remove_node(victim, allow_graceful=False)
        t_kill = time.monotonic()
        gap: float | None = None
        while time.monotonic() - t_kill < FAILOVER_GIVE_UP_S:
            try:
                h.ping.remote(1).result(timeout_s=FAILOVER_TRY_S)
            except Exception:  # any failure is "not answered yet"
                continue
            gap = round(time.monotonic() - t_kill, 3)
            break
        out["failover_gap_s"] = gap
        out["note"] = note
    finally:
        with contextlib.suppress(Exception):  # best effort: the cluster goes next anyway
            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return out
