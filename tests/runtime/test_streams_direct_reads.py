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

from fake_streams import fake_plane, member, turns

from meshscale.core.api.streams import FetchReply, ReadRequest
from meshscale.core.membership import State
from meshscale.core.streams import ShardLog, ShardLogConfig
from meshscale.runtime.streams import StreamConfig, StreamPlane

HOUR = 3600.0
MINE = "n0~0"
"""The shard of the plane's own node (``n0``, epoch 0)."""


def quiet(p: StreamPlane) -> StreamPlane:
    """No KV (the topics have no replicated record, so no class) and no live view."""

    async def no_record(key: str) -> bytes | None:
        return None

    p.local.kv_get = no_record  # type: ignore[method-assign]
    p._alive = lambda: []  # type: ignore[method-assign]
    return p


def plane(log: ShardLogConfig | None = None) -> StreamPlane:
    p = quiet(fake_plane({"n1": member("n1", "r1"), "far": member("far", "r2")},
                         StreamConfig(read_wait_max_s=HOUR, log=log or ShardLogConfig())))
    # Each shard's holder: the node its source names.
    p._holder = lambda topic, source, alive: source.split("~")[0]  # type: ignore[method-assign]
    return p


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


def follower_plane(linger_s: float) -> tuple[StreamPlane, list[int]]:
    """A plane whose follower of shard ``n1~0`` fetches from a fake holder: the first
    fetch brings a record, every later one waits for good. The fetches are counted."""
    p = quiet(fake_plane({"n1": member("n1", "r1")},
                         StreamConfig(read_wait_max_s=HOUR, follow_linger_s=linger_s,
                                      direct_recent_s=60.0)))
    p._sources = lambda: ["n1~0"]  # type: ignore[method-assign]
    p._holder = lambda topic, source, alive: "n1"  # type: ignore[method-assign]
    p._release = lambda names, lane: None  # type: ignore[method-assign]
    fed = ShardLog("t", "n1~0", ShardLogConfig())
    entries = fed.append([("k", b"v", "r0", 0.0)])
    fetches: list[int] = []

    async def call(name: str, method: Any, req: Any, **kw: Any) -> Any:
        fetches.append(req.offset)
        if len(fetches) == 1:
            return FetchReply(entries=entries, base=0, head=1)
        await asyncio.Event().wait()  # the next long-poll: nothing more comes
        raise AssertionError("unreachable")

    p._call = call  # type: ignore[method-assign,assignment]
    return p, fetches


async def stop(p: StreamPlane) -> None:
    p._stopping = True
    for t in p.followers.values():
        t.cancel()
    await turns()


def test_a_follower_of_a_shard_read_at_its_holder_gathers_records_between_fetches() -> None:
    """While the subscribers reading through this node read a shard at its holder (their
    reads here leave it out), its follower, after a fetch that brought records, waits
    ``follow_linger_s`` before it fetches again: one fetch per batch of appends, not one
    per append (issue 23). A shard read here is fetched again at once."""

    async def main() -> None:
        p, fetches = follower_plane(linger_s=60.0)
        try:
            await p._rpc_read(ReadRequest(topic="t", wait_s=0.0))  # starts the follower
            await p._rpc_read(ReadRequest(topic="t", skip=["n1~0"], wait_s=0.0))
            await turns()
            assert fetches == [0], "the follower fetched again at once"
            assert p.mirrors[("t", "n1~0")].head == 1  # the record came all the same
            # A read here that needs the shard (its holder gone, say) cuts the wait short.
            await p._rpc_read(ReadRequest(topic="t", wait_s=0.0))
            await turns()
            assert fetches == [0, 1], "the lingering follower was not woken by a read here"
        finally:
            await stop(p)

        p, fetches = follower_plane(linger_s=60.0)
        try:
            await p._rpc_read(ReadRequest(topic="t", wait_s=0.0))  # reads it here
            await turns()
            assert fetches == [0, 1]
        finally:
            await stop(p)

        # Read here again after being left out: fetched at once again.
        p, fetches = follower_plane(linger_s=60.0)
        try:
            await p._rpc_read(ReadRequest(topic="t", skip=["n1~0"], wait_s=0.0))
            await p._rpc_read(ReadRequest(topic="t", wait_s=0.0))
            await turns()
            assert fetches == [0, 1]
        finally:
            await stop(p)

    asyncio.run(main())


def test_the_live_view_is_built_again_only_when_the_members_change() -> None:
    """``_alive`` keeps its candidates while no member comes, goes, changes state or
    meta (it is asked several times per record), and sees every such change."""
    members = {"n1": member("n1", "r1"), "n2": member("n2", "r1")}
    p = fake_plane(members)
    first = p._alive()
    assert [c.name for c in first] == ["n1", "n2"]
    assert p._alive() is first
    members["n2"].state = State.DEAD
    assert [c.name for c in p._alive()] == ["n1"]
    members["n1"].meta = SimpleNamespace(region="r9", zone="z", labels={}, tags={})
    assert [(c.name, c.region) for c in p._alive()] == [("n1", "r9")]
    members["n3"] = member("n3", "r1")
    assert [c.name for c in p._alive()] == ["n1", "n3"]
    del members["n1"]
    assert [c.name for c in p._alive()] == ["n3"]
    members["n2"].state = State.ALIVE
    view = p._alive()
    assert [c.name for c in view] == ["n2", "n3"] and p._alive() is view
