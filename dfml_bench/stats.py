"""Statistics for comparing methods on frozen episodes (field survey, section 5.2).

Per (scenario, method): mean accuracy with a 95% CI over episodes, and the mean and spread over training
seeds. Within a scenario every method is evaluated on the same frozen test episodes of each seed, so
comparisons are *paired*: each method is compared with the scenario's best method on the shared
(seed, episode) pairs by a Wilcoxon signed-rank test (Pratt's handling of zero differences) and a paired
t-test, both Holm-corrected across the comparisons of the table, with a paired-bootstrap CI of the
mean difference (resampling episodes within each seed). A method is *tied* with the best when the
Holm-corrected tests do not show it to be worse (``rule``).

Across the scenarios of a suite: average ranks (tied means share the average rank), the Friedman test,
and Nemenyi's critical difference CD = q_alpha * sqrt(k (k + 1) / (6 N)) (Demšar 2006) for the
critical-difference diagram.

Records whose test episodes (or dataset, or zoo) differ are never compared: :func:`check_comparable`
raises :class:`EpisodeMismatchError` naming the records and the hash that differs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import stats as sps

from .results import ResultRecord

HASH_KEYS = ("test_episodes", "dataset", "zoo")
OPTIONAL_HASH_KEYS = ("zoo_weights",)  # compared where both records have it (older records lack it)
RULES = ("both", "wilcoxon", "ttest")


class EpisodeMismatchError(ValueError):
    """Records that would be compared were not evaluated on the same episodes / dataset / zoo."""


def _label(r: ResultRecord) -> str:
    k = r.key
    return f"{k.suite}-{k.scale}/{k.scenario}/{k.method}/seed-{k.seed}"


# ------------------------------------------------------------------------------------------ primitives


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t-based ``level`` CI of the mean (nan half-width for n < 2).
    For the literature's n = 600 episodes this equals 1.96 * std / sqrt(n) to three decimals."""
    x = np.asarray(values, dtype=float)
    n = x.size
    if n == 0:
        return math.nan, math.nan
    m = float(x.mean())
    if n < 2:
        return m, math.nan
    half = float(sps.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return m, half


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as the input; nan stays nan and is not counted).

    Sort the m p-values ascending; the i-th smallest (1-based) is multiplied by (m - i + 1); adjusted
    values are made monotone by a running maximum and capped at 1.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    idx = np.flatnonzero(ok)
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out


@dataclass
class PairedTest:
    """Paired comparison of A and B on the same episodes (d = A - B)."""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_wilcoxon: float
    p_ttest: float
    stat_wilcoxon: float
    stat_ttest: float
    n_zero: int  # episodes with d == 0 (kept in the ranking by Pratt's method)
    p_improve: float  # share of episodes where A beats B (ties count half)

    def a_better(self, alpha: float = 0.01) -> bool:
        """A is better than B here: a positive mean difference with BOTH paired tests below ``alpha``."""
        return self.mean_diff > 0 and self.p_wilcoxon < alpha and self.p_ttest < alpha


def paired_tests(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float, float]:
    """(p_wilcoxon, stat_wilcoxon, p_ttest, stat_ttest) of paired samples ``a`` and ``b``.

    Wilcoxon signed-rank uses ``zero_method="pratt"`` (zero differences are ranked, then dropped), two-sided.
    If every difference is zero the two samples are identical: p = 1 for both tests (scipy returns nan).
    If the differences are all equal and non-zero the t statistic is infinite: p_ttest = 0.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.shape} and {b.shape}")
    d = a - b
    if d.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    if np.all(d == 0):
        return 1.0, 0.0, 1.0, 0.0
    w = sps.wilcoxon(a, b, zero_method="pratt", alternative="two-sided")
    p_w, s_w = float(w.pvalue), float(w.statistic)
    if d.size < 2:
        return p_w, s_w, math.nan, math.nan
    if np.ptp(d) <= 1e-12:  # constant non-zero difference (up to float noise): infinite t
        return p_w, s_w, 0.0, math.copysign(math.inf, float(d.mean()))
    t = sps.ttest_rel(a, b)
    return p_w, s_w, float(t.pvalue), float(t.statistic)


def paired_bootstrap_ci(diff: Sequence[float], strata: Sequence[int] | None = None, *, n_boot: int = 10_000,
                        seed: int = 0, level: float = 0.95, chunk: int = 1000) -> tuple[float, float]:
    """Percentile CI of the mean paired difference: resample episodes with replacement (within each
    stratum, e.g. within each training seed, so every resample keeps the design), ``n_boot`` times, with
    an explicit seeded ``numpy.random.Generator``."""
    d = np.asarray(diff, dtype=float)
    if d.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    s = np.zeros(d.size, dtype=int) if strata is None else np.asarray(strata)
    groups = [d[s == g] for g in np.unique(s)]
    means = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        total = np.zeros(b)
        for g in groups:
            idx = rng.integers(0, g.size, size=(b, g.size))
            total += g[idx].sum(axis=1)
        means[start:start + b] = total / d.size
    alpha = 1 - level
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def compare_paired(a: Sequence[float], b: Sequence[float], strata: Sequence[int] | None = None, *,
                   n_boot: int = 10_000, seed: int = 0) -> PairedTest:
    """Every paired statistic of A vs B (d = A - B): tests, bootstrap CI, probability of improvement."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    p_w, s_w, p_t, s_t = paired_tests(a, b)
    d = a - b
    lo, hi = paired_bootstrap_ci(d, strata, n_boot=n_boot, seed=seed)
    return PairedTest(n=int(d.size), mean_diff=float(d.mean()) if d.size else math.nan, ci_low=lo, ci_high=hi,
                      p_wilcoxon=p_w, p_ttest=p_t, stat_wilcoxon=s_w, stat_ttest=s_t, n_zero=int((d == 0).sum()),
                      p_improve=float(((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size) if d.size else math.nan)


# ------------------------------------------------------------------------------------------ pairing


def check_comparable(records: Iterable[ResultRecord]) -> None:
    """Raise :class:`EpisodeMismatchError` unless all records of the same (suite, scale, scenario, seed)
    share their test-episode, dataset and zoo hashes and their number of episodes, and no
    (scenario, method, seed) appears twice."""
    first: dict[tuple, ResultRecord] = {}
    seen: dict[tuple, ResultRecord] = {}
    for r in records:
        k = r.key
        ident = (k.suite, k.scale, k.scenario, k.method, k.seed)
        if ident in seen:
            raise EpisodeMismatchError(f"two records for {_label(r)}; keep one (results from two run folders mixed?)")
        seen[ident] = r
        slot = (k.suite, k.scale, k.scenario, k.seed)
        ref = first.setdefault(slot, r)
        for h in HASH_KEYS + tuple(h for h in OPTIONAL_HASH_KEYS if h in ref.hashes and h in r.hashes):
            if ref.hashes.get(h) != r.hashes.get(h):
                raise EpisodeMismatchError(
                    f"refusing to compare {_label(ref)} with {_label(r)}: their {h} hashes differ "
                    f"({str(ref.hashes.get(h))[:12]} vs {str(r.hashes.get(h))[:12]}), so they were not evaluated on the "
                    f"same {dict(test_episodes='test episodes', zoo_weights='zoo weights').get(h, h)}. Re-run one of them with the suite's "
                    f"standard settings (no --episodes override, same dataset and zoo) so the comparison is paired.")
        if len(ref.per_episode) != len(r.per_episode):
            raise EpisodeMismatchError(
                f"refusing to compare {_label(ref)} ({len(ref.per_episode)} episodes) with {_label(r)} "
                f"({len(r.per_episode)} episodes): they must be evaluated on the same episodes")


def paired_arrays(a: list[ResultRecord], b: list[ResultRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-(seed, episode) accuracies of two methods on their shared seeds: (acc_a, acc_b, seed of each pair).
    Episodes differ between seeds but are shared by every method within a seed."""
    check_comparable(list(a) + list(b))
    by_a = {r.key.seed: r for r in a}
    by_b = {r.key.seed: r for r in b}
    seeds = sorted(set(by_a) & set(by_b))
    xa = [np.asarray(by_a[s].per_episode, dtype=float) for s in seeds]
    xb = [np.asarray(by_b[s].per_episode, dtype=float) for s in seeds]
    strata = [np.full(len(x), s) for s, x in zip(seeds, xa)]
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0))
    return cat(xa), cat(xb), cat(strata).astype(int)


# ------------------------------------------------------------------------------------------ one scenario


@dataclass
class MethodRow:
    """One method's line in a scenario table (accuracies as fractions in [0, 1])."""

    method: str
    seeds: list[int]
    n_episodes: int  # over all seeds
    mean: float  # over all (seed, episode)
    ci95: float  # half-width, over all (seed, episode)
    seed_means: list[float]
    seed_std: float  # between-seed std (ddof 1; nan with one seed)
    not_data_free: bool = False
    per_domain: dict[str, float] = field(default_factory=dict)
    queries: float = 0.0  # mean total queries used per seed
    budget: int | None = None
    wall_seconds: float = 0.0  # mean total seconds per seed
    device: str = "?"
    package: str = ""  # "name version" of the method's plugin package
    rank: float | None = None  # rank among data-free methods (1 = best; ties share the average rank)
    is_best: bool = False
    tied: bool = False  # not significantly worse than the best (the best itself is tied with itself)
    vs_best: PairedTest | None = None
    p_wilcoxon_holm: float = math.nan
    p_ttest_holm: float = math.nan
    note: str = ""


@dataclass
class ScenarioTable:
    suite: str
    scale: str
    scenario: str
    rows: list[MethodRow]  # ranked data-free methods (best first), then references (not data-free)
    best: str | None
    alpha: float
    rule: str
    config: dict = field(default_factory=dict)  # the scenario's config (from the records)

    @property
    def ranked(self) -> list[MethodRow]:
        return [r for r in self.rows if not r.not_data_free]


def _summarise(method: str, recs: list[ResultRecord]) -> MethodRow:
    recs = sorted(recs, key=lambda r: r.key.seed)
    pooled = np.concatenate([np.asarray(r.per_episode, dtype=float) for r in recs])
    mean, ci = mean_ci(pooled)
    seed_means = [float(np.mean(r.per_episode)) for r in recs]
    domains: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        for d, s in (r.per_domain or {}).items():
            domains[d].append(float(s["mean"]) if isinstance(s, dict) else float(s))
    pkg = (recs[0].versions or {}).get("method_package") or {}
    return MethodRow(
        method=method, seeds=[r.key.seed for r in recs], n_episodes=int(pooled.size), mean=mean, ci95=ci,
        seed_means=seed_means, seed_std=float(np.std(seed_means, ddof=1)) if len(recs) > 1 else math.nan,
        not_data_free=any(bool(r.flags.get("not_data_free")) for r in recs),
        per_domain={d: float(np.mean(v)) for d, v in sorted(domains.items())},
        queries=float(np.mean([float((r.queries or {}).get("total", 0) or 0) for r in recs])),
        budget=(recs[0].queries or {}).get("total_budget"),
        wall_seconds=float(np.mean([_wall(r) for r in recs])),
        device=", ".join(sorted({_device(r) for r in recs})),
        package=f"{pkg.get('package') or 'in-process'} {pkg.get('version') or ''}".strip() if pkg else "",
    )


def _wall(r: ResultRecord) -> float:
    t = r.timing or {}
    if "total_seconds" in t:
        return float(t["total_seconds"])
    return float(t.get("fit_seconds", 0.0)) + float(t.get("eval_seconds", 0.0))


def _device(r: ResultRecord) -> str:
    res = r.resources or {}
    return str(res.get("cuda_device") or res.get("device") or "?")


def _is_tied(p_w: float, p_t: float, alpha: float, rule: str) -> bool:
    worse = {"both": p_w < alpha and p_t < alpha, "wilcoxon": p_w < alpha, "ttest": p_t < alpha}[rule]
    return not worse


def scenario_table(records: list[ResultRecord], *, alpha: float = 0.05, rule: str = "both", n_boot: int = 10_000,
                   seed: int = 0) -> ScenarioTable:
    """Statistics of one scenario's ``ok`` records (all methods, all seeds).

    The best method is the data-free method with the highest mean. Every other data-free method is compared
    with it on their shared (seed, episode) pairs; the p-values of the table are Holm-corrected per test.
    ``rule``: a method is significantly worse than the best when ``both`` corrected tests reject at
    ``alpha`` (default, conservative), or only the ``wilcoxon`` / ``ttest`` one. References
    (``not_data_free``, e.g. the oracle) are summarised and compared for information but are not ranked
    and do not enter the Holm family.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not records:
        raise ValueError("scenario_table needs at least one record")
    keys = {(r.key.suite, r.key.scale, r.key.scenario) for r in records}
    if len(keys) != 1:
        raise ValueError(f"scenario_table takes the records of one scenario; got {sorted(keys)}")
    bad = [_label(r) for r in records if r.status != "ok"]
    if bad:
        raise ValueError(f"only ok records can be compared; got {bad}")
    check_comparable(records)
    (suite, scale, scenario), = keys
    by_method: dict[str, list[ResultRecord]] = defaultdict(list)
    for r in records:
        by_method[r.key.method].append(r)
    rows = {m: _summarise(m, rs) for m, rs in by_method.items()}
    ranked = sorted((r for r in rows.values() if not r.not_data_free), key=lambda r: (-r.mean, r.method))
    refs = sorted((r for r in rows.values() if r.not_data_free), key=lambda r: (-r.mean, r.method))
    best = ranked[0] if ranked else None
    if best is not None:
        best.is_best = best.tied = True
        family = []
        for row in ranked[1:] + refs:
            a, b, strata = paired_arrays(by_method[row.method], by_method[best.method])
            if a.size == 0:
                row.note = f"no seed shared with {best.method}: not compared"
                continue
            row.vs_best = compare_paired(a, b, strata, n_boot=n_boot, seed=seed)
            if not row.not_data_free:
                family.append(row)
        pw = holm([r.vs_best.p_wilcoxon for r in family])
        pt = holm([r.vs_best.p_ttest for r in family])
        for row, w, t in zip(family, pw, pt):
            row.p_wilcoxon_holm, row.p_ttest_holm = float(w), float(t)
            row.tied = _is_tied(float(w), float(t), alpha, rule)
        for row in refs:  # for information: uncorrected, never ranked
            if row.vs_best is not None:
                row.p_wilcoxon_holm, row.p_ttest_holm = row.vs_best.p_wilcoxon, row.vs_best.p_ttest
        ranks = sps.rankdata([-r.mean for r in ranked], method="average")
        for row, rk in zip(ranked, ranks):
            row.rank = float(rk)
    config = (records[0].config or {}).get("scenario", {})
    return ScenarioTable(suite, scale, scenario, ranked + refs, best.method if best else None, alpha, rule, config)


# ------------------------------------------------------------------------------------------ a suite


@dataclass
class SuiteRanks:
    """Average ranks of the methods present in every scenario (data-free methods only)."""

    methods: list[str]
    scenarios: list[str]
    ranks: np.ndarray  # [scenarios, methods]; ties share the average rank
    avg_ranks: dict[str, float]
    friedman_stat: float | None
    friedman_p: float | None
    cd: float | None
    q_alpha: float | None
    alpha: float
    note: str = ""
    left_out: list[str] = field(default_factory=list)  # methods missing from some scenario


def nemenyi_q(k: int, alpha: float = 0.05) -> float:
    """Nemenyi's q_alpha for k methods: the studentized range quantile (infinite df) / sqrt(2)
    (Demšar 2006, Table 5: 1.960, 2.343, 2.569, 2.728, ... for k = 2, 3, 4, 5 at alpha 0.05)."""
    if k < 2:
        raise ValueError(f"the critical difference needs at least 2 methods, got {k}")
    return float(sps.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2))


def nemenyi_cd(k: int, n: int, alpha: float = 0.05) -> float:
    """Critical difference of average ranks: CD = q_alpha * sqrt(k (k + 1) / (6 N))."""
    if n < 1:
        raise ValueError(f"the critical difference needs at least 1 scenario, got {n}")
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6 * n))


def suite_ranks(tables: Sequence[ScenarioTable], alpha: float = 0.05) -> SuiteRanks:
    """Average ranks across scenarios, the Friedman test (k >= 3 methods and N >= 2 scenarios) and the
    Nemenyi critical difference (k >= 2, N >= 1). Methods missing from a scenario are left out (listed)."""
    scen = [t.scenario for t in tables]
    per = [{r.method: r.mean for r in t.ranked} for t in tables]
    all_methods = sorted({m for p in per for m in p})
    methods = [m for m in all_methods if all(m in p for p in per)]
    left = [m for m in all_methods if m not in methods]
    k, n = len(methods), len(tables)
    notes = []
    if left:
        notes.append(f"left out (missing from some scenario): {', '.join(left)}")
    if k == 0 or n == 0:
        return SuiteRanks(methods, scen, np.zeros((n, k)), {}, None, None, None, None, alpha,
                          "; ".join(notes + ["no method is present in every scenario"]), left)
    acc = np.array([[p[m] for m in methods] for p in per])
    ranks = np.vstack([sps.rankdata(-row, method="average") for row in acc])
    avg = {m: float(v) for m, v in zip(methods, ranks.mean(axis=0))}
    f_stat = f_p = None
    if k >= 3 and n >= 2:
        if np.all(ranks == ranks[0]) and np.all(acc == acc[0]):
            f_stat, f_p = 0.0, 1.0
        else:
            res = sps.friedmanchisquare(*[acc[:, j] for j in range(k)])
            f_stat, f_p = float(res.statistic), float(res.pvalue)
            if math.isnan(f_p):  # every scenario ranks every method equally (all ties)
                f_stat, f_p = 0.0, 1.0
    else:
        notes.append(f"Friedman test needs >= 3 methods and >= 2 scenarios (have {k} and {n})")
    q = cd = None
    if k >= 2:
        q = nemenyi_q(k, alpha)
        cd = q * math.sqrt(k * (k + 1) / (6 * n))
    if n < 10 and k >= 2:
        notes.append(f"with {n} scenario(s) rank tests have little power; the per-scenario paired tests are the ones to read")
    return SuiteRanks(methods, scen, ranks, avg, f_stat, f_p, cd, q, alpha, "; ".join(notes), left)


def cd_cliques(avg_ranks: dict[str, float], cd: float) -> list[list[str]]:
    """Maximal groups of methods (sorted by average rank) whose ranks differ by less than ``cd``:
    the bars of a critical-difference diagram. Groups of one are omitted."""
    items = sorted(avg_ranks.items(), key=lambda kv: kv[1])
    cliques: list[list[str]] = []
    for i in range(len(items)):
        j = i
        while j + 1 < len(items) and items[j + 1][1] - items[i][1] < cd:
            j += 1
        group = [m for m, _ in items[i:j + 1]]
        if len(group) > 1 and not any(set(group) <= set(c) for c in cliques):
            cliques.append(group)
    return cliques


def _save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (its folder made if needed) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cd(ranks: SuiteRanks, path: str | Path, title: str = "") -> Path:
    """Draw the critical-difference diagram (Demšar 2006): methods on the average-rank axis (1 = best, at
    the left), the CD as a scale bar, methods not distinguishable by Nemenyi joined by thick bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(ranks.avg_ranks.items(), key=lambda kv: kv[1])
    k = max(len(items), 2)
    lo, hi = 1, k
    cliques = cd_cliques(ranks.avg_ranks, ranks.cd) if ranks.cd is not None else []
    top = 0.15 + 0.1 * len(cliques)  # the clique bars sit between the axis and the labels
    height = 1.6 + 0.3 * len(items) + 0.3 * len(cliques)
    fig, ax = plt.subplots(figsize=(7, height))
    ax.set_xlim(lo - 0.3, hi + 0.3)
    ax.set_ylim(-top - 0.35 * ((len(items) + 1) // 2 + 1), 1.2)
    ax.axis("off")
    ax.hlines(0, lo, hi, color="k", lw=1)
    for t in range(lo, hi + 1):
        ax.vlines(t, 0, 0.08, color="k", lw=1)
        ax.text(t, 0.15, str(t), ha="center", va="bottom", fontsize=9)
    half = (len(items) + 1) // 2
    for i, (m, r) in enumerate(items):
        left = i < half
        y = -top - 0.35 * (i if left else len(items) - 1 - i) - 0.1
        xe = lo - 0.2 if left else hi + 0.2
        ax.plot([r, r, xe], [0, y, y], color="k", lw=0.8)
        ax.text(xe, y, f"{m} ({r:.2f})", ha="right" if left else "left", va="center", fontsize=9)
    if ranks.cd is not None:
        ax.plot([lo, lo + ranks.cd], [0.8, 0.8], color="k", lw=2)
        ax.text(lo + ranks.cd / 2, 0.88, f"CD = {ranks.cd:.2f}", ha="center", va="bottom", fontsize=9)
        for i, group in enumerate(cliques):
            rs = [ranks.avg_ranks[m] for m in group]
            y = -0.12 - 0.1 * i
            ax.plot([min(rs) - 0.03, max(rs) + 0.03], [y, y], color="tab:red", lw=2.5, solid_capstyle="round")
    fp = "n/a" if ranks.friedman_p is None else f"{ranks.friedman_p:.3g}"
    ax.set_title(title or f"average ranks over {len(ranks.scenarios)} scenario(s); Friedman p = {fp}", fontsize=10)
    return _save_figure(fig, path)


def group_by_scenario(records: Iterable[ResultRecord]) -> dict[tuple[str, str], dict[str, list[ResultRecord]]]:
    """{(suite, scale): {scenario: [records]}} of ``ok`` records."""
    out: dict[tuple[str, str], dict[str, list[ResultRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.status == "ok":
            out[(r.key.suite, r.key.scale)][r.key.scenario].append(r)
    return {k: dict(v) for k, v in sorted(out.items())}


# ------------------------------------------------------------------------------------------ per seed


@dataclass
class SeedComparison:
    """Method A vs method B within one scenario, per training seed and pooled (d = A - B)."""

    scenario: str
    method: str
    against: str
    per_seed: dict[int, PairedTest]
    pooled: PairedTest

    def wins_every_seed(self, alpha: float = 0.01) -> bool:
        """A is better than B in every seed with BOTH paired tests below ``alpha`` (uncorrected)."""
        return bool(self.per_seed) and all(t.a_better(alpha) for t in self.per_seed.values())


def compare_per_seed(records: Iterable[ResultRecord], method: str, against: str, *, n_boot: int = 10_000,
                     seed_boot: int | None = None) -> list[SeedComparison]:
    """For every scenario where both methods have ``ok`` records: paired tests of ``method`` against
    ``against`` seed by seed (each seed's own frozen episodes) and pooled over seeds (bootstrap within seeds).
    ``seed_boot`` resamples the per-seed CIs fewer times than the pooled one (default: ``n_boot``), for
    callers that read only the seeds' tests."""
    out = []
    for (_suite, _scale), scenarios in group_by_scenario(records).items():
        for scenario, recs in sorted(scenarios.items()):
            a = [r for r in recs if r.key.method == method]
            b = [r for r in recs if r.key.method == against]
            if not a or not b:
                continue
            xa, xb, strata = paired_arrays(a, b)
            per = {int(s): compare_paired(xa[strata == s], xb[strata == s], n_boot=seed_boot or n_boot) for s in np.unique(strata)}
            out.append(SeedComparison(scenario, method, against, per, compare_paired(xa, xb, strata, n_boot=n_boot)))
    return out


def plot_seed_comparisons(comparisons: Sequence[SeedComparison], path: str | Path, alpha: float = 0.01,
                          title: str = "") -> Path:
    """Forest plot of :func:`compare_per_seed` results: one panel per scenario, one row per (against,
    seed) and a pooled row (diamond) per opponent, each the mean difference in points with its 95 %
    bootstrap CI. Filled markers: both paired tests below ``alpha`` in A's favour; hollow: not. The
    question "better in every seed?" reads off as every row of an opponent filled and right of zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not comparisons:
        raise ValueError("no comparisons to plot")
    scenarios = list(dict.fromkeys(c.scenario for c in comparisons))
    rows_of = {s: [c for c in comparisons if c.scenario == s] for s in scenarios}
    n_rows = {s: sum(len(c.per_seed) + 1 for c in cs) for s, cs in rows_of.items()}
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(7.5, 0.8 + sum(0.28 * n + 0.6 for n in n_rows.values())),
                             gridspec_kw={"height_ratios": [n_rows[s] + 1 for s in scenarios]}, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, s in zip(axes[:, 0], scenarios):
        labels: list[str] = []
        y = 0
        for k, c in enumerate(rows_of[s]):
            col = colours[k % len(colours)]
            items = [(f"seed {seed}", t, "o") for seed, t in sorted(c.per_seed.items())] + [("pooled", c.pooled, "D")]
            for label, t, marker in items:
                sig = t.a_better(alpha)
                ax.errorbar(100 * t.mean_diff, -y, xerr=[[100 * (t.mean_diff - t.ci_low)], [100 * (t.ci_high - t.mean_diff)]],
                            fmt=marker, color=col, mfc=col if sig else "white", ms=7 if marker == "D" else 5, capsize=2, lw=1)
                labels.append(f"vs {c.against}, {label}")
                y += 1
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks([-i for i in range(y)], labels, fontsize=8)
        ax.set_ylim(-y + 0.4, 0.6)
        ax.set_title(f"{s}: {rows_of[s][0].method} minus each", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel(f"accuracy difference, points (95 % bootstrap CI; filled: both paired tests p < {alpha} in favour)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path)
