"""``meshscale.dask.cluster(mesh, ...)``: Dask workers run as mesh tasks; the code is in
``meshscale.client.dask`` (the client layer), named here as issue 20 spells it."""

from meshscale.client.dask import DaskClusterError, MeshDaskCluster, cluster, serve_worker

__all__ = ["DaskClusterError", "MeshDaskCluster", "cluster", "serve_worker"]
