"""One replay meta-update: second-order MAML over a meta-batch of 10 tasks (5-way 1-shot, 15 queries,
Conv4-32, 32x32, 5 inner SGD steps as FREE's replay and the oracle use), in one run:
  plain  -- the one-graph form (``maml_loss`` + backward, torch.func inner loop, NCHW): what the code did
  step   -- ``baselines.maml.maml_step`` (per-task gradients over --threads worker threads, channels-last)
  bmm    -- (--bmm) the tasks' inner loops batched by dfml_bench.batched (im2col + bmm), second-order
Reference code: 1.3 s per update of 10 tasks on 2 cores; target at least 2x faster (0.65 s).

    python benchmarks/bench_maml.py [--tasks 10] [--steps 5] [--threads 2] [--reps 3] [--bmm]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from baselines.maml import maml_loss, maml_step
from dfml_bench import batched
from dfml_bench.backbones import BackboneSpec, build_backbone

REFERENCE_S = 1.3


def make_tasks(n: int, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(5, 3, size, size, generator=g), torch.arange(5), torch.rand(75, 3, size, size, generator=g),
             torch.arange(5).repeat_interleave(15)) for _ in range(n)]


def plain_step(model, opt, tasks, steps):
    loss = maml_loss(model, tasks, steps=steps, lr=0.01)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bmm_step(model, opt, tasks, steps):
    sx, sy, qx, qy = (torch.stack(t) for t in zip(*tasks))
    params = dict(model.named_parameters())
    fast = batched.adapt(model, batched.expand_params(params, len(tasks)), sx, sy, steps=steps, lr=0.01, create_graph=True)
    loss = batched.episode_losses(model, fast, qx, qy).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed(fn, reps: int) -> tuple[float, float]:
    fn()  # warm-up: oneDNN primitives
    t, c = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps, (time.process_time() - c) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bmm", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tasks = make_tasks(args.tasks)
    model = build_backbone(BackboneSpec("conv4", 32), 5, (3, 32, 32), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    load = open("/proc/loadavg").read().strip() if os.path.exists("/proc/loadavg") else "n/a"
    print(f"torch {torch.__version__}, {args.threads} threads, {args.tasks} tasks 5-way 1-shot 15 queries, Conv4-32 32x32, "
          f"{args.steps} inner steps, second order; loadavg {load}")
    runs = {"plain": lambda: plain_step(model, opt, tasks, args.steps),
            "step": lambda: maml_step(model, opt, tasks, steps=args.steps, lr=0.01, workers=args.threads)}
    if args.bmm:
        runs["bmm"] = lambda: bmm_step(model, opt, tasks, args.steps)
    res = {name: timed(fn, args.reps) for name, fn in runs.items()}
    for name, (wall, cpu) in res.items():
        print(f"{name:6s} wall {wall:6.3f} s  cpu {cpu:6.3f} s per meta-update  (reference {REFERENCE_S} s: "
              f"{REFERENCE_S / wall:.2f}x)")
    print(f"speed-up step vs plain: {res['plain'][0] / res['step'][0]:.2f}x wall, {res['plain'][1] / res['step'][1]:.2f}x cpu")


if __name__ == "__main__":
    main()
