"""The stream benchmark runs end to end in --quick mode: exact keys, the backlog never
above its bound while the producer outruns the operator, and nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_streams_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "streams.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data) == ["throughput_records_s", "latency_p50_ms", "latency_p99_ms",
                          "publish_only_records_s", "backlog_max", "backlog_bound",
                          "records_lost"]
    assert data["records_lost"] == 0
    assert 0 < data["backlog_max"] <= data["backlog_bound"]
    assert data["latency_p50_ms"] <= data["latency_p99_ms"]
    assert "throughput_records_s" in proc.stdout
