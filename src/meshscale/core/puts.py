"""Put coordination: where one put's copies go and what becomes of the coordinator's own.

A put is planned once, from one view: ``ReplicaManager.plan_put`` calls ``plan_put`` with
the manager's own view (the one ``begin_put`` works from) as soon as the coordinator
knows the object's id. The plan holds the write set (``placement.write_set``, computed
once for the put) and the quorum check, whether the coordinator is one of the targets,
the members its copies go to while the bytes arrive (cut-through forwards), and whether
its own copy is a *spare*. The driver carries the plan through the upload and hands it
back to ``begin_put``, so the early copies, the quorum and the manager's transfers all
use the same write set. The plan remembers the manager's view version; if the view
changed before ``begin_put`` (a member died or filled meanwhile), a planned target that
no longer fits is a failed transfer at once and gets a stand-in, as any failed target
does; a target that still fits keeps its (early) copy.

A spare is the copy a coordinator outside the write set keeps only as a fallback for the
pushes: written, neither hashed nor made durable, committed only when a push has to come
from it (``spare_may_source``) and otherwise dropped once every member's copy is decided
(``spare_fate``). A spare is only ever committed where the object's residency rule allows
(``placement.may_hold``): a coordinator outside the rule never keeps one, whatever
becomes of the put.

Dynamo (DeCandia et al., SOSP 2007) has the coordinator be a member of the preference
list; a mesh client may reach any node, hence the spare.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshscale.core.placement import (
    Candidate,
    ObjectPolicy,
    PlacementError,
    check_quorum,
    may_hold,
    write_set,
)

__all__ = [
    "PutPlan",
    "SpareFate",
    "check_degraded",
    "check_feasible",
    "plan_put",
    "put_refusal",
    "spare_fate",
    "spare_may_source",
]


@dataclass(frozen=True)
class PutPlan:
    """One put, decided at its start (see the module docstring)."""

    oid: str
    policy: ObjectPolicy
    w: int
    targets: tuple[str, ...]
    """The write set, in priority order: ``ReplicaManager.begin_put`` sends to these."""
    member: bool
    """The coordinator is one of the targets (its own copy is a member copy)."""
    forwards: tuple[str, ...]
    """The targets the coordinator copies to while the bytes arrive (cut-through); empty
    when the driver does not start early copies."""
    spare: bool
    """The coordinator's own copy is a spare: it is not a target and early copies go to
    every target, so the members' copies make the quorum without it."""
    may_keep: bool
    """The coordinator's region may hold a copy (``placement.may_hold``): its spare may
    be committed when a push needs it."""
    view: int = 0
    """The version of the view the plan was made from (``ReplicaManager.plan_put``)."""

    def __post_init__(self) -> None:
        assert self.targets, "a put plan with no target"
        assert not (self.spare and self.member), "a member's copy is never a spare"
        assert set(self.forwards) <= set(self.targets), "a forward outside the write set"


def check_feasible(view: Iterable[Candidate], policy: ObjectPolicy, w: int, *,
                   allow_degraded: bool = True) -> None:
    """Refuse, before any byte is taken, a put that the view cannot place whatever its id
    turns out to be (the write set's size does not depend on the id), and, unless
    ``allow_degraded``, one that cannot reach its replication factor with the nodes the
    rule allows now (``check_degraded``). Raises ``PlacementError`` worded for the client
    (``put_refusal``)."""
    try:
        _checked_write_set("", list(view), policy, w, allow_degraded)
    except PlacementError as e:
        raise put_refusal(e) from None


def check_degraded(copies: int, policy: ObjectPolicy) -> None:
    """A put whose write set (``copies`` nodes) is smaller than its replication factor
    would stay under-replicated until more nodes the rule allows are live: refused
    (rule ``replicas``) for a caller that did not say it accepts that."""
    if copies < policy.replicas:
        raise PlacementError(
            "replicas", f"only {copies} live node(s) may hold a copy under this rule now, "
                        f"fewer than replicas={policy.replicas}: the object would stay "
                        "under-replicated until more join (allow_degraded=True, or the "
                        "CLI, stores it anyway)")


def plan_put(oid: str, me: str, region: str, view: Iterable[Candidate], policy: ObjectPolicy,
             w: int, *, early_copies: bool, version: int = 0,
             allow_degraded: bool = True) -> PutPlan:
    """Plan the put of ``oid`` coordinated by node ``me`` (in ``region``) from ``view``
    (version ``version``). ``early_copies``: the driver copies to the members while the
    bytes arrive. Raises ``PlacementError`` when the view cannot meet the policy or quorum
    ``w`` (or, unless ``allow_degraded``, its replication factor), ``ValueError`` on a
    bad ``w``."""
    if not 1 <= w <= policy.replicas:
        raise ValueError(f"write quorum W={w} must be between 1 and replicas={policy.replicas}")
    chosen = _checked_write_set(oid, list(view), policy, w, allow_degraded)
    targets = tuple(c.name for c in chosen)
    member = me in targets
    forwards = tuple(t for t in targets if t != me) if early_copies else ()
    return PutPlan(oid, policy, w, targets, member, forwards,
                   spare=early_copies and not member,
                   may_keep=may_hold(region, policy.residency), view=version)


def put_refusal(e: PlacementError) -> PlacementError:
    """A placement refusal as a client reads it: the rule first, without the id."""
    detail = str(e)
    if detail.startswith("cannot place"):
        detail = detail.split(": ", 1)[-1]
    return PlacementError(e.rule, f"{e.rule} rule: {detail}")


def _checked_write_set(oid: str, view: list[Candidate], policy: ObjectPolicy,
                       w: int, allow_degraded: bool = True) -> list[Candidate]:
    chosen = write_set(oid, view, policy.replicas, policy.residency)
    check_quorum(chosen, w, sum(1 for c in view if c.full and policy.allows(c.region)))
    if not allow_degraded:
        check_degraded(len(chosen), policy)
    return chosen


def spare_may_source(plan: PutPlan) -> bool:
    """May a push of this put come from the coordinator's spare (committing it first)?
    Only where the rule allows it to hold a copy at all."""
    return plan.may_keep


class SpareFate(enum.Enum):
    DROP = "drop"
    """Remove the uncommitted spare: nothing needed it, or it is not ours to keep."""
    COMMIT = "commit"
    """Commit it: a member's copy failed, so a push may need it (it is then a stray copy,
    handed off and dropped like any other)."""
    KEEP = "keep"
    """A push already committed it: it stays, a stray copy like any other."""


def spare_fate(plan: PutPlan, copies: Sequence[bool], committed: bool) -> SpareFate:
    """What becomes of the spare once every early copy is decided (``copies``: True for a
    member that committed its copy)."""
    assert plan.spare, "only a spare has a fate to decide"
    if committed:
        assert plan.may_keep, "a spare was committed outside the residency rule"
        return SpareFate.KEEP
    if all(copies) or not plan.may_keep:
        return SpareFate.DROP
    return SpareFate.COMMIT
