"""Streams on real node processes: every record processed in key order, a producer faster
than its operator slowed (bounded) and never dropped, the entry node SIGKILLed mid-stream
with nothing lost, central placement in the named region, refusals that name the rule."""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_mesh import wait_for

from meshscale.client.mesh import MeshError
from meshscale.client.rpc import RemoteError, call, request
from meshscale.client.streams import Record, Region, Subscription
from meshscale.client.tasks import TaskMesh, connect
from meshscale.core.access import METHOD_ACCESS, Access
from meshscale.core.api import Empty, ErrorCode, Method
from meshscale.core.api import streams as api
from meshscale.core.api.streams import StreamStats
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(240)

BACKLOG = 200


def local_mesh(path: Path, n: int) -> LocalMesh:
    return LocalMesh(path, n, regions=["a", "b"], node_settings={"stream_max_backlog": BACKLOG})


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with local_mesh(tmp_path_factory.mktemp("streams"), 4) as m:
        yield m


def collect(sub: Subscription, want: Callable[[dict[str, Record]], bool], timeout: float,
            into: dict[str, Record] | None = None) -> dict[str, Record]:
    got: dict[str, Record] = {} if into is None else into
    order: list[Record] = []
    end = time.monotonic() + timeout
    while not want(got):
        if time.monotonic() > end:
            raise AssertionError(f"timed out with {len(got)} records")
        for r in sub.poll(timeout=0.5):
            got[r.id] = r
            order.append(r)
    return got


def stats(mesh: LocalMesh, i: int) -> StreamStats:
    return request(mesh.nodes[i].address, mesh.credentials(), api.STATS, Empty(), timeout=10)


def tag(rec: Record) -> dict[str, Any]:
    return {"i": rec.value["i"], "key": rec.key}


def slow_tag(rec: Record) -> dict[str, Any]:
    time.sleep(0.01)
    return {"i": rec.value["i"]}


def test_every_record_processed_once_in_key_order(client: TaskMesh) -> None:
    client.operator("ordered", tag, output="ordered-out", name="tag-ordered")
    s = client.stream("ordered")
    n = 1000
    for i in range(n):
        s.publish(f"k{i % 5}", {"i": i})
    s.flush(60)
    sub = client.subscribe("ordered-out")
    seen: list[Record] = []
    got: dict[str, Record] = {}
    end = time.monotonic() + 60
    while len(got) < n:
        assert time.monotonic() < end, f"only {len(got)} of {n} outputs"
        for r in sub.poll(timeout=0.5):
            got[r.id] = r
            seen.append(r)
    assert sub.duplicates == 0
    assert {r.value["i"] for r in got.values()} == set(range(n))
    for k in range(5):
        mine = [r.value["i"] for r in seen if r.key == f"k{k}"]
        assert mine == sorted(mine), f"key k{k} out of order"
        assert len(mine) == n // 5


def test_fast_producer_is_slowed_not_dropped(client: TaskMesh, mesh: LocalMesh) -> None:
    client.operator("slow", slow_tag, output="slow-out", name="slow-op")
    max_buffer = 100
    s = client.stream("slow", max_buffer=max_buffer)
    n = 700  # 7 s of operator work at 10 ms a record; the backlog bound is 200
    pending: list[int] = []
    backlogs: list[int] = []
    done = threading.Event()

    def produce() -> None:
        for i in range(n):
            s.publish("k", {"i": i})
            pending.append(s.pending())
        s.flush(120)
        done.set()

    th = threading.Thread(target=produce)
    th.start()
    while True:  # sample the backlog every 50 ms until the producer is done
        for sh in stats(mesh, 0).shards:
            if sh.topic == "slow" and sh.role == "primary":
                backlogs.append(sh.backlog)
        if done.wait(0.05):
            break
    th.join()
    counters = stats(mesh, 0).counters
    assert counters.get("publish_waits", 0) > 0, "the node never held the producer back"
    assert backlogs and max(backlogs) <= BACKLOG, f"backlog exceeded the bound: {max(backlogs)}"
    assert max(pending) <= max_buffer
    assert max(pending) == max_buffer, "the producer was never blocked on a full buffer"
    got = collect(client.subscribe("slow-out"), lambda g: len(g) >= n, 120)
    assert sorted(r.value["i"] for r in got.values()) == list(range(n))


def test_central_operator_runs_in_its_region(client: TaskMesh, mesh: LocalMesh) -> None:
    client.operator("central-in", tag, placement=Region("b"), output="central-out",
                    name="tag-central")
    s = client.stream("central-in")
    for i in range(100):
        s.publish("x", {"i": i})
    s.flush(30)
    got = collect(client.subscribe("central-out"), lambda g: len(g) >= 100, 60)
    # region b; a shard's source is "node~epoch" (epoch: the incarnation it started with)
    assert {r.node for r in got.values()} <= {"node-1", "node-3"}
    runners = [r for i in range(4) for r in stats(mesh, i).runners
               if r.startswith("tag-central@")]
    assert runners
    for i in range(4):
        mine = [r for r in stats(mesh, i).runners if r.startswith("tag-central@")]
        if mine:
            assert mesh.nodes[i].region == "b", f"{mine} ran on {mesh.nodes[i].name}"


def test_refusals_name_the_rule(client: TaskMesh, mesh: LocalMesh) -> None:
    with pytest.raises(MeshError, match="residency"):
        s = client.stream("pii", residency=["mars"])
        s.publish("k", {"i": 1})
        s.flush(10)
    with pytest.raises(MeshError, match="central placement in region 'mars'"):
        client.operator("t", tag, placement=Region("mars"), output="o", name="nowhere")
    with pytest.raises(MeshError, match="differ"):
        client.operator("same", tag, output="same", name="loop")
    with pytest.raises(ValueError, match="placement"):
        client.operator("t", tag, placement="everywhere")
    creds = mesh.credentials()
    for args, where in (
            ({"topic": "t", "records": [["k", b"v", "id"]]}, "$.records[0]"),
            ({"topic": "t", "records": [["k", b"v", "id", 0.0, "extra"]]}, "$.records[0]"),
            ({"topic": "t", "records": [["k", 7, "id", 0.0]]}, "$.records[0][1]"),
            ({"topic": "t", "records": []}, "$.records"),
            ({"topic": "a/b", "records": [["k", b"", "id", 0.0]]}, "$.topic"),
            ({"topic": "t", "records": [["k", b"", "id", 0.0]], "residency": ["a"]},
             "$.residency")):
        with pytest.raises(RemoteError) as e:
            call(mesh.nodes[0].address, creds, "stream.publish", args, timeout=10)
        assert e.value.code == ErrorCode.INVALID and where in str(e.value), str(e.value)
    # The node is fine afterwards.
    s = client.stream("after-bad")
    s.publish("k", {"i": 1})
    s.flush(10)


def test_removed_operator_stops_everywhere(client: TaskMesh, mesh: LocalMesh) -> None:
    client.operator("rm", tag, output="rm-out", name="rm-op")
    s = client.stream("rm")
    for i in range(20):
        s.publish("k", {"i": i})
    s.flush(30)
    collect(client.subscribe("rm-out"), lambda g: len(g) >= 20, 60)
    assert any(r.startswith("rm-op@") for i in range(4) for r in stats(mesh, i).runners)
    client.remove_operator("rm-op")
    wait_for(lambda: not any(r.startswith("rm-op@") for i in range(4)
                             for r in stats(mesh, i).runners),
             30, "every runner of the removed operator to stop", poll=0.2)
    # Its shards no longer hold records for it: more records are accepted, not processed.
    for i in range(20, 40):
        s.publish("k", {"i": i})
    s.flush(30)
    assert "rm-op" not in stats(mesh, 0).operators or not any(
        r.startswith("rm-op@") for r in stats(mesh, 0).runners)
    with pytest.raises(MeshError, match="unknown operator"):
        client.remove_operator("rm-op")


def test_a_subscriber_reads_a_shard_of_its_nodes_region_at_its_holder(
        mesh: LocalMesh) -> None:
    """Issue 23: a subscriber connected to node-0 reads the output shard node-2 holds (same
    region) at node-2, not through node-0's mirror, once node-0 has named the holder;
    every record arrives, in key order."""
    producer = connect(mesh.nodes[2].address, bundle=mesh.bundle_path)
    reader = connect(mesh.nodes[0].address, bundle=mesh.bundle_path)
    producer.operator("direct", tag, output="direct-out", name="tag-direct")
    sub = reader.subscribe("direct-out")
    s = producer.stream("direct")
    n = 60
    got: dict[str, Record] = {}
    arrived: list[Record] = []
    for part in range(2):
        for i in range(part * n // 2, (part + 1) * n // 2):
            s.publish(f"k{i % 3}", {"i": i}, id=f"d{i}")
        s.flush(30)

        def have(m: int) -> bool:
            for r in sub.poll(timeout=0.5):
                if r.id not in got:
                    got[r.id] = r
                    arrived.append(r)
            return len(got) >= m

        wait_for(lambda part=part: have((part + 1) * n // 2), 60, f"part {part} arrived")
    assert {r.value["i"] for r in got.values()} == set(range(n))
    for k in range(3):
        mine = [r.value["i"] for r in arrived if r.value["key"] == f"k{k}"]
        assert mine == sorted(mine), f"key k{k} out of order"
    assert sub.received_direct > 0, "read at the holder"
    assert stats(mesh, 2).counters.get("reads_held", 0) > 0
    sub.close()
    producer.close()
    reader.close()


def test_entry_node_killed_mid_stream_loses_nothing(tmp_path: Path) -> None:
    with local_mesh(tmp_path / "fo", 4) as m:
        entry = m.nodes[2]  # region a; its backup is node-0, the other node of region a
        producer = connect(entry.address, bundle=m.bundle_path)
        watcher = connect(m.nodes[0].address, bundle=m.bundle_path)
        watcher.operator("fo", tag, output="fo-out", name="tag-fo")
        s = producer.stream("fo")
        n, kill_at = 400, 150
        for i in range(n):
            if i == kill_at:
                s.flush(30)
                assert entry.proc is not None
                entry.proc.kill()
            s.publish(f"k{i % 3}", {"i": i}, id=f"r{i}")
        s.flush(60)
        assert s.failovers >= 1 and s.nodes_used[0] == "node-2" and len(s.nodes_used) >= 2
        got = collect(watcher.subscribe("fo-out"), lambda g: len(g) >= n, 90)
        assert {r.value["i"] for r in got.values()} == set(range(n))
        assert {r.id for r in got.values()} == {f"tag-fo:r{i}" for i in range(n)}
        producer.close()

        # The killed node comes back with empty in-memory logs: a new epoch, so new
        # shards, and its records after the restart are processed too (offsets are never
        # reused under the old shard's checkpoint).
        from meshscale.runtime.launcher import node_command, spawn_node

        cmd = node_command(entry, [m.nodes[0].address], "")
        entry.proc = spawn_node(cmd, entry.data_dir.parent / "node-2-restart.log")
        again = wait_for(lambda: connect(entry.address, bundle=m.bundle_path), 60,
                         "the restarted node to answer", poll=0.2, retry=(MeshError,))
        s2 = again.stream("fo")
        for i in range(n, n + 50):
            s2.publish("k0", {"i": i}, id=f"r{i}")
        s2.flush(60)
        assert s2.nodes_used == ["node-2"]
        collect(watcher.subscribe("fo-out"), lambda g: len(g) >= n + 50, 90)
        again.close()
        watcher.close()


def test_a_holder_killed_while_read_directly_loses_no_acknowledged_record(
        tmp_path: Path) -> None:
    """Issue 23's direct reads under a kill: a subscriber on node-0 reads node-2's shard at
    node-2 (same region), and node-0's mirror of it lags (its follower fetches every
    ``follow_linger_s`` while the shard is read at its holder: 60 of 160 records behind
    in a run here). node-2 is SIGKILLed right after 15 appends are acknowledged, most of
    them not yet read by the subscriber (a few records per read): every acknowledged
    record still reaches the subscriber (through node-0, which also backs node-2 up), in
    each shard's key order, and so do the records published after the kill."""
    with local_mesh(tmp_path / "dk", 4) as m:
        holder = m.nodes[2]  # region a: node-0 (the reader's node) is its backup
        producer = connect(holder.address, bundle=m.bundle_path)
        reader = connect(m.nodes[0].address, bundle=m.bundle_path)
        sub = reader.subscribe("dk")
        s = producer.stream("dk")
        got: dict[str, Record] = {}
        arrived: list[Record] = []
        sent: list[int] = []

        def publish(n: int) -> None:
            for _ in range(n):
                i = len(sent)
                s.publish(f"k{i % 3}", {"i": i}, id=f"d{i}")
                sent.append(i)

        def have() -> bool:
            # A few records per read (each poll leaves the next read sent): when node-2
            # dies, most of the last batch is still at the shard, not on its way here.
            for r in sub.poll(timeout=0.2, max_records=4):
                if r.id not in got:
                    got[r.id] = r
                    arrived.append(r)
            return len(got) >= len(sent)

        def direct() -> bool:
            publish(10)
            s.flush(30)
            wait_for(have, 60, f"{len(sent)} records before the kill")
            return sub.received_direct > 0

        wait_for(direct, 60, "the subscriber reading node-2's shard at node-2", poll=0.0)
        for _ in range(15):  # appends one after another: the mirror follows them lingering
            publish(10)
            s.flush(30)  # acknowledged: at node-2 and copied to node-0
        assert holder.proc is not None
        holder.proc.kill()
        holder.proc.wait()
        publish(100)  # fails over to another node
        s.flush(60)
        wait_for(have, 90, "every acknowledged record at the subscriber", poll=0.0)
        assert {r.value["i"] for r in got.values()} == set(sent)
        for source in {r.source for r in arrived}:
            for k in range(3):
                mine = [r.offset for r in arrived if r.source == source and r.key == f"k{k}"]
                assert mine == sorted(mine), f"shard {source} key k{k} out of order"
        sub.close()
        producer.close()
        reader.close()


def test_a_dead_entry_nodes_records_survive_its_backups_death(tmp_path: Path) -> None:
    """Issue 23: records acknowledged at the entry node and its backup, not yet processed
    (the operator's gate is closed: each batch raises and is retried), survive the entry
    node's death and then its backup's: the backup copied the dead node's shard to the
    next node (``core.streams.shard_copies``), which serves it once the backup is gone."""
    # The gate is a file the workers (user nobody) can see: not under tmp_path (0700).
    gate = Path(tempfile.gettempdir()) / f"meshscale-test-gate-{uuid.uuid4().hex}"
    flag = str(gate)
    with local_mesh(tmp_path / "sf", 4) as m:
        entry, backup = m.nodes[2], m.nodes[0]  # region a: node-0 backs node-2 up
        producer = connect(entry.address, bundle=m.bundle_path)
        watcher = connect(m.nodes[1].address, bundle=m.bundle_path)

        def gated(rec: Record) -> dict[str, Any]:
            import os

            if not os.path.exists(flag):
                raise RuntimeError("the gate is closed")
            return {"i": rec.value["i"]}

        watcher.operator("sf", gated, output="sf-out", name="gate-sf")
        sub = watcher.subscribe("sf-out")
        sub.poll(timeout=0.1)
        s = producer.stream("sf")
        n = 100
        for i in range(n):
            s.publish(f"k{i % 3}", {"i": i}, id=f"r{i}")
        s.flush(60)
        assert s.nodes_used == ["node-2"]
        producer.close()
        assert entry.proc is not None and backup.proc is not None
        entry.proc.kill()

        def second_copy() -> str | None:
            for i in (1, 3):
                for sh in stats(m, i).shards:
                    if sh.topic == "sf" and sh.source.startswith("node-2~") and sh.head == n:
                        return m.nodes[i].name
            return None

        where = wait_for(second_copy, 60, "the dead entry node's shard copied to a second node")
        backup.proc.kill()
        gate.touch()
        try:
            got = collect(sub, lambda g: len(g) >= n, 120)
        finally:
            gate.unlink()
        assert {r.value["i"] for r in got.values()} == set(range(n)), where
        watcher.close()


def _wrong(method: Method[Any, Any]) -> list[tuple[dict[str, Any], str]]:
    """Requests out of ``method``'s contract, each with the field its refusal must name:
    an unknown field, and (for a method with arguments) its first field of a wrong type."""
    out: list[tuple[dict[str, Any], str]] = [({"not_a_field": 1}, "not_a_field")]
    fields = method.request.__struct_fields__
    if fields:
        out.append(({fields[0]: {"nested": {}}}, f"$.{fields[0]}"))
    return out


@pytest.mark.parametrize("method", api.METHODS, ids=lambda m: m.name)
def test_each_stream_method_refuses_a_request_out_of_contract(mesh: LocalMesh,
                                                              method: Method[Any, Any]) -> None:
    """The node checks every stream method's request against its struct before the
    handler: ``invalid``, naming the method and the field (node-to-node methods asked
    with a node's certificate, so the refusal is the contract's, not the access table's)."""
    node_only = METHOD_ACCESS[method.name] is Access.NODE
    creds = mesh.node_credentials(1) if node_only else mesh.credentials()
    for args, field in _wrong(method):
        with pytest.raises(RemoteError) as e:
            call(mesh.nodes[0].address, creds, method.name, args, timeout=10)
        assert e.value.code == ErrorCode.INVALID, str(e.value)
        assert method.name in str(e.value) and field in str(e.value), str(e.value)


def test_typed_node_to_node_and_listing_calls(client: TaskMesh, mesh: LocalMesh) -> None:
    """A node's own typed calls, as another node makes them: fetch a shard it holds,
    list the operators (the spec and its counters), and a fetch of a shard no one has."""
    s = client.stream("typed-raw")  # no operator: its shard keeps what it retains
    for i in range(5):
        s.publish("k", {"i": i})
    s.close()
    addr, node_creds = mesh.nodes[0].address, mesh.node_credentials(1)
    source = next(sh.source for sh in stats(mesh, 0).shards
                  if sh.topic == "typed-raw" and sh.role == "primary")
    got = request(addr, node_creds, api.FETCH,
                  api.FetchRequest(topic="typed-raw", source=source, offset=0, limit=3),
                  timeout=10)
    assert [e.offset for e in got.entries] == [0, 1, 2] and got.head >= 5
    assert not got.missing
    assert {e.key for e in got.entries} == {"k"}
    none = request(addr, node_creds, api.FETCH,
                   api.FetchRequest(topic="no-such-topic", source=source), timeout=10)
    assert none.missing and none.entries == []
    client.operator("typed-in", tag, output="typed-out", name="typed-op")
    listed = request(addr, mesh.credentials(), api.OP_LIST, Empty(), timeout=10)
    op = next(o for o in listed.operators if o.name == "typed-op")
    assert (op.topic, op.output, op.mode) == ("typed-in", "typed-out", "near-source")
    wait_for(lambda: any(r.startswith("typed-op@") for i in range(4)
                         for r in stats(mesh, i).runners), 30, "a runner of typed-op")
    client.remove_operator("typed-op")
    with pytest.raises(MeshError) as e:
        client.remove_operator("typed-op")
    assert e.value.code == ErrorCode.NOT_FOUND
