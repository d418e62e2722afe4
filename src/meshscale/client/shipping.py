"""What travels from a client to the nodes with a task or a stream operator: the rule for
shipping a function's module by value, where the work may run (``Region``, ``Regions``),
and the error a refused submit raises. Shared by ``client/tasks.py`` and
``client/streams.py`` (kept apart so neither imports the other's internals)."""

from __future__ import annotations

import ast
import contextlib
import dis
import importlib.util
import sys
import sysconfig
import types
from pathlib import Path
from typing import Any

import msgspec

from meshscale.client.mesh import MeshError

__all__ = ["MAX_SHIPPED_MODULES", "MAX_SHIPPED_SOURCE_BYTES", "Region", "Regions",
           "ShippedModule", "TaskSubmitError", "by_value", "modules_to_ship"]


class TaskSubmitError(MeshError):
    """A task was refused at submit: unpicklable, too large, no node may run it, or an
    input object no live node holds. Nothing of the batch was submitted."""



class Region(msgspec.Struct, frozen=True):
    """``placement=Region("cloud")``: run in this one region (central placement)."""

    name: str


class Regions(msgspec.Struct, frozen=True):
    """``placement=Regions(["eu-west", "eu-central"])``: run in one of these regions."""

    names: list[str]


_INSTALLED = tuple(
    str(Path(p).resolve())
    for p in {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib",
                                                     "platlib")}
    if p
)


def by_value(module_name: str) -> bool:
    """Whether a function's module must travel by value: the nodes can import installed
    packages and meshscale, not the user's own scripts and modules."""
    if module_name in ("__main__", "builtins") or module_name.split(".")[0] == "meshscale":
        return module_name == "__main__"
    mod = sys.modules.get(module_name)
    path = getattr(mod, "__file__", None)
    if mod is None or path is None:
        return False
    resolved = str(Path(path).resolve())
    return not resolved.startswith(_INSTALLED)


# -- the modules of the user's project that travel with a function -----------------------

MAX_SHIPPED_MODULES = 256
"""At most this many source files of the user's project travel with one function."""
MAX_SHIPPED_SOURCE_BYTES = 4 << 20
"""Their sources together (a node's ``max_function_bytes`` bounds the whole pickle)."""

ShippedModule = tuple[str, str, bool]
"""``(file name, source, is_package)`` of one module that travels with a function."""


def _installed_path(path: str) -> bool:
    return str(Path(path).resolve()).startswith(_INSTALLED)


def _source_imports(source: str, filename: str) -> set[str]:
    """Top-level names of the absolute imports in a module's source (relative ones stay
    inside its package, which travels whole)."""
    try:
        tree = ast.parse(source, filename)
    except (SyntaxError, ValueError):
        return set()
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def _code_objects(code: types.CodeType) -> list[types.CodeType]:
    out = [code]
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out.extend(_code_objects(c))
    return out


def _function_roots(fn: Any) -> set[str]:
    """Top-level module names a function reaches: what its code imports when it runs
    (``import mylib`` inside it), the modules among its globals and closure, and the
    modules the objects among them come from."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    glb: dict[str, Any] = getattr(fn, "__globals__", None) or {}
    out: set[str] = set()
    if code is None:  # a callable object: where its class lives
        return {(getattr(type(fn), "__module__", None) or "").split(".")[0]} - {""}
    package = str(glb.get("__package__") or "")
    refs: list[Any] = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())
                       if _has_contents(c)]
    for co in _code_objects(code):
        consts: list[Any] = []
        for ins in dis.get_instructions(co):
            if ins.opname == "LOAD_CONST":
                consts = [*consts[-1:], ins.argval]
            elif ins.opname == "IMPORT_NAME":
                level = consts[0] if len(consts) == 2 and isinstance(consts[0], int) else 0
                name = str(ins.argval) if not level else package
                if name:
                    out.add(name.split(".")[0])
        refs.extend(glb[n] for n in co.co_names if n in glb)
    for obj in refs:
        origin = obj.__name__ if isinstance(obj, types.ModuleType) else \
            getattr(obj, "__module__", None)
        if isinstance(origin, str) and origin:
            out.add(origin.split(".")[0])
    return out


def _has_contents(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True


def _locate(top: str) -> list[tuple[str, Path, bool]]:
    """The source files of top-level module ``top`` when it is the user's own (not
    installed, not meshscale, not the standard library): ``(module, file, is_package)``
    for a single module or every module of a package; [] otherwise."""
    if top in sys.stdlib_module_names or top in ("meshscale", "__main__", "builtins"):
        return []
    mod = sys.modules.get(top)
    spec = getattr(mod, "__spec__", None) if mod is not None else None
    if spec is None:
        try:
            spec = importlib.util.find_spec(top)  # a top-level name: nothing is imported
        except (ImportError, ValueError):
            return []
    origin = getattr(spec, "origin", None)
    if spec is None or not isinstance(origin, str) or not origin.endswith(".py") \
            or not Path(origin).is_file() or _installed_path(origin):
        return []
    if not spec.submodule_search_locations:
        return [(top, Path(origin), False)]
    root = Path(origin).parent
    found: list[tuple[str, Path, bool]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p == "__pycache__" or p.startswith(".") for p in rel.parts[:-1]):
            continue
        # a module is reachable only through packages (directories with __init__.py)
        if not all((root.joinpath(*rel.parts[:i]) / "__init__.py").is_file()
                   for i in range(1, len(rel.parts))):
            continue
        parts = [top, *rel.with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        found.append((".".join(parts[:-1] if is_pkg else parts), path, is_pkg))
    return found


def modules_to_ship(fn: Any) -> dict[str, ShippedModule]:
    """The modules of the user's project that ``fn`` may need on a node that does not
    have them: those it imports or references, and transitively those their sources
    import (a package travels whole), sorted by name so that the same code gives the same
    bytes. Installed packages, the standard library and meshscale stay behind: the nodes
    import their own. Raises ``TaskSubmitError`` past ``MAX_SHIPPED_MODULES`` or
    ``MAX_SHIPPED_SOURCE_BYTES``."""
    roots = _function_roots(fn)
    module_name = getattr(fn, "__module__", None) or "__main__"
    mod = sys.modules.get(module_name)
    own_file = getattr(mod, "__file__", None)
    if module_name == "__main__" or by_value(module_name):
        if module_name != "__main__":
            roots.add(module_name.split(".")[0])
        if isinstance(own_file, str) and own_file.endswith(".py") and Path(own_file).is_file():
            with contextlib.suppress(OSError, SyntaxError, UnicodeDecodeError):
                source = importlib.util.decode_source(Path(own_file).read_bytes())
                roots |= _source_imports(source, own_file)
    out: dict[str, ShippedModule] = {}
    seen: set[str] = set()
    todo = sorted(roots)
    total = 0
    while todo:
        top = todo.pop()
        if top in seen:
            continue
        seen.add(top)
        for name, path, is_pkg in _locate(top):
            try:
                source = importlib.util.decode_source(path.read_bytes())
            except (OSError, SyntaxError, UnicodeDecodeError) as e:
                raise TaskSubmitError(f"cannot read module {name} ({path}) to ship it: "
                                      f"{e}") from None
            total += len(source.encode())
            out[name] = (str(path), source, is_pkg)
            if len(out) > MAX_SHIPPED_MODULES or total > MAX_SHIPPED_SOURCE_BYTES:
                raise TaskSubmitError(
                    f"the modules of your project that {getattr(fn, '__qualname__', fn)!s:.80}"
                    f" uses exceed MAX_SHIPPED_MODULES={MAX_SHIPPED_MODULES} files or "
                    f"MAX_SHIPPED_SOURCE_BYTES={MAX_SHIPPED_SOURCE_BYTES} bytes (at {name}); "
                    "install the project on the nodes (pip install) instead")
            todo.extend(sorted(_source_imports(source, str(path)) - seen))
    return dict(sorted(out.items()))
