"""The RPC contract shared by the node and every caller: one ``Method`` per RPC, with its
request struct and reply type (``contract.py``), grouped by the plane that serves it
(``node``, ``objects``, ``tasks``, ``streams``, ``audit``, ``policy``,
``services``, ``erasure``), and the error code every failed answer
carries (``errors.py``). ``core/access.py`` says who may call each method; a test checks
that both name the same methods."""

from __future__ import annotations

from typing import Any

from meshscale.core.api import audit, erasure, node, objects, policy, services, streams, tasks
from meshscale.core.api.contract import (
    Empty,
    Method,
    Request,
    ResidencyWire,
    parse_reply,
    parse_request,
    reply_builtins,
    request_args,
    residency_of,
)
from meshscale.core.api.errors import ApiError, ErrorCode, code_of

__all__ = ["METHODS", "ApiError", "Empty", "ErrorCode", "Method", "Request", "ResidencyWire",
           "code_of", "parse_reply", "parse_request", "reply_builtins", "request_args",
           "residency_of"]

METHODS: dict[str, Method[Any, Any]] = {
    m.name: m for group in (node, objects, tasks, streams, audit, policy, services, erasure)
    for m in group.METHODS}
"""Every typed method, by wire name."""
assert len(METHODS) == sum(len(g.METHODS) for g in (node, objects, tasks, streams, audit, policy,
                                                    services, erasure)), \
    "a method defined twice"
