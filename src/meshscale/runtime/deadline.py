"""One event-loop timer that follows a sans-I/O protocol's ``next_deadline()``.

Every core protocol (membership, replication, scheduling) asks to be woken at its next
deadline; each driver component keeps exactly one loop timer for it and re-arms it after
every call into the protocol. ``now`` is ``time.monotonic()``, the clock the protocols
are fed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class DeadlineTimer:
    """Calls ``fire()`` once the armed deadline has passed (never before it)."""

    def __init__(self, fire: Callable[[], None]) -> None:
        self._fire = fire
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    def arm(self, deadline: float | None) -> None:
        """Wake at ``deadline`` (monotonic seconds); ``None`` disarms."""
        if deadline == self._at and self._handle is not None:
            return
        self.cancel()
        self._at = deadline
        if deadline is not None:
            # +1 ms: loop timers have millisecond resolution; never fire early.
            delay = max(0.0, deadline - time.monotonic()) + 0.001
            self._handle = asyncio.get_running_loop().call_later(delay, self._on_fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._at = None

    def _on_fire(self) -> None:
        self._handle = None
        self._at = None
        self._fire()
