"""The services benchmark runs end to end in --quick mode: exact keys, every call answered
(the script raises otherwise), the percentiles ordered, and the failover gap measured (a
caller's calls answered again after its replica's node was SIGKILLed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_mesh import run_bench_quick


@pytest.mark.timeout(300)
def test_services_bench_quick(tmp_path: Path) -> None:
    data = run_bench_quick("services.py", tmp_path / "s.json")
    stdout = data.pop("_stdout")
    # Ray Serve runs only with --peers (in the peers' environment): here it is left out, said so.
    assert data.pop("ray_serve") is None
    assert data.pop("ray_serve_unavailable") == "not asked for (--peers)"
    assert "Ray Serve not run" in stdout
    assert list(data) == ["noop_calls_per_s", "noop_call_p50_ms", "noop_call_p99_ms",
                          "model_call_p50_ms", "failover_gap_s", "idle_rss_mb"]
    assert data["noop_calls_per_s"] > 0
    assert 0 < data["noop_call_p50_ms"] <= data["noop_call_p99_ms"]
    assert data["model_call_p50_ms"] > 0
    assert data["failover_gap_s"] is not None and data["failover_gap_s"] >= 0
    assert data["idle_rss_mb"] is not None and data["idle_rss_mb"] > 0
    for key in data:
        assert key in stdout
