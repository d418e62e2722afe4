"""``connect(..., working_dir=PATH, py_modules=[...])`` on real node processes: a task
importing a module of a project directory the nodes do not have fails without it
(``ModuleNotFoundError``) and runs with it; the same directory is received by the node
once for two connections (its ``functions_received`` counter), a changed file gives a new
hash and the task sees the change; a single module file travels with ``py_modules``; a
task of another connection finds none of it; bad input is refused before connecting."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_mesh import host_like_dir

import meshscale
from meshscale.client import codepack
from meshscale.client.rpc import ClientCredentials, call
from meshscale.client.tasks import TaskMesh
from meshscale.runtime.launcher import LocalMesh
from meshscale.trust.bundle import load_bundle

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    with host_like_dir("meshscale-wd-") as directory, LocalMesh(directory, 2) as m:
        yield m


def use_project(x: int) -> tuple[int, str]:
    import wdship_mod  # only in the project directory: neither here nor on the node

    return wdship_mod.triple(x), wdship_mod.TAG


def use_single(x: int) -> int:
    import wdship_single

    return wdship_single.plus_one(x)


def what_leaked() -> list[str]:
    return sorted([m for m in sys.modules if m.startswith("wdship_")]
                  + [p for p in sys.path if "meshscale-code" in p])


def project(root: Path, tag: str) -> Path:
    (root / "wdship_mod").mkdir(parents=True, exist_ok=True)
    (root / "wdship_mod" / "__init__.py").write_text(
        f"from wdship_mod.calc import triple\nTAG = {tag!r}\n")
    (root / "wdship_mod" / "calc.py").write_text("def triple(x):\n    return 3 * x\n")
    (root / "__pycache__").mkdir(exist_ok=True)
    (root / "__pycache__" / "junk.pyc").write_bytes(b"\0" * 100)
    return root


def received(mesh: LocalMesh) -> int:
    creds = ClientCredentials.from_bundle(load_bundle(mesh.bundle_path))
    stats = call(mesh.nodes[0].address, creds, "task.stats", {}, timeout=30)
    return int(stats["compute"].get("functions_received", 0))


def connect(mesh: LocalMesh, **kw: object) -> TaskMesh:
    return meshscale.connect(mesh.nodes[0].address, bundle=mesh.bundle_path, **kw)  # type: ignore[arg-type]


def test_a_task_finds_the_working_dir_only_when_given(mesh: LocalMesh, tmp_path: Path) -> None:
    root = project(tmp_path / "proj", "first")
    assert "wdship_mod" not in sys.modules
    with connect(mesh) as plain, pytest.raises(ModuleNotFoundError, match="wdship_mod"):
        plain.submit(use_project, 2).result(timeout=120)
    before = received(mesh)
    with connect(mesh, working_dir=root) as c:
        assert [f.result(timeout=120) for f in c.map(use_project, [1, 2, 3])] == \
            [(3, "first"), (6, "first"), (9, "first")]
    after_first = received(mesh)
    assert after_first == before + 1
    # a second connection with the same directory: the same archive, not sent again
    with connect(mesh, working_dir=root) as c2:
        assert c2.submit(use_project, 5).result(timeout=120) == (15, "first")
    assert received(mesh) == after_first
    # a changed file: a new hash, sent once more, and the task sees the change
    h1 = codepack.pack(root)[0]
    (root / "wdship_mod" / "__init__.py").write_text(
        "from wdship_mod.calc import triple\nTAG = 'second'\n")
    assert codepack.pack(root)[0] != h1
    with connect(mesh, working_dir=root) as c3:
        assert c3.submit(use_project, 1).result(timeout=120) == (3, "second")
    assert received(mesh) == after_first + 1
    # another connection's tasks find nothing of it on the workers
    with connect(mesh) as plain:
        for fut in plain.map(lambda _: what_leaked(), range(8)):
            assert fut.result(timeout=120) == []


def test_py_modules_ships_a_single_module_file(mesh: LocalMesh, tmp_path: Path) -> None:
    single = tmp_path / "wdship_single.py"
    single.write_text("def plus_one(x):\n    return x + 1\n")
    with connect(mesh, py_modules=[str(single)]) as c:
        assert c.submit(use_single, 41).result(timeout=120) == 42


def test_bad_input_is_refused_before_connecting(tmp_path: Path) -> None:
    nowhere = "127.0.0.1:9"  # nothing is sent: the refusal comes first
    with pytest.raises(codepack.CodeArchiveError, match="is not a directory"):
        meshscale.connect(nowhere, working_dir=tmp_path / "missing")
    with pytest.raises(codepack.CodeArchiveError, match="neither an importable module"):
        meshscale.connect(nowhere, py_modules=["wdship_no_such_module"])
    big = tmp_path / "big"
    big.mkdir()
    (big / "data.bin").write_bytes(b"\0" * (codepack.MAX_CODE_ARCHIVE_BYTES + 1))
    with pytest.raises(codepack.CodeArchiveError, match="MAX_CODE_ARCHIVE_BYTES"):
        meshscale.connect(nowhere, working_dir=big)
