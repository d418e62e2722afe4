"""bench/replication_views.py runs end to end in --quick mode and writes its JSON; its
figures are held to what must be true of them (a 3-node change moves every set; a
12-node change places again only the sets it moves), never to a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_replication_views_bench_quick_writes_exact_keys(tmp_path: Path) -> None:
    out = tmp_path / "v.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "replication_views.py"), "--quick",
         "--json", str(out)],
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())
    assert list(got) == ["rows", "load_s", "core_bytes_per_copy"]
    rows = got["rows"]
    assert len(rows) == 6 and "core_bytes_per_copy" in proc.stdout
    for r in rows:
        assert list(r) == ["scenario", "objects", "nodes", "seconds", "cpu_s", "replaced",
                          "moved"]
        assert r["objects"] == 2000 and r["replaced"] >= r["moved"]
        if r["nodes"] <= 3:
            assert r["moved"] == 2000  # every set holds every node
        else:
            # About RF/N of the sets hold the node that left or came back; only those.
            assert 0 < r["moved"] == r["replaced"] < 2000
    assert got["core_bytes_per_copy"] > 0


def test_replication_views_bench_refuses_a_bad_count() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "replication_views.py"), "--objects", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2 and "--objects" in proc.stderr
