"""``mesh.json``: what ``meshscale up`` writes beside a local mesh, so that every client
command can take ``--mesh DIR/mesh.json`` (or ``MESHSCALE_MESH``) in place of
``--node HOST:PORT`` and ``--bundle DIR``.

    {"bundle": CLIENT_BUNDLE, "admin_bundle": ADMIN_BUNDLE, "temporary": bool,
     "nodes": [{"name", "address", "http", "pid", "data_dir", "bundle", ...}, ...]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MESH_ENV = "MESHSCALE_MESH"
MAX_MESH_JSON_BYTES = 4 * 1024 * 1024


class MeshFileError(ValueError):
    """A mesh.json that cannot be used; the message is one line and names the file."""


@dataclass(frozen=True)
class MeshFile:
    path: Path
    bundle: Path | None
    admin_bundle: Path | None
    temporary: bool
    nodes: list[dict[str, Any]]

    @property
    def addresses(self) -> list[str]:
        """Every node's gossip/RPC address, in the file's order."""
        return [str(n["address"]) for n in self.nodes]

    @property
    def http_addresses(self) -> list[str]:
        return [str(n["http"]) for n in self.nodes if n.get("http")]

    @property
    def directory(self) -> Path:
        return self.path.parent


def read_mesh_file(path: Path) -> MeshFile:
    """Parse ``path``; ``MeshFileError`` if it is not a usable mesh.json."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MESH_JSON_BYTES + 1)
        if len(raw) > MAX_MESH_JSON_BYTES:
            raise ValueError(f"larger than {MAX_MESH_JSON_BYTES} bytes")
        data = json.loads(raw)
        nodes = data["nodes"]
        if not isinstance(nodes, list) or not nodes:
            raise ValueError("no nodes")
        for n in nodes:
            if not isinstance(n, dict) or not isinstance(n.get("address"), str):
                raise ValueError("a node without an address")
        bundle = Path(data["bundle"]) if data.get("bundle") else None
        admin = Path(data["admin_bundle"]) if data.get("admin_bundle") else None
    except OSError as e:
        raise MeshFileError(f"--mesh {path}: cannot read: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise MeshFileError(f"--mesh {path}: not a mesh.json written by `meshscale up` ({e})"
                            ) from None
    return MeshFile(path, bundle, admin, bool(data.get("temporary")), nodes)
