"""Data-class policies: the rule an organisation sets once per class of data (``pii``,
``telemetry``, ...), and how a request's own rule is resolved against it.

A ``ClassPolicy`` names the regions a class's copies may live in, how many copies it gets,
how long they live (``ttl_s``), whether a node outside those regions may read it, and where
its stream shards may live. Policies are kept in the mesh's replicated KV under the
reserved prefix ``POLICY_PREFIX`` (``policy_key``), written only through ``policy.set`` /
``policy.delete`` (admin role), never by ``kv.put``.

Rules form a partial order, *narrower or equal* (``narrows``): fewer regions, fewer
copies, a shorter life, no cross-region reads, fewer stream regions. A request that names a
class gets the class's rule, each field it leaves out filled from the class; a field it
names may narrow the class's, never widen it (``resolve`` refuses, naming both rules).
The resolved rule is never wider than the class's (a property test checks it).

Every node that acts asks these functions itself: the coordinator resolves a put's rule
(``resolve``), and a replica receiver checks that its own region may hold a copy under
both the rule the copy's header carries and the class policy it knows
(``copy_refusal``). All of this is pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec

from meshscale.core.placement import MAX_REPLICAS, Residency

__all__ = [
    "MAX_POLICY_REGIONS",
    "MAX_TTL_S",
    "POLICY_PREFIX",
    "ClassPolicy",
    "PolicyError",
    "Resolved",
    "Rule",
    "breaking_copies",
    "check_class_name",
    "check_region",
    "class_of_key",
    "copy_refusal",
    "decode_policy",
    "detail_rule",
    "encode_policy",
    "is_reserved_key",
    "kv_key_class",
    "kv_residency",
    "make_policy",
    "migrated_regions",
    "narrows",
    "payload_rule",
    "placement_residency",
    "policy_key",
    "read_refusal",
    "resolve",
    "result_rule",
    "result_within",
    "stored_rule",
]

POLICY_PREFIX = "__policy/"
"""KV keys of class policies: ``__policy/<class>``. Reserved: ``kv.put`` and ``kv.delete``
refuse keys under it (``is_reserved_key``)."""
MAX_POLICY_REGIONS = 64
MAX_TTL_S = 10 * 365 * 86400.0
"""Longest TTL a policy may set (a node's own ``max_ttl_s`` has the same default)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A region or class name: a letter or digit, then letters, digits, ``.``, ``_`` or
``-``; at most 64 characters. No spaces, commas, slashes or control characters (a name is
part of a KV key, a CLI list and an error message)."""


class PolicyError(ValueError):
    """A policy or a request's rule refused; ``rule`` names which rule refused it:
    ``malformed`` (a bad name or value), ``unknown_class``, ``widens`` (an explicit rule
    wider than its class's), ``residency`` (a copy outside its rule), ``result_class`` (a
    task result's class ambiguous) or ``topic_class`` (an operator naming another class
    than its input topic's, ``core.streams.operator_rule``)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def check_region(name: object) -> str:
    """``name`` if it is a well-formed region name, else ``PolicyError("malformed")``."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise PolicyError("malformed", (
            f"malformed region name {name!r:.80}: a letter or digit, then letters, digits, "
            "'.', '_' or '-', at most 64 characters"))
    return name


def check_class_name(name: object) -> str:
    """``name`` if it is a well-formed data-class name, else ``PolicyError("malformed")``."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise PolicyError("malformed", (
            f"malformed data class name {name!r:.80}: a letter or digit, then letters, "
            "digits, '.', '_' or '-', at most 64 characters"))
    return name


def _regions(names: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(names, str):
        raise PolicyError("malformed", f"{what} is a list of region names, not one string")
    out = tuple(sorted({check_region(n) for n in names}))
    if not out:
        raise PolicyError("malformed", f"{what}: name at least one region")
    if len(out) > MAX_POLICY_REGIONS:
        raise PolicyError("malformed", f"{what}: at most {MAX_POLICY_REGIONS} regions")
    return out


class ClassPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The policy of one data class, as kept in the KV (make one with ``make_policy``,
    which checks it)."""

    name: str
    regions: tuple[str, ...]
    """Allowed regions, sorted; never empty."""
    replicas: int = 3
    ttl_s: float | None = None
    """Copies are collected this long after their put (None: kept until deleted)."""
    cross_region_reads: bool = True
    """False: a node outside ``regions`` may not read the class's objects."""
    stream_regions: tuple[str, ...] | None = None
    """Where the class's stream shards may live (a subset of ``regions``; None: the same)."""

    def rule(self) -> Rule:
        return Rule(frozenset(self.regions), self.replicas, self.ttl_s,
                    self.cross_region_reads,
                    None if self.stream_regions is None else frozenset(self.stream_regions))

    def describe(self) -> str:
        return f"class {self.name}: {self.rule().describe()}"


def make_policy(name: str, regions: Iterable[str], *, replicas: int = 3,
                ttl_s: float | None = None, cross_region_reads: bool = True,
                stream_regions: Iterable[str] | None = None) -> ClassPolicy:
    """A checked ``ClassPolicy``; ``PolicyError("malformed")`` naming what is wrong."""
    check_class_name(name)
    regs = _regions(regions, "regions")
    if isinstance(replicas, bool) or not isinstance(replicas, int) \
            or not 1 <= replicas <= MAX_REPLICAS:
        raise PolicyError("malformed",
                          f"replicas must be an integer from 1 to {MAX_REPLICAS}, not {replicas!r}")
    if ttl_s is not None and not 0 < ttl_s <= MAX_TTL_S:
        raise PolicyError("malformed", f"ttl must be in (0, {MAX_TTL_S:g}] seconds, not {ttl_s!r}")
    streams = None
    if stream_regions is not None:
        streams = _regions(stream_regions, "stream regions")
        outside = sorted(set(streams) - set(regs))
        if outside:
            raise PolicyError("malformed", (
                f"stream regions {outside} are not among the class's regions {list(regs)}"))
    return ClassPolicy(name, regs, replicas, ttl_s, bool(cross_region_reads), streams)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ClassPolicy)


def encode_policy(policy: ClassPolicy) -> bytes:
    return _encoder.encode(policy)


def decode_policy(raw: bytes) -> ClassPolicy:
    """A policy as stored; ``PolicyError("malformed")`` when it is not one (checked as
    ``make_policy`` checks a new one)."""
    try:
        p = _decoder.decode(raw)
    except msgspec.DecodeError as e:
        raise PolicyError("malformed", f"stored policy unreadable: {e}") from None
    return make_policy(p.name, p.regions, replicas=p.replicas, ttl_s=p.ttl_s,
                       cross_region_reads=p.cross_region_reads, stream_regions=p.stream_regions)


def policy_key(name: str) -> str:
    """The KV key of class ``name``'s policy."""
    return POLICY_PREFIX + check_class_name(name)


def class_of_key(key: str) -> str | None:
    """The class a policy key names (None: not a policy key)."""
    return key[len(POLICY_PREFIX):] if key.startswith(POLICY_PREFIX) else None


def is_reserved_key(key: str) -> bool:
    """A KV key that only the policy methods may write."""
    return key.startswith(POLICY_PREFIX)


# ------------------------------------------------------------------ the order of rules


@dataclass(frozen=True)
class Rule:
    """A rule as a request or a class states it. ``None`` in a field means *unbounded*
    (anywhere, any number of copies, forever); ``stream_regions`` None means "the same as
    ``regions``"."""

    regions: frozenset[str] | None = None
    replicas: int | None = None
    ttl_s: float | None = None
    cross_region_reads: bool = True
    stream_regions: frozenset[str] | None = None

    def streams(self) -> frozenset[str] | None:
        return self.stream_regions if self.stream_regions is not None else self.regions

    def describe(self) -> str:
        def regs(r: frozenset[str] | None) -> str:
            return "any" if r is None else "{" + ",".join(sorted(r)) + "}"
        parts = [f"regions={regs(self.regions)}",
                 f"replicas={'any' if self.replicas is None else self.replicas}",
                 f"ttl={'none' if self.ttl_s is None else f'{self.ttl_s:g}s'}",
                 f"cross_region_reads={'yes' if self.cross_region_reads else 'no'}"]
        if self.stream_regions is not None:
            parts.append(f"stream_regions={regs(self.stream_regions)}")
        return " ".join(parts)


def _sub(a: frozenset[str] | None, b: frozenset[str] | None) -> bool:
    return b is None or (a is not None and a <= b)


def _le(a: float | None, b: float | None) -> bool:
    return b is None or (a is not None and a <= b)


def narrows(a: Rule, b: Rule) -> bool:
    """Is ``a`` narrower than or equal to ``b`` in every field? A partial order
    (reflexive, antisymmetric, transitive): two rules may be incomparable."""
    return (_sub(a.regions, b.regions) and _le(a.replicas, b.replicas)
            and _le(a.ttl_s, b.ttl_s) and (b.cross_region_reads or not a.cross_region_reads)
            and _sub(a.streams(), b.streams()))


def _widened(a: Rule, b: Rule) -> list[str]:
    """The fields in which ``a`` is wider than ``b``."""
    out = []
    if not _sub(a.regions, b.regions):
        out.append("regions")
    if not _le(a.replicas, b.replicas):
        out.append("replicas")
    if not _le(a.ttl_s, b.ttl_s):
        out.append("ttl")
    if a.cross_region_reads and not b.cross_region_reads:
        out.append("cross_region_reads")
    if not _sub(a.streams(), b.streams()):
        out.append("stream_regions")
    return out


@dataclass(frozen=True)
class Resolved:
    """What a request gets: its rule (class fields filled in) and the class it names."""

    rule: Rule
    data_class: str | None
    policy: ClassPolicy | None
    """The class's policy (None: no class, or a class without one; see ``resolve``)."""

    def residency(self) -> Residency | None:
        """The placement rule (``core.placement.Residency``) for the request's copies."""
        if self.rule.regions is None and self.data_class is None:
            return None
        return Residency(self.rule.regions, self.data_class)

    def stream_residency(self) -> Residency | None:
        """The rule for a topic's shards and their backups: the stream regions."""
        regions = self.rule.streams()
        if regions is None and self.data_class is None:
            return None
        return Residency(regions, self.data_class)


def resolve(data_class: str | None, explicit: Rule,
            policies: Mapping[str, ClassPolicy]) -> Resolved:
    """Resolve a request naming ``data_class`` (None: no class) with its own ``explicit``
    rule against the known ``policies``.

    - No class: the explicit rule as it is.
    - A class with a policy: each field the request leaves unbounded is the class's; the
      result must narrow the class's rule, else ``PolicyError("widens")`` naming both.
    - A class without a policy: refused (``unknown_class``) unless the request names its
      own regions, in which case the class is a label only, as before policies existed.
    """
    for r in explicit.regions or ():
        check_region(r)
    for r in explicit.stream_regions or ():
        check_region(r)
    if data_class is None:
        return Resolved(explicit, None, None)
    check_class_name(data_class)
    policy = policies.get(data_class)
    if policy is None:
        if explicit.regions is None:
            known = ", ".join(sorted(policies)[:20]) or "none"
            raise PolicyError("unknown_class", (
                f"unknown data class {data_class!r}: no policy is set for it (known classes: "
                f"{known}); set one with `meshscale policy set {data_class} --regions ...` "
                "or name the regions yourself"))
        return Resolved(explicit, data_class, None)
    cls = policy.rule()
    filled = Rule(
        explicit.regions if explicit.regions is not None else cls.regions,
        explicit.replicas if explicit.replicas is not None else cls.replicas,
        explicit.ttl_s if explicit.ttl_s is not None else cls.ttl_s,
        explicit.cross_region_reads and cls.cross_region_reads,
        explicit.stream_regions if explicit.stream_regions is not None else cls.stream_regions,
    )
    wider = _widened(filled, cls)
    if wider:
        raise PolicyError("widens", (
            f"the request's rule ({filled.describe()}) widens the rule of class "
            f"{data_class} ({cls.describe()}) in {', '.join(wider)}: an explicit rule may "
            "narrow its class's rule, never widen it"))
    assert narrows(filled, cls)
    return Resolved(filled, data_class, policy)


# ------------------------------------------------------------------ a task's result


def _class_rule(cls: str, inputs: list[Residency],
                policies: Mapping[str, ClassPolicy]) -> Rule:
    """The rule of ``cls`` for choosing the strictest class: its policy's, or (a class
    without a policy, a label only) the regions its inputs share."""
    policy = policies.get(cls)
    if policy is not None:
        return policy.rule()
    regions: frozenset[str] | None = None
    for r in inputs:
        if r.data_class == cls and r.regions is not None:
            regions = r.regions if regions is None else regions & r.regions
    return Rule(regions=regions)


def result_rule(declared: Residency | None, inputs: Iterable[Residency | None],
                policies: Mapping[str, ClassPolicy]) -> Residency | None:
    """The rule a task's result is stored under (None: the result has no class).

    ``declared`` is the task's own (resolved) rule, ``inputs`` the rules of what it reads:
    its input objects and its upstream tasks' results.

    - A task that declares a class: its result is of that class, under the task's rule
      (the declaration wins; the inputs still bound where the task runs).
    - Else, when some input has a class: the result takes the strictest of the inputs'
      classes, the one whose rule (``ClassPolicy.rule``; a class without a policy: the
      regions its inputs share) narrows every other's; equal rules are broken by name.
      Its regions are that class's, narrowed by every classed input's own regions and the
      task's declared regions: the result may live only where all of its sources may.
      ``PolicyError("result_class")`` when no class is strictest (incomparable rules:
      the task must declare its result's class) or ``PolicyError("residency")`` when no
      region is left.
    - Else: None (no classed input, no declared class).
    """
    if declared is not None and declared.data_class is not None:
        return declared
    classed = [r for r in inputs if r is not None and r.data_class is not None]
    if not classed:
        return None
    names = sorted({r.data_class for r in classed if r.data_class is not None})
    rules = {c: _class_rule(c, classed, policies) for c in names}
    strictest = [c for c in names if all(narrows(rules[c], rules[d]) for d in names)]
    if not strictest:
        listed = "; ".join(f"{c} ({rules[c].describe()})" for c in names[:8])
        raise PolicyError("result_class", (
            f"the task's inputs are of classes {listed}, none of whose rules narrows all "
            "the others': the result's class is ambiguous; declare it (data_class=)"))
    chosen = strictest[0]
    regions = rules[chosen].regions
    for r in [*classed, *([declared] if declared is not None else [])]:
        if r.regions is not None:
            regions = r.regions if regions is None else regions & r.regions
    if regions is not None and not regions:
        raise PolicyError("residency", (
            f"the task's result (class {chosen}, the strictest of its inputs' classes "
            f"{', '.join(names[:8])}) has no region that all of its inputs' rules allow"))
    return Residency(regions, chosen)


def detail_rule(result: Residency | None, run: Residency | None,
                inputs: Iterable[Residency | None]) -> Residency | None:
    """The rule a task's *detail* (its error message, traceback, pickled exception and
    printed output, which may carry the task's data) is stored under at the node that ran
    it; None: the task carries no class and its detail travels inline to its owner, as
    the result of an unclassed task does.

    ``result`` is the rule its result is stored under (``result_rule``, maybe narrowed
    since by ``result_within``), ``run`` the rule it runs under, ``inputs`` the rules of
    what it reads. A classed task's detail is one object under its result's rule when
    that has a class (the class its data takes), else under its own rule when that
    names a class, else under the rule ``result_rule`` gives its inputs (their
    strictest class; ``PolicyError("result_class")`` when that is ambiguous: the caller
    keeps the detail at the runner and sends none of it). Only a reference to the object
    reaches the owner, which may be outside the class's regions.
    """
    if result is not None and result.data_class is not None:
        return result
    if run is not None and run.data_class is not None:
        return run
    ins = list(inputs)
    if not any(r is not None and r.data_class is not None for r in ins):
        return None
    return result_rule(run, ins, {})


def payload_rule(declared: Residency | None, inputs: Iterable[Residency | None],
                 policies: Mapping[str, ClassPolicy]) -> Residency | None:
    """The rule a task's *payload* (its pickled arguments and keyword arguments, which
    the client sent and which may be class data) is kept under when its owner stores it
    for a takeover; None: the task carries no rule and its arguments stay in its KV
    record (``task/<id>``), replicated like any key, as always.

    ``declared`` is the task's own (resolved) rule, ``inputs`` the rules of the input
    objects it reads. The payload goes where the task's result goes (``result_rule``:
    its declared class, else its inputs' strictest class, regions narrowed by every
    classed input and the declared regions), else, for a task that names regions but no
    class and reads no classed input, under those regions. ``PolicyError`` as
    ``result_rule`` raises it (inputs of incomparable classes, no region left): the
    caller keeps the payload nowhere but in the owner's memory (the task is refused or
    fails before it runs)."""
    out = result_rule(declared, inputs, policies)
    if out is not None:
        return out
    if declared is not None and declared.regions is not None:
        return declared
    return None


def placement_residency(submitted: Residency | None, classes: Iterable[str],
                        policies: Mapping[str, ClassPolicy]) -> Residency | None:
    """The rule a classed task is placed under *now*: the rule it was ``submitted`` under
    (resolved at submit), narrowed by the current policy of each class it carries (its
    own class and its inputs'; ``classes``) as the owner knows them (``policies``).

    Never wider than ``submitted``: the regions are the intersection of the submitted
    regions and every known class's regions; a class without a known policy narrows
    nothing. The class named is ``submitted``'s, else the first of ``classes``.
    ``PolicyError("residency")`` naming both rules when no region is left: the task
    must not be placed at all. Every placement asks it (the first, and each one after a
    lost runner), so a class narrowed after submit binds the task's next placement.
    """
    names = sorted(set(classes))
    regions = None if submitted is None else submitted.regions
    narrowed_by: list[str] = []
    for cls in names:
        policy = policies.get(cls)
        if policy is None:
            continue
        allowed = frozenset(policy.regions)
        if regions is None or not regions <= allowed:
            narrowed_by.append(cls)
        regions = allowed if regions is None else regions & allowed
    data_class = submitted.data_class if submitted is not None and submitted.data_class \
        else (names[0] if names else None)
    if regions is not None and not regions:
        sub = "any region" if submitted is None or submitted.regions is None else \
            "regions {" + ",".join(sorted(submitted.regions)) + "}"
        now = "; ".join(policies[c].describe() for c in narrowed_by[:8])
        raise PolicyError("residency", (
            f"the task was submitted for {sub}; the current rule of its classes ({now}) "
            "leaves it no region: it may not be placed"))
    if submitted is None and regions is None and data_class is None:
        return None
    if submitted is not None and regions == submitted.regions \
            and data_class == submitted.data_class:
        return submitted
    return Residency(regions, data_class)


def result_within(out: Residency | None, placed: Residency | None) -> Residency | None:
    """The rule a task's result is stored under, given the rule ``out`` its owner chose at
    submit (``result_rule``) and the rule ``placed`` the task runs under now (narrowed by
    ``placement_residency`` since): ``out``'s regions within ``placed``'s when both name
    some and they share one, else ``out``. Never wider than ``out``: a class narrowed
    after submit binds the result's copies as it binds where the task runs."""
    if out is None or placed is None or out.regions is None or placed.regions is None:
        return out
    both = out.regions & placed.regions
    return Residency(both, out.data_class) if both and both != out.regions else out


# ------------------------------------------------------------------ KV keys of a class


def kv_key_class(key: str) -> str | None:
    """The data class a KV key would belong to: its first ``/``-separated segment, when
    that is a well-formed class name (``pii/customer/42`` -> ``pii``); None for reserved
    keys and keys without one. It belongs to the class only while the class has a policy
    (``kv_residency``)."""
    if is_reserved_key(key):
        return None
    head, sep, _ = key.partition("/")
    return head if sep and _NAME_RE.fullmatch(head) else None


def kv_residency(key: str, policies: Mapping[str, ClassPolicy]) -> Residency | None:
    """The residency rule of a KV key under a class's prefix: the class's regions (None:
    the key is not under the prefix of a class with a policy)."""
    cls = kv_key_class(key)
    policy = policies.get(cls) if cls is not None else None
    if policy is None:
        return None
    return Residency(frozenset(policy.regions), cls)


# ------------------------------------------------------------------ enforcement


def copy_refusal(region: str, header: Residency | None,
                 policies: Mapping[str, ClassPolicy], *, stream: bool = False) -> str | None:
    """Why a node in ``region`` must refuse a copy whose header carries rule ``header``
    (None: it may hold it). Both the header's regions and, when the header names a class
    whose policy the node knows, the class's regions (its stream regions for a
    ``stream`` shard) must allow ``region``: a sender that states a wrong or missing rule
    cannot place a classed copy outside its class."""
    if header is None:
        return None
    cls = header.data_class
    if header.regions is not None and region not in header.regions:
        return (f"this node's region {region!r} may not hold a copy (residency rule: allowed "
                f"regions {{{','.join(sorted(header.regions))}}}"
                + (f", class {cls})" if cls else ")"))
    policy = policies.get(cls) if cls is not None else None
    if policy is None:
        return None
    allowed = policy.stream_regions if stream and policy.stream_regions is not None \
        else policy.regions
    if region not in allowed:
        what = "stream regions" if stream and policy.stream_regions is not None else "regions"
        return (f"this node's region {region!r} may not hold a copy (residency rule of class "
                f"{cls}'s policy: {what} {{{','.join(allowed)}}})")
    return None


def read_refusal(region: str, data_class: str | None,
                 policies: Mapping[str, ClassPolicy]) -> str | None:
    """Why a node in ``region`` must refuse to serve (or relay, or redirect) a read of an
    object of ``data_class`` (None: it may): the class's policy forbids cross-region reads
    and ``region`` is not one of its regions."""
    policy = policies.get(data_class) if data_class is not None else None
    if policy is None or policy.cross_region_reads or region in policy.regions:
        return None
    return (f"cross-region read rule: class {data_class}'s policy lets only nodes in regions "
            f"{{{','.join(policy.regions)}}} read it; this node's region is {region!r}")


def breaking_copies(new: ClassPolicy, copies: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (object id, region) copies that ``new`` would put outside its regions."""
    allowed = set(new.regions)
    return sorted({(oid, region) for oid, region in copies if region not in allowed})


def migrated_regions(current: Iterable[str] | None, new: ClassPolicy) -> frozenset[str] | None:
    """The regions a stored copy's rule gets when its class's policy changes to ``new``
    with ``--migrate`` (None: its rule already fits ``new``). The copy keeps whatever its
    own rule and the new regions have in common; if nothing, the new regions: the class's
    rule, which the admin just set, wins over the narrower rule the object was put with."""
    allowed = frozenset(new.regions)
    if current is None:
        return allowed
    mine = frozenset(current)
    if mine <= allowed:
        return None
    return (mine & allowed) or allowed


def stored_rule(header: Residency | None,
                policies: Mapping[str, ClassPolicy]) -> Residency | None:
    """The rule a receiver keeps a copy under, once ``copy_refusal`` let it in: the
    header's, narrowed to the class's regions as this node knows them (the decision of
    ``migrated_regions``). A sender that has not yet heard of a narrowing sends the old,
    wider rule; kept as it came, the copy would go on claiming regions its class no longer
    allows (and be pushed there again)."""
    if header is None or header.data_class is None:
        return header
    policy = policies.get(header.data_class)
    if policy is None or header.regions is None:
        return header
    target = migrated_regions(header.regions, policy)
    return header if target is None else Residency(target, header.data_class)
