"""``examples/`` and the README's "Streams in 10 lines" snippet, each run as a user would:
a separate Python process against a real 3-node mesh (what ``meshscale up --nodes 3
--regions eu-west,us-east`` starts), given the mesh's ``mesh.json``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshscale.client import connect, object_id
from meshscale.core.api import Empty
from meshscale.core.api.tasks import TASK_STATS
from meshscale.runtime.launcher import LocalMesh
from stored import copy_ids

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    # Leaving the block stops the nodes and fails if a node or a worker outlived them.
    with LocalMesh(tmp_path_factory.mktemp("examples"), 3, regions=["eu-west", "us-east"]) as m:
        yield m


def run(args: list[str], timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def tasks_run(mesh: LocalMesh) -> dict[str, int]:
    """Tasks each node's own worker pool has run (its scheduler's counter, asked of that
    node itself: not what the owner reports about the task)."""
    import meshscale

    out = {}
    for n in mesh.nodes:
        with meshscale.connect(n.address, bundle=mesh.bundle_path) as c:
            stats = c._run(c._inner._trequest(TASK_STATS, Empty()))
        out[n.name] = int(stats.scheduling.get("tasks_run", 0))
    return out


def files_of(mesh: LocalMesh, oid: str) -> set[str]:
    """The nodes whose data dir holds the file of ``oid`` (a whole id, or a short one
    ending in ".." as the example prints it), read from the disks."""
    prefix = oid[:-2] if oid.endswith("..") else None
    return {n.name for n in mesh.nodes
            if any(i == oid or (prefix is not None and i.startswith(prefix))
                   for i in copy_ids(n.data_dir / "store"))}


def test_batch_residency(mesh: LocalMesh) -> None:
    before = tasks_run(mesh)
    out = run([str(EXAMPLES / "batch_residency.py"), str(mesh.mesh_json)])
    assert "mesh: 3 nodes, 2 in eu-west" in out
    stored = re.findall(r"^stored (b3-\S+) \(\d+ bytes\) on (.+)$", out, re.M)
    assert len(stored) == 6
    eu = {n.name for n in mesh.nodes if n.region == "eu-west"}
    for oid, holders in stored:
        assert set(holders.split(", ")) <= eu, holders
        # From outside: the files themselves are only on eu-west disks.
        on_disk = files_of(mesh, oid)
        assert on_disk and on_disk <= eu, (oid, on_disk)
    # From outside: only eu-west nodes' worker pools ran tasks during the example.
    after = tasks_run(mesh)
    ran_here = {name: after[name] - before[name] for name in after}
    assert all(ran_here[name] == 0 for name in ran_here if name not in eu), ran_here
    assert sum(ran_here.values()) >= 6, ran_here
    ran = re.findall(r"ran on (\S+) \((\S+)\)", out)
    assert len(ran) == 6 and all(node in eu and region == "eu-west" for node, region in ran)
    assert "map: 6 tasks, 3000 patients, all in eu-west: True" in out
    assert re.search(r"asked to run in us-east, refused: .*input-residency rule.*"
                     r"residency regions=\{eu-west\}", out), out


def test_batch_residency_through_a_node_outside_the_rule(mesh: LocalMesh) -> None:
    """ADDRESS BUNDLE form, through the us-east node: the work still runs in eu-west."""
    us = next(n for n in mesh.nodes if n.region == "us-east")
    out = run([str(EXAMPLES / "batch_residency.py"), us.address, str(mesh.bundle_path)])
    assert "all in eu-west: True" in out
    assert "refused" in out


def records_processed(mesh: LocalMesh, op: str) -> dict[str, int]:
    """Records each node's own runners of ``op`` processed (asked of each node)."""
    from meshscale.client.rpc import request
    from meshscale.core.api import Empty
    from meshscale.core.api.streams import STATS

    out = {}
    creds = mesh.credentials()
    for n in mesh.nodes:
        st = request(n.address, creds, STATS, Empty(), timeout=10)
        out[n.name] = st.operators.get(op, {}).get("records_processed", 0)
    return out


def test_stream_custom_model(mesh: LocalMesh) -> None:
    before = records_processed(mesh, "pump-risk-model")
    out = run([str(EXAMPLES / "stream_custom_model.py"), str(mesh.mesh_json)])
    assert re.search(r"^model trained here: accuracy \d+\.\d%", out, re.M), out
    assert "operator pump-risk-model: pumps -> pump-risk, placement near-source" in out
    assert "published 400 readings through" in out
    # near-source: every reading is scored on the node it entered through (node-0)
    assert "scored 400 / 400 readings on the mesh, on node-0 (400)" in out
    # From outside the example's report: node-0's own runners processed them all.
    after = records_processed(mesh, "pump-risk-model")
    delta = {name: after[name] - before.get(name, 0) for name in after}
    assert delta == {n.name: (400 if n.name == "node-0" else 0) for n in mesh.nodes}, delta
    m = re.search(r"flagged (\d+): (\d+) of (\d+) failing pumps caught", out)
    assert m is not None, out
    assert int(m.group(2)) >= int(m.group(3)) // 2  # the model works: at least half caught
    assert "riskiest pumps: pump-" in out
    # a second run against the same mesh (operator and topic already there) also works
    again = run([str(EXAMPLES / "stream_custom_model.py"), str(mesh.mesh_json)])
    assert "scored 400 / 400 readings" in again


def test_readme_streams_in_10_lines(mesh: LocalMesh, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Streams in 10 lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "no python block under 'Streams in 10 lines'"
    lines = [ln for ln in code.group(1).splitlines() if ln.strip()]
    assert len(lines) <= 15, f"the snippet grew to {len(lines)} lines"
    src = code.group(1).replace("127.0.0.1:PORT", mesh.nodes[0].address)
    src = src.replace("/tmp/mesh/client", str(mesh.bundle_path))
    script = tmp_path / "snippet.py"
    script.write_text(src)
    out = run([str(script)], timeout=90)
    assert out.strip().splitlines()[-1] == "machine-7 True", out


def test_readme_tasks(mesh: LocalMesh, tmp_path: Path) -> None:
    """The README's "Tasks" snippets, in order, as one script: map, imap, futures as
    arguments, gather, wait, a remote ValueError caught as itself, logs."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Tasks\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the Tasks section has two python blocks"
    target = '"127.0.0.1:PORT", bundle="/tmp/.../client"'
    assert target in blocks[0]
    src = "\n".join(blocks).replace(
        target, f'"{mesh.nodes[0].address}", bundle="{mesh.bundle_path}"')
    script = tmp_path / "tasks_snippet.py"
    script.write_text(src)
    out = run([str(script)], timeout=120)
    lines = out.splitlines()
    assert lines[:4] == ["6", "600", "6000", "[3, 1]"], out
    assert lines[4].startswith("upstream upstream task ") and "ValueError: invalid literal" \
        in lines[4], out
    assert f'File "{script}", line ' in out and ", in parse" in out, out
    assert lines[-2:] == ["done: 1", "parsing 1"], out


def test_readme_objects_and_keys(mesh: LocalMesh, tmp_path: Path) -> None:
    """The README's "Objects and keys" snippet as written, on the mesh `meshscale up`
    starts by default (3 nodes, eu-west and us-east): the eu-west-only object gets every
    copy it asks for there (the snippet must not ask for more than eu-west has)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Objects and keys\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "no python block under 'Objects and keys'"
    target = '"127.0.0.1:PORT", bundle="/tmp/.../client"'
    assert target in code.group(1) and '"/data/model.onnx"' in code.group(1)
    model = tmp_path / "model.onnx"
    model.write_bytes(os.urandom(300_000))
    src = code.group(1).replace(target, f'"{mesh.nodes[0].address}", '
                                         f'bundle="{mesh.bundle_path}"')
    src = src.replace('"/data/model.onnx"', f'"{model}"')
    src += "\nprint(ref.id)\n"
    script = tmp_path / "objects_snippet.py"
    script.write_text(src)
    out = run([str(script)], timeout=90).strip().splitlines()
    oid = out[-1]  # the snippet's own asserts read the id back from the KV as text
    assert "mesh.kv.get(\"model/latest\", consistency=\"one\") == ref.id" in src
    with connect(mesh.nodes[1].address, bundle=mesh.bundle_path) as c:
        info = next(o for o in c.objects() if o.id == oid)
    eu = {n.name for n in mesh.nodes if n.region == "eu-west"}
    assert info.health == "ok" and set(info.holders) <= eu, info
    assert len(info.holders) == info.replicas, info


def test_a_put_that_cannot_reach_its_replicas_warns_or_is_refused(mesh: LocalMesh,
                                                                  tmp_path: Path) -> None:
    """On the mesh `up` starts by default, eu-west has 2 nodes: replicas=3 inside eu-west
    cannot be met. The Python API refuses it (rule named) unless allow_degraded=True,
    which stores it on the 2 with an UnderReplicatedWarning; the CLI stores it with a
    warning line, and --strict refuses it (exit 2)."""
    import warnings

    from meshscale import MeshError, UnderReplicatedWarning

    data = os.urandom(5000)
    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as c:
        with pytest.raises(MeshError, match="replicas rule: only 2 live node"):
            c.put(data, replicas=3, residency=["eu-west"])
        assert all(o.id != object_id(data) for o in c.objects())  # nothing stored
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref = c.put(data, replicas=3, residency=["eu-west"], allow_degraded=True)
        assert [w.category for w in caught] == [UnderReplicatedWarning], caught
        assert "stored on 2 node(s), fewer than replicas=3" in str(caught[0].message)
        info = c.stat(ref)
        eu = {n.name for n in mesh.nodes if n.region == "eu-west"}
        assert set(info.holders) == eu
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(4000))
    exe = Path(sys.executable).parent / "meshscale"
    base = [str(exe), "put", str(src), "--replicas", "3", "--residency", "eu-west",
            "--mesh", str(mesh.mesh_json)]
    env = {k: v for k, v in os.environ.items() if k not in ("MESHSCALE_BUNDLE",
                                                             "MESHSCALE_MESH")}
    warned = subprocess.run(base, capture_output=True, text=True, timeout=60, env=env)
    assert warned.returncode == 0, warned.stderr
    assert "warning: " in warned.stderr and "fewer than replicas=3" in warned.stderr
    strict = subprocess.run([*base[:2], "--strict", *base[2:]], capture_output=True,
                            text=True, timeout=60, env=env)
    assert strict.returncode == 2 and "replicas rule" in strict.stderr, strict


@pytest.mark.timeout(480)
def test_batch_dask(mesh: LocalMesh) -> None:
    """Dask on the mesh inside data-class policies: the naive central plan refused, the
    per-region pre-aggregation and central combine give plain pandas' totals."""
    out = run([str(EXAMPLES / "batch_dask.py"), str(mesh.mesh_json)], timeout=400)
    assert "central region eu-west; sales in eu-west, us-east" in out, out
    stored = re.findall(r"^stored meshscale://sales/\S+/(\S+)/shop-\d\.parquet .* on (.+)$",
                        out, re.M)
    assert len(stored) == 6, out
    region_of = {n.name: n.region for n in mesh.nodes}
    for region, holders in stored:
        assert {region_of[h] for h in holders.split(", ")} == {region}, (region, holders)
    assert "policy sales-us-east: copies only in us-east, 1 of them" in out, out
    assert re.search(r"naive plan .* refused: .*residency without 'eu-west': b3-\S+ "
                     r"\(regions=\{us-east\}, class sales-us-east\)", out), out
    for region in ("eu-west", "us-east"):
        m = re.search(rf"^{region}: pre-aggregated 3 files on (\S+) ", out, re.M)
        assert m is not None and region_of[m.group(1)] == region, out
    assert re.search(r"^central \(eu-west\): combined 2 partials .* wrote "
                     r"meshscale://nightly/\S+/totals.parquet = b3-", out, re.M), out
    assert "totals equal plain pandas on the same files: True (24000 rows)" in out
