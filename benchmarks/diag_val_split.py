"""Diagnostic (meta-val only): is a method's meta-val gain a property of its meta-val *episodes*, of its
meta-val *classes*, or of the task?

``benchmarks/diag_val_test_gap.py`` shows that for some methods (the placebo, purer, bidf-mkd-qe) the
meta-val gain of the selected checkpoint is 2-4 points larger than the test gain, while for others (tgr,
bidf-mkd) the two agree. Two explanations can be told apart without any test episode:

- **episode noise**: the best of several checkpoints on 100 frozen episodes is optimistic. Checked by
  scoring every checkpoint also on ``--episodes`` *fresh* episodes of the same meta-val classes: the gain
  at the method's own choice on fresh episodes against the one it was chosen on;
- **class drift**: 16 meta-val classes are a small sample of classes, and a model can drift towards or
  away from their look without learning anything that transfers. Checked by splitting the meta-val
  classes into two seeded halves A and B, choosing the checkpoint on A and scoring it on B (and the
  reverse): a gain on A that does not reach B is class drift, the same thing that separates meta-val
  from test.

The method is fitted exactly as the runner would (``benchmarks/_context.py``; its own selection on its
own meta-val episodes is untouched, so the fit is the same); only the extra scoring is added at each of
its meta-val checkpoints.

    python benchmarks/diag_val_split.py --suite whitebox-homo --seed 0 --methods placebo,purer
    python benchmarks/diag_val_split.py --suite blackbox-homo --seed 0 --methods bidf-mkd,bidf-mkd-qe
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._context import make_context  # noqa: E402
from dfml_bench.episodes import EpisodeSet, EpisodeSpec, sample_episodes  # noqa: E402
from dfml_bench.evaluation import evaluate  # noqa: E402
from dfml_bench.methods import get_method  # noqa: E402
from dfml_bench.utils import derive_seed  # noqa: E402

SETS = ("val", "fresh", "A", "B")


def split_classes(classes: list[int], seed: int) -> tuple[list[int], list[int]]:
    """Two disjoint halves of ``classes`` (sorted each), by a seeded permutation."""
    perm = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed)).tolist()
    half = len(classes) // 2
    return sorted(classes[i] for i in perm[:half]), sorted(classes[i] for i in perm[half:])


def extra_episodes(dataset, spec: EpisodeSpec, n: int, seed: int) -> dict[str, EpisodeSet]:
    """``fresh``: ``n`` new episodes over all meta-val classes; ``A`` / ``B``: ``n`` episodes over each half of
    them. Seeds are derived from ``seed`` and differ from the frozen meta-val episodes'."""
    a, b = split_classes(list(dataset.splits["val"]), derive_seed("val-split", "classes", seed))
    nspec = EpisodeSpec(spec.ways, spec.shots, spec.queries, n)
    out = {"fresh": sample_episodes(dataset, "val", nspec, derive_seed("val-split", "fresh", seed))}
    for name, half in (("A", a), ("B", b)):
        if len(half) < spec.ways:
            raise ValueError(f"half {name} of the meta-val classes has {len(half)} classes, fewer than {spec.ways} ways")
        ds = replace(dataset, splits={**dataset.splits, "val": half})
        out[name] = sample_episodes(ds, "val", nspec, derive_seed("val-split", name, seed))
    return out


def analyse(trace: list[dict[str, float]]) -> dict[str, float | int]:
    """Gains (points, against the first checkpoint, the initialisation) at the checkpoints each set chooses.

    ``trace[i][s]`` is checkpoint i's accuracy on set s (``SETS``). Returns the method's own choice (argmax
    of ``val``, the first on ties, as the methods choose) with its gain on ``val`` and on ``fresh``, and the
    class-transfer figures: the checkpoint chosen on A scored on B and the reverse, averaged.
    """
    if len(trace) < 2:
        raise ValueError("need the initialisation and at least one trained checkpoint")

    def gain(i: int, s: str) -> float:
        return 100 * (trace[i][s] - trace[0][s])

    def choose(s: str) -> int:
        return max(range(len(trace)), key=lambda i: (trace[i][s], -i))

    own, a, b = choose("val"), choose("A"), choose("B")
    chosen_half = (gain(a, "A") + gain(b, "B")) / 2
    other_half = (gain(a, "B") + gain(b, "A")) / 2
    return {"checkpoints": len(trace), "own_choice": own, "val_gain": gain(own, "val"), "fresh_gain": gain(own, "fresh"),
            "episode_optimism": gain(own, "val") - gain(own, "fresh"), "half_chosen_gain": chosen_half,
            "half_other_gain": other_half, "class_optimism": chosen_half - other_half}


def run(method: str, suite: str, seed: int, episodes: int) -> dict:
    """Fit ``method`` on ``suite``'s first scenario (seed ``seed``), scoring each meta-val checkpoint on the
    extra sets too."""
    ctx, ds, _, _, sc = make_context(suite, "cpu", seed, method=method, log=None)
    sets = extra_episodes(ds, ctx.val_episodes.spec, episodes, seed)
    own = ctx._evaluate_val
    trace: list[dict[str, float]] = []

    def evaluate_val(model, n=None):
        acc = own(model, n)
        row = {"val": float(acc.mean())}
        for name, eps in sets.items():  # evaluate adapts a copy: the method's model is left as it was
            row[name] = float(evaluate(model, ds, eps, sc.protocol, device=ctx.device).mean())
        trace.append(row)
        return acc

    ctx = replace(ctx, _evaluate_val=evaluate_val)
    m = get_method(method)
    t0 = time.perf_counter()
    m.fit(ctx)
    report = getattr(m, "report_", {}) or {}
    keep = ("best_val_acc", "recovery_agreement_mean", "recovery_margin_median", "teacher_acc_on_recovered")
    return {"method": method, "suite": suite, "seed": seed, "episodes_per_set": episodes,
            "fit_seconds": time.perf_counter() - t0, "trace": trace, **analyse(trace),
            **{k: report[k] for k in keep if k in report}}


def markdown(rows: list[dict]) -> str:
    lines = ["| method | seed | checkpoints | meta-val gain (own choice) | same on fresh episodes | gain on the half it was chosen on "
             "| same checkpoint on the other half | class optimism |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r['checkpoints']} | {r['val_gain']:+.2f} | {r['fresh_gain']:+.2f} | "
                     f"{r['half_chosen_gain']:+.2f} | {r['half_other_gain']:+.2f} | {r['class_optimism']:+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="whitebox-homo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="placebo,purer")
    ap.add_argument("--episodes", type=int, default=200, help="episodes in each extra set (fresh, A, B)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.episodes < 10:
        ap.error("--episodes must be at least 10")
    torch.set_num_threads(args.threads)
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        rows.append(run(method, args.suite, args.seed, args.episodes))
        print(markdown(rows[-1:]), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
