"""Capacity on demand in the simulator: a diurnal day on a large mesh, spread or consolidated.

Every node holds a ``core.capacity.CapacityController`` and is driven as the runtime
drives it: each gossip round snapshots every node's entry (state, slots, load, pin,
sole-copy count) and hands the snapshot to every node ``gossip_delay_s`` later (a
``lag_fraction`` of the nodes, drawn afresh each round, act on the round before: views
differ); each node applies the plan of the view it holds; a task placed on a sleeping
node wakes it (``demand``) and its workers are up ``wake_s`` later (``ready``). Nodes
holding the same view share one ``core.capacity.plan`` (it is a pure function of the
view and the time: computing it once per view is the same as computing it on every
node, and a unit test checks that).

Work: tasks of one slot arrive as a Poisson process whose rate follows the load curve
(``DiurnalLoad``: the day compressed into ``day_s`` virtual seconds, from the trough at
midnight to the peak at noon), each in a region (uniform) and with an exponential
duration. Placement is the scheduler's rule on a sample: ``pool_size`` active nodes of
the region drawn at random from the submitter's (stale) view, plus the region's next
node to wake, each scored with ``core.scheduling.score`` (queue estimate, ``idle_penalty_s``,
``wake_penalty_s`` for a sleeping one), and reservations on the ``probes_per_task``
cheapest; the first of them with a free slot runs the task (late binding). This is
Sparrow's sampling rather than the scheduler's full ranking, which costs O(nodes) per
task; the message-level scheduler is what ``sim/compute.py`` tests.

Data: ``objects_per_node`` x nodes objects with ``replicas`` copies in distinct zones of
one region. The data plane's sole-copy count, as the simulator computes it from a view:
the objects of which a node is the only holder in the view (a standby copy is live: it
stays readable), so a crash of one holder pins the other awake, or wakes it.

Faults: nodes crash (``crashes_per_node_per_day``) and come back after a while with
their data; a crash is noticed ``detect_s`` later, and then the tasks that ran there
are placed again. The crash injector never takes the last live holder of an object
(the replication layer's guarantee is tested in ``sim/dataplane.py``).

Oracles, on the truth rather than on any view: (1) in each region and zone, the up nodes
that are awake and serving (``active`` or ``draining``) never fall below the minimums,
except within ``grace_s`` after a crash there; (2) every task ends, and none waits
longer than ``starve_bound_s`` to start; (3) every object keeps a live copy, no node goes
to standby while it holds an object no other up node holds (unless that holder crashed
less than ``grace_s`` ago, before any view could know), and no object's only live copy
sleeps for longer than ``grace_s`` (standby data stays readable in this model: these
are the stronger checks); (4) no node makes more than ``flap_bound_per_h`` transitions in any
modelled hour (``day_s / 24``).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace

from meshscale.core.capacity import (
    CapacityConfig,
    CapacityController,
    CapacityPlan,
    CapacityTransition,
    EnergyMeter,
    PeerCapacity,
    PowerModel,
    PowerState,
    check_minimums,
    plan,
    rank_key,
)
from meshscale.core.placement import Candidate
from meshscale.core.scheduling import Load, NodeState, Resources, SchedulingConfig, TaskSpec, score
from meshscale.sim.topology import Topology

__all__ = ["DiurnalLoad", "EnergyReport", "EnergyScenario", "EnergySim", "run_day"]

_A, _D, _S, _W = (PowerState.ACTIVE, PowerState.DRAINING, PowerState.STANDBY,
                  PowerState.WAKING)


@dataclass(frozen=True)
class DiurnalLoad:
    """Offered load as a share of the mesh's slots over a compressed day: ``trough`` at
    midnight, ``peak`` at noon, ``trough + (peak - trough) * ((1 - cos(2 pi t / day)) / 2)
    ** exponent`` between (exponent 1: a sine; 2: a narrower day peak, a longer night)."""

    day_s: float = 1440.0
    peak: float = 0.8
    trough: float = 0.1
    exponent: float = 2.0

    def at(self, t: float) -> float:
        s = (1.0 - math.cos(2.0 * math.pi * t / self.day_s)) / 2.0
        return self.trough + (self.peak - self.trough) * float(s ** self.exponent)

    def mean(self, steps: int = 2880) -> float:
        return sum(self.at(self.day_s * (i + 0.5) / steps) for i in range(steps)) / steps


def _default_capacity() -> CapacityConfig:
    return CapacityConfig(headroom_fraction=0.3, hysteresis_fraction=0.05,
                          min_dwell_s=60.0, drain_confirm_s=10.0, max_drain_s=150.0,
                          drain_step_fraction=0.05)


@dataclass(frozen=True)
class EnergyScenario:
    nodes: int = 1000
    slots: int = 4
    load: DiurnalLoad = field(default_factory=DiurnalLoad)
    task_mean_s: float = 20.0
    consolidate: bool = True
    capacity: CapacityConfig = field(default_factory=_default_capacity)
    min_active_region_fraction: float = 0.15
    """Sets ``min_active_per_region`` to this share of a region (binding at the trough)."""
    min_active_zone_fraction: float = 0.05
    power: PowerModel = field(default_factory=PowerModel)
    gossip_s: float = 3.0
    gossip_delay_s: float = 0.5
    lag_fraction: float = 0.1
    detect_s: float = 3.0
    wake_s: float = 2.0
    pool_size: int = 4
    probes_per_task: int = 2
    reprobe_s: float = 5.0
    crashes_per_node_per_day: float = 0.1
    down_s: tuple[float, float] = (20.0, 200.0)
    objects_per_node: float = 2.0
    replicas: int = 2
    """Two: one crash leaves only copies, so the sole-copy rule is exercised."""
    pinned_fraction: float = 0.01
    starve_bound_s: float = 30.0
    settle_s: float = 600.0
    warmup_s: float = 360.0
    """The mesh runs the evening before (a quarter day, from 18:00) before the measured
    day starts at midnight: a steady-state day, not the first one after every node was
    started at once. Nothing is measured in it (energy, latency, awake share,
    transitions per hour); the oracles check it too."""

    @property
    def hour_s(self) -> float:
        return self.load.day_s / 24.0

    @property
    def grace_s(self) -> float:
        """Crash to a replacement awake: detection, two gossip rounds, a wake, slack."""
        return self.detect_s + 2 * self.gossip_s + self.gossip_delay_s + self.wake_s + 2.0

    @property
    def flap_bound_per_h(self) -> int:
        """The stated bound, from the default rule: at most four transitions (active,
        draining, standby, waking, active) per ``min_dwell_s`` (60 s, one modelled hour)
        in active, plus one cycle in flight: 8 per modelled hour. Fixed, so a rule
        without dwell is held to it too."""
        return 8


class _Node:
    __slots__ = ("busy", "ctl", "extra", "holds", "inc", "meter", "name", "pending",
                 "queue", "rank", "region", "running", "up", "zone")

    def __init__(self, name: str, region: str, zone: str, ctl: CapacityController,
                 meter: EnergyMeter) -> None:
        self.name = name
        self.region = region
        self.zone = zone
        self.ctl = ctl
        self.meter = meter
        self.up = True
        self.inc = 0
        self.busy = 0
        self.pending = 0
        """Unbound reservations in ``queue`` (bound ones are skipped lazily)."""
        self.queue: deque[int] = deque()
        self.running: set[int] = set()
        self.holds: list[int] = []
        self.extra = 0
        """Reservations sent to it since the last view (the owner's own count)."""
        self.rank: tuple[float, bytes] = (0.0, b"")


_NOT_STARTED = -math.inf


class _Task:
    __slots__ = ("attempt", "duration", "node", "probes", "region", "started", "submitted")

    def __init__(self, region: str, submitted: float, duration: float) -> None:
        self.region = region
        self.submitted = submitted
        self.duration = duration
        self.node: str | None = None
        self.started = _NOT_STARTED
        self.probes: list[str] = []
        self.attempt = 0


@dataclass
class EnergyReport:
    seed: int
    consolidate: bool
    nodes: int
    energy_kwh: float
    tasks: int
    finished: int
    p99_ms: float
    p50_ms: float
    wait_p99_ms: float
    transitions: int
    transitions_per_node_per_h: float
    """Mean over nodes, per modelled hour."""
    max_transitions_in_an_hour: int
    flap_bound_per_h: int
    min_awake_fraction: float
    """The fewest awake nodes seen at a check, as a share of the mesh."""
    mean_awake_fraction: float
    crashes: int
    wakes_on_demand: int
    problems: list[str]
    trace_hash: str


_ARRIVE, _FINISH, _GOSSIP, _DELIVER, _READY, _CRASH, _RESTART, _DETECT, _PROBE, _METER = \
    range(10)


class EnergySim:
    """One run of a scenario (see the module docstring)."""

    def __init__(self, scenario: EnergyScenario, seed: int) -> None:
        sc = scenario
        self.sc = sc
        self.seed = seed
        self.rng = random.Random(f"energy/{seed}")
        self.topology = Topology.three_regions()
        places = self.topology.place(sc.nodes)
        regions = list(self.topology.regions)
        per_region = {r: sum(1 for p in places if p.region == r) for r in regions}
        cap = sc.capacity
        smallest = min(per_region.values())
        # The oracle keeps its own copy of the minimums (it shares no code with the rule).
        self.min_region_n = max(cap.min_active_per_region,
                                math.ceil(sc.min_active_region_fraction * smallest))
        self.min_zone_n = max(cap.min_active_per_zone,
                              math.ceil(sc.min_active_zone_fraction * smallest))
        if sc.consolidate:
            cap = replace(cap, min_active_per_region=self.min_region_n,
                          min_active_per_zone=self.min_zone_n)
        else:
            cap = replace(cap, mode="off")
        zones: dict[str, dict[str, int]] = {}
        for p in places:
            zones.setdefault(p.region, {}).setdefault(p.zone, 0)
            zones[p.region][p.zone] += 1
        check_minimums(cap, zones)
        self.capacity = cap
        # A task wakes a sleeping node only when the active ones look a whole task
        # length busy (the scheduler's default of 2 s is for second-long tasks).
        self.sched_cfg = SchedulingConfig(mean_task_s=sc.task_mean_s,
                                          wake_penalty_s=max(2.0, sc.task_mean_s))
        self.spec = TaskSpec("t")
        self.nodes: dict[str, _Node] = {}
        self.pinned: set[str] = set()
        self.by_region: dict[str, list[_Node]] = {r: [] for r in regions}
        self.by_zone: dict[tuple[str, str], list[_Node]] = {}
        for i, p in enumerate(places):
            name = f"n{i}"
            pinned = self.rng.random() < sc.pinned_fraction
            if pinned:
                self.pinned.add(name)
            ctl = CapacityController(name, p.region, p.zone, slots=float(sc.slots),
                                     config=cap, now=-sc.warmup_s - cap.min_dwell_s, pinned=pinned,
                                     idle_watts=sc.power.idle_watts)
            node = _Node(name, p.region, p.zone, ctl, EnergyMeter(sc.power, 0.0))
            node.rank = rank_key(ctl.entry())
            self.nodes[name] = node
            self.by_region[p.region].append(node)
            self.by_zone.setdefault((p.region, p.zone), []).append(node)
        self.candidates = {n.name: Candidate(n.name, n.region, n.zone) for n in
                           self.nodes.values()}
        self.capacity_res = Resources(float(sc.slots), 16_000, 0)
        # Objects: replicas in distinct zones of one region.
        self.holders: list[list[str]] = []
        for k in range(round(sc.objects_per_node * sc.nodes)):
            region = regions[self.rng.randrange(len(regions))]
            zs = list(self.topology.regions[region])
            self.rng.shuffle(zs)
            names = []
            for z in zs[: sc.replicas]:
                pool = self.by_zone[(region, z)]
                node = pool[self.rng.randrange(len(pool))]
                names.append(node.name)
                node.holds.append(k)
            self.holders.append(names)
        # Each object's holders, the one ranked last to drain (the keeper) first.
        self.holder_nodes = [sorted((self.nodes[h] for h in hs), key=lambda n: n.rank,
                                    reverse=True) for hs in self.holders]
        self.tasks: list[_Task] = []
        self.now = -sc.warmup_s
        self._heap: list[tuple[float, int, int, int, str]] = []
        self._seq = 0
        self.detected: set[str] = set()
        self.view: dict[str, tuple[PeerCapacity, NodeState | None]] = {}
        self._view_states: dict[str, NodeState] = {}
        self._next_wake: dict[str, str | None] = {}
        self._active_in_view: dict[str, list[str]] = {r: [] for r in regions}
        self.sole: dict[str, int] = {}
        self._prev: tuple[CapacityPlan, list[PeerCapacity], dict[str, int]] | None = None
        self.transitions: dict[str, list[float]] = {}
        self.problems: list[str] = []
        self.last_crash: dict[str, float] = {}
        self.crashes = 0
        self.wakes_on_demand = 0
        self._no_awake_since: dict[int, float] = {}
        self.awake_fractions: list[float] = []
        self._hash = 0
        self._unfinished = 0
        self._pending_snap: list[PeerCapacity] = []
        self._pending_sole: dict[str, int] = {}
        self._lost: dict[str, list[int]] = {}
        self.down_at: dict[str, float] = {}
        self._lambda_max = sc.load.peak * sc.nodes * sc.slots / sc.task_mean_s
        self._crash_rate = sc.crashes_per_node_per_day * sc.nodes / sc.load.day_s

    # ------------------------------------------------------------------ events

    def _at(self, t: float, kind: int, a: int = 0, b: str = "") -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a, b))

    def run(self) -> EnergyReport:
        sc = self.sc
        day = sc.load.day_s
        self._at(-sc.warmup_s + self.rng.expovariate(self._lambda_max), _ARRIVE)
        self._at(-sc.warmup_s, _GOSSIP)
        self._at(0.0, _METER)
        if self._crash_rate > 0:
            self._at(self.rng.expovariate(self._crash_rate), _CRASH)
        end = day + sc.settle_s
        heap = self._heap
        while heap:
            t, _, kind, a, b = heapq.heappop(heap)
            if t > end:
                break
            if t > day and self._all_done():
                break
            self.now = t
            self._hash = (self._hash * 1_000_003 + kind * 7919 + a + len(b)) % (1 << 61)
            if kind == _ARRIVE:
                self._arrive()
            elif kind == _FINISH:
                self._finish(b, a)
            elif kind == _GOSSIP:
                self._gossip()
            elif kind == _DELIVER:
                self._deliver()
            elif kind == _READY:
                self._ready(b, a)
            elif kind == _CRASH:
                self._crash()
            elif kind == _RESTART:
                self._restart(b)
            elif kind == _DETECT:
                self._detect(b, a)
            elif kind == _PROBE:
                self._probe_timeout(a)
            elif kind == _METER:
                for node in self.nodes.values():
                    node.meter.advance(0.0, node.ctl.state if node.up else None,
                                       node.busy / sc.slots)
        return self._report()

    def _all_done(self) -> bool:
        return self._unfinished == 0

    # ------------------------------------------------------------------ work

    def _arrive(self) -> None:
        sc = self.sc
        now = self.now
        if now >= sc.load.day_s:
            return
        self._at(now + self.rng.expovariate(self._lambda_max), _ARRIVE)
        if self.rng.random() * sc.load.peak > sc.load.at(now):
            return  # thinning: the rate follows the load curve
        regions = list(self.by_region)
        region = regions[self.rng.randrange(len(regions))]
        task = _Task(region, now, self.rng.expovariate(1.0 / sc.task_mean_s))
        self.tasks.append(task)
        self._unfinished += 1
        self._place(len(self.tasks) - 1)

    def _state_in_view(self, name: str) -> NodeState | None:
        entry = self.view.get(name)
        if entry is None:
            return None
        p, st = entry
        if st is None:
            slots = p.slots
            st = NodeState(self.candidates[name], self.capacity_res,
                           Load(int(p.busy), p.queued, max(0.0, slots - p.busy)),
                           standby=p.state is not _A)
            self.view[name] = (p, st)
        return st

    def _place(self, tid: int) -> None:
        sc = self.sc
        task = self.tasks[tid]
        task.attempt += 1
        active = self._active_in_view[task.region]
        rnd = self.rng.random
        n_active = len(active)
        picks = {active[int(rnd() * n_active)] for _ in range(min(sc.pool_size, n_active))}
        nxt = self._next_wake.get(task.region)
        if nxt is not None:
            picks.add(nxt)
        scored = []
        nodes = self.nodes
        for name in sorted(picks):
            st = self._state_in_view(name)
            if st is not None:
                extra = nodes[name].extra
                scored.append((score(self.spec, st, None, self.sched_cfg,
                                     extra_tasks=extra).total, name))
        scored.sort()
        probes = [n for _, n in scored[: sc.probes_per_task]]
        self._at(self.now + sc.reprobe_s, _PROBE, tid)
        for name in probes:
            if name in task.probes:
                continue
            node = nodes[name]
            node.extra += 1
            if not node.up:
                continue  # the reservation is lost with the node
            if task.node is not None:
                break  # bound by a cheaper probe already: no reservation, no wake
            task.probes.append(name)
            node.queue.append(tid)
            node.pending += 1
            if node.ctl.state in (_S, _D):
                # A sleeping node asks for the task before it wakes (it is still a
                # member): it wakes only for a task that is still unbound.
                self.wakes_on_demand += node.ctl.state is _S
                node.ctl.demand(self.now)
                self._events(node)
            self._pump(node)

    def _probe_timeout(self, tid: int) -> None:
        task = self.tasks[tid]
        if task.node is not None:
            return
        self._place(tid)  # waited reprobe_s unbound: more reservations (late binding)

    def _pump(self, node: _Node) -> None:
        if not node.up or node.ctl.state is not _A:
            return
        while node.queue and node.busy < self.sc.slots:
            tid = node.queue.popleft()
            task = self.tasks[tid]
            if task.node is not None or node.name not in task.probes:
                continue
            self._bind(task, tid, node)

    def _bind(self, task: _Task, tid: int, node: _Node) -> None:
        for name in task.probes:
            self.nodes[name].pending -= 1
        task.probes = []
        task.node = node.name
        if task.started == _NOT_STARTED:
            task.started = self.now
        node.busy += 1
        node.running.add(tid)
        self._meter(node)
        self._at(self.now + task.duration, _FINISH, tid, f"{node.name}#{node.inc}")

    def _finish(self, where: str, tid: int) -> None:
        name, inc = where.split("#")
        node = self.nodes[name]
        if not node.up or node.inc != int(inc) or tid not in node.running:
            return
        node.running.discard(tid)
        node.busy -= 1
        task = self.tasks[tid]
        task.duration = -(self.now - task.submitted)  # done: latency, negated
        self._unfinished -= 1
        self._meter(node)
        self._pump(node)

    def _meter(self, node: _Node) -> None:
        if 0.0 <= self.now <= self.sc.load.day_s:
            node.meter.advance(self.now, node.ctl.state if node.up else None,
                               node.busy / self.sc.slots)

    # ------------------------------------------------------------------ capacity

    def _entry(self, node: _Node) -> PeerCapacity:
        c = node.ctl
        return PeerCapacity(node.name, node.region, node.zone, c.state, c.since_s, c.slots,
                            float(node.busy), node.pending, c.pinned,
                            self.sole.get(node.name, 0), c.idle_watts)

    def _gossip(self) -> None:
        sc = self.sc
        self._at(self.now + sc.gossip_s, _GOSSIP)
        self._check()
        self._pending_snap = [self._entry(n) for n in self.nodes.values()
                              if n.name not in self.detected]
        self._pending_sole = self._sole_counts() if sc.consolidate else {}
        if sc.consolidate:
            self._check_objects()
        self._at(self.now + sc.gossip_delay_s, _DELIVER)

    def _sole_counts(self) -> dict[str, int]:
        """The data plane's count from the view being gossiped: objects of which a node
        is the only holder in the view (a standby copy is live: it stays readable)."""
        out: dict[str, int] = {}
        detected = self.detected
        for hs in self.holder_nodes:
            live = [n for n in hs if n.name not in detected]
            if len(live) == 1:
                out[live[0].name] = out.get(live[0].name, 0) + 1
        return out

    def _check_objects(self) -> None:
        """The object oracle, on the truth: a live copy always; an only copy not asleep
        for longer than ``grace_s``."""
        for k, hs in enumerate(self.holder_nodes):
            up = [n for n in hs if n.up]
            if not up:
                self.problems.append(f"{self.now:.1f} object {k}: no live copy")
            elif len(up) == 1 and up[0].ctl.state is _S:
                since = self._no_awake_since.setdefault(k, self.now)
                if self.now - since > self.sc.grace_s:
                    self.problems.append(f"{self.now:.1f} object {k}: its only live copy "
                                         f"sleeps on {up[0].name} for {self.now - since:.0f} s")
                    self._no_awake_since[k] = self.now
            else:
                self._no_awake_since.pop(k, None)

    def _deliver(self) -> None:
        snap = self._pending_snap
        now = self.now
        self.view = {p.name: (p, None) for p in snap}
        for node in self.nodes.values():
            node.extra = 0
        for r, nodes in self.by_region.items():
            self._active_in_view[r] = [n.name for n in nodes
                                       if n.name in self.view and self.view[n.name][0].state is _A]
            reserve = [n for n in nodes if n.name in self.view
                       and self.view[n.name][0].state in (_D, _S)]
            self._next_wake[r] = max(reserve, key=lambda n: n.rank).name if reserve else None
        if not self.sc.consolidate:
            return
        sole = self._pending_sole
        self.sole = sole
        current = (plan(snap, now, self.capacity), snap, sole)
        prev = self._prev or current
        self._prev = current
        rnd = self.rng.random
        lag = self.sc.lag_fraction
        for node in self.nodes.values():
            if not node.up:
                continue
            cp, view, counts = prev if rnd() < lag else current
            node.ctl.local(float(node.busy), node.pending, counts.get(node.name, 0), now)
            node.ctl.apply(cp, now, view)
            if node.ctl._events:
                self._events(node)

    def _events(self, node: _Node) -> None:
        for ev in node.ctl.drain():
            self._transition(node, ev)

    def _transition(self, node: _Node, ev: CapacityTransition) -> None:
        self.transitions.setdefault(node.name, []).append(ev.at_s)
        self._meter(node)
        if ev.new is _D:
            # Queued reservations go back to their owners (placed again elsewhere).
            for tid in list(node.queue):
                task = self.tasks[tid]
                if task.node is None and node.name in task.probes:
                    task.probes.remove(node.name)
                    node.pending -= 1
                    if not task.probes:
                        self._place(tid)
            node.queue.clear()
        elif ev.new is _S:
            if node.name in self.pinned:
                self.problems.append(f"{self.now:.1f} {node.name} is pinned no-standby and "
                                     "went to standby")
            for k in node.holds:
                # A holder that crashed too recently for any view to know is no fault
                # of this node's (it wakes once the crash is known: checked below).
                if not any(h != node.name and (self.nodes[h].up or self.now - self.down_at[h]
                                               < self.sc.grace_s)
                           for h in self.holders[k]):
                    self.problems.append(
                        f"{self.now:.1f} {node.name} went to standby holding the only live "
                        f"copy of object {k}")
                    break
        elif ev.new is _W:
            self._at(self.now + self.sc.wake_s, _READY, node.inc, node.name)
        elif ev.new is _A:
            self._pump(node)

    def _ready(self, name: str, inc: int) -> None:
        node = self.nodes[name]
        if node.up and node.inc == inc:
            node.ctl.ready(self.now)
            self._events(node)

    # ------------------------------------------------------------------ faults

    def _crash(self) -> None:
        sc = self.sc
        self._at(self.now + self.rng.expovariate(self._crash_rate), _CRASH)
        if self.now >= sc.load.day_s:
            return
        up = [n for n in self.nodes.values() if n.up]
        victim = up[self.rng.randrange(len(up))]
        if any(sum(1 for h in self.holders[k] if self.nodes[h].up) <= 1
               for k in victim.holds):
            return  # the last live holder of an object: not this fault model's business
        victim.up = False
        self.down_at[victim.name] = self.now
        victim.inc += 1
        self.crashes += 1
        self.last_crash[victim.region] = self.now
        self.last_crash[f"{victim.region}/{victim.zone}"] = self.now
        if 0.0 <= self.now <= sc.load.day_s:
            victim.meter.advance(self.now, None, 0.0)
        lost = list(victim.running)
        for tid in victim.queue:
            task = self.tasks[tid]
            if task.node is None and victim.name in task.probes:
                task.probes.remove(victim.name)
        victim.queue.clear()
        victim.pending = 0
        victim.running.clear()
        victim.busy = 0
        self._lost[victim.name] = lost
        self._at(self.now + sc.detect_s, _DETECT, victim.inc, victim.name)
        self._at(self.now + self.rng.uniform(*sc.down_s), _RESTART, 0, victim.name)

    def _detect(self, name: str, inc: int) -> None:
        node = self.nodes[name]
        if node.inc != inc:
            return
        if not node.up:
            self.detected.add(name)
        for tid in self._lost.pop(name, []):
            task = self.tasks[tid]
            if task.node == name:
                task.node = None
                self._place(tid)

    def _restart(self, name: str) -> None:
        node = self.nodes[name]
        node.up = True
        node.ctl.restarted(self.now)
        self.detected.discard(name)
        self._meter(node)

    # ------------------------------------------------------------------ oracles

    def _check(self) -> None:
        if not self.sc.consolidate or self.now > self.sc.load.day_s:
            return
        now = self.now
        grace = self.sc.grace_s
        awake_total = 0
        for r, nodes in self.by_region.items():
            awake = [n for n in nodes if n.up and n.ctl.state in (_A, _D)]
            awake_total += len(awake)
            if len(awake) < self.min_region_n and now - self.last_crash.get(r, -1e9) > grace:
                self.problems.append(f"{now:.1f} region {r}: {len(awake)} awake, minimum "
                                     f"{self.min_region_n}")
            for z in self.topology.regions[r]:
                n_z = sum(1 for n in awake if n.zone == z)
                if n_z < self.min_zone_n \
                        and now - self.last_crash.get(f"{r}/{z}", -1e9) > grace:
                    self.problems.append(f"{now:.1f} zone {z}: {n_z} awake, minimum "
                                         f"{self.min_zone_n}")
        if now >= 0.0:
            self.awake_fractions.append(awake_total / len(self.nodes))

    def _report(self) -> EnergyReport:
        sc = self.sc
        day = sc.load.day_s
        for node in self.nodes.values():
            node.meter.advance(day, None, 0.0)
        joules = sum(n.meter.joules for n in self.nodes.values())
        day_tasks = [t for t in self.tasks if t.submitted >= 0.0]
        lat = sorted(-t.duration for t in day_tasks if t.duration < 0)
        waits = sorted(t.started - t.submitted for t in day_tasks if t.started != _NOT_STARTED)
        all_waits = [t.started - t.submitted for t in self.tasks if t.started != _NOT_STARTED]
        unfinished = sum(1 for t in self.tasks if t.duration >= 0)
        if unfinished:
            self.problems.append(f"{unfinished} task(s) never finished")
        starved = [w for w in all_waits if w > sc.starve_bound_s]
        never = sum(1 for t in self.tasks if t.started == _NOT_STARTED)
        if starved or never:
            self.problems.append(f"{len(starved) + never} task(s) waited more than "
                                 f"starve_bound_s {sc.starve_bound_s:g} (longest "
                                 f"{max(all_waits, default=0):.1f} s)")
        hour = sc.hour_s
        worst = 0
        for times in self.transitions.values():
            j = 0
            for i, t in enumerate(times):
                while times[j] < t - hour:
                    j += 1
                worst = max(worst, i - j + 1)
        if worst > sc.flap_bound_per_h:
            self.problems.append(f"a node made {worst} transitions in a modelled hour "
                                 f"(bound {sc.flap_bound_per_h})")
        total_tr = sum(1 for v in self.transitions.values() for t in v if t >= 0.0)

        def pct(xs: list[float], q: float) -> float:
            return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000.0 if xs else 0.0

        return EnergyReport(
            seed=self.seed, consolidate=sc.consolidate, nodes=sc.nodes,
            energy_kwh=joules / 3.6e6, tasks=len(day_tasks), finished=len(lat),
            p99_ms=pct(lat, 0.99), p50_ms=pct(lat, 0.5), wait_p99_ms=pct(waits, 0.99),
            transitions=total_tr,
            transitions_per_node_per_h=total_tr / sc.nodes / 24.0,
            max_transitions_in_an_hour=worst, flap_bound_per_h=sc.flap_bound_per_h,
            min_awake_fraction=min(self.awake_fractions, default=1.0),
            mean_awake_fraction=(sum(self.awake_fractions) / len(self.awake_fractions)
                                 if self.awake_fractions else 1.0),
            crashes=self.crashes, wakes_on_demand=self.wakes_on_demand,
            problems=list(self.problems), trace_hash=f"{self._hash:016x}")


def run_day(seed: int, scenario: EnergyScenario | None = None) -> EnergyReport:
    """One compressed day of ``scenario`` (default: 1,000 nodes, consolidated)."""
    return EnergySim(scenario or EnergyScenario(), seed).run()
