"""runtime/capacity.py without processes: the gossiped tag (round trip, bounded size,
damaged values left out), and the driver acting on its controller with a fake node and a
fake worker pool: standby stops the workers, demand wakes them, every move an event."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from meshscale.core.capacity import CapacityConfig, PeerCapacity, PowerState
from meshscale.core.membership import NodeMeta, State
from meshscale.runtime.capacity import (
    MAX_COUNT,
    POWER_TAG,
    CapacityDriver,
    decode_tag,
    encode_tag,
    placement_standby,
    power_state,
)
from meshscale.runtime.config import CapacitySettings
from meshscale.runtime.launcher import LocalMesh

A, D, S, W = PowerState.ACTIVE, PowerState.DRAINING, PowerState.STANDBY, PowerState.WAKING


def test_tag_round_trip_and_bound() -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    print("seed", seed)
    rng.seed(seed)
    for _ in range(500):
        p = PeerCapacity("n", "r", "z", rng.choice([A, D, S, W]),
                         float(rng.randrange(2_000_000_000)), float(rng.randrange(1, 4096)),
                         float(rng.randrange(0, 4096)), rng.randrange(0, 10**7),
                         rng.random() < 0.5, rng.randrange(0, 10**7),
                         round(rng.uniform(0, 5000), 1))
        text = encode_tag(p)
        assert len(text) <= 48, text
        q = decode_tag("n", "r", "z", text)
        assert q is not None
        assert (q.state, q.since_s, q.slots, q.busy, q.pinned, q.idle_watts) == (
            p.state, p.since_s, p.slots, p.busy, p.pinned, p.idle_watts)
        assert q.queued == min(MAX_COUNT, p.queued)
        assert q.sole_copies == min(MAX_COUNT, p.sole_copies)


@pytest.mark.parametrize("text", ["", "x1:4:0:0:0:10", "a1:4:0:0:0", "a1:4:0:0:0:10:q",
                                  "a1:4:-1:0:0:10", "a1:nan:0:0:0:10", "a1:4:0:x:0:10",
                                  "a1:4:0:0:0:10:p:extra", "ainf:4:0:0:0:10"])
def test_damaged_tags_are_left_out(text: str) -> None:
    assert decode_tag("n", "r", "z", text) is None


def test_states_from_tags() -> None:
    assert power_state({}) is None and not placement_standby({})
    assert power_state({POWER_TAG: "s1:1:0:0:0:1"}) is S
    assert placement_standby({POWER_TAG: "d1:1:0:0:0:1"})
    assert placement_standby({POWER_TAG: "s1:1:0:0:0:1"})
    assert not placement_standby({POWER_TAG: "w1:1:0:0:0:1"})
    assert not placement_standby({POWER_TAG: "a1:1:0:0:0:1"})


class FakeWorkers:
    def __init__(self) -> None:
        self.on_demand: Any = None
        self.running = True
        self.stops = 0
        self.starts = 0

    def workers_running(self) -> bool:
        return self.running

    async def stop_workers(self) -> None:
        self.stops += 1
        self.running = False

    async def start_workers(self) -> None:
        self.starts += 1
        self.running = True


class FakeNode:
    """What the driver uses of a node: name, meta, members, tags, events, log."""

    def __init__(self, peers: list[PeerCapacity]) -> None:
        self.name = "n0"
        self.meta = NodeMeta(region="r", zone="z0")
        self.stats = SimpleNamespace(runtime=Counter())
        self.events: list[str] = []
        self.tags: dict[str, str] = {}
        self.members = {p.name: SimpleNamespace(
            name=p.name, state=State.ALIVE, meta=NodeMeta(region=p.region, zone=p.zone,
                                                          tags={POWER_TAG: encode_tag(p)}))
            for p in peers}
        self.m = SimpleNamespace(members=self.members)

    def set_tag(self, key: str, value: str | None) -> None:
        assert value is not None
        self.tags[key] = value

    def record_event(self, kind: str, name: str = "", detail: str = "") -> None:
        self.events.append(f"{kind} {name} {detail}")

    def log(self, level: str, event: str, **fields: Any) -> None:
        pass

    def log_limited(self, event: str, **fields: Any) -> None:
        raise AssertionError(f"{event}: {fields}")


def driver(peers: int = 4) -> tuple[CapacityDriver, FakeNode, FakeWorkers]:
    view = [PeerCapacity(f"m{i}", "r", f"z{i % 2}", A, 0.0, 4.0) for i in range(peers)]
    node, workers = FakeNode(view), FakeWorkers()
    cfg = CapacityConfig(mode="consolidate", min_dwell_s=0, drain_confirm_s=0,
                         min_active_per_region=2, drain_step_fraction=1.0)
    d = CapacityDriver(node, CapacitySettings(config=cfg), workers,  # type: ignore[arg-type]
                       slots=4.0, idle_watts=500.0, load=lambda: (0.0, 0))
    return d, node, workers


def test_driver_sleeps_stops_workers_and_a_demand_wakes_it() -> None:
    d, node, workers = driver()

    async def run() -> None:
        d.step()
        assert d.state is D and node.tags[POWER_TAG].startswith("d")
        d.step()
        assert d.state is S
        await d._converge()
        assert workers.stops == 1 and not workers.running
        assert node.tags[POWER_TAG].startswith("s")
        assert workers.on_demand is not None
        workers.on_demand()  # a task granted here found no workers
        assert d.state is W
        await d._converge()
        assert workers.starts == 1 and d.state is A
        assert node.stats.runtime["capacity_wake_to_task_ms_last"] >= 0

    asyncio.run(run())
    kinds = [e.split(": ")[0] for e in node.events]
    assert kinds == ["capacity n0 active -> draining", "capacity n0 draining -> standby",
                     "capacity n0 standby -> waking", "capacity n0 waking -> active"]
    assert all(": " in e and e.split(": ", 1)[1] for e in node.events)


def test_mode_off_publishes_nothing_until_an_operator_hold() -> None:
    d, node, _ = driver()
    d.settings = CapacitySettings()
    d.ctl.config = d.settings.config
    d._publish(force=True)
    d.step()
    assert d.state is A and POWER_TAG not in node.tags  # no tag churn with mode off
    assert d.hold() is None and d.state is D and node.tags[POWER_TAG].startswith("d")
    d.release()
    assert d.state is A and node.tags[POWER_TAG].startswith("a")


def test_minimum_larger_than_the_region_is_refused_where_known(tmp_path: Path) -> None:
    # LocalMesh knows the whole topology: 4 nodes over two regions, 2 per region.
    args = {"energy_mode": "consolidate", "energy_min_active_per_region": 3}
    with pytest.raises(ValueError, match="energy_min_active_per_region: 3 is more than"):
        LocalMesh(tmp_path, 4, node_settings=args)
    with pytest.raises(ValueError, match=r"energy_min_active\.eu-west: 5 is more than"):
        LocalMesh(tmp_path, 4, node_settings={"energy_mode": "consolidate",
                                              "energy_min_active": {"eu-west": "5"}})
    with pytest.raises(ValueError, match="energy_headroom_fraction"):
        LocalMesh(tmp_path, 4, node_settings={**args, "energy_headroom_fraction": 2.0})
    LocalMesh(tmp_path, 6, node_settings=args)  # three per region: fine
    LocalMesh(tmp_path, 4, node_settings={"energy_min_active_per_region": 9})  # mode off


def test_local_mesh_deals_a_region_over_the_zones_asked_for(tmp_path: Path) -> None:
    # Default: three zones per region; zones_per_region=2 gives two zones of three.
    three = LocalMesh(tmp_path / "a", 6, regions=["eu-west"], http=False)
    assert [n.zone for n in three.nodes] == ["eu-west-z1", "eu-west-z2", "eu-west-z3"] * 2
    two = LocalMesh(tmp_path / "b", 6, regions=["eu-west"], http=False, zones_per_region=2)
    assert [n.zone for n in two.nodes] == ["eu-west-z1", "eu-west-z2"] * 3
    # The minimums are checked against the zones as dealt: 3 per zone fits two zones of
    # three, not three zones of two.
    args = {"energy_mode": "consolidate", "energy_min_active_per_zone": 3}
    LocalMesh(tmp_path / "c", 6, regions=["eu-west"], http=False, zones_per_region=2,
              node_settings=args)
    with pytest.raises(ValueError, match="energy_min_active_per_zone: 3 is more than"):
        LocalMesh(tmp_path / "d", 6, regions=["eu-west"], http=False, node_settings=args)
    # A mesh smaller than the default zone count (most tests' meshes) uses a zone per node.
    small = LocalMesh(tmp_path / "e", 2, regions=["eu-west"], http=False)
    assert [n.zone for n in small.nodes] == ["eu-west-z1", "eu-west-z2"]
    for bad in (0, 65):
        with pytest.raises(ValueError, match="zones_per_region"):
            LocalMesh(tmp_path / "f", 2, zones_per_region=bad)


def test_a_node_says_once_when_its_region_is_below_the_minimum() -> None:
    d, node, _ = driver(peers=1)  # two nodes in region r; the minimum is two: fine
    d._started -= 60
    d.step()
    assert not any("more than" in e for e in node.events)
    d.settings = CapacitySettings(config=CapacityConfig(mode="consolidate",
                                                        min_active_per_region=3))
    d.ctl.config = d.settings.config
    d.step()
    d.step()
    warned = [e for e in node.events if "more than" in e]
    assert len(warned) == 1 and "energy_min_active_per_region 3" in warned[0], node.events
