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
  replica set is stable. Two ways it is not:

  * Some of a key's replicas are down (or full) in the writer's view: the write goes to
    the write set over the nodes left (a sloppy quorum, as in Dynamo), and its members
    outside the key's intended set are *stand-ins* that keep the write as a hint and hand
    it to the intended replicas once those are back (``KVHints``: hinted handoff). Until
    the hand-off lands (normally within a second or two of the replica rejoining), a read
    asking the returned replicas may miss the write; afterwards they hold it. A hint not
    handed off within ``KVHintConfig.max_hint_age_s`` is dropped (counted); a stand-in
    whose hint book is full refuses the write rather than acknowledge it.
  * The set moves for good (a node joins and ranks higher, or is forgotten after dying):
    its new members lack the older records, and only read repair (a read that reaches a
    member that has the record) gives it to them; there is no KV anti-entropy. While a
    majority of a key's set is new, a QUORUM read may miss the newest write.
- Equal timestamps are impossible between distinct writers (the node name is part of the
  timestamp); the same writer never issues a timestamp twice.

Full nodes (``core/placement.py``): a key's values are written to its *write set*, the
replica set over the nodes with room, and the consistency level counts those nodes. A
full member of the key's replica set is still asked on reads and sent deletes (a delete
needs no room, and must beat the older value that node holds), but its answer does not
count towards the level, and read repair never writes a value to it: it cannot store
one. The write set's member that replaced it is a stand-in: what it was written while the
full node was full, it hands to that node once the node has room again (``KVHints``).
When every allowed node is full, the write set is the replica set itself, so a value
write fails naming ``disk_full`` while a delete still succeeds.

Conditional puts (compare-and-swap). A put may name ``expected``: the versions (encoded
HLC stamps, ``ABSENT`` for "no live value") the writer read and means to replace. Each
replica applies it only if its own current record is one of them (``cas_allows``, checked
atomically with the write) and otherwise answers *conflict* with its current stamp; the
coordinator (``KVCoordinator``, ``expected`` set) succeeds on ``required`` applies and fails
with ``conflict`` once too many replicas refused to reach it. A conditional put needs a
counted level (QUORUM or ALL, never ONE) and a *strict* quorum: it is sent to the key's
intended replica set alone (``strict_replicas``: over the live and the down members of
the view), a down or full member counting as a failure, so no stand-in and no hint takes
part, and a QUORUM still succeeds with one of three replicas down. Its timestamp is above every expected stamp. What this gives, exactly:

- Mutual exclusion. Two conditional puts of one key whose coordinators compute the same
  replica set of N nodes, neither naming the other's new stamp (so: concurrent ones),
  cannot both succeed: each needs ``N // 2 + 1`` replicas of the intended set to apply it, two majorities of
  one set share a replica, and that replica applies only the first of the two to arrive
  (after it, its record is a stamp the other does not name). This holds under any
  partition, loss or delay of messages, as long as the two coordinators agree on the
  set; it is not linearizable across two views that disagree on the key's top-N nodes
  (a node joining that ranks into the set, or a member forgotten), where the two
  majorities may not intersect. ``ABSENT`` is the weakest case there: a new member that
  never held the key matches it.
- No undo. A put that fails (conflict, or too few answers in time) may still have been
  applied by a minority of replicas, and that *residue* may carry a newer timestamp
  than the winner's. The winner's coordinator waits for every replica's answer and,
  when replicas refused, at once writes its value again over what they hold (a newer
  residue or an older record) with a second conditional put (``KVCoordinator.residues``),
  whose stamp it returns. So a
  read after a successful put returns its value (or a later one), except when a
  residue sits on a replica that did not answer the winner in time (or the second put
  failed): then a last-writer-wins read may return the residue, and read repair may
  spread it, until the next conditional put of the key, which names the version it
  read. A reader that must never see residue decides with its own rule on what it
  reads (actors, ``core/actors.py``: their checkpoints carry a sequence and an epoch).
- Unconditional writes, read repair and hint hand-offs of the same key are not checked:
  they follow last-writer-wins as before. Keys managed by conditional puts must only be
  written by them.

This module is sans-I/O: ``KVCoordinator`` tracks one operation's replies and decides; the
driver sends the requests, feeds the replies and applies the read repairs. ``KVHints``
keeps a stand-in's hints and decides when to hand which key to whom; the driver stores
them with the record, sends the hand-offs and reports the answers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from meshscale.core.hlc import HLCTimestamp
from meshscale.core.placement import (
    Candidate,
    PlacementError,
    Placer,
    Residency,
    replica_set,
)

__all__ = [
    "ABSENT",
    "MAX_EXPECTED",
    "WATCH",
    "Consistency",
    "HintDeleted",
    "HintSend",
    "HintStored",
    "KVCoordinator",
    "KVHintConfig",
    "KVHints",
    "KVOutcome",
    "KVPlacement",
    "KVPlacer",
    "KVRecord",
    "ScanPage",
    "cas_allows",
    "cas_matches",
    "cas_refusal",
    "kv_placement",
    "kv_replicas",
    "lww_merge",
    "merge_optional",
    "merge_scans",
    "strict_replicas",
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


ABSENT = ""
"""In a conditional put's ``expected``: the key has no live value (no record, or a
tombstone)."""
MAX_EXPECTED = 16
"""Versions one conditional put may name."""


def cas_allows(current: KVRecord | None, expected: Iterable[str]) -> bool:
    """May a replica whose record of the key is ``current`` apply a conditional put that
    names ``expected`` (encoded stamps, ``ABSENT``)? Only when its record is one of them."""
    return cas_matches(None if current is None else current.ts.encode(),
                       current is not None and current.value is not None, expected)


def cas_matches(stamp: str | None, live: bool, expected: Iterable[str]) -> bool:
    """``cas_allows`` on a stored row: its encoded ``stamp`` (None: no record) and whether
    it holds a value (``live``; False for a tombstone)."""
    names = set(expected)
    return (stamp is not None and stamp in names) or (ABSENT in names and not live)


def cas_refusal(consistency: Consistency) -> str | None:
    """Why a conditional put cannot run at ``consistency`` (None: it can)."""
    if consistency is Consistency.ONE:
        return "a conditional put needs consistency QUORUM or ALL, not ONE"
    return None


def strict_replicas(where: KVPlacement) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A strict quorum for a conditional put, or a read for one: the key's *intended*
    replica set (over the live and the down members of the view, never a stand-in), and
    those of it that cannot take part now (down, or full for a value): the driver reports
    them as failed at once, so the level counts the whole intended set."""
    away = tuple(n for n in where.intended if n not in where.replicas or n in where.full)
    return where.intended, away


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


@dataclass(frozen=True)
class ScanPage:
    """One replica's records of a key range, in key order (tombstones included);
    ``full``: the replica stopped at its page bound and may hold more keys after the
    last one."""

    records: tuple[KVRecord, ...]
    full: bool


def merge_scans(pages: Iterable[ScanPage], limit: int) -> tuple[list[KVRecord], str | None]:
    """The live keys of a listing, from every replica's scan of the same range: each
    key's winning record (``lww_merge``), tombstones dropped, at most ``limit`` in key
    order, and the key to continue after (None: the range is done).

    A replica that filled its page may hold keys beyond its last one, and a tombstone
    there would beat a value another replica returned; so only keys up to the smallest
    last key of a full page are decided in this round, the rest wait for the next page.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, not {limit}")
    merged: dict[str, KVRecord] = {}
    cut: str | None = None
    for page in pages:
        for rec in page.records:
            merged[rec.key] = merge_optional(merged.get(rec.key), rec) or rec
        if page.full and page.records:
            last = page.records[-1].key
            cut = last if cut is None or last < cut else cut
    keys = sorted(k for k in merged if cut is None or k <= cut)
    live = [merged[k] for k in keys if merged[k].value is not None]
    if len(live) > limit:
        return live[:limit], live[limit - 1].key
    return live, cut


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
    intended: tuple[str, ...] = ()
    """The key's replica set over the live *and the down* members of the view: where its
    record belongs once everyone is back (``kv_placement``'s ``down``). Empty: the
    replica set (``replicas`` and ``full``)."""

    def __post_init__(self) -> None:
        if not self.intended:
            object.__setattr__(self, "intended", self.replicas + self.full)

    @property
    def hint_for(self) -> tuple[str, ...]:
        """Intended replicas the write set lacks (down in the view, or full): a write
        reaches them later, through the stand-ins' hints (``KVHints``)."""
        return tuple(i for i in self.intended if i not in self.replicas)

    @property
    def stand_ins(self) -> tuple[str, ...]:
        """Members of the write set outside the intended set: each keeps what it is
        written as a hint for ``hint_for``."""
        return tuple(r for r in self.replicas if r not in self.intended)

    def hint_targets(self, node: str) -> tuple[str, ...]:
        """The replicas a write sent to ``node`` must also reach: ``hint_for`` when
        ``node`` stands in for them, else nothing."""
        return self.hint_for if node in self.stand_ins else ()


def kv_placement(
    key: str,
    candidates: Iterable[Candidate],
    n: int = 3,
    residency: Residency | None = None,
    down: Iterable[Candidate] = (),
) -> KVPlacement:
    """Where an operation on ``key`` goes (see the module docstring); ``PlacementError``
    when no live node is allowed.

    ``down``: members the view holds as down (dead, not left, not yet forgotten); they
    only shape ``intended``. Without them only full members are missing from the write
    set."""
    return KVPlacer(candidates, n, down).place(key, residency)


class KVPlacer:
    """``kv_placement`` of many keys under one view: the same answers and the same
    refusals, with the per-view work (checking the candidates, filtering them by each
    residency rule, encoding their names: ``placement.Placer``) done once instead of on
    every write. A node coordinates or takes a KV write per task record, so this was a
    tenth of an owner's CPU per task (issue #19). Build one per view (live and down
    members): nothing in it changes afterwards."""

    __slots__ = ("_all", "_live", "_memo", "_n")

    MEMO_MAX = 1024
    """Keys whose placement is kept (a task's record is written a few times in a row:
    submitted, running, done); the memo is emptied when full."""

    def __init__(self, candidates: Iterable[Candidate], n: int = 3,
                 down: Iterable[Candidate] = ()) -> None:
        view = list(candidates)
        live = {c.name for c in view}
        away = [c for c in down if c.name not in live]
        self._n = n
        self._live = Placer(view)
        self._all = Placer(view + away) if away else None
        """Over the live and the down members: the intended sets (None: nobody down)."""
        self._memo: dict[tuple[str, Residency | None], KVPlacement] = {}

    def place(self, key: str, residency: Residency | None = None) -> KVPlacement:
        """``kv_placement(key, ..., residency)`` under this view."""
        got = self._memo.get((key, residency))
        if got is None:
            got = self._place(key, residency)  # a refusal is not kept: it raises again
            if len(self._memo) >= self.MEMO_MAX:
                self._memo.clear()
            self._memo[(key, residency)] = got
        return got

    def _place(self, key: str, residency: Residency | None) -> KVPlacement:
        pid = KV_NAMESPACE + key
        home = self._live.replica_set(pid, self._n, residency)
        intended = home if self._all is None else self._all.replica_set(pid, self._n,
                                                                         residency)
        if not self._live.any_full:
            return KVPlacement(home, (), intended)
        try:
            room = self._live.write_set(pid, self._n, residency)
        except PlacementError:  # all full: values are refused, deletes work
            return KVPlacement(home, (), intended)
        return KVPlacement(room, tuple(h for h in home if h not in room), intended)


@dataclass(frozen=True)
class KVOutcome:
    """How one operation ended."""

    ok: bool
    record: KVRecord | None = None
    """For a get: the winning record (``None``: no replica has the key)."""
    stale: tuple[str, ...] = ()
    """For a get: replicas that answered with an older record or none (read repair)."""
    reason: str = ""
    conflict: bool = False
    """For a conditional put that failed: at least one replica held another version
    (``KVCoordinator.conflicts``); the writer should read again."""


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
    expected: frozenset[str] | None = None
    """A conditional put's versions (``cas_allows``); None: an unconditional write."""
    conflicts: dict[str, str | None] = field(default_factory=dict)
    """Replicas that refused a conditional put -> the stamp they hold (None: nothing)."""

    def __post_init__(self) -> None:
        if not self.replicas:
            raise ValueError("a KV operation needs at least one replica")
        if len(set(self.replicas + self.extra)) != len(self.replicas) + len(self.extra):
            raise ValueError(f"replicas listed twice: {self.replicas} {self.extra}")
        if self.write is not None and self.write.key != self.key:
            raise ValueError("the record's key is not the operation's key")
        if self.expected is not None:
            if self.write is None or self.extra:
                raise ValueError("only a put to its replicas alone can be conditional")
            if not self.expected or len(self.expected) > MAX_EXPECTED:
                raise ValueError(f"a conditional put names 1..{MAX_EXPECTED} versions")
            if self.consistency is Consistency.ONE:
                raise ValueError("a conditional put needs QUORUM or ALL")
            for e in self.expected:
                if e != ABSENT and HLCTimestamp.decode(e) >= self.write.ts:
                    raise ValueError(f"the write's stamp is not above expected {e!r}")

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

    @classmethod
    def for_cas(cls, record: KVRecord, replicas: Iterable[str], consistency: Consistency,
                expected: Iterable[str]) -> KVCoordinator:
        """A conditional put: each replica applies ``record`` only if it holds one of the
        ``expected`` versions (``cas_allows``); report a refusal with ``on_conflict``. The
        record's stamp must be above every expected one."""
        return cls(record.key, tuple(replicas), consistency, write=record,
                   expected=frozenset(expected))

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

    def on_conflict(self, node: str, current: str | None) -> None:
        """``node`` refused a conditional put: it holds ``current`` (None: no record)."""
        if self.expected is None or node not in self.replicas or node in self.replies \
                or node in self.failures:
            return
        self.failures.add(node)
        self.conflicts[node] = current
        self._decide()

    def residues(self) -> tuple[str, ...]:
        """After a conditional put succeeded: the versions the refusing replicas hold
        (``ABSENT`` for none), which the driver overwrites at once with a second
        conditional put of the same value naming the write's own stamp and these
        (``KVCoordinator.for_cas``). A *newer* one is a concurrent loser's residue, which
        a last-writer-wins read would prefer to the winner (see the module docstring). An
        *older* one is a replica a round behind: left alone, a read repair may bring it up
        to the version this write replaced while a later round is under way, and a loser
        of that round naming that version would then be applied there with a stamp newer
        than that round's winner (found on a 4-node mesh: ``test_kv_cas_mesh``). So every
        replica that answered ends the round holding the winner."""
        assert self.write is not None
        out = set()
        for cur in self.conflicts.values():
            if cur is None or cur == ABSENT:
                out.add(ABSENT)
                continue
            try:
                if HLCTimestamp.decode(cur) != self.write.ts:
                    out.add(cur)
            except ValueError:
                continue
        return tuple(sorted(out)[-(MAX_EXPECTED - 1):])

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
            if self.conflicts:
                held = sorted({c or "nothing" for c in self.conflicts.values()})
                self.outcome = KVOutcome(
                    False, reason=f"kv_conflict: {len(self.conflicts)} of "
                    f"{len(self.replicas)} replicas hold another version than expected "
                    f"({', '.join(held)[:300]}); {self.consistency.name} needs {need}",
                    conflict=True)
                return
            why = f" ({self.first_failure})" if self.first_failure else ""
            self.outcome = KVOutcome(
                False, reason=f"{len(self.failures - set(self.extra))} of {len(self.replicas)} replicas "
                f"failed{why}; {self.consistency.name} needs {need}"
            )


# --------------------------------------------------------------------------- hinted handoff

WATCH = ""
"""The target of a *watched* write (``KVHints``): no replica named yet."""


@dataclass(frozen=True)
class KVHintConfig:
    """Bounds of a node's KV hints (``KVHints``); durations in seconds."""

    max_hints: int = 10_000
    """Keys this node holds hints for at once. A stand-in asked to take a write for a new
    key while it holds this many refuses it (``hints_full``, counted ``refused``): the
    write then has one acknowledgement less and fails if it needed that one, rather than
    be acknowledged by a node that could not hand it back. Watched writes
    (``startup_watch_s``) are bounded apart, by the same number, and never refuse: beyond
    it a write is not watched (counted ``watch_skipped``)."""
    max_hint_age_s: float = 3 * 3600.0
    """A hint not handed off this long after its write is dropped (counted ``expired``;
    Cassandra's ``max_hint_window``). The stand-in keeps its record, but that replica then
    only gets it from read repair (a read that reaches a node which has it). Must stay
    below any KV tombstone purge grace, or a late hint could bring back a value a purged
    delete had beaten."""
    startup_watch_s: float = 60.0
    """For this long after it starts, a node's view may not know which members are down
    (a restarted node hears of a dead member only when it comes back), so it cannot tell
    whether it takes a write as a stand-in: each write it takes meanwhile is *watched*,
    rechecked at every view change, and becomes a hint as soon as the view shows this node
    is not one of the key's intended replicas."""
    retry_s: float = 5.0
    """After a failed hand-off to a replica, wait this long before the next try (a replica
    that comes back in the view is tried at once)."""
    max_in_flight: int = 16
    """Hand-offs running at once."""
    send_timeout_s: float = 30.0
    """A hand-off the driver never reported done counts as failed after this long."""

    def __post_init__(self) -> None:
        if self.max_hints < 0 or self.max_in_flight < 1:
            raise ValueError("max_hints must be >= 0 and max_in_flight >= 1")
        if min(self.max_hint_age_s, self.retry_s, self.send_timeout_s) <= 0:
            raise ValueError("max_hint_age_s, retry_s and send_timeout_s must be > 0")
        if self.startup_watch_s < 0:
            raise ValueError("startup_watch_s must be >= 0")


@dataclass(frozen=True)
class HintSend:
    """Hand ``key`` to ``target``: send it this node's record of the key with the record's
    own timestamp (``kv.apply``); it is at least ``ts``, else ``abandon``. Then report
    ``handed_off`` (with the timestamp sent) or ``failed``."""

    key: str
    target: str
    ts: HLCTimestamp


@dataclass(frozen=True)
class HintStored:
    """Persist: ``target`` must get ``key`` at ``ts`` or newer (upsert: keep the larger
    ``ts`` and the smaller ``since``). ``target`` is ``WATCH`` for a watched write."""

    key: str
    target: str
    ts: HLCTimestamp
    since: float


@dataclass(frozen=True)
class HintDeleted:
    """Persist: forget ``target``'s hint for ``key`` if its ``ts`` is at most ``upto`` (a
    newer one stored meanwhile stays)."""

    key: str
    target: str
    upto: HLCTimestamp


@dataclass
class _Hint:
    ts: HLCTimestamp
    since: float
    retry_at: float = 0.0
    in_flight_until: float | None = None


class KVHints:
    """A node's KV hints: records it holds for replicas that do not have them yet.

    Dynamo's hinted handoff (DeCandia et al., SOSP 2007, section 4.6). A coordinator whose
    view holds some of a key's intended replicas down, or full, writes to the write set
    over the nodes left (``kv_placement``); a member of it outside the intended set is a
    *stand-in* and is sent the names of the replicas it stands in for
    (``KVPlacement.hint_targets``). The node taking a write asks ``plan``: the named
    replicas, plus, when its own view says it is not an intended replica either, the
    key's intended replicas by that view (the coordinator may not know a member that
    went down before it started; the stand-in may). It stores the hints durably with the
    record, before it acknowledges (``add`` after that), one per target: the newest
    timestamp that target must get.

    Whenever a target is live and has room in the view (``set_view``), ``due`` hands it
    this node's record of the key, sent with the record's own timestamp so that
    last-writer-wins keeps the newest on the replica: a later delete there beats an older
    hinted value, a hinted tombstone beats the older value it deletes. The hint is deleted
    only once the target acknowledged a record at least that new. The stand-in keeps its
    copy afterwards (Dynamo drops it): outside the key's set it is not asked, and
    last-writer-wins makes it harmless when it is.

    A node that started less than ``startup_watch_s`` ago may not know which members are
    down, so the writes it takes are *watched* (a hint for ``WATCH``) and each view
    change rechecks them: once the view shows this node outside the key's intended set,
    the watch becomes a hint for that set.

    Bounds (``KVHintConfig``): ``max_hints`` keys (beyond it a stand-in refuses the
    write), ``max_hint_age_s`` per hint (beyond it the hint is dropped, counted),
    ``max_in_flight`` hand-offs. A target forgotten by the view (it left, or was reaped
    after ``dead_reap_s``) is never live again, and a restarted stand-in may not have heard
    of its target at all: while a hint's target is not in the view, the key's intended
    replicas by the view get hints too, once the view shows this node outside them
    (``_adopt_orphans``), so that the record survives the loss of the write's other
    copies. A member that no node taking the write knew of (down since before every one
    of them started) gets no hint: only read repair reaches it.

    Sans-I/O: the driver stores the hints ``plan`` named with the record, then calls
    ``add``; every other change to persist comes out of ``drain`` (``HintStored``,
    ``HintDeleted``). ``now`` is a wall clock (hint ages survive restarts);
    ``next_deadline`` says when ``due`` or ``expire`` has work.
    """

    def __init__(self, name: str, config: KVHintConfig | None = None, *,
                 replicas: int = 3, started: float = 0.0,
                 residency: Callable[[str], Residency | None] | None = None) -> None:
        self.name = name
        self.config = config or KVHintConfig()
        self.replicas = replicas
        self.residency = residency
        """A key's residency rule (a key under a data class's prefix: ``core.policy``),
        so hints go only to intended replicas inside it. None: no rule for any key."""
        self.started = started
        self._hints: dict[str, dict[str, _Hint]] = {}
        self._watches: dict[str, _Hint] = {}
        self._live: dict[str, Candidate] = {}
        self._down: list[Candidate] = []
        self._placer: KVPlacer | None = None
        """Placement under the view (built at the first write after a ``set_view``)."""
        self._known: set[str] = set()
        """Every name the view ever held: a watch is rechecked only when a new one shows
        up (only a node ranked above this one can push it out of a key's set)."""
        self._names: frozenset[str] = frozenset()
        """The names in the view now (live and down)."""
        self._orphans: set[str] = set()
        """Keys with a hint for a target the view does not hold (never heard of by this
        node, or forgotten: left or reaped), rechecked at each change of the view's names
        (``set_view``)."""
        self._in_flight = 0
        self._out: list[HintStored | HintDeleted] = []
        self.stats: dict[str, int] = {}

    def __len__(self) -> int:
        """Keys with a hint (watches not included)."""
        return len(self._hints)

    @property
    def watched(self) -> int:
        """Keys watched (see the class docstring)."""
        return len(self._watches)

    def pending(self, key: str) -> dict[str, HLCTimestamp]:
        """Target (``WATCH`` for a watch) -> the newest timestamp it must get."""
        out = {t: h.ts for t, h in self._hints.get(key, {}).items()}
        if key in self._watches:
            out[WATCH] = self._watches[key].ts
        return out

    def drain(self) -> list[HintStored | HintDeleted]:
        """Changes to persist, in order."""
        out, self._out = self._out, []
        return out

    def _count(self, what: str, n: int = 1) -> None:
        self.stats[what] = self.stats.get(what, 0) + n

    # ------------------------------------------------------------------ taking writes

    def load(self, key: str, target: str, ts: HLCTimestamp, since: float) -> None:
        """A hint (or watch) found on disk at start (not bounded: it was accepted)."""
        self._merge(key, target, ts, since)
        if target != WATCH and target not in self._names:
            self._orphans.add(key)

    def plan(self, key: str, named: Iterable[str], now: float) -> tuple[str, ...] | None:
        """The hints a write of ``key`` this node is about to take must leave: the
        replicas the coordinator ``named``, plus the key's intended replicas when this
        node's view says it is not one, else ``WATCH`` while this node is young; ``None``:
        refuse the write (hints are needed and the book holds ``max_hints`` keys)."""
        targets = dict.fromkeys(t for t in named if t and t != self.name)
        try:
            intended = self._intended(key)
        except PlacementError:
            intended = ()
        if intended and self.name not in intended:
            targets.update(dict.fromkeys(t for t in intended if t != self.name))
        if targets:
            if key not in self._hints and len(self._hints) >= self.config.max_hints:
                self._count("refused")
                return None
            return tuple(targets)
        if now - self.started < self.config.startup_watch_s:
            if key not in self._watches and len(self._watches) >= self.config.max_hints:
                self._count("watch_skipped")
                return ()
            return (WATCH,)
        return ()

    def add(self, key: str, ts: HLCTimestamp, targets: Iterable[str], now: float) -> bool:
        """The write of ``key`` at ``ts`` was applied and ``plan``'s hints stored with it
        (upsert, as ``HintStored``). True when a hint for a replica was added or renewed:
        ``due`` may have a hand-off to start now. A watch alone never does (its only
        deadline, ``max_hint_age_s`` after the write, is past every other), so a young
        node taking writes (each one watched) need not look at its book after each."""
        handoff = False
        for target in targets:
            self._merge(key, target, ts, now)
            if target == WATCH:
                self._count("watched")
            else:
                self._count("added")
                handoff = True
                if target not in self._names:
                    self._orphans.add(key)
        return handoff

    def _merge(self, key: str, target: str, ts: HLCTimestamp, since: float) -> _Hint:
        if target == WATCH:
            h = self._watches.get(key)
            if h is None:
                h = self._watches[key] = _Hint(ts, since)
                return h
        else:
            per = self._hints.setdefault(key, {})
            h = per.get(target)
            if h is None:
                h = per[target] = _Hint(ts, since)
                return h
        h.ts = max(h.ts, ts)
        h.since = min(h.since, since)
        h.retry_at = 0.0  # a newer write: try again at once
        return h

    def _intended(self, key: str) -> tuple[str, ...]:
        if not self._live:
            return ()
        rule = None if self.residency is None else self.residency(key)
        placer = self._placer
        if placer is None:
            placer = self._placer = KVPlacer(self._live.values(), self.replicas, self._down)
        try:
            return placer.place(key, rule).intended
        except PlacementError:
            return ()  # no live node the key's rule allows: nothing to hand to now

    # ------------------------------------------------------------------ the view

    def set_view(self, live: Iterable[Candidate], down: Iterable[Candidate] = ()) -> None:
        """The membership view: live members (``full`` as gossiped) and down ones (dead,
        not left), as for ``kv_placement``. Hints go to live targets with room; watched
        writes are rechecked when a name new to this node shows up."""
        was = set(self._live)
        self._live = {c.name: c for c in live}
        self._down = list(down)
        self._placer = None
        for per in self._hints.values():
            for target, h in per.items():
                if target in self._live and target not in was:
                    h.retry_at = 0.0  # back in the view: try at once
        names = frozenset(self._live).union(c.name for c in self._down)
        if names == self._names:
            return
        gone = self._names - names
        self._names = names
        if gone:
            self._orphans.update(k for k, per in self._hints.items() if not gone.isdisjoint(per))
        if self._orphans:
            self._adopt_orphans()
        if names <= self._known:
            return
        self._known |= names
        for key in sorted(self._watches):
            try:
                intended = self._intended(key)
            except PlacementError:
                continue
            if not intended or self.name in intended:
                continue
            watch = self._watches.pop(key)
            self._count("watches_hinted")
            for target in intended:
                h = self._merge(key, target, watch.ts, watch.since)
                self._out.append(HintStored(key, target, h.ts, h.since))
            self._out.append(HintDeleted(key, WATCH, watch.ts))

    def _adopt_orphans(self) -> None:
        """A hint whose target the view does not hold may never be handed off: the target
        is gone for good (reaped, or left), or this node, restarted, has not heard of it
        yet, and its view may not yet show that this node is outside the key's intended
        replicas. Should the other copies of the write be lost too (the replicas that
        took it fail for good), this node's record is the only one, outside the set that
        reads ask. So while a key has such a hint, each change of the view's names
        rechecks it: when the view shows this node outside the key's intended replicas,
        they get hints for the newest record owed to the unknown targets (the same age:
        ``max_hint_age_s`` still bounds it), once: a replica that takes one and finds
        itself outside the key's set by its own view hints onward (``plan``). The hint
        for the unknown target stays: if the target turns up, it is handed off as any
        other."""
        for key in sorted(self._orphans):
            per = self._hints.get(key)
            unknown = [h for t, h in per.items() if t not in self._names] if per else []
            if not unknown or per is None:
                self._orphans.discard(key)
                continue
            intended = self._intended(key)
            if not intended or self.name in intended:
                continue
            self._orphans.discard(key)  # adopted (a newer write for it comes back here)
            ts = max(h.ts for h in unknown)
            since = min(h.since for h in unknown)
            for target in intended:
                h = per.get(target)
                if h is not None and h.ts >= ts:
                    continue
                self._count("orphans_adopted")
                h = self._merge(key, target, ts, since)
                self._out.append(HintStored(key, target, h.ts, h.since))

    def _reachable(self, target: str) -> bool:
        c = self._live.get(target)
        return c is not None and not c.full

    # ------------------------------------------------------------------ hand-offs

    def due(self, now: float) -> list[HintSend]:
        """Hand-offs to start now (each is in flight until reported)."""
        out: list[HintSend] = []
        for key in sorted(self._hints):
            for target, h in sorted(self._hints[key].items()):
                if h.in_flight_until is not None:
                    if h.in_flight_until > now:
                        continue
                    self._settle(h)  # never reported: counts as failed
                    self._count("send_timeouts")
                    h.retry_at = now + self.config.retry_s
                if self._in_flight >= self.config.max_in_flight:
                    return out
                if h.retry_at > now or not self._reachable(target):
                    continue
                h.in_flight_until = now + self.config.send_timeout_s
                self._in_flight += 1
                self._count("sends")
                out.append(HintSend(key, target, h.ts))
        return out

    def _settle(self, h: _Hint) -> None:
        if h.in_flight_until is not None:
            h.in_flight_until = None
            self._in_flight -= 1

    def handed_off(self, key: str, target: str, sent: HLCTimestamp) -> None:
        """``target`` acknowledged this node's record of ``key`` stamped ``sent``."""
        h = self._hints.get(key, {}).get(target)
        if h is None:
            return
        self._settle(h)
        if sent < h.ts:
            h.retry_at = 0.0  # a newer write came in meanwhile: send that one
            return
        self._count("handed_off")
        self._forget(key, target, sent)

    def failed(self, key: str, target: str, now: float) -> None:
        """The hand-off did not reach ``target``, or it refused: try again later."""
        h = self._hints.get(key, {}).get(target)
        if h is not None:
            self._settle(h)
            h.retry_at = now + self.config.retry_s
            self._count("send_failures")

    def abandon(self, key: str, target: str) -> None:
        """This node has no record of ``key`` as new as the hint (it was lost, e.g. the
        store was wiped): nothing to hand off, the hint goes."""
        h = self._hints.get(key, {}).get(target)
        if h is not None:
            self._settle(h)
            self._count("abandoned")
            self._forget(key, target, h.ts)

    def _forget(self, key: str, target: str, upto: HLCTimestamp) -> None:
        per = self._hints[key]
        del per[target]
        if not per:
            del self._hints[key]
            self._orphans.discard(key)
        self._out.append(HintDeleted(key, target, upto))

    def expire(self, now: float) -> None:
        """Drop hints and watches older than ``max_hint_age_s`` (counted)."""
        limit = now - self.config.max_hint_age_s
        for key in sorted(self._hints):
            for target, h in sorted(self._hints[key].items()):
                if h.since <= limit:
                    self._settle(h)
                    self._count("expired")
                    self._forget(key, target, h.ts)
        for key in sorted(k for k, h in self._watches.items() if h.since <= limit):
            self._count("watches_expired")
            self._out.append(HintDeleted(key, WATCH, self._watches.pop(key).ts))

    def next_deadline(self) -> float | None:
        """When ``due`` or ``expire`` next has work (None: nothing as things stand; a
        view change or a new hint may change that)."""
        age = self.config.max_hint_age_s
        best = min((h.since + age for h in self._watches.values()), default=None)
        room = self._in_flight < self.config.max_in_flight
        for per in self._hints.values():
            for target, h in per.items():
                t = h.since + age
                if h.in_flight_until is not None:
                    t = min(t, h.in_flight_until)
                elif room and self._reachable(target):
                    t = min(t, h.retry_at)
                best = t if best is None else min(best, t)
        return best
