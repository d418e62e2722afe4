"""KV hinted handoff on real node processes (``core.kv.KVHints``, driven by
``runtime/data/kv.py``): every replica of a key is killed, a QUORUM write is taken by the
two stand-ins left, the replicas restart from their data dirs, and then the replicas
alone (asked directly, and by a read at ALL, which asks only them) hold the write; the
stand-ins' hints are gone. The simulator checks the same decision under chaos
(``tests/sim/test_dataplane.py``)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
from runtime_mesh import call_node, wait_for_async

from meshscale.client.rpc import RpcError
from meshscale.core.kv import kv_replicas
from meshscale.core.placement import Candidate
from meshscale.runtime.launcher import LocalMesh, NodeProcess, node_command, spawn_node

pytestmark = pytest.mark.timeout(180)

KEY = "dataset/latest"


async def call(node: NodeProcess, creds: Any, method: str, args: dict[str, Any]) -> Any:
    return await call_node(node.address, creds, method, args)


def test_a_write_taken_by_stand_ins_reaches_the_replicas_when_they_return(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, 5, regions=["eu-west", "us-east", "ap-south"], http=False) as mesh:
        view = [Candidate(n.name, n.region, n.zone) for n in mesh.nodes]
        home = set(kv_replicas(KEY, view))
        replicas = [n for n in mesh.nodes if n.name in home]
        stand_ins = [n for n in mesh.nodes if n.name not in home]
        assert len(replicas) == 3 and len(stand_ins) == 2
        creds = mesh.credentials()
        node_creds = mesh.node_credentials(mesh.nodes.index(stand_ins[0]))

        async def states(node: NodeProcess) -> dict[str, str]:
            return {m["name"]: m["state"] for m in await call(node, creds, "members", {})}

        async def go() -> None:
            put = {"key": KEY, "consistency": "quorum"}
            await call(stand_ins[0], creds, "kv.put", {**put, "value": b"v1"})
            for n in replicas:
                assert n.proc is not None
                n.proc.send_signal(signal.SIGKILL)
                n.proc.wait()

            async def replicas_dead() -> bool:
                for s in stand_ins:
                    seen = await states(s)
                    if any(seen.get(r.name) != "dead" for r in replicas):
                        return False
                return True

            await wait_for_async(replicas_dead, 60, "the stand-ins to see the replicas dead",
                                 poll=0.5)
            # A QUORUM of the write set over the two nodes left: both stand-ins take it,
            # each with a hint for the three replicas.
            await call(stand_ins[1], creds, "kv.put", {**put, "value": b"v2"})
            for s in stand_ins:
                assert (await call(s, creds, "dp.stats", {}))["kv_hints"]["keys"] == 1
            for n in replicas:
                n.proc = spawn_node(node_command(n, [s.address for s in stand_ins]),
                                    n.data_dir.parent / f"{n.name}-back.log")

            async def handed_off() -> bool:
                for n in replicas:
                    got = await call(n, node_creds, "kv.read", {"key": KEY})
                    if got is None or got["value"] != b"v2":
                        return False
                return True

            await wait_for_async(handed_off, 60, "every replica to hold v2", poll=0.5,
                                 retry=(RpcError, OSError))
            got = await call(replicas[0], creds, "kv.get", {"key": KEY, "consistency": "all"})
            assert got["value"] == b"v2"

            async def hints_gone() -> bool:
                for s in stand_ins:
                    if (await call(s, creds, "dp.stats", {}))["kv_hints"]["keys"]:
                        return False
                return True

            await wait_for_async(hints_gone, 10, "the stand-ins to drop their hints")

        asyncio.run(go())
