"""An idle node's periodic loops (issue #19): the streams reconcile loop, the services
status, reconcile and health loops, and the compute plane's load gossip and policy
refresh do not wake at their interval while they have nothing to act on, still do
their idle duty (reading the KV's index, the runners' load exchange) on time, keep
their interval exactly once busy, and react at once to work that arrives.

The pacing tests drive a loop on a fake clock (each wait advances it by the time
asked); the wake-up tests use hour-long waits, so only a wake-up can make the loop run
a round within a few loop turns."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from meshscale.core.api.services import ServiceWire
from meshscale.core.api.streams import OperatorSpec
from meshscale.runtime import compute as compute_mod
from meshscale.runtime import services_plane as services_mod
from meshscale.runtime import streams as streams_mod
from meshscale.runtime.compute import ComputeConfig, ComputePlane
from meshscale.runtime.pacing import Wakeup
from meshscale.runtime.services_plane import ServicePlane, ServicePlaneConfig
from meshscale.runtime.streams import StreamConfig, StreamPlane
from waiting import wait_for_async

HOUR = 3600.0
FAKE_MINUTE_S = 60.0


class FakeClock:
    """``time`` for a module under test: ``monotonic`` reads the fake clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


class FakeWakeup:
    """A loop's ``Wakeup`` on the fake clock: each wait advances it by the time asked (no
    one wakes the loop), and stops the plane once ``until`` is reached."""

    def __init__(self, clock: FakeClock, until: float, stop: Callable[[], None]) -> None:
        self.clock, self.until, self.stop = clock, until, stop
        self.waits: list[float] = []

    def set(self) -> None:
        pass

    async def wait(self, timeout_s: float) -> bool:
        self.waits.append(timeout_s)
        self.clock.now += timeout_s
        if self.clock.now >= self.until:
            self.stop()
        await asyncio.sleep(0)
        return False


def async_value(f: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def get() -> bool:
        return f()

    return get


async def turns(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


# ---------------------------------------------------------------------- streams

def stream_plane(cfg: StreamConfig) -> tuple[StreamPlane, dict[str, list[float]]]:
    """A plane whose round's steps are stubs that note when they ran."""
    agent: Any = SimpleNamespace(name="n0", meta=SimpleNamespace(tags={}, region="r0"),
                                 m=SimpleNamespace(members={}), membership=None)
    p = StreamPlane(agent, cfg)
    ran: dict[str, list[float]] = {"load": [], "reconcile": []}
    clock = streams_mod.time

    async def load() -> None:
        ran["load"].append(clock.monotonic())

    async def nothing(*_: Any) -> None:
        return None

    p._load_ops_from_kv = load  # type: ignore[method-assign]
    p._refresh_topic_records = nothing  # type: ignore[method-assign]
    p._keep_copies = nothing  # type: ignore[method-assign]
    p._refresh_op_policies = nothing  # type: ignore[method-assign]
    p._check_mirrors = nothing  # type: ignore[method-assign]
    p._reconcile = lambda: ran["reconcile"].append(clock.monotonic())  # type: ignore[method-assign]
    return p, ran


def spec(name: str = "op") -> OperatorSpec:
    return OperatorSpec(name=name, topic="t", output=None, fn_id="f", fn_object="o",
                        mode="near-source")


def run_stream_loop_on_fake_clock(monkeypatch: pytest.MonkeyPatch, busy: bool
                                  ) -> tuple[FakeWakeup, dict[str, list[float]]]:
    clock = FakeClock()
    monkeypatch.setattr(streams_mod, "time", clock)
    cfg = StreamConfig()
    p, ran = stream_plane(cfg)
    if busy:
        p.ops["op"] = spec()
    fake = FakeWakeup(clock, clock.now + FAKE_MINUTE_S, lambda: setattr(p, "_stopping", True))
    p._wakeup = fake  # type: ignore[assignment]
    asyncio.run(asyncio.wait_for(p._reconcile_loop(), 30))
    return fake, ran


def test_idle_stream_loop_wakes_for_its_index_read_only(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    cfg = StreamConfig()
    fake, ran = run_stream_loop_on_fake_clock(monkeypatch, busy=False)
    fixed = FAKE_MINUTE_S / cfg.reconcile_interval_s
    # ~one wake per index read (every ops_reload_s), not one per reconcile_interval_s.
    assert len(fake.waits) <= FAKE_MINUTE_S / cfg.ops_reload_s + 2, (len(fake.waits), fixed)
    assert max(fake.waits) <= cfg.reconcile_idle_max_s + 0.01
    loads = ran["load"]
    gaps = [b - a for a, b in itertools.pairwise(loads)]
    # The index is still read every ops_reload_s (never later than at the fixed period).
    assert len(loads) >= FAKE_MINUTE_S / cfg.ops_reload_s - 1
    assert max(gaps) <= cfg.ops_reload_s + cfg.reconcile_interval_s, gaps


def test_busy_stream_loop_keeps_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = StreamConfig()
    fake, ran = run_stream_loop_on_fake_clock(monkeypatch, busy=True)
    assert set(fake.waits) == {cfg.reconcile_interval_s}
    assert len(ran["reconcile"]) >= FAKE_MINUTE_S / cfg.reconcile_interval_s - 1


@pytest.mark.parametrize("arrives", ["operator", "shard", "subscription"])
def test_idle_stream_loop_reacts_at_once_to_work(arrives: str) -> None:
    """Hour-long intervals: only the wake-up can bring the next round."""
    async def main() -> None:
        p, ran = stream_plane(StreamConfig(reconcile_interval_s=HOUR, ops_reload_s=HOUR,
                                           reconcile_idle_max_s=HOUR))
        loop = asyncio.ensure_future(p._reconcile_loop())
        try:
            await turns()
            assert ran["reconcile"] == []  # its first round is an interval away
            if arrives == "operator":
                p._install(spec())
            elif arrives == "shard":
                p._log("t", "n1~1")
            else:
                async def allowed(topic: str) -> None:
                    return None

                p._check_subscription = allowed  # type: ignore[method-assign]
                p._ensure_followers = lambda topic: None  # type: ignore[method-assign]
                read = asyncio.ensure_future(p._rpc_read(streams_mod.ReadRequest(
                    topic="t", cursors={}, limit=10, wait_s=60.0)))
            await turns()
            assert len(ran["reconcile"]) == 1, f"a new {arrives} did not wake the loop"
            if arrives == "subscription":
                read.cancel()
        finally:
            await p.stop()
            await asyncio.wait_for(loop, 5)

    asyncio.run(main())


# ---------------------------------------------------------------------- services

def service_plane(cfg: ServicePlaneConfig) -> tuple[ServicePlane, dict[str, list[float]]]:
    agent: Any = SimpleNamespace(name="n0", rng=SimpleNamespace(random=lambda: 0.5),
                                 membership=object(), meta=SimpleNamespace(region="r0"))
    p = ServicePlane(agent, cfg)
    ran: dict[str, list[float]] = {"load": [], "reconcile": [], "status": [], "health": []}
    clock = services_mod.time

    async def load() -> None:
        ran["load"].append(clock.monotonic())

    p._load_from_kv = load  # type: ignore[method-assign]
    p._reconcile = lambda now: ran["reconcile"].append(now)  # type: ignore[method-assign]
    # The status and health rounds' first step once a service is known:
    p._alive = lambda: ran["status"].append(clock.monotonic()) or []  # type: ignore[method-assign]
    return p, ran


def wire(name: str = "svc") -> ServiceWire:
    return ServiceWire(name=name, code_id="c" * 64, methods=["f"])


def test_idle_service_loops_wake_for_their_kv_read_only(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    clock = FakeClock()
    monkeypatch.setattr(services_mod, "time", clock)
    cfg = ServicePlaneConfig()
    p, ran = service_plane(cfg)
    stop = lambda: setattr(p, "_stopping", True)  # noqa: E731
    fakes = [FakeWakeup(clock, clock.now + FAKE_MINUTE_S, stop) for _ in range(3)]
    p._status_wakeup, p._reconcile_wakeup, p._health_wakeup = fakes  # type: ignore[assignment]

    async def one(loop: Callable[[], Any], fake: FakeWakeup) -> list[float]:
        p._stopping = False
        clock.now = 1000.0
        fake.until = clock.now + FAKE_MINUTE_S
        await asyncio.wait_for(loop(), 30)
        return fake.waits

    status = asyncio.run(one(p._status_loop, fakes[0]))
    reconcile = asyncio.run(one(p._reconcile_loop, fakes[1]))
    health = asyncio.run(one(p._health_loop, fakes[2]))
    # Fixed periods would wake 120, 120 and 30 times in the minute.
    assert len(status) <= FAKE_MINUTE_S / cfg.idle_max_s + 1, status
    assert len(health) <= FAKE_MINUTE_S / cfg.idle_max_s + 1, health
    assert len(reconcile) <= FAKE_MINUTE_S / cfg.kv_reload_s + 2, reconcile
    loads = ran["load"]
    gaps = [b - a for a, b in itertools.pairwise(loads)]
    assert len(loads) >= FAKE_MINUTE_S / cfg.kv_reload_s - 1
    assert max(gaps) <= cfg.kv_reload_s + cfg.reconcile_interval_s, gaps
    assert ran["status"] == []  # nothing to poll for


def test_busy_service_loops_keep_their_intervals(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(services_mod, "time", clock)
    cfg = ServicePlaneConfig()
    p, _ = service_plane(cfg)
    p._install(wire())
    for attr, loop, interval in (
            ("_status_wakeup", p._status_loop, cfg.status_interval_s),
            ("_reconcile_wakeup", p._reconcile_loop, cfg.reconcile_interval_s),
            ("_health_wakeup", p._health_loop, cfg.service_health_interval_s)):
        p._stopping = False
        fake = FakeWakeup(clock, clock.now + FAKE_MINUTE_S,
                          lambda: setattr(p, "_stopping", True))
        setattr(p, attr, fake)
        asyncio.run(asyncio.wait_for(loop(), 30))
        assert set(fake.waits) == {interval}, attr


def test_idle_service_loops_react_at_once_to_a_service() -> None:
    async def main() -> None:
        p, ran = service_plane(ServicePlaneConfig(
            status_interval_s=HOUR, reconcile_interval_s=HOUR, kv_reload_s=HOUR,
            idle_max_s=HOUR, service_health_interval_s=HOUR))
        checks: list[str] = []
        p.replicas = _Checked(checks)  # type: ignore[assignment]
        loops = [asyncio.ensure_future(f())
                 for f in (p._status_loop, p._reconcile_loop, p._health_loop)]
        try:
            await turns()
            assert ran["reconcile"] == [] and ran["status"] == [] and checks == []
            p._install(wire())
            await turns()
            assert len(ran["reconcile"]) == 1, "a service did not wake the reconcile loop"
            assert len(ran["status"]) == 1, "a service did not wake the status loop"
            assert checks, "a service did not wake the health loop"
        finally:
            p._stopping = True
            p._wake_loops()
            await asyncio.wait_for(asyncio.gather(*loops), 5)

    asyncio.run(main())


class _Checked(dict[str, Any]):
    """``ServicePlane.replicas`` that notes each time the health loop lists them."""

    def __init__(self, checks: list[str]) -> None:
        super().__init__()
        self.checks = checks

    def items(self) -> Any:
        self.checks.append("listed")
        return super().items()


def test_idle_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        StreamConfig(reconcile_idle_max_s=math.inf)
    with pytest.raises(ValueError):
        StreamConfig(ops_reload_s=0.0)
    with pytest.raises(ValueError):
        ServicePlaneConfig(idle_max_s=-1.0)


# ---------------------------------------------------------------------- compute

class FakeSched:
    def __init__(self, classes: list[str]) -> None:
        self.class_list = classes
        self.asked = 0

    def classes(self) -> list[str]:
        self.asked += 1
        return self.class_list

    def set_policies(self, policies: Any, now: float) -> None:
        pass


def compute_plane(cfg: ComputeConfig, classes: list[str]) -> tuple[ComputePlane, list[float]]:
    """Just what the load-gossip and policy-refresh loops use (the real constructor
    starts a worker pool)."""
    p = ComputePlane.__new__(ComputePlane)
    p.cfg = cfg
    p.sched = FakeSched(classes)  # type: ignore[assignment]
    p.agent = SimpleNamespace(name="n0", m=SimpleNamespace(members={}))  # type: ignore[assignment]
    p._active_at = -math.inf
    p._load_wakeup, p._policy_wakeup = Wakeup(), Wakeup()
    p._policy_idle = False
    views: list[float] = []
    clock = compute_mod.time
    p._refresh_view = lambda: views.append(clock.monotonic())  # type: ignore[method-assign]

    async def class_policies(names: set[str]) -> dict[str, Any]:
        return {}

    p.local = SimpleNamespace(class_policies=class_policies)  # type: ignore[assignment]
    p._pump = lambda: None  # type: ignore[method-assign]
    return p, views


def test_quiet_compute_loops_wake_for_their_duties_only(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    clock = FakeClock()
    monkeypatch.setattr(compute_mod, "time", clock)
    cfg = ComputeConfig()

    def run(loop_name: str, classes: list[str]) -> list[float]:
        p, _ = compute_plane(cfg, classes)
        clock.now = 1000.0
        fake = FakeWakeup(clock, clock.now + FAKE_MINUTE_S, lambda: setattr(p, "sched", None))
        p._load_wakeup = p._policy_wakeup = fake  # type: ignore[assignment]
        asyncio.run(asyncio.wait_for(getattr(p, loop_name)(), 30))
        return fake.waits

    # Fixed periods: 60 wakes each in the minute.
    gossip = run("_gossip_load", [])
    assert len(gossip) <= FAKE_MINUTE_S / cfg.runner_exchange_s + 2, gossip
    policies = run("_refresh_policies", [])
    assert len(policies) <= FAKE_MINUTE_S / cfg.policy_refresh_idle_max_s + 2, policies
    # Classed tasks pending: the refresh keeps its interval.
    assert set(run("_refresh_policies", ["pii"])[1:]) == {cfg.policy_refresh_s}


def test_quiet_compute_loops_react_at_once_to_work() -> None:
    async def main() -> None:
        cfg = ComputeConfig(load_interval_s=HOUR, runner_exchange_s=HOUR, gossip_idle_s=HOUR,
                            policy_refresh_s=0.01, policy_refresh_idle_max_s=HOUR)
        p, views = compute_plane(cfg, [])
        sched = p.sched
        assert isinstance(sched, FakeSched)
        loops = [asyncio.ensure_future(p._gossip_load()),
                 asyncio.ensure_future(p._refresh_policies())]
        try:
            await turns()
            assert views == []
            # The refresh's first round (0.01 s) finds no classed task: it sleeps an hour.
            await wait_for_async(async_value(lambda: sched.asked >= 1), 10,
                                 "the policy refresh's first round", poll=0.01)
            p._active_at = -math.inf  # quiet for long
            p._mark_active(compute_mod.time.monotonic())  # scheduling work came
            await turns()
            assert len(views) == 1, "work after a quiet spell did not wake the load gossip"
            asked = sched.asked
            # A submit of tasks without a class: no round (it would find none to read).
            plain = SimpleNamespace(residency=None, inputs=())
            p._wake_policy_refresh([plain])  # type: ignore[list-item]
            await turns()
            assert sched.asked == asked, "an unclassed submit woke the policy refresh"
            sched.class_list = ["pii"]
            classed = SimpleNamespace(residency=SimpleNamespace(data_class="pii"), inputs=())
            p._wake_policy_refresh([plain, classed])  # type: ignore[list-item]  # a submit
            await turns()
            assert sched.asked == asked + 1, "a submit did not wake the policy refresh"
        finally:
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    asyncio.run(main())
