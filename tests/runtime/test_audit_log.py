"""The audit trail on disk (runtime/audit.py): batched appends off the event loop,
rotation that keeps the chain, the bound on segments, reopening after a restart, signed
heads, and a verifier that names the segment and entry a tampered file broke."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshscale.core.api.audit import AuditQuery
from meshscale.core.audit import HASH_BYTES, BreakKind, HeadClaim, Kind, split_records
from meshscale.runtime.audit import AuditLog, parse_head, sign_head, verify_head
from meshscale.runtime.config import AuditConfig
from waiting import wait_for

SMALL = AuditConfig(segment_bytes=4096, max_segments=1000, flush_entries=16, fsync=False)


def fill(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.append(Kind.COPY_MADE if i % 2 else Kind.PUT, f"b3-{i:08d}", who="admin",
                   role="admin", data_class="pii" if i % 3 == 0 else "", from_region="eu",
                   to_region="us")
    assert log.wait_flushed(10)


def opened(tmp_path: Path, cfg: AuditConfig = SMALL) -> AuditLog:
    log = AuditLog(tmp_path / "audit", "n1", cfg)
    log.open()
    return log


def test_appends_rotate_and_the_chain_runs_across_segments(tmp_path: Path) -> None:
    log = opened(tmp_path)
    fill(log, 300)
    segs = log.segments()
    assert len(segs) > 5 and all(s.size <= 4096 + 2048 for s in segs)
    out = log.verify()
    assert out.broke is None and out.entries == 300 and out.first_seq == 1 \
        and out.last_seq == 300 and out.segments == len(segs)
    rows = log.query(AuditQuery(subject="b3-00000007"))
    assert [(r.seq, r.kind) for r in rows.rows] == [(8, "copy_made")] and not rows.more
    page = log.query(AuditQuery(data_class="pii", limit=10))
    assert len(page.rows) == 10 and page.more and all(r.data_class == "pii" for r in page.rows)
    nxt = log.query(AuditQuery(data_class="pii", limit=10, after_seq=page.rows[-1].seq))
    assert nxt.rows[0].seq > page.rows[-1].seq
    log.close()


def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    log = opened(tmp_path)
    fill(log, 50)
    head = (log.seq, log.hash)
    log.close()
    log2 = opened(tmp_path)
    assert (log2.seq, log2.hash) == head
    fill(log2, 50, start=50)
    out = log2.verify([HeadClaim(head[0], head[1])])
    assert out.broke is None and out.last_seq == 100 and out.heads_matched == 1
    log2.close()


def test_segments_beyond_the_bound_are_deleted_and_what_is_kept_verifies(tmp_path: Path) -> None:
    log = opened(tmp_path, AuditConfig(segment_bytes=2048, max_segments=3, flush_entries=8,
                                       fsync=False))
    fill(log, 400)
    segs = log.segments()
    assert len(segs) == 3 and segs[0].number > 1
    early = HeadClaim(5, b"\0" * 32)  # rotated away: cannot be checked, is not a break
    out = log.verify([early])
    assert out.broke is None and out.first_seq is not None and out.first_seq > 1
    assert out.heads_older_than_kept == 1 and out.last_seq == 400
    log.close()


def test_a_flipped_byte_names_the_segment_and_entry(tmp_path: Path) -> None:
    log = opened(tmp_path)
    fill(log, 200)
    log.close()
    segs = log.segments()
    victim = segs[2]
    data = bytearray(victim.path.read_bytes())
    records = split_records(bytes(data))[0]
    off = records[4][0]
    data[off + 4 + 10] ^= 0x01  # inside entry 4's encoded bytes
    victim.path.write_bytes(bytes(data))
    out = AuditLog(tmp_path / "audit", "n1", SMALL).verify()
    assert out.broke is not None
    assert (out.segment, out.index, out.offset) == (victim.path.name, 4, off)
    assert out.broke.kind in (BreakKind.BAD_HASH, BreakKind.BAD_ENCODING)


def test_truncation_on_a_record_boundary_is_caught_by_a_signed_head(tmp_path: Path) -> None:
    log = opened(tmp_path)
    fill(log, 100)
    key = ec.generate_private_key(ec.SECP256R1())
    head = sign_head(key, "n1", log.flushed_seq, log.flushed_hash, 1_700_000_000)
    log.close()
    last = log.segments()[-1]
    records = split_records(last.path.read_bytes())[0]
    with open(last.path, "r+b") as f:
        f.truncate(records[-3][0])  # drop the last three entries, cleanly
    claim = verify_head(key.public_key(), "n1", head)
    reopened = opened(tmp_path)
    assert reopened.seq == 97
    out = reopened.verify([claim])
    assert out.broke is not None and out.broke.kind is BreakKind.HEAD_BEYOND_END
    assert out.broke.seq == 100 and "ends at seq 97" in out.broke.detail
    assert reopened.verify().broke is None  # on its own the chain looks whole
    reopened.close()


def test_a_partial_record_left_by_a_crash_is_removed_at_open(tmp_path: Path) -> None:
    log = opened(tmp_path)
    fill(log, 20)
    log.close()
    last = log.segments()[-1]
    size = last.path.stat().st_size
    with open(last.path, "ab") as f:
        f.write(b"\x00\x00\x01\x00partial")
    log2 = opened(tmp_path)
    assert log2.seq == 20 and log2.stats["partial_tail_removed"] == 1
    assert last.path.stat().st_size == size
    assert last.path.with_name(last.path.name + ".cut").read_bytes() == b"\x00\x00\x01\x00partial"
    fill(log2, 5, start=20)
    assert log2.verify().broke is None
    log2.close()


def test_signed_heads_check_their_signer_and_shape() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    head = sign_head(key, "n1", 42, b"h" * HASH_BYTES, 1_700_000_000)
    assert len(head) < 200
    assert parse_head(head)[:3] == (42, 1_700_000_000, b"h" * HASH_BYTES)
    assert verify_head(key.public_key(), "n1", head).seq == 42
    with pytest.raises(ValueError, match="not signed"):
        verify_head(other.public_key(), "n1", head)
    with pytest.raises(ValueError, match="not signed"):
        verify_head(key.public_key(), "n2", head)  # another node's name
    with pytest.raises(ValueError, match="malformed"):
        parse_head("not-base64!")


def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit", "n1", AuditConfig(max_pending_entries=5))
    # Not opened: no writer thread drains the queue.
    seqs = [log.append(Kind.READ, "x") for _ in range(8)]
    assert seqs == [1, 2, 3, 4, 5, 0, 0, 0] and log.stats["dropped"] == 3


class _Agent:
    """What ``AuditService`` uses of a node: enough to drive it without sockets."""

    def __init__(self, data_dir: Path, name: str = "n1") -> None:
        from types import SimpleNamespace

        from meshscale.runtime.config import AgentConfig
        from meshscale.trust.certs import Role, issue_cert, make_ca

        ca_cert, ca_key = make_ca("c1")
        cert, key = issue_cert(ca_cert, ca_key, name, Role.NODE)
        self.name, self.data_dir = name, data_dir
        self.cfg = AgentConfig()
        self.bundle = SimpleNamespace(cert_pem=cert, key_pem=key)
        self.meta = SimpleNamespace(region="eu-west")
        self.membership = None
        self.tags: dict[str, str] = {}
        self.served: list[str] = []

    def log(self, *a: object, **k: object) -> None: ...

    def log_limited(self, *a: object, **k: object) -> None: ...

    def set_tag(self, key: str, value: str) -> None:
        self.tags[key] = value

    def serve(self, method: object, handler: object) -> None:
        self.served.append(str(method))

    def spawn(self, coro: object) -> None:
        coro.close()  # type: ignore[attr-defined]


def test_the_service_signs_gossips_and_remembers_the_highest_heads(tmp_path: Path) -> None:
    import asyncio

    from meshscale.core.api.audit import VerifyRequest
    from meshscale.runtime.audit import HEAD_TAG, AuditService

    agent = _Agent(tmp_path)
    svc = AuditService(agent)

    async def run() -> None:
        await svc.start()
        svc.record(Kind.PUT, "b3-x", who="admin", role="admin", data_class="pii")
        await asyncio.to_thread(svc.log.wait_flushed, 10)
        svc.sign_now()
        head = agent.tags[HEAD_TAG]
        assert parse_head(head)[0] == 1 and svc.own_head == head
        # The node checks heads against its own key: its own passes, a forged one not.
        ok = await svc._rpc_verify(VerifyRequest(heads=[head]))
        assert ok.ok and ok.heads_matched == 1
        forged = sign_head(ec.generate_private_key(ec.SECP256R1()), "n1", 1, b"x" * 32, 1)
        bad = await svc._rpc_verify(VerifyRequest(heads=[forged]))
        assert not bad.ok and len(bad.heads_bad) == 1
        await svc.stop()

    asyncio.run(run())
    key = ec.generate_private_key(ec.SECP256R1())
    h5 = sign_head(key, "n2", 5, b"a" * 32, 10)
    h3 = sign_head(key, "n2", 3, b"b" * 32, 11)
    svc.remember("n2", h5)
    svc.remember("n2", h3)  # older: kept is the one further along
    svc.remember("n3", "garbage")
    assert svc.seen == {"n2": h5}
    svc._save_seen()
    again = AuditService(agent)
    again._load_seen()
    assert again.seen == {"n2": h5}


class CountingCondition(threading.Condition):
    """Notes the timeout of each wait of the writer thread."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        return super().wait(timeout)


def test_an_idle_writer_sleeps_until_an_entry_comes(tmp_path: Path) -> None:
    """Issue #19: with nothing pending the writer thread woke every flush_interval_s
    (20 times a second). Now it waits with no timeout, and the first entry appended
    wakes it: on disk within a flush interval (here a day: only the wake-up can do it)."""
    log = AuditLog(tmp_path / "audit", "n1", AuditConfig(flush_interval_s=0.001, fsync=False))
    cond = log._cond = CountingCondition()
    log.open()
    try:
        wait_for(lambda: cond.timeouts, 10, "the writer's first wait", poll=0.01)
        assert cond.timeouts[0] is None, cond.timeouts
        assert len(cond.timeouts) == 1, "the idle writer woke on a timer"
        seq = log.append(Kind.PUT, "b3-0", who="admin", role="admin")
        wait_for(lambda: log.flushed_seq >= seq, 10, "the entry on disk", poll=0.01)
    finally:
        log.close()


def test_the_first_entry_waits_for_a_batch_at_most_a_flush_interval(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit", "n1", AuditConfig(flush_interval_s=86_400.0,
                                                         flush_entries=4, fsync=False))
    log.open()
    try:
        for i in range(3):
            log.append(Kind.PUT, f"b3-{i}", who="admin", role="admin")
        assert log.flushed_seq == 0  # gathering (a day) until the batch is full
        log.append(Kind.PUT, "b3-3", who="admin", role="admin")
        wait_for(lambda: log.flushed_seq >= 4, 10, "the full batch on disk", poll=0.01)
        log.append(Kind.PUT, "b3-4", who="admin", role="admin")
        assert log.wait_flushed(10)  # asked: written without gathering
    finally:
        log.close()
