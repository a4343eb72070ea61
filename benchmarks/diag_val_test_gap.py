"""Diagnostic: how far each method's meta-val gain (what its checkpoint was selected on) is from its test gain.

For every record with a meta-val curve that starts at the initialisation (``val_curve[0]`` at step 0), and
the ``random`` record of the same suite, scenario and seed (the same initialisation on the same frozen test
episodes, checked by hash), it reports

- the **meta-val gain**: best meta-val accuracy minus meta-val at the initialisation, the figure the
  method's own selection saw;
- the **test gain**: the record's test accuracy minus ``random``'s;
- their difference, the **optimism** of meta-val for that method.

Why: selection is on meta-val only (never test), so a benchmark should know how well a meta-val gain
predicts a test gain, method by method. A positive optimism comes from choosing the best of several
checkpoints on 100 episodes, and from the 16 meta-val classes being a different, small sample of classes
than the 20 test classes: a model that drifts towards the look of the meta-val classes is selected for it.
This reads finished records only; it chooses nothing, so reading their test accuracies here is a report
on the protocol, not selection.

    python benchmarks/diag_val_test_gap.py --results results --plot docs/val-test-gap.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfml_bench.results import iter_records  # noqa: E402
from dfml_bench.stats import mean_ci  # noqa: E402


@dataclass(frozen=True)
class GapRow:
    suite: str
    scenario: str
    method: str
    seed: int
    val_init: float
    val_best: float
    best_step: float
    test: float
    random_test: float

    @property
    def val_gain(self) -> float:
        return 100 * (self.val_best - self.val_init)

    @property
    def test_gain(self) -> float:
        return 100 * (self.test - self.random_test)

    @property
    def optimism(self) -> float:
        return self.val_gain - self.test_gain


def gap_rows(results: str | Path) -> list[GapRow]:
    """One :class:`GapRow` per ok record that has a meta-val curve from the initialisation and a ``random``
    record on the same test episodes."""
    recs = {}
    for p in iter_records(results):
        d = json.loads(p.read_text())
        if d.get("status") == "ok" and d.get("accuracy"):
            recs[(d["suite"], d["scenario"], d["method"], d["seed"])] = d
    rows = []
    for (suite, scenario, method, seed), d in sorted(recs.items()):
        rnd = recs.get((suite, scenario, "random", seed))
        curve = (d.get("extra") or {}).get("val_curve") or []
        if method == "random" or rnd is None or not curve or curve[0][0] != 0:
            continue
        if d["hashes"].get("test_episodes") != rnd["hashes"].get("test_episodes"):
            continue
        step, best = max(curve, key=lambda c: c[1])
        rows.append(GapRow(suite, scenario, method, seed, curve[0][1], best, step, d["accuracy"]["mean"],
                           rnd["accuracy"]["mean"]))
    return rows


def summarise(rows: list[GapRow], by: tuple[str, ...] = ("suite", "method")) -> list[dict]:
    """Mean meta-val gain, test gain and optimism (points) per group, with a 95 % t interval on the
    optimism across the group's records (None below 2 records)."""
    groups: dict[tuple, list[GapRow]] = defaultdict(list)
    for r in rows:
        groups[tuple(getattr(r, k) for k in by)].append(r)
    out = []
    for key, rs in sorted(groups.items()):
        mean, half = mean_ci([r.optimism for r in rs])
        out.append({**dict(zip(by, key)), "n": len(rs), "val_gain": statistics.mean(r.val_gain for r in rs),
                    "test_gain": statistics.mean(r.test_gain for r in rs), "optimism": mean,
                    "optimism_ci": None if math.isnan(half) else (mean - half, mean + half)})
    return out


def markdown(summary: list[dict], by: tuple[str, ...]) -> str:
    head = "| " + " | ".join(by) + " | records | meta-val gain | test gain | optimism [95% CI] |"
    lines = [head, "|" + "---|" * (len(by) + 4)]
    for s in summary:
        ci = f" [{s['optimism_ci'][0]:+.2f}, {s['optimism_ci'][1]:+.2f}]" if s["optimism_ci"] else ""
        lines.append("| " + " | ".join(str(s[k]) for k in by)
                     + f" | {s['n']} | {s['val_gain']:+.2f} | {s['test_gain']:+.2f} | {s['optimism']:+.2f}{ci} |")
    return "\n".join(lines)


def plot(rows: list[GapRow], path: str | Path) -> None:
    """Scatter of test gain against meta-val gain, one point per record, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for m in sorted({r.method for r in rows}):
        rs = [r for r in rows if r.method == m]
        ax.scatter([r.val_gain for r in rs], [r.test_gain for r in rs], label=m, s=18)
    lo = min(0.0, *(r.test_gain for r in rows), *(r.val_gain for r in rows)) - 1
    hi = max(*(r.test_gain for r in rows), *(r.val_gain for r in rows)) + 1
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="test gain = meta-val gain")
    ax.set_xlabel("meta-val gain at the selected checkpoint (points)")
    ax.set_ylabel("test gain over random (points)")
    ax.set_title("Does meta-val predict test? (one point per record)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[GapRow]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results")
    ap.add_argument("--by", default="suite,method", help="comma-separated grouping: suite, scenario, method, seed")
    ap.add_argument("--out", default=None, help="write the rows and the summary as JSON here")
    ap.add_argument("--plot", default=None, help="write the scatter plot here (PNG)")
    args = ap.parse_args(argv)
    by = tuple(k for k in args.by.split(",") if k)
    bad = [k for k in by if k not in ("suite", "scenario", "method", "seed")]
    if bad:
        ap.error(f"--by takes suite, scenario, method, seed; got {bad}")
    rows = gap_rows(args.results)
    if not rows:
        ap.error(f"no record under {args.results} has a meta-val curve and a matching random record")
    summary = summarise(rows, by)
    print(markdown(summary, by))
    r = stats.pearsonr([x.val_gain for x in rows], [x.test_gain for x in rows])
    print(f"\n{len(rows)} records; Pearson r(meta-val gain, test gain) = {r.statistic:.2f}; "
          f"mean optimism {statistics.mean(x.optimism for x in rows):+.2f} points")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": [{**asdict(x), "val_gain": x.val_gain, "test_gain": x.test_gain,
                                                        "optimism": x.optimism} for x in rows], "summary": summary}, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
