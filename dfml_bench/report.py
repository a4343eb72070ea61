"""Reports of a run folder or a suite: significance-tested tables (markdown, plain text, CSV) and plots.

``build_report`` turns validated records into one :class:`~dfml_bench.stats.ScenarioTable` per scenario
and one :class:`~dfml_bench.stats.SuiteRanks` per (suite, scale); ``render_text`` prints them with
tabulate; ``write_report`` writes ``report.md``, ``report.txt``, CSV files and the plots a person would
look at: per-scenario bars with 95% CIs, the critical-difference diagram, and accuracy against queries
used for scenarios of a suite that differ only in their query budget.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tabulate import tabulate

from .results import ResultRecord
from .stats import (EpisodeMismatchError, MethodRow, ScenarioTable, SuiteRanks, compare_per_seed, group_by_scenario,
                    plot_cd, scenario_table, suite_ranks)
from .validate import RecordSet

TIED = "≈"  # marks a method not significantly worse than the best
BUDGET_FREE_KEYS = ("name", "description", "budget_total", "budget_per_api", "method_params")


@dataclass
class Report:
    tables: dict[tuple[str, str], list[ScenarioTable]] = field(default_factory=dict)
    ranks: dict[tuple[str, str], SuiteRanks] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # scenarios not compared, with why
    records: RecordSet = field(default_factory=RecordSet)
    alpha: float = 0.05
    rule: str = "both"
    n_boot: int = 10_000  # bootstrap resamples of every CI computed from this report (tables and controls)


def table_order(table: ScenarioTable) -> tuple:
    """Scenarios by budget, then name: a budget ladder reads 30k, 100k, 300k, 1M, not alphabetically."""
    return (table.config.get("budget_total") or 0, table.scenario)


def build_report(records: RecordSet, *, alpha: float = 0.05, rule: str = "both", n_boot: int = 10_000,
                 seed: int = 0) -> Report:
    """Statistics of every scenario of every (suite, scale) in ``records.ok``. A scenario whose records
    cannot be paired (different episode hashes) is refused: listed in ``refused`` with the reason."""
    rep = Report(records=records, alpha=alpha, rule=rule, n_boot=n_boot)
    for (suite, scale), scenarios in group_by_scenario(records.ok).items():
        tables = []
        for name, recs in sorted(scenarios.items()):
            try:
                tables.append(scenario_table(recs, alpha=alpha, rule=rule, n_boot=n_boot, seed=seed))
            except EpisodeMismatchError as exc:
                rep.refused.append(f"{suite}-{scale}/{name}: {exc}")
        if tables:
            tables.sort(key=table_order)
            rep.tables[(suite, scale)] = tables
            rep.ranks[(suite, scale)] = suite_ranks(tables, alpha)
    return rep


# ------------------------------------------------------------------------------------------ formatting


def first_line(text: str | None, limit: int = 200) -> str:
    """An error message on one line (whitespace collapsed), cut at ``limit`` characters."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def pval(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "—"
    return "<1e-4" if p < 1e-4 else f"{p:.3g}"


def method_cell(row: MethodRow, markdown: bool = True) -> str:
    name = row.method
    if row.not_data_free:
        return f"{name} (not data-free, reference)"
    if row.is_best:
        return f"**{name}**" if markdown else f"{name} *"
    return f"{name} {TIED}" if row.tied else name


def queries_cell(row: MethodRow) -> str:
    used = f"{row.queries:,.0f}"
    return f"{used} / {row.budget:,}" if row.budget else used


def domains_of(table: ScenarioTable) -> list[str]:
    return sorted({d for r in table.rows for d in r.per_domain})


def scenario_rows(table: ScenarioTable, markdown: bool = True) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a scenario table: ranked methods (best first), then references."""
    doms = domains_of(table)
    headers = ["rank", "method", "accuracy % ± 95% CI", "Δ vs best [95% CI]", "p Wilcoxon / t (Holm)",
               "seeds (std)", *[f"{d} %" for d in doms], "queries used", "wall s", "device"]
    rows = []
    for r in table.rows:
        acc = f"{pct(r.mean)} ± {pct(r.ci95)}"
        if r.is_best and markdown:
            acc = f"**{acc}**"
        if r.vs_best is not None:
            t = r.vs_best
            delta = f"{100 * t.mean_diff:+.2f} [{100 * t.ci_low:+.2f}, {100 * t.ci_high:+.2f}]"
            ps = f"{pval(r.p_wilcoxon_holm)} / {pval(r.p_ttest_holm)}" + (" (uncorr.)" if r.not_data_free else "")
        else:
            delta, ps = ("best" if r.is_best else r.note or "—"), "—"
        seeds = f"{len(r.seeds)}" + (f" ({pct(r.seed_std)})" if len(r.seeds) > 1 else "")
        rank = "ref" if r.not_data_free else (f"{r.rank:g}" if r.rank is not None else "—")
        rows.append([rank, method_cell(r, markdown), acc, delta, ps, seeds, *[pct(r.per_domain.get(d)) for d in doms],
                     queries_cell(r), f"{r.wall_seconds:.1f}", r.device])
    return headers, rows


CONTROLS = ("random", "average", "placebo")  # no knowledge, the zoo's mean, no knowledge through the same replay


def control_rows(table: ScenarioTable, records: Sequence[ResultRecord], *, alpha: float = 0.01, n_boot: int = 10_000,
                 controls: Sequence[str] = CONTROLS) -> tuple[list[str], list[list[str]]]:
    """How much of each data-free method's accuracy is knowledge taken from the zoo: its paired difference
    to each control of ``table`` present in ``records`` (pooled over seeds, with a bootstrap 95% CI within
    seeds), and in how many seeds it is better at ``alpha`` with both paired tests (the issue's "better in
    every seed"). Bold: better in every seed. Empty when the scenario has no control or no other method."""
    recs = [r for r in records if r.status == "ok" and r.key.scenario == table.scenario and r.key.suite == table.suite
            and r.key.scale == table.scale]
    present = [c for c in controls if any(r.key.method == c for r in recs)]
    methods = [r.method for r in table.ranked if r.method != "random"]
    if not present or not methods:
        return [], []
    headers = ["method", *[f"Δ vs {c} [95% CI] · seeds better (p < {alpha:g})" for c in present]]
    rows = []
    for m in methods:
        cells = []
        for c in present:
            if m == c or (m == "average" and c == "placebo"):  # a control is not measured against itself
                cells.append("")
                continue
            comps = compare_per_seed(recs, m, c, n_boot=n_boot, seed_boot=200)
            if not comps:
                cells.append("")
                continue
            comp = comps[0]
            t = comp.pooled
            k, n = sum(x.a_better(alpha) for x in comp.per_seed.values()), len(comp.per_seed)
            cell = f"{100 * t.mean_diff:+.2f} [{100 * t.ci_low:+.2f}, {100 * t.ci_high:+.2f}] · {k}/{n}"
            cells.append(f"**{cell}**" if k == n else cell)
        rows.append([m, *cells])
    return headers, rows


def control_section(table: ScenarioTable, records: Sequence[ResultRecord], *, markdown: bool = True,
                    n_boot: int = 10_000) -> list[str]:
    """The caption and table of :func:`control_rows` for one scenario, or nothing when it has no control."""
    h, rows = control_rows(table, records, n_boot=n_boot)
    if not rows:
        return []
    bold = "**bold**" if markdown else "bold (**)"
    caption = ("Gain over the controls (knowledge taken from the zoo): each method minus each control on the shared "
               "episodes, pooled over seeds, and the seeds in which it is better with both paired tests p < 0.01; "
               f"{bold}: better in every seed.\n")
    return [caption, tabulate(rows, headers=h, tablefmt="github" if markdown else "simple", disable_numparse=True) + "\n"]


def ranks_rows(ranks: SuiteRanks, tables: list[ScenarioTable]) -> tuple[list[str], list[list[str]]]:
    """Average rank per method (best first) over the scenarios where every listed method ran (the Friedman
    block), with how many scenarios it ran in and in how many it is best or tied with the best. Methods
    missing from some scenario (e.g. white-box-only methods in a mixed suite) follow, with their mean rank
    over the scenarios they ran in, in parentheses: not comparable with the full-block ranks."""
    pkg = {r.method: r.package for t in tables for r in t.rows}
    wins: dict[str, int] = defaultdict(int)
    ran: dict[str, list[float]] = defaultdict(list)
    for t in tables:
        for r in t.ranked:
            wins[r.method] += int(r.tied)
            ran[r.method].append(r.rank)
    headers = ["avg rank", "method", "package", "scenarios run", "best or tied in"]
    rows = [[f"{v:.2f}", m, pkg.get(m, ""), f"{len(ran[m])}/{len(tables)}", wins[m]]
            for m, v in sorted(ranks.avg_ranks.items(), key=lambda kv: (kv[1], kv[0]))]
    partial = sorted((sum(ran[m]) / len(ran[m]), m) for m in ranks.left_out if ran[m])
    rows += [[f"({v:.2f})", m, pkg.get(m, ""), f"{len(ran[m])}/{len(tables)}", wins[m]] for v, m in partial]
    return headers, rows


def ranks_summary(ranks: SuiteRanks) -> str:
    parts = []
    if ranks.friedman_p is not None:
        parts.append(f"Friedman χ² = {ranks.friedman_stat:.3f}, p = {pval(ranks.friedman_p)}")
    if ranks.cd is not None:
        parts.append(f"Nemenyi critical difference CD = {ranks.cd:.2f} (q = {ranks.q_alpha:.3f}, α = {ranks.alpha})")
    if ranks.note:
        parts.append(ranks.note)
    return "; ".join(parts)


def render_text(report: Report, tablefmt: str = "github") -> str:
    """All tables as text: ``tablefmt`` "github" (markdown) or "simple" (plain)."""
    md = tablefmt == "github"
    out = []
    if report.tables:
        best = "**bold**" if md else "*"
        out.append(f"{best}: best data-free method; {TIED}: not significantly worse than the best (paired tests on the "
                   f"shared episodes, Holm-corrected, rule '{report.rule}', α = {report.alpha}); rank 'ref': not data-free, "
                   "not ranked.\n")
    for (suite, scale), tables in report.tables.items():
        out.append(f"{'## ' if md else ''}{suite} ({scale} scale)\n")
        for t in tables:
            out.append(f"{'### ' if md else ''}{t.scenario}  (best: {t.best}; α = {t.alpha}, rule: {t.rule})\n")
            h, rows = scenario_rows(t, markdown=md)
            out.append(tabulate(rows, headers=h, tablefmt=tablefmt, disable_numparse=True) + "\n")
            out += control_section(t, report.records.ok, markdown=md, n_boot=report.n_boot)
        from .budget_report import render_budget_sections  # accuracy per budget, paired tests vs random (issue 15)

        out += render_budget_sections(tables, report.records.ok, markdown=md, alpha=report.alpha,
                                      plots={i: f"{suite}-{scale}-budget-{i}.png" for i in range(len(budget_groups(tables)))} if md else None)
        ranks = report.ranks[(suite, scale)]
        if ranks.avg_ranks:
            out.append(f"{'### ' if md else ''}average ranks over {len(tables)} scenario(s)\n")
            h, rows = ranks_rows(ranks, tables)
            out.append(tabulate(rows, headers=h, tablefmt=tablefmt, disable_numparse=True))
            out.append(ranks_summary(ranks) + "\n")
    if report.refused:
        out.append(("## " if md else "") + "not compared\n")
        out.extend(f"- {r}" for r in report.refused)
    skipped = report.records.not_ok
    if skipped:
        out.append(("\n## " if md else "\n") + "runs not counted (failed or skipped)\n")
        out.extend(f"- {r.key.suite}-{r.key.scale}/{r.key.scenario}/{r.key.method}/seed-{r.key.seed}: {r.status}: "
                   f"{first_line(r.error)}" for r in skipped)
    if report.records.invalid:
        out.append(("\n## " if md else "\n") + "invalid records (rejected, not counted)\n")
        out.extend(f"- {x.path}: {x.reason}" for x in report.records.invalid)
    return "\n".join(out) if out else "no valid ok records"


# ------------------------------------------------------------------------------------------ files


CSV_FIELDS = ["suite", "scale", "scenario", "method", "rank", "best", "tied", "not_data_free", "mean", "ci95",
              "seeds", "seed_std", "n_episodes", "diff_vs_best", "diff_ci_low", "diff_ci_high", "p_wilcoxon",
              "p_ttest", "p_wilcoxon_holm", "p_ttest_holm", "p_improve", "queries", "budget", "wall_seconds",
              "device", "package", "per_domain"]


def csv_rows(table: ScenarioTable) -> list[dict]:
    out = []
    for r in table.rows:
        t = r.vs_best
        out.append({
            "suite": table.suite, "scale": table.scale, "scenario": table.scenario, "method": r.method,
            "rank": r.rank, "best": r.is_best, "tied": r.tied, "not_data_free": r.not_data_free, "mean": r.mean,
            "ci95": r.ci95, "seeds": " ".join(map(str, r.seeds)), "seed_std": r.seed_std, "n_episodes": r.n_episodes,
            "diff_vs_best": t.mean_diff if t else None, "diff_ci_low": t.ci_low if t else None,
            "diff_ci_high": t.ci_high if t else None, "p_wilcoxon": t.p_wilcoxon if t else None,
            "p_ttest": t.p_ttest if t else None, "p_wilcoxon_holm": r.p_wilcoxon_holm, "p_ttest_holm": r.p_ttest_holm,
            "p_improve": t.p_improve if t else None, "queries": r.queries, "budget": r.budget,
            "wall_seconds": r.wall_seconds, "device": r.device, "package": r.package,
            "per_domain": json.dumps(r.per_domain) if r.per_domain else "",
        })
    return out


def write_report(report: Report, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """Write report.md, report.txt, one CSV of scenario rows and one of average ranks per (suite, scale),
    and the plots. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fmt in (("report.md", "github"), ("report.txt", "simple")):
        p = out / name
        p.write_text(render_text(report, fmt) + "\n")
        written.append(p)
    for (suite, scale), tables in report.tables.items():
        stem = f"{suite}-{scale}"
        p = out / f"{stem}-scenarios.csv"
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            for t in tables:
                w.writerows(csv_rows(t))
        written.append(p)
        ranks = report.ranks[(suite, scale)]
        p = out / f"{stem}-ranks.csv"
        with p.open("w", newline="") as f:
            w = csv.writer(f)
            h, rows = ranks_rows(ranks, tables)
            w.writerow(h)
            w.writerows(rows)
        written.append(p)
        if plots:
            written.append(plot_bars(tables, out / f"{stem}-bars.png", f"{suite} ({scale})"))
            if len(ranks.avg_ranks) >= 2:
                written.append(plot_cd(ranks, out / f"{stem}-cd.png"))
            for i, group in enumerate(budget_groups(tables)):
                written.append(plot_budget(group, out / f"{stem}-budget-{i}.png"))
    return written


# ------------------------------------------------------------------------------------------ plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(tables: list[ScenarioTable], path: str | Path, title: str = "") -> Path:
    """One panel per scenario: mean accuracy with its 95% CI per method; the best dark, tied methods
    mid-tone, significantly worse ones light, references hatched."""
    plt = _plt()
    n = len(tables)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, t in zip(axes.flat, tables):
        names = [r.method for r in t.rows]
        means = [100 * r.mean for r in t.rows]
        errs = [0 if math.isnan(r.ci95) else 100 * r.ci95 for r in t.rows]
        colors = ["tab:blue" if r.is_best else "cornflowerblue" if r.tied and not r.not_data_free else "lightsteelblue"
                  for r in t.rows]
        bars = ax.bar(range(len(names)), means, yerr=errs, color=colors, capsize=3)
        for b, r in zip(bars, t.rows):
            if r.not_data_free:
                b.set_hatch("//")
                b.set_facecolor("white")
                b.set_edgecolor("grey")
        lo = min(m - e for m, e in zip(means, errs))
        hi = max(m + e for m, e in zip(means, errs))
        pad = max(1.0, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))  # zoomed: differences of a point must be visible
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("accuracy % (95% CI)")
        ax.set_title(t.scenario, fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def budget_groups(tables: list[ScenarioTable]) -> list[list[ScenarioTable]]:
    """Groups of scenarios that differ only in their query budget (at least two distinct budgets)."""
    groups: dict[str, list[ScenarioTable]] = defaultdict(list)
    for t in tables:
        rest = {k: v for k, v in t.config.items() if k not in BUDGET_FREE_KEYS}
        groups[json.dumps(rest, sort_keys=True, default=str)].append(t)
    out = []
    for g in groups.values():
        budgets = {(t.config.get("budget_total"), t.config.get("budget_per_api")) for t in g}
        if len(budgets) >= 2:
            out.append(sorted(g, key=lambda t: (t.config.get("budget_total") or math.inf)))
    return out


def plot_budget(group: list[ScenarioTable], path: str | Path) -> Path:
    """Accuracy (95% CI) against the queries each method used, one line per method across the budgets."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({r.method for t in group for r in t.rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(methods):
        pts = [(r.queries, 100 * r.mean, 0 if math.isnan(r.ci95) else 100 * r.ci95) for t in group for r in t.rows if r.method == m]
        if not pts:
            continue
        c = colors[i % len(colors)]
        if all(x == 0 for x, _, _ in pts):  # a method that sends no query: a horizontal reference line
            mean = sum(y for _, y, _ in pts) / len(pts)
            ax.axhline(mean, color=c, ls="--", lw=1, label=f"{m} (no queries)")
            continue
        xs, ys, es = zip(*sorted(pts))
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m, color=c)
    ax.set_xscale("log")
    ax.set_xlabel("queries used (images, log scale; ticks at the budgets)")
    ax.set_ylabel("accuracy % (95% CI)")
    budgets = sorted(t.config.get("budget_total") or 0 for t in group)
    from matplotlib.ticker import NullFormatter

    from .suites.budget import budget_label  # the scenario names' labels: 30k, 1M, 6.06M

    ticks = [b for b in budgets if b > 0]
    ax.set_xticks(ticks, [budget_label(b) for b in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels (3x10^4, 4x10^4, ...) overlap
    ax.set_title(f"accuracy vs queries used ({len(group)} budgets, {budgets[0]:,} to {budgets[-1]:,} images)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
