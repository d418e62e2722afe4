"""The data plane's shared state and configuration (``DataPlaneConfig``), and the
small helpers every room of it uses: the live view as placement candidates, member
addresses, typed calls to members over the node's peer pool (lane ``data``)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from meshscale.core.api import ApiError, ErrorCode, Method, ResidencyWire
from meshscale.core.api import objects as api
from meshscale.core.hlc import HLCTimestamp, HybridLogicalClock
from meshscale.core.kv import KVHintConfig, KVHints, KVPlacement, KVPlacer
from meshscale.core.membership import State
from meshscale.core.placement import Candidate, Residency, is_full, may_hold
from meshscale.core.policy import ClassPolicy, kv_residency
from meshscale.core.puts import PutPlan
from meshscale.core.replication import (
    ObjectPolicy,
    ReplicaManager,
    ReplicationConfig,
    ReplicationOutput,
)
from meshscale.runtime import caller
from meshscale.runtime.deadline import DeadlineTimer
from meshscale.runtime.local import call_node
from meshscale.runtime.services import NodeServices, Rep, Req, refusal
from meshscale.runtime.storage import (
    LocalStore,
    ObjectMeta,
    ObjectWriter,
    StorageConfig,
    StorageError,
)
from meshscale.transport.rpc import RpcConnection, RpcError
from meshscale.trust.certs import Role

LANE = "data"
"""The data plane's lane of the node's peer pool (``transport/peers.py``)."""


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
    audit_range_read_s: float = 60.0
    """A read that starts past offset 0 (a range: a parquet footer, one column) is audited
    once per caller and object in this many seconds; a read from offset 0 always is."""
    max_range_reads_tracked: int = 4096
    """(caller, object) pairs remembered for ``audit_range_read_s``."""
    verified_ttl_s: float = 60.0
    """A read from offset 0 re-hashes the whole local copy before serving it, unless that
    copy was hash-checked (when it was committed or by an earlier read) less than this long
    ago and its file's inode, size, mtime and ctime are unchanged since (but for the
    ctime this node's own links of the copy for tasks' workers change). So a byte flipped
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
    policy_refresh_s: float = 5.0
    """How often the cached data-class policies are read again from the KV (and how long
    a class read on a miss is trusted before the next request naming it reads it again)."""
    max_policies: int = 256
    """Data classes with a policy, in the mesh and in a node's cache."""
    policy_scan_max_objects: int = 100_000
    """Copies a policy change looks through on each member for those the new rule would
    break; a member holding more refuses the change (it cannot check it)."""
    migrate_wait_s: float = 60.0
    """How long ``policy.set`` with ``migrate`` waits for re-replication to move the copies
    the new rule breaks before it answers (naming those still outside)."""
    erase_max_objects: int = 5_000
    """Objects one erase may select (``erase.run``); more is refused as given (narrow it
    with a key prefix, or name ids in batches). The signed receipt travels in one RPC
    reply (``transport.framing.MAX_FRAME``, 4 MiB; a receipt costs about 600 bytes per
    object with 3 copies)."""
    erase_scan_max_copies: int = 200_000
    """Copies an erase lists per member to find what it selects; a member holding more
    refuses the erase (it cannot be sure to have seen every copy)."""
    erase_parallel: int = 8
    """Deletes (and holder confirmations) an erase runs at once."""
    erase_confirm_wait_s: float = 30.0
    """How long a holder waits for its copies of an erase to be gone before it answers
    ``erase.confirm`` naming those still held."""
    storage: StorageConfig = field(default_factory=lambda: StorageConfig(min_free_bytes=64 << 20))
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)


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
    plan: PutPlan | None = None
    """A client put's plan (``ReplicaManager.plan_put``), made once its id is known: at
    ``obj.put_begin`` when the client sends it ahead (or for ``obj.put_small``), else by
    ``begin_put`` at the end."""

    @property
    def spare(self) -> bool:
        """This node is outside the object's replica set (its copies started early): its
        own copy is a spare, written but neither hashed nor fsynced, committed only if a
        member's copy fails (the push from it needs it) and otherwise dropped (see
        ``_finish_spare`` and ``core.puts``)."""
        return self.plan is not None and self.plan.spare


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
class _Spare:
    """A spare copy (see ``_Upload.spare``) waiting for the members' copies to settle."""

    key: str
    up: _Upload
    plan: PutPlan
    commit: asyncio.Future[ObjectMeta] | None = None

    @property
    def oid(self) -> str:
        return self.plan.oid


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


def _small_copy(header: api.ReplicaHeader, data: bytes) -> api.ReplicaSmallRequest:
    """A whole copy in one call: ``header`` and the bytes."""
    return api.ReplicaSmallRequest(**msgspec.structs.asdict(header), data=data)


class DataPlaneBase:
    """What every room of the data plane shares: the node, the store, the replica
    manager, the clock, counters, the view and calls to other members."""

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
        self._held: list[ReplicationOutput] = []
        """Replica manager outputs drained early (``_hold_outputs``), carried out first by
        the next ``_pump``."""
        self._unlisted = 0
        """``UnderReplicated`` events ``_hold_outputs`` counted instead of holding."""
        self.policies: dict[str, ClassPolicy] = {}
        """Data-class policies this node knows (``runtime/data/policy.py`` keeps it)."""
        self.hints = KVHints(agent.name, self.cfg.kv_hints, replicas=self.cfg.kv_replicas,
                             started=time.time(),
                             residency=lambda key: kv_residency(key, self.policies))
        self._kv_placer: KVPlacer | None = None
        """KV placement under the current view (``kv_where``); dropped at every view
        change (``VIEW_CHANGES``, which also covers a member's full flag)."""
        self._hints_wake = asyncio.Event()
        self._hints_lock = asyncio.Lock()  # hint changes reach the store in order
        self._sources: OrderedDict[str, str] = OrderedDict()
        self._read_classes: OrderedDict[str, str | None] = OrderedDict()
        """oid -> its data class, for reads of objects not held here (bounded as
        ``read_source_cache``)."""
        self._range_reads: OrderedDict[tuple[str, str], float] = OrderedDict()
        """(caller, object) -> when a read of it was last audited (``audit_range_read_s``)."""
        self._verified: OrderedDict[str, tuple[float, tuple[int, ...]]] = OrderedDict()
        """oid -> (when its local copy was last hash-checked, its file's identity then)."""
        self._linked: OrderedDict[Path, str] = OrderedDict()
        """Link lent to a task's worker -> its object (``local_copy_path``), until released;
        bounded as ``verified_cache`` (a link never released is only forgotten here)."""
        self._transfer_sem = asyncio.Semaphore(self.cfg.max_transfers)
        self._copy_slots: dict[str, asyncio.Semaphore] = {}
        """Member -> small copies to it in flight, at most the peer pool's
        ``max_idle_per_peer`` (``_copy_slot``)."""
        self._tomb_lock = asyncio.Lock()  # tombstone writes reach the store in order
        self._drops: dict[str, None] = {}
        """Copies to drop, in order; one task removes them in batches (``_drain_drops``)."""
        self._dropping = False
        self._timer = DeadlineTimer(self._on_timer)
        self.stats: dict[str, int] = {}
        self._policy_ts: dict[str, str] = {}
        """class -> the HLC time of the cached policy's write."""
        self._policy_read_at: dict[str, float] = {}
        """class -> when its policy was last read from the KV (monotonic), found or not."""
        self._migrate_lock = asyncio.Lock()
        """One rewrite of this node's copy rules at a time (``policy.py``)."""
        self.policy_listeners: list[Callable[[str], None]] = []
        """Called with a class's name when this node's cache sees its policy's regions,
        stream regions or cross-region reads change (or first read it): the stream plane's
        shards, operators and subscribers' mirrors follow it."""

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

    def _kv_where(self, key: str, rule: Residency | None) -> KVPlacement:
        """``core.kv.kv_placement`` of ``key`` over the live and the down members, with
        the view's placement built once per view rather than once per KV operation."""
        placer = self._kv_placer
        if placer is None:
            placer = self._kv_placer = KVPlacer(self._view(), self.cfg.kv_replicas,
                                                self._down_view())
        return placer.place(key, rule)

    def _addr(self, name: str) -> str | None:
        m = self.agent.m.members.get(name)
        return None if m is None else m.addr

    def _region_of(self, name: str) -> str:
        """A member's region as this node sees it ("" if unknown)."""
        m = self.agent.m.members.get(name)
        return "" if m is None else m.meta.region

    def _caller_region(self) -> str | None:
        """The region of the node that made the RPC being served (None: a client, or no
        RPC: the audit trail then records this node's region)."""
        who = caller.current.get()
        if who is None or who.role is not Role.NODE:
            return None
        return self._region_of(who.name)

    def _live(self, name: str) -> bool:
        m = self.agent.m.members.get(name)
        return m is not None and m.state <= State.SUSPECT

    def _may_hold(self, policy: ObjectPolicy) -> bool:
        return may_hold(self.agent.meta.region, policy.residency)

    async def _call(self, name: str, method: Method[Req, Rep], req: Req) -> Rep:
        """Typed ``method`` on member ``name`` (in-process when it is this node)."""
        return await call_node(self.agent, name, method, req, lane=LANE)

    def _copy_slot(self, name: str) -> asyncio.Semaphore:
        """What a small copy to member ``name`` holds while it runs: no more of them go at
        once than the pool keeps idle connections to a member, so each finds or leaves
        one there. Unbounded, every copy beyond those in flight paid a TLS handshake and
        its connection was closed after one call (issue #24: ~4,200 handshakes per node
        for 10,000 small puts, and a heap ~13 KB per object held larger). One per
        member ever copied to, as the pool's own entries."""
        sem = self._copy_slots.get(name)
        if sem is None:
            sem = self._copy_slots[name] = asyncio.Semaphore(
                self.agent.peers.cfg.max_idle_per_peer)
        return sem

    def _checkout(self, name: str) -> RpcConnection:
        """A pooled connection to ``name`` for one transfer alone (``peers.checkout``)."""
        addr = self._addr(name)
        if addr is None:
            raise RpcError(f"{name}: not a member")
        return self.agent.peers.checkout(name, addr)

    # -- refusals

    def _refuse(self, rule: str, message: str, /, *, subject: str = "",
                data_class: str | None = None, **fields: Any) -> ApiError:
        """This plane's refusals (``runtime.services.refusal``)."""
        return refusal(self.agent, self._count, rule, message, subject=subject,
                       data_class=data_class, from_region=self._caller_region(), **fields)

    # -- provided by the other rooms (``plane.py`` puts them together)

    def _pump(self) -> None:
        raise NotImplementedError  # repair.py

    def _on_timer(self) -> None:
        raise NotImplementedError  # repair.py

    async def _quarantine(self, oid: str) -> None:
        raise NotImplementedError  # repair.py

    async def _drop(self, oid: str) -> None:
        raise NotImplementedError  # repair.py

    async def _commit_spare(self, req: int) -> None:
        raise NotImplementedError  # uploads.py

    def _expire_uploads(self) -> None:
        raise NotImplementedError  # uploads.py

    def _abort_upload(self, up: _Upload) -> None:
        raise NotImplementedError  # uploads.py

    def _remember_verified(self, oid: str, key: tuple[int, ...] | None) -> None:
        raise NotImplementedError  # reads.py

    def _file_key(self, oid: str) -> tuple[int, ...] | None:
        raise NotImplementedError  # reads.py

    async def _holders(self, oid: str) -> list[str]:
        raise NotImplementedError  # catalog.py

    async def _local_stats(self, oid: str) -> dict[str, api.LocalObject]:
        raise NotImplementedError  # catalog.py

    async def _policies_for(self, names: Iterable[str | None]) -> Mapping[str, ClassPolicy]:
        raise NotImplementedError  # policy.py
    async def _policy_fetch(self, name: str) -> tuple[ClassPolicy | None, str | None]:
        raise NotImplementedError  # policy.py
    async def _fan_out(self, method: Method[Req, Rep], req: Req,
                       timeout_s: float | None = None) -> dict[str, Rep | None]:
        raise NotImplementedError  # catalog.py
