"""How cheap can TGR's task embedding be at cpu scale? Prints, for each candidate number of probe-inversion
iterations, what the grouping costs and how well its similarity matrix and groups agree with the
reference-like setting, beside the noise floor (the same setting with a second probe seed).

TGR (``baselines/tgr.py``) inverts every zoo model into a probe set before training and groups the zoo
by the Fisher similarity of those sets. With 100 teachers at 40 probe iterations this takes about 18
of the 30 minutes a cpu suite may spend per seed. A cheaper schedule is acceptable when its similarity
matrix agrees with the 40-iteration one about as well as two 40-iteration runs agree with each other
(the grouping cannot be more faithful than it is reproducible). No episode is touched here; the meta-val
curve of the chosen schedule is in each tgr record (``extra.val_curve``).

    python benchmarks/tgr_probe_schedule.py --teachers 24 --iterations 10,20,40
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.tgr import TGR, group_models, similarity_matrix  # noqa: E402
from benchmarks._context import make_context  # noqa: E402


def offdiag(S: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(len(S), len(S), offset=1)
    return S[i, j]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two vectors."""
    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def labels(groups: list[list[int]], n: int) -> list[int]:
    """Each model's group index."""
    out = [0] * n
    for k, grp in enumerate(groups):
        for i in grp:
            out[i] = k
    return out


def pair_agreement(ga: list[list[int]], gb: list[list[int]], n: int) -> float:
    """Rand index of two partitions: the share of model pairs that both put together or both apart."""
    la, lb = labels(ga, n), labels(gb, n)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return sum((la[i] == la[j]) == (lb[i] == lb[j]) for i, j in pairs) / len(pairs)


def embed(method: TGR, teachers, probe, ctx, cfg: dict, seed: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    S = similarity_matrix(method.embed_zoo(teachers, probe, ctx, cfg, torch.Generator().manual_seed(seed)))
    return S, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="whitebox-homo")
    ap.add_argument("--teachers", type=int, default=24, help="first N zoo models (all: 0)")
    ap.add_argument("--iterations", default="10,20,40", help="candidate probe iterations; the largest is the reference")
    ap.add_argument("--groups", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ctx, _ds, _zoo, _test, sc = make_context(args.suite, "cpu", 0, method="tgr", log=None)
    teachers = ctx.whitebox()
    if args.teachers:
        teachers = teachers[: args.teachers]
    its = sorted(int(v) for v in args.iterations.split(","))
    ref_it = its[-1]
    method = TGR()
    ctx.make_backbone()
    probe = ctx.make_backbone()  # the second draw, as TGR.fit takes it; one probe network for every run
    runs: dict[tuple[int, int], tuple[torch.Tensor, float]] = {}
    for it in its:
        for seed in ((1, 2) if it == ref_it else (1,)):
            cfg = method.config("cpu")
            cfg["probe_iterations"] = it
            runs[it, seed] = embed(method, teachers, probe, ctx, cfg, seed)
            print(f"  probe iterations {it}, probe seed {seed}: {runs[it, seed][1]:.1f} s", flush=True)
    n = len(teachers)
    ref = runs[ref_it, 2]  # the reference: the largest setting, probe seed 2
    gref = group_models(ref[0], args.groups, torch.Generator().manual_seed(0))
    rows = []
    for (it, seed), (S, secs) in sorted(runs.items()):
        if (it, seed) == (ref_it, 2):
            continue
        grp = group_models(S, args.groups, torch.Generator().manual_seed(0))
        rows.append({"probe_iterations": it, "probe_seed": seed, "seconds_per_model": secs / n,
                     "spearman_vs_ref": spearman(offdiag(S), offdiag(ref[0])),
                     "rand_index_vs_ref": pair_agreement(grp, gref, n),
                     "mean_similarity": float(offdiag(S).mean()), "sd_similarity": float(offdiag(S).std())})
    chance = pair_agreement(group_models(ref[0], args.groups, torch.Generator().manual_seed(0), how="random"), gref, n)
    print(f"\nTGR probe schedule on {sc.name} ({n} teachers; reference: {ref_it} iterations, probe seed 2)")
    print(f"{'iterations':>10} {'s/model':>8} {'spearman':>9} {'rand idx':>9} {'mean S':>7} {'sd S':>6}")
    for r in rows:
        tag = "  <- noise floor (same setting, other seed)" if r["probe_iterations"] == ref_it else ""
        print(f"{r['probe_iterations']:>10} {r['seconds_per_model']:>8.2f} {r['spearman_vs_ref']:>9.3f} "
              f"{r['rand_index_vs_ref']:>9.3f} {r['mean_similarity']:>7.3f} {r['sd_similarity']:>6.3f}{tag}")
    print(f"(a random partition into {args.groups} groups: rand index {chance:.3f}; spearman 0 expected)")
    out = {"scenario": sc.name, "teachers": n, "reference_iterations": ref_it, "rows": rows,
           "rand_index_random_partition": chance}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
