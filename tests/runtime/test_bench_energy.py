"""The energy benchmark's real half runs end to end in --quick mode (two 40 s days on a
6-node mesh of real processes): every real key is written, finite, with tasks done in
both runs and at least one node woken in the consolidated one. Never held to a speed or a
saving (the joules are the power model's on a shared machine)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_energy_bench_real_half_quick(tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "energy.py"), "--quick", "--real-only",
         "--json", str(out)], capture_output=True, text=True, timeout=580, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data) == ["real_energy_spread_j", "real_energy_consolidated_j",
                          "real_saving_pct", "real_p99_spread_ms", "real_p99_consolidated_ms",
                          "real_tasks", "real_day_s", "wake_s", "real_wakes",
                          "real_transitions", "real_zones", "real_standby_share",
                          "real_max_standby", "real_saving_pct_sim_watts",
                          "real_ceiling_pct"]
    for key, value in data.items():
        assert isinstance(value, int | float) and math.isfinite(value), key
        assert key in proc.stdout
    assert data["real_energy_spread_j"] > 0 and data["real_energy_consolidated_j"] > 0
    assert data["real_tasks"] > 0 and data["real_day_s"] == 40
    # The default topology: one region of three zones of two nodes.
    assert data["real_zones"] == 3 and 0 < data["real_ceiling_pct"] < 100
    # Consolidation moved nodes (drain, sleep) during the day; any wake was measured.
    assert data["real_transitions"] >= 2
    assert data["wake_s"] >= 0 and (data["real_wakes"] == 0) == (data["wake_s"] == 0)
    # Nodes slept in the measured day (the logged moves agree with the transitions).
    assert 0 < data["real_standby_share"] < 1 and data["real_max_standby"] >= 1
