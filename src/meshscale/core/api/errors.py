"""The error codes of the RPC contract, shared by the node and the client.

Every failed RPC answer carries an ``ErrorCode`` beside its human message
(``core.rpc.RpcResponse.code``), and code on either side decides on the code, never on
the message's text: a node raises ``ApiError(code, message)`` (a ``ValueError``, so the
existing "a handler's ``ValueError`` is the caller's error" rule still holds); the
client's ``RemoteError`` carries the code back. An answer from a handler that raised a
plain ``ValueError``, ``TypeError`` or ``KeyError`` has the code ``invalid``; an
unexpected exception ``internal`` (the node logs it, rate-limited).

An answer that fails to validate against its method's request struct
(``core/api/contract.py``) is ``invalid`` too, naming the field.
"""

from __future__ import annotations

import enum

__all__ = ["ApiError", "ErrorCode", "code_of"]


class ErrorCode(enum.StrEnum):
    INVALID = "invalid"
    """The request is malformed or breaks a limit; the message names what."""
    NOT_FOUND = "not_found"
    """The object, task, key or operator named does not exist (or no live node has it)."""
    UNKNOWN_METHOD = "unknown_method"
    """The node does not serve the method (an older version, or a node without the
    plane that serves it)."""
    UNAUTHORIZED = "unauthorized"
    """Wrong token, or the caller's role may not call the method."""
    STARTING = "starting"
    """The node is still starting: try again shortly."""
    BUSY = "busy"
    """Too many requests in flight at the node: try again shortly."""
    BACKPRESSURE = "backpressure"
    """A stream shard is full (a slow operator): the producer waits and tries again."""
    NEED_FUNCTION = "need_function"
    """A task's function is not cached at the node: send its bytes."""
    REFUSED = "refused"
    """A rule (residency, placement, labels, resources) allows no node: the message
    names the rule."""
    DISK_FULL = "disk_full"
    """Not enough free space above the node's disk reserve."""
    UNAVAILABLE = "unavailable"
    """Not enough replicas answered for the consistency or durability asked for."""
    CONFLICT = "conflict"
    """A conditional KV put found another version than the one it named (``kv_conflict``,
    ``core.kv.cas_allows``): read the key again."""
    REMOVED = "removed"
    """The calling node was removed from the mesh."""
    INTERNAL = "internal"
    """The node failed in a way it did not expect (its log has the detail)."""


class ApiError(ValueError):
    """A failed request, with its ``ErrorCode``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def code_of(exc: BaseException) -> ErrorCode:
    """The code an answer carries for a handler that raised ``exc``."""
    if isinstance(exc, ApiError):
        return exc.code
    if isinstance(exc, ValueError | TypeError | KeyError):
        return ErrorCode.INVALID
    return ErrorCode.INTERNAL
