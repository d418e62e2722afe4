"""Replication of immutable objects: quorum writes, hinted handoff, repair and handoff.

After DeCandia et al., "Dynamo: Amazon's Highly Available Key-value Store", SOSP 2007.
One ``ReplicaManager`` per node decides; its driver moves bytes and keeps the store. A
write goes to the object's replica set (``placement.replica_set`` over the live view);
a target that fails is stood in for by the next allowed node in rendezvous order, which
keeps a *hinted* copy (Dynamo's sloppy quorum); the write is acknowledged once W distinct
durable copies exist, hinted ones included. Departures from Dynamo, and why:

- Residency before availability. A stand-in is only ever chosen among nodes whose region
  the object's residency rule allows; when no such node is left the write fails with a
  reason, it is never placed elsewhere. Every ``Transfer`` asserts it.
- One mechanism for anti-entropy, re-replication and hinted handoff. Objects are
  immutable, so there are no versions to reconcile, only copies to count. Each node,
  periodically and promptly after a view change, tells every peer p what it believes
  both of them should hold: a ``Digest`` (count and XOR of per-id hashes) of the local ids
  whose replica set, under the *current* view, contains both nodes. p compares it with
  its own side; on a mismatch the ids follow in bounded pages (``Offer``), p answers which
  it lacks (``OfferReply.missing``) and the sender queues a ``Transfer`` for each. A copy
  held by a node outside the replica set (a hint, or a copy left behind by a view change)
  is offered to the set every round and dropped (``DropLocal``) once every member of the
  current set has confirmed holding it. This replaces Dynamo's Merkle trees per key range
  (we have no ranges: placement is rendezvous hashing) with one digest per node pair, and
  Dynamo's separate hint store with the inventory itself: a hint is just a copy whose
  holder is not in the set.
- An idle round costs O(peers), not O(objects) (Dynamo's Merkle roots have the same aim).
  XOR is its own inverse, so the pair digests are kept, not computed: every entry (copy
  or tombstone) remembers the peers whose digest it is in (its hash, of its id or of its
  tombstone, is computed again when needed), and any change to it (added, removed,
  deleted, dropping, a peer declining it for want of room) takes its old share out of
  each peer's count and accumulator and puts the new one in. Only a view change
  recomputes them, for the entries whose replica set it moves (one pass over the
  inventory; by property 1 of ``core.placement`` an entry whose set holds no departed
  node and gains no new one keeps it, order included, without being placed again, and
  every set is placed with one ``Placer`` per view). That pass is done in slices of
  ``rebuild_slice_entries`` per call (``set_view``, then ``on_timer``), so a node holding
  a million objects does not stall its driver's loop for seconds at every membership
  change (issue #24); until the last slice no digest round starts and no digest received
  is answered (a half-rebuilt side compares as nothing), while every other path reads an
  entry's sets under the current view and keeps the digests exact. Entries to offer
  beyond the digests (held outside the replica set, or declined by a full member) are kept in a small
  *handoff set*, so a round finds them without walking the inventory. A digest match
  confirms the whole pair set without touching it: the manager notes (peer, time, change
  epoch at the round's start: it advances as each round starts), and an entry unchanged since then counts as confirmed
  by that peer at that time, written into the entry when it is next read or changed
  (``_settle``); a view change's rebuild writes them into each entry before it moves
  (entries share equal confirmations).
  Only a mismatch lists the ids (``Offer`` pages, the pair set as it is when the
  mismatch is answered). ``ReplicationConfig.self_check`` (on in the simulator's swarms
  and the core tests, off in the runtime) recomputes everything before each round and
  raises ``DigestDrift`` on any difference.
- Confirmations that allow a drop are *keep* confirmations: the peer holds the object and
  considers itself in the replica set under its own view. A peer that holds it but thinks
  it is not responsible answers ``not_mine``, so two nodes with different views cannot
  each drop their copy counting on the other. Confirmations are forgotten when the peer
  leaves the view and only count when newer than our last view change.
- Full nodes (etcd's space quota; see ``core/placement.py``). A node whose disk is full
  stays in its objects' replica sets (its copies are kept, read and counted, never moved
  off), but new copies go only to the *write set*, the replica set over the nodes with
  room: a put's targets and stand-ins, and every repair transfer, skip nodes the view
  marks full. A full member offered a copy it lacks answers ``OfferReply.no_room``; the
  holders then leave that copy out of their digests with it (so the pair stops
  mismatching) and offer it to the node that replaced the full one in the write set (a
  *stand-in*), whose copy is kept, like a hinted one, until every member of the replica
  set confirms holding it. Nothing is copied elsewhere just because a node filled: only
  copies a full node says it lacks. When it has room again it is offered them, takes
  them, and the stand-ins drop theirs.
- Reads are the driver's job: ``read_sources`` names where to read, in replica-set order,
  known holders first and this node first if it holds a copy. Read repair: the driver
  verifies the content hash of what it read; a corrupt *local* copy is deleted and
  reported with ``object_removed``, and anti-entropy refills it from a peer. No read
  quorum is needed because objects are immutable and content-addressed: any copy that
  hashes right is the object.
- Garbage collection (pins, TTL) is the store's business; the manager only needs to be
  told with ``object_removed``.
- Explicit deletes leave tombstones (Dynamo has none: its objects are versioned; this is
  Cassandra's design). ``delete`` stamps a tombstone with an HLC timestamp; every copy
  carries the HLC timestamp of the write that made it (``written``), and a copy written
  before a live tombstone is dead wherever it turns up: the tombstone travels through the
  same digests and offers as copies (a tombstone and a copy of one id hash differently, so
  a node that comes back with a deleted copy mismatches, offers it, and is answered
  ``deleted``), a receiver never accepts an older copy (``accepts``), and a copy written
  *after* the tombstone (the same bytes put again) supersedes it. Tombstones are kept by
  the replica set and handed off like copies, except that a holder outside the set keeps
  its tombstone while the set is short of the policy's replicas (its members are then
  all that would keep the delete, and losing them would let a returning copy live
  again), and that a holder keeps a tombstone whose rule changed while it held it (a
  class policy migration, ``migrate_tombstones``, or a rule narrowed on receipt): a copy
  on a node that missed the change is still placed by the old rule, among the old
  holders, which must still know of the delete; they expire ``tombstone_grace_s`` after their timestamp
  (``collect_tombstones``): a node that was away longer than that and comes back with a
  deleted copy can resurrect it, exactly as with Cassandra's gc_grace_seconds.

Sans-I/O (see ``core/outputs.py``): inputs carry ``now``, outputs are collected with
``drain()``, time moves through ``next_deadline()`` / ``on_timer(now)``, randomness comes
only from the ``random.Random`` given. Messages between managers are ``SendMessage``
outputs (deliver reliably, e.g. over a stream; losing one is tolerated) and arrive with
``handle_message``. Every queue is bounded by ``ReplicationConfig``.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, TypeVar, cast

import msgspec

from meshscale.core.hlc import HLCTimestamp
from meshscale.core.objects import OBJECT_ID_PREFIX, is_object_id
from meshscale.core.outputs import Event
from meshscale.core.pacing import ByteRate
from meshscale.core.placement import (
    MAX_REPLICAS,
    Candidate,
    ObjectPolicy,
    PlacementError,
    Placer,
    Residency,
    hrw_score,
    replica_set,
)
from meshscale.core.policy import ClassPolicy, migrated_regions, stored_rule
from meshscale.core.puts import PutPlan, check_feasible, plan_put
from meshscale.core.wire import VersionedCodec, WireError

__all__ = [
    "REPLICATION_PROTOCOL_VERSION",
    "DigestDrift",
    "DigestMsg",
    "DigestReply",
    "DropLocal",
    "ObjRef",
    "ObjectPolicy",
    "Offer",
    "OfferReply",
    "PutAcked",
    "PutFailed",
    "ReplicaManager",
    "ReplicationConfig",
    "ReplicationOutput",
    "ReplicationOverloaded",
    "SendMessage",
    "TombstoneDropped",
    "TombstoneStored",
    "Tombstones",
    "Transfer",
    "UnderReplicated",
    "decode_message",
    "encode_message",
]

REPLICATION_PROTOCOL_VERSION = 1


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ReplicationConfig:
    """Every knob and bound of the replication layer; durations in seconds."""

    sync_interval_s: float = 10.0
    """Period of the digest exchange with every peer (jittered +-20%)."""
    view_change_delay_s: float = 0.5
    """After a view change, wait this long (to batch a burst of changes) and then sync
    with every peer at once instead of waiting for the next period."""
    put_timeout_s: float = 10.0
    """A write not acknowledged by then fails."""
    delete_timeout_s: float = 10.0
    """A delete whose tombstone is not durable on a quorum by then is reported
    unconfirmed (the tombstones already written still spread)."""
    max_pending_puts: int = 1024
    """Writes in flight that this node coordinates; more are refused."""
    max_stand_ins: int = 8
    """Per write: how many stand-in (hinted) nodes may be tried after failures."""
    max_concurrent_transfers: int = 8
    """Repair and handoff transfers in flight from this node (writes not counted: they
    are bounded by ``max_pending_puts``)."""
    max_concurrent_transfers_busy: int = 1
    """Repair and handoff transfers in flight from this node while it is busy with
    foreground work (``ReplicaManager.set_foreground_busy``: tasks running on its
    workers) and for ``foreground_quiet_s`` after. A crash's re-replication then does
    not take the cores the remaining tasks need (Ceph's recovery limits: a busy OSD runs
    fewer recovery ops at once, ``osd_recovery_max_active``, and sleeps between them,
    ``osd_recovery_sleep``). The repair still goes on, one object at a time, at
    ``repair_busy_bytes_per_s``."""
    repair_busy_bytes_per_s: int = 16 << 20
    """Bytes of repair and handoff copies this node sends per second while busy (as
    above); 0 sends them unpaced. Idle, a node sends them as fast as the transfers go."""
    repair_burst_bytes: int = 4 << 20
    """What a busy node's repair copies may send at once before the rate above applies
    (one data-plane chunk)."""
    foreground_quiet_s: float = 2.0
    """How long after its last foreground work a node stays busy for the limits above:
    tasks come and go between slots, and a limit lifted in each gap would start every
    queued transfer at once."""
    max_repair_queue: int = 10_000
    """Queued repair transfers; beyond it the lowest-priority are shed (the next sync
    round finds them again)."""
    transfer_timeout_s: float = 120.0
    """A repair transfer the driver never reported is forgotten after this long."""
    page_size: int = 256
    """Object references per ``Offer`` page."""
    max_ids_per_round: int = 4096
    """Object references offered to one peer per round; the rest wait for the next."""
    max_peers_per_round: int = 256
    """Peers synced per periodic round (rotating), bounding a round's messages."""
    max_message_bytes: int = 1 << 20
    """Largest replication message accepted."""
    tombstone_grace_s: float = 7 * 86400.0
    """A tombstone is forgotten this long after its timestamp (wall clock). It must be
    longer than any node stays away and then comes back with its disk: a copy that
    returns after its tombstone expired is a live object again."""
    max_tombstones: int = 1_000_000
    """Live tombstones kept; a delete beyond it is refused (``ReplicationOverloaded``)
    and a tombstone received beyond it still kills older copies but is not kept."""
    rebuild_slice_entries: int = 2_000
    """Inventory entries a view change re-places and re-indexes per call on the driver's
    loop: ``set_view`` does the first slice, each ``on_timer`` the next (``next_deadline``
    asks for it), and anti-entropy rounds wait until the last one. An inventory this small
    or smaller is rebuilt in ``set_view`` itself."""
    rebuild_slice_pause_s: float = 0.0
    """Time between two slices of a view change's rebuild (0: the next one is due at
    once; the driver's loop still runs whatever is ready in between)."""
    self_check: bool = False
    """Before every sync round, recompute the pair digests and the handoff set from the
    whole inventory and raise ``DigestDrift`` if the incrementally kept ones differ.
    O(objects) per round (and after every view change's rebuild): for the simulator's
    swarms and tests, off in the runtime."""

    def __post_init__(self) -> None:
        if self.rebuild_slice_entries < 1:
            raise ValueError("rebuild_slice_entries must be at least 1")
        if self.rebuild_slice_pause_s < 0:
            raise ValueError("rebuild_slice_pause_s must not be negative")
        if self.max_concurrent_transfers < 1 or self.max_concurrent_transfers_busy < 1:
            raise ValueError("max_concurrent_transfers and max_concurrent_transfers_busy "
                             "must be at least 1")
        if self.repair_busy_bytes_per_s < 0 or self.repair_burst_bytes < 1:
            raise ValueError("repair_busy_bytes_per_s must not be negative and "
                             "repair_burst_bytes must be at least 1")
        if not self.foreground_quiet_s >= 0:
            raise ValueError("foreground_quiet_s must not be negative")


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Deliver ``payload`` to the ``ReplicaManager`` of ``dst`` (its ``handle_message``).
    One-way; a lost message costs a round, never correctness."""

    dst: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Transfer(Event):
    """Copy object ``oid`` to ``dst`` (which may be this node: store it locally), then
    report ``transfer_done(req_id, dst, oid, ok, now)``. The receiving driver commits it
    durably and reports ``object_added(oid, policy, hint_for, now)`` to its own manager.
    ``req_id`` is the write's id, or ``None`` for repair and handoff."""

    dst: str
    oid: str
    req_id: int | None
    policy: ObjectPolicy
    hint_for: str | None = None
    written: HLCTimestamp | None = None
    """When the write that made the copy happened (carried with the bytes)."""


@dataclass(frozen=True, slots=True)
class TombstoneStored(Event):
    """Keep (durably) a tombstone for ``oid``: restore it after a restart with
    ``tombstone_loaded``, or a deleted copy elsewhere can come back."""

    oid: str
    policy: ObjectPolicy
    ts: HLCTimestamp
    moved: bool = False
    """Kept here as a moved tombstone (``_Local.moved``): restore it as one, or after a
    restart it is forgotten once handed off, and a copy its old replica set missed can
    spread again."""


@dataclass(frozen=True, slots=True)
class TombstoneDropped(Event):
    """Forget the stored tombstone of ``oid`` (expired, handed off, or superseded by a
    newer write)."""

    oid: str


@dataclass(frozen=True, slots=True)
class DropLocal(Event):
    """Delete the local copy of ``oid`` (every member of its replica set has it), then
    report ``object_removed``."""

    oid: str


@dataclass(frozen=True, slots=True)
class PutAcked(Event):
    req_id: int
    oid: str
    nodes: tuple[str, ...]
    """The nodes holding a durable copy when the quorum was reached."""


@dataclass(frozen=True, slots=True)
class PutFailed(Event):
    req_id: int
    oid: str
    reason: str


@dataclass(frozen=True, slots=True)
class DeleteAcked(Event):
    """A delete's tombstone is durable on a quorum (``nodes``): acknowledged."""

    req_id: int
    oid: str
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeleteFailed(Event):
    """A delete not confirmed in time: fewer than its quorum keep the tombstone (those
    that do still spread it)."""

    req_id: int
    oid: str
    reason: str


def delete_quorum(policy: ObjectPolicy) -> int:
    """Durable tombstones a delete needs before it is acknowledged: a majority of the
    replication factor, so no single failure can lose an acknowledged delete (a delete
    kept only by its coordinator used to come back when that node died)."""
    return policy.replicas // 2 + 1


@dataclass(frozen=True, slots=True)
class UnderReplicated(Event):
    """After a view change, a locally held object has fewer allowed live nodes than its
    policy wants (reported by every holder, once per change of state)."""

    oid: str
    live_replicas: int
    wanted: int


ReplicationOutput = SendMessage | Event


class ReplicationOverloaded(RuntimeError):
    """A bound was hit (``max_pending_puts``); the request is refused, nothing was done."""


class DigestDrift(AssertionError):
    """``ReplicationConfig.self_check``: an incrementally kept pair digest or the handoff
    set differs from a full recomputation (a bug: some change of an object's state did
    not update them)."""


# --------------------------------------------------------------------------- wire

Oid = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Region = Annotated[str, msgspec.Meta(max_length=128)]
Round = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Stamp = Annotated[str, msgspec.Meta(max_length=320)]
ZERO_TS = HLCTimestamp(0, 0, "")
"""The ``written`` of a copy whose write time is unknown: older than any tombstone."""


class ObjRef(msgspec.Struct, frozen=True, array_like=True):
    """An object id with the policy a peer needs to decide whether it should hold it."""

    oid: Oid
    replicas: Annotated[int, msgspec.Meta(ge=1, le=MAX_REPLICAS)]
    regions: Annotated[list[Region], msgspec.Meta(max_length=256)] | None = None
    data_class: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    written: Stamp | None = None
    """A copy: the encoded HLC timestamp of its write."""
    deleted: Stamp | None = None
    """A tombstone: the encoded HLC timestamp of the delete (then ``written`` is unset)."""

    def policy(self) -> ObjectPolicy:
        if self.regions is None and self.data_class is None:
            return ObjectPolicy(self.replicas)
        regions = None if self.regions is None else frozenset(self.regions)
        return ObjectPolicy(self.replicas, Residency(regions, self.data_class))


class DigestMsg(msgspec.Struct, tag=1, array_like=True):
    """What the sender holds that both it and the receiver should hold."""

    round: Round
    count: Annotated[int, msgspec.Meta(ge=0)]
    digest: Annotated[bytes, msgspec.Meta(max_length=32)]


class DigestReply(msgspec.Struct, tag=2, array_like=True):
    round: Round
    match: bool


class Offer(msgspec.Struct, tag=3, array_like=True):
    """A page of objects the sender believes the receiver should hold."""

    round: Round
    page: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)]
    refs: Annotated[list[ObjRef], msgspec.Meta(max_length=4096)]


class OfferReply(msgspec.Struct, tag=4, array_like=True):
    """Of an ``Offer`` page: ids the receiver lacks and should hold (``missing``), ids it
    does not consider its own (``not_mine``); every other id it holds and keeps."""

    round: Round
    page: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)]
    missing: Annotated[list[Oid], msgspec.Meta(max_length=4096)]
    not_mine: Annotated[list[Oid], msgspec.Meta(max_length=4096)]
    deleted: Annotated[list[ObjRef], msgspec.Meta(max_length=4096)] = []
    """Tombstones the receiver holds that are newer than what was offered."""
    superseded: Annotated[list[Oid], msgspec.Meta(max_length=4096)] = []
    """Offered tombstones older than a copy the receiver holds (the bytes were put again)."""
    no_room: Annotated[list[Oid], msgspec.Meta(max_length=4096)] = []
    """Copies the receiver lacks and should hold but has no room for (its disk is full):
    make them on a stand-in instead (see the module docstring)."""


class Tombstones(msgspec.Struct, tag=5, array_like=True):
    """Tombstones pushed at once by a delete. With ``ack`` (the delete's request id) the
    receiver answers ``TombstoneAck``; anti-entropy covers a loss either way."""

    refs: Annotated[list[ObjRef], msgspec.Meta(max_length=4096)]
    ack: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0


class TombstoneAck(msgspec.Struct, tag=6, array_like=True):
    """The receiver of ``Tombstones(ack=...)`` keeps the tombstone durably (``kept``) or
    applied it without keeping it (not in the object's replica set)."""

    ack: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    kept: bool


ReplicationMessage = DigestMsg | DigestReply | Offer | OfferReply | Tombstones | TombstoneAck

_codec: VersionedCodec[ReplicationMessage] = VersionedCodec("replication", REPLICATION_PROTOCOL_VERSION, ReplicationMessage)


def encode_message(msg: ReplicationMessage) -> bytes:
    """``[version, message]`` as MessagePack."""
    return _codec.encode(msg)


def decode_message(data: bytes, max_size: int) -> ReplicationMessage:
    """Parse one message or raise ``WireError`` (oversized, malformed, version)."""
    return _codec.decode(data, max_size)


def _ref(oid: str, policy: ObjectPolicy, written: HLCTimestamp | None = None,
         deleted: HLCTimestamp | None = None) -> ObjRef:
    res = policy.residency
    regions = None if res is None or res.regions is None else sorted(res.regions)
    return ObjRef(oid, policy.replicas, regions, res.data_class if res is not None else None,
                  None if written is None or written == ZERO_TS else written.encode(),
                  None if deleted is None else deleted.encode())


def _loc_ref(loc: _Local) -> ObjRef:
    if loc.tomb is not None:
        return _ref(loc.oid, loc.policy, deleted=loc.tomb)
    return _ref(loc.oid, loc.policy, written=loc.written)


def _id_hash(oid: str) -> int:
    return int.from_bytes(hashlib.blake2b(oid.encode(), digest_size=16).digest(), "big")


def _tomb_hash(oid: str, ts: HLCTimestamp) -> int:
    # Differs from the copy's hash, so a copy on one side and a tombstone on the other
    # (or two different tombstones) make the pair digests mismatch.
    return _id_hash(f"{oid}\x00tomb\x00{ts.encode()}")


def _entry_hash(loc: _Local) -> int:
    """What an entry contributes to a pair digest: its id's hash, or its tombstone's."""
    return _id_hash(loc.oid) if loc.tomb is None else _tomb_hash(loc.oid, loc.tomb)


# --------------------------------------------------------------------------- state


_T = TypeVar("_T")

_NO_ROOM: dict[str, float] = {}
"""The ``no_room`` of every entry no full peer declined (read only: ``_set_no_room`` gives
an entry a dict of its own before writing one)."""

_NONE_CONFIRMED: dict[str, float] = {}
"""The ``confirmed`` of every entry no peer confirmed (read only, as every ``confirmed``)."""

SHARED_VALUES_MAX = 4096
"""Distinct policies and replica-set tuples ``ReplicaManager`` keeps one copy of, for its
entries to share (beyond it, new ones are stored as they come)."""


_UNDER, _DROPPING, _MOVED, _HANDED, _TOMB = 1, 2, 4, 8, 16
"""The bits of ``_Local.flags``."""

_Key = str | int
"""An object id as the inventory keeps it (``_key``)."""

_ID_HEX = 64
"""Hex digits of a content id after ``OBJECT_ID_PREFIX`` (``core.objects``)."""


def _key(oid: _Key) -> _Key:
    """The inventory's key of ``oid``: a content id (``core.objects.is_object_id``: the
    prefix and 64 lowercase hex digits, every id the store makes) as the int of its
    digest, 64 bytes where its string takes 128 (issue #24); any other string (tests name
    objects "o1") as itself. Exact: ``_oid`` gives ``oid`` back, and a key already made
    is returned as it is."""
    if is_object_id(oid):
        return int(cast(str, oid)[len(OBJECT_ID_PREFIX):], 16)
    return oid


def _first(pair: tuple[str, object]) -> str:
    return pair[0]


def _oid(key: _Key) -> str:
    """The object id of an inventory key (``_key``'s inverse)."""
    if type(key) is str:
        return key
    assert isinstance(key, int)
    return OBJECT_ID_PREFIX + key.to_bytes(_ID_HEX // 2, "big").hex()


_LOGICAL_BITS = 32
_LOGICAL_MASK = (1 << _LOGICAL_BITS) - 1


_NODE_BITS = 12
_NODE_MASK = (1 << _NODE_BITS) - 1
_STAMP_NODES: list[str] = [""]
"""Node names of the stamps entries keep, by their number in a packed stamp (``_pack``):
at most ``2 ** _NODE_BITS``, never forgotten (a stamp's name beyond them is not packed).
Values, the same in every manager of the process."""
_STAMP_NODE_NUMBERS: dict[str, int] = {"": 0}


def _pack(ts: HLCTimestamp) -> int | HLCTimestamp:
    """``ts`` as an entry keeps it: its wall, logical and node number in one int (48
    bytes, where an ``HLCTimestamp`` and its wall int take 96 and the name a slot), or
    itself when ``_STAMP_NODES`` is full and does not name its node."""
    n = _STAMP_NODE_NUMBERS.get(ts.node)
    if n is None:
        if len(_STAMP_NODES) > _NODE_MASK:
            return ts
        n = _STAMP_NODE_NUMBERS[ts.node] = len(_STAMP_NODES)
        _STAMP_NODES.append(ts.node)
    return ((ts.wall_ns << _LOGICAL_BITS | ts.logical) << _NODE_BITS) | n


def _unpack(stamp: int | HLCTimestamp) -> HLCTimestamp:
    """``_pack``'s inverse."""
    if type(stamp) is not int:
        assert isinstance(stamp, HLCTimestamp)
        return stamp
    if not stamp:
        return ZERO_TS
    return HLCTimestamp(stamp >> (_NODE_BITS + _LOGICAL_BITS),
                        (stamp >> _NODE_BITS) & _LOGICAL_MASK, _STAMP_NODES[stamp & _NODE_MASK])


class _Rare(msgspec.Struct, frozen=True, gc=False):
    """The fields of an entry that nearly always have their default (``_Local.rare``):
    one slot of the entry, shared (``_rare``) while ``no_room`` is empty. Never changed:
    an entry gets another one (``no_room``, an entry's own dict once not empty, is
    changed in place, as it was)."""

    hint_for: str | None = None
    failed_at: float = float("-inf")
    no_room: dict[str, float] = msgspec.field(default_factory=lambda: _NO_ROOM)
    ws: tuple[str, ...] | None = None
    """None: the write set is the replica set (no member is full)."""


_COMMON = _Rare()
"""The ``rare`` of an entry with every one of them at its default."""

_RARES: dict[tuple[str | None, float, tuple[str, ...] | None], _Rare] = {}
"""The shared ``_Rare`` of each (hint_for, failed_at, ws) with no ``no_room``: after a
node leaves, every entry it was in gets the same ``failed_at``, and write sets are few. Up to ``SHARED_VALUES_MAX``
(then forgotten and started again: older ones stay shared by their entries). Values, never
changed, so every manager of the process may share them."""


def _rare(hint_for: str | None, failed_at: float, no_room: dict[str, float],
          ws: tuple[str, ...] | None) -> _Rare:
    if no_room is not _NO_ROOM:
        return _Rare(hint_for, failed_at, no_room, ws)  # the entry's own dict: not shared
    if hint_for is None and failed_at == float("-inf") and ws is None:
        return _COMMON
    key = (hint_for, failed_at, ws)
    got = _RARES.get(key)
    if got is None:
        if len(_RARES) >= SHARED_VALUES_MAX:
            _RARES.clear()
        _RARES[key] = got = _Rare(hint_for, failed_at, _NO_ROOM, ws)
    return got


class _Local(msgspec.Struct, gc=False):
    """A copy this node holds, or a tombstone (``tomb``): one per object in the inventory,
    so every field costs 8 bytes per copy held (issue #24). ``gc=False``: it refers to
    strings, ints, tuples, policies and dicts of floats, never back to itself, so it
    can be in no reference cycle and goes without the collector's header (16 bytes)."""

    key: _Key
    """The object's id as ``_key`` packs it (the same object as its inventory key);
    ``oid`` is the id."""
    policy: ObjectPolicy
    rare: _Rare = _COMMON
    """``hint_for``, ``failed_at``, ``no_room`` and ``ws``, read and set through
    properties."""
    confirmed: dict[str, float] = msgspec.field(default_factory=lambda: _NONE_CONFIRMED)
    """Peer -> when it last confirmed holding (and keeping) this object. Shared between
    entries and never changed in place: set with ``ReplicaManager._set_confirmed``."""
    rs: tuple[str, ...] = ()
    rs_version: int = -1
    stamp: int | HLCTimestamp = 0
    """The entry's HLC timestamp as ``_pack`` keeps it, ``written`` for a copy and
    ``tomb`` for a tombstone (``_TOMB`` in ``flags`` says which; a tombstone has no write
    stamp)."""
    dg: tuple[str, ...] = ()
    """The peers whose pair digest holds this entry (``_entry_hash`` XORed into their
    accumulators), as last indexed; may name this node, which is skipped. The hash is
    computed when needed, not kept (16 bytes of digest cost a 44-byte int per entry):
    an entry whose hash changes (a newer tombstone) leaves the digests first."""
    seq: int = 0
    """The manager's change epoch when this entry's digest state last changed: a digest
    match of a round started at or after it covers this entry. The epoch advances when a
    round starts, not at every change, so entries share its int (not 32 bytes each)."""
    flags: int = 0
    """``under``, ``dropping``, ``moved``, ``handed`` and ``_TOMB`` as bits (``_UNDER``...):
    one slot, a small cached int, where four slots took 24 bytes more per entry."""

    @property
    def oid(self) -> str:
        return _oid(self.key)

    @property
    def hint_for(self) -> str | None:
        """The node this copy is held for (a hinted copy), if any."""
        return self.rare.hint_for

    @hint_for.setter
    def hint_for(self, node: str | None) -> None:
        r = self.rare
        self.rare = _rare(node, r.failed_at, r.no_room, r.ws)

    @property
    def failed_at(self) -> float:
        """When a member of its replica set last left the view (repair priority)."""
        return self.rare.failed_at

    @failed_at.setter
    def failed_at(self, at: float) -> None:
        r = self.rare
        self.rare = _rare(r.hint_for, at, r.no_room, r.ws)

    @property
    def no_room(self) -> dict[str, float]:
        """Full peer -> when it said it lacks this copy and has no room for it. Nearly
        always empty: then the one shared ``_NO_ROOM`` (never written to), not a dict
        per entry."""
        return self.rare.no_room

    @no_room.setter
    def no_room(self, no_room: dict[str, float]) -> None:
        r = self.rare
        self.rare = _rare(r.hint_for, r.failed_at, no_room, r.ws)

    @property
    def ws(self) -> tuple[str, ...]:
        """The write set under the current view (== ``rs`` unless a member is full); set
        it after ``rs``."""
        ws = self.rare.ws
        return self.rs if ws is None else ws

    @ws.setter
    def ws(self, ws: tuple[str, ...]) -> None:
        r = self.rare
        kept = None if ws == self.rs else ws
        if kept != r.ws:
            self.rare = _rare(r.hint_for, r.failed_at, r.no_room, kept)

    @property
    def written(self) -> HLCTimestamp:
        """A copy: when the newest write of these bytes that reached us happened
        (``ZERO_TS``: unknown; always so for a tombstone)."""
        if self.flags & _TOMB:
            return ZERO_TS
        return _unpack(self.stamp)

    @written.setter
    def written(self, ts: HLCTimestamp) -> None:
        assert not self.flags & _TOMB, "a tombstone has no write stamp"
        self.stamp = _pack(ts)

    @property
    def tomb(self) -> HLCTimestamp | None:
        """Set: this entry is a tombstone, not a copy (no bytes are held)."""
        if not self.flags & _TOMB:
            return None
        return _unpack(self.stamp)

    @tomb.setter
    def tomb(self, ts: HLCTimestamp | None) -> None:
        if ts is None:
            self.flags &= ~_TOMB
            self.stamp = 0
        else:
            self.flags |= _TOMB
            self.stamp = _pack(ts)

    @property
    def under(self) -> bool:
        """Held here with fewer allowed live nodes than its policy wants."""
        return bool(self.flags & _UNDER)

    @under.setter
    def under(self, on: bool) -> None:
        self.flags = self.flags | _UNDER if on else self.flags & ~_UNDER

    @property
    def dropping(self) -> bool:
        """``DropLocal`` was emitted: the copy is going away."""
        return bool(self.flags & _DROPPING)

    @dropping.setter
    def dropping(self, on: bool) -> None:
        self.flags = self.flags | _DROPPING if on else self.flags & ~_DROPPING

    @property
    def moved(self) -> bool:
        """A tombstone whose rule changed while this node kept it (a migration, or a rule
        narrowed to its class's on receipt): kept here until it expires, not forgotten
        once the new set holds it. Copies on nodes that missed the change are still
        placed by the old rule, so their replica sets meet this node, not the tombstone's
        new set (swarm seed 1144458676 of the policy plane)."""
        return bool(self.flags & _MOVED)

    @moved.setter
    def moved(self, on: bool) -> None:
        self.flags = self.flags | _MOVED if on else self.flags & ~_MOVED

    @property
    def handed(self) -> bool:
        """A moved tombstone held outside its replica set, which every member confirmed
        keeping since the last view change: no longer offered to them (until the view
        changes)."""
        return bool(self.flags & _HANDED)

    @handed.setter
    def handed(self, on: bool) -> None:
        self.flags = self.flags | _HANDED if on else self.flags & ~_HANDED



def _new_local(oid: _Key, policy: ObjectPolicy, hint_for: str | None, *,
               written: HLCTimestamp = ZERO_TS, tomb: HLCTimestamp | None = None,
               flags: int = 0) -> _Local:
    """A new inventory entry of ``oid`` (an id, or its ``_key``): a copy written at
    ``written``, or the tombstone ``tomb``."""
    loc = _Local(_key(oid), policy, _COMMON if hint_for is None
                 else _rare(hint_for, float("-inf"), _NO_ROOM, None), flags=flags)
    if tomb is not None:
        loc.tomb = tomb
    elif written is not ZERO_TS:
        loc.written = written
    return loc


_ID_BYTES = _ID_HEX // 2
_WORDS = 3
"""Words of a packed record (``_Inventory``): the stamp's low and high 64 bits, and the
number of its shape (or ``_AS_OBJECT``, ``_GONE``)."""
_AS_OBJECT = (1 << 64) - 1
"""A record's shape word: the entry is a ``_Local`` (``_Inventory._objs``)."""
_GONE = (1 << 64) - 2
"""A record's shape word: the entry was removed (the position waits for compaction)."""
_WORD_MASK = (1 << 64) - 1
_STAMP_LIMIT = 1 << 128
_EMPTY, _DUMMY = -1, -2
"""Slots of ``_Inventory._index`` not naming a position: never used, or used and freed."""
_FLUSH_AT = 256
"""Entries made ``_Local`` that ``_Inventory`` packs again once this many wait."""
_INDEX_MIN = 8

_Shape = tuple[ObjectPolicy, _Rare, dict[str, float], tuple[str, ...], int,
               tuple[str, ...], int, int]
"""The fields of a ``_Local`` but its key and stamp: (policy, rare, confirmed, rs,
rs_version, dg, seq, flags)."""


def _held_refs() -> int:
    """``sys.getrefcount`` of an entry that only ``_Inventory._objs`` holds, read as
    ``_Inventory._flush`` reads it (straight from the dict, no variable of its own that a
    debugger's snapshot of the frame's locals could add to)."""
    objs = {0: _Local(0, ObjectPolicy(1))}
    return sys.getrefcount(objs[0])


class _Keys:
    """A sequence of inventory keys (``_Inventory.keys``): 32 bytes of digest each, those
    that are not content ids by their index in ``others``."""

    __slots__ = ("_ids", "_others")

    def __init__(self, ids: bytes = b"", others: dict[int, str] | None = None) -> None:
        self._ids = ids
        self._others = others or {}

    def __len__(self) -> int:
        return len(self._ids) // _ID_BYTES

    def __getitem__(self, i: int) -> _Key:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = self._others.get(i)
        if k is not None:
            return k
        return int.from_bytes(self._ids[i * _ID_BYTES:(i + 1) * _ID_BYTES], "big")

    def __iter__(self) -> Iterator[_Key]:
        return (self[i] for i in range(len(self)))

    def tail(self, start: int) -> _Keys:
        """The keys from index ``start`` on."""
        return _Keys(self._ids[start * _ID_BYTES:],
                     {i - start: k for i, k in self._others.items() if i >= start})

    def __add__(self, other: _Keys) -> _Keys:
        n = len(self)
        return _Keys(self._ids + other._ids,
                     {**self._others, **{i + n: k for i, k in other._others.items()}})


class _Inventory:
    """Object id -> its ``_Local``, the inventory (issue #24). Looked up by id (a string)
    or by ``_key``; walking it gives ids in the order the entries were added, as a dict
    does (a replaced entry keeps its place, a removed one added again goes last).

    Packed: an entry of a content id is a fixed-width record, not objects. Each entry has
    a *position* (the order): 32 bytes of its id's digest in ``_ids`` and ``_WORDS``
    unsigned 64-bit words in ``_words`` (its stamp, and the number of its *shape*: every
    other field of the entry, a tuple shared by the entries with the same ones, counted
    and forgotten when no entry has it). ``_index`` is an open-addressing hash table of
    positions (CPython's dict probing), so a lookup is O(1) with no object per entry:
    about 32 + 24 + 8 bytes per copy held, where a ``_Local``, its key int, its stamp int
    and a dict slot took ~250.

    An entry read (``get``, a walk) is made a ``_Local`` and kept as one (``_objs``), so
    the caller reads and changes it as before; once ``_FLUSH_AT`` wait, those only the
    inventory still refers to (``sys.getrefcount``: no caller can change them any more)
    are packed again. An entry that cannot be packed stays a ``_Local``: an id that is not
    a content id (tests name objects "o1"), a stamp kept whole (``_pack``)."""

    __slots__ = ("_compactions", "_dirty", "_flush_at", "_ids", "_index", "_missed", "_n",
                 "_objs", "_probed_slot", "_shape_free", "_shape_of", "_shape_refs",
                 "_shapes", "_strs", "_used", "_words")

    def __init__(self) -> None:
        self._ids = bytearray()
        self._words = array("Q")
        self._objs: dict[int, _Local] = {}
        """Position -> its entry, for the entries kept as ``_Local``."""
        self._strs: dict[str, int] = {}
        """An id that is not a content id -> its position (its ``_ids`` bytes are zero)."""
        self._index = array("i", [_EMPTY]) * _INDEX_MIN
        self._used = 0
        """Slots of ``_index`` not ``_EMPTY``."""
        self._n = 0
        self._dirty: dict[int, None] = {}
        """Positions of content ids read or added as ``_Local`` since the last ``_flush``
        (a dict: each once, in order)."""
        self._flush_at = _FLUSH_AT
        self._shapes: list[_Shape | None] = []
        self._shape_refs = array("q")
        self._shape_of: dict[tuple[object, ...], int] = {}
        self._shape_free: list[int] = []
        self._compactions = 0
        self._probed_slot = 0
        self._missed: tuple[int, bytes, int] | None = None
        """The key last looked up and not found, and its digest, while nothing was added
        since (``object_added`` looks an id up, then adds it: one search, not two)."""

    # -- index

    def _find(self, kb: bytes) -> int:
        """The position of the content id whose digest is ``kb``, or -1. ``_probed_slot`` is
        then the slot of ``_index`` it is at, or the empty one where it would go (one
        probe loop for both: it is on the way of every lookup)."""
        idx, ids, mask = self._index, self._ids, len(self._index) - 1
        h = hash(kb) & _WORD_MASK
        i = h & mask
        while True:
            p = idx[i]
            if p == _EMPTY or (p >= 0 and ids[p * _ID_BYTES:(p + 1) * _ID_BYTES] == kb):
                self._probed_slot = i
                return -1 if p == _EMPTY else p
            h >>= 5
            i = (i * 5 + h + 1) & mask

    def _slot(self, kb: bytes) -> int:
        """The ``_index`` slot of the content id ``kb`` (``KeyError`` if it is not held)."""
        if self._find(kb) < 0:
            raise KeyError(kb.hex())
        return self._probed_slot

    def _put_index(self, kb: bytes, p: int) -> None:
        if (self._used + 1) * 3 >= len(self._index) * 2:
            self._reindex(self._n + 1)
        idx, mask = self._index, len(self._index) - 1
        h = hash(kb) & _WORD_MASK
        i = h & mask
        while idx[i] >= 0:
            h >>= 5
            i = (i * 5 + h + 1) & mask
        if idx[i] == _EMPTY:
            self._used += 1
        idx[i] = p

    def _reindex(self, n: int) -> None:
        """Make ``_index`` anew for ``n`` entries: at most a third full, so it doubles
        (and is made again) when the inventory does, as a dict."""
        size = _INDEX_MIN
        while size <= 3 * n:
            size *= 2
        idx = self._index = array("i", [_EMPTY]) * size
        mask = size - 1
        ids, words, objs = bytes(self._ids), self._words, self._objs
        used = 0
        for p in range(len(words) // _WORDS):
            s = words[p * _WORDS + 2]
            if s == _GONE or (s == _AS_OBJECT and type(objs[p].key) is str):
                continue
            h = hash(ids[p * _ID_BYTES:(p + 1) * _ID_BYTES]) & _WORD_MASK
            i = h & mask
            while idx[i] != _EMPTY:
                h >>= 5
                i = (i * 5 + h + 1) & mask
            idx[i] = p
            used += 1
        self._used = used

    # -- shapes

    def _shape(self, loc: _Local) -> int:
        rs, dg = loc.rs, loc.dg
        same = dg is rs
        key = (id(loc.policy), id(loc.rare), id(loc.confirmed), rs, loc.rs_version,
               same, None if same else dg, loc.seq, loc.flags)
        s = self._shape_of.get(key)
        if s is None:
            value = (loc.policy, loc.rare, loc.confirmed, rs, loc.rs_version, dg, loc.seq,
                     loc.flags)
            if self._shape_free:
                s = self._shape_free.pop()
                self._shapes[s] = value
            else:
                s = len(self._shapes)
                self._shapes.append(value)
                self._shape_refs.append(0)
            self._shape_of[key] = s
        self._shape_refs[s] += 1
        return s

    def _unshape(self, s: int) -> None:
        refs = self._shape_refs[s] - 1
        self._shape_refs[s] = refs
        if not refs:
            sh = self._shapes[s]
            assert sh is not None
            rs, dg = sh[3], sh[5]
            same = dg is rs
            del self._shape_of[(id(sh[0]), id(sh[1]), id(sh[2]), rs, sh[4], same,
                                None if same else dg, sh[6], sh[7])]
            self._shapes[s] = None
            self._shape_free.append(s)

    # -- records

    def _load(self, p: int) -> _Local:
        """The entry at position ``p`` as a ``_Local`` (made one if packed)."""
        words = self._words
        b = p * _WORDS
        s = words[b + 2]
        if s == _AS_OBJECT:
            loc = self._objs[p]
            if type(loc.key) is int and p not in self._dirty:
                # Not packed when last tried (a stamp kept whole): perhaps it can be now.
                self._dirty[p] = None
            return loc
        sh = self._shapes[s]
        assert sh is not None
        loc = _Local(int.from_bytes(self._ids[p * _ID_BYTES:(p + 1) * _ID_BYTES], "big"),
                     sh[0], sh[1], sh[2], sh[3], sh[4], words[b + 1] << 64 | words[b],
                     sh[5], sh[6], sh[7])
        self._unshape(s)
        words[b + 2] = _AS_OBJECT
        self._objs[p] = loc
        self._dirty[p] = None
        if len(self._dirty) >= self._flush_at:
            self._flush()
        return loc

    def _store(self, p: int, loc: _Local) -> bool:
        """Pack the ``_Local`` at ``p`` into its record, if it can be."""
        stamp = loc.stamp
        if type(stamp) is not int or not 0 <= stamp < _STAMP_LIMIT or type(loc.key) is not int:
            return False
        words = self._words
        b = p * _WORDS
        words[b + 2] = self._shape(loc)
        words[b] = stamp & _WORD_MASK
        words[b + 1] = stamp >> 64
        del self._objs[p]
        return True

    def _flush(self) -> None:
        """Pack the entries made ``_Local`` that no caller holds any more."""
        objs, held = self._objs, _HELD_REFS
        keep: dict[int, None] = {}
        for p in self._dirty:
            if p not in objs:
                continue  # removed
            if sys.getrefcount(objs[p]) > held:
                keep[p] = None
            else:
                self._store(p, objs[p])
        self._dirty = keep
        self._flush_at = max(_FLUSH_AT, 2 * len(keep))

    def pack(self) -> None:
        """Pack every entry it can that no caller holds (tests, and a walk's end)."""
        self._flush()

    def _drop(self, p: int) -> None:
        """Forget what position ``p`` holds (its shape's count, its ``_Local``)."""
        b = p * _WORDS + 2
        s = self._words[b]
        if s == _AS_OBJECT:
            del self._objs[p]
        elif s != _GONE:
            self._unshape(s)
        self._words[b] = _GONE

    def _append(self, kb: bytes) -> int:
        p = len(self._words) // _WORDS
        self._ids += kb
        self._words.extend((0, 0, _GONE))
        return p

    def _position(self, oid: _Key) -> int:
        if type(oid) is int:
            kb = oid.to_bytes(_ID_BYTES, "big")
            p = self._find(kb)
            if p < 0:
                self._missed = (oid, kb, self._probed_slot)
            return p
        assert isinstance(oid, str)
        if is_object_id(oid):
            return self._find(bytes.fromhex(oid[len(OBJECT_ID_PREFIX):]))
        return self._strs.get(oid, -1)

    # -- the mapping

    def get(self, oid: _Key) -> _Local | None:
        p = self._position(oid)
        return None if p < 0 else self._load(p)

    def __getitem__(self, oid: _Key) -> _Local:
        p = self._position(oid)
        if p < 0:
            raise KeyError(oid)
        return self._load(p)

    def __contains__(self, oid: object) -> bool:
        return isinstance(oid, (str, int)) and self._position(oid) >= 0

    def flags(self, oid: _Key) -> int | None:
        """``get(oid).flags`` without making the entry a ``_Local``; None if absent."""
        p = self._position(oid)
        if p < 0:
            return None
        s = self._words[p * _WORDS + 2]
        if s == _AS_OBJECT:
            return self._objs[p].flags
        sh = self._shapes[s]
        assert sh is not None
        return sh[7]

    def peek(self, oid: _Key) -> _Local | _Shape | None:
        """The entry of ``oid`` as it is kept, made a ``_Local`` by no one: its ``_Local``
        if kept as one, else its shape (every field but key and stamp); None if absent.
        For readers of shared fields on a hot path (a listing page reads a thousand)."""
        p = self._position(oid)
        if p < 0:
            return None
        s = self._words[p * _WORDS + 2]
        if s == _AS_OBJECT:
            return self._objs[p]
        return self._shapes[s]

    def add(self, loc: _Local) -> None:
        """Add (or replace) the entry of ``loc.oid``."""
        key = loc.key
        if type(key) is str:
            p = self._strs.get(key, -1)
            if p < 0:
                p = self._strs[key] = self._append(bytes(_ID_BYTES))
                self._n += 1
            else:
                self._drop(p)
        else:
            assert isinstance(key, int)
            missed = self._missed
            self._missed = None
            if missed is not None and missed[0] is key:
                kb, p, slot = missed[1], -1, missed[2]
            else:
                kb = key.to_bytes(_ID_BYTES, "big")
                p = self._find(kb)
                slot = self._probed_slot
            if p < 0:
                p = self._append(kb)
                if (self._used + 1) * 3 < len(self._index) * 2:
                    self._index[slot] = p  # the empty slot its search ended on
                    self._used += 1
                else:
                    self._put_index(kb, p)
                self._n += 1
            else:
                self._drop(p)
            self._dirty[p] = None
        self._words[p * _WORDS + 2] = _AS_OBJECT
        self._objs[p] = loc
        if len(self._dirty) >= self._flush_at:
            self._flush()

    def __delitem__(self, oid: _Key) -> None:
        self._missed = None
        key = _key(oid)
        if type(key) is str:
            p = self._strs.pop(key)
        else:
            assert isinstance(key, int)
            kb = key.to_bytes(_ID_BYTES, "big")
            i = self._slot(kb)
            p = self._index[i]
            self._index[i] = _DUMMY
        self._drop(p)
        self._n -= 1
        gone = len(self._words) // _WORDS - self._n
        if gone > 1024 and gone > self._n:
            self._compact()

    def _compact(self) -> None:
        """Close the gaps removed entries left (positions change: no walk may be under
        way, as no dict may change size during one)."""
        self._flush()
        words, ids = self._words, self._ids
        new_words, new_ids = array("Q"), bytearray()
        moved: dict[int, int] = {}
        for p in range(len(words) // _WORDS):
            b = p * _WORDS
            if words[b + 2] == _GONE:
                continue
            moved[p] = len(new_words) // _WORDS
            new_words.extend(words[b:b + _WORDS])
            new_ids += ids[p * _ID_BYTES:(p + 1) * _ID_BYTES]
        self._words, self._ids = new_words, new_ids
        self._objs = {moved[p]: loc for p, loc in self._objs.items()}
        self._strs = {k: moved[p] for k, p in self._strs.items()}
        self._dirty = {moved[p]: None for p in self._dirty if p in moved}
        self._compactions += 1
        self._reindex(self._n)

    def __len__(self) -> int:
        return self._n

    def by_shape(self) -> Iterator[tuple[_Local, int]]:
        """Every entry as (a ``_Local``, how many entries it stands for): each entry kept
        as a ``_Local`` (itself, 1), then for each shape of packed entries a new
        ``_Local`` with its fields (key 0, stamp 0: not in the inventory) and how many
        have it. Change nothing in the inventory meanwhile."""
        for loc in list(self._objs.values()):
            yield loc, 1
        refs = self._shape_refs
        for s, sh in enumerate(self._shapes):
            if sh is not None and refs[s]:
                yield self.shape_entry(s), refs[s]

    def shape_entry(self, s: int) -> _Local:
        """A new ``_Local`` with the fields of shape ``s`` (key 0, stamp 0: not in the
        inventory)."""
        sh = self._shapes[s]
        assert sh is not None
        return _Local(0, sh[0], sh[1], sh[2], sh[3], sh[4], 0, sh[5], sh[6], sh[7])

    def walk(self) -> Iterator[tuple[int, int, _Local | None]]:
        """(position, shape, None) for each packed entry, (position, -1, the entry) for
        each kept as a ``_Local``, in order, none made a ``_Local``. Change nothing in
        the inventory meanwhile."""
        words, objs = self._words, self._objs
        for p in range(len(words) // _WORDS):
            s = words[p * _WORDS + 2]
            if s == _GONE:
                continue
            if s == _AS_OBJECT:
                yield p, -1, objs[p]
            else:
                yield p, s, None

    def oid_at(self, p: int) -> str:
        """The id of the packed entry at position ``p``."""
        return OBJECT_ID_PREFIX + self._ids[p * _ID_BYTES:(p + 1) * _ID_BYTES].hex()

    def _live(self) -> Iterator[int]:
        """The live positions, in order (a compaction during the walk is an error, as a
        dict changed during one)."""
        words, at = self._words, self._compactions
        for p in range(len(words) // _WORDS):
            if at != self._compactions:
                raise RuntimeError("inventory compacted during a walk")
            words = self._words
            if words[p * _WORDS + 2] != _GONE:
                yield p

    def _key_at(self, p: int) -> _Key:
        loc = self._objs.get(p)
        if loc is not None:
            return loc.key
        return int.from_bytes(self._ids[p * _ID_BYTES:(p + 1) * _ID_BYTES], "big")

    def __iter__(self) -> Iterator[str]:
        return (_oid(self._key_at(p)) for p in self._live())

    def keys(self) -> _Keys:
        """The keys (``_key``), in order: for a walk that looks entries up again. Packed
        (32 bytes each), not a list of ints (72 bytes each, made at every view change)."""
        words, ids, n = self._words, self._ids, len(self._words) // _WORDS
        strs = {p: k for k, p in self._strs.items()}
        if n == self._n:
            return _Keys(bytes(ids), strs)
        out, others = bytearray(), {}
        for p in range(n):
            if words[p * _WORDS + 2] != _GONE:
                k = strs.get(p)
                if k is not None:
                    others[len(out) // _ID_BYTES] = k
                out += ids[p * _ID_BYTES:(p + 1) * _ID_BYTES]
        return _Keys(bytes(out), others)

    def values(self) -> Iterator[_Local]:
        return (self._load(p) for p in self._live())

    def items(self) -> Iterator[tuple[str, _Local]]:
        return ((loc.oid, loc) for loc in self.values())


_HELD_REFS = _held_refs()


@dataclass(slots=True)
class _Delete:
    req_id: int
    oid: str
    w: int
    deadline: float
    durable: set[str]
    ts: HLCTimestamp
    """The tombstone's timestamp: a peer found keeping it (or a newer one) counts."""


@dataclass(slots=True)
class _Put:
    req_id: int
    oid: str
    policy: ObjectPolicy
    w: int
    deadline: float
    ranked: list[str]
    """Allowed live nodes in HRW order at the start: where stand-ins come from."""
    tried: set[str]
    outstanding: dict[str, str | None]
    """dst -> the replica-set member it stands in for (None: it is a member)."""
    durable: list[str] = field(default_factory=list)
    stand_ins: int = 0
    written: HLCTimestamp | None = None


@dataclass(slots=True)
class _PeerRound:
    round: int
    started: float
    view: int
    """The view version the round started under."""
    seq: int
    """The change epoch when it started: its digest covered entries with ``seq`` <= it."""
    pair_tombs: dict[str, HLCTimestamp] = field(default_factory=dict)
    """Tombstones with a delete pending here that the round's digest covered, with their
    timestamp then (credited on a match)."""
    pages: dict[int, list[str]] = field(default_factory=dict)
    next_page: int = 0
    tombs: dict[str, HLCTimestamp] = field(default_factory=dict)
    """Tombstones digested or offered in this round, with the timestamp they had then:
    the peer's confirmation is of that one (``_credit_deletes``)."""


@dataclass(slots=True)
class _Rebuild:
    """A view change's pass over the inventory, done in slices (``_rebuild_slice``)."""

    oids: _Keys
    """The inventory's keys (``_key``) when the view last changed, in its order: each is re-placed and
    re-indexed once (an entry added since was indexed under the current view). After a
    view change during a rebuild, the ids the rebuild had not reached come first, then
    the whole inventory again (the second time, such an entry's sets are cached under
    this view: it is only checked and re-indexed)."""
    pos: int
    """How many of ``oids`` are done."""
    forced: int
    """The first ``forced`` ids had not been rebuilt when the view changed again: their
    cached sets (placed under the last view by a read, perhaps) are not taken as indexed
    under it, so they are placed and checked again whatever ``unmoved`` says."""
    unmoved: Callable[[_Local], bool] | None
    """``ReplicaManager._unmoved`` for the last view change."""
    at: float
    """When the next slice is due."""


# --------------------------------------------------------------------------- manager


class ReplicaManager:
    """One node's replication decisions. Drive it as described in the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        config: ReplicationConfig | None = None,
        rng: random.Random,
        now: float,
    ) -> None:
        self.name = name
        self.config = config or ReplicationConfig()
        self.rng = rng
        self.stats: dict[str, int] = {}
        self._outputs: list[ReplicationOutput] = []
        self._view: dict[str, Candidate] = {}
        self._placer: Placer | None = None
        self._any_full = False
        self._view_version = 0
        self._view_since = now
        self._peers: list[str] = []
        self._peer_cursor = 0
        self._inv = _Inventory()
        self._puts: dict[int, _Put] = {}
        self._put_deadlines: list[tuple[float, int]] = []
        self._deletes: dict[int, _Delete] = {}
        self._deletes_of: dict[str, list[int]] = {}
        """Object -> its deletes coordinated here and not yet acknowledged or failed."""
        self._delete_deadlines: list[tuple[float, int]] = []
        self._rounds: dict[str, _PeerRound] = {}
        self._round_seq = 0
        self._repair_heap: list[tuple[tuple[int, float, str, str], str, str]] = []
        self._repair_queued: set[tuple[str, str]] = set()
        self._inflight: dict[tuple[str, str], float] = {}
        self._busy = False
        self._quiet_at = -math.inf
        """When the quiet period after this node's last foreground work ends."""
        self._repair_rate: ByteRate | None = (
            ByteRate(self.config.repair_busy_bytes_per_s, self.config.repair_burst_bytes)
            if self.config.repair_busy_bytes_per_s > 0 else None)
        self._next_sync = now + self.rng.uniform(0.0, self.config.sync_interval_s)
        self._prompt_at: float | None = None
        self._prompt_peers: set[str] = set()
        self._tomb_count = 0
        self._tomb_heap: list[tuple[float, str]] = []
        """(expiry wall time, oid), lazily invalidated."""
        self._wall = 0.0
        """The latest wall clock the driver told us (``delete``, ``collect_tombstones``)."""
        self.class_policies: Mapping[str, ClassPolicy] = {}
        """The data-class policies this node knows (its driver's, ``core.policy``): a
        tombstone received under a rule wider than its class's (a delete coordinated by a
        node that has not heard of a narrowing) is kept under the rule narrowed to the
        class's (``stored_rule``), as a received copy is, so that it follows the copies a
        migration moved (swarm seed 1414881169 of the policy plane)."""
        self._dg_count: dict[str, int] = {}
        self._dg_acc: dict[str, int] = {}
        """Peer -> count and XOR of the entries in our pair digest with it (kept as
        entries change; rebuilt on a view change)."""
        self._handoff: set[_Key] = set()
        """Entries to offer beyond the pair digests: held outside their replica set, or
        with a member that declined them (``no_room``)."""
        self._seq = 0
        """The change epoch: an entry that changes takes it (``_index``); a round starting
        records it and advances it, so a change before the start has a ``seq`` <= the
        round's and one after a greater one (a counter per change would give the same
        order, with an int of its own for nearly every entry)."""
        self._matched: dict[str, tuple[float, int]] = {}
        """Peer -> (when, round's change epoch) of its last digest match under the
        current view: every entry in our pair digest with it and unchanged since that
        round started counts as confirmed by it then (``_settle``)."""
        self._rebuilding: _Rebuild | None = None
        """The view change's rebuild still under way, if any: until it is done, entries
        after ``pos`` are indexed under an older view, so no digest round starts, a
        digest received is not answered, and the two below are applied to an entry when
        it is next settled (``_settle``), or by its slice."""
        self._stale: dict[str, tuple[float, int]] = {}
        """The digest matches (``_matched``) pending when the view changed, for the
        entries not yet rebuilt (their ``dg`` and ``seq`` still those the match covered)."""
        self._gone: dict[str, float] = {}
        """Nodes that left the view since the rebuild started -> when: their confirmations
        and ``no_room`` entries go from every entry, as it is settled or rebuilt."""
        self._under = 0
        self._confirmations: dict[tuple[tuple[str, float], ...], dict[str, float]] = {}
        """Confirmations the entries share (``_set_confirmed``), up to
        ``SHARED_VALUES_MAX`` (then forgotten and started again)."""
        self._shared: dict[object, object] = {}
        """One copy of each policy and replica-set tuple the entries hold (many objects,
        few distinct values: a few hundred bytes per entry otherwise), up to
        ``SHARED_VALUES_MAX``."""

    def _share(self, value: _T) -> _T:
        """``value``, or the equal one already held for the entries to share."""
        got = self._shared.get(value)
        if got is None:
            if len(self._shared) < SHARED_VALUES_MAX:
                self._shared[value] = value
            return value
        return cast(_T, got)

    # ------------------------------------------------------------------ driver contract

    def drain(self) -> list[ReplicationOutput]:
        out = self._outputs
        self._outputs = []
        return out

    def next_deadline(self) -> float | None:
        rb = self._rebuilding
        if rb is not None:
            times = [rb.at]  # rounds wait until the rebuild is done
        else:
            times = [self._next_sync]
            if self._prompt_at is not None:
                times.append(self._prompt_at)
        heap = self._put_deadlines
        while heap and heap[0][1] not in self._puts:
            heapq.heappop(heap)
        if heap:
            times.append(heap[0][0])
        if self._inflight:
            times.append(min(self._inflight.values()) + self.config.transfer_timeout_s)
        if self._repair_heap and not self._busy and self._quiet_at != -math.inf:
            times.append(self._quiet_at)  # the queued repairs start in full then
        dheap = self._delete_deadlines
        while dheap and dheap[0][1] not in self._deletes:
            heapq.heappop(dheap)
        if dheap:
            times.append(dheap[0][0])
        return min(times)

    def on_timer(self, now: float) -> None:
        heap = self._put_deadlines
        while heap and heap[0][0] <= now:
            _, req_id = heapq.heappop(heap)
            put = self._puts.pop(req_id, None)
            if put is not None:
                self._fail(put, f"timeout: {len(put.durable)} of W={put.w} copies durable "
                                f"after {self.config.put_timeout_s} s")
        dheap = self._delete_deadlines
        while dheap and dheap[0][0] <= now:
            _, req_id = heapq.heappop(dheap)
            d = self._deletes.pop(req_id, None)
            if d is not None:
                self._forget_delete(d)
                self._count("deletes_unconfirmed")
                self._outputs.append(DeleteFailed(
                    d.req_id, d.oid, f"only {len(d.durable)} of W={d.w} tombstones durable "
                    f"after {self.config.delete_timeout_s:g} s; those written still spread, "
                    "so the delete may yet take effect"))
        expired = [k for k, t in self._inflight.items() if t + self.config.transfer_timeout_s <= now]
        for k in expired:
            del self._inflight[k]
            self._count("transfers_expired")
        rb = self._rebuilding
        if rb is not None:
            if now >= rb.at:
                self._rebuild_slice(now)
            if self._rebuilding is not None:
                self._pump(now)
                return  # no round on a half-rebuilt index: it starts once the rebuild is done
        if now >= self._next_sync:
            self._next_sync = now + self.config.sync_interval_s * self.rng.uniform(0.8, 1.2)
            self._periodic_round(now)
        elif self._prompt_at is not None and now >= self._prompt_at:
            self._prompt_at = None
            peers = sorted(self._prompt_peers)
            self._prompt_peers.clear()
            self._sync(peers, now)
        self._pump(now)

    # ------------------------------------------------------------------ view & inventory

    def under_replicated_count(self) -> int:
        """Objects held here with fewer live copies than their policy wants."""
        return self._under

    def set_view(self, candidates: Iterable[Candidate], now: float) -> None:
        """The live view changed (alive and suspect members, this node included).

        The entries are re-placed and re-indexed for it in slices of at most
        ``ReplicationConfig.rebuild_slice_entries`` (the first here, the next at each
        ``on_timer``): the work on the driver's loop per call is bounded, whatever the
        inventory. Until the last slice no digest round starts (see ``_rebuilding``);
        everything else reads an entry's replica set under the current view (``_rs_of_local``
        places it again when its cache is older) and keeps the digests exact as it changes
        entries (``_index``). A view change during a rebuild starts it again: the entries
        it had not reached first, then the whole inventory (cheap for an entry already
        rebuilt or placed under the new view: its sets mostly stay)."""
        view = {c.name: c for c in candidates}
        if self.name not in view:
            raise ValueError(f"the view of {self.name!r} must include itself")
        if view == self._view:
            return
        removed = [n for n in self._view if n not in view]
        added = [n for n in view if n not in self._view]
        for r in removed:
            self._gone[r] = now
            self._rounds.pop(r, None)
        # Digest matches under the old view become plain confirmations before the pair
        # sets move: as each entry is rebuilt, or settled before that. A departed node's
        # matches go, as its confirmations do.
        self._stale = {p: m for p, m in {**self._stale, **self._matched}.items()
                       if p not in self._gone}
        self._matched = {}
        old_view = self._view
        self._view = view
        self._placer = None
        self._any_full = any(c.full for c in view.values())
        self._view_version += 1
        self._view_since = now
        self._peers = sorted(n for n in view if n != self.name)
        self._count("view_changes")
        rb = self._rebuilding
        left = _Keys() if rb is None else rb.oids.tail(rb.pos)
        if rb is not None:
            self._count("rebuilds_restarted")
        self._rebuilding = _Rebuild(left + self._inv.keys(), 0, len(left),
                                    self._unmoved(old_view, removed, added), now)
        # Promptly re-check with everyone (once the rebuild is done): the replica sets of
        # some objects moved.
        self._prompt(self._peers, now)
        self._rebuild_slice(now)
        if self._rebuilding is not None:
            self._count("rebuilds_sliced")
        if added or removed:
            self._pump(now)

    def _unmoved(self, old_view: Mapping[str, Candidate], removed: list[str], added: list[str]
                 ) -> Callable[[_Local], bool] | None:
        """For a view change that only removes and adds nodes, none of them full, and
        leaves the other nodes as they were: a test of whether an entry's replica and
        write sets (cached under the old view) are still its sets. By property 1 of
        ``core.placement`` a set that holds no removed node and that no added node enters
        is unchanged, order included, so most entries of a large mesh keep theirs without
        being placed again. None for any other change (every set is placed again)."""
        if not old_view:
            return None
        gone = set(removed)
        if any(old_view[n].full for n in gone) or any(self._view[n].full for n in added):
            return None
        if any(old_view[n] != c for n, c in self._view.items() if n in old_view):
            return None  # a node changed (its region, zone, labels, or disk filled)
        joined = [self._view[n] for n in added]
        placer = self._placement()
        any_full = self._any_full

        def unmoved(loc: _Local) -> bool:
            if gone and (not gone.isdisjoint(loc.rs) or not gone.isdisjoint(loc.ws)):
                return False
            if not joined:
                return True
            if not loc.rs or any_full:
                return False  # no set to keep, or a write set apart to check too
            return placer.unmoved_by(loc.oid, loc.policy.replicas, loc.policy.residency,
                                     loc.rs, joined)

        return unmoved

    def object_added(
        self, oid: str, policy: ObjectPolicy, hint_for: str | None, now: float,
        written: HLCTimestamp | None = None,
    ) -> None:
        """The store committed a copy of ``oid`` (or already had one), made by a write at
        ``written`` (None: unknown, older than any tombstone). A copy older than a live
        tombstone here is dropped at once (``DropLocal``); a newer one supersedes it."""
        w = ZERO_TS if written is None else written
        key = _key(oid)
        loc = self._inv.get(key)
        if loc is not None and loc.tomb is not None:
            if w <= loc.tomb:
                self._count("resurrections_refused")
                self._outputs.append(DropLocal(oid))
                return
            self._forget_tomb(loc)
            loc = None
        if loc is not None:
            if loc.dropping:
                self._settle(loc)
                loc.dropping = False  # a fresh copy arrived before the drop: keep it
                self._index(loc)
            if loc.hint_for is not None and hint_for is None:
                loc.hint_for = None
            if w > loc.written:
                loc.written = w
            return
        loc = _new_local(key, self._share(policy), hint_for, written=w)
        self._inv.add(loc)
        self._index(loc)
        self._count("objects_added")
        if self.name not in self._rs_of_local(loc):
            # A hint or a stray copy: hand it off soon rather than at the next period.
            self._prompt(self._rs_of_local(loc), now)
        self._check_under(oid, loc)

    def object_removed(self, oid: str, now: float) -> None:
        """The store no longer holds ``oid`` (dropped, collected or found corrupt)."""
        loc = self._inv.get(oid)
        if loc is not None and loc.tomb is None:
            self._unindex(loc)
            del self._inv[oid]
            self._count("objects_removed")

    def holds(self, oid: str) -> bool:
        flags = self._inv.flags(oid)  # without making the entry a _Local
        return flags is not None and not flags & _TOMB

    def placement(self, oid: str, policy: ObjectPolicy
                  ) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """(replica set, write set) under the current view of a copy held here under
        ``policy``, as replication keeps them (cached per view: no hashing); empty when no
        live node may hold it. None when no copy is held here, or under another policy."""
        got = self._inv.peek(oid)
        if got is None:
            return None
        if type(got) is tuple:
            # Packed: read the sets from its shape unless the view changed since they
            # were computed (then the entry must be made a _Local to keep new ones).
            pol, rare, _, rs, rs_version, _, _, flags = got
            if flags & _TOMB or pol != policy:
                return None
            if rs_version == self._view_version:
                return rs, rs if rare.ws is None else rare.ws
            got = self._inv[oid]
        assert isinstance(got, _Local)
        if got.tomb is not None or got.policy != policy:
            return None
        return self._rs_of_local(got), got.ws

    def inventory(self) -> list[str]:
        return sorted(o for o, loc in self._inv.items() if loc.tomb is None)

    def unconfirmed_count(self) -> int:
        """Copies held here that no peer is confirmed to hold (``confirmed_holders``
        empty), counted without listing their ids (a string each, from its key), and
        without walking the packed entries: what ``_settle`` makes of an entry depends
        only on the fields of its shape, so each shape is settled once (a copy of it,
        not written back: settling is idempotent, each reader settles again) and counts
        for its entries. O(shapes + entries kept as ``_Local``)."""
        n = 0
        for loc, entries in self._inv.by_shape():
            if loc.tomb is None:
                self._settle(loc)
                n += entries * (not loc.confirmed)
        return n

    def confirmed_holders(self, oid: str) -> list[str]:
        loc = self._inv.get(oid)
        if loc is None or loc.tomb is not None:
            return []
        self._settle(loc)
        return sorted(loc.confirmed)

    # ------------------------------------------------------------------ deletes

    def tombstone(self, oid: str) -> HLCTimestamp | None:
        """The live tombstone of ``oid`` held here, if any."""
        loc = self._inv.get(oid)
        return None if loc is None else loc.tomb

    def tombstones(self) -> list[str]:
        return sorted(o for o, loc in self._inv.items() if loc.tomb is not None)

    def migrate_tombstones(self, new: ClassPolicy) -> list[str]:
        """Class ``new.name``'s policy changed to ``new`` (``policy.migrate_local``): the
        tombstones of the class kept here get the rule ``migrated_regions`` decides, as the
        copies do, and are handed off under it like copies. The ones changed."""
        changed = []
        for oid in self.tombstones():
            loc = self._inv[oid]
            res = loc.policy.residency
            if res is None or res.data_class != new.name:
                continue
            target = migrated_regions(res.regions, new)
            if target is None:
                continue
            assert loc.tomb is not None
            self._settle(loc)
            loc.policy = ObjectPolicy(loc.policy.replicas, Residency(target, new.name))
            loc.rs_version = -1
            loc.moved = True
            loc.handed = False
            self._index(loc)
            self._outputs.append(TombstoneStored(oid, loc.policy, loc.tomb, moved=True))
            changed.append(oid)
        return changed

    def _kept_rule(self, policy: ObjectPolicy) -> ObjectPolicy:
        """The rule a received tombstone is kept under (see ``class_policies``)."""
        res = stored_rule(policy.residency, self.class_policies)
        return policy if res is policy.residency else ObjectPolicy(policy.replicas, res)

    def accepts(self, oid: str, written: HLCTimestamp | None) -> bool:
        """Whether a copy of ``oid`` written at ``written`` may be stored here (False: a
        live tombstone here is newer). Drivers ask before receiving bytes."""
        loc = self._inv.get(oid)
        return loc is None or loc.tomb is None or (written or ZERO_TS) > loc.tomb

    def delete(
        self, oid: str, policy: ObjectPolicy, ts: HLCTimestamp, now: float, wall: float,
        holders: Iterable[str] = (), req_id: int = 0,
    ) -> list[str]:
        """Delete ``oid`` everywhere as of ``ts`` (an HLC timestamp from the driver's clock,
        ``wall`` its wall time in seconds): drop the local copy, keep a tombstone, and push
        it at once to the replica set, to ``holders`` (nodes the driver found holding a
        copy) and to every peer known to hold one. Returns those peers. Nodes that miss
        the push learn it through anti-entropy. Raises ``ReplicationOverloaded`` at
        ``max_tombstones``. With ``req_id``, the delete is acknowledged (``DeleteAcked``)
        once ``delete_quorum(policy)`` nodes keep the tombstone durably, this one
        included (each counted when it answers the push, or when anti-entropy finds it
        keeping the tombstone: a member away for the push counts once it has it), or
        reported ``DeleteFailed`` after ``delete_timeout_s``."""
        self._wall = max(self._wall, wall)
        loc = self._inv.get(oid)
        if (loc is None or loc.tomb is None) and self._tomb_count >= self.config.max_tombstones:
            self._count("deletes_refused.overloaded")
            raise ReplicationOverloaded(
                f"{self._tomb_count} tombstones kept (max_tombstones="
                f"{self.config.max_tombstones})")
        if loc is not None:
            self._settle(loc)
        known = set(loc.confirmed) if loc is not None and loc.tomb is None else set()
        self._apply_tomb(oid, policy, ts, keep=True)
        self._count("deletes")
        try:
            rs = set(self._rs(oid, policy))
        except PlacementError:
            rs = set()
        peers = sorted((rs | known | set(holders)) & set(self._view) - {self.name})
        ref = self._inv.get(oid)
        msg_ref = _loc_ref(ref) if ref is not None and ref.tomb is not None else _ref(
            oid, policy, deleted=ts)
        if req_id:
            # Only replica-set members count: a coordinator outside the set hands its
            # tombstone off and forgets it (counting it lost a delete: swarm seed 672945568).
            d = _Delete(req_id, oid, delete_quorum(policy), now + self.config.delete_timeout_s,
                        {self.name} if self.name in rs else set(), ts)
            self._deletes[req_id] = d
            self._deletes_of.setdefault(oid, []).append(req_id)
            heapq.heappush(self._delete_deadlines, (d.deadline, req_id))
            self._check_delete(d)
        for p in peers:
            self._send(p, Tombstones([msg_ref], ack=req_id))
        self._pump(now)
        return peers

    def _check_delete(self, d: _Delete) -> None:
        if len(d.durable) >= d.w and self._deletes.pop(d.req_id, None) is not None:
            self._forget_delete(d)
            self._count("deletes_acked")
            self._outputs.append(DeleteAcked(d.req_id, d.oid, tuple(sorted(d.durable))))

    def _forget_delete(self, d: _Delete) -> None:
        ids = self._deletes_of.get(d.oid)
        if ids is not None and d.req_id in ids:
            ids.remove(d.req_id)
            if not ids:
                del self._deletes_of[d.oid]

    def _credit_deletes(self, oid: str, ts: HLCTimestamp, peer: str) -> None:
        """``peer`` confirmed through anti-entropy that it keeps the tombstone of ``oid``
        at ``ts`` (a digest match or an offer it kept: it holds it and is in the replica
        set under its own view, as a ``TombstoneAck`` with ``kept`` says): it counts
        toward every pending delete of ``oid`` at ``ts`` or before. Counting only the
        answers to the one push made at the delete reported unconfirmed a delete whose
        members were away for that push and got the tombstone from anti-entropy within
        the timeout, even one whose coordinator had handed its tombstone off to the
        full replica set (swarm seed 1362091350)."""
        for req_id in list(self._deletes_of.get(oid, ())):
            d = self._deletes.get(req_id)
            if d is not None and d.ts <= ts:
                d.durable.add(peer)
                self._check_delete(d)

    def tombstone_loaded(
        self, oid: str, policy: ObjectPolicy, ts: HLCTimestamp, *, moved: bool = False,
    ) -> None:
        """A tombstone the driver kept (``TombstoneStored``, with its ``moved``) is back
        after a restart."""
        self._apply_tomb(oid, policy, ts, keep=True, persist=False, moved=moved)

    def collect_tombstones(self, wall: float, now: float) -> int:
        """Forget tombstones whose grace period has passed at wall time ``wall``; returns
        how many. Drivers call it periodically (it is cheap when nothing expires)."""
        self._wall = max(self._wall, wall)
        heap = self._tomb_heap
        n = 0
        while heap and heap[0][0] <= wall:
            expiry, oid = heapq.heappop(heap)
            loc = self._inv.get(oid)
            if loc is None or loc.tomb is None or self._expiry(loc.tomb) != expiry:
                continue
            self._forget_tomb(loc)
            self._count("tombstones_expired")
            n += 1
        return n

    def _expiry(self, ts: HLCTimestamp) -> float:
        return ts.wall_ns / 1e9 + self.config.tombstone_grace_s

    def _forget_tomb(self, loc: _Local) -> None:
        assert loc.tomb is not None
        self._unindex(loc)
        del self._inv[loc.oid]
        self._tomb_count -= 1
        self._outputs.append(TombstoneDropped(loc.oid))

    def _apply_tomb(
        self, oid: str, policy: ObjectPolicy, ts: HLCTimestamp, *, keep: bool,
        persist: bool = True, moved: bool = False,
    ) -> str:
        """A tombstone for ``oid`` at ``ts`` arrived. Returns ``"older"`` (ours is newer),
        ``"superseded"`` (we hold a copy written after it), or ``"applied"``. A copy
        older than it is dropped; the tombstone is kept if ``keep`` (or to replace a
        dropped copy) and not expired. ``moved``: its rule is narrower than the one it
        came with (``_kept_rule``), so the tombstone is kept here as a moved one."""
        if self._expiry(ts) <= self._wall:
            self._count("tombstones_ignored.expired")
            return "older"
        loc = self._inv.get(oid)
        if loc is not None and loc.tomb is not None:
            if ts <= loc.tomb:
                if ts == loc.tomb and moved and not loc.moved:
                    self._settle(loc)
                    loc.moved = True
                    self._index(loc)
                    if persist:
                        self._outputs.append(TombstoneStored(oid, loc.policy, ts, moved=True))
                return "applied" if ts == loc.tomb else "older"
            self._undigest(loc)  # its share was XORed in with the old tombstone's hash
            loc.tomb = ts
            loc.moved = loc.moved or moved
            loc.confirmed = _NONE_CONFIRMED
            self._index(loc)
            heapq.heappush(self._tomb_heap, (self._expiry(ts), oid))
            if persist:
                self._outputs.append(TombstoneStored(oid, loc.policy, ts, moved=loc.moved))
            return "applied"
        if loc is not None:
            if loc.written > ts:
                return "superseded"
            if not loc.dropping:
                self._outputs.append(DropLocal(oid))
            self._count("copies_deleted")
            keep = True  # we held it: keep the tombstone so the copy does not come back
            self._unindex(loc)
            del self._inv[oid]
        if not keep:
            return "applied"
        if self._tomb_count >= self.config.max_tombstones:
            self._count("tombstones_shed")
            return "applied"
        new = _new_local(oid, self._share(policy), None, tomb=ts,
                         flags=_MOVED if moved else 0)
        self._inv.add(new)
        self._index(new)
        self._tomb_count += 1
        heapq.heappush(self._tomb_heap, (self._expiry(ts), oid))
        if persist:
            self._outputs.append(TombstoneStored(oid, policy, ts, moved=moved))
        return "applied"

    # ------------------------------------------------------------------ writes

    def check_put(self, policy: ObjectPolicy, w: int, *, allow_degraded: bool = True) -> None:
        """Refuse, from this manager's view, a put it cannot place whatever the object's
        id (``core.puts.check_feasible``; the refusal is worded for the client)."""
        check_feasible(self._view.values(), policy, w, allow_degraded=allow_degraded)

    def plan_put(self, oid: str, policy: ObjectPolicy, w: int, *,
                 early_copies: bool, allow_degraded: bool = True) -> PutPlan:
        """Plan the put of ``oid`` coordinated here, from this manager's view: the one
        ``begin_put`` works from, so the two cannot disagree about the write set (see
        ``core.puts``). Raises as ``core.puts.plan_put`` does."""
        me = self._view.get(self.name)
        if me is None:
            raise PlacementError("replicas", f"cannot place {oid!r}: no view yet")
        return plan_put(oid, self.name, me.region, self._view.values(), policy, w,
                        early_copies=early_copies, version=self._view_version,
                        allow_degraded=allow_degraded)

    def begin_put(self, req_id: int, oid: str, policy: ObjectPolicy, w: int, now: float,
                  written: HLCTimestamp | None = None, *, plan: PutPlan | None = None) -> None:
        """Coordinate a write of ``oid`` (whose bytes the driver holds) with quorum ``w``.

        ``plan``: the put's plan (``plan_put``, made earlier for the same ``oid``, policy
        and ``w``); its write set is used as it is, not computed again. Without one, the
        put is planned here. A planned target that left the view or filled since the plan
        (the view changed in between) is a failed transfer at once: a stand-in takes its
        copy, as for any target that fails.

        Raises ``PlacementError`` (rule ``residency`` or ``replicas``) when the live view
        cannot meet the policy, ``ValueError`` on a bad ``w``, a reused ``req_id`` or a
        plan of another put, and ``ReplicationOverloaded`` when too many writes are in
        flight. Otherwise emits one ``Transfer`` per replica-set member; ``PutAcked`` or
        ``PutFailed`` follows.
        """
        if req_id in self._puts:
            raise ValueError(f"write {req_id} is already in flight")
        if not 1 <= w <= policy.replicas:
            raise ValueError(f"write quorum W={w} must be between 1 and replicas={policy.replicas}")
        if plan is not None and (plan.oid, plan.policy, plan.w) != (oid, policy, w):
            raise ValueError(f"the plan of {plan.oid} ({plan.policy!r}, W={plan.w}) is not "
                             f"the put of {oid} ({policy!r}, W={w})")
        if len(self._puts) >= self.config.max_pending_puts:
            self._count("puts_refused.overloaded")
            raise ReplicationOverloaded(
                f"{len(self._puts)} writes in flight (max_pending_puts="
                f"{self.config.max_pending_puts})"
            )
        if plan is None:
            plan = self.plan_put(oid, policy, w, early_copies=False)
        # New copies go to the write set: a full node is never a target or a stand-in.
        allowed = [c for c in self._view.values() if policy.allows(c.region)]
        ranked = [c.name for c in sorted((c for c in allowed if not c.full),
                                         key=lambda c: (-hrw_score(oid, c.name), c.name))]
        targets = list(plan.targets)
        put = _Put(req_id, oid, policy, w, now + self.config.put_timeout_s, ranked,
                   set(targets), {t: None for t in targets}, written=written)
        self._puts[req_id] = put
        heapq.heappush(self._put_deadlines, (put.deadline, req_id))
        self._count("puts")
        unfit = [] if plan.view == self._view_version else [
            t for t in targets if t not in self._view or self._view[t].full]
        if unfit:
            self._count("put_targets_gone")
        for t in targets:
            if t not in unfit:
                self._transfer(t, oid, req_id, policy, None, written)
        for t in unfit:
            self.transfer_done(req_id, t, oid, False, now)

    def transfer_done(
        self, req_id: int | None, dst: str, oid: str, ok: bool, now: float
    ) -> None:
        """The driver finished a ``Transfer``: ``ok`` means ``dst`` holds a durable copy."""
        if req_id is None:
            if self._inflight.pop((dst, oid), None) is None:
                return
            self._count("repairs_done" if ok else "repairs_failed")
            self._pump(now)
            return
        put = self._puts.get(req_id)
        if put is None or put.oid != oid or dst not in put.outstanding:
            return  # acknowledged, failed or timed out already
        stands_for = put.outstanding.pop(dst)
        if ok:
            if dst not in put.durable:
                put.durable.append(dst)
            if len(put.durable) >= put.w:
                del self._puts[req_id]
                self._count("puts_acked")
                self._outputs.append(PutAcked(req_id, oid, tuple(put.durable)))
            return
        self._count("put_transfers_failed")
        target = stands_for if stands_for is not None else dst
        holder = self._next_stand_in(put)
        if holder is not None:
            put.tried.add(holder)
            put.stand_ins += 1
            put.outstanding[holder] = target
            self._count("hints_sent")
            self._transfer(holder, oid, req_id, put.policy, target, put.written)
            return
        if len(put.durable) + len(put.outstanding) < put.w:
            del self._puts[req_id]
            self._fail(put, f"only {len(put.durable)} of W={put.w} copies durable and no "
                            f"other node allowed by {_describe(put.policy)} left to try")

    def _next_stand_in(self, put: _Put) -> str | None:
        if put.stand_ins >= self.config.max_stand_ins:
            return None
        for name in put.ranked:
            if name not in put.tried and name in self._view and not self._view[name].full:
                return name
        return None

    def _fail(self, put: _Put, reason: str) -> None:
        self._count("puts_failed")
        self._outputs.append(PutFailed(put.req_id, put.oid, reason))

    # ------------------------------------------------------------------ reads

    def read_sources(self, oid: str, policy: ObjectPolicy, now: float) -> list[str]:
        """Where to read ``oid``: this node first if it holds a copy, then the replica set
        in order, members known to hold it first; then other known holders. Raises
        ``PlacementError`` when no live node is allowed to hold it."""
        chosen = [c.name for c in replica_set(oid, self._view.values(), policy.replicas,
                                              policy.residency)]
        loc = self._inv.get(oid)
        if loc is not None and loc.tomb is not None:
            loc = None
        if loc is not None:
            self._settle(loc)
        known = set(loc.confirmed) if loc is not None else set()
        out: list[str] = [self.name] if loc is not None else []
        out += [n for n in chosen if n in known and n not in out]
        out += [n for n in chosen if n not in out]
        out += [n for n in sorted(known) if n not in out and n in self._view]
        return out

    # ------------------------------------------------------------------ messages

    def handle_message(self, src: str, payload: bytes, now: float) -> None:
        try:
            msg = decode_message(payload, self.config.max_message_bytes)
        except WireError as exc:
            self._count("rejected." + exc.reason)
            return
        if src == self.name:
            self._count("rejected.self")
            return
        if isinstance(msg, DigestMsg):
            self._on_digest(src, msg, now)
        elif isinstance(msg, DigestReply):
            self._on_digest_reply(src, msg, now)
        elif isinstance(msg, Offer):
            self._on_offer(src, msg, now)
        elif isinstance(msg, Tombstones):
            self._on_tombstones(src, msg)
        elif isinstance(msg, TombstoneAck):
            d = self._deletes.get(msg.ack)
            if d is not None and msg.kept:
                d.durable.add(src)
                self._check_delete(d)
        else:
            self._on_offer_reply(src, msg, now)
        self._pump(now)

    def _send(self, dst: str, msg: ReplicationMessage) -> None:
        self._count("messages_out")
        self._outputs.append(SendMessage(dst, encode_message(msg)))

    def _on_digest(self, src: str, msg: DigestMsg, now: float) -> None:
        if self._rebuilding is not None:
            # Half of our side may still be indexed under the old view: no answer (a
            # mismatch would have the sender list its pair set for nothing). Once rebuilt,
            # this node syncs with everyone (``set_view`` prompted them).
            self._count("digests_unanswered.rebuilding")
            self._prompt([src], now)
            return
        count, h = self._pair_digest(src)
        match = count == msg.count and h == msg.digest
        self._send(src, DigestReply(msg.round, match))
        if not match and src in self._view:
            # We may hold something the sender lacks: check from our side soon, unless we
            # did lately (two nodes whose views differ would otherwise ping-pong).
            mine = self._rounds.get(src)
            if mine is None or mine.started + self.config.sync_interval_s / 4 <= now:
                self._prompt([src], now)

    def _on_digest_reply(self, src: str, msg: DigestReply, now: float) -> None:
        st = self._rounds.get(src)
        if st is None or st.round != msg.round:
            return
        if msg.match:
            if st.view != self._view_version:
                return  # the pair set it covered moved since: the next round confirms
            # Every entry of the pair set unchanged since the round started is confirmed
            # by src now, without touching it (``_settle`` applies it when it is read or
            # changes): an idle round costs O(peers), not O(objects).
            self._matched[src] = (now, st.seq)
            for held in [self._inv[o] for o in self._handoff if src in self._inv[o].no_room]:
                if src in held.dg and held.seq <= st.seq:
                    self._settle(held)
                    del held.no_room[src]
                    self._index(held)
            for oid, sent in st.pair_tombs.items():
                got = self._inv.get(oid)
                if got is not None and got.tomb is not None:
                    self._credit_deletes(oid, sent, src)
            return
        self._count("digest_mismatches")
        if self._rebuilding is not None:
            # A round of an older view (none starts during a rebuild): its pair set is
            # half rebuilt. The round that follows the rebuild lists it if need be.
            return
        # The pair set is listed only now, on a mismatch; unconfirmed first: they are the
        # likely difference.
        # Only the first ``_offer`` takes are listed (nsmallest is sorted()[:n]): an id
        # string per entry of the pair set, held at once, was a high-water mark of
        # ~200 B per copy (issue #24); the pair set is walked, not listed (a list would
        # hold each entry as a ``_Local``, not packed).
        first = heapq.nsmallest(self._offer_budget(st), self._pair_keys(src))
        self._offer(src, st, [oid for _, oid in first])

    def _pair_keys(self, src: str) -> Iterator[tuple[bool, str]]:
        """For each entry of the pair set with ``src``, in the inventory's order: (``src``
        confirmed it, its id), settled (``_settle``). A packed entry is not made a
        ``_Local``: what settling makes of it depends only on its shape, settled once (a
        copy of it, not written back: each reader settles again)."""
        inv = self._inv
        of_shape: dict[int, bool | None] = {}
        for p, s, loc in inv.walk():
            if loc is not None:
                if src in loc.dg:
                    self._settle(loc)
                    yield src in loc.confirmed, loc.oid
                continue
            if s in of_shape:
                c = of_shape[s]
            else:
                like = inv.shape_entry(s)
                c = None
                if src in like.dg:
                    self._settle(like)
                    c = src in like.confirmed
                of_shape[s] = c
            if c is not None:
                yield c, inv.oid_at(p)

    def _stamp(self, s: str | None) -> HLCTimestamp | None:
        if s is None:
            return None
        try:
            return HLCTimestamp.decode(s)
        except ValueError:
            self._count("rejected.bad_stamp")
            return None

    def _mine(self, oid: str, policy: ObjectPolicy) -> bool:
        try:
            return self.name in self._rs(oid, policy)
        except PlacementError:
            return False

    def _on_tombstones(self, src: str, msg: Tombstones) -> None:
        kept = False
        for ref in msg.refs:
            ts = self._stamp(ref.deleted)
            if ts is None:
                continue
            policy = ref.policy()
            rule = self._kept_rule(policy)
            # Kept by the sender's replica set (the delete counts it) and by the class's.
            keep = self._mine(ref.oid, policy) or (rule is not policy
                                                   and self._mine(ref.oid, rule))
            self._apply_tomb(ref.oid, rule, ts, keep=keep, moved=rule is not policy)
            kept = kept or keep
        if msg.ack:
            self._send(src, TombstoneAck(msg.ack, kept))

    def _on_offer(self, src: str, msg: Offer, now: float) -> None:
        missing: list[str] = []
        not_mine: list[str] = []
        deleted: list[ObjRef] = []
        superseded: list[str] = []
        no_room: list[str] = []
        here = self._view.get(self.name)
        full_here = here is not None and here.full
        for ref in msg.refs:
            policy = ref.policy()
            tomb = self._stamp(ref.deleted)
            if ref.deleted is not None and tomb is None:
                continue  # a bad stamp: ignore the ref (the sender retries next round)
            if tomb is not None:
                # Applied even where we may not hold the object: an older copy must go.
                rule = self._kept_rule(policy)
                outcome = self._apply_tomb(ref.oid, rule, tomb, keep=self._mine(ref.oid, policy)
                                           or (rule is not policy and self._mine(ref.oid, rule)),
                                           moved=rule is not policy)
                if outcome == "superseded":
                    superseded.append(ref.oid)
                    continue
                if outcome == "older":
                    loc = self._inv.get(ref.oid)
                    if loc is not None and loc.tomb is not None:
                        deleted.append(_loc_ref(loc))
                        continue
            if here is None or not policy.allows(here.region):
                self._count("offers_refused.residency")
                not_mine.append(ref.oid)
                continue
            try:
                rs = self._rs(ref.oid, policy)
            except PlacementError:
                not_mine.append(ref.oid)
                continue
            mine = self.name in rs
            # A stand-in (in the write set, outside the replica set: a full member's
            # place) wants the copy and keeps it; a full member does not take it.
            stand_in = (tomb is None and not mine and self._any_full
                        and self.name in self._ws(ref.oid, policy))
            loc = self._inv.get(ref.oid)
            if tomb is None and loc is not None and src in loc.no_room:
                self._set_no_room(loc, src, None)  # the sender offers a copy: it holds one
            if tomb is None and loc is not None and loc.tomb is not None:
                written = self._stamp(ref.written) or ZERO_TS
                if written <= loc.tomb:
                    deleted.append(_loc_ref(loc))  # the offered copy is deleted
                    continue
                self._forget_tomb(loc)  # the bytes were put again after the delete
                self._count("tombstones_superseded")
                loc = None
            lacking = tomb is None and (loc is None or loc.dropping)
            if not mine and not stand_in:
                not_mine.append(ref.oid)
            elif lacking and mine and full_here:
                self._count("offers_declined.no_room")
                no_room.append(ref.oid)
            elif lacking:
                missing.append(ref.oid)
        self._send(src, OfferReply(msg.round, msg.page, missing, not_mine, deleted, superseded,
                                   no_room))

    def _on_offer_reply(self, src: str, msg: OfferReply, now: float) -> None:
        st = self._rounds.get(src)
        if st is None or st.round != msg.round:
            return
        ids = st.pages.pop(msg.page, None)
        if ids is None:
            return
        missing = set(msg.missing)
        not_mine = set(msg.not_mine)
        no_room = set(msg.no_room)
        answered = set(ids)
        for ref in msg.deleted:
            ts = self._stamp(ref.deleted)
            if ts is not None and ref.oid in answered:
                stated = ref.policy()
                rule = self._kept_rule(stated)
                self._apply_tomb(ref.oid, rule, ts, keep=True, moved=rule is not stated)
                answered.discard(ref.oid)
        for oid in msg.superseded:
            loc = self._inv.get(oid)
            if oid in answered and loc is not None and loc.tomb is not None:
                # A newer write of the same bytes exists: our tombstone no longer applies,
                # and the peer's next offer brings the copy if we should hold it.
                self._forget_tomb(loc)
                self._count("tombstones_superseded")
                answered.discard(oid)
        for oid in ids:
            loc = self._inv.get(oid)
            if loc is None or loc.dropping or oid not in answered:
                continue
            if oid in missing and loc.tomb is None:
                self._set_no_room(loc, src, None)
                self._queue_repair(src, oid, loc)
            elif oid in no_room and loc.tomb is None:
                self._unconfirm(loc, src)
                if src not in loc.no_room:
                    self._set_no_room(loc, src, now)
                    # Its stand-in should have a copy: ask it soon, not next period.
                    self._prompt(self._stand_ins(loc), now)
            elif oid in not_mine:
                self._unconfirm(loc, src)
            else:
                self._set_confirmed(loc, {**loc.confirmed, src: now})
                self._set_no_room(loc, src, None)
                sent = st.tombs.get(oid)
                if sent is not None and loc.tomb is not None:
                    self._credit_deletes(oid, sent, src)
        self._check_drops(now, ids)

    # ------------------------------------------------------------------ anti-entropy

    def _prompt(self, peers: Iterable[str], now: float) -> None:
        new = [p for p in peers if p != self.name and p in self._view]
        if not new:
            return
        self._prompt_peers.update(new)
        at = now + self.config.view_change_delay_s
        if self._prompt_at is None or at < self._prompt_at:
            self._prompt_at = at

    def _periodic_round(self, now: float) -> None:
        self._prompt_at = None
        self._prompt_peers.clear()
        peers = self._peers
        if not peers:
            return
        k = min(len(peers), self.config.max_peers_per_round)
        start = self._peer_cursor % len(peers)
        chosen = [peers[(start + i) % len(peers)] for i in range(k)]
        self._peer_cursor = start + k
        self._sync(chosen, now)
        self._check_drops(now)

    def _sync(self, peers: list[str], now: float) -> None:
        """Start a digest round with each peer: pair set by digest, handoffs by offer.
        Costs O(peers + handoff entries): the digests are kept as entries change."""
        if not peers:
            return
        if self.config.self_check:
            self._verify()
        wanted = set(peers)
        handoff: dict[str, list[str]] = {p: [] for p in peers}
        for oid in sorted(map(_oid, self._handoff)):
            loc = self._inv[oid]
            self._settle(loc)
            rs = self._rs_of_local(loc)
            if self.name not in rs:
                # A copy held outside the set for a full member that lacks it (a
                # stand-in's) stays until that member has room: meanwhile, members that
                # confirmed it since the last view change are not asked again every round.
                waiting = any(self._declined(loc, q) for q in rs)
                for p in rs:
                    if p in wanted and not self._declined(loc, p):
                        if waiting and loc.confirmed.get(p, float("-inf")) >= self._view_since:
                            continue
                        handoff[p].append(oid)
            for p in self._stand_ins(loc):
                if p in wanted and p not in loc.confirmed:
                    handoff[p].append(oid)
        for p in peers:
            count = self._dg_count.get(p, 0)
            if not count and not handoff[p]:
                continue
            self._round_seq += 1
            st = _PeerRound(self._round_seq, now, self._view_version, self._seq)
            self._seq += 1  # entries changed from now on are not covered by this round
            self._rounds[p] = st
            self._count("sync_rounds")
            if count:
                for oid in self._deletes_of:
                    tomb = self._inv.get(oid)
                    if tomb is not None and tomb.tomb is not None and p in tomb.dg:
                        st.pair_tombs[oid] = tomb.tomb
                _, h = self._pair_digest(p)
                self._send(p, DigestMsg(st.round, count, h))
            if handoff[p]:
                self._offer(p, st, handoff[p])

    def _offer_budget(self, st: _PeerRound) -> int:
        """How many more ids ``st``'s round may offer (``max_ids_per_round``)."""
        return max(0, self.config.max_ids_per_round - sum(len(v) for v in st.pages.values()))

    def _offer(self, peer: str, st: _PeerRound, oids: list[str]) -> None:
        # A round's ids were listed when it started; a copy dropped or deleted since has no
        # inventory entry to offer (indexing it raised KeyError out of the digest reply).
        oids = [o for o in oids if o in self._inv][: self._offer_budget(st)]
        size = self.config.page_size
        for i in range(0, len(oids), size):
            chunk = oids[i : i + size]
            page = st.next_page
            st.next_page += 1
            st.pages[page] = chunk
            refs = [_loc_ref(self._inv[o]) for o in chunk]
            for o in chunk:
                tomb = self._inv[o].tomb
                if tomb is not None:
                    st.tombs[o] = tomb
            self._count("offer_pages")
            self._send(peer, Offer(st.round, page, refs))

    def _pair_digest(self, peer: str) -> tuple[int, bytes]:
        """Count and XOR of what this node holds that both it and ``peer`` should hold."""
        return self._dg_count.get(peer, 0), self._dg_acc.get(peer, 0).to_bytes(16, "big")

    # ------------------------------------------------------------------ incremental digests

    def _pair_peers(self, loc: _Local) -> tuple[str, ...]:
        """The nodes whose pair digest with this one holds ``loc`` (this node may be named:
        it is skipped): the replica set, if this node is in it, less members that declined
        the copy (``_declined``)."""
        if loc.dropping:
            return ()
        rs = self._rs_of_local(loc)
        if self.name not in rs:
            return ()
        if loc.no_room and self._any_full and any(self._declined(loc, p) for p in rs):
            return tuple(p for p in rs if not self._declined(loc, p))
        return rs

    def _in_handoff(self, loc: _Local) -> bool:
        if loc.dropping or loc.handed or not self._rs_of_local(loc):
            return False
        return bool(loc.no_room) or self.name not in loc.rs

    def _index(self, loc: _Local, *, seq: int | None = None) -> None:
        """``loc`` (in the inventory) changed: move its share of the pair digests and its
        handoff membership to its new state. Call ``_settle`` before changing it."""
        loc.seq = self._seq if seq is None else seq
        new = self._pair_peers(loc)
        if new is not loc.dg:
            count, acc, me = self._dg_count, self._dg_acc, self.name
            h = _entry_hash(loc)
            self._undigest(loc, h)
            for p in new:
                if p != me:
                    count[p] = count.get(p, 0) + 1
                    acc[p] = acc.get(p, 0) ^ h
            loc.dg = new
        if self._in_handoff(loc):
            self._handoff.add(loc.key)
        else:
            self._handoff.discard(loc.key)

    def _undigest(self, loc: _Local, h: int | None = None) -> None:
        """Take ``loc``'s share out of the pair digests (before its hash changes); ``h``:
        its hash, if the caller has it."""
        if loc.dg:
            count, acc, me = self._dg_count, self._dg_acc, self.name
            if h is None:
                h = _entry_hash(loc)
            for p in loc.dg:
                if p != me:
                    count[p] -= 1
                    acc[p] ^= h
            loc.dg = ()

    def _unindex(self, loc: _Local) -> None:
        """``loc`` leaves the inventory."""
        self._undigest(loc)
        self._handoff.discard(loc.key)
        if loc.under:
            loc.under = False
            self._under -= 1

    def _rebuild_slice(self, now: float) -> None:
        """The next slice of the view change's rebuild: for each entry of it, the digest
        matches and departures since it was last indexed (``_settle``), then its replica
        set: an entry whose cached sets ``unmoved`` keeps (see ``_unmoved``) is carried
        over to the new view without placing it again; the others are placed again (and
        their count of live replicas checked). Either way it is re-indexed: its share of
        the pair digests and its handoff membership follow its sets. Cheap for an entry
        that stays."""
        rb = self._rebuilding
        assert rb is not None
        end = min(len(rb.oids), rb.pos + self.config.rebuild_slice_entries)
        version = self._view_version
        old = version - 1
        unmoved = rb.unmoved
        gone = self._gone
        inv = self._inv
        moved: list[tuple[str, _Local]] = []
        for i in range(rb.pos, end):
            loc = inv.get(rb.oids[i])
            if loc is None:
                continue  # gone since the view changed
            self._settle(loc)
            if gone:
                # Repair priority: a member of its set (as last placed) left.
                for r, t in gone.items():
                    if r in loc.rs and t > loc.failed_at:
                        loc.failed_at = t
            if (unmoved is not None and i >= rb.forced and loc.rs_version == old
                    and unmoved(loc)):
                loc.rs_version = version
            else:
                moved.append((loc.oid, loc))
            loc.handed = False  # a moved tombstone is offered to its (new) set again
            # Later than any digest match pending from before the view change: a match
            # of an older pair set must not cover it once it is indexed for the new one.
            self._index(loc)
        rb.pos = end
        # Only an entry whose replica set moved can change its count of live replicas.
        moved.sort(key=_first)  # by id (ids are unique)
        for oid, loc in moved:
            if loc.tomb is None:
                self._check_under(oid, loc)
        # The slice's entries back in their packed form (else up to two slices of them
        # stay _Local until enough other entries are read; the last one read is held).
        moved.clear()
        inv.pack()
        if rb.pos < len(rb.oids):
            rb.at = now + self.config.rebuild_slice_pause_s
            self._count("rebuild_slices")
            return
        self._rebuilding = None
        self._stale = {}
        self._gone = {}
        for p in [p for p, n in self._dg_count.items() if not n and p not in self._view]:
            del self._dg_count[p]
            self._dg_acc.pop(p, None)
        if self.config.self_check:
            self._verify()

    def _settle(self, loc: _Local) -> None:
        """Write into ``loc.confirmed`` the digest matches that cover it (see
        ``_on_digest_reply``), and while a view change's rebuild is under way, forget
        what departed nodes said of it. Idempotent; call it before reading ``confirmed``
        or changing ``loc``."""
        if self._rebuilding is not None:
            if self._stale and loc.dg:
                self._apply_matches(loc, self._stale)
            gone = self._gone
            if gone:
                if loc.confirmed and not gone.keys().isdisjoint(loc.confirmed):
                    self._set_confirmed(loc, {p: t for p, t in loc.confirmed.items()
                                              if p not in gone})
                if loc.no_room is not _NO_ROOM:
                    for r in gone:
                        loc.no_room.pop(r, None)
        if self._matched and loc.dg:
            self._apply_matches(loc, self._matched)

    def _apply_matches(self, loc: _Local, matched: Mapping[str, tuple[float, int]]) -> None:
        new: dict[str, float] | None = None
        for p in loc.dg:
            m = matched.get(p)
            if (m is not None and loc.seq <= m[1] and p != self.name
                    and loc.confirmed.get(p, float("-inf")) < m[0]):
                if new is None:
                    new = dict(loc.confirmed)
                new[p] = m[0]
        if new is not None:
            self._set_confirmed(loc, new)

    def _set_confirmed(self, loc: _Local, confirmed: dict[str, float]) -> None:
        """Give ``loc`` the confirmations ``confirmed`` (a new dict, not to be changed
        after), or the equal one another entry already holds: entries share them (after a
        digest match, every entry of a pair set has the same ones), so each is a value,
        never changed in place (a change makes a new one)."""
        if not confirmed:
            loc.confirmed = _NONE_CONFIRMED
            return
        table = self._confirmations
        key = tuple(confirmed.items())
        got = table.get(key)
        if got is None:
            if len(table) >= SHARED_VALUES_MAX:
                table.clear()  # older ones stay shared by their entries, no longer found
            table[key] = got = confirmed
        loc.confirmed = got

    def _set_no_room(self, loc: _Local, peer: str, at: float | None) -> None:
        """``peer`` declined ``loc`` for want of room at ``at`` (None: it no longer does)."""
        if at is None and peer not in loc.no_room:
            return
        self._settle(loc)
        if at is None:
            del loc.no_room[peer]
            if not loc.no_room:
                loc.no_room = _NO_ROOM
        else:
            if loc.no_room is _NO_ROOM:
                loc.no_room = {}
            loc.no_room[peer] = at
        self._index(loc)

    def _unconfirm(self, loc: _Local, peer: str) -> None:
        """``peer`` does not keep ``loc``: forget its confirmation, a digest match's too."""
        self._settle(loc)
        if peer in loc.confirmed:
            self._set_confirmed(loc, {p: t for p, t in loc.confirmed.items() if p != peer})
        if peer in loc.dg:
            self._index(loc)  # later than any match that covered it

    def _verify(self) -> None:
        """``ReplicationConfig.self_check``: the kept digests and handoff set against a
        full recomputation; raises ``DigestDrift`` on a difference."""
        count: dict[str, int] = {}
        acc: dict[str, int] = {}
        handoff = set()
        for loc in self._inv.values():
            for p in self._pair_peers(loc):
                if p != self.name:
                    count[p] = count.get(p, 0) + 1
                    acc[p] = acc.get(p, 0) ^ _entry_hash(loc)
            if self._in_handoff(loc):
                handoff.add(loc.key)
        for p in sorted(set(count) | set(self._dg_count)):
            want = (count.get(p, 0), acc.get(p, 0))
            have = (self._dg_count.get(p, 0), self._dg_acc.get(p, 0))
            if want != have:
                raise DigestDrift(f"{self.name}: pair digest with {p} is {have[0]} ids "
                                  f"{have[1]:032x}, recomputed {want[0]} ids {want[1]:032x}")
        if handoff != self._handoff:
            raise DigestDrift(f"{self.name}: handoff set differs from a recomputation: "
                              f"{sorted(map(_oid, handoff ^ self._handoff))[:5]}")
        if _NO_ROOM:
            raise DigestDrift(f"{self.name}: the shared empty no_room was written to")
        if _NONE_CONFIRMED:
            raise DigestDrift(f"{self.name}: the shared empty confirmed was written to")
        for key, confirmed in self._confirmations.items():
            if tuple(confirmed.items()) != key:
                raise DigestDrift(f"{self.name}: shared confirmations were changed in place")

    def _check_drops(self, now: float, oids: Iterable[str] | None = None) -> None:
        """Drop copies this node holds outside the replica set once every member keeps one
        (all of them: the handoff set, or only ``oids``: those whose confirmations just
        changed)."""
        busy = {p.oid for p in self._puts.values()}
        for oid in sorted(map(_oid, self._handoff)) if oids is None else oids:
            loc = self._inv.get(oid)
            if loc is None or loc.dropping:
                continue
            rs = self._rs_of_local(loc)
            if not rs or self.name in rs:
                continue
            if oid in busy:
                continue  # a write of it is in flight from here: keep the bytes around
            if all(loc.confirmed.get(p, float("-inf")) >= self._view_since for p in rs):
                if loc.tomb is not None:
                    if len(rs) < loc.policy.replicas:
                        # A short set (members down, none allowed to replace them) is all
                        # that would keep it: R-1 failures among them would lose the delete
                        # and a returning holder's copy would come back (swarm seed 2115).
                        # Keep ours, still offered to them each round, until the set is full.
                        continue
                    if loc.moved:
                        # Its rule moved it away from here, where copies that missed the
                        # change still look for it: kept (not offered again) until it
                        # expires.
                        loc.handed = True
                        self._index(loc)
                        self._count("tombstones_kept.moved")
                        continue
                    # Every member of a full set keeps the tombstone: a non-member need not.
                    self._forget_tomb(loc)
                    self._count("tombstones_handed_off")
                    continue
                loc.dropping = True
                self._index(loc)
                self._count("drops")
                self._outputs.append(DropLocal(oid))

    # ------------------------------------------------------------------ repair queue

    def _queue_repair(self, dst: str, oid: str, loc: _Local) -> None:
        key = (dst, oid)
        if key in self._repair_queued or key in self._inflight:
            return
        if len(self._repair_queued) >= self.config.max_repair_queue:
            self._count("repairs_shed")
            return
        self._settle(loc)
        prio = (len(loc.confirmed), -loc.failed_at, oid, dst)
        heapq.heappush(self._repair_heap, (prio, dst, oid))
        self._repair_queued.add(key)

    def set_foreground_busy(self, busy: bool, now: float) -> None:
        """The driver says whether this node runs foreground work (tasks) now. Busy, and
        for ``foreground_quiet_s`` after, repair transfers are limited (see
        ``max_concurrent_transfers_busy``); the end of the quiet period is a deadline, at
        which the queued ones start up to ``max_concurrent_transfers``."""
        if busy:
            self._busy = True
        elif self._busy:
            self._busy = False
            self._quiet_at = now + self.config.foreground_quiet_s
            self._pump(now)

    def throttled(self, now: float) -> bool:
        """Whether repair transfers are limited now (busy, or within the quiet period)."""
        return self._busy or now < self._quiet_at

    def repair_delay_s(self, nbytes: int, now: float) -> float:
        """Seconds a repair or handoff copy waits before sending its next ``nbytes``:
        0 unless throttled (then ``repair_busy_bytes_per_s``). The driver asks before each
        chunk of a transfer it reports with ``req_id`` None."""
        rate = self._repair_rate
        if rate is None or not self.throttled(now):
            return 0.0
        return rate.take(now, nbytes)

    def _pump(self, now: float) -> None:
        heap = self._repair_heap
        if self.throttled(now):
            limit = self.config.max_concurrent_transfers_busy
        else:
            limit = self.config.max_concurrent_transfers
            self._quiet_at = -math.inf  # over: no deadline for it any more
        while heap and len(self._inflight) < limit:
            _, dst, oid = heapq.heappop(heap)
            self._repair_queued.discard((dst, oid))
            loc = self._inv.get(oid)
            if loc is None or loc.dropping or loc.tomb is not None or dst not in self._view:
                continue
            if self._view[dst].full:
                self._count("repairs_skipped.full")  # it filled since it asked
                continue
            if dst not in self._rs_of_local(loc) and dst not in self._stand_ins(loc):
                continue
            if (dst, oid) in self._inflight:
                continue
            self._inflight[(dst, oid)] = now
            self._count("repairs_started")
            self._transfer(dst, oid, None, loc.policy, None, loc.written)

    def _transfer(
        self, dst: str, oid: str, req_id: int | None, policy: ObjectPolicy, hint_for: str | None,
        written: HLCTimestamp | None = None,
    ) -> None:
        node = self._view.get(dst)
        assert node is not None, f"transfer of {oid} to {dst}, which is not in the view"
        # The residency invariant: no copy ever goes to a region the policy disallows.
        assert policy.allows(node.region), f"residency: {oid} must not go to {node.region}"
        # New copies go only where there is room (the view says so; a stale view is
        # answered with a refusal, and the write's stand-in logic takes over).
        assert not node.full, f"transfer of {oid} to {dst}, which is full"
        self._outputs.append(Transfer(dst, oid, req_id, policy, hint_for,
                                      None if written == ZERO_TS else written))

    # ------------------------------------------------------------------ placement cache

    def _placement(self) -> Placer:
        """Placement under the current view (one ``Placer`` per view)."""
        placer = self._placer
        if placer is None:
            placer = self._placer = Placer(self._view.values())
        return placer

    def _rs(self, oid: str, policy: ObjectPolicy) -> tuple[str, ...]:
        return self._share(self._placement().replica_set(oid, policy.replicas,
                                                         policy.residency))

    def _ws(self, oid: str, policy: ObjectPolicy) -> tuple[str, ...]:
        """The write set (``placement.write_set``); empty when no allowed node has room."""
        if not self._any_full:
            try:
                return self._rs(oid, policy)
            except PlacementError:
                return ()
        try:
            return self._share(self._placement().write_set(oid, policy.replicas,
                                                           policy.residency))
        except PlacementError:
            return ()

    def _rs_of_local(self, loc: _Local) -> tuple[str, ...]:
        """The replica set of a local object under the current view (cached per view);
        empty when no live node is allowed to hold it."""
        if loc.rs_version != self._view_version:
            try:
                loc.rs = self._rs(loc.oid, loc.policy) if self._view else ()
            except PlacementError:
                loc.rs = ()
            loc.ws = self._ws(loc.oid, loc.policy) if self._any_full and loc.rs else loc.rs
            loc.rs_version = self._view_version
        return loc.rs

    def _declined(self, loc: _Local, peer: str) -> bool:
        """``peer`` is full and said it lacks this copy: neither digested nor offered to it
        until it has room (or offers the copy itself)."""
        if peer not in loc.no_room:
            return False
        node = self._view.get(peer)
        return node is not None and node.full

    def _stand_ins(self, loc: _Local) -> tuple[str, ...]:
        """Nodes that should hold a copy in place of full members of the replica set that
        said they lack it: as many as there are such members, taken in write-set order
        from the write set's nodes outside the replica set (the nodes that replaced full
        ones). Empty when no full member lacks it, or no node with room is left."""
        if not self._any_full or not loc.no_room or loc.tomb is not None:
            return ()
        rs = self._rs_of_local(loc)
        lacking = sum(1 for p in rs if self._declined(loc, p))
        if not lacking:
            return ()
        chosen = [n for n in loc.ws if n not in rs][:lacking]
        return tuple(n for n in chosen if n != self.name)

    def _check_under(self, oid: str, loc: _Local) -> None:
        rs = self._rs_of_local(loc)
        under = len(rs) < loc.policy.replicas
        if under and not loc.under:
            self._outputs.append(UnderReplicated(oid, len(rs), loc.policy.replicas))
        self._under += under - loc.under
        loc.under = under

    # ------------------------------------------------------------------ misc

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1


def _describe(policy: ObjectPolicy) -> str:
    return policy.residency.describe() if policy.residency is not None else "the policy"
