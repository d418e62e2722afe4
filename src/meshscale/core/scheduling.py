"""Where work runs: feasibility, cost scoring, batch sampling with late binding, stealing.

After Ousterhout, Wendell, Zaharia and Stoica, "Sparrow: Distributed, Low Latency
Scheduling", SOSP 2013, and Zaharia et al., "Delay Scheduling", EuroSys 2010. The node a
task is submitted to owns it (Ray's ownership, NSDI 2021): it computes the feasible set
from its local, possibly stale, view of the mesh, scores every feasible node by estimated
cost, sends *reservations* (probes) to a few of the cheapest ones, and hands the task to
whichever probed node asks for it first (late binding). Sparrow's arguments carry over:
a reservation is cheap, a queued reservation does not commit the task, so a stale load
view costs a round trip rather than a stampede. Departures from Sparrow, and why:

- Cost, not queue length, chooses the probes. Sparrow probes workers uniformly at random
  and compares queue lengths; we rank feasible nodes by an estimated completion cost
  (``score``: bytes to move / bandwidth + Vivaldi RTT + expected queue wait + an energy
  term), keep the ``pool_size`` cheapest, and draw ``probes_per_task`` (Sparrow's d = 2)
  of them with probability proportional to ``exp(-(cost - best) / sample_temperature_s)``.
  The draw is what keeps many submitters with the same stale view off one node: nodes of
  nearly equal cost are equally likely; a node that *looks* much cheaper gets more probes,
  but late binding means it only takes what its free slots can run, and the second probe
  of each task lands elsewhere. A submitter also adds its own outstanding reservations and
  bindings to each node's load while it draws, so a batch spreads even before any gossip.
- Batch sampling across the tasks of one ``submit`` (Sparrow's job): a worker's request
  on a reservation of batch B may be answered with *any* unbound task of B that it may
  legally run, the probed task first, then the one whose inputs it holds most of.
- Hard constraints first (Sparrow's per-task constraints): a node is a candidate only if
  the task's residency rule, the residency rule of every input object, the placement mode
  (``central``, ``regions``), the required labels and the node's total resources allow it.
  When none is left the submit is refused with ``SchedulingError`` naming the rule. The
  owner re-checks the rule at every binding (the view may have changed), so a task never
  runs where a rule forbids, whoever asked for it (a thief included).
- Locality by delay scheduling. In ``data`` mode, when some feasible active node holds the
  most input bytes (a *holder*), the probes go to holders only and only holders may bind
  the task for ``locality_wait_s``; after that the task is re-probed over every feasible
  node. So a task runs where its data is whenever a holder frees a slot within the wait.
- Energy: a standby node costs ``wake_penalty_s`` (it is only chosen when active nodes
  look busier than that), an idle active node costs ``idle_penalty_s`` (busy nodes with a
  free slot win ties, so load packs and idle nodes can go to standby).
- Work stealing: an idle worker (free slots, nothing queued) asks a peer whose gossiped
  queue is long for some of its queued reservations, naming objects it holds; the victim
  hands over reservations from the tail of its queue, those whose inputs the thief holds
  first. The thief then asks the owner like any other worker. The victim tells each
  owner which of its reservations went to the thief (``Moved``): losing the thief (its
  crash, ``runner_unreachable`` or ``node_down``) then writes them off and re-places
  their tasks. Before, an owner still counted them at the victim, and a task whose
  reservations a crashed thief had taken waited until its probed nodes stopped asking
  for work and ``probe_timeout_s`` passed: issue #19's kill run ended seconds late.
- Failures: when a node leaves the view (``node_down`` or ``set_view``), tasks bound to
  it are re-placed, up to ``max_retries`` times; a reservation or a binding whose answer
  never comes is re-probed after ``probe_timeout_s`` / ``run_timeout_s``. A grant that
  reaches its worker after the ask timed out (``ask_timeout_s``) and finds the slot taken
  is declined (``Declined``) and placed again at once: it was dropped, and in issue #19's
  full kill run, with the owner's node stalled for a second, two tasks waited the 60 s
  of ``run_timeout_s`` for runs that never started. A task may thus
  *run* more than once (a node thought dead may still finish), but its owner accepts one
  result per task id and drops the rest (idempotency), remembering finished ids (bounded).
- Long tasks: ``run_timeout_s`` is the silence after which a binding counts as lost (a
  grant or a result dropped on the way), not a bound on a task's run time (its own
  timeout, enforced by the worker's driver, is). A worker running a task tells its owner
  so (``Running``, the (task id, attempt) pairs it runs for that owner, every
  ``beat_s`` once a task has run that long), and each beat restarts the
  binding's ``run_timeout_s``. Without it every task running past ``run_timeout_s`` (60 s)
  was run a second time elsewhere while the first run went on: a Dask worker (a mesh
  task for hours) then ran twice, the second failing to join under its taken name, and
  the task's record named the second run's node, not the first's (issue 20's later
  bench rounds read on nodes without a copy). A beat from another node or attempt than
  the binding's is ignored (counted).
- A lost runner before the membership verdict (issue #19): SWIM's verdict on a crashed
  node takes seconds (a probe round, then the suspicion timeout), while the crash itself
  closes the node's connections at once. When the driver has such evidence (a connection
  to the node closed or refused, and a fresh one refused or timed out:
  ``runner_unreachable``), the tasks this owner bound to the node are re-placed at once,
  its reservations are written off, and it gets no new ones for ``lost_runner_hold_s``
  (or until a message from it shows it alive, or it leaves the view). This is Ray's and
  Dask's reaction to a closed socket. It costs nothing in correctness: tasks are
  at-least-once already, and should the node be alive after all, whichever result comes
  first is the one accepted (the other is dropped as a duplicate). It is not a
  membership verdict: the node stays in the view, and its data and its own tasks are the
  other planes' business.
- A restarted runner (``peer_boot``). A node restarted on the same address answers the
  check above, and membership may never see it gone; its tasks died with the old
  process, and without more they waited for ``run_timeout_s``. Every scheduling message
  carries the sender's boot (random per process start, ``core.api.tasks.LoadReport``);
  when a node's boot changes, the tasks this owner bound to it are re-placed at once
  (retries count), like a lost runner's, but it keeps getting reservations: it is alive.
- Fair share per submitter (#13: twelve never-ending tasks of one user filled every slot
  and another user's no-op waited behind them). A task carries its ``submitter`` (the
  identity of the client, as the owner node saw its certificate) and so does each of its
  reservations. When the queued reservations of a worker come from more than one
  submitter, none of them is given a slot that would make it hold more than its share
  (``capacity.cpus`` / waiting submitters, at least one cpu) while another waits; a
  submitter holding nothing may always take one task. Like Hadoop's fair scheduler
  without preemption: a running task is never stopped for the share, so a submitter over
  its share gives slots back as its tasks end (the node's default timeout bounds that).
- Not here: the owner's records and the takeover of a dead owner's tasks
  (``core/tasks.py``), and proactive cancellation of the reservations of a task already
  bound (a worker learns it with ``NoTask``; Sparrow measured little gain from
  cancelling).

Sans-I/O like ``core/replication.py``: inputs carry ``now``; outputs (``SendMessage`` to
another node's ``Scheduler.handle_message``, and events) are collected with ``drain()``;
time moves through ``next_deadline()`` / ``on_timer(now)``; randomness comes only from the
``random.Random`` given. One ``Scheduler`` per node plays both roles: owner of the tasks
submitted to it, and worker for the reservations it receives. Every queue is bounded by
``SchedulingConfig``.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated

import msgspec

from meshscale.core.outputs import Event
from meshscale.core.pacing import loop_wait_s
from meshscale.core.placement import Candidate, PlacementError, Residency
from meshscale.core.policy import ClassPolicy, PolicyError, placement_residency
from meshscale.core.vivaldi import Coordinate, estimate_rtt
from meshscale.core.wire import VersionedCodec, WireError

__all__ = [
    "SCHEDULING_PROTOCOL_VERSION",
    "Central",
    "CostBreakdown",
    "DataLocal",
    "InRegions",
    "InputRef",
    "Load",
    "NearSource",
    "NodeState",
    "PlacementMode",
    "Resources",
    "RunTask",
    "Scheduler",
    "SchedulingConfig",
    "SchedulingError",
    "SchedulingOutput",
    "SchedulingOverloaded",
    "SendMessage",
    "TaskBound",
    "TaskFailed",
    "TaskFinished",
    "TaskSpec",
    "decode_message",
    "encode_message",
    "exclusion",
    "feasible",
    "local_bytes",
    "score",
]

SCHEDULING_PROTOCOL_VERSION = 1
MAX_RUNNING_BEAT = 1024
"""Most (task id, attempt) pairs in one ``Running`` message (more go in several)."""

TaskId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Oid = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
NodeName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
RegionName = Annotated[str, msgspec.Meta(max_length=128)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Submitter = Annotated[str, msgspec.Meta(max_length=256)]


# --------------------------------------------------------------------------- data


class Resources(msgspec.Struct, frozen=True, array_like=True):
    """An amount of node resources: a task's demand or a node's capacity."""

    cpus: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 1.0
    memory_mb: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)] = 0
    gpus: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)] = 0

    def fits_in(self, other: Resources) -> bool:
        return (
            self.cpus <= other.cpus + 1e-9
            and self.memory_mb <= other.memory_mb
            and self.gpus <= other.gpus
        )

    def minus(self, other: Resources) -> Resources:
        return Resources(
            max(0.0, self.cpus - other.cpus),
            max(0, self.memory_mb - other.memory_mb),
            max(0, self.gpus - other.gpus),
        )

    def plus(self, other: Resources) -> Resources:
        return Resources(
            self.cpus + other.cpus, self.memory_mb + other.memory_mb, self.gpus + other.gpus
        )

    def describe(self) -> str:
        return f"{self.cpus:g} cpu, {self.memory_mb} MB, {self.gpus} gpu"


class Load(msgspec.Struct, frozen=True, array_like=True):
    """A node's gossiped load summary (stale by the gossip delay)."""

    running: Count = 0
    queued: Count = 0
    """Reservations waiting in the node's queue."""
    free_cpus: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.0


class DataLocal(msgspec.Struct, frozen=True, tag="data"):
    """Run where the inputs are (the default for tasks)."""


class NearSource(msgspec.Struct, frozen=True, tag="near-source"):
    """Run on or close to ``source`` (where a stream's records enter)."""

    source: NodeName


class Central(msgspec.Struct, frozen=True, tag="central"):
    """Run in one named region."""

    region: RegionName


class InRegions(msgspec.Struct, frozen=True, tag="regions"):
    """Run in one of the listed regions (labels are the task's ``labels``)."""

    regions: frozenset[RegionName]

    def __repr__(self) -> str:
        # Sorted: a set's order follows the string hash seed, and a simulator's trace
        # (which prints events) must not (the same seed gives the same run).
        return f"InRegions(regions={_set_repr(self.regions)})"


def _set_repr(items: frozenset[str]) -> str:
    return "frozenset({" + ", ".join(repr(r) for r in sorted(items)) + "})"


PlacementMode = DataLocal | NearSource | Central | InRegions


class InputRef(msgspec.Struct, frozen=True, array_like=True):
    """An input object of a task: its id, size in bytes, where replicas are, its rule."""

    oid: Oid
    size: Annotated[int, msgspec.Meta(ge=0)] = 0
    holders: Annotated[tuple[NodeName, ...], msgspec.Meta(max_length=64)] = ()
    residency: Residency | None = None


class TaskSpec(msgspec.Struct, frozen=True):
    """What the owner knows about a task when placing it."""

    task_id: TaskId
    cpus: Annotated[float, msgspec.Meta(gt=0.0, le=1e6)] = 1.0
    memory_mb: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)] = 0
    gpus: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)] = 0
    labels: dict[str, str] = {}
    """Labels a node must carry, each with exactly this value."""
    residency: Residency | None = None
    inputs: Annotated[tuple[InputRef, ...], msgspec.Meta(max_length=256)] = ()
    placement: PlacementMode = DataLocal()
    payload: bytes = b""
    """Opaque to the scheduler (the runtime's pickled call)."""
    submitter: Submitter = ""
    """Who submitted the task (the client certificate's name, as the owner node saw it);
    workers share their slots between submitters (see the module docstring). ``""``:
    unknown, counted as one submitter of its own."""

    @property
    def demand(self) -> Resources:
        return Resources(self.cpus, self.memory_mb, self.gpus)


@dataclass(frozen=True)
class NodeState:
    """A node as the local view sees it: membership entry plus gossiped resources/load."""

    member: Candidate
    capacity: Resources
    load: Load = field(default_factory=Load)
    standby: bool = False
    """Advertised standby: takes work only once woken (costs ``wake_penalty_s``)."""
    coord: Coordinate | None = None
    bandwidth_bps: float = 1e9
    """Bits per second the node can pull input objects at."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bandwidth_bps) and self.bandwidth_bps > 0):
            raise ValueError(f"bandwidth_bps must be finite and > 0, got {self.bandwidth_bps}")

    @property
    def name(self) -> str:
        return self.member.name

    @property
    def region(self) -> str:
        return self.member.region


@dataclass(frozen=True)
class CostBreakdown:
    """Estimated cost (seconds) of running a task on a node; lower is better."""

    transfer_s: float
    latency_s: float
    queue_s: float
    energy_s: float

    @property
    def total(self) -> float:
        return self.transfer_s + self.latency_s + self.queue_s + self.energy_s

    def describe(self) -> str:
        return (f"total={self.total:.3f}s transfer={self.transfer_s:.3f} "
                f"latency={self.latency_s:.3f} queue={self.queue_s:.3f} "
                f"energy={self.energy_s:.3f}")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SchedulingConfig:
    """Every knob and bound of the scheduler; durations in seconds."""

    probes_per_task: int = 2
    """Reservations per task (Sparrow's d); 1..8."""
    pool_size: int = 8
    """Probes are drawn among this many cheapest candidates (at least d)."""
    sample_temperature_s: float = 0.05
    """Cost difference at which a candidate is e times less likely to be probed."""
    mean_task_s: float = 1.0
    """Expected task duration, for the queue-wait estimate."""
    idle_penalty_s: float = 0.005
    """Energy term of an idle active node (busy nodes with a free slot win ties)."""
    wake_penalty_s: float = 2.0
    """Energy term of a standby node (woken only when active ones look this busy)."""
    locality_wait_s: float = 3.0
    """Delay scheduling: how long a data task waits for a holder before going wide."""
    probe_timeout_s: float = 2.0
    """An unbound task is re-probed after this long."""
    run_timeout_s: float = 60.0
    """A bound task with no result and no ``Running`` beat for this long is re-placed."""
    running_beat_s: float = 20.0
    """A worker tells each owner which of its tasks it still runs (``Running``) this
    often, for the tasks that have run at least this long; at most a third of
    ``run_timeout_s`` (``beat_s``), so that one or two lost beats cost nothing."""
    max_retries: int = 3
    """Re-placements of one task (after node loss or timeout) before it fails."""
    lost_runner_hold_s: float = 10.0
    """After ``runner_unreachable`` (the driver could not reach a node): how long this
    owner sends the node no reservation, unless a message from it comes first or it
    leaves the view (membership's verdict normally comes well within this)."""
    max_pending_tasks: int = 10_000
    """Tasks this node owns and has no result for; more are refused."""
    max_batch: int = 1024
    """Tasks per ``submit``."""
    max_reservations: int = 10_000
    """Reservations queued at this node as a worker; more are dropped (and counted)."""
    reservation_ttl_s: float = 30.0
    """A queued reservation older than this is dropped (its owner has re-probed)."""
    ask_timeout_s: float = 2.0
    """A ``GetTask`` with no answer after this long releases its slot."""
    max_concurrent_asks: int = 64
    steal_interval_s: float = 0.5
    """An idle worker tries to steal at most this often."""
    max_steal: int = 4
    """Reservations handed over per steal."""
    max_steal_hint: int = 64
    """Object ids a thief names in a steal request."""
    max_finished_remembered: int = 10_000
    """Finished task ids remembered, to count a late result for one as a duplicate
    (``results_duplicate``) rather than ``results_unknown`` (both are dropped): about
    130 bytes each, so 1.3 MB at most."""
    sweep_interval_s: float = 0.25
    """Period of the timeout sweep."""
    quiet_sweep_max_s: float = 5.0
    """Period of the sweep while it has nothing to act on (``Scheduler.quiet``): no task
    owned, no reservation, ask or run here, no node marked unreachable, nothing to
    steal in the view. The input that gives it something brings the next sweep back
    to ``sweep_interval_s`` after the last one (``core.pacing``)."""
    max_message_bytes: int = 4 << 20

    @property
    def beat_s(self) -> float:
        """The ``Running`` period in force: ``running_beat_s``, at most
        ``run_timeout_s / 3``."""
        return min(self.running_beat_s, self.run_timeout_s / 3.0)

    def __post_init__(self) -> None:
        if not 1 <= self.probes_per_task <= 8:
            raise ValueError(f"probes_per_task must be in 1..8, got {self.probes_per_task}")
        if self.pool_size < self.probes_per_task:
            raise ValueError("pool_size must be >= probes_per_task")
        for name in ("sample_temperature_s", "mean_task_s", "probe_timeout_s", "run_timeout_s",
                     "running_beat_s", "reservation_ttl_s", "ask_timeout_s",
                     "steal_interval_s", "sweep_interval_s", "lost_runner_hold_s",
                     "quiet_sweep_max_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")
        for name in ("idle_penalty_s", "wake_penalty_s", "locality_wait_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        for name in ("max_retries", "max_steal", "max_steal_hint"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("max_pending_tasks", "max_batch", "max_reservations",
                     "max_concurrent_asks", "max_finished_remembered", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


# --------------------------------------------------------------------------- feasibility


class SchedulingError(PlacementError):
    """No node may legally run the task; ``rule`` names what refused it: ``nodes`` (empty
    view), ``residency`` (the task's rule), ``input-residency`` (an input's rule),
    ``mode`` (the placement mode), ``labels``, ``resources``."""


def _regions(nodes: Iterable[NodeState]) -> str:
    return "{" + ", ".join(sorted({n.region for n in nodes})) + "}"


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def _mode_allows(mode: PlacementMode, region: str) -> bool:
    if isinstance(mode, Central):
        return region == mode.region
    if isinstance(mode, InRegions):
        return region in mode.regions
    return True


def _mode_describe(mode: PlacementMode) -> str:
    if isinstance(mode, Central):
        return f"central placement in region {mode.region!r}"
    if isinstance(mode, InRegions):
        return f"placement in regions {{{', '.join(sorted(mode.regions))}}}"
    if isinstance(mode, NearSource):
        return f"near-source placement (source {mode.source!r})"
    return "data placement"


def _in_residency(res: Residency) -> Callable[[NodeState], bool]:
    return lambda n: res.allows(n.region)


def _in_mode(mode: PlacementMode) -> Callable[[NodeState], bool]:
    return lambda n: _mode_allows(mode, n.region)


def _has_labels(want: Mapping[str, str]) -> Callable[[NodeState], bool]:
    return lambda n: all(n.member.labels.get(k) == v for k, v in want.items())


def _fits(demand: Resources) -> Callable[[NodeState], bool]:
    return lambda n: demand.fits_in(n.capacity)


_Filter = tuple[str, Callable[[], str], Callable[[NodeState], bool]]
_FixedMemo = dict[tuple[str, Coordinate | None], tuple[NodeState, tuple[float, float]]]
"""``_fixed_terms`` of a task without inputs by (node, origin), with the ``NodeState``
they were computed from (frozen: valid while the view holds that very object)."""
MAX_FIXED_MEMO = 4096
"""Entries of ``Scheduler._fixed``; beyond it the memo starts afresh."""


def _describe_input(inp: InputRef) -> Callable[[], str]:
    res = inp.residency
    assert res is not None
    return lambda: f"input {inp.oid!r}: {res.describe()}"


def _filters(task: TaskSpec) -> list[_Filter]:
    """(rule, what, predicate) in the order they are applied. ``what`` describes the rule
    lazily: a binding checks every rule for every ask, and only a refusal needs words."""
    out: list[_Filter] = []
    res = task.residency
    if res is not None:
        out.append(("residency", lambda: f"the task's {res.describe()}", _in_residency(res)))
    for inp in task.inputs:
        if inp.residency is not None:
            out.append(("input-residency", _describe_input(inp),
                        _in_residency(inp.residency)))
    mode = task.placement
    if isinstance(mode, Central | InRegions):
        out.append(("mode", lambda: _mode_describe(mode), _in_mode(mode)))
    if task.labels:
        labels = dict(task.labels)
        out.append(("labels", lambda: f"labels {_labels(labels)}", _has_labels(labels)))
    demand = task.demand
    out.append(("resources", lambda: f"resources {demand.describe()}", _fits(demand)))
    return out


def _shape(task: TaskSpec) -> object | None:
    """What ``feasible`` reads of ``task`` besides its id, for a task without inputs
    (``None``: it has inputs, or something unhashable)."""
    if task.inputs:
        return None
    key = (task.residency, task.placement, tuple(sorted(task.labels.items())), task.cpus,
           task.memory_mb, task.gpus)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def exclusion(task: TaskSpec, node: NodeState) -> tuple[str, str] | None:
    """The first rule that forbids ``node`` for ``task`` as (rule, what), or ``None``."""
    for rule, what, pred in _filters(task):
        if not pred(node):
            return rule, what()
    return None


def task_classes(task: TaskSpec) -> tuple[str, ...]:
    """The data classes ``task`` carries (its own rule's and its inputs'), sorted: those
    whose policies narrow where it may run (``Scheduler.classes``)."""
    return tuple(sorted({r.data_class for r in (task.residency,
                                                *(i.residency for i in task.inputs))
                         if r is not None and r.data_class is not None}))


def feasible(task: TaskSpec, nodes: Iterable[NodeState]) -> list[NodeState]:
    """The nodes of ``nodes`` that may run ``task`` (sorted by name).

    Raises ``SchedulingError`` naming the first rule that leaves no node: the task's
    residency, then each input's residency, then the placement mode, labels, resources.
    Capacity is the node's *total* resources: a busy node is feasible (the task queues).
    """
    by_name: dict[str, NodeState] = {}
    for n in nodes:
        by_name.setdefault(n.name, n)
    remaining = [by_name[k] for k in sorted(by_name)]
    if not remaining:
        raise SchedulingError("nodes", f"cannot place task {task.task_id!r}: no live node "
                                       "in the view")
    for rule, what, pred in _filters(task):
        kept = [n for n in remaining if pred(n)]
        if not kept:
            if rule == "resources":
                biggest = max(remaining, key=lambda n: (n.capacity.cpus, n.capacity.memory_mb,
                                                        n.capacity.gpus))
                detail = (f"the largest of the {len(remaining)} remaining node(s) has "
                          f"{biggest.capacity.describe()}")
            else:
                detail = (f"the {len(remaining)} remaining node(s) are in regions "
                          f"{_regions(remaining)}")
            raise SchedulingError(
                rule, f"cannot place task {task.task_id!r}: no node satisfies {what()}; "
                      f"{detail}"
            )
        remaining = kept
    return remaining


def local_bytes(task: TaskSpec, node: str) -> int:
    """Input bytes of ``task`` already held by ``node``."""
    return sum(i.size for i in task.inputs if node in i.holders)


def score(
    task: TaskSpec,
    node: NodeState,
    origin: Coordinate | None,
    config: SchedulingConfig,
    *,
    extra_tasks: float = 0.0,
    load: Load | None = None,
) -> CostBreakdown:
    """Estimated cost of running ``task`` on ``node``.

    - transfer: input bytes the node does not hold, over its bandwidth;
    - latency: Vivaldi RTT from ``origin`` (the submitter, or the source in near-source
      mode) to the node, 0 when either coordinate is unknown;
    - queue: tasks ahead of this one (gossiped queue + ``extra_tasks`` the caller knows
      about + this one, minus free slots) * ``mean_task_s`` / the node's cpus;
    - energy: ``wake_penalty_s`` for a standby node, ``idle_penalty_s`` for an idle one.

    ``load``: the node's load to score with (default: its gossiped ``node.load``).
    """
    transfer_s, latency_s = _fixed_terms(task, node, origin)
    queue_s, energy_s = _load_terms(task, node, node.load if load is None else load,
                                    config, extra_tasks)
    return CostBreakdown(transfer_s, latency_s, queue_s, energy_s)


def _fixed_terms(task: TaskSpec, node: NodeState, origin: Coordinate | None
                 ) -> tuple[float, float]:
    """``score``'s transfer and latency: what does not depend on the node's load (for a
    task without inputs, the same for every task placed from ``origin`` on one view)."""
    total_in = sum(i.size for i in task.inputs)
    missing = total_in - local_bytes(task, node.name)
    transfer_s = missing * 8.0 / node.bandwidth_bps
    latency_s = 0.0
    if origin is not None and node.coord is not None:
        try:
            latency_s = max(0.0, estimate_rtt(origin, node.coord))
        except ValueError:
            latency_s = 0.0  # coordinates of different dimensionality: unknown
    return transfer_s, latency_s


def _load_terms(task: TaskSpec, node: NodeState, load: Load, config: SchedulingConfig,
                extra_tasks: float) -> tuple[float, float]:
    """``score``'s queue and energy terms for ``node`` carrying ``load``."""
    slots = max(1.0, node.capacity.cpus)
    free_slots = load.free_cpus / task.cpus
    ahead = load.queued + extra_tasks + 1.0 - free_slots
    queue_s = max(0.0, ahead) * config.mean_task_s / slots
    if node.standby:
        energy_s = config.wake_penalty_s
    elif load.running == 0 and load.queued == 0:
        energy_s = config.idle_penalty_s
    else:
        energy_s = 0.0
    return queue_s, energy_s


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Deliver ``payload`` to the ``Scheduler`` of ``dst`` (its ``handle_message``).
    One-way; a lost message costs a timeout, never correctness."""

    dst: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class RunTask(Event):
    """Worker side: run ``task`` (for ``owner``), then call ``task_finished`` (and, if the
    outcome travels to the owner before the ``Result`` may go, ``run_ended`` first)."""

    owner: str
    task: TaskSpec
    attempt: int


@dataclass(frozen=True, slots=True)
class TaskBound(Event):
    """Owner side: ``task_id`` was handed to ``node`` (the scores that won)."""

    task_id: str
    node: str
    region: str
    attempt: int
    cost: CostBreakdown
    local: bool
    """The node holds input bytes of the task."""
    restricted: bool
    """Delay scheduling was in force: only holders could bind."""
    stolen: bool


@dataclass(frozen=True, slots=True)
class TaskFinished(Event):
    """Owner side: the one accepted result of ``task_id``."""

    task_id: str
    node: str
    attempt: int
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class TaskStopped(Event):
    """Owner side: ``task_id`` must stop running on ``node``, whose region its classes'
    current rules no longer allow (issue #15). The driver kills it there and drops any
    outcome from that node; the task is placed again inside the rule (``TaskBound``
    follows) or fails (``TaskFailed``)."""

    task_id: str
    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class TaskFailed(Event):
    """Owner side: ``task_id`` will not run (retries exhausted, or no node may run it)."""

    task_id: str
    reason: str


SchedulingOutput = SendMessage | Event


class SchedulingOverloaded(RuntimeError):
    """A bound was hit (``max_pending_tasks``); the submit is refused, nothing was done."""


# --------------------------------------------------------------------------- wire


class Reserve(msgspec.Struct, tag=1, array_like=True):
    """Owner -> worker: a reservation for one task of batch ``batch``."""

    batch: Count
    hint: TaskId
    demand: Resources
    inputs: Annotated[list[Oid], msgspec.Meta(max_length=256)] = []
    submitter: Submitter = ""
    """The task's submitter, for the worker's fair share. Last, with a default: an older
    peer ignores it."""


class ResRef(msgspec.Struct, array_like=True):
    """A reservation handed over by a steal."""

    owner: NodeName
    batch: Count
    hint: TaskId
    demand: Resources
    inputs: Annotated[list[Oid], msgspec.Meta(max_length=256)] = []
    submitter: Submitter = ""


class GetTask(msgspec.Struct, tag=2, array_like=True):
    """Worker -> owner: I have ``free`` set aside; give me a task of ``batch``."""

    ask: Count
    batch: Count
    hint: TaskId
    free: Resources
    stolen: bool = False


class Grant(msgspec.Struct, tag=3, array_like=True):
    ask: Count
    task: TaskSpec
    attempt: Count


class NoTask(msgspec.Struct, tag=4, array_like=True):
    ask: Count
    exhausted: bool = False
    """Every task of the batch is bound or done: the worker drops its other reservations
    of the batch (a task re-placed later gets fresh ones). Last, with a default: an
    older peer ignores it."""


class Result(msgspec.Struct, tag=5, array_like=True):
    task_id: TaskId
    attempt: Count
    ok: bool
    detail: Annotated[str, msgspec.Meta(max_length=4096)] = ""


class Running(msgspec.Struct, tag=8, array_like=True):
    """Worker -> owner: these of your tasks (id, attempt) still run here. An older peer
    drops it (an unknown tag: ``rejected``) and re-places after ``run_timeout_s`` as
    before."""

    tasks: Annotated[list[tuple[TaskId, Count]], msgspec.Meta(max_length=MAX_RUNNING_BEAT)]


class Steal(msgspec.Struct, tag=6, array_like=True):
    free: Resources
    holds: Annotated[list[Oid], msgspec.Meta(max_length=1024)] = []


class StealReply(msgspec.Struct, tag=7, array_like=True):
    reservations: Annotated[list[ResRef], msgspec.Meta(max_length=1024)]


class Moved(msgspec.Struct, tag=9, array_like=True):
    """Worker -> owner: these of your reservations ((batch, hint) each) are now queued at
    ``thief`` (a steal took them), so that losing the thief writes them off. An older
    peer drops it (an unknown tag: ``rejected``) and learns as before: when a reprobe
    after ``probe_timeout_s`` finds them lost."""

    thief: NodeName
    reservations: Annotated[list[tuple[Count, TaskId]], msgspec.Meta(max_length=1024)]


class Declined(msgspec.Struct, tag=10, array_like=True):
    """Worker -> owner: the grant of (``task_id``, ``attempt``) came after its ask had
    timed out and the slot went to other work: it does not run here, place it again. An
    older peer drops it (an unknown tag) and re-places after ``run_timeout_s`` as
    before."""

    task_id: TaskId
    attempt: Count


SchedulingMessage = (Reserve | GetTask | Grant | NoTask | Result | Steal | StealReply
                     | Running | Moved | Declined)

_codec: VersionedCodec[SchedulingMessage] = VersionedCodec("scheduling", SCHEDULING_PROTOCOL_VERSION, SchedulingMessage)


def encode_message(msg: SchedulingMessage) -> bytes:
    """``[version, message]`` as MessagePack."""
    return _codec.encode(msg)


def decode_message(data: bytes, max_size: int) -> SchedulingMessage:
    """Parse one message or raise ``WireError`` (oversized, malformed, version)."""
    return _codec.decode(data, max_size)


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class _Task:
    """A task this node owns and has no result for."""

    spec: TaskSpec
    batch: int
    order: int
    holders: frozenset[str]
    """Nodes holding the most input bytes (empty: no inputs, or not data mode)."""
    node: str | None = None
    """Bound to (None: waiting for a worker)."""
    attempt: int = 0
    placements: int = 0
    probes: set[str] = field(default_factory=set)
    probed_at: float = 0.0
    local_until: float = float("-inf")
    bound_at: float = 0.0
    demand: Resources | None = None
    rules: list[_Filter] | None = None
    """``_filters(spec)``, built once: every ask re-checks the rules (hot path)."""
    submitted: Residency | None = None
    """The task's rule as submitted; ``spec.residency`` is it narrowed by the current
    policies of ``classes`` (``core.policy.placement_residency``)."""
    classes: tuple[str, ...] = ()
    """The data classes the task carries: its own and its inputs'."""
    stopped_on: set[str] | None = None
    """Nodes this owner stopped the task on (``TaskStopped``): their results are
    dropped."""
    ran_in: dict[str, str] | None = None
    """Node -> region of every binding of a task with a rule (``outcome_refusal``)."""

    def allowed_on(self, node: NodeState) -> bool:
        if self.rules is None:
            self.rules = _filters(self.spec)
        return all(pred(node) for _, _, pred in self.rules)


@dataclass(slots=True)
class _Reservation:
    owner: str
    batch: int
    hint: str
    demand: Resources
    inputs: list[str]
    expires: float
    stolen: bool = False
    submitter: str = ""


@dataclass(slots=True)
class _Ask:
    res: _Reservation
    deadline: float


def _holders(task: TaskSpec, view: Mapping[str, NodeState]) -> frozenset[str]:
    """Nodes of ``view`` holding the most input bytes of a ``data``-mode task (empty when
    no node holds any, or in another mode: there the data does not choose the node)."""
    if not isinstance(task.placement, DataLocal) or not task.inputs:
        return frozenset()
    held = {n: local_bytes(task, n) for n in view}
    most = max(held.values(), default=0)
    if most <= 0:
        # Zero-byte inputs still say where the data is: count objects instead.
        held = {n: sum(1 for i in task.inputs if n in i.holders) for n in view}
        most = max(held.values(), default=0)
        if most <= 0:
            return frozenset()
    return frozenset(n for n, b in held.items() if b == most)


def _weighted_sample(
    scored: Sequence[tuple[float, str]], k: int, temperature: float, rng: random.Random
) -> list[str]:
    """Draw ``k`` distinct names (all when fewer) from ``scored`` (cost, name), sorted by
    cost, each with weight ``exp(-(cost - best) / temperature)``."""
    if not scored:
        return []
    best = scored[0][0]
    items = [(math.exp(-min(700.0, (c - best) / temperature)), n) for c, n in scored]
    picks: list[str] = []
    while items and len(picks) < k:
        total = sum(w for w, _ in items)
        r = rng.random() * total
        idx = len(items) - 1
        for i, (w, _) in enumerate(items):
            r -= w
            if r < 0:
                idx = i
                break
        picks.append(items.pop(idx)[1])
    return picks


# --------------------------------------------------------------------------- scheduler


class Scheduler:
    """One node's scheduling decisions, as owner and as worker. See the module docstring."""

    def __init__(
        self,
        name: str,
        capacity: Resources,
        *,
        config: SchedulingConfig | None = None,
        rng: random.Random,
        now: float,
    ) -> None:
        self.name = name
        self.capacity = capacity
        self.config = config or SchedulingConfig()
        self.rng = rng
        self.stats: dict[str, int] = {}
        self._outputs: list[SchedulingOutput] = []
        self._view: dict[str, NodeState] = {}
        self._held: set[str] = set()
        self._policies: dict[str, ClassPolicy] = {}
        """Class policies as the driver last gave them (``set_policies``)."""
        # owner side
        self._tasks: dict[str, _Task] = {}
        self._batches: dict[int, list[str]] = {}
        self._data_batches: set[int] = set()
        """Batches with a task that has inputs: only there can a later task beat an
        earlier one for an asking node (``_on_get``'s key is local bytes, then order)."""
        self._batch_seq = 0
        self._order = 0
        self._done: OrderedDict[str, None] = OrderedDict()
        self._probes_on: dict[str, int] = {}
        self._bound_on: dict[str, int] = {}
        self._asked_at: dict[str, float] = {}
        """When each node last asked this owner for a task (``GetTask``)."""
        self._unreachable: dict[str, float] = {}
        """Nodes the driver could not reach (``runner_unreachable``) -> until when they
        get no reservations from this owner."""
        self._boots: dict[str, str] = {}
        """The boot each node in the view last sent (``peer_boot``)."""
        self._fixed: _FixedMemo = {}
        """``_fixed_terms`` already computed on this view (``_fixed_for``)."""
        # worker side
        self._queue: deque[_Reservation] = deque()
        self._queue_min_cpus = math.inf
        """A lower bound of the cpus of every queued reservation (inf: queue empty)."""
        self._asks: dict[int, _Ask] = {}
        self._ask_seq = 0
        self._running: dict[tuple[str, str, int], tuple[Resources, str]] = {}
        """(owner, task id, attempt) -> (demand, submitter) of what runs here."""
        self._running_since: dict[tuple[str, str, int], float] = {}
        """(owner, task id, attempt) -> when it was granted here (for ``Running``)."""
        self._reporting: set[tuple[str, str, int]] = set()
        """(owner, task id, attempt) whose run is over (``run_ended``: its resources are
        free again) and whose ``Result`` waits for ``task_finished``. As many as runs
        that ended and are still reporting: at most what ran here at once, times the
        reports in flight."""
        self._next_beat = now + self.config.beat_s
        self._waiting: dict[str, int] = {}
        """Queued reservations per submitter (the fair share counts who waits)."""
        self._holding: dict[str, float] = {}
        """Cpus each submitter holds here: asks in flight plus running tasks."""
        self._free = capacity
        self._swept_at = now
        self._next_steal = now
        self._inbox: deque[tuple[str, SchedulingMessage]] = deque()
        self._delivering = False

    # ------------------------------------------------------------------ driver contract

    def drain(self) -> list[SchedulingOutput]:
        out = self._outputs
        self._outputs = []
        return out

    def quiet(self) -> bool:
        """Nothing for a sweep to act on: no task owned, no reservation queued, no ask,
        run or report here, no node marked unreachable, no message queued, and no other
        node in the view with work queued (to steal)."""
        if (self._tasks or self._queue or self._asks or self._running or self._running_since
                or self._reporting or self._unreachable or self._inbox):
            return False
        return not any(n.load.queued > 0 for n in self._view.values() if n.name != self.name)

    def next_deadline(self) -> float:
        """The next sweep: ``sweep_interval_s`` after the last one, or while ``quiet``
        up to ``quiet_sweep_max_s`` after it."""
        cfg = self.config
        if self._tasks or self._queue or self._running:
            # Not ``quiet`` (its first tests): ``loop_wait_s``'s busy answer, without its
            # bounds check (``SchedulingConfig`` checked them). Asked after every event.
            return self._swept_at + cfg.sweep_interval_s
        return self._swept_at + loop_wait_s(
            self._swept_at, idle=self.quiet(), interval_s=cfg.sweep_interval_s,
            idle_max_s=cfg.quiet_sweep_max_s)

    def on_timer(self, now: float) -> None:
        if now < self.next_deadline():
            return
        self._swept_at = now
        self._sweep_owner(now)
        self._sweep_worker(now)
        self._pump(now)
        self._maybe_steal(now)
        self._deliver(now)  # self-addressed reservations and requests queued above

    # ------------------------------------------------------------------ view

    def set_view(self, nodes: Iterable[NodeState], now: float) -> None:
        """The local view changed (live nodes with gossiped load; this node included).
        Nodes that left it are handled as by ``node_down``."""
        view = {n.name: n for n in nodes}
        gone = [n for n in self._view if n not in view]
        self._view = view
        self._fixed.clear()
        for name in gone:
            self._lost(name, now)

    def node_down(self, name: str, now: float) -> None:
        """Membership declared ``name`` dead: re-place its tasks, drop its reservations."""
        self._view.pop(name, None)
        self._lost(name, now)

    def runner_unreachable(self, name: str, now: float) -> int:
        """Evidence, ahead of membership's verdict, that node ``name`` is gone: the
        driver could not reach it (see the module docstring). Every task this owner bound
        to it is re-placed now (as after ``node_down``; retries count), its reservations
        there are written off, and it gets no new ones for ``lost_runner_hold_s`` unless
        a message from it arrives first. It stays in the view. Returns how many bound
        tasks were re-placed."""
        if name == self.name or name not in self._view:
            return 0
        self._unreachable[name] = now + self.config.lost_runner_hold_s
        self._count("runners_unreachable")
        moved = self._reassign(name, f"node {name} is unreachable", now)
        if moved:
            self._count("replaced_unreachable", moved)
        self._deliver(now)
        return moved

    def peer_boot(self, name: str, boot: str, now: float) -> int:
        """Node ``name`` sent a message from the process started as ``boot`` (see the
        module docstring; call it before handing its message in). A boot other than the
        one it sent before means it restarted: every task this owner bound to it is
        re-placed now (retries count). Returns how many were re-placed. An empty boot (a
        peer that does not send one) and a node outside the view are ignored."""
        if not boot or name == self.name or name not in self._view:
            return 0
        old = self._boots.get(name)
        self._boots[name] = boot
        if old is None or old == boot:
            return 0
        self._count("runners_restarted")
        self._unreachable.pop(name, None)
        moved = self._reassign(name, f"node {name} restarted", now)
        if moved:
            self._count("replaced_restarted", moved)
        self._deliver(now)
        return moved

    def runs_on(self, name: str) -> int:
        """Tasks this owner has bound to ``name`` and no result for (the driver watches
        the connections of those nodes: ``runner_unreachable``)."""
        return self._bound_on.get(name, 0)

    def waits_on(self, name: str) -> int:
        """Tasks this owner has bound to ``name`` or has a reservation of queued there
        (its own or moved there by a steal): what losing ``name`` would hold up. A driver
        that sees a connection to ``name`` break checks the node when this is not 0."""
        return self._bound_on.get(name, 0) + self._probes_on.get(name, 0)

    def unreachable(self, now: float) -> list[str]:
        """Nodes kept out of placement after ``runner_unreachable`` (sorted)."""
        return sorted(n for n, until in self._unreachable.items() if until > now)

    def objects_held(self, oids: Iterable[str]) -> None:
        """The objects this node stores (named in steal requests)."""
        self._held = set(oids)

    def view(self) -> list[NodeState]:
        return [self._view[k] for k in sorted(self._view)]

    def classes(self) -> list[str]:
        """The data classes the pending tasks carry (whose policies the driver feeds in
        with ``set_policies``)."""
        return sorted({c for t in self._tasks.values() for c in t.classes})

    def set_policies(self, policies: Mapping[str, ClassPolicy], now: float) -> None:
        """The owner's current view of the class policies of ``classes()`` (a class left
        out keeps the policy last given). Every pending task's rule is narrowed at once to
        its submitted rule within its classes' current rules (never widened); one with no
        region left fails naming the rule. A running one whose node's region the narrowed
        rule leaves out is stopped there (``TaskStopped``) and placed again inside it
        (retries count); one left no region at all is stopped and fails."""
        self._policies.update(policies)
        carried = set(self.classes()) | set(policies)  # given before a submit: kept
        for name in [c for c in self._policies if c not in carried]:
            del self._policies[name]
        for tid in sorted(self._tasks, key=lambda k: self._tasks[k].order):
            t = self._tasks.get(tid)
            if t is not None and t.classes and t.node is None:
                self._narrow(t)
            elif t is not None and t.classes:
                self._recheck_running(t, now)
        self._deliver(now)

    def _recheck_running(self, t: _Task, now: float) -> None:
        """Running ``t`` under its classes' current rules: stopped where they no longer
        allow its node's region (see ``set_policies``)."""
        node = t.node
        assert node is not None
        try:
            self._renarrow(t)
        except PolicyError as exc:
            reason = f"{exc.rule}: task {t.spec.task_id!r}: {exc}"
            self._stop(t, node, reason)
            self._count("place_refused." + exc.rule)
            self._fail(t, reason)
            return
        state = self._view.get(node)
        res = t.spec.residency
        if state is None or res is None or res.allows(state.region):
            return
        reason = (f"residency: task {t.spec.task_id!r} was running on {node} in region "
                  f"{state.region}, which its classes' current rule {res.describe()} leaves "
                  "out")
        self._stop(t, node, reason)
        self._replace(t, reason, now)

    def _stop(self, t: _Task, node: str, reason: str) -> None:
        if t.stopped_on is None:
            t.stopped_on = set()
        t.stopped_on.add(node)
        self._count("policy_stopped")
        self._outputs.append(TaskStopped(t.spec.task_id, node, reason))

    # ------------------------------------------------------------------ owner

    def submit(self, tasks: Sequence[TaskSpec], now: float) -> int:
        """Accept ``tasks`` as one batch, or refuse all of them.

        Raises ``SchedulingError`` (the first task no node may run, with the rule),
        ``ValueError`` (empty or oversized batch, a task id already pending or repeated),
        ``SchedulingOverloaded``. Returns the batch id; ``TaskBound`` and then
        ``TaskFinished`` (or ``TaskFailed``) follow for each task.
        """
        if not tasks:
            raise ValueError("submit needs at least one task")
        if len(tasks) > self.config.max_batch:
            raise ValueError(f"{len(tasks)} tasks in one batch (max_batch="
                             f"{self.config.max_batch})")
        ids = [t.task_id for t in tasks]
        if len(set(ids)) != len(ids):
            raise ValueError("a task id appears twice in the batch")
        for tid in ids:
            if tid in self._tasks:
                raise ValueError(f"task {tid!r} is already pending")
        if len(self._tasks) + len(tasks) > self.config.max_pending_tasks:
            self._count("submits_refused.overloaded")
            raise SchedulingOverloaded(
                f"{len(self._tasks)} tasks pending (max_pending_tasks="
                f"{self.config.max_pending_tasks})")
        view = self._view.values()
        first: dict[str, list[NodeState]] = {}
        by_shape: dict[object, list[NodeState]] = {}
        for t in tasks:
            # Tasks alike in every rule ``feasible`` checks (no inputs, same residency,
            # mode, labels and demand: a map's) have the same feasible set on one view.
            shape = _shape(t)
            known = by_shape.get(shape) if shape is not None else None
            if known is not None:
                first[t.task_id] = known
                continue
            try:
                first[t.task_id] = feasible(t, view)
            except SchedulingError as exc:
                self._count("submits_refused." + exc.rule)
                raise
            if shape is not None:
                by_shape[shape] = first[t.task_id]
        self._batch_seq += 1
        batch = self._batch_seq
        self._batches[batch] = list(ids)
        if any(t.inputs for t in tasks):
            self._data_batches.add(batch)
        for t in tasks:
            self._order += 1
            self._tasks[t.task_id] = _Task(t, batch, self._order, _holders(t, self._view),
                                           submitted=t.residency, classes=task_classes(t))
            self._count("tasks_submitted")
        for tid in ids:
            # The feasible set just checked is the first placement's (same view, same
            # rule): not computed twice.
            self._place(self._tasks[tid], now, first.get(tid))
        self._deliver(now)
        return batch

    def pending(self) -> list[str]:
        return sorted(self._tasks)

    def owner_state(self, task_id: str) -> tuple[str | None, int] | None:
        """(bound node or None, attempt) of a pending task."""
        t = self._tasks.get(task_id)
        return None if t is None else (t.node, t.attempt)

    # ------------------------------------------------------------------ worker

    def run_ended(self, owner: str, task_id: str, attempt: int, now: float) -> None:
        """The driver's run of a ``RunTask`` is over, and its outcome is on its way to the
        owner (which must have it before the ``Result``): free the run's resources now,
        so the next reservation's ``GetTask`` travels while the outcome does instead of
        after it (one round trip less per task on a busy slot). ``task_finished`` must
        follow (it sends the ``Result``); until then the run still sends ``Running``
        beats, and a second grant of the same attempt is refused."""
        key = (owner, task_id, attempt)
        run = self._running.pop(key, None)
        if run is None:
            return  # not ours (a previous incarnation's), or ended twice
        demand, submitter = run
        self._unhold(submitter, demand)
        self._free = self._free.plus(demand)
        assert self._free.fits_in(self.capacity)
        self._reporting.add(key)
        self._pump(now)
        self._deliver(now)

    def task_finished(
        self, owner: str, task_id: str, attempt: int, ok: bool, detail: str, now: float
    ) -> None:
        """The driver finished running a ``RunTask``: report it to its owner, free slots
        (unless ``run_ended`` already did)."""
        key = (owner, task_id, attempt)
        run = self._running.pop(key, None)
        self._running_since.pop(key, None)
        if run is not None:
            demand, submitter = run
            self._unhold(submitter, demand)
            self._free = self._free.plus(demand)
            assert self._free.fits_in(self.capacity)
        elif key in self._reporting:
            self._reporting.discard(key)
        else:
            return  # not ours (a previous incarnation's), or reported twice
        self._count("tasks_run")
        self._send(owner, Result(task_id, attempt, ok, detail[:4096]))
        self._pump(now)
        self._deliver(now)

    def load(self) -> Load:
        """This node's load summary, for gossip."""
        return Load(len(self._running), len(self._queue), self._free.cpus)

    def running(self) -> list[tuple[str, str, int]]:
        return sorted(self._running)

    def has_work(self) -> bool:
        """Whether this node owns tasks without a result or runs (or reports) any: O(1),
        for a driver that asks on every event."""
        return bool(self._tasks or self._running or self._reporting)

    def idle(self, now: float) -> None:
        """Try to steal now if idle (otherwise the sweep tries every ``steal_interval_s``)."""
        self._next_steal = now
        self._maybe_steal(now)
        self._deliver(now)

    # ------------------------------------------------------------------ messages

    def handle_message(self, src: str, payload: bytes, now: float) -> None:
        try:
            msg = decode_message(payload, self.config.max_message_bytes)
        except WireError as exc:
            self._count("rejected." + exc.reason)
            return
        if self._unreachable and self._unreachable.pop(src, None) is not None:
            self._count("unreachable_cleared")  # it speaks: it is alive after all
        self._inbox.append((src, msg))
        self._deliver(now)

    def _deliver(self, now: float) -> None:
        """Process queued messages, self-addressed ones included, without recursion."""
        if self._delivering:
            return
        self._delivering = True
        try:
            while self._inbox:
                src, msg = self._inbox.popleft()
                self._dispatch(src, msg, now)
        finally:
            self._delivering = False

    def _dispatch(self, src: str, msg: SchedulingMessage, now: float) -> None:
        if isinstance(msg, Reserve):
            self._on_reserve(src, msg, now)
        elif isinstance(msg, GetTask):
            self._on_get(src, msg, now)
        elif isinstance(msg, Grant):
            self._on_grant(src, msg, now)
        elif isinstance(msg, NoTask):
            self._on_no_task(src, msg, now)
        elif isinstance(msg, Result):
            self._on_result(src, msg, now)
        elif isinstance(msg, Steal):
            self._on_steal(src, msg, now)
        elif isinstance(msg, Running):
            self._on_running(src, msg, now)
        elif isinstance(msg, Moved):
            self._on_moved(src, msg, now)
        elif isinstance(msg, Declined):
            self._on_declined(src, msg, now)
        else:
            self._on_steal_reply(src, msg, now)

    def _send(self, dst: str, msg: SchedulingMessage) -> None:
        if dst == self.name:
            self._inbox.append((dst, msg))
        else:
            self._outputs.append(SendMessage(dst, encode_message(msg)))

    # ------------------------------------------------------------------ owner internals

    def _origin(self, spec: TaskSpec) -> Coordinate | None:
        if isinstance(spec.placement, NearSource):
            src = self._view.get(spec.placement.source)
            if src is not None and src.coord is not None:
                return src.coord
        me = self._view.get(self.name)
        return None if me is None else me.coord

    def _fixed_for(self, spec: TaskSpec, n: NodeState, origin: Coordinate | None
                   ) -> tuple[float, float]:
        """``_fixed_terms(spec, n, origin)``. Without inputs the transfer and latency terms
        depend only on the node and ``origin``: the same for every task placed (or bound)
        on one view, so computed once per node and origin, not once per task."""
        if spec.inputs:
            return _fixed_terms(spec, n, origin)
        key = (n.name, origin)
        hit = self._fixed.get(key)
        if hit is not None and hit[0] is n:
            return hit[1]
        fixed = _fixed_terms(spec, n, origin)
        if len(self._fixed) >= MAX_FIXED_MEMO:
            self._fixed.clear()
        self._fixed[key] = (n, fixed)
        return fixed

    def _cost(self, spec: TaskSpec, n: NodeState, origin: Coordinate | None) -> float:
        """``score``'s total for ``spec`` on ``n`` as this owner places it. Another node
        is scored by its gossiped load plus the work this owner sent it that gossip may
        not show yet; this node by its own load as it is now (``load()``:
        what it runs, has asked for and has queued, exactly), with nothing added. Its
        entry in the view is a snapshot from the last view update, which can still show
        the run that has just ended, and the tasks this owner bound here stay counted
        until their ``Result``: either sent a lone task (the next one a caller submits
        after the last one's answer) to a remote node by way of reservations while this
        node's slot was free (issue #19)."""
        return self._scored(spec, (n,), origin)[0][0]

    def _scored(self, spec: TaskSpec, pool: Iterable[NodeState], origin: Coordinate | None
                ) -> list[tuple[float, str]]:
        """(``_cost``, name) of every node of ``pool``, cheapest first, in one loop (a
        placement scores every feasible node, once per task of a burst)."""
        cfg = self.config
        d = cfg.probes_per_task
        memo, bound_on, probes_on = self._fixed, self._bound_on, self._probes_on
        no_inputs = not spec.inputs
        out: list[tuple[float, str]] = []
        for n in pool:
            name = n.member.name
            hit = memo.get((name, origin)) if no_inputs else None
            fixed = (hit[1] if hit is not None and hit[0] is n
                     else self._fixed_for(spec, n, origin))
            if name == self.name:
                queue_s, energy_s = _load_terms(spec, n, self.load(), cfg, 0.0)
            else:
                # Work this owner sent it that gossip may not show yet.
                extra = bound_on.get(name, 0) + probes_on.get(name, 0) / d
                queue_s, energy_s = _load_terms(spec, n, n.load, cfg, extra)
            # ``score(...).total``, summed in its order (the same float).
            out.append((fixed[0] + fixed[1] + queue_s + energy_s, name))
        out.sort()
        return out

    def _renarrow(self, t: _Task) -> None:
        """``t.spec``'s rule from its submitted one and the current class policies;
        raises ``PolicyError`` when no region is left."""
        res = placement_residency(t.submitted, t.classes, self._policies)
        if res != t.spec.residency:
            t.spec = msgspec.structs.replace(t.spec, residency=res)
            t.rules = None
            self._count("policy_narrowed")

    def _narrow(self, t: _Task) -> bool:
        """``_renarrow`` an unbound task; False: it failed (no region left)."""
        if not t.classes:
            return True
        try:
            self._renarrow(t)
        except PolicyError as exc:
            self._count("place_refused." + exc.rule)
            self._fail(t, f"{exc.rule}: task {t.spec.task_id!r}: {exc}")
            return False
        return True

    def _place(self, t: _Task, now: float, checked: list[NodeState] | None = None) -> None:
        """Send ``probes_per_task`` reservations for unbound task ``t`` (its rule narrowed
        first to its classes' current policies). ``checked``: ``feasible`` of ``t`` on
        the current view, just computed by the caller (used only when no class may have
        narrowed the rule since)."""
        assert t.node is None
        cfg = self.config
        if not self._narrow(t):
            return
        try:
            nodes = (checked if checked is not None and not t.classes
                     else feasible(t.spec, self._view.values()))
        except SchedulingError as exc:
            t.placements += 1
            t.probed_at = now
            self._count("place_infeasible")
            if t.placements > cfg.max_retries + 1:
                self._fail(t, f"{exc.rule}: {exc}")
            return
        if self._unreachable:
            # Nodes the driver could not reach get no reservation while others may run
            # the task (when only they may, they are probed as usual: the timeouts or
            # membership's verdict settle it).
            reachable = [n for n in nodes if self._unreachable.get(n.name, -math.inf) <= now]
            if reachable:
                nodes = reachable
        active = [n for n in nodes if not n.standby]
        if t.placements == 0:
            t.holders = _holders(t.spec, self._view)
            if any(n.name in t.holders for n in active) and cfg.locality_wait_s > 0:
                t.local_until = now + cfg.locality_wait_s
        t.placements += 1
        restricted = now < t.local_until
        pool = [n for n in active if n.name in t.holders] if restricted else nodes
        if not pool:
            pool = nodes  # every holder left the view: go wide now
            t.local_until = float("-inf")
        origin = self._origin(t.spec)
        t.probed_at = now
        inputs = [i.oid for i in t.spec.inputs]
        keep = max(cfg.pool_size, cfg.probes_per_task)
        if len(pool) <= keep and self._may_bind_here(t):
            # Every cost is >= 0, so a cost of this node's within ``sample_temperature_s``
            # of zero is within it of the cheapest: ``_bind_here`` would take it, and the
            # other nodes need no score (the lone task's common case, issue #19).
            me = next((n for n in pool if n.name == self.name), None)
            if me is not None:
                mine = self._cost(t.spec, me, origin)
                if mine <= cfg.sample_temperature_s:
                    self._bind_here(t, [(mine, me.name)], inputs, now)
                    return
        scored = self._scored(t.spec, pool, origin)[:keep]
        if self._bind_here(t, scored, inputs, now):
            return
        picks = _weighted_sample(scored, cfg.probes_per_task, cfg.sample_temperature_s,
                                 self.rng)
        for name in picks:
            if name not in t.probes:
                t.probes.add(name)
                self._probes_on[name] = self._probes_on.get(name, 0) + 1
            self._count("probes_sent")
            self._send(name, Reserve(t.batch, t.spec.task_id, t.spec.demand, inputs,
                                     t.spec.submitter))

    def _bind_here(self, t: _Task, scored: Sequence[tuple[float, str]], inputs: list[str],
                   now: float) -> bool:
        """Bind ``t`` to this node at once, without reservations, when this node is one
        of the cheapest candidates (within ``sample_temperature_s`` of the best: a likely
        draw anyway) and, as a worker, has the resources free with nothing queued ahead.
        Probing would only add a round trip: the local reservation would win, and the
        remote one would come back as a wasted ``GetTask`` -> ``NoTask``. Queued
        reservations of other owners keep their turn (the queue must be empty)."""
        cfg = self.config
        if not scored or not self._may_bind_here(t):
            return False
        mine = next((c for c, n in scored if n == self.name), None)
        if mine is None or mine - scored[0][0] > cfg.sample_temperature_s:
            return False
        self._ask_seq += 1
        res = _Reservation(self.name, t.batch, t.spec.task_id, t.spec.demand, inputs,
                           now + cfg.reservation_ttl_s, submitter=t.spec.submitter)
        self._asks[self._ask_seq] = _Ask(res, now + cfg.ask_timeout_s)
        self._hold(res.submitter, res.demand)
        self._free = self._free.minus(t.spec.demand)
        self._count("bound_here")
        self._bind(t, self.name, self._ask_seq, False, now)
        return True

    def _may_bind_here(self, t: _Task) -> bool:
        """This node, as a worker, could run ``t`` now: nothing queued ahead, an ask
        free, the resources free."""
        return (not self._queue and len(self._asks) < self.config.max_concurrent_asks
                and t.spec.demand.fits_in(self._free))

    def _unprobe(self, t: _Task) -> None:
        for name in t.probes:
            self._count_unprobe(name)
        t.probes.clear()

    def _unprobe_one(self, t: _Task, name: str) -> None:
        """``t`` no longer holds a reservation on ``name``."""
        t.probes.discard(name)
        self._count_unprobe(name)

    def _count_unprobe(self, name: str) -> None:
        c = self._probes_on.get(name, 0) - 1
        if c > 0:
            self._probes_on[name] = c
        else:
            self._probes_on.pop(name, None)

    def _unbind(self, t: _Task) -> None:
        if t.node is not None:
            c = self._bound_on.get(t.node, 0) - 1
            if c > 0:
                self._bound_on[t.node] = c
            else:
                self._bound_on.pop(t.node, None)
            t.node = None

    def _eligible(self, t: _Task, worker: str, free: Resources, now: float) -> bool:
        if t.demand is None:
            t.demand = t.spec.demand
        if t.node is not None or not t.demand.fits_in(free):
            return False
        state = self._view.get(worker)
        if state is None or not t.allowed_on(state):
            return False
        return not (now < t.local_until and worker not in t.holders)

    def _on_get(self, src: str, msg: GetTask, now: float) -> None:
        self._asked_at[src] = now
        ids = self._batches.get(msg.batch)
        chosen: _Task | None = None
        unbound = False
        if ids:
            hinted = self._tasks.get(msg.hint)
            if (hinted is not None and hinted.batch == msg.batch
                    and self._eligible(hinted, src, msg.free, now)):
                chosen = hinted
            else:
                # ``ids`` is in submit order. Without inputs in the batch every key's
                # local bytes are 0, so the first eligible task is the best: stop there
                # (a full scan per ask made a long burst cost O(batch) per task).
                first_wins = msg.batch not in self._data_batches
                best: tuple[int, int] | None = None
                for tid in ids:
                    t = self._tasks.get(tid)
                    if t is None:
                        continue
                    unbound = unbound or t.node is None
                    if not self._eligible(t, src, msg.free, now):
                        continue
                    key = (-local_bytes(t.spec, src), t.order)
                    if best is None or key < best:
                        best, chosen = key, t
                        if first_wins:
                            break
        if chosen is None:
            self._count("no_task")
            self._send(src, NoTask(msg.ask, exhausted=not unbound))
            return
        self._bind(chosen, src, msg.ask, msg.stolen, now)

    def _bind(self, chosen: _Task, src: str, ask: int, stolen: bool, now: float) -> None:
        state = self._view[src]
        # The rules, built once per task (``allowed_on``), not once per binding.
        assert chosen.allowed_on(state), "binding would break a placement rule"
        self._unprobe(chosen)
        chosen.node = src
        chosen.attempt += 1
        chosen.bound_at = now
        if chosen.spec.residency is not None:
            if chosen.ran_in is None:
                chosen.ran_in = {}
            chosen.ran_in[src] = state.region
        self._bound_on[src] = self._bound_on.get(src, 0) + 1
        # ``score(...)`` with the fixed terms of this view's memo (the same floats).
        transfer_s, latency_s = self._fixed_for(chosen.spec, state, self._origin(chosen.spec))
        cost = CostBreakdown(transfer_s, latency_s,
                             *_load_terms(chosen.spec, state, state.load, self.config, 0.0))
        self._count("bound_stolen" if stolen else "bound")
        self._outputs.append(TaskBound(
            chosen.spec.task_id, src, state.region, chosen.attempt, cost,
            local_bytes(chosen.spec, src) > 0, now < chosen.local_until, stolen))
        self._send(src, Grant(ask, chosen.spec, chosen.attempt))

    def outcome_refusal(self, task_id: str, node: str, now: float) -> str | None:
        """Why an outcome of pending task ``task_id`` from ``node`` must be dropped (None:
        it may be taken): this owner stopped the task there, or ``node``'s region (as it
        was when the task was bound there) is outside the task's current rule. The second
        catches a run the owner had already given up on (re-placed after a lost runner
        that was only cut off) when the class narrowed: only the current binding is
        stopped then, and the old run's late result must not become the answer. The
        driver asks before taking a worker's outcome; ``Result`` messages are checked
        here. A refused node is recorded as stopped (``TaskStopped``: the driver kills
        the run there and audits it); if the task is bound there, it is placed again."""
        t = self._tasks.get(task_id)
        if t is None:
            return None
        if t.stopped_on is not None and node in t.stopped_on:
            return f"task {task_id!r} was stopped on {node}"
        res = t.spec.residency
        if res is None:
            return None
        region = (t.ran_in or {}).get(node)
        if region is None:
            state = self._view.get(node)
            region = None if state is None else state.region
        if region is None or res.allows(region):
            return None
        reason = (f"residency: task {task_id!r} ran on {node} in region {region}, which "
                  f"its classes' current rule {res.describe()} leaves out")
        self._stop(t, node, reason)
        if t.node == node:
            self._replace(t, reason, now)
        self._deliver(now)
        return reason

    def _on_result(self, src: str, msg: Result, now: float) -> None:
        if self.outcome_refusal(msg.task_id, src, now) is not None:
            self._count("results_dropped.stopped")  # ran where its class no longer allows
            return
        t = self._tasks.pop(msg.task_id, None)
        if t is None:
            self._count("results_duplicate" if msg.task_id in self._done else "results_unknown")
            return
        self._unprobe(t)
        self._unbind(t)
        self._forget(t)
        self._count("results")
        self._outputs.append(TaskFinished(msg.task_id, src, msg.attempt, msg.ok, msg.detail))

    def _on_declined(self, src: str, msg: Declined, now: float) -> None:
        """``src`` will not run the attempt bound to it (a late grant it had no room
        for): place the task again now, as after a lost binding (retries count)."""
        t = self._tasks.get(msg.task_id)
        if t is None or t.node != src or t.attempt != msg.attempt:
            self._count("declines_stale")
            return
        self._count("replaced_declined")
        self._replace(t, f"{src} declined attempt {msg.attempt} (its ask had timed out)", now)

    def _forget(self, t: _Task) -> None:
        ids = self._batches.get(t.batch)
        if ids is not None:
            ids.remove(t.spec.task_id)
            if not ids:
                del self._batches[t.batch]
                self._data_batches.discard(t.batch)
        self._done[t.spec.task_id] = None
        while len(self._done) > self.config.max_finished_remembered:
            self._done.popitem(last=False)

    def _fail(self, t: _Task, reason: str) -> None:
        self._tasks.pop(t.spec.task_id, None)
        self._unprobe(t)
        self._unbind(t)
        self._forget(t)
        self._count("tasks_failed")
        self._outputs.append(TaskFailed(t.spec.task_id, reason))

    def _replace(self, t: _Task, why: str, now: float) -> None:
        """``t``'s binding is lost: place it again, or fail it after ``max_retries``."""
        self._unbind(t)
        if t.attempt > self.config.max_retries:
            self._fail(t, f"{why}; gave up after {t.attempt} attempts")
            return
        self._count("replaced")
        self._place(t, now)

    def _reassign(self, name: str, why: str, now: float) -> int:
        """Owner side of losing ``name``: re-place the tasks bound to it, write off its
        reservations (a task left with none is placed again). Returns the re-placed."""
        moved = 0
        for tid in sorted(self._tasks, key=lambda k: self._tasks[k].order):
            t = self._tasks.get(tid)
            if t is None:
                continue
            if t.node == name:
                moved += 1
                self._replace(t, why, now)
            elif t.node is None and name in t.probes:
                self._unprobe_one(t, name)
                if not t.probes:
                    self._place(t, now)
        return moved

    def _lost(self, name: str, now: float) -> None:
        # owner side
        self._asked_at.pop(name, None)
        self._unreachable.pop(name, None)
        self._boots.pop(name, None)
        self._reassign(name, f"node {name} left the view", now)
        # worker side: the owner is gone; its tasks will be re-run by whoever takes over
        self._set_queue(r for r in self._queue if r.owner != name)
        for ask_id in [a for a, ask in self._asks.items() if ask.res.owner == name]:
            self._release(ask_id)
        self._pump(now)
        self._deliver(now)

    def _sweep_owner(self, now: float) -> None:
        cfg = self.config
        for name in [n for n, until in self._unreachable.items() if until <= now]:
            del self._unreachable[name]
        # Nodes that asked for work within probe_timeout_s, once per sweep (not per task:
        # the sweep walks every pending task, 4,096 of a map's window, four times a
        # second). ``_tasks`` is in submit order, which is ``order``.
        asking = frozenset(n for n, at in self._asked_at.items()
                           if now - at < cfg.probe_timeout_s)
        probe_s, ttl_s, run_s = (cfg.probe_timeout_s, cfg.reservation_ttl_s,
                                 cfg.run_timeout_s)
        tasks = self._tasks
        for tid, t in list(tasks.items()):
            if tasks.get(tid) is not t:
                continue  # ended (or failed) earlier in this sweep
            if t.node is None:
                # Its reservations look lost once ``probe_timeout_s`` passed since they
                # were sent, but not while a probed node still asks this owner for work:
                # its queue is working through our reservations, and late binding hands
                # any of them ``t`` in turn. Re-probing those (every sweep, for every task
                # of a long burst) made a 10,000-task submit flood the workers' queues
                # with duplicate reservations. Still re-probed after
                # ``reservation_ttl_s``, when the workers drop them anyway.
                waited = now - t.probed_at
                if waited >= probe_s and (waited >= ttl_s or t.probes.isdisjoint(asking)):
                    self._count("reprobed")
                    self._place(t, now)
            elif now - t.bound_at >= run_s:
                self._replace(t, f"no result from {t.node} within {run_s} s", now)

    # ------------------------------------------------------------------ worker internals

    def _on_reserve(self, src: str, msg: Reserve, now: float) -> None:
        if len(self._queue) >= self.config.max_reservations:
            self._count("reservations_dropped")
            return
        if not msg.demand.fits_in(self.capacity):
            self._count("reservations_unfit")
            return
        self._queue.append(_Reservation(src, msg.batch, msg.hint, msg.demand, list(msg.inputs),
                                        now + self.config.reservation_ttl_s,
                                        submitter=msg.submitter))
        self._wait(msg.submitter, 1)
        self._queue_min_cpus = min(self._queue_min_cpus, msg.demand.cpus)
        self._count("reservations")
        self._pump(now)

    def _pump(self, now: float) -> None:
        """Turn queued reservations into ``GetTask`` requests while resources are free.

        First fit (a big reservation does not block small ones), within each submitter's
        fair share (``_over_share``), but the scan stops once no queued reservation can
        fit the free cpus, or every one left belongs to a submitter at its share: with a
        long queue and no free slot an event costs O(1), not O(queue) (which made a long
        burst quadratic). Expired reservations met on the way are dropped; the sweep
        drops the rest."""
        cfg = self.config
        queue = self._queue
        if not queue:
            self._queue_min_cpus = math.inf
            return
        if (len(self._asks) >= cfg.max_concurrent_asks
                or self._free.cpus + 1e-9 < self._queue_min_cpus):
            # The loop below would not take one reservation (its own test): no slot, or
            # no ask left. Most calls (every message and run end of a busy worker with a
            # long queue) end here, without building the per-submitter counts.
            return
        skipped: list[_Reservation] = []
        left = dict(self._waiting)  # per submitter, queued and not scanned yet
        full = self._full()
        open_left = sum(n for s, n in left.items() if s not in full)
        while (queue and open_left > 0 and len(self._asks) < cfg.max_concurrent_asks
               and self._free.cpus + 1e-9 >= self._queue_min_cpus):
            res = queue.popleft()
            who = res.submitter
            left[who] -= 1
            if who not in full:
                open_left -= 1
            if res.expires <= now:
                self._count("reservations_expired")
                self._wait(who, -1)
            elif not res.demand.fits_in(self._free):
                skipped.append(res)
                continue
            elif self._over_share(who, res.demand):
                self._count("held_for_share")
                skipped.append(res)
                continue
            else:
                self._ask_seq += 1
                self._asks[self._ask_seq] = _Ask(res, now + cfg.ask_timeout_s)
                self._free = self._free.minus(res.demand)
                self._wait(who, -1)
                self._hold(who, res.demand)
                self._send(res.owner, GetTask(self._ask_seq, res.batch, res.hint, res.demand,
                                              res.stolen))
            # Who waits and who holds what changed: so may who is at its share.
            full = self._full()
            open_left = sum(n for s, n in left.items() if s not in full)
        if not queue:  # scanned to the end: the bound is exact again
            self._queue_min_cpus = min((r.demand.cpus for r in skipped), default=math.inf)
        queue.extendleft(reversed(skipped))

    # The fair share (see the module docstring). Sums of cpus are floats: 1e-9 of slack.

    def _share(self) -> float | None:
        """Cpus one submitter may hold while others wait; None while at most one waits."""
        waiting = len(self._waiting)
        if waiting < 2:
            return None
        return max(1.0, self.capacity.cpus / waiting)

    def _over_share(self, submitter: str, demand: Resources) -> bool:
        share = self._share()
        held = self._holding.get(submitter, 0.0)
        return share is not None and held > 1e-9 and held + demand.cpus > share + 1e-9

    def _full(self) -> frozenset[str]:
        """Waiting submitters at (or over) their share: none of their reservations may go."""
        share = self._share()
        if share is None:
            return frozenset()
        return frozenset(s for s in self._waiting
                         if self._holding.get(s, 0.0) + 1e-9 >= share)

    def _wait(self, submitter: str, n: int) -> None:
        count = self._waiting.get(submitter, 0) + n
        assert count >= 0, "more reservations left the queue than entered it"
        if count:
            self._waiting[submitter] = count
        else:
            self._waiting.pop(submitter, None)

    def _set_queue(self, reservations: Iterable[_Reservation]) -> None:
        self._queue = deque(reservations)
        waiting: dict[str, int] = {}
        for r in self._queue:
            waiting[r.submitter] = waiting.get(r.submitter, 0) + 1
        self._waiting = waiting

    def _hold(self, submitter: str, demand: Resources) -> None:
        self._holding[submitter] = self._holding.get(submitter, 0.0) + demand.cpus

    def _unhold(self, submitter: str, demand: Resources) -> None:
        held = self._holding.get(submitter, 0.0) - demand.cpus
        assert held > -1e-6, "a submitter gave back more than it held"
        if held > 1e-9:
            self._holding[submitter] = held
        else:
            self._holding.pop(submitter, None)

    def _release(self, ask_id: int) -> _Ask | None:
        ask = self._asks.pop(ask_id, None)
        if ask is not None:
            self._free = self._free.plus(ask.res.demand)
            self._unhold(ask.res.submitter, ask.res.demand)
            assert self._free.fits_in(self.capacity)
        return ask

    def _on_grant(self, src: str, msg: Grant, now: float) -> None:
        ask = self._release(msg.ask)
        if ask is None or ask.res.owner != src:
            # Timed out meanwhile: run it anyway if it fits (the owner counts on us; a
            # duplicate run is harmless); if not, it is declined below.
            self._count("grants_late")
        demand = msg.task.demand
        key = (src, msg.task.task_id, msg.attempt)
        if not demand.fits_in(self._free) or key in self._running or key in self._reporting:
            self._count("grants_refused")
            if key not in self._running and key not in self._reporting:
                # It does not fit (a late grant: the slot went to other work): say so,
                # or the owner waits run_timeout_s for a run that never starts.
                self._count("grants_declined")
                self._send(src, Declined(msg.task.task_id, msg.attempt))
            self._pump(now)
            return
        self._free = self._free.minus(demand)
        self._running[key] = (demand, msg.task.submitter)
        self._running_since[key] = now
        self._hold(msg.task.submitter, demand)
        self._outputs.append(RunTask(src, msg.task, msg.attempt))
        self._pump(now)

    def _on_no_task(self, src: str, msg: NoTask, now: float) -> None:
        ask = self._release(msg.ask)
        if msg.exhausted and ask is not None and ask.res.owner == src:
            # Nothing of that batch is left to bind: its other reservations here would
            # each cost a GetTask -> NoTask round trip (about one per task in a burst).
            batch = ask.res.batch
            before = len(self._queue)
            self._set_queue(r for r in self._queue
                            if not (r.owner == src and r.batch == batch))
            if len(self._queue) < before:
                self._count("reservations_cancelled", before - len(self._queue))
        self._pump(now)

    def _sweep_worker(self, now: float) -> None:
        for ask_id in [a for a, ask in self._asks.items() if ask.deadline <= now]:
            self._release(ask_id)
            self._count("asks_timed_out")
        if self._queue and self._queue[0].expires <= now:
            self._set_queue(r for r in self._queue if r.expires > now)
        if now >= self._next_beat:
            self._next_beat = now + self.config.beat_s
            self._beat(now)

    def _beat(self, now: float) -> None:
        """``Running`` to each owner in the view, for its tasks that have run ``beat_s``
        here (shorter ones are still inside their binding's first ``run_timeout_s``; an
        owner out of the view has none: whoever takes its tasks over runs them again)."""
        by_owner: dict[str, list[tuple[str, int]]] = {}
        for (owner, tid, attempt), since in sorted(self._running_since.items()):
            if now - since >= self.config.beat_s and owner in self._view:
                by_owner.setdefault(owner, []).append((tid, attempt))
        for owner, pairs in by_owner.items():
            for i in range(0, len(pairs), MAX_RUNNING_BEAT):
                self._count("running_beats_sent")
                self._send(owner, Running(pairs[i:i + MAX_RUNNING_BEAT]))

    def _on_running(self, src: str, msg: Running, now: float) -> None:
        # owner side: a beat restarts the binding's run_timeout_s, only from the node
        # and attempt it is bound to (a stale run elsewhere does not keep it).
        for tid, attempt in msg.tasks:
            t = self._tasks.get(tid)
            if t is not None and t.node == src and t.attempt == attempt:
                t.bound_at = now
                self._count("running_beats")
            else:
                self._count("running_beats_stale")

    def _maybe_steal(self, now: float) -> None:
        cfg = self.config
        if (now < self._next_steal or self._queue or self._asks or cfg.max_steal == 0
                or self._free.cpus < 1.0 - 1e-9):
            return
        me = self._view.get(self.name)
        if me is not None and me.standby:
            # Draining or asleep (core/capacity.py): it takes no new work of its own
            # accord; the consolidation plan or a placement that pays the wake cost does.
            return
        self._next_steal = now + cfg.steal_interval_s
        victims = [(n.load.queued, n.name) for n in self._view.values()
                   if n.name != self.name and n.load.queued > 0]
        if not victims:
            return
        victims.sort(key=lambda v: v[1])
        total = sum(q for q, _ in victims)
        r = self.rng.random() * total
        victim = victims[-1][1]
        for q, name in victims:
            r -= q
            if r < 0:
                victim = name
                break
        hint = sorted(self._held)[: cfg.max_steal_hint]
        self._count("steal_requests")
        self._send(victim, Steal(self._free, hint))

    def _on_steal(self, src: str, msg: Steal, now: float) -> None:
        if not self._queue:
            self._send(src, StealReply([]))
            return
        holds = set(msg.holds)
        # Keep the head of the queue (next to run here); give from the tail, reservations
        # whose inputs the thief holds first.
        cands = list(enumerate(self._queue))[1:]
        cands.sort(key=lambda ir: (-len(holds.intersection(ir[1].inputs)), -ir[0]))
        give: list[int] = []
        room = msg.free
        for i, res in cands:
            if len(give) >= self.config.max_steal:
                break
            if res.demand.fits_in(room):
                give.append(i)
                room = room.minus(res.demand)
        given = set(give)
        out = [ResRef(r.owner, r.batch, r.hint, r.demand, r.inputs, r.submitter)
               for i, r in enumerate(self._queue) if i in given]
        self._set_queue(r for i, r in enumerate(self._queue) if i not in given)
        if out:
            self._count("reservations_given", len(out))
        else:
            self._count("steal_empty")
        self._send(src, StealReply(out))
        moved: dict[str, list[tuple[int, str]]] = {}
        for ref in out:
            moved.setdefault(ref.owner, []).append((ref.batch, ref.hint))
        for owner, refs in moved.items():
            self._send(owner, Moved(src, refs))

    def _on_moved(self, src: str, msg: Moved, now: float) -> None:
        """Owner side: reservations of ours that ``src`` held are at ``msg.thief`` now
        (see the module docstring). A task still unbound counts its probe there; one
        whose thief is already lost (out of the view, or unreachable) is placed again
        if no other reservation is left."""
        thief = msg.thief
        lost = thief not in self._view or self._unreachable.get(thief, -math.inf) > now
        for batch, hint in msg.reservations:
            t = self._tasks.get(hint)
            if t is None or t.batch != batch or t.node is not None or src not in t.probes:
                continue
            self._unprobe_one(t, src)
            self._count("reservations_moved")
            if not lost and thief not in t.probes:
                t.probes.add(thief)
                self._probes_on[thief] = self._probes_on.get(thief, 0) + 1
            elif not t.probes:
                self._count("reservations_moved_lost")
                self._place(t, now)

    def _on_steal_reply(self, src: str, msg: StealReply, now: float) -> None:
        for ref in msg.reservations[: self.config.max_steal]:
            if len(self._queue) >= self.config.max_reservations:
                break
            if not ref.demand.fits_in(self.capacity):
                continue
            self._queue.appendleft(_Reservation(ref.owner, ref.batch, ref.hint, ref.demand,
                                                list(ref.inputs),
                                                now + self.config.reservation_ttl_s, True,
                                                ref.submitter))
            self._wait(ref.submitter, 1)
            self._queue_min_cpus = min(self._queue_min_cpus, ref.demand.cpus)
            self._count("reservations_stolen")
        self._pump(now)

    # ------------------------------------------------------------------ misc

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n
