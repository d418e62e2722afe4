"""Service call metrics (``runtime/observe.py``; families in ``runtime/metrics.py``):
bounded label values (at most 64 (service, method) pairs, then ``other``), counts,
histograms and in-flight gauges as the node's Prometheus families show them, and no family
when the plane has none."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any, cast

from meshscale.runtime.metrics import MeshCollector
from meshscale.runtime.observe import (
    MAX_METRIC_METHODS,
    ObservedNode,
    ServiceCallMetrics,
)


def test_pairs_are_bounded_then_other() -> None:
    m = ServiceCallMetrics()
    keys = [m.key(f"s{i % 4}", f"m{i}") for i in range(MAX_METRIC_METHODS)]
    assert len(set(keys)) == MAX_METRIC_METHODS
    assert m.key("s1", "m1") == ("s1", "m1")  # a known pair keeps its series
    assert m.key("s1", "late") == ("s1", "other")  # a known service, a new method
    assert m.key("new", "x") == ("other", "other")
    for i in range(1000):
        m.ended(m.key(f"svc{i}", f"m{i}"), "done", 0.001)
    labels = {k[:2] for k in m.calls}
    assert labels == {("other", "other")}


def families(plane: Any) -> dict[str, Any]:
    agent = SimpleNamespace(services=plane)
    return {f.name: f for f in MeshCollector._services(cast(ObservedNode, agent))}


def test_families_show_calls_latency_inflight_and_replicas() -> None:
    m = ServiceCallMetrics()
    k = m.key("digits", "predict")
    for _ in range(3):
        m.started(k)
    m.ended(k, "done", 0.002)
    m.ended(k, "raised", 0.004)
    plane = SimpleNamespace(
        call_metrics=m, stats=Counter(health_checks_failed=4, replica_health_restarts=1),
        replica_states=lambda: {"digits": ("unhealthy", 2), "other-svc": ("starting", 0)})
    fams = families(plane)
    calls = {(s.labels["service"], s.labels["method"], s.labels["outcome"]): s.value
             for s in fams["meshscale_service_calls"].samples}
    assert calls == {("digits", "predict", "done"): 1, ("digits", "predict", "raised"): 1}
    lat = {s.name: s.value for s in fams["meshscale_service_call_latency_seconds"].samples
           if s.name.endswith(("_count", "_sum"))}
    assert lat["meshscale_service_call_latency_seconds_count"] == 2
    assert abs(lat["meshscale_service_call_latency_seconds_sum"] - 0.006) < 1e-9
    inflight = fams["meshscale_service_inflight_calls"].samples
    assert [(s.labels["method"], s.value) for s in inflight] == [("predict", 1)]
    reps = {(s.labels["service"], s.labels["state"]): s.value
            for s in fams["meshscale_service_replicas"].samples}
    assert reps[("digits", "unhealthy")] == 1 and reps[("digits", "ready")] == 0
    assert reps[("other-svc", "starting")] == 1
    rq = {s.labels["service"]: s.value
          for s in fams["meshscale_service_replica_inflight_calls"].samples}
    assert rq == {"digits": 2, "other-svc": 0}
    assert fams["meshscale_service_unhealthy_restarts"].samples[0].value == 1
    assert fams["meshscale_service_health_checks_failed"].samples[0].value == 4


def test_no_plane_yields_empty_families() -> None:
    fams = families(None)
    assert "meshscale_service_calls" in fams
    assert all(not f.samples for n, f in fams.items()
               if n not in ("meshscale_service_health_checks_failed",
                            "meshscale_service_unhealthy_restarts"))
