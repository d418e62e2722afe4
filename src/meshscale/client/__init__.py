"""What users import: ``connect`` to a mesh, then put/get objects and use the KV space.

The client talks to nodes only over the wire (``rpc.py``); it never imports the runtime.
"""

from meshscale.client.mesh import (
    KV,
    AsyncKV,
    AsyncMesh,
    ConnectError,
    Consistency,
    IntegrityError,
    Mesh,
    MeshError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectRef,
    connect,
    connect_async,
    object_id,
)

__all__ = [
    "KV",
    "AsyncKV",
    "AsyncMesh",
    "ConnectError",
    "Consistency",
    "IntegrityError",
    "Mesh",
    "MeshError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectRef",
    "connect",
    "connect_async",
    "object_id",
]
