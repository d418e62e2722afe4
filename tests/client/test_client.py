"""The client library and the data-plane CLI against a real local mesh (3 node processes,
one per region), plus a lying node that serves wrong bytes, so the client's own integrity
checks are tested too (a real node never lets corrupt bytes out)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import os
import pickle
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import msgspec
import pytest

import meshscale
from meshscale.client import (
    ConnectError,
    IntegrityError,
    Mesh,
    MeshError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectRef,
    connect,
    connect_async,
    object_id,
)
from meshscale.client.rpc import RpcConnection, RpcError
from meshscale.core.rpc import (
    RpcRequest,
    RpcResponse,
    decode_stream_message,
    encode_stream_message,
)
from meshscale.runtime.launcher import LocalMesh
from meshscale.transport.framing import read_frame, write_frame
from meshscale.transport.tls import GREETING, server_context
from meshscale.trust.bundle import Bundle, init_bundle, issue_node_cert, load_bundle

MESHSCALE = Path(sys.executable).parent / "meshscale"
REGIONS = ["eu-west", "us-east", "ap-south"]
MiB = 1024 * 1024
mesh_test = pytest.mark.timeout(120)


def cli(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "MESHSCALE_BUNDLE"}
    return subprocess.run(
        [str(MESHSCALE), *map(str, args)],
        capture_output=True,
        input=stdin,
        timeout=60,
        env=env,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], code: int = 2) -> str:
    stderr = result.stderr.decode()
    assert result.returncode == code, (result.returncode, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("meshscale: error: ")
    assert "Traceback" not in stderr
    return lines[0]


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


# -- without a node ---------------------------------------------------------------------


def test_object_id_is_blake3_256() -> None:
    data = b"meshscale"
    assert object_id(data) == "b3-" + blake3.blake3(data).hexdigest()
    assert object_id(memoryview(data)) == object_id(bytearray(data))


def test_object_ref_is_picklable_encodable_and_checked() -> None:
    ref = ObjectRef(object_id(b"x"), 1)
    assert pickle.loads(pickle.dumps(ref)) == ref
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(ref), type=ObjectRef) == ref
    assert str(ref) == ref.id
    assert hash(ref) == hash(ObjectRef(ref.id, 1))
    with pytest.raises(ValueError, match="not an object id"):
        ObjectRef("b3-nothex", 1)
    with pytest.raises(ValueError, match="size"):
        ObjectRef(ref.id, -1)


def test_top_level_exports() -> None:
    assert meshscale.connect is connect
    assert meshscale.ObjectRef is ObjectRef
    with pytest.raises(AttributeError):
        _ = meshscale.no_such_name  # type: ignore[attr-defined]


def test_client_package_never_imports_the_runtime() -> None:
    code = (
        "import sys, meshscale.client, meshscale.client.mesh;"
        "bad = [m for m in sys.modules if m.startswith('meshscale.runtime')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_connect_without_a_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHSCALE_BUNDLE", raising=False)
    with pytest.raises(ConnectError, match="MESHSCALE_BUNDLE"):
        connect("127.0.0.1:7946")


def test_connect_with_a_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match="nope"):
        connect("127.0.0.1:7946", bundle=tmp_path / "nope")


def test_connect_bad_address_and_no_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    init_bundle(tmp_path / "b")
    with pytest.raises(ConnectError, match="HOST:PORT"):
        connect("no-port-here", bundle=tmp_path / "b")
    monkeypatch.setenv("MESHSCALE_BUNDLE", str(tmp_path / "b"))
    with pytest.raises(ConnectError, match=re.escape("127.0.0.1:1")):
        connect("127.0.0.1:1", timeout=2)  # bundle from the environment; nobody listens


# -- a lying node: serves bytes that do not match the id -----------------------------------


class LyingNode:
    """Speaks the node's RPC framing over mutual TLS, but flips a byte of every read and
    reports a wrong id for every put."""

    def __init__(self, bundle: Bundle, data: bytes) -> None:
        cert, key = issue_node_cert(bundle, "liar", ["127.0.0.1"])
        self.ctx = server_context(bundle, cert, key)
        self.data = data
        self.calls: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(server.wait_closed())
        self.loop.close()

    def start(self) -> str:
        self.thread.start()
        assert self.ready.wait(10)
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _answer(self, req: RpcRequest) -> Any:
        self.calls.append(req.method)
        a = req.args
        if req.method == "obj.read":
            chunk = bytearray(self.data[a["offset"] : a["offset"] + min(a["length"], 4096)])
            if chunk and a["offset"] == 0:
                chunk[0] ^= 0xFF
            return {"data": bytes(chunk), "size": len(self.data)}
        if req.method == "obj.put_begin":
            return {"upload": "up-1", "chunk_bytes": 4096}
        if req.method == "obj.put_chunk":
            return {"received": len(a["data"])}
        if req.method == "obj.put_end":
            return {"id": "b3-" + "0" * 64, "size": len(self.data), "nodes": ["liar"]}
        if req.method == "members":
            return []
        return {}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            writer.write(GREETING)
            await writer.drain()
            await writer.start_tls(self.ctx)
            while True:
                req = decode_stream_message(await read_frame(reader, 1 << 26), 1 << 26)
                assert isinstance(req, RpcRequest)
                resp = RpcResponse(req.id, True, result=self._answer(req))
                await write_frame(writer, encode_stream_message(resp), max_size=1 << 26)
        writer.close()


@pytest.fixture
def liar(tmp_path: Path) -> Iterator[tuple[Mesh, LyingNode]]:
    bundle = init_bundle(tmp_path / "bundle")
    # Larger than SMALL_PUT_BYTES, so puts take the chunked path.
    node = LyingNode(load_bundle(bundle.path), os.urandom(100_000))
    address = node.start()
    try:
        with connect(address, bundle=bundle.path, timeout=10) as mesh:
            yield mesh, node
    finally:
        node.stop()


def test_corrupt_bytes_raise_integrity_error(liar: tuple[Mesh, LyingNode]) -> None:
    mesh, node = liar
    oid = object_id(node.data)
    with pytest.raises(IntegrityError, match=oid):
        mesh.get(oid)
    with pytest.raises(IntegrityError):
        mesh.get(ObjectRef(oid, len(node.data)))


def test_corrupt_download_to_a_path_leaves_nothing(
    liar: tuple[Mesh, LyingNode], tmp_path: Path
) -> None:
    mesh, node = liar
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError):
        mesh.get(object_id(node.data), path=out / "new.bin")
    (out / "old.bin").write_bytes(b"keep me")
    with pytest.raises(IntegrityError):
        mesh.get(object_id(node.data), path=out / "old.bin")
    assert leftovers(out, set()) == ["old.bin"]
    assert (out / "old.bin").read_bytes() == b"keep me"


def test_put_checks_the_id_the_node_returns(liar: tuple[Mesh, LyingNode]) -> None:
    mesh, node = liar
    with pytest.raises(IntegrityError, match=object_id(node.data)):
        mesh.put(node.data)
    assert node.calls.count("obj.put_chunk") == 25  # 100,000 bytes in chunks of <= 4096


def test_a_failed_upload_is_aborted(liar: tuple[Mesh, LyingNode]) -> None:
    mesh, node = liar

    def fail(done: int, total: int) -> None:
        if done:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        mesh.put(node.data, progress=fail)
    assert node.calls[-1] == "obj.put_abort"


def test_bad_arguments_are_refused_before_any_request(
    liar: tuple[Mesh, LyingNode], tmp_path: Path
) -> None:
    mesh, node = liar
    before = list(node.calls)
    bad: list[tuple[Any, dict[str, Any]]] = [
        (b"x", {"replicas": 0}),
        (b"x", {"replicas": 2, "w": 3}),
        (b"x", {"w": 0}),
        (b"x", {"residency": "eu-west"}),
        (b"x", {"residency": []}),
        (b"x", {"data_class": ""}),
    ]
    for data, kwargs in bad:
        with pytest.raises(ValueError):
            mesh.put(data, **kwargs)
    with pytest.raises(TypeError):
        mesh.put(12345)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        mesh.put(tmp_path / "missing")
    with pytest.raises(ValueError, match="not an object id"):
        mesh.get("b3-short")
    with pytest.raises(ValueError, match="consistency"):
        mesh.kv.get("k", "strong")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        mesh.kv.put("", b"v")
    assert node.calls == before


def test_closed_mesh_refuses_calls(liar: tuple[Mesh, LyingNode]) -> None:
    mesh, _ = liar
    mesh.close()
    mesh.close()
    with pytest.raises(MeshError, match="closed"):
        mesh.kv.get("k")


# -- a real mesh --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("mesh"), 3, regions=REGIONS) as m:
        yield m


@pytest.fixture(scope="module")
def mesh(local_mesh: LocalMesh) -> Iterator[Mesh]:
    with connect(local_mesh.nodes[0].address, bundle=local_mesh.bundle_path) as m:
        yield m


def node_cli(local_mesh: LocalMesh, *args: str | Path, node: int = 0, stdin: bytes | None = None):  # type: ignore[no-untyped-def]
    return cli(
        *args,
        "--node",
        local_mesh.nodes[node].address,
        "--bundle",
        local_mesh.bundle_path,
        stdin=stdin,
    )


@mesh_test
def test_connect_with_an_explicit_token(local_mesh: LocalMesh) -> None:
    from meshscale.trust.bundle import load_bundle

    admin = load_bundle(local_mesh.bundle_path).token
    addr = local_mesh.nodes[1].address
    with connect(addr, bundle=local_mesh.bundle_path, token=admin) as m:
        ref = m.put(b"by token")
        assert m.get(ref) == b"by token"
    with pytest.raises(ConnectError, match="wrong token"):
        connect(addr, bundle=local_mesh.bundle_path, token=admin + "x")
    for bad in ("", "two words", "x" * 513):
        with pytest.raises(ValueError, match="token must be"):
            connect(addr, bundle=local_mesh.bundle_path, token=bad)


@mesh_test
def test_put_get_bytes(mesh: Mesh, local_mesh: LocalMesh) -> None:
    data = b"hello, mesh " + os.urandom(64)
    ref = mesh.put(data)
    assert ref == ObjectRef(object_id(data), len(data))
    assert mesh.get(ref) == data
    assert mesh.get(ref.id) == data
    info = mesh.stat(ref)
    assert isinstance(info, ObjectInfo)
    assert (info.id, info.size, info.replicas) == (ref.id, len(data), 3)
    assert len(info.holders) >= 2
    assert info.ref == ref
    # Through another node, and with the same bytes again (content-addressed: same id).
    with connect(local_mesh.nodes[2].address, bundle=local_mesh.bundle_path) as other:
        assert other.get(ref) == data
        assert other.put(data) == ref
    assert mesh.get(mesh.put(b"")) == b""


@mesh_test
def test_big_file_streams_both_ways(mesh: Mesh, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    size = 20 * MiB + 12_345
    with open(src, "wb") as f:
        for _ in range(20):
            f.write(os.urandom(MiB))
        f.write(os.urandom(12_345))
    seen: list[tuple[int, int]] = []
    ref = mesh.put(src, replicas=2, w=2, progress=lambda d, t: seen.append((d, t)))
    assert ref.size == size
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    assert len(seen) > 3  # chunked, not one message
    h = blake3.blake3()
    with open(src, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    assert ref.id == "b3-" + h.hexdigest()

    out = tmp_path / "out"
    out.mkdir()
    got: list[int] = []
    path = mesh.get(ref, path=out / "copy.bin", progress=lambda d, t: got.append(d))
    assert path == out / "copy.bin"
    assert got[-1] == size
    assert leftovers(out, set()) == ["copy.bin"]
    with open(src, "rb") as a, open(path, "rb") as b:
        while True:
            x, y = a.read(MiB), b.read(MiB)
            assert x == y
            if not x:
                break


@mesh_test
def test_put_from_file_objects(mesh: Mesh, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    path = tmp_path / "f.bin"
    path.write_bytes(b"HEADER" + data)
    with open(path, "rb") as f:
        f.seek(6)  # from the current position on
        assert mesh.put(f).id == object_id(data)
    r, w = os.pipe()  # not seekable: spooled first
    with os.fdopen(w, "wb") as wf:
        wf.write(data[:50_000])
    with os.fdopen(r, "rb") as rf:
        assert mesh.put(rf) == ObjectRef(object_id(data[:50_000]), 50_000)
    assert mesh.put(io.BytesIO(data)).id == object_id(data)
    assert mesh.put(str(path)).id == object_id(b"HEADER" + data)
    fifo = tmp_path / "fifo"  # a path that is not a regular file has no size: spooled
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(data,))
    writer.start()
    try:
        assert mesh.put(fifo) == ObjectRef(object_id(data), len(data))
    finally:
        writer.join(10)


class _ChangesAfterHashing(io.BytesIO):
    """A seekable source whose bytes change once they have been read through (after the
    client's hash-ahead pass, before the upload pass)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.got = 0
        self.flipped = False

    def read(self, n: int | None = -1) -> bytes:
        chunk = super().read(n)
        self.got += len(chunk)
        return chunk

    def seek(self, pos: int, whence: int = 0) -> int:
        if not self.flipped and self.got >= len(self.getbuffer()):
            self.flipped = True
            with self.getbuffer() as view:
                view[len(view) // 2] ^= 0xFF
        return super().seek(pos, whence)


@mesh_test
def test_bytes_that_change_under_a_pipelined_put_store_nothing(
    mesh: Mesh, local_mesh: LocalMesh
) -> None:
    data = os.urandom(9 << 20)  # several chunks in flight
    src = _ChangesAfterHashing(data)
    with pytest.raises(MeshError, match="hash"):
        mesh.put(src)
    assert src.flipped
    changed = bytearray(data)
    changed[len(data) // 2] ^= 0xFF
    for oid in (object_id(data), object_id(bytes(changed))):
        with pytest.raises(ObjectNotFoundError):
            mesh.stat(oid)
    ref = mesh.put(data)  # the connection is still usable
    assert mesh.get(ref) == data


@mesh_test
def test_residency_is_honoured_and_refusals_name_the_rule(mesh: Mesh) -> None:
    data = os.urandom(1000)
    ref = mesh.put(data, replicas=2, w=2, residency=["eu-west", "us-east"], data_class="pii")
    info = mesh.stat(ref)
    assert info.residency is not None and set(info.residency) == {"eu-west", "us-east"}
    assert info.data_class == "pii"
    assert set(info.holders) == {"node-0", "node-1"}  # node-2 is in ap-south

    with pytest.raises(MeshError, match="mars") as err:
        mesh.put(os.urandom(100), residency=["mars"])
    assert "residency" in str(err.value)
    with pytest.raises(MeshError, match="W=2") as err:
        mesh.put(os.urandom(100), replicas=2, w=2, residency=["eu-west"])
    assert "eu-west" in str(err.value)


@mesh_test
def test_unknown_id_is_a_clear_error(mesh: Mesh, tmp_path: Path) -> None:
    missing = object_id(b"never stored " + os.urandom(16))
    with pytest.raises(ObjectNotFoundError, match=missing):
        mesh.get(missing)
    with pytest.raises(ObjectNotFoundError, match="unknown object id"):
        mesh.stat(missing)
    with pytest.raises(ObjectNotFoundError):
        mesh.get(missing, path=tmp_path / "x")
    assert leftovers(tmp_path, set()) == []


@mesh_test
def test_objects_lists_the_mesh(mesh: Mesh) -> None:
    refs = {mesh.put(os.urandom(100 + i)) for i in range(3)}
    listed = {o.id: o for o in mesh.objects()}
    for ref in refs:
        assert listed[ref.id].size == ref.size
        assert listed[ref.id].health in ("ok", "under-replicated")
        assert len(listed[ref.id].holders) >= 2
    paged = [o.id for o in mesh.iter_objects(page_size=2)]
    assert paged == sorted(listed) == sorted(set(paged))


@mesh_test
def test_kv_put_get_delete(mesh: Mesh) -> None:
    assert mesh.kv.get("test/missing") is None
    ts1 = mesh.kv.put("test/k", b"v1")
    assert mesh.kv.get("test/k") == "v1"
    ts2 = mesh.kv.put("test/k", "v2 é", consistency="all")
    assert ts1 != ts2
    assert mesh.kv.get("test/k", "all") == "v2 é"
    assert mesh.kv.get("test/k", binary=True) == "v2 é".encode()
    assert mesh.kv.get("test/k", consistency="one") in ("v1", "v2 é")
    mesh.kv.delete("test/k")
    assert mesh.kv.get("test/k") is None
    # Bytes that are not UTF-8: as text, an error naming the way to get them; as bytes, intact.
    mesh.kv.put("test/bin", b"\xff\x00raw")
    with pytest.raises(ValueError, match=r"not UTF-8 text.*binary=True"):
        mesh.kv.get("test/bin")
    assert mesh.kv.get("test/bin", binary=True) == b"\xff\x00raw"
    assert dict(mesh.kv.items("test/bin", binary=True)) == {"test/bin": b"\xff\x00raw"}
    with pytest.raises(ValueError, match="test/bin"):
        list(mesh.kv.items("test/bin"))
    mesh.kv.put("test/txt", "naïve")
    assert dict(mesh.kv.items("test/txt")) == {"test/txt": "naïve"}
    mesh.kv.delete("test/bin")
    mesh.kv.delete("test/txt")


@mesh_test
def test_async_mesh(local_mesh: LocalMesh) -> None:
    async def main() -> None:
        async with await connect_async(
            local_mesh.nodes[1].address, bundle=local_mesh.bundle_path
        ) as m:
            refs = await asyncio.gather(*(m.put(os.urandom(5000)) for _ in range(4)))
            for ref in refs:
                assert len(await m.get(ref)) == 5000
            await m.kv.put("test/async", b"a")
            assert await m.kv.get("test/async") == "a"

    asyncio.run(main())


@mesh_test
def test_a_put_cancelled_mid_pipeline_leaves_the_mesh_usable(local_mesh: LocalMesh) -> None:
    async def main() -> None:
        async with await connect_async(
            local_mesh.nodes[2].address, bundle=local_mesh.bundle_path
        ) as m:
            data = os.urandom(24 << 20)
            task: asyncio.Task[ObjectRef] | None = None

            def cancel_after_two_chunks(sent: int, total: int) -> None:
                if sent >= 8 << 20 and task is not None:
                    task.cancel()

            task = asyncio.ensure_future(m.put(data, progress=cancel_after_two_chunks))
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(ObjectNotFoundError):
                await m.stat(object_id(data))
            other = os.urandom(9 << 20)  # chunks again, on the same client
            ref = await m.put(other)
            assert await m.get(ref) == other

    asyncio.run(main())


@mesh_test
def test_sync_mesh_works_inside_a_running_loop(local_mesh: LocalMesh) -> None:
    # As in Jupyter: the calling thread already runs an event loop.
    async def notebook_cell() -> bytes:
        with connect(local_mesh.nodes[0].address, bundle=local_mesh.bundle_path) as m:
            return m.get(m.put(b"from a cell"))

    assert asyncio.run(notebook_cell()) == b"from a cell"


@mesh_test
def test_cli_put_get_objects(local_mesh: LocalMesh, tmp_path: Path) -> None:
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(9 * MiB))  # > 8 MiB: the progress bar goes to stderr
    # A class without a policy (and no regions of its own) is refused, naming the class ...
    unknown = node_cli(local_mesh, "put", src, "--class", "telemetry")
    assert unknown.returncode == 2 and b"unknown data class 'telemetry'" in unknown.stderr
    # ... and taken once the class has one.
    pol = node_cli(local_mesh, "policy", "set", "telemetry", "--regions", ",".join(REGIONS))
    assert pol.returncode == 0, pol.stderr.decode()
    put = node_cli(local_mesh, "put", src, "--replicas", "2", "--w", "2", "--class", "telemetry")
    assert put.returncode == 0, put.stderr.decode()
    oid = put.stdout.decode().splitlines()[-1]
    assert oid == object_id(src.read_bytes())

    out = tmp_path / "copy.bin"
    got = node_cli(local_mesh, "get", oid, "-o", out, node=2)
    assert got.returncode == 0, got.stderr.decode()
    assert out.read_bytes() == src.read_bytes()
    # `-o -` is standard output (it used to write a file named "-").
    streamed = node_cli(local_mesh, "get", oid, "-o", "-", node=2)
    assert streamed.returncode == 0, streamed.stderr.decode()
    assert streamed.stdout == src.read_bytes() and not Path("-").exists()

    piped = node_cli(local_mesh, "put", "-", stdin=b"from a pipe")
    assert piped.returncode == 0, piped.stderr.decode()
    assert piped.stdout.decode().splitlines()[-1] == object_id(b"from a pipe")

    listed = node_cli(local_mesh, "objects", "--json")
    assert listed.returncode == 0, listed.stderr.decode()
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    assert rows[oid]["size"] == 9 * MiB and rows[oid]["data_class"] == "telemetry"
    table = node_cli(local_mesh, "objects")
    assert table.returncode == 0
    assert oid in table.stdout.decode()  # whole: it is what `get` takes


@mesh_test
def test_cli_kv(local_mesh: LocalMesh) -> None:
    assert node_cli(local_mesh, "kv", "put", "cli/k", "hello").returncode == 0
    got = node_cli(local_mesh, "kv", "get", "cli/k", "--consistency", "all", node=1)
    assert got.returncode == 0 and got.stdout == b"hello\n"
    assert node_cli(local_mesh, "kv", "put", "cli/k", "-", stdin=b"from stdin\n").returncode == 0
    assert node_cli(local_mesh, "kv", "get", "cli/k").stdout == b"from stdin\n"
    assert node_cli(local_mesh, "kv", "delete", "cli/k").returncode == 0
    assert_one_line_error(node_cli(local_mesh, "kv", "get", "cli/k"), code=1)


def _dp_counter(local_mesh: LocalMesh, node: int, key: str) -> int:
    async def go() -> int:
        c = RpcConnection(local_mesh.nodes[node].address, local_mesh.credentials(), 30)
        try:
            stats = await c.call("dp.stats", {})
        finally:
            await c.close()
        return int(stats["dataplane"].get(key, 0))

    return asyncio.run(go())


@mesh_test
def test_get_through_a_node_without_a_copy_reads_from_the_holder(
    local_mesh: LocalMesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    import meshscale.client.mesh as client_mesh

    data = os.urandom(3 * MiB)
    with connect(local_mesh.nodes[0].address, bundle=local_mesh.bundle_path) as m:
        ref = m.put(data, replicas=1, w=1)
        holders = m.stat(ref).holders
    outsider = next(i for i, n in enumerate(local_mesh.nodes) if n.name not in holders)
    address = local_mesh.nodes[outsider].address
    redirected = _dp_counter(local_mesh, outsider, "reads_redirected")
    proxied = _dp_counter(local_mesh, outsider, "reads_proxied")
    with connect(address, bundle=local_mesh.bundle_path) as m:
        assert m.get(ref) == data
    assert _dp_counter(local_mesh, outsider, "reads_redirected") == redirected + 1
    assert _dp_counter(local_mesh, outsider, "reads_proxied") == proxied  # no byte relayed

    class OnlyTheEntryNode(RpcConnection):
        """As if the holders were not reachable from where the client runs."""

        async def call_raw(self, method: str, args: dict[str, Any] | None = None
                           ) -> msgspec.Raw:  # every call, typed or not, goes here
            if self.addr != address:
                raise RpcError(f"{self.addr}: unreachable from here (test)")
            return await super().call_raw(method, args)

    monkeypatch.setattr(client_mesh, "RpcConnection", OnlyTheEntryNode)
    with connect(address, bundle=local_mesh.bundle_path) as m:
        assert m.get(ref) == data  # relayed by the node after all
    assert _dp_counter(local_mesh, outsider, "reads_proxied") > proxied


@mesh_test
def test_cli_delete(local_mesh: LocalMesh, tmp_path: Path) -> None:
    put = node_cli(local_mesh, "put", "-", stdin=b"to be deleted " + os.urandom(8))
    assert put.returncode == 0, put.stderr.decode()
    oid = put.stdout.decode().splitlines()[-1]
    gone = node_cli(local_mesh, "delete", oid, node=1)
    assert gone.returncode == 0, gone.stderr.decode()
    assert gone.stdout.decode().startswith(f"deleted {oid}")
    # Not found: exit 1 (the README's exit codes); bad input: 2.
    assert_one_line_error(node_cli(local_mesh, "get", oid, "-o", tmp_path / "x"), code=1)
    line = assert_one_line_error(node_cli(local_mesh, "delete", "b3-" + "2" * 64), code=1)
    assert "unknown object id" in line
    assert_one_line_error(node_cli(local_mesh, "delete", "b3-bogus"))
    assert_one_line_error(node_cli(local_mesh, "delete"))


@mesh_test
def test_cli_errors_are_one_line(local_mesh: LocalMesh, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    missing = object_id(b"nobody has this " + os.urandom(8))
    for args in [
        ("put", src, "--residency", "mars"),
        ("put", src, "--residency", "eu-west", "--replicas", "2", "--w", "2"),
        ("put", src, "--w", "0"),
        ("put", src, "--w", "3", "--replicas", "2"),
        ("put", src, "--residency", "eu-west,,us-east"),
        ("put", tmp_path / "missing"),
        ("put", tmp_path),
        ("put", src, "--replicas", "many"),
        ("get", "b3-bogus", "-o", tmp_path / "out"),
        ("get", missing),
        ("get", missing, "-o", tmp_path / "no" / "such" / "dir"),
        ("kv", "get", "k", "--consistency", "strong"),
        ("kv", "put", "k"),
    ]:
        line = assert_one_line_error(node_cli(local_mesh, *args))
        if "mars" in map(str, args):
            assert "mars" in line
    # Not found: exit 1, and nothing written.
    line = assert_one_line_error(node_cli(local_mesh, "get", missing, "-o", tmp_path / "out"),
                                 code=1)
    assert missing in line
    assert leftovers(tmp_path, {"f"}) == []
    line = assert_one_line_error(cli("objects", "--node", "127.0.0.1:1", "--bundle", tmp_path))
    assert "bundle" in line or str(tmp_path) in line
    assert_one_line_error(cli("objects", "--node", "nonsense", "--bundle", local_mesh.bundle_path))
    assert_one_line_error(  # nothing listens there: exit 3
        cli("objects", "--node", "127.0.0.1:1", "--bundle", local_mesh.bundle_path), code=3
    )


@mesh_test
def test_members_lists_every_node(mesh: Mesh, local_mesh: LocalMesh) -> None:
    rows = mesh.members()
    assert {r["name"] for r in rows} == {n.name for n in local_mesh.nodes}
    assert {r["name"]: r["region"] for r in rows} == {n.name: n.region for n in local_mesh.nodes}
    assert all(r["state"] == "alive" for r in rows)


@mesh_test
def test_get_with_reads_in_flight(local_mesh: LocalMesh) -> None:
    """A multi-chunk get keeps ``read_ahead`` chunk reads in flight to the holder and
    still hands the bytes over in order and hash-checked; 1 reads one at a time."""
    from meshscale.client.mesh import connect as connect_objects

    data = os.urandom(13 * MiB)  # four 4 MiB chunks, the last one short
    with connect(local_mesh.nodes[0].address, bundle=local_mesh.bundle_path) as m:
        ref = m.put(data, replicas=1, w=1)
        holders = m.stat(ref).holders
    outsider = next(i for i, n in enumerate(local_mesh.nodes) if n.name not in holders)
    proxied = _dp_counter(local_mesh, outsider, "reads_proxied")
    for depth in (1, 3):
        with connect_objects(local_mesh.nodes[outsider].address,
                             bundle=local_mesh.bundle_path, read_ahead=depth) as m:
            assert m.get(ref) == data
            assert m.get(ref.id) == data  # size unknown until the first reply
    assert _dp_counter(local_mesh, outsider, "reads_proxied") == proxied  # no byte relayed
    with pytest.raises(ValueError, match="read_ahead"):
        connect_objects(local_mesh.nodes[0].address, bundle=local_mesh.bundle_path, read_ahead=0)


@mesh_test
def test_cli_objects_pages_and_filters(local_mesh: LocalMesh, tmp_path: Path) -> None:
    pol = node_cli(local_mesh, "policy", "set", "paging-test", "--regions", ",".join(REGIONS))
    assert pol.returncode == 0, pol.stderr.decode()  # a class is put only once it has one
    ids = []
    for i in range(3):
        src = tmp_path / f"o{i}"
        src.write_bytes(f"paged object {i} ".encode() + os.urandom(16))
        args: list[str | Path] = ["put", src, "--replicas", "2", "--w", "1"]
        if i == 0:
            args += ["--class", "paging-test"]
        put = node_cli(local_mesh, *args)
        assert put.returncode == 0, put.stderr.decode()
        ids.append(put.stdout.decode().splitlines()[-1])

    def listed(*extra: str) -> tuple[list[str], str]:
        r = node_cli(local_mesh, "objects", "--json", *extra)
        assert r.returncode == 0, r.stderr.decode()
        return [o["id"] for o in json.loads(r.stdout)], r.stderr.decode()

    every, _ = listed("--limit", "1000000")
    assert set(ids) <= set(every) and every == sorted(every)
    first, note = listed("--limit", "2")
    assert first == every[:2] and f"--after {first[-1]}" in note
    rest, _ = listed("--after", first[-1], "--limit", "1000000")
    assert first + rest == every
    mine = sorted(ids)[1]
    assert listed("--prefix", mine[:20])[0] == [mine]
    assert listed("--class", "paging-test")[0] == [ids[0]]
    bad = node_cli(local_mesh, "objects", "--prefix", "xyz")
    assert bad.returncode == 2 and b"object ids start with b3-" in bad.stderr
