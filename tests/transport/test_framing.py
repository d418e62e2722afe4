from __future__ import annotations

import asyncio
import struct
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale.transport.framing import (
    MAX_FRAME,
    FrameTooLarge,
    encode_frame,
    read_frame,
    write_frame,
)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout=10)

    return asyncio.run(bounded())


def _reader(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_default_max() -> None:
    assert MAX_FRAME == 4 * 1024 * 1024


def test_encode_layout() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


@given(st.lists(st.binary(max_size=2000), max_size=8))
def test_round_trip(payloads: list[bytes]) -> None:
    async def go() -> list[bytes]:
        reader = _reader(b"".join(encode_frame(p) for p in payloads))
        return [await read_frame(reader, 4096) for _ in payloads]

    assert run(go()) == payloads


def test_oversize_is_refused_without_reading_the_body() -> None:
    async def go() -> bytes:
        # Header announces max+1; only part of the body has arrived and no EOF: a reader
        # that tried to read the body would hang here.
        reader = _reader(struct.pack(">I", 101) + b"BODY", eof=False)
        with pytest.raises(FrameTooLarge) as info:
            await read_frame(reader, 100)
        assert (info.value.size, info.value.max_size) == (101, 100)
        return await reader.read(4)

    assert run(go()) == b"BODY"


def test_huge_announced_length() -> None:
    async def go() -> None:
        with pytest.raises(FrameTooLarge):
            await read_frame(_reader(b"\xff\xff\xff\xff", eof=False))

    run(go())


def test_exactly_max_is_accepted() -> None:
    async def go() -> bytes:
        return await read_frame(_reader(encode_frame(b"x" * 100)), 100)

    assert run(go()) == b"x" * 100


def test_encode_refuses_oversize() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame(b"x" * 11, max_size=10)


@pytest.mark.parametrize(
    "data",
    [b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x05abc", b"\x00\x00\x00\x05"],
)
def test_truncation(data: bytes) -> None:
    async def go() -> None:
        with pytest.raises(asyncio.IncompleteReadError):
            await read_frame(_reader(data), 100)

    run(go())


def test_clean_eof_between_frames() -> None:
    async def go() -> None:
        reader = _reader(encode_frame(b"last"))
        assert await read_frame(reader) == b"last"
        with pytest.raises(asyncio.IncompleteReadError) as info:
            await read_frame(reader)
        assert info.value.partial == b""

    run(go())


def test_write_frame_over_tcp() -> None:
    async def go() -> list[bytes]:
        received: list[bytes] = []
        done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    received.append(await read_frame(reader))
            except asyncio.IncompleteReadError:
                done.set()
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            await write_frame(writer, b"one")
            await write_frame(writer, b"")
            await write_frame(writer, b"z" * 100_000)
            writer.close()
            await writer.wait_closed()
            await done.wait()
        return received

    assert run(go()) == [b"one", b"", b"z" * 100_000]


# -- FrameConnection: frames received straight into their buffers, over real TLS ---------


def _tls_pair(tmp_path: Any) -> tuple[Any, Any]:
    from meshscale.transport.tls import client_context, server_context
    from meshscale.trust.bundle import init_bundle, issue_node_cert, load_bundle

    bundle = load_bundle(init_bundle(tmp_path / "bundle").path)
    scert, skey = issue_node_cert(bundle, "server", ["127.0.0.1"])
    ccert, ckey = issue_node_cert(bundle, "client", ["127.0.0.1"])
    return server_context(bundle, scert, skey), client_context(bundle, ccert, ckey)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_frame_connection_over_tls(tmp_path: Any, loop: str) -> None:
    """Greeting in clear, then TLS; small frames (several may share one TLS record),
    large ones (received into their own buffer), an oversized one, and the peer closing."""
    from meshscale.transport.framing import open_frames
    from meshscale.transport.tls import GREETING

    sctx, cctx = _tls_pair(tmp_path)
    sizes = [0, 1, 5, 70_000, 300_000, 3 << 20, 12]

    async def go() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(GREETING)  # the greeting and the TLS handshake, as a node does
            await writer.drain()
            await writer.start_tls(sctx)
            await read_frame(reader)  # the client's go
            # All frames at once, so several small ones arrive in one read.
            writer.write(b"".join(encode_frame(bytes([n % 251]) * n, max_size=1 << 23)
                                  for n in sizes))
            await writer.drain()
            await read_frame(reader)
            writer.write(struct.pack(">I", 1 << 30))  # oversized: refused, never read
            await writer.drain()
            await read_frame(reader)  # until the client closes

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = await open_frames("127.0.0.1", port, cctx, 4 << 20, greeting=GREETING)
        await conn.write_frame(b"go")
        for n in sizes:
            frame = await conn.read_frame()
            assert bytes(frame) == bytes([n % 251]) * n
        await conn.write_frame(b"next")
        with pytest.raises(FrameTooLarge):
            await conn.read_frame()
        assert conn.is_closing()
        conn.close()
        await conn.wait_closed()
        server.close()

    if loop == "uvloop":
        import uvloop

        uvloop.run(asyncio.wait_for(go(), 20))
    else:
        run(go())


def test_frame_connection_refuses_a_stranger(tmp_path: Any) -> None:
    from meshscale.transport.framing import open_frames

    _, cctx = _tls_pair(tmp_path)

    async def go() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ConnectionError, match="not a meshscale node"):
            await open_frames("127.0.0.1", port, cctx, 1 << 20, greeting=b"MSH1")
        server.close()

    run(go())


def test_a_node_of_another_wire_version_is_refused_by_name(tmp_path: Path) -> None:
    """Old and new nodes are not mixed: a node whose greeting carries another version
    is refused with both versions named, by the node-to-node path and by RPC clients."""
    from meshscale.core.wire import PROTOCOL_VERSION
    from meshscale.transport.framing import open_frames
    from meshscale.transport.rpc import RpcConnection, RpcError
    from meshscale.transport.tls import GREETING, VersionMismatch, connect_tls

    _, cctx = _tls_pair(tmp_path)
    old = b"MSH" + str(PROTOCOL_VERSION - 1).encode()
    assert old != GREETING

    async def go() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(old)
            await writer.drain()
            await asyncio.sleep(0.5)
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(VersionMismatch, match=f"wire version {PROTOCOL_VERSION - 1}, "
                                                  f"this side {PROTOCOL_VERSION}"):
            await open_frames("127.0.0.1", port, cctx, 1 << 20, greeting=GREETING)
        with pytest.raises(VersionMismatch, match="upgrades all at once"):
            await connect_tls("127.0.0.1", port, cctx)

        class _Creds:
            ssl_context = cctx
            token = None

        conn = RpcConnection(f"127.0.0.1:{port}", _Creds(), timeout=5)  # type: ignore[arg-type]
        with pytest.raises(RpcError, match="same version"):
            await conn.call("members")
        await conn.close()
        server.close()

    run(go())


# -- FrameConnection's receive buffer: small while the frames are (issue #19) -------------


def _feed(sizes: list[int], chunks: list[int]) -> tuple[list[bytes], list[int]]:
    """Frames of ``sizes`` received by a server-side ``FrameConnection`` in reads of at
    most ``chunks`` bytes each (cycled) and at most what it offers, as a transport reads:
    the frames it delivers and its receive buffer's size after each read."""
    from meshscale.transport.framing import FrameConnection

    data = b"".join(encode_frame(bytes([n % 251]) * n, max_size=1 << 20) for n in sizes)

    async def go() -> tuple[list[bytes], list[int]]:
        conn = FrameConnection(1 << 20, server=True)
        frames: list[bytes] = []
        buffers: list[int] = []
        pos = i = 0
        while pos < len(data):
            view = conn.get_buffer(-1)
            assert len(view) > 0
            n = min(len(view), chunks[i % len(chunks)], len(data) - pos)
            view[:n] = data[pos : pos + n]
            del view
            conn.buffer_updated(n)
            pos += n
            i += 1
            buffers.append(len(conn._small))
            while conn._frames:
                frames.append(bytes(await conn.read_frame()))
        return frames, buffers

    return run(go())


@settings(deadline=None, max_examples=60)
@given(st.lists(st.one_of(st.integers(0, 9_000), st.integers(9_000, 90_000)), max_size=6),
       st.lists(st.one_of(st.integers(1, 8), st.integers(9, 70_000)), min_size=1, max_size=5))
def test_frames_survive_any_reads_as_the_receive_buffer_grows(sizes: list[int],
                                                              chunks: list[int]) -> None:
    from meshscale.transport.framing import FrameConnection

    frames, buffers = _feed(sizes, chunks)
    assert frames == [bytes([n % 251]) * n for n in sizes]
    assert all(FrameConnection._FIRST <= b <= FrameConnection._SMALL for b in buffers)


def test_a_connection_of_small_frames_keeps_a_small_receive_buffer() -> None:
    """Each open connection holds its receive buffer, resident: one that carries small
    frames (a node's long-held connections to members, mostly) keeps 4 kB, not 64 kB;
    frames of up to 64 kB still go through it, as before, once they come."""
    frames, buffers = _feed([100, 0, 3000, 200] * 20, [500, 1500, 1, 2000])
    assert len(frames) == 80
    assert max(buffers) <= 4096
    frames, buffers = _feed([100, 30_000, 100], [500])
    assert frames[1] == bytes([30_000 % 251]) * 30_000
    assert buffers[-1] == 32 * 1024  # grown to fit the frame, no further
    frames, buffers = _feed([100] * 3000, [70_000])  # reads filling it: it doubles, to 64 kB
    assert len(frames) == 3000
    assert buffers[:5] == [8192, 16384, 32768, 65536, 65536]
