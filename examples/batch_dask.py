"""A nightly sales aggregation with ``dask.dataframe`` on the mesh, inside residency rules.

Run it against a local mesh (any mesh with two regions or more; with three, the sales
stay in the two that are not the central one):

    .venv/bin/meshscale up --nodes 5 --regions cloud,eu-west,us-east --base-port 0 --dir /tmp/mesh
    # in another terminal, once `up` printed the members table:
    .venv/bin/python examples/batch_dask.py /tmp/mesh/mesh.json

or give a node's address and the cluster bundle directly:

    .venv/bin/python examples/batch_dask.py 127.0.0.1:PORT /tmp/mesh/client

What it does:

1. Sets a data-class policy per sales region (``sales-<region>``: copies only in that
   region) and writes a day of sales as parquet files through ``meshscale://`` under
   those classes.
2. The naive plan: one Dask cluster in the mesh's central region declaring every sales
   file as its input. It is refused before any worker starts, naming the residency rule
   (the class's regions) and the inputs it keeps out.
3. The plan that works: in each sales region, a Dask cluster whose workers the mesh
   places on the holders of that region's files pre-aggregates them (totals and counts
   by product), and a Dask task on a worker there writes the partial result back as a
   mesh object (an aggregate, with no residency rule). Then a cluster in the central
   region combines the partials and writes the night's totals as
   ``meshscale://nightly/<day>/totals.parquet``.
4. Reads the same files with plain pandas here and checks the totals are the same.

Exits 0 when the naive plan was refused and the totals match.

Dask workers are mesh tasks and run as the nodes' worker user (``nobody`` when the nodes
run as root): the example copies the client bundle to a temporary directory that user
owns (deleted at the end), for the workers' ``meshscale://`` reads and writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed
import pandas as pd

import meshscale
import meshscale.client.fs  # registers meshscale://
from meshscale.dask import DaskClusterError, central_region, cluster

DAY = "2026-12-06"
FILES_PER_REGION = 3
ROWS_PER_FILE = 4000
PRODUCTS = ["bread", "coffee", "milk", "tea", "cheese", "apples"]


def address_and_bundle(argv: list[str]) -> tuple[str, str]:
    """``MESH_JSON`` (``meshscale up --dir``'s mesh.json) or ``ADDRESS BUNDLE_DIR``."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        info = json.loads(Path(argv[0]).read_text())
        return info["nodes"][0]["address"], info["bundle"]
    if len(argv) == 2:
        return argv[0], argv[1]
    sys.exit(f"usage: {sys.argv[0]} MESH_JSON | ADDRESS BUNDLE_DIR")


@contextlib.contextmanager
def worker_bundle(bundle: str) -> Iterator[str]:
    """A copy of the client bundle the nodes' worker user can read (the bundle itself
    when the nodes run task code as this user)."""
    if os.geteuid() != 0:
        yield bundle
        return
    top = Path(tempfile.mkdtemp(prefix="meshscale-dask-example-"))
    try:
        os.chmod(top, 0o711)
        out = top / "client"
        shutil.copytree(bundle, out)
        nobody = pwd.getpwnam("nobody")
        for p in [out, *out.iterdir()]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
        yield str(out)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def sales_day(rng: random.Random, region: str, n: int) -> pd.DataFrame:
    """One shop's till rows (generated here, nothing to download)."""
    return pd.DataFrame({
        "region": region,
        "product": [rng.choice(PRODUCTS) for _ in range(n)],
        "quantity": [rng.randint(1, 5) for _ in range(n)],
        "amount_cents": [rng.randint(50, 5000) for _ in range(n)],
    })


def pre_aggregate(ddf: Any) -> Any:
    """Totals and row counts by product: what may leave a region."""
    return ddf.groupby("product").agg({"quantity": "sum", "amount_cents": ["sum", "count"]})


def flatten(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df.columns = ["quantity", "amount_cents", "rows"]
    return df.reset_index()


def write_parquet(df: pd.DataFrame, path: str, storage_options: dict[str, Any]) -> str:
    """Runs as a Dask task on a worker: writes ``df`` to the mesh."""
    df.to_parquet(path, storage_options=storage_options, index=False)
    return path


def main(argv: list[str]) -> int:
    address, bundle = address_and_bundle(argv)
    opts = {"address": address, "bundle": bundle}
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    with meshscale.connect(address, bundle=bundle) as mesh, worker_bundle(bundle) as wb:
        wopts = {"address": address, "bundle": wb}
        live = [m for m in mesh.members() if m["state"] == "alive"]
        per_region: dict[str, int] = {}
        for m in live:
            per_region[m["region"]] = per_region.get(m["region"], 0) + 1
        central = central_region(mesh)
        others = sorted(r for r in per_region if r != central)
        sales_regions = others if len(others) >= 2 else sorted(per_region)
        print(f"mesh: {len(live)} nodes in {', '.join(sorted(per_region))}; central region "
              f"{central}; sales in {', '.join(sales_regions)}")
        if len(sales_regions) < 2:
            print("this example needs a mesh with two regions or more")
            return 2

        # 1. a day of sales per region, under a class that keeps it there
        frames = []
        for region in sales_regions:
            copies = min(2, per_region[region])
            mesh.policies.set(f"sales-{region}", [region], replicas=copies)
            print(f"policy sales-{region}: copies only in {region}, {copies} of them")
            for i in range(FILES_PER_REGION):
                df = sales_day(rng, region, ROWS_PER_FILE)
                path = f"meshscale://sales/{DAY}/{region}/shop-{i}.parquet"
                df.to_parquet(path, index=False, storage_options={
                    **opts, "replicas": copies, "data_class": f"sales-{region}"})
                holders = meshscale.client.fs.MeshFileSystem(**opts).info(path)["holders"]
                print(f"stored {path} ({len(df)} rows) on {', '.join(holders)}")
                frames.append(df)

        # 2. the naive plan: every region's rows read in the central region
        try:
            with cluster(mesh, region="central", workers=1, storage_options=wopts,
                         inputs=[f"meshscale://sales/{DAY}/"]):
                pass
        except DaskClusterError as e:
            print(f"naive plan (read every region's sales in {central}) refused: {e}")
            refused = "residency" in str(e)
        else:
            print("NOT refused: restricted sales would have been read centrally")
            refused = False

        # 3a. pre-aggregate inside each region, on the holders of its files
        partials = []
        for region in sales_regions:
            inputs = f"meshscale://sales/{DAY}/{region}/"
            with cluster(mesh, region=region, workers=1, storage_options=wopts,
                         inputs=[inputs]) as c, distributed.Client(c) as client:
                nodes = sorted(set(c.worker_nodes().values()))
                part = flatten(pre_aggregate(c.read_parquet(inputs)).compute())
                out = f"meshscale://nightly/{DAY}/partial-{region}.parquet"
                client.submit(write_parquet, part, out, wopts, pure=False).result()
                print(f"{region}: pre-aggregated {FILES_PER_REGION} files on "
                      f"{', '.join(nodes)} into {out} ({len(part)} rows)")
                partials.append(out)

        # 3b. combine the partials in the central region; the result back on the mesh
        with cluster(mesh, region="central", workers=1, storage_options=wopts,
                     inputs=partials) as c, distributed.Client(c) as client:
            nodes = sorted(set(c.worker_nodes().values()))
            totals = (c.read_parquet(partials).groupby("product")
                      [["quantity", "amount_cents", "rows"]].sum().compute().sort_index())
            result = f"meshscale://nightly/{DAY}/totals.parquet"
            client.submit(write_parquet, totals.reset_index(), result, wopts,
                          pure=False).result()
        info = meshscale.client.fs.MeshFileSystem(**opts).info(result)
        print(f"central ({central}): combined {len(partials)} partials on "
              f"{', '.join(nodes)}; wrote {result} = {info['id']}")
        back = pd.read_parquet(result, storage_options=opts).set_index("product").sort_index()
        print(back.to_string())

        # 4. the same totals from plain pandas on the same files
        everything = pd.concat(frames, ignore_index=True)
        want = everything.groupby("product").agg(
            quantity=("quantity", "sum"), amount_cents=("amount_cents", "sum"),
            rows=("amount_cents", "count")).sort_index()
        same = (back[["quantity", "amount_cents", "rows"]].astype("int64")
                .equals(want.astype("int64")))
        print(f"totals equal plain pandas on the same files: {same} "
              f"({int(want['rows'].sum())} rows)")
    return 0 if refused and same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
