"""The compute plane's decisions in the simulator: schedulers, slots, stale views, faults.

``ComputeNode`` is a ``DrivenProtocol`` holding one ``core.scheduling.Scheduler`` and
one ``core.tasks.TaskBook``, playing their driver as ``runtime/compute.py`` does:
scheduling messages travel as one-way streams (the engine's TCP model), a ``RunTask``
occupies the node's slots for the task's simulated duration and then frees them
(``run_ended``) and reports ``task_finished``. The records a node owns live in its memory (lost in a crash) and in a
replicated store (``ComputeMesh.kv``, the runtime's KV: a record is written at submit,
before the submit is acknowledged, and when the task ends, ``kv_delay_s`` later and only
if its writer is still up then: by default ``core.tasks.RECORD_WINDOW_S``, the longest
the runtime's ``RecordQueue`` keeps an end waiting for company).

Clients: each accepted task has a client that asks for its result every ``poll_s``,
at the node it submitted to (one poll in five: any live node) and, when that node is
down, at a live node chosen at random, following the node's redirect to the owner or the
adopter. A node asked for a task it does not hold reads the
store and acts on ``core.tasks.lookup``: answer, ask the owner (the client is sent
there), adopt (the node becomes the owner and schedules the task again) or forward to
the adopter. So a dead or restarted owner's unfinished tasks are taken over exactly as on
real nodes, and the check is what the client observes: every accepted task ends with one
outcome observed by its client, whatever happened to its owner.

``ComputeMesh`` builds the mesh and plays gossip and failure detection as an *oracle with
delays* rather than running SWIM: every ``gossip_s`` it snapshots each node's load and
hands the snapshot to every node ``gossip_delay_s`` later (so every view is stale), and a
crashed node is reported with ``node_down`` to everyone ``detect_s`` after the crash (a
paused or partitioned node is not). Sooner, ``runner_check_s`` after the crash, the
owners with tasks bound on it act on its closed connections as the runtime's do
(``Scheduler.runner_unreachable``: a check of a crashed process is refused; a paused or
cut-off node's silence is no evidence). Vivaldi coordinates are synthetic (one axis per
region, the access latency as height). Membership itself is tested elsewhere; this
harness tests the scheduling decisions on top of a view with the same failure modes
(stale loads, late detection).

Observers check, on every event: every ``TaskBound`` and every ``RunTask`` happens on a
node that the task's residency, its inputs' residency, its mode, labels and resources
allow (checked against the true topology, not the view); a data task bound while some
holder of its inputs had a free slot at submit time is bound to a holder (locality);
every accepted task's client observes exactly one outcome, and no owner incarnation
accepts two results for one task. ``chaos_run`` and ``herd_run`` are the
scenarios the tests run per seed; ``naive_herd`` is the baseline ``herd_run`` is compared
with (each submitter pushes to the least-loaded node of the same stale view).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import msgspec

from meshscale.core.outputs import DrivenProtocol, Event, Output, StreamRequest
from meshscale.core.placement import Candidate, Residency, replica_set
from meshscale.core.scheduling import (
    Central,
    DataLocal,
    InputRef,
    InRegions,
    Load,
    NearSource,
    NodeState,
    PlacementMode,
    Resources,
    RunTask,
    Scheduler,
    SchedulingConfig,
    SchedulingError,
    SchedulingOutput,
    SchedulingOverloaded,
    SendMessage,
    TaskBound,
    TaskFailed,
    TaskFinished,
    TaskSpec,
    TaskStopped,
    feasible,
)
from meshscale.core.tasks import (
    RECORD_WINDOW_S,
    TERMINAL,
    LookupAction,
    TaskBook,
    TaskRecord,
    TaskState,
    Verdict,
    lookup,
)
from meshscale.core.vivaldi import Coordinate
from meshscale.sim.engine import NodeContext, Simulator
from meshscale.sim.topology import Placement, Topology

__all__ = [
    "ComputeMesh",
    "ComputeNode",
    "ComputeReport",
    "HerdReport",
    "SchedulerHost",
    "chaos_run",
    "herd_run",
    "naive_herd",
    "stale_view",
]


# --------------------------------------------------------------------------- node


class SchedulerHost:
    """The driving of one ``core.scheduling.Scheduler`` in the simulator, as
    ``runtime/compute.py`` drives it: its messages go out through ``send`` (the caller's
    one-way stream to the peer's host, whose ``handle_message`` takes them), each
    prefixed with this process's boot (one byte of incarnation, as the runtime's
    ``sched.*`` requests carry ``LoadReport.boot``: the receiver hands it to
    ``Scheduler.peer_boot`` first), a ``RunTask`` occupies the node's slots until its
    simulated run ends (``duration``, asked when it starts), which frees them
    (``run_ended``) and is then reported to its owner (``task_finished``, with the outcome
    ``ended`` gives; both at the same simulated moment, see ``on_timer``), and every other output
    is passed to ``emit`` in order (the caller's record keeping: ``TaskBound``,
    ``TaskFinished``, ``TaskStopped``, ``TaskFailed``; ``RunTask`` too, after it is
    queued). ``kill`` ends a run early (the runtime's ``task.kill`` after a
    ``TaskStopped``). Shared by ``ComputeNode`` and the policy swarm's nodes
    (``sim.policy_chaos``), so both simulators drive the scheduler the runtime drives,
    the same way."""

    def __init__(
        self,
        sched: Scheduler,
        *,
        incarnation: int,
        send: Callable[[str, bytes], None],
        emit: Callable[[SchedulingOutput, float], None],
        duration: Callable[[RunTask, float], float],
        ended: Callable[[str, str, int, float], tuple[bool, str]] | None = None,
    ) -> None:
        self.sched = sched
        self.boot = bytes([incarnation % 256])
        self.send = send
        self.emit = emit
        self.duration = duration
        self.ended = ended
        self.runs: list[tuple[float, int, str, str, int]] = []
        """(end, seq, owner, task id, attempt) of what runs here, soonest first."""
        self._seq = 0

    @staticmethod
    def boot_of(name: str, incarnation: int) -> str:
        """The boot ``name``'s process sends in its ``incarnation`` (``peer_boot``)."""
        return f"{name}.{incarnation % 256}"

    def handle_message(self, src: str, payload: bytes, now: float) -> None:
        if not payload:
            return
        self.sched.peer_boot(src, self.boot_of(src, payload[0]), now)
        self.sched.handle_message(src, payload[1:], now)
        self.settle(now)

    def next_deadline(self) -> float:
        d = self.sched.next_deadline()
        if self.runs:
            d = min(d, self.runs[0][0])
        return d

    def on_timer(self, now: float) -> None:
        while self.runs and self.runs[0][0] <= now:
            _, _, owner, tid, attempt = heapq.heappop(self.runs)
            ok, detail = (True, "") if self.ended is None else \
                self.ended(owner, tid, attempt, now)
            # As runtime/compute.py: the slot is freed first (run_ended: the next
            # reservation's GetTask goes out now), then the outcome goes to the owner,
            # then the Result (task_finished). Here the outcome rides with the Result
            # (the owner's book takes it from TaskFinished), so the runtime's wait for
            # task.done's acknowledgement is not modelled: both calls are made at the
            # run's end, in the runtime's order.
            self.sched.run_ended(owner, tid, attempt, now)
            self.sched.task_finished(owner, tid, attempt, ok, detail, now)
        self.sched.on_timer(now)
        self.settle(now)

    def kill(self, owner: str, tid: str, now: float) -> bool:
        """End the runs of ``owner``'s ``tid`` here now, reported as failed ("killed":
        the owner that stopped it drops the outcome). False: nothing of it ran here."""
        mine = [r for r in self.runs if r[2] == owner and r[3] == tid]
        if not mine:
            return False
        self.runs = [r for r in self.runs if not (r[2] == owner and r[3] == tid)]
        heapq.heapify(self.runs)
        for _, _, o, t, attempt in mine:
            self.sched.run_ended(o, t, attempt, now)  # as on_timer: the runtime's order
            self.sched.task_finished(o, t, attempt, False, "killed", now)
        self.settle(now)
        return True

    def settle(self, now: float) -> None:
        """Route what the scheduler output (drained once: what handling it causes is
        routed by the next call)."""
        for o in self.sched.drain():
            if isinstance(o, SendMessage):
                self.send(o.dst, self.boot + o.payload)
                continue
            if isinstance(o, RunTask):
                self._seq += 1
                end = now + self.duration(o, now)
                heapq.heappush(self.runs, (end, self._seq, o.owner, o.task.task_id, o.attempt))
            self.emit(o, now)


class ComputeNode:
    """One simulated node: a ``Scheduler`` (driven by a ``SchedulerHost``), a
    ``TaskBook`` and slots that run tasks for a duration."""

    def __init__(self, ctx: NodeContext, mesh: ComputeMesh) -> None:
        self.name = ctx.name
        self.mesh = mesh
        self.incarnation = mesh.incarnation[ctx.name]
        self.book = TaskBook(ctx.name)
        self.sched = Scheduler(ctx.name, mesh.capacity[ctx.name], config=mesh.config,
                               rng=ctx.rng, now=ctx.now)
        self.sched.objects_held(sorted(mesh.objects_on.get(ctx.name, ())))
        self.host = SchedulerHost(
            self.sched, incarnation=self.incarnation,
            send=lambda dst, payload: self._out.append(StreamRequest(dst, payload)),
            emit=self._record,
            duration=lambda o, now: self.mesh.duration(o.task.task_id, self.name, now))
        self._out: list[Output] = []
        self.streams_failed = 0

    # driver contract
    def handle_datagram(self, src: str, payload: bytes, now: float) -> None:
        return None

    def handle_stream(self, src: str, payload: bytes, now: float) -> bytes | None:
        # Each message carries its sender's boot (``SchedulerHost``).
        self.host.handle_message(src, payload, now)
        return None

    def handle_stream_reply(self, src: str, payload: bytes, now: float) -> None:
        return None

    def stream_failed(self, dst: str, now: float) -> None:
        # A lost message: the scheduler's timeouts cover it. To a node this owner runs
        # tasks on, the runtime then checks the node (runtime/compute.py
        # ``_check_runner``): a crashed process's port refuses the check, which is the
        # evidence of a lost runner; a paused or cut-off node's silence is not (the
        # check times out and membership decides). The engine models one exchange, not
        # the connection, so the check's answer is whether ``dst`` is down.
        self.streams_failed += 1
        self.runner_gone(dst, now)

    def runner_gone(self, dst: str, now: float) -> None:
        """A connection to or from ``dst`` broke: if this owner runs tasks there or has
        reservations queued there, and a check would be refused (``dst`` is down), they
        are re-placed now."""
        if self.sched.waits_on(dst) and not self.mesh.sim.is_up(dst):
            self.sched.runner_unreachable(dst, now)
            self._settle(now)

    def next_deadline(self) -> float | None:
        return self.host.next_deadline()

    def on_timer(self, now: float) -> None:
        self.host.on_timer(now)

    def drain(self) -> list[Output]:
        out = self._out
        self._out = []
        return out

    # local requests
    def submit(self, tasks: Sequence[TaskSpec], now: float) -> None:
        """Accept ``tasks``: scheduled, recorded, and their records stored before the
        submit returns (durable before acknowledged)."""
        self.sched.submit(tasks, now)  # raises before anything is recorded
        for t in tasks:
            e = self.book.add(TaskRecord(t.task_id, self.name, fn_id="sim", args=b""), now)
            self.mesh.kv_write(self.name, e.rec, at_once=True)
        self._settle(now)

    def ask(self, tid: str, forwarded: bool, now: float) -> tuple[str, TaskRecord | str | None]:
        """A client asks for ``tid``: ``("state", record)``, ``("owner", node)`` (ask the
        owner), ``("forward", node)`` (ask the adopter) or ``("unknown", None)``."""
        held = self.book.record(tid)
        if held is not None:
            return "state", held
        rec = self.mesh.kv.get(tid)
        if rec is None:
            return "unknown", None
        alive = {s.name for s in self.sched.view()}
        d = lookup(rec, self.name, alive, forwarded=forwarded)
        if d.action is LookupAction.ANSWER:
            return "state", rec
        if d.action is LookupAction.ADOPT:
            return "state", self._adopt(rec, now)
        return ("owner" if d.action is LookupAction.ASK_OWNER else "forward"), d.node

    def _adopt(self, rec: TaskRecord, now: float) -> TaskRecord:
        e, why = self.book.adopt(rec, now)
        self.mesh.adopted(self.name, rec.task_id, {s.name for s in self.sched.view()})
        self.mesh.kv_write(self.name, e.rec)
        if why is None:
            try:
                self.sched.submit([self.mesh.specs[rec.task_id]], now)
            except (SchedulingError, SchedulingOverloaded) as exc:
                why = str(exc)
        if why is not None:
            self._finish(rec.task_id, TaskState.FAILED, now, error=why, kind="refused")
        self._settle(now)
        return e.rec

    def _finish(self, tid: str, state: TaskState, now: float, *, error: str = "",
                node: str = "", kind: str = "") -> None:
        e = self.book.get(tid)
        assert e is not None
        rec = self.book.finish(e, state, now, error=error, node=node, kind=kind)
        self.mesh.accepted(self.name, self.incarnation, tid, state)
        self.mesh.kv_write(self.name, rec)

    def _settle(self, now: float) -> None:
        self.host.settle(now)

    def _record(self, o: SchedulingOutput, now: float) -> None:
        """What the owner's book keeps of a scheduling output (``SchedulerHost.emit``)."""
        if isinstance(o, TaskBound):
            self.book.bound(o.task_id, o.node, o.attempt, "")
        elif isinstance(o, TaskFinished):
            # The worker's outcome rides with its result here (the runtime sends it
            # as task.done just before): the first one wins.
            if self.book.outcome(o.task_id, ok=o.ok, node=o.node) is Verdict.ACCEPTED:
                self._finish(o.task_id, TaskState.DONE if o.ok else TaskState.FAILED,
                             now, error=o.detail, node=o.node,
                             kind="" if o.ok else "error")
            self._after_result(o.task_id, now)
        elif isinstance(o, TaskStopped):
            self.book.stopped(o.task_id, o.node)
        elif isinstance(o, TaskFailed) and o.task_id in self.book:
            e = self.book.get(o.task_id)
            if e is not None and e.rec.state not in TERMINAL:
                self._finish(o.task_id, TaskState.FAILED, now, error=o.reason,
                             kind="unschedulable")
        assert not isinstance(o, SendMessage)
        self._out.append(o)

    def _after_result(self, tid: str, now: float) -> None:
        if self.book.scheduler_finished(tid) == "resubmit":
            self.sched.submit([self.mesh.specs[tid]], now)
        elif (e := self.book.get(tid)) is not None and e.rec.state not in TERMINAL:
            self._finish(tid, TaskState.FAILED, now, error="result lost", kind="lost")


# --------------------------------------------------------------------------- mesh


@dataclass
class _Binding:
    t: float
    node: str
    local: bool


class ComputeMesh:
    """A simulated mesh of ``ComputeNode``s named ``n0 .. n{N-1}``."""

    def __init__(
        self,
        nodes: int = 12,
        *,
        seed: int,
        topology: Topology | None = None,
        cpus: float = 4.0,
        config: SchedulingConfig | None = None,
        labels: dict[str, dict[str, str]] | None = None,
        objects: dict[str, tuple[int, Residency | None]] | None = None,
        gossip_s: float = 1.0,
        gossip_delay_s: float = 0.3,
        detect_s: float = 2.0,
        runner_check_s: float = 0.05,
        poll_s: float = 1.0,
        kv_delay_s: float = RECORD_WINDOW_S,
        record_trace: bool = False,
        placements: Sequence[Placement] | None = None,
        cpus_of: dict[str, float] | None = None,
        holders: dict[str, tuple[str, ...]] | None = None,
        duration_of: Callable[[str, str, float], float] | None = None,
    ) -> None:
        """``placements`` (one per node, in name order), ``cpus_of`` (per node),
        ``holders`` (per object: its replica holders, in place of the data plane's rule)
        and ``duration_of`` (``(task_id, node, now) -> seconds``, asked when a task
        starts: where it runs may change how long it takes) let a caller such as
        ``meshscale plan`` lay out its own sites; by default nodes are spread round robin
        and every task takes ``durations[task_id]``."""
        self.topology = topology or Topology.three_regions()
        self.config = config or SchedulingConfig(run_timeout_s=20.0)
        self.sim = Simulator(self.topology, seed, record_trace=record_trace)
        if placements is not None:
            nodes = len(placements)
        self.names = [f"n{i}" for i in range(nodes)]
        laid_out = list(placements) if placements is not None else self.topology.place(nodes)
        self.placements = dict(zip(self.names, laid_out, strict=True))
        self.duration_of = duration_of
        labels = labels or {}
        self.candidates = {
            n: Candidate(n, p.region, p.zone, labels.get(n, {}))
            for n, p in self.placements.items()
        }
        self.capacity = {n: Resources((cpus_of or {}).get(n, cpus), 16_000,
                                      1 if "gpu" in labels.get(n, {}) else 0)
                         for n in self.names}
        regions = list(self.topology.regions)
        self.coords = {
            n: Coordinate(
                vec=tuple(0.07 if r == p.region else 0.0 for r in regions),
                height=0.001 + p.access_s, error=0.1)
            for n, p in self.placements.items()
        }
        # Objects: size, residency and holders (three replicas, by the data plane's rule).
        self.objects: dict[str, InputRef] = {}
        self.objects_on: dict[str, set[str]] = {n: set() for n in self.names}
        view = list(self.candidates.values())
        for oid, (size, res) in sorted((objects or {}).items()):
            if holders is not None and oid in holders:
                on = holders[oid]
            else:
                on = tuple(c.name for c in replica_set(oid, view, 3, res))
            self.objects[oid] = InputRef(oid, size, on, res)
            for h in on:
                self.objects_on[h].add(oid)
        self.durations: dict[str, float] = {}
        self.specs: dict[str, TaskSpec] = {}
        self.owner: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        self.bindings: dict[str, list[_Binding]] = {}
        self.runs: dict[str, list[str]] = {}
        self.results: dict[str, list[Event]] = {}
        self.violations: list[str] = []
        self.holder_free_at_submit: dict[str, bool] = {}
        self.detected_down: set[str] = set()
        self.down_for_good: set[str] = set()
        # Task records (the replicated KV), clients and what they observed.
        self.kv: dict[str, TaskRecord] = {}
        self.kv_delay_s = kv_delay_s
        self.poll_s = poll_s
        self.client_rtt_s = 0.002
        self.client_rng = random.Random(f"compute-clients/{seed}")
        self.client_timeout_s = 10.0
        self.foreign_ask_p = 0.2
        """Share of polls a client sends to a random live node instead of its own."""
        self.client_at: dict[str, str] = {}
        self.asking: dict[str, float] = {}
        """Task id -> when its client's question left (a lost one times out)."""
        self.acknowledged: set[str] = set()
        """Tasks whose submit was answered (a submit queued at a node that crashed
        before it resumed never was: its client got an error, not a task)."""
        self.observed: dict[str, tuple[TaskState, str]] = {}
        self.failed_kinds: dict[str, int] = {}
        """Failed outcomes clients observed, by the record's kind (why it failed)."""
        """Task id -> (terminal state, node that gave it) first seen by its client."""
        self.accepts: dict[str, list[tuple[str, int, TaskState]]] = {}
        """Task id -> every (owner, incarnation, state) that ended it."""
        self.adoptions: dict[str, list[tuple[float, str, int]]] = {}
        self.owner_incarnation: dict[str, int] = {}
        self.concurrent_adoptions: list[str] = []
        """Adoptions while an earlier owner still lived, by a node whose view had it
        dead: two owners at once, the documented at-least-once window."""
        self.adopted_beside_live_owner: list[str] = []
        """Adoptions by a node that saw an earlier owner alive: never allowed."""
        self.incarnation: dict[str, int] = dict.fromkeys(self.names, 0)
        self.gossip_s = gossip_s
        self.gossip_delay_s = gossip_delay_s
        self.detect_s = detect_s
        self.runner_check_s = runner_check_s
        """From a crash to the owners with tasks bound on the crashed node acting on its
        closed connections: the FIN reaches them and their check is refused (the
        runtime's ``_check_runner``), about two one-way delays; 0: not modelled."""
        self.gossip_on = True
        self._last_load: dict[str, Load] = {}
        self.sim.observers.append(self._observe)
        for name in self.names:
            self.sim.add_node(name, self.placements[name], self._factory)
        snapshot = self.snapshot()
        for name in self.names:
            self.sim.call(name, partial(_set_view, snapshot, {}))
        self.sim.at(gossip_s, self._gossip)

    def _factory(self, ctx: NodeContext) -> DrivenProtocol:
        return ComputeNode(ctx, self)

    def duration(self, task_id: str, node: str, now: float) -> float:
        """How long ``task_id`` runs on ``node``, starting ``now``."""
        if self.duration_of is not None:
            return self.duration_of(task_id, node, now)
        return self.durations.get(task_id, 1.0)

    def node(self, name: str) -> ComputeNode:
        proto = self.sim.protocol(name)
        assert isinstance(proto, ComputeNode)
        return proto

    def up(self) -> list[str]:
        return [n for n in self.names if self.sim.is_up(n)]

    # ------------------------------------------------------------------ gossip, detection

    def state_of(self, name: str, load: Load | None = None) -> NodeState:
        if load is None:
            load = self.node(name).sched.load() if self.sim.is_up(name) else Load()
        return NodeState(self.candidates[name], self.capacity[name], load,
                         coord=self.coords[name], bandwidth_bps=1e9)

    def snapshot(self) -> list[NodeState]:
        """What gossip says now: every node not (yet) detected dead, with its load (the
        last one it advertised, for a crashed node nobody has noticed yet)."""
        out = []
        for n in self.names:
            if n in self.detected_down:
                continue
            if self.sim.is_up(n):
                self._last_load[n] = self.node(n).sched.load()
            out.append(self.state_of(n, self._last_load.get(n, Load())))
        return out

    def boot(self, name: str) -> str:
        """The boot ``name``'s process sends (``Scheduler.peer_boot``)."""
        return SchedulerHost.boot_of(name, self.incarnation[name])

    def install_view(self, view: list[NodeState],
                     boots: Mapping[str, str] | None = None) -> None:
        for n in self.up():
            self.sim.call(n, partial(_set_view, view, boots or {}))

    def _gossip(self) -> None:
        if self.gossip_on:
            snap = self.snapshot()
            # The runtime's load exchange (``sched.load``) carries each live node's boot
            # as of the exchange.
            boots = {n: self.boot(n) for n in self.up()}
            self.sim.at(self.sim.now + self.gossip_delay_s,
                        partial(self._deliver, snap, boots))
        self.sim.at(self.sim.now + self.gossip_s, self._gossip)

    def _deliver(self, snap: list[NodeState], boots: Mapping[str, str]) -> None:
        if self.gossip_on:
            view = [s for s in snap if s.name not in self.detected_down]
            self.install_view(view, boots)

    # ------------------------------------------------------------------ faults

    def crash(self, name: str, *, for_good: bool = False) -> None:
        self.sim.crash(name)
        if for_good:
            self.down_for_good.add(name)
        if self.runner_check_s > 0:
            self.sim.at(self.sim.now + self.runner_check_s, partial(self._closed, name))
        self.sim.at(self.sim.now + self.detect_s, partial(self._detect, name))

    def _closed(self, name: str) -> None:
        """The crash of ``name`` closed its connections: every owner it ran tasks for
        (it asked them for those tasks, so it had a connection to each) checks it and is
        refused, while it is still down (``ComputeNode.runner_gone``)."""
        if self.sim.is_up(name):
            return
        for n in self.up():
            self.sim.call(n, partial(_runner_closed, name))

    def _detect(self, name: str) -> None:
        if self.sim.is_up(name) or name in self.detected_down:
            return
        self.detected_down.add(name)
        for n in self.up():
            self.sim.call(n, partial(_node_down, name))

    def restart(self, name: str) -> None:
        """Restart ``name`` with empty memory (its records are in the store)."""
        assert name not in self.down_for_good
        self.incarnation[name] += 1
        self.sim.restart(name)
        self.detected_down.discard(name)
        view = [s for s in self.snapshot() if s.name not in self.detected_down]
        self.sim.call(name, partial(_set_view, view, {}))

    # ------------------------------------------------------------------ the record store

    def kv_write(self, writer: str, rec: TaskRecord, *, at_once: bool = False) -> None:
        """Store a copy of ``rec``: at once (a submit waits for it), or ``kv_delay_s``
        later and only if ``writer`` has not crashed meanwhile (a write in flight)."""
        copy = msgspec.structs.replace(rec)
        if at_once:
            self.kv[copy.task_id] = copy
            return
        inc = self.incarnation[writer]

        def apply() -> None:
            if self.sim.is_up(writer) and self.incarnation[writer] == inc:
                self.kv[copy.task_id] = copy

        self.sim.at(self.sim.now + self.kv_delay_s, apply)

    def adopted(self, node: str, tid: str, view: set[str]) -> None:
        """``node`` took ``tid`` over, its view of who is alive being ``view``. When an
        earlier owner of the task (the submitter's node or an earlier adopter) still runs
        in the same incarnation, that is two owners at once: inside the documented window
        if ``node``'s view had that owner dead (stale), a violation if it saw it alive."""
        owners = [(self.owner[tid], self.owner_incarnation[tid])]
        owners += [(n, i) for _, n, i in self.adoptions.get(tid, [])]
        live = {n for n, i in owners
                if n != node and self.sim.is_up(n) and self.incarnation[n] == i}
        if live & view:
            self.adopted_beside_live_owner.append(
                f"{tid}: {node} adopted it while it saw {sorted(live & view)} alive")
        elif live:
            self.concurrent_adoptions.append(tid)
        self.adoptions.setdefault(tid, []).append((self.sim.now, node,
                                                   self.incarnation[node]))

    def accepted(self, node: str, incarnation: int, tid: str, state: TaskState) -> None:
        self.accepts.setdefault(tid, []).append((node, incarnation, state))

    # ------------------------------------------------------------------ clients

    def _poll(self, tid: str) -> None:
        """The client of ``tid`` asks for its outcome, every ``poll_s`` until it has one."""
        if tid in self.observed or tid not in self.specs:
            return
        self.sim.at(self.sim.now + self.poll_s, partial(self._poll, tid))
        if self.sim.now - self.asking.get(tid, -1e9) < self.client_timeout_s:
            return  # the last question waits at a paused node
        node = self.client_at[tid]
        up = self.up()
        if not up:
            return
        if not self.sim.is_up(node):
            node = self.client_at[tid] = up[self.client_rng.randrange(len(up))]
        elif self.client_rng.random() < self.foreign_ask_p:
            node = up[self.client_rng.randrange(len(up))]  # any node may be asked
        self._ask(tid, node, False, 0)

    def _ask(self, tid: str, node: str, forwarded: bool, hops: int) -> None:
        if not self.sim.is_up(node):
            return
        self.asking[tid] = self.sim.now
        self.sim.call(node, partial(_ask_node, tid, forwarded,
                                    partial(self._answer, tid, node, forwarded, hops)))

    def _answer(self, tid: str, node: str, forwarded: bool, hops: int, kind: str,
                body: TaskRecord | str | None) -> None:
        self.asking.pop(tid, None)
        if kind == "state" and isinstance(body, TaskRecord) and body.state in TERMINAL:
            if tid not in self.observed and body.state == TaskState.FAILED:
                self.failed_kinds[body.kind or "unknown"] = \
                    self.failed_kinds.get(body.kind or "unknown", 0) + 1
            self.observed.setdefault(tid, (body.state, node))
        elif kind in ("owner", "forward") and isinstance(body, str) and hops < 3:
            # The node passes the question on (as the runtime proxies it): one more hop.
            self.sim.at(self.sim.now + self.client_rtt_s,
                        partial(self._ask, tid, body, forwarded or kind == "forward",
                                hops + 1))

    # ------------------------------------------------------------------ requests

    def submit(self, node: str, tasks: Sequence[TaskSpec],
               durations: Sequence[float] | None = None) -> str | None:
        """Submit a batch at ``node`` now; returns the refusal (``rule: message``) or None.
        (A paused node takes the request when it resumes: then the refusal, if any, is
        only recorded in ``refused``.)"""
        for i, t in enumerate(tasks):
            self.durations[t.task_id] = 1.0 if durations is None else durations[i]
            self.holder_free_at_submit[t.task_id] = self._holder_free(t)
            # Registered first: the owner may bind a task to itself within the call.
            self.specs[t.task_id] = t
            self.owner[t.task_id] = node
            self.owner_incarnation[t.task_id] = self.incarnation[node]
            self.client_at[t.task_id] = node
        self.sim.call(node, partial(_submit, list(tasks), self._refuse))
        for t in tasks:
            self.sim.at(self.sim.now + self.poll_s, partial(self._poll, t.task_id))
        return self.refused.get(tasks[0].task_id)

    def _refuse(self, tasks: list[TaskSpec], reason: str) -> None:
        for t in tasks:
            self.refused[t.task_id] = reason
            del self.specs[t.task_id]
            del self.owner[t.task_id]
            del self.client_at[t.task_id]
            del self.owner_incarnation[t.task_id]
            self.holder_free_at_submit.pop(t.task_id, None)

    def _holder_free(self, t: TaskSpec) -> bool:
        """Truth at submit: some live holder of ``t``'s inputs may run it and has a free slot."""
        if not t.inputs or not isinstance(t.placement, DataLocal):
            return False
        best = max(self.true_local_bytes(t, n) for n in self.names)
        if best <= 0:
            return False
        for n in self.up():
            if self.true_local_bytes(t, n) != best or self.broken_rule(t, n) is not None:
                continue
            if self.node(n).sched.load().free_cpus >= t.cpus:
                return True
        return False

    # ------------------------------------------------------------------ observation

    def _check_rules(self, t: float, where: str, tid: str, node: str) -> None:
        spec = self.specs.get(tid)
        if spec is None:
            return
        why = self.broken_rule(spec, node)
        if why is not None:
            self.violations.append(f"{t:.3f} {where} {tid} on {node} "
                                   f"({self.placements[node].region}) breaks {why}")

    def true_local_bytes(self, spec: TaskSpec, node: str) -> int:
        """Bytes of ``spec``'s inputs ``node`` really holds (the mesh's own record of where
        each object was placed, not the task's list of holders)."""
        return sum(inp.size for inp in spec.inputs if inp.oid in self.objects_on[node])

    def holds_most(self, spec: TaskSpec, node: str) -> bool:
        best = max(self.true_local_bytes(spec, n) for n in self.names)
        return best > 0 and self.true_local_bytes(spec, node) == best

    def broken_rule(self, spec: TaskSpec, node: str) -> str | None:
        """The oracle: the first rule ``spec`` declares that ``node`` breaks, read from the
        task's own fields and the node's true region, labels and capacity. It shares no
        code with the scheduler (which decides with ``core.scheduling``'s filters), so a
        scheduler that ignores a rule is caught here, not agreed with."""
        region = self.placements[node].region
        if spec.residency is not None and spec.residency.regions is not None \
                and region not in spec.residency.regions:
            return f"residency (allowed {sorted(spec.residency.regions)})"
        for inp in spec.inputs:
            if inp.residency is not None and inp.residency.regions is not None \
                    and region not in inp.residency.regions:
                return f"input-residency of {inp.oid} (allowed {sorted(inp.residency.regions)})"
        mode = spec.placement
        if isinstance(mode, Central) and region != mode.region:
            return f"mode central in {mode.region}"
        if isinstance(mode, InRegions) and region not in mode.regions:
            return f"mode regions {sorted(mode.regions)}"
        have = self.candidates[node].labels
        if any(have.get(k) != v for k, v in spec.labels.items()):
            return f"labels {dict(spec.labels)}"
        cap = self.capacity[node]
        if spec.cpus > cap.cpus or spec.memory_mb > cap.memory_mb or spec.gpus > cap.gpus:
            return f"resources cpus={spec.cpus} memory_mb={spec.memory_mb} gpus={spec.gpus}"
        return None

    def _observe(self, t: float, node: str, ev: Event) -> None:
        if isinstance(ev, TaskBound):
            self._check_rules(t, "bound", ev.task_id, ev.node)
            spec = self.specs.get(ev.task_id)
            local = spec is not None and self.holds_most(spec, ev.node)
            self.bindings.setdefault(ev.task_id, []).append(_Binding(t, ev.node, local))
        elif isinstance(ev, RunTask):
            self._check_rules(t, "run", ev.task.task_id, node)
            self.runs.setdefault(ev.task.task_id, []).append(node)
        elif isinstance(ev, TaskFinished | TaskFailed):
            self.results.setdefault(ev.task_id, []).append(ev)

    # ------------------------------------------------------------------ invariants

    def locality(self) -> tuple[int, int]:
        """(bound to a holder, bound) over data tasks whose holder had a free slot at
        submit time (first binding of each)."""
        eligible = [tid for tid, free in self.holder_free_at_submit.items()
                    if free and tid in self.bindings]
        local = sum(1 for tid in eligible if self.bindings[tid][0].local)
        return local, len(eligible)

    def result_problems(self) -> list[str]:
        """Accepted tasks whose client observed no outcome, and owner incarnations that
        ended one task twice."""
        out = list(self.adopted_beside_live_owner)
        for tid in sorted(self.acknowledged):
            if tid not in self.observed:
                out.append(f"{tid}: no outcome observed by its client")
            ends = [(n, i) for n, i, _ in self.accepts.get(tid, [])]
            if len(set(ends)) < len(ends):
                out.append(f"{tid}: ended twice by one owner ({ends})")
        return out

    def double_owners(self) -> list[str]:
        """Tasks ended by more than one owner (the at-least-once window of takeover)."""
        return sorted(tid for tid, ends in self.accepts.items()
                      if len({(n, i) for n, i, _ in ends}) > 1)

    def conflicting(self) -> list[str]:
        """Tasks whose owners ended them in different states."""
        return sorted(tid for tid, ends in self.accepts.items()
                      if len({st for _, _, st in ends}) > 1)

    def all_done(self) -> bool:
        return all(tid in self.observed for tid in self.acknowledged)


def _set_view(view: list[NodeState], boots: Mapping[str, str], p: DrivenProtocol,
              now: float) -> None:
    assert isinstance(p, ComputeNode)
    p.sched.set_view(view, now)
    for name in sorted(boots):
        p.sched.peer_boot(name, boots[name], now)
    p._settle(now)


def _runner_closed(name: str, p: DrivenProtocol, now: float) -> None:
    assert isinstance(p, ComputeNode)
    p.runner_gone(name, now)


def _node_down(name: str, p: DrivenProtocol, now: float) -> None:
    assert isinstance(p, ComputeNode)
    p.sched.node_down(name, now)
    p._settle(now)


def _ask_node(tid: str, forwarded: bool,
              reply: Callable[[str, TaskRecord | str | None], None],
              p: DrivenProtocol, now: float) -> None:
    assert isinstance(p, ComputeNode)
    kind, body = p.ask(tid, forwarded, now)
    if isinstance(body, TaskRecord):
        body = msgspec.structs.replace(body)  # what the reply carries, as of now
    p.mesh.sim.at(now + p.mesh.client_rtt_s, partial(reply, kind, body))


def _submit(tasks: list[TaskSpec], refuse: Callable[[list[TaskSpec], str], None],
            p: DrivenProtocol, now: float) -> None:
    assert isinstance(p, ComputeNode)
    try:
        p.submit(tasks, now)
    except SchedulingError as exc:
        refuse(tasks, f"{exc.rule}: {exc}")
        return
    p.mesh.acknowledged.update(t.task_id for t in tasks)


# --------------------------------------------------------------------------- chaos


@dataclass
class ComputeReport:
    seed: int
    submitted: int
    refused: int
    finished: int
    failed: int
    unacknowledged: int
    """Submits that reached a node only to die with it (the client saw an error)."""
    adopted: int
    """Tasks taken over by a new owner (a dead owner's, or a restarted one's own)."""
    double_owners: int
    """Tasks ended by two owners (the at-least-once window; each client saw one)."""
    conflicting: int
    """Tasks two owners ended in different states."""
    concurrent_adoptions: int
    """Adoptions while an earlier owner still lived, by a node whose (stale) view had it
    dead: the at-least-once window (``core/tasks.py``)."""
    failed_kinds: dict[str, int]
    """Failed outcomes by why (``unschedulable``: no allowed node was left)."""
    residency_violations: list[str]
    result_problems: list[str]
    locality: tuple[int, int]
    reruns: int
    """Tasks that ran more than once (at-least-once execution; one result each)."""
    trace_hash: str
    events: int
    faults: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)


def _random_task(rng: random.Random, i: int, seed: int, mesh: ComputeMesh,
                 regions: list[str]) -> TaskSpec:
    oids = sorted(mesh.objects)
    roll = rng.random()
    inputs: tuple[InputRef, ...] = ()
    mode: PlacementMode = DataLocal()
    if roll < 0.6:
        inputs = tuple(mesh.objects[o] for o in rng.sample(oids, rng.choice((1, 1, 2))))
    elif roll < 0.7:
        mode = NearSource(mesh.names[rng.randrange(len(mesh.names))])
    elif roll < 0.8:
        mode = Central(regions[rng.randrange(len(regions))])
    elif roll < 0.9:
        mode = InRegions(frozenset(rng.sample(regions, 2)))
    residency = None
    if rng.random() < 0.2:
        residency = Residency(frozenset({regions[rng.randrange(len(regions))]}), "pii")
    labels = {"gpu": "yes"} if rng.random() < 0.05 else {}
    return TaskSpec(f"s{seed}-t{i}", cpus=float(rng.choice((1, 1, 1, 2))), labels=labels,
                    residency=residency, inputs=inputs, placement=mode, gpus=len(labels))


def chaos_run(
    seed: int,
    *,
    nodes: int = 12,
    tasks: int = 120,
    fault_until: float = 30.0,
    settle_s: float = 90.0,
) -> ComputeReport:
    """Tasks of every placement mode (some with residency, some with inputs whose residency
    is restricted, a few needing a GPU) submitted from random live nodes while nodes crash
    (some for good), restart, pause and get partitioned; then faults stop and the mesh runs
    until every task has its result."""
    rng = random.Random(f"compute-chaos/{seed}")
    topo = Topology.three_regions()
    regions = list(topo.regions)
    objects: dict[str, tuple[int, Residency | None]] = {}
    for k in range(24):
        res = Residency(frozenset({regions[k % 3]}), "pii") if k % 4 == 0 else None
        objects[f"obj{k}"] = (rng.choice((1, 10, 100, 500)) * 1_000_000, res)
    labels = {f"n{i}": {"gpu": "yes"} for i in (1, 6)}
    mesh = ComputeMesh(nodes, seed=seed, topology=topo, labels=labels, objects=objects)
    sim = mesh.sim
    faults: list[str] = []

    def submit(i: int) -> None:
        up = [n for n in mesh.up() if n not in mesh.detected_down]
        if not up:
            return
        node = up[rng.randrange(len(up))]
        spec = _random_task(rng, i, seed, mesh, regions)
        mesh.submit(node, [spec], [rng.uniform(0.2, 2.5)])

    for i in range(tasks):
        sim.at(1.0 + (fault_until - 2.0) * i / tasks, partial(submit, i))

    transient: dict[str, float] = {}

    def inject() -> None:
        now = sim.now
        for n, until in sorted(transient.items()):
            if until <= now:
                del transient[n]
                mesh.restart(n)
                faults.append(f"{now:.1f} restart {n}")
        up = [n for n in mesh.up() if n not in transient]
        if len(up) <= nodes // 2:
            return
        roll = rng.random()
        victim = up[rng.randrange(len(up))]
        if roll < 0.3 and len(transient) < 2:
            transient[victim] = now + rng.uniform(3.0, 10.0)
            mesh.crash(victim)
            faults.append(f"{now:.1f} crash {victim}")
        elif roll < 0.4 and len(mesh.down_for_good) < 2:
            mesh.crash(victim, for_good=True)
            faults.append(f"{now:.1f} crash-for-good {victim}")
        elif roll < 0.7:
            d = rng.uniform(0.5, 4.0)
            sim.pause(victim, d)
            faults.append(f"{now:.1f} pause {victim} {d:.1f}")
        elif roll < 0.85:
            cut = list(up)
            rng.shuffle(cut)
            side = cut[: rng.randint(1, len(cut) // 3)]
            sim.partition(side, [n for n in mesh.names if n not in side])
            sim.at(min(now + rng.uniform(1.0, 5.0), fault_until), sim.heal)
            faults.append(f"{now:.1f} partition {','.join(sorted(side))}")

    t = 3.0
    while t < fault_until:
        sim.at(t, inject)
        t += rng.uniform(1.5, 3.5)
    sim.run_until(fault_until)
    sim.heal()
    for n in sorted(transient):
        mesh.restart(n)
        faults.append(f"{sim.now:.1f} restart {n}")
    sim.run_until_true(mesh.all_done, sim.now + settle_s, 0.5)
    stats: dict[str, int] = {}
    for n in mesh.names:
        for key, count in mesh.node(n).sched.stats.items():
            stats[key] = stats.get(key, 0) + count
    observed = [st for st, _ in mesh.observed.values()]
    return ComputeReport(
        seed=seed,
        submitted=len(mesh.specs) + len(mesh.refused),
        unacknowledged=len(set(mesh.specs) - mesh.acknowledged),
        refused=len(mesh.refused),
        finished=sum(1 for st in observed if st == TaskState.DONE),
        failed=sum(1 for st in observed if st == TaskState.FAILED),
        failed_kinds=dict(mesh.failed_kinds),
        adopted=len(mesh.adoptions),
        double_owners=len(mesh.double_owners()),
        conflicting=len(mesh.conflicting()),
        concurrent_adoptions=len(mesh.concurrent_adoptions),
        residency_violations=list(mesh.violations),
        result_problems=mesh.result_problems(),
        locality=mesh.locality(),
        reruns=sum(1 for r in mesh.runs.values() if len(r) > 1),
        trace_hash=sim.trace_hash(),
        events=sim.events_processed,
        faults=faults,
        stats=stats,
    )


# --------------------------------------------------------------------------- herd


@dataclass
class HerdReport:
    seed: int
    tasks: int
    nodes: int
    per_node: dict[str, int]
    """Tasks bound (first binding) per node."""
    finished: int
    makespan_s: float
    trace_hash: str

    @property
    def fair_share(self) -> float:
        return self.tasks / self.nodes

    @property
    def max_over_fair(self) -> float:
        return max(self.per_node.values(), default=0) / self.fair_share


def stale_view(mesh: ComputeMesh, cold: str, busy: Load) -> list[NodeState]:
    """A view gossiped when every node but ``cold`` was busy (``busy``) and ``cold`` idle."""
    cap = mesh.capacity[cold].cpus
    return [mesh.state_of(n, Load(0, 0, cap) if n == cold else busy) for n in mesh.names]


def herd_run(
    seed: int,
    *,
    nodes: int = 12,
    tasks_per_node: int = 8,
    cpus: float = 4.0,
    cold: str = "n5",
    deadline_s: float = 60.0,
) -> HerdReport:
    """Every node submits ``tasks_per_node`` one-second tasks at the same instant, all
    holding the same stale view in which ``cold`` is the only idle node (truth: all idle)."""
    mesh = ComputeMesh(nodes, seed=seed, cpus=cpus)
    sim = mesh.sim
    sim.run_until(1.5)
    view = stale_view(mesh, cold, Load(int(cpus), int(cpus), 0.0))
    mesh.install_view(view)
    t0 = sim.now
    for n in mesh.names:
        batch = [TaskSpec(f"h{seed}-{n}-{k}") for k in range(tasks_per_node)]
        assert mesh.submit(n, batch) is None
    sim.run_until_true(mesh.all_done, t0 + deadline_s, 0.05)
    per_node = {n: 0 for n in mesh.names}
    for b in mesh.bindings.values():
        per_node[b[0].node] += 1
    done = [e for evs in mesh.results.values() for e in evs if isinstance(e, TaskFinished)]
    return HerdReport(seed, len(mesh.specs), nodes, per_node, len(done), sim.now - t0,
                      sim.trace_hash())


def naive_herd(
    view: Sequence[NodeState], submitters: Sequence[str], tasks_per_node: int,
    pick: Callable[[TaskSpec, Sequence[NodeState], dict[str, int]], str] | None = None,
) -> dict[str, int]:
    """Baseline: each submitter pushes each task to the least-loaded feasible node of the
    same stale view (queued + running - free cpus, plus what it pushed itself; ties by
    name). Returns tasks per node."""

    def least_loaded(t: TaskSpec, v: Sequence[NodeState], mine: dict[str, int]) -> str:
        nodes = feasible(t, v)
        return min(nodes, key=lambda s: (s.load.queued + s.load.running - s.load.free_cpus
                                         + mine.get(s.name, 0), s.name)).name

    choose = pick or least_loaded
    per_node: dict[str, int] = {s.name: 0 for s in view}
    for sub in submitters:
        mine: dict[str, int] = {}
        for k in range(tasks_per_node):
            n = choose(TaskSpec(f"naive-{sub}-{k}"), view, mine)
            mine[n] = mine.get(n, 0) + 1
            per_node[n] += 1
    return per_node
