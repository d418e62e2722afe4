"""Data-class policies under chaos: puts of classed objects, deletes, crashes, restarts,
pauses, partitions and policy changes (narrowing and widening a class's regions) over the
simulated data plane (``sim.dataplane.DataMesh``), checked by oracles at every step.

Policies and what a node knows of them. The truth is the latest version of each class's
policy the admin set. Each node has its own view (``DataNode.policies``, on its disk): a
change reaches a node ``uniform(0, refresh_s)`` after it was set, as the runtime's cache
refresh does (``policy_refresh_s``), if the node is up and can reach some node that
already knows it; else it is tried again every ``refresh_s`` (a crashed or cut-off node
hears when it is back). On hearing a change a node does what the runtime's
``policy.migrate_local`` does: each of its copies of the class whose rule the new regions
break gets the rule ``core.policy.migrated_regions`` decides, and is handed to its replica
manager again under it, so that the ordinary re-replication moves it.

Classed tasks. A task reads one or two live objects and may declare a class; it is
submitted to a random node, its owner, which resolves it as the runtime's owner does
(``runtime/compute.py`` ``_resolve_task``): the rules of its inputs from the first copy it
reaches (its ``obj.stat``), its declared class resolved from its own view
(``core.policy.resolve``), its result's rule ``core.policy.result_rule`` (the declared
class, else the strictest of its inputs' classes; carried to the runner in the task's
payload), the task's own rule the declared one or else the result's. It then submits it
to its own ``core.scheduling.Scheduler`` -- the scheduler the runtime drives -- which
every node runs beside its data plane (``_TaskNode``, driven by
``sim.compute.SchedulerHost`` as the task simulator's nodes are): reservations, grants and
results travel between the nodes' schedulers as simulated streams, its view is the
node's membership, and the node gives it the class policies it knows at submit and
whenever it hears a change (the runtime's ``_refresh_policies``). So every residency
decision is the scheduler's: each placement narrowed to the classes' current rules
(``placement_residency``), a running task whose class narrowed away from its runner
stopped there (``TaskStopped``: the owner kills it there, best effort) and placed again
inside the rule or failed naming the rule when no region is left, results from a
stopped runner dropped, lost runners re-placed, retries bounded. The runner holds a
task for ``task_s`` seconds; then it puts the result through the simulated put path as
an object of its class under that rule (one object per run), which the copy oracles
below then follow, and reports to the owner. An owner's crash loses its scheduler and
the tasks it owned (the runtime's takeover by another node is not modelled here:
``sim.compute`` tests it).

Classed streams. One topic per class; publishes enter at random nodes, about half of
them naming no class (the entry node takes the class of the topic's record,
``core.streams.publish_rule``). The entry node
resolves the topic's stream rule from its view (``Resolved.stream_residency``), refuses a
record its region may not take (``core.streams.check_source_allowed``), opens its shard
(``topic``, ``node~epoch``) and copies it to the backup ``core.streams.backup_for`` picks
from its view; the backup checks the rule it was sent and its own view of the class
(``copy_refusal(..., stream=True)``) and refuses, the source then passing to the next
(the runtime's ``_replicate`` / ``_rpc_replicate``). Every second a source re-places its
backup from its current view (a crashed backup, a changed rule), and every node holding a
copy of a shard whose source no longer serves it (crashed, restarted, or outside the
rule) makes the two copies ``core.streams.shard_copies`` wants from its view, each
receiver checking the rule, and drops its own when it is not one of them and both hold it
(``frozen_copy_targets``; the runtime's ``_keep_copies``). Shard logs are in
memory: a crash loses them. A node that hears a change drops its shard copies of the
class that the new rule forbids.

The oracles. A node's *current* rule for a class is the policy version in its view. The
state the oracles look at changes only when a copy is committed, when a node hears a
change, or as time passes; they are checked at each of these steps: on every
``ObjectCommitted`` (the copy made), right after a node applies a change, and on a scan of
every node's disk every ``scan_s`` of virtual time:

- ``commit``: a copy of a class is made only where the committing node's current rule and
  the copy's own rule allow its region (``copy_refusal`` finds nothing).
- ``stale rule``: every copy of a class a node holds (its disk, up or down) carries a rule
  no wider than the node's current rule for the class: a node that heard of a narrowing
  rewrote every copy the narrowing broke. A copy outside the region of the node's current
  rule is allowed only with a rule that excludes that region (marked to move: the replica
  manager hands it off and drops it once the new set holds it). A copy whose header named
  the class only (no regions of its own) is under the class's rule.
- ``end``: once faults stop, partitions heal, every node has heard every change and the
  repair bound has passed: every node's view is the truth, no up node holds a copy of a
  class outside the class's current regions, and no up node holds a deleted object.
- ``task placement`` / ``task run``: a task is bound (``TaskBound``) only on a node in
  the regions that the owner's current rules of every class it touches (declared,
  inputs') allow, and its own and its inputs' rules; a runner runs it (``RunTask``)
  only inside the rule it was granted under; on every scan, every run still sits
  inside the rules its placement went by. ``result rule``: an undeclared task's result
  is of a class and no wider than any of its classed inputs' rules as the owner knows
  them.
- ``task stop``: on every scan, no owner keeps a task bound to a runner that its
  current rules of the task's classes leave out (a narrowing it heard stopped it
  there); a task failed as it is stopped fails naming the rule (``residency: ...``);
  at the ``end`` every task stopped was placed again or ended. ``stopped result``: an
  owner never takes a result (``TaskFinished``) from a runner it stopped the task on.
- ``shard placement`` / ``backup placement`` / ``backup commit`` / ``scan``: a stream
  shard or backup copy sits only where the acting node's current stream rule of the
  topic's class (the source when it places, the receiver once it holds it, the holder on
  every scan) and the rule the copy came under allow; at the ``end`` no up node holds a
  shard copy outside its class's current regions.
- ``operator placement`` / ``scan``: an operator runner (started by a node's
  ``_reconcile``: ``core.streams.runners_wanted`` over its view, each operator's rule
  narrowed by its topic's class's current policy as the node knows it,
  ``core.streams.operator_now``) runs only where the running node's current rule of the
  topic's class and the rule the runner was placed under allow; checked when it starts,
  on every scan (a node re-reconciles on hearing a change, so a narrowing stops its
  runners outside the new rule at once, as a shard holder drops its copy), and at the
  ``end`` against the class's current regions.
- ``frozen copies``: at the ``end``, every shard whose source is gone and that a live
  node still holds is held by both copies ``core.streams.shard_copies`` wants from the
  end's view (the truth's rule), so a further failure of its holder would lose nothing.
- ``read``: a subscriber's fetch of a classed shard is served by its holder only when
  ``core.policy.read_refusal`` from the holder's view lets the subscriber's region read
  (pii and fin refuse cross-region reads).
- ``audit``: each node records what it did (copy made, copy dropped, refusal, policy
  change) in a hash-chained log (``core.audit``) kept on its disk; every chain verifies at
  the end.

``break_`` breaks one decision, to show that the oracles can fail: ``receiver`` (receivers
skip ``copy_refusal``), ``stale_rule`` (receivers keep a copy under the rule its sender
stated, which is wider than the class's when the sender has not heard of a narrowing) or
``migration`` (one node updates its view but leaves its copies' rules as they were), or
``fanout`` (what the runtime's ``policy set --migrate`` did before its members migrated
their own copies on a cache refresh: only the members the setting node reaches at that
moment rewrite their copies; a member down or cut off then hears of the policy later
through its cache refresh but never rewrites its copies), ``task_class`` (the owner
places a task without its own and its inputs' rules), ``task_stop``, ``replace_rule``
or ``stopped_result`` (a residency decision inside every node's ``Scheduler``: a
narrowing never stops a running task; placements keep the submitted rule, never
narrowed; results from stopped runners are taken), ``shard_class`` (a source takes
records and places their backup without the topic's rule) or ``backup_class`` (a source
picks and tells its backup without the topic's rule), ``operator`` (nodes place runners
under the rule an operator was registered with, never narrowed by its class's current
policy), ``read`` (holders serve subscribers without ``read_refusal``) or
``publish_record`` (a publish that names no class is taken without its topic record's
class, ``core.streams.publish_rule``) or ``output_class`` (operators' outputs published
without the operator's class, ``core.streams.output_rule``) or ``frozen_copies`` (no node
keeps a gone source's shard's copies: its backup stays its only copy).

Tasks and streams draw from a generator of their own (operators' subscribers' reads from
another), so the draws of the puts, deletes,
changes and faults of a seed are those they were before tasks and streams were added
(the trace differs: results are put, shards are audited).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

import msgspec

from meshscale.core.audit import (
    ZERO_HASH,
    AuditEntry,
    Kind,
    encode_entry,
    entry_hash,
    record_of,
    verify_records,
)
from meshscale.core.membership import MembershipConfig, NodeMeta
from meshscale.core.outputs import DrivenProtocol, Event
from meshscale.core.placement import Candidate, PlacementError, Residency
from meshscale.core.policy import (
    ClassPolicy,
    PolicyError,
    Rule,
    copy_refusal,
    detail_rule,
    make_policy,
    migrated_regions,
    read_refusal,
    resolve,
    result_rule,
)
from meshscale.core.replication import DropLocal, ObjectPolicy, ReplicationConfig
from meshscale.core.scheduling import (
    InputRef,
    InRegions,
    NodeState,
    Resources,
    RunTask,
    Scheduler,
    SchedulingConfig,
    SchedulingError,
    SchedulingOutput,
    SendMessage,
    TaskBound,
    TaskFailed,
    TaskFinished,
    TaskSpec,
    TaskStopped,
)
from meshscale.core.streams import (
    OperatorPlacement,
    ShardSource,
    backup_for,
    check_source_allowed,
    frozen_copy_targets,
    operator_classes,
    operator_now,
    output_rule,
    publish_rule,
    runners_wanted,
    shard_copies,
    shard_holder,
    shard_refusal,
    topic_rule,
)
from meshscale.sim.compute import SchedulerHost
from meshscale.sim.dataplane import _HDR, CopyRefused, DataMesh, DataNode, ObjectCommitted
from meshscale.sim.engine import NodeContext

__all__ = ["PolicyChaosReport", "policy_chaos_run", "verify_audit"]


def _delete(p: DrivenProtocol, oid: str, policy: ObjectPolicy, now: float,
            holders: tuple[str, ...]) -> None:
    assert isinstance(p, DataNode)
    p.delete(oid, policy, now, holders)

CLASSES = ("pii", "fin", "ops")
TOPICS = tuple(f"topic-{c}" for c in CLASSES)
OUTPUT_TOPIC = {t: f"{t}-out" for t in TOPICS}
"""Where each topic's operators write their outputs (a runner, when it starts)."""
TOPIC_CLASS = {**dict(zip(TOPICS, CLASSES, strict=True)),
               **{OUTPUT_TOPIC[t]: c for t, c in zip(TOPICS, CLASSES, strict=True)}}
"""A classed stream per class: its shards and backups live under the class's stream rule;
its operators' output topic is of the class too (``core.streams.output_rule``)."""


@dataclass
class _Task:
    """A classed task as its owner resolved it at submit (the runtime's
    ``_resolve_task``): what it reads, the class it declares, its result's rule and the
    rule it was submitted under; its owner's ``Scheduler`` places it from then on."""

    tid: str
    owner: str
    inputs: tuple[str, ...]
    declared: str | None
    owner_incarnation: int = -1
    out: Residency | None = None
    res: Residency | None = None
    in_rules: list[Residency | None] = field(default_factory=list)
    classes: frozenset[str] = frozenset()
    bound_rules: dict[str, list[Residency | None]] = field(default_factory=dict)
    """Runner -> the rules its latest placement there went by (the submitted rule, the
    inputs' rules, the owner's current rules of the task's classes when it bound)."""
    stopped: set[str] = field(default_factory=set)
    """Runners its owner stopped it on (``TaskStopped``)."""
    halted: set[str] = field(default_factory=set)
    """Runners it was stopped on and not bound to again since."""
    stopped_at: float | None = None
    rebound: bool = False
    """Bound (``TaskBound``) again since its latest stop."""
    outcome: str = ""
    """``done`` or ``failed`` once its owner ended it."""


TAG_SCHED = 9
"""Stream tag of scheduling messages between the nodes' ``Scheduler``s."""
TASK_CAPACITY = Resources(4.0, 16_000, 0)


def _encode_rule(res: Residency | None) -> bytes:
    """A task's result rule as its payload carries it to the runner (the runtime's
    ``_Payload.result_rule``)."""
    if res is None:
        return b""
    regions = None if res.regions is None else sorted(res.regions)
    return msgspec.msgpack.encode([regions, res.data_class])


def _decode_rule(payload: bytes) -> Residency | None:
    if not payload:
        return None
    regions, cls = msgspec.msgpack.decode(payload, type=tuple[list[str] | None, str | None])
    return Residency(None if regions is None else frozenset(regions), cls)


@dataclass
class _TaskHooks:
    """What the scenario tells the nodes' scheduler drivers (filled in by
    ``policy_chaos_run`` once its closures exist)."""

    seed: int
    config: SchedulingConfig
    duration: Callable[[str, RunTask, float], float] = lambda n, o, now: 1.0
    ended: Callable[[str, RunTask, float], tuple[bool, str]] = \
        lambda n, o, now: (True, "")
    is_up: Callable[[str], bool] = lambda n: True
    patch: Callable[[Scheduler], None] = lambda s: None


class _TaskNode(DataNode):
    """A ``DataNode`` that also drives a ``core.scheduling.Scheduler`` (through
    ``sim.compute.SchedulerHost``, as ``ComputeNode`` does): scheduling messages travel
    as streams tagged ``TAG_SCHED``, its view is its membership's live members, and
    what its scheduler outputs (``TaskBound``, ``RunTask``, ``TaskStopped``, ...) are
    events the scenario observes. Its messages carry its boot (its incarnation on disk),
    so a runner restarted under its owner's feet has its tasks re-placed
    (``Scheduler.peer_boot``). Its scheduler lives in memory: a crash loses it."""

    def __init__(self, ctx: NodeContext, meta: NodeMeta, hooks: _TaskHooks, *,
                 membership_config: MembershipConfig,
                 replication_config: ReplicationConfig, seeds: list[str],
                 spares: bool) -> None:
        self.host: SchedulerHost | None = None
        self.specs: dict[tuple[str, str, int], TaskSpec] = {}
        """(owner, task id, attempt) -> what runs here."""
        super().__init__(ctx, meta, membership_config=membership_config,
                         replication_config=replication_config, seeds=seeds, spares=spares)
        self.hooks = hooks
        sched = Scheduler(ctx.name, TASK_CAPACITY, config=hooks.config,
                          rng=random.Random(f"policy-chaos/scheduler/{hooks.seed}/"
                                            f"{ctx.name}/{ctx.restarts}"), now=ctx.now)
        hooks.patch(sched)
        self.host = SchedulerHost(
            sched, incarnation=int(self.disk["incarnation"]), send=lambda dst, payload: self._stream(dst, TAG_SCHED, payload, None),
            emit=self._emit, duration=self._duration, ended=self._ended)
        self._set_view(self._candidates(), ctx.now)
        self._settle(ctx.now)

    def _emit(self, o: SchedulingOutput, now: float) -> None:
        assert not isinstance(o, SendMessage)  # SchedulerHost sends those
        self._out.append(o)

    def _duration(self, o: RunTask, now: float) -> float:
        self.specs[(o.owner, o.task.task_id, o.attempt)] = o.task
        return self.hooks.duration(self.name, o, now)

    def _ended(self, owner: str, tid: str, attempt: int, now: float) -> tuple[bool, str]:
        spec = self.specs.pop((owner, tid, attempt), None)
        if spec is None:
            return True, ""
        return self.hooks.ended(self.name, RunTask(owner, spec, attempt), now)

    def kill(self, owner: str, tid: str, now: float) -> None:
        if self.host is not None and self.host.kill(owner, tid, now):
            for key in [k for k in self.specs if k[0] == owner and k[1] == tid]:
                del self.specs[key]
            self._settle(now)

    def handle_stream(self, src: str, payload: bytes, now: float) -> bytes | None:
        if len(payload) >= _HDR.size and payload[0] == TAG_SCHED:
            _, sid = _HDR.unpack_from(payload)
            if self.host is not None:
                self.host.handle_message(src, payload[_HDR.size:], now)
            self._settle(now)
            return _HDR.pack(TAG_SCHED, sid)
        return super().handle_stream(src, payload, now)

    def stream_failed(self, dst: str, now: float) -> None:
        super().stream_failed(dst, now)
        # As ComputeNode.runner_gone: a check of a crashed runner is refused.
        host = self.host
        if host is not None and host.sched.runs_on(dst) and not self.hooks.is_up(dst):
            host.sched.runner_unreachable(dst, now)
            host.settle(now)

    def next_deadline(self) -> float | None:
        d = super().next_deadline()
        if self.host is None:
            return d
        h = self.host.next_deadline()
        return h if d is None else min(d, h)

    def on_timer(self, now: float) -> None:
        d = super().next_deadline()
        if d is not None and d <= now:
            super().on_timer(now)
        if self.host is not None:
            self.host.on_timer(now)

    def _view_changed(self, view: list[Candidate], now: float) -> None:
        if self.host is not None:
            self._set_view(view, now)

    def _set_view(self, view: list[Candidate], now: float) -> None:
        assert self.host is not None
        self.host.sched.set_view([NodeState(member=c, capacity=TASK_CAPACITY) for c in view],
                                 now)

    def _settle(self, now: float) -> None:
        super()._settle(now)
        if self.host is not None:
            self.host.settle(now)


def _break_scheduler(break_: str | None) -> Callable[[Scheduler], None]:
    """Break one residency decision of every node's ``Scheduler`` (to show that the
    oracles catch it): ``task_stop`` (a narrowing never stops a running task),
    ``replace_rule`` (placements keep the task's submitted rule, never narrowed to its
    classes' current ones) or ``stopped_result`` (results from runners the owner stopped
    the task on are taken)."""

    def patch(s: Scheduler) -> None:
        if break_ == "task_stop":
            s.__dict__["_recheck_running"] = lambda t, now: None
        elif break_ == "replace_rule":
            s.__dict__["_renarrow"] = lambda t: None
        elif break_ == "stopped_result":
            # Every outcome is taken: from a runner stopped, or outside the current rule.
            s.__dict__["outcome_refusal"] = lambda task_id, node, now: None

    return patch


class _TaskMesh(DataMesh):
    """A ``DataMesh`` of ``_TaskNode``s."""

    def __init__(self, nodes: int, *, seed: int, hooks: _TaskHooks) -> None:
        self.hooks = hooks
        super().__init__(nodes, seed=seed)

    def _factory(self, ctx: NodeContext) -> DataNode:
        return _TaskNode(
            ctx, self.metas[ctx.name], self.hooks, membership_config=self.mconfig,
            replication_config=self.rconfig, seeds=self.names, spares=self.spares,
        )


@dataclass
class PolicyChaosReport:
    seed: int
    acked: int
    failed: int
    deleted: int
    changes: list[str]
    """The policy changes set: ``time class old -> new``."""
    faults: list[str]
    violations: list[str] = field(default_factory=list)
    """Every oracle breach (must be empty)."""
    audit_breaks: list[str] = field(default_factory=list)
    """Chains that did not verify (must be empty)."""
    refused: int = 0
    migrated: int = 0
    """Copies whose rule a node rewrote on hearing a change."""
    scans: int = 0
    commits_checked: int = 0
    audit_entries: int = 0
    tasks_placed: int = 0
    """Task bindings the owners' ``core.scheduling.Scheduler`` made (``TaskBound``:
    re-placements after a lost or stopped runner too)."""
    tasks_refused: int = 0
    """Submits refused (``Scheduler.submit``: no node may run it) and tasks whose
    result's class was ambiguous (``result_rule``)."""
    tasks_stopped: int = 0
    """Runs an owner's scheduler stopped because its view of a class narrowed away from
    the runner's region (``TaskStopped``)."""
    tasks_done: int = 0
    """Results owners took (``TaskFinished``)."""
    tasks_failed: int = 0
    """Tasks owners failed (``TaskFailed``: no region or node left, retries spent)."""
    results: int = 0
    """Task results put as classed objects under ``core.policy.result_rule``."""
    details: int = 0
    """Task details (what a task raised and printed: every other task raises) put as
    classed objects under ``core.policy.detail_rule``."""
    shards: int = 0
    """Stream shards opened at their source (a publish accepted)."""
    backups: int = 0
    """Shard backup copies made (first and re-placed)."""
    frozen_copies: int = 0
    """Copies made of gone sources' shards (``core.streams.shard_copies``)."""
    frozen_handed_over: int = 0
    """Copies of gone sources' shards dropped once the copies the rule wants held them."""
    stream_refused: int = 0
    """Publishes refused at the entry node and backups refused by their receiver."""
    shard_drops: int = 0
    """Shard copies a node dropped on hearing a change that no longer allows it."""
    outputs: int = 0
    """Operator runners' outputs published to their output topics."""
    bare_publishes: int = 0
    """Publishes that named no class (taken under their topic record's class)."""
    operators_placed: int = 0
    """Operator runners a node started (``core.streams.runners_wanted``)."""
    operators_stopped: int = 0
    """Runners a node stopped because its view no longer gives them to it (a narrowing,
    a node back, a source gone)."""
    reads_served: int = 0
    """Subscriber fetches of a classed shard a holder served."""
    reads_refused: int = 0
    """Subscriber fetches a holder refused (``core.policy.read_refusal``)."""
    trace_hash: str = ""

    def problems(self) -> list[str]:
        return self.violations + [f"audit: {b}" for b in self.audit_breaks]


def _regions_of(res: Residency | None) -> frozenset[str] | None:
    return None if res is None else res.regions


def _audit(node: DataNode, kind: Kind, subject: str, data_class: str | None,
           from_region: str, detail: str, now: float) -> None:
    """Append an entry to ``node``'s chain (kept on its disk: it outlives a crash)."""
    chain: list[bytes] = node.disk.setdefault("audit", [])
    prev = node.disk.get("audit_head", ZERO_HASH)
    entry = AuditEntry(len(chain) + 1, prev, kind, "", "node", subject[:256],
                       data_class or "", from_region, node.region,
                       node.hlc.now(now).encode(), now, detail[:256])
    enc = encode_entry(entry)
    chain.append(record_of(enc)[4:])
    node.disk["audit_head"] = entry_hash(enc)


def verify_audit(mesh: DataMesh) -> list[str]:
    """Every node's chain checked (``core.audit.verify_records``); the breaks found."""
    out = []
    for n in mesh.names:
        chain: list[bytes] = mesh.node(n).disk.get("audit", [])
        brk = verify_records(chain)
        if brk is not None:
            out.append(f"{n}: {brk.describe()}")
    return out


def policy_chaos_run(
    seed: int,
    *,
    nodes: int = 12,
    objects: int = 36,
    changes: int = 4,
    deletes: int = 4,
    fault_until: float = 60.0,
    repair_bound_s: float = 40.0,
    refresh_s: float = 3.0,
    scan_s: float = 0.25,
    tasks: int = 24,
    task_s: tuple[float, float] = (2.0, 12.0),
    publishes: int = 40,
    reads: int = 60,
    break_: str | None = None,
) -> PolicyChaosReport:
    """One randomized run (see the module docstring); the report lists every breach."""
    hooks = _TaskHooks(seed, SchedulingConfig(), patch=_break_scheduler(break_))
    mesh = _TaskMesh(nodes, seed=seed, hooks=hooks)
    sim = mesh.sim
    rng = random.Random(f"policy-chaos/{seed}")
    regions = sorted(mesh.topology.regions)
    region_of = {n: mesh.metas[n].region for n in mesh.names}
    truth: dict[str, ClassPolicy] = {}
    version: dict[str, int] = {}
    report = PolicyChaosReport(seed, 0, 0, 0, [], [])
    violations = report.violations
    migration_skipper = mesh.names[rng.randrange(nodes)] if break_ == "migration" else None
    reached: dict[tuple[str, int], set[str]] = {}
    """``fanout``: the nodes the admin's ``policy.migrate_local`` fan-out reached."""

    # Initial policies, known everywhere at the start.
    start_regions = [regions[:1], regions[:2], regions]
    for cls, regs in zip(CLASSES, start_regions, strict=True):
        # pii and fin refuse cross-region reads: their subscribers outside are refused.
        truth[cls] = make_policy(cls, regs, replicas=3, cross_region_reads=cls == "ops")
        version[cls] = 0
    for n in mesh.names:
        node = mesh.node(n)
        node.policies.update(truth)
        node.disk["policy_version"] = dict(version)
        if break_ == "receiver":
            node.check_residency = False
        elif break_ == "stale_rule":
            node.narrow_rules = False

    def view_version(n: str, cls: str) -> int:
        got: dict[str, int] = mesh.node(n).disk.get("policy_version", {})
        return got.get(cls, -1)

    # ------------------------------------------------------------ the oracles

    def check_copy(n: str, oid: str, when: str) -> None:
        node = mesh.node(n)
        stored = node.objects.get(oid)
        if stored is None or stored.policy.residency is None:
            return
        cls = stored.policy.residency.data_class
        known = node.policies.get(cls) if cls is not None else None
        if cls is None or known is None:
            return
        own = _regions_of(stored.policy.residency)
        if own is not None and not own <= frozenset(known.regions):
            violations.append(
                f"{sim.now:.3f} {when}: {n} holds {oid[:12]} of class {cls} under rule "
                f"{sorted(own)}, wider than its current rule "
                f"{list(known.regions)} (version {view_version(n, cls)})")
        elif region_of[n] not in known.regions and (own is None or region_of[n] in own):
            violations.append(
                f"{sim.now:.3f} {when}: {n} in {region_of[n]} keeps {oid[:12]} of class {cls} "
                f"as a replica, outside its current rule {list(known.regions)}")

    def scan() -> None:
        report.scans += 1
        for n in mesh.names:
            for oid in sorted(mesh.node(n).objects):
                check_copy(n, oid, "scan")
        for n in mesh.names:
            for (topic, _sid), res in sorted(shards[n].items()):
                check_shard(mesh.node(n), n, topic, res, "scan")
        check_tasks()
        for n in mesh.names:
            for (op, sid), rule in sorted(runners[n].items()):
                check_operator(mesh.node(n), op, sid, rule, "scan")

    def observe(t: float, n: str, ev: Event) -> None:
        node = mesh.node(n)
        if isinstance(ev, ObjectCommitted):
            report.commits_checked += 1
            stored = node.objects.get(ev.oid)
            if stored is not None:
                why = copy_refusal(node.region, stored.policy.residency, node.policies)
                if why is not None:
                    violations.append(f"{t:.3f} commit: {n} made a copy of {ev.oid[:12]} "
                                      f"outside its rule: {why}")
                check_copy(n, ev.oid, "commit")
                res = stored.policy.residency
                _audit(node, Kind.COPY_MADE, ev.oid, None if res is None else res.data_class,
                       "", "hinted" if ev.hint_for else "", t)
        elif isinstance(ev, DropLocal):
            _audit(node, Kind.COPY_DROPPED, ev.oid, None, "", "", t)
        elif isinstance(ev, CopyRefused):
            report.refused += 1
            _audit(node, Kind.REFUSAL, ev.oid, ev.data_class, region_of.get(ev.src, ""),
                   ev.reason, t)

    sim.observers.append(observe)

    # ------------------------------------------------------------ policy changes

    def apply(cls: str, ver: int, policy: ClassPolicy, p: DrivenProtocol, now: float) -> None:
        """What a node does on hearing a change: the runtime's ``policy.migrate_local``."""
        assert isinstance(p, DataNode)
        versions: dict[str, int] = p.disk.setdefault("policy_version", {})
        if versions.get(cls, -1) >= ver:
            return
        versions[cls] = ver
        p.policies[cls] = policy
        _audit(p, Kind.POLICY_CHANGE, cls, cls, "", f"heard {policy.describe()}", now)
        if p.name != migration_skipper and (break_ != "fanout"
                                            or p.name in reached.get((cls, ver), ())):
            for oid in sorted(p.objects):
                s = p.objects[oid]
                res = s.policy.residency
                if res is None or res.data_class != cls:
                    continue
                target = migrated_regions(res.regions, policy)
                if target is None:
                    continue
                s.policy = ObjectPolicy(s.policy.replicas, Residency(target, cls))
                report.migrated += 1
                p.replicas.object_removed(oid, now)
                p.replicas.object_added(oid, s.policy, s.hint_for, now, s.written)
            report.migrated += len(p.replicas.migrate_tombstones(policy))
        p._settle(now)
        tasks_heard(p, now)
        drop_shards(p, cls, now)
        reconcile(p, now)
        for oid in sorted(p.objects):
            check_copy(p.name, oid, "heard")

    def deliver(n: str, cls: str, ver: int) -> None:
        if view_version(n, cls) >= ver or version[cls] != ver:
            return  # heard, or superseded (the newer version's delivery carries on)
        knowers = [m for m in mesh.up() if view_version(m, cls) >= ver]
        if sim.is_up(n) and any(sim.connected(n, m) for m in knowers):
            sim.call(n, partial(apply, cls, ver, truth[cls]))
        sim.at(sim.now + refresh_s, partial(deliver, n, cls, ver))

    def change() -> None:
        # The admin's node must run the change now: a change asked of a paused node that
        # crashed before it resumed was never set (the client had no answer), and must
        # not count as the truth (swarm seed 1018236081 of the policy plane).
        up = [n for n in mesh.up() if not sim.is_paused(n)]
        if not up:
            return
        cls = CLASSES[rng.randrange(len(CLASSES))]
        old = truth[cls]
        cur = list(old.regions)
        if len(cur) > 1 and rng.random() < 0.6:
            new_regions = rng.sample(cur, rng.randint(1, len(cur) - 1))
        else:
            outside = [r for r in regions if r not in cur]
            if not outside:
                new_regions = rng.sample(cur, len(cur) - 1)
            else:
                new_regions = [*cur, outside[rng.randrange(len(outside))]]
        new = make_policy(cls, new_regions, replicas=old.replicas,
                          cross_region_reads=old.cross_region_reads)
        version[cls] += 1
        ver = version[cls]
        truth[cls] = new
        admin = up[rng.randrange(len(up))]
        report.changes.append(f"{sim.now:.1f} {cls} {list(old.regions)} -> "
                              f"{list(new.regions)} at {admin}")
        sim.call(admin, partial(apply, cls, ver, new))
        if break_ == "fanout":
            # The runtime today: the node that sets the policy asks the members it reaches
            # now to migrate; the others only ever refresh their view of the policy.
            reached[(cls, ver)] = {n for n in mesh.up() if sim.connected(admin, n)}
            for n in sorted(reached[(cls, ver)] - {admin}):
                sim.call(n, partial(apply, cls, ver, new))
        for n in mesh.names:
            if n != admin:
                sim.at(sim.now + rng.uniform(0.0, refresh_s), partial(deliver, n, cls, ver))

    # ------------------------------------------------------------ puts and deletes

    def put(i: int) -> None:
        up = mesh.up()
        if not up:
            return
        coord = up[rng.randrange(len(up))]
        cls = CLASSES[i % len(CLASSES)]
        if i % 2 == 0:
            # A header naming the class only: the receivers' own checks must hold it.
            res = Residency(None, cls)
        else:
            # A full rule, resolved from the coordinator's view of the class.
            known = mesh.node(coord).policies[cls]
            res = Residency(frozenset(known.regions), cls)
        mesh.put_async(coord, f"policy-object-{seed}-{i}".encode(), ObjectPolicy(3, res), 2)

    def delete() -> None:
        """A delete as the runtime's ``obj.delete`` runs it: the coordinator asks the
        members it reaches for their copies, takes the rule of the first holder's copy
        (its current rule, rewritten by a migration), and tells every holder at once."""
        up = mesh.up()
        live = [oid for oid in sorted(mesh.live()) if oid not in mesh.delete_requests]
        if not up or not live:
            return
        coord = up[rng.randrange(len(up))]
        oid = live[rng.randrange(len(live))]
        held = [n for n in up if sim.connected(coord, n) and oid in mesh.node(n).objects]
        if not held:
            return
        policy = mesh.node(held[0]).objects[oid].policy
        mesh.delete_requests.add(oid)
        sim.call(coord, lambda p, now: _delete(p, oid, policy, now, tuple(held)))

    # ------------------------------------------------------------ tasks
    # Drawn from their own generator, so the draws of puts, deletes, changes and faults
    # stay those of the seed. Each node's ``Scheduler`` (``_TaskNode``) places the tasks
    # it owns; the scenario submits, runs them at their runners and observes.

    trng = random.Random(f"policy-chaos/tasks-streams/{seed}")
    tasks_of: dict[str, _Task] = {}
    epoch = dict.fromkeys(mesh.names, 0)
    """Bumped by a crash: what a node held in memory (shard logs) is gone."""

    def outside(region: str, classes: Iterable[str], p: DataNode, *,
                stream: bool = False) -> str | None:
        """Why ``p``'s current rules of ``classes`` forbid ``region`` (None: they allow it)."""
        for cls in sorted(classes):
            why = copy_refusal(region, Residency(None, cls), p.policies, stream=stream)
            if why is not None:
                return why
        return None

    def task_node(n: str) -> _TaskNode:
        node = mesh.node(n)
        assert isinstance(node, _TaskNode) and node.host is not None
        return node

    def owned(t: _Task) -> bool:
        """``t``'s owner is up in the incarnation that took it (a crash loses its
        scheduler and what it owned)."""
        return sim.is_up(t.owner) and \
            mesh.node(t.owner).disk.get("incarnation") == t.owner_incarnation

    def check_run(tid: str, runner: str, rules: Iterable[Residency | None],
                  when: str) -> None:
        region = region_of[runner]
        for r in rules:
            if r is not None and not r.allows(region):
                violations.append(f"{sim.now:.3f} {when}: task {tid} runs on {runner} in "
                                  f"{region}, outside {r.describe()} its owner placed it under")
                return

    def run_rules(n: str, spec: TaskSpec) -> list[Residency | None]:
        """The rules a run of ``spec`` on ``n`` went by: the rule it was granted under, its
        inputs' rules and its owner's rules of its classes when it bound there."""
        t = tasks_of.get(spec.task_id)
        return [spec.residency, *(i.residency for i in spec.inputs),
                *(t.bound_rules.get(n, []) if t is not None else [])]

    def check_tasks() -> None:
        """On every scan: every run sits inside the rules its placement went by, and no
        owner keeps a task bound to a runner its current rules leave out (hearing a
        narrowing, it stops it there: ``TaskStopped``). Which runner an owner has a task
        bound to is its scheduler's own record (``owner_state``: a re-placement after a
        lost runner unbinds without an event); whether that runner's region is allowed
        is judged here, from the node's policies."""
        for n in mesh.up():
            for (_owner, tid, _attempt), spec in sorted(task_node(n).specs.items()):
                check_run(tid, n, run_rules(n, spec), "scan")
        for tid, t in sorted(tasks_of.items()):
            if t.outcome or not owned(t):
                continue
            p = task_node(t.owner)
            assert p.host is not None
            state = p.host.sched.owner_state(tid)
            runner = None if state is None else state[0]
            if runner is None or runner in t.halted:
                continue
            why = outside(region_of[runner], t.classes, p)
            if why is not None:
                violations.append(f"{sim.now:.3f} task stop: {t.owner} keeps {tid} (classes "
                                  f"{sorted(t.classes)}) on {runner} in {region_of[runner]}, "
                                  f"which its current rule leaves out: {why}")

    def tasks_heard(p: DataNode, now: float) -> None:
        """A node that hears a change gives its scheduler the class policies it now knows
        (the runtime's ``_refresh_policies``): tasks its narrowed rules leave out are
        stopped and placed again inside them, or fail naming the rule."""
        assert isinstance(p, _TaskNode) and p.host is not None
        p.host.sched.set_policies(dict(p.policies), now)
        p.host.settle(now)

    def stat(p: DataNode, oid: str) -> InputRef | None:
        """What the owner's ``obj.stat`` of an input tells it: the rule of the first copy it
        reaches, and who holds it. A header naming the class only is resolved from the
        owner's view (a runtime put always stores the resolved rule)."""
        holders = tuple(m for m in mesh.names if sim.is_up(m) and oid in mesh.node(m).objects)
        for h in holders:
            if sim.is_paused(h) or not sim.connected(p.name, h):
                continue
            res = mesh.node(h).objects[oid].policy.residency
            if res is not None and res.regions is None and res.data_class is not None:
                res = resolve(res.data_class, Rule(), p.policies).residency()
            return InputRef(oid, 0, holders[:8], res)
        return None

    def place(t: _Task, p: DrivenProtocol, now: float) -> None:
        """The owner ``p`` resolves task ``t`` from its own view, as the runtime's owner
        does (``_resolve_task``): its inputs' rules from ``stat``, the task's declared class
        resolved (``core.policy.resolve``), the result's rule (``core.policy.result_rule``,
        carried to the runner in the payload), the task's rule the declared one or else
        the result's; and submits it to its ``Scheduler``, which places it (and places it
        again after a lost or stopped runner) narrowed by its classes' current rules."""
        assert isinstance(p, _TaskNode) and p.host is not None
        refs = [r for r in (stat(p, oid) for oid in t.inputs) if r is not None]
        if not refs:
            return
        declared = None if t.declared is None else \
            resolve(t.declared, Rule(), p.policies).residency()
        in_rules = [r.residency for r in refs]
        classes = {r.data_class for r in [declared, *in_rules]
                   if r is not None and r.data_class is not None}
        sched = p.host.sched
        # As the runtime's _result_rule: the scheduler's rules are the ones resolved from.
        sched.set_policies(dict(p.policies), now)
        try:
            out = result_rule(declared, in_rules, p.policies)
        except PolicyError as e:
            report.tasks_refused += 1
            _audit(p, Kind.REFUSAL, t.tid, t.declared, "", f"{e.rule}: {e}", now)
            return
        res = declared if out is None or (declared is not None and declared.data_class) \
            else out
        if out is not None and declared is None:
            # The result takes its inputs' strictest class: no wider than any of them.
            for r in in_rules:
                if r is None or r.data_class is None:
                    continue
                known = p.policies.get(r.data_class)
                bound = set(known.regions) if known is not None else r.regions
                if out.regions is None or (bound is not None and not out.regions <= bound) \
                        or (r.regions is not None and not out.regions <= r.regions):
                    violations.append(f"{now:.3f} result rule: task {t.tid}'s result "
                                      f"{out.describe()} is wider than its input's class "
                                      f"{r.data_class} ({r.describe()})")
        t.owner_incarnation = p.disk["incarnation"]
        t.out, t.res, t.in_rules, t.classes = out, res, in_rules, frozenset(classes)
        spec_res = res
        if break_ == "task_class":
            spec_res = None
            refs = [InputRef(r.oid, r.size, r.holders, None) for r in refs]
        spec = TaskSpec(task_id=t.tid, cpus=1.0, residency=spec_res, inputs=tuple(refs),
                        payload=_encode_rule(out))
        tasks_of[t.tid] = t
        try:
            sched.submit([spec], now)
        except SchedulingError as e:
            del tasks_of[t.tid]
            report.tasks_refused += 1
            _audit(p, Kind.REFUSAL, t.tid, sorted(classes)[0] if classes else None, "",
                   f"{e.rule}: {e}", now)
        p.host.settle(now)

    def send_kill(owner: str, runner: str, tid: str) -> None:
        """The owner's ``task.kill`` after a ``TaskStopped`` (lost when the runner is down or
        cut off: its outcome is dropped anyway)."""
        if sim.is_up(runner) and sim.connected(owner, runner):
            sim.call(runner, lambda p, now: task_node(runner).kill(owner, tid, now))

    def observe_tasks(t_now: float, n: str, ev: Event) -> None:
        """What the owners' schedulers decide (``TaskBound``, ``TaskStopped``,
        ``TaskFinished``, ``TaskFailed``) and the runners run (``RunTask``), checked as
        it happens."""
        if isinstance(ev, RunTask):
            tid = ev.task.task_id
            check_run(tid, n, run_rules(n, ev.task), "task run")
            t = tasks_of.get(tid)
            cls = sorted(t.classes)[0] if t is not None and t.classes else None
            out = _decode_rule(ev.task.payload)
            _audit(mesh.node(n), Kind.TASK_RUN, tid, cls, region_of[ev.owner],
                   f"owner {ev.owner}, result class "
                   f"{'none' if out is None else out.data_class}", t_now)
            return
        if not isinstance(ev, TaskBound | TaskStopped | TaskFinished | TaskFailed):
            return
        t = tasks_of.get(ev.task_id)
        if t is None or t.owner != n:
            return
        p = mesh.node(n)
        if isinstance(ev, TaskBound):
            report.tasks_placed += 1
            rules = [t.res, *t.in_rules, *(Residency(frozenset(p.policies[c].regions), c)
                                           for c in sorted(t.classes) if c in p.policies)]
            t.bound_rules[ev.node] = rules
            t.halted.discard(ev.node)
            t.rebound = True
            why = outside(region_of[ev.node], t.classes, p)
            if why is not None:
                violations.append(f"{t_now:.3f} task placement: {n} placed {t.tid} "
                                  f"(classes {sorted(t.classes)}) on {ev.node}: {why}")
            check_run(t.tid, ev.node, rules, "task placement")
        elif isinstance(ev, TaskStopped):
            report.tasks_stopped += 1
            t.stopped.add(ev.node)
            t.halted.add(ev.node)
            t.stopped_at, t.rebound = t_now, False
            _audit(p, Kind.REFUSAL, t.tid, sorted(t.classes)[0] if t.classes else None,
                   region_of[ev.node], ev.reason, t_now)
            sim.at(t_now + 0.01, partial(send_kill, n, ev.node, t.tid))
        elif isinstance(ev, TaskFinished):
            report.tasks_done += 1
            t.outcome = "done"
            if ev.node in t.stopped:
                violations.append(f"{t_now:.3f} stopped result: {n} took {t.tid}'s result "
                                  f"from {ev.node}, which it stopped the task on")
        else:
            report.tasks_failed += 1
            t.outcome = "failed"
            if t.stopped_at == t_now and not ev.reason.startswith("residency:"):
                violations.append(f"{t_now:.3f} task stop: {n} failed {t.tid} when it "
                                  f"stopped it without naming the rule: {ev.reason[:120]}")

    sim.observers.append(observe_tasks)

    def put_later(runner: str, data: bytes, policy: ObjectPolicy) -> None:
        """A put the runner starts once the event that ended its run is handled."""

        def start() -> None:
            mesh.put_async(runner, data, policy, 2)

        sim.at(sim.now, start)

    def run_ended(runner: str, o: RunTask, now: float) -> tuple[bool, str]:
        """A run ends at ``runner``: a classed result is put as an object of its class
        under its rule (``core.policy.result_rule``, from the payload), and every other
        task's detail (it raises and prints) under ``core.policy.detail_rule``; then the
        outcome goes to the owner."""
        tid = o.task.task_id
        out = _decode_rule(o.task.payload)
        run = o.task.residency
        in_rules = [i.residency for i in o.task.inputs]
        if out is not None:
            report.results += 1
            # One object per run: a task run twice (a runner the owner lost, then found
            # alive) puts two results, and a delete of the first must not meet the second.
            put_later(runner, f"policy-result-{seed}-{tid}-{runner}-{o.attempt}".encode(),
                      ObjectPolicy(3, out))
        if int(tid.rsplit("-", 1)[1]) % 2:
            # As the runtime's runner does: the detail is one object under
            # ``core.policy.detail_rule`` (None: it goes inline to the owner, which must
            # then be a task of no class).
            try:
                kept = detail_rule(out, run, in_rules)
            except PolicyError:
                return True, ""  # withheld at the runner
            classes = {x.data_class for x in [out, run, *in_rules]
                       if x is not None and x.data_class is not None}
            if kept is None:
                if classes:
                    violations.append(f"{now:.3f} task detail: {tid} (classes "
                                      f"{sorted(classes)}) would send its detail inline")
                return True, ""
            report.details += 1
            put_later(runner, f"policy-detail-{seed}-{tid}-{runner}-{o.attempt}".encode(),
                      ObjectPolicy(3, kept))
        return True, ""

    hooks.duration = lambda n, o, now: trng.uniform(*task_s)
    hooks.ended = run_ended
    hooks.is_up = sim.is_up

    def tasks_end() -> None:
        """At the end: every task stopped on a runner was placed again or ended."""
        for tid, t in sorted(tasks_of.items()):
            if t.stopped and owned(t) and not t.outcome and not t.rebound:
                violations.append(f"end: {tid} stopped on {sorted(t.stopped)} by {t.owner} "
                                  "was neither placed again nor failed")

    def submit(i: int) -> None:
        up = mesh.up()
        live = mesh.live()
        if not up or not live:
            return
        owner = up[trng.randrange(len(up))]
        inputs = tuple(trng.sample(live, min(len(live), trng.randint(1, 2))))
        declared = CLASSES[trng.randrange(len(CLASSES))] if trng.random() < 0.3 else None
        t = _Task(f"task-{seed}-{i}", owner, inputs, declared)
        sim.call(owner, partial(place, t))

    # ------------------------------------------------------------ streams

    shards: dict[str, dict[tuple[str, str], Residency | None]] = {n: {} for n in mesh.names}
    """Shard copies each node keeps in memory: (topic, source) -> the rule it came under."""
    backup_of: dict[tuple[str, str], str] = {}

    def check_shard(p: DataNode, holder: str, topic: str, res: Residency | None,
                    when: str) -> None:
        """A shard copy of ``topic`` on ``holder`` must be where ``p``'s current rule of the
        topic's class (its stream regions) and the rule the copy was placed under allow."""
        cls = TOPIC_CLASS[topic]
        region = region_of[holder]
        why = outside(region, (cls,), p, stream=True)
        if why is None and res is not None and not res.allows(region):
            why = f"outside the shard's own {res.describe()}"
        if why is not None:
            violations.append(f"{sim.now:.3f} {when}: {p.name} has a shard of {topic} "
                              f"(class {cls}) on {holder}: {why}")

    def stream_rule(p: DataNode, declared: Residency | None) -> Residency | None:
        """The rule a shard of a topic published under ``declared`` follows at ``p`` now."""
        if break_ == "shard_class":
            return None
        return topic_rule(declared, p.policies)

    def receiver_refusal(q: DataNode, topic: str, res: Residency | None) -> str | None:
        """Why ``q`` refuses a shard copy of ``topic`` sent under ``res`` (the runtime's
        ``_rpc_replicate`` checks), or None."""
        if res is None:
            return None
        try:
            check_source_allowed(topic, q.region, res)
            return copy_refusal(q.region, res, q.policies, stream=True)
        except PlacementError as e:
            return str(e)

    def replicate(p: DataNode, topic: str, sid: str, res: Residency | None, now: float) -> None:
        """The runtime's ``_replicate``: the backup ``core.streams.backup_for`` picks from the
        source's view; a backup that fails or refuses is passed over for the next."""
        key = (topic, sid)
        bad: set[str] = set()
        if break_ == "backup_class":
            res = None  # the source picks (and tells) its backup without the topic's rule
        me = Candidate(p.name, region_of[p.name], mesh.metas[p.name].zone)
        for _ in range(3):
            b = backup_for(topic, me, [c for c in p._candidates() if c.name not in bad], res)
            if b is None:
                return
            if backup_of.get(key) == b and key in shards[b]:
                shards[b][key] = res
                return
            check_shard(p, b, topic, res, "backup placement")
            q = mesh.node(b)
            if not sim.is_up(b) or sim.is_paused(b) or not sim.connected(p.name, b):
                bad.add(b)
                continue
            why = receiver_refusal(q, topic, res)
            if why is not None:
                report.stream_refused += 1
                _audit(q, Kind.REFUSAL, f"{topic}/{sid}", TOPIC_CLASS[topic],
                       region_of[p.name], why, now)
                bad.add(b)
                continue
            if key not in shards[b]:
                report.backups += 1
                _audit(q, Kind.COPY_MADE, f"{topic}/{sid}", TOPIC_CLASS[topic],
                       region_of[p.name], "stream backup", now)
            shards[b][key] = res
            backup_of[key] = b
            check_shard(q, b, topic, res, "backup commit")
            return

    # Every topic has its replicated record (``streamtopic/<topic>``: its class) from the
    # start. About half the publishes name no class (``bare_rng``, a generator of their
    # own, so the other draws are those they were): the entry node takes the record's
    # class (``core.streams.publish_rule``, the runtime's ``_admit``), so the shard and its
    # backup follow the class like a classed publish's. (``break_="publish_record"``
    # takes them unbound: the oracles, which hold every shard to its topic's class, catch
    # it.) A source keeps the rule it took its shard under (``declared_of``).
    bare_rng = random.Random(f"policy-chaos/bare-publishes/{seed}")
    declared_of: dict[tuple[str, str], Residency | None] = {}

    def publish(topic: str, p: DrivenProtocol, now: float) -> None:
        """A record entering ``topic`` at ``p`` (the runtime's ``stream.publish``)."""
        assert isinstance(p, DataNode)
        cls = TOPIC_CLASS[topic]
        named: Residency | None = Residency(None, cls)
        if bare_rng.random() < 0.5:
            report.bare_publishes += 1
            named = None if break_ == "publish_record" else \
                publish_rule(topic, None, Residency(None, cls))
        take(topic, p, named, now)

    def take(topic: str, p: DataNode, named: Residency | None, now: float) -> None:
        """Records of ``topic`` published at ``p`` under the rule ``named`` (a producer's,
        with its record's class; an operator's output rule)."""
        cls = TOPIC_CLASS[topic]
        sid = f"{p.name}~{epoch[p.name]}"
        if (topic, sid) in declared_of and declared_of[(topic, sid)] != named:
            named = declared_of[(topic, sid)]  # the runtime refuses another rule; kept
        res = stream_rule(p, named)
        try:
            check_source_allowed(topic, p.region, res)
        except PlacementError as e:
            report.stream_refused += 1
            _audit(p, Kind.REFUSAL, topic, cls, "", str(e), now)
            return
        key = (topic, sid)
        declared_of[key] = named
        sources[sid] = p.name
        check_shard(p, p.name, topic, res, "shard placement")
        if key not in shards[p.name]:
            report.shards += 1
            _audit(p, Kind.COPY_MADE, f"{topic}/{sid}", cls, "", "stream shard", now)
        shards[p.name][key] = res
        replicate(p, topic, sid, res, now)

    def keep_backup(topic: str, sid: str, p: DrivenProtocol, now: float) -> None:
        """A source re-places its shard's backup when its view changes (a crash, a change
        of the class's rule)."""
        assert isinstance(p, DataNode)
        if (topic, sid) not in shards[p.name]:
            return
        res = stream_rule(p, declared_of.get((topic, sid)))
        shards[p.name][(topic, sid)] = res
        replicate(p, topic, sid, res, now)

    def keep_copies(p: DrivenProtocol, now: float) -> None:
        """The runtime's ``_keep_copies``: for each copy ``p`` holds of a shard its source
        no longer serves (in ``p``'s view), the copies ``core.streams.shard_copies`` wants
        are made (``frozen_copy_targets``: ``p`` sends to the others; the receiver checks
        the rule) and a copy of ``p``'s outside them is dropped once they all hold it."""
        assert isinstance(p, DataNode)
        if break_ == "frozen_copies":
            return
        cands = p._candidates()
        alive = {c.name for c in cands}
        for key in sorted(shards[p.name]):
            topic, sid = key
            n = sources.get(sid)
            if n is None or key not in shards[p.name]:
                continue
            src = Candidate(n, region_of[n], mesh.metas[n].zone)
            res = stream_rule(p, declared_of.get(key))
            copies = shard_copies(topic, src, n in alive and sid == f"{n}~{epoch[n]}",
                                  cands, res)
            if not copies or copies[0] == n:
                continue
            targets, keep = frozen_copy_targets(p.name, copies)
            held = [copy_frozen(p, b, topic, sid, res, now) for b in targets]
            if keep or not all(held):
                continue
            del shards[p.name][key]
            report.frozen_handed_over += 1
            _audit(p, Kind.COPY_DROPPED, f"{topic}/{sid}", TOPIC_CLASS[topic], "",
                   "stream copy handed over", now)

    def copy_frozen(p: DataNode, b: str, topic: str, sid: str, res: Residency | None,
                    now: float) -> bool:
        """``p`` brings ``b``'s copy of a gone source's shard up (the runtime's
        ``_copy_frozen``); whether ``b`` holds it now."""
        key = (topic, sid)
        check_shard(p, b, topic, res, "frozen copy placement")
        q = mesh.node(b)
        if not sim.is_up(b) or sim.is_paused(b) or not sim.connected(p.name, b):
            return False
        why = receiver_refusal(q, topic, res)
        if why is not None:
            report.stream_refused += 1
            _audit(q, Kind.REFUSAL, f"{topic}/{sid}", TOPIC_CLASS[topic], region_of[p.name],
                   why, now)
            return False
        if key not in shards[b]:
            report.frozen_copies += 1
            _audit(q, Kind.COPY_MADE, f"{topic}/{sid}", TOPIC_CLASS[topic], region_of[p.name],
                   "stream copy of a gone source's shard", now)
            shards[b][key] = res
        check_shard(q, b, topic, shards[b][key], "frozen copy commit")
        return True

    def drop_shards(p: DataNode, cls: str, now: float) -> None:
        """On hearing a change of ``cls``: drop every shard copy the new rule forbids."""
        for key in sorted(shards[p.name]):
            if TOPIC_CLASS[key[0]] == cls and \
                    shard_refusal(p.region, Residency(None, cls), p.policies) is not None:
                del shards[p.name][key]
                report.shard_drops += 1
                _audit(p, Kind.COPY_DROPPED, f"{key[0]}/{key[1]}", cls, "", "stream shard", now)

    def memory_lost(n: str) -> None:
        shards[n].clear()
        runners[n].clear()
        epoch[n] += 1

    def publish_event() -> None:
        up = [n for n in mesh.up() if not sim.is_paused(n)]
        if up:
            topic = TOPICS[trng.randrange(len(TOPICS))]
            sim.call(up[trng.randrange(len(up))], partial(publish, topic))

    def stream_tick() -> None:
        for n in mesh.up():
            if sim.is_paused(n):
                continue
            for topic, sid in sorted(shards[n]):
                if sid == f"{n}~{epoch[n]}":
                    sim.call(n, partial(keep_backup, topic, sid))
            if any(sid != f"{n}~{epoch[n]}" for _, sid in shards[n]):
                sim.call(n, keep_copies)
            if int(sim.now) % 2 == 0:  # every 2 s (and on hearing a change): kept cheap
                sim.call(n, reconcile)

    # ------------------------------------------------------------ operators and subscribers
    # Operators are registered at the start (a near-source one and one placed anywhere
    # the rules allow, per topic), each with its topic's class: its rule is the class's,
    # resolved when it is registered (the runtime's ``_resolve_class``); and one per topic
    # placed anywhere with no class at all (registered before its topic had a class),
    # which every node binds by its topic's class (``core.streams.operator_classes``).
    # (``break_="operator_topic"`` leaves the topic's class out: the oracles catch it.)
    # Every node runs the runtime's ``_reconcile`` each second and on hearing a change:
    # the runners ``core.streams.runners_wanted`` gives it from its own view, each
    # operator's rule narrowed by its classes' current policies as the node knows them
    # (``core.streams.operator_now``). Subscribers read a classed shard through its
    # holder (``core.streams.shard_holder`` from the subscriber's node's view), which
    # serves or refuses by ``core.policy.read_refusal`` from its own view (the runtime's
    # ``_check_fetch``).

    orng = random.Random(f"policy-chaos/operators-reads/{seed}")
    sources: dict[str, str] = {}
    """Every shard source ever opened: ``node~epoch`` -> node."""
    runners: dict[str, dict[tuple[str, str], Residency | None]] = {n: {} for n in mesh.names}
    """The runners each node runs (in memory): (operator, source) -> the rule it was
    placed under."""
    operators: dict[str, tuple[OperatorPlacement, str, bool]] = {}
    for topic in TOPICS:
        cls = TOPIC_CLASS[topic]
        rule = resolve(cls, Rule(), truth).residency()
        operators[f"near-{topic}"] = (OperatorPlacement(f"near-{topic}", None, rule), topic,
                                      True)
        operators[f"any-{topic}"] = (OperatorPlacement(
            f"any-{topic}", InRegions(frozenset(regions)), rule), topic, False)
        # Registered without a class before its topic had one (its spec carries none):
        # bound by the topic's class as every node reads it (the runtime's topic record).
        operators[f"bare-{topic}"] = (OperatorPlacement(
            f"bare-{topic}", InRegions(frozenset(regions)), None), topic, False)

    def check_operator(p: DataNode, op: str, sid: str, rule: Residency | None,
                       when: str) -> None:
        """A runner of ``op`` on ``p`` must be where ``p``'s current rule of the operator's
        topic's class and the rule it was placed under allow."""
        cls = TOPIC_CLASS[operators[op][1]]
        region = region_of[p.name]
        why = outside(region, (cls,), p)
        if why is None and rule is not None and not rule.allows(region):
            why = f"outside the rule it was placed under ({rule.describe()})"
        if why is not None:
            violations.append(f"{sim.now:.3f} {when}: {p.name} runs operator {op} on shard "
                              f"{sid} (class {cls}): {why}")

    def reconcile(p: DrivenProtocol, now: float) -> None:
        """The runtime's ``_reconcile``: start the runners this node's view gives it, stop
        the others."""
        assert isinstance(p, DataNode)
        cands = p._candidates()
        view = [NodeState(member=c, capacity=Resources(1e6, 1 << 40, 1 << 16)) for c in cands]
        alive = {c.name for c in cands}
        srcs = [ShardSource(sid, Candidate(n, region_of[n], mesh.metas[n].zone),
                            n in alive and sid == f"{n}~{epoch[n]}")
                for sid, n in sorted(sources.items())]
        placed: dict[str, OperatorPlacement] = {}
        for name, (op, topic, _near) in operators.items():
            now_op = op if break_ == "operator" else \
                operator_now(op, operator_classes(
                    op.residency, None if break_ == "operator_topic" else TOPIC_CLASS[topic]),
                    p.policies)
            if now_op is not None:
                placed[name] = now_op
        want = runners_wanted(p.name, [(placed[k], operators[k][1], operators[k][2])
                                       for k in sorted(placed)],
                              srcs, view, lambda t, sid: (t, sid) in shards[p.name])
        mine = runners[p.name]
        for key in sorted(mine):
            if key not in want:
                del mine[key]
                report.operators_stopped += 1
        for key in sorted(want - set(mine)):
            op_name, sid = key
            rule = placed[op_name].residency
            mine[key] = rule
            report.operators_placed += 1
            cls = TOPIC_CLASS[operators[op_name][1]]
            _audit(p, Kind.OPERATOR_PLACED, f"{op_name}/{sid}", cls, "",
                   "runner started", now)
            check_operator(p, op_name, sid, rule, "operator placement")
            # Its first batch's outputs enter its output topic here, under the output rule
            # its registration wrote (the operator's class: ``output_rule``). With
            # ``break_="output_class"`` they carry no class: the shard oracles catch it.
            op, topic, _near = operators[op_name]
            out = OUTPUT_TOPIC[topic]
            named = None if break_ == "output_class" else output_rule(
                op_name, out, operator_classes(op.residency, TOPIC_CLASS[topic]), None, truth)
            report.outputs += 1
            take(out, p, named, now)

    def subscribe(topic: str, p: DrivenProtocol, now: float) -> None:
        """A subscriber of ``topic`` at ``p``: ``p`` follows each shard at its holder, which
        serves the fetch unless ``read_refusal`` (from the holder's view) forbids it."""
        assert isinstance(p, DataNode)
        cls = TOPIC_CLASS[topic]
        cands = p._candidates()
        alive = {c.name for c in cands}
        res = topic_rule(Residency(None, cls), p.policies)
        for sid, n in sorted(sources.items()):
            src = Candidate(n, region_of[n], mesh.metas[n].zone)
            live = n in alive and sid == f"{n}~{epoch[n]}"
            holder = shard_holder(topic, src, live, cands, res)
            if holder is None or not sim.is_up(holder) or sim.is_paused(holder) \
                    or not sim.connected(p.name, holder) or (topic, sid) not in shards[holder]:
                continue
            h = mesh.node(holder)
            why = None if break_ == "read" else read_refusal(p.region, cls, h.policies)
            if why is not None:
                report.reads_refused += 1
                _audit(h, Kind.REFUSAL, f"{topic}/{sid}", cls, p.region,
                       f"cross_region_read: {why}", now)
                continue
            report.reads_served += 1
            _audit(h, Kind.READ, f"{topic}/{sid}", cls, p.region, "subscriber fetch", now)
            # The oracle states the rule itself (not through the decision it checks): a
            # class without cross-region reads is read only from its regions.
            known = h.policies.get(cls)
            if known is not None and not known.cross_region_reads \
                    and p.region not in known.regions:
                violations.append(f"{now:.3f} read: {holder} served shard {sid} of {topic} to "
                                  f"a subscriber at {p.name} in {p.region}: class {cls} "
                                  f"refuses cross-region reads outside {list(known.regions)}")

    def read_event() -> None:
        up = [n for n in mesh.up() if not sim.is_paused(n)]
        if up:
            topic = TOPICS[orng.randrange(len(TOPICS))]
            sim.call(up[orng.randrange(len(up))], partial(subscribe, topic))

    sim.run_until(2.0)
    for i in range(tasks):
        sim.at(14.0 + (fault_until - 20.0) * i / tasks, partial(submit, i))
    for k in range(publishes):
        sim.at(3.0 + (fault_until - 6.0) * k / publishes, publish_event)
    for k in range(reads):
        sim.at(4.0 + (fault_until + refresh_s + repair_bound_s - 6.0) * k / reads, read_event)
    t_tick = 4.0
    while t_tick < fault_until + refresh_s + repair_bound_s:
        sim.at(t_tick, stream_tick)
        t_tick += 1.0
    for i in range(objects):
        sim.at(2.0 + (fault_until - 4.0) * i / objects, partial(put, i))
    for k in range(changes):
        sim.at(10.0 + (fault_until - 15.0) * (k + rng.random()) / changes, change)
    for k in range(deletes):
        sim.at(15.0 + (fault_until - 20.0) * (k + rng.random()) / deletes, delete)

    # ------------------------------------------------------------ faults

    transient: dict[str, float] = {}

    def inject() -> None:
        now = sim.now
        for n, until in sorted(transient.items()):
            if until <= now:
                del transient[n]
                mesh.restart(n)
                report.faults.append(f"{now:.1f} restart {n}")
        up = [n for n in mesh.up() if n not in transient]
        if len(up) <= nodes // 2:
            return
        roll = rng.random()
        victim = up[rng.randrange(len(up))]
        if roll < 0.35 and len(transient) < 2:
            transient[victim] = now + rng.uniform(4.0, 15.0)
            mesh.crash(victim)
            memory_lost(victim)
            report.faults.append(f"{now:.1f} crash {victim}")
        elif roll < 0.6:
            d = rng.uniform(1.0, 6.0)
            sim.pause(victim, d)
            report.faults.append(f"{now:.1f} pause {victim} {d:.1f}")
        elif roll < 0.9:
            cut = list(up)
            rng.shuffle(cut)
            side = cut[: rng.randint(1, len(cut) // 2)]
            sim.partition(side, [n for n in mesh.names if n not in side])
            sim.at(min(now + rng.uniform(3.0, 12.0), fault_until), sim.heal)
            report.faults.append(f"{now:.1f} partition {','.join(sorted(side))}")

    t = 12.0
    while t < fault_until:
        sim.at(t, inject)
        t += rng.uniform(2.0, 4.0)
    end = fault_until + refresh_s + repair_bound_s
    k = 1
    while k * scan_s <= end:
        sim.at(k * scan_s, scan)
        k += 1

    sim.run_until(fault_until)
    sim.heal()
    for n in sorted(transient):
        mesh.restart(n)
        report.faults.append(f"{sim.now:.1f} restart {n}")
    transient.clear()
    sim.run_until(end)
    scan()

    # ------------------------------------------------------------ the end state
    for n in mesh.up():
        for name in CLASSES:
            if view_version(n, name) != version[name]:
                violations.append(f"end: {n} never heard version {version[name]} of {name} "
                                  f"(has {view_version(n, name)})")
        for oid, s in sorted(mesh.node(n).objects.items()):
            res = s.policy.residency
            held = None if res is None else res.data_class
            if held is not None and region_of[n] not in truth[held].regions:
                violations.append(f"end: {n} in {region_of[n]} still holds {oid[:12]} of "
                                  f"class {held} (regions {list(truth[held].regions)})")
        for (op, sid) in sorted(runners[n]):
            cls = TOPIC_CLASS[operators[op][1]]
            if region_of[n] not in truth[cls].regions:
                violations.append(f"end: {n} in {region_of[n]} still runs operator {op} on "
                                  f"{sid} (class {cls}, regions {list(truth[cls].regions)})")
        for (topic, sid) in sorted(shards[n]):
            cls = TOPIC_CLASS[topic]
            if region_of[n] not in truth[cls].regions:
                violations.append(f"end: {n} in {region_of[n]} still holds shard {sid} of "
                                  f"{topic} (class {cls}, regions {list(truth[cls].regions)})")
    # Every shard a gone source left (held by a live node) is where ``shard_copies`` from
    # the end's view wants its two copies: a second failure would lose none of it.
    up = set(mesh.up())
    end_view = [Candidate(n, region_of[n], mesh.metas[n].zone) for n in sorted(up)]
    for key in sorted({k for n in up for k in shards[n]}):
        topic, sid = key
        n = sources[sid]
        rule = topic_rule(Residency(None, TOPIC_CLASS[topic]), truth)
        copies = shard_copies(topic, Candidate(n, region_of[n], mesh.metas[n].zone),
                              n in up and sid == f"{n}~{epoch[n]}", end_view, rule)
        if copies and copies[0] != n:
            lacking = [c for c in copies if key not in shards[c]]
            if lacking:
                violations.append(f"end: shard {sid} of {topic}, its source gone, lacks its "
                                  f"copies on {lacking} (held on "
                                  f"{sorted(m for m in up if key in shards[m])})")
    for oid in mesh.resurrected():
        violations.append(f"end: deleted {oid[:12]} still held by a live node")
    for t_commit, n, oid, written in mesh.late_commits:
        if written is not None and written > mesh.delete_ts[oid]:
            violations.append(f"{t_commit:.3f} {n}: copy of deleted {oid[:12]} written "
                              "after its delete")
    tasks_end()
    report.audit_breaks = verify_audit(mesh)
    report.audit_entries = sum(len(mesh.node(n).disk.get("audit", [])) for n in mesh.names)
    report.acked = len(mesh.acked)
    report.failed = sum(1 for r in mesh.results.values() if not r.acked)
    report.deleted = len(mesh.deleted)
    report.trace_hash = sim.trace_hash()
    return report
