"""The user's handle on a mesh: objects (put/get/stat/list) and the replicated KV.

``connect(address)`` returns a ``Mesh``: a blocking API whose calls run on an asyncio loop
in a private background thread, so it works the same in a plain script and inside Jupyter
(whose own loop is already running). ``await connect_async(address)`` returns an
``AsyncMesh`` for code that already runs on an event loop; ``Mesh`` is a thin wrapper over
it, so both share one implementation.

Everything goes over the wire to one node (``client/rpc.py``: mutual TLS with a short-lived
certificate from the cluster bundle, plus the admin token); that node fans out to the
rest. The client never trusts the node with integrity: an object's id is the BLAKE3-256
of its bytes, computed here before uploading (sent with the bytes, which the node must
match, and compared with the id the node returns; a stream that cannot be read twice is
hashed as it goes) and again while downloading (a mismatch raises ``IntegrityError``; a
download to a path then leaves nothing behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import io
import os
import stat
import tempfile
import threading
import time
import warnings
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal, TypeVar, cast, overload

import msgspec

from meshscale.client.policies import AsyncPolicies, Policies
from meshscale.client.rpc import (
    ClientCredentials,
    RemoteError,
    RpcConnection,
    RpcError,
    RpcPipeline,
)
from meshscale.core.api import Empty, ErrorCode, Method, Request, ResidencyWire
from meshscale.core.api import erasure as erasure_api
from meshscale.core.api import node as node_api
from meshscale.core.api import objects as obj_api
from meshscale.core.erasure import Receipt, check_selector
from meshscale.core.kv import MAX_EXPECTED, MAX_VALUE_BYTES
from meshscale.core.objects import OBJECT_ID_PREFIX, OBJECT_ID_RE, new_hasher, object_id
from meshscale.core.policy import PolicyError
from meshscale.transport.framing import split_addr
from meshscale.transport.tls import TLSConfigError
from meshscale.trust.bundle import MAX_TOKEN_LENGTH, BundleError, is_valid_token, load_bundle
from meshscale.trust.keyring import KeyringError

__all__ = [
    "KV",
    "AsyncKV",
    "AsyncMesh",
    "ConnectError",
    "Consistency",
    "IntegrityError",
    "Mesh",
    "MeshError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectRef",
    "connect",
    "connect_async",
    "object_id",
]

BUNDLE_ENV: Final = "MESHSCALE_BUNDLE"
SMALL_PUT_BYTES = 64 * 1024
"""Objects up to this size are put in one round trip (``obj.put_small``)."""
DEFAULT_READ_BYTES: Final = 1024 * 1024
"""Bytes asked for per ``obj.read`` until a node tells us its chunk size."""
MAX_REDIRECT_HOLDERS: Final = 3
"""Holders of a redirected read tried before the node is asked to relay the bytes."""
MAX_HOLDER_CONNECTIONS: Final = 8
"""Connections to redirect targets kept open per ``AsyncMesh``."""
READ_AHEAD: Final = 2
"""Default ``obj.read`` calls kept in flight by one get (see ``AsyncMesh.read_ahead``)."""
MAX_READ_AHEAD: Final = 8
PUT_AHEAD: Final = 2
"""``obj.put_chunk`` calls one put keeps in flight beyond the one being answered."""
MAX_CHUNK_BYTES: Final = 32 * 1024 * 1024
"""Largest chunk size we accept from a node (it must fit in one RPC frame)."""
LIST_PAGE: Final = 500
KV_LIST_PAGE: Final = 500
"""Keys one ``kv.items`` call asks a node for at a time."""
SPOOL_BYTES: Final = 8 * 1024 * 1024
"""A non-seekable stream is spooled (its size must be known up front); beyond this many
bytes the spool moves from memory to a temp file."""
ABORT_TIMEOUT_S: Final = 5.0

Consistency = Literal["one", "quorum", "all"]
CONSISTENCY_LEVELS: Final = ("one", "quorum", "all")
Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``; with ``Mesh`` it runs on the client's thread."""

T = TypeVar("T")
Req = TypeVar("Req", bound=Request)
Rep = TypeVar("Rep")


# -- errors ---------------------------------------------------------------------------


class MeshError(Exception):
    """A request to the mesh failed: the node refused it or could not be reached.
    ``code``: the node's ``core.api.ErrorCode`` value when it answered with an error."""

    def __init__(self, message: str = "", code: str = "", *, unreachable: bool = False
                 ) -> None:
        super().__init__(message)
        self.code = code
        self.unreachable = unreachable
        """No node answered (as opposed to one that answered with a refusal)."""


class ConnectError(MeshError):
    """No usable connection: no bundle, a bundle that cannot be used, or no node there."""


class ObjectNotFoundError(MeshError):
    """No live node holds the object."""


class UnderReplicatedWarning(UserWarning):
    """A put stored with fewer copies than asked for (``allow_degraded=True``)."""


class IntegrityError(MeshError):
    """Bytes do not hash to the object's id (or their size is not the object's size)."""


# -- ids and refs -----------------------------------------------------------------------


def _new_hash() -> Any:
    return new_hasher()


def _check_id(value: object) -> str:
    if not isinstance(value, str) or OBJECT_ID_RE.fullmatch(value) is None:
        raise ValueError(
            f"not an object id: {value!r:.100} (expected {OBJECT_ID_PREFIX} and 64 hex digits)"
        )
    return value


class ObjectRef(msgspec.Struct, frozen=True):
    """A stored object: its content id and size. Immutable, hashable, picklable and
    msgspec-encodable, so it can be passed around (and to tasks) in place of the bytes."""

    id: str
    size: int

    def __post_init__(self) -> None:
        _check_id(self.id)
        if self.size < 0:
            raise ValueError(f"object size must be >= 0, not {self.size}")

    def __str__(self) -> str:
        return self.id


class ObjectInfo(msgspec.Struct, frozen=True):
    """What the mesh knows about an object (``stat``, ``objects``)."""

    id: str
    size: int
    replicas: int
    data_class: str | None = None
    residency: tuple[str, ...] | None = None
    holders: tuple[str, ...] = ()
    """Live nodes that hold a copy now."""
    replica_set: tuple[str, ...] = ()
    """Nodes that should hold a copy, from the current view and the object's policy."""
    health: str | None = None
    """``ok`` or ``under-replicated`` (``objects`` only; ``stat`` leaves it None)."""

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(self.id, self.size)


def _info(desc: obj_api.ObjectStat) -> ObjectInfo:
    """What the mesh said about an object, as the API gives it."""
    res = desc.residency
    return ObjectInfo(
        id=desc.id, size=desc.size, replicas=desc.replicas,
        data_class=None if res is None else res.data_class,
        residency=None if res is None or res.regions is None else tuple(res.regions),
        holders=tuple(desc.holders), replica_set=tuple(desc.replica_set),
        health=getattr(desc, "health", None) or None)


def _residency(data_class: str | None, regions: list[str] | None) -> ResidencyWire | None:
    """A put's rule on the wire (None: none)."""
    if data_class is None and regions is None:
        return None
    return ResidencyWire(regions, data_class)


def _ref_parts(ref: ObjectRef | str) -> tuple[str, int | None]:
    if isinstance(ref, ObjectRef):
        return ref.id, ref.size
    return _check_id(ref), None


# -- argument checks --------------------------------------------------------------------


def _check_consistency(consistency: str) -> Consistency:
    if consistency in CONSISTENCY_LEVELS:
        return cast(Consistency, consistency)
    raise ValueError(
        f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}, not {consistency!r}"
    )


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"a KV key is a non-empty string, not {key!r:.100}")
    return key


def _check_policy(
    replicas: int | None, w: int | None, data_class: str | None,
    residency: Sequence[str] | None,
) -> tuple[int | None, int | None, list[str] | None]:
    """A put's replicas, w and regions, checked. Without a data class, replicas defaults
    to 3 and w to 2; with one, what is left out is None on the wire and the class's policy
    fills it in at the node."""
    if data_class is None:
        replicas = 3 if replicas is None else replicas
        w = 2 if w is None else w
    if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int)
                                 or replicas < 1):
        raise ValueError(f"replicas must be an integer >= 1, not {replicas!r}")
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1
                          or (replicas is not None and w > replicas)):
        raise ValueError(f"w must be an integer from 1 to replicas ({replicas}), not {w!r}")
    if data_class is not None and (not isinstance(data_class, str) or not data_class):
        raise ValueError(f"data_class must be a non-empty string or None, not {data_class!r}")
    if residency is None:
        return replicas, w, None
    if isinstance(residency, str | bytes):
        raise ValueError(
            f"residency is a list of regions, not the string {residency!r}; "
            f"write residency=[{residency!r}]"
        )
    regions = list(residency)
    if not regions or not all(isinstance(r, str) and r.strip() for r in regions):
        raise ValueError(f"residency must list at least one region name, not {regions!r}")
    return replicas, w, [r.strip() for r in regions]


# -- credentials ----------------------------------------------------------------------


def _credentials(bundle: str | Path | None) -> ClientCredentials:
    if bundle is None:
        bundle = os.environ.get(BUNDLE_ENV) or None
    if bundle is None:
        raise ConnectError(
            f"no bundle: pass bundle=DIR or set {BUNDLE_ENV} (a client bundle from "
            "`meshscale bundle client`; `meshscale up` prints one)"
        )
    try:
        return ClientCredentials.from_bundle(load_bundle(Path(bundle).expanduser()))
    except (BundleError, KeyringError, TLSConfigError) as e:
        raise ConnectError(str(e)) from None
    except OSError as e:
        raise ConnectError(f"{bundle}: cannot read the bundle: {e.strerror or e}") from None


def _check_address(address: str) -> str:
    try:
        host, port = split_addr(address)
    except (ValueError, AttributeError):
        raise ConnectError(f"invalid node address {address!r}: use HOST:PORT") from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- upload sources ---------------------------------------------------------------------


class _Source:
    """Bytes to upload, read in order, with their size known before the first read."""

    size: int = 0

    async def read(self, n: int) -> bytes:
        raise NotImplementedError

    async def check_exhausted(self) -> None:
        """Raise if more bytes follow the announced size (a file that grew meanwhile)."""

    def close(self) -> None:
        """Release what the source opened."""

    async def content_id(self) -> str | None:
        """The object's id, when it can be known before the upload (None: it cannot).
        Sent with ``obj.put_begin``, it lets the node stream each chunk on to the
        replica set as it arrives (cut-through) instead of after the whole object."""
        return None


class _BytesSource(_Source):
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self.size = len(self._view)
        self._pos = 0

    async def read(self, n: int) -> bytes:
        chunk = bytes(self._view[self._pos : self._pos + n])
        self._pos += len(chunk)
        return chunk

    async def content_id(self) -> str | None:
        return await asyncio.to_thread(object_id, self._view[self._pos :])


class _FileSource(_Source):
    """A binary file object; reads run in a worker thread so they never block the loop."""

    def __init__(self, f: BinaryIO, size: int, *, name: str, owned: bool) -> None:
        self._f = f
        self.size = size
        self._name = name
        self._owned = owned

    async def read(self, n: int) -> bytes:
        chunk = await asyncio.to_thread(self._f.read, n)
        if not isinstance(chunk, bytes | bytearray):
            raise TypeError(f"{self._name}: put() needs a binary stream (open it with 'rb')")
        return bytes(chunk)

    async def content_id(self) -> str | None:
        # One extra read pass (usually from the page cache) buys cut-through; a file that
        # changes in between is refused by the node (its hash is checked against this id).
        return await asyncio.to_thread(self._hash_ahead)

    def _hash_ahead(self) -> str | None:
        try:
            if not self._f.seekable():
                return None
            pos = self._f.tell()
        except (OSError, ValueError, AttributeError):
            return None
        h = _new_hash()
        left = self.size
        try:
            while left > 0:
                chunk = self._f.read(min(DEFAULT_READ_BYTES, left))
                if not isinstance(chunk, bytes | bytearray) or not chunk:
                    return None
                h.update(chunk)
                left -= len(chunk)
        finally:
            self._f.seek(pos)
        return OBJECT_ID_PREFIX + str(h.hexdigest())

    async def check_exhausted(self) -> None:
        if await self.read(1):
            raise MeshError(f"{self._name}: grew while it was being uploaded; try again")

    def close(self) -> None:
        if self._owned:
            self._f.close()


def _stream_size(f: BinaryIO) -> int | None:
    try:
        if not f.seekable():
            return None
        pos = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(pos)
    except (OSError, ValueError, AttributeError):
        return None
    return end - pos


def _spool(f: BinaryIO) -> tuple[BinaryIO, int]:
    # Returned open: the upload source closes it.
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, prefix="meshscale-put-")  # noqa: SIM115
    try:
        while chunk := f.read(DEFAULT_READ_BYTES):
            if not isinstance(chunk, bytes | bytearray):
                raise TypeError("put() needs a binary stream (open it with 'rb')")
            spool.write(chunk)
        size = spool.tell()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool, size  # type: ignore[return-value]


async def _open_source(data: bytes | bytearray | memoryview | str | Path | BinaryIO) -> _Source:
    if isinstance(data, bytes | bytearray | memoryview):
        return _BytesSource(data)
    if isinstance(data, str | os.PathLike):
        path = Path(data).expanduser()
        f = await asyncio.to_thread(open, path, "rb")
        try:
            st = os.fstat(f.fileno())
        except BaseException:
            f.close()
            raise
        if stat.S_ISREG(st.st_mode):
            return _FileSource(f, st.st_size, name=str(path), owned=True)
        # A pipe or device (e.g. /dev/stdin) has no size up front: spool it.
        with f:
            spooled, size = await asyncio.to_thread(_spool, f)
        return _FileSource(spooled, size, name=str(path), owned=True)
    if hasattr(data, "read"):
        name = str(getattr(data, "name", "stream"))
        remaining = _stream_size(data)
        if remaining is not None:
            return _FileSource(data, remaining, name=name, owned=False)
        spooled, size = await asyncio.to_thread(_spool, data)
        return _FileSource(spooled, size, name=name, owned=True)
    raise TypeError(
        f"put() takes bytes, a file path or a binary file object, not {type(data).__name__}"
    )


# -- download sinks ---------------------------------------------------------------------


def _umask() -> int:
    # os.umask can only be read by setting it, which races with other threads; Linux shows it.
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


class _PathSink:
    """A temp file next to the destination, renamed over it only once verified."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not path.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(path.parent))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        self.tmp = Path(tmp)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            self._f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise

    async def write(self, chunk: bytes) -> None:
        await asyncio.to_thread(self._f.write, chunk)

    def _finish(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)

    async def commit(self) -> None:
        await asyncio.to_thread(self._finish)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()
        self.tmp.unlink(missing_ok=True)


# -- the async client -------------------------------------------------------------------

STARTING_WAIT_S = 10.0
"""How long a call keeps asking a node that answers "node is starting"."""


async def _while_starting(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, asked again with backoff while the node answers ``STARTING`` (its
    planes are not up yet: it did nothing with the request), for up to
    ``STARTING_WAIT_S``."""
    deadline = time.monotonic() + STARTING_WAIT_S
    delay = 0.05
    while True:
        try:
            return await call()
        except RemoteError as e:
            if e.code != ErrorCode.STARTING or time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(0.5, delay * 2)



class AsyncMesh:
    """A connection to a mesh through one node, for use on an asyncio event loop.

    Make one with ``await connect_async(address)``. Calls on one ``AsyncMesh`` may run
    concurrently; they share one connection, one request at a time.
    """

    def __init__(
        self, address: str, creds: ClientCredentials, timeout: float, read_ahead: int = READ_AHEAD
    ) -> None:
        if not 1 <= read_ahead <= MAX_READ_AHEAD:
            raise ValueError(f"read_ahead must be between 1 and {MAX_READ_AHEAD}, not {read_ahead}")
        self.address = address
        self.timeout = timeout
        self.read_ahead = read_ahead
        """``obj.read`` calls one get keeps in flight to the node it reads from, sent
        ahead on one connection (the node answers them in order): while one chunk is
        hashed here, the next is read, encrypted and sent. What is in flight beyond the
        chunk being taken in waits in the node (a node writes one reply at a time per
        connection), so memory here stays bounded. 1 reads one chunk at a time."""
        self._conn = RpcConnection(address, creds, timeout=timeout)
        self._creds = creds
        self._holders: OrderedDict[str, RpcConnection] = OrderedDict()
        """Connections to nodes a read was redirected to (a few, least recently used
        closed first)."""
        self._spare: RpcConnection | None = None
        """A second connection to ``address`` for reads it serves or relays."""
        self._read_bytes = DEFAULT_READ_BYTES
        self.kv = AsyncKV(self)
        self.policies = AsyncPolicies(self)
        """The mesh's data-class policies (``client/policies.py``)."""

    @staticmethod
    def _mesh_error(e: RpcError, method: str) -> MeshError:
        """The error a caller of this API sees for a failed call of ``method``."""
        msg, code = str(e), getattr(e, "code", "")
        if code == ErrorCode.NOT_FOUND and method.startswith("obj."):
            return ObjectNotFoundError(msg, code)
        if code == ErrorCode.UNKNOWN_METHOD:
            msg += " (this node does not serve it; is it an older version?)"
        return MeshError(msg, code, unreachable=e.unreachable)

    async def _call(self, method: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await _while_starting(lambda: self._conn.call(method, args))
        except RpcError as e:
            raise self._mesh_error(e, method) from None
        except asyncio.CancelledError:
            # A reply may still be on its way: never reuse this connection for another call.
            await self._conn.close()
            raise

    async def _request(self, method: Method[Req, Rep], req: Req) -> Rep:
        """Typed ``method`` (``core/api``) on the connected node; ``MeshError`` if it
        fails. A node still starting (it answers ``STARTING`` to a method whose plane is
        not up yet, having done nothing) is asked again for up to ``STARTING_WAIT_S``."""
        try:
            return await _while_starting(lambda: self._conn.request(method, req))
        except RpcError as e:
            raise self._mesh_error(e, method.name) from None
        except asyncio.CancelledError:
            await self._conn.close()
            raise

    async def _call_dict(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        result = await self._call(method, args)
        if not isinstance(result, dict):
            raise MeshError(f"{self.address}: unexpected reply to {method}: {result!r:.200}")
        return result

    async def ping(self) -> None:
        """One round trip (TLS and token included); ``ConnectError`` if it fails."""
        try:
            await self._conn.request(node_api.MEMBERS, Empty())
        except RpcError as e:
            detail = str(e).removeprefix(f"{self.address}: ")
            raise ConnectError(f"cannot use node {self.address}: {detail}",
                               unreachable=e.unreachable) from None

    # -- objects

    async def put(
        self,
        data: bytes | bytearray | memoryview | str | Path | BinaryIO,
        *,
        replicas: int | None = None,
        w: int | None = None,
        data_class: str | None = None,
        residency: Sequence[str] | None = None,
        progress: Progress | None = None,
        allow_degraded: bool = False,
    ) -> ObjectRef:
        """Store an object; returns once ``w`` of its ``replicas`` copies are durable.

        ``data`` is bytes, a file path (``str`` or ``Path``; streamed, never read whole)
        or a binary file object (read from its current position). ``residency`` lists the
        regions its copies may live in; a rule the mesh cannot meet is refused, never
        bent. ``data_class`` names a class: with a policy set for it (``mesh.policies``)
        the put gets the class's regions, replicas and TTL for what it leaves out (None),
        and what it gives may narrow the class's rule, never widen it. Without a class,
        ``replicas`` defaults to 3 and ``w`` to 2. ``progress(sent, total)`` is called
        after each chunk. A put that fewer live nodes than ``replicas`` may hold now is
        refused (``MeshError``, rule ``replicas``) unless ``allow_degraded``: then it is
        stored on the nodes there are, with an ``UnderReplicatedWarning``, and repair adds
        the missing copies as nodes the rule allows join.
        """
        ref, note = await self._put(data, replicas, w, data_class, residency, progress,
                                    allow_degraded)
        if note is not None:
            warnings.warn(UnderReplicatedWarning(note), stacklevel=2)
        return ref

    async def _put(self, data: bytes | bytearray | memoryview | str | Path | BinaryIO,
                   replicas: int | None, w: int | None, data_class: str | None,
                   residency: Sequence[str] | None, progress: Progress | None,
                   allow_degraded: bool) -> tuple[ObjectRef, str | None]:
        """``put``: the ref, and what to warn of when it was stored degraded (the caller
        warns, in its own thread)."""
        replicas, w, regions = _check_policy(replicas, w, data_class, residency)
        source = await _open_source(data)
        try:
            return await self._upload(source, replicas, w, data_class, regions, progress,
                                      allow_degraded)
        finally:
            source.close()

    async def _upload(
        self,
        source: _Source,
        replicas: int | None,
        w: int | None,
        data_class: str | None,
        residency: list[str] | None,
        progress: Progress | None,
        allow_degraded: bool = False,
    ) -> tuple[ObjectRef, str | None]:
        total = source.size
        if total <= SMALL_PUT_BYTES:
            return await self._upload_small(source, replicas, w, data_class, residency, progress,
                                            allow_degraded)
        oid = await source.content_id()
        begin = await self._request(obj_api.PUT_BEGIN, obj_api.PutBeginRequest(
            size=total, replicas=replicas, w=w, residency=_residency(data_class, residency),
            id=oid, allow_degraded=allow_degraded))
        upload, chunk_bytes = begin.upload, begin.chunk_bytes
        try:
            if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
                raise MeshError(f"{self.address}: unusable chunk size {chunk_bytes}")
            self._read_bytes = chunk_bytes  # reads may ask for as much (spec: <= chunk_bytes)
            # With the id sent ahead, the node checks the bytes against it (and refuses a
            # put whose bytes do not match); without it, we hash them as they go.
            h = _new_hash() if oid is None else None
            await self._send_chunks(source, upload, chunk_bytes, h, progress)
            await source.check_exhausted()
            end = await self._request(obj_api.PUT_END, obj_api.UploadRequest(upload=upload))
        except BaseException:
            await self._abort(upload)
            raise
        expected = OBJECT_ID_PREFIX + h.hexdigest() if h is not None else str(oid)
        return self._stored(end, expected, total)

    def _stored(self, end: obj_api.PutReply, expected: str, total: int
                ) -> tuple[ObjectRef, str | None]:
        """The ref of a finished put, once the node's answer matches what was sent, and
        the warning to give when it was stored on fewer nodes than its replicas."""
        if end.id != expected or end.size != total:
            raise IntegrityError(
                f"{self.address} stored {end.id!r} ({end.size} bytes) but the "
                f"data sent was {expected} ({total} bytes)"
            )
        note = None
        if 0 < end.planned < end.replicas:
            note = (f"{expected}: stored on {end.planned} node(s), fewer than replicas="
                    f"{end.replicas}: only {end.planned} live node(s) may hold a copy under "
                    "its rule now; repair adds the rest as such nodes join")
        return ObjectRef(expected, total), note

    async def _send_chunks(self, source: _Source, upload: str, chunk_bytes: int,
                           h: Any, progress: Progress | None) -> None:
        """``obj.put_chunk`` calls, up to ``PUT_AHEAD`` sent ahead of their replies on the
        held connection: the next chunk is read, encrypted and on its way while the node
        takes in the last one (and streams it on to the replica set)."""
        total = source.size
        sent = 0
        if progress is not None:
            progress(0, total)
        pipe = await self._conn.pipeline()
        try:
            while sent < total:
                chunk = await source.read(min(chunk_bytes, total - sent))
                if not chunk:
                    raise MeshError(
                        f"upload source ended after {sent} of {total} bytes "
                        "(did the file shrink while being uploaded?)"
                    )
                if h is not None:
                    h.update(chunk)
                if pipe.outstanding >= PUT_AHEAD:
                    await self._pipe_reply(pipe)
                await self._pipe_send(pipe, obj_api.PutChunkRequest(upload=upload, data=chunk))
                sent += len(chunk)
                if progress is not None:
                    progress(sent, total)
            while pipe.outstanding:
                await self._pipe_reply(pipe)
        finally:
            await pipe.close()

    async def _pipe_send(self, pipe: RpcPipeline, req: obj_api.PutChunkRequest) -> None:
        try:
            await pipe.send_request(obj_api.PUT_CHUNK, req)
        except RpcError as e:
            raise self._mesh_error(e, obj_api.PUT_CHUNK.name) from None

    async def _pipe_reply(self, pipe: RpcPipeline) -> None:
        try:
            await pipe.receive_reply(obj_api.PUT_CHUNK)
        except RpcError as e:
            raise self._mesh_error(e, obj_api.PUT_CHUNK.name) from None

    async def _upload_small(
        self,
        source: _Source,
        replicas: int | None,
        w: int | None,
        data_class: str | None,
        residency: list[str] | None,
        progress: Progress | None,
        allow_degraded: bool = False,
    ) -> tuple[ObjectRef, str | None]:
        """A small object in one round trip (``obj.put_small``)."""
        total = source.size
        data = await source.read(total) if total else b""
        if len(data) != total:
            raise MeshError(f"upload source ended after {len(data)} of {total} bytes")
        await source.check_exhausted()
        expected = object_id(data)
        end = await self._request(obj_api.PUT_SMALL, obj_api.PutSmallRequest(
            data=data, replicas=replicas, w=w, residency=_residency(data_class, residency),
            allow_degraded=allow_degraded))
        stored = self._stored(end, expected, total)
        if progress is not None:
            progress(total, total)
        return stored

    async def _abort(self, upload: str) -> None:
        # Best effort: the node also drops an upload that goes quiet.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async with asyncio.timeout(ABORT_TIMEOUT_S):
                await self._conn.request(obj_api.PUT_ABORT, obj_api.UploadRequest(upload=upload))

    @overload
    async def get(
        self, ref: ObjectRef | str, *, path: None = None, progress: Progress | None = None
    ) -> bytes: ...

    @overload
    async def get(
        self, ref: ObjectRef | str, *, path: str | Path, progress: Progress | None = None
    ) -> Path: ...

    async def get(
        self,
        ref: ObjectRef | str,
        *,
        path: str | Path | None = None,
        progress: Progress | None = None,
    ) -> bytes | Path:
        """The object's bytes, verified against its id; with ``path``, stream them to
        that file instead (via a temp file next to it, renamed into place only once the
        whole object is verified) and return the path."""
        if path is None:
            buf = bytearray()

            async def append(chunk: bytes) -> None:
                buf.extend(chunk)

            await self._read_object(ref, append, progress)
            return bytes(buf)
        dest = Path(path).expanduser()
        sink = await asyncio.to_thread(_PathSink, dest)
        try:
            await self._read_object(ref, sink.write, progress)
            await sink.commit()
        except BaseException:
            sink.discard()
            raise
        return dest

    async def _read_object(
        self,
        ref: ObjectRef | str,
        sink: Callable[[bytes], Awaitable[None]],
        progress: Progress | None,
    ) -> None:
        oid, size = _ref_parts(ref)
        h = _new_hash()
        offset = 0
        chunk = self._read_bytes
        # One hop: a node without a copy names holders instead of relaying the bytes, and
        # we read from the first that answers over our own connection; if none does (not
        # reachable from here, gone meanwhile), the node relays them after all.
        source: RpcConnection | None = None
        redirect = True
        ahead: _ReadAhead | None = None
        try:
            while size is None or offset < size:
                want = chunk if size is None else min(chunk, size - offset)
                reply: obj_api.ReadReply | None = None
                if (ahead is None and not redirect and size is not None and self.read_ahead > 1
                        and want < size - offset):
                    # After the first reply: it told us where to read from and the chunk size.
                    ahead = await self._read_ahead(source, oid, offset, size, chunk)
                if ahead is not None:
                    try:
                        want, reply = await ahead.next()
                    except (RpcError, OSError):
                        # Read on one chunk at a time, through the node (which relays the
                        # bytes from another holder if this one failed).
                        await self._release_ahead(ahead)
                        ahead = None
                        if source is not None:
                            await self._forget_holder(source)
                            source = None
                        continue
                elif source is not None:
                    try:
                        reply = await source.request(obj_api.READ, obj_api.ReadRequest(
                            id=oid, offset=offset, length=want))
                    except (RpcError, OSError):
                        await self._forget_holder(source)
                        source = None
                if reply is None:
                    args = obj_api.ReadRequest(id=oid, offset=offset, length=want)
                    reply = await self._request(obj_api.READ, msgspec.structs.replace(
                        args, redirect=redirect))
                    redirect = False
                    if reply.redirect is not None:
                        source, reply = await self._follow(reply.redirect, args)
                        if reply is None:
                            reply = await self._request(obj_api.READ, args)
                data, reported = reply.data, reply.size
                if size is None:
                    size = reported
                elif reported != size:
                    raise IntegrityError(f"{oid}: the mesh has {reported} bytes, the ref says {size}")
                if len(data) > want or offset + len(data) > size:
                    raise IntegrityError(f"{oid}: {self.address} sent more bytes than asked for")
                if not data and offset < size:
                    raise MeshError(f"{oid}: {self.address} sent no bytes at offset {offset}/{size}")
                node_chunk = reply.chunk_bytes
                if 1 <= node_chunk <= MAX_CHUNK_BYTES:
                    chunk = self._read_bytes = node_chunk
                if len(data) < want and offset + len(data) < size:
                    # The node sends less per call than we asked: the reads queued ahead
                    # no longer line up with the offsets; ask for that much from here on.
                    chunk = len(data)
                    if ahead is not None:
                        await self._release_ahead(ahead)
                        ahead = None
                h.update(data)
                await sink(data)
                offset += len(data)
                if progress is not None:
                    progress(offset, size)
        finally:
            if ahead is not None:
                await self._release_ahead(ahead)
        if OBJECT_ID_PREFIX + h.hexdigest() != oid:
            raise IntegrityError(f"{oid}: the bytes read do not match the object id")

    async def read_range(self, ref: ObjectRef | str, offset: int, length: int) -> bytes:
        """``length`` bytes of the object from ``offset`` (fewer where it ends), read with
        the node's chunk reads (``obj.read`` at offsets; a node without a copy names a
        holder to read from), never the whole object. Unlike ``get``, the bytes are not
        checked against the id: a range cannot be (the id hashes the whole object)."""
        oid, _ = _ref_parts(ref)
        for what, v in (("offset", offset), ("length", length)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{what} must be an integer >= 0, not {v!r}")
        out = bytearray()
        source: RpcConnection | None = None
        redirect = True
        while len(out) < length:
            pos = offset + len(out)
            want = min(length - len(out), self._read_bytes)
            args = obj_api.ReadRequest(id=oid, offset=pos, length=want)
            reply: obj_api.ReadReply | None = None
            if source is not None:
                try:
                    reply = await source.request(obj_api.READ, args)
                except (RpcError, OSError):
                    await self._forget_holder(source)
                    source = None
            if reply is None:
                reply = await self._request(obj_api.READ, msgspec.structs.replace(
                    args, redirect=redirect))
                redirect = False
                if reply.redirect is not None:
                    source, reply = await self._follow(reply.redirect, args)
                    if reply is None:
                        reply = await self._request(obj_api.READ, args)
            if 1 <= reply.chunk_bytes <= MAX_CHUNK_BYTES:
                self._read_bytes = reply.chunk_bytes
            data = reply.data
            if len(data) > want:
                raise IntegrityError(f"{oid}: {self.address} sent more bytes than asked for")
            if pos >= reply.size:
                break
            if not data:
                raise MeshError(f"{oid}: {self.address} sent no bytes at offset "
                                f"{pos}/{reply.size}")
            out += data
        return bytes(out)

    async def _read_ahead(
        self, source: RpcConnection | None, oid: str, offset: int, size: int, chunk: int
    ) -> _ReadAhead:
        """Reads of ``oid`` from ``offset`` on, ``read_ahead`` at a time, from the node we
        read from: ``source`` (a holder), or the node we are connected to, on a second
        connection (ours stays free for other calls)."""
        if source is None:
            if self._spare is None:
                self._spare = RpcConnection(self.address, self._creds, self.timeout)
            source = self._spare
        return _ReadAhead(oid, offset, size, chunk, self.read_ahead, await source.pipeline())

    async def _release_ahead(self, ahead: _ReadAhead) -> None:
        await ahead.stop()

    async def _follow(
        self, holders: list[obj_api.Holder], args: obj_api.ReadRequest
    ) -> tuple[RpcConnection | None, obj_api.ReadReply | None]:
        """Read ``args`` from the first holder named by a redirect that answers; (its
        connection, the reply) or (None, None)."""
        for h in holders[:MAX_REDIRECT_HOLDERS]:
            addr = h.addr
            conn = self._holders.pop(addr, None) or RpcConnection(addr, self._creds, self.timeout)
            self._holders[addr] = conn
            while len(self._holders) > MAX_HOLDER_CONNECTIONS:
                _, old = self._holders.popitem(last=False)
                await old.close()
            try:
                reply = await conn.request(obj_api.READ, args)
            except (RpcError, OSError):
                await self._forget_holder(conn)
                continue
            if reply.redirect is None:
                return conn, reply
        return None, None

    async def _forget_holder(self, conn: RpcConnection) -> None:
        for addr, c in list(self._holders.items()):
            if c is conn:
                del self._holders[addr]
        await conn.close()

    async def members(self) -> list[dict[str, Any]]:
        """The members as the connected node sees them: name, address, region, zone,
        state ("alive", "suspect", "dead", "left"), incarnation, rtt_ms, labels."""
        rows = await self._request(node_api.MEMBERS, Empty())
        return [msgspec.to_builtins(r) for r in rows]

    async def stat(self, ref: ObjectRef | str) -> ObjectInfo:
        """Size, policy and where the copies are; ``ObjectNotFoundError`` if none is live."""
        oid, _ = _ref_parts(ref)
        return _info(await self._request(obj_api.STAT, obj_api.ObjectIdRequest(id=oid)))

    async def delete(self, ref: ObjectRef | str) -> list[str]:
        """Delete the object from every node; returns the live nodes that held a copy.
        Copies on nodes that are away now are dropped when they come back (tombstones;
        see the README). ``ObjectNotFoundError`` if no live node holds it."""
        oid, _ = _ref_parts(ref)
        reply = await self._request(obj_api.DELETE, obj_api.ObjectIdRequest(id=oid))
        return list(reply.holders)

    async def erase(self, *refs: ObjectRef | str, data_class: str | None = None,
                    key_prefix: str | None = None) -> Receipt:
        """Erase objects everywhere and get a signed receipt (admin role): name objects,
        or a ``data_class`` (every object of it; with ``key_prefix``, under the class's
        prefix ``<class>/``: the KV keys under it and the objects of the class they name).
        Every copy is deleted as ``delete`` deletes it; each node that held one confirms,
        signing it, that its copy is gone. Save the receipt with
        ``meshscale.client.erasure.save_receipt`` and check it with ``verify_receipt``
        (``docs/compliance.md``). ``ValueError`` for a malformed selector, before anything
        is sent; ``MeshError`` (``not_found``) if no live node holds any id named."""
        try:
            sel = check_selector(data_class, key_prefix, [_ref_parts(r)[0] for r in refs])
        except PolicyError as e:
            raise ValueError(str(e)) from None
        return await self._request(erasure_api.RUN, erasure_api.EraseRequest(
            data_class=sel.data_class, key_prefix=sel.key_prefix, ids=list(sel.ids)))

    async def iter_objects(self, page_size: int = LIST_PAGE, after: str = ""
                           ) -> AsyncGenerator[ObjectInfo, None]:
        """Every object in the mesh (with an id after ``after``), in id order, fetched a
        page at a time."""
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, not {page_size}")
        while True:
            page = await self._request(obj_api.LIST, obj_api.ListRequest(
                after=after, limit=min(page_size, obj_api.MAX_LIST_PAGE)))
            rows, nxt = page.objects, page.next
            for row in rows:
                yield _info(row)
            if not nxt or not rows:
                return
            if nxt <= after:
                raise MeshError(f"{self.address}: obj.list did not advance past {after!r}")
            after = nxt

    async def objects(self) -> list[ObjectInfo]:
        """Every object in the mesh with its holders and health."""
        return [info async for info in self.iter_objects()]

    # -- lifecycle

    async def close(self) -> None:
        await self._conn.close()
        while self._holders:
            _, conn = self._holders.popitem()
            await conn.close()
        if self._spare is not None:
            await self._spare.close()

    async def __aenter__(self) -> AsyncMesh:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _ReadAhead:
    """Up to ``depth`` ``obj.read`` calls sent ahead on one held connection (a node
    answers them in order, starting the next as soon as it has written a reply), so the
    node reads and sends chunk k+1 while we take in chunk k."""

    def __init__(self, oid: str, offset: int, size: int, chunk: int, depth: int,
                 pipeline: RpcPipeline) -> None:
        assert chunk >= 1 and depth >= 1
        self.oid = oid
        self.size = size
        self.chunk = chunk
        self.depth = depth
        self.next_offset = offset
        self.pipeline = pipeline
        self.sent: deque[int] = deque()

    async def _fill(self) -> None:
        while len(self.sent) < self.depth and self.next_offset < self.size:
            want = min(self.chunk, self.size - self.next_offset)
            await self.pipeline.send_request(obj_api.READ, obj_api.ReadRequest(
                id=self.oid, offset=self.next_offset, length=want))
            self.sent.append(want)
            self.next_offset += want

    async def next(self) -> tuple[int, obj_api.ReadReply]:
        """(bytes asked for, reply) of the next chunk in offset order."""
        await self._fill()
        want = self.sent.popleft()
        reply = await self.pipeline.receive_reply(obj_api.READ)
        await self._fill()  # before the caller takes its time with this chunk
        return want, reply

    async def stop(self) -> None:
        """Release the connection (closed if replies are still due on it)."""
        self.sent.clear()
        self.next_offset = self.size
        await self.pipeline.close()

def _kv_value(key: str, value: bytes | None, binary: bool) -> str | bytes | None:
    """A KV value as the caller asked: the stored bytes, or their UTF-8 text."""
    if value is None or binary:
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the value of key {key!r} is not UTF-8 text ({len(value)} bytes): "
                         "ask for it with binary=True") from None


class AsyncKV:
    """The mesh's replicated key-value space (last writer wins on HLC timestamps).

    ``consistency``: ``one`` (any replica), ``quorum`` (a majority; read-your-writes
    when both sides use it) or ``all``.
    """

    def __init__(self, mesh: AsyncMesh) -> None:
        self._mesh = mesh

    @overload
    async def get(self, key: str, consistency: Consistency = ...,
                  *, binary: Literal[False] = ...) -> str | None: ...

    @overload
    async def get(self, key: str, consistency: Consistency = ...,
                  *, binary: Literal[True]) -> bytes | None: ...

    async def get(self, key: str, consistency: Consistency = "quorum",
                  *, binary: bool = False) -> str | bytes | None:
        """The value as text (it was put as str, or is UTF-8), or None if the key has none
        (never set, or deleted). ``binary=True`` returns the bytes as stored; a value that
        is not UTF-8 asked for as text raises ``ValueError`` naming ``binary=True``."""
        reply = await self._mesh._request(obj_api.KV_GET, obj_api.KvKeyRequest(
            key=_check_key(key), consistency=_check_consistency(consistency)))
        return _kv_value(key, reply.value, binary)

    async def get_version(self, key: str, consistency: Consistency = "quorum"
                          ) -> tuple[bytes | None, str]:
        """The value as stored (None: no live value) and its version: the stamp to name
        in a conditional ``put(..., expected=)`` ("" when the key has no value)."""
        reply = await self._mesh._request(obj_api.KV_GET, obj_api.KvKeyRequest(
            key=_check_key(key), consistency=_check_consistency(consistency)))
        if reply.value is None:
            return None, ""
        return reply.value, reply.ts or ""

    async def put(self, key: str, value: bytes | str, consistency: Consistency = "quorum",
                  *, expected: str | Sequence[str] | None = None) -> str:
        """Set ``key`` (a str value is stored as UTF-8); returns the write's timestamp,
        the key's new version.

        ``expected`` makes it conditional (compare-and-swap): the version(s) the value
        must still have (from ``get_version`` or an earlier ``put``; "" for "no value"),
        else ``MeshError`` with code ``conflict`` and nothing is acknowledged. Of two
        concurrent conditional puts naming the same version at most one succeeds while
        the key's replicas are all up and both nodes' views agree on them (``core/kv.py``
        states the guarantee); it needs every replica of the key live (``unavailable``
        otherwise). A refused put may have reached a minority of replicas."""
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"a KV value is bytes or str, not {type(value).__name__}")
        if len(value) > MAX_VALUE_BYTES:  # refused here, naming the limit, not mid-send
            raise ValueError(f"a KV value is at most {MAX_VALUE_BYTES} bytes "
                             f"(MAX_VALUE_BYTES); this one is {len(value)}")
        exp: list[str] | None = None
        if expected is not None:
            exp = [expected] if isinstance(expected, str) else list(expected)
            if not 1 <= len(exp) <= MAX_EXPECTED or not all(isinstance(e, str) for e in exp):
                raise ValueError(f"expected takes 1..{MAX_EXPECTED} version strings")
        reply = await self._mesh._request(obj_api.KV_PUT, obj_api.KvPutRequest(
            key=_check_key(key), value=bytes(value),
            consistency=_check_consistency(consistency), expected=exp))
        return reply.ts

    async def delete(self, key: str, consistency: Consistency = "quorum") -> str:
        """Delete ``key`` (a tombstone that wins over older writes); returns its timestamp."""
        reply = await self._mesh._request(obj_api.KV_DELETE, obj_api.KvKeyRequest(
            key=_check_key(key), consistency=_check_consistency(consistency)))
        return reply.ts

    @overload
    def items(self, prefix: str = ..., *, page_size: int = ...,
              binary: Literal[False] = ...) -> AsyncGenerator[tuple[str, str], None]: ...

    @overload
    def items(self, prefix: str = ..., *, page_size: int = ...,
              binary: Literal[True]) -> AsyncGenerator[tuple[str, bytes], None]: ...

    def items(self, prefix: str = "", *, page_size: int = KV_LIST_PAGE, binary: bool = False
              ) -> AsyncGenerator[tuple[str, str], None] | AsyncGenerator[tuple[str, bytes], None]:
        """Every live key starting with ``prefix`` and its value (text, or bytes with
        ``binary=True``, as ``get``), in key order, fetched ``page_size`` keys at a time
        (``kv.list``: every live node's records merged, the newest of each key winning; a
        key all of whose replicas are away is missing)."""
        if binary:
            return self._items(prefix, page_size)
        return self._text_items(prefix, page_size)

    async def _text_items(self, prefix: str, page_size: int
                          ) -> AsyncGenerator[tuple[str, str], None]:
        it = self._items(prefix, page_size)
        try:
            async for key, value in it:
                text = _kv_value(key, value, False)
                assert isinstance(text, str)
                yield key, text
        finally:
            await it.aclose()

    async def _items(self, prefix: str, page_size: int
                     ) -> AsyncGenerator[tuple[str, bytes], None]:
        if not isinstance(prefix, str):
            raise ValueError(f"a KV prefix is a string, not {prefix!r:.100}")
        if isinstance(page_size, bool) or not 1 <= page_size <= obj_api.MAX_KV_LIST_PAGE:
            raise ValueError(f"page_size must be from 1 to {obj_api.MAX_KV_LIST_PAGE}, "
                             f"not {page_size!r}")
        after = ""
        while True:
            page = await self._mesh._request(obj_api.KV_LIST, obj_api.KvListRequest(
                prefix=prefix, after=after, limit=page_size))
            for e in page.entries:
                if e.value is not None:
                    yield e.key, e.value
            if page.next is None:
                return
            if page.next <= after:
                raise MeshError(f"{self._mesh.address}: kv.list did not advance past {after!r}")
            after = page.next

    async def keys(self, prefix: str = "", *, limit: int | None = None) -> list[str]:
        """The live keys starting with ``prefix``, in key order (at most ``limit``)."""
        out: list[str] = []
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, not {limit!r}")
        page = KV_LIST_PAGE if limit is None else min(limit, obj_api.MAX_KV_LIST_PAGE)
        it = self._items(prefix, page)
        try:
            async for key, _ in it:
                out.append(key)
                if limit is not None and len(out) >= limit:
                    break
        finally:
            await it.aclose()
        return out


M = TypeVar("M", bound="AsyncMesh")


async def open_mesh(
    cls: type[M],
    address: str,
    *,
    bundle: str | Path | None,
    token: str | None,
    timeout: float,
    read_ahead: int,
) -> M:
    """Check the arguments, load the credentials and connect a ``cls`` (``AsyncMesh`` or
    a subclass); the one way every ``connect`` opens a mesh."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, not {timeout}")
    addr = _check_address(address)
    if token is not None and not is_valid_token(token):
        raise ValueError("token must be one line of printable ASCII (no spaces), "
                         f"at most {MAX_TOKEN_LENGTH} characters")
    creds = await asyncio.to_thread(_credentials, bundle)
    if token is not None:
        creds = dataclasses.replace(creds, token=token)
    mesh = cls(addr, creds, timeout, read_ahead)
    try:
        await mesh.ping()
    except BaseException:
        await mesh.close()
        raise
    return mesh


async def connect_async(
    address: str,
    *,
    bundle: str | Path | None = None,
    token: str | None = None,
    timeout: float = 30.0,
    read_ahead: int = READ_AHEAD,
) -> AsyncMesh:
    """Connect to the mesh through the node at ``address`` (``HOST:PORT``).

    ``bundle`` is a client bundle directory (``meshscale bundle client``) or the admin
    bundle (default: ``$MESHSCALE_BUNDLE``); its certificate says what the client may do.
    ``token``: a token to send instead of the bundle's (e.g. one kept in a secret store);
    it can only narrow the certificate's role (the viewers' token reads only), and a wrong
    one is refused by the node: ``ConnectError``. ``timeout`` bounds each request.
    ``read_ahead`` (1 to ``MAX_READ_AHEAD``): chunk reads one get keeps in flight. Raises
    ``ConnectError`` if the node cannot be used.
    """
    return await open_mesh(AsyncMesh, address, bundle=bundle, token=token, timeout=timeout,
                           read_ahead=read_ahead)


# -- the blocking client ---------------------------------------------------------------


def _new_loop() -> asyncio.AbstractEventLoop:
    """The blocking client's loop: uvloop where installed (a dependency on POSIX), as
    the nodes run; its TLS and sockets are compiled code, where asyncio's are Python (a
    lone task's round trip spent most of the client's CPU in ``sslproto``)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _LoopThread:
    """An asyncio loop running in a daemon thread; ``run`` blocks on a coroutine there."""

    def __init__(self) -> None:
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self._main, name="meshscale-client", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # What still runs (a subscription's read sent ahead, never closed) is
            # cancelled and given a moment to end, as asyncio.run does, rather than
            # destroyed pending with the loop.
            with contextlib.suppress(Exception):
                tasks = asyncio.all_tasks(self.loop)
                for t in tasks:
                    t.cancel()
                if tasks:
                    self.loop.run_until_complete(asyncio.wait(tasks, timeout=1.0))
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a Mesh cannot be called from its own callbacks (e.g. progress); "
                "use AsyncMesh there"
            )
        if self.loop.is_closed() or not self._thread.is_alive():
            coro.close()
            raise MeshError("this Mesh is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()  # e.g. Ctrl-C: stop the request (an upload is aborted)
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join()


def _stop_loop(loop: asyncio.AbstractEventLoop) -> None:
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(loop.stop)


class Mesh:
    """A connection to a mesh through one node, with a blocking API.

    Make one with ``connect(address)``; use it as a context manager or ``close()`` it.
    Safe to share between threads. See ``AsyncMesh`` for what each method does.
    """

    def __init__(self, runner: _LoopThread, inner: AsyncMesh) -> None:
        self._runner = runner
        self._inner = inner
        self.kv = KV(self)
        self.policies = Policies(self)
        self._closed = False
        weakref.finalize(self, _stop_loop, runner.loop)

    @property
    def address(self) -> str:
        return self._inner.address

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise MeshError("this Mesh is closed")
        return self._runner.run(coro)

    def put(
        self,
        data: bytes | bytearray | memoryview | str | Path | BinaryIO,
        *,
        replicas: int | None = None,
        w: int | None = None,
        data_class: str | None = None,
        residency: Sequence[str] | None = None,
        progress: Progress | None = None,
        allow_degraded: bool = False,
    ) -> ObjectRef:
        """Store an object; returns once ``w`` of ``replicas`` copies are durable.
        ``data``: bytes, a file path (str or Path; streamed) or a binary file object.
        Refused when fewer live nodes than ``replicas`` may hold it, unless
        ``allow_degraded`` (then an ``UnderReplicatedWarning``): see ``AsyncMesh.put``."""
        ref, note = self._run(self._inner._put(data, replicas, w, data_class, residency,
                                               progress, allow_degraded))
        if note is not None:
            warnings.warn(UnderReplicatedWarning(note), stacklevel=2)
        return ref

    @overload
    def get(
        self, ref: ObjectRef | str, *, path: None = None, progress: Progress | None = None
    ) -> bytes: ...

    @overload
    def get(
        self, ref: ObjectRef | str, *, path: str | Path, progress: Progress | None = None
    ) -> Path: ...

    def get(
        self,
        ref: ObjectRef | str,
        *,
        path: str | Path | None = None,
        progress: Progress | None = None,
    ) -> bytes | Path:
        """The object's verified bytes; with ``path``, streamed to that file (atomically)."""
        if path is None:
            return self._run(self._inner.get(ref, progress=progress))
        return self._run(self._inner.get(ref, path=path, progress=progress))

    def read_range(self, ref: ObjectRef | str, offset: int, length: int) -> bytes:
        """Bytes ``offset`` to ``offset + length`` of the object, unverified (see
        ``AsyncMesh.read_range``)."""
        return self._run(self._inner.read_range(ref, offset, length))

    def members(self) -> list[dict[str, Any]]:
        """The members as the connected node sees them (see ``AsyncMesh.members``)."""
        return self._run(self._inner.members())

    def stat(self, ref: ObjectRef | str) -> ObjectInfo:
        return self._run(self._inner.stat(ref))

    def delete(self, ref: ObjectRef | str) -> list[str]:
        """Delete the object from every node; returns the live nodes that held a copy."""
        return self._run(self._inner.delete(ref))

    def erase(self, *refs: ObjectRef | str, data_class: str | None = None,
              key_prefix: str | None = None) -> Receipt:
        """Erase objects everywhere; the signed receipt (see ``AsyncMesh.erase``)."""
        return self._run(self._inner.erase(*refs, data_class=data_class,
                                           key_prefix=key_prefix))

    def iter_objects(self, page_size: int = LIST_PAGE, after: str = "") -> Iterator[ObjectInfo]:
        """Every object in the mesh (with an id after ``after``), a page at a time."""
        return _blocking_iter(self, self._inner.iter_objects(page_size, after))

    def objects(self) -> list[ObjectInfo]:
        return list(self.iter_objects())

    def close(self) -> None:
        if self._closed:
            return
        try:
            with contextlib.suppress(Exception):
                self._runner.run(self._inner.close())
        finally:
            self._closed = True
            self._runner.stop()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Mesh {self.address} {state}>"


class KV:
    """Blocking view of the mesh's KV space; see ``AsyncKV``."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    @overload
    def get(self, key: str, consistency: Consistency = ...,
            *, binary: Literal[False] = ...) -> str | None: ...

    @overload
    def get(self, key: str, consistency: Consistency = ...,
            *, binary: Literal[True]) -> bytes | None: ...

    def get(self, key: str, consistency: Consistency = "quorum",
            *, binary: bool = False) -> str | bytes | None:
        """The value as text, or bytes with ``binary=True``; see ``AsyncKV.get``."""
        inner = self._mesh._inner.kv
        if binary:
            return self._mesh._run(inner.get(key, consistency, binary=True))
        return self._mesh._run(inner.get(key, consistency))

    def put(self, key: str, value: bytes | str, consistency: Consistency = "quorum",
            *, expected: str | Sequence[str] | None = None) -> str:
        """See ``AsyncKV.put`` (``expected``: a conditional put)."""
        return self._mesh._run(self._mesh._inner.kv.put(key, value, consistency,
                                                        expected=expected))

    def get_version(self, key: str, consistency: Consistency = "quorum"
                    ) -> tuple[bytes | None, str]:
        """See ``AsyncKV.get_version``."""
        return self._mesh._run(self._mesh._inner.kv.get_version(key, consistency))

    def delete(self, key: str, consistency: Consistency = "quorum") -> str:
        return self._mesh._run(self._mesh._inner.kv.delete(key, consistency))

    @overload
    def items(self, prefix: str = ..., *, page_size: int = ...,
              binary: Literal[False] = ...) -> Iterator[tuple[str, str]]: ...

    @overload
    def items(self, prefix: str = ..., *, page_size: int = ...,
              binary: Literal[True]) -> Iterator[tuple[str, bytes]]: ...

    def items(self, prefix: str = "", *, page_size: int = KV_LIST_PAGE, binary: bool = False
              ) -> Iterator[tuple[str, str]] | Iterator[tuple[str, bytes]]:
        """Every live key starting with ``prefix`` and its value (text, or bytes with
        ``binary=True``), a page at a time."""
        inner = self._mesh._inner.kv
        if binary:
            return _blocking_iter(self._mesh, inner.items(prefix, page_size=page_size,
                                                          binary=True))
        return _blocking_iter(self._mesh, inner.items(prefix, page_size=page_size))

    def keys(self, prefix: str = "", *, limit: int | None = None) -> list[str]:
        return self._mesh._run(self._mesh._inner.kv.keys(prefix, limit=limit))


def connect(
    address: str,
    *,
    bundle: str | Path | None = None,
    token: str | None = None,
    timeout: float = 30.0,
    read_ahead: int = READ_AHEAD,
) -> Mesh:
    """Connect to the mesh through the node at ``address`` (``HOST:PORT``), blocking API.

    ``bundle``: the cluster bundle directory (default ``$MESHSCALE_BUNDLE``). ``token``:
    the admin token to use instead of the bundle's (see ``connect_async``). ``timeout``
    bounds each request, in seconds. ``read_ahead``: chunk reads one get keeps in flight
    (see ``AsyncMesh.read_ahead``). Raises ``ConnectError`` if the node cannot be used.
    """
    runner = _LoopThread()
    try:
        inner = runner.run(
            connect_async(address, bundle=bundle, token=token, timeout=timeout,
                          read_ahead=read_ahead)
        )
    except BaseException:
        runner.stop()
        raise
    return Mesh(runner, inner)


_I = TypeVar("_I")


def _blocking_iter(mesh: Mesh, agen: AsyncGenerator[_I, None]) -> Iterator[_I]:
    """An async generator of ``mesh``'s loop walked from the caller's thread, one item at
    a time (closed with the mesh's loop when the caller stops early)."""

    async def step() -> _I:
        return await agen.__anext__()

    try:
        while True:
            try:
                item = mesh._run(step())
            except StopAsyncIteration:
                return
            yield item
    finally:
        if not mesh._closed:
            mesh._run(agen.aclose())
