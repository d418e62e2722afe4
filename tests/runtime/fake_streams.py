"""A stream plane run alone, without a node: a fake agent with fake members, for tests
that step the event loop themselves (``turns``) and read no clock."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from meshscale.core.membership import State
from meshscale.runtime.streams import StreamConfig, StreamPlane


def member(name: str, region: str) -> Any:
    """A live member as the plane reads one (``m.members[name]``)."""
    return SimpleNamespace(name=name, state=State.ALIVE, addr=f"{name}.addr:1",
                           meta=SimpleNamespace(region=region, zone="z", labels={},
                                                tags={}))


def fake_plane(members: dict[str, Any], config: StreamConfig | None = None,
               region: str = "r1") -> StreamPlane:
    """The plane of node ``n0`` in ``region``, which knows ``members``."""
    agent: Any = SimpleNamespace(name="n0", meta=SimpleNamespace(tags={}, region=region,
                                                                 zone="z", labels={}),
                                 m=SimpleNamespace(members=members))
    return StreamPlane(agent, config or StreamConfig())


async def turns(n: int = 50) -> None:
    """Let the loop run ``n`` rounds (every task ready to go on goes on)."""
    for _ in range(n):
        await asyncio.sleep(0)
