"""``bench/objects.py --scale N`` runs end to end in --quick mode (2,000 objects put through
the mesh): the issue's keys are written, each printed, and each holds what must be true of
it, never a speed: every node holds every object (RF 3 over 3 nodes), memory and idle
figures are positive and finite, the restarted node served a read, and the idle mesh sent
anti-entropy messages once it held data."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_mesh import ROOT, run_bench_quick

KEYS = ["objects_held_per_node", "rss_mb_per_node", "rss_bytes_per_object",
        "idle_cpu_pct_per_node", "list_page_ms", "restart_to_serving_s",
        "anti_entropy_bytes_per_min"]


@pytest.mark.timeout(300)
def test_objects_bench_scale_quick(tmp_path: Path) -> None:
    data = run_bench_quick("objects.py", tmp_path / "s.json", args=["--scale", "2000"])
    stdout = data.pop("_stdout")
    assert data.pop("objects") == 2000
    assert list(data)[: len(KEYS)] == KEYS
    for key, value in data.items():
        assert isinstance(value, int | float), key
        assert math.isfinite(value) and value >= 0, key
        assert key in stdout
    assert data["objects_held_per_node"] == 2000
    assert data["rss_mb_per_node"] > 0 and data["rss_mb_per_node_empty"] > 0
    assert data["rss_bytes_per_object"] > 0  # holding 2,000 objects costs some memory
    assert data["idle_cpu_pct_per_node"] > 0
    assert data["idle_cpu_pct_per_node_max"] >= data["idle_cpu_pct_per_node"]
    assert data["list_page_ms"] > 0
    assert data["restart_to_serving_s"] > 0
    assert data["puts_per_s"] > 0
    # Anti-entropy runs while idle once there is data to compare (a digest per peer per
    # round), counted by the node itself.
    assert data["anti_entropy_bytes_per_min"] > 0


def test_a_scale_run_that_cannot_fit_is_refused_before_it_starts(tmp_path: Path) -> None:
    """A --scale run whose files cannot fit (an hour's preload found out part-way, as a
    1,000,000-object run on a default /dev/shm once was: out of inodes) is refused at once
    with one line naming the directory and the numbers, exit 2, nothing written."""
    out = tmp_path / "s.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "objects.py"), "--scale", str(10**15),
         "--tmpfs", "--tmpfs-dir", str(tmp_path), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"--scale: {tmp_path} has "), lines
    assert "3,000,000,000,000,000" in lines[0] or "GiB" in lines[0]
    assert not out.exists()
