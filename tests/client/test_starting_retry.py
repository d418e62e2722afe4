"""A call that meets a node still starting (it answers STARTING, having done nothing) is
asked again with backoff for a bounded time; any other error is raised at once."""

from __future__ import annotations

import asyncio

import pytest

from meshscale.client import mesh as client_mesh
from meshscale.client.rpc import RemoteError
from meshscale.core.api import ErrorCode


def test_starting_is_retried_until_the_node_serves() -> None:
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise RemoteError("n: node is starting", ErrorCode.STARTING)
        return "ok"

    assert asyncio.run(client_mesh._while_starting(call)) == "ok"
    assert calls == 4


def test_other_errors_are_not_retried() -> None:
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        raise RemoteError("n: busy", ErrorCode.BUSY)

    with pytest.raises(RemoteError, match="busy"):
        asyncio.run(client_mesh._while_starting(call))
    assert calls == 1


def test_starting_for_too_long_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mesh, "STARTING_WAIT_S", 0.3)
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        raise RemoteError("n: node is starting", ErrorCode.STARTING)

    with pytest.raises(RemoteError, match="starting"):
        asyncio.run(client_mesh._while_starting(call))
    assert 2 <= calls <= 10
