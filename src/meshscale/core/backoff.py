"""How long to wait before asking again (sans-I/O): a refused or unanswered request is
not asked again at once, or a client spins against a node that cannot help it yet."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable


class Backoff:
    """Waits between tries of a refused request: ``first_s`` doubling up to ``max_s``,
    each drawn uniformly from its upper half (jitter, so clients refused together do not
    come back together); ``next_delay`` returns None once ``give_up_s`` have passed since
    the first refusal after a ``reset`` (never, by default)."""

    def __init__(self, *, first_s: float = 0.05, max_s: float = 2.0,
                 give_up_s: float = math.inf, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < first_s <= max_s:
            raise ValueError(f"backoff needs 0 < first_s <= max_s, got {first_s}, {max_s}")
        self.first_s, self.max_s, self.give_up_s = first_s, max_s, give_up_s
        self._rng = rng or random.Random()
        self._clock = clock
        self._next = first_s
        self._since: float | None = None

    def next_delay(self) -> float | None:
        now = self._clock()
        if self._since is None:
            self._since = now
        elif now - self._since >= self.give_up_s:
            return None
        delay = self._next
        self._next = min(self.max_s, self._next * 2)
        return self._rng.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._next = self.first_s
        self._since = None
