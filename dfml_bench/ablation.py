"""Ablations: a method re-run with one component switched off at a time, on the same frozen episodes.

Every variant is an ordinary run (``runner.run_one``) with parameter overrides, written under
``<out>/ablations/<variant>/`` so that the leaderboard, which reads ``<out>`` and skips ``ablations/``,
never mixes a variant with the method's own records. The table compares every variant with the full
method on the same test episodes (paired Wilcoxon-Pratt and t-tests, Holm-corrected across variants)
and also lists what model selection saw: the best meta-val accuracy among *trained* checkpoints, and the
checkpoint selected (0 = the initialisation). A switch is a boolean parameter of the method; a method
declares its switches in the class attribute ``ablation_switches``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .methods import MethodError, get_method
from .results import ABLATIONS_DIR, ResultRecord, RunKey, is_finished, read_record
from .runner import RunOptions, run_one
from .scenarios import Suite
from .stats import compare_paired, holm, mean_ci


@dataclass(frozen=True)
class Variant:
    name: str  # "full" or "no-<switch>"
    params: dict


def variants_of(method: str, switches: list[str] | None = None) -> list[Variant]:
    """The full method plus one variant per switch turned off (``switches`` default: the method's own)."""
    m = get_method(method)
    declared = list(m.ablation_switches)
    switches = declared if switches is None else switches
    if not switches:
        raise MethodError(f"method {method!r} declares no ablation_switches; pass the boolean parameters to switch off")
    params = m.get_params()
    bad = [s for s in switches if not isinstance(params.get(s), bool)]
    if bad:
        raise MethodError(f"{method}: {bad} are not boolean parameters; switches of {method}: {declared}")
    out = [Variant("full", {})]
    for s in switches:
        flip = not params[s]  # a switch that is on by default is turned off; one that is off (a bug-faithful mode) on
        out.append(Variant(f"{'no' if params[s] else 'with'}-{s}", {s: flip}))
    return out


def run_ablation(suite: Suite, method: str, seeds: list[int], opts: RunOptions, switches: list[str] | None = None) -> dict[str, list[Path]]:
    """Run every variant of ``method`` on every scenario of ``suite`` and seed; resumes like ``run``.
    Returns variant -> record paths."""
    out: dict[str, list[Path]] = {}
    root = Path(opts.out) / ABLATIONS_DIR
    for v in variants_of(method, switches):
        vopts = replace(opts, out=root / v.name, method_params={**opts.method_params, method: {**opts.method_params.get(method, {}), **v.params}})
        paths = []
        for sc in suite.scenarios:
            for seed in seeds:
                key = RunKey(suite.name, suite.scale, sc.name, method, seed)
                if not is_finished(vopts.out, key):
                    if opts.log:
                        opts.log(f"ablation {v.name}: {sc.name} seed {seed}")
                    run_one(suite, sc, method, seed, vopts)
                paths.append(key.path(vopts.out))
        out[v.name] = paths
    return out


def _trained_val(rec: ResultRecord) -> float | None:
    curve = rec.extra.get("val_curve") or []
    vals = [a for it, a in curve if it > 0]
    return max(vals) if vals else None


def ablation_table(paths: dict[str, list[Path]]) -> str:
    """Markdown: per variant, test accuracy (mean +- 95% CI), difference to ``full`` on the same episodes
    with Holm-corrected paired p-values, best trained meta-val, selected checkpoint, queries."""
    recs = {v: [read_record(p) for p in ps if p.exists()] for v, ps in paths.items()}
    full = recs.get("full", [])
    if not full:
        raise ValueError("the full method has no records; run it first")
    full_acc = np.concatenate([r.per_episode for r in sorted(full, key=lambda r: (r.key.scenario, r.key.seed))])
    rows, pvals = [], []
    for v, rs in recs.items():
        rs = sorted([r for r in rs if r.status == "ok"], key=lambda r: (r.key.scenario, r.key.seed))
        if not rs:
            rows.append((v, None, None, None, None, None)); pvals.append(np.nan)
            continue
        acc = np.concatenate([r.per_episode for r in rs])
        m, h = mean_ci(acc)
        if v != "full" and len(acc) == len(full_acc):
            t = compare_paired(acc, full_acc, n_boot=2000)
            d, p = t.mean_diff, max(t.p_wilcoxon, t.p_ttest)
        else:
            d, p = None, np.nan
        vals = [x for x in (_trained_val(r) for r in rs) if x is not None]
        sel = [r.extra.get("best_iteration", r.extra.get("best_epoch")) for r in rs]
        q = sum(int((r.queries or {}).get("total", 0) or 0) for r in rs) / len(rs)
        rows.append((v, (m, h), d, float(np.mean(vals)) if vals else None, sel, q)); pvals.append(p)
    finite = [i for i, p in enumerate(pvals) if np.isfinite(p)]
    adj = dict(zip(finite, holm([pvals[i] for i in finite]))) if finite else {}
    lines = ["| variant | test acc % (95% CI) | diff vs full (pp) | p (Holm, max of Wilcoxon/t) | best trained meta-val % | selected checkpoint | queries / run |",
             "|---|---|---|---|---|---|---|"]
    for i, (v, mh, d, val, sel, q) in enumerate(rows):
        if mh is None:
            lines.append(f"| {v} | failed | | | | | |")
            continue
        lines.append(f"| {v} | {100 * mh[0]:.2f} +- {100 * mh[1]:.2f} | {'' if d is None else f'{100 * d:+.2f}'} | "
                     f"{'' if i not in adj else f'{adj[i]:.2g}'} | {'' if val is None else f'{100 * val:.2f}'} | {sel} | {q:,.0f} |")
    return "\n".join(lines)
