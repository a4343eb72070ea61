"""Meta-val search for BiDf-MKD's cpu setting on blackbox-homo: does any candidate lift meta-val above the
initialisation? Test episodes are never evaluated here; each candidate is fitted as the runner would (same
seeds, same metered APIs, in-process) and reports its meta-val curve, its best iteration and how often
the APIs agree with the labels of its recovered sets.

    python benchmarks/search_bidf_mkd.py --seed 0 --candidates per-model,qe-per-model --out docs/search-bidf-mkd.json

Candidates: ``mixed`` (the default, the reference's interpolated replay tasks), ``per-model`` (replay tasks
from one API's sets, FREE's cpu setting), ``qe`` / ``qe-per-model`` (the same with the query-efficient
estimator of ``bidf-mkd-qe``), ``no-replay`` (bi-level KD only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.bidf_mkd import BiDfMKD  # noqa: E402
from baselines.bidf_mkd_qe import BiDfMKDQE  # noqa: E402
from benchmarks._context import make_context  # noqa: E402

CANDIDATES = {
    "mixed": (BiDfMKD, {}),
    "per-model": (BiDfMKD, {"replay_tasks": "per-model"}),
    "qe": (BiDfMKDQE, {}),
    "qe-per-model": (BiDfMKDQE, {"replay_tasks": "per-model"}),
    "no-replay": (BiDfMKD, {"use_memory_replay": False}),
}


def run(name: str, suite: str, seed: int) -> dict:
    cls, params = CANDIDATES[name]
    ctx, *_ = make_context(suite, "cpu", seed, method=cls.name, log=None)
    m = cls(**params)
    t0 = time.perf_counter()
    m.fit(ctx)
    rep = getattr(m, "report_", {}) or {}
    keep = ("best_iteration", "best_val_acc", "val_curve", "recovery_agreement_mean", "queries_total")
    return {"candidate": name, "method": cls.name, "params": params, "seed": seed, "fit_seconds": time.perf_counter() - t0,
            **{k: rep.get(k) for k in keep}}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="blackbox-homo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--candidates", default="per-model,qe-per-model")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = [c for c in args.candidates.split(",") if c]
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        ap.error(f"unknown candidates {unknown}; choose from {sorted(CANDIDATES)}")
    rows = []
    for name in names:
        rows.append(run(name, args.suite, args.seed))
        r = rows[-1]
        print(f"{name:>14}: best iteration {r['best_iteration']}, best val {r['best_val_acc']:.4f}, "
              f"agreement {r['recovery_agreement_mean']}, curve {r['val_curve']}, {r['fit_seconds']:.0f} s", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
