"""The batch benchmark runs end to end in --quick mode: its three keys first, the times
positive, the byte counts consistent with each other (never held to a speed), and the
mesh's group-by gives the local run's totals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from runtime_mesh import run_bench_quick

pytest.importorskip("distributed")
pytest.importorskip("pyarrow")


@pytest.mark.timeout(600)
def test_batch_bench_quick(tmp_path: Path) -> None:
    data = run_bench_quick("batch.py", tmp_path / "b.json", timeout=560)
    stdout = data.pop("_stdout")
    assert list(data)[:3] == ["mesh_dask_s", "local_dask_s", "mesh_bytes_moved_mb"]
    for key, value in data.items():
        assert isinstance(value, float) and math.isfinite(value) and value >= 0, key
        assert key in stdout
    assert data["mesh_dask_s"] > 0 and data["local_dask_s"] > 0
    assert data["same_result"] == data["plain_same_result"] == data["rerun_same_result"] == 1.0
    assert data["mesh_bytes_moved_mb"] == pytest.approx(
        data["mesh_nonlocal_read_mb"] + data["mesh_node_copy_mb"]
        + data["mesh_dask_transfer_mb"])
    # Every input byte was read from some node's copy (whole reads of every file).
    assert data["mesh_read_served_mb"] >= data["input_mb"] * 0.99
    assert data["mesh_nonlocal_read_mb"] <= data["input_mb"]
    assert data["mesh_worker_nodes_changed"] == 0  # the workers kept their nodes (issue 20)
