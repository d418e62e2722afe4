"""A record read before the shard's backup has it, then its primary dies (issue 23's question).

The primary lets the long-polls it woke read an appended record before the copy to the
backup is made (``StreamPlane.append_local``); the producer's ack waits for the copy. If
the primary dies in that window, a reader has seen records the backup lacks, and an
operator may have committed past them. That causes no skip and no repeated offset:

- only the epoch that owns a shard appends to it (``append_local`` appends to
  ``self.source_id``'s shard); the backup applies the primary's entries at the primary's
  offsets (``ShardLog.apply``) and never assigns one, so after the source dies its shard,
  at the backup, is a prefix of what the primary held, frozen: no record ever takes the
  offsets a reader saw past the backup's head;
- the producer, not acknowledged, re-sends to its new entry node, whose *own* shard (a
  new name, offsets of its own) takes the records, with their ids;
- a runner resuming at a checkpoint past the backup's head (its commit clamped to that
  head) reads nothing more from the dead shard, and the re-sent records in the new one.

What the window costs is a repeat by id of the records read in it (at-least-once, the
design's promise: ids let consumers drop repeats), never a record lost or skipped.

In process and deterministic: three real ``StreamPlane`` s whose node-to-node calls go
straight to each other's handlers; the copy to the backup is held on a gate (the test's
network), the primary's pending publish is cancelled (its producer gets no ack) and the
views mark it dead. No clock is read; no sleeps.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from meshscale.core.api import ApiError, ErrorCode
from meshscale.core.api import streams as api
from meshscale.core.api.streams import (
    CopiedRequest,
    FetchReply,
    FetchRequest,
    PublishRecord,
    PublishRequest,
)
from meshscale.core.membership import State
from meshscale.core.streams import ShardLogConfig
from meshscale.runtime.streams import StreamConfig, StreamPlane

T = "t"


async def no_record(key: str) -> bytes | None:
    return None  # no KV here: the topics have no replicated record (no class)


def member(name: str, zone: str) -> Any:
    return SimpleNamespace(name=name, addr=f"{name}:1", state=State.ALIVE, meta=SimpleNamespace(
        region="r", zone=zone, labels={}, tags={"epoch": "1"}))


class Net:
    """Three planes, A and B in one zone (B backs A's shards up), C in another (it backs
    B's up once A is gone). Copies to ``held`` wait for ``gate``."""

    def __init__(self, config: StreamConfig | None = None) -> None:
        self.members = {n: member(n, z) for n, z in (("A", "z1"), ("B", "z1"), ("C", "z2"))}
        self.planes: dict[str, StreamPlane] = {}
        self.gate = asyncio.Event()
        self.gate.set()
        self.held: set[str] = set()
        for name, m in self.members.items():
            agent: Any = SimpleNamespace(
                name=name, meta=m.meta, m=SimpleNamespace(members=self.members),
                log=lambda *a, **k: None)
            p = StreamPlane(agent, config or StreamConfig())
            p._call = self.caller()  # type: ignore[method-assign]
            p.local.kv_get = no_record  # type: ignore[method-assign]
            self.planes[name] = p

    def caller(self) -> Any:
        async def call(name: str, method: Any, req: Any, **_: Any) -> Any:
            target = self.planes[name]
            if method is api.REPLICATE:
                if name in self.held:
                    await self.gate.wait()
                return await target._rpc_replicate(req)
            assert method is api.FETCH
            return await target._rpc_fetch(req)
        return call

    def kill(self, name: str) -> None:
        self.members[name].state = State.DEAD


def recs(*ids: str) -> list[PublishRecord]:
    return [PublishRecord("k", i.encode(), i, 0.0) for i in ids]


async def turns(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def fetch(p: StreamPlane, source: str, offset: int, committed: int | None = None
                ) -> FetchReply:
    return await p._rpc_fetch(FetchRequest(topic=T, source=source, offset=offset, wait_s=0.0,
                                           op="sink", committed=committed))


def test_records_read_before_the_backup_copy_then_the_primary_dies_repeat_never_skip() -> None:
    async def main() -> None:
        net = Net()
        a, b = net.planes["A"], net.planes["B"]
        sa, sb = a.source_id, b.source_id
        read: list[tuple[str, int, str]] = []  # (shard, offset, id) as the operator saw them

        def saw(source: str, r: FetchReply) -> int:
            read.extend((source, e.offset, e.rid) for e in r.entries)
            return r.entries[-1].offset + 1 if r.entries else -1

        acked = await a._rpc_publish(PublishRequest(topic=T, records=recs("r0", "r1", "r2")))
        assert (acked.first, acked.last) == (0, 2)
        assert b.logs[(T, sa)].head == 3  # acknowledged at two copies

        # The copy to B is held: the producer's next publish waits for it, unacknowledged,
        # while the operator on A reads the records (the latency change) and commits past
        # them (a sink operator has no outputs whose copy its commit would wait for).
        net.held.add("B")
        net.gate.clear()
        pending = asyncio.ensure_future(
            a._rpc_publish(PublishRequest(topic=T, records=recs("r3", "r4", "r5"))))
        await turns()
        assert not pending.done()
        checkpoint = saw(sa, await fetch(a, sa, 0))
        assert checkpoint == 6 and [x[2] for x in read] == ["r0", "r1", "r2", "r3", "r4", "r5"]
        await fetch(a, sa, checkpoint, committed=checkpoint)
        assert a.logs[(T, sa)].committed["sink"] == 6
        assert b.logs[(T, sa)].head == 3  # the backup lacks what the operator committed

        # A dies in the window: its producer gets no ack.
        net.kill("A")
        pending.cancel()
        await turns()
        assert pending.cancelled()
        net.held.clear()
        net.gate.set()

        # The producer re-sends to its new entry node (B) while another producer keeps
        # publishing there: both land in B's own shard, never in A's.
        r1 = await b._rpc_publish(PublishRequest(topic=T, records=recs("x0")))
        r2 = await b._rpc_publish(PublishRequest(topic=T, records=recs("r3", "r4", "r5")))
        r3 = await b._rpc_publish(PublishRequest(topic=T, records=recs("x1", "x2")))
        copy = b.logs[(T, sa)]
        held = [(e.offset, e.rid) for e in copy.entries]
        # The operator resumes on A's shard, now at B, at its checkpoint (past the copy's
        # head), then reads B's shard from the start.
        r = await fetch(b, sa, checkpoint, committed=checkpoint)
        saw(sa, r)
        saw(sb, await fetch(b, sb, 0))

        ids = [x[2] for x in read]
        assert set(ids) == {"r0", "r1", "r2", "r3", "r4", "r5", "x0", "x1", "x2"}  # none lost
        repeats = sorted(i for i in set(ids) if ids.count(i) > 1)
        assert repeats == ["r3", "r4", "r5"]  # only those read in the window, by their ids
        for shard in (sa, sb):  # within a shard: every offset once, none skipped
            offs = [o for s, o, _ in read if s == shard]
            assert offs == list(range(len(offs)))
        # The new shard keeps the producer's order of each key.
        assert [i for s, _, i in read if s == sb] == ["x0", "r3", "r4", "r5", "x1", "x2"]

        # Why: the re-sent and the new records all went to B's own shard (backed up at C)...
        assert {r1.source, r2.source, r3.source} == {sb}
        assert net.planes["C"].logs[(T, sb)].head == 6
        # ... and A's shard at B is a prefix of A's, at A's offsets, frozen: the resumed
        # operator got nothing there, its commit clamped to the copy's head.
        assert held == [(o, i) for _, o, i in read[:3]]
        assert r.entries == [] and r.head == copy.head == 3 and copy.committed["sink"] == 3

    asyncio.run(main())


def test_records_committed_before_their_copy_still_reach_the_backup_before_the_ack() -> None:
    """Beside the question above: with a copy to the backup in flight (a shard's copies
    go one at a time), a second publish's records are read and committed by the operator
    before their own copy is sent. The primary keeps them until the backup confirms them
    (``core.streams.releasable``), so their copy still carries them and their ack means
    two copies. (Dropped at the commit, they were never copied yet acknowledged: a
    subscriber reading the topic after the primary died missed them.)"""

    async def main() -> None:
        net = Net()
        a, b = net.planes["A"], net.planes["B"]
        sa = a.source_id
        net.held.add("B")
        net.gate.clear()
        first = asyncio.ensure_future(
            a._rpc_publish(PublishRequest(topic=T, records=recs("r0", "r1", "r2"))))
        await turns()
        second = asyncio.ensure_future(
            a._rpc_publish(PublishRequest(topic=T, records=recs("r3"))))
        await turns()
        assert not first.done() and not second.done()
        r = await fetch(a, sa, 0)
        assert [e.rid for e in r.entries] == ["r0", "r1", "r2", "r3"]
        await fetch(a, sa, 4, committed=4)
        assert a.logs[(T, sa)].committed["sink"] == 4
        net.gate.set()
        await turns()
        assert (await first).last == 2 and (await second).last == 3
        copy = b.logs[(T, sa)]
        assert [e.rid for e in copy.entries] == ["r0", "r1", "r2", "r3"]
        assert a.stats["unreplicated_appends"] == 0
        # Confirmed, the committed records go from the primary.
        assert a.logs[(T, sa)].base == 4 and a.logs[(T, sa)].bytes == 0

    asyncio.run(main())


def test_a_producer_waiting_for_byte_room_is_woken_when_the_copy_frees_it() -> None:
    """Committed records held for their copy count against the log's byte bound: the
    confirmation that frees them wakes a producer waiting for room (here with an
    hour-long publish wait, so a missed wake-up leaves it waiting)."""

    async def main() -> None:
        size = 29  # one record below: 2 value + 1 key + 2 id bytes + 24
        net = Net(StreamConfig(publish_wait_s=3600.0,
                               log=ShardLogConfig(max_backlog=8, max_bytes=2 * size)))
        a = net.planes["A"]
        sa = a.source_id
        a._log(T, sa).register("sink")
        net.held.add("B")
        net.gate.clear()
        first = asyncio.ensure_future(
            a._rpc_publish(PublishRequest(topic=T, records=recs("r0", "r1"))))
        await turns()
        await fetch(a, sa, 2, committed=2)
        log = a.logs[(T, sa)]
        assert log.entries[0].size == size and log.room() == 0  # held for their copy
        second = asyncio.ensure_future(
            a._rpc_publish(PublishRequest(topic=T, records=recs("r2"))))
        await turns()
        assert a.stats["publish_waits"] == 1 and not second.done()
        net.gate.set()
        await turns()
        assert second.done(), "the producer slept through the room its copy freed"
        assert (await first).last == 1 and (await second).first == 2
        assert net.planes["B"].stats["records_backed_up"] == 3

    asyncio.run(main())


def test_a_publish_asking_for_appended_is_answered_before_its_copy_and_acked_after_it() -> None:
    """A producer that asks for ``ack="appended"`` (the client's, so its next batch need
    not wait behind this one's copy) is answered as soon as its records are appended,
    the copy to the backup under way; ``stream.copied`` then answers only once the
    backup holds them: the acknowledgement still means two copies. (Answered after the
    copy, the producer's next record waited for the backup's round trip: issue 23.)"""

    async def main() -> None:
        net = Net()
        a, b = net.planes["A"], net.planes["B"]
        sa = a.source_id
        net.held.add("B")
        net.gate.clear()
        first = asyncio.ensure_future(a._rpc_publish(
            PublishRequest(topic=T, records=recs("r0"), ack="appended")))
        await turns()
        assert first.done(), "the publish waited for the copy to the backup"
        r = first.result()
        assert (r.source, r.first, r.last, r.copied) == (sa, 0, 0, 0)
        # The next batch goes in behind it at once, in order.
        r2 = await a._rpc_publish(PublishRequest(topic=T, records=recs("r1"), ack="appended"))
        assert (r2.first, r2.copied) == (1, 0)
        acked = asyncio.ensure_future(a._rpc_copied(CopiedRequest(topic=T, source=sa, offset=2)))
        await turns()
        assert not acked.done(), "acknowledged before the backup held the records"
        assert (T, sa) not in b.logs
        net.gate.set()
        await turns()
        assert acked.done() and acked.result().copied == 2
        assert [e.rid for e in b.logs[(T, sa)].entries] == ["r0", "r1"]
        # Asked again once copied, it answers at once.
        assert (await a._rpc_copied(CopiedRequest(topic=T, source=sa, offset=2))).copied == 2

    asyncio.run(main())


def test_copied_of_a_shard_the_node_does_not_have_is_refused_so_the_producer_resends() -> None:
    """A node asked for the copy of a shard it does not own (it restarted: its shard has
    a new source) refuses, not found: the producer sends its unacknowledged records
    again instead of waiting."""

    async def main() -> None:
        a = Net().planes["A"]
        with pytest.raises(ApiError) as e:
            await a._rpc_copied(CopiedRequest(topic=T, source="A~0", offset=1))
        assert e.value.code is ErrorCode.NOT_FOUND

    asyncio.run(main())
