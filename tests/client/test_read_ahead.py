"""Read-ahead of a get (``client/mesh.py``: ``_ReadAhead``) and the pipelined calls it
rides on (``client/rpc.py``: ``RpcPipeline``), without a mesh: replies come back in
offset order, at most ``depth`` calls are outstanding, a failed call surfaces at its
chunk, and stopping with calls outstanding closes the connection."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from typing import Any

import pytest

from meshscale.client.mesh import _ReadAhead
from meshscale.core.api.objects import READ, ReadReply, ReadRequest


class FakePipeline:
    """An ``RpcPipeline`` stand-in: a node serving ``data``, one call at a time, in order."""

    def __init__(self, data: bytes, rng: random.Random, fail_at: int | None = None) -> None:
        self.data = data
        self.rng = rng
        self.fail_at = fail_at
        self.sent: deque[dict[str, Any]] = deque()
        self.max_outstanding = 0
        self.closed_with = -1

    async def send_request(self, method: Any, req: ReadRequest) -> None:
        assert method is READ
        self.sent.append({"offset": req.offset, "length": req.length})
        self.max_outstanding = max(self.max_outstanding, len(self.sent))

    async def receive_reply(self, method: Any) -> ReadReply:
        assert method is READ
        args = self.sent.popleft()
        await asyncio.sleep(self.rng.uniform(0, 0.002))
        off, n = args["offset"], args["length"]
        if off == self.fail_at:
            raise OSError("holder went away (test)")
        return ReadReply(data=self.data[off : off + n], size=len(self.data))

    async def close(self) -> None:
        self.closed_with = len(self.sent)


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_replies_come_back_in_offset_order(depth: int) -> None:
    data = random.Random(depth).randbytes(10_000)

    async def go() -> bytes:
        p = FakePipeline(data, random.Random(1))
        ra = _ReadAhead("oid", 1000, len(data), 700, depth, p)  # type: ignore[arg-type]
        out = bytearray(data[:1000])
        while len(out) < len(data):
            want, reply = await ra.next()
            assert len(reply.data) == want
            out += reply.data
            # While we take this chunk in, the next ones are already asked for.
            assert len(p.sent) == min(depth, -(-(len(data) - len(out)) // 700))
        await ra.stop()
        assert p.max_outstanding <= depth and p.closed_with == 0
        return bytes(out)

    assert asyncio.run(go()) == data


def test_a_failed_chunk_surfaces_in_order_and_stop_drops_the_connection() -> None:
    data = bytes(range(256)) * 40

    async def go() -> None:
        p = FakePipeline(data, random.Random(2), fail_at=3000)
        ra = _ReadAhead("oid", 0, len(data), 1000, 3, p)  # type: ignore[arg-type]
        got = 0
        with pytest.raises(OSError, match="went away"):
            while True:
                want, reply = await ra.next()
                assert reply.data == data[got : got + want]
                got += want
        assert got == 3000  # every chunk before the failed one, in order
        await ra.stop()
        assert p.closed_with == 2  # calls still due: the connection is not reused

    asyncio.run(go())
