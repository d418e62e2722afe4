"""Services for users (issue #22): a class deployed as replicas that construct it once
and answer calls, placed near their callers.

    import meshscale
    mesh = meshscale.connect("127.0.0.1:7946")
    mesh.deploy(Classifier, "digits", "weights-v3", placement="near-caller", replicas=2,
                idempotent=["predict"])
    h = mesh.service("digits")
    h.call("predict", image, timeout=5.0)

A class can carry its deployment options, as ``@meshscale.service(...)``; ``deploy``'s own
keywords override them::

    @meshscale.service(placement="near-caller", autoscale=(1, 4, 8.0), idempotent=["predict"])
    class Classifier: ...

    mesh.deploy(Classifier, "digits", "weights-v3")
    fut = h.predict.remote(image)       # a concurrent.futures.Future
    fut.result()
    await h.predict.call_async(image)   # from the caller's own asyncio loop

A call goes to the node this mesh is connected to, which routes it to a replica (the
caller's region first, the less busy of two) and forwards it. A method that raised makes
the call raise ``ServiceCallError`` with ``kind="raised"`` and the remote traceback, as a
task's ``TaskError`` does; so do the routing errors (``no-replica``, ``replica-lost``:
its replica died and the method is not declared idempotent, ``retries-exhausted``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import cloudpickle

from meshscale.client.mesh import MeshError
from meshscale.client.rpc import RpcConnection, RpcError
from meshscale.client.shipping import Region, Regions, by_value
from meshscale.core.actors import check_actor_key
from meshscale.core.api import Empty, ResidencyWire
from meshscale.core.api import services as api
from meshscale.core.api.services import (
    AutoscaleWire,
    CallRequest,
    DeployRequest,
    RemoveRequest,
    ServiceWire,
)
from meshscale.core.objects import object_id

if TYPE_CHECKING:
    from meshscale.client.mesh import Mesh

__all__ = ["CALL_SLACK_S", "Actor", "Service", "ServiceCallError", "ServiceOptions",
           "ServicesMixin", "service"]

_C = TypeVar("_C", bound=type)

SERVICE_ATTR: Final = "__meshscale_service__"
"""Where ``@service(...)`` keeps a class's deployment options."""

_BUILTIN: Final[dict[str, Any]] = {"placement": "near-caller", "cpus": 1.0, "memory_mb": 0,
                                   "gpus": 0, "idempotent": ()}
"""``deploy``'s defaults for an option neither the call nor the class sets."""

_ACTOR_REFUSES: Final = ("replicas", "autoscale", "health")
"""Options of replicated services that an actor (one instance per key) has no use for."""


@dataclass(frozen=True)
class ServiceOptions:
    """A class's deployment options from ``@service(...)``: only the ones it set."""

    actor: bool = False
    options: dict[str, Any] = field(default_factory=dict)


def service(*, placement: str | Region | Regions | None = None,
            replicas: int | None = None,
            autoscale: tuple[int, int, float] | None = None,
            cpus: float | None = None, memory_mb: int | None = None,
            gpus: int | None = None, data_class: str | None = None,
            residency: Sequence[str] | None = None,
            labels: dict[str, str] | None = None,
            idempotent: Iterable[str] | None = None, health: str | None = None,
            actor: bool = False) -> Callable[[_C], _C]:
    """``@meshscale.service(...)``: a class decorator that records how the class is
    deployed (the keywords of ``Mesh.deploy``, each optional); ``mesh.deploy(Cls, name,
    *init_args)`` uses them, and a keyword given to ``deploy`` overrides the class's
    (``replicas`` and ``autoscale`` count as one choice: giving either drops both of the
    class's). ``actor=True`` makes it an actor service (one instance per key,
    ``mesh.actor(name, key)``): ``deploy`` then deploys it as ``deploy_actor`` does, and
    ``replicas``, ``autoscale`` and ``health`` are refused. The class itself is returned
    unchanged but for the recorded options; it can still be constructed locally."""
    given: dict[str, Any] = {k: v for k, v in (("placement", placement), ("replicas", replicas),
                               ("autoscale", autoscale), ("cpus", cpus),
                               ("memory_mb", memory_mb), ("gpus", gpus),
                               ("data_class", data_class), ("residency", residency),
                               ("labels", labels), ("idempotent", idempotent),
                               ("health", health)) if v is not None}
    if idempotent is not None:
        if isinstance(idempotent, str):
            raise ValueError(f"idempotent takes a list of method names, not one string "
                             f"({idempotent!r})")
        given["idempotent"] = tuple(idempotent)
    if actor:
        bad = [k for k in _ACTOR_REFUSES if k in given]
        if bad:
            raise ValueError(f"an actor service has one instance per key: "
                             f"{', '.join(bad)} do not apply to it")
    if "replicas" in given and "autoscale" in given:
        raise ValueError("give replicas or autoscale, not both")

    def wrap(cls: _C) -> _C:
        if not isinstance(cls, type):
            raise TypeError(f"@meshscale.service decorates a class, not "
                            f"{type(cls).__name__}")
        setattr(cls, SERVICE_ATTR, ServiceOptions(actor, dict(given)))
        return cls

    return wrap


def _options(cls: type, given: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """(actor, every deploy option): ``given`` (the call's, None for not given) over the
    class's ``@service`` options over the defaults."""
    declared = getattr(cls, SERVICE_ATTR, None)
    if not isinstance(declared, ServiceOptions):
        declared = ServiceOptions()
    out = {"replicas": None, "autoscale": None, "data_class": None, "residency": None,
           "labels": None, "health": None, **_BUILTIN, **declared.options}
    if given.get("replicas") is not None or given.get("autoscale") is not None:
        out["replicas"] = out["autoscale"] = None
    out.update({k: v for k, v in given.items() if v is not None})
    return declared.actor, out

CALL_SLACK_S = 10.0
"""Added to twice a call's timeout for the hops (client -> node -> replica's node)."""


class ServiceCallError(MeshError):
    """A service call that did not return a value. ``kind``: ``raised`` (the method
    raised; ``traceback`` is the replica's), ``unpicklable``, ``too-large``, ``timeout``,
    ``crashed``, ``busy``, ``no-replica``, ``replica-lost``, ``retries-exhausted``."""

    def __init__(self, service: str, method: str, kind: str, message: str,
                 traceback: str = "", node: str = "") -> None:
        text = f"service {service!r}.{method} failed ({kind}): {message}"
        if node:
            text += f" on {node}"
        if traceback:
            text += "\n\nRemote traceback:\n" + traceback.rstrip()
        super().__init__(text, kind)
        self.service = service
        self.method = method
        self.kind = kind
        self.message = message
        self.traceback = traceback
        self.node = node


def _public_methods(cls: type) -> list[str]:
    return sorted(n for n in dir(cls)
                  if not n.startswith("_") and callable(getattr(cls, n, None)))


def _pickle_class(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    module_name = getattr(cls, "__module__", None) or "__main__"
    mod = sys.modules.get(module_name)
    registered = False
    if module_name != "__main__" and mod is not None and by_value(module_name):
        with contextlib.suppress(ValueError):
            cloudpickle.register_pickle_by_value(mod)
            registered = True
    try:
        data: bytes = cloudpickle.dumps((cls, args, kwargs), protocol=5)
        return data
    except Exception as e:
        raise MeshError(f"cannot pickle service class {cls.__name__!r} or its arguments: "
                        f"{type(e).__name__}: {e}") from None
    finally:
        if registered:
            with contextlib.suppress(ValueError):
                cloudpickle.unregister_pickle_by_value(mod)


class _Method:
    def __init__(self, service: Service, name: str) -> None:
        self._service = service
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._service.call(self._name, *args, **kwargs)

    def remote(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Start the call; a ``concurrent.futures.Future`` of its value."""
        return self._service.call_future(self._name, *args, **kwargs)

    async def call_async(self, *args: Any, **kwargs: Any) -> Any:
        """The call, awaited in the caller's own asyncio loop (``Service.call_async``)."""
        return await self._service.call_async(self._name, *args, **kwargs)


class Service:
    """A handle on a deployed service: ``call("method", *args, timeout=)``,
    ``handle.method(*args)``, ``handle.method.remote(*args)`` (a future) and, in an
    asyncio program, ``await handle.method.call_async(*args)`` or
    ``await handle.call_async("method", *args)``."""

    _actor_key: str | None = None

    def __init__(self, mesh: Mesh, name: str, timeout: float = 30.0) -> None:
        self._mesh = mesh
        self.name = name
        self.timeout = timeout
        self.last_node = ""
        """The node that answered the last call that returned a value."""

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)

    def _request(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 timeout: float | None) -> CallRequest:
        t = self.timeout if timeout is None else timeout
        if not 0 < t <= api.MAX_CALL_TIMEOUT_S:
            raise ValueError(f"timeout must be in (0, {api.MAX_CALL_TIMEOUT_S:g}] s, got {t!r}")
        try:
            data = cloudpickle.dumps((args, kwargs), protocol=5)
        except Exception as e:
            raise ServiceCallError(self.name, method, "unpicklable",
                                   f"cannot pickle the arguments: {type(e).__name__}: {e}"
                                   ) from None
        if len(data) > api.MAX_CALL_ARGS_BYTES:
            raise ServiceCallError(self.name, method, "too-large",
                                   f"arguments of {len(data)} bytes exceed the call size "
                                   f"limit MAX_CALL_ARGS_BYTES={api.MAX_CALL_ARGS_BYTES}")
        return CallRequest(service=self.name, method=method, args=data, timeout_s=t,
                           actor_key=self._actor_key)

    async def _call(self, req: CallRequest) -> Any:
        inner = self._mesh._inner
        # A call whose timeout is longer than the mesh's connection timeout gets a
        # connection of its own with a long enough one: the node may spend the call's
        # timeout twice (an idempotent call is retried once after a timeout) plus hops.
        if req.timeout_s > inner.timeout:
            conn = RpcConnection(inner.address, inner._creds,
                                 2 * req.timeout_s + CALL_SLACK_S)
            try:
                reply = await conn.request(api.CALL, req)
            except RpcError as e:
                raise MeshError(str(e), getattr(e, "code", ""),
                                unreachable=e.unreachable) from None
            finally:
                await conn.close()
        else:
            # A task mesh's extra connections (4) carry calls side by side; the main one
            # would take them one at a time.
            trequest = getattr(inner, "_trequest", None)
            reply = await (trequest(api.CALL, req) if trequest is not None
                           else inner._request(api.CALL, req))
        if reply.outcome != "done":
            raise ServiceCallError(self.name, req.method, reply.outcome, reply.message,
                                   reply.traceback, reply.node)
        self.last_node = reply.node
        return cloudpickle.loads(reply.value)

    def call(self, method: str, *args: Any, timeout: float | None = None,
             **kwargs: Any) -> Any:
        """Call ``method(*args, **kwargs)`` on a replica and return its value; raises
        ``ServiceCallError`` (``MeshError`` for an unknown service or method)."""
        req = self._request(method, args, kwargs, timeout)
        return self._mesh._run(self._call(req))

    def call_future(self, method: str, *args: Any, timeout: float | None = None,
                    **kwargs: Any) -> concurrent.futures.Future[Any]:
        req = self._request(method, args, kwargs, timeout)
        mesh = self._mesh
        if mesh._closed:
            raise MeshError("this Mesh is closed")
        import asyncio

        return asyncio.run_coroutine_threadsafe(self._call(req), mesh._runner.loop)

    async def call_async(self, method: str, *args: Any, timeout: float | None = None,
                         **kwargs: Any) -> Any:
        """``call`` for an asyncio program: awaits the call in the caller's loop while the
        mesh's own loop (its thread) carries it, so the caller's loop is never blocked;
        many such calls run side by side (``asyncio.gather``)."""
        import asyncio

        return await asyncio.wrap_future(self.call_future(method, *args, timeout=timeout,
                                                          **kwargs))


class Actor(Service):
    """A handle on one key of an actor service (``mesh.actor(name, key)``): the calls
    of ``Service``, all to that key's instance, one at a time."""

    def __init__(self, mesh: Mesh, name: str, key: str, timeout: float = 30.0) -> None:
        super().__init__(mesh, name, timeout)
        self._actor_key = key
        self.key = key


class ServicesMixin:
    """``deploy`` / ``service`` / ``services`` / ``remove_service`` on a blocking ``Mesh``."""

    def deploy(self, cls: type, name: str, *init_args: Any,
               placement: str | Region | Regions | None = None,
               replicas: int | None = None,
               autoscale: tuple[int, int, float] | None = None,
               cpus: float | None = None, memory_mb: int | None = None,
               gpus: int | None = None,
               data_class: str | None = None, residency: Sequence[str] | None = None,
               labels: dict[str, str] | None = None,
               idempotent: Iterable[str] | None = None, health: str | None = None,
               **init_kwargs: Any) -> list[str]:
        """Deploy class ``cls`` as service ``name``: each replica runs
        ``cls(*init_args, **init_kwargs)`` once, then answers calls to its public methods.
        ``placement``: "near-caller" (the default), "central", ``Region(name)`` (central
        there) or ``Regions([...])``; ``replicas=N`` or ``autoscale=(min, max,
        target_inflight)``; ``cpus`` (1.0), ``memory_mb``, ``gpus`` (0);
        ``idempotent``: the methods retried once on another replica when theirs dies.
        ``health``: a public method each replica's node calls with no arguments every
        few seconds; returning ``False``, raising or not answering a few times in a row
        makes the replica unhealthy: calls go elsewhere and it is restarted.
        An option not given here comes from the class's ``@meshscale.service(...)``, if
        it has one (a class declared ``actor=True`` is deployed as ``deploy_actor``
        does), else from the defaults. Returns the nodes the replicas go to.
        ``MeshError`` names the field or the placement rule that refused it."""
        actor, o = _options(cls, {
            "placement": placement, "replicas": replicas, "autoscale": autoscale,
            "cpus": cpus, "memory_mb": memory_mb, "gpus": gpus, "data_class": data_class,
            "residency": residency, "labels": labels, "idempotent": idempotent,
            "health": health})
        if actor:
            bad = [k for k in _ACTOR_REFUSES if o[k] is not None]
            if bad:
                raise ValueError(f"{cls.__name__} is an actor service (@meshscale.service("
                                 f"actor=True)): {', '.join(bad)} do not apply to it")
        return self._deploy(cls, name, init_args, init_kwargs, actor, **o)

    def deploy_actor(self, cls: type, name: str, *init_args: Any,
                     placement: str | Region | Regions | None = None,
                     cpus: float | None = None, memory_mb: int | None = None,
                     gpus: int | None = None,
                     data_class: str | None = None, residency: Sequence[str] | None = None,
                     labels: dict[str, str] | None = None,
                     idempotent: Iterable[str] | None = None, **init_kwargs: Any) -> None:
        """Deploy class ``cls`` as actor service ``name``: one instance per key
        (``mesh.actor(name, key)``), on the key's owner, a node chosen by rendezvous
        hashing among those the placement rules allow. A key's first call constructs
        ``cls(*init_args, **init_kwargs)``; its calls run one at a time, and after each
        the instance is pickled into a checkpoint in the mesh's KV before the call
        returns, so when the owner's node dies the next call continues, on the next
        owner, from the last call that returned (``core/actors.py`` states the exact
        guarantee). The pickled state is bounded (``ActorConfig.max_state_bytes``).
        ``idempotent``: methods retried once when their owner is lost mid-call. Options
        not given come from the class's ``@meshscale.service(...)``, as for ``deploy``."""
        _, o = _options(cls, {
            "placement": placement, "cpus": cpus, "memory_mb": memory_mb, "gpus": gpus,
            "data_class": data_class, "residency": residency, "labels": labels,
            "idempotent": idempotent})
        bad = [k for k in _ACTOR_REFUSES if o[k] is not None]
        if bad:
            raise ValueError(f"{cls.__name__}'s @meshscale.service sets {', '.join(bad)}, "
                             f"which an actor service (one instance per key) has no use for")
        self._deploy(cls, name, init_args, init_kwargs, True, **o)

    def _deploy(self, cls: type, name: str, init_args: tuple[Any, ...],
                init_kwargs: dict[str, Any], actor: bool, *,
                placement: str | Region | Regions, replicas: int | None,
                autoscale: tuple[int, int, float] | None, cpus: float, memory_mb: int,
                gpus: int, data_class: str | None, residency: Sequence[str] | None,
                labels: dict[str, str] | None, idempotent: Iterable[str],
                health: str | None) -> list[str]:
        if not isinstance(cls, type):
            raise TypeError(f"deploy takes a class, not {type(cls).__name__}")
        mode: api.Placement = "near-caller"
        central: str | None = None
        regions: list[str] | None = None
        if isinstance(placement, Region):
            mode, central = "central", placement.name
        elif isinstance(placement, Regions):
            mode, regions = "regions", list(placement.names)
        elif placement in ("near-caller", "central"):
            mode = placement  # type: ignore[assignment]
        else:
            raise ValueError(f"placement must be 'near-caller', 'central', Region(...) or "
                             f"Regions([...]), not {placement!r}")
        if isinstance(idempotent, str):
            raise ValueError(f"idempotent takes a list of method names, not one string "
                             f"({idempotent!r})")
        methods = _public_methods(cls)
        if not methods:
            raise ValueError(f"class {cls.__name__} has no public method to call")
        if health is not None and health not in methods:
            raise ValueError(f"health names {health!r}, not a public method of class "
                             f"{cls.__name__} (it has: {', '.join(methods[:20])})")
        code = _pickle_class(cls, init_args, init_kwargs)
        res = None
        if data_class is not None or residency is not None:
            res = ResidencyWire(None if residency is None else list(residency), data_class)
        auto = None if autoscale is None else AutoscaleWire(*autoscale)
        spec = ServiceWire(
            name=name, placement=mode, regions=regions, central_region=central,
            replicas=replicas, autoscale=auto, cpus=cpus, memory_mb=memory_mb, gpus=gpus,
            residency=res, labels=dict(labels or {}), idempotent=sorted(set(idempotent)),
            methods=methods, health=health, class_name=cls.__qualname__, code_id=object_id(code),
            actor=actor)
        mesh: Mesh = self  # type: ignore[assignment]
        r = mesh._run(mesh._inner._request(api.DEPLOY, DeployRequest(spec=spec, code=code)))
        return list(r.nodes)

    def actor(self, name: str, key: str, *, timeout: float = 30.0) -> Actor:
        """A handle on key ``key`` of actor service ``name``: ``call("method", *args)``,
        ``handle.method(*args)``, ``handle.method.remote(*args)``."""
        return Actor(self, name, check_actor_key(key), timeout)  # type: ignore[arg-type]

    def service(self, name: str, *, timeout: float = 30.0) -> Service:
        """A handle on service ``name`` (nothing is asked of the mesh until a call)."""
        return Service(self, name, timeout)  # type: ignore[arg-type]

    def services(self) -> list[api.ServiceInfo]:
        """The deployed services as the connected node sees them: replicas, nodes,
        in-flight calls, latencies, calls per source region."""
        mesh: Mesh = self  # type: ignore[assignment]
        return list(mesh._run(mesh._inner._request(api.LIST, Empty())).services)

    def remove_service(self, name: str) -> None:
        """Stop service ``name`` everywhere (``MeshError`` if there is none)."""
        mesh: Mesh = self  # type: ignore[assignment]
        mesh._run(mesh._inner._request(api.REMOVE, RemoveRequest(name=name)))
