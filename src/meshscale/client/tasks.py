"""Tasks: run plain Python functions on the mesh and get their results back.

::

    import meshscale

    @meshscale.task(cpus=1)
    def count_words(text: bytes) -> int:
        return len(text.split())

    mesh = meshscale.connect("127.0.0.1:7946")
    ref = mesh.put(b"to be or not to be")
    fut = count_words.submit(ref)          # runs where the object is
    print(fut.result())                    # 6
    futs = mesh.map(count_words, [ref] * 100)
    print(sum(f.result() for f in meshscale.as_completed(futs)))

How a call travels (the node side is ``runtime/compute.py``):

- The function is pickled once per process with cloudpickle, *by value* for code that is
  not an installed package (the nodes cannot import your script or test module), and its
  id is the BLAKE3-256 of those bytes. A submit names the function by id only; the node
  answers ``need function <id>`` the first time, and the bytes go once.
- ``ObjectRef`` arguments are passed by reference: an ``ObjectRef`` given directly as a
  positional or keyword argument is listed as a task input, so the scheduler places the
  task near the object, and the function receives **the object's bytes** in its place
  (fetched by the node that runs it, never through this client). An ``ObjectRef`` nested
  inside another argument (a list, a dict) is passed as the ``ObjectRef`` itself.
- Other arguments are pickled with the call (at most 512 KiB: put larger data with
  ``mesh.put`` and pass the ref). A function or argument that cannot be pickled fails at
  submit with ``TaskSubmitError``; so does a task no node may run (the error names the
  rule: resources, labels, residency, an input's residency, placement mode) and an
  input object no live node holds.
- Results come back pickled: small ones inline, large ones as an object the client
  fetches (and verifies) like ``get``. A function that raised makes ``Future.result()``
  raise ``TaskError`` carrying the remote traceback.
- The submitting node owns the task; the task id is an idempotency key (the first
  result wins, even if a node failure makes the task run twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Generic, ParamSpec, TypeVar

import cloudpickle
import msgspec

from meshscale.client.mesh import (
    READ_AHEAD,
    AsyncMesh,
    Mesh,
    MeshError,
    ObjectRef,
    _LoopThread,
    open_mesh,
)
from meshscale.client.rpc import ClientCredentials, RpcConnection, RpcError
from meshscale.client.services import ServicesMixin
from meshscale.client.shipping import Region, Regions, TaskSubmitError, by_value
from meshscale.client.streams import StreamsMixin
from meshscale.core.api import ErrorCode, Method, Request, ResidencyWire
from meshscale.core.api.tasks import (
    TASK_CANCEL,
    TASK_LIST,
    TASK_SUBMIT,
    TASK_WAIT,
    CancelRequest,
    ListRequest,
    SubmitReply,
    SubmitRequest,
    TaskView,
    TaskWire,
    WaitRequest,
    parse_placement,
)
from meshscale.core.objects import digest_hex
from meshscale.core.tasks import TaskState

__all__ = [
    "AsyncTaskMesh",
    "Future",
    "TaskCancelledError",
    "TaskError",
    "TaskFunction",
    "TaskMesh",
    "TaskSubmitError",
    "as_completed",
    "connect",
    "connect_async",
    "default_mesh",
    "function_id",
    "pickle_function",
    "task",
]

P = ParamSpec("P")
R = TypeVar("R")
Req = TypeVar("Req", bound=Request)
Rep = TypeVar("Rep")

SUBMIT_BATCH: Final = 512
"""Tasks per ``task.submit`` request."""
MAX_ARGS_BYTES: Final = 512 * 1024
WAIT_POLL_S: Final = 10.0
"""Longest single wait the client asks a node for (it clamps to its own bound)."""
WAIT_IDS: Final = 4096
"""Task ids per ``task.wait`` request (the node's bound)."""
TASK_CONNECTIONS: Final = 4
"""Extra connections for task calls, so a long wait never holds up a submit or a get."""
TERMINAL: Final = frozenset({"done", "failed", "cancelled"})


# -- errors -----------------------------------------------------------------------------


class TaskError(MeshError):
    """The task did not produce a value. ``kind`` is ``raised`` (the function raised;
    ``traceback`` is the remote one), ``timeout``, ``memory``, ``worker_crashed``,
    ``unschedulable``, ``input`` (an input object could not be read), ``cancelled``..."""

    def __init__(self, task_id: str, kind: str, message: str, traceback: str = "",
                 node: str = "") -> None:
        text = f"task {task_id} failed ({kind or 'error'}): {message}"
        if node:
            text += f" on {node}"
        if traceback:
            text += "\n\nRemote traceback:\n" + traceback.rstrip()
        super().__init__(text)
        self.task_id = task_id
        self.kind = kind
        self.message = message
        self.traceback = traceback
        self.node = node


class TaskCancelledError(TaskError):
    """The task was cancelled."""


# -- pickling ---------------------------------------------------------------------------


def function_id(pickled: bytes) -> str:
    """Content id of a pickled function, as the nodes compute it (``core.objects.digest_hex``)."""
    return digest_hex(pickled)


def _make_call(fn: Callable[..., Any]) -> Callable[[bytes, list[bytes | str]], Any]:
    """The callable the worker runs: unpickles the call, puts each input object's bytes
    where its ``ObjectRef`` was (an input given as a path, a local copy the node checked
    and linked for the run, is read from that file), calls ``fn``. Nested, so cloudpickle
    ships it by value."""

    def _meshscale_call(payload: bytes, inputs: list[bytes | str]) -> Any:
        import cloudpickle as _cp

        args, kwargs, slots = _cp.loads(payload)
        args = list(args)
        read: dict[int, bytes] = {}
        for where, i in slots:
            value = inputs[i]
            if isinstance(value, str):  # a checked local copy the node linked for this run
                if i not in read:
                    with open(value, "rb") as f:
                        read[i] = f.read()
                value = read[i]
            if isinstance(where, int):
                args[where] = value
            else:
                kwargs[where] = value
        return fn(*args, **kwargs)

    _meshscale_call.__name__ = getattr(fn, "__name__", "task")
    return _meshscale_call


_pickle_lock = threading.Lock()
_pickled: weakref.WeakKeyDictionary[Any, tuple[str, bytes]] = weakref.WeakKeyDictionary()


def pickle_function(fn: Callable[..., Any]) -> tuple[str, bytes]:
    """``(function_id, bytes)`` of the call wrapper around ``fn``, computed once per
    process. Raises ``TaskSubmitError`` naming what could not be pickled."""
    with _pickle_lock:
        hit = _pickled.get(fn)
        if hit is not None:
            return hit
        name = getattr(fn, "__qualname__", None) or repr(fn)
        if not callable(fn):
            raise TaskSubmitError(f"{name} is not callable (a {type(fn).__name__})")
        module_name = getattr(fn, "__module__", None) or "__main__"
        registered = False
        mod = sys.modules.get(module_name)
        if module_name != "__main__" and mod is not None and by_value(module_name):
            with contextlib.suppress(ValueError):
                cloudpickle.register_pickle_by_value(mod)
                registered = True
        try:
            data: bytes = cloudpickle.dumps(_make_call(fn), protocol=5)
        except Exception as e:
            raise TaskSubmitError(
                f"cannot pickle function {name}: {type(e).__name__}: {e}") from None
        finally:
            if registered:
                with contextlib.suppress(ValueError):
                    cloudpickle.unregister_pickle_by_value(mod)
        out = (function_id(data), data)
        with contextlib.suppress(TypeError):  # not weak-referenceable: not cached
            _pickled[fn] = out
        return out


def _pickle_call(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[bytes, list[str]]:
    """The pickled ``(args, kwargs, slots)`` with top-level ObjectRefs taken out, and
    the input object ids (``slots`` maps each position/keyword to an input index)."""
    inputs: list[str] = []
    index: dict[str, int] = {}
    slots: list[tuple[int | str, int]] = []

    def take(ref: ObjectRef) -> int:
        if ref.id not in index:
            index[ref.id] = len(inputs)
            inputs.append(ref.id)
        return index[ref.id]

    plain_args: list[Any] = []
    for i, a in enumerate(args):
        if isinstance(a, ObjectRef):
            slots.append((i, take(a)))
            plain_args.append(None)
        else:
            plain_args.append(a)
    plain_kwargs: dict[str, Any] = {}
    for k, v in kwargs.items():
        if isinstance(v, ObjectRef):
            slots.append((k, take(v)))
            plain_kwargs[k] = None
        else:
            plain_kwargs[k] = v
    try:
        data: bytes = cloudpickle.dumps((tuple(plain_args), plain_kwargs, slots), protocol=5)
    except Exception as e:
        raise TaskSubmitError(f"cannot pickle arguments: {type(e).__name__}: {e}") from None
    if len(data) > MAX_ARGS_BYTES:
        raise TaskSubmitError(
            f"arguments of {len(data)} bytes exceed {MAX_ARGS_BYTES} bytes; put large data "
            "with mesh.put() and pass the ObjectRef")
    return data, inputs


# -- task options -----------------------------------------------------------------------


class TaskFunction(Generic[P, R]):
    """A function made into a task by ``@meshscale.task``. Calling it runs it here;
    ``.submit(...)`` runs it on the mesh (the last ``meshscale.connect()``)."""

    def __init__(self, fn: Callable[P, R], *, cpus: float = 1, memory_mb: int | None = None,
                 gpus: int = 0, labels: dict[str, str] | None = None,
                 residency: Sequence[str] | None = None, retries: int = 3,
                 timeout_s: float | None = None, placement: Any = None) -> None:
        if not callable(fn):
            raise TypeError(f"@task needs a function, not {type(fn).__name__}")
        if not cpus > 0:
            raise ValueError(f"cpus must be > 0, not {cpus!r}")
        if memory_mb is not None and memory_mb < 1:
            raise ValueError(f"memory_mb must be >= 1 or None, not {memory_mb!r}")
        if gpus < 0 or retries < 0:
            raise ValueError("gpus and retries must be >= 0")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, not {timeout_s!r}")
        if isinstance(residency, str):
            raise ValueError(f"residency is a list of regions: write residency=[{residency!r}]")
        self.fn = fn
        self.cpus = float(cpus)
        self.memory_mb = memory_mb
        self.gpus = gpus
        self.labels = {str(k): str(v) for k, v in (labels or {}).items()}
        self.residency = None if residency is None else list(residency)
        self.retries = retries
        self.timeout_s = timeout_s
        self.placement = _placement_wire(placement)
        self._placement = parse_placement(self.placement)
        self._residency = None if self.residency is None else ResidencyWire(self.residency)
        self.__name__ = getattr(fn, "__name__", "task")
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def options(self, **overrides: Any) -> TaskFunction[P, R]:
        """A copy with some options changed (``cpus``, ``residency``, ...)."""
        opts: dict[str, Any] = {
            "cpus": self.cpus, "memory_mb": self.memory_mb, "gpus": self.gpus,
            "labels": self.labels, "residency": self.residency, "retries": self.retries,
            "timeout_s": self.timeout_s, "placement": self.placement,
        }
        unknown = set(overrides) - set(opts)
        if unknown:
            raise TypeError(f"unknown task options: {', '.join(sorted(unknown))}")
        opts.update(overrides)
        return TaskFunction(self.fn, **opts)

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Future:
        """Run on the default mesh (the last ``meshscale.connect()``)."""
        return default_mesh().submit(self, *args, **kwargs)

    def _wire(self, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, bytes, TaskWire]:
        fn_id, fn_bytes = pickle_function(self.fn)
        payload, inputs = _pickle_call(args, kwargs)
        return fn_id, fn_bytes, TaskWire(
            task_id=uuid.uuid4().hex, fn_id=fn_id, args=payload, inputs=inputs,
            cpus=self.cpus, memory_mb=self.memory_mb or 0, gpus=self.gpus,
            labels=self.labels, residency=self._residency, retries=self.retries,
            timeout_s=self.timeout_s, placement=self._placement)

    def __repr__(self) -> str:
        return f"<task {self.__name__} cpus={self.cpus:g}>"


def _placement_wire(placement: Any) -> Any:
    """A task's placement in wire form: None (data), ``Region(name)``, ``Regions([...])``
    or a ``{"mode": ...}`` dict. Anything else is refused here, never sent to be read as
    something else."""
    if placement is None or placement == "data":
        return None
    if isinstance(placement, Region):
        return {"mode": "central", "region": placement.name}
    if isinstance(placement, Regions):
        return {"mode": "regions", "regions": list(placement.names)}
    if isinstance(placement, dict) and placement.get("mode") in (
            "data", "central", "regions", "near-source"):
        return dict(placement)
    raise ValueError(f"placement must be None/'data', meshscale.Region(name), "
                     f"meshscale.Regions([...]) or a {{'mode': ...}} dict, not {placement!r:.80}")


def task(
    fn: Callable[P, R] | None = None, *, cpus: float = 1, memory_mb: int | None = None,
    gpus: int = 0, labels: dict[str, str] | None = None,
    residency: Sequence[str] | None = None, retries: int = 3,
    timeout_s: float | None = None, placement: Any = None,
) -> Any:
    """Make ``fn`` a task: ``@task`` or ``@task(cpus=2, residency=["eu-west"])``.

    ``placement``: ``None``/``"data"`` (run where the input objects are),
    ``meshscale.Region(R)`` (in region R), ``meshscale.Regions([...])`` (in one of them),
    or the wire form ``{"mode": "central", "region": R}`` / ``{"mode": "regions", ...}``.
    ``retries``: re-runs after a worker crash or a lost result (node loss is retried by
    the scheduler). ``timeout_s``: the worker is killed after this long."""
    def wrap(f: Callable[P, R]) -> TaskFunction[P, R]:
        return TaskFunction(f, cpus=cpus, memory_mb=memory_mb, gpus=gpus, labels=labels,
                            residency=residency, retries=retries, timeout_s=timeout_s,
                            placement=placement)

    return wrap if fn is None else wrap(fn)


def _as_task(f: Any) -> TaskFunction[Any, Any]:
    if isinstance(f, TaskFunction):
        return f
    if callable(f):
        return TaskFunction(f)
    raise TypeError(f"submit needs a function or a @task, not {type(f).__name__}")


# -- futures ----------------------------------------------------------------------------


class Future:
    """The eventual result of one task. ``result()``, ``done()`` and ``cancel()`` block
    (from a ``TaskMesh``); on an ``AsyncTaskMesh`` await ``result_async()`` or the future."""

    def __init__(self, mesh: AsyncTaskMesh, task_id: str, name: str,
                 runner: _LoopThread | None) -> None:
        self.task_id = task_id
        self.name = name
        self._mesh = mesh
        self._runner = runner
        self._outcome: TaskView | None = None
        self._value: Any = None
        self._loaded = False

    @property
    def node(self) -> str | None:
        """The node that ran it, once known."""
        return None if self._outcome is None else self._outcome.node or None

    def _run(self, coro: Any) -> Any:
        if self._runner is None:
            coro.close()
            raise RuntimeError("this future belongs to an AsyncTaskMesh: await it instead")
        return self._runner.run(coro)

    def done(self) -> bool:
        if self._outcome is None:
            self._run(self._mesh._poll([self], 0.0))
        return self._outcome is not None

    def result(self, timeout: float | None = None) -> Any:
        """The task's return value; raises ``TaskError`` if it failed (with the remote
        traceback when it raised) and ``TimeoutError`` after ``timeout`` seconds."""
        return self._run(self.result_async(timeout))

    def cancel(self) -> bool:
        """Cancel if not finished (a running task's worker is killed)."""
        return bool(self._run(self.cancel_async()))

    async def cancel_async(self) -> bool:
        if self._outcome is not None:
            return False
        reply = await self._mesh._trequest(TASK_CANCEL, CancelRequest(task_id=self.task_id))
        if reply.cancelled:
            self._outcome = TaskView(task_id=self.task_id, state=TaskState.CANCELLED,
                                     error="cancelled", kind="cancelled")
            return True
        return False

    async def result_async(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._outcome is None:
            left = WAIT_POLL_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"task {self.task_id} not finished after {timeout}s")
            await self._mesh._poll([self], min(left, WAIT_POLL_S))
        return await self._load()

    def __await__(self) -> Any:
        return self.result_async().__await__()

    async def _load(self) -> Any:
        if self._loaded:
            return self._value
        o = self._outcome
        assert o is not None
        state = o.state
        if state != TaskState.DONE:
            cls = TaskCancelledError if state == TaskState.CANCELLED else TaskError
            raise cls(self.task_id, o.kind, o.error, o.traceback, o.node)
        data = o.value
        ref = o.ref
        if data is None and ref is not None:
            data = await self._mesh.get(ObjectRef(ref.id, ref.size))
        if not isinstance(data, bytes):
            raise MeshError(f"task {self.task_id}: the node returned no value")
        try:
            self._value = cloudpickle.loads(data)
        except Exception as e:
            raise TaskError(self.task_id, "unpicklable",
                            f"cannot unpickle the result here: {type(e).__name__}: {e}") from None
        self._loaded = True
        return self._value

    def __repr__(self) -> str:
        state = "pending" if self._outcome is None else self._outcome.state
        return f"<Future {self.name} {self.task_id} {state}>"


# -- meshes with tasks ------------------------------------------------------------------


class AsyncTaskMesh(AsyncMesh):
    """``AsyncMesh`` plus tasks: ``submit``, ``map``, ``wait``, ``as_completed``."""

    def __init__(self, address: str, creds: ClientCredentials, timeout: float,
                 read_ahead: int = READ_AHEAD) -> None:
        super().__init__(address, creds, timeout, read_ahead)
        self._creds = creds
        self._idle_conns: list[RpcConnection] = []
        self._conn_sem = asyncio.Semaphore(TASK_CONNECTIONS)
        self._fns_sent: set[str] = set()
        self.runner: _LoopThread | None = None

    async def _trequest(self, method: Method[Req, Rep], req: Req) -> Rep:
        """A typed task call on one of the extra connections; ``MeshError`` if it fails."""
        async with self._conn_sem:
            conn = (self._idle_conns.pop() if self._idle_conns
                    else RpcConnection(self.address, self._creds, timeout=self.timeout))
            ok = False
            try:
                result = await conn.request(method, req)
                ok = True
            except RpcError as e:
                ok = conn.is_open
                raise MeshError(str(e), getattr(e, "code", "")) from None
            finally:
                if ok:
                    self._idle_conns.append(conn)
                else:
                    await conn.close()
        return result

    async def submit(self, f: Any, *args: Any, **kwargs: Any) -> Future:
        """Run ``f(*args, **kwargs)`` on the mesh; returns its ``Future``."""
        return (await self.submit_many(f, [(args, kwargs)]))[0]

    async def map(self, f: Any, iterable: Iterable[Any],
                  progress: bool | Callable[[int, int], None] = False) -> list[Future]:
        """One task per item (``f(item)``), submitted in batches; returns the futures in
        order. ``progress``: True prints a line to stderr, or ``progress(done, total)``."""
        return await self.submit_many(f, [((x,), {}) for x in iterable], progress=progress)

    async def submit_many(
        self, f: Any, calls: Sequence[tuple[Sequence[Any], dict[str, Any]]],
        progress: bool | Callable[[int, int], None] = False,
    ) -> list[Future]:
        tf = _as_task(f)
        wires: list[TaskWire] = []
        fn_bytes = b""
        for a, kw in calls:
            _, fn_bytes, wire = tf._wire(a, kw)
            wires.append(wire)
        report: Callable[[int, int], None] | None
        if progress is True:
            def report(done: int, total: int) -> None:
                sys.stderr.write(f"\rsubmitted {done}/{total} {tf.__name__}")
                if done == total:
                    sys.stderr.write("\n")
                sys.stderr.flush()
        else:
            report = progress or None
        # One id prefix per submit request (``<prefix>.<n>``): the node keeps the
        # records of a request as one KV value.
        batches = [wires[i:i + SUBMIT_BATCH] for i in range(0, len(wires), SUBMIT_BATCH)]
        for batch in batches:
            if len(batch) > 1:
                prefix = uuid.uuid4().hex
                for n, w in enumerate(batch):
                    w.task_id = f"{prefix}.{n}"
        futures = [Future(self, w.task_id, tf.__name__, self.runner) for w in wires]
        by_id = {f.task_id: f for f in futures}
        submitted = 0

        async def send(batch: list[TaskWire]) -> None:
            nonlocal submitted
            reply = await self._submit_batch(batch, fn_bytes)
            for r in reply.results:
                fut = by_id.get(r.task_id)
                if fut is not None and fut._outcome is None and r.state in TERMINAL:
                    fut._outcome = r
            submitted += len(batch)
            if report is not None:
                report(submitted, len(wires))

        # The first request alone (it may have to carry the function), the rest
        # concurrently on the task connections; an error stops the rest from starting.
        if batches:
            await send(batches[0])
        rest = batches[1:]
        failed: list[BaseException] = []

        async def lane() -> None:
            while rest and not failed:
                try:
                    await send(rest.pop(0))
                except BaseException as e:
                    failed.append(e)
                    raise

        if rest:
            results = await asyncio.gather(*(lane() for _ in range(min(len(rest),
                                                                          TASK_CONNECTIONS))),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return futures

    async def _submit_batch(self, batch: list[TaskWire], fn_bytes: bytes) -> SubmitReply:
        fn_id = batch[0].fn_id
        if fn_id in self._fns_sent:
            for w in batch:
                w.fn = None
        for attempt in range(2):
            try:
                reply = await self._trequest(TASK_SUBMIT, SubmitRequest(tasks=batch))
                self._fns_sent.add(fn_id)
                return reply
            except MeshError as e:
                msg = str(e)
                if e.code == ErrorCode.NEED_FUNCTION and attempt == 0:
                    batch[0].fn = fn_bytes  # the node asked: send the bytes once
                    continue
                detail = msg.removeprefix(f"{self.address}: ")
                raise TaskSubmitError(f"submit refused: {detail}") from None
        raise AssertionError("unreachable")

    async def _poll(self, futures: Sequence[Future], timeout: float, *,
                    every: bool = False) -> None:
        """Ask the node for the outcomes of those futures not yet resolved; waits up to
        ``timeout`` for at least one (``every``: for all of those asked about, so a
        large ``wait`` costs a few calls, not one per completion)."""
        pending = [f for f in futures if f._outcome is None]
        if not pending:
            return
        by_id = {f.task_id: f for f in pending[:WAIT_IDS]}
        ids = list(by_id)
        reply = await self._trequest(TASK_WAIT, WaitRequest(
            task_ids=ids, timeout_s=max(0.0, timeout), min_done=len(ids) if every else 1))
        for r in reply.results:
            fut = by_id.get(r.task_id)
            if fut is not None and r.state in TERMINAL:
                fut._outcome = r
        for tid in reply.unknown:
            fut = by_id.get(tid)
            if fut is not None:
                fut._outcome = TaskView(task_id=tid, state=TaskState.FAILED, kind="unknown",
                                        error="no node knows this task (its record was lost)")

    async def wait(self, futures: Iterable[Future], timeout: float | None = None
                   ) -> tuple[list[Future], list[Future]]:
        """(done, not_done) once all are done or ``timeout`` passed."""
        futs = list(futures)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pending = [f for f in futs if f._outcome is None]
            left = WAIT_POLL_S if deadline is None else deadline - time.monotonic()
            if not pending or left <= 0:
                return [f for f in futs if f._outcome is not None], pending
            await self._poll(pending, min(left, WAIT_POLL_S), every=True)

    async def as_completed(self, futures: Iterable[Future], timeout: float | None = None
                           ) -> AsyncIterator[Future]:
        futs = list(futures)
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: set[int] = set()
        while True:
            for f in futs:
                if f._outcome is not None and id(f) not in seen:
                    seen.add(id(f))
                    yield f
            pending = [f for f in futs if f._outcome is None]
            if not pending:
                return
            left = WAIT_POLL_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(pending)} tasks not finished after {timeout}s")
            await self._poll(pending, min(left, WAIT_POLL_S))

    def future(self, task_id: str, name: str = "task") -> Future:
        """A future for a task submitted earlier, perhaps through another node (say, one
        that died: this node then takes the task over from its record in the KV)."""
        return Future(self, task_id, name, self.runner)

    async def tasks(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The node's task records, newest first (state, node, placement reason)."""
        rows = await self._request(TASK_LIST, ListRequest(limit=limit))
        return [msgspec.to_builtins(r) for r in rows]

    async def close(self) -> None:
        for conn in self._idle_conns:
            with contextlib.suppress(Exception):
                await conn.close()
        self._idle_conns.clear()
        await super().close()


class TaskMesh(ServicesMixin, StreamsMixin, Mesh):
    """``Mesh`` plus tasks (blocking): ``submit``, ``map``, ``wait``, ``tasks``; and
    streams: ``stream``, ``operator``, ``subscribe`` (``client/streams.py``); and
    services: ``deploy``, ``service``, ``services`` (``client/services.py``)."""

    _inner: AsyncTaskMesh

    def __init__(self, runner: _LoopThread, inner: AsyncTaskMesh) -> None:
        super().__init__(runner, inner)
        inner.runner = runner

    def submit(self, f: Any, *args: Any, **kwargs: Any) -> Future:
        """Run ``f(*args, **kwargs)`` on the mesh (``f``: a function or a ``@task``)."""
        return self._run(self._inner.submit(f, *args, **kwargs))

    def map(self, f: Any, iterable: Iterable[Any],
            progress: bool | Callable[[int, int], None] = False) -> list[Future]:
        """One task per item, submitted in batches; the futures in order."""
        items = list(iterable)
        return self._run(self._inner.map(f, items, progress=progress))

    def wait(self, futures: Iterable[Future], timeout: float | None = None
             ) -> tuple[list[Future], list[Future]]:
        """(done, not_done) once all are done or ``timeout`` passed."""
        return self._run(self._inner.wait(list(futures), timeout))

    def tasks(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The node's task records, newest first (state, node, placement reason)."""
        return self._run(self._inner.tasks(limit))

    def future(self, task_id: str, name: str = "task") -> Future:
        """A future for a task submitted earlier, perhaps through another node."""
        return self._inner.future(task_id, name)


def as_completed(futures: Iterable[Future], timeout: float | None = None) -> Iterator[Future]:
    """Yield futures (of blocking meshes) as their tasks finish, in completion order."""
    futs = list(futures)
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: set[int] = set()
    while True:
        for f in futs:
            if f._outcome is not None and id(f) not in seen:
                seen.add(id(f))
                yield f
        pending = [f for f in futs if f._outcome is None]
        if not pending:
            return
        left = WAIT_POLL_S if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(pending)} tasks not finished after {timeout}s")
        groups: dict[int, list[Future]] = {}
        for f in pending:
            groups.setdefault(id(f._mesh), []).append(f)
        for group in groups.values():
            group[0]._run(group[0]._mesh._poll(group, min(left, WAIT_POLL_S) if len(groups) == 1
                                               else 0.05))


# -- connecting -------------------------------------------------------------------------

_default_lock = threading.Lock()
_default: TaskMesh | None = None


def default_mesh() -> TaskMesh:
    """The mesh of the last ``meshscale.connect()`` still open."""
    with _default_lock:
        mesh = _default
    if mesh is None or mesh._closed:
        raise MeshError("no mesh to submit to: call meshscale.connect(address) first "
                        "(or use mesh.submit(f, ...))")
    return mesh


async def connect_async(
    address: str,
    *,
    bundle: str | Path | None = None,
    token: str | None = None,
    timeout: float = 30.0,
    read_ahead: int = READ_AHEAD,
) -> AsyncTaskMesh:
    """Like ``client.mesh.connect_async``, with tasks."""
    return await open_mesh(AsyncTaskMesh, address, bundle=bundle, token=token,
                           timeout=timeout, read_ahead=read_ahead)


def connect(
    address: str,
    *,
    bundle: str | Path | None = None,
    token: str | None = None,
    timeout: float = 30.0,
    read_ahead: int = READ_AHEAD,
) -> TaskMesh:
    """Connect to the mesh through the node at ``address`` (blocking API, with tasks);
    it becomes the default mesh of ``@task(...).submit``. ``token`` and ``read_ahead``:
    see ``client.mesh.connect_async``. Raises ``ConnectError``."""
    global _default
    runner = _LoopThread()
    try:
        inner = runner.run(connect_async(address, bundle=bundle, token=token, timeout=timeout,
                                         read_ahead=read_ahead))
    except BaseException:
        runner.stop()
        raise
    mesh = TaskMesh(runner, inner)
    with _default_lock:
        _default = mesh
    return mesh

