"""Stream long-polls wake when records land, never only on their timer (issue 23).

Deterministic: the test holds the plane's condition lock so a long-poll has to queue for
it, lands records (and notifies) meanwhile, then lets go. A long-poll that checked for
records before taking the lock would then sleep through them until its (here hour-long)
timer; one that checks under the lock returns within a few loop turns. No clock is read."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from meshscale.core.api.streams import FetchReply, FetchRequest, ReadReply, ReadRequest
from meshscale.core.streams import ShardLog, ShardLogConfig
from meshscale.runtime.streams import StreamConfig, StreamPlane

HOUR = 3600.0


def plane() -> StreamPlane:
    agent: Any = SimpleNamespace(name="n0", meta=SimpleNamespace(tags={}),
                                 m=SimpleNamespace(members={}))
    return StreamPlane(agent, StreamConfig(read_wait_max_s=HOUR))


async def turns(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


REC = [("k", b"v", "r0", 0.0)]


async def race(p: StreamPlane, poll: Any, land: Any) -> Any:
    """Start ``poll`` while the lock is held, let it queue, ``land`` records and notify
    under the lock, release; the poll must then finish without its timer."""
    async with p._changed:
        task = asyncio.ensure_future(poll)
        await turns()
        assert not task.done()
        land()
        p._changed.notify_all()
    await turns()
    assert task.done(), "the long-poll slept through records that had landed"
    return task.result()


def test_fetch_wakes_for_records_landed_while_it_queued_for_the_lock() -> None:
    async def main() -> None:
        p = plane()
        log = p._log("t", "src~0")
        r: FetchReply = await race(
            p, p._rpc_fetch(FetchRequest(topic="t", source="src~0", offset=0, wait_s=HOUR)),
            lambda: log.append(REC))
        assert [e.rid for e in r.entries] == ["r0"]

    asyncio.run(main())


def test_fetch_of_a_missing_shard_wakes_when_it_appears() -> None:
    async def main() -> None:
        p = plane()

        def land() -> None:
            p._log("t", "src~0").append(REC)

        r: FetchReply = await race(
            p, p._rpc_fetch(FetchRequest(topic="t", source="src~0", offset=0, wait_s=HOUR)),
            land)
        assert not r.missing and [e.rid for e in r.entries] == ["r0"]

    asyncio.run(main())


def test_read_wakes_for_records_mirrored_while_it_queued_for_the_lock() -> None:
    async def main() -> None:
        p = plane()
        mirror = ShardLog("t", "src~0", ShardLogConfig(max_backlog=1))
        p.mirrors[("t", "src~0")] = mirror
        fed = ShardLog("t", "src~0", ShardLogConfig())
        entries = fed.append(REC)
        try:
            r: ReadReply = await race(
                p, p._rpc_read(ReadRequest(topic="t", wait_s=HOUR)),
                lambda: mirror.apply(entries))
            assert [x.id for x in r.records] == ["r0"]
        finally:
            p._stopping = True
            for t in p.followers.values():
                t.cancel()
            await turns()

    asyncio.run(main())
