"""A crash's re-replication from a node that runs tasks goes at the busy pace (issue #19:
repair must not take the cores the remaining tasks need), on real node processes.

Every node is kept running tasks; one holder of a two-copy object is SIGKILLed; the
other holder copies the object to the third node while its own task runs, so its
chunks past the first are paced (``repair_paced`` counts the waits) and the object is
back to two copies. ``tests/core/test_repair_throttle.py`` has the limits themselves."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from runtime_mesh import host_like_dir

from meshscale.client.tasks import TaskMesh, connect
from meshscale.core.api import Empty
from meshscale.core.api.tasks import TASK_STATS
from meshscale.runtime.launcher import LocalMesh
from waiting import wait_for

pytestmark = pytest.mark.timeout(240)

OBJECT_BYTES = 10 << 20  # three 4 MiB chunks: the first from the burst, two paced
TASKS = 9  # three a node at one slot each: every node busy well past the repair
TASK_S = 8.0


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    with host_like_dir("meshscale-rthrottle-") as directory, \
            LocalMesh(directory, 3, regions=["eu-west", "us-east", "ap-south"], http=False,
                      node_settings={"cpus": 1}) as m:
        yield m


def hold(blob: bytes, seconds: float) -> int:
    time.sleep(seconds)
    return len(blob)


def dp_counter(c: TaskMesh, name: str) -> int:
    stats = c._run(c._inner._call("dp.stats", {}))
    return int(stats.get("dataplane", {}).get(name, 0))


def test_a_busy_holder_paces_the_copy_that_replaces_a_dead_one(mesh: LocalMesh) -> None:
    by_name = {n.name: n for n in mesh.nodes}
    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as c:
        ref = c.put(os.urandom(OBJECT_BYTES), replicas=2, w=2)
        holders = sorted(c.stat(ref).holders)
        assert len(holders) == 2
        # The victim is a holder other than the node this client talks to.
        victim = next(h for h in reversed(holders) if h != mesh.nodes[0].name)
        survivor = next(h for h in holders if h != victim)
        third = next(n.name for n in mesh.nodes if n.name not in holders)
        with connect(by_name[survivor].address, bundle=mesh.bundle_path) as s:
            paced_before = dp_counter(s, "repair_paced")
            futs = [c.submit(hold, ref, TASK_S) for _ in range(TASKS)]
            wait_for(lambda: running(s) >= 1, 60, "a task running on the survivor")
            proc = by_name[victim].proc
            assert proc is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            info = wait_for(lambda: (i if set((i := c.stat(ref)).holders) == {survivor, third}
                                     else None), 120, "the object's second copy on the third node")
            assert victim not in info.holders
            paced = dp_counter(s, "repair_paced") - paced_before
            assert paced >= 1, f"the survivor copied {OBJECT_BYTES} bytes unpaced while busy"
        for f in futs:
            assert f.result(timeout=180) == OBJECT_BYTES


def running(c: TaskMesh) -> int:
    """Tasks running on the node ``c`` talks to (its load report)."""
    st = c._run(c._inner._trequest(TASK_STATS, Empty()))
    return int(st.load.running)
