"""Streams for users: publish records near where they are produced, run operators on
them where the data is, subscribe to the results.

    import meshscale
    mesh = meshscale.connect("127.0.0.1:7946")
    mesh.operator("sensors", detect, placement="near-source", output="alerts", batch=True)
    s = mesh.stream("sensors")
    s.publish("machine-7", {"temp": 81.5})
    for rec in mesh.subscribe("alerts"):
        print(rec.key, rec.value)

A record is ``(key, value, id, ts)``: ``value`` is anything msgpack can carry (dict, list,
str, int, float, bool, bytes, None; NumPy scalars and arrays are converted with
``tolist()``), ``id`` is unique per record (made for you if not given), ``ts`` is when it
was produced. Delivery is at-least-once: after a failure a record may come twice, with
the same id; ``Subscription`` drops repeats it has seen (bounded memory of ids).

``publish`` returns once the record is buffered; a background sender ships batches to
the node and the node acknowledges once two nodes hold them. A record published while no
batch is in flight goes at once; records published while one is in flight go together in
the next (no linger timer, as with TCP_NODELAY: ``linger_s`` adds one if a caller wants
bigger batches at the cost of latency). A batch is in flight until the node has appended
it, not until its copy to the backup is confirmed: the sender waits for that copy beside
(``stream.copied``, ``core.streams.AckWindow``), counts a record acknowledged (``acked``,
``flush``) only once two nodes hold it, and keeps every record not acknowledged (within
``max_buffer``) to send again, in order, if the node fails. When the node's shard has
no room (its operator is slower than the producer) the node holds its answer, the buffer
fills, and ``publish`` blocks: a fast producer is slowed, never dropped. When the node
dies the sender moves to the nearest other node and re-sends what was not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import cloudpickle
import msgspec

import meshscale.client.codepack as codepack
from meshscale.client.mesh import MeshError
from meshscale.client.rpc import RemoteError, RpcConnection, RpcError
from meshscale.client.shipping import (
    Region,
    Regions,
    TaskSubmitError,
    by_value,
    modules_to_ship,
)
from meshscale.core.api import Empty, ErrorCode, Method, Request, ResidencyWire
from meshscale.core.api import node as node_api
from meshscale.core.api import streams as api
from meshscale.core.api.node import MemberInfo
from meshscale.core.api.streams import (
    OperatorMode,
    OpRegisterRequest,
    OpRemoveRequest,
    PublishRecord,
    PublishRequest,
    ReadRequest,
)
from meshscale.core.backoff import Backoff
from meshscale.core.placement import Residency
from meshscale.core.streams import MAX_DIRECT_HOLDERS, AckWindow, split_source

if TYPE_CHECKING:
    from meshscale.client.mesh import Mesh

__all__ = ["Operator", "Record", "Region", "Regions", "Stream", "StreamsMixin",
           "Subscription"]


class Record(msgspec.Struct, frozen=True):
    key: str
    value: Any
    id: str
    ts: float
    """When the record was produced (seconds since the epoch, the producer's clock)."""
    topic: str = ""
    source: str = ""
    """The record's shard: ``node~epoch`` of the node it entered the mesh at (the epoch
    changes when that node restarts)."""
    offset: int = -1

    @property
    def node(self) -> str:
        """The node the record entered the mesh at (``source`` without its epoch)."""
        return split_source(self.source)[0]


def _enc_hook(obj: Any) -> Any:
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"cannot encode a {type(obj).__name__} in a record (use plain values)")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_decoder = msgspec.msgpack.Decoder()


def encode_value(value: Any) -> bytes:
    try:
        return _encoder.encode(value)
    except (TypeError, msgspec.EncodeError) as e:
        raise ValueError(f"cannot encode record value: {e}") from None


def _make_operator_call(fn: Callable[..., Any], batch: bool) -> Callable[[list[Any]], Any]:
    """What the worker runs on a batch of ``[key, value bytes, id, ts]``: returns
    ``[(index, value bytes)]`` for the records that produced an output (None = none)."""

    def _meshscale_operator(rows: list[Any]) -> list[tuple[int, bytes]]:
        from meshscale.client.streams import Record as _Record
        from meshscale.client.streams import _decoder as _dec
        from meshscale.client.streams import encode_value as _encode

        if not rows:
            return []  # a warm-up call: unpickling this function was the point
        records = [_Record(k, _dec.decode(v), rid, ts) for k, v, rid, ts in rows]
        if batch:
            results = list(fn(records))
            if len(results) != len(records):
                raise ValueError(f"a batch operator must return one value per record "
                                 f"({len(records)}), it returned {len(results)}")
        else:
            results = [fn(r) for r in records]
        return [(i, _encode(v)) for i, v in enumerate(results) if v is not None]

    _meshscale_operator.__name__ = getattr(fn, "__name__", "operator")
    return _meshscale_operator


def _pickle_operator(fn: Callable[..., Any], batch: bool,
                     code: tuple[str, bytes] | None = None) -> bytes:
    """The operator's call wrapper pickled, with the modules of the user's project it
    reaches and the connection's code archive (``working_dir``) when there are any, as
    a task's function travels (``client/codepack.shipped_call``)."""
    if not callable(fn):
        raise TaskSubmitError(f"{fn!r} is not callable")
    import sys

    module_name = getattr(fn, "__module__", None) or "__main__"
    mod = sys.modules.get(module_name)
    shipped = modules_to_ship(fn)
    lazy = bool(shipped) or code is not None
    registered = False
    if module_name != "__main__" and mod is not None and by_value(module_name):
        with contextlib.suppress(ValueError):
            cloudpickle.register_pickle_by_value(mod)
            registered = True
    if lazy:
        cloudpickle.register_pickle_by_value(codepack)
    try:
        call = _make_operator_call(fn, batch)
        if lazy:
            inner: bytes = cloudpickle.dumps(call, protocol=5)
            data: bytes = cloudpickle.dumps(codepack.shipped_call(inner, shipped, code),
                                            protocol=5)
        else:
            data = cloudpickle.dumps(call, protocol=5)
        return data
    except Exception as e:
        raise TaskSubmitError(f"cannot pickle operator {getattr(fn, '__name__', fn)!r}: "
                              f"{type(e).__name__}: {e}") from None
    finally:
        if registered:
            with contextlib.suppress(ValueError):
                cloudpickle.unregister_pickle_by_value(mod)
        if lazy:
            with contextlib.suppress(ValueError):
                cloudpickle.unregister_pickle_by_value(codepack)


MAX_STARTING_RETRIES = 100

Req = TypeVar("Req", bound=Request)
Rep = TypeVar("Rep")


def _residency(regions: Sequence[str] | None,
               data_class: str | None = None) -> ResidencyWire | None:
    """A user's list of regions (and data class) as a topic's or operator's residency
    rule; a class with a policy is resolved by the node (``core/policy.py``)."""
    if data_class is not None and (not isinstance(data_class, str) or not data_class):
        raise ValueError(f"data_class must be a non-empty string or None, not {data_class!r}")
    if regions is None and data_class is None:
        return None
    return ResidencyWire.of(Residency(None if regions is None else frozenset(regions),
                                      data_class))


class _Failover:
    """The node a stream client talks to, and where it goes when that node fails: the
    other members, nearest first (same zone, same region, then the rest)."""

    def __init__(self, mesh: Mesh, timeout: float) -> None:
        self.mesh = mesh
        self.creds = mesh._inner._conn.creds
        self.timeout = timeout
        self.order: list[str] = [mesh.address]
        self.index = 0
        self.conn = RpcConnection(mesh.address, self.creds, timeout)

    async def learn(self) -> None:
        with contextlib.suppress(RpcError):
            members = await self.conn.request(node_api.MEMBERS, Empty())
            me = next((m for m in members if m.address == self.order[0]), None)

            def rank(m: MemberInfo) -> tuple[int, str]:
                if me is None:
                    return (3, m.name)
                if m.region == me.region and m.zone == me.zone:
                    return (1, m.name)
                return (2 if m.region == me.region else 3, m.name)

            others = sorted((m for m in members if m.address != self.order[0]
                             and m.state in ("alive", "suspect")), key=rank)
            self.order = [self.order[0], *[m.address for m in others]]

    async def request(self, method: Method[Req, Rep], req: Req, attempts: int = 0, *,
                      fail_over: bool = True) -> Rep:
        """Call on the current node; on a connection failure move to the next one and try
        again (up to every known node once). Errors the node answered are raised as is.
        ``fail_over=False``: on a connection failure move to the next node and raise (the
        caller sends again, in its own order)."""
        tries = max(attempts, len(self.order))
        last: Exception | None = None
        starting = 0
        while tries > 0:
            try:
                return await self.conn.request(method, req)
            except RpcError as e:
                if isinstance(e, RemoteError) and e.code == ErrorCode.STARTING and \
                        starting < MAX_STARTING_RETRIES:
                    starting += 1  # a node that just (re)started: its planes come up soon
                    await asyncio.sleep(0.2)
                    continue
                if not _is_connection_error(e):
                    raise
                tries -= 1
                last = e
                await self.move()
                if not fail_over:
                    raise
        raise MeshError(f"no node answered {method.name}: {last}")

    async def move(self) -> None:
        """Go to the next node in the order (this one failed)."""
        await self.conn.close()
        self.index = (self.index + 1) % len(self.order)
        self.conn = RpcConnection(self.order[self.index], self.creds, self.timeout)

    @property
    def address(self) -> str:
        return self.order[self.index]

    async def close(self) -> None:
        await self.conn.close()


READ_WAIT_MAX_S = 5.0
"""The longest a poll waits at the node (a longer ``timeout`` polls again)."""


def _is_connection_error(e: RpcError) -> bool:
    """The node could not be reached or went away (not: it answered with an error)."""
    return not isinstance(e, RemoteError)


COPY_RETRY_FIRST_S = 0.005
"""The first pause of a producer's ack loop after a ``stream.copied`` answer that
acknowledged nothing; it doubles up to ``COPY_RETRY_MAX_S`` until one does."""
COPY_RETRY_MAX_S = 0.5


class Stream:
    """A producer handle for one topic (see the module docstring)."""

    def __init__(self, mesh: Mesh, topic: str, *, residency: Sequence[str] | None = None,
                 linger_s: float = 0.0, max_batch: int = 512, max_buffer: int = 10_000,
                 timeout: float = 60.0, data_class: str | None = None) -> None:
        if not topic or "/" in topic:
            raise ValueError(f"invalid topic {topic!r}")
        if max_buffer < 1 or max_batch < 1:
            raise ValueError("max_buffer and max_batch must be positive")
        self.mesh = mesh
        self.topic = topic
        self.residency = _residency(residency, data_class)
        self.linger_s = linger_s
        self.max_batch = max_batch
        self.max_buffer = max_buffer
        self._buf: deque[PublishRecord] = deque()
        self._sending = 0
        """Records in the publish call in flight."""
        self._window: AckWindow[list[PublishRecord]] = AckWindow()
        """Batches appended at the node whose copy to the shard's backup is not
        confirmed yet (``core.streams.AckWindow``)."""
        self._inflight = 0
        """Records sent and not acknowledged: ``_sending`` and the window's."""
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}-{time.time_ns():x}-{id(self):x}"
        self._error: BaseException | None = None
        self._closed = False
        self.acked = 0
        self.failovers = 0
        self.window_waits = 0
        """How often the sender waited for an acknowledgement, its window full."""
        self.nodes_used: list[str] = []
        loop = mesh._runner.loop
        self._wake = asyncio.Event()
        self._acks_wake = asyncio.Event()
        """Set when the window grows (the ack loop has a copy to wait for)."""
        self._acked_wake = asyncio.Event()
        """Set when the ack loop acknowledged something (a full window has room)."""
        self._acks: RpcConnection | None = None
        """The connection ``stream.copied`` waits on (the publish connection answers
        the calls of one connection in order: a wait there would hold the next batch)."""
        self._moves = 0
        """How often the sender moved to another node (an ack loop's failure is acted on
        only if the sender has not moved since)."""
        self._node_failed = -1
        """The ``_moves`` at which the ack loop found the node failed (-1: none)."""
        self._copy_backoff = Backoff(first_s=COPY_RETRY_FIRST_S, max_s=COPY_RETRY_MAX_S)
        """The ack loop's wait after a ``stream.copied`` answer that acknowledged nothing
        (the node could not reach its backup): it asks again after it, not at once."""
        self._route = _Failover(mesh, timeout)
        mesh._run(self._route.learn())
        self._sender = asyncio.run_coroutine_threadsafe(self._send_loop(), loop)

    @property
    def node(self) -> str:
        """The address of the node records enter through now."""
        return self._route.address

    def publish(self, key: str, value: Any, id: str | None = None,
                ts: float | None = None) -> str:
        """Buffer one record; blocks while the buffer is full (backpressure)."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {type(key).__name__}")
        rid = str(id) if id is not None else f"{self._prefix}-{next(self._ids)}"
        row = PublishRecord(key, encode_value(value), rid,
                            time.time() if ts is None else float(ts))
        with self._cv:
            while len(self._buf) + self._inflight >= self.max_buffer:
                self._raise_if_failed()
                self._cv.wait(0.5)
            self._raise_if_failed()
            self._buf.append(row)
            kick = len(self._buf) == 1
        if kick:
            self.mesh._runner.loop.call_soon_threadsafe(self._wake.set)
        return rid

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise MeshError(f"stream {self.topic!r}: {self._error}")
        if self._closed:
            raise MeshError(f"stream {self.topic!r} is closed")

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every published record is acknowledged by the mesh."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._buf or self._inflight:
                self._raise_if_failed()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{len(self._buf) + self._inflight} records not "
                                       f"acknowledged after {timeout}s")
                self._cv.wait(0.1 if left is None else min(left, 0.1))
            self._raise_if_failed()

    def pending(self) -> int:
        with self._cv:
            return len(self._buf) + self._inflight

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.flush(timeout=30.0)
        with self._cv:
            self._closed = True
        self.mesh._runner.loop.call_soon_threadsafe(self._wake.set)
        with contextlib.suppress(Exception):
            self._sender.result(timeout=5.0)
        with contextlib.suppress(Exception):
            self.mesh._run(self._close_connections())

    async def _close_connections(self) -> None:
        await self._route.close()
        if self._acks is not None:
            await self._acks.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self) -> None:
        """``_inflight`` from its parts (the caller holds ``_cv``)."""
        self._inflight = self._sending + self._window.records

    def _requeue(self, batch: list[PublishRecord]) -> None:
        """Put the window's records, then ``batch``, back at the front of the buffer, in
        the order they were published (the caller holds ``_cv``): they are sent again,
        before anything newer."""
        again = [r for b in self._window.take_all() for r in b] + batch
        self._buf.extendleft(reversed(again))
        self._sending = 0
        self._count()

    def _again(self, batch: list[PublishRecord]) -> None:
        """``batch`` back at the front of the buffer (the node held it for room until
        its wait ran out): sent again next, behind what the window holds."""
        with self._cv:
            self._buf.extendleft(reversed(batch))
            self._sending = 0
            self._count()

    def _fail(self, e: MeshError, batch: list[PublishRecord]) -> None:
        with self._cv:
            self._error = e
            self._requeue(batch)
            self._cv.notify_all()

    async def _send_loop(self) -> None:
        acks = asyncio.get_running_loop().create_task(self._ack_loop())
        try:
            await self._send_batches()
        finally:
            # No await here: this also runs when a stream never closed is collected
            # after its mesh's loop closed.
            with contextlib.suppress(RuntimeError):
                acks.cancel()

    async def _send_batches(self) -> None:
        """Send what the buffer holds, a batch at a time, each as soon as the previous
        one is appended (its copy to the backup confirmed beside, by ``_ack_loop``): a
        record published while nothing is in flight goes at once, and records published
        while a batch is in flight go together in the next. On a node's failure every
        record not acknowledged is sent again to the next node, in order."""
        failures = 0
        while True:
            if self._node_failed == self._moves:
                # The ack loop lost the node: move, and send the window again.
                self._node_failed = -1
                with self._cv:
                    self._requeue([])
                await self._route.move()
                self._moves += 1
                self.failovers += 1
            if self._window.full():
                # As many batches as the window holds await their copy: what is
                # published meanwhile goes together once one is acknowledged.
                self.window_waits += 1
                self._acked_wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self._acked_wake.wait()
                continue
            with self._cv:
                batch = [self._buf.popleft() for _ in range(min(self.max_batch, len(self._buf)))]
                self._sending = len(batch)
                self._count()
                closed = self._closed
            if not batch:
                if closed:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):  # no task made per wait
                        await self._wake.wait()
                if self.linger_s:
                    await asyncio.sleep(self.linger_s)
                continue
            try:
                r = await self._route.request(api.PUBLISH, PublishRequest(
                    topic=self.topic, records=batch, residency=self.residency,
                    ack="appended"), fail_over=False)
            except MeshError as e:
                if e.code == ErrorCode.BACKPRESSURE:
                    self._again(batch)  # the node's wait ran out: ask again, in order
                    continue
                self._fail(e, batch)
                return
            except RpcError as e:
                if isinstance(e, RemoteError):
                    if e.code == ErrorCode.BACKPRESSURE:
                        self._again(batch)
                        continue
                    self._fail(MeshError(str(e), getattr(e, "code", "")), batch)
                    return
                # The node failed (the route moved on): what it holds unacknowledged
                # goes again to the next node, oldest first.
                failures += 1
                self._moves += 1
                self.failovers += 1
                if failures > len(self._route.order):
                    self._fail(MeshError(f"no node answered {api.PUBLISH.name}: {e}"), batch)
                    return
                with self._cv:
                    self._requeue(batch)
                continue
            failures = 0
            node = r.node
            if not self.nodes_used or self.nodes_used[-1] != node:
                self.nodes_used.append(node)
            with self._cv:
                self._sending = 0
                self._window.appended(r.source, r.last + 1, batch, len(batch))
                if r.copied is not None:
                    self.acked += self._window.settle(r.source, r.copied)
                self._count()
                self._cv.notify_all()
            self._acks_wake.set()

    async def _ack_loop(self) -> None:
        """Wait for the copy of what the window holds (``stream.copied``, on a connection
        of its own) and acknowledge it. A node that fails, or no longer has the shard,
        is left to the sender (``_node_failed``), which sends the window again."""
        while True:
            with self._cv:
                want = self._window.wanted()
            if want is None:
                self._acks_wake.clear()
                await self._acks_wake.wait()
                continue
            source, upto = want
            moves, address = self._moves, self._route.address
            if self._acks is None or self._acks.addr != address:
                if self._acks is not None:
                    await self._acks.close()
                self._acks = RpcConnection(address, self._route.creds, self._route.timeout)
            try:
                r = await self._acks.request(api.COPIED, api.CopiedRequest(
                    topic=self.topic, source=source, offset=upto))
            except RpcError as e:
                if isinstance(e, RemoteError) and e.code != ErrorCode.NOT_FOUND:
                    with self._cv:
                        self._error = MeshError(str(e), e.code)
                        self._cv.notify_all()
                    return
                await self._acks.close()
                self._acks = None
                with self._cv:
                    same = self._window.wanted() == want
                if not same or self._moves != moves:
                    continue  # acknowledged or sent again meanwhile: wait for what is left
                self._acks_wake.clear()
                self._node_failed = moves
                self._wake.set()
                self._acked_wake.set()  # a sender waiting for room hears it too
                await self._acks_wake.wait()  # until the sender has sent the window again
                continue
            with self._cv:
                settled = self._window.settle(source, r.copied)
                self.acked += settled
                self._count()
                self._cv.notify_all()
            self._acked_wake.set()
            if settled:
                self._copy_backoff.reset()
            else:
                # No copy yet (the backup is unreachable until the node's view drops it):
                # ask again after a growing pause, not in a loop as fast as it answers.
                await asyncio.sleep(self._copy_backoff.next_delay() or COPY_RETRY_MAX_S)


DIRECT_RETRY_S = 5.0
"""A holder whose direct read failed, or that no longer holds a shard from the cursor on,
is not read at directly again for this long (its shards come through the node)."""
READ_SLACK_S = 0.1
"""How much longer than its ``timeout`` a poll waits for the reads it sent to come back
(the node answers an empty read at the timeout; its answer then travels)."""

_Read = tuple[list[str] | None, api.ReadReply]


class Subscription:
    """Records of a topic from every shard, at least once, repeats dropped by id.

    A subscription reads through its node, which follows every shard of the topic into a
    mirror; the node names the shards held by another node of its region
    (``ReadReply.holders``, ``core.streams.direct_reads``), and those are read at their
    holder directly, one long-poll per holder beside the node's, so a record comes to
    the subscriber when it is appended, not after the node's follower got it too. A
    holder that fails or lets go of a shard (``moved``) sends the shard back through
    the node, from the same cursor. Each poll leaves the next reads sent (read ahead,
    one per node or holder, each at most ``max_records``): a record that lands while the
    caller handles the last ones is already on its way."""

    def __init__(self, mesh: Mesh, topic: str, *, remember: int = 200_000,
                 timeout: float = 30.0) -> None:
        self.mesh = mesh
        self.topic = topic
        self.cursors: dict[str, int] = {}
        self.duplicates = 0
        self.received = 0
        self.received_direct = 0
        """Records read at their shard's holder, not through the node."""
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._timeout = timeout
        self._route = _Failover(mesh, timeout)
        self._ready: deque[Record] = deque()
        """Records received and not yet returned by ``poll``."""
        self._direct: dict[str, str] = {}
        """Shards read at their holder: source -> the holder's address."""
        self._shunned: dict[str, float] = {}
        """Holders not read at directly until then (``DIRECT_RETRY_S``)."""
        self._conns: dict[str, RpcConnection] = {}
        self._reads: dict[str, asyncio.Task[_Read]] = {}
        """The read in flight per route: "" through the node, else at a holder."""
        mesh._run(self._route.learn())

    def poll(self, timeout: float = 1.0, max_records: int = 1000) -> list[Record]:
        """Records that arrived since the last poll (waits up to ``timeout`` for one)."""
        return self.mesh._run(self._poll(timeout, max_records))

    async def _poll(self, timeout: float, max_records: int) -> list[Record]:
        limit = max(1, min(max_records, api.MAX_READ_RECORDS))
        wait_s = max(0.0, min(timeout, READ_WAIT_MAX_S))
        deadline = time.monotonic() + max(0.0, timeout) + READ_SLACK_S
        self._collect()
        while not self._ready:
            self._send_reads(limit, wait_s)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done, _ = await asyncio.wait(list(self._reads.values()), timeout=left,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            self._collect()
            if not self._ready and all(not t.done() for t in self._reads.values()) and \
                    "" not in self._reads:
                break  # the node's read came back empty: the timeout is up
        out = [self._ready.popleft() for _ in range(min(limit, len(self._ready)))]
        if len(self._ready) < limit:
            # Read ahead, while fewer than a poll's worth wait here: records the caller
            # takes slower than they come stay at their shards (bounded here).
            self._send_reads(limit, wait_s)
        return out

    def _send_reads(self, limit: int, wait_s: float) -> None:
        """Send the reads not in flight: through the node (leaving out the shards read
        at their holder) and at each holder."""
        loop = asyncio.get_running_loop()
        if "" not in self._reads:
            self._reads[""] = loop.create_task(self._read_node(limit, wait_s))
        by_holder: dict[str, list[str]] = {}
        for source, addr in self._direct.items():
            by_holder.setdefault(addr, []).append(source)
        for addr, sources in sorted(by_holder.items()):
            if addr not in self._reads:
                self._reads[addr] = loop.create_task(
                    self._read_held(addr, sorted(sources), limit, wait_s))

    async def _read_node(self, limit: int, wait_s: float) -> _Read:
        return None, await self._route.request(api.READ, ReadRequest(
            topic=self.topic, cursors=dict(self.cursors), limit=limit, wait_s=wait_s,
            skip=sorted(self._direct)))

    async def _read_held(self, addr: str, sources: list[str], limit: int,
                         wait_s: float) -> _Read:
        conn = self._conns.get(addr)
        if conn is None:
            conn = self._conns[addr] = RpcConnection(addr, self._route.creds, self._timeout)
        return sources, await conn.request(api.READ, ReadRequest(
            topic=self.topic, cursors={s: self.cursors[s] for s in sources
                                       if s in self.cursors},
            limit=limit, wait_s=wait_s, held=sources))

    def _collect(self) -> None:
        """Take what the reads that came back brought; a read through the node that
        failed raises here, as the call did; one at a holder sends its shards back
        through the node."""
        for route, task in list(self._reads.items()):
            if not task.done():
                continue
            del self._reads[route]
            if task.cancelled():
                continue
            error = task.exception()
            if error is not None:
                if not route:
                    raise error
                self._shun(route)
                continue
            held, r = task.result()
            self._take(r.records, direct=held is not None)
            if held is not None:
                if r.moved:
                    self._shun(route)
                continue
            for source, addr in r.holders.items():
                if source not in self._direct and \
                        self._shunned.get(addr, 0.0) <= time.monotonic() and \
                        (addr in self._direct.values() or
                         len(set(self._direct.values())) < MAX_DIRECT_HOLDERS):
                    self._direct[source] = addr

    def _shun(self, addr: str) -> None:
        """Read the shards of holder ``addr`` through the node again, for a while."""
        self._shunned[addr] = time.monotonic() + DIRECT_RETRY_S
        for source in [s for s, a in self._direct.items() if a == addr]:
            del self._direct[source]

    def _take(self, records: list[api.ReadRecord], *, direct: bool) -> None:
        for x in records:
            source, off, rid = x.source, x.offset, x.id
            if off + 1 > self.cursors.get(source, 0):
                self.cursors[source] = off + 1
            self.received += 1
            if direct:
                self.received_direct += 1
            if rid in self._seen:
                self.duplicates += 1
                continue
            self._seen[rid] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
            self._ready.append(Record(x.key, _decoder.decode(x.value), rid, x.ts,
                                      self.topic, source, off))

    def __iter__(self) -> Iterator[Record]:
        while True:
            yield from self.poll(timeout=1.0)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.mesh._run(self._close())

    async def _close(self) -> None:
        reads = list(self._reads.values())
        self._reads.clear()
        for t in reads:
            t.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        for conn in self._conns.values():
            await conn.close()
        self._conns.clear()
        await self._route.close()


class Operator(msgspec.Struct, frozen=True):
    name: str
    topic: str
    output: str | None
    placement: str
    region: str | None


class StreamsMixin:
    """``stream`` / ``operator`` / ``subscribe`` on a blocking ``Mesh``."""

    def stream(self, topic: str, *, residency: Sequence[str] | None = None,
               max_buffer: int = 10_000, data_class: str | None = None) -> Stream:
        """A producer for ``topic``; records enter the mesh at this mesh's node.
        ``data_class``: the topic's shards stay in the class's stream regions."""
        return Stream(self, topic, residency=residency, max_buffer=max_buffer,  # type: ignore[arg-type]
                      data_class=data_class)

    def subscribe(self, topic: str) -> Subscription:
        """Read ``topic`` from its start (what the mesh still retains), every shard."""
        return Subscription(self, topic)  # type: ignore[arg-type]

    def operator(self, topic: str, fn: Callable[..., Any], *,
                 placement: str | Region | Regions = "near-source",
                 output: str | None = None, name: str | None = None, batch: bool = False,
                 batch_size: int = 256, residency: Sequence[str] | None = None,
                 labels: dict[str, str] | None = None,
                 data_class: str | None = None,
                 output_class: str | None = None) -> Operator:
        """Run ``fn`` on every record of ``topic`` (``fn(record) -> value | None``, or with
        ``batch=True`` ``fn(list_of_records) -> list_of_values``); non-None results go to
        ``output``. ``placement``: "near-source" (on or next to the node where records
        enter), "central" (the region with the most nodes), ``Region(name)`` or
        ``Regions([...])``. ``output`` takes the operator's class (its own, else its input
        topic's); ``output_class`` declares another, which must be at least as strict.
        Raises ``MeshError`` naming the rule when nowhere fits or a class is refused."""
        mode: OperatorMode = "near-source"
        region: str | None = None
        regions: list[str] | None = None
        if isinstance(placement, Region):
            mode, region = "central", placement.name
        elif isinstance(placement, Regions):
            mode, regions = "regions", list(placement.names)
        elif placement == "central":
            mode = "central"
        elif placement != "near-source":
            raise ValueError(f"placement must be 'near-source', 'central', Region(...) or "
                             f"Regions([...]), not {placement!r}")
        mesh: Mesh = self  # type: ignore[assignment]
        data = _pickle_operator(fn, batch, getattr(mesh._inner, "code", None))
        op_name = name or f"{getattr(fn, '__name__', 'operator')}-{topic}"
        r = mesh._run(mesh._inner._request(api.OP_REGISTER, OpRegisterRequest(
            name=op_name, topic=topic, output=output, mode=mode, region=region,
            regions=regions, residency=_residency(residency, data_class),
            labels=dict(labels or {}),
            output_residency=_residency(None, output_class),
            fn_bytes=data, batch=max(1, min(batch_size, api.MAX_FETCH_RECORDS)))))
        return Operator(op_name, topic, output, r.mode, r.region)

    def remove_operator(self, name: str) -> None:
        """Stop operator ``name`` everywhere (``MeshError`` if there is none)."""
        mesh: Mesh = self  # type: ignore[assignment]
        mesh._run(mesh._inner._request(api.OP_REMOVE, OpRemoveRequest(name=name)))
