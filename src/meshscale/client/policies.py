"""Data-class policies from Python: ``mesh.policies.set("pii", ["eu-west", "eu-central"])``,
``.get``, ``.list``, ``.delete`` (``AsyncPolicies`` on an ``AsyncMesh``, ``Policies`` on a
``Mesh``). Arguments are checked here with the rules the node applies
(``core.policy.make_policy``), so a malformed region fails before anything is sent;
changing a policy needs an admin certificate (a read-only one gets ``MeshError`` with code
``unauthorized``)."""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from meshscale.core.api import Empty
from meshscale.core.api import policy as papi
from meshscale.core.api.contract import Method, Request
from meshscale.core.api.policy import PolicyDeleteReply, PolicyInfo, PolicySetReply
from meshscale.core.policy import PolicyError, check_class_name, make_policy

Req = TypeVar("Req", bound=Request)
Rep = TypeVar("Rep")
T = TypeVar("T")


class _Caller(Protocol):
    """What ``AsyncPolicies`` needs of an ``AsyncMesh`` (named without importing it)."""

    async def _request(self, method: Method[Req, Rep], req: Req) -> Rep: ...


class _Runner(Protocol):
    """What ``Policies`` needs of a ``Mesh``."""

    _inner: Any

    def _run(self, coro: Coroutine[Any, Any, T]) -> T: ...

__all__ = ["AsyncPolicies", "Policies", "PolicyInfo", "PolicySetReply"]


def _set_request(name: str, regions: Sequence[str], replicas: int, ttl_s: float | None,
                 cross_region_reads: bool, stream_regions: Sequence[str] | None,
                 migrate: bool) -> papi.PolicySetRequest:
    try:
        p = make_policy(name, regions, replicas=replicas, ttl_s=ttl_s,
                        cross_region_reads=cross_region_reads, stream_regions=stream_regions)
    except PolicyError as e:
        raise ValueError(str(e)) from None
    return papi.PolicySetRequest(
        name=p.name, regions=list(p.regions), replicas=p.replicas, ttl_s=p.ttl_s,
        cross_region_reads=p.cross_region_reads,
        stream_regions=None if p.stream_regions is None else list(p.stream_regions),
        migrate=migrate)


def _name(name: str) -> str:
    try:
        return check_class_name(name)
    except PolicyError as e:
        raise ValueError(str(e)) from None


class AsyncPolicies:
    """The mesh's data-class policies (see the module docstring)."""

    def __init__(self, mesh: _Caller) -> None:
        self._mesh = mesh

    async def set(self, name: str, regions: Sequence[str], *, replicas: int = 3,
                  ttl_s: float | None = None, cross_region_reads: bool = True,
                  stream_regions: Sequence[str] | None = None,
                  migrate: bool = False) -> PolicySetReply:
        """Set class ``name``'s policy. Refused (``MeshError``, code ``refused``) when
        existing copies of the class would fall outside ``regions``, unless
        ``migrate=True``: then they are moved by re-replication and the reply's
        ``migrated`` says what moved (``still_outside``: copies not yet moved when the node
        stopped waiting)."""
        return await self._mesh._request(papi.SET, _set_request(
            name, regions, replicas, ttl_s, cross_region_reads, stream_regions, migrate))

    async def get(self, name: str) -> PolicyInfo:
        """Class ``name``'s policy; ``MeshError`` with code ``not_found`` if it has none."""
        return await self._mesh._request(papi.GET, papi.PolicyNameRequest(name=_name(name)))

    async def list(self) -> list[PolicyInfo]:
        return await self._mesh._request(papi.LIST, Empty())

    async def delete(self, name: str) -> PolicyDeleteReply:
        return await self._mesh._request(papi.DELETE, papi.PolicyNameRequest(name=_name(name)))


class Policies:
    """Blocking view of ``AsyncPolicies``."""

    def __init__(self, mesh: _Runner) -> None:
        self._mesh = mesh

    @property
    def _async(self) -> AsyncPolicies:
        inner: AsyncPolicies = self._mesh._inner.policies
        return inner

    def set(self, name: str, regions: Sequence[str], *, replicas: int = 3,
            ttl_s: float | None = None, cross_region_reads: bool = True,
            stream_regions: Sequence[str] | None = None,
            migrate: bool = False) -> PolicySetReply:
        return self._mesh._run(self._async.set(
            name, regions, replicas=replicas, ttl_s=ttl_s,
            cross_region_reads=cross_region_reads, stream_regions=stream_regions,
            migrate=migrate))

    def get(self, name: str) -> PolicyInfo:
        return self._mesh._run(self._async.get(name))

    def list(self) -> list[PolicyInfo]:
        return self._mesh._run(self._async.list())

    def delete(self, name: str) -> PolicyDeleteReply:
        return self._mesh._run(self._async.delete(name))
