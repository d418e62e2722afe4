"""The node's own methods, called in-process by its planes: objects and KV through the
same handlers a client reaches over RPC (so every rule, limit and residency check
applies), without a socket. One place for what the compute and stream planes both need.
"""

from __future__ import annotations

from typing import Any, TypeVar

from meshscale.core.api import ApiError, ErrorCode, objects
from meshscale.core.api import policy as policy_api
from meshscale.core.api.contract import Method, Request, ResidencyWire
from meshscale.core.objects import object_id
from meshscale.core.policy import ClassPolicy, make_policy
from meshscale.runtime.services import NodeServices
from meshscale.transport.rpc import RpcError

__all__ = ["LocalCalls", "call_node"]

Req = TypeVar("Req", bound=Request)
Rep = TypeVar("Rep")

READ_CHUNK_BYTES = 4 << 20
"""Bytes per ``obj.read`` of an in-process read."""
SMALL_PUT_BYTES = 256 * 1024
"""Objects up to this size are put in one ``obj.put_small``; larger ones are uploaded."""


async def call_node(node: NodeServices, name: str, method: Method[Req, Rep], req: Req, *,
                    lane: str, timeout_s: float | None = None) -> Rep:
    """Typed ``method`` on member ``name``: in-process when it is ``node`` itself, else on
    the shared connection of ``lane`` to it (``transport/peers.py``). ``RpcError`` when
    it is not a member or the call fails; ``RemoteError`` carries the node's code."""
    if name == node.name:
        return await node.call_local(method, req)
    member = node.m.members.get(name)
    if member is None:
        raise RpcError(f"{name}: not a member")
    return await node.peers.shared(name, member.addr, lane, timeout_s).request(method, req)


class LocalCalls:
    """In-process calls to ``node``'s own RPC handlers."""

    def __init__(self, node: NodeServices) -> None:
        self.node = node

    async def read_object(self, oid: str) -> bytes:
        """The whole object, from wherever it is, checked against its id."""
        buf = bytearray()
        size: int | None = None
        while size is None or len(buf) < size:
            r = await self.node.call_local(objects.READ, objects.ReadRequest(
                id=oid, offset=len(buf), length=READ_CHUNK_BYTES))
            size = r.size
            if not r.data and len(buf) < size:
                raise ValueError(f"short read of {oid}")
            buf += r.data
        if object_id(bytes(buf)) != oid:
            raise ValueError(f"{oid}: bytes read do not match the id")
        return bytes(buf)

    async def put_object(self, data: bytes, replicas: int,
                         residency: ResidencyWire | None = None) -> dict[str, Any]:
        """Store ``data`` with ``replicas`` copies (acknowledged at two); its ref. With a
        ``residency`` naming a data class, the class's policy gives the count (and the
        regions, unless the rule names narrower ones)."""
        classed = residency is not None and residency.data_class is not None
        n = None if classed else replicas
        w = None if classed else min(2, replicas)
        call = self.node.call_local
        if len(data) <= SMALL_PUT_BYTES:
            # The node's own objects (results, operator code) are kept however few
            # nodes may hold them now; repair adds copies as nodes join.
            r = await call(objects.PUT_SMALL, objects.PutSmallRequest(
                data=data, replicas=n, w=w, residency=residency, allow_degraded=True))
        else:
            up = await call(objects.PUT_BEGIN, objects.PutBeginRequest(
                size=len(data), replicas=n, w=w, residency=residency, allow_degraded=True))
            step = up.chunk_bytes
            for i in range(0, len(data), step):
                await call(objects.PUT_CHUNK, objects.PutChunkRequest(
                    upload=up.upload, data=data[i:i + step]))
            r = await call(objects.PUT_END, objects.UploadRequest(upload=up.upload))
        return {"id": r.id, "size": r.size}

    async def kv_put(self, key: str, value: bytes) -> None:
        """A quorum KV write; raises ``ValueError`` or ``RpcError`` if it fails."""
        await self.node.call_local(objects.KV_PUT, objects.KvPutRequest(key=key, value=value))

    async def kv_put_batch(self, items: list[tuple[str, bytes]]) -> list[str]:
        """Quorum KV writes of several keys at once (``kv.put_batch``): for each key, in
        order, "" when it was written or why not. Raises ``ValueError`` or ``RpcError``
        when the batch as a whole failed."""
        r = await self.node.call_local(objects.KV_PUT_BATCH, objects.KvPutBatchRequest(
            items=[objects.KvPutItem(key=k, value=v) for k, v in items]))
        return [x.error for x in r.results]

    async def kv_delete(self, key: str) -> None:
        """A quorum KV delete; raises ``ValueError`` or ``RpcError`` if it fails."""
        await self.node.call_local(objects.KV_DELETE, objects.KvKeyRequest(key=key))

    async def kv_get(self, key: str) -> bytes | None:
        """A quorum KV read; None when the key is absent or the read failed."""
        try:
            r = await self.node.call_local(objects.KV_GET, objects.KvKeyRequest(key=key))
        except (ValueError, RpcError):
            return None
        return r.value

    async def class_policies(self, names: set[str]) -> dict[str, ClassPolicy]:
        """The policies of the data classes ``names`` as this node's data plane knows them
        (its cache, read from the KV on a miss); a class without one is left out. Raises
        ``ApiError`` (``unavailable``) when a class's policy cannot be read."""
        out: dict[str, ClassPolicy] = {}
        for name in sorted(names):
            try:
                info = await self.node.call_local(
                    policy_api.GET, policy_api.PolicyNameRequest(name=name, cached=True))
            except ApiError as e:
                if e.code is ErrorCode.NOT_FOUND:
                    continue
                if e.code is ErrorCode.INVALID:
                    raise
                raise ApiError(ErrorCode.UNAVAILABLE,
                               f"cannot read the policy of data class {name!r}: {e}") from None
            out[name] = make_policy(info.name, info.regions, replicas=info.replicas,
                                    ttl_s=info.ttl_s, cross_region_reads=info.cross_region_reads,
                                    stream_regions=info.stream_regions)
        return out
