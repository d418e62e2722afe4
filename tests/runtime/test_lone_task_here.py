"""A caller's loop of lone tasks on real node processes: each runs on the owner's own free
slot, never by way of reservations on other nodes (issue #19: the owner scored itself by
its view entry's snapshot, which still showed a run or a map's queue, and by the tasks it
had bound here without a ``Result`` yet; most lone no-ops of ``bench/tasks.py`` then went
to a remote node, a round of reservations more each)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from runtime_mesh import host_like_dir

from meshscale.client.tasks import TaskMesh, connect
from meshscale.core.api import Empty
from meshscale.core.api.tasks import TASK_STATS
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(240)

LONE_TASKS = 400


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    # One slot per node, as the benchmark's mesh: a node running one task has none free.
    with host_like_dir("meshscale-lone-") as directory, \
            LocalMesh(directory, 4, regions=["eu-west", "us-east", "ap-south"], http=False,
                      node_settings={"cpus": 1}) as m:
        yield m


def noop(i: int) -> int:
    return i


def scheduling_stats(c: TaskMesh) -> dict[str, int]:
    return dict(c._run(c._inner._trequest(TASK_STATS, Empty())).scheduling)


def test_lone_tasks_after_a_map_run_on_the_owner(mesh: LocalMesh) -> None:
    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as c:
        # A map first, as the benchmark does: the owner's view entry shows its queue.
        assert c.gather(c.map(noop, range(200)), timeout=120) == list(range(200))
        before = scheduling_stats(c)
        for i in range(LONE_TASKS):
            assert c.submit(noop, i).result(timeout=60) == i
        after = scheduling_stats(c)
    delta = {k: after.get(k, 0) - before.get(k, 0)
             for k in ("bound", "bound_here", "probes_sent")}
    assert delta == {"bound": LONE_TASKS, "bound_here": LONE_TASKS, "probes_sent": 0}


def compute_stats(c: TaskMesh) -> dict[str, int]:
    return dict(c._run(c._inner._trequest(TASK_STATS, Empty())).compute)


def test_a_map_s_grants_ride_in_the_replies_to_the_asks(mesh: LocalMesh) -> None:
    """The owner's answers to a worker's ``GetTask`` (its ``Grant`` or ``NoTask``, and the
    reservations waiting for that worker) go back in the reply to the worker's own call
    (``sched.exchange``), not in a call of their own; and a worker's outcome goes in its
    next scheduling call to the owner, with the task's ``Result``, not in a ``task.done``
    of its own."""
    clients = [connect(n.address, bundle=mesh.bundle_path) for n in mesh.nodes]
    try:
        before = [compute_stats(c) for c in clients]
        runs_before = [scheduling_stats(c) for c in clients]
        owner = clients[0]
        assert owner.gather(owner.map(noop, range(300)), timeout=120) == list(range(300))
        after = [compute_stats(c) for c in clients]
        runs_after = [scheduling_stats(c) for c in clients]
    finally:
        for c in clients:
            c.close()
    keys = ("sched_answers_given", "sched_answers_taken", "tasks_done",
            "outcomes_with_messages")
    delta = [{k: a.get(k, 0) - b.get(k, 0) for k in keys}
             for b, a in zip(before, after, strict=True)]
    ran_elsewhere = sum(a.get("tasks_run", 0) - b.get("tasks_run", 0)
                        for b, a in zip(runs_before[1:], runs_after[1:], strict=True))
    assert delta[0]["tasks_done"] == 300
    assert delta[0]["sched_answers_given"] > 0
    assert sum(d["sched_answers_taken"] for d in delta[1:]) > 0
    # Every outcome of a task run on another node came with the scheduling messages.
    assert ran_elsewhere > 0
    assert delta[0]["outcomes_with_messages"] == ran_elsewhere
