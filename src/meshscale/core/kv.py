"""Replicated key-value decisions: last-writer-wins records and tunable consistency.

The small mutable part of the data model (named references, policies, task records) after
DeCandia et al., "Dynamo", SOSP 2007: a key lives on N replicas chosen by rendezvous
hashing (``placement.replica_set``), a write or read waits for ONE, QUORUM or ALL of
them, and a read writes the winning record back to replicas that answered with an older
one (read repair). Departures from Dynamo: no vector clocks and no siblings; conflicts
resolve by last-writer-wins on hybrid logical clock timestamps (``core/hlc.py``), as
Cassandra does with wall-clock cell timestamps. Deletes are tombstones (``value is
None``) so that a delete can win over an older write.

What LWW allows, and callers must know:

- Concurrent writes to one key: one wins, silently; the other is lost without an error.
  Use the KV for values that are *replaced* (a reference, a policy, a task's state), not
  for counters, sets or appends: a read-modify-write is not atomic and will lose updates.
- "Last" is by HLC timestamp, which respects causality (a write that saw another is
  later) but between causally unrelated writers follows physical clocks, so a writer
  whose clock runs ahead by up to the HLC ``max_offset_s`` wins over a write made slightly
  later in real time. Bigger skew is refused by the clock (``ClockSkewError``).
- QUORUM reads and writes (R + W > N) see the latest acknowledged write only while the
  replica set is stable; after membership changes the sets move and a QUORUM read may miss
  a write made to the old set until repair catches up (sloppy quorum, as in Dynamo).
- Equal timestamps are impossible between distinct writers (the node name is part of the
  timestamp); the same writer never issues a timestamp twice.

Full nodes (``core/placement.py``): a key's values are written to its *write set*, the
replica set over the nodes with room, and the consistency level counts those nodes. A
full member of the key's replica set is still asked on reads and sent deletes (a delete
needs no room, and must beat the older value that node holds), but its answer does not
count towards the level, and read repair never writes a value to it: it cannot store
one. When every allowed node is full, the write set is the replica set itself, so a
value write fails naming ``disk_full`` while a delete still succeeds.

This module is sans-I/O: ``KVCoordinator`` tracks one operation's replies and decides; the
driver sends the requests, feeds the replies and applies the read repairs.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from meshscale.core.hlc import HLCTimestamp
from meshscale.core.placement import Candidate, PlacementError, Residency, replica_set, write_set

__all__ = [
    "Consistency",
    "KVCoordinator",
    "KVOutcome",
    "KVPlacement",
    "KVRecord",
    "kv_placement",
    "kv_replicas",
    "lww_merge",
    "merge_optional",
]

KV_NAMESPACE = "kv\0"
"""Prefix of the placement id of a key, so a key never shares a score with an object id."""


class KVRecord(msgspec.Struct, frozen=True, array_like=True):
    """One version of a key; ``value is None`` is a tombstone (a delete)."""

    key: str
    value: bytes | None
    ts: HLCTimestamp


MAX_KEY_BYTES = 1024
"""Largest KV key (UTF-8), checked where a write enters and where it is stored."""
MAX_VALUE_BYTES = 1024 * 1024
"""Largest KV value: the KV holds references, policies and records, not data."""


def lww_merge(a: KVRecord, b: KVRecord) -> KVRecord:
    """The record that wins: the higher timestamp (node name breaks a tie of time, as
    ``HLCTimestamp`` orders). Commutative, associative and idempotent, so replicas that
    merge the same records in any order converge."""
    if a.key != b.key:
        raise ValueError(f"cannot merge records of different keys {a.key!r} and {b.key!r}")
    if a.ts == b.ts and a.value != b.value:
        # One writer never reuses a timestamp: two values under one timestamp is a bug
        # or a forgery. Pick deterministically so replicas still converge.
        def rank(r: KVRecord) -> tuple[bool, bytes]:
            return (r.value is not None, r.value or b"")

        return a if rank(a) >= rank(b) else b
    return a if a.ts >= b.ts else b


def merge_optional(a: KVRecord | None, b: KVRecord | None) -> KVRecord | None:
    """``lww_merge`` where ``None`` (no record) loses to anything."""
    if a is None:
        return b
    if b is None:
        return a
    return lww_merge(a, b)


class Consistency(enum.Enum):
    ONE = "one"
    QUORUM = "quorum"
    ALL = "all"

    def required(self, n_replicas: int) -> int:
        """Replies needed out of ``n_replicas``."""
        if n_replicas < 1:
            raise ValueError(f"need at least one replica, got {n_replicas}")
        if self is Consistency.ONE:
            return 1
        if self is Consistency.QUORUM:
            return n_replicas // 2 + 1
        return n_replicas


def kv_replicas(
    key: str,
    candidates: Iterable[Candidate],
    n: int = 3,
    residency: Residency | None = None,
) -> list[str]:
    """The nodes that hold ``key``, primary first (``placement.replica_set`` over the live
    view, full nodes included; ``PlacementError`` when none is allowed). Writes and reads
    use ``kv_placement``."""
    return [c.name for c in replica_set(KV_NAMESPACE + key, candidates, n, residency)]


@dataclass(frozen=True)
class KVPlacement:
    """Who takes part in an operation on one key."""

    replicas: tuple[str, ...]
    """The write set (the replica set when every allowed node is full): a value is
    written here, and the consistency level counts these nodes."""
    full: tuple[str, ...]
    """Full members of the replica set outside ``replicas``: asked on reads and sent
    deletes, never counted."""


def kv_placement(
    key: str,
    candidates: Iterable[Candidate],
    n: int = 3,
    residency: Residency | None = None,
) -> KVPlacement:
    """Where an operation on ``key`` goes (see the module docstring); ``PlacementError``
    when no live node is allowed."""
    view = list(candidates)
    home = [c.name for c in replica_set(KV_NAMESPACE + key, view, n, residency)]
    try:
        room = [c.name for c in write_set(KV_NAMESPACE + key, view, n, residency)]
    except PlacementError:
        return KVPlacement(tuple(home), ())  # all full: values are refused, deletes work
    return KVPlacement(tuple(room), tuple(h for h in home if h not in room))


@dataclass(frozen=True)
class KVOutcome:
    """How one operation ended."""

    ok: bool
    record: KVRecord | None = None
    """For a get: the winning record (``None``: no replica has the key)."""
    stale: tuple[str, ...] = ()
    """For a get: replicas that answered with an older record or none (read repair)."""
    reason: str = ""


@dataclass
class KVCoordinator:
    """One get or put against ``replicas`` at a ``consistency`` level.

    Build with ``for_get`` / ``for_put``; send the request to every node of ``replicas``;
    feed ``on_reply`` (get: the record or ``None``; put: ``None``, meaning acknowledged)
    and ``on_failure``; read ``outcome`` once it is not ``None``. Replies after the
    outcome still refine ``read_repair()`` (the driver may wait for all of them). The
    deadline is the driver's: ``expire()`` fails an undecided operation.
    """

    key: str
    replicas: tuple[str, ...]
    consistency: Consistency
    write: KVRecord | None = None
    extra: tuple[str, ...] = ()
    """Also asked (full members of the replica set, ``KVPlacement.full``); their replies
    and failures never count towards the consistency level, a read still merges what
    they answer, and read repair never writes to them."""
    replies: dict[str, KVRecord | None] = field(default_factory=dict)
    failures: set[str] = field(default_factory=set)
    outcome: KVOutcome | None = None
    first_failure: str = ""
    """The first failed replica's reason, as it gave it."""

    def __post_init__(self) -> None:
        if not self.replicas:
            raise ValueError("a KV operation needs at least one replica")
        if len(set(self.replicas + self.extra)) != len(self.replicas) + len(self.extra):
            raise ValueError(f"replicas listed twice: {self.replicas} {self.extra}")
        if self.write is not None and self.write.key != self.key:
            raise ValueError("the record's key is not the operation's key")

    @classmethod
    def for_get(cls, key: str, replicas: Iterable[str], consistency: Consistency,
                extra: Iterable[str] = ()) -> KVCoordinator:
        return cls(key, tuple(replicas), consistency, extra=tuple(extra))

    @classmethod
    def for_put(
        cls, record: KVRecord, replicas: Iterable[str], consistency: Consistency,
        extra: Iterable[str] = (),
    ) -> KVCoordinator:
        """A write; ``extra`` only for a delete (a full node cannot store a value)."""
        extra = tuple(extra)
        if extra and record.value is not None:
            raise ValueError("a value is never sent to a full node: extra is for deletes")
        return cls(record.key, tuple(replicas), consistency, write=record, extra=extra)

    @property
    def asked(self) -> tuple[str, ...]:
        """Every node the driver sends the request to."""
        return self.replicas + self.extra

    @property
    def required(self) -> int:
        return self.consistency.required(len(self.replicas))

    def on_reply(self, node: str, record: KVRecord | None) -> None:
        if node not in self.asked or node in self.replies or node in self.failures:
            return
        if record is not None and record.key != self.key:
            self.on_failure(node)  # a reply about another key: treat as garbage
            return
        self.replies[node] = record
        self._decide()

    def on_failure(self, node: str, reason: str = "") -> None:
        """``node`` did not apply or answer; ``reason`` (its error, if it gave one) is named
        in the outcome, so a refusal reads as what it was (e.g. a full disk)."""
        if node not in self.asked or node in self.replies:
            return
        self.failures.add(node)
        if node in self.extra:
            return  # not counted: its refusal (or silence) decides nothing
        if reason and self.first_failure == "":
            self.first_failure = f"{node}: {reason}"[:200]
        self._decide()

    def expire(self) -> None:
        if self.outcome is None:
            self.outcome = KVOutcome(
                False, reason=f"timeout: {self._counted_replies()} of {self.required} replies "
                f"({self.consistency.name})"
            )

    def winner(self) -> KVRecord | None:
        best: KVRecord | None = None
        for rec in self.replies.values():
            best = merge_optional(best, rec)
        if self.write is not None:
            best = merge_optional(best, self.write)
        return best

    def read_repair(self) -> list[tuple[str, KVRecord]]:
        """(replica, record to write) for every replier that is behind the winner."""
        best = self.winner()
        if best is None or self.write is not None:
            return []
        return [(n, best) for n in self.replicas
                if n in self.replies and self.replies[n] != best]

    def _counted_replies(self) -> int:
        return sum(1 for n in self.replies if n not in self.extra)

    def _decide(self) -> None:
        if self.outcome is not None:
            return
        need = self.required
        if self._counted_replies() >= need:
            if self.write is not None:
                self.outcome = KVOutcome(True, self.write)
            else:
                self.outcome = KVOutcome(
                    True, self.winner(), tuple(n for n, _ in self.read_repair())
                )
        elif len(self.replicas) - len(self.failures - set(self.extra)) < need:
            why = f" ({self.first_failure})" if self.first_failure else ""
            self.outcome = KVOutcome(
                False, reason=f"{len(self.failures - set(self.extra))} of {len(self.replicas)} replicas "
                f"failed{why}; {self.consistency.name} needs {need}"
            )
