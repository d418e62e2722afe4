"""Batch work over objects that must stay in one region: ``mesh.map`` with a residency rule.

Run it against a local mesh (two of its three nodes are in eu-west):

    .venv/bin/meshscale up --nodes 3 --regions eu-west,us-east --base-port 0 --dir /tmp/mesh
    # in another terminal, once `up` printed the members table:
    .venv/bin/python examples/batch_residency.py /tmp/mesh/mesh.json

or give a node's address and the cluster bundle directly:

    .venv/bin/python examples/batch_residency.py 127.0.0.1:PORT /tmp/mesh/client

What it does: stores a few "patient records" with ``residency=["eu-west"]`` (their copies
may live only on eu-west nodes), runs a function over them with ``mesh.map`` (each task
runs where its input is, so inside eu-west), prints each result and the node it ran on,
then asks for the same function to run in us-east and shows the mesh refusing it, with
the rule named. Exits 0 when all of that happened as described.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import meshscale

REGION = "eu-west"


def address_and_bundle(argv: list[str]) -> tuple[str, str]:
    """``MESH_JSON`` (``meshscale up --dir``'s mesh.json) or ``ADDRESS BUNDLE_DIR``."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        info = json.loads(Path(argv[0]).read_text())
        return info["nodes"][0]["address"], info["bundle"]
    if len(argv) == 2:
        return argv[0], argv[1]
    sys.exit(f"usage: {sys.argv[0]} MESH_JSON | ADDRESS BUNDLE_DIR")


def make_records(seed: int, n: int) -> bytes:
    """CSV lines ``patient,age,systolic_bp`` (generated here, nothing to download)."""
    rng = random.Random(seed)
    rows = [f"p{seed}-{i},{rng.randint(20, 90)},{rng.gauss(128, 18):.0f}" for i in range(n)]
    return "\n".join(rows).encode()


@meshscale.task(cpus=1)
def summarise(blob: bytes) -> dict[str, float]:
    """Runs on a node that holds ``blob``: a count and the share with high blood pressure."""
    rows = [line.split(",") for line in blob.decode().splitlines()]
    high = sum(1 for _, _, bp in rows if float(bp) >= 140)
    return {"patients": len(rows), "high_bp_share": round(high / len(rows), 3)}


def main(argv: list[str]) -> int:
    address, bundle = address_and_bundle(argv)
    with meshscale.connect(address, bundle=bundle) as mesh:
        members = {m["name"]: m["region"] for m in mesh.members()}
        print(f"mesh: {len(members)} nodes, "
              f"{sum(r == REGION for r in members.values())} in {REGION}")

        # 1. store the objects; their copies may only live in eu-west
        refs = [mesh.put(make_records(seed, 500), replicas=2, w=2, residency=[REGION])
                for seed in range(6)]
        for ref in refs:
            holders = mesh.stat(ref).holders
            print(f"stored {ref.id[:16]}.. ({ref.size} bytes) on {', '.join(holders)}")

        # 2. one task per object; each runs where its object is
        futures = mesh.map(summarise, refs)
        results = [f.result(timeout=60) for f in futures]
        where = {row["task_id"]: row for row in mesh.tasks(limit=100)}
        wrong = 0
        for ref, fut, result in zip(refs, futures, results, strict=True):
            row = where.get(fut.task_id, {})
            node = row.get("node") or fut.node
            region = members.get(node or "", "?")
            wrong += region != REGION
            why = str(row.get("reason", "")).partition(": ")[2]  # the placement's cost terms
            print(f"{ref.id[:16]}.. -> {result}  ran on {node} ({region})  {why}")
        total = sum(r["patients"] for r in results)
        print(f"map: {len(results)} tasks, {total} patients, all in {REGION}: {wrong == 0}")

        # 3. the same work asked to run in us-east: refused at submit, the rule named
        outside = summarise.options(residency=["us-east"])
        try:
            mesh.submit(outside, refs[0]).result(timeout=60)
        except meshscale.TaskSubmitError as e:
            print(f"asked to run in us-east, refused: {e}")
            refused = "residency" in str(e)
        else:
            print("NOT refused: a task ran outside the residency rule")
            refused = False
    return 0 if wrong == 0 and refused else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
