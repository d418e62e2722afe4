"""``core.policy.migrated_regions``: the rule a stored copy gets when its class's policy
changes with ``--migrate``."""

from __future__ import annotations

from meshscale.core.policy import make_policy, migrated_regions

NEW = make_policy("pii", ["eu-west", "eu-north"])


def test_a_copy_that_fits_keeps_its_rule() -> None:
    assert migrated_regions(["eu-west"], NEW) is None
    assert migrated_regions(("eu-north", "eu-west"), NEW) is None


def test_a_copy_that_does_not_fit_keeps_what_it_shares_else_gets_the_class_regions() -> None:
    assert migrated_regions(["eu-west", "eu-central"], NEW) == {"eu-west"}
    assert migrated_regions(["us-east"], NEW) == {"eu-west", "eu-north"}
    assert migrated_regions(None, NEW) == {"eu-west", "eu-north"}
    for current in (["eu-west", "eu-central"], ["us-east"], None):
        got = migrated_regions(current, NEW)
        assert got is not None and got <= set(NEW.regions)


def test_a_receiver_keeps_a_stale_copy_under_its_class_rule() -> None:
    # A sender that has not heard of a narrowing sends the old, wider rule: the receiver
    # (whose region the new rule still allows) keeps the copy under the narrowed rule.
    from meshscale.core.placement import Residency
    from meshscale.core.policy import copy_refusal, stored_rule

    policies = {"pii": NEW}
    old = Residency(frozenset({"eu-west", "us-east"}), "pii")
    assert copy_refusal("eu-west", old, policies) is None
    kept = stored_rule(old, policies)
    assert kept == Residency(frozenset({"eu-west"}), "pii")
    # Nothing to narrow: the header as it came (the same object).
    fits = Residency(frozenset({"eu-west"}), "pii")
    assert stored_rule(fits, policies) is fits
    # No class, no policy known, or no regions of its own: as it came.
    for header in (None, Residency(frozenset({"us-east"}), None),
                   Residency(frozenset({"us-east"}), "other"), Residency(None, "pii")):
        assert stored_rule(header, policies) is header
