"""``meshscale plan``: the three example plans' verdicts, the report, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshscale.cli import main
from meshscale.plan.model import EXAMPLE, PlanError, parse_plan
from meshscale.plan.run import run_plan

PLANS = Path(__file__).resolve().parents[2] / "examples" / "plans"


@pytest.mark.parametrize(("name", "verdict", "per_workload"), [
    ("factory", "mesh", {"spindle-anomalies": "mesh", "tool-wear-check": "mesh"}),
    ("nightly-batch", "central", {"nightly-sales-cube": "central",
                                  "analyst-dashboards": "central"}),
    ("retail", "hybrid", {"shelf-cameras": "mesh", "till-price-check": "hybrid",
                          "nightly-stock-forecast": "mesh"}),
])
def test_example_verdicts_and_report(name: str, verdict: str, per_workload: dict[str, str],
                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    code = main(["plan", str(PLANS / f"{name}.toml"), "--seed", "3", "--json", str(out_json),
                 "--html", str(out_html)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"verdict for the plan: {verdict.upper()}" in printed
    data = json.loads(out_json.read_text())
    assert data["verdict"] == verdict
    assert {w["name"]: w["verdict"] for w in data["workloads"]} == per_workload
    for w in data["workloads"]:
        assert w["reasons"], w["name"]
    page = out_html.read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert page.count("<svg") >= 3  # map, bytes, energy (+ latency when there are flows)
    assert "model only" in page and "<script" not in page


def test_same_seed_same_figures() -> None:
    plan = parse_plan((PLANS / "retail.toml").read_text())
    a, b = run_plan(plan, seed=5).to_json(), run_plan(plan, seed=5).to_json()
    assert a == b


def test_residency_that_forbids_central_is_refused_by_the_scheduler() -> None:
    text = EXAMPLE.replace('allowed_regions = ["plant-a", "plant-b", "cloud"]',
                           'allowed_regions = ["plant-a", "plant-b"]')
    r = run_plan(parse_plan(text), seed=1)
    weld = next(w for w in r.workloads if w.name == "weld-inspection")
    assert not weld.figures["central"].feasible
    # The residency filter leaves only the plants; the central mode then finds no node.
    assert "central placement in region 'cloud'" in weld.figures["central"].refused
    assert "{plant-a, plant-b}" in weld.figures["central"].refused
    assert weld.verdict == "mesh"
    assert set(weld.figures["mesh"].runs_in) <= {"plant-a", "plant-b"}


def test_example_prints_a_plan_that_parses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--example"]) == 0
    parse_plan(capsys.readouterr().out)


def _with_hop_quantiles(text: str) -> str:
    """The example with its commented hop distributions set."""
    out = text.replace("# hop_quantiles_ms = ", "hop_quantiles_ms = ").replace(
        "# fetch_hop_quantiles_ms = ", "fetch_hop_quantiles_ms = ")
    assert out != text
    return out


def test_hop_quantiles_widen_the_latency_and_keep_the_seed() -> None:
    """The example's commented ``hop_quantiles_ms`` parse; with them each hop draws its
    time (a tail to 9 ms at the p99 where the constant is 1 ms): the calls' p99 near
    their callers rises, their p50 hardly, and the same seed gives the same report."""
    plan = parse_plan(_with_hop_quantiles(EXAMPLE))
    assert plan.hop_quantiles_ms == [(0, 0.8), (0.5, 1.0), (0.9, 1.3), (0.99, 9.0)]
    assert plan.fetch_hop_quantiles_ms == [(0.5, 1.0), (0.99, 6.0)]
    assert run_plan(plan, seed=2).to_json() == run_plan(plan, seed=2).to_json()
    const = run_plan(parse_plan(EXAMPLE), seed=2)
    drawn = run_plan(plan, seed=2)
    a = next(w for w in const.workloads if w.name == "recipe-lookup").figures["mesh"]
    b = next(w for w in drawn.workloads if w.name == "recipe-lookup").figures["mesh"]
    assert b.p99_ms - a.p99_ms > 4.0  # 8.7 -> 15.5 ms
    assert abs(b.p50_ms - a.p50_ms) < 1.0  # 7.4 -> 7.7 ms


def _drop_link(text: str) -> str:
    block = ('[[links]]\na = "plant-b"\nb = "cloud"\nrtt_ms = 30\nbandwidth_mbps = 100\n'
             'egress_price_per_gb = 0.05\n')
    assert block in text
    return text.replace(block, "")


BAD = [
    ("unknown field", lambda t: t.replace('jurisdiction = "CZ"', 'colour = "red"'),
     ["unknown field `colour`", "regions[1]"]),
    ("negative rate", lambda t: t.replace("records_per_s = 10 ", "records_per_s = -10 "),
     ["workloads[0].records_per_s", ">= 0"]),
    ("class allows no region",
     lambda t: t.replace('allowed_regions = ["plant-a", "plant-b", "cloud"]',
                         'allowed_regions = ["mars"]'),
     ["workloads[0].data_class", "allows no region"]),
    ("unreachable site", _drop_link, ["regions[1]", "unreachable"]),
    ("hop quantile levels not increasing",
     lambda t: t.replace("hop_overhead_ms = 1.0 ",
                         "hop_quantiles_ms = [[0.5, 1.0], [0.5, 2.0]]\nhop_overhead_ms = 1.0 "),
     ["hop_quantiles_ms[1]", "levels must increase"]),
    ("hop quantiles taking less time higher up",
     lambda t: t.replace("hop_overhead_ms = 1.0 ", "fetch_hop_quantiles_ms = [[0.5, 3.0], "
                         "[0.9, 2.0]]\nhop_overhead_ms = 1.0 "),
     ["fetch_hop_quantiles_ms[1]", "cannot take less time"]),
    ("hop quantile level above 1",
     lambda t: t.replace("hop_overhead_ms = 1.0 ",
                         "hop_quantiles_ms = [[1.5, 1.0]]\nhop_overhead_ms = 1.0 "),
     ["hop_quantiles_ms", "<= 1.0"]),
]


@pytest.mark.parametrize(("case", "edit", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_plan_exits_2_with_one_line(case: str, edit: object, words: list[str],
                                        tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert callable(edit)
    path = tmp_path / "bad.toml"
    path.write_text(edit(EXAMPLE))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meshscale: error: ")
    for w in words:
        assert w in err, (w, err)
    with pytest.raises(PlanError):
        parse_plan(edit(EXAMPLE))
