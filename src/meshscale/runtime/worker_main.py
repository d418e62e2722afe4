"""The worker process of the compute plane's execution engine, and its wire format.

A worker is a fresh interpreter started by ``WorkerPool`` (``python -m
meshscale.runtime.worker_main FD PARENT_PID [UID:GID WORK_DIR]``). It inherits exactly one
descriptor besides stdio: its end of a ``socketpair`` to the pool. Nothing of the agent —
event loop, sockets, threads, TLS state — crosses into it, because it was never forked
from the agent.

Given ``UID:GID`` (the agent is root, see ``runtime/isolation.py``), the worker becomes
that user before it reads anything from the pool: no supplementary groups, no new
privileges, working directory and ``HOME`` in ``WORK_DIR``. It starts as root so that
the interpreter and its standard library may live where that user cannot go (a pyenv
under ``/root``): each ``sys.path`` directory it could not reach is opened first and used
through ``/proc/self/fd/N`` afterwards (a process may always use its own descriptors).

The worker runs one task at a time on its main thread, with no event loop: read a frame,
run, write a frame. What the task prints goes to per-task buffers (``_Capture``, bounded
by ``Init.max_log_bytes``) that ride in the reply, and, while it runs, to the pool in
``Output`` frames sent by one helper thread (``_LiveOutput``) for ``logs --follow``; the
worker's descriptors 1 and 2 lead to /dev/null, so nothing a task prints reaches the
node's log. Functions arrive at most once per worker, keyed by content hash, and
are kept in an LRU of unpickled callables. The pool mirrors that LRU exactly (same
inserts, same evictions, in the same order), so it knows which function bytes a worker
needs without asking.

Frames, both ways: ``>II`` (envelope length, body length), an envelope (a msgspec Struct
as MessagePack) and a body of raw bytes (function pickle + argument pickle; a result
pickle; a traceback). Both lengths are checked against bounds before anything is read.

This module is imported by the pool too (for the message types), so it stays light:
no asyncio, nothing from the rest of meshscale.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

FRAME_HEADER = struct.Struct(">II")
MAX_ENVELOPE = 64 * 1024
MAX_TRACEBACK = 64 * 1024
MAX_EXCEPTION = 64 * 1024
"""A pickled exception larger than this is not sent (the caller gets ``TaskError``)."""
LOG_NOTE_BYTES = 256
"""Room for the note that says a task's output was cut."""
# Body bound for replies besides the result and the two logs: a traceback, an exception.
REPLY_SLACK = MAX_TRACEBACK + MAX_EXCEPTION + 2 * LOG_NOTE_BYTES

# failure kinds a worker reports (the pool adds timeout / worker_crashed / cancelled)
KIND_RAISED = "raised"
KIND_MEMORY = "memory"
KIND_UNPICKLABLE = "unpicklable"
KIND_TOO_LARGE = "too_large"
KIND_MISSING = "missing_function"


def function_id(pickled: bytes | memoryview) -> str:
    """Content id of a pickled function: the hex digest its stored object is named by
    (``core.objects.digest_hex``). Imported on first use: an idle worker never hashes, and
    each extension module loaded is resident memory in every worker of every node."""
    from meshscale.core.objects import digest_hex

    return digest_hex(pickled)


# --- messages ---------------------------------------------------------------------------


class Init(msgspec.Struct, tag="init", array_like=True):
    """Pool -> worker, once: bounds and import path."""

    max_function_bytes: int
    max_arg_bytes: int
    max_result_bytes: int
    max_cached_functions: int
    sys_path: list[str]
    max_log_bytes: int = 64 * 1024
    """What one task printed to stdout, and to stderr, kept (each; the rest is counted)."""


class Task(msgspec.Struct, tag="task", array_like=True):
    """Pool -> worker. Body: ``fn_len`` bytes of function pickle (0 = use the cache),
    then the pickled ``(args, kwargs)``."""

    fn_id: str
    fn_len: int
    memory_mb: int | None = None
    # Ids to drop from the cache first. The pool owns the LRU policy; the worker follows,
    # so the two views cannot drift even when a function fails to unpickle.
    evict: tuple[str, ...] = ()


class Ready(msgspec.Struct, tag="ready", array_like=True):
    pid: int


class Done(msgspec.Struct, tag="done", array_like=True):
    """Worker -> pool. Body: the pickled result, then ``out_len`` bytes of what the task
    printed to stdout and ``err_len`` to stderr (UTF-8)."""

    out_len: int = 0
    err_len: int = 0


class Failed(msgspec.Struct, tag="failed", array_like=True):
    """Worker -> pool. Body: traceback text (UTF-8), then ``exc_len`` bytes of the pickled
    exception (kind ``raised``, when it pickles), then stdout and stderr as in ``Done``."""

    kind: str
    message: str
    exc_len: int = 0
    out_len: int = 0
    err_len: int = 0


class Output(msgspec.Struct, tag="output", array_like=True):
    """Worker -> pool, while a task runs: more of what it printed (body: UTF-8 bytes,
    within what the task's ``Done``/``Failed`` will carry in full), for followers."""

    stream: int
    """1: stdout, 2: stderr."""


ToWorker = Init | Task
FromWorker = Ready | Done | Failed | Output

_to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)

_PLAIN_RESULTS = (int, float, str, bytes, bool, type(None))
"""Result types (exactly these, no subclass) pickled with ``pickle`` itself."""
encoder = msgspec.msgpack.Encoder()


def frame_header(envelope: bytes, body_len: int) -> bytes:
    return FRAME_HEADER.pack(len(envelope), body_len) + envelope


# --- the worker -------------------------------------------------------------------------


class _Closed(Exception):
    """The pool closed its end: exit quietly."""


def _recv_exact(sock: socket.socket, n: int) -> memoryview:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise _Closed
        got += k
    return view


_sock_lock = threading.Lock()
"""Frames to the pool come from the task loop and from the live-output flusher."""


def _send(sock: socket.socket, msg: Ready | Done | Failed | Output,
          body: bytes | list[bytes] = b"") -> None:
    with _sock_lock:
        _send_locked(sock, msg, body)


def _send_locked(sock: socket.socket, msg: Ready | Done | Failed | Output,
                 body: bytes | list[bytes] = b"") -> None:
    env = encoder.encode(msg)
    parts = body if isinstance(body, list) else [body]
    size = sum(len(p) for p in parts)
    head = frame_header(env, size)
    if size < 64 * 1024:
        sock.sendall(head + b"".join(parts))
    else:
        sock.sendall(head)
        for p in parts:
            sock.sendall(p)


_held: dict[str, str] = {}
"""sys.path entries the worker user cannot reach -> ``/proc/self/fd/N`` held open."""


def _drop_privileges(uid: int, gid: int, work_dir: str) -> None:
    """Become ``uid:gid`` for good; Linux. Raises SystemExit when it does not hold."""
    import ctypes  # before the drop: the standard library may be out of reach after it
    import pwd

    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    fds = {}
    for p in sys.path:
        if p and p not in fds and os.path.isdir(p):
            with contextlib.suppress(OSError):
                fds[p] = os.open(p, os.O_PATH | os.O_DIRECTORY)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise SystemExit("could not drop root")
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs = 38
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise SystemExit("PR_SET_NO_NEW_PRIVS failed")
    for p, fd in fds.items():
        if os.access(p, os.R_OK | os.X_OK):
            os.close(fd)
        else:
            _held[p] = f"/proc/self/fd/{fd}"
    sys.path[:] = [_held.get(p, p) for p in sys.path]
    _remap_package_paths()
    os.chdir(work_dir)
    os.environ["HOME"] = work_dir
    os.environ["USER"] = os.environ["LOGNAME"] = name


def _reachable(path: str) -> str:
    """``path`` under the held descriptor of the unreachable directory holding it."""
    for held, fd_path in _held.items():
        if path == held or path.startswith(held.rstrip("/") + "/"):
            return fd_path + path[len(held.rstrip("/")):]
    return path


def _remap_package_paths() -> None:
    """Point the ``__path__`` of every package imported before the drop at the held
    descriptors: a submodule imported later (``importlib._abc`` by an unpickle, say) is
    looked up in its package's ``__path__``, not in ``sys.path``."""
    for mod in list(sys.modules.values()):
        paths = getattr(mod, "__path__", None)
        if isinstance(paths, list):
            paths[:] = [_reachable(p) for p in paths]


def _set_parent_death_signal(parent_pid: int) -> None:
    """Linux: die with SIGKILL when the agent dies, even if it is SIGKILLed itself."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    # The parent may have died before prctl took effect.
    if os.getppid() != parent_pid:
        os._exit(0)


def _address_space_bytes() -> int:
    """Current virtual size of this process (Linux /proc); 0 if unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Worker:
    """The task loop. Kept as a class so the LRU and bounds are plain attributes."""

    def __init__(self, sock: socket.socket, init: Init) -> None:
        self.sock = sock
        self.init = init
        self.functions: dict[str, Callable[..., Any]] = {}
        self.max_body = init.max_function_bytes + init.max_arg_bytes
        self.live = _LiveOutput(sock)

    def run_captured(self, msg: Task, body: memoryview) -> tuple[Done | Failed, list[bytes]]:
        """``run`` with what the task prints to ``sys.stdout`` and ``sys.stderr`` kept
        apart, bounded, and sent after the reply's body (the worker's own descriptors 1
        and 2 lead nowhere: the node's log stays its own)."""
        limit = self.init.max_log_bytes
        live = self.live
        seq = live.begin_task()
        out, err = _Capture(limit, 1, live, seq), _Capture(limit, 2, live, seq)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            reply, data, exc = self.run(msg, body)
        finally:
            sys.stdout, sys.stderr = saved
            live.end_task()
            _forget_shipped()
        out_b, err_b = out.value(), err.value()
        if isinstance(reply, Done):
            reply.out_len, reply.err_len = len(out_b), len(err_b)
            return reply, [data, out_b, err_b]
        reply.exc_len, reply.out_len, reply.err_len = len(exc), len(out_b), len(err_b)
        return reply, [data, exc, out_b, err_b]

    def serve(self) -> None:
        import resource

        soft_as, hard_as = resource.getrlimit(resource.RLIMIT_AS)
        while True:
            head = _recv_exact(self.sock, FRAME_HEADER.size)
            env_len, body_len = FRAME_HEADER.unpack(head)
            if env_len > MAX_ENVELOPE or body_len > self.max_body:
                # The pool checks the same bounds, so this is a bug or corruption: stop.
                raise SystemExit(f"frame too large ({env_len}, {body_len})")
            # The envelope and the body in one read (the pool writes a small frame whole).
            frame = _recv_exact(self.sock, env_len + body_len)
            msg = _to_worker_decoder.decode(frame[:env_len])
            body = frame[env_len:]
            del frame
            if not isinstance(msg, Task):
                raise SystemExit("unexpected message")
            limited = msg.memory_mb is not None
            if limited:
                assert msg.memory_mb is not None
                # The limit is on growth: what the task may add to the worker's current
                # address space. An absolute cap would count the interpreter's own mappings.
                cap = _address_space_bytes() + msg.memory_mb * (1 << 20)
                if hard_as != resource.RLIM_INFINITY:
                    cap = min(cap, hard_as)
                resource.setrlimit(resource.RLIMIT_AS, (cap, hard_as))
            try:
                reply, parts = self.run_captured(msg, body)
            finally:
                if limited:
                    resource.setrlimit(resource.RLIMIT_AS, (soft_as, hard_as))
            del body
            _send(self.sock, reply, b"".join(parts) if len(parts[0]) < (1 << 20) else parts)

    def _function(self, msg: Task, body: memoryview) -> Callable[..., Any] | Failed:
        for old in msg.evict:
            self.functions.pop(old, None)
        if msg.fn_len == 0:
            fn = self.functions.get(msg.fn_id)
            if fn is None:
                return Failed(KIND_MISSING, f"function {msg.fn_id} is not cached here")
            return fn
        raw = body[: msg.fn_len]
        if function_id(raw) != msg.fn_id:
            return Failed(KIND_UNPICKLABLE, f"function bytes do not hash to {msg.fn_id}")
        try:
            import cloudpickle  # on first use: idle workers stay small

            loaded: Any = cloudpickle.loads(raw)
        except BaseException as e:
            return Failed(
                KIND_UNPICKLABLE, _short(f"cannot unpickle function: {type(e).__name__}: {e}")
            )
        if not callable(loaded):
            return Failed(KIND_UNPICKLABLE, f"unpickled object is not callable: {type(loaded)!r}")
        self.functions[msg.fn_id] = loaded
        # The pool evicts before it sends; this bound only guards against a pool bug.
        if len(self.functions) > self.init.max_cached_functions:
            self.functions.pop(next(iter(self.functions)))
        return loaded  # type: ignore[no-any-return]

    def run(self, msg: Task, body: memoryview) -> tuple[Done | Failed, bytes, bytes]:
        """The reply, its body (result or traceback) and the pickled exception (if any)."""
        try:
            fn = self._function(msg, body)
            if isinstance(fn, Failed):
                return fn, b"", b""
            import cloudpickle

            try:
                args, kwargs = cloudpickle.loads(body[msg.fn_len :])
            except MemoryError:
                raise
            except BaseException as e:
                return (Failed(KIND_UNPICKLABLE, _short(f"cannot unpickle arguments: {e!r}")),
                        b"", b"")
            result = fn(*args, **kwargs)
            del args, kwargs
            try:
                if type(result) in _PLAIN_RESULTS:
                    # Pickled alike by both; cloudpickle's pickler costs more to set up
                    # than a no-op's whole call (issue #19). Imported here: the agent
                    # imports this module, and an idle one loads no pickle.
                    import pickle

                    out = pickle.dumps(result, protocol=5)
                else:
                    out = cloudpickle.dumps(result, protocol=5)
            except MemoryError:
                raise
            except BaseException as e:
                return Failed(KIND_UNPICKLABLE, _short(f"cannot pickle result: {e!r}")), b"", b""
            del result
            if len(out) > self.init.max_result_bytes:
                return Failed(
                    KIND_TOO_LARGE,
                    f"result of {len(out)} bytes exceeds max_result_bytes="
                    f"{self.init.max_result_bytes}",
                ), b"", b""
            return Done(), out, b""
        except MemoryError as e:
            tb = _traceback_text(e)
            return Failed(KIND_MEMORY, _short(f"MemoryError: {e}")), tb, b""
        except BaseException as e:
            # SystemExit and KeyboardInterrupt from user code fail the task, not the worker.
            tb = _traceback_text(e)
            return (Failed(KIND_RAISED, _short(f"{type(e).__name__}: {e}")), tb,
                    _pickle_exception(e))


def _forget_shipped() -> None:
    """Drop the modules that travelled with the task just run, and their finder, once its
    result and exception are pickled (both may name the task's own classes): the next
    task, maybe another job's, imports none of them. They are known by the
    ``meshscale_shipped`` attribute of their loader (the client's call wrapper keeps
    them for its own next call)."""
    finders = [f for f in sys.meta_path if getattr(f, "meshscale_shipped", False)]
    if not finders:
        return
    sys.meta_path[:] = [f for f in sys.meta_path if f not in finders]
    # the connection's unpacked code archive (working_dir, py_modules), if any
    paths = [str(p) for f in finders for p in getattr(f, "code_paths", ())]
    if paths:
        sys.path[:] = [p for p in sys.path if p not in paths]
        for p in paths:
            sys.path_importer_cache.pop(p, None)
    prefixes = tuple(p.rstrip("/") + "/" for p in paths)
    names: Iterable[str]
    before = [b for f in finders if isinstance(b := getattr(f, "modules_before", None), set)]
    kept = [getattr(f, "modules", None) for f in finders]
    if not paths and all(isinstance(m, dict) for m in kept):
        # Without a code archive a module comes with a task only through a shipped
        # finder (``_brought``), which keeps every module it loaded (``modules``): those
        # are all there is to look at. A set of the worker's few hundred module names,
        # and another at the call's start, cost more than a no-op's run (issue #19).
        names = {n for m in kept if isinstance(m, dict) for n in m}
        for f in finders:
            setattr(f, "modules_before", None)  # noqa: B010 (a finder of the task's)
    elif len(before) == len(finders):
        # A module the call brought came into sys.modules after the call began (the
        # finder's snapshot then) or was put back by its finder (its ``modules``, which
        # may replace a name taken before): only those are looked at, not each of the
        # worker's few hundred modules (~100 us a task, half a no-op's time here).
        names = sys.modules.keys() - set.intersection(*before)
        names |= {n for f in finders for n in getattr(f, "modules", ())}
        for f in finders:
            setattr(f, "modules_before", None)  # noqa: B010 (a finder of the task's)
    else:  # a finder without a snapshot (an older client's): look at every module
        names = list(sys.modules)
    for name in [n for n in names if _brought(sys.modules.get(n), prefixes)]:
        del sys.modules[name]


def _brought(m: object, prefixes: tuple[str, ...]) -> bool:
    """Whether module ``m`` came with a task: loaded by a shipped finder, or from the
    task's unpacked code archive (a path of ``prefixes``)."""
    if m is None:
        return False
    return bool(getattr(getattr(getattr(m, "__spec__", None), "loader", None),
                        "meshscale_shipped", False)
                or (prefixes and str(getattr(m, "__file__", None) or "").startswith(prefixes)))


def _short(text: str, limit: int = 4096) -> str:
    """Messages ride in the envelope, which has a small bound."""
    return text if len(text) <= limit else text[: limit - 15] + "...(truncated)"


class _LiveOutput:
    """Sends what the running task has printed to the pool as it comes (``Output``), at
    most every ``FLUSH_S``, from a thread started with the worker (so a task's memory
    limit never stops it from starting). The task's reply carries all of it again; what
    is pending when the task ends is dropped, and the lock shared with the task loop's
    sends means no ``Output`` of a task follows its reply."""

    FLUSH_S = 0.25

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: dict[int, list[bytes]] = {1: [], 2: []}
        self.active = False
        self.seq = 0
        """The current task's number: a capture of an earlier task (kept by a thread or
        a logging handler the task left behind) adds nothing."""
        self.wake = threading.Event()
        self.pid = os.getpid()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name="meshscale-output",
                                       daemon=True)
        self.thread.start()

    def begin_task(self) -> int:
        with _sock_lock:
            self.seq += 1
            self.active = True
            self.pending = {1: [], 2: []}
            return self.seq

    def add(self, seq: int, stream: int, data: bytes) -> None:
        if os.getpid() != self.pid:
            return  # a child the task forked: its output is not this task's to send
        with _sock_lock:
            if seq != self.seq or not self.active:
                return
            self.pending[stream].append(data)
        self.wake.set()

    def end_task(self) -> None:
        with _sock_lock:
            self.active = False
            self.pending = {1: [], 2: []}

    def _main(self) -> None:
        while True:
            self.wake.wait()
            time.sleep(self.FLUSH_S)
            with _sock_lock:
                self.wake.clear()
                if not self.active:
                    continue
                pending, self.pending = self.pending, {1: [], 2: []}
                try:
                    for stream, chunks in pending.items():
                        if chunks:
                            _send_locked(self.sock, Output(stream), b"".join(chunks))
                except OSError:
                    return  # the pool is gone; the task loop finds out too


class _Capture:
    """A task's ``sys.stdout`` or ``sys.stderr``: the first ``limit`` bytes (UTF-8) are
    kept (and sent on as they come, through ``live``), the rest counted, and ``value``
    says how much was cut."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, limit: int, stream: int = 1, live: _LiveOutput | None = None,
                 seq: int = 0) -> None:
        self.limit = limit
        self.stream = stream
        self.live = live
        self.seq = seq
        self.parts: list[bytes] = []
        self.size = 0
        self.dropped = 0

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        data = text.encode("utf-8", "replace")
        room = self.limit - self.size
        if room > 0:
            kept = data[:room]
            self.parts.append(kept)
            self.size += len(kept)
            if self.live is not None:
                self.live.add(self.seq, self.stream, kept)
        self.dropped += max(0, len(data) - max(room, 0))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        import io

        raise io.UnsupportedOperation("a task's output is captured, not a file")

    def value(self) -> bytes:
        data = b"".join(self.parts)
        if self.dropped:
            # Cut where a character begins, so the text decodes cleanly.
            data = data.decode("utf-8", "ignore").encode("utf-8")
            note = (f"\n[meshscale: output truncated: {self.dropped} more bytes not kept "
                    f"(task_log_bytes={self.limit})]\n")
            data += note.encode()[:LOG_NOTE_BYTES]
        return data


def _pickle_exception(e: BaseException) -> bytes:
    """``e`` pickled for the caller, or b"" when it does not pickle (or is too large):
    the caller then gets ``TaskError`` with the text and traceback."""
    try:
        import cloudpickle

        data: bytes = cloudpickle.dumps(e, protocol=5)
    except BaseException:
        return b""
    return data if len(data) <= MAX_EXCEPTION else b""


def _user_frames(tb: Any) -> Any:
    """The traceback from the first frame that is not the worker's own (this module and
    the client's call wrapper), so the caller sees their code first."""
    first = tb
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename != __file__ and code.co_name != "_meshscale_call":
            return tb
        tb = tb.tb_next
    return first


def _traceback_text(e: BaseException) -> bytes:
    try:
        text = "".join(traceback.format_exception(type(e), e, _user_frames(e.__traceback__)))
    except BaseException:
        text = f"{type(e).__name__}: (traceback unavailable)"
    raw = text.encode("utf-8", "replace")
    if len(raw) > MAX_TRACEBACK:
        raw = b"...(truncated)...\n" + raw[-(MAX_TRACEBACK - 32) :]
    return raw


def child_socket(args: list[str], kind: str) -> socket.socket:
    """How every child process of a node starts (a task worker, a service replica):
    ``args`` are its fd, the node's pid and, optionally, ``uid:gid`` and groups to run as.
    Drops to that user (exit 1 if it cannot), dies with the node, leaves Ctrl-C to the
    node, and returns the socket to the node."""
    fd, parent_pid = int(args[0]), int(args[1])
    if len(args) >= 4 and args[2] != "-":
        uid, _, gid = args[2].partition(":")
        try:
            _drop_privileges(int(uid), int(gid), args[3])
        except (OSError, SystemExit) as e:
            print(f"meshscale {kind} {os.getpid()}: cannot run as {args[2]}: {e}",
                  file=sys.stderr)
            os._exit(1)
    # After the drop: a change of user clears the parent-death signal.
    _set_parent_death_signal(parent_pid)
    # Ctrl-C in the agent's terminal is the agent's to handle; it closes the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    sock = child_socket(sys.argv[1:] if argv is None else argv, "worker")
    code = 0
    own_stderr = -1
    try:
        head = _recv_exact(sock, FRAME_HEADER.size)
        env_len, body_len = FRAME_HEADER.unpack(head)
        if env_len > MAX_ENVELOPE * 16 or body_len != 0:
            raise SystemExit("bad init frame")
        init = _to_worker_decoder.decode(_recv_exact(sock, env_len))
        if not isinstance(init, Init):
            raise SystemExit("expected init")
        # The agent's import path, after our own (so functions pickled by reference to
        # a module the agent can import resolve here too, as with multiprocessing).
        for p in init.sys_path:
            p = _held.get(p, p)
            if p not in sys.path:
                sys.path.append(p)
        # What task code prints is captured per task (``Worker.run_captured``); what
        # escapes that (a C extension, a child process) goes nowhere rather than into the
        # node's JSON log. The worker's own last words still reach the node's stderr.
        own_stderr = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        _send(sock, Ready(os.getpid()))
        worker = Worker(sock, init)
        worker.live.start()
        worker.serve()
    except (_Closed, BrokenPipeError, ConnectionResetError):
        pass
    except SystemExit as e:
        line = f"meshscale worker {os.getpid()}: {e}\n".encode()
        with contextlib.suppress(OSError):
            os.write(own_stderr if own_stderr >= 0 else 2, line)
        code = 1
    finally:
        # Skip interpreter teardown: nothing here needs flushing, and a user module's
        # atexit hooks or hung threads must not keep a retired worker alive.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
