"""``meshscale.dask.cluster(mesh, ...)``: Dask workers run as mesh tasks; the code is in
``meshscale.client.dask`` (the client layer), named here as issue 20 spells it."""

from meshscale.client.dask import (
    CENTRAL,
    DaskClusterError,
    MeshDaskCluster,
    central_region,
    cluster,
    serve_worker,
)

__all__ = ["CENTRAL", "DaskClusterError", "MeshDaskCluster", "central_region", "cluster",
           "serve_worker"]
