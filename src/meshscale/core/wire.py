"""Wire envelope shared by every datagram protocol.

A datagram is one MessagePack array ``[version, [msg, msg, ...]]`` where each ``msg`` is
a tagged msgspec Struct encoded on its own. Encoding messages one by one lets a sender
pack as many as fit in one datagram (memberlist's "compound message") and lets a receiver
drop one malformed message without losing the rest. Sizes are checked before decoding:
nothing oversized is parsed.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

M = TypeVar("M")

PROTOCOL_VERSION = 3
"""The version of the whole wire contract: gossip envelopes, stream messages and the
greeting a node sends before TLS (``transport/tls.GREETING``). Nodes and clients of two
versions are never mixed: a mesh upgrades all at once, and a peer of another version is
refused, with a message naming both versions (greeting) or a counted, logged ``version``
rejection (gossip, stream frames). Bump it with any change a peer of the previous
version would misread."""

# Bytes the envelope adds around its messages: fixarray(2) + version (<=2 bytes)
# + array16 header (3 bytes). A conservative constant keeps the packer simple.
ENVELOPE_OVERHEAD = 6


DECODE_ERRORS: tuple[type[BaseException], ...] = (
    msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, RecursionError)
"""What decoding hostile bytes can raise. RecursionError is among them: a small frame
nested a thousand deep exhausts the parser's stack (a fuzzer found 1,396 such inputs)."""


def wire_bytes(value: object, field: str) -> bytes:
    """``value`` as bytes if it is bytes already; ``ValueError`` naming ``field`` if not.
    Checked before anything is allocated: ``bytes(300000000)`` from a peer's integer
    would be 300 MB of zeros, and ``bytes(10**12)`` a MemoryError."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise ValueError(f"{field!r} must be bytes, not {type(value).__name__}")


class WireError(Exception):
    """A payload that cannot be accepted; ``reason`` is a short counter label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_envelope_decoder = msgspec.msgpack.Decoder(tuple[int, list[msgspec.Raw]])


# fixarray(2), then the version as MessagePack encodes it.
_ENVELOPE_PREFIX = b"\x92" + msgspec.msgpack.encode(PROTOCOL_VERSION)
_ENVELOPE_HEADS = tuple(_ENVELOPE_PREFIX + bytes([0x90 | n]) for n in range(16))


def encode_envelope(messages: list[bytes]) -> bytes:
    """Wrap already-encoded messages into one datagram payload: exactly the bytes of
    ``msgspec.msgpack.encode((PROTOCOL_VERSION, [Raw(m) for m in messages]))``, built
    by hand because every datagram of every node goes through here."""
    return envelope_head(len(messages)) + b"".join(messages)


def envelope_head(n: int) -> bytes:
    """The bytes an envelope of ``n`` messages starts with (their encodings follow)."""
    if n < 16:
        return _ENVELOPE_HEADS[n]
    if n <= 0xFFFF:
        return _ENVELOPE_PREFIX + b"\xdc" + n.to_bytes(2, "big")
    return _ENVELOPE_PREFIX + b"\xdd" + n.to_bytes(4, "big")


MAX_ENVELOPE_MESSAGES = 256
"""Most messages one datagram may carry (``decode_envelope``'s default)."""


def decode_envelope(payload: bytes, max_size: int,
                    max_messages: int = MAX_ENVELOPE_MESSAGES) -> list[msgspec.Raw]:
    """Split a datagram payload into its raw messages, or raise ``WireError``."""
    if len(payload) > max_size:
        raise WireError("oversized", f"{len(payload)} > {max_size} bytes")
    try:
        version, raws = _envelope_decoder.decode(payload)
    except DECODE_ERRORS as exc:
        raise WireError("malformed", str(exc)) from None
    if version != PROTOCOL_VERSION:
        raise WireError("version", f"protocol version {version}, expected {PROTOCOL_VERSION}")
    if len(raws) > max_messages:
        raise WireError("oversized", f"{len(raws)} messages > {max_messages}")
    return raws


class VersionedCodec(Generic[M]):
    """One message per payload, ``[version, message]``: the stream protocols' framing
    (replication, scheduling). ``decode`` checks the size before parsing and raises
    ``WireError`` with reason oversized, malformed or version."""

    def __init__(self, name: str, version: int, message_type: Any) -> None:
        self.name = name
        self.version = version
        self._outer = msgspec.msgpack.Decoder(tuple[int, msgspec.Raw])
        self._inner: msgspec.msgpack.Decoder[M] = msgspec.msgpack.Decoder(message_type)
        # Sets in a fixed order: the bytes of a message must not depend on the string
        # hash seed (a simulator's trace hashes them; the same seed gives the same run).
        self._encoder = msgspec.msgpack.Encoder(order="deterministic")

    def encode(self, msg: M) -> bytes:
        return self._encoder.encode((self.version, msg))

    def decode(self, data: bytes, max_size: int) -> M:
        if len(data) > max_size:
            raise WireError("oversized", f"{len(data)} > {max_size} bytes")
        try:
            version, raw = self._outer.decode(data)
        except DECODE_ERRORS as exc:
            raise WireError("malformed", str(exc)) from None
        if version != self.version:
            raise WireError("version", f"{self.name} version {version}, expected {self.version}")
        try:
            return self._inner.decode(raw)
        except DECODE_ERRORS as exc:
            raise WireError("malformed", str(exc)) from None
