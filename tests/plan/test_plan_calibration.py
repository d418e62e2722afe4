"""The report's "checked" figures are the ones a real mesh bears out.

``plan.run.CHECKED`` lists the figures the report shows as checked against a real local
mesh; every other figure is "model only". This runs ``bench/plan_calibration.py
--quick`` (the planner's prediction, then the same stream on real node processes) and
holds every figure in ``CHECKED`` to the bench's 0.2 target: a change to the model or the
runtime that breaks the agreement fails here, and so does listing a figure the bench
does not check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshscale.plan.run import CHECKED, METHOD

ROOT = Path(__file__).resolve().parents[2]
TARGET = 0.2


def test_checked_figures_are_figures_of_the_report() -> None:
    assert set(METHOD) >= CHECKED


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_checked_figures_are_within_the_target_on_a_real_mesh(tmp_path: Path) -> None:
    out = tmp_path / "cal.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plan_calibration.py"), "--quick", "--json",
         str(out)], capture_output=True, text=True, timeout=850, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("p50_pred_ms", "p50_real_ms", "p99_pred_ms", "p99_real_ms",
                "cross_region_bytes_pred", "cross_region_bytes_real", "max_rel_err"):
        assert key in data, key
    rows = data["figures"]
    assert data["max_rel_err"] == max(r["rel_err"] for r in rows)
    bench_checks = {r["figure"] for r in rows}
    for figure in sorted(CHECKED):
        assert figure in bench_checks, f"{figure} is marked checked, but no bench row checks it"
        for r in rows:
            if r["figure"] == figure:
                assert r["rel_err"] <= TARGET, (figure, r, proc.stdout)
