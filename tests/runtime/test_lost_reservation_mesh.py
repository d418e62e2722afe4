"""A node killed while it holds only reservations of an owner (no task of that owner
bound there) is checked at once too (issue #19): the owner's task waiting on that
reservation waits on the node as much as a bound one would. Before, the owner checked a
node whose connection broke only when a task of its own was bound there, and the
reservation stayed counted until membership's verdict. The mesh's suspicion timeout is
far longer than the test, so only the early check can pass."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from runtime_mesh import host_like_dir, wait_for

from meshscale.client.tasks import TaskMesh, connect, task
from meshscale.core.api import Empty
from meshscale.core.api.node import MEMBERS
from meshscale.core.api.tasks import TASK_STATS
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(240)

SUSPICION_MULT = 200.0
"""A suspected member is declared dead after at least 200 x log10(4) x 0.75 s = 90 s."""


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    # node-0 and node-2 in eu-west, node-1 and node-3 in us-east, one slot each.
    with host_like_dir("meshscale-lost-reservation-") as directory, LocalMesh(
            directory, 4, regions=["eu-west", "us-east"], http=False,
            node_settings={"cpus": 1, "suspicion_mult": SUSPICION_MULT}) as m:
        yield m


def sleeps(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _stats(c: TaskMesh) -> tuple[dict[str, int], dict[str, int]]:
    st = c._run(c._inner._trequest(TASK_STATS, Empty()))
    return dict(st.compute), dict(st.scheduling)


def test_a_node_holding_only_reservations_is_checked_when_killed(
    client: TaskMesh, mesh: LocalMesh
) -> None:
    from meshscale import Region

    us = Region("us-east")
    other = connect(mesh.nodes[2].address, bundle=mesh.bundle_path)
    try:
        # Both us-east slots busy with tasks another owner (node-2) runs there.
        long = task(sleeps, placement=us)
        busy = [other.submit(long, 600.0) for _ in range(2)]
        ids = {f.task_id for f in busy}
        wait_for(lambda: sorted(r["node"] for r in other.tasks(50)
                                if r["task_id"] in ids and r["state"] == "running")
                 == ["node-1", "node-3"], 60, "both us-east slots busy")
        # node-0's task queues a reservation at each: nothing of node-0 is bound there.
        waiting = client.submit(task(sleeps, placement=us), 0.0)
        wait_for(lambda: _stats(client)[1].get("probes_sent", 0) >= 2, 30,
                 "the reservations sent")
        assert next(r for r in client.tasks(50)
                    if r["task_id"] == waiting.task_id)["state"] != "running"
        before = _stats(client)[0].get("runners_lost_early", 0)
        victim = mesh.nodes[1]
        assert victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        wait_for(lambda: _stats(client)[0].get("runners_lost_early", 0) > before, 30,
                 "node-0 checking the killed node that held its reservation")
        scheduling = _stats(client)[1]
        assert scheduling.get("runners_unreachable", 0) >= 1, scheduling
        # Membership has not decided yet: the victim is still a member.
        members = {m.name: m.state
                   for m in client._run(client._inner._trequest(MEMBERS, Empty()))}
        assert members[victim.name] in ("alive", "suspect"), members
    finally:
        other.close()
