"""Length-prefixed frames over asyncio streams: a 4-byte big-endian length, then the payload.

The length is checked against a bound before any of the body is read, so a peer cannot
make us buffer more than ``max_size`` bytes by announcing a huge frame.
"""

from __future__ import annotations

import asyncio
import struct

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


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); ValueError if malformed."""
    host, sep, port_s = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"invalid address {addr!r}: use HOST:PORT")
    return host, int(port_s)
