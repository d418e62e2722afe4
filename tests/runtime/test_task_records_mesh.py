"""Task records on real node processes, written in batches (``core.tasks.RecordQueue``,
``kv.put_batch``): lone tasks share record writes, every task's end still reaches the
replicated KV, a submit's record is durable before its answer, and an owner that dies
before an end was written leaves its task to run again where it is taken over."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import msgspec
import pytest
from runtime_mesh import host_like_dir, wait_for

from meshscale.client.tasks import TaskError, TaskMesh, connect
from meshscale.core.api import Empty
from meshscale.core.api.tasks import TASK_STATS
from meshscale.core.tasks import TaskRecord
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(240)

WINDOW_S = 2.0
"""The nodes' ``task_record_window_s``: wide, so an end still waits when the test acts."""
GRACE_S = 0.2
"""The nodes' ``task_submit_grace_s``: wide, so a lone no-op is answered with its outcome
and its one record is its end, which waits for company, even on a loaded machine (at
the default 5 ms, a CI run beside another mesh test answered every submit after its
record: each end then joined its own submit's write, 13 batches of one key)."""
_decode = msgspec.msgpack.Decoder(TaskRecord).decode


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    with host_like_dir("meshscale-rec-") as directory, \
            LocalMesh(directory, 4, regions=["eu-west", "us-east"],
                      node_settings={"task_record_window_s": WINDOW_S,
                                     "task_submit_grace_s": GRACE_S}) as m:
        yield m


def square(k: int) -> int:
    return k * k


def nap(k: int, seconds: float) -> int:
    time.sleep(seconds)
    return k * k


def compute_stats(c: TaskMesh) -> dict[str, int]:
    return dict(c._run(c._inner._trequest(TASK_STATS, Empty())).compute)


def kv_stats(c: TaskMesh) -> dict[str, int]:
    """The node's KV counters (``dp.stats``)."""
    got = c._run(c._inner._call("dp.stats", {}))
    return {k: int(v) for k, v in got["dataplane"].items() if k.startswith("kv_")}


def test_lone_tasks_share_record_writes_and_each_end_reaches_the_store(
        mesh: LocalMesh) -> None:
    owner = connect(mesh.nodes[1].address, bundle=mesh.bundle_path)
    other = connect(mesh.nodes[2].address, bundle=mesh.bundle_path)
    try:
        before, dp_before = compute_stats(owner), kv_stats(owner)
        futs = []
        for k in range(12):  # one at a time, each answered before the next is sent
            f = owner.submit(square, k)
            assert f.result(timeout=60) == k * k
            futs.append(f)

        def ended_in_store() -> bool:
            for f in futs:
                data = other.kv.get(f"task/{f.task_id}", binary=True)
                if data is None or _decode(data).state != "done":
                    return False
            return True

        wait_for(ended_in_store, 60, "every task's end in the replicated KV")
        after, dp_after = compute_stats(owner), kv_stats(owner)
        records = after["record_writes"] - before.get("record_writes", 0)
        # Each task's end at least (and its submit record when its answer did not
        # carry the outcome).
        assert records >= 12
        # The ends waited for company: the owner's KV writes carried several records.
        batches = dp_after["kv_batches"] - dp_before.get("kv_batches", 0)
        keys = dp_after["kv_batch_keys"] - dp_before.get("kv_batch_keys", 0)
        assert 1 <= batches < keys <= records, (batches, keys, records)
    finally:
        owner.close()
        other.close()


def test_an_owner_dead_before_writing_an_end_leaves_the_task_to_run_again(
        mesh: LocalMesh) -> None:
    owner_node = mesh.nodes[3]
    owner = connect(owner_node.address, bundle=mesh.bundle_path)
    other = connect(mesh.nodes[0].address, bundle=mesh.bundle_path)
    try:
        # Longer than the submit grace: the answer waits for its submit record.
        f = owner.submit(nap, 7, 0.3)
        assert f.result(timeout=60) == 49
        assert owner_node.proc is not None
        os.kill(owner_node.proc.pid, signal.SIGKILL)  # its end still waits for company
        owner_node.proc.wait()
        data = other.kv.get(f"task/{f.task_id}", binary=True)
        assert data is not None, "the submit record was not durable before the answer"
        assert _decode(data).state != "done"
        # At least once: the node taking the task over runs it again.
        assert other.future(f.task_id).result(timeout=120) == 49
        adopted = 0
        for n in mesh.nodes:
            if n.proc is None or n.proc.poll() is not None:
                continue
            c = connect(n.address, bundle=mesh.bundle_path)
            try:
                adopted += compute_stats(c).get("tasks_adopted", 0)
            finally:
                c.close()
        assert adopted == 1
    finally:
        owner.close()
        other.close()


def test_a_task_answered_before_its_record_is_written_is_found_from_another_node(
        mesh: LocalMesh) -> None:
    """A lone no-op answered with its outcome (the submit grace) has one record, its end,
    and it waits in its owner's record window (2 s here) for company. Another node asked
    for the task meanwhile finds no record in the KV: it must not call the task lost (a
    client would take that as the task's end), but answer once the record is written.
    An id no node ever had is still answered unknown, once its record has been missing
    for longer than a record could wait."""
    owner = connect(mesh.nodes[1].address, bundle=mesh.bundle_path)
    other = connect(mesh.nodes[2].address, bundle=mesh.bundle_path)
    try:
        for k in range(3):  # the owner learns that square ends within the grace
            assert owner.submit(square, k).result(timeout=60) == k * k
        f = owner.submit(square, 5)
        assert f.result(timeout=60) == 25
        # The premise: the end still waits in the owner's window (2 s).
        assert other.kv.get(f"task/{f.task_id}", binary=True) is None
        assert other.future(f.task_id).running() is False  # not "unknown task"
        assert other.future(f.task_id).result(timeout=60) == 25
        with pytest.raises(TaskError, match="no node knows this task") as e:
            other.future("0" * 32).result(timeout=60)
        assert e.value.kind == "unknown"
    finally:
        owner.close()
        other.close()
