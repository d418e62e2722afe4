"""A task whose runner is SIGKILLed runs again elsewhere before membership's verdict
(issue #19): the owner takes the crash's closed connections as evidence, checks the node
with a fresh connection (refused), and re-places the task at once. The mesh's suspicion
timeout is set far longer than the test, so a result that comes only after the verdict
cannot pass: the victim must still be a member (alive or suspect) in the owner's view
when the re-run's result arrives."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_mesh import host_like_dir, wait_for

from meshscale.client.tasks import TaskMesh, task
from meshscale.core.api import Empty
from meshscale.core.api.node import MEMBERS
from meshscale.core.api.tasks import TASK_STATS
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(240)

SUSPICION_MULT = 200.0
"""A suspected member is declared dead after at least 200 x log10(4) x 0.75 s = 90 s
(and 4 x that with nobody confirming): far beyond the waits below."""


@pytest.fixture(scope="module")
def marker_dir() -> Iterator[Path]:
    # Writable by the worker user (a node run as root runs its workers as nobody).
    with host_like_dir("meshscale-lost-runner-") as directory:
        shared = directory / "markers"
        shared.mkdir()
        shared.chmod(0o777)
        yield shared


@pytest.fixture(scope="module")
def mesh(marker_dir: Path) -> Iterator[LocalMesh]:
    # Two regions, two nodes each: a task for us-east runs on node-1 or node-3, and the
    # other one can take it over; the owner (node-0) is in eu-west.
    with LocalMesh(marker_dir.parent, 4, regions=["eu-west", "us-east"], http=False,
                   node_settings={"cpus": 1, "suspicion_mult": SUSPICION_MULT}) as m:
        yield m


def first_run_hangs(marker: str) -> int:
    """The first run (it makes the marker) sleeps far past the test; a re-run returns."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return os.getpid()
    os.close(fd)
    time.sleep(600)
    return -1


def test_killed_runner_task_reruns_before_the_membership_verdict(
    client: TaskMesh, mesh: LocalMesh, marker_dir: Path
) -> None:
    from meshscale import Region

    marker = marker_dir / "first-run"
    hang = task(first_run_hangs, placement=Region("us-east"))
    fut = client.submit(hang, str(marker))
    # Running, on a us-east node, its marker made (the worker is inside the function).
    wait_for(lambda: marker.exists() and any(
        r["task_id"] == fut.task_id and r["state"] == "running" for r in client.tasks(50)),
        60, "the task running")
    row = next(r for r in client.tasks(50) if r["task_id"] == fut.task_id)
    victim = next(n for n in mesh.nodes if n.name == row["node"])
    assert victim.region == "us-east" and victim is not mesh.nodes[0]
    assert victim.proc is not None
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()

    assert fut.result(timeout=60) > 0  # the re-run (the first run never returns)
    # Membership has not decided yet: the victim is still a member in the owner's view.
    members = {m.name: m.state
               for m in client._run(client._inner._trequest(MEMBERS, Empty()))}
    assert members[victim.name] in ("alive", "suspect"), members
    assert fut.node is not None and fut.node != victim.name
    other = next(n for n in mesh.nodes if n.region == "us-east" and n is not victim)
    assert fut.node == other.name
    stats = client._run(client._inner._trequest(TASK_STATS, Empty()))
    assert stats.compute.get("runners_lost_early", 0) >= 1, stats.compute
    assert stats.scheduling.get("replaced_unreachable", 0) >= 1, stats.scheduling
