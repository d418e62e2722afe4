"""A subscriber reads a shard at its holder (``stream.read`` with ``held``): the holder
answers from its own shard log when the record is appended, with no mirror or follower
in between; a shard it does not hold, or no longer holds from the cursor on, comes back
as ``moved``. A read through a node leaves out the shards read at their holder and
names the shards another node of its region holds (``holders``) (issue 23).

The plane runs alone with a fake agent; the tests step the loop and read no clock."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from meshscale.core.api.streams import ReadRequest
from meshscale.core.membership import State
from meshscale.core.streams import ShardLog, ShardLogConfig
from meshscale.runtime.streams import StreamConfig, StreamPlane

HOUR = 3600.0
MINE = "n0~0"
"""The shard of the plane's own node (``n0``, epoch 0)."""


def member(name: str, region: str) -> Any:
    return SimpleNamespace(name=name, state=State.ALIVE, addr=f"{name}.addr:1",
                           meta=SimpleNamespace(region=region, zone="z", labels={},
                                                tags={}))


def plane(log: ShardLogConfig | None = None) -> StreamPlane:
    members = {"n1": member("n1", "r1"), "far": member("far", "r2")}
    agent: Any = SimpleNamespace(name="n0", meta=SimpleNamespace(tags={}, region="r1"),
                                 m=SimpleNamespace(members=members))
    p = StreamPlane(agent, StreamConfig(read_wait_max_s=HOUR, log=log or ShardLogConfig()))

    async def no_record(key: str) -> bytes | None:
        return None  # no KV here: the topics have no replicated record (no class)

    p.local.kv_get = no_record  # type: ignore[method-assign]
    p._alive = lambda: []  # type: ignore[method-assign]
    # Each shard's holder: the node its source names.
    p._holder = lambda topic, source, alive: source.split("~")[0]  # type: ignore[method-assign]
    return p


async def turns(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_held_read_is_answered_from_the_shard_log_at_the_append() -> None:
    async def main() -> None:
        p = plane()
        await p.append_local("t", [("k", b"v", "r0", 0.0)], copied=False)
        read = asyncio.ensure_future(p._rpc_read(ReadRequest(
            topic="t", held=[MINE], cursors={MINE: 1}, wait_s=HOUR)))
        await turns()
        assert not read.done()
        await p.append_local("t", [("k", b"v", "r1", 0.0)], copied=False)
        assert read.done(), "answered at the append"
        r = read.result()
        assert [(x.source, x.offset, x.id) for x in r.records] == [(MINE, 1, "r1")]
        assert r.moved == [] and r.holders == {}
        assert not p.mirrors and not p.followers, "no mirror, no follower"
        assert p.stats["reads_held"] == 1

    asyncio.run(main())


def test_a_held_read_of_a_shard_not_held_from_the_cursor_on_says_it_moved() -> None:
    async def main() -> None:
        p = plane(ShardLogConfig(max_backlog=1, max_records=1))  # keeps the last record
        for i in range(3):
            await p.append_local("t", [("k", b"v", f"r{i}", 0.0)], copied=False)
        assert p.logs[("t", MINE)].base == 2
        r = await p._rpc_read(ReadRequest(topic="t", held=[MINE, "n1~0"],
                                          cursors={MINE: 1}, wait_s=0.0))
        assert r.records == [] and r.moved == [MINE, "n1~0"]
        r = await p._rpc_read(ReadRequest(topic="t", held=[MINE, "n1~0"],
                                          cursors={MINE: 2}, wait_s=0.0))
        assert [x.id for x in r.records] == ["r2"] and r.moved == ["n1~0"]

    asyncio.run(main())


def test_a_read_through_the_node_skips_shards_read_at_their_holder_and_names_them() -> None:
    async def main() -> None:
        p = plane()
        p._ensure_followers = lambda topic: None  # type: ignore[method-assign]
        for source in ("n1~0", "far~0", MINE):
            m = p.mirrors[("t", source)] = ShardLog("t", source, ShardLogConfig())
            m.append([("k", b"v", f"{source}:0", 0.0)])
        p.mirrors[("t", "n1~9")] = ShardLog("t", "n1~9", ShardLogConfig())  # no record yet
        r = await p._rpc_read(ReadRequest(topic="t", wait_s=HOUR))
        assert sorted(x.source for x in r.records) == ["far~0", MINE, "n1~0"]
        # Only the shard another node of this region holds: not the far one (its reads
        # cross regions: through the mirror), nor this node's own.
        assert r.holders == {"n1~0": "n1.addr:1"}
        r = await p._rpc_read(ReadRequest(topic="t", skip=["n1~0"], wait_s=HOUR))
        assert sorted(x.source for x in r.records) == ["far~0", MINE]
        assert r.holders == {}

    asyncio.run(main())
