"""A node's data directory: who it is.

    identity.json   {"name", "incarnation", "created"}             0600

The certificate a node presents is in its node bundle (``trust/bundle.py``), not here. A
restarted node keeps its name and starts at the stored incarnation + 1, written durably
(fsync, atomic rename) before it joins, so it always outbids its former life.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from meshscale.trust.bundle import NODE_NAME_RE, write_private

IDENTITY_JSON = "identity.json"
MAX_IDENTITY_BYTES = 64 * 1024


class IdentityError(Exception):
    """The data directory cannot be used; the message is one line."""


@dataclass(frozen=True)
class Identity:
    name: str
    incarnation: int
    created: str


def read_identity(data_dir: Path) -> Identity | None:
    path = Path(data_dir) / IDENTITY_JSON
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_IDENTITY_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise IdentityError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = json.loads(raw)
        name, inc, created = data["name"], data["incarnation"], data.get("created", "")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise IdentityError(f"{path}: not a valid identity file") from None
    if not isinstance(name, str) or not NODE_NAME_RE.match(name):
        raise IdentityError(f"{path}: invalid node name")
    if not isinstance(inc, int) or isinstance(inc, bool) or not 0 <= inc < 2**62:
        raise IdentityError(f"{path}: invalid incarnation")
    return Identity(name, inc, str(created))


def write_identity(data_dir: Path, identity: Identity) -> None:
    data = {"name": identity.name, "incarnation": identity.incarnation, "created": identity.created}
    try:
        write_private(Path(data_dir) / IDENTITY_JSON, (json.dumps(data) + "\n").encode())
    except OSError as e:
        raise IdentityError(f"{data_dir}: cannot write identity: {e.strerror or e}") from None


def start_identity(data_dir: Path, name: str | None) -> Identity:
    """Load (or create) the identity for a starting node and persist the bumped
    incarnation before it is used."""
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise IdentityError(f"{data_dir}: cannot create data dir: {e.strerror or e}") from None
    stored = read_identity(data_dir)
    if stored is None:
        if name is None:
            raise IdentityError(f"{data_dir}: no stored identity; give the node a --name")
        if not NODE_NAME_RE.match(name):
            raise IdentityError(
                f"invalid node name {name!r}: use 1-63 letters, digits, '.', '_' or '-'"
            )
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        identity = Identity(name, 1, created)
    else:
        if name is not None and name != stored.name:
            raise IdentityError(
                f"{data_dir} belongs to node {stored.name!r}, not {name!r}; "
                "use another --data-dir or drop --name"
            )
        identity = Identity(stored.name, stored.incarnation + 1, stored.created)
    write_identity(data_dir, identity)
    return identity
