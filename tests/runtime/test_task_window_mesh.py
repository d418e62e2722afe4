"""Maps longer than a node takes (#24): a 3-node mesh whose nodes own at most
``MAX_PENDING`` unfinished tasks each. ``map`` and ``imap`` of many times that many
tasks wait on the node's typed ``busy`` answer instead of failing, keep a window in
flight, and give every result back in order; the owner keeps only a bounded number of
full records for the tasks that ended."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import meshscale
from meshscale.client.tasks import TaskMesh
from meshscale.core.api import Empty
from meshscale.core.api.tasks import TASK_STATS
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(300)
MAX_PENDING = 16
MAX_RECORDS = 50


def square(x: int) -> int:
    return x * x


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("window"), 3, http=False,
                   node_settings={"max_pending_tasks": MAX_PENDING,
                                  "max_task_records": MAX_RECORDS, "cpus": 2}) as m:
        yield m


def _stats(c: TaskMesh) -> dict[str, int]:
    st = c._run(c._inner._request(TASK_STATS, Empty()))
    return {**st.scheduling, "records": st.records}


def test_a_map_of_many_times_the_nodes_bound_gets_every_result_in_order(
        mesh: LocalMesh) -> None:
    n = 20 * MAX_PENDING
    with meshscale.connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as c:
        # The client's window (4096 by default) is far above the node's bound: the
        # node answers busy, and the client narrows its window and waits.
        said: list[tuple[int, int]] = []
        futs = c.map(square, range(n), progress=lambda sent, total: said.append((sent, total)))
        assert len(futs) == n
        assert said[-1] == (n, n) and [s for s, _ in said] == sorted(s for s, _ in said)
        assert c.gather(futs, timeout=240) == [x * x for x in range(n)]
        refused = _stats(c).get("submits_refused.overloaded", 0)
        assert refused > 0, "the node never said busy: the test did not test the wait"

        # imap: a generator with no length, results in order as they come.
        seen = list(c.imap(square, (x for x in range(n)), progress=True))
        assert seen == [x * x for x in range(n)]
        # The owner keeps at most its bound of ended records in memory (the rest are
        # in the KV), however many tasks it owned ...
        assert _stats(c)["records"] <= MAX_RECORDS
        # ... and still answers for the ones it dropped (from the KV), and lists the
        # newest, ended, with where they ran.
        assert c.future(futs[0].task_id).result(timeout=60) == 0
        assert c.future(futs[-1].task_id).result(timeout=60) == (n - 1) ** 2
        rows = c.tasks(limit=10)
        assert len(rows) == 10 and all(r["state"] == "done" and r["node"] for r in rows)
        assert [r["submitted"] for r in rows] == sorted((r["submitted"] for r in rows),
                                                        reverse=True)


def test_a_failed_task_raises_at_its_place_in_imap(mesh: LocalMesh) -> None:
    def fails_at_7(x: int) -> int:
        if x == 7:
            raise ValueError(f"no {x}")
        return x

    with meshscale.connect(mesh.nodes[1].address, bundle=mesh.bundle_path,
                           map_window_tasks=5) as c:
        got: list[int] = []
        with pytest.raises(ValueError, match="no 7"):
            for v in c.imap(fails_at_7, range(3 * MAX_PENDING)):
                got.append(v)
        assert got == list(range(7))


def test_window_and_give_up_are_checked() -> None:
    with pytest.raises(ValueError, match="map_window_tasks"):
        meshscale.connect("127.0.0.1:1", map_window_tasks=0)
    with pytest.raises(ValueError, match="busy_give_up_s"):
        meshscale.connect("127.0.0.1:1", busy_give_up_s=0)
