"""Budgets as an axis: the budget-sweep / blackbox-outputs suites, and the per-budget tables with paired
tests against random in the report and on the leaderboard."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from dfml_bench.budget_report import budget_rows, verdict
from dfml_bench.leaderboard import write_leaderboard
from dfml_bench.report import budget_groups, build_report, render_text
from dfml_bench.results import write_record
from dfml_bench.scenarios import get_suite
from dfml_bench.suites.budget import budget_label, sweep_scenarios
from dfml_bench.validate import load_records

from test_leaderboard import accs, make


@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_sweep_is_the_blackbox_homo_scenario_at_a_ladder_of_budgets(scale):
    base = get_suite("blackbox-homo", scale).scenarios[0]
    sweep = get_suite("budget-sweep", scale)
    budgets = [s.budget_total for s in sweep.scenarios]
    assert len(budgets) >= 4 and budgets == sorted(budgets) and len(set(budgets)) == len(budgets)
    if scale == "cpu":
        assert budgets[0] <= 30_000 and budgets[-1] >= 1_000_000
    else:
        assert budgets[-1] >= 2 * 6_060_000  # a few reference API visits
    free = ("name", "description", "budget_total", "budget_per_api", "method_params", "init_key")
    for s in sweep.scenarios:
        a, b = asdict(s), asdict(base)
        assert {k: v for k, v in a.items() if k not in free} == {k: v for k, v in b.items() if k not in free}
        assert s.method_params["bidf-mkd"]["spend_budget"] and s.method_params["bidf-mkd-qe"]["spend_budget"]
    assert {"random", "bidf-mkd", "bidf-mkd-qe"} <= set(sweep.methods)


@pytest.mark.parametrize("suite", ["budget-sweep", "blackbox-outputs"])
def test_variants_share_the_base_scenarios_initialisation(suite):
    """Every budget (and output kind) starts from blackbox-homo's meta-learner, so accuracy differences
    along the ladder are the budget's, not a different random initialisation's."""
    from dfml_bench.runner import init_seed, scenario_init_seed

    base = get_suite("blackbox-homo", "cpu").scenarios[0]
    for seed in (0, 1):
        seeds = {scenario_init_seed(s, seed) for s in get_suite(suite, "cpu").scenarios}
        assert seeds == {scenario_init_seed(base, seed)}
    assert scenario_init_seed(base, 0) != scenario_init_seed(base, 1)
    # scenarios without an init_key keep their own (records made before the field existed stay valid)
    other = get_suite("whitebox-homo", "cpu").scenarios[0]
    assert other.init_key is None and scenario_init_seed(other, 0) == init_seed(other.name, 0)


def test_outputs_suite_has_every_output_kind_at_one_budget():
    suite = get_suite("blackbox-outputs", "cpu")
    kinds = [(s.output_kind, s.topk) for s in suite.scenarios]
    assert kinds == [("logits", 1), ("probs", 1), ("topk", 2), ("label", 1)]
    assert len({s.budget_total for s in suite.scenarios}) == 1 and len({s.name for s in suite.scenarios}) == 4


def test_budget_labels_and_bad_ladders():
    assert [budget_label(n) for n in (30_000, 1_000_000, 6_060_000, 606_000, 500)] == ["30k", "1M", "6.06M", "606k", "500"]
    base = get_suite("blackbox-homo", "cpu").scenarios[0]
    with pytest.raises(ValueError, match="distinct positive"):
        sweep_scenarios(base, (1000, 1000))


def _sweep_records(root):
    """zo: as random at 1k queries, better at 100k; flat: no better anywhere."""
    for i, budget in enumerate((1000, 10_000, 100_000)):
        rnd = accs(10 + i, 0.3, 80)
        gain = (0.0, 0.05, 0.25)[i]
        write_record(root, make("random", rnd, scenario=f"b{budget}", budget=budget))
        write_record(root, make("zo", np.clip(rnd + gain, 0, 1), scenario=f"b{budget}", budget=budget, queries=budget))
        write_record(root, make("flat", rnd, scenario=f"b{budget}", budget=budget, queries=budget // 2))


def test_per_budget_rows_compare_with_random_at_the_same_budget(tmp_path):
    _sweep_records(tmp_path / "r")
    recs = load_records(tmp_path / "r")
    rep = build_report(recs, n_boot=100)
    (group,) = budget_groups(rep.tables[("toy", "cpu")])
    rows = budget_rows(group, recs.ok)
    by = {(r.budget, r.method): r for r in rows}
    assert len(rows) == 9 and [r.budget for r in rows] == sorted(r.budget for r in rows)
    assert verdict(by[(100_000, "zo")]) == "better" and by[(100_000, "zo")].diff > 0.2
    assert verdict(by[(1000, "zo")]) == "n.s." and by[(1000, "zo")].p_wilcoxon_holm == 1.0
    assert verdict(by[(100_000, "flat")]) == "n.s." and by[(100_000, "flat")].queries == 50_000
    assert verdict(by[(1000, "random")]) == "reference"
    # Holm over the methods of one budget: never below the raw p-value
    from dfml_bench.stats import paired_tests

    z = {r.key.method: r for r in recs.ok if r.key.scenario == "b10000"}
    raw_t = paired_tests(z["zo"].per_episode, z["random"].per_episode)[2]
    assert by[(10_000, "zo")].p_ttest_holm >= raw_t and by[(10_000, "zo")].p_ttest_holm <= min(1.0, 2 * raw_t) + 1e-12
    text = render_text(rep, "github")
    assert "accuracy against the query budget" in text and "toy-cpu-budget-0.png" in text and "better" in text


def test_leaderboard_has_the_budget_table_and_plot(tmp_path):
    _sweep_records(tmp_path / "r")
    out = write_leaderboard(tmp_path / "r", tmp_path / "leaderboard.md", n_boot=100)
    page = out.read_text()
    assert "accuracy against the query budget" in page
    assert "(leaderboard-plots/toy-cpu-budget-0.png)" in page
    assert (tmp_path / "leaderboard-plots" / "toy-cpu-budget-0.png").stat().st_size > 1000


def test_report_lists_a_budget_ladder_by_budget_not_by_name(tmp_path):
    # alphabetically q100k < q1M < q30k; the report and the leaderboard read 30k, 100k, 1M
    for i, (name, budget) in enumerate((("q1M", 1_000_000), ("q30k", 30_000), ("q100k", 100_000))):
        write_record(tmp_path / "r", make("random", accs(20 + i, 0.3, 40), scenario=name, budget=budget))
    rep = build_report(load_records(tmp_path / "r"), n_boot=50)
    assert [t.scenario for t in rep.tables[("toy", "cpu")]] == ["q30k", "q100k", "q1M"]
