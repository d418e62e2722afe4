"""Every decoder a peer's bytes reach, fed hostile input: each either decodes or raises its
one documented error (``WireError``; the membership protocol counts and drops instead).

A seeded generator (mutations of valid messages, random bytes, deep nesting) with a fresh
base seed per run, printed so a failure replays: ``MESHSCALE_FUZZ_SEED=N``.
``bench/fuzz.py`` runs the same generator over a million inputs.
"""

from __future__ import annotations

import os
import random

import msgspec
import pytest

from fuzzing import DECODERS, inputs, nested
from meshscale.core import replication, scheduling
from meshscale.core.membership import Membership, NodeMeta
from meshscale.core.rpc import STREAM_PROTOCOL_VERSION, decode_stream_message
from meshscale.core.wire import WireError, decode_envelope, encode_envelope

BASE_SEED = int(os.environ.get("MESHSCALE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
INPUTS_PER_DECODER = 3000


def test_print_seed() -> None:
    print(f"\ndecoder fuzz base seed: {BASE_SEED} (MESHSCALE_FUZZ_SEED={BASE_SEED} replays it)")


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_only_documented_errors(name: str) -> None:
    decode = DECODERS[name]
    rng = random.Random(f"{BASE_SEED}:{name}")
    for i, data in enumerate(inputs(name, rng, INPUTS_PER_DECODER)):
        try:
            decode(data)
        except WireError:
            pass
        except Exception as e:  # pragma: no cover - the failure this test exists for
            raise AssertionError(f"{name}: input #{i} (seed {BASE_SEED}) raised "
                                 f"{type(e).__name__}: {e!s:.200}; bytes {data[:80]!r}") from e


@pytest.mark.parametrize("depth", [200, 1000, 5000, 100_000])
def test_deep_nesting_is_malformed_not_a_crash(depth: int) -> None:
    """A 1 KB frame nested 1,000 deep used to raise RecursionError out of every decoder."""
    deep = nested(depth)
    for data, decode in (
        (msgspec.msgpack.encode((STREAM_PROTOCOL_VERSION, msgspec.Raw(deep))),
         lambda d: decode_stream_message(d, 1 << 20)),
        (encode_envelope([deep]), lambda d: decode_envelope(d, 1 << 20)),
        (msgspec.msgpack.encode((1, msgspec.Raw(deep))),
         lambda d: replication.decode_message(d, 1 << 20)),
        (msgspec.msgpack.encode((1, msgspec.Raw(deep))),
         lambda d: scheduling.decode_message(d, 1 << 20)),
    ):
        try:
            decode(data)
        except WireError as e:
            assert e.reason in ("malformed", "oversized")
    m = Membership("a", "a", NodeMeta(), rng=random.Random(1), now=0.0)
    m.handle_datagram("b", encode_envelope([deep])[: m.config.max_payload_bytes], 0.0)
    assert m.handle_stream("b", deep, 0.0) is None
    assert sum(v for k, v in m.stats.items() if k.startswith("rejected.")) >= 1
