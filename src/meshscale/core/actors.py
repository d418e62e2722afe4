"""Actors: a service with one replica per key, its state checkpointed in the KV. Decisions
only (issue #22, "a stateful variant").

An actor service is deployed like a service (``core/services.py``: the same spec, the same
placement rules), but a call names a key, and each key has one *owner*: the node ranked
first by rendezvous hashing (Thaler & Ravishankar, as ``core.placement.replica_set``) of
``(service, key)`` over the live nodes that the service's rules allow
(``core.scheduling.feasible``: residency, placement mode, labels, resources). Every node
computes the same owner from the same view, so callers agree without a directory; when
the owner leaves the view, the next node in rank takes over, and a node joining moves
only the keys it now ranks first for. The anchors are Orleans' virtual actors and Pekko's
cluster sharding, minus their directory and coordinator: here the *checkpoint* in the KV
is the only arbiter.

The owner serves a key's calls one at a time. Before its first call it *claims* the key:
it reads the checkpoint from every KV replica of the key it can reach (``pick_checkpoint``),
and writes it back with its own name and the next epoch (``claim``) by a conditional put
naming every version it read (``core.kv``, compare-and-swap). After each call it writes
the new state with the next sequence number (``after_call``) by a conditional put naming
the version its last write made; the call is acknowledged only once that put succeeded.
An owner whose put is refused (``conflict``: another node claimed the key since) has been
*fenced*: it drops the key, and the call, whose effect was not checkpointed, is retried
at the owner the caller's view names (``fenced``).

What this guarantees (given the KV's mutual exclusion, ``core/kv.py``: both nodes' views
agree on the key's KV replicas and those are all up during a put):

- At most one owner checkpoints a key at a time: two owners' puts both naming the same
  version cannot both succeed, and after a claim succeeded every older version is gone
  from a majority, so the previous owner's next put fails.
- No acknowledged call is lost. A loader picks, among the records it read, the one
  highest by (sequence, epoch) (``pick_checkpoint``). Its read reaches a majority, which
  meets the majority that holds the last acknowledged checkpoint ``x`` (or a successor
  written from it). A record that did not descend from ``x`` is a refused put's residue
  (``core/kv.py``, "No undo") from a writer whose base was older than ``x``: a fenced
  owner's residue has a sequence at most one above its base and an epoch below ``x``'s,
  a rival claim's residue keeps its base's sequence; either ranks below ``x`` once ``x``
  carries at least one call after its owner's claim, which an acknowledged ``x`` does.
- Not exactly-once for calls that failed. A call whose checkpoint put failed or was
  refused may have left a residue that a later loader picks (it ranks above the claim
  made from the same base): its effect is then in the state, though the call was retried
  or reported failed. Calls acknowledged are in the state exactly once.
- Views that disagree on the owner cost retries (both nodes claim in turn), never
  correctness; views that disagree on the key's KV replica set fall outside the KV's
  guarantee, and with them this one.

Sans-I/O: the runtime (``runtime/services_plane.py``) reads and writes the KV, runs the
user's class in a replica process and drives these functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from meshscale.core.kv import ABSENT, MAX_EXPECTED
from meshscale.core.placement import replica_set
from meshscale.core.scheduling import NodeState, SchedulingError, TaskSpec, feasible
from meshscale.core.services import (
    ERR_REPLICA_LOST,
    ERR_RETRIES_EXHAUSTED,
    CallFailed,
    ServiceConfig,
    ServiceSpec,
    Unplaceable,
)

__all__ = [
    "ACTOR_PREFIX",
    "MAX_ACTOR_KEY_CHARS",
    "ActorCheckpoint",
    "ActorConfig",
    "Loaded",
    "actor_kv_key",
    "actor_owner",
    "after_call",
    "check_actor_key",
    "claim",
    "decode_checkpoint",
    "encode_checkpoint",
    "pick_checkpoint",
]

ACTOR_PREFIX = "actor/"
"""KV keys of actor checkpoints: ``actor/<service>/<key>``."""
MAX_ACTOR_KEY_CHARS = 256
"""Longest actor key (a KV key holds the service name too)."""


@dataclass(frozen=True)
class ActorConfig:
    """Bounds of the actor decisions."""

    max_state_bytes: int = 512 * 1024
    """An actor's pickled state after a call; beyond it the call fails (``too-large``) and
    the state is reloaded from the last checkpoint. Below the KV value limit (1 MiB)."""
    max_keys_per_node: int = 4_096
    """Keys one node keeps loaded per actor service; beyond it the least recently called
    is dropped (its checkpoint is current, so that costs a reload, nothing else)."""
    claim_retries: int = 3
    """Reads and claims of a key in a row that met a conflict before a call gives up."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_state_bytes <= 1024 * 1024 - 4096:
            raise ValueError(f"max_state_bytes must be in [1, 1 MiB - 4 KiB], got "
                             f"{self.max_state_bytes}")
        if self.max_keys_per_node < 1 or self.claim_retries < 1:
            raise ValueError("max_keys_per_node and claim_retries must be >= 1")


class ActorCheckpoint(msgspec.Struct, frozen=True, array_like=True):
    """One key's checkpoint as the KV holds it. ``state`` is the pickled instance (None:
    never constructed; the owner runs ``__init__``)."""

    seq: int
    """Calls acknowledged on this key so far."""
    epoch: int
    """Claims of this key so far: each new owner's claim adds one."""
    owner: str
    state: bytes | None

    @property
    def rank(self) -> tuple[int, int, str]:
        return (self.seq, self.epoch, self.owner)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ActorCheckpoint)


def encode_checkpoint(ck: ActorCheckpoint) -> bytes:
    return _encoder.encode(ck)


def decode_checkpoint(raw: bytes) -> ActorCheckpoint | None:
    """The checkpoint, or None for bytes that are not one (not written by an actor)."""
    try:
        ck = _decoder.decode(raw)
    except msgspec.DecodeError:
        return None
    if ck.seq < 0 or ck.epoch < 0:
        return None
    return ck


def check_actor_key(key: object) -> str:
    """``key`` when it is a usable actor key, else ``ValueError`` naming the rule."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"an actor key is a non-empty string, not {key!r:.80}")
    if len(key) > MAX_ACTOR_KEY_CHARS or "\0" in key:
        raise ValueError(f"an actor key is at most {MAX_ACTOR_KEY_CHARS} characters "
                         "(MAX_ACTOR_KEY_CHARS), without NUL")
    return key


def actor_kv_key(service: str, key: str) -> str:
    """Where ``(service, key)``'s checkpoint lives in the KV."""
    return f"{ACTOR_PREFIX}{service}/{check_actor_key(key)}"


def actor_owner(spec: ServiceSpec, key: str, nodes: Iterable[NodeState],
                exclude: Iterable[str] = ()) -> str | Unplaceable:
    """The node that serves ``(spec.name, key)`` in the view ``nodes``: the first by
    rendezvous rank among the nodes the service's rules allow, leaving out ``exclude``
    (nodes the caller could not reach). The same inputs in any order give the same
    answer; a node leaving moves only the keys it owned."""
    out = set(exclude)
    view = [n for n in nodes if n.name not in out]
    task = TaskSpec(
        task_id=spec.name, cpus=spec.resources.cpus, memory_mb=spec.resources.memory_mb,
        gpus=spec.resources.gpus, labels=dict(spec.labels), residency=spec.residency,
        placement=spec.mode())
    try:
        ok = feasible(task, view)
    except SchedulingError as e:
        why = str(e).replace(f"task {spec.name!r}", f"actor {spec.name!r}", 1)
        return Unplaceable(spec.name, e.rule, why.replace("the task's", "the actor's"))
    first = replica_set(actor_kv_key(spec.name, key), [n.member for n in ok], 1)
    return first[0].name


@dataclass(frozen=True)
class Loaded:
    """What a loader read: the checkpoint to start from (None: a new key) and the versions
    its claim names (every version read, so a rival's residue does not block it)."""

    checkpoint: ActorCheckpoint | None
    expected: tuple[str, ...]


def pick_checkpoint(read: Iterable[tuple[str | None, bytes | None]]) -> Loaded:
    """From each KV replica's answer (its record's stamp and value; ``(None, None)``: it
    has none) the checkpoint to load: the highest by (sequence, epoch), see the module
    docstring. A value that is no checkpoint, or a tombstone, counts as none."""
    best: ActorCheckpoint | None = None
    expected: set[str] = set()
    for stamp, value in read:
        expected.add(ABSENT if stamp is None or value is None else stamp)
        ck = None if value is None else decode_checkpoint(value)
        if ck is None:
            if stamp is not None:
                expected.add(stamp)
            continue
        if best is None or ck.rank > best.rank:
            best = ck
    names = sorted(expected)
    if len(names) > MAX_EXPECTED:
        raise ValueError(f"{len(names)} versions read: more than MAX_EXPECTED")
    return Loaded(best, tuple(names))


def claim(loaded: ActorCheckpoint | None, me: str) -> ActorCheckpoint:
    """The record a new owner ``me`` writes before serving: the same state and sequence,
    the next epoch."""
    if loaded is None:
        return ActorCheckpoint(0, 1, me, None)
    return ActorCheckpoint(loaded.seq, loaded.epoch + 1, me, loaded.state)


def after_call(current: ActorCheckpoint, me: str, state: bytes,
               config: ActorConfig) -> ActorCheckpoint:
    """The record the owner writes after a call left the instance in ``state``
    (``ValueError`` naming ``max_state_bytes`` when it is too large)."""
    if current.owner != me:
        raise ValueError(f"{me} checkpoints a key {current.owner} holds")
    if len(state) > config.max_state_bytes:
        raise ValueError(f"the actor's state is {len(state)} bytes, over "
                         f"max_state_bytes={config.max_state_bytes}")
    return ActorCheckpoint(current.seq + 1, current.epoch, me, state)


def actor_lost(spec: ServiceSpec, key: str, method: str, owner: str, retries: int,
               config: ServiceConfig) -> CallFailed | None:
    """A call to ``key`` lost its owner mid-call (``retries``: how many times it was
    already retried after such a loss). None: send it again, to the key's next owner; that
    only for a method declared idempotent with retries left (``config.max_retries``), as
    ``core.services.failover`` rules for a service. Otherwise the stated error: the call
    may or may not count (the owner may have checkpointed it before it was lost)."""
    if spec.is_idempotent(method) and retries < config.max_retries:
        return None
    code = ERR_REPLICA_LOST if not spec.is_idempotent(method) else ERR_RETRIES_EXHAUSTED
    return CallFailed(code, f"actor {spec.name!r} key {key!r}: its owner {owner} was lost "
                            f"running {method!r}; the call may or may not count")
