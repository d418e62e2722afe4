"""transport/peers.py: a long-lived reader's lane is closed when it is released, and only
that lane (no connection is opened: a shared connection connects on its first call); idle
connections are closed once idle for ``idle_close_s``."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from meshscale.transport.peers import PeerConfig, PeerPool


def test_release_closes_one_lane() -> None:
    async def run() -> None:
        pool = PeerPool(cast(Any, None))
        reader = pool.shared("n1", "127.0.0.1:9", "stream.fetch:op:n2~1", timeout_s=15.0)
        ctl = pool.shared("n1", "127.0.0.1:9", "stream")
        assert reader.timeout == 15.0 and pool.open_count == 2
        pool.release("n1", "stream.fetch:op:n2~1")
        pool.release("n1", "no-such-lane")
        assert pool.open_count == 1
        assert pool.shared("n1", "127.0.0.1:9", "stream") is ctl
        assert pool.shared("n1", "127.0.0.1:9", "stream.fetch:op:n2~1") is not reader
        await pool.close()
        assert pool.open_count == 0

    asyncio.run(run())


class _Conn:
    """What the pool needs of a connection: its address, whether it is open, close."""

    def __init__(self, addr: str = "127.0.0.1:9") -> None:
        self.addr = addr
        self.is_open = True
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        self.is_open = False


def test_sweep_closes_connections_idle_for_idle_close_s() -> None:
    """Issue #24: idle checked-in connections (~300 KB each on both ends) are closed once
    idle for ``idle_close_s``, and those the member closed are let go, instead of being
    held until the next checkout."""

    async def run() -> None:
        pool = PeerPool(cast(Any, None), PeerConfig(idle_close_s=5.0))
        old, new, cut = _Conn(), _Conn(), _Conn()
        pool.checkin("n1", cast(Any, old), now=100.0)
        pool.checkin("n1", cast(Any, cut), now=102.0)
        pool.checkin("n2", cast(Any, new), now=103.0)
        cut.is_open = False  # the member closed its end
        assert pool.open_count == 3
        assert pool.sweep(104.9) == 1  # only the closed one
        assert pool.open_count == 2
        assert pool.sweep(105.0) == 1  # ``old`` has been idle 5 s
        await asyncio.sleep(0)
        assert old.closed and not new.closed
        assert pool.open_count == 1
        assert pool.checkout("n2", "127.0.0.1:9") is new
        assert pool.sweep(1000.0) == 0 and pool.open_count == 0
        await pool.close()

    asyncio.run(run())


def test_checkout_takes_the_newest_idle_connection() -> None:
    """The newest is reused, so the oldest are those that age out under light traffic."""

    async def run() -> None:
        pool = PeerPool(cast(Any, None), PeerConfig(idle_close_s=5.0))
        a, b = _Conn(), _Conn()
        pool.checkin("n1", cast(Any, a), now=100.0)
        pool.checkin("n1", cast(Any, b), now=101.0)
        assert pool.checkout("n1", "127.0.0.1:9") is b
        pool.checkin("n1", cast(Any, b), now=104.0)
        assert pool.sweep(105.0) == 1 and pool.checkout("n1", "127.0.0.1:9") is b
        await pool.close()

    asyncio.run(run())
