"""Statistics against known cases: scipy's own results, Holm on a textbook example, Demšar's q table, ties,
refusal of unpaired records."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from dfml_bench.results import ResultRecord, RunKey, summary_of
from dfml_bench.stats import (EpisodeMismatchError, cd_cliques, check_comparable, compare_paired, holm, mean_ci,
                              nemenyi_cd, nemenyi_q, paired_arrays, paired_bootstrap_ci, paired_tests, plot_cd,
                              scenario_table, suite_ranks)


def rec(method: str, acc, seed: int = 0, scenario: str = "s1", ep_hash: str | None = None, not_data_free: bool = False,
        suite: str = "toy", per_domain: dict | None = None) -> ResultRecord:
    acc = [float(a) for a in acc]
    return ResultRecord(
        key=RunKey(suite, "cpu", scenario, method, seed), status="ok",
        config={"scenario": {"name": scenario, "dataset": "toy"}},
        hashes={"dataset": "d" * 64, "zoo": "z" * 64, "test_episodes": ep_hash or f"e{seed}" * 16},
        per_episode=acc, accuracy=summary_of(acc), per_domain=per_domain or {},
        queries={"total": 0, "total_budget": None}, timing={"total_seconds": 1.0}, resources={"device": "cpu"},
        flags={"not_data_free": not_data_free, "reported": False},
        versions={"method_package": {"package": "pkg", "version": "1.0"}},
    )


def episodes(rng, n=600, p=0.4, ways_queries=75):
    return rng.binomial(ways_queries, p, size=n) / ways_queries


def test_holm_textbook_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(holm([0.04, 0.01, 0.02]), [0.04, 0.03, 0.04])  # 0.02 * 2 = 0.04; 0.04 * 1 kept monotone
    out = holm([0.01, math.nan, 0.02])  # nan is neither adjusted nor counted in m
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.02, 0.02])


def test_paired_tests_match_scipy():
    rng = np.random.default_rng(1)
    a = episodes(rng)
    b = np.clip(a + rng.integers(-3, 3, size=a.size) / 75, 0, 1)  # many zero differences
    p_w, s_w, p_t, s_t = paired_tests(a, b)
    w = sps.wilcoxon(a, b, zero_method="pratt")
    t = sps.ttest_rel(a, b)
    assert (p_w, s_w) == (pytest.approx(w.pvalue), pytest.approx(w.statistic))
    assert (p_t, s_t) == (pytest.approx(t.pvalue), pytest.approx(t.statistic))
    assert p_t < 0.05  # the shift is mostly negative (-3..2): b is lower on average


def test_identical_samples_give_p_one_and_zero_ci():
    a = episodes(np.random.default_rng(2), n=100)
    p_w, _, p_t, _ = paired_tests(a, a.copy())
    assert p_w == 1.0 and p_t == 1.0
    res = compare_paired(a, a.copy(), n_boot=500)
    assert (res.mean_diff, res.ci_low, res.ci_high, res.p_improve) == (0.0, 0.0, 0.0, 0.5)


def test_mean_ci_matches_scipy_t_interval():
    x = episodes(np.random.default_rng(3), n=50)
    m, half = mean_ci(x)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert m == pytest.approx(x.mean()) and half == pytest.approx((hi - lo) / 2)


def test_paired_bootstrap_ci_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(4)
    d = rng.normal(0.02, 0.1, size=600)
    ci1 = paired_bootstrap_ci(d, n_boot=2000, seed=7)
    assert ci1 == paired_bootstrap_ci(d, n_boot=2000, seed=7)
    assert ci1 != paired_bootstrap_ci(d, n_boot=2000, seed=8)
    assert ci1[0] < d.mean() < ci1[1]
    # its width is close to the normal-theory interval (2 * 1.96 * sd / sqrt(n))
    assert ci1[1] - ci1[0] == pytest.approx(2 * 1.96 * d.std(ddof=1) / math.sqrt(d.size), rel=0.1)
    # stratified: a constant difference per stratum gives a degenerate interval at the pooled mean
    lo, hi = paired_bootstrap_ci(np.r_[np.full(10, 0.1), np.full(30, 0.3)], np.r_[np.zeros(10), np.ones(30)], n_boot=300)
    assert lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_tie_detected_when_two_methods_share_per_episode_accuracies():
    rng = np.random.default_rng(5)
    good = episodes(rng, p=0.45)
    worse = np.clip(good - rng.integers(0, 8, size=good.size) / 75, 0, 1)  # clearly worse
    t = scenario_table([rec("a", good), rec("twin", good), rec("worse", worse)], n_boot=500)
    rows = {r.method: r for r in t.rows}
    assert t.best in ("a", "twin") and rows[t.best].is_best
    other = "twin" if t.best == "a" else "a"
    assert rows[other].tied and rows[other].vs_best.mean_diff == 0.0 and rows[other].p_wilcoxon_holm == 1.0
    assert rows[other].rank == rows[t.best].rank == 1.5  # equal means share the average rank
    assert not rows["worse"].tied and rows["worse"].rank == 3.0
    assert rows["worse"].p_wilcoxon_holm < 1e-6 and rows["worse"].vs_best.ci_high < 0


def test_holm_is_applied_across_the_table():
    rng = np.random.default_rng(6)
    best = episodes(rng, p=0.5)
    recs = [rec("best", best)] + [rec(f"m{i}", np.clip(best - rng.integers(-1, 2 + i, size=best.size) / 75, 0, 1))
                                  for i in range(3)]
    t = scenario_table(recs, n_boot=200)
    others = [r for r in t.rows if not r.is_best]
    raw = [r.vs_best.p_wilcoxon for r in others]
    np.testing.assert_allclose([r.p_wilcoxon_holm for r in others], holm(raw))
    np.testing.assert_allclose([r.p_ttest_holm for r in others], holm([r.vs_best.p_ttest for r in others]))


def test_reference_methods_are_not_ranked():
    rng = np.random.default_rng(7)
    a = episodes(rng, p=0.3)
    oracle = np.clip(a + 0.2, 0, 1)
    t = scenario_table([rec("a", a), rec("b", np.clip(a - 0.05, 0, 1)), rec("oracle", oracle, not_data_free=True)], n_boot=200)
    assert t.best == "a" and [r.method for r in t.ranked] == ["a", "b"]
    ref = t.rows[-1]
    assert ref.method == "oracle" and ref.rank is None and ref.vs_best.mean_diff > 0


def test_multi_seed_pairs_per_seed_and_episode():
    rng = np.random.default_rng(8)
    a0, a1, b0, b1 = (episodes(rng, n=40) for _ in range(4))
    ra = [rec("a", a0, 0), rec("a", a1, 1)]
    rb = [rec("b", b1, 1), rec("b", b0, 0), rec("b", episodes(rng, n=40), 2)]  # seed 2 has no partner
    xa, xb, strata = paired_arrays(ra, rb)
    np.testing.assert_array_equal(xa, np.r_[a0, a1])
    np.testing.assert_array_equal(xb, np.r_[b0, b1])
    np.testing.assert_array_equal(strata, np.r_[np.zeros(40), np.ones(40)])
    t = scenario_table(ra + rb, n_boot=200)
    row_a = next(r for r in t.rows if r.method == "a")
    assert row_a.seed_means == pytest.approx([a0.mean(), a1.mean()])
    assert row_a.seed_std == pytest.approx(np.std([a0.mean(), a1.mean()], ddof=1))
    assert row_a.n_episodes == 80


def test_refuses_records_with_different_episode_hashes():
    a, b = rec("a", [0.2, 0.4]), rec("b", [0.2, 0.6], ep_hash="f" * 64)
    with pytest.raises(EpisodeMismatchError) as err:
        scenario_table([a, b])
    msg = str(err.value)
    assert "toy-cpu/s1/a/seed-0" in msg and "toy-cpu/s1/b/seed-0" in msg and "test_episodes" in msg
    # other seeds have their own episodes: that is fine
    check_comparable([rec("a", [0.2, 0.4], seed=0), rec("a", [0.2, 0.4], seed=1)])
    with pytest.raises(EpisodeMismatchError, match="episodes"):  # same hash but a different number of episodes
        check_comparable([rec("a", [0.2, 0.4]), rec("b", [0.2, 0.4, 0.6])])
    with pytest.raises(EpisodeMismatchError, match="two records"):
        check_comparable([rec("a", [0.2]), rec("a", [0.3])])


def test_refuses_records_made_with_other_zoo_weights():
    """Same zoo spec, other weights (e.g. a zoo trained with another thread count): not paired. Records
    made before the weights hash existed lack it and are compared on the spec hash alone."""
    a, b, old = rec("a", [0.2, 0.4]), rec("b", [0.2, 0.6]), rec("c", [0.4, 0.4])
    a.hashes["zoo_weights"], b.hashes["zoo_weights"] = "w" * 64, "v" * 64
    with pytest.raises(EpisodeMismatchError, match="zoo_weights hashes differ.*same zoo weights"):
        check_comparable([a, b])
    check_comparable([a, old])
    b.hashes["zoo_weights"] = "w" * 64
    check_comparable([a, b, old])


def test_nemenyi_q_matches_demsar_table():
    # Demšar (2006), Table 5(a), alpha = 0.05
    for k, q in [(2, 1.960), (3, 2.343), (4, 2.569), (5, 2.728), (6, 2.850), (10, 3.164)]:
        assert nemenyi_q(k) == pytest.approx(q, abs=2e-3)
    assert nemenyi_cd(4, 14) == pytest.approx(nemenyi_q(4) * math.sqrt(4 * 5 / (6 * 14)))


def _tables(acc: dict[str, list[float]], rng):
    """One scenario table per column of ``acc`` (method -> per-scenario mean accuracy)."""
    n_scen = len(next(iter(acc.values())))
    out = []
    for s in range(n_scen):
        recs = []
        base = rng.binomial(75, 0.3, size=30) / 75
        for m, v in acc.items():
            recs.append(rec(m, np.clip(base + (v[s] - base.mean()), 0, 1), scenario=f"s{s}"))
        out.append(scenario_table(recs, n_boot=100))
    return out


def test_suite_ranks_friedman_matches_scipy_and_ties_share_ranks():
    rng = np.random.default_rng(9)
    acc = {"a": [0.6, 0.5, 0.55, 0.7], "b": [0.5, 0.5, 0.45, 0.6], "c": [0.4, 0.3, 0.5, 0.5], "d": [0.3, 0.35, 0.2, 0.4]}
    tables = _tables(acc, rng)
    r = suite_ranks(tables)
    means = {m: [next(x.mean for x in t.rows if x.method == m) for t in tables] for m in acc}
    f = sps.friedmanchisquare(*[means[m] for m in r.methods])
    assert r.friedman_stat == pytest.approx(f.statistic) and r.friedman_p == pytest.approx(f.pvalue)
    assert r.avg_ranks["a"] < r.avg_ranks["b"] < r.avg_ranks["c"] < r.avg_ranks["d"]
    # scenario s1: a and b are tied at 0.5 -> both get rank 1.5
    assert r.ranks[1, r.methods.index("a")] == r.ranks[1, r.methods.index("b")] == 1.5
    assert r.cd == pytest.approx(nemenyi_cd(4, 4))


def test_suite_ranks_small_cases_are_graceful(tmp_path):
    rng = np.random.default_rng(10)
    two = suite_ranks(_tables({"a": [0.6, 0.5], "b": [0.5, 0.4]}, rng))
    assert two.friedman_p is None and "Friedman" in two.note and two.cd is not None
    one = suite_ranks(_tables({"a": [0.6], "b": [0.5], "c": [0.4]}, rng))
    assert one.friedman_p is None and one.avg_ranks == {"a": 1.0, "b": 2.0, "c": 3.0}
    single = suite_ranks(_tables({"a": [0.6, 0.4]}, rng))
    assert single.cd is None and single.avg_ranks == {"a": 1.0}
    path = plot_cd(one, tmp_path / "cd.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cd_cliques():
    cl = cd_cliques({"a": 1.0, "b": 1.5, "c": 2.4, "d": 3.9}, cd=1.0)
    assert cl == [["a", "b"], ["b", "c"]]


def test_compare_per_seed_tests_each_seed_on_its_own_episodes():
    from dfml_bench.stats import compare_per_seed

    rng = np.random.default_rng(0)
    recs = []
    for seed, gain in ((0, 0.10), (1, 0.08), (2, 0.0)):  # A clearly better in seeds 0 and 1, equal in seed 2
        base = episodes(rng, p=0.3)
        better = np.clip(base + gain * (rng.random(600) < 0.9), 0, 1) if gain else base
        recs += [rec("A", better, seed=seed, ep_hash=f"h{seed}"), rec("B", base, seed=seed, ep_hash=f"h{seed}")]
    (c,) = compare_per_seed(recs, "A", "B", n_boot=500)
    assert sorted(c.per_seed) == [0, 1, 2]
    assert c.per_seed[0].p_wilcoxon < 1e-6 and c.per_seed[0].mean_diff > 0
    assert c.per_seed[2].p_wilcoxon == 1.0 and c.per_seed[2].mean_diff == 0  # identical seed: p = 1
    assert c.pooled.n == 1800 and c.pooled.p_ttest < 1e-6
    assert not c.wins_every_seed(0.01)  # seed 2 is a tie
    (c01,) = compare_per_seed([r for r in recs if r.key.seed < 2], "A", "B", n_boot=500)
    assert c01.wins_every_seed(0.01)
    # the reverse comparison never "wins"
    assert not compare_per_seed(recs, "B", "A", n_boot=500)[0].wins_every_seed(0.5)


def test_compare_cli_prints_per_seed_rows_and_verdict(tmp_path):
    from click.testing import CliRunner

    from dfml_bench.cli import main
    from dfml_bench.results import write_record

    rng = np.random.default_rng(1)
    for seed in (0, 1):
        base = episodes(rng, p=0.3)
        write_record(tmp_path, rec("A", np.clip(base + 0.1, 0, 1), seed=seed, ep_hash=f"h{seed}"))
        write_record(tmp_path, rec("B", base, seed=seed, ep_hash=f"h{seed}"))
    r = CliRunner().invoke(main, ["compare", "--method", "A", "--against", "B", "--results", str(tmp_path), "--bootstrap", "200"])
    assert r.exit_code == 0, r.output
    assert "seed 0" in r.output and "seed 1" in r.output and "pooled" in r.output and "+10.00" in r.output
    assert "in every seed, both tests p < 0.01: yes" in r.output
    bad = CliRunner().invoke(main, ["compare", "--method", "A", "--against", "C", "--results", str(tmp_path)])
    assert bad.exit_code != 0 and "no scenario" in bad.output
    # --plot: a forest plot of the same comparisons; a folder given as the file is refused before any work
    png = tmp_path / "plots" / "a-vs-b.png"
    r = CliRunner().invoke(main, ["compare", "--method", "A", "--against", "B", "--results", str(tmp_path), "--bootstrap", "200",
                                  "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert f"wrote {png}" in r.output and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bad_path in (tmp_path, tmp_path / "a-file" / "x.png"):  # a folder; a "folder" that is a file
        (tmp_path / "a-file").write_text("")
        r = CliRunner().invoke(main, ["compare", "--method", "A", "--against", "B", "--results", str(tmp_path), "--plot", str(bad_path)])
        assert r.exit_code != 0 and "--plot" in r.output and "+10.00" not in r.output, r.output


def test_forest_plot_of_seed_comparisons(tmp_path):
    from dfml_bench.stats import compare_per_seed, plot_seed_comparisons

    rng = np.random.default_rng(2)
    recs = []
    for seed in (0, 1):
        base = episodes(rng, p=0.3)
        recs += [rec(m, np.clip(base + d, 0, 1), seed=seed, ep_hash=f"h{seed}") for m, d in (("A", 0.1), ("B", 0.0), ("C", 0.2))]
    cs = compare_per_seed(recs, "A", "B", n_boot=200) + compare_per_seed(recs, "A", "C", n_boot=200)
    path = plot_seed_comparisons(cs, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no comparisons"):
        plot_seed_comparisons([], tmp_path / "g.png")
