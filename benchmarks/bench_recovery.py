"""Teacher agreement on recovered sets against queries spent: the reference ZO estimator against the
query-efficient one (``bidf-mkd-qe``), on the same APIs, in one run.

Both run BiDf-MKD's own synthesis call (``baselines.bidf_mkd.recover``: a freshly reset generator and
latents, Adam, the batch-level crop/flip, best iterate by clean loss) with the scenario's per-class set
size; only the estimator differs:

- faithful: directions uniform on the full image sphere, q = 100 (the reference's ``ss.sh`` settings);
- efficient: orthonormal directions in the H/4 x H/4 subspace, q = 33 (a third of the queries per step).

Teacher agreement = the fraction of the recovered (un-augmented) images that the API labels with the
class they were synthesised for (checked with extra queries that are not counted as spent). Printed
per query checkpoint as the mean over APIs and seeds, then the queries each estimator needed to reach
the faithful estimator's final agreement, and their ratio (the issue's target: at most 1/3).

    python benchmarks/bench_recovery.py [--suite smoke] [--apis 2] [--seeds 1] [--budget 30000]
                                        [--kind logits] [--api inprocess|isolated]
"""

from __future__ import annotations

import argparse
import time

import torch

from baselines.bidf_mkd import _CountingAPI, recover
from baselines.zo import outputs_to_logits
from dfml_bench.access import QueryMeter
from dfml_bench.datasets import load_dataset
from dfml_bench.runner import make_apis
from dfml_bench.scenarios import get_suite
from dfml_bench.zoo import build_zoo


def estimators(q_faithful: int, q_efficient: int) -> dict[str, dict]:
    return {"faithful": dict(q=q_faithful, directions="sphere", orthogonal=False),
            "efficient": dict(q=q_efficient, directions="subspace", orthogonal=True)}


def trace_one(api, *, est: dict, budget: int, ways: int, per_class: int, mu: float, lr: float, ngf: int, seed: int,
              image_shape) -> list[tuple[int, float]]:
    """(queries spent, teacher agreement of the best iterate) after every synthesis iteration."""
    counts: dict[str, int] = {}
    counted = _CountingAPI(api, counts, "q")
    batch = ways * per_class
    iterations = max(1, budget // (batch * (est["q"] + 1)))
    y = torch.arange(batch) % ways
    curve: list[tuple[int, float]] = []

    def on_step(_i: int, best: torch.Tensor) -> None:
        with torch.no_grad():
            out = outputs_to_logits(api.query(best), api.info.output_kind, api.info.num_classes)
        curve.append((counts.get("q", 0), float((out.argmax(1) == y).float().mean())))

    recover(counted, ways=ways, per_class=per_class, iterations=iterations, q=est["q"], mu=mu, lr=lr,
            rng=torch.Generator().manual_seed(seed), device="cpu", image_shape=image_shape, ngf=ngf,
            directions=est["directions"], orthogonal=est["orthogonal"], on_step=on_step)
    return curve


def agreement_at(curve: list[tuple[int, float]], spent: int) -> float | None:
    """The agreement of the best iterate after the last iteration that fitted in ``spent`` queries."""
    got = [a for n, a in curve if n <= spent]
    return got[-1] if got else None


def queries_to_reach(checkpoints: list[int], means: list[float | None], target: float) -> int | None:
    for c, m in zip(checkpoints, means):
        if m is not None and m >= target - 1e-9:
            return c
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="smoke", help="whose first scenario's zoo serves the APIs (smoke: 6 Conv4 teachers, "
                    "built in a minute; blackbox-homo: the sweep's 100-teacher zoo, long to build on a cpu)")
    ap.add_argument("--apis", type=int, default=2, help="APIs of the scenario's zoo to recover from")
    ap.add_argument("--seeds", type=int, default=1, help="recovery seeds per API")
    ap.add_argument("--budget", type=int, default=30_000, help="queries per recovery call (per estimator, API, seed)")
    ap.add_argument("--per-class", type=int, default=5, help="images per class (cpu scale 5; reference 30)")
    ap.add_argument("--q-faithful", type=int, default=100)
    ap.add_argument("--q-efficient", type=int, default=33)
    ap.add_argument("--kind", default="logits", choices=["logits", "probs", "topk", "label"])
    ap.add_argument("--mu", type=float, default=None, help="default 0.005 (10.0 for hard labels)")
    ap.add_argument("--lr", type=float, default=0.01, help="generator Adam lr (cpu scale 0.01)")
    ap.add_argument("--ngf", type=int, default=32)
    ap.add_argument("--api", choices=["inprocess", "isolated"], default="inprocess")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--step", type=int, default=1_000, help="query checkpoint spacing of the table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mu = args.mu if args.mu is not None else (10.0 if args.kind == "label" else 0.005)

    from dataclasses import replace

    sc = replace(get_suite(args.suite, "cpu").scenarios[0], output_kind=args.kind, topk=2 if args.kind == "topk" else 1,
                 budget_total=None)
    ds = load_dataset(sc.dataset, seed=sc.dataset_seed, scale="cpu")
    zoo = build_zoo(sc.zoo, ds, progress=False)
    apis, closer = make_apis(zoo, sc, QueryMeter(len(zoo.entries)), torch.device("cpu"), isolated=args.api == "isolated")
    ests = estimators(args.q_faithful, args.q_efficient)
    print(f"scenario {sc.name} ({args.suite}), {args.kind} APIs ({args.api}), {args.apis} APIs x {args.seeds} seeds, "
          f"{args.per_class} images/class, mu {mu}, budget {args.budget:,} queries per call")
    curves: dict[str, list] = {k: [] for k in ests}
    t0 = time.perf_counter()
    try:
        for i in range(min(args.apis, len(apis))):
            api = apis[i]
            for s in range(args.seeds):
                for name, est in ests.items():
                    t = time.perf_counter()
                    c = trace_one(api, est=est, budget=args.budget, ways=api.info.num_classes, per_class=args.per_class, mu=mu,
                                  lr=args.lr, ngf=args.ngf, seed=1000 * i + s, image_shape=ds.image_shape)
                    curves[name].append(c)
                    print(f"  API {i} seed {s} {name:9s} q={est['q']:3d}: {c[-1][0]:>7,} queries, agreement {c[-1][1]:.2f} "
                          f"({time.perf_counter() - t:.0f}s)", flush=True)
    finally:
        closer()
    checkpoints = list(range(args.step, args.budget + 1, args.step))
    means: dict[str, list] = {}
    for name, cs in curves.items():
        vals = [[agreement_at(c, n) for c in cs] for n in checkpoints]
        means[name] = [None if any(v is None for v in vs) else sum(vs) / len(vs) for vs in vals]
    print("\nteacher agreement on recovered sets (mean over APIs and seeds) against queries spent")
    print(f"{'queries':>9} | " + " | ".join(f"{n} (q={ests[n]['q']})" for n in ests))
    for j, n in enumerate(checkpoints):
        print(f"{n:>9,} | " + " | ".join(f"{'-' if means[k][j] is None else f'{means[k][j]:.3f}':>{len(k) + 8}}" for k in ests))
    final = next((m for m in reversed(means["faithful"]) if m is not None), None)
    if final is None:
        print("the faithful estimator finished no iteration within the budget")
        return
    spent_f = max(n for c in curves["faithful"] for n, _ in c)
    for what, target in (("final", final), ("best", max(m for m in means["faithful"] if m is not None))):
        nf = queries_to_reach(checkpoints, means["faithful"], target)
        ne = queries_to_reach(checkpoints, means["efficient"], target)
        print(f"faithful {what} agreement {target:.3f}: first reached by faithful at {nf:,} queries (it spent {spent_f:,}), "
              f"by efficient at {'never (within the budget)' if ne is None else f'{ne:,}'} queries"
              + ("" if ne is None else f" -> efficient needs {ne / nf:.2f}x the queries (target <= 0.33)"))
    print(f"total wall time {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
