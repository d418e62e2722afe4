"""Task records at their owner, their lifecycle, and the takeover of a dead owner's tasks.

After Wang et al., "Ownership: A Distributed Futures System for Fine-Grained Tasks",
NSDI 2021: the node a task is submitted to *owns* it. It keeps the task's record, accepts
the first outcome a worker reports (task ids are idempotency keys: later outcomes are
dropped), and answers whoever asks for the result. ``core/scheduling.py`` decides where a
task runs; this module decides what its owner knows about it and who owns it when the
owner is gone. Both the node (``runtime/compute.py``) and the simulator
(``sim/compute.py``) drive it.

Lifecycle. A record is in one ``TaskState``; ``TRANSITIONS`` names every legal move and
``move`` refuses the rest (``IllegalTransition``), so a driver cannot, say, finish a task
twice or revive a cancelled one::

    submit -> PENDING --bind--> RUNNING --done/fail/cancel--> DONE | FAILED | CANCELLED
              ^   |               |
              +---+--requeue------+   (a worker crashed with retries left, an outcome lost)
              +------adopt--------+   (a new owner took the task over: PENDING again)

Terminal states have no way out. ``TaskBook`` holds the records a node owns and makes
the owner's decisions: first outcome wins; a worker crash is retried up to the record's
``retries``; a result the scheduler accepted without the outcome reaching the owner is
run again (same bound), else failed as lost.

Memory. A live task keeps its full ``TaskRecord`` (arguments, resources, rules: what
running it again needs). When it ends, ``finish`` hands the full record back to the
driver (it writes it to the store, where takeover and late questions read it) and keeps
only an ``Ended``: what a ``tasks`` listing and a result question need (ids, state,
node, placement reason, times, error and the result itself), with its repeated strings
(owner, function id, node, name) interned, so ended tasks of one map share them. The
book keeps at most ``max_records`` of them (10,000), the oldest dropped first; a
question about a dropped one is answered from the store (the replicated KV, on disk).

Measured (CPython 3.11, tracemalloc over 20,000 ended no-ops of a map, each with its
39-byte task id, a 99-byte placement reason and its 5-byte pickled result, the strings
made afresh as a decoder makes them): ``ENDED_BYTES`` = 551 bytes per ended task held
(the ``Ended``, its own strings and bytes, its slot in the book's map), against 1,340
for the full record kept before (``TaskRecord``, ``Entry`` and their per-record lists
and strings). The task id, reason and result are about 280 of the 551. So the memory
an owner spends on ended tasks is at most ``max_records`` x ~550 bytes (5.5 MB at the
default) plus what the kept results hold beyond a no-op's, however many tasks it owned.

Durability and takeover (the runtime writes records to the replicated KV at submit,
before the submit is acknowledged, and again when a task ends, within
``RECORD_WINDOW_S``, in batches: ``RecordQueue``; the simulator models that store).
When a node is asked for a task it does not hold, it reads the record and ``lookup``
decides:

- terminal record: answer it;
- owner alive in the asker's view (and not the asker): ask the owner;
- owner is the asker itself (it restarted and lost its memory) or the owner is dead and
  the asker is the task's *adopter*: adopt it (``TaskBook.adopt``): the record's owner
  becomes this node, its state PENDING, ``adoptions`` + 1, and it is scheduled again;
- owner dead and another node is the adopter: forward the question there.

The adopter of a task is the live node with the highest rendezvous score for the task
id (``core/placement.hrw_score``) in the asker's view, so two nodes that agree on who is
alive pick the same adopter and a task is adopted once, however many clients ask however
many nodes. A forwarded question is never forwarded again (the node it reaches adopts
instead), so views that disagree cost one extra hop, never a loop.

At-least-once window. A task can still be run by two owners when views disagree (two
askers that each see the other dead, a forward that fails, an owner declared dead while
it is only slow): each owner accepts one outcome, the client takes the first it is
given, and the KV keeps the last one written. Functions are expected to be idempotent,
as in Ray and Dask; the simulator counts these double adoptions (``double_owners``).
"""

from __future__ import annotations

import enum
import re
import sys
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import msgspec

from meshscale.core.placement import Residency, hrw_score

__all__ = [
    "ENDED_BYTES",
    "RECORD_BATCH_BYTES",
    "RECORD_BATCH_ITEMS",
    "RECORD_WINDOW_S",
    "TERMINAL",
    "TRANSITIONS",
    "Ended",
    "Entry",
    "FunctionPayload",
    "IllegalTransition",
    "Lookup",
    "LookupAction",
    "RecordQueue",
    "TaskBook",
    "TaskDetail",
    "TaskPayload",
    "TaskRecord",
    "TaskState",
    "Unrecorded",
    "UpstreamFailure",
    "Verdict",
    "adopter",
    "decode_detail",
    "decode_function",
    "decode_payload",
    "detail_note",
    "detail_withheld",
    "encode_detail",
    "encode_function",
    "encode_payload",
    "function_scope",
    "lookup",
    "move",
    "payload_missing",
    "payload_ref",
    "stored_record",
    "upstream_failure",
]


class TaskState(enum.StrEnum):
    PENDING = "pending"
    """Submitted or adopted, not (yet, or no longer) bound to a worker."""
    RUNNING = "running"
    """Bound: a worker has it."""
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: frozenset[str] = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED})
_LIVE = frozenset({TaskState.PENDING, TaskState.RUNNING})

TRANSITIONS: dict[str, tuple[frozenset[TaskState], TaskState]] = {
    "bind": (_LIVE, TaskState.RUNNING),
    "requeue": (_LIVE, TaskState.PENDING),
    "adopt": (_LIVE, TaskState.PENDING),
    "done": (_LIVE, TaskState.DONE),
    "fail": (_LIVE, TaskState.FAILED),
    "cancel": (_LIVE, TaskState.CANCELLED),
}
"""Move name -> (states it may start from, state it ends in)."""


class IllegalTransition(ValueError):
    """A move the lifecycle does not allow from the record's state."""


class TaskRecord(msgspec.Struct, omit_defaults=True):
    """A task's record: in memory at its owner and, msgpack-encoded, in the KV."""

    task_id: str
    owner: str
    fn_id: str
    state: TaskState = TaskState.PENDING
    node: str = ""
    args: bytes | None = None
    inputs: list[str] = []
    cpus: float = 1.0
    memory_mb: int = 0
    gpus: int = 0
    labels: dict[str, str] = {}
    residency: list[str] | None = None
    data_class: str | None = None
    placement: dict[str, Any] | None = None
    retries: int = 3
    timeout_s: float | None = None
    value: bytes | None = None
    ref: dict[str, Any] | None = None
    error: str = ""
    kind: str = ""
    traceback: str = ""
    reason: str = ""
    submitted: float = 0.0
    finished: float = 0.0
    attempts: int = 0
    adoptions: int = 0
    previous_owner: str = ""
    submitter: str = ""
    name: str = ""
    """The function's name (listings and metrics)."""
    after: list[str] = []
    """Upstream task ids whose results are arguments of this one (futures passed in): the
    owner waits for them to end before it schedules this task (``upstream_failure``)."""
    exc: bytes | None = None
    """The raised exception, pickled by the worker (``raised``), when it could be."""
    energy_j: float = 0.0
    """Joules the task's attempts drew at the nodes that ran them (each node's draw split
    over its running tasks by slots: ``core.capacity.TaskEnergy``), as the workers
    reported them with their outcomes."""
    result_class: str | None = None
    """The data class of the task's result (``core.policy.result_rule``: the declared
    class, else its inputs' strictest), set when the owner schedules it. A classed result
    is always stored as an object of the class; only its reference reaches the owner."""
    detail_ref: dict[str, Any] | None = None
    """A classed task's error, traceback, exception and output, stored by its runner as
    one object of its class (``core.policy.detail_rule``, ``TaskDetail``): ``id``,
    ``size`` and ``data_class``. Set, the record's ``error`` is ``detail_note``'s and it
    keeps no traceback, exception or output of its own."""
    payload_ref: dict[str, Any] | None = None
    """Set on a task whose arguments are class data (``core.policy.payload_rule``): its
    pickled arguments are kept as one object under that rule (``TaskPayload``), never in
    the KV record (``stored_record``): ``id`` (empty while the object is being stored, or
    when it could not be), ``size``, ``data_class`` (empty: a rule of regions only) and
    ``fn``, the object its pickled function is kept in under the same rule
    (``FunctionPayload``; a function can carry captured data), instead of the
    unclassed ``b3-<fn_id>`` an unruled task's function is stored as."""


class TaskPayload(msgspec.Struct, omit_defaults=True):
    """The data of a task whose arguments are class data, stored by its owner as one
    object under the task's payload rule (``core.policy.payload_rule``), msgpack-encoded
    (``encode_payload``). The KV record (``task/<id>``, ``taskset/<prefix>``) keeps only
    its reference (``TaskRecord.payload_ref``); a node that takes the task over reads it
    (an ordinary object read: the class's read rule applies). The task id makes the
    object one task's own (two tasks with the same arguments do not share it)."""

    task_id: str
    args: bytes


class FunctionPayload(msgspec.Struct, omit_defaults=True):
    """The pickled function of a task with a payload rule (cloudpickle: its closure
    cells, defaults and globals pickled by value are data the caller captured), stored
    once per function and rule by the owner under that rule (``encode_function``); the
    ``scope`` (``function_scope``) makes the object the rule's own, so a function used
    under two rules, or also unruled, is never one object with two rules."""

    scope: str
    fn: bytes


def function_scope(rule: Residency) -> str:
    """``FunctionPayload.scope`` of a function kept under ``rule``."""
    regions = "*" if rule.regions is None else ",".join(sorted(rule.regions))
    return f"{rule.data_class or ''}@{regions}"


_function_encoder = msgspec.msgpack.Encoder()
_function_decoder = msgspec.msgpack.Decoder(FunctionPayload)


def encode_function(fn: bytes, rule: Residency) -> bytes:
    return _function_encoder.encode(FunctionPayload(function_scope(rule), fn))


def decode_function(data: bytes) -> bytes:
    """The pickled function a stored ``FunctionPayload`` holds; ``ValueError`` for bytes
    that are not one (the caller checks the bytes against the function id)."""
    try:
        return _function_decoder.decode(data).fn
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"not a task function object: {e}") from None


_payload_encoder = msgspec.msgpack.Encoder()
_payload_decoder = msgspec.msgpack.Decoder(TaskPayload)


def encode_payload(p: TaskPayload) -> bytes:
    return _payload_encoder.encode(p)


def decode_payload(data: bytes, task_id: str) -> TaskPayload:
    """Stored payload of ``task_id``; ``ValueError`` for bytes that are not one, or that
    are another task's."""
    try:
        p = _payload_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"not a task payload object: {e}") from None
    if p.task_id != task_id:
        raise ValueError(f"the payload object is of task {p.task_id[:80]!r}, not {task_id!r}")
    return p


def payload_ref(object_id: str, size: int, data_class: str | None,
                fn: str = "") -> dict[str, Any]:
    """``TaskRecord.payload_ref`` of a payload stored as ``object_id`` (``""``: not stored,
    yet or at all; the record still holds none of the arguments) and its function stored
    as ``fn`` (``FunctionPayload``; ``""``: not stored)."""
    return {"id": object_id, "size": size, "data_class": data_class or "", "fn": fn}


def stored_record(rec: TaskRecord) -> TaskRecord:
    """What the replicated KV holds of ``rec`` (``task/<id>``, and each record of a
    ``taskset/<prefix>``): ``rec`` itself for a task whose arguments are not class data
    (no copy: the hot path), else ``rec`` without its arguments, which live only in the
    payload object ``payload_ref`` names (or nowhere but the owner's memory, while that
    object is being stored or when it could not be). State, node, class, resources and
    the outcome (a classed task's result and detail are references already) stay."""
    if rec.payload_ref is None or rec.args is None:
        return rec
    return msgspec.structs.replace(rec, args=None)


def payload_missing(rec: TaskRecord, why: str = "") -> str:
    """Why a taken-over ``rec`` cannot run again for want of its arguments (the error it
    fails with): its record never held them, and its payload object was not stored or
    could not be read here (``why``: the read's refusal, which names the rule)."""
    ref = rec.payload_ref or {}
    cls = str(ref.get("data_class") or "")
    oid = str(ref.get("id") or "")
    where = f"object {oid}" if oid else "an object that was never stored"
    return (f"owner {rec.owner} died; the task's arguments are class data"
            + (f" of class {cls}" if cls else "") + f", kept in {where}, not in its "
            "record" + (f", and this node cannot read them: {why}" if why else ""))


class TaskDetail(msgspec.Struct, omit_defaults=True):
    """What a classed task raised and printed, stored as one object of its class by the
    node that ran it (``core.policy.detail_rule``), msgpack-encoded (``encode_detail``):
    its owner, maybe outside the class's regions, gets only its reference
    (``TaskRecord.detail_ref``) and ``detail_note``."""

    task_id: str
    kind: str = ""
    error: str = ""
    traceback: str = ""
    exc: bytes | None = None
    stdout: str = ""
    stderr: str = ""


_detail_encoder = msgspec.msgpack.Encoder()
_detail_decoder = msgspec.msgpack.Decoder(TaskDetail)


def encode_detail(d: TaskDetail) -> bytes:
    return _detail_encoder.encode(d)


def decode_detail(data: bytes) -> TaskDetail:
    """A stored ``TaskDetail``; ``ValueError`` for bytes that are not one."""
    try:
        return _detail_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"not a task detail object: {e}") from None


_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,199}")


def detail_note(kind: str, error: str, object_id: str, data_class: str) -> str:
    """The error text that travels inline for a classed task whose detail is stored as
    object ``object_id`` of ``data_class``: no task data, only the exception's type name
    (from ``error``, ``Type: message`` as a worker writes a raised one) or the failure
    ``kind``, and where the rest is kept."""
    what = "the task's output is"
    if kind:
        head = error.partition(":")[0].strip()
        name = head if kind == "raised" and _TYPE_NAME.fullmatch(head) else kind
        what = f"{name}: the message, traceback and output are"
    return (f"{what} kept as object {object_id} of class {data_class} (readable from "
            "within the class's regions)")


def detail_withheld(kind: str, error: str, data_class: str, why: str) -> str:
    """The error text that travels inline for a classed task whose detail could not be
    kept as an object of its class (``why``): like ``detail_note``, no task data; the
    detail is dropped rather than sent out of the class's regions."""
    head = error.partition(":")[0].strip()
    name = head if kind == "raised" and _TYPE_NAME.fullmatch(head) else (kind or "output")
    return (f"{name}: the message, traceback and output of this task of class "
            f"{data_class} are withheld ({why})")


ENDED_BYTES = 551
"""Measured memory of one ended no-op in the book (see the module docstring)."""


class Ended(msgspec.Struct, array_like=True, gc=False):
    """What the owner keeps in memory of a task that has ended: the fields a ``tasks``
    listing and a result question read (``TaskRow``, ``TaskView``). Not tracked by the
    cycle collector (``gc=False``): its fields are strings, numbers, bytes and a flat
    dict, which cannot form a cycle."""

    task_id: str
    owner: str
    fn_id: str
    state: TaskState
    node: str
    name: str
    reason: str
    error: str
    kind: str
    traceback: str
    value: bytes | None
    ref: dict[str, Any] | None
    exc: bytes | None
    submitted: float
    finished: float
    attempts: int
    adoptions: int
    previous_owner: str
    energy_j: float = 0.0
    detail_ref: dict[str, Any] | None = None

    @classmethod
    def of(cls, r: TaskRecord) -> Ended:
        """The part of ended record ``r`` the owner keeps."""
        if r.state not in TERMINAL:
            raise ValueError(f"task {r.task_id} has not ended ({r.state})")
        intern = sys.intern
        return cls(r.task_id, intern(r.owner), intern(r.fn_id), r.state, intern(r.node),
                   intern(r.name), r.reason, r.error, intern(r.kind), r.traceback, r.value,
                   r.ref, r.exc, r.submitted, r.finished, r.attempts, r.adoptions,
                   intern(r.previous_owner), r.energy_j, r.detail_ref)

    def record(self) -> TaskRecord:
        """A ``TaskRecord`` with what is kept (the rest at its defaults)."""
        return TaskRecord(
            task_id=self.task_id, owner=self.owner, fn_id=self.fn_id, state=self.state,
            node=self.node, name=self.name, reason=self.reason, error=self.error,
            kind=self.kind, traceback=self.traceback, value=self.value, ref=self.ref,
            exc=self.exc, submitted=self.submitted, finished=self.finished,
            attempts=self.attempts, adoptions=self.adoptions,
            previous_owner=self.previous_owner, energy_j=self.energy_j,
            detail_ref=self.detail_ref)


def move(rec: TaskRecord, name: str) -> None:
    """Apply the move ``name`` to ``rec`` (``IllegalTransition`` if its state forbids it)."""
    allowed, to = TRANSITIONS[name]
    if rec.state not in allowed:
        raise IllegalTransition(f"task {rec.task_id}: cannot {name} a {rec.state} task")
    rec.state = to


# --------------------------------------------------------------------------- the book


class Verdict(enum.StrEnum):
    ACCEPTED = "accepted"
    """The outcome ended the task."""
    DUPLICATE = "duplicate"
    """The task had already ended (or is unknown here): dropped."""
    RETRY = "retry"
    """A worker crash with retries left: the task runs again when the scheduler says
    the attempt is over (``scheduler_finished`` then answers ``"resubmit"``)."""
    STOPPED = "stopped"
    """From a node the task was stopped on (its class no longer allows the node's
    region: ``core.scheduling.TaskStopped``): dropped; the task runs elsewhere."""


@dataclass(eq=False, slots=True)
class Entry:
    """A live task (pending or running) at its owner."""

    rec: TaskRecord
    t0: float
    """When this node took the task (submit or adoption), on the driver's clock."""
    group: object | None = None
    """The driver's handle on the set of records written together, if any."""
    resubmit: bool = False
    crash_retries: int = 0
    waiters: int = 0
    """Callers waiting on this task (they hold the entry: it stays theirs when the task
    ends and the book keeps only its ``Ended``)."""
    stopped_on: frozenset[str] = frozenset()
    """Nodes the task was stopped on (``stopped``): their outcomes are dropped."""


@dataclass
class TaskBook:
    """The records one node owns, and the owner's decisions about them."""

    name: str
    max_records: int = 10_000
    """``Ended`` records kept; the oldest beyond it are dropped (the store has them)."""
    records: OrderedDict[str, Entry] = field(default_factory=OrderedDict)
    """Live tasks (pending or running), oldest first."""
    ended: OrderedDict[str, Ended] = field(default_factory=OrderedDict)
    """Ended tasks, in the order they ended."""
    stats: dict[str, int] = field(default_factory=dict)

    def get(self, task_id: str) -> Entry | None:
        """The live task ``task_id`` (None: ended, or not owned here)."""
        return self.records.get(task_id)

    def find(self, task_id: str) -> TaskRecord | Ended | None:
        """What this node knows of ``task_id``: the full record while it lives, its
        ``Ended`` after."""
        e = self.records.get(task_id)
        return e.rec if e is not None else self.ended.get(task_id)

    def record(self, task_id: str) -> TaskRecord | None:
        """``find`` as a ``TaskRecord`` (an ended one with what is kept)."""
        found = self.find(task_id)
        return found.record() if isinstance(found, Ended) else found

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.records or task_id in self.ended

    def __len__(self) -> int:
        return len(self.records) + len(self.ended)

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def add(self, rec: TaskRecord, now: float, group: object | None = None) -> Entry:
        """A task submitted here (state PENDING, owner this node)."""
        if rec.owner != self.name:
            raise ValueError(f"task {rec.task_id} is owned by {rec.owner}, not {self.name}")
        if rec.task_id in self:
            raise ValueError(f"task {rec.task_id} is already owned here")
        e = Entry(rec, now, group)
        self.records[rec.task_id] = e
        self._count("submitted")
        return e

    def bound(self, task_id: str, node: str, attempt: int, reason: str) -> Entry | None:
        """The scheduler bound the task to ``node``."""
        e = self.records.get(task_id)
        if e is None or e.rec.state in TERMINAL:
            return None
        move(e.rec, "bind")
        e.rec.node, e.rec.attempts, e.rec.reason = node, attempt, reason
        return e

    def outcome(self, task_id: str, *, ok: bool, kind: str = "", node: str = "") -> Verdict:
        """A worker's outcome (from ``node``): the first one wins, unless it comes from a
        node the task was stopped on. The driver then calls ``finish`` on an ``ACCEPTED``
        verdict."""
        e = self.records.get(task_id)
        if e is None or e.rec.state in TERMINAL:
            self._count("outcomes_duplicate")
            return Verdict.DUPLICATE
        if node and node in e.stopped_on:
            self._count("outcomes_dropped.stopped")
            return Verdict.STOPPED
        if not ok and kind == "worker_crashed" and e.crash_retries < e.rec.retries:
            e.resubmit = True
            return Verdict.RETRY
        return Verdict.ACCEPTED

    def stopped(self, task_id: str, node: str) -> None:
        """The scheduler stopped ``task_id`` on ``node`` (``TaskStopped``): an outcome
        from that node no longer counts."""
        e = self.records.get(task_id)
        if e is not None:
            e.stopped_on = e.stopped_on | {node}

    def scheduler_finished(self, task_id: str) -> str | None:
        """The scheduler accepted a result for the task (its attempt is over). If the task
        has not ended here, its outcome never arrived or the worker crashed: ``"resubmit"``
        (state back to PENDING; the driver submits it again) while retries last, else
        ``"lost"`` (the driver fails it). None: nothing to do."""
        e = self.records.get(task_id)
        if e is None or e.rec.state in TERMINAL:
            return None
        if e.resubmit or e.crash_retries < e.rec.retries:
            e.resubmit = False
            e.crash_retries += 1
            move(e.rec, "requeue")
            self._count("resubmitted")
            return "resubmit"
        return "lost"

    def finish(self, e: Entry, state: TaskState, now: float, *, value: bytes | None = None,
               ref: dict[str, Any] | None = None, error: str = "", kind: str = "",
               traceback: str = "", node: str | None = None,
               exc: bytes | None = None,
               detail_ref: dict[str, Any] | None = None) -> TaskRecord:
        """End the task (``now`` is wall-clock seconds, stored as ``finished``). Returns
        the full record (for the store); the book keeps its ``Ended``."""
        r = e.rec
        move(r, {TaskState.DONE: "done", TaskState.FAILED: "fail",
                 TaskState.CANCELLED: "cancel"}[state])
        r.value, r.ref, r.error, r.kind, r.traceback = value, ref, error, kind, traceback
        r.exc, r.detail_ref = exc, detail_ref
        if node:
            r.node = node
        r.finished = now
        r.args = None  # not needed any more: keeps memory and the KV record small
        self._count("tasks_" + state)
        if self.records.get(r.task_id) is e:
            del self.records[r.task_id]
            self.ended[r.task_id] = Ended.of(r)
            self.evict()
        return r

    def evict(self) -> int:
        """Drop the oldest ``Ended`` records, down to ``max_records``."""
        dropped = 0
        while len(self.ended) > self.max_records:
            self.ended.popitem(last=False)
            dropped += 1
        if dropped:
            self._count("ended_evicted", dropped)
        return dropped

    def adopt(self, rec: TaskRecord, now: float, *,
              payload_error: str = "") -> tuple[Entry, str | None]:
        """Take over ``rec`` (read from the store; its owner is dead, or is this node
        after a restart). Returns the new entry and, if the task cannot run again, why
        (the driver then fails it with that reason). A record whose arguments are kept
        in a payload object (``payload_ref``) comes with them read back by the driver,
        or with ``payload_error``, why they could not be."""
        if rec.task_id in self:
            raise ValueError(f"task {rec.task_id} is already owned here")
        new = msgspec.structs.replace(rec, owner=self.name, node="",
                                      adoptions=rec.adoptions + 1,
                                      previous_owner=rec.owner)
        move(new, "adopt")
        e = Entry(new, now)
        self.records[new.task_id] = e
        self._count("tasks_adopted")
        if new.args is None and new.payload_ref is not None:
            return e, payload_missing(rec, payload_error)
        if new.args is None:
            return e, (f"owner {rec.owner} died and the record has no arguments to run "
                       "it again")
        return e, None


# --------------------------------------------------------------------------- task sets

GROUP_FLUSH_MIN_S = 0.05
"""The soonest a task set's record (``taskset/<prefix>``) is rewritten after one of its
tasks ended."""
GROUP_FLUSH_MAX_S = 1.0
"""The latest: how long an ended task of a set may stay pending in the set's record."""
GROUP_FLUSH_BYTES_PER_S = 256 * 1024
"""What rewriting one set's record may cost, in bytes written per second."""


def group_flush_delay_s(record_bytes: int) -> float:
    """How long an owner waits, once a task of a set has ended, before it rewrites the
    set's record (every task's state in one KV value, ``record_bytes`` long when last
    written): ends within that time are written together.

    A rewrite costs the whole record, and a set of a large ``map`` has hundreds of tasks
    that end one by one: at a fixed 50 ms a 512-task set (~130 KB for no-ops) was
    rewritten 20 times a second while its tasks ran, ~40 KB of quorum writes per task
    ended, the owner's largest cost per task. So the wait grows with the record (at most
    ``GROUP_FLUSH_BYTES_PER_S`` per set), from ``GROUP_FLUSH_MIN_S`` up to
    ``GROUP_FLUSH_MAX_S``. An owner that dies inside the wait leaves those ends pending
    in the record, so a node taking over runs the tasks again (as after a lost
    ``task.done``: at least once, the first result wins)."""
    if record_bytes < 0:
        raise ValueError(f"record_bytes must be >= 0, not {record_bytes}")
    return min(GROUP_FLUSH_MAX_S, max(GROUP_FLUSH_MIN_S, record_bytes / GROUP_FLUSH_BYTES_PER_S))


# --------------------------------------------------------------------------- record writes

RECORD_WINDOW_S = 0.05
"""The longest a record that nothing waits for (a task's end) stays unwritten, gathering
others to go with it (``RecordQueue``)."""
RECORD_BATCH_ITEMS = 256
"""Records written together at most (``core.api.objects.MAX_KV_BATCH_ITEMS``)."""
RECORD_BATCH_BYTES = 2 * 1024 * 1024
"""Their bytes at most, beyond the first (``core.api.objects.MAX_KV_BATCH_BYTES``)."""


class Unrecorded:
    """When a node asked about a task it neither owns nor finds in the store may call it
    unknown.

    A task's only record can still be on its way to the store while its caller already
    has the outcome: a submit answered with its tasks' outcomes (the submit grace) has no
    submit record, and its end waits up to the owner's record window (``RecordQueue``)
    and then for the write itself. Another node asked meanwhile finds nothing; answering
    "unknown" then is wrong (a client takes it as the task's end: failed, its record
    lost). So a missing record is "not yet" until it has been missing, as seen by this
    node, for ``grace_s`` (the record window plus a write's time), then "unknown"; an id
    no node ever had is answered so after that wait. The first miss of each id is kept
    for at most ``max_ids`` ids, the oldest dropped first (a dropped id's wait starts
    again: later, never wrong). Sans-I/O: times are the driver's monotonic clock."""

    def __init__(self, grace_s: float, max_ids: int = 4096) -> None:
        if not (grace_s >= 0 and max_ids >= 1):
            raise ValueError(f"bad unrecorded bounds: grace {grace_s} s, {max_ids} ids")
        self.grace_s = grace_s
        self.max_ids = max_ids
        self._since: OrderedDict[str, float] = OrderedDict()

    def missing(self, task_id: str, now: float) -> bool:
        """The store has no record of ``task_id`` now: True when it is to be answered
        unknown (missing for ``grace_s`` since its first miss here), else not yet."""
        first = self._since.get(task_id)
        if first is None or now < first:  # a clock gone back starts the wait again
            self._since[task_id] = first = now
            while len(self._since) > self.max_ids:
                self._since.popitem(last=False)
        if now - first >= self.grace_s:
            del self._since[task_id]
            return True
        return False

    def found(self, task_id: str) -> None:
        """The record (or the task) turned up: its wait is over."""
        self._since.pop(task_id, None)

    def __len__(self) -> int:
        return len(self._since)


class RecordQueue:
    """An owner's record writes, coalesced: when each goes to the store, and with which.

    A record write is a quorum write to three replicas' SQLite (a transaction and an
    fsync each, and a round trip to each): about 4 ms of CPU across a loaded mesh, more
    than the rest of a no-op task's path (issue #19). So records go in batches: the
    driver writes each batch as one ``kv.put_batch`` (each key keeps its own stamp,
    replicas and quorum; each replica takes all of its keys in one transaction).

    - an *urgent* record (one a caller waits for: a submit is acknowledged only once its
      records are durable; an adoption) makes the queue due at once: the driver writes
      it at the end of the loop turn, with every record put in that turn and every
      record waiting. No timer is added to a lone call;
    - a record nothing waits for (a task's end, written after its outcome was answered)
      waits at most ``window_s`` for others, so a run of lone tasks shares writes. An
      owner that dies inside the window leaves that end unwritten: a task whose
      submit record is in the store is then run again by the node taking it over (at
      least once, as after a lost ``task.done``; the first result wins), and one whose
      outcome was already answered with its submit, before any record was written, is
      not in the store at all (its caller has the outcome);
    - a key put again before it was written is written once, with its last value (a
      task that ended before its submit record went out is written once, ended);
    - a batch holds at most ``max_items`` records and ``max_bytes`` (beyond its first);
      at most ``max_in_flight`` batches are written at once, the rest wait their turn.

    Sans-I/O: the driver puts, asks ``due`` and ``deadline`` (its one timer), ``take``s
    a batch when due and says when it was ``written``. Times are the driver's monotonic
    clock. Memory: one pending value per key, and keys are records an owner holds."""

    def __init__(self, window_s: float = RECORD_WINDOW_S, *,
                 max_items: int = RECORD_BATCH_ITEMS, max_bytes: int = RECORD_BATCH_BYTES,
                 max_in_flight: int = 4) -> None:
        if window_s < 0 or max_items < 1 or max_bytes < 1 or max_in_flight < 1:
            raise ValueError(f"bad record queue bounds: window {window_s} s, {max_items} "
                             f"items, {max_bytes} bytes, {max_in_flight} in flight")
        self.window_s = window_s
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_in_flight = max_in_flight
        self._pending: dict[str, tuple[bytes, float]] = {}
        """Key -> (value, when first put since last written), oldest first."""
        self._urgent: set[str] = set()
        self._bytes = 0
        self.in_flight = 0
        self.stats: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def put(self, key: str, value: bytes, now: float, *, urgent: bool = False) -> None:
        """Record ``key`` is to be written with ``value`` (replacing a value put before
        and not yet taken)."""
        old = self._pending.get(key)
        if old is not None:
            self._bytes -= len(old[0])
            self._pending[key] = (value, old[1])
            self._count("records_replaced")
        else:
            self._pending[key] = (value, now)
        self._bytes += len(value)
        if urgent:
            self._urgent.add(key)

    def hurry(self) -> None:
        """Every record waiting is due at once (the owner is stopping)."""
        self._urgent.update(self._pending)

    def due(self, now: float) -> bool:
        """Should a batch be taken now?"""
        if not self._pending or self.in_flight >= self.max_in_flight:
            return False
        if self._urgent or len(self._pending) >= self.max_items or \
                self._bytes >= self.max_bytes:
            return True
        return now >= next(iter(self._pending.values()))[1] + self.window_s

    def deadline(self) -> float | None:
        """When the oldest record waiting will be due by time alone (None: none waits,
        or only for a batch in flight to be written)."""
        if not self._pending or self.in_flight >= self.max_in_flight:
            return None
        return next(iter(self._pending.values()))[1] + self.window_s

    def take(self) -> list[tuple[str, bytes]]:
        """The next batch, oldest first (the driver writes it, then calls ``written``)."""
        out: list[tuple[str, bytes]] = []
        size = 0
        for key, (value, _) in self._pending.items():
            if out and (len(out) >= self.max_items or size + len(value) > self.max_bytes):
                break
            out.append((key, value))
            size += len(value)
        for key, value in out:
            del self._pending[key]
            self._urgent.discard(key)
            self._bytes -= len(value)
        if out:
            self.in_flight += 1
            self._count("batches")
            self._count("records", len(out))
        return out

    def written(self) -> None:
        """A batch ``take`` gave was written (or failed)."""
        if self.in_flight <= 0:
            raise ValueError("no batch in flight")
        self.in_flight -= 1


# --------------------------------------------------------------------------- takeover


class LookupAction(enum.StrEnum):
    ANSWER = "answer"
    ASK_OWNER = "ask-owner"
    ADOPT = "adopt"
    FORWARD = "forward"


@dataclass(frozen=True)
class Lookup:
    action: LookupAction
    node: str = ""
    """The owner to ask, or the adopter to forward to."""


def adopter(task_id: str, alive: Collection[str]) -> str:
    """The node that takes over ``task_id``: the highest rendezvous score among ``alive``."""
    if not alive:
        raise ValueError("no live node to adopt the task")
    return max(alive, key=lambda n: (hrw_score(task_id, n), n))


def lookup(rec: TaskRecord, me: str, alive: Collection[str], *,
           forwarded: bool = False) -> Lookup:
    """What node ``me``, asked for a task it does not hold, does with the stored ``rec``.
    ``alive``: the nodes ``me`` believes alive (``me`` is added). ``forwarded``: the
    question was forwarded here by another node, so it is not forwarded again."""
    if rec.state in TERMINAL:
        return Lookup(LookupAction.ANSWER)
    if rec.owner == me:
        return Lookup(LookupAction.ADOPT)
    if rec.owner in alive:
        return Lookup(LookupAction.ASK_OWNER, rec.owner)
    chosen = adopter(rec.task_id, {*alive, me})
    if chosen == me or forwarded:
        return Lookup(LookupAction.ADOPT)
    return Lookup(LookupAction.FORWARD, chosen)


# --------------------------------------------------------------------------- upstream tasks


@dataclass(frozen=True)
class UpstreamFailure:
    """Why a task cannot run: an upstream task whose result it takes did not produce one."""

    error: str
    kind: str
    traceback: str = ""
    exc: bytes | None = None


def upstream_failure(upstream: list[tuple[str, str, str, str, str, bytes | None]]
                     ) -> UpstreamFailure | None:
    """The failure a task inherits from its upstream tasks, given as ``(task_id, state,
    kind, error, traceback, exc)`` each once all have ended, in argument order: the first
    that did not end ``done`` fails this task with kind ``upstream``, its id and error in
    the message, and its traceback and pickled exception (so the caller can raise the
    upstream's own exception type). None: every upstream task is done; run it."""
    for task_id, state, kind, error, traceback, exc in upstream:
        assert state in TERMINAL, f"upstream task {task_id} has not ended ({state})"
        if state != TaskState.DONE:
            what = "was cancelled" if state == TaskState.CANCELLED else "failed"
            return UpstreamFailure(
                error=f"upstream task {task_id} {what} ({kind or state}): {error}",
                kind="upstream", traceback=traceback, exc=exc)
    return None
