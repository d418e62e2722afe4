"""What keeps task code away from the node: the worker user, private files, cgroups.

Task code is whatever a client with an admin certificate sends; it runs in the node's
warm worker processes (``workers.py``). Three things stand between it and the node
(#13 item 11):

- **A separate user.** When the agent runs as root, every worker drops to
  ``worker_user`` (default ``nobody``; a dedicated user is better, and
  ``create_worker_user`` makes it with ``useradd --system`` when it is missing) before it
  reads its first message: no supplementary groups, ``PR_SET_NO_NEW_PRIVS`` (no setuid
  binary gives root back), not dumpable (workers of one node cannot ptrace each other).
  The node's secrets are the agent's alone: the bundle directory is made 0700 and its
  private files are 0600 (``trust/bundle.py`` already refuses wider ones), the data dir
  keeps everything 0700/0600 behind a directory the worker user may only traverse, and
  the agent's umask becomes 077. What a worker legitimately needs stays reachable: its
  own working directory (``<data_dir>/work``, owned by the worker user), input objects
  linked for a run (``<data_dir>/store/links``, traverse-only, each link readable by the
  worker group; by value instead when a directory above the data dir is closed to the
  worker user), the Python installation (a ``sys.path`` entry the worker user cannot
  reach, such as an interpreter under ``/root``, is held open before the drop and used
  through ``/proc/self/fd``), and results, which go back over the worker's socket. An
  agent that is not root cannot change user: its workers run as itself and can read
  what it can, and it says so in a log line at start.
- **cgroups.** Each worker is in its own cgroup under a per-node parent
  (``meshscale-<node>-<hash of the data dir>``, beside the agent's own cgroup): cgroup v2
  (``memory.max``, ``memory.swap.max`` 0, ``memory.oom.group``, ``cpu.max``) or v1
  (``memory.limit_in_bytes`` and ``memsw``, ``cpu.cfs_quota_us``). Before each task the
  limits are set from the task's ``memory_mb`` (or the node default: what the task may
  add to the worker's current usage) and ``cpus``. The kernel kills a worker that goes
  over; the pool reports it as ``"memory"``. Worker cgroups are removed as workers exit,
  the parent when the pool closes, and stale ones (a node that crashed) when it starts.
  A live node holds a shared ``flock`` on its parent directory for as long as it runs,
  so another node's sweep never takes it for a crashed one's, even while it has no
  workers (on standby, ``runtime/capacity.py``, the workers stop and the parent stays).
  Where no cgroup can be written (not root without delegation, a read-only cgroupfs),
  memory is limited per process with ``RLIMIT_AS`` and CPU is not limited; the agent
  logs which.
- **A fair share of slots** per submitter, decided in ``core/scheduling.py``.

What this does not give: no seccomp filter, no namespaces (tasks see the host's
processes, network and file system with the worker user's rights), the network is open
to tasks, all tasks of a node share one kernel and one worker user (one task can signal
another's worker), disk use is not limited. README's "What isolation holds" says the same
for users.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from meshscale.trust.bundle import PRIVATE

__all__ = [
    "DEFAULT_WORKER_USER",
    "Cgroups",
    "Isolation",
    "IsolationError",
    "WorkerCgroup",
    "WorkerUser",
    "open_cgroups",
    "own_limits",
    "prepare",
    "resolve_worker_user",
    "searchable_by",
]

DEFAULT_WORKER_USER = "nobody"
CPU_PERIOD_US = 100_000
WORK_DIR = "work"
"""Under the data dir: the workers' working directory (owned by the worker user)."""
CGROUP_PREFIX = "meshscale-"
KILL_WAIT_S = 2.0
"""Longest wait for the processes of a stale cgroup to die (at start, blocking)."""
STALE_AFTER_S = 60.0
"""Another node's parent cgroup with no process left in it for this long, and no lock
held on it, is a crashed node's that will not restart with its data dir (removed by the
next node to start)."""


class IsolationError(Exception):
    """Isolation asked for cannot be set up; the message is one line."""


@dataclass(frozen=True)
class WorkerUser:
    name: str
    uid: int
    gid: int


def resolve_worker_user(name: str | None, *, create: bool = False
                        ) -> tuple[WorkerUser | None, str]:
    """The user workers run as, and one sentence saying what that means.

    None when the agent is not root (it cannot change user) or ``name`` is empty.
    ``IsolationError`` when the user does not exist (unless ``create``) or is root."""
    if os.geteuid() != 0:
        me = _user_name(os.geteuid())
        return None, (f"the agent runs as {me} (not root), so workers cannot run as another "
                      f"user: task code runs as {me} and can read what the agent can (its "
                      "bundle, its data dir); run the agent as root to give workers "
                      "worker_user")
    if not name:
        return None, ("worker_user is empty: workers run as root and task code can read "
                      "this node's secrets")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if not create:
            raise IsolationError(
                f"worker_user {name!r} does not exist: create it (useradd --system "
                f"--no-create-home --shell /usr/sbin/nologin {name}) or start with "
                "--create-worker-user") from None
        _create_user(name)
        pw = pwd.getpwnam(name)
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise IsolationError(f"worker_user {name!r} is root (uid {pw.pw_uid}, gid "
                             f"{pw.pw_gid}): name an unprivileged user, or '' to run "
                             "workers as root knowingly")
    user = WorkerUser(name, pw.pw_uid, pw.pw_gid)
    return user, (f"workers run as {name} (uid {user.uid}, gid {user.gid}): task code "
                  "cannot read this node's bundle or data dir")


def _create_user(name: str) -> None:
    useradd = shutil.which("useradd")
    if useradd is None:
        raise IsolationError(f"cannot create worker_user {name!r}: no useradd on this machine")
    cmd = [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
           "--shell", "/usr/sbin/nologin", "--user-group", name]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        detail = " ".join((r.stderr or r.stdout).split())[:200]
        raise IsolationError(f"cannot create worker_user {name!r}: useradd: {detail}")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


# --- files ------------------------------------------------------------------------------


def _can(st: os.stat_result, user: WorkerUser, bits: int) -> bool:
    """May ``user`` do ``bits`` (an ``rwx`` triple as 4/2/1) to a file with ``st``?"""
    if st.st_uid == user.uid:
        return bool(st.st_mode >> 6 & bits == bits)
    if st.st_gid == user.gid:
        return bool(st.st_mode >> 3 & bits == bits)
    return bool(st.st_mode & bits == bits)


def searchable_by(path: Path, user: WorkerUser) -> bool:
    """Can ``user`` traverse every directory from / down to ``path`` (included)?"""
    path = Path(path).resolve()
    for d in [*reversed(path.parents), path]:
        try:
            st = os.stat(d)
        except OSError:
            return False
        if not _can(st, user, 1):
            return False
    return True


def _private(path: Path, user: WorkerUser, tightened: list[str]) -> None:
    """``path`` (a directory of secrets) and the secrets in it: the agent's alone."""
    st = os.stat(path)
    if st.st_uid == user.uid:
        raise IsolationError(f"{path} belongs to the worker user {user.name}: chown it to "
                             "the agent's user")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
        tightened.append(str(path))
    for name in sorted(PRIVATE):
        f = path / name
        try:
            fst = os.stat(f)
        except FileNotFoundError:
            continue
        if fst.st_uid == user.uid or _can(fst, user, 4):
            raise IsolationError(f"{f} is readable by the worker user {user.name}: "
                                 f"chown it to the agent's user and chmod 600 it")


def _closed_below(directory: Path, keep: Iterable[str], tightened: list[str]) -> None:
    """Take group and other access off every entry of ``directory`` but ``keep``."""
    for entry in os.scandir(directory):
        if entry.name in keep:
            continue
        with contextlib.suppress(FileNotFoundError):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
                continue
            os.chmod(entry.path, stat.S_IMODE(st.st_mode) & ~0o077)
            tightened.append(entry.path)


# --- cgroups ----------------------------------------------------------------------------


class CgroupError(OSError):
    """A cgroup cannot be set up or cleared (an OSError: callers treat both alike)."""


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _write(path: Path, text: str) -> None:
    # One write(2) per value, as cgroupfs wants.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)  # as `echo v > file`
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _unescape(field_: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and field_[i + 1:i + 4].isdigit() and i + 4 <= len(field_):
            out.append(chr(int(field_[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class _Mount:
    root: str
    point: Path
    fstype: str
    options: frozenset[str]


def parse_mountinfo(text: str) -> list[_Mount]:
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        a, b = left.split(), right.split()
        if len(a) < 5 or len(b) < 3:
            continue
        out.append(_Mount(_unescape(a[3]), Path(_unescape(a[4])), b[0],
                          frozenset(b[2].split(","))))
    return out


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller: path}; the v2 entry is under ``""``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for c in controllers.split(",") if controllers else [""]:
            out.setdefault(c, path)
    return out


def _dir_of(mount: _Mount, path: str) -> Path | None:
    """The directory of cgroup ``path`` under ``mount`` (None: outside what it shows)."""
    root = mount.root.rstrip("/")
    if root and not (path == root or path.startswith(root + "/")):
        return None
    rel = path[len(root):].lstrip("/")
    return mount.point / rel if rel else mount.point


@dataclass
class WorkerCgroup:
    """One worker's cgroup: the same directory for both controllers (v2), or one per
    hierarchy (v1)."""

    version: int
    memory: Path | None
    cpu: Path | None
    limit_bytes: int | None = None
    """The memory limit set for the task now running (None: none)."""
    files: dict[tuple[Path, int], int] = field(default_factory=dict, repr=False,
                                               compare=False)
    """The control files read or written before each task, kept open (closed by
    ``remove``): reading one with ``pread`` or writing it takes a few microseconds, while
    opening and closing a cgroupfs file took 40-110 µs on this project's test host, four
    to six times on the way of every task (a stream operator's batches go one after
    another at the record rate: issue 23)."""
    memsw: bool | None = None
    """v1: whether swap is accounted (``memory.memsw.*`` exists), looked up once."""
    cpu_set: int | None = None
    """The CPU quota (µs per ``CPU_PERIOD_US``; -1: none) last written here, so a task
    with the same ``cpus`` as the one before it costs no cpu writes (two files on v1,
    28-36 µs each on this project's test host, on the way of every task: issue #19).
    Only the node writes these files (the worker's user cannot)."""
    memory_none: bool = False
    """The memory limit last written here is none (``-1``/``max``): a task with no
    memory limit after one with none costs no memory writes (one or two files on the
    way of every task: issue 23). A limit is written again only when it differs from
    the last one (``memory_set``: it is over the cgroup's usage then)."""
    memory_set: int | None = None
    """The memory limit (bytes) last written here, when it was one (None: none, or not
    known to be written): a task given the same limit as the task before it costs no
    memory writes (the pool rounds the usage it adds ``memory_mb`` to up to a MiB, so a
    worker whose usage stays within one MiB between tasks gets the same limit: issue
    #19, one to two writes of a cgroupfs file per task)."""
    paths: dict[str, Path] = field(default_factory=dict, repr=False, compare=False)
    """The control files' paths by name (each controller's files have their own names),
    made once: a path built and hashed anew cost more than the read or write (issue 23)."""

    def _path(self, d: Path, name: str) -> Path:
        p = self.paths.get(name)
        if p is None:
            p = self.paths[name] = d / name
        return p

    def _get(self, path: Path) -> str:
        """The content of control file ``path`` (kept open)."""
        key = (path, os.O_RDONLY)
        fd = self._open(key)
        try:
            return os.pread(fd, 4096, 0).decode()
        except OSError:
            self._close(key)
            raise

    def _set(self, path: Path, text: str) -> None:
        """Write ``text`` to control file ``path`` (kept open) in one write(2), as
        cgroupfs wants, after a truncate (as ``echo v > file``: a no-op on cgroupfs)."""
        key = (path, os.O_WRONLY)
        fd = self._open(key)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
        except OSError:
            self._close(key)
            raise

    def _open(self, key: tuple[Path, int]) -> int:
        fd = self.files.get(key)
        if fd is None:
            fd = os.open(key[0], key[1] | os.O_CLOEXEC)
            self.files[key] = fd
        return fd

    def _close(self, key: tuple[Path, int]) -> None:
        fd = self.files.pop(key, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close_files(self) -> None:
        """Close the control files kept open."""
        for key in list(self.files):
            self._close(key)

    def dirs(self) -> list[Path]:
        return list(dict.fromkeys(d for d in (self.memory, self.cpu) if d is not None))

    def attach(self, pid: int) -> None:
        for d in self.dirs():
            _write(d / "cgroup.procs", str(pid))

    def memory_bytes(self) -> int:
        """What the cgroup's processes use now (page cache included), 0 if unknown."""
        if self.memory is None:
            return 0
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        try:
            return int(self._get(self._path(self.memory, name)).strip() or 0)
        except (OSError, ValueError):
            return 0

    def set_limits(self, memory_bytes: int | None, cpus: float | None) -> None:
        if self.memory is not None and not (memory_bytes is None and self.memory_none) and not (
                memory_bytes is not None and memory_bytes == self.memory_set):
            self.limit_bytes = memory_bytes
            # Until written: a failed write is tried again.
            self.memory_none, self.memory_set = False, None
            if self.version == 2:
                self._set(self._path(self.memory, "memory.max"),
                          "max" if memory_bytes is None else str(memory_bytes))
            else:
                self._v1_memory(memory_bytes)
            self.memory_none, self.memory_set = memory_bytes is None, memory_bytes
        if self.cpu is not None:
            quota = None if cpus is None else max(1000, int(cpus * CPU_PERIOD_US))
            key = -1 if quota is None else quota
            if key == self.cpu_set:
                return
            self.cpu_set = None  # until written: a failed write is tried again
            if self.version == 2:
                self._set(self._path(self.cpu, "cpu.max"),
                          f"{'max' if quota is None else quota} {CPU_PERIOD_US}")
            else:
                self._set(self._path(self.cpu, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
                self._set(self._path(self.cpu, "cpu.cfs_quota_us"),
                          "-1" if quota is None else str(quota))
            self.cpu_set = key

    def _v1_memory(self, limit: int | None) -> None:
        assert self.memory is not None
        value = "-1" if limit is None else str(limit)
        mem = self._path(self.memory, "memory.limit_in_bytes")
        memsw = self._path(self.memory, "memory.memsw.limit_in_bytes")
        if self.memsw is None:
            self.memsw = memsw.exists()
        if not self.memsw:  # no swap accounting: the memory limit is what there is
            self._set(mem, value)
            return
        # memsw (memory + swap) may never be below the memory limit: the order depends on
        # whether the limit goes up or down.
        try:
            self._set(mem, value)
            self._set(memsw, value)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._set(memsw, value)
            self._set(mem, value)

    def oom_kills(self) -> int:
        """Processes the kernel killed here for going over the memory limit, so far."""
        if self.memory is None:
            return 0
        name, key = (("memory.events", "oom_kill") if self.version == 2
                     else ("memory.oom_control", "oom_kill"))
        try:
            for line in self._get(self._path(self.memory, name)).splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
        except (OSError, ValueError):
            pass
        return 0

    def pids(self) -> list[int]:
        out: set[int] = set()
        for d in self.dirs():
            with contextlib.suppress(OSError, ValueError):
                out.update(int(p) for p in _read(d / "cgroup.procs").split())
        return sorted(out)

    def kill_all(self) -> None:
        """SIGKILL whatever still runs here (a task's stray children, a stale worker)."""
        if self.version == 2 and self.memory is not None and (self.memory / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(self.memory / "cgroup.kill", "1")
                return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """rmdir the cgroup; False while processes are left in it (try again later)."""
        self.close_files()
        done = True
        for d in self.dirs():
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                done = False
        return done


@dataclass
class Cgroups:
    """The per-node parent cgroup(s) the workers' cgroups are made in."""

    version: int
    memory: Path | None
    cpu: Path | None
    made: list[Path] = field(default_factory=list)
    """Parent directories this node made (removed by ``close``)."""
    held: list[int] = field(default_factory=list)
    """Open descriptors of the parents, each with a shared ``flock``: this node is alive
    (``_sweep_stale`` leaves a locked parent alone; the kernel drops the lock with the
    process, so a crashed node's parent is swept)."""

    def worker(self, name: str) -> WorkerCgroup:
        """Make (or clear and reuse) the cgroup ``name`` for one worker."""
        cg = WorkerCgroup(self.version, None if self.memory is None else self.memory / name,
                          None if self.cpu is None else self.cpu / name)
        if any(d.exists() for d in cg.dirs()):
            _clear(cg)
        for d in cg.dirs():
            _mkdir(d)
        if self.version == 2 and cg.memory is not None:
            with contextlib.suppress(FileNotFoundError):
                _write(cg.memory / "memory.oom.group", "1")  # the task's children go too
            with contextlib.suppress(FileNotFoundError):
                _write(cg.memory / "memory.swap.max", "0")
        return cg

    def describe(self) -> str:
        parts = []
        if self.memory is not None:
            parts.append(f"memory in {self.memory}")
        if self.cpu is not None and self.cpu != self.memory:
            parts.append(f"cpu in {self.cpu}")
        elif self.cpu is not None:
            parts[-1] = f"memory and cpu in {self.memory}"
        return f"cgroup v{self.version}: " + ", ".join(parts)

    def close(self) -> None:
        """Remove the per-node parents (their worker cgroups must be gone first) and
        release their locks."""
        for d in reversed(self.made):
            with contextlib.suppress(OSError):
                _clear_children(d)
                os.rmdir(d)
        self.made.clear()
        for fd in self.held:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.held.clear()


def _hold(parent: Path) -> int:
    """A shared ``flock`` on ``parent`` (a directory), held while the descriptor is open."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _held_by_a_live_node(parent: Path) -> bool:
    """Whether a running node holds ``parent``'s lock (``_hold``)."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _mkdir(d: Path) -> None:
    """A cgroup directory anyone may look into (0755, as systemd makes them, whatever the
    agent's umask): task code, and the runtimes it uses, read their limits there. Only
    root writes its files."""
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o755)


def _clear(cg: WorkerCgroup) -> None:
    deadline = time.monotonic() + KILL_WAIT_S
    while True:
        cg.kill_all()
        if cg.remove():
            return
        if time.monotonic() > deadline:
            raise CgroupError(f"cannot clear {cg.dirs()[0]}: processes {cg.pids()} do not die")
        time.sleep(0.02)


def _clear_children(parent: Path, version: int | None = None) -> None:
    for entry in os.scandir(parent):
        if entry.is_dir(follow_symlinks=False):
            d = Path(entry.path)
            _clear(WorkerCgroup(version or 1, d, None))


def _has_processes(parent: Path) -> bool:
    for d in [parent, *(Path(e.path) for e in os.scandir(parent) if e.is_dir())]:
        if _read(d / "cgroup.procs").split():
            return True
    return False


def _sweep_stale(base: Path, keep: str) -> None:
    """Remove the parents of other nodes that crashed and never came back: empty (no
    process in them or their workers' cgroups) for ``STALE_AFTER_S`` and not locked. A
    live node holds its parent's lock (``_hold``; its workers may be stopped, on
    standby), and it removes the parent itself when it stops."""
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for e in entries:
        if not e.name.startswith(CGROUP_PREFIX) or e.name == keep:
            continue
        with contextlib.suppress(OSError):
            if (not e.is_dir(follow_symlinks=False)
                    or time.time() - e.stat().st_mtime < STALE_AFTER_S
                    or _has_processes(Path(e.path))
                    or _held_by_a_live_node(Path(e.path))):
                continue
            _clear_children(Path(e.path))
            _remove(_temp_work_dir(e.name))  # its workers' directory, if it had to be there
            os.rmdir(e.path)


def node_cgroup_name(node: str, data_dir: Path) -> str:
    """Unique per data dir (one live agent each, by the store's lock), readable by name."""
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:10]
    return f"{CGROUP_PREFIX}{node}-{digest}"


def open_cgroups(name: str, *, mountinfo: str | None = None, proc_cgroup: str | None = None
                 ) -> tuple[Cgroups | None, str]:
    """Make the per-node parent cgroup ``name`` beside this process's own cgroup (v2 if
    its memory and cpu controllers are there, else v1), clearing a stale one left by a
    crash. Returns it (None when no cgroup can be used) and a sentence saying which."""
    try:
        mounts = parse_mountinfo(mountinfo if mountinfo is not None
                                 else _read(Path("/proc/self/mountinfo")))
        mine = parse_proc_cgroup(proc_cgroup if proc_cgroup is not None
                                 else _read(Path("/proc/self/cgroup")))
    except OSError as e:
        return None, f"no cgroups: cannot read /proc ({e.strerror or e})"
    why: list[str] = []
    v2 = _open_v2(name, mounts, mine, why)
    if v2 is not None:
        return v2, v2.describe()
    v1 = _open_v1(name, mounts, mine, why)
    if v1 is not None:
        missing = "" if v1.cpu is not None and v1.memory is not None else (
            "; no cpu limit (no usable cpu controller)" if v1.cpu is None
            else "; no memory cgroup (limited by RLIMIT_AS instead)")
        return v1, v1.describe() + missing
    return None, "no usable cgroup (" + "; ".join(why or ["no cgroup file system"]) + ")"


def _open_v2(name: str, mounts: list[_Mount], mine: dict[str, str], why: list[str]
             ) -> Cgroups | None:
    mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if mount is None or "" not in mine:
        return None
    base = _dir_of(mount, mine[""])
    if base is None:
        why.append(f"v2: this process's cgroup {mine['']} is not under {mount.point}")
        return None
    try:
        available = _read(base / "cgroup.controllers").split()
    except OSError as e:
        why.append(f"v2: {base}: {e.strerror or e}")
        return None
    wanted: list[str] = [c for c in ("memory", "cpu") if c in available]
    if not wanted:
        why.append(f"v2 at {mount.point}: no memory or cpu controller in {base}")
        return None
    try:
        _enable(base, wanted)
        _sweep_stale(base, name)
        parent = base / name
        made = not parent.exists()
        if not made:
            _clear_children(parent, 2)
        _mkdir(parent)
        _enable(parent, wanted)
        held = [_hold(parent)]
    except OSError as e:
        why.append(f"v2 at {base}: {getattr(e, 'strerror', None) or e}")
        return None
    return Cgroups(2, parent if "memory" in wanted else None,
                   parent if "cpu" in wanted else None, [parent], held)


def _enable(cg: Path, controllers: list[str]) -> None:
    """Let ``cg``'s children use ``controllers`` (v2 ``cgroup.subtree_control``)."""
    have = _read(cg / "cgroup.subtree_control").split()
    missing = [c for c in controllers if c not in have]
    if not missing:
        return
    text = " ".join("+" + c for c in missing)
    try:
        _write(cg / "cgroup.subtree_control", text)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        # v2 lets only a cgroup without processes of its own give controllers to its
        # children. Alone in it (systemd with Delegate=yes), the agent moves itself into
        # a leaf; with others there (a shell, a test runner) it cannot.
        procs = _read(cg / "cgroup.procs").split()
        if procs != [str(os.getpid())]:
            raise CgroupError(
                f"{cg} also holds {len(procs) - 1} other process(es), so its children "
                "cannot be given memory/cpu limits; run the agent in a cgroup of its own "
                "(systemd: Delegate=yes)") from None
        leaf = cg / "agent"
        _mkdir(leaf)
        _write(leaf / "cgroup.procs", str(os.getpid()))
        _write(cg / "cgroup.subtree_control", text)


def _open_v1(name: str, mounts: list[_Mount], mine: dict[str, str], why: list[str]
             ) -> Cgroups | None:
    parents: dict[str, Path] = {}
    made: list[Path] = []
    held: list[int] = []
    for controller in ("memory", "cpu"):
        mount = next((m for m in mounts if m.fstype == "cgroup" and controller in m.options),
                     None)
        if mount is None or controller not in mine:
            why.append(f"v1: no {controller} hierarchy")
            continue
        base = _dir_of(mount, mine[controller])
        if base is None:
            why.append(f"v1: this process's {controller} cgroup is not under {mount.point}")
            continue
        parent = base / name
        _sweep_stale(base, name)
        try:
            if parent.exists():
                _clear_children(parent, 1)
            else:
                _mkdir(parent)
            # A worker cgroup must be writable too: try one now, not at the first task.
            probe = parent / "probe"
            probe.mkdir(exist_ok=True)
            os.rmdir(probe)
            held.append(_hold(parent))
        except OSError as e:
            why.append(f"v1 {controller} at {base}: {getattr(e, 'strerror', None) or e}")
            continue
        parents[controller] = parent
        made.append(parent)
    if not parents:
        for fd in held:
            os.close(fd)
        return None
    return Cgroups(1, parents.get("memory"), parents.get("cpu"), made, held)


def own_limits() -> dict[str, float | int | str | None]:
    """The memory limit (bytes) and CPU quota (cpus) of this process's cgroup, as task
    code sees them (None: no limit, or no cgroup), and the cgroup's memory directory."""
    mounts = parse_mountinfo(_read(Path("/proc/self/mountinfo")))
    mine = parse_proc_cgroup(_read(Path("/proc/self/cgroup")))
    out: dict[str, float | int | str | None] = {"memory_bytes": None, "cpus": None,
                                                "memory_dir": None}
    v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
    mem = next((m for m in mounts if m.fstype == "cgroup" and "memory" in m.options), None)
    cpu = next((m for m in mounts if m.fstype == "cgroup" and "cpu" in m.options), None)
    if mem is not None and "memory" in mine:
        d = _dir_of(mem, mine["memory"])
        if d is not None:
            out["memory_dir"] = str(d)
            value = int(_read(d / "memory.limit_in_bytes"))
            out["memory_bytes"] = None if value >= 1 << 62 else value
    elif v2 is not None and "" in mine:
        d = _dir_of(v2, mine[""])
        if d is not None and (d / "memory.max").exists():
            out["memory_dir"] = str(d)
            text = _read(d / "memory.max").strip()
            out["memory_bytes"] = None if text == "max" else int(text)
    if cpu is not None and "cpu" in mine:
        d = _dir_of(cpu, mine["cpu"])
        if d is not None:
            quota = int(_read(d / "cpu.cfs_quota_us"))
            period = int(_read(d / "cpu.cfs_period_us"))
            out["cpus"] = None if quota < 0 else quota / period
    elif v2 is not None and "" in mine:
        d = _dir_of(v2, mine[""])
        if d is not None and (d / "cpu.max").exists():
            q, _, p = _read(d / "cpu.max").partition(" ")
            out["cpus"] = None if q == "max" else int(q) / int(p)
    return out


# --- all of it ----------------------------------------------------------------------------


@dataclass
class Isolation:
    """What the agent set up for its workers (``PoolConfig.isolation``)."""

    user: WorkerUser | None = None
    work_dir: Path | None = None
    """The workers' working directory (only with ``user``)."""
    cgroups: Cgroups | None = None
    links_reachable: bool = True
    """Can workers open input objects linked under the data dir (else: by value)?"""
    statements: list[str] = field(default_factory=list)

    def close(self) -> None:
        if self.cgroups is not None:
            self.cgroups.close()
        if self.work_dir is not None:
            with contextlib.suppress(OSError):
                _remove(self.work_dir)


def _temp_work_dir(cgroup_name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"{cgroup_name}-work"


def _remove(path: Path) -> None:
    """Remove what is at ``path``, never following a symbolic link (the worker user can
    write there: it may have put one)."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # fd-based: does not follow links inside
        else:
            os.unlink(path)


def _fresh_dir(path: Path, user: WorkerUser) -> None:
    """An empty directory at ``path`` that only ``user`` may use (a previous run's goes)."""
    _remove(path)
    os.mkdir(path, 0o700)  # fails if someone put something back meanwhile
    os.chown(path, user.uid, user.gid, follow_symlinks=False)


def prepare(*, worker_user: str | None, create_worker_user: bool, bundle_dir: Path,
            data_dir: Path, cgroup_name: str,
            log: Callable[..., None] | None = None) -> Isolation:
    """Set up isolation for this node's workers (see the module docstring); raise
    ``IsolationError`` when what was asked for cannot be had safely."""
    user, said = resolve_worker_user(worker_user, create=create_worker_user)
    iso = Isolation(user=user, statements=[said])
    tightened: list[str] = []
    if user is not None:
        os.umask(0o077)  # whatever the agent writes from now on is its own
        _private(Path(bundle_dir), user, tightened)
        data = Path(data_dir)
        st = os.stat(data)
        if st.st_uid == user.uid:
            raise IsolationError(f"{data} belongs to the worker user {user.name}: chown it "
                                 "to the agent's user")
        _closed_below(data, {WORK_DIR, "store"}, tightened)
        os.chmod(data, 0o711)  # traverse only: reach the links and work dirs by name
        iso.links_reachable = searchable_by(data, user)
        if iso.links_reachable:
            iso.work_dir = data / WORK_DIR
        else:
            iso.statements.append(
                f"a directory above {data} is closed to {user.name}: input objects are "
                "given to workers by value, not linked, and their working directory is "
                "in the temp dir")
            iso.work_dir = _temp_work_dir(cgroup_name)
        _fresh_dir(iso.work_dir, user)
    iso.cgroups, said = open_cgroups(cgroup_name)
    iso.statements.append(said)
    if log is not None:
        if tightened:
            log("warning", "permissions_tightened", paths=tightened[:20])
        degraded = user is None or iso.cgroups is None
        log("warning" if degraded else "info", "isolation",
            worker_user=None if user is None else user.name,
            cgroups=None if iso.cgroups is None else f"v{iso.cgroups.version}",
            statement="; ".join(iso.statements))
    return iso
