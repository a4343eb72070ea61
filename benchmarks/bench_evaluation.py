"""Wall time of one standard evaluation: 600 episodes, 5-way 1-shot, 15 queries, Conv4-32, 32x32, 10 SGD steps.

Compares, in one run and on the same episodes:
  evaluate -- dfml_bench.evaluation.evaluate (episodes split over --threads worker threads, 1 intra-op thread each)
  naive    -- the reference code's way: one episode at a time, autograd.grad per step, NCHW, --threads intra-op threads
  loop     -- (--all) evaluate_loop, the plain single-threaded oracle
  vmap     -- (--all) evaluate_vmap (vmap chunks: grouped convolutions)
  bmm      -- (--all) dfml_bench.batched: im2col + bmm over episodes for the adaptation
and prints each wall time and process CPU time, the speed-up over `naive` (target >= 4x), the achieved
GFLOP/s (FLOPs counted by torch's FlopCounterMode on one episode) against the machine's large-matmul GFLOP/s
with the same threads (the physical limit), and whether the accuracies agree. The machine is shared: the
load average is printed; compare ratios from one run. Reference code: 66-86 s per evaluation on 2 cores.

    python benchmarks/bench_evaluation.py [--episodes 600] [--threads 2] [--device cpu] [--all]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from dfml_bench.backbones import BackboneSpec, build_backbone
from dfml_bench.datasets.base import ImageDataset
from dfml_bench.episodes import EpisodeSpec, sample_episodes
from dfml_bench import batched
from dfml_bench.evaluation import (AdaptProtocol, _accuracies, batch_stat_copy, evaluate, evaluate_loop, evaluate_vmap,
                                   summarize)


def synthetic_dataset(n_classes: int = 20, per_class: int = 20, size: int = 32, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    images = torch.randint(0, 256, (len(labels), 3, size, size), generator=g, dtype=torch.uint8)
    splits = {"train": list(range(0, 10)), "val": list(range(10, 15)), "test": list(range(15, 20))}
    return ImageDataset("bench", images, labels, [str(i) for i in range(n_classes)], splits,
                        (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), f"bench-{seed}")


def naive_loop(model, dataset, episodes, protocol, device) -> torch.Tensor:
    """How the reference code evaluates: one episode at a time, autograd.grad per step, NCHW tensors."""
    net = batch_stat_copy(model, device)
    names = [n for n, _ in net.named_parameters()]
    buffers = dict(net.named_buffers())
    acc = torch.empty(len(episodes), dtype=torch.float64)
    for e in range(len(episodes)):
        sx, sy, qx, qy = (t[0] for t in episodes.tensors(dataset, slice(e, e + 1), device))
        fast = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
        for _ in range(protocol.steps):
            loss = F.cross_entropy(functional_call(net, (dict(zip(names, fast)), buffers), (sx,)), sy)
            grads = torch.autograd.grad(loss, fast)
            fast = [(p - protocol.lr * g).detach().requires_grad_(True) for p, g in zip(fast, grads)]
        with torch.no_grad():
            logits = functional_call(net, (dict(zip(names, fast)), buffers), (qx,))
        acc[e] = (logits.argmax(-1) == qy).double().mean()
    return acc


def bmm_kernel(model, dataset, episodes, protocol, device, chunk: int = 10) -> torch.Tensor:
    """Adaptation by dfml_bench.batched (im2col + bmm over a chunk of episodes), query by the batched kernel."""
    net = batch_stat_copy(model, device)
    params = {k: v.detach() for k, v in net.named_parameters()}
    acc = torch.empty(len(episodes), dtype=torch.float64)
    for s in range(0, len(episodes), chunk):
        sx, sy, qx, qy = episodes.tensors(dataset, slice(s, s + chunk), device)
        fast = batched.adapt(net, batched.expand_params(params, len(sx)), sx, sy, steps=protocol.steps,
                             lr=protocol.lr, create_graph=False)
        with torch.no_grad():
            acc[s : s + len(sx)] = _accuracies(batched.conv4_forward(net, fast, qx), qy)
    return acc


def matmul_gflops(threads: int, device: str, n: int = 2048, reps: int = 5) -> float:
    """Large float32 matrix-product speed with ``threads`` intra-op threads: the machine's practical peak."""
    torch.set_num_threads(threads)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    _, wall, _ = timed(lambda: [a @ b for _ in range(reps)])
    return 2 * n**3 * reps / wall / 1e9


def episode_flops(model, dataset, episodes, protocol, device) -> int:
    """FLOPs of one episode's adaptation and query prediction, counted by torch (convolutions, matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        naive_loop(model, dataset, episodes.subset(slice(0, 1)), protocol, device)
    return fc.get_total_flops()


def timed(fn, *args, **kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--all", action="store_true", help="also time the plain loop, vmap and the bmm kernel")
    ap.add_argument("--no-naive", action="store_true", help="skip the reference-style loop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ds = synthetic_dataset()
    eps = sample_episodes(ds, "test", EpisodeSpec(ways=5, shots=1, queries=15, n_episodes=args.episodes), seed=0)
    model = build_backbone(BackboneSpec("conv4", 32), 5, (3, 32, 32), ds.mean, ds.std, seed=0)
    protocol = AdaptProtocol(steps=10, lr=0.01)
    load = open("/proc/loadavg").read().strip() if os.path.exists("/proc/loadavg") else "n/a"
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, {args.episodes} episodes "
          f"5-way 1-shot 15 queries, Conv4-32 32x32, {protocol.steps} steps lr {protocol.lr}; loadavg {load}", flush=True)

    flops = episode_flops(model, ds, eps, protocol, args.device) * args.episodes
    peak = matmul_gflops(args.threads, args.device)
    torch.set_num_threads(args.threads)
    warm = eps.subset(slice(0, 4))  # one-off costs (oneDNN primitive creation) out of the timings
    runs = {"evaluate": lambda e: evaluate(model, ds, e, protocol, device=args.device, workers=args.threads)}
    if not args.no_naive:
        runs["naive"] = lambda e: naive_loop(model, ds, e, protocol, args.device)
    if args.all:
        runs["loop"] = lambda e: evaluate_loop(model, ds, e, protocol, device=args.device)
        runs["vmap"] = lambda e: evaluate_vmap(model, ds, e, protocol, device=args.device)
        runs["bmm"] = lambda e: bmm_kernel(model, ds, e, protocol, args.device)
    results = {}
    for name, fn in runs.items():
        torch.set_num_threads(1 if name == "loop" else args.threads)
        fn(warm)
        results[name] = timed(fn, eps)
        torch.set_num_threads(args.threads)

    print(f"work: {flops / 1e12:.3f} TFLOP ({flops / args.episodes / 1e9:.2f} GFLOP per episode); "
          f"large-matmul peak with {args.threads} threads: {peak:.0f} GFLOP/s -> floor {flops / peak / 1e9:.1f} s")
    for name, (acc, wall, cpu) in results.items():
        s = summarize(acc)
        rate = flops / wall / 1e9
        print(f"{name:9s} wall {wall:7.1f} s   cpu {cpu:7.1f} s   {rate:6.1f} GFLOP/s = {rate / peak:5.1%} of peak   "
              f"acc {100 * s['mean']:.2f} +- {100 * s['ci95']:.2f}")
    if "naive" in results:
        print(f"speed-up evaluate vs naive (reference-style) loop: {results['naive'][1] / results['evaluate'][1]:.2f}x (target >= 4x)")
    a = results["evaluate"][0]
    for name in results:
        if name != "evaluate":
            b = results[name][0]
            print(f"evaluate vs {name}: {int((a != b).sum())} of {len(a)} episodes differ (max |diff| "
                  f"{float((a - b).abs().max()):.4f}; a near-tied query can flip between roundings)")


if __name__ == "__main__":
    main()
