"""bench/replication_idle.py runs end to end in --quick mode and writes its JSON; its
figures are held to what must be true of them (every node holds every object, rounds
ran, idle bytes do not grow with the objects held), never to a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_replication_idle_bench_quick_writes_exact_keys(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "replication_idle.py"), "--quick",
         "--json", str(out)],
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["objects"] for r in rows] == [1000, 5000]
    for r in rows:
        assert list(r) == ["objects", "nodes", "objects_held_per_node", "cpu_ms_per_round",
                           "idle_cpu_pct_per_node", "anti_entropy_bytes_per_min", "rounds",
                           "setup_s"]
        assert r["objects_held_per_node"] == r["objects"]  # 3 nodes at RF 3
        assert r["rounds"] >= r["nodes"] and r["anti_entropy_bytes_per_min"] > 0
    # Idle: one digest per pair and round, whatever the count of objects behind it.
    small, large = (r["anti_entropy_bytes_per_min"] for r in rows)
    assert small / 2 <= large <= small * 2
    assert "cpu_ms_per_round" in proc.stdout


def test_replication_idle_bench_refuses_a_bad_count() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "replication_idle.py"), "--objects", "ten"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2 and "--objects" in proc.stderr
