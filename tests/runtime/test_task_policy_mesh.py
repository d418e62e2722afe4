"""A classed task whose class is narrowed while it runs, on real node processes (5 nodes,
3 regions): its owner stops it on a runner the class's *current* rule leaves out and places
it again only inside that rule (``core.policy.placement_residency``), or fails it naming
the rule when the new rule leaves it no region (issue #15)."""

from __future__ import annotations

import os
import pickle
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from runtime_mesh import host_like_dir, wait_for

from meshscale.cli import main as cli_main
from meshscale.client.mesh import MeshError
from meshscale.client.tasks import TaskError, TaskMesh, connect, task
from meshscale.core.api import Empty
from meshscale.core.api.tasks import TASK_STATS
from meshscale.core.tasks import TaskRecord, decode_detail, decode_payload
from meshscale.runtime.launcher import LocalMesh
from stored import copy_bytes

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
        # (migrate: copies of the class made so far, e.g. by earlier tasks, move with it)
        client.policies.set("tp", ["eu-west"], replicas=1, migrate=True)
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
        client.policies.set("tp", [other], replicas=1, migrate=True)
        wait_for(lambda: (n := running_on(client, fut.task_id)) is not None and n != runner,
                 90, "task b running again")
        assert sched_stat(client, "policy_stopped") > before
        Path(flag_b).touch()
        pid = fut.result(timeout=120)
        assert by_pid[pid].region == other, (by_pid[pid].name, first, other)
        assert region_of[fut.node] == other
        victim = next(n for n in mesh.nodes if n.name == runner)
        assert victim.proc is not None and victim.proc.poll() is None  # not a lost runner


OUT_MARK = "printed-marker-7f3a"
ERR_MARK = "raised-marker-91c2"


def leaks(n: int) -> int:
    """Run as a task: print class data on both streams, then raise it."""
    print(f"{OUT_MARK} row {n}")
    print(f"{OUT_MARK} on stderr", file=sys.stderr)
    raise ValueError(f"{ERR_MARK} for customer {n}")


def prints(n: int) -> int:
    print(f"{OUT_MARK} row {n}")
    return n + 1


def test_a_classed_tasks_error_and_output_stay_in_its_class(
    mesh: LocalMesh, capsys: pytest.CaptureFixture[str],
) -> None:
    """What a classed task raises and prints is kept by its runner as one object of its
    class (``core.policy.detail_rule``): its owner, outside the class's regions, keeps
    and answers only the exception's type name and where the object is; the object is
    read from within the class's regions, and the class's read rule refuses it
    elsewhere, naming the rule."""
    eu = next(i for i, n in enumerate(mesh.nodes) if n.region == "eu-west")
    assert mesh.nodes[OWNER].region == "us-east"
    with connect(mesh.nodes[OWNER].address, bundle=mesh.bundle_path) as client, \
            connect(mesh.nodes[eu].address, bundle=mesh.bundle_path) as inside:
        client.policies.set("td", ["eu-west", "eu-central"], replicas=1,
                            cross_region_reads=False)
        fut = client.submit(task(data_class="td", retries=0)(leaks), 7)
        with pytest.raises(TaskError) as e:
            fut.result(timeout=120)
        err = e.value
        seen = f"{err} {err.message} {err.traceback}"
        assert ERR_MARK not in seen and OUT_MARK not in seen, seen
        assert err.kind == "raised" and err.message.startswith("ValueError: "), err.message
        ref = err.detail_ref
        assert ref is not None and ref.data_class == "td", ref
        assert ref.id in str(err) and "class td" in str(err), str(err)
        # The owner's logs and rows, as a client of the owner sees them.
        logs = fut.logs()
        assert OUT_MARK not in logs and ERR_MARK not in logs, logs
        assert ref.id in logs and "class td" in logs, logs
        capsys.readouterr()
        where = ["--node", mesh.nodes[OWNER].address, "--bundle", str(mesh.bundle_path)]
        assert cli_main(["logs", fut.task_id, *where]) == 0
        shown = capsys.readouterr().out
        assert OUT_MARK not in shown and ref.id in shown and "class td" in shown, shown
        rows = [r for r in client.tasks(100) if r["task_id"] == fut.task_id]
        assert rows and ERR_MARK not in str(rows), rows
        # What the owner stored in the KV: the record and the task's log key.
        def stored() -> bytes | None:
            return client.kv.get("task/" + fut.task_id, binary=True)
        record = wait_for(stored, 30, "the task's record in the KV")
        assert ERR_MARK.encode() not in record and OUT_MARK.encode() not in record
        assert ref.id.encode() in record
        log = client.kv.get("tasklog/" + fut.task_id, binary=True)
        assert log is None or (OUT_MARK.encode() not in log and ERR_MARK.encode() not in log)
        # The owner's region may not read the class: refused, naming the rule.
        with pytest.raises(MeshError, match="cross-region read rule"):
            fut.detail()
        # From within the class's regions the object holds all of it.
        detail = inside.future(fut.task_id).detail()
        assert detail is not None and detail.kind == "raised"
        assert ERR_MARK in detail.error and ERR_MARK in detail.traceback
        assert OUT_MARK in detail.stdout and OUT_MARK in detail.stderr
        assert detail.exc is not None and ERR_MARK in str(pickle.loads(detail.exc))
        assert decode_detail(inside.get(ref.id)) == detail

        # A classed task that succeeds: its output is an object of the class too.
        # (Its result is one as well: read from within the regions too.)
        ok = client.submit(task(data_class="td")(prints), 1)
        assert inside.future(ok.task_id).result(timeout=120) == 2
        logs = ok.logs()
        assert OUT_MARK not in logs and "class td" in logs, logs
        kept = inside.future(ok.task_id).detail()
        assert kept is not None and OUT_MARK in kept.stdout and not kept.error

        # An unclassed task: all of it travels inline, as before.
        plain = client.submit(task(retries=0)(leaks), 3)
        with pytest.raises(ValueError, match=ERR_MARK) as pe:
            plain.result(timeout=120)
        assert isinstance(pe.value, TaskError) and pe.value.detail_ref is None
        assert OUT_MARK in plain.logs() and plain.detail() is None


# Made at import, so the test's source (which a client ships with its functions) does
# not hold them.
ARG_MARK = "classed-argument-" + os.urandom(6).hex()
PLAIN_MARK = "plain-argument-" + os.urandom(6).hex()


def held_len(flag: str, secret: str) -> int:
    """Run as a task: wait until ``flag`` exists, then the length of ``secret``."""
    deadline = time.monotonic() + 240
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(secret)


def held_item(item: tuple[str, str]) -> int:
    return held_len(*item)


def capturing(secret: str) -> Callable[[str, str], int]:
    """A function whose pickle carries ``secret`` (a closure cell): class data too."""
    def run(flag: str, arg: str) -> int:
        return held_len(flag, arg) if secret else -1
    return run


def stored_bytes(node: Any) -> list[tuple[str, bytes]]:
    """Everything ``node`` keeps of the mesh's data, read from its disk: every KV value
    (its SQLite store, read-only) and every object's bytes (files and inline)."""
    store = node.data_dir / "store"
    db = sqlite3.connect(f"file:{store / 'meta.sqlite3'}?mode=ro", uri=True)
    try:
        out = [(f"kv {k}", bytes(v)) for k, v in
               db.execute("SELECT key, value FROM kv WHERE value IS NOT NULL")]
    finally:
        db.close()
    for oid, data in copy_bytes(store):  # files and small objects kept inline
        out.append((f"object {oid}", data))
    return out


def test_a_classed_tasks_arguments_stay_in_its_class(mesh: LocalMesh) -> None:
    """A classed task's pickled arguments are class data: its owner (outside the class's
    regions) stores them as one object of the class (``core.tasks.TaskPayload``); its KV
    record (``task/<id>``, or the ``taskset/<prefix>`` of a map) keeps only a reference
    (``core.tasks.stored_record``). Its function, which may carry captured data, is kept
    under the class too (``core.tasks.FunctionPayload``). No node outside the class's
    regions holds either in any KV value or object, while the tasks wait to run; the
    records are still read by id from anywhere and listed; the tasks run."""
    eu = next(i for i, n in enumerate(mesh.nodes) if n.region == "eu-west")
    assert mesh.nodes[OWNER].region == "us-east"
    outside = [n for n in mesh.nodes if n.region == "us-east"]
    flag = str(mesh.directory / "release-args")
    with connect(mesh.nodes[OWNER].address, bundle=mesh.bundle_path) as client, \
            connect(mesh.nodes[eu].address, bundle=mesh.bundle_path) as inside:
        client.policies.set("ta", ["eu-west", "eu-central"], replicas=2,
                            cross_region_reads=False)
        # Each with a function of its own, capturing class data.
        singles = [client.submit(task(data_class="ta", retries=0)(
            capturing(f"{ARG_MARK} captured {k}")), flag, f"{ARG_MARK} customer {k}")
            for k in range(8)]
        mapped = client.map(task(data_class="ta", retries=0)(held_item),
                            [(flag, f"{ARG_MARK} row {k}") for k in range(4)])
        # An unclassed task keeps its arguments in its record, as before.
        plain = client.submit(task(retries=0)(held_len), flag, PLAIN_MARK)

        def record(task_id: str) -> TaskRecord | None:
            data = client.kv.get("task/" + task_id, binary=True)
            return None if data is None else msgspec.msgpack.decode(data, type=TaskRecord)

        recs = {f.task_id: wait_for(lambda f=f: record(f.task_id), 30, "a task's record")
                for f in singles}
        for tid, rec in recs.items():
            assert rec.state in ("pending", "running") and rec.data_class == "ta", rec
            assert rec.args is None, tid  # no arguments in the record: a reference
            assert rec.payload_ref is not None and rec.payload_ref["data_class"] == "ta"
            assert rec.payload_ref["id"].startswith("b3-"), rec.payload_ref
            assert rec.payload_ref["fn"].startswith("b3-"), rec.payload_ref
        raw = client.kv.get("task/" + singles[0].task_id, binary=True)
        assert raw is not None and ARG_MARK.encode() not in raw
        plain_rec = wait_for(lambda: record(plain.task_id), 30, "the plain task's record")
        assert plain_rec.args is not None and PLAIN_MARK.encode() in plain_rec.args
        assert plain_rec.payload_ref is None
        # The map's tasks share one record, taskset/<prefix>: no arguments in it either.
        prefix = mapped[0].task_id.rpartition(".")[0]
        group = wait_for(lambda: client.kv.get("taskset/" + prefix, binary=True), 30,
                         "the map's record")
        assert ARG_MARK.encode() not in group
        members = msgspec.msgpack.decode(group, type=list[TaskRecord])
        assert {r.task_id for r in members} == {f.task_id for f in mapped}
        assert all(r.args is None and r.payload_ref is not None for r in members)

        # Every KV value and object on the node outside the class: no argument of a
        # classed task.
        for node in outside:
            leaked = [what for what, data in stored_bytes(node) if ARG_MARK.encode() in data]
            assert not leaked, (node.name, leaked)
        # ... while the class's own nodes hold them, as objects of the class.
        for mark in (f"{ARG_MARK} customer 0", f"{ARG_MARK} captured 0"):
            held = [what for n in mesh.nodes if n.region != "us-east"
                    for what, data in stored_bytes(n) if mark.encode() in data]
            assert held and all(w.startswith("object ") for w in held), (mark, held)

        # The payload, read by id: refused outside the class's regions (its read rule,
        # named), whole inside them.
        oid = recs[singles[0].task_id].payload_ref["id"]  # type: ignore[index]
        with pytest.raises(MeshError, match="cross-region read rule"):
            client.get(oid)
        payload = decode_payload(inside.get(oid), singles[0].task_id)
        assert f"{ARG_MARK} customer 0".encode() in payload.args

        # Listed by their owner; run once released; their final records too.
        listed = {r["task_id"] for r in client.tasks(1000)}
        assert {f.task_id for f in singles + mapped} <= listed
        Path(flag).touch()
        for k, f in enumerate(singles):
            assert inside.future(f.task_id).result(timeout=120) == \
                len(f"{ARG_MARK} customer {k}")
        for k, f in enumerate(mapped):
            assert inside.future(f.task_id).result(timeout=120) == len(f"{ARG_MARK} row {k}")
        assert plain.result(timeout=120) == len(PLAIN_MARK)
        final = wait_for(lambda: (r := record(singles[0].task_id)) is not None
                         and r.state == "done" and r, 30, "the final record")
        assert final.args is None and final.payload_ref == recs[singles[0].task_id].payload_ref


def test_a_classed_task_taken_over_reads_its_arguments_back(mesh: LocalMesh) -> None:
    """The owner of classed tasks dies before they end: the node that takes each over
    reads its arguments and its function back from the objects of its class (its record
    has neither) and runs it. Last in the module: it kills a node."""
    owner_node = mesh.nodes[4]
    assert owner_node.region == "eu-central" and owner_node.proc is not None
    flag = str(mesh.directory / "release-adopted")
    with connect(owner_node.address, bundle=mesh.bundle_path) as owner, \
            connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as other:
        owner.policies.set("tk", ["eu-west", "eu-central"], replicas=2)
        # A function no task has used: stored only under the class, read back from there.
        fn = task(data_class="tk")(capturing(f"{ARG_MARK} adopted"))
        futs = [owner.submit(fn, flag, f"{ARG_MARK} adopted {k}") for k in range(3)]
        for f in futs:  # durable before acknowledged: the records hold a reference
            data = other.kv.get("task/" + f.task_id, binary=True)
            assert data is not None and ARG_MARK.encode() not in data
            rec = msgspec.msgpack.decode(data, type=TaskRecord)
            assert rec.payload_ref is not None and rec.payload_ref["id"], rec
        os.kill(owner_node.proc.pid, signal.SIGKILL)
        owner_node.proc.wait()
        Path(flag).touch()
        got = [other.future(f.task_id).result(timeout=120) for f in futs]
        assert got == [len(f"{ARG_MARK} adopted {k}") for k in range(3)]
        adopted = read = 0
        for n in mesh.nodes:
            if n.proc is None or n.proc.poll() is not None:
                continue
            with connect(n.address, bundle=mesh.bundle_path) as c:
                stats: Any = c._run(c._inner._trequest(TASK_STATS, Empty()))
                adopted += stats.compute.get("tasks_adopted", 0)
                read += stats.compute.get("task_payloads_read", 0)
        assert adopted == 3 and read == 3, (adopted, read)
