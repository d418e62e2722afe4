"""``meshscale://`` (``client/fs.py``) on a real mesh of 3 node processes: pandas and
pyarrow write and read parquet through it, a range read moves only the bytes asked for
(the nodes' ``read_served_bytes`` counters, in dp.stats and /metrics), ``ls`` by prefix,
``info``, the policy of a write, ``rm``, ``kv list`` (API and CLI), the docs' snippet as
written, and bad input."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
fsspec = pytest.importorskip("fsspec")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from meshscale.client import ConnectError, MeshError, connect  # noqa: E402
from meshscale.client.fs import NAME_PREFIX, MeshFileSystem  # noqa: E402
from meshscale.client.rpc import request  # noqa: E402
from meshscale.core.api import Empty  # noqa: E402
from meshscale.core.api.objects import DP_STATS  # noqa: E402
from meshscale.runtime.launcher import LocalMesh  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REGIONS = ["eu-west", "us-east", "ap-south"]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def local_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("fsmesh"), 3, regions=REGIONS) as m:
        yield m


@pytest.fixture(scope="module")
def opts(local_mesh: LocalMesh) -> dict[str, Any]:
    return {"address": local_mesh.nodes[0].address, "bundle": str(local_mesh.bundle_path)}


@pytest.fixture(scope="module")
def fs(opts: dict[str, Any]) -> MeshFileSystem:
    got = fsspec.filesystem("meshscale", **opts)
    assert isinstance(got, MeshFileSystem)
    return got


def frame(rng: random.Random, n: int) -> Any:
    return pd.DataFrame({
        "region": [rng.choice(["eu", "us", "ap"]) for _ in range(n)],
        "amount": [rng.randint(1, 10_000) for _ in range(n)],
        "price": [rng.random() * 100 for _ in range(n)],
    })


def served(local_mesh: LocalMesh) -> int:
    """Bytes every node read from its own copies for readers, summed."""
    creds = local_mesh.credentials()
    return sum(request(n.address, creds, DP_STATS, Empty(), timeout=10).dataplane.get(
        "read_served_bytes", 0) for n in local_mesh.nodes)


def served_metric(local_mesh: LocalMesh) -> int:
    """The same count from the nodes' /metrics (meshscale_read_served_bytes_total)."""
    token = (local_mesh.bundle_path / "token").read_text().strip()
    total = 0
    for n in local_mesh.nodes:
        host, port = str(n.http).rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
            body = conn.getresponse().read().decode()
        finally:
            conn.close()
        fams = {f.name: f for f in text_string_to_metric_families(body)}
        total += int(sum(s.value for s in fams["meshscale_read_served_bytes"].samples
                         if s.name.endswith("_total")))
    return total


def test_pandas_parquet_round_trip(fs: MeshFileSystem, opts: dict[str, Any]) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    df = frame(random.Random(seed), 5_000)
    path = "meshscale://sales/2026-12-01.parquet"
    df.to_parquet(path, storage_options=opts)
    back = pd.read_parquet(path, storage_options=opts)
    pd.testing.assert_frame_equal(back, df)
    # The name points at an object whose bytes are the parquet file pandas wrote.
    info = fs.info(path)
    assert info["type"] == "file" and info["id"].startswith("b3-")
    assert pq.read_table(pa.BufferReader(fs.cat_file(info["id"]))).num_rows == 5_000


def test_pyarrow_write_and_read(fs: MeshFileSystem) -> None:
    rng = random.Random(random.randrange(1 << 30))
    table = pa.Table.from_pandas(frame(rng, 2_000), preserve_index=False)
    pq.write_table(table, "sales/2026-12-02.parquet", filesystem=fs, row_group_size=500)
    got = pq.read_table("sales/2026-12-02.parquet", filesystem=fs)
    assert got.equals(table)
    # One column of one row group: pyarrow reads the footer and that column's pages only.
    f = pq.ParquetFile("sales/2026-12-02.parquet", filesystem=fs)
    assert f.metadata.num_row_groups == 4
    assert f.read_row_group(2, columns=["amount"]).column(0).to_pylist() == \
        table.column("amount").to_pylist()[1000:1500]


def test_range_reads_move_only_the_bytes_asked_for(fs: MeshFileSystem,
                                                   local_mesh: LocalMesh) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    data = rng.randbytes(3 * 1024 * 1024 + 17)
    fs.pipe_file("blobs/range.bin", data)
    for start, end in [(1_000_000, 1_000_100), (0, 10), (len(data) - 5, len(data)),
                       (2 * 1024 * 1024 - 3, 2 * 1024 * 1024 + 4096)]:
        before, before_metric = served(local_mesh), served_metric(local_mesh)
        assert fs.cat_file("meshscale://blobs/range.bin", start, end) == data[start:end]
        assert served(local_mesh) - before == end - start
        assert served_metric(local_mesh) - before_metric == end - start
    # Negative offsets count from the end; a range past the end is cut at it.
    before = served(local_mesh)
    assert fs.cat_file("blobs/range.bin", -7, None) == data[-7:]
    assert fs.cat_file("blobs/range.bin", len(data) - 3, len(data) + 100) == data[-3:]
    assert served(local_mesh) - before == 10
    # A file opened for reading fetches only the ranges read (no cache: exactly those).
    with fs.open("blobs/range.bin", "rb", cache_type="none") as f:
        before = served(local_mesh)
        f.seek(2_500_000)
        assert f.read(1000) == data[2_500_000:2_501_000]
        assert served(local_mesh) - before == 1000
    # The default read-ahead cache fetches one block, not the object.
    with fs.open("blobs/range.bin", "rb", block_size=64 * 1024) as f:
        before = served(local_mesh)
        f.seek(1_234_567)
        assert f.read(100) == data[1_234_567:1_234_667]
        moved = served(local_mesh) - before
        assert 100 <= moved <= 64 * 1024 + 100


def test_ls_by_prefix_and_info(fs: MeshFileSystem, local_mesh: LocalMesh) -> None:
    fs.pipe_file("ls/a.txt", b"a" * 10)
    fs.pipe_file("ls/b.txt", b"b" * 20)
    fs.pipe_file("ls/sub/c.txt", b"c" * 30)
    fs.pipe_file("lsx/d.txt", b"d")  # shares the prefix "ls" but not the directory
    assert fs.ls("meshscale://ls", detail=False) == ["ls/a.txt", "ls/b.txt", "ls/sub"]
    rows = {r["name"]: r for r in fs.ls("ls")}
    assert rows["ls/a.txt"]["size"] == 10 and rows["ls/a.txt"]["type"] == "file"
    assert rows["ls/sub"]["type"] == "directory"
    assert fs.ls("ls/sub", detail=False) == ["ls/sub/c.txt"]
    assert {"ls", "lsx"} <= set(fs.ls("", detail=False))
    assert sorted(fs.find("ls")) == ["ls/a.txt", "ls/b.txt", "ls/sub/c.txt"]
    info = fs.info("ls/b.txt")
    assert info["size"] == 20 and info["type"] == "file" and info["replicas"] == 3
    names = {n.name for n in local_mesh.nodes}
    assert set(info["holders"]) <= names and len(info["holders"]) >= 2
    assert fs.info("ls/sub")["type"] == "directory"
    assert fs.isdir("ls") and not fs.isfile("ls") and fs.isfile("ls/a.txt")
    by_id = fs.info(f"meshscale://{info['id']}")
    assert by_id["size"] == 20 and by_id["id"] == info["id"]
    # The names are KV keys under fs/, listed by the KV's own listing too.
    with connect(local_mesh.nodes[1].address, bundle=local_mesh.bundle_path) as m:
        assert m.kv.keys(NAME_PREFIX + "ls/") == [
            "fs/ls/a.txt", "fs/ls/b.txt", "fs/ls/sub/c.txt"]
        assert m.kv.keys(NAME_PREFIX + "ls/", limit=2) == ["fs/ls/a.txt", "fs/ls/b.txt"]
        assert [k for k, _ in m.kv.items(NAME_PREFIX + "ls/", page_size=1)] == [
            "fs/ls/a.txt", "fs/ls/b.txt", "fs/ls/sub/c.txt"]


def test_write_policy_and_rm(fs: MeshFileSystem, local_mesh: LocalMesh) -> None:
    with fs.open("policy/eu.bin", "wb", replicas=1, w=1, residency=["eu-west"]) as f:
        f.write(b"x" * 100_000)
    info = fs.info("policy/eu.bin")
    eu = {n.name for n in local_mesh.nodes if n.region == "eu-west"}
    assert info["residency"] == ["eu-west"] and set(info["holders"]) <= eu
    assert info["replicas"] == 1
    # A rule the mesh cannot meet is refused at close, and binds nothing.
    with pytest.raises(MeshError, match="mars"), \
            fs.open("policy/mars.bin", "wb", residency=["mars"]) as f:
        f.write(b"y" * 10)
    assert not fs.exists("policy/mars.bin")
    # An empty file is an empty object.
    fs.touch("policy/empty")
    assert fs.cat_file("policy/empty") == b"" and fs.cat_file("policy/empty", 0, 10) == b""
    assert fs.info("policy/empty")["size"] == 0
    # rm of a name unbinds it; rm of an id deletes the object.
    oid = info["id"]
    fs.rm("policy/eu.bin")
    assert not fs.exists("policy/eu.bin")
    assert fs.info(oid)["size"] == 100_000
    fs.rm(oid)
    with pytest.raises(FileNotFoundError, match=oid):
        fs.info(oid)


def test_environment_as_the_cli_reads_it(local_mesh: LocalMesh,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No storage options: MESHSCALE_MESH (and MESHSCALE_BUNDLE) as for the CLI."""
    monkeypatch.delenv("MESHSCALE_BUNDLE", raising=False)
    monkeypatch.setenv("MESHSCALE_MESH", str(local_mesh.mesh_json))
    df = pd.DataFrame({"k": [1, 2, 3]})
    df.to_parquet("meshscale://env/k.parquet", storage_options={"skip_instance_cache": True})
    got = pd.read_parquet("meshscale://env/k.parquet",
                          storage_options={"skip_instance_cache": True})
    pd.testing.assert_frame_equal(got, df)


def test_bad_input(fs: MeshFileSystem, opts: dict[str, Any], local_mesh: LocalMesh,
                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("nowhere/x.parquet")):
        fs.cat_file("meshscale://nowhere/x.parquet")
    with pytest.raises(FileNotFoundError, match=re.escape("nowhere/x.parquet")):
        pd.read_parquet("meshscale://nowhere/x.parquet", storage_options=opts)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fs.ls("nowhere")
    missing = "b3-" + "0" * 64
    with pytest.raises(FileNotFoundError, match=missing):
        fs.cat_file(missing, 0, 10)
    with pytest.raises(FileNotFoundError, match="nowhere/y"):
        fs.rm("nowhere/y")
    with pytest.raises(ValueError, match="not an object id"):
        fs.open(missing, "wb")
    with pytest.raises(ValueError, match="no append"):
        fs.open("a/b", "ab")
    with pytest.raises(TypeError, match="'adress'"):
        MeshFileSystem(adress=opts["address"], bundle=opts["bundle"])
    with pytest.raises(ValueError, match="replicas"):
        MeshFileSystem(**opts, replicas=0, skip_instance_cache=True)
    with pytest.raises(ValueError, match="timeout"):
        MeshFileSystem(**opts, timeout=-1, skip_instance_cache=True)
    with pytest.raises(ConnectError, match=re.escape(str(tmp_path / "no-bundle"))):
        MeshFileSystem(address=opts["address"], bundle=str(tmp_path / "no-bundle"),
                       skip_instance_cache=True)
    with pytest.raises(ConnectError, match="invalid node address"):
        MeshFileSystem(address="nohost", bundle=opts["bundle"], skip_instance_cache=True)
    monkeypatch.delenv("MESHSCALE_BUNDLE", raising=False)
    monkeypatch.delenv("MESHSCALE_MESH", raising=False)
    with pytest.raises(ConnectError, match="MESHSCALE_BUNDLE"):
        MeshFileSystem(address=opts["address"], skip_instance_cache=True)
    with pytest.raises(ConnectError, match=re.escape("mesh.json")):
        MeshFileSystem(mesh=str(tmp_path / "mesh.json"), skip_instance_cache=True)


def test_kv_list_cli(fs: MeshFileSystem, local_mesh: LocalMesh) -> None:
    fs.pipe_file("cli/one", b"1")
    fs.pipe_file("cli/two", b"22")
    env = {k: v for k, v in os.environ.items() if k not in ("MESHSCALE_BUNDLE",)}
    env["MESHSCALE_MESH"] = str(local_mesh.mesh_json)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "meshscale", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    out = cli("kv", "list", "--prefix", "fs/cli/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["fs/cli/one", "fs/cli/two"]
    out = cli("kv", "list", "--prefix", "fs/cli/", "--json")
    rows = json.loads(out.stdout)
    assert [r["key"] for r in rows] == ["fs/cli/one", "fs/cli/two"]
    assert json.loads(rows[1]["value"])["size"] == 2
    out = cli("kv", "list", "--prefix", "fs/none-such/")
    assert out.returncode == 0 and out.stdout == ""


def test_entry_point_and_registration() -> None:
    """pyproject names the class as an fsspec entry point (an installed meshscale is
    found by fsspec without an import); importing the module registers it too."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = meta["project"]["entry-points"]["fsspec.specs"]["meshscale"]
    module, _, name = target.partition(":")
    assert getattr(import_module(module), name) is MeshFileSystem
    assert fsspec.get_filesystem_class("meshscale") is MeshFileSystem
    batch = meta["project"]["optional-dependencies"]["batch"]
    assert {re.split(r"[<>=\[]", d)[0] for d in batch} == {
        "fsspec", "pandas", "pyarrow", "dask"}
    assert "batch" in re.search(r"pip install .*-e '\.\[([a-z,]+)\]'",
                                (ROOT / "Makefile").read_text()).group(1).split(",")


def test_docs_snippet_runs_as_written(local_mesh: LocalMesh, tmp_path: Path) -> None:
    text = (ROOT / "docs" / "fsspec.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/fsspec.md has no python snippet"
    script = tmp_path / "snippet.py"
    script.write_text(blocks[0])
    env = {k: v for k, v in os.environ.items() if k != "MESHSCALE_BUNDLE"}
    env["MESHSCALE_MESH"] = str(local_mesh.mesh_json)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    # The snippet prints the totals per region of the frame it wrote and read back.
    assert re.search(r"eu\s+15\b", out.stdout) and re.search(r"us\s+20\b", out.stdout), \
        out.stdout


def test_a_range_read_is_audited_once(fs: MeshFileSystem, local_mesh: LocalMesh) -> None:
    """A read that starts past offset 0 (a parquet footer) leaves one audit entry on the
    node that served it, naming the range; the chunks of one read do not add more."""
    data = random.Random(5).randbytes(2 * 1024 * 1024 + 99)
    fs.pipe_file("audit/range.bin", data)
    oid = fs.info("audit/range.bin")["id"]
    assert fs.cat_file("audit/range.bin", 1_500_000, 1_500_100) == data[1_500_000:1_500_100]
    assert fs.cat_file("audit/range.bin", 1_600_000, 1_600_100) == data[1_600_000:1_600_100]
    exe = Path(sys.executable).parent / "meshscale"
    env = {k: v for k, v in os.environ.items() if k not in ("MESHSCALE_BUNDLE",
                                                             "MESHSCALE_MESH")}
    out = subprocess.run([str(exe), "audit", "--object", oid, "--kind", "read", "--all-nodes",
                          "--json", "--mesh", str(local_mesh.mesh_json), "--bundle",
                          str(local_mesh.admin_path)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    reads = json.loads(out.stdout)
    assert len(reads) == 1, reads  # the second range by the same caller is within the window
    assert "range from byte 1500000" in reads[0]["detail"], reads
