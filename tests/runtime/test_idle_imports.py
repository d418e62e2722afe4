"""An idle node does not load what only a request needs (issue #19: the agent's memory).

A real two-node mesh; node 1 runs the agent's own entry point
(``python -m meshscale.runtime.agent_main --config FILE``) under a small wrapper that
writes the process's ``sys.modules`` to a file when the test asks. Once the mesh has
converged (and so every plane serves), the heavy libraries below must not be loaded; after
one HTTP request and one metrics scrape, the HTTP application and prometheus_client must
be (the lazy path works, and the check can see a module that is loaded)."""

from __future__ import annotations

import http.client
import os
import sys
from pathlib import Path

from meshscale.runtime.launcher import LocalMesh, node_command, spawn_node
from meshscale.runtime.power import tree_pids
from waiting import wait_for

NEVER_WHILE_IDLE = (
    # loaded on the first HTTP connection (runtime/http.py -> runtime/http_app.py)
    "aiohttp", "prometheus_client", "meshscale.runtime.http_app",
    "meshscale.runtime.metrics",
    # loaded when a task's function or arguments are pickled
    "cloudpickle",
    # loaded when a task runs (runtime/compute.py pickles its call's arguments)
    "pickle",
    # never a node's: the CLI framework, the client's data libraries
    "typer", "click", "rich", "pydantic", "numpy", "pandas", "pyarrow", "fsspec", "dask",
    "jinja2", "meshscale.client",
)

if tree_pids(os.getpid()) is not None:
    # psutil only where /proc/PID/task/TID/children is missing (runtime/power.py)
    NEVER_WHILE_IDLE += ("psutil",)

WRAPPER = """
import os, runpy, sys, threading, time
asks, config = sys.argv[1], sys.argv[2]
def answer():
    n = 0
    while True:
        if os.path.exists(f"{asks}.{n}"):
            tmp = f"{asks}.{n}.modules.tmp"
            with open(tmp, "w") as f:
                f.write("\\n".join(sorted(sys.modules)))
            os.replace(tmp, f"{asks}.{n}.modules")
            n += 1
        time.sleep(0.05)
threading.Thread(target=answer, daemon=True).start()
sys.argv = ["agent_main", "--config", config]
runpy.run_module("meshscale.runtime.agent_main", run_name="__main__", alter_sys=True)
"""


def loaded(asks: Path, n: int) -> set[str]:
    """Ask the wrapped node for its modules (the ``n``-th question) and wait for them."""
    (asks.parent / f"{asks.name}.{n}").touch()
    answer = asks.parent / f"{asks.name}.{n}.modules"
    wait_for(answer.exists, 60, f"node 1's module list #{n}")
    return set(answer.read_text().split())


def heavy(modules: set[str]) -> list[str]:
    """The names of ``NEVER_WHILE_IDLE`` that are loaded (a package is in ``sys.modules``
    whenever one of its submodules is)."""
    return sorted(m for m in NEVER_WHILE_IDLE if m in modules)


def get(addr: str, path: str, token: str | None = None) -> tuple[int, bytes]:
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", path,
                     headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_idle_node_loads_no_heavy_module_until_a_request_needs_it(tmp_path: Path) -> None:
    mesh = LocalMesh(tmp_path / "mesh", 2)
    mesh.make_bundles()
    seed = mesh.nodes[0].address
    first, wrapped = mesh.nodes
    first.proc = spawn_node(node_command(first, [], "", mesh.node_settings),
                            tmp_path / "node-0.log")
    cmd = node_command(wrapped, [seed], "", mesh.node_settings)
    assert cmd[1:3] == ["-m", "meshscale.runtime.agent_main"] and cmd[3] == "--config"
    asks = tmp_path / "ask"
    wrapped.proc = spawn_node([sys.executable, "-c", WRAPPER, str(asks), cmd[4]],
                              tmp_path / "node-1.log")
    try:
        mesh.wait_converged(120)
        idle = loaded(asks, 0)
        assert "meshscale.runtime.node" in idle  # the list is the agent's
        assert heavy(idle) == [], f"an idle node imported {heavy(idle)}"

        addr = wrapped.http
        assert addr is not None
        status, body = get(addr, "/api/v1/openapi.json")
        assert status == 200 and b'"openapi"' in body
        token = (mesh.bundle_path / "token").read_text().strip()
        status, body = get(addr, "/metrics", token)
        assert status == 200 and b"meshscale_members" in body
        served = loaded(asks, 1)
        assert {"aiohttp", "prometheus_client", "meshscale.runtime.http_app"} <= served
        assert "cloudpickle" not in served
    finally:
        mesh.stop()
