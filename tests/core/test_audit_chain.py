"""The audit chain (core/audit.py): encoding, links, and a verifier that finds and locates
every single flipped byte, dropped entry, swapped pair and truncation."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale.core.audit import (
    HASH_BYTES,
    ZERO_HASH,
    AuditEntry,
    Break,
    BreakKind,
    ChainVerifier,
    HeadClaim,
    Kind,
    encode_entry,
    entry_hash,
    head_payload,
    parse_head_payload,
    record_of,
    split_records,
    verify_records,
)


def chain(n: int, start_seq: int = 1, prev: bytes = ZERO_HASH) -> list[bytes]:
    """``n`` framed records, linked."""
    out = []
    for i in range(n):
        e = AuditEntry(seq=start_seq + i, prev=prev, kind=list(Kind)[i % len(Kind)],
                       who=f"client-{i % 3}", role="admin", subject=f"b3-{i:064x}",
                       data_class="pii" if i % 2 else "", from_region="eu-west",
                       to_region="eu-central", hlc=f"{i:016x}-00000000-n1", wall_s=1e9 + i,
                       detail="")
        enc = encode_entry(e)
        prev = entry_hash(enc)
        out.append(record_of(enc))
    return out


def verify_buf(buf: bytes, heads: Sequence[HeadClaim] = ()) -> tuple[int, Break | None]:
    records, tail = split_records(buf)
    v = ChainVerifier(anchor=ZERO_HASH, heads=heads)
    for _, r in records:
        if v.feed(r) is None:
            break
    if tail is not None:
        v.truncated(f"partial record at byte {tail}")
    return v.index, v.finish()


def test_a_good_chain_verifies_and_its_head_matches() -> None:
    recs = chain(20)
    buf = b"".join(recs)
    last = split_records(buf)[0][-1][1]
    head = HeadClaim(20, last[-HASH_BYTES:])
    n, broke = verify_buf(buf, [head])
    assert broke is None and n == 20


def test_encoding_is_canonical_and_bounded() -> None:
    recs = chain(1)
    body = split_records(recs[0])[0][0][1][:-HASH_BYTES]
    assert encode_entry(msgspec.msgpack.decode(body, type=AuditEntry)) == body
    # The same entry written another way (a map, not an array) is refused.
    as_map = msgspec.msgpack.encode(msgspec.structs.asdict(
        msgspec.msgpack.decode(body, type=AuditEntry)))
    assert verify_records([as_map + entry_hash(as_map)]) is not None
    with pytest.raises(AssertionError):
        record_of(b"x" * 9000)


def test_head_payload_round_trips_and_rejects_garbage() -> None:
    p = head_payload("n1", 7, b"x" * 32, 12.0)
    h = parse_head_payload(p)
    assert (h.node, h.seq, h.hash, h.wall_s) == ("n1", 7, b"x" * 32, 12.0)
    with pytest.raises(ValueError):
        parse_head_payload(b"\x01\x02")
    with pytest.raises(ValueError):
        parse_head_payload(head_payload("n1", 7, b"short", 1.0))


def test_rotated_chain_verifies_with_no_anchor_and_says_old_heads_are_unchecked() -> None:
    recs = chain(10)
    tail = [split_records(r)[0][0][1] for r in recs[5:]]
    v = ChainVerifier(anchor=None, heads=[HeadClaim(2, b"\0" * 32)])
    for r in tail:
        assert v.feed(r) is not None
    assert v.finish() is None and v.heads.older_than_kept == 1
    assert verify_records(tail) is not None  # with the genesis anchor it is a bad link


N = 12
RECS = chain(N)
OFFSETS = [0]
for r in RECS:
    OFFSETS.append(OFFSETS[-1] + len(r))
BUF = b"".join(RECS)
HEAD = HeadClaim(N, RECS[-1][-HASH_BYTES:])


def record_at(byte: int) -> int:
    return max(i for i in range(N) if OFFSETS[i] <= byte)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(BUF) - 1), st.integers(1, 255))
def test_any_flipped_byte_is_found_in_its_entry(pos: int, xor: int) -> None:
    bad = bytearray(BUF)
    bad[pos] ^= xor
    _, broke = verify_buf(bytes(bad), [HEAD])
    assert broke is not None
    i = record_at(pos)
    # The entry that holds the byte is the one named (a corrupted length prefix can only
    # be named where framing fails: that record, since everything before it is intact).
    assert broke.index == i, (pos, broke)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, N - 1))
def test_a_dropped_entry_is_found(i: int) -> None:
    buf = b"".join(r for j, r in enumerate(RECS) if j != i)
    _, broke = verify_buf(buf, [HEAD])
    assert broke is not None
    if i == N - 1:
        assert broke.kind is BreakKind.HEAD_BEYOND_END and broke.seq == N
    else:
        assert broke.index == i
        assert broke.kind in (BreakKind.GAP, BreakKind.BAD_LINK)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, N - 2))
def test_a_swapped_pair_is_found(i: int) -> None:
    recs = list(RECS)
    recs[i], recs[i + 1] = recs[i + 1], recs[i]
    _, broke = verify_buf(b"".join(recs), [HEAD])
    assert broke is not None and broke.index == i


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(BUF) - 1))
def test_any_truncation_is_found(cut: int) -> None:
    _, broke = verify_buf(BUF[:cut], [HEAD])
    assert broke is not None
    if cut in OFFSETS:  # on a record boundary: only the signed head knows
        assert broke.kind is BreakKind.HEAD_BEYOND_END
    else:
        assert broke.kind is BreakKind.TRUNCATED_RECORD
        assert broke.index == record_at(cut)


def test_a_rewritten_chain_with_fresh_hashes_is_caught_by_the_head() -> None:
    forged = chain(N)
    e = AuditEntry(seq=N, prev=split_records(forged[-2])[0][0][1][-HASH_BYTES:],
                   kind=Kind.READ, who="x", role="", subject="s", data_class="",
                   from_region="", to_region="", hlc="", wall_s=0.0, detail="forged")
    forged[-1] = record_of(encode_entry(e))
    assert verify_buf(b"".join(forged))[1] is None  # consistent on its own
    _, broke = verify_buf(b"".join(forged), [HEAD])
    assert broke is not None and broke.kind is BreakKind.HEAD_MISMATCH
    assert broke.seq == N
