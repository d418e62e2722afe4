"""The object store benchmark runs end to end in --quick mode: the issue's keys first, in
order, then the extra rows (the RF 3 TLS fan-out ceiling among them); every figure is a
positive number and the table names each one. Speeds are never asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KEYS = ["put_mb_s", "get_mb_s", "tls_copy_mb_s", "small_put_p50_ms", "small_put_p99_ms",
        "rereplicate_s"]


@pytest.mark.timeout(300)
def test_objects_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "o.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "objects.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data)[: len(KEYS)] == KEYS
    assert {"tls_fanout_mb_s", "get_client_mb_s", "get_proxied_mb_s"} <= set(data)
    for key, value in data.items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
        assert key in proc.stdout
    assert data["small_put_p50_ms"] <= data["small_put_p99_ms"]
    assert "of that fan-out" in proc.stdout
