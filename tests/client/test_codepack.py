"""``client/codepack.py``: the archive of a ``working_dir`` and ``py_modules`` is
deterministic (same files, same hash), leaves caches and VCS directories out and refuses
bad input by name; the unpacker refuses absolute names, ``..``, symlinks and more than
it may write, writing nothing; the worker's cache unpacks once per hash and drops the
least recently used archives past its bound."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import pytest

from meshscale.client import codepack
from meshscale.client.codepack import CodeArchiveError


def tree(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("X = 1\n")
    (root / "main.py").write_text("import pkg\n")
    (root / "data.txt").write_text("some data\n")
    for junk in (".git", "__pycache__", ".mypy_cache"):
        (root / junk).mkdir()
        (root / junk / "f").write_text("junk")
    (root / "pkg" / "stale.pyc").write_bytes(b"\0")
    return root


def names(archive: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return z.namelist()


def test_the_archive_is_deterministic_and_leaves_caches_out(tmp_path: Path) -> None:
    root = tree(tmp_path / "a")
    h1, a1 = codepack.pack(root)
    assert names(a1) == ["data.txt", "main.py", "pkg/__init__.py"]
    os.utime(root / "main.py", (1, 1))  # times do not count
    assert codepack.pack(root) == (h1, a1)
    other = tree(tmp_path / "b")  # the same files elsewhere: the same hash
    assert codepack.pack(other)[0] == h1
    (root / "main.py").write_text("import pkg  # changed\n")
    assert codepack.pack(root)[0] != h1


def test_py_modules_take_files_packages_and_names(tmp_path: Path) -> None:
    root = tree(tmp_path / "a")
    single = tmp_path / "single.py"
    single.write_text("Y = 2\n")
    _, archive = codepack.pack(None, [str(single), root / "pkg", codepack])
    assert names(archive) == ["codepack.py", "pkg/__init__.py", "single.py"]
    with pytest.raises(CodeArchiveError, match="neither an importable module"):
        codepack.pack(None, ["no_such_module_anywhere"])
    with pytest.raises(CodeArchiveError, match=r"without __init__\.py"):
        codepack.pack(None, [tmp_path])
    with pytest.raises(CodeArchiveError, match="is a list"):
        codepack.pack(None, str(single))  # type: ignore[arg-type]
    with pytest.raises(CodeArchiveError, match="is not a directory"):
        codepack.pack(tmp_path / "missing")
    clash = tmp_path / "c"
    clash.mkdir()
    (clash / "single.py").write_text("other\n")
    with pytest.raises(CodeArchiveError, match="comes from both"):
        codepack.pack(clash, [str(single)])


def test_too_much_is_refused_naming_the_limit(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = tree(tmp_path / "a")
    monkeypatch.setattr(codepack, "MAX_CODE_ARCHIVE_BYTES", 10)
    with pytest.raises(CodeArchiveError, match="MAX_CODE_ARCHIVE_BYTES=10"):
        codepack.pack(root)


def evil(name: str, mode: int = stat.S_IFREG | 0o644, data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("fine.py", b"ok")
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        z.writestr(info, data)
    return buf.getvalue()


@pytest.mark.parametrize("name,rule", [
    ("../escape.py", "leaves the archive"),
    ("a/../../escape.py", "leaves the archive"),
    ("/etc/evil.py", "absolute path"),
    ("C:/evil.py", "absolute path"),
    ("a\\..\\evil.py", "absolute path"),
    ("a//b.py", "leaves the archive"),
])
def test_the_unpacker_refuses_paths_out_of_its_directory(tmp_path: Path, name: str,
                                                         rule: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(CodeArchiveError, match=rule):
        codepack.unpack(evil(name), dest)
    assert list(dest.iterdir()) == []  # nothing written
    assert not (tmp_path / "escape.py").exists()


def test_the_unpacker_refuses_symlinks_and_bombs(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(CodeArchiveError, match="not a regular file"):
        codepack.unpack(evil("link", stat.S_IFLNK | 0o777, b"/etc/passwd"), dest)
    with pytest.raises(CodeArchiveError, match="more than 100 bytes"):
        codepack.unpack(evil("big.bin", data=b"\0" * 1000), dest, max_bytes=100)
    assert list(dest.iterdir()) == []
    # a symlink planted in the destination is not followed out of it
    (dest / "sub").symlink_to(tmp_path)
    bad = io.BytesIO()
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("sub/planted.py", b"x")
    with pytest.raises(CodeArchiveError, match="leaves"):
        codepack.unpack(bad.getvalue(), dest)
    assert not (tmp_path / "planted.py").exists()


def test_the_cache_unpacks_once_per_hash_and_evicts_the_oldest(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    archives = []
    for i in range(3):
        src = tmp_path / f"p{i}"
        src.mkdir()
        (src / "m.py").write_text(f"N = {i}\n" + "#" * 1000)
        archives.append(codepack.pack(src))
    d0 = codepack.ensure_unpacked(*archives[0], root=cache, max_cache_bytes=2500)
    assert (Path(d0) / "m.py").read_text().startswith("N = 0")
    (Path(d0) / "marker").write_text("")  # a second call does not unpack again
    assert codepack.ensure_unpacked(*archives[0], root=cache) == d0
    assert (Path(d0) / "marker").exists()
    os.utime(d0, (1, 1))  # the least recently used
    codepack.ensure_unpacked(*archives[1], root=cache, max_cache_bytes=2500)
    codepack.ensure_unpacked(*archives[2], root=cache, max_cache_bytes=2500)
    assert sorted(p.name for p in cache.iterdir()) == sorted(h for h, _ in archives[1:])
    with pytest.raises(CodeArchiveError, match="does not hash"):
        codepack.ensure_unpacked(archives[1][0][:-1] + "0", archives[1][1], root=cache)
