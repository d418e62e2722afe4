"""core/api/streams.py: the streams plane's structs round-trip through msgpack in the
shapes the plane puts on the wire (records as arrays), and their limits hold."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from meshscale.core.api import ApiError, ErrorCode, ResidencyWire, parse_reply, parse_request
from meshscale.core.api import streams as api
from meshscale.core.api.contract import reply_builtins, request_args
from meshscale.core.api.streams import (
    FetchReply,
    FetchRequest,
    OperatorInfo,
    OperatorSpec,
    OpListReply,
    OpNotifyRequest,
    OpRegisterRequest,
    PublishRecord,
    PublishRequest,
    ReadRecord,
    ReadReply,
    ReadRequest,
    ReplicateRequest,
    ShardInfo,
    StreamStats,
)
from meshscale.core.streams import LogEntry

SPEC = OperatorSpec(name="detect", topic="sensors", output="alerts", mode="regions",
                    regions=["eu-west", "eu-central"],
                    residency=ResidencyWire(["eu-west", "eu-central"], "pii"),
                    labels={"gpu": "yes"}, fn_id="f" * 64, fn_object="b3-" + "0" * 64,
                    batch=64)


def wire(value: Any) -> Any:
    """``value`` as the other side decodes it (msgpack, back to builtins)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value))


def test_requests_round_trip() -> None:
    for method, req in (
        (api.PUBLISH, PublishRequest(topic="t", records=[PublishRecord("k", b"v", "id-1", 1.5)],
                                     residency=ResidencyWire(["eu-west"]))),
        (api.READ, ReadRequest(topic="t", cursors={"node-0~7": 12}, limit=10, wait_s=1.0)),
        (api.REPLICATE, ReplicateRequest(topic="t", source="node-0~7",
                                         entries=[LogEntry(3, "k", b"v", "id", 2.0)], low=2)),
        (api.FETCH, FetchRequest(topic="t", source="node-0~7", offset=4, op="detect",
                                 committed=4)),
        (api.OP_REGISTER, OpRegisterRequest(name="detect", topic="t", fn_bytes=b"\x80\x05.")),
        (api.OP_NOTIFY, OpNotifyRequest(spec=SPEC)),
        (api.OP_NOTIFY, OpNotifyRequest(removed="detect")),
    ):
        assert parse_request(method, wire(request_args(req))) == req


def test_records_travel_as_arrays() -> None:
    """The high-rate shapes: a record is an array (no field names per record), the same
    arrays the plane sent before its methods were typed."""
    req = PublishRequest(topic="t", records=[PublishRecord("k", b"v", "id-1", 1.5)])
    assert wire(request_args(req))["records"] == [["k", b"v", "id-1", 1.5]]
    reply = ReadReply(records=[ReadRecord("node-0~7", 3, "k", b"v", "id-1", 1.5)])
    assert wire(reply_builtins(reply)) == {"records": [["node-0~7", 3, "k", b"v", "id-1", 1.5]]}
    assert parse_reply(api.READ, wire(reply_builtins(reply))) == reply
    fetched = FetchReply(entries=[LogEntry(3, "k", b"v", "id", 2.0)], base=3, head=4)
    assert wire(reply_builtins(fetched)) == {"entries": [[3, "k", b"v", "id", 2.0]],
                                             "base": 3, "head": 4}
    assert parse_reply(api.FETCH, wire(reply_builtins(fetched))) == fetched
    assert wire(reply_builtins(FetchReply(missing=True))) == {"missing": True}


def test_replies_round_trip() -> None:
    stats = StreamStats(node="n", region="r", counters={"records_in": 3},
                        cross_region_bytes={"t:repl": 10},
                        shards=[ShardInfo(topic="t", source="n~1", base=0, head=3, backlog=1,
                                          backlog_max=2, bytes=99, evicted=0, role="primary")],
                        operators={"detect": {"records_processed": 3}}, runners=["detect@n~1"])
    assert parse_reply(api.STATS, wire(reply_builtins(stats))) == stats
    listed = OpListReply(operators=[OperatorInfo(**msgspec.structs.asdict(SPEC),
                                                 stats={"records_processed": 1})],
                         runners=[])
    back = parse_reply(api.OP_LIST, wire(reply_builtins(listed)))
    assert back == listed and back.operators[0].residency == SPEC.residency
    assert parse_reply(api.OP_NOTIFY, wire(reply_builtins(None))) is None


def test_an_operator_spec_is_one_struct_in_the_kv_and_on_the_wire() -> None:
    stored = msgspec.msgpack.encode(SPEC)
    assert msgspec.msgpack.decode(stored, type=OperatorSpec) == SPEC
    assert msgspec.msgpack.decode(stored)["residency"] == {
        "regions": ["eu-west", "eu-central"], "data_class": "pii"}
    with pytest.raises(msgspec.ValidationError, match="mode"):
        msgspec.convert({**msgspec.structs.asdict(SPEC), "residency": None,
                         "mode": "everywhere"}, OperatorSpec)


@pytest.mark.parametrize("args, field", [
    ({"topic": "a/b", "records": [["k", b"", "i", 0.0]]}, "$.topic"),
    ({"topic": "", "records": [["k", b"", "i", 0.0]]}, "$.topic"),
    ({"topic": "t" * (api.MAX_NAME_CHARS + 1), "records": [["k", b"", "i", 0.0]]}, "$.topic"),
    ({"topic": "t", "records": []}, "$.records"),
    ({"topic": "t", "records": [["k", b"", "i", 0.0]] * (api.MAX_PUBLISH_RECORDS + 1)},
     "$.records"),
    ({"topic": "t", "records": [["k", b"", "i"]]}, "$.records[0]"),
    ({"topic": "t", "records": [["k", b"", "i", 0.0, 1]]}, "$.records[0]"),
    ({"topic": "t", "records": [["k", "text", "i", 0.0]]}, "$.records[0][1]"),
    ({"topic": "t", "records": [["k", b"x" * (api.MAX_RECORD_BYTES + 1), "i", 0.0]]},
     "$.records[0][1]"),
    ({"topic": "t", "records": [["k" * (api.MAX_KEY_CHARS + 1), b"", "i", 0.0]]},
     "$.records[0][0]"),
    ({"topic": "t", "records": [["k", b"", "i", 0.0]], "residency": ["eu"]}, "$.residency"),
])
def test_publish_limits(args: dict[str, Any], field: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_request(api.PUBLISH, wire(args))
    assert e.value.code is ErrorCode.INVALID
    assert field in str(e.value) and "stream.publish" in str(e.value)


@pytest.mark.parametrize("method, args, field", [
    (api.READ, {"topic": "t", "limit": 0}, "$.limit"),
    (api.READ, {"topic": "t", "limit": api.MAX_READ_RECORDS + 1}, "$.limit"),
    (api.READ, {"topic": "t", "wait_s": api.MAX_WAIT_S + 1}, "$.wait_s"),
    (api.READ, {"topic": "t", "cursors": {"n~1": -1}}, "$.cursors"),
    (api.FETCH, {"topic": "t", "source": "n~1", "limit": api.MAX_FETCH_RECORDS + 1}, "$.limit"),
    (api.FETCH, {"topic": "t", "source": "n~1", "offset": -1}, "$.offset"),
    (api.REPLICATE, {"topic": "t", "source": "n~1", "entries": [[0, "k", b"", "i"]]},
     "$.entries[0]"),
    (api.OP_REGISTER, {"name": "o", "topic": "t", "fn_bytes": b"x", "mode": "anywhere"},
     "$.mode"),
    (api.OP_REGISTER, {"name": "o", "topic": "t", "fn_bytes": b"x", "batch": 0}, "$.batch"),
    (api.OP_REGISTER, {"name": "o", "topic": "t", "fn_bytes": b""}, "$.fn_bytes"),
    (api.OP_REGISTER, {"name": "o", "topic": "t"}, "fn_bytes"),
    (api.OP_NOTIFY, {"spec": {"name": "o"}}, "$.spec"),
])
def test_other_limits(method: Any, args: dict[str, Any], field: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_request(method, wire(args))
    assert e.value.code is ErrorCode.INVALID and field in str(e.value), str(e.value)


@pytest.mark.parametrize("method", api.METHODS, ids=lambda m: m.name)
def test_every_method_refuses_an_unknown_field(method: Any) -> None:
    with pytest.raises(ApiError, match="unknown field `surplus`"):
        parse_request(method, {"surplus": 1})
