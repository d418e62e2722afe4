"""The data plane in the simulator: membership + replication + a toy store per node.

``DataNode`` is a composite ``DrivenProtocol``: it holds a ``Membership`` and a
``ReplicaManager`` and plays the driver for the latter, as the runtime agent will. Datagrams
go to membership. Streams carry a one-byte tag and an 8-byte stream id: membership
push/pull, a replication message, an object transfer (the bytes), or a KV operation. The
stream id makes replies and failures exact: the engine reports ``stream_failed(dst)``
only by peer, but every exchange to one peer times out after the same delay, so the
oldest one still pending is the one that failed.

The node's store lives in ``ctx.disk`` (it survives crash and restart): ``objects`` maps an
id to ``(bytes, policy, hint_for)`` and ``kv`` maps a key to its ``KVRecord``. A restarted
node reports every object it still has with ``object_added`` and rejoins the mesh.

Disks are unbounded unless a test gives one a capacity (``DataMesh.set_capacity``):
then its objects' bytes use it up, a write that would leave less than
``disk_reserve_bytes`` free is refused (a KV value too; deletes always work), and the
node advertises itself full by gossip (``placement.FULL_TAG``), with the core's
hysteresis (``placement.disk_full``), exactly as the runtime does with a real disk.

``DataMesh`` builds a mesh of these, offers ``put`` / ``kv_put`` / ``kv_get`` and fault
injection, and checks the invariants the issue names: an acknowledged write is never lost
while fewer than R nodes are down for good; every object is back at full replication
within a bound once faults stop; every copy of a residency-restricted object sits in an
allowed region at every moment (an observer checks each ``Transfer`` and each commit);
KV replicas converge, and a KV write acknowledged only by stand-ins reaches the key's
replicas (hinted handoff: ``core.kv.KVHints``, driven here as the runtime drives it, the
hints on the node's disk in ``kv_hints``). ``chaos_run`` is the randomized scenario the
tests run per seed.

Puts are planned once, from the replica manager's own view (``ReplicaManager.plan_put``,
``core.puts``), and the plan goes to ``begin_put``, as in the runtime. With ``spares=True`` a coordinator outside the write set
also plays the runtime's spare copy (refused pushes, commit or drop from
``core.puts.spare_fate``); off by default, because it changes the traces pinned seeds
were taken on.
"""

from __future__ import annotations

import contextlib
import random
import struct
from collections import deque
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import msgspec

from meshscale.core.hlc import ClockSkewError, HLCTimestamp, HybridLogicalClock
from meshscale.core.kv import (
    Consistency,
    HintDeleted,
    HintSend,
    HintStored,
    KVCoordinator,
    KVHintConfig,
    KVHints,
    KVRecord,
    kv_placement,
    kv_replicas,
    merge_optional,
)
from meshscale.core.membership import (
    Member,
    Membership,
    MembershipConfig,
    NodeMeta,
    State,
)
from meshscale.core.objects import object_id
from meshscale.core.outputs import DrivenProtocol, Event, Output, SendDatagram, StreamRequest
from meshscale.core.placement import (
    FULL_TAG,
    Candidate,
    PlacementError,
    Residency,
    admits_write,
    disk_full,
    is_full,
    replica_set,
)
from meshscale.core.policy import ClassPolicy, copy_refusal, stored_rule
from meshscale.core.puts import PutPlan, SpareFate, spare_fate, spare_may_source
from meshscale.core.replication import (
    DeleteAcked,
    DropLocal,
    ObjectPolicy,
    ObjRef,
    PutAcked,
    PutFailed,
    ReplicaManager,
    ReplicationConfig,
    ReplicationOverloaded,
    SendMessage,
    TombstoneDropped,
    TombstoneStored,
    Transfer,
)
from meshscale.sim.engine import NodeContext, Simulator
from meshscale.sim.topology import Topology

__all__ = [
    "ChaosReport",
    "CopyRefused",
    "DataMesh",
    "DataNode",
    "DeleteDone",
    "KVDone",
    "ObjectCommitted",
    "PutRefused",
    "chaos_run",
    "object_id",
]

TAG_MEMBERSHIP = 1
TAG_REPLICATION = 2
TAG_OBJECT = 3
TAG_KV = 4
_HDR = struct.Struct(">BQ")
_OK = b"\x01"
_KV_GET = 0
_KV_PUT = 1




# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ObjectCommitted(Event):
    """This node stored a copy of ``oid`` (its region is in ``region``), made by the write
    at ``written`` (None: unknown, older than any tombstone)."""

    oid: str
    region: str
    hint_for: str | None
    written: HLCTimestamp | None = None


@dataclass(frozen=True, slots=True)
class CopyRefused(Event):
    """This node refused a copy of ``oid`` by the residency rule (``copy_refusal``):
    ``reason`` names the rule; ``src`` sent it (this node itself for its own copy)."""

    oid: str
    src: str
    data_class: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class PutRefused(Event):
    """``begin_put`` refused the write synchronously (placement rule or overload)."""

    req_id: int
    oid: str
    rule: str
    reason: str


@dataclass(frozen=True, slots=True)
class DeleteDone(Event):
    """This node ran a delete of ``oid`` and pushed the tombstone to ``notified`` (the
    delete counts as done once acknowledged: ``DeleteAcked``); its tombstone is stamped
    ``ts``."""

    oid: str
    notified: tuple[str, ...]
    ts: HLCTimestamp


@dataclass(frozen=True, slots=True)
class KVDone(Event):
    op_id: int
    key: str
    ok: bool
    record: KVRecord | None
    replicas: tuple[str, ...]
    reason: str = ""
    answered: tuple[str, ...] = ()
    """Replicas that replied (for a put: acknowledged) when the outcome was decided."""


# --------------------------------------------------------------------------- frames


class ObjectFrame(msgspec.Struct, array_like=True):
    ref: ObjRef
    data: bytes
    hint_for: str | None = None
    written: HLCTimestamp | None = None


class KVFrame(msgspec.Struct, array_like=True):
    op: int
    key: str
    record: KVRecord | None = None
    hint_for: tuple[str, ...] = ()
    """For a put to a stand-in: the replicas it stands in for (``KVHints``)."""


class KVReply(msgspec.Struct, array_like=True):
    ok: bool
    record: KVRecord | None = None


_object_decoder = msgspec.msgpack.Decoder(ObjectFrame)
_kv_decoder = msgspec.msgpack.Decoder(KVFrame)
_kv_reply_decoder = msgspec.msgpack.Decoder(KVReply)
_encode = msgspec.msgpack.encode


def _to_ref(oid: str, policy: ObjectPolicy) -> ObjRef:
    res = policy.residency
    if res is None:
        return ObjRef(oid, policy.replicas)
    regions = None if res.regions is None else sorted(res.regions)
    return ObjRef(oid, policy.replicas, regions, res.data_class)


@dataclass(slots=True)
class Stored:
    data: bytes
    policy: ObjectPolicy
    hint_for: str | None
    written: HLCTimestamp | None = None


@dataclass
class _Spare:
    """The coordinator's own bytes of a put it coordinates from outside the write set
    (``core.puts``): the first transfer to each planned target plays the runtime's early
    copy; any other push comes from the spare, as the plan allows."""

    plan: PutPlan
    data: bytes
    policy: ObjectPolicy
    written: HLCTimestamp | None
    copies: dict[str, bool] = field(default_factory=dict)
    committed: bool = False


@dataclass(slots=True)
class _KVOp:
    op_id: int
    coord: KVCoordinator
    deadline: float
    reported: bool = False
    repaired: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------- node


class DataNode:
    """Membership + replication + store of one simulated node (a ``DrivenProtocol``)."""

    def __init__(
        self,
        ctx: NodeContext,
        meta: NodeMeta,
        *,
        membership_config: MembershipConfig,
        replication_config: ReplicationConfig,
        seeds: list[str],
        kv_timeout: float = 5.0,
        kv_hints: KVHintConfig | None = None,
        disk_reserve_bytes: int = 0,
        disk_margin_bytes: int = 0,
        spares: bool = False,
    ) -> None:
        self.name = ctx.name
        self.spares = spares
        """Model the runtime's spare copy (``core.puts``): a coordinator outside the write
        set pushes only its first copy to each target from its bytes; any other push needs
        a spare it may keep (committed first) and is refused where the residency rule
        forbids one. Off: every push comes from the coordinator's bytes (the traces the
        pinned seeds were taken on)."""
        self.region = ctx.region
        self.disk = ctx.disk
        inc = int(self.disk.get("incarnation", -1)) + 1
        self.disk["incarnation"] = inc
        self.objects: dict[str, Stored] = self.disk.setdefault("objects", {})
        self.kv: dict[str, KVRecord] = self.disk.setdefault("kv", {})
        self.tombs: dict[str, tuple[ObjectPolicy, HLCTimestamp, bool]] = self.disk.setdefault(
            "tombs", {})
        self.kv_hint_rows: dict[tuple[str, str], tuple[HLCTimestamp, float]] = \
            self.disk.setdefault("kv_hints", {})
        """(key, target) -> (ts, since): the hints on disk, as the runtime's table."""
        self.membership = Membership(
            ctx.name, ctx.name, meta, config=membership_config, rng=ctx.rng, now=ctx.now,
            incarnation=inc,
        )
        self.replicas = ReplicaManager(
            ctx.name, config=replication_config, rng=random.Random(ctx.rng.getrandbits(64)),
            now=ctx.now,
        )
        self.hlc = HybridLogicalClock(ctx.name)
        self.kv_timeout = kv_timeout
        self.hints = KVHints(ctx.name, kv_hints, started=ctx.now)
        for (key, target), (ts, since) in sorted(self.kv_hint_rows.items()):
            self.hints.load(key, target, ts, since)
        self.disk_reserve_bytes = disk_reserve_bytes
        self.disk_margin_bytes = disk_margin_bytes
        self.refused_writes = 0
        """Writes (copies and KV values) refused for want of room."""
        self.policies: dict[str, ClassPolicy] = self.disk.setdefault("policies", {})
        """Data-class policies this node knows (the runtime reads them from the KV; the
        simulator has no policy store: a scenario sets them, and they outlive a crash)."""
        self.check_residency = True
        """Refuse copies outside the rule (``copy_refusal``); off only in a test that shows
        the oracles catch a receiver that does not check."""
        self.replicas.class_policies = self.policies
        self.narrow_rules = True
        """Keep a received copy under its rule narrowed to the class this node knows
        (``core.policy.stored_rule``); off only in a test that shows the oracles catch a
        copy kept under a sender's stale, wider rule."""
        self.refused_copies = 0
        """Copies refused by the residency rule (``core.policy.copy_refusal``)."""
        self._refused_bytes = 0
        """The largest write refused since the last ``check_disk`` (``disk_full`` makes the
        node full on it)."""
        self._out: list[Output] = []
        self._sid = 0
        self._pending: dict[int, tuple[int, str, Any]] = {}
        self._by_dst: dict[str, deque[int]] = {}
        self._put_bytes: dict[int, bytes] = {}
        self._spares: dict[int, _Spare] = {}
        self.spare_stats: dict[str, int] = {}
        """What became of spares: ``puts``, ``refused`` (a push a spare outside the rule
        could not serve), ``committed``, ``dropped``."""
        self._delete_req = 0
        self._kv_ops: dict[int, _KVOp] = {}
        self._view_dirty = True
        for oid in sorted(self.objects):
            s = self.objects[oid]
            self.replicas.object_added(oid, s.policy, s.hint_for, ctx.now, s.written)
        for oid in sorted(self.tombs):
            policy, ts, moved = self.tombs[oid]
            self.replicas.tombstone_loaded(oid, policy, ts, moved=moved)
        self.check_disk(ctx.now)  # before joining: a node comes back full if it is
        if ctx.restarts:
            self.membership.join([s for s in seeds if s != ctx.name][:3], ctx.now)
        self._settle(ctx.now)

    # ------------------------------------------------------------------ driver contract

    def handle_datagram(self, src: str, payload: bytes, now: float) -> None:
        self.membership.handle_datagram(src, payload, now)
        self._settle(now)

    def handle_stream(self, src: str, payload: bytes, now: float) -> bytes | None:
        if len(payload) < _HDR.size:
            return None
        tag, sid = _HDR.unpack_from(payload)
        body = payload[_HDR.size :]
        reply = b""
        if tag == TAG_MEMBERSHIP:
            reply = self.membership.handle_stream(src, body, now) or b""
        elif tag == TAG_REPLICATION:
            self.replicas.handle_message(src, body, now)
        elif tag == TAG_OBJECT:
            reply = self._receive_object(src, body, now)
        elif tag == TAG_KV:
            reply = self._receive_kv(src, body, now)
        else:
            return None
        self._settle(now)
        return _HDR.pack(tag, sid) + reply

    def handle_stream_reply(self, src: str, payload: bytes, now: float) -> None:
        if len(payload) < _HDR.size:
            return
        _, sid = _HDR.unpack_from(payload)
        pending = self._pop(sid)
        if pending is None:
            return
        kind, dst, info = pending
        body = payload[_HDR.size :]
        if kind == TAG_MEMBERSHIP:
            if body:
                self.membership.handle_stream_reply(src, body, now)
            else:
                self.membership.stream_failed(dst, now)
        elif kind == TAG_OBJECT:
            req_id, oid = info
            self._object_done(req_id, dst, oid, body == _OK, now)
        elif kind == TAG_KV and isinstance(info, HintSend):
            self._hint_reply(info, body, now)
        elif kind == TAG_KV:
            self._kv_reply(info, dst, body, now)
        self._settle(now)

    def stream_failed(self, dst: str, now: float) -> None:
        q = self._by_dst.get(dst)
        while q:
            sid = q.popleft()
            pending = self._pending.pop(sid, None)
            if pending is None:
                continue
            kind, _, info = pending
            if kind == TAG_MEMBERSHIP:
                self.membership.stream_failed(dst, now)
            elif kind == TAG_OBJECT:
                req_id, oid = info
                self._object_done(req_id, dst, oid, False, now)
            elif kind == TAG_KV and isinstance(info, HintSend):
                self.hints.failed(info.key, info.target, now)
            elif kind == TAG_KV:
                op = self._kv_ops.get(info)
                if op is not None:
                    op.coord.on_failure(dst)
                    self._kv_progress(op, now)
            break
        self._settle(now)

    def next_deadline(self) -> float | None:
        times = [t for t in (self.membership.next_deadline(), self.replicas.next_deadline(),
                             self.hints.next_deadline())
                 if t is not None]
        times.extend(op.deadline for op in self._kv_ops.values())
        return min(times) if times else None

    def on_timer(self, now: float) -> None:
        self.check_disk(now)
        d = self.membership.next_deadline()
        if d is not None and d <= now:
            self.membership.on_timer(now)
        self._settle(now)
        d = self.replicas.next_deadline()
        if d is not None and d <= now:
            self.replicas.on_timer(now)
        self.replicas.collect_tombstones(now, now)  # virtual time is the wall clock here
        for op in [op for op in self._kv_ops.values() if op.deadline <= now]:
            op.coord.expire()
            self._kv_progress(op, now)
            self._kv_ops.pop(op.op_id, None)
        self.hints.expire(now)
        self._hand_off(now)
        self._settle(now)

    def drain(self) -> list[Output]:
        out = self._out
        self._out = []
        return out

    # ------------------------------------------------------------------ the disk

    def free_bytes(self) -> int | None:
        """Free space (None: unbounded): the capacity less the bytes of the objects held."""
        cap: int | None = self.disk.get("capacity_bytes")
        if cap is None:
            return None
        return cap - sum(len(s.data) for s in self.objects.values())

    def has_room(self, nbytes: int) -> bool:
        free = self.free_bytes()
        return free is None or admits_write(free, nbytes, self.disk_reserve_bytes)

    def _refuse(self, nbytes: int) -> None:
        """A write of ``nbytes`` refused for want of room: the next ``check_disk`` hears."""
        self.refused_writes += 1
        self._refused_bytes = max(self._refused_bytes, nbytes)

    def check_disk(self, now: float) -> None:
        """Advertise full / not full (the core's rule, ``disk_full``) when that changed."""
        meta = self.membership.meta
        was = is_full(meta.tags)
        free = self.free_bytes()
        refused, self._refused_bytes = self._refused_bytes, 0
        full = free is not None and disk_full(free, self.disk_reserve_bytes,
                                              self.disk_margin_bytes, was, refused)
        if full == was:
            return
        tags = {k: v for k, v in meta.tags.items() if k != FULL_TAG}
        if full:
            tags[FULL_TAG] = "1"
        # The view change reaches the replica manager at the next _settle.
        self.membership.update_meta(msgspec.structs.replace(meta, tags=tags), now)

    # ------------------------------------------------------------------ local requests

    def start_put(self, req_id: int, data: bytes, policy: ObjectPolicy, w: int, now: float) -> None:
        oid = object_id(data)
        written = self.hlc.now(now)
        try:
            # Planned once, as the runtime does: the coordinator has every byte at once, so
            # its copies all leave "early".
            plan = self.replicas.plan_put(oid, policy, w, early_copies=True)
            if plan.spare and self.spares:
                self._spares[req_id] = _Spare(plan, data, policy, written)
                self._spare_count("puts")
            self.replicas.begin_put(req_id, oid, policy, w, now, written=written,
                                    plan=plan)
        except PlacementError as exc:
            self._out.append(PutRefused(req_id, oid, exc.rule, str(exc)))
        except (ReplicationOverloaded, ValueError) as exc:
            self._spares.pop(req_id, None)
            self._out.append(PutRefused(req_id, oid, "overload", str(exc)))
        else:
            self._put_bytes[req_id] = data
        self._settle(now)

    def _object_done(self, req_id: int | None, dst: str, oid: str, ok: bool, now: float) -> None:
        """A transfer ended; an early copy of a spare put decides the spare's fate."""
        spare = None if req_id is None else self._spares.get(req_id)
        if spare is not None and dst in spare.plan.forwards and dst not in spare.copies:
            spare.copies[dst] = ok
        self.replicas.transfer_done(req_id, dst, oid, ok, now)
        if spare is not None and len(spare.copies) == len(spare.plan.forwards):
            assert req_id is not None
            self._settle_spare(req_id, spare, now)

    def _settle_spare(self, req_id: int, spare: _Spare, now: float) -> None:
        fate = spare_fate(spare.plan, list(spare.copies.values()), spare.committed)
        self._spares.pop(req_id, None)
        if fate is SpareFate.COMMIT:
            self._commit_spare(spare, now)
        elif fate is SpareFate.DROP:
            self._spare_count("dropped")
            self._put_bytes.pop(req_id, None)  # nothing of it remains to push from

    def _spare_count(self, key: str) -> None:
        self.spare_stats[key] = self.spare_stats.get(key, 0) + 1

    def _commit_spare(self, spare: _Spare, now: float) -> None:
        assert spare_may_source(spare.plan), "a spare committed outside the residency rule"
        spare.committed = True
        self._spare_count("committed")
        self._commit(spare.plan.oid, spare.data, spare.policy, None, now, spare.written)

    def delete(self, oid: str, policy: ObjectPolicy, now: float,
               holders: tuple[str, ...] = ()) -> None:
        """Delete ``oid`` everywhere (the mesh knows its policy, as a client's stat would;
        ``holders``: nodes found holding a copy, told at once as the runtime does);
        acknowledged by the core's ``DeleteAcked`` once a quorum keeps the tombstone."""
        self._delete_req += 1
        ts = self.hlc.now(now)
        with contextlib.suppress(ReplicationOverloaded):
            peers = self.replicas.delete(oid, policy, ts, now, now, holders,
                                         req_id=self._delete_req)
            self._out.append(DeleteDone(oid, tuple(peers), ts))
        self._settle(now)

    def kv_put(self, op_id: int, key: str, value: bytes | None, c: Consistency, now: float) -> None:
        record = KVRecord(key, value, self.hlc.now(now))
        self._kv_start(op_id, key, c, record, now)

    def kv_get(self, op_id: int, key: str, c: Consistency, now: float) -> None:
        self._kv_start(op_id, key, c, None, now)

    # ------------------------------------------------------------------ plumbing

    def _stream(self, dst: str, tag: int, body: bytes, info: Any) -> None:
        self._sid += 1
        sid = self._sid
        self._pending[sid] = (tag, dst, info)
        self._by_dst.setdefault(dst, deque()).append(sid)
        self._out.append(StreamRequest(dst, _HDR.pack(tag, sid) + body))

    def _pop(self, sid: int) -> tuple[int, str, Any] | None:
        pending = self._pending.pop(sid, None)
        if pending is not None:
            q = self._by_dst.get(pending[1])
            if q is not None:
                with contextlib.suppress(ValueError):
                    q.remove(sid)
        return pending

    def _candidates(self) -> list[Candidate]:
        return [
            Candidate(m.name, m.meta.region, m.meta.zone, full=is_full(m.meta.tags))
            for m in self.membership.live_members()
        ]

    def _settle(self, now: float) -> None:
        """Move outputs between the parts until both are quiet."""
        for _ in range(10_000):
            busy = False
            for out in self.membership.drain():
                busy = True
                if isinstance(out, StreamRequest):
                    self._stream(out.addr, TAG_MEMBERSHIP, out.payload, None)
                elif isinstance(out, SendDatagram):
                    self._out.append(out)
                else:
                    self._view_dirty = True
                    self._out.append(out)
            if self._view_dirty:
                self._view_dirty = False
                view = self._candidates()
                self.replicas.set_view(view, now)
                self.hints.set_view(view, self._down_candidates())
                self._hand_off(now)
                self._view_changed(view, now)
            for rout in self.replicas.drain():
                busy = True
                self._execute(rout, now)
            if not busy:
                return
        raise AssertionError(f"{self.name}: outputs did not settle")

    def _view_changed(self, view: list[Candidate], now: float) -> None:
        """The live members changed (``view``): a subclass that drives more parts over
        the same membership (``sim.policy_chaos``'s scheduler) follows it here."""

    def _execute(self, out: SendMessage | Event, now: float) -> None:
        if isinstance(out, SendMessage):
            self._stream(out.dst, TAG_REPLICATION, out.payload, None)
            return
        self._out.append(out)
        if isinstance(out, Transfer):
            data: bytes | None = None
            if out.req_id is not None:
                data = self._put_bytes.get(out.req_id)
            spare = None if out.req_id is None else self._spares.get(out.req_id)
            if spare is not None and not (out.hint_for is None and out.dst in spare.plan.forwards
                                          and out.dst not in spare.copies):
                # Not an early copy: this push comes from the spare, which must be ours to
                # keep (committed first, as the runtime does), or it is refused.
                if not spare_may_source(spare.plan):
                    self._spare_count("refused")
                    self._object_done(out.req_id, out.dst, out.oid, False, now)
                    return
                if not spare.committed:
                    self._commit_spare(spare, now)
            if data is None and out.oid in self.objects:
                data = self.objects[out.oid].data
            if data is None:
                self.replicas.transfer_done(out.req_id, out.dst, out.oid, False, now)
            elif out.dst == self.name:
                if self._refuses(self.name, out.oid, out.policy):
                    self.replicas.transfer_done(out.req_id, out.dst, out.oid, False, now)
                    return
                self._commit(out.oid, data, self._kept(out.policy), out.hint_for, now,
                             out.written)
                self.replicas.transfer_done(out.req_id, out.dst, out.oid,
                                            out.oid in self.objects, now)
            else:
                frame = ObjectFrame(_to_ref(out.oid, out.policy), data, out.hint_for, out.written)
                self._stream(out.dst, TAG_OBJECT, _encode(frame), (out.req_id, out.oid))
        elif isinstance(out, DropLocal):
            self.objects.pop(out.oid, None)
            self.replicas.object_removed(out.oid, now)
            self.check_disk(now)
        elif isinstance(out, TombstoneStored):
            self.tombs[out.oid] = (out.policy, out.ts, out.moved)
        elif isinstance(out, TombstoneDropped):
            self.tombs.pop(out.oid, None)
        elif isinstance(out, PutAcked | PutFailed):
            self._put_bytes.pop(out.req_id, None)

    def _commit(
        self, oid: str, data: bytes, policy: ObjectPolicy, hint_for: str | None, now: float,
        written: HLCTimestamp | None,
    ) -> None:
        if object_id(data) != oid:
            return  # corrupt in flight: refuse (the sender sees a failure)
        if not self.replicas.accepts(oid, written):
            return  # deleted here after that write: refuse (the sender sees a failure)
        old = self.objects.get(oid)
        if old is None:
            if not self.has_room(len(data)):
                self._refuse(len(data))
                self.check_disk(now)
                return  # disk full: refuse (the sender sees a failure)
            self.objects[oid] = Stored(data, policy, hint_for, written)
            self._out.append(ObjectCommitted(oid, self.region, hint_for, written))
            self.check_disk(now)
        elif written is not None and (old.written is None or written > old.written):
            old.written = written
        self.replicas.object_added(oid, policy, hint_for, now, written)

    def _receive_object(self, src: str, body: bytes, now: float) -> bytes:
        try:
            frame = _object_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return b""
        policy = frame.ref.policy()
        if self._refuses(src, frame.ref.oid, policy):
            return b""
        policy = self._kept(policy)
        self._commit(frame.ref.oid, frame.data, policy, frame.hint_for, now, frame.written)
        return _OK if frame.ref.oid in self.objects else b""

    def _kept(self, policy: ObjectPolicy) -> ObjectPolicy:
        """The rule a copy this node takes (from a peer, or its own for a put it
        coordinates) is kept under: narrowed to its class's as this node knows it
        (``core.policy.stored_rule``): a put under way, or a sender, may still carry the
        rule of before a narrowing (swarm seed 1081647952 of the policy plane)."""
        if not self.narrow_rules:
            return policy
        kept = stored_rule(policy.residency, self.policies)
        return policy if kept is policy.residency else ObjectPolicy(policy.replicas, kept)

    def _refuses(self, src: str, oid: str, policy: ObjectPolicy) -> bool:
        """Must this node refuse a copy of ``oid`` under ``policy`` (from ``src``, or its
        own)? The receiver checks the rule itself (the copy's, and its class's as this node
        knows it), with the same function as the runtime's receiver."""
        if not self.check_residency:
            return False
        why = copy_refusal(self.region, policy.residency, self.policies)
        if why is None:
            return False
        self.refused_copies += 1
        res = policy.residency
        self._out.append(CopyRefused(oid, src, None if res is None else res.data_class, why))
        return True

    # ------------------------------------------------------------------ KV

    def _kv_apply(self, record: KVRecord) -> bool:
        """Apply a record; a value is refused (False) on a full disk, a delete never."""
        if record.value is not None and not self.has_room(len(record.value)):
            self._refuse(len(record.value))  # flagged full at the next timer
            return False
        merged = merge_optional(self.kv.get(record.key), record)
        assert merged is not None
        self.kv[record.key] = merged
        return True

    def _kv_take(self, record: KVRecord, named: tuple[str, ...], now: float) -> bool:
        """A write this node takes for a coordinator (itself included): apply it with the
        hints ``KVHints.plan`` asks for (the coordinator ``named`` some), stored with it;
        refused (False) on a full disk or a full hint book."""
        targets = self.hints.plan(record.key, named, now)
        if targets is None or not self._kv_apply(record):
            return False
        for target in targets:
            self._store_hint(HintStored(record.key, target, record.ts, now))
        self.hints.add(record.key, record.ts, targets, now)
        return True

    def _store_hint(self, change: HintStored | HintDeleted) -> None:
        """Persist one hint change as the runtime's table does (upsert, guarded delete)."""
        row = self.kv_hint_rows.get((change.key, change.target))
        if isinstance(change, HintStored):
            if row is not None:
                change = HintStored(change.key, change.target, max(row[0], change.ts),
                                    min(row[1], change.since))
            self.kv_hint_rows[(change.key, change.target)] = (change.ts, change.since)
        elif row is not None and row[0] <= change.upto:
            del self.kv_hint_rows[(change.key, change.target)]

    def _down_candidates(self) -> list[Candidate]:
        """Members the view holds as dead (not left, not yet forgotten)."""
        return [Candidate(m.name, m.meta.region, m.meta.zone, full=is_full(m.meta.tags))
                for m in self.membership.members.values() if m.state == State.DEAD]

    def _hand_off(self, now: float) -> None:
        """Send the hints that are due (``KVHints.due``): this node's record of the key,
        with its own timestamp; persist what changed."""
        for send in self.hints.due(now):
            rec = self.kv.get(send.key)
            if rec is None or rec.ts < send.ts:
                self.hints.abandon(send.key, send.target)
                continue
            frame = KVFrame(_KV_PUT, rec.key, rec)
            self._stream(send.target, TAG_KV, _encode(frame),
                         HintSend(send.key, send.target, rec.ts))
        for change in self.hints.drain():
            self._store_hint(change)

    def _hint_reply(self, sent: HintSend, body: bytes, now: float) -> None:
        try:
            ok = _kv_reply_decoder.decode(body).ok
        except (msgspec.DecodeError, msgspec.ValidationError):
            ok = False
        if not ok:
            self.hints.failed(sent.key, sent.target, now)
        else:
            self.hints.handed_off(sent.key, sent.target, sent.ts)
        for change in self.hints.drain():
            self._store_hint(change)

    def _receive_kv(self, src: str, body: bytes, now: float) -> bytes:
        try:
            frame = _kv_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return _encode(KVReply(False))
        if frame.op == _KV_PUT and frame.record is not None and frame.record.key == frame.key:
            try:
                self.hlc.update(frame.record.ts, now)
            except (ClockSkewError, ValueError):
                return _encode(KVReply(False))
            return _encode(KVReply(self._kv_take(frame.record, frame.hint_for, now)))
        return _encode(KVReply(True, self.kv.get(frame.key)))

    def _kv_start(
        self, op_id: int, key: str, c: Consistency, record: KVRecord | None, now: float
    ) -> None:
        try:
            where = kv_placement(key, self._candidates(), down=self._down_candidates())
        except PlacementError as exc:
            self._out.append(KVDone(op_id, key, False, None, (), str(exc)))
            return
        reps = where.replicas
        if record is None:
            coord = KVCoordinator.for_get(key, reps, c, where.full)
        else:
            coord = KVCoordinator.for_put(record, reps, c,
                                          where.full if record.value is None else ())
        op = _KVOp(op_id, coord, now + self.kv_timeout)
        self._kv_ops[op_id] = op
        for r in coord.asked:
            hint_for = where.hint_targets(r) if record is not None else ()
            if r == self.name:
                if record is not None:
                    if self._kv_take(record, hint_for, now):
                        coord.on_reply(r, None)
                    else:
                        coord.on_failure(r, "refused")
                else:
                    coord.on_reply(r, self.kv.get(key))
            else:
                frame = KVFrame(_KV_PUT if record is not None else _KV_GET, key, record,
                                hint_for)
                self._stream(r, TAG_KV, _encode(frame), op_id)
        self._kv_progress(op, now)
        self._settle(now)

    def _kv_reply(self, op_id: int, dst: str, body: bytes, now: float) -> None:
        op = self._kv_ops.get(op_id)
        if op is None:
            return
        try:
            reply = _kv_reply_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            op.coord.on_failure(dst)
        else:
            if not reply.ok:
                op.coord.on_failure(dst)
            elif op.coord.write is not None:
                op.coord.on_reply(dst, None)
            else:
                op.coord.on_reply(dst, reply.record)
        self._kv_progress(op, now)

    def _kv_progress(self, op: _KVOp, now: float) -> None:
        outcome = op.coord.outcome
        if outcome is None:
            return
        if not op.reported:
            op.reported = True
            self._out.append(KVDone(op.op_id, op.coord.key, outcome.ok, outcome.record,
                                    op.coord.replicas, outcome.reason,
                                    tuple(sorted(op.coord.replies))))
        # Read repair, also for replies that come after the outcome.
        for node, rec in op.coord.read_repair():
            if node in op.repaired:
                continue
            op.repaired.add(node)
            if node == self.name:
                self._kv_apply(rec)
            else:
                self._stream(node, TAG_KV, _encode(KVFrame(_KV_PUT, rec.key, rec)), -1)
        answered = len(op.coord.replies) + len(op.coord.failures)
        if answered == len(op.coord.asked):
            self._kv_ops.pop(op.op_id, None)


# --------------------------------------------------------------------------- mesh


@dataclass
class PutResult:
    req_id: int
    oid: str
    acked: bool
    detail: str
    """Acked: the holders; failed or refused: the reason."""


@dataclass
class _Acked:
    oid: str
    policy: ObjectPolicy
    at: float
    nodes: tuple[str, ...]


class DataMesh:
    """A simulated mesh of ``DataNode``s named ``n0 .. n{N-1}``."""

    def __init__(
        self,
        nodes: int = 12,
        *,
        seed: int,
        topology: Topology | None = None,
        membership_config: MembershipConfig | None = None,
        replication_config: ReplicationConfig | None = None,
        record_trace: bool = False,
        disk_reserve_bytes: int = 0,
        disk_margin_bytes: int = 0,
        spares: bool = False,
        rebuild_slice_entries: int | None = None,
    ) -> None:
        self.spares = spares
        self.topology = topology or Topology.three_regions()
        self.disk_reserve_bytes = disk_reserve_bytes
        self.disk_margin_bytes = disk_margin_bytes
        self.mconfig = membership_config or MembershipConfig()
        self.rconfig = replication_config or ReplicationConfig(
            sync_interval_s=3.0, put_timeout_s=8.0, view_change_delay_s=0.3,
            self_check=True,  # a drift of the incremental digests fails the seed
        )
        if rebuild_slice_entries is not None:
            # A view change's rebuild in slices this small, spread over virtual time, so
            # that messages, writes and further view changes meet half-rebuilt indexes.
            self.rconfig = replace(self.rconfig, rebuild_slice_entries=rebuild_slice_entries,
                                   rebuild_slice_pause_s=0.05)
        self.sim = Simulator(self.topology, seed, record_trace=record_trace)
        self.names = [f"n{i}" for i in range(nodes)]
        self.placements = dict(zip(self.names, self.topology.place(nodes), strict=True))
        self.metas = {n: NodeMeta(p.region, p.zone) for n, p in self.placements.items()}
        self.policies: dict[str, ObjectPolicy] = {}
        self.results: dict[int, PutResult] = {}
        self.acked: dict[str, _Acked] = {}
        self.kv_done: dict[int, KVDone] = {}
        self.kv_acked: list[tuple[float, KVDone]] = []
        self.violations: list[str] = []
        """Residency breaches seen by the observer."""
        self.loss_events: list[str] = []
        self.down_for_good: set[str] = set()
        self.crashed: set[str] = set()
        self.delete_requests: set[str] = set()
        self.deleted: dict[str, tuple[float, str]] = {}
        """Deleted object -> (when, by which node): the node ran the delete (a request to
        a paused node that crashed before it resumed never ran, like a lost client call)."""
        self.delete_ts: dict[str, HLCTimestamp] = {}
        """Object -> the timestamp of the tombstone its (first) delete wrote."""
        self.late_commits: list[tuple[float, str, str, HLCTimestamp | None]] = []
        """(when, node, oid, written) of copies of deleted objects committed after the
        delete was acknowledged: a node that missed the delete passed on its old copy
        (anti-entropy removes them)."""
        self.kv_gets: set[int] = set()
        """Op ids of KV reads (``kv_done`` and ``kv_acked`` hold reads and writes)."""
        self._req = 0
        self.sim.observers.append(self._observe)
        for name in self.names:
            self.sim.add_node(name, self.placements[name], self._factory)
        records = {
            n: Member(n, n, 0, State.ALIVE, self.metas[n], 0.0, shared=True) for n in self.names
        }
        live = len(records)  # all alive
        for name in self.names:
            self.sim.call(name, lambda p, now: _install(p, records, self.names, now, live))

    def _factory(self, ctx: NodeContext) -> DrivenProtocol:
        return DataNode(
            ctx, self.metas[ctx.name], membership_config=self.mconfig,
            replication_config=self.rconfig, seeds=self.names,
            disk_reserve_bytes=self.disk_reserve_bytes, disk_margin_bytes=self.disk_margin_bytes,
            spares=self.spares,
        )

    def node(self, name: str) -> DataNode:
        proto = self.sim.protocol(name)
        assert isinstance(proto, DataNode)
        return proto

    # ------------------------------------------------------------------ observation

    def _observe(self, t: float, node: str, ev: Event) -> None:
        if isinstance(ev, Transfer):
            region = self.placements[ev.dst].region
            if not ev.policy.allows(region):
                self.violations.append(f"{t:.3f} {node}: Transfer of {ev.oid} to {ev.dst} in {region}")
        elif isinstance(ev, ObjectCommitted):
            if ev.oid in self.deleted:
                self.late_commits.append((t, node, ev.oid, ev.written))
            policy = self.policies.get(ev.oid)
            if policy is not None and not policy.allows(ev.region):
                self.violations.append(f"{t:.3f} {node}: copy of {ev.oid} committed in {ev.region}")
        elif isinstance(ev, PutAcked):
            self.results[ev.req_id] = PutResult(ev.req_id, ev.oid, True, ",".join(ev.nodes))
            self.acked.setdefault(ev.oid, _Acked(ev.oid, self.policies[ev.oid], t, ev.nodes))
        elif isinstance(ev, PutFailed):
            self.results[ev.req_id] = PutResult(ev.req_id, ev.oid, False, ev.reason)
        elif isinstance(ev, PutRefused):
            self.results[ev.req_id] = PutResult(ev.req_id, ev.oid, False, f"{ev.rule}: {ev.reason}")
        elif isinstance(ev, DeleteDone):
            self.delete_ts.setdefault(ev.oid, ev.ts)
        elif isinstance(ev, DeleteAcked):
            self.deleted.setdefault(ev.oid, (t, node))
        elif isinstance(ev, KVDone):
            self.kv_done[ev.op_id] = ev
            if ev.ok:
                self.kv_acked.append((t, ev))

    # ------------------------------------------------------------------ requests

    def put_async(self, node: str, data: bytes, policy: ObjectPolicy, w: int) -> int:
        self._req += 1
        req = self._req
        self.policies.setdefault(object_id(data), policy)
        self.sim.call(node, lambda p, now: _start_put(p, req, data, policy, w, now))
        return req

    def put(self, node: str, data: bytes, policy: ObjectPolicy, w: int,
            timeout: float = 30.0) -> PutResult:
        req = self.put_async(node, data, policy, w)
        self.sim.run_until_true(lambda: req in self.results, self.sim.now + timeout, 0.05)
        return self.results.get(req, PutResult(req, object_id(data), False, "no answer"))

    def delete_async(self, node: str, oid: str) -> None:
        """Delete an acknowledged object, coordinated by ``node``."""
        policy = self.acked[oid].policy
        self.delete_requests.add(oid)
        self.sim.call(node, lambda p, now: _delete(p, oid, policy, now))

    def live(self) -> list[str]:
        """Acknowledged objects that were never asked to be deleted. An object whose
        delete was asked but not acknowledged is in neither state for sure (its tombstone
        may still spread, or never): it is checked by neither loss nor resurrection."""
        return [oid for oid in self.acked if oid not in self.delete_requests]

    def resurrected(self) -> list[str]:
        """Deleted objects of which some node that is up still holds a copy (a copy on the
        disk of a node that never returns does not count)."""
        up = set(self.up())
        return sorted(oid for oid in self.deleted if self.holders(oid) & up)

    def kv_async(self, node: str, key: str, value: bytes | None, c: Consistency,
                 *, get: bool = False) -> int:
        self._req += 1
        op = self._req
        if get:
            self.kv_gets.add(op)
            self.sim.call(node, lambda p, now: _kv(p, op, key, None, c, now, True))
        else:
            self.sim.call(node, lambda p, now: _kv(p, op, key, value, c, now, False))
        return op

    def kv_get(self, node: str, key: str, c: Consistency = Consistency.ALL,
               timeout: float = 10.0) -> KVDone | None:
        op = self.kv_async(node, key, None, c, get=True)
        self.sim.run_until_true(lambda: op in self.kv_done, self.sim.now + timeout, 0.05)
        return self.kv_done.get(op)

    # ------------------------------------------------------------------ faults

    def set_capacity(self, name: str, capacity_bytes: int | None) -> None:
        """Give ``name``'s disk a capacity (None: unbounded); it survives restarts (a
        crashed node finds it on its disk when it comes back). The disk changes at once,
        whatever its node is doing, as when an operator frees space: the node notices now,
        or when a pause ends, or when it restarts. (Setting it from inside the node lost
        it when a paused node crashed before resuming: its queued call went with the
        pause, and the node came back with its old, tiny capacity: swarm seed 448821714.)"""
        self.node(name).disk["capacity_bytes"] = capacity_bytes
        if self.sim.is_up(name):
            self.sim.call(name, _check_disk)

    def fill(self, name: str) -> None:
        """Fill ``name``'s disk: free space below its reserve, every write refused."""
        used = sum(len(s.data) for s in self._disk_objects(name).values())
        self.set_capacity(name, used + self.disk_reserve_bytes // 2)

    def crash(self, name: str, *, for_good: bool = False) -> None:
        self.sim.crash(name)
        self.crashed.add(name)
        if for_good:
            self.down_for_good.add(name)

    def restart(self, name: str) -> None:
        assert name not in self.down_for_good, f"{name} is down for good"
        self.crashed.discard(name)
        self.sim.restart(name)

    def up(self) -> list[str]:
        return [n for n in self.names if self.sim.is_up(n)]

    # ------------------------------------------------------------------ invariants

    def holders(self, oid: str) -> set[str]:
        """Nodes whose disk holds ``oid`` (crashed ones included: disks survive)."""
        return {n for n in self.names if oid in self._disk_objects(n)}

    def _disk_objects(self, name: str) -> dict[str, Stored]:
        objects: dict[str, Stored] = self.node(name).disk.get("objects", {})
        return objects

    def truth_view(self) -> list[Candidate]:
        return [Candidate(n, self.metas[n].region, self.metas[n].zone) for n in self.up()]

    def expected_holders(self, oid: str) -> list[str]:
        policy = self.acked[oid].policy
        try:
            chosen = replica_set(oid, self.truth_view(), policy.replicas, policy.residency)
        except PlacementError:
            return []
        return [c.name for c in chosen]

    def lost(self) -> list[str]:
        """Acknowledged objects with no copy outside the nodes that are down for good."""
        return sorted(
            oid for oid in self.live() if not (self.holders(oid) - self.down_for_good)
        )

    def under_replicated(self) -> list[str]:
        """Acknowledged objects some member of whose true replica set lacks a copy."""
        return sorted(
            oid for oid in self.live()
            if not set(self.expected_holders(oid)) <= self.holders(oid)
        )

    def stray_copies(self) -> list[tuple[str, str]]:
        """(node, oid): live copies outside the true replica set."""
        out = []
        for oid in sorted(self.live()):
            want = set(self.expected_holders(oid))
            out += [(n, oid) for n in sorted(self.holders(oid) - want) if self.sim.is_up(n)]
        return out

    def residency_breaches_on_disk(self) -> list[tuple[str, str]]:
        out = []
        for n in self.names:
            region = self.metas[n].region
            out += [(n, oid) for oid, s in sorted(self._disk_objects(n).items())
                    if not s.policy.allows(region)]
        return out

    def kv_divergent(self, keys: list[str]) -> list[str]:
        """Keys whose live true replicas do not all hold the same record."""
        bad = []
        for key in keys:
            try:
                reps = kv_replicas(key, self.truth_view())
            except PlacementError:
                continue
            recs = {repr(self.node(r).kv.get(key)) for r in reps}
            if len(recs) > 1:
                bad.append(key)
        return bad


def _install(p: DrivenProtocol, records: dict[str, Member], order: list[str], now: float,
             live: int) -> None:
    assert isinstance(p, DataNode)
    p.membership.install_shared_view(records, order, now, live)
    p._view_dirty = True
    p._settle(now)


def _check_disk(p: DrivenProtocol, now: float) -> None:
    assert isinstance(p, DataNode)
    p.check_disk(now)
    p._settle(now)


def _start_put(p: DrivenProtocol, req: int, data: bytes, policy: ObjectPolicy, w: int,
               now: float) -> None:
    assert isinstance(p, DataNode)
    p.start_put(req, data, policy, w, now)


def _delete(p: DrivenProtocol, oid: str, policy: ObjectPolicy, now: float) -> None:
    assert isinstance(p, DataNode)
    p.delete(oid, policy, now)


def _kv(p: DrivenProtocol, op: int, key: str, value: bytes | None, c: Consistency, now: float,
        get: bool) -> None:
    assert isinstance(p, DataNode)
    if get:
        p.kv_get(op, key, c, now)
    else:
        p.kv_put(op, key, value, c, now)


# --------------------------------------------------------------------------- chaos


@dataclass
class ChaosReport:
    seed: int
    acked: int
    failed: int
    lost: list[str]
    """Acknowledged objects lost although fewer than R nodes went down for good."""
    under_replicated: list[str]
    """Objects not back at full replication by the bound after faults stopped."""
    repaired_after_s: float
    """Seconds after faults stopped until every object was at full replication."""
    residency_violations: list[str]
    stray_copies: int
    kv_divergent: list[str]
    kv_lost: list[str]
    kv_writes_outside_final_set: int
    """Acknowledged KV writes no final replica acknowledged (stand-ins took them)."""
    down_for_good: list[str]
    trace_hash: str
    events: int
    deleted: int = 0
    """Objects deleted during the faults."""
    resurrected: list[str] = field(default_factory=list)
    """Deleted objects some live node still holds after the repair bound."""
    late_commits: int = 0
    """Copies of deleted objects committed after their delete (later removed again)."""
    late_commit_problems: list[str] = field(default_factory=list)
    """Late commits of a copy written after its delete (it would beat the tombstone), or
    committed once repair was done: must be empty."""
    kv_sloppy_missed: list[str] = field(default_factory=list)
    """Of ``kv_writes_outside_final_set``, the writes the final read at ALL does not see:
    lost to readers, although their acknowledging nodes keep them (``kv_ack_problems``).
    Must be empty: the stand-ins' hints hand them to the replicas (``core.kv.KVHints``)."""
    kv_acks_gone: list[str] = field(default_factory=list)
    """Acknowledged KV writes the final read at ALL does not see, every node that
    acknowledged them being down for good: two permanent failures take both copies of a
    QUORUM write (W=2 of 3) before anyone else held it. Beyond what the write promised;
    reported, not asserted (``kv_sloppy_missed`` holds the others)."""
    kv_ack_problems: list[str] = field(default_factory=list)
    """Acknowledged KV writes without a quorum of the write set they went to, or missing
    (or older) on the disk of a node that acknowledged them: must be empty."""
    faults: list[str] = field(default_factory=list)
    replication_stats: dict[str, int] = field(default_factory=dict)
    """ReplicaManager counters summed over the nodes' last incarnations."""
    kv_hint_stats: dict[str, int] = field(default_factory=dict)
    """KVHints counters summed over the nodes' last incarnations, and ``left``: hints
    still on disk at the end (their targets never came back)."""
    spare_stats: dict[str, int] = field(default_factory=dict)
    """``DataNode.spare_stats`` summed over the nodes' last incarnations (``spares=True``)."""


def chaos_run(
    seed: int,
    *,
    nodes: int = 12,
    objects: int = 40,
    keys: int = 8,
    fault_until: float = 80.0,
    repair_bound_s: float = 40.0,
    replicas: int = 3,
    deletes: int = 8,
    spares: bool = False,
    rebuild_slice_entries: int | None = None,
) -> ChaosReport:
    """Random crashes, restarts, pauses, partitions and full disks (a node refuses every
    write for a while, advertising itself full) over a 12-node, 3-region mesh, with
    writes before and during the faults; at most ``replicas - 1`` nodes go down for good.
    During the faults ``deletes`` objects written before them are deleted, each from a
    random live node (a crashed or paused holder misses the delete and comes back with
    its copy); none may be held by a live node once repair is done.

    Objects written before the faults use W=2 and have time to reach full replication;
    objects written during the faults use W=R (hinted copies count), so that losing R-1
    nodes for good can never take every acknowledged copy.

    ``rebuild_slice_entries``: rebuild each view change in slices of that many entries
    (``ReplicationConfig.rebuild_slice_entries``, 0.05 s apart) rather than at once.
    """
    mesh = DataMesh(nodes, seed=seed, disk_reserve_bytes=64, disk_margin_bytes=64,
                    spares=spares, rebuild_slice_entries=rebuild_slice_entries)
    sim = mesh.sim
    rng = random.Random(f"chaos/{seed}")
    regions = list(mesh.topology.regions)
    faults: list[str] = []

    def policy_for(i: int) -> ObjectPolicy:
        if i % 4 == 0:
            region = regions[(i // 4) % len(regions)]
            return ObjectPolicy(replicas, Residency(frozenset({region}), "pii"))
        return ObjectPolicy(replicas)

    def put_random(i: int, w: int) -> None:
        up = mesh.up()
        if not up:
            return
        node = up[rng.randrange(len(up))]
        mesh.put_async(node, f"object-{seed}-{i}".encode(), policy_for(i), w)

    key_names = [f"ref/{k}" for k in range(keys)]

    def kv_random(j: int) -> None:
        up = mesh.up()
        node = up[rng.randrange(len(up))]
        key = key_names[rng.randrange(len(key_names))]
        mesh.kv_async(node, key, f"v{j}".encode(), Consistency.QUORUM)

    sim.run_until(2.0)
    before = objects // 2
    for i in range(before):
        sim.at(2.0 + 8.0 * i / before, partial(put_random, i, 2))
    for j in range(keys * 2):
        sim.at(2.0 + 8.0 * j / (keys * 2), partial(kv_random, j))
    sim.run_until(15.0)

    # Faults: one every ~3 s until fault_until.
    transient: dict[str, float] = {}
    filled: dict[str, float] = {}
    t = 15.0
    during = objects - before
    for i in range(during):
        sim.at(16.0 + (fault_until - 20.0) * i / during, partial(put_random, before + i, replicas))
    for j in range(keys * 2):
        sim.at(16.0 + (fault_until - 20.0) * j / (keys * 2), partial(kv_random, 100 + j))

    def delete_random() -> None:
        up = mesh.up()
        pre = [oid for oid in sorted(mesh.live())
               if mesh.acked[oid].at < 15.0 and oid not in mesh.delete_requests]
        if not up or not pre:
            return
        mesh.delete_async(up[rng.randrange(len(up))], pre[rng.randrange(len(pre))])

    for k in range(deletes):
        sim.at(17.0 + (fault_until - 22.0) * k / max(1, deletes), delete_random)

    def inject() -> None:
        now = sim.now
        for n, until in sorted(transient.items()):
            if until <= now:
                del transient[n]
                mesh.restart(n)
                faults.append(f"{now:.1f} restart {n}")
        for n, until in sorted(filled.items()):
            if until <= now:
                del filled[n]
                mesh.set_capacity(n, None)
                faults.append(f"{now:.1f} room {n}")
        up = [n for n in mesh.up() if n not in transient]
        if len(up) <= 6:
            return
        roll = rng.random()
        victim = up[rng.randrange(len(up))]
        if roll < 0.3 and len(transient) < 2:
            transient[victim] = now + rng.uniform(5.0, 20.0)
            mesh.crash(victim)
            faults.append(f"{now:.1f} crash {victim}")
        elif roll < 0.4 and len(mesh.down_for_good) < replicas - 1:
            mesh.crash(victim, for_good=True)
            faults.append(f"{now:.1f} crash-for-good {victim}")
        elif roll < 0.7:
            d = rng.uniform(1.0, 8.0)
            sim.pause(victim, d)
            faults.append(f"{now:.1f} pause {victim} {d:.1f}")
        elif roll < 0.85:
            cut = list(up)
            rng.shuffle(cut)
            side = cut[: rng.randint(1, len(cut) // 2)]
            sim.partition(side, [n for n in mesh.names if n not in side])
            heal_at = now + rng.uniform(3.0, 12.0)
            sim.at(min(heal_at, fault_until), sim.heal)
            faults.append(f"{now:.1f} partition {','.join(sorted(side))}")
        elif roll < 0.92 and len(filled) < 2:
            filled[victim] = now + rng.uniform(5.0, 25.0)
            mesh.fill(victim)
            faults.append(f"{now:.1f} fill {victim}")
        # else: a quiet interval

    while t < fault_until:
        sim.at(t, inject)
        t += rng.uniform(2.0, 4.0)

    def periodic_loss_check() -> None:
        for oid in mesh.lost():
            mesh.loss_events.append(f"{sim.now:.3f} acked object {oid} has no surviving copy")

    for k in range(int(fault_until + repair_bound_s)):
        sim.at(float(k), periodic_loss_check)

    sim.run_until(fault_until)
    sim.heal()
    for n in sorted(filled):
        mesh.set_capacity(n, None)
        faults.append(f"{sim.now:.1f} room {n}")
    filled.clear()
    for n in sorted(transient):
        mesh.restart(n)
        faults.append(f"{sim.now:.1f} restart {n}")
    transient.clear()
    t_stop = sim.now
    done = sim.run_until_true(lambda: not mesh.under_replicated() and not mesh.resurrected(),
                              t_stop + repair_bound_s, 0.5)
    repaired_after = sim.now - t_stop if done else float("inf")
    under = mesh.under_replicated()
    # Let hand-offs finish their drops, then KV: read every key at ALL (read repair).
    sim.run_until(max(sim.now, t_stop + repair_bound_s))
    kv_lost: list[str] = []
    kv_sloppy = 0
    kv_sloppy_missed: list[str] = []
    kv_acks_gone: list[str] = []
    kv_ack_problems: list[str] = []
    puts = [(t, ev) for t, ev in mesh.kv_acked if ev.op_id not in mesh.kv_gets]
    for t, ev in puts:
        assert ev.record is not None
        need = Consistency.QUORUM.required(len(ev.replicas)) if ev.replicas else 1
        if not set(ev.answered) <= set(ev.replicas) or len(set(ev.answered)) < need:
            kv_ack_problems.append(f"{t:.3f} {ev.key}: acknowledged by {ev.answered} of "
                                   f"write set {ev.replicas}")
        for n in ev.answered:
            held = mesh.node(n).kv.get(ev.key)
            if held is None or held.ts < ev.record.ts:
                kv_ack_problems.append(f"{t:.3f} {ev.key}: {n} acknowledged it but its disk "
                                       f"holds {held}")
    for key in key_names:
        node = mesh.up()[0]
        res = mesh.kv_get(node, key, Consistency.ALL)
        if res is None or not res.ok:
            res = mesh.kv_get(node, key, Consistency.ALL)
        sim.run_until(sim.now + 2.0)
        # An acknowledged write must be seen by a read at ALL: directly if a replica that
        # acknowledged it is in the final replica set, else (a write acknowledged only by
        # stand-ins, e.g. on the minority side of a partition) through their hints.
        final = set(kv_replicas(key, mesh.truth_view()))
        newest = None
        seen = res.record.ts if res is not None and res.record is not None else None
        for t, ev in puts:
            if ev.key != key or ev.record is None or ev.record.value is None:
                continue
            if not set(ev.answered) & final:
                kv_sloppy += 1
                if seen is None or seen < ev.record.ts:
                    missed = (kv_acks_gone if set(ev.answered) <= mesh.down_for_good
                              else kv_sloppy_missed)
                    missed.append(
                        f"{t:.3f} {key}: acknowledged by {','.join(ev.answered)}, final "
                        f"replicas {','.join(sorted(final))}")
                continue
            if newest is None or ev.record.ts > newest:
                newest = ev.record.ts
        if newest is not None and (res is None or res.record is None or res.record.ts < newest):
            kv_lost.append(key)
    # Checked at the end: a copy of a deleted object must not turn up once repair is done.
    late_problems = []
    for t_commit, node, oid, written in mesh.late_commits:
        tomb = mesh.delete_ts[oid]
        if written is not None and written > tomb:
            late_problems.append(f"{t_commit:.3f} {node}: copy of deleted {oid} written after "
                                 "its delete")
        if t_commit > t_stop + repaired_after:
            late_problems.append(f"{t_commit:.3f} {node}: copy of deleted {oid} committed "
                                 f"after repair was done at {t_stop + repaired_after:.3f}")
    stats: dict[str, int] = {}
    hint_stats: dict[str, int] = {"left": 0}
    spare_stats: dict[str, int] = {}
    for n in mesh.names:
        for counter, v in mesh.node(n).replicas.stats.items():
            stats[counter] = stats.get(counter, 0) + v
        for counter, v in mesh.node(n).hints.stats.items():
            hint_stats[counter] = hint_stats.get(counter, 0) + v
        hint_stats["left"] += len(mesh.node(n).hints)
        for counter, v in mesh.node(n).spare_stats.items():
            spare_stats[counter] = spare_stats.get(counter, 0) + v
    return ChaosReport(
        seed=seed,
        acked=len(mesh.acked),
        failed=sum(1 for r in mesh.results.values() if not r.acked),
        lost=sorted(set(mesh.lost())) + mesh.loss_events,
        under_replicated=under,
        repaired_after_s=repaired_after,
        residency_violations=mesh.violations + [
            f"on disk: {n} {o}" for n, o in mesh.residency_breaches_on_disk()
        ],
        stray_copies=len(mesh.stray_copies()),
        kv_divergent=mesh.kv_divergent(key_names),
        kv_lost=kv_lost,
        kv_writes_outside_final_set=kv_sloppy,
        kv_sloppy_missed=kv_sloppy_missed,
        kv_acks_gone=kv_acks_gone,
        kv_ack_problems=kv_ack_problems,
        down_for_good=sorted(mesh.down_for_good),
        trace_hash=sim.trace_hash(),
        events=sim.events_processed,
        deleted=len(mesh.deleted),
        resurrected=mesh.resurrected(),
        late_commits=len(mesh.late_commits),
        late_commit_problems=late_problems,
        faults=faults,
        replication_stats=stats,
        kv_hint_stats=hint_stats,
        spare_stats=spare_stats,
    )

