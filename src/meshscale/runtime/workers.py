"""The compute plane's execution engine: a warm pool of worker processes on one node.

Like Ray's raylet worker pool and Dask's nanny-managed workers, a node keeps one process
per CPU, started ahead of time, and ships each function to a worker at most once, keyed
by the BLAKE3 of its cloudpickle (``function_id``). Departures from those systems:

- Start method: ``"spawn"`` — each worker is a fresh interpreter started by fork+exec
  of ``sys.executable`` with ``close_fds``, so it inherits only its end of a
  ``socketpair`` and stdio: never the agent's event loop, sockets, threads or TLS state.
  A worker starts in well under 100 ms here (it imports only msgspec and cloudpickle);
  a fork server would save little and would bring back shared state, so there is none.
- The pool owns each worker's function cache. It mirrors the worker's LRU exactly (the
  worker evicts only what the pool tells it to), so it knows which bytes to send without
  a round trip. The pool also keeps a bounded LRU of function bytes, so callers may pass
  ``fn_bytes=None`` for a function it has seen; ``FunctionNotCached`` asks them to re-send.
- Timeout and cancel kill the worker (SIGKILL) rather than interrupt it: Python code in C
  extensions cannot be interrupted reliably, and a killed worker cannot leak state into
  the next task. The replacement is started at once, so capacity is never lost. The
  timeout counts from when the task reaches a worker, not time spent queued.
- Isolation (``runtime/isolation.py``, given as ``PoolConfig.isolation``): workers run as
  the worker user when the agent is root, each in a cgroup of its own. Before each task
  the pool sets the cgroup's memory limit to the worker's current usage plus
  ``memory_mb`` and its CPU quota to the task's ``cpus``; the kernel kills a worker that
  goes over, and the pool reports it as ``"memory"`` (the cgroup's OOM-kill count rose).
  Without a memory cgroup, the limit is RLIMIT_AS set in the worker for the task's
  duration, as growth over the worker's current address space; a ``MemoryError`` under
  it fails the task as ``"memory"`` and the worker lives on. (The cgroup is preferred:
  it counts memory really used, by the task's child processes too, where RLIMIT_AS counts
  address space reserved, which thread arenas and some allocators take plenty of.)
  A worker killed by the kernel outside such a limit is reported as ``"worker_crashed"``.
- Workers get the agent's ``sys.path`` (after their own), as multiprocessing's spawn
  does, so a function pickled by reference to a module the agent can import resolves.
  Code from remote clients should be pickled by value (``register_pickle_by_value``).
  A worker's stdout and stderr lead to /dev/null (what a task prints is captured per
  task and returned with its outcome, ``Ran``/``TaskFailed``, and seen while it runs
  through ``output``); stdin is /dev/null; SIGINT is ignored.
- Workers die with the agent (``PR_SET_PDEATHSIG``, Linux). That signal follows the
  thread that started the worker, so start the pool (and let it replace workers) from
  the event loop's thread, which is the only way the pool's code runs anyway.

Every queue and message has a bound (``PoolConfig``); a bound hit is refused with an error
and counted, never buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from meshscale.runtime.worker_main import (
    FRAME_HEADER,
    KIND_MEMORY,
    KIND_MISSING,
    KIND_RAISED,
    KIND_TOO_LARGE,
    KIND_UNPICKLABLE,
    LOG_NOTE_BYTES,
    MAX_ENVELOPE,
    REPLY_SLACK,
    Done,
    Failed,
    Init,
    Output,
    Ready,
    Task,
    encoder,
    frame_header,
    from_worker_decoder,
    function_id,
)

if TYPE_CHECKING:
    from meshscale.runtime.isolation import Isolation, WorkerCgroup

__all__ = [
    "FAILURE_KINDS",
    "FunctionNotCached",
    "PoolBusy",
    "PoolClosed",
    "PoolConfig",
    "Ran",
    "TaskFailed",
    "WorkerPool",
    "function_id",
    "load_result",
    "pickle_args",
    "pickle_function",
]

KIND_TIMEOUT = "timeout"
KIND_CRASHED = "worker_crashed"
KIND_CANCELLED = "cancelled"
FAILURE_KINDS = (
    KIND_RAISED,
    KIND_TIMEOUT,
    KIND_MEMORY,
    KIND_CRASHED,
    KIND_UNPICKLABLE,
    KIND_TOO_LARGE,
    KIND_CANCELLED,
)
_WORKER_KINDS = frozenset({KIND_RAISED, KIND_MEMORY, KIND_UNPICKLABLE, KIND_TOO_LARGE})

_BOOT = (
    "import sys; sys.path.append(sys.argv[1]); "
    "from meshscale.runtime.worker_main import main; main(sys.argv[2:])"
)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class PoolConfig:
    workers: int = os.cpu_count() or 1
    max_function_bytes: int = 64 << 20  # one pickled function
    max_arg_bytes: int = 64 << 20  # one pickled (args, kwargs)
    max_result_bytes: int = 256 << 20  # one pickled result
    max_cached_functions: int = 256  # per worker, LRU
    max_pool_function_bytes: int = 256 << 20  # the pool's own LRU of function bytes
    default_timeout_s: float | None = None
    default_memory_mb: int | None = None
    max_queue: int = 10_000  # tasks waiting for a worker; beyond -> PoolBusy
    start_method: Literal["spawn"] = "spawn"  # fresh interpreter, see the module doc
    start_timeout_s: float = 60.0  # a worker must report ready within this
    close_timeout_s: float = 2.0  # idle workers get this long to exit before SIGKILL
    restart_backoff_max_s: float = 5.0  # between replacements that die before ready
    isolation: Isolation | None = None  # worker user, work dir, cgroups (isolation.py)
    max_log_bytes: int = 64 * 1024  # what one task printed, kept per stream (stdout, stderr)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        for name in (
            "max_function_bytes",
            "max_arg_bytes",
            "max_result_bytes",
            "max_cached_functions",
            "max_queue",
            "max_log_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_function_bytes + self.max_arg_bytes >= 1 << 32:
            raise ValueError("max_function_bytes + max_arg_bytes must fit in 32 bits")
        if self.max_result_bytes + REPLY_SLACK + 2 * self.max_log_bytes >= 1 << 32:
            raise ValueError("max_result_bytes must fit in 32 bits")
        if self.start_method != "spawn":
            raise ValueError(f"unsupported start_method {self.start_method!r}")
        if self.default_timeout_s is not None and self.default_timeout_s <= 0:
            raise ValueError("default_timeout_s must be > 0")
        if self.default_memory_mb is not None and self.default_memory_mb < 1:
            raise ValueError("default_memory_mb must be >= 1")


class TaskFailed(Exception):
    """A task did not produce a result. ``kind`` is one of ``FAILURE_KINDS``;
    for ``"raised"`` (and ``"memory"``) ``traceback`` is the remote traceback text, and
    for ``"raised"`` ``exc`` the exception pickled (b"" when it would not pickle).
    ``stdout`` and ``stderr``: what the task printed (bounded; a cut says so)."""

    def __init__(self, kind: str, message: str, traceback: str = "", *, exc: bytes = b"",
                 stdout: str = "", stderr: str = "") -> None:
        assert kind in FAILURE_KINDS, kind
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.traceback = traceback
        self.exc = exc
        self.stdout = stdout
        self.stderr = stderr


@dataclass(frozen=True)
class Ran:
    """A task's pickled result and what it printed (``WorkerPool.run_task``)."""

    result: bytes
    stdout: str = ""
    stderr: str = ""


class PoolBusy(Exception):
    """The queue of tasks waiting for a worker is full (``PoolConfig.max_queue``)."""


class PoolClosed(Exception):
    """The pool is not running (not started, or closed)."""


class FunctionNotCached(KeyError):
    """``fn_bytes`` was None and the function is not cached: send the bytes again."""

    def __init__(self, fn_id: str) -> None:
        super().__init__(fn_id)
        self.fn_id = fn_id

    def __str__(self) -> str:
        return f"function {self.fn_id} is not cached; re-send its bytes"


def pickle_function(fn: Callable[..., Any]) -> tuple[str, bytes]:
    """``(function_id, cloudpickle bytes)``; TaskFailed("unpicklable") names the cause."""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    if not callable(fn):
        raise TaskFailed(
            KIND_UNPICKLABLE, f"{name} is not callable (a {type(fn).__name__} object)"
        )
    import cloudpickle  # here: a node that runs no task never loads it

    try:
        data = cloudpickle.dumps(fn, protocol=5)
    except Exception as e:
        raise TaskFailed(
            KIND_UNPICKLABLE, f"cannot pickle function {name}: {type(e).__name__}: {e}"
        ) from e
    return function_id(data), data


def pickle_args(*args: Any, **kwargs: Any) -> bytes:
    """The ``args`` bytes ``WorkerPool.run`` expects."""
    import cloudpickle

    try:
        data: bytes = cloudpickle.dumps((args, kwargs), protocol=5)
        return data
    except Exception as e:
        raise TaskFailed(
            KIND_UNPICKLABLE, f"cannot pickle arguments: {type(e).__name__}: {e}"
        ) from e


def load_result(data: bytes) -> Any:
    """The value a task returned, from ``WorkerPool.run``'s bytes."""
    import cloudpickle

    return cloudpickle.loads(data)


# --- internals -------------------------------------------------------------------------

_State = Literal["starting", "idle", "busy", "doomed", "dead"]


class _Job:
    __slots__ = ("args", "cpus", "fn_bytes", "fn_id", "future", "live", "memory_mb",
                 "task_id", "timeout_s", "timer", "worker")

    def __init__(
        self,
        task_id: str,
        fn_id: str,
        fn_bytes: bytes | None,
        args: bytes,
        timeout_s: float | None,
        memory_mb: int | None,
        future: asyncio.Future[Ran],
        cpus: float | None = None,
    ) -> None:
        self.task_id = task_id
        self.fn_id = fn_id
        self.fn_bytes = fn_bytes
        self.args = args
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.future = future
        self.timer: asyncio.TimerHandle | None = None
        self.worker: _Worker | None = None
        self.live: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        """What the task has printed so far (``Output``), while it runs."""


class _Worker:
    def __init__(self, proc: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.state: _State = "starting"
        self.transport: asyncio.Transport | None = None
        self.cached: OrderedDict[str, None] = OrderedDict()  # mirror of the worker's cache
        self.job: _Job | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.pidfd = -1
        self.cg: WorkerCgroup | None = None
        self.oom_kills = 0  # the cgroup's count when the current task started

    def kill(self) -> None:
        # Safe against pid reuse: the pool reaps only after it sees the exit.
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def send(self, parts: list[bytes]) -> None:
        assert self.transport is not None
        if sum(len(p) for p in parts) <= 64 * 1024:
            self.transport.write(b"".join(parts))
        else:
            self.transport.writelines(parts)


class _WorkerProtocol(asyncio.Protocol):
    """Splits the worker's replies into frames, bounds checked before buffering on."""

    def __init__(self, pool: WorkerPool, worker: _Worker, max_body: int) -> None:
        self.pool = pool
        self.worker = worker
        self.max_body = max_body
        self.buf = bytearray()
        self.need = 0  # bytes of the current frame, once its header is in
        self.env_len = 0

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        head = FRAME_HEADER.size
        while True:
            if not self.need:
                if len(buf) < head:
                    return
                env_len, body_len = FRAME_HEADER.unpack_from(buf, 0)
                if env_len > MAX_ENVELOPE or body_len > self.max_body:
                    self.pool._violation(self.worker, f"frame ({env_len}, {body_len}) too large")
                    return
                self.env_len = env_len
                self.need = head + env_len + body_len
            if len(buf) < self.need:
                return
            with memoryview(buf) as view:
                env = view[head : head + self.env_len]
                body = bytes(view[head + self.env_len : self.need])
                try:
                    msg = from_worker_decoder.decode(env)
                except Exception as e:
                    msg = None
                    error = str(e)
                del env
            del buf[: self.need]
            self.need = 0
            if msg is None:
                self.pool._violation(self.worker, f"bad envelope: {error}")
                return
            self.pool._on_message(self.worker, msg, body)
            if self.worker.state in ("doomed", "dead"):
                return

    def connection_lost(self, exc: Exception | None) -> None:
        # The worker closed its end: it is exiting (or broke its own socket). Make sure it
        # exits; its exit, seen through the pidfd, is what retires it.
        self.worker.kill()


class WorkerPool:
    """A warm pool of worker processes. All methods run on one event loop's thread."""

    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config or PoolConfig()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: set[_Worker] = set()  # every process not yet reaped
        self._idle: list[_Worker] = []
        self._queue: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}  # queued or running, by task id
        self._fn_bytes: OrderedDict[str, bytes] = OrderedDict()
        self._fn_total = 0
        self._counts: Counter[str] = Counter()
        self._running = False
        self._closed = False
        self._replacing: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._backoff = 0.0
        self._cg_seq = 0

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start ``config.workers`` processes and wait until each reports ready."""
        if self._running or self._closed:
            raise PoolClosed("start() may be called once")
        self._loop = asyncio.get_running_loop()
        workers = [await self._spawn() for _ in range(self.config.workers)]
        try:
            async with asyncio.timeout(self.config.start_timeout_s):
                await asyncio.gather(*(w.ready for w in workers))
        except BaseException:
            await self.close()
            raise
        self._running = True

    async def close(self, *, keep_cgroups: bool = False) -> None:
        """Fail what is queued or running (``"cancelled"``) and end every worker;
        ``keep_cgroups``: leave the node's parent cgroups for a pool started later (a
        node going on standby, ``runtime/capacity.py``)."""
        self._running = False
        self._closed = True
        for t in list(self._replacing):
            t.cancel()
        for t in list(self._replacing):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        while self._queue:
            job = self._queue.popleft()
            self._finish(job, TaskFailed(KIND_CANCELLED, "the pool was closed"))
        workers = list(self._workers)
        for w in workers:
            if w.state == "idle" and w.transport is not None:
                w.state = "doomed"
                w.transport.close()  # EOF: the worker exits by itself
            else:
                self._doom(w, KIND_CANCELLED, "the pool was closed")
        self._idle.clear()
        pending = [w.exited for w in workers if not w.exited.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.config.close_timeout_s)
            if still:
                for w in workers:
                    w.kill()
                await asyncio.wait(still, timeout=self.config.close_timeout_s)
        for w in workers:
            if not w.exited.done():  # cannot happen short of a stuck kernel; do not hang
                self._reap_blocking(w)
        iso = self.config.isolation
        if iso is not None and iso.cgroups is not None and not keep_cgroups:
            with contextlib.suppress(OSError):
                iso.cgroups.close()  # what is left of the workers' cgroups, and the parent

    # --- tasks --------------------------------------------------------------------------

    async def run(
        self,
        fn_id: str,
        fn_bytes: bytes | None,
        args: bytes,
        *,
        timeout_s: float | None = None,
        memory_mb: int | None = None,
        task_id: str | None = None,
        cpus: float | None = None,
    ) -> bytes:
        """``run_task``'s pickled result alone."""
        ran = await self.run_task(fn_id, fn_bytes, args, timeout_s=timeout_s,
                                  memory_mb=memory_mb, task_id=task_id, cpus=cpus)
        return ran.result

    async def run_task(
        self,
        fn_id: str,
        fn_bytes: bytes | None,
        args: bytes,
        *,
        timeout_s: float | None = None,
        memory_mb: int | None = None,
        task_id: str | None = None,
        cpus: float | None = None,
    ) -> Ran:
        """Run a function on a warm worker; return its pickled result and what it printed.

        ``args`` is the cloudpickled ``(args, kwargs)`` (see ``pickle_args``); ``cpus`` is
        the task's CPU quota where the worker has a cgroup (default 1). Raises
        TaskFailed, PoolBusy, PoolClosed, or FunctionNotCached when ``fn_bytes`` is None
        and the function is not cached.
        """
        if not self._running:
            raise PoolClosed("the pool is not running")
        cfg = self.config
        if fn_bytes is not None and len(fn_bytes) > cfg.max_function_bytes:
            self._counts[f"failed_{KIND_TOO_LARGE}"] += 1
            raise TaskFailed(
                KIND_TOO_LARGE,
                f"function of {len(fn_bytes)} bytes exceeds max_function_bytes="
                f"{cfg.max_function_bytes}",
            )
        if len(args) > cfg.max_arg_bytes:
            self._counts[f"failed_{KIND_TOO_LARGE}"] += 1
            raise TaskFailed(
                KIND_TOO_LARGE,
                f"arguments of {len(args)} bytes exceed max_arg_bytes={cfg.max_arg_bytes}",
            )
        if task_id is None:
            task_id = f"_t{next(self._ids)}"
        elif task_id in self._jobs:
            raise ValueError(f"task {task_id!r} is already queued or running")
        if self._fn_bytes.get(fn_id) is not None:
            self._fn_bytes.move_to_end(fn_id)
            fn_bytes = None  # known already: drop the caller's copy
        elif fn_bytes is not None:
            if function_id(fn_bytes) != fn_id:
                raise ValueError(f"function bytes do not hash to {fn_id}")
            self._remember_function(fn_id, fn_bytes)
        elif not any(fn_id in w.cached for w in self._workers):
            raise FunctionNotCached(fn_id)
        if len(self._queue) >= cfg.max_queue:
            self._counts["rejected_busy"] += 1
            raise PoolBusy(f"{len(self._queue)} tasks already wait for a worker")
        if timeout_s is None:
            timeout_s = cfg.default_timeout_s
        if memory_mb is None:
            memory_mb = cfg.default_memory_mb
        assert self._loop is not None
        job = _Job(task_id, fn_id, fn_bytes, args, timeout_s, memory_mb,
                   self._loop.create_future(), cpus)
        self._jobs[task_id] = job
        self._queue.append(job)
        self._pump()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._abandon(job, "the caller stopped waiting")
            raise

    def _remember_function(self, fn_id: str, data: bytes) -> None:
        """The pool's LRU of function bytes, bounded by count and total size."""
        limit = self.config.max_pool_function_bytes
        if len(data) > limit:
            return
        self._fn_bytes[fn_id] = data
        self._fn_total += len(data)
        while self._fn_total > limit or len(self._fn_bytes) > self.config.max_cached_functions:
            _, old = self._fn_bytes.popitem(last=False)
            self._fn_total -= len(old)

    async def cancel(self, task_id: str) -> bool:
        """Drop a queued task, or kill the worker running it (it is replaced)."""
        job = self._jobs.get(task_id)
        if job is None:
            return False
        self._abandon(job, "cancelled")
        return True

    def stats(self) -> dict[str, int]:
        out = {
            "workers": sum(1 for w in self._workers if w.state in ("idle", "busy")),
            "idle": len(self._idle),
            "running": sum(1 for w in self._workers if w.state == "busy"),
            "queued": len(self._queue),
            "completed": 0,
            "restarts": 0,
            "cache_hits": 0,
            "cache_misses": 0,
            "functions_sent": 0,
            "function_bytes_sent": 0,
            "rejected_busy": 0,
            "pool_cached_functions": len(self._fn_bytes),
            "pool_cached_function_bytes": self._fn_total,
        }
        for kind in FAILURE_KINDS:
            out[f"failed_{kind}"] = 0
        out.update(self._counts)
        return out

    def output(self, task_id: str) -> tuple[str, str] | None:
        """What the running (or queued) task ``task_id`` has printed so far, to stdout
        and to stderr; None if the pool does not have it."""
        job = self._jobs.get(task_id)
        if job is None:
            return None
        # A character cut between two sends is left out until the rest of it arrives.
        return (job.live[1].decode("utf-8", "ignore"), job.live[2].decode("utf-8", "ignore"))

    def worker_pids(self) -> list[int]:
        """Pids of every worker process not yet reaped (for tests and the dashboard)."""
        return sorted(w.pid for w in self._workers)

    # --- scheduling ---------------------------------------------------------------------

    def _pump(self) -> None:
        queue, idle = self._queue, self._idle
        while queue and idle:
            job = queue.popleft()
            worker = None
            for i in range(len(idle) - 1, -1, -1):
                if job.fn_id in idle[i].cached:
                    worker = idle.pop(i)
                    break
            if worker is None:
                worker = idle.pop()
            if not self._dispatch(worker, job):
                idle.append(worker)

    def _dispatch(self, w: _Worker, job: _Job) -> bool:
        fn_id = job.fn_id
        evict: tuple[str, ...] = ()
        if fn_id in w.cached:
            w.cached.move_to_end(fn_id)
            fn_bytes = b""
            self._counts["cache_hits"] += 1
        else:
            fresh = job.fn_bytes or self._fn_bytes.get(fn_id)
            if fresh is None:
                self._finish(job, FunctionNotCached(fn_id))
                return False
            fn_bytes = fresh
            self._counts["cache_misses"] += 1
            self._counts["functions_sent"] += 1
            self._counts["function_bytes_sent"] += len(fn_bytes)
            w.cached[fn_id] = None
            dropped = []
            while len(w.cached) > self.config.max_cached_functions:
                dropped.append(w.cached.popitem(last=False)[0])
            evict = tuple(dropped)
        rlimit_mb = job.memory_mb
        cg = w.cg
        if cg is not None:
            try:
                limit = None
                if job.memory_mb is not None and cg.memory is not None:
                    # The usage rounded up to a MiB: the task may still add at least its
                    # memory_mb, and a worker whose usage moved less than that since its
                    # last task gets the same limit, not written again (WorkerCgroup).
                    limit = ((cg.memory_bytes() + (1 << 20) - 1) >> 20 << 20) + (
                        job.memory_mb << 20)
                    rlimit_mb = None  # the cgroup limits memory, not the address space
                cg.set_limits(limit, job.cpus or 1.0)
                w.oom_kills = cg.oom_kills()
            except OSError:
                self._counts["cgroup_errors"] += 1
                rlimit_mb = job.memory_mb
        env = encoder.encode(Task(fn_id, len(fn_bytes), rlimit_mb, evict))
        w.send([frame_header(env, len(fn_bytes) + len(job.args)), fn_bytes, job.args])
        job.fn_bytes = None
        job.args = b""
        job.worker = w
        w.job = job
        w.state = "busy"
        if job.timeout_s is not None:
            assert self._loop is not None
            job.timer = self._loop.call_later(job.timeout_s, self._on_timeout, job)
        return True

    def _on_timeout(self, job: _Job) -> None:
        if job.worker is not None and not job.future.done():
            self._doom(job.worker, KIND_TIMEOUT, f"task exceeded its timeout of {job.timeout_s}s")

    def _abandon(self, job: _Job, why: str) -> None:
        if job.future.done() and self._jobs.get(job.task_id) is not job:
            return
        if job.worker is None:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self._finish(job, TaskFailed(KIND_CANCELLED, why))
        else:
            self._doom(job.worker, KIND_CANCELLED, why)

    def _finish(self, job: _Job, outcome: Ran | BaseException) -> None:
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if self._jobs.get(job.task_id) is job:
            del self._jobs[job.task_id]
        job.worker = None
        if isinstance(outcome, Ran):
            self._counts["completed"] += 1
            if not job.future.done():
                job.future.set_result(outcome)
            return
        if isinstance(outcome, TaskFailed):
            self._counts[f"failed_{outcome.kind}"] += 1
        else:
            self._counts["failed_other"] += 1
        if not job.future.done():
            job.future.set_exception(outcome)

    # --- worker events ------------------------------------------------------------------

    def _on_message(self, w: _Worker, msg: Ready | Done | Failed | Output,
                    body: bytes) -> None:
        if isinstance(msg, Output):
            job = w.job
            if w.state != "busy" or job is None or msg.stream not in job.live:
                self._violation(w, "output without a task")
                return
            buf = job.live[msg.stream]
            if len(buf) + len(body) > self.config.max_log_bytes:
                self._violation(w, "more output than max_log_bytes")
                return
            buf += body
            return
        if isinstance(msg, Ready):
            if w.state != "starting":
                self._violation(w, "unexpected ready")
                return
            w.state = "idle"
            self._backoff = 0.0
            if not w.ready.done():
                w.ready.set_result(None)
            if not self._closed:
                self._idle.append(w)
                self._pump()
            return
        job = w.job
        if w.state != "busy" or job is None:
            self._violation(w, "reply without a task")
            return
        tail = msg.out_len + msg.err_len + (msg.exc_len if isinstance(msg, Failed) else 0)
        limit = self.config.max_log_bytes + LOG_NOTE_BYTES
        if (min(msg.out_len, msg.err_len) < 0 or max(msg.out_len, msg.err_len) > limit
                or tail > len(body)):
            self._violation(w, "reply lengths out of bounds")
            return
        w.job = None
        w.state = "idle"
        head = len(body) - tail
        out_at = len(body) - msg.out_len - msg.err_len
        stdout = body[out_at:out_at + msg.out_len].decode("utf-8", "replace")
        stderr = body[out_at + msg.out_len:].decode("utf-8", "replace")
        if isinstance(msg, Done):
            self._finish(job, Ran(body[:head], stdout, stderr))
        elif msg.kind == KIND_MISSING:
            w.cached.pop(job.fn_id, None)
            self._finish(job, FunctionNotCached(job.fn_id))
        elif msg.kind in _WORKER_KINDS:
            if msg.kind == KIND_UNPICKLABLE:
                w.cached.pop(job.fn_id, None)  # the worker did not keep it
            text = body[:head].decode("utf-8", "replace")
            self._finish(job, TaskFailed(msg.kind, msg.message, text,
                                         exc=body[head:head + msg.exc_len],
                                         stdout=stdout, stderr=stderr))
        else:
            self._violation(w, f"unknown failure kind {msg.kind!r}")
            return
        self._idle.append(w)
        self._pump()

    def _violation(self, w: _Worker, what: str) -> None:
        self._counts["protocol_errors"] += 1
        self._doom(w, KIND_CRASHED, f"worker pid {w.pid} broke protocol: {what}")

    def _doom(self, w: _Worker, kind: str, message: str) -> None:
        """Take a worker out of service: fail its task with ``kind``, SIGKILL it and start
        a replacement now (its exit is reaped when the kernel reports it)."""
        if w.state in ("doomed", "dead"):
            return
        was = w.state
        w.state = "doomed"
        with contextlib.suppress(ValueError):
            self._idle.remove(w)
        w.kill()
        if w.transport is not None:
            w.transport.abort()
        job, w.job = w.job, None
        if job is not None:
            self._finish(job, TaskFailed(kind, message))
        if not w.ready.done():
            w.ready.set_exception(RuntimeError(f"worker pid {w.pid} died while starting"))
            w.ready.exception()  # retrieved: start() or the replacer reports it
            if was == "starting" and self._running:
                self._backoff = min(
                    max(self._backoff * 2, 0.05), self.config.restart_backoff_max_s
                )
        if self._running:
            self._counts["restarts"] += 1
            self._replace()

    def _on_exit(self, w: _Worker, returncode: int) -> None:
        if w.state not in ("doomed", "dead"):
            cg = w.cg
            if cg is not None and w.job is not None and cg.oom_kills() > w.oom_kills:
                limit = "" if cg.limit_bytes is None else f" of {cg.limit_bytes >> 20} MB"
                self._doom(w, KIND_MEMORY, (
                    f"the task went over its memory limit{limit} (memory_mb="
                    f"{w.job.memory_mb}); the kernel killed worker pid {w.pid}"))
            else:
                self._doom(w, KIND_CRASHED, f"worker pid {w.pid} {_describe_exit(returncode)}")
        w.state = "dead"
        if w.cg is not None:
            self._retire_cgroup(w.cg, 0)
            w.cg = None
        self._workers.discard(w)
        if w.transport is not None:
            w.transport.abort()
        if not w.exited.done():
            w.exited.set_result(returncode)

    def _retire_cgroup(self, cg: WorkerCgroup, tries: int) -> None:
        """Kill what the worker left in its cgroup (a task's children) and remove it; the
        kernel may take a moment, so try again later, a bounded number of times."""
        try:
            cg.kill_all()
            if cg.remove():
                return
        except OSError:
            pass
        if tries >= 50 or self._loop is None or self._loop.is_closed():
            self._counts["cgroup_errors"] += 1
            return
        self._loop.call_later(0.1, self._retire_cgroup, cg, tries + 1)

    def _replace(self) -> None:
        assert self._loop is not None
        t = self._loop.create_task(self._replacement(self._backoff))
        self._replacing.add(t)
        t.add_done_callback(self._replacing.discard)

    async def _replacement(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if not self._running:
            return
        w = await self._spawn()
        try:
            async with asyncio.timeout(self.config.start_timeout_s):
                await w.ready
        except TimeoutError:
            self._doom(w, KIND_CRASHED, "worker did not start in time")
        except RuntimeError:
            pass  # died while starting; _doom already queued the next replacement

    # --- processes ----------------------------------------------------------------------

    async def _spawn(self) -> _Worker:
        loop = self._loop
        assert loop is not None
        cfg = self.config
        iso = cfg.isolation
        argv = [sys.executable, "-c", _BOOT, _PACKAGE_ROOT]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv += [str(theirs.fileno()), str(os.getpid())]
        if iso is not None and iso.user is not None:
            assert iso.work_dir is not None
            argv += [f"{iso.user.uid}:{iso.user.gid}", str(iso.work_dir)]
        cg = None
        if iso is not None and iso.cgroups is not None:
            self._cg_seq += 1
            try:
                cg = iso.cgroups.worker(f"w{self._cg_seq}")
            except OSError:
                self._counts["cgroup_errors"] += 1  # this worker goes without one
        try:
            proc = subprocess.Popen(
                argv,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        except BaseException:
            ours.close()
            if cg is not None:
                cg.remove()
            raise
        finally:
            theirs.close()
        w = _Worker(proc, loop)
        if cg is not None:
            # Before the worker is sent anything: no task code runs outside its cgroup.
            try:
                cg.attach(proc.pid)
                w.cg = cg
            except OSError:
                self._counts["cgroup_errors"] += 1
                with contextlib.suppress(OSError):
                    cg.remove()
        self._workers.add(w)
        self._watch_exit(w)
        max_body = cfg.max_result_bytes + REPLY_SLACK + 2 * cfg.max_log_bytes
        try:
            transport, _ = await loop.create_unix_connection(
                lambda: _WorkerProtocol(self, w, max_body), sock=ours
            )
        except BaseException:
            ours.close()
            self._doom(w, KIND_CRASHED, "could not connect to the worker")
            raise
        w.transport = transport  # (uvloop's is not an asyncio.Transport subclass)
        if w.state in ("doomed", "dead"):  # died before we connected
            w.transport.abort()
        if w.state == "starting":
            init = Init(
                cfg.max_function_bytes,
                cfg.max_arg_bytes,
                cfg.max_result_bytes,
                cfg.max_cached_functions,
                [p for p in sys.path if isinstance(p, str)],
                cfg.max_log_bytes,
            )
            env = encoder.encode(init)
            w.send([frame_header(env, 0)])
        return w

    def _watch_exit(self, w: _Worker) -> None:
        loop = self._loop
        assert loop is not None
        try:
            w.pidfd = os.pidfd_open(w.pid)
        except (AttributeError, OSError):
            w.pidfd = -1
        if w.pidfd >= 0:
            loop.add_reader(w.pidfd, self._on_pidfd, w)
        else:  # no pidfd (not Linux, or an old kernel): a thread per worker waits
            fut = loop.run_in_executor(None, w.proc.wait)
            fut.add_done_callback(lambda f: self._on_exit(w, f.result()))

    def _on_pidfd(self, w: _Worker) -> None:
        rc = w.proc.poll()
        if rc is None:
            return
        assert self._loop is not None
        self._loop.remove_reader(w.pidfd)
        os.close(w.pidfd)
        w.pidfd = -1
        self._on_exit(w, rc)

    def _reap_blocking(self, w: _Worker) -> None:
        w.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(timeout=1.0)
        if w.pidfd >= 0 and self._loop is not None:
            self._loop.remove_reader(w.pidfd)
            os.close(w.pidfd)
            w.pidfd = -1
        self._on_exit(w, w.proc.returncode if w.proc.returncode is not None else -9)


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"
