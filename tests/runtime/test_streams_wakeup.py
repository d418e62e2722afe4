"""Stream long-polls wake when records land, never only on their timer (issue 23).

Deterministic: the test holds the plane's condition lock so a long-poll has to queue for
it, lands records (and notifies) meanwhile, then lets go. A long-poll that checked for
records before taking the lock would then sleep through them until its (here hour-long)
timer; one that checks under the lock returns within a few loop turns. No clock is read."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from meshscale.core.api.streams import (
    FetchReply,
    FetchRequest,
    OperatorSpec,
    ReadReply,
    ReadRequest,
)
from meshscale.core.streams import ShardLog, ShardLogConfig
from meshscale.runtime.streams import StreamConfig, StreamPlane

HOUR = 3600.0


def plane() -> StreamPlane:
    agent: Any = SimpleNamespace(name="n0", meta=SimpleNamespace(tags={}, region="r1"),
                                 m=SimpleNamespace(members={}))
    p = StreamPlane(agent, StreamConfig(read_wait_max_s=HOUR))

    async def no_record(key: str) -> bytes | None:
        return None  # no KV here: the topics have no replicated record (no class)

    p.local.kv_get = no_record  # type: ignore[method-assign]
    return p


async def turns(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


REC = [("k", b"v", "r0", 0.0)]


async def race(p: StreamPlane, poll: Any, land: Any) -> Any:
    """Start ``poll`` while the lock is held, let it queue, ``land`` records and notify
    under the lock, release; the poll must then finish without its timer."""
    async with p._lock:
        task = asyncio.ensure_future(poll)
        await turns()
        assert not task.done()
        land()
        p._notify("t")
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


def test_append_answers_the_woken_fetch_before_the_copy_goes_to_the_backup() -> None:
    """A record's way to its operator does not include encoding and sending the copy to
    the shard's backup; the producer's acknowledgement still waits for the copy."""

    async def main() -> None:
        p = plane()
        p._log("t", "n0~0")
        seen: list[bool] = []
        backup_answers = asyncio.Event()
        fetch = asyncio.ensure_future(p._rpc_fetch(FetchRequest(
            topic="t", source="n0~0", offset=0, wait_s=HOUR)))
        await turns()
        assert not fetch.done()

        async def replicate(topic: str, source: str, log: ShardLog,
                            upto: int | None = None) -> None:
            seen.append(fetch.done())
            await backup_answers.wait()  # a backup that has not answered yet

        p._replicate = replicate  # type: ignore[method-assign,assignment]
        publish = asyncio.ensure_future(p.append_local("t", list(REC)))
        await turns()
        assert seen == [True], "the copy to the backup went before the fetch's answer"
        assert [e.rid for e in fetch.result().entries] == ["r0"]
        assert not publish.done(), "acknowledged before the backup held the record"
        backup_answers.set()
        await turns()
        assert [e.rid for e in publish.result()] == ["r0"]
        assert not p._waits  # no waiter left behind, none remembered

    asyncio.run(main())


def test_producer_held_for_room_wakes_when_the_operator_commits() -> None:
    """Backpressure: a publish to a full shard waits (an hour-long bound here) and goes
    on the moment the operator's fetch commits the record that filled it."""

    async def main() -> None:
        p = StreamPlane(plane().agent, StreamConfig(
            read_wait_max_s=HOUR, publish_wait_s=HOUR,
            log=ShardLogConfig(max_backlog=1, max_records=10)))

        async def replicate(topic: str, source: str, log: ShardLog,
                            upto: int | None = None) -> None:
            return None

        p._replicate = replicate  # type: ignore[method-assign,assignment]
        log = p._log("t", "n0~0")
        log.register("op")
        await p.append_local("t", list(REC))
        assert log.room() == 0
        second = asyncio.ensure_future(p.append_local("t", [("k", b"v", "r1", 0.0)]))
        await turns()
        assert not second.done() and p.stats["publish_waits"] == 1
        r: FetchReply = await p._rpc_fetch(FetchRequest(
            topic="t", source="n0~0", offset=1, wait_s=0.0, op="op", committed=1))
        assert r.head == 1
        await turns()
        assert second.done(), "the producer slept through the room the commit made"
        assert [e.offset for e in second.result()] == [1]
        assert not p._waits

    asyncio.run(main())


def test_a_change_wakes_only_its_own_topics_long_polls() -> None:
    """Records landing in another topic leave a long-poll waiting (no spurious answer),
    and each topic's waiters are remembered only while they wait."""

    async def main() -> None:
        p = plane()
        log = p._log("t", "src~0")
        other = p._log("u", "src~0")
        fetch = asyncio.ensure_future(p._rpc_fetch(FetchRequest(
            topic="t", source="src~0", offset=0, wait_s=HOUR)))
        await turns()
        assert set(p._waits) == {"t"}
        async with p._lock:
            other.append(REC)
            p._notify("u")
        await turns()
        assert not fetch.done()
        async with p._lock:
            log.append(REC)
            p._notify("t")
        await turns()
        assert fetch.done() and [e.rid for e in fetch.result().entries] == ["r0"]
        assert not p._waits

    asyncio.run(main())


def test_a_subscribers_read_answers_before_its_follower_fetches_again() -> None:
    """Records a follower brings into the node's mirror go to the waiting subscriber
    before the follower's next long-poll to the shard holder is sent."""

    async def main() -> None:
        p = plane()
        p._alive = lambda: []  # type: ignore[method-assign]
        p._holder = lambda topic, source, alive: "n1"  # type: ignore[method-assign]
        p._release = lambda names, lane: None  # type: ignore[method-assign]
        fed = ShardLog("t", "n0~0", ShardLogConfig())
        entries = fed.append(REC)
        fetches: list[bool] = []
        holder_answers = asyncio.Event()
        read: asyncio.Future[ReadReply] | None = None

        async def call(name: str, method: Any, req: FetchRequest, **kw: Any) -> FetchReply:
            assert read is not None
            fetches.append(read.done())
            if len(fetches) == 1:
                await holder_answers.wait()
                return FetchReply(entries=entries, base=0, head=1)
            await asyncio.Event().wait()  # the next long-poll: nothing more comes
            raise AssertionError("unreachable")

        p._call = call  # type: ignore[method-assign,assignment]
        try:
            read = asyncio.ensure_future(p._rpc_read(ReadRequest(topic="t", wait_s=HOUR)))
            await turns()
            assert fetches == [False] and not read.done()
            holder_answers.set()
            await turns()
            assert fetches == [False, True], "the follower fetched again before the read"
            assert [x.id for x in read.result().records] == ["r0"]
        finally:
            p._stopping = True
            for t in p.followers.values():
                t.cancel()
            await turns()

    asyncio.run(main())


def test_producer_held_by_an_operator_goes_on_when_the_operator_is_removed() -> None:
    """However this node hears of the removal (here: the reconcile loop's read of the KV
    index, which calls ``_uninstall``), the producer it held is released at once."""

    async def main() -> None:
        agent: Any = SimpleNamespace(name="n0", meta=SimpleNamespace(tags={}),
                                     m=SimpleNamespace(members={}),
                                     log=lambda *a, **k: None,
                                     spawn=asyncio.ensure_future)
        p = StreamPlane(agent, StreamConfig(
            read_wait_max_s=HOUR, publish_wait_s=HOUR,
            log=ShardLogConfig(max_backlog=1, max_records=10)))

        async def replicate(topic: str, source: str, log: ShardLog,
                            upto: int | None = None) -> None:
            return None

        p._replicate = replicate  # type: ignore[method-assign,assignment]
        p.ops["op"] = OperatorSpec(name="op", topic="t", fn_id="f" * 64, fn_object="o" * 64)
        log = p._log("t", "n0~0")
        assert "op" in log.committed
        await p.append_local("t", list(REC))
        held = asyncio.ensure_future(p.append_local("t", [("k", b"v", "r1", 0.0)]))
        await turns()
        assert not held.done()
        assert p._uninstall("op")
        await turns()
        assert held.done(), "the producer waited for its timer after the operator went"
        assert [e.offset for e in held.result()] == [1]

    asyncio.run(main())


def test_an_append_left_uncopied_answers_the_woken_fetch_before_it_returns() -> None:
    """A runner appends its outputs and copies them beside its loop (``copied=False``):
    the follower fetch the append woke answers before the runner goes on to its next
    round."""

    async def main() -> None:
        p = plane()
        p._log("t", "n0~0")
        fetch = asyncio.ensure_future(p._rpc_fetch(FetchRequest(
            topic="t", source="n0~0", offset=0, wait_s=HOUR)))
        await turns()
        assert not fetch.done()
        await p.append_local("t", list(REC), copied=False)
        assert fetch.done(), "the append returned before the woken fetch answered"
        assert [e.rid for e in fetch.result().entries] == ["r0"]

    asyncio.run(main())
