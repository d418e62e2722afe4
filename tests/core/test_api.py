"""core/api.py: every failed answer carries a code, and decisions use the code."""

from __future__ import annotations

import asyncio

import pytest

from meshscale.core.api import ApiError, ErrorCode, code_of
from meshscale.core.rpc import RpcResponse, decode_stream_message, encode_stream_message


def test_codes_of_handler_exceptions() -> None:
    assert code_of(ApiError(ErrorCode.NOT_FOUND, "unknown object id b3-00")) \
        is ErrorCode.NOT_FOUND
    assert code_of(ValueError("bad")) is ErrorCode.INVALID
    assert code_of(KeyError("k")) is ErrorCode.INVALID
    assert code_of(RuntimeError("bug")) is ErrorCode.INTERNAL
    assert isinstance(ApiError(ErrorCode.BUSY, "x"), ValueError)  # the old rule still holds


def test_the_code_travels_in_the_answer() -> None:
    resp = RpcResponse(3, False, error="whatever the text says", code=ErrorCode.BACKPRESSURE)
    back = decode_stream_message(encode_stream_message(resp), 1 << 20)
    assert isinstance(back, RpcResponse) and back.code == "backpressure"


def test_a_node_answer_raises_remote_error_with_its_code() -> None:
    """A text that mentions another error's words does not change what the client does."""
    from meshscale.transport.rpc import RemoteError

    e = RemoteError("node: need function f (but really: unknown object id)", "busy")
    assert e.code == ErrorCode.BUSY
    with pytest.raises(RemoteError):
        asyncio.run(_raise(e))


async def _raise(e: Exception) -> None:
    raise e
