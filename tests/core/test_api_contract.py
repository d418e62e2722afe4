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


# ------------------------------------------------------------------ typed methods


def test_every_method_is_typed_and_in_the_access_table() -> None:
    """core/api and core/access name the same methods: none callable but untyped, none
    typed that no role may call (the node serves only ``core.api.METHODS``)."""
    from meshscale.core.access import METHOD_ACCESS
    from meshscale.core.api import METHODS, Request

    assert set(METHODS) == set(METHOD_ACCESS), set(METHODS) ^ set(METHOD_ACCESS)
    for name, method in METHODS.items():
        assert method.name == name
        assert issubclass(method.request, Request), name
        assert method.request.__struct_config__.forbid_unknown_fields, name


def test_a_request_out_of_contract_is_invalid_naming_the_field() -> None:
    from meshscale.core.api import parse_request
    from meshscale.core.api.node import EVENTS, MEMBERS, EventsRequest

    assert parse_request(EVENTS, {"since": 4}) == EventsRequest(since=4)
    assert parse_request(EVENTS, {}) == EventsRequest(since=0)
    for args, words in (({"since": "4"}, "since"), ({"since": -1}, "since"),
                        ({"after": 1}, "after"), ([1], "object")):
        with pytest.raises(ApiError) as e:
            parse_request(EVENTS, args)
        assert e.value.code is ErrorCode.INVALID
        assert words in str(e.value) and "events" in str(e.value)
    with pytest.raises(ApiError, match="unknown field"):
        parse_request(MEMBERS, {"since": 1})


def test_a_reply_out_of_contract_is_refused() -> None:
    from meshscale.core.api import parse_reply, request_args
    from meshscale.core.api.node import ADMIN_REVOKE, MEMBERS, RevokeReply, RevokeRequest

    assert parse_reply(ADMIN_REVOKE, {"name": "n1", "new": True}) == RevokeReply("n1", True)
    with pytest.raises(ValueError, match="new"):
        parse_reply(ADMIN_REVOKE, {"name": "n1", "new": "yes"})
    with pytest.raises(ValueError, match="malformed reply"):
        parse_reply(MEMBERS, {"name": "n1"})
    assert request_args(RevokeRequest(entry=b"x")) == {"entry": b"x"}


def test_a_reply_decoded_off_the_wire_is_checked_as_parse_reply_checks_it() -> None:
    """``decode_reply`` (what a caller uses) takes the encoded reply straight into the
    method's type: the same replies pass and fail as through builtins and ``parse_reply``."""
    import msgspec

    from meshscale.core.api import parse_reply
    from meshscale.core.api.contract import decode_reply
    from meshscale.core.api.node import ADMIN_REVOKE, MEMBERS, RevokeReply
    from meshscale.core.api.objects import LOCAL_LIST, ObjectDesc

    enc = msgspec.msgpack.encode
    assert decode_reply(ADMIN_REVOKE, enc({"name": "n1", "new": True})) == RevokeReply("n1", True)
    page = [ObjectDesc(id="a" * 64, size=3, replicas=2, replica_set=["n1", "n2"])]
    assert decode_reply(LOCAL_LIST, enc(page)) == page == parse_reply(
        LOCAL_LIST, msgspec.to_builtins(page))
    for bad in ({"name": "n1", "new": "yes"}, {"name": "n1"}, [1, 2], None):
        with pytest.raises(ValueError, match="malformed reply"):
            decode_reply(ADMIN_REVOKE, enc(bad))
        with pytest.raises(ValueError, match="malformed reply"):
            parse_reply(ADMIN_REVOKE, bad)
    with pytest.raises(ValueError, match="malformed reply"):
        decode_reply(MEMBERS, b"\xc1")  # not msgpack at all


def test_residency_goes_on_the_wire_in_one_form() -> None:
    import msgspec

    from meshscale.core.api import ResidencyWire, residency_of
    from meshscale.core.placement import Residency

    for rule in (Residency(frozenset({"eu-west", "eu-central"}), "pii"), Residency(),
                 Residency(frozenset()), Residency(None, "pii")):
        wire = ResidencyWire.of(rule)
        back = msgspec.convert(msgspec.to_builtins(wire), ResidencyWire)
        assert residency_of(back) == rule
    assert ResidencyWire.of(None) is None and residency_of(None) is None
    for bad in ({"regions": "eu-west"}, {"regions": [""]}, {"regions": ["x"] * 65},
                {"region": ["eu-west"]}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, ResidencyWire)
