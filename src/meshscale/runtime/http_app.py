"""The node's HTTP application (aiohttp): the routes, handlers and caches behind
``runtime/http.py``'s ``HttpServer``, which imports this module on the first connection to
the node's HTTP port (see there for what is served)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from meshscale.core.api import ApiError, Empty, ErrorCode
from meshscale.core.api import services as services_api
from meshscale.core.api import streams as streams_api
from meshscale.core.api.objects import MAX_NAME_LENGTH
from meshscale.core.api.streams import StreamStats
from meshscale.core.objects import prefix_problem
from meshscale.runtime.metrics import MeshCollector
from meshscale.runtime.observe import SNAPSHOT_POINTS, NodeObserver, ObservedNode
from meshscale.runtime.openapi import openapi_document
from meshscale.trust.bundle import is_valid_token

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
OBJECTS_TTL_S = 5.0
SNAPSHOT_OBJECTS = 200
"""Objects in a snapshot (the dashboard's table); ``objects_more`` says the mesh has more."""
MAX_QUERY_CHARS = MAX_NAME_LENGTH
"""Longest value of a listing's text parameter (``after``, ``prefix``, ``class``)."""
TASKS_TTL_S = 2.0
"""The mesh-wide task table (a fan-out to every node) is reused this long."""
TASK_ROWS = 200
POINTS_TTL_S = 2.0
"""Every node's newest points (a fan-out to every node) are reused this long."""
STREAMS_TIMEOUT_S = 2.0
STREAMS_TTL_S = 2.0
SNAPSHOT_TTL_S = 0.9
MAX_LIMIT = 10_000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(ValueError):
    """A query parameter the client got wrong: 400 with the message."""


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


_OUTCOME_STATUS = {
    "raised": 500, "unpicklable": 400, "too-large": 413, "timeout": 504, "crashed": 502,
    "busy": 429, "no-replica": 503, "replica-lost": 502, "retries-exhausted": 502,
    "not-here": 503,
}
"""HTTP status of each way a service call can fail (``core.api.services.OUTCOMES``)."""


def _service_error(status: int, kind: str, message: str, traceback: str = "",
                   node: str = "") -> web.Response:
    body: dict[str, Any] = {"error": message, "kind": kind}
    if traceback:
        body["traceback"] = traceback
    if node:
        body["node"] = node
    return _json(body, status)


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, not {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}")
    return value


class HttpApp:
    """The aiohttp application behind ``http.HttpServer``: built on the first connection to
    the node's HTTP port, then serving on the sockets the server bound at start."""

    def __init__(self, agent: ObservedNode, observer: NodeObserver) -> None:
        self.agent = agent
        self.observer = observer
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MeshCollector(self.observer))
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self._objects: tuple[float, int, list[dict[str, Any]], str | None] | None = None
        self._objects_lock = asyncio.Lock()
        self._tasks_lock = asyncio.Lock()
        self._tasks_cache: tuple[float, dict[str, Any]] | None = None
        self._points_lock = asyncio.Lock()
        self._points_cache: tuple[float, dict[str, Any]] | None = None
        self._snapshot: tuple[float, bytes] | None = None
        self._streams_cache: tuple[float, dict[str, Any]] | None = None
        self._snapshot_lock = asyncio.Lock()
        self._openapi = json.dumps(openapi_document()).encode()
        self._closing = False

    # ------------------------------------------------------------------ life cycle

    async def start(self, sockets: list[socket.socket], tls: ssl.SSLContext | None,
                    backlog: int) -> None:
        """Serve on ``sockets`` (bound and listening; connections already waiting in their
        backlog are accepted now)."""
        # aiohttp logs a request it cannot parse with the raw header line, token and all,
        # as plain text into the node's JSON log; our own middleware reports what matters
        # (by type only), so aiohttp's loggers are silenced.
        quiet = logging.getLogger("aiohttp")
        quiet.propagate = False
        if not quiet.handlers:
            quiet.addHandler(logging.NullHandler())
        app = web.Application(middlewares=[self._errors])
        r = app.router
        r.add_get("/", self._index)
        r.add_get("/static/{name}", self._static)
        r.add_get("/metrics", self._metrics)
        r.add_get("/api/v1/openapi.json", self._openapi_json)
        for path, handler in {
            "node": self._node, "members": self._members, "objects": self._objects_api,
            "tasks": self._tasks, "events": self._events, "throughput": self._throughput,
            "snapshot": self._snapshot_api, "stream": self._stream,
            "streams": self._streams_api, "services": self._services_api,
        }.items():
            r.add_get(f"/api/v1/{path}", self._authed(handler))
        r.add_post("/api/v1/services/{name}/{method}", self._service_call)
        cfg = self.agent.cfg
        # keepalive_timeout also bounds a connection that has not sent a whole request yet
        # (aiohttp's default of 3630 s let 300 half-open connections stay for an hour).
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0,
                                     keepalive_timeout=cfg.http_idle_timeout_s,
                                     max_line_size=8190, max_field_size=8190, max_headers=64)
        await self._runner.setup()
        handlers = self._runner.server
        assert handlers is not None
        admit = handlers.connection_made

        def limited(handler: Any, transport: Any) -> None:
            admit(handler, transport)
            if len(handlers.connections) > cfg.max_http_connections:
                self.agent.stats.rejected["http_busy"] += 1
                transport.close()

        handlers.connection_made = limited  # type: ignore[method-assign]
        try:
            for sock in sockets:
                await web.SockSite(self._runner, sock, ssl_context=tls,
                                   backlog=backlog).start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        self._closing = True
        for task in list(self._streams):
            task.cancel()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ plumbing

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as e:
            return _error(400, str(e))
        except web.HTTPException as e:
            if e.status >= 400:
                return _error(e.status, e.reason or "error")
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:  # one bad request must not take the server down
            # Only the type: a message or repr may carry what the client sent (a token).
            self.agent.stats.runtime["http_errors"] += 1
            self.agent.log_limited("http_handler_failed", path=request.path[:100],
                                   error=type(e).__name__)
            return _error(500, f"internal error: {type(e).__name__}")

    def _authorized(self, request: web.Request) -> str | None:
        """None if the bearer token is right, else why not."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            return "missing Authorization: Bearer TOKEN (meshscale token --bundle DIR)"
        if scheme.lower() != "bearer" or not token.strip():
            return "use Authorization: Bearer TOKEN"
        if not is_valid_token(token.strip()):
            return "wrong token"  # not even a token's shape (checked before any use of it)
        if not self.agent.bundle.check_read_token(token.strip()):
            return "wrong token"
        return None

    def _deny(self, request: web.Request, *, auth: bool) -> web.Response | None:
        """401 for a missing or wrong token (when ``auth``), 503 while starting; else None."""
        if auth:
            why = self._authorized(request)
            if why is not None:
                self.agent.stats.rejected["http_unauthorized"] += 1
                return _error(401, why)
        if self.agent.membership is None:
            return _error(503, "node is starting")
        return None

    def _authed(self, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            denied = self._deny(request, auth=True)
            return denied if denied is not None else await handler(request)

        return wrapped

    # ------------------------------------------------------------------ services

    async def _service_call(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/v1/services/NAME/METHOD[?key=K]``: the body is a JSON list of
        arguments or ``{"args": [...], "kwargs": {...}}`` (empty: no arguments); ``key``
        names an actor's key (``deploy_actor``); the answer is
        ``{"result": ..., "node", "region", "attempts"}``. The node never decodes the
        arguments or the result: the replica does (``runtime/replica_main.py``)."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not is_valid_token(token) or \
                not self.agent.bundle.check_read_token(token):
            self.agent.stats.rejected["http_unauthorized"] += 1
            return _error(401, "missing or wrong token (Authorization: Bearer TOKEN)")
        if not self.agent.bundle.check_token(token):
            return _error(403, "a service call is a write: the read-only token may not "
                               "make it (rule: svc.call needs the admin token)")
        if self.agent.membership is None:
            return _error(503, "node is starting")
        limit = services_api.MAX_CALL_ARGS_BYTES
        if request.content_length is not None and request.content_length > limit:
            return _service_error(413, "too-large", f"arguments of {request.content_length} "
                                  f"bytes exceed MAX_CALL_ARGS_BYTES={limit}")
        body = await request.content.read(limit + 1)
        if len(body) > limit:
            return _service_error(413, "too-large",
                                  f"arguments exceed MAX_CALL_ARGS_BYTES={limit}")
        try:
            timeout_s = float(request.query.get("timeout_s", "30"))
        except ValueError:
            raise BadRequest("timeout_s must be a number of seconds") from None
        if not 0 < timeout_s <= services_api.MAX_CALL_TIMEOUT_S:
            raise BadRequest(f"timeout_s must be in (0, {services_api.MAX_CALL_TIMEOUT_S:g}]")
        try:
            req = services_api.CallRequest(
                service=request.match_info["name"], method=request.match_info["method"],
                args=body.strip() or b"[]", encoding="json", timeout_s=timeout_s,
                actor_key=request.query.get("key"))
            req = msgspec.convert(msgspec.to_builtins(req, builtin_types=(bytes,)),
                                  services_api.CallRequest, builtin_types=(bytes,))
        except msgspec.ValidationError as e:
            raise BadRequest(str(e)) from None
        try:
            reply = await self.agent.call_local(services_api.CALL, req)
        except ApiError as e:
            status = 404 if e.code == ErrorCode.NOT_FOUND else 400
            return _error(status, str(e))
        if reply.outcome != "done":
            return _service_error(_OUTCOME_STATUS.get(reply.outcome, 500), reply.outcome,
                                  reply.message, reply.traceback, reply.node)
        head = json.dumps({"node": reply.node, "region": reply.region,
                           "attempts": reply.attempts}, separators=(",", ":")).encode()
        return web.Response(body=head[:-1] + b',"result":' + reply.value + b"}",
                            content_type="application/json")

    # ------------------------------------------------------------------ dashboard files

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not STATIC_NAME.match(name) or ".." in name:
            return _error(404, "no such file")
        return self._file(name)

    def _file(self, name: str) -> web.StreamResponse:
        path = DASHBOARD_DIR / name
        if not path.is_file():
            return _error(404, f"{name} not found")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if name.endswith(".js"):
            ctype = "text/javascript"
        charset = "utf-8" if ctype.startswith("text/") or ctype.endswith(("json", "svg+xml")) \
            else None
        return web.Response(body=path.read_bytes(), content_type=ctype, charset=charset,
                            headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ metrics, openapi

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        denied = self._deny(request, auth=not self.agent.cfg.metrics_public)
        if denied is not None:
            return denied
        self.observer._hook_compute()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _openapi_json(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._openapi, content_type="application/json")

    # ------------------------------------------------------------------ JSON API

    async def _node(self, request: web.Request) -> web.StreamResponse:
        return _json(self.observer.node())

    async def _members(self, request: web.Request) -> web.StreamResponse:
        return _json({"members": self.observer.members()})

    async def _objects_api(self, request: web.Request) -> web.StreamResponse:
        """A page of the listing: ``limit``, after the cursor ``after``, narrowed by
        ``prefix`` and ``class``; ``next`` is the ``after`` of the following page (null:
        none), as ``meshscale objects`` pages."""
        limit = _int_param(request, "limit", 200, 1, MAX_LIMIT)
        q = request.query
        after, prefix, data_class = q.get("after", ""), q.get("prefix", ""), q.get("class")
        for name, value in (("after", after), ("prefix", prefix), ("class", data_class)):
            if value is not None and len(value) > MAX_QUERY_CHARS:
                raise BadRequest(f"{name} must be at most {MAX_QUERY_CHARS} characters")
        bad = prefix_problem(prefix)
        if bad is not None:
            raise BadRequest(f"prefix {prefix[:40]!r}: {bad}")
        if after or prefix or data_class is not None:
            objs, nxt = await self.observer.objects(limit, after=after, prefix=prefix,
                                                    data_class=data_class)
        else:
            objs, nxt = await self._object_list(limit)
        return _json({"objects": objs, "next": nxt})

    async def _object_list(self, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """The first ``limit`` objects of the mesh-wide listing (a fan-out) and the
        cursor after them (None: no more), reused for a few seconds."""
        async with self._objects_lock:
            now = time.monotonic()
            cached = self._objects
            if cached is None or cached[0] <= now or cached[1] < limit:
                asked = max(limit, SNAPSHOT_OBJECTS)
                objs, nxt = await self.observer.objects(asked)
                cached = self._objects = (time.monotonic() + OBJECTS_TTL_S, asked, objs, nxt)
            objs, nxt = cached[2], cached[3]
            # More than asked for are cached: the cursor is then the last one given.
            return objs[:limit], objs[limit - 1]["id"] if len(objs) > limit else nxt

    async def _snapshot_objects(self) -> dict[str, Any]:
        """The snapshot's first ``SNAPSHOT_OBJECTS`` objects, and whether the mesh holds
        more: the dashboard then says its counts are of the first ones, not of the mesh
        (issue #24: it said "200 objects, all fully replicated" of a mesh of a million,
        and under-replicated ones beyond the page went unseen)."""
        objs, nxt = await self._object_list(SNAPSHOT_OBJECTS)
        return {"objects": objs, "objects_more": nxt is not None}

    async def _tasks(self, request: web.Request) -> web.StreamResponse:
        limit = _int_param(request, "limit", 200, 1, MAX_LIMIT)
        return _json({"tasks": await self.observer.tasks(limit)})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        since = _int_param(request, "since", 0, 0, 2**62)
        return _json({"events": self.observer.events(since)})

    async def _throughput(self, request: web.Request) -> web.StreamResponse:
        resp = _json({"points": self.observer.throughput()})
        resp.enable_compression()  # the hour is about 1 MB of JSON; gzip when asked
        return resp

    def services_view(self) -> dict[str, Any]:
        """The services plane's ``view`` (its tables are local: no call to other nodes)."""
        plane = getattr(self.agent, "services", None)
        if plane is None:
            return {"services": []}
        view: dict[str, Any] = plane.view()
        return view

    async def _services_api(self, request: web.Request) -> web.StreamResponse:
        return _json(self.services_view())

    async def _streams_api(self, request: web.Request) -> web.StreamResponse:
        return _json(await self.streams_view())

    async def _streams_cached(self) -> dict[str, Any]:
        """``streams_view``, reused for ``STREAMS_TTL_S`` (it asks every node)."""
        now = time.monotonic()
        cached = self._streams_cache
        if cached is not None and cached[0] > now:
            return cached[1]
        view = await self.streams_view()
        self._streams_cache = (time.monotonic() + STREAMS_TTL_S, view)
        return view

    async def streams_view(self) -> dict[str, Any]:
        """Every live node's ``stream.stats``, merged."""
        plane = getattr(self.agent, "streams", None)
        ops: dict[str, dict[str, Any]] = {}
        shards: list[dict[str, Any]] = []
        cross: dict[str, int] = {}
        answered = 0
        if plane is None:
            return {"operators": [], "shards": [], "cross_region_bytes": {},
                    "nodes_answered": 0}
        for spec in plane.ops.values():
            ops[spec.name] = {"name": spec.name, "topic": spec.topic, "output": spec.output,
                              "mode": spec.mode, "region": spec.region, "runners": [],
                              "records_processed": 0}
        alive = [c.name for c in plane._alive()]

        async def one(name: str) -> StreamStats | None:
            try:
                return await asyncio.wait_for(
                    plane._call(name, streams_api.STATS, Empty()), STREAMS_TIMEOUT_S)
            except Exception:
                return None

        for st in await asyncio.gather(*(one(n) for n in alive)):
            if st is None:
                continue
            answered += 1
            node = st.node
            for sh in st.shards:
                shards.append({"topic": sh.topic, "source": sh.source, "node": node,
                               "role": sh.role, "base": sh.base, "head": sh.head,
                               "backlog": sh.backlog})
            for label, n in st.cross_region_bytes.items():
                cross[label] = cross.get(label, 0) + n
            for op, counters in st.operators.items():
                if op in ops:
                    ops[op]["records_processed"] += counters.get("records_processed", 0)
            for r in st.runners:
                op, _, source = r.partition("@")
                if op in ops:
                    ops[op]["runners"].append(f"{node}/{source}")
        return {"operators": sorted(ops.values(), key=lambda o: o["name"]),
                "shards": sorted(shards, key=lambda s: (s["topic"], s["source"], s["node"])),
                "cross_region_bytes": cross, "nodes_answered": answered}

    async def _mesh_tasks(self) -> dict[str, Any]:
        """``observer.mesh_tasks``, reused for ``TASKS_TTL_S``."""
        async with self._tasks_lock:
            cached = self._tasks_cache
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            view = await self.observer.mesh_tasks(TASK_ROWS)
            self._tasks_cache = (time.monotonic() + TASKS_TTL_S, view)
            return view

    async def _mesh_points(self) -> dict[str, Any]:
        """``observer.mesh_points``, reused for ``POINTS_TTL_S``."""
        async with self._points_lock:
            cached = self._points_cache
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            view = await self.observer.mesh_points()
            self._points_cache = (time.monotonic() + POINTS_TTL_S, view)
            return view

    async def snapshot(self) -> dict[str, Any]:
        return {
            "node": self.observer.node(),
            "members": self.observer.members(),
            "throughput": self.observer.throughput(SNAPSHOT_POINTS),
            "mesh_points": await self._mesh_points(),
            **await self._snapshot_objects(),
            "tasks": await self._mesh_tasks(),
            "events": self.observer.events(0, last=50),
            "streams": await self._streams_cached(),
            "services": self.services_view(),
        }

    async def _snapshot_bytes(self) -> bytes:
        async with self._snapshot_lock:
            cached = self._snapshot
            now = time.monotonic()
            if cached is not None and cached[0] > now:
                return cached[1]
            body = json.dumps(await self.snapshot(), separators=(",", ":")).encode()
            self._snapshot = (time.monotonic() + SNAPSHOT_TTL_S, body)
            return body

    async def _snapshot_api(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=await self._snapshot_bytes(), content_type="application/json")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if len(self._streams) >= self.agent.cfg.max_http_streams:
            self.agent.stats.runtime["http_streams_refused"] += 1
            return _error(503, f"too many streams open on this node "
                               f"(max {self.agent.cfg.max_http_streams})")
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            resp = web.StreamResponse(headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            })
            await resp.prepare(request)
            while not self._closing:
                body = await self._snapshot_bytes()
                try:
                    await resp.write(b"event: snapshot\ndata: " + body + b"\n\n")
                except (ConnectionResetError, RuntimeError):
                    break  # the client went away
                await asyncio.sleep(1.0)
            return resp
        finally:
            self._streams.discard(task)
