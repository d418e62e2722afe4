"""Streams on real node processes: every record processed in key order, a producer faster
than its operator slowed (bounded) and never dropped, the entry node SIGKILLed mid-stream
with nothing lost, central placement in the named region, refusals that name the rule."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_mesh import wait_for

from meshscale.client.mesh import MeshError
from meshscale.client.rpc import RpcError, call
from meshscale.client.streams import Record, Region, Subscription
from meshscale.client.tasks import TaskMesh, connect
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(240)

BACKLOG = 200


def local_mesh(path: Path, n: int) -> LocalMesh:
    return LocalMesh(path, n, regions=["a", "b"], node_args=["--stream-max-backlog", str(BACKLOG)])


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


def stats(mesh: LocalMesh, i: int) -> dict[str, Any]:
    result: dict[str, Any] = call(mesh.nodes[i].address, mesh.credentials(), "stream.stats",
                                  {}, timeout=10)
    return result


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
        for sh in stats(mesh, 0)["shards"]:
            if sh["topic"] == "slow" and sh["role"] == "primary":
                backlogs.append(sh["backlog"])
        if done.wait(0.05):
            break
    th.join()
    counters = stats(mesh, 0)["counters"]
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
    runners = [r for i in range(4) for r in stats(mesh, i)["runners"]
               if r.startswith("tag-central@")]
    assert runners
    for i in range(4):
        mine = [r for r in stats(mesh, i)["runners"] if r.startswith("tag-central@")]
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
    before = stats(mesh, 0)["counters"].get("publish_malformed", 0)
    with pytest.raises(RpcError, match="record must be"):
        call(mesh.nodes[0].address, creds, "stream.publish",
             {"topic": "t", "records": [["k", "not-bytes-but-ok", "id"]]}, timeout=10)
    with pytest.raises(RpcError, match="topic"):
        call(mesh.nodes[0].address, creds, "stream.publish",
             {"topic": "a/b", "records": [["k", b"", "id", 0.0]]}, timeout=10)
    assert stats(mesh, 0)["counters"].get("publish_malformed", 0) == before + 1
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
    assert any(r.startswith("rm-op@") for i in range(4) for r in stats(mesh, i)["runners"])
    client.remove_operator("rm-op")
    wait_for(lambda: not any(r.startswith("rm-op@") for i in range(4)
                             for r in stats(mesh, i)["runners"]),
             30, "every runner of the removed operator to stop", poll=0.2)
    # Its shards no longer hold records for it: more records are accepted, not processed.
    for i in range(20, 40):
        s.publish("k", {"i": i})
    s.flush(30)
    assert "rm-op" not in stats(mesh, 0)["operators"] or not any(
        r.startswith("rm-op@") for r in stats(mesh, 0)["runners"])
    with pytest.raises(MeshError, match="unknown operator"):
        client.remove_operator("rm-op")


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

        cmd = node_command(entry, [m.nodes[0].address], "", [])
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
