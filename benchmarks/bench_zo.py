"""Queries per second of the batched zero-order estimator: against the plain forward pass of the same
API at the same batch (the forward-pass limit), and against a loop of q separate queries.

Forward-pass limit: ``estimator queries/s / forward images/s`` where the forward is one ``api.query``
of the same (q + 1) x B images, already built. The reference code reaches 0.82 on the 2-core machine
(reference-timing.md B-6); the target is at least 0.95. Printed for the reference sphere estimator and
the query-efficient subspace one. Timings alternate estimator / forward and keep the best of
``--repeats``, so load from other processes hits both alike.

The batched estimator (``baselines.zo.zo_gradient``) sends the clean batch and its q perturbations as
ONE query of (q + 1) x B images; the loop variant sends the clean batch and then each perturbation
separately (q + 1 queries of B images), as a naive implementation (or one API call per direction)
would. Both compute the same estimate; the ratio of their throughputs is printed.

    python benchmarks/bench_zo.py [--arch conv4] [--batch 1,25] [--q 8,100] [--repeats 5] [--threads 2]
    python benchmarks/bench_zo.py --api isolated   # through the process-isolated API server (real runs)
    python benchmarks/bench_zo.py --api isolated --batch 25 --q 100 --no-loop   # the forward-limit ratio only

``--api inprocess`` (default) times the estimator against an API in this process: it isolates the
cost of the extra forward passes. ``--api isolated`` serves a Conv4 model of the cpu smoke zoo from the
isolated server that every black-box run uses, so each query also pays its round trip (request,
shared-memory copy, reply): the setting the batching is for.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from baselines.zo import query_logits, sphere_directions, zo_gradient
from dfml_bench.access import APIInfo, InProcessAPI, QueryMeter
from dfml_bench.backbones import BackboneSpec, build_backbone


def zo_gradient_loop(api, x, targets, *, q: int, mu: float, generator: torch.Generator) -> torch.Tensor:
    """The same estimator with one API call per direction (the baseline the batched one is measured against)."""
    with torch.no_grad():
        xc = x.clamp(mu, 1 - mu)
        d = x[0].numel()
        clean = F.cross_entropy(query_logits(api, xc), targets, reduction="none")
        u = sphere_directions(q, tuple(xc.shape), generator, xc.device)
        g = torch.zeros_like(x)
        for j in range(q):
            lj = F.cross_entropy(query_logits(api, xc + mu * u[j]), targets, reduction="none")
            g += ((lj - clean) / mu).view(-1, 1, 1, 1) * u[j]
        return g * d / q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="conv4", choices=["conv4", "resnet10", "resnet18"])
    ap.add_argument("--width", type=int, default=None, help="default: 32 for conv4, 16 for the ResNets (cpu-scale zoo)")
    ap.add_argument("--batch", default="1,25", help="comma-separated images per estimate (1: one sample's directions; "
                    "25: a cpu-scale synthesis batch, 5 classes x 5)")
    ap.add_argument("--q", default="8,100", help="comma-separated numbers of directions (8: cpu scale; 100: the reference)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--api", choices=["inprocess", "isolated"], default="inprocess")
    ap.add_argument("--no-loop", action="store_true", help="skip the (slow) one-query-per-direction baseline")
    ap.add_argument("--device", default="cpu", help="where the API runs (the server's device with --api isolated)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    width = args.width or (32 if args.arch == "conv4" else 16)
    closer = lambda: None  # noqa: E731
    if args.api == "isolated":
        from dfml_bench.datasets import load_dataset
        from dfml_bench.runner import make_apis
        from dfml_bench.scenarios import get_suite
        from dfml_bench.zoo import build_zoo

        sc = get_suite("smoke", "cpu").scenario("bb-glyphs-conv4-5w1s")
        ds = load_dataset(sc.dataset, seed=sc.dataset_seed, scale="cpu")
        zoo = build_zoo(sc.zoo, ds, progress=False)
        apis, closer = make_apis(zoo, sc, QueryMeter(len(zoo.entries)), torch.device(args.device), isolated=True)
        api, args.arch, width = apis[0], zoo.entries[0].arch, zoo.entries[0].width
    else:
        model = build_backbone(BackboneSpec(args.arch, width), 5, (3, 32, 32), track_running_stats=True, seed=0).eval()
        api = InProcessAPI(model, APIInfo(0, 5, tuple(range(5)), (3, 32, 32)), QueryMeter(1))
    print(f"API: {args.api} ({type(api).__name__})")
    try:
        for batch in (int(b) for b in args.batch.split(",")):
            for q in (int(v) for v in args.q.split(",")):
                run_one(api, batch, q, args, width)
    finally:
        closer()


def best_alternating(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best wall time and best client-process CPU time of each function, calls interleaved
    (a, b, a, b, ...) after one warm-up each."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    cpu = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
            cpu[k] = min(cpu[k], time.process_time() - c0)
    return best, cpu


def run_one(api, batch: int, q: int, args, width: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g)
    y = torch.arange(batch) % 5
    loss = lambda logits, idx: F.cross_entropy(logits, y[idx], reduction="none")  # noqa: E731
    n = (q + 1) * batch

    # same estimate from both (same directions): a correctness check before timing
    ga = zo_gradient(api, x, loss, q=q, mu=0.005, generator=torch.Generator().manual_seed(1))[0]
    gb = zo_gradient_loop(api, x, y, q=q, mu=0.005, generator=torch.Generator().manual_seed(1))
    rel = float((ga - gb).norm() / gb.norm().clamp_min(1e-12))
    print(f"arch={args.arch}-{width} batch={batch} q={q} threads={args.threads} queries/estimate={n} "
          f"(batched and loop estimates agree: rel. diff {rel:.1e})")

    # the forward-pass limit: the estimator against one plain query of the same n images
    ready = (x.clamp(0.005, 0.995).unsqueeze(0) + 0.001 * torch.rand(q + 1, *x.shape, generator=g)).flatten(0, 1).clamp(0, 1)
    fns = {
        "forward": lambda: api.query(ready),
        "sphere": lambda: zo_gradient(api, x, loss, q=q, mu=0.005, generator=g),
        "subspace": lambda: zo_gradient(api, x, loss, q=q, mu=0.005, generator=g, directions="subspace", orthogonal=True),
    }
    if not args.no_loop:
        fns["loop"] = lambda: zo_gradient_loop(api, x, y, q=q, mu=0.005, generator=g)
    t, cpu = best_alternating(fns, args.repeats)
    qps = {k: n / v for k, v in t.items()}
    print(f"plain forward (1 query of {n} images):  {qps['forward']:10.0f} images/s   ({t['forward'] * 1e3:.1f} ms)")
    for k in ("sphere", "subspace"):
        # load-robust figure: the estimator's own work is client CPU time beyond that of the plain query
        # (summed over the client's threads, so an upper bound of its wall time)
        extra = max(0.0, cpu[k] - cpu["forward"])
        print(f"ZO estimator, {k:8s} directions:   {qps[k]:10.0f} queries/s  ({t[k] * 1e3:.1f} ms/estimate)  "
              f"forward-limit ratio {qps[k] / qps['forward']:.3f} (reference 0.82, target >= 0.95); "
              f"client work {extra * 1e3:.1f} ms CPU -> ratio >= {t['forward'] / (t['forward'] + extra):.3f} without other load")
    if "loop" in qps:
        print(f"loop ({q + 1} queries of {batch} images):     {qps['loop']:10.0f} queries/s  ({t['loop'] * 1e3:.1f} ms/estimate)"
              f"  batched/loop {qps['sphere'] / qps['loop']:.2f}x")


if __name__ == "__main__":
    main()
