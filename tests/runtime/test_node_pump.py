"""The agent's output pump under uvloop: one bad send costs that send only."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import uvloop

from meshscale.core.api import ErrorCode
from meshscale.core.outputs import SendDatagram
from meshscale.core.rpc import RpcResponse, decode_stream_message
from meshscale.runtime.identity import start_identity
from meshscale.runtime.node import NodeAgent
from meshscale.trust.bundle import init_bundle, write_node_bundle


@pytest.mark.timeout(60)
def test_a_name_where_an_address_belongs_costs_one_send(tmp_path: Path) -> None:
    """uvloop raises ValueError (not OSError) for a datagram to "localhost:PORT"; the pump
    used to let it escape, dropping the rest of the batch and its timer, and the whole
    mesh flapped. Now the bad send is counted and the rest goes out."""
    admin = init_bundle(tmp_path / "admin")
    bundle = write_node_bundle(admin, "n1", tmp_path / "n1")
    agent = NodeAgent(identity=start_identity(tmp_path / "d", "n1"), data_dir=tmp_path / "d",
                      bundle=bundle, bind="127.0.0.1:0", dataplane=False)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(5)

    async def go() -> None:
        await agent.start()
        try:
            m = agent.m
            before = agent.stats.runtime["send_errors"]
            m._outputs += [SendDatagram("localhost:9", b"first"),
                           SendDatagram("not an address", b"second"),
                           SendDatagram(f"127.0.0.1:{sink.getsockname()[1]}", b"third")]
            agent._pump()
            assert agent.stats.runtime["send_errors"] == before + 2
            assert agent._timer._at == m.next_deadline()  # the timer was re-armed
            data = await asyncio.to_thread(sink.recv, 2048)
            assert data  # the good one went out (sealed)
        finally:
            await agent.stop()

    try:
        uvloop.run(go())
    finally:
        sink.close()


def test_a_reply_that_cannot_be_encoded_is_answered_as_an_internal_error(tmp_path: Path
                                                                        ) -> None:
    """Replies are encoded as the handler returned them (no builtins copy first): a
    result msgpack cannot carry (a handler bug) becomes an ``internal`` answer to that
    call, counted, instead of an exception that would drop the caller's connection."""
    admin = init_bundle(tmp_path / "admin")
    bundle = write_node_bundle(admin, "n1", tmp_path / "n1")
    agent = NodeAgent(identity=start_identity(tmp_path / "d", "n1"), data_dir=tmp_path / "d",
                      bundle=bundle, bind="127.0.0.1:0", dataplane=False)
    before = agent.stats.runtime["rpc_errors"]
    out = decode_stream_message(agent._encode_reply(RpcResponse(7, True, result=object())),
                                1 << 20)
    assert isinstance(out, RpcResponse)
    assert (out.id, out.ok, out.code) == (7, False, ErrorCode.INTERNAL)
    assert "not encodable" in out.error
    assert agent.stats.runtime["rpc_errors"] == before + 1
    fine = decode_stream_message(agent._encode_reply(RpcResponse(8, True, result={"a": b"x"})),
                                 1 << 20)
    assert fine == RpcResponse(8, True, result={"a": b"x"})
