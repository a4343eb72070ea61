"""Wall time of one standard evaluation: 600 episodes, 5-way 1-shot, 15 queries, Conv4-32, 32x32, 10 SGD steps.

Compares, in one run and on the same episodes:
  vmap   -- dfml_bench.evaluation.evaluate (episodes adapted in vmap chunks)
  loop   -- dfml_bench.evaluation.evaluate_loop (per-episode Python loop, channels-last on CPU)
  naive  -- (--naive) an official-code-style loop: torch.autograd.grad per step, NCHW, one episode at a time
and prints each wall time (and process CPU time), the ratios, and whether the accuracies agree.
The official DFML code takes about 86 s for a 600-episode evaluation on a 2-core machine.

    python benchmarks/bench_evaluation.py [--episodes 600] [--threads 2] [--device cpu] [--naive]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from dfml_bench.backbones import BackboneSpec, build_backbone
from dfml_bench.datasets.base import ImageDataset
from dfml_bench.episodes import EpisodeSpec, sample_episodes
from dfml_bench.evaluation import AdaptProtocol, auto_chunk_size, batch_stat_copy, evaluate, evaluate_loop, summarize


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
    ap.add_argument("--chunk-size", type=int, default=None, help="episodes per vmap chunk (default: memory estimate)")
    ap.add_argument("--naive", action="store_true", help="also time an official-code-style loop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ds = synthetic_dataset()
    eps = sample_episodes(ds, "test", EpisodeSpec(ways=5, shots=1, queries=15, n_episodes=args.episodes), seed=0)
    model = build_backbone(BackboneSpec("conv4", 32), 5, (3, 32, 32), ds.mean, ds.std, seed=0)
    protocol = AdaptProtocol(steps=10, lr=0.01)
    chunk = args.chunk_size or auto_chunk_size(batch_stat_copy(model, args.device), eps, ds.image_shape, args.device)
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, {args.episodes} episodes "
          f"5-way 1-shot 15 queries, Conv4-32 32x32, {protocol.steps} steps lr {protocol.lr}, vmap chunk {chunk}")

    warm = eps.subset(slice(0, 2))  # one-off costs (oneDNN primitive creation, vmap set-up) out of the timings
    evaluate(model, ds, warm, protocol, device=args.device)
    evaluate_loop(model, ds, warm, protocol, device=args.device)

    results = {}
    results["vmap"] = timed(evaluate, model, ds, eps, protocol, device=args.device, chunk_size=chunk)
    results["loop"] = timed(evaluate_loop, model, ds, eps, protocol, device=args.device)
    if args.naive:
        results["naive"] = timed(naive_loop, model, ds, eps, protocol, args.device)

    for name, (acc, wall, cpu) in results.items():
        s = summarize(acc)
        print(f"{name:6s} wall {wall:7.1f} s   cpu {cpu:7.1f} s   acc {100 * s['mean']:.2f} +- {100 * s['ci95']:.2f}")
    base = results["vmap"][1]
    for name in results:
        if name != "vmap":
            print(f"ratio {name}/vmap (wall): {results[name][1] / base:.2f}x")
    a, b = results["vmap"][0], results["loop"][0]
    # grouped (vmap) and plain convolutions round differently; a query whose two best logits are within
    # that rounding can flip, so a few episodes may differ by one query (1/75) at most.
    print(f"vmap vs loop: {int((a != b).sum())} of {len(a)} episodes differ, max |diff| {float((a - b).abs().max()):.4f}, "
          f"mean diff {float((a - b).mean()):+.5f}")


if __name__ == "__main__":
    main()
