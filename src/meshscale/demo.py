"""``meshscale demo``: real-time anomaly detection near the data, on a live local mesh.

Six real node processes in three emulated regions: two edge sites (``edge-a``,
``edge-b``, a few ms apart) and a cloud region ~60 ms away. Machines on factory lines at
both sites publish sensor readings to their site's node. An IsolationForest, trained here
at start on generated data, scores every reading twice: as a near-source operator (on the
node where the reading entered) and as the same operator placed centrally in the cloud.
A controller at site A subscribes to both outputs. Part-way through, the node that site
A's machines publish to is killed: the producer moves to the other node of its site, the
operator for the dead node's shard resumes there from its checkpoint, and nothing is lost.
The summary compares the two placements.

Everything is real: processes, TLS, the worker pool that runs the model, the KV that
holds checkpoints. Only the inter-region delay is emulated (``--latency``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshscale.core.api.streams import StreamStats

EDGE_A, EDGE_B, CLOUD = "edge-a", "edge-b", "cloud"
REGIONS = [EDGE_A, EDGE_B, CLOUD]
LATENCY = {(EDGE_A, EDGE_B): 0.004, (EDGE_A, CLOUD): 0.060, (EDGE_B, CLOUD): 0.060}
FEATURES = ("temp_c", "vibration_mm_s", "current_a", "pressure_bar", "rpm_k", "acoustic_db")
NORMAL_MEAN = (65.0, 2.0, 12.0, 6.0, 1.5, 70.0)
NORMAL_STD = (2.0, 0.3, 0.8, 0.3, 0.05, 2.0)
NEAR_OP, CENTRAL_OP = "detect-near", "detect-central"
NEAR_OUT, CENTRAL_OUT = "alerts-near", "alerts-central"
TOPIC = "sensors"


@dataclass
class DemoConfig:
    duration_s: float = 36.0
    rate_per_site: float = 100.0
    """Readings per second from each site (its machines together)."""
    machines_per_site: int = 8
    anomaly_rate: float = 0.02
    kill_at: float | None = 0.4
    """Fraction of the run after which site A's entry node is killed; None: no node is
    killed (the plan calibration measures the steady state the planner predicts)."""
    seed: int = 7
    keep: bool = False
    directory: Path | None = None
    drain_timeout_s: float = 60.0
    quiet: bool = False
    only: str | None = None
    """Run one pipeline alone ("near-source" or "central"), not both side by side (the
    calibration bench measures each placement on its own, as the planner predicts it)."""


@dataclass
class _Pipeline:
    name: str
    op: str
    topic: str
    latencies: list[float] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)
    """input record id -> arrival time of its first output."""
    flagged: set[str] = field(default_factory=set)
    duplicates: int = 0


# ------------------------------------------------------------------ data and model


def reading(rng: random.Random, anomalous: bool) -> list[float]:
    """One sensor reading; an anomaly is a bearing fault: vibration, heat, noise up."""
    values = [rng.gauss(m, s) for m, s in zip(NORMAL_MEAN, NORMAL_STD, strict=True)]
    if anomalous:
        kind = rng.randrange(3)
        if kind == 0:  # bearing wear
            values[1] += rng.uniform(2.0, 4.0)
            values[5] += rng.uniform(8.0, 15.0)
        elif kind == 1:  # overheating motor
            values[0] += rng.uniform(10.0, 20.0)
            values[2] += rng.uniform(3.0, 6.0)
        else:  # pressure drop with speed surge
            values[3] -= rng.uniform(1.5, 3.0)
            values[4] += rng.uniform(0.3, 0.6)
    return [round(v, 4) for v in values]


def train_model(seed: int, samples: int = 4000) -> Any:
    """An IsolationForest fitted on normal readings (generated here, no download)."""
    import numpy as np
    from sklearn.ensemble import IsolationForest

    rng = random.Random(seed)
    x = np.array([reading(rng, False) for _ in range(samples)])
    model = IsolationForest(n_estimators=60, contamination=0.01, random_state=seed)
    model.fit(x)
    return model


class ForestScorer:
    """``IsolationForest.score_samples`` of a fitted forest, from its trees' arrays in a
    few vectorised steps: every tree walked at once, one level per step, then the same
    arithmetic in the same order as scikit-learn's (so equal to the last bit:
    ``tests/runtime/test_demo_detector.py``). scikit-learn walks the trees one call each,
    ~9 ms a call for the demo's 60 trees here, more than all of a record's hops; this is
    the same model and the same answers. Needs only numpy where it runs."""

    def __init__(self, model: Any) -> None:
        import numpy as np

        trees = [e.tree_ for e in model.estimators_]
        n_features = int(model.n_features_in_)
        for feats in model.estimators_features_:
            if list(feats) != list(range(n_features)):
                raise ValueError("a forest fitted on subsets of features is not supported")
        sizes = [t.node_count for t in trees]
        starts = np.cumsum([0, *sizes[:-1]])
        left, right = [], []
        for t, start in zip(trees, starts, strict=True):
            leaf = t.children_left < 0
            left.append(np.where(leaf, -1, t.children_left + start))
            right.append(np.where(leaf, -1, t.children_right + start))
        self.left = np.concatenate(left)
        self.right = np.concatenate(right)
        self.feature = np.concatenate([np.maximum(t.feature, 0) for t in trees])
        self.threshold = np.concatenate([t.threshold for t in trees])
        # What each leaf adds to a sample's depth, as scikit-learn adds it per tree.
        self.leaf_depth = np.concatenate([
            d + a - 1.0 for d, a in zip(model._decision_path_lengths,
                                        model._average_path_length_per_tree, strict=True)])
        self.roots = starts
        self.levels = max(t.max_depth for t in trees)
        self.n_features = n_features
        from sklearn.ensemble._iforest import _average_path_length

        self.denominator = len(trees) * _average_path_length([model._max_samples])
        self.offset = float(model.offset_)

    def score_samples(self, x: Any) -> Any:
        import numpy as np

        x = np.asarray(x, dtype=np.float32)  # as scikit-learn validates it
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected readings of {self.n_features} features")
        if np.isnan(x).any():
            raise ValueError("a reading with a missing value (NaN)")
        n = x.shape[0]
        node = np.repeat(self.roots[:, None], n, axis=1)  # (trees, samples)
        cols = np.arange(n)[None, :]
        for _ in range(self.levels):
            left = self.left[node]
            inner = left >= 0
            if not inner.any():
                break
            go_left = x[cols, self.feature[node]] <= self.threshold[node]
            node = np.where(inner, np.where(go_left, left, self.right[node]), node)
        depths = np.zeros(n)
        for row in self.leaf_depth[node]:  # tree by tree, in order: the same sums
            depths += row
        denominator = self.denominator
        # Negated, as scikit-learn's score_samples is (the lower, the more abnormal).
        return -(2 ** (-np.divide(depths, denominator, out=np.ones_like(depths),
                                  where=denominator != 0)))


def make_detector(model: Any) -> Any:
    """The operator: scores a batch of readings with the model (runs in a worker)."""
    scorer = ForestScorer(model)

    def detect(records: list[Any]) -> list[dict[str, Any]]:
        import numpy as np

        x = np.array([r.value["f"] for r in records])
        # predict() is score_samples() less offset_ below 0 (scikit-learn's definition).
        scores = scorer.score_samples(x)
        labels = np.where(scores - scorer.offset < 0, -1, 1)
        return [{"machine": r.key, "anomaly": bool(lab == -1), "score": round(float(s), 4),
                 "site": r.value["site"]}
                for r, lab, s in zip(records, labels, scores, strict=True)]

    return detect


# ------------------------------------------------------------------ the run


def _percentile(xs: list[float], p: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    k = min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


class Demo:
    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.say = (lambda *a: None) if cfg.quiet else _printer()
        self.truth: dict[str, bool] = {}
        self.site_of: dict[str, str] = {}
        self.created: dict[str, float] = {}
        self.lock = threading.Lock()
        if cfg.only not in (None, "near-source", "central"):
            raise ValueError(f"only must be 'near-source' or 'central', not {cfg.only!r}")
        self.pipes: dict[str, _Pipeline] = {}
        if cfg.only != "central":
            self.pipes[NEAR_OUT] = _Pipeline("near-source", NEAR_OP, NEAR_OUT)
        if cfg.only != "near-source":
            self.pipes[CENTRAL_OUT] = _Pipeline("central (cloud)", CENTRAL_OP, CENTRAL_OUT)
        self.kill_time: float | None = None
        self.victim_stats: list[StreamStats] = []
        """The killed node's stream counters, read just before the kill."""
        self.stop_consumers = threading.Event()
        self.errors: list[str] = []

    def run(self) -> dict[str, Any]:
        from meshscale.runtime.launcher import LocalMesh, mesh_temp_dir
        from meshscale.trust.bundle import load_bundle

        cfg = self.cfg
        t_start = time.monotonic()
        tmp = None
        if cfg.directory is None:
            directory = mesh_temp_dir("meshscale-demo-")
            tmp = str(directory)
        else:
            directory = cfg.directory
        self.say("[bold]meshscale demo[/]: anomaly detection near the data vs in the cloud")
        self.say("training an IsolationForest on generated sensor data ...")
        model = train_model(cfg.seed)
        mesh_dir = directory / "mesh"
        lm = LocalMesh(mesh_dir, 6, regions=REGIONS, latency=LATENCY)
        self.say(f"starting 6 nodes in {', '.join(REGIONS)} (edge-a<->edge-b 4 ms, "
                 "edge<->cloud 60 ms RTT) ...")
        lm.start()
        summary: dict[str, Any] = {}
        try:
            lm.wait_converged(60)
            http = lm.nodes[3].http
            url = f"http://{http}/" if http else None
            # The token goes in the address only on a terminal: not into a file or a log
            # that stdout may be (it never goes into --json).
            shown = url
            if url is not None and sys.stdout.isatty():
                shown = f"{url}#token={load_bundle(lm.bundle_path).token}"
            elif url is not None:
                shown = f"{url} (token: meshscale token --bundle {lm.bundle_path})"
            self.say(f"mesh up in {time.monotonic() - t_start:.1f}s; dashboard: {shown}")
            summary = self._pipeline(lm, model)
            summary["dashboard"] = url
            summary["mesh_json"] = str(lm.mesh_json)
            if cfg.keep:
                if not cfg.quiet:
                    render_summary(summary)
                self.say(f"--keep: the mesh keeps running until Ctrl-C (or SIGTERM). "
                         f"Dashboard: {shown}\n  meshscale top --mesh {lm.mesh_json}\n  "
                         f"meshscale members --node {lm.nodes[3].address} "
                         f"--bundle {lm.bundle_path}")
                _wait_for_signal()
        finally:
            lm.stop()
            summary["processes_left"] = [p.pid for p in lm.processes() if p.poll() is None]
            if tmp is not None:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        summary["wall_s"] = round(time.monotonic() - t_start, 1)
        return summary

    def _pipeline(self, lm: Any, model: Any) -> dict[str, Any]:
        import meshscale
        from meshscale.client.streams import Region

        cfg = self.cfg
        nodes = lm.nodes
        by_region: dict[str, list[Any]] = {}
        for n in nodes:
            by_region.setdefault(n.region, []).append(n)
        a_entry, a_other = by_region[EDGE_A][0], by_region[EDGE_A][1]
        b_entry = by_region[EDGE_B][0]
        control = meshscale.connect(a_other.address, bundle=lm.bundle_path)
        detect = make_detector(model)
        if NEAR_OUT in self.pipes:
            control.operator(TOPIC, detect, placement="near-source", output=NEAR_OUT,
                             name=NEAR_OP, batch=True, batch_size=128)
        if CENTRAL_OUT in self.pipes:
            control.operator(TOPIC, detect, placement=Region(CLOUD), output=CENTRAL_OUT,
                             name=CENTRAL_OP, batch=True, batch_size=128)
        self.say(f"operators: {NEAR_OP} near-source, {CENTRAL_OP} in region {CLOUD}; "
                 f"site A machines -> {a_entry.name}, site B machines -> {b_entry.name}; "
                 f"controller at site A reads both outputs via {a_other.name}")
        self._wait_warm(lm)
        consumers = [threading.Thread(target=self._consume, args=(control, topic),
                                      daemon=True) for topic in self.pipes]
        for t in consumers:
            t.start()
        producers: list[tuple[str, Any]] = []
        for site, entry in ((EDGE_A, a_entry), (EDGE_B, b_entry)):
            m = meshscale.connect(entry.address, bundle=lm.bundle_path)
            producers.append((site, m))
        published: dict[str, int] = {}
        streams: dict[str, Any] = {}
        threads = []
        t0 = time.monotonic()
        for i, (site, m) in enumerate(producers):
            s = m.stream(TOPIC)
            streams[site] = s
            th = threading.Thread(target=self._produce, args=(site, s, t0, cfg.seed + i,
                                                              published), daemon=True)
            th.start()
            threads.append(th)
        if cfg.kill_at is not None:
            kill_at = t0 + cfg.duration_s * cfg.kill_at
            while time.monotonic() < kill_at:
                time.sleep(0.05)
            assert a_entry.proc is not None
            # Its counters die with it: read them first (what it counts in the few ms
            # between this read and the kill is lost), added to the live nodes' at the end.
            self.victim_stats = self._stream_stats(control, lm, [a_entry])
            a_entry.proc.send_signal(signal.SIGKILL)
            self.kill_time = time.time()
            self.say(f"[red]killed {a_entry.name}[/] (site A's entry node) at "
                     f"t={time.monotonic() - t0:.1f}s")
        for th in threads:
            th.join()
        for s in streams.values():
            s.flush(timeout=60)
        nodes_used = {site: list(s.nodes_used) for site, s in streams.items()}
        t_flushed = time.monotonic()
        total = sum(published.values())
        self.say(f"published {total} readings; waiting for both pipelines to drain ...")
        deadline = time.monotonic() + cfg.drain_timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                done = all(len(p.seen) >= len(self.truth) for p in self.pipes.values())
            if done:
                break
            time.sleep(0.1)
        drain_s = time.monotonic() - t_flushed
        self.stop_consumers.set()
        for t in consumers:
            t.join(timeout=10)
        stats = self._stream_stats(control, lm) + self.victim_stats
        for s in streams.values():
            s.close()
        for _, m in producers:
            m.close()
        control.close()
        return self._summary(total, nodes_used, stats, drain_s)

    def _wait_warm(self, lm: Any) -> None:
        """Wait (bounded) until every runner has loaded the model into its workers, so
        the comparison measures placement, not a cold start."""
        from meshscale.client.rpc import RpcError, request
        from meshscale.core.api import Empty
        from meshscale.core.api.streams import STATS

        creds = lm.credentials()
        want = len(lm.nodes)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            warm = {p.op: 0 for p in self.pipes.values()}
            for n in lm.nodes:
                with contextlib.suppress(RpcError, OSError):
                    st = request(n.address, creds, STATS, Empty(), timeout=5)
                    for op in warm:
                        warm[op] += st.operators.get(op, {}).get("runners_warm", 0)
            if all(v >= want for v in warm.values()):
                self.say("operators warm on every runner ("
                         + ", ".join(f"{v} {op}" for op, v in warm.items()) + ")")
                return
            time.sleep(0.25)
        self.say("[yellow]operators not warm after 60 s; starting anyway[/]")

    def _produce(self, site: str, stream: Any, t0: float, seed: int,
                 published: dict[str, int]) -> None:
        cfg = self.cfg
        rng = random.Random(seed)
        interval = 1.0 / cfg.rate_per_site
        end = t0 + cfg.duration_s
        n = 0
        next_t = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now < next_t:
                time.sleep(min(next_t - now, 0.01))
                continue
            next_t += interval
            machine = f"{site}/line-{rng.randrange(cfg.machines_per_site)}"
            bad = rng.random() < cfg.anomaly_rate
            rid = f"{site}-{n}"
            with self.lock:
                self.truth[rid] = bad
                self.site_of[rid] = site
                self.created[rid] = time.time()
            try:
                stream.publish(machine, {"f": reading(rng, bad), "site": site}, id=rid)
            except Exception as e:
                self.errors.append(f"{site}: publish failed: {e}")
                with self.lock:
                    del self.truth[rid]
                break
            n += 1
        published[site] = n

    def _consume(self, mesh: Any, topic: str) -> None:
        pipe = self.pipes[topic]
        sub = mesh.subscribe(topic)
        prefix = pipe.op + ":"
        while not self.stop_consumers.is_set():
            try:
                records = sub.poll(timeout=0.5)
            except Exception as e:
                self.errors.append(f"{topic}: subscribe failed: {e}")
                time.sleep(0.5)
                continue
            now = time.time()
            with self.lock:
                for r in records:
                    rid = r.id.removeprefix(prefix)
                    if rid in pipe.seen:
                        pipe.duplicates += 1
                        continue
                    pipe.seen[rid] = now
                    pipe.latencies.append(now - r.ts)
                    if r.value.get("anomaly"):
                        pipe.flagged.add(rid)
        with self.lock:
            pipe.duplicates += sub.duplicates

    def _stream_stats(self, mesh: Any, lm: Any, nodes: list[Any] | None = None
                      ) -> list[StreamStats]:
        """The stream counters of ``nodes`` (default: every node) that are running."""
        from meshscale.client.rpc import RpcError, request
        from meshscale.core.api import Empty
        from meshscale.core.api.streams import STATS

        creds = lm.credentials()
        out = []
        for n in lm.nodes if nodes is None else nodes:
            if n.proc is None or n.proc.poll() is not None:
                continue
            with contextlib.suppress(RpcError, OSError):
                out.append(request(n.address, creds, STATS, Empty(), timeout=10))
        return out

    def _summary(self, total: int, nodes_used: dict[str, list[str]],
                 stats: list[StreamStats], drain_s: float) -> dict[str, Any]:
        killed = self.kill_time is not None
        kill = self.kill_time or 0.0
        cross: dict[str, int] = {}
        for st in stats:
            for k, v in st.cross_region_bytes.items():
                cross[k] = cross.get(k, 0) + v

        def bytes_for(*keys: str) -> int:
            return sum(v for k, v in cross.items() if any(k.startswith(p) for p in keys))

        injected = {rid for rid, bad in self.truth.items() if bad}
        pipes: dict[str, Any] = {}
        for p in self.pipes.values():
            missing = [rid for rid in self.truth if rid not in p.seen]
            caught = len(injected & p.flagged)
            a_after = [t for rid, t in p.seen.items()
                       if self.site_of.get(rid) == EDGE_A and self.created[rid] >= kill]
            a_before = [t for rid, t in p.seen.items()
                        if self.site_of.get(rid) == EDGE_A and self.created[rid] < kill]
            pipes[p.name] = {
                "operator": p.op,
                "records_processed": len(p.seen),
                "duplicates_dropped": p.duplicates,
                "records_missing": len(missing),
                "latency_p50_ms": round(_percentile(p.latencies, 50) * 1000, 1),
                "latency_p99_ms": round(_percentile(p.latencies, 99) * 1000, 1),
                "anomalies_injected": len(injected),
                "anomalies_caught": caught,
                "recall": round(caught / len(injected), 3) if injected else None,
                "false_alarms": len(p.flagged - injected),
                "site_a_rerouted_s": (round(min(a_after) - kill, 2)
                                      if a_after and killed else None),
                "site_a_recovered_s": (round(max(a_before) - kill, 2)
                                       if a_before and killed else None),
            }
        for p in self.pipes.values():
            # The operator's time per batch in the worker pools (every runner's, the
            # killed node's up to its kill), and the records its runners took: every
            # record at least once, more where a runner re-read after the failover.
            us = sum(st.operators.get(p.op, {}).get("apply_us", 0) for st in stats)
            calls = sum(st.operators.get(p.op, {}).get("batches_applied", 0) for st in stats)
            done = sum(st.operators.get(p.op, {}).get("records_processed", 0) for st in stats)
            pipes[p.name]["operator_records"] = done
            pipes[p.name]["operator_ms_per_call"] = round(us / calls / 1000, 3) if calls else None
            pipes[p.name]["operator_records_per_call"] = (round(done / calls, 2) if calls
                                                          else None)
        for p in self.pipes.values():
            name, op, out = p.name, p.op, p.topic
            raw = bytes_for(f"{TOPIC}:fetch:{op}")
            results = bytes_for(f"{out}:")
            pipes[name]["raw_cross_region_bytes"] = raw
            pipes[name]["results_cross_region_bytes"] = results
            pipes[name]["cross_region_bytes"] = raw + results
        return {
            "published": total,
            "unique_records": len(self.truth),
            "pipelines": pipes,
            "input_replication_cross_region_bytes": bytes_for(f"{TOPIC}:repl"),
            "cross_region_bytes": cross,
            "producer_nodes": nodes_used,
            "drain_s": round(drain_s, 2),
            "errors": self.errors,
        }


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM (the nodes die with this process: PDEATHSIG)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _printer() -> Any:
    from rich.console import Console

    console = Console(stderr=False, highlight=False)

    def say(*parts: Any) -> None:
        console.print(*parts)

    return say


def render_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    pipes = summary["pipelines"]
    names = list(pipes)
    table = Table(title="near-source vs central: same model, same readings")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    rows = [
        ("records processed", "records_processed", "{:,}"),
        ("duplicates dropped", "duplicates_dropped", "{:,}"),
        ("records lost", "records_missing", "{:,}"),
        ("latency p50 (ms)", "latency_p50_ms", "{:.1f}"),
        ("latency p99 (ms)", "latency_p99_ms", "{:.1f}"),
        ("raw readings across regions (B)", "raw_cross_region_bytes", "{:,}"),
        ("results across regions (B)", "results_cross_region_bytes", "{:,}"),
        ("anomalies caught / injected", None, ""),
        ("false alarms", "false_alarms", "{:,}"),
        ("site A rerouted after kill (s)", "site_a_rerouted_s", "{}"),
        ("dead node's backlog recovered (s)", "site_a_recovered_s", "{}"),
    ]
    for label, key, fmt in rows:
        cells = []
        for n in names:
            p = pipes[n]
            if key is None:
                cells.append(f"{p['anomalies_caught']} / {p['anomalies_injected']} "
                             f"({(p['recall'] or 0) * 100:.0f}%)")
            else:
                v = p.get(key)
                cells.append("-" if v is None else fmt.format(v))
        table.add_row(label, *cells)
    console.print(table)
    console.print(f"published {summary['published']:,} readings from 2 sites; "
                  f"input replication across regions (shared): "
                  f"{summary['input_replication_cross_region_bytes']:,} bytes; "
                  f"site A producer used {' -> '.join(summary['producer_nodes'].get(EDGE_A, []))}")
    if summary.get("errors"):
        console.print(f"[red]errors:[/] {summary['errors'][:5]}")


def run_live_demo(cfg: DemoConfig, json_path: Path | None = None) -> dict[str, Any]:
    """Run the demo; prints progress and the summary table; returns the summary."""
    os.environ.setdefault("PYTHONHASHSEED", "0")
    summary = Demo(cfg).run()
    if not cfg.quiet and not cfg.keep:
        render_summary(summary)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
