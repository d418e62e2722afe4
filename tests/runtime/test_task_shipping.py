"""The modules of the user's project travel with a task (``client/shipping.py``), on real
node processes: a task whose function imports, when it runs, a module of a project the
nodes cannot import (``import mylib`` inside it), or calls a helper module its own module
imported, runs; a module nobody has still fails with ``ModuleNotFoundError``; and the
modules a task brought are gone from the worker after it (``worker_main._forget_shipped``)."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import cloudpickle
import pytest
from runtime_mesh import host_like_dir

from meshscale.client.shipping import TaskSubmitError, modules_to_ship
from meshscale.client.tasks import TaskMesh, _pickle_call, pickle_function
from meshscale.runtime import worker_main
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(300)

FILES = {
    # a package the task imports when it runs
    "shipmylib/__init__.py": "from shipmylib.core import scale\nVERSION = 'v1'\n",
    "shipmylib/core.py": "from shiphelper import twice\n\n"
                         "def scale(x):\n    return twice(x) * 10\n",
    # a single-file module the package and the job's module import
    "shiphelper.py": "class Point:\n    def __init__(self, x):\n        self.x = x\n\n"
                     "def twice(x):\n    return 2 * x\n",
    # the user's job: imports shiphelper at its top, shipmylib only inside a function
    "shipjob.py": textwrap.dedent("""\
        import sys

        from shiphelper import Point, twice

        def uses_package(x):
            import shipmylib
            return shipmylib.scale(x), shipmylib.VERSION

        def uses_helper(x):
            return twice(x)

        def returns_own_class(x):
            return Point(x)

        def what_is_loaded():
            return sorted(m for m in sys.modules if m.startswith(("shipmylib", "shiphelper")))

        def imports_what_nobody_has():
            import shipnowhere  # noqa: F401
        """),
}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The user's project, importable here (its directory on this process's sys.path),
    not on the nodes'."""
    root = tmp_path_factory.mktemp("project")
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("shipjob")
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules
                     if n.split(".")[0] in ("shipjob", "shipmylib", "shiphelper")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    with host_like_dir("meshscale-ship-") as directory, LocalMesh(directory, 2) as m:
        yield m


def test_the_modules_a_function_reaches_are_found(project: ModuleType) -> None:
    shipped = modules_to_ship(project.uses_package)
    assert set(shipped) == {"shipjob", "shipmylib", "shipmylib.core", "shiphelper"}
    filename, source, is_pkg = shipped["shipmylib"]
    assert is_pkg and filename.endswith("shipmylib/__init__.py") and "VERSION" in source
    assert not shipped["shiphelper"][2]
    # installed packages, the standard library and meshscale stay behind
    assert not {"pytest", "sys", "cloudpickle", "meshscale"} & set(shipped)
    # the same code gives the same bytes (the function id is a content hash)
    assert modules_to_ship(project.uses_package) == shipped


def test_a_task_imports_a_package_of_the_project_when_it_runs(
        client: TaskMesh, project: ModuleType) -> None:
    assert client.submit(project.uses_package, 3).result(timeout=120) == (60, "v1")


def test_a_task_calls_a_helper_module_of_its_own_module(
        client: TaskMesh, project: ModuleType) -> None:
    futs = [client.submit(project.uses_helper, i) for i in range(6)]
    assert [f.result(timeout=120) for f in futs] == [2 * i for i in range(6)]


def test_a_result_of_a_shipped_class_comes_back_as_that_class(
        client: TaskMesh, project: ModuleType) -> None:
    point = client.submit(project.returns_own_class, 7).result(timeout=120)
    assert type(point) is sys.modules["shiphelper"].Point and point.x == 7


def test_a_module_nobody_has_still_fails_with_module_not_found(
        client: TaskMesh, project: ModuleType) -> None:
    with pytest.raises(ModuleNotFoundError, match="shipnowhere"):
        client.submit(project.imports_what_nobody_has).result(timeout=120)


def test_a_worker_forgets_the_shipped_modules_after_the_task(project: ModuleType) -> None:
    """What a worker does with a task, here: unpickle the wrapper where the project
    cannot be imported, call it, forget."""
    _, fn_bytes = pickle_function(project.uses_package)
    payload, inputs, after = _pickle_call((2,), {})
    assert not after and not inputs
    saved_path = list(sys.path)
    saved = {n: sys.modules.pop(n) for n in list(sys.modules)
             if n.split(".")[0] in ("shipjob", "shipmylib", "shiphelper")}
    sys.path[:] = [p for p in sys.path if not (Path(p) / "shipjob.py").exists()]
    try:
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("shipmylib")
        call = cloudpickle.loads(fn_bytes)
        assert call(payload, []) == (40, "v1")
        assert "shipmylib" in sys.modules  # kept while the task's result is pickled
        worker_main._forget_shipped()
        assert not [n for n in sys.modules if n.startswith(("shipmylib", "shiphelper"))]
        assert not [f for f in sys.meta_path if getattr(f, "meshscale_shipped", False)]
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("shipmylib")
        # the same wrapper's next call finds its modules again
        assert call(payload, []) == (40, "v1")
        worker_main._forget_shipped()
    finally:
        sys.path[:] = saved_path
        sys.modules.update(saved)


class _Watched(ModuleType):
    """A module that counts how often its ``__spec__`` is read (as a worker's module
    scan reads it)."""

    looked = 0

    @property  # type: ignore[override]
    def __spec__(self) -> None:
        type(self).looked += 1
        return None


@pytest.mark.parametrize("archive,snapshot", [(False, False), (True, True), (True, False)],
                         ids=["no-archive", "archive-snapshot", "archive-older-client"])
def test_a_worker_looks_only_at_the_modules_that_came_during_the_call(
        project: ModuleType, archive: bool, snapshot: bool) -> None:
    """Without a code archive every module a call brings is one its finder loaded (its
    ``modules``): the call takes no snapshot of ``sys.modules`` and the worker looks at
    no other module (issue #19: the two sets of every module name cost more than a
    no-op's run). With an archive the finder keeps the names of ``sys.modules`` as the
    call began, so the worker looks only at what came since; a finder with an archive
    and without that snapshot (pickled by an older client) still has every module looked
    at. A module that was there is never the call's; the call's own are forgotten."""
    _, fn_bytes = pickle_function(project.uses_package)
    payload, _, _ = _pickle_call((2,), {})
    saved_path = list(sys.path)
    saved = {n: sys.modules.pop(n) for n in list(sys.modules)
             if n.split(".")[0] in ("shipjob", "shipmylib", "shiphelper")}
    sys.path[:] = [p for p in sys.path if not (Path(p) / "shipjob.py").exists()]
    _Watched.looked = 0
    sys.modules["shipwatched"] = _Watched("shipwatched")
    try:
        call = cloudpickle.loads(fn_bytes)
        assert call(payload, []) == (40, "v1")
        finders = [f for f in sys.meta_path if getattr(f, "meshscale_shipped", False)]
        assert finders and all(f.modules_before is None for f in finders)
        if archive:
            for f in finders:
                f.code_paths = ["/nonexistent/meshscale-archive"]
                if snapshot:
                    f.modules_before = set(sys.modules) - set(f.modules) - {
                        n for n in sys.modules if n.startswith("shipjob")}
        worker_main._forget_shipped()
        assert not [n for n in sys.modules if n.startswith(("shipmylib", "shiphelper"))]
        assert not [f for f in sys.meta_path if getattr(f, "meshscale_shipped", False)]
        assert "shipwatched" in sys.modules
        assert (_Watched.looked == 0) is (not archive or snapshot)
        # the next call of the same wrapper finds its modules again
        for f in finders:
            f.code_paths = []
        assert call(payload, []) == (40, "v1")
        worker_main._forget_shipped()
        assert not [n for n in sys.modules if n.startswith(("shipmylib", "shiphelper"))]
    finally:
        sys.modules.pop("shipwatched", None)
        sys.path[:] = saved_path
        sys.modules.update(saved)


def test_too_much_to_ship_is_refused_naming_the_limit(
        project: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshscale.client import shipping

    monkeypatch.setattr(shipping, "MAX_SHIPPED_MODULES", 2)
    with pytest.raises(TaskSubmitError, match="MAX_SHIPPED_MODULES=2"):
        modules_to_ship(project.uses_package)


SCRIPT = """\
import sys

import meshscale
from shipsibling import shout

def work(x):
    import shipsibling
    return shout(x) + shipsibling.MARK

if __name__ == "__main__":
    with meshscale.connect(sys.argv[1], bundle=sys.argv[2]) as mesh:
        print(mesh.submit(work, "hi").result(timeout=120))
"""


def test_a_script_ships_the_module_beside_it(mesh: LocalMesh, tmp_path: Path) -> None:
    """The common case: ``python job.py`` with a helper module beside the script."""
    import os
    import subprocess

    (tmp_path / "shipsibling.py").write_text("MARK = '!'\n\ndef shout(s):\n"
                                             "    return s.upper()\n")
    (tmp_path / "job.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in sys.path if (Path(p) / "meshscale").is_dir())}
    out = subprocess.run(
        [sys.executable, "job.py", mesh.nodes[0].address, str(mesh.bundle_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "HI!"


def shout_record(record: object) -> str:
    from shiphelper import twice

    return f"{twice(record.value)}"  # type: ignore[attr-defined]


def test_a_stream_operator_ships_the_modules_it_imports(
        client: TaskMesh, project: ModuleType) -> None:
    client.operator("shipnums", shout_record, output="shipnums-out")
    try:
        with client.stream("shipnums") as s:
            s.publish("k", 21)
        for rec in client.subscribe("shipnums-out"):
            assert rec.value == "42"
            break
    finally:
        client.remove_operator("shout_record-shipnums")
