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
