"""A node's durable local storage: immutable objects as files, index and KV in SQLite.

    <data_dir>/objects/ab/cd/b3-abcd...    one file per object, named by its BLAKE3-256
                                           (objects of up to ``inline_max_bytes``: none,
                                           their bytes are in the index, ``obj_inline``)
    <data_dir>/tmp/<random>.part           objects being written; removed on open
    <data_dir>/links/<random>.in           links to objects read by local tasks; removed on open
    <data_dir>/meta.sqlite3                object index, KV (WAL, synchronous=FULL)
    <data_dir>/storage.lock                flock: one LocalStore per data dir

With ``StorageConfig.link_group`` (task workers run as another user, see
``runtime/isolation.py``), ``<data_dir>`` and ``links/`` are traverse-only (0711), every
other entry is the agent's alone, and each link is readable by that group: a worker can
open the link it was given, by name, and nothing else here.

An object becomes visible only through its index row, and the row is written last: the
bytes go to a temp file (hashed as they stream in, never held whole), the file is fsynced,
its hash checked, renamed into place, the directory fsynced, and only then is the row
committed. A crash at any point leaves either nothing visible or the whole object, never a
half-written one that looks whole; a crash between rename and row leaves an orphan file
that nothing serves (``sweep_orphans`` reclaims it). When ``commit`` returns, the object
survives a power cut, so a replica may be acknowledged then and not before.

A small object (``StorageConfig.inline_max_bytes``, size declared up front) has no file:
its bytes are held in memory (hashed as they come), checked against the id, and committed
with its index row in one SQLite transaction (table ``obj_inline``), so the WAL's one fsync
makes it durable and visible at once, whole or not at all, where a file costs the file's
fsync, its directory's and those of any fan-out directory made for it, then the row's
(issue #19: about 4.5 fsyncs per small copy here, one inline). Reads serve both kinds
alike; ``link_copy`` writes an inline object out to its link.

Deletes go the other way: the row first, then the file. Bounds (object size, total bytes,
free disk left, concurrent writers, KV key and value sizes) are checked and refused with a
``StorageError`` whose ``reason`` is a short machine word and whose message names the bound.

Everything is synchronous and safe to call from several threads (e.g. ``asyncio.to_thread``):
the SQLite connection and the publish step are behind one lock, byte counters behind
another. A single ``ObjectWriter`` belongs to one thread at a time.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import fcntl
import io
import json
import math
import os
import secrets
import sqlite3
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final

from meshscale.core.kv import MAX_KEY_BYTES, MAX_VALUE_BYTES, cas_matches
from meshscale.core.objects import OBJECT_ID_PREFIX, OBJECT_ID_RE, new_hasher, object_id

__all__ = [
    "OBJECT_ID_PREFIX",
    "LocalStore",
    "ObjectMeta",
    "ObjectWriter",
    "StorageConfig",
    "StorageError",
    "object_id_of",
]


MAX_KV_KEY_BYTES: Final = MAX_KEY_BYTES
MAX_KV_VALUE_BYTES: Final = MAX_VALUE_BYTES
MAX_KV_TS_BYTES: Final = 512
KV_ROW_OVERHEAD_BYTES: Final = 4096
"""What a KV write may add beyond its bytes (index, WAL frame, page slack), for the
free-space check."""
MAX_PAGE: Final = 10_000
"""Largest ``limit`` a listing call honours; larger requests are clipped."""
MAX_META_FIELD_BYTES: Final = 4096
"""Bound on data_class, hint_for and the encoded residency list of one object."""
MAX_INLINE_BYTES: Final = 1024 * 1024
"""Largest ``StorageConfig.inline_max_bytes``: an inline object is held whole in memory
while it is written and read."""

OBJECTS_DIR: Final = "objects"
TMP_DIR: Final = "tmp"
LINKS_DIR: Final = "links"
LINK_SUFFIX: Final = ".in"
DB_FILE: Final = "meta.sqlite3"
LOCK_FILE: Final = "storage.lock"
TMP_SUFFIX: Final = ".part"
SCHEMA_VERSION: Final = 6
"""6: ``obj_inline`` (small objects' bytes in the index: an older meshscale would take
their rows for copies whose file is missing); 5: ``obj_tombstones.moved``; 4: ``kv_hints`` (KV hinted handoff); 3: object ids are BLAKE3 (``b3-``); 2: HLC write
stamps; 1: the first."""
_FIRST_BLAKE3_SCHEMA: Final = 3
"""2: ``objects.written`` and the ``obj_tombstones`` table (explicit deletes)."""

_NO_SPACE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS objects (
    id         TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    replicas   INTEGER NOT NULL,
    data_class TEXT,
    residency  TEXT,
    hint_for   TEXT,
    created    REAL NOT NULL,
    pinned     INTEGER NOT NULL,
    expires    REAL,
    written    TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_hint ON objects(hint_for) WHERE hint_for IS NOT NULL;
CREATE INDEX IF NOT EXISTS objects_expires ON objects(expires)
    WHERE expires IS NOT NULL AND pinned = 0;
CREATE TABLE IF NOT EXISTS obj_inline (
    id   TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS obj_tombstones (
    id         TEXT PRIMARY KEY,
    ts         TEXT NOT NULL,
    replicas   INTEGER NOT NULL,
    data_class TEXT,
    residency  TEXT,
    moved      INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY,
    value BLOB,
    ts    TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv_hints (
    key    TEXT NOT NULL,
    target TEXT NOT NULL,
    ts     TEXT NOT NULL,
    since  REAL NOT NULL,
    PRIMARY KEY (key, target)
) WITHOUT ROWID;
"""

_META_COLUMNS: Final = (
    "id, size, replicas, data_class, residency, hint_for, created, pinned, expires, written"
)


_HINT_UPSERT: Final = (
    "INSERT INTO kv_hints (key, target, ts, since) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(key, target) DO UPDATE SET ts = max(kv_hints.ts, excluded.ts), "
    "since = min(kv_hints.since, excluded.since)"
)


def _check_hint_target(target: object) -> str:
    """A hint's target: a node name ('' for a watched write), bounded."""
    if not isinstance(target, str) or len(target) > 256:
        raise ValueError(f"a KV hint target is a node name, not {target!r:.80}")
    return target


class StorageError(Exception):
    """A storage operation was refused or failed; ``reason`` is one of

    ``disk_full``, ``quota``, ``hash_mismatch``, ``too_large``, ``not_found``, ``corrupt``,
    ``bad_id``, ``busy``, ``old_format``; the message is one line that names the object or
    the bound.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ObjectMeta:
    object_id: str
    size: int
    replicas: int
    data_class: str | None
    residency: tuple[str, ...] | None
    hint_for: str | None
    """Set when we hold the object only on behalf of that node (hinted handoff)."""
    created: float
    pinned: bool
    expires: float | None
    """With ``pinned`` False, the object is a GC candidate once ``now >= expires``."""
    written: str | None = None
    """Encoded HLC timestamp of the newest write of these bytes that reached this node
    (None: unknown, older than any delete). A delete stamped later kills this copy."""


@dataclass(frozen=True)
class StorageConfig:
    max_object_bytes: int = 8 * 1024**3
    max_total_bytes: int | None = None
    """Quota on the bytes of all objects, committed plus in flight; None = disk only."""
    min_free_bytes: int = 256 * 1024**2
    """Refuse a write that would leave less free disk space than this."""
    chunk_bytes: int = 1024 * 1024
    """Read size of ``read_chunks``; free space is re-checked every this many bytes written."""
    max_concurrent_writes: int = 64
    writeback_bytes: int = 4 * 1024 * 1024
    """Every this many bytes written, the kernel is asked to start writing them to disk
    (Linux ``sync_file_range``, as RocksDB's ``bytes_per_sync``), so the fsync at commit
    waits only for the tail instead of the whole object (64 MB: ~33 ms -> ~0.3 ms here).
    Durability still comes from that fsync alone. 0 turns it off."""
    inline_max_bytes: int = 16 * 1024
    """Objects of at most this many bytes (declared when their write starts) are kept in
    the index database, in the same transaction as their row, instead of as a file of
    their own: one fsync per copy instead of three to five (see the module docstring).
    0 keeps every object as a file."""
    link_group: int | None = None
    """Group (gid) that may read the links made by ``link_copy`` (the task workers' group
    when they run as another user); None: the store is the agent's alone."""

    def __post_init__(self) -> None:
        if self.max_object_bytes < 0:
            raise ValueError(f"max_object_bytes must be >= 0, not {self.max_object_bytes}")
        if self.max_total_bytes is not None and self.max_total_bytes < 0:
            raise ValueError(f"max_total_bytes must be >= 0, not {self.max_total_bytes}")
        if self.min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, not {self.min_free_bytes}")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, not {self.chunk_bytes}")
        if not 0 <= self.inline_max_bytes <= MAX_INLINE_BYTES:
            raise ValueError(f"inline_max_bytes must be in [0, {MAX_INLINE_BYTES}], "
                             f"not {self.inline_max_bytes}")
        if self.writeback_bytes < 0:
            raise ValueError(f"writeback_bytes must be >= 0, not {self.writeback_bytes}")
        if self.max_concurrent_writes < 1:
            raise ValueError(
                f"max_concurrent_writes must be >= 1, not {self.max_concurrent_writes}"
            )


def object_id_of(data: bytes) -> str:
    """The id of an object with these bytes (``core.objects.object_id``)."""
    return object_id(data)


def _check_id(object_id: object) -> str:
    # Before any path is built from it: an id is exactly prefix + 64 lowercase hex digits.
    if not isinstance(object_id, str) or OBJECT_ID_RE.fullmatch(object_id) is None:
        raise StorageError("bad_id", f"not an object id: {object_id!r:.100}")
    return object_id


def _write_all(fd: int, data: memoryview) -> None:
    """os.write until all of ``data`` is written (a module function so tests can fail it)."""
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _writeback_starter() -> Callable[[int, int, int], None] | None:
    """``start(fd, offset, length)``: begin writing that range of a file to disk without
    waiting (``sync_file_range(SYNC_FILE_RANGE_WRITE)``); None where there is no such
    call. A hint only: its errors are ignored (the fsync at commit reports them)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    return start


_SYNC_FILE_RANGE_WRITE: Final = 2
_start_writeback = _writeback_starter()


def _raise_if_full(object_id: str, e: BaseException) -> None:
    """Raise ``disk_full`` for a commit of ``object_id`` that failed for want of room."""
    if _is_no_space(e):
        raise StorageError("disk_full", f"disk full committing {object_id}: {e}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clip(limit: int) -> int:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    return min(limit, MAX_PAGE)


def _prefix_upper(prefix: str) -> str | None:
    """The smallest string above every string that starts with ``prefix`` (None: no bound)."""
    chars = list(prefix)
    while chars:
        c = ord(chars.pop()) + 1
        if c == 0xD800:  # surrogates cannot be stored; the next code point is U+E000
            c = 0xE000
        if c <= 0x10FFFF:
            return "".join(chars) + chr(c)
    return None


def _is_no_space(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in _NO_SPACE_ERRNOS
    if isinstance(e, sqlite3.OperationalError):
        return "full" in str(e).lower()
    return False


def _text_field(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, not {type(value).__name__}")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_META_FIELD_BYTES:
        raise StorageError("too_large", f"{name} is longer than {MAX_META_FIELD_BYTES} bytes")
    return value


class ObjectWriter:
    """Streams one object to disk; see ``LocalStore.writer``.

    ``write`` hashes and appends each chunk, checking size, quota and free space as it goes;
    on any failure the writer aborts itself (temp file removed) before raising. ``commit``
    makes the object durable and visible. As a context manager, leaving the block without
    ``commit`` (normally or by an exception) aborts.

    An inline writer (no ``tmp_path``: a small object, see ``inline_max_bytes``) keeps the
    bytes in memory instead of a temp file; its ``write`` does no I/O.
    """

    def __init__(
        self,
        store: LocalStore,
        tmp_path: Path | None,
        fd: int | None,
        *,
        declared_size: int | None,
        replicas: int,
        data_class: str | None,
        residency: tuple[str, ...] | None,
        hint_for: str | None,
        pinned: bool,
        created: float,
        expires: float | None,
        written: str | None = None,
    ) -> None:
        self._store = store
        self.written_ts = written
        """Encoded HLC timestamp of the write (see ``ObjectMeta.written``); settable
        until ``commit``."""
        self._tmp_path = tmp_path
        self._fd: int | None = fd
        self._buf: bytearray | None = bytearray() if tmp_path is None else None
        self._inline = tmp_path is None
        self._hash = new_hasher()
        self._declared = declared_size
        self._replicas = replicas
        self._data_class = data_class
        self._residency = residency
        self._hint_for = hint_for
        self._pinned = pinned
        self._created = created
        self._expires = expires
        self.written = 0
        """Bytes written so far."""
        self.reserved = declared_size or 0
        """Bytes counted against the quota for this writer (max of declared and written)."""
        self._outstanding = declared_size or 0  # declared, not yet admitted
        self._unchecked = 0
        self._unsynced = 0
        """Bytes written since writeback was last started (see ``writeback_bytes``)."""
        self._done = False
        self._hash_deferred = False
        self._early_writeback = True

    @property
    def closed(self) -> bool:
        return self._done

    @property
    def inline(self) -> bool:
        """The bytes go to the index, not a file: ``write`` does no I/O (no thread needed)."""
        return self._inline

    def defer_hash(self) -> None:
        """Hash the bytes at ``commit`` (reading the file back) instead of as they are
        written: for a copy that will most likely be aborted, never committed (a put's
        coordinator outside the object's replica set keeps one only in case a member's
        copy fails). Its bytes are not sent to the disk ahead of ``commit`` either (no
        ``writeback_bytes`` hint): aborted, they mostly never reach it; committed, its
        fsync writes them. Call before the first ``write``."""
        if self.written:
            raise ValueError("defer_hash after bytes were written")
        self._hash_deferred = True
        self._early_writeback = False

    def _rehash(self) -> None:
        if not self._hash_deferred:
            return
        h = new_hasher()
        if self._buf is not None:
            h.update(self._buf)
            self._hash = h
            self._hash_deferred = False
            return
        assert self._tmp_path is not None
        with open(self._tmp_path, "rb", buffering=0) as f:
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
        self._hash = h
        self._hash_deferred = False

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._done:
            raise ValueError("write to a committed or aborted ObjectWriter")
        view = memoryview(chunk).cast("B")
        n = len(view)
        if n == 0:
            return
        if self._buf is not None:
            try:
                self._store._admit_bytes(self, n)
            except BaseException:
                self.abort()
                raise
            self._buf += view
            if not self._hash_deferred:
                self._hash.update(view)
            self.written += n
            return
        assert self._fd is not None
        try:
            self._store._admit_bytes(self, n)
            try:
                _write_all(self._fd, view)
            except OSError as e:
                if _is_no_space(e):
                    raise StorageError(
                        "disk_full",
                        f"disk full writing object at {self.written} bytes: {e.strerror or e}",
                    ) from None
                if e.errno == errno.EFBIG:
                    raise StorageError(
                        "too_large", f"file too large at {self.written} bytes: {e.strerror}"
                    ) from None
                raise
        except BaseException:
            self.abort()
            raise
        if not self._hash_deferred:
            self._hash.update(view)
        self.written += n
        self._unsynced += n
        every = self._store.config.writeback_bytes
        if (every and self._unsynced >= every and self._early_writeback
                and _start_writeback is not None):
            _start_writeback(self._fd, self.written - self._unsynced, self._unsynced)
            self._unsynced = 0

    def peek_id(self) -> str:
        """The id of the bytes written so far (the object's id once all are written)."""
        if self._hash_deferred and not self._done:
            self._rehash()  # and from now on as they are written
        return OBJECT_ID_PREFIX + self._hash.hexdigest()

    def narrow_residency(self, residency: tuple[str, ...]) -> None:
        """Store the object under this residency rule instead of the one it was opened
        with (before ``commit``): its class was narrowed while the bytes arrived."""
        if self._done:
            raise ValueError("narrow_residency of a committed or aborted ObjectWriter")
        self._residency = tuple(residency)

    def commit(self, expected_id: str | None = None) -> ObjectMeta:
        """Make the object durable and visible; return its metadata.

        With ``expected_id``, the bytes must hash to it (else ``hash_mismatch`` and nothing
        is kept). If the object is already stored, the two metadata are merged (see
        ``LocalStore.writer``) and the new copy is dropped.
        """
        if self._done:
            raise ValueError("commit of a committed or aborted ObjectWriter")
        assert self._fd is not None or self._buf is not None
        try:
            if expected_id is not None:
                _check_id(expected_id)
            if self._declared is not None and self.written != self._declared:
                raise StorageError(
                    "hash_mismatch",
                    f"object is {self.written} bytes, {self._declared} were declared",
                )
            self._rehash()
            object_id = OBJECT_ID_PREFIX + self._hash.hexdigest()
            if expected_id is not None and object_id != expected_id:
                raise StorageError(
                    "hash_mismatch", f"bytes hash to {object_id}, expected {expected_id}"
                )
            meta = ObjectMeta(
                object_id=object_id,
                size=self.written,
                replicas=self._replicas,
                data_class=self._data_class,
                residency=self._residency,
                hint_for=self._hint_for,
                created=self._created,
                pinned=self._pinned,
                expires=self._expires,
                written=self.written_ts,
            )
            if self._buf is not None:
                stored = self._store._publish_inline(meta, bytes(self._buf))
                self._buf = None
                self._done = True
                self._store._release(self)
                return stored
            assert self._fd is not None and self._tmp_path is not None
            try:
                os.fsync(self._fd)
            except OSError as e:
                if _is_no_space(e):
                    raise StorageError(
                        "disk_full", f"disk full flushing {object_id}: {e.strerror or e}"
                    ) from None
                raise
            os.close(self._fd)
            self._fd = None
            stored = self._store._publish(self._tmp_path, meta)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._store._release(self)
        return stored

    def abort(self) -> None:
        """Drop the temp file; idempotent. Nothing of this write remains."""
        if self._done:
            return
        self._done = True
        self._buf = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp_path)
        self._store._release(self)

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class LocalStore:
    """The object store and KV of one node's data directory; see the module docstring."""

    def __init__(self, data_dir: Path, config: StorageConfig | None = None) -> None:
        self.config = config if config is not None else StorageConfig()
        self.data_dir = Path(data_dir)
        self.objects_dir = self.data_dir / OBJECTS_DIR
        self.tmp_dir = self.data_dir / TMP_DIR
        self.links_dir = self.data_dir / LINKS_DIR
        self._db_lock = threading.Lock()  # the connection and the publish/delete steps
        self._acct_lock = threading.Lock()  # byte counters and the set of writers
        self._writers: set[ObjectWriter] = set()
        self._inflight_reserved = 0
        self._inflight_outstanding = 0  # declared by writers but not yet written
        self._refused_lock = threading.Lock()
        self._refused_bytes = 0  # the largest write refused for want of room, not yet taken
        self._quarantined = 0
        self._closed = False
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.objects_dir.mkdir(mode=0o700, exist_ok=True)
            self.tmp_dir.mkdir(mode=0o700, exist_ok=True)
            self.links_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise self._os_error(f"{self.data_dir}: cannot create data dir", e) from None
        self._lock_fd = self._take_dir_lock()
        try:
            self._clean_tmp()
            self._db = self._open_db()
            if self.config.link_group is not None:
                self._open_links_only()  # after the database: its WAL files too
            row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM objects")
            self._count, self._committed_bytes = row.fetchone()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- open / close ------------------------------------------------------------------

    def _take_dir_lock(self) -> int:
        # Two stores on one directory would delete each other's temp files on open.
        path = self.data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StorageError(
                "busy", f"{self.data_dir}: storage is already open in another store or process"
            ) from None
        return fd

    def _open_links_only(self) -> None:
        """Traverse-only for the way to ``links/``, nothing else for anyone but us."""
        for entry in os.scandir(self.data_dir):
            if entry.name != LINKS_DIR and not entry.is_symlink():
                mode = stat.S_IMODE(entry.stat().st_mode)
                if mode & 0o077:
                    os.chmod(entry.path, mode & ~0o077)
        os.chmod(self.data_dir, 0o711)
        os.chmod(self.links_dir, 0o711)

    def _clean_tmp(self) -> None:
        # Anything here is a write that never committed, or a link for a task of a run
        # that is over: invisible by construction.
        for d in (self.tmp_dir, self.links_dir):
            for entry in os.scandir(d):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(entry.path)

    def _open_db(self) -> sqlite3.Connection:
        path = self.data_dir / DB_FILE
        # Ours alone from the start (SQLite gives its WAL files the database's mode).
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        except sqlite3.Error as e:
            raise StorageError("corrupt", f"{path}: cannot open: {e}") from None
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError("corrupt", f"{path}: cannot use WAL mode (got {mode})")
            db.execute("PRAGMA synchronous=FULL")
            # What a delete frees is overwritten with zeros, not left in free pages: an
            # inline object's bytes and a KV value live in this file (``purge_freed``).
            db.execute("PRAGMA secure_delete=ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(
                    "corrupt", f"{path}: schema version {version} is newer than {SCHEMA_VERSION}"
                )
            if 0 < version < _FIRST_BLAKE3_SCHEMA and self._holds_ids(db):
                # Checked before anything is changed: the store stays as it was.
                raise StorageError(
                    "old_format",
                    f"{path}: this data dir holds objects stored under BLAKE2b ids by an "
                    f"older meshscale (store schema {version}); object ids are now BLAKE3 "
                    "(b3-...). Move the data dir aside and start the node with an empty one",
                )
            db.executescript(_SCHEMA)
            columns = {r[1] for r in db.execute("PRAGMA table_info(objects)")}
            if "written" not in columns:  # a version 1 store
                db.execute("ALTER TABLE objects ADD COLUMN written TEXT")
            columns = {r[1] for r in db.execute("PRAGMA table_info(obj_tombstones)")}
            if "moved" not in columns:  # a store before version 5
                db.execute("ALTER TABLE obj_tombstones ADD COLUMN moved INTEGER NOT NULL DEFAULT 0")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as e:
            db.close()
            if _is_no_space(e):
                raise StorageError("disk_full", f"{path}: {e}") from None
            raise StorageError("corrupt", f"{path}: {e}") from None
        except BaseException:
            db.close()
            raise
        return db

    def purge_freed(self) -> bool:
        """Leave no copy of deleted rows in the database's files: the write-ahead log,
        which still holds the pages as they were before each delete, is checkpointed into
        the database (where ``secure_delete`` zeroed what the deletes freed) and
        truncated to nothing. So an erased inline object's bytes, or a KV value, are no
        longer in any file of the store, as an erased object's file is unlinked. False
        when a reader of the database elsewhere (another process) kept the log from
        being truncated: try again."""
        with self._db_lock:
            self._check_open()
            try:
                busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as e:
                if _is_no_space(e):
                    raise StorageError("disk_full", f"checkpoint: {e}") from None
                raise
        return int(busy) == 0

    @staticmethod
    def _holds_ids(db: sqlite3.Connection) -> bool:
        """Whether an existing store has any object or tombstone (keyed by object id)."""
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return any(db.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() is not None
                   for t in ("objects", "obj_tombstones") if t in tables)

    def close(self) -> None:
        """Abort writes in flight, close the database and release the directory. Idempotent."""
        if self._closed:
            return
        with self._acct_lock:
            writers = list(self._writers)
        for w in writers:
            w.abort()
        with self._db_lock:
            self._closed = True
            self._db.close()
        os.close(self._lock_fd)

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("LocalStore is closed")

    # -- errors and disk space ------------------------------------------------------------

    @staticmethod
    def _os_error(what: str, e: OSError) -> StorageError | OSError:
        if _is_no_space(e):
            return StorageError("disk_full", f"{what}: {e.strerror or e}")
        return e

    def totals(self) -> tuple[int, int]:
        """(objects, bytes) committed in the store."""
        return self._count, self._committed_bytes

    def disk_space(self) -> tuple[int, int]:
        """(free bytes on the data dir's file system, the reserve writes keep): the node is
        full, refusing writes, when free is below the reserve."""
        return self._free_bytes(), self.config.min_free_bytes

    def take_refused_bytes(self) -> int:
        """The largest write refused for want of room since the last call (0: none). A
        write is refused when it would leave less than the reserve free, so free space
        just above the reserve refuses writes too: ``placement.disk_full`` makes the node
        full on it, or it would advertise room it cannot give."""
        with self._refused_lock:
            n, self._refused_bytes = self._refused_bytes, 0
        return n

    def _free_bytes(self) -> int:
        st = os.statvfs(self.data_dir)
        return st.f_bavail * st.f_frsize

    def _check_free(self, need: int, others_outstanding: int) -> None:
        free = self._free_bytes()
        left = free - others_outstanding - need
        if left < self.config.min_free_bytes:
            with self._refused_lock:
                self._refused_bytes = max(self._refused_bytes, others_outstanding + need)
            raise StorageError(
                "disk_full",
                f"disk full: writing {need} more bytes would leave {max(left, 0)} of "
                f"{free} free bytes, below min_free_bytes={self.config.min_free_bytes}",
            )

    # -- writers ---------------------------------------------------------------------------

    def writer(
        self,
        *,
        now: float,
        replicas: int = 3,
        data_class: str | None = None,
        residency: Sequence[str] | None = None,
        hint_for: str | None = None,
        pinned: bool = True,
        ttl_s: float | None = None,
        size: int | None = None,
        written: str | None = None,
    ) -> ObjectWriter:
        """Start a streaming write. ``now`` is the driver's clock (wall seconds).

        ``size``, when known (e.g. from a transfer header), is checked against the bounds
        up front and reserved against the quota and free space, so a write that cannot fit
        is refused before a byte moves; writing more than declared is ``too_large``,
        committing fewer is ``hash_mismatch``. A size of at most ``inline_max_bytes``
        makes an inline write (no file; see the module docstring).

        The object is a GC candidate once ``now + ttl_s`` has passed, unless pinned.

        Re-writing an object that is already stored merges the two metadata: pinned if
        either is, the later expiry (none if either has none), the larger replica count,
        not a hint if either is not, the later ``written`` (an encoded HLC timestamp, the
        time of the write that made the copy); data class and residency of the first stay.
        """
        self._check_open()
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an int >= 1, not {replicas!r}")
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, not {now!r}")
        if ttl_s is not None and not (math.isfinite(ttl_s) and ttl_s >= 0):
            raise ValueError(f"ttl_s must be finite and >= 0, not {ttl_s!r}")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise ValueError(f"size must be an int >= 0, not {size!r}")
        data_class = _text_field("data_class", data_class)
        hint_for = _text_field("hint_for", hint_for)
        written = _text_field("written", written)
        res: tuple[str, ...] | None = None
        if residency is not None:
            if isinstance(residency, str):
                raise TypeError("residency must be a sequence of region names, not a str")
            res = tuple(residency)
            for r in res:
                if not isinstance(r, str):
                    raise TypeError(f"residency entries must be str, not {type(r).__name__}")
            _text_field("residency", json.dumps(res))
        cfg = self.config
        if size is not None and size > cfg.max_object_bytes:
            raise StorageError(
                "too_large",
                f"object of {size} bytes exceeds max_object_bytes={cfg.max_object_bytes}",
            )
        declared = size or 0
        with self._acct_lock:
            if len(self._writers) >= cfg.max_concurrent_writes:
                raise StorageError(
                    "busy",
                    f"{len(self._writers)} writes in flight, "
                    f"max_concurrent_writes={cfg.max_concurrent_writes}",
                )
            self._check_quota(declared)
            self._check_free(declared, self._inflight_outstanding)
            tmp_path: Path | None = None
            fd: int | None = None
            if size is None or size > cfg.inline_max_bytes:
                tmp_path = self.tmp_dir / (secrets.token_hex(16) + TMP_SUFFIX)
                try:
                    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600)
                except OSError as e:
                    raise self._os_error(f"{tmp_path}: cannot create", e) from None
            w = ObjectWriter(
                self,
                tmp_path,
                fd,
                declared_size=size,
                replicas=replicas,
                data_class=data_class,
                residency=res,
                hint_for=hint_for,
                pinned=bool(pinned),
                created=now,
                expires=None if ttl_s is None else now + ttl_s,
                written=written,
            )
            self._writers.add(w)
            self._inflight_reserved += declared
            self._inflight_outstanding += declared
        return w

    def _check_quota(self, extra: int) -> None:
        # Caller holds _acct_lock.
        cap = self.config.max_total_bytes
        if cap is None:
            return
        used = self._committed_bytes + self._inflight_reserved
        if used + extra > cap:
            raise StorageError(
                "quota",
                f"quota reached: {used} bytes stored or in flight + {extra} more "
                f"exceeds max_total_bytes={cap}",
            )

    def _admit_bytes(self, w: ObjectWriter, n: int) -> None:
        """Account ``n`` more bytes for ``w`` or raise; called before they are written."""
        cfg = self.config
        new_written = w.written + n
        if new_written > cfg.max_object_bytes:
            raise StorageError(
                "too_large", f"object exceeds max_object_bytes={cfg.max_object_bytes}"
            )
        if w._declared is not None and new_written > w._declared:
            raise StorageError(
                "too_large", f"object exceeds its declared size of {w._declared} bytes"
            )
        with self._acct_lock:
            extra = max(0, new_written - w.reserved)
            if extra:
                self._check_quota(extra)
            w._unchecked += n
            if w._unchecked >= cfg.chunk_bytes or w.written == 0:
                self._check_free(n, self._inflight_outstanding - w._outstanding)
                w._unchecked = 0
            self._inflight_reserved += extra
            w.reserved += extra
            used = min(n, w._outstanding)
            w._outstanding -= used
            self._inflight_outstanding -= used

    def _release(self, w: ObjectWriter) -> None:
        with self._acct_lock:
            if w not in self._writers:
                return
            self._writers.discard(w)
            self._inflight_reserved -= w.reserved
            self._inflight_outstanding -= w._outstanding
            w._outstanding = 0
            assert self._inflight_reserved >= 0 and self._inflight_outstanding >= 0

    def object_path(self, object_id: str) -> Path:
        """Where the object's file lives (whether or not it exists)."""
        h = _check_id(object_id)[len(OBJECT_ID_PREFIX) :]
        # Joined as a string first: pathlib interns each part it is given (CPython 3.11,
        # ``sys.intern``), and the id is the very string the replica manager keeps for the
        # copy, so ``objects_dir / ... / object_id`` put an entry for every object ever
        # stored or read here into the interpreter's table of interned strings, ~180 bytes
        # per object held after 10,000 puts (issue #24). A part parsed out of the joined
        # string is a new one, gone with the path.
        return Path(os.path.join(self.objects_dir, h[:2], h[2:4], object_id))

    def _publish(self, tmp_path: Path, meta: ObjectMeta) -> ObjectMeta:
        """Rename the fsynced temp file into place and commit its index row."""
        final = self.object_path(meta.object_id)
        with self._db_lock:
            self._check_open()
            old = self._meta_locked(meta.object_id)
            created_file = False
            try:
                self._make_dirs(final.parent)
                if old is not None and final.exists():
                    os.unlink(tmp_path)  # the same bytes are already durable
                else:
                    os.chmod(tmp_path, 0o400)
                    os.replace(tmp_path, final)
                    created_file = True
                    _fsync_dir(final.parent)
                stored = meta if old is None else self._merge(old, meta)
                # Its bytes are now this file: an inline copy goes with the row's update.
                self._commit_row(stored, ("DELETE FROM obj_inline WHERE id = ?",
                                          (meta.object_id,))
                                 if created_file and old is not None else None)
            except (OSError, sqlite3.Error) as e:
                if created_file and old is None:
                    with contextlib.suppress(OSError):
                        os.unlink(final)
                _raise_if_full(meta.object_id, e)
                raise
            if old is None:
                self._count_new(meta.size)
        return stored

    def _publish_inline(self, meta: ObjectMeta, data: bytes) -> ObjectMeta:
        """Commit a hash-checked small object's row and bytes in one transaction (one
        fsync of the WAL: durable and visible together, or not at all). An object already
        stored keeps its bytes where they are (file or index) and gets the merged row."""
        with self._db_lock:
            self._check_open()
            old = self._meta_locked(meta.object_id)
            stored = meta if old is None else self._merge(old, meta)
            keep = old is not None and (self._inline_locked(meta.object_id) is not None
                                        or self.object_path(meta.object_id).exists())
            try:
                self._commit_row(stored, None if keep else (
                    "INSERT OR REPLACE INTO obj_inline (id, data) VALUES (?, ?)",
                    (meta.object_id, data)))
            except sqlite3.Error as e:
                _raise_if_full(meta.object_id, e)
                raise
            if old is None:
                self._count_new(meta.size)
        return stored

    def _commit_row(self, stored: ObjectMeta,
                    then: tuple[str, tuple[object, ...]] | None) -> None:
        """``stored``'s index row and the statement ``then``, if any, in one transaction
        (the caller holds ``_db_lock``), rolled back on any failure."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                f"INSERT OR REPLACE INTO objects ({_META_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                self._row(stored),
            )
            if then is not None:
                self._db.execute(*then)
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def _count_new(self, size: int) -> None:
        """A newly stored object of ``size`` bytes, in the totals."""
        with self._acct_lock:
            self._count += 1
            self._committed_bytes += size

    def _inline_locked(self, object_id: str) -> bytes | None:
        row = self._db.execute("SELECT data FROM obj_inline WHERE id = ?",
                               (object_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def _make_dirs(self, leaf: Path) -> None:
        # objects/ab/cd: fsync each parent whose entry we create, so the path survives.
        for d in (leaf.parent, leaf):
            if not d.is_dir():
                with contextlib.suppress(FileExistsError):
                    d.mkdir(mode=0o700)
                _fsync_dir(d.parent)

    @staticmethod
    def _merge(old: ObjectMeta, new: ObjectMeta) -> ObjectMeta:
        expires = (
            None if old.expires is None or new.expires is None else max(old.expires, new.expires)
        )
        hint = None if old.hint_for is None or new.hint_for is None else old.hint_for
        return ObjectMeta(
            object_id=old.object_id,
            size=old.size,
            replicas=max(old.replicas, new.replicas),
            data_class=old.data_class,
            residency=old.residency,
            hint_for=hint,
            created=old.created,
            pinned=old.pinned or new.pinned,
            expires=expires,
            written=max((w for w in (old.written, new.written) if w is not None), default=None),
        )

    @staticmethod
    def _row(m: ObjectMeta) -> tuple[object, ...]:
        residency = None if m.residency is None else json.dumps(list(m.residency))
        return (
            m.object_id,
            m.size,
            m.replicas,
            m.data_class,
            residency,
            m.hint_for,
            m.created,
            int(m.pinned),
            m.expires,
            m.written,
        )

    @staticmethod
    def _from_row(row: tuple[object, ...]) -> ObjectMeta:
        oid, size, replicas, data_class, residency, hint_for, created, pinned, expires, written = row
        assert isinstance(oid, str) and isinstance(size, int) and isinstance(replicas, int)
        assert isinstance(created, float | int) and isinstance(pinned, int)
        assert data_class is None or isinstance(data_class, str)
        assert hint_for is None or isinstance(hint_for, str)
        assert expires is None or isinstance(expires, float | int)
        assert written is None or isinstance(written, str)
        res: tuple[str, ...] | None = None
        if residency is not None:
            assert isinstance(residency, str)
            res = tuple(json.loads(residency))
        return ObjectMeta(
            object_id=oid,
            size=size,
            replicas=replicas,
            data_class=data_class,
            residency=res,
            hint_for=hint_for,
            created=float(created),
            pinned=bool(pinned),
            expires=None if expires is None else float(expires),
            written=written,
        )

    def put_bytes(
        self,
        data: bytes | bytearray | memoryview,
        *,
        now: float,
        replicas: int = 3,
        data_class: str | None = None,
        residency: Sequence[str] | None = None,
        hint_for: str | None = None,
        pinned: bool = True,
        ttl_s: float | None = None,
        expected_id: str | None = None,
        written: str | None = None,
    ) -> ObjectMeta:
        """Store ``data`` whole; same keywords as ``writer``, plus ``expected_id``."""
        view = memoryview(data).cast("B")
        step = self.config.chunk_bytes
        with self.writer(
            now=now,
            replicas=replicas,
            data_class=data_class,
            residency=residency,
            hint_for=hint_for,
            pinned=pinned,
            ttl_s=ttl_s,
            size=len(view),
            written=written,
        ) as w:
            for i in range(0, len(view), step):
                w.write(view[i : i + step])
            return w.commit(expected_id)

    # -- reads -------------------------------------------------------------------------------

    def _meta_locked(self, object_id: str) -> ObjectMeta | None:
        row = self._db.execute(
            f"SELECT {_META_COLUMNS} FROM objects WHERE id = ?", (object_id,)
        ).fetchone()
        return None if row is None else self._from_row(row)

    def meta(self, object_id: str) -> ObjectMeta | None:
        _check_id(object_id)
        with self._db_lock:
            self._check_open()
            return self._meta_locked(object_id)

    def has(self, object_id: str) -> bool:
        """Whether the index lists the object (its file is not stat'ed)."""
        return self.meta(object_id) is not None

    def _require(self, object_id: str) -> ObjectMeta:
        m = self.meta(object_id)
        if m is None:
            raise StorageError("not_found", f"object {object_id} is not stored here")
        return m

    def link_copy(self, object_id: str) -> Path:
        """A hard link to the object's file, under ``links/`` (``*.in``), for a reader on
        this machine (a task's worker) that must find the bytes even if the object is
        dropped or deleted meanwhile. Its bytes are whatever the file holds: check the copy
        first. Remove it with ``release_copy``; anything left is removed when the store
        opens. With ``link_group``, the file is made readable by that group (a link is
        the same file as the object's: the object's own name stays behind 0700
        ``objects/``)."""
        meta = self._require(object_id)
        dst = self.links_dir / (secrets.token_hex(16) + LINK_SUFFIX)
        data = self._inline(meta.object_id)
        if data is not None:
            self._write_out(dst, data)  # an inline object: a file of its own, no link
        else:
            try:
                os.link(self.object_path(meta.object_id), dst)
            except FileNotFoundError:
                raise StorageError("not_found", f"object {object_id} has no file") from None
        group = self.config.link_group
        if group is not None:
            try:
                os.chown(dst, -1, group)
                os.chmod(dst, 0o440)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(dst)
                raise
        return dst

    @staticmethod
    def _write_out(dst: Path, data: bytes) -> None:
        """An inline object's bytes as the file ``dst`` (0400, like an object's file; not
        fsynced: a link is gone by the next open anyway)."""
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, memoryview(data))
            os.fchmod(fd, 0o400)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise
        os.close(fd)

    def _inline(self, object_id: str) -> bytes | None:
        """An inline object's bytes (None: not stored inline)."""
        with self._db_lock:
            self._check_open()
            return self._inline_locked(object_id)

    def release_copy(self, path: Path) -> None:
        """Remove a link made by ``link_copy`` (idempotent; refuses any other path)."""
        path = Path(path)
        if path.parent != self.links_dir or not path.name.endswith(LINK_SUFFIX):
            raise ValueError(f"{path} is not a link made by link_copy")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def open_read(self, object_id: str) -> BinaryIO:
        """The object's file, open for reading; the caller closes it.

        The bytes are not verified here (``read_chunks`` does that). ``not_found`` if the
        index does not list it; ``corrupt`` if it does but the file is gone (quarantine it).
        A file that is deleted while open stays readable to the holder.
        """
        self._require(object_id)
        data = self._inline(object_id)
        if data is not None:
            return io.BytesIO(data)
        try:
            return open(self.object_path(object_id), "rb")
        except FileNotFoundError:
            raise StorageError(
                "corrupt", f"object {object_id} is indexed but its file is missing"
            ) from None

    def read_chunks(
        self, object_id: str, *, verify: bool = True, chunk_bytes: int | None = None
    ) -> Iterator[bytes]:
        """Stream the object's bytes in chunks of at most ``chunk_bytes``.

        With ``verify``, the bytes are hashed as they go and ``StorageError("corrupt")`` is
        raised after the last chunk (or as soon as the file is longer than indexed) if they
        are not the object. Chunks already yielded then came from a bad copy: a caller that
        forwards them must buffer, or be able to retract what it sent (e.g. fail the
        transfer so the receiver's own hash check drops it), and should quarantine the copy.
        ``not_found`` / ``corrupt`` for a missing object or file are raised on first
        iteration.
        """
        step = chunk_bytes if chunk_bytes is not None else self.config.chunk_bytes
        if step < 1:
            raise ValueError(f"chunk_bytes must be >= 1, not {step}")
        meta = self._require(object_id)
        f = self.open_read(object_id)
        h = new_hasher()
        n = 0
        with f:
            while True:
                chunk = f.read(step)
                if not chunk:
                    break
                n += len(chunk)
                if verify:
                    if n > meta.size:
                        raise StorageError(
                            "corrupt", f"object {object_id} file is longer than {meta.size} bytes"
                        )
                    h.update(chunk)
                yield chunk
        if verify and (n != meta.size or OBJECT_ID_PREFIX + h.hexdigest() != object_id):
            raise StorageError(
                "corrupt", f"object {object_id}: stored bytes do not match the id ({n} bytes)"
            )

    def read_bytes(self, object_id: str) -> bytes:
        """The whole object, verified (for small objects; large ones use ``read_chunks``)."""
        return b"".join(self.read_chunks(object_id, verify=True))

    def verify(self, object_id: str) -> bool:
        """Re-hash the stored file; False if it is missing or not the object's bytes."""
        try:
            for _ in self.read_chunks(object_id, verify=True):
                pass
        except StorageError as e:
            if e.reason == "corrupt":
                return False
            raise
        return True

    # -- removal -------------------------------------------------------------------------------

    def _remove(self, object_id: str) -> bool:
        path = self.object_path(object_id)
        with self._db_lock:
            self._check_open()
            old = self._meta_locked(object_id)
            if old is not None:
                # Row first: once it is gone nothing serves the file, even after a crash.
                # (An inline object's bytes go with it, in the same transaction.)
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute("DELETE FROM objects WHERE id = ?", (object_id,))
                    self._db.execute("DELETE FROM obj_inline WHERE id = ?", (object_id,))
                    self._db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
                with self._acct_lock:
                    self._count -= 1
                    self._committed_bytes -= old.size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return old is not None

    def set_residency(self, rules: Iterable[tuple[str, tuple[str, ...] | None]]
                      ) -> builtins.list[str]:
        """Give these stored objects a new residency rule (a class's policy changed with
        ``--migrate``), in one transaction; returns those that were stored."""
        items = [(_check_id(o), r) for o, r in rules]
        changed: builtins.list[str] = []
        with self._db_lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for oid, regions in items:
                    cur = self._db.execute(
                        "UPDATE objects SET residency = ? WHERE id = ?",
                        (None if regions is None else json.dumps(sorted(regions)), oid))
                    if cur.rowcount:
                        changed.append(oid)
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        return changed

    def delete_many(self, object_ids: Iterable[str]) -> builtins.list[str]:
        """Remove these objects in one transaction (one fsync for all the rows, not one
        each); returns those that were stored. Rows go first, files after the commit, as
        in ``delete``: a crash in between leaves orphan files, never a row without its file."""
        ids = [_check_id(o) for o in object_ids]
        removed: builtins.list[str] = []
        with self._db_lock:
            self._check_open()
            freed = 0
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for oid in ids:
                    old = self._meta_locked(oid)
                    if old is not None:
                        self._db.execute("DELETE FROM objects WHERE id = ?", (oid,))
                        self._db.execute("DELETE FROM obj_inline WHERE id = ?", (oid,))
                        removed.append(oid)
                        freed += old.size
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            with self._acct_lock:
                self._count -= len(removed)
                self._committed_bytes -= freed
            for oid in ids:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.object_path(oid))
        return removed

    def delete(self, object_id: str) -> None:
        """Remove the object; ``not_found`` if it is not stored."""
        _check_id(object_id)
        if not self._remove(object_id):
            raise StorageError("not_found", f"object {object_id} is not stored here")

    def quarantine(self, object_id: str) -> None:
        """Drop a corrupt copy (file and row) so repair can fetch a good one. Idempotent."""
        _check_id(object_id)
        self._remove(object_id)
        with self._acct_lock:
            self._quarantined += 1

    def sweep_orphans(self) -> dict[str, int]:
        """Reconcile files and index (a full scan, for startup checks and tests).

        Removes object files that have no index row (a crash between rename and row) and
        rows whose file is gone (not those of inline objects, which have none); returns
        how many of each.
        """
        files = 0
        rows = 0
        indexed = set(self.ids())
        with self._db_lock:
            self._check_open()
            inline = {r[0] for r in self._db.execute("SELECT id FROM obj_inline")}
        seen: set[str] = set()
        for dirpath, _dirs, names in os.walk(self.objects_dir):
            for name in names:
                if name in indexed:
                    seen.add(name)
                    continue
                with self._db_lock:
                    self._check_open()
                    if OBJECT_ID_RE.fullmatch(name) and self._meta_locked(name) is not None:
                        continue  # committed since we listed
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                files += 1
        for oid in indexed - seen - inline:
            if not self.object_path(oid).exists():
                self._remove(oid)
                rows += 1
        return {"orphan_files": files, "missing_files": rows}

    # -- listing and policy -------------------------------------------------------------------

    def list(self, *, after: str = "", limit: int = 1000) -> list[ObjectMeta]:
        """Objects with id > ``after``, in id order, at most ``limit`` (clipped to MAX_PAGE)."""
        limit = _clip(limit)
        with self._db_lock:
            self._check_open()
            rows = self._db.execute(
                f"SELECT {_META_COLUMNS} FROM objects WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [self._from_row(r) for r in rows]

    def ids(self, *, after: str = "") -> Iterator[str]:
        """Every stored id in order, read in pages (no cursor is held between yields)."""
        while True:
            with self._db_lock:
                self._check_open()
                page = [
                    r[0]
                    for r in self._db.execute(
                        "SELECT id FROM objects WHERE id > ? ORDER BY id LIMIT ?",
                        (after, MAX_PAGE),
                    )
                ]
            yield from page
            if len(page) < MAX_PAGE:
                return
            after = page[-1]

    def hinted(self, *, after: str = "", limit: int = 1000) -> builtins.list[ObjectMeta]:
        """Objects held on behalf of another node, in id order."""
        limit = _clip(limit)
        with self._db_lock:
            self._check_open()
            rows = self._db.execute(
                f"SELECT {_META_COLUMNS} FROM objects WHERE hint_for IS NOT NULL AND id > ? "
                "ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [self._from_row(r) for r in rows]

    def _update(self, object_id: str, sql: str, args: tuple[object, ...]) -> None:
        _check_id(object_id)
        with self._db_lock:
            self._check_open()
            cur = self._db.execute(sql, (*args, object_id))
            if cur.rowcount == 0:
                raise StorageError("not_found", f"object {object_id} is not stored here")

    def set_hint(self, object_id: str, hint_for: str | None) -> None:
        """Mark the object as held for ``hint_for`` (or, with None, as our own replica)."""
        hint_for = _text_field("hint_for", hint_for)
        self._update(object_id, "UPDATE objects SET hint_for = ? WHERE id = ?", (hint_for,))

    def set_pinned(self, object_id: str, pinned: bool, *, expires: float | None = None) -> None:
        """Pin (never a GC candidate) or unpin with an optional absolute expiry."""
        if expires is not None and not math.isfinite(expires):
            raise ValueError(f"expires must be finite, not {expires!r}")
        self._update(
            object_id,
            "UPDATE objects SET pinned = ?, expires = ? WHERE id = ?",
            (int(bool(pinned)), expires),
        )

    def expired(self, now: float, *, limit: int = 1000) -> builtins.list[str]:
        """Unpinned objects whose TTL has run out by ``now``, soonest-expired first."""
        limit = _clip(limit)
        with self._db_lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT id FROM objects WHERE pinned = 0 AND expires IS NOT NULL "
                "AND expires <= ? ORDER BY expires, id LIMIT ?",
                (now, limit),
            ).fetchall()
        return [r[0] for r in rows]

    def stats(self) -> dict[str, int]:
        with self._db_lock:
            self._check_open()
            hinted, unpinned = self._db.execute(
                "SELECT COUNT(hint_for), COALESCE(SUM(pinned = 0), 0) FROM objects"
            ).fetchone()
            kv_keys, kv_tombstones = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(value IS NULL), 0) FROM kv"
            ).fetchone()
        with self._acct_lock:
            out = {
                "objects": self._count,
                "bytes": self._committed_bytes,
                "hinted": hinted,
                "unpinned": unpinned,
                "writes_in_flight": len(self._writers),
                "bytes_in_flight": self._inflight_reserved,
                "quarantined": self._quarantined,
                "kv_keys": kv_keys,
                "kv_tombstones": kv_tombstones,
            }
        out["free_bytes"] = self._free_bytes()
        return out

    # -- object tombstones --------------------------------------------------------------------

    def tombstone_put(
        self, object_id: str, ts: str, *, replicas: int, data_class: str | None,
        residency: Sequence[str] | None, moved: bool = False,
    ) -> None:
        """Keep (durably, when this returns) the tombstone of an explicitly deleted object:
        ``ts`` is its encoded HLC timestamp; the policy says where it belongs. A kept
        tombstone is replaced by a newer one, and its rule by the one given at the same
        timestamp (a class policy migration rewrites the rule of a tombstone, not its
        timestamp); an older one is ignored. ``moved``: kept here because its rule moved
        it away (``core.replication``'s moved tombstones), restored as one."""
        _check_id(object_id)
        if not isinstance(ts, str) or not ts or len(ts.encode()) > MAX_KV_TS_BYTES:
            raise ValueError(f"tombstone timestamp must be a str of at most {MAX_KV_TS_BYTES} bytes")
        data_class = _text_field("data_class", data_class)
        res = None if residency is None else _text_field("residency", json.dumps(list(residency)))
        with self._db_lock:
            self._check_open()
            try:
                self._db.execute(
                    "INSERT INTO obj_tombstones (id, ts, replicas, data_class, residency, moved) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET ts = excluded.ts, "
                    "replicas = excluded.replicas, data_class = excluded.data_class, "
                    "residency = excluded.residency, moved = excluded.moved "
                    "WHERE excluded.ts >= obj_tombstones.ts",
                    (object_id, ts, int(replicas), data_class, res, int(bool(moved))),
                )
            except sqlite3.OperationalError as e:
                if _is_no_space(e):
                    raise StorageError("disk_full", f"disk full writing a tombstone: {e}") from None
                raise

    def tombstone_drop(self, object_id: str) -> None:
        """Forget a tombstone (expired, handed off or superseded). Idempotent."""
        _check_id(object_id)
        with self._db_lock:
            self._check_open()
            self._db.execute("DELETE FROM obj_tombstones WHERE id = ?", (object_id,))

    def tombstones(
        self, *, after: str = "", limit: int = 1000
    ) -> builtins.list[tuple[str, str, int, str | None, tuple[str, ...] | None, bool]]:
        """(id, ts, replicas, data_class, residency, moved) of kept tombstones, in id order."""
        with self._db_lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT id, ts, replicas, data_class, residency, moved FROM obj_tombstones "
                "WHERE id > ? ORDER BY id LIMIT ?", (after, _clip(limit)),
            ).fetchall()
        return [(i, t, r, d, None if res is None else tuple(json.loads(res)), bool(m))
                for i, t, r, d, res, m in rows]

    # -- KV ----------------------------------------------------------------------------------

    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str):
            raise TypeError(f"KV key must be a str, not {type(key).__name__}")
        try:
            n = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            raise StorageError("bad_id", f"KV key is not valid UTF-8: {key!r:.100}") from None
        if n > MAX_KV_KEY_BYTES:
            raise StorageError("too_large", f"KV key of {n} bytes exceeds {MAX_KV_KEY_BYTES} bytes")

    def kv_get(self, key: str) -> tuple[bytes | None, str] | None:
        """(value, ts) — value None for a tombstone — or None if the key was never written."""
        self._check_key(key)
        with self._db_lock:
            self._check_open()
            row = self._db.execute("SELECT value, ts FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row[0], row[1])

    def _check_kv_write(self, key: str, value: bytes | None, ts: str) -> bytes | None:
        """A KV write's key, timestamp and value checked (``kv_put``, ``kv_put_if``), and
        room for it: the value as bytes."""
        self._check_key(key)
        if not isinstance(ts, str) or not ts:
            raise ValueError("KV timestamp must be a non-empty str")
        try:
            ts_len = len(ts.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError(f"KV timestamp is not valid UTF-8: {ts!r:.100}") from None
        if ts_len > MAX_KV_TS_BYTES:
            raise StorageError(
                "too_large", f"KV timestamp of {ts_len} bytes exceeds {MAX_KV_TS_BYTES} bytes"
            )
        if value is None:
            return None
        value = bytes(value)
        if len(value) > MAX_KV_VALUE_BYTES:
            raise StorageError(
                "too_large",
                f"KV value of {len(value)} bytes exceeds {MAX_KV_VALUE_BYTES} bytes",
            )
        # The same reserve as objects: writes are refused before the disk is full, so
        # deletes (which need no room) keep working and space can be won back.
        self._check_free(len(key) + len(value) + ts_len + KV_ROW_OVERHEAD_BYTES, 0)
        return value

    def kv_put(self, key: str, value: bytes | None, ts: str,
               hints: Sequence[str] = (), since: float = 0.0) -> bool:
        """Last-writer-wins: store (value, ts) only if ``ts`` sorts after the stored ts.

        ``ts`` is an opaque string that sorts in time order (``HLCTimestamp.encode()``);
        an equal ts does not apply (HLC timestamps carry the node name, so equal means the
        same write). ``value`` None writes a tombstone. Returns whether it applied; the
        write is durable when this returns. ``hints``: targets this write must reach
        (``core.kv.KVHints``), stored in the same transaction, applied or not, as
        ``kv_hints_apply`` stores them (made at ``since``, wall clock).
        """
        return self.kv_put_many([(key, value, ts, hints)], since)[0]

    def kv_put_many(self, rows: Sequence[tuple[str, bytes | None, str, Sequence[str]]],
                    since: float = 0.0) -> builtins.list[bool]:
        """``kv_put`` of each of ``rows`` (key, value, ts, hints), in one transaction: one
        commit (one fsync) for all of them. Returns whether each applied; all are durable
        when this returns. A row that fails its checks fails the whole call (nothing
        written): a batch's coordinator checked them already."""
        checked = [(key, self._check_kv_write(key, value, ts), ts,
                    [_check_hint_target(t) for t in hints])
                   for key, value, ts, hints in rows]
        # One row without hints is one statement: its own transaction.
        explicit = len(checked) > 1 or any(hints for _, _, _, hints in checked)
        out: builtins.list[bool] = []
        with self._db_lock:
            self._check_open()
            try:
                if explicit:
                    self._db.execute("BEGIN IMMEDIATE")
                try:
                    for key, value, ts, hints in checked:
                        cur = self._db.execute(
                            "INSERT INTO kv (key, value, ts) VALUES (?, ?, ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                            "ts = excluded.ts WHERE excluded.ts > kv.ts",
                            (key, value, ts),
                        )
                        out.append(cur.rowcount > 0)
                        if hints:
                            self._db.executemany(_HINT_UPSERT,
                                                 [(key, t, ts, since) for t in hints])
                    if explicit:
                        self._db.execute("COMMIT")
                except BaseException:
                    if explicit:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as e:
                if _is_no_space(e):
                    raise StorageError("disk_full", f"disk full writing KV key: {e}") from None
                raise
        return out

    def kv_put_if(self, key: str, value: bytes | None, ts: str, expected: Sequence[str],
                  hints: Sequence[str] = (), since: float = 0.0
                  ) -> tuple[bool, str | None]:
        """A conditional put's part on this replica (``core.kv.cas_allows``), atomic with
        the check: store (value, ts) only if the key's record is one of ``expected``
        (encoded stamps; "" for no record or a tombstone) and ``ts`` sorts after it.
        Returns (applied, the stamp of the record held before: None for no record). The
        hints are stored, as ``kv_put`` stores them, only when it applied."""
        value = self._check_kv_write(key, value, ts)
        hints = [_check_hint_target(t) for t in hints]
        with self._db_lock:
            self._check_open()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    row = self._db.execute("SELECT value, ts FROM kv WHERE key = ?",
                                           (key,)).fetchone()
                    current: str | None = None if row is None else row[1]
                    live = row is not None and row[0] is not None
                    applied = cas_matches(current, live, expected) and (current is None or ts > current)
                    if applied:
                        self._db.execute(
                            "INSERT INTO kv (key, value, ts) VALUES (?, ?, ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                            "ts = excluded.ts", (key, value, ts))
                        if hints:
                            self._db.executemany(_HINT_UPSERT,
                                                 [(key, t, ts, since) for t in hints])
                    self._db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as e:
                if _is_no_space(e):
                    raise StorageError("disk_full", f"disk full writing KV key: {e}") from None
                raise
        return applied, current

    def kv_hints_apply(
        self,
        stored: Iterable[tuple[str, str, str, float]] = (),
        deleted: Iterable[tuple[str, str, str]] = (),
    ) -> None:
        """Persist changes to the KV hints (``core.kv.HintStored`` / ``HintDeleted``), in
        one transaction: ``stored`` rows (key, target, ts, since) are upserts that keep the
        larger ts and the smaller since; ``deleted`` (key, target, upto) removes a hint only
        if its ts is at most ``upto`` (a newer one stored meanwhile stays)."""
        rows = [(k, _check_hint_target(t), ts, float(since)) for k, t, ts, since in stored]
        gone = [(k, t, upto) for k, t, upto in deleted]
        if not rows and not gone:
            return
        with self._db_lock:
            self._check_open()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    if rows:
                        self._db.executemany(_HINT_UPSERT, rows)
                    if gone:
                        self._db.executemany(
                            "DELETE FROM kv_hints WHERE key = ? AND target = ? AND ts <= ?",
                            gone)
                    self._db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                reason = "disk_full" if _is_no_space(e) else "corrupt"
                raise StorageError(reason, f"writing KV hints: {e}") from None

    def kv_hints(self) -> builtins.list[tuple[str, str, str, float]]:
        """Every stored KV hint: (key, target, ts, since), in key order."""
        with self._db_lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT key, target, ts, since FROM kv_hints ORDER BY key, target").fetchall()
        return [(k, t, ts, since) for k, t, ts, since in rows]

    def kv_scan(
        self, prefix: str = "", limit: int = 1000, *, after: str | None = None
    ) -> builtins.list[tuple[str, bytes | None, str]]:
        """Keys starting with ``prefix`` in key order (tombstones included, value None);
        ``after`` continues a previous page from its last key."""
        self._check_key(prefix)
        limit = _clip(limit)
        low = prefix if after is None or after < prefix else after
        op = ">" if after is not None and after >= prefix else ">="
        upper = _prefix_upper(prefix)
        sql = f"SELECT key, value, ts FROM kv WHERE key {op} ?"
        args: list[object] = [low]
        if upper is not None:
            sql += " AND key < ?"
            args.append(upper)
        sql += " ORDER BY key LIMIT ?"
        args.append(limit)
        with self._db_lock:
            self._check_open()
            rows = self._db.execute(sql, args).fetchall()
        return [(k, v, t) for k, v, t in rows]

    def kv_purge_tombstones(self, before_ts: str, *, limit: int = 1000) -> int:
        """Forget tombstones older than ``before_ts``; returns how many.

        Only safe once every replica has seen the delete (a grace period, as in Cassandra):
        a purged key accepts an older write again.
        """
        limit = _clip(limit)
        with self._db_lock:
            self._check_open()
            cur = self._db.execute(
                "DELETE FROM kv WHERE key IN (SELECT key FROM kv WHERE value IS NULL "
                "AND ts < ? LIMIT ?)",
                (before_ts, limit),
            )
            return cur.rowcount
