"""Stream frames between nodes and from clients to nodes: schemas only, no I/O.

A TCP (TLS) connection carries length-prefixed frames (``runtime/framing.py``); each
frame body is one MessagePack array ``[version, message]`` where ``message`` is a tagged
msgspec Struct from ``StreamMessage``. Decoding checks the size before parsing, then the
version, then the schema; anything else raises ``WireError`` with a short reason that the
receiver counts (``rejected_messages{reason=...}``) before closing the connection.

- ``PushPullFrame``: membership anti-entropy; ``payload`` is a sealed (keyring) push/pull
  message, so a peer with the cluster's certificate but not its gossip key still cannot
  join.
- ``RpcRequest`` / ``RpcResponse``: a client (or node) calls a named method. The caller's
  certificate says its role (``core/access.py`` says which methods a role may call); a
  request may carry a token, which can only narrow that role.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from meshscale.core.wire import DECODE_ERRORS, PROTOCOL_VERSION, WireError

STREAM_PROTOCOL_VERSION = PROTOCOL_VERSION

Method = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Token = Annotated[str, msgspec.Meta(max_length=512)]
RequestId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class PushPullFrame(msgspec.Struct, tag="pushpull", array_like=True):
    payload: bytes


class RpcRequest(msgspec.Struct, tag="req", array_like=True):
    id: RequestId
    method: Method
    token: Token
    args: dict[str, Any] = {}


class RpcResponse(msgspec.Struct, tag="resp", array_like=True):
    id: RequestId
    ok: bool
    result: Any = None
    error: str = ""
    code: str = ""
    """``core.api.ErrorCode`` of a failed answer (decisions use it, never ``error``)."""


class RpcReply(msgspec.Struct, tag="resp", array_like=True):
    """An ``RpcResponse`` as its caller decodes it: the result kept encoded, so the caller
    decodes it straight into the reply type its method names
    (``core.api.contract.decode_reply``) instead of into builtins first."""

    id: RequestId
    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"\xc0")
    error: str = ""
    code: str = ""


StreamMessage = PushPullFrame | RpcRequest | RpcResponse
ReplyMessage = PushPullFrame | RpcRequest | RpcReply
"""What a caller reads: the same frames, an answer's result left encoded."""

_outer_decoder = msgspec.msgpack.Decoder(tuple[int, msgspec.Raw])
_message_decoder = msgspec.msgpack.Decoder(StreamMessage)
_reply_decoder = msgspec.msgpack.Decoder(ReplyMessage)


def encode_stream_message(msg: StreamMessage) -> bytes:
    return msgspec.msgpack.encode((STREAM_PROTOCOL_VERSION, msg))


def decode_stream_message(data: bytes | bytearray, max_size: int) -> StreamMessage:
    """Parse one frame body, or raise ``WireError`` (reason: oversized, malformed,
    version or unknown)."""
    msg: StreamMessage = _decode(data, max_size, _message_decoder)
    return msg


def decode_reply_message(data: bytes | bytearray, max_size: int) -> ReplyMessage:
    """``decode_stream_message`` for a caller: an answer is an ``RpcReply``, its result
    still encoded."""
    msg: ReplyMessage = _decode(data, max_size, _reply_decoder)
    return msg


def _decode(data: bytes | bytearray, max_size: int, decoder: msgspec.msgpack.Decoder[Any]
            ) -> Any:
    if len(data) > max_size:
        raise WireError("oversized", f"{len(data)} > {max_size} bytes")
    try:
        version, raw = _outer_decoder.decode(data)
    except DECODE_ERRORS as exc:
        raise WireError("malformed", str(exc)) from None
    if version != STREAM_PROTOCOL_VERSION:
        raise WireError("version", f"stream version {version}, expected "
                                   f"{STREAM_PROTOCOL_VERSION}")
    try:
        msg = decoder.decode(raw)
    except msgspec.ValidationError as exc:
        # A well-formed array whose tag we do not know is "unknown"; anything else malformed.
        reason = "unknown" if "Invalid value" in str(exc) and "$[0]" in str(exc) else "malformed"
        raise WireError(reason, str(exc)) from None
    except DECODE_ERRORS as exc:
        raise WireError("malformed", str(exc)) from None
    return msg
