"""meshscale: a decentralized compute mesh.

``meshscale.connect(address)`` returns a ``Mesh`` (see ``meshscale.client``). The client
is imported on first use, so ``import meshscale`` (and the node agent) stay light.
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
        connect,
        connect_async,
    )

__version__ = "0.1.0"

__all__ = [
    "AsyncMesh",
    "IntegrityError",
    "Mesh",
    "MeshError",
    "ObjectRef",
    "__version__",
    "connect",
    "connect_async",
]


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        from meshscale.client import mesh

        return getattr(mesh, name)
    raise AttributeError(f"module 'meshscale' has no attribute {name!r}")
