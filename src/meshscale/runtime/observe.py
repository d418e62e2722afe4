"""What a node shows about itself: live views for the HTTP API and Prometheus metrics.

``NodeObserver`` reads the agent's live state (membership, data plane, compute plane) when
asked, and keeps only what must be accumulated over time: task latency and queue-wait
histograms, placement decisions and a ring of one-second throughput samples. A sampler
task ticks once a second: it closes the throughput sample and turns counters of the data
and compute planes into events (re-replications, task retries) in the agent's
recent-events buffer. Power and energy are the agent's own (``runtime/power.py``).

``MeshCollector`` (``runtime/metrics.py``) is a prometheus_client collector over one
observer, registered in a per-node ``CollectorRegistry``: every scrape reads the state as
it is then. prometheus_client is imported only there and when a histogram is read, so an
idle node that nobody scrapes never loads it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import meshscale
from meshscale.core.api import ApiError, ErrorCode
from meshscale.core.api import objects as objects_api
from meshscale.core.api.node import POINTS, EventInfo, NodePoint, NodePoints, PointsRequest
from meshscale.core.api.objects import MAX_LIST_PAGE
from meshscale.core.api.tasks import TASK_LIST, ListRequest
from meshscale.core.membership import State
from meshscale.core.objects import listing_start, listing_step
from meshscale.core.placement import is_full
from meshscale.core.tasks import TaskRecord
from meshscale.runtime.capacity import power_state
from meshscale.runtime.local import call_node
from meshscale.runtime.power import PowerMeter, proc_rss_bytes, tree_pids
from meshscale.runtime.services import NodeServices
from meshscale.transport.rpc import RpcError

if TYPE_CHECKING:
    from prometheus_client.core import HistogramMetricFamily

    from meshscale.core.scheduling import Load, Resources, Scheduler, TaskBound
    from meshscale.core.streams import ShardLog
    from meshscale.core.tasks import TaskBook
    from meshscale.runtime.data import DataPlane


class ObservedCompute(Protocol):
    """What the observer reads of the compute plane (``runtime/compute.py``) and the two
    hooks it sets there."""

    stats: dict[str, int]
    capacity: Resources
    book: TaskBook
    observer: Callable[[TaskRecord, float], None] | None
    bound_observer: Callable[[TaskBound], None] | None

    @property
    def sched(self) -> Scheduler | None: ...

    def peer_loads(self) -> dict[str, tuple[Load, Resources]]: ...


class ObservedStreams(Protocol):
    """What the observer reads of the stream plane (``runtime/streams.py``)."""

    @property
    def stats(self) -> Mapping[str, int]: ...

    @property
    def logs(self) -> Mapping[tuple[str, str], ShardLog]: ...

    @property
    def cross_region_bytes(self) -> Mapping[str, int]: ...

    @property
    def op_stats(self) -> Mapping[str, Mapping[str, int]]: ...

    @property
    def source_id(self) -> str:
        """The name of this node's own shards (``name~epoch``)."""
        ...


class ObservedServices(Protocol):
    """What the observer reads of the services plane (``runtime/services_plane.py``)."""

    @property
    def call_metrics(self) -> ServiceCallMetrics: ...

    def replica_states(self) -> dict[str, tuple[str, int]]:
        """Service -> (state of this node's replica: starting, ready or unhealthy, and
        its calls in flight)."""
        ...

    @property
    def stats(self) -> Mapping[str, int]: ...


class ObservedNode(NodeServices, Protocol):
    """The node as its dashboard and metrics read it: its services, its planes (the
    compute and stream planes start after the HTTP server, so they may still be None),
    its recent events and rejection counts."""

    dataplane: DataPlane | None
    with_dataplane: bool
    events: deque[EventInfo]
    started_at: float
    power: PowerMeter

    @property
    def compute(self) -> ObservedCompute | None: ...

    @property
    def streams(self) -> ObservedStreams | None: ...

    @property
    def services(self) -> ObservedServices | None: ...

    def http_address(self) -> str | None: ...

    def rejected_messages(self) -> dict[str, int]: ...


STATE_NAMES = {State.ALIVE: "alive", State.SUSPECT: "suspect", State.DEAD: "dead",
               State.LEFT: "left", State.REMOVED: "removed"}


def _int_or_none(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0, 60.0, 300.0)
THROUGHPUT_POINTS = 3600
"""One-second points the node keeps: the last hour (``/api/v1/throughput``)."""
SNAPSHOT_POINTS = 60
"""Newest points in each snapshot (the dashboard loads the rest once, on open)."""
LIST_SCAN_MAX_OBJECTS = 10_000
"""Objects one HTTP listing call looks at, at most (a page narrowed by class over a large
mesh stops there and gives the cursor to go on from)."""
MESH_POINTS_PER_NODE = 120
"""Newest points asked of each live node for the mesh-wide charts and node table."""
MESH_POINTS_TIMEOUT_S = 2.0
MAX_SAMPLE_LATENCIES = 10_000
"""Latencies kept for one second's percentiles (beyond this, the rest are not sampled)."""
MAX_BOUND_PENDING = 50_000


@dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics), seconds."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        from prometheus_client.core import HistogramMetricFamily

        return HistogramMetricFamily(name, doc, buckets=self.buckets(), sum_value=self.total)

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            acc += n
            out.append((repr(bound), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


MESH_TASKS_PER_NODE = 200
"""Newest tasks asked of each owner for the dashboard's mesh-wide table."""
MESH_TASKS_TIMEOUT_S = 2.0
MESH_TASKS_LANE = "observe"
MAX_METRIC_FUNCTIONS = 64
"""Distinct task function names given their own series; the rest share ``other``."""
OTHER_FUNCTION = "other"


@dataclass
class TaskLatencies:
    """Task latency histograms by (function, outcome), with a bounded number of functions
    (label cardinality stays bounded whatever users name their functions)."""

    series: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    functions: set[str] = field(default_factory=set)

    def observe(self, function: str, outcome: str, value: float) -> None:
        fn = function or "unnamed"
        if fn not in self.functions:
            if len(self.functions) >= MAX_METRIC_FUNCTIONS:
                fn = OTHER_FUNCTION
            else:
                self.functions.add(fn)
        h = self.series.get((fn, outcome))
        if h is None:
            h = self.series[(fn, outcome)] = Histogram()
        h.observe(value)

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        from prometheus_client.core import HistogramMetricFamily

        fam = HistogramMetricFamily(name, doc, labels=["function", "outcome"])
        for (fn, outcome), h in sorted(self.series.items()):
            fam.add_metric([fn, outcome], h.buckets(), sum_value=h.total)
        return fam


MAX_METRIC_METHODS = 64
"""Distinct (service, method) pairs given their own series; the rest share ``other``."""


@dataclass
class ServiceCallMetrics:
    """Service calls entered at this node (``svc.call``): counts by (service, method,
    outcome), latency histograms and calls in flight by (service, method). At most
    ``MAX_METRIC_METHODS`` pairs get their own series; a later pair's method is ``other``
    (its service too when that service has no series yet), so label cardinality stays
    bounded whatever services are deployed and removed over time."""

    calls: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    latency: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    inflight: Counter[tuple[str, str]] = field(default_factory=Counter)
    pairs: set[tuple[str, str]] = field(default_factory=set)

    def key(self, service: str, method: str) -> tuple[str, str]:
        pair = (service, method)
        if pair in self.pairs:
            return pair
        if len(self.pairs) < MAX_METRIC_METHODS:
            self.pairs.add(pair)
            return pair
        known = any(s == service for s, _ in self.pairs)
        return (service if known else OTHER_FUNCTION, OTHER_FUNCTION)

    def started(self, key: tuple[str, str]) -> None:
        self.inflight[key] += 1

    def ended(self, key: tuple[str, str], outcome: str, seconds: float) -> None:
        self.inflight[key] -= 1
        self.calls[(*key, outcome)] += 1
        h = self.latency.get(key)
        if h is None:
            h = self.latency[key] = Histogram()
        h.observe(seconds)


def _percentile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


class NodeObserver:
    def __init__(self, agent: ObservedNode) -> None:
        self.agent = agent
        self.task_latency = TaskLatencies()
        self.queue_wait = Histogram()
        self.placements: Counter[str] = Counter()
        self.tasks_ended: Counter[str] = Counter()
        self.points: deque[dict[str, Any]] = deque(maxlen=THROUGHPUT_POINTS)
        self._second_done = 0
        self._second_failed = 0
        self._second_lat: list[float] = []
        self._last_tick = time.monotonic()
        self._net_seen: tuple[int, int] | None = None
        # mesh_points keeps each node's newest points and asks only for what is new.
        self._mesh_pts: dict[str, deque[dict[str, Any]]] = {}
        self._mesh_asked: dict[str, float] = {}
        self._seen: dict[str, int] = {}
        self._hooked: Any = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sampler())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def _hook_compute(self) -> None:
        """Attach to the compute plane once it exists (it starts after the HTTP server)."""
        compute = self.agent.compute
        if compute is None or compute is self._hooked:
            return
        self._hooked = compute
        compute.observer = self._task_ended
        # Queue wait and placement reasons are known when the owner binds a task.
        compute.bound_observer = lambda ev: self._task_bound(compute, ev)

    # ------------------------------------------------------------------ observations

    def _task_ended(self, rec: TaskRecord, latency_s: float) -> None:
        state = str(rec.state)
        self.tasks_ended[state] += 1
        self.task_latency.observe(rec.name, state, latency_s)
        if state == "done":
            self._second_done += 1
            if len(self._second_lat) < MAX_SAMPLE_LATENCIES:
                self._second_lat.append(latency_s)
        elif state == "failed":
            self._second_failed += 1
        if state != "done" and rec.kind == "unschedulable":
            self.placements["unschedulable"] += 1

    def _task_bound(self, compute: ObservedCompute, ev: TaskBound) -> None:
        entry = compute.book.get(ev.task_id)
        if entry is not None and entry.rec.state == "pending":
            self.queue_wait.observe(time.monotonic() - entry.t0)
        if ev.stolen:
            reason = "stolen"
        elif ev.restricted:
            reason = "delay_scheduled"
        elif ev.local:
            reason = "data_local"
        else:
            reason = "lowest_cost"
        self.placements[reason] += 1

    async def _sampler(self) -> None:
        # The compute plane is created after the HTTP server starts (whose address must be
        # in the meta before the node joins): attach to it as soon as it exists, before
        # its workers are up and any task can end.
        deadline = time.monotonic() + 30
        while (self.agent.with_dataplane and self.agent.compute is None
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        self._hook_compute()
        self._last_tick = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            try:
                # /proc and statvfs reads stay off the event loop.
                used = await asyncio.to_thread(self.resources)
                self.tick(time.monotonic(), used)
            except Exception as e:  # the API must outlive a bug in a counter
                self.agent.log("error", "observer_tick_failed", error=repr(e))

    def resources(self) -> dict[str, int | None]:
        """Memory of the agent and its workers, and the data dir's file system (blocking
        reads: the sampler runs this in a thread)."""
        rss: int | None
        pids = tree_pids(os.getpid())
        if pids is not None:
            rss = sum(proc_rss_bytes(pid) or 0 for pid in pids)
        else:
            rss = self._psutil_tree_rss()
        free = used = None
        with contextlib.suppress(OSError):
            du = shutil.disk_usage(self.agent.data_dir)
            free, used = du.free, du.used
        return {"memory_rss_bytes": rss, "disk_free_bytes": free, "disk_used_bytes": used}

    def _psutil_tree_rss(self) -> int | None:
        """``resources``' memory where ``tree_pids`` cannot walk the tree."""
        import psutil  # only where /proc cannot say (a node never loads it on Linux)

        rss: int | None = None
        try:
            me = psutil.Process()
            procs = [me]
            with contextlib.suppress(psutil.Error):
                procs += me.children(recursive=True)
            total = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            rss = total
        except psutil.Error:
            rss = None
        return rss

    def tick(self, now: float, used: Mapping[str, int | None] | None = None) -> None:
        """Close the current second: one point into the bounded ring."""
        self._hook_compute()
        if used is None:
            used = self.resources()
        dt = max(0.0, now - self._last_tick)
        self._last_tick = now
        lat = sorted(self._second_lat)
        st = self.agent.stats
        net = (sum(st.bytes_in.values()), sum(st.bytes_out.values()))
        before, self._net_seen = self._net_seen, net
        net_in = net_out = None
        if before is not None and dt > 0:
            net_in = round(max(0, net[0] - before[0]) / dt, 1)
            net_out = round(max(0, net[1] - before[1]) / dt, 1)
        self.points.append({
            "t": round(time.time(), 3),
            "tasks_done_per_s": round(self._second_done / dt, 3) if dt > 0 else 0.0,
            "tasks_failed_per_s": round(self._second_failed / dt, 3) if dt > 0 else 0.0,
            "latency_p50_ms": round(_percentile(lat, 0.5) * 1000, 3) if lat else None,
            "latency_p99_ms": round(_percentile(lat, 0.99) * 1000, 3) if lat else None,
            "cpu_ratio": round(float(self.agent.power.utilisation), 4),
            "memory_rss_bytes": used.get("memory_rss_bytes"),
            "disk_free_bytes": used.get("disk_free_bytes"),
            "disk_used_bytes": used.get("disk_used_bytes"),
            "net_in_bytes_per_s": net_in,
            "net_out_bytes_per_s": net_out,
        })
        self._second_done = 0
        self._second_failed = 0
        self._second_lat = []
        self._events_from_counters()

    def _events_from_counters(self) -> None:
        dp = self.agent.dataplane
        compute = self.agent.compute
        watch: list[tuple[str, int, str, str]] = []
        if dp is not None and dp.rm is not None:
            watch.append(("re_replication", dp.rm.stats.get("repairs_started", 0),
                          "repair transfer(s) started", "repairs"))
            watch.append(("under_replicated", dp.stats.get("under_replicated_events", 0),
                          "held object(s) have fewer live replicas than wanted", "under"))
        if compute is not None:
            watch.append(("task_retry", compute.stats.get("resubmitted", 0),
                          "task(s) re-run after a lost worker or result", "retries"))
            watch.append(("task_adopted", compute.stats.get("tasks_adopted", 0),
                          "task(s) of a dead owner adopted", "adopted"))
        for kind, value, text, key in watch:
            before = self._seen.get(key)
            self._seen[key] = value
            if before is not None and value > before:
                self.agent.record_event(kind, self.agent.name, f"{value - before} {text}")

    # ------------------------------------------------------------------ live state

    def utilization(self) -> float:
        compute = self.agent.compute
        sched = None if compute is None else compute.sched
        if compute is None or sched is None:
            return 0.0
        slots = max(1.0, float(compute.capacity.cpus))
        return min(1.0, float(sched.load().running) / slots)

    def node(self) -> dict[str, Any]:
        a = self.agent
        return {
            "name": a.name,
            "address": a.addr,
            "http": a.http_address(),
            "region": a.meta.region,
            "zone": a.meta.zone,
            "incarnation": a.m.incarnation,
            "uptime_s": round(time.time() - a.started_at, 3),
            "version": meshscale.__version__,
        }

    def _loads(self) -> dict[str, dict[str, Any]]:
        compute = self.agent.compute
        sched = None if compute is None else compute.sched
        if compute is None or sched is None:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for name, (ld, cap) in compute.peer_loads().items():
            out[name] = {"running": int(ld.running), "queued": int(ld.queued),
                         "free_cpus": float(ld.free_cpus), "slots": float(cap.cpus)}
        own = sched.load()
        out[self.agent.name] = {"running": int(own.running), "queued": int(own.queued),
                                "free_cpus": float(own.free_cpus),
                                "slots": float(compute.capacity.cpus)}
        return out

    def members(self) -> list[dict[str, Any]]:
        m = self.agent.m
        loads = self._loads()
        out = []
        for mm in sorted(m.members.values(), key=lambda x: x.name):
            own = mm.name == self.agent.name
            coord = m.coordinate() if own else mm.coord
            rtt = m.estimate_rtt_to(mm.name)
            out.append({
                "name": mm.name,
                "address": mm.addr,
                "http": mm.meta.tags.get("http"),
                "region": mm.meta.region,
                "zone": mm.meta.zone,
                "state": STATE_NAMES.get(mm.state, str(mm.state)),
                "incarnation": mm.inc,
                "cert_expires": _int_or_none(mm.meta.tags.get("cert_expires")),
                "disk_full": is_full(mm.meta.tags),
                "power": str(power_state(mm.meta.tags) or ""),
                "rtt_ms": None if rtt is None else round(rtt * 1000, 3),
                "coord": None if coord is None else {
                    "vec": [float(x) for x in coord.vec],
                    "height": float(coord.height),
                    "error": float(coord.error),
                },
                "load": loads.get(mm.name) if mm.state <= State.SUSPECT else None,
                "labels": dict(mm.meta.labels),
            })
        return out

    def events(self, since: int = 0, last: int | None = None) -> list[dict[str, Any]]:
        evs = [e for e in self.agent.events if e.seq > since]
        if last is not None:
            evs = evs[-last:] if last > 0 else []
        out = []
        for e in evs:
            detail = e.detail
            if not detail and e.event.startswith("member_"):
                detail = f"incarnation {e.incarnation}"
                if e.source:
                    detail += f", reported by {e.source}"
            out.append({"seq": e.seq, "time": round(e.ts, 3), "kind": e.event,
                        "node": e.name, "detail": detail})
        return out

    def throughput(self, last: int = THROUGHPUT_POINTS) -> list[dict[str, Any]]:
        pts = list(self.points)
        return pts[-last:] if last > 0 else []

    def node_points(self, req: PointsRequest) -> NodePoints:
        """``node.points``: this node's newest points (bounded by the request's struct)."""
        return NodePoints(name=self.agent.name,
                          points=[NodePoint(**p) for p in self.throughput(req.last)])

    async def mesh_points(self, per_node: int = MESH_POINTS_PER_NODE) -> dict[str, Any]:
        """Every live node's newest ``per_node`` points (``node.points`` asked of each at
        once, ``MESH_POINTS_TIMEOUT_S`` each; a node asked before is asked only for the
        seconds since, plus two), and their tasks done and failed summed per second: the
        dashboard's mesh-wide chart and per-node resources."""
        alive = sorted(mm.name for mm in self.agent.m.members.values()
                       if mm.state <= State.SUSPECT)
        for gone in set(self._mesh_pts) - set(alive):
            del self._mesh_pts[gone]
            self._mesh_asked.pop(gone, None)
        now = time.monotonic()

        async def one(name: str) -> NodePoints | None:
            asked = self._mesh_asked.get(name)
            last = per_node if asked is None or name not in self._mesh_pts \
                else min(per_node, int(now - asked) + 2)
            try:
                return await call_node(self.agent, name, POINTS,
                                       PointsRequest(last=last), lane=MESH_TASKS_LANE,
                                       timeout_s=MESH_POINTS_TIMEOUT_S)
            except (ValueError, RpcError, OSError):
                return None  # not serving HTTP (no points kept), or did not answer

        answers = await asyncio.gather(*(one(n) for n in alive))
        nodes: dict[str, list[dict[str, Any]]] = {}
        done: Counter[int] = Counter()
        failed: Counter[int] = Counter()
        for name, ans in zip(alive, answers, strict=True):
            if ans is None:
                self._mesh_pts.pop(name, None)  # asked afresh next time
                continue
            self._mesh_asked[name] = now
            kept = self._mesh_pts.get(name)
            if kept is None:
                kept = self._mesh_pts[name] = deque(maxlen=per_node)
            newest = kept[-1]["t"] if kept else float("-inf")
            for np in ans.points:
                if np.t > newest:
                    kept.append({f: getattr(np, f) for f in NodePoint.__struct_fields__})
            pts = list(kept)
            nodes[name] = pts
            for p in pts:
                sec = int(p["t"])
                done[sec] += p["tasks_done_per_s"]
                failed[sec] += p["tasks_failed_per_s"]
        total = [{"t": float(sec), "tasks_done_per_s": round(done[sec], 3),
                  "tasks_failed_per_s": round(failed[sec], 3)} for sec in sorted(done)]
        return {"nodes": nodes, "total": total, "nodes_asked": len(alive),
                "nodes_answered": len(nodes)}

    async def mesh_tasks(self, limit: int, per_node: int = MESH_TASKS_PER_NODE
                         ) -> dict[str, Any]:
        """The newest tasks of every live owner (``task.list`` asked of each at once,
        ``MESH_TASKS_TIMEOUT_S`` each), merged newest first, and how many ended, failed
        and run now among them: what the dashboard's task table shows."""
        alive = [mm.name for mm in self.agent.m.members.values() if mm.state <= State.SUSPECT]

        async def one(name: str) -> list[Any] | None:
            try:
                return await call_node(self.agent, name, TASK_LIST,
                                       ListRequest(limit=per_node), lane=MESH_TASKS_LANE,
                                       timeout_s=MESH_TASKS_TIMEOUT_S)
            except (ValueError, RpcError, OSError):
                return None

        answers = await asyncio.gather(*(one(n) for n in alive))
        rows = [r for rs in answers if rs for r in rs]
        rows.sort(key=lambda r: (-r.submitted, r.task_id))
        now = time.time()
        out = [{
            "id": r.task_id, "name": r.name or "-", "state": str(r.state),
            "node": r.node or None, "owner": r.owner, "submitted_at": r.submitted,
            "duration_ms": round(((r.finished or now) - r.submitted) * 1000, 1)
            if r.submitted else None,
            "running": not r.finished, "error": r.error, "reason": r.reason,
        } for r in rows[:limit]]
        states = Counter(str(r.state) for r in rows)
        return {"tasks": out, "counts": dict(states), "nodes_asked": len(alive),
                "nodes_answered": sum(1 for a in answers if a is not None)}

    async def tasks(self, limit: int) -> list[dict[str, Any]]:
        compute = self.agent.compute
        if compute is None:
            return []
        try:
            rows = await self.agent.call_local(TASK_LIST, ListRequest(limit=limit))
        except ApiError as e:
            if e.code == ErrorCode.UNKNOWN_METHOD:  # not served yet
                return []
            raise
        book = compute.book
        out = []
        for r in rows:
            tid = r.task_id
            rec = book.find(tid)
            name = r.name
            if not name and rec is not None:  # a client too old to send the name
                labels = rec.labels if isinstance(rec, TaskRecord) else {}
                name = labels.get("name") or f"fn:{rec.fn_id[:12]}"
            submitted, finished = r.submitted, r.finished
            out.append({
                "id": tid,
                "name": name,
                "state": str(r.state),
                "node": r.node or None,
                "reason": r.reason,
                "owner": r.owner,
                "submitted_at": submitted,
                "latency_ms": round((finished - submitted) * 1000, 3)
                if finished and submitted else None,
            })
        return out

    async def objects(self, limit: int, *, after: str = "", prefix: str = "",
                      data_class: str | None = None,
                      max_scanned: int = LIST_SCAN_MAX_OBJECTS
                      ) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` objects in id order after ``after``, narrowed to ids starting
        with ``prefix`` and to ``data_class`` (``core.objects.listing_step``), and the
        cursor of the next page (None: none left). At most ``max_scanned`` objects are
        looked at per call: a narrow filter over a large mesh returns a short page and a
        cursor to go on from, never a scan of every object."""
        start = listing_start(after, prefix)
        out: list[dict[str, Any]] = []
        scanned = 0
        # One more than the page (to know whether more follow), or whole pages while a
        # class filter may pass over many.
        size = max(1, min(MAX_LIST_PAGE, max_scanned,
                          limit + 1 if data_class is None else MAX_LIST_PAGE))
        while True:
            try:
                page = await self.agent.call_local(objects_api.LIST, objects_api.ListRequest(
                    after=start, limit=size))
            except ApiError as e:
                if e.code == ErrorCode.UNKNOWN_METHOD:  # a node without a data plane
                    return [], None
                raise
            for o in page.objects:
                res = o.residency
                cls = None if res is None else res.data_class
                step = listing_step(o.id, cls, prefix=prefix, want_class=data_class)
                if step == "stop":
                    return out, None
                if step == "take":
                    if len(out) == limit:
                        return out, out[-1]["id"]
                    out.append({
                        "id": o.id,
                        "size": o.size,
                        "replicas": list(o.replica_set),
                        "holders": list(o.holders),
                        "data_class": cls,
                        "residency": None if res is None else res.regions,
                        "under_replicated": o.health != "ok",
                    })
                start = o.id
                scanned += 1
                if scanned >= max_scanned:
                    return out, start
            if page.next is None or not page.objects:
                return out, None

    # ------------------------------------------------------------------ metric inputs

    def member_states(self) -> dict[str, int]:
        counts = dict.fromkeys(STATE_NAMES.values(), 0)
        for mm in self.agent.m.members.values():
            counts[STATE_NAMES.get(mm.state, "alive")] += 1
        return counts

    def disk_space(self) -> tuple[int, int] | None:
        """(free bytes, reserve) of the data dir, or None on a node without a data plane.
        Before the store is open (a scrape can come first) they are read from the data dir
        and the data plane's configuration, so the alarm is never missing."""
        dp = self.agent.dataplane
        if dp is None:
            return None
        try:
            if dp.store is not None:
                return dp.store.disk_space()
            st = os.statvfs(self.agent.data_dir)
            return st.f_bavail * st.f_frsize, dp.cfg.storage.min_free_bytes
        except OSError:
            return None

    def store_stats(self) -> tuple[int, int, int]:
        """(objects, bytes, under-replicated held here) from the data plane's live state."""
        dp = self.agent.dataplane
        if dp is None or dp.store is None or dp.rm is None:
            return 0, 0, 0
        objects, nbytes = dp.store.totals()
        return objects, nbytes, dp.rm.under_replicated_count()
