"""The node's stream plane: shard logs, their backups, operator runners and subscriptions.

The decisions are ``core.streams``'s (which node runs an operator on a shard, which node
backs a shard up, how much a shard may hold); this module moves the records:

- ``stream.publish`` (a producer, through its nearest node): the records are appended to
  this node's shard of the topic once the shard has room (credit: the producer's call
  waits, bounded by ``publish_wait_s``), copied to the shard's backup and acknowledged
  when both hold them. A node the topic's residency rule forbids refuses, naming it.
- Operators are registered once (``stream.op_register``: spec in the replicated KV under
  ``streamop/<name>``, the pickled function as a replicated object, a notice to every live
  node). Every ``reconcile_interval_s`` each node starts a *runner* for each (operator,
  shard) that ``core.streams.place_operator`` gives to it, and stops the ones it no longer
  owns. A runner resumes from the offset checkpointed in the KV
  (``streamoff/<operator>/<source>``), long-polls the shard's holder (``stream.fetch``: the
  source, or its backup once the source is dead), runs the function on a batch in the warm
  worker pool, appends the outputs to its own shard of the output topic (ids derived from
  the input ids, so a replay repeats them), then commits the offset.
- Subscriptions (``stream.read``): the node follows every shard of the topic into a
  bounded local mirror and answers reads from it by per-shard cursors, so a subscriber
  long-polls one node.

Every send to a node in another region is held for the emulated one-way delay when the
mesh runs with ``--latency`` (``meshscale up`` / the demo), and its payload bytes are
counted per topic in ``cross_region_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from meshscale.core.api import ApiError, ErrorCode
from meshscale.core.membership import State
from meshscale.core.placement import Candidate, PlacementError, Residency
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
    place_operator,
    runners_wanted,
    shard_holder,
    source_id,
    split_source,
)
from meshscale.core.wire import wire_bytes
from meshscale.runtime.local import LocalCalls
from meshscale.runtime.services import NodeServices
from meshscale.runtime.workers import TaskFailed, WorkerPool, pickle_args
from meshscale.transport.rpc import ClientCredentials, RpcConnection, RpcError

OP_PREFIX = "streamop/"
OFFSET_PREFIX = "streamoff/"
OPS_INDEX_KEY = "streamops"
EPOCH_TAG = "epoch"
"""Membership tag: the incarnation the node started with (new at every start)."""


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
    rpc_timeout_s: float = 15.0
    operator_timeout_s: float = 60.0
    follower_idle_s: float = 30.0
    mirror_records: int = 20_000
    max_backup_attempts: int = 3
    max_sources: int = 4_096
    """Shard sources remembered (node epochs, live or gone), oldest forgotten first."""
    bad_backup_s: float = 10.0
    """A backup that failed a copy is passed over this long (or until the view says)."""
    fn_replicas: int = 3
    """Copies of an operator's pickled function (an object any runner can read)."""
    log: ShardLogConfig = field(default_factory=ShardLogConfig)


@dataclass
class OperatorSpec:
    name: str
    topic: str
    output: str | None
    mode: str
    region: str | None
    regions: list[str] | None
    residency: list[str] | None
    labels: dict[str, str]
    fn_id: str
    fn_object: str
    batch: int

    def placement(self) -> OperatorPlacement:
        mode: PlacementMode | None = None
        if self.mode == "central":
            assert self.region is not None
            mode = Central(self.region)
        elif self.mode == "regions":
            mode = InRegions(frozenset(self.regions or []))
        res = None if self.residency is None else Residency(frozenset(self.residency))
        return OperatorPlacement(self.name, mode, res, dict(self.labels))


_spec_encoder = msgspec.msgpack.Encoder()


def _spec_from(d: dict[str, Any]) -> OperatorSpec:
    return OperatorSpec(
        name=str(d["name"]), topic=str(d["topic"]),
        output=None if d.get("output") is None else str(d["output"]),
        mode=str(d.get("mode") or "near-source"),
        region=None if d.get("region") is None else str(d["region"]),
        regions=None if d.get("regions") is None else [str(r) for r in d["regions"]],
        residency=None if d.get("residency") is None else [str(r) for r in d["residency"]],
        labels={str(k): str(v) for k, v in (d.get("labels") or {}).items()},
        fn_id=str(d["fn_id"]), fn_object=str(d["fn_object"]),
        batch=max(1, min(int(d.get("batch") or 256), 4096)),
    )


def _spec_dict(s: OperatorSpec) -> dict[str, Any]:
    return {"name": s.name, "topic": s.topic, "output": s.output, "mode": s.mode,
            "region": s.region, "regions": s.regions, "residency": s.residency,
            "labels": s.labels, "fn_id": s.fn_id, "fn_object": s.fn_object, "batch": s.batch}


def _check_name(what: str, value: object, limit: int = 200) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or "\0" in value \
            or "/" in value:
        raise ValueError(f"{what} must be a non-empty string of at most {limit} characters "
                         f"without '/' (got {value!r})")
    return value


def _entry_wire(e: LogEntry) -> list[Any]:
    return [e.offset, e.key, e.value, e.rid, e.ts]


def _entry_from(w: Any) -> LogEntry:
    off, key, value, rid, ts = w
    return LogEntry(int(off), str(key), wire_bytes(value, "value"), str(rid), float(ts))


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
        self.ops: dict[str, OperatorSpec] = {}
        self._fn_bytes: dict[str, bytes] = {}
        self.runners: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.followers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._follow_used: dict[str, float] = {}
        self.stats: Counter[str] = Counter()
        self.cross_region_bytes: Counter[str] = Counter()
        self.op_stats: dict[str, Counter[str]] = {}
        self._changed = asyncio.Condition()
        self._conns: dict[tuple[str, str], RpcConnection] = {}
        self._creds: ClientCredentials | None = None
        self._known: dict[str, Candidate] = {}
        self._installed_at: dict[str, float] = {}
        self._seen_sources: OrderedDict[str, None] = OrderedDict()
        """Shard sources (``node~epoch``) seen, most recent last (bounded)."""
        self._backup_of: dict[tuple[str, str], str | None] = {}
        self._repl_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._sent: dict[tuple[str, str, str], int] = {}
        self._bad_backup: dict[str, float] = {}
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        a = self.agent
        self._creds = a.creds
        for name, fn in {
            "stream.publish": self._rpc_publish,
            "stream.replicate": self._rpc_replicate,
            "stream.fetch": self._rpc_fetch,
            "stream.read": self._rpc_read,
            "stream.op_register": self._rpc_op_register,
            "stream.op_notify": self._rpc_op_notify,
            "stream.op_remove": self._rpc_op_remove,
            "stream.op_list": self._rpc_op_list,
            "stream.stats": self._rpc_stats,
        }.items():
            a.register_rpc(name, fn)
        a.spawn(self._reconcile_loop())

    async def stop(self) -> None:
        self._stopping = True
        for t in [*self.runners.values(), *self.followers.values()]:
            t.cancel()
        for conn in list(self._conns.values()):
            with contextlib.suppress(Exception):
                await conn.close()

    # ------------------------------------------------------------------ view

    def _alive(self) -> list[Candidate]:
        out = []
        for m in self.agent.m.members.values():
            c = Candidate(m.name, m.meta.region, m.meta.zone, dict(m.meta.labels))
            self._known[m.name] = c
            if m.state <= State.SUSPECT:
                out.append(c)
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

    def _conn(self, name: str, purpose: str) -> RpcConnection:
        m = self.agent.m.members.get(name)
        if m is None:
            raise RpcError(f"{name}: not a member")
        key = (name, purpose)
        conn = self._conns.get(key)
        if conn is None or conn.addr != m.addr:
            assert self._creds is not None
            conn = RpcConnection(m.addr, self._creds, self.cfg.rpc_timeout_s,
                                 counter=self.agent.stats)
            self._conns[key] = conn
        return conn

    async def _call(self, name: str, method: str, args: dict[str, Any], *,
                    purpose: str = "ctl", label: str | None = None,
                    payload_bytes: int = 0) -> Any:
        """Call ``method`` on node ``name`` (directly when it is this node). Sends to
        another region wait the emulated one-way delay each way and are counted."""
        if name == self.agent.name:
            return await self.local.call(method, args)
        m = self.agent.m.members.get(name)
        cross = m is not None and m.meta.region != self.agent.meta.region
        delay = self.agent.delay_to(m.addr) if m is not None else 0.0
        if delay:
            await asyncio.sleep(delay)
        result = await self._conn(name, purpose).call(method, args)
        if delay:
            await asyncio.sleep(delay)
        if cross and label is not None:
            got = 0
            if isinstance(result, dict):
                for w in result.get("entries") or ():
                    got += len(w[2]) + len(w[1]) + len(w[3]) + 24
            if payload_bytes + got:
                self.cross_region_bytes[label] += payload_bytes + got
        return result

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
            for op in self.ops.values():
                if op.topic == topic:
                    log.register(op.name)
            self.logs[key] = log
        return log

    async def _rpc_publish(self, args: dict[str, Any]) -> dict[str, Any]:
        topic = _check_name("topic", args.get("topic"))
        raw = args.get("records")
        if not isinstance(raw, list) or not raw:
            raise ValueError("records must be a non-empty list of [key, value, id, ts]")
        if len(raw) > self.cfg.max_publish_records:
            raise ValueError(f"at most {self.cfg.max_publish_records} records per publish")
        residency = args.get("residency")
        res = None if residency is None else Residency(frozenset(str(r) for r in residency))
        if topic in self.topic_residency and self.topic_residency[topic] != res:
            raise PlacementError("residency", f"topic {topic!r} was published with another "
                                              "residency rule")
        check_source_allowed(topic, self.agent.meta.region, res)
        records: list[tuple[str, bytes, str, float]] = []
        for r in raw:
            try:
                key, value, rid, ts = r
                rec = (str(key), wire_bytes(value, "value"), str(rid), float(ts))
            except (TypeError, ValueError):
                self.stats["publish_malformed"] += 1
                raise ValueError("each record must be [key: str, value: bytes, id: str, "
                                 "ts: float]") from None
            if len(rec[1]) > self.cfg.max_record_bytes:
                raise ValueError(f"record {rec[2]!r} has {len(rec[1])} bytes; the limit is "
                                 f"{self.cfg.max_record_bytes} (max_record_bytes)")
            records.append(rec)
        self.topic_residency[topic] = res
        entries = await self.append_local(topic, records)
        return {"node": self.agent.name, "source": self.source_id, "first": entries[0].offset,
                "last": entries[-1].offset}

    async def append_local(self, topic: str, records: list[tuple[str, bytes, str, float]]
                           ) -> list[LogEntry]:
        """Append to this node's shard of ``topic`` once there is room, then copy to the
        backup; returns when both hold the records (or only this node has them, when no
        backup exists). Raises ValueError when room does not come in ``publish_wait_s``."""
        sid = self.source_id
        log = self._log(topic, sid)
        deadline = time.monotonic() + self.cfg.publish_wait_s
        out: list[LogEntry] = []
        i = 0
        while i < len(records):
            async with self._changed:
                while log.room() == 0:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.stats["publish_backpressure_timeouts"] += 1
                        raise ApiError(
                            ErrorCode.BACKPRESSURE,
                            f"topic {topic!r} at {sid}: {log.backlog()} records "
                            "wait for a slow operator; try again (backpressure)")
                    self.stats["publish_waits"] += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), left)
                n = min(log.room(), len(records) - i)
                new = log.append(records[i:i + n])
                i += n
                self._changed.notify_all()
            out.extend(new)
            await self._replicate(topic, sid, log)
        self.stats["records_in"] += len(records)
        return out

    async def _replicate(self, topic: str, source: str, log: ShardLog) -> None:
        """Bring the backup's copy of the shard up to ``log.head``. A backup that fails
        is passed over for ``bad_backup_s`` and the next nearest node takes its place
        (it gets the whole retained log); with no backup left the records stay
        acknowledged on this node alone, counted in ``unreplicated_appends``."""
        key = (topic, source)
        lock = self._repl_locks.setdefault(key, asyncio.Lock())
        async with lock:
            for _ in range(self.cfg.max_backup_attempts):
                now = time.monotonic()
                alive = [c for c in self._alive()
                         if now - self._bad_backup.get(c.name, -1e9) > self.cfg.bad_backup_s]
                src = self._source_candidate(source) or Candidate(
                    self.agent.name, self.agent.meta.region, self.agent.meta.zone)
                backup = backup_for(topic, src, alive, self.topic_residency.get(topic))
                if backup is None:
                    break
                start = log.base
                if self._backup_of.get(key) == backup:
                    start = max(log.base, self._sent.get((topic, source, backup), log.base))
                pending = log.read(start, log.head - start, max_bytes=1 << 62)
                if not pending:
                    return
                res = self.topic_residency.get(topic)
                try:
                    await self._call(backup, "stream.replicate", {
                        "topic": topic, "source": source,
                        "entries": [_entry_wire(e) for e in pending],
                        "low": log.low_water(),
                        "residency": None if res is None or res.regions is None
                        else sorted(res.regions),
                    }, purpose="repl", label=f"{topic}:repl",
                        payload_bytes=sum(e.size for e in pending))
                except (RpcError, ValueError) as e:
                    self.stats["replicate_failed"] += 1
                    self.agent.log("warning", "stream_replicate_failed", topic=topic,
                                   backup=backup, error=str(e))
                    self._bad_backup[backup] = time.monotonic()
                    self._backup_of.pop(key, None)
                    continue
                self._backup_of[key] = backup
                self._sent[(topic, source, backup)] = pending[-1].offset + 1
                return
            self.stats["unreplicated_appends"] += 1

    async def _rpc_replicate(self, args: dict[str, Any]) -> dict[str, Any]:
        topic = _check_name("topic", args.get("topic"))
        source = _check_name("source", args.get("source"))
        residency = args.get("residency")
        if residency is not None:
            res = Residency(frozenset(str(r) for r in residency))
            check_source_allowed(topic, self.agent.meta.region, res)
            self.topic_residency[topic] = res
        else:
            self.topic_residency.setdefault(topic, None)
        log = self._log(topic, source)
        low = args.get("low")
        n = log.apply((_entry_from(w) for w in args.get("entries") or ()),
                      low if isinstance(low, int) else None)
        self.stats["records_backed_up"] += n
        async with self._changed:
            self._changed.notify_all()
        return {"head": log.head}

    # ------------------------------------------------------------------ fetch

    async def _rpc_fetch(self, args: dict[str, Any]) -> dict[str, Any]:
        topic = _check_name("topic", args.get("topic"))
        source = _check_name("source", args.get("source"))
        offset = args.get("offset")
        limit = max(1, min(int(args.get("limit") or 256), 4096))
        wait = max(0.0, min(float(args.get("wait_s") or 0.0), self.cfg.read_wait_max_s))
        op = args.get("op")
        deadline = time.monotonic() + wait
        log = self.logs.get((topic, source))
        while log is None:
            # Long-poll for a shard that does not exist yet too: its first record should
            # not wait for the asker's retry timer.
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping:
                return {"missing": True}
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
            log = self.logs.get((topic, source))
        if isinstance(op, str) and op:
            log.register(op)
            committed = args.get("committed")
            if isinstance(committed, int) and committed >= 0:
                log.commit(op, committed)
                async with self._changed:
                    self._changed.notify_all()
        start = log.base if offset is None else int(offset)
        while True:
            entries = log.read(start, limit)
            left = deadline - time.monotonic()
            if entries or left <= 0 or self._stopping:
                break
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
        return {"entries": [_entry_wire(e) for e in entries], "base": log.base,
                "head": log.head}

    # ------------------------------------------------------------------ operators

    async def _rpc_op_register(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _check_name("operator name", args.get("name"))
        topic = _check_name("topic", args.get("topic"))
        output = args.get("output")
        if output is not None:
            _check_name("output topic", output)
            if output == topic:
                raise ValueError("an operator's output topic must differ from its input")
        fn_bytes = args.get("fn_bytes")
        if not isinstance(fn_bytes, bytes | bytearray):
            raise ValueError("fn_bytes must be the pickled function")
        if name not in self.ops and len(self.ops) >= self.cfg.max_operators:
            raise ValueError(f"{self.cfg.max_operators} operators already run (max_operators)")
        from meshscale.runtime.worker_main import function_id

        fn_bytes = wire_bytes(fn_bytes, "fn_bytes")
        fn_id = function_id(fn_bytes)
        if args.get("fn_id") not in (None, fn_id):
            raise ValueError("fn_bytes do not hash to fn_id")
        stored = await self.local.put_object(bytes(fn_bytes), self.cfg.fn_replicas)
        spec = _spec_from({**args, "fn_id": fn_id, "fn_object": stored["id"]})
        if spec.mode not in ("near-source", "central", "regions"):
            raise ValueError(f"placement must be near-source, central or regions, not "
                             f"{spec.mode!r}")
        if spec.mode == "central" and not spec.region:
            spec.region = central_region(self._alive())
        # Refuse now, naming the rule, if no live node may run it (a source is needed only
        # to rank; feasibility does not depend on it).
        alive = self._alive()
        me = self._known[self.agent.name]
        try:
            place_operator(spec.placement(), topic, me, self._states(alive))
        except (SchedulingError, PlacementError) as e:
            raise PlacementError(getattr(e, "rule", "placement"), str(e)) from None
        self._fn_bytes[fn_id] = bytes(fn_bytes)
        data = _spec_encoder.encode(_spec_dict(spec))
        await self._kv_put(OP_PREFIX + name, data)
        index = await self.local.kv_get(OPS_INDEX_KEY)
        names = set(msgspec.msgpack.decode(index)) if index else set()
        if name not in names:
            names.add(name)
            await self._kv_put(OPS_INDEX_KEY, _spec_encoder.encode(sorted(names)))
        self._install(spec)

        async def notify(n: str) -> None:
            with contextlib.suppress(RpcError, ValueError, TimeoutError):
                await self._call(n, "stream.op_notify", {"spec": _spec_dict(spec)})

        await asyncio.gather(*(notify(c.name) for c in alive if c.name != self.agent.name))
        self._reconcile()
        return {"name": name, "fn_id": fn_id, "mode": spec.mode, "region": spec.region}

    def _install(self, spec: OperatorSpec) -> None:
        if spec.name not in self.ops:
            self._installed_at[spec.name] = time.monotonic()
        self.ops[spec.name] = spec
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
        self.agent.log("info", "stream_operator_removed", operator=name)
        return True

    def _rpc_op_notify(self, args: dict[str, Any]) -> dict[str, Any]:
        removed = args.get("removed")
        if isinstance(removed, str):
            self._uninstall(removed)
            self._notify_changed()
            return {}
        spec = _spec_from(dict(args["spec"]))
        self._install(spec)
        self._reconcile()
        return {}

    def _notify_changed(self) -> None:
        async def wake() -> None:
            async with self._changed:
                self._changed.notify_all()

        self.agent.spawn(wake())

    async def _rpc_op_remove(self, args: dict[str, Any]) -> dict[str, Any]:
        """Remove an operator everywhere: its runners stop, its shards stop holding
        records for it (producers waiting on it are released)."""
        name = _check_name("operator name", args.get("name"))
        index = await self.local.kv_get(OPS_INDEX_KEY)
        names = set(msgspec.msgpack.decode(index)) if index else set()
        if name not in names and name not in self.ops:
            raise ValueError(f"unknown operator {name!r}")
        names.discard(name)
        await self._kv_put(OPS_INDEX_KEY, _spec_encoder.encode(sorted(names)))
        with contextlib.suppress(ValueError, RpcError):
            await self.local.call("kv.delete", {"key": OP_PREFIX + name,
                                                "consistency": "quorum"})
        self._uninstall(name)
        self._notify_changed()
        alive = self._alive()

        async def notify(n: str) -> None:
            with contextlib.suppress(RpcError, ValueError, TimeoutError):
                await self._call(n, "stream.op_notify", {"removed": name})

        await asyncio.gather(*(notify(c.name) for c in alive if c.name != self.agent.name))
        return {"removed": name}

    def _rpc_op_list(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"operators": [{**_spec_dict(s), "stats": dict(self.op_stats.get(s.name, {}))}
                              for s in self.ops.values()],
                "runners": sorted(f"{o}@{s}" for o, s in self.runners)}

    async def _load_ops_from_kv(self) -> None:
        if self.agent.worker_pool() is None:
            return  # the compute plane has not started yet
        index = await self.local.kv_get(OPS_INDEX_KEY)
        if not index:
            return
        with contextlib.suppress(Exception):
            listed = {str(n) for n in msgspec.msgpack.decode(index)}
            for name in [n for n in self.ops if n not in listed and
                         time.monotonic() - self._installed_at.get(n, 0.0) > 30.0]:
                self._uninstall(name)  # removed while this node missed the notice
            for name in listed:
                if name in self.ops:
                    continue
                raw = await self.local.kv_get(OP_PREFIX + str(name))
                if raw:
                    self._install(_spec_from(msgspec.msgpack.decode(raw)))

    async def _reconcile_loop(self) -> None:
        loaded_at = 0.0
        while not self._stopping:
            await asyncio.sleep(self.cfg.reconcile_interval_s)
            now = time.monotonic()
            if now - loaded_at > 5.0:
                loaded_at = now
                with contextlib.suppress(Exception):
                    await self._load_ops_from_kv()
            try:
                self._reconcile()
            except Exception as e:  # never let the loop die
                self.agent.log("error", "stream_reconcile_failed", error=str(e))
            self._expire_followers(now)

    def _reconcile(self) -> None:
        """Start the runners this node owns, stop the others."""
        if self._stopping or self.agent.membership is None:
            return
        states = self._states(self._alive())
        sources = []
        for sid in self._sources():
            src = self._source_candidate(sid)
            if src is not None:
                sources.append(ShardSource(sid, src, self._source_live(sid)))
        want = runners_wanted(
            self.agent.name,
            [(spec.placement(), spec.topic, spec.mode == "near-source")
             for spec in self.ops.values()],
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
        last_ckpt = time.monotonic()
        backoff = 0.1
        while not self._stopping:
            alive = self._alive()
            holder = self._holder(spec.topic, source, alive)
            if holder is None:
                await asyncio.sleep(0.5)
                continue
            try:
                r = await self._call(holder, "stream.fetch", {
                    "topic": spec.topic, "source": source, "offset": offset,
                    "limit": spec.batch, "wait_s": self.cfg.fetch_wait_s,
                    "op": op_name, "committed": offset,
                }, purpose=f"fetch:{op_name}:{source}", label=f"{spec.topic}:fetch:{op_name}")
            except (RpcError, ValueError, OSError) as e:
                st["fetch_errors"] += 1
                self.agent.log("debug", "stream_fetch_failed", operator=op_name,
                               source=source, holder=holder, error=str(e))
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            backoff = 0.1
            if r.get("missing"):
                continue  # the holder waited fetch_wait_s for the shard to appear
            entries = [_entry_from(w) for w in r["entries"]]
            if offset is None:
                offset = int(r["base"])
            elif entries and entries[0].offset > offset:
                st["records_skipped"] += entries[0].offset - offset  # evicted before read
            if not entries:
                continue
            outputs = await self._apply(spec, entries, st)
            if outputs is None:
                await asyncio.sleep(1.0)
                continue
            if spec.output is not None and outputs:
                await self.append_local(spec.output, outputs)
            offset = entries[-1].offset + 1
            st["records_processed"] += len(entries)
            st["records_out"] += len(outputs)
            now = time.monotonic()
            if now - last_ckpt >= self.cfg.checkpoint_interval_s:
                last_ckpt = now
                await self._checkpoint(op_name, source, offset)

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
                spec.fn_id, fn_bytes, pickle_args(batch),
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
        import cloudpickle

        produced: list[tuple[int, bytes]] = cloudpickle.loads(result)
        out: list[tuple[str, bytes, str, float]] = []
        for idx, value in produced:
            src = entries[idx]
            out.append((src.key, bytes(value), f"{spec.name}:{src.rid}", src.ts))
        return out

    # ------------------------------------------------------------------ subscribe

    async def _rpc_read(self, args: dict[str, Any]) -> dict[str, Any]:
        topic = _check_name("topic", args.get("topic"))
        cursors = {str(k): int(v) for k, v in (args.get("cursors") or {}).items()}
        limit = max(1, min(int(args.get("limit") or 1000), 10_000))
        wait = max(0.0, min(float(args.get("wait_s") or 0.0), self.cfg.read_wait_max_s))
        self._follow_used[topic] = time.monotonic()
        self._ensure_followers(topic)
        deadline = time.monotonic() + wait
        while True:
            out: list[list[Any]] = []
            for (t, source), mirror in list(self.mirrors.items()):
                if t != topic:
                    continue
                start = cursors.get(source, 0)
                if start < mirror.base:
                    self.stats["subscriber_gaps"] += mirror.base - start
                for e in mirror.read(start, limit - len(out)):
                    out.append([source, *_entry_wire(e)])
                if len(out) >= limit:
                    break
            left = deadline - time.monotonic()
            if out or left <= 0 or self._stopping:
                return {"records": out}
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

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
                for key in [k for k in self.followers if k[0] == topic]:
                    self.followers.pop(key).cancel()
                    self.mirrors.pop(key, None)
        if self._follow_used:
            for topic in self._follow_used:
                self._ensure_followers(topic)

    async def _follow(self, topic: str, source: str) -> None:
        mirror = self.mirrors[(topic, source)]
        backoff = 0.1
        while not self._stopping:
            holder = self._holder(topic, source, self._alive())
            if holder is None:
                await asyncio.sleep(0.5)
                continue
            try:
                r = await self._call(holder, "stream.fetch", {
                    "topic": topic, "source": source,
                    "offset": mirror.head,
                    "limit": 1024, "wait_s": self.cfg.follow_wait_s,
                }, purpose=f"follow:{topic}:{source}", label=f"{topic}:follow")
            except (RpcError, ValueError, OSError):
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            backoff = 0.1
            if r.get("missing"):
                continue  # the holder waited follow_wait_s for the shard to appear
            entries = [_entry_from(w) for w in r["entries"]]
            if entries:
                mirror.apply(entries)
                async with self._changed:
                    self._changed.notify_all()

    # ------------------------------------------------------------------ stats

    def _rpc_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "node": self.agent.name,
            "region": self.agent.meta.region,
            "counters": dict(self.stats),
            "cross_region_bytes": dict(self.cross_region_bytes),
            "shards": [{"topic": t, "source": s, "base": lg.base, "head": lg.head,
                        "backlog": lg.backlog(), "backlog_max": lg.backlog_max,
                        "bytes": lg.bytes, "evicted": lg.evicted,
                        "role": "primary" if s == self.source_id else "backup"}
                       for (t, s), lg in sorted(self.logs.items())],
            "operators": {name: dict(c) for name, c in self.op_stats.items()},
            "runners": sorted(f"{o}@{s}" for o, s in self.runners),
        }
