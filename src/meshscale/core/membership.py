"""Membership and failure detection: SWIM with the Lifeguard refinements.

Papers: Das, Gupta and Motivala, "SWIM: Scalable Weakly-consistent Infection-style
Process Group Membership Protocol" (DSN 2002), and Dadgar, Phillips and Currey,
"Lifeguard: Local Health Awareness for More Accurate Failure Detection" (2017), as
realised in HashiCorp memberlist.

Each period a node probes one member, chosen in random-order round robin. No ack within
the probe timeout -> it asks k other members to probe indirectly (they answer with a nack
when they could not reach the target either). No ack by the end of the period -> the
member is *suspected*; a suspected member that does not refute (by gossiping a higher
incarnation) before its suspicion timeout is declared *dead*. Membership changes ride on
every probe and ack and on a faster gossip round, each retransmitted ~ mult * log10(N)
times; a periodic push/pull of full state with one random member repairs what gossip
missed.

Lifeguard adds: a local health multiplier (a node whose own probes fail, or which is
refuted, stretches its probe interval and timeout instead of accusing others); a
suspicion timeout that starts at ``max`` and shrinks towards ``min`` with each
independent confirmation; nacks, so a prober can tell "target is gone" from "I am
slow"; and the buddy system (a suspected member is told so directly when probed).

Departures from memberlist, and why:

- A member that receives a ping from a node it holds dead piggybacks that Dead message
  on its ack, so a node that was paused or partitioned learns it at once and refutes,
  rather than waiting for a push/pull.
- Every node periodically tries a push/pull with a random dead (not left) member, as
  Serf's reconnect does, so two sides of a healed partition find each other again.
- Before a suspicion that fewer than K others confirmed becomes a death, the node pings
  the suspect itself, with the suspicion attached ("last chance"): a live node answers,
  refutes, and its new incarnation rides back on the ack. This catches the rare
  refutation that gossip failed to deliver to one node.
- An accusation carrying an older incarnation than ours (its sender missed our
  refutation) makes us gossip our current incarnation again; memberlist ignores it and
  lets the sender's timer run out.
- At most K confirmations of a suspicion are counted and re-gossiped (memberlist's
  bound; without it a slow node costs O(N) broadcasts per accuser).
- No TCP fallback ping: a lossy path costs a suspicion (which is refuted), not a second
  transport.
- Sleepers (capacity on demand): a member whose capacity tag says standby is probed on
  one of ``standby_probe_every`` of its turns in the probe round, and a suspicion of it
  lasts that many times longer (minimum and maximum alike), since it hears of the
  suspicion through that many fewer pings. A suspect sleeper is probed on every turn,
  and one that died is still declared dead, only later.

Removal (not in SWIM or memberlist, which only know leaving): an operator removes a node
for good with an entry signed by the cluster CA. The entry spreads like any update
(piggybacked, and in every push/pull), is checked by the driver's ``verify_revocation``
(crypto stays out of core), and puts the member in the final state ``REMOVED``: nothing
it says is believed again, whatever its incarnation.

This module is sans-I/O (see ``core/outputs.py``): it is fed datagrams, stream messages
and timer ticks with ``now`` and hands back bytes to send and events for the layer
above. It draws randomness only from the ``random.Random`` it is given.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from functools import partial
from heapq import heappop as _heappop
from heapq import heappush as _heappush
from typing import Annotated, Any

import msgspec

from meshscale.core.outputs import Event, Output, SendDatagram, StreamRequest
from meshscale.core.vivaldi import Coordinate, VivaldiClient, VivaldiConfig, estimate_rtt, is_valid
from meshscale.core.wire import (
    DECODE_ERRORS,
    ENVELOPE_OVERHEAD,
    MAX_ENVELOPE_MESSAGES,
    PROTOCOL_VERSION,
    WireError,
    decode_envelope,
    encode_envelope,
    envelope_head,
)

# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class MembershipConfig:
    """Every knob of the protocol. Defaults suit a mesh spanning a few regions with
    inter-region RTTs up to ~200 ms; all durations are in seconds."""

    probe_interval_s: float = 0.75
    """Period of the probe round (SWIM's protocol period T'). memberlist's LAN default
    is 1 s; a shorter period finds a dead member sooner at 2 small datagrams per
    period per node, whatever the mesh size."""
    probe_timeout_s: float = 0.3
    """Wait for a direct ack before asking for indirect probes. Must exceed the worst
    RTT between two members; the rest of the period (0.45 s) is left for indirect
    probes, which take two RTTs through a relay in a third region."""
    indirect_checks: int = 3
    """k: members asked to probe a target indirectly."""
    standby_probe_every: int = 4
    """A member on standby (capacity on demand: its ``standby_tag`` starts with
    ``standby_prefix``) is probed on one of this many of its turns in the probe round
    (a sleeper is woken less often), and a suspicion of it lasts this many times longer
    (it hears of the suspicion through fewer pings, so its refutation may take that
    much longer). 1: no difference. A suspect is probed on every turn."""
    standby_tag: str = "pw"
    """The tag carrying the capacity state (``runtime.capacity.POWER_TAG``)."""
    standby_prefix: str = "s"
    """How that tag's value starts on standby (``runtime.capacity.encode_tag``)."""
    suspicion_mult: float = 1.5
    """Minimum suspicion timeout = suspicion_mult * log10(N) * probe_interval_s (memberlist
    uses 4 with a 1 s period; with Lifeguard's confirmations a lone accuser still
    waits suspicion_max_mult times longer, which is what keeps false positives out)."""
    suspicion_max_mult: float = 4.0
    """Lifeguard: a suspicion starts at suspicion_max_mult * min and shrinks to min as
    independent confirmations arrive."""
    suspicion_confirmations: int = 3
    """Lifeguard's K: confirmations expected before the timeout reaches its minimum."""
    gossip_interval_s: float = 0.1
    """Period of the gossip round; a round with nothing to say sends nothing."""
    gossip_nodes: int = 3
    """Fan-out of the gossip round."""
    gossip_to_dead_s: float = 30.0
    """Keep gossiping to a member this long after it was declared dead, so a node that
    was wrongly declared dead hears of it and refutes."""
    retransmit_mult: int = 4
    """Each update is sent retransmit_mult * ceil(log10(N + 1)) times."""
    push_pull_interval_s: float = 30.0
    """Full-state exchange with one random member; scaled up with log2(N) beyond 32
    members, as memberlist does."""
    reconnect_interval_s: float = 5.0
    """Try a push/pull with one random dead (not left) member this often."""
    reconnect_timeout_s: float = 3600.0
    """Stop trying to reconnect to a member dead this long."""
    dead_reap_s: float = 3600.0
    """Forget a dead or left member this long after its death."""
    join_retry_interval_s: float = 1.0
    """While a node knows no live member, retry its seeds this often."""
    join_max_attempts: int = 0
    """Stop retrying the seeds after this many rounds (0: keep trying)."""
    leave_propagate_s: float = 1.0
    """After a graceful leave, how long the driver should keep the node running so the
    leave message spreads."""
    lifeguard: bool = True
    """Lifeguard on (health multiplier, nacks, dynamic suspicion, buddy system) or plain
    SWIM (fixed suspicion timeout of min)."""
    last_chance_probes: int = 2
    """Lifeguard on: before declaring dead a suspect that fewer than K others confirmed,
    ping it directly (twice, with the suspicion attached); a member that answers is
    given more time to refute, at most this many times. A well-confirmed death skips
    it; a lone accuser pays one probe timeout."""
    awareness_max: int = 8
    """Largest local health multiplier (timeouts are scaled by score + 1)."""
    max_payload_bytes: int = 1367
    """Largest datagram payload before sealing: a 1,400-byte datagram minus the 33
    bytes of AES-256-GCM sealing (version, key id, nonce, tag)."""
    max_stream_bytes: int = 8 * 1024 * 1024
    """Largest push/pull message accepted."""
    max_members: int = 100_000
    """Refuse to track more members than this (a bound against hostile input)."""
    max_pending_broadcasts: int = 4096
    """Bound on the gossip queue; the oldest, most-retransmitted updates go first."""
    max_meta_bytes: int = 512
    """Bound on a node's encoded metadata, so an alive message fits in a datagram."""
    max_revocations: int = 10_000
    """Removed members remembered (each entry is a few hundred bytes, kept forever)."""
    vivaldi: VivaldiConfig = field(default_factory=VivaldiConfig)


# --------------------------------------------------------------------------- wire

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Addr = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Inc = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class NodeMeta(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """What a node says about itself; updates propagate with a higher incarnation."""

    region: str = ""
    zone: str = ""
    labels: dict[str, str] = {}
    capacity: dict[str, float] = {}
    tags: dict[str, str] = {}
    """Free-form service endpoints and flags (for example the HTTP address)."""


# The gossip messages are not tracked by the cyclic GC (``gc=False``): they hold strings,
# numbers, a ``NodeMeta`` or a ``Coordinate``, never a container that could lead back to
# them, so they cannot be part of a cycle; every datagram decodes about twenty of them,
# and an untracked struct is cheaper to make and to free (decoding a datagram of twenty
# suspicions: 2.5 us instead of 3.2).


class Ping(msgspec.Struct, tag=1, array_like=True, gc=False):
    seq: Seq
    target: Name
    source: Name
    source_addr: Addr


class IndirectPing(msgspec.Struct, tag=2, array_like=True, gc=False):
    seq: Seq
    target: Name
    target_addr: Addr
    source: Name
    source_addr: Addr
    nack: bool


class Ack(msgspec.Struct, tag=3, array_like=True, gc=False):
    seq: Seq
    source: Name
    coord: Coordinate | None = None


class Nack(msgspec.Struct, tag=4, array_like=True, gc=False):
    seq: Seq


class Alive(msgspec.Struct, tag=5, array_like=True, gc=False):
    node: Name
    inc: Inc
    addr: Addr
    meta: NodeMeta


class Suspect(msgspec.Struct, tag=6, array_like=True, gc=False):
    node: Name
    inc: Inc
    source: Name


class Dead(msgspec.Struct, tag=7, array_like=True, gc=False):
    node: Name
    inc: Inc
    source: Name
    """Equal to ``node`` when the node left gracefully."""


RevocationEntry = Annotated[bytes, msgspec.Meta(max_length=512)]


class Revoke(msgspec.Struct, tag=9, array_like=True, gc=False):
    """A CA-signed entry removing a node for good (opaque here; the driver verifies)."""

    entry: RevocationEntry


class NodeState(msgspec.Struct, array_like=True):
    name: Name
    addr: Addr
    inc: Inc
    state: int
    meta: NodeMeta


class PushPull(msgspec.Struct, tag=8, array_like=True):
    source: Name
    join: bool
    states: list[NodeState]
    revoked: list[RevocationEntry] = []


class _PushPullOut(msgspec.Struct, tag=8, array_like=True):
    """``PushPull`` as sent: the same tag and fields, the states as plain tuples (an
    ``IntEnum`` state encodes as its int). Encodes to exactly the bytes of the
    ``PushPull`` with the same content; decoding always uses ``PushPull``."""

    source: str
    join: bool
    states: list[tuple[str, str, int, int, NodeMeta]]
    revoked: list[bytes] = []


GossipMessage = Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead | Revoke
_gossip_decoder = msgspec.msgpack.Decoder(GossipMessage)
# A whole well-formed datagram in one call (one parse instead of one per message: a
# datagram of a mesh with slow members carries about twenty). Anything it refuses goes
# the message-by-message way, which says what was wrong and keeps the good messages.
_datagram_decoder = msgspec.msgpack.Decoder(tuple[int, list[GossipMessage]])
_stream_decoder = msgspec.msgpack.Decoder(PushPull)
_encode = msgspec.msgpack.encode


class State(IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3
    REMOVED = 4
    """Removed for good by the operator (a signed revocation): final."""


_STATES = tuple(State)
# The states as module constants: reading ``State.ALIVE`` goes through the enum's
# class machinery (several times slower than a global), and the hot paths compare
# states on every message. Same objects, so nothing else changes.
_ALIVE = State.ALIVE
_SUSPECT = State.SUSPECT
_DEAD = State.DEAD
_LEFT = State.LEFT
_REMOVED = State.REMOVED

# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class MemberJoined(Event):
    name: str
    addr: str
    meta: NodeMeta
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberAlive(Event):
    """A suspected or dead member is alive again (it refuted, or came back)."""

    name: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberSuspect(Event):
    name: str
    incarnation: int
    source: str


@dataclass(frozen=True, slots=True)
class MemberDown(Event):
    """A member was declared dead (failure, not a graceful leave)."""

    name: str
    incarnation: int
    source: str


@dataclass(frozen=True, slots=True)
class MemberLeft(Event):
    name: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberUpdated(Event):
    name: str
    meta: NodeMeta
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberRemoved(Event):
    """A member was removed for good (``name`` may be this node itself, or one never
    seen); ``entry`` is the signed revocation, for the driver to keep."""

    name: str
    entry: bytes


@dataclass(frozen=True, slots=True)
class MemberReaped(Event):
    """A long-dead member was forgotten."""

    name: str


VIEW_CHANGES = (MemberJoined, MemberAlive, MemberDown, MemberLeft, MemberUpdated, MemberRemoved)
"""Events after which the set of live members (or what they say) may differ."""
GONE = (MemberDown, MemberLeft, MemberRemoved)
"""Events after which a member no longer takes part."""

# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class Member:
    name: str
    addr: str
    inc: int
    state: State
    meta: NodeMeta
    state_since: float
    coord: Coordinate | None = None
    shared: bool = False
    """True while this record is shared, read-only, by many nodes' views (a simulator's
    converged start); a node copies it before changing it."""


def suspicion_min_timeout(config: MembershipConfig, n: int) -> float:
    """memberlist's suspicionTimeout: grows with log10 of the mesh size."""
    scale = max(1.0, math.log10(max(1, n)))
    return config.suspicion_mult * scale * config.probe_interval_s


def retransmit_limit(config: MembershipConfig, n: int) -> int:
    return config.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))


def push_pull_period(config: MembershipConfig, n: int) -> float:
    if n <= 32:
        return config.push_pull_interval_s
    mult = math.ceil(math.log2(n) - math.log2(32)) + 1
    return mult * config.push_pull_interval_s


class _Suspicion:
    """Lifeguard's dynamic suspicion timer for one member."""

    __slots__ = ("answered", "confirmations", "expire", "k", "last_chances", "log_k1", "max_s",
                 "min_s", "shortcut", "start", "timer")

    def __init__(self, source: str, k: int, min_s: float, max_s: float, start: float) -> None:
        self.confirmations = {source}
        self.k = k
        self.log_k1 = math.log(k + 1) if k >= 1 else 0.0
        """``log(k + 1)``, the denominator of every ``timeout()`` (re-armed per confirmation)."""
        self.min_s = min_s
        self.max_s = max_s
        self.start = start
        self.timer: _Timer | None = None
        self.expire: Callable[[float], None] | None = None
        """Its expiry callback, made once (a suspicion is re-armed by each confirmation)."""
        self.last_chances = 0
        self.answered = False
        self.shortcut = True
        """Whether a datagram may skip a ``Suspect`` that cannot change this suspicion
        (``Membership.handle_datagram``): its member's record says suspect while the
        suspicion is pending, except after the view was replaced under it
        (``install_shared_view``), which sets this False."""

    def timeout(self) -> float:
        if self.k < 1:
            return self.min_s
        n = len(self.confirmations) - 1
        frac = math.log(n + 1) / self.log_k1
        return max(self.min_s, self.max_s - frac * (self.max_s - self.min_s))

    def deadline(self) -> float:
        return self.start + self.timeout()


class _Timer:
    __slots__ = ("active", "at", "fn")

    def __init__(self, at: float, fn: Callable[[float], None]) -> None:
        self.at = at
        self.fn = fn
        self.active = True


class _Broadcast:
    __slots__ = ("data", "key", "order", "size", "transmits")

    def __init__(self, key: str, data: bytes, order: int, transmits: int) -> None:
        self.key = key
        self.data = data
        self.size = len(data) + 2  # what it takes of a datagram's budget
        self.order = order
        self.transmits = transmits
        """Times sent, less the queue's ``Membership._bpend`` (datagrams that took every
        queued broadcast, counted once for the queue rather than once per broadcast)."""


def _broadcast_rank(b: _Broadcast) -> tuple[int, int]:
    """Sending order of queued broadcasts: fewest transmissions first, newest first
    among equals (memberlist's order). Unique: ``order`` is."""
    return (b.transmits, -b.order)


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    sent: float
    acked: bool = False
    nacks: int = 0
    expected_nacks: int = 0
    timeout_timer: _Timer | None = None


@dataclass(slots=True)
class _Relay:
    """An indirect probe we are carrying out for someone else."""

    origin_seq: int
    origin_addr: str
    nack: bool
    timer: _Timer | None = None


# --------------------------------------------------------------------------- protocol


class Membership:
    """One node's view of the mesh. Drive it as described in ``core/outputs.py``."""

    def __init__(
        self,
        name: str,
        addr: str,
        meta: NodeMeta,
        *,
        config: MembershipConfig | None = None,
        rng: random.Random,
        now: float,
        incarnation: int = 0,
        verify_revocation: Callable[[bytes], str | None] | None = None,
    ) -> None:
        """``verify_revocation(entry)`` returns the name a valid signed entry removes, or
        None; without it, revocations are ignored (counted)."""
        self.config = config or MembershipConfig()
        self._now = now
        self.name = name
        self.addr = addr
        self.rng = rng
        self._check_meta(meta)
        self.members: dict[str, Member] = {
            name: Member(name, addr, incarnation, _ALIVE, meta, now)
        }
        self.vivaldi = VivaldiClient(self.config.vivaldi, rng)
        self.awareness = 0
        self.stats: dict[str, int] = {}
        self._outputs: list[Output] = []
        self._timers: list[tuple[float, int, _Timer]] = []
        self._cancelled = 0
        """Cancelled timers still in ``_timers`` (dropped in bulk, see ``_cancel``)."""
        self._timer_seq = 0
        self._seq = 0
        self._probes: dict[int, _Probe] = {}
        self._last_chance: dict[int, str] = {}
        # Members dead or left, in the order they went (a dict: ordered, O(1) removal).
        self._down: dict[str, None] = {}
        self._relays: dict[int, _Relay] = {}
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._standby_turns: dict[str, int] = {}
        """Turns in the probe round each standby member was passed over since its last
        probe (``standby_probe_every``)."""
        self._current_probe: _Probe | None = None
        self._suspicions: dict[str, _Suspicion] = {}
        self._broadcasts: dict[str, _Broadcast] = {}
        # The same broadcasts in sending order (fewest transmissions first, newest first
        # among equals), kept sorted as they change rather than sorted per datagram;
        # re-sorted only after a datagram that took some of them but not all.
        self._bqueue: list[_Broadcast] = []
        self._bqueue_sorted = True
        self._broadcast_order = 0
        # Most datagrams of a busy mesh take every queued broadcast. Such a take is
        # counted once, in _bpend, which every queued broadcast's ``transmits`` leaves
        # out (a broadcast queued later starts at -_bpend): a uniform offset, so the
        # sending order is the same. _bsize is the queue's total size, and _bjoined its
        # data joined in sending order (None: build it when next needed), the same bytes
        # for every datagram until the queue changes.
        self._bpend = 0
        self._bsize = 0
        self._bjoined: bytes | None = None
        self._limit = 0
        """``retransmit_limit`` for ``_limit_alive`` live members under ``_limit_config``."""
        self._limit_alive = -1
        self._limit_config: MembershipConfig | None = None
        self._gossip_timer: _Timer | None = None
        self._gossip_phase = rng.uniform(0, self.config.gossip_interval_s)
        self._alive_count = 1
        self._seeds: list[str] = []
        self._join_attempts = 0
        self._joined = False
        self._join_pending: set[str] = set()
        self._left = False
        self.left_at: float | None = None
        self._stopped = False
        self._verify_revocation = verify_revocation
        # Handler of each gossip message type (decoding yields exactly these types).
        self._handlers: dict[type, Callable[[Any, float], object]] = {
            Ping: self._on_ping,
            Ack: self._on_ack,
            Alive: self._on_alive,
            Suspect: self._on_suspect,
            Dead: self._on_dead,
            IndirectPing: self._on_indirect_ping,
            Revoke: self._on_revoke,
            Nack: self._on_nack,
        }
        self.revoked: dict[str, bytes] = {}
        """Removed member name -> the signed entry that removed it."""
        self._revoked_by_entry: dict[bytes, str] = {}
        self.removed = False
        """This node itself was removed: it stops taking part (the driver shuts down)."""
        # Stagger the first rounds so a mesh started at once does not probe in lockstep.
        self._at(now + rng.uniform(0, self.config.probe_interval_s), self._probe_tick)
        self._push_pull_timer = self._at(
            now + rng.uniform(0, self.config.push_pull_interval_s), self._push_pull_tick
        )
        self._at(now + rng.uniform(0, self.config.reconnect_interval_s), self._reconnect_tick)
        self._queue_alive(self.members[name])

    # ------------------------------------------------------------------ public API

    @property
    def incarnation(self) -> int:
        return self.members[self.name].inc

    @property
    def meta(self) -> NodeMeta:
        return self.members[self.name].meta

    def alive_count(self) -> int:
        return self._alive_count

    def live_members(self) -> list[Member]:
        """Members believed alive or suspect (including this node)."""
        return [m for m in self.members.values() if m.state <= _SUSPECT]

    def state_of(self, name: str) -> State | None:
        m = self.members.get(name)
        return None if m is None else m.state

    def join(self, seeds: Iterable[str], now: float) -> None:
        """Join through seed addresses: a push/pull with each (retried while alone)."""
        self._now = now
        self._seeds = [s for s in seeds if s != self.addr]
        self._join_attempts = 0
        self._join_round(now)

    def leave(self, now: float) -> None:
        """Leave gracefully: tell the mesh, then the driver stops us after
        ``config.leave_propagate_s``."""
        self._now = now
        if self._left:
            return
        me = self.members[self.name]
        me.inc += 1
        self._left = True
        self.left_at = now
        self._queue_broadcast(me.name, _encode(Dead(me.name, me.inc, me.name)))
        self._gossip_now(now)

    def revoke(self, entry: bytes, now: float) -> str | None:
        """Apply a signed revocation (from the operator, or loaded from disk at start);
        returns the removed name, or None if the entry does not verify."""
        self._now = now
        return self._on_revoke(Revoke(entry), now)

    def update_meta(self, meta: NodeMeta, now: float) -> None:
        """Change this node's metadata; spreads with a higher incarnation."""
        self._now = now
        self._check_meta(meta)
        me = self.members[self.name]
        me.meta = meta
        me.inc += 1
        self._queue_alive(me)
        self._emit(MemberUpdated(me.name, meta, me.inc))

    def install_view(self, members: Iterable[tuple[str, str, int, NodeMeta]], now: float) -> None:
        """Start from an already converged view (name, addr, incarnation, meta) with
        nothing to gossip: lets a simulator measure a 10,000-node mesh's failure
        detection without first simulating 10,000 joins."""
        self._now = now
        for name, addr, inc, meta in members:
            if name != self.name and name not in self.members:
                self._add_member(Alive(name, inc, addr, meta), now)
                self._set_state(self.members[name], _ALIVE, now)
        self._after_install(now)

    def install_shared_view(
        self, records: dict[str, Member], order: list[str], now: float,
        live: int | None = None,
    ) -> None:
        """Like ``install_view``, but the records (marked ``shared``) are shared with
        other nodes and copied only when this node changes one: a 10,000-node
        converged start then costs 10,000 dicts of pointers, not 10^8 records.
        ``live``: how many of ``records`` are alive or suspect, if the caller knows
        (it installs the same records in every node; counting them per node is
        O(N^2) for the mesh)."""
        self._now = now
        for sus in self._suspicions.values():
            # Their members' records are replaced: leave them to _on_suspect's checks.
            sus.shortcut = False
        mine = self.members[self.name]
        self.members = dict(records)
        self.members[self.name] = mine
        probe_order = list(order)
        if self.name in records or self.name in probe_order:
            probe_order.remove(self.name)  # names in order are unique
        self._probe_order = probe_order
        self._probe_index = 0
        if live is None:
            live = sum(1 for m in records.values() if m.state <= _SUSPECT)
        own = records.get(self.name)
        if own is not None and own.state <= _SUSPECT:
            live -= 1
        self._alive_count = 1 + live
        self._after_install(now)

    def _after_install(self, now: float) -> None:
        self._broadcasts.clear()
        self._bqueue.clear()
        self._bqueue_sorted = True
        self._bsize = 0
        self._bjoined = None
        self._joined = True
        # Spread the first full-state exchange over the period this mesh size calls for.
        self._cancel(self._push_pull_timer)
        period = push_pull_period(self.config, self._alive_count)
        self._push_pull_timer = self._at(now + self.rng.uniform(0, period), self._push_pull_tick)

    def coordinate(self) -> Coordinate:
        return self.vivaldi.coordinate

    def estimate_rtt_to(self, name: str) -> float | None:
        m = self.members.get(name)
        if name == self.name:
            return 0.0
        if m is None or m.coord is None:
            return None
        return estimate_rtt(self.vivaldi.coordinate, m.coord)

    def health_score(self) -> int:
        return self.awareness

    # ------------------------------------------------------------------ driver contract

    def drain(self) -> list[Output]:
        out = self._outputs
        self._outputs = []
        return out

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and not timers[0][2].active:
            _heappop(timers)
            self._cancelled -= 1
        return timers[0][0] if timers else None

    def on_timer(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, timer = _heappop(timers)
            if timer.active:
                timer.active = False
                self._now = now
                timer.fn(now)
            else:
                self._cancelled -= 1

    def handle_datagram(self, src: str, payload: bytes, now: float) -> None:
        self._now = now
        if len(payload) <= self.config.max_payload_bytes:
            try:
                version, msgs = _datagram_decoder.decode(payload)
            except DECODE_ERRORS:
                pass  # malformed somewhere: the slow path below finds out where
            else:
                if version == PROTOCOL_VERSION and len(msgs) <= MAX_ENVELOPE_MESSAGES:
                    # Decoding is pure: the same messages the slow path would decode
                    # one by one, handled in the same order.
                    stats = self.stats
                    stats["bytes_in"] = stats.get("bytes_in", 0) + len(payload)
                    stats["packets_in"] = stats.get("packets_in", 0) + 1
                    handlers = self._handlers
                    suspicions = self._suspicions
                    members = self.members
                    revoked = self.revoked
                    me = self.name
                    for msg in msgs:
                        if type(msg) is Suspect and not revoked:
                            # The hot case of a mesh with slow members (about fourteen
                            # per datagram at 1,000 nodes): a suspicion about a member we
                            # suspect already, with more than K confirmations counted or
                            # from a source counted already. _on_suspect would return
                            # without a change (no counter, no output, no timer): skip it
                            # here, before the member lookup and the call. A pending
                            # suspicion means the member is suspect at the suspicion's
                            # incarnation (every transition out of suspect cancels it
                            # first), and it is never this node.
                            sus = suspicions.get(msg.node)
                            if sus is not None and sus.shortcut:
                                confirmations = sus.confirmations
                                if len(confirmations) > sus.k or msg.source in confirmations:
                                    continue
                        elif type(msg) is Alive and not revoked and msg.node != me:
                            # The gossip of a refutation, heard again: _on_alive returns
                            # at once for an incarnation it has (no counter, no output).
                            m = members.get(msg.node)
                            if m is not None and msg.inc <= m.inc:
                                continue
                        handlers[type(msg)](msg, now)
                    return
        self._handle_datagram_slowly(payload, now)

    def _handle_datagram_slowly(self, payload: bytes, now: float) -> None:
        try:
            raws = decode_envelope(payload, self.config.max_payload_bytes)
        except WireError as exc:
            self._count("rejected." + exc.reason)
            return
        stats = self.stats
        stats["bytes_in"] = stats.get("bytes_in", 0) + len(payload)
        stats["packets_in"] = stats.get("packets_in", 0) + 1
        decode = _gossip_decoder.decode
        handlers = self._handlers
        for raw in raws:
            try:
                msg = decode(raw)
            except DECODE_ERRORS:
                self._count("rejected.malformed")
                continue
            handlers[type(msg)](msg, now)

    def handle_stream(self, src: str, payload: bytes, now: float,
                      peer: str | None = None) -> bytes | None:
        """A push/pull from ``src``; ``peer``: the name its certificate carries (the
        driver's authentication), which must be the one the message claims."""
        self._now = now
        msg = self._decode_stream(payload, peer)
        if msg is None:
            return None
        self._merge_remote(msg, now)
        if msg.join:
            self._count("joins_served")
        return _encode(
            _PushPullOut(self.name, False, self._snapshot(), list(self.revoked.values())))

    def handle_stream_reply(self, src: str, payload: bytes, now: float,
                            peer: str | None = None) -> None:
        self._now = now
        msg = self._decode_stream(payload, peer)
        if msg is None:
            return
        self._join_pending.discard(src)
        self._merge_remote(msg, now)
        if not self._joined and msg.source != self.name:
            self._joined = True

    def stream_failed(self, dst: str, now: float) -> None:
        self._now = now
        self._count("stream_failures")
        if dst in self._join_pending:
            self._join_pending.discard(dst)
            if not self._join_pending and not self._joined:
                self._schedule_join_retry(now)

    # ------------------------------------------------------------------ plumbing

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _count_n(self, key: str, n: int) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def _emit(self, event: Event) -> None:
        self._outputs.append(event)

    def _at(self, at: float, fn: Callable[[float], None]) -> _Timer:
        timer = _Timer(at, fn)
        self._timer_seq += 1
        _heappush(self._timers, (at, self._timer_seq, timer))
        return timer

    def _cancel(self, timer: _Timer) -> None:
        """Cancel a timer. It stays in the heap (skipped when it comes up) until the
        cancelled ones are at least half of the heap: then they are dropped in one pass.
        A suspicion re-armed by each confirmation leaves its earlier timer behind, and
        at 1,000 nodes with slow members these made most of a node's heap (and most of
        what the cyclic GC walks). Which timers fire, and in which order, is the same:
        the heap is ordered by (deadline, sequence number) alone."""
        if not timer.active:
            return  # fired or cancelled already: not in the heap as a live entry
        timer.active = False
        self._cancelled += 1
        timers = self._timers
        if self._cancelled >= 64 and 2 * self._cancelled >= len(timers):
            # In place: on_timer may be iterating over this very list.
            timers[:] = [entry for entry in timers if entry[2].active]
            heapq.heapify(timers)
            self._cancelled = 0

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _scale(self, t: float) -> float:
        return t * (self.awareness + 1)

    def _apply_awareness(self, delta: int) -> None:
        if not self.config.lifeguard or delta == 0:
            return
        score = min(max(self.awareness + delta, 0), self.config.awareness_max - 1)
        if score != self.awareness:
            self.awareness = score
            self._count("awareness_changes")

    def _check_meta(self, meta: NodeMeta) -> None:
        size = len(_encode(meta))
        if size > self.config.max_meta_bytes:
            raise ValueError(
                f"node metadata is {size} bytes, more than max_meta_bytes="
                f"{self.config.max_meta_bytes}"
            )

    def _decode_stream(self, payload: bytes, peer: str | None) -> PushPull | None:
        if len(payload) > self.config.max_stream_bytes:
            self._count("rejected.oversized")
            return None
        try:
            msg = _stream_decoder.decode(payload)
        except DECODE_ERRORS:
            self._count("rejected.malformed")
            return None
        if (len(msg.states) > self.config.max_members
                or len(msg.revoked) > self.config.max_revocations):
            self._count("rejected.oversized")
            return None
        if peer is not None and msg.source != peer:
            # A node speaks only for itself: its certificate names who it is.
            self._count("rejected.impersonation")
            return None
        if msg.source in self.revoked:
            self._count("rejected.removed")
            return None
        self._count("push_pull_in")
        return msg

    # ------------------------------------------------------------------ sending

    def _send(self, addr: str, first: bytes | None, now: float) -> None:
        """Send one datagram: ``first`` (if any) plus as many queued broadcasts as fit."""
        budget = self.config.max_payload_bytes - ENVELOPE_OVERHEAD
        if first is None:
            if not self._bqueue:
                return
            count, joined = self._take_joined(budget)
            if not count:
                return
            payload = envelope_head(count) + joined
        else:
            if self._bqueue:
                count, joined = self._take_joined(budget - len(first))
                payload = envelope_head(count + 1) + first + joined
            else:
                payload = envelope_head(1) + first
        size = len(payload)
        assert size <= self.config.max_payload_bytes, size
        stats = self.stats  # self._count("packets_out"), self._count_n("bytes_out", size)
        stats["packets_out"] = stats.get("packets_out", 0) + 1
        stats["bytes_out"] = stats.get("bytes_out", 0) + size
        self._outputs.append(SendDatagram(addr, payload))

    _fast_broadcasts = True
    """Take a queue that fits whole in one go (``_take_joined``); False: one broadcast
    at a time (``_take_broadcasts``), for tests comparing the two."""

    def _take_joined(self, budget: int) -> tuple[int, bytes]:
        """What ``_take_broadcasts(budget)`` takes, as (how many, their bytes joined),
        with the same effects on the queue. When the whole queue fits, the usual case,
        it is taken at once: one transmission counted for the queue (``_bpend``), the
        expired ones dropped from its end, the bytes joined once per queue change."""
        queue = self._bqueue
        if not queue or budget <= 2:
            return 0, b""
        if not self._bqueue_sorted:
            queue.sort(key=_broadcast_rank)
            self._bqueue_sorted = True
            self._bjoined = None
        # The loop of _take_broadcasts takes every broadcast of a queue whose total size
        # fits and stops early only when 8 bytes or fewer are left before the last one
        # (then at least the last one's size is left: more than 8 is enough).
        if self._bsize > budget or queue[-1].size <= 8 or not self._fast_broadcasts:
            out = self._take_broadcasts(budget)
            return len(out), b"".join(out)
        joined = self._bjoined
        if joined is None:
            joined = self._bjoined = b"".join([b.data for b in queue])
        count = len(queue)
        pend = self._bpend + 1
        self._bpend = pend
        limit = self._retransmit_limit()
        if queue[-1].transmits + pend >= limit:
            # Sorted by transmissions: the ones reaching the limit are at the end.
            broadcasts = self._broadcasts
            while queue and queue[-1].transmits + pend >= limit:
                b = queue.pop()
                del broadcasts[b.key]
                self._bsize -= b.size
            self._bjoined = None
        return count, joined

    def _retransmit_limit(self) -> int:
        n = self._alive_count
        config = self.config
        if n != self._limit_alive or config is not self._limit_config:
            # The same number retransmit_limit gives, computed when the view's size changes
            # (two logarithms per datagram otherwise).
            self._limit = retransmit_limit(config, n)
            self._limit_alive = n
            self._limit_config = config
        return self._limit

    def _take_broadcasts(self, budget: int) -> list[bytes]:
        if not self._broadcasts or budget <= 2:
            return []
        limit = self._retransmit_limit() - self._bpend  # in the queue's ``transmits``
        # Fewest transmissions first, newest first among equals (memberlist's order).
        queue = self._bqueue
        if not self._bqueue_sorted:
            queue.sort(key=_broadcast_rank)
            self._bqueue_sorted = True
            self._bjoined = None
        out: list[bytes] = []
        expired = False
        every = True  # every queued broadcast was taken: their order is unchanged
        last = len(queue) - 1
        for i, b in enumerate(queue):
            size = b.size
            if size > budget:
                every = False
                continue
            budget -= size
            out.append(b.data)
            b.transmits += 1
            if b.transmits >= limit:
                del self._broadcasts[b.key]
                self._bsize -= size
                expired = True
            if budget <= 8:
                if i < last:
                    every = False
                break
        if expired:
            broadcasts = self._broadcasts
            self._bqueue = [b for b in queue if broadcasts.get(b.key) is b]
            self._bjoined = None
        if not every:
            self._bqueue_sorted = False
        return out

    def _queue_broadcast(self, key: str, data: bytes) -> None:
        """Queue an update about member ``key``; it replaces any older one about it."""
        self._broadcast_order += 1
        b = _Broadcast(key, data, self._broadcast_order, -self._bpend)
        old = self._broadcasts.get(key)
        self._broadcasts[key] = b
        queue = self._bqueue
        if old is not None:
            queue.remove(old)
            self._bsize -= old.size
        queue.insert(0, b)  # no transmissions yet and the newest: first in sending order
        self._bsize += b.size
        self._bjoined = None
        if len(self._broadcasts) > self.config.max_pending_broadcasts:
            victim = queue[-1] if self._bqueue_sorted else max(queue, key=_broadcast_rank)
            del self._broadcasts[victim.key]
            queue.remove(victim)
            self._bsize -= victim.size
            self._count("broadcasts_shed")
        if self._gossip_timer is None:
            self._schedule_gossip()

    def _queue_alive(self, m: Member) -> None:
        self._queue_broadcast(m.name, _encode(Alive(m.name, m.inc, m.addr, m.meta)))

    # ------------------------------------------------------------------ gossip round

    def _schedule_gossip(self) -> None:
        # Keep a fixed phase so an idle-then-busy gossip round is indistinguishable from
        # a ticker that fires every interval and sends nothing when it has nothing.
        now = self._now
        interval = self.config.gossip_interval_s
        k = math.floor((now - self._gossip_phase) / interval) + 1
        at = self._gossip_phase + k * interval
        while at <= now:  # float rounding must never schedule a tick in the past
            at += interval
        self._gossip_timer = self._at(at, self._gossip_tick)

    def _gossip_tick(self, now: float) -> None:
        self._gossip_timer = None
        self._gossip_now(now)
        if self._broadcasts and not self._stopped:
            self._schedule_gossip()

    def _gossip_now(self, now: float) -> None:
        if not self._broadcasts:
            return
        config = self.config
        k = config.gossip_nodes
        to_dead_s = config.gossip_to_dead_s
        # _random_members(k, pred) with pred inlined (it runs every gossip round of every
        # node): the same draws, the same members, in the same order.
        names = self._probe_order
        n = len(names)
        targets: list[Member] = []
        if n and k > 0:
            members = self.members
            randrange = self.rng.randrange
            seen: set[str] = set()
            for _ in range(3 * k + 3):
                name = names[randrange(n)]
                if name in seen:
                    continue
                seen.add(name)
                m = members.get(name)
                if m is not None:
                    state = m.state
                    if state <= _SUSPECT or (state == _DEAD and now - m.state_since < to_dead_s):
                        targets.append(m)
                        if len(targets) == k:
                            break
            else:
                self._random_fill(
                    targets, seen, k,
                    lambda m: m.state <= _SUSPECT
                    or (m.state == _DEAD and now - m.state_since < to_dead_s),
                )
        stats = self.stats
        for m in targets:
            if not self._broadcasts:
                break
            self._send(m.addr, None, now)
            stats["gossip_out"] = stats.get("gossip_out", 0) + 1  # self._count("gossip_out")

    def _random_members(self, k: int, pred: Callable[[Member], bool]) -> list[Member]:
        """Up to k distinct random members (not self) satisfying pred."""
        names = self._probe_order
        n = len(names)
        if n == 0 or k <= 0:
            return []
        chosen: list[Member] = []
        seen: set[str] = set()
        # Sample by random index into the probe list: O(k) expected for large meshes.
        for _ in range(3 * k + 3):
            name = names[self.rng.randrange(n)]
            if name in seen:
                continue
            seen.add(name)
            m = self.members.get(name)
            if m is not None and pred(m):
                chosen.append(m)
                if len(chosen) == k:
                    return chosen
        self._random_fill(chosen, seen, k, pred)
        return chosen

    def _random_fill(self, chosen: list[Member], seen: set[str], k: int,
                     pred: Callable[[Member], bool]) -> None:
        """The rest of ``_random_members`` after its draws: a small or sparse view is
        scanned in full."""
        names = self._probe_order
        rest = [
            self.members[nm]
            for nm in names
            if nm not in seen and nm in self.members and pred(self.members[nm])
        ]
        need = k - len(chosen)
        if len(rest) <= need:
            chosen.extend(rest)
        else:
            chosen.extend(self.rng.sample(rest, need))

    # ------------------------------------------------------------------ probing

    def _probe_tick(self, now: float) -> None:
        if self._stopped:
            return
        self._finish_probe(now)
        interval = self._scale(self.config.probe_interval_s)
        self._at(now + interval, self._probe_tick)
        if self._left:
            return
        target = self._next_probe_target()
        if target is None:
            return
        seq = self._next_seq()
        probe = _Probe(seq, target.name, now)
        self._current_probe = probe
        self._probes[seq] = probe
        self._count("probes")
        ping = Ping(seq, target.name, self.name, self.addr)
        extra: list[bytes] = [_encode(ping)]
        if self.config.lifeguard and target.state == _SUSPECT:
            # Buddy system: tell a suspected member it is suspected, so it can refute.
            extra.append(_encode(Suspect(target.name, target.inc, self.name)))
        self._send_many(target.addr, extra, now)
        probe.timeout_timer = self._at(
            now + self._scale(self.config.probe_timeout_s),
            partial(self._probe_timeout, probe),
        )

    def _send_many(self, addr: str, msgs: list[bytes], now: float) -> None:
        first = msgs[0]
        if len(msgs) == 1:
            self._send(addr, first, now)
            return
        budget = self.config.max_payload_bytes - ENVELOPE_OVERHEAD - sum(len(m) + 2 for m in msgs)
        count, joined = self._take_joined(budget)
        payload = envelope_head(len(msgs) + count) + b"".join(msgs) + joined
        self._count("packets_out")
        self._count_n("bytes_out", len(payload))
        self._outputs.append(SendDatagram(addr, payload))

    def _next_probe_target(self) -> Member | None:
        # Random-order round robin, shuffled lazily (one Fisher-Yates step per probe),
        # so a large view is never reshuffled in one go.
        order = self._probe_order
        n = len(order)
        for _ in range(n + 1):
            if self._probe_index >= n:
                if n == 0:
                    return None
                self._probe_index = 0
            i = self._probe_index
            j = self.rng.randrange(i, n)
            order[i], order[j] = order[j], order[i]
            name = order[i]
            self._probe_index += 1
            m = self.members.get(name)
            if m is not None and m.state <= _SUSPECT and name != self.name:
                if m.state == _ALIVE and self._is_standby(m):
                    turns = self._standby_turns.get(name, 0) + 1
                    if turns < self.config.standby_probe_every:
                        self._standby_turns[name] = turns
                        self._count("standby_probes_skipped")
                        continue
                self._standby_turns.pop(name, None)
                return m
        return None

    def _is_standby(self, m: Member) -> bool:
        """Whether ``m``'s capacity tag says it is on standby (``standby_probe_every``)."""
        cfg = self.config
        return cfg.standby_probe_every > 1 and m.meta.tags.get(
            cfg.standby_tag, "").startswith(cfg.standby_prefix)

    def _probe_timeout(self, probe: _Probe, now: float) -> None:
        """No direct ack in time: ask k members to probe indirectly."""
        if probe.acked or self._current_probe is not probe:
            return
        target = self.members.get(probe.target)
        if target is None or target.state > _SUSPECT:
            return
        relays = self._random_members(
            self.config.indirect_checks,
            lambda m: m.state == _ALIVE and m.name != probe.target,
        )
        want_nack = self.config.lifeguard
        for relay in relays:
            msg = IndirectPing(probe.seq, target.name, target.addr, self.name, self.addr, want_nack)
            self._send(relay.addr, _encode(msg), now)
            self._count("indirect_probes")
        if want_nack:
            probe.expected_nacks = len(relays)

    def _finish_probe(self, now: float) -> None:
        """End of a probe period: judge the probe that ran in it."""
        probe = self._current_probe
        self._current_probe = None
        if probe is None:
            return
        self._probes.pop(probe.seq, None)
        if probe.acked:
            return
        if probe.timeout_timer is not None:
            self._cancel(probe.timeout_timer)
        target = self.members.get(probe.target)
        if target is None or target.state > _SUSPECT:
            return
        if probe.expected_nacks > 0:
            self._apply_awareness(max(0, probe.expected_nacks - probe.nacks))
        else:
            self._apply_awareness(1)
        self._count("probe_failures")
        self._on_suspect(Suspect(target.name, target.inc, self.name), now)

    # ------------------------------------------------------------------ receiving

    def _dispatch(self, msg: GossipMessage, src: str, now: float) -> None:
        self._handlers[type(msg)](msg, now)

    def _on_ping(self, msg: Ping, now: float) -> None:
        self._count("pings_in")
        if msg.source in self.revoked or self.removed:
            self._count("rejected.removed")
            return
        if msg.target != self.name:
            # Sent to an address that is now someone else: a name mismatch is not an ack.
            self._count("rejected.wrong_target")
            return
        if self._left:
            return
        ack = _encode(Ack(msg.seq, self.name, self.vivaldi.coordinate))
        sender = self.members.get(msg.source)
        if sender is not None and sender.state == _DEAD:
            # The sender is back from a pause or a partition: tell it at once.
            self._send_many(
                msg.source_addr, [ack, _encode(Dead(sender.name, sender.inc, self.name))], now
            )
            return
        self._send(msg.source_addr, ack, now)

    def _on_ack(self, msg: Ack, now: float) -> None:
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            if relay.timer is not None:
                self._cancel(relay.timer)
            self._send(relay.origin_addr, _encode(Ack(relay.origin_seq, msg.source)), now)
            return
        lc_name = self._last_chance.pop(msg.seq, None)
        if lc_name is not None:
            sus = self._suspicions.get(lc_name)
            if sus is not None and msg.source == lc_name:
                sus.answered = True
            return
        probe = self._probes.get(msg.seq)
        if probe is None or probe.acked:
            return
        probe.acked = True
        if probe.timeout_timer is not None:
            self._cancel(probe.timeout_timer)
        if self._current_probe is probe:
            self._apply_awareness(-1)
        self._count("acks")
        if msg.coord is not None and msg.source == probe.target:
            rtt = now - probe.sent
            if is_valid(msg.coord, self.config.vivaldi):
                self.vivaldi.update(probe.target, msg.coord, rtt)
                member = self.members.get(probe.target)
                if member is not None:
                    self._own(member).coord = msg.coord

    def _on_nack(self, msg: Nack, now: float) -> None:
        probe = self._probes.get(msg.seq)
        if probe is not None:
            probe.nacks += 1

    def _on_indirect_ping(self, msg: IndirectPing, now: float) -> None:
        if msg.source in self.revoked or msg.target in self.revoked:
            self._count("rejected.removed")
            return
        self._count("relays")
        if len(self._relays) >= 1024:
            self._count("relays_shed")
            return
        seq = self._next_seq()
        relay = _Relay(msg.seq, msg.source_addr, msg.nack)
        self._relays[seq] = relay
        self._send(msg.target_addr, _encode(Ping(seq, msg.target, self.name, self.addr)), now)

        def expire(t: float, seq: int = seq) -> None:
            r = self._relays.pop(seq, None)
            if r is not None and r.nack:
                self._send(r.origin_addr, _encode(Nack(r.origin_seq)), t)

        relay.timer = self._at(now + self.config.probe_timeout_s, expire)

    # ------------------------------------------------------------------ state machine

    def _set_state(self, m: Member, state: State, now: float) -> None:
        assert not m.shared, "copy a shared record before changing it"
        was_live = m.state <= _SUSPECT
        is_live = state <= _SUSPECT
        m.state = state
        m.state_since = now
        if was_live and not is_live:
            self._alive_count -= 1
            self._down[m.name] = None
        elif is_live and not was_live:
            self._alive_count += 1
            self._down.pop(m.name, None)
        assert self._alive_count >= 1

    def _add_member(self, msg: Alive, now: float) -> Member | None:
        if len(self.members) >= self.config.max_members:
            self._count("rejected.too_many_members")
            return None
        m = Member(msg.node, msg.addr, msg.inc, _DEAD, msg.meta, now)
        self.members[msg.node] = m
        # Insert at a random position so a newcomer is probed within one round.
        pos = self.rng.randint(self._probe_index, len(self._probe_order))
        self._probe_order.insert(pos, msg.node)
        return m

    def _own(self, m: Member) -> Member:
        """Copy-on-write for records shared between views (see ``install_shared_view``)."""
        if not m.shared:
            return m
        mine = Member(m.name, m.addr, m.inc, m.state, m.meta, m.state_since, m.coord)
        self.members[m.name] = mine
        return mine

    def _on_alive(self, msg: Alive, now: float) -> None:
        if self.revoked and msg.node in self.revoked:
            self._count("rejected.removed")
            return
        if msg.node == self.name:
            me = self.members[self.name]
            if msg.inc > me.inc or (msg.inc == me.inc and msg.meta != me.meta):
                # Someone gossips an older life of ours (we restarted): outbid it.
                self._refute(msg.inc, now)
            return
        m = self.members.get(msg.node)
        new = m is None
        if m is None:
            m = self._add_member(msg, now)
            if m is None:
                return
        elif msg.inc <= m.inc:
            return
        elif m.addr != msg.addr and m.state == _ALIVE:
            # Two live nodes claim one name: keep the one we know until it is suspected
            # (a node restarted on a new port takes over once its old address fails).
            self._count("rejected.name_conflict")
            return
        m = self._own(m)
        was = m.state
        meta_changed = m.meta != msg.meta
        m.inc = msg.inc
        m.addr = msg.addr
        m.meta = msg.meta
        self._cancel_suspicion(m.name)
        if was != _ALIVE or new:
            self._set_state(m, _ALIVE, now)
        self._queue_broadcast(m.name, _encode(msg))
        if new:
            self._emit(MemberJoined(m.name, m.addr, m.meta, m.inc))
        elif was != _ALIVE:
            self._emit(MemberAlive(m.name, m.inc))
            if meta_changed:
                self._emit(MemberUpdated(m.name, m.meta, m.inc))
        elif meta_changed:
            self._emit(MemberUpdated(m.name, m.meta, m.inc))

    def _on_suspect(self, msg: Suspect, now: float) -> None:
        # The hot path of a mesh with slow members: most suspicions gossiped to us are
        # about a member we already suspect, with K confirmations counted.
        source = msg.source
        revoked = self.revoked
        if revoked and source in revoked:
            self._count("rejected.removed")
            return
        node = msg.node
        if node == self.name:
            self._accused(msg.inc, now)
            return
        m = self.members.get(node)
        if m is None or msg.inc < m.inc:
            return
        state = m.state
        if state == _SUSPECT:
            sus = self._suspicions.get(node)
            # Count (and re-gossip) at most K confirmations, as memberlist does: beyond
            # K the timeout is already at its minimum, and re-gossiping every further
            # accuser of a slow node costs O(N) messages each. (The size first: once K
            # are counted, the usual case, the source need not be looked up.)
            if sus is not None:
                confirmations = sus.confirmations
                if len(confirmations) <= sus.k and source not in confirmations:
                    confirmations.add(source)
                    self._count("suspicion_confirmations")
                    self._arm_suspicion(node, sus)
                    self._queue_broadcast(node, _encode(msg))
            return
        if state != _ALIVE:
            return
        m = self._own(m)
        m.inc = msg.inc
        self._set_state(m, _SUSPECT, now)
        self._count("suspicions")
        n = self._alive_count
        min_s = suspicion_min_timeout(self.config, n)
        if self.config.lifeguard:
            k = self.config.suspicion_confirmations
            if n - 2 < k:
                k = 0
            max_s = self.config.suspicion_max_mult * min_s
        else:
            k, max_s = 0, min_s
        if self._is_standby(m):
            # Probed on one turn in standby_probe_every: allow its refutation as long.
            every = self.config.standby_probe_every
            min_s, max_s = min_s * every, max_s * every
            self._count("standby_suspicions")
        sus = _Suspicion(msg.source, k, min_s, max_s, now)
        self._suspicions[m.name] = sus
        self._arm_suspicion(m.name, sus)
        self._queue_broadcast(m.name, _encode(msg))
        self._emit(MemberSuspect(m.name, m.inc, msg.source))

    def _arm_suspicion(self, name: str, sus: _Suspicion) -> None:
        if sus.timer is not None:
            self._cancel(sus.timer)
        expire = sus.expire
        if expire is None:
            expire = sus.expire = partial(self._suspicion_expired, name, sus)
        sus.timer = self._at(sus.deadline(), expire)

    def _suspicion_expired(self, name: str, sus: _Suspicion, now: float) -> None:
        m = self.members.get(name)
        if m is None or m.state != _SUSPECT or self._suspicions.get(name) is not sus:
            return
        lone = len(sus.confirmations) <= max(sus.k, 1)  # fewer than K confirmations
        if self.config.lifeguard and lone and sus.last_chances < self.config.last_chance_probes:
            # Last chance: ping the suspect ourselves, telling it it is suspected. A live
            # node answers, refutes, and its new incarnation rides back on the ack. This
            # catches the rare refutation that gossip failed to bring us.
            sus.last_chances += 1
            sus.answered = False
            for _ in range(2):
                seq = self._next_seq()
                self._last_chance[seq] = name
                msgs = [
                    _encode(Ping(seq, name, self.name, self.addr)),
                    _encode(Suspect(name, m.inc, self.name)),
                ]
                self._send_many(m.addr, msgs, now)
            self._count("last_chance_probes")
            sus.timer = self._at(
                now + self._scale(self.config.probe_timeout_s),
                partial(self._last_chance_over, name, sus),
            )
            return
        self._on_dead(Dead(name, m.inc, self.name), now)

    def _forget_last_chance(self, name: str) -> None:
        for seq in [k for k, v in self._last_chance.items() if v == name]:
            del self._last_chance[seq]

    def _last_chance_over(self, name: str, sus: _Suspicion, now: float) -> None:
        self._forget_last_chance(name)
        m = self.members.get(name)
        if m is None or m.state != _SUSPECT or self._suspicions.get(name) is not sus:
            return
        if sus.answered:
            # It is alive; give its refutation time to reach us before asking again.
            self._count("last_chance_saved")
            sus.timer = self._at(now + sus.min_s, partial(self._suspicion_expired, name, sus))
            return
        self._on_dead(Dead(name, m.inc, self.name), now)

    def _cancel_suspicion(self, name: str) -> None:
        sus = self._suspicions.pop(name, None)
        if sus is not None and sus.timer is not None:
            self._cancel(sus.timer)
        if self._last_chance:
            self._forget_last_chance(name)

    def _on_dead(self, msg: Dead, now: float) -> None:
        if self.revoked and msg.source in self.revoked:
            self._count("rejected.removed")
            return
        if msg.node == self.name:
            self._accused(msg.inc, now)
            return
        m = self.members.get(msg.node)
        if m is None or msg.inc < m.inc:
            return
        if m.state > _SUSPECT:
            return
        m = self._own(m)
        m.inc = msg.inc
        self._cancel_suspicion(m.name)
        left = msg.source == msg.node
        self._set_state(m, _LEFT if left else _DEAD, now)
        self._queue_broadcast(m.name, _encode(msg))
        if left:
            self._emit(MemberLeft(m.name, m.inc))
        else:
            self._count("deaths")
            self._emit(MemberDown(m.name, m.inc, msg.source))

    def _accused(self, inc: int, now: float) -> None:
        """Someone says we are suspect or dead at incarnation ``inc``."""
        if self._left:
            return
        me = self.members[self.name]
        if inc >= me.inc:
            self._refute(inc, now)
        elif me.name not in self._broadcasts:
            # A stale accusation: its sender missed our refutation. Gossip our current
            # incarnation again (it rides on our next ack to that sender), rather than
            # stay silent as memberlist does and let the sender's timer run out.
            self._count("reasserted")
            self._queue_alive(me)

    def _refute(self, inc: int, now: float) -> None:
        me = self.members[self.name]
        me.inc = max(me.inc, inc) + 1
        self._count("refutations")
        self._apply_awareness(1)
        self._queue_alive(me)

    # ------------------------------------------------------------------ push/pull, join

    def _on_revoke(self, msg: Revoke, now: float) -> str | None:
        entry = bytes(msg.entry)
        known = self._revoked_by_entry.get(entry)
        if known is not None:
            return known  # already applied: no signature check for every copy of the gossip
        name = None if self._verify_revocation is None else self._verify_revocation(entry)
        if name is None:
            self._count("rejected.revocation")
            return None
        if name in self.revoked:
            return name
        if len(self.revoked) >= self.config.max_revocations:
            self._count("rejected.too_many_revocations")
            return None
        self.revoked[name] = entry
        self._revoked_by_entry[entry] = name
        self._count("revocations")
        self._queue_broadcast("\x00revoke:" + name, _encode(msg))
        if name == self.name:
            # Removed by the operator: we take no further part (the driver stops us).
            self.removed = True
            self._emit(MemberRemoved(name, entry))
            self.stop()
            return name
        else:
            m = self.members.get(name)
            if m is not None and m.state != _REMOVED:
                # Tell the removed node itself, once, directly: nobody gossips to it any
                # more, and it should stop rather than knock on closed doors.
                notice = encode_envelope([_encode(msg)])
                self._count("packets_out")
                self._count_n("bytes_out", len(notice))
                self._outputs.append(SendDatagram(m.addr, notice))
                m = self._own(m)
                self._cancel_suspicion(name)
                self._set_state(m, _REMOVED, now)
        self._emit(MemberRemoved(name, entry))
        return name

    def _snapshot(self) -> list[tuple[str, str, int, int, NodeMeta]]:
        """Every member as a ``NodeState`` would encode (an array-like struct encodes
        as the tuple of its fields), without building 10,000 structs per push/pull."""
        return [(m.name, m.addr, m.inc, m.state, m.meta) for m in self.members.values()]

    def _merge_remote(self, msg: PushPull, now: float) -> None:
        for entry in msg.revoked:
            if self._verify_revocation is not None:
                self._on_revoke(Revoke(entry), now)
        members = self.members
        revoked = self.revoked
        me = self.name
        for st in msg.states:
            if not 0 <= st.state < len(_STATES):
                self._count("rejected.malformed")
                continue
            state = _STATES[st.state]
            if state == _REMOVED:
                continue  # only a signed entry (above) removes a member
            if state == _ALIVE:
                name = st.name
                if name not in revoked and name != me:
                    m = members.get(name)
                    if m is not None and st.inc <= m.inc:
                        continue  # what _on_alive would decide, without building an Alive
                self._on_alive(Alive(name, st.inc, st.addr, st.meta), now)
            elif state == _LEFT:
                if st.name not in self.members:
                    continue
                self._on_dead(Dead(st.name, st.inc, st.name), now)
            else:
                # A remote "dead" is only a suspicion here (memberlist does the same):
                # it may be stale, and a suspicion can still be refuted.
                self._on_suspect(Suspect(st.name, st.inc, msg.source), now)

    def _push_pull_with(self, addr: str, join: bool) -> None:
        payload = _encode(
            _PushPullOut(self.name, join, self._snapshot(), list(self.revoked.values())))
        self._count("push_pull_out")
        self._outputs.append(StreamRequest(addr, payload))

    def _push_pull_tick(self, now: float) -> None:
        if self._stopped:
            return
        self._push_pull_timer = self._at(
            now + push_pull_period(self.config, self._alive_count), self._push_pull_tick
        )
        if self._left:
            return
        peers = self._random_members(1, lambda m: m.state == _ALIVE)
        if peers:
            self._push_pull_with(peers[0].addr, False)

    def _reconnect_tick(self, now: float) -> None:
        if self._stopped:
            return
        self._at(now + self.config.reconnect_interval_s, self._reconnect_tick)
        self._reap(now)
        if self._left or not self._down:
            return
        dead = [
            m
            for m in map(self.members.__getitem__, self._down)
            if m.state == _DEAD and now - m.state_since < self.config.reconnect_timeout_s
        ]
        if dead:
            target = dead[self.rng.randrange(len(dead))]
            self._count("reconnects")
            self._push_pull_with(target.addr, False)

    def _reap(self, now: float) -> None:
        gone = [
            name
            for name in self._down
            if now - self.members[name].state_since > self.config.dead_reap_s
        ]
        for name in gone:
            del self._down[name]
            del self.members[name]
            self._probe_order.remove(name)
            self._probe_index = min(self._probe_index, len(self._probe_order))
            self._emit(MemberReaped(name))

    def _join_round(self, now: float) -> None:
        self._join_attempts += 1
        self._join_pending = set(self._seeds)
        for seed in self._seeds:
            self._push_pull_with(seed, True)

    def _schedule_join_retry(self, now: float) -> None:
        limit = self.config.join_max_attempts
        if limit and self._join_attempts >= limit:
            self._count("join_gave_up")
            return
        self._at(now + self.config.join_retry_interval_s, self._join_retry)

    def _join_retry(self, now: float) -> None:
        if self._joined or self._alive_count > 1 or self._left:
            return
        self._join_round(now)

    # ------------------------------------------------------------------ shutdown

    def stop(self) -> None:
        """Stop all rounds (after a leave has propagated, or at shutdown)."""
        self._stopped = True
        for _, _, t in self._timers:
            t.active = False
        self._timers.clear()
        self._cancelled = 0
