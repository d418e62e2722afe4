"""The residency report (``meshscale compliance report``), computed sans-I/O from what was
gathered: every copy the live members hold (``core.erasure.HeldCopy``), the class
policies, the refusals in the audit trails and each node's chain verification.

For each data class: which regions hold how many copies and bytes; the duplication
(copies per object) and the storage overhead (bytes stored over the logical bytes, each
object counted once) that replication across regions costs; every copy outside its rule;
the refusals of the period. A copy is *outside its rule* when its node's region is not
among its class policy's regions, or not among the regions of the rule the copy itself
carries (an object put with a narrower rule than its class's). There must be none; the
report lists each one it finds with the rule it breaks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from meshscale.core.erasure import HeldCopy
from meshscale.core.policy import ClassPolicy

__all__ = ["UNCLASSIFIED", "ChainResult", "ClassReport", "ComplianceReport", "OutOfRule",
           "RefusalRow", "RegionUsage", "build_report", "out_of_rule"]

UNCLASSIFIED = ""
"""The class name objects without a data class are reported under."""


class RegionUsage(msgspec.Struct):
    region: str
    objects: int
    copies: int
    bytes: int


class OutOfRule(msgspec.Struct):
    oid: str
    node: str
    region: str
    data_class: str
    allowed: list[str]
    rule: str
    """Which rule it breaks: ``class policy`` or ``object rule``."""


class RefusalRow(msgspec.Struct, omit_defaults=True):
    node: str
    wall_s: float
    subject: str
    data_class: str = ""
    from_region: str = ""
    to_region: str = ""
    who: str = ""
    detail: str = ""


class ChainResult(msgspec.Struct, omit_defaults=True):
    node: str
    ok: bool | None
    """None: the node could not be asked."""
    entries: int = 0
    detail: str = ""


class ClassReport(msgspec.Struct):
    data_class: str
    policy_regions: list[str] | None
    """The class policy's regions (None: no policy)."""
    policy_replicas: int | None
    objects: int
    logical_bytes: int
    copies: int
    stored_bytes: int
    duplication: float
    """Copies per object."""
    overhead: float
    """Stored bytes over logical bytes (1.0: one copy of each)."""
    regions: list[RegionUsage]
    out_of_rule: list[OutOfRule]
    refusals: int


class ComplianceReport(msgspec.Struct):
    generated_wall_s: float
    since_wall_s: float
    data_class: str | None
    """The class asked for (None: every class)."""
    classes: list[ClassReport]
    out_of_rule: int
    refusals: list[RefusalRow]
    chains: list[ChainResult]
    chains_ok: bool
    """Every node's chain verified (a node not asked counts as not verified)."""
    nodes: dict[str, str]
    """Node -> region, of the members whose copies were counted."""
    unreachable: list[str]
    """Members that could not be asked (their copies and trail are not in the report)."""
    notes: list[str] = []
    """What the report could not cover (e.g. refusals beyond a page)."""


def out_of_rule(copy: HeldCopy, policies: Mapping[str, ClassPolicy]) -> OutOfRule | None:
    """Whether ``copy`` sits outside its class policy's regions or its own rule's."""
    cls = copy.data_class or UNCLASSIFIED
    policy = policies.get(cls) if cls else None
    if policy is not None and copy.region not in policy.regions:
        return OutOfRule(copy.oid, copy.node, copy.region, cls, list(policy.regions),
                         "class policy")
    if copy.regions is not None and copy.region not in copy.regions:
        return OutOfRule(copy.oid, copy.node, copy.region, cls, sorted(copy.regions),
                         "object rule")
    return None


def build_report(copies: Iterable[HeldCopy], policies: Mapping[str, ClassPolicy],
                 refusals: Iterable[RefusalRow], chains: Iterable[ChainResult], *,
                 nodes: Mapping[str, str], unreachable: Iterable[str] = (),
                 data_class: str | None = None, since_wall_s: float = 0.0,
                 generated_wall_s: float = 0.0, notes: Iterable[str] = ()) -> ComplianceReport:
    """The report over what was gathered (only ``data_class`` if given). Every class with
    a policy appears, holding copies or not."""
    by_class: dict[str, list[HeldCopy]] = {}
    for c in copies:
        by_class.setdefault(c.data_class or UNCLASSIFIED, []).append(c)
    for name in policies:
        by_class.setdefault(name, [])
    refusal_rows = sorted(
        (r for r in refusals if data_class is None or r.data_class == data_class),
        key=lambda r: (r.wall_s, r.node, r.subject))
    refused_by_class: dict[str, int] = {}
    for r in refusal_rows:
        refused_by_class[r.data_class] = refused_by_class.get(r.data_class, 0) + 1
    classes = []
    for name in sorted(by_class):
        if data_class is not None and name != data_class:
            continue
        held = by_class[name]
        sizes: dict[str, int] = {}
        per_region: dict[str, tuple[set[str], int, int]] = {}
        outside = []
        for c in sorted(held, key=lambda c: (c.oid, c.node)):
            sizes[c.oid] = c.size
            objs, n, b = per_region.get(c.region, (set(), 0, 0))
            objs.add(c.oid)
            per_region[c.region] = (objs, n + 1, b + c.size)
            bad = out_of_rule(c, policies)
            if bad is not None:
                outside.append(bad)
        logical = sum(sizes.values())
        stored = sum(c.size for c in held)
        policy = policies.get(name) if name else None
        classes.append(ClassReport(
            data_class=name,
            policy_regions=None if policy is None else list(policy.regions),
            policy_replicas=None if policy is None else policy.replicas,
            objects=len(sizes), logical_bytes=logical, copies=len(held),
            stored_bytes=stored,
            duplication=len(held) / len(sizes) if sizes else 0.0,
            overhead=stored / logical if logical else 0.0,
            regions=[RegionUsage(r, len(o), n, b) for r, (o, n, b) in sorted(per_region.items())],
            out_of_rule=outside, refusals=refused_by_class.get(name, 0)))
    chain_list = sorted(chains, key=lambda c: c.node)
    return ComplianceReport(
        generated_wall_s=generated_wall_s, since_wall_s=since_wall_s, data_class=data_class,
        classes=classes, out_of_rule=sum(len(c.out_of_rule) for c in classes),
        refusals=refusal_rows, chains=chain_list,
        chains_ok=bool(chain_list) and all(c.ok is True for c in chain_list),
        nodes=dict(sorted(nodes.items())), unreachable=sorted(unreachable), notes=list(notes))
