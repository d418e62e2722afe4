"""Streams: where an operator runs, who keeps a copy of a shard, and the bounded shard log.

A stream is a topic of records ``(key, value, id, ts)``. A record enters the mesh at the
node its producer talks to (its nearest node), and is appended to that node's *shard* of
the topic: shard ``(topic, source)`` where ``source`` is the entry node. One operator
instance per (operator, shard) reads the shard in offset order, so the records of a key
(which a producer always sends through the same node while that node lives) keep their
order. The model is the partitioned log of Kreps, Narkhede and Rao, "Kafka: a Distributed
Messaging System for Log Processing", NetDB 2011, with placement taken from the mesh
instead of from a controller. Departures, and why:

- No partition leader elected by a controller: the shard's *primary* is its source node,
  and its one *backup* is the node that near-source placement would pick if the source
  died (``backup_for``). Every node computes both from its own view, so there is no
  metadata service. When the source dies the backup holds the copy and serves the shard,
  and a near-source operator for it moves to that same node: the records and the work
  that reads them fail over together.
- Acknowledgement at two copies (primary + backup), in memory. A record acked to its
  producer survives the loss of either node, not of both at once. When the source dies,
  its backup serves the shard and copies it to the next node in the same order
  (``shard_copies``), so the shard keeps two copies until its consumers are done with it
  and a second failure, once that copy is made, loses nothing either; the shard log is not
  written to disk (it is bounded, and its consumers' positions are checkpointed in the
  replicated KV, so what a restarted operator needs is the unprocessed tail).
- Operators are placed by the same rules as tasks (``core.scheduling.feasible``: the
  residency rule, the mode ``near-source`` / ``central`` / ``regions``, labels,
  resources), then ranked deterministically so that every node agrees on one runner per
  (operator, shard) without talking: near-source by topological distance to the source
  (the source itself, its zone, its region, then elsewhere), the others by rendezvous
  (HRW) weight of the shard key. Vivaldi coordinates are not used here because they
  differ slightly from node to node and two runners would result. While views disagree
  two nodes may briefly both run an instance: delivery is at-least-once by design, and
  record ids let consumers drop the duplicates.
- Credit is the log's free room: a shard accepts appends only while the records not yet
  committed by its slowest operator stay under ``max_backlog`` (and the log under its
  byte bound), so a producer faster than its operator is slowed, never dropped. A shard
  with no operator (a pure output topic) is bounded by retention instead: the oldest
  records beyond ``max_records`` are evicted and counted.

- Per-key order holds within a shard. When a source dies its producer moves to another
  node, so a key's new records enter a new shard while the old shard's unprocessed tail
  is processed at the backup: for the length of that recovery (failure detection plus
  the tail) old and new records of a key may interleave. Kafka avoids this with one
  partition per key range and a leader hand-over; we trade it for no controller.
- A restarted node starts new shards (shard sources are ``node~epoch``, the epoch being
  the incarnation it started with), since its logs were in memory; its old shards stay
  with their backups under their old names until processed.

Sans-I/O: no clock, no sockets. The runtime (``runtime/streams.py``) drives it.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import msgspec

from meshscale.core.placement import Candidate, PlacementError, Residency, hrw_score
from meshscale.core.policy import (
    ClassPolicy,
    PolicyError,
    Rule,
    copy_refusal,
    narrows,
    placement_residency,
    read_refusal,
)
from meshscale.core.scheduling import (
    Central,
    InRegions,
    NearSource,
    NodeState,
    PlacementMode,
    Resources,
    SchedulingError,
    TaskSpec,
    feasible,
)

_P = TypeVar("_P")

__all__ = [
    "AckWindow",
    "LogEntry",
    "OperatorPlacement",
    "ShardLog",
    "ShardLogConfig",
    "ShardSource",
    "backup_for",
    "distance_class",
    "frozen_copy_targets",
    "place_operator",
    "releasable",
    "runners_wanted",
    "shard_key",
]


def shard_key(topic: str, source: str) -> str:
    """The name of shard ``(topic, source)``, used as its HRW key."""
    return f"{topic}\0{source}"


def distance_class(node: Candidate, source: Candidate) -> int:
    """0 the source itself, 1 same zone, 2 same region, 3 elsewhere."""
    if node.name == source.name:
        return 0
    if node.region == source.region and node.zone == source.zone:
        return 1
    if node.region == source.region:
        return 2
    return 3


@dataclass(frozen=True)
class OperatorPlacement:
    """What an operator asks of the node that runs it."""

    name: str
    mode: PlacementMode | None = None
    """``None`` means near-source (the default for operators); else Central / InRegions."""
    residency: Residency | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    cpus: float = 1.0


def _near_rank(source: Candidate, key: str) -> Callable[[NodeState], tuple[int, int, str]]:
    def rank(n: NodeState) -> tuple[int, int, str]:
        return (distance_class(n.member, source), -hrw_score(key, n.name), n.name)

    return rank


def place_operator(
    op: OperatorPlacement, topic: str, source: Candidate, alive: Sequence[NodeState]
) -> str:
    """The node that runs ``op`` on shard ``(topic, source)``, from the view ``alive``.

    ``source`` may be missing from ``alive`` (it died): near-source placement then picks
    the nearest allowed node, which is the shard's backup. Raises ``SchedulingError``
    naming the rule when no live node may run it.
    """
    key = shard_key(topic, source.name)
    mode = op.mode if op.mode is not None else NearSource(source.name)
    spec = TaskSpec(
        task_id=f"operator {op.name} on {source.name}",
        cpus=op.cpus,
        labels=dict(op.labels),
        residency=op.residency,
        placement=mode,
    )
    nodes = feasible(spec, alive)
    if isinstance(mode, NearSource):
        best = min(nodes, key=_near_rank(source, key))
        return best.name
    assert isinstance(mode, Central | InRegions)
    return max(nodes, key=lambda n: (hrw_score(key, n.name), n.name)).name


def backup_for(
    topic: str, source: Candidate, alive: Iterable[Candidate], residency: Residency | None
) -> str | None:
    """The node that keeps the second copy of shard ``(topic, source)``: the nearest other
    live node the topic's residency allows (zone, then region, then anywhere; HRW breaks
    ties). ``None`` when there is none (a one-node mesh, or a rule that allows only the
    source's region and nobody else lives there)."""
    nearest = _nearest(topic, source, alive, residency, 1)
    return nearest[0] if nearest else None


def _nearest(topic: str, source: Candidate, alive: Iterable[Candidate],
             residency: Residency | None, n: int) -> tuple[str, ...]:
    """The ``n`` live nodes other than the source that ``backup_for`` ranks first, in its
    order (zone, then region, then anywhere; HRW breaks ties), within ``residency``."""
    key = shard_key(topic, source.name)
    ranked = heapq.nsmallest(n, (
        (distance_class(c, source), -hrw_score(key, c.name), c.name) for c in alive
        if c.name != source.name and (residency is None or residency.allows(c.region))))
    return tuple(r[2] for r in ranked)


def source_id(node: str, epoch: str) -> str:
    """The name of a node's shards for one run of it: ``node~epoch``."""
    return f"{node}~{epoch}"


def split_source(sid: str) -> tuple[str, str]:
    """``node~epoch`` -> (node, epoch); a bare name has epoch ``"0"``."""
    name, sep, epoch = sid.rpartition("~")
    return (name, epoch) if sep else (sid, "0")


def shard_holder(topic: str, source: Candidate, source_live: bool,
                 alive: Iterable[Candidate], residency: Residency | None) -> str | None:
    """Who serves shard ``(topic, source)``: the source while the epoch that wrote it
    lives and the topic's rule allows its region, else its backup (``None`` when there is
    none). A source the rule no longer allows (its class narrowed) handed its shard to a
    backup inside the rule and dropped its own copy (``shard_refusal``)."""
    if source_live and (residency is None or residency.allows(source.region)):
        return source.name
    return backup_for(topic, source, alive, residency)


def shard_copies(topic: str, source: Candidate, source_live: bool,
                 alive: Iterable[Candidate], residency: Residency | None) -> tuple[str, ...]:
    """The nodes that keep the two copies of shard ``(topic, source)``, its holder
    (``shard_holder``) first: the source and its backup while the source serves it; once
    it does not (its epoch gone, or its region out of the topic's rule), the shard is a
    frozen prefix (only its owner appended) and its copies are the two nearest other live
    nodes the rule allows, in ``backup_for``'s order: the backup that holds it now, and
    the next one, which becomes its holder if that one dies too (it is next in the same
    order, so readers find the copy there without being told). Fewer when fewer nodes
    may hold it. Every holder of a copy of a gone source's shard brings these nodes' copies
    up to its own (``frozen_copy_targets``), so an acknowledged record survives a second
    failure once that copy is made; the copies go as the operators commit (retention)."""
    view = list(alive)
    holder = shard_holder(topic, source, source_live, view, residency)
    if holder == source.name:
        backup = backup_for(topic, source, view, residency)
        return (holder,) if backup is None else (holder, backup)
    return _nearest(topic, source, view, residency, 2)


MAX_DIRECT_HOLDERS = 8
"""The most holders one subscriber reads at directly (``direct_reads``): one long-poll
(and connection) each; the other shards come through its node."""


def direct_reads(me: str, region: str,
                 shards: Iterable[tuple[str, str | None, str | None]],
                 max_holders: int = MAX_DIRECT_HOLDERS) -> dict[str, str]:
    """Which shards a subscriber reading a topic through node ``me`` (in ``region``)
    should read at their holder instead (source -> holder), from ``shards``: each shard
    that exists, as ``(source, holder, holder's region)`` in ``me``'s view.

    Through ``me`` a record takes one more hop than it must: the holder answers ``me``'s
    follower at the append, and ``me`` then answers the subscriber from its mirror (a
    process wake-up and a TLS hop per record; issue 23). Read at the holder, the record
    goes to the subscriber at the append. Only a holder in ``me``'s own region is read
    directly: the read rules are the reading node's region's (``mirror_refusal``,
    ``core.policy.read_refusal``), so such a holder reads under the rule ``me`` read
    under (and checks it itself), while a read across regions stays with ``me``'s
    mirror, the bounded buffer and count (``cross_region_bytes``) of reads that cross.
    Shards ``me`` holds itself stay with ``me`` (its follower of them is in-process).
    At most ``max_holders`` holders (the first by name), one long-poll each."""
    out: dict[str, str] = {}
    chosen: set[str] = set()
    for source, holder, holder_region in sorted(shards, key=lambda s: (s[1] or "", s[0])):
        if holder is None or holder == me or holder_region != region:
            continue
        if holder not in chosen:
            if len(chosen) >= max_holders:
                continue
            chosen.add(holder)
        out[source] = holder
    return out


def frozen_copy_targets(me: str, copies: Sequence[str]) -> tuple[tuple[str, ...], bool]:
    """What node ``me``, holding a copy of a gone source's shard whose copies should be
    ``copies`` (``shard_copies``), does with it: the nodes it sends its records to (the
    other copies: the holder and the second copy exchange, so the one that has more,
    such as a backup the source switched to after passing over a failed one, brings the
    other up) and whether it keeps its own. A node outside ``copies`` (a backup the
    source passed over or switched away from, or one the view moved past) sends to every
    copy and drops its own once all of them confirmed holding what it holds: its records,
    which readers would never read there, reach the copies they do read."""
    return tuple(c for c in copies if c != me), me in copies


def shard_runner(op: OperatorPlacement, topic: str, source: Candidate, source_live: bool,
                 alive: Sequence[NodeState]) -> str:
    """The node that runs ``op`` on shard ``(topic, source)``. When the epoch that wrote the
    shard is gone (its node dead, or restarted without that in-memory log) the node is no
    candidate for it, so near-source placement lands on the shard's backup."""
    view = alive if source_live else [n for n in alive if n.name != source.name]
    return place_operator(op, topic, source, view)


@dataclass(frozen=True)
class ShardSource:
    """A source of shards as a node's view has it: its id, where it is, and whether the
    epoch that wrote its shards still lives."""

    sid: str
    candidate: Candidate
    live: bool


def runners_wanted(me: str, ops: Iterable[tuple[OperatorPlacement, str, bool]],
                   sources: Iterable[ShardSource], alive: Sequence[NodeState],
                   holds: Callable[[str, str], bool]) -> set[tuple[str, str]]:
    """The (operator, source) runners node ``me`` must run: for each operator (its
    placement, its topic, whether it is near-source) and each known source, the shard's
    runner by ``shard_runner``. A near-source operator runs only on shards that exist:
    the source is alive (its own shard) or ``holds(topic, sid)`` (this node keeps a copy
    of a gone source's shard). An operator no node may run on a shard is skipped there
    (its submit already named the rule; the view may change)."""
    srcs = list(sources)
    want: set[tuple[str, str]] = set()
    for op, topic, near_source in ops:
        for src in srcs:
            if near_source and not src.live and not holds(topic, src.sid):
                continue
            try:
                node = shard_runner(op, topic, src.candidate, src.live, alive)
            except PlacementError:  # SchedulingError is one
                continue
            if node == me:
                want.add((op.name, src.sid))
    return want


def follower_pause_s(skipped_at: float | None, needed_at: float | None, now: float,
                     linger_s: float, recent_s: float) -> float:
    """How long a subscription's follower of a shard waits, after a fetch that brought
    records, before it fetches again. While the subscribers reading through this node
    read the shard at its holder (direct: they left it out, ``skipped_at``, in the last
    ``recent_s``, and none read it here since, ``needed_at``), its mirror is only their
    fallback (a holder gone, a cursor behind what the holder still holds): it gathers
    ``linger_s`` of records per fetch, rather than one fetch, one answer and one wake-up
    of the reads here per append at the holder (issue 23). Otherwise 0: a subscriber
    reading the mirror gets each record at once."""
    if skipped_at is None or now - skipped_at > recent_s:
        return 0.0
    if needed_at is not None and needed_at >= skipped_at:
        return 0.0
    return linger_s


def central_region(alive: Iterable[Candidate]) -> str:
    """Where ``central`` goes when no region is named: the region with the most live
    nodes (ties: by name). Raises ``PlacementError`` when nothing is alive."""
    counts: dict[str, int] = {}
    for c in alive:
        counts[c.region] = counts.get(c.region, 0) + 1
    if not counts:
        raise PlacementError("nodes", "no live node: no region to run centrally in")
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def candidates_to_states(alive: Iterable[Candidate], cpus: float = 1.0) -> list[NodeState]:
    """A view for ``place_operator`` when the caller has only membership entries."""
    return [NodeState(member=c, capacity=Resources(cpus, 0, 0)) for c in alive]


# --------------------------------------------------------------------------- shard log


class LogEntry(msgspec.Struct, frozen=True, array_like=True, gc=False,
               forbid_unknown_fields=True):
    """One record of a shard log; also its wire form between nodes (``stream.fetch``,
    ``stream.replicate``): the array ``[offset, key, value, rid, ts]``."""

    offset: int
    key: str
    value: bytes
    """The record's value, encoded by the producer (opaque here)."""
    rid: str
    """The record id: producers and operators derive it so a replay repeats it."""
    ts: float
    """When the record was produced (the producer's clock): end-to-end latency."""

    @property
    def size(self) -> int:
        return len(self.value) + len(self.key) + len(self.rid) + 24


@dataclass(frozen=True)
class ShardLogConfig:
    max_backlog: int = 2_000
    """Records appended but not yet committed by the slowest operator of the topic."""
    max_records: int = 20_000
    """Retention: records kept in all (committed ones are dropped oldest first)."""
    max_bytes: int = 64 * 1024 * 1024
    """Bytes kept in all; appends beyond it wait like a full backlog (a topic with no
    operator evicts its oldest records instead, as for ``max_records``)."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_backlog <= self.max_records:
            raise ValueError("need 1 <= max_backlog <= max_records")
        if self.max_bytes < 1:
            raise ValueError("max_bytes must be positive")


class ShardLog:
    """One shard of a topic: an append-only, bounded, in-memory log with offsets.

    The primary appends and assigns offsets; the backup applies the primary's entries at
    the same offsets (``apply``). Consumers read from an offset; operators commit one
    (``commit``), which frees room. Retention drops the oldest records once every
    registered operator committed them and, on a primary that has a backup, once the
    backup confirmed its copy of them (``copied``, ``releasable``); or once
    ``max_records`` or ``max_bytes`` is exceeded when the topic has no operator (counted
    in ``evicted``)."""

    def __init__(self, topic: str, source: str, config: ShardLogConfig | None = None) -> None:
        self.topic = topic
        self.source = source
        self.config = config or ShardLogConfig()
        self.base = 0
        """Offset of the first entry still held."""
        self.entries: deque[LogEntry] = deque()
        self.bytes = 0
        self.committed: dict[str, int] = {}
        """Operator name -> the next offset it still needs."""
        self.evicted = 0
        self.appended = 0
        self.backlog_max = 0
        """The largest backlog this log ever had (checked where it can grow: append,
        apply, register), so the bound is read, not sampled."""
        self.copied: int | None = None
        """Primary side: the offset before which the shard's backup confirmed holding the
        records (``confirm_copy``); ``None`` when no copy is awaited (a backup's copy, a
        mirror, a primary with no backup to copy to)."""

    @property
    def head(self) -> int:
        """The offset the next record gets."""
        return self.base + len(self.entries)

    def low_water(self) -> int | None:
        """The smallest committed offset over the operators, or None if there are none."""
        return min(self.committed.values()) if self.committed else None

    def confirm_copy(self, upto: int | None) -> None:
        """The backup confirmed holding every record before ``upto`` (``None``: no backup
        is left to copy to, the records stay on this node alone); committed records up to
        there may now go."""
        if upto is None:
            self.copied = None
        elif self.copied is None or upto > self.copied:
            self.copied = min(upto, self.head)
        self._retain()

    def backlog(self) -> int:
        low = self.low_water()
        return 0 if low is None else self.head - max(low, self.base)

    def room(self) -> int:
        """How many more records may be appended now (0 = the producer must wait): the
        backlog's credit, within the log's bounds (records committed but held for their
        copy count against ``max_records`` and ``max_bytes`` until it is confirmed)."""
        cfg = self.config
        if self.low_water() is None:
            return cfg.max_backlog  # retention evicts; never blocks a consumer-less topic
        if self.bytes >= cfg.max_bytes:
            return 0
        return max(0, min(cfg.max_backlog - self.backlog(), cfg.max_records - len(self.entries)))

    def append(self, records: Sequence[tuple[str, bytes, str, float]]) -> list[LogEntry]:
        """Append ``(key, value, rid, ts)`` records; the caller checked ``room()``."""
        out = []
        for key, value, rid, ts in records:
            e = LogEntry(self.head, key, value, rid, ts)
            self.entries.append(e)
            self.bytes += e.size
            out.append(e)
        self.appended += len(out)
        self._retain()
        self._note_backlog()
        return out

    def apply(self, entries: Iterable[LogEntry], low: int | None = None) -> int:
        """Backup side: apply the primary's entries, then commit every operator registered
        here up to ``low`` (the primary's low water, sent with them); returns how many
        entries were new. The backlog is noted after both: the records come with the
        primary's commits, so the backup holds no more than the primary let in.

        Entries at or below the head are already here (a resend) and are skipped; a gap
        (the primary's base moved past our head) restarts the copy at that offset."""
        n = 0
        for e in entries:
            if e.offset < self.head:
                continue
            if e.offset > self.head:
                self.entries.clear()
                self.bytes = 0
                self.base = e.offset
            self.entries.append(e)
            self.bytes += e.size
            n += 1
        self.appended += n
        if low is not None:
            for op in list(self.committed):
                self.commit(op, low)
        self._retain()
        self._note_backlog()
        return n

    def read(self, offset: int, limit: int, max_bytes: int = 4 * 1024 * 1024) -> list[LogEntry]:
        """Entries from ``offset`` (clamped up to the oldest held), at most ``limit``."""
        start = max(offset, self.base) - self.base
        end = min(len(self.entries), start + limit)
        entries = self.entries
        if self.bytes <= max_bytes:
            # Everything held fits: no entry's size need be summed (a read per long-poll
            # answer, per copy to the backup and per follower's fetch: issue 23).
            return [entries[i] for i in range(start, end)]
        out: list[LogEntry] = []
        size = 0
        for i in range(start, end):
            e = entries[i]
            if out and size + e.size > max_bytes:
                break
            out.append(e)
            size += e.size
        return out

    def register(self, operator: str, offset: int | None = None) -> None:
        """An operator consumes this shard; it starts at ``offset`` (default: the oldest
        record still held; an offset past the head is clamped to it, as in ``commit``)."""
        if operator not in self.committed:
            self.committed[operator] = self.base if offset is None else min(offset, self.head)
            self._note_backlog()

    def unregister(self, operator: str) -> None:
        """``operator`` was removed: it no longer holds records back."""
        if self.committed.pop(operator, None) is not None:
            self._retain()

    def commit(self, operator: str, offset: int) -> None:
        """``operator`` has durably processed everything before ``offset``."""
        assert offset >= 0
        prev = self.committed.get(operator)
        if prev is None or offset > prev:
            self.committed[operator] = min(offset, self.head)
        self._retain()

    def _note_backlog(self) -> None:
        self.backlog_max = max(self.backlog_max, self.backlog())

    def _retain(self) -> None:
        low = releasable(self.low_water(), self.copied)
        cfg = self.config
        while self.entries and low is not None and self.entries[0].offset < low:
            self._drop_oldest()
        while self.entries and (len(self.entries) > cfg.max_records
                                or self.bytes > cfg.max_bytes):
            if low is not None and self.entries[0].offset >= low:
                break  # never evict what an operator still needs; room() blocks instead
            self._drop_oldest()
            self.evicted += 1

    def _drop_oldest(self) -> None:
        e = self.entries.popleft()
        self.bytes -= e.size
        self.base = e.offset + 1

    def clear(self) -> int:
        """Drop every entry held (the offsets go on from the head: a reader of the old
        ones sees a gap, never a reused offset); returns how many were dropped."""
        n, head = len(self.entries), self.head
        self.entries.clear()
        self.bytes = 0
        self.base = head
        return n


class AckWindow(Generic[_P]):
    """A producer's batches appended at its node but not yet acknowledged (held by the
    shard's two copies), oldest first, each with the shard it went to and the offset
    after its last record.

    A producer sends its next batch as soon as the previous one is *appended* (the node
    answers ``stream.publish`` with ``ack="appended"`` before the copy to the backup) and
    learns that the copy is confirmed from that answer or from ``stream.copied``; so a
    record published while the previous batch's copy travels goes at once, in order on
    the same connection, instead of waiting behind that copy (Nagle's wait, at the scale
    of a replication round trip: issue 23). The guarantees stay the node's: a batch is
    acknowledged only at an offset its shard's backup confirmed (``settle``); a batch
    still here when its node fails is sent again, every one of them in order before
    anything newer (``take_all``), so per-key order holds in the shard it lands in and
    nothing acknowledged depends on the failed node."""

    def __init__(self, max_batches: int = 4, min_records: int = 64) -> None:
        if max_batches < 1 or min_records < 1:
            raise ValueError("max_batches and min_records must be positive")
        self.max_batches = max_batches
        """Batches a producer may have appended and not acknowledged: beyond it (and
        ``min_records``), it waits for an acknowledgement, and what it is given
        meanwhile goes in one batch (a flood keeps its batches large)."""
        self.min_records = min_records
        """The window is full only once it holds this many records too: a producer of a
        few records per copy round trip never waits. Its batches are small because its
        records are few, not because it floods; bounded by batches alone it waited for
        every copy once the backup was far (a cloud round trip of 60 ms is more than
        four records at 100 a second apart: ~100 ms tails in the demo after its node
        kill, when the rerouted source's only backups left were in the cloud)."""
        self.batches: deque[tuple[str, int, _P, int]] = deque()
        self.records = 0
        """Records in the window (not yet acknowledged)."""

    def __len__(self) -> int:
        return len(self.batches)

    def full(self) -> bool:
        """Whether the producer must wait for an acknowledgement before its next batch."""
        return len(self.batches) >= self.max_batches and self.records >= self.min_records

    def appended(self, source: str, upto: int, batch: _P, n: int) -> None:
        """``n`` records (``batch``) appended to shard ``source`` before offset ``upto``."""
        self.batches.append((source, upto, batch, n))
        self.records += n

    def settle(self, source: str, copied: int) -> int:
        """Shard ``source`` is held twice before offset ``copied``: the batches it covers
        leave the window, oldest first (a batch at another shard stops it: it waits for
        its own). Returns the records now acknowledged."""
        done = 0
        q = self.batches
        while q and q[0][0] == source and q[0][1] <= copied:
            done += q.popleft()[3]
        self.records -= done
        return done

    def wanted(self) -> tuple[str, int] | None:
        """The shard and offset to wait for the copy of: the oldest batch's shard, up to
        its newest batch there (one wait covers them all); None when the window is
        empty."""
        if not self.batches:
            return None
        source = self.batches[0][0]
        upto = max(b[1] for b in self.batches if b[0] == source)
        return source, upto

    def take_all(self) -> list[_P]:
        """Empty the window (its node failed): the batches to send again, oldest
        first."""
        out = [b[2] for b in self.batches]
        self.batches.clear()
        self.records = 0
        return out


def releasable(low_water: int | None, copied: int | None) -> int | None:
    """The offset before which a shard log may drop records: what every operator
    committed (``low_water``), and on a primary no further than its backup confirmed
    holding (``copied``). An operator may read and commit a record before it is copied
    (the primary wakes its readers at the append), but until the copy is confirmed the
    record stays here, so the copy sent next still carries it: an acknowledged record
    always had its second copy. ``None``: no operator holds records back (retention by
    ``max_records`` / ``max_bytes`` alone)."""
    if low_water is None or copied is None:
        return low_water
    return min(low_water, copied)


def check_source_allowed(topic: str, region: str, residency: Residency | None) -> None:
    """Refuse a record entering ``topic`` at a node of ``region`` that its rule forbids."""
    if residency is not None and not residency.allows(region):
        raise PlacementError(
            "residency",
            f"topic {topic!r} may not enter the mesh in region {region!r}: "
            f"its {residency.describe()}",
        )


def topic_rule(declared: Residency | None,
               policies: Mapping[str, ClassPolicy]) -> Residency | None:
    """The rule a topic's shards and their backups follow *now*.

    ``declared`` is the rule the topic was published with, as its producer stated it (a
    data class and, optionally, its own stream regions), not resolved. A topic with a
    class follows its class's current policy (its stream regions, else its regions): the
    class is the authority, so a change of the policy changes the topic's rule. The
    topic's own regions may only narrow the class's: they are kept where the class allows
    them; when none is left, the class's regions, which the admin just set, win (as
    ``core.policy.migrated_regions`` decides for an object's copies). A topic without a
    class, or whose class has no policy (a label only), keeps its declared rule."""
    if declared is None or declared.data_class is None:
        return declared
    policy = policies.get(declared.data_class)
    if policy is None:
        return declared
    allowed = frozenset(policy.stream_regions if policy.stream_regions is not None
                        else policy.regions)
    if declared.regions is None:
        return Residency(allowed, declared.data_class)
    return Residency((declared.regions & allowed) or allowed, declared.data_class)


def shard_refusal(region: str, declared: Residency | None,
                  policies: Mapping[str, ClassPolicy]) -> str | None:
    """Why a node in ``region`` may no longer hold a copy (primary or backup) of a shard
    of a topic declared with rule ``declared`` under the class policies it knows (None:
    it may). Asked by every holder when it hears that a class's policy changed: a copy
    refused here is dropped (audited), and a source re-places its backup inside the new
    rule (``backup_for`` with ``topic_rule``) before it drops its own copy."""
    return (copy_refusal(region, declared, policies, stream=True)
            or copy_refusal(region, topic_rule(declared, policies), policies, stream=True))


def operator_now(op: OperatorPlacement, classes: Iterable[str],
                 policies: Mapping[str, ClassPolicy]) -> OperatorPlacement | None:
    """``op`` as it is placed *now*: its rule (resolved when it was registered) narrowed by
    the current policy of each class it carries (its own class and its topic's;
    ``classes``) as the placing node knows them (``policies``), as a task's placement is
    (``core.policy.placement_residency``). A narrowing of a class after registration thus
    moves the operator's runners inside the new rule at the next placement; a class
    without a known policy narrows nothing. ``None`` when the classes leave it no region:
    no node may run it now (its runners stop; a later widening brings them back)."""
    names = sorted(set(classes))
    if not names:
        return op
    try:
        res = placement_residency(op.residency, names, policies)
    except PolicyError:
        return None
    if res == op.residency:
        return op
    return OperatorPlacement(op.name, op.mode, res, op.labels, op.cpus)


def _regions(regions: Iterable[str]) -> str:
    return "{" + ",".join(sorted(regions)) + "}"


def topic_conflict(topic: str, recorded: Residency | None,
                   declared: Residency | None) -> str | None:
    """Why a publish of ``topic`` under the rule its producer ``declared`` must be refused
    given the rule the topic's replicated record holds (``recorded``, written by the first
    node that took a classed record of it; None: no record): a topic has one declared
    rule mesh-wide (its class and its own stream regions), so that every node reads the
    same class for it (``operator_classes``). None: it may be published."""
    if recorded is None or recorded == declared:
        return None
    def says(r: Residency | None) -> str:
        return "no rule" if r is None else r.describe()
    return (f"topic {topic!r} was published with another residency rule ({says(recorded)}; "
            f"this publish: {says(declared)})")


def operator_rule(name: str, topic: str, declared: Residency | None,
                  topic_class: str | None) -> Residency | None:
    """The rule operator ``name`` on ``topic`` is registered under, before it is resolved
    against its class's policy (``core.policy.resolve``, which may narrow it or refuse a
    wider one): the rule it ``declared`` (its own class, its own regions), with its input
    topic's class (``topic_class``, from the topic's replicated record; None: the topic
    has no class known yet) when it names none. The registering node writes the result in
    the operator's replicated spec, so every node places it under the same class.

    An operator runs under its input's class: one that names another class than its
    topic's is refused, naming both (``PolicyError("topic_class")``): records of class A
    read by an operator labelled B would be placed, audited and reported as B's."""
    if topic_class is None:
        return declared
    own = None if declared is None else declared.data_class
    if own is None:
        return Residency(None if declared is None else declared.regions, topic_class)
    if own != topic_class:
        raise PolicyError("topic_class", (
            f"operator {name!r} names data class {own} but its input topic {topic!r} is of "
            f"class {topic_class}: an operator runs under its input topic's class (name "
            f"{topic_class}, or no class to get it)"))
    return declared


def publish_rule(topic: str, declared: Residency | None,
                 recorded: Residency | None) -> Residency | None:
    """The rule a publish of ``topic`` is taken under, before it is resolved against its
    class's policy (which may narrow it, or refuse a rule that widens the class's:
    ``PolicyError("widens")``) and checked against the record (``topic_conflict``):
    the rule its producer ``declared``, with the class of the topic's replicated record
    (``recorded``; None: no record) when it names none, as an operator without a class
    takes its topic's (``operator_rule``).

    - No record: ``declared`` as it is (a classed one writes the record).
    - A record, and a publish that names no class: the record's rule when the publish
      names no regions (the topic's shards and backups go only where its class, and its
      own recorded regions, allow, as for a classed publish); its own regions under the
      record's class when it names some (then ``topic_conflict`` refuses regions other
      than the recorded ones).
    - A record of class C and a publish naming C: ``declared``. Naming another class is
      refused, naming both (``PolicyError("topic_class")``): records of class C published
      under a class D would be placed, audited and reported as D's.

    The node a producer talks to reads the record before it places a topic's first shard
    (it is replicated; this node may never have seen the topic's classed publish), so an
    unclassed publish of a classed topic never opens an unbound shard."""
    cls = None if recorded is None else recorded.data_class
    if cls is None:
        return declared
    own = None if declared is None else declared.data_class
    if own is None:
        if declared is None or declared.regions is None:
            return recorded
        return Residency(declared.regions, cls)
    if own != cls:
        raise PolicyError("topic_class", (
            f"a publish to topic {topic!r} names data class {own} but the topic is of class "
            f"{cls} (its record): a topic has one class (name {cls}, or no class to get "
            "it)"))
    return declared


def output_rule(name: str, output: str, classes: Iterable[str],
                declared: Residency | None,
                policies: Mapping[str, ClassPolicy]) -> Residency | None:
    """The rule the records operator ``name`` writes to its ``output`` topic are published
    under (the output topic's declared rule, written to its replicated record), from the
    operator's ``classes`` (``operator_classes``: its own and its input topic's) and the
    output rule it ``declared`` (None: none).

    An operator's output derives from its input, as a task's result from its inputs
    (``core.policy.result_rule``): without a declared class the output takes the
    strictest of the operator's classes (its rule narrows every other's; a class without
    a known policy counts as unbounded), as a class alone (its stream rule is the class's
    current one, ``topic_rule``), with the declared regions if it names some. A declared
    class must be at least as strict as each of the operator's classes (its policy's rule
    narrows theirs, ``core.policy.narrows``): one that widens is refused naming both
    (``PolicyError("widens")``); so is a declared class whose policy is not known when the
    operator has a class (``PolicyError("unknown_class")``): nothing shows it is as
    strict. Unlike a task's declared result class, which its submitter may widen
    deliberately, an operator's output is a stream of its input's records transformed,
    and its class is read from the output topic's record by its shards' holders, its
    subscribers' nodes and its downstream operators: a wider class would carry the
    input's data out of its class's regions. None: no class anywhere (nothing to record).
    Ambiguous classes (incomparable rules) are ``PolicyError("result_class")``."""
    names = sorted(set(classes))
    own = None if declared is None else declared.data_class
    if not names:
        return declared
    rules = {c: (policies[c].rule() if c in policies else Rule()) for c in names}
    if own is None:
        strictest = [c for c in names if all(narrows(rules[c], rules[d]) for d in names)]
        if not strictest:
            listed = "; ".join(f"{c} ({rules[c].describe()})" for c in names[:8])
            raise PolicyError("result_class", (
                f"operator {name!r} carries classes {listed}, none of whose rules narrows "
                f"the others': the class of its output topic {output!r} is ambiguous; "
                "declare it"))
        return Residency(None if declared is None else declared.regions, strictest[0])
    if own in names and all(narrows(rules[own], rules[d]) for d in names):
        return declared
    mine = policies.get(own)
    if mine is None:
        raise PolicyError("unknown_class", (
            f"operator {name!r} declares class {own} for its output topic {output!r}, which "
            f"has no known policy: it cannot be shown at least as strict as the operator's "
            f"class {names[0]} ({rules[names[0]].describe()})"))
    wider = [d for d in names if not narrows(mine.rule(), rules[d])]
    if wider:
        d = wider[0]
        raise PolicyError("widens", (
            f"operator {name!r} declares class {own} ({mine.rule().describe()}) for its output "
            f"topic {output!r}, which widens the rule of its class {d} ({rules[d].describe()}): "
            f"an operator's output keeps its input's class, or a stricter one (name {d}, or "
            "no output class to get it)"))
    return declared


def operator_classes(own: Residency | None, topic_class: str | None) -> tuple[str, ...]:
    """The data classes whose current policies bound where an operator runs
    (``operator_now``): its own (the one its spec carries: the class it named, or its
    topic's, given at registration by ``operator_rule``) and its input topic's class as
    the topic's replicated record states it (None: no record read). Every node computes it
    from the same replicated state (the operator's spec, the topic's record and the
    classes' policies), so the nodes agree on where its runners go: a topic first
    published with a class after the operator was registered binds it once its record is
    read, and a narrowing of the class moves its runners inside the new rule."""
    names = {c for c in (None if own is None else own.data_class, topic_class) if c}
    return tuple(sorted(names))


def operator_refusal(region: str, topic_class: str | None,
                     policies: Mapping[str, ClassPolicy]) -> str | None:
    """Why a shard holder must refuse an operator runner in ``region`` a fetch of a topic
    of ``topic_class`` (None: it may serve it): the class's policy, as the holder knows
    it, does not list ``region`` among its regions. Runners are placed inside the rule
    (``operator_classes``, ``operator_now``); this is the holder's own check, which holds
    even against a runner placed from a view that had not yet read the topic's record or
    the class's change."""
    policy = policies.get(topic_class) if topic_class is not None else None
    if policy is None or region in policy.regions:
        return None
    return (f"residency rule of class {topic_class}'s policy: an operator on its records "
            f"runs only in regions {_regions(policy.regions)}; the runner's region is "
            f"{region!r}")


def mirror_refusal(region: str, topic_class: str | None,
                   policies: Mapping[str, ClassPolicy]) -> str | None:
    """Why a node in ``region`` may not keep (nor start) a subscriber's mirror of a topic
    of ``topic_class`` (None: it may): the class's read rule (``core.policy.read_refusal``:
    no cross-region reads, and ``region`` is not one of the class's regions). A mirror
    refused is dropped at once (its followers stop) and a subscription through the node
    is refused before one is made.

    The read rule, not the copy rule (``copy_refusal``): a mirror is the buffer of reads
    through this node, bounded (``mirror_records``) and kept only while subscribers read
    (``follower_idle_s``), not a stored copy of the class. A class that allows
    cross-region reads lets a node outside its regions read its records and relay them
    to its subscribers, as an object read is relayed; holding the mirror to the copy rule
    would forbid every subscription through such a node and leave ``cross_region_reads``
    meaningless for streams."""
    return read_refusal(region, topic_class, policies)


__all__ += [
    "SchedulingError",
    "candidates_to_states",
    "central_region",
    "check_source_allowed",
    "direct_reads",
    "mirror_refusal",
    "operator_classes",
    "operator_now",
    "operator_refusal",
    "operator_rule",
    "output_rule",
    "publish_rule",
    "shard_copies",
    "shard_holder",
    "shard_refusal",
    "shard_runner",
    "source_id",
    "split_source",
    "topic_conflict",
    "topic_rule",
]
