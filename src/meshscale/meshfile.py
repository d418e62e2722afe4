"""``mesh.json``: what ``meshscale up`` writes beside a local mesh, so that every client
command can take ``--mesh DIR/mesh.json`` (or ``MESHSCALE_MESH``) in place of
``--node HOST:PORT`` and ``--bundle DIR``.

    {"bundle": CLIENT_BUNDLE, "admin_bundle": ADMIN_BUNDLE, "temporary": bool,
     "nodes": [{"name", "address", "http", "pid", "data_dir", "bundle", "config", ...}, ...]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MESH_ENV = "MESHSCALE_MESH"
BUNDLE_ENV = "MESHSCALE_BUNDLE"
DEFAULT_NODE = "127.0.0.1:7946"
"""Where a client goes when neither a node nor a mesh.json is named."""
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


@dataclass(frozen=True)
class Target:
    """Where a client goes (addresses tried in order) and the bundle it goes with."""

    addresses: list[str]
    bundle: Path
    mesh: MeshFile | None = None


def resolve_target(
    node: str | None = None,
    mesh: Path | None = None,
    bundle: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    missing_bundle: str = f"no bundle: name one, or set {BUNDLE_ENV} or {MESH_ENV}",
) -> Target:
    """The one resolution every client uses (the CLI's ``--node``/``--mesh``/``--bundle``,
    the ``meshscale://`` filesystem's options): ``node`` over ``mesh``'s nodes over
    ``DEFAULT_NODE``; ``bundle`` over ``mesh``'s client bundle. ``mesh`` and ``bundle``
    left None are read from ``environ`` (default ``os.environ``: ``MESHSCALE_MESH``,
    ``MESHSCALE_BUNDLE``); pass ``{}`` when the caller read them already.
    ``MeshFileError`` (a one-line message) if no bundle results or the mesh.json is
    unusable."""
    env = os.environ if environ is None else environ
    if mesh is None and env.get(MESH_ENV):
        mesh = Path(env[MESH_ENV])
    if bundle is None and env.get(BUNDLE_ENV):
        bundle = Path(env[BUNDLE_ENV])
    mf = None if mesh is None else read_mesh_file(Path(mesh).expanduser())
    if node is not None:
        addresses = [node]
    elif mf is not None:
        addresses = mf.addresses
    else:
        addresses = [DEFAULT_NODE]
    chosen = bundle if bundle is not None else (mf.bundle if mf is not None else None)
    if chosen is None:
        raise MeshFileError(missing_bundle)
    return Target(addresses, Path(chosen).expanduser(), mf)
