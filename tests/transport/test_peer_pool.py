"""transport/peers.py: a long-lived reader's lane is closed when it is released, and only
that lane (no connection is opened: a shared connection connects on its first call)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from meshscale.transport.peers import PeerPool


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
