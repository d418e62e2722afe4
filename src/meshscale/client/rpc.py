"""The RPC connection a client uses, from the transport (``transport/rpc.py``): re-exported
here so ``meshscale.client.rpc`` keeps working for the client's users and tests."""

from meshscale.transport.rpc import (
    MAX_REPLY_BYTES,
    ClientCredentials,
    RemoteError,
    RpcConnection,
    RpcError,
    RpcPipeline,
    WireCounter,
    call,
    call_async,
    request,
    request_async,
)

__all__ = [
    "MAX_REPLY_BYTES",
    "ClientCredentials",
    "RemoteError",
    "RpcConnection",
    "RpcError",
    "RpcPipeline",
    "WireCounter",
    "call",
    "call_async",
    "request",
    "request_async",
]
