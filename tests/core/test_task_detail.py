"""Where a task's detail (error message, traceback, pickled exception, printed output)
goes (``core.policy.detail_rule``): inline to its owner for an unclassed task, else one
object under its class's rule; and the inline text that replaces it
(``core.tasks.detail_note`` / ``detail_withheld``), which carries no task data
(issue #15)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshscale.core.placement import Residency
from meshscale.core.policy import PolicyError, detail_rule, result_rule
from meshscale.core.tasks import (
    TaskDetail,
    decode_detail,
    detail_note,
    detail_withheld,
    encode_detail,
)

R = frozenset
EU = Residency(R({"eu-west", "eu-central"}), "pii")


def test_an_unclassed_task_sends_its_detail_inline() -> None:
    assert detail_rule(None, None, []) is None
    assert detail_rule(None, None, [None, Residency(R({"us-east"}))]) is None
    # a rule with regions but no class is not a class: inline, as a result would be
    assert detail_rule(Residency(R({"us-east"})), Residency(R({"us-east"})), []) is None


def test_a_classed_result_rule_is_the_details_rule() -> None:
    narrowed = Residency(R({"eu-west"}), "pii")
    assert detail_rule(narrowed, EU, [EU]) == narrowed
    assert detail_rule(EU, None, []) == EU


def test_the_tasks_own_class_when_its_result_has_none() -> None:
    # an owner that sent no result rule: the task's own classed rule
    assert detail_rule(None, EU, []) == EU
    assert detail_rule(Residency(None, None), EU, []) == EU


def test_classed_inputs_alone_give_their_strictest_class() -> None:
    narrow = Residency(R({"eu-west"}), "health")
    got = detail_rule(None, None, [EU, narrow])
    assert got is not None and got.data_class == "health"
    assert got.regions == R({"eu-west"})
    # the same rule the result would be stored under
    assert got == result_rule(None, [EU, narrow], {})


def test_ambiguous_input_classes_are_refused_naming_the_rule() -> None:
    a = Residency(R({"eu-west"}), "a")
    b = Residency(R({"us-east"}), "b")
    with pytest.raises(PolicyError) as e:
        detail_rule(None, None, [a, b])
    assert e.value.rule == "result_class"


REGION = st.sampled_from(["eu-west", "eu-central", "us-east", "ap-south"])
RULE = st.one_of(st.none(), st.builds(
    Residency, st.one_of(st.none(), st.frozensets(REGION, min_size=1)),
    st.one_of(st.none(), st.sampled_from(["pii", "health"]))))


@given(RULE, RULE, st.lists(RULE, max_size=3))
def test_a_classed_task_never_sends_its_detail_inline(
    result: Residency | None, run: Residency | None, inputs: list[Residency | None],
) -> None:
    classed = any(r is not None and r.data_class is not None
                  for r in [result, run, *inputs])
    try:
        got = detail_rule(result, run, inputs)
    except PolicyError:
        assert classed  # withheld, never inline
        return
    if not classed:
        assert got is None
        return
    assert got is not None and got.data_class is not None
    # never wider than the result's rule, when that is classed
    if result is not None and result.data_class is not None:
        assert got == result


def test_the_note_names_the_object_and_class_and_only_the_type() -> None:
    note = detail_note("raised", "ValueError: secret-marker-123 in row 7", "b3-abc", "pii")
    assert note.startswith("ValueError: ")
    assert "b3-abc" in note and "class pii" in note
    assert "secret" not in note and "row 7" not in note
    # a type name that is not one (a worker's odd text) is not passed on
    odd = detail_note("raised", "secret stuff: more", "b3-abc", "pii")
    assert "secret" not in odd and odd.startswith("raised: ")
    # another kind: the kind, never its message
    assert "1.5" not in detail_note("timeout", "ran over 1.5 s", "b3-x", "pii")
    assert detail_note("", "", "b3-x", "pii").startswith("the task's output is kept")


def test_withheld_says_why_without_the_message() -> None:
    text = detail_withheld("raised", "KeyError: 'alice@example.com'", "pii",
                           "it could not be stored")
    assert text.startswith("KeyError: ") and "alice" not in text
    assert "class pii" in text and "could not be stored" in text


def test_detail_round_trips_and_bad_bytes_are_a_value_error() -> None:
    d = TaskDetail(task_id="t1", kind="raised", error="E: x", traceback="tb",
                   exc=b"\x80\x05", stdout="out", stderr="err")
    assert decode_detail(encode_detail(d)) == d
    with pytest.raises(ValueError, match="not a task detail"):
        decode_detail(b"\x01not msgpack of a detail")
