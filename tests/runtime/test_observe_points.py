"""The node's one-second ring (``runtime/observe.py``): bounded to the last hour, each point
carrying tasks done and failed and what the node used, and ``node.points`` bounded."""

from __future__ import annotations

import types
from collections import deque
from pathlib import Path
from typing import Any, cast

import pytest

from meshscale.core.api import ApiError
from meshscale.core.api.contract import parse_request
from meshscale.core.api.node import MAX_POINTS_REPLY, POINTS
from meshscale.core.tasks import TaskRecord, TaskState
from meshscale.runtime.config import AgentStats
from meshscale.runtime.observe import THROUGHPUT_POINTS, NodeObserver, ObservedNode


class FakeAgent:
    """What ``NodeObserver.tick`` reads of a node, and nothing else."""

    def __init__(self, data_dir: Path) -> None:
        self.name = "n0"
        self.data_dir = data_dir
        self.stats = AgentStats()
        self.power = types.SimpleNamespace(utilisation=0.25)
        self.dataplane = None
        self.compute = None
        self.with_dataplane = False
        self.events: deque[Any] = deque()

    def record_event(self, *args: Any) -> None:
        self.events.append(args)


def observer(tmp_path: Path) -> tuple[NodeObserver, FakeAgent]:
    agent = FakeAgent(tmp_path)
    obs = NodeObserver(cast(ObservedNode, agent))
    obs._last_tick = 0.0
    return obs, agent


def test_ring_keeps_the_last_hour_and_no_more(tmp_path: Path) -> None:
    assert THROUGHPUT_POINTS == 3600
    obs, _ = observer(tmp_path)
    used = {"memory_rss_bytes": 1, "disk_free_bytes": 2, "disk_used_bytes": 3}
    for k in range(1, THROUGHPUT_POINTS + 151):
        obs.tick(float(k), used)
    pts = obs.throughput()
    assert len(pts) == THROUGHPUT_POINTS
    assert len(obs.points) == THROUGHPUT_POINTS
    # the oldest 150 seconds went; the newest is last
    assert pts[0]["t"] <= pts[-1]["t"]
    assert obs.throughput(10) == pts[-10:]
    assert obs.throughput(0) == []


def test_point_carries_failures_and_resources(tmp_path: Path) -> None:
    obs, agent = observer(tmp_path)
    obs.tick(1.0)  # the first second: no network rate yet (no earlier counter)
    first = obs.points[-1]
    assert first["net_in_bytes_per_s"] is None
    for state in ("done", "done", "failed"):
        obs._task_ended(TaskRecord(task_id="t", owner="n0", fn_id="f",
                                   state=TaskState(state)), 0.01)
    agent.stats.count_in("gossip", 3000)
    agent.stats.bytes_out["gossip"] += 1000
    obs.tick(3.0)  # two seconds later
    p = obs.points[-1]
    assert p["tasks_done_per_s"] == 1.0
    assert p["tasks_failed_per_s"] == 0.5
    assert p["net_in_bytes_per_s"] == 1500.0
    assert p["net_out_bytes_per_s"] == 500.0
    assert p["cpu_ratio"] == 0.25
    assert p["memory_rss_bytes"] is not None and p["memory_rss_bytes"] > 10_000_000
    assert p["disk_free_bytes"] > 0 and p["disk_used_bytes"] > 0
    obs.tick(4.0)
    assert obs.points[-1]["tasks_failed_per_s"] == 0.0


def test_node_points_reply_is_bounded(tmp_path: Path) -> None:
    obs, _ = observer(tmp_path)
    for k in range(1, 21):
        obs.tick(float(k), {"memory_rss_bytes": 1, "disk_free_bytes": 2,
                            "disk_used_bytes": 3})
    reply = obs.node_points(parse_request(POINTS, {"last": 5}))
    assert reply.name == "n0" and len(reply.points) == 5
    assert reply.points[-1].t == obs.points[-1]["t"]
    with pytest.raises(ApiError, match="last"):
        parse_request(POINTS, {"last": MAX_POINTS_REPLY + 1})


def test_mesh_points_asks_only_for_the_new_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import time

    wall = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: wall[0])  # a point's t: one per second

    from meshscale.core.membership import State

    obs, agent = observer(tmp_path)
    asked: list[int] = []

    async def call_local(method: Any, req: Any) -> Any:
        assert method is POINTS
        asked.append(req.last)
        return obs.node_points(req)

    agent.m = types.SimpleNamespace(  # type: ignore[attr-defined]
        members={"n0": types.SimpleNamespace(name="n0", state=State.ALIVE)})
    agent.call_local = call_local  # type: ignore[attr-defined]
    used = {"memory_rss_bytes": 1, "disk_free_bytes": 2, "disk_used_bytes": 3}
    for k in range(1, 201):
        wall[0] = 1_000_000.0 + k
        obs.tick(float(k), used)
    first = asyncio.run(obs.mesh_points(per_node=120))
    assert asked == [120]
    assert len(first["nodes"]["n0"]) == 120 and first["nodes_answered"] == 1
    for k in range(201, 203):  # at most elapsed + 1 new seconds since the last ask
        wall[0] = 1_000_000.0 + k
        obs.tick(float(k), used)
    second = asyncio.run(obs.mesh_points(per_node=120))
    assert asked[1] == 2, asked  # the (whole) seconds since the last ask, plus two
    pts = second["nodes"]["n0"]
    assert len(pts) == 120 and pts[-1]["t"] == obs.points[-1]["t"]
    assert [p["t"] for p in pts] == [1_000_000.0 + k for k in range(83, 203)]
    assert sum(p["tasks_done_per_s"] for p in second["total"]) == 0
    agent.m.members.clear()  # type: ignore[attr-defined]
    assert asyncio.run(obs.mesh_points())["nodes"] == {}
    assert obs._mesh_pts == {}
