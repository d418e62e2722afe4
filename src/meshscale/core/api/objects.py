"""The data plane's methods: objects (``obj.*``), replica transfers between nodes
(``obj.rw_*``, ``obj.read_local``, ``obj.local_*``), the replication protocol's messages
(``repl.msg``), the replicated KV (``kv.*``) and the plane's counters (``dp.stats``).

A client put is ``obj.put_begin`` / ``obj.put_chunk``... / ``obj.put_end`` (or one
``obj.put_small``); a node copies an object to another with ``obj.rw_begin`` /
``obj.rw_chunk``... / ``obj.rw_end`` (or one ``obj.rw_small``), the receiver committing
only bytes that hash to the id the header names. Served by ``runtime/data/``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from meshscale.core.api.contract import Empty, Method, Request, ResidencyWire
from meshscale.core.kv import MAX_EXPECTED, MAX_KEY_BYTES, MAX_VALUE_BYTES

__all__ = [
    "CORRUPT_LOCAL",
    "DELETE",
    "DP_STATS",
    "KV_APPLY",
    "KV_APPLY_BATCH",
    "KV_DELETE",
    "KV_GET",
    "KV_LIST",
    "KV_PUT",
    "KV_PUT_BATCH",
    "KV_READ",
    "KV_SCAN",
    "KV_VERSIONS",
    "LIST",
    "LOCAL_LIST",
    "LOCAL_STAT",
    "METHODS",
    "PUT_ABORT",
    "PUT_BEGIN",
    "PUT_CHUNK",
    "PUT_END",
    "PUT_SMALL",
    "READ",
    "READ_LOCAL",
    "REPL_MSG",
    "RW_BEGIN",
    "RW_CHUNK",
    "RW_END",
    "RW_SMALL",
    "STAT",
    "ChunkReply",
    "CorruptReply",
    "DataPlaneStats",
    "DeleteReply",
    "Done",
    "Holder",
    "KvApplyBatchReply",
    "KvApplyBatchRequest",
    "KvApplyItem",
    "KvApplyRequest",
    "KvEntry",
    "KvItemResult",
    "KvKeyRequest",
    "KvListRequest",
    "KvPage",
    "KvPutBatchReply",
    "KvPutBatchRequest",
    "KvPutItem",
    "KvPutRequest",
    "KvReadRequest",
    "KvRecordWire",
    "KvValue",
    "KvWriteReply",
    "ListRequest",
    "ListedObject",
    "LocalObject",
    "ObjectDesc",
    "ObjectIdRequest",
    "ObjectPage",
    "ObjectStat",
    "PutBeginReply",
    "PutBeginRequest",
    "PutChunkRequest",
    "PutReply",
    "PutSmallRequest",
    "ReadReply",
    "ReadRequest",
    "ReplMsgRequest",
    "ReplicaHeader",
    "ReplicaSmallRequest",
    "RwBeginReply",
    "StoredReply",
    "UploadRequest",
]

MAX_REPLICAS = 64
"""Largest replication factor a request may name (a node may set a lower bound)."""
MAX_OBJECT_BYTES = 1 << 50
MAX_CHUNK_BYTES = 32 * 1024 * 1024
"""Largest chunk of one put, transfer or read call (a node's own bound is lower)."""
MAX_LIST_PAGE = 10_000
"""Objects one listing page may ask for."""
MAX_NAME_LENGTH = 256
"""A node's name, an upload's handle."""
MAX_HINT_TARGETS = 64
"""Replicas one KV stand-in may be told it stands in for."""
MAX_TS_LENGTH = 512
"""An encoded HLC timestamp."""
MAX_KV_LIST_PAGE = 1000
"""Keys one ``kv.list`` (or ``kv.scan``) page may ask for."""
MAX_KV_PAGE_BYTES = 2 * 1024 * 1024
"""Keys and values one ``kv.list`` or ``kv.scan`` reply carries at most (beyond the first
entry): a page stops early rather than outgrow an RPC frame."""
MAX_KV_BATCH_ITEMS = 256
"""Keys one ``kv.put_batch`` or ``kv.apply_batch`` carries at most."""
MAX_KV_BATCH_BYTES = 2 * 1024 * 1024
"""Values one batch carries at most in all (beyond its first: a value alone may be as
large as ``MAX_VALUE_BYTES``), well within an RPC frame."""
MAX_REPL_MESSAGE_BYTES = 8 * 1024 * 1024
"""One replication protocol message (``core/replication.py`` bounds its own batches)."""

ObjectId = Annotated[str, msgspec.Meta(pattern=r"^b3-[0-9a-f]{64}$")]
"""``b3-`` and the 64 hex digits of the BLAKE3-256 of the bytes (``core/objects.py``)."""
NodeName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
UploadId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
Size = Annotated[int, msgspec.Meta(ge=0, le=MAX_OBJECT_BYTES)]
Replicas = Annotated[int, msgspec.Meta(ge=1, le=MAX_REPLICAS)]
Chunk = Annotated[bytes, msgspec.Meta(max_length=MAX_CHUNK_BYTES)]
Stamp = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TS_LENGTH)]
"""An encoded HLC timestamp (``core.hlc.HLCTimestamp.encode``)."""
KvKey = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_BYTES)]
"""At most ``MAX_KEY_BYTES`` characters here; the node checks its UTF-8 bytes too."""
KvBytes = Annotated[bytes, msgspec.Meta(max_length=MAX_VALUE_BYTES)]
ConsistencyName = Literal["one", "quorum", "all"]


class Done(msgspec.Struct):
    """The reply of a method that answers nothing but success."""


# ------------------------------------------------------------------ client puts


class PutBeginRequest(Request):
    size: Size
    replicas: Replicas | None = None
    """Copies to keep; absent: the data class's count (``core/policy.py``), else 3."""
    w: Replicas | None = None
    """Copies durable before the put returns (at most ``replicas``); absent: min(2, replicas)."""
    residency: ResidencyWire | None = None
    """Where copies may live and the data class: a class with a policy gives the fields
    left out (regions, replicas, TTL); those given may narrow it, never widen it."""
    id: ObjectId | None = None
    """The object's id sent ahead: the node streams the chunks on to the replica set as
    they arrive (cut-through) and every copy is checked against it."""
    ttl_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """Collected everywhere this long after the put (absent: the class's TTL, else kept
    until deleted)."""
    allow_degraded: bool = False
    """Store it even when fewer live nodes than ``replicas`` may hold a copy now (the
    object is under-replicated until more join); without it such a put is refused."""


class PutBeginReply(msgspec.Struct):
    upload: str
    chunk_bytes: int
    """Largest chunk the node takes (and reads may ask for)."""


class PutChunkRequest(Request):
    """One chunk of an upload (``obj.put_chunk``, and ``obj.rw_chunk`` between nodes)."""

    upload: UploadId
    data: Chunk


class ChunkReply(msgspec.Struct):
    received: int
    """Bytes of the upload taken so far."""


class UploadRequest(Request):
    upload: UploadId


class PutReply(msgspec.Struct):
    id: str
    size: int
    nodes: list[str]
    """The nodes whose durable copies made the write quorum."""
    planned: int = 0
    """Copies the put aimed for (its write set): fewer than ``replicas`` for a degraded
    put (``allow_degraded``); 0 from a node that does not say."""
    replicas: int = 0
    """The replication factor the put resolved to (its data class's when it gave none)."""


class PutSmallRequest(Request):
    """A whole small object in one call (a node's ``inline_bytes`` bounds it)."""

    data: Chunk
    replicas: Replicas | None = None
    """Absent: the data class's count, else 3 (as ``PutBeginRequest.replicas``)."""
    w: Replicas | None = None
    residency: ResidencyWire | None = None
    ttl_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    allow_degraded: bool = False
    """As ``PutBeginRequest.allow_degraded``."""


# ------------------------------------------------------------------ replica transfers


class ReplicaHeader(Request):
    """A copy of an object sent from one node to another."""

    id: ObjectId
    size: Size
    replicas: Replicas = 3
    residency: ResidencyWire | None = None
    """The object's rule: a receiver outside it refuses the copy."""
    hint_for: NodeName | None = None
    """A stand-in's copy, held for this replica-set member."""
    expires: float | None = None
    """When the object expires (Unix seconds; None: pinned)."""
    written: Stamp | None = None
    """The write's HLC time: a copy older than a delete of the object is refused."""


class ReplicaSmallRequest(ReplicaHeader, kw_only=True):
    data: Chunk


class RwBeginReply(msgspec.Struct, omit_defaults=True):
    have: bool = False
    """The receiver holds the object already: nothing to send."""
    upload: str | None = None


class StoredReply(msgspec.Struct):
    id: str


# ------------------------------------------------------------------ reads


class ReadRequest(Request):
    """A byte range of an object (``obj.read``; ``obj.read_local`` between nodes)."""

    id: ObjectId
    offset: Size
    length: Annotated[int, msgspec.Meta(ge=0)]
    """Bytes wanted (the node sends at most its ``chunk_bytes``)."""
    redirect: bool = False
    """A node without a copy may name holders to read from instead of relaying."""


class Holder(msgspec.Struct):
    node: str
    addr: str


class ReadReply(msgspec.Struct, omit_defaults=True):
    data: bytes = b""
    size: int = 0
    """The whole object's size."""
    chunk_bytes: int = 0
    """The node's chunk size (the most one read returns)."""
    redirect: list[Holder] | None = None
    """Set instead of the bytes: holders to read from (a redirect was asked for)."""


class ObjectIdRequest(Request):
    id: ObjectId


class ObjectDesc(msgspec.Struct, omit_defaults=True):
    """An object as one node sees it."""

    id: str
    size: int
    replicas: int
    residency: ResidencyWire | None = None
    replica_set: list[str] = []
    """Nodes that should hold a copy, from the node's view and the object's rule."""
    write_set: list[str] = []
    """Where a put would go now (stand-ins for full members included)."""


class LocalObject(ObjectDesc, omit_defaults=True):
    """A node's own copy (``obj.local_stat``)."""

    written: str | None = None


class ObjectStat(ObjectDesc, omit_defaults=True):
    holders: list[str] = []
    """Live nodes that hold a copy."""


class ListedObject(ObjectStat, omit_defaults=True):
    health: str = ""
    """``ok`` or ``under-replicated``."""


class ListRequest(Request):
    after: Annotated[str, msgspec.Meta(max_length=MAX_NAME_LENGTH)] = ""
    """Only ids after this one."""
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIST_PAGE)] = 1000


class ObjectPage(msgspec.Struct):
    objects: list[ListedObject]
    next: str | None = None
    """Pass as ``after`` for the next page; None: the last page."""


# ------------------------------------------------------------------ deletes, scrub, stats


class DeleteReply(msgspec.Struct, omit_defaults=True):
    id: str
    holders: list[str]
    """Live nodes that held a copy."""
    notified: list[str] = []
    """Nodes told at once (the others learn it by anti-entropy)."""
    ts: str | None = None
    """The delete's HLC time."""
    tombstones: list[str] = []
    """Nodes that confirmed a durable tombstone."""
    already_deleted: bool = False


class CorruptReply(msgspec.Struct):
    quarantined: list[str]
    """Local copies whose bytes did not hash to their id."""


class DataPlaneStats(msgspec.Struct):
    store: dict[str, int]
    dataplane: dict[str, int]
    replication: dict[str, int]
    uploads: int
    kv_hints: dict[str, int]


class ReplMsgRequest(Request):
    src: NodeName
    """The sending node (its certificate must say so: ``core/access.py``)."""
    payload: Annotated[bytes, msgspec.Meta(max_length=MAX_REPL_MESSAGE_BYTES)]
    """A ``core.replication`` message."""


# ------------------------------------------------------------------ KV


Version = Annotated[str, msgspec.Meta(max_length=MAX_TS_LENGTH)]
"""An encoded HLC stamp, or "" (``core.kv.ABSENT``: no live value)."""
Expected = Annotated[list[Version], msgspec.Meta(min_length=1, max_length=MAX_EXPECTED)]


class KvPutRequest(Request):
    key: KvKey
    value: KvBytes
    consistency: ConsistencyName = "quorum"
    expected: Expected | None = None
    """A conditional put (``core.kv``, compare-and-swap): applied only where the key's
    record is one of these versions; refused with ``conflict`` otherwise."""


class KvKeyRequest(Request):
    """``kv.get`` and ``kv.delete``."""

    key: KvKey
    consistency: ConsistencyName = "quorum"


class KvWriteReply(msgspec.Struct):
    ts: str
    """The write's HLC time."""


class KvValue(msgspec.Struct):
    value: bytes | None = None
    """None: the key has no value (never set, or deleted)."""
    ts: str | None = None


class KvApplyRequest(Request):
    """One replica's part of a KV write (a coordinator's, a read repair or a hand-off)."""

    key: KvKey
    value: KvBytes | None
    """None: a delete."""
    ts: Stamp
    hint_for: Annotated[list[NodeName], msgspec.Meta(max_length=MAX_HINT_TARGETS)] = []
    """The replicas this node stands in for (``core.kv.KVHints``)."""
    expected: Expected | None = None
    """A conditional put's versions: apply only if this replica's record is one of them."""


class KvApplyReply(msgspec.Struct, omit_defaults=True):
    applied: bool
    """False: the replica had a newer record (or, ``conflict``, another version)."""
    conflict: bool = False
    """A conditional put refused: the replica's record is none of the expected ones."""
    current: str | None = None
    """With ``conflict``: the stamp of the replica's record (None: it has none)."""


class KvPutItem(msgspec.Struct, array_like=True):
    """One key of a ``kv.put_batch``."""

    key: KvKey
    value: KvBytes


class KvPutBatchRequest(Request):
    """Quorum writes of several keys at once, by a node's own planes (task records): each
    key is written as ``kv.put`` writes it (its own stamp, replicas and quorum), and each
    replica takes its part of all of them in one ``kv.apply_batch`` (one transaction), so
    a batch of n keys costs one round per replica instead of n."""

    items: Annotated[list[KvPutItem], msgspec.Meta(min_length=1, max_length=MAX_KV_BATCH_ITEMS)]


class KvItemResult(msgspec.Struct, array_like=True, omit_defaults=True):
    """One key's part of a batch: ``ts`` (``kv.put_batch``: the write's stamp) or
    ``applied`` (``kv.apply_batch``), or why it failed (``error``, ``code``)."""

    ts: str = ""
    applied: bool = False
    error: str = ""
    code: str = ""


class KvPutBatchReply(msgspec.Struct):
    results: list[KvItemResult]
    """In the request's order."""


class KvApplyItem(msgspec.Struct, array_like=True):
    """One key of a replica's ``kv.apply_batch`` (as a ``KvApplyRequest`` without
    ``expected``: conditional puts are never batched)."""

    key: KvKey
    value: KvBytes | None
    ts: Stamp
    hint_for: Annotated[list[NodeName], msgspec.Meta(max_length=MAX_HINT_TARGETS)] = []


class KvApplyBatchRequest(Request):
    """One replica's part of several KV writes, applied in one transaction."""

    items: Annotated[list[KvApplyItem], msgspec.Meta(min_length=1,
                                                     max_length=MAX_KV_BATCH_ITEMS)]


class KvApplyBatchReply(msgspec.Struct):
    results: list[KvItemResult]
    """In the request's order."""


class KvReadRequest(Request):
    key: KvKey


class KvRecordWire(msgspec.Struct):
    """A replica's record of a key (None: it has none)."""

    value: bytes | None
    ts: str


class KvVersion(msgspec.Struct):
    """One replica's record of a key (``kv.versions``)."""

    node: str
    ts: str | None = None
    """None: the replica has no record."""
    value: bytes | None = None


class KvVersions(msgspec.Struct):
    """Every replica's record of a key that answered (a quorum at least): for a reader of
    conditional puts that decides on its own rule (``core.actors.pick_checkpoint``)."""

    versions: list[KvVersion]


class KvListRequest(Request):
    """Keys starting with ``prefix``, in key order, after ``after`` (``kv.list``; a
    replica's own records with ``kv.scan``)."""

    prefix: Annotated[str, msgspec.Meta(max_length=MAX_KEY_BYTES)] = ""
    after: Annotated[str, msgspec.Meta(max_length=MAX_KEY_BYTES)] = ""
    """Only keys after this one ("": from the first)."""
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_KV_LIST_PAGE)] = 100


class KvEntry(msgspec.Struct):
    """A key's record (``kv.scan``: None is a tombstone; ``kv.list`` lists live keys)."""

    key: str
    value: bytes | None
    ts: str


class KvPage(msgspec.Struct):
    entries: list[KvEntry]
    next: str | None = None
    """Pass as ``after`` for the next page; None: the last page."""


PUT_BEGIN: Method[PutBeginRequest, PutBeginReply] = Method(
    "obj.put_begin", PutBeginRequest, PutBeginReply)
PUT_CHUNK: Method[PutChunkRequest, ChunkReply] = Method(
    "obj.put_chunk", PutChunkRequest, ChunkReply)
PUT_END: Method[UploadRequest, PutReply] = Method("obj.put_end", UploadRequest, PutReply)
PUT_ABORT: Method[UploadRequest, Done] = Method("obj.put_abort", UploadRequest, Done)
PUT_SMALL: Method[PutSmallRequest, PutReply] = Method("obj.put_small", PutSmallRequest,
                                                      PutReply)
RW_BEGIN: Method[ReplicaHeader, RwBeginReply] = Method("obj.rw_begin", ReplicaHeader,
                                                       RwBeginReply)
RW_CHUNK: Method[PutChunkRequest, ChunkReply] = Method(
    "obj.rw_chunk", PutChunkRequest, ChunkReply)
RW_END: Method[UploadRequest, StoredReply] = Method("obj.rw_end", UploadRequest, StoredReply)
RW_SMALL: Method[ReplicaSmallRequest, StoredReply] = Method(
    "obj.rw_small", ReplicaSmallRequest, StoredReply)
READ: Method[ReadRequest, ReadReply] = Method("obj.read", ReadRequest, ReadReply)
READ_LOCAL: Method[ReadRequest, ReadReply] = Method("obj.read_local", ReadRequest, ReadReply)
LOCAL_STAT: Method[ObjectIdRequest, LocalObject | None] = Method(
    "obj.local_stat", ObjectIdRequest, LocalObject | None)
LOCAL_LIST: Method[ListRequest, list[ObjectDesc]] = Method(
    "obj.local_list", ListRequest, list[ObjectDesc])
STAT: Method[ObjectIdRequest, ObjectStat] = Method("obj.stat", ObjectIdRequest, ObjectStat)
LIST: Method[ListRequest, ObjectPage] = Method("obj.list", ListRequest, ObjectPage)
DELETE: Method[ObjectIdRequest, DeleteReply] = Method("obj.delete", ObjectIdRequest,
                                                      DeleteReply)
CORRUPT_LOCAL: Method[Empty, CorruptReply] = Method("obj.corrupt_local", Empty, CorruptReply)
DP_STATS: Method[Empty, DataPlaneStats] = Method("dp.stats", Empty, DataPlaneStats)
REPL_MSG: Method[ReplMsgRequest, Done] = Method("repl.msg", ReplMsgRequest, Done)
KV_PUT: Method[KvPutRequest, KvWriteReply] = Method("kv.put", KvPutRequest, KvWriteReply)
KV_DELETE: Method[KvKeyRequest, KvWriteReply] = Method("kv.delete", KvKeyRequest,
                                                       KvWriteReply)
KV_GET: Method[KvKeyRequest, KvValue] = Method("kv.get", KvKeyRequest, KvValue)
KV_APPLY: Method[KvApplyRequest, KvApplyReply] = Method("kv.apply", KvApplyRequest,
                                                        KvApplyReply)
KV_APPLY_BATCH: Method[KvApplyBatchRequest, KvApplyBatchReply] = Method(
    "kv.apply_batch", KvApplyBatchRequest, KvApplyBatchReply)
KV_PUT_BATCH: Method[KvPutBatchRequest, KvPutBatchReply] = Method(
    "kv.put_batch", KvPutBatchRequest, KvPutBatchReply)
KV_READ: Method[KvReadRequest, KvRecordWire | None] = Method(
    "kv.read", KvReadRequest, KvRecordWire | None)
KV_LIST: Method[KvListRequest, KvPage] = Method("kv.list", KvListRequest, KvPage)
KV_SCAN: Method[KvListRequest, KvPage] = Method("kv.scan", KvListRequest, KvPage)
KV_VERSIONS: Method[KvKeyRequest, KvVersions] = Method("kv.versions", KvKeyRequest,
                                                       KvVersions)

METHODS: tuple[Method[Any, Any], ...] = (
    PUT_BEGIN, PUT_CHUNK, PUT_END, PUT_ABORT, PUT_SMALL, RW_BEGIN, RW_CHUNK, RW_END,
    RW_SMALL, READ, READ_LOCAL, LOCAL_STAT, LOCAL_LIST, STAT, LIST, DELETE, CORRUPT_LOCAL,
    DP_STATS, REPL_MSG, KV_PUT, KV_DELETE, KV_GET, KV_APPLY, KV_APPLY_BATCH, KV_PUT_BATCH, KV_READ,
    KV_LIST, KV_SCAN, KV_VERSIONS)
