"""The membership benchmark runs end to end in --quick mode and writes its JSON, and its
figures are held to what must be true of them (no false positive, healthy or slow; every
node sends at least its own probes; Vivaldi beats guessing zero), never to a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshscale.core.membership import MembershipConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_membership_bench_quick_writes_exact_keys(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "membership.py"), "--nodes", "40", "--quick",
         "--json", str(out)],
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert list(data) == [
        "nodes", "detect_first_s", "detect_all_s", "disseminate_all_s", "msgs_per_node_per_s",
        "bytes_per_node_per_s", "false_positives_loss5", "false_positives_slow",
        "vivaldi_median_rel_err", "sim_events_per_s", "wall_s", "detect_all_loss1_s",
        "false_transitions_loss5", "wrong_views_after_loss5",
        "false_transitions_healthy_slow", "false_transitions_about_slow",
        "sim_events_per_cpu_s",
    ]
    # CPU time is at most the wall time the same events took, so per CPU second is more.
    assert data["sim_events_per_cpu_s"] >= data["sim_events_per_s"] > 0
    assert data["nodes"] == 40
    assert 0 < data["detect_first_s"] <= data["detect_all_s"] < 60
    assert 0 < data["detect_all_loss1_s"] < 60
    # Every false transition counted, not only distinct nodes; the views heal.
    assert data["false_positives_loss5"] == 0 and data["false_transitions_loss5"] == 0
    assert data["wrong_views_after_loss5"] == 0
    # Lifeguard's point: healthy nodes are never marked dead while 5% of nodes are slow.
    assert data["false_positives_slow"] == 0 and data["false_transitions_healthy_slow"] == 0
    assert data["false_transitions_about_slow"] >= 0  # reported, not hidden
    assert 0 < data["disseminate_all_s"] < 60
    # Every node probes one peer per probe interval (and answers the probes it gets).
    assert data["msgs_per_node_per_s"] >= 1 / MembershipConfig().probe_interval_s
    assert data["bytes_per_node_per_s"] > data["msgs_per_node_per_s"]
    # A median relative error of 1 is what estimating every RTT as 0 scores.
    assert 0 < data["vivaldi_median_rel_err"] < 1
    assert "detect_all_s" in proc.stdout and "false_transitions_about_slow" in proc.stdout
