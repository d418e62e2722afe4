"""The services plane's methods (issue #22; ``runtime/services_plane.py`` serves them).

A client deploys a service once (``svc.deploy``: its spec, and its class with its
``__init__`` arguments pickled together as ``code``); the node stores the code as a
replicated object and the spec (``ServiceWire``) in the replicated KV under
``service/<name>``, and tells every live node (``svc.notify``). A call goes to any node
(``svc.call``): that node routes it to a replica (``core.services.route_call``) and
forwards it to the replica's node (``svc.invoke``), which hands it to the replica's
process. Nodes learn each other's replicas, in-flight counts, call counts and autoscaler
states by polling ``svc.status``.

Arguments and results travel as bytes in one of two encodings: ``pickle`` (the Python
client: cloudpickle of ``(args, kwargs)`` and of the result) or ``json`` (the HTTP route:
``{"args": [...], "kwargs": {...}}`` and the result as JSON). The node never unpickles
either: only the replica's process does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from meshscale.core.actors import MAX_ACTOR_KEY_CHARS
from meshscale.core.api.contract import (
    MAX_REGIONS,
    Empty,
    Method,
    RegionName,
    Request,
    ResidencyWire,
)

__all__ = [
    "CALL", "DEPLOY", "INVOKE", "LIST", "MAX_CALL_ARGS_BYTES", "MAX_CALL_TIMEOUT_S",
    "MAX_CODE_BYTES", "MAX_ERROR_CHARS", "MAX_IDEMPOTENT", "MAX_LABELS", "MAX_METHODS", "MAX_METHOD_CHARS",
    "MAX_RESULT_BYTES", "MAX_SERVICES", "MAX_SERVICE_NAME_CHARS", "MAX_TRACEBACK_CHARS",
    "METHODS", "NOTIFY", "OUTCOMES", "REMOVE", "STATUS", "AutoscaleWire", "CallReply",
    "CallRequest", "DeployReply", "DeployRequest", "Encoding", "InvokeReply",
    "InvokeRequest", "ListReply", "NotifyRequest", "Outcome", "RemoveReply",
    "RemoveRequest", "ReplicaInfo", "ReplicaStatus", "ScaleWire", "ServiceInfo",
    "ServiceName", "ServiceWire", "StatusReply",
]

MAX_SERVICE_NAME_CHARS = 200
MAX_METHOD_CHARS = 128
MAX_METHODS = 256
"""Public methods one service's class may have."""
MAX_IDEMPOTENT = MAX_METHODS
MAX_LABELS = 64
MAX_CODE_BYTES = 8 * 1024 * 1024
"""A service's pickled class and ``__init__`` arguments (a node's request frame holds
no more; load a large model from an object in ``__init__``)."""
MAX_CALL_ARGS_BYTES = 1024 * 1024
"""One call's encoded arguments: the call size limit."""
MAX_RESULT_BYTES = 16 * 1024 * 1024
"""One call's encoded result."""
MAX_CALL_TIMEOUT_S = 600.0
MAX_SERVICES = 64
"""Services one mesh may run (each node polls every other node's replica table)."""
MAX_TRACEBACK_CHARS = 64 * 1024
MAX_ERROR_CHARS = 2_000
"""A replica start failure as a status carries it."""

ServiceName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SERVICE_NAME_CHARS,
                                          pattern=r"^[^/\x00]+$")]
"""No ``/`` (KV keys and URL paths are made of it) and no NUL."""
MethodName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_METHOD_CHARS,
                                         pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]
"""A public method: an identifier not starting with ``_``."""
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
LabelKey = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
LabelValue = Annotated[str, msgspec.Meta(max_length=256)]
Count = Annotated[int, msgspec.Meta(ge=1, le=64)]
Encoding = Literal["pickle", "json"]
Placement = Literal["near-caller", "central", "regions"]
TimeoutS = Annotated[float, msgspec.Meta(gt=0, le=MAX_CALL_TIMEOUT_S)]
ActorKey = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ACTOR_KEY_CHARS,
                                       pattern=r"^[^\x00]+$")]
NodeName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]

Outcome = Literal["done", "raised", "unpicklable", "too-large", "timeout", "crashed",
                  "not-here", "busy", "no-replica", "replica-lost", "retries-exhausted"]
"""How a call ended: ``done`` (``value`` holds the result); ``raised`` (the method raised:
``message`` and ``traceback`` are the replica's); ``unpicklable`` (the arguments or the
result could not be decoded or encoded); ``too-large`` (a result over
``MAX_RESULT_BYTES``); ``timeout`` and ``crashed`` (the replica did not answer in time,
or its process died: it is restarted); ``not-here`` (the asked node runs no replica:
the caller's view was stale); ``busy`` (the replica's queue is full); and the routing
errors of ``core.services`` (``no-replica``, ``replica-lost``, ``retries-exhausted``)."""
OUTCOMES: tuple[str, ...] = (
    "done", "raised", "unpicklable", "too-large", "timeout", "crashed", "not-here",
    "busy", "no-replica", "replica-lost", "retries-exhausted")


class AutoscaleWire(msgspec.Struct, forbid_unknown_fields=True):
    min_replicas: Count
    max_replicas: Count
    target_inflight: Annotated[float, msgspec.Meta(gt=0, le=1e6)]


class ServiceWire(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A deployed service as stored in the KV (``service/<name>``) and sent to every node;
    ``core.services.ServiceSpec`` is built from it (``runtime/services_plane.py``)."""

    name: ServiceName
    placement: Placement = "near-caller"
    regions: Annotated[list[RegionName], msgspec.Meta(max_length=MAX_REGIONS)] | None = None
    """``regions``: the regions its replicas may run in."""
    central_region: RegionName | None = None
    replicas: Count | None = None
    autoscale: AutoscaleWire | None = None
    cpus: Annotated[float, msgspec.Meta(gt=0, le=1e4)] = 1.0
    memory_mb: Annotated[int, msgspec.Meta(ge=0, le=1 << 30)] = 0
    gpus: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0
    residency: ResidencyWire | None = None
    labels: Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=MAX_LABELS)] = {}
    idempotent: Annotated[list[MethodName], msgspec.Meta(max_length=MAX_IDEMPOTENT)] = []
    methods: Annotated[list[MethodName], msgspec.Meta(min_length=1, max_length=MAX_METHODS)]
    """The class's public methods (a call to another is refused at the caller's node)."""
    health: MethodName | None = None
    """The method each replica's node calls every ``service_health_interval_s`` (no
    arguments; returning ``False``, raising or not answering is a failed check)."""
    class_name: Annotated[str, msgspec.Meta(max_length=256)] = ""
    code_id: Id
    """The object holding the pickled ``(class, args, kwargs)`` (its content id)."""
    actor: bool = False
    """An actor service (``core/actors.py``): one instance per key, on the key's owner,
    its state checkpointed in the KV after each call; calls name a key."""


class DeployRequest(Request):
    spec: ServiceWire
    """``code_id`` must be the content id of ``code``."""
    code: Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_CODE_BYTES)]


class DeployReply(msgspec.Struct):
    name: str
    nodes: list[str]
    """Where its replicas go in this node's view now."""
    wanted: int


class RemoveRequest(Request):
    name: ServiceName


class RemoveReply(msgspec.Struct):
    removed: str


class NotifyRequest(Request):
    """One of: a service deployed (``spec``) or removed (``removed``) elsewhere."""

    spec: ServiceWire | None = None
    removed: ServiceName | None = None


class CallRequest(Request):
    service: ServiceName
    method: MethodName
    args: Annotated[bytes, msgspec.Meta(max_length=MAX_CALL_ARGS_BYTES)]
    encoding: Encoding = "pickle"
    timeout_s: TimeoutS = 30.0
    actor_key: ActorKey | None = None
    """The key a call to an actor service goes to (required there, refused elsewhere)."""


class CallReply(msgspec.Struct, omit_defaults=True):
    outcome: Outcome
    value: bytes = b""
    """The result, in the call's encoding (``done``)."""
    message: str = ""
    traceback: str = ""
    node: str = ""
    """The replica's node that answered (or was tried last)."""
    region: str = ""
    attempts: int = 1


class InvokeRequest(Request):
    """The caller's node hands a call to a replica's node."""

    service: ServiceName
    method: MethodName
    args: Annotated[bytes, msgspec.Meta(max_length=MAX_CALL_ARGS_BYTES)]
    encoding: Encoding = "pickle"
    timeout_s: TimeoutS = 30.0
    caller_region: RegionName | None = None
    actor_key: ActorKey | None = None
    exclude: Annotated[list[NodeName], msgspec.Meta(max_length=64)] = []
    """For an actor call: nodes the caller could not reach, left out of the owner's
    rendezvous (``core.actors.actor_owner``) by the node asked too."""


class InvokeReply(msgspec.Struct, omit_defaults=True):
    outcome: Outcome
    value: bytes = b""
    message: str = ""
    traceback: str = ""


class ReplicaStatus(msgspec.Struct, omit_defaults=True):
    ready: bool = False
    inflight: int = 0
    calls: int = 0
    """Calls this replica answered since it started."""
    failed: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    constructed: int = 0
    """Times its class was constructed (1 per process start)."""
    healthy: bool = True
    """False once its health method failed ``health_failures`` times in a row: not
    routed to, and restarted."""
    health_failures: int = 0
    """Health checks failed or unanswered in a row now."""


class ScaleWire(msgspec.Struct, array_like=True):
    """A node's autoscaler state for a service; dwell starts as ages (seconds ago), since
    each node's monotonic clock is its own."""

    desired: int
    above_age_s: float | None = None
    below_age_s: float | None = None


class StatusReply(msgspec.Struct, omit_defaults=True):
    node: str
    region: str
    replicas: dict[str, ReplicaStatus] = {}
    """Replicas on this node (starting or ready), by service."""
    calls: dict[str, int] = {}
    """Calls routed from this node per service over the node's call window."""
    scale: dict[str, ScaleWire] = {}
    """This node's autoscaler state per autoscaled service."""
    errors: dict[str, str] = {}
    """Why this node's last start of a service's replica failed (its ``__init__``
    raised, say), while it waits to try again."""


class ReplicaInfo(ReplicaStatus, omit_defaults=True):
    node: str = ""
    region: str = ""


class ServiceInfo(msgspec.Struct, omit_defaults=True):
    spec: ServiceWire
    desired: int
    """The replica count placed with (fixed, or the autoscaled count most nodes hold)."""
    placed: list[str]
    """Where this node's view places the replicas."""
    replicas: list[ReplicaInfo]
    calls_by_region: dict[str, int]
    unplaceable: str = ""
    """The rule and message when no node may run it."""
    errors: dict[str, str] = {}
    """Per node, why its last start of a replica failed (while it retries)."""


class ListReply(msgspec.Struct):
    services: list[ServiceInfo]


DEPLOY: Method[DeployRequest, DeployReply] = Method("svc.deploy", DeployRequest, DeployReply)
REMOVE: Method[RemoveRequest, RemoveReply] = Method("svc.remove", RemoveRequest, RemoveReply)
LIST: Method[Empty, ListReply] = Method("svc.list", Empty, ListReply)
CALL: Method[CallRequest, CallReply] = Method("svc.call", CallRequest, CallReply)
NOTIFY: Method[NotifyRequest, None] = Method("svc.notify", NotifyRequest, None)
INVOKE: Method[InvokeRequest, InvokeReply] = Method("svc.invoke", InvokeRequest, InvokeReply)
STATUS: Method[Empty, StatusReply] = Method("svc.status", Empty, StatusReply)

METHODS: tuple[Method[Any, Any], ...] = (DEPLOY, REMOVE, LIST, CALL, NOTIFY, INVOKE, STATUS)
