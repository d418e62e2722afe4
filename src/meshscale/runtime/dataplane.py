"""The node's data plane: the driver of ``core.replication`` and ``core.kv``.

Decisions (where copies go, when to repair, hand off or drop, who wins a KV race) are
made in ``core/``; this module only moves bytes and keeps the disk:

- the local store (``runtime.storage.LocalStore``: files under their hash, SQLite index,
  fsync before anything is acknowledged);
- node-to-node transfers over the agent's mutual-TLS connections, chunked RPCs
  (``obj.rw_begin`` / ``obj.rw_chunk`` / ``obj.rw_end``); the receiver commits with the
  expected id, so a corrupt or truncated transfer never becomes a visible object;
- the client-facing RPCs ``obj.*`` and ``kv.*`` (see ``client/mesh.py``).

Reads: a node serves a read from its own copy after checking its hash (a corrupt copy is
quarantined and reported, so anti-entropy refills it) or, when it has none, proxies the
bytes from a node that has one. The client checks the hash of the whole object again. A
copy hash-checked in the last ``verified_ttl_s`` (at its commit or by a read) whose file
is unchanged (inode, size, mtime, ctime) is not re-hashed: see ``DataPlaneConfig``.

Puts: a client that names the object's id up front gets a cut-through put (its chunks
go on to the replica set as they arrive, see ``_start_forwards``); without it, the
coordinator stores the object, then pushes it. Either way the write is acknowledged only
when W copies are committed (fsynced, hash checked against the id) on distinct nodes.

Full disks: every ``disk_check_interval_s`` the node compares its free space with its
reserve (``StorageConfig.min_free_bytes``), counting any write the store refused for want of
room meanwhile, and advertises itself full, or not, in its gossiped tags (``placement.FULL_TAG``; the hysteresis is ``placement.disk_full``, with
``disk_room_margin_bytes``). Its peers then leave it out of new replica sets (puts and
their cut-through copies, stand-ins, repair, KV writes) while its copies stay readable
and counted; see ``core/placement.py`` and ``core/replication.py``.

Deletes (``obj.delete``): the node asked finds the holders, stamps the delete with its HLC
(after catching up with the newest write of the object it heard of) and hands it to
``ReplicaManager.delete``, which drops copies and spreads a tombstone; tombstones are kept
in the store (``obj_tombstones``) so a restarted node still refuses the deleted copies,
and they expire after ``ReplicationConfig.tombstone_grace_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from meshscale.core.api import ApiError, Empty, ErrorCode, Method, ResidencyWire
from meshscale.core.api import objects as api
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
)
from meshscale.core.membership import VIEW_CHANGES, State
from meshscale.core.objects import object_id
from meshscale.core.outputs import Event
from meshscale.core.placement import (
    FULL_TAG,
    Candidate,
    PlacementError,
    Residency,
    check_quorum,
    disk_full,
    is_full,
    may_hold,
    replica_set,
    write_set,
)
from meshscale.core.replication import (
    DeleteAcked,
    DeleteFailed,
    DropLocal,
    ObjectPolicy,
    PutAcked,
    PutFailed,
    ReplicaManager,
    ReplicationConfig,
    ReplicationOverloaded,
    SendMessage,
    TombstoneDropped,
    TombstoneStored,
    Transfer,
    UnderReplicated,
)
from meshscale.runtime.deadline import DeadlineTimer
from meshscale.runtime.local import call_node
from meshscale.runtime.services import NodeServices, Rep, Req
from meshscale.runtime.storage import (
    MAX_KV_KEY_BYTES,
    MAX_KV_VALUE_BYTES,
    LocalStore,
    ObjectMeta,
    ObjectWriter,
    StorageConfig,
    StorageError,
)
from meshscale.transport.rpc import RpcConnection, RpcError

LANE = "data"
"""The data plane's lane of the node's peer pool (``transport/peers.py``)."""

KV_STRAGGLERS_MAX = 256
"""KV replica calls left running after their write returned (see ``_kv_round``)."""


D = TypeVar("D", bound=api.ObjectDesc)


def _as(cls: type[D], desc: api.ObjectDesc, **extra: Any) -> D:
    """``desc``'s fields as a ``cls`` (a richer description) with ``extra``."""
    return cls(**{f: getattr(desc, f) for f in api.ObjectDesc.__struct_fields__}, **extra)


def _health(e: api.ListedObject) -> api.ListedObject:
    """``e`` with its holders sorted and its health: ``ok`` when enough of them are where
    its rule and the current view put its copies."""
    e.holders.sort()
    want = min(e.replicas, len(e.replica_set)) if e.replica_set else e.replicas
    # A stand-in (write set) holds a copy in place of a full member that lacks it.
    fits = set(e.replica_set) | set(e.write_set)
    good = [h for h in e.holders if h in fits]
    e.health = "ok" if len(good) >= want and want == e.replicas else "under-replicated"
    return e


def _small_copy(header: api.ReplicaHeader, data: bytes) -> api.ReplicaSmallRequest:
    """A whole copy in one call: ``header`` and the bytes."""
    return api.ReplicaSmallRequest(**msgspec.structs.asdict(header), data=data)


def _straggler_done(
    stragglers: set[asyncio.Future[None]],
) -> Callable[[asyncio.Future[None]], None]:
    def done(fut: asyncio.Future[None]) -> None:
        stragglers.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved: a late failure was already counted by the coordinator

    return done


@dataclass(frozen=True)
class DataPlaneConfig:
    """Bounds of the data plane driver (the protocol's are in ReplicationConfig)."""

    chunk_bytes: int = 4 * 1024 * 1024
    """Largest chunk of one put/read/transfer RPC (frames are bounded at 8 MB)."""
    max_uploads: int = 64
    """Uploads (client puts and incoming replica transfers) open at once."""
    upload_idle_s: float = 60.0
    """An upload with no chunk for this long is aborted and forgotten."""
    put_wait_s: float = 25.0
    """How long ``obj.put_end`` waits for the write quorum."""
    max_transfers: int = 8
    """Outgoing object transfers at once (their connections, and how many stay open, are
    the node's peer pool's: ``AgentConfig.peers``)."""
    forward_window: int = 4
    """Chunks queued per replica for a cut-through put (see ``_start_forwards``)."""
    forward_ahead: int = 2
    """Chunks of a cut-through copy sent to a member ahead of its replies."""
    forward_stall_s: float = 5.0
    """A replica whose cut-through queue stays full this long is dropped from it (its copy
    is then pushed from the coordinator's own once that is committed)."""
    inline_bytes: int = 256 * 1024
    """Objects up to this size travel in one RPC (put and replica transfer)."""
    max_replicas: int = api.MAX_REPLICAS
    """Largest replication factor a put may ask for."""
    stat_timeout_s: float = 3.0
    """Asking every node about its local copies (a lookup, no disk read of the bytes): a
    node silent this long is counted as not holding one."""
    kv_replicas: int = 3
    kv_timeout_s: float = 5.0
    kv_hints: KVHintConfig = field(default_factory=KVHintConfig)
    """Hinted handoff of KV writes taken by stand-ins (``core.kv.KVHints``): the bounds
    ``max_hints`` and ``max_hint_age_s`` and what happens beyond them are documented there."""
    read_source_cache: int = 1024
    verified_cache: int = 4096
    """Local copies remembered as hash-checked (see ``verified_ttl_s``)."""
    verified_ttl_s: float = 60.0
    """A read from offset 0 re-hashes the whole local copy before serving it, unless that
    copy was hash-checked (when it was committed or by an earlier read) less than this long
    ago and its file's inode, size, mtime and ctime are unchanged since. So a byte flipped
    through the filesystem is always caught, and silent bit rot under an unchanged inode is
    caught by the next full check at most this long later; meanwhile the reader's own check
    (the client hashes every object it gets) still refuses it. 0 checks every read."""
    drop_batch: int = 256
    """Local copies removed in one store transaction (see ``_drop``)."""
    gc_interval_s: float = 5.0
    """How often expired (TTL'd, unpinned) objects are collected."""
    disk_check_interval_s: float = 1.0
    """How often free space is compared with the reserve (to advertise a full disk)."""
    disk_room_margin_bytes: int = 64 << 20
    """A node advertised full is advertised not full again only once its free space is at
    least its reserve plus this much (hysteresis: no flapping at the edge)."""
    max_ttl_s: float = 10 * 365 * 86400.0
    storage: StorageConfig = field(default_factory=lambda: StorageConfig(min_free_bytes=64 << 20))
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)


@dataclass
class _Forward:
    """A cut-through copy of a client upload to one replica-set member: chunks go to it as
    they arrive (``queue``; ``None`` ends it) instead of after the whole object is stored.
    ``done`` is True once the member committed a copy (hash checked, fsynced)."""

    dst: str
    queue: asyncio.Queue[bytes | None]
    done: asyncio.Future[bool]
    task: asyncio.Task[None] | None = None
    closed: bool = False
    """Takes no more chunks (finished, failed or dropped)."""


@dataclass
class _Upload:
    writer: ObjectWriter
    size: int
    policy: ObjectPolicy
    w: int
    expected_id: str | None
    hint_for: str | None
    client: bool
    received: int = 0
    last: float = field(default_factory=time.monotonic)
    pending: asyncio.Future[None] | None = None
    """The local write of the previous chunk, still running (write-behind: a chunk is
    answered once queued, so the next one crosses the network while this one is written;
    its error is raised on the next chunk or at the end)."""
    req: int | None = None
    """The write's id, allocated early when copies start before the local commit."""
    forwards: dict[str, _Forward] = field(default_factory=dict)
    expires: float | None = None
    spare: bool = False
    """This node is outside the object's replica set (its copies started early): its own
    copy is a spare, written but neither hashed nor fsynced, committed only if a member's
    copy fails (the push from it needs it) and otherwise dropped (see ``_finish_spare``)."""


@dataclass(frozen=True)
class _UploadSpec:
    """An upload as asked for (a client put's or a replica transfer's header)."""

    size: int
    policy: ObjectPolicy
    w: int
    oid: str | None
    hint_for: str | None = None
    ttl_s: float | None = None
    expires: float | None = None
    written: str | None = None


@dataclass
class _Spare:
    """A spare copy (see ``_Upload.spare``) waiting for the members' copies to settle."""

    key: str
    up: _Upload
    oid: str
    commit: asyncio.Future[ObjectMeta] | None = None


def _kv_key(key: str) -> str:
    """A KV key within MAX_KV_KEY_BYTES of UTF-8, else ``invalid`` naming the limit."""
    if not key:
        raise ApiError(ErrorCode.INVALID, "a KV key is a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KV_KEY_BYTES:
        raise ApiError(ErrorCode.INVALID,
                       f"a KV key is at most {MAX_KV_KEY_BYTES} bytes (MAX_KV_KEY_BYTES)")
    return key


def _storage_error(e: StorageError) -> ApiError:
    """A store's refusal as the caller's error (a full disk names its bound)."""
    code = ErrorCode.DISK_FULL if e.reason == "disk_full" else ErrorCode.INVALID
    return ApiError(code, f"{e.reason}: {e}")


async def _await(task: asyncio.Task[None]) -> None:
    await task


def _stamp(s: object) -> HLCTimestamp | None:
    """An encoded HLC timestamp from a store row or a peer, or None (unknown or bad)."""
    if not isinstance(s, str):
        return None
    try:
        return HLCTimestamp.decode(s)
    except ValueError:
        return None


def policy_of(meta: ObjectMeta) -> ObjectPolicy:
    residency = None
    if meta.residency is not None or meta.data_class is not None:
        regions = frozenset(meta.residency) if meta.residency is not None else None
        residency = Residency(regions, meta.data_class)
    return ObjectPolicy(meta.replicas, residency)


def _rule(wire: ResidencyWire | None) -> Residency | None:
    """The residency rule on the wire (None: none, as a rule naming nothing is)."""
    if wire is None or (wire.regions is None and wire.data_class is None):
        return None
    return wire.rule()


def _policy(replicas: int, wire: ResidencyWire | None) -> ObjectPolicy:
    return ObjectPolicy(replicas, _rule(wire))


class DataPlane:
    """Objects and KV on one node; created and started by ``NodeAgent``."""

    def __init__(self, agent: NodeServices, config: DataPlaneConfig | None = None) -> None:
        self.agent = agent
        self.cfg = config or DataPlaneConfig()
        self.store: LocalStore | None = None
        self.rm: ReplicaManager | None = None
        self.hlc = HybridLogicalClock(agent.name)
        self._uploads: dict[str, _Upload] = {}
        self._upload_ids = itertools.count(1)
        self._req_ids = itertools.count(1)
        self._puts: dict[int, asyncio.Future[tuple[str, tuple[str, ...]]]] = {}
        self._deletes: dict[int, asyncio.Future[tuple[str, ...]]] = {}
        self._early: dict[tuple[int, str], asyncio.Future[bool]] = {}
        """(write id, member) -> a copy started before ``begin_put`` (cut-through or a
        small put's copies sent while the coordinator commits its own): the ``Transfer``
        for it waits on this instead of pushing the bytes again."""
        self._forward_tasks: set[asyncio.Task[None]] = set()
        self._spares: dict[int, _Spare] = {}
        """write id -> the spare copy of a put coordinated outside its replica set."""
        self._kv_stragglers: set[asyncio.Future[None]] = set()
        self.hints = KVHints(agent.name, self.cfg.kv_hints, replicas=self.cfg.kv_replicas,
                             started=time.time())
        self._hints_wake = asyncio.Event()
        self._hints_lock = asyncio.Lock()  # hint changes reach the store in order
        self._sources: OrderedDict[str, str] = OrderedDict()
        self._verified: OrderedDict[str, tuple[float, tuple[int, ...]]] = OrderedDict()
        """oid -> (when its local copy was last hash-checked, its file's identity then)."""
        self._transfer_sem = asyncio.Semaphore(self.cfg.max_transfers)
        self._tomb_lock = asyncio.Lock()  # tombstone writes reach the store in order
        self._drops: dict[str, None] = {}
        """Copies to drop, in order; one task removes them in batches (``_drain_drops``)."""
        self._dropping = False
        self._timer = DeadlineTimer(self._on_timer)
        self.stats: dict[str, int] = {}

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        agent = self.agent
        self.store = await asyncio.to_thread(LocalStore, agent.data_dir / "store", self.cfg.storage)
        now = time.monotonic()
        self.rm = ReplicaManager(
            agent.name, config=self.cfg.replication, rng=random.Random(agent.rng.random()), now=now
        )
        after = ""
        while True:
            page = await asyncio.to_thread(self.store.list, after=after, limit=1000)
            for meta in page:
                self.rm.object_added(meta.object_id, policy_of(meta), meta.hint_for, now,
                                     _stamp(meta.written))
            if len(page) < 1000:
                break
            after = page[-1].object_id
        after = ""
        while True:
            tombs = await asyncio.to_thread(self.store.tombstones, after=after, limit=1000)
            for oid, ts, replicas, data_class, residency in tombs:
                stamp = _stamp(ts)
                if stamp is not None:
                    rule = None if residency is None and data_class is None else Residency(
                        None if residency is None else frozenset(residency), data_class)
                    self.rm.tombstone_loaded(oid, ObjectPolicy(replicas, rule), stamp)
            if len(tombs) < 1000:
                break
            after = tombs[-1][0]
        for key, target, ts, since in await asyncio.to_thread(self.store.kv_hints):
            stamp = _stamp(ts)
            if stamp is not None:
                self.hints.load(key, target, stamp, since)
        self.rm.set_view(self._view(), now)
        self.hints.set_view(self._view(), self._down_view())
        self._serve()
        agent.event_listeners.append(self._on_member_event)
        await self._check_disk()  # before the node joins: it comes back full if it is
        agent.spawn(self._housekeeping())
        agent.spawn(self._watch_disk())
        agent.spawn(self._hand_off_loop())
        self._pump()

    def _serve(self) -> None:
        serve = self.agent.serve
        serve(api.PUT_BEGIN, self._rpc_put_begin)
        serve(api.PUT_CHUNK, self._rpc_put_chunk)
        serve(api.PUT_END, self._rpc_put_end)
        serve(api.PUT_ABORT, self._rpc_put_abort)
        serve(api.PUT_SMALL, self._rpc_put_small)
        serve(api.RW_BEGIN, self._rpc_rw_begin)
        serve(api.RW_CHUNK, self._rpc_put_chunk)
        serve(api.RW_END, self._rpc_rw_end)
        serve(api.RW_SMALL, self._rpc_rw_small)
        serve(api.READ, self._rpc_read)
        serve(api.READ_LOCAL, self._rpc_read_local)
        serve(api.LOCAL_STAT, self._rpc_local_stat)
        serve(api.LOCAL_LIST, self._rpc_local_list)
        serve(api.STAT, self._rpc_stat)
        serve(api.LIST, self._rpc_list)
        serve(api.CORRUPT_LOCAL, self._rpc_corrupt_local)
        serve(api.DELETE, self._rpc_delete)
        serve(api.REPL_MSG, self._rpc_repl_msg)
        serve(api.KV_PUT, self._rpc_kv_put)
        serve(api.KV_DELETE, self._rpc_kv_delete)
        serve(api.KV_GET, self._rpc_kv_get)
        serve(api.KV_APPLY, self._rpc_kv_apply)
        serve(api.KV_READ, self._rpc_kv_read)
        serve(api.DP_STATS, self._rpc_stats)

    async def stop(self) -> None:
        self._timer.cancel()
        for task in list(self._forward_tasks):
            task.cancel()
        for up in [*self._uploads.values(), *(sp.up for sp in self._spares.values())]:
            with contextlib.suppress(Exception):
                self._abort_upload(up)
        self._uploads.clear()
        self._spares.clear()
        if self.store is not None:
            self.store.close()

    # ------------------------------------------------------------------ driving core

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def _view(self) -> list[Candidate]:
        return [
            Candidate(m.name, m.meta.region, m.meta.zone, full=is_full(m.meta.tags))
            for m in self.agent.m.members.values()
            if m.state <= State.SUSPECT
        ]

    def _down_view(self) -> list[Candidate]:
        """Members held as dead (not left, not yet reaped): they shape a key's intended
        replica set (``kv_placement``'s ``down``)."""
        return [
            Candidate(m.name, m.meta.region, m.meta.zone, full=is_full(m.meta.tags))
            for m in self.agent.m.members.values()
            if m.state == State.DEAD
        ]

    def _addr(self, name: str) -> str | None:
        m = self.agent.m.members.get(name)
        return None if m is None else m.addr

    def _on_member_event(self, ev: Event) -> None:
        if self.rm is None:
            return
        if isinstance(ev, VIEW_CHANGES):
            self.rm.set_view(self._view(), time.monotonic())
            self._pump()
            self.hints.set_view(self._view(), self._down_view())
            self._hints_wake.set()

    def _pump(self) -> None:
        rm = self.rm
        if rm is None:
            return
        persisting: list[asyncio.Task[None]] = []
        for out in rm.drain():
            if isinstance(out, SendMessage):
                # A message after a tombstone in the same batch (a TombstoneAck, an offer
                # of it) leaves once the tombstone is on disk: "kept" means durable.
                self.agent.spawn(self._send_repl(out.dst, out.payload, list(persisting)))
            elif isinstance(out, Transfer):
                self.agent.spawn(self._transfer(out))
            elif isinstance(out, DropLocal):
                self.agent.spawn(self._drop(out.oid))
            elif isinstance(out, TombstoneStored | TombstoneDropped):
                task = asyncio.ensure_future(self._persist_tomb(out))
                persisting.append(task)
                self.agent.spawn(_await(task))
            elif isinstance(out, DeleteAcked):
                fut = self._deletes.pop(out.req_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(out.nodes)
            elif isinstance(out, DeleteFailed):
                fut = self._deletes.pop(out.req_id, None)
                if fut is not None and not fut.done():
                    fut.set_exception(ValueError(f"delete of {out.oid} not confirmed: "
                                                 f"{out.reason}"))
            elif isinstance(out, PutAcked):
                pfut = self._puts.pop(out.req_id, None)
                if pfut is not None and not pfut.done():
                    pfut.set_result((out.oid, out.nodes))
            elif isinstance(out, PutFailed):
                pfut = self._puts.pop(out.req_id, None)
                if pfut is not None and not pfut.done():
                    pfut.set_exception(ValueError(f"put of {out.oid} failed: {out.reason}"))
            elif isinstance(out, UnderReplicated):
                self._count("under_replicated_events")
                self.agent.log("warning", "under_replicated", object=out.oid,
                               live=out.live_replicas, wanted=out.wanted)
            elif isinstance(out, Event):
                self.agent.log("info", type(out).__name__)
        self._timer.arm(rm.next_deadline())

    def _on_timer(self) -> None:
        if self.rm is not None:
            self.rm.on_timer(time.monotonic())
        self._pump()

    # ------------------------------------------------------------------ node-to-node

    async def _call(self, name: str, method: Method[Req, Rep], req: Req) -> Rep:
        """Typed ``method`` on member ``name`` (in-process when it is this node)."""
        return await call_node(self.agent, name, method, req, lane=LANE)

    def _checkout(self, name: str) -> RpcConnection:
        """A pooled connection to ``name`` for one transfer alone (``peers.checkout``)."""
        addr = self._addr(name)
        if addr is None:
            raise RpcError(f"{name}: not a member")
        return self.agent.peers.checkout(name, addr)

    async def _send_repl(self, dst: str, payload: bytes,
                         after: list[asyncio.Task[None]] | None = None) -> None:
        if after:
            await asyncio.gather(*after, return_exceptions=True)
        try:
            await self._call(dst, api.REPL_MSG,
                             api.ReplMsgRequest(src=self.agent.name, payload=payload))
        except (RpcError, ValueError) as e:
            self._count("repl_send_failed")
            self.agent.log("debug", "repl_send_failed", peer=dst, error=str(e))

    def _rpc_repl_msg(self, req: api.ReplMsgRequest) -> api.Done:
        assert self.rm is not None
        self.rm.handle_message(req.src, req.payload, time.monotonic())
        self._pump()
        return api.Done()

    async def _transfer(self, t: Transfer) -> None:
        ok = False
        early = None if t.req_id is None else self._early.pop((t.req_id, t.dst), None)
        if early is not None:
            ok = await asyncio.shield(early)
            if ok:
                self._count("transfers_ok")
                self._count("transfers_early")
                assert self.rm is not None
                self.rm.transfer_done(t.req_id, t.dst, t.oid, ok, time.monotonic())
                self._pump()
                return
            self._count("transfers_early_failed")  # push the bytes again, from our copy
        spare = None if t.req_id is None else self._spares.get(t.req_id)
        if spare is not None and not self._may_hold(spare.up.policy):
            # Our copy is a spare outside the object's residency: it can never be a source.
            self._count("transfers_refused_residency")
            assert self.rm is not None
            self.rm.transfer_done(t.req_id, t.dst, t.oid, False, time.monotonic())
            self._pump()
            return
        if spare is not None:
            assert t.req_id is not None
            await self._commit_spare(t.req_id)
        async with self._transfer_sem:
            try:
                if t.dst == self.agent.name:
                    assert self.store is not None
                    ok = await asyncio.to_thread(self.store.has, t.oid)
                else:
                    ok = await self._push_object(t)
            except (RpcError, StorageError, ValueError, OSError) as e:
                self._count("transfers_failed")
                self.agent.log("warning", "transfer_failed", object=t.oid, peer=t.dst, error=str(e))
        if ok:
            self._count("transfers_ok")
        assert self.rm is not None
        self.rm.transfer_done(t.req_id, t.dst, t.oid, ok, time.monotonic())
        self._pump()

    async def _push_object(self, t: Transfer) -> bool:
        store = self.store
        assert store is not None
        meta = await asyncio.to_thread(store.meta, t.oid)
        if meta is None:
            return False
        header = api.ReplicaHeader(
            id=t.oid, size=meta.size, replicas=t.policy.replicas,
            residency=ResidencyWire.of(t.policy.residency), hint_for=t.hint_for,
            expires=None if meta.pinned else meta.expires,
            written=t.written.encode() if t.written is not None else meta.written)
        if not meta.pinned and meta.expires is not None and meta.expires <= time.time():
            # Expired here: collect it rather than spread it.
            await self._drop(t.oid)
            return False
        conn = self._checkout(t.dst)
        try:
            return await self._send_copy(conn, t.oid, header)
        except BaseException:
            await conn.close()
            raise
        finally:
            self.agent.peers.checkin(t.dst, conn)

    async def _send_copy(self, conn: RpcConnection, oid: str, header: api.ReplicaHeader) -> bool:
        """Our copy of ``oid`` to the node at the other end of ``conn``."""
        store = self.store
        assert store is not None
        if header.size <= self.cfg.inline_bytes:
            # Small object: one round trip, bytes inline, verified before sending.
            data = await asyncio.to_thread(store.read_bytes, oid)
            await conn.request(api.RW_SMALL, _small_copy(header, data))
            self._count("bytes_sent", header.size)
            return True
        begin = await conn.request(api.RW_BEGIN, header)
        if begin.have or begin.upload is None:
            return True
        upload = begin.upload
        it = store.read_chunks(oid, verify=True, chunk_bytes=self.cfg.chunk_bytes)
        try:
            while True:
                chunk = await asyncio.to_thread(next, it, None)
                if chunk is None:
                    break
                await conn.request(api.RW_CHUNK, api.PutChunkRequest(upload=upload, data=chunk))
        except StorageError:
            # Our copy is corrupt: the receiver's commit would refuse it anyway.
            await self._quarantine(oid)
            with contextlib.suppress(RpcError):
                await conn.request(api.PUT_ABORT, api.UploadRequest(upload=upload))
            return False
        await conn.request(api.RW_END, api.UploadRequest(upload=upload))
        self._count("bytes_sent", header.size)
        return True

    async def _drop(self, oid: str) -> None:
        """Drop a local copy. Drops come in bursts (a handoff after a view change, the
        copies a coordinator outside the replica set kept), so they are removed in
        batches, one transaction (one fsync) each, instead of one commit per copy that a
        foreground put's commit would queue behind."""
        self._drops[oid] = None
        if self._dropping:
            return
        self._dropping = True
        try:
            await self._drain_drops()
        finally:
            self._dropping = False

    async def _drain_drops(self) -> None:
        assert self.store is not None and self.rm is not None
        while self._drops:
            batch = list(itertools.islice(self._drops, self.cfg.drop_batch))
            for oid in batch:
                del self._drops[oid]
                self._verified.pop(oid, None)
            with contextlib.suppress(StorageError):
                await asyncio.to_thread(self.store.delete_many, batch)
            now = time.monotonic()
            for oid in batch:
                self.rm.object_removed(oid, now)
            self._count("dropped", len(batch))
            self._pump()

    async def _persist_tomb(self, ev: TombstoneStored | TombstoneDropped) -> None:
        store = self.store
        assert store is not None
        async with self._tomb_lock:
            try:
                if isinstance(ev, TombstoneStored):
                    res = ev.policy.residency
                    await asyncio.to_thread(
                        store.tombstone_put, ev.oid, ev.ts.encode(), replicas=ev.policy.replicas,
                        data_class=res.data_class if res is not None else None,
                        residency=sorted(res.regions) if res is not None and res.regions is not None
                        else None)
                    self._count("tombstones_stored")
                else:
                    await asyncio.to_thread(store.tombstone_drop, ev.oid)
            except (StorageError, ValueError) as e:
                self._count("tombstone_store_failed")
                self.agent.log("warning", "tombstone_store_failed", object=ev.oid, error=str(e))

    async def _quarantine(self, oid: str) -> None:
        assert self.store is not None and self.rm is not None
        self._verified.pop(oid, None)
        with contextlib.suppress(StorageError):
            await asyncio.to_thread(self.store.quarantine, oid)
        self.rm.object_removed(oid, time.monotonic())
        self._count("quarantined")
        self.agent.log("warning", "corrupt_copy_quarantined", object=oid)
        self._pump()

    # ------------------------------------------------------------------ uploads

    def _check_placement(self, policy: ObjectPolicy, w: int) -> None:
        try:
            view = self._view()
            chosen = write_set("", view, policy.replicas, policy.residency)
            check_quorum(chosen, w, sum(1 for c in view if c.full and policy.allows(c.region)))
        except PlacementError as e:
            detail = str(e)
            if detail.startswith("cannot place"):
                detail = detail.split(": ", 1)[-1]
            raise PlacementError(e.rule, f"{e.rule} rule: {detail}") from None

    def _client_spec(self, size: int, replicas: int, w: int | None,
                     residency: ResidencyWire | None, oid: str | None,
                     ttl_s: float | None) -> _UploadSpec:
        """What a client put asks for, checked against this node's bounds."""
        if replicas > self.cfg.max_replicas:
            raise ApiError(ErrorCode.INVALID, f"replicas must be at most "
                                              f"{self.cfg.max_replicas}, not {replicas}")
        if w is not None and w > replicas:
            raise ApiError(ErrorCode.INVALID, f"w must be from 1 to replicas ({replicas}), "
                                              f"not {w}")
        if ttl_s is not None and ttl_s > self.cfg.max_ttl_s:
            raise ApiError(ErrorCode.INVALID, f"ttl_s must be in (0, {self.cfg.max_ttl_s:g}], "
                                              f"got {ttl_s:g}")
        return _UploadSpec(size, _policy(replicas, residency), min(2, replicas) if w is None
                           else w, oid, ttl_s=ttl_s)

    @staticmethod
    def _replica_spec(h: api.ReplicaHeader) -> _UploadSpec:
        return _UploadSpec(h.size, _policy(h.replicas, h.residency), min(2, h.replicas), h.id,
                           hint_for=h.hint_for, expires=h.expires, written=h.written)

    def _new_upload(self, spec: _UploadSpec, *, client: bool) -> str:
        assert self.store is not None
        self._expire_uploads()
        if len(self._uploads) >= self.cfg.max_uploads:
            raise ApiError(ErrorCode.BUSY, f"busy: {self.cfg.max_uploads} uploads already open")
        policy = spec.policy
        if not client and not self._may_hold(policy):
            # The receiver checks the rule itself: a replica outside it is never written.
            self._count("replicas_refused_residency")
            assert policy.residency is not None
            raise ApiError(ErrorCode.REFUSED, (
                f"refused: this node's region {self.agent.meta.region!r} may not hold a copy "
                f"({policy.residency.describe()})"))
        if client:
            try:
                self._check_placement(policy, spec.w)
            except PlacementError as e:
                raise ApiError(ErrorCode.REFUSED, f"refused: {e}") from None
        now = time.time()
        ttl_s = spec.ttl_s
        if ttl_s is None and spec.expires is not None:
            # A replica of an object with a TTL: same expiry on every copy.
            ttl_s = spec.expires - now
            if ttl_s <= 0:
                raise ApiError(ErrorCode.INVALID, f"expired: {spec.oid} expired before it arrived")
        written = self._write_stamp(spec, client, now)
        res = policy.residency
        try:
            writer = self.store.writer(
                written=written, now=now, size=spec.size, replicas=policy.replicas,
                data_class=res.data_class if res is not None else None,
                residency=(sorted(res.regions) if res is not None and res.regions is not None
                           else None),
                hint_for=spec.hint_for, pinned=ttl_s is None, ttl_s=ttl_s,
            )
        except StorageError as e:  # a full disk refuses the write, naming the bound
            raise _storage_error(e) from None
        upload = f"{self.agent.name}-{next(self._upload_ids)}"
        self._uploads[upload] = _Upload(writer, spec.size, policy, spec.w, spec.oid,
                                        spec.hint_for, client,
                                        expires=None if ttl_s is None else now + ttl_s)
        return upload

    def _write_stamp(self, spec: _UploadSpec, client: bool, now: float) -> str | None:
        """The write's HLC time: a client put's is now (a delete before it loses); a
        replica's is the coordinator's, refused if a delete we know of came after it."""
        if client:
            return self.hlc.now(now).encode()
        if spec.written is None:
            return None
        stamp = _stamp(spec.written)
        if stamp is None:
            raise ApiError(ErrorCode.INVALID, f"bad write timestamp {spec.written!r:.80}")
        assert self.rm is not None
        if not self.rm.accepts(str(spec.oid), stamp):
            self._count("deleted_copies_refused")
            raise ApiError(ErrorCode.INVALID,
                           f"deleted: {spec.oid} was deleted after this copy was written")
        return spec.written

    def _expire_uploads(self) -> None:
        now = time.monotonic()
        for key, up in list(self._uploads.items()):
            if now - up.last > self.cfg.upload_idle_s:
                self._drop_upload(key, up)
                self._count("uploads_expired")

    def _upload(self, key: str) -> tuple[str, _Upload]:
        up = self._uploads.get(key)
        if up is None:
            raise ValueError(f"unknown or expired upload {key!r}")
        return key, up

    def _drop_upload(self, key: str, up: _Upload) -> None:
        self._uploads.pop(key, None)
        self._abort_upload(up)

    def _abort_upload(self, up: _Upload) -> None:
        """Nothing of this upload remains: its copies in flight are stopped and the temp
        file goes once the write still running in a thread (if any) has returned."""
        for fwd in up.forwards.values():
            self._stop_forward(fwd)
            if up.req is not None:
                self._early.pop((up.req, fwd.dst), None)
        pending, up.pending = up.pending, None
        if pending is not None and not pending.done():
            def abort(fut: asyncio.Future[None]) -> None:
                if not fut.cancelled():
                    fut.exception()  # retrieved: the upload is gone anyway
                up.writer.abort()

            pending.add_done_callback(abort)
        else:
            if pending is not None and not pending.cancelled():
                pending.exception()
            up.writer.abort()

    async def _settle(self, key: str, up: _Upload) -> None:
        """Wait for the local write of the previous chunk; its failure ends the upload."""
        pending = up.pending
        if pending is None:
            return
        try:
            await asyncio.shield(pending)
        except StorageError as e:
            self._drop_upload(key, up)  # the writer already removed its temp file
            raise _storage_error(e) from None
        if up.pending is pending:
            up.pending = None

    def _stamp_after_tombstone(self, up: _Upload, oid: str) -> None:
        """Putting bytes again after they were deleted: stamp the write after the
        tombstone we know of, even if its clock ran ahead of ours."""
        assert self.rm is not None
        tomb = self.rm.tombstone(oid)
        stamp = _stamp(up.writer.written_ts)
        if tomb is not None and (stamp is None or stamp <= tomb):
            with contextlib.suppress(ClockSkewError, ValueError):
                self.hlc.update(tomb, time.time())
            up.writer.written_ts = self.hlc.now(time.time()).encode()

    # -- copies that start before the coordinator's own commit

    def _copy_header(self, oid: str, up: _Upload) -> api.ReplicaHeader:
        return api.ReplicaHeader(
            id=oid, size=up.size, replicas=up.policy.replicas,
            residency=ResidencyWire.of(up.policy.residency), expires=up.expires,
            written=up.writer.written_ts)

    def _early_targets(self, up: _Upload, oid: str) -> list[str]:
        """The other members of ``oid``'s replica set, as ``begin_put`` will choose them
        from the same view (if the view changes meanwhile, a member without an early copy
        gets a normal transfer and an early copy outside the set is a stray copy, handed
        off like any other)."""
        try:
            chosen = write_set(oid, self._view(), up.policy.replicas, up.policy.residency)
        except PlacementError:
            return []
        if up.req is None:
            up.req = next(self._req_ids)
        targets = [c.name for c in chosen if c.name != self.agent.name]
        if len(targets) == len(chosen) and targets and up.expected_id is not None:
            # Not a member: our copy is only a fallback for the pushes (see _finish_spare).
            up.spare = True
            up.writer.defer_hash()
        return targets

    def _add_forward(self, up: _Upload, dst: str, work: Callable[[_Forward], Any],
                     *, queued: bool) -> None:
        assert up.req is not None
        fwd = _Forward(dst, asyncio.Queue(self.cfg.forward_window if queued else 1),
                       asyncio.get_running_loop().create_future(), closed=not queued)
        task = asyncio.ensure_future(work(fwd))
        fwd.task = task
        self._forward_tasks.add(task)
        task.add_done_callback(self._forward_tasks.discard)
        up.forwards[dst] = fwd
        self._early[(up.req, dst)] = fwd.done

    def _start_forwards(self, up: _Upload, oid: str) -> None:
        """Cut-through: a client that names the object's id up front lets us stream each
        chunk to the replica set as it arrives, so the members receive, hash and write
        while we do, and commit (fsync, hash checked against the id) while we commit."""
        header = self._copy_header(oid, up)
        for dst in self._early_targets(up, oid):
            self._add_forward(up, dst, functools.partial(self._run_forward, header=header),
                              queued=True)

    def _start_small_copies(self, up: _Upload, oid: str, data: bytes) -> None:
        """A small put's copies leave at once, while we commit our own."""
        header = _small_copy(self._copy_header(oid, up), data)
        for dst in self._early_targets(up, oid):
            self._add_forward(up, dst, functools.partial(self._run_small_copy, header=header),
                              queued=False)

    async def _run_small_copy(self, fwd: _Forward, header: api.ReplicaSmallRequest) -> None:
        ok = False
        try:
            conn = self._checkout(fwd.dst)
            try:
                await conn.request(api.RW_SMALL, header)
                ok = True
            except BaseException:
                await conn.close()
                raise
            self.agent.peers.checkin(fwd.dst, conn)
            self._count("bytes_sent", header.size)
        except (RpcError, ValueError, OSError) as e:
            self._count("transfers_early_errors")
            self.agent.log("debug", "early_copy_failed", peer=fwd.dst, error=str(e))
        finally:
            if not fwd.done.done():
                fwd.done.set_result(ok)

    async def _run_forward(self, fwd: _Forward, header: api.ReplicaHeader) -> None:
        ok = False
        conn: RpcConnection | None = None
        upload: str | None = None
        try:
            conn = self._checkout(fwd.dst)
            begin = await conn.request(api.RW_BEGIN, header)
            if begin.have or begin.upload is None:
                ok = True
            else:
                upload = begin.upload
                # Chunks go ahead of their replies on the held connection (the member
                # answers them in order), so it takes in the next while writing the last.
                pipe = await conn.pipeline()
                try:
                    while (chunk := await fwd.queue.get()) is not None:
                        if pipe.outstanding >= self.cfg.forward_ahead:
                            await pipe.receive_reply(api.RW_CHUNK)
                        await pipe.send_request(api.RW_CHUNK,
                                                api.PutChunkRequest(upload=upload, data=chunk))
                    while pipe.outstanding:
                        await pipe.receive_reply(api.RW_CHUNK)
                finally:
                    await pipe.close()
                await conn.request(api.RW_END, api.UploadRequest(upload=upload))
                upload = None
                ok = True
                self._count("bytes_sent", header.size)
        except (RpcError, ValueError, OSError, KeyError) as e:
            self._count("transfers_early_errors")
            self.agent.log("debug", "forward_failed", peer=fwd.dst, error=str(e))
        finally:
            fwd.closed = True
            while not fwd.queue.empty():
                fwd.queue.get_nowait()  # whoever waits to queue a chunk is let go
            if not fwd.done.done():
                fwd.done.set_result(ok)
            if conn is not None:
                if ok:
                    self.agent.peers.checkin(fwd.dst, conn)
                else:
                    # A call may have been cut short: this connection is not reused. The
                    # member's half-received upload is aborted (or expires on its own).
                    self.agent.spawn(conn.close())
                    if upload is not None:
                        self.agent.spawn(self._abort_remote(fwd.dst, upload))

    async def _abort_remote(self, dst: str, upload: str) -> None:
        with contextlib.suppress(Exception):
            conn = self._checkout(dst)
            try:
                await asyncio.wait_for(
                    conn.request(api.PUT_ABORT, api.UploadRequest(upload=upload)), 5.0)
            except BaseException:
                await conn.close()
                raise
            self.agent.peers.checkin(dst, conn)

    def _stop_forward(self, fwd: _Forward) -> None:
        fwd.closed = True
        if fwd.task is not None and not fwd.task.done():
            fwd.task.cancel()
        if not fwd.done.done():
            fwd.done.set_result(False)

    async def _feed_forwards(self, up: _Upload, chunk: bytes | None) -> None:
        """Queue a chunk (``None``: the end) for every member still streaming. One that
        stays ``forward_stall_s`` behind is dropped: memory stays bounded and a dead or
        slow member does not hold the put; it gets the bytes from our copy instead."""
        for fwd in list(up.forwards.values()):
            if fwd.closed:
                continue
            try:
                await asyncio.wait_for(fwd.queue.put(chunk), self.cfg.forward_stall_s)
            except TimeoutError:
                self._count("forwards_stalled")
                self._stop_forward(fwd)

    # -- RPCs

    def _rpc_put_begin(self, req: api.PutBeginRequest) -> api.PutBeginReply:
        oid = req.id
        key = self._new_upload(self._client_spec(req.size, req.replicas, req.w, req.residency,
                                                 oid, req.ttl_s), client=True)
        policy = self._uploads[key].policy
        if oid is None and not self._may_hold(policy):
            # Without the id the bytes are committed here before their set is known: that
            # would be a copy outside the rule. (The client library sends the id ahead.)
            self._drop_upload(key, self._uploads[key])
            res = policy.residency
            regions = sorted(res.regions) if res is not None and res.regions is not None \
                else []
            raise ApiError(ErrorCode.REFUSED, (
                f"refused by the residency rule (regions {regions}): this node is in "
                f"{self.agent.meta.region!r} and a put whose id is not sent ahead is stored "
                "here first; send the id with obj.put_begin, or put through a node in "
                "those regions"))
        if oid is not None:
            up = self._uploads[key]
            self._stamp_after_tombstone(up, oid)
            if up.size > self.cfg.inline_bytes:
                self._start_forwards(up, oid)
        return api.PutBeginReply(upload=key, chunk_bytes=self.cfg.chunk_bytes)

    async def _rpc_put_chunk(self, req: api.PutChunkRequest) -> api.ChunkReply:
        return api.ChunkReply(received=await self._put_chunk(req.upload, req.data))

    async def _put_chunk(self, upload: str, data: bytes) -> int:
        """Take one chunk of ``upload``; the bytes taken so far."""
        key, up = self._upload(upload)
        if len(data) > max(self.cfg.chunk_bytes, self.cfg.inline_bytes):
            self._drop_upload(key, up)
            raise ValueError(f"chunk of {len(data)} bytes is over chunk_bytes={self.cfg.chunk_bytes}")
        if up.received + len(data) > up.size:
            self._drop_upload(key, up)
            raise ValueError(f"more bytes than the declared size {up.size}; upload aborted")
        up.last = time.monotonic()
        await self._settle(key, up)
        if key not in self._uploads:
            raise ValueError(f"unknown or expired upload {key!r}")
        up.pending = asyncio.ensure_future(asyncio.to_thread(up.writer.write, data))
        up.received += len(data)
        if up.forwards:
            await self._feed_forwards(up, data)
        return up.received

    async def _commit(self, key: str, up: _Upload) -> ObjectMeta:
        self._uploads.pop(key, None)
        await self._settle(key, up)
        if up.received != up.size:
            self._abort_upload(up)
            raise ValueError(f"truncated upload: {up.received} of {up.size} bytes; nothing stored")
        assert self.rm is not None
        if up.client:
            self._stamp_after_tombstone(up, up.expected_id or up.writer.peek_id())
        try:
            meta, file_key = await asyncio.to_thread(self._commit_writer, up)
        except StorageError as e:
            raise _storage_error(e) from None
        self._remember_verified(meta.object_id, file_key)
        # A copy committed again while its drop waits in the queue is kept (the manager
        # asks again if it is still not ours to hold).
        self._drops.pop(meta.object_id, None)
        self.rm.object_added(meta.object_id, up.policy, up.hint_for, time.monotonic(),
                             _stamp(meta.written))
        return meta

    async def _rpc_put_end(self, req: api.UploadRequest) -> api.PutReply:
        key, up = self._upload(req.upload)
        # The members commit their copies while we commit ours.
        await self._feed_forwards(up, None)
        try:
            return await self._finish_put(key, up)
        finally:
            if up.req is not None:
                for dst in up.forwards:
                    self._early.pop((up.req, dst), None)

    async def _finish_put(self, key: str, up: _Upload) -> api.PutReply:
        if up.spare:
            return await self._finish_spare(key, up)
        try:
            meta = await self._commit(key, up)
        except BaseException:
            for fwd in up.forwards.values():
                self._stop_forward(fwd)
            raise
        assert self.rm is not None
        req = up.req if up.req is not None else next(self._req_ids)
        fut: asyncio.Future[tuple[str, tuple[str, ...]]] = asyncio.get_running_loop().create_future()
        self._puts[req] = fut
        try:
            self.rm.begin_put(req, meta.object_id, up.policy, up.w, time.monotonic(),
                              _stamp(meta.written))
        except PlacementError as e:
            self._puts.pop(req, None)
            raise ValueError(f"refused: {e}") from None
        self._pump()
        try:
            oid, nodes = await asyncio.wait_for(fut, self.cfg.put_wait_s)
        except TimeoutError:
            self._puts.pop(req, None)
            raise ValueError(f"put of {meta.object_id} timed out waiting for W={up.w}") from None
        return api.PutReply(id=oid, size=meta.size, nodes=list(nodes))

    async def _finish_spare(self, key: str, up: _Upload) -> api.PutReply:
        """A put coordinated outside the object's replica set: the members' copies (sent
        as the bytes arrived) make the quorum, as with any put, while our own copy stays
        an uncommitted spare (no hash, no fsync: a copy we would drop anyway once the
        set confirms it). A push that must fall back to our copy (a member's copy failed,
        a stand-in, a member without an early copy) commits it first, with the full hash
        check against the id; otherwise it is removed once every member's copy settled."""
        assert self.rm is not None and up.req is not None and up.expected_id is not None
        self._uploads.pop(key, None)
        try:
            await self._settle(key, up)
        except BaseException:
            for fwd in up.forwards.values():
                self._stop_forward(fwd)
            raise
        if up.received != up.size:
            self._abort_upload(up)
            raise ValueError(f"truncated upload: {up.received} of {up.size} bytes; nothing stored")
        oid, req = up.expected_id, up.req
        self._stamp_after_tombstone(up, oid)
        self._spares[req] = _Spare(key, up, oid)
        fut: asyncio.Future[tuple[str, tuple[str, ...]]] = asyncio.get_running_loop().create_future()
        self._puts[req] = fut
        try:
            self.rm.begin_put(req, oid, up.policy, up.w, time.monotonic(),
                              _stamp(up.writer.written_ts))
        except PlacementError as e:
            self._puts.pop(req, None)
            self._spares.pop(req, None)
            self._abort_upload(up)
            raise ValueError(f"refused: {e}") from None
        self._count("spare_puts")
        self.agent.spawn(self._settle_spare(req, [f.done for f in up.forwards.values()]))
        self._pump()
        try:
            oid, nodes = await asyncio.wait_for(fut, self.cfg.put_wait_s)
        except TimeoutError:
            self._puts.pop(req, None)
            raise ValueError(f"put of {oid} timed out waiting for W={up.w}") from None
        return api.PutReply(id=oid, size=up.size, nodes=list(nodes))

    async def _commit_spare(self, req: int) -> None:
        """Commit the spare copy of write ``req`` (once; later callers wait for it). A
        copy that does not hash to the id fails the put with that reason."""
        spare = self._spares.get(req)
        if spare is None:
            return
        if spare.commit is None:
            self._count("spare_copies_committed")
            spare.commit = asyncio.ensure_future(self._commit(spare.key, spare.up))
        try:
            await asyncio.shield(spare.commit)
        except ValueError as e:
            fut = self._puts.pop(req, None)
            if fut is not None and not fut.done():
                fut.set_exception(ValueError(f"put of {spare.oid} failed: {e}"))

    async def _settle_spare(self, req: int, copies: list[asyncio.Future[bool]]) -> None:
        """Once every member's early copy is decided: drop the spare if they all made
        it and nothing needed it, else leave it committed (a stray copy, handed off and
        dropped like any other)."""
        results = await asyncio.gather(*(asyncio.shield(c) for c in copies),
                                       return_exceptions=True)
        spare = self._spares.get(req)
        if spare is None:
            return
        if spare.commit is None and (all(r is True for r in results)
                                     or not self._may_hold(spare.up.policy)):
            # Not needed, or not ours to keep: a spare outside the object's residency is
            # never committed, whatever became of the put (a failed put leaves nothing).
            self._spares.pop(req, None)
            self._abort_upload(spare.up)
            self._count("spare_copies_dropped")
            return
        if spare.commit is None:
            await self._commit_spare(req)
        with contextlib.suppress(Exception):
            assert spare.commit is not None
            await spare.commit
        self._spares.pop(req, None)

    def _rpc_put_abort(self, req: api.UploadRequest) -> api.Done:
        up = self._uploads.pop(req.upload, None)
        if up is not None:
            self._abort_upload(up)
        return api.Done()

    async def _rpc_rw_begin(self, req: api.ReplicaHeader) -> api.RwBeginReply:
        assert self.store is not None
        if await asyncio.to_thread(self.store.has, req.id):
            return api.RwBeginReply(have=True)
        return api.RwBeginReply(upload=self._new_upload(self._replica_spec(req), client=False))

    async def _rpc_rw_small(self, req: api.ReplicaSmallRequest) -> api.StoredReply:
        """A whole small replica in one call (bounded by ``inline_bytes``)."""
        data = req.data
        if len(data) > self.cfg.inline_bytes or len(data) != req.size:
            raise ApiError(ErrorCode.INVALID, (
                f"inline object of {len(data)} bytes does not match its size or is over "
                f"inline_bytes={self.cfg.inline_bytes}"))
        assert self.store is not None
        if await asyncio.to_thread(self.store.has, req.id):
            return api.StoredReply(id=req.id)
        key = self._new_upload(self._replica_spec(req), client=False)
        up = self._uploads[key]
        try:
            await asyncio.to_thread(up.writer.write, data)
        except StorageError as e:
            self._uploads.pop(key, None)
            raise _storage_error(e) from None
        up.received = len(data)
        meta = await self._commit(key, up)
        self._count("bytes_received", meta.size)
        self._pump()
        return api.StoredReply(id=meta.object_id)

    async def _rpc_put_small(self, req: api.PutSmallRequest) -> api.PutReply:
        """A client put of a small object in one call: begin, chunk and end at once; the
        copies leave for the replica set while this node commits its own."""
        data = req.data
        if len(data) > self.cfg.inline_bytes:
            raise ApiError(ErrorCode.INVALID, (
                f"inline put of {len(data)} bytes is over inline_bytes={self.cfg.inline_bytes}; "
                "use obj.put_begin"))
        oid = object_id(data)
        # With the id known, a coordinator outside the replica set keeps only a spare
        # (uncommitted) copy, as for a large put, instead of committing a stray copy that
        # it must hand off and drop again.
        key = self._new_upload(self._client_spec(len(data), req.replicas, req.w, req.residency,
                                                 oid, req.ttl_s), client=True)
        up = self._uploads[key]
        self._stamp_after_tombstone(up, oid)
        self._start_small_copies(up, oid, data)
        await self._put_chunk(key, data)
        return await self._rpc_put_end(api.UploadRequest(upload=key))

    async def _rpc_rw_end(self, req: api.UploadRequest) -> api.StoredReply:
        key, up = self._upload(req.upload)
        meta = await self._commit(key, up)
        self._count("bytes_received", meta.size)
        self._pump()
        return api.StoredReply(id=meta.object_id)

    # ------------------------------------------------------------------ reads

    def _commit_writer(self, up: _Upload) -> tuple[ObjectMeta, tuple[int, ...] | None]:
        """Commit (in a thread); with the file's identity when this commit wrote the file
        (its bytes were just hashed), None when the object was already stored."""
        assert self.store is not None
        had = self.store.has(up.expected_id or up.writer.peek_id())
        meta = up.writer.commit(up.expected_id)
        return meta, None if had else self._file_key(meta.object_id)

    def _file_key(self, oid: str) -> tuple[int, ...] | None:
        assert self.store is not None
        try:
            st = os.stat(self.store.object_path(oid))
        except (OSError, StorageError):
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _remember_verified(self, oid: str, key: tuple[int, ...] | None) -> None:
        if key is None or self.cfg.verified_ttl_s <= 0:
            return
        self._verified[oid] = (time.monotonic(), key)
        self._verified.move_to_end(oid)
        while len(self._verified) > self.cfg.verified_cache:
            self._verified.popitem(last=False)

    def _check_local(
        self, oid: str, seen: tuple[float, tuple[int, ...]] | None
    ) -> tuple[ObjectMeta | None, bool, tuple[int, ...] | None]:
        """(meta, hash checked now or recently, file identity when checked now), in one
        thread hop; ``seen`` is the copy's entry in ``_verified``."""
        store = self.store
        assert store is not None
        meta = store.meta(oid)
        if meta is None:
            return None, False, None
        key = self._file_key(oid)
        if (seen is not None and key is not None and seen[1] == key
                and time.monotonic() - seen[0] < self.cfg.verified_ttl_s):
            return meta, True, None  # recently checked, same file: not re-hashed
        return meta, store.verify(oid), key

    async def _local_verified(self, oid: str) -> tuple[ObjectMeta | None, bool]:
        """(meta or None if not held, whether the copy hashes right); a bad copy is
        quarantined."""
        meta, ok, key = await asyncio.to_thread(self._check_local, oid, self._verified.get(oid))
        if meta is None:
            return None, False
        if not ok:
            await self._quarantine(oid)
            return meta, False
        if key is not None:
            self._count("verified_full")
            self._remember_verified(oid, key)
        else:
            self._count("verified_cached")
        return meta, True

    async def local_copy_path(self, oid: str) -> Path | None:
        """A path on this machine holding ``oid``'s bytes, hash-checked (see
        ``_local_verified``) and hard-linked so a drop or delete meanwhile cannot take them
        away; release it with ``release_copy_path``. None when no good local copy exists
        (or the link cannot be made), or the worker user cannot reach the links: read the
        bytes instead."""
        iso = self.agent.isolation
        if self.store is None or (iso is not None and not iso.links_reachable):
            return None
        meta, ok = await self._local_verified(oid)
        if meta is None or not ok:
            return None
        try:
            return await asyncio.to_thread(self.store.link_copy, oid)
        except (StorageError, OSError):
            return None

    def release_copy_paths(self, paths: list[Path]) -> None:
        """Remove links made by ``local_copy_path`` (blocking: call in a thread)."""
        if self.store is not None:
            for path in paths:
                with contextlib.suppress(OSError, ValueError):
                    self.store.release_copy(path)

    def _read_range(self, oid: str, offset: int, length: int) -> bytes:
        assert self.store is not None
        with self.store.open_read(oid) as f:
            f.seek(offset)
            return f.read(length)

    async def _rpc_read_local(self, req: api.ReadRequest) -> api.ReadReply:
        oid, offset = req.id, req.offset
        length = min(req.length, self.cfg.chunk_bytes)
        assert self.store is not None
        if offset == 0:
            meta, ok = await self._local_verified(oid)
            if meta is not None and not ok:
                raise ApiError(ErrorCode.INVALID, f"corrupt copy of {oid} here; try another replica")
        else:
            meta = await asyncio.to_thread(self.store.meta, oid)
        if meta is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown object id {oid}")
        try:
            data = await asyncio.to_thread(self._read_range, oid, offset, length)
        except StorageError as e:
            raise ApiError(ErrorCode.INVALID, f"{e.reason}: {oid}") from None
        return api.ReadReply(data=data, size=meta.size, chunk_bytes=self.cfg.chunk_bytes)

    async def _rpc_read(self, req: api.ReadRequest) -> api.ReadReply:
        oid = req.id
        assert self.store is not None
        if self.rm is not None and self.rm.tombstone(oid) is not None:
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown object id {oid}: it was deleted")
        if await asyncio.to_thread(self.store.has, oid):
            with contextlib.suppress(ValueError):
                return await self._rpc_read_local(req)
        src = self._sources.get(oid)
        if src is not None and not self._live(src):
            # Remembered from before it died (or was cut off): never send a reader there.
            self._sources.pop(oid, None)
            src = None
        if req.redirect:
            redirect = await self._redirect(oid, src)
            if redirect is not None:
                return redirect
        return await self._relay(msgspec.structs.replace(req, redirect=False), src)

    async def _redirect(self, oid: str, src: str | None) -> api.ReadReply | None:
        """One hop: name holders; the client reads from one over its own connection (and
        asks us again, without ``redirect``, if it cannot reach any)."""
        names = [src] if src is not None else [
            h for h in await self._holders(oid) if h != self.agent.name]
        targets = [api.Holder(node=n, addr=a) for n in names[:3]
                   if (a := self._addr(n)) is not None]
        if not targets:
            return None
        self._remember_source(oid, names[0])
        self._count("reads_redirected")
        return api.ReadReply(redirect=targets)

    async def _relay(self, req: api.ReadRequest, src: str | None) -> api.ReadReply:
        """The bytes read from a holder (``src`` first, if known), relayed."""
        oid = req.id
        tried: list[str] = []
        if src is not None:
            try:
                result = await self._call(src, api.READ_LOCAL, req)
                self._count("reads_proxied")
                return result
            except (RpcError, ValueError):
                tried.append(src)
                self._sources.pop(oid, None)
        for holder in await self._holders(oid):
            if holder in tried or holder == self.agent.name:
                continue
            try:
                result = await self._call(holder, api.READ_LOCAL, req)
            except (RpcError, ValueError):
                continue
            self._remember_source(oid, holder)
            self._count("reads_proxied")
            return result
        raise ApiError(ErrorCode.NOT_FOUND, f"unknown object id {oid}: no live node holds a good copy")

    def _may_hold(self, policy: ObjectPolicy) -> bool:
        return may_hold(self.agent.meta.region, policy.residency)

    def _live(self, name: str) -> bool:
        m = self.agent.m.members.get(name)
        return m is not None and m.state <= State.SUSPECT

    def _remember_source(self, oid: str, holder: str) -> None:
        self._sources[oid] = holder
        while len(self._sources) > self.cfg.read_source_cache:
            self._sources.popitem(last=False)

    async def _holders(self, oid: str) -> list[str]:
        """Live nodes that hold ``oid``, replica-set members first."""
        return list(await self._local_stats(oid))

    async def _local_stats(self, oid: str) -> dict[str, api.LocalObject]:
        """Every live node's own copy of ``oid``, by node (those that hold one)."""
        stats = await self._fan_out(api.LOCAL_STAT, api.ObjectIdRequest(id=oid),
                                    self.cfg.stat_timeout_s)
        return {name: st for name, st in stats.items() if st is not None}

    async def _fan_out(self, method: Method[Req, Rep], req: Req,
                       timeout_s: float | None = None) -> dict[str, Rep | None]:
        """``method`` on every live member at once; None where it failed or was silent."""
        names = [c.name for c in self._view()]
        bound = self.agent.peers.cfg.call_timeout_s if timeout_s is None else timeout_s

        async def one(name: str) -> Rep | None:
            try:
                return await asyncio.wait_for(self._call(name, method, req), bound)
            except (RpcError, ValueError, TimeoutError):
                return None

        results = await asyncio.gather(*(one(n) for n in names))
        return dict(zip(names, results, strict=True))

    # ------------------------------------------------------------------ listing

    def _describe(self, meta: ObjectMeta) -> api.ObjectDesc:
        policy = policy_of(meta)
        view = self._view()
        try:
            rs = [c.name for c in replica_set(meta.object_id, view, policy.replicas,
                                              policy.residency)]
        except PlacementError:
            rs = []
        try:
            ws = [c.name for c in write_set(meta.object_id, view, policy.replicas,
                                            policy.residency)]
        except PlacementError:
            ws = []
        return api.ObjectDesc(id=meta.object_id, size=meta.size, replicas=meta.replicas,
                              residency=ResidencyWire.of(policy.residency), replica_set=rs,
                              write_set=ws)

    async def _rpc_local_stat(self, req: api.ObjectIdRequest) -> api.LocalObject | None:
        assert self.store is not None
        meta = await asyncio.to_thread(self.store.meta, req.id)
        if meta is None:
            return None
        return _as(api.LocalObject, self._describe(meta), written=meta.written)

    async def _rpc_local_list(self, req: api.ListRequest) -> list[api.ObjectDesc]:
        assert self.store is not None
        page = await asyncio.to_thread(self.store.list, after=req.after, limit=req.limit)
        return [self._describe(m) for m in page]

    async def _rpc_stat(self, req: api.ObjectIdRequest) -> api.ObjectStat:
        oid = req.id
        held = await self._local_stats(oid)
        if not held:
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown object id {oid}: no live node holds it")
        return _as(api.ObjectStat, next(iter(held.values())), holders=sorted(held))

    async def _rpc_list(self, req: api.ListRequest) -> api.ObjectPage:
        limit = req.limit
        pages = await self._fan_out(api.LOCAL_LIST, api.ListRequest(after=req.after, limit=limit))
        merged: dict[str, api.ListedObject] = {}
        for node, page in pages.items():
            for desc in page or []:
                entry = merged.setdefault(desc.id, _as(api.ListedObject, desc, holders=[]))
                entry.holders.append(node)
        ids = sorted(merged)[:limit]
        out = [_health(merged[oid]) for oid in ids]
        # A node that filled its page may hold more beyond it, even if the merge did not.
        more = len(merged) > limit or any(len(p or []) >= limit for p in pages.values())
        return api.ObjectPage(objects=out, next=ids[-1] if more and ids else None)

    async def _rpc_delete(self, req: api.ObjectIdRequest) -> api.DeleteReply:
        """Delete an object everywhere: drop every copy and leave tombstones (see the module
        docstring). Returns the nodes that held a copy and those told at once; nodes that
        are away now learn it from anti-entropy when they come back."""
        assert self.rm is not None
        oid = req.id
        held = await self._local_stats(oid)
        if not held:
            if self.rm.tombstone(oid) is not None:
                return api.DeleteReply(id=oid, holders=[], already_deleted=True)
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown object id {oid}: no live node holds it")
        desc = next(iter(held.values()))
        policy = _policy(desc.replicas, desc.residency)
        wall = time.time()
        for st in held.values():
            # Stamp the delete after every write of the object we can see.
            stamp = _stamp(st.written)
            if stamp is not None:
                with contextlib.suppress(ClockSkewError, ValueError):
                    self.hlc.update(stamp, wall)
        ts = self.hlc.now(wall)
        rid = next(self._req_ids)
        fut: asyncio.Future[tuple[str, ...]] = asyncio.get_running_loop().create_future()
        self._deletes[rid] = fut
        try:
            notified = self.rm.delete(oid, policy, ts, time.monotonic(), wall, sorted(held),
                                      req_id=rid)
        except ReplicationOverloaded as e:
            self._deletes.pop(rid, None)
            raise ApiError(ErrorCode.BUSY, f"busy: {e}") from None
        self._count("deletes")
        self._pump()
        try:
            kept = await asyncio.wait_for(fut, self.cfg.put_wait_s)
        except TimeoutError:
            self._deletes.pop(rid, None)
            raise ApiError(ErrorCode.UNAVAILABLE, f"delete of {oid} not confirmed in "
                                                  f"{self.cfg.put_wait_s:g} s") from None
        return api.DeleteReply(id=oid, holders=sorted(held), notified=list(notified),
                               ts=ts.encode(), tombstones=list(kept))

    async def _rpc_corrupt_local(self, req: Empty) -> api.CorruptReply:
        """Check every local copy's hash now (an operator's scrub); returns what was bad."""
        store = self.store
        assert store is not None
        bad = []
        for oid in await asyncio.to_thread(lambda: list(store.ids())):
            if not await asyncio.to_thread(store.verify, oid):
                await self._quarantine(oid)
                bad.append(oid)
        return api.CorruptReply(quarantined=bad)

    async def _rpc_stats(self, req: Empty) -> api.DataPlaneStats:
        assert self.store is not None and self.rm is not None
        st = await asyncio.to_thread(self.store.stats)
        return api.DataPlaneStats(
            store=st, dataplane=dict(self.stats), replication=dict(self.rm.stats),
            uploads=len(self._uploads),
            kv_hints={**self.hints.stats, "keys": len(self.hints), "watched": self.hints.watched})

    # ------------------------------------------------------------------ KV

    async def _kv_write(self, key: str, value: bytes | None, consistency: Consistency) -> str:
        ts = self.hlc.now(time.time())
        rec = KVRecord(key, value, ts)
        try:
            where = kv_placement(key, self._view(), self.cfg.kv_replicas, down=self._down_view())
        except PlacementError as e:
            raise ApiError(ErrorCode.REFUSED, f"kv write of {key!r} refused: {e}") from None
        # A delete also goes to full members (it needs no room; it must beat their value).
        coord = KVCoordinator.for_put(rec, where.replicas, consistency,
                                      where.full if value is None else ())
        apply = api.KvApplyRequest(key=key, value=value, ts=ts.encode())

        async def ask(node: str) -> None:
            # A stand-in is told whom it stands in for (``KVHints``).
            targets = where.hint_targets(node)
            req = msgspec.structs.replace(apply, hint_for=list(targets)) if targets else apply
            await self._call(node, api.KV_APPLY, req)
            coord.on_reply(node, None)

        await self._kv_round(coord, ask, reads=False)
        if coord.outcome is None or not coord.outcome.ok:
            reason = coord.outcome.reason if coord.outcome else "no outcome"
            raise ApiError(ErrorCode.UNAVAILABLE, f"kv write of {key!r} failed: {reason}")
        return ts.encode()

    async def _kv_round(self, coord: KVCoordinator, ask: Callable[[str], Awaitable[None]], *,
                        reads: bool) -> None:
        """``ask`` every replica ``coord`` names (``ask`` reports a reply to it); a failure
        or silence is reported here."""
        async def one(name: str) -> None:
            try:
                await asyncio.wait_for(ask(name), self.cfg.kv_timeout_s)
            except (RpcError, ValueError, TimeoutError) as e:
                coord.on_failure(name, str(e) or type(e).__name__)

        calls = [asyncio.ensure_future(one(n)) for n in coord.asked]
        # A write returns once its consistency level is met (W acknowledgements, or a
        # failure that decides it); the other replicas' calls finish in the background,
        # at most KV_STRAGGLERS_MAX of them at a time (beyond that, wait for all as a
        # read does: its read repair needs every reply).
        stragglers = self._kv_stragglers
        early = not reads and len(stragglers) < KV_STRAGGLERS_MAX
        try:
            pending: set[asyncio.Future[None]] = set(calls)
            while pending and (coord.outcome is None or not early):
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            for c in calls:
                c.cancel()
            raise
        for left in pending:
            stragglers.add(left)
            left.add_done_callback(_straggler_done(stragglers))
        if coord.outcome is None:
            coord.expire()

    async def _rpc_kv_put(self, req: api.KvPutRequest) -> api.KvWriteReply:
        key = _kv_key(req.key)
        # Checked here too: an in-process call (``call_local``) skips the struct's bounds.
        if len(req.value) > MAX_KV_VALUE_BYTES:
            raise ApiError(ErrorCode.INVALID, f"a KV value is at most {MAX_KV_VALUE_BYTES} "
                                              f"bytes (MAX_KV_VALUE_BYTES); this one is "
                                              f"{len(req.value)}")
        return api.KvWriteReply(ts=await self._kv_write(key, req.value,
                                                        Consistency(req.consistency)))

    async def _rpc_kv_delete(self, req: api.KvKeyRequest) -> api.KvWriteReply:
        return api.KvWriteReply(ts=await self._kv_write(_kv_key(req.key), None,
                                                        Consistency(req.consistency)))

    async def _rpc_kv_get(self, req: api.KvKeyRequest) -> api.KvValue:
        key = req.key
        try:
            where = kv_placement(key, self._view(), self.cfg.kv_replicas)
        except PlacementError as e:
            raise ApiError(ErrorCode.REFUSED, f"kv read of {key!r} refused: {e}") from None
        coord = KVCoordinator.for_get(key, where.replicas, Consistency(req.consistency),
                                      where.full)
        read = api.KvReadRequest(key=key)

        async def ask(node: str) -> None:
            got = await self._call(node, api.KV_READ, read)
            rec = None if got is None else KVRecord(key, got.value, HLCTimestamp.decode(got.ts))
            if rec is not None:
                with contextlib.suppress(ClockSkewError, ValueError):
                    self.hlc.update(rec.ts, time.time())
            coord.on_reply(node, rec)

        await self._kv_round(coord, ask, reads=True)
        if coord.outcome is None or not coord.outcome.ok:
            reason = coord.outcome.reason if coord.outcome else "no outcome"
            raise ApiError(ErrorCode.UNAVAILABLE, f"kv read of {key!r} failed: {reason}")
        for node, rec in coord.read_repair():
            self._count("kv_read_repairs")
            self.agent.spawn(self._call(node, api.KV_APPLY, api.KvApplyRequest(
                key=rec.key, value=rec.value, ts=rec.ts.encode())))
        best = coord.winner()
        if best is None:
            return api.KvValue()
        return api.KvValue(value=best.value, ts=best.ts.encode())

    async def _rpc_kv_apply(self, req: api.KvApplyRequest) -> api.KvApplyReply:
        """Take one replica's part of a KV write (a coordinator's, a read repair or a
        hand-off), with the hints ``KVHints.plan`` asks for stored in the same transaction
        (``hint_for``: the replicas the coordinator says this node stands in for)."""
        assert self.store is not None
        key, ts = req.key, req.ts
        try:
            stamp = HLCTimestamp.decode(ts)
        except ValueError as e:
            raise ApiError(ErrorCode.INVALID, f"bad timestamp {ts!r:.80}: {e}") from None
        with contextlib.suppress(ClockSkewError, ValueError):
            self.hlc.update(stamp, time.time())
        now = time.time()
        targets = self.hints.plan(key, req.hint_for, now)
        if targets is None:
            raise ApiError(ErrorCode.BUSY, f"hints_full: this node holds hints for "
                                           f"{self.cfg.kv_hints.max_hints} keys (max_hints)")
        try:
            applied = await asyncio.to_thread(self.store.kv_put, key, req.value, ts, targets, now)
        except StorageError as e:
            raise _storage_error(e) from None
        if targets:
            self.hints.add(key, stamp, targets, now)
            self._hints_wake.set()
        return api.KvApplyReply(applied=applied)

    # ------------------------------------------------------------------ KV hinted handoff

    async def _hand_off_loop(self) -> None:
        """Hand hints to their replicas when ``KVHints`` says so: at its deadline, after a
        view change, after a new hint."""
        while True:
            deadline = self.hints.next_deadline()
            delay = 60.0 if deadline is None else min(60.0, max(0.0, deadline - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hints_wake.wait(), delay + 0.001)
            self._hints_wake.clear()
            now = time.time()
            expired = self.hints.stats.get("expired", 0)
            self.hints.expire(now)
            if self.hints.stats.get("expired", 0) > expired:
                self.agent.log("warning", "kv_hints_expired",
                               count=self.hints.stats["expired"] - expired,
                               max_hint_age_s=self.cfg.kv_hints.max_hint_age_s)
            for send in self.hints.due(now):
                self.agent.spawn(self._hand_off(send))
            await self._persist_hints()

    async def _hand_off(self, send: HintSend) -> None:
        """Send this node's record of ``send.key`` to ``send.target`` with its own
        timestamp; report the answer to ``KVHints``."""
        assert self.store is not None
        try:
            got = await asyncio.to_thread(self.store.kv_get, send.key)
            stamp = None if got is None else _stamp(got[1])
            if got is None or stamp is None or stamp < send.ts:
                self.hints.abandon(send.key, send.target)
                self.agent.log("warning", "kv_hint_abandoned", key=send.key[:200],
                               peer=send.target)
                return
            try:
                await asyncio.wait_for(self._call(send.target, api.KV_APPLY, api.KvApplyRequest(
                    key=send.key, value=got[0], ts=got[1])), self.cfg.kv_timeout_s)
            except (RpcError, ValueError, TimeoutError, OSError) as e:
                self.hints.failed(send.key, send.target, time.time())
                self.agent.log("debug", "kv_hand_off_failed", key=send.key[:200],
                               peer=send.target, error=str(e)[:200])
                return
            self.hints.handed_off(send.key, send.target, stamp)
        finally:
            await self._persist_hints()
            self._hints_wake.set()

    async def _persist_hints(self) -> None:
        """Write what ``KVHints`` changed (``drain``) to the store, in order."""
        changes = self.hints.drain()
        if not changes or self.store is None:
            return
        stored = [(c.key, c.target, c.ts.encode(), c.since) for c in changes
                  if isinstance(c, HintStored)]
        deleted = [(c.key, c.target, c.upto.encode()) for c in changes
                   if isinstance(c, HintDeleted)]
        async with self._hints_lock:
            try:
                await asyncio.to_thread(self.store.kv_hints_apply, stored, deleted)
            except StorageError as e:
                # The book in memory still has them; a restart before the next change
                # reloads the older state (a hint handed off twice, or kept longer).
                self._count("kv_hint_persist_failed")
                self.agent.log("warning", "kv_hint_persist_failed", error=str(e)[:200])

    async def _rpc_kv_read(self, req: api.KvReadRequest) -> api.KvRecordWire | None:
        assert self.store is not None
        got = await asyncio.to_thread(self.store.kv_get, req.key)
        if got is None:
            return None
        value, ts = got
        return api.KvRecordWire(value=value, ts=ts)

    # ------------------------------------------------------------------ full disk

    async def _check_disk(self) -> None:
        """Advertise the disk full, or not full, when that changed (``disk_full``)."""
        store = self.store
        if store is None:
            return
        try:
            free, reserve = await asyncio.to_thread(store.disk_space)
        except OSError:
            return
        was = is_full(self.agent.meta.tags)
        # A write refused since the last check makes it full even above its reserve.
        full = disk_full(free, reserve, self.cfg.disk_room_margin_bytes, was,
                         store.take_refused_bytes())
        if full == was:
            return
        self._count("disk_full_flips")
        self.agent.log("warning" if full else "info", "disk_full" if full else "disk_room",
                       free_bytes=free, reserve_bytes=reserve,
                       room_at_bytes=reserve + self.cfg.disk_room_margin_bytes)
        self.agent.set_tag(FULL_TAG, "1" if full else None)

    async def _watch_disk(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.disk_check_interval_s)
            await self._check_disk()

    # ------------------------------------------------------------------ housekeeping

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.gc_interval_s)
            self._expire_uploads()
            store = self.store
            if store is None or self.rm is None:
                continue
            for oid in await asyncio.to_thread(store.expired, time.time()):
                with contextlib.suppress(StorageError):
                    await asyncio.to_thread(store.delete, oid)
                self._verified.pop(oid, None)
                self.rm.object_removed(oid, time.monotonic())
                self._count("gc_expired")
            self.rm.collect_tombstones(time.time(), time.monotonic())
            self._pump()
