"""A node's power draw and energy: measured where the machine has a meter, modelled
where it does not, and always labelled with which.

- ``rapl``: Intel/AMD RAPL counters under ``/sys/class/powercap`` (the ``package-N``
  zones' ``energy_uj``, wrap-around handled with ``max_energy_range_uj``). They measure the
  whole machine's packages: nodes sharing a machine each report all of it.
- ``model``: the declared ``core.capacity.PowerModel`` (``idle_watts``, ``peak_watts``,
  ``standby_watts``) at the node's measured CPU utilisation: the CPU seconds of the agent
  process and its worker processes (from /proc; psutil where that cannot be walked) per
  wall second, over the machine's CPUs.

``power_source = "auto"`` takes RAPL when its counters are readable, else the model.
``PowerMeter.tick`` is called once a second by the node's observer; it keeps the total
and a ring of one-second joules for the last hour (``ENERGY_WINDOW_S``).
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from meshscale.core.capacity import PowerModel, PowerState

__all__ = ["ENERGY_WINDOW_S", "POWER_SOURCES", "PowerMeter", "ProcessTreeCpu", "RaplReader",
           "proc_cpu_s", "proc_rss_bytes", "tree_pids"]

POWER_SOURCES = ("auto", "rapl", "model")
ENERGY_WINDOW_S = 3600
"""Seconds of per-second joules kept for ``joules_last_hour``."""
DEFAULT_RAPL_DIR = Path("/sys/class/powercap")


class PowerError(Exception):
    """A power source that was asked for and cannot be used (``key``: the config key)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass
class _Zone:
    path: Path
    max_uj: int
    last_uj: int


class RaplReader:
    """Joules used by the machine's RAPL package zones since the last ``read``."""

    def __init__(self, root: Path = DEFAULT_RAPL_DIR) -> None:
        self.zones: list[_Zone] = []
        with contextlib.suppress(OSError):
            for d in sorted(root.iterdir()):
                # Top-level zones only (intel-rapl:0, not intel-rapl:0:0: a sub-zone's
                # energy is already in its package's).
                if d.name.count(":") != 1:
                    continue
                try:
                    name = (d / "name").read_text().strip()
                    if not name.startswith("package"):
                        continue
                    max_uj = int((d / "max_energy_range_uj").read_text())
                    now_uj = int((d / "energy_uj").read_text())
                except (OSError, ValueError):
                    continue
                if max_uj > 0 and 0 <= now_uj <= max_uj:
                    self.zones.append(_Zone(d / "energy_uj", max_uj, now_uj))

    @property
    def available(self) -> bool:
        return bool(self.zones)

    def read(self) -> float:
        """Joules since the previous read, over every package (a counter that wrapped
        counts the way round; one that cannot be read adds nothing this time)."""
        total_uj = 0
        for z in self.zones:
            try:
                now = int(z.path.read_text())
            except (OSError, ValueError):
                continue
            delta = now - z.last_uj
            if delta < 0:
                delta += z.max_uj + 1
            z.last_uj = now
            total_uj += delta
        return total_uj / 1e6


MAX_TREE_PIDS = 4096
"""Bound on the processes ``tree_pids`` walks (a node has its workers and replicas)."""
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def tree_pids(pid: int) -> list[int] | None:
    """``pid`` and its descendants, read from ``/proc/PID/task/TID/children``: the cost is
    the size of the tree. None where the kernel has no such file (the caller then asks
    psutil, whose ``children`` reads the ``stat`` of every process on the machine: twice
    a second per node, that was most of an idle node's CPU)."""
    out = [pid]
    i = 0
    while i < len(out) and len(out) < MAX_TREE_PIDS:
        parent = out[i]
        i += 1
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            if parent == pid:
                return None
            continue  # exited meanwhile
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", "rb") as f:
                    text = f.read()
            except FileNotFoundError:
                if parent == pid and os.path.isdir(f"/proc/{parent}/task/{tid}"):
                    return None  # the thread is there, the file is not: no such file here
                continue  # the thread or the process ended meanwhile
            except OSError:
                continue
            out.extend(int(c) for c in text.split())
    return out[:MAX_TREE_PIDS]


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (``/proc/PID/stat``), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rpartition(b")")[2].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (IndexError, ValueError):
        return None


def proc_rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (``/proc/PID/statm``), None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


class ProcessTreeCpu:
    """CPU utilisation (0..1 of the machine's CPUs) of this process and its descendants
    since the previous call."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self.cpus = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else (os.cpu_count() or 1))
        self._seen: dict[int, float] = {}
        self._last_wall: float | None = None
        self._gone_s = 0.0

    def _cpu_s(self) -> dict[int, float]:
        out: dict[int, float] = {}
        pids = tree_pids(self.pid)
        if pids is not None:
            for pid in pids:
                cpu = proc_cpu_s(pid)
                if cpu is not None:
                    out[pid] = cpu
            return out
        import psutil  # only where /proc cannot say (a node never loads it on Linux)

        with contextlib.suppress(psutil.Error):
            me = psutil.Process(self.pid)
            procs = [me]
            with contextlib.suppress(psutil.Error):
                procs += me.children(recursive=True)
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    out[p.pid] = t.user + t.system
        return out

    def utilisation(self, now: float) -> float:
        cpu = self._cpu_s()
        used = sum(max(0.0, v - self._seen.get(pid, 0.0)) for pid, v in cpu.items())
        self._seen = cpu
        last, self._last_wall = self._last_wall, now
        if last is None or now <= last:
            return 0.0
        return min(1.0, used / ((now - last) * self.cpus))


class PowerMeter:
    """The node's draw and energy; ``source`` says whether they are measured or modelled."""

    def __init__(self, model: PowerModel, source: str = "auto", *,
                 rapl_dir: Path = DEFAULT_RAPL_DIR, now: float = 0.0,
                 cpu: ProcessTreeCpu | None = None) -> None:
        if source not in POWER_SOURCES:
            raise PowerError("power_source", f"{source!r} is not one of "
                                             f"{', '.join(POWER_SOURCES)}")
        self.model = model
        rapl = RaplReader(rapl_dir) if source in ("auto", "rapl") else None
        if source == "rapl" and (rapl is None or not rapl.available):
            raise PowerError("power_source", f"rapl: no readable RAPL package counters "
                                             f"under {rapl_dir}")
        self.rapl = rapl if rapl is not None and rapl.available else None
        self.source = "rapl" if self.rapl is not None else "model"
        self.cpu = cpu if cpu is not None else ProcessTreeCpu()
        self.state = PowerState.ACTIVE
        self.utilisation = 0.0
        self.watts = model.draw_watts(self.state, 0.0) if self.rapl is None else 0.0
        self.joules = 0.0
        self._last = now
        self._window: deque[float] = deque(maxlen=ENERGY_WINDOW_S)

    def tick(self, now: float) -> float:
        """Account the time since the last tick; returns the joules it added."""
        dt = max(0.0, now - self._last)
        self._last = now
        self.utilisation = self.cpu.utilisation(now)
        if self.rapl is not None:
            j = self.rapl.read()
            self.watts = j / dt if dt > 0 else self.watts
        else:
            # The interval just ended, at the utilisation measured over it.
            self.watts = self.model.draw_watts(self.state, self.utilisation)
            j = self.watts * dt
        self.joules += j
        self._window.append(j)
        return j

    def joules_last_hour(self) -> float:
        return sum(self._window)
