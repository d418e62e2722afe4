"""``examples/access_control.py --quick`` run as a user would (it starts its own 4-node
mesh at two emulated sites): every door's call answered, the classifier mostly right at
both sites, the node of site-b's near replica killed midway with the door's calls
answered again (the failover gap printed), and the central service slower from the
far site than from its own (the emulated 40 ms round trip)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(400)
def test_access_control_example() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "access_control.py"),
                           "--quick"], capture_output=True, text=True, timeout=380, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    assert re.search(r"^killed node-\d \(site-b's near replica\) after 30 badges$", out, re.M)
    gap = re.search(r"^failover gap at site-b: ([0-9.]+) s$", out, re.M)
    assert gap is not None and float(gap.group(1)) >= 0
    assert "calls failed: 0" in out
    rows = {(m[0], m[1]): (int(m[2]), float(m[3]))
            for m in re.findall(r"^(site-\w)\s+(badge-\w+)\s+(\d+)\s+([0-9.]+)\s+[0-9.]+$",
                                out, re.M)}
    assert len(rows) == 4 and all(n == 60 for n, _ in rows.values()), rows
    # site-b reaches the central replica (at site-a) across the emulated 40 ms RTT.
    assert rows[("site-b", "badge-central")][1] > rows[("site-a", "badge-central")][1]
    assert rows[("site-b", "badge-central")][1] >= 40.0
