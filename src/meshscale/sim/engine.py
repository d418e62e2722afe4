"""Deterministic discrete-event simulator that drives sans-I/O protocols.

The simulator is the second driver of ``core/`` (the asyncio runtime is the first) and
follows the same contract (``core.outputs``): feed an input with ``now``, ``drain()`` the
outputs, route them, and wake the node when ``next_deadline()`` comes. It decides
nothing itself; it moves bytes with a network model (latency from a ``Topology``,
jitter, loss, partitions), keeps virtual time, and injects faults (crash, restart,
pause, slowness).

A run is a pure function of (code, config, seed). Every choice comes from seeded
``random.Random`` streams; the event queue is ordered by (time, sequence number) and
never by object identity or hash; node iteration follows insertion order. A running
BLAKE2b over every processed event (``trace_hash()``) makes "same seed, same run"
checkable bit for bit.

Speed matters (1,000 nodes for 300 virtual seconds is millions of events), so the event
queue is a ``heapq`` of plain tuples ``(time, seq, kind, node, src, payload, aux,
epoch)``, the datagram path is inlined, and nodes are ``__slots__`` records that queue
entries point at directly.

Timers are lazily invalidated: each node has at most one *valid* wake entry (its
``seq`` is remembered); a popped entry whose ``seq`` is not the node's current one is
stale and skipped, and a valid one fires ``on_timer`` only if ``next_deadline()`` is
really due, otherwise it is re-armed at the later deadline.

Streams model one TCP exchange: the request reaches the peer after about 1.5 RTT
(connect plus send), the reply comes back after 0.5 RTT, and the whole exchange is
bounded by ``stream_timeout_s``; whatever has not completed by then (peer crashed,
partitioned, paused, too slow) ends in ``stream_failed``. A ``None`` reply completes the
exchange without a callback, like a one-way push.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import random
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from heapq import heappop, heappush
from typing import Any

from meshscale.core.outputs import DrivenProtocol, Event, Output, SendDatagram, StreamRequest
from meshscale.sim.topology import Placement, Topology

__all__ = ["Factory", "NodeContext", "NodeStats", "SimStats", "Simulator"]

# Event kinds. Inputs to a node (< _READY) may be held back by a pause or slowness; a
# held-back input is re-queued as kind + _READY once its processing time comes.
_K_DGRAM = 0
_K_TIMER = 1
_K_STREAM_REQ = 2
_K_STREAM_REPLY = 3
_K_STREAM_FAIL = 4
_K_CALL = 5
_K_ACTION = 6
_K_RESUME = 7
_READY = 16
# Kinds only used as tags in the trace hash.
_H_EVENT = 32
_H_TEXT = 33

# A timer that is still due right after on_timer(now) may re-fire at the same instant
# this many times (a protocol that sets a zero-delay timer), then it is pushed forward by
# _TIMER_RESOLUTION_S so that a protocol stuck on a past deadline cannot freeze time.
_MAX_FIRINGS_PER_INSTANT = 8
_TIMER_RESOLUTION_S = 0.001

_TRACE_FLUSH_BYTES = 1 << 20
# While events run, the cyclic GC's youngest generation is collected after this many
# allocations instead of CPython's 700: a run allocates millions of short-lived,
# acyclic objects (messages, tuples), and at 1,000 nodes and more a young collection
# every 700 of them (and the older ones it triggers) cost a third of the run. What a
# young collection walks is what is still alive of the young objects, mostly protocol
# timers waiting in their heaps (at 1,000 nodes with slow members, hundreds of
# thousands): at 100,000 each survivor was walked again by a middle-generation
# collection every ten young ones. Cycles are still collected, just in bigger
# batches; the setting is restored on return.
_GC_GEN0_THRESHOLD = 1_000_000
_HEADER = struct.Struct("<dBIII")  # time, kind, node index a, node index b, payload length
_pack_header = _HEADER.pack

_Entry = tuple[float, int, int, Any, Any, Any, Any, int]


@dataclass
class NodeContext:
    """What a protocol factory gets to build one incarnation of a node."""

    name: str
    region: str
    zone: str
    rng: random.Random  # from (sim seed, node name, restart count)
    now: float
    disk: dict[str, Any]  # survives crash and restart: the node's data directory
    restarts: int


Factory = Callable[[NodeContext], DrivenProtocol]


@dataclass(slots=True)
class NodeStats:
    """Counters of one node (kept across its restarts).

    Drops are counted at the node the datagram was addressed to, except
    ``dropped_unknown_dst`` (counted at the sender: no node has that address).
    """

    datagrams_sent: int = 0
    bytes_sent: int = 0
    datagrams_received: int = 0
    bytes_received: int = 0
    dropped_loss: int = 0
    dropped_partition: int = 0
    dropped_down: int = 0
    dropped_pause_overflow: int = 0
    dropped_unknown_dst: int = 0
    streams_sent: int = 0
    stream_bytes_sent: int = 0
    streams_received: int = 0
    stream_replies_received: int = 0
    streams_failed: int = 0
    timers_fired: int = 0
    events_emitted: int = 0
    deadlines_clamped: int = 0  # next_deadline() was already in the past when read
    timers_stalled: int = 0  # still due after on_timer(now) too often: pushed forward

    @property
    def dropped(self) -> int:
        return (
            self.dropped_loss
            + self.dropped_partition
            + self.dropped_down
            + self.dropped_pause_overflow
            + self.dropped_unknown_dst
        )

    def add(self, other: NodeStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class SimStats:
    """Per-node counters, plus what the engine itself did."""

    nodes: dict[str, NodeStats] = field(default_factory=dict)
    events_processed: int = 0  # inputs handed to protocols + scenario actions
    stale_timer_entries: int = 0  # superseded wake entries popped and skipped

    def totals(self) -> NodeStats:
        total = NodeStats()
        for stats in self.nodes.values():
            total.add(stats)
        return total


class _Node:
    """Engine-side state of one simulated node. Queue entries point at these."""

    __slots__ = (
        "access",
        "disk",
        "epoch",
        "factory",
        "fired_at",
        "fired_count",
        "gated",
        "group",
        "idx",
        "link_loss",
        "name",
        "pause_dgrams",
        "pause_queue",
        "pause_token",
        "paused",
        "placement",
        "proto",
        "restarts",
        "slow",
        "slow_next",
        "st",
        "timer_at",
        "timer_gated",
        "timer_seq",
        "up",
        "z",
        "zrow",
    )

    def __init__(
        self,
        idx: int,
        name: str,
        placement: Placement,
        factory: Factory,
        st: NodeStats,
    ) -> None:
        self.idx = idx
        self.name = name
        self.placement = placement
        self.factory = factory
        self.z = 0  # (region, zone) index
        self.zrow: list[float] = []  # core RTT from this node's zone to each zone index
        self.access = placement.access_s
        self.st = st
        self.proto: DrivenProtocol | None = None
        self.up = False
        self.epoch = 0  # bumped on crash: invalidates entries addressed to the old life
        self.restarts = 0
        self.disk: dict[str, Any] = {}
        self.group = -1  # partition group, -1 = talks to everyone
        self.link_loss: dict[str, float] = {}
        self.timer_at: float | None = None
        self.timer_seq = -1
        self.timer_gated = False  # a held-back timer input is pending (slow node)
        self.fired_at = -1.0
        self.fired_count = 0
        self.gated = False  # paused or slow: inputs take the slow path
        self.paused = False
        self.pause_token = 0
        self.pause_queue: list[tuple[int, Any, Any, Any, int]] = []
        self.pause_dgrams = 0
        self.slow = 0.0
        self.slow_next = 0.0


class Simulator:
    """Virtual time, a network and faults around a set of driven protocols."""

    def __init__(
        self,
        topology: Topology,
        seed: int,
        *,
        loss: float = 0.0,
        stream_timeout_s: float = 1.0,
        pause_queue_limit: int = 512,
        record_trace: bool = False,
    ) -> None:
        _check_probability("loss", loss)
        if not stream_timeout_s > 0.0:
            raise ValueError(f"stream_timeout_s must be > 0, got {stream_timeout_s!r}")
        if pause_queue_limit < 0:
            raise ValueError(f"pause_queue_limit must be >= 0, got {pause_queue_limit}")
        self.topology = topology
        self.seed = seed
        self.now = 0.0
        # Separate streams so that a scenario drawing more numbers does not shift the
        # network's draws, and vice versa. String seeds hash with SHA-512: stable.
        self.rng = random.Random(f"meshscale-sim/{seed}/scenario")
        self._net_rng = random.Random(f"meshscale-sim/{seed}/network")
        self.stream_timeout_s = stream_timeout_s
        self.pause_queue_limit = pause_queue_limit
        self.observers: list[Callable[[float, str, Event], None]] = []
        self._stats = SimStats()
        self.trace: list[str] | None = [] if record_trace else None

        self._loss = loss
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._nodes: dict[str, _Node] = {}
        self._groups: dict[str, int] = {}
        self._pending_streams: set[int] = set()
        self._stream_ids = itertools.count()
        self._events = 0
        self._stale = 0
        self._hash = hashlib.blake2b(digest_size=32)
        self._tbuf = bytearray()

        jitter = topology.jitter
        # one-way delay = rtt / 2 * (1 + U(-jitter, +jitter)) = rtt * (_half + _jit * U(0, 1))
        self._half = 0.5 * (1.0 - jitter)
        self._jit = jitter
        self._zone_idx: dict[tuple[str, str], int] = {}
        self._zrtt: list[list[float]] = []  # core RTT between zone indices

    # ------------------------------------------------------------------ nodes

    def add_node(self, name: str, placement: Placement, factory: Factory) -> None:
        """Add a node and start it now."""
        if name in self._nodes:
            raise ValueError(f"node {name!r} already exists")
        st = self._stats.nodes.setdefault(name, NodeStats())
        node = _Node(
            len(self._nodes),
            name,
            placement,
            factory,
            st,
        )
        node.z = self._zone_index(placement)
        node.zrow = self._zrtt[node.z]
        node.group = self._groups.get(name, -1)
        self._nodes[name] = node
        self._text(f"add {name} {placement.region}/{placement.zone}")
        self._start(node)

    def protocol(self, name: str) -> DrivenProtocol:
        """The node's current protocol instance (the last one, if it is crashed)."""
        proto = self._node(name).proto
        assert proto is not None
        return proto

    def names(self) -> list[str]:
        """All node names, in the order they were added."""
        return list(self._nodes)

    def is_up(self, name: str) -> bool:
        return self._node(name).up

    def is_paused(self, name: str) -> bool:
        return self._node(name).paused

    def connected(self, a: str, b: str) -> bool:
        """Can ``a`` and ``b`` reach each other through the current partition (whether or
        not they are up)?"""
        return not self._blocked(self._node(a), self._node(b))

    def placement(self, name: str) -> Placement:
        return self._node(name).placement

    def true_rtt(self, a: str, b: str) -> float:
        """Topology RTT between two nodes, without jitter."""
        return self.topology.base_rtt(self._node(a).placement, self._node(b).placement)

    @property
    def events_processed(self) -> int:
        return self._events

    @property
    def stats(self) -> SimStats:
        self._sync_stats()
        return self._stats

    # --------------------------------------------------------------- scenario

    def call(self, name: str, fn: Callable[[DrivenProtocol, float], None]) -> None:
        """Run a local request ``fn(protocol, now)`` in a node now and route its outputs.

        A paused node runs it when it resumes; a crashed node cannot take it.
        """
        node = self._node(name)
        if not node.up:
            raise RuntimeError(f"node {name!r} is down")
        if node.paused:
            node.pause_queue.append((_K_CALL, None, fn, None, 0))
            return
        self._process(node, _K_CALL, None, fn, None, 0, self.now)

    def at(self, t: float, action: Callable[[], None]) -> None:
        """Run a scenario action at virtual time ``t`` (now, if ``t`` is in the past)."""
        t = max(t, self.now)
        heappush(self._heap, (t, next(self._seq), _K_ACTION, None, None, action, None, 0))

    def run_until(self, t_end: float) -> None:
        """Process every event up to and including virtual time ``t_end``."""
        heap = self._heap
        thresholds = gc.get_threshold()
        if 0 < thresholds[0] < _GC_GEN0_THRESHOLD:
            gc.set_threshold(_GC_GEN0_THRESHOLD, *thresholds[1:])
        try:
            while heap and heap[0][0] <= t_end:
                t, seq, kind, node, src, payload, aux, epoch = heappop(heap)
                self.now = t
                if kind == _K_DGRAM:
                    # The hot path: one datagram arriving.
                    if not node.up:
                        node.st.dropped_down += 1
                        continue
                    g = node.group
                    if g >= 0 and src.group >= 0 and g != src.group:
                        node.st.dropped_partition += 1
                        continue
                    if node.gated:
                        self._gate(node, kind, src, payload, aux, epoch, t)
                        continue
                    self._events += 1
                    st = node.st
                    n = len(payload)
                    st.datagrams_received += 1
                    st.bytes_received += n
                    tbuf = self._tbuf
                    tbuf += _pack_header(t, _K_DGRAM, src.idx, node.idx, n)
                    tbuf += payload
                    if len(tbuf) > _TRACE_FLUSH_BYTES:
                        self._flush_trace()
                    if self.trace is not None:
                        self.trace.append(f"{t:.6f} dgram {src.name}->{node.name} {n}B")
                    proto = node.proto
                    proto.handle_datagram(src.name, payload, t)
                    # self._after(node, t), inlined: this runs for every datagram.
                    outs = proto.drain()
                    if outs:
                        self._route(node, outs, t)
                    if node.timer_gated or not node.up:
                        continue
                    d = proto.next_deadline()
                    if d is not None:
                        at = node.timer_at
                        if at is None or d < at:
                            if d < t:
                                node.st.deadlines_clamped += 1
                                d = t
                            seq = next(self._seq)
                            node.timer_at = d
                            node.timer_seq = seq
                            heappush(heap, (d, seq, _K_TIMER, node, None, None, None, 0))
                elif kind == _K_TIMER:
                    if seq != node.timer_seq:
                        self._stale += 1
                        continue
                    node.timer_seq = -1
                    node.timer_at = None
                    if node.gated:
                        if not node.paused:  # slow; a paused node re-arms on resume
                            node.timer_gated = True
                            self._gate(node, kind, None, None, None, 0, t)
                        continue
                    self._fire_timer(node, t)
                elif kind == _K_STREAM_REQ:
                    self._stream_arrives(node, src, payload, aux, epoch, t)
                elif kind == _K_STREAM_REPLY:
                    self._reply_arrives(node, src, payload, aux, epoch, t)
                elif kind == _K_STREAM_FAIL:
                    # Timeout of an exchange: fails it unless it completed meanwhile.
                    if aux not in self._pending_streams:
                        continue
                    self._pending_streams.discard(aux)
                    if node.epoch != epoch or not node.up:
                        continue
                    if node.gated:
                        self._gate(node, kind, None, payload, aux, epoch, t)
                    else:
                        self._process(node, kind, None, payload, aux, epoch, t)
                elif kind >= _READY:
                    # A held-back input whose processing time has come.
                    if node.epoch != epoch:
                        continue  # crashed meanwhile
                    aux, epoch = aux
                    kind -= _READY
                    if node.paused:
                        self._queue_paused(node, kind, src, payload, aux, epoch)
                        continue
                    if kind == _K_TIMER:
                        node.timer_gated = False
                    self._process(node, kind, src, payload, aux, epoch, t)
                elif kind == _K_ACTION:
                    self._events += 1
                    self._tbuf += _pack_header(t, _K_ACTION, 0, 0, 0)
                    payload()
                elif kind == _K_RESUME:
                    if node.paused and node.pause_token == aux and node.up:
                        self._resume(node, t)
                else:  # pragma: no cover - all kinds are handled above
                    raise AssertionError(f"unknown event kind {kind}")
        finally:
            gc.set_threshold(*thresholds)
            self._sync_stats()
        if t_end > self.now:
            self.now = t_end

    def run_until_true(
        self, pred: Callable[[], bool], deadline: float, check_every_s: float = 0.1
    ) -> bool:
        """Run until ``pred()`` holds (checked every ``check_every_s`` of virtual time) or
        ``deadline`` passes; return whether it held."""
        if not check_every_s > 0.0:
            raise ValueError(f"check_every_s must be > 0, got {check_every_s!r}")
        if pred():
            return True
        while self.now < deadline:
            self.run_until(min(self.now + check_every_s, deadline))
            if pred():
                return True
        return False

    # ----------------------------------------------------------------- faults

    def crash(self, name: str) -> None:
        """Stop a node silently: nothing in or out, timers stop, pending inputs dropped."""
        node = self._node(name)
        if not node.up:
            return
        self._text(f"crash {name}")
        node.up = False
        node.epoch += 1
        node.timer_seq = -1
        node.timer_at = None
        node.timer_gated = False
        node.paused = False
        node.pause_queue = []
        node.pause_dgrams = 0
        node.slow_next = 0.0
        node.gated = node.slow > 0.0

    def restart(self, name: str) -> None:
        """Start a fresh instance from the factory with the same disk, restarts + 1.

        A running node is crashed first."""
        node = self._node(name)
        if node.up:
            self.crash(name)
        node.restarts += 1
        self._text(f"restart {name} {node.restarts}")
        self._start(node)

    def pause(self, name: str, duration_s: float) -> None:
        """Stop processing for ``duration_s`` (like SIGSTOP, then SIGCONT).

        Inputs arriving meanwhile are queued (datagrams up to ``pause_queue_limit``, the
        rest dropped); on resume the queue is processed in order, then due timers fire.
        """
        if not duration_s >= 0.0:
            raise ValueError(f"duration_s must be >= 0, got {duration_s!r}")
        node = self._node(name)
        if not node.up:
            return
        self._text(f"pause {name} {duration_s!r}")
        node.paused = True
        node.gated = True
        node.pause_token += 1
        heappush(
            self._heap,
            (
                self.now + duration_s,
                next(self._seq),
                _K_RESUME,
                node,
                None,
                None,
                node.pause_token,
                0,
            ),
        )

    def set_slow(self, name: str, delay_s: float) -> None:
        """Delay every input of the node by ``delay_s * U(0.5, 1.5)`` (order is kept);
        0 turns it off."""
        if not delay_s >= 0.0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s!r}")
        node = self._node(name)
        self._text(f"slow {name} {delay_s!r}")
        node.slow = delay_s
        if delay_s == 0.0:
            node.slow_next = 0.0
        node.gated = node.paused or delay_s > 0.0

    def set_loss(self, p: float) -> None:
        """Uniform loss probability of every datagram."""
        _check_probability("loss", p)
        self._text(f"loss {p!r}")
        self._loss = p

    def set_link_loss(self, a: str, b: str, p: float) -> None:
        """Extra loss on the link between ``a`` and ``b`` (both directions), on top of the
        global loss."""
        _check_probability("loss", p)
        na, nb = self._node(a), self._node(b)
        self._text(f"link-loss {a} {b} {p!r}")
        if p == 0.0:
            na.link_loss.pop(b, None)
            nb.link_loss.pop(a, None)
        else:
            na.link_loss[b] = p
            nb.link_loss[a] = p

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the listed nodes into groups that cannot reach each other; unlisted
        nodes still reach everyone. Replaces any earlier partition."""
        assignment: dict[str, int] = {}
        for gi, group in enumerate(groups):
            for name in group:
                if name in assignment:
                    raise ValueError(f"node {name!r} is in two partition groups")
                assignment[name] = gi
        self._text("partition " + " | ".join(",".join(g) for g in _groups_text(assignment)))
        self._groups = assignment
        for name, node in self._nodes.items():
            node.group = assignment.get(name, -1)

    def heal(self) -> None:
        """End any partition."""
        self._text("heal")
        self._groups = {}
        for node in self._nodes.values():
            node.group = -1

    # ------------------------------------------------------------ observation

    def trace_hash(self) -> str:
        """Hex BLAKE2b digest of everything processed so far."""
        self._flush_trace()
        return self._hash.copy().hexdigest()

    # --------------------------------------------------------------- internals

    def _node(self, name: str) -> _Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"no node named {name!r}") from None

    def _zone_index(self, placement: Placement) -> int:
        """Index of the node's (region, zone), growing the zone-to-zone RTT matrix."""
        key = (placement.region, placement.zone)
        idx = self._zone_idx.get(key)
        if idx is None:
            idx = len(self._zone_idx)
            self._zone_idx[key] = idx
            core = self.topology.core_rtt
            here = Placement(*key)
            others = [Placement(r, z) for r, z in self._zone_idx]
            for other, row in zip(others, self._zrtt, strict=False):
                row.append(core(other, here))
            # Rows are shared by reference with the nodes (node.zrow): grow them in place.
            self._zrtt.append([core(here, other) for other in others])
        return idx

    def _start(self, node: _Node) -> None:
        placement = node.placement
        ctx = NodeContext(
            name=node.name,
            region=placement.region,
            zone=placement.zone,
            rng=random.Random(f"meshscale-sim/{self.seed}/node/{node.name}/{node.restarts}"),
            now=self.now,
            disk=node.disk,
            restarts=node.restarts,
        )
        node.proto = node.factory(ctx)
        node.up = True
        node.timer_seq = -1
        node.timer_at = None
        node.timer_gated = False
        node.fired_count = 0
        self._after(node, self.now)

    def _after(self, node: _Node, now: float) -> None:
        """Route what the node queued, then (re-)arm its wake-up."""
        proto = node.proto
        assert proto is not None
        outs = proto.drain()
        if outs:
            self._route(node, outs, now)
        if node.timer_gated or not node.up:
            return
        d = proto.next_deadline()
        if d is not None:
            at = node.timer_at
            if at is None or d < at:
                if d < now:
                    node.st.deadlines_clamped += 1
                    d = now
                seq = next(self._seq)
                node.timer_at = d
                node.timer_seq = seq
                heappush(self._heap, (d, seq, _K_TIMER, node, None, None, None, 0))

    def _route(self, node: _Node, outs: list[Output], now: float) -> None:
        st = node.st
        # Fixed for the simulator's life: looked up once per drained batch, not per
        # datagram (the loss is not: an observer may change it between two outputs).
        nodes = self._nodes
        heap = self._heap
        seq = self._seq
        rnd = self._net_rng.random
        half = self._half
        jit = self._jit
        for out in outs:
            if type(out) is SendDatagram or isinstance(out, SendDatagram):
                payload = out.payload
                st.datagrams_sent += 1
                st.bytes_sent += len(payload)
                dst = nodes.get(out.addr)
                if dst is None:
                    st.dropped_unknown_dst += 1
                    continue
                if not dst.up:
                    dst.st.dropped_down += 1
                    continue
                g = dst.group
                if g >= 0 and node.group >= 0 and g != node.group:
                    dst.st.dropped_partition += 1
                    continue
                p = self._loss
                if node.link_loss:
                    pl = node.link_loss.get(out.addr)
                    if pl:
                        p = 1.0 - (1.0 - p) * (1.0 - pl)
                if p and rnd() < p:
                    dst.st.dropped_loss += 1
                    continue
                rtt = node.zrow[dst.z] + node.access + dst.access
                heappush(
                    heap,
                    (now + rtt * (half + jit * rnd()), next(seq), _K_DGRAM, dst, node, payload,
                     0, 0),
                )
            elif isinstance(out, StreamRequest):
                self._open_stream(node, out, now)
            elif isinstance(out, Event):
                self._emit(node, out, now)
                if not node.up:  # an observer crashed the node: it sends nothing more
                    return
            else:
                raise TypeError(f"{node.name} produced an unknown output: {out!r}")

    def _emit(self, node: _Node, event: Event, now: float) -> None:
        node.st.events_emitted += 1
        text = repr(event)
        data = text.encode()
        self._tbuf += _pack_header(now, _H_EVENT, node.idx, 0, len(data))
        self._tbuf += data
        if self.trace is not None:
            self.trace.append(f"{now:.6f} event {node.name} {text}")
        for observer in self.observers:
            observer(now, node.name, event)

    @staticmethod
    def _link_rtt(a: _Node, b: _Node) -> float:
        return a.zrow[b.z] + a.access + b.access

    def _jittered(self, duration: float) -> float:
        return duration * (1.0 + self._jit * (2.0 * self._net_rng.random() - 1.0))

    @staticmethod
    def _blocked(a: _Node, b: _Node) -> bool:
        return a.group >= 0 and b.group >= 0 and a.group != b.group

    def _open_stream(self, node: _Node, req: StreamRequest, now: float) -> None:
        node.st.streams_sent += 1
        node.st.stream_bytes_sent += len(req.payload)
        sid = next(self._stream_ids)
        self._pending_streams.add(sid)
        heap = self._heap
        heappush(
            heap,
            (
                now + self.stream_timeout_s,
                next(self._seq),
                _K_STREAM_FAIL,
                node,
                None,
                req.addr,
                sid,
                node.epoch,
            ),
        )
        dst = self._nodes.get(req.addr)
        if dst is None or not dst.up or self._blocked(node, dst):
            return  # unreachable: the timeout above fails it
        delay = self._jittered(1.5 * self._link_rtt(node, dst))
        heappush(
            heap,
            (now + delay, next(self._seq), _K_STREAM_REQ, dst, node, req.payload, sid, node.epoch),
        )

    def _stream_arrives(
        self, dst: _Node, src: _Node, payload: bytes, sid: int, src_epoch: int, now: float
    ) -> None:
        if sid not in self._pending_streams or src.epoch != src_epoch:
            return  # the requester gave up or died: the connection is gone
        if not dst.up or self._blocked(src, dst):
            return  # the requester's timeout fails it
        if dst.gated:
            self._gate(dst, _K_STREAM_REQ, src, payload, sid, src_epoch, now)
        else:
            self._process(dst, _K_STREAM_REQ, src, payload, sid, src_epoch, now)

    def _reply_arrives(
        self, node: _Node, src: _Node, payload: bytes, sid: int, epoch: int, now: float
    ) -> None:
        if sid not in self._pending_streams:
            return  # already timed out
        if node.epoch != epoch or not node.up:
            self._pending_streams.discard(sid)
            return
        if self._blocked(node, src):
            return  # lost on the way: the timeout fails it
        self._pending_streams.discard(sid)
        if node.gated:
            self._gate(node, _K_STREAM_REPLY, src, payload, sid, epoch, now)
        else:
            self._process(node, _K_STREAM_REPLY, src, payload, sid, epoch, now)

    def _gate(
        self,
        node: _Node,
        kind: int,
        src: _Node | None,
        payload: Any,
        aux: Any,
        epoch: int,
        now: float,
    ) -> None:
        """Hold back an input of a paused or slow node."""
        if node.paused:
            self._queue_paused(node, kind, src, payload, aux, epoch)
            return
        ready = now + node.slow * (0.5 + self._net_rng.random())
        if ready < node.slow_next:
            ready = node.slow_next  # one process handles its inputs in order
        node.slow_next = ready
        heappush(
            self._heap,
            (ready, next(self._seq), kind + _READY, node, src, payload, (aux, epoch), node.epoch),
        )

    def _queue_paused(
        self, node: _Node, kind: int, src: _Node | None, payload: Any, aux: Any, epoch: int
    ) -> None:
        if kind == _K_TIMER:
            node.timer_gated = False  # re-armed on resume
            return
        if kind == _K_DGRAM:
            if node.pause_dgrams >= self.pause_queue_limit:
                node.st.dropped_pause_overflow += 1
                return
            node.pause_dgrams += 1
        node.pause_queue.append((kind, src, payload, aux, epoch))

    def _resume(self, node: _Node, now: float) -> None:
        self._text(f"resume {node.name}")
        node.paused = False
        node.gated = node.slow > 0.0
        queue = node.pause_queue
        node.pause_queue = []
        node.pause_dgrams = 0
        # Like an event loop after SIGCONT: first the I/O that piled up, then timers.
        for kind, src, payload, aux, epoch in queue:
            if not node.up or node.paused:
                if node.paused:  # paused again by an observer: keep the rest queued
                    node.pause_queue.append((kind, src, payload, aux, epoch))
                    if kind == _K_DGRAM:
                        node.pause_dgrams += 1
                continue
            self._process(node, kind, src, payload, aux, epoch, now)
        if node.up and not node.paused and not node.timer_gated:
            proto = node.proto
            assert proto is not None
            d = proto.next_deadline()
            if d is not None and (node.timer_at is None or d < node.timer_at):
                d = max(d, now)
                seq = next(self._seq)
                node.timer_at = d
                node.timer_seq = seq
                heappush(self._heap, (d, seq, _K_TIMER, node, None, None, None, 0))

    def _process(
        self,
        node: _Node,
        kind: int,
        src: _Node | None,
        payload: Any,
        aux: Any,
        epoch: int,
        now: float,
    ) -> None:
        """Hand one input to the node's protocol now, then route its outputs."""
        proto = node.proto
        assert proto is not None
        st = node.st
        trace = self.trace
        if kind == _K_DGRAM:
            assert src is not None
            self._events += 1
            n = len(payload)
            st.datagrams_received += 1
            st.bytes_received += n
            self._tbuf += _pack_header(now, kind, src.idx, node.idx, n)
            self._tbuf += payload
            if trace is not None:
                trace.append(f"{now:.6f} dgram {src.name}->{node.name} {n}B")
            proto.handle_datagram(src.name, payload, now)
            self._after(node, now)
        elif kind == _K_TIMER:
            self._fire_timer(node, now)
        elif kind == _K_STREAM_REQ:
            assert src is not None
            self._events += 1
            st.streams_received += 1
            self._tbuf += _pack_header(now, kind, src.idx, node.idx, len(payload))
            self._tbuf += payload
            if trace is not None:
                trace.append(f"{now:.6f} stream {src.name}->{node.name} {len(payload)}B")
            reply = proto.handle_stream(src.name, payload, now)
            self._after(node, now)
            if aux not in self._pending_streams:
                return  # the requester gave up while we worked
            if reply is None:
                self._pending_streams.discard(aux)
                return
            if src.epoch != epoch or not src.up or not node.up or self._blocked(src, node):
                return  # no one to answer: the requester's timeout decides
            delay = self._jittered(0.5 * self._link_rtt(node, src))
            heappush(
                self._heap,
                (now + delay, next(self._seq), _K_STREAM_REPLY, src, node, reply, aux, epoch),
            )
        elif kind == _K_STREAM_REPLY:
            assert src is not None
            self._events += 1
            st.stream_replies_received += 1
            self._tbuf += _pack_header(now, kind, src.idx, node.idx, len(payload))
            self._tbuf += payload
            if trace is not None:
                trace.append(f"{now:.6f} reply {src.name}->{node.name} {len(payload)}B")
            proto.handle_stream_reply(src.name, payload, now)
            self._after(node, now)
        elif kind == _K_STREAM_FAIL:
            self._events += 1
            st.streams_failed += 1
            data = payload.encode()
            self._tbuf += _pack_header(now, kind, node.idx, 0, len(data))
            self._tbuf += data
            if trace is not None:
                trace.append(f"{now:.6f} stream-failed {node.name}->{payload}")
            proto.stream_failed(payload, now)
            self._after(node, now)
        elif kind == _K_CALL:
            self._events += 1
            self._tbuf += _pack_header(now, kind, node.idx, 0, 0)
            if trace is not None:
                trace.append(f"{now:.6f} call {node.name}")
            payload(proto, now)
            self._after(node, now)
        else:  # pragma: no cover
            raise AssertionError(f"not an input kind: {kind}")

    def _fire_timer(self, node: _Node, now: float) -> None:
        """A wake-up came: run on_timer if the deadline is really due, else re-arm."""
        proto = node.proto
        assert proto is not None
        d = proto.next_deadline()
        if d is None:
            return
        if d > now:
            seq = next(self._seq)
            node.timer_at = d
            node.timer_seq = seq
            heappush(self._heap, (d, seq, _K_TIMER, node, None, None, None, 0))
            return
        self._events += 1
        node.st.timers_fired += 1
        self._tbuf += _pack_header(now, _K_TIMER, node.idx, 0, 0)
        if self.trace is not None:
            self.trace.append(f"{now:.6f} timer {node.name}")
        proto.on_timer(now)
        outs = proto.drain()
        if outs:
            self._route(node, outs, now)
        if not node.up or node.timer_gated:
            return
        d = proto.next_deadline()
        if d is None:
            return
        if d <= now:
            # Still due right after on_timer(now): allow a few zero-delay re-fires, then
            # push time forward so a protocol stuck on a past deadline cannot spin.
            if node.fired_at == now:
                node.fired_count += 1
            else:
                node.fired_at = now
                node.fired_count = 1
            if node.fired_count >= _MAX_FIRINGS_PER_INSTANT:
                node.st.timers_stalled += 1
                d = now + _TIMER_RESOLUTION_S
            else:
                if d < now:
                    node.st.deadlines_clamped += 1
                d = now
        at = node.timer_at
        if at is None or d < at:
            seq = next(self._seq)
            node.timer_at = d
            node.timer_seq = seq
            heappush(self._heap, (d, seq, _K_TIMER, node, None, None, None, 0))

    def _text(self, text: str) -> None:
        data = text.encode()
        self._tbuf += _pack_header(self.now, _H_TEXT, 0, 0, len(data))
        self._tbuf += data
        if self.trace is not None:
            self.trace.append(f"{self.now:.6f} {text}")

    def _sync_stats(self) -> None:
        self._stats.events_processed = self._events
        self._stats.stale_timer_entries = self._stale

    def _flush_trace(self) -> None:
        if self._tbuf:
            self._hash.update(self._tbuf)
            self._tbuf = bytearray()


def _check_probability(name: str, p: float) -> None:
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {p!r}")


def _groups_text(assignment: dict[str, int]) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, gi in assignment.items():
        groups.setdefault(gi, []).append(name)
    return [groups[gi] for gi in sorted(groups)]
