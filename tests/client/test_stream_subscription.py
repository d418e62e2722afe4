"""A subscription reads the shards its node names (``ReadReply.holders``) at their holder,
not through the node's mirror (one hop less per record: issue 23); a holder that fails
or lets go of a shard sends it back through the node from the same cursor, nothing lost
and nothing out of order; each poll leaves its next reads sent (read ahead).

The nodes are fakes behind the client's connection class: each read waits on a queue of
answers the test feeds, as a long-poll waits for records. The test waits on conditions
(``wait_for``), never on time."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from meshscale.client import streams as client_streams
from meshscale.client.mesh import _LoopThread
from meshscale.client.rpc import RpcError
from meshscale.core.api import node as node_api
from meshscale.core.api import streams as api
from meshscale.core.api.streams import ReadRecord, ReadReply, ReadRequest
from waiting import wait_for

SRC = "h~1"
"""The shard the tests read: held by node ``h``."""


def rec(off: int, source: str = SRC) -> ReadRecord:
    return ReadRecord(source, off, "k", msgspec.msgpack.encode(off), f"{source}:{off}", 0.0)


class Node:
    """One fake node: the reads it was sent, and the answers they wait for."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.loop = loop
        self.reads: list[ReadRequest] = []
        self.answers: asyncio.Queue[ReadReply | Exception] = asyncio.Queue()

    async def request(self, method: Any, req: Any) -> Any:
        if method is node_api.MEMBERS:
            return []
        assert method is api.READ
        self.reads.append(req)
        got = await self.answers.get()
        if isinstance(got, Exception):
            raise got
        return got

    def answer(self, reply: ReadReply | Exception) -> None:
        self.loop.call_soon_threadsafe(self.answers.put_nowait, reply)


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch) -> Any:
    runner = _LoopThread()
    nodes = {n: Node(n, runner.loop) for n in ("a", "h")}

    class Conn:
        def __init__(self, addr: str, creds: Any, timeout: float) -> None:
            self.addr = addr

        async def request(self, method: Any, req: Any) -> Any:
            return await nodes[self.addr].request(method, req)

        async def close(self) -> None:
            pass

    monkeypatch.setattr(client_streams, "RpcConnection", Conn)
    mesh = SimpleNamespace(_runner=runner, address="a",
                           _inner=SimpleNamespace(_conn=SimpleNamespace(creds=None)),
                           _run=runner.run)
    yield mesh, nodes
    runner.stop()


def offsets(records: list[client_streams.Record]) -> list[int]:
    return [r.offset for r in records]


def poll_until(sub: client_streams.Subscription, n: int) -> list[client_streams.Record]:
    got: list[client_streams.Record] = []
    wait_for(lambda: bool(got.extend(sub.poll(timeout=0.05)) or len(got) >= n), 10,
             f"{n} records")
    return got


def test_a_shard_named_by_the_node_is_read_at_its_holder(net: Any) -> None:
    mesh, nodes = net
    a, h = nodes["a"], nodes["h"]
    sub = client_streams.Subscription(mesh, "t")
    a.answer(ReadReply(records=[rec(0)], holders={SRC: "h"}))
    assert offsets(poll_until(sub, 1)) == [0]
    # The next reads: through the node without the shard, and at its holder from the
    # cursor on.
    wait_for(lambda: len(h.reads) == 1, 10, "a read at the holder")
    assert h.reads[0].held == [SRC] and h.reads[0].cursors == {SRC: 1}
    wait_for(lambda: any(r.skip == [SRC] for r in a.reads), 10, "the node's read skips it")
    h.answer(ReadReply(records=[rec(1), rec(2)]))
    assert offsets(poll_until(sub, 2)) == [1, 2]
    assert sub.received_direct == 2 and sub.cursors == {SRC: 3}
    sub.close()


@pytest.mark.parametrize("how", ["failed", "moved"])
def test_a_holder_that_fails_or_lets_go_sends_the_shard_back_through_the_node(
        net: Any, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_streams, "DIRECT_RETRY_S", 3600.0)
    mesh, nodes = net
    a, h = nodes["a"], nodes["h"]
    sub = client_streams.Subscription(mesh, "t")
    a.answer(ReadReply(records=[rec(0)], holders={SRC: "h"}))
    got = poll_until(sub, 1)
    wait_for(lambda: len(h.reads) == 1, 10, "a read at the holder")
    h.answer(ReadReply(records=[rec(1)]))
    got += poll_until(sub, 1)
    wait_for(lambda: len(h.reads) == 2, 10, "the next read at the holder")
    h.answer(RpcError("h: connection lost") if how == "failed"
             else ReadReply(records=[], moved=[SRC]))
    wait_for(lambda: not sub.poll(timeout=0.05) and not sub._direct, 10,
             "the holder's answer taken")
    a.answer(ReadReply(records=[]))  # the node's read in flight: its wait ran out
    # Back through the node, from the same cursor.
    wait_for(lambda: not sub.poll(timeout=0.05) and any(
        r.skip == [] and r.cursors.get(SRC) == 2 for r in a.reads), 10,
        "a read through the node from the cursor")
    while len(got) < 4:
        a.answer(ReadReply(records=[rec(1), rec(2), rec(3)], holders={SRC: "h"}))
        got += sub.poll(timeout=0.05)
    assert offsets(got) == [0, 1, 2, 3], "nothing lost, in order, no repeats"
    assert len(h.reads) == 2, "the holder is not read at again for a while"
    sub.close()


def test_a_poll_leaves_its_next_read_sent(net: Any) -> None:
    """A record that lands while the caller handles the last ones is on its way."""
    mesh, nodes = net
    a = nodes["a"]
    sub = client_streams.Subscription(mesh, "t")
    a.answer(ReadReply(records=[rec(0, "a~1")]))
    assert offsets(poll_until(sub, 1)) == [0]
    wait_for(lambda: len(a.reads) == 2, 10, "the next read sent before the next poll")
    assert a.reads[1].cursors == {"a~1": 1}
    a.answer(ReadReply(records=[rec(1, "a~1")]))
    assert offsets(poll_until(sub, 1)) == [1]
    sub.close()


def test_no_read_ahead_while_a_polls_worth_waits_here(net: Any) -> None:
    """A caller that takes fewer records a poll than come is not read ahead of: what
    waits here stays bounded, the rest stays at its shards."""
    mesh, nodes = net
    a = nodes["a"]
    sub = client_streams.Subscription(mesh, "t")
    a.answer(ReadReply(records=[rec(i, "a~1") for i in range(3)]))
    got = poll_until_one(sub)
    assert offsets(got) == [0]
    assert "" not in sub._reads, "read ahead with two records still waiting here"
    assert offsets(sub.poll(timeout=0.05, max_records=1)) == [1]
    assert "" not in sub._reads
    assert offsets(sub.poll(timeout=0.05, max_records=1)) == [2]
    assert "" in sub._reads  # none waits: the next read is sent
    wait_for(lambda: len(a.reads) == 2, 10, "the next read")
    assert a.reads[1].cursors == {"a~1": 3}
    sub.close()


def poll_until_one(sub: client_streams.Subscription) -> list[client_streams.Record]:
    got: list[client_streams.Record] = []
    wait_for(lambda: bool(got.extend(sub.poll(timeout=0.05, max_records=1)) or got), 10,
             "a record")
    return got


def test_a_read_through_the_node_that_fails_raises_from_poll(net: Any) -> None:
    mesh, nodes = net
    a = nodes["a"]
    sub = client_streams.Subscription(mesh, "t")
    a.answer(client_streams.MeshError("refused: cross_region_read"))
    with pytest.raises(client_streams.MeshError, match="cross_region_read"):
        sub.poll(timeout=5.0)
    sub.close()
