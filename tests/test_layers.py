"""The layer rules of docs/DESIGN.md, read from the code's own imports (ast, every module,
imports inside functions included):

- ``core`` imports only the standard library, msgspec, blake3 (the object-id hash, a pure
  function) and ``core``;
- ``sim`` and ``runtime`` never import each other;
- ``client`` and ``runtime`` never import each other (they share ``core``, ``trust`` and
  ``transport``);
- ``plan`` (``meshscale plan``) runs the simulator: it never imports ``runtime`` or
  ``client``;
- ``transport`` builds on ``trust`` and ``core``; ``trust`` never imports ``transport``,
  and neither imports ``runtime``, ``client`` or ``sim``.

- no import cycle between the package's modules (imports under ``TYPE_CHECKING``
  included: a cycle hidden there is still one design leaning on another). The planes
  reach their node through ``runtime/services.py``, never ``runtime/node.py``.
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
FORBIDDEN = {"runtime": {"client", "sim"}, "client": {"runtime", "sim"}, "sim": {"runtime"},
             "transport": {"runtime", "client", "sim"},
             "trust": {"transport", "runtime", "client", "sim"},
             "plan": {"runtime", "client"}}


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


def module_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from pkg import mod`` included)."""
    mods: dict[str, Path] = {}
    for path in src.rglob("*.py"):
        parts = ("meshscale", *path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = {m for m in imports_of(path, package) if m in mods}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.update(f"{node.module}.{a.name}" for a in node.names
                           if f"{node.module}.{a.name}" in mods)
        out.discard(name)
        graph[name] = out
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    assert cycles(module_graph()) == []


def test_the_cycle_check_sees_a_cycle(tmp_path: Path) -> None:
    """The check finds a cycle hidden under TYPE_CHECKING, as the planes' was."""
    pkg = tmp_path / "runtime"
    pkg.mkdir()
    (pkg / "node.py").write_text("from meshscale.runtime.plane import Plane\n")
    (pkg / "plane.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from meshscale.runtime.node import Node\n")
    (pkg / "leaf.py").write_text("import os\n")
    assert cycles(module_graph(tmp_path)) == [["meshscale.runtime.node",
                                               "meshscale.runtime.plane"]]
