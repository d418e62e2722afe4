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


def test_sweep_closes_a_quiet_members_idle_connections() -> None:
    """Issue #24: a member's idle connections (~160 KB of RSS each, on both ends) are closed once
    none was checked out or in for ``idle_close_s``, and those the member closed are let
    go at once, instead of being held until the next checkout."""

    async def run() -> None:
        pool = PeerPool(cast(Any, None), PeerConfig(idle_close_s=5.0))
        a, b, cut, other = _Conn(), _Conn(), _Conn(), _Conn()
        pool.checkin("n1", cast(Any, a), now=100.0)
        pool.checkin("n1", cast(Any, cut), now=101.0)
        pool.checkin("n1", cast(Any, b), now=102.0)
        pool.checkin("n2", cast(Any, other), now=103.0)
        cut.is_open = False  # the member closed its end
        assert pool.idle_count == 4
        assert pool.sweep(106.9) == 1  # only the closed one: n1 was used 4.9 s ago
        assert pool.idle_count == 3 and pool.open_count == 3
        # A pool in use keeps every connection, however long one of them sat.
        assert pool.checkout("n1", "127.0.0.1:9", now=106.0) is b
        pool.checkin("n1", cast(Any, b), now=108.0)
        assert pool.sweep(112.9) == 1  # n2 is quiet (5 s), n1 is not yet
        await asyncio.sleep(0)
        assert other.closed and not a.closed and not b.closed
        assert pool.sweep(113.0) == 2 and pool.idle_count == 0
        await asyncio.sleep(0)
        assert a.closed and b.closed
        assert pool.sweep(1000.0) == 0
        await pool.close()

    asyncio.run(run())
