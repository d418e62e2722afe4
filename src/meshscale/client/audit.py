"""Reading the mesh's audit trails from a client (``meshscale audit``): one query asked of
many nodes at once, their rows merged in time order; and ``verify``, which first collects
the signed chain heads every node remembers (``audit.heads``) and then asks each node to
check its own chain against the heads the others remember of it (``audit.verify``), so a
log cut short or rewritten since a head was gossiped is found (docs/audit.md)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from meshscale.core.api import Empty
from meshscale.core.api import audit as api
from meshscale.core.api.node import MEMBERS, MemberInfo
from meshscale.transport.rpc import ClientCredentials, RemoteError, RpcError, request_async

__all__ = ["MeshRows", "NodeVerdict", "live_members", "query_mesh", "verify_mesh"]


async def live_members(addr: str, creds: ClientCredentials,
                       timeout: float = 5.0) -> list[MemberInfo]:
    """The members the node at ``addr`` sees alive or suspect."""
    infos = await request_async(addr, creds, MEMBERS, Empty(), timeout=timeout)
    return [m for m in infos if m.state in ("alive", "suspect")]


@dataclass
class MeshRows:
    rows: list[api.AuditRow]
    """Every node's rows, by wall clock (then node, seq)."""
    errors: dict[str, str] = field(default_factory=dict)
    """Address -> why it did not answer."""
    refused: dict[str, str] = field(default_factory=dict)
    """Address -> the error it answered with (not allowed, no trail there)."""
    more: bool = False
    """A node had more rows than the page."""


async def query_mesh(addresses: list[str], creds: ClientCredentials, q: api.AuditQuery,
                     timeout: float = 10.0) -> MeshRows:
    """``q`` asked of every address at once."""
    results = await asyncio.gather(
        *(request_async(a, creds, api.QUERY, q, timeout=timeout) for a in addresses),
        return_exceptions=True)
    out = MeshRows(rows=[])
    for addr, r in zip(addresses, results, strict=True):
        if isinstance(r, RemoteError):
            out.refused[addr] = str(r)
        elif isinstance(r, RpcError):
            out.errors[addr] = str(r)
        elif isinstance(r, BaseException):
            raise r
        else:
            out.rows += r.rows
            out.more = out.more or r.more
    out.rows.sort(key=lambda row: (row.wall_s, row.node, row.seq))
    return out


@dataclass
class NodeVerdict:
    """One node's chain, as it checked it."""

    node: str
    address: str
    reply: api.VerifyReply | None = None
    error: str | None = None
    """Why it could not be asked, or what it answered instead (None: it answered)."""
    refused: bool = False
    """It answered with an error (not allowed; no trail there) rather than not at all."""
    heads_given: int = 0


async def verify_mesh(targets: list[tuple[str, str]], everyone: list[tuple[str, str]],
                      creds: ClientCredentials, timeout: float = 60.0) -> list[NodeVerdict]:
    """Check the chains of ``targets`` (``(name, address)``) against the heads that
    ``everyone`` remembers of them."""
    answers = await asyncio.gather(
        *(request_async(a, creds, api.HEADS, Empty(), timeout=min(timeout, 10.0))
          for _, a in everyone), return_exceptions=True)
    heads: dict[str, set[str]] = {}
    for (name, _), r in zip(everyone, answers, strict=True):
        if isinstance(r, RpcError):
            continue  # a node we cannot ask remembers nothing for us
        if isinstance(r, BaseException):
            raise r
        if r.own is not None:
            heads.setdefault(name, set()).add(r.own)
        for node, text in r.seen.items():
            heads.setdefault(node, set()).add(text)

    async def one(name: str, addr: str) -> NodeVerdict:
        given = sorted(heads.get(name, ()))[: api.MAX_HEADS]
        try:
            reply = await request_async(addr, creds, api.VERIFY,
                                        api.VerifyRequest(heads=given), timeout=timeout)
        except RemoteError as e:
            return NodeVerdict(name, addr, error=str(e), refused=True,
                               heads_given=len(given))
        except RpcError as e:
            return NodeVerdict(name, addr, error=str(e), heads_given=len(given))
        return NodeVerdict(reply.node, addr, reply=reply, heads_given=len(given))

    return list(await asyncio.gather(*(one(n, a) for n, a in targets)))
