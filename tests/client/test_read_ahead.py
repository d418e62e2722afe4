"""Read-ahead of a get (``client/mesh.py``: ``_ReadAhead``), without a mesh: replies that
arrive out of order are handed over in offset order, at most ``read_ahead`` calls are in
flight (one per connection), a failed call surfaces at its chunk, and stopping cancels
the rest and closes the connections whose calls were cut short."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from meshscale.client.mesh import _ReadAhead


class FakeConn:
    """An ``RpcConnection`` stand-in serving ``data`` with random delays."""

    def __init__(self, addr: str, data: bytes, rng: random.Random, state: dict[str, int],
                 fail_at: int | None = None) -> None:
        self.addr = addr
        self.data = data
        self.rng = rng
        self.state = state
        self.fail_at = fail_at
        self.busy = False
        self.closed = 0

    async def call(self, method: str, args: dict[str, Any]) -> Any:
        assert method == "obj.read" and not self.busy  # one call per connection at a time
        self.busy = True
        self.state["in_flight"] += 1
        self.state["max"] = max(self.state["max"], self.state["in_flight"])
        try:
            await asyncio.sleep(self.rng.uniform(0, 0.003))
            off, n = args["offset"], args["length"]
            if off == self.fail_at:
                raise OSError("holder went away (test)")
            return {"data": self.data[off : off + n], "size": len(self.data)}
        finally:
            self.busy = False
            self.state["in_flight"] -= 1

    async def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_replies_come_back_in_offset_order(depth: int) -> None:
    data = bytes(random.Random(depth).randbytes(10_000))

    async def go() -> bytes:
        state = {"in_flight": 0, "max": 0}
        rng = random.Random(1)
        conns = [FakeConn("h:1", data, rng, state) for _ in range(depth)]
        ra = _ReadAhead("oid", 1000, len(data), 700, conns, conns[1:])  # type: ignore[arg-type]
        out = bytearray(data[:1000])
        while len(out) < len(data):
            want, reply = await ra.next()
            assert len(reply["data"]) == want
            out += reply["data"]
            await asyncio.sleep(0.001)  # the consumer's own work (hash, sink)
        await ra.stop()
        assert state["max"] <= depth
        return bytes(out)

    assert asyncio.run(go()) == data


def test_a_failed_chunk_surfaces_in_order_and_stop_closes_cut_calls() -> None:
    data = bytes(range(256)) * 40

    async def go() -> None:
        state = {"in_flight": 0, "max": 0}
        rng = random.Random(2)
        conns = [FakeConn("h:1", data, rng, state, fail_at=3000) for _ in range(3)]
        ra = _ReadAhead("oid", 0, len(data), 1000, conns, conns[1:])  # type: ignore[arg-type]
        got = 0
        with pytest.raises(OSError, match="went away"):
            while True:
                want, reply = await ra.next()
                assert reply["data"] == data[got : got + want]
                got += want
        assert got == 3000  # every chunk before the failed one, in order
        await ra.stop()
        assert not ra.pending and state["in_flight"] == 0

    asyncio.run(go())
