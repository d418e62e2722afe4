"""The plan file: a user's sites, the links between them, failure rates and workloads.

A plan is TOML (``docs/plan.md`` describes every field; ``meshscale plan --example``
prints a commented one). It is decoded with msgspec into the Structs below, which forbid
unknown fields and bound every number, then checked as a whole (``check``): names refer
to things that exist, every workload's data class allows some region, and every site
can reach the central region over the links. The first problem found is raised as one
``PlanError`` naming the field and the reason.
"""

from __future__ import annotations

import heapq
import math
import tomllib
from itertools import pairwise
from pathlib import Path
from typing import Annotated

import msgspec

__all__ = [
    "MAX_NODES",
    "Batch",
    "Calls",
    "DataClass",
    "Failures",
    "Link",
    "Plan",
    "PlanError",
    "Region",
    "Routes",
    "Stream",
    "Workload",
    "load_plan",
    "parse_plan",
    "routes",
]

MAX_NODES = 400
"""Nodes the planner simulates in one run; a larger plan is refused (the simulator is
being made faster in issue 17's item 5)."""

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
NonNeg = Annotated[float, msgspec.Meta(ge=0.0, le=1e12)]
Positive = Annotated[float, msgspec.Meta(gt=0.0, le=1e12)]
Hour = Annotated[float, msgspec.Meta(ge=0.0, le=24.0)]
Fraction = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
HopQuantiles = Annotated[
    list[tuple[Annotated[float, msgspec.Meta(ge=0.0, le=1.0)],
               Annotated[float, msgspec.Meta(ge=0.0, le=1000.0)]]],
    msgspec.Meta(min_length=1, max_length=64)]
"""A hop's time as a distribution: [quantile level, ms] points, levels increasing."""


class PlanError(ValueError):
    """A plan that cannot be run: ``field`` names where, the message says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class Region(_Strict, kw_only=True, frozen=True):
    """A site or a cloud region: its servers and what they draw."""

    name: Name
    nodes: Annotated[int, msgspec.Meta(ge=0, le=100_000)]
    cores_per_node: Annotated[float, msgspec.Meta(gt=0.0, le=1024.0)] = 4.0
    memory_per_node_gb: Annotated[float, msgspec.Meta(gt=0.0, le=65536.0)] = 16.0
    idle_w: NonNeg = 60.0
    peak_w: NonNeg = 200.0
    pue: Annotated[float, msgspec.Meta(ge=1.0, le=5.0)] = 1.0
    server_cost_per_month: NonNeg = 0.0
    jurisdiction: Annotated[str, msgspec.Meta(max_length=64)] = ""
    elastic: bool = False
    outages_per_year: NonNeg = 0.0
    lan_rtt_ms: Annotated[float, msgspec.Meta(gt=0.0, le=1000.0)] = 0.5


class Link(_Strict, kw_only=True, frozen=True):
    """A network path between two regions (both directions)."""

    a: Name
    b: Name
    rtt_ms: Annotated[float, msgspec.Meta(gt=0.0, le=10_000.0)]
    bandwidth_mbps: Annotated[float, msgspec.Meta(gt=0.0, le=1e7)] = 1000.0
    egress_price_per_gb: NonNeg = 0.0


class Failures(_Strict, kw_only=True, frozen=True):
    node_mtbf_hours: Positive = 8760.0
    node_repair_hours: Positive = 8.0
    region_outage_hours: Positive = 4.0


class DataClass(_Strict, kw_only=True, frozen=True):
    name: Name
    allowed_regions: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=1000)]


Sources = Annotated[dict[Name, Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]],
                    msgspec.Meta(min_length=1, max_length=1000)]


class Stream(_Strict, tag="stream", tag_field="kind", kw_only=True, frozen=True):
    """Records from sources at sites, each scored by a model, a result sent back."""

    name: Name
    data_class: Annotated[str, msgspec.Meta(max_length=64)] = ""
    sources: Sources
    records_per_s: NonNeg
    """Per source."""
    record_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 30)] = 1000
    cpu_ms_per_record: Annotated[float, msgspec.Meta(gt=0.0, le=3_600_000.0)] = 5.0
    cpu_ms_per_batch: Annotated[float, msgspec.Meta(ge=0.0, le=3_600_000.0)] = 0.0
    """Fixed CPU cost of one operator call, whatever its batch's size (loading inputs
    into a model, a library's per-call overhead); measure it as ``cpu_ms_per_record``."""
    batch_records: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256
    """Records the operator is given at most per call (its ``batch_size``)."""
    results_to: Annotated[str, msgspec.Meta(max_length=64)] = ""
    """The site whose consumer reads every result (a control room); "" (the default):
    each source's own site."""
    output_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 30)] = 100
    latency_slo_ms: Positive = 100.0
    start_hour: Hour = 0.0
    end_hour: Hour = 24.0


class Calls(_Strict, tag="calls", tag_field="kind", kw_only=True, frozen=True):
    """Request/response calls from callers at sites to a service."""

    name: Name
    data_class: Annotated[str, msgspec.Meta(max_length=64)] = ""
    callers: Sources
    calls_per_s: NonNeg
    """Per caller."""
    request_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 30)] = 2000
    response_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 30)] = 500
    cpu_ms_per_call: Annotated[float, msgspec.Meta(gt=0.0, le=3_600_000.0)] = 10.0
    latency_slo_ms: Positive = 200.0
    start_hour: Hour = 0.0
    end_hour: Hour = 24.0


class Batch(_Strict, tag="batch", tag_field="kind", kw_only=True, frozen=True):
    """A job over input that lives at sites, due by a deadline, run once a day."""

    name: Name
    data_class: Annotated[str, msgspec.Meta(max_length=64)] = ""
    input_gb: Annotated[dict[Name, NonNeg], msgspec.Meta(min_length=1, max_length=1000)]
    """Input size where it lives, per region."""
    cpu_hours: Positive
    deadline_hours: Annotated[float, msgspec.Meta(gt=0.0, le=168.0)]
    output_gb: NonNeg = 0.0
    start_hour: Hour = 0.0


Workload = Stream | Calls | Batch


class Plan(_Strict, kw_only=True, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    central_region: Name
    price_per_kwh: NonNeg = 0.20
    currency: Annotated[str, msgspec.Meta(max_length=8)] = "EUR"
    window_s: Annotated[float, msgspec.Meta(ge=1.0, le=600.0)] = 20.0
    """Virtual seconds of peak traffic simulated per stream or call workload."""
    max_records: Annotated[int, msgspec.Meta(ge=100, le=1_000_000)] = 40_000
    """Records (or calls) simulated per workload and placement; the window shrinks to fit."""
    hop_overhead_ms: Annotated[float, msgspec.Meta(ge=0.0, le=1000.0)] = 1.0
    """Software time of one hop of a record between processes (an RPC, a hand-off to a
    worker: framing, TLS, the event loop); ``bench/stream_hop.py`` measures it."""
    fetch_hop_ms: Annotated[float, msgspec.Meta(ge=0.0, le=1000.0)] | None = None
    """Software time of a fetch one node answers another (a subscriber's node's follower,
    an operator's runner in another region); ``bench/stream_hop.py`` measures it (what a
    read through a follower adds to a read at the shard's holder). Unset:
    ``hop_overhead_ms``."""
    hop_quantiles_ms: HopQuantiles | None = None
    """A hop's software time as a distribution, ``[[level, ms], ...]`` (e.g. ``[[0.5, 1.2],
    [0.9, 2.0], [0.99, 9.0]]``): each hop the flow model charges draws its own time from
    it (linear between the points, the first's below and the last's above), with the
    run's seed. On a loaded machine a few hops wait for a core for tens of ms and make the
    p99; a constant does not. ``bench/stream_hop.py`` measures it (its
    ``hop_quantiles_ms``). Unset: every hop takes ``hop_overhead_ms``."""
    fetch_hop_quantiles_ms: HopQuantiles | None = None
    """The same for a fetch one node answers another. Unset: ``fetch_hop_ms`` when set,
    else as a hop (``hop_quantiles_ms``)."""
    target_utilization: Fraction = 0.7
    """Elastic regions get enough servers to stay below this at peak."""
    hop_cpu_ms: Annotated[float, msgspec.Meta(ge=0.0, le=1000.0)] = 0.0
    """With ``host_cores``: CPU one hop of a stream message costs the shared host (the
    nodes' own work moving records, which slows the operators); ``bench/stream_hop.py``
    measures it."""
    host_cores: Annotated[float, msgspec.Meta(ge=0.0, le=4096.0)] = 0.0
    """0: every node has its own cores. Above 0: every node of the plan runs on one host
    with this many cores (a test mesh on one machine, as ``meshscale up`` starts it), so
    operators running at once share them."""
    host_background_jobs: Annotated[float, msgspec.Meta(ge=0.0, le=100_000.0)] = 0.0
    """With ``host_cores``: threads of other work runnable on that host, on average (its
    run queue less the mesh's own); each takes its share of the cores as an operator
    does. ``bench/plan_calibration.py`` measures it on its machine."""
    regions: Annotated[list[Region], msgspec.Meta(min_length=1, max_length=1000)]
    links: Annotated[list[Link], msgspec.Meta(max_length=100_000)] = []
    failures: Failures = Failures()
    data_classes: Annotated[list[DataClass], msgspec.Meta(max_length=1000)] = []
    workloads: Annotated[list[Workload], msgspec.Meta(min_length=1, max_length=100)]

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    def allowed(self, w: Workload) -> frozenset[str] | None:
        """Regions ``w``'s data class allows (None: no class, anywhere)."""
        if not w.data_class:
            return None
        for c in self.data_classes:
            if c.name == w.data_class:
                return frozenset(c.allowed_regions)
        raise KeyError(w.data_class)


class Routes(msgspec.Struct, frozen=True):
    """Shortest paths between every pair of regions over the links."""

    rtt_s: dict[tuple[str, str], float]
    bottleneck_bps: dict[tuple[str, str], float]
    egress_per_byte: dict[tuple[str, str], float]
    hops: dict[tuple[str, str], int]


def routes(plan: Plan) -> Routes:
    """Dijkstra on RTT from every region; a path's bandwidth is its narrowest link and its
    price the sum of its links' egress prices."""
    adj: dict[str, list[Link]] = {r.name: [] for r in plan.regions}
    for ln in plan.links:
        adj[ln.a].append(ln)
        adj[ln.b].append(ln)
    rtt: dict[tuple[str, str], float] = {}
    bw: dict[tuple[str, str], float] = {}
    price: dict[tuple[str, str], float] = {}
    hops: dict[tuple[str, str], int] = {}
    for src in adj:
        best: dict[str, tuple[float, float, float, int]] = {src: (0.0, math.inf, 0.0, 0)}
        heap: list[tuple[float, str]] = [(0.0, src)]
        while heap:
            d, at = heapq.heappop(heap)
            if d > best[at][0]:
                continue
            _, b, p, h = best[at]
            for ln in adj[at]:
                nxt = ln.b if ln.a == at else ln.a
                nd = d + ln.rtt_ms / 1000.0
                if nxt not in best or nd < best[nxt][0]:
                    best[nxt] = (nd, min(b, ln.bandwidth_mbps * 1e6),
                                 p + ln.egress_price_per_gb / 1e9, h + 1)
                    heapq.heappush(heap, (nd, nxt))
        for dst, (d, b, p, h) in best.items():
            rtt[(src, dst)], bw[(src, dst)], price[(src, dst)], hops[(src, dst)] = d, b, p, h
    return Routes(rtt, bw, price, hops)


def parse_plan(text: str, source: str = "plan") -> Plan:
    """Decode and check a plan; raises ``PlanError`` with one line."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanError(source, f"not valid TOML: {e}") from None
    try:
        plan = msgspec.convert(raw, Plan)
    except msgspec.ValidationError as e:
        raise PlanError(source, str(e)) from None
    try:
        check(plan)
    except PlanError as e:
        raise PlanError(f"{source}: {e.field}", e.reason) from None
    return plan


def load_plan(path: Path) -> Plan:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(str(path), f"cannot read: {e}") from None
    return parse_plan(text, str(path))


def check(plan: Plan) -> None:
    """The rules a field alone cannot state."""
    for key in ("hop_quantiles_ms", "fetch_hop_quantiles_ms"):
        points = getattr(plan, key)
        for i, ((l0, v0), (l1, v1)) in enumerate(pairwise(points or [])):
            if l1 <= l0:
                raise PlanError(f"{key}[{i + 1}]", f"level {l1} is not above the one "
                                f"before it ({l0}): levels must increase")
            if v1 < v0:
                raise PlanError(f"{key}[{i + 1}]", f"{v1} ms is below the one before it "
                                f"({v0} ms): a higher level cannot take less time")
    names = [r.name for r in plan.regions]
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            raise PlanError(f"regions[{i}].name", f"region {n!r} is listed twice")
        seen.add(n)
    for i, r in enumerate(plan.regions):
        if r.peak_w < r.idle_w:
            raise PlanError(f"regions[{i}].peak_w", f"{r.peak_w} W is below idle_w {r.idle_w} W")
    total = sum(r.nodes for r in plan.regions)
    if total > MAX_NODES:
        raise PlanError("regions", f"{total} nodes in all; the planner simulates at most "
                        f"{MAX_NODES} today")
    if plan.central_region not in seen:
        raise PlanError("central_region", f"{plan.central_region!r} is not a region "
                        f"(regions: {', '.join(names)})")
    central = plan.region(plan.central_region)
    if central.nodes == 0 and not central.elastic:
        raise PlanError("central_region", f"{central.name!r} has no nodes and is not elastic")
    pairs: set[frozenset[str]] = set()
    for i, ln in enumerate(plan.links):
        for end in ("a", "b"):
            if getattr(ln, end) not in seen:
                raise PlanError(f"links[{i}].{end}", f"{getattr(ln, end)!r} is not a region")
        if ln.a == ln.b:
            raise PlanError(f"links[{i}]", f"a link from {ln.a!r} to itself")
        pair = frozenset((ln.a, ln.b))
        if pair in pairs:
            raise PlanError(f"links[{i}]", f"{ln.a!r}-{ln.b!r} is linked twice")
        pairs.add(pair)
    rt = routes(plan)
    for i, r in enumerate(plan.regions):
        if (plan.central_region, r.name) not in rt.rtt_s:
            raise PlanError(f"regions[{i}]", f"{r.name!r} is unreachable: no path of links "
                            f"to the central region {plan.central_region!r}")
    classes: set[str] = set()
    for i, c in enumerate(plan.data_classes):
        if c.name in classes:
            raise PlanError(f"data_classes[{i}].name", f"class {c.name!r} is listed twice")
        classes.add(c.name)
    wnames: set[str] = set()
    for i, w in enumerate(plan.workloads):
        where = f"workloads[{i}]"
        if w.name in wnames:
            raise PlanError(f"{where}.name", f"workload {w.name!r} is listed twice")
        wnames.add(w.name)
        if w.data_class and w.data_class not in classes:
            raise PlanError(f"{where}.data_class", f"no data class {w.data_class!r} in "
                            f"data_classes")
        allowed = plan.allowed(w)
        if allowed is not None and not (allowed & seen):
            raise PlanError(f"{where}.data_class", f"class {w.data_class!r} allows no region "
                            f"of the topology")
        if allowed is not None and not any(
                plan.region(r).nodes > 0 or plan.region(r).elastic for r in allowed):
            raise PlanError(f"{where}.data_class", f"class {w.data_class!r} allows only "
                            f"regions without nodes")
        sites = (w.sources if isinstance(w, Stream) else w.callers if isinstance(w, Calls)
                 else w.input_gb)
        key = ("sources" if isinstance(w, Stream) else "callers" if isinstance(w, Calls)
               else "input_gb")
        for site in sites:
            if site not in seen:
                raise PlanError(f"{where}.{key}", f"{site!r} is not a region")
        if isinstance(w, Stream) and w.results_to and w.results_to not in seen:
            raise PlanError(f"{where}.results_to", f"{w.results_to!r} is not a region")
        if isinstance(w, Stream | Calls) and w.end_hour <= w.start_hour:
            raise PlanError(f"{where}.end_hour", f"{w.end_hour} is not after start_hour "
                            f"{w.start_hour}")


EXAMPLE = '''\
# A meshscale plan: your sites, the links between them, and your workloads.
# `meshscale plan FILE --html report.html` weighs a mesh against one central region.
# Units are in the field names (_ms, _s, _gb, _w, _mbps, _per_s, _hours).

name = "two plants and a cloud region"
central_region = "cloud"        # where "all work in one central region" runs
price_per_kwh = 0.25            # electricity, in `currency`
currency = "EUR"
window_s = 20                   # virtual seconds of peak traffic simulated per workload
hop_overhead_ms = 1.0           # software time of one hop (bench/stream_hop.py measures it)
# fetch_hop_ms = 1.0            # a fetch one node answers another (unset: hop_overhead_ms)
# hop_quantiles_ms = [[0, 0.8], [0.5, 1.0], [0.9, 1.3], [0.99, 9.0]]
#                               # a hop's time as [level, ms] points, each hop drawing its
#                               # own (bench/stream_hop.py; unset: hop_overhead_ms)
# fetch_hop_quantiles_ms = [[0.5, 1.0], [0.99, 6.0]]  # the same for a node's fetch answer
target_utilization = 0.7        # elastic regions are sized to stay below this

[[regions]]
name = "plant-a"
nodes = 2                       # servers at the site
cores_per_node = 8
memory_per_node_gb = 32
idle_w = 70                     # watts drawn idle ...
peak_w = 220                    # ... and with every core busy
server_cost_per_month = 40      # amortised hardware and support, per server
jurisdiction = "DE"
outages_per_year = 2            # whole-site outages (power, uplink)

[[regions]]
name = "plant-b"
nodes = 2
cores_per_node = 8
jurisdiction = "CZ"

[[regions]]
name = "cloud"
nodes = 2                       # the minimum; elastic regions grow to the load
cores_per_node = 16
idle_w = 120
peak_w = 400
pue = 1.2                       # facility overhead on every watt
server_cost_per_month = 300
jurisdiction = "DE"
elastic = true
outages_per_year = 0.5

[[links]]
a = "plant-a"
b = "cloud"
rtt_ms = 25
bandwidth_mbps = 200
egress_price_per_gb = 0.05

[[links]]
a = "plant-b"
b = "cloud"
rtt_ms = 30
bandwidth_mbps = 100
egress_price_per_gb = 0.05

[failures]
node_mtbf_hours = 20000         # mean time between failures of one server
node_repair_hours = 24
region_outage_hours = 4         # how long a whole-region outage lasts

[[data_classes]]
name = "camera"
allowed_regions = ["plant-a", "plant-b", "cloud"]

[[workloads]]
kind = "stream"                 # stream | calls | batch
name = "weld-inspection"
data_class = "camera"
sources = { plant-a = 6, plant-b = 4 }   # sources per site
records_per_s = 10              # per source
record_bytes = 40000
cpu_ms_per_record = 12
cpu_ms_per_batch = 0            # fixed CPU cost of one operator call (per batch)
batch_records = 256             # records per operator call at most (its batch_size)
output_bytes = 200
latency_slo_ms = 40
start_hour = 6                  # active hours (local time)
end_hour = 22

[[workloads]]
kind = "calls"
name = "recipe-lookup"
callers = { plant-a = 10, plant-b = 10 }
calls_per_s = 2                 # per caller
request_bytes = 1000
response_bytes = 4000
cpu_ms_per_call = 5
latency_slo_ms = 300

[[workloads]]
kind = "batch"
name = "nightly-yield-report"
input_gb = { plant-a = 20, plant-b = 15 }  # where the input lives
cpu_hours = 30
deadline_hours = 6
start_hour = 0
'''
