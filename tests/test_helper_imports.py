"""A test may import a helper module only from its own directory or from ``tests/``.

pytest puts a test's directory on ``sys.path`` when it collects that directory, so an
import of ``tests/runtime/runtime_mesh.py`` from ``tests/client`` works when the runtime
tests happen to be collected first and fails on a clean run that collects ``client`` first
(CI failed exactly so). This reads every test file's imports and fails on such a one."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _helpers() -> dict[str, Path]:
    """Helper module name -> the directory that holds it (test_* files are helpers too)."""
    out: dict[str, Path] = {}
    for path in TESTS.rglob("*.py"):
        if path.name != "conftest.py":
            out.setdefault(path.stem, path.parent)
    return out


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_helper_is_imported_across_test_directories() -> None:
    helpers = _helpers()
    bad = []
    for path in sorted(TESTS.rglob("*.py")):
        for name in sorted(_imported(path) & helpers.keys()):
            home = helpers[name]
            if home not in (path.parent, TESTS):
                bad.append(f"{path.relative_to(TESTS)} imports {name} from "
                           f"{home.relative_to(TESTS)}/")
    assert not bad, "move the helper to tests/ or import within its directory:\n" + "\n".join(bad)


def test_the_check_sees_a_cross_directory_import(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("from runtime_mesh import wait_for\nimport os\n")
    assert _imported(f) == {"runtime_mesh", "os"}
    assert _helpers()["runtime_mesh"] == TESTS / "runtime"
