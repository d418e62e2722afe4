"""Data-class policies (``policy.*``): set, read, list and delete the policy of a class,
kept in the mesh's replicated KV (``core/policy.py``). Setting and deleting need the admin
role (``core/access.py``: ``WRITE``); reading is open to every certificate."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from meshscale.core.api.contract import Empty, Method, Request
from meshscale.core.policy import MAX_POLICY_REGIONS, MAX_TTL_S, ClassPolicy

__all__ = ["DELETE", "GET", "LIST", "METHODS", "MIGRATE_LOCAL", "SET", "MigrateLocalReply",
           "MigrateLocalRequest", "MovedObject", "PolicyDeleteReply", "PolicyInfo",
           "PolicyNameRequest", "PolicySetReply", "PolicySetRequest"]

ClassName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
"""Its form (letters, digits, ``.``, ``_``, ``-``) is checked by ``core.policy``, which
names the rule."""
Region = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Regions = Annotated[list[Region], msgspec.Meta(max_length=MAX_POLICY_REGIONS)]


class PolicySetRequest(Request):
    name: ClassName
    regions: Regions
    replicas: Annotated[int, msgspec.Meta(ge=1, le=16)] = 3
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_TTL_S)] | None = None
    cross_region_reads: bool = True
    stream_regions: Regions | None = None
    migrate: bool = False
    """Move existing copies the change would leave outside the class's regions (through
    re-replication: each holder rewrites the rule of its copies and hands them off);
    without it such a change is refused, naming the copies."""


class PolicyNameRequest(Request):
    name: ClassName
    cached: bool = False
    """Answer from the node's cache when it read the class in the last
    ``policy_refresh_s`` (a miss still reads the KV): what a node's own planes ask on
    every classed publish or submit. False: a quorum read now."""


class PolicyInfo(msgspec.Struct, omit_defaults=True):
    """A class's policy as the mesh holds it, with the HLC time it was written."""

    name: str
    regions: list[str]
    replicas: int
    ts: str
    ttl_s: float | None = None
    cross_region_reads: bool = True
    stream_regions: list[str] | None = None

    @classmethod
    def of(cls, p: ClassPolicy, ts: str) -> PolicyInfo:
        return cls(p.name, list(p.regions), p.replicas, ts, p.ttl_s, p.cross_region_reads,
                   None if p.stream_regions is None else list(p.stream_regions))


class PolicySetReply(msgspec.Struct, omit_defaults=True):
    policy: PolicyInfo
    previous: PolicyInfo | None = None
    """The policy it replaced (None: the class had none)."""
    checked_objects: int = 0
    """Objects of the class found in the mesh and checked against the new rule."""
    migrated: list[MovedObject] = []
    """With ``migrate``: each object that had copies outside the new regions, and where
    its copies are once the move settled."""
    still_outside: list[str] = []
    """With ``migrate``: copies still outside the new regions when the node stopped
    waiting (``migrate_wait_s``), as ``"<id> in <region>"``; they keep moving."""


class MovedObject(msgspec.Struct):
    id: str
    from_regions: list[str]
    """Regions that held a copy outside the new rule."""
    to_regions: list[str]
    """Regions holding its copies after the move (as the members listed them)."""


class MigrateLocalRequest(Request):
    """Node to node: rewrite the rule of this member's copies of class ``name`` that the
    class's new ``regions`` break, and let re-replication move them."""

    name: ClassName
    regions: Regions


class MigrateLocalReply(msgspec.Struct):
    node: str
    rewritten: list[str]
    """Objects whose copy here got the new rule."""


class PolicyDeleteReply(msgspec.Struct):
    name: str
    ts: str


SET: Method[PolicySetRequest, PolicySetReply] = Method("policy.set", PolicySetRequest,
                                                       PolicySetReply)
GET: Method[PolicyNameRequest, PolicyInfo] = Method("policy.get", PolicyNameRequest, PolicyInfo)
LIST: Method[Empty, list[PolicyInfo]] = Method("policy.list", Empty, list[PolicyInfo])
DELETE: Method[PolicyNameRequest, PolicyDeleteReply] = Method(
    "policy.delete", PolicyNameRequest, PolicyDeleteReply)

MIGRATE_LOCAL: Method[MigrateLocalRequest, MigrateLocalReply] = Method(
    "policy.migrate_local", MigrateLocalRequest, MigrateLocalReply)

METHODS: tuple[Method[Any, Any], ...] = (SET, GET, LIST, DELETE, MIGRATE_LOCAL)
