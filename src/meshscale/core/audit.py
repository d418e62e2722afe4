"""The audit trail's format and its checks, sans-I/O: entries, their canonical encoding,
the hash chain, signed chain heads, and a verifier that says which entry broke.

A node appends one ``AuditEntry`` per act it performs on data (a put it coordinated, a
copy it stored or dropped, a read it served, a delete, a refusal, ...). Entries form a
hash chain, as in a certificate-transparency log or git, without the tree: each entry
carries ``prev``, the BLAKE3 hash of the entry before it, so changing, removing or
reordering one breaks every link after it. An entry is stored as a record:

    u32 length (big-endian) | entry (MessagePack, array form) | BLAKE3(entry) (32 bytes)

The record's own hash locates damage exactly: a flipped byte anywhere in entry ``i`` makes
entry ``i``'s hash disagree with its bytes, not only ``i + 1``'s link. The encoding is
canonical (``encode_entry``; a decoded entry must encode to the same bytes), so two
byte strings never stand for one entry.

The chain alone cannot tell a log whose last entries were cut off from one that simply
ended there, nor a log rewritten from some point on with fresh hashes. So a node signs its
chain head, ``(node, seq, hash)``, now and then and gossips it; other nodes remember the
highest head they saw. A log whose entry at a remembered head's ``seq`` has another hash
was rewritten; a log that ends before it was truncated. (The signature itself is made and
checked by the driver, with the node's certificate key; this module only defines what is
signed, ``head_payload``.)

Departures from a transparency log: no Merkle tree (an auditor reads the whole chain; no
inclusion proofs), and rotation drops the oldest segments (bounded disk), so a head older
than what is kept can no longer be checked: the verifier says so instead of failing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

import msgspec
from blake3 import blake3

__all__ = ["HASH_BYTES", "MAX_ENTRY_BYTES", "ZERO_HASH", "AuditEntry", "Break", "BreakKind",
           "ChainVerifier", "HeadCheck", "HeadClaim", "HeadPayload", "Kind", "encode_entry",
           "entry_hash", "head_payload", "parse_head_payload", "record_of", "split_records",
           "verify_records"]

HASH_BYTES = 32
ZERO_HASH = bytes(HASH_BYTES)
"""``prev`` of a chain's first entry."""
MAX_ENTRY_BYTES = 8192
"""Largest encoded entry (every text field is bounded: at most 2 * 256 + 6 * 128 characters of
up to 4 UTF-8 bytes each, plus the numbers)."""
_LEN = struct.Struct(">I")
HEAD_VERSION = 1

Text = Annotated[str, msgspec.Meta(max_length=256)]
Short = Annotated[str, msgspec.Meta(max_length=128)]
Hash = Annotated[bytes, msgspec.Meta(min_length=HASH_BYTES, max_length=HASH_BYTES)]
Seq = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]


class Kind(StrEnum):
    """What a node did."""

    PUT = "put"
    """Coordinated a client's put (``to_region``: the regions of the copies)."""
    COPY_MADE = "copy_made"
    """Stored a copy (``from_region``: the sender's; ``to_region``: its own)."""
    COPY_DROPPED = "copy_dropped"
    READ = "read"
    TASK_RUN = "task_run"
    OPERATOR_PLACED = "operator_placed"
    DELETE = "delete"
    POLICY_CHANGE = "policy_change"
    REFUSAL = "refusal"
    ERASE = "erase"
    """Coordinated an erasure (subject: the receipt id; detail: what it covered and the
    receipt's hash), or, on a holder, confirmed its copies of one gone."""


class AuditEntry(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One act, as the node that performed it records it."""

    seq: Seq
    """Position in the node's chain, from 1, without gaps."""
    prev: Hash
    """BLAKE3 of the previous entry's bytes (``ZERO_HASH`` for seq 1)."""
    kind: Kind
    who: Short
    """The certificate name of whoever asked (a client or a node); "" for the node's own
    background work (repair, expiry)."""
    role: Short
    """That certificate's role (``admin``, ``read-only``, ``node``), or ""."""
    subject: Text
    """The object id or key."""
    data_class: Short
    from_region: Short
    to_region: Short
    hlc: Short
    """The node's hybrid logical clock at the act (``HLCTimestamp.encode``)."""
    wall_s: float
    """Wall clock at the act (seconds since the epoch)."""
    detail: Text
    """Why, for a refusal (the rule); else free text such as the copy's size."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AuditEntry)


def encode_entry(entry: AuditEntry) -> bytes:
    """The canonical bytes of ``entry``."""
    return _encoder.encode(entry)


def entry_hash(encoded: bytes) -> bytes:
    return blake3(encoded).digest()


def record_of(encoded: bytes) -> bytes:
    """An encoded entry as it is stored: length, bytes, hash."""
    assert len(encoded) <= MAX_ENTRY_BYTES, len(encoded)
    return _LEN.pack(len(encoded)) + encoded + entry_hash(encoded)


def split_records(buf: bytes) -> tuple[list[tuple[int, bytes]], int | None]:
    """The records in ``buf`` as ``(offset, record_without_length)``, and the offset of a
    trailing piece that is not a whole record (None if ``buf`` ends on a record). A length
    beyond ``MAX_ENTRY_BYTES`` ends the split there too: nothing after it can be framed."""
    out: list[tuple[int, bytes]] = []
    pos, end = 0, len(buf)
    while pos < end:
        if end - pos < _LEN.size:
            return out, pos
        (n,) = _LEN.unpack_from(buf, pos)
        if n > MAX_ENTRY_BYTES or end - pos - _LEN.size < n + HASH_BYTES:
            return out, pos
        out.append((pos, buf[pos + _LEN.size : pos + _LEN.size + n + HASH_BYTES]))
        pos += _LEN.size + n + HASH_BYTES
    return out, None


class BreakKind(StrEnum):
    BAD_ENCODING = "bad_encoding"
    """The bytes are not a (canonically encoded) entry."""
    BAD_HASH = "bad_hash"
    """The entry's bytes do not hash to the hash stored with them."""
    BAD_LINK = "bad_link"
    """``prev`` is not the hash of the entry before."""
    GAP = "gap"
    """A seq is missing (an entry removed)."""
    OUT_OF_ORDER = "out_of_order"
    """A seq at or below the one before (entries reordered or repeated)."""
    TRUNCATED_RECORD = "truncated_record"
    """The log ends in the middle of a record (or a record's length is impossible)."""
    HEAD_MISMATCH = "head_mismatch"
    """A signed head names this seq with another hash: the log was rewritten."""
    HEAD_BEYOND_END = "head_beyond_end"
    """A signed head names a seq past the log's end: entries were cut off."""


@dataclass(frozen=True)
class Break:
    """Where and why a chain broke: the first problem found."""

    kind: BreakKind
    index: int
    """Position of the entry (or record) in what was fed, from 0."""
    seq: int | None
    """The seq of the entry at fault, or the one expected there."""
    detail: str

    def describe(self) -> str:
        at = f"entry {self.index}" + ("" if self.seq is None else f" (seq {self.seq})")
        return f"{at}: {self.kind.value}: {self.detail}"


@dataclass(frozen=True)
class HeadClaim:
    """A chain head someone signed: at ``seq`` the chain's hash was ``hash``."""

    seq: int
    hash: bytes
    wall_s: float = 0.0


@dataclass
class HeadCheck:
    """What became of the heads a verifier was given."""

    matched: int = 0
    older_than_kept: int = 0
    """Heads at a seq before the oldest entry kept (rotated away): not checkable."""


class ChainVerifier:
    """Checks a chain fed one record at a time (``feed``), then ``finish``. Stops at the
    first break. ``anchor``: the hash the first fed entry must link to (None: whatever it
    carries, as for a log whose oldest segments were rotated away); ``heads``: signed heads
    to check the chain against."""

    def __init__(self, *, anchor: bytes | None = None,
                 heads: Sequence[HeadClaim] = ()) -> None:
        self.anchor = anchor
        self.index = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.last_hash: bytes | None = None
        self.bytes_checked = 0
        self.broke: Break | None = None
        self._heads: dict[int, list[HeadClaim]] = {}
        for h in heads:
            self._heads.setdefault(h.seq, []).append(h)
        self.heads = HeadCheck()

    def _fail(self, kind: BreakKind, seq: int | None, detail: str) -> None:
        self.broke = Break(kind, self.index, seq, detail)

    def feed(self, record: bytes) -> AuditEntry | None:
        """One record (without its length prefix); the entry if it checks out, None once
        the chain is broken."""
        if self.broke is not None:
            return None
        expected = None if self.last_seq is None else self.last_seq + 1
        encoded, stored = record[:-HASH_BYTES], record[-HASH_BYTES:]
        try:
            entry = _decoder.decode(encoded)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError):
            entry = None
        if entry is None or encode_entry(entry) != encoded:
            self._fail(BreakKind.BAD_ENCODING, expected, "not a well-formed entry")
            return None
        digest = entry_hash(encoded)
        if digest != stored:
            self._fail(BreakKind.BAD_HASH, entry.seq,
                       "its bytes do not match the hash stored with them (altered)")
            return None
        if expected is not None and entry.seq != expected:
            if entry.seq > expected:
                self._fail(BreakKind.GAP, expected,
                           f"seq {expected} is missing (next entry is seq {entry.seq})")
            else:
                self._fail(BreakKind.OUT_OF_ORDER, entry.seq,
                           f"seq {entry.seq} comes after seq {self.last_seq}")
            return None
        link = self.last_hash if self.last_hash is not None else self.anchor
        if link is not None and entry.prev != link:
            self._fail(BreakKind.BAD_LINK, entry.seq,
                       "its prev hash is not the hash of the entry before")
            return None
        for h in self._heads.pop(entry.seq, ()):
            if h.hash != digest:
                self._fail(BreakKind.HEAD_MISMATCH, entry.seq,
                           f"a head signed at wall time {h.wall_s:.0f} has another hash "
                           "for this seq (the log was rewritten)")
                return None
            self.heads.matched += 1
        if self.first_seq is None:
            self.first_seq = entry.seq
        self.last_seq, self.last_hash = entry.seq, digest
        self.index += 1
        self.bytes_checked += len(record) + _LEN.size
        return entry

    def truncated(self, detail: str) -> None:
        """The input ended inside a record."""
        if self.broke is None:
            seq = None if self.last_seq is None else self.last_seq + 1
            self._fail(BreakKind.TRUNCATED_RECORD, seq, detail)

    def finish(self) -> Break | None:
        """The first break, heads past the end included; counts heads rotated away."""
        if self.broke is not None:
            return self.broke
        first = self.first_seq
        for seq in sorted(self._heads):
            if first is not None and seq < first:
                self.heads.older_than_kept += len(self._heads[seq])
                continue
            end = "an empty log" if self.last_seq is None else f"seq {self.last_seq}"
            self._fail(BreakKind.HEAD_BEYOND_END, seq,
                       f"a signed head names seq {seq} but the log ends at {end} "
                       "(entries were cut off)")
            return self.broke
        self._heads.clear()
        return None


def verify_records(records: Iterable[bytes], *, anchor: bytes | None = ZERO_HASH,
                   heads: Sequence[HeadClaim] = ()) -> Break | None:
    """Check a whole chain (records without length prefixes); the first break or None."""
    v = ChainVerifier(anchor=anchor, heads=heads)
    for r in records:
        if v.feed(r) is None:
            break
    return v.finish()


class HeadPayload(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What a node signs: at ``seq`` its chain's hash was ``hash``."""

    version: int
    node: Short
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    hash: bytes
    wall_s: float


_head_decoder = msgspec.msgpack.Decoder(HeadPayload)


def head_payload(node: str, seq: int, digest: bytes, wall_s: float) -> bytes:
    """The bytes a node signs for its chain head."""
    return _encoder.encode(HeadPayload(HEAD_VERSION, node, seq, digest, float(wall_s)))


def parse_head_payload(payload: bytes) -> HeadPayload:
    """``head_payload``'s bytes back; ``ValueError`` if they are not."""
    try:
        head = _head_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
        raise ValueError(f"malformed audit head: {e}") from None
    if head.version != HEAD_VERSION or len(head.hash) != HASH_BYTES:
        raise ValueError("audit head of an unknown version")
    return head

