"""``sim.flows``: the stream plane's pull protocol, batches and a shared host, by the clock."""

from __future__ import annotations

import random

import pytest

from meshscale.sim.flows import FlowRecord, FlowRun, Path, Quantiles, draw


def _run(records: list[FlowRecord], *, cores: dict[str, int], region_of: dict[str, str],
         rtt_s: float = 0.1, hop_s: float = 0.0, host_cores: float = 0.0,
         hop_cpu_s: float = 0.0, background: float = 0.0, fetch_hop_s: float | None = None,
         reader_node: dict[str, str] | None = None, hops: Quantiles = (),
         fetch_hops: Quantiles = (), seed: int = 1) -> FlowRun:
    fr = FlowRun(seed, cores, region_of, lambda a, b: Path(rtt_s, 1e12),
                 {r: 0.002 for r in set(region_of.values())}, set(region_of.values()),
                 hop_overhead_s=hop_s, jitter=0.0, host_cores=host_cores,
                 hop_cpu_s=hop_cpu_s, host_background_jobs=background,
                 fetch_hop_s=fetch_hop_s, reader_node=reader_node or {},
                 hop_quantiles_s=hops, fetch_hop_quantiles_s=fetch_hops)
    fr.run(records)
    return fr


def _rec(t: float, site: str, node: str, region: str, *, cpu_s: float = 0.001,
         batch_cpu_s: float = 0.0, runner: str = "r") -> FlowRecord:
    return FlowRecord(t, site, node, region, 100, 10, cpu_s, runner=runner,
                      batch_cpu_s=batch_cpu_s)


def test_near_source_record_pays_its_hops_lan_and_cpu() -> None:
    rec = _rec(1.2, "a", "n0", "a", cpu_s=0.010, batch_cpu_s=0.005)
    _run([rec], cores={"n0": 1}, region_of={"n0": "a"}, hop_s=0.003)
    # publish (LAN + hop), batch to a worker (hop + 5 + 10 ms), the result read at its
    # holder by the consumer (another node of the region's: LAN + hop; issue 23).
    assert rec.done_s - rec.created_s == pytest.approx(2 * 0.001 + 3 * 0.003 + 0.015)
    assert rec.cross_region_bytes == 0


def _result_latency(reader: str, *, fetch_hop_s: float | None = None,
                    hop_cpu: bool = False) -> tuple[float, int]:
    """A near-source record of site a (runner on n0) whose result is read at site a
    through node ``reader``: its latency and the hop messages charged."""
    rec = _rec(1.2, "a", "n0", "a", cpu_s=0.010, batch_cpu_s=0.005)
    nodes = {"n0": "a", "n1": "a", "m0": "b"}
    rec.result_site = nodes[reader]
    fr = _run([rec], cores=dict.fromkeys(nodes, 1), region_of=nodes, hop_s=0.003,
              rtt_s=0.004, fetch_hop_s=fetch_hop_s, reader_node={nodes[reader]: reader},
              host_cores=64.0 if hop_cpu else 0.0, hop_cpu_s=1e-9 if hop_cpu else 0.0)
    return rec.done_s - rec.created_s, fr.hop_messages


def test_a_consumer_reads_results_as_direct_reads_decides() -> None:
    """``core.streams.direct_reads`` (the runtime subscription's rule): through another
    node of the holder's region the consumer reads at the holder, one hop; through the
    holder itself, its in-process follower and one hop; through a node of another
    region, that node's follower fetches across (2 ms one way, ``fetch_hop_s``), then
    the node answers the read (LAN + hop)."""
    before = 0.001 + 0.003 + 0.003 + 0.015  # publish (LAN + hop), hand-off, the call
    assert _result_latency("n1")[0] == pytest.approx(before + 0.001 + 0.003)
    assert _result_latency("n0")[0] == pytest.approx(before + 0.001 + 0.003)
    assert _result_latency("m0", fetch_hop_s=0.0005)[0] == pytest.approx(
        before + 0.002 + 0.0005 + 0.001 + 0.003)
    # unset, a node's fetch answer costs a hop
    assert _result_latency("m0")[0] == pytest.approx(before + 0.002 + 0.003 + 0.001 + 0.003)
    # messages: publish, hand-off, copy, then the read's answer (and the follower's)
    assert _result_latency("n1", hop_cpu=True)[1] == 4
    assert _result_latency("n0", hop_cpu=True)[1] == 4
    assert _result_latency("m0", hop_cpu=True)[1] == 5


def test_a_remote_runners_fetch_is_answered_node_to_node() -> None:
    """A central runner's fetch is a node's answer to another node (``stream.fetch``, as
    a follower's): ``fetch_hop_s``, not a client's hop."""
    def latency(fetch_hop_s: float | None) -> float:
        rec = _rec(1.3, "s", "c0", "c")
        _run([rec], cores={"s0": 1, "c0": 1}, region_of={"s0": "s", "c0": "c"},
             hop_s=0.003, fetch_hop_s=fetch_hop_s)
        return rec.done_s - rec.created_s

    # the runner's fetch and the result's follower: two node-to-node answers
    assert latency(0.001) - latency(None) == pytest.approx(2 * (0.001 - 0.003))


def test_a_record_that_misses_the_fetch_waits_one_round_trip_more() -> None:
    # The runner is in region c, 100 ms from the shard at site s; with nothing to fetch
    # its long-polls wait 0.5 s at the shard and come back empty, so from 1.25 s its
    # fetch waits there. Record a lands while it waits; record b lands just after that
    # fetch went back, so it waits for the runner's next fetch: one RTT (plus a's batch)
    # later; the copy of a's result to its backup travels beside the runner (issue 23).
    a = _rec(1.3, "s", "c0", "c")
    b = _rec(1.3 + 1e-6, "s", "c0", "c")
    _run([a, b], cores={"s0": 1, "c0": 1}, region_of={"s0": "s", "c0": "c"})
    lat_a, lat_b = a.done_s - a.created_s, b.done_s - b.created_s
    assert lat_a == pytest.approx(0.001 + 0.05 + 0.001 + 0.05 + 0.001, abs=1e-9)
    assert lat_b - lat_a == pytest.approx(0.1 + 0.001 - 1e-6, abs=1e-9)
    assert a.cross_region_bytes == b.cross_region_bytes == 110


def test_the_runner_fetches_again_without_waiting_for_its_outputs_copy() -> None:
    # Near-source, 3 ms a hop, 1 ms one way on the LAN. a lands on the waiting fetch and
    # runs (15 ms); b lands meanwhile and waits for the runner's next round, which
    # starts once a's batch is back from the worker (a hop). a's result's copy to the
    # output shard's backup (a hop and a LAN round trip) travels beside the runner: it
    # no longer holds the next fetch (issue 23; the runtime's _read_shard).
    a = _rec(1.2, "a", "n0", "a", cpu_s=0.010, batch_cpu_s=0.005)
    b = _rec(1.21, "a", "n0", "a", cpu_s=0.010, batch_cpu_s=0.005)
    _run([a, b], cores={"n0": 1}, region_of={"n0": "a"}, hop_s=0.003)
    assert b.done_s - a.done_s == pytest.approx(0.015 + 0.003, abs=1e-9)


def test_a_remote_runner_does_not_long_poll_while_its_outputs_copy_travels() -> None:
    # The runner is in region c, 50 ms one way from the shard at site s. a lands on its
    # waiting fetch at 1.301 and is back in c at 1.351; run (1 ms) and appended by
    # 1.352, a's outputs' copy to their backup in c takes a LAN round trip (2 ms). The
    # runner's next fetch, sent at once, carries no commit and does not wait: it finds
    # the shard empty at 1.402 and comes back at 1.452; the runner, its copy done, then
    # fetches again, long-polling, there at 1.502 (runtime.streams ``_read_shard``, issue
    # 23). b lands at 1.411, between the two: it waits for the second fetch, 91 ms;
    # a fetch that long-polled at once would have taken it as it landed.
    a = _rec(1.3, "s", "c0", "c")
    b = _rec(1.41, "s", "c0", "c")
    _run([a, b], cores={"s0": 1, "c0": 1}, region_of={"s0": "s", "c0": "c"})
    lat_a, lat_b = a.done_s - a.created_s, b.done_s - b.created_s
    assert lat_a == pytest.approx(0.001 + 0.05 + 0.001 + 0.05 + 0.001, abs=1e-9)
    assert lat_b - lat_a == pytest.approx(1.502 - 1.411, abs=1e-9)


def test_records_waiting_at_the_shard_run_as_one_call() -> None:
    recs = [_rec(1.2, "a", "n0", "a", cpu_s=0.002, batch_cpu_s=0.010) for _ in range(10)]
    fr = _run(recs, cores={"n0": 1}, region_of={"n0": "a"})
    # The first lands on the waiting fetch and runs alone; the nine others wait for it
    # and run as one call: two calls' fixed cost, not ten.
    assert fr.busy_s["n0"] == pytest.approx(2 * 0.010 + 10 * 0.002)
    assert recs[1].done_s == recs[9].done_s > recs[0].done_s


def test_jobs_on_a_shared_host_share_its_cores() -> None:
    def run(host_cores: float) -> list[float]:
        recs = [_rec(1.2, "a", "n0", "a", cpu_s=1.0, runner="r0"),
                _rec(1.2, "a", "n1", "a", cpu_s=1.0, runner="r1")]
        _run(recs, cores={"n0": 1, "n1": 1}, region_of={"n0": "a", "n1": "a"},
             host_cores=host_cores)
        return [r.done_s - r.created_s for r in recs]

    own = run(0.0)
    shared = run(1.0)
    # (LAN: the publish and the read at the holder, 1 ms each)
    assert own == pytest.approx([1.002, 1.002])
    assert shared == pytest.approx([2.002, 2.002])  # two jobs at half speed each
    assert run(2.0) == pytest.approx(own)


def test_moving_records_takes_cpu_from_a_shared_host() -> None:
    def run(host_cores: float) -> float:
        rec = _rec(1.2, "a", "n0", "a", cpu_s=1.0)
        _run([rec], cores={"n0": 1}, region_of={"n0": "a"}, host_cores=host_cores,
             hop_cpu_s=0.5)
        return rec.done_s - rec.created_s

    # On one shared core the publish's and the hand-off's 0.5 s of CPU run beside the
    # operator's 1 s: all three at a third of the core until the two hops are done
    # (1.5 s), then the operator's last 0.5 s alone. Nodes with their own cores: 1 s.
    assert run(1.0) == pytest.approx(0.001 + 2.0 + 0.001)
    assert run(0.0) == pytest.approx(0.001 + 1.0 + 0.001)


def test_other_work_on_a_shared_host_takes_its_share_of_the_cores() -> None:
    def run(background: float, host_cores: float = 2.0) -> float:
        rec = _rec(1.2, "a", "n0", "a", cpu_s=1.0)
        _run([rec], cores={"n0": 1}, region_of={"n0": "a"}, host_cores=host_cores,
             background=background)
        return rec.done_s - rec.created_s

    # Two cores, three runnable threads of other work beside the operator: each of the
    # four runs at half a core (the host's scheduler shares the cores among runnable
    # threads alike), so the operator's 1 s of CPU takes 2 s. One other thread leaves
    # a core free for it; nodes with their own cores do not share with other work.
    assert run(3.0) == pytest.approx(0.001 + 2.0 + 0.001)
    assert run(1.0) == pytest.approx(0.001 + 1.0 + 0.001)
    assert run(3.0, host_cores=0.0) == pytest.approx(0.001 + 1.0 + 0.001)


def test_calls_are_still_pushed_and_answered() -> None:
    rec = FlowRecord(1.2, "s", "c0", "c", 100, 10, 0.004)
    _run([rec], cores={"s0": 1, "c0": 1}, region_of={"s0": "s", "c0": "c"}, hop_s=0.002)
    # entry (LAN + hop), to the replica (50 ms + hop), 4 ms CPU, back (50 ms + hop).
    assert rec.done_s - rec.created_s == pytest.approx(0.001 + 0.05 + 0.004 + 0.05 + 3 * 0.002)


def test_a_draw_is_linear_between_the_points_and_clamped_beyond() -> None:
    points = ((0.5, 1.0), (0.9, 2.0), (0.99, 11.0))
    assert draw(points, 0.0) == draw(points, 0.5) == 1.0
    assert draw(points, 0.7) == pytest.approx(1.5)
    assert draw(points, 0.945) == pytest.approx(6.5)
    assert draw(points, 0.999) == draw(points, 1.0) == 11.0
    assert draw(((0.3, 4.0),), 0.9) == 4.0


# A hop of 1 ms at its median and up to 1.5 ms nine times in ten; one in fifty waits
# 30 to 60 ms (a core taken by other work, issue 17).
TAIL: Quantiles = ((0.0, 0.0008), (0.5, 0.001), (0.9, 0.0015), (0.98, 0.002),
                   (0.99, 0.030), (1.0, 0.060))


def _near_source_latencies(hops: Quantiles, *, seed: int = 1,
                           fetch_hops: Quantiles = (), reader: str = "n1") -> list[float]:
    """600 records of site a, near-source on n0, 20 ms apart (no queueing), read at
    site a through ``reader`` (n1: at the holder; m0 in region b: through a follower);
    their latencies (ms), in order."""
    nodes = {"n0": "a", "n1": "a", "m0": "b"}
    rng = random.Random(7)
    recs = [_rec(0.02 * i + 0.01 * rng.random(), "a", "n0", "a", cpu_s=0.002)
            for i in range(600)]
    for r in recs:
        r.result_site = nodes[reader]
    _run(recs, cores=dict.fromkeys(nodes, 1), region_of=nodes, hop_s=0.001, rtt_s=0.004,
         reader_node={nodes[reader]: reader}, hops=hops, fetch_hops=fetch_hops, seed=seed)
    return [(r.done_s - r.created_s) * 1000 for r in recs]


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, -(-len(s) * p // 100) - 1))]


def test_a_hop_with_a_long_tail_raises_the_p99_and_not_the_p50() -> None:
    """Each hop draws its own time from ``hop_quantiles_s``: with the median of the
    constant and a tail of a few slow hops, a record's p50 stays near the constant's
    and its p99 takes the slow hops (issue 17: constant hops made the model's
    latencies much narrower than the real ones)."""
    const = _near_source_latencies(())
    tail = _near_source_latencies(TAIL)
    assert abs(_pct(tail, 50) - _pct(const, 50)) < 0.5
    assert _pct(const, 99) - _pct(const, 50) < 1.0
    assert _pct(tail, 99) > _pct(const, 99) + 20.0
    # a distribution of one point is the constant
    assert _near_source_latencies(((0.5, 0.001),)) == pytest.approx(const)


def test_hop_draws_are_the_seeds() -> None:
    """Same seed, same latencies; another seed draws other hops."""
    assert _near_source_latencies(TAIL, seed=3) == _near_source_latencies(TAIL, seed=3)
    assert _near_source_latencies(TAIL, seed=3) != _near_source_latencies(TAIL, seed=4)


def test_a_nodes_fetch_answer_draws_from_its_own_distribution() -> None:
    """Results read through another region's follower: the holder's answer to that
    fetch draws from ``fetch_hop_quantiles_s`` (its tail raises the p99); the hops
    around it keep theirs."""
    base = _near_source_latencies(((0.5, 0.001),), reader="m0")
    slow = _near_source_latencies(((0.5, 0.001),), reader="m0", fetch_hops=TAIL)
    assert _pct(slow, 99) > _pct(base, 99) + 20.0
    assert abs(_pct(slow, 50) - _pct(base, 50)) < 0.5
    assert _near_source_latencies(TAIL, fetch_hops=TAIL) == _near_source_latencies(TAIL)
