from __future__ import annotations

import errno
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshscale.runtime import storage
from meshscale.runtime.storage import (
    MAX_KV_KEY_BYTES,
    MAX_KV_VALUE_BYTES,
    LocalStore,
    ObjectMeta,
    StorageConfig,
    StorageError,
    object_id_of,
)

NOW = 1_700_000_000.0
NO_FREE_LIMIT = StorageConfig(min_free_bytes=0, inline_max_bytes=0)
"""The tests below that do not say otherwise are of objects kept as files (their small
test objects would be kept inline by default: see the inline tests at the end)."""


def open_store(path: Path, **kw: object) -> LocalStore:
    cfg = StorageConfig(**{"min_free_bytes": 0, "inline_max_bytes": 0, **kw})  # type: ignore[arg-type]
    return LocalStore(path, cfg)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def object_files(store: LocalStore) -> list[Path]:
    return files_under(store.objects_dir)


def assert_nothing_left(store: LocalStore) -> None:
    assert store.stats()["objects"] == 0
    assert store.stats()["writes_in_flight"] == 0
    assert store.stats()["bytes_in_flight"] == 0
    assert list(store.ids()) == []
    assert object_files(store) == []
    assert files_under(store.tmp_dir) == []


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    s = open_store(tmp_path / "data")
    yield s
    s.close()


# -- objects ------------------------------------------------------------------------------


def test_object_id_is_prefixed_blake3_256() -> None:
    oid = object_id_of(b"hello")
    # BLAKE3's published test value for b"hello" (an independent check of the rule)
    assert oid == "b3-ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"
    assert oid == object_id_of(b"hello") != object_id_of(b"hellp")


def test_small_round_trip(store: LocalStore) -> None:
    meta = store.put_bytes(
        b"hello", now=NOW, replicas=2, data_class="pii", residency=["eu-west", "eu-central"]
    )
    assert meta == ObjectMeta(
        object_id=object_id_of(b"hello"),
        size=5,
        replicas=2,
        data_class="pii",
        residency=("eu-west", "eu-central"),
        hint_for=None,
        created=NOW,
        pinned=True,
        expires=None,
    )
    assert store.has(meta.object_id)
    assert store.meta(meta.object_id) == meta
    assert store.read_bytes(meta.object_id) == b"hello"
    with store.open_read(meta.object_id) as f:
        assert f.read() == b"hello"
    assert store.verify(meta.object_id)
    assert store.stats()["objects"] == 1 and store.stats()["bytes"] == 5
    assert files_under(store.tmp_dir) == []


def test_empty_object(store: LocalStore) -> None:
    meta = store.put_bytes(b"", now=NOW)
    assert meta.size == 0
    assert store.read_bytes(meta.object_id) == b""
    assert store.verify(meta.object_id)


def test_multi_chunk_streaming_write_and_read(tmp_path: Path) -> None:
    store = open_store(tmp_path, chunk_bytes=256 * 1024)
    chunk = 64 * 1024
    blocks = [os.urandom(chunk) for _ in range(80)]  # 5 MiB
    expected = object_id_of(b"".join(blocks))
    with store.writer(now=NOW) as w:
        for i, b in enumerate(blocks):
            w.write(b)
            assert w.written == (i + 1) * chunk
            assert not store.has(expected)  # invisible until commit
        meta = w.commit(expected)
    assert meta.object_id == expected and meta.size == 80 * chunk
    chunks = list(store.read_chunks(expected))
    assert all(len(c) <= 256 * 1024 for c in chunks) and len(chunks) == 20
    assert b"".join(chunks) == b"".join(blocks)
    assert store.verify(expected)
    path = store.object_path(expected)
    assert path.parent.parent.parent == store.objects_dir
    assert path.parent.name == expected[5:7] and path.parent.parent.name == expected[3:5]
    store.close()


def test_same_object_twice_is_stored_once_and_metadata_merges(store: LocalStore) -> None:
    a = store.put_bytes(b"x" * 10, now=NOW, replicas=2, pinned=False, ttl_s=10, hint_for="n2")
    b = store.put_bytes(b"x" * 10, now=NOW + 5, replicas=3, pinned=False, ttl_s=10)
    assert a.object_id == b.object_id
    assert b.replicas == 3 and b.hint_for is None and b.expires == NOW + 15
    assert b.created == NOW
    assert store.stats()["objects"] == 1 and store.stats()["bytes"] == 10
    assert len(object_files(store)) == 1


def test_expected_id_mismatch_leaves_nothing(store: LocalStore) -> None:
    wrong = object_id_of(b"something else")
    with pytest.raises(StorageError) as ei, store.writer(now=NOW) as w:
        w.write(b"a" * 1000)
        w.commit(wrong)
    assert ei.value.reason == "hash_mismatch"
    assert wrong in str(ei.value)
    assert not store.has(wrong) and not store.has(object_id_of(b"a" * 1000))
    assert_nothing_left(store)
    with pytest.raises(StorageError) as ei:
        store.put_bytes(b"abc", now=NOW, expected_id=wrong)
    assert ei.value.reason == "hash_mismatch"
    assert_nothing_left(store)


def test_declared_size_shortfall_and_excess(store: LocalStore) -> None:
    with pytest.raises(StorageError) as ei, store.writer(now=NOW, size=10) as w:
        w.write(b"12345")
        w.commit()
    assert ei.value.reason == "hash_mismatch"
    with pytest.raises(StorageError) as ei, store.writer(now=NOW, size=4) as w:
        w.write(b"12345")
    assert ei.value.reason == "too_large"
    assert_nothing_left(store)


def test_abort_and_exception_leave_nothing(store: LocalStore) -> None:
    w = store.writer(now=NOW)
    w.write(b"partial")
    assert len(files_under(store.tmp_dir)) == 1
    w.abort()
    w.abort()  # idempotent
    assert w.closed
    with pytest.raises(ValueError):
        w.write(b"more")
    assert_nothing_left(store)

    with pytest.raises(RuntimeError), store.writer(now=NOW) as w2:
        w2.write(b"partial")
        raise RuntimeError("boom")
    assert_nothing_left(store)

    with store.writer(now=NOW) as w3:  # left without commit
        w3.write(b"partial")
    assert_nothing_left(store)


def test_restart_serves_committed_objects(tmp_path: Path) -> None:
    s1 = open_store(tmp_path)
    metas = [
        s1.put_bytes(os.urandom(n), now=NOW, hint_for="n9" if n == 3 else None)
        for n in (1, 3, 70_000)
    ]
    s1.kv_put("dataset/latest", metas[0].object_id.encode(), "0001")
    s1.close()
    s2 = open_store(tmp_path)
    for m in metas:
        assert s2.meta(m.object_id) == m
        assert s2.verify(m.object_id)
    assert s2.stats()["objects"] == 3 and s2.stats()["hinted"] == 1
    assert s2.stats()["bytes"] == sum(m.size for m in metas)
    assert s2.kv_get("dataset/latest") == (metas[0].object_id.encode(), "0001")
    s2.close()


def test_second_store_on_same_dir_is_refused(store: LocalStore) -> None:
    with pytest.raises(StorageError) as ei:
        LocalStore(store.data_dir, NO_FREE_LIMIT)
    assert ei.value.reason == "busy"


def test_tmp_leftovers_are_removed_on_open_and_never_visible(tmp_path: Path) -> None:
    s1 = open_store(tmp_path)
    s1.close()
    data = b"half an object"
    (tmp_path / "tmp" / "deadbeef.part").write_bytes(data)
    s2 = open_store(tmp_path)
    assert files_under(s2.tmp_dir) == []
    assert not s2.has(object_id_of(data))
    assert s2.stats()["objects"] == 0
    s2.close()


def test_crash_mid_write_in_a_real_process(tmp_path: Path) -> None:
    # The child writes half an object and one whole one, then dies without closing.
    script = f"""
import os, signal
from pathlib import Path
from meshscale.runtime.storage import LocalStore, StorageConfig
s = LocalStore(Path({str(tmp_path)!r}), StorageConfig(min_free_bytes=0))
s.put_bytes(b"whole", now=1.0)
w = s.writer(now=1.0)
w.write(b"x" * 100_000)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert files_under(tmp_path / "tmp") != []  # the crash left a temp file behind
    s = open_store(tmp_path)
    assert files_under(s.tmp_dir) == []
    assert list(s.ids()) == [object_id_of(b"whole")]
    assert s.read_bytes(object_id_of(b"whole")) == b"whole"
    assert not s.has(object_id_of(b"x" * 100_000))
    s.close()


def test_orphan_file_from_crash_before_index_is_invisible_and_swept(store: LocalStore) -> None:
    data = b"renamed but never indexed"
    oid = object_id_of(data)
    path = store.object_path(oid)
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    assert not store.has(oid)
    with pytest.raises(StorageError) as ei:
        store.open_read(oid)
    assert ei.value.reason == "not_found"
    kept = store.put_bytes(b"kept", now=NOW)
    assert store.sweep_orphans() == {"orphan_files": 1, "missing_files": 0}
    assert not path.exists()
    assert store.read_bytes(kept.object_id) == b"kept"
    # And a later put of the same bytes stores them properly.
    assert store.put_bytes(data, now=NOW).object_id == oid
    assert store.read_bytes(oid) == data


def test_corruption_is_detected_and_quarantined(store: LocalStore) -> None:
    data = os.urandom(300_000)
    oid = store.put_bytes(data, now=NOW).object_id
    path = store.object_path(oid)
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.seek(123_456)
        b = f.read(1)
        f.seek(123_456)
        f.write(bytes([b[0] ^ 0x01]))
    assert not store.verify(oid)
    with pytest.raises(StorageError) as ei:
        for _ in store.read_chunks(oid):
            pass
    assert ei.value.reason == "corrupt"
    assert len(b"".join(store.read_chunks(oid, verify=False))) == len(data)
    store.quarantine(oid)
    assert not store.has(oid) and not path.exists()
    assert store.stats()["quarantined"] == 1 and store.stats()["bytes"] == 0
    with pytest.raises(StorageError) as ei:
        store.verify(oid)
    assert ei.value.reason == "not_found"
    # Repair: a good copy can be stored again.
    store.put_bytes(data, now=NOW, expected_id=oid)
    assert store.verify(oid)


def test_truncated_or_missing_file_is_corrupt(store: LocalStore) -> None:
    oid = store.put_bytes(b"0123456789", now=NOW).object_id
    path = store.object_path(oid)
    os.chmod(path, 0o600)
    path.write_bytes(b"01234")
    assert not store.verify(oid)
    path.write_bytes(b"0123456789!")
    assert not store.verify(oid)
    path.unlink()
    assert not store.verify(oid)
    with pytest.raises(StorageError) as ei:
        store.open_read(oid)
    assert ei.value.reason == "corrupt"
    assert store.sweep_orphans() == {"orphan_files": 0, "missing_files": 1}
    assert not store.has(oid)


def test_delete(store: LocalStore) -> None:
    oid = store.put_bytes(b"bye", now=NOW).object_id
    store.delete(oid)
    assert not store.has(oid) and object_files(store) == []
    assert store.stats()["bytes"] == 0
    with pytest.raises(StorageError) as ei:
        store.delete(oid)
    assert ei.value.reason == "not_found"
    with pytest.raises(StorageError) as ei:
        list(store.read_chunks(oid))
    assert ei.value.reason == "not_found"


def test_delete_many_removes_in_one_transaction_and_survives_reopen(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    keep = store.put_bytes(b"keep", now=NOW).object_id
    gone = [store.put_bytes(bytes([i]) * (i + 1), now=NOW).object_id for i in range(5)]
    never = object_id_of(b"never stored")
    assert store.delete_many([*gone, never, gone[0]]) == gone  # unknown and repeated ids skipped
    assert not any(store.has(o) for o in gone) and store.has(keep)
    assert [p.name for p in object_files(store)] == [keep]
    assert store.stats()["bytes"] == 4 and store.stats()["objects"] == 1
    assert store.delete_many([]) == []
    with pytest.raises(StorageError):
        store.delete_many(["../etc/passwd"])
    assert store.has(keep)
    store.close()
    store = open_store(tmp_path)
    assert store.has(keep) and not any(store.has(o) for o in gone)
    store.close()


def test_writeback_is_started_every_writeback_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    real = storage._start_writeback
    assert real is not None or not sys.platform.startswith("linux")

    def record(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        if real is not None:
            real(fd, offset, length)  # the real call, on a real file

    monkeypatch.setattr(storage, "_start_writeback", record)
    store = open_store(tmp_path / "a", writeback_bytes=4 << 20)
    data = os.urandom(10 << 20)
    with store.writer(now=NOW) as w:
        for i in range(0, len(data), 1 << 20):
            w.write(data[i : i + (1 << 20)])
        meta = w.commit(object_id_of(data))
    assert calls == [(0, 4 << 20), (4 << 20, 4 << 20)]  # the 2 MB tail is left to fsync
    assert store.read_bytes(meta.object_id) == data
    calls.clear()
    # A copy kept in case (hashed at commit, most often aborted) is not pushed to disk
    # early; if it is committed after all, it is still whole and checked.
    spare = os.urandom(9 << 20)
    for commit in (False, True):
        w = store.writer(now=NOW, size=len(spare))
        w.defer_hash()
        for i in range(0, len(spare), 1 << 20):
            w.write(spare[i : i + (1 << 20)])
        if commit:
            assert w.commit(object_id_of(spare)).object_id == object_id_of(spare)
        else:
            w.abort()
    assert calls == []
    assert store.read_bytes(object_id_of(spare)) == spare
    store.close()
    calls.clear()
    off = open_store(tmp_path / "b", writeback_bytes=0)
    off.put_bytes(data, now=NOW)
    assert calls == []
    off.close()
    with pytest.raises(ValueError, match="writeback_bytes"):
        StorageConfig(writeback_bytes=-1)


def test_a_linked_copy_outlives_a_delete_and_is_released(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    oid = store.put_bytes(b"for a task", now=NOW).object_id
    link = store.link_copy(oid)
    assert link.parent == store.links_dir and link.read_bytes() == b"for a task"
    store.delete(oid)
    assert not store.has(oid) and link.read_bytes() == b"for a task"
    store.release_copy(link)
    store.release_copy(link)  # idempotent
    assert not link.exists()
    with pytest.raises(ValueError, match="link_copy"):
        store.release_copy(tmp_path / "meta.sqlite3")
    with pytest.raises(StorageError) as ei:
        store.link_copy(oid)
    assert ei.value.reason == "not_found"
    other = store.put_bytes(b"left behind", now=NOW).object_id
    leftover = store.link_copy(other)
    store.close()
    store = open_store(tmp_path)  # a crash left a link: gone once the store opens again
    assert not leftover.exists() and store.read_bytes(other) == b"left behind"
    store.close()


def test_with_a_link_group_only_links_are_reachable(tmp_path: Path) -> None:
    # Task workers running as another user may open the link they are given, by name,
    # and nothing else of the store (runtime/isolation.py).
    group = os.getgid() + 1 if os.geteuid() == 0 else os.getgid()
    store = LocalStore(tmp_path / "s", StorageConfig(min_free_bytes=0, link_group=group))
    oid = store.put_bytes(b"input", now=NOW).object_id
    link = store.link_copy(oid)
    st = link.stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (group, 0o440)
    assert stat.S_IMODE(store.data_dir.stat().st_mode) == 0o711
    assert stat.S_IMODE(store.links_dir.stat().st_mode) == 0o711
    for entry in store.data_dir.iterdir():
        if entry.name != "links":
            assert not entry.stat().st_mode & 0o077, entry
    store.release_copy(link)
    store.close()


def test_reader_of_deleted_object_keeps_its_bytes(store: LocalStore) -> None:
    oid = store.put_bytes(b"still here", now=NOW).object_id
    with store.open_read(oid) as f:
        store.delete(oid)
        assert f.read() == b"still here"


# -- bounds ---------------------------------------------------------------------------------


def test_quota_is_refused_naming_the_bound(tmp_path: Path) -> None:
    store = open_store(tmp_path, max_total_bytes=1000)
    store.put_bytes(b"a" * 600, now=NOW)
    with pytest.raises(StorageError) as ei:
        store.put_bytes(b"b" * 500, now=NOW)  # size declared: refused up front
    assert ei.value.reason == "quota" and "max_total_bytes=1000" in str(ei.value)
    with pytest.raises(StorageError) as ei, store.writer(now=NOW) as w:  # streamed
        for _ in range(10):
            w.write(b"c" * 100)
    assert ei.value.reason == "quota" and "max_total_bytes=1000" in str(ei.value)
    assert w.closed
    assert files_under(store.tmp_dir) == []
    assert store.stats()["objects"] == 1 and store.stats()["bytes_in_flight"] == 0
    # Concurrent writers share the quota.
    w1 = store.writer(now=NOW, size=300)
    with pytest.raises(StorageError) as ei:
        store.writer(now=NOW, size=300)
    assert ei.value.reason == "quota"
    w1.write(b"d" * 300)
    w1.commit()
    store.delete(object_id_of(b"a" * 600))
    store.put_bytes(b"e" * 700, now=NOW)  # room again after the delete
    store.close()


def test_object_size_bound(tmp_path: Path) -> None:
    store = open_store(tmp_path, max_object_bytes=100)
    with pytest.raises(StorageError) as ei:
        store.writer(now=NOW, size=101)
    assert ei.value.reason == "too_large" and "max_object_bytes=100" in str(ei.value)
    with pytest.raises(StorageError) as ei, store.writer(now=NOW) as w:
        w.write(b"x" * 60)
        w.write(b"x" * 60)
    assert ei.value.reason == "too_large"
    assert_nothing_left(store)
    store.put_bytes(b"x" * 100, now=NOW)
    store.close()


def test_disk_full_when_free_space_below_minimum(tmp_path: Path) -> None:
    st_ = os.statvfs(tmp_path)
    free = st_.f_bavail * st_.f_frsize
    store = LocalStore(tmp_path / "data", StorageConfig(min_free_bytes=free + 10**15))
    with pytest.raises(StorageError) as ei:
        store.put_bytes(b"x", now=NOW)
    assert ei.value.reason == "disk_full" and "min_free_bytes" in str(ei.value)
    with pytest.raises(StorageError) as ei:
        store.writer(now=NOW)
    assert ei.value.reason == "disk_full"
    assert_nothing_left(store)
    store.close()


def test_disk_full_during_write(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    free = [10 * 1024 * 1024]
    monkeypatch.setattr(store, "_free_bytes", lambda: free[0])
    with pytest.raises(StorageError) as ei, store.writer(now=NOW) as w:
        for _ in range(100):
            w.write(b"x" * (1024 * 1024))  # chunk_bytes: every write re-checks
            free[0] -= 1024 * 1024
    assert ei.value.reason == "disk_full"
    assert 5 <= w.written // (1024 * 1024) <= 10
    assert_nothing_left(store)


def test_a_write_refused_for_want_of_room_is_reported_once(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Free space above the reserve by less than a write refuses it; the data plane's disk
    check takes the refusal (``take_refused_bytes``) and advertises the node full
    (``placement.disk_full``), or the node keeps advertising room it cannot give."""
    store = open_store(tmp_path / "data", min_free_bytes=1000)
    monkeypatch.setattr(store, "_free_bytes", lambda: 1004)
    assert store.take_refused_bytes() == 0
    with pytest.raises(StorageError) as ei:
        store.put_bytes(b"z" * 20, now=NOW)
    assert ei.value.reason == "disk_full"
    assert store.take_refused_bytes() == 20
    assert store.take_refused_bytes() == 0  # taken once
    store.close()


def test_enospc_aborts_cleanly(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real = storage._write_all
    calls = [0]

    def failing(fd: int, data: memoryview) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(storage, "_write_all", failing)
    with pytest.raises(StorageError) as ei, store.writer(now=NOW) as w:
        for _ in range(5):
            w.write(b"y" * 1000)
    assert ei.value.reason == "disk_full" and "No space left" in str(ei.value)
    assert_nothing_left(store)


def test_bounded_concurrent_writers(tmp_path: Path) -> None:
    store = open_store(tmp_path, max_concurrent_writes=2)
    w1, w2 = store.writer(now=NOW), store.writer(now=NOW)
    with pytest.raises(StorageError) as ei:
        store.writer(now=NOW)
    assert ei.value.reason == "busy" and "max_concurrent_writes=2" in str(ei.value)
    w1.abort()
    w3 = store.writer(now=NOW)
    w2.write(b"2")
    w2.commit()
    w3.abort()
    assert store.stats()["writes_in_flight"] == 0
    store.close()


def test_close_aborts_writes_in_flight(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    w = store.writer(now=NOW)
    w.write(b"zz")
    store.close()
    assert w.closed
    assert files_under(tmp_path / "tmp") == []
    with pytest.raises(ValueError):
        store.has(object_id_of(b"zz"))


def test_concurrent_threads(store: LocalStore) -> None:
    datas = [os.urandom(5000 + i) for i in range(32)]
    errors: list[BaseException] = []

    def put(d: bytes) -> None:
        try:
            m = store.put_bytes(d, now=NOW)
            assert store.read_bytes(m.object_id) == d
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=put, args=(d,)) for d in datas * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert sorted(store.ids()) == sorted(object_id_of(d) for d in datas)
    assert store.stats()["bytes"] == sum(len(d) for d in datas)
    assert store.stats()["bytes_in_flight"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "b3-",
        "../../etc/passwd",
        "b3-" + "0" * 63,
        "b3-" + "0" * 65,
        "b3-" + "A" * 64,
        "b3-" + "0" * 62 + "/x",
        "b3-../" + "0" * 61,
        "sha-" + "0" * 64,
        "b3-" + "0" * 64 + "\n",
    ],
)
def test_bad_ids_are_rejected(store: LocalStore, bad: str) -> None:
    for call in (
        store.has,
        store.meta,
        store.open_read,
        store.verify,
        store.delete,
        store.quarantine,
        store.object_path,
        lambda oid: list(store.read_chunks(oid)),
        lambda oid: store.set_hint(oid, "n1"),
    ):
        with pytest.raises(StorageError) as ei:
            call(bad)
        assert ei.value.reason == "bad_id"
    with pytest.raises(StorageError) as ei:
        store.put_bytes(b"x", now=NOW, expected_id=bad)
    assert ei.value.reason == "bad_id"
    assert_nothing_left(store)


# -- listing, hints, TTL ------------------------------------------------------------------


def test_list_is_paged_by_id(store: LocalStore) -> None:
    ids = sorted(store.put_bytes(bytes([i]), now=NOW).object_id for i in range(25))
    pages: list[str] = []
    after = ""
    while True:
        page = store.list(after=after, limit=10)
        if not page:
            break
        pages.extend(m.object_id for m in page)
        after = page[-1].object_id
    assert pages == ids == list(store.ids())
    assert store.list(limit=0) == []


def test_hints(store: LocalStore) -> None:
    mine = store.put_bytes(b"mine", now=NOW).object_id
    theirs = store.put_bytes(b"theirs", now=NOW, hint_for="node-7").object_id
    assert [m.object_id for m in store.hinted()] == [theirs]
    assert store.stats()["hinted"] == 1
    store.set_hint(mine, "node-8")
    store.set_hint(theirs, None)
    assert store.meta(mine).hint_for == "node-8"  # type: ignore[union-attr]
    assert store.meta(theirs).hint_for is None  # type: ignore[union-attr]
    with pytest.raises(StorageError) as ei:
        store.set_hint(object_id_of(b"absent"), None)
    assert ei.value.reason == "not_found"


def test_ttl_and_expired(store: LocalStore) -> None:
    short = store.put_bytes(b"short", now=NOW, pinned=False, ttl_s=10).object_id
    long = store.put_bytes(b"long", now=NOW, pinned=False, ttl_s=100).object_id
    pinned = store.put_bytes(b"pinned", now=NOW, pinned=True, ttl_s=1).object_id
    store.put_bytes(b"forever", now=NOW, pinned=False)
    assert store.meta(short).expires == NOW + 10  # type: ignore[union-attr]
    assert store.expired(NOW + 5) == []
    assert store.expired(NOW + 10) == [short]
    assert store.expired(NOW + 1000) == [short, long]
    assert pinned not in store.expired(NOW + 1000)
    store.set_pinned(pinned, False, expires=NOW + 50)
    assert store.expired(NOW + 1000) == [short, pinned, long]
    store.set_pinned(short, True)
    assert store.expired(NOW + 1000) == [pinned, long]


# -- KV ------------------------------------------------------------------------------------


def test_kv_last_writer_wins(store: LocalStore) -> None:
    assert store.kv_get("k") is None
    assert store.kv_put("k", b"v2", "0002")
    assert not store.kv_put("k", b"v1", "0001")  # older: ignored
    assert not store.kv_put("k", b"same-ts", "0002")  # equal: ignored
    assert store.kv_get("k") == (b"v2", "0002")
    assert store.kv_put("k", None, "0003")  # newer tombstone wins
    assert store.kv_get("k") == (None, "0003")
    assert not store.kv_put("k", b"late", "0002")  # older write cannot resurrect it
    assert store.kv_get("k") == (None, "0003")
    assert store.kv_put("k", b"v4", "0004")
    assert store.kv_get("k") == (b"v4", "0004")
    assert store.kv_put("dead", None, "0001")  # tombstone for a key never seen
    assert store.kv_get("dead") == (None, "0001")
    assert store.stats()["kv_keys"] == 2 and store.stats()["kv_tombstones"] == 1


def test_kv_hints_are_stored_with_the_write_and_kept_newest(tmp_path: Path) -> None:
    store = open_store(tmp_path / "data")
    assert store.kv_put("k", b"v2", "0002", ["a", "b"], 10.0)
    # An older write is not applied, but its hints are still kept (the newer record
    # covers them): the larger ts and the smaller since win.
    assert not store.kv_put("k", b"v1", "0001", ["a"], 5.0)
    assert store.kv_hints() == [("k", "a", "0002", 5.0), ("k", "b", "0002", 10.0)]
    store.kv_hints_apply(stored=[("k", "a", "0003", 20.0)],
                         deleted=[("k", "b", "0002"), ("k", "a", "0002")])
    # The delete up to 0002 leaves a's newer hint (0003) alone.
    assert store.kv_hints() == [("k", "a", "0003", 5.0)]
    store.close()
    store = open_store(tmp_path / "data")  # durable
    assert store.kv_hints() == [("k", "a", "0003", 5.0)]
    store.kv_hints_apply(deleted=[("k", "a", "0003")])
    assert store.kv_hints() == []
    store.close()


def test_kv_put_many_is_kv_put_of_each_row_in_one_transaction(tmp_path: Path) -> None:
    store = open_store(tmp_path / "data")
    assert store.kv_put("old", b"v2", "0002")
    assert store.kv_put_many([("a", b"1", "0001", ()), ("old", b"v1", "0001", ()),
                              ("b", None, "0003", ["n2"]), ("a", b"2", "0004", ())],
                             since=7.0) == [True, False, True, True]
    assert store.kv_get("a") == (b"2", "0004")  # a key twice: the later row, as in turn
    assert store.kv_get("old") == (b"v2", "0002")  # last writer wins per row
    assert store.kv_get("b") == (None, "0003")
    assert store.kv_hints() == [("b", "n2", "0003", 7.0)]
    # A row that fails its checks writes nothing of the batch.
    with pytest.raises(StorageError):
        store.kv_put_many([("c", b"x", "0005", ()),
                           ("d", b"x" * (MAX_KV_VALUE_BYTES + 1), "0005", ())])
    assert store.kv_get("c") is None
    store.close()
    store = open_store(tmp_path / "data")  # durable
    assert store.kv_get("a") == (b"2", "0004")
    store.close()


def test_kv_with_hlc_timestamps(store: LocalStore) -> None:
    from meshscale.core.hlc import HLCTimestamp

    early = HLCTimestamp(wall_ns=10**18, logical=5, node="b").encode()
    late = HLCTimestamp(wall_ns=10**18, logical=5, node="c").encode()
    later = HLCTimestamp(wall_ns=10**18 + 1, logical=0, node="a").encode()
    assert store.kv_put("k", b"c", late)
    assert not store.kv_put("k", b"b", early)
    assert store.kv_put("k", b"a", later)
    assert store.kv_get("k") == (b"a", later)


def test_kv_scan_by_prefix(store: LocalStore) -> None:
    for k in ["a", "task/1", "task/2", "task/10", "task0", "tas", "task/\U0010ffff", "u"]:
        store.kv_put(k, k.encode(), "01")
    store.kv_put("task/2", None, "02")
    got = store.kv_scan("task/")
    assert [k for k, _, _ in got] == ["task/1", "task/10", "task/2", "task/\U0010ffff"]
    assert got[2] == ("task/2", None, "02")
    assert [k for k, _, _ in store.kv_scan("task/", limit=2)] == ["task/1", "task/10"]
    assert [k for k, _, _ in store.kv_scan("task/", after="task/10")] == [
        "task/2",
        "task/\U0010ffff",
    ]
    assert len(store.kv_scan()) == 8
    assert store.kv_purge_tombstones("03") == 1
    assert store.kv_get("task/2") is None


def test_kv_bounds(store: LocalStore) -> None:
    with pytest.raises(StorageError) as ei:
        store.kv_put("k" * (MAX_KV_KEY_BYTES + 1), b"", "1")
    assert ei.value.reason == "too_large"
    with pytest.raises(StorageError) as ei:
        store.kv_put("k", b"x" * (MAX_KV_VALUE_BYTES + 1), "1")
    assert ei.value.reason == "too_large"
    assert store.kv_put("k" * MAX_KV_KEY_BYTES, b"x" * MAX_KV_VALUE_BYTES, "1")
    with pytest.raises(ValueError):
        store.kv_put("k", b"", "")


# -- properties ------------------------------------------------------------------------------


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=5000), chunk=st.integers(min_value=1, max_value=700))
def test_round_trip_property(store: LocalStore, data: bytes, chunk: int) -> None:
    with store.writer(now=NOW) as w:
        for i in range(0, len(data), chunk):
            w.write(data[i : i + chunk])
        meta = w.commit()
    assert meta.object_id == object_id_of(data) and meta.size == len(data)
    assert store.read_bytes(meta.object_id) == data
    assert b"".join(store.read_chunks(meta.object_id, chunk_bytes=chunk)) == data


_keys = st.text(alphabet=st.sampled_from("ab/\x00é\U0010ffff"), max_size=4)


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(_keys, st.none() | st.binary(max_size=4), st.integers(0, 20)), max_size=30
    ),
    prefix=_keys,
)
def test_kv_matches_a_dict_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, bytes | None, int]], prefix: str
) -> None:
    store = open_store(tmp_path_factory.mktemp("kv"))
    model: dict[str, tuple[bytes | None, str]] = {}
    for key, value, t in ops:
        ts = f"{t:04d}"
        applies = key not in model or ts > model[key][1]
        assert store.kv_put(key, value, ts) == applies
        if applies:
            model[key] = (value, ts)
    for key, (value, ts) in model.items():
        assert store.kv_get(key) == (value, ts)
    expected = sorted((k, v, t) for k, (v, t) in model.items() if k.startswith(prefix))
    assert store.kv_scan(prefix) == expected
    store.close()


def test_written_stamp_merges_to_the_latest(store: LocalStore) -> None:
    m1 = store.put_bytes(b"stamped", now=NOW, written="0000000000000001-00000000-a")
    assert m1.written == "0000000000000001-00000000-a"
    m2 = store.put_bytes(b"stamped", now=NOW, written="0000000000000002-00000000-b")
    assert m2.written == "0000000000000002-00000000-b"
    store.put_bytes(b"stamped", now=NOW, written="0000000000000001-00000005-c")
    assert store.meta(m1.object_id).written == "0000000000000002-00000000-b"  # type: ignore[union-attr]
    assert store.put_bytes(b"unstamped", now=NOW).written is None


def test_object_tombstones_survive_a_restart(tmp_path: Path) -> None:
    oid = object_id_of(b"gone")
    with open_store(tmp_path) as s:
        s.tombstone_put(oid, "0000000000000005-00000000-a", replicas=3, data_class="pii",
                        residency=["eu-west"])
        s.tombstone_put(oid, "0000000000000004-00000000-b", replicas=1, data_class=None,
                        residency=None)  # older: ignored
    with open_store(tmp_path) as s:
        assert s.tombstones() == [
            (oid, "0000000000000005-00000000-a", 3, "pii", ("eu-west",), False)]
        s.tombstone_drop(oid)
        s.tombstone_drop(oid)
        assert s.tombstones() == []
        with pytest.raises(StorageError):
            s.tombstone_put("nope", "x", replicas=3, data_class=None, residency=None)


def test_a_tombstone_rule_rewritten_at_the_same_timestamp_survives_a_restart(
    tmp_path: Path,
) -> None:
    # A class policy migration rewrites a kept tombstone's rule, not its timestamp
    # (ReplicaManager.migrate_tombstones): the new rule must be the one kept on disk, or
    # a restart brings the tombstone back under the old rule, in the old replica set.
    oid = object_id_of(b"moved")
    ts = "0000000000000005-00000000-a"
    with open_store(tmp_path) as s:
        s.tombstone_put(oid, ts, replicas=3, data_class="pii", residency=["ap-south"])
        s.tombstone_put(oid, ts, replicas=3, data_class="pii", residency=["eu-west"],
                        moved=True)
    with open_store(tmp_path) as s:
        assert s.tombstones() == [(oid, ts, 3, "pii", ("eu-west",), True)]
        # A newer delete of the same id, not moved here, replaces it whole.
        later = "0000000000000006-00000000-a"
        s.tombstone_put(oid, later, replicas=3, data_class="pii", residency=["eu-west"])
        assert s.tombstones() == [(oid, later, 3, "pii", ("eu-west",), False)]


def test_a_version_4_store_gains_the_moved_flag_of_its_tombstones(tmp_path: Path) -> None:
    import sqlite3

    oid = object_id_of(b"kept")
    ts = "0000000000000005-00000000-a"
    with open_store(tmp_path) as s:
        s.tombstone_put(oid, ts, replicas=2, data_class=None, residency=None)
    db = sqlite3.connect(tmp_path / "meta.sqlite3")
    db.execute("ALTER TABLE obj_tombstones DROP COLUMN moved")
    db.execute("PRAGMA user_version=4")
    db.commit()
    db.close()
    with open_store(tmp_path) as s:
        assert s.tombstones() == [(oid, ts, 2, None, None, False)]
        s.tombstone_put(oid, ts, replicas=2, data_class=None, residency=None, moved=True)
    with open_store(tmp_path) as s:
        assert s.tombstones() == [(oid, ts, 2, None, None, True)]


def _age_store(path: Path, version: int) -> None:
    """Make the store in ``path`` look as an older meshscale left it."""
    import sqlite3

    db = sqlite3.connect(path / "meta.sqlite3")
    if version < 2:
        db.execute("ALTER TABLE objects DROP COLUMN written")
        db.execute("DROP TABLE obj_tombstones")
    db.execute(f"PRAGMA user_version={version}")
    db.commit()
    db.close()


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_store_without_objects_is_upgraded_in_place(
    tmp_path: Path, version: int
) -> None:
    with open_store(tmp_path) as s:
        s.kv_put("model/latest", b"v1", "0000000000000001-00000000-a")
    _age_store(tmp_path, version)
    with open_store(tmp_path) as s:
        assert s.kv_get("model/latest") == (b"v1", "0000000000000001-00000000-a")
        meta = s.put_bytes(b"new", now=NOW)
    with open_store(tmp_path) as s:  # now a current store
        assert s.read_bytes(meta.object_id) == b"new"


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_store_with_blake2b_objects_is_refused_and_left_alone(
    tmp_path: Path, version: int
) -> None:
    with open_store(tmp_path) as s:
        meta = s.put_bytes(b"old", now=NOW)  # stands in for a b2b- object
    _age_store(tmp_path, version)
    before = sorted((p.name, p.stat().st_size) for p in files_under(tmp_path / "objects"))
    with pytest.raises(StorageError, match="BLAKE2b ids") as e:
        open_store(tmp_path)
    assert e.value.reason == "old_format"
    assert f"schema {version}" in str(e.value) and "empty one" in str(e.value)
    assert sorted((p.name, p.stat().st_size) for p in files_under(tmp_path / "objects")) == before
    assert meta.object_id in [name for name, _ in before]
    with pytest.raises(StorageError, match="BLAKE2b ids"):  # and again: nothing was changed
        open_store(tmp_path)
    import sqlite3

    db = sqlite3.connect(tmp_path / "meta.sqlite3")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert db.execute("PRAGMA user_version").fetchone()[0] == version
    assert ("obj_tombstones" in tables) == (version >= 2)
    db.close()


def test_deferred_hash_is_checked_at_commit(store: LocalStore) -> None:
    """A writer told to hash at commit reads its file back then: the same checks hold."""
    data = os.urandom(3 << 20)
    w = store.writer(now=NOW, size=len(data))
    w.defer_hash()
    w.write(data[:1000])
    w.write(data[1000:])
    with pytest.raises(StorageError, match="bytes hash to") as e:
        w.commit(object_id_of(b"other bytes"))
    assert e.value.reason == "hash_mismatch"
    assert not store.has(object_id_of(data))
    w = store.writer(now=NOW, size=len(data))
    w.defer_hash()
    w.write(data)
    assert w.commit(object_id_of(data)).object_id == object_id_of(data)
    assert store.read_bytes(object_id_of(data)) == data
    w = store.writer(now=NOW)
    w.write(b"x")
    with pytest.raises(ValueError, match="defer_hash"):
        w.defer_hash()
    w.abort()


def test_kv_writes_keep_the_reserve_and_deletes_still_work(tmp_path: Path) -> None:
    """KV writes ignored the free-space reserve: 23 writes of 900 KB filled a disk, after
    which every delete failed with disk_full."""

    store = LocalStore(tmp_path / "data", StorageConfig(min_free_bytes=0))
    assert store.kv_put("k", b"v" * 1000, "0001")
    st = os.statvfs(tmp_path)
    store.config = StorageConfig(min_free_bytes=st.f_bavail * st.f_frsize + 10**15)
    with pytest.raises(StorageError) as ei:
        store.kv_put("k2", b"x" * 900_000, "0002")
    assert ei.value.reason == "disk_full" and "min_free_bytes" in str(ei.value)
    assert store.kv_put("k", None, "0003")  # a delete needs no room: it works
    store.close()


def test_kv_put_if_applies_only_over_an_expected_version(store: LocalStore) -> None:
    assert store.kv_put_if("c", b"a", "0001", ["0000"]) == (False, None)
    assert store.kv_get("c") is None
    assert store.kv_put_if("c", b"a", "0001", [""]) == (True, None)  # absent
    assert store.kv_put_if("c", b"b", "0002", [""]) == (False, "0001")
    assert store.kv_put_if("c", b"b", "0002", ["0000", "0001"]) == (True, "0001")
    assert store.kv_put_if("c", b"z", "0001x", ["0002"]) == (False, "0002")  # not newer
    assert store.kv_get("c") == (b"b", "0002")
    store.kv_put("c", None, "0003")  # a tombstone is no live value
    assert store.kv_put_if("c", b"d", "0004", [""], ["peer-1"], 5.0) == (True, "0003")
    assert store.kv_get("c") == (b"d", "0004")


def test_object_path_does_not_intern_the_id(store: LocalStore) -> None:
    """Issue #24: the id string a caller passes is the one the replica manager keeps for
    the copy; pathlib interns every part it is given, so building the path from it put an
    entry per object ever stored or read into the interpreter's interned-string table."""
    oid = "".join(["b3-", os.urandom(32).hex()])  # a string of its own, never interned
    path = store.object_path(oid)
    assert path.name == oid and path.parent.parent.parent == store.objects_dir
    assert sys.intern("".join([oid[:3], oid[3:]])) is not oid


# -- small objects kept inline (issue #19) ------------------------------------------------


def inline_rows(store: LocalStore) -> list[str]:
    db = sqlite3.connect(f"file:{store.data_dir / 'meta.sqlite3'}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT id FROM obj_inline ORDER BY id")]
    finally:
        db.close()


def test_a_small_object_is_kept_inline_and_survives_a_reopen_whole(tmp_path: Path) -> None:
    s = LocalStore(tmp_path, StorageConfig(min_free_bytes=0))  # the default inline bound
    small = os.urandom(1000)
    big = os.urandom(s.config.inline_max_bytes + 1)
    m = s.put_bytes(small, now=NOW, replicas=3, expected_id=object_id_of(small))
    s.put_bytes(big, now=NOW)
    # No file, no temp file: the bytes went to the index with the row.
    assert [p.name for p in object_files(s)] == [object_id_of(big)]
    assert files_under(s.tmp_dir) == []
    assert inline_rows(s) == [m.object_id]
    assert s.read_bytes(m.object_id) == small and s.verify(m.object_id)
    with s.open_read(m.object_id) as f:
        f.seek(10)
        assert f.read(5) == small[10:15]
    assert s.stats()["objects"] == 2 and s.stats()["bytes"] == len(small) + len(big)
    assert s.sweep_orphans() == {"orphan_files": 0, "missing_files": 0}
    s.close()
    s2 = LocalStore(tmp_path, StorageConfig(min_free_bytes=0))  # a restarted node
    assert s2.meta(m.object_id) == m
    assert s2.read_bytes(m.object_id) == small and s2.read_bytes(object_id_of(big)) == big
    assert s2.totals() == (2, len(small) + len(big))
    s2.close()


def test_an_inline_object_committed_in_a_process_that_then_dies_is_whole(
        tmp_path: Path) -> None:
    script = f"""
import os, signal
from pathlib import Path
from meshscale.runtime.storage import LocalStore, StorageConfig
s = LocalStore(Path({str(tmp_path)!r}), StorageConfig(min_free_bytes=0))
s.put_bytes(b"small" * 100, now=1.0)
w = s.writer(now=1.0, size=1000)
w.write(b"y" * 500)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    s = LocalStore(tmp_path, StorageConfig(min_free_bytes=0))
    assert list(s.ids()) == [object_id_of(b"small" * 100)]
    assert s.read_bytes(object_id_of(b"small" * 100)) == b"small" * 100
    assert files_under(s.tmp_dir) == [] and object_files(s) == []
    s.close()


def test_a_failure_between_row_and_bytes_leaves_no_half_inline_object(tmp_path: Path) -> None:
    s = LocalStore(tmp_path, StorageConfig(min_free_bytes=0))
    # The bytes' insert fails after the row's, inside the commit's transaction.
    other = sqlite3.connect(tmp_path / "meta.sqlite3")
    other.execute("CREATE TRIGGER boom BEFORE INSERT ON obj_inline "
                  "BEGIN SELECT RAISE(ABORT, 'disk gone'); END")
    other.commit()
    data = os.urandom(2000)
    with pytest.raises(sqlite3.Error):
        s.put_bytes(data, now=NOW)
    assert s.meta(object_id_of(data)) is None and not s.has(object_id_of(data))
    assert s.totals() == (0, 0) and s.stats()["writes_in_flight"] == 0
    other.execute("DROP TRIGGER boom")
    other.commit()
    other.close()
    s.close()
    s2 = LocalStore(tmp_path, StorageConfig(min_free_bytes=0))
    assert list(s2.ids()) == [] and inline_rows(s2) == []
    m = s2.put_bytes(data, now=NOW)  # and the same write goes through once it can
    assert s2.read_bytes(m.object_id) == data
    s2.close()


def test_an_inline_object_that_does_not_hash_to_its_id_is_not_kept(tmp_path: Path) -> None:
    s = LocalStore(tmp_path, StorageConfig(min_free_bytes=0))
    with pytest.raises(StorageError) as e:
        s.put_bytes(b"abc", now=NOW, expected_id=object_id_of(b"abd"))
    assert e.value.reason == "hash_mismatch"
    w = s.writer(now=NOW, size=10)
    w.write(b"12345")
    with pytest.raises(StorageError) as e:
        w.commit()  # fewer bytes than declared
    assert e.value.reason == "hash_mismatch"
    assert_nothing_left(s)
    assert inline_rows(s) == []
    s.close()


def test_inline_objects_link_delete_drop_and_become_files(tmp_path: Path) -> None:
    s = LocalStore(tmp_path, StorageConfig(min_free_bytes=0))
    a, b, c = os.urandom(100), os.urandom(200), os.urandom(300)
    ma = s.put_bytes(a, now=NOW, pinned=False, ttl_s=1)
    mb = s.put_bytes(b, now=NOW)
    mc = s.put_bytes(c, now=NOW)
    # A local reader (a task's worker) gets a file of its own with the bytes.
    link = s.link_copy(ma.object_id)
    assert link.parent == s.links_dir and link.read_bytes() == a
    s.release_copy(link)
    # Written again: stored once, metadata merged, bytes still inline.
    again = s.put_bytes(a, now=NOW + 5, pinned=True)
    assert again.pinned and inline_rows(s) == sorted([ma.object_id, mb.object_id, mc.object_id])
    # Written again without a declared size (a file write): the file takes over.
    with s.writer(now=NOW) as w:
        w.write(c)
        w.commit()
    assert [p.name for p in object_files(s)] == [mc.object_id]
    assert s.read_bytes(mc.object_id) == c
    s.delete(ma.object_id)
    assert s.delete_many([mb.object_id, mc.object_id]) == [mb.object_id, mc.object_id]
    assert_nothing_left(s)
    assert inline_rows(s) == []
    s.close()


def test_quarantine_of_an_inline_copy_and_its_bound(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        StorageConfig(inline_max_bytes=-1)
    with pytest.raises(ValueError):
        StorageConfig(inline_max_bytes=storage.MAX_INLINE_BYTES + 1)
    s = LocalStore(tmp_path, StorageConfig(min_free_bytes=0))
    m = s.put_bytes(b"bits", now=NOW)
    other = sqlite3.connect(tmp_path / "meta.sqlite3")
    other.execute("UPDATE obj_inline SET data = ? WHERE id = ?", (b"bats", m.object_id))
    other.commit()
    other.close()
    assert not s.verify(m.object_id)  # rot in the index is caught like rot in a file
    s.quarantine(m.object_id)
    assert not s.has(m.object_id) and inline_rows(s) == []
    s.close()


def test_a_deleted_inline_object_leaves_no_byte_in_the_stores_files_once_purged(
        tmp_path: Path) -> None:
    """An inline object's bytes are in the index database: a delete frees its pages
    (zeroed, ``secure_delete``) and the write-ahead log still holds them as they were,
    until ``purge_freed`` checkpoints and truncates it (what an erasure waits for before
    it confirms a copy gone, runtime/data/erasure.py). A kept object is untouched."""
    s = LocalStore(tmp_path, StorageConfig(min_free_bytes=0))
    secret = b"customer 42: " + os.urandom(16).hex().encode() * 40
    kept = b"kept " * 100
    gone = s.put_bytes(secret, now=NOW).object_id
    stays = s.put_bytes(kept, now=NOW).object_id

    def holding(needle: bytes) -> list[str]:
        return sorted(p.name for p in files_under(tmp_path) if needle in p.read_bytes())

    assert holding(secret[:64]) != []
    s.delete(gone)
    assert s.meta(gone) is None
    assert holding(secret[:64]) != []  # the log still has the page as it was
    assert s.purge_freed()
    assert holding(secret[:64]) == []
    assert s.read_bytes(stays) == kept and holding(kept[:64]) != []
    s.close()
    s = LocalStore(tmp_path, StorageConfig(min_free_bytes=0))
    assert s.meta(gone) is None and s.read_bytes(stays) == kept
    s.close()
