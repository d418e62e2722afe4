"""What users import: ``connect`` to a mesh, then put/get objects, use the KV space and
run tasks (``@task``, ``mesh.submit``, ``mesh.map``; see ``tasks.py``).

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
    object_id,
)
from meshscale.client.services import Service, ServiceCallError
from meshscale.client.tasks import (
    AsyncTaskMesh,
    Future,
    TaskCancelledError,
    TaskError,
    TaskFunction,
    TaskMesh,
    TaskSubmitError,
    as_completed,
    connect,
    connect_async,
    default_mesh,
    task,
)

__all__ = [
    "KV",
    "AsyncKV",
    "AsyncMesh",
    "AsyncTaskMesh",
    "ConnectError",
    "Consistency",
    "Future",
    "IntegrityError",
    "Mesh",
    "MeshError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectRef",
    "Service",
    "ServiceCallError",
    "TaskCancelledError",
    "TaskError",
    "TaskFunction",
    "TaskMesh",
    "TaskSubmitError",
    "as_completed",
    "connect",
    "connect_async",
    "default_mesh",
    "object_id",
    "task",
]
