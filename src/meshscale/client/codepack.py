"""A connection's code: ``connect(..., working_dir=PATH, py_modules=[...])`` packs a
directory and modules into one deterministic zip archive (``pack``), named by the hash of
its bytes; a worker unpacks it once per hash into a bounded cache (``ensure_unpacked``,
``unpack`` refuses absolute names, ``..``, symlinks and more than it may write) and puts
it first on ``sys.path`` for the task.

Standard library only, and no import of the rest of meshscale: this module travels with
the task by value (the call wrapper of ``client/tasks.py`` registers it with cloudpickle),
so a worker never imports the client."""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import os
import shutil
import stat
import tempfile
import types
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_CODE_ARCHIVE_BYTES",
    "MAX_CODE_CACHE_BYTES",
    "MAX_CODE_FILES",
    "CodeArchiveError",
    "ShippedModules",
    "ensure_unpacked",
    "pack",
    "shipped_call",
    "unpack",
]

MAX_CODE_ARCHIVE_BYTES = 8 << 20
"""What a ``working_dir`` and ``py_modules`` may hold together (uncompressed); the archive
travels with every function of the connection (a node's ``max_function_bytes`` bounds
the whole)."""
MAX_CODE_FILES = 10_000
"""Files in one archive."""
MAX_CODE_CACHE_BYTES = 512 << 20
"""Unpacked archives a worker user keeps (least recently used dropped first)."""
EXCLUDED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".mypy_cache",
                           ".pytest_cache", ".ruff_cache", ".tox", ".venv", "venv",
                           "node_modules", ".ipynb_checkpoints"})
EXCLUDED_SUFFIXES = (".pyc", ".pyo")
_EPOCH = (1980, 1, 1, 0, 0, 0)


class CodeArchiveError(ValueError):
    """A ``working_dir`` or ``py_modules`` that cannot be shipped, or an archive that
    may not be unpacked; the message names the rule."""


def _files_under(root: Path, arc_prefix: str) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in sorted(filenames):
            if name.endswith(EXCLUDED_SUFFIXES):
                continue
            path = Path(dirpath) / name
            if not path.resolve().is_relative_to(real_root):
                continue  # a symlink out of the directory stays behind
            if not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            out.append((f"{arc_prefix}{rel}", path))
    return out


def _module_files(entry: object) -> list[tuple[str, Path]]:
    """A ``py_modules`` entry (a module, a module name, or the path of a ``.py`` file or
    a package directory) as archive members at the archive's root."""
    path: Path | None = None
    if isinstance(entry, types.ModuleType):
        file = getattr(entry, "__file__", None)
        if not isinstance(file, str):
            raise CodeArchiveError(f"py_modules: module {entry.__name__} has no file")
        path = Path(file).parent if Path(file).name == "__init__.py" else Path(file)
    elif isinstance(entry, (str, os.PathLike)):
        candidate = Path(entry)
        if candidate.exists():
            path = candidate
        elif isinstance(entry, str) and entry.isidentifier():
            try:
                spec = importlib.util.find_spec(entry)
            except (ImportError, ValueError):
                spec = None
            origin = getattr(spec, "origin", None)
            if isinstance(origin, str) and origin.endswith(".py"):
                path = Path(origin).parent if spec is not None and \
                    spec.submodule_search_locations else Path(origin)
    if path is None:
        raise CodeArchiveError(f"py_modules: {entry!r:.200} is neither an importable module "
                               "nor the path of a .py file or a package directory")
    if path.is_dir():
        if not (path / "__init__.py").is_file():
            raise CodeArchiveError(f"py_modules: {path} is a directory without __init__.py")
        return _files_under(path, f"{path.resolve().name}/")
    if path.suffix != ".py" or not path.is_file():
        raise CodeArchiveError(f"py_modules: {path} is not a .py file")
    return [(path.name, path)]


def pack(working_dir: str | os.PathLike[str] | None = None,
         py_modules: Sequence[object] | None = None) -> tuple[str, bytes]:
    """``(hash, archive)``: the files of ``working_dir`` (caches, VCS directories and
    compiled files left out) and the ``py_modules``, at the archive's root, in a zip whose
    bytes depend only on the names and contents (sorted, fixed times and modes), so an
    unchanged directory gives the same hash. Raises ``CodeArchiveError`` for a missing
    directory, an entry that is not importable, a name given twice or more than
    ``MAX_CODE_ARCHIVE_BYTES`` / ``MAX_CODE_FILES``; nothing is sent before."""
    members: list[tuple[str, Path]] = []
    if working_dir is not None:
        root = Path(working_dir)
        if not root.is_dir():
            raise CodeArchiveError(f"working_dir {str(root)!r} is not a directory")
        members.extend(_files_under(root, ""))
    if isinstance(py_modules, (str, os.PathLike, types.ModuleType)):
        raise CodeArchiveError("py_modules is a list: write py_modules=[...]")
    for entry in py_modules or ():
        members.extend(_module_files(entry))
    names: dict[str, Path] = {}
    total = 0
    for arcname, path in members:
        if arcname in names and names[arcname].resolve() != path.resolve():
            raise CodeArchiveError(f"{arcname} comes from both {names[arcname]} and {path}")
        names[arcname] = path
        if len(names) > MAX_CODE_FILES:
            raise CodeArchiveError(f"more than MAX_CODE_FILES={MAX_CODE_FILES} files to ship")
        total += path.stat().st_size
        if total > MAX_CODE_ARCHIVE_BYTES:
            raise CodeArchiveError(
                f"working_dir and py_modules hold more than MAX_CODE_ARCHIVE_BYTES="
                f"{MAX_CODE_ARCHIVE_BYTES} bytes (at {arcname}); leave data out and put it "
                "with mesh.put()")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for arcname in sorted(names):
            info = zipfile.ZipInfo(arcname, date_time=_EPOCH)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, names[arcname].read_bytes())
    data = buf.getvalue()
    return hashlib.sha256(data).hexdigest()[:40], data


def _member_parts(name: str) -> list[str]:
    if name.startswith(("/", "\\")) or "\\" in name or ":" in name.split("/")[0]:
        raise CodeArchiveError(f"archive member {name!r} has an absolute path")
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CodeArchiveError(f"archive member {name!r} leaves the archive's directory")
    return parts


def unpack(archive: bytes, dest: str | os.PathLike[str],
           max_bytes: int = MAX_CODE_ARCHIVE_BYTES) -> None:
    """Unpack a code archive into the empty directory ``dest``. Refuses (nothing written)
    an absolute member name, a ``..`` or empty part, a symlink or other non-regular
    member, more than ``MAX_CODE_FILES`` members or more than ``max_bytes`` unpacked."""
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        infos = z.infolist()
        if len(infos) > MAX_CODE_FILES:
            raise CodeArchiveError(f"archive has more than MAX_CODE_FILES={MAX_CODE_FILES} "
                                   "members")
        total = 0
        plan: list[tuple[zipfile.ZipInfo, list[str]]] = []
        for info in infos:
            parts = _member_parts(info.filename)
            mode = info.external_attr >> 16
            if info.is_dir():
                continue
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: no type said (a file)
                raise CodeArchiveError(f"archive member {info.filename!r} is not a regular "
                                       "file (a symlink?)")
            total += info.file_size
            if total > max_bytes:
                raise CodeArchiveError(f"archive unpacks to more than {max_bytes} bytes")
            plan.append((info, parts))
        root = Path(dest).resolve()
        for info, parts in plan:
            target = root.joinpath(*parts)
            if not target.resolve().is_relative_to(root):
                raise CodeArchiveError(f"archive member {info.filename!r} leaves "
                                       "the archive's directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with z.open(info) as src, open(target, "xb") as out:
                while chunk := src.read(1 << 16):
                    written += len(chunk)
                    if written > info.file_size:
                        raise CodeArchiveError(f"archive member {info.filename!r} is longer "
                                               "than it says")
                    out.write(chunk)


def cache_root() -> Path:
    """Where a worker keeps unpacked archives: under its ``HOME`` (an isolated worker's
    home is its node's work directory)."""
    home = os.environ.get("HOME") or tempfile.gettempdir()
    return Path(home) / ".cache" / "meshscale-code"


def ensure_unpacked(digest: str, archive: bytes, root: Path | None = None,
                    max_cache_bytes: int = MAX_CODE_CACHE_BYTES) -> str:
    """The directory holding archive ``digest`` unpacked, made once per hash (unpacked
    beside it, then renamed into place, so a worker never sees half an archive); its
    time is refreshed on use and the least recently used others are removed past
    ``max_cache_bytes``."""
    if not digest.isalnum():
        raise CodeArchiveError(f"bad code archive hash {digest!r}")
    root = cache_root() if root is None else root
    final = root / digest
    if final.is_dir():
        os.utime(final)
        return str(final)
    if hashlib.sha256(archive).hexdigest()[:40] != digest:
        raise CodeArchiveError(f"code archive does not hash to {digest}")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=root))
    try:
        unpack(archive, tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # not another worker's rename that won
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _evict(root, keep=digest, max_bytes=max_cache_bytes)
    return str(final)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _evict(root: Path, keep: str, max_bytes: int) -> None:
    entries: Iterable[Path] = (p for p in root.iterdir()
                               if p.is_dir() and not p.name.startswith("."))
    by_age = sorted(entries, key=lambda p: p.stat().st_mtime)
    sizes = {p.name: _tree_bytes(p) for p in by_age}
    total = sum(sizes.values())
    for p in by_age:
        if total <= max_bytes:
            break
        if p.name == keep:
            continue
        shutil.rmtree(p, ignore_errors=True)
        total -= sizes[p.name]


# -- on the worker: the shipped code, from memory and from the archive ------------------


class ShippedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the modules that travelled with a call (``client/shipping.modules_to_ship``)
    from memory; first on ``sys.meta_path`` while the call runs. ``meshscale_shipped``
    tells the worker to take it, ``code_paths`` and every module it or they loaded off
    after the task (``worker_main._forget_shipped``)."""

    meshscale_shipped = True

    def __init__(self, sources: dict[str, tuple[str, str, bool]]) -> None:
        self.sources = sources
        self.modules: dict[str, types.ModuleType] = {}
        self.code_paths: list[str] = []
        self.modules_before: set[str] | None = None
        """With a code archive, the names in ``sys.modules`` when the current call began:
        the worker then looks only at the modules that came since (and at ``modules``)
        for the call's own, instead of at every module it has
        (``worker_main._forget_shipped``). Without one it needs only ``modules``."""

    def find_spec(self, name: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        entry = self.sources.get(name)
        if entry is None:
            return None
        spec = importlib.util.spec_from_loader(name, self, origin=entry[0],
                                               is_package=entry[2])
        if spec is not None:
            spec.has_location = True
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        name = module.__spec__.name if module.__spec__ is not None else module.__name__
        filename, source, _ = self.sources[name]
        module.__file__ = filename
        self.modules[name] = module
        exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)


def shipped_call(call_bytes: bytes, sources: dict[str, tuple[str, str, bool]],
                 code: tuple[str, bytes] | None) -> Callable[..., Any]:
    """What travels instead of a call wrapper when code travels with it: the wrapper
    pickled (``call_bytes``), unpickled on the worker only once the shipped modules are
    importable (unpickling it, its arguments or an ``import`` inside it may need them).
    The modules a call imported stay with this object between its calls on one worker."""
    state: dict[str, Any] = {}

    def _meshscale_call(*args: Any, **kwargs: Any) -> Any:
        import pickle
        import sys

        finder = state.get("finder")
        if finder is None:
            finder = state["finder"] = ShippedModules(sources)
        code_dir = ""
        if code is not None:
            # The archive's modules load through the path finders, not this one: only
            # what came since this snapshot can be theirs. Without an archive every
            # module the call brings is in ``modules``, and a snapshot of the worker's
            # few hundred names would cost more than a no-op's run (issue #19).
            finder.modules_before = set(sys.modules)
            code_dir = ensure_unpacked(code[0], code[1])
            finder.code_paths = [code_dir]
            if code_dir not in sys.path:
                sys.path.insert(0, code_dir)
        if finder not in sys.meta_path:
            sys.meta_path.insert(0, finder)
        sys.modules.update(finder.modules)
        call = state.get("call")
        if call is None:
            call = state["call"] = pickle.loads(call_bytes)
        try:
            return call(*args, **kwargs)
        finally:
            if code_dir:  # what came from the archive, for this object's next call
                finder.modules.update(
                    (n, m) for n, m in list(sys.modules.items())
                    if str(getattr(m, "__file__", None) or "").startswith(code_dir + "/"))

    return _meshscale_call
