"""The object store benchmark runs end to end in --quick mode: the issue's keys first, in
order, then the extra rows (the RF 3 TLS fan-out ceiling among them); every figure is a
positive number and the table names each one. Speeds are never asserted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from runtime_mesh import run_bench_quick

KEYS = ["put_mb_s", "get_mb_s", "tls_copy_mb_s", "small_put_p50_ms", "small_put_p99_ms",
        "rereplicate_s"]


@pytest.mark.timeout(300)
def test_objects_bench_quick(tmp_path: Path) -> None:
    data = run_bench_quick("objects.py", tmp_path / "o.json")
    stdout = data.pop("_stdout")
    assert list(data)[: len(KEYS)] == KEYS
    assert {"tls_fanout_mb_s", "get_client_mb_s", "get_proxied_mb_s"} <= set(data)
    for key, value in data.items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
        assert key in stdout
    assert data["small_put_p50_ms"] <= data["small_put_p99_ms"]
    assert "of that fan-out" in stdout
