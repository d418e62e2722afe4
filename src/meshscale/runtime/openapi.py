"""The OpenAPI 3.1 description of a node's HTTP API (served at ``/api/v1/openapi.json``).

The schemas are JSON Schema 2020-12; the API tests validate every response body against
them, so this document and ``runtime/http_app.py`` cannot drift apart silently.
"""

from __future__ import annotations

import copy
from typing import Any

import meshscale

_NUM_OR_NULL: dict[str, Any] = {"type": ["number", "null"]}
_STR_OR_NULL: dict[str, Any] = {"type": ["string", "null"]}

SCHEMAS: dict[str, Any] = {
    "ServiceCallRequest": {
        "description": "A JSON list of positional arguments, or args and kwargs.",
        "oneOf": [
            {"type": "array"},
            {"type": "object", "additionalProperties": False,
             "properties": {"args": {"type": "array"}, "kwargs": {"type": "object"}}},
        ],
    },
    "ServiceCallResponse": {
        "type": "object",
        "required": ["result", "node", "region", "attempts"],
        "properties": {
            "result": {"description": "The method's return value, as JSON."},
            "node": {"type": "string", "description": "The replica's node that answered"},
            "region": {"type": "string"},
            "attempts": {"type": "integer", "minimum": 1},
        },
    },
    "ServiceCallError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "kind": {"type": "string", "description": "How the call failed: raised, "
                     "unpicklable, too-large, timeout, crashed, busy, no-replica, "
                     "replica-lost, retries-exhausted"},
            "traceback": {"type": "string"},
            "node": {"type": "string"},
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "Node": {
        "type": "object",
        "required": ["name", "address", "http", "region", "zone", "incarnation", "uptime_s",
                     "version"],
        "properties": {
            "name": {"type": "string"},
            "address": {"type": "string", "description": "HOST:PORT of gossip and TLS streams"},
            "http": {**_STR_OR_NULL, "description": "HOST:PORT of this HTTP API"},
            "region": {"type": "string"},
            "zone": {"type": "string"},
            "incarnation": {"type": "integer", "minimum": 0},
            "uptime_s": {"type": "number", "minimum": 0},
            "version": {"type": "string"},
        },
    },
    "Coordinate": {
        "type": "object",
        "description": "Vivaldi network coordinate; distances in seconds.",
        "required": ["vec", "height", "error"],
        "properties": {
            "vec": {"type": "array", "items": {"type": "number"}},
            "height": {"type": "number"},
            "error": {"type": "number"},
        },
    },
    "Load": {
        "type": "object",
        "description": "The member's last reported load (at most ~1 s stale while work flows).",
        "required": ["running", "queued", "free_cpus", "slots"],
        "properties": {
            "running": {"type": "integer", "minimum": 0},
            "queued": {"type": "integer", "minimum": 0},
            "free_cpus": {"type": "number", "minimum": 0},
            "slots": {"type": "number", "minimum": 0},
        },
    },
    "Member": {
        "type": "object",
        "required": ["name", "address", "http", "region", "zone", "state", "incarnation",
                     "rtt_ms", "coord", "load", "labels"],
        "properties": {
            "name": {"type": "string"},
            "address": {"type": "string"},
            "http": _STR_OR_NULL,
            "region": {"type": "string"},
            "zone": {"type": "string"},
            "state": {"enum": ["alive", "suspect", "dead", "left", "removed"]},
            "incarnation": {"type": "integer", "minimum": 0},
            "cert_expires": {"type": ["integer", "null"], "description": "When the member's "
                             "node certificate ends (Unix seconds), as the member says"},
            "disk_full": {"type": "boolean", "description": "The member says its disk is "
                          "full: it refuses writes and is left out of new replica sets"},
            "rtt_ms": {**_NUM_OR_NULL, "description": "RTT estimated from coordinates"},
            "coord": {"oneOf": [{"$ref": "#/components/schemas/Coordinate"}, {"type": "null"}]},
            "load": {"oneOf": [{"$ref": "#/components/schemas/Load"}, {"type": "null"}]},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "Object": {
        "type": "object",
        "required": ["id", "size", "replicas", "holders", "data_class", "residency",
                     "under_replicated"],
        "properties": {
            "id": {"type": "string"},
            "size": {"type": "integer", "minimum": 0},
            "replicas": {"type": "array", "items": {"type": "string"},
                         "description": "The replica set placement computes for the view"},
            "holders": {"type": "array", "items": {"type": "string"},
                        "description": "Live nodes that hold a copy"},
            "data_class": _STR_OR_NULL,
            "residency": {"oneOf": [{"type": "array", "items": {"type": "string"}},
                                    {"type": "null"}]},
            "under_replicated": {"type": "boolean"},
        },
    },
    "Task": {
        "type": "object",
        "required": ["id", "name", "state", "node", "reason", "owner", "submitted_at",
                     "latency_ms"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "state": {"enum": ["pending", "running", "done", "failed", "cancelled"]},
            "node": {**_STR_OR_NULL, "description": "Node it runs or ran on"},
            "reason": {"type": "string", "description": "Why it was placed there"},
            "owner": {"type": "string"},
            "submitted_at": {"type": "number", "description": "Unix seconds"},
            "latency_ms": {**_NUM_OR_NULL, "description": "Submit to outcome"},
        },
    },
    "Event": {
        "type": "object",
        "required": ["seq", "time", "kind", "node", "detail"],
        "properties": {
            "seq": {"type": "integer", "minimum": 1},
            "time": {"type": "number", "description": "Unix seconds"},
            "kind": {"type": "string", "description": (
                "member_joined, member_alive, member_suspect, member_down, member_left, "
                "member_updated, re_replication, under_replicated, task_retry, task_adopted, "
                "capacity, ready (the node finished starting)")},
            "node": {"type": "string"},
            "detail": {"type": "string"},
        },
    },
    "ThroughputPoint": {
        "type": "object",
        "required": ["t", "tasks_done_per_s", "tasks_failed_per_s", "latency_p50_ms",
                     "latency_p99_ms", "cpu_ratio", "memory_rss_bytes", "disk_free_bytes",
                     "disk_used_bytes", "net_in_bytes_per_s", "net_out_bytes_per_s"],
        "properties": {
            "t": {"type": "number", "description": "Unix seconds"},
            "tasks_done_per_s": {"type": "number", "minimum": 0},
            "tasks_failed_per_s": {"type": "number", "minimum": 0},
            "latency_p50_ms": {**_NUM_OR_NULL, "description": "null: no task ended"},
            "latency_p99_ms": _NUM_OR_NULL,
            "cpu_ratio": {**_NUM_OR_NULL, "description": "CPU of the agent and its "
                          "workers / the machine's CPUs"},
            "memory_rss_bytes": {**_NUM_OR_NULL, "description": "Resident memory of the "
                                 "agent and its workers"},
            "disk_free_bytes": {**_NUM_OR_NULL, "description": "Data dir's file system"},
            "disk_used_bytes": _NUM_OR_NULL,
            "net_in_bytes_per_s": {**_NUM_OR_NULL, "description": "Mesh transport bytes "
                                   "received (null in the first second)"},
            "net_out_bytes_per_s": _NUM_OR_NULL,
        },
    },
    "MeshRatePoint": {
        "type": "object",
        "required": ["t", "tasks_done_per_s", "tasks_failed_per_s"],
        "properties": {
            "t": {"type": "number", "description": "Unix seconds (whole)"},
            "tasks_done_per_s": {"type": "number", "minimum": 0},
            "tasks_failed_per_s": {"type": "number", "minimum": 0},
        },
    },
}


def _array_of(key: str, item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [key],
        "properties": {key: {"type": "array",
                             "items": {"$ref": f"#/components/schemas/{item}"}}},
    }


SCHEMAS["StreamsResponse"] = {
    "type": "object",
    "required": ["operators", "shards", "cross_region_bytes", "nodes_answered"],
    "properties": {
        "operators": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "topic", "output", "mode", "region", "runners",
                         "records_processed"],
            "properties": {
                "name": {"type": "string"}, "topic": {"type": "string"},
                "output": _STR_OR_NULL,
                "mode": {"enum": ["near-source", "central", "regions"]},
                "region": _STR_OR_NULL,
                "runners": {"type": "array", "items": {"type": "string"},
                            "description": "node/source: which node runs it on which shard"},
                "records_processed": {"type": "integer", "minimum": 0},
            }}},
        "shards": {"type": "array", "items": {
            "type": "object",
            "required": ["topic", "source", "node", "role", "base", "head", "backlog"],
            "properties": {
                "topic": {"type": "string"},
                "source": {"type": "string", "description": "Where its records entered"},
                "node": {"type": "string", "description": "The node holding this copy"},
                "role": {"enum": ["primary", "backup"]},
                "base": {"type": "integer", "minimum": 0},
                "head": {"type": "integer", "minimum": 0},
                "backlog": {"type": "integer", "minimum": 0},
            }}},
        "cross_region_bytes": {"type": "object",
                               "additionalProperties": {"type": "integer", "minimum": 0},
                               "description": "topic:kind -> payload bytes sent between "
                                              "regions (kinds: repl, fetch:OP, follow)"},
        "nodes_answered": {"type": "integer", "minimum": 0},
    },
}
SCHEMAS["ServicesResponse"] = {
    "type": "object",
    "required": ["services"],
    "properties": {
        "services": {"type": "array", "maxItems": 64, "items": {
            "type": "object",
            "required": ["name", "placement", "desired", "health", "replicas", "inflight",
                         "calls_by_region", "unplaceable"],
            "properties": {
                "name": {"type": "string"},
                "placement": {"enum": ["near-caller", "central", "regions"]},
                "desired": {"type": "integer", "minimum": 0,
                            "description": "Replicas wanted (fixed, or the autoscaler's)"},
                "health": {**_STR_OR_NULL, "description": "Its health method, if any"},
                "inflight": {"type": "integer", "minimum": 0,
                             "description": "Calls in flight on all its replicas"},
                "calls_by_region": {"type": "object",
                                    "additionalProperties": {"type": "integer",
                                                             "minimum": 0},
                                    "description": "Calls per source region over the "
                                                   "last window (10 s)"},
                "unplaceable": {"type": "string",
                                "description": "The placement rule no node meets, or ''"},
                "replicas": {"type": "array", "items": {
                    "type": "object",
                    "required": ["node", "region", "state", "inflight", "calls", "failed",
                                 "p50_ms", "p99_ms"],
                    "properties": {
                        "node": {"type": "string"}, "region": {"type": "string"},
                        "state": {"enum": ["starting", "ready", "unhealthy"]},
                        "inflight": {"type": "integer", "minimum": 0},
                        "calls": {"type": "integer", "minimum": 0},
                        "failed": {"type": "integer", "minimum": 0},
                        "p50_ms": {**_NUM_OR_NULL,
                                   "description": "Over its last 1024 calls"},
                        "p99_ms": _NUM_OR_NULL,
                    }}},
            }}},
    },
}
SCHEMAS["MembersResponse"] = _array_of("members", "Member")
SCHEMAS["ObjectsResponse"] = {
    "type": "object",
    "required": ["objects", "next"],
    "properties": {
        "objects": {"type": "array", "items": {"$ref": "#/components/schemas/Object"}},
        "next": {**_STR_OR_NULL, "description": "The after of the next page (null: none)"},
    },
}
SCHEMAS["TasksResponse"] = _array_of("tasks", "Task")
SCHEMAS["EventsResponse"] = _array_of("events", "Event")
SCHEMAS["ThroughputResponse"] = _array_of("points", "ThroughputPoint")
SCHEMAS["MeshTask"] = {
    "type": "object",
    "required": ["id", "name", "state", "node", "owner", "submitted_at", "duration_ms",
                 "running", "error", "reason"],
    "properties": {
        "id": {"type": "string"},
        "name": {"type": "string", "description": "The function's name"},
        "state": {"enum": ["pending", "running", "done", "failed", "cancelled"]},
        "node": {**_STR_OR_NULL, "description": "Node it runs or ran on"},
        "owner": {"type": "string"},
        "submitted_at": {"type": "number", "description": "Unix seconds"},
        "duration_ms": {**_NUM_OR_NULL, "description": "Submit to outcome, or to now"},
        "running": {"type": "boolean", "description": "Not ended yet"},
        "error": {"type": "string", "description": "A failed task's error (200 chars)"},
        "reason": {"type": "string", "description": "Why it was placed there"},
    },
}
SCHEMAS["MeshTasks"] = {
    "type": "object",
    "required": ["tasks", "counts", "nodes_asked", "nodes_answered"],
    "properties": {
        "tasks": {"type": "array", "maxItems": 200,
                  "items": {"$ref": "#/components/schemas/MeshTask"}},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"},
                   "description": "Tasks by state among those the owners listed"},
        "nodes_asked": {"type": "integer", "minimum": 0},
        "nodes_answered": {"type": "integer", "minimum": 0},
    },
}
SCHEMAS["MeshPoints"] = {
    "type": "object",
    "required": ["nodes", "total", "nodes_asked", "nodes_answered"],
    "properties": {
        "nodes": {"type": "object", "description": "Node name -> its newest points "
                  "(up to 120, oldest first)",
                  "additionalProperties": {
                      "type": "array", "maxItems": 120,
                      "items": {"$ref": "#/components/schemas/ThroughputPoint"}}},
        "total": {"type": "array", "description": "Tasks done and failed per second, "
                  "summed over the nodes that answered",
                  "items": {"$ref": "#/components/schemas/MeshRatePoint"}},
        "nodes_asked": {"type": "integer", "minimum": 0},
        "nodes_answered": {"type": "integer", "minimum": 0},
    },
}
SCHEMAS["Snapshot"] = {
    "type": "object",
    "required": ["node", "members", "throughput", "mesh_points", "objects", "objects_more",
                 "tasks", "events", "streams", "services"],
    "properties": {
        "node": {"$ref": "#/components/schemas/Node"},
        "members": {"type": "array", "items": {"$ref": "#/components/schemas/Member"}},
        "throughput": {"type": "array", "maxItems": 60,
                       "description": "This node's newest points (the whole hour: "
                                      "/api/v1/throughput)",
                       "items": {"$ref": "#/components/schemas/ThroughputPoint"}},
        "mesh_points": {"$ref": "#/components/schemas/MeshPoints"},
        "objects": {"type": "array", "maxItems": 200,
                    "items": {"$ref": "#/components/schemas/Object"}},
        "objects_more": {"type": "boolean",
                         "description": "The mesh holds more objects than those listed: "
                                        "counts of objects are of the first ones (all of "
                                        "them: /api/v1/objects and its next, or "
                                        "meshscale objects)"},
        "tasks": {"$ref": "#/components/schemas/MeshTasks"},
        "events": {"type": "array", "maxItems": 50,
                   "items": {"$ref": "#/components/schemas/Event"}},
        "streams": {"$ref": "#/components/schemas/StreamsResponse"},
        "services": {"$ref": "#/components/schemas/ServicesResponse"},
    },
}

PATH_SCHEMAS = {
    "/api/v1/node": "Node",
    "/api/v1/members": "MembersResponse",
    "/api/v1/objects": "ObjectsResponse",
    "/api/v1/tasks": "TasksResponse",
    "/api/v1/events": "EventsResponse",
    "/api/v1/throughput": "ThroughputResponse",
    "/api/v1/snapshot": "Snapshot",
    "/api/v1/streams": "StreamsResponse",
    "/api/v1/services": "ServicesResponse",
}
"""Every JSON endpoint and the schema of its 200 body (used by the tests too)."""

_SUMMARIES = {
    "/api/v1/node": "This node.",
    "/api/v1/members": "Every member as this node sees it, with coordinates and load.",
    "/api/v1/objects": "Objects in the mesh, their replica sets and holders.",
    "/api/v1/tasks": "Tasks owned by this node, newest first, with placement reasons.",
    "/api/v1/events": "Recent events (membership, re-replications, retries).",
    "/api/v1/throughput": "This node's tasks done and failed, latency, CPU, memory, disk and "
                          "network, one point a second (the last hour, oldest first).",
    "/api/v1/snapshot": "Everything the dashboard shows, in one body.",
    "/api/v1/streams": "Stream operators, where they run, shards and their backlog, bytes "
                       "that crossed regions (asked of every live node).",
    "/api/v1/services": "Deployed services: replicas per node with their state, calls in "
                        "flight and p50/p99, calls per source region (this node's view).",
}


def _limit_param(default: int) -> dict[str, Any]:
    return {"name": "limit", "in": "query", "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": default}}


_PARAMS: dict[str, list[dict[str, Any]]] = {
    "/api/v1/objects": [
        _limit_param(200),
        {"name": "after", "in": "query", "required": False,
         "description": "Only ids after this one (a page's next).",
         "schema": {"type": "string", "maxLength": 256}},
        {"name": "prefix", "in": "query", "required": False,
         "description": "Only ids that start with this (b3-...).",
         "schema": {"type": "string", "maxLength": 256}},
        {"name": "class", "in": "query", "required": False,
         "description": "Only objects of this data class (at most 10,000 objects are "
                        "looked at per call: a short page with a next goes on).",
         "schema": {"type": "string", "maxLength": 256}},
    ],
    "/api/v1/tasks": [_limit_param(200)],
    "/api/v1/events": [{"name": "since", "in": "query", "required": False,
                        "description": "Only events with a larger seq.",
                        "schema": {"type": "integer", "minimum": 0, "default": 0}}],
}

_ERRORS: dict[str, Any] = {
    "400": {"description": "Bad query parameter",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
    "401": {"description": "Missing or wrong bearer token",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
}


def _operation(path: str, schema: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": _SUMMARIES[path],
            "operationId": path.rsplit("/", 1)[-1],
            "parameters": _PARAMS.get(path, []),
            "security": [{"bearer": []}],
            "responses": {
                "200": {"description": "OK", "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
                **_ERRORS,
            },
        }
    }


def openapi_document() -> dict[str, Any]:
    paths: dict[str, Any] = {p: _operation(p, s) for p, s in PATH_SCHEMAS.items()}
    paths["/api/v1/stream"] = {"get": {
        "summary": "Server-sent events: `event: snapshot` with a Snapshot as data, once a "
                   "second, until the client goes away.",
        "operationId": "stream",
        "security": [{"bearer": []}],
        "responses": {
            "200": {"description": "text/event-stream of snapshot events",
                    "content": {"text/event-stream": {
                        "schema": {"type": "string"},
                        "x-event-data": {"$ref": "#/components/schemas/Snapshot"}}}},
            "401": _ERRORS["401"],
            "503": {"description": "Too many streams open on this node",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Error"}}}},
        },
    }}
    paths["/api/v1/services/{name}/{method}"] = {"post": {
        "summary": "Call a service's method (issue #22): the node routes it to the nearest "
                   "healthy replica, as the Python client's call. Needs the admin token.",
        "operationId": "serviceCall",
        "security": [{"bearer": []}],
        "parameters": [
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "method", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "timeout_s", "in": "query", "required": False,
             "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 600}},
            {"name": "key", "in": "query", "required": False,
             "description": "For an actor service (deploy_actor): the key whose instance "
                            "takes the call (required there, refused elsewhere).",
             "schema": {"type": "string", "minLength": 1, "maxLength": 256}},
        ],
        "requestBody": {"required": False, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ServiceCallRequest"}}}},
        "responses": {
            "200": {"description": "The method's result", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ServiceCallResponse"}}}},
            **{code: {"description": why, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ServiceCallError"}}}}
               for code, why in (
                   ("400", "Bad arguments (not JSON, not a list or args/kwargs object)"),
                   ("401", "Missing or wrong token"),
                   ("403", "The read-only token may not call a service"),
                   ("404", "Unknown service or method"),
                   ("413", "Arguments over the call size limit"),
                   ("429", "The replica's queue is full"),
                   ("500", "The method raised (kind raised, with the traceback)"),
                   ("502", "The replica was lost (replica-lost, retries-exhausted, crashed)"),
                   ("503", "No healthy replica (no-replica), or the node is starting"),
                   ("504", "The replica did not answer in time"))},
        },
    }}
    paths["/api/v1/openapi.json"] = {"get": {
        "summary": "This document.", "operationId": "openapi", "security": [],
        "responses": {"200": {"description": "OpenAPI 3.1 document",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }}
    paths["/metrics"] = {"get": {
        "summary": "Prometheus text format. Needs the token unless the node runs with "
                   "--metrics-public.",
        "operationId": "metrics",
        "security": [{"bearer": []}, {}],
        "responses": {"200": {"description": "Prometheus exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                      "401": _ERRORS["401"]},
    }}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meshscale node API",
            "version": meshscale.__version__,
            "description": "Every node serves the same API and can describe the whole mesh "
                           "from its own view. Send the cluster's admin token as "
                           "`Authorization: Bearer TOKEN` (`meshscale token --bundle DIR`).",
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
