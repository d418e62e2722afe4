"""Hostile inputs for every decoder a peer's bytes reach, from a seeded generator: mutations
of valid messages, random MessagePack values shaped like ours, random bytes, and deep
nesting. Shared by ``tests/core/test_decoder_fuzz.py`` and ``bench/fuzz.py``.

``DECODERS`` maps a name to a function of the bytes that either returns or raises the
decoder's one documented error (``WireError``); the membership protocol never raises
(it counts and drops), so its entries call it and return.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from meshscale.core import replication, scheduling
from meshscale.core.membership import (
    Ack,
    Alive,
    Dead,
    Membership,
    NodeMeta,
    Ping,
    PushPull,
    Revoke,
    Suspect,
)
from meshscale.core.rpc import (
    STREAM_PROTOCOL_VERSION,
    PushPullFrame,
    RpcRequest,
    RpcResponse,
    decode_stream_message,
    encode_stream_message,
)
from meshscale.core.wire import decode_envelope, encode_envelope

MAX_STREAM_BYTES = 8 * 1024 * 1024
MAX_DATAGRAM_BYTES = 1400
_enc = msgspec.msgpack.encode


def nested(depth: int) -> bytes:
    """A MessagePack value nested ``depth`` arrays deep (a few bytes per level)."""
    return b"\x91" * depth + b"\xc0"


def _membership() -> Membership:
    return Membership("fuzz-target", "10.0.0.1:7946", NodeMeta(region="r"),
                      rng=random.Random(0), now=0.0, verify_revocation=lambda b: None)


MEMBER = _membership()


def _datagram(data: bytes) -> None:
    MEMBER.handle_datagram("10.0.0.2:7946", data, 1.0)
    MEMBER.drain()


def _stream(data: bytes) -> None:
    MEMBER.handle_stream("10.0.0.2:7946", data, 1.0)
    MEMBER.drain()


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "stream_message": lambda d: decode_stream_message(d, MAX_STREAM_BYTES),
    "envelope": lambda d: decode_envelope(d, MAX_DATAGRAM_BYTES),
    "replication": lambda d: replication.decode_message(d, MAX_STREAM_BYTES),
    "scheduling": lambda d: scheduling.decode_message(d, MAX_STREAM_BYTES),
    "membership_datagram": _datagram,
    "membership_push_pull": _stream,
}


def _seeds(name: str) -> list[bytes]:
    """Valid (or near-valid) messages for ``name`` to mutate."""
    meta = NodeMeta(region="eu-west", zone="z1", labels={"a": "b"}, tags={"http": "x:1"})
    gossip = [_enc(Ping(1, "b", "a", "10.0.0.1:7946")), _enc(Ack(1, "b")),
              _enc(Alive("n1", 3, "10.0.0.3:7946", meta)), _enc(Suspect("n1", 3, "n2")),
              _enc(Dead("n1", 3, "n2")), _enc(Revoke(b"entry"))]
    if name == "stream_message":
        return [encode_stream_message(RpcRequest(7, "obj.read", "", {"id": "b3-00", "offset": 0})),
                encode_stream_message(RpcResponse(7, True, {"x": [1, 2]})),
                encode_stream_message(PushPullFrame(b"\x00" * 40))]
    if name in ("envelope", "membership_datagram"):
        return [encode_envelope(gossip[i:i + 3]) for i in range(len(gossip))]
    if name == "membership_push_pull":
        from meshscale.core.membership import NodeState

        return [_enc(PushPull("n2", True, [NodeState("n2", "10.0.0.2:7946", 1, 0, meta)], []))]
    # replication / scheduling: [version, [tag, fields...]]
    return [_enc((1, [tag, "n1", 5, [b"x", "y"], {"k": 1}])) for tag in range(1, 8)]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.randrange(-2**63, 2**64)
    if kind == 1:
        return rng.choice(["", "x" * rng.randrange(300), "n1", "b3-" + "0" * 64, "\udcff"[:0]])
    if kind == 2:
        return rng.randbytes(rng.randrange(64))
    if kind == 3:
        return rng.random() * 1e300
    if kind == 4:
        return rng.choice([None, True, False])
    if kind == 5:
        return rng.randrange(16)
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    if kind == 7:
        return {str(_random_value(rng, depth + 1))[:20]: _random_value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return [rng.randrange(1, 12), *(_random_value(rng, depth + 1) for _ in range(rng.randrange(6)))]


def _version(name: str) -> int:
    """The version the decoder ``name`` accepts (stream frames carry the wire version;
    the replication and scheduling codecs their own)."""
    return STREAM_PROTOCOL_VERSION if name == "stream_message" else 1


def _mutate(rng: random.Random, data: bytes, version: int = 1) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(6)
        if op == 0 and b:  # flip a bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # truncate
            del b[rng.randrange(len(b)):]
        elif op == 2:  # insert bytes (often a type marker)
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc1",
                                 b"\x91" * 50, rng.randbytes(rng.randrange(1, 9))])
        elif op == 3 and b:  # overwrite a byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 4 and len(b) > 2:  # duplicate a slice
            i = rng.randrange(len(b))
            b[i:i] = b[i:i + rng.randrange(1, 40)]
        else:  # replace the value under the version with a random one
            b = bytearray(_enc((version, _random_value(rng))))
    return bytes(b)


def inputs(name: str, rng: random.Random, n: int) -> Iterator[bytes]:
    """``n`` hostile inputs for decoder ``name``."""
    seeds = _seeds(name)
    v = _version(name)
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            yield _mutate(rng, rng.choice(seeds), v)
        elif r < 0.8:
            yield _enc((rng.choice([v, v, v, 0, v + 1, -1]), _random_value(rng)))
        elif r < 0.95:
            yield rng.randbytes(rng.randrange(0, 400))
        else:
            deep = nested(rng.choice([100, 1000, 3000]))
            yield _enc((v, msgspec.Raw(deep))) if rng.random() < 0.5 else encode_envelope([deep])
