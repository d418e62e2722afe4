"""The data plane's request and reply structs (``core/api/objects.py``) survive the wire
(msgpack) unchanged, and their bounds are checked by the contract."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from meshscale.core.api import ApiError, ErrorCode, ResidencyWire, parse_reply, parse_request
from meshscale.core.api import objects as api
from meshscale.core.api.contract import reply_builtins, request_args

OID = "b3-" + "ab" * 32
EU = ResidencyWire(["eu-west"], "pii")

REQUESTS: list[tuple[Any, Any]] = [
    (api.PUT_BEGIN, api.PutBeginRequest(size=10, replicas=3, w=2, residency=EU, id=OID,
                                        ttl_s=5.0)),
    (api.PUT_CHUNK, api.PutChunkRequest(upload="n-1", data=b"abc")),
    (api.PUT_END, api.UploadRequest(upload="n-1")),
    (api.PUT_SMALL, api.PutSmallRequest(data=b"x", residency=ResidencyWire(None, "pii"))),
    (api.RW_BEGIN, api.ReplicaHeader(id=OID, size=4, hint_for="n2", expires=1.5,
                                     written="0000000000000005-00000000-a")),
    (api.RW_SMALL, api.ReplicaSmallRequest(id=OID, size=1, data=b"x", residency=EU)),
    (api.READ, api.ReadRequest(id=OID, offset=0, length=10, redirect=True)),
    (api.LIST, api.ListRequest(after=OID, limit=5)),
    (api.REPL_MSG, api.ReplMsgRequest(src="n1", payload=b"\x00")),
    (api.KV_PUT, api.KvPutRequest(key="k", value=b"v", consistency="all")),
    (api.KV_APPLY, api.KvApplyRequest(key="k", value=None, ts="t", hint_for=["n3"])),
    (api.KV_PUT_BATCH, api.KvPutBatchRequest(items=[api.KvPutItem(key="k", value=b"v"),
                                                    api.KvPutItem(key="j", value=b"")])),
    (api.KV_APPLY_BATCH, api.KvApplyBatchRequest(items=[
        api.KvApplyItem(key="k", value=b"v", ts="t", hint_for=["n3"]),
        api.KvApplyItem(key="j", value=None, ts="u")])),
]

REPLIES: list[tuple[Any, Any]] = [
    (api.PUT_END, api.PutReply(id=OID, size=3, nodes=["n1", "n2"])),
    (api.RW_BEGIN, api.RwBeginReply(have=True)),
    (api.READ, api.ReadReply(data=b"abc", size=3, chunk_bytes=4)),
    (api.READ, api.ReadReply(redirect=[api.Holder(node="n2", addr="10.0.0.2:7000")])),
    (api.LOCAL_STAT, None),
    (api.LOCAL_STAT, api.LocalObject(id=OID, size=1, replicas=3, residency=EU,
                                     replica_set=["n1"], written="t")),
    (api.LIST, api.ObjectPage(objects=[api.ListedObject(id=OID, size=1, replicas=1,
                                                        holders=["n1"], health="ok")],
                              next=OID)),
    (api.DELETE, api.DeleteReply(id=OID, holders=["n1"], already_deleted=True)),
    (api.KV_GET, api.KvValue()),
    (api.KV_READ, api.KvRecordWire(value=b"v", ts="t")),
    (api.KV_PUT_BATCH, api.KvPutBatchReply([api.KvItemResult(ts="t"), api.KvItemResult(
        error="kv write of 'j' failed: no quorum", code="unavailable")])),
    (api.KV_APPLY_BATCH, api.KvApplyBatchReply([api.KvItemResult(applied=True),
                                                api.KvItemResult()])),
]


@pytest.mark.parametrize(("method", "req"), REQUESTS, ids=lambda x: getattr(x, "name", ""))
def test_requests_round_trip(method: Any, req: Any) -> None:
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(request_args(req)))
    assert parse_request(method, wire) == req


@pytest.mark.parametrize(("method", "reply"), REPLIES, ids=lambda x: getattr(x, "name", ""))
def test_replies_round_trip(method: Any, reply: Any) -> None:
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(reply_builtins(reply)))
    assert parse_reply(method, wire) == reply


@pytest.mark.parametrize(("method", "args", "field"), [
    (api.PUT_BEGIN, {"size": -1}, "size"),
    (api.PUT_BEGIN, {"size": 1, "replicas": api.MAX_REPLICAS + 1}, "replicas"),
    (api.PUT_BEGIN, {"size": 1, "id": "../x"}, "id"),
    (api.PUT_BEGIN, {"size": 1, "residency": ["eu-west"]}, "residency"),
    (api.PUT_SMALL, {"data": b"x", "ttl_s": 0}, "ttl_s"),
    (api.LIST, {"limit": api.MAX_LIST_PAGE + 1}, "limit"),
    (api.KV_PUT, {"key": "", "value": b""}, "key"),
    (api.KV_PUT, {"key": "k", "value": b"x", "consistency": "most"}, "consistency"),
    (api.KV_APPLY, {"key": "k", "value": None, "ts": "t",
                    "hint_for": ["n"] * (api.MAX_HINT_TARGETS + 1)}, "hint_for"),
    (api.KV_PUT_BATCH, {"items": []}, "items"),
    (api.KV_PUT_BATCH, {"items": [["k", b""]] * (api.MAX_KV_BATCH_ITEMS + 1)}, "items"),
    (api.KV_APPLY_BATCH, {"items": [["", b"", "t"]]}, "items[0][0]"),
])
def test_bounds_are_invalid_naming_the_field(method: Any, args: dict[str, Any],
                                             field: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_request(method, args)
    assert e.value.code is ErrorCode.INVALID and f"$.{field}" in str(e.value)
