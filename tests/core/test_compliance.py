"""The residency report's computation (``core.compliance.build_report``), pure: copies by
region, duplication and overhead, a copy deliberately put outside its class's rule (and
one outside its own object rule) flagged, refusals filtered by class, chains summed up."""

from __future__ import annotations

from meshscale.core.compliance import UNCLASSIFIED, ChainResult, RefusalRow, build_report
from meshscale.core.erasure import HeldCopy
from meshscale.core.policy import make_policy

NODES = {"a": "eu-west", "b": "eu-central", "c": "us-east", "d": "eu-west"}
POLICIES = {"pii": make_policy("pii", ["eu-west", "eu-central"], replicas=2),
            "empty": make_policy("empty", ["us-east"])}


def copy(oid: str, node: str, size: int, cls: str | None = "pii",
         regions: tuple[str, ...] | None = None) -> HeldCopy:
    return HeldCopy(oid, node, NODES[node], size, cls, regions)


def test_copies_bytes_and_overhead_by_region() -> None:
    copies = [copy("o1", "a", 100), copy("o1", "b", 100), copy("o2", "a", 50),
              copy("o2", "d", 50), copy("o3", "c", 7, cls=None)]
    r = build_report(copies, POLICIES, [], [ChainResult("a", True, 3)], nodes=NODES)
    by = {c.data_class: c for c in r.classes}
    assert set(by) == {"pii", "empty", UNCLASSIFIED}
    pii = by["pii"]
    assert (pii.objects, pii.logical_bytes, pii.copies, pii.stored_bytes) == (2, 150, 4, 300)
    assert pii.duplication == 2.0 and pii.overhead == 2.0
    assert [(u.region, u.objects, u.copies, u.bytes) for u in pii.regions] == [
        ("eu-central", 1, 1, 100), ("eu-west", 2, 3, 200)]
    assert pii.out_of_rule == [] and r.out_of_rule == 0
    assert by["empty"].copies == 0 and by["empty"].policy_regions == ["us-east"]
    assert by[UNCLASSIFIED].policy_regions is None and by[UNCLASSIFIED].copies == 1
    assert r.chains_ok


def test_a_copy_outside_its_rule_is_flagged() -> None:
    copies = [copy("o1", "a", 100), copy("o1", "c", 100),  # us-east: outside pii's policy
              # inside the class's regions but outside the object's own narrower rule:
              copy("o2", "b", 10, regions=("eu-west",)), copy("o2", "a", 10, regions=("eu-west",)),
              # no class, a rule of its own, broken:
              copy("o3", "a", 5, cls=None, regions=("us-east",))]
    r = build_report(copies, POLICIES, [], [], nodes=NODES)
    by = {c.data_class: c for c in r.classes}
    flagged = {(o.oid, o.node, o.rule) for o in by["pii"].out_of_rule}
    assert flagged == {("o1", "c", "class policy"), ("o2", "b", "object rule")}
    bad = next(o for o in by["pii"].out_of_rule if o.oid == "o1")
    assert bad.region == "us-east" and bad.allowed == ["eu-central", "eu-west"]
    assert [(o.oid, o.rule) for o in by[UNCLASSIFIED].out_of_rule] == [("o3", "object rule")]
    assert r.out_of_rule == 3
    assert not r.chains_ok  # no chain checked is not "verified"
    # The same copies with the rogue ones gone: nothing flagged.
    clean = [c for c in copies if (c.oid, c.node) not in {("o1", "c"), ("o2", "b"), ("o3", "a")}]
    assert build_report(clean, POLICIES, [], [], nodes=NODES).out_of_rule == 0


def test_one_class_refusals_and_chains() -> None:
    copies = [copy("o1", "a", 100), copy("o9", "c", 3, cls="other")]
    refusals = [RefusalRow("c", 2.0, "o1", "pii", "eu-west", "us-east", "n1", "rule x"),
                RefusalRow("a", 1.0, "k", "other"), RefusalRow("b", 0.5, "o2", "pii")]
    chains = [ChainResult("b", True, 10), ChainResult("a", False, 4, "broken at 2"),
              ChainResult("c", None, detail="unreachable")]
    r = build_report(copies, POLICIES, refusals, chains, nodes=NODES, data_class="pii",
                     since_wall_s=0.25, generated_wall_s=5.0)
    assert [c.data_class for c in r.classes] == ["pii"]
    assert r.classes[0].refusals == 2
    assert [(f.node, f.wall_s) for f in r.refusals] == [("b", 0.5), ("c", 2.0)]
    assert [c.node for c in r.chains] == ["a", "b", "c"] and not r.chains_ok
    assert build_report([], {}, [], [ChainResult("a", True)], nodes={}).chains_ok
