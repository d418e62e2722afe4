"""meshscale: a decentralized compute mesh.

``meshscale.connect(address)`` returns a ``Mesh`` with tasks (see ``meshscale.client``);
``@meshscale.task`` makes a function submittable, ``@meshscale.service(...)`` a class
deployable (``mesh.deploy``). The client is imported on first use, so
``import meshscale`` (and the node agent) stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshscale.client.mesh import (
        AsyncMesh,
        IntegrityError,
        Mesh,
        MeshError,
        ObjectRef,
        UnderReplicatedWarning,
    )
    from meshscale.client.services import service
    from meshscale.client.streams import Record, Region, Regions
    from meshscale.client.tasks import (
        ALL_COMPLETED,
        FIRST_COMPLETED,
        FIRST_EXCEPTION,
        Future,
        TaskError,
        TaskSubmitError,
        as_completed,
        connect,
        connect_async,
        gather,
        task,
        wait,
    )

__version__ = "0.1.0"

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "AsyncMesh",
    "Future",
    "IntegrityError",
    "Mesh",
    "MeshError",
    "ObjectRef",
    "Record",
    "Region",
    "Regions",
    "TaskError",
    "TaskSubmitError",
    "UnderReplicatedWarning",
    "__version__",
    "as_completed",
    "connect",
    "connect_async",
    "gather",
    "service",
    "task",
    "wait",
]

_FROM_TASKS = frozenset({"ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "Future",
                         "TaskError", "TaskSubmitError", "as_completed", "connect",
                         "connect_async", "gather", "task", "wait"})


def __getattr__(name: str) -> Any:
    if name == "service":
        from meshscale.client import services

        return services.service
    if name in ("Record", "Region", "Regions"):
        from meshscale.client import streams

        return getattr(streams, name)
    if name in _FROM_TASKS:
        from meshscale.client import tasks

        return getattr(tasks, name)
    if name in __all__ and name != "__version__":
        from meshscale.client import mesh

        return getattr(mesh, name)
    raise AttributeError(f"module 'meshscale' has no attribute {name!r}")
