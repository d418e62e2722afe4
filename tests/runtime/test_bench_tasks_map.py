"""``bench/tasks.py --map-size N`` runs end to end on a small N: the three keys of #24
(and the rest) printed in the table and written to the JSON, with values that must hold
whatever the machine's speed: every task counted, a rate above zero, resident sizes of
real processes, the owner's ended records within its default bound."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_mesh import ROOT

KEYS = ["map_tasks_per_s", "owner_rss_mb_after", "client_rss_mb_peak"]


@pytest.mark.timeout(300)
def test_map_size_bench(tmp_path: Path) -> None:
    out = tmp_path / "map.json"
    n = 300
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tasks.py"), "--map-size", str(n),
         "--json", str(out)], capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    data = doc["meshscale"]
    assert data is not None, doc["errors"]
    assert doc["config"]["map_size"] == n and not doc["leftover_processes"]
    for key in KEYS:
        assert key in proc.stdout, key
        assert isinstance(data[key], float) and math.isfinite(data[key]) and data[key] > 0
    assert data["map_tasks"] == n
    assert data["client_rss_mb_peak"] >= data["client_rss_mb_before"] > 10
    assert data["owner_rss_mb_after"] > 10 and data["owner_rss_mb_idle"] > 10
    assert 0 < data["owner_task_records"] <= 10_000


def test_map_size_must_be_positive(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tasks.py"), "--map-size", "0",
         "--json", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=60,
        check=False)
    assert proc.returncode == 2 and "--map-size must be >= 1" in proc.stderr
