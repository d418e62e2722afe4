"""The layer rules of docs/DESIGN.md, read from the code's own imports (ast, every module,
imports inside functions included):

- ``core`` imports only the standard library, msgspec, blake3 (the object-id hash, a pure
  function) and ``core``;
- ``sim`` and ``runtime`` never import each other;
- ``client`` and ``runtime`` never import each other (they share ``core`` and ``trust``).

Import cycles inside ``runtime`` and ``client`` are still there; the architecture work
(#14) removes them, and this test will then check for cycles too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "meshscale"


def imports_of(path: Path, package: str | None = None) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved against its
    package, by default the one its place under src/ names)."""
    if package is None:
        package = ".".join(("meshscale", *path.relative_to(SRC).with_suffix("").parts[:-1]))
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join([*base, node.module or ""]).rstrip("."))
            elif node.module:
                out.add(node.module)
    return out


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "meshscale" and len(parts) > 1 else None


MODULES = sorted(SRC.rglob("*.py"))
FORBIDDEN = {"runtime": {"client", "sim"}, "client": {"runtime", "sim"}, "sim": {"runtime"}}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_layer_rules(path: Path) -> None:
    check(path, path.relative_to(SRC).parts[0])


def check(path: Path, mine: str) -> None:
    """Fail if module ``path``, of layer ``mine``, imports what its layer may not."""
    pkg = None if path.is_relative_to(SRC) else f"meshscale.{mine}"
    for imported in sorted(imports_of(path, pkg)):
        theirs = layer(imported)
        if mine == "core":
            top = imported.split(".")[0]
            assert theirs == "core" or top in ("msgspec", "blake3") or (
                top in sys.stdlib_module_names and top != "meshscale"), \
                f"core/{path.name} imports {imported}"
        assert theirs not in FORBIDDEN.get(mine, set()), f"{mine}/{path.name} imports {imported}"


def test_the_rules_see_a_break(tmp_path: Path) -> None:
    """The reader finds an import inside a function too (as the runtime once hid its
    import of the client's RPC module)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f() -> None:\n    from meshscale.client.rpc import call\n")
    assert "meshscale.client.rpc" in imports_of(probe, "meshscale.runtime")
    with pytest.raises(AssertionError, match=r"imports meshscale\.client\.rpc"):
        check(probe, "runtime")
