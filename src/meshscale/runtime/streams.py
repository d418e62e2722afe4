"""The node's stream plane: shard logs, their backups, operator runners and subscriptions.

The decisions are ``core.streams``'s (which node runs an operator on a shard, which node
backs a shard up, how much a shard may hold); this module moves the records:

- ``stream.publish`` (a producer, through its nearest node): the records are appended to
  this node's shard of the topic once the shard has room (credit: the producer's call
  waits, bounded by ``publish_wait_s``), copied to the shard's backup and acknowledged
  when both hold them: in the publish's answer, or (a producer that asks for
  ``ack="appended"``, as the client's does) in ``stream.copied``'s, the publish answered
  as soon as its records are appended so the producer's next batch need not wait for
  the copy. A node the topic's residency rule forbids refuses, naming it.
  A topic of a data class follows the class's current policy (``core.streams.topic_rule``):
  when this node's policy cache sees the class change, its shard copies of the class's
  topics follow the new rule (``_class_changed``: backups re-placed inside it, copies it
  forbids dropped and audited).
- Operators are registered once (``stream.op_register``: spec in the replicated KV under
  ``streamop/<name>``, the pickled function as a replicated object, a notice to every live
  node). Every ``reconcile_interval_s`` each node starts a *runner* for each (operator,
  shard) that ``core.streams.place_operator`` gives to it, and stops the ones it no longer
  owns (a node holding nothing of the plane sleeps until something arrives, or its next
  read of the operators' index: ``reconcile_idle_max_s``). A runner resumes from the offset checkpointed in the KV
  (``streamoff/<operator>/<source>``), long-polls the shard's holder (``stream.fetch``: the
  source, or its backup once the source is dead), runs the function on a batch in the warm
  worker pool, appends the outputs to its own shard of the output topic (ids derived from
  the input ids, so a replay repeats them), then commits the offset.
- Subscriptions (``stream.read``): the node follows every shard of the topic into a
  bounded local mirror and answers reads from it by per-shard cursors, so a subscriber
  long-polls one node. Its answer names the shards another node of its region holds
  (``holders``, ``core.streams.direct_reads``); the subscriber reads those at their
  holder (``held``: answered from the holder's own shard log at the append, no mirror
  between), which saves each record the follower's hop, and leaves them out of its
  reads through the node (``skip``) until the holder lets go of one (``moved``).

Every send to a node in another region is held for the emulated one-way delay when the
mesh runs with ``--latency`` (``meshscale up`` / the demo), and its payload bytes are
counted per topic in ``cross_region_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from meshscale.core.api import ApiError, Empty, ErrorCode, Method, Request, ResidencyWire
from meshscale.core.api import streams as api
from meshscale.core.api.contract import residency_of
from meshscale.core.api.streams import (
    CopiedReply,
    CopiedRequest,
    FetchReply,
    FetchRequest,
    OperatorInfo,
    OperatorSpec,
    OpListReply,
    OpNotifyRequest,
    OpRegisterReply,
    OpRegisterRequest,
    OpRemoveReply,
    OpRemoveRequest,
    PublishReply,
    PublishRequest,
    ReadRecord,
    ReadReply,
    ReadRequest,
    ReplicateReply,
    ReplicateRequest,
    ShardInfo,
    StreamStats,
)
from meshscale.core.audit import Kind
from meshscale.core.membership import Member, NodeMeta, State
from meshscale.core.pacing import check_wait_bounds, loop_wait_s
from meshscale.core.placement import Candidate, PlacementError, Residency
from meshscale.core.policy import (
    ClassPolicy,
    PolicyError,
    Rule,
    copy_refusal,
    read_refusal,
    resolve,
)
from meshscale.core.scheduling import (
    Central,
    InRegions,
    NodeState,
    PlacementMode,
    Resources,
    SchedulingError,
)
from meshscale.core.streams import (
    LogEntry,
    OperatorPlacement,
    ShardLog,
    ShardLogConfig,
    ShardSource,
    backup_for,
    central_region,
    check_source_allowed,
    direct_reads,
    follower_pause_s,
    frozen_copy_targets,
    mirror_refusal,
    operator_classes,
    operator_now,
    operator_refusal,
    operator_rule,
    output_rule,
    place_operator,
    publish_rule,
    runners_wanted,
    shard_copies,
    shard_holder,
    shard_refusal,
    source_id,
    split_source,
    topic_conflict,
    topic_rule,
)
from meshscale.runtime import caller
from meshscale.runtime.local import LocalCalls, call_node
from meshscale.runtime.pacing import Wakeup
from meshscale.runtime.services import NodeServices, refusal
from meshscale.runtime.workers import TaskFailed, WorkerPool, pickle_args
from meshscale.transport.rpc import RemoteError, RpcError

Req = TypeVar("Req", bound=Request)
Rep = TypeVar("Rep")
_T = TypeVar("_T")

OP_PREFIX = "streamop/"
OFFSET_PREFIX = "streamoff/"
OPS_INDEX_KEY = "streamops"
TOPIC_PREFIX = "streamtopic/"
"""A classed topic's replicated record (``streamtopic/<topic>``: the rule its producers
declare, its class and its own stream regions), written once by the first node that takes
a classed record of it. Every node reads its operators' topics' classes from it
(``core.streams.operator_classes``) and a subscriber's node its topic's."""
TOPIC_RECORD_REFRESH_S = 5.0
"""How often a node reads again the record of a topic it knows no class of (one its
operators or subscribers read): a class, once recorded, never changes."""
EPOCH_TAG = "epoch"
"""Membership tag: the incarnation the node started with (new at every start)."""

_clock = time.perf_counter
"""What an operator runner times its batches with (``apply_us``)."""

FOLLOW_BATCH = 1_024
"""Entries a subscription's follower fetches at a time."""
BACKUP_MEMO_MAX = 4_096
"""Shards whose backup ``StreamPlane._backup`` keeps (all forgotten past it)."""
REFUSED_FOLLOW_RETRY_S = 2.0
"""A follower the shard holder refused (cross-region read rule) asks again this often:
the class's policy may change."""
LANE = "stream"
"""The peer-pool lane of the plane's control calls (operator notices, stats)."""
LANE_REPL = "stream.repl"
"""Copies of a shard to its backup (one at a time per shard: ``_repl_locks``)."""
OUTPUT_COPIES_IN_FLIGHT = 32
"""An operator runner's batches whose outputs are appended but whose copy to the output
shard's backup is not confirmed yet: beyond it the runner waits for the oldest. A copy
confirms every batch it carried at once (``_replicate``'s ``upto``), so a runner that
appends a small batch every few ms to a backup a cloud round trip away (60 ms: a source
whose region has no other node left) has about two round trips' worth of batches here;
at 8 it waited for a copy at nearly every batch (the demo after its node kill)."""


def _fetch_lane(op: str, source: str) -> str:
    """An operator runner's own lane: its long-polls wait on no one else's."""
    return f"stream.fetch:{op}:{source}"


def _follow_lane(topic: str, source: str) -> str:
    """A subscription follower's own lane."""
    return f"stream.follow:{topic}:{source}"


@dataclass(frozen=True)
class StreamConfig:
    max_topics: int = 256
    max_operators: int = 64
    max_record_bytes: int = 256 * 1024
    max_publish_records: int = 2_048
    publish_wait_s: float = 30.0
    """How long a publish waits for room before it is refused (the producer retries)."""
    batch_records: int = 256
    fetch_wait_s: float = 0.5
    follow_wait_s: float = 0.5
    read_wait_max_s: float = 5.0
    checkpoint_interval_s: float = 0.25
    reconcile_interval_s: float = 0.5
    reconcile_idle_max_s: float = 5.0
    """The longest the reconcile loop sleeps while this node holds nothing of the plane
    (no operator, shard, mirror or subscription: ``StreamPlane._idle``), when a round
    does nothing but, every ``ops_reload_s``, read the operators' index; whatever gives
    it something (an operator installed, a shard's first record, a subscription) wakes
    it at once (``core.pacing``)."""
    ops_reload_s: float = 5.0
    """How often each node reads the operators' index from the KV (the operators it
    missed the notice of, or missed the removal of)."""
    rpc_timeout_s: float = 15.0
    operator_timeout_s: float = 60.0
    follower_idle_s: float = 30.0
    follow_linger_s: float = 0.05
    """A follower of a shard its subscribers read at the holder fetches at most this
    often while records come (``core.streams.follower_pause_s``); 0: at every append."""
    direct_recent_s: float = 2.0
    """A shard left out of a read through this node this recently is read at its
    holder (``core.streams.follower_pause_s``)."""
    mirror_records: int = 20_000
    max_backup_attempts: int = 3
    max_sources: int = 4_096
    """Shard sources remembered (node epochs, live or gone), oldest forgotten first."""
    bad_backup_s: float = 10.0
    """A backup that failed a copy is passed over this long (or until the view says)."""
    fn_replicas: int = 3
    """Copies of an operator's pickled function (an object any runner can read)."""
    log: ShardLogConfig = field(default_factory=ShardLogConfig)

    def __post_init__(self) -> None:
        check_wait_bounds(self.reconcile_interval_s, self.reconcile_idle_max_s)
        if not (math.isfinite(self.ops_reload_s) and self.ops_reload_s > 0):
            raise ValueError(f"ops_reload_s must be finite and > 0, got {self.ops_reload_s!r}")
        for name in ("follow_linger_s", "direct_recent_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0 <= v <= 60):
                raise ValueError(f"{name} must be within [0, 60] s, got {v!r}")


def _held_twice(log: ShardLog) -> int:
    """The offset before which ``log`` (this node's own shard) is acknowledged: held by
    its backup too, or by this node alone when no backup was left to copy to."""
    return log.head if log.copied is None else log.copied


def _class(rule: Residency | None) -> str | None:
    return None if rule is None else rule.data_class


def _describe(rule: Residency | None) -> str:
    return "no rule" if rule is None else rule.describe()


def _placement(spec: OperatorSpec) -> OperatorPlacement:
    mode: PlacementMode | None = None
    if spec.mode == "central":
        assert spec.region is not None
        mode = Central(spec.region)
    elif spec.mode == "regions":
        mode = InRegions(frozenset(spec.regions or []))
    return OperatorPlacement(spec.name, mode, residency_of(spec.residency),
                             dict(spec.labels))


def _batch_args(batch: list[list[Any]]) -> bytes:
    """A batch's ``args`` bytes for ``WorkerPool.run`` (``pickle_args(batch)``'s form,
    which the worker reads with ``pickle.loads``): its rows are plain str, bytes and
    float, which the standard pickler writes without cloudpickle's per-object hook (a
    tenth of the time: this is on every record's way to its operator). Imported here: an
    idle node never loads pickle (``test_idle_imports.py``)."""
    import pickle

    return pickle.dumps(((batch,), {}), protocol=5)


_spec_encoder = msgspec.msgpack.Encoder()
_spec_decoder = msgspec.msgpack.Decoder(OperatorSpec)
_names_decoder = msgspec.msgpack.Decoder(list[str])
_wire_decoder = msgspec.msgpack.Decoder(ResidencyWire)


class _OutputCopies:
    """An operator runner's batches whose outputs are appended but wait for their copy
    to the output shard's backup (``StreamPlane._read_shard``), oldest first, and the
    offset the runner may commit: the one before which every batch's outputs are
    copied. A batch without outputs behind one waiting waits with it."""

    def __init__(self, committed: int | None) -> None:
        self.committed = committed
        self.batches: deque[_Batch] = deque()

    def settle(self) -> int | None:
        """Drop the batches copied, oldest first, and move ``committed`` past them; a
        copy that failed unexpectedly raises here (the runner restarts from its
        checkpoint, which never passed it)."""
        q = self.batches
        while q:
            b = q[0]
            if b.task is not None and not b.copied:
                if not b.task.done():
                    break
                b.task.result()  # it failed (raises), and stays: nothing commits past it
            q.popleft()
            self.committed = b.upto
        return self.committed


@dataclass
class _Batch:
    upto: int
    """The offset after the batch."""
    task: asyncio.Task[None] | None = None
    """Its outputs' copy (None: it has no outputs)."""
    copied: bool = False


class StreamPlane:
    def __init__(self, agent: NodeServices, config: StreamConfig | None = None) -> None:
        self.agent = agent
        self.local = LocalCalls(agent)
        if config is None:
            backlog = agent.cfg.stream_max_backlog
            config = StreamConfig(log=ShardLogConfig(
                max_backlog=backlog, max_records=max(backlog, ShardLogConfig.max_records)))
        self.cfg = config
        self.logs: dict[tuple[str, str], ShardLog] = {}
        self.mirrors: dict[tuple[str, str], ShardLog] = {}
        self.topic_residency: dict[str, Residency | None] = {}
        """Each topic's rule as this node applies it now (``core.streams.topic_rule``)."""
        self.topic_declared: dict[str, Residency | None] = {}
        """The rule producers publish a topic with at this node, as they state it (its data
        class and its own stream regions, unresolved): the topic's identity. Its rule in
        force is resolved from it and the class's current policy at each publish and on
        each change of the class's policy."""
        self.ops: dict[str, OperatorSpec] = {}
        self._fn_bytes: dict[str, bytes] = {}
        self.runners: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.followers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._follow_used: dict[str, float] = {}
        self._read_refused: dict[str, str] = {}
        """Topics whose shard holders refused this node's follower (a class without
        cross-region reads, this node outside its regions): the holder's words. Cleared
        when a fetch succeeds again or the topic's followers idle out."""
        self.stats: Counter[str] = Counter()
        self.cross_region_bytes: Counter[str] = Counter()
        self.op_stats: dict[str, Counter[str]] = {}
        self._lock = asyncio.Lock()
        """Held to change what a long-poll waits for (an append, a copy applied, a
        commit, a mirror filled) and to check for it (``_wait_ready``)."""
        self._waits: dict[str, tuple[asyncio.Condition, int]] = {}
        """Per topic, the condition its long-polls wait on (sharing ``_lock``) and how
        many wait: a change wakes the waiters of its own topic only, and a topic's entry
        goes when its last waiter does (bounded by the waiters)."""
        self._known: dict[str, Candidate] = {}
        self._alive_seen: list[tuple[Member, State, NodeMeta]] = []
        """The members (with their state and meta) ``_alive_view`` was built from."""
        self._alive_view: list[Candidate] = []
        self._op_policies: dict[str, ClassPolicy] = {}
        """The policies of the operators' data classes as this node's policy cache had them
        at its last reconcile (or change of a class): each operator is placed under its
        rule narrowed by its class's current policy (``core.streams.operator_now``)."""
        self._op_policies_read: set[str] = set()
        """Classes whose policy this node has looked up for its operators (found or not): an
        operator with a class not yet looked up is not placed (``_reconcile``)."""
        self._topic_records: OrderedDict[str, Residency | None] = OrderedDict()
        """Topics' replicated records (``TOPIC_PREFIX``) as last read or written here (None:
        no record), most recently read last (bounded)."""
        self._topic_read_at: dict[str, float] = {}
        self._topic_refresh: asyncio.Task[None] | None = None
        self._copies_task: asyncio.Task[None] | None = None
        self._mirror_refused: dict[str, str] = {}
        """Topics whose mirrors this node dropped under their class's read rule: why. Reads
        waiting then are refused; the next read checks the rule again."""
        self._installed_at: dict[str, float] = {}
        self._seen_sources: OrderedDict[str, None] = OrderedDict()
        """Shard sources (``node~epoch``) seen, most recent last (bounded)."""
        self._backup_of: dict[tuple[str, str], str | None] = {}
        self._repl_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._sent: dict[tuple[str, str, str], int] = {}
        self._sent_low: dict[tuple[str, str, str], int | None] = {}
        """Copies of gone sources' shards (``_keep_copies``): the operators' low water
        last sent to each copy."""
        self._bad_backup: dict[str, float] = {}
        self._skipped_at: dict[tuple[str, str], float] = {}
        """Per shard, when a read through this node last left it out (its subscriber
        reads it at the holder); ``_needed_at``: when one last read it here instead. Both
        go with the topic's followers (``_expire_followers``)."""
        self._needed_at: dict[tuple[str, str], float] = {}
        self._follow_wake: dict[tuple[str, str], asyncio.Event] = {}
        """Per shard, what wakes its follower lingering between fetches
        (``follower_pause_s``); one per running follower at most."""
        self._backup_memo: dict[tuple[str, str], tuple[list[Candidate], Candidate,
                                                      Residency | None, str | None]] = {}
        """Per shard, the backup ``_backup`` found, with the view, source and rule it
        found it for (bounded by ``BACKUP_MEMO_MAX``)."""
        self._output_copies: set[asyncio.Task[None]] = set()
        """Copies to a backup running beside their caller (a runner's outputs,
        ``_copy_outputs``; a publish answered once appended), held until they end."""
        self._stopping = False
        self._wakeup = Wakeup()
        """Wakes the reconcile loop from its idle wait: set where the plane gets
        something to hold (``_install``, ``_log``, ``_rpc_read``)."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        a = self.agent
        a.serve(api.PUBLISH, self._rpc_publish)
        a.serve(api.COPIED, self._rpc_copied)
        a.serve(api.REPLICATE, self._rpc_replicate)
        a.serve(api.FETCH, self._rpc_fetch)
        a.serve(api.READ, self._rpc_read)
        a.serve(api.OP_REGISTER, self._rpc_op_register)
        a.serve(api.OP_NOTIFY, self._rpc_op_notify)
        a.serve(api.OP_REMOVE, self._rpc_op_remove)
        a.serve(api.OP_LIST, self._rpc_op_list)
        a.serve(api.STATS, self._rpc_stats)
        a.spawn(self._reconcile_loop())

    async def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._topic_refresh is not None:
            self._topic_refresh.cancel()
        if self._copies_task is not None:
            self._copies_task.cancel()
        for t in [*self.runners.values(), *self.followers.values(), *self._output_copies]:
            t.cancel()

    # ------------------------------------------------------------------ view

    def _alive(self) -> list[Candidate]:
        """The live members as placement candidates. Built anew only when a member
        came, went, changed state or changed its meta (the candidates of one view are
        the same objects: the list is asked for several times per record, and building
        it took a Candidate per member each time: issue 23). Callers never change it."""
        members = self.agent.m.members
        seen = self._alive_seen
        if len(seen) == len(members) and all(
                m is w and m.state is st and m.meta is meta
                for m, (w, st, meta) in zip(members.values(), seen, strict=True)):
            return self._alive_view
        out = []
        for m in members.values():
            c = Candidate(m.name, m.meta.region, m.meta.zone, dict(m.meta.labels))
            self._known[m.name] = c
            if m.state <= State.SUSPECT:
                out.append(c)
        self._alive_seen = [(m, m.state, m.meta) for m in members.values()]
        self._alive_view = out
        return out

    def _states(self, alive: list[Candidate]) -> list[NodeState]:
        return [NodeState(member=c, capacity=Resources(1e6, 1 << 40, 1 << 16)) for c in alive]

    @property
    def source_id(self) -> str:
        """This node's own shards are named ``name~epoch``: a restarted node (a new epoch,
        empty in-memory logs) starts new shards, and its old ones stay with their backup
        under their old name, so no offset is ever reused."""
        return source_id(self.agent.name, self.agent.meta.tags.get(EPOCH_TAG, "0"))

    def _source_live(self, sid: str) -> bool:
        name, epoch = split_source(sid)
        m = self.agent.m.members.get(name)
        return m is not None and m.state <= State.SUSPECT and \
            m.meta.tags.get(EPOCH_TAG, "0") == epoch

    def _source_candidate(self, sid: str) -> Candidate | None:
        name, _ = split_source(sid)
        return self._known.get(name)

    def _sources(self) -> list[str]:
        """Every shard source worth serving: live members' current epochs, shards held
        here, and recently seen ones (a dead source's shard outlives it at its backup)."""
        for m in self.agent.m.members.values():
            if m.state <= State.SUSPECT:
                sid = source_id(m.name, m.meta.tags.get(EPOCH_TAG, "0"))
                self._seen_sources[sid] = None
                self._seen_sources.move_to_end(sid)
        for _, sid in self.logs:
            self._seen_sources[sid] = None
        while len(self._seen_sources) > self.cfg.max_sources:
            self._seen_sources.popitem(last=False)
        return list(self._seen_sources)

    def _holder(self, topic: str, sid: str, alive: list[Candidate]) -> str | None:
        src = self._source_candidate(sid)
        if src is None:
            return None
        return shard_holder(topic, src, self._source_live(sid), alive,
                            self.topic_residency.get(topic))

    def _region_of(self, name: str) -> str | None:
        m = self.agent.m.members.get(name)
        return None if m is None else m.meta.region

    # ------------------------------------------------------------------ calls

    async def _call(self, name: str, method: Method[Req, Rep], req: Req, *,
                    lane: str = LANE, label: str | None = None,
                    payload_bytes: int = 0) -> Rep:
        """Typed ``method`` on node ``name`` (in-process when it is this node), on ``lane``
        of the node's peer pool. Sends to another region wait the emulated one-way delay
        each way, and their payload bytes (``payload_bytes`` out, fetched entries back)
        are counted under ``label``."""
        if name == self.agent.name:
            return await self.agent.call_local(method, req)
        m = self.agent.m.members.get(name)
        delay = self.agent.delay_to(m.addr) if m is not None else 0.0
        if delay:
            await asyncio.sleep(delay)
        result = await call_node(self.agent, name, method, req, lane=lane,
                                 timeout_s=self.cfg.rpc_timeout_s)
        if delay:
            await asyncio.sleep(delay)
        if label is not None and m is not None and m.meta.region != self.agent.meta.region:
            got = payload_bytes
            if isinstance(result, FetchReply):
                got += sum(e.size for e in result.entries)
            if got:
                self.cross_region_bytes[label] += got
        return result

    def _release(self, names: set[str], lane: str) -> None:
        """A runner or follower stopped: close its lane to every node it read from."""
        with contextlib.suppress(RuntimeError):  # no running loop: the node is gone
            for name in names:
                self.agent.peers.release(name, lane)

    # ------------------------------------------------------------------ publish

    def _log(self, topic: str, source: str) -> ShardLog:
        key = (topic, source)
        log = self.logs.get(key)
        if log is None:
            if len({t for t, _ in self.logs}) >= self.cfg.max_topics and \
                    topic not in {t for t, _ in self.logs}:
                raise ValueError(f"this node already holds {self.cfg.max_topics} topics "
                                 "(max_topics)")
            log = ShardLog(topic, source, self.cfg.log)
            if source == self.source_id:
                log.copied = log.head  # this node's own shard: it keeps what is not copied
            for op in self.ops.values():
                if op.topic == topic:
                    log.register(op.name)
            self.logs[key] = log
            self._wakeup.set()
        return log

    def _refuse(self, rule: str, message: str, /, *, subject: str = "",
                data_class: str | None = None, **fields: Any) -> ApiError:
        """This plane's refusals (``runtime.services.refusal``)."""
        return refusal(self.agent, lambda key: self.stats.update({key: 1}), rule, message,
                       subject=subject, data_class=data_class, **fields)

    async def _resolve_class(self, wire: ResidencyWire | None, *, stream: bool
                             ) -> ResidencyWire | None:
        """``wire`` with its data class resolved to the class's policy (``core.policy``):
        for a topic (``stream``) the class's stream regions, for an operator its regions;
        an explicit rule may narrow the class's, never widen it."""
        if wire is None or wire.data_class is None:
            return wire
        cls = wire.data_class
        given = None if wire.regions is None else frozenset(wire.regions)
        explicit = Rule(stream_regions=given) if stream else Rule(regions=given)
        try:
            resolved = resolve(cls, explicit, await self.local.class_policies({cls}))
        except PolicyError as e:
            if e.rule == "malformed":
                raise ApiError(ErrorCode.INVALID, str(e)) from None
            raise self._refuse(e.rule, str(e), data_class=cls) from None
        return ResidencyWire.of(resolved.stream_residency() if stream
                                else resolved.residency())

    # ------------------------------------------------------------------ topic records

    def _topic_class(self, topic: str) -> str | None:
        """``topic``'s data class as this node knows it: its replicated record's, else the
        class it was published with here or its shard copies came under."""
        return (_class(self._topic_records.get(topic)) or _class(self.topic_declared.get(topic))
                or _class(self.topic_residency.get(topic)))

    def _remember_topic(self, topic: str, record: Residency | None) -> None:
        self._topic_records[topic] = record
        self._topic_records.move_to_end(topic)
        self._topic_read_at[topic] = time.monotonic()
        while len(self._topic_records) > 4 * self.cfg.max_topics:
            old, _ = self._topic_records.popitem(last=False)
            self._topic_read_at.pop(old, None)

    async def _read_topic_record(self, topic: str) -> Residency | None:
        """``topic``'s replicated record (a quorum KV read; None: none, or the read
        failed), remembered. A record already read is kept when the read finds none (a
        read that failed): a class, once recorded, does not change."""
        raw = await self.local.kv_get(TOPIC_PREFIX + topic)
        record: Residency | None = self._topic_records.get(topic)
        if raw:
            try:
                record = residency_of(_wire_decoder.decode(raw))
            except msgspec.DecodeError as e:
                self.agent.log_limited("stream_topic_record_unreadable", topic=topic,
                                       error=str(e)[:200])
        self._remember_topic(topic, record)
        return record

    async def _refresh_topic_records(self, topics: set[str]) -> None:
        """Read again the records of ``topics`` this node knows no class of, at most every
        ``TOPIC_RECORD_REFRESH_S`` each (a class once recorded does not change). A class
        newly read binds the topic's operators here (``_reconcile``)."""
        now = time.monotonic()
        for topic in sorted(topics):
            if _class(self._topic_records.get(topic)) is not None or \
                    now - self._topic_read_at.get(topic, -1e9) < TOPIC_RECORD_REFRESH_S:
                continue
            with contextlib.suppress(RpcError, ValueError):
                await self._read_topic_record(topic)

    async def _record_topic(self, topic: str, declared: Residency | None) -> None:
        """At the first publish of a classed topic here: check the declared rule against the
        topic's replicated record (``core.streams.topic_conflict``: refused, naming both)
        and write the record when there is none, so that every node reads the same class
        for the topic. Not yet recorded (the write failed): the next publish tries again."""
        if declared is None or declared.data_class is None or \
                self._topic_records.get(topic) == declared:
            return
        recorded = await self._read_topic_record(topic)
        try:
            publish_rule(topic, declared, recorded)
        except PolicyError as e:
            raise self._refuse(e.rule, str(e), subject=topic,
                               data_class=_class(recorded)) from None
        why = topic_conflict(topic, recorded, declared)
        if why is not None:
            raise PlacementError("residency", why)
        if recorded is not None:
            return
        try:
            await self.local.kv_put(TOPIC_PREFIX + topic,
                                    _spec_encoder.encode(ResidencyWire.of(declared)))
        except (ValueError, RpcError) as e:
            self.stats["kv_write_failed"] += 1
            self.agent.log("warning", "stream_kv_write_failed", key=TOPIC_PREFIX + topic,
                           error=str(e)[:200])
            return
        self._remember_topic(topic, declared)

    async def _publish_rule(self, topic: str, declared: Residency | None) -> Residency | None:
        """The rule a publish of ``topic`` declaring ``declared`` is taken under here
        (``core.streams.publish_rule``): one that names no class takes the class of the
        topic's replicated record. Before the topic's first shard or copy here, the record
        is read (a quorum KV read), so a node that never saw the topic's classed publish
        does not open an unbound shard of a classed topic; after that, the record as last
        read here (a class, once recorded, does not change)."""
        recorded = self._topic_records.get(topic)
        if _class(recorded) is None and _class(declared) is None and \
                topic not in self.topic_declared:
            recorded = await self._read_topic_record(topic)
        try:
            return publish_rule(topic, declared, recorded)
        except PolicyError as e:
            raise self._refuse(e.rule, str(e), subject=topic,
                               data_class=_class(recorded)) from None

    async def _admit(self, topic: str, declared: Residency | None) -> None:
        """Take records of ``topic`` published here under the rule ``declared`` (a
        producer's, or an operator's output rule): the topic's class from its record when
        ``declared`` names none, resolved against the class's current policy (an explicit
        rule may narrow it, never widen it), the same declared rule as the topic's
        earlier publishes here, this node's region allowed, and the topic's record
        written at its first classed publish. Then this node's shard and its backup
        follow the resolved rule (``topic_residency``)."""
        # A topic of a class follows the class's current policy (resolved anew at each
        # publish: the class is the authority); what must not change is the rule its
        # producers state (the class, and the topic's own narrower regions).
        declared = await self._publish_rule(topic, declared)
        res = residency_of(await self._resolve_class(ResidencyWire.of(declared), stream=True))
        known = self.topic_declared.get(topic, self.topic_residency.get(topic))
        if topic in self.topic_declared:
            other = known != declared
        else:  # only a backup's copy here: the class it came under
            other = topic in self.topic_residency and _class(known) != _class(declared)
        if other:
            raise PlacementError("residency", f"topic {topic!r} was published with another "
                                              f"residency rule ({_describe(known)}; this "
                                              f"publish: {_describe(declared)})")
        check_source_allowed(topic, self.agent.meta.region, res)
        await self._record_topic(topic, declared)
        self.topic_declared[topic] = declared
        self.topic_residency[topic] = res

    async def _rpc_publish(self, req: PublishRequest) -> PublishReply:
        topic = req.topic
        if len(req.records) > self.cfg.max_publish_records:
            raise ValueError(f"at most {self.cfg.max_publish_records} records per publish")
        limit = self.cfg.max_record_bytes
        if limit < api.MAX_RECORD_BYTES:  # else the contract has checked it
            for r in req.records:
                if len(r.value) > limit:
                    raise ValueError(f"record {r.id!r} has {len(r.value)} bytes; the limit "
                                     f"is {limit} (max_record_bytes)")
        await self._admit(topic, residency_of(req.residency))
        records = [(r.key, r.value, r.id, r.ts) for r in req.records]
        if req.ack == "copied":
            entries = await self.append_local(topic, records)
            return PublishReply(node=self.agent.name, source=self.source_id,
                                first=entries[0].offset, last=entries[-1].offset)
        # Answered once appended; the copy to the backup goes on beside (the producer
        # asks how far it got with stream.copied, and sends its next batch meanwhile).
        sid = self.source_id
        entries = await self.append_local(topic, records, copied=False)
        log = self._log(topic, sid)
        self._spawn_copy(self._replicate(topic, sid, log, entries[-1].offset + 1))
        return PublishReply(node=self.agent.name, source=sid, first=entries[0].offset,
                            last=entries[-1].offset, copied=_held_twice(log))

    async def _rpc_copied(self, req: CopiedRequest) -> CopiedReply:
        """Answer once this node's shard ``(topic, source)`` is held twice before
        ``offset`` (the copy ``_rpc_publish`` left under way, awaited through the
        shard's copy lock, or made here if none covered it)."""
        log = self.logs.get((req.topic, req.source))
        if log is None or req.source != self.source_id:
            raise ApiError(ErrorCode.NOT_FOUND, f"no shard {req.source} of topic "
                                                f"{req.topic!r} at {self.agent.name}")
        if log.copied is None or log.copied < req.offset:
            await self._replicate(req.topic, req.source, log, req.offset)
        return CopiedReply(copied=_held_twice(log))

    def _spawn_copy(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a copy to a backup beside its caller, held until it ends (cancelled when
        the plane stops)."""
        task = asyncio.get_running_loop().create_task(work)
        self._output_copies.add(task)
        task.add_done_callback(self._output_copies.discard)
        return task

    async def append_local(self, topic: str, records: list[tuple[str, bytes, str, float]],
                           *, copied: bool = True) -> list[LogEntry]:
        """Append to this node's shard of ``topic`` once there is room, then copy to the
        backup; returns when both hold the records (or only this node has them, when no
        backup exists). Raises ValueError when room does not come in ``publish_wait_s``.
        ``copied=False``: returns once the records are appended, the copy of the last
        of them left to the caller (``_copy_outputs``); a batch appended in parts, as
        room comes, still has its earlier parts copied before the next is appended."""
        sid = self.source_id
        log = self._log(topic, sid)
        deadline = time.monotonic() + self.cfg.publish_wait_s
        out: list[LogEntry] = []
        i = 0
        while i < len(records):
            if log.room() == 0:
                self.stats["publish_waits"] += 1
                if not await self._wait_ready(topic, log.room, deadline):
                    self.stats["publish_backpressure_timeouts"] += 1
                    raise ApiError(
                        ErrorCode.BACKPRESSURE,
                        f"topic {topic!r} at {sid}: {log.backlog()} records "
                        "wait for a slow operator; try again (backpressure)")
            async with self._lock:
                n = min(log.room(), len(records) - i)
                new = log.append(records[i:i + n])
                i += n
                self._notify(topic)
            out.extend(new)
            # One loop turn first: the long-polls this append woke (the operator runner
            # on this node, a subscriber's follower) answer before the copy to the backup
            # is encoded and sent, so a record's way to its operator does not include
            # the backup's send (nor, for a runner's outputs, the runner's next round).
            # The producer's acknowledgement still waits for the copy.
            await asyncio.sleep(0)
            if not copied and i >= len(records):
                break  # the caller copies
            await self._replicate(topic, sid, log)
        self.stats["records_in"] += len(records)
        return out

    async def _send_copy(self, target: str, topic: str, source: str,
                         entries: list[LogEntry], low: int | None) -> ReplicateReply:
        """Send ``entries`` of shard ``(topic, source)`` to ``target``'s copy, with the
        shard's low water mark and the topic's rule (the receiver checks both), on the
        replication lane; the receiver's reply (its copy's head)."""
        m = self.agent.m.members.get(target)
        far = m is not None and m.meta.region != self.agent.meta.region
        return await self._call(target, api.REPLICATE, ReplicateRequest(
            topic=topic, source=source, entries=entries, low=low,
            residency=ResidencyWire.of(self.topic_residency.get(topic)),
        ), lane=LANE_REPL, label=f"{topic}:repl",
            payload_bytes=sum(e.size for e in entries) if far else 0)

    async def _replicate(self, topic: str, source: str, log: ShardLog,
                         upto: int | None = None) -> None:
        """Bring the backup's copy of the shard up to ``log.head``; with ``upto``, only if
        the backup has not confirmed it before ``upto`` by the time this copy has its
        turn (copies of a shard go one at a time: a caller whose records the copy ahead
        of it carried is done when that one is, and does not wait a round trip more for
        the records appended since, which the next caller's copy carries). A backup that fails
        is passed over for ``bad_backup_s`` and the next nearest node takes its place
        (it gets the whole retained log); with no backup left the records stay
        acknowledged on this node alone, counted in ``unreplicated_appends``."""
        key = (topic, source)
        lock = self._repl_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if upto is not None and log.copied is not None and log.copied >= upto:
                return
            for _ in range(self.cfg.max_backup_attempts):
                backup = self._backup(topic, source)
                if backup is None:
                    break
                start = log.base
                if self._backup_of.get(key) == backup:
                    start = max(log.base, self._sent.get((topic, source, backup), log.base))
                pending = log.read(start, log.head - start, max_bytes=1 << 62)
                if not pending:
                    await self._copied(topic, log, log.head)
                    return
                try:
                    await self._send_copy(backup, topic, source, pending, log.low_water())
                except (RpcError, ValueError) as e:
                    self.stats["replicate_failed"] += 1
                    self.agent.log("warning", "stream_replicate_failed", topic=topic,
                                   backup=backup, error=str(e))
                    self._bad_backup[backup] = time.monotonic()
                    self._backup_of.pop(key, None)
                    continue
                self._backup_of[key] = backup
                self._sent[(topic, source, backup)] = pending[-1].offset + 1
                await self._copied(topic, log, pending[-1].offset + 1)
                return
            self.stats["unreplicated_appends"] += 1
            await self._copied(topic, log, None)

    def _backup(self, topic: str, source: str) -> str | None:
        """The backup ``_replicate`` copies shard ``(topic, source)`` to now
        (``core.streams.backup_for``), passing over the backups that failed in the last
        ``bad_backup_s``. The answer for one view of the members (``_alive``), source
        and rule is kept: it is asked at every copy, and ranking the members took as
        long as the copy's own bookkeeping (issue 23)."""
        now = time.monotonic()
        view = self._alive()
        res = self.topic_residency.get(topic)
        src = self._source_candidate(source)
        bad = self._bad_backup
        if src is None or (bad and any(
                now - bad.get(c.name, -1e9) <= self.cfg.bad_backup_s for c in view)):
            alive = [c for c in view
                     if now - bad.get(c.name, -1e9) > self.cfg.bad_backup_s]
            return backup_for(topic, src or Candidate(
                self.agent.name, self.agent.meta.region, self.agent.meta.zone), alive, res)
        key = (topic, source)
        memo = self._backup_memo.get(key)
        if memo is not None and memo[0] is view and memo[1] is src and memo[2] == res:
            return memo[3]
        backup = backup_for(topic, src, view, res)
        if len(self._backup_memo) >= BACKUP_MEMO_MAX:
            self._backup_memo.clear()
        self._backup_memo[key] = (view, src, res, backup)
        return backup

    async def _copied(self, topic: str, log: ShardLog, upto: int | None) -> None:
        """The backup confirmed its copy of ``log`` up to ``upto`` (``None``: there is no
        backup to copy to): the records every operator committed before it may go
        (``ShardLog.confirm_copy``). Only a producer waiting for room (the log at its
        bounds) is woken by it: readers wait for records, which this never adds. The
        change itself needs no lock (no await splits it, and a waiter checks under the
        lock before it waits); the lock is taken only to notify, so an ack does not queue
        for it behind the long-polls an append just woke."""
        full = log.room() == 0
        log.confirm_copy(upto)
        if full and log.room() > 0:
            async with self._lock:
                self._notify(topic)

    async def _rpc_replicate(self, req: ReplicateRequest) -> ReplicateReply:
        topic = req.topic
        if req.residency is not None:
            res = req.residency.rule()
            check_source_allowed(topic, self.agent.meta.region, res)
            cls = res.data_class
            if cls is not None:
                # The backup checks the class's policy as it knows it, not only the rule
                # the primary sent (the same check as an object's replica receiver).
                why = copy_refusal(self.agent.meta.region, res,
                                   await self.local.class_policies({cls}), stream=True)
                if why is not None:
                    raise self._refuse("residency", f"topic {topic!r}: {why}", subject=topic,
                                       data_class=cls)
            self.topic_residency[topic] = res
        else:
            self.topic_residency.setdefault(topic, None)
        new = (topic, req.source) not in self.logs
        log = self._log(topic, req.source)
        res_now = self.topic_residency.get(topic)
        if new and res_now is not None and res_now.data_class is not None:
            self.agent.record(Kind.COPY_MADE, f"{topic}/{req.source}",
                              data_class=res_now.data_class,
                              from_region=caller.node_region(self.agent.m.members),
                              detail=f"stream backup under {res_now.describe()}")
        async with self._lock:
            n = log.apply(req.entries, req.low)
            self._notify(topic)
        self.stats["records_backed_up"] += n
        return ReplicateReply(head=log.head)

    # ------------------------------------------------------------------ gone sources

    async def _keep_copies(self) -> None:
        """Keep two copies of every gone source's shard this node holds a copy of (run
        beside the reconcile loop): the nodes that should hold them are
        ``core.streams.shard_copies`` from this node's view (the holder readers go to,
        and the next node in the same order, which becomes the holder if that one dies
        too); this node sends its records to the others (``frozen_copy_targets``), so
        the two copies hold everything any copy holds, and a copy outside them is
        dropped once they confirmed it. Without this a backup holding a dead source's
        shard was its only copy (a second failure lost its acknowledged records), and a
        backup the source had switched to after passing over a failed one held records
        that readers, sent to the first backup by the rule, never read."""
        alive = self._alive()
        for key in sorted(self.logs):
            topic, sid = key
            src = self._source_candidate(sid)
            if sid == self.source_id or src is None or self._stopping:
                continue
            live, res = self._source_live(sid), self.topic_residency.get(topic)
            if shard_holder(topic, src, live, alive, res) == src.name:
                continue  # its source serves it and keeps its backup itself
            copies = shard_copies(topic, src, live, alive, res)
            if not copies:
                continue
            targets, keep = frozen_copy_targets(self.agent.name, copies)
            lock = self._repl_locks.setdefault(key, asyncio.Lock())
            async with lock:
                log = self.logs.get(key)
                if log is None:
                    continue
                done = [await self._copy_frozen(topic, sid, log, t) for t in targets]
                now_sent = {self._target_id(t) for t in targets}
                for k in [k for k in self._sent if k[:2] == key and k[2] not in now_sent]:
                    del self._sent[k]  # a copy no longer wanted: known again if it is
                    self._sent_low.pop(k, None)
                if keep or not all(done):
                    continue
                del self.logs[key]
                for k in [k for k in self._sent if k[:2] == key]:
                    del self._sent[k]
                    self._sent_low.pop(k, None)
            self._repl_locks.pop(key, None)
            self.stats["frozen_copies_handed_over"] += 1
            cls = _class(self.topic_residency.get(topic))
            if cls is not None:
                self.agent.record(Kind.COPY_DROPPED, f"{topic}/{sid}", data_class=cls,
                                  detail=f"stream copy of {log.head - log.base} records "
                                         f"handed over to {', '.join(copies)}"[:1000])
            async with self._lock:
                self._notify(topic)

    def _target_id(self, name: str) -> str:
        """What a copy sent to node ``name`` is known by: the node's run (``node~epoch``),
        since a restarted node lost its in-memory copies."""
        m = self.agent.m.members.get(name)
        return source_id(name, "0" if m is None else m.meta.tags.get(EPOCH_TAG, "0"))

    async def _copy_frozen(self, topic: str, source: str, log: ShardLog, target: str
                           ) -> bool:
        """Bring ``target``'s copy of gone source ``source``'s shard up to this node's
        ``log`` (records and operators' commits), in bounded batches; whether it now
        holds everything this node holds. A failure is counted and tried again at the
        next round."""
        sk = (topic, source, self._target_id(target))
        low = log.low_water()
        start = max(log.base, self._sent.get(sk, log.base))
        if sk in self._sent and start >= log.head and self._sent_low.get(sk) == low:
            return True
        while True:
            pending = log.read(start, self.cfg.batch_records * 16)
            try:
                reply = await self._send_copy(target, topic, source, pending, low)
            except (RpcError, ValueError) as e:
                self.stats["frozen_copy_failed"] += 1
                self.agent.log("warning", "stream_frozen_copy_failed", topic=topic,
                               source=source, target=target, error=str(e)[:200])
                self._sent.pop(sk, None)
                return False
            if pending:
                start = pending[-1].offset + 1
                self.stats["frozen_records_copied"] += len(pending)
            if reply.head < start and log.base < start:
                start = max(log.base, reply.head)  # it lacks records thought sent: resend
                continue
            start = max(start, min(reply.head, log.head))
            self._sent[sk] = start
            self._sent_low[sk] = low
            if start >= log.head:
                return True

    # ------------------------------------------------------------------ policy changes

    def class_changed(self, name: str) -> None:
        """The data plane's policy cache saw class ``name``'s policy change (or read it
        for the first time): this node's shards of the class's topics follow it."""
        if not self._stopping:
            self.agent.spawn(self._class_changed(name))

    async def _class_changed(self, cls: str) -> None:
        """Make this node's shard copies of the topics of class ``cls`` follow the
        class's current policy, as the simulator's nodes do (``sim/policy_chaos.py``):

        - each topic's rule in force becomes ``core.streams.topic_rule`` of its declared
          rule (a backup, which never saw the declaration, narrows the rule its source
          sent);
        - a copy whose region the rule still allows stays; if this node is its source,
          its backup is re-placed from the new rule (``backup_for``; the new backup
          checks the rule itself, ``_rpc_replicate``), and gets the whole retained log;
        - a backup copy the rule forbids here (``core.streams.shard_refusal``) is
          dropped and audited (``copy_dropped``); its source re-places its backup when
          it hears the change;
        - a source the rule now forbids refuses new records of the topic, naming the rule
          (``check_source_allowed`` at publish). Its existing records are first copied
          to a backup inside the new rule (``_replicate``), then its own copy is dropped
          and audited: the class's policy is the authority, so no copy of its records may
          stay outside it, and handing them over first keeps every acknowledged record
          that a node inside the rule can take. ``core.streams.shard_holder`` then sends
          readers of the shard to that backup. If no node inside the rule can take them
          (none alive, or all refuse), the copy is dropped all the same (the records are
          lost, counted in ``shard_records_lost``): a residency rule wins over
          availability, as for an object whose every allowed holder is gone.
        """
        if cls in self._op_classes():
            # Operators of the class follow its rule at once (not at the next reconcile).
            await self._refresh_op_policies({cls})
            self._reconcile()
        await self._check_mirrors({cls})  # and subscribers' mirrors of its topics
        topics = sorted(t for t, r in self.topic_residency.items()
                        if r is not None and r.data_class == cls)
        if not topics:
            return
        try:
            policies = await self.local.class_policies({cls})
        except ApiError as e:  # no quorum to read it now: the next refresh tells again
            self.agent.log("debug", "stream_policy_read_failed", data_class=cls,
                           error=str(e)[:200])
            return
        region = self.agent.meta.region
        for topic in topics:
            declared = self.topic_declared.get(topic, self.topic_residency.get(topic))
            self.topic_residency[topic] = topic_rule(declared, policies)
            why = shard_refusal(region, declared, policies)
            for key in sorted(k for k in self.logs if k[0] == topic):
                log = self.logs.get(key)
                if log is None:
                    continue
                mine = key[1] == self.source_id
                if mine:
                    # Re-place the backup inside the rule (hand the records over first
                    # when this node itself must let go of them).
                    await self._replicate(topic, key[1], log)
                if why is not None:
                    await self._drop_shard(topic, key[1], cls, why)

    async def _drop_shard(self, topic: str, source: str, cls: str, why: str) -> None:
        """Drop this node's copy of shard ``(topic, source)``, which the rule of class
        ``cls`` forbids here (``why``), and audit it."""
        key = (topic, source)
        async with self._repl_locks.setdefault(key, asyncio.Lock()):
            log = self.logs.pop(key, None)
        self._repl_locks.pop(key, None)
        backup = self._backup_of.pop(key, None)
        for k in [k for k in self._sent if k[:2] == key]:
            del self._sent[k]
        if log is None:
            return
        mine = source == self.source_id
        held = log.head - log.base
        self.stats["shards_dropped_policy"] += 1
        if mine and backup is None and held:
            self.stats["shard_records_lost"] += held
        self.agent.record(Kind.COPY_DROPPED, f"{topic}/{source}", data_class=cls,
                          detail=f"stream {'shard' if mine else 'backup'} of {held} "
                                 f"records dropped: {why}"[:1000])
        self.agent.log("info", "stream_shard_dropped", topic=topic, source=source,
                       data_class=cls, records=held)
        async with self._lock:
            self._notify(topic)

    # ------------------------------------------------------------------ fetch

    async def _rpc_fetch(self, req: FetchRequest) -> FetchReply:
        topic, source, limit = req.topic, req.source, req.limit
        wait = min(req.wait_s, self.cfg.read_wait_max_s)
        deadline = time.monotonic() + wait
        # Long-poll for a shard that does not exist yet too: its first record should not
        # wait for the asker's retry timer.
        log = await self._wait_ready(topic, lambda: self.logs.get((topic, source)), deadline)
        if log is None:
            return FetchReply(missing=True)
        await self._check_fetch(topic, req.op)
        if req.op is not None:
            log.register(req.op)
            if req.committed is not None:
                await self._commit(topic, log, req.op, req.committed)
        start = log.base if req.offset is None else req.offset
        entries = await self._wait_ready(topic, lambda: log.read(start, limit), deadline)
        return FetchReply(entries=entries, base=log.base, head=log.head)

    async def _commit(self, topic: str, log: ShardLog, op: str, offset: int) -> None:
        """Operator ``op`` has processed ``log`` before ``offset`` (its outputs copied):
        its records may go, and a producer waiting for room goes on."""
        async with self._lock:
            low = log.low_water()
            log.commit(op, offset)
            if log.low_water() != low:  # room for a waiting producer, maybe
                self._notify(topic)

    async def _policies_if_readable(self, cls: str) -> dict[str, ClassPolicy] | None:
        """The policy of class ``cls`` as this node knows it (``{}``: none), or None when
        it cannot be read now (no KV quorum); any other error is raised."""
        try:
            return await self.local.class_policies({cls})
        except ApiError as e:
            if e.code is not ErrorCode.UNAVAILABLE:
                raise
            return None

    async def _check_fetch(self, topic: str, op: str | None = None) -> None:
        """Refuse a node outside a classed topic's regions a fetch of its records when
        the class's policy forbids cross-region reads (``core.policy.read_refusal``): it
        would hold them (a subscriber's mirror) or relay them. Operator runners and
        followers alike fetch here; clients do not. An operator runner (``op``) outside
        the class's regions is refused whatever the read rule
        (``core.streams.operator_refusal``): no record of the class is processed outside
        its regions, even by a runner placed before its node read the topic's class."""
        res = self.topic_residency.get(topic)
        cls = None if res is None else res.data_class
        region = caller.node_region(self.agent.m.members)
        if cls is None or region is None:
            return
        policies = await self._policies_if_readable(cls)
        if policies is None:
            return  # no quorum to read the policy: as a receiver does, the rule it has
        why = read_refusal(region, cls, policies)
        if why is not None:
            raise self._refuse("cross_region_read", f"records of topic {topic!r}: {why}",
                               subject=topic, data_class=cls, region=region)
        why = None if op is None else operator_refusal(region, cls, policies)
        if why is not None:
            raise self._refuse("residency", f"operator {op!r} on topic {topic!r}: {why}",
                               subject=topic, data_class=cls, region=region)

    def _notify(self, topic: str) -> None:
        """Wake the long-polls of ``topic`` (the caller holds ``_lock``)."""
        entry = self._waits.get(topic)
        if entry is not None:
            entry[0].notify_all()

    def _wake_all(self) -> None:
        """Wake every long-poll (the caller holds ``_lock``)."""
        for cv, _ in self._waits.values():
            cv.notify_all()

    async def _wait_ready(self, topic: str, ready: Callable[[], _T], deadline: float) -> _T:
        """``ready()`` as soon as it is truthy, else its last value at ``deadline`` (or
        when the plane stops). It is evaluated with ``_lock`` held, right before each
        wait: every change a long-poll waits for (an append, a copy applied, a commit, a
        mirror filled) is made or announced under that lock with ``_notify(topic)``, so
        none can land between the check and the wait. (Checked outside the lock, a change
        and its notify could slip in while the waiter queued for the lock, and the waiter
        then slept through ready records until its timer ran out: issue 23's 0.5 s
        stall.) A change wakes only its topic's waiters, and a wait is a plain
        ``Condition.wait`` under a deadline (no task made per wait).

        What is ready already is answered at once, without the lock and the topic's
        condition (no change made under the lock awaits halfway, so none is seen in
        part): only a wait needs the check under the lock, and it makes it."""
        got = ready()
        if got:
            return got
        async with self._lock:
            entry = self._waits.get(topic)
            cv = asyncio.Condition(self._lock) if entry is None else entry[0]
            self._waits[topic] = (cv, 1 if entry is None else entry[1] + 1)
            try:
                while True:
                    got = ready()
                    left = deadline - time.monotonic()
                    if got or left <= 0 or self._stopping:
                        return got
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(left):
                            await cv.wait()
            finally:
                cv, n = self._waits[topic]
                if n <= 1:
                    del self._waits[topic]
                else:
                    self._waits[topic] = (cv, n - 1)

    # ------------------------------------------------------------------ operators

    async def _rpc_op_register(self, req: OpRegisterRequest) -> OpRegisterReply:
        name, topic = req.name, req.topic
        if req.output == topic:
            raise ValueError("an operator's output topic must differ from its input")
        if name not in self.ops and len(self.ops) >= self.cfg.max_operators:
            raise ValueError(f"{self.cfg.max_operators} operators already run (max_operators)")
        from meshscale.runtime.worker_main import function_id

        fn_bytes = req.fn_bytes
        fn_id = function_id(fn_bytes)
        if req.fn_id not in (None, fn_id):
            raise ValueError("fn_bytes do not hash to fn_id")
        # An operator runs under its input topic's class: one that names none gets the
        # class of the topic's replicated record (read now), so its spec, which every node
        # reads, carries it; one that names another class is refused, naming both.
        topic_cls = _class(await self._read_topic_record(topic)) or self._topic_class(topic)
        try:
            declared = operator_rule(name, topic, residency_of(req.residency), topic_cls)
        except PolicyError as e:
            raise self._refuse(e.rule, str(e), subject=topic, data_class=topic_cls) from None
        residency = await self._resolve_class(ResidencyWire.of(declared), stream=False)
        output_rule_ = await self._output_rule(req, residency_of(residency), topic_cls)
        stored = await self.local.put_object(fn_bytes, self.cfg.fn_replicas)
        spec = OperatorSpec(
            name=name, topic=topic, output=req.output, mode=req.mode, region=req.region,
            regions=req.regions, residency=residency, labels=dict(req.labels),
            output_residency=ResidencyWire.of(output_rule_),
            fn_id=fn_id, fn_object=str(stored["id"]), batch=req.batch)
        if spec.mode == "central" and not spec.region:
            spec.region = central_region(self._alive())
        # Refuse now, naming the rule, if no live node may run it (a source is needed only
        # to rank; feasibility does not depend on it).
        alive = self._alive()
        me = self._known[self.agent.name]
        try:
            place_operator(_placement(spec), topic, me, self._states(alive))
        except (SchedulingError, PlacementError) as e:
            raise PlacementError(getattr(e, "rule", "placement"), str(e)) from None
        self._fn_bytes[fn_id] = fn_bytes
        if spec.output is not None:
            # The output topic's record carries the output's class before any record of
            # it is published, so its shards, backups, subscribers' nodes and downstream
            # operators follow the class from the first.
            await self._record_topic(spec.output, output_rule_)
        await self._kv_put(OP_PREFIX + name, _spec_encoder.encode(spec))
        index = await self.local.kv_get(OPS_INDEX_KEY)
        names = set(_names_decoder.decode(index)) if index else set()
        if name not in names:
            names.add(name)
            await self._kv_put(OPS_INDEX_KEY, _spec_encoder.encode(sorted(names)))
        self._install(spec)
        await self._notify_all(alive, OpNotifyRequest(spec=spec))
        await self._refresh_op_policies()
        self._reconcile()
        return OpRegisterReply(name=name, fn_id=fn_id, mode=spec.mode, region=spec.region)

    async def _output_rule(self, req: OpRegisterRequest, own: Residency | None,
                           topic_cls: str | None) -> Residency | None:
        """The rule operator ``req.name``'s output topic is published under (unresolved):
        ``core.streams.output_rule`` of the operator's classes (``own``, its resolved rule,
        and its input topic's class) and the output rule it declared; without a declared
        one, an output topic that already has a record keeps it when its class is at
        least as strict. Refused, naming both, when the declared (or recorded) class
        widens the operator's, names another class than the output topic's record, or
        the output rule widens its class's own rule."""
        if req.output is None:
            if req.output_residency is not None:
                raise ValueError("an output rule needs an output topic")
            return None
        output = req.output
        declared = residency_of(req.output_residency)
        recorded = await self._read_topic_record(output)
        classes = operator_classes(own, topic_cls)
        names = set(classes) | {c for c in (_class(declared), _class(recorded)) if c}
        policies = await self.local.class_policies(names) if names else {}
        try:
            if declared is None and _class(recorded) is not None:
                rule = output_rule(req.name, output, classes, recorded, policies)
            else:
                rule = publish_rule(output, output_rule(req.name, output, classes, declared,
                                                        policies), recorded)
        except PolicyError as e:
            raise self._refuse(e.rule, str(e), subject=output,
                               data_class=_class(declared) or (classes or (None,))[0]
                               ) from None
        why = topic_conflict(output, recorded, rule) if _class(rule) is not None else None
        if why is not None:
            raise PlacementError("residency", why)
        # An explicit rule may narrow its class's, never widen it (checked, not kept: the
        # record holds the declared rule, resolved at each publish).
        await self._resolve_class(ResidencyWire.of(rule), stream=True)
        return rule

    def _output_declared(self, spec: OperatorSpec) -> Residency | None:
        """The rule ``spec``'s runner publishes its outputs under: the one its registration
        wrote (its spec) when that names a class; else, when the operator has a class now
        (its input topic recorded one since it was registered), ``output_rule`` of its
        classes as this node knows them (the output topic's record, when it has a class,
        must be at least as strict). Raises ``PolicyError`` when that class widens."""
        declared = residency_of(spec.output_residency)
        if _class(declared) is not None or spec.output is None:
            return declared
        classes = operator_classes(residency_of(spec.residency), self._topic_class(spec.topic))
        if not classes:
            return declared
        recorded = self._topic_records.get(spec.output)
        return output_rule(spec.name, spec.output, classes,
                           recorded if _class(recorded) is not None else declared,
                           self._op_policies)

    async def _notify_all(self, alive: list[Candidate], req: OpNotifyRequest) -> None:
        """Tell every other live node of an operator registered or removed (a node that
        misses it learns from the KV within a few seconds)."""

        async def notify(n: str) -> None:
            with contextlib.suppress(RpcError, ValueError, TimeoutError):
                await self._call(n, api.OP_NOTIFY, req)

        await asyncio.gather(*(notify(c.name) for c in alive if c.name != self.agent.name))

    def _install(self, spec: OperatorSpec) -> None:
        if spec.name not in self.ops:
            self._installed_at[spec.name] = time.monotonic()
        self.ops[spec.name] = spec
        self._wakeup.set()
        self.op_stats.setdefault(spec.name, Counter())
        for (topic, _), log in self.logs.items():
            if topic == spec.topic:
                log.register(spec.name)

    def _uninstall(self, name: str) -> bool:
        if self.ops.pop(name, None) is None:
            return False
        for key in [k for k in self.runners if k[0] == name]:
            self.runners.pop(key).cancel()
        for log in self.logs.values():
            log.unregister(name)
        # Producers held for room by it go on now, however the removal was heard (a
        # notice, this node's own remove, or the KV's index read by the reconcile loop),
        # not when their publish_wait_s runs out.
        self._notify_changed()
        self.agent.log("info", "stream_operator_removed", operator=name)
        return True

    def _rpc_op_notify(self, req: OpNotifyRequest) -> None:
        if (req.spec is None) == (req.removed is None):
            raise ValueError("stream.op_notify carries one of spec and removed")
        if req.removed is not None:
            self._uninstall(req.removed)
        elif req.spec is not None:
            self._install(req.spec)
            self._reconcile()

    def _notify_changed(self) -> None:
        async def wake() -> None:
            async with self._lock:
                self._wake_all()

        self.agent.spawn(wake())

    async def _rpc_op_remove(self, req: OpRemoveRequest) -> OpRemoveReply:
        """Remove an operator everywhere: its runners stop, its shards stop holding
        records for it (producers waiting on it are released)."""
        name = req.name
        index = await self.local.kv_get(OPS_INDEX_KEY)
        names = set(_names_decoder.decode(index)) if index else set()
        if name not in names and name not in self.ops:
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown operator {name!r}")
        names.discard(name)
        await self._kv_put(OPS_INDEX_KEY, _spec_encoder.encode(sorted(names)))
        with contextlib.suppress(ValueError, RpcError):
            await self.local.kv_delete(OP_PREFIX + name)
        self._uninstall(name)
        await self._notify_all(self._alive(), OpNotifyRequest(removed=name))
        return OpRemoveReply(removed=name)

    def _rpc_op_list(self, _: Empty) -> OpListReply:
        return OpListReply(
            operators=[OperatorInfo(**msgspec.structs.asdict(s),
                                    stats=dict(self.op_stats.get(s.name, {})))
                       for s in self.ops.values()],
            runners=sorted(f"{o}@{s}" for o, s in self.runners))

    async def _load_ops_from_kv(self) -> None:
        if self.agent.worker_pool() is None:
            return  # the compute plane has not started yet
        index = await self.local.kv_get(OPS_INDEX_KEY)
        if not index:
            return
        with contextlib.suppress(Exception):
            listed = set(_names_decoder.decode(index))
            for name in [n for n in self.ops if n not in listed and
                         time.monotonic() - self._installed_at.get(n, 0.0) > 30.0]:
                self._uninstall(name)  # removed while this node missed the notice
            for name in listed:
                if name in self.ops:
                    continue
                raw = await self.local.kv_get(OP_PREFIX + name)
                if not raw:
                    continue
                try:
                    spec = _spec_decoder.decode(raw)
                except msgspec.DecodeError as e:  # written by another version
                    self.agent.log_limited("stream_operator_spec_unreadable",
                                           operator=name, error=str(e)[:200])
                    continue
                self._install(spec)

    def _idle(self) -> bool:
        """Nothing here for a reconcile round to act on but the operators' index: no
        operator, runner, shard, mirror, follower or subscription."""
        return not (self.ops or self.runners or self.logs or self.mirrors
                    or self.followers or self._follow_used)

    async def _reconcile_loop(self) -> None:
        loaded_at = -math.inf
        wait_s = self.cfg.reconcile_interval_s
        while not self._stopping:
            await self._wakeup.wait(wait_s)
            if self._stopping:
                return
            now = time.monotonic()
            if now - loaded_at >= self.cfg.ops_reload_s:
                loaded_at = now
                with contextlib.suppress(Exception):
                    await self._load_ops_from_kv()
            if self._topic_refresh is None or self._topic_refresh.done():
                # Beside the loop (quorum reads may be slow), one at a time.
                self._topic_refresh = asyncio.get_running_loop().create_task(
                    self._refresh_topic_records(
                        {s.topic for s in self.ops.values()} | set(self._follow_used)))
            if self._copies_task is None or self._copies_task.done():
                # Beside the loop too (a copy waits on another node), one round at a time.
                self._copies_task = asyncio.get_running_loop().create_task(
                    self._keep_copies_logged())
            await self._refresh_op_policies()
            try:
                self._reconcile()
            except Exception as e:  # never let the loop die
                self.agent.log("error", "stream_reconcile_failed", error=str(e))
            try:
                await self._check_mirrors()
            except Exception as e:
                self.agent.log("error", "stream_mirror_check_failed", error=str(e)[:200])
            self._expire_followers(now)
            wait_s = loop_wait_s(time.monotonic(), idle=self._idle(),
                                 interval_s=self.cfg.reconcile_interval_s,
                                 idle_max_s=self.cfg.reconcile_idle_max_s,
                                 next_duty_at=loaded_at + self.cfg.ops_reload_s)

    async def _keep_copies_logged(self) -> None:
        try:
            await self._keep_copies()
        except Exception as e:  # never let a failed round stop the next
            self.agent.log("error", "stream_keep_copies_failed", error=str(e)[:200])

    def _op_classes(self) -> set[str]:
        """The classes that bound this node's operators: their own and their topics'."""
        return {c for s in self.ops.values()
                for c in operator_classes(residency_of(s.residency), self._topic_class(s.topic))}

    async def _refresh_op_policies(self, classes: set[str] | None = None) -> None:
        """Read the operators' classes' policies from this node's policy cache; on a read
        that fails (no quorum), the ones it had are kept (as a receiver keeps its rule)."""
        names = self._op_classes() if classes is None else classes
        if not names:
            return
        try:
            got = await self.local.class_policies(names)
        except ApiError as e:
            self.agent.log("debug", "stream_policy_read_failed", data_class=sorted(names)[0],
                           error=str(e)[:200])
            return
        for name in names:
            if name in got:
                self._op_policies[name] = got[name]
            else:  # the class has no policy (any more): it narrows nothing
                self._op_policies.pop(name, None)
            self._op_policies_read.add(name)
        if len(self._op_policies_read) > 4 * self.cfg.max_operators:
            self._op_policies_read &= self._op_classes()

    def _reconcile(self) -> None:
        """Start the runners this node owns, stop the others. Each operator is placed under
        its rule narrowed by the current policies of its class and its input topic's
        (``core.streams.operator_classes``, ``operator_now``): a class narrowed after the
        operator was registered, or a topic first published with a class after it, moves
        its runners inside the rule (and stops them where none is left). An operator with
        a class whose policy this node has not looked up yet is not placed until it has
        (``_refresh_op_policies``, within a reconcile interval): never unbound."""
        if self._stopping or self.agent.membership is None:
            return
        states = self._states(self._alive())
        sources = []
        for sid in self._sources():
            src = self._source_candidate(sid)
            if src is not None:
                sources.append(ShardSource(sid, src, self._source_live(sid)))
        ops = []
        for spec in self.ops.values():
            classes = operator_classes(residency_of(spec.residency),
                                       self._topic_class(spec.topic))
            if any(c not in self._op_policies_read for c in classes):
                continue
            placed = operator_now(_placement(spec), classes, self._op_policies)
            if placed is not None:
                ops.append((placed, spec.topic, spec.mode == "near-source"))
        want = runners_wanted(
            self.agent.name, ops,
            sources, states, lambda topic, sid: (topic, sid) in self.logs)
        for key in list(self.runners):
            if key not in want:
                self.runners.pop(key).cancel()
        for key in want:
            task = self.runners.get(key)
            if task is None or task.done():
                self.runners[key] = asyncio.get_running_loop().create_task(
                    self._run_operator(key[0], key[1]))

    async def _fn(self, spec: OperatorSpec) -> bytes:
        data = self._fn_bytes.get(spec.fn_id)
        if data is None:
            data = await self.local.read_object(spec.fn_object)
            self._fn_bytes[spec.fn_id] = data
        return data

    async def _checkpoint(self, op: str, source: str, offset: int) -> None:
        await self._kv_put(f"{OFFSET_PREFIX}{op}/{source}", str(offset).encode())

    async def _kv_put(self, key: str, value: bytes) -> None:
        """A quorum KV write whose failure is logged and counted, not raised (the next
        checkpoint or reconcile writes again)."""
        try:
            await self.local.kv_put(key, value)
        except (ValueError, RpcError) as e:
            self.stats["kv_write_failed"] += 1
            self.agent.log("warning", "stream_kv_write_failed", key=key, error=str(e)[:200])

    async def _run_operator(self, op_name: str, source: str) -> None:
        spec = self.ops[op_name]
        st = self.op_stats.setdefault(op_name, Counter())
        raw = await self.local.kv_get(f"{OFFSET_PREFIX}{op_name}/{source}")
        offset: int | None = int(raw) if raw else None
        st["runner_starts"] += 1
        self.agent.log("info", "stream_operator_start", operator=op_name, source=source,
                       offset=offset)
        await self._warm(spec, st)
        lane = _fetch_lane(op_name, source)
        holders: set[str] = set()
        try:
            await self._read_shard(spec, source, offset, lane, holders, st)
        finally:
            self._release(holders, lane)

    async def _read_shard(self, spec: OperatorSpec, source: str, offset: int | None,
                          lane: str, holders: set[str], st: Counter[str]) -> None:
        """The runner's loop: fetch a batch from the shard's holder, run it, append the
        outputs, commit (``holders``: the nodes it fetched from, for ``_release``).

        The outputs' copy to the output shard's backup goes on beside the loop: the next
        batch is fetched and run while it travels (awaited in the loop, it held every
        record that landed meanwhile for a round trip to the backup: issue 23). What the
        runner commits (with its next fetch, and in its checkpoint) is only ever the
        offset before which every batch's outputs are confirmed copied (``committed``),
        so a record is released only once its outputs are held twice. Outputs are still
        appended in order, by the loop itself; at most ``OUTPUT_COPIES_IN_FLIGHT``
        batches wait for their copy."""
        op_name = spec.name
        last_ckpt = time.monotonic()
        backoff = 0.1
        pending = _OutputCopies(offset)
        ckpt_at = offset
        # The offset checkpoint is a quorum KV write, which waits on other nodes (slow
        # or far ones too, up to rpc_timeout_s): it runs beside the loop (one at a
        # time, so they land in order), never in its way. Awaited in the loop, it held
        # every record that landed meanwhile, every checkpoint_interval_s. A checkpoint
        # only ever trails the outputs copied; one that is late or lost means
        # replays, which the derived output ids absorb.
        ckpt: asyncio.Task[None] | None = None
        try:
            while not self._stopping:
                committed = pending.settle()
                now = time.monotonic()
                if committed is not None and committed != ckpt_at and \
                        now - last_ckpt >= self.cfg.checkpoint_interval_s and (
                        ckpt is None or ckpt.done()):
                    last_ckpt, ckpt_at = now, committed
                    ckpt = asyncio.get_running_loop().create_task(
                        self._checkpoint(op_name, source, committed))
                alive = self._alive()
                holder = self._holder(spec.topic, source, alive)
                if holder is None:
                    await asyncio.sleep(0.5)
                    continue
                holders.add(holder)
                # A copy that ends while the fetch waits commits at once on this node's
                # shard (``_copy_outputs``); a remote holder hears a commit only with a
                # fetch, so while copies travel that fetch does not wait (a producer
                # held for room would wait for its timer).
                local = holder == self.agent.name
                try:
                    r = await self._call(holder, api.FETCH, FetchRequest(
                        topic=spec.topic, source=source, offset=offset, limit=spec.batch,
                        wait_s=self.cfg.fetch_wait_s if local or not pending.batches
                        else 0.0, op=op_name, committed=committed,
                    ), lane=lane, label=f"{spec.topic}:fetch:{op_name}")
                except (RpcError, ValueError, OSError) as e:
                    st["fetch_errors"] += 1
                    self.agent.log("debug", "stream_fetch_failed", operator=op_name,
                                   source=source, holder=holder, error=str(e))
                    await asyncio.sleep(backoff)
                    backoff = min(2.0, backoff * 2)
                    continue
                backoff = 0.1
                if r.missing:
                    continue  # the holder waited fetch_wait_s for the shard to appear
                entries = r.entries
                if offset is None:
                    offset = r.base
                    if not pending.batches:
                        pending.committed = ckpt_at = offset  # where it starts
                elif entries and entries[0].offset > offset:
                    st["records_skipped"] += entries[0].offset - offset  # evicted before read
                if not entries:
                    if pending.batches and not local:
                        oldest = pending.batches[0].task
                        if oldest is not None:
                            await asyncio.wait([oldest])  # then commit with the next fetch
                    continue
                began = _clock()
                outputs = await self._apply(spec, entries, st)
                if outputs is None:
                    await asyncio.sleep(1.0)
                    continue
                # The batch's time in the worker pool (hand-off, the call, the way back):
                # what the operator costs where it runs, shared cores and all (issue 17).
                st["apply_us"] += round((_clock() - began) * 1e6)
                st["batches_applied"] += 1
                batch = _Batch(entries[-1].offset + 1)
                if spec.output is not None and outputs:
                    # The output topic is published under the operator's output rule (its
                    # class, written to the output topic's record at registration).
                    try:
                        await self._admit(spec.output, self._output_declared(spec))
                    except (ApiError, ValueError) as e:
                        st["output_refused"] += 1
                        self.agent.log_limited("stream_operator_output_refused",
                                               operator=op_name, topic=spec.output,
                                               error=str(e)[:200])
                        await asyncio.sleep(1.0)
                        continue  # not committed: the batch is run again
                    await self.append_local(spec.output, outputs, copied=False)
                    batch.task = self._copy_outputs(spec, source, spec.output, batch,
                                                    pending)
                offset = batch.upto
                st["records_processed"] += len(entries)
                st["records_out"] += len(outputs)
                if batch.task is None and not pending.batches:
                    pending.committed = offset
                else:
                    pending.batches.append(batch)
                    oldest = pending.batches[0].task
                    if len(pending.batches) > OUTPUT_COPIES_IN_FLIGHT and oldest is not None:
                        await asyncio.wait([oldest])  # not cancelled if the runner is
        finally:
            if ckpt is not None and not ckpt.done():
                ckpt.cancel()

    def _copy_outputs(self, spec: OperatorSpec, source: str, output: str, batch: _Batch,
                      pending: _OutputCopies) -> asyncio.Task[None]:
        """Copy this node's shard of ``output`` to its backup, up to its head, beside the
        runner of ``spec`` on ``source`` that appended ``batch``'s outputs to it
        (``_read_shard``); then, when the runner reads its shard here, commit what is
        now copied at once (a runner waiting in its long-poll would carry it only with
        its next fetch, and a producer held for room waits on it). The copy goes on if
        its runner stops: what it appended stays uncommitted by it, and is copied
        either way."""

        log_out = self._log(output, self.source_id)
        upto = log_out.head  # after the batch's outputs

        async def copy() -> None:
            await self._replicate(output, self.source_id, log_out, upto)
            batch.copied = True
            committed = pending.settle()
            log = self.logs.get((spec.topic, source))
            if committed is None or log is None or spec.name not in log.committed or \
                    self._holder(spec.topic, source, self._alive()) != self.agent.name:
                return
            await self._commit(spec.topic, log, spec.name, committed)

        return self._spawn_copy(copy())

    def _pool(self) -> WorkerPool:
        pool = self.agent.worker_pool()
        if pool is None:
            raise RuntimeError("the compute plane's workers are not running")
        return pool

    async def _warm(self, spec: OperatorSpec, st: Counter[str]) -> None:
        """Load the operator into every worker before the first record arrives (a model
        in the closure can take seconds to unpickle on a cold worker)."""
        try:
            pool = self._pool()
            fn_bytes = await self._fn(spec)
            await asyncio.gather(*(
                pool.run(spec.fn_id, fn_bytes, pickle_args([]),
                         timeout_s=self.cfg.operator_timeout_s)
                for _ in range(max(1, pool.config.workers))))
            st["runners_warm"] += 1
        except Exception as e:  # the first real batch will report it
            self.agent.log("warning", "stream_operator_warm_failed", operator=spec.name,
                           error=f"{type(e).__name__}: {e}"[:300])

    async def _apply(self, spec: OperatorSpec, entries: list[LogEntry], st: Counter[str]
                     ) -> list[tuple[str, bytes, str, float]] | None:
        """Run the operator over a batch; None when the batch must be retried."""
        batch = [[e.key, e.value, e.rid, e.ts] for e in entries]
        try:
            fn_bytes = await self._fn(spec)
            result = await self._pool().run(
                spec.fn_id, fn_bytes, _batch_args(batch),
                timeout_s=self.cfg.operator_timeout_s)
        except TaskFailed as e:
            st["batch_failures"] += 1
            self.agent.log("warning", "stream_operator_failed", operator=spec.name,
                           kind=e.kind, error=str(e)[:500])
            if e.kind == "error":
                # The function raised: skip nothing silently - retry the batch after a
                # pause, so a transient failure (a missing file) can recover.
                return None
            return None
        except Exception as e:
            st["batch_failures"] += 1
            self.agent.log("warning", "stream_operator_failed", operator=spec.name,
                           error=f"{type(e).__name__}: {e}"[:500])
            return None
        import pickle  # here: see _batch_args

        produced: list[tuple[int, bytes]] = pickle.loads(result)
        out: list[tuple[str, bytes, str, float]] = []
        for idx, value in produced:
            src = entries[idx]
            out.append((src.key, bytes(value), f"{spec.name}:{src.rid}", src.ts))
        return out

    # ------------------------------------------------------------------ subscribe

    async def _rpc_read(self, req: ReadRequest) -> ReadReply:
        topic, cursors, limit = req.topic, req.cursors, req.limit
        wait = min(req.wait_s, self.cfg.read_wait_max_s)
        await self._check_subscription(topic)
        if req.held is not None:
            return await self._read_held(req, wait)
        skip = set(req.skip)
        now = time.monotonic()
        if topic not in self._follow_used:
            self._wakeup.set()
        self._follow_used[topic] = now
        self._ensure_followers(topic)
        for source in skip:
            if (topic, source) in self.mirrors:  # bounded by the mirrors, not the asker
                self._skipped_at[(topic, source)] = now
        for key in [k for k in self._skipped_at if k[0] == topic and k[1] not in skip]:
            self._needed_at[key] = now
            wake = self._follow_wake.get(key)
            if wake is not None:
                wake.set()  # a follower lingering on it fetches at once
        deadline = time.monotonic() + wait

        def ready() -> list[ReadRecord]:
            dropped = self._mirror_refused.get(topic)
            if dropped is not None:  # its mirror was dropped while this read waited
                raise self._refuse("cross_region_read", (
                    f"subscription to topic {topic!r} through node {self.agent.name} "
                    f"(region {self.agent.meta.region!r}): {dropped}"), subject=topic,
                    data_class=self._topic_class(topic), from_region=self.agent.meta.region)
            why = self._read_refused.get(topic)
            if why is not None:
                # Through this node the subscriber would read what its holders refuse
                # it: refused here too, whatever this node's mirror still holds.
                raise self._refuse("cross_region_read", (
                    f"subscription to topic {topic!r} through node {self.agent.name} "
                    f"(region {self.agent.meta.region!r}): {why}"), subject=topic,
                    from_region=self.agent.meta.region)
            out: list[ReadRecord] = []
            for (t, source), mirror in list(self.mirrors.items()):
                if t != topic or source in skip:
                    continue
                start = cursors.get(source, 0)
                if start < mirror.base:
                    self.stats["subscriber_gaps"] += mirror.base - start
                out.extend([ReadRecord(source, e.offset, e.key, e.value, e.rid, e.ts)
                            for e in mirror.read(start, limit - len(out))])
                if len(out) >= limit:
                    break
            return out

        records = await self._wait_ready(topic, ready, deadline)
        return ReadReply(records=records, holders=self._direct_holders(topic, skip))

    def _direct_holders(self, topic: str, skip: set[str]) -> dict[str, str]:
        """The shards of ``topic`` a subscriber reading here should read at their holder
        (``core.streams.direct_reads``), by the holder's address: those this node's
        mirrors have seen records of (the shard exists) and the subscriber does not
        read there already. None while reads of the topic through here are refused."""
        if topic in self._read_refused or topic in self._mirror_refused:
            return {}
        alive = self._alive()
        shards = []
        for (t, source), mirror in self.mirrors.items():
            if t != topic or source in skip or mirror.head == 0:
                continue
            holder = self._holder(topic, source, alive)
            if holder is not None and holder != self.agent.name:
                shards.append((source, holder, self._region_of(holder)))
        if not shards:
            return {}
        out = {}
        for source, holder in direct_reads(self.agent.name, self.agent.meta.region,
                                           shards).items():
            m = self.agent.m.members.get(holder)
            if m is not None and m.state <= State.SUSPECT:
                out[source] = m.addr
        return out

    async def _read_held(self, req: ReadRequest, wait: float) -> ReadReply:
        """A subscriber's read at the holder of the shards ``req.held``
        (``_direct_holders``): answered from this node's own shard logs at the append,
        with no mirror or follower in between. A shard this node does not hold (it
        moved: its source died, or the rule moved it), or no longer holds from the
        subscriber's cursor on (released), is named in ``moved``: the subscriber reads
        it through its node again, whose mirror may hold more."""
        topic, cursors, limit = req.topic, req.cursors, req.limit
        held = req.held or []
        self.stats["reads_held"] += 1

        def ready() -> tuple[list[ReadRecord], list[str]] | None:
            alive = self._alive()
            out: list[ReadRecord] = []
            moved: list[str] = []
            for source in held:
                log = self.logs.get((topic, source))
                # No cursor is offset 0: what the log released before it, a mirror may
                # still hold.
                start = cursors.get(source, 0)
                if log is None or self._holder(topic, source, alive) != self.agent.name \
                        or start < log.base:
                    moved.append(source)
                    continue
                if len(out) < limit:
                    out.extend([ReadRecord(source, e.offset, e.key, e.value, e.rid, e.ts)
                                for e in log.read(start, limit - len(out))])
            return (out, moved) if out or moved else None

        got = await self._wait_ready(topic, ready, time.monotonic() + wait)
        if got is None:
            return ReadReply(records=[])
        return ReadReply(records=got[0], moved=got[1])

    async def _check_subscription(self, topic: str) -> None:
        """Refuse, before any mirror is made, a subscription through this node to a topic
        whose class's read rule (``core.streams.mirror_refusal``) forbids this node's
        region; a mirror it still had is dropped. The topic's class is this node's
        knowledge of it, else (its first read here) its replicated record."""
        cls = self._topic_class(topic)
        if cls is None and topic not in self._topic_read_at:
            cls = _class(await self._read_topic_record(topic))
        if cls is None:
            self._mirror_refused.pop(topic, None)
            return
        policies = await self._policies_if_readable(cls)
        if policies is None:
            return  # no quorum to read the policy: the shard holders check it themselves
        region = self.agent.meta.region
        why = mirror_refusal(region, cls, policies)
        if why is None:
            self._mirror_refused.pop(topic, None)
            return
        if topic in self._follow_used or any(k[0] == topic for k in self.mirrors):
            await self._drop_mirrors(topic, cls, why)
        raise self._refuse("cross_region_read", (
            f"subscription to topic {topic!r} through node {self.agent.name} (region "
            f"{region!r}): {why}"), subject=topic, data_class=cls, from_region=region)

    async def _check_mirrors(self, classes: set[str] | None = None) -> None:
        """Drop at once every mirror this node keeps of a topic whose class's read rule
        (``core.streams.mirror_refusal``) now forbids this node's region (only topics of
        ``classes``, when given): on a change of a class's policy and every reconcile."""
        topics = {t for t, _ in self.mirrors} | set(self._follow_used)
        by_class: dict[str, list[str]] = {}
        for topic in sorted(topics):
            cls = self._topic_class(topic)
            if cls is not None and (classes is None or cls in classes):
                by_class.setdefault(cls, []).append(topic)
        region = self.agent.meta.region
        for cls, names in sorted(by_class.items()):
            try:
                policies = await self.local.class_policies({cls})
            except ApiError:
                continue  # no quorum to read it now: the next reconcile asks again
            why = mirror_refusal(region, cls, policies)
            if why is not None:
                for topic in names:
                    await self._drop_mirrors(topic, cls, why)

    async def _drop_mirrors(self, topic: str, cls: str | None, why: str) -> None:
        """Stop following ``topic`` and drop its mirrors here, which class ``cls``'s rule
        forbids (``why``): each counted (``mirrors_dropped_policy``) and audited as a copy
        dropped. Reads waiting on them are refused."""
        self._follow_used.pop(topic, None)
        self._read_refused.pop(topic, None)
        self._forget_direct(topic)
        for key in [k for k in self.followers if k[0] == topic]:
            self.followers.pop(key).cancel()
        async with self._lock:
            dropped = [(k, self.mirrors.pop(k)) for k in sorted(self.mirrors) if k[0] == topic]
            self._mirror_refused[topic] = why[:1000]
            while len(self._mirror_refused) > self.cfg.max_topics:
                del self._mirror_refused[next(iter(self._mirror_refused))]
            self._notify(topic)
        for (_, source), mirror in dropped:
            self._mirror_dropped(topic, source, cls, mirror.head - mirror.base, why)

    def _mirror_dropped(self, topic: str, source: str, cls: str | None, held: int,
                        why: str) -> None:
        self.stats["mirrors_dropped_policy"] += 1
        self.agent.record(Kind.COPY_DROPPED, f"{topic}/{source}", data_class=cls,
                          detail=f"subscriber mirror of {held} records dropped: {why}"[:1000])
        self.agent.log("info", "stream_mirror_dropped", topic=topic, source=source,
                       data_class=cls, records=held)

    def _forget_direct(self, topic: str) -> None:
        """The topic's followers stopped: what its reads here left out goes too."""
        for key in [k for k in self._skipped_at if k[0] == topic]:
            del self._skipped_at[key]
            self._needed_at.pop(key, None)

    def _ensure_followers(self, topic: str) -> None:
        for source in self._sources() or [self.source_id]:
            key = (topic, source)
            task = self.followers.get(key)
            if task is None or task.done():
                self.mirrors.setdefault(key, ShardLog(topic, source, ShardLogConfig(
                    max_backlog=1, max_records=self.cfg.mirror_records,
                    max_bytes=1 << 62)))
                self.followers[key] = asyncio.get_running_loop().create_task(
                    self._follow(topic, source))

    def _expire_followers(self, now: float) -> None:
        for topic, used in list(self._follow_used.items()):
            if now - used > self.cfg.follower_idle_s:
                del self._follow_used[topic]
                self._read_refused.pop(topic, None)
                for key in [k for k in self.followers if k[0] == topic]:
                    self.followers.pop(key).cancel()
                    self.mirrors.pop(key, None)
                self._forget_direct(topic)
        if self._follow_used:
            for topic in self._follow_used:
                self._ensure_followers(topic)

    async def _follow(self, topic: str, source: str) -> None:
        lane = _follow_lane(topic, source)
        holders: set[str] = set()
        try:
            await self._follow_shard(topic, source, lane, holders)
        finally:
            self._follow_wake.pop((topic, source), None)
            self._release(holders, lane)

    async def _follow_shard(self, topic: str, source: str, lane: str,
                            holders: set[str]) -> None:
        mirror = self.mirrors[(topic, source)]
        backoff = 0.1
        while not self._stopping:
            holder = self._holder(topic, source, self._alive())
            if holder is None:
                await asyncio.sleep(0.5)
                continue
            holders.add(holder)
            try:
                r = await self._call(holder, api.FETCH, FetchRequest(
                    topic=topic, source=source, offset=mirror.head, limit=FOLLOW_BATCH,
                    wait_s=self.cfg.follow_wait_s,
                ), lane=lane, label=f"{topic}:follow")
            except RemoteError as e:
                if e.code != ErrorCode.REFUSED.value:
                    await asyncio.sleep(backoff)
                    backoff = min(2.0, backoff * 2)
                    continue
                async with self._lock:
                    why = str(e).split(": ", 1)[-1].removeprefix("refused: ")
                    self._read_refused[topic] = f"shard holder {holder} refused it: {why}"[:1000]
                    # What the mirror holds of the shard may not be read here: dropped.
                    held = mirror.clear()
                    self._notify(topic)
                if held:
                    self._mirror_dropped(topic, source, self._topic_class(topic), held,
                                         self._read_refused.get(topic, why))
                await asyncio.sleep(REFUSED_FOLLOW_RETRY_S)  # the policy may change
                continue
            except (RpcError, ValueError, OSError):
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            backoff = 0.1
            self._read_refused.pop(topic, None)
            if r.missing:
                continue  # the holder waited follow_wait_s for the shard to appear
            if r.entries:
                async with self._lock:
                    mirror.apply(r.entries)
                    self._notify(topic)
                # The reads just woken answer before the next fetch; a shard read at its
                # holder is fetched in batches (``follower_pause_s``).
                key = (topic, source)
                pause = follower_pause_s(
                    self._skipped_at.get(key), self._needed_at.get(key), time.monotonic(),
                    self.cfg.follow_linger_s, self.cfg.direct_recent_s)
                if pause <= 0.0:
                    await asyncio.sleep(0)
                    continue
                # Cut short by a read here that needs the shard (``_rpc_read``): the
                # mirror is then what its subscriber reads (its holder gone, say).
                wake = self._follow_wake.get(key)
                if wake is None:
                    wake = self._follow_wake[key] = asyncio.Event()
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), pause)

    # ------------------------------------------------------------------ stats

    def _rpc_stats(self, _: Empty) -> StreamStats:
        return StreamStats(
            node=self.agent.name,
            region=self.agent.meta.region,
            counters=dict(self.stats),
            cross_region_bytes=dict(self.cross_region_bytes),
            shards=[ShardInfo(topic=t, source=s, base=lg.base, head=lg.head,
                              backlog=lg.backlog(), backlog_max=lg.backlog_max,
                              bytes=lg.bytes, evicted=lg.evicted,
                              role="primary" if s == self.source_id else "backup")
                    for (t, s), lg in sorted(self.logs.items())],
            operators={name: dict(c) for name, c in self.op_stats.items()},
            runners=sorted(f"{o}@{s}" for o, s in self.runners),
            mirrors=[ShardInfo(topic=t, source=s, base=m.base, head=m.head, backlog=0,
                               backlog_max=0, bytes=m.bytes, evicted=m.evicted, role="mirror")
                     for (t, s), m in sorted(self.mirrors.items())],
        )
