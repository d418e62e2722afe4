"""Actors in the simulator: owners chosen, keys claimed, calls served and checkpoints
fenced by ``core/actors.py`` over a KV of conditional puts decided by ``core/kv.py``, with
crashes, restarts, pauses, partitions and lost datagrams.

Each ``ActorSimNode`` is a KV replica (its records on its ``disk``, which survives a
crash), a caller's node and an owner, as in the runtime (``runtime/services_plane.py``,
``runtime/data/kv.py``). A caller's node sends a call of a key to the key's owner in its
view (``actor_owner``, nodes a call to which was lost left out); the owner claims the key
if it holds no lease (reads the key's intended KV replicas, ``pick_checkpoint``,
``claim``, a conditional put naming every version read), runs the call (a counter: the
state is the count) and checkpoints it (``after_call``, a conditional put naming its last
version) before it answers. A refused checkpoint fences the owner: it drops the lease and
answers "not here", and the call is routed again; a failed one (too few answers) answers
"lost" (the call may count). A call with no answer within ``call_timeout_s`` fails as
``replica-lost``. Membership is an oracle: a crashed node is reported down to every
node ``detect_s`` later, a restarted one up again as soon as it is back.

Not modelled: the winner's overwrite of newer residues (``KVCoordinator.residues``:
the load rule here ignores timestamps), read repair and hinted hand-off (no conditional
put uses them).

Oracles (``ActorReport``), against the truth:

- every call ends exactly once, answered or failed with a stated error (``lost``);
- no two acknowledged calls of one key return the same count (``duplicates``): two
  owners checkpointing from one base, or a loader missing an acknowledged call, would
  hand the same count out twice;
- at the end, what a loader reading every replica picks holds every acknowledged call
  (``short``) and no more calls than ran (``phantom``).
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import msgspec

from meshscale.core.actors import (
    ActorCheckpoint,
    ActorConfig,
    actor_kv_key,
    actor_owner,
    after_call,
    claim,
    encode_checkpoint,
    pick_checkpoint,
)
from meshscale.core.hlc import HLCTimestamp
from meshscale.core.kv import (
    Consistency,
    KVCoordinator,
    KVRecord,
    cas_allows,
    kv_placement,
    strict_replicas,
)
from meshscale.core.outputs import Output, SendDatagram
from meshscale.core.placement import Candidate
from meshscale.core.scheduling import NodeState, Resources
from meshscale.core.services import ServiceSpec
from meshscale.sim.engine import NodeContext, Simulator
from meshscale.sim.topology import Topology

__all__ = ["ActorMesh", "ActorReport", "ActorSimNode", "actor_chaos_run"]

_CALL, _OK, _NOT_HERE, _LOST, _READ, _READ_R, _CAS, _CAS_R = range(8)
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()
SERVICE = "counter"


@dataclass
class _Work:
    """An owner's queue of calls for one key and what it is doing now."""

    queue: list[tuple[int, str]] = field(default_factory=list)
    busy: bool = False
    ck: ActorCheckpoint | None = None
    version: str = ""


@dataclass
class _Op:
    key: str
    kind: str  # "read", "claim", "checkpoint"
    coord: KVCoordinator
    versions: list[tuple[str | None, bytes | None]] = field(default_factory=list)
    pending: ActorCheckpoint | None = None
    cid: int = 0
    caller: str = ""
    done: bool = False


class ActorSimNode:
    def __init__(self, ctx: NodeContext, mesh: ActorMesh) -> None:
        self.name = ctx.name
        self.mesh = mesh
        self.rng = ctx.rng
        self.store: dict[str, KVRecord] = ctx.disk.setdefault("kv", {})
        self.down: set[str] = set(mesh.detected_down)
        self.work: dict[str, _Work] = {}
        self.ops: dict[int, _Op] = {}
        self.calls: dict[int, tuple[str, str]] = {}
        """Calls sent from here: cid -> (key, owner asked)."""
        self.redirects: Counter[int] = Counter()
        self.bad: dict[str, float] = {}
        """Nodes a call to which was lost -> until when they are left out."""
        self._timers: list[tuple[float, int, str, int, str]] = []
        self._seq = 0
        self._op_seq = 0
        self._wall = 0
        self._out: list[Output] = []

    # ------------------------------------------------------------------ driver contract

    def handle_datagram(self, src: str, payload: bytes, now: float) -> None:
        msg = _dec.decode(payload)
        kind = msg[0]
        if kind == _CALL:
            self._take_call(msg[1], msg[2], src, msg[3], now)
        elif kind in (_OK, _NOT_HERE, _LOST):
            self._answer(src, msg, now)
        elif kind == _READ:
            rec = self.store.get(msg[2])
            self._send(src, (_READ_R, msg[1], msg[2], None if rec is None else rec.ts.encode(),
                             None if rec is None else rec.value))
        elif kind == _CAS:
            _, op, key, value, ts, expected = msg
            cur = self.store.get(key)
            stamp = HLCTimestamp.decode(ts)
            allowed = self.mesh.unfenced or cas_allows(cur, expected)
            if allowed and (cur is None or stamp > cur.ts):
                self.store[key] = KVRecord(key, value, stamp)
                self._send(src, (_CAS_R, op, key, True, None))
            else:
                self._send(src, (_CAS_R, op, key, False,
                                 None if cur is None else cur.ts.encode()))
        elif kind == _READ_R:
            o = self.ops.get(msg[1])
            if o is not None and not o.done:
                stamp, value = msg[3], msg[4]
                o.versions.append((stamp, value))
                rec = None if stamp is None else KVRecord(
                    o.coord.key, value, HLCTimestamp.decode(stamp))
                o.coord.on_reply(src, rec)
                self._op_step(msg[1], now)
        elif kind == _CAS_R:
            o = self.ops.get(msg[1])
            if o is not None and not o.done:
                if msg[3]:
                    o.coord.on_reply(src, None)
                else:
                    o.coord.on_conflict(src, msg[4])
                self._op_step(msg[1], now)

    def handle_stream(self, src: str, payload: bytes, now: float) -> bytes | None:
        return None

    def handle_stream_reply(self, src: str, payload: bytes, now: float) -> None:
        return None

    def stream_failed(self, dst: str, now: float) -> None:
        return None

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def on_timer(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, n, text = heapq.heappop(self._timers)
            if kind == "op":
                o = self.ops.get(n)
                if o is not None and not o.done:
                    o.coord.expire()
                    self._op_step(n, now)
            elif kind == "served":
                self._served(text, now)
            elif kind == "call":
                sent = self.calls.get(n)
                if sent is not None and sent[1] == text:
                    del self.calls[n]
                    self.bad[text] = now + self.mesh.quarantine_s
                    self.mesh.ended(n, None, "replica-lost")
            elif kind == "resend":
                key = text
                self._route(n, key, now)

    def drain(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------------ helpers

    def _timer(self, at: float, kind: str, n: int = 0, text: str = "") -> None:
        self._seq += 1
        heapq.heappush(self._timers, (at, self._seq, kind, n, text))

    def _send(self, dst: str, msg: tuple[object, ...]) -> None:
        self._out.append(SendDatagram(dst, _enc.encode(msg)))

    def view(self) -> list[NodeState]:
        return [s for n, s in self.mesh.states.items() if n not in self.down]

    def set_down(self, name: str, down: bool) -> None:
        if down:
            self.down.add(name)
        else:
            self.down.discard(name)
            self.bad.pop(name, None)

    # ------------------------------------------------------------------ caller

    def call(self, cid: int, key: str, now: float) -> None:
        self._route(cid, key, now)

    def _route(self, cid: int, key: str, now: float) -> None:
        exclude = sorted(n for n, until in self.bad.items() if until > now)
        owner = actor_owner(self.mesh.spec, key, self.view(), exclude)
        if not isinstance(owner, str):
            self.calls.pop(cid, None)
            self.mesh.ended(cid, None, "no-replica")
            return
        self.calls[cid] = (key, owner)
        self._send(owner, (_CALL, cid, key, exclude))
        self._timer(now + self.mesh.call_timeout_s, "call", cid, owner)

    def _answer(self, src: str, msg: list[object], now: float) -> None:
        kind, cid = msg[0], msg[1]
        assert isinstance(cid, int)
        sent = self.calls.get(cid)
        if sent is None or sent[1] != src:
            return  # late: the call already ended
        del self.calls[cid]
        if kind == _OK:
            value = msg[3]
            assert isinstance(value, int)
            self.mesh.ended(cid, value, None)
        elif kind == _LOST:
            self.mesh.ended(cid, None, "replica-lost")
        else:
            self.redirects[cid] += 1
            if self.redirects[cid] > self.mesh.max_redirects:
                self.mesh.ended(cid, None, "no-replica")
                return
            self.calls[cid] = (sent[0], "")
            self._timer(now + 0.05 * 2 ** min(self.redirects[cid], 5), "resend", cid,
                        sent[0])

    # ------------------------------------------------------------------ owner

    def _take_call(self, cid: int, key: str, caller: str, exclude: list[str],
                   now: float) -> None:
        if actor_owner(self.mesh.spec, key, self.view(), exclude) != self.name:
            self._send(caller, (_NOT_HERE, cid, key, "not the owner"))
            return
        w = self.work.setdefault(key, _Work())
        if len(w.queue) >= 64:
            self._send(caller, (_NOT_HERE, cid, key, "busy"))
            return
        w.queue.append((cid, caller))
        self._next(key, now)

    def _next(self, key: str, now: float) -> None:
        w = self.work[key]
        if w.busy or not w.queue:
            return
        w.busy = True
        if w.ck is None:
            self._start_op(key, "read", now)
        else:
            self._timer(now + self.rng.uniform(0.001, 0.01), "served", 0, key)

    def _strict(self, key: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        live = [self.mesh.states[n].member for n in self.mesh.names if n not in self.down]
        down = [self.mesh.states[n].member for n in self.mesh.names if n in self.down]
        where = kv_placement(actor_kv_key(SERVICE, key), live, 3, down=down)
        return strict_replicas(where)

    def _stamp(self, now: float, above: Sequence[str]) -> HLCTimestamp:
        self._wall = max(self._wall + 1, int(now * 1e9))
        ts = HLCTimestamp(self._wall, 0, self.name)
        for e in above:
            if e:
                top = HLCTimestamp.decode(e)
                if top >= ts:
                    self._wall = top.wall_ns + 1
                    ts = HLCTimestamp(self._wall, 0, self.name)
        return ts

    def _start_op(self, key: str, kind: str, now: float, value: bytes = b"",
                  expected: Sequence[str] = (), pending: ActorCheckpoint | None = None
                  ) -> None:
        kv_key = actor_kv_key(SERVICE, key)
        strict, away = self._strict(key)
        self._op_seq += 1
        op = self._op_seq
        if kind == "read":
            coord = KVCoordinator.for_get(kv_key, strict, Consistency.QUORUM)
            msg: tuple[object, ...] = (_READ, op, kv_key)
        else:
            rec = KVRecord(kv_key, value, self._stamp(now, expected))
            coord = KVCoordinator.for_cas(rec, strict, Consistency.QUORUM, expected)
            msg = (_CAS, op, kv_key, value, rec.ts.encode(), list(expected))
        self.ops[op] = _Op(key, kind, coord, pending=pending)
        for n in away:
            coord.on_failure(n, "down")
        for n in strict:
            if n not in away:
                self._send(n, msg)
        self._timer(now + self.mesh.kv_timeout_s, "op", op)
        self._op_step(op, now)

    def _op_step(self, op: int, now: float) -> None:
        o = self.ops[op]
        out = o.coord.outcome
        if out is None:
            return
        # A conditional put's answer waits for every replica only in the runtime (for
        # residues); here it is decided on the level, as the coordinator says.
        o.done = True
        del self.ops[op]
        w = self.work[o.key]
        if o.kind == "read":
            if not out.ok:
                self._fail_head(o.key, _NOT_HERE, now)
                return
            loaded = pick_checkpoint(o.versions)
            mine = claim(loaded.checkpoint, self.name)
            self._start_op(o.key, "claim", now, encode_checkpoint(mine), loaded.expected,
                           mine)
        elif o.kind == "claim":
            if not out.ok:
                self._fail_head(o.key, _NOT_HERE, now)
                return
            assert o.pending is not None and out.record is not None
            w.ck, w.version = o.pending, out.record.ts.encode()
            self._timer(now + self.rng.uniform(0.001, 0.01), "served", 0, o.key)
        else:
            cid, caller = w.queue.pop(0)
            if out.ok:
                assert o.pending is not None and out.record is not None
                w.ck, w.version = o.pending, out.record.ts.encode()
                assert o.pending.state is not None
                self._send(caller, (_OK, cid, o.key, int(o.pending.state)))
            else:
                w.ck, w.version = None, ""  # fenced, or unsure: drop the lease
                self._send(caller, (_NOT_HERE if out.conflict else _LOST, cid, o.key, ""))
            w.busy = False
            self._next(o.key, now)

    def _served(self, key: str, now: float) -> None:
        w = self.work.get(key)
        if w is None or w.ck is None or not w.queue:
            if w is not None:
                w.busy = False
            return
        cid, _ = w.queue[0]
        self.mesh.ran(cid, key)
        count = 0 if w.ck.state is None else int(w.ck.state)
        nxt = after_call(w.ck, self.name, str(count + 1).encode(), self.mesh.actor_config)
        self._start_op(key, "checkpoint", now, encode_checkpoint(nxt), [w.version], nxt)

    def _fail_head(self, key: str, kind: int, now: float) -> None:
        w = self.work[key]
        cid, caller = w.queue.pop(0)
        self._send(caller, (kind, cid, key, "claim failed"))
        w.busy = False
        self._next(key, now)


class ActorMesh:
    """A simulated mesh of ``ActorSimNode``s ``n0 .. n{N-1}`` serving one counter actor."""

    def __init__(self, nodes: int = 6, *, seed: int, detect_s: float = 2.0,
                 call_timeout_s: float = 3.0, kv_timeout_s: float = 0.5,
                 max_redirects: int = 8, quarantine_s: float = 3.0,
                 topology: Topology | None = None, unfenced: bool = False) -> None:
        self.topology = topology or Topology.three_regions()
        self.sim = Simulator(self.topology, seed)
        self.spec = ServiceSpec(SERVICE)
        self.actor_config = ActorConfig()
        self.detect_s, self.call_timeout_s = detect_s, call_timeout_s
        self.kv_timeout_s, self.max_redirects = kv_timeout_s, max_redirects
        self.quarantine_s = quarantine_s
        self.unfenced = unfenced
        """A broken KV for tests: replicas apply conditional puts unchecked (last writer
        wins), so nothing fences a stale owner; the oracles must catch it."""
        self.names = [f"n{i}" for i in range(nodes)]
        placements = dict(zip(self.names, self.topology.place(nodes), strict=True))
        self.states = {n: NodeState(Candidate(n, p.region, p.zone), Resources(4.0, 16_000, 0))
                       for n, p in placements.items()}
        self.detected_down: set[str] = set()
        self.issued: dict[int, str] = {}
        self.via: dict[int, str] = {}
        """Call id -> the node its client sent it through."""
        self.outcomes: dict[int, list[tuple[int | None, str | None]]] = {}
        self.runs: Counter[str] = Counter()
        """Per key, calls that ran (an owner began its checkpoint)."""
        self._next_cid = 0
        self.rng = random.Random(seed ^ 0x5EED)
        for name in self.names:
            self.sim.add_node(name, placements[name], self._factory)

    def _factory(self, ctx: NodeContext) -> ActorSimNode:
        return ActorSimNode(ctx, self)

    def node(self, name: str) -> ActorSimNode:
        p = self.sim.protocol(name)
        assert isinstance(p, ActorSimNode)
        return p

    def up(self) -> list[str]:
        return [n for n in self.names if self.sim.is_up(n)]

    def issue(self, key: str) -> None:
        up = self.up()
        if not up:
            return
        via = up[self.rng.randrange(len(up))]
        self._next_cid += 1
        cid = self._next_cid
        self.issued[cid] = key
        self.via[cid] = via
        self.outcomes[cid] = []
        self.sim.call(via, partial(_call, cid, key))

    def ended(self, cid: int, value: int | None, error: str | None) -> None:
        self.outcomes[cid].append((value, error))

    def ran(self, cid: int, key: str) -> None:
        self.runs[key] += 1

    def crash(self, name: str) -> None:
        self.sim.crash(name)
        # Every call sent through it that has not ended goes with it (one still queued
        # at a paused node too): the client's connection broke.
        for cid, via in self.via.items():
            if via == name and not self.outcomes[cid]:
                self.ended(cid, None, "caller-node-lost")
        self.sim.at(self.sim.now + self.detect_s, lambda: self._mark(name, True))

    def restart(self, name: str) -> None:
        self.sim.restart(name)
        self._mark(name, False)

    def _mark(self, name: str, down: bool) -> None:
        if down and self.sim.is_up(name):
            return  # back before it was detected
        if down:
            self.detected_down.add(name)
        else:
            self.detected_down.discard(name)
        for n in self.up():
            self.node(n).set_down(name, down)


def _call(cid: int, key: str, p: object, now: float) -> None:
    assert isinstance(p, ActorSimNode)
    p.call(cid, key, now)


@dataclass
class ActorReport:
    seed: int
    calls: int
    acked: int
    failed: Counter[str]
    lost: list[int]
    ended_twice: list[int]
    duplicates: list[str]
    short: list[str]
    phantom: list[str]

    def problems(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"{len(self.lost)} calls never ended: {self.lost[:5]}")
        if self.ended_twice:
            out.append(f"calls ended twice: {self.ended_twice[:5]}")
        out += self.duplicates + self.short + self.phantom
        return out


def report(mesh: ActorMesh, seed: int) -> ActorReport:
    acked_values: dict[str, list[int]] = {}
    failed: Counter[str] = Counter()
    lost, twice = [], []
    for cid, key in mesh.issued.items():
        ends = mesh.outcomes[cid]
        if not ends:
            lost.append(cid)
            continue
        if len(ends) > 1:
            twice.append(cid)
        value, error = ends[0]
        if error is not None:
            failed[error] += 1
        else:
            assert value is not None
            acked_values.setdefault(key, []).append(value)
    duplicates, short, phantom = [], [], []
    for key, values in sorted(acked_values.items()):
        dup = [v for v, n in Counter(values).items() if n > 1]
        if dup:
            duplicates.append(f"key {key}: counts {sorted(dup)[:5]} acknowledged twice")
        read = []
        for n in mesh.names:
            rec = mesh.sim.protocol(n)
            assert isinstance(rec, ActorSimNode)
            r = rec.store.get(actor_kv_key(SERVICE, key))
            read.append((None, None) if r is None else (r.ts.encode(), r.value))
        ck = pick_checkpoint(read).checkpoint
        final = 0 if ck is None or ck.state is None else int(ck.state)
        if final < max(values):
            short.append(f"key {key}: state {final} below acknowledged {max(values)}")
        if final > mesh.runs[key]:
            phantom.append(f"key {key}: state {final} above the {mesh.runs[key]} calls run")
    return ActorReport(seed, len(mesh.issued), sum(len(v) for v in acked_values.values()),
                       failed, lost, twice, duplicates, short, phantom)


def actor_chaos_run(seed: int, *, nodes: int = 6, keys: int = 6, duration_s: float = 40.0,
                    rate_per_s: float = 10.0, crashes: int = 3, pauses: int = 3,
                    partitions: int = 1, loss: float = 0.0,
                    unfenced: bool = False) -> ActorReport:
    """Calls to ``keys`` counters at ``rate_per_s`` for ``duration_s``, with ``crashes``
    crash-and-restart faults, ``pauses`` pauses of a random node and ``partitions``
    partitions (a random minority or half cut off for 2 to 8 s; the membership oracle
    does not report its nodes down, so both sides keep their views and owners on both
    sides may claim and serve, and only the KV's majorities decide); then the calls
    settle and the oracles are checked."""
    rng = random.Random(seed)
    mesh = ActorMesh(nodes, seed=seed, unfenced=unfenced)
    if loss:
        mesh.sim.set_loss(loss)
    t = 0.5
    while t < duration_s:
        mesh.sim.at(t, partial(mesh.issue, f"k{rng.randrange(keys)}"))
        t += rng.expovariate(rate_per_s)
    for _ in range(crashes):
        at = rng.uniform(2.0, duration_s - 5.0)
        victim = mesh.names[rng.randrange(nodes)]
        back = at + rng.uniform(1.0, 6.0)

        def crash(v: str = victim) -> None:
            if mesh.sim.is_up(v) and len(mesh.up()) > nodes // 2 + 1:
                mesh.crash(v)

        def restart(v: str = victim) -> None:
            if not mesh.sim.is_up(v):
                mesh.restart(v)

        mesh.sim.at(at, crash)
        mesh.sim.at(back, restart)
    for _ in range(pauses):
        at = rng.uniform(2.0, duration_s - 5.0)
        victim = mesh.names[rng.randrange(nodes)]
        length = rng.uniform(0.5, 3.0)

        def pause(v: str = victim, length: float = length) -> None:
            if mesh.sim.is_up(v):
                mesh.sim.pause(v, length)

        mesh.sim.at(at, pause)
    for _ in range(partitions):
        at = rng.uniform(2.0, duration_s - 10.0)
        side = rng.sample(mesh.names, rng.randrange(1, nodes // 2 + 1))
        rest = [n for n in mesh.names if n not in side]
        mesh.sim.at(at, partial(mesh.sim.partition, side, rest))
        mesh.sim.at(at + rng.uniform(2.0, 8.0), mesh.sim.heal)
    mesh.sim.run_until(duration_s + 30.0)
    return report(mesh, seed)
