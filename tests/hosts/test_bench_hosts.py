"""``bench/runtime_membership.py --hosts`` runs end to end (each node in its own network
namespace) and writes its figures; the numbers themselves belong to the benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from needs import require_tools

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_membership_bench_across_namespaces(tmp_path: Path) -> None:
    require_tools("ip", "nft", what="the multi-host benchmark", root=True)
    out = tmp_path / "hosts.json"
    bench = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "runtime_membership.py"), "--nodes", "5",
         "--hosts", "--quick", "--trials", "1", "--sim-seeds", "1", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = bench.communicate(timeout=280)
    finally:
        bench.kill()
    proc = subprocess.CompletedProcess(bench.args, bench.returncode, stdout, stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["hosts"] is True and data["nodes"] == 5
    assert data["converge_s"] > 0 and len(data["detect_all_trials_s"]) == 1
    assert data["detect_all_s"] > 0 and data["false_positives"] >= 0
    assert data["tree_rss_mb_per_node"] > data["rss_mb_per_node"] > 0  # workers counted
    assert "detect_all_s" in proc.stdout
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    # Only this bench's labs (netlab names them mst<pid>x...): tests running beside this
    # one may have labs of their own.
    assert f"mst{bench.pid}x" not in left, left
