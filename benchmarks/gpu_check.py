"""GPU check: per-step costs of every method's building blocks, one 600-episode evaluation and one zoo
model-epoch at the papers' geometry (32x32 CIFAR-FS, 84x84 MiniImageNet / CUB; zoo architectures Conv4-32,
ResNet-10-64, ResNet-18-64; meta-learner Conv4-32), on synthetic data, printed beside the reference code's
figures (measured on a 2-core CPU, /work/shared/reference/reference-timing.md).

    python benchmarks/gpu_check.py --device cuda [--json out.json]
    python benchmarks/gpu_check.py --device cpu --quick          # small counts, scaled up; a smoke test

Every row is one timed call after a warm-up call. ``--quick`` measures fewer episodes / tasks / images /
ZO directions and scales the time linearly to the full count (column ``full``), 32x32 only unless
``--sizes`` says otherwise; the scaled figure is an estimate, the measured one is exact.

Rows (method -> what its step is):
  eval-600        every method: evaluate() of 600 episodes, 5-way 1-shot, 15 queries, 10 SGD steps
  zoo-epoch       zoo build: one epoch of train_one, 5 classes x 600 images (80/20 held-out), batch 128
  maml-10         oracle / FREE replay: one second-order MAML meta-update of 10 tasks, 5 inner steps
  maml-4          BiDf-MKD memory replay: the same with 4 tasks
  free-gen-step   FREE recovery: one generator step, 100 images through a Conv4 teacher (CE + BN matching)
  zo-iteration    BiDf-MKD synthesis: one ZO generator iteration, B=150, q=100 (15,150 teacher queries)
  kd-inner        BiDf-MKD KD: 10 second-order inner steps on 150 images with soft targets, then backward
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.generator import augment, make_generator_module  # noqa: E402
from baselines.inversion import LossWeights, bn_hooks, inversion_loss  # noqa: E402
from baselines.maml import maml_step  # noqa: E402
from dfml_bench.backbones import BackboneSpec, build_backbone  # noqa: E402
from dfml_bench.datasets.base import ImageDataset  # noqa: E402
from dfml_bench.episodes import EpisodeSpec, sample_episodes  # noqa: E402
from dfml_bench.evaluation import AdaptProtocol, evaluate, inner_adapt  # noqa: E402
from dfml_bench.utils import atomic_write_json  # noqa: E402
from dfml_bench.zoo import TrainRecipe, ZooSpec, train_one  # noqa: E402

# reference code on 2 CPU cores (reference-timing.md), 32x32 Conv4 unless said otherwise
REFERENCE = {"eval-600": 86.0, "zoo-epoch": 2.8, "maml-10": 1.31, "maml-4": 0.67, "free-gen-step": 0.6,
             "zo-iteration": 7.75, "kd-inner": 1.15}
ZOO_ARCHS = {"conv4": BackboneSpec("conv4", 32), "resnet10": BackboneSpec("resnet10", 64),
             "resnet18": BackboneSpec("resnet18", 64)}
META = BackboneSpec("conv4", 32)


@dataclass
class Row:
    check: str
    size: int
    arch: str
    measured_s: float
    measured_of: int
    full_of: int
    full_s: float
    reference_s: float | None


@dataclass(frozen=True)
class Counts:
    """How much of each step is measured (full counts unless ``--quick``)."""

    episodes: int = 600
    per_class: int = 600
    tasks: int = 10
    zo_q: int = 100
    kd_images: int = 150


QUICK = Counts(episodes=4, per_class=12, tasks=2, zo_q=4, kd_images=30)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def synthetic(n_classes: int, per_class: int, size: int, seed: int = 0) -> ImageDataset:
    """Random images; the first third of the classes (at least 5) meta-train, then val, then test."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    images = torch.randint(0, 256, (len(labels), 3, size, size), generator=g, dtype=torch.uint8)
    third = max(5, n_classes // 3)
    rest = (n_classes - third) // 2
    splits = {"train": list(range(third)), "val": list(range(third, third + rest)), "test": list(range(third + rest, n_classes))}
    return ImageDataset("gpu-check", images, labels, [str(i) for i in range(n_classes)], splits,
                        (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), f"gpu-check-{n_classes}-{per_class}-{size}-{seed}")


def meta_learner(size: int, device: torch.device):
    return build_backbone(META, 5, (3, size, size), seed=0).to(device)


def teacher(arch: str, size: int, device: torch.device):
    return build_backbone(ZOO_ARCHS[arch], 5, (3, size, size), track_running_stats=True, seed=1).to(device).eval()


def check_eval(size: int, n: int, device: torch.device) -> float:
    ds = synthetic(15, 20, size)
    eps = sample_episodes(ds, "test", EpisodeSpec(ways=5, shots=1, queries=15, n_episodes=n), seed=0)
    model = meta_learner(size, device)
    return timed(lambda: evaluate(model, ds, eps, AdaptProtocol(10, 0.01), device=device), device)


def check_zoo_epoch(size: int, arch: str, per_class: int, device: torch.device) -> float:
    ds = synthetic(5, per_class, size)
    spec = ZooSpec(dataset="gpu-check", n_models=1, ways=5, backbones=(ZOO_ARCHS[arch],),
                   recipes=(("*", TrainRecipe(epochs=1, batch_size=128)),), seed=0)
    return timed(lambda: train_one(spec, ds, 0, device), device)


def tasks_for(n: int, size: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(5, 3, size, size, generator=g).to(device), torch.arange(5, device=device),
             torch.rand(75, 3, size, size, generator=g).to(device), torch.arange(5, device=device).repeat_interleave(15))
            for _ in range(n)]


def check_maml(size: int, n_tasks: int, device: torch.device) -> float:
    model = meta_learner(size, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tasks = tasks_for(n_tasks, size, device)
    return timed(lambda: maml_step(model, opt, tasks, steps=5, lr=0.01), device)


def check_free_gen(size: int, device: torch.device) -> float:
    g = torch.Generator().manual_seed(0)
    gen = make_generator_module(size, 3, g, device)
    opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
    t = teacher("conv4", size, device)
    y = torch.arange(5, device=device).repeat_interleave(20)

    def step():
        z = torch.randn(100, gen.nz, generator=g).to(device)
        with bn_hooks(t) as hooks:
            loss, _ = inversion_loss(t, augment(gen(z), None), y, LossWeights(ce=1.0, bn=1.0), hooks=hooks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, device)


def check_zo(size: int, q: int, device: torch.device, batch: int = 150, chunk: int = 3000) -> float:
    g = torch.Generator().manual_seed(0)
    gen = make_generator_module(size, 3, g, device)
    opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
    t = teacher("conv4", size, device)
    y = torch.arange(5, device=device).repeat_interleave(batch // 5)

    def step():
        x = gen(torch.randn(batch, gen.nz, generator=g).to(device))
        with torch.no_grad():
            u = torch.randn(q, *x.shape[1:], device=device)
            u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            clean = F.cross_entropy(t(x), y, reduction="none")
            est = torch.zeros_like(x)
            for s in range(0, q, max(1, chunk // batch)):  # the API's chunks of perturbed images
                uu = u[s : s + max(1, chunk // batch)]
                pert = (x.unsqueeze(0) + 1e-3 * uu.unsqueeze(1)).flatten(0, 1)
                losses = F.cross_entropy(t(pert), y.repeat(len(uu)), reduction="none").view(len(uu), batch)
                est += ((losses - clean) / 1e-3).T.unsqueeze(-1).unsqueeze(-1).unsqueeze(-1).mul(uu.unsqueeze(0)).sum(1)
        opt.zero_grad(set_to_none=True)
        (est * x).sum().div(batch).backward()
        opt.step()

    return timed(step, device)


def check_kd_inner(size: int, n_images: int, device: torch.device) -> float:
    model = meta_learner(size, device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_images, 3, size, size, generator=g).to(device)
    soft = torch.softmax(torch.randn(n_images, 5, generator=g), 1).to(device)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())

    def kl(logits, target):
        return F.kl_div(F.log_softmax(logits, 1), target, reduction="batchmean")

    def step():
        fast = inner_adapt(model, params, buffers, x, soft, steps=10, lr=0.01, create_graph=True, loss_fn=kl)
        loss = kl(torch.func.functional_call(model, (fast, buffers), (x,)), soft)
        loss.backward()

    return timed(step, device)


def run(device: torch.device, sizes: list[int], archs: list[str], counts: Counts, log=print) -> list[Row]:
    full = Counts()
    rows: list[Row] = []

    def add(check, size, arch, seconds, measured_of, full_of):
        ref = REFERENCE.get(check) if size == 32 and arch in ("conv4", "-") else None
        rows.append(Row(check, size, arch, seconds, measured_of, full_of, seconds * full_of / measured_of, ref))
        r = rows[-1]
        log(f"{check:14s} {size:3d}px {arch:9s} {r.measured_s:9.3f} s of {measured_of:6d}  full {r.full_s:9.3f} s of "
            f"{full_of:6d}  reference {'-' if ref is None else f'{ref:.2f} s':>8s}")

    for size in sizes:
        add("eval-600", size, "conv4", check_eval(size, counts.episodes, device), counts.episodes, full.episodes)
        for arch in archs:
            add("zoo-epoch", size, arch, check_zoo_epoch(size, arch, counts.per_class, device), counts.per_class, full.per_class)
        add("maml-10", size, "conv4", check_maml(size, counts.tasks, device), counts.tasks, full.tasks)
        four = min(4, counts.tasks * 2)
        add("maml-4", size, "conv4", check_maml(size, four, device), four, 4)
        add("free-gen-step", size, "conv4", check_free_gen(size, device), 1, 1)
        add("zo-iteration", size, "conv4", check_zo(size, counts.zo_q, device), counts.zo_q + 1, full.zo_q + 1)
        add("kd-inner", size, "conv4", check_kd_inner(size, counts.kd_images, device), counts.kd_images, full.kd_images)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small counts scaled up, 32x32 only (a smoke test)")
    ap.add_argument("--sizes", default=None, help="comma-separated image sizes (default 32,84; --quick: 32)")
    ap.add_argument("--archs", default="conv4,resnet10,resnet18", help="zoo architectures for zoo-epoch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the rows and environment to this JSON file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device; use --device cpu --quick to try it here",
              file=sys.stderr)
        return 2
    archs = [a for a in args.archs.split(",") if a]
    unknown = sorted(set(archs) - set(ZOO_ARCHS))
    if unknown:
        print(f"gpu_check: unknown architecture(s) {unknown}; known: {sorted(ZOO_ARCHS)}", file=sys.stderr)
        return 2
    sizes = [int(s) for s in (args.sizes or ("32" if args.quick else "32,84")).split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    load = open("/proc/loadavg").read().strip() if os.path.exists("/proc/loadavg") else "n/a"
    print(f"gpu_check on {name}, torch {torch.__version__}, {'quick' if args.quick else 'full'} counts; loadavg {load}")
    print(f"{'check':14s} {'size':5s} {'arch':9s} {'measured':>14s}  {'scaled to full count':>28s}  reference (2-core CPU)")
    rows = run(device, sizes, archs, QUICK if args.quick else Counts())
    if args.json:
        atomic_write_json(Path(args.json), {"device": name, "torch": torch.__version__, "quick": args.quick,
                                            "loadavg": load, "rows": [asdict(r) for r in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
