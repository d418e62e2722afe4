"""core/policy.py: data-class policies, the narrowing order of rules, resolution of a
request's rule against its class, and the replica receiver's check."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshscale.core.placement import Candidate, ObjectPolicy, PlacementError, Residency
from meshscale.core.policy import (
    ClassPolicy,
    PolicyError,
    Rule,
    breaking_copies,
    check_region,
    class_of_key,
    copy_refusal,
    decode_policy,
    encode_policy,
    is_reserved_key,
    kv_key_class,
    kv_residency,
    make_policy,
    narrows,
    policy_key,
    resolve,
    result_rule,
)
from meshscale.core.replication import (
    DropLocal,
    ReplicaManager,
    ReplicationConfig,
    SendMessage,
    Transfer,
)

PII = make_policy("pii", ["eu-west", "eu-central"], replicas=3, ttl_s=30 * 86400.0,
                  cross_region_reads=False)
POLICIES = {"pii": PII}


def test_make_policy_sorts_and_checks() -> None:
    p = make_policy("pii", ["eu-west", "eu-central", "eu-west"], stream_regions=["eu-west"])
    assert p.regions == ("eu-central", "eu-west")
    assert p.stream_regions == ("eu-west",)
    assert decode_policy(encode_policy(p)) == p


@pytest.mark.parametrize("regions", [[], ["eu west"], ["eu,west"], ["eu/west"], [""],
                                     ["-eu"], ["x" * 65], ["eu\n"]])
def test_malformed_regions_are_refused(regions: list[str]) -> None:
    with pytest.raises(PolicyError) as e:
        make_policy("pii", regions)
    assert e.value.rule == "malformed"


def test_a_region_list_given_as_one_string_is_refused() -> None:
    with pytest.raises(PolicyError, match="not one string"):
        make_policy("pii", "eu-west")


@pytest.mark.parametrize("kw", [{"replicas": 0}, {"replicas": 17}, {"replicas": True},
                                {"ttl_s": 0.0}, {"ttl_s": -1.0},
                                {"stream_regions": ["us-east"]}])
def test_bad_values_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(PolicyError) as e:
        make_policy("pii", ["eu-west"], **kw)  # type: ignore[arg-type]
    assert e.value.rule == "malformed"


def test_bad_class_names() -> None:
    for name in ("", "a b", "a/b", "../x", "x" * 65):
        with pytest.raises(PolicyError):
            make_policy(name, ["eu-west"])
        with pytest.raises(PolicyError):
            policy_key(name)


def test_keys() -> None:
    assert policy_key("pii") == "__policy/pii"
    assert class_of_key("__policy/pii") == "pii"
    assert class_of_key("task/x") is None
    assert is_reserved_key("__policy/anything")
    assert not is_reserved_key("policy/pii")


def test_stored_garbage_is_malformed() -> None:
    with pytest.raises(PolicyError):
        decode_policy(b"\x01\x02")


def test_resolve_fills_from_the_class() -> None:
    r = resolve("pii", Rule(), POLICIES)
    assert r.rule.regions == {"eu-west", "eu-central"}
    assert r.rule.replicas == 3 and r.rule.ttl_s == 30 * 86400.0
    assert not r.rule.cross_region_reads
    assert r.residency() == Residency(frozenset({"eu-west", "eu-central"}), "pii")


def test_resolve_narrowing_is_allowed() -> None:
    r = resolve("pii", Rule(regions=frozenset({"eu-west"}), replicas=2, ttl_s=60.0), POLICIES)
    assert r.rule.regions == {"eu-west"} and r.rule.replicas == 2 and r.rule.ttl_s == 60.0


@pytest.mark.parametrize("explicit,field", [
    (Rule(regions=frozenset({"eu-west", "us-east"})), "regions"),
    (Rule(replicas=5), "replicas"),
    (Rule(ttl_s=365 * 86400.0), "ttl"),
])
def test_resolve_refuses_widening_naming_both_rules(explicit: Rule, field: str) -> None:
    with pytest.raises(PolicyError) as e:
        resolve("pii", explicit, POLICIES)
    assert e.value.rule == "widens"
    msg = str(e.value)
    assert field in msg and "class pii" in msg
    assert "regions={eu-central,eu-west}" in msg  # the class's rule is named


def test_resolve_unknown_class() -> None:
    with pytest.raises(PolicyError) as e:
        resolve("secret", Rule(), POLICIES)
    assert e.value.rule == "unknown_class" and "'secret'" in str(e.value)
    # With its own regions the class is a label, as before policies existed.
    r = resolve("secret", Rule(regions=frozenset({"us-east"})), POLICIES)
    assert r.residency() == Residency(frozenset({"us-east"}), "secret")


def test_resolve_malformed_region_in_request() -> None:
    with pytest.raises(PolicyError) as e:
        resolve("pii", Rule(regions=frozenset({"eu west"})), POLICIES)
    assert e.value.rule == "malformed"


def test_no_class_is_the_explicit_rule() -> None:
    assert resolve(None, Rule(), POLICIES).residency() is None
    r = resolve(None, Rule(regions=frozenset({"x"})), POLICIES)
    assert r.residency() == Residency(frozenset({"x"}), None)


def test_copy_refusal_checks_header_and_known_class() -> None:
    assert copy_refusal("us-east", None, POLICIES) is None
    assert copy_refusal("eu-west", Residency(frozenset({"eu-west"}), "pii"), POLICIES) is None
    # The header's own regions refuse.
    why = copy_refusal("us-east", Residency(frozenset({"eu-west"}), "pii"), POLICIES)
    assert why is not None and "us-east" in why and "pii" in why
    # A header that states no regions (or wrong ones) for a class this node knows: the
    # class's policy refuses.
    why = copy_refusal("us-east", Residency(None, "pii"), POLICIES)
    assert why is not None and "class pii" in why and "us-east" in why
    why = copy_refusal("us-east", Residency(frozenset({"us-east"}), "pii"), POLICIES)
    assert why is not None and "class pii" in why
    # A class this node does not know: the header alone decides.
    assert copy_refusal("us-east", Residency(None, "other"), POLICIES) is None


def test_breaking_copies() -> None:
    new = make_policy("pii", ["eu-west"])
    assert breaking_copies(new, [("a", "eu-west"), ("b", "eu-central"), ("b", "eu-central")]) \
        == [("b", "eu-central")]


# ------------------------------------------------------------------ properties

REGIONS = ["eu-west", "eu-central", "us-east", "ap-south"]
region_sets = st.one_of(st.none(), st.frozensets(st.sampled_from(REGIONS), min_size=1))
rules = st.builds(Rule, regions=region_sets,
                  replicas=st.one_of(st.none(), st.integers(1, 8)),
                  ttl_s=st.one_of(st.none(), st.sampled_from([60.0, 3600.0, 86400.0])),
                  cross_region_reads=st.booleans(), stream_regions=region_sets)
policies = st.builds(
    lambda regs, n, ttl, x: make_policy("pii", sorted(regs), replicas=n, ttl_s=ttl,
                                        cross_region_reads=x),
    st.frozensets(st.sampled_from(REGIONS), min_size=1), st.integers(1, 8),
    st.one_of(st.none(), st.sampled_from([60.0, 3600.0, 86400.0])), st.booleans())


@settings(max_examples=300, deadline=None)
@given(rules, rules, rules)
def test_narrows_is_a_partial_order(a: Rule, b: Rule, c: Rule) -> None:
    assert narrows(a, a)
    if narrows(a, b) and narrows(b, c):
        assert narrows(a, c)
    if narrows(a, b) and narrows(b, a):
        assert (a.regions, a.replicas, a.ttl_s, a.cross_region_reads, a.streams()) == \
               (b.regions, b.replicas, b.ttl_s, b.cross_region_reads, b.streams())


@settings(max_examples=300, deadline=None)
@given(policies, rules)
def test_resolved_rule_is_never_wider_than_the_class(policy: ClassPolicy, explicit: Rule) -> None:
    try:
        r = resolve("pii", explicit, {"pii": policy})
    except PolicyError as e:
        assert e.rule == "widens"
        assert not narrows(explicit, policy.rule()) or explicit.regions is None
        return
    assert narrows(r.rule, policy.rule())
    # Every region the resolved rule lets a copy live in, the class allows.
    res = r.residency()
    assert res is not None and res.regions is not None and res.regions <= set(policy.regions)
    for region in REGIONS:
        if copy_refusal(region, res, {"pii": policy}) is None:
            assert region in policy.regions


@settings(max_examples=200, deadline=None)
@given(policies, rules)
def test_an_explicit_narrowing_is_kept(policy: ClassPolicy, explicit: Rule) -> None:
    """A request already narrower than its class resolves to exactly itself."""
    if explicit.regions is None or explicit.replicas is None or not narrows(explicit, policy.rule()):
        return
    r = resolve("pii", explicit, {"pii": policy})
    assert r.rule.regions == explicit.regions and r.rule.replicas == explicit.replicas


def test_check_region_accepts_common_names() -> None:
    for name in ("eu-west", "us-east-1", "EU", "zone_a", "r1.example"):
        assert check_region(name) == name


# ------------------------------------------------------------------ repair and hand-off

NODES = [Candidate(f"{r}-{i}", r, f"{r}-z{i}") for r in ("eu-west", "eu-central", "us-east")
         for i in range(3)]
REGION_OF = {c.name: c.region for c in NODES}


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.booleans(), min_size=1, max_size=30),
       st.integers(1, 2), st.sets(st.sampled_from([c.name for c in NODES
                                                   if c.region == "us-east"])))
def test_put_stand_in_and_repair_targets_stay_in_the_resolved_rule(
        seed: int, outcomes: list[bool], kill: int, dead_us: set[str]) -> None:
    """A classed put resolved against its policy, on a small mesh of managers wired by the
    test: its targets, the stand-ins of failed targets (hinted copies) and the
    re-replication after members die are all chosen by ``core.placement`` inside the
    class's regions (the receiver's check is a second line, never the only one)."""
    policy = make_policy("pii", ["eu-west", "eu-central"], replicas=3)
    res = resolve("pii", Rule(), {"pii": policy})
    op = ObjectPolicy(res.rule.replicas or 3, res.residency())
    rng = random.Random(seed)
    cfg = ReplicationConfig(view_change_delay_s=0.1, sync_interval_s=2.0)
    mgrs = {c.name: ReplicaManager(c.name, config=cfg, rng=random.Random(rng.random()),
                                   now=0.0) for c in NODES}
    for m in mgrs.values():
        m.set_view(NODES, 0.0)
        m.drain()
    down: set[str] = set()
    sent: list[Transfer] = []
    fates = iter(outcomes)

    def flush(now: float) -> None:
        busy = True
        while busy:
            busy = False
            for name in sorted(mgrs):
                if name in down:
                    continue
                for out in mgrs[name].drain():
                    busy = True
                    if isinstance(out, SendMessage) and out.dst not in down:
                        mgrs[out.dst].handle_message(name, out.payload, now)
                    elif isinstance(out, Transfer):
                        sent.append(out)
                        ok = out.dst not in down and next(fates, True)
                        if ok:
                            mgrs[out.dst].object_added(out.oid, out.policy, out.hint_for,
                                                       now, out.written)
                        mgrs[name].transfer_done(out.req_id, out.dst, out.oid, ok, now)
                    elif isinstance(out, DropLocal):
                        mgrs[name].object_removed(out.oid, now)

    me = "eu-west-0"
    mgrs[me].object_added("obj", op, None, 0.0, None)
    try:
        mgrs[me].begin_put(1, "obj", op, 2, 0.0)
    except PlacementError:
        return
    flush(0.0)
    put_sent = len(sent)
    holders = sorted(n for n, m in mgrs.items() if m.holds("obj") and n != me)
    down |= set(holders[:kill]) | dead_us  # copies lost: re-replication must follow
    short = len({me, *holders} - down) < 3
    alive = [c for c in NODES if c.name not in down]
    now = 0.0
    for m in (mgrs[c.name] for c in alive):
        m.set_view(alive, 0.5)
    for _ in range(100):
        now = round(now + 0.1, 6)
        for name in sorted(mgrs):
            d = mgrs[name].next_deadline()
            if name not in down and d is not None and d <= now:
                mgrs[name].on_timer(now)
        flush(now)
    assert sent, "no transfer at all: nothing was tested"
    for t in sent:
        assert REGION_OF[t.dst] in policy.regions, (t.dst, t.hint_for)
    live_holders = {n for n, m in mgrs.items() if m.holds("obj") and n not in down}
    assert {REGION_OF[n] for n in live_holders} <= set(policy.regions)
    # Enough allowed nodes are left (6 in the class's regions, at most 2 dead): the count
    # is restored, inside the rule; by re-replication when the deaths left it short.
    assert len(live_holders) >= 3, live_holders
    if short:
        assert len(sent) > put_sent


# ------------------------------------------------------------------ KV keys of a class


def test_kv_keys_under_a_class_prefix() -> None:
    assert kv_key_class("pii/customer/42") == "pii"
    assert kv_key_class("pii") is None  # no prefix
    assert kv_key_class("__policy/pii") is None  # reserved
    assert kv_key_class("a b/x") is None
    assert kv_residency("pii/customer/42", POLICIES) == Residency(
        frozenset({"eu-west", "eu-central"}), "pii")
    assert kv_residency("telemetry/x", POLICIES) is None  # a class without a policy
    assert kv_residency("task/abc", POLICIES) is None


def test_kv_hints_for_a_classed_key_go_only_inside_its_class() -> None:
    """A stand-in's hints for a key under a class's prefix name only intended replicas
    inside the class's regions (``KVHints`` asks the key's rule)."""
    from meshscale.core.kv import KVHintConfig, KVHints, kv_placement

    key = "pii/customer/7"
    rule = kv_residency(key, POLICIES)
    assert rule is not None
    home = kv_placement(key, NODES, 3, rule).intended
    assert {REGION_OF[n] for n in home} <= set(PII.regions)
    live = [c for c in NODES if c.name not in home[:2]]
    down = [c for c in NODES if c.name in home[:2]]
    where = kv_placement(key, live, 3, rule, down=down)
    assert {REGION_OF[n] for n in where.replicas} <= set(PII.regions)
    stand_in = where.stand_ins[0]
    book = KVHints(stand_in, KVHintConfig(startup_watch_s=0.0),
                   residency=lambda k: kv_residency(k, POLICIES))
    book.set_view(live, down)
    targets = book.plan(key, [], 0.0) or ()
    assert targets and {REGION_OF[n] for n in targets} <= set(PII.regions)
    # Without the rule the same book would hint for replicas elsewhere too.
    blind = KVHints(stand_in, KVHintConfig(startup_watch_s=0.0))
    blind.set_view(live, down)
    assert set(blind.plan(key, [], 0.0) or ()) != set(targets)


# ------------------------------------------------------------------ a task's result

TELEMETRY = make_policy("telemetry", ["eu-west", "eu-central", "us-east"], replicas=3)
US_ONLY = make_policy("usdata", ["us-east"], replicas=2)
EU = frozenset({"eu-west", "eu-central"})
ALL3 = POLICIES | {"telemetry": TELEMETRY, "usdata": US_ONLY}


@pytest.mark.parametrize(("declared", "inputs", "expected"), [
    # No class anywhere: no class for the result (a regions-only task included).
    (None, [], None),
    (None, [None, Residency(frozenset({"eu-west"}))], None),
    (Residency(frozenset({"us-east"})), [None], None),
    # A declared class wins, with the task's rule (the inputs bound placement only).
    (Residency(EU, "pii"), [Residency(frozenset({"us-east"}), "usdata")], Residency(EU, "pii")),
    (Residency(frozenset({"us-east"}), "telemetry"), [Residency(EU, "pii")],
     Residency(frozenset({"us-east"}), "telemetry")),
    # Undeclared: the inputs' strictest class, its regions narrowed by every input's.
    (None, [Residency(EU, "pii")], Residency(EU, "pii")),
    (None, [Residency(None, "telemetry"), Residency(EU, "pii"), None], Residency(EU, "pii")),
    (None, [Residency(frozenset({"eu-west"}), "pii"), Residency(None, "telemetry")],
     Residency(frozenset({"eu-west"}), "pii")),
    (None, [Residency(EU, "telemetry")], Residency(EU, "telemetry")),
    # A regions-only declaration narrows the inherited rule.
    (Residency(frozenset({"eu-central", "us-east"})), [Residency(EU, "pii")],
     Residency(frozenset({"eu-central"}), "pii")),
    # A class without a policy (a label only) gets the regions its inputs share.
    (None, [Residency(frozenset({"eu-west"}), "tag"),
            Residency(frozenset({"eu-west", "us-east"}), "tag")],
     Residency(frozenset({"eu-west"}), "tag")),
])
def test_result_rule_table(declared: Residency | None, inputs: list[Residency | None],
                           expected: Residency | None) -> None:
    assert result_rule(declared, inputs, ALL3) == expected


def test_result_rule_refuses_incomparable_classes_and_no_region() -> None:
    with pytest.raises(PolicyError) as e:
        result_rule(None, [Residency(EU, "pii"), Residency(None, "usdata")], ALL3)
    assert e.value.rule == "result_class"
    assert "pii" in str(e.value) and "usdata" in str(e.value) and "data_class=" in str(e.value)
    # A label-only class bounds no copy count: not narrower than a policy's rule.
    with pytest.raises(PolicyError, match="ambiguous"):
        result_rule(None, [Residency(frozenset({"eu-west"}), "tag"),
                           Residency(None, "telemetry")], ALL3)
    # Declaring the result's class settles it.
    assert result_rule(Residency(EU, "pii"), [Residency(EU, "pii"), Residency(None, "usdata")],
                       ALL3) == Residency(EU, "pii")
    with pytest.raises(PolicyError) as e2:
        result_rule(None, [Residency(EU, "pii"), Residency(frozenset({"us-east"}), "telemetry")],
                    ALL3)
    assert e2.value.rule == "residency" and "pii" in str(e2.value)


classes = st.sampled_from(["pii", "telemetry", "usdata", "tag", None])
input_rules = st.one_of(st.none(), st.builds(Residency, region_sets, classes))


@settings(max_examples=300, deadline=None)
@given(st.lists(input_rules, max_size=5), st.one_of(st.none(), st.builds(Residency, region_sets)))
def test_an_undeclared_result_is_never_wider_than_any_classed_input(
        inputs: list[Residency | None], declared: Residency | None) -> None:
    """Undeclared: the result has a class exactly when an input has one; it is one of the
    inputs' classes, whose rule narrows every other input class's; and it may live only
    where every classed input, its class's policy and the task's regions allow."""
    classed = [r for r in inputs if r is not None and r.data_class is not None]
    try:
        got = result_rule(declared, inputs, ALL3)
    except PolicyError as e:
        assert classed and e.rule in {"result_class", "residency"}
        return
    if not classed:
        assert got is None
        return
    assert got is not None and got.data_class in {r.data_class for r in classed}
    for r in classed:
        policy = ALL3.get(r.data_class or "")
        if policy is not None:
            assert got.regions is not None and got.regions <= set(policy.regions)
        if r.regions is not None:
            assert got.regions is not None and got.regions <= r.regions
    if declared is not None and declared.regions is not None:
        assert got.regions is not None and got.regions <= declared.regions
    assert got.regions is None or got.regions
