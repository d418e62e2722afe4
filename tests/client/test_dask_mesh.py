"""``meshscale.dask.cluster`` on a real mesh of 4 node processes in two regions: Dask
workers run as mesh tasks in the region asked for, a ``dask.dataframe`` job reading
``meshscale://`` parquet gives the totals plain pandas gives, the workers' processes stop
listening at close, a worker whose node is killed mid-job is run again by the mesh and
the job completes, and bad input (a region with no node, a bundle the workers cannot
read) is a clear error."""

from __future__ import annotations

import math
import os
import pwd
import random
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from waiting import wait_for

pd = pytest.importorskip("pandas")
dask = pytest.importorskip("dask")
dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")

import meshscale.client.fs  # noqa: E402  (also registers meshscale://)
from meshscale.client import connect  # noqa: E402
from meshscale.client.tasks import TaskMesh  # noqa: E402
from meshscale.core.scheduling import SchedulingConfig  # noqa: E402
from meshscale.dask import DaskClusterError, cluster  # noqa: E402
from meshscale.runtime.launcher import LocalMesh  # noqa: E402
from meshscale.trust.bundle import load_bundle, write_client_bundle  # noqa: E402

REGIONS = ["eu-west", "us-east"]
pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def local_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("daskmesh"), 4, regions=REGIONS) as m:
        yield m


@pytest.fixture(scope="module")
def mesh(local_mesh: LocalMesh) -> Iterator[TaskMesh]:
    with connect(local_mesh.nodes[0].address, bundle=local_mesh.bundle_path) as m:
        yield m


@pytest.fixture(scope="module")
def opts(local_mesh: LocalMesh) -> dict[str, Any]:
    return {"address": local_mesh.nodes[0].address, "bundle": str(local_mesh.bundle_path)}


@pytest.fixture(scope="module")
def worker_opts(local_mesh: LocalMesh) -> Iterator[dict[str, Any]]:
    """Storage options the Dask workers can use: a client bundle of their own that the
    node's worker user can read (as root, nodes run task code as nobody)."""
    d = Path(tempfile.mkdtemp(prefix="meshscale-dask-bundle-"))
    yield worker_bundle(local_mesh, d)
    shutil.rmtree(d, ignore_errors=True)


def worker_bundle(local_mesh: LocalMesh, d: Path) -> dict[str, Any]:
    """Storage options with a client bundle written under ``d`` (a directory with no
    closed parent) that the node's worker user can read."""
    os.chmod(d, 0o711)
    out = d / "client"
    write_client_bundle(load_bundle(local_mesh.admin_path), "dask-workers", out)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for p in [out, *out.iterdir()]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    return {"address": local_mesh.nodes[0].address, "bundle": str(out)}


@pytest.fixture(scope="module")
def sales(opts: dict[str, Any]) -> Any:
    """Four parquet files under meshscale://sales/; their rows as one pandas frame."""
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    parts = []
    for i in range(4):
        df = pd.DataFrame({"region": [rng.choice(["eu", "us", "ap"]) for _ in range(2000)],
                           "amount": [rng.randint(1, 1000) for _ in range(2000)]})
        df.to_parquet(f"meshscale://sales/part-{i}.parquet", storage_options=opts)
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def refused(address: str) -> bool:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return True
    return False


def nodes_of(mesh: TaskMesh, task_ids: list[str]) -> dict[str, str | None]:
    rows = {r["task_id"]: r for r in mesh.tasks()}
    return {t: rows.get(t, {}).get("node") for t in task_ids}


def test_dask_job_on_mesh_workers_gives_the_pandas_totals(
        mesh: TaskMesh, local_mesh: LocalMesh, worker_opts: dict[str, Any], sales: Any) -> None:
    us = {n.name for n in local_mesh.nodes if n.region == "us-east"}
    with cluster(mesh, region="us-east", workers=2, storage_options=worker_opts,
                 work_stealing=True) as c, distributed.Client(c) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        assert c.scheduler is not None and "stealing" in c.scheduler.extensions
        placed = nodes_of(mesh, c.worker_tasks())
        assert set(placed.values()) <= us, placed
        ddf = dd.read_parquet("meshscale://sales/", storage_options=worker_opts)
        got = ddf.groupby("region").amount.sum().compute().sort_index()
        # The Dask tasks ran on the mesh's workers (not in this process).
        assert set(client.run(os.getpid).values()).isdisjoint({os.getpid()})
    want = sales.groupby("region").amount.sum().sort_index()
    assert {str(k): int(v) for k, v in got.items()} == {str(k): int(v) for k, v in want.items()}
    # Closed: every worker task returned, and nothing listens where they did.
    done = [f.result(timeout=30) for f in c.futures]
    assert all(refused(d["address"]) for d in done), done
    assert refused(c.scheduler_address)


def test_a_worker_whose_node_dies_is_replaced_and_the_job_completes(
        mesh: TaskMesh, local_mesh: LocalMesh, worker_opts: dict[str, Any], sales: Any) -> None:
    def slow_total(df: Any) -> Any:
        time.sleep(1.5)
        return df.groupby("region", as_index=False).amount.sum()

    with cluster(mesh, region="us-east", workers=2, storage_options=worker_opts) as c, \
            distributed.Client(c) as client:
        placed = nodes_of(mesh, c.worker_tasks())
        victim = next(n for n in local_mesh.nodes if n.name in placed.values())
        assert victim is not local_mesh.nodes[0]  # the node the client reads through
        ddf = dd.read_parquet("meshscale://sales/", storage_options=worker_opts,
                              split_row_groups=False).repartition(npartitions=8)
        meta = pd.DataFrame({"region": pd.Series(dtype=object),
                             "amount": pd.Series(dtype="int64")})
        job = client.compute(ddf.map_partitions(slow_total, meta=meta)
                             .groupby("region").amount.sum())
        wait_for(lambda: any(client.processing().values()), 120,
                 "the job's tasks running on the workers", poll=0.1)
        assert victim.proc is not None and not job.done()  # mid-job
        os.kill(victim.proc.pid, signal.SIGKILL)
        got = job.result(timeout=300).sort_index()
        # The mesh ran the lost worker's task again: two workers again.
        wait_for(lambda: len(client.scheduler_info()["workers"]) >= 2, 120,
                 "the lost Dask worker replaced", poll=0.5)
        assert len(client.scheduler_info()["workers"]) == 2
    want = sales.groupby("region").amount.sum().sort_index()
    assert {str(k): int(v) for k, v in got.items()} == {str(k): int(v) for k, v in want.items()}


def test_bad_input(mesh: TaskMesh, opts: dict[str, Any]) -> None:
    with pytest.raises(DaskClusterError, match="mars"):
        cluster(mesh, region="mars", workers=1, start_timeout_s=60)
    with pytest.raises(ValueError, match="workers"):
        cluster(mesh, workers=0)
    with pytest.raises(ValueError, match="work_stealing"):
        cluster(mesh, workers=1, work_stealing="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token"):
        cluster(mesh, workers=1, storage_options={**opts, "token": "x"})
    if os.geteuid() == 0:
        # The test's own bundle is root's: the workers (nobody) cannot read it.
        with pytest.raises(DaskClusterError, match="cannot read the bundle"):
            cluster(mesh, region="us-east", workers=1, storage_options=opts)


@pytest.fixture(scope="module")
def single_copies(opts: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    """Four parquet files under meshscale://single/, one copy each (so each has one
    holder); their rows as one pandas frame, and each file's holder."""
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    fs = meshscale.client.fs.MeshFileSystem(**opts, replicas=1, skip_instance_cache=True)
    parts, holder = [], {}
    for i in range(4):
        df = pd.DataFrame({"region": [rng.choice(["eu", "us", "ap"]) for _ in range(1500)],
                           "amount": [rng.randint(1, 1000) for _ in range(1500)]})
        path = f"meshscale://single/part-{i}.parquet"
        with fs.open(path, "wb") as f:
            df.to_parquet(f)
        info = fs.info(path)
        assert len(info["holders"]) == 1, info
        holder[path] = info["holders"][0]
        parts.append(df)
    return pd.concat(parts, ignore_index=True), holder


def test_workers_are_placed_on_input_holders_and_reads_prefer_them(
        mesh: TaskMesh, worker_opts: dict[str, Any],
        single_copies: tuple[Any, dict[str, str]]) -> None:
    frame, holder = single_copies
    # Dask's work stealing (which may move a loosely restricted task to an idle worker)
    # is off by default on the cluster's scheduler, even where the caller's config has
    # it on: a read off its holder is ours.
    with dask.config.set({"distributed.scheduler.work-stealing": True}), \
            cluster(mesh, workers=2, inputs=["meshscale://single/"],
                    storage_options=worker_opts) as c, distributed.Client(c) as client:
        assert c.scheduler is not None and "stealing" not in c.scheduler.extensions
        on = c.worker_nodes()
        assert len(on) == 2, on
        by_id = {i.id: set(i.holders) for i in c.inputs}
        anchors = [a for a in c.anchors if a is not None]
        assert len(anchors) == 2 and len(set(anchors)) == 2, c.anchors
        # Each worker runs on the holder of the object its task declared.
        placed = nodes_of(mesh, c.worker_tasks())
        for task_id, anchor in zip(c.worker_tasks(), c.anchors, strict=True):
            assert anchor is not None and placed[task_id] in by_id[anchor], (placed, by_id)
        # Anchors were dealt over different holders when there are two or more.
        if len(set().union(*by_id.values())) >= 2:
            assert len(set(placed.values())) == 2, placed
        parts = c.read_parts("meshscale://single/")
        got = pd.concat(client.gather(parts), ignore_index=True)
        who = client.who_has(parts)
        # Each part whose holder runs a worker was read by that worker.
        paths = sorted(holder)
        for path, part in zip(paths, parts, strict=True):
            near = {w for w, n in on.items() if n == holder[path]}
            if near:
                assert set(who[part.key]) <= near, (path, who[part.key], on)
        ddf = c.read_parquet("meshscale://single/")
        total = ddf.groupby("region").amount.sum().compute().sort_index()
    want = frame.groupby("region").amount.sum().sort_index()
    assert len(got) == len(frame)
    assert {str(k): int(v) for k, v in total.items()} == \
        {str(k): int(v) for k, v in want.items()}


def test_central_region_and_input_residency(mesh: TaskMesh, local_mesh: LocalMesh,
                                            opts: dict[str, Any],
                                            worker_opts: dict[str, Any]) -> None:
    # Two nodes in each region: the central region is the first by name.
    with cluster(mesh, region="central", workers=1, storage_options=worker_opts) as c:
        assert c.region == "eu-west"
        placed = nodes_of(mesh, c.worker_tasks())
        eu = {n.name for n in local_mesh.nodes if n.region == "eu-west"}
        assert set(placed.values()) <= eu, placed
    # An input that must stay in us-east: no Dask worker for it in eu-west.
    fs = meshscale.client.fs.MeshFileSystem(**opts, replicas=1, residency=["us-east"],
                                            skip_instance_cache=True)
    fs.pipe_file("meshscale://kept/us.parquet",
                 pd.DataFrame({"amount": [1, 2]}).to_parquet())
    with pytest.raises(DaskClusterError, match=r"residency without 'eu-west': b3-\S+ \(regions=\{us-east\}\)"):
        cluster(mesh, region="eu-west", workers=1, inputs=["meshscale://kept/"])
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        cluster(mesh, workers=1, inputs=["meshscale://nothing-here/"])
    with pytest.raises(DaskClusterError, match=r"no live node in region 'mars'"):
        cluster(mesh, region="mars", workers=1)


def _node_of_pid(pid: int, node_pids: dict[int, str]) -> str | None:
    """The mesh node whose process tree runs ``pid`` (its parents in /proc), if any."""
    seen = 0
    while pid > 1 and seen < 64:
        if pid in node_pids:
            return node_pids[pid]
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        pid = int(stat.rpartition(")")[2].split()[1])
        seen += 1
    return None


def _counts(m: LocalMesh, method: Any, part: str, keys: tuple[str, ...]) -> dict[str, int]:
    from meshscale.client.rpc import request
    from meshscale.core.api import Empty

    creds = m.credentials()
    out = dict.fromkeys(keys, 0)
    for n in m.nodes:
        got = getattr(request(n.address, creds, method, Empty(), timeout=30), part)
        for k in keys:
            out[k] += int(got.get(k, 0))
    return out


def test_workers_keep_their_nodes_past_the_run_timeout_and_later_reads_stay_on_holders(
        tmp_path: Path) -> None:
    """Issue 20: later rounds of a full bench run read on nodes without a copy. The mesh
    ran every task bound for longer than its run timeout (60 s) a second time: each Dask
    worker's task was run again elsewhere (failing: its name was taken) while the first
    worker went on, and the task records, from which the cluster learns where its
    workers are, named the second run's node. Here the nodes' run timeout is 6 s: the
    workers beat (core.scheduling.Running), keep their one run and record, and a round
    of reads well past the timeout goes to holders only."""
    run_timeout_s = 6.0
    with LocalMesh(tmp_path / "mesh", 4,
                   node_settings={"task_run_timeout_s": run_timeout_s}) as m, \
            connect(m.nodes[0].address, bundle=m.bundle_path) as mesh:
        opts = {"address": m.nodes[0].address, "bundle": str(m.bundle_path)}
        d = Path(tempfile.mkdtemp(prefix="meshscale-dask-bundle-"))
        try:
            _beats_and_reads(m, mesh, opts, worker_bundle(m, d), run_timeout_s)
        finally:
            shutil.rmtree(d, ignore_errors=True)


def _beats_and_reads(m: LocalMesh, mesh: TaskMesh, opts: dict[str, Any],
                     wopts: dict[str, Any], run_timeout_s: float) -> None:
    from meshscale.core.api.objects import DP_STATS
    from meshscale.core.api.tasks import TASK_STATS

    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    fs = meshscale.client.fs.MeshFileSystem(**opts, replicas=2, w=2,
                                            skip_instance_cache=True)
    paths = [f"meshscale://beat/part-{i}.parquet" for i in range(8)]
    for path in paths:
        df = pd.DataFrame({"k": [rng.randrange(10) for _ in range(3000)],
                           "v": [rng.randrange(1000) for _ in range(3000)]})
        fs.pipe_file(path, df.to_parquet())
    node_pids = {n.proc.pid: n.name for n in m.nodes if n.proc is not None}
    with cluster(mesh, workers=2, inputs=["meshscale://beat/"],
                 storage_options=wopts) as c, \
            distributed.Client(c, set_as_default=False) as client:
        placed = nodes_of(mesh, c.worker_tasks())
        truth = {w: _node_of_pid(pid, node_pids)
                 for w, pid in client.run(os.getpid).items()}
        assert None not in truth.values() and c.worker_nodes() == truth, (
            c.worker_nodes(), truth)
        # The files with a copy on a worker's node (each worker's anchor at least):
        # each is read by a worker there, through that node, from its own copy.
        holders = {p: set(fs.info(p)["holders"]) for p in paths}
        near = [p for p in paths if holders[p] & set(truth.values())]
        assert near, (holders, truth)

        def one_round() -> dict[str, int]:
            keys = ("read_served_bytes", "reads_redirected", "reads_proxied")
            before = _counts(m, DP_STATS, "dataplane", keys)
            parts = c.read_parts(near, client=client)
            frames = client.gather(parts)
            assert sum(len(f) for f in frames) == len(near) * 3000
            who = client.who_has(parts)
            after = _counts(m, DP_STATS, "dataplane", keys)
            for path, part in zip(near, parts, strict=True):
                ran_on = {truth[w] for w in who[part.key]}
                assert ran_on <= holders[path], (path, ran_on, holders[path])
            return {k: after[k] - before[k] for k in keys}

        first = one_round()
        assert first["reads_redirected"] == first["reads_proxied"] == 0, first
        # Two and a half run timeouts after the worker tasks were submitted, the owner
        # (node-0, where the client submits) has re-placed none of them: it has had
        # their beats instead (one each per beat_s).
        submitted = max(float(r["submitted"]) for r in mesh.tasks()
                        if r["task_id"] in placed)
        wait_for(lambda: time.time() - submitted >= 2.5 * run_timeout_s, 120,
                 "2.5 run timeouts of the worker tasks", poll=0.5)
        sched = _counts(m, TASK_STATS, "scheduling",
                        ("replaced", "running_beats", "running_beats_stale"))
        assert sched["replaced"] == sched["running_beats_stale"] == 0, sched
        beat_s = SchedulingConfig(run_timeout_s=run_timeout_s).beat_s
        assert sched["running_beats"] >= 2 * math.floor(run_timeout_s / beat_s), sched
        rows = {r["task_id"]: r for r in mesh.tasks()}
        assert {t: rows[t]["state"] for t in c.worker_tasks()} == dict.fromkeys(
            c.worker_tasks(), "running")
        assert nodes_of(mesh, c.worker_tasks()) == placed
        assert len(client.scheduler_info()["workers"]) == 2
        assert c.worker_nodes() == truth
        second = one_round()
        # Nothing read by a node without a copy (no redirect, no relay), in the
        # later round as in the first; every byte served from a holder's copy.
        assert second["reads_redirected"] == second["reads_proxied"] == 0, second
        assert second["read_served_bytes"] == first["read_served_bytes"] > 0


def test_worker_nodes_trusts_only_running_records() -> None:
    """A worker task's record that is not ``running`` (a second run of it that failed on
    its taken name, while the first run's Dask worker still serves) names no node the
    worker is on: that worker gets no locality, not the failed run's node."""
    from meshscale.client.dask import nodes_of_workers

    records = [{"task_id": "t.0", "state": "running", "node": "node-1"},
               {"task_id": "t.1", "state": "failed", "node": "node-3"},
               {"task_id": "t.2", "state": "pending", "node": ""},
               {"task_id": "t.3", "state": "running", "node": "node-2"}]
    task_of = {f"w-{i}": f"t.{i}" for i in range(3)}
    names = {f"tcp://a{i}": f"w-{i}" for i in range(3)} | {"tcp://x": "someone-else"}
    assert nodes_of_workers(records, task_of, names) == {"tcp://a0": "node-1"}
