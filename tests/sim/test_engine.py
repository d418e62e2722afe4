"""The simulator, driven through small toy protocols (ping/pong, flooding gossip, a
recorder of every input)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from meshscale.core.outputs import DrivenProtocol, Event, Output, SendDatagram, StreamRequest
from meshscale.sim import NodeContext, Placement, Simulator, Topology

T = TypeVar("T")


# ----------------------------------------------------------------- toy protocols


@dataclass(frozen=True)
class Pong(Event):
    peer: str
    rtt: float


@dataclass(frozen=True)
class Learned(Event):
    rumor: str


class Toy:
    """Records every input; subclasses add behaviour. Implements DrivenProtocol."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.rng = ctx.rng
        self.out: list[Output] = []
        self.deadline: float | None = None
        self.datagrams: list[tuple[float, str, bytes]] = []
        self.streams: list[tuple[float, str, bytes]] = []
        self.replies: list[tuple[float, str, bytes]] = []
        self.failures: list[tuple[float, str]] = []
        self.timers: list[float] = []
        self.stream_answer: Callable[[bytes], bytes | None] = lambda p: b"re:" + p

    def send(self, addr: str, payload: bytes) -> None:
        self.out.append(SendDatagram(addr, payload))

    def request(self, addr: str, payload: bytes) -> None:
        self.out.append(StreamRequest(addr, payload))

    def handle_datagram(self, src: str, payload: bytes, now: float) -> None:
        self.datagrams.append((now, src, payload))

    def handle_stream(self, src: str, payload: bytes, now: float) -> bytes | None:
        self.streams.append((now, src, payload))
        return self.stream_answer(payload)

    def handle_stream_reply(self, src: str, payload: bytes, now: float) -> None:
        self.replies.append((now, src, payload))

    def stream_failed(self, dst: str, now: float) -> None:
        self.failures.append((now, dst))

    def next_deadline(self) -> float | None:
        return self.deadline

    def on_timer(self, now: float) -> None:
        self.timers.append(now)
        self.deadline = None

    def drain(self) -> list[Output]:
        out, self.out = self.out, []
        return out


class PingPong(Toy):
    """Every ``interval`` pings a random peer; answers pings; emits Pong with the RTT."""

    def __init__(self, ctx: NodeContext, peers: list[str], interval: float = 0.2) -> None:
        super().__init__(ctx)
        self.peers = [p for p in peers if p != ctx.name]
        self.interval = interval
        self.deadline = ctx.now + interval * ctx.rng.random()
        self.sent: dict[int, float] = {}
        self.counter = 0

    def handle_datagram(self, src: str, payload: bytes, now: float) -> None:
        super().handle_datagram(src, payload, now)
        kind, _, seq = payload.partition(b":")
        if kind == b"ping":
            self.send(src, b"pong:" + seq)
        elif kind == b"pong":
            sent = self.sent.pop(int(seq), None)
            if sent is not None:
                self.out.append(Pong(src, now - sent))

    def on_timer(self, now: float) -> None:
        self.timers.append(now)
        assert self.deadline is not None and now >= self.deadline
        self.deadline += self.interval
        self.counter += 1
        self.sent[self.counter] = now
        self.send(self.rng.choice(self.peers), b"ping:%d" % self.counter)


class Flood(PingPong):
    """Ping/pong plus flooding gossip: a new rumor is forwarded to ``fanout`` peers."""

    def __init__(self, ctx: NodeContext, peers: list[str], fanout: int = 3) -> None:
        super().__init__(ctx, peers, interval=0.5)
        self.fanout = fanout
        self.known: list[str] = []

    def originate(self, rumor: str) -> None:
        self._learn(rumor)

    def _learn(self, rumor: str) -> None:
        self.known.append(rumor)
        self.out.append(Learned(rumor))
        for peer in self.rng.sample(self.peers, min(self.fanout, len(self.peers))):
            self.send(peer, b"rumor:" + rumor.encode())

    def handle_datagram(self, src: str, payload: bytes, now: float) -> None:
        if payload.startswith(b"rumor:"):
            self.datagrams.append((now, src, payload))
            rumor = payload[len(b"rumor:") :].decode()
            if rumor not in self.known:
                self._learn(rumor)
        else:
            super().handle_datagram(src, payload, now)


class PastDeadline(Toy):
    """A buggy protocol whose deadline is always in the past and never advances."""

    def next_deadline(self) -> float | None:
        return 0.0

    def on_timer(self, now: float) -> None:
        self.timers.append(now)


# ---------------------------------------------------------------------- helpers

TOPO = Topology.three_regions()
EU_A = Placement("eu-west", "eu-west-a")
EU_B = Placement("eu-west", "eu-west-b")
US_A = Placement("us-east", "us-east-a")
AP_A = Placement("ap-south", "ap-south-a")


def toy(ctx: NodeContext) -> Toy:
    return Toy(ctx)


def proto(sim: Simulator, name: str, cls: type[T]) -> T:
    p = sim.protocol(name)
    assert isinstance(p, cls)
    return p


def send(sim: Simulator, src: str, dst: str, payload: bytes) -> None:
    sim.call(src, lambda p, now: p.send(dst, payload) if isinstance(p, Toy) else None)


def request(sim: Simulator, src: str, dst: str, payload: bytes) -> None:
    sim.call(src, lambda p, now: p.request(dst, payload) if isinstance(p, Toy) else None)


def toy_sim(*placements: tuple[str, Placement], **kwargs: Any) -> Simulator:
    sim = Simulator(TOPO, seed=7, **kwargs)
    for name, placement in placements:
        sim.add_node(name, placement, toy)
    return sim


def scenario(seed: int, *, record_trace: bool = False) -> Simulator:
    """A busy run with every kind of fault, for the determinism tests."""
    topo = Topology.five_regions()
    sim = Simulator(topo, seed, loss=0.05, stream_timeout_s=0.5, record_trace=record_trace)
    names = [f"n{i:02d}" for i in range(24)]
    for name, placement in zip(names, topo.place(len(names)), strict=True):
        sim.add_node(name, placement, lambda ctx: Flood(ctx, names))

    def gossip(i: int) -> Callable[[], None]:
        def act() -> None:
            origin = sim.rng.choice([n for n in names if sim.is_up(n)])
            sim.call(origin, lambda p, now: p.originate(f"r{i}") if isinstance(p, Flood) else None)

        return act

    for i in range(6):
        sim.at(0.5 + i * 0.7, gossip(i))
    sim.at(1.0, lambda: sim.crash("n03"))
    sim.at(2.5, lambda: sim.restart("n03"))
    sim.at(1.2, lambda: sim.pause("n05", 0.8))
    sim.at(0.3, lambda: sim.set_slow("n07", 0.05))
    sim.at(1.5, lambda: sim.partition(names[:8], names[8:16]))
    sim.at(2.8, sim.heal)
    sim.at(0.9, lambda: sim.set_link_loss("n01", "n02", 0.5))
    sim.at(2.0, lambda: request(sim, "n10", "n11", b"hello"))
    sim.at(2.0, lambda: request(sim, "n10", "n03", b"to-the-dead"))
    sim.run_until(4.0)
    return sim


# ------------------------------------------------------------------ determinism


def test_same_seed_same_hash_different_seed_different_hash() -> None:
    a = scenario(1, record_trace=True)
    b = scenario(1, record_trace=True)
    c = scenario(2)
    assert a.trace_hash() == b.trace_hash()
    assert a.trace == b.trace
    assert a.events_processed == b.events_processed > 500
    assert a.trace_hash() != c.trace_hash()
    # Recording the readable trace does not change the run.
    assert scenario(1).trace_hash() == a.trace_hash()


def test_hash_does_not_depend_on_pythonhashseed() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_engine; "
        "print(test_engine.scenario(3).trace_hash())"
    )
    hashes = set()
    for hashseed in ("0", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        out = subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        hashes.add(out.stdout.strip())
    assert hashes == {scenario(3).trace_hash()}


def test_trace_hash_is_a_running_digest() -> None:
    sim = toy_sim(("a", EU_A), ("b", US_A))
    h0 = sim.trace_hash()
    assert h0 == sim.trace_hash()  # reading it does not change it
    send(sim, "a", "b", b"x")
    sim.run_until(1.0)
    assert sim.trace_hash() != h0
    assert len(sim.trace_hash()) == 64


# ------------------------------------------------------------------------ network


def test_datagram_delay_is_half_rtt_with_jitter() -> None:
    sim = toy_sim(("a", EU_A), ("b", AP_A))
    for _ in range(2000):
        send(sim, "a", "b", b"x")
    sim.run_until(1.0)
    got = proto(sim, "b", Toy).datagrams
    assert len(got) == 2000
    one_way = sim.true_rtt("a", "b") / 2
    assert sim.true_rtt("a", "b") == TOPO.base_rtt(EU_A, AP_A) == pytest.approx(0.140)
    delays = [t for t, _, _ in got]
    j = TOPO.jitter
    assert min(delays) >= one_way * (1 - j) - 1e-12
    assert max(delays) <= one_way * (1 + j) + 1e-12
    assert sum(delays) / len(delays) == pytest.approx(one_way, rel=0.01)
    assert max(delays) - min(delays) > one_way * j  # jitter is really applied


def test_loss_rate_is_statistically_right() -> None:
    n, p, q = 20_000, 0.3, 0.5
    sim = toy_sim(("a", EU_A), ("b", EU_B), ("c", US_A), loss=p)
    sim.set_link_loss("c", "a", q)  # symmetric: applies to a -> c

    def blast(pr: DrivenProtocol, now: float) -> None:
        assert isinstance(pr, Toy)
        for _ in range(n):
            pr.send("b", b"x")
            pr.send("c", b"y")

    sim.call("a", blast)
    sim.run_until(1.0)
    for dst, survive in (("b", 1 - p), ("c", (1 - p) * (1 - q))):
        received = len(proto(sim, dst, Toy).datagrams)
        sd = math.sqrt(n * survive * (1 - survive))
        assert abs(received - n * survive) < 5 * sd, (dst, received)
        assert sim.stats.nodes[dst].dropped_loss == n - received
        assert sim.stats.nodes[dst].datagrams_received == received
    assert sim.stats.nodes["a"].datagrams_sent == 2 * n
    assert sim.stats.totals().dropped_loss == sim.stats.totals().dropped

    sim.set_loss(0.0)
    sim.set_link_loss("a", "c", 0.0)
    before = len(proto(sim, "c", Toy).datagrams)
    for _ in range(100):
        send(sim, "a", "c", b"z")
    sim.run_until(2.0)
    assert len(proto(sim, "c", Toy).datagrams) == before + 100


def test_unknown_destination_is_dropped_and_counted() -> None:
    sim = toy_sim(("a", EU_A))
    send(sim, "a", "nobody", b"x")
    sim.run_until(1.0)
    assert sim.stats.nodes["a"].dropped_unknown_dst == 1


def test_partition_blocks_and_heal_restores() -> None:
    names = ["a", "b", "c", "d", "e"]
    sim = toy_sim(*((n, EU_A) for n in names), stream_timeout_s=0.5)
    sim.partition(["a", "b"], ["c", "d"])  # e is in neither: talks to everyone
    for dst in ("b", "c", "d", "e"):
        send(sim, "a", dst, b"from-a")
    send(sim, "e", "c", b"from-e")
    send(sim, "c", "e", b"from-c")
    request(sim, "a", "c", b"stream-across")
    sim.run_until(1.0)
    got = {n: [(src, p) for _, src, p in proto(sim, n, Toy).datagrams] for n in names}
    assert got["b"] == [("a", b"from-a")]
    assert got["c"] == [("e", b"from-e")]
    assert got["d"] == []
    assert sorted(got["e"]) == [("a", b"from-a"), ("c", b"from-c")]
    assert sim.stats.nodes["c"].dropped_partition == 1
    assert sim.stats.nodes["d"].dropped_partition == 1
    a = proto(sim, "a", Toy)
    assert [dst for _, dst in a.failures] == ["c"]
    assert a.failures[0][0] == pytest.approx(0.5)
    assert proto(sim, "c", Toy).streams == []

    # A datagram in flight when the partition starts is lost too.
    sim.heal()
    send(sim, "a", "c", b"in-flight")
    sim.partition(["a"], ["c"])
    sim.run_until(2.0)
    assert [p for _, _, p in proto(sim, "c", Toy).datagrams] == [b"from-e"]

    sim.heal()
    send(sim, "a", "c", b"healed")
    request(sim, "a", "c", b"stream-healed")
    sim.run_until(3.0)
    assert proto(sim, "c", Toy).datagrams[-1][1:] == ("a", b"healed")
    assert a.replies[-1][1:] == ("c", b"re:stream-healed")


def test_partition_refuses_a_node_in_two_groups() -> None:
    sim = toy_sim(("a", EU_A), ("b", EU_A))
    with pytest.raises(ValueError):
        sim.partition(["a"], ["a", "b"])


# -------------------------------------------------------------- crash / restart


def test_crash_drops_everything_and_restart_keeps_disk() -> None:
    contexts: list[NodeContext] = []

    def factory(ctx: NodeContext) -> Toy:
        contexts.append(ctx)
        ctx.disk["boots"] = ctx.disk.get("boots", 0) + 1
        node = Toy(ctx)
        node.deadline = ctx.now + 0.5
        return node

    sim = Simulator(TOPO, seed=11)
    sim.add_node("a", EU_A, toy)
    sim.add_node("b", US_A, factory)
    first = proto(sim, "b", Toy)
    first_draw = first.rng.random()

    send(sim, "a", "b", b"lost-in-flight")  # arrives at ~0.04, after the crash
    sim.run_until(0.01)
    sim.crash("b")
    assert not sim.is_up("b")
    send(sim, "a", "b", b"to-the-dead")
    with pytest.raises(RuntimeError):
        sim.call("b", lambda p, now: None)
    sim.run_until(2.0)
    assert first.datagrams == []
    assert first.timers == []  # its timer at 0.5 never fired
    assert sim.stats.nodes["b"].dropped_down == 2
    assert sim.protocol("b") is first  # still inspectable

    sim.restart("b")
    second = proto(sim, "b", Toy)
    assert second is not first
    assert sim.is_up("b")
    assert len(contexts) == 2
    assert contexts[1].disk is contexts[0].disk
    assert contexts[1].disk["boots"] == 2
    assert (contexts[0].restarts, contexts[1].restarts) == (0, 1)
    assert (contexts[1].name, contexts[1].region, contexts[1].zone) == ("b", "us-east", "us-east-a")
    assert contexts[1].now == 2.0
    assert second.rng.random() != first_draw  # a fresh stream per incarnation

    send(sim, "a", "b", b"welcome-back")
    sim.run_until(3.0)
    assert [p for _, _, p in second.datagrams] == [b"welcome-back"]
    assert second.timers == [2.5]


def test_restart_of_running_node_crashes_it_first() -> None:
    sim = toy_sim(("a", EU_A))
    old = sim.protocol("a")
    sim.restart("a")
    assert sim.protocol("a") is not old
    assert sim.is_up("a")


def test_stream_reply_to_crashed_requester_is_not_delivered_to_its_successor() -> None:
    sim = toy_sim(("a", EU_A), ("b", AP_A), stream_timeout_s=1.0)
    request(sim, "a", "b", b"q")
    sim.run_until(0.05)
    sim.crash("a")
    sim.restart("a")
    sim.run_until(3.0)
    assert len(proto(sim, "b", Toy).streams) == 0  # the connection died with a
    new_a = proto(sim, "a", Toy)
    assert new_a.replies == [] and new_a.failures == []


# -------------------------------------------------------------------------- pause


def test_pause_queues_then_delivers_and_fires_due_timers() -> None:
    sim = toy_sim(("a", EU_A), ("b", EU_A))
    b = proto(sim, "b", Toy)
    sim.call("b", lambda p, now: setattr(p, "deadline", 1.0))
    sim.pause("b", 2.0)
    for i in range(5):
        send(sim, "a", "b", b"%d" % i)
    request(sim, "a", "b", b"while-paused")
    sim.run_until(1.99)
    assert b.datagrams == [] and b.timers == [] and b.streams == []
    sim.run_until(2.0)
    assert sorted(p for _, _, p in b.datagrams) == [b"0", b"1", b"2", b"3", b"4"]
    assert all(t == 2.0 for t, _, _ in b.datagrams)
    assert b.timers == [2.0]  # the timer due at 1.0 fired once, on resume, after the I/O
    assert [t for t, _, _ in b.streams] == [2.0]
    sim.run_until(3.0)
    # The request sat in the paused node longer than the 1 s stream timeout: the
    # requester gave up at 1.0, so b's late reply goes nowhere.
    a = proto(sim, "a", Toy)
    assert a.failures == [(1.0, "b")]
    assert a.replies == []


def test_long_pause_makes_streams_time_out_and_drops_beyond_the_queue_limit() -> None:
    sim = toy_sim(("a", EU_A), ("b", EU_A), pause_queue_limit=3, stream_timeout_s=1.0)
    sim.pause("b", 2.0)
    for i in range(5):
        send(sim, "a", "b", b"%d" % i)
    request(sim, "a", "b", b"q")
    sim.run_until(3.0)
    b = proto(sim, "b", Toy)
    assert len(b.datagrams) == 3  # whichever three arrived first
    assert sim.stats.nodes["b"].dropped_pause_overflow == 2
    a = proto(sim, "a", Toy)
    assert a.failures == [(1.0, "b")]
    assert a.replies == []
    assert [t for t, _, _ in b.streams] == [2.0]  # read from the socket on resume, too late


def test_local_call_to_paused_node_runs_on_resume() -> None:
    sim = toy_sim(("a", EU_A))
    seen: list[float] = []
    sim.pause("a", 1.0)
    sim.call("a", lambda p, now: seen.append(now))
    assert seen == []
    sim.run_until(2.0)
    assert seen == [1.0]


def test_crash_during_pause_discards_the_queue() -> None:
    sim = toy_sim(("a", EU_A), ("b", EU_A))
    sim.pause("b", 1.0)
    send(sim, "a", "b", b"x")
    sim.run_until(0.5)
    sim.crash("b")
    sim.restart("b")
    sim.run_until(2.0)
    assert proto(sim, "b", Toy).datagrams == []


# --------------------------------------------------------------------------- slow


def test_slow_node_processes_later_in_order_and_sends_when_it_processes() -> None:
    # No jitter: datagrams arrive in the order they were sent, so the processing order
    # shows whether the slow node keeps its input order.
    sim = Simulator(Topology(regions=TOPO.regions, region_rtt_s=TOPO.region_rtt_s, jitter=0.0), 7)
    sim.add_node("a", EU_A, toy)
    sim.add_node("b", EU_A, toy)
    delay = 0.5
    sim.set_slow("b", delay)
    one_way = sim.true_rtt("a", "b") / 2
    for i in range(20):
        send(sim, "a", "b", b"%d" % i)  # a burst: all arrive at one_way
    request(sim, "a", "b", b"q")
    sim.run_until(5.0)
    b = proto(sim, "b", Toy)
    times = [t for t, _, _ in b.datagrams]
    assert [p for _, _, p in b.datagrams] == [b"%d" % i for i in range(20)]
    assert times == sorted(times)
    assert all(one_way + 0.5 * delay <= t <= one_way + 1.5 * delay for t in times)
    # The stream was handled late, so the reply left late.
    (t_req, _, _), (t_rep, _, _) = b.streams[0], proto(sim, "a", Toy).replies[0]
    assert t_req >= 0.5 * delay
    assert t_rep > t_req

    # Spaced-out inputs are each delayed by delay * U(0.5, 1.5).
    for i in range(20):
        sim.at(5.0 + 0.3 * i, lambda: send(sim, "a", "b", b"spaced"))
    sim.run_until(12.0)
    spaced = [t for t, _, p in b.datagrams if p == b"spaced"]
    lags = [t - (5.0 + 0.3 * i + one_way) for i, t in enumerate(spaced)]
    assert len(lags) == 20
    assert all(0.5 * delay - 1e-9 <= lag <= 1.5 * delay + 1e-9 for lag in lags)
    assert max(lags) - min(lags) > 0.2

    # Timers of a slow node fire late too.
    sim.call("b", lambda p, now: setattr(p, "deadline", now + 1.0))
    sim.run_until(15.0)
    assert len(b.timers) == 1
    assert 13.0 + 0.5 * delay <= b.timers[0] <= 13.0 + 1.5 * delay

    sim.set_slow("b", 0.0)
    send(sim, "a", "b", b"fast")
    sim.run_until(16.0)
    assert b.datagrams[-1] == (15.0 + one_way, "a", b"fast")


# -------------------------------------------------------------------------- streams


def test_stream_success_round_trip_time() -> None:
    sim = toy_sim(("a", EU_A), ("b", US_A))
    request(sim, "a", "b", b"hello")
    sim.run_until(1.0)
    rtt = sim.true_rtt("a", "b")
    j = TOPO.jitter
    b = proto(sim, "b", Toy)
    a = proto(sim, "a", Toy)
    assert [(src, p) for _, src, p in b.streams] == [("a", b"hello")]
    assert rtt * 1.5 * (1 - j) <= b.streams[0][0] <= rtt * 1.5 * (1 + j)
    assert [(src, p) for _, src, p in a.replies] == [("b", b"re:hello")]
    assert 2 * rtt * (1 - j) <= a.replies[0][0] <= 2 * rtt * (1 + j)
    assert a.failures == []
    st = sim.stats.nodes
    assert (st["a"].streams_sent, st["b"].streams_received, st["a"].stream_replies_received) == (
        1,
        1,
        1,
    )


def test_stream_none_reply_delivers_nothing_and_does_not_fail() -> None:
    sim = toy_sim(("a", EU_A), ("b", EU_A))
    proto(sim, "b", Toy).stream_answer = lambda p: None
    request(sim, "a", "b", b"push")
    sim.run_until(5.0)
    a = proto(sim, "a", Toy)
    assert len(proto(sim, "b", Toy).streams) == 1
    assert a.replies == [] and a.failures == []


def test_stream_to_crashed_partitioned_or_unknown_node_fails_after_timeout() -> None:
    sim = toy_sim(("a", EU_A), ("b", US_A), ("c", US_A), ("d", AP_A), stream_timeout_s=2.0)
    sim.crash("b")
    sim.partition(["a"], ["c"])
    sim.run_until(1.0)
    for dst in ("b", "c", "nobody"):
        request(sim, "a", dst, b"q")
    request(sim, "a", "d", b"q")
    sim.run_until(1.05)
    sim.crash("d")  # after the request left, before it arrives (~1.21)
    sim.run_until(10.0)
    a = proto(sim, "a", Toy)
    assert sorted(a.failures) == [(3.0, "b"), (3.0, "c"), (3.0, "d"), (3.0, "nobody")]
    assert a.replies == []
    assert sim.stats.nodes["a"].streams_failed == 4


def test_stream_times_out_when_reply_would_be_late() -> None:
    sim = toy_sim(("a", EU_A), ("b", AP_A), stream_timeout_s=0.2)  # < 2 RTT (0.28 s)
    request(sim, "a", "b", b"q")
    sim.run_until(2.0)
    a = proto(sim, "a", Toy)
    assert [dst for _, dst in a.failures] == ["b"]
    assert a.failures[0][0] == pytest.approx(0.2)
    assert a.replies == []


# ------------------------------------------------------------------ timers, events


def test_observers_see_every_event() -> None:
    names = [f"n{i}" for i in range(6)]
    sim = Simulator(TOPO, seed=5)
    seen: list[tuple[float, str, Event]] = []
    sim.observers.append(lambda t, name, ev: seen.append((t, name, ev)))
    for name, placement in zip(names, TOPO.place(6), strict=True):
        sim.add_node(name, placement, lambda ctx: PingPong(ctx, names))
    sim.run_until(3.0)
    pongs = [(t, n, ev) for t, n, ev in seen if isinstance(ev, Pong)]
    assert len(pongs) > 50
    assert sim.stats.totals().events_emitted == len(seen)
    for t, name, ev in pongs:
        assert isinstance(ev, Pong)
        assert ev.peer != name
        assert ev.rtt == pytest.approx(sim.true_rtt(name, ev.peer), rel=TOPO.jitter + 1e-9)
        assert 0.0 < t <= 3.0
    assert [t for t, _, _ in seen] == sorted(t for t, _, _ in seen)


def test_timer_fires_at_deadline_and_moved_deadlines_are_honoured() -> None:
    sim = toy_sim(("a", EU_A))
    a = proto(sim, "a", Toy)
    sim.call("a", lambda p, now: setattr(p, "deadline", 1.0))
    sim.run_until(0.5)
    sim.call("a", lambda p, now: setattr(p, "deadline", 2.0))  # later: 1.0 entry goes stale
    sim.run_until(1.5)
    assert a.timers == []
    sim.call("a", lambda p, now: setattr(p, "deadline", 1.75))  # earlier again
    sim.run_until(3.0)
    assert a.timers == [1.75]
    sim.call("a", lambda p, now: setattr(p, "deadline", 2.5))  # in the past: runs now
    sim.run_until(4.0)
    assert a.timers == [1.75, 3.0]
    assert sim.stats.nodes["a"].deadlines_clamped == 1
    assert sim.stats.stale_timer_entries >= 1


def test_deadline_in_the_past_forever_does_not_freeze_time() -> None:
    sim = Simulator(TOPO, seed=1)
    sim.add_node("bad", EU_A, PastDeadline)
    sim.add_node("good", EU_A, toy)
    sim.call("good", lambda p, now: setattr(p, "deadline", 0.75))
    sim.run_until(1.0)
    assert sim.now == 1.0
    bad = proto(sim, "bad", PastDeadline)
    assert sim.stats.nodes["bad"].timers_stalled > 0
    assert 100 < len(bad.timers) < 20_000
    assert proto(sim, "good", Toy).timers == [0.75]


def test_run_until_true() -> None:
    names = [f"n{i:02d}" for i in range(40)]
    sim = Simulator(Topology.five_regions(), seed=9)
    for name, placement in zip(names, Topology.five_regions().place(40), strict=True):
        sim.add_node(name, placement, lambda ctx: Flood(ctx, names, fanout=8))
    sim.call("n00", lambda p, now: p.originate("hot") if isinstance(p, Flood) else None)

    def everyone_knows() -> bool:
        return all("hot" in proto(sim, n, Flood).known for n in names)

    assert sim.run_until_true(everyone_knows, deadline=10.0)
    assert sim.now < 5.0
    assert not sim.run_until_true(lambda: False, deadline=12.0, check_every_s=0.5)
    assert sim.now == 12.0


def test_scenario_actions_run_in_time_order() -> None:
    sim = toy_sim(("a", EU_A))
    order: list[tuple[str, float]] = []
    sim.at(2.0, lambda: order.append(("late", sim.now)))
    sim.at(1.0, lambda: order.append(("early", sim.now)))
    sim.at(1.0, lambda: order.append(("early-second", sim.now)))
    sim.run_until(3.0)
    assert order == [("early", 1.0), ("early-second", 1.0), ("late", 2.0)]
    sim.at(0.0, lambda: order.append(("past", sim.now)))  # clamped to now
    sim.run_until(3.0)
    assert order[-1] == ("past", 3.0)


def test_add_node_twice_and_unknown_names() -> None:
    sim = toy_sim(("a", EU_A))
    with pytest.raises(ValueError):
        sim.add_node("a", EU_A, toy)
    with pytest.raises(KeyError):
        sim.crash("zz")
    assert sim.names() == ["a"]


def test_stats_count_bytes() -> None:
    sim = toy_sim(("a", EU_A), ("b", US_A))
    send(sim, "a", "b", b"12345")
    send(sim, "a", "b", b"678")
    sim.run_until(1.0)
    st = sim.stats.nodes
    assert (st["a"].datagrams_sent, st["a"].bytes_sent) == (2, 8)
    assert (st["b"].datagrams_received, st["b"].bytes_received) == (2, 8)
    assert sim.stats.events_processed == sim.events_processed >= 4  # 2 calls + 2 deliveries
