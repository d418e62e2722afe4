"""The compute plane's methods: submitting tasks and asking for their outcomes (clients),
and what nodes tell each other about them (outcomes, function bytes, kills, scheduling).

A task travels as one ``TaskWire`` (function id and bytes, pickled arguments, inputs,
resources, labels, residency as ``ResidencyWire``, placement as ``PlacementWire``); its
outcome comes back as one ``TaskView``. ``sched.*`` requests carry the sender's load and
capacity (``core.scheduling.Load`` / ``Resources``, as arrays) and scheduling messages
as the bytes ``core.scheduling.encode_message`` made (versioned, decoded and bounded by
the receiving ``Scheduler``, not here).

Bounds here are the wire's hard limits; a node applies its own (lower, configurable)
ones in ``runtime/compute.py`` (``ComputeConfig``) with messages that say what to do.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from meshscale.core.api.contract import (
    MAX_REGIONS,
    DataClass,
    Empty,
    Method,
    RegionName,
    Request,
    ResidencyWire,
)
from meshscale.core.scheduling import (
    Central,
    DataLocal,
    InRegions,
    Load,
    NearSource,
    PlacementMode,
    Resources,
)
from meshscale.core.tasks import TaskState

__all__ = [
    "MAX_ARGS_BYTES",
    "MAX_EXCEPTION_BYTES",
    "MAX_FUNCTION_BYTES",
    "MAX_INLINE_RESULT_BYTES",
    "MAX_INPUTS",
    "MAX_LABELS",
    "MAX_SCHED_BATCH",
    "MAX_SCHED_MESSAGE_BYTES",
    "MAX_SUBMIT_TASKS",
    "MAX_UPSTREAM",
    "MAX_WAIT_IDS",
    "METHODS",
    "SCHED_BATCH",
    "SCHED_EXCHANGE",
    "SCHED_LOAD",
    "SCHED_MSG",
    "TASK_CANCEL",
    "TASK_DONE",
    "TASK_FN",
    "TASK_KILL",
    "TASK_LIST",
    "TASK_LOGS",
    "TASK_RESULT",
    "TASK_STATS",
    "TASK_SUBMIT",
    "TASK_WAIT",
    "CancelReply",
    "CancelRequest",
    "DetailRef",
    "DoneReply",
    "DoneRequest",
    "FnReply",
    "FnRequest",
    "KillReply",
    "KillRequest",
    "ListRequest",
    "LoadReport",
    "LogsRequest",
    "PlacementCentral",
    "PlacementData",
    "PlacementNearSource",
    "PlacementRegions",
    "PlacementWire",
    "ResultRef",
    "ResultRequest",
    "SchedAck",
    "SchedBatchRequest",
    "SchedExchangeRequest",
    "SchedMsgRequest",
    "SchedReply",
    "SubmitReply",
    "SubmitRequest",
    "TaskLogs",
    "TaskRow",
    "TaskStats",
    "TaskView",
    "TaskWire",
    "WaitReply",
    "WaitRequest",
    "parse_placement",
    "placement_mode",
]

MAX_SUBMIT_TASKS = 4096
"""Tasks in one ``task.submit`` (a node refuses more than its scheduler's ``max_batch``)."""
MAX_ARGS_BYTES = 1 << 20
"""Pickled arguments of one task (they ride in its KV record; a node's own bound,
``ComputeConfig.max_args_bytes``, is lower)."""
MAX_FUNCTION_BYTES = 32 << 20
"""A pickled function (a node's ``ComputeConfig.max_function_bytes`` is lower)."""
MAX_INPUTS = 256
"""Input objects of one task (as ``core.scheduling.TaskSpec``)."""
MAX_UPSTREAM = 4096
"""Upstream tasks (futures among the arguments) of one task (a node's
``ComputeConfig.max_upstream`` is lower)."""
MAX_LABELS = 64
"""Labels one task may require."""
MAX_WAIT_IDS = 4096
"""Task ids in one ``task.wait``."""
MAX_SCHED_MESSAGE_BYTES = 16 << 20
"""One encoded scheduling message (the receiving scheduler's ``max_message_bytes`` is
lower)."""
MAX_SCHED_BATCH = 4096
"""Scheduling messages in one ``sched.batch``."""
MAX_INLINE_RESULT_BYTES = 16 << 20
"""A result carried in ``task.done`` (a node's ``ComputeConfig.inline_result_bytes`` is
lower: larger ones are stored as objects)."""
MAX_EXCEPTION_BYTES = 64 * 1024
"""A pickled exception carried with a failed task's outcome."""
MAX_FUNCTION_NAME = 200
"""Characters of a task's function name (its qualified name) kept for listings."""
MAX_RETRIES = 1000
MAX_TIMEOUT_S = 365 * 86400.0

TaskId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
FunctionId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
"""BLAKE3-256 of the pickled function, hex (``core.objects.digest_hex``)."""
ObjectId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
NodeName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
LabelKey = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
LabelValue = Annotated[str, msgspec.Meta(max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=1 << 20)]
"""An error message or a traceback."""
Kind = Annotated[str, msgspec.Meta(max_length=64)]
"""Why a task failed (see ``TaskView.kind``)."""
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_TIMEOUT_S)]


# ------------------------------------------------------------------ placement


class _Placement(msgspec.Struct, tag_field="mode", forbid_unknown_fields=True):
    """Where a task may run: a map with its ``mode`` (``"data"``, ``"central"``,
    ``"regions"``, ``"near-source"``) and that mode's fields."""


class PlacementData(_Placement, tag="data"):
    """Where its input objects are (the default)."""


class PlacementCentral(_Placement, tag="central"):
    """In one region."""

    region: RegionName


class PlacementRegions(_Placement, tag="regions"):
    """In one of these regions."""

    regions: Annotated[list[RegionName], msgspec.Meta(min_length=1, max_length=MAX_REGIONS)]


class PlacementNearSource(_Placement, tag="near-source"):
    """On or near the node ``source``."""

    source: NodeName


PlacementWire = PlacementData | PlacementCentral | PlacementRegions | PlacementNearSource


def placement_mode(wire: PlacementWire | None) -> PlacementMode:
    """The scheduler's placement mode for ``wire`` (None: data)."""
    if wire is None or isinstance(wire, PlacementData):
        return DataLocal()
    if isinstance(wire, PlacementCentral):
        return Central(wire.region)
    if isinstance(wire, PlacementRegions):
        return InRegions(frozenset(wire.regions))
    return NearSource(wire.source)


def parse_placement(stored: Any) -> PlacementWire | None:
    """A placement map (``{"mode": ..., ...}``, as a client writes it and as
    ``core.tasks.TaskRecord.placement`` keeps it; None: data) as a ``PlacementWire``;
    ``ValueError`` naming what is wrong."""
    if stored is None:
        return None
    try:
        out: PlacementWire = msgspec.convert(stored, PlacementWire)
    except msgspec.ValidationError as exc:
        raise ValueError(f"placement: {exc}") from None
    return out


# ------------------------------------------------------------------ task specs and outcomes


class TaskWire(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """One task of a ``task.submit``: the one wire form of a task spec."""

    task_id: TaskId
    """Chosen by the client; an idempotency key (``<prefix>.<n>`` for the tasks of one
    submit: their records are written together)."""
    fn_id: FunctionId
    name: Annotated[str, msgspec.Meta(max_length=MAX_FUNCTION_NAME)] = ""
    """The function's qualified name, for listings and metrics (not trusted for more)."""
    fn: Annotated[bytes, msgspec.Meta(max_length=MAX_FUNCTION_BYTES)] | None = None
    """The pickled function, sent when the node answers ``need_function``."""
    args: Annotated[bytes, msgspec.Meta(max_length=MAX_ARGS_BYTES)] = b""
    """The pickled call (``client/tasks.py``), opaque to the node."""
    inputs: Annotated[list[ObjectId], msgspec.Meta(max_length=MAX_INPUTS)] = []
    """Object ids whose bytes the function receives (they also steer placement)."""
    cpus: Annotated[float, msgspec.Meta(gt=0.0, le=1e6)] = 1.0
    memory_mb: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)] = 0
    """0: the node's default per-task memory."""
    gpus: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)] = 0
    labels: Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=MAX_LABELS)] = {}
    """Labels a node must carry, each with exactly this value."""
    residency: ResidencyWire | None = None
    placement: PlacementWire | None = None
    """None: where the inputs are."""
    retries: Annotated[int, msgspec.Meta(ge=0, le=MAX_RETRIES)] = 3
    """Re-runs after a worker crash or a lost outcome."""
    timeout_s: Annotated[float, msgspec.Meta(gt=0.0, le=MAX_TIMEOUT_S)] | None = None
    """The worker is killed after this long (None: the node's default)."""
    after: Annotated[list[TaskId], msgspec.Meta(max_length=MAX_UPSTREAM)] = []
    """Upstream tasks (futures among the arguments): the node waits for them to end, runs
    this task where their results are, and gives the function their values in place of
    the futures; one that failed fails this task (kind ``upstream``, naming it)."""


class ResultRef(msgspec.Struct):
    """A result too large to ride inline: the object it was stored as."""

    id: ObjectId
    size: Annotated[int, msgspec.Meta(ge=0)]


class DetailRef(msgspec.Struct):
    """A classed task's error, traceback, exception and output, stored by the node that
    ran it as one object of its class (``core.tasks.TaskDetail``,
    ``core.policy.detail_rule``): read it from within the class's regions."""

    id: ObjectId
    size: Annotated[int, msgspec.Meta(ge=0)]
    data_class: DataClass


class TaskView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A task's state and outcome as its owner (or its stored record) knows it."""

    task_id: TaskId
    state: TaskState
    value: bytes | None = None
    """The pickled result (``done``, small ones)."""
    ref: ResultRef | None = None
    """The result object (``done``, large ones)."""
    error: str = ""
    kind: str = ""
    """Why it failed: ``raised``, ``timeout``, ``memory``, ``worker_crashed``,
    ``unschedulable``, ``input``, ``lost``, ``refused``, ``cancelled``..."""
    traceback: str = ""
    exc: bytes | None = None
    """The exception it raised, pickled (``raised``, when the worker could pickle it)."""
    node: str = ""
    """The node that ran it (last bound to)."""
    owner: str = ""
    reason: str = ""
    """Why it was placed where it was."""
    detail_ref: DetailRef | None = None
    """Set for a classed task whose error and output are kept as an object of its class
    (``error`` then says so, and ``traceback`` and ``exc`` are empty)."""


class SubmitRequest(Request):
    tasks: Annotated[list[TaskWire], msgspec.Meta(min_length=1, max_length=MAX_SUBMIT_TASKS)]


class SubmitReply(msgspec.Struct, omit_defaults=True):
    accepted: list[str]
    """The ids of every task of the request (also those this node already had)."""
    results: list[TaskView] = []
    """Outcomes of new tasks that ended before the answer."""


class ResultRequest(Request):
    task_id: TaskId
    timeout_s: Seconds = 0.0
    """Wait up to this long for the task to end (the node clamps to its bound)."""
    forwarded: bool = False
    """Asked by another node on a client's behalf (``core.tasks.lookup``): never forwarded
    again."""


class WaitRequest(Request):
    task_ids: Annotated[list[TaskId], msgspec.Meta(max_length=MAX_WAIT_IDS)]
    timeout_s: Seconds = 0.0
    min_done: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Return once this many of ``task_ids`` have ended (or the time is up)."""


class WaitReply(msgspec.Struct, omit_defaults=True):
    results: list[TaskView] = []
    """Those of the tasks asked about that have ended (large results may wait for the
    next call)."""
    unknown: list[str] = []
    """Ids no node knows (their records are lost)."""


class CancelRequest(Request):
    task_id: TaskId


class CancelReply(msgspec.Struct):
    cancelled: bool
    state: TaskState


class LogsRequest(Request):
    task_id: TaskId
    forwarded: bool = False
    """Asked by another node on a client's behalf: answered from what that node holds."""


class TaskLogs(msgspec.Struct, kw_only=True):
    """What a task printed (``task.logs``), as its record keeps it once it has ended
    (bounded by the worker node's ``task_log_bytes``; a cut says so in the text)."""

    task_id: str
    state: TaskState
    stdout: str = ""
    stderr: str = ""
    node: str = ""
    detail_ref: DetailRef | None = None
    """A classed task's output is not here: it is kept as this object of its class."""


class ListRequest(Request):
    limit: Annotated[int, msgspec.Meta(ge=1)] = 1000
    """Newest rows first, up to this many (the node clamps to its bound)."""


class TaskRow(msgspec.Struct, kw_only=True):
    """One row of ``task.list``."""

    task_id: str
    state: TaskState
    node: str = ""
    owner: str = ""
    reason: str = ""
    submitted: float = 0.0
    """Wall-clock seconds."""
    finished: float = 0.0
    error: str = ""
    """The first 200 characters."""
    name: str = ""
    """The function's name, as its submitter gave it."""
    energy_j: float = 0.0
    """Joules its attempts drew: each running node's draw (RAPL or its power model, as
    ``meshscale energy`` says) split over the tasks running there by the slots they
    held, integrated over the task's run time (``core.capacity.TaskEnergy``)."""


class TaskStats(msgspec.Struct, kw_only=True):
    """The compute plane's counters (``task.stats``)."""

    compute: dict[str, int]
    scheduling: dict[str, int]
    pool: dict[str, int]
    records: int
    load: Load
    capacity: Resources


# ------------------------------------------------------------------ node to node


class DoneRequest(Request):
    """A worker node's outcome of one attempt, to the task's owner."""

    task_id: TaskId
    node: NodeName
    """The worker node (must be the caller: ``core.access.SENDER_FIELD``)."""
    attempt: Annotated[int, msgspec.Meta(ge=0)] = 0
    ok: bool = False
    value: Annotated[bytes, msgspec.Meta(max_length=MAX_INLINE_RESULT_BYTES)] | None = None
    ref: ResultRef | None = None
    kind: Kind = ""
    error: Text = ""
    traceback: Text = ""
    exc: Annotated[bytes, msgspec.Meta(max_length=MAX_EXCEPTION_BYTES)] | None = None
    """The raised exception, pickled (kind ``raised``), when the worker could."""
    energy_j: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    """Joules this attempt drew at the worker node (its share of the node's draw)."""
    stdout: Text = ""
    stderr: Text = ""
    """What the task printed, as the worker node kept it (bounded there)."""
    detail_ref: DetailRef | None = None
    """A classed task: its error, traceback, exception and output are this object of its
    class (``core.policy.detail_rule``); ``error`` is ``core.tasks.detail_note``'s and
    ``traceback``, ``exc``, ``stdout`` and ``stderr`` are empty."""


class DoneReply(msgspec.Struct):
    accepted: bool
    """False: the task had already ended (this outcome is dropped)."""


class FnRequest(Request):
    fn_id: FunctionId


class FnReply(msgspec.Struct):
    fn: bytes


class KillRequest(Request):
    owner: NodeName
    """The task's owner (must be the caller)."""
    task_id: TaskId


class KillReply(msgspec.Struct):
    killed: bool


class LoadReport(Request):
    """A node's load and capacity (``sched.load`` both ways; every ``sched.*`` request
    carries it)."""

    src: NodeName
    """The sending node (must be the caller)."""
    load: Load
    cap: Resources
    boot: Annotated[str, msgspec.Meta(max_length=64)] = ""
    """The sending process's boot (random per start of its compute plane): a new boot
    tells an owner the node restarted (``core.scheduling.Scheduler.peer_boot``)."""


class SchedMsgRequest(LoadReport, kw_only=True):
    payload: Annotated[bytes, msgspec.Meta(max_length=MAX_SCHED_MESSAGE_BYTES)]
    """One ``core.scheduling`` message, as ``encode_message`` made it."""


class SchedBatchRequest(LoadReport, kw_only=True):
    payloads: Annotated[list[Annotated[bytes, msgspec.Meta(
        max_length=MAX_SCHED_MESSAGE_BYTES)]], msgspec.Meta(max_length=MAX_SCHED_BATCH)]
    """Scheduling messages, handled in order."""


class SchedExchangeRequest(SchedBatchRequest, kw_only=True):
    outcomes: Annotated[list[DoneRequest], msgspec.Meta(max_length=MAX_SCHED_BATCH)] = \
        msgspec.field(default_factory=list)
    """Outcomes of tasks the caller ran for the answering node (each a ``task.done`` of
    its own would carry; ``node`` must be the caller), taken before ``payloads``: a
    task's ``Result`` may follow its outcome in the same call."""


class SchedAck(msgspec.Struct):
    """Received (the scheduler answers with messages of its own, later)."""


class SchedReply(msgspec.Struct):
    """``sched.exchange``'s answer: received, and the answering node's scheduling messages
    for the caller that were waiting to be sent (its answers to the request's, most
    often: a ``GetTask`` answered by its ``Grant``), for the caller to handle in order as
    if they had come in a ``sched.batch`` of their own. None while the answering node has
    a call of its own to the caller on the way (they follow it, in their own call)."""

    payloads: Annotated[list[Annotated[bytes, msgspec.Meta(
        max_length=MAX_SCHED_MESSAGE_BYTES)]], msgspec.Meta(
        max_length=MAX_SCHED_BATCH)] = msgspec.field(default_factory=list)
    boot: Annotated[str, msgspec.Meta(max_length=64)] = ""
    """The answering process's boot (``LoadReport.boot``): the caller notes it before it
    handles ``payloads``, as a request's is noted before its messages."""


TASK_SUBMIT: Method[SubmitRequest, SubmitReply] = Method("task.submit", SubmitRequest,
                                                         SubmitReply)
TASK_RESULT: Method[ResultRequest, TaskView] = Method("task.result", ResultRequest, TaskView)
TASK_WAIT: Method[WaitRequest, WaitReply] = Method("task.wait", WaitRequest, WaitReply)
TASK_CANCEL: Method[CancelRequest, CancelReply] = Method("task.cancel", CancelRequest,
                                                         CancelReply)
TASK_LIST: Method[ListRequest, list[TaskRow]] = Method("task.list", ListRequest,
                                                       list[TaskRow])
TASK_STATS: Method[Empty, TaskStats] = Method("task.stats", Empty, TaskStats)
TASK_LOGS: Method[LogsRequest, TaskLogs] = Method("task.logs", LogsRequest, TaskLogs)
TASK_DONE: Method[DoneRequest, DoneReply] = Method("task.done", DoneRequest, DoneReply)
TASK_FN: Method[FnRequest, FnReply] = Method("task.fn", FnRequest, FnReply)
TASK_KILL: Method[KillRequest, KillReply] = Method("task.kill", KillRequest, KillReply)
SCHED_MSG: Method[SchedMsgRequest, SchedAck] = Method("sched.msg", SchedMsgRequest, SchedAck)
SCHED_BATCH: Method[SchedBatchRequest, SchedAck] = Method("sched.batch", SchedBatchRequest,
                                                          SchedAck)
SCHED_LOAD: Method[LoadReport, LoadReport] = Method("sched.load", LoadReport, LoadReport)
SCHED_EXCHANGE: Method[SchedExchangeRequest, SchedReply] = Method(
    "sched.exchange", SchedExchangeRequest, SchedReply)
"""``sched.batch`` with outcomes (``task.done``'s) ahead of its messages, whose reply
carries the answering node's messages for the caller: a round trip's answer rides back in
it instead of in a call of its own, and an outcome travels with its ``Result``."""

METHODS: tuple[Method[Any, Any], ...] = (
    TASK_SUBMIT, TASK_RESULT, TASK_WAIT, TASK_CANCEL, TASK_LIST, TASK_STATS, TASK_LOGS,
    TASK_DONE,
    TASK_FN, TASK_KILL, SCHED_MSG, SCHED_BATCH, SCHED_LOAD, SCHED_EXCHANGE)
