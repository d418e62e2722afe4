"""The stream benchmark runs end to end in --quick mode: exact keys, every record produced
into the operator pipelines received (counted by number, not by how many arrived), the
latency percentiles taken over every record (finite only if none is missing), and the
backlog's high-water mark, read from every node, exactly at its bound: the producer
outran the operator, so it was held there, and never let past it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from runtime_mesh import run_bench_quick


@pytest.mark.timeout(300)
def test_streams_bench_quick(tmp_path: Path) -> None:
    data = run_bench_quick("streams.py", tmp_path / "s.json")
    stdout = data.pop("_stdout")
    assert list(data) == ["throughput_records_s", "latency_p50_ms", "latency_p99_ms",
                          "publish_only_records_s", "backlog_max", "backlog_bound",
                          "records_missing", "records_produced", "records_duplicate"]
    # --quick: 5,000 through the fast pipeline, 5 s at 200/s, 800 through the slow one.
    assert 5_000 + 800 + 900 <= data["records_produced"] <= 5_000 + 800 + 1_001
    assert data["records_missing"] == 0
    assert data["records_duplicate"] >= 0
    assert data["backlog_max"] == data["backlog_bound"] == 500
    p50, p99 = data["latency_p50_ms"], data["latency_p99_ms"]
    assert isinstance(p50, float) and isinstance(p99, float)
    assert 0 < p50 <= p99 and math.isfinite(p99)
    assert data["throughput_records_s"] > 0 and data["publish_only_records_s"] > 0
    for key in data:
        assert key in stdout
