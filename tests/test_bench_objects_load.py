"""bench/objects.py's scale load: which failed puts it tries again (the runs are a
benchmark; one lost answer must not end a million-object run, a real refusal must)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import objects
from meshscale.client.rpc import RemoteError, RpcError


def test_transient_answers_and_lost_answers_are_tried_again() -> None:
    assert objects._transient(RemoteError("busy: 64 requests in flight", "busy"))
    assert objects._transient(RemoteError("node is starting", "starting"))
    assert objects._transient(RemoteError("2 of 3 copies, w=2 not met", "unavailable"))
    assert objects._transient(RpcError("connection refused", refused=True))
    assert objects._transient(RpcError("request timed out after 120s"))


def test_a_refusal_or_a_broken_rule_ends_the_run() -> None:
    assert not objects._transient(RemoteError("object too large", "invalid"))
    assert not objects._transient(RemoteError("no space", "disk_full"))
    assert not objects._transient(RemoteError("unauthorized", "unauthorized"))
    assert not objects._transient(RpcError("TLS: certificate verify failed"))


class _Fs:
    """What ``os.statvfs`` says of a filesystem, the fields the room check reads."""

    def __init__(self, files: int, favail: int, bavail: int, frsize: int = 4096) -> None:
        self.f_files, self.f_favail, self.f_bavail, self.f_frsize = files, favail, bavail, frsize


def test_the_room_check_counts_files_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 1_000_000  # 3,000,000 files of at least 4 KiB each: about 11.4 GiB
    big = 4 * 2**30 // 4096 * 4  # 16 GiB in 4 KiB blocks
    cases = {
        "inodes": _Fs(files=3_085_473, favail=2_603_079, bavail=big),
        "unlimited": _Fs(files=0, favail=0, bavail=big),  # tmpfs nr_inodes=0
        "bytes": _Fs(files=0, favail=0, bavail=2 * 2**30 // 4096),
        "enough": _Fs(files=10_000_000, favail=9_000_000, bavail=big),
    }
    said = {}
    for name, fs in cases.items():
        monkeypatch.setattr(objects.os, "statvfs", lambda _d, fs=fs: fs)
        said[name] = objects.room_problem("/x", n, inline=False)
    assert said["inodes"] is not None and "2,603,079 more files" in said["inodes"]
    assert said["unlimited"] is None and said["enough"] is None
    assert said["bytes"] is not None and "2.0 GiB free" in said["bytes"]
    # Kept inline (the 512-byte objects, by default): no file each, 2 KiB each at most.
    monkeypatch.setattr(objects.os, "statvfs", lambda _d: cases["inodes"])
    assert objects.room_problem("/x", n) is None
    monkeypatch.setattr(objects.os, "statvfs", lambda _d: cases["bytes"])
    inline = objects.room_problem("/x", n)
    assert inline is not None and "about 5.7 GiB" in inline
