"""A periodic loop's wake-up: whoever brings the loop work sets it, and the loop sleeps
until it is set or its wait (``core.pacing.loop_wait_s``) runs out, whichever is first."""

from __future__ import annotations

import asyncio
import contextlib


class Wakeup:
    """Set by the code that gives a loop work; the loop ``wait``s on it."""

    def __init__(self) -> None:
        self._event = asyncio.Event()  # bound to the running loop at its first wait

    def set(self) -> None:
        """Wake the loop now (or, if it is in a round, as soon as the round ends)."""
        self._event.set()

    async def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``; True when woken by ``set`` (since the last wait
        returned) rather than by the timeout."""
        if not self._event.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._event.wait()
        woken = self._event.is_set()
        self._event.clear()
        return woken
