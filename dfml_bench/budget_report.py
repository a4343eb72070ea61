"""Accuracy against the query budget: per-budget tables with paired tests against a reference method
(``random``) at the same budget, and the accuracy-vs-queries plots, for the report and the leaderboard.

Scenarios of a suite that differ only in their query budget form a group (:func:`report.budget_groups`).
At each budget, every method is compared with ``random`` on their shared (seed, episode) pairs
(Wilcoxon signed-rank and paired t-test, Holm-corrected over the methods of that budget): what someone
paying per query reads before choosing a method and a budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .results import ResultRecord
from .stats import ScenarioTable, holm, paired_arrays, paired_tests

REFERENCE = "random"


@dataclass
class BudgetRow:
    budget: int | None
    scenario: str
    method: str
    mean: float  # fraction
    ci95: float
    queries: float  # mean queries used per seed
    diff: float = math.nan  # mean paired difference to the reference (fraction)
    p_wilcoxon_holm: float = math.nan
    p_ttest_holm: float = math.nan
    n_pairs: int = 0


def budget_rows(group: list[ScenarioTable], records: list[ResultRecord], reference: str = REFERENCE) -> list[BudgetRow]:
    """One row per (budget, method) of a budget group, with paired tests against ``reference`` at that budget."""
    by_scn: dict[str, dict[str, list[ResultRecord]]] = {}
    for r in records:
        if r.status == "ok":
            by_scn.setdefault(r.key.scenario, {}).setdefault(r.key.method, []).append(r)
    rows: list[BudgetRow] = []
    for t in group:
        recs = by_scn.get(t.scenario, {})
        ref = recs.get(reference)
        block: list[BudgetRow] = []
        raw_w, raw_t = [], []
        for mr in t.rows:
            row = BudgetRow(t.config.get("budget_total"), t.scenario, mr.method, mr.mean, mr.ci95, mr.queries)
            if ref is not None and mr.method != reference and mr.method in recs:
                a, b, _ = paired_arrays(recs[mr.method], ref)
                if a.size:
                    p_w, _, p_t, _ = paired_tests(a, b)
                    row.diff, row.n_pairs = float(np.mean(a - b)), int(a.size)
                    raw_w.append((len(block), p_w))
                    raw_t.append((len(block), p_t))
            block.append(row)
        for raw, attr in ((raw_w, "p_wilcoxon_holm"), (raw_t, "p_ttest_holm")):
            if raw:
                for (i, _), pa in zip(raw, holm([p for _, p in raw])):  # nan stays nan
                    setattr(block[i], attr, float(pa))
        rows.extend(sorted(block, key=lambda r: -r.mean))
    return rows


def verdict(row: BudgetRow, alpha: float = 0.05) -> str:
    """``better`` / ``worse`` than the reference when both corrected tests reject, else ``n.s.``."""
    if math.isnan(row.diff):
        return "reference" if row.n_pairs == 0 and row.method == REFERENCE else ""
    if row.p_wilcoxon_holm < alpha and row.p_ttest_holm < alpha:
        return "better" if row.diff > 0 else "worse"
    return "n.s."


def _p(p: float) -> str:
    return "" if math.isnan(p) else ("< 1e-4" if p < 1e-4 else f"{p:.4f}")


def render_rows(rows: list[BudgetRow], alpha: float = 0.05) -> tuple[list[str], list[list[str]]]:
    head = ["budget", "method", "accuracy % (95% CI)", "queries used", f"Δ vs {REFERENCE} (pts)", "p Wilcoxon (Holm)",
            "p t-test (Holm)", "verdict"]
    body = []
    for r in rows:
        ci = "" if math.isnan(r.ci95) else f" ± {100 * r.ci95:.2f}"
        body.append([f"{r.budget:,}" if r.budget else "none", r.method, f"{100 * r.mean:.2f}{ci}", f"{r.queries:,.0f}",
                     "" if math.isnan(r.diff) else f"{100 * r.diff:+.2f}", _p(r.p_wilcoxon_holm), _p(r.p_ttest_holm),
                     verdict(r, alpha)])
    return head, body


def render_budget_sections(tables: list[ScenarioTable], records: list[ResultRecord], *, markdown: bool = True,
                           alpha: float = 0.05, plots: dict[int, str] | None = None) -> list[str]:
    """Markdown (or plain) sections for every budget group of one suite's tables; ``plots`` maps a group's
    index to the relative path of its accuracy-vs-queries image (linked when given)."""
    from tabulate import tabulate

    from .report import budget_groups

    out = []
    for i, group in enumerate(budget_groups(tables)):
        title = f"accuracy against the query budget ({len(group)} budgets; paired tests against {REFERENCE} at each budget)"
        out.append(f"{'### ' if markdown else ''}{title}\n")
        if plots and i in plots:
            out.append(f"![accuracy vs queries used]({plots[i]})\n" if markdown else f"plot: {plots[i]}\n")
        h, body = render_rows(budget_rows(group, records), alpha)
        out.append(tabulate(body, headers=h, tablefmt="github" if markdown else "simple", disable_numparse=True) + "\n")
    return out


def write_budget_plots(tables: list[ScenarioTable], out_dir: str | Path, stem: str) -> dict[int, Path]:
    """The accuracy-vs-queries plot of every budget group, as ``<out_dir>/<stem>-budget-<i>.png``."""
    from .report import budget_groups, plot_budget

    out = Path(out_dir)
    paths = {}
    for i, group in enumerate(budget_groups(tables)):
        out.mkdir(parents=True, exist_ok=True)
        paths[i] = plot_budget(group, out / f"{stem}-budget-{i}.png")
    return paths
