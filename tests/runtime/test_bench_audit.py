"""The audit benchmark runs end to end in --quick mode: its keys first, in order, each a
positive finite number (never held to a speed), and the object's history it queried is
whole: the put, its three copies, the read, the delete and the three drops."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from runtime_mesh import run_bench_quick


@pytest.mark.timeout(300)
def test_audit_bench_quick(tmp_path: Path) -> None:
    data = run_bench_quick("audit.py", tmp_path / "a.json")
    stdout = data.pop("_stdout")
    assert list(data)[:3] == ["audit_entries_per_s", "verify_mb_per_s", "query_ms"]
    for key, value in data.items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
        assert key in stdout
    assert data["query_rows"] == 9  # put, 3 copies made, read, delete, 3 copies dropped
    assert data["query_ms"] <= data["query_p90_ms"]
