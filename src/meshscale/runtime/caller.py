"""Who made the RPC being handled: the name and role in the peer's certificate.

The agent sets it (``NodeAgent``) around each RPC handler it calls, so a handler that
needs the caller's identity (``task.submit`` records the task's submitter, for the
workers' fair share in ``core/scheduling.py``) reads it here instead of every handler
growing a parameter. A context variable: each connection is served by its own task, and
the handler's awaits keep its value. Outside an RPC (a plane calling its own handler) it
is None.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from meshscale.trust.certs import Peer, Role

current: ContextVar[Peer | None] = ContextVar("meshscale_rpc_caller", default=None)


def submitter() -> str:
    """The identity a task submitted in this RPC is counted under: the certificate's name
    (its subject CN, unique per client bundle); "" outside an RPC."""
    who = current.get()
    return "" if who is None else who.name


def node_region(members: Mapping[str, Any]) -> str | None:
    """The region of the node that made the RPC being served, from ``members`` (the
    membership view); None for a client, an unknown node or no RPC."""
    who = current.get()
    if who is None or who.role is not Role.NODE:
        return None
    m = members.get(who.name)
    return None if m is None else str(m.meta.region)
