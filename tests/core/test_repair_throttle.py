"""Repair copies limited while the node runs tasks (issue #19: a crash's re-replication
must not take the cores the remaining tasks need; Ceph's recovery limits).

``ReplicaManager.set_foreground_busy``: busy, and for ``foreground_quiet_s`` after, at
most ``max_concurrent_transfers_busy`` repair transfers run and each sends at
``repair_busy_bytes_per_s`` (``repair_delay_s``); once quiet, the queued ones start up to
``max_concurrent_transfers``. ``core.pacing.ByteRate`` is the bucket."""

from __future__ import annotations

import random

import pytest

from meshscale.core.pacing import ByteRate
from meshscale.core.placement import Candidate
from meshscale.core.replication import (
    DigestMsg,
    DigestReply,
    ObjectPolicy,
    Offer,
    OfferReply,
    ReplicaManager,
    ReplicationConfig,
    SendMessage,
    Transfer,
    decode_message,
    encode_message,
)

VIEW = [Candidate(n, n[:2], n + "-z") for n in ("eu1", "eu2", "us1", "us2", "ap1")]
OIDS = [f"o{i}" for i in range(12)]
MB = 1 << 20


def transfers(outs: list[object]) -> list[Transfer]:
    return [o for o in outs if isinstance(o, Transfer)]


def repairs_asked(cfg: ReplicationConfig, busy: bool) -> tuple[ReplicaManager, list[Transfer]]:
    """us1 holds every object (5 replicas over 5 nodes); ap1 says it misses all of them.
    The manager is told ``busy`` before ap1's answer; the transfers it starts then."""
    m = ReplicaManager("us1", config=cfg, rng=random.Random(7), now=0.0)
    m.set_view(VIEW, 0.0)
    m.drain()
    for o in OIDS:
        m.object_added(o, ObjectPolicy(5), None, 0.0)
    m.on_timer(m.next_deadline())
    digests = {}
    for out in m.drain():
        if isinstance(out, SendMessage):
            msg = decode_message(out.payload, 1 << 20)
            if isinstance(msg, DigestMsg):
                digests[out.dst] = msg
    m.set_foreground_busy(busy, 1.0)
    m.handle_message("ap1", encode_message(DigestReply(digests["ap1"].round, False)), 1.0)
    (offer_out,) = [o for o in m.drain() if isinstance(o, SendMessage)]
    offer = decode_message(offer_out.payload, 1 << 20)
    assert isinstance(offer, Offer)
    m.handle_message("ap1", encode_message(OfferReply(offer.round, offer.page, OIDS, [])), 1.1)
    return m, transfers(m.drain())


CFG = ReplicationConfig(max_concurrent_transfers=4, max_concurrent_transfers_busy=1,
                        foreground_quiet_s=2.0, sync_interval_s=60.0)


def test_an_idle_node_starts_repairs_up_to_its_full_limit() -> None:
    m, ts = repairs_asked(CFG, busy=False)
    assert len(ts) == 4 and all(t.dst == "ap1" and t.req_id is None for t in ts)
    assert not m.throttled(1.1)
    assert m.repair_delay_s(64 * MB, 1.1) == 0.0


def test_a_busy_node_runs_one_repair_at_a_time_then_all_once_quiet() -> None:
    m, ts = repairs_asked(CFG, busy=True)
    assert len(ts) == 1
    # Each transfer that ends starts the next one, still one at a time.
    m.transfer_done(None, "ap1", ts[0].oid, True, 1.5)
    (nxt,) = transfers(m.drain())
    # The tasks end: the limit holds for the quiet period, whose end is a deadline.
    m.set_foreground_busy(False, 2.0)
    m.transfer_done(None, "ap1", nxt.oid, True, 2.5)
    assert len(transfers(m.drain())) == 1
    assert m.throttled(3.9) and not m.throttled(4.0)
    assert m.next_deadline() == 4.0
    m.on_timer(4.0)
    assert len(transfers(m.drain())) == 3  # 4 at once, one still in flight
    assert m.next_deadline() > 4.0  # the quiet period's deadline is gone


def test_work_again_within_the_quiet_period_keeps_the_limit() -> None:
    m, ts = repairs_asked(CFG, busy=True)
    m.set_foreground_busy(False, 2.0)
    m.set_foreground_busy(True, 3.0)
    m.on_timer(4.0)
    m.transfer_done(None, "ap1", ts[0].oid, True, 4.1)
    assert len(transfers(m.drain())) == 1
    assert m.throttled(100.0)


def test_becoming_busy_starts_no_more_but_stops_none() -> None:
    m, ts = repairs_asked(CFG, busy=False)
    m.set_foreground_busy(True, 1.2)
    for t in ts[:3]:
        m.transfer_done(None, "ap1", t.oid, True, 1.3)
    assert transfers(m.drain()) == []  # 1 still in flight: at the busy limit
    m.transfer_done(None, "ap1", ts[3].oid, True, 1.4)
    assert len(transfers(m.drain())) == 1


def test_a_busy_node_paces_its_repair_bytes_at_the_configured_rate() -> None:
    cfg = ReplicationConfig(repair_busy_bytes_per_s=16 * MB, repair_burst_bytes=4 * MB,
                            foreground_quiet_s=0.0)
    m = ReplicaManager("us1", config=cfg, rng=random.Random(1), now=0.0)
    m.set_foreground_busy(True, 0.0)
    now, chunk = 10.0, 4 * MB
    for _ in range(17):  # 68 MB: the first chunk goes from the burst, 64 MB at 16 MB/s
        now += m.repair_delay_s(chunk, now)
    assert now == pytest.approx(14.0)
    m.set_foreground_busy(False, now)
    assert m.repair_delay_s(64 * MB, now) == 0.0


def test_no_rate_leaves_a_busy_node_unpaced() -> None:
    cfg = ReplicationConfig(repair_busy_bytes_per_s=0)
    m = ReplicaManager("us1", config=cfg, rng=random.Random(1), now=0.0)
    m.set_foreground_busy(True, 0.0)
    assert m.repair_delay_s(1 << 30, 0.0) == 0.0


def test_byte_rate_holds_its_rate_and_burst() -> None:
    r = ByteRate(1000.0, 500)
    assert r.take(0.0, 500) == 0.0  # the burst
    assert r.take(0.0, 1000) == pytest.approx(1.0)  # 1,000 more: a second of debt
    # The debt is paid by the wait: at 1.0 the bucket is empty, not refilled.
    assert r.take(1.0, 100) == pytest.approx(0.1)
    # A long pause refills only up to the burst.
    assert r.take(100.0, 500) == 0.0
    assert r.take(100.0, 1) > 0.0
    # A clock that goes back does not mint bytes.
    r2 = ByteRate(1000.0, 10)
    r2.take(5.0, 10)
    assert r2.take(4.0, 10) == pytest.approx(0.01)


@pytest.mark.parametrize("kw", [
    {"max_concurrent_transfers_busy": 0}, {"max_concurrent_transfers": 0},
    {"repair_busy_bytes_per_s": -1}, {"repair_burst_bytes": 0},
    {"foreground_quiet_s": -1.0}, {"foreground_quiet_s": float("nan")},
])
def test_bad_limits_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ReplicationConfig(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("rate,burst", [(0.0, 1), (float("inf"), 1), (1.0, 0)])
def test_byte_rate_refuses_bad_bounds(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        ByteRate(rate, burst)
