"""Regression: a put that arrives right as the mesh forms (the first attempt at planning
puts in ``core/puts`` was reverted after the demo's first put failed at startup). Each
round starts a fresh mesh and, the moment every node sees every other, puts from every
node: a small put (copies sent while the coordinator commits) and cut-through puts (id
sent ahead, chunks forwarded as they arrive), each planned at its start while members may
still be changing. Every one must be acknowledged and readable from another node."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import meshscale
from meshscale.runtime.launcher import LocalMesh

pytestmark = pytest.mark.timeout(300)

ROUNDS = 3
SIZES = (1_000, 300_000, 1_500_000)
"""Small (``obj.put_small``), and over ``inline_bytes`` (cut-through: one chunk, several)."""


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_puts_right_after_the_mesh_converges(tmp_path: Path, round_: int) -> None:
    lm = LocalMesh(tmp_path / "mesh", 4, regions=["eu", "us"], http=False)
    lm.start()
    try:
        lm.wait_converged(60)
        refs = []
        for n in lm.nodes:
            with meshscale.connect(n.address, bundle=lm.bundle_path) as m:
                for size in SIZES:
                    data = os.urandom(size)
                    refs.append((m.put(data, replicas=3, w=2), data))
        reader = lm.nodes[-1]
        with meshscale.connect(reader.address, bundle=lm.bundle_path) as m:
            for ref, data in refs:
                assert m.get(ref) == data
    finally:
        lm.stop()
