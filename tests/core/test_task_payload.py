"""Where a task's arguments and function are kept for a takeover (issue #15): in its KV
record and an unclassed object for a task with no rule (as always), else as objects
under ``core.policy.payload_rule``, the record (``core.tasks.stored_record``) keeping only
references."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshscale.core.placement import Residency
from meshscale.core.policy import PolicyError, make_policy, payload_rule
from meshscale.core.tasks import (
    TaskBook,
    TaskPayload,
    TaskRecord,
    decode_function,
    decode_payload,
    encode_function,
    encode_payload,
    function_scope,
    payload_missing,
    payload_ref,
    stored_record,
)

R = frozenset
EU = Residency(R({"eu-west", "eu-central"}), "pii")
POLICIES = {"pii": make_policy("pii", ["eu-west", "eu-central"]),
            "usonly": make_policy("usonly", ["us-east"])}
MARK = b"args-marker-5d1e"


def test_a_task_without_a_rule_keeps_its_arguments_in_its_record() -> None:
    assert payload_rule(None, [], POLICIES) is None
    assert payload_rule(None, [None, None], POLICIES) is None
    # an input with regions but no class is not a class
    assert payload_rule(None, [Residency(R({"us-east"}))], POLICIES) is None


def test_a_classed_task_keeps_them_under_its_class() -> None:
    assert payload_rule(EU, [], POLICIES) == EU
    assert payload_rule(EU, [None, Residency(R({"eu-west"}), "pii")], POLICIES) == EU


def test_regions_without_a_class_keep_them_in_those_regions() -> None:
    declared = Residency(R({"us-east"}))
    assert payload_rule(declared, [], POLICIES) == declared


def test_classed_inputs_give_their_strictest_class_within_every_rule() -> None:
    got = payload_rule(Residency(R({"eu-west", "us-east"})),
                       [Residency(R({"eu-west", "eu-central"}), "pii")], POLICIES)
    assert got == Residency(R({"eu-west"}), "pii")
    assert payload_rule(None, [Residency(R({"eu-central"}), "pii")], POLICIES) \
        == Residency(R({"eu-central"}), "pii")


def test_ambiguous_input_classes_are_refused() -> None:
    with pytest.raises(PolicyError) as e:
        payload_rule(None, [EU, Residency(R({"us-east"}), "usonly")], POLICIES)
    assert e.value.rule == "result_class"


residencies = st.one_of(
    st.none(),
    st.builds(Residency, st.one_of(st.none(), st.frozensets(
        st.sampled_from(["eu-west", "eu-central", "us-east"]), min_size=1)),
        st.sampled_from([None, "pii"])).filter(
            # as resolved (``resolve``) and stored: a class's rule names its regions
            lambda r: (r.regions is not None or r.data_class is not None) and (
                r.data_class is None or (r.regions is not None
                                         and r.regions <= {"eu-west", "eu-central"}))))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a loaded CI machine
@given(residencies, st.lists(residencies, max_size=4))
def test_a_task_with_any_rule_or_classed_input_keeps_them_out_of_its_record(
    declared: Residency | None, inputs: list[Residency | None],
) -> None:
    try:
        rule = payload_rule(declared, inputs, POLICIES)
    except PolicyError:
        return  # refused: the owner keeps them in memory only
    ruled = declared is not None or any(r is not None and r.data_class for r in inputs)
    assert (rule is not None) == ruled
    if declared is not None and declared.data_class is not None:
        assert rule == declared  # a declared class wins, as for the task's result
    elif rule is not None and rule.data_class is not None:
        # never wider than the class's policy, the declared regions or a classed input's
        assert rule.regions is not None and rule.regions <= {"eu-west", "eu-central"}
        for r in [declared, *inputs]:
            if r is not None and r.regions is not None and (r is declared or r.data_class):
                assert rule.regions <= r.regions
    elif rule is not None:
        assert rule == declared


def record(**kw: object) -> TaskRecord:
    return TaskRecord(task_id="t1", owner="n1", fn_id="f", args=MARK, **kw)  # type: ignore[arg-type]


def test_the_stored_record_of_a_ruled_task_holds_no_arguments() -> None:
    plain = record()
    assert stored_record(plain) is plain  # unchanged, no copy: the hot path
    assert MARK in msgspec.msgpack.encode(stored_record(plain))
    for ref in (payload_ref("", 0, "pii"), payload_ref("b3-" + "ab" * 32, 40, "pii")):
        rec = record(data_class="pii", residency=["eu-west"], payload_ref=ref)
        kept = stored_record(rec)
        assert rec.args == MARK  # the owner's own copy keeps them (it runs the task)
        data = msgspec.msgpack.encode(kept)
        assert MARK not in data
        back = msgspec.msgpack.decode(data, type=TaskRecord)
        assert back.args is None and back.payload_ref == ref
        assert back.data_class == "pii" and back.state == rec.state and back.owner == "n1"


def test_payload_round_trips_and_refuses_bad_or_foreign_bytes() -> None:
    data = encode_payload(TaskPayload("t1", MARK))
    assert decode_payload(data, "t1") == TaskPayload("t1", MARK)
    with pytest.raises(ValueError, match="not 't2'"):
        decode_payload(data, "t2")
    with pytest.raises(ValueError, match="not a task payload"):
        decode_payload(b"\x00junk", "t1")
    # two tasks with equal arguments do not share an object (content-addressed ids)
    assert encode_payload(TaskPayload("t2", MARK)) != data


def test_a_takeover_without_readable_arguments_fails_naming_why() -> None:
    book = TaskBook("n2")
    stored = stored_record(record(data_class="pii",
                                  payload_ref=payload_ref("b3-00", 9, "pii")))
    why = "cross-region read rule: class pii's policy lets only nodes in regions ..."
    _, failed = book.adopt(stored, 0.0, payload_error=why)
    assert failed is not None and "class pii" in failed and "b3-00" in failed
    assert why in failed and "n1" in failed
    # never stored: said so
    never = payload_missing(stored_record(record(payload_ref=payload_ref("", 0, None))))
    assert "never stored" in never
    # read back by the driver: it runs again
    back = msgspec.structs.replace(stored, task_id="t3", args=MARK)
    _, ok = book.adopt(back, 0.0)
    assert ok is None


def test_a_ruled_tasks_function_is_one_object_per_rule() -> None:
    fn = b"\x80\x05cloudpickled closure with class data"
    pii = encode_function(fn, EU)
    assert decode_function(pii) == fn
    # the rule is part of the object (content-addressed ids): never one object, two rules
    assert encode_function(fn, Residency(R({"eu-west"}), "pii")) != pii
    assert encode_function(fn, Residency(R({"eu-west", "eu-central"}))) != pii
    assert function_scope(EU) == "pii@eu-central,eu-west"
    assert function_scope(Residency(None, "pii")) == "pii@*"
    with pytest.raises(ValueError, match="not a task function"):
        decode_function(b"\x00junk")
    ref = payload_ref("b3-aa", 3, "pii", "b3-bb")
    assert ref == {"id": "b3-aa", "size": 3, "data_class": "pii", "fn": "b3-bb"}
