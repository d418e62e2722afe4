"""transport/rpc.py: an RPC to an address where nothing listens fails as ``refused`` (a
crashed process's port: the compute plane takes it as evidence of a lost runner, issue
#19); one to a node that accepts and then stays silent times out and is not ``refused``
(a loaded node may be that slow)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from types import SimpleNamespace
from typing import Any, cast

import pytest

from meshscale.transport.rpc import RpcConnection, RpcError


def _creds() -> Any:
    return cast(Any, SimpleNamespace(ssl_context=ssl.create_default_context(), token=None))


def test_nothing_listening_is_refused() -> None:
    with socket.socket() as s:  # a port that was just free, closed again
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def run() -> None:
        conn = RpcConnection(f"127.0.0.1:{port}", _creds(), timeout=5.0)
        with pytest.raises(RpcError) as info:
            await conn.call("members")
        assert info.value.refused and info.value.unreachable

    asyncio.run(run())


def test_a_silent_node_times_out_without_refusing() -> None:
    async def run() -> None:
        held: list[asyncio.StreamWriter] = []

        async def accept(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            held.append(w)  # accepted, never greeted

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            conn = RpcConnection(f"127.0.0.1:{port}", _creds(), timeout=5.0,
                                 connect_timeout=0.3)
            with pytest.raises(RpcError) as info:
                await conn.call("members")
            assert info.value.unreachable and not info.value.refused
        finally:
            for w in held:
                w.close()
            server.close()
            await server.wait_closed()

    asyncio.run(run())
