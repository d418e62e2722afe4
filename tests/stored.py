"""Copies of objects on a node's disk, read from its store directly (the outside truth,
not the mesh's report): a file under ``store/objects/``, or a small object's bytes kept in
the store's index (``obj_inline`` in ``store/meta.sqlite3``, opened read-only; see
runtime/storage.py, ``StorageConfig.inline_max_bytes``)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path


def _inline_rows(store: Path, with_data: bool) -> list[tuple[str, bytes]]:
    db_path = store / "meta.sqlite3"
    if not db_path.exists():
        return []
    cols = "id, data" if with_data else "id, x''"
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True,
                                            timeout=10)) as db:
        try:
            return [(str(i), bytes(d)) for i, d in
                    db.execute(f"SELECT {cols} FROM obj_inline ORDER BY id")]
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):  # a store from before inline objects
                return []
            raise


def copy_ids(store: Path) -> set[str]:
    """Ids of the objects whose bytes ``store`` (a node's ``data_dir / "store"``) holds."""
    files = {p.name for p in (store / "objects").rglob("b3-*")}
    return files | {i for i, _ in _inline_rows(store, with_data=False)}


def holds_copy(store: Path, oid: str) -> bool:
    """Whether ``store`` holds the bytes of ``oid`` (a file of it, or inline)."""
    return oid in copy_ids(store)


def copy_bytes(store: Path) -> list[tuple[str, bytes]]:
    """(id, bytes) of every copy ``store`` holds, files and inline, in id order."""
    out = [(p.name, p.read_bytes()) for p in (store / "objects").rglob("b3-*")]
    out += _inline_rows(store, with_data=True)
    return sorted(out)
