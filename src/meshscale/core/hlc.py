"""Hybrid logical clocks.

After Kulkarni, Demirbas, Madappa, Avva and Leone, "Logical Physical Clocks and Consistent
Snapshots in Globally Distributed Databases", 2014: a timestamp is (l, c), where l is the
largest physical time the node has heard of and c counts events that share that l, so
timestamps respect causality, stay within the clock skew of physical time and fit in a
fixed width. Departures from the paper: timestamps carry the node name as a final tie
breaker, so timestamps from different nodes are totally ordered (last-writer-wins needs
that); like CockroachDB, a remote timestamp more than ``max_offset_s`` ahead of our
physical clock is refused rather than adopted, so one node with a runaway clock cannot drag
everyone's timestamps into the future; and the physical time is not read by the clock but
passed in by the driver (sans-I/O). If the 32-bit logical counter would overflow, which
needs some four billion events without the physical clock moving, the physical part is
bumped by one nanosecond instead.
"""

from __future__ import annotations

import math
import re

import msgspec

__all__ = ["ClockSkewError", "HLCTimestamp", "HybridLogicalClock"]

WALL_NS_MAX = 2**64 - 1
"""Largest ``wall_ns`` a timestamp may carry (16 hex digits)."""
LOGICAL_MAX = 2**32 - 1
"""Largest ``logical`` a timestamp may carry (8 hex digits)."""
_WALL_CLOCK_NS_MAX = 2**63 - 1
"""Largest physical time a driver may pass in (the year 2262); leaves head room below
``WALL_NS_MAX`` for the offset and overflow bumps."""

NODE_NAMES_SHARED_MAX = 4096
"""Node names ``HLCTimestamp.decode`` keeps one string of (beyond: a string per stamp)."""
_NODE_NAMES: dict[str, str] = {}

_ENCODED = re.compile(r"([0-9a-f]{16})-([0-9a-f]{8})-(.*)", re.DOTALL)


class HLCTimestamp(msgspec.Struct, frozen=True, order=True, gc=False):
    """A hybrid logical timestamp; ordered by (wall_ns, logical, node).

    ``gc=False``: it holds two ints and a string, so it can be in no reference cycle;
    without the collector's header it is 40 bytes, not 56 (a node keeps one per copy it
    holds, ``core.replication``: 16 MB per million copies; issue #24)."""

    wall_ns: int
    """Physical part: the largest physical time (ns since the epoch) heard of."""
    logical: int
    """Counter of events that share ``wall_ns``."""
    node: str = ""
    """Tie-breaker, so that timestamps from different nodes are totally ordered."""

    def __post_init__(self) -> None:
        # Also runs when decoding from the wire, where it becomes a ValidationError.
        if not 0 <= self.wall_ns <= WALL_NS_MAX:
            raise ValueError(f"wall_ns out of range: {self.wall_ns}")
        if not 0 <= self.logical <= LOGICAL_MAX:
            raise ValueError(f"logical out of range: {self.logical}")

    def encode(self) -> str:
        """A string whose lexicographic (code point, or UTF-8 byte) order is timestamp order."""
        return f"{self.wall_ns:016x}-{self.logical:08x}-{self.node}"

    @classmethod
    def decode(cls, s: str) -> HLCTimestamp:
        """Parse what :meth:`encode` made; raise ``ValueError`` on anything else."""
        m = _ENCODED.fullmatch(s) if isinstance(s, str) else None
        if m is None:
            raise ValueError(f"not an encoded HLC timestamp: {s!r:.80}")
        node = m[3]
        # Few nodes, many stamps held (one per copy): one string per node name.
        shared = _NODE_NAMES.get(node)
        if shared is None and len(_NODE_NAMES) < NODE_NAMES_SHARED_MAX:
            _NODE_NAMES[node] = shared = node
        return cls(wall_ns=int(m[1], 16), logical=int(m[2], 16), node=shared or node)


class ClockSkewError(ValueError):
    """A remote timestamp is further ahead of our physical clock than ``max_offset_s``."""


def _wall_ns(wall_s: float) -> int:
    if not math.isfinite(wall_s) or wall_s < 0:
        raise ValueError(f"wall clock must be finite and >= 0, got {wall_s}")
    ns = round(wall_s * 1e9)
    if ns > _WALL_CLOCK_NS_MAX:
        raise ValueError(f"wall clock out of range: {wall_s}")
    return ns


class HybridLogicalClock:
    """One node's hybrid logical clock. Every call takes the driver's wall clock, which may
    step backwards (NTP corrections, a VM resumed): timestamps still never repeat or
    go back."""

    def __init__(self, node: str, max_offset_s: float = 0.5) -> None:
        if not (math.isfinite(max_offset_s) and max_offset_s >= 0):
            raise ValueError(f"max_offset_s must be finite and >= 0, got {max_offset_s}")
        self._node = node
        self._max_offset_ns = round(max_offset_s * 1e9)
        self._last = HLCTimestamp(0, 0, node)
        self._max_wall_ns = 0
        self.logical_overflows = 0
        """Times the logical counter was full and the physical part was bumped instead."""

    @property
    def node(self) -> str:
        return self._node

    @property
    def max_offset_s(self) -> float:
        return self._max_offset_ns / 1e9

    @property
    def last(self) -> HLCTimestamp:
        """The latest timestamp this clock issued (``(0, 0)`` before the first event)."""
        return self._last

    def now(self, wall_s: float) -> HLCTimestamp:
        """Timestamp a local or send event at physical time ``wall_s`` (seconds)."""
        pt = _wall_ns(wall_s)
        old = self._last
        if pt > old.wall_ns:
            wall, logical = pt, 0
        else:
            wall, logical = old.wall_ns, old.logical + 1
        return self._advance(wall, logical, pt)

    def update(self, remote: HLCTimestamp, wall_s: float) -> HLCTimestamp:
        """Timestamp the receipt of a message stamped ``remote`` at physical time ``wall_s``.

        Raises ``ClockSkewError`` (and leaves the clock unchanged) if ``remote`` is more than
        ``max_offset_s`` ahead of ``wall_s``.
        """
        pt = _wall_ns(wall_s)
        if not (0 <= remote.wall_ns <= WALL_NS_MAX and 0 <= remote.logical <= LOGICAL_MAX):
            raise ValueError(f"remote timestamp out of range: {remote}")
        if remote.wall_ns - pt > self._max_offset_ns:
            raise ClockSkewError(
                f"remote timestamp {remote.wall_ns} ns is {(remote.wall_ns - pt) / 1e9:.3f} s "
                f"ahead of our clock; max offset is {self.max_offset_s} s"
            )
        old = self._last
        wall = max(old.wall_ns, remote.wall_ns, pt)
        if wall == old.wall_ns and wall == remote.wall_ns:
            logical = max(old.logical, remote.logical) + 1
        elif wall == old.wall_ns:
            logical = old.logical + 1
        elif wall == remote.wall_ns:
            logical = remote.logical + 1
        else:
            logical = 0
        new = self._advance(wall, logical, pt)
        assert (new.wall_ns, new.logical) > (remote.wall_ns, remote.logical)
        return new

    def _advance(self, wall: int, logical: int, pt: int) -> HLCTimestamp:
        if logical > LOGICAL_MAX:
            self.logical_overflows += 1
            wall, logical = wall + 1, 0
        new = HLCTimestamp(wall, logical, self._node)
        old = self._last
        self._max_wall_ns = max(self._max_wall_ns, pt)
        assert (new.wall_ns, new.logical) > (old.wall_ns, old.logical)
        assert new.wall_ns >= pt
        assert new.wall_ns <= self._max_wall_ns + self._max_offset_ns + self.logical_overflows
        self._last = new
        return new
