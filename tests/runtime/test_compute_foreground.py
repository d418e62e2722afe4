"""A node running tasks one after another tells its data plane it is busy once, and idle
once, ``foreground_linger_s`` after the last run ended (issue #19: a map's worker
toggled it twice per task, each time a pump of its replica manager); a run that starts
within the linger keeps it busy."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from meshscale.runtime.compute import ComputeConfig, ComputePlane
from waiting import wait_for_async


def plane(linger_s: float) -> tuple[ComputePlane, list[bool]]:
    told: list[bool] = []
    agent = SimpleNamespace(
        name="w", meta=SimpleNamespace(capacity={"cpus": 1.0, "memory_mb": 1024}),
        cfg=SimpleNamespace(task_memory_mb=64, task_timeout_s=60.0, task_log_bytes=1024),
        log=lambda *a, **kw: None, m=SimpleNamespace(members={}),
        set_foreground_busy=told.append)
    p = ComputePlane(agent, ComputeConfig(foreground_linger_s=linger_s))  # type: ignore[arg-type]

    async def run_task(rt: Any) -> None:
        await asyncio.sleep(0)

    p._run_task = run_task  # type: ignore[method-assign, assignment]
    return p, told


def test_runs_back_to_back_tell_busy_once_and_idle_once_after_the_linger() -> None:
    async def main() -> list[bool]:
        p, told = plane(0.5)
        for _ in range(20):  # one after another, as a map's worker runs them
            await p._run(None)  # type: ignore[arg-type]
        assert told == [True]  # still busy within the linger
        await p._run(None)  # type: ignore[arg-type]

        async def idle() -> bool:
            return told == [True, False]

        await wait_for_async(idle, 10.0, "the data plane told idle", poll=0.01)
        await p._run(None)  # type: ignore[arg-type]
        assert told == [True, False, True]
        return told

    assert asyncio.run(main())[:3] == [True, False, True]


def test_a_run_within_the_linger_keeps_it_busy() -> None:
    async def main() -> list[bool]:
        p, told = plane(0.2)
        await p._run(None)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        # Another run starts halfway through the linger and ends: idle only 0.2 s after it.
        started = loop.time()
        await asyncio.sleep(0.1)
        await p._run(None)  # type: ignore[arg-type]
        ended = loop.time()

        async def idle() -> bool:
            return told == [True, False]

        await wait_for_async(idle, 10.0, "the data plane told idle", poll=0.01)
        assert loop.time() - ended >= 0.19, (started, ended, loop.time())
        return told

    assert asyncio.run(main()) == [True, False]
