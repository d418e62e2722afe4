"""The stream benchmark runs end to end in --quick mode: exact keys, the backlog never
above its bound while the producer outruns the operator, and nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_mesh import run_bench_quick


@pytest.mark.timeout(300)
def test_streams_bench_quick(tmp_path: Path) -> None:
    data = run_bench_quick("streams.py", tmp_path / "s.json")
    stdout = data.pop("_stdout")
    assert list(data) == ["throughput_records_s", "latency_p50_ms", "latency_p99_ms",
                          "publish_only_records_s", "backlog_max", "backlog_bound",
                          "records_lost"]
    assert data["records_lost"] == 0
    assert 0 < data["backlog_max"] <= data["backlog_bound"]
    assert data["latency_p50_ms"] <= data["latency_p99_ms"]
    assert "throughput_records_s" in stdout
