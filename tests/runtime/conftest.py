"""Fixtures shared by the real-mesh tests: a module that defines a ``mesh`` fixture (a
started ``LocalMesh``) gets ``client``, a task client connected to its first node."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshscale.client.tasks import TaskMesh, connect
from meshscale.runtime.launcher import LocalMesh


@pytest.fixture(scope="module")
def client(mesh: LocalMesh) -> Iterator[TaskMesh]:
    c = connect(mesh.nodes[0].address, bundle=mesh.bundle_path)
    try:
        yield c
    finally:
        c.close()
