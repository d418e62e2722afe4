"""The compute plane's record timer on the nodes' event loop (uvloop).

uvloop's ``call_at`` for a time less than a millisecond away hands back a plain
``Handle``, which has no ``when()``. The plane asked the armed timer for ``when()`` as a
task's end was queued for its record, so an end queued while a timer that close was
armed raised ``AttributeError`` inside ``task.done``: the run's coroutine died before
``task_finished`` (its ``Result`` never went, and the owner kept the task bound to the
node: counted there as running work, so the next lone task went elsewhere by way of
reservations) and the record waited for some later write (issue #19)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import uvloop

from meshscale.runtime.compute import ComputeConfig, ComputePlane


def plane(window_s: float) -> ComputePlane:
    agent = SimpleNamespace(
        name="n0", meta=SimpleNamespace(capacity={"cpus": 1.0, "memory_mb": 1024}),
        cfg=SimpleNamespace(task_memory_mb=64, task_timeout_s=60.0, task_log_bytes=1024),
        log=lambda *a, **kw: None)
    return ComputePlane(agent, ComputeConfig(record_window_s=window_s))  # type: ignore[arg-type]


def test_ends_queued_beside_a_timer_due_within_a_millisecond_are_all_written() -> None:
    written: list[str] = []

    async def main() -> None:
        p = plane(0.0002)  # each end is due 0.2 ms after it is queued

        async def kv_put_batch(batch: list[tuple[str, bytes]]) -> list[str]:
            written.extend(k for k, _ in batch)
            return [""] * len(batch)

        p.local = SimpleNamespace(kv_put_batch=kv_put_batch)  # type: ignore[assignment]
        for k in range(3):
            p._record_put(f"task/t{k}", b"x", urgent=False)  # arms, then finds, the timer
        # The case at issue: the timer armed is uvloop's plain Handle.
        assert p._record_timer is not None and not hasattr(p._record_timer, "when")
        await asyncio.wait_for(p._records_drained(), 5.0)

    uvloop.run(main())
    assert sorted(written) == ["task/t0", "task/t1", "task/t2"]
