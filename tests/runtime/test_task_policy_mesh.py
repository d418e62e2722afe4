"""A classed task whose class is narrowed while it runs, on real node processes (5 nodes,
3 regions): its owner stops it on a runner the class's *current* rule leaves out and places
it again only inside that rule (``core.policy.placement_residency``), or fails it naming
the rule when the new rule leaves it no region (issue #15)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_mesh import host_like_dir, wait_for

from meshscale.client.tasks import TaskError, TaskMesh, connect, task
from meshscale.core.api import Empty
from meshscale.core.api.tasks import TASK_STATS
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(300)

REGIONS = ["eu-west", "eu-central", "us-east"]
OWNER = 2  # us-east: outside the class, so the owner never runs (and is never killed)


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    # 5 nodes: eu-west x2, eu-central x2, us-east x1 (regions assigned round-robin).
    with host_like_dir("meshscale-taskpol-") as directory, \
            LocalMesh(directory, 5, regions=REGIONS) as m:
        yield m


def held_until(flag: str) -> int:
    """Run as a task: wait until ``flag`` exists, then the pid of this worker's node."""
    deadline = time.monotonic() + 240
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.getppid()


def sched_stat(client: TaskMesh, key: str) -> int:
    stats: Any = client._run(client._inner._trequest(TASK_STATS, Empty()))
    return int(stats.scheduling.get(key, 0))


def running_on(client: TaskMesh, task_id: str) -> str | None:
    for r in client.tasks(100):
        if r["task_id"] == task_id and r["state"] == "running" and r.get("node"):
            return str(r["node"])
    return None


def test_a_running_task_is_stopped_where_its_class_no_longer_allows(
    mesh: LocalMesh,
) -> None:
    region_of = {n.name: n.region for n in mesh.nodes}
    by_pid = {n.proc.pid: n for n in mesh.nodes if n.proc is not None}
    flags = mesh.directory  # traversable by the worker user
    with connect(mesh.nodes[OWNER].address, bundle=mesh.bundle_path) as client:
        client.policies.set("tp", ["eu-west", "eu-central"], replicas=1)

        # 1. Submitted for eu-central only; while it runs the class is narrowed to
        # eu-west: no region is left, so it is stopped and fails naming the rule, at
        # once (its body would wait for the flag for minutes).
        flag_a = str(flags / "release-a")
        fut = client.submit(task(data_class="tp", residency=["eu-central"], retries=0)(
            held_until), flag_a)
        runner = wait_for(lambda: running_on(client, fut.task_id), 90, "task a running")
        assert region_of[runner] == "eu-central"
        client.policies.set("tp", ["eu-west"], replicas=1)
        with pytest.raises(TaskError) as e:
            fut.result(timeout=120)
        Path(flag_a).touch()
        assert "residency" in str(e.value) and "class tp" in str(e.value), e.value
        assert "regions={eu-west}" in str(e.value), e.value

        # 2. Submitted under the class's two regions; it runs in one of them; the class
        # is narrowed to the other: it is stopped where it ran and runs again only in
        # the other, its first runner alive all along.
        client.policies.set("tp", ["eu-west", "eu-central"], replicas=1)
        flag_b = str(flags / "release-b")
        fut = client.submit(task(data_class="tp")(held_until), flag_b)
        runner = wait_for(lambda: running_on(client, fut.task_id), 90, "task b running")
        first = region_of[runner]
        other = ({"eu-west", "eu-central"} - {first}).pop()
        before = sched_stat(client, "policy_stopped")
        client.policies.set("tp", [other], replicas=1)
        wait_for(lambda: (n := running_on(client, fut.task_id)) is not None and n != runner,
                 90, "task b running again")
        assert sched_stat(client, "policy_stopped") > before
        Path(flag_b).touch()
        pid = fut.result(timeout=120)
        assert by_pid[pid].region == other, (by_pid[pid].name, first, other)
        assert region_of[fut.node] == other
        victim = next(n for n in mesh.nodes if n.name == runner)
        assert victim.proc is not None and victim.proc.poll() is None  # not a lost runner
