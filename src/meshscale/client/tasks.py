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
    total = mesh.submit(sum, futs)         # futures as arguments: resolved by the node
    print(meshscale.gather([total])[0])    # 600

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
- A ``Future`` is an argument like any other, at any depth (a list of them, a dict):
  it pickles to a reference to its task (``TaskWire.after``), the owner node waits for
  the upstream tasks before it schedules this one, a result stored as an object steers
  placement as an input object does, and the function gets the values. An upstream task
  that failed fails this one (kind ``upstream``, naming it, with its exception).
- Results come back pickled: small ones inline, large ones as an object the client
  fetches (and verifies) like ``get``. A function that raised makes ``Future.result()``
  raise its own exception, re-made here as an instance of a subclass of its type and of
  ``TaskError`` (``task_id``, ``node``, the remote ``traceback``), or ``TaskError`` when
  its type cannot be unpickled here. Code is pickled with its file names, so remote
  tracebacks name the user's files and lines.
- What a task prints is kept with its record, bounded by the worker node
  (``Future.logs()``, ``meshscale logs TASK_ID``).
- The submitting node owns the task; the task id is an idempotency key (the first
  result wins, even if a node failure makes the task run twice).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import linecache
import re
import sys
import threading
import time
import traceback
import types
import uuid
import weakref
from collections import ChainMap, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION
from pathlib import Path
from typing import Any, Final, Generic, ParamSpec, TypeVar

import cloudpickle
import msgspec

import meshscale.client.codepack as codepack
from meshscale.client.mesh import (
    READ_AHEAD,
    AsyncMesh,
    Mesh,
    MeshError,
    ObjectRef,
    _blocking_iter,
    _LoopThread,
    open_mesh,
)
from meshscale.client.rpc import ClientCredentials, RpcConnection, RpcError
from meshscale.client.services import ServicesMixin
from meshscale.client.shipping import (
    Region,
    Regions,
    TaskSubmitError,
    by_value,
    modules_to_ship,
)
from meshscale.client.streams import StreamsMixin
from meshscale.core.api import ErrorCode, Method, Request, ResidencyWire
from meshscale.core.api.tasks import (
    MAX_FUNCTION_NAME,
    MAX_UPSTREAM,
    TASK_CANCEL,
    TASK_LIST,
    TASK_LOGS,
    TASK_RESULT,
    TASK_SUBMIT,
    TASK_WAIT,
    CancelRequest,
    DetailRef,
    ListRequest,
    LogsRequest,
    ResultRequest,
    SubmitReply,
    SubmitRequest,
    TaskView,
    TaskWire,
    WaitRequest,
    parse_placement,
)
from meshscale.core.backoff import Backoff
from meshscale.core.objects import digest_hex
from meshscale.core.tasks import TaskDetail, TaskState, decode_detail

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
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
    "gather",
    "pickle_function",
    "task",
    "wait",
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
        self.detail_ref: DetailRef | None = None
        """A classed task: its message, traceback and output are not here but kept as
        this object of its class (``Future.detail()`` reads it, from within the
        class's regions)."""


class TaskCancelledError(TaskError, concurrent.futures.CancelledError):
    """The task was cancelled."""


_remote_types: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()
_remote_types_lock = threading.Lock()


def _remote_str(self: TaskError) -> str:
    original = getattr(self, "remote_exception", None)
    base = self.message if original is None else f"{type(original).__name__}: {original}"
    if self.kind == "upstream":
        base = self.message  # names the upstream task that raised it
    where = f"task {self.task_id}" + (f" on {self.node}" if self.node else "")
    text = f"{base} ({where})"
    if self.traceback:
        text += "\n\nRemote traceback:\n" + self.traceback.rstrip()
    return text


def _remote_reduce(self: BaseException) -> Any:
    # The made-up class exists only here: pickle as the task's own exception.
    original = getattr(self, "remote_exception", None)
    if original is None:  # pragma: no cover - always set by _remote_exception
        return (TaskError, ("?", "raised", str(self)))
    return original.__reduce_ex__(5)


def _remote_type(cls: type[BaseException]) -> type | None:
    """A subclass of both ``cls`` and ``TaskError`` (one per ``cls``), or None when Python
    cannot make one (an exception type with a C layout that excludes it)."""
    with _remote_types_lock:
        sub = _remote_types.get(cls)
        if sub is not None:
            return sub
        try:
            sub = type(cls.__name__, (cls, TaskError), {
                "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                "__str__": _remote_str, "__reduce__": _remote_reduce,
                "__init__": lambda self, *a, **k: None,
            })
        except TypeError:
            return None
        _remote_types[cls] = sub
        return sub


def _remote_exception(o: TaskView) -> TaskError | None:
    """The task's own exception, re-made as an instance of a subclass of its type and of
    ``TaskError`` (so ``except ValueError`` and ``except TaskError`` both catch it), with
    the remote traceback, node and task id; None when its type cannot be unpickled here
    or is not an ``Exception`` (a remote ``SystemExit`` must not end this program)."""
    if o.exc is None:
        return None
    try:
        original = cloudpickle.loads(o.exc)
    except Exception:
        return None
    if not isinstance(original, Exception):
        return None
    sub = _remote_type(type(original))
    if sub is None:
        return None
    try:
        err: Any = type(original).__new__(sub, *original.args)
        err.args = original.args
        err.__dict__.update(getattr(original, "__dict__", {}))
    except Exception:
        return None
    err.task_id, err.kind, err.node = o.task_id, o.kind, o.node
    err.message = o.error
    err.traceback = o.traceback
    err.remote_exception = original
    return err  # type: ignore[no-any-return]


_FRAME_LINE = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in ')


def _with_source(tb: str) -> str:
    """A remote traceback with the source lines the node could not show (its copy of the
    user's file missing or unreadable there) filled in from this machine's copy: the
    function was pickled from it."""
    lines = tb.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        m = _FRAME_LINE.match(line)
        if m is None or (i + 1 < len(lines) and lines[i + 1].startswith("    ")):
            continue
        source = linecache.getline(m["file"], int(m["line"])).strip()
        if source:
            out.append("    " + source)
    return "\n".join(out) + ("\n" if tb.endswith("\n") else "")


def _error_of(o: TaskView) -> TaskError:
    """What ``Future.result()`` raises for an outcome other than done."""
    if o.traceback:
        o = msgspec.structs.replace(o, traceback=_with_source(o.traceback))
    if o.state == TaskState.CANCELLED:
        err: TaskError = TaskCancelledError(o.task_id, o.kind, o.error, o.traceback, o.node)
    else:
        err = _remote_exception(o) or TaskError(o.task_id, o.kind, o.error, o.traceback,
                                                o.node)
    err.detail_ref = o.detail_ref
    return err


# -- pickling ---------------------------------------------------------------------------


def function_id(pickled: bytes) -> str:
    """Content id of a pickled function, as the nodes compute it (``core.objects.digest_hex``)."""
    return digest_hex(pickled)


def _make_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The callable the worker runs: unpickles the call, puts each input object's bytes
    where its ``ObjectRef`` was (an input given as a path, a local copy the node checked
    and linked for the run, is read from that file) and each upstream task's value where
    its ``Future`` was (``upstream``, in ``TaskWire.after`` order: the pickled value, or
    the path of its object's local copy), calls ``fn``. Nested, so cloudpickle ships it
    by value."""

    def _meshscale_call(payload: bytes, inputs: list[bytes | str],
                        upstream: list[bytes | str] | None = None) -> Any:
        import io as _io
        import pickle as _pickle

        import cloudpickle as _cp

        def _bytes_of(value: bytes | str) -> bytes:
            if isinstance(value, str):  # a checked local copy the node linked for this run
                with open(value, "rb") as f:
                    return f.read()
            return value

        values: dict[int, Any] = {}

        def _reference(pid: Any) -> Any:
            if (not isinstance(pid, tuple) or len(pid) != 2 or pid[0] != _FUTURE_TAG
                    or upstream is None or not 0 <= pid[1] < len(upstream)):
                raise _pickle.UnpicklingError(f"unknown reference {pid!r:.80}")
            i = pid[1]
            if i not in values:
                values[i] = _cp.loads(_bytes_of(upstream[i]))
            return values[i]

        _ = _cp  # the call was pickled with cloudpickle (plain pickle reads it)
        # The hook set on the instance: a subclass made per call cost more than the
        # rest of a no-op's run in the worker (~100 us to create a class).
        unpickler = _pickle.Unpickler(_io.BytesIO(payload))
        unpickler.persistent_load = _reference  # type: ignore[method-assign]
        args, kwargs, slots = unpickler.load()
        args = list(args)
        read: dict[int, bytes] = {}
        for where, i in slots:
            value = inputs[i]
            if isinstance(value, str):
                if i not in read:
                    read[i] = _bytes_of(value)
                value = read[i]
            if isinstance(where, int):
                args[where] = value
            else:
                kwargs[where] = value
        return fn(*args, **kwargs)

    _meshscale_call.__name__ = getattr(fn, "__name__", "task")
    return _meshscale_call


def _code_keeping_filename(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, with its file name kept (cloudpickle
    writes ``<dynamic-code>``, so remote tracebacks would not say where the user's code
    is): tracebacks on the node name the user's file and line, and show the line where
    that file is readable there."""
    reduced = _cloudpickle_code_reduce(code)
    ctor, args = reduced[0], list(reduced[1])
    for i, a in enumerate(args):
        if a == "<dynamic-code>":
            args[i] = code.co_filename
            break
    return (ctor, tuple(args))


_cloudpickle_code_reduce: Callable[[types.CodeType], Any] = \
    cloudpickle.Pickler.dispatch_table[types.CodeType]


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, keeping code objects' file names (``_code_keeping_filename``)."""

    # Read by the C pickler when an instance is made: a class attribute.
    dispatch_table = ChainMap({types.CodeType: _code_keeping_filename},
                              cloudpickle.Pickler.dispatch_table)

    def __init__(self, file: Any) -> None:
        super().__init__(file, protocol=5)


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf).dump(obj)
    return buf.getvalue()


_FUTURE_TAG: Final = "meshscale.future"
"""A ``Future`` among a task's arguments pickles to ``(_FUTURE_TAG, i)``, a reference to
the i-th upstream task of ``TaskWire.after``."""


class _CallPickler(_Pickler):
    """Pickles a call's arguments, every ``Future`` among them (however nested) as a
    reference to its task: the node resolves it to the task's value."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.after: list[str] = []
        self._index: dict[str, int] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Future):
            i = self._index.get(obj.task_id)
            if i is None:
                i = self._index[obj.task_id] = len(self.after)
                self.after.append(obj.task_id)
            return (_FUTURE_TAG, i)
        return None


_pickle_lock = threading.Lock()
_pickled: weakref.WeakKeyDictionary[Any, dict[str, tuple[str, bytes]]] = \
    weakref.WeakKeyDictionary()


def pickle_function(fn: Callable[..., Any],
                    code: tuple[str, bytes] | None = None) -> tuple[str, bytes]:
    """``(function_id, bytes)`` of the call wrapper around ``fn`` (with the connection's
    code archive ``code``, if any), computed once per process and archive. Raises
    ``TaskSubmitError`` naming what could not be pickled."""
    key = "" if code is None else code[0]
    with _pickle_lock:
        hit = _pickled.get(fn, {}).get(key)
        if hit is not None:
            return hit
        name = getattr(fn, "__qualname__", None) or repr(fn)
        if not callable(fn):
            raise TaskSubmitError(f"{name} is not callable (a {type(fn).__name__})")
        module_name = getattr(fn, "__module__", None) or "__main__"
        shipped = modules_to_ship(fn)
        registered = False
        mod = sys.modules.get(module_name)
        if module_name != "__main__" and mod is not None and by_value(module_name):
            with contextlib.suppress(ValueError):
                cloudpickle.register_pickle_by_value(mod)
                registered = True
        lazy = bool(shipped) or code is not None
        if lazy:  # the loader travels by value: workers import no client
            cloudpickle.register_pickle_by_value(codepack)
        try:
            call = _make_call(fn)
            data = _dumps(codepack.shipped_call(_dumps(call), shipped, code) if lazy else call)
        except Exception as e:
            raise TaskSubmitError(
                f"cannot pickle function {name}: {type(e).__name__}: {e}") from None
        finally:
            if registered:
                with contextlib.suppress(ValueError):
                    cloudpickle.unregister_pickle_by_value(mod)
            if lazy:
                with contextlib.suppress(ValueError):
                    cloudpickle.unregister_pickle_by_value(codepack)
        out = (function_id(data), data)
        with contextlib.suppress(TypeError):  # not weak-referenceable: not cached
            _pickled.setdefault(fn, {})[key] = out
        return out


def _pickle_call(args: Sequence[Any], kwargs: dict[str, Any]
                 ) -> tuple[bytes, list[str], list[str]]:
    """The pickled ``(args, kwargs, slots)`` with top-level ObjectRefs taken out, the
    input object ids (``slots`` maps each position/keyword to an input index) and the
    upstream task ids (the futures among the arguments, at any depth)."""
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
    buf = io.BytesIO()
    pickler = _CallPickler(buf)
    try:
        pickler.dump((tuple(plain_args), plain_kwargs, slots))
    except Exception as e:
        raise TaskSubmitError(f"cannot pickle arguments: {type(e).__name__}: {e}") from None
    data = buf.getvalue()
    if len(data) > MAX_ARGS_BYTES:
        raise TaskSubmitError(
            f"arguments of {len(data)} bytes exceed {MAX_ARGS_BYTES} bytes; put large data "
            "with mesh.put() and pass the ObjectRef")
    if len(pickler.after) > MAX_UPSTREAM:
        raise TaskSubmitError(f"{len(pickler.after)} futures among the arguments "
                              f"(max {MAX_UPSTREAM})")
    return data, inputs, pickler.after


# -- task options -----------------------------------------------------------------------


class TaskFunction(Generic[P, R]):
    """A function made into a task by ``@meshscale.task``. Calling it runs it here;
    ``.submit(...)`` runs it on the mesh (the last ``meshscale.connect()``)."""

    def __init__(self, fn: Callable[P, R], *, cpus: float = 1, memory_mb: int | None = None,
                 gpus: int = 0, labels: dict[str, str] | None = None,
                 residency: Sequence[str] | None = None, retries: int = 3,
                 timeout_s: float | None = None, placement: Any = None,
                 data_class: str | None = None) -> None:
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
        if data_class is not None and (not isinstance(data_class, str) or not data_class):
            raise ValueError(f"data_class must be a non-empty string or None, not {data_class!r}")
        self.fn = fn
        self.data_class = data_class
        self.cpus = float(cpus)
        self.memory_mb = memory_mb
        self.gpus = gpus
        self.labels = {str(k): str(v) for k, v in (labels or {}).items()}
        self.residency = None if residency is None else list(residency)
        self.retries = retries
        self.timeout_s = timeout_s
        self.placement = _placement_wire(placement)
        self._placement = parse_placement(self.placement)
        self._residency = None if self.residency is None and data_class is None \
            else ResidencyWire(self.residency, data_class)
        self.__name__ = getattr(fn, "__name__", "task")
        self._name = str(getattr(fn, "__qualname__", None) or self.__name__)[:MAX_FUNCTION_NAME]
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
            "data_class": self.data_class,
        }
        unknown = set(overrides) - set(opts)
        if unknown:
            raise TypeError(f"unknown task options: {', '.join(sorted(unknown))}")
        opts.update(overrides)
        return TaskFunction(self.fn, **opts)

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Future:
        """Run on the default mesh (the last ``meshscale.connect()``)."""
        return default_mesh().submit(self, *args, **kwargs)

    def _wire(self, args: Sequence[Any], kwargs: dict[str, Any],
              code: tuple[str, bytes] | None = None) -> tuple[str, bytes, TaskWire]:
        fn_id, fn_bytes = pickle_function(self.fn, code)
        payload, inputs, after = _pickle_call(args, kwargs)
        return fn_id, fn_bytes, TaskWire(
            task_id=uuid.uuid4().hex, fn_id=fn_id, name=self._name, args=payload,
            inputs=inputs, after=after,
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
    timeout_s: float | None = None, placement: Any = None, data_class: str | None = None,
) -> Any:
    """Make ``fn`` a task: ``@task`` or ``@task(cpus=2, residency=["eu-west"])``.

    ``placement``: ``None``/``"data"`` (run where the input objects are),
    ``meshscale.Region(R)`` (in region R), ``meshscale.Regions([...])`` (in one of them),
    or the wire form ``{"mode": "central", "region": R}`` / ``{"mode": "regions", ...}``.
    ``retries``: re-runs after a worker crash or a lost result (node loss is retried by
    the scheduler). ``timeout_s``: the worker is killed after this long. ``data_class``:
    the task runs only where the class's policy allows (the node resolves it; an explicit
    ``residency`` may narrow the class's regions, never widen them)."""
    def wrap(f: Callable[P, R]) -> TaskFunction[P, R]:
        return TaskFunction(f, cpus=cpus, memory_mb=memory_mb, gpus=gpus, labels=labels,
                            residency=residency, retries=retries, timeout_s=timeout_s,
                            placement=placement, data_class=data_class)

    return wrap if fn is None else wrap(fn)


def _as_task(f: Any) -> TaskFunction[Any, Any]:
    if isinstance(f, TaskFunction):
        return f
    if callable(f):
        return TaskFunction(f)
    raise TypeError(f"submit needs a function or a @task, not {type(f).__name__}")


# -- futures ----------------------------------------------------------------------------


class Future:
    """The eventual result of one task, with the ``concurrent.futures.Future`` protocol as
    far as it fits a task on the mesh: ``result(timeout)``, ``exception(timeout)``,
    ``done()``, ``running()``, ``cancelled()``, ``cancel()``, ``add_done_callback(fn)``.
    These block (from a ``TaskMesh``); on an ``AsyncTaskMesh`` await ``result_async()``
    or the future. A future is a valid argument of another task (also inside a list,
    tuple or dict): the node waits for this task and passes its value."""

    def __init__(self, mesh: AsyncTaskMesh, task_id: str, name: str,
                 runner: _LoopThread | None) -> None:
        self.task_id = task_id
        self.name = name
        self._mesh = mesh
        self._runner = runner
        self._outcome: TaskView | None = None
        self._value: Any = None
        self._loaded = False
        self._callbacks: list[Callable[[Future], Any]] = []
        self._lock = threading.Lock()

    def __reduce__(self) -> Any:
        raise TypeError(f"a Future ({self.task_id}) travels only as an argument of a task "
                        "(the node passes its value); pickle fut.result() instead")

    @property
    def node(self) -> str | None:
        """The node that ran it, once known."""
        return None if self._outcome is None else self._outcome.node or None

    def _resolve(self, view: TaskView) -> None:
        """The task has ended (the first outcome heard wins); runs the done callbacks."""
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = view
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            self._mesh._call_back(cb, self)

    def _run(self, coro: Any) -> Any:
        if self._runner is None:
            coro.close()
            raise RuntimeError("this future belongs to an AsyncTaskMesh: await it instead")
        return self._runner.run(coro)

    def done(self) -> bool:
        """Whether the task has ended (asks its node, without waiting)."""
        if self._outcome is None:
            self._run(self._mesh._poll([self], 0.0))
        return self._outcome is not None

    def cancelled(self) -> bool:
        return self._outcome is not None and self._outcome.state == TaskState.CANCELLED

    def running(self) -> bool:
        """Whether a worker has the task now (asks its node)."""
        if self._outcome is not None:
            return False
        return bool(self._run(self.running_async()))

    async def running_async(self) -> bool:
        if self._outcome is not None:
            return False
        view = await self._mesh._trequest(TASK_RESULT, ResultRequest(task_id=self.task_id))
        if view.state in TERMINAL:
            self._resolve(view)
        return view.state == TaskState.RUNNING

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Call ``fn(future)`` once the task has ended (at once if it has). On a blocking
        mesh callbacks run on one thread of the mesh's, in the order the tasks end, and may
        call ``result()``; an exception in one is printed to stderr and dropped."""
        with self._lock:
            if self._outcome is None:
                self._callbacks.append(fn)
                self._mesh._watch(self)
                return
        _run_callback(fn, self)

    def logs(self) -> str:
        """What the task printed: its stdout, then (if any) its stderr under a
        ``--- stderr ---`` line; while it runs, what it has printed so far. The worker
        node keeps up to its ``task_log_bytes`` of each and says where it cut.
        ``logs_async`` on an ``AsyncTaskMesh``; ``meshscale logs [--follow] TASK_ID`` from
        a shell."""
        return self._run(self.logs_async())  # type: ignore[no-any-return]

    async def logs_async(self) -> str:
        reply = await self._mesh._trequest(TASK_LOGS, LogsRequest(task_id=self.task_id))
        return format_logs(reply.stdout, reply.stderr, reply.detail_ref)

    def detail(self) -> TaskDetail | None:
        """A classed task's error message, traceback, pickled exception and output, which
        the node that ran it kept as one object of the task's class instead of sending
        them to the task's owner (``TaskError.detail_ref``, ``logs()`` names it); None
        for an unclassed or unended task (``result()`` and ``logs()`` have them). Read
        through the connected node, so the class's read rules apply: from outside its
        regions a read the class refuses raises, naming the rule."""
        return self._run(self.detail_async())  # type: ignore[no-any-return]

    async def detail_async(self) -> TaskDetail | None:
        reply = await self._mesh._trequest(TASK_LOGS, LogsRequest(task_id=self.task_id))
        if reply.detail_ref is None:
            return None
        return decode_detail(await self._mesh.get(reply.detail_ref.id))

    def result(self, timeout: float | None = None) -> Any:
        """The task's return value; raises the task's own exception if it raised (a
        subclass of its type and ``TaskError``, when its type can be unpickled here),
        ``TaskError`` if it failed otherwise, ``TaskCancelledError`` if it was cancelled,
        and ``TimeoutError`` after ``timeout`` seconds."""
        o = self._outcome
        if o is not None and self._runner is not None and (self._loaded or o.ref is None):
            # Ended, with the value inline (often known from the submit's answer): no
            # trip through the mesh's loop thread, which costs a wake-up each way.
            return self._load_inline()
        return self._run(self.result_async(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception ``result()`` would raise, or None if the task succeeded;
        ``TaskCancelledError`` (a ``concurrent.futures.CancelledError``) if cancelled,
        ``TimeoutError`` after ``timeout`` seconds."""
        o = self._outcome
        if o is not None and self._runner is not None and (
                o.state != TaskState.DONE or self._loaded or o.ref is None):
            try:  # ended, nothing to fetch: as ``result``, without the loop's thread
                self._load_inline()
            except TaskCancelledError:
                raise
            except TaskError as e:
                return e
            return None
        return self._run(self.exception_async(timeout))  # type: ignore[no-any-return]

    async def exception_async(self, timeout: float | None = None) -> BaseException | None:
        try:
            await self.result_async(timeout)
        except TaskCancelledError:
            raise
        except TaskError as e:  # before TimeoutError: a task may raise one of its own
            return e
        return None

    def cancel(self) -> bool:
        """Cancel if not finished (a running task's worker is killed)."""
        return bool(self._run(self.cancel_async()))

    async def cancel_async(self) -> bool:
        if self._outcome is not None:
            return False
        reply = await self._mesh._trequest(TASK_CANCEL, CancelRequest(task_id=self.task_id))
        if reply.cancelled:
            self._resolve(TaskView(task_id=self.task_id, state=TaskState.CANCELLED,
                                   error="cancelled", kind="cancelled"))
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
        o = self._ended_well()
        data = o.value
        ref = o.ref
        if data is None and ref is not None:
            data = await self._mesh.get(ObjectRef(ref.id, ref.size))
        return self._unpickle(data)

    def _load_inline(self) -> Any:
        """``_load`` of an ended task whose value came inline (no I/O: any thread)."""
        if self._loaded:
            return self._value
        return self._unpickle(self._ended_well().value)

    def _ended_well(self) -> TaskView:
        """The outcome of a task that ended well; its error raised if it did not."""
        o = self._outcome
        assert o is not None
        if o.state != TaskState.DONE:
            raise _error_of(o)
        return o

    def _unpickle(self, data: bytes | None) -> Any:
        # Under the future's lock: the caller's thread and the mesh's loop may both load.
        with self._lock:
            if self._loaded:
                return self._value
            if not isinstance(data, bytes):
                raise MeshError(f"task {self.task_id}: the node returned no value")
            try:
                self._value = cloudpickle.loads(data)
            except Exception as e:
                raise TaskError(self.task_id, "unpicklable",
                                f"cannot unpickle the result here: {type(e).__name__}: {e}"
                                ) from None
            self._loaded = True
            return self._value

    def __repr__(self) -> str:
        state = "pending" if self._outcome is None else self._outcome.state
        return f"<Future {self.name} {self.task_id} {state}>"


# -- submitting in a window ---------------------------------------------------------------

MAP_WINDOW_TASKS: Final = 4096
"""Default ``map_window_tasks``: tasks one ``map`` keeps in flight at its node (below the
node's default ``max_pending_tasks``, 10,000, so two clients of one node fit)."""
BUSY_GIVE_UP_S: Final = 600.0
"""Default ``busy_give_up_s``: how long a submit keeps retrying a node that answers
``busy`` without a request getting through before ``TaskSubmitError``."""


SUBMIT_LOST_TRIES: Final = 3
"""Times a submit whose answer never came (timed out, connection lost) is sent again,
with the same task ids, before ``TaskSubmitError``."""


class _Busy(Exception):
    """The node refused a submit with ``ErrorCode.BUSY`` (nothing was submitted)."""


class _Lost(Exception):
    """A submit got no answer (timed out, connection lost): the node may have taken it.
    Sent again with the same task ids, which the node takes once (idempotency keys)."""


class SubmitWindow:
    """How many tasks one map keeps in flight at the node that owns them (sans-I/O).

    ``limit_tasks`` bounds it; a ``busy`` answer (another client, or a node bound below
    the window) halves it, down to one task, and every request that gets through widens
    it again by its size (additive increase, multiplicative decrease, as TCP's window):
    the map then runs at what the node takes instead of hammering it."""

    def __init__(self, limit_tasks: int, batch_tasks: int) -> None:
        if limit_tasks < 1 or batch_tasks < 1:
            raise ValueError(f"a window of {limit_tasks} tasks in batches of {batch_tasks}: "
                             "both must be >= 1")
        self.limit_tasks = limit_tasks
        self.batch_tasks = batch_tasks
        self.size_tasks = limit_tasks
        self.in_flight = 0

    def next_batch(self) -> int:
        """Tasks the next request may carry (0: wait for some to end)."""
        return max(0, min(self.batch_tasks, self.size_tasks - self.in_flight))

    def sent(self, n: int) -> None:
        self.in_flight += n

    def ended(self, n: int) -> None:
        """``n`` tasks ended (or a request of ``n`` was refused)."""
        if n > self.in_flight:
            raise ValueError(f"{n} tasks ended, {self.in_flight} in flight")
        self.in_flight -= n

    def accepted(self, n: int) -> None:
        self.size_tasks = min(self.limit_tasks, self.size_tasks + n)

    def busy(self) -> None:
        self.size_tasks = max(1, min(self.size_tasks, max(self.in_flight, 1)) // 2)


def _length(items: Any) -> int | None:
    try:
        return len(items)
    except TypeError:
        return None


class _ProgressBar:
    """``progress`` of a map: True draws a ``rich`` bar on stderr (tasks ended of the
    total, and how many are submitted), a callable gets ``(submitted, total)`` (total 0
    when unknown)."""

    def __init__(self, progress: bool | Callable[[int, int], None], total: int | None,
                 name: str) -> None:
        self._call = progress if callable(progress) else None
        self._total = total
        self._bar: Any = None
        self._last = -1
        if progress is True:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[sent]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=False)
            self._task = self._bar.add_task(name, total=total, sent="")
            self._bar.start()

    def update(self, submitted: int, ended: int) -> None:
        if self._call is not None and submitted != self._last:
            self._last = submitted
            self._call(submitted, self._total or 0)
        if self._bar is not None:
            self._bar.update(self._task, completed=ended, sent=f"{submitted} submitted")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


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
        self.code: tuple[str, bytes] | None = None
        """``(hash, archive)`` of ``working_dir`` and ``py_modules``, sent with every task."""
        self.runner: _LoopThread | None = None
        self._watched: set[Future] = set()
        self._watch_added = asyncio.Event()
        self._watcher: asyncio.Future[None] | None = None
        self._callback_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._closing = False
        self.map_window_tasks = MAP_WINDOW_TASKS
        """Tasks one ``map``/``imap``/``submit_many`` keeps in flight at the node (which
        owns them); the rest wait here until some end."""
        self.busy_give_up_s = BUSY_GIVE_UP_S
        """How long a submit keeps waiting on a node that answers ``busy``."""

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
                raise MeshError(str(e), getattr(e, "code", ""),
                                unreachable=e.unreachable) from None
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
        """One task per item (``f(item)``); returns the futures in order, once every task
        is submitted. At most ``map_window_tasks`` of them are in flight at the node at
        a time (the rest wait here, taken from ``iterable`` as tasks end), so a map of
        any length never meets the node's ``max_pending_tasks``; the futures (and their
        results) stay here, so use ``imap`` for a map too long to hold. ``progress``: True
        shows a progress bar on stderr, or ``progress(submitted, total)`` (total 0 when
        ``iterable`` has no length)."""
        return await self.submit_many(f, (((x,), {}) for x in iterable), progress=progress,
                                      total=_length(iterable))

    async def imap(self, f: Any, iterable: Iterable[Any],
                   progress: bool | Callable[[int, int], None] = False) -> AsyncIterator[Any]:
        """``f(item)`` for each item, as the results come in, in order (as
        ``concurrent.futures.Executor.map``): items are taken from ``iterable`` as tasks
        end, at most ``map_window_tasks`` in flight, and a result is dropped here once
        handed out, so memory on both sides stays bounded however long the map. A task
        that failed raises its error at its place (the map stops)."""
        async for chunk in self._imap_chunks(f, iterable, progress):
            for ok, value in chunk:
                if not ok:
                    raise value
                yield value

    async def _imap_chunks(self, f: Any, iterable: Iterable[Any],
                           progress: bool | Callable[[int, int], None]
                           ) -> AsyncGenerator[list[tuple[bool, Any]], None]:
        """``imap``'s results, a run of ended tasks at a time: ``(True, value)`` or
        ``(False, error)`` each (a blocking mesh walks it with one round trip per run)."""
        stream = self._windowed(_as_task(f), (((x,), {}) for x in iterable), progress,
                                _length(iterable), hold=False)
        async for futs in stream:
            chunk: list[tuple[bool, Any]] = []
            for fut in futs:
                try:
                    chunk.append((True, await fut._load()))
                except Exception as e:
                    chunk.append((False, e))
            yield chunk

    async def submit_many(
        self, f: Any, calls: Iterable[tuple[Sequence[Any], dict[str, Any]]],
        progress: bool | Callable[[int, int], None] = False, total: int | None = None,
    ) -> list[Future]:
        """``f(*args, **kwargs)`` for each ``(args, kwargs)`` of ``calls``; the futures in
        order, once all are submitted (at most ``map_window_tasks`` in flight at a time:
        see ``map``)."""
        if total is None:
            total = _length(calls)
        futures: list[Future] = []
        async for run in self._windowed(_as_task(f), iter(calls), progress, total,
                                        hold=True):
            futures.extend(run)
        return futures

    async def _windowed(self, tf: TaskFunction[Any, Any],
                        calls: Iterator[tuple[Sequence[Any], dict[str, Any]]],
                        progress: bool | Callable[[int, int], None], total: int | None,
                        *, hold: bool) -> AsyncIterator[list[Future]]:
        """Submit ``calls`` through a ``SubmitWindow``: up to ``TASK_CONNECTIONS`` submit
        requests at once while the window has room, then a wait for tasks to end. A
        ``busy`` answer (``ErrorCode.BUSY``: the node's ``max_pending_tasks``) narrows
        the window and waits (``Backoff``) before the same tasks are sent again; any
        other refusal raises ``TaskSubmitError``.

        ``hold``: yield every future, in order, once all are submitted (``submit_many``:
        the caller keeps them; the last ones may still run), else each run of futures
        that have ended, in order (``imap``), dropping them here. Order is the order of
        ``calls`` even when a refused request is sent again after later ones."""
        win = SubmitWindow(self.map_window_tasks, SUBMIT_BATCH)
        backoff = Backoff(give_up_s=self.busy_give_up_s)
        queue: deque[tuple[TaskWire, Future]] = deque()  # made, to (re)send
        order: deque[Future] = deque()  # made, in order, not handed out
        live: dict[str, Future] = {}  # submitted, not ended: the window
        fn_bytes = b""
        exhausted = False
        submitted = 0
        busy_said = ""
        lost = 0  # submits in a row whose answer was lost
        sent_once: set[str] = set()  # ids of tasks in a submit whose answer was lost
        bar = _ProgressBar(progress, total, tf.__name__)

        def refill(n: int) -> None:
            nonlocal exhausted, fn_bytes
            while len(queue) < n and not exhausted:
                try:
                    a, kw = next(calls)
                except StopIteration:
                    exhausted = True
                    return
                _, fn_bytes, wire = tf._wire(a, kw, self.code)
                fut = Future(self, wire.task_id, tf.__name__, self.runner)
                queue.append((wire, fut))
                order.append(fut)

        def batch(n: int) -> list[tuple[TaskWire, Future]]:
            # One id prefix per submit request (``<prefix>.<n>``): the node keeps the
            # records of a request as one KV value.
            # A task sent before keeps its id: the node may hold it (an answer lost).
            out = [queue.popleft() for _ in range(min(n, len(queue)))]
            if len(out) > 1 and not any(w.task_id in sent_once for w, _ in out):
                prefix = uuid.uuid4().hex
                for i, (w, fut) in enumerate(out):
                    w.task_id = fut.task_id = f"{prefix}.{i}"
            return out

        async def send(b: list[tuple[TaskWire, Future]]) -> bool:
            """False: the node was busy (nothing was submitted), or its answer was lost
            (it may have taken the tasks: they keep their ids)."""
            nonlocal busy_said, lost
            try:
                reply = await self._submit_batch([w for w, _ in b], fn_bytes)
            except _Busy as e:
                busy_said = str(e)
                return False
            except _Lost as e:
                lost += 1
                if lost > SUBMIT_LOST_TRIES:
                    detail = str(e).removeprefix(f"{self.address}: ")
                    raise TaskSubmitError(f"submit failed: {detail} ({lost} times)") from None
                sent_once.update(w.task_id for w, _ in b)
                busy_said = str(e)
                return False
            lost = 0
            for _w, fut in b:
                live[fut.task_id] = fut
            for r in reply.results:
                ended = live.get(r.task_id)
                if ended is not None and ended._outcome is None and r.state in TERMINAL:
                    ended._resolve(r)
            return True

        try:
            first = True
            while True:
                # Fill the window: the first request alone (it may carry the function).
                lanes = 1 if first else TASK_CONNECTIONS
                batches: list[list[tuple[TaskWire, Future]]] = []
                for _ in range(lanes):
                    n = min(win.next_batch(), SUBMIT_BATCH)
                    refill(n)
                    if n <= 0 or not queue:
                        break
                    b = batch(n)
                    win.sent(len(b))
                    batches.append(b)
                if batches:
                    first = False
                    # One request (a lone submit) is awaited in place: no task around it.
                    oks = ([await send(batches[0])] if len(batches) == 1
                           else await asyncio.gather(*(send(b) for b in batches)))
                    busy = False
                    for b, ok in zip(batches, oks, strict=True):
                        if ok:
                            submitted += len(b)
                            win.accepted(len(b))
                        else:
                            busy = True
                            win.ended(len(b))
                            queue.extendleft(reversed(b))
                    if busy:
                        win.busy()
                        delay = backoff.next_delay()
                        if delay is None:
                            detail = busy_said.removeprefix(f"{self.address}: ")
                            raise TaskSubmitError(
                                f"submit refused: the node stayed busy for "
                                f"{self.busy_give_up_s:g}s: {detail}")
                        await self._settle(live, win, delay)
                    else:
                        backoff.reset()
                    bar.update(submitted, submitted - len(live))
                    if not busy and win.next_batch() > 0 and (queue or not exhausted):
                        continue
                if not hold:
                    ready: list[Future] = []
                    while order and order[0]._outcome is not None:
                        ready.append(order.popleft())
                    if ready:
                        yield ready
                done = exhausted and not queue
                if done and hold:
                    yield list(order)
                    return
                if done and not order:
                    return
                if live and (win.next_batch() <= 0 or done or not batches):
                    await self._settle(live, win, WAIT_POLL_S)
                    bar.update(submitted, submitted - len(live))
        finally:
            bar.close()

    async def _settle(self, live: dict[str, Future], win: SubmitWindow,
                      timeout: float) -> None:
        """Wait up to ``timeout`` for tasks of ``live`` to end (a quarter of them, so a
        wait frees room for a full request, not one task at a time); drop those that
        did from ``live`` and the window."""
        if not live:
            await asyncio.sleep(timeout)
            return
        futs = list(live.values())[:WAIT_IDS]
        await self._poll(futs, timeout, min_done=max(1, min(len(futs) // 4, SUBMIT_BATCH)))
        ended = [tid for tid, fut in live.items() if fut._outcome is not None]
        for tid in ended:
            del live[tid]
        win.ended(len(ended))

    async def _submit_batch(self, batch: list[TaskWire], fn_bytes: bytes) -> SubmitReply:
        """One ``task.submit``; raises ``_Busy`` when the node is at its bound (nothing
        was submitted), ``TaskSubmitError`` for any other refusal."""
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
                if e.code == ErrorCode.BUSY:
                    raise _Busy(msg) from None
                if e.unreachable:
                    raise _Lost(msg) from None
                detail = msg.removeprefix(f"{self.address}: ")
                raise TaskSubmitError(f"submit refused: {detail}") from None
        raise AssertionError("unreachable")

    async def _poll(self, futures: Sequence[Future], timeout: float, *,
                    every: bool = False, min_done: int = 1) -> None:
        """Ask the node for the outcomes of those futures not yet resolved; waits up to
        ``timeout`` for at least ``min_done`` of them (``every``: for all of those asked
        about, so a large ``wait`` costs a few calls, not one per completion)."""
        pending = [f for f in futures if f._outcome is None]
        if not pending:
            return
        by_id = {f.task_id: f for f in pending[:WAIT_IDS]}
        ids = list(by_id)
        reply = await self._trequest(TASK_WAIT, WaitRequest(
            task_ids=ids, timeout_s=max(0.0, timeout),
            min_done=len(ids) if every else max(1, min(min_done, len(ids)))))
        for r in reply.results:
            fut = by_id.get(r.task_id)
            if fut is not None and r.state in TERMINAL:
                fut._resolve(r)
        for tid in reply.unknown:
            fut = by_id.get(tid)
            if fut is not None:
                fut._resolve(TaskView(task_id=tid, state=TaskState.FAILED, kind="unknown",
                                      error="no node knows this task (its record was lost)"))

    async def wait(self, futures: Iterable[Future], timeout: float | None = None,
                   return_when: str = ALL_COMPLETED) -> tuple[list[Future], list[Future]]:
        """``(done, not_done)``, in the order given, as ``concurrent.futures.wait``: once
        all are done (``ALL_COMPLETED``), one is (``FIRST_COMPLETED``), one failed or all
        are done (``FIRST_EXCEPTION``), or ``timeout`` seconds passed."""
        futs = list(futures)
        _check_return_when(return_when)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done = [f for f in futs if f._outcome is not None]
            pending = [f for f in futs if f._outcome is None]
            left = WAIT_POLL_S if deadline is None else deadline - time.monotonic()
            if not pending or left <= 0 or _wait_over(done, return_when):
                return done, pending
            await self._poll(pending, min(left, WAIT_POLL_S),
                             every=return_when == ALL_COMPLETED)

    async def gather(self, futures: Iterable[Future], timeout: float | None = None
                     ) -> list[Any]:
        """The futures' values, in order; raises the first failure (in argument order
        among those that failed when one was seen) without waiting for the rest."""
        futs = list(futures)
        _done, pending = await self.wait(futs, timeout, FIRST_EXCEPTION)
        for f in futs:
            o = f._outcome
            if o is not None and o.state != TaskState.DONE:
                raise _error_of(o)
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(futs)} tasks not finished after "
                               f"{timeout}s")
        return [await f._load() for f in futs]

    # Done callbacks: the futures that have some are watched by one task on the mesh's
    # loop (a long-poll for any of them, as ``wait``); callbacks of a blocking mesh run
    # on a thread of their own, so they may block on the mesh (``result()``).

    def _watch(self, fut: Future) -> None:
        """Watch ``fut`` until it ends (any thread)."""
        if self.runner is not None:
            self.runner.loop.call_soon_threadsafe(self._watch_here, fut)
        else:
            self._watch_here(fut)

    def _watch_here(self, fut: Future) -> None:
        self._watched.add(fut)
        self._watch_added.set()
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch_loop())

    async def _watch_loop(self) -> None:
        while not self._closing:
            self._watched = {f for f in self._watched if f._outcome is None}
            if not self._watched:
                return
            self._watch_added.clear()
            poll = asyncio.ensure_future(self._poll(list(self._watched), WAIT_POLL_S))
            added = asyncio.ensure_future(self._watch_added.wait())
            try:
                await asyncio.wait((poll, added), return_when=asyncio.FIRST_COMPLETED)
            finally:
                added.cancel()
            if not poll.done():
                continue  # a new future to watch: the next poll includes it
            try:
                poll.result()
            except MeshError:
                await asyncio.sleep(1.0)  # the node is away: try again, not in a spin

    def _call_back(self, fn: Callable[[Future], Any], fut: Future) -> None:
        if self.runner is None:
            _run_callback(fn, fut)
            return
        if self._callback_thread is None:
            self._callback_thread = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="meshscale-callbacks")
        with contextlib.suppress(RuntimeError):  # the mesh was closed: no more callbacks
            self._callback_thread.submit(_run_callback, fn, fut)

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
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
        if self._callback_thread is not None:
            self._callback_thread.shutdown(wait=False)
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
        """One task per item; the futures in order, once all are submitted, with at most
        ``map_window_tasks`` in flight at a time (see ``AsyncTaskMesh.map``; ``imap``
        for a map too long to keep every future). ``progress=True`` shows a bar."""
        return self._run(self._inner.map(f, iterable, progress=progress))

    def imap(self, f: Any, iterable: Iterable[Any],
             progress: bool | Callable[[int, int], None] = False) -> Iterator[Any]:
        """``f(item)`` for each item, the results in order as they come (as
        ``concurrent.futures.Executor.map``), with bounded memory here and at the node
        however long ``iterable`` is (see ``AsyncTaskMesh.imap``). A failed task raises
        its error at its place. ``progress=True`` shows a bar."""
        chunks = _blocking_iter(self, self._inner._imap_chunks(f, iterable, progress))
        try:
            for chunk in chunks:
                for ok, value in chunk:
                    if not ok:
                        raise value
                    yield value
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def submit_many(self, f: Any, calls: Iterable[tuple[Sequence[Any], dict[str, Any]]],
                    progress: bool | Callable[[int, int], None] = False) -> list[Future]:
        """``f(*args, **kwargs)`` for each ``(args, kwargs)``; the futures in order (as
        ``map``)."""
        return self._run(self._inner.submit_many(f, calls, progress=progress))

    def wait(self, futures: Iterable[Future], timeout: float | None = None,
             return_when: str = ALL_COMPLETED) -> tuple[list[Future], list[Future]]:
        """``(done, not_done)`` as ``concurrent.futures.wait`` (see ``meshscale.wait``)."""
        return self._run(self._inner.wait(list(futures), timeout, return_when))

    def gather(self, futures: Iterable[Future], timeout: float | None = None) -> list[Any]:
        """The futures' values, in order (see ``meshscale.gather``)."""
        return self._run(self._inner.gather(list(futures), timeout))

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


def _check_return_when(return_when: str) -> None:
    if return_when not in (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED):
        raise ValueError(f"return_when must be FIRST_COMPLETED, FIRST_EXCEPTION or "
                         f"ALL_COMPLETED, not {return_when!r}")


def _wait_over(done: Sequence[Future], return_when: str) -> bool:
    """Whether a wait for ``return_when`` is over with ``done`` ended (the rest pending)."""
    if return_when == FIRST_COMPLETED:
        return bool(done)
    if return_when == FIRST_EXCEPTION:
        return any(f._outcome is not None and f._outcome.state != TaskState.DONE
                   for f in done)
    return False


def _futures_of(futures: Any) -> list[Future]:
    futs = list(futures)
    for f in futs:
        if not isinstance(f, Future):
            raise TypeError(f"expected Futures, got a {type(f).__name__}")
    return futs


def wait(futures: Iterable[Future], timeout: float | None = None,
         return_when: str = ALL_COMPLETED) -> tuple[list[Future], list[Future]]:
    """``(done, not_done)`` for futures of blocking meshes, in the order given, as
    ``concurrent.futures.wait``: returns once all have ended (``ALL_COMPLETED``, the
    default), any has (``FIRST_COMPLETED``), any failed (``FIRST_EXCEPTION``; else all),
    or after ``timeout`` seconds."""
    futs = _futures_of(futures)
    _check_return_when(return_when)
    groups: dict[int, list[Future]] = {}
    for f in futs:
        groups.setdefault(id(f._mesh), []).append(f)
    if len(groups) == 1:
        f0 = futs[0]
        return f0._run(f0._mesh.wait(futs, timeout, return_when))  # type: ignore[no-any-return]
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done = [f for f in futs if f._outcome is not None]
        pending = [f for f in futs if f._outcome is None]
        left = WAIT_POLL_S if deadline is None else deadline - time.monotonic()
        if not pending or left <= 0 or _wait_over(done, return_when):
            return done, pending
        for group in groups.values():
            still = [f for f in group if f._outcome is None]
            if still:
                still[0]._run(still[0]._mesh._poll(still, min(left, 0.05)))


def gather(*futures: Any, timeout: float | None = None) -> list[Any]:
    """The values of futures of blocking meshes, in order: ``gather(futs)`` or
    ``gather(f1, f2)``. Raises the first failure seen (the task's own exception, or
    ``TaskError``) without waiting for the rest; ``TimeoutError`` after ``timeout``."""
    items: Any = futures[0] if len(futures) == 1 and not isinstance(futures[0], Future) \
        else futures
    futs = _futures_of(items)
    if not futs:
        return []
    _done, pending = wait(futs, timeout, FIRST_EXCEPTION)
    for f in futs:
        o = f._outcome
        if o is not None and o.state != TaskState.DONE:
            raise _error_of(o)
    if pending:
        raise TimeoutError(f"{len(pending)} of {len(futs)} tasks not finished after {timeout}s")
    return [f.result() for f in futs]


def format_logs(stdout: str, stderr: str, detail_ref: DetailRef | None = None) -> str:
    """A task's output as one text: stdout, then stderr under a ``--- stderr ---`` line;
    for a classed task whose output is kept as an object of its class, where it is."""
    text = stdout
    if stderr:
        sep = "" if not stdout or stdout.endswith("\n") else "\n"
        text = f"{stdout}{sep}--- stderr ---\n{stderr}"
    if detail_ref is not None:
        sep = "" if not text or text.endswith("\n") else "\n"
        text += (f"{sep}--- output, error and traceback kept as object {detail_ref.id} of "
                 f"class {detail_ref.data_class} (readable from within the class's "
                 "regions: Future.detail(), meshscale get) ---\n")
    return text


def _run_callback(fn: Callable[[Future], Any], fut: Future) -> None:
    try:
        fn(fut)
    except Exception:
        print(f"meshscale: exception in a done callback of {fut!r}:", file=sys.stderr)
        traceback.print_exc()


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
    working_dir: str | Path | None = None,
    py_modules: Sequence[Any] | None = None,
    map_window_tasks: int = MAP_WINDOW_TASKS,
    busy_give_up_s: float = BUSY_GIVE_UP_S,
) -> AsyncTaskMesh:
    """Like ``client.mesh.connect_async``, with tasks. ``working_dir``, ``py_modules``,
    ``map_window_tasks`` and ``busy_give_up_s``: see ``connect``."""
    _check_window(map_window_tasks, busy_give_up_s)
    code = _pack_code(working_dir, py_modules)
    mesh = await open_mesh(AsyncTaskMesh, address, bundle=bundle, token=token,
                           timeout=timeout, read_ahead=read_ahead)
    mesh.code = code
    mesh.map_window_tasks = map_window_tasks
    mesh.busy_give_up_s = busy_give_up_s
    return mesh


def _check_window(map_window_tasks: int, busy_give_up_s: float) -> None:
    if not isinstance(map_window_tasks, int) or map_window_tasks < 1:
        raise ValueError(f"map_window_tasks must be an int >= 1, not {map_window_tasks!r}")
    if not busy_give_up_s > 0:
        raise ValueError(f"busy_give_up_s must be > 0, not {busy_give_up_s!r}")


def _pack_code(working_dir: str | Path | None,
               py_modules: Sequence[Any] | None) -> tuple[str, bytes] | None:
    if working_dir is None and not py_modules:
        return None
    return codepack.pack(working_dir, py_modules)


def connect(
    address: str,
    *,
    bundle: str | Path | None = None,
    token: str | None = None,
    timeout: float = 30.0,
    read_ahead: int = READ_AHEAD,
    working_dir: str | Path | None = None,
    py_modules: Sequence[Any] | None = None,
    map_window_tasks: int = MAP_WINDOW_TASKS,
    busy_give_up_s: float = BUSY_GIVE_UP_S,
) -> TaskMesh:
    """Connect to the mesh through the node at ``address`` (blocking API, with tasks);
    it becomes the default mesh of ``@task(...).submit``. ``token`` and ``read_ahead``:
    see ``client.mesh.connect_async``. Raises ``ConnectError``.

    ``working_dir``: a directory whose files every task of this connection finds first
    on its ``sys.path`` (and ``py_modules``: more modules, each a module, a module name
    or the path of a ``.py`` file or a package). Packed here into one archive named by
    its hash (``client/codepack.py``: caches and VCS directories left out, at most
    ``MAX_CODE_ARCHIVE_BYTES``), sent with the functions and unpacked once per hash on
    each worker node. Raises ``CodeArchiveError`` (a ``ValueError``) before connecting
    for a missing directory, an entry that is not importable or too much.

    ``map_window_tasks``: tasks one ``map``, ``imap`` or ``submit_many`` keeps in flight
    at the node (the rest are taken from the iterable as tasks end), so a map of any
    length fits the node's ``max_pending_tasks``. ``busy_give_up_s``: how long a submit
    keeps waiting (with backoff) on a node that answers ``busy`` before it raises
    ``TaskSubmitError``."""
    global _default
    _check_window(map_window_tasks, busy_give_up_s)
    code = _pack_code(working_dir, py_modules)
    runner = _LoopThread()
    try:
        inner = runner.run(connect_async(address, bundle=bundle, token=token, timeout=timeout,
                                         read_ahead=read_ahead))
        inner.code = code
        inner.map_window_tasks = map_window_tasks
        inner.busy_give_up_s = busy_give_up_s
    except BaseException:
        runner.stop()
        raise
    mesh = TaskMesh(runner, inner)
    with _default_lock:
        _default = mesh
    return mesh

