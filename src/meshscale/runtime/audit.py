"""The node's audit trail on disk, its signed chain heads, and its RPCs.

``AuditLog`` appends entries (``core/audit.py``) to numbered segment files in
``DATA_DIR/audit/`` (``segment-00000001.log``, ...). ``append`` runs on the event loop and
only builds and hashes the entry (a few microseconds); a writer thread writes what is
pending in batches (every ``flush_interval_s`` or ``flush_entries``), fsyncs each batch,
and starts the next segment when one reaches ``segment_bytes``. The chain runs across
segments (a segment's first entry links to the previous segment's last), and segments
beyond ``max_segments`` are deleted oldest first, so the trail's disk use is bounded. A
restarted node reads its last segment's last record and continues the chain from it (a
record cut off by a crash is removed first, and logged).

``AuditService`` serves ``audit.query``, ``audit.verify`` and ``audit.heads``
(``core/api/audit.py``) and signs the chain head (``(node, seq, hash)``, ECDSA P-256 with
the node's certificate key) every ``head_interval_s``, once the entries it names are on
disk, and gossips it as the node's ``audit`` tag. Every node remembers the highest head it
has seen of every other node (kept in ``DATA_DIR/audit/heads_seen.json``), so a log that
was cut short or rewritten no longer matches a head signed earlier: ``meshscale audit
verify`` collects the remembered heads and hands them to the node they name, which checks
its chain against them (and that it signed them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from meshscale.core.api import Empty
from meshscale.core.api import audit as api
from meshscale.core.audit import (
    HASH_BYTES,
    ZERO_HASH,
    AuditEntry,
    Break,
    ChainVerifier,
    HeadClaim,
    Kind,
    encode_entry,
    entry_hash,
    head_payload,
    split_records,
)
from meshscale.core.hlc import HybridLogicalClock
from meshscale.runtime.config import AuditConfig
from meshscale.runtime.storage import StorageError

__all__ = ["AUDIT_DIR", "HEAD_TAG", "AuditLog", "AuditService", "parse_head", "sign_head",
           "verify_head"]

AUDIT_DIR = "audit"
HEADS_SEEN = "heads_seen.json"
HEAD_TAG = "audit"
"""The gossiped tag that carries a node's latest signed head."""
_SEGMENT = re.compile(r"^segment-(\d{8})\.log$")
_LEN = struct.Struct(">I")
_HEAD = struct.Struct(">QQ32s64s")
"""A signed head's text form, before base64: seq, wall clock (s), hash, signature r||s."""
_RETRY_S = 1.0
_MAX_HEADS_SEEN_BYTES = 4 * 1024 * 1024


# --------------------------------------------------------------------------- signed heads

def sign_head(key: ec.EllipticCurvePrivateKey, node: str, seq: int, digest: bytes,
              wall_s: int) -> str:
    """The signed head ``(node, seq, digest)`` as text (about 150 characters; the node's
    name is not in it: it is whose tag it rides in)."""
    der = key.sign(head_payload(node, seq, digest, float(wall_s)), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    raw = _HEAD.pack(seq, wall_s, digest, r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    return base64.urlsafe_b64encode(raw).decode()


def parse_head(text: str) -> tuple[int, int, bytes, bytes]:
    """``(seq, wall_s, hash, signature)`` of a head's text; ``ValueError`` if malformed."""
    try:
        raw = base64.urlsafe_b64decode(text.encode("ascii"))
        seq, wall, digest, sig = _HEAD.unpack(raw)
    except (ValueError, UnicodeEncodeError, struct.error):
        raise ValueError("malformed audit head") from None
    return int(seq), int(wall), bytes(digest), bytes(sig)


def verify_head(public: ec.EllipticCurvePublicKey, node: str, text: str) -> HeadClaim:
    """The claim in ``text`` if ``public`` (node ``node``'s key) signed it; ``ValueError``
    if not."""
    seq, wall, digest, sig = parse_head(text)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        public.verify(der, head_payload(node, seq, digest, float(wall)),
                      ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ValueError(f"audit head not signed by node {node!r}") from None
    return HeadClaim(seq, digest, float(wall))


# --------------------------------------------------------------------------- the log

@dataclass(frozen=True)
class _Segment:
    number: int
    path: Path
    size: int


@dataclass
class VerifyOutcome:
    """``AuditLog.verify``'s answer."""

    entries: int
    segments: int
    bytes: int
    first_seq: int | None
    last_seq: int | None
    broke: Break | None
    segment: str = ""
    index: int = 0
    offset: int = 0
    heads_matched: int = 0
    heads_older_than_kept: int = 0
    pending: int = 0


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n]


class AuditLog:
    """One node's append-only, hash-chained trail (see the module's docstring)."""

    def __init__(self, directory: Path, node: str, cfg: AuditConfig | None = None,
                 log: Callable[..., None] | None = None) -> None:
        self.dir = Path(directory)
        self.node = node
        self.cfg = cfg or AuditConfig()
        self._log = log
        self.hlc = HybridLogicalClock(node)
        self.stats: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._flush_now = False
        """Set by ``wait_flushed``: the writer writes what is pending without gathering."""
        self._io = threading.Lock()
        """Held while the files change (a write, a rotation), and while readers list them."""
        self._pending: list[tuple[int, bytes, bytes]] = []
        """(seq, hash, record) appended, not yet written."""
        self.seq = 0
        self.hash = ZERO_HASH
        """The last entry appended (perhaps not yet on disk)."""
        self.flushed_seq = 0
        self.flushed_hash = ZERO_HASH
        """The last entry on disk."""
        self._seg_no = 0
        self._seg_size = 0
        self._file: Any = None
        self._thread: threading.Thread | None = None
        self._closing = False

    # -- start and stop

    def open(self) -> None:
        """Find where the chain ends on disk and start the writer thread (blocking: call
        it in a thread from the event loop)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        segs = self.segments()
        for seg in reversed(segs):
            data = seg.path.read_bytes()
            records, tail = split_records(data)
            if tail is not None:
                # A record cut off (a crash mid-write, or a disk that filled): the chain
                # continues from the last whole record. The cut-off bytes are kept aside
                # (``*.cut``), not thrown away: if they were a tampered length rather than
                # a crash, what followed it is still there to look at.
                cut = seg.path.with_name(seg.path.name + ".cut")
                with open(cut, "ab") as out:
                    out.write(data[tail:])
                    os.fsync(out.fileno())
                with open(seg.path, "r+b") as f:
                    f.truncate(tail)
                    os.fsync(f.fileno())
                self.stats["partial_tail_removed"] += 1
                self._emit("warning", "audit_partial_tail_removed", segment=seg.path.name,
                           offset=tail, bytes=len(data) - tail, kept_in=cut.name)
            if self._seg_no == 0:
                self._seg_no, self._seg_size = seg.number, len(data) if tail is None else tail
            if records:
                last = records[-1][1]
                entry = msgspec.msgpack.decode(last[:-HASH_BYTES], type=AuditEntry)
                self.seq = self.flushed_seq = entry.seq
                self.hash = self.flushed_hash = last[-HASH_BYTES:]
                break
        self._thread = threading.Thread(target=self._run, name=f"audit-{self.node}",
                                        daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is pending and stop the writer thread (blocking)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        with self._io:
            if self._file is not None:
                self._file.close()
                self._file = None

    # -- appending (event loop)

    def append(self, kind: Kind, subject: str, *, who: str = "", role: str = "",
               data_class: str = "", from_region: str = "", to_region: str = "",
               detail: str = "", hlc: str | None = None,
               wall_s: float | None = None) -> int:
        """Record one act; its seq (0 if the queue is full and it was dropped)."""
        wall = time.time() if wall_s is None else wall_s
        with self._cond:
            if self._closing or len(self._pending) >= self.cfg.max_pending_entries:
                self.stats["dropped"] += 1
                return 0
            seq = self.seq + 1
            stamp = hlc if hlc is not None else self.hlc.now(wall).encode()
            entry = AuditEntry(
                seq=seq, prev=self.hash, kind=kind, who=_clip(who, 128), role=_clip(role, 128),
                subject=_clip(subject, 256), data_class=_clip(data_class, 128),
                from_region=_clip(from_region, 128), to_region=_clip(to_region, 128),
                hlc=_clip(stamp, 128), wall_s=wall, detail=_clip(detail, 256))
            encoded = encode_entry(entry)
            digest = entry_hash(encoded)
            self._pending.append((seq, digest, _LEN.pack(len(encoded)) + encoded + digest))
            self.seq, self.hash = seq, digest
            self.stats["appended"] += 1
            if len(self._pending) in (1, self.cfg.flush_entries):
                # The first wakes the writer from its idle wait (it then gathers a batch
                # for up to flush_interval_s); a full batch is written at once.
                self._cond.notify_all()
        return seq

    def wait_flushed(self, timeout_s: float = 10.0) -> bool:
        """Block until every entry appended so far is on disk (tests, benchmarks, stop)."""
        with self._cond:
            target = self.seq
            self._flush_now = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self.flushed_seq >= target, timeout_s)

    @property
    def pending(self) -> int:
        return self.seq - self.flushed_seq

    # -- the writer thread

    def _batch_ready(self) -> bool:
        return (self._closing or self._flush_now
                or len(self._pending) >= self.cfg.flush_entries)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._pending and not self._closing:
                    # Idle: sleep until the first entry (``append`` notifies), not a
                    # wake-up every flush_interval_s (issue #19); then gather a batch
                    # for up to flush_interval_s, so an entry is still on disk within
                    # that long, as before.
                    self._cond.wait_for(lambda: self._pending or self._closing)
                    self._cond.wait_for(self._batch_ready, self.cfg.flush_interval_s)
                self._flush_now = False
                batch, self._pending = self._pending, []
                closing = self._closing
            if batch:
                done = self._write(batch)
                if done:
                    with self._cond:
                        self.flushed_seq, self.flushed_hash = batch[done - 1][:2]
                        self._cond.notify_all()
                if done < len(batch):  # a write failed: retry the rest, in order
                    with self._cond:
                        self._pending[:0] = batch[done:]
                        if closing:
                            return
                        self._cond.wait(_RETRY_S)
                    continue
            if closing:
                with self._cond:
                    if not self._pending:
                        return

    def _write(self, batch: list[tuple[int, bytes, bytes]]) -> int:
        """Write ``batch`` (starting a new segment where one would grow past
        ``segment_bytes``); how many of its records are on disk."""
        done = 0
        with self._io:
            while done < len(batch):
                if self._file is None:
                    self._next_segment()
                room = self.cfg.segment_bytes - self._seg_size
                end, size = done, 0
                while end < len(batch) and (size + len(batch[end][2]) <= room
                                            or (end == done and self._seg_size == 0)):
                    size += len(batch[end][2])
                    end += 1
                if end == done:
                    self._next_segment()
                    continue
                data = b"".join(r[2] for r in batch[done:end])
                f = self._file
                pos = self._seg_size
                try:
                    f.write(data)
                    f.flush()
                    if self.cfg.fsync:
                        os.fsync(f.fileno())
                except OSError as e:
                    with contextlib.suppress(OSError):
                        f.truncate(pos)  # never leave part of a piece behind
                    self.stats["write_errors"] += 1
                    self._emit("error", "audit_write_failed", error=str(e.strerror or e))
                    return done
                self._seg_size += len(data)
                self.stats["written"] += end - done
                self.stats["bytes_written"] += len(data)
                self.stats["batches"] += 1
                done = end
        return done

    def _next_segment(self) -> None:
        if self._file is not None or self._seg_size >= self.cfg.segment_bytes:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._seg_no += 1
            self._seg_size = 0
            self.stats["rotations"] += 1
        elif self._seg_no == 0:
            self._seg_no = 1
        path = self._path(self._seg_no)
        self._file = open(path, "ab")  # noqa: SIM115 - kept open across batches
        self._seg_size = self._file.seek(0, os.SEEK_END)
        segs = self.segments()
        for old in segs[: max(0, len(segs) - self.cfg.max_segments)]:
            with contextlib.suppress(FileNotFoundError):
                old.path.unlink()
                self.stats["segments_deleted"] += 1

    def _path(self, number: int) -> Path:
        return self.dir / f"segment-{number:08d}.log"

    def _emit(self, level: str, event: str, **fields: Any) -> None:
        if self._log is not None:
            self._log(level, event, **fields)

    # -- reading (in a thread)

    def segments(self) -> list[_Segment]:
        """The segment files, oldest first."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for p in self.dir.iterdir():
                m = _SEGMENT.match(p.name)
                if m is not None:
                    with contextlib.suppress(FileNotFoundError):
                        out.append(_Segment(int(m.group(1)), p, p.stat().st_size))
        return sorted(out, key=lambda s: s.number)

    def _snapshot(self) -> list[_Segment]:
        """The segments as they are on disk now (the one being written: up to what the
        writer has finished)."""
        with self._io:
            segs = self.segments()
            return [_Segment(s.number, s.path, self._seg_size) if s.number == self._seg_no
                    and self._file is not None else s for s in segs]

    def _read(self) -> Iterator[tuple[_Segment, bytes]]:
        for seg in self._snapshot():
            try:
                with open(seg.path, "rb") as f:
                    yield seg, f.read(seg.size)
            except FileNotFoundError:
                continue  # rotated away while we read: the chain's start moved on

    def entries(self) -> Iterator[AuditEntry]:
        """Every entry on disk, oldest first, unchecked (``verify`` checks)."""
        for _, data in self._read():
            for _, rec in split_records(data)[0]:
                with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                    yield msgspec.msgpack.decode(rec[:-HASH_BYTES], type=AuditEntry)

    def query(self, q: api.AuditQuery) -> api.AuditRows:
        """The entries that match ``q``, oldest first, one page."""
        rows: list[api.AuditRow] = []
        scanned = 0
        needle = None if q.subject is None else q.subject.encode()
        for _, data in self._read():
            for _, rec in split_records(data)[0]:
                scanned += 1
                if needle is not None and needle not in rec:
                    continue  # cheap: most entries are about other objects
                try:
                    e = msgspec.msgpack.decode(rec[:-HASH_BYTES], type=AuditEntry)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if (e.seq <= q.after_seq or e.wall_s < q.since
                        or (q.subject is not None and e.subject != q.subject)
                        or (q.data_class is not None and e.data_class != q.data_class)
                        or (q.kind is not None and e.kind != q.kind)):
                    continue
                if len(rows) == q.limit:
                    return api.AuditRows(rows=rows, more=True, scanned=scanned)
                rows.append(api.AuditRow(
                    node=self.node, seq=e.seq, kind=e.kind.value, subject=e.subject,
                    wall_s=e.wall_s, hlc=e.hlc, who=e.who, role=e.role,
                    data_class=e.data_class, from_region=e.from_region,
                    to_region=e.to_region, detail=e.detail))
        return api.AuditRows(rows=rows, more=False, scanned=scanned)

    def verify(self, heads: list[HeadClaim] | None = None) -> VerifyOutcome:
        """Check the chain on disk (and against ``heads``); where it broke, if it did."""
        pending = self.pending
        segs = 0
        total = 0
        v: ChainVerifier | None = None
        where = ("", 0, 0)
        for seg, data in self._read():
            if v is None:
                # The first segment kept links to genesis only if none was rotated away.
                v = ChainVerifier(anchor=ZERO_HASH if seg.number == 1 else None,
                                  heads=heads or ())
            segs += 1
            total += len(data)
            records, tail = split_records(data)
            base = v.index
            for off, rec in records:
                if v.feed(rec) is None:
                    where = (seg.path.name, v.index - base, off)
                    break
            else:
                if tail is not None:
                    v.truncated(f"{len(data) - tail} bytes at its end are not a whole record")
                    where = (seg.path.name, v.index - base, tail)
                else:
                    where = (seg.path.name, v.index - base, len(data))
                    continue
            break
        if v is None:
            v = ChainVerifier(anchor=ZERO_HASH, heads=heads or ())
        broke = v.finish()
        return VerifyOutcome(
            entries=v.index, segments=segs, bytes=total, first_seq=v.first_seq,
            last_seq=v.last_seq, broke=broke, segment=where[0], index=where[1],
            offset=where[2], heads_matched=v.heads.matched,
            heads_older_than_kept=v.heads.older_than_kept, pending=pending)


# --------------------------------------------------------------------------- the service

class AuditService:
    """The audit trail of a running node: ``record`` (what the planes call), the RPCs,
    and the signed heads (signed, gossiped, remembered)."""

    def __init__(self, agent: Any) -> None:
        # ``agent``: the node as ``runtime/services.py`` describes it (not imported here:
        # services.py imports this module's ``AuditService`` for its type).
        self.agent = agent
        self.cfg: AuditConfig = agent.cfg.audit
        self.log = AuditLog(Path(agent.data_dir) / AUDIT_DIR, agent.name, self.cfg,
                            log=agent.log)
        key = serialization.load_pem_private_key(agent.bundle.key_pem, password=None)
        public = x509.load_pem_x509_certificate(agent.bundle.cert_pem).public_key()
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        self._key = key
        self._public = public
        self.own_head: str | None = None
        self._signed_seq = -1
        self.seen: dict[str, str] = {}
        """Node -> the highest signed head of its chain seen in gossip."""
        self._seen_seq: dict[str, int] = {}
        self._seen_dirty = False

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.log.open)
        except OSError as e:  # the node stops with one line naming the directory
            raise StorageError("corrupt", f"audit trail in {self.log.dir}: cannot open: "
                                          f"{e.strerror or e}") from None
        await asyncio.to_thread(self._load_seen)
        serve = self.agent.serve
        serve(api.QUERY, self._rpc_query)
        serve(api.VERIFY, self._rpc_verify)
        serve(api.HEADS, self._rpc_heads)
        self.agent.spawn(self._heads_loop())

    async def stop(self) -> None:
        await asyncio.to_thread(self.log.close)
        if self._seen_dirty:
            await asyncio.to_thread(self._save_seen)

    def record(self, kind: Kind, subject: str, *, who: str = "", role: str = "",
               data_class: str | None = "", from_region: str | None = None,
               to_region: str | None = None, detail: str = "") -> None:
        region = self.agent.meta.region
        self.log.append(kind, subject, who=who, role=role, data_class=data_class or "",
                        from_region=region if from_region is None else from_region,
                        to_region=region if to_region is None else to_region, detail=detail)

    # -- heads

    async def _heads_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.head_interval_s)
            self.sign_now()
            self._collect_seen()
            if self._seen_dirty:
                self._seen_dirty = False
                await asyncio.to_thread(self._save_seen)

    def sign_now(self) -> None:
        """Sign the head on disk and gossip it, if it moved since the last one."""
        seq, digest = self.log.flushed_seq, self.log.flushed_hash
        if seq == self._signed_seq or seq == 0:
            return
        head = sign_head(self._key, self.agent.name, seq, digest, int(time.time()))
        try:
            self.agent.set_tag(HEAD_TAG, head)
        except ValueError as e:  # the node's metadata would be over its bound
            self.log.stats["head_not_gossiped"] += 1
            self.agent.log_limited("audit_head_not_gossiped", error=str(e))
        self.own_head = head
        self._signed_seq = seq

    def _collect_seen(self) -> None:
        m = self.agent.membership
        if m is None:
            return
        for member in m.members.values():
            text = member.meta.tags.get(HEAD_TAG)
            if member.name == self.agent.name or not text:
                continue
            self.remember(member.name, text)

    def remember(self, node: str, text: str) -> None:
        """Keep ``text`` as ``node``'s head if it is further along than the one kept."""
        try:
            seq = parse_head(text)[0]
        except ValueError:
            return
        if seq <= self._seen_seq.get(node, -1):
            return
        if node not in self.seen and len(self.seen) >= self.cfg.max_heads_seen:
            return
        self.seen[node] = text
        self._seen_seq[node] = seq
        self._seen_dirty = True

    def _load_seen(self) -> None:
        path = self.log.dir / HEADS_SEEN
        try:
            raw = path.read_bytes()[:_MAX_HEADS_SEEN_BYTES]
            items = json.loads(raw)
        except (OSError, ValueError):
            return
        if isinstance(items, dict):
            for node, text in items.items():
                if isinstance(node, str) and isinstance(text, str):
                    self.remember(node, text)
        self._seen_dirty = False

    def _save_seen(self) -> None:
        path = self.log.dir / HEADS_SEEN
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(sorted(self.seen.items()))))
        os.replace(tmp, path)

    # -- RPCs

    async def _rpc_query(self, req: api.AuditQuery) -> api.AuditRows:
        await asyncio.to_thread(self.log.wait_flushed, 5.0)
        return await asyncio.to_thread(self.log.query, req)

    async def _rpc_verify(self, req: api.VerifyRequest) -> api.VerifyReply:
        claims: list[HeadClaim] = []
        bad: list[str] = []
        for text in req.heads:
            try:
                claims.append(verify_head(self._public, self.agent.name, text))
            except ValueError as e:
                bad.append(f"{text[:16]}...: {e}")
        await asyncio.to_thread(self.log.wait_flushed, 5.0)
        out = await asyncio.to_thread(self.log.verify, claims)
        broke = None if out.broke is None else api.AuditBreak(
            kind=out.broke.kind.value, segment=out.segment, index=out.index,
            offset=out.offset, detail=out.broke.detail, seq=out.broke.seq)
        return api.VerifyReply(
            node=self.agent.name, ok=broke is None and not bad, entries=out.entries,
            segments=out.segments, bytes=out.bytes, first_seq=out.first_seq,
            last_seq=out.last_seq, broke=broke, heads_matched=out.heads_matched,
            heads_older_than_kept=out.heads_older_than_kept, heads_bad=bad,
            pending=out.pending)

    def _rpc_heads(self, req: Empty) -> api.HeadsReply:
        return api.HeadsReply(own=self.own_head, seen=dict(self.seen))
