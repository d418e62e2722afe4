"""Services in the simulator: replicas placed by ``core.services``, callers at several
sites, calls routed, failed over and scaled under crashes, pauses and partitions.

``ServiceNode`` is a ``DrivenProtocol`` that plays the driver of ``core/services.py`` as
the runtime will: on each gossip round it steps the autoscaler of each autoscaled
service, computes the placement (``place_service``) from its view and the gossiped call
sources, starts a replica it is named for (ready ``start_s`` later: the model loading)
and stops one it no longer is once the new placement's replicas are all ready
(``keep_replica``). As a caller's node it routes each call (``route_call``), sends it to
the replica's node as a datagram, and acts on what comes back: an answer, "not here" (a
stale view: ``redirect``), or nothing within ``call_timeout_s`` or the replica's node
reported down (``failover``). A replica runs a call for a service time drawn from the
node's seeded generator and answers.

``ServiceMesh`` builds the mesh and, like ``sim/compute.py``, plays gossip and failure
detection as an oracle with delays: every ``gossip_s`` it snapshots each node's
replicas (ready or loading, calls in flight), the calls each node sent per service
over the last ``source_window_s`` and each node's autoscaler state, and hands the snapshot
to every live node ``gossip_delay_s`` later; a crashed node is reported down to everyone
``detect_s`` after the crash (a paused or partitioned one is not). Faults come from the
engine (``Simulator.crash``, ``restart``, ``pause``, ``partition``). Clients ("doors")
sit at sites and send calls through a node of their region (another one when that node
is down); a caller's node that crashes fails its pending calls with
``caller-node-lost`` (the client's connection broke).

Oracles, checked against the true state rather than any node's view (except routing,
which is judged by what the caller's node could know):

- every call ends exactly once, answered or failed with a stated error
  (``ServiceReport.lost``: issued and never ended);
- a call to a method not declared idempotent runs at most once (``ran_twice``);
- every replica starts on a node the service's residency and placement allow
  (``residency_violations``);
- after each fault and each change of target (an autoscaler step), the ready replicas
  of each service reach target within ``recover_bound_s`` unless another fault or change
  comes first (``recovery_problems``), and they are on target in a window of that length
  after the run settles (``final_counts``); the target is the desired count (the fixed
  count, or the desired count most live nodes hold), capped by the live nodes the rules
  allow (for a central service, those of one region);
- each call goes to a replica in the caller's region whenever the caller's node's view
  has a healthy replica there that the call has not tried (``routing_violations``), and
  never to one its view lists as unhealthy (``unhealthy_routes``); and,
  against the truth, the share of first attempts sent in-region while a replica was
  ready on a live node there is reported (``first_local``).

Health: every service has a health method in the simulator. Each node checks its ready
replicas every ``health_interval_s`` and steps ``core.services.health_step``; a replica
made sick by the fault ``ServiceMesh.sicken`` fails its checks, and after
``health_failures`` in a row it is unhealthy: gossiped as not healthy, it answers "not
here" to calls, and once its calls in flight are done the node starts a new one (which
is well), as the runtime does.

The decisions are parameters (``placer``, ``router``, ``fail_over``; by default the
core's), so a test can hand in a broken one and see an oracle catch it.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import msgspec

from meshscale.core.outputs import DrivenProtocol, Output, SendDatagram
from meshscale.core.placement import Candidate, Residency
from meshscale.core.scheduling import NodeState, Resources
from meshscale.core.services import (
    CENTRAL,
    Autoscale,
    CallFailed,
    HealthState,
    ReplicaView,
    Retry,
    ScaleState,
    ServiceConfig,
    ServicePlacement,
    ServiceSpec,
    Unplaceable,
    adopt_desired,
    agreed_count,
    autoscale_step,
    failover,
    health_step,
    keep_replica,
    place_service,
    redirect,
    route_call,
)
from meshscale.core.vivaldi import Coordinate
from meshscale.sim.engine import NodeContext, Simulator
from meshscale.sim.topology import Topology

__all__ = [
    "CALLER_NODE_LOST",
    "ServiceMesh",
    "ServiceNode",
    "ServiceReport",
    "burst_run",
    "chaos_run",
    "default_services",
]

CALLER_NODE_LOST = "caller-node-lost"
"""The node a client sent its call through died before answering it."""

Placer = Callable[[ServiceSpec, Sequence[NodeState], Mapping[str, int], int,
                   Collection[str]], ServicePlacement | Unplaceable]
Router = Callable[[str, Sequence[ReplicaView], random.Random, Coordinate | None,
                   Collection[str]], str | None]
FailOver = Callable[..., Retry | CallFailed]


def core_placer(spec: ServiceSpec, view: Sequence[NodeState], sources: Mapping[str, int],
                count: int, current: Collection[str]) -> ServicePlacement | Unplaceable:
    return place_service(spec, view, sources, count, current=current)


def core_router(region: str, replicas: Sequence[ReplicaView], rng: random.Random,
                coord: Coordinate | None, exclude: Collection[str]) -> str | None:
    return route_call(region, replicas, rng, caller_coord=coord, exclude=exclude)


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(tuple[str, int, str, str])

# Datagram kinds: a call, its answer, "this node does not run that service".
_CALL, _OK, _NOT_HERE = "call", "ok", "not-here"


@dataclass
class _Call:
    cid: int
    service: str
    method: str
    target: str
    tried: set[str]
    deadline: float
    retries: int = 0
    redirects: int = 0


@dataclass
class _Replica:
    ready_at: float
    inflight: int = 0
    stopping: bool = False
    sick: bool = False
    """Its health method fails (the fault ``ServiceMesh.sicken``)."""
    health: HealthState = field(default_factory=HealthState)

    def serving(self, now: float) -> bool:
        return not self.stopping and self.ready_at <= now and self.health.healthy


@dataclass(frozen=True)
class Snapshot:
    """One gossip round as every node receives it."""

    seq: int
    view: tuple[NodeState, ...]
    replicas: Mapping[str, Mapping[str, tuple[bool, int]]]
    """service -> node -> (ready and healthy, calls in flight)."""
    sources: Mapping[str, Mapping[str, int]]
    """service -> caller region -> calls over the last window."""
    desired: Mapping[str, tuple[ScaleState, ...]]
    """service -> the autoscaler states the nodes gossiped."""


# --------------------------------------------------------------------------- node


class ServiceNode:
    """One simulated node: replicas it runs and calls its clients sent through it."""

    def __init__(self, ctx: NodeContext, mesh: ServiceMesh) -> None:
        self.name = ctx.name
        self.region = ctx.region
        self.mesh = mesh
        self.rng = ctx.rng
        self.coord = mesh.coords[ctx.name]
        self.view: dict[str, NodeState] = {}
        self.table: dict[str, dict[str, tuple[bool, int]]] = {}
        self.scale: dict[str, ScaleState] = {}
        self.running: dict[str, _Replica] = {}
        self.calls: dict[int, _Call] = {}
        self.placed: dict[str, ServicePlacement | Unplaceable] = {}
        """service -> its placement from this node's last view."""
        self.sent: deque[tuple[float, str]] = deque()
        """(when, service) of the calls this node sent: its gossiped call sources."""
        self._timers: list[tuple[float, int, str, int, str]] = []
        self._seq = 0
        self._out: list[Output] = []
        self._timer(self.rng.uniform(0.0, mesh.health_interval_s), "health")

    # driver contract
    def handle_datagram(self, src: str, payload: bytes, now: float) -> None:
        kind, cid, service, method = _dec.decode(payload)
        if kind == _CALL:
            self._serve(src, cid, service, method, now)
        elif kind in (_OK, _NOT_HERE):
            call = self.calls.get(cid)
            if call is None or call.target != src:
                return  # a late answer: the call was failed over or has ended
            if kind == _OK:
                del self.calls[cid]
                self.mesh.ended(cid, src, None, now)
            else:
                self._reroute(call, now, lost=False)

    def handle_stream(self, src: str, payload: bytes, now: float) -> bytes | None:
        return None

    def handle_stream_reply(self, src: str, payload: bytes, now: float) -> None:
        return None

    def stream_failed(self, dst: str, now: float) -> None:
        return None

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def on_timer(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, cid, text = heapq.heappop(self._timers)
            if kind == "timeout":
                call = self.calls.get(cid)
                if call is not None and call.target == text and call.deadline <= now:
                    self._reroute(call, now, lost=True)
            elif kind == "done":
                src, _, service = text.partition("\0")
                rep = self.running.get(service)
                if rep is not None:
                    rep.inflight -= 1
                    if rep.stopping and rep.inflight == 0:
                        del self.running[service]
                self._send(src, _OK, cid, service, "")
            elif kind == "ready":
                rep = self.running.get(text)
                if rep is not None and not rep.stopping:
                    self.mesh.replica_ready(self.name, text, now)
            elif kind == "health":
                self._check_health(now)
                self._timer(now + self.mesh.health_interval_s, "health")

    def _check_health(self, now: float) -> None:
        for service, rep in sorted(self.running.items()):
            if rep.stopping or rep.ready_at > now or not rep.health.healthy:
                continue
            rep.health = health_step(rep.health, not rep.sick, self.mesh.config)
            if not rep.health.healthy:
                self.mesh.replica_unhealthy(self.name, service, now)

    def drain(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    # helpers
    def _timer(self, at: float, kind: str, cid: int = 0, text: str = "") -> None:
        self._seq += 1
        heapq.heappush(self._timers, (at, self._seq, kind, cid, text))

    def _send(self, dst: str, kind: str, cid: int, service: str, method: str) -> None:
        self._out.append(SendDatagram(dst, _enc.encode((kind, cid, service, method))))

    # replica side
    def _serve(self, src: str, cid: int, service: str, method: str, now: float) -> None:
        rep = self.running.get(service)
        if rep is None or not rep.serving(now):
            self._send(src, _NOT_HERE, cid, service, method)
            return
        rep.inflight += 1
        self.mesh.executed(cid, self.name, now)
        self._timer(now + self.mesh.service_time(service, self.rng), "done", cid,
                    f"{src}\0{service}")

    def _start(self, service: str, now: float) -> None:
        self.running[service] = _Replica(now + self.mesh.start_s)
        self.mesh.replica_started(self.name, service, now)
        self._timer(now + self.mesh.start_s, "ready", 0, service)

    def _stop(self, service: str) -> None:
        rep = self.running[service]
        if rep.inflight:
            rep.stopping = True
        else:
            del self.running[service]

    # gossip
    def install(self, snap: Snapshot, now: float) -> None:
        self.view = {n.name: n for n in snap.view}
        self.table = {s: {n: v for n, v in reps.items() if n in self.view}
                      for s, reps in snap.replicas.items()}
        for spec in self.mesh.specs:
            name = spec.name
            reps = self.table.get(name, {})
            ready = {n for n, (ok, _) in reps.items() if ok}
            if spec.autoscale is not None:
                gossiped = snap.desired.get(name, ())
                st = self.scale.get(name)
                if st is None:
                    st = adopt_desired(spec.autoscale, gossiped)
                inflight = sum(reps[n][1] for n in ready)
                st = autoscale_step(spec.autoscale, self.mesh.config, st, now, inflight,
                                    len(ready))
                self.scale[name] = st
                count = agreed_count(spec.autoscale, (g.desired for g in gossiped))
            else:
                count = spec.bounds[0]
            placement = self.mesh.placement(snap, spec, count)
            self.placed[name] = placement
            mine = self.running.get(name)
            wanted = isinstance(placement, ServicePlacement) and self.name in placement.nodes
            if wanted and mine is not None and not mine.health.healthy:
                if mine.inflight == 0:
                    self._start(name, now)  # a new process in place of the unhealthy one
            elif wanted and (mine is None or mine.stopping):
                if mine is not None:
                    mine.stopping = False
                else:
                    self._start(name, now)
            elif mine is not None and not mine.stopping and not wanted \
                    and not keep_replica(self.name, placement, ready):
                self._stop(name)

    def node_down(self, name: str, now: float) -> None:
        self.view.pop(name, None)
        for reps in self.table.values():
            reps.pop(name, None)
        for call in [c for c in self.calls.values() if c.target == name]:
            self._reroute(call, now, lost=True)

    def desired(self, service: str) -> int | None:
        st = self.scale.get(service)
        return None if st is None else st.desired

    def scale_state(self, service: str) -> ScaleState | None:
        return self.scale.get(service)

    # caller side
    def replica_views(self, service: str) -> list[ReplicaView]:
        out = []
        for n, (ready, inflight) in sorted(self.table.get(service, {}).items()):
            v = self.view.get(n)
            if v is not None:
                # This node's own replica: its health is known here before any gossip.
                mine = self.running.get(service) if n == self.name else None
                if mine is not None and not mine.health.healthy:
                    ready = False
                out.append(ReplicaView(n, v.region, v.member.zone, inflight, ready, v.coord))
        return out

    def call(self, cid: int, service: str, method: str, now: float) -> None:
        self.sent.append((now, service))
        views = self.replica_views(service)
        target = self.mesh.router(self.region, views, self.rng, self.coord, ())
        if target is None:
            placed = self.placed.get(service)
            why = (f"it cannot be placed: rule {placed.rule}: {placed.message}"
                   if isinstance(placed, Unplaceable) else
                   "it has no healthy replica in this node's view")
            self.mesh.ended(cid, None, f"no-replica: service {service!r}: {why}", now)
            return
        self._dispatch(_Call(cid, service, method, target, set(), 0.0), views, target, now)

    def _dispatch(self, call: _Call, views: list[ReplicaView], target: str,
                  now: float) -> None:
        self.mesh.check_route(self.name, self.region, call, views, target)
        call.target = target
        call.tried.add(target)
        call.deadline = now + self.mesh.call_timeout_s
        self.calls[call.cid] = call
        self._send(target, _CALL, call.cid, call.service, call.method)
        self._timer(call.deadline, "timeout", call.cid, target)

    def _reroute(self, call: _Call, now: float, *, lost: bool) -> None:
        spec = self.mesh.spec_of[call.service]
        views = self.replica_views(call.service)
        if lost:
            d = self.mesh.fail_over(spec, call.method, call.retries, call.tried, self.region,
                                    views, self.rng, self.mesh.config, caller_coord=self.coord)
            call.retries += 1
        else:
            d = redirect(spec, call.method, call.redirects, call.tried, self.region, views,
                         self.rng, self.mesh.config, caller_coord=self.coord)
            call.redirects += 1
        if isinstance(d, Retry):
            self._dispatch(call, views, d.node, now)
        elif isinstance(d, CallFailed):
            del self.calls[call.cid]
            self.mesh.ended(call.cid, None, f"{d.code}: {d.message}", now)
        # anything else (a broken fail-over handed in by a test) leaves the call waiting


def _install(snap: Snapshot, p: DrivenProtocol, now: float) -> None:
    assert isinstance(p, ServiceNode)
    p.install(snap, now)


def _down(name: str, p: DrivenProtocol, now: float) -> None:
    assert isinstance(p, ServiceNode)
    p.node_down(name, now)


def _call(cid: int, service: str, method: str, p: DrivenProtocol, now: float) -> None:
    assert isinstance(p, ServiceNode)
    p.call(cid, service, method, now)


# --------------------------------------------------------------------------- mesh


def default_services() -> list[ServiceSpec]:
    """Three services of the chaos runs: a classifier near its callers (3 replicas), a
    badge checker kept to two regions (personal data) and autoscaled, and a central
    ledger whose writes are not idempotent."""
    return [
        ServiceSpec("classify", replicas=3, idempotent=frozenset({"predict"})),
        ServiceSpec("badge", autoscale=Autoscale(2, 4, 2.0),
                    residency=Residency(frozenset({"eu-west", "us-east"}), "pii"),
                    idempotent=frozenset({"check"})),
        ServiceSpec("ledger", placement=CENTRAL, replicas=2, idempotent=frozenset({"read"})),
    ]


METHODS = {"classify": ("predict", "predict", "predict", "enroll"),
           "badge": ("check", "check", "check", "log"),
           "ledger": ("read", "append")}


class ServiceMesh:
    """A simulated mesh of ``ServiceNode``s named ``n0 .. n{N-1}``."""

    def __init__(
        self,
        nodes: int = 12,
        *,
        seed: int,
        services: Sequence[ServiceSpec] | None = None,
        topology: Topology | None = None,
        config: ServiceConfig | None = None,
        placer: Placer = core_placer,
        router: Router = core_router,
        fail_over: FailOver = failover,
        gossip_s: float = 0.5,
        gossip_delay_s: float = 0.2,
        detect_s: float = 2.0,
        start_s: float = 0.5,
        call_timeout_s: float = 1.0,
        source_window_s: float = 10.0,
        service_time_s: tuple[float, float] = (0.005, 0.02),
        service_time_of: Mapping[str, tuple[float, float]] | None = None,
        recover_bound_s: float = 5.0,
        health_interval_s: float = 0.5,
    ) -> None:
        self.topology = topology or Topology.three_regions()
        self.sim = Simulator(self.topology, seed)
        self.specs = list(services if services is not None else default_services())
        self.spec_of = {s.name: s for s in self.specs}
        self.config = config or ServiceConfig()
        self.placer, self.router, self.fail_over = placer, router, fail_over
        self.gossip_s, self.gossip_delay_s, self.detect_s = gossip_s, gossip_delay_s, detect_s
        self.start_s, self.call_timeout_s = start_s, call_timeout_s
        self.source_window_s = source_window_s
        self.service_time_s = service_time_s
        self.service_time_of = dict(service_time_of or {})
        self.recover_bound_s = recover_bound_s
        self.health_interval_s = health_interval_s
        self.unhealthy_routes: list[str] = []
        self.unhealthy_marked: list[tuple[float, str, str]] = []
        """(when, node, service) each time a replica was found unhealthy."""
        self.names = [f"n{i}" for i in range(nodes)]
        self.placements = dict(zip(self.names, self.topology.place(nodes), strict=True))
        regions = list(self.topology.regions)
        self.coords = {n: Coordinate(vec=tuple(0.07 if r == p.region else 0.0 for r in regions),
                                     height=0.001 + p.access_s, error=0.1)
                       for n, p in self.placements.items()}
        self.states = {n: NodeState(Candidate(n, p.region, p.zone), Resources(4.0, 16_000, 0),
                                    coord=self.coords[n])
                       for n, p in self.placements.items()}
        self.detected_down: set[str] = set()
        self.snap_seq = 0
        self._cache: dict[tuple[int, str, int], ServicePlacement | Unplaceable] = {}
        # what happened to calls
        self.issued: dict[int, tuple[str, str, str, float]] = {}
        """call id -> (caller node, service, method, when)."""
        self.outcomes: dict[int, list[tuple[str | None, str | None]]] = {}
        """call id -> every (replica that answered, error) it ended with."""
        self.runs: Counter[int] = Counter()
        self.answered_in_region: Counter[str] = Counter()
        self.answered_by: Counter[str] = Counter()
        self.routing_violations: list[str] = []
        self.first_local = [0, 0]
        """First attempts sent in-region, of those made while a replica was truly ready
        in the caller's region (the rest went out on a stale view)."""
        self.residency_violations: list[str] = []
        self.faults: list[tuple[float, str]] = []
        self.scale_events: list[tuple[float, str]] = []
        self.settled_at = 0.0
        """(when, what) each time a service's target changed (the autoscaler stepped)."""
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        """(when, service -> (ready replicas, target))."""
        self._next_cid = 0
        for name in self.names:
            self.sim.add_node(name, self.placements[name], self._factory)
        self._gossip_now(at_once=True)
        self.sim.at(gossip_s, self._gossip)
        self.sim.at(0.25, self._sample)

    def _factory(self, ctx: NodeContext) -> DrivenProtocol:
        return ServiceNode(ctx, self)

    def node(self, name: str) -> ServiceNode:
        p = self.sim.protocol(name)
        assert isinstance(p, ServiceNode)
        return p

    def up(self) -> list[str]:
        return [n for n in self.names if self.sim.is_up(n)]

    def service_time(self, service: str, rng: random.Random) -> float:
        """How long one call of ``service`` runs (seconds, uniform in its range)."""
        return rng.uniform(*self.service_time_of.get(service, self.service_time_s))

    def placement(self, snap: Snapshot, spec: ServiceSpec,
                  count: int) -> ServicePlacement | Unplaceable:
        """The placer's answer for one snapshot (a pure function: computed once for all
        the nodes that received it)."""
        key = (snap.seq, spec.name, count)
        p = self._cache.get(key)
        if p is None:
            p = self.placer(spec, snap.view, snap.sources.get(spec.name, {}), count,
                            tuple(sorted(snap.replicas.get(spec.name, {}))))
            self._cache[key] = p
        return p

    # gossip and detection
    def snapshot(self) -> Snapshot:
        self.snap_seq += 1
        self._cache = {k: v for k, v in self._cache.items() if k[0] >= self.snap_seq - 4}
        now = self.sim.now
        replicas: dict[str, dict[str, tuple[bool, int]]] = {s.name: {} for s in self.specs}
        sources: dict[str, dict[str, int]] = {s.name: {} for s in self.specs}
        desired: dict[str, list[ScaleState]] = {s.name: [] for s in self.specs}
        view = []
        for n in self.names:
            if n in self.detected_down or not self.sim.is_up(n):
                if n not in self.detected_down:
                    view.append(self.states[n])  # crashed, not yet noticed
                continue
            view.append(self.states[n])
            node = self.node(n)
            for s, rep in node.running.items():
                if not rep.stopping:
                    replicas[s][n] = (rep.serving(now), rep.inflight)
            while node.sent and node.sent[0][0] < now - self.source_window_s:
                node.sent.popleft()
            for _, s in node.sent:
                region = node.region
                sources[s][region] = sources[s].get(region, 0) + 1
            for s in desired:
                st = node.scale_state(s)
                if st is not None:
                    desired[s].append(st)
        return Snapshot(self.snap_seq, tuple(view), replicas, sources,
                        {s: tuple(v) for s, v in desired.items()})

    def _gossip_now(self, at_once: bool = False) -> None:
        snap = self.snapshot()
        if at_once:
            self._deliver(snap)
        else:
            self.sim.at(self.sim.now + self.gossip_delay_s, partial(self._deliver, snap))

    def _gossip(self) -> None:
        self._gossip_now()
        self.sim.at(self.sim.now + self.gossip_s, self._gossip)

    def _deliver(self, snap: Snapshot) -> None:
        snap = Snapshot(snap.seq, tuple(v for v in snap.view
                                        if v.name not in self.detected_down),
                        snap.replicas, snap.sources, snap.desired)
        for n in self.up():
            self.sim.call(n, partial(_install, snap))

    # faults
    def crash(self, name: str) -> None:
        self.sim.crash(name)
        self.faults.append((self.sim.now, f"crash {name}"))
        for cid, (caller, _, _, _) in self.issued.items():
            if caller == name and cid not in self.outcomes:
                self.ended(cid, None, f"{CALLER_NODE_LOST}: node {name} went down",
                           self.sim.now)
        self.sim.at(self.sim.now + self.detect_s, partial(self._detect, name))

    def sicken(self, name: str, service: str) -> bool:
        """Make ``name``'s replica of ``service`` fail its health checks (a fault); False
        when it runs none that is ready and healthy."""
        if not self.sim.is_up(name):
            return False
        rep = self.node(name).running.get(service)
        if rep is None or not rep.serving(self.sim.now) or rep.sick:
            return False
        rep.sick = True
        self.faults.append((self.sim.now, f"sicken {service} on {name}"))
        return True

    def replica_unhealthy(self, node: str, service: str, now: float) -> None:
        self.unhealthy_marked.append((now, node, service))

    def _detect(self, name: str) -> None:
        if self.sim.is_up(name) or name in self.detected_down:
            return
        self.detected_down.add(name)
        for n in self.up():
            self.sim.call(n, partial(_down, name))

    def restart(self, name: str) -> None:
        self.sim.restart(name)
        self.detected_down.discard(name)
        self.faults.append((self.sim.now, f"restart {name}"))
        snap = self.snapshot()
        self.sim.call(name, partial(_install, snap))

    def pause(self, name: str, duration_s: float) -> None:
        self.sim.pause(name, duration_s)
        self.faults.append((self.sim.now, f"pause {name} {duration_s:.1f}"))

    def partition(self, side: Sequence[str]) -> None:
        self.sim.partition(side, [n for n in self.names if n not in side])
        self.faults.append((self.sim.now, f"partition {','.join(sorted(side))}"))

    def heal(self) -> None:
        self.sim.heal()
        self.faults.append((self.sim.now, "heal"))

    # clients
    def issue(self, region: str, door: int, service: str, method: str) -> None:
        """A client at ``region`` sends a call through a live node of its region (the
        ``door``-th, counting round; any live node when its region has none)."""
        local = [n for n in self.up() if self.placements[n].region == region]
        pool = local or self.up()
        if not pool:
            return
        via = pool[door % len(pool)]
        cid = self._next_cid
        self._next_cid += 1
        self.issued[cid] = (via, service, method, self.sim.now)
        self.sim.call(via, partial(_call, cid, service, method))

    # observers
    def ended(self, cid: int, replica: str | None, error: str | None, now: float) -> None:
        self.outcomes.setdefault(cid, []).append((replica, error))
        caller, service, _, _ = self.issued[cid]
        if replica is not None:
            self.answered_by[service] += 1
            if self.placements[replica].region == self.placements[caller].region:
                self.answered_in_region[service] += 1

    def executed(self, cid: int, node: str, now: float) -> None:
        self.runs[cid] += 1

    def replica_started(self, node: str, service: str, now: float) -> None:
        spec = self.spec_of[service]
        region = self.placements[node].region
        if spec.residency is not None and not spec.residency.allows(region):
            self.residency_violations.append(
                f"{now:.2f} {service} started on {node} in {region}: outside "
                f"{spec.residency.describe()}")
        if isinstance(spec.placement, frozenset) and region not in spec.placement:
            self.residency_violations.append(
                f"{now:.2f} {service} started on {node} in {region}: outside its regions")

    def replica_ready(self, node: str, service: str, now: float) -> None:
        return None

    def check_route(self, caller: str, region: str, call: _Call, views: list[ReplicaView],
                    target: str) -> None:
        if not call.tried:
            # First attempts, against the truth: a replica of the service ready on a live
            # node of the caller's region, and where the call went.
            now = self.sim.now
            local = any(self.placements[n].region == region
                        and (r := self.node(n).running.get(call.service)) is not None
                        and r.serving(now) for n in self.up())
            if local:
                self.first_local[0] += self.placements[target].region == region
                self.first_local[1] += 1
        if any(v.node == target and not v.healthy for v in views):
            self.unhealthy_routes.append(
                f"{self.sim.now:.2f} call {call.cid} from {caller} sent to {target}, "
                "which its view lists as unhealthy")
        near = [v.node for v in views if v.healthy and v.region == region
                and v.node not in call.tried]
        if near and self.placements[target].region != region:
            self.routing_violations.append(
                f"{self.sim.now:.2f} call {call.cid} from {caller} ({region}) sent to "
                f"{target} ({self.placements[target].region}) while {near[0]} was healthy "
                "in its region")

    # replica counts
    def targets(self) -> dict[str, tuple[int, int]]:
        """service -> (ready, healthy replicas on live nodes, target)."""
        now = self.sim.now
        up = self.up()
        out = {}
        for spec in self.specs:
            ready = sum(1 for n in up if (r := self.node(n).running.get(spec.name)) is not None
                        and r.serving(now))
            allowed = [n for n in up if (spec.residency is None
                                         or spec.residency.allows(self.placements[n].region))
                       and (not isinstance(spec.placement, frozenset)
                            or self.placements[n].region in spec.placement)]
            if spec.placement == CENTRAL:
                per = Counter(self.placements[n].region for n in allowed)
                room = max(per.values(), default=0)
            else:
                room = len(allowed)
            want = spec.bounds[0]
            if spec.autoscale is not None:
                held = [d for n in up if (d := self.node(n).desired(spec.name)) is not None]
                if held:
                    want = max(Counter(held).items(), key=lambda kv: (kv[1], kv[0]))[0]
            out[spec.name] = (ready, min(want, room))
        return out

    def _sample(self) -> None:
        now = self.sim.now
        counts = self.targets()
        if self.samples:
            before = self.samples[-1][1]
            for name, (_, target) in counts.items():
                if before[name][1] != target and now > 1.0:
                    self.scale_events.append(
                        (now, f"target of {name} {before[name][1]} -> {target}"))
        self.samples.append((now, counts))
        self.sim.at(now + 0.25, self._sample)

    def settle(self, end: float, max_extra_s: float = 30.0) -> float:
        """Run to ``end``, then on while the last fault or change of target is less than
        ``recover_bound_s`` old (so the final count is held to it), at most
        ``max_extra_s`` more; then one more ``recover_bound_s``, the window in which the
        final counts must be on target (``final_counts``). Returns when it stopped."""
        self.sim.run_until(end)
        while self.sim.now < end + max_extra_s:
            last = max((t for t, _ in self.faults + self.scale_events), default=0.0)
            if last + self.recover_bound_s < self.sim.now:
                break
            self.sim.run_until(last + self.recover_bound_s + 0.25)
        self.settled_at = self.sim.now
        self.sim.run_until(self.sim.now + self.recover_bound_s)
        return self.sim.now

    def final_counts(self) -> dict[str, tuple[int, int]]:
        """Per service, (ready, target) in the last window of ``settle``: the first sample
        on target (a replica may still be moving at any one instant: make before break),
        else the last sample."""
        window = [smp for when, smp in self.samples if when > self.settled_at]
        out = {}
        for spec in self.specs:
            seen = [smp[spec.name] for smp in window] or [self.targets()[spec.name]]
            out[spec.name] = next((c for c in seen if c[0] == c[1]), seen[-1])
        return out

    def recovery_problems(self, end: float) -> tuple[list[str], int]:
        """Faults and changes of target (the autoscaler's) after which some service's ready
        replicas did not reach target within ``recover_bound_s`` (only those with no other
        fault or change within the bound are held to it), and how many were checked."""
        events = sorted(self.faults + self.scale_events, key=lambda e: e[0])
        times = [t for t, _ in events]
        problems = []
        checked = 0
        for i, (t, what) in enumerate(events):
            nxt = times[i + 1] if i + 1 < len(times) else end
            if nxt <= t + self.recover_bound_s:
                continue
            checked += 1
            window = [s for when, s in self.samples if t <= when <= t + self.recover_bound_s]
            for spec in self.specs:
                if not any(s[spec.name][0] == s[spec.name][1] for s in window):
                    last = window[-1][spec.name] if window else None
                    problems.append(f"{spec.name} not back to target within "
                                    f"{self.recover_bound_s}s of '{what}' at {t:.1f} "
                                    f"(ready, target at the end of it: {last})")
        return problems, checked


# --------------------------------------------------------------------------- runs


@dataclass
class ServiceReport:
    seed: int
    issued: int
    answered: int
    failed: int
    errors: dict[str, int]
    """Failed calls by stated error code."""
    lost: list[str]
    """Calls issued and never ended (must be none)."""
    twice: list[str]
    """Calls that ended twice (must be none)."""
    ran_twice: list[str]
    """Non-idempotent calls that ran more than once (must be none)."""
    residency_violations: list[str]
    routing_violations: list[str]
    unhealthy_routes: list[str]
    """Calls sent to a replica the caller's node's view listed as unhealthy (none)."""
    unhealthy_marked: int
    """Replicas found unhealthy by their health checks (each then replaced)."""
    recovery_problems: list[str]
    recoveries_checked: int
    final_counts: dict[str, tuple[int, int]]
    """Per service, (ready replicas, target) at the end (``ServiceMesh.final_counts``)."""
    peak_targets: dict[str, int]
    """Per service, the largest target during the run (above min: the autoscaler acted)."""
    first_local: tuple[int, int]
    """(sent in-region, made) of the first attempts made while a replica was truly ready
    on a live node of the caller's region."""
    in_region: dict[str, float]
    """Per service, the share of answered calls answered in the caller's region."""
    trace_hash: str
    faults: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        out = []
        for name in ("lost", "twice", "ran_twice", "residency_violations",
                     "routing_violations", "unhealthy_routes", "recovery_problems"):
            v = getattr(self, name)
            if v:
                out.append(f"{name}: {v[0]}")
        bad = {s: c for s, c in self.final_counts.items() if c[0] != c[1]}
        if bad:
            out.append(f"final replica counts off target: {bad}")
        unknown = set(self.errors) - {"no-replica", "replica-lost", "retries-exhausted",
                                      CALLER_NODE_LOST}
        if unknown:
            out.append(f"unstated errors: {sorted(unknown)}")
        return out


def report(mesh: ServiceMesh, seed: int, end: float) -> ServiceReport:
    errors: Counter[str] = Counter()
    answered = failed = 0
    lost, twice, ran_twice = [], [], []
    for cid, (caller, service, method, when) in mesh.issued.items():
        outs = mesh.outcomes.get(cid, [])
        if not outs:
            lost.append(f"call {cid} ({service}.{method} via {caller} at {when:.2f})")
            continue
        if len(outs) > 1:
            twice.append(f"call {cid}: {outs}")
        _, error = outs[0]
        if error is None:
            answered += 1
        else:
            failed += 1
            errors[error.partition(":")[0]] += 1
        if not mesh.spec_of[service].is_idempotent(method) and mesh.runs[cid] > 1:
            ran_twice.append(f"call {cid} ({service}.{method}) ran {mesh.runs[cid]} times")
    recovery, checked = mesh.recovery_problems(end)
    return ServiceReport(
        seed=seed, issued=len(mesh.issued), answered=answered, failed=failed,
        errors=dict(errors), lost=lost, twice=twice, ran_twice=ran_twice,
        residency_violations=list(mesh.residency_violations),
        routing_violations=list(mesh.routing_violations),
        unhealthy_routes=list(mesh.unhealthy_routes),
        unhealthy_marked=len(mesh.unhealthy_marked),
        recovery_problems=recovery, recoveries_checked=checked,
        final_counts=mesh.final_counts(),
        peak_targets={spec.name: max((smp[spec.name][1] for _, smp in mesh.samples),
                                     default=0) for spec in mesh.specs},
        first_local=(mesh.first_local[0], mesh.first_local[1]),
        in_region={s: round(mesh.answered_in_region[s] / n, 4)
                   for s, n in sorted(mesh.answered_by.items())},
        trace_hash=mesh.sim.trace_hash(),
        faults=[f"{t:.1f} {w}" for t, w in mesh.faults])


def _doors(mesh: ServiceMesh, rng: random.Random, start: float, until: float,
           rate_per_s: float, regions: Sequence[str], services: Sequence[str]) -> None:
    """Clients at ``regions`` calling ``services`` at ``rate_per_s`` each (Poisson)."""
    for region in regions:
        for service in services:
            t = start + rng.expovariate(rate_per_s)
            door = rng.randrange(1 << 16)
            while t < until:
                method = rng.choice(METHODS.get(service, ("call",)))
                mesh.sim.at(t, partial(mesh.issue, region, door, service, method))
                door += 1
                t += rng.expovariate(rate_per_s)


def chaos_run(
    seed: int,
    *,
    nodes: int = 12,
    fault_until: float = 40.0,
    settle_s: float = 8.0,
    rate_per_s: float = 4.0,
    burst_rate_per_s: float = 80.0,
    burst_s: float = 8.0,
    placer: Placer = core_placer,
    router: Router = core_router,
    fail_over: FailOver = failover,
) -> ServiceReport:
    """Callers in every region calling three services, and a burst of calls to the
    autoscaled one from one site, while nodes crash (and restart later), pause and get
    partitioned; then faults stop, partitions heal, crashed nodes restart, and the mesh
    settles."""
    rng = random.Random(f"services-chaos/{seed}")
    mesh = ServiceMesh(nodes, seed=seed, placer=placer, router=router, fail_over=fail_over,
                       service_time_of={"badge": (0.05, 0.1)})
    sim = mesh.sim
    regions = list(mesh.topology.regions)
    _doors(mesh, rng, 1.0, fault_until + settle_s - 3.0, rate_per_s, regions,
           [s.name for s in mesh.specs])
    # A burst of badge checks at one site, long enough for the autoscaler to act and
    # early enough for it to scale back down before the end.
    b0 = rng.uniform(5.0, 10.0)
    _doors(mesh, rng, b0, b0 + burst_s, burst_rate_per_s, [rng.choice(regions)], ["badge"])
    down: dict[str, float] = {}

    def inject() -> None:
        now = sim.now
        for n, until in sorted(down.items()):
            if until <= now:
                del down[n]
                mesh.restart(n)
                return
        up = [n for n in mesh.up() if n not in down]
        victim = up[rng.randrange(len(up))]
        roll = rng.random()
        if roll < 0.45 and len(down) < 2:
            down[victim] = now + rng.uniform(4.0, 12.0)
            mesh.crash(victim)
        elif roll < 0.6:
            mesh.pause(victim, rng.uniform(0.5, 3.0))
        elif roll < 0.75:
            services = [sp.name for sp in mesh.specs]
            rng.shuffle(services)
            for service in services:
                if mesh.sicken(victim, service):
                    break
        else:
            cut = list(up)
            rng.shuffle(cut)
            mesh.partition(cut[: rng.randint(1, len(cut) // 3)])
            sim.at(min(now + rng.uniform(1.0, 4.0), fault_until), mesh.heal)

    t = 3.0
    while t < fault_until:
        sim.at(t, inject)
        t += rng.uniform(2.5, 8.0)
    sim.run_until(fault_until)
    mesh.heal()
    for n in sorted(down):
        mesh.restart(n)
    end = mesh.settle(fault_until + settle_s)
    return report(mesh, seed, end)


def burst_run(seed: int, *, base_rate_per_s: float = 1.0, burst_rate_per_s: float = 160.0,
              burst: tuple[float, float] = (5.0, 20.0), end_s: float = 80.0) -> tuple[
                  ServiceReport, list[tuple[float, int, int]]]:
    """One autoscaled service, callers in two regions, a burst of calls that each take
    60..100 ms: the report, and (when, ready replicas, desired count) every 0.25 s."""
    spec = ServiceSpec("burst", autoscale=Autoscale(2, 5, 2.0), idempotent=frozenset({"run"}))
    mesh = ServiceMesh(9, seed=seed, services=[spec], service_time_s=(0.06, 0.1))
    rng = random.Random(f"services-burst/{seed}")
    t = 1.0
    door = 0
    while t < end_s - 3.0:
        rate = burst_rate_per_s if burst[0] <= t < burst[1] else base_rate_per_s
        region = ("eu-west", "us-east")[door % 2]
        mesh.sim.at(t, partial(mesh.issue, region, door, "burst", "run"))
        door += 1
        t += rng.expovariate(rate)
    end = mesh.settle(end_s)
    counts = [(when, *s["burst"]) for when, s in mesh.samples]
    return report(mesh, seed, end), counts
