"""How long a driver's periodic loop sleeps: its interval while it has work, longer while
it has none.

An idle agent's CPU is its wake-ups: every loop that polls at a fixed period costs a
timer, a task step and its body, whether or not anything changed (issue #19). A loop whose
round does nothing while its plane holds nothing (no operators, shards, services...)
need not wake at its interval then: it waits for a wake-up from whoever brings it work
(the driver's part, ``runtime/pacing.py``), and at the latest until its next *duty* (a
round it must still do on time when idle, such as re-reading an index from the KV that
tells it what it missed), bounded by ``idle_max_s``. With work it keeps its interval
exactly, so every bound it gives (failover, placement, repair) is unchanged; it never
wakes more often than it did at a fixed period.

Like memberlist's gossip-to-the-dead cut-off and Serf's coalesced event delivery: do the
periodic work only while there is something for it to act on.
"""

from __future__ import annotations

import math

DUE_SLACK_S = 0.002
"""Added to a wait that ends at a duty's due time: a loop timer may fire up to a clock
tick early, and a round woken just before its duty was due would skip it and sleep a
whole interval more."""


def check_wait_bounds(interval_s: float, idle_max_s: float) -> None:
    """``ValueError`` unless both are finite and > 0 (an ``idle_max_s`` below
    ``interval_s`` only means the loop never sleeps longer than its interval)."""
    for name, v in (("interval_s", interval_s), ("idle_max_s", idle_max_s)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be finite and > 0, got {v!r}")


def loop_wait_s(now: float, *, idle: bool, interval_s: float, idle_max_s: float,
                next_duty_at: float | None = None) -> float:
    """Seconds a loop sleeps after a round ending at ``now``.

    Busy (``idle`` false): ``interval_s``, as a fixed-period loop. Idle: until its next
    duty (``next_duty_at``, same clock as ``now``, plus ``DUE_SLACK_S``), at most
    ``idle_max_s`` and never less than ``interval_s`` (a duty already due waits one
    interval, as at a fixed period). So it never wakes more often than a fixed-period
    loop would. The driver also ends the wait at once when work
    arrives.
    """
    check_wait_bounds(interval_s, idle_max_s)
    if not idle:
        return interval_s
    wait = idle_max_s
    if next_duty_at is not None:
        wait = min(wait, next_duty_at - now + DUE_SLACK_S)
    return max(interval_s, wait)


class ByteRate:
    """A token bucket of bytes: ``rate_bytes_per_s`` sustained, bursts up to
    ``burst_bytes``. ``take(now, n)`` spends ``n`` and answers how long to wait before
    sending them (0 while the bucket holds them). The debt a large piece leaves is paid
    by the wait, so the rate holds over any window longer than a burst. Sans-I/O: the
    caller gives the time (monotonic seconds) and does the waiting."""

    __slots__ = ("_at", "_level", "burst_bytes", "rate_bytes_per_s")

    def __init__(self, rate_bytes_per_s: float, burst_bytes: int) -> None:
        if not (math.isfinite(rate_bytes_per_s) and rate_bytes_per_s > 0):
            raise ValueError(f"rate_bytes_per_s must be finite and > 0, got {rate_bytes_per_s!r}")
        if burst_bytes < 1:
            raise ValueError(f"burst_bytes must be at least 1, got {burst_bytes!r}")
        self.rate_bytes_per_s = float(rate_bytes_per_s)
        self.burst_bytes = burst_bytes
        self._level = float(burst_bytes)
        self._at: float | None = None

    def take(self, now: float, nbytes: int) -> float:
        """Spend ``nbytes`` at ``now``; seconds to wait before sending them."""
        if self._at is not None and now > self._at:
            self._level = min(float(self.burst_bytes),
                              self._level + (now - self._at) * self.rate_bytes_per_s)
        self._at = now if self._at is None else max(self._at, now)
        self._level -= nbytes
        if self._level >= 0:
            return 0.0
        return -self._level / self.rate_bytes_per_s
