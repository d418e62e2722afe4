"""The node's compute plane: the driver of ``core.scheduling`` and the warm ``WorkerPool``.

Decisions (which node runs a task, late binding, re-placement, one result per task id)
are made by ``core.scheduling.Scheduler``; this module moves bytes and keeps records,
the way ``runtime/data/`` drives ``core.replication``:

- one ``Scheduler`` and one ``WorkerPool`` (one warm process per CPU of capacity) per
  node, one timer, ``_pump`` after every call into the scheduler;
- ``SendMessage`` goes to the peer's ``sched.exchange`` RPC (``sched.batch`` /
  ``sched.msg`` to an older agent; typed in ``core/api/tasks.py``; the message itself
  stays the bytes ``core.scheduling`` encoded), several queued for one peer in one call.
  The reply carries the messages the peer then has waiting for us (its answers: a
  ``GetTask``'s ``Grant`` or ``NoTask``, reservations), unless a call of its own to us
  is on the way; and a worker's outcome for a remote owner goes in the same call, ahead
  of the task's ``Result`` and with the slot's next ``GetTask`` (``task.done`` only for
  large outcomes, a failed call's outcomes, and older owners). A remote task of a map
  thus costs its worker one call and its owner none (issue 19, bench/tasks.py's quick
  throughput run: node-to-node calls per task from ~3.1, 2.35 ``sched.msg`` and 0.79
  ``task.done``, to ~0.77).
  Each carries the sender's ``Load`` and capacity, and every ``load_interval_s`` (1 s) a
  node with recent scheduling activity sends its own to every live peer (``sched.load``),
  so the view's loads are at most ~1 s stale while work flows; an idle node stops after
  ``gossip_idle_s`` (its load is zero and stays so). Late binding makes a stale view cost
  a round trip, not a wrong placement. Connections to peers are the node's pool
  (``NodeServices.peers``): scheduling on lane ``sched``, task calls on lane ``tasks``, a
  waiting ``task.result`` on a connection checked out for it;
- a runner lost before membership says so (issue #19): when a connection from a node
  this owner runs tasks on closes (a crash closes every socket the process had) or a
  call to it fails, the owner checks the node with a fresh connection; refused or reset
  (nothing listens at its address any more), the tasks bound there are re-placed at
  once (``Scheduler.runner_unreachable``) instead of after SWIM's suspicion timeout. A
  live node answers the check and nothing changes; a check that times out proves
  nothing (a loaded node can be slow) and membership decides, as before. A node that
  was only slow may still finish, and the first outcome wins (``TaskBook``);
- ``RunTask``: the worker node fetches the task's input objects itself (local store
  first, else ``obj.read`` proxies from a holder: never through the client), runs the
  function in the pool (fetching its bytes from the owner, or the function object, if
  no worker has it), stores the result (inline up to ``inline_result_bytes``, otherwise
  as a replicated object through the data plane's put path), frees the run's slot
  (``run_ended``: the next ``GetTask`` travels while the outcome does), tells the owner
  (``task.done``) and only then reports ``task_finished`` to the scheduler (its
  ``Result`` never reaches the owner before the outcome);
- task records (Ray's ownership): the node a task is submitted to owns its record, kept
  in memory in a ``core.tasks.TaskBook`` (lifecycle, first outcome wins, crash retries,
  bounded) and written to the replicated KV (``task/<id>``, msgpack ``TaskRecord``) at
  submit and when it ends. Writes go in batches (``core.tasks.RecordQueue``, one
  ``kv.put_batch`` each: every key its own quorum write, each replica one transaction
  for all of its keys): a submit's records at the end of its loop turn, with whatever
  waits, before the submit is answered; an end within ``record_window_s``. The pickled
  function is stored as an object (its id is ``b3-`` + the function id) and the
  arguments ride in the record, so when the owner dies a node asked for the task's
  result acts on ``core.tasks.lookup``: it asks the live owner, forwards to the task's
  adopter (one node, by rendezvous hashing), or adopts the task itself and re-submits
  it from the record. A task with a payload rule
  (``core.policy.payload_rule``: a classed task, one that names regions, one that reads
  classed inputs) keeps neither in the KV nor in an unclassed object: its arguments are
  one object under the rule (``core.tasks.TaskPayload``), its function another (once
  per function and rule, ``FunctionPayload``), and its record holds their references
  (``TaskRecord.payload_ref``; ``core.tasks.stored_record`` is what any KV write of a
  record holds). The adopter reads them back, under the class's read rule.

Calling convention with the client (``client/tasks.py``): the function the client ships
is a wrapper ``call(args_bytes, inputs)``; the node hands the worker
``pickle((args_bytes, [each input object]), {})``, built from plain bytes and strings so
the agent never unpickles user data. An input is its bytes, or (``str``) the path of a
hash-checked local copy hard-linked for the run, which the worker reads itself; the
wrapper puts each object's bytes where its ``ObjectRef`` was.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from meshscale.core.api import (
    ApiError,
    Empty,
    ErrorCode,
    Method,
    Request,
    ResidencyWire,
    residency_of,
)
from meshscale.core.api import objects as objects_api
from meshscale.core.api.tasks import (
    MAX_SCHED_BATCH,
    SCHED_BATCH,
    SCHED_EXCHANGE,
    SCHED_LOAD,
    SCHED_MSG,
    TASK_CANCEL,
    TASK_DONE,
    TASK_FN,
    TASK_KILL,
    TASK_LIST,
    TASK_LOGS,
    TASK_RESULT,
    TASK_STATS,
    TASK_SUBMIT,
    TASK_WAIT,
    CancelReply,
    CancelRequest,
    DetailRef,
    DoneReply,
    DoneRequest,
    FnReply,
    FnRequest,
    KillReply,
    KillRequest,
    ListRequest,
    LoadReport,
    LogsRequest,
    ResultRef,
    ResultRequest,
    SchedAck,
    SchedBatchRequest,
    SchedExchangeRequest,
    SchedMsgRequest,
    SchedReply,
    SubmitReply,
    SubmitRequest,
    TaskLogs,
    TaskRow,
    TaskStats,
    TaskView,
    TaskWire,
    WaitReply,
    WaitRequest,
    parse_placement,
    placement_mode,
)
from meshscale.core.audit import Kind
from meshscale.core.capacity import TaskEnergy
from meshscale.core.membership import GONE, VIEW_CHANGES, State
from meshscale.core.objects import OBJECT_ID_PREFIX
from meshscale.core.outputs import Event
from meshscale.core.pacing import loop_wait_s
from meshscale.core.placement import Candidate, Residency
from meshscale.core.policy import (
    ClassPolicy,
    PolicyError,
    Rule,
    detail_rule,
    payload_rule,
    resolve,
    result_rule,
    result_within,
)
from meshscale.core.scheduling import (
    InputRef,
    Load,
    NodeState,
    Resources,
    RunTask,
    Scheduler,
    SchedulingConfig,
    SchedulingError,
    SchedulingOverloaded,
    SendMessage,
    TaskBound,
    TaskFailed,
    TaskFinished,
    TaskSpec,
    TaskStopped,
    task_classes,
)
from meshscale.core.tasks import (
    RECORD_WINDOW_S,
    TERMINAL,
    Ended,
    Entry,
    LookupAction,
    RecordQueue,
    TaskBook,
    TaskDetail,
    TaskPayload,
    TaskRecord,
    TaskState,
    Unrecorded,
    Verdict,
    decode_function,
    decode_payload,
    detail_note,
    detail_withheld,
    encode_detail,
    encode_function,
    encode_payload,
    function_scope,
    group_flush_delay_s,
    lookup,
    payload_ref,
    stored_record,
    upstream_failure,
)
from meshscale.core.wire import DECODE_ERRORS
from meshscale.runtime import caller
from meshscale.runtime.deadline import DeadlineTimer
from meshscale.runtime.local import LocalCalls, call_node
from meshscale.runtime.pacing import Wakeup
from meshscale.runtime.services import NodeServices, refusal
from meshscale.runtime.workers import (
    FunctionNotCached,
    PoolBusy,
    PoolClosed,
    PoolConfig,
    WorkerPool,
    function_id,
)
from meshscale.runtime.workers import TaskFailed as WorkerTaskFailed
from meshscale.transport.rpc import RemoteError, RpcConnection, RpcError

Req = TypeVar("Req", bound=Request)
Rep = TypeVar("Rep")

_INPUT_ERRORS: tuple[type[BaseException], ...] = (RpcError, *DECODE_ERRORS)
"""Reading or decoding a task's inputs failed: the task fails with kind ``input``."""
BATCH_BYTES = 4 << 20
"""Scheduling messages to one peer are sent together up to this many bytes per RPC."""
OUTCOMES_CALL_BYTES = 1 << 20
"""Outcomes go in a scheduling call up to about this many bytes together (more: each in
a ``task.done`` of its own first)."""
KV_PREFIX = "task/"
MAX_TASK_LOG_BYTES = 256 * 1024
"""Largest ``task_log_bytes``: both streams of a task fit one KV value (1 MiB)."""
LOG_PREFIX = "tasklog/"
"""What an ended task printed (``_Logs``), beside its record."""
GROUP_PREFIX = "taskset/"
GROUP_MAX_BYTES = 900 * 1024
"""Largest ``taskset/`` record (the KV takes values up to 1 MiB)."""
EARLY_ACK_MAX_TASKS = 16
"""Submits of up to this many tasks are answered with the outcomes if all tasks end
before their records are written (the answer then carries what the records would)."""
WAIT_REPLY_BYTES = 8 << 20
"""A ``task.wait`` answer carries results up to about this many bytes; the rest wait
for the next call."""
SCHED_LANE = "sched"
"""The connection to each peer that carries scheduling messages and load reports
(``transport/peers.py``): they never wait behind a task call."""
TASK_LANE = "tasks"
"""The connection to each peer for short task calls (outcomes, function bytes, kills,
questions that do not wait); a waiting question checks out a connection of its own."""
CPUS_ENV = "MESHSCALE_CPUS"
"""Overrides the node's CPU capacity (and pool size) when its meta does not set one."""


@dataclass(frozen=True)
class ComputeConfig:
    inline_result_bytes: int = 256 * 1024
    """Results up to this size (pickled) live in the task record; larger become objects."""
    max_args_bytes: int = 512 * 1024
    """Pickled arguments of one task (they ride in the KV record, bounded at 1 MiB, or,
    for a task with a payload rule, in an object of that rule)."""
    max_inputs: int = 64
    max_records: int = 10_000
    """Ended task records kept in memory (``core.tasks.Ended``, ~550 bytes each); the
    oldest beyond it are answered from the KV. Live tasks are bounded by the scheduler's
    ``max_pending_tasks``."""
    max_functions: int = 256
    """Function bytes kept by an owner for workers that ask (LRU)."""
    max_function_bytes: int = 16 << 20
    max_wait_s: float = 20.0
    """Longest ``task.result`` / ``task.wait`` wait (below the client's RPC timeout)."""
    max_wait_ids: int = 4096
    load_interval_s: float = 1.0
    gossip_idle_s: float = 5.0
    """Load reports stop this long after the last scheduling activity on this node."""
    runner_exchange_s: float = 5.0
    """While load reports are stopped, an owner with tasks running elsewhere still
    exchanges one with each of those runners this often: the reply's boot shows a runner
    restarted since (``Scheduler.peer_boot``), long before ``task_run_timeout_s``."""
    rpc_timeout_s: float = 30.0
    inputs_by_path: bool = True
    """Give a worker the path of a local input object's file instead of its bytes (see
    ``_input``)."""
    input_cache_s: float = 5.0
    """How long a resolved input (size, holders, policy) is reused by submits."""
    max_inputs_cached: int = 10_000
    """Resolved inputs kept for ``input_cache_s``; beyond it the cache is emptied."""
    max_input_holders: int = 64
    """Holders of an input the scheduler is told about (the rest are not ranked)."""
    max_functions_timed: int = 10_000
    """Functions whose recent run time is remembered (for early submit answers)."""
    max_list_rows: int = 10_000
    """Largest ``task.list`` answer."""
    persist: bool = True
    """Write task records to the replicated KV."""
    record_window_s: float = RECORD_WINDOW_S
    """The longest a task's final record (written after its outcome is answered) waits to
    be written with others (``core.tasks.RecordQueue``: records go to the KV in batches,
    one ``kv.put_batch`` each; a record a caller waits for goes at the end of the loop
    turn, with every record waiting). An owner that dies inside it leaves that end
    unwritten: a task whose submit record was written runs again where it is taken over."""
    submit_grace_s: float = 0.005
    """A small submit of functions that recently ended this fast (submit to outcome,
    moving average) waits this long for its tasks to end before writing their records:
    if they all did, the answer carries the outcomes and only the final records are
    written (as with every task, right after it ends). Slower functions never wait.
    A record write is a quorum write to three nodes' SQLite (about 4 ms of CPU across
    the mesh on a loaded 2-core machine, more than the rest of a no-op's path), so the
    bound is wide enough that a no-op on a busy node still ends within it (issue #19:
    at 2 ms, the moving average of a no-op crossed it under load, each lone no-op then
    cost two writes, the extra CPU slowed the next, and it stayed above). The price: a
    caller's loop of lone submits of such functions waits up to this long per submit
    (``map`` and ``submit_many`` send many tasks per submit and do not)."""
    result_replicas: int = 3
    max_upstream: int = 1024
    """Upstream tasks (futures among the arguments) of one task."""
    max_logs_kept_bytes: int = 64 << 20
    """What ended tasks printed, kept in memory for ``task.logs`` (newest first); the rest
    is read from the KV."""
    max_upstream_waits: int = 64
    """Upstream tasks owned by other nodes waited on at once (each holds a connection to
    its owner for up to ``max_wait_s``); one wait per upstream task, however many take it."""
    max_upstream_inline_bytes: int = 1 << 20
    """Upstream results (futures passed as arguments) that travel with the task to its
    worker, in all; beyond it they are stored as objects and read by the worker."""
    policy_refresh_s: float = 1.0
    """How often an owner with classed tasks pending reads their classes' policies (from
    its data plane's cache) into its scheduler: a class narrowed after submit binds each
    later placement of its tasks (``core.policy.placement_residency``)."""
    policy_refresh_idle_max_s: float = 5.0
    """The longest that loop sleeps while no pending task carries a class (its rounds do
    nothing then); a submit wakes it at once (``core.pacing``)."""
    runner_check_timeout_s: float = 2.0
    """Bound of the check of a node this owner runs tasks on, made when a connection to
    or from it broke (``_check_runner``). A fresh connection to it that is refused or
    reset (a crashed process's port) is the evidence ``core.scheduling
    .runner_unreachable`` acts on; no answer within this is not (a loaded node may be
    that slow): membership's verdict decides then, as before."""
    unrecorded_grace_s: float = 2.0
    """A task this node neither owns nor finds in the KV is answered unknown only once its
    record has been missing here for ``record_window_s`` plus this (the write's own time,
    generous for a loaded machine): until then it may be a task whose owner answered its
    submit with the outcome and has not written its one record yet
    (``core.tasks.Unrecorded``). A ``task.wait`` on such a task reads the KV again every
    ``unrecorded_recheck_s`` meanwhile."""
    unrecorded_recheck_s: float = 0.1
    foreground_linger_s: float = 0.05
    """The node tells its data plane it is no longer busy with tasks (its repair copies
    then get their full rate after ``foreground_quiet_s``) only once no task has run here
    for this long: a worker that runs one task after another (a map's) toggled it twice
    per task, each time a pump of the replica manager (issue #19)."""
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)

    def __post_init__(self) -> None:
        if not (0 <= self.unrecorded_grace_s <= 60 and 0 < self.unrecorded_recheck_s <= 10):
            raise ValueError(f"bad unrecorded bounds: grace {self.unrecorded_grace_s} s, "
                             f"recheck {self.unrecorded_recheck_s} s")
        if not 0 <= self.foreground_linger_s <= 1:
            raise ValueError(f"foreground_linger_s must be in [0, 1], got "
                             f"{self.foreground_linger_s}")


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(TaskRecord)
_records_encoder = msgspec.msgpack.Encoder()
_records_decoder = msgspec.msgpack.Decoder(list[TaskRecord])


def _record_row(rec: TaskRecord) -> tuple[str, bytes]:
    """``rec``'s key and value in the KV."""
    return KV_PREFIX + rec.task_id, _record_encoder.encode(stored_record(rec))


def _declared(rec: TaskRecord) -> Residency | None:
    """The rule ``rec`` was submitted under (resolved at submit), if any."""
    if rec.residency is None and rec.data_class is None:
        return None
    return Residency(frozenset(rec.residency) if rec.residency is not None else None,
                     rec.data_class)


def _encode_group(recs: list[TaskRecord]) -> bytes:
    """A ``taskset/<prefix>`` value: what the KV holds of each record
    (``core.tasks.stored_record``: no class data)."""
    return _records_encoder.encode([stored_record(r) for r in recs])


class _Logs(msgspec.Struct, array_like=True):
    """``tasklog/<id>`` in the KV."""

    stdout: str
    stderr: str


_logs_encoder = msgspec.msgpack.Encoder()
_logs_decoder = msgspec.msgpack.Decoder(_Logs)


class _Upstream(msgspec.Struct, array_like=True):
    """One upstream result for the worker: its pickled value, or the object it is in."""

    value: bytes | None = None
    oid: str = ""


class _Payload(msgspec.Struct, array_like=True):
    """``TaskSpec.payload``: what the worker node needs besides the scheduler's fields."""

    fn_id: str
    args: bytes
    inputs: list[str]
    timeout_s: float | None
    memory_mb: int
    upstream: list[_Upstream] = []
    """The results of the task's upstream tasks, in ``TaskRecord.after`` order: the
    pickled value (small ones), or the id of the object it was stored as."""
    result_rule: ResidencyWire | None = None
    """The rule the result is stored under (``core.policy.result_rule``); with a class,
    the result is always an object of it, whatever its size (never carried inline)."""
    fn_object: str = ""
    """Where a task with a payload rule has its function kept under that rule
    (``core.tasks.FunctionPayload``), for a worker whose owner no longer has it."""


@dataclass(eq=False)
class _Group:
    """Records of one submit written together as ``taskset/<prefix>``."""

    prefix: str
    recs: list[TaskRecord]
    dirty: bool = False
    writing: bool = False
    written: set[str] = field(default_factory=set)
    size_bytes: int = 0
    """The record's length when last written (``core.tasks.group_flush_delay_s``)."""


def _group_prefix(task_id: str) -> str | None:
    """``<prefix>`` of a task id of the form ``<prefix>.<n>`` (prefix: 16..64 hex digits,
    n: decimal), the ids ``map`` gives the tasks of one submit; else None."""
    prefix, dot, n = task_id.rpartition(".")
    if (not dot or not 16 <= len(prefix) <= 64 or not n.isdigit() or len(n) > 9
            or prefix.strip("0123456789abcdef")):
        return None
    return prefix


@dataclass(eq=False)
class _Watch:
    """A ``task.wait`` call waiting for ``need`` more of its tasks to end."""

    need: int
    fut: asyncio.Future[None]


def _outcome_bytes(o: DoneRequest) -> int:
    """About the wire size of outcome ``o``."""
    return (256 + len(o.value or b"") + len(o.exc or b"") + len(o.error) + len(o.traceback)
            + len(o.stdout) + len(o.stderr))


def _view_bytes(value: bytes | None, exc: bytes | None, traceback: str) -> int:
    """About what an outcome adds to a ``task.wait`` answer."""
    return len(value or b"") + len(exc or b"") + len(traceback)


def _total_memory_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) >> 20
    except (ValueError, OSError, AttributeError):
        return 1 << 20


class ComputePlane:
    """Tasks on one node: owner of what is submitted here, worker for what it is granted."""

    def __init__(self, agent: NodeServices, config: ComputeConfig | None = None) -> None:
        self.agent = agent
        self.cfg = config or ComputeConfig()
        meta_cap = dict(agent.meta.capacity)
        env_cpus = os.environ.get(CPUS_ENV)
        cpus = meta_cap.get("cpus") or (float(env_cpus) if env_cpus else None) \
            or float(os.cpu_count() or 1)
        self.capacity = Resources(
            float(cpus),
            int(meta_cap.get("memory_mb") or _total_memory_mb()),
            int(meta_cap.get("gpus") or 0),
        )
        slots = max(1, int(cpus))
        # Defaults for tasks that set none, so one user's task cannot run forever or take
        # the machine's memory (#13: a task without memory_mb took 1.5 GB).
        per_task_mb = agent.cfg.task_memory_mb or max(64, self.capacity.memory_mb // slots)
        self.pool = WorkerPool(PoolConfig(workers=slots,
                                          default_timeout_s=agent.cfg.task_timeout_s,
                                          default_memory_mb=per_task_mb,
                                          max_log_bytes=max(1, min(
                                              agent.cfg.task_log_bytes, MAX_TASK_LOG_BYTES)),
                                          isolation=getattr(agent, "isolation", None)))
        self.sched: Scheduler | None = None
        self.stats: dict[str, int] = {}
        self.local = LocalCalls(agent)
        self.book = TaskBook(agent.name, self.cfg.max_records)
        """The tasks this node owns (core/tasks.py: lifecycle, first outcome, takeover)."""
        self._fns: OrderedDict[str, bytes] = OrderedDict()
        self._fns_stored: set[str] = set()
        self._fn_objects: dict[str, str] = {}
        """``<fn_id>/<scope>`` -> the object a function is kept in under a payload rule
        (``core.tasks.FunctionPayload``), once stored by this node."""
        self._fn_storing: dict[str, asyncio.Future[str]] = {}
        self._inputs: dict[str, tuple[InputRef, float]] = {}
        self._loads: dict[str, tuple[Load, Resources]] = {}
        self._boot = os.urandom(8).hex()
        """This plane's boot, sent with every ``sched.*`` request and reply: a peer that
        sees it change knows the tasks it bound here died (``Scheduler.peer_boot``)."""
        self._outq: dict[str, list[bytes]] = {}
        self._group_keys: OrderedDict[str, None] = OrderedDict()
        self._fn_time: dict[str, float] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._flushing: set[str] = set()
        self._old_peers: set[str] = set()
        self._no_exchange: set[str] = set()  # older agents: no ``sched.exchange``
        self._sending: set[str] = set()  # peers a scheduling call of ours is on the way to
        # Outcomes for owners that take ``sched.exchange``, to go in the next call to each
        # (ahead of the ``Result`` queued with them).
        self._outcomes: dict[str, list[DoneRequest]] = {}
        self._timer = DeadlineTimer(self._on_timer)
        self._records = RecordQueue(self.cfg.record_window_s)
        """Record writes waiting to go to the KV, in batches (``core.tasks.RecordQueue``)."""
        self._unrecorded = Unrecorded(self.cfg.record_window_s + self.cfg.unrecorded_grace_s)
        """Tasks asked about here whose records are not in the KV (yet)."""
        self._record_waits: dict[str, asyncio.Future[None]] = {}
        """Key -> done once the value waiting for it (or a later one) is written."""
        self._record_timer: asyncio.Handle | None = None
        self._record_timer_at = 0.0
        """When ``_record_timer`` fires (loop time): kept here, since uvloop hands back a
        plain ``Handle`` (no ``when()``) for a ``call_at`` less than a millisecond away."""
        self._record_soon = False
        self._record_writes: set[asyncio.Task[None]] = set()
        self._checking: set[str] = set()
        """Nodes whose check (``_check_runner``) is under way: one at a time per node."""
        self._tick: asyncio.Future[None] | None = None
        self._watches: dict[str, list[_Watch]] = {}
        self._running: dict[str, str] = {}  # owner/task_id -> pool task id
        self._runs_here = 0
        """``_run`` calls in progress (inputs fetched, running, or sending the outcome)."""
        self._fg_busy = False
        """What the data plane was last told (``set_foreground_busy``)."""
        self._runs_ended_at = 0.0
        """When ``_runs_here`` last fell to 0 (monotonic)."""
        self._fg_timer: asyncio.TimerHandle | None = None
        """Checks, ``foreground_linger_s`` after runs stopped, whether they stayed so."""
        self._kept_running: set[str] = set()
        """Running here, classed: what they print is kept within their class (no live
        output is served; it is stored with their detail at the end)."""
        self.energy = TaskEnergy(now=time.monotonic())
        """Joules per running attempt (pool task id): the node feeds its draw in."""
        self._adopting: dict[str, asyncio.Task[None]] = {}
        self._upstream_waits: dict[str, asyncio.Task[TaskView | None]] = {}
        self._logs: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._logs_bytes = 0
        self._upstream_slots = asyncio.Semaphore(self.cfg.max_upstream_waits)
        self._pool_ready: asyncio.Event | None = None
        self._active_at = float("-inf")
        self._load_wakeup = Wakeup()
        """Wakes ``_gossip_load`` from its quiet wait when scheduling work comes."""
        self._policy_wakeup = Wakeup()
        """Wakes ``_refresh_policies`` from its idle wait when tasks are submitted."""
        self._policy_idle = False
        self.on_demand: Callable[[], None] | None = None
        """Called when a task granted here finds the workers stopped (the node is on
        standby): the capacity driver wakes it (``runtime/capacity.py``)."""
        self.standby_of: Callable[[dict[str, str]], bool] | None = None
        """Whether a member's gossiped tags say it takes no new work (draining or on
        standby): placement then counts its wake cost (``SchedulingConfig.wake_penalty_s``)."""
        self.observer: Callable[[TaskRecord, float], None] | None = None
        """``observer(record, latency_s)`` is called as a task ends (``runtime/observe.py``)."""
        self.bound_observer: Callable[[TaskBound], None] | None = None
        """``bound_observer(event)`` is called as the owner binds a task to a node (queue
        wait and placement reason, for ``runtime/observe.py``)."""

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        agent = self.agent
        self._pool_ready = asyncio.Event()
        self.sched = Scheduler(agent.name, self.capacity, config=self.cfg.scheduling,
                               rng=random.Random(agent.rng.random()), now=time.monotonic())
        self.sched.set_view(self._view(), time.monotonic())
        agent.serve(SCHED_MSG, self._rpc_sched_msg)
        agent.serve(SCHED_LOAD, self._rpc_sched_load)
        agent.serve(SCHED_BATCH, self._rpc_sched_batch)
        agent.serve(SCHED_EXCHANGE, self._rpc_sched_exchange)
        agent.serve(TASK_SUBMIT, self._rpc_submit)
        agent.serve(TASK_RESULT, self._rpc_result)
        agent.serve(TASK_WAIT, self._rpc_wait)
        agent.serve(TASK_CANCEL, self._rpc_cancel)
        agent.serve(TASK_LIST, self._rpc_list)
        agent.serve(TASK_DONE, self._rpc_done)
        agent.serve(TASK_FN, self._rpc_fn)
        agent.serve(TASK_KILL, self._rpc_kill)
        agent.serve(TASK_STATS, self._rpc_stats)
        agent.serve(TASK_LOGS, self._rpc_logs)
        agent.event_listeners.append(self._on_member_event)
        agent.peer_closed_listeners.append(self._on_peer_closed)
        agent.spawn(self._gossip_load())
        agent.spawn(self._refresh_policies())
        self._pump()
        # Serve scheduling at once (the node is already in the membership); tasks granted
        # here meanwhile wait for the workers.
        await self.pool.start()
        self._pool_ready.set()

    async def stop(self) -> None:
        self._timer.cancel()
        if self._fg_timer is not None:
            self._fg_timer.cancel()
            self._fg_timer = None
        # Records still waiting for company go now (the KV stops after this plane).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._records_drained(), self.cfg.rpc_timeout_s)
        if self._record_timer is not None:
            self._record_timer.cancel()
        self.sched = None
        await self.pool.close()

    def workers_running(self) -> bool:
        return self._pool_ready is not None and self._pool_ready.is_set()

    async def stop_workers(self) -> None:
        """Standby: end the worker processes (their memory goes back to the machine).
        Scheduling, records and data still serve; a task granted here meanwhile waits
        for ``start_workers`` and calls ``on_demand``."""
        if not self.workers_running():
            return
        assert self._pool_ready is not None
        self._pool_ready.clear()
        old, self.pool = self.pool, WorkerPool(self.pool.config)
        await old.close(keep_cgroups=True)

    async def start_workers(self) -> None:
        """Wake: a fresh warm pool (a pool starts once); raises if it cannot start."""
        if self._pool_ready is None or self._pool_ready.is_set():
            return
        try:
            await self.pool.start()
        except BaseException:
            self.pool = WorkerPool(self.pool.config)  # the failed one closed itself
            raise
        self._pool_ready.set()

    # ------------------------------------------------------------------ driving core

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def _refuse(self, rule: str, message: str, /, *, subject: str = "",
                data_class: str | None = None, **fields: Any) -> ApiError:
        """This plane's refusals (``runtime.services.refusal``)."""
        return refusal(self.agent, self._count, rule, message, subject=subject,
                       data_class=data_class, **fields)

    def _resolve_task(self, t: TaskWire, policies: dict[str, ClassPolicy]) -> TaskWire:
        """``t`` with its data class resolved to the class's regions (``core.policy``):
        an explicit rule may narrow the class's, never widen it."""
        res = t.residency
        if res is None or res.data_class is None:
            return t
        explicit = Rule(regions=None if res.regions is None else frozenset(res.regions))
        try:
            resolved = resolve(res.data_class, explicit, policies)
        except PolicyError as e:
            if e.rule == "malformed":
                raise ApiError(ErrorCode.INVALID, f"task {t.task_id}: {e}") from None
            raise self._refuse(e.rule, f"task {t.task_id}: {e}", subject=t.task_id,
                               data_class=res.data_class) from None
        return msgspec.structs.replace(t, residency=ResidencyWire.of(resolved.residency()))

    def _view(self) -> list[NodeState]:
        out = []
        for m in self.agent.m.members.values():
            if m.state > State.SUSPECT:
                continue
            if m.name == self.agent.name:
                load = self.sched.load() if self.sched is not None else Load(0, 0, self.capacity.cpus)
                cap = self.capacity
            else:
                load, cap = self._loads.get(m.name, (Load(0, 0, 0.0), self._peer_capacity(m.meta.capacity)))
            out.append(NodeState(
                Candidate(m.name, m.meta.region, m.meta.zone, dict(m.meta.labels)),
                cap, load,
                standby=self.standby_of is not None and self.standby_of(m.meta.tags),
                coord=m.coord if m.name != self.agent.name else self.agent.m.coordinate(),
            ))
        return out

    def _peer_capacity(self, meta_cap: dict[str, float]) -> Resources:
        # Until the peer's own report arrives, assume it is like this machine.
        return Resources(
            float(meta_cap.get("cpus") or self.capacity.cpus),
            int(meta_cap.get("memory_mb") or self.capacity.memory_mb),
            int(meta_cap.get("gpus") or 0),
        )

    def _refresh_view(self) -> None:
        if self.sched is not None:
            self.sched.set_view(self._view(), time.monotonic())
            self._pump()

    def _on_member_event(self, ev: Event) -> None:
        if isinstance(ev, GONE):
            self._loads.pop(str(getattr(ev, "name", "")), None)
        if isinstance(ev, VIEW_CHANGES):
            self._refresh_view()

    def _on_peer_closed(self, name: str) -> None:
        """A connection from node ``name`` to this one ended (its end closed it)."""
        self._suspect(name)

    def _suspect(self, name: str) -> None:
        """A connection to or from ``name`` broke: if this owner runs tasks there, or has
        reservations queued there (a task waiting on them waits on the node as much),
        check the node now rather than wait for membership's verdict."""
        sched = self.sched
        if (sched is None or name == self.agent.name or name in self._checking
                or sched.waits_on(name) == 0):
            return
        self._checking.add(name)
        self.agent.spawn(self._check_runner(name))

    async def _check_runner(self, name: str) -> None:
        """Call ``name`` on a fresh connection (never a pooled one, which may be the
        broken one); refused or reset: its tasks are re-placed
        (``core.scheduling.Scheduler.runner_unreachable``). Anything else (an answer, a
        timeout) leaves them to membership's verdict."""
        try:
            member = self.agent.m.members.get(name)
            if member is None or self.sched is None:
                return
            self._count("runner_checks")
            timeout = self.cfg.runner_check_timeout_s
            conn = RpcConnection(member.addr, self.agent.peers.creds, timeout,
                                 connect_timeout=timeout)
            try:
                reply = await conn.request(SCHED_LOAD, self._load_report())
                if reply.src == name:
                    # Alive; a restarted process answers too, with a new boot (its
                    # tasks here died with the old one: ``Scheduler.peer_boot``).
                    self._note_load(reply)
                return  # it answers: alive (its broken connection was something else)
            except RemoteError:
                return  # it answered, with an error: alive
            except RpcError as e:
                if not e.refused:
                    self._count("runner_checks_inconclusive")
                    return
            finally:
                await conn.close()
            if self.sched is None:
                return
            moved = self.sched.runner_unreachable(name, time.monotonic())
            self._count("runners_lost_early")
            self.agent.log("info", "runner_unreachable", peer=name, replaced=moved)
            self._pump()
        finally:
            self._checking.discard(name)

    def _pump(self) -> None:
        sched = self.sched
        if sched is None:
            return
        outs = sched.drain()
        if outs or sched.has_work():
            self._mark_active(time.monotonic())
        for out in outs:
            if isinstance(out, SendMessage):
                self._enqueue(out.dst, out.payload)
            elif isinstance(out, RunTask):
                self.agent.spawn(self._run(out))
            elif isinstance(out, TaskBound):
                self._on_bound(out)
            elif isinstance(out, TaskFinished):
                self._on_finished(out)
            elif isinstance(out, TaskFailed):
                self._on_failed(out)
            elif isinstance(out, TaskStopped):
                self._on_stopped(out)
        self._timer.arm(sched.next_deadline())

    def _on_timer(self) -> None:
        if self.sched is not None:
            self.sched.on_timer(time.monotonic())
        self._pump()

    # ------------------------------------------------------------------ node-to-node

    async def _call(self, name: str, method: Method[Req, Rep], req: Req, *,
                    lane: str = TASK_LANE) -> Rep:
        """Typed ``method`` on member ``name`` (in-process when it is this node), on the
        pool's connection of ``lane`` to it."""
        return await call_node(self.agent, name, method, req, lane=lane,
                               timeout_s=self.cfg.rpc_timeout_s)

    async def _ask_waiting(self, name: str, req: ResultRequest) -> TaskView:
        """``task.result`` that may wait: on a connection of its own (checked out of the
        pool), so it holds up no other call to that node."""
        if name == self.agent.name or req.timeout_s <= 0:
            return await self._call(name, TASK_RESULT, req)
        member = self.agent.m.members.get(name)
        if member is None:
            raise RpcError(f"{name}: not a member")
        peers = self.agent.peers
        conn = peers.checkout(name, member.addr)
        answered = False
        try:
            view = await conn.request(TASK_RESULT, req)
            answered = True
            return view
        except RemoteError:
            answered = True  # an error answer: the connection is fine
            raise
        finally:
            if answered:
                peers.checkin(name, conn)
            else:  # cut short (a reply may still come): never reused
                await conn.close()

    def _load_report(self) -> LoadReport:
        assert self.sched is not None
        ld = self.sched.load()
        return LoadReport(src=self.agent.name,
                          load=Load(ld.running, ld.queued, max(0.0, ld.free_cpus)),
                          cap=self.capacity, boot=self._boot)

    def peer_loads(self) -> dict[str, tuple[Load, Resources]]:
        """The last load and capacity each peer reported (``sched.load``), by name."""
        return dict(self._loads)

    def _note_load(self, report: LoadReport) -> None:
        """A peer's load, capacity and boot (in every ``sched.*`` request and
        ``sched.load`` reply; a reply's ``src`` is checked by the caller)."""
        self._loads[report.src] = (report.load, report.cap)
        self._note_boot(report.src, report.boot)

    def _note_boot(self, src: str, boot: str) -> None:
        """Peer ``src``'s process boot, from a request or reply of its ("": not told)."""
        sched = self.sched
        if sched is not None and boot:
            moved = sched.peer_boot(src, boot, time.monotonic())
            if moved:
                self._count("runners_restarted_replaced", moved)
                self.agent.log("info", "runner_restarted", peer=src, replaced=moved)
                self._pump()

    def _enqueue(self, dst: str, payload: bytes) -> None:
        """Queue a scheduling message for ``dst``; one sender per peer drains the queue,
        several messages to one RPC (``sched.batch``), in order."""
        q = self._outq.get(dst)
        if q is None:
            q = self._outq[dst] = []
        q.append(payload)
        if dst not in self._flushing:
            self._flushing.add(dst)
            self.agent.spawn(self._flush(dst))

    async def _flush(self, dst: str) -> None:
        try:
            while self.sched is not None:
                q = self._outq.pop(dst, None)
                if not q:
                    return
                size, n = 0, 0
                # At most MAX_SCHED_BATCH: the receiver refuses a longer call whole.
                while n < len(q) and n < MAX_SCHED_BATCH and (
                        n == 0 or size + len(q[n]) <= BATCH_BYTES):
                    size += len(q[n])
                    n += 1
                if n < len(q):
                    self._outq[dst] = q[n:] + self._outq.get(dst, [])
                self._sending.add(dst)
                try:
                    await self._send(dst, q[:n])
                finally:
                    self._sending.discard(dst)
        finally:
            self._flushing.discard(dst)

    async def _send(self, dst: str, payloads: list[bytes]) -> None:
        if self.sched is None:
            return
        outcomes = self._outcomes.pop(dst, [])
        try:
            if outcomes and (dst in self._no_exchange or sum(
                    _outcome_bytes(o) for o in outcomes) > OUTCOMES_CALL_BYTES):
                # Large outcomes (or those queued for an owner since found to be older) go
                # in calls of their own, first: ahead of their Results.
                await self._send_outcomes(dst, outcomes)
                outcomes = []
            if dst not in self._no_exchange:
                try:
                    r = self._load_report()
                    self._count("sched_calls")
                    reply = await self._call(dst, SCHED_EXCHANGE, SchedExchangeRequest(
                        src=r.src, load=r.load, cap=r.cap, boot=r.boot, payloads=payloads,
                        outcomes=outcomes), lane=SCHED_LANE)
                except RemoteError as e:
                    if e.code != ErrorCode.UNKNOWN_METHOD:
                        raise
                    self._no_exchange.add(dst)  # an older agent: sched.batch, no answers
                    await self._send_outcomes(dst, outcomes)
                    outcomes = []
                else:
                    outcomes = []
                    # Its boot first, as a request's: a restarted peer's messages are
                    # taken only once its new process is known.
                    self._note_boot(dst, reply.boot)
                    self._take_answers(dst, reply.payloads)
                    return
            if len(payloads) > 1 and dst not in self._old_peers:
                try:
                    r = self._load_report()
                    await self._call(dst, SCHED_BATCH, SchedBatchRequest(
                        src=r.src, load=r.load, cap=r.cap, boot=r.boot, payloads=payloads),
                        lane=SCHED_LANE)
                    return
                except RemoteError as e:
                    if e.code != ErrorCode.UNKNOWN_METHOD:
                        raise
                    self._old_peers.add(dst)  # an older agent: one message per call
            for payload in payloads:
                r = self._load_report()
                await self._call(dst, SCHED_MSG, SchedMsgRequest(
                    src=r.src, load=r.load, cap=r.cap, boot=r.boot, payload=payload),
                    lane=SCHED_LANE)
        except (RpcError, ValueError) as e:
            self._count("sched_send_failed")
            self.agent.log("debug", "sched_send_failed", peer=dst, error=str(e))
            if isinstance(e, RpcError) and not isinstance(e, RemoteError):
                self._suspect(dst)
            if outcomes:
                # Sent alone again, as ``task.done`` (their Results were in the failed
                # call: the owner's run timeout re-places those tasks, and the first
                # outcome of each is the one it keeps).
                self.agent.spawn(self._send_outcomes(dst, outcomes, tries=2))

    async def _send_outcomes(self, owner: str, outcomes: list[DoneRequest], *,
                             tries: int = 3) -> None:
        """Each outcome in a ``task.done`` of its own, in order, up to ``tries`` times."""
        for outcome in outcomes:
            await self._send_outcome(owner, outcome, tries=tries)

    async def _send_outcome(self, owner: str, outcome: DoneRequest, *, tries: int = 3) -> None:
        for attempt in range(tries):
            try:
                await self._call(owner, TASK_DONE, outcome)
                return
            except (RpcError, ValueError) as e:
                self._count("outcome_send_failed")
                if attempt == tries - 1 or owner not in self.agent.m.members:
                    self.agent.log("warning", "outcome_lost", task=outcome.task_id,
                                   owner=owner, error=str(e))
                    return
                await asyncio.sleep(0.2 * (attempt + 1))

    def _rpc_sched_msg(self, req: SchedMsgRequest) -> SchedAck:
        if self.sched is None:
            raise ValueError("compute plane not running")
        self._note_load(req)
        self._handle_from(req.src, [req.payload])
        return SchedAck()

    def _take_answers(self, src: str, payloads: list[bytes]) -> None:
        """``src``'s messages for us that came in its ``sched.exchange`` reply: handled
        as a ``sched.batch`` from it would be."""
        if not payloads or self.sched is None:
            return
        self._count("sched_answers_taken", len(payloads))
        self._handle_from(src, payloads)

    def _handle_from(self, src: str, payloads: list[bytes]) -> None:
        """Hand ``src``'s scheduling messages to the scheduler, in order, then pump (a
        ``sched.msg``, a ``sched.batch``, the messages in a ``sched.exchange`` either way:
        its request's here, its reply's at the caller)."""
        assert self.sched is not None
        now = time.monotonic()
        self._mark_active(now)
        for payload in payloads:
            self.sched.handle_message(src, payload, now)
        self._pump()

    def _answers_for(self, dst: str) -> list[bytes]:
        """The messages waiting to go to ``dst``, taken to ride in the reply to its call
        (``sched.exchange``), in order; none while a call of ours to it is on the way (they
        would overtake it). The sender already started for them finds nothing left."""
        if dst in self._sending or self._outcomes.get(dst):
            return []  # behind a call of ours, or Results whose outcomes have not gone
        q = self._outq.get(dst)
        if not q:
            return []
        size, n = 0, 0
        while n < len(q) and n < MAX_SCHED_BATCH and size + len(q[n]) <= BATCH_BYTES:
            size += len(q[n])
            n += 1
        if n == len(q):
            del self._outq[dst]
        else:
            self._outq[dst] = q[n:]
        self._count("sched_answers_given", n)
        return q[:n]

    async def _rpc_sched_exchange(self, req: SchedExchangeRequest) -> SchedReply:
        for outcome in req.outcomes:
            if outcome.node != req.src:
                raise ValueError(f"an outcome from {req.src} names node {outcome.node}")
        for outcome in req.outcomes:
            self._count("outcomes_with_messages")
            await self._rpc_done(outcome)
        self._rpc_sched_batch(req)
        return SchedReply(self._answers_for(req.src), boot=self._boot)

    def _rpc_sched_batch(self, req: SchedBatchRequest) -> SchedAck:
        if self.sched is None:
            raise ValueError("compute plane not running")
        self._note_load(req)
        self._handle_from(req.src, req.payloads)
        return SchedAck()

    def _rpc_sched_load(self, req: LoadReport) -> LoadReport:
        if self.sched is None:
            raise ValueError("compute plane not running")
        self._note_load(req)
        return self._load_report()

    def _quiet(self, now: float) -> bool:
        """No scheduling work here for ``gossip_idle_s``: load gossip stops."""
        return now - self._active_at > self.cfg.gossip_idle_s

    def _mark_active(self, now: float) -> None:
        if self._quiet(now):
            self._load_wakeup.set()  # work after a quiet spell: gossip loads again now
        self._active_at = now

    async def _gossip_load(self) -> None:
        runners_at = float("-inf")
        wait_s = self.cfg.load_interval_s
        while True:
            await self._load_wakeup.wait(wait_s)
            wait_s = self.cfg.load_interval_s
            if self.sched is None:
                return
            now = time.monotonic()
            peers = [m.name for m in self.agent.m.members.values()
                     if m.state <= State.SUSPECT and m.name != self.agent.name]
            if self._quiet(now):
                # Nothing to schedule: an idle mesh's loads are all zero and stay so; stop
                # the traffic until work comes (``_mark_active`` wakes this loop), but for
                # the nodes this owner's tasks run on, now and then (a restarted one tells
                # by its boot).
                if now - runners_at >= self.cfg.runner_exchange_s:
                    runners_at = now
                    peers = [n for n in peers if self.sched.runs_on(n)]
                else:
                    peers = []
                wait_s = loop_wait_s(now, idle=True, interval_s=self.cfg.load_interval_s,
                                     idle_max_s=self.cfg.runner_exchange_s,
                                     next_duty_at=runners_at + self.cfg.runner_exchange_s)
                if not peers:
                    continue

            async def one(name: str) -> None:
                try:
                    reply = await asyncio.wait_for(
                        self._call(name, SCHED_LOAD, self._load_report(), lane=SCHED_LANE),
                        self.cfg.load_interval_s * 2)
                    if reply.src == name:
                        self._note_load(reply)
                except RemoteError:
                    pass
                except (RpcError, TimeoutError):
                    self._suspect(name)
                except ValueError:
                    pass

            await asyncio.gather(*(one(n) for n in peers))
            self._refresh_view()

    def _wake_policy_refresh(self, specs: Sequence[TaskSpec]) -> None:
        """Tasks were submitted: a policy refresh sleeping while none was pending runs now
        (one already at its interval is left to it: no round per submit), if one of them
        carries a data class (``Scheduler.classes``: a round for none finds nothing to
        read, and cost a lone task two turns of that loop)."""
        if self._policy_idle and any(task_classes(s) for s in specs):
            self._policy_wakeup.set()

    async def _refresh_policies(self) -> None:
        """Feed the current policies of the pending tasks' classes to the scheduler, every
        ``policy_refresh_s``: each placement (the first, a re-placement after a lost
        runner, a queued task's dispatch) goes by them, narrowed, never widened."""
        wait_s = self.cfg.policy_refresh_s
        while True:
            self._policy_idle = wait_s > self.cfg.policy_refresh_s
            await self._policy_wakeup.wait(wait_s)
            self._policy_idle = False
            sched = self.sched
            if sched is None:
                return
            classes = sched.classes()
            wait_s = loop_wait_s(time.monotonic(), idle=not classes,
                                 interval_s=self.cfg.policy_refresh_s,
                                 idle_max_s=self.cfg.policy_refresh_idle_max_s)
            if not classes:
                continue
            try:
                policies = await self.local.class_policies(set(classes))
            except ApiError as e:
                # No quorum to read one: the rules already applied stay (never widened).
                self._count("task_policies_unreadable")
                self.agent.log("debug", "task_policies_unreadable", error=str(e))
                continue
            if self.sched is not sched:
                return
            sched.set_policies(policies, time.monotonic())
            self._pump()

    # ------------------------------------------------------------------ local data plane

    async def _input(self, oid: str, links: list[Path]) -> bytes | str:
        """An input object for the worker: the path of a hash-checked local copy when this
        node holds one (the worker reads the file itself: no copy through this process,
        the pickle and the pipe; ``links`` collects what to release after the run), else
        its bytes, read from wherever they are."""
        dp = self.agent.local_copies()
        if dp is not None and self.cfg.inputs_by_path:
            path = await dp.local_copy_path(oid)
            if path is not None:
                links.append(path)
                self._count("inputs_by_path")
                return str(path)
        self._count("inputs_by_value")
        return await self._read_object(oid)

    async def _upstream_input(self, up: _Upstream, links: list[Path]) -> bytes | str:
        """An upstream result for the worker: carried with the task, or an object."""
        if up.value is not None:
            return up.value
        return await self._input(up.oid, links)

    async def _read_object(self, oid: str) -> bytes:
        return await self.local.read_object(oid)

    async def _put_object(self, data: bytes) -> dict[str, Any]:
        return await self.local.put_object(data, self.cfg.result_replicas)

    async def _kv_put(self, rec: TaskRecord) -> None:
        """``rec`` written to the KV (in a batch, at the end of this loop turn)."""
        await self._record_put(*_record_row(rec), urgent=True)

    def _kv_put_later(self, rec: TaskRecord) -> None:
        """``rec`` to be written within ``record_window_s`` (nothing waits for it)."""
        self._record_put(*_record_row(rec), urgent=False)

    async def _kv_put_raw(self, key: str, value: bytes) -> None:
        """``value`` written under ``key`` with the batch this loop turn sends; a failure
        is counted and logged (the task goes on)."""
        await self._record_put(key, value, urgent=True)

    def _record_put(self, key: str, value: bytes, *, urgent: bool) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        if not self.cfg.persist:
            done = loop.create_future()
            done.set_result(None)
            return done
        self._count("record_writes")  # records written (batched: ``record_batches``)
        self._records.put(key, value, loop.time(), urgent=urgent)
        fut = self._record_waits.get(key)
        if fut is None:
            fut = self._record_waits[key] = loop.create_future()
        self._records_kick()
        return fut

    def _records_kick(self) -> None:
        """Take what is due at the end of this loop turn, or set the timer for it."""
        loop = asyncio.get_running_loop()
        q = self._records
        if q.due(loop.time()):
            if not self._record_soon:
                self._record_soon = True
                loop.call_soon(self._records_flush)
            return
        when = q.deadline()
        if when is None:
            return
        t = self._record_timer
        if t is not None and not t.cancelled() and self._record_timer_at <= when:
            return
        if t is not None:
            t.cancel()
        self._record_timer = loop.call_at(when, self._records_flush)
        self._record_timer_at = when

    def _records_flush(self) -> None:
        self._record_soon = False
        if self._record_timer is not None:
            self._record_timer.cancel()  # this call may be it, or come before it
            self._record_timer = None
        loop = asyncio.get_running_loop()
        q = self._records
        while q.due(loop.time()):
            batch = q.take()
            waits = [w for w in (self._record_waits.pop(k, None) for k, _ in batch)
                     if w is not None]
            task = loop.create_task(self._records_write(batch, waits))
            self._record_writes.add(task)
            task.add_done_callback(self._record_writes.discard)
        self._records_kick()

    async def _records_write(self, batch: list[tuple[str, bytes]],
                             waits: list[asyncio.Future[None]]) -> None:
        self._count("record_batches")  # a quorum write per key, one round per replica
        try:
            try:
                errors = await self.local.kv_put_batch(batch)
            except (ValueError, RpcError) as e:
                errors = [str(e) or type(e).__name__] * len(batch)
            for (key, _), error in zip(batch, errors, strict=True):
                if error:
                    self._count("kv_write_failed")
                    self.agent.log("warning", "task_record_write_failed", key=key,
                                   error=error[:300])
        finally:
            self._records.written()
            for w in waits:
                if not w.done():
                    w.set_result(None)
            self._records_kick()

    async def _records_drained(self) -> None:
        """Until every record put so far is written (or failed)."""
        while len(self._records) or self._record_writes:
            self._records.hurry()
            self._records_kick()
            if self._record_writes:
                await asyncio.wait(set(self._record_writes))
            else:
                await asyncio.sleep(0)

    async def _kv_read(self, key: str) -> bytes | None:
        return await self.local.kv_get(key)

    async def _kv_get(self, task_id: str) -> TaskRecord | None:
        data = await self._kv_read(KV_PREFIX + task_id)
        try:
            if data is not None:
                return _record_decoder.decode(data)
            prefix = _group_prefix(task_id)
            if prefix is None:
                return None
            data = await self._kv_read(GROUP_PREFIX + prefix)
            if data is None:
                return None
            for rec in _records_decoder.decode(data):
                if rec.task_id == task_id:
                    return rec
            return None
        except DECODE_ERRORS:
            self._count("kv_bad_record")
            return None

    # ------------------------------------------------------------------ owner: submit

    async def _input_ref(self, oid: str) -> InputRef:
        now = time.monotonic()
        hit = self._inputs.get(oid)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            st = await self.agent.call_local(objects_api.STAT, objects_api.ObjectIdRequest(id=oid))
        except ValueError as e:
            raise ValueError(f"input object {oid} not found: {e}") from None
        res = residency_of(st.residency)
        ref = InputRef(oid, st.size, tuple(st.holders)[:self.cfg.max_input_holders], res)
        if len(self._inputs) > self.cfg.max_inputs_cached:
            self._inputs.clear()
        self._inputs[oid] = (ref, now + self.cfg.input_cache_s)
        return ref

    def _remember_fn(self, fn_id: str, data: bytes) -> None:
        self._fns[fn_id] = data
        self._fns.move_to_end(fn_id)
        while len(self._fns) > self.cfg.max_functions:
            self._fns.popitem(last=False)

    async def _ensure_fn_stored(self, fn_id: str, data: bytes) -> None:
        """The function as an object (``b3-<fn_id>``), so another node can re-run it."""
        if fn_id in self._fns_stored or not self.cfg.persist:
            return
        ref = await self._put_object(data)
        assert ref["id"] == OBJECT_ID_PREFIX + fn_id
        self._fns_stored.add(fn_id)

    def _record_from_wire(self, t: TaskWire) -> TaskRecord:
        """A submitted task's record (the one place a ``TaskWire`` is read), checked
        against this node's own bounds."""
        task_id = t.task_id
        if len(t.args) > self.cfg.max_args_bytes:
            raise ValueError(
                f"task {task_id}: arguments of {len(t.args)} bytes exceed "
                f"{self.cfg.max_args_bytes} bytes; put large data with mesh.put() and pass "
                "the ObjectRef")
        if len(t.inputs) > self.cfg.max_inputs:
            raise ValueError(f"task {task_id}: {len(t.inputs)} inputs "
                             f"(max {self.cfg.max_inputs})")
        if len(t.after) > self.cfg.max_upstream:
            raise ValueError(f"task {task_id}: {len(t.after)} futures among its arguments "
                             f"(max {self.cfg.max_upstream})")
        if task_id in t.after:
            raise ValueError(f"task {task_id} cannot take its own result")
        res = t.residency
        return TaskRecord(
            task_id=task_id, owner=self.agent.name, fn_id=t.fn_id, args=t.args,
            inputs=list(t.inputs), cpus=t.cpus, memory_mb=t.memory_mb, gpus=t.gpus,
            labels=dict(t.labels),
            residency=None if res is None or res.regions is None else list(res.regions),
            data_class=None if res is None else res.data_class,
            placement=None if t.placement is None else msgspec.to_builtins(t.placement),
            retries=t.retries, timeout_s=t.timeout_s, submitted=time.time(),
            after=list(t.after), name=t.name,
        )

    async def _spec(self, rec: TaskRecord, upstream: list[TaskView] | None = None) -> TaskSpec:
        """The scheduler's view of ``rec`` (its submitter rides in the record, so a
        re-submitted or adopted task keeps its owner's share). ``upstream``: the ended
        views of ``rec.after``; a result stored as an object is one more input for
        placement (the task goes where its bytes are, as for an ``ObjectRef``)."""
        refs = (list(await asyncio.gather(*(self._input_ref(o) for o in rec.inputs)))
                if rec.inputs else [])
        values: list[_Upstream] = []
        stored_in: list[tuple[int, str]] = []  # (size, object id) of upstream results
        budget = self.cfg.max_upstream_inline_bytes
        for v in upstream or ():
            if v.ref is not None:
                values.append(_Upstream(oid=v.ref.id))
                stored_in.append((v.ref.size, v.ref.id))
            elif v.value is not None and len(v.value) <= budget:
                budget -= len(v.value)
                values.append(_Upstream(value=v.value))
            elif v.value is not None:  # too much to carry: the worker reads it
                put = await self._put_object(v.value)
                values.append(_Upstream(oid=str(put["id"])))
                stored_in.append((len(v.value), str(put["id"])))
            else:
                raise ValueError(f"upstream task {v.task_id} ended with no result")
        # The largest steer placement, within the inputs a task may list.
        room = max(0, self.cfg.max_inputs - len(refs))
        stored = [await self._input_ref(oid)
                  for _size, oid in sorted(set(stored_in), reverse=True)]
        declared = _declared(rec)
        out = await self._result_rule(rec, declared, [r.residency for r in refs + stored])
        refs += stored[:room]
        # A task that reads classed data runs under its result's rule too (the inputs'
        # own rules bound it as well: core.scheduling's input-residency).
        res = declared if out is None or (declared is not None and declared.data_class) \
            else out
        payload = msgspec.msgpack.encode(_Payload(
            rec.fn_id, rec.args or b"", rec.inputs, rec.timeout_s, rec.memory_mb, values,
            ResidencyWire.of(out), str((rec.payload_ref or {}).get("fn") or "")))
        try:
            return TaskSpec(
                task_id=rec.task_id, cpus=rec.cpus, memory_mb=rec.memory_mb, gpus=rec.gpus,
                labels=dict(rec.labels), residency=res, inputs=tuple(refs),
                placement=placement_mode(parse_placement(rec.placement)),
                payload=payload, submitter=rec.submitter)
        except (msgspec.ValidationError, TypeError) as e:
            raise ValueError(f"task {rec.task_id}: {e}") from None

    async def _result_rule(self, rec: TaskRecord, declared: Residency | None,
                           inputs: list[Residency | None]) -> Residency | None:
        """The rule ``rec``'s result is stored under (``core.policy.result_rule``), kept on
        the record; a refusal (inputs of incomparable classes, no region left) names the
        rule (``runtime.services.refusal``)."""
        classes = {r.data_class for r in [declared, *inputs]
                   if r is not None and r.data_class is not None}
        if not classes:
            return None
        try:
            policies = await self.local.class_policies(classes)
        except ApiError as e:
            if e.code is not ErrorCode.UNAVAILABLE:
                raise
            # No quorum to read a policy: the inputs' own stored rules still bound it.
            self._count("result_rule_without_policies")
            policies = {}
        if policies and self.sched is not None:
            # The rules this task is resolved under are the scheduler's current ones too
            # (one read older would narrow it by a class since widened).
            self.sched.set_policies(policies, time.monotonic())
        try:
            out = result_rule(declared, inputs, policies)
        except PolicyError as e:
            raise self._refuse(e.rule, f"task {rec.task_id}: {e}", subject=rec.task_id,
                               data_class=",".join(sorted(classes))[:200]) from None
        rec.result_class = None if out is None else out.data_class
        return out

    async def _rpc_submit(self, req: SubmitRequest) -> SubmitReply:
        sched = self.sched
        if sched is None:
            raise ValueError("compute plane not running")
        wire = req.tasks
        if len(wire) > sched.config.max_batch:
            raise ValueError(f"{len(wire)} tasks in one submit (max {sched.config.max_batch})")
        # Functions first: a missing one is asked for before anything is resolved.
        fresh: dict[str, bytes] = {}
        for t in wire:
            fn_id, fn = t.fn_id, t.fn
            if fn is not None:
                data = fn
                if len(data) > self.cfg.max_function_bytes:
                    raise ValueError(f"function of {len(data)} bytes exceeds "
                                     f"{self.cfg.max_function_bytes} bytes")
                if function_id(data) != fn_id:
                    raise ValueError(f"function bytes do not hash to {fn_id}")
                fresh[fn_id] = data
            elif fn_id not in self._fns and fn_id not in fresh:
                raise ApiError(ErrorCode.NEED_FUNCTION, f"need function {fn_id}")
        for fn_id, data in fresh.items():
            if fn_id not in self._fns:  # a client's code (with its archive) arriving
                self._count("functions_received")
                self._count("function_bytes_received", len(data))
            self._remember_fn(fn_id, data)
        classes = {t.residency.data_class for t in wire
                   if t.residency is not None and t.residency.data_class is not None}
        if classes:
            policies = await self.local.class_policies(classes)
            wire = [self._resolve_task(t, policies) for t in wire]
        recs = [self._record_from_wire(t) for t in wire]
        new = [r for r in recs if r.task_id not in self.book]
        accepted = [r.task_id for r in recs]
        if not new:
            return SubmitReply(accepted)
        who = caller.submitter()  # the client's certificate: whose share the tasks use
        for r in new:
            r.submitter = who
        # Tasks that take futures wait for their upstream tasks before they are scheduled.
        ready = [r for r in new if not r.after]
        # Awaited in place, one after the other, when none can wait for anything (one
        # alone, or none with inputs or a rule: the common map): a gather wraps each in
        # a task of its own, a turn of the loop and its allocations per task.
        quick = len(ready) == 1 or not any(r.inputs or _declared(r) is not None
                                           for r in ready)
        specs = ([await self._spec(r) for r in ready] if quick
                 else await asyncio.gather(*(self._spec(r) for r in ready)))
        # Arguments that are class data never go into a KV record (marked here, before
        # any record is written; stored as objects of their rule in ``_persist``).
        rules = await self._payload_rules(new)
        try:
            if specs:
                sched.submit(list(specs), time.monotonic())
                self._wake_policy_refresh(specs)
        except SchedulingError as e:
            raise ValueError(f"refused by the {e.rule} rule: {e}") from None
        except SchedulingOverloaded as e:
            # Typed, so a client waits and sends the same tasks again (nothing was done).
            raise ApiError(ErrorCode.BUSY, f"busy: {e}") from None
        groups = self._groups_of(new)
        now = time.monotonic()
        for r in new:
            entry = self.book.add(r, now, group=groups.get(r.task_id))
            if r.after:
                self._count("tasks_with_upstream")
                self.agent.spawn(self._start(entry))
        self._pump()
        # Durable before acknowledged: function object and records, so the tasks survive
        # this node (the scheduler has already started placing them). A small submit
        # whose tasks all end before their records are written is answered at once with
        # the outcomes (the records are still written, and the final ones follow).
        self._count("tasks_submitted", len(new))
        if (len(new) <= EARLY_ACK_MAX_TASKS and self.cfg.submit_grace_s > 0
                and all(self._fn_time.get(r.fn_id, 1.0) < self.cfg.submit_grace_s
                        for r in new)):
            # Short tasks: give them a moment, so one that ends at once costs one record
            # write (the final one, written as it ends) instead of two.
            deadline = time.monotonic() + self.cfg.submit_grace_s
            while not all(r.state in TERMINAL for r in new):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await self._changed(left)
            if all(r.state in TERMINAL for r in new):
                self._count("acks_with_outcome")
                self._count("acks_in_grace")  # the records were written once, at the end
                return SubmitReply(accepted, [self._view_of(r) for r in new])
        persist = asyncio.get_running_loop().create_task(self._persist(new, groups, rules))
        if len(new) <= EARLY_ACK_MAX_TASKS:
            while not persist.done() and not all(r.state in TERMINAL for r in new):
                if self._tick is None:
                    self._tick = asyncio.get_running_loop().create_future()
                await asyncio.wait((persist, self._tick), return_when=asyncio.FIRST_COMPLETED)
            if not persist.done():
                self._count("acks_with_outcome")
                self._background.add(persist)
                persist.add_done_callback(self._background_done)
                return SubmitReply(accepted, [self._view_of(r) for r in new])
        await persist
        return SubmitReply(accepted, [self._view_of(r) for r in new if r.state in TERMINAL])

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._count("persist_failed")
            self.agent.log("warning", "task_persist_failed", error=str(task.exception()))

    async def _persist(self, new: list[TaskRecord], groups: dict[str, _Group],
                       rules: dict[str, Residency]) -> None:
        # A ruled task's function is kept under its rule (``_store_payloads``), never as
        # the unclassed object an unruled task's is.
        fns = {r.fn_id for r in new if r.payload_ref is None}
        await asyncio.gather(self._store_payloads(new, rules),
                             *(self._ensure_fn_stored(f, self._fns[f]) for f in fns
                               if f in self._fns))
        await asyncio.gather(self._persist_many([r for r in new if r.task_id not in groups]),
                             *(self._write_group(g) for g in set(groups.values())))

    async def _payload_rules(self, recs: list[TaskRecord]) -> dict[str, Residency]:
        """The rule under which each of ``recs`` whose arguments are class data keeps them
        (``core.policy.payload_rule``: a classed task's, one that names regions, one that
        reads classed inputs). Each such record is marked at once (``payload_ref`` without
        an id): from now on no write of it carries its arguments (``stored_record``).
        A task whose rule cannot be decided (ambiguous input classes, an unknown input:
        it fails before it runs) is marked and keeps them only in memory. Records with
        no rule, no class and no inputs (the common case) cost nothing here."""
        maybe = [r for r in recs if self._maybe_ruled(r)]
        if not maybe:
            return {}  # no await: an unruled submit goes on as before
        found: dict[str, tuple[Residency | None, list[Residency | None]]] = {}
        classes: set[str] = set()
        undecided: set[str] = set()
        for r in maybe:
            declared = _declared(r)
            try:
                refs = await asyncio.gather(*(self._input_ref(o) for o in r.inputs))
            except (ValueError, RpcError):
                undecided.add(r.task_id)
                continue
            inputs = [ref.residency for ref in refs]
            found[r.task_id] = (declared, inputs)
            classes.update(x.data_class for x in [declared, *inputs]
                           if x is not None and x.data_class is not None)
        policies: dict[str, ClassPolicy] = {}
        if classes:
            with contextlib.suppress(ApiError):  # unreadable: the stored rules still bound
                policies = await self.local.class_policies(classes)
        out: dict[str, Residency] = {}
        for r in maybe:
            rule: Residency | None = None
            if r.task_id not in undecided:
                declared, inputs = found[r.task_id]
                try:
                    rule = payload_rule(declared, inputs, policies)
                except PolicyError:
                    undecided.add(r.task_id)
            if rule is not None:
                out[r.task_id] = rule
            if rule is not None or r.task_id in undecided:
                r.payload_ref = payload_ref(
                    "", 0, None if rule is None else rule.data_class)
        return out

    def _maybe_ruled(self, rec: TaskRecord) -> bool:
        """Might ``rec`` have a payload rule? It names a rule or a class, or reads an input
        whose rule is classed or not known here yet (``_spec`` has just looked up the
        inputs of every task that takes no futures: they are known)."""
        if rec.args is None:
            return False
        if rec.residency is not None or rec.data_class is not None:
            return True
        for oid in rec.inputs:
            hit = self._inputs.get(oid)
            if hit is None or (hit[0].residency is not None
                               and hit[0].residency.data_class is not None):
                return True
        return False

    async def _store_payloads(self, recs: list[TaskRecord],
                              rules: dict[str, Residency]) -> None:
        """The arguments of each of ``recs`` with a payload rule, stored as one object
        under it (``core.tasks.TaskPayload``), so a node taking the task over can run it
        again; the record keeps the reference. Not stored: the record says so and a
        takeover fails the task naming it (never a copy of the arguments in the KV)."""
        if not rules or not self.cfg.persist:
            return
        sem = asyncio.Semaphore(32)

        async def one(r: TaskRecord, rule: Residency) -> None:
            args = r.args
            if args is None or r.state in TERMINAL:
                return  # ended already: nothing will run it again
            body = encode_payload(TaskPayload(r.task_id, args))
            async with sem:
                fn_oid = await self._store_function(r.fn_id, rule)
                try:
                    ref = await self.local.put_object(body, self.cfg.result_replicas,
                                                      ResidencyWire.of(rule))
                except (RpcError, ValueError) as e:
                    self._count("task_payload_store_failed")
                    self.agent.log("warning", "task_payload_store_failed", task=r.task_id,
                                   error=str(e)[:200])
                    r.payload_ref = payload_ref("", 0, rule.data_class, fn_oid)
                    return
            r.payload_ref = payload_ref(str(ref["id"]), int(ref["size"]), rule.data_class,
                                        fn_oid)
            self._count("task_payloads_stored")

        await asyncio.gather(*(one(r, rules[r.task_id]) for r in recs if r.task_id in rules))

    async def _store_function(self, fn_id: str, rule: Residency) -> str:
        """The object function ``fn_id`` is kept in under ``rule``
        (``core.tasks.FunctionPayload``), stored once per function and rule by this node;
        ``""`` when it is not known here or could not be stored (a takeover then fails
        naming it, unless the function is also stored unclassed)."""
        data = self._fns.get(fn_id)
        key = f"{fn_id}/{function_scope(rule)}"
        oid = self._fn_objects.get(key)
        if oid is not None or data is None or not self.cfg.persist:
            return oid or ""
        storing = self._fn_storing.get(key)
        if storing is not None:  # the tasks of one map: one put
            return await asyncio.shield(storing)
        storing = self._fn_storing[key] = asyncio.get_running_loop().create_future()
        oid = ""
        try:
            ref = await self.local.put_object(encode_function(data, rule),
                                              self.cfg.result_replicas, ResidencyWire.of(rule))
            oid = str(ref["id"])
            if len(self._fn_objects) >= 4 * self.cfg.max_functions:
                self._fn_objects.clear()
            self._fn_objects[key] = oid
            self._count("task_functions_stored")
        except (RpcError, ValueError) as e:
            self._count("task_function_store_failed")
            self.agent.log("warning", "task_function_store_failed", fn=fn_id,
                           error=str(e)[:200])
        finally:
            del self._fn_storing[key]
            storing.set_result(oid)
        return oid

    async def _read_function(self, fn_id: str, stored: str) -> bytes:
        """Function ``fn_id`` read back: from ``stored``, the object it is kept in under
        its task's payload rule, else from the unclassed ``b3-<fn_id>``; checked against
        its id (``ValueError`` otherwise)."""
        if stored:
            data = decode_function(await self._read_object(stored))
        else:
            data = await self._read_object(OBJECT_ID_PREFIX + fn_id)
        if function_id(data) != fn_id:
            raise ValueError(f"function bytes do not hash to {fn_id}")
        return data

    async def _read_payload(self, rec: TaskRecord) -> tuple[TaskRecord, str]:
        """``rec`` (read from the KV) with its arguments read back from its payload object
        (``payload_ref``), or ``rec`` and why they could not be: the object was never
        stored, or this node may not read it (the refusal names the rule)."""
        oid = str((rec.payload_ref or {}).get("id") or "")
        if rec.args is not None or not oid:
            return rec, ""
        try:
            p = decode_payload(await self._read_object(oid), rec.task_id)
        except (RpcError, ValueError) as e:
            self._count("task_payload_unreadable")
            return rec, str(e)[:300]
        self._count("task_payloads_read")
        return msgspec.structs.replace(rec, args=p.args), ""

    # Records of one submit whose ids share a client-chosen prefix (``<prefix>.<n>``, as
    # ``map`` names them) are written as one KV value, ``taskset/<prefix>``: one quorum
    # write per submit instead of one per task. Lookups try ``task/<id>`` first, then the
    # set. Terminal states reach the set record within ``group_flush_delay_s`` (coalesced:
    # longer for a larger record, at most a second); an owner that dies inside that window
    # leaves them pending there, so a node taking over runs those tasks again (as after a
    # lost ``task.done``: the first result wins).

    def _groups_of(self, new: list[TaskRecord]) -> dict[str, _Group]:
        by_prefix: dict[str, list[TaskRecord]] = {}
        for r in new:
            prefix = _group_prefix(r.task_id)
            if prefix is not None:
                by_prefix.setdefault(prefix, []).append(r)
        out: dict[str, _Group] = {}
        for prefix, recs in by_prefix.items():
            if len(recs) < 2 or prefix in self._group_keys:
                continue  # a reused prefix must not overwrite an earlier set's record
            if len(_records_encoder.encode(recs)) > GROUP_MAX_BYTES:
                continue
            self._group_keys[prefix] = None
            while len(self._group_keys) > self.cfg.max_records:
                self._group_keys.popitem(last=False)
            g = _Group(prefix, recs)
            for r in recs:
                out[r.task_id] = g
        return out

    async def _write_group(self, g: _Group) -> None:
        g.writing = True
        try:
            data = _encode_group(g.recs)
            g.size_bytes = len(data)
            await self._kv_put_raw(GROUP_PREFIX + g.prefix, data)
        finally:
            g.writing = False
        self._group_changed(g, delay=False)

    def _group_changed(self, g: _Group, *, delay: bool = True) -> None:
        if delay:
            g.dirty = True
        if g.dirty and not g.writing:
            g.writing = True
            self.agent.spawn(self._flush_group(g))

    async def _flush_group(self, g: _Group) -> None:
        try:
            while g.dirty and self.sched is not None:
                await asyncio.sleep(group_flush_delay_s(g.size_bytes))
                g.dirty = False
                data = _encode_group(g.recs)
                g.size_bytes = len(data)
                if len(data) > GROUP_MAX_BYTES:  # large results: per-task records
                    done = [r for r in g.recs if r.state in TERMINAL
                            and r.task_id not in g.written]
                    g.written.update(r.task_id for r in done)
                    await self._persist_many([msgspec.structs.replace(r) for r in done])
                    continue
                await self._kv_put_raw(GROUP_PREFIX + g.prefix, data)
        finally:
            g.writing = False

    async def _persist_many(self, recs: list[TaskRecord]) -> None:
        """``recs`` written, in as few batches as ``core.tasks.RecordQueue`` allows."""
        waits = {id(w): w for w in (self._record_put(*_record_row(r), urgent=True)
                                    for r in recs)}
        await asyncio.gather(*waits.values())

    # ------------------------------------------------------------------ owner: events

    def _on_bound(self, ev: TaskBound) -> None:
        if self.bound_observer is not None:
            self.bound_observer(ev)
        flags = [f for f, on in (("local", ev.local), ("delay-scheduled", ev.restricted),
                                 ("stolen", ev.stolen)) if on]
        self.book.bound(ev.task_id, ev.node, ev.attempt,
                        f"{ev.node} ({ev.region}): {ev.cost.describe()}"
                        + (f" [{', '.join(flags)}]" if flags else ""))

    def _on_finished(self, ev: TaskFinished) -> None:
        # The scheduler accepted a result but no outcome reached us (task.done was lost),
        # or the worker crashed and the task has retries left: run it again.
        what = self.book.scheduler_finished(ev.task_id)
        e = self.book.get(ev.task_id)
        if what is None or e is None:
            return
        if what == "resubmit":
            self._count("resubmitted")
            self.agent.spawn(self._resubmit(e))
        else:
            self._finish(e, "failed", error=f"result lost: {ev.detail or 'no outcome'}",
                         kind="lost")

    async def _resubmit(self, e: Entry) -> None:
        await self._start(e)

    async def _start(self, e: Entry) -> bool:
        """Hand ``e`` to the scheduler, once its upstream tasks (``rec.after``) have ended:
        their results ride with it, or, when one did not end done, the task fails naming
        it (``core.tasks.upstream_failure``). False: it failed (or ended meanwhile)."""
        rec = e.rec
        try:
            views = [await self._upstream_view(e, tid) for tid in rec.after]
            if rec.state in TERMINAL or self.sched is None:
                return False
            failed = upstream_failure([(v.task_id, v.state, v.kind, v.error, v.traceback,
                                        v.exc) for v in views])
            if failed is not None:
                self._count("tasks_upstream_failed")
                self._finish(e, "failed", error=failed.error, kind=failed.kind,
                             traceback=failed.traceback, exc=failed.exc)
                return False
            spec = await self._spec(rec, views)
            if rec.state in TERMINAL or self.sched is None:
                return False
            self.sched.submit([spec], time.monotonic())
            self._wake_policy_refresh([spec])
        except SchedulingError as exc:
            if rec.state not in TERMINAL:
                self._finish(e, "failed", error=f"refused by the {exc.rule} rule: {exc}",
                             kind="refused")
            return False
        except (ValueError, SchedulingOverloaded, RpcError) as exc:
            if rec.state not in TERMINAL:
                self._finish(e, "failed", error=str(exc), kind="refused")
            return False
        finally:
            self._pump()
        return True

    async def _remote_upstream(self, tid: str) -> TaskView | None:
        """``_lookup`` of an upstream task owned elsewhere, waiting up to ``max_wait_s``:
        one at a time per task id, at most ``max_upstream_waits`` at once."""
        task = self._upstream_waits.get(tid)
        if task is None:
            async def bounded() -> TaskView | None:
                async with self._upstream_slots:
                    return await self._lookup(tid, self.cfg.max_wait_s)

            task = asyncio.get_running_loop().create_task(bounded())
            self._upstream_waits[tid] = task
            task.add_done_callback(lambda t: self._upstream_waits.pop(tid, None)
                                   if self._upstream_waits.get(tid) is t else None)
        return await asyncio.shield(task)

    async def _upstream_view(self, e: Entry, tid: str) -> TaskView:
        """Upstream task ``tid`` of ``e`` once it has ended (owned here, or asked of its
        owner or its record), or as soon as ``e`` itself has ended (cancelled)."""
        unknown_tries = 0
        while e.rec.state not in TERMINAL:
            ended = self.book.ended.get(tid)
            if ended is not None:
                return self._view_of(ended)
            up = self.book.get(tid)
            if up is not None:
                up.waiters += 1
                try:
                    await self._changed(self.cfg.max_wait_s)
                finally:
                    up.waiters -= 1
                continue
            t0 = time.monotonic()
            found = await self._remote_upstream(tid)
            if found is not None and found.state in TERMINAL:
                return found
            if found is None and tid not in self.book:
                # No record (yet: a submit answered early writes it just after): a few
                # tries, then the task is unknown.
                unknown_tries += 1
                if unknown_tries > 5:
                    return TaskView(task_id=tid, state=TaskState.FAILED, kind="unknown",
                                    error="no node knows this task (its record was lost)")
            if time.monotonic() - t0 < 0.1:
                await asyncio.sleep(0.5)
        return TaskView(task_id=tid, state=TaskState.CANCELLED, kind="cancelled")

    def _on_stopped(self, ev: TaskStopped) -> None:
        """The scheduler stopped a task on a node its class no longer allows: its outcome
        from there no longer counts; kill it there (best effort: a node that does not
        answer has its result dropped anyway)."""
        self.book.stopped(ev.task_id, ev.node)
        e = self.book.get(ev.task_id)
        m = self.agent.m.members.get(ev.node)
        self._refuse("residency", ev.reason, subject=ev.task_id,
                     data_class=None if e is None else e.rec.data_class,
                     from_region="" if m is None else str(m.meta.region), runner=ev.node)

        async def kill() -> None:
            with contextlib.suppress(RpcError, ValueError, OSError):
                await self._call(ev.node, TASK_KILL, KillRequest(owner=self.agent.name,
                                                                 task_id=ev.task_id))
        self.agent.spawn(kill())

    def _on_failed(self, ev: TaskFailed) -> None:
        e = self.book.get(ev.task_id)
        if e is None or e.rec.state in TERMINAL:
            return
        self._finish(e, "failed", error=ev.reason, kind="unschedulable")

    def _finish(self, e: Entry, state: str, *, value: bytes | None = None,
                ref: dict[str, Any] | None = None, error: str = "", kind: str = "",
                traceback: str = "", node: str | None = None,
                exc: bytes | None = None,
                detail_ref: dict[str, Any] | None = None) -> None:
        r = self.book.finish(e, TaskState(state), time.time(), value=value, ref=ref,
                             error=error, kind=kind, traceback=traceback, node=node,
                             exc=exc, detail_ref=detail_ref)
        self._count("tasks_" + state)
        if self.observer is not None:
            self.observer(r, time.monotonic() - e.t0)
        if state == "done":
            took = time.monotonic() - e.t0
            prev = self._fn_time.get(r.fn_id)
            if prev is None and len(self._fn_time) > self.cfg.max_functions_timed:
                self._fn_time.clear()
            self._fn_time[r.fn_id] = took if prev is None else 0.8 * prev + 0.2 * took
        self._wake()
        for w in self._watches.pop(r.task_id, ()):
            w.need -= 1
            if w.need <= 0 and not w.fut.done():
                w.fut.set_result(None)
        if isinstance(e.group, _Group) and self.cfg.persist:
            self._group_changed(e.group)
        else:
            # Nothing waits for it (a waiting submit's answer carries this outcome): it
            # goes with the next batch, within ``record_window_s``.
            self._kv_put_later(r)

    def _wake(self) -> None:
        tick, self._tick = self._tick, None
        if tick is not None and not tick.done():
            tick.set_result(None)

    async def _changed(self, timeout: float) -> None:
        """Until a task ends (``_wake``) or ``timeout`` seconds pass."""
        loop = asyncio.get_running_loop()
        if self._tick is None:
            self._tick = loop.create_future()
        # The tick is shared by every waiter: each waits on a future of its own that the
        # tick or its timer ends (no task, no shield: one turn of the loop to wake).
        mine = loop.create_future()

        def end(_: object = None) -> None:
            if not mine.done():
                mine.set_result(None)

        tick = self._tick
        tick.add_done_callback(end)
        timer = loop.call_later(timeout, end)
        try:
            await mine
        finally:
            timer.cancel()
            tick.remove_done_callback(end)

    # ------------------------------------------------------------------ owner: RPCs

    async def _rpc_done(self, req: DoneRequest) -> DoneReply:
        """A worker's outcome for a task we own; the first one wins, unless it ran
        where the task's current rule leaves out (``Scheduler.outcome_refusal``: that
        run is stopped, killed and audited as the scheduler's ``TaskStopped`` says)."""
        sched = self.sched
        if sched is not None and sched.outcome_refusal(req.task_id, req.node,
                                                       time.monotonic()) is not None:
            self._count("outcomes_dropped_stopped")
            self._pump()
            return DoneReply(False)
        verdict = self.book.outcome(req.task_id, ok=req.ok, kind=req.kind, node=req.node)
        e = self.book.get(req.task_id)
        if verdict is Verdict.STOPPED:
            self._count("outcomes_dropped_stopped")
            return DoneReply(False)
        if verdict is Verdict.DUPLICATE or e is None:
            self._count("outcomes_duplicate")
            return DoneReply(False)
        e.rec.energy_j += req.energy_j  # every attempt's, a retried one's too
        if verdict is Verdict.RETRY:
            return DoneReply(True)  # the scheduler's TaskFinished follows: run it again
        if e.rec.result_class is not None and req.detail_ref is None and (
                req.traceback or req.exc or req.stdout or req.stderr):
            # A classed task's detail travels only as an object of its class
            # (core.policy.detail_rule): what came inline is dropped, never kept here.
            self._count("detail_inline_dropped")
            req = msgspec.structs.replace(
                req, traceback="", exc=None, stdout="", stderr="",
                error=detail_withheld(req.kind, req.error, e.rec.result_class,
                                      f"node {req.node} sent them inline")
                if req.error else "")
        d = req.detail_ref
        detail = None if d is None else {"id": d.id, "size": d.size, "data_class": d.data_class}
        if req.ok and req.value is not None and e.rec.result_class is not None:
            # A classed result travels only as a reference to an object of its class.
            why = self._refuse("result_class", (
                f"task {req.task_id}: its result is of class {e.rec.result_class} and must "
                f"be stored as an object of the class; node {req.node} sent it inline"),
                subject=req.task_id, data_class=e.rec.result_class)
            self._finish(e, "failed", error=str(why), kind="refused", node=req.node,
                         detail_ref=detail)
        elif req.ok:
            ref = req.ref
            self._finish(e, "done", value=req.value,
                         ref=None if ref is None else {"id": ref.id, "size": ref.size},
                         node=req.node, detail_ref=detail)
        else:
            self._finish(e, "failed", error=req.error, kind=req.kind,
                         traceback=req.traceback, node=req.node, exc=req.exc,
                         detail_ref=detail)
        if req.stdout or req.stderr:
            self._keep_logs(req.task_id, req.stdout, req.stderr)
        return DoneReply(True)

    def _rpc_fn(self, req: FnRequest) -> FnReply:
        data = self._fns.get(req.fn_id)
        if data is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"function {req.fn_id} is not cached here")
        return FnReply(data)

    @staticmethod
    def _view_of(r: TaskRecord | Ended) -> TaskView:
        """A record as an answer (the one place it is converted)."""
        ref = None if r.ref is None else ResultRef(str(r.ref["id"]), int(r.ref["size"]))
        return TaskView(task_id=r.task_id, state=r.state, value=r.value, ref=ref,
                        error=r.error, kind=r.kind, traceback=r.traceback, exc=r.exc,
                        node=r.node, owner=r.owner, reason=r.reason,
                        detail_ref=ComputePlane._detail_of(r))

    @staticmethod
    def _detail_of(r: TaskRecord | Ended) -> DetailRef | None:
        d = r.detail_ref
        if d is None:
            return None
        return DetailRef(str(d["id"]), int(d["size"]), str(d["data_class"]))

    def _alive(self) -> set[str]:
        return {n for n, m in self.agent.m.members.items() if m.state <= State.SUSPECT}

    async def _lookup(self, task_id: str, wait_s: float, *,
                      forwarded: bool = False) -> TaskView | None:
        """A task this node does not own: answered from the KV, by its live owner or its
        adopter, or adopted here (``core.tasks.lookup`` decides). None: adopted here (or
        unknown, if it is not in the book after)."""
        rec = await self._kv_get(task_id)
        if rec is None:
            return None
        d = lookup(rec, self.agent.name, self._alive(), forwarded=forwarded)
        if d.action is LookupAction.ANSWER:
            return self._view_of(rec)
        if d.action in (LookupAction.ASK_OWNER, LookupAction.FORWARD):
            try:
                return await self._ask_waiting(d.node, ResultRequest(
                    task_id=task_id, timeout_s=wait_s,
                    forwarded=forwarded or d.action is LookupAction.FORWARD))
            except (RpcError, ValueError) as exc:
                # Unreachable: take it over here (the at-least-once window, counted).
                self._count("adopt_fallback")
                self.agent.log("info", "task_lookup_failed", task=task_id, node=d.node,
                               error=str(exc)[:200])
        await self._adopt(rec)
        return None

    async def _adopt(self, rec: TaskRecord) -> None:
        """The owner is dead (or is this node, restarted) and the task unfinished: this
        node owns it now."""
        tid = rec.task_id
        if tid in self.book:
            return
        task = self._adopting.get(tid)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._adopt_now(rec))
            self._adopting[tid] = task
            task.add_done_callback(lambda _t: self._adopting.pop(tid, None))
        await asyncio.shield(task)

    async def _adopt_now(self, stored: TaskRecord) -> None:
        assert self.sched is not None
        old_owner = stored.owner
        payload_error = ""
        if stored.payload_ref is not None and stored.state not in TERMINAL:
            stored, payload_error = await self._read_payload(stored)
        e, why = self.book.adopt(stored, time.monotonic(), payload_error=payload_error)
        rec = e.rec
        self._count("tasks_adopted")
        self.agent.log("info", "task_adopted", task=rec.task_id, previous_owner=old_owner)
        if why is not None:
            self._finish(e, "failed", error=why, kind="lost")
            return
        if rec.fn_id not in self._fns:
            fn_object = str((rec.payload_ref or {}).get("fn") or "")
            try:
                data = await self._read_function(rec.fn_id, fn_object)
            except (ValueError, RpcError) as exc:
                self._finish(e, "failed", error=f"owner {old_owner} died; its function "
                                                f"object is unreadable: {exc}", kind="lost")
                return
            self._remember_fn(rec.fn_id, data)
            if not fn_object:
                self._fns_stored.add(rec.fn_id)
        if rec.after:  # waits for its upstream tasks: not while the asker waits on it
            self.agent.spawn(self._start(e))
        elif not await self._start(e):
            return
        await self._kv_put(msgspec.structs.replace(rec))

    async def _rpc_result(self, req: ResultRequest) -> TaskView:
        tid = req.task_id
        wait_s = min(req.timeout_s, self.cfg.max_wait_s)
        deadline = time.monotonic() + wait_s
        ended = self.book.ended.get(tid)
        if ended is not None:
            return self._view_of(ended)
        e = self.book.get(tid)
        if e is None:
            found = await self._lookup(tid, wait_s, forwarded=req.forwarded)
            if found is not None:
                self._unrecorded.found(tid)
                return found
            e = self.book.get(tid)
            if e is None:
                ended = self.book.ended.get(tid)  # adopted, and failed at once
                if ended is not None:
                    return self._view_of(ended)
                if not self._unrecorded.missing(tid, time.monotonic()):
                    # Its record may not be written yet (``core.tasks.Unrecorded``).
                    return TaskView(task_id=tid, state=TaskState.PENDING)
                raise ApiError(ErrorCode.NOT_FOUND, f"unknown task {tid}")
        e.waiters += 1
        try:
            while e.rec.state not in TERMINAL:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await self._changed(left)
        finally:
            e.waiters -= 1
        return self._view_of(e.rec)

    async def _rpc_wait(self, req: WaitRequest) -> WaitReply:
        """Outcomes of those of ``task_ids`` that are terminal; waits up to ``timeout_s``
        until ``min_done`` of them (default 1; ``mesh.wait`` asks for all) are. Ids this
        node does not own are looked up once (KV, owner).

        Each task that ends counts down the calls waiting on it (O(1) per completion):
        re-scanning every id on every completion, with a client re-polling after each
        one, made a 10,000-task wait quadratic (3,000 polls of ~2,700 ids each)."""
        ids = req.task_ids[: self.cfg.max_wait_ids]
        wait_s = min(req.timeout_s, self.cfg.max_wait_s)
        min_done = max(1, min(req.min_done, len(ids)))
        deadline = time.monotonic() + wait_s
        out: list[TaskView] = []
        unknown: list[str] = []
        unrecorded = False  # a task with no record yet (``core.tasks.Unrecorded``)
        foreign = [t for t in ids if t not in self.book]
        for tid in foreign:
            found = await self._lookup(tid, 0.0)
            if found is not None or tid in self.book:
                self._unrecorded.found(tid)
            if found is not None and found.state in TERMINAL:
                out.append(found)
            elif found is None and tid not in self.book:
                if self._unrecorded.missing(tid, time.monotonic()):
                    unknown.append(tid)
                else:
                    unrecorded = True
        local = [t for t in ids if t in self.book]
        pending = [t for t in local if t in self.book.records]  # live: not ended
        need = min_done - (len(out) + len(unknown) + len(local) - len(pending))
        left = deadline - time.monotonic()
        if need > 0 and left > 0 and not pending:
            # Only tasks owned elsewhere, still running (as before), or not yet recorded:
            # the caller asks again after the recheck interval and the KV is read again.
            await asyncio.sleep(min(left, self.cfg.unrecorded_recheck_s) if unrecorded
                                else left)
        elif need > 0 and left > 0:
            # Tasks owned elsewhere cannot count down here: wait at most for all local ones.
            w = _Watch(min(need, len(pending)), asyncio.get_running_loop().create_future())
            for t in pending:
                self._watches.setdefault(t, []).append(w)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.fut, left)
            finally:
                for t in pending:
                    ws = self._watches.get(t)
                    if ws is not None and w in ws:
                        ws.remove(w)
                        if not ws:
                            del self._watches[t]
        budget = WAIT_REPLY_BYTES - sum(_view_bytes(r.value, r.exc, r.traceback) for r in out)
        for t in local:
            ended = self.book.ended.get(t)
            if ended is None:
                continue
            size = _view_bytes(ended.value, ended.exc, ended.traceback)
            if size > budget and out:
                break  # the rest next time
            budget -= size
            out.append(self._view_of(ended))
        return WaitReply(out, unknown)

    async def _rpc_cancel(self, req: CancelRequest) -> CancelReply:
        tid = req.task_id
        ended = self.book.ended.get(tid)
        if ended is not None:
            return CancelReply(False, ended.state)
        e = self.book.get(tid)
        if e is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown task {tid} (cancel it at the node "
                                                "it was submitted to)")
        if e.rec.state in TERMINAL:
            return CancelReply(False, e.rec.state)
        node = e.rec.node
        self._finish(e, "cancelled", error="cancelled", kind="cancelled")
        if node:
            with contextlib.suppress(RpcError, ValueError):
                await self._call(node, TASK_KILL, KillRequest(owner=self.agent.name,
                                                              task_id=tid))
        return CancelReply(True, TaskState.CANCELLED)

    async def _rpc_logs(self, req: LogsRequest) -> TaskLogs:
        """What a task printed: from its record once it has ended (here, or in the KV);
        while it runs, what its worker node has had so far (asked through the owner, which
        knows that node). ``forwarded``: answer from this node alone."""
        tid = req.task_id
        live = self._live_output(tid)
        rec: TaskRecord | Ended | None = self.book.find(tid)
        held = rec is not None
        if rec is None and not (req.forwarded and live is not None):
            rec = await self._kv_get(tid)
        if rec is None:
            if live is not None:
                return TaskLogs(task_id=tid, state=TaskState.RUNNING, stdout=live[0],
                                stderr=live[1], node=self.agent.name)
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown task {tid}")
        if rec.state in TERMINAL or req.forwarded:
            if rec.state not in TERMINAL and live is not None:
                return TaskLogs(task_id=tid, state=rec.state, stdout=live[0],
                                stderr=live[1], node=self.agent.name)
            out, err = await self._logs_of(tid) if rec.state in TERMINAL else ("", "")
            return TaskLogs(task_id=tid, state=rec.state, stdout=out, stderr=err,
                            node=rec.node, detail_ref=self._detail_of(rec))
        # Running: the owner knows where; the worker node has the output so far.
        ask = rec.owner if not held and rec.owner != self.agent.name else rec.node
        if ask == self.agent.name:
            out, err = live if live is not None else ("", "")
            return TaskLogs(task_id=tid, state=rec.state, stdout=out, stderr=err, node=ask)
        if ask and ask in self._alive():
            with contextlib.suppress(RpcError, ValueError):
                # The owner may ask its worker node once more; a worker node answers.
                return await self._call(ask, TASK_LOGS, LogsRequest(
                    task_id=tid, forwarded=ask != rec.owner))
        return TaskLogs(task_id=tid, state=rec.state, node=rec.node)

    # What an ended task printed is kept beside its record: in memory (bounded by
    # ``max_logs_kept_bytes``, newest kept) and in the KV (``tasklog/<id>``), so records,
    # and the sets of them one submit writes together, stay small.

    def _keep_logs(self, task_id: str, stdout: str, stderr: str) -> None:
        old = self._logs.pop(task_id, None)
        if old is not None:
            self._logs_bytes -= len(old[0]) + len(old[1])
        self._logs[task_id] = (stdout, stderr)
        self._logs_bytes += len(stdout) + len(stderr)
        while self._logs_bytes > self.cfg.max_logs_kept_bytes and self._logs:
            _, (o, e) = self._logs.popitem(last=False)
            self._logs_bytes -= len(o) + len(e)
        self._record_put(LOG_PREFIX + task_id, _logs_encoder.encode(_Logs(stdout, stderr)),
                         urgent=False)

    async def _logs_of(self, task_id: str) -> tuple[str, str]:
        hit = self._logs.get(task_id)
        if hit is not None:
            return hit
        data = await self._kv_read(LOG_PREFIX + task_id)
        if data is None:
            return "", ""
        try:
            logs = _logs_decoder.decode(data)
        except DECODE_ERRORS:
            self._count("kv_bad_record")
            return "", ""
        return logs.stdout, logs.stderr

    def _live_output(self, task_id: str) -> tuple[str, str] | None:
        """What a task running on this node's workers has printed so far."""
        for key, pool_id in list(self._running.items()):
            if key.partition("/")[2] == task_id:
                if key in self._kept_running:
                    return "", ""  # core.policy.detail_rule: kept within its class
                return self.pool.output(pool_id)
        return None

    def _rpc_list(self, req: ListRequest) -> list[TaskRow]:
        limit = min(req.limit, self.cfg.max_list_rows)
        # Newest submitted first, live and ended alike (both bounded: a few ms).
        every: Iterator[TaskRecord | Ended] = itertools.chain(
            (e.rec for e in self.book.records.values()), self.book.ended.values())
        newest = heapq.nlargest(limit, every, key=lambda r: r.submitted)
        return [TaskRow(task_id=r.task_id, state=r.state, node=r.node, owner=r.owner,
                        reason=r.reason, submitted=r.submitted, finished=r.finished,
                        error=r.error[:200], name=r.name, energy_j=round(r.energy_j, 3))
                for r in newest]

    async def _rpc_stats(self, req: Empty) -> TaskStats:
        assert self.sched is not None
        return TaskStats(compute=dict(self.stats), scheduling=dict(self.sched.stats),
                         pool=self.pool.stats(), records=len(self.book),
                         load=self._load_report().load, capacity=self.capacity)

    # ------------------------------------------------------------------ worker

    async def _rpc_kill(self, req: KillRequest) -> KillReply:
        pool_id = self._running.get(f"{req.owner}/{req.task_id}")
        if pool_id is None:
            return KillReply(False)
        return KillReply(await self.pool.cancel(pool_id))

    async def _function(self, owner: str, fn_id: str, stored: str = "") -> bytes:
        data = self._fns.get(fn_id)
        if data is not None:
            return data
        try:
            data = (await self._call(owner, TASK_FN, FnRequest(fn_id=fn_id))).fn
        except (RpcError, ValueError):
            return await self._read_function(fn_id, stored)
        if function_id(data) != fn_id:
            raise ValueError(f"function bytes do not hash to {fn_id}")
        return data

    async def _keep_detail(self, outcome: DoneRequest, rule: Residency | None,
                           why: str) -> None:
        """A classed task's error, traceback, exception and output: stored here as one
        object under ``rule`` (``core.policy.detail_rule``), the way a classed result is;
        ``outcome`` keeps only its reference and ``core.tasks.detail_note``. Nothing of it
        travels inline: if it cannot be stored (or ``why``: its rule is ambiguous), it is
        dropped and the error says so."""
        if not (outcome.error or outcome.traceback or outcome.exc or outcome.stdout
                or outcome.stderr):
            return
        cls = rule.data_class if rule is not None and rule.data_class else "unknown"
        if rule is not None and not why:
            body = encode_detail(TaskDetail(
                task_id=outcome.task_id, kind=outcome.kind, error=outcome.error,
                traceback=outcome.traceback, exc=outcome.exc, stdout=outcome.stdout,
                stderr=outcome.stderr))
            try:
                ref = await self.local.put_object(body, self.cfg.result_replicas,
                                                  ResidencyWire.of(rule))
            except (RpcError, ValueError) as e:
                self._count("detail_store_failed")
                why = f"it could not be stored as an object of class {cls}: {str(e)[:200]}"
            else:
                oid = str(ref["id"])
                outcome.detail_ref = DetailRef(oid, int(ref["size"]), cls)
                if outcome.error:
                    outcome.error = detail_note(outcome.kind, outcome.error, oid, cls)
                self._count("details_stored")
        if why:
            self._count("details_withheld")
            if outcome.error or not outcome.ok:
                outcome.error = detail_withheld(outcome.kind, outcome.error, cls, why)
        outcome.traceback, outcome.exc, outcome.stdout, outcome.stderr = "", None, "", ""

    async def _run(self, rt: RunTask) -> None:
        """One run on this node, counted as foreground work from its first step (its
        inputs' fetch) to ``foreground_linger_s`` after the last run's end: the node's
        repair copies are limited meanwhile."""
        self._runs_here += 1
        if not self._fg_busy:
            self._fg_busy = True
            self.agent.set_foreground_busy(True)
        try:
            await self._run_task(rt)
        finally:
            self._runs_here -= 1
            if self._runs_here == 0:
                self._runs_ended_at = time.monotonic()
                if self._fg_timer is None:
                    self._fg_timer = asyncio.get_running_loop().call_later(
                        self.cfg.foreground_linger_s, self._foreground_check)

    def _foreground_check(self) -> None:
        """Runs stopped ``foreground_linger_s`` ago, or stopped once since: the data plane
        hears the node is idle only when none ran for that long."""
        self._fg_timer = None
        if self._runs_here or not self._fg_busy:
            return  # running again: the next end arms this again
        left = self._runs_ended_at + self.cfg.foreground_linger_s - time.monotonic()
        if left > 0:
            self._fg_timer = asyncio.get_running_loop().call_later(
                left, self._foreground_check)
            return
        self._fg_busy = False
        self.agent.set_foreground_busy(False)

    async def _run_task(self, rt: RunTask) -> None:
        spec, owner = rt.task, rt.owner
        outcome = DoneRequest(task_id=spec.task_id, node=self.agent.name, attempt=rt.attempt)
        key = f"{owner}/{spec.task_id}"
        pool_id = f"{key}/{rt.attempt}"
        links: list[Path] = []
        kept: Residency | None = None  # the detail's rule (core.policy.detail_rule)
        detail_why = ""  # the detail's rule is ambiguous: it is withheld
        ran_task = False  # the outcome carries what the task itself raised or printed
        try:
            p = msgspec.msgpack.decode(spec.payload, type=_Payload)
            if self._pool_ready is not None and not self._pool_ready.is_set():
                if self.on_demand is not None:
                    self.on_demand()
                await asyncio.wait_for(self._pool_ready.wait(), self.pool.config.start_timeout_s)
            inputs = (list(await asyncio.gather(*(self._input(o, links) for o in p.inputs)))
                      if p.inputs else [])
            out = p.result_rule
            if out is None and spec.residency is not None and spec.residency.data_class:
                out = ResidencyWire.of(spec.residency)  # an owner without result rules
            elif out is not None:
                # The owner may have narrowed the task's rule since submit (its class
                # narrowed): the result's copies keep within it too.
                out = ResidencyWire.of(result_within(out.rule(), spec.residency))
            in_classes = sorted({i.residency.data_class for i in spec.inputs
                                 if i.residency is not None and i.residency.data_class})
            run_class = spec.residency.data_class if spec.residency is not None else None
            try:
                kept = detail_rule(None if out is None else out.rule(), spec.residency,
                                     [i.residency for i in spec.inputs])
            except PolicyError as e:
                detail_why = str(e)
            if kept is not None or detail_why:
                self._kept_running.add(key)
            if run_class or in_classes or (out is not None and out.data_class):
                result_class = out.data_class if out is not None else None
                self.agent.record(
                    Kind.TASK_RUN, spec.task_id, who=spec.submitter or owner,
                    data_class=result_class or run_class or in_classes[0],
                    detail=f"owner {owner}, {len(p.inputs)} inputs"
                           + (f" of classes {','.join(in_classes)}" if in_classes else "")
                           + f", result class {result_class or 'none'}")
            # Here only: an idle node does not load pickle (test_idle_imports.py).
            import pickle

            if p.upstream:
                upstream = list(await asyncio.gather(*(
                    self._upstream_input(v, links) for v in p.upstream)))
                call_args = pickle.dumps(((p.args, inputs, upstream), {}), protocol=5)
            else:
                call_args = pickle.dumps(((p.args, inputs), {}), protocol=5)
            self._running[key] = pool_id
            self.energy.start(pool_id, spec.cpus, time.monotonic())
            kw: dict[str, Any] = {"timeout_s": p.timeout_s, "cpus": spec.cpus,
                                  "memory_mb": p.memory_mb or None, "task_id": pool_id}
            try:
                ran = await self.pool.run_task(p.fn_id, None, call_args, **kw)
            except FunctionNotCached:
                fn = await self._function(owner, p.fn_id, p.fn_object)
                ran = await self.pool.run_task(p.fn_id, fn, call_args, **kw)
            result = ran.result
            outcome.stdout, outcome.stderr = ran.stdout, ran.stderr
            ran_task = True
            classed = out is not None and out.data_class is not None
            if len(result) <= self.cfg.inline_result_bytes and not classed:
                outcome.ok, outcome.value = True, result
            else:
                # A classed result, whatever its size, is an object of its class under
                # its rule (core.policy.result_rule): only the reference goes to the
                # owner, which may be outside the class's regions.
                ref = await self.local.put_object(
                    result, self.cfg.result_replicas, out if classed else None)
                outcome.ok, outcome.ref = True, ResultRef(str(ref["id"]), int(ref["size"]))
        except WorkerTaskFailed as e:
            outcome.kind, outcome.error, outcome.traceback = e.kind, e.message, e.traceback
            outcome.exc = e.exc or None
            outcome.stdout, outcome.stderr = e.stdout, e.stderr
            ran_task = True
        except (PoolBusy, PoolClosed) as e:
            outcome.kind, outcome.error = "worker_crashed", f"{type(e).__name__}: {e}"
        except _INPUT_ERRORS as e:
            outcome.kind, outcome.error = "input", str(e)
        except TimeoutError:
            outcome.kind, outcome.error = "worker_crashed", "workers did not start"
        finally:
            self._running.pop(key, None)
            self._kept_running.discard(key)
            outcome.energy_j = self.energy.end(pool_id, time.monotonic())
            copies = self.agent.local_copies()
            if links and copies is not None:
                await copies.release_copies(links)
        if self.sched is not None:
            # The slot is free: its next GetTask goes out while the outcome travels (the
            # Result follows the outcome, in task_finished below).
            self.sched.run_ended(owner, spec.task_id, rt.attempt, time.monotonic())
            self._pump()
        if ran_task and (kept is not None or detail_why):
            await self._keep_detail(outcome, kept, detail_why)
        if (self.sched is not None and owner != self.agent.name
                and owner not in self._no_exchange):
            # The outcome goes in the next scheduling call to its owner, ahead of its
            # Result (queued by task_finished below) and with the slot's next GetTask
            # when that has not gone yet: one call for the three.
            self._outcomes.setdefault(owner, []).append(outcome)
        else:
            await self._send_outcome(owner, outcome)
        if self.sched is not None:
            detail = "" if outcome.ok else outcome.error[:200]
            self.sched.task_finished(owner, spec.task_id, rt.attempt, outcome.ok,
                                     detail, time.monotonic())
            self._pump()
