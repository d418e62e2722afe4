"""Length-prefixed frames over asyncio streams: a 4-byte big-endian length, then the payload.

The length is checked against a bound before any of the body is read, so a peer cannot
make us buffer more than ``max_size`` bytes by announcing a huge frame.

``read_frame`` / ``write_frame`` work on asyncio streams (the node's server side);
``FrameConnection`` (``open_frames``) is the client side of RPC connections, which
receives each large frame straight into a buffer of its own.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections import deque

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
MAX_FRAME = 4 * 1024 * 1024
_LENGTH_LIMIT = 2**32 - 1
_JOIN_BELOW = 64 * 1024
"""Frames up to this size are written in one piece (one TLS record, one syscall)."""


class FrameTooLarge(Exception):
    """A frame's announced (or requested) length exceeds the bound."""

    def __init__(self, size: int, max_size: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {max_size}")
        self.size = size
        self.max_size = max_size


def encode_frame(payload: bytes, *, max_size: int = MAX_FRAME) -> bytes:
    """``payload`` with its length prefix; refuses frames the peer would refuse."""
    size = len(payload)
    if size > min(max_size, _LENGTH_LIMIT):
        raise FrameTooLarge(size, max_size)
    return HEADER.pack(size) + payload


async def read_frame(
    reader: asyncio.StreamReader, max_size: int = MAX_FRAME
) -> bytes | bytearray:
    """Read one frame.

    Raises ``FrameTooLarge`` (the body is left unread: close the connection) or
    ``asyncio.IncompleteReadError`` if the stream ends early. An ``IncompleteReadError``
    whose ``partial`` is empty means the peer closed cleanly between frames.
    """
    header = await reader.readexactly(HEADER_SIZE)
    (size,) = HEADER.unpack(header)
    if size > max_size:
        raise FrameTooLarge(size, max_size)
    if size <= _JOIN_BELOW:
        return await reader.readexactly(size)
    # A large body is gathered piece by piece into one buffer of its size:
    # ``readexactly`` would grow the reader's own buffer to the whole frame, and that growth
    # copies the body over and over (it was most of a replica's CPU on a 4 MB chunk).
    body = bytearray(size)
    view = memoryview(body)
    got = 0
    while got < size:
        piece = await reader.read(size - got)
        if not piece:
            raise asyncio.IncompleteReadError(bytes(view[:got]), size)
        view[got : got + len(piece)] = piece
        got += len(piece)
    return body


async def write_frame(
    writer: asyncio.StreamWriter, payload: bytes, *, max_size: int = MAX_FRAME
) -> None:
    """Write one frame and wait for the transport's buffer to drain (back-pressure)."""
    if len(payload) <= _JOIN_BELOW:
        writer.write(encode_frame(payload, max_size=max_size))
    else:
        # A large body goes as it is: joining it to its header would copy it once more.
        size = len(payload)
        if size > min(max_size, _LENGTH_LIMIT):
            raise FrameTooLarge(size, max_size)
        writer.write(HEADER.pack(size))
        writer.write(payload)
    await writer.drain()


class FrameConnection(asyncio.BufferedProtocol):
    """A connection that receives frames straight into buffers of their own (the client
    side of RPC connections, and the node's server side with ``server=True``: no greeting
    to read, the server writes it).

    With ``asyncio.StreamReader`` a large frame is copied four times after TLS decrypted
    it (joined, appended to the reader's buffer, read out of it, gathered into the body);
    as a buffered protocol, TLS decrypts a large body directly into its final buffer and
    small frames are copied once, out of a small receive buffer. Open one with
    ``open_frames``; one reader at a time (``read_frame``). Reading pauses while a frame
    is waiting to be read, so a peer cannot make us queue more than one.

    The receive buffer starts at ``_FIRST`` bytes and doubles, up to ``_SMALL``, when one
    read fills half of it or more, or a frame to be received into it does not fit: a
    connection that only ever carries small frames (most of a node's, held open for long)
    keeps 4 kB resident instead of 64 kB (issue #19: an idle node of 20 holds 10-30).
    """

    _SMALL = 64 * 1024
    """The receive buffer's largest size: a frame of up to this many bytes (its header
    included) is received into it and copied out; a larger one into a buffer of its own."""
    _FIRST = 4 * 1024
    """The receive buffer's size when the connection opens."""

    def __init__(self, max_size: int, *, server: bool = False) -> None:
        self.max_size = max_size
        self.transport: asyncio.Transport | None = None
        self._small = bytearray(self._FIRST)
        self._small_view = memoryview(self._small)
        self._have = 0
        """Bytes received into ``_small`` and not parsed yet."""
        self._offered = 0
        """Free bytes of ``_small`` the last ``get_buffer`` offered."""
        self._body: bytearray | None = None
        self._body_got = 0
        self._frames: deque[bytes | bytearray] = deque()
        self._plain = not server
        """Before TLS: bytes are only collected, for ``read_greeting``."""
        self._greeting: tuple[int, asyncio.Future[bytes]] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused_writing = False
        self._reading_paused = False
        self._error: BaseException | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _closed_error(self) -> asyncio.IncompleteReadError:
        """The end of the stream: ``partial`` is what was received of a frame cut short
        (empty when the peer closed between frames)."""
        if self._body is not None:
            return asyncio.IncompleteReadError(bytes(self._body[: self._body_got]), None)
        partial = b"" if self._plain else bytes(self._small[: self._have])
        return asyncio.IncompleteReadError(partial, None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            self._error = exc if exc is not None else self._closed_error()
        self._wake()
        if self._greeting is not None and not self._greeting[1].done():
            self._greeting[1].set_exception(self._error)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("connection lost"))
        if not self._closed.done():
            self._closed.set_result(None)

    def eof_received(self) -> bool | None:
        if self._error is None:
            self._error = self._closed_error()
        self._wake()
        return None

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None:
            return memoryview(self._body)[self._body_got :]
        if self._have == len(self._small):
            self._grow(2 * self._have)
        view = self._small_view[self._have :]
        self._offered = len(view)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        if self._body is not None:
            self._body_got += nbytes
            if self._body_got == len(self._body):
                body, self._body = self._body, None
                self._deliver(body)
            return
        # One read filled what was offered, at least half the buffer: more is likely
        # waiting; take it in fewer, larger reads (a frame that does not fit makes room
        # for itself in ``_parse``).
        filled = nbytes == self._offered and 2 * nbytes >= len(self._small)
        self._have += nbytes
        if self._plain:
            if self._greeting is not None:
                size, fut = self._greeting
                if self._have >= size:
                    self._greeting = None
                    self._plain = False
                    if not fut.done():
                        fut.set_result(bytes(self._small[:size]))
                    self._consume(size)
        else:
            self._parse()
        if filled:
            self._grow(2 * len(self._small))

    # -- parsing

    def _grow(self, need: int) -> None:
        """Make the receive buffer at least ``need`` bytes (a power-of-two multiple of
        ``_FIRST``), at most ``_SMALL``, keeping what it holds. A new buffer: views of
        the old one may still be held by the transport."""
        size = len(self._small)
        while size < need and size < self._SMALL:
            size *= 2
        size = min(size, self._SMALL)
        if size <= len(self._small):
            return
        small = bytearray(size)
        small[: self._have] = self._small_view[: self._have]
        self._small, self._small_view = small, memoryview(small)

    def _consume(self, n: int) -> None:
        rest = self._have - n
        if rest:
            self._small[:rest] = self._small[n : self._have]
        self._have = rest

    def _parse(self) -> None:
        pos = 0
        while self._error is None and self._have - pos >= HEADER_SIZE:
            (size,) = HEADER.unpack_from(self._small, pos)
            if size > self.max_size:
                self._fail(FrameTooLarge(size, self.max_size))
                return
            start = pos + HEADER_SIZE
            avail = self._have - start
            if avail >= size:
                self._deliver(bytes(self._small_view[start : start + size]))
                pos = start + size
                continue
            if HEADER_SIZE + size > self._SMALL:
                # A large frame: the rest of it is received straight into its buffer.
                body = bytearray(size)
                body[:avail] = self._small_view[start : self._have]
                self._body, self._body_got = body, avail
                pos = self._have
            break
        self._consume(pos)
        if self._body is None and self._have >= HEADER_SIZE:
            # The frame begun at the buffer's start is received into it: make room.
            (size,) = HEADER.unpack_from(self._small, 0)
            self._grow(HEADER_SIZE + size)

    def _deliver(self, frame: bytes | bytearray) -> None:
        self._frames.append(frame)
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the caller's side

    async def read_greeting(self, size: int) -> bytes:
        """The first ``size`` bytes, in clear; frames are parsed from then on."""
        if self._have >= size:
            self._plain = False
            data = bytes(self._small[:size])
            self._consume(size)
            return data
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._greeting = (size, fut)
        return await fut

    async def read_frame(self) -> bytes | bytearray:
        """The next frame; ``FrameTooLarge``, ``asyncio.IncompleteReadError`` (closed) or
        the transport's error otherwise."""
        while not self._frames:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame = self._frames.popleft()
        if not self._frames and self._reading_paused and self.transport is not None:
            self._reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()
        return frame

    async def write_frame(self, payload: bytes, *, max_size: int = MAX_FRAME) -> None:
        """Write one frame and wait while the transport's buffer is full."""
        transport = self.transport
        if transport is None or self._error is not None:
            raise self._error or ConnectionResetError("not connected")
        size = len(payload)
        if size > min(max_size, _LENGTH_LIMIT):
            raise FrameTooLarge(size, max_size)
        if size <= _JOIN_BELOW:
            transport.write(HEADER.pack(size) + payload)
        else:
            transport.write(HEADER.pack(size))
            transport.write(payload)
        if self._paused_writing:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing() or self._error is not None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        await self._closed


async def open_frames(
    host: str, port: int, ctx: ssl.SSLContext, max_size: int, *,
    greeting: bytes, handshake_timeout: float = 5.0,
) -> FrameConnection:
    """Connect to a node: plain TCP, its greeting (see ``trust.tls.GREETING``), then TLS;
    frames of up to ``max_size`` bytes are received (``FrameConnection``)."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(lambda: FrameConnection(max_size), host, port)
    try:
        from meshscale.transport.tls import check_greeting

        check_greeting(await proto.read_greeting(len(greeting)), host, port, greeting)
        tls = await loop.start_tls(transport, proto, ctx, server_hostname=None,
                                   ssl_handshake_timeout=handshake_timeout)
    except BaseException:
        transport.abort()
        raise
    if tls is None:
        raise ConnectionError(f"{host}:{port}: TLS could not be started")
    proto.transport = tls
    return proto


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); ValueError if malformed."""
    host, sep, port_s = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"invalid address {addr!r}: use HOST:PORT")
    return host, int(port_s)
