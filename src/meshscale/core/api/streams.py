"""The streams plane's methods: publishing records, reading a topic, operators, and the
node-to-node copies and fetches of shard logs (``runtime/streams.py``).

Records travel as arrays, not maps (``array_like``): a publish carries up to
``MAX_PUBLISH_RECORDS`` of them and a read up to ``MAX_READ_RECORDS``, so the field names
are not repeated per record and the node checks a batch in one pass of the decoder. A
shard log's entry on the wire is ``core.streams.LogEntry`` itself (the same array).

An operator's spec (``OperatorSpec``) is one struct wherever it goes: registered in the
replicated KV, sent to every node (``stream.op_notify``), listed (``stream.op_list``).
A topic's residency rule is a ``ResidencyWire``, as for objects and tasks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from meshscale.core.api.contract import (
    MAX_REGIONS,
    Empty,
    Method,
    RegionName,
    Request,
    ResidencyWire,
)
from meshscale.core.streams import LogEntry

__all__ = [
    "COPIED", "FETCH", "MAX_CURSORS", "MAX_FETCH_RECORDS", "MAX_FN_BYTES", "MAX_KEY_CHARS",
    "MAX_LABELS", "MAX_NAME_CHARS", "MAX_PUBLISH_RECORDS", "MAX_READ_RECORDS",
    "MAX_RECORD_BYTES", "MAX_RECORD_ID_CHARS", "MAX_WAIT_S", "METHODS", "OPERATOR_MODES",
    "OP_LIST", "OP_NOTIFY", "OP_REGISTER", "OP_REMOVE", "PUBLISH", "READ", "REPLICATE",
    "STATS", "CopiedReply", "CopiedRequest", "FetchReply", "FetchRequest", "Name", "OpListReply", "OpNotifyRequest",
    "OpRegisterReply", "OpRegisterRequest", "OpRemoveReply", "OpRemoveRequest",
    "OperatorInfo", "OperatorSpec", "PublishRecord", "PublishReply", "PublishRequest",
    "ReadRecord", "ReadReply", "ReadRequest", "ReplicateReply", "ReplicateRequest",
    "ShardInfo", "StreamStats",
]

MAX_NAME_CHARS = 200
"""A topic, operator or shard source name."""
MAX_PUBLISH_RECORDS = 2_048
"""Records in one ``stream.publish`` (a producer sends batches of at most 512)."""
MAX_RECORD_BYTES = 256 * 1024
"""A published record's encoded value (a node may be configured lower)."""
MAX_KEY_CHARS = 4_096
MAX_RECORD_ID_CHARS = 1_024
MAX_READ_RECORDS = 10_000
"""Records one ``stream.read`` answers with."""
MAX_FETCH_RECORDS = 4_096
"""Entries one ``stream.fetch`` answers with; also an operator's largest batch."""
MAX_WAIT_S = 60.0
"""The longest long-poll a read or fetch may ask for (a node may cap it lower)."""
MAX_CURSORS = 4_096
"""Shards a subscriber's cursors may name (a node remembers as many sources)."""
MAX_FN_BYTES = 8 * 1024 * 1024
"""An operator's pickled function (a node's request frame holds no more)."""
MAX_LABELS = 64

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS,
                                   pattern=r"^[^/\x00]+$")]
"""A topic, operator or shard source (``node~epoch``) name: no ``/`` (KV keys are made
of them) and no NUL."""
Offset = Annotated[int, msgspec.Meta(ge=0)]
WaitS = Annotated[float, msgspec.Meta(ge=0, le=MAX_WAIT_S)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
"""A function's or an object's id (64 hex digits, ``b3-`` and 64 for an object)."""
LabelKey = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
LabelValue = Annotated[str, msgspec.Meta(max_length=256)]
OperatorMode = Literal["near-source", "central", "regions"]
OPERATOR_MODES: tuple[OperatorMode, ...] = ("near-source", "central", "regions")


# ------------------------------------------------------------------ records


class PublishRecord(msgspec.Struct, array_like=True, frozen=True, gc=False,
                    forbid_unknown_fields=True):
    """A record as a producer sends it: ``[key, value, id, ts]``."""

    key: Annotated[str, msgspec.Meta(max_length=MAX_KEY_CHARS)]
    value: Annotated[bytes, msgspec.Meta(max_length=MAX_RECORD_BYTES)]
    """The value, encoded by the producer (opaque to the mesh)."""
    id: Annotated[str, msgspec.Meta(max_length=MAX_RECORD_ID_CHARS)]
    """Unique per record; a resent record repeats it (subscribers drop repeats)."""
    ts: float
    """When it was produced (seconds since the epoch, the producer's clock)."""


class ReadRecord(msgspec.Struct, array_like=True, frozen=True, gc=False,
                 forbid_unknown_fields=True):
    """A record as a subscriber reads it: ``[source, offset, key, value, id, ts]``."""

    source: str
    """Its shard (``node~epoch`` of the node it entered at)."""
    offset: int
    key: str
    value: bytes
    id: str
    ts: float


# ------------------------------------------------------------------ publish, read


class PublishRequest(Request):
    topic: Name
    records: Annotated[list[PublishRecord],
                       msgspec.Meta(min_length=1, max_length=MAX_PUBLISH_RECORDS)]
    residency: ResidencyWire | None = None
    """The topic's rule; every publish to a topic must carry the same one."""
    ack: Literal["copied", "appended"] = "copied"
    """``copied``: answered once the shard's two copies hold the records (the
    acknowledgement). ``appended``: answered once they are appended at the entry node,
    their copy to the backup under way (the reply's ``copied`` says how far it got); the
    producer learns the rest from ``stream.copied`` and sends its next batch meanwhile
    (``core.streams.AckWindow``)."""


class PublishReply(msgspec.Struct):
    node: str
    """The node the records entered at."""
    source: str
    """Their shard's source (``node~epoch``)."""
    first: int
    last: int
    """Offsets of the first and last record in that shard."""
    copied: int | None = None
    """With ``ack="appended"``: the offset before which the shard is held twice (or by
    this node alone when no backup is left to copy to) as the reply leaves."""


class CopiedRequest(Request):
    """Wait until shard ``(topic, source)`` of the node asked is held twice before
    ``offset`` (its copy to the backup made, or found impossible: no backup left), then
    answer how far it is. Refused (not found) when that node no longer has the shard
    (it restarted: a new source): its producer sends the records again."""

    topic: Name
    source: Name
    offset: Offset


class CopiedReply(msgspec.Struct):
    copied: int
    """The offset before which the shard is held twice now (at least the one asked)."""


class ReadRequest(Request):
    topic: Name
    cursors: Annotated[dict[Name, Offset], msgspec.Meta(max_length=MAX_CURSORS)] = {}
    """Per shard source, the next offset wanted (absent: from the oldest held)."""
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_READ_RECORDS)] = 1_000
    wait_s: WaitS = 0.0
    """Wait up to this long for a record when none is there yet."""
    held: Annotated[list[Name], msgspec.Meta(max_length=MAX_CURSORS)] | None = None
    """A read at these shards' holder (``ReadReply.holders``): answered from the shards
    this node holds itself, as their holder, not from a mirror (no follower is made);
    those it does not hold, or no longer holds from the cursor on, come back in
    ``ReadReply.moved``."""
    skip: Annotated[list[Name], msgspec.Meta(max_length=MAX_CURSORS)] = []
    """Shards the subscriber reads at their holder: a read through this node leaves them
    out."""


class ReadReply(msgspec.Struct, omit_defaults=True):
    records: list[ReadRecord]
    holders: dict[str, str] = {}
    """Shards of the topic the subscriber may read at their holder (source -> the
    holder's address; ``core.streams.direct_reads``) instead of through this node."""
    moved: list[str] = []
    """A ``held`` read's shards this node does not hold from the cursor on: read them
    through a node again."""


# ------------------------------------------------------------------ node to node


class ReplicateRequest(Request):
    """A shard's primary copies its new entries to the shard's backup."""

    topic: Name
    source: Name
    entries: list[LogEntry]
    low: Offset | None = None
    """The primary's low water: every operator has committed up to here."""
    residency: ResidencyWire | None = None


class ReplicateReply(msgspec.Struct):
    head: int
    """The backup's copy now ends before this offset."""


class FetchRequest(Request):
    """An operator runner or a subscription's follower long-polls a shard's holder."""

    topic: Name
    source: Name
    offset: Offset | None = None
    """The first entry wanted (absent: the oldest held)."""
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_FETCH_RECORDS)] = 256
    wait_s: WaitS = 0.0
    op: Name | None = None
    """The operator reading (a runner): the holder keeps records for it until committed."""
    committed: Offset | None = None
    """The runner's checkpoint: its operator is done with the records before it."""


class FetchReply(msgspec.Struct, omit_defaults=True):
    entries: list[LogEntry] = []
    base: int = 0
    """The oldest offset the holder still has."""
    head: int = 0
    missing: bool = False
    """The holder has no such shard (yet): it waited ``wait_s`` for it to appear."""


# ------------------------------------------------------------------ operators


class OperatorSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A registered operator, as stored in the KV (``streamop/<name>``) and sent to every
    node."""

    name: Name
    topic: Name
    output: Name | None = None
    """The topic its results go to (None: it produces nothing)."""
    mode: OperatorMode = "near-source"
    region: RegionName | None = None
    """``central``: the region it runs in."""
    regions: Annotated[list[RegionName], msgspec.Meta(max_length=MAX_REGIONS)] | None = None
    """``regions``: the regions it may run in."""
    residency: ResidencyWire | None = None
    labels: Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=MAX_LABELS)] = {}
    """Labels a node must carry to run it."""
    output_residency: ResidencyWire | None = None
    """The rule its output records are published under (unresolved, as the output topic's
    record holds it): the operator's class unless it declared one at least as strict
    (``core.streams.output_rule``); None: no class (nor rule) on the output."""
    fn_id: Id
    """The function's id (``worker_main.function_id`` of its pickled bytes)."""
    fn_object: Id
    """The object holding the pickled function."""
    batch: Annotated[int, msgspec.Meta(ge=1, le=MAX_FETCH_RECORDS)] = 256
    """Records per call of the function."""


class OperatorInfo(OperatorSpec, kw_only=True):
    """A row of ``stream.op_list``: the spec and this node's counters for it."""

    stats: dict[str, int] = {}


class OpRegisterRequest(Request):
    name: Name
    topic: Name
    fn_bytes: Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_FN_BYTES)]
    """The pickled function."""
    output: Name | None = None
    mode: OperatorMode = "near-source"
    region: RegionName | None = None
    """``central``: the region (absent: the one with the most nodes)."""
    regions: Annotated[list[RegionName], msgspec.Meta(max_length=MAX_REGIONS)] | None = None
    residency: ResidencyWire | None = None
    labels: Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=MAX_LABELS)] = {}
    output_residency: ResidencyWire | None = None
    """The output topic's rule as the operator declares it (a data class at least as
    strict as the operator's, and maybe its own stream regions); None: the output takes
    the operator's class (``core.streams.output_rule``)."""
    fn_id: Id | None = None
    """If given, ``fn_bytes`` must hash to it."""
    batch: Annotated[int, msgspec.Meta(ge=1, le=MAX_FETCH_RECORDS)] = 256


class OpRegisterReply(msgspec.Struct):
    name: str
    fn_id: str
    mode: OperatorMode
    region: str | None
    """Where a ``central`` operator runs."""


class OpNotifyRequest(Request):
    """One of: an operator registered (``spec``) or removed (``removed``) elsewhere."""

    spec: OperatorSpec | None = None
    removed: Name | None = None


class OpRemoveRequest(Request):
    name: Name


class OpRemoveReply(msgspec.Struct):
    removed: str


class OpListReply(msgspec.Struct):
    operators: list[OperatorInfo]
    runners: list[str]
    """``operator@source`` of the runners on this node."""


# ------------------------------------------------------------------ stats


class ShardInfo(msgspec.Struct):
    """A shard log held on the asked node."""

    topic: str
    source: str
    base: int
    head: int
    backlog: int
    """Records not yet committed by the slowest operator."""
    backlog_max: int
    """The highest backlog it ever had."""
    bytes: int
    evicted: int
    role: Literal["primary", "backup", "mirror"]
    """``mirror``: a subscriber's bounded copy on the asked node (``StreamStats.mirrors``)."""


class StreamStats(msgspec.Struct):
    node: str
    region: str
    counters: dict[str, int]
    cross_region_bytes: dict[str, int]
    """Payload bytes sent to or fetched from another region, by ``topic:purpose``."""
    shards: list[ShardInfo]
    operators: dict[str, dict[str, int]]
    """Per operator, this node's counters for it."""
    runners: list[str]
    mirrors: list[ShardInfo] = []
    """The shards this node follows into a mirror for its subscribers."""


PUBLISH: Method[PublishRequest, PublishReply] = Method(
    "stream.publish", PublishRequest, PublishReply)
COPIED: Method[CopiedRequest, CopiedReply] = Method(
    "stream.copied", CopiedRequest, CopiedReply)
READ: Method[ReadRequest, ReadReply] = Method("stream.read", ReadRequest, ReadReply)
REPLICATE: Method[ReplicateRequest, ReplicateReply] = Method(
    "stream.replicate", ReplicateRequest, ReplicateReply)
FETCH: Method[FetchRequest, FetchReply] = Method("stream.fetch", FetchRequest, FetchReply)
OP_REGISTER: Method[OpRegisterRequest, OpRegisterReply] = Method(
    "stream.op_register", OpRegisterRequest, OpRegisterReply)
OP_NOTIFY: Method[OpNotifyRequest, None] = Method("stream.op_notify", OpNotifyRequest, None)
OP_REMOVE: Method[OpRemoveRequest, OpRemoveReply] = Method(
    "stream.op_remove", OpRemoveRequest, OpRemoveReply)
OP_LIST: Method[Empty, OpListReply] = Method("stream.op_list", Empty, OpListReply)
STATS: Method[Empty, StreamStats] = Method("stream.stats", Empty, StreamStats)

METHODS: tuple[Method[Any, Any], ...] = (PUBLISH, COPIED, READ, REPLICATE, FETCH,
                                         OP_REGISTER, OP_NOTIFY, OP_REMOVE, OP_LIST, STATS)
