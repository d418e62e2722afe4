"""The node's power meter (runtime/power.py): RAPL counters read from a sysfs tree the
test makes (packages summed, sub-zones not counted twice, wrap-around, a counter that
cannot be read), the model at a utilisation, and the CPU of a process tree (walked from
/proc, as psutil would find it)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from runtime_mesh import wait_for

from meshscale.core.capacity import PowerModel, PowerState
from meshscale.runtime.power import (
    PowerError,
    PowerMeter,
    ProcessTreeCpu,
    RaplReader,
    proc_cpu_s,
    proc_rss_bytes,
    tree_pids,
)


def zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int = 1_000_000) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "name").write_text(label + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def test_rapl_sums_packages_and_handles_wraparound(tmp_path: Path) -> None:
    p0 = zone(tmp_path, "intel-rapl:0", "package-0", 900_000)
    p1 = zone(tmp_path, "intel-rapl:1", "package-1", 100)
    sub = zone(tmp_path, "intel-rapl:0:0", "core", 5)  # inside package-0: not counted
    zone(tmp_path, "intel-rapl:2", "psys", 7)  # not a package
    r = RaplReader(tmp_path)
    assert r.available and len(r.zones) == 2
    (p0 / "energy_uj").write_text("100000")  # wrapped: 900,000 -> 1,000,000 -> 100,000
    (p1 / "energy_uj").write_text("2100")
    (sub / "energy_uj").write_text("999999")
    assert r.read() == pytest.approx((100_001 + 100_000 + 2_000) / 1e6)
    (p1 / "energy_uj").unlink()  # unreadable this time: adds nothing, no crash
    (p0 / "energy_uj").write_text("150000")
    assert r.read() == pytest.approx(0.05)


def test_no_counters_means_model_and_rapl_is_refused(tmp_path: Path) -> None:
    assert not RaplReader(tmp_path / "missing").available
    model = PowerModel(idle_watts=10, peak_watts=50, standby_watts=2)
    m = PowerMeter(model, "auto", rapl_dir=tmp_path / "missing", now=0.0)
    assert m.source == "model"
    with pytest.raises(PowerError, match="power_source: rapl"):
        PowerMeter(model, "rapl", rapl_dir=tmp_path / "missing")
    with pytest.raises(PowerError, match="not one of"):
        PowerMeter(model, "wind")


class FixedCpu(ProcessTreeCpu):
    def __init__(self, u: float) -> None:
        self.u = u

    def utilisation(self, now: float) -> float:
        return self.u


def test_model_energy_is_the_declared_draw_times_time(tmp_path: Path) -> None:
    model = PowerModel(idle_watts=10, peak_watts=50, standby_watts=2)
    m = PowerMeter(model, "model", now=100.0, cpu=FixedCpu(0.25))
    assert m.tick(102.0) == pytest.approx(2 * 20.0)  # 10 + 40 * 0.25 W for 2 s
    assert m.watts == pytest.approx(20.0)
    m.state = PowerState.STANDBY
    assert m.tick(105.0) == pytest.approx(3 * 2.0)
    assert m.joules == pytest.approx(46.0)
    assert m.joules_last_hour() == pytest.approx(46.0)


def test_rapl_meter_reports_measured_watts(tmp_path: Path) -> None:
    p0 = zone(tmp_path, "intel-rapl:0", "package-0", 0, max_uj=10**12)
    model = PowerModel(idle_watts=10, peak_watts=50, standby_watts=2)
    m = PowerMeter(model, "auto", rapl_dir=tmp_path, now=0.0, cpu=FixedCpu(0.0))
    assert m.source == "rapl"
    (p0 / "energy_uj").write_text(str(30_000_000))  # 30 J in 2 s
    assert m.tick(2.0) == pytest.approx(30.0)
    assert m.watts == pytest.approx(15.0)


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_process_tree_cpu_counts_a_busy_child() -> None:
    cpu = ProcessTreeCpu()
    cpu.utilisation(time.monotonic())
    # The child's CPU counts while it is a child we can see (after it exits, what it used
    # is gone from the tree), so it is sampled while it spins.
    child = multiprocessing.get_context("fork").Process(target=_spin, args=(5.0,))
    child.start()
    try:
        used = wait_for(lambda: cpu.utilisation(time.monotonic()) or None, 20,
                        "the spinning child's CPU counted", poll=0.3)
        assert 0.0 < used <= 1.0
    finally:
        child.terminate()
        child.join(10)


def test_tree_pids_reads_the_process_tree_as_psutil_does() -> None:
    """``tree_pids`` (``/proc/PID/task/TID/children``) finds a child and a grandchild, the
    same tree as psutil's scan of every process; the CPU and memory read from /proc agree
    with psutil's for this process."""
    shell = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30; wait"])
    try:
        me = psutil.Process()
        expected = wait_for(
            lambda: (lambda kids: kids if len(kids) >= 3 else None)(
                {p.pid for p in me.children(recursive=True)}),
            20, "the shell and its two sleeps")
        pids = tree_pids(os.getpid())
        me_children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
        # None only where the kernel has no such file (the caller then asks psutil).
        assert (pids is None) == (not me_children.exists()), (pids, me_children)
        if pids is None:
            return
        assert pids[0] == os.getpid()
        assert shell.pid in pids
        assert set(pids[1:]) == expected
    finally:
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(shell.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        shell.kill()
        shell.wait(10)
    assert tree_pids(2**22 + 1) is None  # no such process
    t = psutil.Process().cpu_times()
    cpu = proc_cpu_s(os.getpid())
    assert cpu is not None and abs(cpu - (t.user + t.system)) < 0.5
    rss = proc_rss_bytes(os.getpid())
    assert rss is not None and abs(rss - psutil.Process().memory_info().rss) < 16 << 20
