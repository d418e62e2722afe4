"""A producer's sender (``client.streams.Stream``) sends its next batch as soon as the
previous one is appended at the node, not once its copy to the backup is confirmed, and
still counts a record acknowledged only when the node says two copies hold it; when the
node fails before that, every record not acknowledged goes again to the next node, in
the order published (issue 23).

The node is a fake behind the client's connection class (a real node's answers: a
publish with ``ack="copied"``, the default, is answered after the copy; one with
``ack="appended"`` at once; ``stream.copied`` once the copy is done), with the copy held
on a gate the test opens. The test waits on conditions (``wait_for``), never on time.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from meshscale.client import streams as client_streams
from meshscale.client.mesh import _LoopThread
from meshscale.client.rpc import RpcError
from meshscale.core.api import streams as api
from meshscale.core.api.streams import CopiedReply, PublishReply
from waiting import wait_for


class Node:
    """One fake node: what it was sent, and its copy to the backup held on ``gate``."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.published: list[list[str]] = []
        self.head = 0
        self.copied = 0
        self.held = True
        self.dead = False
        self.short = False
        """The backup cannot be reached: ``stream.copied`` answers at once, short."""
        self.copied_calls = 0
        self.gate = asyncio.Event()
        self.loop = loop

    async def copy(self) -> None:
        if self.held:
            await self.gate.wait()
        if self.dead:
            raise RpcError(f"{self.name}: connection lost")
        self.copied = self.head

    async def request(self, method: Any, req: Any) -> Any:
        if self.dead:
            raise RpcError(f"{self.name}: connection refused")
        if method is api.PUBLISH:
            self.published.append([r.id for r in req.records])
            first = self.head
            self.head += len(req.records)
            if req.ack == "copied":
                await self.copy()
            elif not self.held and not self.short:
                self.copied = self.head
            return PublishReply(node=self.name, source=f"{self.name}~1", first=first,
                                last=self.head - 1,
                                copied=None if req.ack == "copied" else self.copied)
        if method is api.COPIED:
            assert req.source == f"{self.name}~1"
            self.copied_calls += 1
            if self.short:
                return CopiedReply(copied=self.copied)
            await self.copy()
            return CopiedReply(copied=self.copied)
        raise RpcError(f"{self.name}: {method.name} not served here")

    def release(self, *, dead: bool = False) -> None:
        def go() -> None:
            self.dead = dead
            self.gate.set()

        self.loop.call_soon_threadsafe(go)


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch) -> Any:
    runner = _LoopThread()
    nodes = {n: Node(n, runner.loop) for n in ("a", "b")}

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


def test_a_record_goes_while_the_previous_ones_copy_travels(net: Any) -> None:
    mesh, nodes = net
    a = nodes["a"]
    s = client_streams.Stream(mesh, "t")
    s.publish("k", 0, id="r0")
    wait_for(lambda: a.published == [["r0"]], 10, "r0 sent")
    s.publish("k", 1, id="r1")
    wait_for(lambda: a.published == [["r0"], ["r1"]], 10,
             "r1 sent while r0's copy to the backup is held")
    assert s.acked == 0 and s.pending() == 2  # not acknowledged before two copies
    a.release()
    wait_for(lambda: s.acked == 2, 10, "both acknowledged once copied")
    s.flush(10)
    assert s.pending() == 0 and s.failovers == 0
    s.close()


def test_a_node_that_fails_before_the_copy_gets_every_unacked_record_resent_in_order(
        net: Any) -> None:
    mesh, nodes = net
    a, b = nodes["a"], nodes["b"]
    b.held = False
    s = client_streams.Stream(mesh, "t")
    s._route.order = ["a", "b"]
    for i in range(3):
        s.publish("k", i, id=f"r{i}")
        wait_for(lambda i=i: len(a.published) == i + 1, 10, f"r{i} sent")
    assert s.acked == 0
    a.release(dead=True)
    wait_for(lambda: s.acked == 3, 10, "the records acknowledged by the next node")
    assert b.published == [["r0", "r1", "r2"]], "resent in the order published"
    assert s.failovers == 1 and s.nodes_used == ["a", "b"]
    s.publish("k", 3, id="r3")
    s.flush(10)
    assert b.published[-1] == ["r3"] and s.acked == 4
    s.close()


def test_a_full_window_waits_for_an_ack_and_sends_what_piled_up_in_one_batch(
        net: Any) -> None:
    """At most ``AckWindow.max_batches`` batches wait for their copy: a flood keeps its
    batches large instead of sending a small one per append."""
    mesh, nodes = net
    a = nodes["a"]
    s = client_streams.Stream(mesh, "t")
    room = s._window.max_batches
    s._window.min_records = room  # its few records count as a flood's here
    for i in range(room):
        s.publish("k", i, id=f"r{i}")
        wait_for(lambda i=i: len(a.published) == i + 1, 10, f"r{i} sent")
    s.publish("k", room, id="x0")
    # Either x0 went (no bound), or the sender holds it for an ack (the bound).
    wait_for(lambda: len(a.published) > room or s.window_waits > 0, 10, "x0 sent or held")
    s.publish("k", room + 1, id="x1")
    a.release()
    wait_for(lambda: s.acked == room + 2, 10, "all acknowledged")
    assert a.published[room:] == [["x0", "x1"]]
    s.close()


def test_a_short_copied_answer_is_asked_again_after_a_growing_pause_not_at_once(
        net: Any) -> None:
    """While the node cannot reach its backup, ``stream.copied`` answers at once without
    the copy: the ack loop pauses (``core.backoff``, doubling) before each ask again
    instead of spinning against the node, and starts from the shortest pause once a
    copy is acknowledged."""
    mesh, nodes = net
    a = nodes["a"]
    a.held, a.short = False, True
    s = client_streams.Stream(mesh, "t")
    pauses: list[float] = []
    real = s._copy_backoff

    class Recorded:
        def next_delay(self) -> float | None:
            d = real.next_delay()
            assert d is not None
            pauses.append(d)
            return 0.001  # the test waits on the count, not on the pauses

        def reset(self) -> None:
            pauses.append(-1.0)
            real.reset()

    s._copy_backoff = Recorded()  # type: ignore[assignment]
    s.publish("k", 0, id="r0")
    wait_for(lambda: a.copied_calls >= 6, 10, "stream.copied asked again")
    assert s.acked == 0
    calls = a.copied_calls
    assert len(pauses) in (calls, calls - 1), "a pause before each ask again"
    first, cap = client_streams.COPY_RETRY_FIRST_S, client_streams.COPY_RETRY_MAX_S
    for i, d in enumerate(pauses[:6]):  # doubling to the cap, drawn in its upper half
        top = min(cap, first * 2 ** i)
        assert top / 2 <= d <= top, (i, d, pauses)
    a.short = False
    a.copied = a.head
    wait_for(lambda: s.acked == 1, 10, "acknowledged once copied")
    wait_for(lambda: -1.0 in pauses, 10, "the pause reset after the ack")
    s.close()


def test_a_few_records_waiting_for_a_slow_copy_do_not_hold_the_next_one(net: Any) -> None:
    """A producer of a few records per copy round trip (a backup far away) sends each at
    once: its window of small batches is not full until it holds
    ``AckWindow.min_records`` records (bounded by batches alone, the record after
    ``max_batches`` of them waited for the copy: issue 19's ~100 ms tail)."""
    mesh, nodes = net
    a = nodes["a"]
    s = client_streams.Stream(mesh, "t")
    n = s._window.max_batches + 2
    assert n < s._window.min_records
    for i in range(n):
        s.publish("k", i, id=f"r{i}")
        wait_for(lambda i=i: len(a.published) == i + 1, 10, f"r{i} sent while copies wait")
    assert s.window_waits == 0 and s.acked == 0
    a.release()
    wait_for(lambda: s.acked == n, 10, "all acknowledged")
    assert a.published == [[f"r{i}"] for i in range(n)]
    s.close()
