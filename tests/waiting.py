"""Waiting on a condition, the one way tests poll: shared by every test directory (pytest
puts ``tests/`` on ``sys.path``), so a test outside ``tests/runtime`` can import it without
depending on collection order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from meshscale.client.rpc import RpcError

T = TypeVar("T")


def wait_for(cond: Callable[[], T | None], timeout: float, what: str, poll: float = 0.1,
             retry: tuple[type[BaseException], ...] = (RpcError,)) -> T:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout`` seconds.
    Exceptions of the ``retry`` types count as "not yet". The one place tests poll."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = cond()
        except retry as e:
            last = e
        if last and not isinstance(last, BaseException):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(poll)


async def wait_for_async(cond: Callable[[], Awaitable[T | None]], timeout: float, what: str,
                         poll: float = 0.1,
                         retry: tuple[type[BaseException], ...] = (RpcError,)) -> T:
    """``wait_for`` for an async condition, on the caller's event loop."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await cond()
        except retry as e:
            last = e
        if last and not isinstance(last, BaseException):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(poll)
