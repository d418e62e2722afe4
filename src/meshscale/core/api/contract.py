"""What a typed RPC method is: a name, a request struct and a reply type.

Every method a node serves is a ``Method`` constant in one of ``core/api``'s modules
(``node``, ``objects``, ``tasks``, ``streams``), shared by the node that serves it and by
every caller (clients and other nodes). On the wire a request's arguments are a map and a
reply any msgpack value (``core/rpc.py``): a caller sends ``request_args(req)``; the node
checks the map against the request struct (``parse_request``: unknown fields, wrong
types and broken limits are ``invalid``, naming the field) before its handler sees it; a
caller checks the reply (``parse_reply``) against the reply type. Nothing in between reads
a ``dict`` by hand.

Requests forbid unknown fields: a mesh runs one wire version (``core/wire.py``), so an
unknown field is a bug or an attack, never a newer peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

import msgspec

from meshscale.core.api.errors import ApiError, ErrorCode
from meshscale.core.placement import Residency

__all__ = ["MAX_REGIONS", "Empty", "Method", "RegionName", "Request", "ResidencyWire",
           "decode_reply", "parse_reply", "parse_request", "request_args", "residency_of"]

MAX_REGIONS = 64
"""Regions one residency rule may name."""
RegionName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
DataClass = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]

Req = TypeVar("Req", bound="Request")
Rep = TypeVar("Rep")


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every request struct (arguments by name)."""


class Empty(Request):
    """The request of a method that takes no arguments."""


@dataclass(frozen=True, slots=True)
class Method(Generic[Req, Rep]):
    """One RPC method: its wire name, request struct and reply type."""

    name: str
    request: type[Req]
    reply: Any
    """The reply's type (a Struct, ``list[...]`` of one, or a builtin)."""

    def __repr__(self) -> str:
        return f"Method({self.name!r})"


class ResidencyWire(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """A residency rule (``core.placement.Residency``) on the wire: the one place it is
    converted, for objects, tasks and stream topics alike."""

    regions: Annotated[list[RegionName], msgspec.Meta(max_length=MAX_REGIONS)] | None = None
    """Allowed regions; absent: anywhere; empty: nowhere."""
    data_class: DataClass | None = None

    def rule(self) -> Residency:
        return Residency(None if self.regions is None else frozenset(self.regions),
                         self.data_class)

    @classmethod
    def of(cls, rule: Residency | None) -> ResidencyWire | None:
        """``rule`` on the wire (None for no rule)."""
        if rule is None:
            return None
        return cls(None if rule.regions is None else sorted(rule.regions), rule.data_class)


def residency_of(wire: ResidencyWire | None) -> Residency | None:
    """The rule a request carries (None: no rule)."""
    return None if wire is None else wire.rule()


_BUILTINS = (bytes, bytearray, memoryview)


def request_args(req: Request) -> dict[str, Any]:
    """A request's wire form: a map of its fields (nested structs stay structs; the
    encoder writes them as maps)."""
    return msgspec.structs.asdict(req)


def parse_request(method: Method[Req, Any], args: Any) -> Req:
    """The request ``args`` (as decoded off the wire) as ``method``'s struct; raises
    ``ApiError(INVALID)`` naming the field that is wrong. Bytes must be bytes on the wire
    (``builtin_types``: no base64 text read as bytes)."""
    try:
        return msgspec.convert(args, method.request, builtin_types=_BUILTINS)
    except msgspec.ValidationError as exc:
        raise ApiError(ErrorCode.INVALID, f"{method.name}: {exc}") from None


def parse_reply(method: Method[Any, Rep], result: Any) -> Rep:
    """A reply as decoded off the wire, as ``method``'s reply type; raises ``ValueError``
    (a node that answers out of contract) naming the field."""
    try:
        out: Rep = msgspec.convert(result, method.reply, builtin_types=_BUILTINS)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{method.name}: malformed reply: {exc}") from None
    return out


_reply_decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {}
"""One decoder per method name (every ``Method`` constant has its own name), made on the
method's first reply: only the methods a process calls cost one."""


def decode_reply(method: Method[Any, Rep], raw: bytes | msgspec.Raw) -> Rep:
    """A reply as it came off the wire (its encoded msgpack), decoded straight into
    ``method``'s reply type: what ``parse_reply`` checks, without building the builtins
    first (a page of a thousand objects decodes in a third of the time). Raises
    ``ValueError`` naming the field, as ``parse_reply`` does."""
    dec = _reply_decoders.get(method.name)
    if dec is None:
        dec = _reply_decoders[method.name] = msgspec.msgpack.Decoder(method.reply)
    try:
        out: Rep = dec.decode(raw)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{method.name}: malformed reply: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"{method.name}: malformed reply: {exc}") from None
    return out


def reply_builtins(reply: Any) -> Any:
    """A handler's reply as msgpack-able builtins (bytes kept as bytes)."""
    return msgspec.to_builtins(reply, builtin_types=_BUILTINS)
