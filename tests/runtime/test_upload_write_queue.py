"""The local writes of an upload's chunks (``Uploads._put_chunk``): queued up to
``DataPlaneConfig.write_ahead`` deep, written in order on a real store, and a failed
write ends the upload with nothing left on disk."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from meshscale.core.api import ApiError, ErrorCode
from meshscale.core.objects import object_id
from meshscale.core.replication import ObjectPolicy
from meshscale.runtime import storage
from meshscale.runtime.data.state import DataPlaneConfig, _Upload
from meshscale.runtime.data.uploads import Uploads
from meshscale.runtime.storage import LocalStore

CHUNK = 64 * 1024


def _uploads(store: LocalStore, write_ahead: int, size: int) -> tuple[Uploads, str]:
    """An Uploads room holding one open upload of ``size`` bytes on ``store`` (only the
    parts ``_put_chunk`` and ``_settle`` use)."""
    room = Uploads.__new__(Uploads)
    room.cfg = DataPlaneConfig(chunk_bytes=CHUNK, write_ahead=write_ahead)
    room.store = store
    room._uploads = {}
    room._early = {}
    writer = store.writer(now=0.0, size=size)
    room._uploads["u1"] = _Upload(writer, size, ObjectPolicy(3), 2, None, None, client=True)
    return room, "u1"


def _tmp_files(store: LocalStore) -> list[Path]:
    return [p for p in store.tmp_dir.iterdir() if p.is_file()]


@pytest.mark.parametrize("write_ahead", [1, 3])
def test_chunks_are_written_in_order_with_at_most_write_ahead_outstanding(
        tmp_path: Path, write_ahead: int) -> None:
    data = os.urandom(CHUNK * 9 + 123)
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]

    async def go() -> str:
        with LocalStore(tmp_path) as store:
            room, key = _uploads(store, write_ahead, len(data))
            up = room._uploads[key]
            deepest = 0
            for chunk in chunks:
                await room._put_chunk(key, chunk)
                assert len(up.writes) <= write_ahead
                deepest = max(deepest, len(up.writes))
            await room._settle(key, up)
            assert not up.writes and up.received == len(data)
            oid = up.writer.commit(object_id(data))  # the hash checks the order too
            assert store.read_bytes(oid.object_id) == data
            if write_ahead > 1:
                assert deepest > 1, "no write was ever queued behind another"
            return oid.object_id

    assert asyncio.run(go()) == object_id(data)


def test_a_failed_write_ends_the_upload_and_leaves_no_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(CHUNK * 8)
    real = storage._write_all
    calls = 0

    def failing(fd: int, view: memoryview) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, view)

    monkeypatch.setattr(storage, "_write_all", failing)

    async def go() -> None:
        with LocalStore(tmp_path) as store:
            room, key = _uploads(store, 4, len(data))
            up = room._uploads[key]
            await room._put_chunk(key, data[:CHUNK])
            assert len(_tmp_files(store)) == 1  # the upload's file, as the check sees it
            with pytest.raises(ApiError) as err:
                for i in range(CHUNK, len(data), CHUNK):
                    await room._put_chunk(key, data[i:i + CHUNK])
                await room._settle(key, up)
            assert err.value.code is ErrorCode.DISK_FULL
            assert key not in room._uploads and not up.writes
            assert up.writer.closed
            with pytest.raises(ValueError, match="unknown or expired upload"):
                await room._put_chunk(key, data[:CHUNK])
            await asyncio.sleep(0)
            assert calls == 3, "a chunk queued behind the failed one was still written"
            assert _tmp_files(store) == []

    asyncio.run(go())
