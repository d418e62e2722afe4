"""The residency report's text and HTML forms (``client/compliance.py``) over a report
built by the pure function: one self-contained file (inline SVG bar charts, no script, no
link to fetch), the tables, and a copy outside its rule shown as such."""

from __future__ import annotations

import re

from meshscale.client.compliance import render_html, render_text
from meshscale.core.compliance import ChainResult, ComplianceReport, RefusalRow, build_report
from meshscale.core.erasure import HeldCopy
from meshscale.core.policy import make_policy

NODES = {"a": "eu-west", "b": "eu-central", "c": "us-east"}


def report(rogue: bool) -> ComplianceReport:
    copies = [HeldCopy("b3-" + "1" * 64, "a", "eu-west", 1000, "pii"),
              HeldCopy("b3-" + "1" * 64, "b", "eu-central", 1000, "pii")]
    if rogue:
        copies.append(HeldCopy("b3-" + "1" * 64, "c", "us-east", 1000, "pii"))
    return build_report(
        copies, {"pii": make_policy("pii", ["eu-west", "eu-central"], replicas=2)},
        [RefusalRow("c", 1.0, "b3-" + "2" * 64, "pii", "eu-west", "us-east", "n",
                    "refused: <residency> rule")],
        [ChainResult("a", True, 5), ChainResult("b", True, 6), ChainResult("c", True, 2)],
        nodes=NODES, generated_wall_s=1.0e9)


def test_html_is_one_self_contained_file() -> None:
    page = render_html(report(rogue=False))
    assert page.startswith("<!doctype html>") and page.count("<svg") == 1
    assert "<script" not in page and not re.search(r"(src|href)=\"?(https?:|//)", page)
    assert "copies per region" in page and "kB stored per region" in page
    assert "eu-central" in page
    assert "No copy outside its rule." in page
    assert "&lt;residency&gt; rule" in page  # escaped, not markup
    assert "every copy inside its rule; every audit chain verifies" in page
    text = render_text(report(rogue=False))
    assert "duplication 2.00x" in text and "eu-west: 1 copies of 1 objects" in text


def test_a_copy_outside_its_rule_is_shown() -> None:
    page = render_html(report(rogue=True))
    assert "1 copies outside their rule" in page and "us-east" in page
    assert "OUTSIDE their rule" in page
    text = render_text(report(rogue=True))
    assert "OUTSIDE RULE: b3-111" in text and "(class policy: allowed eu-central,eu-west)" in text
